//! Byte streams as media: `--send-audio/--send-video PATH|-` cut a stream (a file, or stdin —
//! e.g. MPEG-TS piped from ffmpeg) into frames on a lossless track (the sender drops none;
//! media is not retransmitted, so loss on the path stays loss); `--recv-audio/
//! --recv-video PATH|-` write the frames that arrive, in order, to a file or stdout.
//!
//! # Framing
//! A frame is what one read returns, at most [`FRAME_MAX`] bytes (three full media packets).
//! When the stream is MPEG-TS (the sync byte `0x47` every 188 bytes from the start), frames hold
//! whole 188-byte TS packets (at most 7, as in MPEG-TS over UDP: [`TS_FRAME_MAX`]) and the rest
//! of a read waits for the next one, so a lost frame loses whole TS packets and a decoder
//! resynchronises at the next. Every stream frame is
//! a key frame: each one is usable on its own, so losing one never makes the sender or the relay
//! skip the frames after it.
//!
//! The sender waits for room before queuing a frame (see `Call::send_stream`): a file is
//! read as fast as the path carries it (up to `--media-kbps`), a live pipe at its own pace.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use natcall::{Call, Track};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// MPEG-TS packet size and sync byte.
const TS_PACKET: usize = 188;
const TS_SYNC: u8 = 0x47;
/// Largest frame cut from a byte stream: three full media packets of 478 payload bytes.
pub const FRAME_MAX: usize = 3 * 478;
/// Largest frame cut from an MPEG-TS stream: 7 TS packets (three media packets).
pub const TS_FRAME_MAX: usize = 7 * TS_PACKET;

/// Cuts a byte stream into frames.
#[derive(Debug, Default)]
pub struct Cutter {
    buf: Vec<u8>,
    /// `None` until enough bytes decide whether the stream is MPEG-TS.
    ts: Option<bool>,
}

impl Cutter {
    /// Takes the bytes of one read; returns the frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(bytes);
        if self.ts.is_none() {
            if self.buf.len() > TS_PACKET {
                self.ts = Some(self.buf[0] == TS_SYNC && self.buf[TS_PACKET] == TS_SYNC);
            } else if self.buf.first().is_some_and(|b| *b != TS_SYNC) {
                self.ts = Some(false);
            } else {
                // Could still be MPEG-TS: wait for the second sync byte.
                return Vec::new();
            }
        }
        let (unit, max) = if self.ts == Some(true) {
            (TS_PACKET, TS_FRAME_MAX)
        } else {
            (1, FRAME_MAX)
        };
        let usable = self.buf.len() / unit * unit;
        let frames = self.buf[..usable].chunks(max).map(<[u8]>::to_vec).collect();
        self.buf.drain(..usable);
        frames
    }

    /// At the end of the stream: what is left (a partial TS packet, or a short stream).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

/// Sends `input` on `track` until it ends; returns the bytes sent (also added to `counter` as
/// they go, so a report made mid-stream counts them).
pub async fn send(
    call: &Call,
    track: Track,
    mut input: impl AsyncRead + Unpin,
    what: &str,
    counter: &AtomicU64,
) -> Result<u64> {
    let mut cutter = Cutter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).await.with_context(|| format!("reading {what}"))?;
        let frames = if n == 0 {
            cutter.finish().into_iter().collect()
        } else {
            cutter.push(&buf[..n])
        };
        for f in frames {
            let len = f.len() as u64;
            call.send_stream(track, f)
                .await
                .with_context(|| format!("sending {what}"))?;
            total += len;
            counter.fetch_add(len, Ordering::Relaxed);
        }
        if n == 0 {
            return Ok(total);
        }
    }
}

/// Where one received track goes.
pub struct Output {
    what: String,
    out: Box<dyn AsyncWrite + Unpin + Send>,
    /// Bytes written.
    pub written: u64,
}

impl Output {
    /// `-` is stdout; anything else a file, appended to (it was emptied when the program started).
    pub async fn open(spec: &str, what: &str) -> Result<Self> {
        let out: Box<dyn AsyncWrite + Unpin + Send> = if spec == "-" {
            Box::new(tokio::io::BufWriter::new(tokio::io::stdout()))
        } else {
            let f = tokio::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(spec)
                .await
                .with_context(|| format!("opening {spec} for {what}"))?;
            Box::new(tokio::io::BufWriter::new(f))
        };
        Ok(Self {
            what: what.to_owned(),
            out,
            written: 0,
        })
    }

    /// Writes one frame.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(data)
            .await
            .with_context(|| format!("writing {}", self.what))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Flushes what is buffered.
    pub async fn flush(&mut self) -> Result<()> {
        self.out.flush().await.with_context(|| format!("writing {}", self.what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let mut p = vec![i as u8; TS_PACKET];
                p[0] = TS_SYNC;
                p
            })
            .collect()
    }

    #[test]
    fn mpeg_ts_is_cut_on_packet_boundaries_and_nothing_is_lost() {
        let stream = ts(40);
        let mut c = Cutter::default();
        let mut frames = Vec::new();
        // Reads of awkward sizes.
        for chunk in stream.chunks(1000) {
            frames.extend(c.push(chunk));
        }
        frames.extend(c.finish());
        for f in &frames {
            assert_eq!(f.len() % TS_PACKET, 0, "a frame of {} bytes", f.len());
            assert!(f.len() <= TS_FRAME_MAX);
            assert_eq!(f[0], TS_SYNC);
        }
        assert_eq!(frames.concat(), stream);
    }

    #[test]
    fn other_streams_are_cut_by_reads_and_a_short_stream_survives() {
        let mut c = Cutter::default();
        let frames = c.push(&[1u8; 3000]);
        assert_eq!(frames.iter().map(Vec::len).collect::<Vec<_>>(), [1434, 1434, 132]);
        assert_eq!(c.finish(), None);

        // A stream shorter than one TS packet that starts like one is sent at the end.
        let mut c = Cutter::default();
        assert!(c.push(&[TS_SYNC, 1, 2]).is_empty());
        assert_eq!(c.finish(), Some(vec![TS_SYNC, 1, 2]));
    }

    #[test]
    fn a_partial_ts_packet_waits_for_the_rest() {
        let stream = ts(3);
        let mut c = Cutter::default();
        assert_eq!(c.push(&stream[..300]).concat(), &stream[..188]);
        assert_eq!(c.push(&stream[300..]).concat(), &stream[188..]);
        assert_eq!(c.finish(), None);
    }
}
