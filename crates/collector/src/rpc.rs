//! MessagePack-RPC messages (DESIGN §4.4): what a decoded frame asks for, and the bytes of
//! the answers.

use meter::{Node, Parts, View};

pub const METHOD: &str = "record_metering_data";

/// A decoded RPC frame, its params owned or borrowing the frame's bytes.
#[derive(Debug)]
pub enum RpcMessage<V> {
    /// `[0, msgid, method, params]`.
    Request {
        msgid: u64,
        method: String,
        params: V,
    },
    /// `[2, method, params]`: fire and forget.
    Notification { method: String, params: V },
}

/// A frame that is valid msgpack but not a valid RPC message.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct RpcError {
    /// The msgid when it could be read, so the error can be answered.
    pub msgid: Option<u64>,
    pub reason: String,
}

fn bad(msgid: Option<u64>, reason: impl Into<String>) -> RpcError {
    RpcError {
        msgid,
        reason: reason.into(),
    }
}

fn as_msgid<V: Node>(v: &V) -> Option<u64> {
    match v.view() {
        View::Int(i) if (0..=u32::MAX as i64).contains(&i) => Some(i as u64),
        View::UInt(u) if u <= u32::MAX as u64 => Some(u),
        _ => None,
    }
}

fn method_name<V: Node>(v: &V) -> Option<String> {
    match v.view() {
        View::Str(s) => Some(s.to_owned()),
        View::Bin(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        _ => None,
    }
}

pub fn parse_message<V: Parts>(v: V) -> Result<RpcMessage<V>, RpcError> {
    let Ok(items) = v.into_items() else {
        return Err(bad(None, "RPC message is not an array"));
    };
    let kind = match items.first().map(Node::view) {
        Some(View::Int(k)) => k,
        _ => return Err(bad(None, "RPC message type is not an integer")),
    };
    match (kind, items.len()) {
        (0, 4) => {
            let mut it = items.into_iter().skip(1);
            let (Some(id), Some(m), Some(params)) = (it.next(), it.next(), it.next()) else {
                return Err(bad(None, "short RPC request"));
            };
            let msgid =
                as_msgid(&id).ok_or_else(|| bad(None, "msgid is not a 32-bit unsigned integer"))?;
            let method =
                method_name(&m).ok_or_else(|| bad(Some(msgid), "method name is not a string"))?;
            Ok(RpcMessage::Request {
                msgid,
                method,
                params,
            })
        }
        (2, 3) => {
            let mut it = items.into_iter().skip(1);
            let (Some(m), Some(params)) = (it.next(), it.next()) else {
                return Err(bad(None, "short RPC notification"));
            };
            let method = method_name(&m).ok_or_else(|| bad(None, "method name is not a string"))?;
            Ok(RpcMessage::Notification { method, params })
        }
        (0, n) => Err(bad(
            items.get(1).and_then(as_msgid),
            format!("RPC request has {n} elements, expected 4"),
        )),
        (2, n) => Err(bad(
            None,
            format!("RPC notification has {n} elements, expected 3"),
        )),
        (1, _) => Err(bad(None, "RPC responses are not accepted by the collector")),
        (k, _) => Err(bad(None, format!("unknown RPC message type {k}"))),
    }
}

/// The samples in `record_metering_data`'s params: `[[s, s, ...]]`, `[s]`, `[s, s]` or `s`.
pub fn samples_of<V: Parts>(params: V) -> Result<Vec<V>, String> {
    if matches!(params.view(), View::Map(_)) {
        return Ok(vec![params]);
    }
    match params.into_items() {
        Ok(mut args) => {
            if args.len() == 1 && matches!(args[0].view(), View::Array(_)) {
                match args.pop().map(Parts::into_items) {
                    Some(Ok(samples)) => Ok(samples),
                    _ => Err("params: expected an array of samples".into()),
                }
            } else {
                Ok(args)
            }
        }
        Err(_) => Err("params: expected an array of samples or one sample map".into()),
    }
}

/// `[1, msgid, nil, {"stored": n, "duplicates": d, "rejected": r}]`.
pub fn encode_result(
    out: &mut Vec<u8>,
    msgid: u64,
    stored: usize,
    duplicates: usize,
    rejected: usize,
) {
    let _ = rmp::encode::write_array_len(out, 4);
    let _ = rmp::encode::write_uint(out, 1);
    let _ = rmp::encode::write_uint(out, msgid);
    let _ = rmp::encode::write_nil(out);
    let _ = rmp::encode::write_map_len(out, 3);
    for (k, v) in [
        ("stored", stored),
        ("duplicates", duplicates),
        ("rejected", rejected),
    ] {
        let _ = rmp::encode::write_str(out, k);
        let _ = rmp::encode::write_uint(out, v as u64);
    }
}

/// `[1, msgid, "error text", nil]`.
pub fn encode_error(out: &mut Vec<u8>, msgid: u64, error: &str) {
    let _ = rmp::encode::write_array_len(out, 4);
    let _ = rmp::encode::write_uint(out, 1);
    let _ = rmp::encode::write_uint(out, msgid);
    let _ = rmp::encode::write_str(out, error);
    let _ = rmp::encode::write_nil(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter::Value;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }

    #[test]
    fn parses_requests_and_notifications() {
        let req = Value::Array(vec![
            Value::Int(0),
            Value::Int(7),
            s(METHOD),
            Value::Array(vec![]),
        ]);
        match parse_message(req).unwrap() {
            RpcMessage::Request { msgid, method, .. } => {
                assert_eq!((msgid, method.as_str()), (7, METHOD))
            }
            other => panic!("{other:?}"),
        }
        let n = Value::Array(vec![Value::Int(2), s(METHOD), Value::Array(vec![])]);
        assert!(matches!(
            parse_message(n).unwrap(),
            RpcMessage::Notification { .. }
        ));
    }

    #[test]
    fn malformed_messages_keep_msgid_when_known() {
        let e = parse_message(Value::Array(vec![
            Value::Int(0),
            Value::Int(9),
            Value::Nil,
            Value::Nil,
        ]))
        .unwrap_err();
        assert_eq!(e.msgid, Some(9));
        let e = parse_message(Value::Array(vec![Value::Int(0), Value::Int(9)])).unwrap_err();
        assert_eq!(e.msgid, Some(9));
        assert!(parse_message(Value::Int(0)).unwrap_err().msgid.is_none());
        assert!(parse_message(Value::Array(vec![Value::Int(5)])).is_err());
    }

    #[test]
    fn params_shapes() {
        let m = Value::Map(vec![]);
        assert_eq!(samples_of(m.clone()).unwrap().len(), 1);
        assert_eq!(
            samples_of(Value::Array(vec![m.clone(), m.clone()]))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            samples_of(Value::Array(vec![Value::Array(vec![
                m.clone(),
                m.clone(),
                m
            ])]))
            .unwrap()
            .len(),
            3
        );
        assert!(samples_of(Value::Int(1)).is_err());
    }

    #[test]
    fn encodes_responses() {
        let mut out = Vec::new();
        encode_result(&mut out, 3, 2, 1, 0);
        assert_eq!(&out[..4], &[0x94, 0x01, 0x03, 0xc0]);
        out.clear();
        encode_error(&mut out, 4, "unknown method: x");
        assert_eq!(&out[..3], &[0x94, 0x01, 0x04]);
    }
}
