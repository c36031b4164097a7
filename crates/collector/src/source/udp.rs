//! UDP: one datagram is one MessagePack sample map (ceilometer's `udp://` publisher).

use super::{Intake, Throttle};
use crate::untrusted::untrusted;
use meter::ValueRef;
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use std::io;

/// Datagrams read in one turn of the loop; the rest wait for the next turn, so a flood on
/// the UDP socket cannot keep the loop from its connections, link and heartbeat.
const READ_BUDGET: usize = 256;

/// The worker's UDP socket: a clone of the launcher's, shared by all workers, or (with
/// `udp_reuseport`) this worker's own socket of the launcher's group.
pub struct UdpSource {
    sock: Option<UdpSocket>,
    /// Datagrams were left unread: because the batch was full (read again when there is
    /// room) or the turn's budget ran out (read again next turn).
    backlog: bool,
    /// Stopping, reading what is queued until the socket is empty (see [`UdpSource::drain`]).
    draining: bool,
    /// The socket was found empty while draining: close it.
    drained: bool,
    /// The receive buffer, as large as a datagram can be: allocated once, because zeroing
    /// 64 KiB on the stack for every readiness event cost more than the datagram's own
    /// receive when events come one datagram at a time (docs/performance.md).
    buf: Box<[u8]>,
    log: Throttle,
}

/// The largest UDP payload (IPv4: 65,535 minus the IP and UDP headers; IPv6 jumbograms aside).
const MAX_DATAGRAM: usize = 65536;

impl UdpSource {
    pub fn new(
        sock: Option<std::net::UdpSocket>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<UdpSource> {
        let mut sock = sock.map(UdpSocket::from_std);
        if let Some(s) = sock.as_mut() {
            registry.register(s, token, Interest::READABLE)?;
        }
        Ok(UdpSource {
            sock,
            backlog: false,
            draining: false,
            drained: false,
            buf: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
            log: Throttle::new(),
        })
    }

    /// Whether reading stopped for back-pressure with datagrams left to read.
    pub fn backlogged(&self) -> bool {
        self.backlog
    }

    /// Read datagrams until the socket is empty, the batch has no room or the turn's budget
    /// is spent.
    pub fn read(&mut self, intake: &mut Intake) {
        let buf = &mut self.buf[..];
        for _ in 0..READ_BUDGET {
            if !intake.can_accept() {
                self.backlog = true;
                return;
            }
            let Some(sock) = self.sock.as_ref() else {
                return;
            };
            match sock.recv_from(buf) {
                Ok((n, peer)) => {
                    intake.counters.udp_received += 1;
                    intake.counters.by_source.udp.bytes += n as u64;
                    match meter::decode::decode_value_ref(&buf[..n]) {
                        Ok(v) if matches!(v, ValueRef::Map(..)) => {
                            if intake.ingest(v, "udp") {
                                intake.add_bytes(n);
                            }
                            intake.flush_if_full();
                        }
                        Ok(_) => {
                            intake.counters.udp_malformed += 1;
                            self.log.log(log::Level::Warn, || {
                                format!("udp: datagram from {peer} is not a sample map")
                            });
                        }
                        Err(e) => {
                            intake.counters.udp_malformed += 1;
                            self.log.log(log::Level::Warn, || {
                                format!(
                                    "udp: malformed datagram from {peer} ({n} bytes): {}",
                                    untrusted(&e)
                                )
                            });
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.backlog = false;
                    self.drained = self.draining;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.log
                        .log(log::Level::Error, || format!("udp: receive failed: {e}"));
                    return;
                }
            }
        }
        self.backlog = true;
    }

    /// The worker is stopping and this socket may be its own (a SO_REUSEPORT socket the
    /// launcher let go of leaves the group when this process closes it): read what the kernel
    /// queued until the socket is empty, then [`close`](Self::close). What arrives between
    /// that read and the close is lost, a window of one system call instead of a receive
    /// buffer's worth.
    pub fn drain(&mut self) {
        if self.sock.is_some() {
            self.draining = true;
            self.backlog = true;
        }
    }

    /// Draining found the socket empty: time to close it.
    pub fn drained(&self) -> bool {
        self.drained && self.sock.is_some()
    }

    /// Whether the socket is closed (or there never was one).
    pub fn is_closed(&self) -> bool {
        self.sock.is_none()
    }

    /// Stop reading (the worker is stopping): the socket is deregistered and closed here;
    /// the other workers and the launcher keep their copies.
    pub fn close(&mut self, registry: &Registry) {
        if let Some(mut s) = self.sock.take() {
            let _ = registry.deregister(&mut s);
        }
        self.backlog = false;
        self.draining = false;
        self.drained = false;
    }
}
