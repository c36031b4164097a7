//! Pipelined MessagePack-RPC `record_metering_data` calls.
//!
//! Each connection has a sender thread and a reader thread. The sender writes up to `depth`
//! requests ahead of their answers (a bounded channel of credits holds it back); the reader
//! takes the answers in order (the collector answers a connection's requests in the order it
//! received them), matches each with its send instant, and records send→ack: the collector
//! answers only after the request's samples are committed, so that is send→committed.
//! Requests are taken from one shared counter, so connections share the samples.

use crate::samples::Payloads;
use crate::stats::Pacer;
use anyhow::{anyhow, bail, Context, Result};
use meter::decode::{read_value, DecodeError, Limits};
use meter::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const METHOD: &str = "record_metering_data";

/// `[0, msgid, "record_metering_data", [[samples...]]]`, built around already-encoded samples.
pub fn encode_request(out: &mut Vec<u8>, msgid: u32, count: usize, samples: &[u8]) {
    out.push(0x94); // array of 4
    out.push(0x00); // type: request
    out.push(0xce); // uint32 msgid
    out.extend_from_slice(&msgid.to_be_bytes());
    out.push(0xa0 | METHOD.len() as u8); // fixstr
    out.extend_from_slice(METHOD.as_bytes());
    out.push(0x91); // params: one argument, the list of samples
    match count {
        0..=15 => out.push(0x90 | count as u8),
        16..=0xffff => {
            out.push(0xdc);
            out.extend_from_slice(&(count as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdd);
            out.extend_from_slice(&(count as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(samples);
}

/// One answer.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Ack {
    pub msgid: u64,
    pub error: bool,
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

pub fn parse_response(v: &Value) -> Result<Ack> {
    let Value::Array(items) = v else {
        bail!("response is not an array")
    };
    if items.len() != 4 || items[0] != Value::Int(1) {
        bail!("not a MessagePack-RPC response: {v:?}");
    }
    let msgid = match items[1] {
        Value::Int(i) if i >= 0 => i as u64,
        Value::UInt(u) => u,
        _ => bail!("bad msgid {:?}", items[1]),
    };
    let num = |k: &str| match items[3].get(k) {
        Some(Value::Int(i)) if *i >= 0 => *i as u64,
        _ => 0,
    };
    Ok(Ack {
        msgid,
        error: items[2] != Value::Nil,
        stored: num("stored"),
        duplicates: num("duplicates"),
        rejected: num("rejected"),
    })
}

pub struct RpcOptions {
    pub to: SocketAddr,
    pub count: usize,
    pub batch: usize,
    pub depth: usize,
    pub connections: usize,
    /// Samples per second over all connections; `None`: as fast as acks allow.
    pub rate: Option<f64>,
}

/// Totals over every connection.
#[derive(Default)]
pub struct RpcOutcome {
    pub requests: u64,
    pub samples: u64,
    pub acks: Vec<Ack>,
    /// Send→ack per request, ns.
    pub latency_ns: Vec<i64>,
    pub elapsed: Duration,
    pub errors: Vec<String>,
}

pub fn run(payloads: &Payloads, o: &RpcOptions) -> Result<RpcOutcome> {
    let batch = o.batch.max(1);
    let requests = o.count.div_ceil(batch);
    let next = AtomicUsize::new(0);
    let pacer = Pacer::new(o.rate.map(|r| r / batch as f64));
    let start = Instant::now();
    let mut total = RpcOutcome::default();
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..o.connections.max(1) {
            let stream =
                TcpStream::connect(o.to).with_context(|| format!("connect to {}", o.to))?;
            stream.set_nodelay(true)?;
            let (next, pacer) = (&next, &pacer);
            handles.push(scope.spawn(move || {
                connection(
                    stream,
                    payloads,
                    o.count,
                    batch,
                    o.depth.max(1),
                    requests,
                    next,
                    pacer,
                )
            }));
        }
        for h in handles {
            match h.join() {
                Ok(Ok(c)) => {
                    total.requests += c.requests;
                    total.samples += c.samples;
                    total.acks.extend(c.acks);
                    total.latency_ns.extend(c.latency_ns);
                    total.errors.extend(c.errors);
                }
                Ok(Err(e)) => total.errors.push(format!("{e:#}")),
                Err(_) => total.errors.push("connection thread panicked".into()),
            }
        }
        Ok(())
    })?;
    total.elapsed = start.elapsed();
    Ok(total)
}

#[allow(clippy::too_many_arguments)]
fn connection(
    stream: TcpStream,
    payloads: &Payloads,
    count: usize,
    batch: usize,
    depth: usize,
    requests: usize,
    next: &AtomicUsize,
    pacer: &Pacer,
) -> Result<RpcOutcome> {
    let mut reader = stream.try_clone()?;
    reader.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream;
    // Credits: the sender puts one in before each request, the reader takes one out per answer.
    let (credit_tx, credit_rx) = mpsc::sync_channel::<()>(depth);
    let (sent_tx, sent_rx) = mpsc::channel::<(u32, Instant, usize)>();
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> Result<(u64, u64)> {
            let mut buf = Vec::new();
            let (mut reqs, mut samples) = (0u64, 0u64);
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= requests {
                    break;
                }
                let range = k * batch..((k + 1) * batch).min(count);
                pacer.wait_for(k as u64);
                if credit_tx.send(()).is_err() {
                    break; // the reader failed
                }
                buf.clear();
                encode_request(
                    &mut buf,
                    k as u32,
                    range.len(),
                    payloads.concat(range.clone()),
                );
                let _ = sent_tx.send((k as u32, Instant::now(), range.len()));
                writer.write_all(&buf).context("send request")?;
                reqs += 1;
                samples += range.len() as u64;
            }
            Ok((reqs, samples))
        });
        let mut out = RpcOutcome::default();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        let mut chunk = vec![0u8; 1 << 16];
        let limits = Limits::default();
        let result = (|| -> Result<()> {
            while let Ok((msgid, at, _n)) = sent_rx.recv() {
                let v = loop {
                    match read_value(&buf, &limits) {
                        Ok((v, used)) => {
                            buf.drain(..used);
                            break v;
                        }
                        Err(DecodeError::Incomplete) => {}
                        Err(e) => bail!("undecodable response: {e}"),
                    }
                    let n = reader.read(&mut chunk).context("read response")?;
                    if n == 0 {
                        bail!("the collector closed the connection");
                    }
                    buf.extend_from_slice(&chunk[..n]);
                };
                let latency = at.elapsed().as_nanos() as i64;
                let ack = parse_response(&v)?;
                if ack.msgid != u64::from(msgid) {
                    return Err(anyhow!(
                        "answer {} arrived where {msgid} was due",
                        ack.msgid
                    ));
                }
                out.latency_ns.push(latency);
                out.acks.push(ack);
                let _ = credit_rx.recv();
            }
            Ok(())
        })();
        drop(credit_rx);
        if let Err(e) = result {
            out.errors.push(format!("{e:#}"));
            // Unblock and stop the sender.
            let _ = reader.shutdown(std::net::Shutdown::Both);
        }
        match sender.join() {
            Ok(Ok((r, s))) => {
                out.requests = r;
                out.samples = s;
            }
            Ok(Err(e)) => out.errors.push(format!("{e:#}")),
            Err(_) => out.errors.push("sender thread panicked".into()),
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_as_messagepack_rpc() {
        let p = Payloads::generate(20, "k");
        for n in [1usize, 15, 16, 20] {
            let mut buf = Vec::new();
            encode_request(&mut buf, 70_000, n, p.concat(0..n));
            let v = meter::decode_value(&buf).expect("decodes");
            let Value::Array(items) = &v else {
                panic!("not an array")
            };
            assert_eq!(items[0], Value::Int(0));
            assert_eq!(items[1], Value::Int(70_000));
            assert_eq!(items[2].as_str(), Some(METHOD));
            let Value::Array(params) = &items[3] else {
                panic!("params")
            };
            let Value::Array(samples) = &params[0] else {
                panic!("samples")
            };
            assert_eq!(samples.len(), n);
            assert!(meter::SigningKey::new("k").verify(&samples[n - 1]));
        }
    }

    #[test]
    fn responses_parse() {
        let m = |k: &str, v: i64| (Value::Str(k.into()), Value::Int(v));
        let v = Value::Array(vec![
            Value::Int(1),
            Value::Int(9),
            Value::Nil,
            Value::Map(vec![m("stored", 3), m("duplicates", 1), m("rejected", 0)]),
        ]);
        let a = parse_response(&v).unwrap();
        assert_eq!((a.msgid, a.error, a.stored, a.duplicates), (9, false, 3, 1));
    }
}
