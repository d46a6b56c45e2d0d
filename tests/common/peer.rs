//! A webrtc-rs participant for the end-to-end media tests: joins over signaling, publishes one
//! audio track on its publish connection, answers Haven's offers on its subscribe connection
//! and counts what arrives from one other participant. It can reach Haven over UDP, through
//! TURN relays only or through the impairment proxy, and can restart ICE on its publish
//! connection from a new port.
//!
//! [`Member`] is a fuller participant for the impairment tests: it publishes a camera too (one
//! layer or three simulcast layers), records every packet it receives with its arrival and
//! send time, and restarts ICE on both connections when the test says so.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
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
use webrtc::rtp_transceiver::RtpSender;

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
    /// Over UDP through an impairment proxy (`common::proxy`) at this address: the client's
    /// copy of every SDP from Haven names the proxy instead of Haven's UDP port, and Haven's
    /// TCP candidate is dropped so that nothing bypasses the proxy.
    Proxy(SocketAddr),
}

impl Route {
    /// An SDP from Haven as this client must see it.
    pub fn server_sdp(self, sdp: &str) -> String {
        match self {
            Route::Proxy(proxy) => via_proxy(sdp, proxy),
            Route::Udp | Route::RelayOnly => sdp.to_owned(),
        }
    }
}

/// Rewrites Haven's SDP so that its UDP host candidates name `proxy`, and drops its TCP
/// candidates. Haven is ICE-lite: its candidates are all in its SDP, and it learns the
/// client's address from the checks, which then come from the proxy.
pub fn via_proxy(sdp: &str, proxy: SocketAddr) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_terminator("\r\n") {
        if let Some(candidate) = line.strip_prefix("a=candidate:") {
            // foundation component transport priority address port "typ" type ...
            let mut fields: Vec<String> = candidate.split(' ').map(str::to_owned).collect();
            let udp = fields.get(2).is_some_and(|t| t.eq_ignore_ascii_case("udp"));
            if !udp || fields.len() < 6 {
                continue;
            }
            fields[4] = proxy.ip().to_string();
            fields[5] = proxy.port().to_string();
            out.push_str("a=candidate:");
            out.push_str(&fields.join(" "));
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
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
        Route::Udp | Route::Proxy(_) => RTCConfigurationBuilder::new().build(),
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
                signal.admit_all(&msg).await;
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
                let sdp = who.path.server_sdp(msg["sdp"].as_str().expect("sdp"));
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
                let sdp = who.path.server_sdp(msg["sdp"].as_str().expect("sdp"));
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

// ---- members: participants that publish video, take a proxy route and restart ICE ----------
//
// The impairment tests need more than the audio-only [`participant`] above: a camera (one
// layer or three simulcast layers), every packet's arrival time and send time, a route
// through the impairment proxy, and ICE restarts on either connection on the test's command.

/// Marks this section's payloads, after the codec header.
const MEMBER_MAGIC: [u8; 4] = *b"HVIM";
/// Magic, publisher, kind, layer, flags, counter (4), part, parts, send time (4).
const MARK_LEN: usize = 18;
const AUDIO_PAYLOAD_LEN: usize = 80;
const VIDEO_FPS: u32 = 30;
/// Every publisher sends a keyframe on every layer this often; the SFU can switch a
/// subscriber to another layer only at one.
const KEYFRAME_EVERY_FRAMES: u32 = VIDEO_FPS;
/// The longest a member waits for a peer connection to connect before publishing anyway.
const CONNECT_WAIT: Duration = Duration::from_secs(20);

/// The test's clock origin, shared by every member in the process, so a receiver can tell
/// how long ago a packet was sent from the time written in it.
pub fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds from [`epoch`] to `at` (zero before it).
pub fn ms_since_epoch(at: Instant) -> u32 {
    at.saturating_duration_since(epoch()).as_millis() as u32
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Audio,
    Video,
}

/// A video layer, as the payload marks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    /// A camera that does not simulcast.
    Single,
    /// rid `q`.
    Low,
    /// rid `h`.
    Medium,
    /// rid `f`.
    High,
}

impl Layer {
    fn byte(self) -> u8 {
        match self {
            Layer::Single => b'-',
            Layer::Low => b'q',
            Layer::Medium => b'h',
            Layer::High => b'f',
        }
    }

    fn from_byte(b: u8) -> Option<Layer> {
        Some(match b {
            b'-' => Layer::Single,
            b'q' => Layer::Low,
            b'h' => Layer::Medium,
            b'f' => Layer::High,
            _ => return None,
        })
    }

    /// The simulcast rid, as the SDP and the rid header extension name it.
    pub fn rid(self) -> &'static str {
        match self {
            Layer::Single => "",
            Layer::Low => "q",
            Layer::Medium => "h",
            Layer::High => "f",
        }
    }
}

/// One encoding of a camera: every frame is `packets` packets of `packet_len` payload bytes.
#[derive(Clone, Copy, Debug)]
pub struct Encoding {
    pub layer: Layer,
    pub packets: u8,
    pub packet_len: usize,
    pub width: u16,
    pub height: u16,
}

impl Encoding {
    /// The payload bit rate at [`VIDEO_FPS`], without packet headers.
    pub fn kbps(&self) -> u64 {
        self.packets as u64 * self.packet_len as u64 * 8 * u64::from(VIDEO_FPS) / 1000
    }
}

/// Three layers as browsers send a 720p camera, payload only: about 144, 499 and 1498 kbit/s
/// (with headers about 160, 530 and 1590 kbit/s).
pub const SIMULCAST: [Encoding; 3] = [
    Encoding {
        layer: Layer::Low,
        packets: 1,
        packet_len: 600,
        width: 320,
        height: 180,
    },
    Encoding {
        layer: Layer::Medium,
        packets: 2,
        packet_len: 1040,
        width: 640,
        height: 360,
    },
    Encoding {
        layer: Layer::High,
        packets: 6,
        packet_len: 1040,
        width: 1280,
        height: 720,
    },
];

/// A single-layer camera of about 250 kbit/s of payload.
pub const SINGLE_LAYER: Encoding = Encoding {
    layer: Layer::Single,
    packets: 1,
    packet_len: 1040,
    width: 640,
    height: 360,
};

#[derive(Clone, Copy, Debug)]
pub enum Camera {
    Off,
    One(Encoding),
    Simulcast,
}

/// Who joins, and how.
#[derive(Clone, Debug)]
pub struct Member {
    pub id: &'static str,
    pub role: &'static str,
    /// Written into every payload this member publishes.
    pub index: u8,
    pub route: Route,
    pub camera: Camera,
    /// When set, the member tells Haven (`video_size`) it shows every other participant's
    /// camera at this size, once that camera is in a subscribe offer.
    pub shows_video_at: Option<(u32, u32)>,
}

/// Orders for a running member.
#[derive(Debug)]
pub enum Control {
    /// ICE restart on both connections: a restart offer on the publish connection (from new
    /// sockets) and `ice_restart` for the subscribe connection.
    RestartIce,
    /// Any signaling message.
    Send(Value),
    Leave,
}

/// One media packet as a member received it.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at: Instant,
    /// When the publisher sent it, in [`ms_since_epoch`].
    pub sent_ms: u32,
    /// Audio: the packet number; video: the frame number (the same on every layer).
    pub counter: u32,
    /// Video: which packet of the frame.
    pub part: u8,
    pub layer: Layer,
    pub keyframe: bool,
    /// The RTP sequence number as received (Haven's, for this subscriber).
    pub seq: u16,
}

/// Everything a member received, by publisher index and kind.
#[derive(Default)]
pub struct Seen {
    flows: Mutex<std::collections::HashMap<(u8, Kind), Vec<Arrival>>>,
    /// Payloads without a mark of this section, or on the wrong kind of track.
    pub foreign: AtomicU64,
}

impl Seen {
    pub fn arrivals(&self, publisher: u8, kind: Kind) -> Vec<Arrival> {
        self.flows
            .lock()
            .map(|f| f.get(&(publisher, kind)).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn count(&self, publisher: u8, kind: Kind) -> usize {
        self.flows
            .lock()
            .map(|f| f.get(&(publisher, kind)).map_or(0, Vec::len))
            .unwrap_or(0)
    }

    fn record(&self, publisher: u8, kind: Kind, a: Arrival) {
        if let Ok(mut f) = self.flows.lock() {
            f.entry((publisher, kind)).or_default().push(a);
        }
    }
}

/// What a member sent.
#[derive(Default)]
pub struct Sent {
    pub audio: AtomicU64,
    pub video_frames: AtomicU64,
    /// Video packets per layer: single, q, h, f.
    pub video_packets: [AtomicU64; 4],
    /// Writes the publish connection refused (before the answer, or while restarting).
    pub refused: AtomicU64,
}

/// What a member saw of signaling, kept for the test to read while it runs.
#[derive(Default)]
pub struct Said {
    messages: Mutex<Vec<(Instant, Value)>>,
}

impl Said {
    fn push(&self, msg: Value) {
        if let Ok(mut m) = self.messages.lock() {
            m.push((Instant::now(), msg));
        }
    }

    /// Every message of this type so far, with when it arrived.
    pub fn of_type(&self, kind: &str) -> Vec<(Instant, Value)> {
        self.messages
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v["type"] == kind)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn types(&self) -> Vec<String> {
        self.messages
            .lock()
            .map(|m| {
                m.iter()
                    .filter_map(|(_, v)| v["type"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// How a member's connections ended up.
#[derive(Debug, Default)]
pub struct MemberOutcome {
    /// Haven's ICE ufrag in each `publish_answer` and each `subscribe_offer`, in order.
    pub publish_ufrags: Vec<String>,
    pub subscribe_ufrags: Vec<String>,
    pub publish_state: Option<RTCPeerConnectionState>,
    pub subscribe_state: Option<RTCPeerConnectionState>,
}

/// A member joined and running in its own task.
pub struct Live {
    pub id: &'static str,
    pub index: u8,
    control: mpsc::UnboundedSender<Control>,
    pub seen: Arc<Seen>,
    pub sent: Arc<Sent>,
    pub said: Arc<Said>,
    task: tokio::task::JoinHandle<MemberOutcome>,
}

impl Live {
    pub fn restart_ice(&self) {
        let _ = self.control.send(Control::RestartIce);
    }

    pub fn send(&self, msg: Value) {
        let _ = self.control.send(Control::Send(msg));
    }

    /// The member's `joined` message, once it has one.
    pub fn joined(&self) -> Option<Value> {
        self.said
            .of_type("joined")
            .into_iter()
            .next()
            .map(|(_, v)| v)
    }

    /// Leaves and waits for the task; panics with the member's own panic if it failed.
    pub async fn leave(self) -> MemberOutcome {
        let _ = self.control.send(Control::Leave);
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => panic!("{}: member task failed: {e}", self.id),
            Err(_) => panic!("{}: member did not leave within {WAIT:?}", self.id),
        }
    }
}

impl Member {
    /// Mints the member's token for a group session and starts it.
    pub fn start(self, server: &super::Server, session: &str) -> Live {
        let token = server.token(session, self.role, self.id, &["--kind", "group"]);
        let (control, orders) = mpsc::unbounded_channel();
        let seen = Arc::new(Seen::default());
        let sent = Arc::new(Sent::default());
        let said = Arc::new(Said::default());
        let (id, index) = (self.id, self.index);
        let task = tokio::spawn(run_member(
            self,
            server.ws_url(),
            token,
            orders,
            seen.clone(),
            sent.clone(),
            said.clone(),
        ));
        Live {
            id,
            index,
            control,
            seen,
            sent,
            said,
            task,
        }
    }
}

/// An SDES text value (mid, rid) for a header extension.
struct SdesText(String);

impl rtc::shared::marshal::MarshalSize for SdesText {
    fn marshal_size(&self) -> usize {
        self.0.len()
    }
}

impl rtc::shared::marshal::Marshal for SdesText {
    fn marshal_to(&self, buf: &mut [u8]) -> rtc::shared::error::Result<usize> {
        let n = self.0.len();
        let Some(to) = buf.get_mut(..n) else {
            return Err(rtc::shared::error::Error::ErrBufferTooSmall);
        };
        to.copy_from_slice(self.0.as_bytes());
        Ok(n)
    }
}

fn sdes(uri: &'static str, value: &str) -> rtc::rtp::extension::HeaderExtension {
    rtc::rtp::extension::HeaderExtension::Custom {
        uri: uri.into(),
        extension: Box::new(SdesText(value.to_owned())),
    }
}

const SDES_MID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const SDES_RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";

fn audio_ssrc(index: u8) -> u32 {
    0x4849_0000 + u32::from(index) * 16
}

fn video_ssrc(index: u8, layer: Layer) -> u32 {
    audio_ssrc(index) + 1 + layer as u32
}

/// A camera track: one encoding, or the three simulcast layers each with its rid.
fn camera_track(who: &str, index: u8, encodings: &[Encoding]) -> Arc<TrackLocalStaticRTP> {
    let codec = RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    };
    let encodings = encodings
        .iter()
        .map(|e| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: e.layer.rid().to_owned(),
                ssrc: Some(video_ssrc(index, e.layer)),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        })
        .collect();
    let track = MediaStreamTrack::new(
        format!("{who}-stream"),
        format!("{who}-video"),
        format!("{who}-video"),
        RtpCodecKind::Video,
        encodings,
    );
    Arc::new(TrackLocalStaticRTP::new(track))
}

/// The mark after the codec header of every payload a member sends.
#[allow(clippy::too_many_arguments)]
fn mark(
    out: &mut Vec<u8>,
    publisher: u8,
    kind: Kind,
    layer: Layer,
    keyframe: bool,
    counter: u32,
    part: u8,
    parts: u8,
) {
    out.extend_from_slice(&MEMBER_MAGIC);
    out.push(publisher);
    out.push(match kind {
        Kind::Audio => b'a',
        Kind::Video => b'v',
    });
    out.push(layer.byte());
    out.push(u8::from(keyframe));
    out.extend_from_slice(&counter.to_be_bytes());
    out.push(part);
    out.push(parts);
    out.extend_from_slice(&ms_since_epoch(Instant::now()).to_be_bytes());
}

fn member_audio_payload(publisher: u8, n: u32) -> Bytes {
    // Opus TOC byte: CELT fullband 20 ms, one frame.
    let mut p = vec![0xF8];
    mark(
        &mut p,
        publisher,
        Kind::Audio,
        Layer::Single,
        false,
        n,
        0,
        1,
    );
    p.resize(AUDIO_PAYLOAD_LEN, publisher);
    Bytes::from(p)
}

/// One packet of a VP8 frame (RFC 7741): a payload descriptor with a 15-bit PictureID, and on
/// the frame's first packet the frame header (a keyframe's with its start code and size).
fn member_video_payload(publisher: u8, e: &Encoding, frame: u32, part: u8, key: bool) -> Bytes {
    let start = part == 0;
    let [pid_hi, pid_lo] = ((frame & 0x7FFF) as u16).to_be_bytes();
    // X=1, S on the frame's first packet, partition 0; I=1; M=1 and the PictureID.
    let mut p = vec![
        0x80 | if start { 0x10 } else { 0 },
        0x80,
        0x80 | pid_hi,
        pid_lo,
    ];
    if start {
        let first_partition = (e.packet_len / 2) as u32;
        // Frame tag: P=0 for a keyframe, version 0, show_frame, first partition size.
        let tag = (first_partition << 5) | (1 << 4) | u32::from(!key);
        p.extend_from_slice(&tag.to_le_bytes()[..3]);
        if key {
            p.extend_from_slice(&[0x9D, 0x01, 0x2A]);
            p.extend_from_slice(&e.width.to_le_bytes());
            p.extend_from_slice(&e.height.to_le_bytes());
        }
    }
    mark(
        &mut p,
        publisher,
        Kind::Video,
        e.layer,
        key,
        frame,
        part,
        e.packets,
    );
    p.resize(e.packet_len, frame as u8);
    Bytes::from(p)
}

/// Reads a mark anywhere in the first bytes of a payload (an SFU may rewrite the VP8
/// descriptor, never the data after it).
fn read_mark(payload: &[u8]) -> Option<(u8, Kind, Arrival)> {
    let head = payload.get(..payload.len().min(48))?;
    let at = head.windows(4).position(|w| w == MEMBER_MAGIC)?;
    let m = payload.get(at..at + MARK_LEN)?;
    let kind = match m[5] {
        b'a' => Kind::Audio,
        b'v' => Kind::Video,
        _ => return None,
    };
    let arrival = Arrival {
        at: Instant::now(),
        sent_ms: u32::from_be_bytes([m[14], m[15], m[16], m[17]]),
        counter: u32::from_be_bytes([m[8], m[9], m[10], m[11]]),
        part: m[12],
        layer: Layer::from_byte(m[6])?,
        keyframe: m[7] == 1,
        seq: 0,
    };
    Some((m[4], kind, arrival))
}

async fn read_member_track(track: Arc<dyn TrackRemote>, seen: Arc<Seen>) {
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(pkt) = event else {
            continue;
        };
        match read_mark(&pkt.payload) {
            Some((publisher, kind, mut arrival)) => {
                arrival.seq = pkt.header.sequence_number;
                seen.record(publisher, kind, arrival);
            }
            None => {
                seen.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The payload type the answer gave `mime` on this sender.
async fn negotiated_pt(sender: &Arc<dyn RtpSender>, mime: &str) -> Option<u8> {
    let params = sender.get_parameters().await.ok()?;
    params
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
}

/// The mid of the first `m=video` section of an SDP.
fn video_mid(sdp: &str) -> Option<String> {
    let mut in_video = false;
    for line in sdp.lines() {
        if line.starts_with("m=") {
            in_video = line.starts_with("m=video");
        } else if in_video {
            if let Some(mid) = line.strip_prefix("a=mid:") {
                return Some(mid.trim().to_owned());
            }
        }
    }
    None
}

struct CameraTrack {
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    encodings: Vec<Encoding>,
}

/// What a member publishes, from its offer until the first answer starts the media.
struct Tracks {
    audio: Arc<TrackLocalStaticRTP>,
    audio_sender: Arc<dyn RtpSender>,
    camera: Option<CameraTrack>,
}

/// Publishes audio every 20 ms and camera frames at [`VIDEO_FPS`] once the publish connection
/// is up, until aborted. Writes refused while the connection renegotiates are counted, not
/// fatal.
async fn publish_media(
    index: u8,
    mut state: watch::Receiver<RTCPeerConnectionState>,
    pc: Arc<dyn PeerConnection>,
    tracks: Tracks,
    sent: Arc<Sent>,
) {
    let Tracks {
        audio,
        audio_sender,
        camera,
    } = tracks;
    let up = state.wait_for(|s| *s == RTCPeerConnectionState::Connected);
    let _ = tokio::time::timeout(CONNECT_WAIT, up).await;
    let audio_pt = negotiated_pt(&audio_sender, MIME_TYPE_OPUS)
        .await
        .unwrap_or(111);
    let (video_pt, mid) = match &camera {
        Some(c) => {
            let pt = negotiated_pt(&c.sender, MIME_TYPE_VP8).await.unwrap_or(96);
            let sdp = pc.local_description().await.map(|d| d.sdp);
            let mid = sdp.as_deref().and_then(video_mid).unwrap_or_default();
            (pt, mid)
        }
        None => (0, String::new()),
    };
    // With simulcast, the mid and rid header extensions tell Haven which layer a packet is
    // (the SDP lists no SSRCs then); webrtc-rs does not add them itself.

    let mut audio_tick = tokio::time::interval(AUDIO_INTERVAL);
    let mut video_tick = tokio::time::interval(Duration::from_micros(1_000_000 / 30));
    video_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut video_seq = [0u16; 4];
    let (mut a, mut frame) = (0u32, 0u32);
    loop {
        tokio::select! {
            _ = audio_tick.tick() => {
                let pkt = rtc::rtp::Packet {
                    header: rtc::rtp::Header {
                        version: 2,
                        payload_type: audio_pt,
                        sequence_number: a as u16,
                        timestamp: a.wrapping_mul(960),
                        ssrc: audio_ssrc(index),
                        ..Default::default()
                    },
                    payload: member_audio_payload(index, a),
                };
                a += 1;
                match audio.write_rtp(pkt).await {
                    Ok(()) => sent.audio.fetch_add(1, Ordering::Relaxed),
                    Err(_) => sent.refused.fetch_add(1, Ordering::Relaxed),
                };
            }
            _ = video_tick.tick(), if camera.is_some() => {
                let Some(c) = &camera else { continue };
                let key = frame.is_multiple_of(KEYFRAME_EVERY_FRAMES);
                let simulcast = c.encodings.len() > 1;
                for e in &c.encodings {
                    for part in 0..e.packets {
                        let seq = &mut video_seq[e.layer as usize];
                        let pkt = rtc::rtp::Packet {
                            header: rtc::rtp::Header {
                                version: 2,
                                marker: part + 1 == e.packets,
                                payload_type: video_pt,
                                sequence_number: *seq,
                                timestamp: frame.wrapping_mul(90_000 / VIDEO_FPS),
                                ssrc: video_ssrc(index, e.layer),
                                ..Default::default()
                            },
                            payload: member_video_payload(index, e, frame, part, key),
                        };
                        *seq = seq.wrapping_add(1);
                        let written = if simulcast {
                            let exts = [sdes(SDES_MID_URI, &mid), sdes(SDES_RID_URI, e.layer.rid())];
                            c.track.write_rtp_with_extensions(pkt, &exts).await
                        } else {
                            c.track.write_rtp(pkt).await
                        };
                        match written {
                            Ok(()) => sent.video_packets[e.layer as usize].fetch_add(1, Ordering::Relaxed),
                            Err(_) => sent.refused.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
                frame += 1;
                sent.video_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs one member until told to leave: joins, publishes, answers Haven's subscribe offers,
/// records what arrives and what signaling says, and follows the test's orders.
async fn run_member(
    who: Member,
    ws_url: String,
    token: String,
    mut orders: mpsc::UnboundedReceiver<Control>,
    seen: Arc<Seen>,
    sent: Arc<Sent>,
    said: Arc<Said>,
) -> MemberOutcome {
    let mut signal = Signal::connect_url(&ws_url).await;
    signal.join(&token).await;
    let mut publish: Option<Pc> = None;
    let mut subscribe: Option<Pc> = None;
    let mut to_publish: Option<Tracks> = None;
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut negotiation = 0u64;
    let mut sized: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut outcome = MemberOutcome::default();

    loop {
        let next_track = async {
            match subscribe.as_mut() {
                Some(pc) => pc.tracks.recv().await,
                None => std::future::pending().await,
            }
        };
        let asked = Instant::now();
        let msg = tokio::select! {
            order = orders.recv() => {
                match order {
                    Some(Control::RestartIce) => {
                        if let Some(pc) = publish.as_ref() {
                            let options = RTCOfferOptions { ice_restart: true };
                            let offer = pc.pc.create_offer(Some(options)).await.expect("restart offer");
                            pc.pc.set_local_description(offer).await.expect("set restart offer");
                            // Haven is ICE-lite and learns the new path from the checks.
                            let sdp = pc.pc.local_description().await.expect("local description").sdp;
                            negotiation += 1;
                            signal
                                .send(json!({"type": "publish_offer", "negotiation": negotiation, "sdp": sdp}))
                                .await;
                        }
                        signal.send(json!({"type": "ice_restart"})).await;
                    }
                    Some(Control::Send(v)) => signal.send(v).await,
                    Some(Control::Leave) | None => {
                        let _ = signal.try_send(json!({"type": "leave"})).await;
                        break;
                    }
                }
                continue;
            }
            Some(t) = next_track => {
                tasks.push(tokio::spawn(read_member_track(t, seen.clone())));
                continue;
            }
            m = signal.recv_within(Duration::from_secs(1)) => m,
        };
        let Some(msg) = msg else {
            // `None` at once means the socket closed; after the wait, only quiet.
            if asked.elapsed() < Duration::from_millis(900) {
                said.push(json!({"type": "socket_closed"}));
                // Wait for the test's order to leave rather than spin.
                while let Some(order) = orders.recv().await {
                    if matches!(order, Control::Leave) {
                        break;
                    }
                }
                break;
            }
            continue;
        };
        said.push(msg.clone());
        match msg["type"].as_str().unwrap_or_default() {
            "waiting_list" if who.role == "therapist" => {
                signal.admit_all(&msg).await;
            }
            "joined" => {
                let servers = ice_servers(&msg);
                subscribe = Some(peer_connection(who.route, servers.clone()).await);
                let mut pc = peer_connection(who.route, servers).await;
                let audio = audio_track(who.id, audio_ssrc(who.index));
                let audio_sender = pc
                    .pc
                    .add_track(audio.clone() as Arc<dyn TrackLocal>)
                    .await
                    .expect("add audio track");
                let encodings = match who.camera {
                    Camera::Off => Vec::new(),
                    Camera::One(e) => vec![e],
                    Camera::Simulcast => SIMULCAST.to_vec(),
                };
                let camera = if encodings.is_empty() {
                    None
                } else {
                    let track = camera_track(who.id, who.index, &encodings);
                    let sender = pc
                        .pc
                        .add_track(track.clone() as Arc<dyn TrackLocal>)
                        .await
                        .expect("add camera track");
                    Some(CameraTrack {
                        track,
                        sender,
                        encodings,
                    })
                };
                let offer = pc.pc.create_offer(None).await.expect("offer");
                pc.pc.set_local_description(offer).await.expect("set offer");
                let sdp = pc.gathered_sdp(who.route).await;
                negotiation += 1;
                signal
                    .send(json!({"type": "publish_offer", "negotiation": negotiation, "sdp": sdp}))
                    .await;
                publish = Some(pc);
                to_publish = Some(Tracks {
                    audio,
                    audio_sender,
                    camera,
                });
            }
            "publish_answer" => {
                let pc = publish.as_ref().expect("an answer follows our offer");
                let sdp = who.route.server_sdp(msg["sdp"].as_str().expect("sdp"));
                pc.pc
                    .set_remote_description(RTCSessionDescription::answer(sdp).expect("answer"))
                    .await
                    .expect("webrtc-rs accepts Haven's answer");
                outcome.publish_ufrags.push(ice_ufrag(&msg["sdp"]));
                // The first answer starts the media; later ones (restarts) leave it running.
                if let Some(tracks) = to_publish.take() {
                    tasks.push(tokio::spawn(publish_media(
                        who.index,
                        pc.state.clone(),
                        pc.pc.clone(),
                        tracks,
                        sent.clone(),
                    )));
                }
            }
            "subscribe_offer" => {
                let number = msg["negotiation"].as_u64().expect("negotiation");
                let pc = subscribe.as_mut().expect("made at joined");
                let sdp = who.route.server_sdp(msg["sdp"].as_str().expect("sdp"));
                pc.pc
                    .set_remote_description(RTCSessionDescription::offer(sdp).expect("offer"))
                    .await
                    .expect("webrtc-rs accepts Haven's offer");
                let answer = pc.pc.create_answer(None).await.expect("answer");
                pc.pc
                    .set_local_description(answer)
                    .await
                    .expect("set answer");
                let sdp = pc.gathered_sdp(who.route).await;
                signal
                    .send(json!({"type": "subscribe_answer", "negotiation": number, "sdp": sdp}))
                    .await;
                outcome.subscribe_ufrags.push(ice_ufrag(&msg["sdp"]));
                let Some((width, height)) = who.shows_video_at else {
                    continue;
                };
                for t in msg["tracks"].as_array().into_iter().flatten() {
                    let Some(publisher) = t["participant_id"].as_str() else {
                        continue;
                    };
                    if t["kind"] == "video" && t["active"] == true && sized.insert(publisher.into())
                    {
                        signal
                            .send(json!({"type": "video_size", "participant_id": publisher,
                                "width": width, "height": height}))
                            .await;
                    }
                }
            }
            _ => {}
        }
    }

    outcome.publish_state = publish.as_ref().map(|p| *p.state.borrow());
    outcome.subscribe_state = subscribe.as_ref().map(|p| *p.state.borrow());
    for t in tasks {
        t.abort();
    }
    for pc in [publish, subscribe].into_iter().flatten() {
        let _ = pc.pc.close().await;
    }
    outcome
}
