//! Samples as JSON, for the AMQP path (oslo.messaging notifications carry JSON) and for the
//! raw server tables' metadata column.
//!
//! Ceilometer's signature sees Python's `str()` of every value, so int and float must survive
//! the trip: a float is always written with a decimal point or exponent (`256.0`, never `256`),
//! which `serde_json` (ryu) does for every finite `f64`, and an int never has one.

use anyhow::{bail, Result};
use meter::Value;
use serde_json::{Map, Number, Value as Json};

/// `v` as JSON, keeping int vs float. Bin values and non-string map keys have no JSON form.
pub fn to_json(v: &Value) -> Result<Json> {
    Ok(match v {
        Value::Nil => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::Number((*i).into()),
        Value::UInt(u) => Json::Number((*u).into()),
        Value::Float(f) => match Number::from_f64(*f) {
            Some(n) => Json::Number(n),
            None => bail!("float {f} has no JSON form"),
        },
        Value::Str(s) => Json::String(s.clone()),
        Value::Bin(_) => bail!("bin value has no JSON form"),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect::<Result<_>>()?),
        Value::Map(pairs) => {
            let mut m = Map::with_capacity(pairs.len());
            for (k, val) in pairs {
                let Value::Str(k) = k else {
                    bail!("map key of type {} has no JSON form", k.type_name());
                };
                m.insert(k.clone(), to_json(val)?);
            }
            Json::Object(m)
        }
    })
}

/// One oslo.messaging v2 notification envelope carrying `samples` (as ceilometer's
/// `SampleNotifierPublisher` sends them: event_type `metering`, priority `SAMPLE`).
pub fn envelope(n: usize, samples: &[Value]) -> Result<String> {
    let payload = samples.iter().map(to_json).collect::<Result<Vec<_>>>()?;
    let message = serde_json::json!({
        "message_id": crate::samples::message_id(n as u64),
        "publisher_id": "ceilometer.polling",
        "event_type": "metering",
        "priority": "SAMPLE",
        "payload": payload,
        "timestamp": "2026-11-25 00:00:00.000000",
    });
    Ok(serde_json::json!({
        "oslo.version": "2.0",
        "oslo.message": message.to_string(),
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_keep_their_point_and_ints_have_none() {
        let v = Value::Array(vec![
            Value::Float(256.0),
            Value::Int(256),
            Value::Float(0.5),
        ]);
        assert_eq!(to_json(&v).unwrap().to_string(), "[256.0,256,0.5]");
    }

    #[test]
    fn generated_samples_convert() {
        let s = crate::samples::sample(1, "s", 0);
        let e = envelope(0, &[s]).unwrap();
        assert!(e.contains("\"oslo.version\":\"2.0\""));
        assert!(!e.contains('\n'));
    }
}
