//! The bytes on a parent–child link.
//!
//! Every message is one frame: a 4-byte big-endian length `L`, then `L` bytes of body. The
//! body's first byte is a tag naming the message, the rest is its payload (opaque to this
//! crate). Reports (child → parent) and commands (parent → child) use disjoint tag ranges so
//! that a link wired backwards fails loudly instead of being misread.

use std::fmt;

/// Largest frame body accepted on a link. A peer announcing more is broken: the link is
/// dropped rather than allocating what it claims.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

const HEADER: usize = 4;

const TAG_READY: u8 = 0x01;
const TAG_HEARTBEAT: u8 = 0x02;
const TAG_REPLY: u8 = 0x03;
const TAG_STOP: u8 = 0x81;
const TAG_REOPEN_LOGS: u8 = 0x82;
const TAG_CUSTOM: u8 = 0x83;

/// A message a worker sends up its link to the launcher.
#[derive(Clone, PartialEq, Eq)]
pub enum Report {
    /// The worker serves: booting is over, heartbeat timeouts apply from now on.
    Ready,
    /// The worker is alive. The payload (typically the worker's counters as JSON) is kept by
    /// the launcher as the worker's latest heartbeat and shown by [`crate::WorkerInfo`].
    Heartbeat(Vec<u8>),
    /// An answer to a [`Command::Custom`]; handed to the caller's
    /// [`crate::Hooks::on_event`] as [`crate::SupervisorEvent::Reply`].
    Reply(Vec<u8>),
}

/// A message the launcher sends down a link to a worker.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// Graceful stop: stop taking new work, flush what is held, return from
    /// [`crate::Worker::run`].
    Stop,
    /// The launcher got SIGUSR1: reopen log files (logrotate moved them).
    ReopenLogs,
    /// The caller's own message (set the log level, an introspection request...). The worker
    /// may answer with [`Report::Reply`].
    Custom(Vec<u8>),
}

// Payloads can be large JSON blobs: print their size, not their bytes.
impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::Ready => f.write_str("Ready"),
            Report::Heartbeat(p) => write!(f, "Heartbeat({} bytes)", p.len()),
            Report::Reply(p) => write!(f, "Reply({} bytes)", p.len()),
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Stop => f.write_str("Stop"),
            Command::ReopenLogs => f.write_str("ReopenLogs"),
            Command::Custom(p) => write!(f, "Custom({} bytes)", p.len()),
        }
    }
}

/// Why a link's byte stream cannot be decoded. The link is unusable afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// A frame with no tag byte.
    #[error("empty frame")]
    Empty,
    /// A tag this side does not expect (unknown, or a message for the other direction).
    #[error("unexpected message tag 0x{0:02x}")]
    UnknownTag(u8),
}

/// Appends the frame for `tag` + `payload` to `out`.
fn encode(tag: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len() + 1).expect("frame larger than 4 GiB");
    out.reserve(HEADER + payload.len() + 1);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(tag);
    out.extend_from_slice(payload);
}

impl Report {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Report::Ready => encode(TAG_READY, &[], out),
            Report::Heartbeat(p) => encode(TAG_HEARTBEAT, p, out),
            Report::Reply(p) => encode(TAG_REPLY, p, out),
        }
    }

    pub(crate) fn decode(tag: u8, payload: Vec<u8>) -> Result<Self, FrameError> {
        match tag {
            TAG_READY => Ok(Report::Ready),
            TAG_HEARTBEAT => Ok(Report::Heartbeat(payload)),
            TAG_REPLY => Ok(Report::Reply(payload)),
            other => Err(FrameError::UnknownTag(other)),
        }
    }
}

impl Command {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Command::Stop => encode(TAG_STOP, &[], out),
            Command::ReopenLogs => encode(TAG_REOPEN_LOGS, &[], out),
            Command::Custom(p) => encode(TAG_CUSTOM, p, out),
        }
    }

    pub(crate) fn decode(tag: u8, payload: Vec<u8>) -> Result<Self, FrameError> {
        match tag {
            TAG_STOP => Ok(Command::Stop),
            TAG_REOPEN_LOGS => Ok(Command::ReopenLogs),
            TAG_CUSTOM => Ok(Command::Custom(payload)),
            other => Err(FrameError::UnknownTag(other)),
        }
    }
}

/// Accumulates bytes read from a stream and cuts them into frames.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset are consumed.
    start: usize,
}

impl FrameReader {
    /// Appends bytes just read from the stream.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// True when a partial frame is buffered (EOF now would truncate a message).
    pub(crate) fn has_partial(&self) -> bool {
        self.start < self.buf.len()
    }

    /// The next complete frame as `(tag, payload)`, `Ok(None)` when more bytes are needed.
    pub(crate) fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        // Check the claimed length before waiting for (and buffering) that many bytes.
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if avail.len() < HEADER + len {
            return Ok(None);
        }
        let tag = avail[HEADER];
        let payload = avail[HEADER + 1..HEADER + len].to_vec();
        self.start += HEADER + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            // Keep the buffer from growing without bound under a steady stream.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some((tag, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_reports() -> Vec<Report> {
        vec![
            Report::Ready,
            Report::Heartbeat(br#"{"received":12}"#.to_vec()),
            Report::Heartbeat(Vec::new()),
            Report::Reply(vec![0u8; 300]),
        ]
    }

    fn decode_reports(reader: &mut FrameReader) -> Vec<Report> {
        let mut out = Vec::new();
        while let Some((tag, payload)) = reader.next_frame().unwrap() {
            out.push(Report::decode(tag, payload).unwrap());
        }
        out
    }

    #[test]
    fn reports_round_trip_at_every_split_point() {
        let reports = all_reports();
        let mut wire = Vec::new();
        for r in &reports {
            r.encode(&mut wire);
        }
        for split in 0..=wire.len() {
            let mut reader = FrameReader::default();
            reader.extend(&wire[..split]);
            let mut got = decode_reports(&mut reader);
            reader.extend(&wire[split..]);
            got.extend(decode_reports(&mut reader));
            assert_eq!(got, reports, "split at {split}");
            assert!(!reader.has_partial());
        }
    }

    #[test]
    fn byte_by_byte_commands() {
        let commands = vec![
            Command::Stop,
            Command::ReopenLogs,
            Command::Custom(b"loglevel debug".to_vec()),
        ];
        let mut wire = Vec::new();
        for c in &commands {
            c.encode(&mut wire);
        }
        let mut reader = FrameReader::default();
        let mut got = Vec::new();
        for b in wire {
            reader.extend(&[b]);
            while let Some((tag, payload)) = reader.next_frame().unwrap() {
                got.push(Command::decode(tag, payload).unwrap());
            }
        }
        assert_eq!(got, commands);
    }

    #[test]
    fn oversized_frame_is_rejected_from_its_header() {
        let mut reader = FrameReader::default();
        reader.extend(&((MAX_FRAME_BYTES + 1) as u32).to_be_bytes());
        assert_eq!(
            reader.next_frame(),
            Err(FrameError::TooLarge(MAX_FRAME_BYTES + 1))
        );
    }

    #[test]
    fn empty_frame_and_wrong_direction_are_errors() {
        let mut reader = FrameReader::default();
        reader.extend(&0u32.to_be_bytes());
        assert_eq!(reader.next_frame(), Err(FrameError::Empty));

        let mut wire = Vec::new();
        Command::Stop.encode(&mut wire);
        let mut reader = FrameReader::default();
        reader.extend(&wire);
        let (tag, payload) = reader.next_frame().unwrap().unwrap();
        assert_eq!(
            Report::decode(tag, payload),
            Err(FrameError::UnknownTag(0x81))
        );
    }
}
