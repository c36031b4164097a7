//! MessagePack-RPC over TCP or a Unix socket: `record_metering_data` requests carry samples;
//! each request is answered, in order, once its samples are committed (or refused).

use super::conns::{Conn, ProtocolError};
use super::Intake;
use crate::dispatch::Ticket;
use crate::framing::FrameError;
use crate::rpc::{self as wire, RpcMessage};
use meter::ValueRef;

/// The next complete message in the connection's unread bytes: `(0, end)`.
pub fn scan(c: &mut Conn) -> Result<Option<(usize, usize)>, FrameError> {
    let (scanner, unread) = c.scanner_and_unread();
    scanner.scan(unread).map(|o| o.map(|n| (0, n)))
}

/// One decoded message of connection slot `i`: its samples go to the ingest step and a
/// ticket (answered when the batch completes) to the batch.
pub fn handle(
    c: &mut Conn,
    i: usize,
    v: ValueRef<'_>,
    intake: &mut Intake,
) -> Result<(), ProtocolError> {
    let msg = wire::parse_message(v).map_err(|e| ProtocolError {
        msgid: e.msgid,
        reason: format!("malformed RPC message: {}", e.reason),
    })?;
    intake.counters.rpc_requests += 1;
    let (msgid, method, params) = match msg {
        RpcMessage::Request {
            msgid,
            method,
            params,
        } => (Some(msgid), method, params),
        RpcMessage::Notification { method, params } => (None, method, params),
    };
    if method != wire::METHOD {
        intake.counters.rpc_errors += 1;
        if let Some(msgid) = msgid {
            let mut out = Vec::new();
            wire::encode_error(&mut out, msgid, &format!("unknown method: {method}"));
            c.queue_reply(msgid, Some(out));
        }
        return Ok(());
    }
    let samples = match wire::samples_of(params) {
        Ok(s) => s,
        Err(e) => {
            intake.counters.rpc_errors += 1;
            if let Some(msgid) = msgid {
                let mut out = Vec::new();
                wire::encode_error(&mut out, msgid, &e);
                c.queue_reply(msgid, Some(out));
            }
            return Ok(());
        }
    };
    let (range, rejected) = intake.ingest_all(samples, "rpc");
    if let Some(msgid) = msgid {
        c.queue_reply(msgid, None);
    }
    intake.add_ticket(Ticket {
        conn: i,
        serial: c.serial(),
        msgid,
        amqp_tag: None,
        range,
        rejected,
    });
    Ok(())
}
