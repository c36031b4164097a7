//! The launcher's event loop: generations of workers, their links, signals, timers.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, Pid};

use crate::fork::{spawn_worker, Worker, WorkerContext};
use crate::frame::{Command, Report};
use crate::hooks::{Hooks, SupervisorEvent, WorkerExit, WorkerInfo, WorkerState};
use crate::link::{Channel, LinkError, ReadState};
use crate::settings::{ExitReason, Settings, StopMode};
use crate::signals::SignalPipe;

/// Tokens with this bit set belong to the supervisor (signal pipe, worker links).
const INTERNAL: usize = 1 << (usize::BITS - 1);
const SIGNAL_TOKEN: Token = Token(INTERNAL);

/// Extra sources registered by the caller must use tokens up to this value.
pub const MAX_EXTRA_TOKEN: usize = INTERNAL - 1;

/// How long the loop waits for SIGKILLed workers to be reaped before giving up on them.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Delay before retrying a failed fork.
const FORK_RETRY: Duration = Duration::from_secs(1);
/// Bytes of commands queued for a worker that does not read them before more are refused.
const MAX_PARENT_BACKLOG: usize = 4 * 1024 * 1024;
/// The loop wakes at least this often, whatever the deadlines say.
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);

fn link_token(serial: u64) -> Token {
    Token(INTERNAL | serial as usize)
}

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the event loop or installing signal handlers failed.
    #[error("cannot set up the launcher ({what}): {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
    /// Waiting for events failed.
    #[error("launcher event loop failed: {0}")]
    Poll(io::Error),
    /// A worker exited with the boot error code; everything was stopped.
    #[error(
        "worker {pid} (slot {slot}, generation {generation}) exited with the boot error code \
         {code}: it cannot start, so the launcher stopped instead of respawning it"
    )]
    BootError {
        pid: Pid,
        slot: usize,
        generation: u64,
        code: i32,
    },
    /// An extra source's token collides with the supervisor's own.
    #[error(
        "token {0} is reserved by the supervisor (extra sources use tokens up to \
         {MAX_EXTRA_TOKEN})"
    )]
    ReservedToken(usize),
    /// Registering an extra source failed.
    #[error("cannot register extra source with token {token}: {source}")]
    Register { token: usize, source: io::Error },
    /// No live worker has this pid.
    #[error("no worker with pid {0}")]
    NoSuchWorker(Pid),
    /// The worker's link is closed (it is exiting).
    #[error("the link to worker {0} is closed")]
    LinkClosed(Pid),
}

/// A pre-fork process supervisor: keeps `workers` children of the current generation alive.
///
/// Construct it after binding every listening socket (workers inherit them), register the
/// caller's extra sources (control socket), then call [`run`](Self::run) with the caller's
/// [`Hooks`]. See the crate documentation for the whole picture.
pub struct Supervisor {
    core: Core,
}

/// A handle on the running supervisor, given to [`Hooks`] methods; [`Supervisor::handle`]
/// gives one before `run`. Requests (stop, reload, worker count) take effect on the loop's
/// next turn.
pub struct SupervisorHandle<'a> {
    core: &'a mut Core,
}

struct Generation {
    id: u64,
    worker: Rc<dyn Worker>,
    slots: Vec<Slot>,
    /// For a generation started by a reload: when it must be all ready.
    boot_deadline: Option<Instant>,
    /// `GenerationReady` was sent.
    announced: bool,
}

#[derive(Debug)]
struct Slot {
    /// Serial of the worker filling the slot.
    child: Option<u64>,
    /// Consecutive deaths within `fast_crash_window` of start.
    fast_crashes: u32,
    /// When an empty slot may be filled again.
    respawn_at: Instant,
}

struct Child {
    pid: Pid,
    generation: u64,
    slot: usize,
    /// No longer fills its slot: not respawned when it exits.
    retired: bool,
    link: Option<Channel>,
    wants_write: bool,
    started: Instant,
    started_wall: SystemTime,
    ready_at: Option<Instant>,
    last_seen: Option<Instant>,
    heartbeat: Option<Vec<u8>>,
    heartbeats: u64,
    stop_sent: Option<Instant>,
    term_sent: Option<Instant>,
    kill_sent: bool,
    /// When its link reached EOF: it is expected to exit (and be reaped) shortly.
    link_closed_at: Option<Instant>,
}

struct Stopping {
    mode: StopMode,
    signal: Option<Signal>,
    /// When the remaining workers get SIGKILL.
    deadline: Instant,
    /// Set once SIGKILL went out: when to stop waiting for the reaps.
    kill_wait_until: Option<Instant>,
    killed: usize,
}

struct Core {
    settings: Settings,
    poll: Poll,
    signals: SignalPipe,
    launcher: Pid,
    /// Descriptors of the caller's extra sources (closed in workers).
    extras: BTreeSet<RawFd>,
    close_in_children: Vec<RawFd>,
    current: Generation,
    next: Option<Generation>,
    children: BTreeMap<u64, Child>,
    next_serial: u64,
    last_generation: u64,
    reload_requested: bool,
    reopen_requested: bool,
    stop_request: Option<(StopMode, Option<Signal>)>,
    stopping: Option<Stopping>,
    boot_error: Option<Error>,
    events: VecDeque<SupervisorEvent>,
    /// Something was requested through a handle: do not block in the next poll.
    wake_now: bool,
    /// The worker count [`Hooks::workers_changed`] last announced (the caller prepared its
    /// per-slot resources for this many).
    announced_workers: usize,
}

impl Supervisor {
    /// Creates the event loop and installs the launcher's signal handlers (TERM, INT, QUIT,
    /// HUP, USR1, TTIN, TTOU, CHLD). No worker is started before [`run`](Self::run).
    pub fn new(settings: Settings, worker: Box<dyn Worker>) -> Result<Self, Error> {
        let poll = Poll::new().map_err(|source| Error::Setup {
            what: "event loop",
            source,
        })?;
        let signals = SignalPipe::install().map_err(|source| Error::Setup {
            what: "signal handlers",
            source,
        })?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.read_fd()),
                SIGNAL_TOKEN,
                Interest::READABLE,
            )
            .map_err(|source| Error::Setup {
                what: "signal pipe registration",
                source,
            })?;
        let mut settings = settings;
        settings.workers = settings.workers.max(1);
        let announced_workers = settings.workers;
        Ok(Supervisor {
            core: Core {
                settings,
                poll,
                signals,
                launcher: getpid(),
                extras: BTreeSet::new(),
                close_in_children: Vec::new(),
                current: Generation {
                    id: 1,
                    worker: Rc::from(worker),
                    slots: Vec::new(),
                    boot_deadline: None,
                    announced: false,
                },
                next: None,
                children: BTreeMap::new(),
                next_serial: 1,
                last_generation: 1,
                reload_requested: false,
                reopen_requested: false,
                stop_request: None,
                stopping: None,
                boot_error: None,
                events: VecDeque::new(),
                wake_now: false,
                announced_workers,
            },
        })
    }

    /// A handle for registering extra sources or changing settings before [`run`](Self::run).
    pub fn handle(&mut self) -> SupervisorHandle<'_> {
        SupervisorHandle {
            core: &mut self.core,
        }
    }

    /// Starts the first generation and supervises until a stop completes.
    ///
    /// Returns how the stop went, or [`Error::BootError`] when a worker of the serving
    /// generation exited with the boot error code (after stopping the others gracefully).
    /// Worker crashes never end it. The process must be single-threaded (see the crate doc).
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> Result<ExitReason, Error> {
        crate::fork::debug_assert_single_threaded("Supervisor::run");
        // A previous run left its stopped generation's slots behind.
        self.core.current.slots.clear();
        self.core.current.announced = false;
        self.core.next = None;
        let mut events = Events::with_capacity(256);
        info!(
            "launcher {} starting generation {} with {} workers",
            self.core.launcher, self.core.current.id, self.core.settings.workers
        );
        loop {
            let now = Instant::now();
            self.core.reap(now);
            self.process_requests(hooks, now);
            self.core.check_timers(now);
            self.announce_workers(hooks);
            self.core.reconcile(now);
            self.dispatch(hooks);
            hooks.on_tick(&mut SupervisorHandle {
                core: &mut self.core,
            });
            if let Some(result) = self.core.finished(Instant::now()) {
                self.dispatch(hooks);
                return result;
            }

            let now = Instant::now();
            let mut deadline = self.core.next_deadline(now);
            if let Some(t) = hooks.next_wakeup() {
                deadline = deadline.min(t);
            }
            let mut timeout = deadline.saturating_duration_since(now).min(MAX_POLL_WAIT);
            if self.core.wake_now || !self.core.events.is_empty() {
                timeout = Duration::ZERO;
            }
            self.core.wake_now = false;
            match self.core.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Poll(e)),
            }
            let now = Instant::now();
            for event in events.iter() {
                let token = event.token();
                if token == SIGNAL_TOKEN {
                    self.core.handle_signals();
                } else if token.0 & INTERNAL != 0 {
                    self.core
                        .link_event((token.0 & !INTERNAL) as u64, event, now);
                } else {
                    hooks.on_extra_ready(
                        &mut SupervisorHandle {
                            core: &mut self.core,
                        },
                        token,
                        event,
                    );
                }
            }
        }
    }

    /// Tells the hooks about a new worker count (TTIN/TTOU, `set_workers`, a reload's
    /// settings) before `reconcile` forks or retires a worker for it.
    fn announce_workers(&mut self, hooks: &mut dyn Hooks) {
        let n = self.core.settings.workers.max(1);
        if n != self.core.announced_workers {
            let old = std::mem::replace(&mut self.core.announced_workers, n);
            hooks.workers_changed(
                &mut SupervisorHandle {
                    core: &mut self.core,
                },
                old,
                n,
            );
        }
    }

    fn dispatch(&mut self, hooks: &mut dyn Hooks) {
        while let Some(event) = self.core.events.pop_front() {
            hooks.on_event(
                &mut SupervisorHandle {
                    core: &mut self.core,
                },
                event,
            );
        }
    }

    fn process_requests(&mut self, hooks: &mut dyn Hooks, now: Instant) {
        if let Some((mode, signal)) = self.core.stop_request.take() {
            self.core.begin_stop(mode, signal, now);
        }
        if std::mem::take(&mut self.core.reopen_requested) {
            info!("reopening log files");
            hooks.reopen_logs();
            self.core.broadcast(&Command::ReopenLogs);
        }
        if std::mem::take(&mut self.core.reload_requested) {
            if self.core.stopping.is_some() {
                info!("reload ignored: stopping");
            } else if let Some(next) = &self.core.next {
                warn!(
                    "reload ignored: generation {} is still booting from the previous reload",
                    next.id
                );
            } else {
                info!(
                    "reloading: generation {} keeps serving until the new one is ready",
                    self.core.current.id
                );
                let result = hooks.reload(&mut SupervisorHandle {
                    core: &mut self.core,
                });
                match result {
                    Ok(worker) => self.core.start_generation(worker, Instant::now()),
                    Err(reason) => {
                        error!(
                            "reload failed, generation {} keeps serving: {reason}",
                            self.core.current.id
                        );
                        self.core.events.push_back(SupervisorEvent::ReloadFailed {
                            generation: None,
                            reason,
                        });
                    }
                }
            }
        }
    }
}

impl Core {
    // ---- signals and requests -------------------------------------------------------------

    fn handle_signals(&mut self) {
        for sig in self.signals.drain() {
            match sig {
                Signal::SIGTERM | Signal::SIGINT => {
                    let mode = if self.stopping.is_some() || self.stop_request.is_some() {
                        info!("got {sig} again: fast stop");
                        StopMode::Fast
                    } else {
                        info!("got {sig}: graceful stop");
                        StopMode::Graceful
                    };
                    self.request_stop(mode, Some(sig));
                }
                Signal::SIGQUIT => {
                    info!("got {sig}: immediate stop");
                    self.request_stop(StopMode::Immediate, Some(sig));
                }
                Signal::SIGHUP => self.reload_requested = true,
                Signal::SIGUSR1 => self.reopen_requested = true,
                Signal::SIGTTIN => {
                    let n = self.settings.workers + 1;
                    info!("got {sig}: {n} workers");
                    self.settings.workers = n;
                }
                Signal::SIGTTOU => {
                    let n = self.settings.workers.saturating_sub(1).max(1);
                    info!("got {sig}: {n} workers");
                    self.settings.workers = n;
                }
                _ => {} // SIGCHLD: the loop reaps on every turn.
            }
        }
    }

    fn request_stop(&mut self, mode: StopMode, signal: Option<Signal>) {
        self.stop_request = match self.stop_request {
            Some((m, s)) if m >= mode => Some((m, s)),
            _ => Some((mode, signal)),
        };
        self.wake_now = true;
    }

    fn begin_stop(&mut self, mode: StopMode, signal: Option<Signal>, now: Instant) {
        let s = &self.settings;
        let deadline = match mode {
            StopMode::Graceful => now + s.graceful_shutdown_timeout,
            StopMode::Fast => now + s.kill_grace,
            StopMode::Immediate => now,
        };
        match &mut self.stopping {
            Some(st) if mode <= st.mode => return,
            Some(st) => {
                st.mode = mode;
                st.deadline = st.deadline.min(deadline);
            }
            None => {
                self.stopping = Some(Stopping {
                    mode,
                    signal,
                    deadline,
                    kill_wait_until: None,
                    killed: 0,
                });
                if let Some(next) = self.next.take() {
                    info!("abandoning generation {} (booting): stopping", next.id);
                }
            }
        }
        info!("stopping ({mode:?}): {} workers to go", self.children.len());
        self.events.push_back(SupervisorEvent::Stopping { mode });
        let serials: Vec<u64> = self.children.keys().copied().collect();
        for serial in serials {
            match mode {
                StopMode::Graceful => self.retire(serial, now),
                StopMode::Fast => self.terminate(serial, now, "fast stop"),
                StopMode::Immediate => self.kill_child(serial, "immediate stop"),
            }
        }
    }

    fn start_generation(&mut self, worker: Box<dyn Worker>, now: Instant) {
        self.last_generation += 1;
        let id = self.last_generation;
        info!(
            "starting generation {id} ({} workers); boot timeout {:?}",
            self.settings.workers, self.settings.boot_timeout
        );
        self.next = Some(Generation {
            id,
            worker: Rc::from(worker),
            slots: Vec::new(),
            boot_deadline: Some(now + self.settings.boot_timeout),
            announced: false,
        });
        self.events
            .push_back(SupervisorEvent::ReloadStarted { generation: id });
    }

    fn abort_reload(&mut self, reason: String, now: Instant) {
        let Some(next) = self.next.take() else {
            return;
        };
        error!(
            "reload failed, generation {} keeps serving: generation {}: {reason}",
            self.current.id, next.id
        );
        let serials: Vec<u64> = self
            .children
            .iter()
            .filter(|(_, c)| c.generation == next.id)
            .map(|(s, _)| *s)
            .collect();
        for serial in serials {
            if let Some(c) = self.children.get_mut(&serial) {
                c.retired = true;
            }
            self.terminate(serial, now, "its generation failed to boot");
        }
        self.events.push_back(SupervisorEvent::ReloadFailed {
            generation: Some(next.id),
            reason,
        });
    }

    // ---- worker processes -------------------------------------------------------------------

    /// Descriptors a new worker must close: everything the launcher holds for itself.
    fn fds_to_close_in_child(&self) -> Vec<RawFd> {
        let mut fds = vec![self.poll.as_raw_fd()];
        fds.extend(self.signals.fds());
        fds.extend(self.extras.iter().copied());
        fds.extend(self.close_in_children.iter().copied());
        fds.extend(
            self.children
                .values()
                .filter_map(|c| c.link.as_ref().map(|l| l.as_raw_fd())),
        );
        fds
    }

    /// Forks a worker for `slot` of the generation `gen_id`. Returns its serial.
    fn spawn(&mut self, gen_id: u64, slot: usize, now: Instant) -> Option<u64> {
        let worker = if self.current.id == gen_id {
            Rc::clone(&self.current.worker)
        } else {
            Rc::clone(&self.next.as_ref()?.worker)
        };
        let (parent_end, child_end) = match UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                error!("cannot create a link for a worker (slot {slot}, generation {gen_id}): {e}");
                return None;
            }
        };
        let chan = match Channel::new(parent_end) {
            Ok(c) => c,
            Err(e) => {
                error!("cannot set up a worker link: {e}");
                return None;
            }
        };
        let mut close = self.fds_to_close_in_child();
        close.push(chan.as_raw_fd());
        let ctx = WorkerContext {
            slot,
            generation: gen_id,
            launcher: self.launcher,
            worker_timeout: self.settings.worker_timeout,
        };
        let pid = match spawn_worker(&*worker, ctx, child_end, &close) {
            Ok(pid) => pid,
            Err(e) => {
                error!("cannot fork a worker (slot {slot}, generation {gen_id}): {e}");
                return None;
            }
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&chan.as_raw_fd()),
            link_token(serial),
            Interest::READABLE,
        ) {
            // Without its link the worker cannot be supervised: have it go.
            error!("cannot watch the link of worker {pid}: {e}; terminating it");
            let _ = kill(pid, Signal::SIGKILL);
        }
        debug!("started worker {pid} (slot {slot}, generation {gen_id})");
        self.children.insert(
            serial,
            Child {
                pid,
                generation: gen_id,
                slot,
                retired: false,
                link: Some(chan),
                wants_write: false,
                started: now,
                started_wall: SystemTime::now(),
                ready_at: None,
                last_seen: None,
                heartbeat: None,
                heartbeats: 0,
                stop_sent: None,
                term_sent: None,
                kill_sent: false,
                link_closed_at: None,
            },
        );
        self.events.push_back(SupervisorEvent::WorkerStarted {
            pid,
            slot,
            generation: gen_id,
        });
        Some(serial)
    }

    /// Reaps every exited child (waitpid(-1, WNOHANG) until none is left).
    fn reap(&mut self, now: Instant) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.child_exited(pid, WorkerExit::Code(code), now)
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.child_exited(pid, WorkerExit::Signal(sig), now)
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }

    fn child_exited(&mut self, pid: Pid, status: WorkerExit, now: Instant) {
        let Some(serial) = self
            .children
            .iter()
            .find(|(_, c)| c.pid == pid)
            .map(|(s, _)| *s)
        else {
            debug!("reaped process {pid}, not a worker ({status})");
            return;
        };
        self.drop_link(serial);
        let Some(child) = self.children.remove(&serial) else {
            return;
        };
        let lifetime = now.saturating_duration_since(child.started);
        let expected = child.retired || child.stop_sent.is_some() || self.stopping.is_some();
        let (slot, generation) = (child.slot, child.generation);
        if expected {
            info!("worker {pid} (slot {slot}, generation {generation}) exited: {status}");
        } else {
            warn!(
                "worker {pid} (slot {slot}, generation {generation}) died after {:.1}s: {status}",
                lifetime.as_secs_f64()
            );
        }
        self.events.push_back(SupervisorEvent::WorkerExited {
            pid,
            slot,
            generation,
            status,
            expected,
        });

        if status == WorkerExit::Code(self.settings.boot_error_code) && !child.retired {
            let err = Error::BootError {
                pid,
                slot,
                generation,
                code: self.settings.boot_error_code,
            };
            if self.next.as_ref().is_some_and(|g| g.id == generation) {
                // A new configuration that cannot boot must not take the service down.
                self.abort_reload(err.to_string(), now);
            } else if self.boot_error.is_none() && self.stopping.is_none() {
                error!("{err}");
                self.boot_error = Some(err);
                self.begin_stop(StopMode::Graceful, None, now);
            }
            return;
        }
        if expected {
            return;
        }

        let fast_window = self.settings.fast_crash_window;
        let max_backoff = self.settings.max_backoff;
        let gen = if self.current.id == generation {
            Some(&mut self.current)
        } else {
            self.next.as_mut().filter(|g| g.id == generation)
        };
        let Some(slot_state) = gen
            .and_then(|g| g.slots.get_mut(slot))
            .filter(|s| s.child == Some(serial))
        else {
            return;
        };
        slot_state.child = None;
        slot_state.fast_crashes = if lifetime < fast_window {
            slot_state.fast_crashes + 1
        } else {
            0
        };
        let delay = backoff(slot_state.fast_crashes, max_backoff);
        slot_state.respawn_at = now + delay;
        if delay.is_zero() {
            info!("respawning slot {slot} of generation {generation}");
        } else {
            warn!(
                "slot {slot} of generation {generation} keeps dying at start ({} times in a row); \
                 respawning in {delay:?}",
                slot_state.fast_crashes
            );
        }
    }

    /// Sends `Stop` and takes the worker out of its slot.
    fn retire(&mut self, serial: u64, now: Instant) {
        let Some(child) = self.children.get_mut(&serial) else {
            return;
        };
        child.retired = true;
        if child.stop_sent.is_some() || child.term_sent.is_some() {
            return;
        }
        child.stop_sent = Some(now);
        if !self.send_command(serial, &Command::Stop) {
            self.terminate(serial, now, "cannot send it Stop (link closed or clogged)");
        }
    }

    /// SIGTERM now, SIGKILL after `kill_grace` (see `check_timers`).
    fn terminate(&mut self, serial: u64, now: Instant, reason: &str) {
        let Some(child) = self.children.get_mut(&serial) else {
            return;
        };
        if child.term_sent.is_some() || child.kill_sent {
            return;
        }
        warn!(
            "terminating worker {} (slot {}, generation {}): {reason}",
            child.pid, child.slot, child.generation
        );
        child.term_sent = Some(now);
        // The pid cannot have been reused: the child is not reaped yet.
        if let Err(e) = kill(child.pid, Signal::SIGTERM) {
            debug!("SIGTERM to worker {}: {e}", child.pid);
        }
    }

    fn kill_child(&mut self, serial: u64, reason: &str) {
        let Some(child) = self.children.get_mut(&serial) else {
            return;
        };
        if child.kill_sent {
            return;
        }
        warn!(
            "killing worker {} (slot {}, generation {}): {reason}",
            child.pid, child.slot, child.generation
        );
        child.kill_sent = true;
        if let Err(e) = kill(child.pid, Signal::SIGKILL) {
            debug!("SIGKILL to worker {}: {e}", child.pid);
        }
        if let Some(st) = self.stopping.as_mut() {
            st.killed += 1;
        }
    }

    // ---- links ------------------------------------------------------------------------------

    /// Queues `cmd` on the worker's link. False when the link is closed.
    fn send_command(&mut self, serial: u64, cmd: &Command) -> bool {
        let Some(child) = self.children.get_mut(&serial) else {
            return false;
        };
        let Some(link) = child.link.as_mut() else {
            return false;
        };
        if link.pending_out() > MAX_PARENT_BACKLOG {
            warn!(
                "worker {} is not reading its link ({} bytes queued); {cmd:?} dropped",
                child.pid,
                link.pending_out()
            );
            return false;
        }
        link.queue(|out| cmd.encode(out));
        match link.flush() {
            Ok(true) => true,
            Ok(false) => {
                if !child.wants_write {
                    child.wants_write = true;
                    let fd = link.as_raw_fd();
                    let _ = self.poll.registry().reregister(
                        &mut SourceFd(&fd),
                        link_token(serial),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                }
                true
            }
            Err(e) => {
                debug!("link to worker {}: {e}", child.pid);
                self.drop_link(serial);
                false
            }
        }
    }

    fn broadcast(&mut self, cmd: &Command) -> Vec<Pid> {
        let targets: Vec<(u64, Pid)> = self
            .children
            .iter()
            .filter(|(_, c)| c.stop_sent.is_none() && c.term_sent.is_none() && !c.retired)
            .map(|(s, c)| (*s, c.pid))
            .collect();
        targets
            .into_iter()
            .filter(|(serial, _)| self.send_command(*serial, cmd))
            .map(|(_, pid)| pid)
            .collect()
    }

    fn drop_link(&mut self, serial: u64) {
        if let Some(link) = self.children.get_mut(&serial).and_then(|c| c.link.take()) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&link.as_raw_fd()));
        }
    }

    fn link_event(&mut self, serial: u64, event: &mio::event::Event, now: Instant) {
        let Some(child) = self.children.get_mut(&serial) else {
            return;
        };
        let pid = child.pid;
        let Some(link) = child.link.as_mut() else {
            return;
        };
        if event.is_writable() {
            match link.flush() {
                Ok(true) => {
                    child.wants_write = false;
                    let fd = link.as_raw_fd();
                    let _ = self.poll.registry().reregister(
                        &mut SourceFd(&fd),
                        link_token(serial),
                        Interest::READABLE,
                    );
                }
                Ok(false) => {}
                Err(LinkError::Closed) => {}
                Err(e) => debug!("link to worker {pid}: {e}"),
            }
        }
        let Some(link) = child.link.as_mut() else {
            return;
        };
        let state = link.fill().unwrap_or_else(|e| {
            warn!("reading the link of worker {pid}: {e}");
            ReadState::Closed
        });
        let mut reports = Vec::new();
        let mut broken = None;
        loop {
            match link.next_frame() {
                Ok(Some((tag, payload))) => match Report::decode(tag, payload) {
                    Ok(r) => reports.push(r),
                    Err(e) => {
                        broken = Some(e.to_string());
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        let partial = link.has_partial_frame();
        for report in reports {
            self.on_report(serial, report, now);
        }
        if let Some(reason) = broken {
            error!("worker {pid} broke its link protocol: {reason}");
            self.drop_link(serial);
            self.terminate(serial, now, "link protocol error");
        } else if state == ReadState::Closed {
            if partial {
                warn!("worker {pid} closed its link in the middle of a message");
            }
            // A worker closes its link when it exits, so the reap normally follows at once;
            // `check_timers` terminates it if it does not.
            debug!("worker {pid} closed its link");
            self.drop_link(serial);
            if let Some(c) = self.children.get_mut(&serial) {
                c.link_closed_at = Some(now);
            }
        }
    }

    fn on_report(&mut self, serial: u64, report: Report, now: Instant) {
        let Some(child) = self.children.get_mut(&serial) else {
            return;
        };
        child.last_seen = Some(now);
        let (pid, slot, generation) = (child.pid, child.slot, child.generation);
        match report {
            Report::Ready => {
                if child.ready_at.is_none() {
                    child.ready_at = Some(now);
                    info!(
                        "worker {pid} (slot {slot}, generation {generation}) ready after {:.2}s",
                        now.saturating_duration_since(child.started).as_secs_f64()
                    );
                    self.events.push_back(SupervisorEvent::WorkerReady {
                        pid,
                        slot,
                        generation,
                    });
                }
            }
            Report::Heartbeat(payload) => {
                child.heartbeats += 1;
                child.heartbeat = Some(payload);
            }
            Report::Reply(payload) => self.events.push_back(SupervisorEvent::Reply {
                pid,
                slot,
                generation,
                payload,
            }),
        }
    }

    // ---- time -------------------------------------------------------------------------------

    fn check_timers(&mut self, now: Instant) {
        let s = self.settings.clone();

        let reload_overdue = self
            .next
            .as_ref()
            .is_some_and(|g| g.boot_deadline.is_some_and(|d| now >= d) && !self.all_ready(g));
        if reload_overdue {
            let reason = format!("not all workers ready within {:?}", s.boot_timeout);
            self.abort_reload(reason, now);
        }

        let mut to_kill = Vec::new();
        let mut to_term = Vec::new();
        for (serial, c) in &self.children {
            if let Some(t) = c.term_sent {
                if !c.kill_sent && now >= t + s.kill_grace {
                    to_kill.push((*serial, "still alive after SIGTERM"));
                }
                continue;
            }
            if self.stopping.is_some() {
                continue;
            }
            if let Some(t) = c.link_closed_at {
                if c.stop_sent.is_none() && now >= t + s.kill_grace {
                    to_term.push((*serial, "it closed its link but did not exit"));
                }
            }
            if let Some(t) = c.stop_sent {
                if now >= t + s.graceful_shutdown_timeout {
                    to_term.push((*serial, "did not stop within the graceful shutdown timeout"));
                }
            } else if c.ready_at.is_none() {
                if now >= c.started + s.boot_timeout {
                    to_term.push((*serial, "not ready within the boot timeout"));
                }
            } else if c.last_seen.is_some_and(|t| now >= t + s.worker_timeout) {
                to_term.push((*serial, "no heartbeat within the worker timeout"));
            }
        }
        for (serial, reason) in to_term {
            self.terminate(serial, now, reason);
        }
        for (serial, reason) in to_kill {
            self.kill_child(serial, reason);
        }

        let overdue = self
            .stopping
            .as_ref()
            .is_some_and(|st| st.kill_wait_until.is_none() && now >= st.deadline);
        if overdue {
            let serials: Vec<u64> = self.children.keys().copied().collect();
            for serial in serials {
                self.kill_child(serial, "stop deadline reached");
            }
            if let Some(st) = self.stopping.as_mut() {
                st.kill_wait_until = Some(now + KILL_WAIT);
            }
        }
    }

    fn next_deadline(&self, now: Instant) -> Instant {
        let s = &self.settings;
        let mut at = now + MAX_POLL_WAIT;
        let mut consider = |t: Instant| at = at.min(t);
        if let Some(st) = &self.stopping {
            consider(st.kill_wait_until.unwrap_or(st.deadline));
        } else {
            for gen in std::iter::once(&self.current).chain(self.next.as_ref()) {
                gen.boot_deadline.into_iter().for_each(&mut consider);
                for slot in gen.slots.iter().filter(|s| s.child.is_none()) {
                    consider(slot.respawn_at);
                }
            }
        }
        for c in self.children.values() {
            if let Some(t) = c.term_sent {
                if !c.kill_sent {
                    consider(t + s.kill_grace);
                }
            } else if self.stopping.is_none() {
                if let Some(t) = c.link_closed_at {
                    consider(t + s.kill_grace);
                }
                if let Some(t) = c.stop_sent {
                    consider(t + s.graceful_shutdown_timeout);
                } else if c.ready_at.is_none() {
                    consider(c.started + s.boot_timeout);
                } else if let Some(t) = c.last_seen {
                    consider(t + s.worker_timeout);
                }
            }
        }
        at
    }

    // ---- generations ------------------------------------------------------------------------

    fn all_ready(&self, gen: &Generation) -> bool {
        !gen.slots.is_empty()
            && gen.slots.iter().all(|slot| {
                slot.child
                    .and_then(|s| self.children.get(&s))
                    .is_some_and(|c| c.ready_at.is_some())
            })
    }

    /// Brings every live generation to `workers` slots, fills empty slots that are due, and
    /// promotes a fully ready new generation.
    fn reconcile(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        let target = self.settings.workers.max(1);
        let mut retired = Vec::new();
        for gen in std::iter::once(&mut self.current).chain(self.next.as_mut()) {
            while gen.slots.len() < target {
                gen.slots.push(Slot {
                    child: None,
                    fast_crashes: 0,
                    respawn_at: now,
                });
            }
            while gen.slots.len() > target {
                if let Some(serial) = gen.slots.pop().and_then(|s| s.child) {
                    retired.push(serial);
                }
            }
        }
        for serial in retired {
            self.retire(serial, now);
        }

        let mut due = Vec::new();
        for gen in std::iter::once(&self.current).chain(self.next.as_ref()) {
            for (i, slot) in gen.slots.iter().enumerate() {
                if slot.child.is_none() && slot.respawn_at <= now {
                    due.push((gen.id, i));
                }
            }
        }
        for (gen_id, i) in due {
            let serial = self.spawn(gen_id, i, now);
            let gen = if self.current.id == gen_id {
                Some(&mut self.current)
            } else {
                self.next.as_mut()
            };
            if let Some(slot) = gen.and_then(|g| g.slots.get_mut(i)) {
                slot.child = serial;
                if serial.is_none() {
                    slot.respawn_at = now + FORK_RETRY;
                }
            }
        }

        if self.next.as_ref().is_some_and(|g| self.all_ready(g)) {
            if let Some(mut next) = self.next.take() {
                next.boot_deadline = None;
                next.announced = true;
                let old = std::mem::replace(&mut self.current, next);
                info!(
                    "generation {} ready; retiring generation {}",
                    self.current.id, old.id
                );
                for serial in old.slots.iter().filter_map(|s| s.child) {
                    self.retire(serial, now);
                }
                self.events.push_back(SupervisorEvent::GenerationReady {
                    generation: self.current.id,
                    previous: Some(old.id),
                });
            }
        }
        if !self.current.announced && self.all_ready(&self.current) {
            self.current.announced = true;
            info!(
                "generation {} ready ({} workers)",
                self.current.id,
                self.current.slots.len()
            );
            self.events.push_back(SupervisorEvent::GenerationReady {
                generation: self.current.id,
                previous: None,
            });
        }
    }

    fn finished(&mut self, now: Instant) -> Option<Result<ExitReason, Error>> {
        let st = self.stopping.as_ref()?;
        let gave_up = st.kill_wait_until.is_some_and(|t| now >= t);
        if !self.children.is_empty() && !gave_up {
            return None;
        }
        let unreaped = self.children.len();
        if unreaped > 0 {
            error!("{unreaped} workers survived SIGKILL; giving up on them");
        }
        let st = self.stopping.take()?;
        if let Some(e) = self.boot_error.take() {
            return Some(Err(e));
        }
        info!("launcher stopped ({:?})", st.mode);
        Some(Ok(ExitReason {
            mode: st.mode,
            signal: st.signal,
            killed: st.killed,
            unreaped,
        }))
    }

    fn worker_infos(&self, now: Instant) -> Vec<WorkerInfo> {
        let mut out: Vec<WorkerInfo> = self
            .children
            .values()
            .map(|c| WorkerInfo {
                pid: c.pid,
                slot: c.slot,
                generation: c.generation,
                state: if c.retired || c.stop_sent.is_some() || c.term_sent.is_some() {
                    WorkerState::Stopping
                } else if c.ready_at.is_some() {
                    WorkerState::Ready
                } else {
                    WorkerState::Booting
                },
                started_at: c.started_wall,
                uptime: now.saturating_duration_since(c.started),
                since_heartbeat: c.last_seen.map(|t| now.saturating_duration_since(t)),
                heartbeats: c.heartbeats,
                last_heartbeat: c.heartbeat.clone(),
            })
            .collect();
        out.sort_by_key(|w| (w.generation, w.slot, w.pid.as_raw()));
        out
    }
}

/// Delay before refilling a slot whose worker died at start `fast_crashes` times in a row:
/// the first crash is respawned at once, then 1 s, 2 s, 4 s... up to `cap`.
fn backoff(fast_crashes: u32, cap: Duration) -> Duration {
    match fast_crashes {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 2).min(16)).min(cap),
    }
}

impl SupervisorHandle<'_> {
    /// A snapshot of every live worker (all generations), by generation and slot.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.core.worker_infos(Instant::now())
    }

    /// The serving generation.
    pub fn generation(&self) -> u64 {
        self.core.current.id
    }

    /// The generation a reload is booting, if any.
    pub fn booting_generation(&self) -> Option<u64> {
        self.core.next.as_ref().map(|g| g.id)
    }

    /// True once a stop began.
    pub fn is_stopping(&self) -> bool {
        self.core.stopping.is_some() || self.core.stop_request.is_some()
    }

    /// The launcher's pid.
    pub fn launcher_pid(&self) -> Pid {
        self.core.launcher
    }

    /// Current settings.
    pub fn settings(&self) -> &Settings {
        &self.core.settings
    }

    /// Replaces the settings (e.g. from a reloaded configuration). Timeouts apply from now;
    /// `workers` as with [`set_workers`](Self::set_workers).
    pub fn set_settings(&mut self, settings: Settings) {
        self.core.settings = settings;
        self.core.settings.workers = self.core.settings.workers.max(1);
        self.core.wake_now = true;
    }

    /// Sets the number of workers per generation (at least 1): extra workers are retired
    /// gracefully, missing ones started.
    pub fn set_workers(&mut self, n: usize) {
        self.core.settings.workers = n.max(1);
        self.core.wake_now = true;
    }

    /// Same as SIGHUP: [`Hooks::reload`] runs on the loop's next turn.
    pub fn request_reload(&mut self) {
        self.core.reload_requested = true;
        self.core.wake_now = true;
    }

    /// Stops the launcher (only ever escalates an ongoing stop).
    pub fn request_stop(&mut self, mode: StopMode) {
        self.core.request_stop(mode, None);
    }

    /// Sends a command to one worker.
    pub fn send(&mut self, pid: Pid, cmd: &Command) -> Result<(), Error> {
        let serial = self
            .core
            .children
            .iter()
            .find(|(_, c)| c.pid == pid)
            .map(|(s, _)| *s)
            .ok_or(Error::NoSuchWorker(pid))?;
        if self.core.send_command(serial, cmd) {
            Ok(())
        } else {
            Err(Error::LinkClosed(pid))
        }
    }

    /// Sends a command to every worker that is not stopping; returns their pids (to match
    /// the [`SupervisorEvent::Reply`]s that come back).
    pub fn broadcast(&mut self, cmd: &Command) -> Vec<Pid> {
        self.core.broadcast(cmd)
    }

    /// Adds a caller's source (e.g. the control socket's listener, or an accepted control
    /// connection) to the launcher's loop; [`Hooks::on_extra_ready`] gets its events. Its
    /// descriptor is closed in workers forked from now on. `token` must be at most
    /// [`MAX_EXTRA_TOKEN`].
    pub fn register_extra<S>(
        &mut self,
        source: &mut S,
        token: Token,
        interest: Interest,
    ) -> Result<(), Error>
    where
        S: Source + AsRawFd + ?Sized,
    {
        self.extra(source, token, interest, false)
    }

    /// Changes the interest of a registered extra source.
    pub fn reregister_extra<S>(
        &mut self,
        source: &mut S,
        token: Token,
        interest: Interest,
    ) -> Result<(), Error>
    where
        S: Source + AsRawFd + ?Sized,
    {
        self.extra(source, token, interest, true)
    }

    fn extra<S>(
        &mut self,
        source: &mut S,
        token: Token,
        interest: Interest,
        again: bool,
    ) -> Result<(), Error>
    where
        S: Source + AsRawFd + ?Sized,
    {
        if token.0 > MAX_EXTRA_TOKEN {
            return Err(Error::ReservedToken(token.0));
        }
        let fd = source.as_raw_fd();
        let registry = self.core.poll.registry();
        let result = if again {
            registry.reregister(source, token, interest)
        } else {
            registry.register(source, token, interest)
        };
        result.map_err(|source| Error::Register {
            token: token.0,
            source,
        })?;
        self.core.extras.insert(fd);
        Ok(())
    }

    /// Removes an extra source (call before closing it).
    pub fn deregister_extra<S>(&mut self, source: &mut S) -> Result<(), Error>
    where
        S: Source + AsRawFd + ?Sized,
    {
        let fd = source.as_raw_fd();
        self.core.extras.remove(&fd);
        self.core
            .poll
            .registry()
            .deregister(source)
            .map_err(|source| Error::Register { token: 0, source })
    }

    /// Makes workers forked from now on close `fd` (the pidfile, the daemon's readiness
    /// pipe, a log file only the launcher writes...). The caller keeps it open and owns it.
    pub fn close_in_children(&mut self, fd: RawFd) {
        if !self.core.close_in_children.contains(&fd) {
            self.core.close_in_children.push(fd);
        }
    }

    /// Undoes [`close_in_children`](Self::close_in_children) (call before closing `fd`, so a
    /// reused number is not closed in workers by mistake).
    pub fn keep_in_children(&mut self, fd: RawFd) {
        self.core.close_in_children.retain(|f| *f != fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_exponential_and_capped() {
        let cap = Duration::from_secs(30);
        let secs: Vec<u64> = (0..10).map(|n| backoff(n, cap).as_secs()).collect();
        assert_eq!(secs, vec![0, 0, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX, cap), cap);
    }

    #[test]
    fn stop_modes_only_escalate() {
        assert!(StopMode::Graceful < StopMode::Fast);
        assert!(StopMode::Fast < StopMode::Immediate);
    }

    #[test]
    fn link_tokens_never_collide_with_extra_tokens() {
        const { assert!(SIGNAL_TOKEN.0 > MAX_EXTRA_TOKEN) };
        assert!(link_token(1).0 > MAX_EXTRA_TOKEN);
        assert_ne!(link_token(1), SIGNAL_TOKEN);
    }
}
