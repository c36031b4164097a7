//! Finding frame boundaries in byte streams before decoding them.
//!
//! MessagePack-RPC sends msgpack objects back to back with no length prefix, so the only way
//! to know where one ends is to walk its markers. [`MsgpackScanner`] does that without
//! building values and *resumably*: when the buffer ends mid-object it keeps its position and
//! nesting stack, so a 16 MiB frame arriving in 1-byte writes costs O(n) in total, not O(n²).
//! It enforces the frame size limit and a nesting limit before anything is allocated.
//!
//! [`LengthPrefixed`] does the same for ceilometer's `tcp://` publisher: an 8-byte
//! little-endian length, then that many bytes of one msgpack sample.

/// Why a stream was given up on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame larger than max_frame_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("frame nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("frame of more than max_frame_elements ({limit}) elements")]
    TooManyElements { limit: u64 },
    #[error("invalid msgpack marker 0xc1 at byte {offset}")]
    BadMarker { offset: usize },
}

/// Resumable scanner for one msgpack object at the start of a buffer.
#[derive(Debug)]
pub struct MsgpackScanner {
    pos: usize,
    /// Items still expected at each open nesting level.
    stack: Vec<u64>,
    /// Elements (container children) announced so far in this frame.
    elements: u64,
    max_frame: usize,
    max_depth: usize,
    max_elements: u64,
}

impl MsgpackScanner {
    pub fn new(max_frame: usize, max_depth: usize) -> MsgpackScanner {
        MsgpackScanner {
            pos: 0,
            stack: Vec::new(),
            elements: 0,
            max_frame,
            max_depth,
            max_elements: u64::MAX,
        }
    }

    /// Refuse a frame whose containers announce more than `n` elements in all: decoded, each
    /// costs a `Value` (32 bytes) however small on the wire (a nil is one byte).
    pub fn with_max_elements(mut self, n: u64) -> MsgpackScanner {
        self.max_elements = n;
        self
    }

    /// Forget progress: call after the caller consumed the frame that `scan` reported.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.elements = 0;
        self.stack.clear();
    }

    /// Continue scanning `buf` (which must start with the same bytes as on earlier calls).
    /// Returns `Ok(Some(len))` when one whole object is `buf[..len]`, `Ok(None)` when more bytes
    /// are needed.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        loop {
            if self.pos > self.max_frame {
                return Err(FrameError::TooLarge {
                    limit: self.max_frame,
                });
            }
            let Some((header, payload, children)) = item_extent(&buf[self.pos..], self.pos)? else {
                // Not even the header is complete: the frame is at least pos + 1 bytes. A
                // payload length alone can already prove the frame too large.
                return Ok(None);
            };
            let end = self.pos as u64 + header as u64 + payload;
            if end > self.max_frame as u64 {
                return Err(FrameError::TooLarge {
                    limit: self.max_frame,
                });
            }
            if end > buf.len() as u64 {
                return Ok(None);
            }
            self.pos = end as usize;
            if children > 0 {
                if self.stack.len() >= self.max_depth {
                    return Err(FrameError::TooDeep {
                        limit: self.max_depth,
                    });
                }
                // Every child takes at least one byte: a claim beyond the limit is refused
                // before anything else is read.
                if children > (self.max_frame - self.pos.min(self.max_frame)) as u64 {
                    return Err(FrameError::TooLarge {
                        limit: self.max_frame,
                    });
                }
                self.elements = self.elements.saturating_add(children);
                if self.elements > self.max_elements {
                    return Err(FrameError::TooManyElements {
                        limit: self.max_elements,
                    });
                }
                self.stack.push(children);
                continue;
            }
            // One item done: close every level it completes.
            loop {
                match self.stack.last_mut() {
                    None => {
                        let len = self.pos;
                        self.reset();
                        return Ok(Some(len));
                    }
                    Some(n) => {
                        *n -= 1;
                        if *n == 0 {
                            self.stack.pop();
                        } else {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// For the item starting at `b[0]`: (header bytes, payload bytes, child items), or `None` when
/// the header is incomplete.
fn item_extent(b: &[u8], offset: usize) -> Result<Option<(usize, u64, u64)>, FrameError> {
    let Some(&m) = b.first() else {
        return Ok(None);
    };
    let be = |n: usize| -> Option<u64> {
        b.get(1..1 + n)
            .map(|s| s.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    };
    let r = match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0, 0),
        0x80..=0x8f => (1, 0, 2 * (m & 0x0f) as u64),
        0x90..=0x9f => (1, 0, (m & 0x0f) as u64),
        0xa0..=0xbf => (1, (m & 0x1f) as u64, 0),
        0xc1 => return Err(FrameError::BadMarker { offset }),
        0xc4 | 0xd9 => match be(1) {
            Some(n) => (2, n, 0),
            None => return Ok(None),
        },
        0xc5 | 0xda => match be(2) {
            Some(n) => (3, n, 0),
            None => return Ok(None),
        },
        0xc6 | 0xdb => match be(4) {
            Some(n) => (5, n, 0),
            None => return Ok(None),
        },
        // ext 8/16/32: length, then a type byte, then the data.
        0xc7 => match be(1) {
            Some(n) => (3, n, 0),
            None => return Ok(None),
        },
        0xc8 => match be(2) {
            Some(n) => (4, n, 0),
            None => return Ok(None),
        },
        0xc9 => match be(4) {
            Some(n) => (6, n, 0),
            None => return Ok(None),
        },
        0xca => (1, 4, 0),
        0xcb => (1, 8, 0),
        0xcc | 0xd0 => (1, 1, 0),
        0xcd | 0xd1 => (1, 2, 0),
        0xce | 0xd2 => (1, 4, 0),
        0xcf | 0xd3 => (1, 8, 0),
        0xd4 => (2, 1, 0),
        0xd5 => (2, 2, 0),
        0xd6 => (2, 4, 0),
        0xd7 => (2, 8, 0),
        0xd8 => (2, 16, 0),
        0xdc => match be(2) {
            Some(n) => (3, 0, n),
            None => return Ok(None),
        },
        0xdd => match be(4) {
            Some(n) => (5, 0, n),
            None => return Ok(None),
        },
        0xde => match be(2) {
            Some(n) => (3, 0, 2 * n),
            None => return Ok(None),
        },
        0xdf => match be(4) {
            Some(n) => (5, 0, 2 * n),
            None => return Ok(None),
        },
    };
    Ok(Some(r))
}

/// Frames of ceilometer's `tcp://` publisher: `u64` little-endian length + payload.
#[derive(Debug)]
pub struct LengthPrefixed {
    pub max_frame: usize,
}

impl LengthPrefixed {
    /// `Ok(Some((start, end)))`: the payload is `buf[start..end]` and the frame ends at `end`.
    pub fn scan(&self, buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
        let Some(head) = buf.get(..8) else {
            return Ok(None);
        };
        let mut le = [0u8; 8];
        le.copy_from_slice(head);
        let len = u64::from_le_bytes(le);
        if len > self.max_frame as u64 {
            return Err(FrameError::TooLarge {
                limit: self.max_frame,
            });
        }
        let end = 8 + len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        Ok(Some((8, end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_limit_refuses_a_claim_before_its_bytes() {
        // [[nil × 1000]] with a limit of 100: refused from the header alone.
        let mut frame = vec![0x91, 0xdc, 0x03, 0xe8];
        let mut sc = MsgpackScanner::new(1 << 20, 8).with_max_elements(100);
        assert_eq!(
            sc.scan(&frame),
            Err(FrameError::TooManyElements { limit: 100 })
        );
        frame.resize(4 + 1000, 0xc0);
        let mut sc = MsgpackScanner::new(1 << 20, 8).with_max_elements(1001);
        assert_eq!(sc.scan(&frame), Ok(Some(frame.len())));
        // The count starts again with each frame.
        assert_eq!(sc.scan(&frame), Ok(Some(frame.len())));
    }

    fn scan_all_at_once(bytes: &[u8]) -> Result<Option<usize>, FrameError> {
        MsgpackScanner::new(1 << 20, 64).scan(bytes)
    }

    #[test]
    fn scalars_and_containers() {
        assert_eq!(scan_all_at_once(&[0x01]), Ok(Some(1)));
        assert_eq!(
            scan_all_at_once(&[0x92, 0x01, 0xa1, b'x', 0xff]),
            Ok(Some(4))
        );
        // [0, 7, "m", []]
        let req = [0x94, 0x00, 0x07, 0xa1, b'm', 0x90];
        assert_eq!(scan_all_at_once(&req), Ok(Some(6)));
        // {"a": {"b": nil}} followed by junk
        let m = [0x81, 0xa1, b'a', 0x81, 0xa1, b'b', 0xc0, 0x00];
        assert_eq!(scan_all_at_once(&m), Ok(Some(7)));
        assert_eq!(scan_all_at_once(&[0xcb, 0, 0, 0]), Ok(None));
        assert_eq!(
            scan_all_at_once(&[0xc1]),
            Err(FrameError::BadMarker { offset: 0 })
        );
    }

    #[test]
    fn resumes_byte_by_byte() {
        let req = [
            0x94, 0x00, 0xcd, 0x01, 0x00, 0xda, 0x00, 0x02, b'a', b'b', 0x91, 0xc3,
        ];
        let mut s = MsgpackScanner::new(1 << 20, 64);
        for i in 1..req.len() {
            assert_eq!(s.scan(&req[..i]), Ok(None), "prefix {i}");
        }
        assert_eq!(s.scan(&req), Ok(Some(req.len())));
    }

    #[test]
    fn limits_are_enforced_before_allocation() {
        // A bin claiming 4 GiB.
        let mut s = MsgpackScanner::new(1 << 20, 64);
        assert!(matches!(
            s.scan(&[0xc6, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge { .. })
        ));
        // An array claiming 2^32-1 elements.
        let mut s = MsgpackScanner::new(1 << 20, 64);
        assert!(matches!(
            s.scan(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge { .. })
        ));
        // 100 000 nested arrays.
        let deep = vec![0x91u8; 100_000];
        let mut s = MsgpackScanner::new(1 << 20, 64);
        assert!(matches!(s.scan(&deep), Err(FrameError::TooDeep { .. })));
    }

    #[test]
    fn length_prefixed() {
        let f = LengthPrefixed { max_frame: 100 };
        let mut buf = 3u64.to_le_bytes().to_vec();
        assert_eq!(f.scan(&buf), Ok(None));
        buf.extend_from_slice(&[1, 2, 3, 9]);
        assert_eq!(f.scan(&buf), Ok(Some((8, 11))));
        let huge = (100u64 << 20).to_le_bytes();
        assert!(f.scan(&huge).is_err());
    }
}
