//! Issue 13: defects found by probing the release binary as a remote client, an operator and
//! a fault would. Each test reproduces the probe against the real binaries and checks the
//! fixed behaviour.

use collector_e2e::*;
use std::time::Duration;

/// Item 1: one rejected sample must not leave the batch deadline in the past (the loop then
/// polled with a zero timeout, 100 % CPU, until a valid sample came).
#[test]
fn one_rejected_sample_leaves_the_worker_idle() {
    let d = Daemon::start(Setup::default());
    let worker = d.worker_pid();
    let udp = d.udp.expect("udp address");
    send_udp(udp, &[encode(&sample("forged-1", "not-the-secret"))]);
    d.wait_counter("invalid_signature", 1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(worker) - before;
    // Idle: a heartbeat and a sweep a second. Spinning used the whole 3 s (300 ticks at 100 Hz).
    assert!(
        used * 10 < ticks_per_second() * 3,
        "an idle worker used {used} ticks of CPU in 3 s after one rejected sample"
    );
}

/// Item 7: a worker that gets SIGTERM (PDEATHSIG, the fast stop, a heartbeat timeout) stops
/// gracefully and stores the samples it holds.
#[test]
fn sigterm_to_a_worker_stores_the_samples_it_holds() {
    let d = Daemon::start(
        Setup::default()
            .collector("batch_timeout = 5")
            .collector("batch_size = 1000"),
    );
    let worker = d.worker_pid();
    let udp = d.udp.expect("udp address");
    let payloads: Vec<Vec<u8>> = (0..100)
        .map(|i| encode(&sample(&format!("term-{i}"), SECRET)))
        .collect();
    send_udp(udp, &payloads);
    assert_eq!(
        d.wait_counter("samples_received", 100, Duration::from_secs(10)),
        100
    );
    assert_eq!(
        d.count_samples(),
        0,
        "batch_timeout 5 s: nothing stored yet"
    );
    // SAFETY: kill(2) on the worker we just looked up.
    unsafe { libc::kill(worker, libc::SIGTERM) };
    assert_eq!(
        d.wait_samples(100, Duration::from_secs(10)),
        100,
        "log:\n{}",
        d.log()
    );
    assert!(
        !d.log().contains("signal SIGTERM"),
        "the worker died of SIGTERM; log:\n{}",
        d.log()
    );
}
