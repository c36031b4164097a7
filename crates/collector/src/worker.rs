//! The worker: one `mio` event loop over the inherited sockets, its connections, its parent
//! link, its signals and its writer thread's completions.
//!
//! Every source (UDP datagrams, ceilometer `tcp://` frames, MessagePack-RPC requests) yields
//! decoded sample maps to one [`Worker::ingest`] step, which verifies, checks and batches them
//! for the dispatchers. Storage runs on a writer thread (see [`crate::dispatch`]); the loop only
//! decodes, verifies and moves bytes, so UDP keeps draining while SQLite commits.

use crate::amqp::{self, AmqpConsumer};
use crate::config::Config;
use crate::counters::Counters;
use crate::dispatch::{self, Batch, Completion, Ticket, TicketResult, Wake, Writer, WriterMsg};
use crate::framing::{LengthPrefixed, MsgpackScanner};
use crate::rpc::{self, RpcMessage};
use crate::sockets::Listeners;
use meter::{Sample, Value};
use mio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
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

/// Batches handed to the writer and not yet completed. More than one keeps the writer busy
/// while the loop fills the next; the writer commits the ones that queued up behind a slow
/// commit together (group commit), so under load transactions grow and the per-commit cost
/// of SQLite's indexes is shared. With the pending batch's cap this bounds a worker's memory
/// to about (MAX_IN_FLIGHT + 2) × batch_size samples when storage is slower than the input.
/// Measured (collector-load, one worker, alternating builds twice): 2 and 4 in flight store
/// the same within noise over UDP and RPC; 2 peaks at 53-57 MiB RSS under a flood, 4 at 67-71.
const MAX_IN_FLIGHT: usize = 2;
/// Read no more from a connection whose unsent replies exceed this.
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// Read no more from a connection with this many unanswered requests.
const MAX_PENDING_REPLIES: usize = 1024;
/// Nesting allowed in a frame (sample metadata is shallow; this is far above real use).
const MAX_DEPTH: usize = 64;
const READ_CHUNK: usize = 64 * 1024;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnKind {
    Rpc,
    CeiloTcp,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
}

/// A reply slot, in request order; filled when the request's batch completes.
struct PendingReply {
    msgid: u64,
    bytes: Option<Vec<u8>>,
}

struct Conn {
    kind: ConnKind,
    serial: u64,
    stream: Stream,
    peer: String,
    rbuf: Vec<u8>,
    rpos: usize,
    scanner: MsgpackScanner,
    wbuf: Vec<u8>,
    wpos: usize,
    replies: VecDeque<PendingReply>,
    last_active: Instant,
    /// Reading stopped: protocol error (close once replies are out) or peer closed.
    read_closed: bool,
    /// Reading paused by back-pressure; resumed from the loop.
    paused: bool,
    interest: Option<Interest>,
}

impl Conn {
    fn unsent(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
    fn done(&self) -> bool {
        self.read_closed && self.replies.is_empty() && self.unsent() == 0
    }
}

/// Rate-limited logging of a repeated problem: at most one line a second, with a count of
/// what was suppressed.
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    const fn new() -> Throttle {
        Throttle {
            last: None,
            suppressed: 0,
        }
    }
    fn log(&mut self, level: log::Level, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        let n = std::mem::take(&mut self.suppressed);
        if n > 0 {
            log::log!(level, "{} (and {n} more like it in the last second)", msg());
        } else {
            log::log!(level, "{}", msg());
        }
        self.last = Some(now);
    }
}

pub struct Worker {
    cfg: Config,
    verify: bool,
    signer: meter::signature::SigningKey,
    db: bool,
    file: bool,
    poll: Poll,
    udp: Option<UdpSocket>,
    tcp: Option<TcpListener>,
    rpc: Option<TcpListener>,
    unix: Option<UnixListener>,
    udp_backlog: bool,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open_conns: usize,
    next_serial: u64,
    batch: Batch,
    next_batch_id: u64,
    in_flight: usize,
    writer_tx: Option<mpsc::Sender<WriterMsg>>,
    completions: mpsc::Receiver<Completion>,
    writer: Option<std::thread::JoinHandle<()>>,
    amqp: Option<AmqpConsumer>,
    log_amqp: Throttle,
    pub counters: Counters,
    link: Option<ChildLink>,
    signals: Option<std::os::unix::net::UnixStream>,
    stopping: Option<Instant>,
    last_error: Option<String>,
    log_udp: Throttle,
    log_sig: Throttle,
    log_bad: Throttle,
    log_conn: Throttle,
    batch_timeout: Duration,
    idle_timeout: Duration,
    max_batch: usize,
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
        let storage = if db {
            let opts = cfg.database.storage_options();
            Some(
                storage::open(&cfg.database.connection, &opts).map_err(|source| {
                    BootError::Storage {
                        url: crate::config::mask_url_password(&cfg.database.connection),
                        source,
                    }
                })?,
            )
        } else {
            None
        };
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
        // Only worker 0 expires old samples, so N workers do not race to delete the same rows.
        let ttl = (index == 0 && cfg.database.metering_time_to_live > 0)
            .then_some(cfg.database.metering_time_to_live as u64);
        let writer = Writer {
            storage,
            file: file_dispatcher,
            ttl_seconds: ttl,
            expiry_interval: Duration::from_secs_f64(cfg.database.expiry_interval),
        };
        let amqp = if cfg.messaging.transport_url.is_empty() {
            None
        } else {
            Some(AmqpConsumer::start(&cfg.messaging, waker.clone()).map_err(BootError::Amqp)?)
        };
        let handle = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || writer.run(wrx, ctx, waker))?;

        let registry = poll.registry();
        let mut udp = listeners.udp.map(UdpSocket::from_std);
        let mut tcp = listeners.tcp.map(TcpListener::from_std);
        let mut rpcl = listeners.rpc.map(TcpListener::from_std);
        let mut unix = listeners.unix.map(UnixListener::from_std);
        if let Some(s) = udp.as_mut() {
            registry.register(s, UDP, Interest::READABLE)?;
        }
        if let Some(s) = tcp.as_mut() {
            registry.register(s, TCP_LISTENER, Interest::READABLE)?;
        }
        if let Some(s) = rpcl.as_mut() {
            registry.register(s, RPC_LISTENER, Interest::READABLE)?;
        }
        if let Some(s) = unix.as_mut() {
            registry.register(s, UNIX_LISTENER, Interest::READABLE)?;
        }
        if let Some(l) = link.as_ref() {
            registry.register(
                &mut mio::unix::SourceFd(&l.as_raw_fd()),
                LINK,
                Interest::READABLE,
            )?;
        }
        // TERM asks for a graceful stop (systemd, the launcher's timeout path, PDEATHSIG).
        // INT and HUP from a terminal's process group are ignored: workers obey their link.
        let (sig_r, sig_w) = std::os::unix::net::UnixStream::pair()?;
        sig_r.set_nonblocking(true)?;
        sig_w.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, sig_w)?;
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
        let max_batch = cfg.collector.batch_size.max(1);
        Ok(Worker {
            verify: db,
            signer: meter::signature::SigningKey::new(&cfg.publisher.telemetry_secret),
            db,
            file,
            batch_timeout: Duration::from_secs_f64(cfg.collector.batch_timeout),
            idle_timeout: Duration::from_secs_f64(cfg.collector.idle_timeout),
            max_batch,
            cfg,
            poll,
            udp,
            tcp,
            rpc: rpcl,
            unix,
            udp_backlog: false,
            conns: Vec::new(),
            free: Vec::new(),
            open_conns: 0,
            next_serial: 1,
            batch: Batch::default(),
            next_batch_id: 1,
            in_flight: 0,
            writer_tx: Some(wtx),
            completions: crx,
            writer: Some(handle),
            amqp,
            log_amqp: Throttle::new(),
            counters: Counters::new(),
            link,
            signals: Some(sig_r),
            stopping: None,
            last_error: None,
            log_udp: Throttle::new(),
            log_sig: Throttle::new(),
            log_bad: Throttle::new(),
            log_conn: Throttle::new(),
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
                self.sweep_idle(now);
                next_sweep = now + Duration::from_secs(1);
            }
            self.maybe_flush(now);
            if let Some(since) = self.stopping {
                if self.stop_complete() || now.duration_since(since) > STOP_FLUSH_LIMIT {
                    break;
                }
            }
            let mut deadline = next_heartbeat.min(next_sweep);
            if let Some(opened) = self.batch.opened {
                deadline = deadline.min(opened + self.batch_timeout);
            }
            let timeout = deadline.saturating_duration_since(Instant::now());
            let timeout = if self.stopping.is_some() {
                timeout.min(Duration::from_millis(50))
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
                    UDP => self.read_udp(),
                    TCP_LISTENER => self.accept(ConnKind::CeiloTcp, false),
                    RPC_LISTENER => self.accept(ConnKind::Rpc, false),
                    UNIX_LISTENER => self.accept(ConnKind::Rpc, true),
                    WAKER => {
                        self.drain_completions();
                        self.drain_amqp();
                    }
                    SIGNALS => self.read_signals(),
                    LINK => self.read_link(),
                    Token(t) if t >= FIRST_CONN => {
                        let i = t - FIRST_CONN;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.conn_readable(i);
                        }
                        if ev.is_writable() {
                            self.conn_writable(i);
                        }
                    }
                    _ => {}
                }
            }
            self.drain_completions();
            self.resume_paused();
            self.drain_amqp();
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
        let amqp = self.amqp.as_ref().map(|a| a.status());
        if let Some(st) = &amqp {
            self.counters.amqp_reconnects = st.reconnects;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let hb = serde_json::json!({
            "amqp": amqp,
            "counters": &self.counters,
            "connections": self.open_conns,
            "pending_batch": self.batch.len(),
            "in_flight": self.in_flight,
            "last_error": &self.last_error,
        });
        if let Err(e) = link.heartbeat(hb.to_string().as_bytes()) {
            log::debug!("heartbeat not sent: {e}");
        }
    }

    fn introspect(&self) -> serde_json::Value {
        let conns: Vec<_> = self
            .conns
            .iter()
            .flatten()
            .map(|c| {
                serde_json::json!({
                    "peer": c.peer,
                    "kind": match c.kind { ConnKind::Rpc => "rpc", ConnKind::CeiloTcp => "tcp" },
                    "read_buffered": c.rbuf.len() - c.rpos,
                    "write_buffered": c.unsent(),
                    "pending_replies": c.replies.len(),
                    "idle_s": c.last_active.elapsed().as_secs_f64(),
                })
            })
            .collect();
        serde_json::json!({
            "pid": std::process::id(),
            "connections": conns,
            "pending_batch": self.batch.len(),
            "in_flight": self.in_flight,
            "last_error": self.last_error,
            "amqp": self.amqp.as_ref().map(|a| a.status()),
            "counters": self.counters,
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
                    if let Some(tx) = self.writer_tx.as_ref() {
                        let _ = tx.send(WriterMsg::Reopen);
                    }
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
        if let Some(a) = self.amqp.as_mut() {
            // No new deliveries; those in flight are still committed and acked.
            a.stop_consuming();
        }
        let r = self.poll.registry();
        if let Some(mut s) = self.udp.take() {
            let _ = r.deregister(&mut s);
        }
        if let Some(mut s) = self.tcp.take() {
            let _ = r.deregister(&mut s);
        }
        if let Some(mut s) = self.rpc.take() {
            let _ = r.deregister(&mut s);
        }
        if let Some(mut s) = self.unix.take() {
            let _ = r.deregister(&mut s);
        }
        // Frames already buffered are still processed; then reading ends.
        for i in 0..self.conns.len() {
            if let Some(c) = self.conns[i].as_mut() {
                c.paused = false;
                self.process_buffer(i);
            }
            if let Some(c) = self.conns[i].as_mut() {
                c.read_closed = true;
            }
            self.update_interest(i);
        }
        self.flush_batch();
    }

    fn stop_complete(&self) -> bool {
        self.batch.is_empty()
            && self.in_flight == 0
            && self
                .conns
                .iter()
                .flatten()
                .all(|c| c.replies.is_empty() && c.unsent() == 0)
    }

    fn shutdown(&mut self) {
        self.flush_batch();
        self.writer_tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        self.drain_completions();
        if let Some(a) = self.amqp.take() {
            // Acks sent above go out first; unacked deliveries return to the queue.
            a.shutdown();
        }
        self.heartbeat();
        log::info!(
            "worker {} stopped: {} samples received, {} stored",
            std::process::id(),
            self.counters.samples_received,
            self.counters.samples_stored
        );
    }

    // ---------------------------------------------------------------- ingest and batches

    /// Room for more samples? When the writer is behind, sources stop reading and the kernel's
    /// buffers (and TCP flow control) hold the rest.
    fn can_accept(&self) -> bool {
        self.batch.len() < self.max_batch * 2
    }

    /// A full batch goes to the writer at once (if it has room), from inside read loops too:
    /// otherwise one readiness event could drain a flood into a single unbounded batch.
    fn flush_if_full(&mut self) {
        if self.batch.len() >= self.max_batch {
            self.maybe_flush(Instant::now());
        }
    }

    /// One decoded sample map from any source: verify, check, batch. Returns whether it was
    /// accepted for the database (or file) dispatcher.
    fn ingest(&mut self, v: Value, source: &str) -> bool {
        self.counters.samples_received += 1;
        if self.batch.opened.is_none() {
            self.batch.opened = Some(Instant::now());
        }
        let signed_ok = !self.verify || self.signer.verify(&v);
        if !signed_ok {
            self.counters.invalid_signature += 1;
            self.counters.samples_rejected += 1;
            let id = v
                .get("message_id")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            self.log_sig.log(log::Level::Warn, || {
                format!("{source}: invalid signature on sample {id}")
            });
            if !self.file {
                return false;
            }
        }
        let sample = match Sample::from_value(v) {
            Ok(s) => s,
            Err(e) => {
                self.counters.samples_rejected += 1;
                self.log_bad.log(log::Level::Warn, || {
                    format!("{source}: malformed sample: {e}")
                });
                return false;
            }
        };
        if self.db && signed_ok {
            if let Err(e) = meter::parse_timestamp(&sample.timestamp) {
                self.counters.invalid_timestamp += 1;
                self.counters.samples_rejected += 1;
                let id = sample.message_id.clone();
                self.log_bad
                    .log(log::Level::Warn, || format!("{source}: sample {id}: {e}"));
                if self.file {
                    self.batch.file.push(sample);
                }
                return false;
            }
        }
        let for_db = self.db && signed_ok;
        match (for_db, self.file) {
            (true, true) => {
                self.batch.file.push(sample.clone());
                self.batch.db.push(sample);
            }
            (true, false) => self.batch.db.push(sample),
            (false, true) => self.batch.file.push(sample),
            (false, false) => {}
        }
        // Accepted means: taken by the dispatcher whose result answers the client.
        for_db || !self.db
    }

    /// Where a request's samples are counted: the database batch, or the file batch when the
    /// file dispatcher runs alone.
    fn primary_len(&self) -> usize {
        if self.db {
            self.batch.db.len()
        } else {
            self.batch.file.len()
        }
    }

    /// Hand the batch to the writer when it is full, old enough, or someone waits for it and
    /// the writer is idle (group commit: latency stays low when idle, batches grow under load).
    fn maybe_flush(&mut self, now: Instant) {
        if self.batch.is_empty() || self.in_flight >= MAX_IN_FLIGHT {
            return;
        }
        let full = self.batch.len() >= self.max_batch;
        let old = self
            .batch
            .opened
            .is_some_and(|t| now.duration_since(t) >= self.batch_timeout);
        let waited_on = !self.batch.tickets.is_empty() && self.in_flight == 0;
        if full || old || waited_on || self.stopping.is_some() {
            self.flush_batch();
        }
    }

    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let Some(tx) = self.writer_tx.as_ref() else {
            return;
        };
        let mut b = std::mem::take(&mut self.batch);
        b.id = self.next_batch_id;
        self.next_batch_id += 1;
        if tx.send(WriterMsg::Batch(b)).is_ok() {
            self.in_flight += 1;
        } else {
            log::error!("writer thread is gone; samples dropped");
        }
    }

    fn drain_completions(&mut self) {
        while let Ok(c) = self.completions.try_recv() {
            self.in_flight = self.in_flight.saturating_sub(c.batches);
            dispatch::count_completion(&c, &mut self.counters);
            let requeue = self.cfg.collector.requeue_sample_on_dispatcher_error;
            match &c.result {
                Ok(_) => {
                    if self.last_error.is_some() {
                        log::info!("storage recovered");
                        self.last_error = None;
                    }
                }
                Err(e) => {
                    log::error!("batch of {} samples not written: {e}", c.counts.samples);
                    self.last_error = Some(e.clone());
                    let acked_by_nobody = c.counts.samples
                        - c.tickets
                            .iter()
                            .filter(|t| t.msgid.is_some() && requeue)
                            .map(|t| t.range.len())
                            .sum::<usize>();
                    self.counters.samples_dropped += acked_by_nobody as u64;
                }
            }
            for (k, t) in c.tickets.iter().enumerate() {
                if let (Some(tag), Some(a)) = (t.amqp_tag, self.amqp.as_mut()) {
                    match &c.result {
                        // Committed (or refused on its merits): done with it.
                        Ok(_) => a.ack(tag),
                        // The broker keeps it for a retry (the consumer delays the reject).
                        Err(_) if requeue => a.reject(tag, true),
                        Err(_) => a.ack(tag),
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
                        self.counters.rpc_errors += 1;
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
                self.fill_reply(t, msgid, out);
            }
        }
    }

    fn fill_reply(&mut self, t: &Ticket, msgid: u64, bytes: Vec<u8>) {
        let Some(Some(c)) = self.conns.get_mut(t.conn) else {
            return;
        };
        if c.serial != t.serial {
            return; // the client went away; its slot was reused
        }
        if let Some(slot) = c
            .replies
            .iter_mut()
            .find(|r| r.msgid == msgid && r.bytes.is_none())
        {
            slot.bytes = Some(bytes);
        }
        while c.replies.front().is_some_and(|r| r.bytes.is_some()) {
            if let Some(r) = c.replies.pop_front() {
                c.wbuf
                    .extend_from_slice(r.bytes.as_deref().unwrap_or_default());
            }
        }
        self.conn_writable(t.conn);
    }

    // ---------------------------------------------------------------- AMQP

    /// Take deliveries from the consumer thread while there is room; each becomes a ticket
    /// acked (or rejected for redelivery) when its batch completes.
    fn drain_amqp(&mut self) {
        while self.stopping.is_none() || self.amqp.as_ref().is_some_and(|a| a.status().consuming) {
            if !self.can_accept() {
                return;
            }
            let Some(d) = self.amqp.as_mut().and_then(|a| a.try_recv()) else {
                return;
            };
            self.counters.amqp_deliveries += 1;
            match amqp::decode_envelope(&d.body) {
                Err(e) => {
                    self.counters.amqp_malformed += 1;
                    self.log_amqp.log(log::Level::Warn, || {
                        format!(
                            "amqp: malformed message (delivery {}): {e}; acked and dropped",
                            d.tag & 0xffff_ffff_ffff
                        )
                    });
                    if let Some(a) = self.amqp.as_mut() {
                        a.ack(d.tag);
                    }
                }
                Ok((message_id, samples)) => {
                    let start = self.primary_len();
                    let mut rejected = 0;
                    for s in samples {
                        let accepted = if matches!(s, Value::Map(_)) {
                            self.ingest(s, "amqp")
                        } else {
                            self.counters.samples_received += 1;
                            self.counters.samples_rejected += 1;
                            false
                        };
                        rejected += usize::from(!accepted);
                    }
                    if rejected > 0 {
                        let id = message_id.unwrap_or_else(|| "?".into());
                        self.log_amqp.log(log::Level::Warn, || {
                            format!("amqp: message {id}: {rejected} samples rejected")
                        });
                    }
                    let end = self.primary_len();
                    if self.batch.opened.is_none() {
                        self.batch.opened = Some(Instant::now());
                    }
                    self.batch.tickets.push(Ticket {
                        conn: usize::MAX,
                        serial: 0,
                        msgid: None,
                        amqp_tag: Some(d.tag),
                        range: start..end,
                        rejected,
                    });
                    self.flush_if_full();
                }
            }
        }
    }

    // ---------------------------------------------------------------- UDP

    fn read_udp(&mut self) {
        let mut buf = [0u8; 65536];
        loop {
            if !self.can_accept() {
                self.udp_backlog = true;
                return;
            }
            let Some(sock) = self.udp.as_ref() else {
                return;
            };
            match sock.recv_from(&mut buf) {
                Ok((n, peer)) => {
                    self.counters.udp_received += 1;
                    match meter::decode::decode_value(&buf[..n]) {
                        Ok(v) if matches!(v, Value::Map(_)) => {
                            self.ingest(v, "udp");
                            self.flush_if_full();
                        }
                        Ok(_) => {
                            self.counters.udp_malformed += 1;
                            self.log_udp.log(log::Level::Warn, || {
                                format!("udp: datagram from {peer} is not a sample map")
                            });
                        }
                        Err(e) => {
                            self.counters.udp_malformed += 1;
                            self.log_udp.log(log::Level::Warn, || {
                                format!("udp: malformed datagram from {peer} ({n} bytes): {e}")
                            });
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.udp_backlog = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.log_udp
                        .log(log::Level::Error, || format!("udp: receive failed: {e}"));
                    return;
                }
            }
        }
    }

    // ---------------------------------------------------------------- connections

    fn accept(&mut self, kind: ConnKind, unix: bool) {
        loop {
            let accepted = if unix {
                match self.unix.as_ref().map(|l| l.accept()) {
                    Some(Ok((s, addr))) => Ok((
                        Stream::Unix(s),
                        format!(
                            "unix:{:?}",
                            addr.as_pathname()
                                .unwrap_or(std::path::Path::new(""))
                                .display()
                        ),
                    )),
                    Some(Err(e)) => Err(e),
                    None => return,
                }
            } else {
                let l = if kind == ConnKind::Rpc {
                    self.rpc.as_ref()
                } else {
                    self.tcp.as_ref()
                };
                match l.map(|l| l.accept()) {
                    Some(Ok((s, addr))) => {
                        let _ = s.set_nodelay(true);
                        Ok((Stream::Tcp(s), addr.to_string()))
                    }
                    Some(Err(e)) => Err(e),
                    None => return,
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    if self.open_conns >= self.cfg.collector.max_connections {
                        self.log_conn.log(log::Level::Warn, || {
                            format!(
                                "refusing connection from {peer}: max_connections ({}) reached",
                                self.cfg.collector.max_connections
                            )
                        });
                        drop(stream);
                        continue;
                    }
                    match kind {
                        ConnKind::Rpc => self.counters.rpc_connections += 1,
                        ConnKind::CeiloTcp => self.counters.tcp_connections += 1,
                    }
                    self.add_conn(kind, stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log, and try again on the next readiness.
                    self.log_conn
                        .log(log::Level::Error, || format!("accept failed: {e}"));
                    return;
                }
            }
        }
    }

    fn add_conn(&mut self, kind: ConnKind, mut stream: Stream, peer: String) {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.poll.registry().register(
            stream.source(),
            Token(FIRST_CONN + i),
            Interest::READABLE,
        ) {
            log::error!("cannot register connection from {peer}: {e}");
            self.free.push(i);
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        self.open_conns += 1;
        log::debug!("connection {serial} from {peer}");
        self.conns[i] = Some(Conn {
            kind,
            serial,
            stream,
            peer,
            rbuf: Vec::new(),
            rpos: 0,
            scanner: MsgpackScanner::new(self.cfg.collector.max_frame_bytes, MAX_DEPTH),
            wbuf: Vec::new(),
            wpos: 0,
            replies: VecDeque::new(),
            last_active: Instant::now(),
            read_closed: false,
            paused: false,
            interest: Some(Interest::READABLE),
        });
        // Data may have arrived with the connection.
        self.conn_readable(i);
    }

    fn close_conn(&mut self, i: usize) {
        if let Some(mut c) = self.conns.get_mut(i).and_then(Option::take) {
            let _ = self.poll.registry().deregister(c.stream.source());
            self.open_conns -= 1;
            self.free.push(i);
            log::debug!("connection {} from {} closed", c.serial, c.peer);
        }
    }

    fn conn_readable(&mut self, i: usize) {
        loop {
            let can = self.can_accept();
            let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
                return;
            };
            if c.read_closed {
                break;
            }
            let backlogged = c.unsent() > MAX_WRITE_BUFFER || c.replies.len() > MAX_PENDING_REPLIES;
            if !can || backlogged {
                c.paused = true;
                break;
            }
            if c.rpos > 0 && (c.rpos == c.rbuf.len() || c.rpos > READ_CHUNK) {
                c.rbuf.drain(..c.rpos);
                c.rpos = 0;
                // A connection that once carried a 16 MiB frame must not keep 16 MiB while
                // idle: give back what a normal read does not need.
                if c.rbuf.is_empty() && c.rbuf.capacity() > 4 * READ_CHUNK {
                    c.rbuf = Vec::new();
                }
            }
            let len = c.rbuf.len();
            c.rbuf.resize(len + READ_CHUNK, 0);
            match c.stream.read(&mut c.rbuf[len..]) {
                Ok(0) => {
                    c.rbuf.truncate(len);
                    c.read_closed = true;
                    let partial = c.rbuf.len() - c.rpos;
                    if partial > 0 {
                        log::debug!(
                            "{}: closed with {partial} bytes of an unfinished frame",
                            c.peer
                        );
                    }
                    break;
                }
                Ok(n) => {
                    c.rbuf.truncate(len + n);
                    c.last_active = Instant::now();
                    self.process_buffer(i);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.rbuf.truncate(len);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => c.rbuf.truncate(len),
                Err(e) => {
                    c.rbuf.truncate(len);
                    log::debug!("{}: read error: {e}", c.peer);
                    c.read_closed = true;
                    c.replies.clear();
                    c.wbuf.clear();
                    c.wpos = 0;
                    break;
                }
            }
        }
        self.update_interest(i);
    }

    /// Decode every complete frame in the connection's buffer.
    fn process_buffer(&mut self, i: usize) {
        loop {
            let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
                return;
            };
            if c.read_closed {
                return;
            }
            let avail = &c.rbuf[c.rpos..];
            let frame = match c.kind {
                ConnKind::Rpc => c.scanner.scan(avail).map(|o| o.map(|n| (0, n))),
                ConnKind::CeiloTcp => LengthPrefixed {
                    max_frame: self.cfg.collector.max_frame_bytes,
                }
                .scan(avail),
            };
            let (start, end) = match frame {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    self.protocol_error(i, None, &e.to_string());
                    return;
                }
            };
            let decoded = meter::decode::decode_value(&avail[start..end]);
            let kind = c.kind;
            c.rpos += end;
            match (kind, decoded) {
                (ConnKind::CeiloTcp, Ok(v @ Value::Map(_))) => {
                    self.ingest(v, "tcp");
                    self.flush_if_full();
                }
                (ConnKind::CeiloTcp, Ok(_)) => {
                    self.protocol_error(i, None, "frame is not a sample map");
                    return;
                }
                (ConnKind::Rpc, Ok(v)) => self.handle_rpc(i, v),
                (_, Err(e)) => {
                    self.protocol_error(i, None, &format!("undecodable frame: {e}"));
                    return;
                }
            }
        }
    }

    fn protocol_error(&mut self, i: usize, msgid: Option<u64>, reason: &str) {
        let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        match c.kind {
            ConnKind::Rpc => self.counters.rpc_errors += 1,
            ConnKind::CeiloTcp => self.counters.tcp_malformed += 1,
        }
        let peer = c.peer.clone();
        let kind = if c.kind == ConnKind::Rpc {
            "rpc"
        } else {
            "tcp"
        };
        self.log_conn.log(log::Level::Warn, || {
            format!("{kind}: {peer}: {reason}; closing the connection")
        });
        c.read_closed = true;
        c.rbuf = Vec::new();
        c.rpos = 0;
        if let Some(msgid) = msgid {
            let mut out = Vec::new();
            rpc::encode_error(&mut out, msgid, reason);
            c.replies.push_back(PendingReply {
                msgid,
                bytes: Some(out),
            });
            while c.replies.front().is_some_and(|r| r.bytes.is_some()) {
                if let Some(r) = c.replies.pop_front() {
                    c.wbuf
                        .extend_from_slice(r.bytes.as_deref().unwrap_or_default());
                }
            }
        }
    }

    fn handle_rpc(&mut self, i: usize, v: Value) {
        let serial = match self.conns.get(i).and_then(Option::as_ref) {
            Some(c) => c.serial,
            None => return,
        };
        let msg = match rpc::parse_message(v) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_error(i, e.msgid, &format!("malformed RPC message: {}", e.reason));
                return;
            }
        };
        self.counters.rpc_requests += 1;
        let (msgid, method, params) = match msg {
            RpcMessage::Request {
                msgid,
                method,
                params,
            } => (Some(msgid), method, params),
            RpcMessage::Notification { method, params } => (None, method, params),
        };
        if method != rpc::METHOD {
            self.counters.rpc_errors += 1;
            if let Some(msgid) = msgid {
                let mut out = Vec::new();
                rpc::encode_error(&mut out, msgid, &format!("unknown method: {method}"));
                self.queue_reply(i, msgid, Some(out));
            }
            return;
        }
        let samples = match rpc::samples_of(params) {
            Ok(s) => s,
            Err(e) => {
                self.counters.rpc_errors += 1;
                if let Some(msgid) = msgid {
                    let mut out = Vec::new();
                    rpc::encode_error(&mut out, msgid, &e);
                    self.queue_reply(i, msgid, Some(out));
                }
                return;
            }
        };
        let start = self.primary_len();
        let mut rejected = 0;
        for s in samples {
            let accepted = if matches!(s, Value::Map(_)) {
                self.ingest(s, "rpc")
            } else {
                self.counters.samples_received += 1;
                self.counters.samples_rejected += 1;
                false
            };
            rejected += usize::from(!accepted);
        }
        let end = self.primary_len();
        if let Some(msgid) = msgid {
            self.queue_reply(i, msgid, None);
        }
        if self.batch.opened.is_none() {
            self.batch.opened = Some(Instant::now());
        }
        self.batch.tickets.push(Ticket {
            conn: i,
            serial,
            msgid,
            amqp_tag: None,
            range: start..end,
            rejected,
        });
        self.flush_if_full();
    }

    fn queue_reply(&mut self, i: usize, msgid: u64, bytes: Option<Vec<u8>>) {
        if let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) {
            c.replies.push_back(PendingReply { msgid, bytes });
            while c.replies.front().is_some_and(|r| r.bytes.is_some()) {
                if let Some(r) = c.replies.pop_front() {
                    c.wbuf
                        .extend_from_slice(r.bytes.as_deref().unwrap_or_default());
                }
            }
        }
    }

    fn conn_writable(&mut self, i: usize) {
        let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        while c.unsent() > 0 {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(0) => break,
                Ok(n) => {
                    c.wpos += n;
                    c.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("{}: write error: {e}", c.peer);
                    c.read_closed = true;
                    c.replies.clear();
                    c.wbuf.clear();
                    c.wpos = 0;
                    break;
                }
            }
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wbuf.shrink_to(READ_CHUNK);
            c.wpos = 0;
        } else if c.wpos > MAX_WRITE_BUFFER {
            c.wbuf.drain(..c.wpos);
            c.wpos = 0;
        }
        self.update_interest(i);
    }

    /// Register the interest a connection needs now, or close it when it is finished.
    fn update_interest(&mut self, i: usize) {
        let Some(c) = self.conns.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        if c.done() {
            self.close_conn(i);
            return;
        }
        let read = !c.read_closed && !c.paused;
        let write = c.unsent() > 0;
        let want = match (read, write) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        if want == c.interest {
            return;
        }
        let token = Token(FIRST_CONN + i);
        let r = self.poll.registry();
        let res = match (c.interest, want) {
            (_, None) => r.deregister(c.stream.source()),
            (None, Some(w)) => r.register(c.stream.source(), token, w),
            (Some(_), Some(w)) => r.reregister(c.stream.source(), token, w),
        };
        if let Err(e) = res {
            log::warn!("{}: cannot update poll interest: {e}", c.peer);
        }
        c.interest = want;
    }

    /// Resume connections and UDP paused by back-pressure once there is room again.
    fn resume_paused(&mut self) {
        if !self.can_accept() {
            return;
        }
        if self.udp_backlog {
            self.read_udp();
        }
        for i in 0..self.conns.len() {
            let resume = match self.conns[i].as_mut() {
                Some(c) if c.paused && !c.read_closed => {
                    c.unsent() <= MAX_WRITE_BUFFER / 2 && c.replies.len() <= MAX_PENDING_REPLIES / 2
                }
                _ => false,
            };
            if resume {
                if let Some(c) = self.conns[i].as_mut() {
                    c.paused = false;
                }
                // Edge-triggered: data that arrived while paused raises no new event.
                self.process_buffer(i);
                self.conn_readable(i);
            }
            if !self.can_accept() {
                return;
            }
        }
    }

    fn sweep_idle(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            let idle = match self.conns[i].as_ref() {
                Some(c) => {
                    c.replies.is_empty()
                        && c.unsent() == 0
                        && now.duration_since(c.last_active) > self.idle_timeout
                }
                None => false,
            };
            if idle {
                if let Some(c) = self.conns[i].as_ref() {
                    log::info!("closing idle connection from {}", c.peer);
                }
                self.close_conn(i);
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.writer_tx.take();
    }
}
