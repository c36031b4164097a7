//! The MessagePack-RPC stream path: bytes arriving in arbitrary chunks go through the
//! resumable frame scanner, then the decoder, the RPC message parser and the sample path.
//! Also checks that the scanner and the decoder agree on where a frame ends.
#![no_main]

use collector::framing::MsgpackScanner;
use collector::rpc::{parse_message, samples_of, RpcMessage};
use libfuzzer_sys::fuzz_target;
use meter::decode::{read_value, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let mut scanner = MsgpackScanner::new(1 << 20, 64);
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0;
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match scanner.scan(&buf[start..]) {
                Ok(Some(n)) => {
                    let frame = &buf[start..start + n];
                    if let Ok((v, used)) = read_value(frame, &Limits::default()) {
                        assert_eq!(used, n, "scanner and decoder disagree on the frame end");
                        if let Ok(msg) = parse_message(v) {
                            let params = match msg {
                                RpcMessage::Request { params, .. } => params,
                                RpcMessage::Notification { params, .. } => params,
                            };
                            if let Ok(samples) = samples_of(params) {
                                for s in samples {
                                    let _ = meter::signature::verify_signature(&s, "secret");
                                    let _ = meter::Sample::from_value(s);
                                }
                            }
                        }
                    }
                    start += n;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
