//! A toy launcher + worker for the supervisor's integration tests (tests/ run it as a real
//! process). Not installed anywhere; configured by environment variables:
//!
//! - `TOY_DIR` (required, absolute): where files are written. Each worker writes
//!   `start-<pid>` ("generation slot") when it starts, `stopped-<pid>` when it obeys `Stop`,
//!   `reopened-<pid>` on `ReopenLogs`, `orphaned-<pid>` when its link reports the launcher
//!   gone. The launcher keeps `status` current (one `worker <pid> <slot> <generation>
//!   <state> <heartbeats>` line per worker), appends to `events`, and serves a control
//!   socket `ctl.sock` (lines: `workers N`, `ping`, `reload`, `stop`).
//! - `TOY_WORKERS` (default 2), `TOY_PIDFILE`, `TOY_DAEMON=1`, `TOY_USER`, `TOY_GROUP`.
//! - Worker behaviour: `TOY_CRASH_ON_START=1` (exit 1 at once), `TOY_BOOT_ERROR=1` (exit with
//!   the boot error code), `TOY_SILENT=1` (ready, then no heartbeat), `TOY_DROP_LINK=1`
//!   (ready, then closes its link and lives on), `TOY_IGNORE_STOP=1`,
//!   `TOY_HEARTBEAT_MS` (default 100).
//! - Timeouts in ms: `TOY_WORKER_TIMEOUT_MS`, `TOY_BOOT_TIMEOUT_MS`, `TOY_GRACEFUL_MS`,
//!   `TOY_KILL_GRACE_MS`.
//! - Reload: the hook refuses when `<TOY_DIR>/reload-refuse` exists; the new generation
//!   never gets ready when `<TOY_DIR>/reload-hang` exists, exits with the boot error code when
//!   `<TOY_DIR>/reload-boot-error` exists.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};
use supervisor::daemon::{daemonize, drop_privileges, Daemonized, Pidfile};
use supervisor::{
    ChildLink, Command, Error, Hooks, Interest, LinkError, Pid, Settings, Supervisor,
    SupervisorEvent, SupervisorHandle, Token, Worker, WorkerContext, BOOT_ERROR,
};

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// How a toy worker behaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    CrashOnStart,
    BootError,
    Silent,
    NeverReady,
    DropLink,
}

struct ToyWorker {
    dir: PathBuf,
    mode: Mode,
    ignore_stop: bool,
    heartbeat: Duration,
}

fn touch(path: &Path, content: &str) {
    let _ = fs::write(path, content);
}

impl Worker for ToyWorker {
    fn run(&self, mut link: ChildLink, ctx: WorkerContext) -> i32 {
        let pid = std::process::id();
        touch(
            &self.dir.join(format!("start-{pid}")),
            &format!("{} {}\n", ctx.generation, ctx.slot),
        );
        match self.mode {
            Mode::CrashOnStart => return 1,
            Mode::BootError => return BOOT_ERROR,
            _ => {}
        }
        if self.mode != Mode::NeverReady && link.ready().is_err() {
            return 1;
        }
        if self.mode == Mode::DropLink {
            // A broken worker: alive but deaf. Only SIGTERM/SIGKILL end it.
            drop(link);
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        let mut beats = 0u64;
        loop {
            match link.recv_timeout(self.heartbeat) {
                Ok(Some(Command::Stop)) => {
                    touch(&self.dir.join(format!("stopped-{pid}")), "");
                    if !self.ignore_stop {
                        return 0;
                    }
                }
                Ok(Some(Command::ReopenLogs)) => {
                    touch(&self.dir.join(format!("reopened-{pid}")), "")
                }
                Ok(Some(Command::Custom(msg))) => {
                    let answer = format!(
                        "{} {pid} {}",
                        String::from_utf8_lossy(&msg).replace("ping", "pong"),
                        ctx.generation
                    );
                    let _ = link.reply(answer.as_bytes());
                }
                Ok(None) => {}
                Err(LinkError::Closed) => {
                    touch(&self.dir.join(format!("orphaned-{pid}")), "");
                    return 0;
                }
                Err(_) => return 1,
            }
            if self.mode == Mode::Normal {
                beats += 1;
                let _ = link.heartbeat(format!("{{\"beats\":{beats}}}").as_bytes());
            }
        }
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Pids whose `pong` this connection still waits for, and the answers so far.
    waiting: Vec<Pid>,
    answers: Vec<String>,
}

struct ToyHooks {
    dir: PathBuf,
    listener: UnixListener,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    last_status: String,
    startup: Daemonized,
}

const LISTENER: Token = Token(0);

impl ToyHooks {
    fn event_line(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("events"))
        {
            let _ = writeln!(f, "{line}");
        }
    }

    fn write_status(&mut self, sup: &SupervisorHandle<'_>) {
        let mut s = format!(
            "launcher {}\ngeneration {}\ntarget {}\n",
            std::process::id(),
            sup.generation(),
            sup.settings().workers
        );
        for w in sup.workers() {
            s += &format!(
                "worker {} {} {} {:?} {}\n",
                w.pid, w.slot, w.generation, w.state, w.heartbeats
            );
        }
        if s != self.last_status {
            let tmp = self.dir.join("status.tmp");
            if fs::write(&tmp, &s).is_ok() {
                let _ = fs::rename(&tmp, self.dir.join("status"));
            }
            self.last_status = s;
        }
    }

    fn accept(&mut self, sup: &mut SupervisorHandle<'_>) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if sup
                        .register_extra(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        self.conns.insert(
                            token,
                            Conn {
                                stream,
                                buf: Vec::new(),
                                waiting: Vec::new(),
                                answers: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn read_conn(&mut self, sup: &mut SupervisorHandle<'_>, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut closed = false;
        let mut chunk = [0u8; 1024];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        while let Some(nl) = conn.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            let mut words = line.split_whitespace();
            let answer = match (words.next(), words.next()) {
                (Some("workers"), Some(n)) => match n.parse() {
                    Ok(n) => {
                        sup.set_workers(n);
                        Some("ok".to_string())
                    }
                    Err(_) => Some("error: bad count".to_string()),
                },
                (Some("reload"), None) => {
                    sup.request_reload();
                    Some("ok".to_string())
                }
                (Some("stop"), None) => {
                    sup.request_stop(supervisor::StopMode::Graceful);
                    Some("ok".to_string())
                }
                (Some("ping"), None) => {
                    conn.waiting = sup.broadcast(&Command::Custom(b"ping".to_vec()));
                    conn.answers.clear();
                    None
                }
                _ => Some(format!("error: unknown command {line:?}")),
            };
            if let Some(a) = answer {
                let _ = conn.stream.write_all(format!("{a}\n").as_bytes());
            }
        }
        if closed {
            if let Some(mut conn) = self.conns.remove(&token) {
                let _ = sup.deregister_extra(&mut conn.stream);
            }
        }
    }

    fn on_reply(&mut self, pid: Pid, payload: &[u8]) {
        for conn in self.conns.values_mut() {
            if let Some(i) = conn.waiting.iter().position(|p| *p == pid) {
                conn.waiting.remove(i);
                conn.answers
                    .push(String::from_utf8_lossy(payload).into_owned());
                if conn.waiting.is_empty() {
                    conn.answers.sort();
                    let text = conn.answers.join("\n") + "\n";
                    let _ = conn.stream.write_all(text.as_bytes());
                }
            }
        }
    }
}

impl Hooks for ToyHooks {
    fn reload(&mut self, _sup: &mut SupervisorHandle<'_>) -> Result<Box<dyn Worker>, String> {
        if self.dir.join("reload-refuse").exists() {
            return Err("reload-refuse is present".to_string());
        }
        let mode = if self.dir.join("reload-hang").exists() {
            Mode::NeverReady
        } else if self.dir.join("reload-boot-error").exists() {
            Mode::BootError
        } else {
            Mode::Normal
        };
        Ok(Box::new(ToyWorker {
            dir: self.dir.clone(),
            mode,
            ignore_stop: false,
            heartbeat: env_ms("TOY_HEARTBEAT_MS").unwrap_or(Duration::from_millis(100)),
        }))
    }

    fn reopen_logs(&mut self) {
        self.event_line("reopen-logs");
    }

    fn on_extra_ready(
        &mut self,
        sup: &mut SupervisorHandle<'_>,
        token: Token,
        _event: &mio::event::Event,
    ) {
        if token == LISTENER {
            self.accept(sup);
        } else {
            self.read_conn(sup, token);
        }
    }

    fn on_event(&mut self, sup: &mut SupervisorHandle<'_>, event: SupervisorEvent) {
        let line = match &event {
            SupervisorEvent::WorkerStarted { pid, .. } => format!("started {pid}"),
            SupervisorEvent::WorkerReady { pid, .. } => format!("ready {pid}"),
            SupervisorEvent::WorkerExited {
                pid,
                status,
                expected,
                ..
            } => format!("exited {pid} {status} expected={expected}"),
            SupervisorEvent::GenerationReady {
                generation,
                previous,
            } => {
                self.startup.notify_ready();
                format!("generation-ready {generation} {previous:?}")
            }
            SupervisorEvent::ReloadStarted { generation } => format!("reload-started {generation}"),
            SupervisorEvent::ReloadFailed { generation, reason } => {
                format!("reload-failed {generation:?} {reason}")
            }
            SupervisorEvent::Stopping { mode } => format!("stopping {mode:?}"),
            SupervisorEvent::Reply { pid, payload, .. } => {
                self.on_reply(*pid, payload);
                format!("reply {pid}")
            }
            other => format!("{other:?}"),
        };
        self.event_line(&line);
        self.write_status(sup);
    }

    fn on_tick(&mut self, sup: &mut SupervisorHandle<'_>) {
        self.write_status(sup);
    }
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        eprintln!(
            "[toy {}] {} {}",
            std::process::id(),
            record.level(),
            record.args()
        );
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(log::LevelFilter::Debug);
    let Some(dir) = std::env::var_os("TOY_DIR").map(PathBuf::from) else {
        eprintln!("TOY_DIR is required");
        return ExitCode::from(2);
    };

    let pidfile = match std::env::var_os("TOY_PIDFILE") {
        Some(p) => match Pidfile::acquire(p) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let mut startup = if env_flag("TOY_DAEMON") {
        match daemonize() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        }
    } else {
        Daemonized::foreground()
    };
    let mut pidfile = pidfile;
    if let Some(p) = pidfile.as_mut() {
        if let Err(e) = p.write_pid() {
            startup.notify_failure(1, &e.to_string());
            return ExitCode::from(1);
        }
    }

    let sock_path = dir.join("ctl.sock");
    let _ = fs::remove_file(&sock_path);
    let mut listener = match UnixListener::bind(&sock_path) {
        Ok(l) => l,
        Err(e) => {
            startup.notify_failure(1, &format!("bind {}: {e}", sock_path.display()));
            return ExitCode::from(1);
        }
    };

    if let Err(e) = drop_privileges(
        std::env::var("TOY_USER").ok().as_deref(),
        std::env::var("TOY_GROUP").ok().as_deref(),
    ) {
        startup.notify_failure(1, &e.to_string());
        return ExitCode::from(1);
    }

    let defaults = Settings::default();
    let settings = Settings {
        workers: std::env::var("TOY_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
        worker_timeout: env_ms("TOY_WORKER_TIMEOUT_MS").unwrap_or(defaults.worker_timeout),
        boot_timeout: env_ms("TOY_BOOT_TIMEOUT_MS").unwrap_or(defaults.boot_timeout),
        graceful_shutdown_timeout: env_ms("TOY_GRACEFUL_MS")
            .unwrap_or(defaults.graceful_shutdown_timeout),
        kill_grace: env_ms("TOY_KILL_GRACE_MS").unwrap_or(defaults.kill_grace),
        ..defaults
    };
    let mode = if env_flag("TOY_CRASH_ON_START") {
        Mode::CrashOnStart
    } else if env_flag("TOY_BOOT_ERROR") {
        Mode::BootError
    } else if env_flag("TOY_SILENT") {
        Mode::Silent
    } else if env_flag("TOY_DROP_LINK") {
        Mode::DropLink
    } else {
        Mode::Normal
    };
    let worker = ToyWorker {
        dir: dir.clone(),
        mode,
        ignore_stop: env_flag("TOY_IGNORE_STOP"),
        heartbeat: env_ms("TOY_HEARTBEAT_MS").unwrap_or(Duration::from_millis(100)),
    };

    let mut sup = match Supervisor::new(settings, Box::new(worker)) {
        Ok(s) => s,
        Err(e) => {
            startup.notify_failure(1, &e.to_string());
            return ExitCode::from(1);
        }
    };
    {
        let mut handle = sup.handle();
        if let Err(e) = handle.register_extra(&mut listener, LISTENER, Interest::READABLE) {
            startup.notify_failure(1, &e.to_string());
            return ExitCode::from(1);
        }
        if let Some(p) = &pidfile {
            handle.close_in_children(p.raw_fd());
        }
        if let Some(fd) = startup.raw_fd() {
            handle.close_in_children(fd);
        }
    }
    let mut hooks = ToyHooks {
        dir: dir.clone(),
        listener,
        conns: HashMap::new(),
        next_token: 1,
        last_status: String::new(),
        startup,
    };
    let result = sup.run(&mut hooks);
    let _ = fs::remove_file(&sock_path);
    match result {
        Ok(reason) => {
            hooks.event_line(&format!("exit {reason:?}"));
            ExitCode::SUCCESS
        }
        Err(e @ Error::BootError { .. }) => {
            hooks
                .startup
                .notify_failure(BOOT_ERROR as u8, &e.to_string());
            hooks.event_line(&format!("boot-error {e}"));
            eprintln!("{e}");
            ExitCode::from(BOOT_ERROR as u8)
        }
        Err(e) => {
            hooks.startup.notify_failure(1, &e.to_string());
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
