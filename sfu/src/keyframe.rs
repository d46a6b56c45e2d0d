//! Keyframes: recognising one in a VP8 packet, and asking publishers for one without
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

/// Whether a VP8 RTP payload (RFC 7741) starts a keyframe.
///
/// Only the first packet of a frame (S bit set, partition 0) carries the VP8 frame header,
/// whose lowest bit is 0 for a keyframe.
pub fn is_vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let extended = first & 0x80 != 0;
    let start = first & 0x10 != 0;
    let partition = first & 0x07;
    if !start || partition != 0 {
        return false;
    }

    // Skip the optional payload descriptor fields to reach the VP8 payload header.
    let mut at = 1;
    if extended {
        let Some(&x) = payload.get(1) else {
            return false;
        };
        at = 2;
        if x & 0x80 != 0 {
            // PictureID: one byte, or two when its M bit is set.
            let Some(&pid) = payload.get(at) else {
                return false;
            };
            at += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            at += 1; // TID / KEYIDX
        }
    }
    payload.get(at).is_some_and(|h| h & 0x01 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
