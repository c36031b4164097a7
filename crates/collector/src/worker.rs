//! The worker: one `mio` event loop over its sources, its parent link, its signals and its
//! writer thread's completions.
//!
//! The sources (see [`crate::source`]: UDP datagrams, ceilometer `tcp://` frames,
//! MessagePack-RPC requests, AMQP deliveries) own their sockets and yield decoded sample maps
//! to one ingest step, [`crate::source::Intake`], which verifies, checks and batches them for
//! the dispatchers. Storage runs on a writer thread (see [`crate::dispatch`]); the loop only
//! decodes, verifies and moves bytes, so UDP keeps draining while SQLite commits.

use crate::amqp::AmqpConsumer;
use crate::config::Config;
use crate::dispatch::{self, Completion, TicketResult, Wake, Writer};
use crate::rpc;
use crate::sockets::Listeners;
use crate::source::amqp::AmqpSource;
use crate::source::conns::{Connections, Listener};
use crate::source::udp::UdpSource;
use crate::source::Intake;
use mio::{Events, Interest, Poll, Token, Waker};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use supervisor::{ChildLink, Command};

const LINK: Token = Token(0);
const UDP: Token = Token(1);
const TCP_LISTENER: Token = Token(2);
const RPC_LISTENER: Token = Token(3);
const UNIX_LISTENER: Token = Token(4);
const WAKER: Token = Token(5);
const SIGNALS: Token = Token(6);
const FIRST_CONN: usize = 16;

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a stopping worker keeps trying to deliver replies before giving up.
const STOP_FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// A custom command from the launcher (JSON in a `supervisor::Command::Custom`).
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Custom {
    Loglevel { level: String },
    Introspect,
}

pub struct Worker {
    cfg: Config,
    db: bool,
    poll: Poll,
    intake: Intake,
    udp: UdpSource,
    conns: Connections,
    amqp: AmqpSource,
    completions: mpsc::Receiver<Completion>,
    writer: Option<std::thread::JoinHandle<()>>,
    link: Option<ChildLink>,
    signals: Option<std::os::unix::net::UnixStream>,
    stopping: Option<Instant>,
    last_error: Option<String>,
    /// Wall clock (Unix ms) of the last commit that stored samples, for the freshness gauge.
    last_commit_unix_ms: Option<i64>,
    /// Worker 0 with an SQLite file: the socket other workers hand their batches to.
    relay: Option<crate::relay::Server>,
    /// The other workers with an SQLite file: batches worker 0 stored for this one.
    relayed: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Errors that stop a worker before it serves: the launcher treats them as boot errors.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open storage {url}: {source}")]
    Storage {
        url: String,
        source: storage::StorageError,
    },
    #[error("cannot open file dispatcher {path}: {source}")]
    File { path: String, source: io::Error },
    #[error("[messaging] transport_url: {0}")]
    Amqp(String),
    #[error("worker setup failed: {0}")]
    Io(#[from] io::Error),
}

impl BootError {
    /// Whether starting again cannot help until the operator changes something (a bad URL, an
    /// unusable path, a refused permission): then the launcher stops instead of respawning.
    /// Everything else (a thread or descriptor limit hit, storage unavailable for now) is a
    /// crash like any other: respawned with backoff.
    pub fn is_permanent(&self) -> bool {
        match self {
            BootError::Storage { source, .. } => !source.is_transient(),
            BootError::File { source, .. } => !is_transient_io(source),
            // start() fails on the transport_url and the topic (configuration) or on a thread
            // or poll it cannot create (resources).
            BootError::Amqp(e) => !e.starts_with("amqp: cannot"),
            BootError::Io(e) => !is_transient_io(e),
        }
    }
}

/// Resource exhaustion and interruptions: errors a later attempt may not meet.
fn is_transient_io(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EAGAIN
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM
                | libc::ENOBUFS
                | libc::ENOSPC
                | libc::EINTR
                | libc::EIO
        )
    ) || matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::OutOfMemory
    )
}

impl Worker {
    /// Open storage and start the writer thread. Call in the worker process (after fork).
    pub fn new(
        cfg: Config,
        listeners: Listeners,
        link: Option<ChildLink>,
        index: usize,
    ) -> Result<Worker, BootError> {
        let db = cfg.has_dispatcher("database");
        let file = cfg.has_dispatcher("file");
        let open_storage = || {
            storage::open(&cfg.database.connection, &cfg.database.storage_options()).map_err(
                |source| BootError::Storage {
                    url: crate::config::mask_url_password(&cfg.database.connection),
                    source,
                },
            )
        };
        let mut storage = if db { Some(open_storage()?) } else { None };
        // One writer per SQLite file: under a launcher, worker 0 stores every worker's
        // batches (crate::relay); the others hand theirs over while it answers.
        let relay_path = if link.is_some() && storage.is_some() {
            crate::relay::socket_path(&cfg)
        } else {
            None
        };
        let mut relayed = None;
        if let (Some(path), false) = (&relay_path, index == 0) {
            if let Some(direct) = storage.take() {
                let busy = Duration::from_millis(cfg.database.storage_options().busy_timeout_ms);
                let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
                storage = Some(Box::new(crate::relay::RelayStorage::new(
                    direct,
                    path.clone(),
                    busy,
                    count.clone(),
                )));
                relayed = Some(count);
            }
        }
        let file_dispatcher = if file {
            let d = &cfg.dispatcher_file;
            Some(
                storage::FileDispatcher::open(&d.file_path, d.max_bytes, d.backup_count).map_err(
                    |source| BootError::File {
                        path: d.file_path.clone(),
                        source,
                    },
                )?,
            )
        } else {
            None
        };
        let poll = Poll::new()?;
        let waker: Arc<dyn Wake> = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (wtx, wrx) = mpsc::channel();
        let (ctx, crx) = mpsc::channel();
        let relay = match (&relay_path, index) {
            (Some(path), 0) => match crate::relay::Server::start(path, wtx.clone()) {
                Ok(server) => Some(server),
                Err(e) => {
                    log::warn!(
                        "relay: cannot listen on {}: {e}; every worker writes to the SQLite \
                         file itself",
                        path.display()
                    );
                    None
                }
            },
            _ => None,
        };
        // Only worker 0 expires old samples, so N workers do not race to delete the same rows.
        let ttl = (index == 0 && cfg.database.metering_time_to_live > 0)
            .then_some(cfg.database.metering_time_to_live as u64);
        // Worker 0's retention passes run on a second handle and a thread of their own.
        let retention = match (&storage, ttl) {
            (Some(_), Some(_)) => Some(open_storage()?),
            _ => None,
        };
        let writer = Writer {
            storage,
            file: file_dispatcher,
            ttl_seconds: ttl,
            expiry_interval: Duration::from_secs_f64(cfg.database.expiry_interval),
            retention,
        };
        let amqp = if cfg.messaging.transport_url.is_empty() {
            None
        } else {
            let limits = crate::amqp::Limits {
                max_body: cfg.collector.max_frame_bytes as u64,
                max_queued_bytes: cfg.collector.max_buffered_bytes,
            };
            Some(
                AmqpConsumer::start_with_limits(&cfg.messaging, limits, waker.clone())
                    .map_err(BootError::Amqp)?,
            )
        };
        let handle = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || writer.run(wrx, ctx, waker))?;

        let registry = poll.registry();
        let udp = UdpSource::new(listeners.udp, registry, UDP)?;
        let conns = Connections::new(
            &cfg.collector,
            registry,
            listeners.tcp,
            listeners.rpc,
            listeners.unix,
            [TCP_LISTENER, RPC_LISTENER, UNIX_LISTENER],
            FIRST_CONN,
        )?;
        if let Some(l) = link.as_ref() {
            registry.register(
                &mut mio::unix::SourceFd(&l.as_raw_fd()),
                LINK,
                Interest::READABLE,
            )?;
        }
        // TERM asks for a graceful stop (systemd, the launcher's timeout path, PDEATHSIG).
        // INT and HUP from a terminal's process group are ignored: workers obey their link.
        let sig_r = supervisor::worker_term_pipe()?;
        if link.is_some() {
            for s in [libc::SIGINT, libc::SIGHUP] {
                // SAFETY: SIG_IGN installs no handler code; setting a disposition is safe here.
                unsafe { libc::signal(s, libc::SIG_IGN) };
            }
        }
        registry.register(
            &mut mio::unix::SourceFd(&sig_r.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        let mut intake = Intake::new(&cfg, wtx);
        if relayed.is_some() {
            intake.hand_over_sooner();
        }
        Ok(Worker {
            intake,
            db,
            cfg,
            poll,
            udp,
            conns,
            amqp: AmqpSource::new(amqp),
            completions: crx,
            writer: Some(handle),
            link,
            signals: Some(sig_r),
            stopping: None,
            last_error: None,
            last_commit_unix_ms: None,
            relay,
            relayed,
        })
    }

    /// Serve until stopped; returns the process exit code.
    pub fn run(mut self) -> i32 {
        if self.db
            && self.cfg.publisher.telemetry_secret == crate::config::CEILOMETER_DEFAULT_SECRET
        {
            log::warn!(
                "[publisher] telemetry_secret is ceilometer's default: anyone can forge samples; set a secret shared with the publishers"
            );
        }
        if let Some(l) = self.link.as_mut() {
            if let Err(e) = l.ready() {
                log::error!("cannot tell the launcher we are ready: {e}");
                return 1;
            }
        }
        log::info!("worker {} serving", std::process::id());
        let mut events = Events::with_capacity(1024);
        let mut next_heartbeat = Instant::now();
        let mut next_sweep = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            if now >= next_heartbeat {
                self.heartbeat();
                next_heartbeat = now + HEARTBEAT_EVERY;
            }
            if now >= next_sweep {
                self.conns.sweep(now, &mut self.intake);
                next_sweep = now + Duration::from_secs(1);
            }
            self.intake.maybe_flush(now);
            if let Some(since) = self.stopping {
                if self.stop_complete() || now.duration_since(since) > STOP_FLUSH_LIMIT {
                    break;
                }
            }
            let mut deadline = next_heartbeat.min(next_sweep);
            if let Some(d) = self.intake.deadline() {
                deadline = deadline.min(d);
            }
            let timeout = deadline.saturating_duration_since(Instant::now());
            let timeout = if self.stopping.is_some() {
                timeout.min(Duration::from_millis(50))
            } else if self.has_input_left() {
                // A source's budget ran out with input left: look at events, then go on.
                Duration::ZERO
            } else {
                timeout
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("poll failed: {e}");
                return 1;
            }
            for ev in events.iter() {
                match ev.token() {
                    UDP => self.udp.read(&mut self.intake),
                    TCP_LISTENER => self.conns.accept(Listener::CeiloTcp, &mut self.intake),
                    RPC_LISTENER => self.conns.accept(Listener::Rpc, &mut self.intake),
                    UNIX_LISTENER => self.conns.accept(Listener::Unix, &mut self.intake),
                    WAKER => {
                        self.drain_completions();
                        self.amqp.drain(&mut self.intake);
                    }
                    SIGNALS => self.read_signals(),
                    LINK => self.read_link(),
                    t => {
                        let Some(i) = self.conns.slot(t) else {
                            continue;
                        };
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.conns.readable(i, &mut self.intake);
                        }
                        if ev.is_writable() {
                            self.conns.writable(i);
                        }
                    }
                }
            }
            self.drain_completions();
            self.resume_paused();
            if self.udp.drained() {
                self.udp.close(self.poll.registry());
                self.intake.flush_batch();
            }
            self.amqp.drain(&mut self.intake);
            if let Some(l) = self.link.as_mut() {
                if l.has_pending_output() {
                    let _ = l.flush();
                }
            }
        }
        self.shutdown();
        0
    }

    fn heartbeat(&mut self) {
        let amqp = self.amqp.status();
        if let Some(st) = &amqp {
            self.intake.counters.amqp_reconnects = st.reconnects;
        }
        self.intake.counters.amqp_acked = self.amqp.acked;
        self.intake.counters.amqp_rejected = self.amqp.rejected;
        let (tcp_open, rpc_open) = self.conns.open_by_kind();
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let hb = serde_json::json!({
            "amqp": amqp,
            "counters": &self.intake.counters,
            "connections": self.conns.open(),
            "pending_batch": self.intake.batch.len(),
            "in_flight": self.intake.in_flight,
            "last_error": &self.last_error,
            "storage_up": self.last_error.is_none(),
            "last_commit_unix_ms": self.last_commit_unix_ms,
            "connections_by_kind": {"tcp": tcp_open, "rpc": rpc_open},
        });
        if let Err(e) = link.heartbeat(hb.to_string().as_bytes()) {
            log::debug!("heartbeat not sent: {e}");
        }
    }

    fn introspect(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "connections": self.conns.introspect(),
            "pending_batch": self.intake.batch.len(),
            "in_flight": self.intake.in_flight,
            "last_error": self.last_error,
            "amqp": self.amqp.status(),
            "counters": self.intake.counters,
        })
    }

    fn read_link(&mut self) {
        loop {
            let Some(link) = self.link.as_mut() else {
                return;
            };
            match link.try_recv() {
                Ok(Some(Command::Stop)) => self.begin_stop("the launcher asked us to stop"),
                Ok(Some(Command::ReopenLogs)) => {
                    crate::logging::reopen();
                    self.intake.reopen();
                }
                Ok(Some(Command::Custom(bytes))) => {
                    match serde_json::from_slice::<Custom>(&bytes) {
                        Ok(Custom::Loglevel { level }) => {
                            crate::logging::set_level(&level);
                        }
                        Ok(Custom::Introspect) => {
                            let reply = self.introspect().to_string();
                            if let Some(l) = self.link.as_mut() {
                                let _ = l.reply(reply.as_bytes());
                            }
                        }
                        Err(e) => log::warn!("unknown command from the launcher: {e}"),
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    if self.stopping.is_none() {
                        log::warn!("launcher link closed ({e}): the launcher is gone; stopping");
                    }
                    if let Some(l) = self.link.take() {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut mio::unix::SourceFd(&l.as_raw_fd()));
                    }
                    self.begin_stop("launcher gone");
                    return;
                }
            }
        }
    }

    fn read_signals(&mut self) {
        let mut buf = [0u8; 64];
        let mut got = false;
        if let Some(s) = self.signals.as_mut() {
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got = true;
            }
        }
        if got {
            self.begin_stop("SIGTERM");
        }
    }

    /// Stop reading new input; what was received is still committed and answered.
    fn begin_stop(&mut self, why: &str) {
        if self.stopping.is_some() {
            return;
        }
        log::info!("worker {} stopping: {why}", std::process::id());
        self.stopping = Some(Instant::now());
        self.intake.stopping = true;
        self.amqp.stop_consuming();
        if self.cfg.collector.udp_reuseport {
            // Our own socket of the group: what it holds is ours to store (the launcher's copy
            // keeps it for our successor, unless the launcher let go of it).
            self.udp.drain();
        } else {
            self.udp.close(self.poll.registry());
        }
        // Frames already buffered are still processed; then reading ends.
        self.conns.stop(&mut self.intake);
        self.intake.flush_batch();
    }

    fn stop_complete(&self) -> bool {
        self.udp.is_closed()
            && self.intake.batch.is_empty()
            && self.intake.in_flight == 0
            && self.conns.all_answered()
    }

    fn shutdown(&mut self) {
        self.intake.flush_batch();
        // Other workers' batches stop here (they write to the file themselves meanwhile), so
        // the writer sees its channel close once the loop lets go of it.
        if let Some(r) = self.relay.take() {
            r.close();
        }
        self.intake.close_writer();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        self.drain_completions();
        // Acks sent above go out first; unacked deliveries return to the queue.
        self.amqp.shutdown();
        self.heartbeat();
        log::info!(
            "worker {} stopped: {} samples received, {} stored",
            std::process::id(),
            self.intake.counters.samples_received,
            self.intake.counters.samples_stored
        );
    }

    /// Whether a source has input left over that it could read now.
    fn has_input_left(&self) -> bool {
        self.intake.can_accept() && (self.udp.backlogged() || self.conns.has_ready())
    }

    /// Give sources paused by back-pressure, or whose read budget ran out, another turn.
    fn resume_paused(&mut self) {
        if !self.intake.can_accept() {
            return;
        }
        if self.udp.backlogged() {
            self.udp.read(&mut self.intake);
        }
        self.conns.run_ready(&mut self.intake);
        self.conns.resume_paused(&mut self.intake);
    }

    /// Results of committed batches: answer RPC requests, ack or reject AMQP deliveries.
    fn drain_completions(&mut self) {
        while let Ok(c) = self.completions.try_recv() {
            let counters = &mut self.intake.counters;
            self.intake.in_flight = self.intake.in_flight.saturating_sub(c.batches);
            dispatch::count_completion(&c, counters);
            if let Some(r) = &self.relayed {
                // Counted by the writer before this completion was sent.
                counters.batches_relayed = r.load(std::sync::atomic::Ordering::Relaxed);
            }
            let requeue = self.cfg.collector.requeue_sample_on_dispatcher_error;
            if c.result.is_ok() && !c.probe && c.counts.stored > 0 {
                self.last_commit_unix_ms = Some(c.committed_unix_ms);
            }
            match &c.result {
                Ok(_) => {
                    if self.last_error.is_some() {
                        log::info!("storage recovered");
                        self.last_error = None;
                    }
                }
                Err(e) if c.probe => {
                    log::warn!("storage unavailable: {}", crate::untrusted::untrusted(e));
                    self.last_error = Some(e.clone());
                }
                Err(e) => {
                    log::error!(
                        "batch of {} samples not written: {}",
                        c.counts.samples,
                        crate::untrusted::untrusted(e)
                    );
                    self.last_error = Some(e.clone());
                    let acked_by_nobody = c.counts.samples
                        - c.tickets
                            .iter()
                            .filter(|t| t.msgid.is_some() && requeue)
                            .map(|t| t.range.len())
                            .sum::<usize>();
                    counters.samples_dropped += acked_by_nobody as u64;
                }
            }
            for (k, t) in c.tickets.iter().enumerate() {
                if let Some(tag) = t.amqp_tag {
                    match &c.result {
                        // Committed (or refused on its merits): done with it.
                        Ok(_) => self.amqp.ack(tag),
                        // The broker keeps it for a retry (the consumer delays the reject).
                        Err(_) if requeue => self.amqp.reject(tag, true),
                        Err(_) => self.amqp.ack(tag),
                    }
                    continue;
                }
                let Some(msgid) = t.msgid else { continue };
                let mut out = Vec::with_capacity(64);
                match &c.result {
                    Ok(results) => {
                        let r = results.get(k).copied().unwrap_or_default();
                        rpc::encode_result(&mut out, msgid, r.stored, r.duplicates, r.rejected);
                    }
                    Err(e) if requeue => {
                        self.intake.counters.rpc_errors += 1;
                        rpc::encode_error(&mut out, msgid, e);
                    }
                    Err(_) => {
                        let r = TicketResult {
                            rejected: t.rejected + t.range.len(),
                            ..Default::default()
                        };
                        rpc::encode_result(&mut out, msgid, r.stored, r.duplicates, r.rejected);
                    }
                }
                self.conns.fill_reply(t, msgid, out);
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.intake.close_writer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configuration_errors_are_boot_errors() {
        let eagain = || BootError::Io(io::Error::from_raw_os_error(libc::EAGAIN));
        assert!(!eagain().is_permanent());
        assert!(!BootError::Io(io::Error::from_raw_os_error(libc::EMFILE)).is_permanent());
        assert!(BootError::Io(io::Error::from_raw_os_error(libc::EACCES)).is_permanent());
        let storage = |source| BootError::Storage {
            url: "x".into(),
            source,
        };
        assert!(!storage(storage::StorageError::Unavailable("refused".into())).is_permanent());
        assert!(storage(storage::StorageError::BadUrl {
            url: "x".into(),
            reason: "y".into()
        })
        .is_permanent());
        assert!(BootError::Amqp("unsupported scheme \"http\"".into()).is_permanent());
        assert!(
            !BootError::Amqp("amqp: cannot start the consumer thread: x".into()).is_permanent()
        );
    }
}
