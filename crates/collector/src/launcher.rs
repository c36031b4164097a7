//! The launcher: the daemon's parent process, on the `supervisor` crate.
//!
//! Start-up order matters and is deliberate: pidfile lock (a second daemon is refused before
//! it touches anything), daemonize, logging, bind every socket (errors reach the terminal or
//! init script through the daemon's readiness pipe), control socket, privilege drop, then
//! fork the workers. The pidfile records the daemon's pid, and `--daemon` returns, only once
//! every worker of the first generation serves.
//!
//! The launcher never starts a thread (fork discipline) and never opens storage: workers do,
//! after fork.

use crate::config::Config;
use crate::control::{ControlServer, Request};
use crate::counters::Counters;
use crate::http::{HttpServer, Response};
use crate::metrics::{Restarts, Snapshot, WorkerProc};
use crate::sockets::{Addresses, Listeners, UdpGroup};
use crate::worker::{Custom, Worker};
use serde_json::{json, Value as Json};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};
use supervisor::daemon::{self, Daemonized, Pidfile};
use supervisor::{
    ChildLink, Hooks, Pid, Settings, StopMode, Supervisor, SupervisorEvent, SupervisorHandle,
    Token, WorkerContext, WorkerExit,
};

/// Command-line values that win over the config file, also after a reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub workers: Option<usize>,
    pub pidfile: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config_path: Option<PathBuf>,
    pub daemon: bool,
    pub verbosity: u8,
    pub overrides: Overrides,
}

/// The worker entry point the supervisor forks: a config and the launcher's sockets.
struct CollectorWorker {
    cfg: Config,
    listeners: Rc<Listeners>,
    /// The launcher's one UDP group (`udp_reuseport`; empty otherwise), shared by every
    /// generation: the launcher only ever holds the sockets of the current one.
    udp_group: Rc<RefCell<UdpGroup>>,
}

impl CollectorWorker {
    /// This worker's own descriptors for the inherited sockets: the launcher keeps its copies.
    /// With a UDP group, the worker takes its slot's socket and closes the copies fork gave
    /// it of the other slots' sockets: a socket the launcher lets go of (fewer workers) must
    /// leave the group when its own worker exits, not live on unread in another worker.
    fn take_sockets(&self, slot: usize) -> std::io::Result<Listeners> {
        let mut listeners = self.listeners.try_clone()?;
        let mut group = self.udp_group.borrow_mut();
        if !group.is_empty() {
            listeners.udp = group.socket_for(slot).map(|s| s.try_clone()).transpose()?;
            // Fork made this process a copy of the launcher: these are copies too.
            group.clear();
        }
        Ok(listeners)
    }
}

impl supervisor::Worker for CollectorWorker {
    fn run(&self, link: ChildLink, ctx: WorkerContext) -> i32 {
        crate::logging::set_worker(ctx.slot);
        let listeners = match self.take_sockets(ctx.slot) {
            Ok(l) => l,
            Err(e) => {
                log::error!("worker cannot take its sockets: {e}");
                return 1;
            }
        };
        match Worker::new(self.cfg.clone(), listeners, Some(link), ctx.slot) {
            Ok(w) => w.run(),
            Err(e) if e.is_permanent() => {
                log::error!("worker cannot start: {e}");
                supervisor::BOOT_ERROR
            }
            Err(e) => {
                // A crash like any other: the launcher respawns it with backoff.
                log::error!("worker cannot start (will be retried): {e}");
                1
            }
        }
    }
}

fn settings_of(cfg: &Config) -> Settings {
    Settings {
        workers: cfg.worker_count(),
        worker_timeout: Duration::from_secs_f64(cfg.service.worker_timeout),
        graceful_shutdown_timeout: Duration::from_secs_f64(cfg.service.graceful_shutdown_timeout),
        ..Settings::default()
    }
}

/// Make relative paths absolute against the start directory: a daemon runs in `/`.
fn absolutize(cfg: &mut Config, base: &Path) {
    let abs = |p: &mut String| {
        if !p.is_empty() && Path::new(p.as_str()).is_relative() {
            *p = base.join(&*p).display().to_string();
        }
    };
    abs(&mut cfg.service.pidfile);
    abs(&mut cfg.service.control_socket);
    abs(&mut cfg.service.log_file);
    abs(&mut cfg.collector.rpc_socket);
    abs(&mut cfg.dispatcher_file.file_path);
    // sqlite:///relative/path → sqlite:////abs/path
    if let Some(rest) = cfg.database.connection.strip_prefix("sqlite:///") {
        if !rest.starts_with('/') && !rest.is_empty() && !rest.starts_with(':') {
            cfg.database.connection = format!("sqlite:///{}", base.join(rest).display());
        }
    }
}

fn apply_overrides(cfg: &mut Config, o: &Overrides) {
    if let Some(n) = o.workers {
        cfg.service.workers = n;
    }
    if let Some(p) = &o.pidfile {
        cfg.service.pidfile = p.display().to_string();
    }
    if let Some(p) = &o.log_file {
        cfg.service.log_file = p.display().to_string();
    }
}

pub fn run(mut cfg: Config, mut opts: Options) -> u8 {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    if opts.daemon {
        absolutize(&mut cfg, &cwd);
    }
    if let Some(p) = opts.config_path.as_mut() {
        if p.is_relative() {
            *p = cwd.join(&*p);
        }
    }
    // 1. The pidfile lock: refuse a second daemon before touching anything.
    let mut pidfile = if cfg.service.pidfile.is_empty() {
        None
    } else {
        if let Some(dir) = Path::new(&cfg.service.pidfile).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match Pidfile::acquire(&cfg.service.pidfile) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("collector: {e}");
                return 1;
            }
        }
    };
    // 2. Detach.
    let mut daemonized = if opts.daemon {
        match daemon::daemonize() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("collector: {e}");
                return 1;
            }
        }
    } else {
        Daemonized::foreground()
    };
    let fail = |d: &mut Daemonized, code: u8, msg: String| -> u8 {
        log::error!("{msg}");
        eprintln!("collector: {msg}");
        d.notify_failure(code, &format!("collector: {msg}"));
        code
    };
    if let Some(p) = pidfile.as_mut() {
        if let Err(e) = p.write_pid() {
            return fail(&mut daemonized, 1, e.to_string());
        }
    }
    // 3. Logging (after daemonize: stderr is /dev/null there, the log file is ours).
    if opts.daemon && cfg.service.log_file.is_empty() {
        cfg.service.log_file = cwd.join("data/collector.log").display().to_string();
    }
    let log_file = (!cfg.service.log_file.is_empty()).then_some(cfg.service.log_file.as_str());
    if let Err(e) = crate::logging::init(
        &cfg.service.log_level,
        log_file,
        opts.verbosity,
        &cfg.service.log_format,
    ) {
        return fail(
            &mut daemonized,
            crate::EXIT_CONFIG,
            format!("cannot open log file: {e}"),
        );
    }
    raise_fd_limit();
    // 4. Sockets, bound once for every worker and generation.
    let (addrs, group_addr) = split_addresses(&cfg);
    let listeners = match Listeners::bind(&addrs, None) {
        Ok(l) => l,
        Err(e) => return fail(&mut daemonized, crate::EXIT_BOOT_ERROR, e.to_string()),
    };
    let udp_group = match &group_addr {
        Some(a) => match UdpGroup::bind(a, cfg.worker_count()) {
            Ok(g) => g,
            Err(e) => return fail(&mut daemonized, crate::EXIT_BOOT_ERROR, e.to_string()),
        },
        None => UdpGroup::default(),
    };
    let control = match ControlServer::bind(&cfg.service.control_socket) {
        Ok(c) => c,
        Err(e) => return fail(&mut daemonized, crate::EXIT_BOOT_ERROR, e),
    };
    let http = match cfg.metrics_endpoint() {
        Some(addr) => match HttpServer::bind(&addr, HTTP_TOKENS, crate::http::Limits::default()) {
            Ok(h) => Some(h),
            Err(e) => {
                return fail(
                    &mut daemonized,
                    crate::EXIT_BOOT_ERROR,
                    format!("cannot bind the metrics endpoint on {addr}: {e}"),
                )
            }
        },
        None => None,
    };
    log::info!("listening: {}", describe(&listeners, &udp_group));
    if !udp_group.is_empty() {
        log::info!(
            "udp: {} SO_REUSEPORT sockets, one per worker",
            udp_group.len()
        );
    }
    log::info!("control socket {}", cfg.service.control_socket);
    if let Some(h) = &http {
        log::info!(
            "metrics endpoint http://{}/metrics (also /healthz, /readyz)",
            h.local_addr()
        );
    }
    // 5. Privileges, once everything privileged is done.
    let user = (!cfg.service.user.is_empty()).then_some(cfg.service.user.as_str());
    let group = (!cfg.service.group.is_empty()).then_some(cfg.service.group.as_str());
    if user.is_some() || group.is_some() {
        if let Err(e) = control.chown_to(user, group) {
            return fail(&mut daemonized, crate::EXIT_BOOT_ERROR, e);
        }
        // Once unprivileged, we could not remove the pidfile from its directory at exit.
        if let Some(p) = pidfile.as_mut() {
            if let Err(e) = p.keep_removable() {
                log::warn!("the pidfile will not be removed at exit: {e}");
            }
        }
        if let Err(e) = daemon::drop_privileges(user, group) {
            return fail(&mut daemonized, crate::EXIT_BOOT_ERROR, e.to_string());
        }
        log::info!("running as user {:?} group {:?}", user, group);
    }
    // 6. Workers.
    let listeners = Rc::new(listeners);
    let udp_group = Rc::new(RefCell::new(udp_group));
    let worker = CollectorWorker {
        cfg: cfg.clone(),
        listeners: listeners.clone(),
        udp_group: udp_group.clone(),
    };
    let mut sup = match Supervisor::new(settings_of(&cfg), Box::new(worker)) {
        Ok(s) => s,
        Err(e) => return fail(&mut daemonized, 1, e.to_string()),
    };
    let mut launcher = Launcher {
        udp_reuseport: cfg.collector.udp_reuseport,
        cfg,
        opts,
        addrs,
        listeners,
        udp_group,
        control,
        daemonized,
        pidfile_fd: pidfile.as_ref().map(Pidfile::raw_fd),
        started: Instant::now(),
        ready_once: false,
        pending_reloads: Vec::new(),
        pending_introspect: HashMap::new(),
        history: HashMap::new(),
        retired: Counters::new(),
        respawns: 0,
        last_stats: HashMap::new(),
        http,
        restarts: Restarts::default(),
        hung: HashSet::new(),
        reloads_ok: 0,
        reloads_failed: 0,
        last_commit_unix_ms: None,
    };
    {
        let mut h = sup.handle();
        if let Some(fd) = launcher.pidfile_fd {
            h.close_in_children(fd);
        }
        if let Some(fd) = pidfile.as_ref().and_then(Pidfile::keeper_fd) {
            h.close_in_children(fd);
        }
        if let Some(fd) = launcher.daemonized.raw_fd() {
            h.close_in_children(fd);
        }
        if let Err(e) = launcher.control.register(&mut h) {
            return fail(&mut launcher.daemonized, 1, e);
        }
        if let Some(http) = launcher.http.as_mut() {
            if let Err(e) = http.register(&mut h) {
                return fail(
                    &mut launcher.daemonized,
                    1,
                    format!("metrics endpoint: {e}"),
                );
            }
        }
    }
    let result = sup.run(&mut launcher);
    let _ = daemon::sd_notify("STOPPING=1");
    launcher.control.close();
    launcher.http = None;
    if let Ok(mut l) = Rc::try_unwrap(launcher.listeners) {
        l.remove_unix_path();
    }
    drop(pidfile);
    match result {
        Ok(reason) => {
            log::info!(
                "collector stopped ({:?} stop{}, {} workers killed)",
                reason.mode,
                reason
                    .signal
                    .map(|s| format!(" on {s}"))
                    .unwrap_or_default(),
                reason.killed
            );
            if launcher.daemonized.is_pending() {
                launcher
                    .daemonized
                    .notify_failure(1, "collector: stopped before it was ready");
            }
            0
        }
        Err(e) => {
            log::error!("{e}");
            let code = if matches!(e, supervisor::Error::BootError { .. }) {
                crate::EXIT_BOOT_ERROR
            } else {
                1
            };
            launcher
                .daemonized
                .notify_failure(code, &format!("collector: {e} (see the log)"));
            code
        }
    }
}

/// Tokens of the HTTP metrics endpoint start here (the control socket's are below).
const HTTP_TOKENS: usize = 1 << 20;

/// Rates are computed over this window of heartbeats.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How long `worker ID` waits for the worker's answer.
const INTROSPECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Launcher {
    cfg: Config,
    opts: Options,
    /// Addresses of `listeners` (UDP only in shared mode; the group keeps its own).
    addrs: Addresses,
    listeners: Rc<Listeners>,
    /// `udp_reuseport` as started: a reload cannot switch it (the two kinds of socket cannot
    /// share a port while the old one is open).
    udp_reuseport: bool,
    /// One SO_REUSEPORT socket per worker slot (`udp_reuseport`), shared with the workers'
    /// entry points of every generation.
    udp_group: Rc<RefCell<UdpGroup>>,
    control: ControlServer,
    daemonized: Daemonized,
    pidfile_fd: Option<i32>,
    started: Instant,
    ready_once: bool,
    /// Control connections waiting for a reload to finish.
    pending_reloads: Vec<usize>,
    /// Control connections waiting for a worker's introspection reply, with their deadline.
    pending_introspect: HashMap<Pid, Vec<(usize, Instant)>>,
    /// Per worker: (time, samples received, samples stored) of recent heartbeats.
    history: HashMap<Pid, VecDeque<(Instant, u64, u64)>>,
    /// Counters of workers that exited, so sums never go backwards.
    retired: Counters,
    respawns: u64,
    /// Latest counters per live worker.
    last_stats: HashMap<Pid, Counters>,
    /// The HTTP endpoint (/metrics, /healthz, /readyz), when configured.
    http: Option<HttpServer>,
    restarts: Restarts,
    /// Workers seen without a heartbeat for `worker_timeout`: their exit is a `hung` restart.
    hung: HashSet<Pid>,
    reloads_ok: u64,
    reloads_failed: u64,
    /// The newest `last_commit_unix_ms` any worker reported (exited ones included).
    last_commit_unix_ms: Option<i64>,
}

/// What a worker's heartbeat payload holds.
#[derive(serde::Deserialize, Default)]
struct Heartbeat {
    #[serde(default)]
    counters: Counters,
    #[serde(default)]
    connections: u64,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    amqp: Option<Json>,
    /// Whether the worker's last storage write (or probe) succeeded; absent from workers
    /// that do not report it, then `last_error` tells.
    #[serde(default)]
    storage_up: Option<bool>,
    #[serde(default)]
    last_commit_unix_ms: Option<i64>,
    #[serde(default)]
    connections_by_kind: Option<ConnsByKind>,
}

#[derive(serde::Deserialize, Default)]
struct ConnsByKind {
    #[serde(default)]
    tcp: u64,
    #[serde(default)]
    rpc: u64,
}

impl Heartbeat {
    /// Why this worker's storage is down, if it is.
    fn storage_down(&self) -> Option<String> {
        let down = match self.storage_up {
            Some(up) => !up,
            None => self.last_error.is_some(),
        };
        down.then(|| {
            self.last_error
                .clone()
                .unwrap_or_else(|| "storage unavailable".into())
        })
    }
}

fn parse_heartbeat(p: Option<&Vec<u8>>) -> Heartbeat {
    p.and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}

impl Launcher {
    fn load_config(&self) -> Result<Config, String> {
        let mut cfg = Config::load(self.opts.config_path.as_deref()).map_err(|e| e.to_string())?;
        apply_overrides(&mut cfg, &self.opts.overrides);
        if self.opts.daemon {
            let base = self
                .opts
                .config_path
                .as_ref()
                .and_then(|_| std::env::current_dir().ok())
                .unwrap_or_else(|| PathBuf::from("/"));
            absolutize(&mut cfg, &base);
        }
        Ok(cfg)
    }

    fn totals(&self, sup: &SupervisorHandle<'_>) -> Counters {
        let mut total = self.retired.clone();
        for w in sup.workers() {
            let hb = parse_heartbeat(w.last_heartbeat.as_ref());
            total.add(&hb.counters);
        }
        total.respawns = self.respawns;
        total.udp_kernel_drops = self.listeners.udp.as_ref().and_then(udp_drops).unwrap_or(0)
            + self
                .udp_group
                .borrow()
                .sockets()
                .iter()
                .filter_map(udp_drops)
                .sum::<u64>();
        total
    }

    fn rates(&self, pid: Pid) -> (f64, f64) {
        let Some(h) = self.history.get(&pid) else {
            return (0.0, 0.0);
        };
        match (h.front(), h.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                let dt = b.0.duration_since(a.0).as_secs_f64();
                (
                    (b.1 - a.1.min(b.1)) as f64 / dt,
                    (b.2 - a.2.min(b.2)) as f64 / dt,
                )
            }
            _ => (0.0, 0.0),
        }
    }

    fn status(&self, sup: &SupervisorHandle<'_>) -> Json {
        let mut workers: Vec<_> = sup.workers();
        workers.sort_by_key(|w| (w.generation, w.slot));
        let rows: Vec<Json> = workers
            .iter()
            .map(|w| {
                let hb = parse_heartbeat(w.last_heartbeat.as_ref());
                let (rr, sr) = self.rates(w.pid);
                json!({
                    "index": w.slot,
                    "pid": w.pid.as_raw(),
                    "generation": w.generation,
                    "state": format!("{:?}", w.state).to_lowercase(),
                    "uptime_s": w.uptime.as_secs_f64(),
                    "since_heartbeat_s": w.since_heartbeat.map(|d| d.as_secs_f64()),
                    "counters": hb.counters,
                    "connections": hb.connections,
                    "last_error": hb.last_error,
                    "amqp": hb.amqp,
                    "rates": {"received_per_s": rr, "stored_per_s": sr},
                })
            })
            .collect();
        json!({
            "ok": true,
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "config_file": self.opts.config_path.as_ref().map(|p| p.display().to_string()),
            "generation": sup.generation(),
            "booting_generation": sup.booting_generation(),
            "workers_wanted": sup.settings().workers,
            "respawns": self.respawns,
            "workers": rows,
        })
    }

    fn handle_request(&mut self, sup: &mut SupervisorHandle<'_>, conn: usize, req: Request) {
        let reply = |l: &mut Launcher, v: Json| l.control.reply(conn, &v);
        match req {
            Request::Help => {
                let v = json!({"ok": true, "commands": crate::control::HELP});
                reply(self, v);
            }
            Request::Status => {
                let v = self.status(sup);
                reply(self, v);
            }
            Request::Stats => {
                let v = json!({"ok": true, "stats": self.totals(sup)});
                reply(self, v);
            }
            Request::Config => {
                let v = json!({"ok": true, "config": self.cfg.to_masked_toml()});
                reply(self, v);
            }
            Request::Workers(n) => {
                sup.set_workers(n);
                log::info!("workers set to {n} (control socket)");
                reply(self, json!({"ok": true, "workers": n.max(1)}));
            }
            Request::Loglevel(level) => {
                if crate::logging::set_level(&level) {
                    let cmd = serde_json::to_vec(&Custom::Loglevel {
                        level: level.clone(),
                    })
                    .unwrap_or_default();
                    sup.broadcast(&supervisor::Command::Custom(cmd));
                    reply(self, json!({"ok": true, "level": level.to_lowercase()}));
                } else {
                    reply(
                        self,
                        json!({"ok": false, "error": format!("unknown log level {level:?}; known: error, warn, info, debug, trace, off")}),
                    );
                }
            }
            Request::Reload if sup.is_stopping() => {
                reply(
                    self,
                    json!({"ok": false, "error": "the daemon is stopping; not reloading"}),
                );
            }
            Request::Reload => {
                self.pending_reloads.push(conn);
                self.control.set_waiting(conn, true);
                sup.request_reload();
            }
            Request::Stop => {
                reply(self, json!({"ok": true, "pid": std::process::id()}));
                log::info!("stop requested on the control socket");
                sup.request_stop(StopMode::Graceful);
            }
            Request::Worker(id) => {
                let workers = sup.workers();
                let target = workers
                    .iter()
                    .filter(|w| w.generation == sup.generation())
                    .find(|w| id == w.slot.to_string())
                    .or_else(|| workers.iter().find(|w| id == w.pid.as_raw().to_string()))
                    .map(|w| w.pid);
                let Some(pid) = target else {
                    reply(
                        self,
                        json!({"ok": false, "error": format!("no worker {id}")}),
                    );
                    return;
                };
                let cmd = serde_json::to_vec(&Custom::Introspect).unwrap_or_default();
                match sup.send(pid, &supervisor::Command::Custom(cmd)) {
                    Ok(()) => {
                        self.control.set_waiting(conn, true);
                        self.pending_introspect
                            .entry(pid)
                            .or_default()
                            .push((conn, Instant::now() + INTROSPECT_TIMEOUT));
                    }
                    Err(e) => reply(self, json!({"ok": false, "error": e.to_string()})),
                }
            }
            Request::Invalid(msg) => reply(self, json!({"ok": false, "error": msg})),
        }
    }

    /// `Ok` when every worker of the serving generation serves and storage answers, else
    /// the reason (one line) `/readyz` gives.
    fn readiness(&self, sup: &SupervisorHandle<'_>) -> Result<(), String> {
        if sup.is_stopping() {
            return Err("stopping".into());
        }
        let gen = sup.generation();
        let current: Vec<_> = sup
            .workers()
            .into_iter()
            .filter(|w| w.generation == gen)
            .collect();
        let ready = current
            .iter()
            .filter(|w| w.state == supervisor::WorkerState::Ready)
            .count();
        let wanted = sup.settings().workers;
        if ready < wanted {
            return Err(format!(
                "workers restarting: {ready} of {wanted} ready in generation {gen}"
            ));
        }
        for w in &current {
            if let Some(why) = parse_heartbeat(w.last_heartbeat.as_ref()).storage_down() {
                let why: String = why.chars().filter(|c| !c.is_control()).take(200).collect();
                return Err(format!("storage unavailable (worker {}): {why}", w.slot));
            }
        }
        Ok(())
    }

    fn snapshot(&self, sup: &SupervisorHandle<'_>) -> Snapshot {
        let gen = sup.generation();
        let mut all = sup.workers();
        all.sort_by_key(|w| (w.generation, w.slot));
        let mut by_state = [0u64; 3];
        let mut storage_down = 0;
        let mut workers: Vec<WorkerProc> = Vec::new();
        let mut conns = [0u64; 2];
        let mut last_commit = self.last_commit_unix_ms;
        let mut amqp_connected = 0;
        for w in &all {
            let hb = parse_heartbeat(w.last_heartbeat.as_ref());
            if let Some(c) = &hb.connections_by_kind {
                conns[0] += c.tcp;
                conns[1] += c.rpc;
            }
            last_commit = last_commit.max(hb.last_commit_unix_ms);
            if w.generation == gen
                && hb
                    .amqp
                    .as_ref()
                    .and_then(|a| a.get("connected"))
                    .and_then(Json::as_bool)
                    == Some(true)
            {
                amqp_connected += 1;
            }
            by_state[match w.state {
                supervisor::WorkerState::Booting => 0,
                supervisor::WorkerState::Ready => 1,
                supervisor::WorkerState::Stopping => 2,
            }] += 1;
            if w.generation == gen {
                if parse_heartbeat(w.last_heartbeat.as_ref())
                    .storage_down()
                    .is_some()
                {
                    storage_down += 1;
                }
                // One series per slot: a slot being replaced shows its newest process.
                workers.retain(|p| p.index != w.slot);
                workers.push(WorkerProc {
                    index: w.slot,
                    proc: crate::metrics::proc_stats(w.pid.as_raw()),
                });
            }
        }
        let c = &self.cfg.database.connection;
        let driver = if self.cfg.has_dispatcher("database") {
            c.split("://")
                .next()
                .and_then(|s| s.split('+').next())
                .unwrap_or("")
                .to_string()
        } else {
            "file".to_string()
        };
        Snapshot {
            totals: self.totals(sup),
            driver,
            workers,
            workers_by_state: by_state,
            workers_wanted: sup.settings().workers as u64,
            restarts: self.restarts,
            generation: gen,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            ready: self.readiness(sup).is_ok(),
            storage_down_workers: storage_down,
            launcher: crate::metrics::proc_stats(std::process::id() as i32),
            connections_open: conns,
            last_commit_unix_ms: last_commit,
            amqp_connected: (!self.cfg.messaging.transport_url.is_empty())
                .then_some(amqp_connected),
        }
    }

    /// Answer one HTTP request.
    fn http_response(&self, sup: &SupervisorHandle<'_>, req: &crate::http::Request) -> Response {
        match req.path.as_str() {
            "/metrics" => {
                let om = crate::metrics::wants_openmetrics(&req.accept);
                let (body, ct) = crate::metrics::encode(self.snapshot(sup), om);
                Response {
                    status: 200,
                    content_type: ct,
                    body: body.into_bytes(),
                }
            }
            "/healthz" => {
                if sup.is_stopping() {
                    Response::text(503, "stopping")
                } else {
                    Response::text(200, "ok")
                }
            }
            "/readyz" => match self.readiness(sup) {
                Ok(()) => Response::text(200, "ready"),
                Err(why) => Response::text(503, why),
            },
            _ => Response::text(404, "not found; try /metrics, /healthz or /readyz"),
        }
    }

    fn finish_reloads(&mut self, v: Json) {
        for conn in std::mem::take(&mut self.pending_reloads) {
            self.control.set_waiting(conn, false);
            self.control.reply(conn, &v);
        }
    }
}

fn proc_status(pid: Pid) -> (Option<u64>, Option<usize>) {
    let rss = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        });
    let fds = std::fs::read_dir(format!("/proc/{}/fd", pid.as_raw()))
        .ok()
        .map(|d| d.count());
    (rss, fds)
}

impl Hooks for Launcher {
    fn reload(
        &mut self,
        sup: &mut SupervisorHandle<'_>,
    ) -> Result<Box<dyn supervisor::Worker>, String> {
        let _ = daemon::sd_notify("RELOADING=1");
        let result = (|| {
            let mut cfg = self.load_config()?;
            if cfg.collector.udp_reuseport != self.udp_reuseport {
                log::warn!(
                    "udp_reuseport changed: it takes effect at the next restart (a UDP socket of the other kind cannot share the port while this one is open)"
                );
                cfg.collector.udp_reuseport = self.udp_reuseport;
            }
            let (addrs, group_addr) = split_addresses(&cfg);
            let old = self.listeners.try_clone().map_err(|e| e.to_string())?;
            let listeners =
                Listeners::bind(&addrs, Some((&self.addrs, old))).map_err(|e| e.to_string())?;
            // The group keeps its sockets when its address did not change (its size follows
            // the new worker count through `workers_changed`). A new address gets a new group;
            // the launcher's copies of the old one close here, and the old generation's
            // workers read theirs until they retire.
            let group_changed = self.udp_group.borrow().addr() != group_addr.as_deref();
            if group_changed {
                let group = match &group_addr {
                    Some(a) => UdpGroup::bind(a, cfg.worker_count()).map_err(|e| e.to_string())?,
                    None => UdpGroup::default(),
                };
                *self.udp_group.borrow_mut() = group;
            }
            if cfg.service.control_socket != self.cfg.service.control_socket {
                log::warn!("control_socket changed: the new path takes effect at the next restart");
            }
            if cfg.service.log_level != self.cfg.service.log_level
                && std::env::var_os("RUST_LOG").is_none()
            {
                crate::logging::set_level(&cfg.service.log_level);
            }
            if cfg.metrics_endpoint() != self.cfg.metrics_endpoint() {
                log::warn!(
                    "metrics_address/metrics_port changed: the new endpoint takes effect at the next restart"
                );
            }
            if cfg.service.log_format != self.cfg.service.log_format {
                crate::logging::set_format(&cfg.service.log_format);
            }
            if addrs != self.addrs || group_changed {
                log::info!(
                    "listening: {}",
                    describe(&listeners, &self.udp_group.borrow())
                );
            }
            sup.set_settings(settings_of(&cfg));
            let listeners = Rc::new(listeners);
            self.listeners = listeners.clone();
            self.addrs = addrs;
            self.cfg = cfg.clone();
            Ok(Box::new(CollectorWorker {
                cfg,
                listeners,
                udp_group: self.udp_group.clone(),
            }) as Box<dyn supervisor::Worker>)
        })();
        match &result {
            Ok(_) => log::info!("configuration reloaded; starting a new generation"),
            Err(e) => {
                log::error!("reload failed, keeping the running configuration: {e}");
                let _ = daemon::sd_notify("READY=1");
            }
        }
        result
    }

    fn workers_changed(&mut self, _sup: &mut SupervisorHandle<'_>, old: usize, new: usize) {
        let mut group = self.udp_group.borrow_mut();
        if group.is_empty() {
            return;
        }
        let had = group.len();
        match group.resize(new) {
            Ok(()) => log::info!(
                "udp: {} SO_REUSEPORT sockets for {new} workers (were {had} for {old})",
                group.len()
            ),
            Err(e) => log::error!(
                "udp: {e}; workers from slot {} on share the group's sockets",
                group.len()
            ),
        }
        if new < had {
            log::info!(
                "udp: sockets {new}..{had} leave the group when their workers exit; datagrams they queued are read first, what arrives in between is lost"
            );
        }
    }

    fn reopen_logs(&mut self) {
        crate::logging::reopen();
        log::info!("log file reopened");
    }

    fn on_extra_ready(
        &mut self,
        sup: &mut SupervisorHandle<'_>,
        token: Token,
        event: &mio::event::Event,
    ) {
        if let Some(mut http) = self.http.take() {
            if http.owns(token) {
                for req in http.on_ready(sup, token, event) {
                    let resp = self.http_response(sup, &req);
                    http.respond(sup, req.conn, &resp, req.head);
                }
                self.http = Some(http);
                return;
            }
            self.http = Some(http);
        }
        let requests = self.control.on_ready(sup, token, event);
        for (conn, req) in requests {
            self.handle_request(sup, conn, req);
        }
    }

    fn on_event(&mut self, sup: &mut SupervisorHandle<'_>, event: SupervisorEvent) {
        match event {
            SupervisorEvent::GenerationReady {
                generation,
                previous,
            } => {
                if !self.ready_once {
                    self.ready_once = true;
                    // The readiness pipe closes now: its number may be reused by a socket
                    // later workers need, so stop closing it in them.
                    if let Some(fd) = self.daemonized.raw_fd() {
                        sup.keep_in_children(fd);
                    }
                    self.daemonized.notify_ready();
                    log::info!("collector ready: generation {generation} serving");
                } else {
                    log::info!(
                        "generation {generation} serving{}",
                        previous
                            .map(|p| format!("; retiring generation {p}"))
                            .unwrap_or_default()
                    );
                }
                let _ = daemon::sd_notify("READY=1");
                if previous.is_some() {
                    self.reloads_ok += 1;
                }
                if previous.is_some() || !self.pending_reloads.is_empty() {
                    self.finish_reloads(json!({"ok": true, "generation": generation}));
                }
            }
            SupervisorEvent::ReloadFailed { generation, reason } => {
                self.reloads_failed += 1;
                let _ = daemon::sd_notify("READY=1");
                self.finish_reloads(json!({"ok": false, "generation": generation, "error": format!("reload failed: {reason}")}));
            }
            SupervisorEvent::WorkerExited {
                pid,
                status,
                expected,
                slot,
                generation,
            } => {
                if let Some(c) = self.last_stats.remove(&pid) {
                    self.retired.add(&c);
                }
                self.history.remove(&pid);
                if self.hung.remove(&pid) {
                    self.restarts.hung += 1;
                } else if !expected {
                    self.restarts.crash += 1;
                } else if generation != sup.generation() && !sup.is_stopping() {
                    self.restarts.reload += 1;
                }
                if !expected {
                    self.respawns += 1;
                    let why = match status {
                        WorkerExit::Code(c) => format!("exit code {c}"),
                        WorkerExit::Signal(s) => format!("signal {s}"),
                    };
                    log::warn!("worker {pid} (slot {slot}, generation {generation}) died: {why}");
                }
                for (conn, _) in self.pending_introspect.remove(&pid).unwrap_or_default() {
                    self.control.set_waiting(conn, false);
                    self.control.reply(
                        conn,
                        &json!({"ok": false, "error": format!("worker {pid} exited")}),
                    );
                }
            }
            SupervisorEvent::Reply {
                pid,
                slot,
                generation,
                payload,
            } => {
                let mut v: Json = serde_json::from_slice(&payload).unwrap_or(Json::Null);
                let (rss, fds) = proc_status(pid);
                let info = sup.workers().into_iter().find(|w| w.pid == pid);
                if let Json::Object(m) = &mut v {
                    m.insert("ok".into(), Json::Bool(true));
                    m.insert("slot".into(), json!(slot));
                    m.insert("generation".into(), json!(generation));
                    m.insert("rss_kib".into(), json!(rss));
                    m.insert("fds".into(), json!(fds));
                    m.insert(
                        "uptime_s".into(),
                        json!(info.map(|w| w.uptime.as_secs_f64())),
                    );
                }
                for (conn, _) in self.pending_introspect.remove(&pid).unwrap_or_default() {
                    self.control.set_waiting(conn, false);
                    self.control.reply(conn, &v);
                }
            }
            SupervisorEvent::Stopping { mode } => {
                let _ = daemon::sd_notify("STOPPING=1");
                log::info!("stopping ({mode:?})");
                self.finish_reloads(
                    json!({"ok": false, "error": "the daemon is stopping; reload abandoned"}),
                );
            }
            _ => {}
        }
        let _ = sup;
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let intro = self
            .pending_introspect
            .values()
            .flatten()
            .map(|(_, d)| *d)
            .min();
        let hb = Some(Instant::now() + Duration::from_secs(1));
        let http = self.http.as_ref().and_then(HttpServer::next_deadline);
        [intro, hb, http].into_iter().flatten().min()
    }

    fn on_tick(&mut self, sup: &mut SupervisorHandle<'_>) {
        let now = Instant::now();
        // Rate history and latest counters from heartbeats.
        for w in sup.workers() {
            let hb = parse_heartbeat(w.last_heartbeat.as_ref());
            let h = self.history.entry(w.pid).or_default();
            let point = (
                now,
                hb.counters.samples_received,
                hb.counters.samples_stored,
            );
            if h.back().is_none_or(|b| {
                b.1 != point.1
                    || b.2 != point.2
                    || now.duration_since(b.0) >= Duration::from_secs(1)
            }) {
                h.push_back(point);
            }
            while h
                .front()
                .is_some_and(|f| now.duration_since(f.0) > RATE_WINDOW)
            {
                h.pop_front();
            }
            self.last_commit_unix_ms = self.last_commit_unix_ms.max(hb.last_commit_unix_ms);
            self.last_stats.insert(w.pid, hb.counters);
            // A worker silent for worker_timeout is about to be killed by the supervisor:
            // its exit is then a `hung` restart, not a crash.
            if w.state != supervisor::WorkerState::Booting
                && !sup.is_stopping()
                && w.since_heartbeat
                    .is_some_and(|d| d >= sup.settings().worker_timeout)
            {
                self.hung.insert(w.pid);
            }
        }
        if let Some(http) = self.http.as_mut() {
            http.on_tick(sup, now);
        }
        // Introspection requests nobody answered.
        let mut expired = Vec::new();
        for list in self.pending_introspect.values_mut() {
            list.retain(|(conn, deadline)| {
                if *deadline <= now {
                    expired.push(*conn);
                    false
                } else {
                    true
                }
            });
        }
        self.pending_introspect.retain(|_, l| !l.is_empty());
        for conn in expired {
            self.control.set_waiting(conn, false);
            self.control.reply(
                conn,
                &json!({"ok": false, "error": "the worker did not answer in time"}),
            );
        }
        self.control.on_tick(sup);
        for (conn, req) in self.control.take_backlog() {
            self.handle_request(sup, conn, req);
        }
    }
}

/// The listeners' addresses, and the UDP address taken out of them when it is served by a
/// group of SO_REUSEPORT sockets instead of one shared socket.
fn split_addresses(cfg: &Config) -> (Addresses, Option<String>) {
    let mut addrs = Addresses::of(cfg);
    let group = if cfg.collector.udp_reuseport {
        addrs.udp.take()
    } else {
        None
    };
    (addrs, group)
}

/// The `listening:` log line (tests and scripts/bench read the addresses from it).
fn describe(listeners: &Listeners, group: &UdpGroup) -> String {
    let mut v: Vec<String> = group
        .local_addr()
        .map(|a| format!("udp {a}"))
        .into_iter()
        .collect();
    v.extend(listeners.describe());
    v.join(", ")
}

/// Raise the soft open-file limit to the hard one: every worker may hold `max_connections`
/// sockets, and the default soft limit (often 1024) would make accept fail first.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
    }
}

/// The kernel's drop count for a UDP socket: the `drops` column of its line (found by inode)
/// in /proc/net/udp or udp6.
fn udp_drops(sock: &std::net::UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let st = nix::sys::stat::fstat(sock.as_raw_fd()).ok()?;
    let inode = st.st_ino.to_string();
    ["/proc/net/udp", "/proc/net/udp6"].iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(9) == Some(&inode.as_str()))
                .then(|| cols.last().and_then(|d| d.parse().ok()))
                .flatten()
        })
    })
}
