//! One published track on its way to one subscriber.
//!
//! The subscriber sees one stream of its own whatever the publisher sends: sequence numbers
//! start low (so the SRTP rollover counter starts at zero, which the receiver assumes) and
//! advance exactly as the publisher's do, so gaps stay gaps and the subscriber's NACKs name
//! real packets. Video starts at a keyframe; nothing before it could be decoded.
//!
//! A simulcast track arrives as up to three layers, each with its own sequence numbers, RTP
//! timestamps and VP8 picture ids. The forwarder sends one layer at a time and moves to
//! another only at a keyframe of that layer; until the keyframe arrives it keeps forwarding
//! the layer it has, so a switch never stalls the picture. When the wish changes again
//! before the keyframe, the latest wish is the one waited for. At a switch the outgoing
//! sequence numbers, timestamps and picture ids carry on from where the old layer left them,
//! so the subscriber's decoder sees one continuous stream.

use std::time::Instant;

use crate::layer::Layer;
use crate::TrackKind;

/// Where output sequence numbers start. Low, and not zero, so the rollover counter is zero
/// for the first 65 000 packets and a reordered earlier packet cannot go below it.
const FIRST_OUT_SEQ: u64 = 1000;

/// RTP clock rate of every video codec Haven forwards.
const VIDEO_CLOCK_HZ: u64 = 90_000;

/// What the forwarder should send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// This layer (for a track without simulcast, its only layer, [`Layer::High`]).
    Layer(Layer),
    /// Nothing: video paused (audio-only, or the video is not shown).
    Paused,
}

/// An incoming packet as the forwarder needs to see it.
#[derive(Clone, Copy, Debug)]
pub struct InPacket {
    pub layer: Layer,
    /// Extended sequence number within its layer.
    pub seq: u64,
    pub timestamp: u32,
    pub keyframe_start: bool,
    pub arrival: Instant,
}

/// How to write a forwarded packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutPacket {
    pub seq: u64,
    pub timestamp: u32,
    /// Added to the VP8 picture id (and TL0PICIDX) of the payload, modulo their width.
    pub picture_id_offset: u16,
    pub tl0_offset: u8,
    /// The first packet after a layer switch (or the very first packet).
    pub switched: bool,
}

/// Where the current layer's numbering maps onto the outgoing stream.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    layer: Layer,
    /// `out = in + seq_offset` (wrapping on u64, which never wraps in practice).
    seq_offset: u64,
    /// `out = in + ts_offset` (wrapping u32, like RTP timestamps).
    ts_offset: u32,
    /// The first incoming sequence number of this mapping; earlier ones are dropped.
    first_in: u64,
}

/// The state of one subscription: which layer flows and how it is renumbered.
#[derive(Debug)]
pub struct Forwarder {
    kind: TrackKind,
    want: Want,
    /// Whether anything chose `want` yet; until then it is the default.
    decided: bool,
    current: Option<Mapping>,
    /// The last packet written out: its sequence number, timestamp and when it arrived.
    last_out: Option<(u64, u32, Instant)>,
    /// VP8 picture id and TL0PICIDX last written, and the offsets currently applied.
    last_picture_id: Option<u16>,
    last_tl0: Option<u8>,
    picture_id_offset: u16,
    tl0_offset: u8,
    switches: u64,
}

impl Forwarder {
    pub fn new(kind: TrackKind) -> Self {
        Forwarder {
            kind,
            want: Want::Layer(Layer::High),
            decided: false,
            current: None,
            last_out: None,
            last_picture_id: None,
            last_tl0: None,
            picture_id_offset: 0,
            tl0_offset: 0,
            switches: 0,
        }
    }

    /// What the subscriber should get, once decided.
    pub fn wanted(&self) -> Option<Want> {
        self.decided.then_some(self.want)
    }

    /// Sets what the subscriber should get. A different layer is taken at its next keyframe;
    /// pausing takes effect at once; resuming waits for a keyframe.
    pub fn set_want(&mut self, want: Want) {
        if self.kind == TrackKind::Audio {
            return;
        }
        self.decided = true;
        self.want = want;
        if want == Want::Paused {
            self.current = None;
        }
    }

    /// Whether the wanted layer is still the default, chosen by nobody.
    pub fn is_undecided(&self) -> bool {
        !self.decided
    }

    /// True for a video that is not being sent (audio-only, or not shown).
    pub fn is_paused(&self) -> bool {
        self.kind == TrackKind::Video && self.want == Want::Paused
    }

    /// The layer being forwarded now, if any.
    pub fn current_layer(&self) -> Option<Layer> {
        self.current.map(|m| m.layer)
    }

    /// How many times the forwarded layer changed (the first start not counted).
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// True while a video subscription waits for a keyframe of the layer it wants: at the
    /// start, after a resume, or during a switch.
    pub fn is_waiting_for_keyframe(&self) -> bool {
        match (self.kind, self.want) {
            (TrackKind::Audio, _) | (_, Want::Paused) => false,
            (TrackKind::Video, Want::Layer(l)) => self.current.is_none_or(|m| m.layer != l),
        }
    }

    /// The layer whose keyframe this subscription waits for.
    pub fn waiting_for(&self) -> Option<Layer> {
        match self.want {
            Want::Layer(l) if self.is_waiting_for_keyframe() => Some(l),
            _ => None,
        }
    }

    /// Decides whether `pkt` goes to the subscriber and how it is renumbered. `picture_id`
    /// and `tl0` are the VP8 fields of the packet when present.
    pub fn accept(
        &mut self,
        pkt: InPacket,
        picture_id: Option<u16>,
        tl0: Option<u8>,
    ) -> Option<OutPacket> {
        if self.kind == TrackKind::Audio {
            return self.accept_audio(pkt);
        }
        let Want::Layer(wanted) = self.want else {
            return None;
        };
        let mut switched = false;
        if pkt.layer == wanted
            && pkt.keyframe_start
            && self.current.is_none_or(|m| m.layer != wanted)
        {
            self.start_mapping(pkt, picture_id, tl0);
            switched = true;
        }
        let m = self.current?;
        if pkt.layer != m.layer || pkt.seq < m.first_in {
            // Another layer, or a reordered or retransmitted packet from before the start.
            return None;
        }
        let out = OutPacket {
            seq: pkt.seq.wrapping_add(m.seq_offset),
            timestamp: pkt.timestamp.wrapping_add(m.ts_offset),
            picture_id_offset: self.picture_id_offset,
            tl0_offset: self.tl0_offset,
            switched,
        };
        self.note_out(out, pkt.arrival, picture_id, tl0);
        Some(out)
    }

    fn accept_audio(&mut self, pkt: InPacket) -> Option<OutPacket> {
        let m = match self.current {
            Some(m) => m,
            None => {
                let m = Mapping {
                    layer: pkt.layer,
                    seq_offset: FIRST_OUT_SEQ.wrapping_sub(pkt.seq),
                    ts_offset: 0,
                    first_in: pkt.seq,
                };
                self.current = Some(m);
                m
            }
        };
        if pkt.seq < m.first_in {
            return None;
        }
        Some(OutPacket {
            seq: pkt.seq.wrapping_add(m.seq_offset),
            timestamp: pkt.timestamp,
            picture_id_offset: 0,
            tl0_offset: 0,
            switched: false,
        })
    }

    /// Maps the keyframe `pkt` of a new layer right after the last packet written.
    fn start_mapping(&mut self, pkt: InPacket, picture_id: Option<u16>, tl0: Option<u8>) {
        let (next_seq, ts_offset) = match self.last_out {
            None => (FIRST_OUT_SEQ, 0),
            Some((seq, ts, at)) => {
                // The new layer's clock is unrelated to the old one's: place its first frame
                // after the last one sent by the time that passed, at least one tick.
                let elapsed = pkt.arrival.saturating_duration_since(at);
                let ticks = (elapsed.as_micros() as u64 * VIDEO_CLOCK_HZ / 1_000_000).max(1);
                let next_ts = ts.wrapping_add(ticks as u32);
                (seq + 1, next_ts.wrapping_sub(pkt.timestamp))
            }
        };
        if self.current.is_some() || self.last_out.is_some() {
            self.switches += 1;
        }
        self.current = Some(Mapping {
            layer: pkt.layer,
            seq_offset: next_seq.wrapping_sub(pkt.seq),
            ts_offset,
            first_in: pkt.seq,
        });
        // Picture ids continue from the last one written: the keyframe gets the next one.
        if let (Some(last), Some(pid)) = (self.last_picture_id, picture_id) {
            self.picture_id_offset = last.wrapping_add(1).wrapping_sub(pid) & 0x7fff;
        }
        if let (Some(last), Some(t)) = (self.last_tl0, tl0) {
            self.tl0_offset = last.wrapping_add(1).wrapping_sub(t);
        }
    }

    fn note_out(&mut self, out: OutPacket, at: Instant, picture_id: Option<u16>, tl0: Option<u8>) {
        let newer = self.last_out.is_none_or(|(seq, _, _)| out.seq > seq);
        if newer {
            self.last_out = Some((out.seq, out.timestamp, at));
            if let Some(pid) = picture_id {
                self.last_picture_id = Some(pid.wrapping_add(self.picture_id_offset) & 0x7fff);
            }
            if let Some(t) = tl0 {
                self.last_tl0 = Some(t.wrapping_add(self.tl0_offset));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn video(layer: Layer, seq: u64, ts: u32, key: bool, at: Instant) -> InPacket {
        InPacket {
            layer,
            seq,
            timestamp: ts,
            keyframe_start: key,
            arrival: at,
        }
    }

    #[test]
    fn video_waits_for_a_keyframe_then_keeps_gaps() {
        let t = Instant::now();
        let mut f = Forwarder::new(TrackKind::Video);
        assert!(f.is_waiting_for_keyframe());
        let hi = Layer::High;
        assert_eq!(f.accept(video(hi, 70_000, 0, false, t), None, None), None);
        let first = f
            .accept(video(hi, 70_001, 0, true, t), None, None)
            .expect("forwarded");
        assert_eq!(first.seq, FIRST_OUT_SEQ);
        assert!(!f.is_waiting_for_keyframe());
        let next = f
            .accept(video(hi, 70_002, 0, false, t), None, None)
            .expect("forwarded");
        assert_eq!(next.seq, FIRST_OUT_SEQ + 1);
        // A lost packet stays a gap, so NACKs from the subscriber name the right packet.
        let after_gap = f
            .accept(video(hi, 70_005, 0, false, t), None, None)
            .expect("forwarded");
        assert_eq!(after_gap.seq, FIRST_OUT_SEQ + 4);
        // Late packets from before the start are dropped.
        assert_eq!(f.accept(video(hi, 70_000, 0, false, t), None, None), None);
    }

    #[test]
    fn audio_starts_at_once() {
        let t = Instant::now();
        let mut f = Forwarder::new(TrackKind::Audio);
        assert!(!f.is_waiting_for_keyframe());
        let a = |seq| video(Layer::High, seq, 960, false, t);
        assert_eq!(
            f.accept(a(5), None, None).expect("forwarded").seq,
            FIRST_OUT_SEQ
        );
        assert_eq!(
            f.accept(a(6), None, None).expect("forwarded").seq,
            FIRST_OUT_SEQ + 1
        );
        // Pausing never applies to audio.
        f.set_want(Want::Paused);
        assert_eq!(
            f.accept(a(7), None, None).expect("forwarded").seq,
            FIRST_OUT_SEQ + 2
        );
    }

    #[test]
    fn switch_happens_at_the_keyframe_and_numbering_carries_on() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut f = Forwarder::new(TrackKind::Video);
        f.set_want(Want::Layer(Layer::Low));
        let low = |seq, ts, key, at| video(Layer::Low, seq, ts, key, at);
        let high = |seq, ts, key, at| video(Layer::High, seq, ts, key, at);

        let a = f.accept(low(500, 10_000, true, ms(0)), Some(100), Some(7));
        assert_eq!(a.expect("forwarded").seq, FIRST_OUT_SEQ);
        f.accept(low(501, 13_000, false, ms(33)), Some(101), Some(8))
            .expect("forwarded");

        // Wish changes to high: low keeps flowing until high's keyframe.
        f.set_want(Want::Layer(Layer::High));
        assert_eq!(f.waiting_for(), Some(Layer::High));
        assert_eq!(
            f.accept(high(9_000, 700_000, false, ms(40)), Some(5_000), Some(1)),
            None
        );
        let still_low = f.accept(low(502, 16_000, false, ms(66)), Some(102), Some(9));
        assert_eq!(still_low.expect("forwarded").seq, FIRST_OUT_SEQ + 2);

        // High's keyframe: the switch, continuing numbering and picture ids.
        let sw = f
            .accept(high(9_010, 703_000, true, ms(99)), Some(5_010), Some(3))
            .expect("forwarded");
        assert!(sw.switched);
        assert_eq!(sw.seq, FIRST_OUT_SEQ + 3);
        // 33 ms after the last packet written: 2970 ticks at 90 kHz.
        assert_eq!(sw.timestamp, 16_000 + 2_970);
        assert_eq!((5_010u16 + sw.picture_id_offset) & 0x7fff, 103);
        assert_eq!(3u8.wrapping_add(sw.tl0_offset), 10);
        assert_eq!(f.current_layer(), Some(Layer::High));
        assert_eq!(f.switches(), 1);

        // The old layer is dropped now; the new one keeps its own gaps.
        assert_eq!(
            f.accept(low(503, 19_000, false, ms(100)), Some(103), Some(10)),
            None
        );
        let n = f
            .accept(high(9_012, 706_000, false, ms(133)), Some(5_011), Some(3))
            .expect("forwarded");
        assert_eq!(n.seq, FIRST_OUT_SEQ + 5);
        assert_eq!(n.timestamp, 16_000 + 2_970 + 3_000);
    }

    #[test]
    fn the_latest_wish_wins_and_forwarding_never_stalls() {
        let t = Instant::now();
        let mut f = Forwarder::new(TrackKind::Video);
        f.set_want(Want::Layer(Layer::Medium));
        f.accept(video(Layer::Medium, 1, 0, true, t), None, None)
            .expect("forwarded");
        f.set_want(Want::Layer(Layer::High));
        f.set_want(Want::Layer(Layer::Low));
        // High's keyframe no longer matters; medium keeps flowing meanwhile.
        assert_eq!(
            f.accept(video(Layer::High, 50, 0, true, t), None, None),
            None
        );
        assert!(f
            .accept(video(Layer::Medium, 2, 0, false, t), None, None)
            .is_some());
        let sw = f
            .accept(video(Layer::Low, 80, 0, true, t), None, None)
            .expect("forwarded");
        assert!(sw.switched);
        assert_eq!(sw.seq, FIRST_OUT_SEQ + 2);
        // Wishing for the layer already flowing needs no keyframe.
        f.set_want(Want::Layer(Layer::Low));
        assert!(!f.is_waiting_for_keyframe());
    }

    #[test]
    fn pause_stops_at_once_and_resume_waits_for_a_keyframe() {
        let t = Instant::now();
        let mut f = Forwarder::new(TrackKind::Video);
        f.accept(video(Layer::High, 10, 0, true, t), None, None)
            .expect("forwarded");
        f.set_want(Want::Paused);
        assert!(!f.is_waiting_for_keyframe());
        assert_eq!(
            f.accept(video(Layer::High, 11, 0, false, t), None, None),
            None
        );
        f.set_want(Want::Layer(Layer::High));
        assert!(f.is_waiting_for_keyframe());
        assert_eq!(
            f.accept(video(Layer::High, 12, 0, false, t), None, None),
            None
        );
        let back = f
            .accept(video(Layer::High, 20, 0, true, t), None, None)
            .expect("forwarded");
        // Numbering continues right after the last packet written before the pause.
        assert_eq!(back.seq, FIRST_OUT_SEQ + 1);
    }
}
