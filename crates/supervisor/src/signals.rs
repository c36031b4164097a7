//! The launcher's signals: a self-pipe plus one counter per signal.
//!
//! The handlers (run by signal-hook) only bump an atomic counter and write one byte to the
//! pipe so the event loop wakes up; the loop then reads the counters. Counting (rather than a
//! byte per signal) means a full pipe never loses a signal, and two TERMs are two TERMs.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nix::sys::signal::Signal;
use signal_hook::SigId;

/// Signals the launcher handles. Workers get them reset (see `fork::child_after_fork`).
pub(crate) const HANDLED: [Signal; 8] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGCHLD,
];

pub(crate) struct SignalPipe {
    read: UnixStream,
    // Kept open for the handlers, which write to its raw fd.
    write: UnixStream,
    counts: Vec<(Signal, Arc<AtomicUsize>)>,
    ids: Vec<SigId>,
}

impl SignalPipe {
    /// Installs handlers for [`HANDLED`]. They stay until the pipe is dropped.
    pub(crate) fn install() -> io::Result<Self> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut pipe = SignalPipe {
            read,
            write,
            counts: Vec::new(),
            ids: Vec::new(),
        };
        let wake_fd = pipe.write.as_raw_fd();
        for sig in HANDLED {
            let count = Arc::new(AtomicUsize::new(0));
            let c = Arc::clone(&count);
            let action = move || {
                c.fetch_add(1, Ordering::SeqCst);
                let byte = [sig as u8];
                // SAFETY: send(2) on a valid fd with a live 1-byte buffer; async-signal-safe.
                // MSG_DONTWAIT: a full pipe already guarantees a wake-up, the count is kept.
                unsafe {
                    libc::send(
                        wake_fd,
                        byte.as_ptr().cast(),
                        1,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    );
                }
            };
            // SAFETY: the action only does an atomic add and a send(2): both async-signal-safe,
            // no allocation, no locks. The fd it writes to lives as long as the registration
            // (both are owned by this struct; Drop unregisters before closing).
            let id = unsafe { signal_hook::low_level::register(sig as libc::c_int, action) }?;
            pipe.ids.push(id);
            pipe.counts.push((sig, count));
        }
        Ok(pipe)
    }

    /// Empties the pipe and returns the signals received since the last call, each as many
    /// times as it arrived, in [`HANDLED`] order.
    pub(crate) fn drain(&mut self) -> Vec<Signal> {
        let mut buf = [0u8; 256];
        loop {
            match self.read.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let mut out = Vec::new();
        for (sig, count) in &self.counts {
            let n = count.swap(0, Ordering::SeqCst);
            out.extend(std::iter::repeat(*sig).take(n));
        }
        out
    }

    /// Descriptors a forked worker must close.
    pub(crate) fn fds(&self) -> [RawFd; 2] {
        [self.read.as_raw_fd(), self.write.as_raw_fd()]
    }

    pub(crate) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// The write end of a worker's SIGTERM pipe (see [`worker_term_pipe`]); -1 until installed.
static WORKER_TERM_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_worker_term(_: libc::c_int) {
    // SAFETY: errno is thread-local; saving and restoring it keeps the interrupted code's
    // view of it. send(2) is async-signal-safe; the fd lives until the process exits.
    unsafe {
        let errno = *libc::__errno_location();
        let fd = WORKER_TERM_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            let byte = [1u8];
            libc::send(
                fd,
                byte.as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
        *libc::__errno_location() = errno;
    }
}

/// In a worker: make SIGTERM a request to stop gracefully. Returns the (non-blocking) read end
/// of a socket pair that gets a byte for every SIGTERM; the worker's loop polls it.
///
/// This installs the handler with `sigaction` directly rather than through signal-hook: the
/// worker inherits signal-hook's registry from the launcher (which lists SIGTERM), so a
/// signal-hook registration in the worker would not call `sigaction` again, and the
/// disposition the fork reset to SIG_DFL would stay: SIGTERM would kill the worker outright.
pub fn worker_term_pipe() -> io::Result<UnixStream> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    use std::os::fd::IntoRawFd;
    let (read, write) = UnixStream::pair()?;
    read.set_nonblocking(true)?;
    write.set_nonblocking(true)?;
    // The write end stays open for the life of the process: the handler writes to it.
    let fd = write.into_raw_fd();
    let old = WORKER_TERM_FD.swap(fd, Ordering::SeqCst);
    if old >= 0 {
        // SAFETY: a previous pipe's write end, owned by nobody else.
        unsafe { libc::close(old) };
    }
    let action = SigAction::new(
        SigHandler::Handler(on_worker_term),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only reads an atomic and calls send(2), both async-signal-safe.
    unsafe { sigaction(Signal::SIGTERM, &action) }.map_err(io::Error::from)?;
    Ok(read)
}
