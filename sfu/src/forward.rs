//! One published track on its way to one subscriber.
//!
//! The subscriber sees a stream of its own: sequence numbers start low (so the SRTP rollover
//! counter starts at zero, which the receiver assumes) and advance exactly as the publisher's
//! do, so gaps stay gaps and the subscriber's NACKs name real packets. Video starts at a
//! keyframe; nothing before it could be decoded.

use crate::TrackKind;

/// Where output sequence numbers start. Low, and not zero, so the rollover counter is zero
/// for the first 65 000 packets and a reordered earlier packet cannot go below it.
const FIRST_OUT_SEQ: u64 = 1000;

#[derive(Debug)]
pub struct Forwarder {
    kind: TrackKind,
    /// `out = in - first_in + FIRST_OUT_SEQ`, fixed at the first forwarded packet.
    first_in: Option<u64>,
}

impl Forwarder {
    pub fn new(kind: TrackKind) -> Self {
        Forwarder {
            kind,
            first_in: None,
        }
    }

    /// True while a video subscription has not yet seen its first keyframe.
    pub fn is_waiting_for_keyframe(&self) -> bool {
        self.kind == TrackKind::Video && self.first_in.is_none()
    }

    /// The outgoing sequence number for an incoming packet, or `None` to drop it.
    pub fn accept(&mut self, in_seq: u64, is_keyframe_start: bool) -> Option<u64> {
        let first = match self.first_in {
            Some(first) => first,
            None if self.kind == TrackKind::Audio || is_keyframe_start => {
                self.first_in = Some(in_seq);
                in_seq
            }
            None => return None,
        };
        // Packets from before the start (reordered or retransmitted) are not wanted.
        let offset = in_seq.checked_sub(first)?;
        Some(offset + FIRST_OUT_SEQ)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn video_waits_for_a_keyframe_then_keeps_gaps() {
        let mut f = Forwarder::new(TrackKind::Video);
        assert!(f.is_waiting_for_keyframe());
        assert_eq!(f.accept(70_000, false), None);
        assert_eq!(f.accept(70_001, true), Some(FIRST_OUT_SEQ));
        assert!(!f.is_waiting_for_keyframe());
        assert_eq!(f.accept(70_002, false), Some(FIRST_OUT_SEQ + 1));
        // A lost packet stays a gap, so NACKs from the subscriber name the right packet.
        assert_eq!(f.accept(70_005, false), Some(FIRST_OUT_SEQ + 4));
        // Late packets from before the start are dropped.
        assert_eq!(f.accept(70_000, false), None);
    }

    #[test]
    fn audio_starts_at_once() {
        let mut f = Forwarder::new(TrackKind::Audio);
        assert!(!f.is_waiting_for_keyframe());
        assert_eq!(f.accept(5, false), Some(FIRST_OUT_SEQ));
        assert_eq!(f.accept(6, false), Some(FIRST_OUT_SEQ + 1));
    }
}
