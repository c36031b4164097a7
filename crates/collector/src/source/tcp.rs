//! Ceilometer's `tcp://` publisher: each frame is a 4-byte big-endian length and one
//! MessagePack sample map. Nothing is answered.

use super::conns::Conn;
use super::conns::MAX_DEPTH;
use super::Intake;
use crate::framing::{FrameError, LengthPrefixed, MsgpackScanner};
use meter::ValueRef;

/// The next complete frame in the connection's unread bytes: `(start, end)` of its body,
/// once its elements are counted within `max_elements`.
pub fn scan(
    c: &mut Conn,
    max_frame: usize,
    max_elements: u64,
) -> Result<Option<(usize, usize)>, FrameError> {
    let Some((start, end)) = LengthPrefixed { max_frame }.scan(c.unread())? else {
        return Ok(None);
    };
    // The body is one msgpack value: walk its markers (no allocation) before decoding it.
    MsgpackScanner::new(max_frame, MAX_DEPTH)
        .with_max_elements(max_elements)
        .scan(&c.unread()[start..end])?;
    Ok(Some((start, end)))
}

/// One decoded frame: a sample map goes to the ingest step; anything else ends the
/// connection (the error is the reason).
pub fn handle(v: ValueRef<'_>, intake: &mut Intake) -> Result<(), String> {
    if !matches!(v, ValueRef::Map(..)) {
        return Err("frame is not a sample map".into());
    }
    intake.ingest(v, "tcp");
    intake.flush_if_full();
    Ok(())
}
