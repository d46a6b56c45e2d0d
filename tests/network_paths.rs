//! Media over the paths a home network leaves open: a participant whose client can only use
//! TCP (UDP blocked) still exchanges audio with one on UDP, through Haven's ICE-TCP port.
//!
//! The clients are webrtc-rs. The TCP-only client has no UDP socket at all, so the only pair
//! it can form is its active TCP candidate with Haven's passive one (RFC 6544), and every
//! packet in both directions is RFC 4571-framed on that connection.
//!
//! The test must run in a private network namespace (see `common::require_netns`).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSdpType, RTCSessionDescription, SettingEngineBuilder,
};

use common::{Server, Signal};

const SESSION: &str = "sess-net-paths";
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Marks this test's payloads, followed by the publisher's index.
const MAGIC: [u8; 4] = *b"HVNP";
const WAIT: Duration = Duration::from_secs(20);
/// Packets each side must receive from the other: two seconds of audio.
const ENOUGH_PACKETS: u64 = 100;

/// How a test client reaches Haven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Udp,
    /// No UDP socket: only ICE-TCP can connect.
    TcpOnly,
}

struct Events {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedSender<Arc<dyn TrackRemote>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Events {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.tracks.send(track);
    }
}

struct Pc {
    pc: Arc<dyn PeerConnection>,
    gathered: watch::Receiver<bool>,
    state: watch::Receiver<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
}

async fn peer_connection(path: Path) -> Pc {
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .expect("the default codecs register on an empty engine");
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .expect("default interceptors register");
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .build();
    let (gathered_tx, gathered) = watch::channel(false);
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (tracks_tx, tracks) = mpsc::unbounded_channel();
    let events = Events {
        gathered: gathered_tx,
        state: state_tx,
        tracks: tracks_tx,
    };
    let builder = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(events));
    let builder = match path {
        Path::Udp => builder.with_udp_addrs(vec!["127.0.0.1:0"]),
        Path::TcpOnly => builder.with_tcp_addrs(vec!["127.0.0.1:0"]),
    };
    let pc = builder
        .build()
        .await
        .expect("webrtc-rs peer connection builds");
    Pc {
        pc: Arc::new(pc),
        gathered,
        state,
        tracks,
    }
}

impl Pc {
    async fn gathered_sdp(&mut self) -> String {
        tokio::time::timeout(WAIT, self.gathered.wait_for(|g| *g))
            .await
            .expect("ICE gathering completes")
            .expect("handler alive");
        self.pc
            .local_description()
            .await
            .expect("local description set")
            .sdp
    }

    /// Applies a remote description. Two webrtc-rs habits need help on a TCP-only client:
    /// it dials a passive TCP candidate only when it is trickled, not when it sits in the SDP,
    /// so the client hands Haven's TCP candidates back to itself as a browser's trickle
    /// would; and it matches a STUN response to a remote candidate by address alone, so
    /// Haven's UDP candidate on the same port number hides the TCP one. The UDP candidate is
    /// removed, which is what a network that blocks UDP amounts to anyway.
    async fn set_remote(&self, desc: RTCSessionDescription, path: Path) {
        let sdp = desc.sdp.clone();
        let desc = if path == Path::TcpOnly {
            let kept: Vec<&str> = sdp
                .lines()
                .filter(|l| !(l.starts_with("a=candidate") && l.contains(" udp ")))
                .collect();
            let sdp = kept.join("\r\n") + "\r\n";
            match desc.sdp_type {
                RTCSdpType::Offer => RTCSessionDescription::offer(sdp),
                _ => RTCSessionDescription::answer(sdp),
            }
            .expect("the SDP still parses")
        } else {
            desc
        };
        self.pc
            .set_remote_description(desc)
            .await
            .expect("webrtc-rs accepts Haven's description");
        if path != Path::TcpOnly {
            return;
        }
        for line in sdp.lines().filter(|l| l.contains(" tcp ")) {
            let Some(candidate) = line.strip_prefix("a=") else {
                continue;
            };
            let init = RTCIceCandidateInit {
                candidate: candidate.to_owned(),
                sdp_mid: Some("0".to_owned()),
                sdp_mline_index: Some(0),
                ..Default::default()
            };
            self.pc
                .add_ice_candidate(init)
                .await
                .expect("Haven's TCP candidate is valid");
        }
    }
}

fn audio_track(who: &str, ssrc: u32) -> Arc<TrackLocalStaticRTP> {
    let codec = RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    };
    let track = MediaStreamTrack::new(
        format!("{who}-stream"),
        format!("{who}-audio"),
        format!("{who}-audio"),
        RtpCodecKind::Audio,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    );
    Arc::new(TrackLocalStaticRTP::new(track))
}

/// Opus TOC byte, then this test's magic, the publisher and a counter.
fn payload(publisher: u8, n: u32) -> Bytes {
    let mut p = vec![0xF8];
    p.extend_from_slice(&MAGIC);
    p.push(publisher);
    p.extend_from_slice(&n.to_be_bytes());
    p.resize(60, publisher);
    Bytes::from(p)
}

/// Counts the packets a participant received from the other, checking whose they are.
async fn count(track: Arc<dyn TrackRemote>, from: u8, got: Arc<AtomicU64>, bad: Arc<AtomicU64>) {
    while let Some(event) = track.poll().await {
        if let TrackRemoteEvent::OnRtpPacket(pkt) = event {
            let ok = pkt.payload.get(1..5) == Some(&MAGIC[..]) && pkt.payload.get(5) == Some(&from);
            let counter = if ok { &got } else { &bad };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Person {
    id: &'static str,
    role: &'static str,
    index: u8,
    path: Path,
}

/// Joins, publishes one audio track and counts what arrives from `from` until `received`
/// reaches [`ENOUGH_PACKETS`] or the test ends. The therapist admits whoever waits.
async fn participant(
    who: Person,
    from: u8,
    ws_url: String,
    token: String,
    received: Arc<AtomicU64>,
    bad: Arc<AtomicU64>,
) -> RTCPeerConnectionState {
    let mut signal = Signal::connect_url(&ws_url).await;
    signal.join(&token).await;
    let mut publish: Option<Pc> = None;
    let mut subscribe: Option<Pc> = None;
    let mut track: Option<Arc<TrackLocalStaticRTP>> = None;
    let mut sender: Option<tokio::task::JoinHandle<()>> = None;
    let deadline = tokio::time::Instant::now() + WAIT * 2;

    while received.load(Ordering::Relaxed) < ENOUGH_PACKETS {
        let next_track = async {
            match subscribe.as_mut() {
                Some(pc) => pc.tracks.recv().await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            m = signal.recv_within(Duration::from_millis(200)) => m,
            Some(t) = next_track => {
                tokio::spawn(count(t, from, received.clone(), bad.clone()));
                continue;
            }
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: only {} packets from the other side",
            who.id,
            received.load(Ordering::Relaxed)
        );
        let Some(msg) = msg else { continue };
        match msg["type"].as_str().unwrap_or_default() {
            "waiting_list" => {
                for w in msg["waiting"].as_array().into_iter().flatten() {
                    let id = w["participant_id"].clone();
                    signal
                        .send(json!({"type": "admit", "participant_id": id}))
                        .await;
                }
            }
            "joined" => {
                subscribe = Some(peer_connection(who.path).await);
                let mut pc = peer_connection(who.path).await;
                let t = audio_track(who.id, 0x4e50_0000 + u32::from(who.index));
                pc.pc
                    .add_track(t.clone() as Arc<dyn TrackLocal>)
                    .await
                    .expect("add audio track");
                let offer = pc.pc.create_offer(None).await.expect("offer");
                pc.pc.set_local_description(offer).await.expect("set offer");
                let sdp = pc.gathered_sdp().await;
                signal
                    .send(json!({"type": "publish_offer", "sdp": sdp}))
                    .await;
                publish = Some(pc);
                track = Some(t);
            }
            "publish_answer" => {
                let pc = publish.as_ref().expect("answer follows our offer");
                let sdp = msg["sdp"].as_str().expect("sdp").to_owned();
                pc.set_remote(
                    RTCSessionDescription::answer(sdp).expect("answer"),
                    who.path,
                )
                .await;
                let t = track.take().expect("one answer");
                let mut state = pc.state.clone();
                let index = who.index;
                sender = Some(tokio::spawn(async move {
                    let up = state.wait_for(|s| *s == RTCPeerConnectionState::Connected);
                    let _ = tokio::time::timeout(WAIT, up).await;
                    let mut tick = tokio::time::interval(AUDIO_INTERVAL);
                    for n in 0u32.. {
                        tick.tick().await;
                        let pkt = rtc::rtp::Packet {
                            header: rtc::rtp::Header {
                                version: 2,
                                payload_type: 111,
                                sequence_number: n as u16,
                                timestamp: n.wrapping_mul(960),
                                ssrc: 0x4e50_0000 + u32::from(index),
                                ..Default::default()
                            },
                            payload: payload(index, n),
                        };
                        if t.write_rtp(pkt).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            "subscribe_offer" => {
                let negotiation = msg["negotiation"].as_u64().expect("negotiation");
                let pc = subscribe.as_mut().expect("made at joined");
                let sdp = msg["sdp"].as_str().expect("sdp").to_owned();
                pc.set_remote(RTCSessionDescription::offer(sdp).expect("offer"), who.path)
                    .await;
                let answer = pc.pc.create_answer(None).await.expect("answer");
                pc.pc
                    .set_local_description(answer)
                    .await
                    .expect("set answer");
                let sdp = pc.gathered_sdp().await;
                signal
                    .send(
                        json!({"type": "subscribe_answer", "negotiation": negotiation, "sdp": sdp}),
                    )
                    .await;
            }
            "error" => panic!("{}: server error {msg}", who.id),
            _ => {}
        }
    }

    // Keep publishing a little longer so the other side reaches its count too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = publish.as_ref().map(|p| *p.state.borrow());
    if let Some(s) = sender {
        s.abort();
    }
    for pc in [publish, subscribe].into_iter().flatten() {
        let _ = pc.pc.close().await;
    }
    state.unwrap_or(RTCPeerConnectionState::New)
}

async fn exchange(server: &Server, a: Person, b: Person) -> (u64, u64, Duration) {
    let started = Instant::now();
    let (got_a, got_b, bad) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let token_a = server.token(SESSION, a.role, a.id, &["--kind", "group"]);
    let token_b = server.token(SESSION, b.role, b.id, &["--kind", "group"]);
    let (ia, ib) = (a.index, b.index);
    let ta = tokio::spawn(participant(
        a,
        ib,
        server.ws_url(),
        token_a,
        got_a.clone(),
        bad.clone(),
    ));
    // The therapist first, so the client finds them there and waits to be admitted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tb = tokio::spawn(participant(
        b,
        ia,
        server.ws_url(),
        token_b,
        got_b.clone(),
        bad.clone(),
    ));
    let (ra, rb) = tokio::join!(ta, tb);
    if ra.is_err() || rb.is_err() {
        panic!(
            "a participant failed: {ra:?} {rb:?}\n--- server log ---\n{}",
            server.log_text()
        );
    }
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "packets from the wrong publisher"
    );
    (
        got_a.load(Ordering::Relaxed),
        got_b.load(Ordering::Relaxed),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_only_client_exchanges_audio_through_ice_tcp() {
    common::require_netns("network_paths");
    let server = Server::start();
    let therapist = Person {
        id: "t-net-1",
        role: "therapist",
        index: 1,
        path: Path::Udp,
    };
    let client = Person {
        id: "p-net-1",
        role: "client",
        index: 2,
        path: Path::TcpOnly,
    };
    let (to_therapist, to_client, took) = exchange(&server, therapist, client).await;
    println!(
        "figure: ice_tcp_packets_client_to_therapist={to_therapist} \
         therapist_to_client={to_client} (in {:.1} s)",
        took.as_secs_f64()
    );
    assert!(to_therapist >= ENOUGH_PACKETS && to_client >= ENOUGH_PACKETS);
}
