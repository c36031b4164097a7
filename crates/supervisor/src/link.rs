//! Parent–child links: one `socketpair(AF_UNIX, SOCK_STREAM)` per worker, carrying frames
//! (see [`crate::frame`]) both ways. Both ends are non-blocking; writes that do not fit in the
//! socket buffer are queued and flushed later, so neither side ever blocks on the other.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};
use nix::unistd::{getppid, Pid};

use crate::frame::{Command, FrameError, FrameReader, Report};

/// Bytes a worker may have queued but unsent before [`ChildLink::send`] refuses more: the
/// launcher reads links promptly, so this only fills when it is stuck.
const MAX_CHILD_BACKLOG: usize = 4 * 1024 * 1024;

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The other end is gone. For a worker this means the launcher died (or closed the link):
    /// flush what you hold and exit.
    #[error("link closed by the other side")]
    Closed,
    /// The peer sent bytes that are not a valid frame; the link is unusable.
    #[error("link protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// Too many bytes are queued because the launcher is not reading; the report was dropped.
    #[error("link backlog full ({0} bytes queued): launcher not reading")]
    Backlog(usize),
    /// Any other I/O error on the socket.
    #[error("link I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Outcome of draining a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadState {
    /// Everything available was read; the peer is still there.
    Open,
    /// The peer closed its end (EOF or reset).
    Closed,
}

/// One end of a link: a non-blocking stream with a frame reader and a write queue.
#[derive(Debug)]
pub(crate) struct Channel {
    sock: UnixStream,
    reader: FrameReader,
    out: Vec<u8>,
    out_pos: usize,
}

impl Channel {
    pub(crate) fn new(sock: UnixStream) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Channel {
            sock,
            reader: FrameReader::default(),
            out: Vec::new(),
            out_pos: 0,
        })
    }

    /// Bytes queued and not yet written.
    pub(crate) fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Queues an encoded frame (see `Report::encode`/`Command::encode`).
    pub(crate) fn queue(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        encode(&mut self.out);
    }

    /// Writes queued bytes until done or the socket is full. `Ok(true)` when nothing is left.
    pub(crate) fn flush(&mut self) -> Result<bool, LinkError> {
        while self.out_pos < self.out.len() {
            // MSG_NOSIGNAL: a dead peer is an EPIPE error here, not a process-killing SIGPIPE.
            match send(
                self.sock.as_raw_fd(),
                &self.out[self.out_pos..],
                MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => self.out_pos += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(false),
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(LinkError::Closed),
                Err(e) => return Err(LinkError::Io(e.into())),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    /// Reads everything available into the frame reader.
    pub(crate) fn fill(&mut self) -> io::Result<ReadState> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match (&self.sock).read(&mut buf) {
                Ok(0) => return Ok(ReadState::Closed),
                Ok(n) => self.reader.extend(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadState::Open),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(ReadState::Closed)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete frame already read, if any.
    pub(crate) fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
        self.reader.next_frame()
    }

    /// True when the peer's last frame was cut short.
    pub(crate) fn has_partial_frame(&self) -> bool {
        self.reader.has_partial()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// A worker's end of its link to the launcher, handed to [`crate::Worker::run`].
///
/// The descriptor is non-blocking. A worker with an event loop registers the link (it is a
/// `mio` source; or use [`as_raw_fd`](AsRawFd::as_raw_fd)) for readability and, when it is
/// readable, calls [`try_recv`](Self::try_recv) until it returns `Ok(None)` (required
/// with edge-triggered polling). `Err(LinkError::Closed)` means the launcher is gone: flush
/// and exit. Sends never block: what does not fit in the socket buffer is queued and written
/// by the next send, `try_recv` or [`flush`](Self::flush).
///
/// Keep the link open until the worker is done (return from `run`): the launcher takes a
/// closed link for a dying worker.
#[derive(Debug)]
pub struct ChildLink {
    chan: Channel,
    parent: Pid,
    closed: bool,
}

impl ChildLink {
    pub(crate) fn new(sock: UnixStream, parent: Pid) -> io::Result<Self> {
        Ok(ChildLink {
            chan: Channel::new(sock)?,
            parent,
            closed: false,
        })
    }

    /// Sends a report (queued if the socket is full).
    pub fn send(&mut self, report: &Report) -> Result<(), LinkError> {
        if self.closed {
            return Err(LinkError::Closed);
        }
        let pending = self.chan.pending_out();
        if pending > MAX_CHILD_BACKLOG {
            return Err(LinkError::Backlog(pending));
        }
        self.chan.queue(|out| report.encode(out));
        self.flush_inner().map(drop)
    }

    /// Tells the launcher this worker serves. Until then it counts as booting.
    pub fn ready(&mut self) -> Result<(), LinkError> {
        self.send(&Report::Ready)
    }

    /// Sends a heartbeat carrying `payload` (the worker's counters, typically JSON).
    pub fn heartbeat(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        self.send(&Report::Heartbeat(payload.to_vec()))
    }

    /// Answers a [`Command::Custom`].
    pub fn reply(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        self.send(&Report::Reply(payload.to_vec()))
    }

    /// Writes queued reports. `Ok(true)` when nothing is left queued.
    pub fn flush(&mut self) -> Result<bool, LinkError> {
        if self.closed {
            return Err(LinkError::Closed);
        }
        self.flush_inner()
    }

    fn flush_inner(&mut self) -> Result<bool, LinkError> {
        let r = self.chan.flush();
        if matches!(r, Err(LinkError::Closed)) {
            self.closed = true;
        }
        r
    }

    /// True when reports are queued and not yet written (register for writability to flush
    /// them promptly, or just call [`flush`](Self::flush) on the next loop turn).
    pub fn has_pending_output(&self) -> bool {
        self.chan.pending_out() > 0
    }

    /// The next command from the launcher without blocking: `Ok(None)` when there is none
    /// (the socket is drained), `Err(LinkError::Closed)` once the launcher is gone and every
    /// command it sent was returned.
    pub fn try_recv(&mut self) -> Result<Option<Command>, LinkError> {
        if !self.closed && self.chan.pending_out() > 0 {
            // Opportunistic: a worker calls this every loop turn, which keeps the queue moving.
            match self.flush_inner() {
                Ok(_) | Err(LinkError::Closed) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(cmd) = self.decode_next()? {
            return Ok(Some(cmd));
        }
        if !self.closed && self.chan.fill()? == ReadState::Closed {
            self.closed = true;
        }
        if let Some(cmd) = self.decode_next()? {
            return Ok(Some(cmd));
        }
        if self.closed {
            Err(LinkError::Closed)
        } else {
            Ok(None)
        }
    }

    fn decode_next(&mut self) -> Result<Option<Command>, LinkError> {
        match self.chan.next_frame()? {
            Some((tag, payload)) => Ok(Some(Command::decode(tag, payload)?)),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for a command (for workers without an event loop of their own).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Command>, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(cmd) = self.try_recv()? {
                return Ok(Some(cmd));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.chan.sock.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(LinkError::Io(e.into())),
            }
        }
    }

    /// The launcher's pid, as it was when this worker was forked.
    pub fn parent_pid(&self) -> Pid {
        self.parent
    }

    /// False once the launcher died (this process was re-parented). EOF on the link tells the
    /// same, and sooner for an event loop; this is for code that does not poll the link.
    pub fn parent_alive(&self) -> bool {
        getppid() == self.parent
    }
}

impl AsRawFd for ChildLink {
    fn as_raw_fd(&self) -> RawFd {
        self.chan.as_raw_fd()
    }
}

/// Register a link directly with a worker's own `mio::Poll` (readable interest; add writable
/// while [`ChildLink::has_pending_output`]).
impl mio::event::Source for ChildLink {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        SourceFd(&self.as_raw_fd()).deregister(registry)
    }
}

impl AsFd for ChildLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.chan.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Channel, ChildLink) {
        let (p, c) = UnixStream::pair().unwrap();
        (
            Channel::new(p).unwrap(),
            ChildLink::new(c, nix::unistd::getpid()).unwrap(),
        )
    }

    fn parent_reports(chan: &mut Channel) -> (Vec<Report>, ReadState) {
        let state = chan.fill().unwrap();
        let mut out = Vec::new();
        while let Some((tag, payload)) = chan.next_frame().unwrap() {
            out.push(Report::decode(tag, payload).unwrap());
        }
        (out, state)
    }

    #[test]
    fn reports_and_commands_cross_the_link() {
        let (mut parent, mut child) = pair();
        child.ready().unwrap();
        child.heartbeat(b"{\"n\":1}").unwrap();
        let (reports, state) = parent_reports(&mut parent);
        assert_eq!(state, ReadState::Open);
        assert_eq!(
            reports,
            vec![Report::Ready, Report::Heartbeat(b"{\"n\":1}".to_vec())]
        );

        assert!(child.try_recv().unwrap().is_none());
        parent.queue(|o| Command::Custom(b"ping".to_vec()).encode(o));
        parent.queue(|o| Command::Stop.encode(o));
        assert!(parent.flush().unwrap());
        assert_eq!(
            child.recv_timeout(Duration::from_secs(5)).unwrap(),
            Some(Command::Custom(b"ping".to_vec()))
        );
        assert_eq!(child.try_recv().unwrap(), Some(Command::Stop));
        assert!(child.try_recv().unwrap().is_none());
    }

    #[test]
    fn child_sees_parent_gone_after_buffered_commands() {
        let (mut parent, mut child) = pair();
        parent.queue(|o| Command::Stop.encode(o));
        parent.flush().unwrap();
        drop(parent);
        assert_eq!(child.try_recv().unwrap(), Some(Command::Stop));
        assert!(matches!(child.try_recv(), Err(LinkError::Closed)));
        assert!(matches!(child.heartbeat(b"x"), Err(LinkError::Closed)));
    }

    #[test]
    fn parent_sees_eof_when_child_drops() {
        let (mut parent, child) = pair();
        drop(child);
        let (reports, state) = parent_reports(&mut parent);
        assert!(reports.is_empty());
        assert_eq!(state, ReadState::Closed);
    }

    #[test]
    fn link_is_a_mio_source() {
        use mio::{Events, Interest, Poll, Token};
        let (mut parent, mut child) = pair();
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut child, Token(7), Interest::READABLE)
            .unwrap();
        parent.queue(|o| Command::ReopenLogs.encode(o));
        parent.flush().unwrap();
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(events
            .iter()
            .any(|e| e.token() == Token(7) && e.is_readable()));
        assert_eq!(child.try_recv().unwrap(), Some(Command::ReopenLogs));
        assert!(child.try_recv().unwrap().is_none());
    }

    #[test]
    fn large_reports_queue_instead_of_blocking() {
        let (mut parent, mut child) = pair();
        let big = vec![7u8; 1024 * 1024];
        child.heartbeat(&big).unwrap();
        assert!(child.has_pending_output());
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.is_empty() && Instant::now() < deadline {
            child.flush().unwrap();
            got.extend(parent_reports(&mut parent).0);
        }
        assert_eq!(got, vec![Report::Heartbeat(big)]);
        assert!(!child.has_pending_output());
    }
}
