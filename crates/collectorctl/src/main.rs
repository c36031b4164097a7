//! `collectorctl`: talk to a running collector through its control socket, and query the
//! samples it stored (DESIGN §2).
//!
//! Exit status: 0 ok; 1 the daemon answered with an error; 2 usage; 3 not running.

use clap::{Parser, Subcommand};
use collector::config::Config;
use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NOT_RUNNING: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "collectorctl",
    version,
    about = "Control and inspect a running collector"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Read the control socket path (and the storage URL for queries) from this config.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Seconds to wait for the daemon's answer.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Launcher and per-worker status as a table.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Counters as one JSON object.
    Stats,
    /// Reload the configuration; waits until the new generation serves.
    Reload,
    /// Stop the daemon gracefully; waits until it has exited.
    Stop,
    /// Set the number of workers.
    Workers { n: usize },
    /// Change the log level at runtime.
    Loglevel { level: String },
    /// The effective configuration, secrets masked.
    Config,
    /// Introspect one worker (by index in `status`, or pid).
    Worker { id: String },
    /// Query stored samples (reads the configured storage directly).
    Samples {
        #[arg(long)]
        meter: String,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Per-period min/max/avg/sum/count of a meter.
    Statistics {
        #[arg(long)]
        meter: String,
        #[arg(long)]
        period: Option<u64>,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        json: bool,
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

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    Config::load(cli.config.as_deref()).map_err(|e| Failure::Usage(e.to_string()))
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
    let text = std::fs::read_to_string(cli.config.as_ref()?).ok()?;
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
        Cmd::Status { json } => {
            let v = ask(cli, "status")?;
            if *json {
                print_json(&v);
            } else {
                print!("{}", render_status(&v));
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
            resource,
            since,
            until,
            limit,
            json,
        } => {
            let filter = storage::SampleFilter {
                limit: Some(*limit),
                ..query_filter(meter, resource, since, until)?
            };
            let mut st = open_storage(cli)?;
            let rows = st
                .get_samples(&filter)
                .map_err(|e| Failure::Daemon(format!("query failed: {e}")))?;
            if *json {
                print_json(&serde_json::to_value(&rows).unwrap_or(Json::Null));
            } else {
                let table: Vec<Vec<String>> = rows
                    .iter()
                    .map(|s| {
                        vec![
                            fmt_time(s.timestamp),
                            s.resource_id.clone(),
                            s.counter_name.clone(),
                            s.counter_type.as_str().to_string(),
                            format!("{}", s.counter_volume),
                            s.counter_unit.clone(),
                            s.message_id.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render_table(
                        &[
                            "TIMESTAMP",
                            "RESOURCE",
                            "METER",
                            "TYPE",
                            "VOLUME",
                            "UNIT",
                            "MESSAGE_ID"
                        ],
                        &table
                    )
                );
            }
        }
        Cmd::Statistics {
            meter,
            period,
            resource,
            since,
            until,
            json,
        } => {
            let filter = query_filter(meter, resource, since, until)?;
            let mut st = open_storage(cli)?;
            let (rows, source) = st
                .get_meter_statistics_from(&filter, *period)
                .map_err(|e| Failure::Daemon(format!("query failed: {e}")))?;
            if *json {
                // Each row says which data answered: "raw" or "rollup:<granularity>".
                let mut v = serde_json::to_value(&rows).unwrap_or(Json::Null);
                if let Json::Array(items) = &mut v {
                    for item in items {
                        if let Json::Object(o) = item {
                            o.insert("source".into(), Json::String(source.to_string()));
                        }
                    }
                }
                print_json(&v);
            } else {
                let table: Vec<Vec<String>> = rows
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
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render_table(
                        &[
                            "PERIOD_START",
                            "PERIOD_END",
                            "COUNT",
                            "MIN",
                            "MAX",
                            "AVG",
                            "SUM",
                            "UNIT"
                        ],
                        &table
                    )
                );
            }
        }
    }
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

/// The filter both storage queries take from their common options.
fn query_filter(
    meter: &str,
    resource: &Option<String>,
    since: &Option<String>,
    until: &Option<String>,
) -> Result<storage::SampleFilter, Failure> {
    Ok(storage::SampleFilter {
        meter: Some(meter.to_string()),
        resource_id: resource.clone(),
        start: since.as_deref().map(parse_time).transpose()?,
        end: until.as_deref().map(parse_time).transpose()?,
        ..Default::default()
    })
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime, Failure> {
    meter::parse_timestamp(s).map_err(|e| Failure::Usage(e.to_string()))
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
