//! The listening sockets, bound once by the launcher before any worker exists and inherited by
//! every worker across fork (DESIGN §1). Workers never bind.

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
    s.set_nonblocking(true).map_err(|source| BindError {
        what: "UDP",
        addr: a.to_string(),
        source,
    })?;
    // Best effort: the kernel caps it at net.core.rmem_max unless we are privileged.
    let fd = s.as_raw_fd();
    let size = UDP_RCVBUF as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: fd is a valid socket we own; the option value points at a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
    }
    Ok(s)
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
