//! The caller's side of the loop: [`Hooks`], the [`SupervisorEvent`]s they receive, and the
//! [`WorkerInfo`] snapshots they can ask for.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use mio::Token;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::fork::Worker;
use crate::settings::StopMode;
use crate::supervisor::SupervisorHandle;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

impl fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerExit::Code(c) => write!(f, "exit code {c}"),
            WorkerExit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Started, has not sent `Ready` yet (no heartbeat timeout, a boot timeout instead).
    Booting,
    /// Serving; must heartbeat within `worker_timeout`.
    Ready,
    /// Asked to stop (retired generation, fewer workers, shutdown) or being terminated.
    Stopping,
}

/// A snapshot of one worker, from [`SupervisorHandle::workers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Process id.
    pub pid: Pid,
    /// Index in its generation.
    pub slot: usize,
    /// Generation it belongs to.
    pub generation: u64,
    /// Booting, ready or stopping.
    pub state: WorkerState,
    /// When it was forked (wall clock).
    pub started_at: SystemTime,
    /// Time since it was forked.
    pub uptime: Duration,
    /// Time since its last message (ready, heartbeat or reply); `None` before the first.
    pub since_heartbeat: Option<Duration>,
    /// Heartbeats received from it.
    pub heartbeats: u64,
    /// Payload of its latest heartbeat (the worker's counters).
    pub last_heartbeat: Option<Vec<u8>>,
}

/// Something that happened in the launcher, handed to [`Hooks::on_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SupervisorEvent {
    /// A worker process was forked.
    WorkerStarted {
        pid: Pid,
        slot: usize,
        generation: u64,
    },
    /// A worker sent `Ready`.
    WorkerReady {
        pid: Pid,
        slot: usize,
        generation: u64,
    },
    /// A worker process was reaped. `expected` is false for a crash, a kill after a timeout,
    /// or a worker that returned on its own.
    WorkerExited {
        pid: Pid,
        slot: usize,
        generation: u64,
        status: WorkerExit,
        expected: bool,
    },
    /// Every worker of `generation` is ready. For the first generation this is the moment to
    /// tell systemd `READY=1`; after a reload, `previous` names the generation now being
    /// retired.
    GenerationReady {
        generation: u64,
        previous: Option<u64>,
    },
    /// A reload started booting `generation`.
    ReloadStarted { generation: u64 },
    /// A reload was abandoned and the serving generation kept: the reload hook refused
    /// (`generation` is `None`) or the new generation failed to boot.
    ReloadFailed {
        generation: Option<u64>,
        reason: String,
    },
    /// The launcher started stopping (or escalated to a harder mode).
    Stopping { mode: StopMode },
    /// A worker answered a [`crate::Command::Custom`].
    Reply {
        pid: Pid,
        slot: usize,
        generation: u64,
        payload: Vec<u8>,
    },
}

/// The caller's side of the event loop. Every method has a default, so a caller implements
/// only what it uses.
pub trait Hooks {
    /// SIGHUP or [`SupervisorHandle::request_reload`]: re-read the configuration and return
    /// the worker for a new generation, or an error (logged, and the serving generation is
    /// kept). May call [`SupervisorHandle::set_workers`] / [`SupervisorHandle::set_settings`]
    /// for the new configuration's values.
    fn reload(&mut self, sup: &mut SupervisorHandle<'_>) -> Result<Box<dyn Worker>, String> {
        let _ = sup;
        Err("reload is not supported".to_string())
    }

    /// The number of workers per generation goes from `old` to `new` (TTIN/TTOU,
    /// [`SupervisorHandle::set_workers`], or settings a reload set). Called in the launcher
    /// before any worker for a new slot is forked and before a surplus slot's worker is
    /// retired, so per-slot resources (one listening socket per worker, say) can be bound
    /// first and are inherited by the slot's worker. Slots are `0..new` in every generation.
    fn workers_changed(&mut self, sup: &mut SupervisorHandle<'_>, old: usize, new: usize) {
        let _ = (sup, old, new);
    }

    /// SIGUSR1: reopen the launcher's log files. Workers get [`crate::Command::ReopenLogs`] next.
    fn reopen_logs(&mut self) {}

    /// A source registered with [`SupervisorHandle::register_extra`] is ready.
    fn on_extra_ready(
        &mut self,
        sup: &mut SupervisorHandle<'_>,
        token: Token,
        event: &mio::event::Event,
    ) {
        let _ = (sup, token, event);
    }

    /// Something happened to the workers (see [`SupervisorEvent`]).
    fn on_event(&mut self, sup: &mut SupervisorHandle<'_>, event: SupervisorEvent) {
        let _ = (sup, event);
    }

    /// The next time [`on_tick`](Self::on_tick) must run at the latest (the caller's own
    /// timers, e.g. idle control connections).
    fn next_wakeup(&self) -> Option<Instant> {
        None
    }

    /// Called once per loop turn, after events were handled.
    fn on_tick(&mut self, sup: &mut SupervisorHandle<'_>) {
        let _ = sup;
    }
}

/// Hooks that do nothing (reload is refused).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {}
