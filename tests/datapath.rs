//! The worker data path end to end (issue 4): the built `collector` binary, real loopback
//! sockets, the real SQLite file.

use collector_e2e::*;
use meter::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn vector_bytes() -> Vec<(String, Vec<u8>, bool)> {
    // (message_id, bytes, is a full sample)
    vectors()
        .iter()
        .map(|e| {
            let m = &e["message"];
            let id = m["message_id"].as_str().unwrap_or("").to_string();
            let full = m.get("counter_type").is_some() && m.get("timestamp").is_some();
            (
                id,
                hex::decode(e["msgpack_hex"].as_str().unwrap()).unwrap(),
                full,
            )
        })
        .collect()
}

fn vector_setup() -> Setup {
    Setup {
        secret: "change this for valid signing".into(),
        ..Setup::default()
    }
}

#[test]
fn udp_stores_the_ceilometer_vectors_with_their_fields() {
    let d = Daemon::start(vector_setup());
    let vs = vector_bytes();
    let full: Vec<_> = vs.iter().filter(|v| v.2).collect();
    assert!(full.len() >= 4);
    send_udp(
        d.udp.unwrap(),
        &vs.iter().map(|v| v.1.clone()).collect::<Vec<_>>(),
    );
    assert_eq!(d.wait_samples(full.len() as i64, WAIT), full.len() as i64);
    let mut ids = d.message_ids();
    ids.sort();
    let mut want: Vec<String> = full.iter().map(|v| v.0.clone()).collect();
    want.sort();
    assert_eq!(ids, want);
    // Fields of vector 0, read back through collectorctl's storage path (SQL here).
    let v0 = &vectors()[0]["message"];
    let c = d.db();
    let (vol, ts): (f64, String) = c
        .query_row(
            "SELECT s.volume, strftime('%Y-%m-%dT%H:%M:%S', s.timestamp / 1000000, 'unixepoch') FROM sample s WHERE s.message_id = ?1",
            [v0["message_id"].as_str().unwrap()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("vector 0 stored");
    assert_eq!(vol, v0["counter_volume"].as_f64().unwrap());
    assert_eq!(ts, "2026-11-01T00:00:00");
}

#[test]
fn tampered_or_wrongly_signed_samples_are_rejected() {
    let d = Daemon::start(Setup::default());
    let good = sample("good-1", SECRET);
    let wrong_secret = sample("wrong-secret", "not-the-secret");
    let mut tampered = sample("tampered", SECRET);
    if let Value::Map(pairs) = &mut tampered {
        for (k, v) in pairs.iter_mut() {
            if k.as_str() == Some("counter_volume") {
                *v = Value::Int(999_999);
            }
        }
    }
    send_udp(
        d.udp.unwrap(),
        &[encode(&wrong_secret), encode(&tampered), encode(&good)],
    );
    assert_eq!(d.wait_samples(1, WAIT), 1);
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let r = c
        .call(vec![sample("good-2", SECRET), sample("bad-2", "nope")])
        .unwrap();
    assert_eq!((r.stored, r.rejected, r.duplicates), (1, 1, 0), "{r:?}");
    let mut ids = d.message_ids();
    ids.sort();
    assert_eq!(ids, vec!["good-1", "good-2"]);
    assert!(
        d.log_count("invalid signature on sample wrong-secret") >= 1
            || d.log_count("invalid signature") >= 2
    );
}

#[test]
fn tcp_framing_of_ceilometer_publisher() {
    let d = Daemon::start(vector_setup());
    let vs = vector_bytes();
    let mut s = TcpStream::connect(d.tcp.unwrap()).unwrap();
    let mut all = Vec::new();
    for (_, b, _) in &vs {
        all.extend_from_slice(&(b.len() as u64).to_le_bytes());
        all.extend_from_slice(b);
    }
    // Split across writes at awkward places.
    for chunk in all.chunks(7) {
        s.write_all(chunk).unwrap();
    }
    let full = vs.iter().filter(|v| v.2).count() as i64;
    assert_eq!(d.wait_samples(full, WAIT), full);
    // Junk closes that connection only; a new one still works.
    s.write_all(&(100u64 << 20).to_le_bytes()).unwrap();
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "oversize frame must close the connection"
    );
    let mut s2 = TcpStream::connect(d.tcp.unwrap()).unwrap();
    s2.write_all(&tcp_frame(&sample(
        "after-junk",
        "change this for valid signing",
    )))
    .unwrap();
    assert_eq!(d.wait_samples(full + 1, WAIT), full + 1);
}

#[test]
fn rpc_batches_of_1_1000_10000_and_replay() {
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let mut total = 0;
    for (n, tag) in [(1, "a"), (1000, "b"), (10_000, "c")] {
        let batch: Vec<Value> = (0..n)
            .map(|i| sample(&format!("{tag}-{i}"), SECRET))
            .collect();
        let r = c.call(batch.clone()).unwrap();
        assert_eq!(r.error, None);
        assert_eq!((r.stored, r.duplicates, r.rejected), (n as i64, 0, 0));
        total += n as i64;
        // Acked means stored: the rows are there now, without waiting.
        assert_eq!(d.count_samples(), total);
        // A replay stores nothing twice.
        let r = c.call(batch).unwrap();
        assert_eq!((r.stored, r.duplicates, r.rejected), (0, n as i64, 0));
        assert_eq!(d.count_samples(), total);
    }
}

#[test]
fn rpc_pipelined_requests_are_answered_in_order() {
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let ids: Vec<u64> = (0..50)
        .map(|i| {
            c.send(vec![
                sample(&format!("p-{i}"), SECRET),
                sample(&format!("p-{i}-b"), SECRET),
            ])
            .unwrap()
        })
        .collect();
    for id in ids {
        let r = c.recv().unwrap();
        assert_eq!(r.msgid, id);
        assert_eq!(r.stored, 2);
    }
    assert_eq!(d.count_samples(), 100);
}

/// Connections paused because the worker's batches are full are resumed in turn, not always
/// from the first slot. Each connection pipelines calls larger than a batch and than one
/// read, so the worker pauses reading them between reads while its writer is busy; a worker
/// that always resumed slot 0 first answered the connections one after the other (the last
/// one waited for all the others: seconds at a real load). No connection may get all its
/// answers before every other has had its first.
#[test]
fn paused_rpc_connections_are_resumed_in_turn() {
    const CONNS: usize = 4;
    const CALLS: usize = 30;
    const PER_CALL: usize = 300;
    let d = Daemon::start(Setup::default().collector("batch_size = 100"));
    let addr = d.rpc.unwrap();
    let clients: Vec<RpcClient> = (0..CONNS)
        .map(|_| RpcClient::connect(addr).unwrap())
        .collect();
    // Each connection sends from a thread of its own (all compete for the worker at once) and
    // is read from another, which notes the order answers arrive in over all connections.
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = std::sync::Arc::new(std::sync::Barrier::new(CONNS));
    let mut threads = Vec::new();
    for (c, mut client) in clients.into_iter().enumerate() {
        let mut out = client.stream.try_clone().unwrap();
        let start = start.clone();
        threads.push(std::thread::spawn(move || {
            start.wait();
            for j in 0..CALLS {
                let samples = (0..PER_CALL)
                    .map(|k| sample(&format!("turn-{c}-{j}-{k}"), SECRET))
                    .collect();
                out.write_all(&rpc_request(j as u64 + 1, samples)).unwrap();
            }
        }));
        let order = order.clone();
        threads.push(std::thread::spawn(move || {
            for _ in 0..CALLS {
                let r = client.recv().unwrap();
                assert_eq!(r.stored as usize, PER_CALL, "{r:?}");
                order.lock().unwrap().push(c);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let order = order.lock().unwrap();
    assert_eq!(order.len(), CONNS * CALLS);
    let first = |c: usize| order.iter().position(|&x| x == c).unwrap();
    let last = |c: usize| order.iter().rposition(|&x| x == c).unwrap();
    let latest_first = (0..CONNS).map(first).max().unwrap();
    let earliest_last = (0..CONNS).map(last).min().unwrap();
    assert!(
        latest_first < earliest_last,
        "a connection got all its answers (by answer {earliest_last}) before another got its \
         first (answer {latest_first}): {order:?}"
    );
    assert_eq!(d.count_samples(), (CONNS * CALLS * PER_CALL) as i64);
}

#[test]
fn rpc_100_concurrent_connections() {
    let d = Daemon::start(Setup::default().workers(2));
    let addr = d.rpc.unwrap();
    let handles: Vec<_> = (0..100)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = RpcClient::connect(addr).unwrap();
                for j in 0..5 {
                    let r = c
                        .call(
                            (0..10)
                                .map(|k| sample(&format!("c{t}-{j}-{k}"), SECRET))
                                .collect(),
                        )
                        .unwrap();
                    assert_eq!(r.stored, 10, "{r:?}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(d.count_samples(), 5000);
}

#[test]
fn rpc_notifications_unknown_methods_and_malformed_frames() {
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    // Notification: stored, never answered.
    let note = encode(&Value::Array(vec![
        Value::Int(2),
        Value::Str("record_metering_data".into()),
        Value::Array(vec![Value::Array(vec![sample("note-1", SECRET)])]),
    ]));
    c.stream.write_all(&note).unwrap();
    // Unknown method: an error answer, connection kept.
    c.stream
        .write_all(&encode(&Value::Array(vec![
            Value::Int(0),
            Value::Int(41),
            Value::Str("drop_tables".into()),
            Value::Array(vec![]),
        ])))
        .unwrap();
    let r = c.recv().unwrap();
    assert_eq!(r.msgid, 41);
    assert_eq!(r.error.as_deref(), Some("unknown method: drop_tables"));
    let r = c.call(vec![sample("after-unknown", SECRET)]).unwrap();
    assert_eq!(r.stored, 1);
    assert_eq!(d.wait_samples(2, WAIT), 2);
    // A request with a bad shape and a known msgid: an error answer, then close.
    c.stream
        .write_all(&encode(&Value::Array(vec![
            Value::Int(0),
            Value::Int(77),
            Value::Nil,
            Value::Nil,
        ])))
        .unwrap();
    let r = c.recv().unwrap();
    assert_eq!(r.msgid, 77);
    assert!(r.error.is_some());
    assert!(
        c.recv().is_err(),
        "connection must be closed after a malformed request"
    );
}

#[test]
fn bad_input_never_disturbs_good_clients() {
    let d = Daemon::start(Setup::default());
    let rpc = d.rpc.unwrap();
    // Garbage bytes.
    let mut g = TcpStream::connect(rpc).unwrap();
    g.write_all(&[0xc1, 0xff, 0x00, 0x13]).unwrap();
    // A 100 MB length claim (bin32 header) on RPC.
    let mut big = TcpStream::connect(rpc).unwrap();
    big.write_all(&[0x94, 0x00, 0x01, 0xa1, b'x', 0xc6, 0x06, 0x40, 0x00, 0x00])
        .unwrap();
    // A truncated frame, then the peer goes away.
    {
        let mut t = TcpStream::connect(rpc).unwrap();
        let req = rpc_request(5, vec![sample("truncated", SECRET)]);
        t.write_all(&req[..req.len() / 2]).unwrap();
    }
    // A slow client sending one byte at a time.
    let mut slow = TcpStream::connect(rpc).unwrap();
    let slow_req = rpc_request(9, vec![sample("slow-1", SECRET)]);
    slow.write_all(&slow_req[..3]).unwrap();
    // Wrong types in every field: each sample is rejected, the good one stored.
    let fields = [
        "source",
        "counter_name",
        "counter_type",
        "counter_unit",
        "counter_volume",
        "user_id",
        "project_id",
        "resource_id",
        "timestamp",
        "resource_metadata",
        "message_id",
    ];
    let mut c = RpcClient::connect(rpc).unwrap();
    let mut batch = vec![sample("good-among-bad", SECRET)];
    for (i, f) in fields.iter().enumerate() {
        let mut v = sample(&format!("bad-{i}"), SECRET);
        if let Value::Map(pairs) = &mut v {
            for (k, val) in pairs.iter_mut() {
                if k.as_str() == Some(f) {
                    *val = if *f == "counter_volume" {
                        Value::Str("x".into())
                    } else {
                        Value::Array(vec![Value::Int(1)])
                    };
                }
            }
        }
        meter::signature::sign(&mut v, SECRET);
        batch.push(v);
    }
    batch.push(Value::Int(7));
    let r = c.call(batch).unwrap();
    assert_eq!(r.stored, 1, "{r:?}");
    assert_eq!(r.rejected, fields.len() as i64 + 1, "{r:?}");
    // Garbage and oversize connections were closed by the daemon.
    for s in [&mut g, &mut big] {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; 64];
        let mut got = 0;
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let _ = got;
    }
    // The slow client finishes and is answered.
    for b in &slow_req[3..] {
        slow.write_all(&[*b]).unwrap();
    }
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let mut resp = vec![0u8; 256];
    let n = slow.read(&mut resp).unwrap();
    let r = parse_response(meter::decode::decode_value(&resp[..n]).unwrap()).unwrap();
    assert_eq!((r.msgid, r.stored), (9, 1));
    let mut ids = d.message_ids();
    ids.sort();
    assert_eq!(ids, vec!["good-among-bad", "slow-1"]);
}

#[test]
fn two_thousand_connections_at_once() {
    raise_nofile();
    let d = Daemon::start(Setup::default());
    let rpc = d.rpc.unwrap();
    let mut conns = Vec::new();
    for _ in 0..2000 {
        match TcpStream::connect(rpc) {
            Ok(s) => conns.push(s),
            Err(_) => break,
        }
    }
    // Beyond max_connections the daemon closes new connections; the ones it keeps work,
    // and a fresh client after the flood is served.
    let mut served = 0;
    for (i, s) in conns.iter_mut().enumerate().step_by(97) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.write_all(&rpc_request(1, vec![sample(&format!("flood-{i}"), SECRET)]))
            .is_err()
        {
            continue;
        }
        let mut b = [0u8; 128];
        if let Ok(n) = s.read(&mut b) {
            if n > 0 {
                served += 1;
            }
        }
    }
    assert!(served > 0);
    drop(conns);
    let mut c = RpcClient::connect(rpc).unwrap();
    let r = c.call(vec![sample("after-flood", SECRET)]).unwrap();
    assert_eq!(r.stored, 1);
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

#[test]
fn ceilometer_udp_and_tcp_publishers_are_real_clients() {
    let d = Daemon::start(Setup::default());
    let mut sent = ceilometer_publish("udp", d.udp.unwrap(), SECRET, 50, "py-udp");
    sent.extend(ceilometer_publish(
        "tcp",
        d.tcp.unwrap(),
        SECRET,
        50,
        "py-tcp",
    ));
    assert_eq!(sent.len(), 100);
    assert_eq!(d.wait_samples(100, WAIT), 100);
    let mut ids = d.message_ids();
    ids.sort();
    sent.sort();
    assert_eq!(ids, sent);
    // Signed with another secret: all rejected.
    ceilometer_publish("udp", d.udp.unwrap(), "other-secret", 5, "py-forged");
    assert!(wait_for(WAIT, || (d
        .log_count("invalid signature on sample py-forged")
        >= 1)
        .then_some(()))
    .is_some());
    assert_eq!(d.count_samples(), 100);
}

#[test]
fn storage_failure_answers_errors_and_recovers_without_losing_acked_samples() {
    let d = Daemon::start(Setup::default());
    let mut c = RpcClient::connect(d.rpc.unwrap()).unwrap();
    let r = c.call(vec![sample("before-1", SECRET)]).unwrap();
    assert_eq!(r.stored, 1);
    // Another process holds the write lock past the driver's busy timeout.
    let blocker = d.db();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut acked = vec!["before-1".to_string()];
    let r = c
        .call(vec![sample("during-1", SECRET), sample("during-2", SECRET)])
        .unwrap();
    assert!(
        r.error
            .as_deref()
            .is_some_and(|e| e.starts_with("storage unavailable")),
        "expected a storage error, got {r:?}"
    );
    blocker.execute_batch("COMMIT").unwrap();
    drop(blocker);
    // The client retries, as ceilometer's RPC publisher would; now it is stored.
    let r = c
        .call(vec![sample("during-1", SECRET), sample("during-2", SECRET)])
        .unwrap();
    assert_eq!((r.error.as_deref(), r.stored), (None, 2), "{r:?}");
    acked.extend(["during-1".to_string(), "during-2".to_string()]);
    let r = c.call(vec![sample("after-1", SECRET)]).unwrap();
    assert_eq!(r.stored, 1);
    acked.push("after-1".into());
    let mut ids = d.message_ids();
    ids.sort();
    acked.sort();
    assert_eq!(ids, acked);
    assert!(d.log_count("storage recovered") >= 1);
}
