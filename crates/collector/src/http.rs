//! A small HTTP/1.1 server for `/metrics`, `/healthz` and `/readyz`, driven by the launcher's
//! own event loop (no thread: the launcher forks, DESIGN §1).
//!
//! It is deliberately narrow: `GET` and `HEAD` only, no request bodies, keep-alive, bounded
//! everything. Parsing is `httparse`'s (a well-tested, allocation-free parser) so malformed
//! input is its problem, not ours. Limits protect the launcher, which also supervises the
//! workers and must never stall:
//! - at most `max_conns` connections; further ones are accepted and closed at once;
//! - a request head larger than `max_head` bytes or with more than [`MAX_HEADERS`] headers
//!   gets `431` and a close;
//! - a head not complete within `head_timeout` of its first byte (slowloris) gets `408` and
//!   a close; an idle keep-alive connection is closed after `idle_timeout`;
//! - a client that does not read its answers is closed after `write_timeout` without
//!   progress, and is not read from while `MAX_PENDING_OUT` bytes wait for it.
//!
//! Routing is the caller's: [`HttpServer::on_ready`] returns the complete requests it read,
//! the caller answers each with [`HttpServer::respond`], in order.

use mio::event::Source;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Headers a request may carry.
pub const MAX_HEADERS: usize = 32;
/// Requests answered from one read before the connection is closed (nobody pipelines this
/// much at a metrics endpoint; it bounds the work one event can cause).
const MAX_PIPELINE: usize = 8;
/// Output waiting for a slow reader before we stop reading its further requests.
const MAX_PENDING_OUT: usize = 1 << 20;

/// Something the server can register its sockets with: the launcher's
/// [`supervisor::SupervisorHandle`] (extra sources), or a plain `mio::Registry` in tests.
pub trait Registrar {
    fn add(&mut self, s: &mut dyn Registrable, token: Token, interest: Interest) -> io::Result<()>;
    fn change(
        &mut self,
        s: &mut dyn Registrable,
        token: Token,
        interest: Interest,
    ) -> io::Result<()>;
    fn remove(&mut self, s: &mut dyn Registrable) -> io::Result<()>;
}

/// A socket with a descriptor (the supervisor closes extra sources in forked workers).
pub trait Registrable: Source + AsRawFd {}
impl<T: Source + AsRawFd> Registrable for T {}

fn io_err(e: supervisor::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl Registrar for supervisor::SupervisorHandle<'_> {
    fn add(&mut self, s: &mut dyn Registrable, token: Token, interest: Interest) -> io::Result<()> {
        self.register_extra(s, token, interest).map_err(io_err)
    }
    fn change(
        &mut self,
        s: &mut dyn Registrable,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        self.reregister_extra(s, token, interest).map_err(io_err)
    }
    fn remove(&mut self, s: &mut dyn Registrable) -> io::Result<()> {
        self.deregister_extra(s).map_err(io_err)
    }
}

impl Registrar for mio::Registry {
    fn add(&mut self, s: &mut dyn Registrable, token: Token, interest: Interest) -> io::Result<()> {
        self.register(s, token, interest)
    }
    fn change(
        &mut self,
        s: &mut dyn Registrable,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        self.reregister(s, token, interest)
    }
    fn remove(&mut self, s: &mut dyn Registrable) -> io::Result<()> {
        self.deregister(s)
    }
}

/// The server's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_conns: usize,
    pub max_head: usize,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 64,
            max_head: 8 * 1024,
            head_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A parsed request, owned (the caller answers after `on_ready` returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Connection id, for [`HttpServer::respond`].
    pub conn: u64,
    /// `HEAD`: answer without a body.
    pub head: bool,
    /// The path without the query string.
    pub path: String,
    /// The `Accept` header, empty when absent.
    pub accept: String,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        let mut body = body.into().into_bytes();
        if !body.ends_with(b"\n") {
            body.push(b'\n');
        }
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

struct Conn {
    id: u64,
    stream: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    written: usize,
    /// When the request head now being read began to arrive.
    head_started: Option<Instant>,
    last_active: Instant,
    last_write_progress: Instant,
    /// Close once `wbuf` is written.
    close_after: bool,
    /// Requests handed to the caller and not answered yet, with their keep-alive wish.
    awaiting: std::collections::VecDeque<bool>,
    interest: Interest,
}

/// The server: a listener and its connections, on tokens from `base` upwards.
pub struct HttpServer {
    listener: TcpListener,
    local: SocketAddr,
    base: usize,
    conns: Vec<Option<Conn>>,
    next_id: u64,
    limits: Limits,
}

impl HttpServer {
    /// Bind `addr` (host:port). Tokens `base` (listener) to `base + max_conns` are used.
    pub fn bind(addr: &str, base: usize, limits: Limits) -> io::Result<HttpServer> {
        use std::net::ToSocketAddrs;
        let sa = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        // std sets SO_REUSEADDR and O_CLOEXEC on listeners; mio makes it non-blocking.
        let listener = TcpListener::bind(sa)?;
        let local = listener.local_addr()?;
        Ok(HttpServer {
            listener,
            local,
            base,
            conns: Vec::new(),
            next_id: 1,
            limits,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn register(&mut self, reg: &mut dyn Registrar) -> io::Result<()> {
        reg.add(&mut self.listener, Token(self.base), Interest::READABLE)
    }

    /// Whether `token` is one of ours.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.base && token.0 <= self.base + self.limits.max_conns
    }

    pub fn open_connections(&self) -> usize {
        self.conns.iter().flatten().count()
    }

    /// Handle readiness of one of our tokens; returns the complete requests read, which the
    /// caller must answer with [`respond`](Self::respond) in order.
    pub fn on_ready(
        &mut self,
        reg: &mut dyn Registrar,
        token: Token,
        event: &mio::event::Event,
    ) -> Vec<Request> {
        if token.0 == self.base {
            self.accept(reg);
            return Vec::new();
        }
        let slot = token.0 - self.base - 1;
        let mut requests = Vec::new();
        let mut close = false;
        if let Some(Some(c)) = self.conns.get_mut(slot) {
            if event.is_writable() && flush(c).is_err() {
                close = true;
            }
            if !close && (event.is_readable() || event.is_read_closed() || event.is_error()) {
                close = read_requests(c, &self.limits, &mut requests);
            }
        }
        self.settle(reg, slot, close);
        requests
    }

    /// Answer the oldest unanswered request of connection `conn` (ignored when it is gone).
    pub fn respond(&mut self, reg: &mut dyn Registrar, conn: u64, resp: &Response, head: bool) {
        let Some(slot) = self
            .conns
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.id == conn))
        else {
            return;
        };
        let mut close = false;
        if let Some(Some(c)) = self.conns.get_mut(slot) {
            let keep = c.awaiting.pop_front().unwrap_or(false);
            let last = c.awaiting.is_empty();
            let closing = !keep || (c.close_after && last);
            write_response(&mut c.wbuf, resp, head, closing);
            if closing {
                c.close_after = true;
            }
            close = flush(c).is_err();
        }
        self.settle(reg, slot, close);
    }

    /// Close connections past their deadlines. Call at least as often as
    /// [`next_deadline`](Self::next_deadline) asks.
    pub fn on_tick(&mut self, reg: &mut dyn Registrar, now: Instant) {
        for slot in 0..self.conns.len() {
            let mut close = false;
            if let Some(Some(c)) = self.conns.get_mut(slot) {
                if !c.awaiting.is_empty() {
                    continue; // the caller owes an answer
                }
                if c.written < c.wbuf.len() {
                    close = now >= c.last_write_progress + self.limits.write_timeout;
                } else if let Some(t) = c.head_started {
                    if now >= t + self.limits.head_timeout {
                        // A slow (or stalled) request head: answer 408 and close.
                        write_response(
                            &mut c.wbuf,
                            &Response::text(408, "request head not received in time"),
                            false,
                            true,
                        );
                        c.close_after = true;
                        c.head_started = None;
                        close = flush(c).is_err();
                    }
                } else {
                    close = now >= c.last_active + self.limits.idle_timeout;
                }
            }
            self.settle(reg, slot, close);
        }
    }

    /// The earliest time [`on_tick`](Self::on_tick) has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .flatten()
            .filter(|c| c.awaiting.is_empty())
            .map(|c| {
                if c.written < c.wbuf.len() {
                    c.last_write_progress + self.limits.write_timeout
                } else if let Some(t) = c.head_started {
                    t + self.limits.head_timeout
                } else {
                    c.last_active + self.limits.idle_timeout
                }
            })
            .min()
    }

    /// Close everything (the launcher is exiting).
    pub fn close_all(&mut self, reg: &mut dyn Registrar) {
        for slot in 0..self.conns.len() {
            self.settle(reg, slot, true);
        }
        let _ = reg.remove(&mut self.listener);
    }

    fn accept(&mut self, reg: &mut dyn Registrar) {
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the listener stays readable; we retry next turn.
                    log::warn!("metrics endpoint: accept failed: {e}");
                    return;
                }
            };
            let free = self.conns.iter().position(Option::is_none);
            let slot = match free {
                Some(s) => s,
                None if self.conns.len() < self.limits.max_conns => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
                None => {
                    log::debug!(
                        "metrics endpoint: {peer} refused: {} connections open",
                        self.limits.max_conns
                    );
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let now = Instant::now();
            let mut c = Conn {
                id: self.next_id,
                stream,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                written: 0,
                head_started: None,
                last_active: now,
                last_write_progress: now,
                close_after: false,
                awaiting: Default::default(),
                interest: Interest::READABLE,
            };
            self.next_id += 1;
            if let Err(e) = reg.add(
                &mut c.stream,
                Token(self.base + 1 + slot),
                Interest::READABLE,
            ) {
                log::warn!("metrics endpoint: cannot register a connection: {e}");
                continue;
            }
            self.conns[slot] = Some(c);
        }
    }

    /// After any change to a connection: close it, or update what we wait for.
    fn settle(&mut self, reg: &mut dyn Registrar, slot: usize, close: bool) {
        let Some(Some(c)) = self.conns.get_mut(slot) else {
            return;
        };
        let done = c.close_after && c.written >= c.wbuf.len() && c.awaiting.is_empty();
        if close || done {
            if let Some(mut c) = self.conns[slot].take() {
                let _ = reg.remove(&mut c.stream);
            }
            return;
        }
        let want_write = c.written < c.wbuf.len();
        let want_read = !c.close_after && c.wbuf.len() - c.written < MAX_PENDING_OUT;
        let interest = match (want_read, want_write) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (false, true) => Interest::WRITABLE,
            // Nothing to write and no reading wanted: wait for the caller's answer; keep
            // readable so a hang-up is still noticed.
            _ => Interest::READABLE,
        };
        if interest != c.interest {
            c.interest = interest;
            if let Err(e) = reg.change(&mut c.stream, Token(self.base + 1 + slot), interest) {
                log::warn!("metrics endpoint: cannot re-register a connection: {e}");
            }
        }
    }
}

/// Read what is there and parse complete heads into `out`; returns true to close now.
fn read_requests(c: &mut Conn, limits: &Limits, out: &mut Vec<Request>) -> bool {
    let mut buf = [0u8; 4096];
    let mut eof = false;
    let mut answered = 0;
    // Reading stops at the head limit; parsing may free room, and what is still in the
    // socket would never raise another (edge-triggered) event: read again until drained.
    let mut drained = false;
    while !drained && !c.close_after {
        loop {
            if c.close_after || c.rbuf.len() > limits.max_head {
                break;
            }
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    drained = true;
                    break;
                }
                Ok(n) => {
                    c.last_active = Instant::now();
                    if c.head_started.is_none() {
                        c.head_started = Some(c.last_active);
                    }
                    c.rbuf.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        while !c.close_after && !c.rbuf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let parsed = req.parse(&c.rbuf);
            let reject = |c: &mut Conn, status: u16, why: &str| {
                write_response(&mut c.wbuf, &Response::text(status, why), false, true);
                c.close_after = true;
                c.rbuf.clear();
            };
            match parsed {
                Ok(httparse::Status::Partial) => {
                    if c.rbuf.len() > limits.max_head {
                        reject(c, 431, "request head too large");
                    }
                    break;
                }
                Err(httparse::Error::TooManyHeaders) => {
                    reject(c, 431, "too many request headers");
                    break;
                }
                Err(e) => {
                    reject(c, 400, &format!("bad request: {e}"));
                    break;
                }
                Ok(httparse::Status::Complete(n)) => {
                    if n > limits.max_head {
                        reject(c, 431, "request head too large");
                        break;
                    }
                    let method = req.method.unwrap_or("");
                    let version = req.version.unwrap_or(0);
                    let header = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
                    };
                    let has_body = header("transfer-encoding").is_some()
                        || header("content-length").is_some_and(|v| v != "0");
                    if has_body {
                        reject(c, 400, "request bodies are not accepted");
                        break;
                    }
                    if method != "GET" && method != "HEAD" {
                        write_response(
                            &mut c.wbuf,
                            &Response::text(405, "only GET and HEAD"),
                            false,
                            true,
                        );
                        c.close_after = true;
                        c.rbuf.clear();
                        break;
                    }
                    let conn_hdr = header("connection")
                        .unwrap_or_default()
                        .to_ascii_lowercase();
                    let keep = if version == 0 {
                        conn_hdr.contains("keep-alive")
                    } else {
                        !conn_hdr.contains("close")
                    };
                    let path = req.path.unwrap_or("/");
                    let path = path.split(['?', '#']).next().unwrap_or("/").to_string();
                    out.push(Request {
                        conn: c.id,
                        head: method == "HEAD",
                        path,
                        accept: header("accept").unwrap_or_default(),
                    });
                    answered += 1;
                    c.rbuf.drain(..n);
                    c.head_started = (!c.rbuf.is_empty()).then_some(Instant::now());
                    let last = answered >= MAX_PIPELINE;
                    c.awaiting.push_back(keep && !last);
                    if !keep || last {
                        c.close_after = true;
                        c.rbuf.clear();
                    }
                }
            }
        }
    }
    if eof {
        // The peer will send nothing more: answer what it asked, then close.
        c.close_after = true;
        if c.awaiting.is_empty() && c.written >= c.wbuf.len() {
            return true;
        }
    }
    if flush(c).is_err() {
        return true;
    }
    false
}

fn write_response(out: &mut Vec<u8>, resp: &Response, head: bool, close: bool) {
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    if resp.status == 405 {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head {
        out.extend_from_slice(&resp.body);
    }
}

/// Write what is pending; Err when the peer is gone.
fn flush(c: &mut Conn) -> io::Result<()> {
    while c.written < c.wbuf.len() {
        match c.stream.write(&c.wbuf[c.written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.written += n;
                c.last_write_progress = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.wbuf.clear();
    c.written = 0;
    c.last_active = Instant::now();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::io::{BufRead, BufReader};
    use std::net::TcpStream as StdStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A server on its own loop in a thread (tests only), answering /ok with 200 "ok".
    struct Running {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<usize>>,
    }

    impl Running {
        fn start(limits: Limits) -> Running {
            let mut server = HttpServer::bind("127.0.0.1:0", 100, limits).unwrap();
            let addr = server.local_addr();
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut poll = Poll::new().unwrap();
                let mut reg = poll.registry().try_clone().unwrap();
                server.register(&mut reg).unwrap();
                let mut events = Events::with_capacity(64);
                let mut max_open = 0;
                while !s2.load(Ordering::Relaxed) {
                    poll.poll(&mut events, Some(Duration::from_millis(20)))
                        .unwrap();
                    for ev in events.iter() {
                        if !server.owns(ev.token()) {
                            continue;
                        }
                        for r in server.on_ready(&mut reg, ev.token(), ev) {
                            let resp = match r.path.as_str() {
                                "/ok" => Response::text(200, format!("ok {}", r.accept)),
                                _ => Response::text(404, "not found"),
                            };
                            server.respond(&mut reg, r.conn, &resp, r.head);
                        }
                    }
                    server.on_tick(&mut reg, Instant::now());
                    max_open = max_open.max(server.open_connections());
                }
                max_open
            });
            Running {
                addr,
                stop,
                thread: Some(thread),
            }
        }

        fn finish(mut self) -> usize {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn connect(addr: SocketAddr) -> StdStream {
        let s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Read one response: status, headers (lowercase names), body.
    fn read_response(r: &mut BufReader<StdStream>) -> (u16, Vec<(String, String)>, String) {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (status, headers, String::from_utf8(body).unwrap())
    }

    fn closed(r: &mut BufReader<StdStream>) -> bool {
        // A close with unread input is a reset: closed as well.
        let mut rest = Vec::new();
        match r.read_to_end(&mut rest) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    #[test]
    fn keep_alive_pipelining_head_and_404() {
        let srv = Running::start(Limits::default());
        let mut s = connect(srv.addr);
        s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\nHEAD /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /nope?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let (st, _, body) = read_response(&mut r);
        assert_eq!((st, body.as_str()), (200, "ok text/plain\n"));
        // HEAD: the GET's headers (length of "ok \n"), no body.
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        let mut h = String::new();
        while h != "\r\n" {
            h.clear();
            r.read_line(&mut h).unwrap();
        }
        let (st, _, _) = read_response(&mut r);
        assert_eq!(st, 404);
        // Still open: one more request on the same connection.
        s.write_all(b"GET /ok HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (st, hs, _) = read_response(&mut r);
        assert_eq!(st, 200);
        assert!(hs.contains(&("connection".into(), "close".into())));
        assert!(closed(&mut r));
        srv.finish();
    }

    #[test]
    fn bad_request_line_is_400_and_closed() {
        let srv = Running::start(Limits::default());
        for junk in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /ok HTTP/9.9\r\n\r\n",
            b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
            b"GET /ok HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            let mut s = connect(srv.addr);
            s.write_all(junk).unwrap();
            let mut r = BufReader::new(s);
            let (st, _, _) = read_response(&mut r);
            assert_eq!(st, 400, "{junk:?}");
            assert!(closed(&mut r));
        }
        // Methods other than GET/HEAD, and bodies.
        let mut s = connect(srv.addr);
        s.write_all(b"DELETE /ok HTTP/1.1\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let (st, hs, _) = read_response(&mut r);
        assert_eq!(st, 405);
        assert!(hs.contains(&("allow".into(), "GET, HEAD".into())));
        let mut s = connect(srv.addr);
        s.write_all(b"GET /ok HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        let (st, _, _) = read_response(&mut BufReader::new(s));
        assert_eq!(st, 400);
        srv.finish();
    }

    #[test]
    fn oversized_head_is_431() {
        let srv = Running::start(Limits::default());
        // One huge header, sent without the final blank line: cut off at the limit.
        let mut s = connect(srv.addr);
        let mut req = b"GET /ok HTTP/1.1\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 64 * 1024));
        let _ = s.write_all(&req);
        let mut r = BufReader::new(s);
        let (st, _, _) = read_response(&mut r);
        assert_eq!(st, 431);
        assert!(closed(&mut r));
        // Too many headers.
        let mut s = connect(srv.addr);
        let mut req = b"GET /ok HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 5) {
            req.extend(format!("X-H{i}: v\r\n").bytes());
        }
        req.extend(b"\r\n");
        s.write_all(&req).unwrap();
        let (st, _, _) = read_response(&mut BufReader::new(s));
        assert_eq!(st, 431);
        srv.finish();
    }

    #[test]
    fn slowloris_is_cut_off_and_others_are_served_meanwhile() {
        let limits = Limits {
            head_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let srv = Running::start(limits);
        let mut slow = connect(srv.addr);
        slow.write_all(b"GET /ok HTTP/1.1\r\n").unwrap();
        let started = Instant::now();
        // Dribble header bytes; the deadline counts from the head's first byte, so dribbling
        // does not extend it.
        let mut r = BufReader::new(slow.try_clone().unwrap());
        let dribble = std::thread::spawn(move || {
            for _ in 0..40 {
                if slow.write_all(b"X-A: b\r\n").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // A normal client is served while the slow one dribbles.
        let mut s = connect(srv.addr);
        s.write_all(b"GET /ok HTTP/1.1\r\n\r\n").unwrap();
        let (st, _, _) = read_response(&mut BufReader::new(s));
        assert_eq!(st, 200);
        let (st, _, _) = read_response(&mut r);
        assert_eq!(st, 408);
        assert!(started.elapsed() < Duration::from_secs(4));
        let _ = dribble.join();
        // A connection that never sends anything is closed at the idle timeout, not before.
        srv.finish();
    }

    #[test]
    fn connections_are_bounded() {
        let limits = Limits {
            max_conns: 4,
            ..Limits::default()
        };
        let srv = Running::start(limits);
        let idle: Vec<StdStream> = (0..10).map(|_| connect(srv.addr)).collect();
        // Give the loop time to accept them all (the extra ones are closed at once).
        std::thread::sleep(Duration::from_millis(300));
        let mut refused = 0;
        for s in &idle {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut b = [0u8; 1];
            if let Ok(0) = (&*s).read(&mut b) {
                refused += 1;
            }
        }
        assert_eq!(refused, 6);
        drop(idle);
        // Once they are gone, new clients are served again.
        std::thread::sleep(Duration::from_millis(200));
        let mut s = connect(srv.addr);
        s.write_all(b"GET /ok HTTP/1.1\r\n\r\n").unwrap();
        let (st, _, _) = read_response(&mut BufReader::new(s));
        assert_eq!(st, 200);
        assert_eq!(srv.finish(), 4);
    }

    #[test]
    fn pipelined_heads_beyond_the_read_limit_are_all_answered() {
        let limits = Limits {
            head_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let srv = Running::start(limits);
        // Five requests of ~3 KiB each in one write: more than one read's worth of heads.
        let one = format!("GET /ok HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(3000));
        let mut s = connect(srv.addr);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(one.repeat(5).as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        for _ in 0..5 {
            let (st, _, _) = read_response(&mut r);
            assert_eq!(st, 200);
        }
        srv.finish();
    }

    #[test]
    fn http_1_0_closes_unless_keep_alive() {
        let srv = Running::start(Limits::default());
        let mut s = connect(srv.addr);
        s.write_all(b"GET /ok HTTP/1.0\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let (st, _, _) = read_response(&mut r);
        assert_eq!(st, 200);
        assert!(closed(&mut r));
        srv.finish();
    }
}
