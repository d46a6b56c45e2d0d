//! The room's forwarding on simulated time: real str0m connections wired in memory, loss from
//! a seeded generator, no sockets and no sleeps. Each run is the same every time.

use std::collections::BTreeSet;
use std::time::Duration;

use haven_sfu::sim::{layer_of, Received, SimRoom};

const STEP: Duration = Duration::from_millis(5);

/// Sequence numbers of the packets received, each once, from `from` on.
fn unique_seqs(packets: &[&Received], from: usize) -> BTreeSet<u64> {
    packets.iter().skip(from).map(|r| r.seq).collect()
}

/// Missing sequence numbers inside the range received.
fn missing(seqs: &BTreeSet<u64>) -> u64 {
    match (seqs.first(), seqs.last()) {
        (Some(lo), Some(hi)) => hi - lo + 1 - seqs.len() as u64,
        _ => 0,
    }
}

/// The longest run of consecutive missing sequence numbers.
fn longest_gap(seqs: &BTreeSet<u64>) -> u64 {
    seqs.iter()
        .zip(seqs.iter().skip(1))
        .map(|(a, b)| b - a - 1)
        .max()
        .unwrap_or(0)
}

#[test]
fn everyone_receives_everyone_in_a_clean_room() {
    let mut sim = SimRoom::new(1);
    for id in ["t-01", "p-02", "p-03"] {
        sim.join(id, false);
    }
    // Connections come up within the first two seconds; then four seconds of media.
    sim.run(Duration::from_secs(6), STEP);
    for viewer in 0..3 {
        for publisher in (0..3).filter(|p| *p != viewer) {
            let pid = sim.clients[publisher].id.clone();
            let video = sim.clients[viewer].video_from(&pid);
            let audio = sim.clients[viewer].audio_from(&pid);
            assert!(
                video.len() > 400,
                "{viewer} <- {publisher}: {} video",
                video.len()
            );
            assert!(
                audio.len() > 120,
                "{viewer} <- {publisher}: {} audio",
                audio.len()
            );
            let seqs = unique_seqs(&video, 0);
            assert_eq!(missing(&seqs), 0, "no loss, no gap");
            // Video starts at a keyframe (VP8 payload header bit 0 clear on the first packet).
            assert_eq!(video[0].payload[4] & 0x01, 0, "first packet is a keyframe");
        }
    }
}

#[test]
fn ten_percent_loss_toward_a_subscriber_is_repaired_from_the_cache_and_audio_goes_on() {
    let mut sim = SimRoom::new(7);
    sim.join("t-01", false);
    sim.join("p-02", false);
    sim.run(Duration::from_secs(2), STEP);
    let t01 = sim.clients[0].id.clone();
    let before_video = sim.clients[1].video_from(&t01).len();
    let before_audio = sim.clients[1].audio_from(&t01).len();

    sim.clients[1].loss_down = 0.10;
    sim.run(Duration::from_secs(10), STEP);
    // Let the last retransmissions arrive.
    sim.clients[1].loss_down = 0.0;
    sim.run(Duration::from_millis(500), STEP);

    let video = sim.clients[1].video_from(&t01);
    let seqs = unique_seqs(&video, before_video);
    let lost = missing(&seqs);
    let share = lost as f64 / seqs.len().max(1) as f64;
    println!(
        "figure: sim_video_missing_after_nack={lost} of {} (10 % loss downstream)",
        seqs.len()
    );
    assert!(seqs.len() > 1000, "video kept flowing: {}", seqs.len());
    assert!(
        share < 0.01,
        "NACKs answered from the cache: {lost} missing"
    );

    let audio = sim.clients[1].audio_from(&t01);
    let aseqs = unique_seqs(&audio, before_audio);
    let gap = longest_gap(&aseqs);
    println!(
        "figure: sim_audio_longest_gap_packets={gap} (20 ms each), audio missing {} of {}",
        missing(&aseqs),
        aseqs.len()
    );
    assert!(aseqs.len() > 400, "audio kept flowing");
    assert!(gap <= 5, "no audio gap longer than 100 ms: {gap} packets");
}

#[test]
fn loss_on_the_way_in_is_asked_for_again_once_for_everyone() {
    let mut sim = SimRoom::new(11);
    sim.join("t-01", false);
    sim.join("p-02", false);
    sim.join("p-03", false);
    sim.run(Duration::from_secs(2), STEP);
    let t01 = sim.clients[0].id.clone();
    let before: Vec<usize> = (1..3)
        .map(|v| sim.clients[v].video_from(&t01).len())
        .collect();
    sim.clients[0].loss_up = 0.10;
    sim.run(Duration::from_secs(8), STEP);
    sim.clients[0].loss_up = 0.0;
    sim.run(Duration::from_millis(500), STEP);
    for (k, viewer) in (1..3).enumerate() {
        let video = sim.clients[viewer].video_from(&t01);
        let seqs = unique_seqs(&video, before[k]);
        let lost = missing(&seqs);
        println!(
            "figure: sim_uplink_loss_missing_at_p0{}={lost} of {}",
            viewer + 1,
            seqs.len()
        );
        assert!(
            (lost as f64) < seqs.len() as f64 * 0.01,
            "the SFU recovered the uplink losses: {lost} missing of {}",
            seqs.len()
        );
    }
}

#[test]
fn the_layer_follows_the_displayed_size_and_switches_at_keyframes_without_a_gap() {
    let mut sim = SimRoom::new(3);
    sim.join("t-01", true);
    sim.join("p-02", false);
    sim.run(Duration::from_secs(3), STEP);
    let t01 = sim.clients[0].id.clone();

    // Shown small: the low layer.
    sim.set_video_size(1, 0, 320, 180);
    sim.run(Duration::from_secs(3), STEP);
    let mark = sim.clients[1].video_from(&t01).len();
    sim.run(Duration::from_secs(1), STEP);
    let recent: Vec<u8> = sim.clients[1].video_from(&t01)[mark..]
        .iter()
        .filter_map(|r| layer_of(&r.payload))
        .collect();
    assert!(!recent.is_empty());
    assert!(recent.iter().all(|l| *l == 0), "low layer only: {recent:?}");

    // Shown at 640x360: the medium layer, after its keyframe; the stream stays continuous.
    // The estimate has only seen the low layer, so the step up is taken on trial.
    sim.set_video_size(1, 0, 640, 360);
    let started = sim.now;
    let mut medium_after = None;
    for _ in 0..24 {
        sim.run(Duration::from_millis(500), STEP);
        let v = sim.clients[1].video_from(&t01);
        if v[v.len() - 5..]
            .iter()
            .all(|r| layer_of(&r.payload) == Some(1))
        {
            medium_after = Some(sim.now.duration_since(started));
            break;
        }
    }
    let medium_after = medium_after.expect("the medium layer within 12 s");
    println!(
        "figure: sim_time_to_medium_layer_ms={}",
        medium_after.as_millis()
    );
    sim.run(Duration::from_secs(2), STEP);
    let video = sim.clients[1].video_from(&t01);
    let tail: Vec<u8> = video[video.len() - 20..]
        .iter()
        .filter_map(|r| layer_of(&r.payload))
        .collect();
    assert!(tail.iter().all(|l| *l == 1), "medium layer now: {tail:?}");
    let seqs = unique_seqs(&video, 0);
    assert_eq!(
        missing(&seqs),
        0,
        "sequence numbers continue across switches"
    );
    // The first packet after each switch is a keyframe of the new layer.
    for w in video.windows(2) {
        if layer_of(&w[0].payload) != layer_of(&w[1].payload) {
            assert_eq!(w[1].payload[4] & 0x01, 0, "switch at a keyframe");
        }
    }
    // Shown large: the estimate has only seen the medium layer, so the high one is tried
    // step by step (kept once the estimate follows); it arrives within seconds.
    sim.set_video_size(1, 0, 1280, 720);
    let before = sim.clients[1].video_from(&t01).len();
    let started = sim.now;
    let mut reached = None;
    for _ in 0..40 {
        sim.run(Duration::from_millis(500), STEP);
        let v = sim.clients[1].video_from(&t01);
        if v[before..].iter().any(|r| layer_of(&r.payload) == Some(2)) {
            reached = Some(sim.now.duration_since(started));
            break;
        }
    }
    let reached = reached.expect("the high layer within 20 s");
    println!("figure: sim_time_to_high_layer_ms={}", reached.as_millis());
    sim.run(Duration::from_secs(4), STEP);
    let video = sim.clients[1].video_from(&t01);
    let tail: Vec<u8> = video[video.len() - 20..]
        .iter()
        .filter_map(|r| layer_of(&r.payload))
        .collect();
    assert!(tail.iter().all(|l| *l == 2), "high layer kept: {tail:?}");
    let seqs = unique_seqs(&video, 0);
    assert_eq!(missing(&seqs), 0, "continuous across every switch");

    // Timestamps never go backwards at a switch.
    let mut last_ts: Option<u32> = None;
    for r in &video {
        if let Some(t) = last_ts {
            assert!(
                r.timestamp.wrapping_sub(t) < u32::MAX / 2,
                "timestamps move forward"
            );
        }
        last_ts = Some(r.timestamp);
    }
    let stats = sim.stats();
    assert!(stats.layer_switches >= 1, "{stats:?}");
}

#[test]
fn twelve_subscribers_arriving_together_cost_the_publisher_few_keyframes() {
    let mut sim = SimRoom::new(5);
    sim.join("t-01", false);
    sim.run(Duration::from_secs(1), STEP);
    for i in 2..14 {
        sim.join(&format!("p-{i:02}"), false);
    }
    sim.run(Duration::from_secs(3), STEP);
    let requests = sim.stats().keyframe_requests_sent;
    println!("figure: sim_keyframe_requests_12_joiners={requests} in 3 s");
    // One request per 500 ms at most for the therapist's track, plus the joiners' own tracks
    // (each asked for at most once per 500 ms while its subscribers wait).
    assert!(requests <= 6 * 13, "{requests} requests");
    let t01 = sim.clients[0].id.clone();
    for v in 1..sim.clients.len() {
        assert!(
            !sim.clients[v].video_from(&t01).is_empty(),
            "p-{v:02} sees the therapist"
        );
    }
}
