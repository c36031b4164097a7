//! What a caller tunes and what it gets back: [`Settings`], stop modes, the exit reason.

use std::time::Duration;

use nix::sys::signal::Signal;

/// Exit code a worker returns when it cannot start at all (bad configuration, unusable
/// storage, permission denied). The launcher then stops everything and
/// [`crate::Supervisor::run`] returns [`crate::Error::BootError`] instead of respawning the
/// worker in a loop (gunicorn's rule). During a reload, the new generation is abandoned
/// instead and the serving one kept.
pub const BOOT_ERROR: i32 = 3;

/// Timeouts and sizes of a [`crate::Supervisor`]. `Default` gives the daemon's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Number of workers per generation (at least 1). TTIN/TTOU and
    /// [`crate::SupervisorHandle::set_workers`] change it at run time.
    pub workers: usize,
    /// A ready worker that sends nothing for this long is terminated and respawned.
    pub worker_timeout: Duration,
    /// A worker that has not sent `Ready` this long after its start is terminated; a reload
    /// whose new generation is not all ready within it is abandoned.
    pub boot_timeout: Duration,
    /// How long a graceful stop (or a retired generation) may take before SIGKILL.
    pub graceful_shutdown_timeout: Duration,
    /// Between SIGTERM and SIGKILL for a worker being terminated (hung, or fast stop).
    pub kill_grace: Duration,
    /// A worker dying sooner than this after its start counts as a crash at start-up:
    /// repeated ones are respawned with exponential backoff.
    pub fast_crash_window: Duration,
    /// Cap of that backoff.
    pub max_backoff: Duration,
    /// Exit code meaning "cannot boot" (see [`BOOT_ERROR`]).
    pub boot_error_code: i32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            worker_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(60),
            graceful_shutdown_timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(5),
            fast_crash_window: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            boot_error_code: BOOT_ERROR,
        }
    }
}

/// How the launcher stops, from gentlest to hardest. A stop only ever escalates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopMode {
    /// Send [`crate::Command::Stop`] to every worker and wait up to `graceful_shutdown_timeout`,
    /// then SIGKILL the rest. SIGTERM, SIGINT, [`crate::SupervisorHandle::request_stop`].
    Graceful,
    /// SIGTERM every worker, SIGKILL after `kill_grace`. A second SIGTERM/SIGINT.
    Fast,
    /// SIGKILL every worker now. SIGQUIT.
    Immediate,
}

/// How [`crate::Supervisor::run`] ended (a boot error is an [`crate::Error`] instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReason {
    /// The hardest stop mode reached.
    pub mode: StopMode,
    /// The signal that asked for the stop; `None` for [`crate::SupervisorHandle::request_stop`].
    pub signal: Option<Signal>,
    /// Workers SIGKILLed during the stop (all of them for [`StopMode::Immediate`]; for the
    /// other modes, those that outlived the stop's deadline).
    pub killed: usize,
    /// Workers that could not even be reaped after SIGKILL (stuck in the kernel).
    pub unreaped: usize,
}
