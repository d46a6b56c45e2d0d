//! A client whose address changes restarts ICE on its publish connection: it offers new ICE
//! credentials from a new UDP port, Haven answers with new credentials of its own, and media
//! from the client resumes within seconds while it keeps its place and its one attendance
//! stay.
//!
//! The clients are webrtc-rs; the restarting one binds new sockets on restart, so its checks
//! and media come from an address Haven has never seen, and only the new ICE username can
//! route them.
//!
//! The test must run in a private network namespace (see `common::require_netns`).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use webrtc::peer_connection::RTCPeerConnectionState;

use common::peer::{therapist_and_client, Person, Route};
use common::Server;

const SESSION: &str = "sess-ice-restart";
/// The client restarts after two seconds of audio from the therapist...
const RESTART_AFTER: u64 = 100;
/// ...and both keep going until five more seconds have arrived.
const ENOUGH_PACKETS: u64 = RESTART_AFTER + 250;
/// The longest the therapist may hear nothing from the client across the restart.
const MAX_GAP: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_ice_restart_from_a_new_address_keeps_media_and_the_stay() {
    common::require_netns("ice_restart");
    let server = Server::start();
    let therapist = Person {
        id: "t-restart-1",
        role: "therapist",
        index: 1,
        path: Route::Udp,
        enough: ENOUGH_PACKETS,
        restart_after: None,
    };
    let client = Person {
        id: "p-restart-1",
        role: "client",
        index: 2,
        path: Route::Udp,
        enough: ENOUGH_PACKETS,
        restart_after: Some(RESTART_AFTER),
    };
    let started = Instant::now();
    let Some(pair) = therapist_and_client(&server, SESSION, therapist, client).await else {
        panic!(
            "a participant failed\n--- server log ---\n{}",
            server.log_text()
        );
    };
    let (t, c, got) = (pair.therapist, pair.client, pair.got);
    let gap = Duration::from_millis(got[0].max_gap_ms.load(Ordering::Relaxed));
    println!(
        "figure: ice_restart_longest_gap_client_to_therapist_ms={} packets_to_therapist={} \
         to_client={} (in {:.1} s)",
        gap.as_millis(),
        got[0].got(),
        got[1].got(),
        started.elapsed().as_secs_f64()
    );

    // The restart happened: a second answer, with Haven's new ICE credentials.
    assert_eq!(c.publish_ufrags.len(), 2, "{:?}", c.publish_ufrags);
    assert_ne!(c.publish_ufrags[0], c.publish_ufrags[1]);
    // Media flowed on after it, both ways, with only a short gap.
    assert!(got[0].got() >= ENOUGH_PACKETS && got[1].got() >= ENOUGH_PACKETS);
    assert!(
        gap < MAX_GAP,
        "media stopped for {gap:?} across the restart"
    );
    let bad = got
        .iter()
        .map(|g| g.bad.load(Ordering::Relaxed))
        .sum::<u64>();
    assert_eq!(bad, 0, "packets from the wrong publisher");
    assert_eq!(c.state, RTCPeerConnectionState::Connected);
    assert_eq!(t.state, RTCPeerConnectionState::Connected);

    // One stay in the ledger: admitted once, media connected once, never lost or left.
    let kinds = server.ledger_kinds("p-restart-1");
    assert_eq!(kinds, ["admitted", "media_connected"], "{kinds:?}");
}
