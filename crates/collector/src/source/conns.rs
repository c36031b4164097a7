//! The stream connections of a worker: ceilometer `tcp://` publishers ([`super::tcp`]) and
//! MessagePack-RPC clients over TCP or a Unix socket ([`super::rpc`]). This module owns their
//! listeners, the connection table (a slab indexed by `Token`), each connection's read buffer
//! and reply queue, back-pressure, and idle expiry; the protocols decide what a frame is.

use super::{Intake, Throttle};
use crate::dispatch::Ticket;
use crate::framing::MsgpackScanner;
use crate::untrusted::Untrusted;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// Read no more from a connection whose unsent replies exceed this.
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// Read no more from a connection with this many unanswered requests.
const MAX_PENDING_REPLIES: usize = 1024;
/// Nesting allowed in a frame (sample metadata is shallow; this is far above real use).
pub const MAX_DEPTH: usize = 64;
const READ_CHUNK: usize = 64 * 1024;
/// Bytes one connection may read in one turn of the loop. A connection with more to read
/// goes to the back of the ready queue, so every connection, the UDP socket, the link and the
/// heartbeat get a turn however fast one client sends (issue 13, item 4).
const READ_BUDGET: usize = 4 * READ_CHUNK;
/// A connection holding less than this may always read, even when the worker's
/// `max_buffered_bytes` is spent: small requests keep flowing while large partial frames wait.
const RESERVE: usize = 2 * READ_CHUNK;
/// A read buffer grows by doubling up to this step, then by this step: a 16 MiB frame costs
/// a few copies, and a buffer never holds much more than its frame.
const GROW_STEP: usize = 2 << 20;
/// Freeing a buffer at least this large asks the allocator to return memory.
const LARGE: usize = 1 << 20;
/// Connections one listener may accept in one turn of the loop.
const ACCEPT_BUDGET: usize = 64;

/// Which protocol a connection speaks (by the listener it came from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Rpc,
    CeiloTcp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Rpc => "rpc",
            Proto::CeiloTcp => "tcp",
        }
    }
}

/// The listeners a worker accepts connections on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    CeiloTcp,
    Rpc,
    Unix,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
    /// Read up to `max` bytes onto the end of `buf`, into its spare capacity (which must hold
    /// them): no zeroing first. Zero-filling the 64 KiB chunk before every read was ~1,400
    /// instructions per RPC sample (callgrind), for bytes the kernel overwrites at once.
    fn read_into(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        let spare = buf.spare_capacity_mut();
        let want = max.min(spare.len());
        // SAFETY: `read(2)` writes at most `want` bytes to the first `want` of `spare`, which
        // this Vec owns; the length grows only by the count the kernel reports written.
        let n = unsafe { libc::read(self.fd(), spare.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // SAFETY: the kernel initialized those `n <= want` bytes, within the capacity.
        unsafe { buf.set_len(buf.len() + n) };
        Ok(n)
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
}

/// A reply slot, in request order; filled when the request's batch completes.
struct PendingReply {
    msgid: u64,
    bytes: Option<Vec<u8>>,
}

/// A frame that ends the connection: why, and the request to answer with an error if known.
pub struct ProtocolError {
    pub msgid: Option<u64>,
    pub reason: String,
}

/// One connection's state.
pub struct Conn {
    proto: Proto,
    serial: u64,
    stream: Stream,
    peer: String,
    rbuf: Vec<u8>,
    rpos: usize,
    scanner: MsgpackScanner,
    wbuf: Vec<u8>,
    wpos: usize,
    replies: VecDeque<PendingReply>,
    last_active: Instant,
    /// Reading stopped: protocol error (close once replies are out) or peer closed.
    read_closed: bool,
    /// Reading paused by back-pressure; resumed from the loop.
    paused: bool,
    /// In the ready queue: its read budget ran out with data left to read.
    queued: bool,
    /// Paused because the worker's buffered bytes reached `max_buffered_bytes`.
    mem_paused: bool,
    /// Capacity of `rbuf` counted in [`Connections::held`].
    held: usize,
    /// When the unfinished frame at the head of the buffer started (None: no partial frame).
    frame_since: Option<Instant>,
    interest: Option<Interest>,
}

impl Conn {
    fn unsent(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    fn done(&self) -> bool {
        self.read_closed && self.replies.is_empty() && self.unsent() == 0
    }

    /// Slots are reused; serials are not.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Bytes received and not yet consumed by a frame.
    pub fn unread(&self) -> &[u8] {
        &self.rbuf[self.rpos..]
    }

    pub fn scanner_and_unread(&mut self) -> (&mut MsgpackScanner, &[u8]) {
        (&mut self.scanner, &self.rbuf[self.rpos..])
    }

    /// Queue a reply slot (filled now, or later with `bytes: None`) and move every filled
    /// slot at the head of the queue to the write buffer.
    pub fn queue_reply(&mut self, msgid: u64, bytes: Option<Vec<u8>>) {
        self.replies.push_back(PendingReply { msgid, bytes });
        self.move_filled_replies();
    }

    fn move_filled_replies(&mut self) {
        while self.replies.front().is_some_and(|r| r.bytes.is_some()) {
            if let Some(r) = self.replies.pop_front() {
                self.wbuf
                    .extend_from_slice(r.bytes.as_deref().unwrap_or_default());
            }
        }
    }
}

/// The listeners and connections of one worker.
pub struct Connections {
    registry: Registry,
    first_token: usize,
    tcp: Option<TcpListener>,
    rpc: Option<TcpListener>,
    unix: Option<UnixListener>,
    conns: Vec<Option<Conn>>,
    /// Connections whose read budget ran out with data left, in turn order.
    ready: VecDeque<usize>,
    /// Listeners whose accept budget ran out with connections left.
    ready_listeners: Vec<Listener>,
    free: Vec<usize>,
    open: usize,
    next_serial: u64,
    max_connections: usize,
    max_frame: usize,
    max_elements: u64,
    idle_timeout: Duration,
    /// Bytes all connections' read buffers hold, and the most they may hold.
    held: usize,
    max_held: usize,
    /// The budget was exhausted at the last sweep too.
    exhausted: bool,
    /// Where [`Connections::resume_paused`] starts its next round: after the last connection
    /// it resumed, so that every paused connection gets its turn.
    resume_from: usize,
    frame_timeout: Duration,
    /// Gives the pages of freed large buffers back to the system.
    releaser: crate::memory::Releaser,
    log: Throttle,
}

impl Connections {
    /// Register the listeners (with the tokens given for each); connection `i` gets
    /// `Token(first_token + i)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &crate::config::CollectorConfig,
        registry: &Registry,
        tcp: Option<std::net::TcpListener>,
        rpc: Option<std::net::TcpListener>,
        unix: Option<std::os::unix::net::UnixListener>,
        tokens: [Token; 3],
        first_token: usize,
    ) -> io::Result<Connections> {
        let mut tcp = tcp.map(TcpListener::from_std);
        let mut rpc = rpc.map(TcpListener::from_std);
        let mut unix = unix.map(UnixListener::from_std);
        if let Some(s) = tcp.as_mut() {
            registry.register(s, tokens[0], Interest::READABLE)?;
        }
        if let Some(s) = rpc.as_mut() {
            registry.register(s, tokens[1], Interest::READABLE)?;
        }
        if let Some(s) = unix.as_mut() {
            registry.register(s, tokens[2], Interest::READABLE)?;
        }
        Ok(Connections {
            registry: registry.try_clone()?,
            first_token,
            tcp,
            rpc,
            unix,
            conns: Vec::new(),
            ready: VecDeque::new(),
            ready_listeners: Vec::new(),
            free: Vec::new(),
            open: 0,
            next_serial: 1,
            max_connections: cfg.max_connections,
            max_frame: cfg.max_frame_bytes,
            max_elements: cfg.max_frame_elements,
            idle_timeout: Duration::from_secs_f64(cfg.idle_timeout),
            held: 0,
            max_held: cfg.max_buffered_bytes,
            exhausted: false,
            resume_from: 0,
            frame_timeout: Duration::from_secs_f64(cfg.frame_timeout),
            releaser: crate::memory::Releaser::new(Duration::from_millis(10)),
            log: Throttle::new(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Connections open now by kind: (ceilometer tcp://, MessagePack-RPC).
    pub fn open_by_kind(&self) -> (usize, usize) {
        let rpc = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.proto.name() == "rpc")
            .count();
        let all = self.conns.iter().flatten().count();
        (all - rpc, rpc)
    }

    /// The slot of a connection token, if it is one.
    pub fn slot(&self, t: Token) -> Option<usize> {
        t.0.checked_sub(self.first_token)
    }

    /// Whether every reply has been written (a stopping worker waits for this).
    pub fn all_answered(&self) -> bool {
        self.conns
            .iter()
            .flatten()
            .all(|c| c.replies.is_empty() && c.unsent() == 0)
    }

    pub fn introspect(&self) -> Vec<serde_json::Value> {
        self.conns
            .iter()
            .flatten()
            .map(|c| {
                serde_json::json!({
                    "peer": c.peer,
                    "kind": c.proto.name(),
                    "read_buffered": c.rbuf.len() - c.rpos,
                    "write_buffered": c.unsent(),
                    "pending_replies": c.replies.len(),
                    "idle_s": c.last_active.elapsed().as_secs_f64(),
                })
            })
            .collect()
    }

    /// Whether a connection or listener has input left over from its last turn.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty() || !self.ready_listeners.is_empty()
    }

    /// Give every connection and listener whose budget ran out last turn another turn.
    pub fn run_ready(&mut self, intake: &mut Intake) {
        for which in std::mem::take(&mut self.ready_listeners) {
            self.accept(which, intake);
        }
        for _ in 0..self.ready.len() {
            let Some(i) = self.ready.pop_front() else {
                break;
            };
            match self.conns.get_mut(i).and_then(Option::as_mut) {
                Some(c) => c.queued = false,
                None => continue,
            }
            self.readable(i, intake);
        }
    }

    /// Accept the pending connections on a listener, at most [`ACCEPT_BUDGET`] this turn.
    pub fn accept(&mut self, which: Listener, intake: &mut Intake) {
        for _ in 0..ACCEPT_BUDGET {
            let accepted = match which {
                Listener::Unix => match self.unix.as_ref().map(|l| l.accept()) {
                    Some(Ok((s, addr))) => Ok((
                        Stream::Unix(s),
                        format!(
                            "unix:{:?}",
                            addr.as_pathname()
                                .unwrap_or(std::path::Path::new(""))
                                .display()
                        ),
                    )),
                    Some(Err(e)) => Err(e),
                    None => return,
                },
                Listener::Rpc | Listener::CeiloTcp => {
                    let l = if which == Listener::Rpc {
                        self.rpc.as_ref()
                    } else {
                        self.tcp.as_ref()
                    };
                    match l.map(|l| l.accept()) {
                        Some(Ok((s, addr))) => {
                            let _ = s.set_nodelay(true);
                            Ok((Stream::Tcp(s), addr.to_string()))
                        }
                        Some(Err(e)) => Err(e),
                        None => return,
                    }
                }
            };
            let proto = if which == Listener::CeiloTcp {
                Proto::CeiloTcp
            } else {
                Proto::Rpc
            };
            match accepted {
                Ok((stream, peer)) => {
                    if self.open >= self.max_connections {
                        let max = self.max_connections;
                        self.log.log(log::Level::Warn, || {
                            format!(
                                "refusing connection from {peer}: max_connections ({max}) reached"
                            )
                        });
                        drop(stream);
                        continue;
                    }
                    match proto {
                        Proto::Rpc => intake.counters.rpc_connections += 1,
                        Proto::CeiloTcp => intake.counters.tcp_connections += 1,
                    }
                    self.add(proto, stream, peer, intake);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log, and try again on the next readiness.
                    self.log
                        .log(log::Level::Error, || format!("accept failed: {e}"));
                    return;
                }
            }
        }
        if !self.ready_listeners.contains(&which) {
            self.ready_listeners.push(which);
        }
    }

    fn add(&mut self, proto: Proto, mut stream: Stream, peer: String, intake: &mut Intake) {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.registry.register(
            stream.source(),
            Token(self.first_token + i),
            Interest::READABLE,
        ) {
            log::error!("cannot register connection from {peer}: {e}");
            self.free.push(i);
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        self.open += 1;
        log::debug!("connection {serial} from {peer}");
        self.conns[i] = Some(Conn {
            proto,
            serial,
            stream,
            peer,
            rbuf: Vec::new(),
            rpos: 0,
            scanner: MsgpackScanner::new(self.max_frame, MAX_DEPTH)
                .with_max_elements(self.max_elements),
            wbuf: Vec::new(),
            wpos: 0,
            replies: VecDeque::new(),
            last_active: Instant::now(),
            read_closed: false,
            paused: false,
            queued: false,
            mem_paused: false,
            held: 0,
            frame_since: None,
            interest: Some(Interest::READABLE),
        });
        // Data may have arrived with the connection.
        self.readable(i, intake);
    }

    fn close(&mut self, i: usize) {
        if let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) {
            self.held -= c.held;
            if c.held >= LARGE {
                self.releaser.freed();
            }
            let _ = self.registry.deregister(c.stream.source());
            self.open -= 1;
            self.free.push(i);
            log::debug!("connection {} from {} closed", c.serial, c.peer);
        }
    }

    /// Read what connection `i` has for us, within its budget for this turn, and process
    /// every complete frame.
    pub fn readable(&mut self, i: usize, intake: &mut Intake) {
        let mut budget = READ_BUDGET;
        loop {
            let can = intake.can_accept();
            let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
                return;
            };
            if c.read_closed {
                break;
            }
            let backlogged = c.unsent() > MAX_WRITE_BUFFER || c.replies.len() > MAX_PENDING_REPLIES;
            if !can || backlogged {
                c.paused = true;
                break;
            }
            compact(c);
            let len = c.rbuf.len();
            // Grow the buffer ourselves, in steps of at most GROW_STEP, and count what is
            // allocated (capacity), not what is filled: that is what the process holds.
            let cap = c.rbuf.capacity();
            let new_cap = if cap < len + READ_CHUNK {
                (len + READ_CHUNK).max(cap.saturating_mul(2).min(cap + GROW_STEP))
            } else {
                cap
            };
            // While it grows, the old and the new buffer both exist: count both.
            let over = self.held + new_cap > self.max_held;
            if over && new_cap > cap && cap >= RESERVE {
                // Wait for memory: other frames complete or the sweep drops the largest.
                c.paused = true;
                c.mem_paused = true;
                break;
            }
            if new_cap > cap {
                c.rbuf.reserve_exact(new_cap - len);
                if cap >= LARGE {
                    self.releaser.freed();
                }
            }
            self.held = self.held - c.held + c.rbuf.capacity();
            c.held = c.rbuf.capacity();
            match c.stream.read_into(&mut c.rbuf, READ_CHUNK) {
                Ok(0) => {
                    c.read_closed = true;
                    let partial = c.rbuf.len() - c.rpos;
                    if partial > 0 {
                        log::debug!(
                            "{}: closed with {partial} bytes of an unfinished frame",
                            c.peer
                        );
                    }
                    break;
                }
                Ok(n) => {
                    c.last_active = Instant::now();
                    intake.counters.by_source.get_mut(c.proto.name()).bytes += n as u64;
                    self.process_buffer(i, intake);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        if let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) {
                            // Its turn is over: it waits for the next one as an idle
                            // connection does.
                            shrink_idle(c);
                            if !c.queued {
                                c.queued = true;
                                self.ready.push_back(i);
                            }
                        }
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    shrink_idle(c);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: read error: {e}", c.peer);
                    c.read_closed = true;
                    c.replies.clear();
                    c.wbuf.clear();
                    c.wpos = 0;
                    break;
                }
            }
        }
        self.account(i);
        self.releaser.maybe_release(Instant::now());
        self.update_interest(i);
    }

    /// Bring [`Connections::held`] up to date with connection `i`'s buffer.
    fn account(&mut self, i: usize) {
        if let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) {
            let cap = c.rbuf.capacity();
            if c.held >= LARGE && cap < c.held {
                self.releaser.freed();
            }
            self.held = self.held - c.held + cap;
            c.held = cap;
        }
    }

    /// Decode every complete frame in the connection's buffer.
    fn process_buffer(&mut self, i: usize, intake: &mut Intake) {
        loop {
            let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
                return;
            };
            if c.read_closed {
                return;
            }
            let frame = match c.proto {
                Proto::Rpc => super::rpc::scan(c),
                Proto::CeiloTcp => super::tcp::scan(c, self.max_frame, self.max_elements),
            };
            let (start, end) = match frame {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // A trickle resets the idle timer, not this: a frame has frame_timeout
                    // from its first byte to its last.
                    if c.rpos == c.rbuf.len() {
                        c.frame_since = None;
                    } else if c.frame_since.is_none() {
                        c.frame_since = Some(Instant::now());
                    }
                    compact(c);
                    self.account(i);
                    return;
                }
                Err(e) => {
                    self.protocol_error(i, intake, None, &e.to_string());
                    return;
                }
            };
            // The frame's strings are borrowed from the read buffer, not copied (the samples
            // keep copies of the fields they store): the buffer is taken out of the connection
            // while the frame is handled, which needs the connection for its reply, and put
            // back before anything else reads it.
            let rbuf = std::mem::take(&mut c.rbuf);
            let decoded = meter::decode::decode_value_ref(&rbuf[c.rpos + start..c.rpos + end]);
            c.rpos += end;
            c.frame_since = None;
            let result = match decoded {
                Err(e) => Err(ProtocolError {
                    msgid: None,
                    reason: format!("undecodable frame: {e}"),
                }),
                Ok(v) => match c.proto {
                    Proto::CeiloTcp => {
                        super::tcp::handle(v, intake).map_err(|reason| ProtocolError {
                            msgid: None,
                            reason,
                        })
                    }
                    Proto::Rpc => super::rpc::handle(c, i, v, intake),
                },
            };
            c.rbuf = rbuf;
            if end - start >= LARGE {
                // Its values were many and are gone now (or owned by the batch).
                self.releaser.freed();
            }
            if result.is_ok() {
                intake.add_bytes(end - start);
                intake.flush_if_full();
            }
            if let Err(e) = result {
                self.protocol_error(i, intake, e.msgid, &e.reason);
                return;
            }
        }
    }

    /// Stop reading a connection that sent something it should not have; answer the
    /// request if known, then close once the replies are out.
    fn protocol_error(&mut self, i: usize, intake: &mut Intake, msgid: Option<u64>, reason: &str) {
        let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        match c.proto {
            Proto::Rpc => intake.counters.rpc_errors += 1,
            Proto::CeiloTcp => intake.counters.tcp_malformed += 1,
        }
        let peer = &c.peer;
        let kind = c.proto.name();
        self.log.log(log::Level::Warn, || {
            format!(
                "{kind}: {peer}: {}; closing the connection",
                Untrusted(reason)
            )
        });
        c.read_closed = true;
        c.rbuf = Vec::new();
        c.rpos = 0;
        c.frame_since = None;
        self.held -= c.held;
        if c.held >= LARGE {
            self.releaser.freed();
        }
        c.held = 0;
        if let Some(msgid) = msgid {
            let mut out = Vec::new();
            crate::rpc::encode_error(&mut out, msgid, reason);
            c.queue_reply(msgid, Some(out));
        }
    }

    /// Write what connection `i` has to send.
    pub fn writable(&mut self, i: usize) {
        let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        while c.unsent() > 0 {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(0) => break,
                Ok(n) => {
                    c.wpos += n;
                    c.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: write error: {e}", c.peer);
                    c.read_closed = true;
                    c.replies.clear();
                    c.wbuf.clear();
                    c.wpos = 0;
                    break;
                }
            }
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wbuf.shrink_to(READ_CHUNK);
            c.wpos = 0;
        } else if c.wpos > MAX_WRITE_BUFFER {
            c.wbuf.drain(..c.wpos);
            c.wpos = 0;
        }
        self.update_interest(i);
    }

    /// The answer to a ticket's request is ready: fill its slot and send what is in order.
    pub fn fill_reply(&mut self, t: &Ticket, msgid: u64, bytes: Vec<u8>) {
        let Some(Some(c)) = self.conns.get_mut(t.conn) else {
            return;
        };
        if c.serial != t.serial {
            return; // the client went away; its slot was reused
        }
        if let Some(slot) = c
            .replies
            .iter_mut()
            .find(|r| r.msgid == msgid && r.bytes.is_none())
        {
            slot.bytes = Some(bytes);
        }
        c.move_filled_replies();
        self.writable(t.conn);
    }

    /// Register the interest a connection needs now, or close it when it is finished.
    fn update_interest(&mut self, i: usize) {
        let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        if c.done() {
            self.close(i);
            return;
        }
        let read = !c.read_closed && !c.paused;
        let write = c.unsent() > 0;
        let want = match (read, write) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        if want == c.interest {
            return;
        }
        let token = Token(self.first_token + i);
        let r = &self.registry;
        let res = match (c.interest, want) {
            (_, None) => r.deregister(c.stream.source()),
            (None, Some(w)) => r.register(c.stream.source(), token, w),
            (Some(_), Some(w)) => r.reregister(c.stream.source(), token, w),
        };
        if let Err(e) = res {
            log::warn!("{}: cannot update poll interest: {e}", c.peer);
        }
        c.interest = want;
    }

    /// Resume connections paused by back-pressure once there is room again, in turn: a round
    /// starts after the connection the last one resumed (room is usually taken by the first
    /// connection resumed; always starting at slot 0 left the later slots paused for as long
    /// as the earlier ones had more to send, seconds under a sustained load).
    pub fn resume_paused(&mut self, intake: &mut Intake) {
        let n = self.conns.len();
        let start = self.resume_from.min(n);
        for i in (start..n).chain(0..start) {
            if !intake.can_accept() {
                return;
            }
            let memory = self.held < self.max_held;
            let resume = match self.conns[i].as_mut() {
                Some(c) if c.paused && !c.read_closed => {
                    c.unsent() <= MAX_WRITE_BUFFER / 2
                        && c.replies.len() <= MAX_PENDING_REPLIES / 2
                        && (memory || !c.mem_paused)
                }
                _ => false,
            };
            if resume {
                self.resume_from = i + 1;
                if let Some(c) = self.conns[i].as_mut() {
                    c.paused = false;
                    c.mem_paused = false;
                }
                // Edge-triggered: data that arrived while paused raises no new event.
                self.process_buffer(i, intake);
                self.readable(i, intake);
            }
        }
    }

    /// Once a second: drop frames older than `frame_timeout`, the largest partial frame when
    /// `max_buffered_bytes` stays exhausted, and connections idle for longer than
    /// `idle_timeout` with nothing left to answer.
    pub fn sweep(&mut self, now: Instant, intake: &mut Intake) {
        for i in 0..self.conns.len() {
            let late = self.conns[i].as_ref().is_some_and(|c| {
                !c.read_closed
                    && c.frame_since
                        .is_some_and(|t| now.duration_since(t) > self.frame_timeout)
            });
            if late {
                let reason = format!(
                    "frame not complete within frame_timeout ({} s)",
                    self.frame_timeout.as_secs_f64()
                );
                self.protocol_error(i, intake, None, &reason);
                self.update_interest(i);
            }
        }
        // Spent: some connection waits for memory (reads stop short of the budget, so the
        // count itself may never reach it).
        let exhausted = self
            .conns
            .iter()
            .flatten()
            .any(|c| c.mem_paused && !c.read_closed);
        if exhausted && self.exhausted {
            let largest = (0..self.conns.len())
                .filter_map(|i| {
                    let c = self.conns[i].as_ref()?;
                    (!c.read_closed && c.held > 0).then_some((c.held, i))
                })
                .max();
            if let Some((bytes, i)) = largest {
                let reason = format!(
                    "dropping a partial frame of {bytes} bytes: the worker's read buffers hold max_buffered_bytes ({})",
                    self.max_held
                );
                self.protocol_error(i, intake, None, &reason);
                self.update_interest(i);
            }
        }
        self.exhausted = exhausted;
        self.releaser.maybe_release(now);
        for i in 0..self.conns.len() {
            let idle = match self.conns[i].as_ref() {
                Some(c) => {
                    c.replies.is_empty()
                        && c.unsent() == 0
                        && now.duration_since(c.last_active) > self.idle_timeout
                }
                None => false,
            };
            if idle {
                if let Some(c) = self.conns[i].as_ref() {
                    log::info!("closing idle connection from {}", c.peer);
                }
                self.close(i);
            }
        }
    }

    /// Stop accepting and reading: close the listeners, process the frames already
    /// buffered, and keep each connection only until its replies are out.
    pub fn stop(&mut self, intake: &mut Intake) {
        if let Some(mut s) = self.tcp.take() {
            let _ = self.registry.deregister(&mut s);
        }
        if let Some(mut s) = self.rpc.take() {
            let _ = self.registry.deregister(&mut s);
        }
        if let Some(mut s) = self.unix.take() {
            let _ = self.registry.deregister(&mut s);
        }
        self.ready_listeners.clear();
        self.ready.clear();
        for i in 0..self.conns.len() {
            if let Some(c) = self.conns[i].as_mut() {
                c.paused = false;
                self.process_buffer(i, intake);
            }
            if let Some(c) = self.conns[i].as_mut() {
                c.read_closed = true;
            }
            self.update_interest(i);
        }
    }
}

/// Drop the consumed bytes at the head of a connection's buffer once they are worth moving,
/// and give back a large buffer that is empty: a connection that once carried a 16 MiB frame
/// must not keep 16 MiB while idle.
/// A connection that has read all there is keeps only its unfinished frame's bytes between
/// reads, not a read-sized buffer: 64 publishers sending in turns held 64 buffers of 64-128 KiB,
/// 34.7 MiB per worker at peak against 24.4 MiB for one (issue 18's cap is 30 MiB). A frame
/// in progress that is already large keeps its buffer (it is counted against
/// `max_buffered_bytes` and will be complete soon).
fn shrink_idle(c: &mut Conn) {
    shrink_buffer(&mut c.rbuf, &mut c.rpos);
}

/// [`shrink_idle`] on a read buffer whose bytes before `rpos` are consumed.
fn shrink_buffer(rbuf: &mut Vec<u8>, rpos: &mut usize) {
    let rest = rbuf.len() - *rpos;
    if rbuf.capacity() < READ_CHUNK || rest > READ_CHUNK / 4 {
        return;
    }
    let mut small = Vec::with_capacity(rest);
    small.extend_from_slice(&rbuf[*rpos..]);
    *rbuf = small;
    *rpos = 0;
}

fn compact(c: &mut Conn) {
    if c.rpos > 0 && (c.rpos == c.rbuf.len() || c.rpos > READ_CHUNK) {
        c.rbuf.drain(..c.rpos);
        c.rpos = 0;
        if c.rbuf.is_empty() && c.rbuf.capacity() > 4 * READ_CHUNK {
            c.rbuf = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_buffer_keeps_only_its_unfinished_frame() {
        // A read-sized buffer with 3 consumed frames and 100 bytes of a fourth.
        let mut rbuf = vec![7u8; 2 * READ_CHUNK];
        rbuf.truncate(3 * 1000 + 100);
        rbuf[3000..].fill(9);
        let mut rpos = 3000;
        shrink_buffer(&mut rbuf, &mut rpos);
        assert_eq!((rpos, rbuf.len()), (0, 100));
        assert!(rbuf.capacity() < 1000, "capacity {}", rbuf.capacity());
        assert!(rbuf.iter().all(|&b| b == 9));
        // Nothing left: nothing held.
        let mut rbuf = vec![1u8; READ_CHUNK];
        let mut rpos = READ_CHUNK;
        shrink_buffer(&mut rbuf, &mut rpos);
        assert_eq!((rpos, rbuf.len(), rbuf.capacity()), (0, 0, 0));
    }

    #[test]
    fn a_large_frame_in_progress_keeps_its_buffer() {
        let mut rbuf = vec![5u8; 4 * READ_CHUNK];
        let mut rpos = 10;
        let cap = rbuf.capacity();
        shrink_buffer(&mut rbuf, &mut rpos);
        assert_eq!(
            (rpos, rbuf.len(), rbuf.capacity()),
            (10, 4 * READ_CHUNK, cap)
        );
        // A small buffer is left alone too (nothing to gain).
        let mut rbuf = vec![5u8; 100];
        let mut rpos = 50;
        shrink_buffer(&mut rbuf, &mut rpos);
        assert_eq!((rpos, rbuf.len()), (50, 100));
    }
}
