//! Synthetic media shaped like a browser's.
//!
//! Video is VP8 as RFC 7741 carries it: every packet starts with a payload descriptor (with a
//! 15-bit PictureID), the first packet of a frame holds the VP8 frame header (RFC 6386), and
//! a keyframe's header has the start code and picture size. Servers read that header to find
//! keyframes; nothing reads the rest. Frames are cut into packets of at most
//! [`MAX_PAYLOAD`] bytes, sized so the frame rate and bitrate come out as configured, with a
//! keyframe now and then that is several times a normal frame.
//!
//! With simulcast a publisher sends the same video three times, as browsers do: layers "q", "h"
//! and "f" ([`SIMULCAST_RIDS`], lowest first) at a tenth, a third and all of the configured
//! bitrate, each its own RTP stream with its own rid, packets and keyframes.
//!
//! Every payload ends with a [`Trailer`]: publisher, kind, simulcast layer, a per-stream
//! sequence number and the send time. The end is used rather than a fixed offset so the receiver needs no codec
//! parsing, and neither Haven nor Janus touches payload bytes.

use std::time::Duration;

/// The largest payload we send: with a 12-byte RTP header, a few bytes of header extensions
/// and the SRTP tag, a packet stays under 1200 bytes, as browsers keep it.
pub const MAX_PAYLOAD: usize = 1_140;

const MAGIC: [u8; 4] = *b"HVNB";

/// Magic, publisher, kind, layer, sequence number, send time.
pub const TRAILER_LEN: usize = 4 + 4 + 1 + 1 + 4 + 8;

/// The rids of the simulcast layers, lowest first (browsers' usual names: quarter, half, full).
pub const SIMULCAST_RIDS: [&str; 3] = ["q", "h", "f"];

/// Each simulcast layer's bitrate is the configured bitrate divided by this: 150, 500 and
/// 1,500 kbit/s at the default 1.5 Mbit/s.
const LAYER_BITRATE_DIVISORS: [u64; 3] = [10, 3, 1];

/// The picture size each simulcast layer's keyframes announce, and the size without simulcast.
const LAYER_PICTURES: [(u16, u16); 3] = [(320, 180), (640, 360), (1280, 720)];
const SINGLE_PICTURE: (u16, u16) = (640, 360);

/// The trailer's layer byte for a stream that is not a simulcast layer (audio, or video
/// without simulcast).
const NO_LAYER: u8 = 0xFF;

/// A keyframe is this many times an average frame.
const KEYFRAME_FACTOR: usize = 4;

/// The smallest frame, so that headers and trailer always fit.
const MIN_FRAME: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Audio,
    Video,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Audio => 0xA0,
            Kind::Video => 0x0D,
        }
    }

    pub fn index(self) -> usize {
        match self {
            Kind::Audio => 0,
            Kind::Video => 1,
        }
    }
}

/// What every payload ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Unique across the run (not per room), so a misrouted packet shows.
    pub publisher: u32,
    pub kind: Kind,
    /// The simulcast layer (index into [`SIMULCAST_RIDS`]); `None` for audio and for video
    /// without simulcast.
    pub layer: Option<u8>,
    /// Per publisher, kind and layer, from 0, one per packet.
    pub seq: u32,
    /// Nanoseconds since the run's epoch (see `stats::Clock`).
    pub sent_ns: u64,
}

impl Trailer {
    /// Overwrites the last [`TRAILER_LEN`] bytes of `payload`.
    pub fn write(&self, payload: &mut [u8]) {
        let n = payload.len();
        let t = &mut payload[n - TRAILER_LEN..];
        t[..4].copy_from_slice(&MAGIC);
        t[4..8].copy_from_slice(&self.publisher.to_be_bytes());
        t[8] = self.kind.code();
        t[9] = self.layer.unwrap_or(NO_LAYER);
        t[10..14].copy_from_slice(&self.seq.to_be_bytes());
        t[14..22].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    pub fn read(payload: &[u8]) -> Option<Trailer> {
        let n = payload.len();
        let t = payload.get(n.checked_sub(TRAILER_LEN)?..)?;
        if t[..4] != MAGIC {
            return None;
        }
        let kind = match t[8] {
            0xA0 => Kind::Audio,
            0x0D => Kind::Video,
            _ => return None,
        };
        let layer = match t[9] {
            NO_LAYER => None,
            l if usize::from(l) < SIMULCAST_RIDS.len() => Some(l),
            _ => return None,
        };
        let u32_at = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&t[14..22]);
        Some(Trailer {
            publisher: u32_at(4),
            kind,
            layer,
            seq: u32_at(10),
            sent_ns: u64::from_be_bytes(ns),
        })
    }
}

/// How the synthetic video looks.
#[derive(Clone, Copy, Debug)]
pub struct VideoShape {
    pub bitrate_bps: u64,
    pub fps: u32,
    /// A keyframe at least this often, requested or not.
    pub keyframe_interval: Duration,
}

impl VideoShape {
    pub fn frame_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / f64::from(self.fps.max(1)))
    }

    /// The shape of simulcast layer `index` (0 = "q", the lowest) when `self` is the top
    /// layer's: same frame rate and keyframe interval, a fraction of the bitrate.
    pub fn layer(&self, index: usize) -> VideoShape {
        let divisor = LAYER_BITRATE_DIVISORS.get(index).copied().unwrap_or(1);
        VideoShape {
            bitrate_bps: self.bitrate_bps / divisor,
            ..*self
        }
    }

    /// Payload bytes of a delta frame and of a keyframe, so that the average over one
    /// keyframe interval matches the bitrate.
    fn frame_sizes(&self) -> (usize, usize) {
        let avg = (self.bitrate_bps / 8 / u64::from(self.fps.max(1))) as usize;
        let per_interval =
            ((self.keyframe_interval.as_secs_f64() * f64::from(self.fps)).round() as usize).max(1);
        let key = (avg * KEYFRAME_FACTOR).max(MIN_FRAME);
        let delta = if per_interval > KEYFRAME_FACTOR {
            avg * (per_interval - KEYFRAME_FACTOR) / (per_interval - 1)
        } else {
            avg
        };
        (delta.max(MIN_FRAME), key)
    }
}

/// Produces VP8 frames as lists of RTP payloads.
#[derive(Debug)]
pub struct VideoSource {
    shape: VideoShape,
    /// Width and height written in keyframe headers.
    picture: (u16, u16),
    picture_id: u16,
    frames_since_key: u64,
    frames_per_key: u64,
}

impl VideoSource {
    /// A single video stream (no simulcast).
    pub fn new(shape: VideoShape) -> Self {
        Self::with_picture(shape, SINGLE_PICTURE)
    }

    /// Simulcast layer `index` (0 = "q") of a publisher whose top layer has shape `top`.
    pub fn simulcast_layer(top: VideoShape, index: usize) -> Self {
        let picture = LAYER_PICTURES.get(index).copied().unwrap_or(SINGLE_PICTURE);
        Self::with_picture(top.layer(index), picture)
    }

    fn with_picture(shape: VideoShape, picture: (u16, u16)) -> Self {
        let frames_per_key =
            (shape.keyframe_interval.as_secs_f64() * f64::from(shape.fps)).round() as u64;
        VideoSource {
            shape,
            picture,
            picture_id: 0,
            frames_since_key: u64::MAX,
            frames_per_key: frames_per_key.max(1),
        }
    }

    /// The next frame's payloads (trailer space zeroed) and whether it is a keyframe.
    /// `force_key` answers a keyframe request.
    pub fn next_frame(&mut self, force_key: bool) -> (Vec<Vec<u8>>, bool) {
        let key = force_key || self.frames_since_key >= self.frames_per_key - 1;
        self.frames_since_key = if key { 0 } else { self.frames_since_key + 1 };
        let (delta, key_size) = self.shape.frame_sizes();
        let size = if key { key_size } else { delta };

        let count = size.div_ceil(MAX_PAYLOAD - TRAILER_LEN - 4);
        let each = size / count;
        let [pid_hi, pid_lo] = self.picture_id.to_be_bytes();
        self.picture_id = (self.picture_id + 1) & 0x7FFF;

        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let first = i == 0;
            // X=1, S on the first packet only, PID=0; I=1 with a 15-bit PictureID (M=1).
            let mut p = Vec::with_capacity(each + 16);
            p.extend_from_slice(&[if first { 0x90 } else { 0x80 }, 0x80, 0x80 | pid_hi, pid_lo]);
            if first {
                // Frame tag: P bit (0 = keyframe), version 0, show_frame, first partition size.
                let partition = (size as u32).min(0x7_FFFF);
                let tag = (partition << 5) | (1 << 4) | u32::from(!key);
                p.extend_from_slice(&tag.to_le_bytes()[..3]);
                if key {
                    p.extend_from_slice(&[0x9D, 0x01, 0x2A]);
                    p.extend_from_slice(&self.picture.0.to_le_bytes());
                    p.extend_from_slice(&self.picture.1.to_le_bytes());
                }
            }
            let len = each.max(p.len() + TRAILER_LEN);
            fill(&mut p, len);
            out.push(p);
        }
        (out, key)
    }
}

/// An Opus packet of `len` bytes (trailer space zeroed): TOC byte for CELT fullband 20 ms.
pub fn audio_payload(len: usize) -> Vec<u8> {
    let mut p = vec![0xF8];
    fill(&mut p, len.max(1 + TRAILER_LEN));
    p
}

/// Pads with bytes that look like coded data, then zeroes for the trailer.
fn fill(p: &mut Vec<u8>, len: usize) {
    while p.len() < len - TRAILER_LEN {
        let i = p.len() as u32;
        p.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
    }
    p.resize(len, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_round_trips_at_the_end_of_any_payload() {
        let t = Trailer {
            publisher: 7,
            kind: Kind::Video,
            layer: Some(2),
            seq: 123_456,
            sent_ns: 9_876_543_210,
        };
        let mut p = audio_payload(100);
        t.write(&mut p);
        assert_eq!(p.len(), 100);
        assert_eq!(Trailer::read(&p), Some(t));
        assert_eq!(Trailer::read(&p[..10]), None);
        assert_eq!(Trailer::read(&p[..99]), None);
    }

    #[test]
    fn video_matches_the_bitrate_and_starts_with_a_keyframe() {
        let shape = VideoShape {
            bitrate_bps: 1_500_000,
            fps: 30,
            keyframe_interval: Duration::from_secs(3),
        };
        let mut src = VideoSource::new(shape);
        let mut bytes = 0;
        let mut keys = 0;
        for n in 0..90 {
            let (packets, key) = src.next_frame(false);
            if n == 0 {
                assert!(key, "the first frame is a keyframe");
                // Keyframe start: S bit, then the frame tag with P=0 after the 4-byte descriptor.
                assert_eq!(packets[0][0], 0x90);
                assert_eq!(packets[0][4] & 1, 0);
                assert_eq!(&packets[0][7..10], &[0x9D, 0x01, 0x2A]);
            }
            keys += usize::from(key);
            for p in &packets {
                assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
                bytes += p.len();
            }
        }
        assert_eq!(keys, 1);
        let bps = bytes as f64 * 8.0 / 3.0;
        assert!((bps / 1_500_000.0 - 1.0).abs() < 0.05, "{bps}");
        assert!(src.next_frame(true).1, "a request gets a keyframe at once");
    }

    #[test]
    fn audio_trailer_has_no_layer() {
        let t = Trailer {
            publisher: 3,
            kind: Kind::Audio,
            layer: None,
            seq: 1,
            sent_ns: 2,
        };
        let mut p = audio_payload(60);
        t.write(&mut p);
        assert_eq!(Trailer::read(&p), Some(t));
        // A layer byte that names no layer is not our trailer.
        let n = p.len();
        p[n - TRAILER_LEN + 9] = 7;
        assert_eq!(Trailer::read(&p), None);
    }

    #[test]
    fn simulcast_layers_scale_the_bitrate_and_start_with_keyframes() {
        let top = VideoShape {
            bitrate_bps: 1_500_000,
            fps: 30,
            keyframe_interval: Duration::from_secs(3),
        };
        let mut rates = Vec::new();
        for (i, (w, h)) in LAYER_PICTURES.iter().enumerate() {
            let mut src = VideoSource::simulcast_layer(top, i);
            let mut bytes = 0;
            for n in 0..90 {
                let (packets, key) = src.next_frame(false);
                assert_eq!(key, n == 0);
                if key {
                    // S bit and partition 0, then the frame tag with P = 0.
                    assert_eq!(packets[0][0] & 0x17, 0x10);
                    assert_eq!(packets[0][4] & 1, 0);
                    assert_eq!(&packets[0][10..12], &w.to_le_bytes());
                    assert_eq!(&packets[0][12..14], &h.to_le_bytes());
                }
                for p in &packets {
                    assert!(p.len() <= MAX_PAYLOAD);
                    bytes += p.len();
                }
            }
            rates.push(bytes as f64 * 8.0 / 3.0);
        }
        for (got, want) in rates.iter().zip([150_000.0, 500_000.0, 1_500_000.0]) {
            assert!((got / want - 1.0).abs() < 0.05, "{got} vs {want}");
        }
    }
}
