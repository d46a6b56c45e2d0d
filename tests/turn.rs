//! A participant whose network lets nothing through but a TURN relay still exchanges media:
//! Haven hands out TURN credentials in `joined`, and a webrtc-rs client that may use relay
//! candidates only (ICE transport policy `relay`) reaches Haven through Debian's coturn.
//!
//! coturn runs on loopback with the shared-secret scheme (`use-auth-secret`) and
//! `allow-loopback-peers`, since Haven's host candidate is a 127.x address. The client's
//! only candidate is its relayed address on coturn, so every packet in both directions goes
//! through the relay; the therapist uses UDP directly.
//!
//! The test must run in a private network namespace (see `common::require_netns`).

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use webrtc::peer_connection::RTCPeerConnectionState;

use common::peer::{therapist_and_client, Person, Route};
use common::Server;

const SESSION: &str = "sess-turn";
/// The secret Haven and coturn share in this test.
const TURN_SECRET: &str = "turn-test-secret-0123456789";
const TURN_REALM: &str = "haven.test";
/// How long the credentials in `joined` last, as configured for this test.
const TURN_TTL_SECONDS: i64 = 3600;
/// Packets each side must receive from the other: two seconds of audio.
const ENOUGH_PACKETS: u64 = 100;

/// Debian's `turnserver` on loopback, stopped (by its own process handle) when dropped.
struct Coturn {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Coturn {
    /// coturn cannot listen on port 0, so a port is picked at random in a high range,
    /// checked free, and another is tried if coturn does not answer STUN on it.
    fn start() -> Coturn {
        let mut last_log = String::new();
        for attempt in 0..8u32 {
            let port = 20_000 + (random() % 10_000) as u16;
            // The relay range sits in its own high block, away from the listening port.
            let relay_min = 40_000 + (random() % 10_000) as u16;
            if UdpSocket::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            let dir = tempfile::tempdir().expect("temp dir");
            let conf = dir.path().join("turnserver.conf");
            std::fs::write(&conf, coturn_config(dir.path(), port, relay_min)).expect("write conf");
            let child = Command::new("turnserver")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("turnserver runs (Debian package coturn; test.sh installs it)");
            let mut coturn = Coturn { child, port, dir };
            if coturn.answers_stun(Duration::from_secs(5)) {
                return coturn;
            }
            last_log = coturn.log_text();
            eprintln!("coturn did not come up on port {port} (attempt {attempt}); trying another");
        }
        panic!("coturn never answered STUN; its last log:\n{last_log}");
    }

    /// Sends STUN binding requests until one is answered (coturn answers them unauthenticated).
    fn answers_stun(&mut self, within: Duration) -> bool {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind probe");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        // A binding request: type 0x0001, no attributes, the magic cookie, a transaction id.
        let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        request.extend_from_slice(b"haventurnprb");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            let _ = sock.send_to(&request, ("127.0.0.1", self.port));
            let mut buf = [0u8; 512];
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                // A binding success response (0x0101) echoing our transaction id.
                if n >= 20 && buf[..2] == [0x01, 0x01] && buf[8..20] == request[8..20] {
                    return true;
                }
            }
            if self.log_text().contains("Cannot bind") {
                return false;
            }
        }
        false
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("turnserver.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("turn:127.0.0.1:{}?transport=udp", self.port)
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coturn_config(dir: &Path, port: u16, relay_min: u16) -> String {
    let d = dir.display();
    format!(
        "listening-ip=127.0.0.1\n\
         relay-ip=127.0.0.1\n\
         listening-port={port}\n\
         min-port={relay_min}\n\
         max-port={}\n\
         use-auth-secret\n\
         static-auth-secret={TURN_SECRET}\n\
         realm={TURN_REALM}\n\
         fingerprint\n\
         no-tls\n\
         no-dtls\n\
         no-cli\n\
         allow-loopback-peers\n\
         no-multicast-peers\n\
         userdb={d}/turndb\n\
         pidfile={d}/turnserver.pid\n\
         log-file={d}/turnserver.log\n\
         simple-log\n",
        relay_min + 40
    )
}

/// A number that differs between runs, for picking ports; no seeded sequence is needed.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_client_exchanges_audio_through_coturn() {
    common::require_netns("turn");
    let coturn = Coturn::start();

    // Haven learns the TURN server from its configuration file.
    let conf_dir = tempfile::tempdir().expect("temp dir");
    let conf = conf_dir.path().join("haven.toml");
    let mut file = std::fs::File::create(&conf).expect("create haven.toml");
    write!(
        file,
        "turn_credential_ttl_seconds = {TURN_TTL_SECONDS}\n\n\
         [[turn_servers]]\n\
         urls = [\"{}\"]\n\
         secret = \"{TURN_SECRET}\"\n",
        coturn.url()
    )
    .expect("write haven.toml");
    let conf_path = conf.to_string_lossy().into_owned();
    let server = Server::start_with_env(&[("HAVEN_CONFIG", conf_path.as_str())]);

    let therapist = Person {
        id: "t-turn-1",
        role: "therapist",
        index: 1,
        path: Route::Udp,
        enough: ENOUGH_PACKETS,
        restart_after: None,
    };
    let client = Person {
        id: "p-turn-1",
        role: "client",
        index: 2,
        path: Route::RelayOnly,
        enough: ENOUGH_PACKETS,
        restart_after: None,
    };
    let started = Instant::now();
    let Some(pair) = therapist_and_client(&server, SESSION, therapist, client).await else {
        panic!(
            "a participant failed\n--- server log ---\n{}\n--- coturn log ---\n{}",
            server.log_text(),
            coturn.log_text()
        );
    };
    let (t, c, got) = (pair.therapist, pair.client, pair.got);
    let (to_therapist, to_client) = (got[0].got(), got[1].got());
    println!(
        "figure: turn_relay_packets_client_to_therapist={to_therapist} \
         therapist_to_client={to_client} (in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let bad = got
        .iter()
        .map(|g| g.bad.load(Ordering::Relaxed))
        .sum::<u64>();
    assert_eq!(bad, 0, "packets from the wrong publisher");
    assert!(to_therapist >= ENOUGH_PACKETS && to_client >= ENOUGH_PACKETS);
    assert_eq!(c.state, RTCPeerConnectionState::Connected);
    assert_eq!(t.state, RTCPeerConnectionState::Connected);

    // The credentials: `<expiry>:<participant id>`, expiring one configured lifetime from now.
    let servers = c.joined["ice_servers"]
        .as_array()
        .expect("ice_servers list");
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0]["urls"], json!([coturn.url()]));
    let username = servers[0]["username"].as_str().expect("username");
    let (expiry, who) = username.split_once(':').expect("expiry:participant");
    assert_eq!(who, "p-turn-1");
    let expiry: i64 = expiry.parse().expect("unix time");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (now + TURN_TTL_SECONDS - 120..=now + TURN_TTL_SECONDS).contains(&expiry),
        "expiry {expiry} is not about {TURN_TTL_SECONDS} s after {now}"
    );
}
