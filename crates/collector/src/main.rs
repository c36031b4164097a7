//! `collector`: the metering-sample collector daemon (DESIGN §2).

use clap::Parser;
use collector::cli::Cli;
use collector::config::Config;

/// The loop thread allocates samples and the writer thread frees them; mimalloc's per-thread
/// free lists handle that pattern without glibc's arena consolidation. It is safe across our
/// fork: the launcher forks with one thread, so no allocator lock can be held by another.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

/// Allocator options must be set before the first allocation, which the runtime makes before
/// `main`: a constructor with a priority runs before the unprioritized ones (mimalloc's among
/// them) and before the runtime's start-up. See `collector::memory::configure_allocator`.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00200"]
static CONFIGURE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn configure() {
        collector::memory::configure_allocator();
    }
    configure
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.import_ceilometer_conf {
        return import_ceilometer_conf(path);
    }
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

/// `--import-ceilometer-conf`: the translation on stdout, or every problem on stderr.
fn import_ceilometer_conf(path: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("collector: cannot read {}: {e}", path.display());
            return ExitCode::from(collector::EXIT_CONFIG);
        }
    };
    match collector::import::import(&text, &path.display().to_string()) {
        Ok(toml) => {
            print!("{toml}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("collector: {}: {e}", path.display());
            }
            ExitCode::from(collector::EXIT_CONFIG)
        }
    }
}
