//! A short run of the load tool against a real Haven: two rooms of three, a few seconds of
//! media, and every subscriber must receive every publisher's audio and video with nothing
//! lost (this is loopback).
//!
//! The test sends UDP and must run in a private network namespace, as `test.sh` runs every
//! test (`HAVEN_IN_NETNS=1`). It starts the workspace's `haven` binary: `HAVEN_BIN`, or the
//! one built next to this test.

use std::path::PathBuf;
use std::time::Duration;

use haven_bench::server::sibling_haven_binary;
use haven_bench::{HavenProcess, Kind, LoadConfig, Target, VideoShape};

const ENV_IN_NETNS: &str = "HAVEN_IN_NETNS";
const ENV_HAVEN_BIN: &str = "HAVEN_BIN";

/// Joining, three seconds of media, leaving: far less than this.
const RUN_LIMIT: Duration = Duration::from_secs(40);

/// A Haven of its own, once the test is known to run in a private network namespace.
fn start_haven() -> HavenProcess {
    assert_eq!(
        std::env::var(ENV_IN_NETNS).as_deref(),
        Ok("1"),
        "this test sends WebRTC traffic and must run in a private network namespace: \
         unshare -n sh -c 'ip link set lo up; {ENV_IN_NETNS}=1 cargo test -p haven-bench'"
    );
    let bin = std::env::var_os(ENV_HAVEN_BIN)
        .map(PathBuf::from)
        .unwrap_or_else(|| sibling_haven_binary().expect("a built haven binary"));
    HavenProcess::start(&bin).expect("haven starts")
}

/// Two rooms of three for three seconds of light media.
fn two_rooms_of_three(haven: &HavenProcess, simulcast: bool) -> LoadConfig {
    LoadConfig {
        target: Target::Haven,
        url: haven.ws_url.clone(),
        key_file: Some(haven.key_path()),
        server_pid: Some(haven.pid()),
        rooms: 2,
        participants: 3,
        duration: Duration::from_secs(3),
        settle: Duration::ZERO,
        join_timeout: Duration::from_secs(15),
        video: VideoShape {
            bitrate_bps: 300_000,
            fps: 30,
            keyframe_interval: Duration::from_secs(2),
        },
        simulcast,
        audio_bytes: 100,
        client_ip: "127.0.0.1".parse().expect("literal address"),
        janus_bitrate: 0,
        first_room_id: 1,
        label: "smoke".into(),
        ramp: None,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn two_rooms_of_three_receive_every_publisher_without_loss() {
    let haven = start_haven();
    let cfg = two_rooms_of_three(&haven, false);
    let report = tokio::time::timeout(RUN_LIMIT, haven_bench::run(cfg))
        .await
        .expect("the run ends within its bound")
        .expect("the run completes");
    print!("{}", report.table());

    let step = &report.steps[0];
    assert_eq!(
        step.error_count, 0,
        "participants failed: {:?}",
        step.errors
    );
    // Two rooms × three receivers × two publishers × audio and video.
    assert_eq!(report.flows.len(), 24, "{:#?}", report.flows);
    for f in &report.flows {
        assert!(
            f.expected > 0,
            "{} sent no {:?} in the window",
            f.publisher,
            f.kind
        );
        assert_eq!(
            f.received,
            f.expected,
            "{} -> {} {:?}: {} of {} packets arrived\n--- haven log ---\n{}",
            f.publisher,
            f.receiver,
            f.kind,
            f.received,
            f.expected,
            haven.log_text()
        );
    }
    assert_eq!(step.duplicates, 0);
    assert!(step.delay_ms.p50 > 0.0, "delays were measured");
}

/// With simulcast each publisher sends three layers and each subscriber's one m-line carries
/// whichever the server chooses: every subscriber must get some layer of every publisher's
/// video, and all of the audio.
#[tokio::test(flavor = "current_thread")]
async fn with_simulcast_every_subscriber_receives_a_layer_of_every_publisher() {
    let haven = start_haven();
    let cfg = two_rooms_of_three(&haven, true);
    let report = tokio::time::timeout(RUN_LIMIT, haven_bench::run(cfg))
        .await
        .expect("the run ends within its bound")
        .expect("the run completes");
    print!("{}", report.table());

    let step = &report.steps[0];
    assert_eq!(
        step.error_count, 0,
        "participants failed: {:?}",
        step.errors
    );
    assert_eq!(report.flows.len(), 24, "{:#?}", report.flows);
    let simulcast = step.simulcast.as_ref().expect("a simulcast summary");
    for rid in ["q", "h", "f"] {
        assert!(
            simulcast.offered.get(rid).is_some_and(|n| *n > 0),
            "layer {rid} was sent: {simulcast:?}"
        );
    }
    for f in &report.flows {
        let what = format!("{} -> {} {:?}", f.publisher, f.receiver, f.kind);
        match f.kind {
            Kind::Audio => assert_eq!(f.received, f.expected, "{what}"),
            Kind::Video => {
                let layers = f.layers.as_ref().expect("video flows list their layers");
                assert!(
                    f.received > 0 && !layers.is_empty(),
                    "{what}: no layer arrived\n--- haven log ---\n{}",
                    haven.log_text()
                );
            }
        }
    }
    assert_eq!(step.duplicates, 0);
}
