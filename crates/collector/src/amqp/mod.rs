//! The message-bus source: an AMQP 0-9-1 consumer for ceilometer's `notifier://` samples
//! (oslo.messaging, driver `messagingv2`, rabbit transport), one per worker process.
//!
//! [`AmqpConsumer::start`] starts one thread (after fork; nothing runs before it is called). The
//! thread owns the broker connection: it connects, declares what oslo.messaging's rabbit driver
//! declares for a notification listener on `<metering_topic>` priority `sample` — the topic
//! exchange `control_exchange`, the queue `<metering_topic>.sample` bound with that routing key,
//! durability as `amqp_durable_queues`, no queue arguments — sets the prefetch, consumes with
//! manual acks and answers heartbeats. It hands each delivery to the worker loop through a
//! channel and wakes the loop; the loop answers with [`AmqpConsumer::ack`] or
//! [`AmqpConsumer::reject`], which wake the thread in turn. A lost connection is reopened with
//! exponential backoff (cap 30 s); the loop never blocks on the network.
//!
//! Delivery tags carry the connection's epoch in their top 16 bits, so an ack for a delivery of
//! a connection that has since died is recognised and dropped: the broker has already put that
//! message back in the queue and will deliver it again (with `redelivered` set).
//!
//! The protocol codec is `amq-protocol` (the one lapin is built on); the I/O is a `mio` poll in
//! the thread. [`decode_envelope`] turns a message body into sample maps with a small JSON
//! reader of its own, because ceilometer's signature needs what a generic JSON value loses: int
//! versus float (`1` versus `1.0`), exact float digits, map order, and Python's `NaN` and
//! `Infinity`. TLS (`amqps://`, `?ssl=1`, or `[messaging] ssl` with oslo.messaging's
//! `ssl_ca_file`, `ssl_cert_file`, `ssl_key_file`) is rustls driven by the same poll
//! ([`crate::tls_stream`]). What this module does not do: kombu compression, or anything but
//! consuming.

mod envelope;
mod url;

pub use envelope::decode_envelope;
pub use url::tls_config;
use url::{tls_config_for, Host, TransportUrl};

use crate::config::MessagingConfig;
use crate::dispatch::Wake;
use crate::tls_stream::Stream;
use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame, ProtocolVersion, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Heartbeat we ask for (oslo's `heartbeat_timeout_threshold` default; the URL may override
/// it, 0 disables); the broker's proposal wins when smaller (RabbitMQ's default is 60 s).
const HEARTBEAT: u16 = 60;
/// Connect, log in, declare and start consuming within this, or try again later.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a requeued delivery is held before the reject goes out, so that a dead database
/// does not make the broker and this worker spin on the same messages.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that consumed this long was healthy: the next reconnect is immediate.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Bound on the wait for the broker's close-ok at shutdown, and on the thread's join.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames before `connection.tune` are small; the broker's own limit applies after it.
const FRAME_MAX_BEFORE_TUNE: u32 = 128 * 1024;
/// RabbitMQ refuses messages over 128 MiB by default; a bigger body is dropped, not buffered.
const MAX_BODY: u64 = 128 * 1024 * 1024;

/// What the consumer thread may hold: the largest message body it takes (larger ones are read,
/// thrown away and rejected without requeue), and the bytes of received deliveries the worker
/// has not taken yet (past it the thread stops reading the broker's socket, so TCP flow
/// control holds the rest, until the worker catches up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body: u64,
    pub max_queued_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body: MAX_BODY,
            max_queued_bytes: usize::MAX,
        }
    }
}
const CHANNEL: u16 = 1;
/// Bytes read from the broker per round before the frames read are turned into deliveries.
const READ_BUDGET: usize = 64 * 1024;
const EPOCH_SHIFT: u32 = 48;
const TAG_MASK: u64 = (1 << EPOCH_SHIFT) - 1;

const WAKE: Token = Token(0);
const SOCKET: Token = Token(1);

/// What the consumer thread reports, for `collectorctl status` and the worker's counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AmqpStatus {
    /// Logged in, channel open.
    pub connected: bool,
    /// The broker confirmed the consumer (and it was not cancelled since).
    pub consuming: bool,
    pub last_error: Option<String>,
    /// Connections established after the first one.
    pub reconnects: u64,
    /// Deliveries handed to the loop.
    pub deliveries: u64,
}

/// One message from the queue. `tag` is what [`AmqpConsumer::ack`] and
/// [`AmqpConsumer::reject`] take; it is only valid on the connection that delivered it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub tag: u64,
    pub body: Vec<u8>,
    /// The broker delivered this message before (to us or someone else) without an ack.
    pub redelivered: bool,
}

enum Command {
    Ack(u64),
    Reject(u64, bool),
    StopConsuming,
    Shutdown,
}

/// The worker loop's handle on its consumer thread.
pub struct AmqpConsumer {
    /// Bytes of deliveries sent by the thread and not yet taken by [`AmqpConsumer::try_recv`].
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    commands: Sender<Command>,
    thread_waker: Arc<Waker>,
    deliveries: Receiver<Delivery>,
    status: Arc<Mutex<AmqpStatus>>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread has returned (its sender is dropped), for a bounded join.
    done: Receiver<()>,
}

impl AmqpConsumer {
    /// Start the consumer thread (call in the worker process, after fork). Never blocks on the
    /// network: connection happens in the thread, with reconnect and exponential backoff (cap
    /// 30 s). `Err` is for a `transport_url` that cannot be used (a boot error), or a thread or
    /// poll that cannot be created.
    pub fn start(cfg: &MessagingConfig, wake: Arc<dyn Wake>) -> Result<AmqpConsumer, String> {
        AmqpConsumer::start_with_limits(cfg, Limits::default(), wake)
    }

    /// [`AmqpConsumer::start`] with what the thread may hold bounded by `limits`.
    pub fn start_with_limits(
        cfg: &MessagingConfig,
        limits: Limits,
        wake: Arc<dyn Wake>,
    ) -> Result<AmqpConsumer, String> {
        let target = TransportUrl::parse(&cfg.transport_url)?;
        let tls = tls_config_for(cfg, &target)?;
        if cfg.metering_topic.is_empty() {
            return Err("[messaging] metering_topic is empty".into());
        }
        let poll = Poll::new().map_err(|e| format!("amqp: cannot create a poll: {e}"))?;
        let thread_waker = Arc::new(
            Waker::new(poll.registry(), WAKE)
                .map_err(|e| format!("amqp: cannot create a waker: {e}"))?,
        );
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (dlv_tx, dlv_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let status = Arc::new(Mutex::new(AmqpStatus::default()));
        let queued = Arc::new(AtomicUsize::new(0));
        let queue = format!("{}.sample", cfg.metering_topic);
        let pid = std::process::id();
        let thread = Consumer {
            next_host: pid as usize % target.hosts.len(),
            tls,
            connection_name: format!("collector[{pid}] {}/{queue}", cfg.control_exchange),
            target,
            exchange: cfg.control_exchange.clone(),
            queue,
            durable: cfg.amqp_durable_queues,
            prefetch: cfg.rabbit_qos_prefetch_count,
            poll,
            commands: cmd_rx,
            deliveries: dlv_tx,
            wake,
            status: status.clone(),
            limits,
            queued: queued.clone(),
            epoch: 0,
            connections: 0,
            want_consume: true,
        };
        let handle = std::thread::Builder::new()
            .name("amqp-consumer".into())
            .spawn(move || {
                let _done = done_tx;
                thread.run();
            })
            .map_err(|e| format!("amqp: cannot start the consumer thread: {e}"))?;
        Ok(AmqpConsumer {
            queued,
            max_queued: limits.max_queued_bytes,
            commands: cmd_tx,
            thread_waker,
            deliveries: dlv_rx,
            status,
            thread: Some(handle),
            done: done_rx,
        })
    }

    /// Next delivery, non-blocking. The loop calls it after every wake.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let d = self.deliveries.try_recv().ok()?;
        let before = self.queued.fetch_sub(d.body.len(), Ordering::SeqCst);
        // The thread may have stopped reading for want of room: let it look again.
        if before >= self.max_queued {
            let _ = self.thread_waker.wake();
        }
        Some(d)
    }

    /// Bytes of deliveries received and not yet taken.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Ack after every sample of the delivery is committed (or it was malformed).
    pub fn ack(&mut self, tag: u64) {
        self.send(Command::Ack(tag));
    }

    /// Reject; with `requeue` the broker redelivers, but only after the thread held the reject
    /// for [`REQUEUE_DELAY`] (the loop does not wait), so a dead database does not spin.
    pub fn reject(&mut self, tag: u64, requeue: bool) {
        self.send(Command::Reject(tag, requeue));
    }

    /// Graceful stop or reload: cancel the consumer (no new deliveries) but keep the channel
    /// open so the deliveries in flight can still be acked. A lost connection is not reopened
    /// after this.
    pub fn stop_consuming(&mut self) {
        self.send(Command::StopConsuming);
    }

    /// Close the channel and the connection (unacked deliveries return to the queue) and join
    /// the thread, waiting at most 5 s. Acks sent before this go out first.
    pub fn shutdown(mut self) {
        self.finish(JOIN_TIMEOUT);
    }

    pub fn status(&self) -> AmqpStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn send(&self, cmd: Command) {
        if self.commands.send(cmd).is_ok() {
            if let Err(e) = self.thread_waker.wake() {
                log::error!("amqp: cannot wake the consumer thread: {e}");
            }
        }
    }

    fn finish(&mut self, timeout: Duration) {
        let Some(handle) = self.thread.take() else {
            return;
        };
        self.send(Command::Shutdown);
        match self.done.recv_timeout(timeout) {
            Err(RecvTimeoutError::Disconnected) => {
                if handle.join().is_err() {
                    log::error!("amqp: the consumer thread panicked");
                }
            }
            _ => log::warn!(
                "amqp: the consumer thread did not stop within {} s; leaving it",
                timeout.as_secs()
            ),
        }
    }
}

impl Drop for AmqpConsumer {
    /// A consumer dropped without [`AmqpConsumer::shutdown`] still closes its connection, but
    /// waits only briefly for the thread.
    fn drop(&mut self) {
        self.finish(CLOSE_TIMEOUT);
    }
}

// ---------------------------------------------------------------------------------------------
// The consumer thread

/// Why a connection ended.
enum End {
    /// `shutdown`: close and leave.
    Shutdown,
    /// `stop_consuming` before the consumer was set up: close, stay idle.
    Stopped,
    /// The broker closed the channel (code, text); some callers recover from it.
    Channel(u16, String),
    Failed(String),
}

impl End {
    fn into_error(self) -> Option<String> {
        match self {
            End::Shutdown | End::Stopped => None,
            End::Channel(code, text) => Some(format!("broker closed the channel: {code} {text}")),
            End::Failed(e) => Some(e),
        }
    }
}

fn failed(e: impl Into<String>) -> End {
    End::Failed(e.into())
}

/// A delivery whose content is still arriving.
struct Partial {
    tag: u64,
    redelivered: bool,
    size: Option<u64>,
    body: Vec<u8>,
    /// Over [`MAX_BODY`]: read and thrown away, then rejected.
    discard: bool,
}

/// One connection's state.
struct Session {
    sock: Stream,
    peer: String,
    epoch: u64,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    writable_interest: bool,
    /// The TCP connection is up (a write went through).
    established: bool,
    /// `connection.open-ok` was received: a graceful close is possible.
    open: bool,
    frame_max: u32,
    heartbeat: Option<Duration>,
    last_read: Instant,
    last_write: Instant,
    inbox: VecDeque<AMQPFrame>,
    consumer_tag: Option<String>,
    consuming_since: Option<Instant>,
    cancel_sent: bool,
    partial: Option<Partial>,
    /// The last read stopped before WouldBlock (its budget, or the worker's backlog).
    more_to_read: bool,
    /// Requeue-rejects held until their time (raw delivery tags).
    delayed: VecDeque<(Instant, u64)>,
    wake_loop: bool,
}

impl Session {
    /// A connection just opened: nothing sent or received yet, limits as before `tune`.
    fn new(sock: Stream, peer: String, epoch: u64) -> Session {
        let now = Instant::now();
        Session {
            sock,
            peer,
            epoch,
            rbuf: Vec::with_capacity(64 * 1024),
            wbuf: Vec::new(),
            writable_interest: true,
            established: false,
            open: false,
            frame_max: FRAME_MAX_BEFORE_TUNE,
            heartbeat: None,
            last_read: now,
            last_write: now,
            inbox: VecDeque::new(),
            consumer_tag: None,
            consuming_since: None,
            cancel_sent: false,
            partial: None,
            more_to_read: false,
            delayed: VecDeque::new(),
            wake_loop: false,
        }
    }
}

struct Consumer {
    target: TransportUrl,
    /// Set when the connection is TLS.
    tls: Option<Arc<rustls::ClientConfig>>,
    next_host: usize,
    connection_name: String,
    exchange: String,
    queue: String,
    durable: bool,
    prefetch: u16,
    poll: Poll,
    commands: Receiver<Command>,
    deliveries: Sender<Delivery>,
    wake: Arc<dyn Wake>,
    status: Arc<Mutex<AmqpStatus>>,
    limits: Limits,
    /// Shared with [`AmqpConsumer::queued`].
    queued: Arc<AtomicUsize>,
    epoch: u64,
    connections: u64,
    want_consume: bool,
}

impl Consumer {
    fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if !self.want_consume {
                // Stopped: nothing in flight can come back from a connection we would open
                // now, so there is no reason to open one; wait for shutdown.
                if self.idle(None) {
                    return;
                }
                continue;
            }
            let started = Instant::now();
            let (end, healthy_for) = self.session();
            self.set_status(|s| {
                s.connected = false;
                s.consuming = false;
            });
            let error = match end {
                End::Shutdown => return,
                End::Stopped => continue,
                end => end.into_error().unwrap_or_default(),
            };
            log::warn!("amqp: {}", crate::untrusted::Untrusted(&error));
            self.set_status(|s| s.last_error = Some(error));
            if !self.want_consume {
                continue;
            }
            let delay = if healthy_for >= HEALTHY_AFTER {
                backoff = BACKOFF_MIN;
                Duration::ZERO
            } else {
                let d = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                d
            };
            log::debug!(
                "amqp: reconnecting in {:.1} s (last attempt lasted {:.1} s)",
                delay.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
            if self.idle(Some(Instant::now() + delay)) {
                return;
            }
        }
    }

    fn set_status(&self, f: impl FnOnce(&mut AmqpStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut status);
    }

    /// Wait without a connection until `until` (or forever), obeying commands. Acks and
    /// rejects here belong to dead connections and are dropped. True: shut down.
    fn idle(&mut self, until: Option<Instant>) -> bool {
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return true,
                    Ok(Command::StopConsuming) => self.want_consume = false,
                    Ok(Command::Ack(_) | Command::Reject(..)) => {}
                    Err(TryRecvError::Empty) => break,
                }
            }
            let timeout = match until {
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        return false;
                    }
                    Some(t - now)
                }
                None => None,
            };
            let mut events = Events::with_capacity(4);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("amqp: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// One connection from connect to close. Returns why it ended and how long it consumed.
    fn session(&mut self) -> (End, Duration) {
        self.epoch = self.epoch % 0xffff + 1; // 1..=65535: the top 16 bits of every tag
        let host = self.target.hosts[self.next_host % self.target.hosts.len()].clone();
        self.next_host = self.next_host.wrapping_add(1);
        let mut s = match self.connect(&host) {
            Ok(s) => s,
            Err(end) => return (end, Duration::ZERO),
        };
        let end = match self.setup(&mut s, &host) {
            Ok(()) => self.consume(&mut s),
            Err(end) => end,
        };
        let healthy_for = s.consuming_since.map(|t| t.elapsed()).unwrap_or_default();
        if matches!(end, End::Shutdown | End::Stopped) && s.open {
            self.close(&mut s);
        }
        let _ = self.poll.registry().deregister(&mut s.sock);
        (end, healthy_for)
    }

    fn connect(&mut self, host: &Host) -> Result<Session, End> {
        let peer = format!("{}:{}", host.host, host.port);
        // Name resolution is the one blocking step (instant for an address literal).
        let addr = (host.host.as_str(), host.port)
            .to_socket_addrs()
            .map_err(|e| failed(format!("cannot resolve {peer}: {e}")))?
            .next()
            .ok_or_else(|| failed(format!("cannot resolve {peer}: no address")))?;
        let tcp = TcpStream::connect(addr)
            .map_err(|e| failed(format!("cannot connect to {peer}: {e}")))?;
        let mut sock = match &self.tls {
            Some(config) => Stream::tls(tcp, config.clone(), &host.host).map_err(failed)?,
            None => Stream::plain(tcp),
        };
        // Acks are small frames written one by one; Nagle would hold them back.
        let _ = sock.set_nodelay(true);
        self.poll
            .registry()
            .register(&mut sock, SOCKET, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| failed(format!("cannot register the socket: {e}")))?;
        let mut s = Session::new(sock, peer, self.epoch);
        push_frame(
            &mut s,
            &AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()),
        )?;
        Ok(s)
    }

    /// Log in, open the channel, declare, set the prefetch and start the consumer.
    fn setup(&mut self, s: &mut Session, host: &Host) -> Result<(), End> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let start = match self.next_frame(s, deadline, "connection.start")? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(m))) => m,
            AMQPFrame::ProtocolHeader(v) => {
                return Err(failed(format!(
                    "{} speaks AMQP {}.{}.{}, not 0-9-1",
                    s.peer, v.major, v.minor, v.revision
                )))
            }
            other => return Err(failed(format!("expected connection.start, got {other:?}"))),
        };
        let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            return Err(failed(format!(
                "{} offers no PLAIN login (mechanisms: {mechanisms})",
                s.peer
            )));
        }
        let response = format!("\0{}\0{}", host.user, host.password);
        send_method(
            s,
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: self.client_properties(),
                mechanism: "PLAIN".into(),
                response: response.into(),
                locale: "en_US".into(),
            })),
        )?;
        let tune = match self.next_frame(s, deadline, "connection.tune")? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
            other => return Err(failed(format!("expected connection.tune, got {other:?}"))),
        };
        let heartbeat = match (self.target.heartbeat, tune.heartbeat) {
            (0, _) => 0,
            (ours, 0) => ours,
            (ours, theirs) => ours.min(theirs),
        };
        let frame_max = match tune.frame_max {
            0 => FRAME_MAX_BEFORE_TUNE,
            f => f,
        };
        send_method(
            s,
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max,
                heartbeat,
            })),
        )?;
        s.frame_max = frame_max;
        s.heartbeat = Some(Duration::from_secs(u64::from(heartbeat)));
        self.call(
            s,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: self.target.vhost.as_str().into(),
            })),
            "connection.open-ok",
            deadline,
        )?;
        s.open = true;
        self.open_channel(s, deadline)?;
        if self.connections > 0 {
            self.set_status(|st| st.reconnects += 1);
        }
        self.connections += 1;
        self.set_status(|st| st.connected = true);
        log::info!(
            "amqp: connected to {} vhost {:?} as {:?}",
            s.peer,
            self.target.vhost,
            host.user
        );

        match self.declare(s, self.durable, deadline) {
            Err(End::Channel(406, text)) if self.durable && text.contains("'durable'") => {
                // oslo.messaging's fallback: an exchange or queue that exists non-durable is
                // used as it is rather than refused.
                log::warn!(
                    "amqp: {text}; declaring exchange {:?} and queue {:?} non-durable instead",
                    self.exchange,
                    self.queue
                );
                self.open_channel(s, deadline)?;
                self.declare(s, false, deadline)?;
            }
            other => other?,
        }
        self.call(
            s,
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: self.prefetch,
                global: false,
            })),
            "basic.qos-ok",
            deadline,
        )?;
        if !self.want_consume {
            return Err(End::Stopped);
        }
        let ok = self.call(
            s,
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: self.queue.as_str().into(),
                consumer_tag: "".into(),
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
            "basic.consume-ok",
            deadline,
        )?;
        if let AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)) = ok {
            s.consumer_tag = Some(ok.consumer_tag.to_string());
        }
        s.consuming_since = Some(Instant::now());
        self.set_status(|st| st.consuming = true);
        log::info!(
            "amqp: consuming queue {:?} (exchange {:?}, prefetch {})",
            self.queue,
            self.exchange,
            self.prefetch
        );
        if !self.want_consume {
            // stop_consuming arrived while we were setting up.
            self.cancel(s)?;
        }
        Ok(())
    }

    fn open_channel(&mut self, s: &mut Session, deadline: Instant) -> Result<(), End> {
        self.call(
            s,
            CHANNEL,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            "channel.open-ok",
            deadline,
        )
        .map(drop)
    }

    /// The topology of oslo.messaging's `declare_topic_consumer` for `<topic>.sample`.
    fn declare(&mut self, s: &mut Session, durable: bool, deadline: Instant) -> Result<(), End> {
        self.call(
            s,
            CHANNEL,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: self.exchange.as_str().into(),
                kind: "topic".into(),
                passive: false,
                durable,
                auto_delete: false,
                internal: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
            "exchange.declare-ok",
            deadline,
        )?;
        self.call(
            s,
            CHANNEL,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: self.queue.as_str().into(),
                passive: false,
                durable,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
            "queue.declare-ok",
            deadline,
        )?;
        self.call(
            s,
            CHANNEL,
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: self.queue.as_str().into(),
                exchange: self.exchange.as_str().into(),
                routing_key: self.queue.as_str().into(),
                nowait: false,
                arguments: FieldTable::default(),
            })),
            "queue.bind-ok",
            deadline,
        )
        .map(drop)
    }

    fn client_properties(&self) -> FieldTable {
        let mut caps = FieldTable::default();
        caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
        caps.insert(
            "authentication_failure_close".into(),
            AMQPValue::Boolean(true),
        );
        let mut props = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
        props.insert("product".into(), s("collector"));
        props.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
        props.insert("platform".into(), s("Rust"));
        props.insert("connection_name".into(), s(&self.connection_name));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        props
    }

    /// Send a synchronous method and wait for its reply (`what`, for messages). Frames that
    /// arrive after the reply stay in the inbox.
    fn call(
        &mut self,
        s: &mut Session,
        channel_id: u16,
        method: AMQPClass,
        what: &str,
        deadline: Instant,
    ) -> Result<AMQPClass, End> {
        send_method(s, channel_id, method)?;
        loop {
            match self.next_frame(s, deadline, what)? {
                AMQPFrame::Method(_, m) if is_reply(&m, what) => return Ok(m),
                AMQPFrame::Heartbeat(_) => {}
                other => log::debug!("amqp: ignoring {other:?} while waiting for {what}"),
            }
        }
    }

    /// The next frame, by `deadline`. Closes from the broker end the wait with their reason.
    fn next_frame(
        &mut self,
        s: &mut Session,
        deadline: Instant,
        what: &str,
    ) -> Result<AMQPFrame, End> {
        loop {
            if let Some(frame) = s.inbox.pop_front() {
                return match frame {
                    AMQPFrame::Method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                    ) => {
                        let _ = send_method(s, 0, close_ok());
                        let _ = self.flush(s);
                        Err(connection_closed(&c, what))
                    }
                    AMQPFrame::Method(ch, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                        send_method(
                            s,
                            ch,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        )?;
                        Err(End::Channel(c.reply_code, c.reply_text.to_string()))
                    }
                    f => Ok(f),
                };
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "{}: no {what} within {} s",
                    s.peer,
                    HANDSHAKE_TIMEOUT.as_secs()
                )));
            }
            self.pump(s, Some(deadline), true)?;
        }
    }

    /// The consuming phase: hand deliveries to the loop until the connection ends.
    fn consume(&mut self, s: &mut Session) -> End {
        loop {
            while let Some(frame) = s.inbox.pop_front() {
                if let Err(end) = self.on_frame(s, frame) {
                    return end;
                }
            }
            if s.wake_loop {
                s.wake_loop = false;
                self.wake.wake();
            }
            if let Err(end) = self.pump(s, None, true) {
                return end;
            }
        }
    }

    fn on_frame(&mut self, s: &mut Session, frame: AMQPFrame) -> Result<(), End> {
        match frame {
            AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                if s.partial.is_some() {
                    return Err(failed("basic.deliver before the previous content ended"));
                }
                if d.delivery_tag > TAG_MASK {
                    return Err(failed("delivery tags exhausted on this channel"));
                }
                s.partial = Some(Partial {
                    tag: d.delivery_tag,
                    redelivered: d.redelivered,
                    size: None,
                    body: Vec::new(),
                    discard: false,
                });
            }
            AMQPFrame::Header(_, _, header) => {
                let Some(p) = s.partial.as_mut() else {
                    return Err(failed("content header without basic.deliver"));
                };
                p.size = Some(header.body_size);
                if header.body_size > self.limits.max_body {
                    p.discard = true;
                } else {
                    p.body.reserve(header.body_size.min(4 << 20) as usize);
                }
                self.complete_delivery(s)?;
            }
            AMQPFrame::Body(_, data) => {
                let Some(p) = s.partial.as_mut() else {
                    return Err(failed("content body without basic.deliver"));
                };
                if p.size.is_none() {
                    return Err(failed("content body before its header"));
                }
                if p.discard {
                    p.size = p.size.map(|n| n.saturating_sub(data.len() as u64));
                } else {
                    p.body.extend_from_slice(&data);
                }
                self.complete_delivery(s)?;
            }
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                let _ = send_method(s, 0, close_ok());
                let _ = self.flush(s);
                return Err(connection_closed(&c, "deliveries"));
            }
            AMQPFrame::Method(ch, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                let _ = send_method(
                    s,
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                let _ = self.flush(s);
                return Err(End::Channel(c.reply_code, c.reply_text.to_string()));
            }
            AMQPFrame::Method(ch, AMQPClass::Basic(basic::AMQPMethod::Cancel(c))) => {
                // The broker cancelled us (queue deleted, node failover): declare again.
                let _ = send_method(
                    s,
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag.clone(),
                    })),
                );
                let _ = self.flush(s);
                if self.want_consume {
                    return Err(failed(format!(
                        "broker cancelled consumer {} (queue {:?} deleted?)",
                        c.consumer_tag, self.queue
                    )));
                }
                self.set_status(|st| st.consuming = false);
            }
            AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::CancelOk(_))) => {
                log::info!("amqp: consumer on {:?} cancelled", self.queue);
                self.set_status(|st| st.consuming = false);
            }
            AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) => {
                log::warn!(
                    "amqp: broker blocked the connection: {}",
                    crate::untrusted::untrusted(&b.reason)
                );
            }
            AMQPFrame::Heartbeat(_) => {}
            other => log::debug!("amqp: ignoring {other:?}"),
        }
        Ok(())
    }

    fn complete_delivery(&mut self, s: &mut Session) -> Result<(), End> {
        let done = match &s.partial {
            Some(p) => match p.size {
                Some(n) if p.discard => n == 0,
                Some(n) => p.body.len() as u64 >= n,
                None => false,
            },
            None => false,
        };
        if !done {
            return Ok(());
        }
        let Some(p) = s.partial.take() else {
            return Ok(());
        };
        if p.discard {
            log::error!(
                "amqp: dropped a message over max_frame_bytes ({} bytes) from {:?}",
                self.limits.max_body,
                self.queue
            );
            return send_method(s, CHANNEL, reject_method(p.tag, false));
        }
        let delivery = Delivery {
            tag: (s.epoch << EPOCH_SHIFT) | p.tag,
            body: p.body,
            redelivered: p.redelivered,
        };
        self.queued.fetch_add(delivery.body.len(), Ordering::SeqCst);
        if self.deliveries.send(delivery).is_err() {
            return Err(End::Shutdown); // the loop is gone
        }
        self.set_status(|st| st.deliveries += 1);
        s.wake_loop = true;
        Ok(())
    }

    /// Send basic.cancel for our consumer (once).
    fn cancel(&mut self, s: &mut Session) -> Result<(), End> {
        if s.cancel_sent {
            return Ok(());
        }
        if let Some(tag) = s.consumer_tag.clone() {
            s.cancel_sent = true;
            send_method(
                s,
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: tag.into(),
                    nowait: false,
                })),
            )?;
        }
        Ok(())
    }

    fn on_command(&mut self, s: &mut Session, cmd: Command) -> Result<(), End> {
        let epoch = s.epoch;
        let ours = |tag: u64| tag >> EPOCH_SHIFT == epoch;
        match cmd {
            Command::Ack(tag) if ours(tag) => send_method(
                s,
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: tag & TAG_MASK,
                    multiple: false,
                })),
            ),
            Command::Reject(tag, true) if ours(tag) => {
                s.delayed
                    .push_back((Instant::now() + REQUEUE_DELAY, tag & TAG_MASK));
                Ok(())
            }
            Command::Reject(tag, false) if ours(tag) => {
                send_method(s, CHANNEL, reject_method(tag & TAG_MASK, false))
            }
            Command::Ack(tag) | Command::Reject(tag, _) => {
                log::debug!("amqp: dropping ack/reject of {tag:#x} from an earlier connection");
                Ok(())
            }
            Command::StopConsuming => {
                self.want_consume = false;
                self.cancel(s)
            }
            Command::Shutdown => Err(End::Shutdown),
        }
    }

    /// One round of I/O: wait for the socket, a command or a timer (at most until `deadline`),
    /// then read what arrived into the inbox, obey commands, send heartbeats and due rejects,
    /// and write what is pending.
    fn pump(
        &mut self,
        s: &mut Session,
        deadline: Option<Instant>,
        commands: bool,
    ) -> Result<(), End> {
        let now = Instant::now();
        let mut wake_at = deadline;
        let mut earliest = |t: Instant| wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
        if let Some(hb) = s.heartbeat.filter(|h| !h.is_zero()) {
            // While a write is pending, the socket's writable edge is what we wait for.
            if s.wbuf.is_empty() {
                earliest(s.last_write + hb / 2);
            }
            earliest(s.last_read + hb * 2);
        }
        if let Some(&(t, _)) = s.delayed.front() {
            earliest(t);
        }
        let mut timeout = wake_at.map(|t| t.saturating_duration_since(now));
        if s.more_to_read && self.queued.load(Ordering::SeqCst) < self.limits.max_queued_bytes {
            // Bytes are waiting in the socket (no new edge will tell us): look at once.
            timeout = Some(Duration::ZERO);
        }
        // What earlier steps queued goes out before we sleep.
        self.flush(s)?;
        let mut events = Events::with_capacity(8);
        match self.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(format!("poll failed: {e}"))),
        }
        // Socket events are edge-triggered hints; reading and writing until WouldBlock on
        // every round is cheap and cannot miss one.
        self.read(s)?;
        if commands {
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.on_command(s, cmd)?,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Err(End::Shutdown),
                }
            }
        }
        let now = Instant::now();
        while let Some(&(t, tag)) = s.delayed.front() {
            if t > now {
                break;
            }
            s.delayed.pop_front();
            send_method(s, CHANNEL, reject_method(tag, true))?;
        }
        if let Some(hb) = s.heartbeat.filter(|h| !h.is_zero()) {
            if now.duration_since(s.last_read) >= hb * 2 {
                return Err(failed(format!(
                    "{}: no heartbeat from the broker for {} s",
                    s.peer,
                    (hb * 2).as_secs()
                )));
            }
            if s.wbuf.is_empty() && now.duration_since(s.last_write) >= hb / 2 {
                push_frame(s, &AMQPFrame::Heartbeat(0))?;
            }
        }
        self.flush(s)
    }

    fn read(&mut self, s: &mut Session) -> Result<(), End> {
        let mut chunk = [0u8; 64 * 1024];
        // Frames read here become deliveries only after this returns: read a bounded amount
        // per round, so the worker's backlog is checked between rounds.
        let mut budget = READ_BUDGET;
        loop {
            if self.queued.load(Ordering::SeqCst) >= self.limits.max_queued_bytes {
                // The worker is behind: leave the rest in the socket (TCP flow control holds
                // the broker) until it takes some; it wakes us then. Not reading is our
                // choice, not the broker's silence.
                s.last_read = Instant::now();
                s.more_to_read = true;
                return Ok(());
            }
            if budget == 0 {
                s.more_to_read = true;
                return Ok(());
            }
            match s.sock.read(&mut chunk) {
                Ok(0) => {
                    return Err(failed(if s.open {
                        format!("{} closed the connection", s.peer)
                    } else {
                        format!(
                            "{} closed the connection during the handshake (wrong user, \
                             password or vhost?)",
                            s.peer
                        )
                    }))
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    s.last_read = Instant::now();
                    s.rbuf.extend_from_slice(&chunk[..n]);
                    take_frames(s).map_err(|e| failed(format!("{}: {e}", s.peer)))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.more_to_read = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if !s.established && e.kind() == io::ErrorKind::NotConnected => {
                    return Ok(())
                }
                Err(e) => return Err(io_failed(s, e)),
            }
        }
    }

    fn flush(&mut self, s: &mut Session) -> Result<(), End> {
        while !s.wbuf.is_empty() {
            match s.sock.write(&s.wbuf) {
                Ok(0) => return Err(failed(format!("{}: connection closed", s.peer))),
                Ok(n) => {
                    s.wbuf.drain(..n);
                    s.established = true;
                    s.last_write = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if !s.established && e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => return Err(io_failed(s, e)),
            }
        }
        // TLS records still waiting for the socket count as pending output.
        s.sock.flush().map_err(|e| io_failed(s, e))?;
        let want_writable = !s.wbuf.is_empty() || s.sock.wants_write();
        if want_writable != s.writable_interest {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            self.poll
                .registry()
                .reregister(&mut s.sock, SOCKET, interest)
                .map_err(|e| failed(format!("cannot reregister the socket: {e}")))?;
            s.writable_interest = want_writable;
        }
        Ok(())
    }

    /// connection.close, then wait (bounded) for close-ok so the broker requeues what we
    /// hold before we go.
    fn close(&mut self, s: &mut Session) {
        let close = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "shutdown".into(),
            class_id: 0,
            method_id: 0,
        }));
        if send_method(s, 0, close).is_err() {
            return;
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while Instant::now() < deadline {
            if self.pump(s, Some(deadline), false).is_err() {
                return;
            }
            while let Some(frame) = s.inbox.pop_front() {
                if let AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(
                        connection::AMQPMethod::CloseOk(_) | connection::AMQPMethod::Close(_),
                    ),
                ) = frame
                {
                    log::info!("amqp: connection to {} closed", s.peer);
                    return;
                }
            }
        }
        log::warn!("amqp: no close-ok from {}; closing the socket", s.peer);
    }
}

fn io_failed(s: &Session, e: io::Error) -> End {
    let e = match storage::tls::explain(&e.to_string()) {
        Some(why) => format!("TLS: {why} ({e})"),
        None => e.to_string(),
    };
    if s.established {
        failed(format!("{}: {e}", s.peer))
    } else {
        failed(format!("cannot connect to {}: {e}", s.peer))
    }
}

fn connection_closed(c: &connection::Close, during: &str) -> End {
    failed(format!(
        "broker closed the connection ({during}): {} {}",
        c.reply_code, c.reply_text
    ))
}

fn close_ok() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}))
}

fn reject_method(tag: u64, requeue: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
        delivery_tag: tag,
        requeue,
    }))
}

/// Is `m` the reply named `what` (e.g. "queue.declare-ok")?
fn is_reply(m: &AMQPClass, what: &str) -> bool {
    use amq_protocol::protocol::queue::AMQPMethod as Q;
    use amq_protocol::protocol::{basic::AMQPMethod as B, channel::AMQPMethod as Ch};
    use amq_protocol::protocol::{connection::AMQPMethod as C, exchange::AMQPMethod as E};
    matches!(
        (what, m),
        ("connection.open-ok", AMQPClass::Connection(C::OpenOk(_)))
            | ("channel.open-ok", AMQPClass::Channel(Ch::OpenOk(_)))
            | ("exchange.declare-ok", AMQPClass::Exchange(E::DeclareOk(_)))
            | ("queue.declare-ok", AMQPClass::Queue(Q::DeclareOk(_)))
            | ("queue.bind-ok", AMQPClass::Queue(Q::BindOk(_)))
            | ("basic.qos-ok", AMQPClass::Basic(B::QosOk(_)))
            | ("basic.consume-ok", AMQPClass::Basic(B::ConsumeOk(_)))
    )
}

fn send_method(s: &mut Session, channel_id: u16, method: AMQPClass) -> Result<(), End> {
    push_frame(s, &AMQPFrame::Method(channel_id, method))
}

fn push_frame(s: &mut Session, frame: &AMQPFrame) -> Result<(), End> {
    let buf = std::mem::take(&mut s.wbuf);
    match gen_frame(frame)(WriteContext::from(buf)) {
        Ok(ctx) => {
            s.wbuf = ctx.into_inner().0;
            Ok(())
        }
        Err(e) => Err(failed(format!("cannot encode {frame:?}: {e:?}"))),
    }
}

/// Move every complete frame from the read buffer to the inbox. A frame is checked against
/// `frame_max` from its header before it is waited for.
fn take_frames(s: &mut Session) -> Result<(), String> {
    let mut pos = 0;
    let result = loop {
        let buf = &s.rbuf[pos..];
        if buf.first() == Some(&b'A') {
            // A protocol header instead of a frame: the broker refuses our version.
            if buf.len() < 8 {
                break Ok(());
            }
            match parse_frame(&buf[..8]) {
                Ok((_, frame)) => {
                    s.inbox.push_back(frame);
                    pos += 8;
                    continue;
                }
                Err(e) => break Err(format!("undecodable protocol header: {e}")),
            }
        }
        if buf.len() < 7 {
            break Ok(());
        }
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
        if u64::from(size) + 8 > u64::from(s.frame_max) {
            break Err(format!(
                "frame of {size} bytes exceeds frame_max {}",
                s.frame_max
            ));
        }
        let total = size as usize + 8;
        if buf.len() < total {
            break Ok(());
        }
        let frame = if buf[0] == 3 {
            // Content body: copied as a slice rather than byte by byte.
            if buf[total - 1] != 0xCE {
                break Err("frame without frame-end octet".into());
            }
            AMQPFrame::Body(
                u16::from_be_bytes([buf[1], buf[2]]),
                buf[7..total - 1].to_vec(),
            )
        } else {
            match parse_frame(&buf[..total]) {
                Ok((_, frame)) => frame,
                Err(e) => break Err(format!("undecodable frame: {e}")),
            }
        };
        s.inbox.push_back(frame);
        pos += total;
    };
    s.rbuf.drain(..pos);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_url_is_a_start_error() {
        struct Nop;
        impl Wake for Nop {
            fn wake(&self) {}
        }
        let cfg = MessagingConfig {
            transport_url: "amqp://h/".into(),
            ..MessagingConfig::default()
        };
        let err = AmqpConsumer::start(&cfg, Arc::new(Nop)).err().unwrap();
        assert!(err.contains("transport_url"), "{err}");
    }

    #[test]
    fn frames_over_frame_max_are_refused_before_buffering() {
        // A session needs a socket: a loopback connection is the cheapest.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = Stream::plain(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let mut s = Session::new(sock, "test".into(), 1);
        s.writable_interest = false;
        s.established = true;
        s.open = true;
        s.frame_max = 4096;
        // A heartbeat and a body frame, then the start of a frame that claims 1 MiB.
        s.rbuf.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0xCE]);
        s.rbuf
            .extend_from_slice(&[3, 0, 1, 0, 0, 0, 2, b'h', b'i', 0xCE]);
        s.rbuf.extend_from_slice(&[3, 0, 1, 0, 16, 0, 0]);
        let err = take_frames(&mut s).unwrap_err();
        assert!(err.contains("exceeds frame_max 4096"), "{err}");
        assert_eq!(s.inbox.len(), 2);
        assert!(matches!(&s.inbox[1], AMQPFrame::Body(1, b) if b == b"hi"));
        // Partial frames wait for more bytes.
        s.rbuf.clear();
        s.inbox.clear();
        s.rbuf.extend_from_slice(&[3, 0, 1, 0, 0, 0, 2, b'h']);
        take_frames(&mut s).unwrap();
        assert!(s.inbox.is_empty());
        s.rbuf.extend_from_slice(&[b'i', 0xCE]);
        take_frames(&mut s).unwrap();
        assert_eq!(s.inbox.len(), 1);
        assert!(s.rbuf.is_empty());
    }
}
