//! UDP: sending samples with `sendmmsg`, and the raw receive limit with `recvmmsg`.

use crate::samples::Payloads;
use crate::stats::{now_ns, Pacer};
use crate::watch::Progress;
use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, MsgFlags, MultiHeaders,
    SockaddrStorage,
};
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Datagrams per `sendmmsg`/`recvmmsg` call.
pub const BATCH: usize = 64;
/// The receive buffer the collector asks for (crates/collector/src/sockets.rs), so the raw
/// receiver drops no more and no less than the daemon would for lack of buffer.
const RCVBUF: usize = 8 << 20;

/// What a sender did.
pub struct Sent {
    pub sent: u64,
    /// Datagrams the kernel refused (e.g. ECONNREFUSED: nobody listening).
    pub failed: u64,
    /// Wall-clock ns per sequence number when its `sendmmsg` call began (0: not sent).
    pub send_ns: Vec<i64>,
    pub first_ns: i64,
    pub last_ns: i64,
}

/// A socket connected to `to`, so `sendmmsg` needs no addresses.
pub fn connect(to: SocketAddr) -> Result<UdpSocket> {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(bind).context("bind sender socket")?;
    sock.connect(to)
        .with_context(|| format!("connect to {to}"))?;
    // A larger send buffer lets one call queue a whole batch without blocking part-way.
    let _ = setsockopt(&sock, sockopt::SndBuf, &(4 << 20));
    Ok(sock)
}

/// Send samples `0..count` over connected sockets, flat out or paced at `rate` per second,
/// publishing progress for a watcher. Each `sendmmsg` call goes out on the next socket in
/// turn, so `socks.len()` sockets look like as many publishers (distinct source ports).
pub fn send(
    socks: &[UdpSocket],
    payloads: &Payloads,
    count: usize,
    rate: Option<f64>,
    progress: &Progress,
) -> Sent {
    let fds: Vec<_> = socks.iter().map(|s| s.as_raw_fd()).collect();
    let mut call = 0usize;
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let addrs: Vec<Option<SockaddrStorage>> = vec![None; BATCH];
    let pacer = Pacer::new(rate);
    let chunk = pacer.chunk(BATCH);
    let mut out = Sent {
        sent: 0,
        failed: 0,
        send_ns: vec![0; count],
        first_ns: now_ns(),
        last_ns: 0,
    };
    let mut i = 0;
    while i < count {
        pacer.wait_for(i as u64);
        let n = chunk.min(count - i);
        let iovs: Vec<[IoSlice<'_>; 1]> = (i..i + n)
            .map(|k| [IoSlice::new(payloads.get(k))])
            .collect();
        let t = now_ns();
        let cmsgs: [ControlMessage<'_>; 0] = [];
        let fd = fds[call % fds.len().max(1)];
        call = call.wrapping_add(1);
        match sendmmsg(
            fd,
            &mut headers,
            &iovs,
            &addrs[..n],
            cmsgs,
            MsgFlags::empty(),
        ) {
            Ok(res) => {
                let done = res.count().max(1).min(n);
                for slot in &mut out.send_ns[i..i + done] {
                    *slot = t;
                }
                i += done;
                out.sent += done as u64;
                progress.sent.store(out.sent, Ordering::Release);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ENOBUFS | Errno::EAGAIN) => std::thread::sleep(Duration::from_micros(50)),
            Err(_) => {
                // The first datagram of the call failed (an ICMP error from an earlier one, or
                // a refused destination): count it and go on with the next.
                out.failed += 1;
                i += 1;
            }
        }
    }
    out.last_ns = now_ns();
    progress.done.store(true, Ordering::Release);
    out
}

/// Outcome of the raw receive limit.
pub struct RawUdp {
    pub sent: u64,
    pub received: u64,
    pub bytes: u64,
    pub first_send_ns: i64,
    pub last_recv_ns: i64,
    pub send_s: f64,
}

/// Bind `127.0.0.1:port`, receive into nothing with `recvmmsg` (or `recv` when `batch` is 1,
/// as a one-datagram-per-syscall loop does) while a thread of this process sends `count`
/// datagrams flat out with `sendmmsg`.
pub fn raw_limit(port: u16, payloads: &Payloads, count: usize, batch: usize) -> Result<RawUdp> {
    let rx = UdpSocket::bind(("127.0.0.1", port)).context("bind receiver")?;
    if setsockopt(&rx, sockopt::RcvBufForce, &RCVBUF).is_err() {
        let _ = setsockopt(&rx, sockopt::RcvBuf, &RCVBUF);
    }
    rx.set_read_timeout(Some(Duration::from_millis(300)))?;
    let to = rx.local_addr()?;
    let tx = connect(to)?;
    let progress = Progress::default();
    let batch = batch.clamp(1, BATCH);
    std::thread::scope(|scope| {
        let sender =
            scope.spawn(|| send(std::slice::from_ref(&tx), payloads, count, None, &progress));
        let (received, bytes, last_recv_ns) = receive(&rx, count as u64, batch, &progress);
        let sent = sender.join().expect("sender thread");
        Ok(RawUdp {
            sent: sent.sent,
            received,
            bytes,
            first_send_ns: sent.first_ns,
            last_recv_ns,
            send_s: (sent.last_ns - sent.first_ns) as f64 / 1e9,
        })
    })
}

fn receive(rx: &UdpSocket, want: u64, batch: usize, progress: &Progress) -> (u64, u64, i64) {
    let fd = rx.as_raw_fd();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(batch, None);
    let mut bufs = vec![vec![0u8; 65_536]; batch];
    let (mut received, mut bytes, mut last) = (0u64, 0u64, 0i64);
    while received < want {
        let got: Result<(u64, u64), Errno> = if batch == 1 {
            match rx.recv(&mut bufs[0]) {
                Ok(n) => Ok((1, n as u64)),
                Err(e) => Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        } else {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            recvmmsg(
                fd,
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            )
            .map(|res| res.fold((0, 0), |(c, b), m| (c + 1, b + m.bytes as u64)))
        };
        match got {
            Ok((c, b)) => {
                received += c;
                bytes += b;
                last = now_ns();
            }
            Err(Errno::EINTR) => {}
            // The read timeout: once the sender is done and the queue stays empty, what did
            // not arrive was dropped.
            Err(_) if progress.done.load(Ordering::Acquire) => break,
            Err(_) => {}
        }
    }
    (received, bytes, last)
}
