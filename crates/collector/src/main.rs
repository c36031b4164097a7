//! `collector`: the metering-sample collector daemon (DESIGN §2).

use clap::Parser;
use collector::config::Config;

/// The loop thread allocates samples and the writer thread frees them; mimalloc's per-thread
/// free lists handle that pattern without glibc's arena consolidation. It is safe across our
/// fork: the launcher forks with one thread, so no allocator lock can be held by another.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "collector",
    version,
    about = "Collects ceilometer metering samples (UDP, TCP, MessagePack-RPC) and stores them",
    long_about = "Collects ceilometer metering samples sent over UDP, ceilometer's tcp:// framing and \
MessagePack-RPC, verifies their signatures and stores them (SQLite by default). Without --config it \
runs on embedded defaults: SQLite at ./data/collector.db, loopback ports 4952 (UDP, TCP) and 4953 (RPC)."
)]
struct Cli {
    /// Configuration file (TOML); embedded defaults when absent.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Detach from the terminal and run in the background.
    #[arg(long)]
    daemon: bool,
    /// Write the launcher's pid here (overrides [service] pidfile).
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Number of worker processes (overrides [service] workers).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Log to this file (overrides [service] log_file).
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Validate the configuration, print it (secrets masked) and exit.
    #[arg(long)]
    check_config: bool,
    /// More logging: -v debug, -vv trace.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("collector: {e}");
            return ExitCode::from(collector::EXIT_CONFIG);
        }
    };
    if let Some(n) = cli.workers {
        cfg.service.workers = n;
    }
    if let Some(p) = &cli.pidfile {
        cfg.service.pidfile = p.display().to_string();
    }
    if let Some(p) = &cli.log_file {
        cfg.service.log_file = p.display().to_string();
    }
    if cli.check_config {
        if let Err(e) = storage::check_url(&cfg.database.connection) {
            eprintln!("collector: [database] connection: {e}");
            return ExitCode::from(collector::EXIT_CONFIG);
        }
        print!("{}", cfg.to_masked_toml());
        eprintln!("collector: configuration OK");
        return ExitCode::SUCCESS;
    }
    let opts = collector::launcher::Options {
        config_path: cli.config.clone(),
        daemon: cli.daemon,
        verbosity: cli.verbose,
        overrides: collector::launcher::Overrides {
            workers: cli.workers,
            pidfile: cli.pidfile.clone(),
            log_file: cli.log_file.clone(),
        },
    };
    ExitCode::from(collector::launcher::run(cfg, opts))
}
