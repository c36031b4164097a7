//! One writer per SQLite file (`collector::relay`): with several workers, worker 0 stores every
//! worker's batches; while it is down the others write to the file themselves, and go back to
//! it once it is respawned. Nothing acknowledged is lost on the way.

use collector_e2e::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Pids of the serving workers by slot.
fn by_slot(d: &Daemon) -> Vec<(u64, i32)> {
    let s = d.status();
    let gen = s["generation"].as_u64();
    let mut v: Vec<(u64, i32)> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["generation"].as_u64() == gen && w["state"] == "ready")
        .map(|w| {
            (
                w["index"].as_u64().unwrap(),
                w["pid"].as_i64().unwrap() as i32,
            )
        })
        .collect();
    v.sort();
    v
}

/// One call of one sample on a new connection (connections land on either worker); returns
/// how many the collector said it stored.
fn call(addr: std::net::SocketAddr, id: &str) -> i64 {
    let mut c = RpcClient::connect(addr).unwrap();
    let r = c.call(vec![sample(id, SECRET)]).unwrap();
    assert_eq!(r.error, None, "{id}");
    r.stored
}

#[test]
fn workers_store_through_worker_0_and_by_themselves_while_it_is_down() {
    let d = Daemon::start(Setup::default().workers(2));
    d.wait_workers(2, &[], WAIT);
    let slots = by_slot(&d);
    let (slot0, other) = (slots[0].1, slots[1].1);
    let addr = d.rpc.unwrap();
    let sock = d.path(&format!("{}-writer.sock", d.db_file));
    let mode = std::fs::metadata(&sock)
        .expect("worker 0's socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", sock.display());

    let mut acked = 0;
    let mut n = 0;
    let mut until = |needle: &str, count: usize, acked: &mut i64| {
        let line = format!("collector[{other}] sqlite: {needle}");
        let seen = wait_for(WAIT, || {
            for _ in 0..4 {
                *acked += call(addr, &format!("relay-{n}"));
                n += 1;
            }
            (d.log_count(&line) >= count).then_some(())
        });
        assert!(seen.is_some(), "no {line:?} after {n} calls:\n{}", d.log());
    };
    until("writing through the file's writer", 1, &mut acked);
    let relayed = wait_for(WAIT, || {
        let n = d.stats()["batches_relayed"].as_u64().unwrap_or(0);
        (n >= 1).then_some(n)
    });
    assert!(
        relayed.is_some(),
        "batches_relayed counts what worker 0 stored for the other"
    );

    // Worker 0 killed: the other worker's relay breaks, and it stores by itself.
    // SAFETY: killing our own daemon's worker.
    unsafe { libc::kill(slot0, libc::SIGKILL) };
    until("the file's writer (worker 0", 1, &mut acked);
    // Respawned, worker 0 takes the socket again and the other goes back to it.
    d.wait_workers(2, &[slot0], WAIT);
    until("writing through the file's writer", 2, &mut acked);

    assert_eq!(acked, n as i64, "every call stored its sample");
    assert_eq!(
        d.count_samples(),
        acked,
        "every acknowledged sample is in the file"
    );
}

#[test]
fn one_worker_keeps_its_socket_and_removes_it_at_exit() {
    let mut d = Daemon::start(Setup::default().workers(1));
    d.wait_workers(1, &[], WAIT);
    let sock = d.path(&format!("{}-writer.sock", d.db_file));
    assert!(
        sock.exists(),
        "worker 0 listens even alone (TTIN may add workers)"
    );
    assert_eq!(call(d.rpc.unwrap(), "alone"), 1);
    d.send_signal(libc::SIGTERM);
    assert!(d.wait_exit(WAIT).is_some());
    assert!(!sock.exists(), "{} left behind", sock.display());
}
