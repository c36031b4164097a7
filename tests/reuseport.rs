//! `udp_reuseport` (issue 18, "many publishers"): one SO_REUSEPORT UDP socket per worker,
//! bound by the launcher and kept across a worker's death, a reload and a change of the
//! worker count. Real binaries, real signals; ports 0 throughout (the group's later sockets
//! join the port the kernel chose for the first).

use collector_e2e::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn reuseport(workers: usize) -> Setup {
    Setup::default()
        .workers(workers)
        .collector("udp_reuseport = true")
}

/// Inodes of the UDP sockets bound to `port` (/proc/net/udp and udp6).
fn udp_inodes(port: u16) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for f in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for l in text.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let Some(local) = cols.get(1) else { continue };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) {
                if let Some(ino) = cols.get(9).and_then(|i| i.parse().ok()) {
                    out.insert(ino);
                }
            }
        }
    }
    out
}

/// Socket inodes among a process's open descriptors.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy().to_string();
                if let Some(ino) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|i| i.parse().ok())
                {
                    out.insert(ino);
                }
            }
        }
    }
    out
}

/// Which of the group's sockets each process holds.
fn holders(pids: &[i32], group: &BTreeSet<u64>) -> BTreeMap<i32, BTreeSet<u64>> {
    pids.iter()
        .map(|p| (*p, socket_inodes(*p).intersection(group).copied().collect()))
        .collect()
}

/// `n` samples with ids `{tag}-{i}`, sent round robin from `ports` sockets of their own
/// (as many publishers), paced at about `per_s` datagrams a second.
fn send_many(to: SocketAddr, tag: &str, n: usize, ports: usize, per_s: u64) {
    let socks: Vec<UdpSocket> = (0..ports)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_micros(1_000_000 / per_s * i as u64);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        socks[i % ports]
            .send_to(&encode(&sample(&format!("{tag}-{i}"), SECRET)), to)
            .unwrap();
    }
}

#[test]
fn each_worker_reads_its_own_socket_of_one_port_and_many_publishers_are_stored() {
    let d = Daemon::start(reuseport(2));
    let pids = d.wait_workers(2, &[], WAIT);
    let udp = d.udp.unwrap();
    assert_ne!(udp.port(), 0);
    let group = udp_inodes(udp.port());
    assert_eq!(
        group.len(),
        2,
        "one socket per worker on port {}",
        udp.port()
    );
    // The launcher holds both; each worker only its own, and not the same one.
    assert_eq!(socket_inodes(d.pid()).intersection(&group).count(), 2);
    let held = holders(&pids, &group);
    assert!(held.values().all(|s| s.len() == 1), "{held:?}");
    assert_ne!(held[&pids[0]], held[&pids[1]]);

    send_many(udp, "many", 640, 64, 4000);
    assert_eq!(d.wait_samples(640, WAIT), 640, "{}", d.log());
    // 64 source ports over 2 sockets: both workers got some (counters come with the
    // next heartbeat).
    let mut received = Vec::new();
    let both = wait_for(WAIT, || {
        received = d.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["counters"]["udp_received"].as_u64().unwrap_or(0))
            .collect::<Vec<u64>>();
        (received.iter().sum::<u64>() == 640 && received.iter().all(|r| *r > 0)).then_some(())
    });
    assert!(both.is_some(), "per worker: {received:?}");
}

#[test]
fn a_killed_worker_is_replaced_on_the_same_socket_and_reads_what_queued_meanwhile() {
    let d = Daemon::start(reuseport(2));
    let pids = d.wait_workers(2, &[], WAIT);
    let udp = d.udp.unwrap();
    let group = udp_inodes(udp.port());
    let victim = pids[0];
    let its_socket = holders(&[victim], &group)[&victim].clone();
    assert_eq!(its_socket.len(), 1);

    // Freeze it, so what the kernel hashes to its socket queues there; then kill it.
    // SAFETY: signals to our own daemon's worker.
    unsafe { libc::kill(victim, libc::SIGSTOP) };
    send_many(udp, "queued", 300, 64, 8000);
    unsafe { libc::kill(victim, libc::SIGKILL) };

    let now = d.wait_workers(2, &[victim], WAIT);
    let successor = *now.iter().find(|p| **p != pids[1]).unwrap();
    assert_eq!(
        holders(&[successor], &group)[&successor],
        its_socket,
        "the successor must get the dead worker's socket"
    );
    assert_eq!(udp_inodes(udp.port()), group, "the group did not change");
    assert_eq!(
        d.wait_samples(300, WAIT),
        300,
        "datagrams queued while the worker was down were lost; log:\n{}",
        d.log()
    );
}

#[test]
fn reload_and_worker_count_changes_keep_serving_and_resize_the_group() {
    let d = Daemon::start(reuseport(2));
    let old = d.wait_workers(2, &[], WAIT);
    let udp = d.udp.unwrap();
    let group = udp_inodes(udp.port());
    assert_eq!(group.len(), 2);

    // A reload with the same count, while 16 publishers send: the group stays and nothing
    // is lost (old and new worker of a slot share its socket until the old one drained it).
    let sender = std::thread::spawn(move || send_many(udp, "hup", 4000, 16, 2000));
    std::thread::sleep(Duration::from_millis(600));
    d.send_signal(libc::SIGHUP);
    sender.join().unwrap();
    let new = d.wait_workers(2, &old, WAIT);
    assert_eq!(d.wait_samples(4000, WAIT), 4000, "lost across reload");
    assert_eq!(udp_inodes(udp.port()), group, "a reload keeps the sockets");

    // More workers by reload: one more socket, same port.
    let cfg = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(&d.config_path, cfg.replace("workers = 2", "workers = 3")).unwrap();
    let (code, out, err) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let three = d.wait_workers(3, &new, WAIT);
    let wait_group = |n: usize| {
        wait_for(WAIT, || {
            let g = udp_inodes(udp.port());
            (g.len() == n).then_some(g)
        })
        .unwrap_or_else(|| panic!("wanted {n} sockets on the port; log:\n{}", d.log()))
    };
    let g3 = wait_group(3);
    assert!(group.is_subset(&g3));
    send_many(udp, "three", 600, 64, 4000);
    assert_eq!(d.wait_samples(4600, WAIT), 4600);

    // Fewer by TTOU: the surplus socket leaves the group once its worker exited, and
    // everything sent afterwards is stored by the two left.
    d.send_signal(libc::SIGTTOU);
    let two = d.wait_workers(2, &[], WAIT);
    assert!(two.iter().all(|p| three.contains(p)));
    let g2 = wait_group(2);
    assert!(g2.is_subset(&g3));
    let held = holders(&two, &g2);
    assert!(held.values().all(|s| s.len() == 1), "{held:?}");
    send_many(udp, "two", 600, 64, 4000);
    assert_eq!(d.wait_samples(5200, WAIT), 5200, "{}", d.log());
}

#[test]
fn a_reload_to_another_port_moves_the_group_and_a_mode_switch_waits_for_a_restart() {
    let d = Daemon::start(reuseport(2));
    let old = d.wait_workers(2, &[], WAIT);
    let first = d.udp.unwrap();
    // A port that was free a moment ago.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        cfg.replace("udp_port = 0", &format!("udp_port = {port}")),
    )
    .unwrap();
    let (code, out, err) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let new = d.wait_workers(2, &old, WAIT);
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let moved = wait_for(WAIT, || {
        (udp_inodes(port).len() == 2 && udp_inodes(first.port()).is_empty()).then_some(())
    });
    assert!(moved.is_some(), "group not moved; log:\n{}", d.log());
    let held = holders(&new, &udp_inodes(port));
    assert!(held.values().all(|s| s.len() == 1), "{held:?}");
    send_many(to, "moved", 300, 64, 4000);
    assert_eq!(d.wait_samples(300, WAIT), 300, "{}", d.log());

    // Switching the mode by reload is refused with a warning; the group keeps serving.
    let cfg = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        cfg.replace("udp_reuseport = true", "udp_reuseport = false"),
    )
    .unwrap();
    let (code, out, err) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    d.wait_workers(2, &new, WAIT);
    assert_eq!(d.log_count("udp_reuseport changed"), 1, "{}", d.log());
    assert_eq!(udp_inodes(port).len(), 2);
    send_many(to, "kept", 300, 64, 4000);
    assert_eq!(d.wait_samples(600, WAIT), 600, "{}", d.log());
}
