//! `frame`: the TCP frame decoder, as both sides run it on their read buffer.
//!
//! The first input byte picks the decoder's limit (bits 0–1) and where the rest is split into
//! two reads (bits 2–7); the rest is the byte stream. Invariants:
//! - the frames, the error and the leftover are the same whether the stream arrives in one
//!   read or in two;
//! - every frame's length prefix is within the limit;
//! - a parsed relay frame re-encodes to the same bytes, a hello to the same version, an error
//!   frame to the same code (and the same bytes when its text is UTF-8 within the limit);
//! - a control body that decodes as a message round-trips ([`crate::control`]).

use bytes::{Bytes, BytesMut};
use natcall_proto::FrameError;
use natcall_proto::control::{ClientMsg, ServerMsg};
use natcall_proto::frame::{
    self, DEFAULT_MAX_FRAME_LEN, ErrorCode, Frame, FrameDecoder, LEN_PREFIX, MAX_ERROR_TEXT, MAX_FRAME_LEN, RawFrame,
};

use crate::control::round_trip;

const LIMITS: [u32; 4] = [DEFAULT_MAX_FRAME_LEN, MAX_FRAME_LEN, 64, 0];

/// The `frame` target.
pub fn frame(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let decoder = FrameDecoder::new(LIMITS[usize::from(first & 3)]);
    let split = usize::from(first >> 2) * stream.len() / 63;
    let whole = decode_all(decoder, &[stream]);
    let (a, b) = stream.split_at(split);
    let chunked = decode_all(decoder, &[a, b]);
    assert_eq!(whole, chunked, "two reads decode differently from one");
}

/// What a connection makes of a byte stream: its frames, the error that ends it, or else the
/// bytes left waiting for more.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<Bytes>,
    error: Option<FrameError>,
    leftover: usize,
}

fn decode_all(decoder: FrameDecoder, reads: &[&[u8]]) -> Outcome {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(raw)) => {
                    check_frame(decoder, &raw);
                    frames.push(raw.into_wire());
                }
                Ok(None) => break,
                Err(error) => {
                    let _ = ErrorCode::from(&error);
                    // The connection ends here: what was not read yet does not matter.
                    return Outcome {
                        frames,
                        error: Some(error),
                        leftover: 0,
                    };
                }
            }
        }
    }
    Outcome {
        frames,
        error: None,
        leftover: buf.len(),
    }
}

fn check_frame(decoder: FrameDecoder, raw: &RawFrame) {
    let wire = raw.wire();
    let len = u32::from_be_bytes([wire[0], wire[1], wire[2], wire[3]]);
    assert!(
        len >= 1 && len <= decoder.max_len(),
        "frame of {len} bytes passed the limit"
    );
    assert_eq!(wire.len(), LEN_PREFIX + len as usize);
    let _ = format!("{raw:?}");
    match raw.parse() {
        Ok(Frame::Hello(hello)) => {
            let mut out = BytesMut::new();
            frame::encode_hello(hello.version, &mut out);
            // A hello's bytes after the version are reserved and ignored.
            assert_eq!(&out[LEN_PREFIX..], &wire[LEN_PREFIX..out.len()]);
        }
        Ok(Frame::Control(body)) => {
            round_trip::<ClientMsg>(body);
            round_trip::<ServerMsg>(body);
        }
        Ok(Frame::Relay { header, payload }) => {
            let mut out = BytesMut::new();
            frame::encode_relay(&header, payload, &mut out).expect("a decoded relay frame re-encodes");
            assert_eq!(&out[..], &wire[..], "relay frame does not round-trip");
        }
        Ok(Frame::Error(error)) => check_error_frame(&error, raw.body()),
        Err(e) => {
            let _ = (e.to_string(), ErrorCode::from(&e));
        }
    }
}

fn check_error_frame(error: &frame::ErrorFrame, body: &[u8]) {
    let code = u16::from_be_bytes([body[0], body[1]]);
    assert_eq!(error.code.to_u16(), code, "error code does not round-trip");
    assert_eq!(ErrorCode::from_u16(code), error.code);
    let text = &body[2..];
    let mut out = BytesMut::new();
    frame::encode_error(error.code, &error.message, &mut out);
    if std::str::from_utf8(text).is_ok() && text.len() <= MAX_ERROR_TEXT {
        assert_eq!(&out[LEN_PREFIX + 1..], body, "error frame does not round-trip");
    } else {
        assert!(
            out.len() <= LEN_PREFIX + 3 + MAX_ERROR_TEXT,
            "error text not cut to the limit"
        );
    }
}
