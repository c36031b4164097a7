//! `collectorctl`: talk to a running collector through its control socket, and query the
//! samples it stored (DESIGN §2).
//!
//! Exit status: 0 ok; 1 the daemon answered with an error; 2 usage; 3 not running.

use clap::{Args, Parser, Subcommand, ValueEnum};
use collector::config::Config;
use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod docs;

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NOT_RUNNING: u8 = 3;

/// Where `collectorctl` looks for the daemon's configuration when neither `--socket` nor
/// `--config` is given: `$COLLECTOR_CONFIG`, then the packaged file when it exists, then the
/// embedded defaults (`./data/collector.sock`, `./data/collector.db`).
const PACKAGED_CONFIG: &str = "/etc/collector/collector.toml";

#[derive(Parser, Debug)]
#[command(
    name = "collectorctl",
    version,
    about = "Control and inspect a running collector; query the samples it stored",
    long_about = "Control and inspect a running collector through its control socket, and query \
the samples it stored (reading the configured storage directly). Without --socket or --config the \
configuration is $COLLECTOR_CONFIG, else /etc/collector/collector.toml when it exists, else the \
embedded defaults (control socket ./data/collector.sock).",
    after_help = "Exit status: 0 ok, 1 the daemon answered an error, 2 usage, 3 not running.\n\
Times (--since, --until) are RFC 3339 / ISO 8601 (2026-11-01T12:00:00Z; naive is UTC) or \
relative to now: -90s, -30m, -1h, -7d, -2w."
)]
struct Cli {
    /// The daemon's control socket [default: [service] control_socket of the config].
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "config",
        global = true,
        display_order = 900
    )]
    socket: Option<PathBuf>,
    /// The daemon's config, for the socket path and the storage URL [default: $COLLECTOR_CONFIG, /etc/collector/collector.toml if present, embedded].
    #[arg(long, value_name = "FILE", global = true, display_order = 901)]
    config: Option<PathBuf>,
    /// Seconds to wait for the daemon's answer (and for `stop` to finish).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 60.0,
        global = true,
        display_order = 902
    )]
    timeout: f64,
    #[command(subcommand)]
    command: Cmd,
}

/// How a query prints its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// A JSON array (status: one object), for scripts.
    Json,
    /// RFC 4180 CSV with a header line, for spreadsheets.
    Csv,
}

/// `--output` and its `--json` alias, shared by the query commands.
#[derive(Args, Debug, Clone)]
struct OutputArgs {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Same as --output json.
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

impl OutputArgs {
    fn format(&self) -> Output {
        if self.json {
            Output::Json
        } else {
            self.output
        }
    }
}

/// The filters of ceilometer's queries, shared by samples, statistics, meters and resources.
#[derive(Args, Debug, Clone)]
struct FilterArgs {
    /// Only this resource id [default: all].
    #[arg(long, value_name = "ID")]
    resource: Option<String>,
    /// Only samples of this project (tenant) id [default: all].
    #[arg(long, value_name = "ID")]
    project: Option<String>,
    /// Only samples of this user id [default: all].
    #[arg(long, value_name = "ID")]
    user: Option<String>,
    /// Only samples of this source (e.g. openstack) [default: all].
    #[arg(long, value_name = "NAME")]
    source: Option<String>,
    /// Samples at or after this time: RFC 3339 or relative (-1h, -7d) [default: no bound].
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    since: Option<String>,
    /// Samples before this time: RFC 3339 or relative (-1h, -7d) [default: no bound].
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    until: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Launcher and per-worker status (pid, generation, counters, last error).
    Status {
        /// Output format (table or json; csv is not offered for this nested document).
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Same as --output json.
        #[arg(long, conflicts_with = "output")]
        json: bool,
    },
    /// Counters as one JSON object, summed over workers.
    Stats,
    /// Reload the configuration; waits until the new generation serves.
    Reload,
    /// Stop the daemon gracefully; waits until it has exited.
    Stop,
    /// Set the number of workers until the next reload.
    Workers {
        /// Number of worker processes (at least 1).
        #[arg(value_name = "N")]
        n: usize,
    },
    /// Change the log level at runtime, in the launcher and every worker.
    Loglevel {
        /// New level: error, warn, info, debug or trace (the daemon checks it).
        #[arg(value_name = "LEVEL")]
        level: String,
    },
    /// The effective configuration as TOML, secrets masked.
    Config,
    /// Introspect one worker: connections, pending batch, RSS, fds, counters (JSON).
    Worker {
        /// Worker slot (the ID column of `status`) or pid.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Stored samples, newest first (ceilometer's sample-list); reads the storage directly.
    Samples {
        /// Only this meter, e.g. cpu [default: every meter].
        #[arg(long, value_name = "NAME")]
        meter: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many samples.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Per-period min/max/avg/sum/count of one meter (ceilometer's statistics).
    Statistics {
        /// The meter, e.g. cpu.
        #[arg(long, value_name = "NAME")]
        meter: String,
        /// Period length in seconds [default: one period over the whole range].
        #[arg(long, value_name = "SECONDS")]
        period: Option<u64>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Meters seen, one row per meter and resource (ceilometer's meter-list).
    Meters {
        /// Only this meter [default: every meter].
        #[arg(long, value_name = "NAME")]
        meter: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Resources seen, with their first and last sample (ceilometer's resource-list).
    Resources {
        /// Only resources with samples of this meter [default: any meter].
        #[arg(long, value_name = "NAME")]
        meter: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

enum Failure {
    NotRunning(String),
    Daemon(String),
    Usage(String),
}

impl Failure {
    fn exit(self) -> ExitCode {
        match self {
            Failure::NotRunning(m) => {
                eprintln!("collectorctl: {m}");
                ExitCode::from(EXIT_NOT_RUNNING)
            }
            Failure::Daemon(m) => {
                eprintln!("collectorctl: {m}");
                ExitCode::from(EXIT_ERROR)
            }
            Failure::Usage(m) => {
                eprintln!("collectorctl: {m}");
                ExitCode::from(EXIT_USAGE)
            }
        }
    }
}

fn main() -> ExitCode {
    // Packaging only (scripts/package): kept out of the clap definitions so it shows in no man
    // page or completion.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1] == "generate-docs" {
        return match generate_docs(std::path::Path::new(&args[2])) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => f.exit(),
        };
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

/// The config file collectorctl reads: `--config`, `$COLLECTOR_CONFIG`, the packaged file
/// when it exists, or none (embedded defaults).
fn config_path(cli: &Cli) -> Option<PathBuf> {
    if let Some(p) = &cli.config {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os("COLLECTOR_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let packaged = PathBuf::from(PACKAGED_CONFIG);
    packaged.exists().then_some(packaged)
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    Config::load(config_path(cli).as_deref()).map_err(|e| Failure::Usage(e.to_string()))
}

fn socket_path(cli: &Cli) -> Result<PathBuf, Failure> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    match load_config(cli) {
        Ok(c) => Ok(PathBuf::from(c.service.control_socket)),
        // A config being edited may be broken while the daemon runs on the previous one:
        // still find the socket if the file names it.
        Err(e) => lenient_socket(cli).ok_or(e),
    }
}

fn lenient_socket(cli: &Cli) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config_path(cli)?).ok()?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("control_socket"))?;
    let value = line.split_once('=')?.1.trim();
    let value = value.split('#').next()?.trim().trim_matches('"');
    (!value.is_empty()).then(|| PathBuf::from(value))
}

/// One command line to the control socket, one JSON answer back.
fn ask(cli: &Cli, line: &str) -> Result<Json, Failure> {
    let path = socket_path(cli)?;
    let stream = UnixStream::connect(&path).map_err(|e| {
        Failure::NotRunning(format!(
            "collector is not running (cannot connect to {}: {e})",
            path.display()
        ))
    })?;
    let timeout = Duration::from_secs_f64(cli.timeout.max(0.1));
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut w = &stream;
    // The daemon may answer (e.g. "permission denied") and close before reading our line:
    // a failed write is reported only if no answer follows.
    let written = w.write_all(format!("{line}\n").as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        if let Err(e) = written {
            return Err(Failure::NotRunning(format!(
                "control socket write failed: {e}"
            )));
        }
        if let Err(e) = read {
            return Err(Failure::NotRunning(format!(
                "no answer from the daemon: {e}"
            )));
        }
        return Err(Failure::NotRunning(
            "the daemon closed the control connection without answering".into(),
        ));
    }
    let v: Json = serde_json::from_str(&answer)
        .map_err(|e| Failure::Daemon(format!("unreadable answer from the daemon: {e}")))?;
    if v.get("ok") == Some(&Json::Bool(false)) {
        let msg = v
            .get("error")
            .and_then(Json::as_str)
            .unwrap_or("error")
            .to_string();
        return Err(Failure::Daemon(msg));
    }
    Ok(v)
}

fn print_json(v: &Json) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn run(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Cmd::Status { output, json } => {
            let v = ask(cli, "status")?;
            match (json, output) {
                (true, _) | (_, Output::Json) => print_json(&v),
                (_, Output::Table) => print!("{}", render_status(&v)),
                (_, Output::Csv) => {
                    return Err(Failure::Usage(
                        "status has no csv form; use --output table or json".into(),
                    ))
                }
            }
        }
        Cmd::Stats => {
            let v = ask(cli, "stats")?;
            println!("{}", v.get("stats").unwrap_or(&v));
        }
        Cmd::Reload => {
            let v = ask(cli, "reload")?;
            let gen = v.get("generation").cloned().unwrap_or(Json::Null);
            println!("reloaded: generation {gen} serving");
        }
        Cmd::Stop => {
            let v = ask(cli, "stop")?;
            let pid = v.get("pid").and_then(Json::as_i64).unwrap_or(0);
            let deadline = Instant::now() + Duration::from_secs_f64(cli.timeout.max(0.1));
            while pid > 0 && process_exists(pid as i32) {
                if Instant::now() > deadline {
                    return Err(Failure::Daemon(format!(
                        "collector (pid {pid}) did not exit in time"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("stopped (pid {pid})");
        }
        Cmd::Workers { n } => {
            let v = ask(cli, &format!("workers {n}"))?;
            println!("workers: {}", v.get("workers").unwrap_or(&Json::Null));
        }
        Cmd::Loglevel { level } => {
            let v = ask(cli, &format!("loglevel {level}"))?;
            println!(
                "log level: {}",
                v.get("level").and_then(Json::as_str).unwrap_or(level)
            );
        }
        Cmd::Config => {
            let v = ask(cli, "config")?;
            print!("{}", v.get("config").and_then(Json::as_str).unwrap_or(""));
        }
        Cmd::Worker { id } => print_json(&ask(cli, &format!("worker {id}"))?),
        Cmd::Samples {
            meter,
            filter,
            limit,
            out,
        } => {
            let filter = storage::SampleFilter {
                limit: Some(*limit),
                ..query_filter(meter.as_deref(), filter)?
            };
            let rows = open_storage(cli)?
                .get_samples(&filter)
                .map_err(query_failed)?;
            let table = rows
                .iter()
                .map(|s| {
                    vec![
                        fmt_time(s.timestamp),
                        s.resource_id.clone(),
                        s.counter_name.clone(),
                        s.counter_type.as_str().to_string(),
                        format!("{}", s.counter_volume),
                        s.counter_unit.clone(),
                        opt(&s.project_id),
                        opt(&s.user_id),
                        s.message_id.clone(),
                    ]
                })
                .collect();
            let headers = [
                "TIMESTAMP",
                "RESOURCE",
                "METER",
                "TYPE",
                "VOLUME",
                "UNIT",
                "PROJECT",
                "USER",
                "MESSAGE_ID",
            ];
            print_rows(out.format(), &rows, &headers, table)?;
        }
        Cmd::Statistics {
            meter,
            period,
            filter,
            out,
        } => {
            let filter = query_filter(Some(meter), filter)?;
            let (rows, source) = open_storage(cli)?
                .get_meter_statistics_from(&filter, *period)
                .map_err(query_failed)?;
            // Each row says which data answered: "raw" or "rollup:<granularity>".
            let source = source.to_string();
            let json_rows: Vec<Json> = rows
                .iter()
                .map(|r| {
                    let mut v = serde_json::to_value(r).unwrap_or(Json::Null);
                    if let Json::Object(o) = &mut v {
                        o.insert("source".into(), Json::String(source.clone()));
                    }
                    v
                })
                .collect();
            let table = rows
                .iter()
                .map(|s| {
                    vec![
                        fmt_time(s.period_start),
                        fmt_time(s.period_end),
                        s.count.to_string(),
                        format!("{}", s.min),
                        format!("{}", s.max),
                        format!("{}", s.avg),
                        format!("{}", s.sum),
                        s.unit.clone(),
                        source.clone(),
                    ]
                })
                .collect();
            let headers = [
                "PERIOD_START",
                "PERIOD_END",
                "COUNT",
                "MIN",
                "MAX",
                "AVG",
                "SUM",
                "UNIT",
                "SOURCE",
            ];
            print_rows(out.format(), &json_rows, &headers, table)?;
        }
        Cmd::Meters { meter, filter, out } => {
            let filter = query_filter(meter.as_deref(), filter)?;
            let rows = open_storage(cli)?
                .get_meters(&filter)
                .map_err(query_failed)?;
            let table = rows
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        m.counter_type.as_str().to_string(),
                        m.unit.clone(),
                        m.resource_id.clone(),
                        opt(&m.project_id),
                        opt(&m.user_id),
                        m.source.clone(),
                    ]
                })
                .collect();
            let headers = [
                "METER", "TYPE", "UNIT", "RESOURCE", "PROJECT", "USER", "SOURCE",
            ];
            print_rows(out.format(), &rows, &headers, table)?;
        }
        Cmd::Resources { meter, filter, out } => {
            let filter = query_filter(meter.as_deref(), filter)?;
            let rows = open_storage(cli)?
                .get_resources(&filter)
                .map_err(query_failed)?;
            let table = rows
                .iter()
                .map(|r| {
                    vec![
                        r.resource_id.clone(),
                        opt(&r.project_id),
                        opt(&r.user_id),
                        r.source.clone(),
                        fmt_time(r.first_sample_timestamp),
                        fmt_time(r.last_sample_timestamp),
                    ]
                })
                .collect();
            let headers = [
                "RESOURCE",
                "PROJECT",
                "USER",
                "SOURCE",
                "FIRST_SAMPLE",
                "LAST_SAMPLE",
            ];
            print_rows(out.format(), &rows, &headers, table)?;
        }
    }
    Ok(())
}

fn query_failed(e: storage::StorageError) -> Failure {
    Failure::Daemon(format!("query failed: {e}"))
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

/// Print query results as a table, JSON (the storage rows as they serialize) or CSV.
fn print_rows<T: serde::Serialize>(
    format: Output,
    rows: &[T],
    headers: &[&str],
    table: Vec<Vec<String>>,
) -> Result<(), Failure> {
    match format {
        Output::Table => print!("{}", render_table(headers, &table)),
        Output::Json => print_json(&serde_json::to_value(rows).unwrap_or(Json::Null)),
        Output::Csv => {
            let mut out = std::io::stdout().lock();
            let mut line = |cells: &[String]| {
                let l: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
                writeln!(out, "{}\r", l.join(","))
            };
            let write = line(&headers.iter().map(|h| h.to_lowercase()).collect::<Vec<_>>())
                .and_then(|_| table.iter().try_for_each(|r| line(r)));
            if let Err(e) = write {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(Failure::Daemon(format!("cannot write output: {e}")));
                }
            }
        }
    }
    Ok(())
}

/// One RFC 4180 field: quoted when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Man pages and completions from the clap definitions of both binaries, and collector.toml(5)
/// from the options table. Run by `scripts/package`.
fn generate_docs(out: &std::path::Path) -> Result<(), Failure> {
    use clap::CommandFactory;
    let fail = |what: &str, e: std::io::Error| Failure::Daemon(format!("{what}: {e}"));
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).map_err(|e| fail(&d.display().to_string(), e))?;
    }
    let write = |path: PathBuf, bytes: Vec<u8>| {
        std::fs::write(&path, bytes).map_err(|e| fail(&path.display().to_string(), e))
    };
    let version = env!("CARGO_PKG_VERSION");
    // One page per command and per collectorctl subcommand (the main page refers to them as
    // collectorctl-samples(8) and so on), all in section 8: these are administration tools.
    fn pages(
        cmd: clap::Command,
        version: &str,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub.clone(), version, out)?;
        }
        let man = clap_mangen::Man::new(cmd)
            .section("8")
            .source(format!("collector {version}"))
            .manual("System Administration");
        let mut buf = Vec::new();
        man.render(&mut buf)?;
        out.push((man.get_filename(), buf));
        Ok(())
    }
    for cmd in [collector::cli::Cli::command(), Cli::command()] {
        let name = cmd.get_name().to_string();
        let mut built = cmd.clone().disable_help_subcommand(true);
        built.build();
        let mut out = Vec::new();
        pages(built, version, &mut out).map_err(|e| fail("render man page", e))?;
        for (file, bytes) in out {
            write(man.join(file), bytes)?;
        }
        for (shell, file) in [
            (clap_complete::Shell::Bash, name.clone()),
            (clap_complete::Shell::Zsh, format!("_{name}")),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
            write(comp.join(file), buf)?;
        }
    }
    write(
        man.join("collector.toml.5"),
        docs::config_man_page().into_bytes(),
    )?;
    Ok(())
}

fn open_storage(cli: &Cli) -> Result<Box<dyn storage::Storage>, Failure> {
    let cfg = load_config(cli)?;
    let opts = cfg.database.storage_options();
    storage::open(&cfg.database.connection, &opts).map_err(|e| {
        Failure::Daemon(format!(
            "cannot open storage {}: {e}",
            collector::config::mask_url_password(&cfg.database.connection)
        ))
    })
}

/// The storage filter of a query's options.
fn query_filter(meter: Option<&str>, f: &FilterArgs) -> Result<storage::SampleFilter, Failure> {
    let now = time::OffsetDateTime::now_utc();
    Ok(storage::SampleFilter {
        meter: meter.map(str::to_string),
        resource_id: f.resource.clone(),
        project_id: f.project.clone(),
        user_id: f.user.clone(),
        source: f.source.clone(),
        start: f.since.as_deref().map(|t| parse_time(t, now)).transpose()?,
        end: f.until.as_deref().map(|t| parse_time(t, now)).transpose()?,
        ..Default::default()
    })
}

/// RFC 3339 / ISO 8601 (naive is UTC), or relative to `now`: `-90s`, `-30m`, `-1h`, `-7d`,
/// `-2w`.
fn parse_time(s: &str, now: time::OffsetDateTime) -> Result<time::OffsetDateTime, Failure> {
    let t = s.trim();
    if let Some(rel) = t.strip_prefix('-') {
        let bad = || {
            Failure::Usage(format!(
                "bad relative time {s:?}: expected -N followed by s, m, h, d or w (e.g. -1h, -7d)"
            ))
        };
        let unit = rel.chars().last().ok_or_else(bad)?;
        let n: i64 = rel[..rel.len() - unit.len_utf8()]
            .parse()
            .map_err(|_| bad())?;
        let secs = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return Err(bad()),
        };
        let d = n
            .checked_mul(secs)
            .map(time::Duration::seconds)
            .ok_or_else(bad)?;
        return now.checked_sub(d).ok_or_else(bad);
    }
    meter::parse_timestamp(t).map_err(|e| {
        Failure::Usage(format!(
            "{e} (times are RFC 3339, e.g. 2026-11-01T12:00:00Z, or relative: -1h, -7d)"
        ))
    })
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// True while `pid` runs. A zombie (exited, not yet reaped by its parent) counts as gone.
fn process_exists(pid: i32) -> bool {
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        return !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    }
    // No procfs: kill with signal 0 only checks for existence and permission.
    // SAFETY: signal 0 sends nothing.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn render_status(v: &Json) -> String {
    let g = |o: &Json, k: &str| o.get(k).cloned().unwrap_or(Json::Null);
    let num = |o: &Json, k: &str| o.get(k).and_then(Json::as_u64).unwrap_or(0);
    let mut out = format!(
        "collector pid {}  uptime {}  config {}  generation {}  workers {}\n",
        g(v, "pid"),
        fmt_secs(v.get("uptime_s").and_then(Json::as_f64).unwrap_or(0.0)),
        v.get("config_file")
            .and_then(Json::as_str)
            .unwrap_or("(embedded defaults)"),
        g(v, "generation"),
        g(v, "workers_wanted"),
    );
    let empty = Vec::new();
    let workers = v.get("workers").and_then(Json::as_array).unwrap_or(&empty);
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let c = w.get("counters").cloned().unwrap_or(Json::Null);
            let rates = w.get("rates").cloned().unwrap_or(Json::Null);
            vec![
                g(w, "index").to_string(),
                g(w, "pid").to_string(),
                g(w, "generation").to_string(),
                w.get("state")
                    .and_then(Json::as_str)
                    .unwrap_or("?")
                    .to_string(),
                fmt_secs(w.get("uptime_s").and_then(Json::as_f64).unwrap_or(0.0)),
                num(&c, "samples_received").to_string(),
                num(&c, "samples_stored").to_string(),
                num(&c, "samples_rejected").to_string(),
                format!(
                    "{:.1}",
                    rates
                        .get("received_per_s")
                        .and_then(Json::as_f64)
                        .unwrap_or(0.0)
                ),
                format!(
                    "{:.1}",
                    rates
                        .get("stored_per_s")
                        .and_then(Json::as_f64)
                        .unwrap_or(0.0)
                ),
                num(w, "connections").to_string(),
                amqp_state(w.get("amqp")),
                w.get("last_error")
                    .and_then(Json::as_str)
                    .or_else(|| {
                        w.get("amqp")
                            .and_then(|a| a.get("last_error"))
                            .and_then(Json::as_str)
                    })
                    .unwrap_or("-")
                    .to_string(),
            ]
        })
        .collect();
    out.push_str(&render_table(
        &[
            "ID",
            "PID",
            "GEN",
            "STATE",
            "UPTIME",
            "RECEIVED",
            "STORED",
            "REJECTED",
            "RECV/S",
            "STORED/S",
            "CONNS",
            "AMQP",
            "LAST_ERROR",
        ],
        &rows,
    ));
    out
}

/// A worker's AMQP consumer in one word: `-` (not configured), `consuming`, `connected`
/// (not consuming: stopping) or `down` (reconnecting; the error is in LAST_ERROR).
fn amqp_state(a: Option<&Json>) -> String {
    match a {
        None | Some(Json::Null) => "-".into(),
        Some(a) if a.get("consuming") == Some(&Json::Bool(true)) => "consuming".into(),
        Some(a) if a.get("connected") == Some(&Json::Bool(true)) => "connected".into(),
        Some(_) => "down".into(),
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 86400 {
        format!("{}d{:02}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option and argument of every command has a one-line help, and every option that
    /// takes a value says its default (clap's `[default: …]` or the help's own).
    #[test]
    fn every_option_of_every_command_explains_itself() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut cmds = vec![cmd.clone()];
        cmds.extend(cmd.get_subcommands().cloned());
        for c in cmds {
            for a in c.get_arguments() {
                let id = format!("{} {}", c.get_name(), a.get_id());
                if matches!(a.get_id().as_str(), "help" | "version") {
                    continue;
                }
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(!help.is_empty(), "{id}: no help");
                assert!(!help.contains('\n'), "{id}: help is one line");
                let takes_value = a.get_num_args().is_some_and(|n| n.takes_values());
                let documented = help.contains("[default:")
                    || !a.get_default_values().is_empty()
                    || a.is_required_set()
                    || a.is_positional();
                assert!(!takes_value || documented, "{id}: no documented default");
            }
        }
    }

    #[test]
    fn relative_and_absolute_times() {
        let now = time::macros::datetime!(2026-11-30 12:00 UTC);
        let t = |s: &str| parse_time(s, now).ok();
        assert_eq!(
            t("-1h"),
            Some(time::macros::datetime!(2026-11-30 11:00 UTC))
        );
        assert_eq!(
            t("-7d"),
            Some(time::macros::datetime!(2026-11-23 12:00 UTC))
        );
        assert_eq!(
            t("-90s"),
            Some(time::macros::datetime!(2026-11-30 11:58:30 UTC))
        );
        assert_eq!(
            t("-2w"),
            Some(time::macros::datetime!(2026-11-16 12:00 UTC))
        );
        assert_eq!(
            t("2026-11-01T12:00:00+02:00"),
            Some(time::macros::datetime!(2026-11-01 10:00 UTC))
        );
        for bad in [
            "-",
            "-h",
            "-1y",
            "-1.5h",
            "-99999999999999999d",
            "-1hh",
            "yesterday",
            "-ü",
        ] {
            assert!(t(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
