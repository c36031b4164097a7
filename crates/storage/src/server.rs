//! What the two server drivers ([`crate::postgres`], [`crate::mysql`]) share: parsing a
//! SQLAlchemy-style server URL, validating and de-duplicating a batch, the resource key, and
//! the connection state machine (reconnect with back-off, one log line per state change).
//!
//! Nothing here talks to a server; each driver owns its client library.

use crate::json::Json;
use crate::url::StorageUrl;
use crate::{RecordOutcome, StorageError};
use meter::{Sample, Value, Volume};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// The meter/resource id caches are the SQLite driver's, shared by every driver.
pub(crate) use crate::sqlite::cache;

/// `scheme://[user[:password]@][host][:port]/database[?k=v&...]`, percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub user: Option<String>,
    pub password: Option<String>,
    /// `None` when the URL has an empty host (`mysql:///db`): the driver's default.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub database: String,
    /// Query parameters in URL order; each driver takes the ones it knows.
    pub params: Vec<(String, String)>,
}

impl ServerUrl {
    pub fn parse(url: &StorageUrl<'_>) -> Result<ServerUrl, StorageError> {
        let (main, query) = match url.rest.split_once('?') {
            Some((m, q)) => (m, Some(q)),
            None => (url.rest, None),
        };
        let (authority, path) = match main.find('/') {
            Some(i) => (&main[..i], &main[i + 1..]),
            None => (main, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(ui) => {
                let (u, p) = match ui.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (ui, None),
                };
                let u = decode(u).map_err(|e| url.error(format!("user name: {e}")))?;
                let p = p
                    .map(decode)
                    .transpose()
                    .map_err(|e| url.error(format!("password: {e}")))?;
                ((!u.is_empty()).then_some(u), p)
            }
        };
        let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
            // [IPv6]:port
            let (h, tail) = rest
                .split_once(']')
                .ok_or_else(|| url.error("unclosed '[' in the host"))?;
            let port = match tail {
                "" => None,
                t => Some(
                    t.strip_prefix(':')
                        .ok_or_else(|| url.error("junk after ']'"))?,
                ),
            };
            (Some(h.to_string()), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (Some(h.to_string()), Some(p)),
                None => (Some(hostport.to_string()), None),
            }
        };
        let host = host
            .map(|h| decode(&h))
            .transpose()
            .map_err(|e| url.error(format!("host: {e}")))?
            .filter(|h| !h.is_empty());
        let port = match port {
            None | Some("") => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                url.error(format!("port {p:?} is not a number between 1 and 65535"))
            })?),
        };
        let database = decode(path).map_err(|e| url.error(format!("database name: {e}")))?;
        if database.is_empty() {
            return Err(url.error("the URL names no database (…://user:pw@host/DATABASE)"));
        }
        if database.contains('/') {
            return Err(url.error("the database name may not contain '/'"));
        }
        let mut params = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // As in a form (and SQLAlchemy's parse_qsl): '+' is a space.
            let k = decode(&k.replace('+', " "))
                .map_err(|e| url.error(format!("query parameter: {e}")))?;
            let v = decode(&v.replace('+', " "))
                .map_err(|e| url.error(format!("query parameter {k}: {e}")))?;
            params.push((k, v));
        }
        Ok(ServerUrl {
            user,
            password,
            host,
            port,
            database,
            params,
        })
    }
}

/// Percent-decoding (`%2F` → `/`); the result must be UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// A whole number of seconds from a URL parameter (`connect_timeout=10`).
pub fn seconds_param(name: &'static str, value: &str) -> Result<Duration, StorageError> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| StorageError::InvalidOption {
            name,
            value: value.to_string(),
            reason: "expected a whole number of seconds".to_string(),
        })
}

/// A boolean URL parameter (`1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`).
pub fn bool_param(name: &'static str, value: &str) -> Result<bool, StorageError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(StorageError::InvalidOption {
            name,
            value: value.to_string(),
            reason: "expected true or false".to_string(),
        }),
    }
}

/// Log a query parameter this driver has no use for (a ceilometer URL often carries
/// `charset=utf8` or similar for its Python driver).
pub fn ignore_param(driver: &str, key: &str, value: &str) {
    log::info!(
        "{driver}: ignoring connection URL parameter {key}={:?}: not used by this driver",
        crate::url::shown_param(key, value)
    );
}

/// The sample's UTC timestamp, or why it cannot be stored (same rules as the SQLite driver).
pub fn validate(s: &Sample) -> Result<OffsetDateTime, String> {
    let ts = match fast_timestamp(&s.timestamp) {
        Some(ts) => ts,
        None => meter::parse_timestamp(&s.timestamp).map_err(|e| e.to_string())?,
    };
    if let Volume::Float(f) = s.counter_volume {
        if !f.is_finite() {
            return Err(format!("non-finite counter_volume {f}"));
        }
    }
    if s.message_id.is_empty() {
        return Err("empty message_id".to_string());
    }
    Ok(ts)
}

/// The forms publishers actually send — `YYYY-MM-DDTHH:MM:SS[.ffffff][Z|±HH:MM]`, `T` or a
/// space — parsed by hand; `None` for anything else, which [`meter::parse_timestamp`] then
/// parses (or refuses) with the same result. The general ISO 8601 parser was an eighth of a
/// server driver's batch time.
fn fast_timestamp(text: &str) -> Option<OffsetDateTime> {
    use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};
    let b = text.as_bytes();
    let digits = |from: usize, to: usize| -> Option<u32> {
        let part = b.get(from..to)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = Date::from_calendar_date(
        digits(0, 4)? as i32,
        Month::try_from(digits(5, 7)? as u8).ok()?,
        digits(8, 10)? as u8,
    )
    .ok()?;
    let mut i = 19;
    let mut micro = 0;
    if b.get(i) == Some(&b'.') {
        let end = (i + 1..b.len())
            .find(|&j| !b[j].is_ascii_digit())
            .unwrap_or(b.len());
        let n = end - i - 1;
        if !(1..=6).contains(&n) {
            return None;
        }
        micro = digits(i + 1, end)? * 10u32.pow((6 - n) as u32);
        i = end;
    }
    let time = Time::from_hms_micro(
        digits(11, 13)? as u8,
        digits(14, 16)? as u8,
        digits(17, 19)? as u8,
        micro,
    )
    .ok()?;
    let offset = match &b[i..] {
        b"" | b"Z" => UtcOffset::UTC,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (digits(i + 1, i + 3)? as i8, digits(i + 4, i + 6)? as i8);
            let k = if *sign == b'-' { -1 } else { 1 };
            UtcOffset::from_hms(k * h, k * m, 0).ok()?
        }
        _ => return None,
    };
    Some(
        PrimitiveDateTime::new(date, time)
            .assume_offset(offset)
            .to_offset(UtcOffset::UTC),
    )
}

/// A sample of the batch that will be written: first occurrence of its message_id.
pub struct Valid<'a> {
    pub index: usize,
    pub timestamp: OffsetDateTime,
    pub sample: &'a Sample,
}

/// Validate a batch: rejected samples and repeats of a message_id already seen earlier in the
/// batch go into `outcome`; the rest is returned in batch order. With `ttl_seconds`, a sample
/// already older than now − TTL is rejected with [`crate::EXPIRED_REASON`] and counted in
/// `outcome.expired`. `extra` adds driver-specific checks (lengths a column can hold,
/// characters a server refuses).
pub fn prepare<'a>(
    batch: &'a [Sample],
    outcome: &mut RecordOutcome,
    ttl_seconds: Option<u64>,
    extra: impl Fn(&Sample, OffsetDateTime) -> Result<(), String>,
) -> Vec<Valid<'a>> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    let too_old = ttl_seconds.and_then(|ttl| {
        OffsetDateTime::now_utc().checked_sub(time::Duration::seconds(
            i64::try_from(ttl).unwrap_or(i64::MAX / 2),
        ))
    });
    for (index, sample) in batch.iter().enumerate() {
        match validate(sample).and_then(|ts| extra(sample, ts).map(|()| ts)) {
            Ok(ts) if too_old.is_some_and(|cutoff| ts < cutoff) => {
                outcome
                    .rejected
                    .push((index, crate::EXPIRED_REASON.to_string()));
                outcome.expired += 1;
            }
            Err(reason) => outcome.rejected.push((index, reason)),
            Ok(_) if !seen.insert(sample.message_id.as_str()) => {
                outcome.duplicate_indices.push(index)
            }
            Ok(timestamp) => rows.push(Valid {
                index,
                timestamp,
                sample,
            }),
        }
    }
    rows
}

/// Canonical metadata JSON (sorted keys, duplicates resolved) into `buf`.
pub fn canonical_json<'b>(metadata: &Value, buf: &'b mut Vec<u8>) -> Result<&'b str, String> {
    buf.clear();
    serde_json::to_writer(&mut *buf, &Json::canonical(metadata)).map_err(|e| e.to_string())?;
    std::str::from_utf8(buf).map_err(|e| e.to_string())
}

/// What makes a resource row unique: hex SHA-256 of resource id, user, project, source and the
/// canonical metadata, each length-prefixed (NULL distinct from ""). One fixed-size column is
/// portable where a composite UNIQUE is not: PostgreSQL before 15 and MySQL treat NULLs as
/// distinct, and MySQL cannot index long text columns whole.
pub fn resource_key(s: &Sample, canonical_metadata: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        Some(s.resource_id.as_str()),
        s.user_id.as_deref(),
        s.project_id.as_deref(),
        Some(s.source.as_str()),
        Some(canonical_metadata),
    ] {
        match part {
            Some(p) => {
                ctx.update(b"+");
                ctx.update(&(p.len() as u64).to_le_bytes());
                ctx.update(p.as_bytes());
            }
            None => ctx.update(b"-"),
        }
    }
    let mut out = String::with_capacity(64);
    for b in ctx.finish().as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What a metadata filter's text matches, besides a string equal to it: the number it parses
/// as, or 1/0 for `true`/`false` (booleans are stored as 0/1 by the SQLite driver, so "true"
/// also matches the number 1 and "1" matches `true`; the server drivers follow it).
#[derive(Debug, Clone, PartialEq)]
pub struct MetaValue {
    pub text: String,
    /// An integer it parses as, exactly.
    pub int: Option<i64>,
    /// The number it stands for (also set for integers and booleans).
    pub number: Option<f64>,
}

pub fn metadata_value(text: &str) -> MetaValue {
    let t = text.trim();
    let int = t.parse::<i64>().ok();
    let number = match int {
        Some(i) => Some(i as f64),
        None => match t.parse::<f64>() {
            Ok(f) if f.is_finite() => Some(f),
            _ if t.eq_ignore_ascii_case("true") => Some(1.0),
            _ if t.eq_ignore_ascii_case("false") => Some(0.0),
            _ => None,
        },
    };
    MetaValue {
        text: text.to_string(),
        int,
        number,
    }
}

/// A flattened metadata path (`flavor.name`, `tags[0]`, `a[1][2]`) as the key/index steps it
/// may stand for. A dot may separate two keys or belong to a key (`{"a.b": 1}` flattens to
/// `a.b` too), so every reading is returned, the all-separators one first (at most 16; past
/// four dots only that one).
pub fn metadata_paths(path: &str) -> Vec<Vec<PathStep>> {
    let parts: Vec<&str> = path.split('.').collect();
    let dots = parts.len() - 1;
    let readings: u32 = if dots <= 4 { 1 << dots } else { 1 };
    let mut out = Vec::new();
    for mask in 0..readings {
        // Bit i set: dot i belongs to a key.
        let mut keys: Vec<String> = vec![parts[0].to_string()];
        for (i, p) in parts.iter().enumerate().skip(1) {
            if mask & (1 << (i - 1)) != 0 {
                let last = keys.len() - 1;
                keys[last].push('.');
                keys[last].push_str(p);
            } else {
                keys.push(p.to_string());
            }
        }
        let mut steps = Vec::new();
        for k in keys {
            let (name, indexes) = split_indexes(&k);
            if !name.is_empty() {
                steps.push(PathStep::Key(name.to_string()));
            }
            steps.extend(indexes.into_iter().map(PathStep::Index));
        }
        if !steps.is_empty() {
            out.push(steps);
        }
    }
    out
}

/// One step of a metadata path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// `tags[0][1]` → (`tags`, [0, 1]); brackets that are not a trailing index stay in the key.
fn split_indexes(k: &str) -> (&str, Vec<usize>) {
    let mut name = k;
    let mut indexes = Vec::new();
    while let Some(open) = name.strip_suffix(']').and_then(|n| n.rfind('[')) {
        match name[open + 1..name.len() - 1].parse::<usize>() {
            Ok(i) => {
                indexes.push(i);
                name = &name[..open];
            }
            Err(_) => break,
        }
    }
    indexes.reverse();
    (name, indexes)
}

/// At most one connection attempt per this interval while the server is unreachable.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// One connection that may be down: reconnects on demand, at most once per
/// [`RETRY_INTERVAL`], and logs only when the state changes (lost, back).
pub struct Link<C> {
    conn: Option<C>,
    /// Who we talk to, for messages: `postgresql://user@host:port/db` (no password).
    pub what: String,
    last_attempt: Option<Instant>,
    /// The last connection error while down.
    last_error: Option<String>,
    down: bool,
}

impl<C> Link<C> {
    pub fn new(what: String) -> Self {
        Link {
            conn: None,
            what,
            last_attempt: None,
            last_error: None,
            down: false,
        }
    }

    /// Whether a connection is open now (it may still turn out to be dead).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The open connection, or a new one from `connect` unless the last attempt failed less
    /// than [`RETRY_INTERVAL`] ago. A failed attempt is `Unavailable` when transient,
    /// otherwise the connector's own error (bad credentials, a newer schema).
    pub fn get(
        &mut self,
        connect: impl FnOnce() -> Result<C, StorageError>,
    ) -> Result<&mut C, StorageError> {
        if self.conn.is_none() {
            if let (Some(at), Some(err)) = (self.last_attempt, &self.last_error) {
                let wait = RETRY_INTERVAL.saturating_sub(at.elapsed());
                if !wait.is_zero() {
                    return Err(StorageError::Unavailable(format!(
                        "{}: not connected ({err}); next attempt in {} ms",
                        self.what,
                        wait.as_millis()
                    )));
                }
            }
            self.last_attempt = Some(Instant::now());
            match connect() {
                Ok(c) => {
                    if self.down {
                        log::warn!("{}: connected again", self.what);
                    }
                    self.down = false;
                    self.last_error = None;
                    self.conn = Some(c);
                }
                Err(e) => {
                    if !self.down {
                        log::warn!(
                            "{}: cannot connect: {e} (retrying at most once per {} s)",
                            self.what,
                            RETRY_INTERVAL.as_secs()
                        );
                    }
                    self.down = true;
                    self.last_error = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StorageError::Database("connection vanished".into()))
    }

    /// The connection is dead: drop it; the next [`get`](Self::get) reconnects at once.
    pub fn lost(&mut self, err: &StorageError) {
        if self.conn.take().is_some() {
            log::warn!("{}: connection lost: {err}", self.what);
        }
        self.down = true;
        self.last_attempt = None;
        self.last_error = None;
    }

    /// Start disconnected after a failed first attempt (the server was down at open).
    pub fn start_down(&mut self, err: &StorageError) {
        log::warn!(
            "{}: cannot connect at start-up: {err}; starting disconnected, retrying at most once per {} s",
            self.what,
            RETRY_INTERVAL.as_secs()
        );
        self.down = true;
        self.last_attempt = Some(Instant::now());
        self.last_error = Some(err.to_string());
    }

    /// Close the connection (tests, shutdown).
    pub fn close(&mut self) {
        self.conn = None;
    }
}

/// How many times a batch is retried inside one call after a deadlock or serialization
/// failure (another writer inserting the same message_ids at once); nothing was stored by
/// the failed attempt, so retrying is safe.
pub const CONFLICT_RETRIES: usize = 3;

/// Wall-clock time of the phases of a maintenance call (expiry), logged at debug level in
/// one line, so an operator (or the bench, with `RUST_LOG=storage=debug`) sees where the time
/// went without a profiler.
pub struct Laps {
    what: &'static str,
    started: Instant,
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    pub fn start(what: &'static str) -> Self {
        let now = Instant::now();
        Laps {
            what,
            started: now,
            last: now,
            laps: Vec::new(),
        }
    }

    /// The phase `name` ended now.
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }

    /// Log the phases (debug level).
    pub fn log(&self) {
        if log::log_enabled!(log::Level::Debug) {
            let mut line = String::new();
            for (name, d) in &self.laps {
                let _ = write!(line, ", {name} {:.1}", d.as_secs_f64() * 1e3);
            }
            log::debug!(
                "{}: {:.1} ms{line} (ms)",
                self.what,
                self.started.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}

/// What one step of a [`Reaper`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapStep {
    /// It dropped something and more is waiting.
    More,
    /// Nothing is waiting any more.
    Done,
    /// A grave is waiting but its lock is held (an expiry is burying): left for the next
    /// nudge.
    Busy,
}

/// Drops graves (expired partitions' tables) on a thread and connection of its own, so that
/// deleting a day's files (150-300 ms at 4 M rows) never holds the handle's writer. The thread
/// starts at the first [`nudge`](Reaper::nudge) or [`wake`](Reaper::wake), drops every grave it
/// finds, then waits. Expiry only marks graves [`pending`](Reaper::pending): the handle nudges
/// after its next batch, and the daemon's writer wakes it when idle (`retention_step`), so an
/// expiry call itself never waits for a file to be deleted. Dropping the reaper waits for the
/// step in progress.
pub struct Reaper {
    what: String,
    pending: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Until the thread starts, at the first wake.
    step: Option<Box<dyn FnMut() -> Result<ReapStep, String> + Send>>,
    thread: Option<crate::background::Nudged>,
}

impl Reaper {
    /// A reaper for `what` (the handle's printable name) that takes `step` to drop one part of
    /// a grave; `step` connects on its own. Graves count as pending until
    /// [`set_pending`](Reaper::set_pending) says otherwise (a restart resumes what an earlier
    /// process left).
    pub fn new(
        what: &str,
        step: impl FnMut() -> Result<ReapStep, String> + Send + 'static,
    ) -> Reaper {
        Reaper {
            what: what.to_string(),
            pending: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            step: Some(Box::new(step)),
            thread: None,
        }
    }

    /// Whether graves may be waiting (see [`set_pending`](Reaper::set_pending); cleared when a
    /// step finds none).
    pub fn pending(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether graves may be waiting, as the handle found at connect or an expiry made them.
    pub fn set_pending(&self, pending: bool) {
        self.pending
            .store(pending, std::sync::atomic::Ordering::Release);
    }

    /// After a batch: [`wake`](Reaper::wake) the thread if graves may be waiting.
    pub fn nudge(&mut self) {
        if self.pending() {
            self.wake();
        }
    }

    /// Have the thread look for graves and drop them; returns at once (a wake while it works
    /// is kept for after).
    pub fn wake(&mut self) {
        if self.thread.is_none() {
            let Some(mut step) = self.step.take() else {
                return;
            };
            let (pending, what) = (self.pending.clone(), self.what.clone());
            match crate::background::Nudged::spawn("reaper", move || {
                reap_all(&what, &pending, &mut *step)
            }) {
                Ok(t) => self.thread = Some(t),
                Err(e) => {
                    log::warn!("{}: cannot start the grave reaper: {e}", self.what);
                    return;
                }
            }
        }
        if let Some(t) = &self.thread {
            t.nudge();
        }
    }
}

/// Steps until no grave is left (then nothing is pending), a grave's lock is held or a step
/// fails (both left for the next wake).
fn reap_all(
    what: &str,
    pending: &std::sync::atomic::AtomicBool,
    step: &mut dyn FnMut() -> Result<ReapStep, String>,
) {
    loop {
        match step() {
            Ok(ReapStep::More) => {}
            Ok(ReapStep::Done) => {
                // Should a burial have slipped in since the step looked, the next expiry
                // pass marks graves pending again, and the batch after it nudges.
                pending.store(false, std::sync::atomic::Ordering::Release);
                return;
            }
            // Pending still: the next batch (or pass, or idle step) nudges again.
            Ok(ReapStep::Busy) => return,
            Err(e) => {
                log::warn!("{what}: reaper: {e} (tried again at the next wake)");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<ServerUrl, StorageError> {
        ServerUrl::parse(&StorageUrl::parse(url)?)
    }

    #[test]
    fn parses_sqlalchemy_urls() {
        let u = parse("mysql+pymysql://ceilo:s%40cret:x@db.example:3307/ceilometer?charset=utf8")
            .unwrap();
        assert_eq!(u.user.as_deref(), Some("ceilo"));
        assert_eq!(u.password.as_deref(), Some("s@cret:x"));
        assert_eq!(u.host.as_deref(), Some("db.example"));
        assert_eq!(u.port, Some(3307));
        assert_eq!(u.database, "ceilometer");
        assert_eq!(u.params, vec![("charset".into(), "utf8".into())]);

        let u = parse("postgresql://[::1]:5433/c").unwrap();
        assert_eq!((u.host.as_deref(), u.port), (Some("::1"), Some(5433)));
        assert_eq!(u.user, None);
        let u = parse("postgresql:///c?host=/run/postgresql").unwrap();
        assert_eq!(u.host, None);
        assert_eq!(u.params[0].1, "/run/postgresql");
        let u = parse("postgresql://u@h/c").unwrap();
        assert_eq!((u.user.as_deref(), u.password), (Some("u"), None));
    }

    #[test]
    fn rejects_bad_urls_without_showing_the_password() {
        for bad in [
            "postgresql://u:secret@h:99999/c",
            "postgresql://u:secret@h:x/c",
            "postgresql://u:secret@h",
            "postgresql://u:secret@h/",
            "postgresql://u:secret@h/a/b",
            "postgresql://u:secret@h/c%zz",
            "postgresql://u:secret@[::1/c",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, StorageError::BadUrl { .. }), "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn params_are_checked() {
        assert_eq!(
            seconds_param("connect_timeout", "7").unwrap(),
            Duration::from_secs(7)
        );
        assert!(matches!(
            seconds_param("connect_timeout", "soon"),
            Err(StorageError::InvalidOption { .. })
        ));
        assert!(bool_param("x", "Yes").unwrap());
        assert!(bool_param("x", "maybe").is_err());
    }

    #[test]
    fn resource_key_tells_null_from_empty() {
        let mut a = Sample {
            source: "s".into(),
            counter_name: "c".into(),
            counter_type: meter::CounterType::Gauge,
            counter_unit: "u".into(),
            counter_volume: Volume::Int(1),
            user_id: None,
            project_id: None,
            user_name: None,
            project_name: None,
            resource_id: "r".into(),
            timestamp: String::new(),
            resource_metadata: Default::default(),
            message_id: "m".into(),
            message_signature: None,
            monotonic_time: None,
            extra: Vec::new(),
        };
        let k1 = resource_key(&a, "{}");
        a.user_id = Some(String::new());
        let k2 = resource_key(&a, "{}");
        assert_ne!(k1, k2);
        assert_eq!(k1.len(), 64);
        assert_ne!(resource_key(&a, "{}"), resource_key(&a, "{\"a\":1}"));
    }

    #[test]
    fn fast_timestamps_agree_with_the_general_parser() {
        for t in [
            "2026-11-01T12:00:00.000000+02:00",
            "2026-11-01T12:00:00",
            "2026-11-01 12:00:00.5",
            "2026-11-01T23:59:59.123456Z",
            "2026-11-01T00:00:00-05:30",
            "0000-01-01T00:00:00",
            "2024-02-29T00:00:00",
        ] {
            let fast = fast_timestamp(t).unwrap_or_else(|| panic!("{t}: not fast"));
            assert_eq!(Some(fast), meter::parse_timestamp(t).ok(), "{t}");
        }
        // Everything else goes to the general parser (which may accept it or not).
        for t in [
            "2026-02-30T00:00:00",
            "2026-11-01T24:00:00",
            "2026-11-01T12:00:60",
            " 2026-11-01T12:00:00",
            "2026-11-01T12:00:00.1234567",
            "2026-11-01T12:00:00.",
            "2026-11-01T12:00:00+0200",
            "2026-11-01T12:00:00+02",
            "2026-11-01t12:00:00",
            "2026-1-01T12:00:00",
            "2026-11-01T12:00:00+2a:00",
            "yesterday",
        ] {
            assert_eq!(fast_timestamp(t), None, "{t}");
        }
    }

    #[test]
    fn metadata_filters_parse() {
        let v = metadata_value("2");
        assert_eq!((v.int, v.number), (Some(2), Some(2.0)));
        assert_eq!(metadata_value("True").number, Some(1.0));
        assert_eq!(metadata_value("2.5").int, None);
        assert_eq!(metadata_value("nan").number, None);
        assert_eq!(metadata_value("m1.tiny").number, None);
        use PathStep::{Index as I, Key as K};
        let k = |s: &str| K(s.to_string());
        assert_eq!(metadata_paths("tags[0]"), vec![vec![k("tags"), I(0)]]);
        assert_eq!(
            metadata_paths("flavor.name"),
            vec![vec![k("flavor"), k("name")], vec![k("flavor.name")]]
        );
        assert_eq!(metadata_paths("a[1][2].b").len(), 2);
        assert_eq!(
            metadata_paths("a[1][2].b")[0],
            vec![k("a"), I(1), I(2), k("b")]
        );
        assert_eq!(metadata_paths("a.b.c.d.e.f").len(), 1);
    }

    #[test]
    fn link_backs_off_after_a_failed_attempt() {
        let mut link: Link<u32> = Link::new("test".into());
        let mut calls = 0;
        let down = || StorageError::Unavailable("refused".into());
        assert!(link
            .get(|| {
                calls += 1;
                Err(down())
            })
            .is_err());
        // Within the interval: no attempt, Unavailable.
        let e = link
            .get(|| {
                calls += 1;
                Ok(1)
            })
            .unwrap_err();
        assert!(
            e.is_transient() && e.to_string().contains("next attempt"),
            "{e}"
        );
        assert_eq!(calls, 1);
        std::thread::sleep(RETRY_INTERVAL);
        assert_eq!(*link.get(|| Ok(2)).unwrap(), 2);
        // Lost: the next call reconnects at once.
        link.lost(&down());
        assert!(!link.is_connected());
        assert_eq!(*link.get(|| Ok(3)).unwrap(), 3);
    }
}
