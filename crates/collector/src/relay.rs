//! One writer per SQLite file: the workers of a launcher store through worker 0's writer.
//!
//! SQLite lets one connection write at a time, and whenever another connection has committed
//! it drops a connection's whole page cache, so every worker writing the one file re-read the
//! pages its next commit touched after each commit of another, and waited for the write lock
//! in its busy handler. Two workers spent 1.17-1.80 CPU-s per 100k stored samples, one
//! 0.85-0.95 (docs/performance.md, "One writer per SQLite file"). Here the worker in slot 0 listens on a
//! Unix socket beside the database (`<db>-writer.sock`, mode 0600; both ends check that the
//! other is a worker of the same launcher: same user, same parent) and its
//! writer thread stores what the other workers' writers send it, in the same transaction as
//! its own batches; the others decode, verify and batch as before and hand each batch over
//! ([`RelayStorage`]). When slot 0 cannot be reached (not started yet, restarting, a reload
//! moving to a new generation) a worker writes to the file itself, as before, and tries the
//! socket again a second later: nothing waits on slot 0 and nothing is lost. A batch whose
//! answer never came is written directly; idempotence on `message_id` makes that safe (what
//! slot 0 did commit counts as duplicates).
//!
//! Frames on the socket: a little-endian `u32` length, then the body. A request is a layout
//! byte, a `u32` sample count and each sample's fields as the worker holds them
//! ([`encode_request`]); an answer is a status byte (0 stored, 1 storage unavailable, 2 other
//! storage error, 3 the request could not be read) and either the [`RecordOutcome`] or the
//! error text. A request that cannot be read is written by its worker itself, like one that
//! got no answer.

use crate::config::Config;
use crate::dispatch::WriterMsg;
use meter::decode::{Limits, MAX_DEPTH_CEILING};
use meter::{CounterType, Sample, Volume};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storage::{
    MeterInfo, RecordOutcome, ResourceInfo, SampleFilter, Statistics, StatsSource, Storage,
    StorageError, StoredSample,
};

/// A frame larger than this is refused (a batch of 8 × 1,000 samples of 64 KiB is 512 MiB).
const MAX_FRAME: usize = 1 << 30;

/// After slot 0 could not be reached, write directly for this long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The longest `sun_path` Linux takes, without its terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The socket of the writer of the SQLite file `cfg` stores into, if it stores into one.
pub fn socket_path(cfg: &Config) -> Option<PathBuf> {
    if !cfg.has_dispatcher("database") {
        return None;
    }
    let url = storage::url::StorageUrl::parse(&cfg.database.connection).ok()?;
    if url.scheme != "sqlite" {
        return None;
    }
    match storage::sqlite::Target::from_url(&url).ok()? {
        storage::sqlite::Target::File(db) => {
            let mut p = db.into_os_string();
            p.push("-writer.sock");
            let p = PathBuf::from(p);
            // Room for the temporary name it is bound under first (`.PID`).
            if p.as_os_str().len() + 12 > MAX_SOCKET_PATH {
                log::warn!(
                    "{}: longer than a Unix socket path may be; every worker writes to the \
                     SQLite file itself",
                    p.display()
                );
                return None;
            }
            Some(p)
        }
        storage::sqlite::Target::Memory => None,
    }
}

/// A batch another worker's writer handed over, and where its outcome goes.
pub struct Request {
    pub samples: Vec<Sample>,
    pub reply: Sender<Result<RecordOutcome, StorageError>>,
}

/// Slot 0's listener: one thread accepting, one per connected worker.
pub struct Server {
    /// The writer's channel; `None` once the worker stops, so the writer sees its channel
    /// close when the loop's end goes (connections then answer "unavailable").
    tx: Arc<Mutex<Option<Sender<WriterMsg>>>>,
    path: PathBuf,
    /// Device and inode of the socket this server bound, so it removes only its own.
    id: (u64, u64),
}

impl Server {
    /// Bind `path` (atomically replacing a socket a previous worker 0 left, or the one the
    /// old generation's worker 0 still serves during a reload) and serve in the background.
    pub fn start(path: &Path, tx: Sender<WriterMsg>) -> io::Result<Server> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let installed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = installed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let meta = std::fs::symlink_metadata(path)?;
        let shared = Arc::new(Mutex::new(Some(tx)));
        let serving = shared.clone();
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || accept_loop(listener, serving))?;
        Ok(Server {
            tx: shared,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Stop taking batches for the writer; remove the socket unless a successor replaced it.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn accept_loop(listener: UnixListener, tx: Arc<Mutex<Option<Sender<WriterMsg>>>>) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !sibling(&conn) {
            log::warn!("relay: refused a connection from a process that is not a worker");
            continue;
        }
        let tx = tx.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("relay-conn".into())
            .spawn(move || serve(conn, &tx))
        {
            log::warn!("relay: cannot start a connection thread: {e}");
        }
    }
}

/// Whether the peer is another worker of this launcher: the same effective user (the socket
/// is 0600 too) and the same parent. Both ends check: a worker hands samples, which it has
/// verified, only to a sibling, and takes "stored" only from one.
fn sibling(conn: &UnixStream) -> bool {
    let Some((pid, uid)) = peer(conn) else {
        return false;
    };
    // SAFETY: geteuid and getppid have no preconditions.
    let (euid, ppid) = unsafe { (libc::geteuid(), libc::getppid()) };
    uid == euid && parent_of(pid) == Some(ppid)
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the parenthesised name).
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The peer's pid and effective user.
fn peer(conn: &UnixStream) -> Option<(libc::pid_t, libc::uid_t)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((cred.pid, cred.uid))
}

/// Answer one worker's batches until it hangs up or this worker stops.
fn serve(mut conn: UnixStream, tx: &Mutex<Option<Sender<WriterMsg>>>) {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        match read_frame(&mut conn, &mut buf) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::warn!("relay: reading a batch: {e}");
                return;
            }
        }
        out.clear();
        match decode_request(&buf) {
            Err(e) => {
                // Not a storage failure: the sender writes the batch to the file itself.
                log::warn!("relay: a batch could not be read ({e}); its worker writes it itself");
                encode_unreadable(&e, &mut out);
            }
            Ok(samples) => {
                let (reply, answer) = mpsc::channel();
                let sent = match tx.lock().ok().and_then(|t| t.clone()) {
                    Some(t) => t.send(WriterMsg::Relay(Request { samples, reply })).is_ok(),
                    None => false,
                };
                match sent.then(|| answer.recv().ok()).flatten() {
                    Some(r) => encode_reply(&r, &mut out),
                    // This worker is stopping: hanging up makes the other write the batch
                    // to the file itself.
                    None => return,
                }
            }
        }
        if let Err(e) = write_frame(&mut conn, &out) {
            log::warn!("relay: answering a batch: {e}");
            return;
        }
    }
}

/// Read one frame into `buf`; `false` at a clean end of stream.
fn read_frame(conn: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut len = [0u8; 4];
    match conn.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes"),
        ));
    }
    buf.clear();
    buf.resize(n, 0);
    conn.read_exact(buf)?;
    Ok(true)
}

fn write_frame(conn: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let n = u32::try_from(body.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    conn.write_all(&n.to_le_bytes())?;
    conn.write_all(body)
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v.min(u32::MAX as usize) as u32).to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u64).to_le_bytes());
}

/// Cursor over a body, every read checked.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<usize, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64_bits(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.u32()?;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| "a str that is not UTF-8".to_string())
    }
    fn opt(&mut self) -> Result<Option<String>, String> {
        if self.0.get(..4) == Some(&NONE.to_le_bytes()[..]) {
            self.0 = &self.0[4..];
            return Ok(None);
        }
        self.str().map(Some)
    }
    fn u64(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64_bits()?).map_err(|_| "count out of range".into())
    }
}

/// The first byte of a request: the layout below. Both ends are the same build (forked by one
/// launcher); the byte makes a mismatch an error rather than a misreading.
const REQUEST_LAYOUT: u8 = 2;

/// An absent optional str.
const NONE: u32 = u32::MAX;

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s),
        None => out.extend_from_slice(&NONE.to_le_bytes()),
    }
}

/// A request: the layout byte, the sample count, then each sample's fields as they are held
/// (not as a msgpack map: slot 0 would decode the metadata into a tree only to encode it again,
/// about as much work per sample as storing it): counter type, volume, monotonic time, the
/// strs, the metadata's encoded bytes (checked, not decoded, by [`meter::Metadata::from_encoded`])
/// and the extra fields as msgpack.
pub fn encode_request(samples: &[Sample], out: &mut Vec<u8>) {
    out.push(REQUEST_LAYOUT);
    put_u32(out, samples.len());
    for s in samples {
        out.push(match s.counter_type {
            CounterType::Gauge => 0,
            CounterType::Delta => 1,
            CounterType::Cumulative => 2,
        });
        let (tag, bits) = match s.counter_volume {
            Volume::Int(i) => (0, i as u64),
            Volume::Float(f) => (1, f.to_bits()),
        };
        out.push(tag);
        out.extend_from_slice(&bits.to_le_bytes());
        match s.monotonic_time {
            Some(t) => {
                out.push(1);
                out.extend_from_slice(&t.to_bits().to_le_bytes());
            }
            None => out.push(0),
        }
        for f in [
            &s.source,
            &s.counter_name,
            &s.counter_unit,
            &s.resource_id,
            &s.timestamp,
            &s.message_id,
        ] {
            put_str(out, f);
        }
        for f in [
            &s.user_id,
            &s.project_id,
            &s.user_name,
            &s.project_name,
            &s.message_signature,
        ] {
            put_opt(out, f.as_deref());
        }
        let m = s.resource_metadata.as_bytes();
        put_u32(out, m.len());
        out.extend_from_slice(m);
        put_u32(out, s.extra.len());
        for (k, v) in &s.extra {
            put_str(out, k);
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            meter::encode_value(v, out);
            let n = (out.len() - at - 4) as u32;
            out[at..at + 4].copy_from_slice(&n.to_le_bytes());
        }
    }
}

pub fn decode_request(body: &[u8]) -> Result<Vec<Sample>, String> {
    let mut c = Cur(body);
    let layout = c.take(1)?[0];
    if layout != REQUEST_LAYOUT {
        return Err(format!(
            "request layout {layout}, expected {REQUEST_LAYOUT}"
        ));
    }
    let n = c.u32()?;
    // Every sample takes at least 40 bytes: a claim cannot outgrow the body.
    let mut samples = Vec::with_capacity(n.min(body.len() / 40));
    for i in 0..n {
        samples.push(decode_sample(&mut c).map_err(|e| format!("sample {i}: {e}"))?);
    }
    if !c.0.is_empty() {
        return Err("bytes after the last sample".into());
    }
    Ok(samples)
}

fn decode_sample(c: &mut Cur<'_>) -> Result<Sample, String> {
    let counter_type = match c.take(1)?[0] {
        0 => CounterType::Gauge,
        1 => CounterType::Delta,
        2 => CounterType::Cumulative,
        t => return Err(format!("counter type {t}")),
    };
    let tag = c.take(1)?[0];
    let bits = c.u64_bits()?;
    let counter_volume = match tag {
        0 => Volume::Int(bits as i64),
        1 => Volume::Float(f64::from_bits(bits)),
        t => return Err(format!("volume tag {t}")),
    };
    let monotonic_time = match c.take(1)?[0] {
        0 => None,
        1 => Some(f64::from_bits(c.u64_bits()?)),
        t => return Err(format!("monotonic time tag {t}")),
    };
    let mut strs: [String; 6] = Default::default();
    for s in &mut strs {
        *s = c.str()?;
    }
    let mut opts: [Option<String>; 5] = Default::default();
    for o in &mut opts {
        *o = c.opt()?;
    }
    let len = c.u32()?;
    let resource_metadata =
        meter::Metadata::from_encoded(c.take(len)?).map_err(|e| format!("metadata: {e}"))?;
    let n = c.u32()?;
    let limits = Limits {
        max_depth: MAX_DEPTH_CEILING,
        max_bytes: None,
    };
    let mut extra = Vec::with_capacity(n.min(c.0.len() / 8));
    for _ in 0..n {
        let k = c.str()?;
        let len = c.u32()?;
        let v = meter::decode_value_with(c.take(len)?, &limits)
            .map_err(|e| format!("field {k:?}: {e}"))?;
        extra.push((k, v));
    }
    let [source, counter_name, counter_unit, resource_id, timestamp, message_id] = strs;
    let [user_id, project_id, user_name, project_name, message_signature] = opts;
    Ok(Sample {
        source,
        counter_name,
        counter_type,
        counter_unit,
        counter_volume,
        user_id,
        project_id,
        user_name,
        project_name,
        resource_id,
        timestamp,
        resource_metadata,
        message_id,
        message_signature,
        monotonic_time,
        extra,
    })
}

pub fn encode_reply(r: &Result<RecordOutcome, StorageError>, out: &mut Vec<u8>) {
    match r {
        Ok(o) => {
            out.push(0);
            put_u64(out, o.stored);
            put_u64(out, o.expired);
            put_u32(out, o.duplicate_indices.len());
            for &i in &o.duplicate_indices {
                put_u32(out, i);
            }
            put_u32(out, o.rejected.len());
            for (i, why) in &o.rejected {
                put_u32(out, *i);
                put_str(out, why);
            }
        }
        Err(e) => {
            out.push(if e.is_transient() { 1 } else { 2 });
            put_str(out, &error_text(e));
        }
    }
}

/// The answer to a request that could not be read (status 3 and why): unlike a storage
/// error, it makes the sender write the batch itself ([`decode_reply`] answers `Err`).
pub fn encode_unreadable(why: &str, out: &mut Vec<u8>) {
    out.push(3);
    put_str(out, why);
}

/// An answer: the outcome, or the storage's error. `Err` when the answer cannot be read, or
/// says the request could not be.
pub fn decode_reply(body: &[u8]) -> Result<Result<RecordOutcome, StorageError>, String> {
    let mut c = Cur(body);
    let status = c.take(1)?[0];
    let r = match status {
        0 => {
            let stored = c.u64()?;
            let expired = c.u64()?;
            let n = c.u32()?;
            let mut duplicate_indices = Vec::with_capacity(n.min(body.len() / 4));
            for _ in 0..n {
                duplicate_indices.push(c.u32()?);
            }
            let n = c.u32()?;
            let mut rejected = Vec::with_capacity(n.min(body.len() / 8));
            for _ in 0..n {
                let i = c.u32()?;
                rejected.push((i, c.str()?));
            }
            Ok(RecordOutcome {
                stored,
                duplicates: duplicate_indices.len(),
                duplicate_indices,
                rejected,
                expired,
            })
        }
        1 => Err(StorageError::Unavailable(c.str()?)),
        2 => Err(StorageError::Database(c.str()?)),
        3 => return Err(format!("worker 0 could not read the batch: {}", c.str()?)),
        s => return Err(format!("unknown status {s}")),
    };
    if !c.0.is_empty() {
        return Err("bytes after the answer".into());
    }
    Ok(r)
}

/// The text an error crosses the socket with: its own for the kinds that carry one, so that
/// it reads the same on both sides.
fn error_text(e: &StorageError) -> String {
    match e {
        StorageError::Unavailable(s) | StorageError::Database(s) => s.clone(),
        e => e.to_string(),
    }
}

/// Whether `out` accounts for each of a batch's `n` samples exactly once (as the writer's
/// per-request attribution assumes): indices ascending and in the batch, none both a
/// duplicate and rejected, and the rest stored.
fn accounts_for(out: &RecordOutcome, n: usize) -> bool {
    fn ascending(v: impl Iterator<Item = usize>, n: usize) -> bool {
        let mut last = None;
        for i in v {
            if i >= n || last.is_some_and(|l| i <= l) {
                return false;
            }
            last = Some(i);
        }
        true
    }
    ascending(out.duplicate_indices.iter().copied(), n)
        && ascending(out.rejected.iter().map(|(i, _)| *i), n)
        && out.duplicates == out.duplicate_indices.len()
        && out.expired <= out.rejected.len()
        && out
            .duplicate_indices
            .iter()
            .all(|i| out.rejected.binary_search_by_key(i, |(r, _)| *r).is_err())
        && out.stored + out.duplicate_indices.len() + out.rejected.len() == n
}

/// A worker's storage when another worker (slot 0) writes its SQLite file: batches go over
/// the socket, everything else (queries, the probe) to the file directly.
pub struct RelayStorage {
    direct: Box<dyn Storage>,
    path: PathBuf,
    conn: Option<UnixStream>,
    /// No connection attempt before this (after a failure).
    retry_at: Option<Instant>,
    /// How long an answer may take: slot 0's own wait for the lock, and then some.
    timeout: Duration,
    /// Whether the last batch went through slot 0 (for one log line per change).
    relaying: Option<bool>,
    buf: Vec<u8>,
    /// Batches worker 0 stored for this worker (the worker's `batches_relayed`).
    relayed: Arc<AtomicU64>,
}

impl RelayStorage {
    pub fn new(
        direct: Box<dyn Storage>,
        path: PathBuf,
        busy_timeout: Duration,
        relayed: Arc<AtomicU64>,
    ) -> RelayStorage {
        RelayStorage {
            relayed,
            direct,
            path,
            conn: None,
            retry_at: None,
            timeout: busy_timeout * 2 + Duration::from_secs(5),
            relaying: None,
            buf: Vec::new(),
        }
    }

    fn connected(&mut self) -> Option<&mut UnixStream> {
        if self.conn.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return None;
            }
            match UnixStream::connect(&self.path).and_then(|c| {
                if !sibling(&c) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the socket is not served by a worker of this collector",
                    ));
                }
                c.set_read_timeout(Some(self.timeout))?;
                c.set_write_timeout(Some(self.timeout))?;
                Ok(c)
            }) {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    self.went_direct(&e.to_string());
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    fn went_direct(&mut self, why: &str) {
        self.conn = None;
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
        if self.relaying != Some(false) {
            log::info!(
                "sqlite: the file's writer (worker 0, {}) is not reachable ({why}): this \
                 worker writes to the file itself until it is",
                self.path.display()
            );
            self.relaying = Some(false);
        }
    }

    fn relay(&mut self, batch: &[Sample]) -> io::Result<Result<RecordOutcome, StorageError>> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        encode_request(batch, &mut buf);
        let result = (|| {
            let conn = self
                .connected()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "not connected"))?;
            write_frame(conn, &buf)?;
            if !read_frame(conn, &mut buf)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before answering",
                ));
            }
            decode_reply(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })();
        // A huge batch once does not pin its buffer.
        if buf.capacity() <= 1 << 24 {
            self.buf = buf;
        }
        result
    }
}

impl Storage for RelayStorage {
    fn record_metering_data(&mut self, batch: &[Sample]) -> Result<RecordOutcome, StorageError> {
        if batch.is_empty() {
            return self.direct.record_metering_data(batch);
        }
        let was_connected = self.conn.is_some();
        match self.relay(batch) {
            Ok(Ok(outcome)) if !accounts_for(&outcome, batch.len()) => {
                self.went_direct("an answer that does not account for the batch")
            }
            Ok(Ok(outcome)) => {
                self.relayed.fetch_add(1, Ordering::Relaxed);
                if self.relaying != Some(true) {
                    log::info!(
                        "sqlite: writing through the file's writer (worker 0, {})",
                        self.path.display()
                    );
                    self.relaying = Some(true);
                }
                return Ok(outcome);
            }
            // Slot 0 answered with its storage's error: the file fails for us too.
            Ok(Err(e)) => return Err(e),
            Err(e) if e.kind() == io::ErrorKind::NotConnected && !was_connected => {}
            Err(e) => self.went_direct(&e.to_string()),
        }
        self.direct.record_metering_data(batch)
    }

    fn get_samples(&mut self, filter: &SampleFilter) -> Result<Vec<StoredSample>, StorageError> {
        self.direct.get_samples(filter)
    }

    fn get_meters(&mut self, filter: &SampleFilter) -> Result<Vec<MeterInfo>, StorageError> {
        self.direct.get_meters(filter)
    }

    fn get_resources(&mut self, filter: &SampleFilter) -> Result<Vec<ResourceInfo>, StorageError> {
        self.direct.get_resources(filter)
    }

    fn get_meter_statistics(
        &mut self,
        filter: &SampleFilter,
        period: Option<u64>,
    ) -> Result<Vec<Statistics>, StorageError> {
        self.direct.get_meter_statistics(filter, period)
    }

    fn get_meter_statistics_from(
        &mut self,
        filter: &SampleFilter,
        period: Option<u64>,
    ) -> Result<(Vec<Statistics>, StatsSource), StorageError> {
        self.direct.get_meter_statistics_from(filter, period)
    }

    fn clear_expired_metering_data(&mut self, ttl_seconds: u64) -> Result<u64, StorageError> {
        self.direct.clear_expired_metering_data(ttl_seconds)
    }

    fn retention_step(&mut self) -> Result<bool, StorageError> {
        self.direct.retention_step()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error as it crosses the socket: its kind (transient or not) and its own text.
    fn clone_error(e: &StorageError) -> StorageError {
        if e.is_transient() {
            StorageError::Unavailable(error_text(e))
        } else {
            StorageError::Database(error_text(e))
        }
    }

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| {
                let mut m = meter::Value::Map(vec![(
                    meter::Value::Str("flavor".into()),
                    meter::Value::Str(format!("m1.{i}")),
                )]);
                if i % 3 == 0 {
                    m = meter::Value::Map(Vec::new());
                } else if i % 3 == 2 {
                    m = meter::Value::Map(vec![
                        (meter::Value::Str("é ✓".into()), meter::Value::Float(-0.0)),
                        (
                            meter::Value::Str("nested".into()),
                            meter::Value::Map(vec![(
                                meter::Value::Int(-40_000),
                                meter::Value::Array(vec![
                                    meter::Value::UInt(u64::MAX),
                                    meter::Value::Bin(vec![0xff, 0]),
                                    meter::Value::Nil,
                                ]),
                            )]),
                        ),
                    ]);
                }
                Sample {
                    source: "openstack".into(),
                    counter_name: "cpu".into(),
                    counter_type: [
                        meter::CounterType::Cumulative,
                        meter::CounterType::Gauge,
                        meter::CounterType::Delta,
                    ][i % 3],
                    counter_unit: "ns".into(),
                    counter_volume: if i % 2 == 0 {
                        meter::Volume::Int(i as i64 * 1000)
                    } else {
                        meter::Volume::Float(i as f64 / 3.0)
                    },
                    user_id: (i % 4 != 1).then(|| format!("u{i}")),
                    project_id: Some("p".into()),
                    user_name: (i % 2 == 1).then(|| "ünïcode".into()),
                    project_name: (i % 3 == 1).then(String::new),
                    resource_id: format!("r-{}", i % 7),
                    timestamp: format!("2026-12-01T10:{:02}:00.000000", i % 60),
                    resource_metadata: meter::Metadata::from_value(&m),
                    message_id: format!("id-{i}"),
                    message_signature: (i % 5 != 0).then(|| "ab".repeat(32)),
                    monotonic_time: (i % 6 == 0).then_some(1.5),
                    extra: if i % 4 == 2 {
                        vec![
                            ("zeta".into(), meter::Value::Int(-3)),
                            (
                                "ünïcode".into(),
                                meter::Value::Array(vec![meter::Value::Nil]),
                            ),
                        ]
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect()
    }

    #[test]
    fn only_an_sqlite_file_short_enough_gets_a_writer_socket() {
        let cfg =
            |url: &str| Config::parse(&format!("[database]\nconnection = \"{url}\"\n")).unwrap();
        assert_eq!(
            socket_path(&cfg("sqlite:////var/lib/collector/c.db")),
            Some(PathBuf::from("/var/lib/collector/c.db-writer.sock"))
        );
        assert_eq!(
            socket_path(&cfg("sqlite:///data/c.db")),
            Some(PathBuf::from("data/c.db-writer.sock"))
        );
        for url in [
            "sqlite://",
            "sqlite:///:memory:",
            "postgresql://h/db",
            "mysql://r@h/db",
        ] {
            assert_eq!(socket_path(&cfg(url)), None, "{url}");
        }
        let long = format!("sqlite:////{}/c.db", "d".repeat(90));
        assert_eq!(socket_path(&cfg(&long)), None, "past a Unix socket address");
        let file_only = Config::parse(
            "[collector]\ndispatchers = [\"file\"]\n[database]\nconnection = \"sqlite:////x.db\"\n",
        )
        .unwrap();
        assert_eq!(socket_path(&file_only), None, "no database dispatcher");
    }

    /// A request worker 0 cannot read is answered as such (the sender then writes the batch
    /// itself: `decode_reply` is `Err`, as for a broken connection), not as a storage error,
    /// and the connection goes on serving the next one.
    #[test]
    fn an_unreadable_request_is_answered_so_its_worker_writes_it_itself() {
        let (writer_tx, writer_rx) = mpsc::channel::<WriterMsg>();
        // Worker 0's writer: stores every relayed batch.
        let writer = std::thread::spawn(move || {
            for msg in writer_rx {
                if let WriterMsg::Relay(r) = msg {
                    let _ = r.reply.send(Ok(RecordOutcome {
                        stored: r.samples.len(),
                        ..Default::default()
                    }));
                }
            }
        });
        let (mut client, server) = UnixStream::pair().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let shared = Arc::new(Mutex::new(Some(writer_tx)));
        let serving = shared.clone();
        let server = std::thread::spawn(move || serve(server, &serving));
        let mut answer = Vec::new();
        for garbage in [&[9u8, 0, 0, 0, 0][..], &[REQUEST_LAYOUT, 1, 0, 0, 0, 7]] {
            write_frame(&mut client, garbage).unwrap();
            assert!(read_frame(&mut client, &mut answer).unwrap());
            let err = decode_reply(&answer).unwrap_err();
            assert!(err.contains("could not read the batch"), "{err}");
        }
        let mut req = Vec::new();
        encode_request(&samples(3), &mut req);
        write_frame(&mut client, &req).unwrap();
        assert!(read_frame(&mut client, &mut answer).unwrap());
        assert_eq!(decode_reply(&answer).unwrap().unwrap().stored, 3);
        drop(client);
        server.join().unwrap();
        shared.lock().unwrap().take();
        writer.join().unwrap();
    }

    /// The sending side: told its batch could not be read, a worker writes it to the file
    /// itself (and is not counted as relayed).
    #[test]
    fn a_worker_told_its_batch_was_unreadable_writes_it_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let db = format!("sqlite:///{}", dir.join("c.db").display());
        let direct = storage::open(&db, &storage::StorageOptions::default()).unwrap();
        let path = dir.join("c.db-writer.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // A worker 0 that cannot read anything.
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut out = Vec::new();
            while read_frame(&mut conn, &mut buf).unwrap() {
                out.clear();
                encode_unreadable("test", &mut out);
                write_frame(&mut conn, &out).unwrap();
            }
        });
        let relayed = Arc::new(AtomicU64::new(0));
        let mut st = RelayStorage::new(direct, path, Duration::from_secs(5), relayed.clone());
        let out = st.record_metering_data(&samples(3)).unwrap();
        assert_eq!(out.stored, 3);
        assert_eq!(relayed.load(Ordering::Relaxed), 0);
        let stored = st
            .get_samples(&SampleFilter {
                limit: Some(10),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(stored.len(), 3, "written to the file directly");
        drop(st);
        server.join().unwrap();
    }

    #[test]
    fn a_batch_crosses_the_socket_unchanged() {
        for n in [0, 1, 17] {
            let batch = samples(n);
            let mut body = Vec::new();
            encode_request(&batch, &mut body);
            assert_eq!(decode_request(&body).unwrap(), batch);
        }
    }

    #[test]
    fn outcomes_and_errors_cross_the_socket_unchanged() {
        let out = RecordOutcome {
            stored: 5,
            duplicates: 2,
            duplicate_indices: vec![1, 4],
            rejected: vec![
                (2, "bad timestamp".into()),
                (6, storage::EXPIRED_REASON.into()),
            ],
            expired: 1,
        };
        let mut body = Vec::new();
        encode_reply(&Ok(out.clone()), &mut body);
        assert_eq!(decode_reply(&body).unwrap().unwrap(), out);
        for (e, transient) in [
            (StorageError::Unavailable("database is locked".into()), true),
            (StorageError::Database("no such table".into()), false),
            (
                StorageError::SchemaTooNew {
                    found: 9,
                    supported: 6,
                },
                false,
            ),
        ] {
            body.clear();
            encode_reply(&Err(clone_error(&e)), &mut body);
            let back = decode_reply(&body).unwrap().unwrap_err();
            assert_eq!(back.is_transient(), transient);
            assert_eq!(
                back.to_string(),
                clone_error(&e).to_string(),
                "read the same"
            );
            assert!(!back.to_string().contains("database error: database error"));
        }
    }

    #[test]
    fn every_truncation_of_a_frame_is_an_error_not_a_panic() {
        let mut req = Vec::new();
        encode_request(&samples(3), &mut req);
        for cut in 0..req.len() {
            assert!(decode_request(&req[..cut]).is_err(), "request cut at {cut}");
        }
        let mut extra = req.clone();
        extra.push(0);
        assert!(decode_request(&extra).is_err());
        let mut rep = Vec::new();
        encode_reply(
            &Ok(RecordOutcome {
                stored: 1,
                duplicates: 1,
                duplicate_indices: vec![0],
                rejected: vec![(1, "why".into())],
                expired: 0,
            }),
            &mut rep,
        );
        for cut in 0..rep.len() {
            assert!(decode_reply(&rep[..cut]).is_err(), "answer cut at {cut}");
        }
        // A count claiming more samples than the body could hold allocates nothing large.
        assert!(decode_request(&[REQUEST_LAYOUT, 0xff, 0xff, 0xff, 0xff]).is_err());
        // Another layout, a field out of range, metadata not in the encoder's form: refused.
        assert!(decode_request(&[1, 0, 0, 0, 0]).is_err());
        let one = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut req = Vec::new();
            encode_request(&samples(1), &mut req);
            edit(&mut req);
            decode_request(&req)
        };
        assert!(one(&|_| ()).is_ok());
        assert!(one(&|r| r[5] = 3).unwrap_err().contains("counter type 3"));
        assert!(one(&|r| r[6] = 2).unwrap_err().contains("volume tag 2"));
        assert!(one(&|r| r[15] = 7)
            .unwrap_err()
            .contains("monotonic time tag 7"));
        // samples(1)'s metadata is the empty map, 0x80, just before the extra count.
        let at = |r: &Vec<u8>| r.len() - 5;
        assert!(one(&|r| {
            let i = at(r);
            r[i] = 0x90
        })
        .unwrap_err()
        .contains("metadata: not a map"));
        // A str that is not UTF-8 (the first byte of the source, after its monotonic time).
        assert!(one(&|r| r[28] = 0xff).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn only_a_process_of_the_same_parent_is_taken_for_a_worker() {
        // SAFETY: getpid and getppid have no preconditions.
        let (me, parent) = unsafe { (libc::getpid(), libc::getppid()) };
        assert_eq!(parent_of(me), Some(parent));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(sibling(&a), "this process has this process's parent");
        // A child of this process connecting: its parent is this process, not its parent.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket, sys, time\n\
                 s = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ntime.sleep(30)",
            ])
            .arg(&path)
            .spawn()
            .expect("python3");
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let conn = loop {
            match listener.accept() {
                Ok((c, _)) => break Some(c),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => break None,
            }
        };
        let refused = conn.as_ref().map(|c| !sibling(c));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            refused,
            Some(true),
            "a child of this process passed for a sibling"
        );
    }

    #[test]
    fn a_merged_outcome_splits_into_each_part_s_own() {
        // Parts 0..3 (own), 3..3 (empty), 3..7; duplicates at 1 and 4, rejected 2 and 6.
        let out = RecordOutcome {
            stored: 3,
            duplicates: 2,
            duplicate_indices: vec![1, 4],
            rejected: vec![(2, "bad".into()), (6, storage::EXPIRED_REASON.into())],
            expired: 1,
        };
        let parts = crate::dispatch::split_outcome(&out, &[0..3, 3..3, 3..7]);
        assert_eq!(parts[0].stored, 1);
        assert_eq!(parts[0].duplicate_indices, vec![1]);
        assert_eq!(parts[0].rejected, vec![(2, "bad".to_string())]);
        assert_eq!(parts[0].expired, 0);
        assert_eq!(parts[1], RecordOutcome::default());
        assert_eq!(parts[2].stored, 2);
        assert_eq!(parts[2].duplicate_indices, vec![1]);
        assert_eq!(
            parts[2].rejected,
            vec![(3, storage::EXPIRED_REASON.to_string())]
        );
        assert_eq!(parts[2].expired, 1);
        let stored: usize = parts.iter().map(|p| p.stored).sum();
        assert_eq!(stored, out.stored);
        assert!(accounts_for(&out, 7));
        for (p, r) in parts.iter().zip([3, 0, 4]) {
            assert!(accounts_for(p, r), "{p:?}");
        }
    }

    #[test]
    fn an_answer_that_miscounts_the_batch_is_not_taken() {
        let ok = RecordOutcome {
            stored: 2,
            duplicates: 1,
            duplicate_indices: vec![1],
            rejected: vec![(3, "bad".into())],
            expired: 0,
        };
        assert!(accounts_for(&ok, 4));
        assert!(!accounts_for(&ok, 5), "one sample unaccounted for");
        let mut twice = ok.clone();
        twice.duplicate_indices = vec![1, 1];
        twice.duplicates = 2;
        twice.stored = 1;
        assert!(!accounts_for(&twice, 4), "an index twice");
        let mut both = ok.clone();
        both.duplicate_indices = vec![3];
        assert!(!accounts_for(&both, 4), "duplicate and rejected at once");
        let mut outside = ok;
        outside.rejected = vec![(9, "bad".into())];
        assert!(!accounts_for(&outside, 4), "an index past the batch");
    }
}
