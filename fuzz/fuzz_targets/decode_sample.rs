//! One datagram's worth of untrusted bytes through the whole receive path: decode (whole
//! buffer and streaming), verify the signature, type the sample. Nothing may panic, abort on
//! allocation or overflow the stack; whatever decodes must re-encode to an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meter::{decode_value, read_value, Limits, Sample, SigningKey};

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::new("change this for valid signing");
    let tight = Limits {
        max_depth: 8,
        max_bytes: Some(1024),
    };
    for limits in [Limits::default(), tight] {
        if let Ok((value, consumed)) = read_value(data, &limits) {
            assert!(consumed <= data.len());
            let mut again = Vec::new();
            meter::encode_value(&value, &mut again);
            let back = decode_value(&again).expect("re-encoded value decodes");
            let mut twice = Vec::new();
            meter::encode_value(&back, &mut twice);
            assert_eq!(again, twice);
        }
    }
    if let Ok(value) = decode_value(data) {
        let _ = key.verify(&value);
        let _ = key.compute(&value);
        let _ = meter::try_compute_signature(&value, "k");
        let _ = Sample::from_value(value);
    }
});
