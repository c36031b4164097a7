//! Ceilometer's `tcp://` publisher: each frame is a 4-byte big-endian length and one
//! MessagePack sample map. Nothing is answered.

use super::conns::Conn;
use super::Intake;
use crate::framing::{FrameError, LengthPrefixed};
use meter::Value;

/// The next complete frame in the connection's unread bytes: `(start, end)` of its body.
pub fn scan(c: &mut Conn, max_frame: usize) -> Result<Option<(usize, usize)>, FrameError> {
    LengthPrefixed { max_frame }.scan(c.unread())
}

/// One decoded frame: a sample map goes to the ingest step; anything else ends the
/// connection (the error is the reason).
pub fn handle(v: Value, intake: &mut Intake) -> Result<(), String> {
    if !matches!(v, Value::Map(_)) {
        return Err("frame is not a sample map".into());
    }
    intake.ingest(v, "tcp");
    intake.flush_if_full();
    Ok(())
}
