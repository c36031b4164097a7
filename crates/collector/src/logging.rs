//! Logging: env_logger to stderr or to `log_file`, reopenable (USR1, logrotate), with a level
//! that can change at runtime (`collectorctl loglevel`). `RUST_LOG` overrides the configured
//! level.
//!
//! The file handle lives in one process-wide slot because the `log` facade itself is global;
//! each process (launcher, worker) initialises its own after fork.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;

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
/// carries the writing process's pid, so launcher and worker lines tell apart. `verbosity`
/// (`-v`, `-vv`) raises the configured level; `RUST_LOG`, when set, wins over both.
pub fn init(level: &str, log_file: Option<&str>, verbosity: u8) -> io::Result<()> {
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
        let ts = time::OffsetDateTime::now_utc();
        writeln!(
            buf,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z {:5} collector[{}] {}",
            ts.year(),
            ts.month() as u8,
            ts.day(),
            ts.hour(),
            ts.minute(),
            ts.second(),
            ts.millisecond(),
            record.level(),
            std::process::id(),
            record.args()
        )
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
