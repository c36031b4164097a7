//! ceilometer's `tcp://` publisher from many clients: each sample is an 8-byte little-endian
//! length and that many bytes of msgpack (crates/collector/src/source/tcp.rs), and no reply.
//! One connection (and one thread) per client, as many compute nodes each keep their own.

use crate::samples::Payloads;
use crate::stats::{now_ns, Pacer};
use crate::udp::Sent;
use crate::watch::Progress;
use anyhow::{Context, Result};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;

/// What one client's thread did: samples sent, samples not sent (the connection broke), the
/// send time of each sample it sent, and its connection.
struct ClientRun {
    sent: u64,
    failed: u64,
    times: Vec<(usize, i64)>,
    stream: TcpStream,
}

/// Frames per `write` call (as a publisher that buffers a polling cycle's samples would).
pub const BATCH: usize = 64;

/// Send samples `0..count` over `clients` connections to `to`, client `k` sending the samples
/// `k, k + clients, ...`, flat out or paced at `rate` per second in all. Returns what was sent
/// and the open connections: drop them once the collector has read everything (closing is
/// harmless for the frames already sent, but keeping them open keeps the run's shape).
pub fn send(
    to: SocketAddr,
    clients: usize,
    payloads: &Payloads,
    count: usize,
    rate: Option<f64>,
    progress: &Progress,
) -> Result<(Sent, Vec<TcpStream>)> {
    let clients = clients.max(1);
    let streams = (0..clients)
        .map(|k| {
            let s =
                TcpStream::connect(to).with_context(|| format!("client {k}: connect to {to}"))?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let first_ns = now_ns();
    let per_client = rate.map(|r| r / clients as f64);
    let results: Vec<ClientRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(k, mut s)| {
                scope.spawn(move || {
                    let pacer = Pacer::new(per_client);
                    let chunk = pacer.chunk(BATCH);
                    let mine: Vec<usize> = (k..count).step_by(clients).collect();
                    let mut times = Vec::with_capacity(mine.len());
                    let (mut sent, mut failed) = (0u64, 0u64);
                    let mut buf = Vec::new();
                    let mut j = 0;
                    while j < mine.len() {
                        pacer.wait_for(j as u64);
                        let n = chunk.min(mine.len() - j);
                        buf.clear();
                        for &i in &mine[j..j + n] {
                            let p = payloads.get(i);
                            buf.extend_from_slice(&(p.len() as u64).to_le_bytes());
                            buf.extend_from_slice(p);
                        }
                        let t = now_ns();
                        if s.write_all(&buf).is_err() {
                            // The collector closed the connection: the rest is not sent.
                            failed += (mine.len() - j) as u64;
                            break;
                        }
                        times.extend(mine[j..j + n].iter().map(|&i| (i, t)));
                        sent += n as u64;
                        progress.sent.fetch_add(n as u64, Ordering::Release);
                        j += n;
                    }
                    ClientRun {
                        sent,
                        failed,
                        times,
                        stream: s,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .collect()
    });
    progress.done.store(true, Ordering::Release);
    let mut out = Sent {
        sent: 0,
        failed: 0,
        send_ns: vec![0; count],
        first_ns,
        last_ns: now_ns(),
    };
    let mut open = Vec::with_capacity(results.len());
    for r in results {
        out.sent += r.sent;
        out.failed += r.failed;
        for (i, t) in r.times {
            out.send_ns[i] = t;
        }
        open.push(r.stream);
    }
    Ok((out, open))
}
