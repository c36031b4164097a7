//! The one place that forks a worker.
//!
//! Fork discipline: the launcher must be single-threaded when it forks (no logger threads,
//! no thread pools, no signal-hook iterator threads), because a forked child only inherits
//! the forking thread and any lock another thread held stays locked forever. Debug builds
//! assert it by counting `/proc/self/task`. Between `fork` and the worker's entry point the
//! child makes only async-signal-safe system calls; it never returns into the launcher's
//! code (it always ends with `_exit`), so none of the launcher's destructors run in a worker
//! and no launcher state (links of other workers, the event loop) is ever used there.

use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{
    pthread_sigmask, sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
};
use nix::unistd::{fork, getpid, getppid, ForkResult, Pid};

use crate::link::ChildLink;
use crate::signals::HANDLED;

/// Exit code of a worker whose entry point panicked.
pub const PANIC_EXIT_CODE: i32 = 70;

/// What a worker is told about itself when it starts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerContext {
    /// Index of the worker in its generation (0..workers), stable across respawns.
    pub slot: usize,
    /// The generation this worker belongs to; a reload starts a new one.
    pub generation: u64,
    /// The launcher's pid.
    pub launcher: Pid,
    /// The launcher kills a ready worker silent for this long: heartbeat well within it
    /// (e.g. every `worker_timeout / 4`).
    pub worker_timeout: Duration,
}

/// The code a worker process runs. The daemon implements this; the supervisor calls it in
/// the child right after `fork`, and the child exits with the returned code.
///
/// The worker owns the process from then on: it may allocate, start threads, open
/// connections. It should send [`ChildLink::ready`] once it serves, heartbeat regularly, obey
/// [`crate::Command::Stop`], and return when its link reports [`crate::LinkError::Closed`]
/// (the launcher died). Return [`crate::BOOT_ERROR`] when it cannot start at all (bad
/// configuration, storage unusable): the launcher then stops instead of respawning it.
///
/// Signals in a worker: SIGTERM and SIGCHLD have their default action (a worker may install
/// its own SIGTERM handler: the launcher sends TERM to a hung worker, and the kernel sends it
/// when the launcher dies); SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGTTIN and SIGTTOU are ignored,
/// so a terminal's Ctrl-C reaches the launcher only and workers obey their link.
pub trait Worker {
    /// The worker's entry point; its return value is the process's exit code.
    fn run(&self, link: ChildLink, ctx: WorkerContext) -> i32;
}

impl<F> Worker for F
where
    F: Fn(ChildLink, WorkerContext) -> i32,
{
    fn run(&self, link: ChildLink, ctx: WorkerContext) -> i32 {
        self(link, ctx)
    }
}

/// Number of threads of this process, from `/proc/self/task` (None when unreadable).
pub fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task")
        .ok()
        .map(|dir| dir.count())
}

/// Debug-build check of the single-thread rule; `what` names the caller for the message.
pub(crate) fn debug_assert_single_threaded(what: &str) {
    if cfg!(debug_assertions) {
        if let Some(n) = thread_count() {
            assert!(
                n <= 1,
                "{what}: the process has {n} threads; \
                 fork is only sound from a single-threaded launcher"
            );
        }
    }
}

/// Forks a worker process running `worker` with `child_end` as its link.
///
/// `close_in_child` lists the launcher's descriptors the worker must not keep (other workers'
/// link ends, the event loop, the signal pipe, the caller's control socket...). They are
/// close-on-exec, but a worker does not exec, so it closes them explicitly.
///
/// Returns the child's pid in the launcher; never returns in the child.
pub(crate) fn spawn_worker(
    worker: &dyn Worker,
    ctx: WorkerContext,
    child_end: UnixStream,
    close_in_child: &[RawFd],
) -> Result<Pid, Errno> {
    debug_assert_single_threaded("spawn_worker");
    // Bytes buffered by the launcher would otherwise be written twice, once by each process.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();

    let parent = getpid();
    // Block every signal across fork: the child must not run the launcher's handlers (they
    // write to the launcher's self-pipe) before it has reset them. Signals arriving meanwhile
    // stay pending for the launcher; a new process starts with none pending.
    let mut saved = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut saved),
    )?;

    // SAFETY: the process is single-threaded (asserted above in debug builds, documented as
    // the launcher's contract), so the child is a consistent copy. The child branch below
    // never returns: it runs `child_after_fork`, which ends in `_exit`.
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Parent { child }) => {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
            drop(child_end);
            Ok(child)
        }
        Ok(ForkResult::Child) => child_after_fork(worker, ctx, child_end, close_in_child, parent),
        Err(e) => {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
            Err(e)
        }
    }
}

/// Runs in the new worker: sets the process up, calls the worker, exits.
fn child_after_fork(
    worker: &dyn Worker,
    ctx: WorkerContext,
    child_end: UnixStream,
    close_in_child: &[RawFd],
    parent: Pid,
) -> ! {
    // Die with the launcher. PDEATHSIG fires when the forking *thread* exits: the launcher's
    // main thread, which lives as long as the launcher.
    // SAFETY: prctl(2) with integer arguments; async-signal-safe system call.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
    }
    // The launcher may have died between fork and prctl: then PDEATHSIG will never fire.
    if getppid() != parent {
        // SAFETY: _exit(2) is async-signal-safe and never returns.
        unsafe { libc::_exit(1) }
    }

    for sig in HANDLED {
        let handler = match sig {
            Signal::SIGTERM | Signal::SIGCHLD => SigHandler::SigDfl,
            _ => SigHandler::SigIgn,
        };
        let action = SigAction::new(handler, SaFlags::empty(), SigSet::empty());
        // SAFETY: installs SIG_DFL/SIG_IGN (no Rust handler); sigaction(2) is
        // async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }

    for &fd in close_in_child {
        // SAFETY: these descriptors belong to the launcher's objects, which are never used
        // or dropped in this process (it ends in _exit below); closing them only drops this
        // process's reference. close(2) is async-signal-safe.
        unsafe {
            libc::close(fd);
        }
    }

    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);

    let code = match ChildLink::new(child_end, parent) {
        Ok(link) => {
            catch_unwind(AssertUnwindSafe(|| worker.run(link, ctx))).unwrap_or(PANIC_EXIT_CODE)
        }
        Err(_) => 1,
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit(2) ends the worker without running the launcher's atexit handlers or
    // destructors (they belong to the launcher's copy of the state). Never returns.
    unsafe { libc::_exit(code) }
}
