//! A pre-fork process supervisor: the launcher side of a daemon whose work is done by forked
//! worker processes (the role of OpenStack's `ProcessLauncher`, gunicorn's arbiter or
//! nginx's master). It knows nothing of what workers do: a caller plugs in a [`Worker`] and
//! [`Hooks`].
//!
//! What it does:
//! - forks [`Settings::workers`] workers per *generation*, each with its own link (a Unix
//!   socket pair carrying length-prefixed frames, see [`Report`] and [`Command`]);
//! - notices a worker's death by SIGCHLD + `waitpid` and by EOF on its link, reaps it, logs
//!   why, and respawns it: at once for an occasional crash, with exponential backoff (1 s,
//!   2 s, 4 s... capped) for a slot that keeps dying within a second of its start. It never
//!   exits because workers crash — except when one exits with [`BOOT_ERROR`];
//! - counts a worker as booting until it sends `Ready` (boot timeout), then expects
//!   heartbeats (worker timeout: SIGTERM, SIGKILL after a grace, respawn), and keeps each
//!   worker's latest heartbeat payload for [`SupervisorHandle::workers`];
//! - handles the launcher's signals: TERM/INT graceful stop (a second one: fast stop), QUIT
//!   immediate stop, HUP reload (a new generation, the old one retired only once every new
//!   worker is ready; kept if the new one fails to boot), TTIN/TTOU one worker more/fewer,
//!   USR1 reopen logs; the same requests are available to the caller's control socket
//!   through [`SupervisorHandle`];
//! - runs the caller's extra sources (a control socket) in the same loop.
//!
//! What it does not do: bind sockets (the caller binds them before constructing the
//! [`Supervisor`]; workers inherit them across `fork`), parse configuration, log anywhere
//! (it uses the `log` facade), or know what a worker's payloads mean.
//!
//! The [`daemon`] module has the service helpers: [`daemon::daemonize`],
//! [`daemon::Pidfile`], [`daemon::sd_notify`], [`daemon::drop_privileges`],
//! [`daemon::set_cloexec`].
//!
//! # Wiring
//! ```no_run
//! use std::time::Duration;
//! use supervisor::{ChildLink, Command, NoHooks, Settings, Supervisor, WorkerContext};
//!
//! fn worker(mut link: ChildLink, ctx: WorkerContext) -> i32 {
//!     // ... set up (open storage; on failure `return supervisor::BOOT_ERROR`) ...
//!     link.ready().ok();
//!     loop {
//!         match link.recv_timeout(ctx.worker_timeout / 4) {
//!             Ok(Some(Command::Stop)) | Err(_) => return 0, // asked to stop, or launcher gone
//!             Ok(_) => {}
//!         }
//!         link.heartbeat(br#"{"received":0}"#).ok();
//!     }
//! }
//!
//! let settings = Settings { workers: 4, ..Settings::default() };
//! let mut sup = Supervisor::new(settings, Box::new(worker))?;
//! let reason = sup.run(&mut NoHooks)?;
//! # Ok::<(), supervisor::Error>(())
//! ```
//!
//! # A daemon's start-up, in order
//! 1. [`daemon::Pidfile::acquire`] (a second instance is refused on the terminal);
//! 2. with `--daemon`, [`daemon::daemonize`], then [`daemon::Pidfile::write_pid`]; otherwise
//!    [`daemon::Daemonized::foreground`] so the rest is one code path;
//! 3. bind the listening sockets (workers inherit them: capture their fds in the worker),
//!    open the control socket, then [`daemon::drop_privileges`];
//! 4. [`Supervisor::new`]; through [`Supervisor::handle`]: `register_extra` the control
//!    socket, `close_in_children` the pidfile's and the readiness pipe's fds;
//! 5. [`Supervisor::run`] with hooks that, on the first [`SupervisorEvent::GenerationReady`],
//!    call [`daemon::Daemonized::notify_ready`] and `sd_notify("READY=1")`; `RELOADING=1` on
//!    [`SupervisorEvent::ReloadStarted`], `STOPPING=1` on [`SupervisorEvent::Stopping`];
//! 6. map the result to an exit status (a boot error: tell the waiting original process with
//!    [`daemon::Daemonized::notify_failure`]).
//!
//! On reload, [`Hooks::reload`] re-reads the configuration, binds sockets whose address
//! changed (keeping the others open, so nothing is refused meanwhile) and returns the new
//! worker; once [`SupervisorEvent::GenerationReady`] names the retired generation, the
//! launcher closes the sockets the new configuration dropped (after `keep_in_children` if
//! it had asked to close them in workers, see [`SupervisorHandle::keep_in_children`]).
//!
//! # The single-thread rule
//! The launcher process must have exactly one thread whenever it forks, that is during
//! [`Supervisor::run`] and [`daemon::daemonize`]: a forked child inherits only the forking
//! thread, and locks held by others (the allocator's, a logger's) would stay locked in it
//! forever. Debug builds assert it. Workers may start threads freely.

pub mod daemon;
mod fork;
mod frame;
mod hooks;
mod link;
mod settings;
mod signals;
mod supervisor;

pub use fork::{thread_count, Worker, WorkerContext, PANIC_EXIT_CODE};
pub use frame::{Command, FrameError, Report, MAX_FRAME_BYTES};
pub use hooks::{Hooks, NoHooks, SupervisorEvent, WorkerExit, WorkerInfo, WorkerState};
pub use link::{ChildLink, LinkError};
pub use mio::{Interest, Token};
pub use nix::sys::signal::Signal;
pub use nix::unistd::Pid;
pub use settings::{ExitReason, Settings, StopMode, BOOT_ERROR};
pub use signals::worker_term_pipe;
pub use supervisor::{Error, Supervisor, SupervisorHandle, MAX_EXTRA_TOKEN};
