//! Redundant audio (RED, RFC 2198) through a room on simulated time: negotiated where both
//! ends list it, unwrapped to its primary Opus block for subscribers that do not.

use std::time::Duration;

use haven_sfu::sim::{marked, red_blocks, Received, SimRoom};
use haven_sfu::RoomEvent;

const STEP: Duration = Duration::from_millis(5);

/// The publisher's sequence number an audio payload names (see `sim::marked`).
fn sent_seq(payload: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[2..10]);
    u64::from_be_bytes(b)
}

/// The packet's timestamp minus the one the publisher gave it (960 ticks per packet): the
/// same for every packet when each goes on with its own timestamp.
fn timestamp_shifts(packets: &[&Received], seq_of: impl Fn(&Received) -> u64) -> Vec<u32> {
    let mut shifts: Vec<u32> = packets
        .iter()
        .map(|r| {
            let sent = ((seq_of(r) - 1) * 960) as u32;
            r.timestamp.wrapping_sub(sent)
        })
        .collect();
    shifts.dedup();
    shifts
}

#[test]
fn red_audio_reaches_red_subscribers_as_red_and_others_as_its_primary_opus() {
    let mut sim = SimRoom::new(3);
    // t-01 sends RED; p-02 knows no RED at all; p-03 receives RED but sends plain Opus.
    let red_pub = sim.join_with_red("t-01", false, true, true);
    let plain = sim.join_with_red("p-02", false, false, false);
    let red_sub = sim.join_with_red("p-03", false, false, true);
    // Loud enough to be the active speaker.
    sim.clients[red_pub].audio_level = Some(-20);
    sim.run(Duration::from_secs(6), STEP);

    // Negotiation: the room accepted the publisher's RED, offered RED to every subscriber,
    // and kept it only where the subscriber's answer listed it.
    let (pub_opus, pub_red) = sim.clients[red_pub].opus_pts(false).expect("opus");
    assert!(pub_red.is_some(), "the room's answer accepts RED");
    let (plain_opus, plain_red) = sim.clients[plain].opus_pts(true).expect("opus");
    assert_eq!(plain_red, None, "no RED toward a subscriber without it");
    let (sub_opus, sub_red) = sim.clients[red_sub].opus_pts(true).expect("opus");
    let sub_red = sub_red.expect("RED negotiated toward a subscriber with it");

    let t01 = sim.clients[red_pub].id.clone();

    // (a) The subscriber without RED gets plain Opus: its own Opus payload type, the primary
    // block alone (the payload the publisher wrapped), on the packet's own timestamp.
    let audio = sim.clients[plain].audio_from(&t01);
    assert!(audio.len() > 150, "{} audio packets", audio.len());
    for r in &audio {
        assert_eq!(r.pt, plain_opus, "plain Opus payload type");
        let seq = sent_seq(&r.payload);
        assert_eq!(r.payload, marked(0, seq, 120), "the primary block only");
    }
    assert_eq!(
        timestamp_shifts(&audio, |r| sent_seq(&r.payload)).len(),
        1,
        "timestamps follow the publisher's"
    );
    let seqs: Vec<u64> = audio.iter().map(|r| sent_seq(&r.payload)).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "no packet lost");

    // (b) The subscriber with RED gets RED as sent: the RED payload type, the previous
    // packet as a redundant block 960 ticks back, the primary last.
    let audio = sim.clients[red_sub].audio_from(&t01);
    assert!(audio.len() > 150, "{} audio packets", audio.len());
    let mut with_redundancy = 0;
    for r in &audio {
        assert_eq!(r.pt, sub_red, "RED payload type");
        let blocks = red_blocks(&r.payload).expect("valid RED");
        let (pt, offset, primary) = blocks.last().expect("a primary block");
        assert_eq!((*pt, *offset), (sub_opus, 0));
        let seq = sent_seq(primary);
        assert_eq!(*primary, marked(0, seq, 120));
        if seq > 1 {
            assert_eq!(blocks.len(), 2);
            assert_eq!(blocks[0], (sub_opus, 960, marked(0, seq - 1, 120)));
            with_redundancy += 1;
        }
    }
    assert!(with_redundancy > 150);
    assert_eq!(pub_opus, sub_opus, "same numbering on both sides here");

    // A publisher sending plain Opus reaches a RED subscriber as plain Opus.
    let p02 = sim.clients[plain].id.clone();
    let audio = sim.clients[red_sub].audio_from(&p02);
    assert!(audio.len() > 150, "{} audio packets", audio.len());
    for r in &audio {
        assert_eq!(r.pt, sub_opus);
        assert_eq!(r.payload, marked(1, sent_seq(&r.payload), 120));
    }

    // The audio level travels in the RTP header, outside the RED payload: the active
    // speaker is found from RED audio too.
    let speaker = sim
        .take_events()
        .into_iter()
        .any(|e| matches!(e, RoomEvent::ActiveSpeaker { participant: Some(p) } if p == t01));
    assert!(speaker, "the RED publisher became the active speaker");
}

#[test]
fn a_payload_type_of_the_other_kind_than_its_track_is_not_forwarded() {
    let mut sim = SimRoom::new(7);
    let odd = sim.join("t-01", false);
    let sub = sim.join("p-02", false);
    // t-01 sends every third video frame on its Opus payload type: audio on the video m-line.
    sim.clients[odd].video_as_opus = true;
    sim.run(Duration::from_secs(4), STEP);

    let t01 = sim.clients[odd].id.clone();
    let (sub_opus, _) = sim.clients[sub].opus_pts(true).expect("opus");
    // p-02's video track for t-01 carries only the frames sent as video, on one payload type
    // (VP8's), none as Opus.
    let video = sim.clients[sub].video_from(&t01);
    assert!(video.len() > 100, "{} video packets", video.len());
    let video_pts: std::collections::BTreeSet<u8> = video.iter().map(|r| r.pt).collect();
    assert_eq!(
        video_pts.len(),
        1,
        "payload types on the video track: {video_pts:?}"
    );
    assert!(!video_pts.contains(&sub_opus), "Opus on the video track");
    // And t-01's real audio arrives, all of it on the audio track as Opus-sized packets.
    let audio = sim.clients[sub].audio_from(&t01);
    assert!(audio.len() > 150, "{} audio packets", audio.len());
    assert!(audio
        .iter()
        .all(|r| r.pt == sub_opus && r.payload.len() < 400));
}
