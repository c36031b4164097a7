//! The control ("backdoor") socket, served by the launcher: one command line in, one JSON
//! document out per line, so `socat - UNIX-CONNECT:PATH` works as well as `collectorctl`.
//!
//! The socket is created mode 0600 and owned by the daemon's user; a peer whose uid
//! (SO_PEERCRED) is neither root nor the daemon's is answered with an error and closed. Bad
//! input (unknown commands, binary junk, over-long lines, a client that never reads) gets an
//! error line or a close and never blocks the launcher: every connection is non-blocking with
//! bounded buffers.

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Token};
use serde_json::{json, Value as Json};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use supervisor::SupervisorHandle;

/// What `help` lists.
pub const HELP: &[&str] = &[
    "help                 this list",
    "status               launcher and per-worker status",
    "stats                counters summed over workers",
    "config               effective configuration, secrets masked",
    "workers N            set the number of workers",
    "loglevel LEVEL       error|warn|info|debug|trace|off",
    "reload               re-read the config; answers once the new generation serves",
    "stop                 graceful stop",
    "worker ID            introspect one worker (slot index or pid)",
];

const LISTENER: Token = Token(1);
const FIRST_CONN: usize = 2;
const MAX_CONNS: usize = 64;
const MAX_LINE: usize = 64 * 1024;
/// Commands one client may send ahead of its answers; more closes it.
const MAX_PIPELINED: usize = 256;
const MAX_OUT: usize = 4 << 20;
const IDLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Help,
    Status,
    Stats,
    Config,
    Workers(usize),
    Loglevel(String),
    Reload,
    Stop,
    Worker(String),
    Invalid(String),
}

pub fn parse_request(line: &str) -> Request {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("").to_ascii_lowercase();
    let arg = words.next();
    let extra = words.next().is_some();
    let usage = |u: &str| Request::Invalid(format!("usage: {u}"));
    match (cmd.as_str(), arg, extra) {
        ("help", None, false) => Request::Help,
        ("status", None, false) => Request::Status,
        ("stats", None, false) => Request::Stats,
        ("config", None, false) => Request::Config,
        ("reload", None, false) => Request::Reload,
        ("stop", None, false) => Request::Stop,
        ("workers", Some(n), false) => match n.parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Request::Workers(n),
            _ => usage("workers N (1 to 1024)"),
        },
        ("workers", _, _) => usage("workers N (1 to 1024)"),
        ("loglevel", Some(l), false) => Request::Loglevel(l.to_string()),
        ("loglevel", _, _) => usage("loglevel error|warn|info|debug|trace|off"),
        ("worker", Some(id), false) => Request::Worker(id.to_string()),
        ("worker", _, _) => usage("worker ID"),
        ("help" | "status" | "stats" | "config" | "reload" | "stop", _, _) => {
            Request::Invalid(format!("{cmd} takes no arguments"))
        }
        _ => {
            let shown: String = line.chars().take(64).collect();
            Request::Invalid(format!("unknown command {shown:?}; try help"))
        }
    }
}

struct Conn {
    id: usize,
    stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    waiting: bool,
    close_when_flushed: bool,
    last_active: Instant,
    writable_registered: bool,
}

pub struct ControlServer {
    path: PathBuf,
    listener: Option<UnixListener>,
    slots: Vec<Option<Conn>>,
    by_id: HashMap<usize, usize>,
    next_id: usize,
    /// Requests read while their connection waited for an earlier answer.
    backlog: VecDeque<(usize, Request)>,
}

impl ControlServer {
    /// Bind the socket (replacing a stale one; refusing one that answers), mode 0600.
    pub fn bind(path: &str) -> Result<ControlServer, String> {
        let p = PathBuf::from(path);
        if let Some(dir) = p.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
        }
        if std::os::unix::net::UnixStream::connect(&p).is_ok() {
            return Err(format!(
                "control socket {path} is in use by a running collector"
            ));
        }
        let _ = std::fs::remove_file(&p);
        // Created with no permission for others from the start: no window where anyone can
        // connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(&p);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(|e| format!("cannot bind control socket {path}: {e}"))?;
        Ok(ControlServer {
            path: p,
            listener: Some(listener),
            slots: Vec::new(),
            by_id: HashMap::new(),
            next_id: 1,
            backlog: VecDeque::new(),
        })
    }

    /// Give the socket to the daemon's user before privileges are dropped.
    pub fn chown_to(&self, user: Option<&str>, group: Option<&str>) -> Result<(), String> {
        let uid = match user {
            Some(u) => Some(
                nix::unistd::User::from_name(u)
                    .ok()
                    .flatten()
                    .ok_or_else(|| format!("unknown user {u:?}"))?
                    .uid,
            ),
            None => None,
        };
        let gid = match group {
            Some(g) => Some(
                nix::unistd::Group::from_name(g)
                    .ok()
                    .flatten()
                    .ok_or_else(|| format!("unknown group {g:?}"))?
                    .gid,
            ),
            None => None,
        };
        // AT_SYMLINK_NOFOLLOW: a link planted at the path is changed itself, never what it
        // points to.
        nix::unistd::fchownat(
            None,
            &self.path,
            uid,
            gid,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("cannot chown {}: {e}", self.path.display()))
    }

    pub fn register(&mut self, sup: &mut SupervisorHandle<'_>) -> Result<(), String> {
        if let Some(l) = self.listener.as_mut() {
            sup.register_extra(l, LISTENER, Interest::READABLE)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn close(&mut self) {
        self.listener = None;
        self.slots.clear();
        let _ = std::fs::remove_file(&self.path);
    }

    pub fn set_waiting(&mut self, id: usize, waiting: bool) {
        if let Some(c) = self.conn_mut(id) {
            c.waiting = waiting;
        }
    }

    fn conn_mut(&mut self, id: usize) -> Option<&mut Conn> {
        let slot = *self.by_id.get(&id)?;
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Queue one JSON answer line for connection `id` (gone connections are ignored).
    pub fn reply(&mut self, id: usize, v: &Json) {
        let Some(c) = self.conn_mut(id) else { return };
        let mut line = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        line.push(b'\n');
        if c.wbuf.len() + line.len() > MAX_OUT {
            // A client that never reads: drop it rather than grow without bound.
            c.wbuf.clear();
            c.close_when_flushed = true;
            c.rbuf.clear();
            return;
        }
        c.wbuf.extend_from_slice(&line);
        let _ = flush(c);
    }

    /// Requests that became processable since the last call (after an earlier answer).
    pub fn take_backlog(&mut self) -> Vec<(usize, Request)> {
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        while let Some((id, r)) = self.backlog.pop_front() {
            match self.conn_mut(id) {
                Some(c) if c.waiting => keep.push_back((id, r)),
                Some(c) => {
                    c.waiting = matches!(r, Request::Reload | Request::Worker(_));
                    out.push((id, r));
                }
                None => {}
            }
        }
        self.backlog = keep;
        out
    }

    pub fn on_ready(
        &mut self,
        sup: &mut SupervisorHandle<'_>,
        token: Token,
        event: &mio::event::Event,
    ) -> Vec<(usize, Request)> {
        let mut requests = Vec::new();
        if token == LISTENER {
            self.accept(sup);
            return requests;
        }
        let Some(slot) = token.0.checked_sub(FIRST_CONN) else {
            return requests;
        };
        let Some(Some(c)) = self.slots.get_mut(slot) else {
            return requests;
        };
        let id = c.id;
        let mut close = false;
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            let mut buf = [0u8; 8192];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => {
                        c.last_active = Instant::now();
                        c.rbuf.extend_from_slice(&buf[..n]);
                        // Complete lines become requests at once, so what stays buffered is
                        // one unfinished line, which the cap bounds (before, a newline early
                        // in the buffer let the rest grow without limit).
                        take_lines(c, id, &mut requests, &mut self.backlog);
                        let queued = requests.iter().filter(|(i, _)| *i == id).count()
                            + self.backlog.iter().filter(|(i, _)| *i == id).count();
                        let error = if c.rbuf.len() > MAX_LINE {
                            Some(format!("line longer than {MAX_LINE} bytes"))
                        } else if queued > MAX_PIPELINED {
                            Some(format!(
                                "more than {MAX_PIPELINED} commands ahead of their answers"
                            ))
                        } else {
                            None
                        };
                        if let Some(error) = error {
                            let msg = json!({"ok": false, "error": error});
                            let mut line = msg.to_string().into_bytes();
                            line.push(b'\n');
                            c.wbuf.extend_from_slice(&line);
                            c.rbuf = Vec::new();
                            c.close_when_flushed = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
        }
        if let Some(Some(c)) = self.slots.get_mut(slot) {
            if flush(c).is_err() {
                close = true;
            }
            if c.close_when_flushed && c.wbuf.is_empty() {
                close = true;
            }
        }
        if close {
            self.close_conn(sup, slot);
        } else {
            self.update_interest(sup, slot);
        }
        requests
    }

    fn accept(&mut self, sup: &mut SupervisorHandle<'_>) {
        loop {
            let Some(l) = self.listener.as_ref() else {
                return;
            };
            let (mut stream, _) = match l.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            let cred =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
            let allowed = match &cred {
                // The daemon's user is whoever the launcher runs as now: after a privilege
                // drop that is `[service] user`, not the root that bound the socket.
                Ok(c) => c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw(),
                Err(_) => false,
            };
            if !allowed {
                let uid = cred
                    .map(|c| c.uid().to_string())
                    .unwrap_or_else(|_| "?".into());
                log::warn!("control socket: refused a client with uid {uid}");
                let _ = stream.write_all(
                    format!("{}\n", json!({"ok": false, "error": "permission denied"})).as_bytes(),
                );
                continue;
            }
            let slot = match self.slots.iter().position(Option::is_none) {
                Some(s) => s,
                None if self.slots.len() < MAX_CONNS => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
                None => {
                    let _ = stream.write_all(
                        format!(
                            "{}\n",
                            json!({"ok": false, "error": "too many control connections"})
                        )
                        .as_bytes(),
                    );
                    continue;
                }
            };
            if let Err(e) =
                sup.register_extra(&mut stream, Token(FIRST_CONN + slot), Interest::READABLE)
            {
                log::warn!("control socket: cannot register a client: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.by_id.insert(id, slot);
            self.slots[slot] = Some(Conn {
                id,
                stream,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                waiting: false,
                close_when_flushed: false,
                last_active: Instant::now(),
                writable_registered: false,
            });
        }
    }

    fn close_conn(&mut self, sup: &mut SupervisorHandle<'_>, slot: usize) {
        if let Some(mut c) = self.slots.get_mut(slot).and_then(Option::take) {
            let _ = sup.deregister_extra(&mut c.stream);
            self.by_id.remove(&c.id);
            let _ = c.stream.as_raw_fd();
        }
    }

    fn update_interest(&mut self, sup: &mut SupervisorHandle<'_>, slot: usize) {
        let Some(Some(c)) = self.slots.get_mut(slot) else {
            return;
        };
        let want_write = !c.wbuf.is_empty();
        if want_write != c.writable_registered {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if sup
                .reregister_extra(&mut c.stream, Token(FIRST_CONN + slot), interest)
                .is_ok()
            {
                c.writable_registered = want_write;
            }
        }
    }

    /// Flush pending answers, close finished and idle connections.
    pub fn on_tick(&mut self, sup: &mut SupervisorHandle<'_>) {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            let close = match self.slots[slot].as_mut() {
                Some(c) => {
                    let failed = flush(c).is_err();
                    failed
                        || (c.close_when_flushed && c.wbuf.is_empty())
                        || (!c.waiting && now.duration_since(c.last_active) > IDLE)
                }
                None => false,
            };
            if close {
                self.close_conn(sup, slot);
            } else {
                self.update_interest(sup, slot);
            }
        }
    }
}

/// Move every complete line of `c`'s buffer to `requests` (or to `backlog` while an earlier
/// request of the same client waits for its answer, so answers keep their order).
fn take_lines(
    c: &mut Conn,
    id: usize,
    requests: &mut Vec<(usize, Request)>,
    backlog: &mut VecDeque<(usize, Request)>,
) {
    while !c.close_when_flushed {
        let Some(nl) = c.rbuf.iter().position(|&b| b == b'\n') else {
            break;
        };
        let line: Vec<u8> = c.rbuf.drain(..=nl).collect();
        let req = match std::str::from_utf8(&line) {
            Ok(s) if s.trim().is_empty() => continue,
            Ok(s) => parse_request(s.trim()),
            Err(_) => Request::Invalid("command is not UTF-8 text; try help".into()),
        };
        if c.waiting
            || requests.iter().any(|(i, r): &(usize, Request)| {
                *i == id && matches!(r, Request::Reload | Request::Worker(_))
            })
        {
            backlog.push_back((id, req));
        } else {
            requests.push((id, req));
        }
    }
}

fn flush(c: &mut Conn) -> io::Result<()> {
    while !c.wbuf.is_empty() {
        match c.stream.write(&c.wbuf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.wbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse_request("status"), Request::Status);
        assert_eq!(parse_request("STATS"), Request::Stats);
        assert_eq!(parse_request("workers 3"), Request::Workers(3));
        assert!(matches!(parse_request("workers 0"), Request::Invalid(_)));
        assert!(matches!(parse_request("workers x"), Request::Invalid(_)));
        assert_eq!(
            parse_request("loglevel debug"),
            Request::Loglevel("debug".into())
        );
        assert_eq!(parse_request("worker 1"), Request::Worker("1".into()));
        assert!(matches!(parse_request("status now"), Request::Invalid(_)));
        match parse_request("drop tables") {
            Request::Invalid(m) => assert!(m.contains("unknown command"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
