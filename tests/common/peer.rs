//! A webrtc-rs participant for the end-to-end media tests: joins over signaling, publishes one
//! audio track on its publish connection, answers Haven's offers on its subscribe connection
//! and counts what arrives from one other participant. It can reach Haven over UDP or through
//! TURN relays only, and can restart ICE on its publish connection from a new port.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::peer_connection::configuration::RTCOfferOptions;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceGatheringState, RTCIceServer,
    RTCIceTransportPolicy, RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};

use super::Signal;

const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Marks these payloads, followed by the publisher's index.
const MAGIC: [u8; 4] = *b"HVPC";
pub const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Udp,
    /// Relay candidates only, through the TURN servers named in `joined`.
    RelayOnly,
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

pub struct Pc {
    pub pc: Arc<dyn PeerConnection>,
    gathered: watch::Receiver<bool>,
    state: watch::Receiver<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
}

/// The `ice_servers` of a `joined` message, as webrtc-rs takes them.
pub fn ice_servers(joined: &Value) -> Vec<RTCIceServer> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    joined["ice_servers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| RTCIceServer {
            urls: strings(&s["urls"]),
            username: s["username"].as_str().unwrap_or_default().to_owned(),
            credential: s["credential"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

pub async fn peer_connection(path: Route, servers: Vec<RTCIceServer>) -> Pc {
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .expect("the default codecs register on an empty engine");
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .expect("default interceptors register");
    // A restart binds new sockets, as a browser that moved to another network would.
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_discard_local_candidates_during_ice_restart(true)
        .build();
    let config = match path {
        Route::Udp => RTCConfigurationBuilder::new().build(),
        Route::RelayOnly => RTCConfigurationBuilder::new()
            .with_ice_servers(servers)
            .with_ice_transport_policy(RTCIceTransportPolicy::Relay)
            .build(),
    };
    let (gathered_tx, gathered) = watch::channel(false);
    let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
    let (tracks_tx, tracks) = mpsc::unbounded_channel();
    let events = Events {
        gathered: gathered_tx,
        state: state_tx,
        tracks: tracks_tx,
    };
    let pc = PeerConnectionBuilder::new()
        .with_configuration(config)
        .with_media_engine(media)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(events))
        .with_udp_addrs(vec!["127.0.0.1:0"])
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
    /// The local description once gathering is complete; for a relay-only client, checks
    /// that the relay is its only candidate.
    async fn gathered_sdp(&mut self, path: Route) -> String {
        tokio::time::timeout(WAIT, self.gathered.wait_for(|g| *g))
            .await
            .expect("ICE gathering completes")
            .expect("handler alive");
        let sdp = self
            .pc
            .local_description()
            .await
            .expect("local description set")
            .sdp;
        if path == Route::RelayOnly {
            let candidates: Vec<&str> = sdp.lines().filter(|l| l.contains("candidate:")).collect();
            assert!(
                !candidates.is_empty() && candidates.iter().all(|c| c.contains("typ relay")),
                "a relay-only client offers relay candidates only: {candidates:?}"
            );
        }
        sdp
    }
}

pub fn audio_track(who: &str, ssrc: u32) -> Arc<TrackLocalStaticRTP> {
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

/// What a participant received from the other.
#[derive(Default)]
pub struct Tally {
    pub got: AtomicU64,
    /// Packets from anyone else, or not from this test.
    pub bad: AtomicU64,
    /// The longest silence between two packets from the other side, in milliseconds.
    pub max_gap_ms: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Tally {
    pub fn got(&self) -> u64 {
        self.got.load(Ordering::Relaxed)
    }
}

/// Counts the packets a participant received from the other, checking whose they are.
async fn count(track: Arc<dyn TrackRemote>, from: u8, tally: Arc<Tally>) {
    while let Some(event) = track.poll().await {
        if let TrackRemoteEvent::OnRtpPacket(pkt) = event {
            let ok = pkt.payload.get(1..5) == Some(&MAGIC[..]) && pkt.payload.get(5) == Some(&from);
            if !ok {
                tally.bad.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            tally.got.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            if let Ok(mut last) = tally.last.lock() {
                if let Some(prev) = last.replace(now) {
                    let gap = now.duration_since(prev).as_millis() as u64;
                    tally.max_gap_ms.fetch_max(gap, Ordering::Relaxed);
                }
            }
        }
    }
}

pub struct Person {
    pub id: &'static str,
    pub role: &'static str,
    pub index: u8,
    pub path: Route,
    /// Packets to receive from the other side before finishing.
    pub enough: u64,
    /// Restart ICE on the publish connection, from new sockets, once this many packets
    /// have arrived from the other side.
    pub restart_after: Option<u64>,
}

/// What a participant saw: its `joined` message and how its publish connection ended up.
pub struct Outcome {
    pub joined: Value,
    pub state: RTCPeerConnectionState,
    /// The server's ICE ufrag in each `publish_answer`, in order.
    pub publish_ufrags: Vec<String>,
}

/// Joins, publishes one audio track and counts what arrives from `from` until `who.enough`
/// packets have arrived or the test ends. A therapist admits whoever waits.
pub async fn participant(
    who: Person,
    from: u8,
    ws_url: String,
    token: String,
    received: Arc<Tally>,
) -> Outcome {
    let mut signal = Signal::connect_url(&ws_url).await;
    signal.join(&token).await;
    let mut joined = Value::Null;
    let mut publish: Option<Pc> = None;
    let mut subscribe: Option<Pc> = None;
    let mut track: Option<Arc<TrackLocalStaticRTP>> = None;
    let mut sender: Option<tokio::task::JoinHandle<()>> = None;
    let mut publish_ufrags = Vec::new();
    let mut restarted = false;
    let deadline = tokio::time::Instant::now() + WAIT * 2;

    while received.got() < who.enough {
        let restart_due = who.restart_after.is_some_and(|n| received.got() >= n);
        if restart_due && !restarted && publish_ufrags.len() == 1 {
            restarted = true;
            let pc = publish.as_ref().expect("published before media arrived");
            let options = RTCOfferOptions { ice_restart: true };
            let offer = pc
                .pc
                .create_offer(Some(options))
                .await
                .expect("restart offer");
            pc.pc
                .set_local_description(offer)
                .await
                .expect("set restart offer");
            // Haven is ICE-lite and learns the new path from the checks; no candidates needed.
            let sdp = pc
                .pc
                .local_description()
                .await
                .expect("local description")
                .sdp;
            signal
                .send(json!({"type": "publish_offer", "sdp": sdp}))
                .await;
        }
        let next_track = async {
            match subscribe.as_mut() {
                Some(pc) => pc.tracks.recv().await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            m = signal.recv_within(Duration::from_millis(200)) => m,
            Some(t) = next_track => {
                tokio::spawn(count(t, from, received.clone()));
                continue;
            }
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: only {} packets from the other side",
            who.id,
            received.got()
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
                let servers = ice_servers(&msg);
                joined = msg;
                subscribe = Some(peer_connection(who.path, servers.clone()).await);
                let mut pc = peer_connection(who.path, servers).await;
                let t = audio_track(who.id, 0x5452_0000 + u32::from(who.index));
                pc.pc
                    .add_track(t.clone() as Arc<dyn TrackLocal>)
                    .await
                    .expect("add audio track");
                let offer = pc.pc.create_offer(None).await.expect("offer");
                pc.pc.set_local_description(offer).await.expect("set offer");
                let sdp = pc.gathered_sdp(who.path).await;
                signal
                    .send(json!({"type": "publish_offer", "sdp": sdp}))
                    .await;
                publish = Some(pc);
                track = Some(t);
            }
            "publish_answer" => {
                let pc = publish.as_ref().expect("answer follows our offer");
                let sdp = msg["sdp"].as_str().expect("sdp").to_owned();
                pc.pc
                    .set_remote_description(RTCSessionDescription::answer(sdp).expect("answer"))
                    .await
                    .expect("webrtc-rs accepts Haven's answer");
                publish_ufrags.push(ice_ufrag(&msg["sdp"]));
                // A later answer is the one to a restart; the sender keeps running.
                let Some(t) = track.take() else { continue };
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
                                ssrc: 0x5452_0000 + u32::from(index),
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
                pc.pc
                    .set_remote_description(RTCSessionDescription::offer(sdp).expect("offer"))
                    .await
                    .expect("webrtc-rs accepts Haven's offer");
                let answer = pc.pc.create_answer(None).await.expect("answer");
                pc.pc
                    .set_local_description(answer)
                    .await
                    .expect("set answer");
                let sdp = pc.gathered_sdp(who.path).await;
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
    let state = publish
        .as_ref()
        .map(|p| *p.state.borrow())
        .unwrap_or(RTCPeerConnectionState::New);
    if let Some(s) = sender {
        s.abort();
    }
    for pc in [publish, subscribe].into_iter().flatten() {
        let _ = pc.pc.close().await;
    }
    Outcome {
        joined,
        state,
        publish_ufrags,
    }
}

fn ice_ufrag(sdp: &Value) -> String {
    sdp.as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap_or_default()
        .to_owned()
}

/// A therapist and a client of one session, run side by side until each has received
/// enough from the other: the therapist starts first, so the client finds them and waits to
/// be admitted. The tallies are what the therapist (`[0]`) and the client (`[1]`) received.
pub struct Pair {
    pub therapist: Outcome,
    pub client: Outcome,
    pub got: [Arc<Tally>; 2],
}

/// Runs [`Pair`]; `None` when either participant failed (its panic is in the test output).
pub async fn therapist_and_client(
    server: &super::Server,
    session: &str,
    therapist: Person,
    client: Person,
) -> Option<Pair> {
    let got = [Arc::new(Tally::default()), Arc::new(Tally::default())];
    let token_t = server.token(session, therapist.role, therapist.id, &["--kind", "group"]);
    let token_c = server.token(session, client.role, client.id, &["--kind", "group"]);
    let (from_t, from_c) = (client.index, therapist.index);
    let t = tokio::spawn(participant(
        therapist,
        from_t,
        server.ws_url(),
        token_t,
        got[0].clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = tokio::spawn(participant(
        client,
        from_c,
        server.ws_url(),
        token_c,
        got[1].clone(),
    ));
    let (t, c) = tokio::join!(t, c);
    Some(Pair {
        therapist: t.ok()?,
        client: c.ok()?,
        got,
    })
}
