//! Negotiation settles when both sides negotiate at once: a browser renegotiates its publish
//! connection while Haven's subscribe offer to it waits for an answer, and Haven's offers keep
//! their numbers. Signaling and SDP only; no media needs to flow.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::peer::{audio_track, peer_connection, Pc, Route};
use common::{Server, Signal};
use serde_json::{json, Value};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::RTCSessionDescription;

async fn offer(pc: &Pc) -> String {
    let o = pc.pc.create_offer(None).await.expect("offer");
    pc.pc.set_local_description(o).await.expect("set offer");
    pc.pc
        .local_description()
        .await
        .expect("local description")
        .sdp
}

async fn answer(pc: &Pc, offer_sdp: &str) -> String {
    let offer = RTCSessionDescription::offer(offer_sdp.to_owned()).expect("offer");
    pc.pc
        .set_remote_description(offer)
        .await
        .expect("Haven's offer applies");
    let a = pc.pc.create_answer(None).await.expect("answer");
    pc.pc.set_local_description(a).await.expect("set answer");
    pc.pc
        .local_description()
        .await
        .expect("local description")
        .sdp
}

/// A participant's publish connection with one audio track.
async fn publisher(who: &str, ssrc: u32) -> Pc {
    let pc = peer_connection(Route::Udp, Vec::new()).await;
    pc.pc
        .add_track(audio_track(who, ssrc) as Arc<dyn TrackLocal>)
        .await
        .expect("add track");
    pc
}

#[tokio::test]
async fn renegotiation_from_both_sides_settles_with_every_track_present() {
    common::require_netns("glare");
    let server = Server::start();
    let mut t = Signal::connect(&server).await;
    t.join(&server.token("sess-glare", "therapist", "t-gl-01", &[]))
        .await;
    t.expect("joined").await;
    let mut c = Signal::connect(&server).await;
    c.join(&server.token("sess-glare", "client", "p-gl-01", &[]))
        .await;
    t.waiting_list_with("p-gl-01").await;
    t.send(json!({"type": "admit", "participant_id": "p-gl-01"}))
        .await;
    c.expect("joined").await;

    // The client publishes; its publish answer carries the number back.
    let c_pub = publisher("p-gl-01", 0x4c00_0001).await;
    c.send(json!({"type": "publish_offer", "negotiation": 1, "sdp": offer(&c_pub).await}))
        .await;
    let a1 = c.expect("publish_answer").await;
    assert_eq!(a1["negotiation"], 1);
    let sdp = a1["sdp"].as_str().expect("sdp").to_owned();
    c_pub
        .pc
        .set_remote_description(RTCSessionDescription::answer(sdp).expect("answer"))
        .await
        .expect("apply");

    // The therapist publishes now, so Haven offers the client a new subscription ...
    let t_pub = publisher("t-gl-01", 0x4c00_0002).await;
    t.send(json!({"type": "publish_offer", "sdp": offer(&t_pub).await}))
        .await;
    let t_answer = t.expect("publish_answer").await;
    let sdp = t_answer["sdp"].as_str().expect("sdp").to_owned();
    t_pub
        .pc
        .set_remote_description(RTCSessionDescription::answer(sdp).expect("answer"))
        .await
        .expect("apply");
    assert!(
        t_answer.get("negotiation").is_none(),
        "no number asked, none echoed"
    );
    let sub_offer = match c.recv_within(Duration::from_secs(5)).await {
        Some(m) if m["type"] == "subscribe_offer" => m,
        other => panic!(
            "expected subscribe_offer, got {other:?}\nlog:\n{}",
            server.log_text()
        ),
    };
    let n = sub_offer["negotiation"].as_u64().expect("numbered");

    // ... and before answering it, the client renegotiates its own publish connection.
    c.send(json!({"type": "publish_offer", "negotiation": 2, "sdp": offer(&c_pub).await}))
        .await;
    let a2 = c.expect("publish_answer").await;
    assert_eq!(a2["negotiation"], 2);
    let sdp = a2["sdp"].as_str().expect("sdp").to_owned();
    c_pub
        .pc
        .set_remote_description(RTCSessionDescription::answer(sdp).expect("answer"))
        .await
        .expect("apply");

    // Now the subscribe answer: it settles, and the therapist's track is in it.
    let c_sub = peer_connection(Route::Udp, Vec::new()).await;
    let sdp = answer(&c_sub, sub_offer["sdp"].as_str().expect("sdp")).await;
    c.send(json!({"type": "subscribe_answer", "negotiation": n, "sdp": sdp}))
        .await;
    let tracks: &Vec<Value> = sub_offer["tracks"].as_array().expect("tracks");
    assert!(
        tracks
            .iter()
            .any(|t| t["participant_id"] == "t-gl-01" && t["kind"] == "audio"),
        "{sub_offer}"
    );

    // An answer to an offer that is no longer pending is refused, not ignored.
    c.send(json!({"type": "subscribe_answer", "negotiation": n, "sdp": sdp_of(&c_sub).await}))
        .await;
    assert_eq!(c.expect("error").await["code"], "stale_answer");

    // The therapist, in turn, got an offer with the client's track.
    let t_sub_offer = t.expect("subscribe_offer").await;
    let tracks = t_sub_offer["tracks"].as_array().expect("tracks");
    assert!(
        tracks.iter().any(|t| t["participant_id"] == "p-gl-01"),
        "{t_sub_offer}"
    );

    // Nothing else went wrong on either side.
    for s in [&mut c, &mut t] {
        if let Some(m) = s.recv_within(Duration::from_millis(300)).await {
            assert_ne!(m["type"], "error", "{m}");
        }
    }
}

async fn sdp_of(pc: &Pc) -> String {
    pc.pc
        .local_description()
        .await
        .expect("local description")
        .sdp
}
