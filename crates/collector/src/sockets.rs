//! The listening sockets, bound once by the launcher before any worker exists and inherited by
//! every worker across fork (DESIGN §1). Workers never bind.
//!
//! UDP comes in two shapes (`[collector] udp_reuseport`): one socket shared by every worker
//! ([`Listeners::udp`]), or a [`UdpGroup`] of one `SO_REUSEPORT` socket per worker slot, all on
//! the same address, among which the kernel spreads datagrams by a hash of their source and
//! destination (so one publisher's datagrams always reach the same socket).

use crate::config::Config;
use std::io;
use std::net::{TcpListener, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

/// The kernel's UDP receive buffer we ask for: bursts from many compute nodes arrive at once,
/// and a datagram that finds the buffer full is lost without a trace but a counter.
const UDP_RCVBUF: usize = 8 << 20;

#[derive(Debug, Default)]
pub struct Listeners {
    pub udp: Option<UdpSocket>,
    pub tcp: Option<TcpListener>,
    pub rpc: Option<TcpListener>,
    pub unix: Option<UnixListener>,
    /// The Unix socket's path, removed when the launcher exits.
    pub unix_path: Option<PathBuf>,
}

/// Where each listener is, for comparing configs on reload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Addresses {
    pub udp: Option<String>,
    pub tcp: Option<String>,
    pub rpc: Option<String>,
    pub unix: Option<String>,
}

impl Addresses {
    pub fn of(cfg: &Config) -> Addresses {
        let c = &cfg.collector;
        let hp = |a: &str, p: u16| (!a.is_empty()).then(|| host_port(a, p));
        Addresses {
            udp: hp(&c.udp_address, c.udp_port),
            tcp: hp(&c.tcp_address, c.tcp_port),
            rpc: hp(&c.rpc_address, c.rpc_port),
            unix: (!c.rpc_socket.is_empty()).then(|| c.rpc_socket.clone()),
        }
    }
}

fn host_port(addr: &str, port: u16) -> String {
    if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot bind {what} on {addr}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: String,
    pub source: io::Error,
}

fn resolve(addr: &str, what: &'static str) -> Result<std::net::SocketAddr, BindError> {
    addr.to_socket_addrs()
        .and_then(|mut it| {
            it.next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
        })
        .map_err(|source| BindError {
            what,
            addr: addr.to_string(),
            source,
        })
}

impl Listeners {
    /// Bind what `addrs` names, reusing any socket of `old` whose address did not change (a
    /// reload must not close a socket that clients are sending to).
    pub fn bind(
        addrs: &Addresses,
        old: Option<(&Addresses, Listeners)>,
    ) -> Result<Listeners, BindError> {
        let (old_addrs, mut old) = match old {
            Some((a, l)) => (a.clone(), l),
            None => (Addresses::default(), Listeners::default()),
        };
        let mut out = Listeners::default();
        if let Some(a) = &addrs.udp {
            out.udp = match old.udp.take() {
                Some(s) if old_addrs.udp.as_ref() == Some(a) => Some(s),
                _ => Some(bind_udp(a)?),
            };
        }
        if let Some(a) = &addrs.tcp {
            out.tcp = match old.tcp.take() {
                Some(s) if old_addrs.tcp.as_ref() == Some(a) => Some(s),
                _ => Some(bind_tcp(a, "the ceilometer tcp:// listener")?),
            };
        }
        if let Some(a) = &addrs.rpc {
            out.rpc = match old.rpc.take() {
                Some(s) if old_addrs.rpc.as_ref() == Some(a) => Some(s),
                _ => Some(bind_tcp(a, "the RPC listener")?),
            };
        }
        if let Some(p) = &addrs.unix {
            match old.unix.take() {
                Some(s) if old_addrs.unix.as_ref() == Some(p) => {
                    out.unix = Some(s);
                    out.unix_path = old.unix_path.take();
                }
                _ => {
                    out.unix = Some(bind_unix(p)?);
                    out.unix_path = Some(PathBuf::from(p));
                }
            }
        }
        // Whatever of `old` was not reused closes here; a Unix path no longer used goes too.
        if let Some(p) = old.unix_path.take() {
            if old.unix.is_some() {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(out)
    }

    /// Duplicate every socket (for handing to a worker while the launcher keeps its own).
    pub fn try_clone(&self) -> io::Result<Listeners> {
        Ok(Listeners {
            udp: self.udp.as_ref().map(|s| s.try_clone()).transpose()?,
            tcp: self.tcp.as_ref().map(|s| s.try_clone()).transpose()?,
            rpc: self.rpc.as_ref().map(|s| s.try_clone()).transpose()?,
            unix: self.unix.as_ref().map(|s| s.try_clone()).transpose()?,
            unix_path: None,
        })
    }

    /// Local addresses actually bound (port 0 resolved), for logs and tests.
    pub fn describe(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(Ok(a)) = self.udp.as_ref().map(|s| s.local_addr()) {
            v.push(format!("udp {a}"));
        }
        if let Some(Ok(a)) = self.tcp.as_ref().map(|s| s.local_addr()) {
            v.push(format!("tcp {a}"));
        }
        if let Some(Ok(a)) = self.rpc.as_ref().map(|s| s.local_addr()) {
            v.push(format!("rpc {a}"));
        }
        if let Some(p) = &self.unix_path {
            v.push(format!("rpc unix:{}", p.display()));
        }
        v
    }

    pub fn remove_unix_path(&mut self) {
        if let Some(p) = self.unix_path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bind_udp(a: &str) -> Result<UdpSocket, BindError> {
    let addr = resolve(a, "UDP")?;
    let s = UdpSocket::bind(addr).map_err(|source| BindError {
        what: "UDP",
        addr: a.to_string(),
        source,
    })?;
    udp_options(&s).map_err(|source| BindError {
        what: "UDP",
        addr: a.to_string(),
        source,
    })?;
    Ok(s)
}

/// Non-blocking, and the receive buffer we want.
fn udp_options(s: &UdpSocket) -> io::Result<()> {
    s.set_nonblocking(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max unless we are privileged.
    let size = UDP_RCVBUF as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        if setsockopt_int(s, opt, size).is_ok() {
            break;
        }
    }
    Ok(())
}

fn setsockopt_int(s: &impl AsRawFd, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is a valid socket borrowed for the call; the option value points at a
    // live c_int of the length given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A UDP socket with `SO_REUSEPORT` set before `bind`, so more sockets can join its address.
/// Close-on-exec like every socket std makes: workers do not exec, they inherit it by fork.
fn bind_udp_reuseport(addr: std::net::SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        nix::sys::socket::AddressFamily::Inet
    } else {
        nix::sys::socket::AddressFamily::Inet6
    };
    let fd = nix::sys::socket::socket(
        domain,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReusePort, &true)?;
    let sa = nix::sys::socket::SockaddrStorage::from(addr);
    nix::sys::socket::bind(fd.as_raw_fd(), &sa)?;
    let s = UdpSocket::from(fd);
    udp_options(&s)?;
    Ok(s)
}

/// One `SO_REUSEPORT` UDP socket per worker slot, all bound to one address.
///
/// The launcher holds every socket for its whole life, so a worker that dies and is respawned
/// gets the same socket back (what the kernel queued for it meanwhile is read by its successor)
/// and the group's size, and with it the kernel's source-to-socket hash, does not change when
/// workers come and go. It changes only with the number of workers: [`UdpGroup::resize`] binds
/// sockets for new slots and lets go of the launcher's copies of surplus ones (a surplus socket
/// leaves the group when the worker that still holds it has drained it and exited).
#[derive(Debug, Default)]
pub struct UdpGroup {
    /// The configured address (`host:port`), to compare on reload.
    addr: Option<String>,
    /// Socket `i` serves worker slot `i`.
    sockets: Vec<UdpSocket>,
}

impl UdpGroup {
    /// Bind `n` sockets (at least one) to `a`. With port 0, the first socket's port (chosen by
    /// the kernel) is where the others go.
    pub fn bind(a: &str, n: usize) -> Result<UdpGroup, BindError> {
        let mut g = UdpGroup {
            addr: Some(a.to_string()),
            sockets: Vec::new(),
        };
        let first = resolve(a, "UDP")?;
        let s = bind_udp_reuseport(first).map_err(|source| BindError {
            what: "UDP (SO_REUSEPORT)",
            addr: a.to_string(),
            source,
        })?;
        g.sockets.push(s);
        g.resize(n)?;
        Ok(g)
    }

    /// The configured address, if bound.
    pub fn addr(&self) -> Option<&str> {
        self.addr.as_deref()
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The address the sockets are bound to (port 0 resolved).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.sockets.first().and_then(|s| s.local_addr().ok())
    }

    /// Bind or let go of sockets so there is one per slot `0..n` (at least one). On a bind
    /// error the group keeps the sockets it has (the slots beyond share, see
    /// [`socket_for`](Self::socket_for)).
    pub fn resize(&mut self, n: usize) -> Result<(), BindError> {
        let n = n.max(1);
        self.sockets.truncate(n);
        let Some(local) = self.local_addr() else {
            return Ok(());
        };
        while self.sockets.len() < n {
            let s = bind_udp_reuseport(local).map_err(|source| BindError {
                what: "UDP (SO_REUSEPORT)",
                addr: local.to_string(),
                source,
            })?;
            self.sockets.push(s);
        }
        Ok(())
    }

    /// The socket of worker slot `slot`; a slot without one of its own (a bind failed when
    /// the group grew) shares socket `slot % len` rather than leave datagrams unread.
    pub fn socket_for(&self, slot: usize) -> Option<&UdpSocket> {
        (!self.sockets.is_empty()).then(|| &self.sockets[slot % self.sockets.len()])
    }

    pub fn sockets(&self) -> &[UdpSocket] {
        &self.sockets
    }

    /// Close every socket (the launcher's copies; in a worker, the copies fork gave it).
    pub fn clear(&mut self) {
        self.sockets.clear();
        self.addr = None;
    }
}

fn bind_tcp(a: &str, what: &'static str) -> Result<TcpListener, BindError> {
    let addr = resolve(a, what)?;
    // std sets SO_REUSEADDR on Unix, so a restart does not wait out TIME_WAIT.
    let s = TcpListener::bind(addr).map_err(|source| BindError {
        what,
        addr: a.to_string(),
        source,
    })?;
    s.set_nonblocking(true).map_err(|source| BindError {
        what,
        addr: a.to_string(),
        source,
    })?;
    Ok(s)
}

fn bind_unix(p: &str) -> Result<UnixListener, BindError> {
    let err = |source| BindError {
        what: "the RPC Unix socket",
        addr: p.to_string(),
        source,
    };
    if let Some(dir) = std::path::Path::new(p).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
    }
    // A socket file left by a dead daemon refuses connections; replace it. A live one answers.
    if std::os::unix::net::UnixStream::connect(p).is_ok() {
        return Err(err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is serving this socket",
        )));
    }
    let _ = std::fs::remove_file(p);
    let s = UnixListener::bind(p).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    /// Send one datagram from each of `n` fresh source ports; return which sockets of the
    /// group got one (by index), read until every datagram arrived or a second passed.
    fn spread(group: &UdpGroup, n: usize) -> Vec<usize> {
        let to = group.local_addr().unwrap();
        let senders: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for s in &senders {
            s.send_to(b"x", to).unwrap();
        }
        let mut got = vec![0; group.len()];
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = [0u8; 16];
        while got.iter().sum::<usize>() < n && Instant::now() < deadline {
            for (i, s) in group.sockets().iter().enumerate() {
                while s.recv(&mut buf).is_ok() {
                    got[i] += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn a_group_on_port_0_binds_every_socket_to_the_first_ones_port() {
        let g = UdpGroup::bind("127.0.0.1:0", 3).unwrap();
        assert_eq!(g.len(), 3);
        let port = g.local_addr().unwrap().port();
        assert_ne!(port, 0);
        let ports: BTreeSet<u16> = g
            .sockets()
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports, BTreeSet::from([port]));
        assert_eq!(g.addr(), Some("127.0.0.1:0"));
    }

    #[test]
    fn the_kernel_spreads_many_publishers_over_the_group() {
        let g = UdpGroup::bind("127.0.0.1:0", 2).unwrap();
        let got = spread(&g, 64);
        assert_eq!(got.iter().sum::<usize>(), 64);
        // 64 source ports over 2 sockets: each gets some (all on one: p = 2^-63).
        assert!(got.iter().all(|n| *n > 0), "{got:?}");
    }

    #[test]
    fn resizing_keeps_the_port_and_a_released_socket_leaves_the_group() {
        let mut g = UdpGroup::bind("127.0.0.1:0", 3).unwrap();
        let port = g.local_addr().unwrap().port();
        g.resize(1).unwrap();
        assert_eq!(g.len(), 1);
        // Sockets 1 and 2 are closed: every datagram reaches the one left.
        assert_eq!(spread(&g, 32), vec![32]);
        g.resize(4).unwrap();
        assert_eq!(g.len(), 4);
        assert!(g
            .sockets()
            .iter()
            .all(|s| s.local_addr().unwrap().port() == port));
        assert_eq!(spread(&g, 64).iter().sum::<usize>(), 64);
        // A zero count still keeps one socket: a group is never left without a reader.
        g.resize(0).unwrap();
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn a_slot_beyond_the_group_shares_a_socket_instead_of_none() {
        let g = UdpGroup::bind("127.0.0.1:0", 2).unwrap();
        let fd = |s: Option<&UdpSocket>| s.map(|s| s.as_raw_fd());
        assert_eq!(fd(g.socket_for(3)), fd(g.socket_for(1)));
        assert_eq!(fd(g.socket_for(2)), fd(g.socket_for(0)));
        assert!(UdpGroup::default().socket_for(0).is_none());
    }

    #[test]
    fn group_sockets_are_close_on_exec() {
        let g = UdpGroup::bind("127.0.0.1:0", 2).unwrap();
        for s in g.sockets() {
            // SAFETY: fcntl(F_GETFD) on a descriptor we own.
            let flags = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFD) };
            assert!(flags & libc::FD_CLOEXEC != 0);
        }
    }

    #[test]
    fn a_shared_socket_and_a_group_cannot_share_a_port() {
        // Why `udp_reuseport` needs a restart: the old kind of socket holds the port.
        let shared = bind_udp("127.0.0.1:0").unwrap();
        let a = shared.local_addr().unwrap().to_string();
        assert!(UdpGroup::bind(&a, 2).is_err());
    }
}
