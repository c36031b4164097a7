//! Logging: env_logger to stderr or to `log_file`, reopenable (USR1, logrotate), with a level
//! that can change at runtime (`collectorctl loglevel`). `RUST_LOG` overrides the configured
//! level.
//!
//! Two line formats (`[service] log_format`): `text` (the default, for people) and `json`,
//! one object per line for journald / Loki / Elasticsearch shippers: `time` (RFC 3339 UTC),
//! `level`, `pid`, `worker` (slot index; absent in the launcher), `target`, `message`, and the
//! record's structured fields (`log::warn!(message_id = id, source = "udp"; "...")`) as
//! top-level keys. Log text often carries values a peer sent (message ids, meter names,
//! error text): call sites wrap them in [`crate::untrusted::Untrusted`]; on top of that, in
//! JSON every value is escaped by the encoder, and in text every remaining control character
//! of a line is escaped, so no peer can forge or split a line in either format.
//!
//! The file handle lives in one process-wide slot because the `log` facade itself is global;
//! each process (launcher, worker) initialises its own after fork.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// `log_format = "json"`.
static JSON: AtomicBool = AtomicBool::new(false);
/// This process's worker slot; `usize::MAX` in the launcher.
static WORKER: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Choose the line format (`text` or `json`); unknown names mean text.
pub fn set_format(format: &str) {
    JSON.store(format.eq_ignore_ascii_case("json"), Ordering::Relaxed);
}

/// Called in a worker after fork: its lines carry `worker` = its slot.
pub fn set_worker(index: usize) {
    WORKER.store(index, Ordering::Relaxed);
}

struct Sink {
    path: Option<PathBuf>,
    file: Option<File>,
}

static SINK: Mutex<Sink> = Mutex::new(Sink {
    path: None,
    file: None,
});

struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = SINK.lock().unwrap_or_else(|e| e.into_inner());
        match s.file.as_mut() {
            Some(f) => f.write(buf),
            None => io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut s = SINK.lock().unwrap_or_else(|e| e.into_inner());
        match s.file.as_mut() {
            Some(f) => f.flush(),
            None => io::stderr().flush(),
        }
    }
}

fn open_log(path: &PathBuf) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    OpenOptions::new().create(true).append(true).open(path)
}

pub fn parse_level(level: &str) -> Option<log::LevelFilter> {
    match level.to_ascii_lowercase().as_str() {
        "error" => Some(log::LevelFilter::Error),
        "warn" | "warning" => Some(log::LevelFilter::Warn),
        "info" => Some(log::LevelFilter::Info),
        "debug" => Some(log::LevelFilter::Debug),
        "trace" => Some(log::LevelFilter::Trace),
        "off" => Some(log::LevelFilter::Off),
        _ => None,
    }
}

/// Install the logger (the launcher does, before any fork; workers inherit it). Every line
/// carries the writing process's pid, so launcher and worker lines tell apart; `format` is
/// `text` or `json`. `verbosity`
/// (`-v`, `-vv`) raises the configured level; `RUST_LOG`, when set, wins over both.
pub fn init(level: &str, log_file: Option<&str>, verbosity: u8, format: &str) -> io::Result<()> {
    set_format(format);
    let path = log_file.filter(|p| !p.is_empty()).map(PathBuf::from);
    let file = path.as_ref().map(open_log).transpose()?;
    {
        let mut s = SINK.lock().unwrap_or_else(|e| e.into_inner());
        s.path = path;
        s.file = file;
    }
    let mut builder = env_logger::Builder::new();
    let configured = match verbosity {
        0 => parse_level(level).unwrap_or(log::LevelFilter::Info),
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    match &from_env {
        Some(spec) => {
            builder.parse_filters(spec);
        }
        None => {
            // env_logger filters at trace; the `log` max level does the real filtering so
            // `set_level` can raise or lower it at runtime.
            builder.filter_level(log::LevelFilter::Trace);
        }
    }
    builder.format(|buf, record| {
        let line = if JSON.load(Ordering::Relaxed) {
            json_line(record)
        } else {
            text_line(record)
        };
        buf.write_all(line.as_bytes())
    });
    builder.target(env_logger::Target::Pipe(Box::new(SinkWriter)));
    let logger = builder.build();
    let max = if from_env.is_some() {
        logger.filter()
    } else {
        configured
    };
    // A second init in the same process (a worker after fork) keeps the installed logger.
    let _ = log::set_boxed_logger(Box::new(logger));
    log::set_max_level(max);
    Ok(())
}

fn timestamp() -> String {
    let ts = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        ts.year(),
        ts.month() as u8,
        ts.day(),
        ts.hour(),
        ts.minute(),
        ts.second(),
        ts.millisecond()
    )
}

/// Collects a record's structured fields.
struct Fields(Vec<(String, serde_json::Value)>);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let v = if let Some(n) = value.to_u64() {
            serde_json::Value::from(n)
        } else if let Some(n) = value.to_i64() {
            serde_json::Value::from(n)
        } else if let Some(b) = value.to_bool() {
            serde_json::Value::from(b)
        } else if let Some(f) = value.to_f64() {
            serde_json::Value::from(f)
        } else {
            serde_json::Value::from(value.to_string())
        };
        self.0.push((key.as_str().to_string(), v));
        Ok(())
    }
}

fn fields(record: &log::Record<'_>) -> Vec<(String, serde_json::Value)> {
    let mut f = Fields(Vec::new());
    let _ = record.key_values().visit(&mut f);
    f.0
}

/// Names the line's own keys take; a structured field of the same name is prefixed.
const RESERVED: [&str; 6] = ["time", "level", "pid", "worker", "target", "message"];

/// One JSON object (and a newline). serde_json escapes every string.
pub fn json_line(record: &log::Record<'_>) -> String {
    let mut m = serde_json::Map::new();
    m.insert("time".into(), timestamp().into());
    m.insert(
        "level".into(),
        record.level().as_str().to_ascii_lowercase().into(),
    );
    m.insert("pid".into(), std::process::id().into());
    let w = WORKER.load(Ordering::Relaxed);
    if w != usize::MAX {
        m.insert("worker".into(), w.into());
    }
    m.insert("target".into(), record.target().into());
    m.insert("message".into(), record.args().to_string().into());
    for (k, v) in fields(record) {
        let k = if RESERVED.contains(&k.as_str()) {
            format!("field_{k}")
        } else {
            k
        };
        m.insert(k, v);
    }
    let mut line = serde_json::Value::Object(m).to_string();
    line.push('\n');
    line
}

/// One text line: `TIME LEVEL collector[PID] message key=value...`, control characters
/// escaped (`\n`, `\u{1b}`) so a value from the network cannot start a forged line.
pub fn text_line(record: &log::Record<'_>) -> String {
    let mut line = format!(
        "{} {:5} collector[{}] ",
        timestamp(),
        record.level(),
        std::process::id()
    );
    escape_into(&mut line, &record.args().to_string());
    for (k, v) in fields(record) {
        line.push(' ');
        escape_into(&mut line, &k);
        line.push('=');
        match v {
            serde_json::Value::String(s) => {
                if s.is_empty() || s.contains([' ', '"', '=']) {
                    line.push_str(&serde_json::Value::String(s).to_string());
                } else {
                    line.push_str(&crate::untrusted::Untrusted(&s).to_string());
                }
            }
            other => line.push_str(&other.to_string()),
        }
    }
    line.push('\n');
    line
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
}

/// Change the level at runtime; returns false for an unknown level name.
pub fn set_level(level: &str) -> bool {
    match parse_level(level) {
        Some(l) => {
            log::set_max_level(l);
            log::info!("log level set to {l}");
            true
        }
        None => {
            log::warn!("ignoring unknown log level {level:?}");
            false
        }
    }
}

/// Reopen the log file (after logrotate moved it away).
pub fn reopen() {
    let mut s = SINK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(path) = s.path.clone() else {
        return;
    };
    match open_log(&path) {
        Ok(f) => s.file = Some(f),
        Err(e) => {
            drop(s);
            log::error!("cannot reopen log file {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_line(json: bool, msg: &str) -> String {
        let fields: [(&str, log::kv::Value<'_>); 3] = [
            ("message_id", log::kv::Value::from("id\n\"x\"")),
            ("source", log::kv::Value::from("udp")),
            ("stored", log::kv::Value::from(3u64)),
        ];
        let args = format_args!("{msg}");
        let r = log::Record::builder()
            .level(log::Level::Warn)
            .target("collector::worker")
            .args(args)
            .key_values(&fields)
            .build();
        if json {
            json_line(&r)
        } else {
            text_line(&r)
        }
    }

    #[test]
    fn json_lines_are_one_object_with_fields_and_escapes() {
        let line = record_line(
            true,
            "bad sample from peer\n{\"level\":\"error\"}\u{1b}[31m",
        );
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["target"], "collector::worker");
        assert_eq!(v["pid"], std::process::id());
        assert_eq!(v["message_id"], "id\n\"x\"");
        assert_eq!(v["source"], "udp");
        assert_eq!(v["stored"], 3);
        assert!(v["message"].as_str().unwrap().ends_with("\u{1b}[31m"));
        let t = v["time"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok(),
            "{t}"
        );
        assert!(t.ends_with('Z'));
    }

    #[test]
    fn text_lines_escape_control_characters() {
        let line = record_line(false, "bad sample\nFAKE ERROR line\u{1b}[31m");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(
            line.contains("bad sample\\nFAKE ERROR line\\u{1b}[31m"),
            "{line}"
        );
        assert!(line.contains(" source=udp stored=3"), "{line}");
        // A value with quotes or spaces is quoted, JSON-style.
        assert!(line.contains(r#" message_id="id\n\"x\"""#), "{line}");
    }
}
