//! Support for the end-to-end tests in `tests/`: start the real `collector` binary with a
//! temporary config, wait until it serves (by reading its log, not by sleeping), talk to it
//! over real loopback sockets, read what it stored, and always kill and reap it on drop.

use meter::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SECRET: &str = "e2e-secret";

/// A built binary of the workspace (`scripts/test` builds them before the tests run).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("COLLECTOR_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

/// Poll `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builder for a daemon's config: sections get the lines given here on top of test defaults
/// (ports 0 on 127.0.0.1, SQLite and log in the temp dir, a test secret).
pub struct Setup {
    pub workers: usize,
    pub service: Vec<String>,
    pub collector: Vec<String>,
    pub database: Vec<String>,
    pub extra: String,
    pub secret: String,
    /// The SQLite file, relative to the temp dir.
    pub db_file: String,
    /// Extra environment for the daemon.
    pub env: Vec<(String, String)>,
    /// `[database] connection`; `None`: SQLite at `db_file` in the temp dir.
    pub connection: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            workers: 1,
            service: Vec::new(),
            collector: Vec::new(),
            database: Vec::new(),
            extra: String::new(),
            secret: SECRET.into(),
            db_file: "collector.db".into(),
            env: Vec::new(),
            connection: None,
        }
    }
}

impl Setup {
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    pub fn collector(mut self, line: &str) -> Self {
        self.collector.push(line.into());
        self
    }
    pub fn service(mut self, line: &str) -> Self {
        self.service.push(line.into());
        self
    }
    pub fn database(mut self, line: &str) -> Self {
        self.database.push(line.into());
        self
    }
    /// Store in a server database instead of the temp dir's SQLite file.
    pub fn connection(mut self, url: &str) -> Self {
        self.connection = Some(url.into());
        self
    }
    pub fn db_file(mut self, rel: &str) -> Self {
        self.db_file = rel.into();
        self
    }
    pub fn extra(mut self, text: &str) -> Self {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    pub fn render(&self, dir: &Path) -> String {
        let d = dir.display();
        let mut s = format!(
            "[service]\nworkers = {}\ncontrol_socket = \"{d}/control.sock\"\nlog_file = \"{d}/collector.log\"\nlog_level = \"debug\"\ngraceful_shutdown_timeout = 10\n",
            self.workers
        );
        for l in &self.service {
            s.push_str(l);
            s.push('\n');
        }
        // The metrics endpoint on a port of the kernel's choosing (parallel tests), unless
        // the caller set one (see `Daemon::metrics_addr`).
        if !self
            .service
            .iter()
            .any(|l| l.trim_start().starts_with("metrics_port"))
        {
            s.push_str("metrics_port = 0\n");
        }
        // Test defaults, each replaced by a caller's line for the same key.
        let defaults = [
            "udp_address = \"127.0.0.1\"",
            "udp_port = 0",
            "tcp_address = \"127.0.0.1\"",
            "tcp_port = 0",
            "rpc_address = \"127.0.0.1\"",
            "rpc_port = 0",
        ];
        let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
        s.push_str("[collector]\n");
        for d in defaults {
            if !self.collector.iter().any(|l| key(l) == key(d)) {
                s.push_str(d);
                s.push('\n');
            }
        }
        for l in &self.collector {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!(
            "[publisher]\ntelemetry_secret = \"{}\"\n",
            self.secret
        ));
        let connection = match &self.connection {
            Some(url) => url.clone(),
            None => format!("sqlite:///{d}/{}", self.db_file),
        };
        s.push_str(&format!("[database]\nconnection = \"{connection}\"\n"));
        for l in &self.database {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&self.extra);
        s
    }
}

/// A running daemon: killed (whole process group) and reaped on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub udp: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub rpc: Option<SocketAddr>,
    pub workers: usize,
    pub db_file: String,
    pub env: Vec<(String, String)>,
    /// A command (and its arguments) the launcher runs under, e.g. `prlimit --nproc=4`.
    pub wrapper: Vec<String>,
}

impl Daemon {
    pub fn start(setup: Setup) -> Daemon {
        Daemon::start_with_dir_prep(setup, |_| {})
    }

    /// Like `start`; a `pidfile = "PIDFILE"` service line becomes the temp dir's pidfile
    /// (and a value starting with `"RUNDIR/` a path in its `run/` subdirectory).
    pub fn start_with_pidfile(setup: Setup) -> Daemon {
        Daemon::start_with_dir_prep(setup, |_| {})
    }

    pub fn start_with_pidfile_and(setup: Setup, prep: impl FnOnce(&Path)) -> Daemon {
        Daemon::start_with_dir_prep(setup, prep)
    }

    /// Start after `prep` ran on the temp dir (to plant files or change its mode).
    pub fn start_with_dir_prep(setup: Setup, prep: impl FnOnce(&Path)) -> Daemon {
        Daemon::start_wrapped(setup, prep, &[])
    }

    /// Like `start_with_dir_prep`, the launcher run under `wrapper` (a command and its
    /// arguments, e.g. `["prlimit", "--nproc=8"]`).
    pub fn start_wrapped(setup: Setup, prep: impl FnOnce(&Path), wrapper: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        prep(dir.path());
        let config_path = dir.path().join("collector.toml");
        let text = setup
            .render(dir.path())
            .replace(
                "\"PIDFILE\"",
                &format!("\"{}/collector.pid\"", dir.path().display()),
            )
            .replace("\"RUNDIR/", &format!("\"{}/run/", dir.path().display()));
        std::fs::write(&config_path, text).expect("write config");
        let mut d = Daemon {
            child: None,
            dir,
            config_path,
            udp: None,
            tcp: None,
            rpc: None,
            workers: setup.workers,
            db_file: setup.db_file.clone(),
            env: setup.env.clone(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn(&[]);
        d
    }

    /// Spawn the launcher (in its own process group, so drop can kill every process).
    pub fn spawn(&mut self, extra_args: &[&str]) {
        use std::os::unix::process::CommandExt;
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin("collector"));
                c
            }
            None => Command::new(bin("collector")),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config_path)
            .args(extra_args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("stderr.log")).expect("stderr log"),
            ))
            .process_group(0)
            .spawn()
            .expect("spawn collector");
        self.child = Some(child);
        self.wait_serving(self.workers);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn db_path(&self) -> PathBuf {
        self.path(&self.db_file)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path("control.sock")
    }

    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.path("collector.log")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.path("stderr.log")).unwrap_or_default());
        s
    }

    /// Count log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Wait until the launcher logged its addresses and `n` workers said they serve.
    pub fn wait_serving(&mut self, n: usize) {
        let ok = wait_for(Duration::from_secs(30), || {
            let log = self.log();
            let line = log.lines().rev().find(|l| l.contains("listening:"))?;
            let serving = log.lines().filter(|l| l.contains("serving")).count();
            (serving >= n).then(|| line.to_string())
        });
        let Some(line) = ok else {
            panic!("collector did not start serving; log:\n{}", self.log());
        };
        let addr = |tag: &str| -> Option<SocketAddr> {
            let rest = line.split(&format!("{tag} ")).nth(1)?;
            rest.split([',', ' ']).next()?.parse().ok()
        };
        self.udp = addr("udp");
        self.tcp = addr("tcp");
        self.rpc = addr("rpc");
    }

    /// The HTTP metrics endpoint's address, from the launcher's log line.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("metrics endpoint http://"))?;
        let rest = line.split("metrics endpoint http://").nth(1)?;
        rest.split('/').next()?.parse().ok()
    }

    pub fn send_signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait for the launcher to exit; returns its exit status code (None: killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        let r = wait_for(timeout, || child.try_wait().ok().flatten());
        if r.is_some() {
            self.child = None;
        }
        r.map(|s| s.code())
    }

    /// Run `collectorctl --config <ours>` with `args`; (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("collectorctl"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run collectorctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.db_path()).expect("open db");
        c.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        c
    }

    pub fn count_samples(&self) -> i64 {
        if !self.db_path().exists() {
            return 0;
        }
        self.db()
            .query_row("SELECT count(*) FROM sample", [], |r| r.get(0))
            .unwrap_or(0)
    }

    /// Wait until at least `n` samples are stored; returns the count seen last.
    pub fn wait_samples(&self, n: i64, timeout: Duration) -> i64 {
        let mut last = 0;
        wait_for(timeout, || {
            last = self.count_samples();
            (last >= n).then_some(())
        });
        last
    }

    pub fn message_ids(&self) -> Vec<String> {
        let c = self.db();
        let mut st = c.prepare("SELECT message_id FROM sample").expect("prepare");
        let rows = st.query_map([], |r| r.get::<_, String>(0)).expect("query");
        rows.map(|r| r.expect("row")).collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id() as i32;
            // SAFETY: signalling our own process group.
            unsafe { libc::kill(pgid, libc::SIGTERM) };
            let done = wait_for(Duration::from_secs(5), || c.try_wait().ok().flatten());
            if done.is_none() {
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = c.wait();
            }
            // Workers left behind (if any) die with the group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

// ------------------------------------------------------------------ samples

fn s(x: &str) -> Value {
    Value::Str(x.into())
}

/// A ceilometer-like sample map, signed with `secret`.
pub fn sample(id: &str, secret: &str) -> Value {
    sample_with(id, secret, "cpu", 1000 + id.len() as i64)
}

pub fn sample_with(id: &str, secret: &str, meter: &str, volume: i64) -> Value {
    let mut v = Value::Map(vec![
        (s("source"), s("openstack")),
        (s("counter_name"), s(meter)),
        (s("counter_type"), s("cumulative")),
        (s("counter_unit"), s("ns")),
        (s("counter_volume"), Value::Int(volume)),
        (s("user_id"), s("user-1")),
        (s("project_id"), s("proj-1")),
        (s("user_name"), Value::Nil),
        (s("project_name"), Value::Nil),
        (s("resource_id"), s("res-1")),
        (s("timestamp"), s("2026-11-01T12:00:00.000000+02:00")),
        (
            s("resource_metadata"),
            Value::Map(vec![
                (s("display_name"), s("vm-1")),
                (
                    s("flavor"),
                    Value::Map(vec![
                        (s("name"), s("m1.small")),
                        (s("vcpus"), Value::Int(2)),
                    ]),
                ),
                (s("tags"), Value::Array(vec![s("a"), Value::Int(1)])),
            ]),
        ),
        (s("message_id"), s(id)),
        (s("monotonic_time"), Value::Nil),
    ]);
    meter::signature::sign(&mut v, secret);
    v
}

pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    meter::encode::encode_value(v, &mut out);
    out
}

/// The bytes of ceilometer's `tcp://` publisher: u64 LE length + msgpack.
pub fn tcp_frame(v: &Value) -> Vec<u8> {
    let body = encode(v);
    let mut out = (body.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub fn send_udp(to: SocketAddr, payloads: &[Vec<u8>]) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    for p in payloads {
        sock.send_to(p, to).expect("send udp");
    }
}

/// `[0, msgid, "record_metering_data", [[samples...]]]`.
pub fn rpc_request(msgid: u64, samples: Vec<Value>) -> Vec<u8> {
    encode(&Value::Array(vec![
        Value::Int(0),
        Value::Int(msgid as i64),
        s("record_metering_data"),
        Value::Array(vec![Value::Array(samples)]),
    ]))
}

/// A decoded RPC response.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub msgid: u64,
    pub error: Option<String>,
    pub stored: i64,
    pub duplicates: i64,
    pub rejected: i64,
}

/// A blocking MessagePack-RPC client over TCP.
pub struct RpcClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    next: u64,
}

impl RpcClient {
    pub fn connect(addr: SocketAddr) -> std::io::Result<RpcClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(RpcClient {
            stream,
            buf: Vec::new(),
            next: 1,
        })
    }

    pub fn send(&mut self, samples: Vec<Value>) -> std::io::Result<u64> {
        let id = self.next;
        self.next += 1;
        self.stream.write_all(&rpc_request(id, samples))?;
        Ok(id)
    }

    pub fn call(&mut self, samples: Vec<Value>) -> std::io::Result<Response> {
        self.send(samples)?;
        self.recv()
    }

    pub fn recv(&mut self) -> std::io::Result<Response> {
        loop {
            match meter::decode::read_value(&self.buf, &meter::decode::Limits::default()) {
                Ok((v, n)) => {
                    self.buf.drain(..n);
                    return parse_response(v).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "bad response")
                    });
                }
                Err(meter::decode::DecodeError::Incomplete) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                }
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

pub fn parse_response(v: Value) -> Option<Response> {
    let Value::Array(items) = v else { return None };
    if items.len() != 4 || items[0] != Value::Int(1) {
        return None;
    }
    let msgid = match &items[1] {
        Value::Int(i) => *i as u64,
        _ => return None,
    };
    let error = items[2].as_str().map(str::to_string);
    let num = |k: &str| match items[3].get(k) {
        Some(Value::Int(i)) => *i,
        _ => -1,
    };
    Some(Response {
        msgid,
        error,
        stored: num("stored"),
        duplicates: num("duplicates"),
        rejected: num("rejected"),
    })
}

/// The signature vectors produced by the real ceilometer code (copied into the repo).
pub fn vectors() -> Vec<serde_json::Value> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/meter/tests/data/signatures.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str::<Vec<serde_json::Value>>(&text).expect("vectors json")
}

// ------------------------------------------------------------------ ceilometer's publishers

/// Python with PyPI's `ceilometer` publishers: `ceilometer` itself without its service
/// dependencies, plus what the udp/tcp publishers need (msgpack, oslo.config/log/utils) and
/// what the notifier publisher needs (oslo.messaging, kombu). Built once per target dir and
/// shared by every test process (under a file lock).
pub fn ceilometer_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-venv");
    let python = root.join("bin/python");
    let stamp = root.join(".complete");
    std::fs::create_dir_all(root.parent().unwrap()).expect("target dir");
    let lock = std::fs::File::create(root.with_extension("lock")).expect("venv lock");
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file we hold open; released when `lock` is dropped.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    // The stamp names what was installed, so a changed list rebuilds the venv.
    const WANT: &str =
        "ceilometer==27.0.0 msgpack oslo.config oslo.log oslo.utils stevedore oslo.messaging kombu";
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(WANT) {
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run python");
            assert!(
                out.status.success(),
                "{cmd:?} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = std::fs::remove_dir_all(&root);
        run(Command::new("python3").args(["-m", "venv"]).arg(&root));
        // --no-deps: the publishers need only these, not ceilometer's whole service stack.
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "ceilometer==27.0.0",
        ]));
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "msgpack",
            "oslo.config",
            "oslo.log",
            "oslo.utils",
            "stevedore",
            "oslo.messaging",
            "kombu",
        ]));
        std::fs::write(&stamp, WANT).expect("stamp");
    }
    drop(lock);
    python
}

/// Publish `count` samples with ceilometer's `UDPPublisher` or `TCPPublisher`; returns their
/// message ids.
pub fn ceilometer_publish(
    kind: &str,
    to: SocketAddr,
    secret: &str,
    count: usize,
    prefix: &str,
) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/publish.py");
    let out = Command::new(ceilometer_python())
        .arg(script)
        .args([
            kind,
            &to.ip().to_string(),
            &to.port().to_string(),
            secret,
            &count.to_string(),
            prefix,
        ])
        .output()
        .expect("run publisher");
    assert!(
        out.status.success(),
        "publisher failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

// ------------------------------------------------------------------ launcher helpers

impl Daemon {
    /// `collectorctl status --json`.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.ctl(&["status", "--json"]);
        assert_eq!(code, 0, "collectorctl status failed: {err}");
        serde_json::from_str(&out).expect("status json")
    }

    /// Pids of workers of the serving generation in state `ready`.
    pub fn ready_workers(&self) -> Vec<i32> {
        let s = self.status();
        let gen = s["generation"].as_u64().unwrap_or(0);
        s["workers"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .filter(|w| w["generation"].as_u64() == Some(gen) && w["state"] == "ready")
                    .filter_map(|w| w["pid"].as_i64().map(|p| p as i32))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Wait until exactly `n` ready workers serve, none of them in `not`; returns their pids.
    pub fn wait_workers(&self, n: usize, not: &[i32], timeout: Duration) -> Vec<i32> {
        let mut last = Vec::new();
        let ok = wait_for(timeout, || {
            last = self.ready_workers();
            (last.len() == n && !last.iter().any(|p| not.contains(p))).then_some(())
        });
        assert!(
            ok.is_some(),
            "wanted {n} ready workers not in {not:?}, have {last:?}; log:\n{}",
            self.log()
        );
        last
    }

    /// `collectorctl stats` as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let (code, out, err) = self.ctl(&["stats"]);
        assert_eq!(code, 0, "collectorctl stats failed: {err}");
        serde_json::from_str(&out).expect("stats json")
    }
}

/// Child processes of `pid` (from /proc), zombies included.
pub fn children_of(pid: i32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim().to_string()) else {
                continue;
            };
            let mut f = rest.split_whitespace();
            let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
            let ppid: i32 = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            if ppid == pid {
                out.push((p, state));
            }
        }
    }
    out
}

pub fn alive(pid: i32) -> bool {
    // A zombie still "exists" for kill(0): look at its state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim().starts_with('Z')),
        Err(_) => false,
    }
}

// ------------------------------------------------------------------ process probes

/// Field `name` of /proc/PID/status in KiB (`VmRSS`, `VmHWM`), 0 if unreadable.
pub fn proc_status_kib(pid: i32, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{name}:")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (utime + stime, in clock ticks) a process has used so far.
pub fn cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    // After the comm: state(0) ppid(1) ... utime(11) stime(12).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

impl Daemon {
    /// The pid of the only ready worker (asserts there is exactly one).
    pub fn worker_pid(&self) -> i32 {
        let pids = self.wait_workers(1, &[], Duration::from_secs(30));
        pids[0]
    }

    /// Wait until the workers' summed counter `name` (from `collectorctl status`) reaches `n`.
    pub fn wait_counter(&self, name: &str, n: u64, timeout: Duration) -> u64 {
        let mut last = 0;
        wait_for(timeout, || {
            let s = self.status();
            last = s["workers"]
                .as_array()
                .map(|ws| ws.iter().filter_map(|w| w["counters"][name].as_u64()).sum())
                .unwrap_or(0);
            (last >= n).then_some(())
        });
        last
    }
}

/// A loopback TCP proxy in front of a server (a database, for the storage-outage tests): while "down" it accepts and at once closes
/// connections (a restarting server); `cut` severs every open connection (a crash).
pub struct Proxy {
    /// `127.0.0.1:port` to connect to instead of the server.
    pub addr: String,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, stop2, open2) = (up.clone(), stop.clone(), open.clone());
        let target = target.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                {
                    let mut o = open2.lock().unwrap();
                    o.push(client.try_clone().unwrap());
                    o.push(server.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy {
            addr,
            up,
            stop,
            open,
        }
    }

    /// While down, new connections are closed at once (a restarting server).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// Sever every open connection (a crash, from the client's side).
    pub fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(&self.addr);
    }
}
