//! SPDY/3.1 frames on the wire (draft-mbelshe-httpbis-spdy-00 §2.2 and §2.6, with 3.1's
//! session-level WINDOW_UPDATE). Header blocks stay compressed here; [`super::headers`]
//! owns the zlib contexts, which span the whole connection.
//!
//! Written by hand: no crate parses server-side SPDY/3.1.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The protocol version in every control frame.
const VERSION: u16 = 3;

/// The largest frame accepted. SPDY allows 16 MiB; the peers this serves (Go's spdystream)
/// write at most one 32 KiB copy buffer per DATA frame, so a bigger frame is a hostile one
/// and would only cost memory.
pub const MAX_FRAME: usize = 1 << 20;

/// FIN on SYN_STREAM, SYN_REPLY, HEADERS and DATA: the sender's half of the stream ends.
pub const FLAG_FIN: u8 = 0x01;

/// RST_STREAM status codes (§2.6.3) used here.
pub mod status {
    /// Malformed frame or headers.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A frame for a stream that is not open.
    pub const INVALID_STREAM: u32 = 2;
    /// The stream is not wanted.
    pub const REFUSED_STREAM: u32 = 3;
    /// The stream is given up.
    pub const CANCEL: u32 = 5;
    /// A stream id used twice.
    pub const STREAM_IN_USE: u32 = 8;
    /// A frame above [`super::MAX_FRAME`].
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// SETTINGS id of the initial per-stream window (§2.6.4).
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A new stream, opened by the peer.
    SynStream {
        /// Stream id (odd from clients).
        id: u32,
        /// The stream it is pushed for; 0 for none.
        associated: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// FIN, UNIDIRECTIONAL.
        flags: u8,
        /// Compressed header block.
        headers: Bytes,
    },
    /// The answer to a SYN_STREAM.
    SynReply {
        /// Stream id.
        id: u32,
        /// FIN.
        flags: u8,
        /// Compressed header block.
        headers: Bytes,
    },
    /// A stream ended abnormally.
    RstStream {
        /// Stream id.
        id: u32,
        /// Why, one of [`status`].
        status: u32,
    },
    /// Session settings: `(flags, id, value)` entries.
    Settings {
        /// The entries.
        entries: Vec<(u8, u32, u32)>,
    },
    /// Liveness check; answered with the same id.
    Ping {
        /// Odd from clients, even from servers.
        id: u32,
    },
    /// The session ends.
    GoAway {
        /// The last stream the sender handled.
        last_good: u32,
        /// 0 OK, 1 PROTOCOL_ERROR, 2 INTERNAL_ERROR.
        status: u32,
    },
    /// More headers on an open stream.
    Headers {
        /// Stream id.
        id: u32,
        /// FIN.
        flags: u8,
        /// Compressed header block.
        headers: Bytes,
    },
    /// Credit for more data; stream 0 is the whole session.
    WindowUpdate {
        /// Stream id, or 0.
        id: u32,
        /// Bytes.
        delta: u32,
    },
    /// Payload on a stream.
    Data {
        /// Stream id.
        id: u32,
        /// FIN.
        flags: u8,
        /// The bytes.
        data: Bytes,
    },
}

/// Why bytes are not a frame; the session ends with GOAWAY PROTOCOL_ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A control frame of another SPDY version.
    #[error("SPDY version {0} is not 3")]
    Version(u16),
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is above the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// A control frame shorter than its type needs.
    #[error("{kind} frame of {len} bytes is too short")]
    Short {
        /// Frame type.
        kind: &'static str,
        /// Its length.
        len: usize,
    },
}

impl Frame {
    /// Takes one whole frame off the front of `buf`; `None` until enough bytes arrived.
    /// Unknown control frame types are skipped, as §2.2.1 asks.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, FrameError> {
        loop {
            if buf.len() < 8 {
                return Ok(None);
            }
            let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
            if len > MAX_FRAME {
                return Err(FrameError::TooLarge(len));
            }
            if buf.len() < 8 + len {
                buf.reserve(8 + len - buf.len());
                return Ok(None);
            }
            let mut head = buf.split_to(8);
            let payload = buf.split_to(len).freeze();
            let first = head.get_u32();
            let flags = head[0];
            if first & 0x8000_0000 == 0 {
                return Ok(Some(Frame::Data {
                    id: first & 0x7fff_ffff,
                    flags,
                    data: payload,
                }));
            }
            let version = ((first >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(FrameError::Version(version));
            }
            if let Some(frame) = control(first as u16, flags, payload)? {
                return Ok(Some(frame));
            }
        }
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::Data { id, flags, data } => {
                out.put_u32(id & 0x7fff_ffff);
                put_flags_len(out, *flags, data.len());
                out.put_slice(data);
            }
            Frame::SynStream {
                id,
                associated,
                priority,
                flags,
                headers,
            } => {
                put_control(out, 1, *flags, 10 + headers.len());
                out.put_u32(id & 0x7fff_ffff);
                out.put_u32(associated & 0x7fff_ffff);
                out.put_u8((priority & 0x7) << 5);
                out.put_u8(0);
                out.put_slice(headers);
            }
            Frame::SynReply { id, flags, headers } => {
                put_control(out, 2, *flags, 4 + headers.len());
                out.put_u32(id & 0x7fff_ffff);
                out.put_slice(headers);
            }
            Frame::RstStream { id, status } => {
                put_control(out, 3, 0, 8);
                out.put_u32(id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Settings { entries } => {
                put_control(out, 4, 0, 4 + 8 * entries.len());
                out.put_u32(entries.len() as u32);
                for (flags, id, value) in entries {
                    out.put_u32(u32::from(*flags) << 24 | (id & 0x00ff_ffff));
                    out.put_u32(*value);
                }
            }
            Frame::Ping { id } => {
                put_control(out, 6, 0, 4);
                out.put_u32(*id);
            }
            Frame::GoAway { last_good, status } => {
                put_control(out, 7, 0, 8);
                out.put_u32(last_good & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Headers { id, flags, headers } => {
                put_control(out, 8, *flags, 4 + headers.len());
                out.put_u32(id & 0x7fff_ffff);
                out.put_slice(headers);
            }
            Frame::WindowUpdate { id, delta } => {
                put_control(out, 9, 0, 8);
                out.put_u32(id & 0x7fff_ffff);
                out.put_u32(delta & 0x7fff_ffff);
            }
        }
    }
}

fn put_control(out: &mut BytesMut, kind: u16, flags: u8, len: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    put_flags_len(out, flags, len);
}

fn put_flags_len(out: &mut BytesMut, flags: u8, len: usize) {
    debug_assert!(len < 1 << 24, "frame length {len} does not fit 24 bits");
    out.put_u32(u32::from(flags) << 24 | (len as u32 & 0x00ff_ffff));
}

/// The control frame of type `kind`; `None` for a type SPDY/3.1 does not define.
fn control(kind: u16, flags: u8, mut p: Bytes) -> Result<Option<Frame>, FrameError> {
    let need = |name: &'static str, n: usize, p: &Bytes| {
        if p.len() < n {
            Err(FrameError::Short {
                kind: name,
                len: p.len(),
            })
        } else {
            Ok(())
        }
    };
    let id = |p: &mut Bytes| p.get_u32() & 0x7fff_ffff;
    let frame = match kind {
        1 => {
            need("SYN_STREAM", 10, &p)?;
            let stream = id(&mut p);
            let associated = id(&mut p);
            let priority = p.get_u8() >> 5;
            p.advance(1);
            Frame::SynStream {
                id: stream,
                associated,
                priority,
                flags,
                headers: p,
            }
        }
        2 => {
            need("SYN_REPLY", 4, &p)?;
            Frame::SynReply {
                id: id(&mut p),
                flags,
                headers: p,
            }
        }
        3 => {
            need("RST_STREAM", 8, &p)?;
            Frame::RstStream {
                id: id(&mut p),
                status: p.get_u32(),
            }
        }
        4 => {
            need("SETTINGS", 4, &p)?;
            let count = p.get_u32() as usize;
            if p.len() / 8 < count {
                return Err(FrameError::Short {
                    kind: "SETTINGS",
                    len: p.len() + 4,
                });
            }
            let entries = (0..count)
                .map(|_| {
                    let word = p.get_u32();
                    ((word >> 24) as u8, word & 0x00ff_ffff, p.get_u32())
                })
                .collect();
            Frame::Settings { entries }
        }
        6 => {
            need("PING", 4, &p)?;
            Frame::Ping { id: p.get_u32() }
        }
        7 => {
            need("GOAWAY", 8, &p)?;
            Frame::GoAway {
                last_good: id(&mut p),
                status: p.get_u32(),
            }
        }
        8 => {
            need("HEADERS", 4, &p)?;
            Frame::Headers {
                id: id(&mut p),
                flags,
                headers: p,
            }
        }
        9 => {
            need("WINDOW_UPDATE", 8, &p)?;
            Frame::WindowUpdate {
                id: id(&mut p),
                delta: p.get_u32() & 0x7fff_ffff,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        let whole = buf.clone();
        // Every prefix is incomplete; the whole is the frame again.
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(Frame::decode(&mut part), Ok(None), "{frame:?} cut at {cut}");
        }
        assert_eq!(Frame::decode(&mut buf), Ok(Some(frame)));
        assert!(buf.is_empty());
    }

    #[test]
    fn every_frame_type_round_trips() {
        let headers = Bytes::from_static(b"\x78\xbb compressed");
        for frame in [
            Frame::SynStream {
                id: 1,
                associated: 0,
                priority: 7,
                flags: FLAG_FIN | 0x02,
                headers: headers.clone(),
            },
            Frame::SynReply {
                id: 3,
                flags: 0,
                headers: headers.clone(),
            },
            Frame::RstStream {
                id: 5,
                status: status::CANCEL,
            },
            Frame::Settings {
                entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 65536), (1, 4, 100)],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good: 9,
                status: 0,
            },
            Frame::Headers {
                id: 11,
                flags: FLAG_FIN,
                headers,
            },
            Frame::WindowUpdate {
                id: 0,
                delta: 1 << 20,
            },
            Frame::Data {
                id: 13,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                id: 15,
                flags: 0,
                data: Bytes::new(),
            },
        ] {
            round_trip(frame);
        }
    }

    #[test]
    fn layout_matches_the_draft() {
        let mut buf = BytesMut::new();
        Frame::Ping { id: 1 }.encode(&mut buf);
        assert_eq!(
            &buf[..],
            b"\x80\x03\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01"
        );
        buf.clear();
        Frame::Data {
            id: 1,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"ab"),
        }
        .encode(&mut buf);
        assert_eq!(&buf[..], b"\x00\x00\x00\x01\x01\x00\x00\x02ab");
        buf.clear();
        Frame::RstStream { id: 3, status: 5 }.encode(&mut buf);
        assert_eq!(
            &buf[..],
            b"\x80\x03\x00\x03\x00\x00\x00\x08\x00\x00\x00\x03\x00\x00\x00\x05"
        );
    }

    #[test]
    fn unknown_control_types_are_skipped() {
        let mut buf = BytesMut::from(&b"\x80\x03\x00\x0a\x00\x00\x00\x02xy"[..]);
        Frame::Ping { id: 2 }.encode(&mut buf);
        assert_eq!(Frame::decode(&mut buf), Ok(Some(Frame::Ping { id: 2 })));
    }

    #[test]
    fn hostile_frames_are_refused() {
        let mut big = BytesMut::from(&b"\x00\x00\x00\x01\x00\xff\xff\xff"[..]);
        assert_eq!(
            Frame::decode(&mut big),
            Err(FrameError::TooLarge(0xff_ffff))
        );
        let mut v2 = BytesMut::from(&b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01"[..]);
        assert_eq!(Frame::decode(&mut v2), Err(FrameError::Version(2)));
        let mut short = BytesMut::from(&b"\x80\x03\x00\x03\x00\x00\x00\x04\x00\x00\x00\x01"[..]);
        assert!(matches!(
            Frame::decode(&mut short),
            Err(FrameError::Short {
                kind: "RST_STREAM",
                ..
            })
        ));
        let mut lying = BytesMut::from(
            &b"\x80\x03\x00\x04\x00\x00\x00\x0c\x00\x00\x10\x00\x00\x00\x00\x07\x00\x00\x00\x01"[..],
        );
        assert!(matches!(
            Frame::decode(&mut lying),
            Err(FrameError::Short {
                kind: "SETTINGS",
                ..
            })
        ));
    }
}
