//! Process tests: run the `supervisor-toy` launcher (src/bin/supervisor-toy.rs) in a temp dir
//! and watch its workers through the files it writes. Every wait polls a condition with a
//! deadline; every process started is killed and reaped on drop.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const TOY: &str = env!("CARGO_BIN_EXE_supervisor-toy");

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

#[derive(Debug, Clone, PartialEq)]
struct WorkerLine {
    pid: i32,
    slot: usize,
    generation: u64,
    state: String,
    heartbeats: u64,
}

#[derive(Debug, Default)]
struct Status {
    generation: u64,
    target: usize,
    workers: Vec<WorkerLine>,
}

impl Status {
    fn ready(&self) -> Vec<&WorkerLine> {
        self.workers.iter().filter(|w| w.state == "Ready").collect()
    }

    fn ready_pids(&self) -> Vec<i32> {
        self.ready().iter().map(|w| w.pid).collect()
    }
}

struct Toy {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// A daemonized launcher is not our child: killed by pid on drop.
    daemon: Option<i32>,
}

impl Toy {
    fn command(dir: &Path, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(TOY);
        cmd.env("TOY_DIR", dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("stderr.log"))
                    .expect("stderr log"),
            );
        cmd
    }

    fn start(env: &[(&str, &str)]) -> Toy {
        let dir = tempfile::tempdir().expect("tempdir");
        Toy::start_in(dir, env)
    }

    fn start_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Toy {
        let child = Toy::command(dir.path(), env).spawn().expect("spawn toy");
        Toy {
            child: Some(child),
            dir,
            daemon: None,
        }
    }

    /// Starts with `n` workers and waits until they are all ready.
    fn start_ready(n: usize, env: &[(&str, &str)]) -> Toy {
        let n_s = n.to_string();
        let mut all = vec![("TOY_WORKERS", n_s.as_str())];
        all.extend_from_slice(env);
        let toy = Toy::start(&all);
        toy.wait_ready(n, 1, Duration::from_secs(10));
        toy
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pid(&self) -> i32 {
        match (&self.child, self.daemon) {
            (_, Some(pid)) => pid,
            (Some(c), None) => c.id() as i32,
            (None, None) => panic!("no launcher"),
        }
    }

    fn status(&self) -> Status {
        let text = fs::read_to_string(self.path("status")).unwrap_or_default();
        let mut st = Status::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["generation", g] => st.generation = g.parse().unwrap(),
                ["target", t] => st.target = t.parse().unwrap(),
                ["worker", pid, slot, gen, state, beats] => st.workers.push(WorkerLine {
                    pid: pid.parse().unwrap(),
                    slot: slot.parse().unwrap(),
                    generation: gen.parse().unwrap(),
                    state: state.to_string(),
                    heartbeats: beats.parse().unwrap(),
                }),
                _ => {}
            }
        }
        st
    }

    /// Waits until exactly `n` workers exist, all ready and of `generation`.
    fn wait_ready(&self, n: usize, generation: u64, timeout: Duration) -> Vec<i32> {
        let ok = wait_until(timeout, || {
            let st = self.status();
            st.workers.len() == n
                && st.ready().len() == n
                && st.workers.iter().all(|w| w.generation == generation)
        });
        assert!(
            ok,
            "expected {n} ready workers of generation {generation}, status: {:?}\n{}",
            self.status(),
            self.stderr()
        );
        self.status().ready_pids()
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("signal launcher");
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        status
    }

    fn starts(&self) -> usize {
        self.files_with_prefix("start-").len()
    }

    fn files_with_prefix(&self, prefix: &str) -> Vec<i32> {
        fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_prefix(prefix))
                            .and_then(|p| p.parse().ok())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn events(&self) -> String {
        fs::read_to_string(self.path("events")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.path("stderr.log")).unwrap_or_default()
    }

    /// Sends one line to the control socket and reads `lines` lines back.
    fn ctl(&self, line: &str, lines: usize) -> Vec<String> {
        let mut stream = UnixStream::connect(self.path("ctl.sock")).expect("connect ctl.sock");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        (0..lines)
            .map(|_| {
                let mut s = String::new();
                reader.read_line(&mut s).expect("control answer");
                s.trim().to_string()
            })
            .collect()
    }

    /// True when `pid` is a toy process of this test (its environment names our dir).
    fn is_ours(&self, pid: i32) -> bool {
        let marker = format!("TOY_DIR={}", self.dir.path().display());
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == marker.as_bytes()))
    }
}

impl Drop for Toy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- launcher log ---\n{}", self.stderr());
            eprintln!("--- events ---\n{}", self.events());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut pids = self.files_with_prefix("start-");
        pids.extend(self.daemon);
        for pid in pids {
            if alive(pid) && self.is_ours(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn workers_come_up_heartbeat_and_answer() {
    let toy = Toy::start_ready(3, &[]);
    let st = toy.status();
    assert_eq!(st.generation, 1);
    let mut slots: Vec<usize> = st.workers.iter().map(|w| w.slot).collect();
    slots.sort();
    assert_eq!(slots, vec![0, 1, 2]);
    for pid in st.ready_pids() {
        assert!(alive(pid));
        assert_ne!(pid, toy.pid());
    }
    assert!(wait_until(Duration::from_secs(5), || toy
        .status()
        .workers
        .iter()
        .all(|w| w.heartbeats > 0)));

    // A custom command reaches every worker and each reply comes back to the caller.
    let answers = toy.ctl("ping", 3);
    let mut expected: Vec<String> = st
        .ready_pids()
        .iter()
        .map(|p| format!("pong {p} 1"))
        .collect();
    expected.sort();
    assert_eq!(answers, expected);
}

#[test]
fn killed_worker_is_replaced_within_a_second() {
    let toy = Toy::start_ready(2, &[]);
    let before = toy.status().ready_pids();
    let victim = before[0];
    let t0 = Instant::now();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(Duration::from_secs(1), || {
            let st = toy.status();
            st.workers.len() == 2 && st.workers.iter().all(|w| w.pid != victim)
        }),
        "no replacement within 1 s: {:?}",
        toy.status()
    );
    let after = toy.wait_ready(2, 1, Duration::from_secs(5));
    assert!(after.contains(&before[1]));
    assert!(!after.contains(&victim));
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(toy
        .events()
        .contains(&format!("exited {victim} signal SIGKILL expected=false")));
}

#[test]
fn crash_on_start_backs_off() {
    let toy = Toy::start(&[("TOY_WORKERS", "1"), ("TOY_CRASH_ON_START", "1")]);
    // Starts at about 0 s, 0 s (first crash: immediate), 1 s, 3 s, then the next at 7 s.
    assert!(
        wait_until(Duration::from_secs(6), || toy.starts() >= 4),
        "only {} starts",
        toy.starts()
    );
    let four = Instant::now();
    assert!(
        !wait_until(Duration::from_millis(2500), || toy.starts() > 4),
        "backoff not applied: {} starts",
        toy.starts()
    );
    assert!(four.elapsed() >= Duration::from_millis(2500));
    assert!(
        alive(toy.pid()),
        "the launcher must survive crashing workers"
    );
    assert!(toy.stderr().contains("keeps dying at start"));
}

#[test]
fn killing_the_launcher_takes_workers_down() {
    let mut toy = Toy::start_ready(3, &[]);
    let pids = toy.status().ready_pids();
    toy.signal(Signal::SIGKILL);
    toy.wait_exit(Duration::from_secs(2))
        .expect("launcher reaped");
    assert!(
        wait_until(Duration::from_secs(2), || pids.iter().all(|p| !alive(*p))),
        "workers survived their launcher: {:?}",
        pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
}

#[test]
fn term_stops_gracefully_with_status_zero() {
    let mut toy = Toy::start_ready(2, &[]);
    let pids = toy.status().ready_pids();
    toy.signal(Signal::SIGTERM);
    let status = toy
        .wait_exit(Duration::from_secs(10))
        .expect("launcher exits");
    assert_eq!(status.code(), Some(0), "{}", toy.stderr());
    let mut stopped = toy.files_with_prefix("stopped-");
    stopped.sort();
    let mut expected = pids.clone();
    expected.sort();
    assert_eq!(stopped, expected, "every worker got Stop");
    assert!(pids.iter().all(|p| !alive(*p)));
    assert!(toy.events().contains("killed: 0"), "{}", toy.events());
}

#[test]
fn graceful_stop_kills_workers_that_outlive_the_timeout() {
    let mut toy = Toy::start_ready(2, &[("TOY_IGNORE_STOP", "1"), ("TOY_GRACEFUL_MS", "500")]);
    let t0 = Instant::now();
    toy.signal(Signal::SIGTERM);
    let status = toy
        .wait_exit(Duration::from_secs(10))
        .expect("launcher exits");
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert!(toy.events().contains("killed: 2"), "{}", toy.events());
}

#[test]
fn second_term_is_a_fast_stop_and_quit_immediate() {
    let mut toy = Toy::start_ready(2, &[("TOY_IGNORE_STOP", "1")]);
    toy.signal(Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(5), || toy
        .events()
        .contains("stopping Graceful")));
    toy.signal(Signal::SIGTERM);
    let status = toy.wait_exit(Duration::from_secs(4)).expect("fast stop");
    assert_eq!(status.code(), Some(0));
    assert!(toy.events().contains("stopping Fast"));

    let mut toy = Toy::start_ready(2, &[("TOY_IGNORE_STOP", "1")]);
    let pids = toy.status().ready_pids();
    toy.signal(Signal::SIGQUIT);
    toy.wait_exit(Duration::from_secs(2))
        .expect("immediate stop");
    for pid in pids {
        assert!(toy
            .events()
            .contains(&format!("exited {pid} signal SIGKILL expected=true")));
    }
}

#[test]
fn ttin_ttou_and_control_socket_change_the_worker_count() {
    let toy = Toy::start_ready(2, &[]);
    toy.signal(Signal::SIGTTIN);
    toy.wait_ready(3, 1, Duration::from_secs(5));
    toy.signal(Signal::SIGTTOU);
    toy.wait_ready(2, 1, Duration::from_secs(5));
    toy.signal(Signal::SIGTTOU);
    let last = toy.wait_ready(1, 1, Duration::from_secs(5));
    // Never fewer than one.
    toy.signal(Signal::SIGTTOU);
    assert!(wait_until(Duration::from_secs(5), || toy.status().target == 1));
    assert_eq!(toy.wait_ready(1, 1, Duration::from_secs(5)), last);
    // Retired workers were asked to stop, not killed.
    assert_eq!(toy.files_with_prefix("stopped-").len(), 2);

    assert_eq!(toy.ctl("workers 3", 1), vec!["ok"]);
    toy.wait_ready(3, 1, Duration::from_secs(5));
}

#[test]
fn hup_starts_a_new_generation_and_retires_the_old() {
    let toy = Toy::start_ready(2, &[]);
    let old = toy.status().ready_pids();
    toy.signal(Signal::SIGHUP);
    let new = toy.wait_ready(2, 2, Duration::from_secs(10));
    assert!(new.iter().all(|p| !old.contains(p)));
    assert!(
        wait_until(Duration::from_secs(5), || old.iter().all(|p| !alive(*p))),
        "old generation still running"
    );
    let mut stopped = toy.files_with_prefix("stopped-");
    stopped.sort();
    let mut old_sorted = old.clone();
    old_sorted.sort();
    assert_eq!(stopped, old_sorted, "old generation retired with Stop");
    assert!(toy.events().contains("generation-ready 2 Some(1)"));
    assert_eq!(toy.status().generation, 2);

    // The control socket's reload does the same.
    assert_eq!(toy.ctl("reload", 1), vec!["ok"]);
    toy.wait_ready(2, 3, Duration::from_secs(10));
}

#[test]
fn failed_reloads_keep_the_serving_generation() {
    let toy = Toy::start_ready(2, &[("TOY_BOOT_TIMEOUT_MS", "1000")]);
    let pids = toy.status().ready_pids();

    // The reload hook refuses (a configuration that does not parse).
    fs::write(toy.path("reload-refuse"), "").unwrap();
    toy.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || toy
        .events()
        .contains("reload-failed None")));
    fs::remove_file(toy.path("reload-refuse")).unwrap();

    // The new generation never gets ready.
    fs::write(toy.path("reload-hang"), "").unwrap();
    toy.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || toy
        .events()
        .contains("reload-failed Some(2)")));
    fs::remove_file(toy.path("reload-hang")).unwrap();

    // The new generation exits with the boot error code: the reload fails, the launcher stays.
    fs::write(toy.path("reload-boot-error"), "").unwrap();
    toy.signal(Signal::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || toy
        .events()
        .contains("reload-failed Some(3)")));

    assert!(alive(toy.pid()));
    let st = toy.status();
    assert_eq!(st.generation, 1);
    assert!(
        wait_until(Duration::from_secs(5), || toy.status().workers.len() == 2),
        "failed generations' workers still around: {:?}",
        toy.status()
    );
    assert_eq!(toy.wait_ready(2, 1, Duration::from_secs(1)), pids);
}

#[test]
fn boot_error_stops_the_launcher() {
    let mut toy = Toy::start(&[("TOY_WORKERS", "2"), ("TOY_BOOT_ERROR", "1")]);
    let status = toy
        .wait_exit(Duration::from_secs(10))
        .expect("launcher exits");
    assert_eq!(status.code(), Some(3));
    assert!(toy.stderr().contains("boot error code"), "{}", toy.stderr());
    assert!(
        toy.starts() <= 2,
        "no respawn loop: {} starts",
        toy.starts()
    );
}

#[test]
fn silent_worker_is_terminated_and_replaced() {
    let toy = Toy::start_ready(
        1,
        &[
            ("TOY_SILENT", "1"),
            ("TOY_WORKER_TIMEOUT_MS", "500"),
            ("TOY_KILL_GRACE_MS", "500"),
        ],
    );
    let first = toy.status().ready_pids()[0];
    assert!(
        wait_until(Duration::from_secs(5), || {
            toy.status().ready_pids().iter().any(|p| *p != first)
        }),
        "silent worker not replaced: {:?}",
        toy.status()
    );
    assert!(toy.stderr().contains("no heartbeat"), "{}", toy.stderr());
    assert!(!alive(first));
}

#[test]
fn worker_that_closes_its_link_is_terminated_and_replaced() {
    let toy = Toy::start_ready(1, &[("TOY_DROP_LINK", "1"), ("TOY_KILL_GRACE_MS", "300")]);
    let first = toy.status().ready_pids()[0];
    assert!(
        wait_until(Duration::from_secs(5), || {
            toy.status().workers.iter().any(|w| w.pid != first)
        }),
        "deaf worker not replaced: {:?}",
        toy.status()
    );
    assert!(toy.stderr().contains("closed its link but did not exit"));
    assert!(toy
        .events()
        .contains(&format!("exited {first} signal SIGTERM expected=false")));
}

#[test]
fn usr1_reopens_logs_in_launcher_and_workers() {
    let toy = Toy::start_ready(2, &[]);
    let pids = toy.status().ready_pids();
    toy.signal(Signal::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || {
        toy.events().contains("reopen-logs") && toy.files_with_prefix("reopened-").len() == 2
    }));
    let mut reopened = toy.files_with_prefix("reopened-");
    reopened.sort();
    let mut pids = pids;
    pids.sort();
    assert_eq!(reopened, pids);
    // Workers ignore the signal itself (a terminal's process group may send it).
    assert!(pids.iter().all(|p| alive(*p)));
}

#[test]
fn second_instance_with_the_same_pidfile_is_refused() {
    let pid_dir = tempfile::tempdir().unwrap();
    let pidfile = pid_dir.path().join("toy.pid");
    let pidfile_s = pidfile.to_str().unwrap();
    let first = Toy::start_ready(1, &[("TOY_PIDFILE", pidfile_s)]);
    assert_eq!(
        fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", first.pid())
    );

    let mut second = Toy::start(&[("TOY_PIDFILE", pidfile_s)]);
    let status = second.wait_exit(Duration::from_secs(5)).expect("refused");
    assert_eq!(status.code(), Some(1));
    let expected = format!(
        "supervisor-toy already running with pid {} (pidfile {})",
        first.pid(),
        pidfile.display()
    );
    assert!(second.stderr().contains(&expected), "{}", second.stderr());
    assert_eq!(second.starts(), 0);
    assert!(alive(first.pid()));
}

#[test]
fn stale_pidfile_is_replaced_and_removed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("toy.pid");
    // A pid that is certainly alive (ours) but holds no lock: stale all the same.
    fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    let mut toy = Toy::start_ready(1, &[("TOY_PIDFILE", pidfile.to_str().unwrap())]);
    assert_eq!(
        fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", toy.pid())
    );
    toy.signal(Signal::SIGTERM);
    assert_eq!(
        toy.wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(!pidfile.exists());
}

#[test]
fn daemon_mode_detaches_and_reports_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("toy.pid");
    let mut cmd = Toy::command(
        dir.path(),
        &[
            ("TOY_DAEMON", "1"),
            ("TOY_WORKERS", "2"),
            ("TOY_PIDFILE", pidfile.to_str().unwrap()),
        ],
    );
    let mut original = cmd.spawn().unwrap();
    let mut toy = Toy {
        child: None,
        dir,
        daemon: None,
    };
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = original.try_wait().unwrap();
        status.is_some()
    });
    let status = status.expect("the original process exits once the daemon is ready");
    assert_eq!(status.code(), Some(0), "{}", toy.stderr());
    // By then the workers are ready.
    assert_eq!(toy.status().ready().len(), 2);

    let daemon: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    toy.daemon = Some(daemon);
    assert_ne!(daemon, original.id() as i32);
    assert!(alive(daemon));
    assert_eq!(
        fs::read_link(format!("/proc/{daemon}/cwd")).unwrap(),
        Path::new("/")
    );
    let sid = nix::unistd::getsid(Some(Pid::from_raw(daemon))).unwrap();
    assert_ne!(sid, nix::unistd::getsid(None).unwrap(), "new session");
    assert_ne!(sid.as_raw(), daemon, "not a session leader");

    toy.signal(Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(10), || !alive(daemon)));
    assert!(wait_until(Duration::from_secs(2), || !pidfile.exists()));
}

#[test]
fn daemon_mode_reports_a_boot_error_to_the_original_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = Toy::command(
        dir.path(),
        &[
            ("TOY_DAEMON", "1"),
            ("TOY_BOOT_ERROR", "1"),
            ("TOY_WORKERS", "1"),
        ],
    )
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("boot error code"));
}

#[test]
fn workers_run_as_the_configured_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user nobody");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let toy = Toy::start_in(dir, &[("TOY_WORKERS", "1"), ("TOY_USER", "nobody")]);
    let pids = toy.wait_ready(1, 1, Duration::from_secs(10));
    for pid in pids.iter().copied().chain([toy.pid()]) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let uids: Vec<u32> = uid_line
            .split_whitespace()
            .skip(1)
            .map(|u| u.parse().unwrap())
            .collect();
        assert!(uids.iter().all(|u| *u == nobody.uid.as_raw()), "{uid_line}");
    }
}
