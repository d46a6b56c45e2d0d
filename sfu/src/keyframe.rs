//! Keyframes: recognising one in a VP8, VP9, H.264 or AV1 packet, and asking publishers for one without
//! flooding them.
//!
//! A subscriber can only start decoding at a keyframe, so each new subscription waits for one
//! and the room asks the publisher. Several subscribers arriving together, or a subscriber
//! that keeps asking, must still cost the publisher at most one request per interval: each
//! request makes the encoder spend bits on a large frame.

use std::time::{Duration, Instant};

/// The shortest time between two keyframe requests for one published track.
pub const MIN_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

/// Per published video track: when the last keyframe request went out.
#[derive(Debug, Default)]
pub struct KeyframeThrottle {
    last_request: Option<Instant>,
}

impl KeyframeThrottle {
    /// Whether a request may go out now; if so, it counts as sent.
    pub fn try_request(&mut self, now: Instant) -> bool {
        let allowed = self
            .last_request
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_REQUEST_INTERVAL);
        if allowed {
            self.last_request = Some(now);
        }
        allowed
    }
}

/// Whether a VP9 RTP payload starts a keyframe: the first packet of a frame (B bit) that is
/// not inter-predicted (P bit clear), in the lowest spatial layer when layers are signalled.
pub fn is_vp9_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let picture_id = first & 0x80 != 0;
    let inter = first & 0x40 != 0;
    let layers = first & 0x20 != 0;
    let begins = first & 0x08 != 0;
    if inter || !begins {
        return false;
    }
    if !layers {
        return true;
    }
    let mut at = 1;
    if picture_id {
        let Some(&pid) = payload.get(at) else {
            return false;
        };
        at += if pid & 0x80 != 0 { 2 } else { 1 };
    }
    // Layer indices: TID(3) U(1) SID(3) D(1).
    payload.get(at).is_some_and(|l| (l >> 1) & 0x07 == 0)
}

/// Whether an H.264 RTP payload (RFC 6184) carries the start of an IDR picture or the
/// parameter sets that precede one: a single NAL unit, a STAP-A or the first FU-A fragment.
pub fn is_h264_keyframe_start(payload: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1f {
        t @ 1..=23 => t == IDR || t == SPS,
        24 => {
            let mut at = 1;
            while let Some(len) = payload.get(at..at + 2) {
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                let Some(&nal) = payload.get(at + 2) else {
                    return false;
                };
                if matches!(nal & 0x1f, IDR | SPS) {
                    return true;
                }
                at += 2 + len;
            }
            false
        }
        28 => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && fu & 0x1f == IDR),
        _ => false,
    }
}

/// Whether an AV1 RTP payload starts a new coded video sequence (its N bit), which is how a
/// keyframe begins, and is not the continuation of an earlier fragment (Z bit clear).
pub fn is_av1_keyframe_start(payload: &[u8]) -> bool {
    payload
        .first()
        .is_some_and(|h| h & 0x08 != 0 && h & 0x80 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_vp8_keyframe_start(payload: &[u8]) -> bool {
        crate::vp8::Descriptor::parse(payload).is_some_and(|d| d.is_keyframe_start(payload))
    }

    #[test]
    fn throttle_allows_one_request_per_interval() {
        let t0 = Instant::now();
        let mut throttle = KeyframeThrottle::default();
        assert!(throttle.try_request(t0));
        assert!(!throttle.try_request(t0 + Duration::from_millis(10)));
        assert!(!throttle.try_request(t0 + Duration::from_millis(499)));
        assert!(throttle.try_request(t0 + MIN_REQUEST_INTERVAL));
    }

    #[test]
    fn vp9_h264_and_av1_keyframes_are_recognised() {
        // VP9: B=1, P=0, no layer indices; then P=1; then B=0.
        assert!(is_vp9_keyframe_start(&[0x08]));
        assert!(!is_vp9_keyframe_start(&[0x48]));
        assert!(!is_vp9_keyframe_start(&[0x00]));
        // VP9 with a 15-bit picture id and layer indices: SID 0 starts, SID 1 does not.
        assert!(is_vp9_keyframe_start(&[0xa8, 0x81, 0x02, 0x00]));
        assert!(!is_vp9_keyframe_start(&[0xa8, 0x81, 0x02, 0x02]));
        assert!(!is_vp9_keyframe_start(&[0xa8, 0x81]));

        // H.264: an IDR slice, an SPS, a non-IDR slice.
        assert!(is_h264_keyframe_start(&[0x65, 0x88]));
        assert!(is_h264_keyframe_start(&[0x67, 0x42]));
        assert!(!is_h264_keyframe_start(&[0x41, 0x9a]));
        // STAP-A with SPS and PPS; STAP-A with a truncated length.
        assert!(is_h264_keyframe_start(&[
            0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xce
        ]));
        assert!(!is_h264_keyframe_start(&[0x78, 0x00]));
        // FU-A: first fragment of an IDR, a middle fragment, a first fragment of a P slice.
        assert!(is_h264_keyframe_start(&[0x7c, 0x85, 0x00]));
        assert!(!is_h264_keyframe_start(&[0x7c, 0x05, 0x00]));
        assert!(!is_h264_keyframe_start(&[0x7c, 0x81, 0x00]));

        // AV1: N=1 starts a sequence; Z=1 continues a fragment.
        assert!(is_av1_keyframe_start(&[0x18]));
        assert!(!is_av1_keyframe_start(&[0x10]));
        assert!(!is_av1_keyframe_start(&[0x88]));
        assert!(!is_av1_keyframe_start(&[]));
    }

    #[test]
    fn vp8_keyframe_is_recognised_with_and_without_descriptor_extensions() {
        // S=1, PID=0, no extension; VP8 header byte with P=0 (keyframe).
        assert!(is_vp8_keyframe_start(&[0x10, 0x00, 0x00, 0x00]));
        // Same but P=1: an interframe.
        assert!(!is_vp8_keyframe_start(&[0x10, 0x01]));
        // X=1 with a two-byte PictureID, TL0PICIDX and TID present.
        assert!(is_vp8_keyframe_start(&[
            0x90, 0xE0, 0x81, 0x23, 0x05, 0x40, 0x9c
        ]));
        assert!(!is_vp8_keyframe_start(&[
            0x90, 0xE0, 0x81, 0x23, 0x05, 0x40, 0x9d
        ]));
        // Not the start of a frame.
        assert!(!is_vp8_keyframe_start(&[0x00, 0x00]));
        // Truncated payloads are not keyframes and do not panic.
        assert!(!is_vp8_keyframe_start(&[]));
        assert!(!is_vp8_keyframe_start(&[0x90, 0x80]));
    }
}
