//! The `collector` command line (DESIGN §2). It lives in the library so the man page and shell
//! completions are generated from this very definition (`collectorctl`'s hidden
//! `generate-docs`, run by `scripts/package`).

use clap::{ArgAction, Parser};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "collector",
    version,
    about = "Collects ceilometer metering samples (UDP, TCP, MessagePack-RPC) and stores them",
    long_about = "Collects ceilometer metering samples sent over UDP, ceilometer's tcp:// framing, \
MessagePack-RPC and RabbitMQ (oslo.messaging notifications), verifies their signatures and stores \
them (SQLite by default). Without --config it runs on embedded defaults: SQLite at \
./data/collector.db, loopback ports 4952 (UDP, TCP) and 4953 (RPC), control socket \
./data/collector.sock. Options are described in collector.toml(5); collectorctl(8) steers a \
running daemon.",
    after_help = "Signals: TERM/INT graceful stop, HUP reload, USR1 reopen logs, TTIN/TTOU one \
worker more/fewer, QUIT immediate stop.\nExit status: 0 ok, 1 runtime failure, 2 bad \
configuration or usage, 3 a worker could not start."
)]
pub struct Cli {
    /// Configuration file (TOML) [default: embedded defaults, see collector.toml(5)].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Detach from the terminal: double fork, pidfile, log file [default: foreground].
    #[arg(long)]
    pub daemon: bool,
    /// Write the launcher's pid here [default: [service] pidfile].
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Number of worker processes [default: [service] workers, 0 = one per CPU].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Log to this file [default: [service] log_file, "" = stderr].
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Validate the configuration, print it (secrets masked) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Translate a ceilometer.conf into an equivalent collector.toml on stdout, then exit.
    #[arg(
        long,
        value_name = "CEILOMETER_CONF",
        conflicts_with_all = ["check_config", "daemon"]
    )]
    pub import_ceilometer_conf: Option<PathBuf>,
    /// More logging: -v debug, -vv trace [default: [service] log_level].
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent_and_every_option_has_help() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        for a in cmd.get_arguments() {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(!help.is_empty(), "--{} has no help", a.get_id());
            assert!(!help.contains('\n'), "--{}: one line", a.get_id());
        }
    }
}
