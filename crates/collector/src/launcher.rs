//! The launcher: binds the sockets, then runs the workers.

use crate::config::Config;
use crate::sockets::{Addresses, Listeners};
use crate::worker::Worker;
use std::path::PathBuf;

/// Command-line values that win over the config file, also after a reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub workers: Option<usize>,
    pub pidfile: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config_path: Option<PathBuf>,
    pub daemon: bool,
    pub verbosity: u8,
    pub overrides: Overrides,
}

pub fn run(cfg: Config, opts: Options) -> u8 {
    let log_file = (!cfg.service.log_file.is_empty()).then_some(cfg.service.log_file.as_str());
    if let Err(e) = crate::logging::init(&cfg.service.log_level, log_file, opts.verbosity) {
        eprintln!("collector: cannot open log file: {e}");
        return crate::EXIT_CONFIG;
    }
    raise_fd_limit();
    let addrs = Addresses::of(&cfg);
    let listeners = match Listeners::bind(&addrs, None) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{e}");
            return crate::EXIT_BOOT_ERROR;
        }
    };
    log::info!("listening: {}", listeners.describe().join(", "));
    let worker = match Worker::new(cfg, listeners, None, 0) {
        Ok(w) => w,
        Err(e) => {
            log::error!("{e}");
            return crate::EXIT_BOOT_ERROR;
        }
    };
    worker.run() as u8
}

/// Raise the soft open-file limit to the hard one: every worker may hold `max_connections`
/// sockets, and the default soft limit (often 1024) would make accept fail first.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
    }
}
