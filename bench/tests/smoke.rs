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
use haven_bench::{HavenProcess, LoadConfig, Target, VideoShape};

const ENV_IN_NETNS: &str = "HAVEN_IN_NETNS";
const ENV_HAVEN_BIN: &str = "HAVEN_BIN";

/// Joining, three seconds of media, leaving: far less than this.
const RUN_LIMIT: Duration = Duration::from_secs(40);

#[tokio::test(flavor = "current_thread")]
async fn two_rooms_of_three_receive_every_publisher_without_loss() {
    assert_eq!(
        std::env::var(ENV_IN_NETNS).as_deref(),
        Ok("1"),
        "this test sends WebRTC traffic and must run in a private network namespace: \
         unshare -n sh -c 'ip link set lo up; {ENV_IN_NETNS}=1 cargo test -p haven-bench'"
    );
    let bin = std::env::var_os(ENV_HAVEN_BIN)
        .map(PathBuf::from)
        .unwrap_or_else(|| sibling_haven_binary().expect("a built haven binary"));
    let haven = HavenProcess::start(&bin).expect("haven starts");

    let cfg = LoadConfig {
        target: Target::Haven,
        url: haven.ws_url.clone(),
        key_file: Some(haven.key_path()),
        server_pid: Some(haven.pid()),
        rooms: 2,
        participants: 3,
        duration: Duration::from_secs(3),
        join_timeout: Duration::from_secs(15),
        video: VideoShape {
            bitrate_bps: 300_000,
            fps: 30,
            keyframe_interval: Duration::from_secs(2),
        },
        audio_bytes: 100,
        client_ip: "127.0.0.1".parse().expect("literal address"),
        janus_bitrate: 0,
        first_room_id: 1,
        label: "smoke".into(),
        ramp: None,
    };
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
