//! Media over the paths a home network leaves open: a participant whose client can only use
//! TCP (UDP blocked) still exchanges audio with one on UDP, through Haven's ICE-TCP port.
//!
//! The clients are webrtc-rs. The TCP-only client has no UDP socket at all, so the only pair
//! it can form is its active TCP candidate with Haven's passive one (RFC 6544), and every
//! packet in both directions is RFC 4571-framed on that connection. A second test moves that
//! client: it drops both TCP connections and restarts ICE on both peer connections, dialling
//! Haven again from new local ports, and must keep its media, its subscription and its stay.
//!
//! The tests must run in a private network namespace (see `common::require_netns`).

mod common;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    build_peer_connection(path, false).await
}

/// A peer connection that moves on an ICE restart: it drops its sockets, and with them its
/// TCP connections to Haven, and binds new ones, as a client that changed networks would.
/// A TCP-only one then dials Haven again, from a new local port, once it is handed Haven's
/// TCP candidate again (see [`Pc::trickle_tcp`]).
async fn moving_peer_connection(path: Path) -> Pc {
    build_peer_connection(path, true).await
}

async fn build_peer_connection(path: Path, moves_on_restart: bool) -> Pc {
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .expect("the default codecs register on an empty engine");
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .expect("default interceptors register");
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_discard_local_candidates_during_ice_restart(moves_on_restart)
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
        self.set_remote_description(desc, path).await;
        self.trickle_tcp(&sdp, path).await;
    }

    /// The description half of [`Pc::set_remote`]: Haven's description, without its UDP
    /// candidate on a TCP-only client.
    async fn set_remote_description(&self, desc: RTCSessionDescription, path: Path) {
        let desc = if path == Path::TcpOnly {
            let kept: Vec<&str> = desc
                .sdp
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
    }

    /// The trickle half of [`Pc::set_remote`]: a TCP-only client dials each of Haven's TCP
    /// candidates in `sdp`.
    async fn trickle_tcp(&self, sdp: &str, path: Path) {
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

/// A publish connection with the person's audio track added.
async fn with_audio(pc: Pc, who: &Person) -> (Pc, Arc<TrackLocalStaticRTP>) {
    let track = audio_track(who.id, 0x4e50_0000 + u32::from(who.index));
    pc.pc
        .add_track(track.clone() as Arc<dyn TrackLocal>)
        .await
        .expect("add audio track");
    (pc, track)
}

/// Creates an offer, sets it, and returns it with the gathered candidates.
async fn offer_sdp(pc: &mut Pc) -> String {
    let offer = pc.pc.create_offer(None).await.expect("offer");
    pc.pc.set_local_description(offer).await.expect("set offer");
    pc.gathered_sdp().await
}

/// Audio packet `n` of participant `index`: its number in the payload, Opus-sized.
fn audio_packet(index: u8, n: u32) -> rtc::rtp::Packet {
    rtc::rtp::Packet {
        header: rtc::rtp::Header {
            version: 2,
            payload_type: 111,
            sequence_number: n as u16,
            timestamp: n.wrapping_mul(960),
            ssrc: 0x4e50_0000 + u32::from(index),
            ..Default::default()
        },
        payload: payload(index, n),
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
                signal.admit_all(&msg).await;
            }
            "joined" => {
                subscribe = Some(peer_connection(who.path).await);
                let (mut pc, t) = with_audio(peer_connection(who.path).await, &who).await;
                let sdp = offer_sdp(&mut pc).await;
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
                        let pkt = audio_packet(index, n);
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

// ---- an ICE restart over TCP ---------------------------------------------------------------
//
// The TCP-only client moves: its sockets, and with them both TCP connections to Haven, are
// dropped, and it restarts ICE on both connections from new ones. It offers new credentials
// on its publish connection and asks Haven (`ice_restart`) for an offer with new ones on its
// subscribe connection, then dials Haven's TCP port again from new local ports. The new
// connections carry only the new ufrags, so only the restart can route them.

const RESTART_SESSION: &str = "sess-net-tcp-restart";
/// Packets each side receives from the other before the client moves: one second of audio.
const BEFORE_MOVE: u64 = 50;
/// Packets sent after the move that each side must receive: two seconds of audio.
const AFTER_MOVE: u64 = 100;
/// The longest either direction may take to come back after the move. Well inside Haven's
/// media timeout (4 s), past which the client's media would be recorded as lost.
const MAX_RESUME: Duration = Duration::from_secs(3);

/// Orders for a running [`Live`] participant.
#[derive(Debug)]
enum Order {
    /// Drop both connections' sockets and restart ICE on both (see the section comment).
    Move,
    Leave,
}

/// What a live participant received, sent and heard.
#[derive(Default)]
struct Shared {
    /// Each packet from the other participant: when it arrived and its counter.
    arrivals: Mutex<Vec<(Instant, u32)>>,
    /// Packets from anyone else, or not from this test.
    bad: AtomicU64,
    /// Packets handed to the publish track so far, which is the next one's counter.
    sent: AtomicU32,
    /// Writes the publish connection refused (while it restarts, for example).
    refused: AtomicU64,
    /// Remote tracks the subscribe connection announced.
    tracks: AtomicU64,
    /// Every signaling message received, in order.
    said: Mutex<Vec<Value>>,
}

impl Shared {
    fn received(&self) -> u64 {
        self.arrivals.lock().map_or(0, |a| a.len() as u64)
    }

    /// Packets received whose counter is `first` or later: sent after the publisher's
    /// counter read `first`.
    fn received_from(&self, first: u32) -> u64 {
        self.arrivals
            .lock()
            .map_or(0, |a| a.iter().filter(|(_, n)| *n >= first).count() as u64)
    }

    /// The longest silence between `from` and the last arrival before `to`, counting `from`
    /// as its first edge, and when it ended: the moment media came back, when the silence is
    /// the outage of a move. `None` when nothing arrived.
    fn longest_silence(&self, from: Instant, to: Instant) -> Option<(Duration, Instant)> {
        let arrivals = self.arrivals.lock().map(|a| a.clone()).unwrap_or_default();
        let mut longest: Option<(Duration, Instant)> = None;
        let mut last = from;
        for (at, _) in arrivals.iter().filter(|(at, _)| *at > from && *at <= to) {
            if longest.is_none_or(|(gap, _)| *at - last > gap) {
                longest = Some((*at - last, *at));
            }
            last = *at;
        }
        longest
    }

    fn said(&self, kind: &str) -> Vec<Value> {
        self.said
            .lock()
            .map(|m| m.iter().filter(|v| v["type"] == kind).cloned().collect())
            .unwrap_or_default()
    }

    fn hear(&self, msg: Value) {
        if let Ok(mut m) = self.said.lock() {
            m.push(msg);
        }
    }
}

/// Records the packets a participant received from `from`.
async fn record(track: Arc<dyn TrackRemote>, from: u8, shared: Arc<Shared>) {
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(pkt) = event else {
            continue;
        };
        let p = &pkt.payload;
        let ours = p.get(1..5) == Some(&MAGIC[..]) && p.get(5) == Some(&from);
        let counter = p
            .get(6..10)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes);
        match counter {
            Some(n) if ours => {
                if let Ok(mut a) = shared.arrivals.lock() {
                    a.push((Instant::now(), n));
                }
            }
            _ => {
                shared.bad.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Publishes audio every 20 ms once the publish connection is up, until aborted. Writes
/// refused while the connection restarts are counted, not fatal.
async fn send_audio(
    index: u8,
    mut state: watch::Receiver<RTCPeerConnectionState>,
    track: Arc<TrackLocalStaticRTP>,
    shared: Arc<Shared>,
) {
    let up = state.wait_for(|s| *s == RTCPeerConnectionState::Connected);
    let _ = tokio::time::timeout(WAIT, up).await;
    let mut tick = tokio::time::interval(AUDIO_INTERVAL);
    loop {
        tick.tick().await;
        let n = shared.sent.fetch_add(1, Ordering::Relaxed);
        let pkt = audio_packet(index, n);
        if track.write_rtp(pkt).await.is_err() {
            shared.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How a live participant's connections ended up.
#[derive(Debug)]
struct Ends {
    publish: Option<RTCPeerConnectionState>,
    subscribe: Option<RTCPeerConnectionState>,
}

/// A participant running in its own task until told to leave.
struct Live {
    id: &'static str,
    orders: mpsc::UnboundedSender<Order>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<Ends>,
}

impl Live {
    /// Joins `who` to the restart session; it records what arrives from publisher `from`.
    fn start(server: &Server, who: Person, from: u8) -> Live {
        let token = server.token(RESTART_SESSION, who.role, who.id, &["--kind", "group"]);
        let (orders, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let id = who.id;
        let task = tokio::spawn(run_live(
            who,
            from,
            server.ws_url(),
            token,
            rx,
            shared.clone(),
        ));
        Live {
            id,
            orders,
            shared,
            task,
        }
    }

    fn order(&self, order: Order) {
        self.orders
            .send(order)
            .unwrap_or_else(|e| panic!("{}: task gone: {e}", self.id));
    }

    /// Leaves (once Haven confirmed it) and waits for the task.
    async fn leave(self) -> Ends {
        let _ = self.orders.send(Order::Leave);
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(ends)) => ends,
            Ok(Err(e)) => panic!("{}: task failed: {e}", self.id),
            Err(_) => panic!("{}: did not leave within {WAIT:?}", self.id),
        }
    }
}

/// Joins, publishes one audio track, answers Haven's subscribe offers and records what
/// arrives, following the test's orders. A therapist admits whoever waits. Every SDP exchange
/// carries Haven's TCP candidates back to a TCP-only client after its own description is set:
/// on a restart that is what makes it dial from its new sockets, not the dropped ones.
async fn run_live(
    who: Person,
    from: u8,
    ws_url: String,
    token: String,
    mut orders: mpsc::UnboundedReceiver<Order>,
    shared: Arc<Shared>,
) -> Ends {
    let mut signal = Signal::connect_url(&ws_url).await;
    signal.join(&token).await;
    let mut publish: Option<Pc> = None;
    let mut subscribe: Option<Pc> = None;
    let mut to_publish: Option<Arc<TrackLocalStaticRTP>> = None;
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut negotiation = 0u64;
    let mut socket_open = true;

    loop {
        let next_track = async {
            match subscribe.as_mut() {
                Some(pc) => pc.tracks.recv().await,
                None => std::future::pending().await,
            }
        };
        let next_msg = async {
            if !socket_open {
                return std::future::pending().await;
            }
            let asked = Instant::now();
            let msg = signal.recv_within(Duration::from_millis(500)).await;
            // `None` at once is a closed socket; after the wait, only quiet.
            (msg, asked.elapsed() < Duration::from_millis(400))
        };
        let msg = tokio::select! {
            order = orders.recv() => {
                match order {
                    Some(Order::Move) => {
                        let pc = publish.as_ref().expect("publishing before the move");
                        let restart = RTCOfferOptions { ice_restart: true };
                        let offer = pc.pc.create_offer(Some(restart)).await.expect("restart offer");
                        pc.pc.set_local_description(offer).await.expect("set restart offer");
                        // Haven is ICE-lite and learns the new path from the checks.
                        let sdp = pc.pc.local_description().await.expect("local description").sdp;
                        negotiation += 1;
                        signal
                            .send(json!({"type": "publish_offer", "negotiation": negotiation, "sdp": sdp}))
                            .await;
                        signal.send(json!({"type": "ice_restart"})).await;
                    }
                    Some(Order::Leave) | None => {
                        if socket_open && signal.try_send(json!({"type": "leave"})).await {
                            // Until Haven confirms: the departure is recorded by then.
                            while let Some(m) = signal.recv_within(WAIT).await {
                                let left = m["type"] == "left";
                                shared.hear(m);
                                if left {
                                    break;
                                }
                            }
                        }
                        break;
                    }
                }
                continue;
            }
            Some(t) = next_track => {
                shared.tracks.fetch_add(1, Ordering::Relaxed);
                tasks.push(tokio::spawn(record(t, from, shared.clone())));
                continue;
            }
            (m, at_once) = next_msg => match m {
                Some(m) => m,
                None => {
                    if at_once {
                        socket_open = false;
                        shared.hear(json!({"type": "socket_closed"}));
                    }
                    continue;
                }
            },
        };
        shared.hear(msg.clone());
        match msg["type"].as_str().unwrap_or_default() {
            "waiting_list" if who.role == "therapist" => {
                signal.admit_all(&msg).await;
            }
            "joined" => {
                subscribe = Some(moving_peer_connection(who.path).await);
                let (mut pc, track) =
                    with_audio(moving_peer_connection(who.path).await, &who).await;
                let sdp = offer_sdp(&mut pc).await;
                negotiation += 1;
                signal
                    .send(json!({"type": "publish_offer", "negotiation": negotiation, "sdp": sdp}))
                    .await;
                publish = Some(pc);
                to_publish = Some(track);
            }
            "publish_answer" => {
                let pc = publish.as_ref().expect("an answer follows our offer");
                let sdp = msg["sdp"].as_str().expect("sdp");
                let answer = RTCSessionDescription::answer(sdp.to_owned()).expect("answer");
                pc.set_remote_description(answer, who.path).await;
                pc.trickle_tcp(sdp, who.path).await;
                // The first answer starts the media; the restart's leaves it running.
                if let Some(track) = to_publish.take() {
                    let state = pc.state.clone();
                    tasks.push(tokio::spawn(send_audio(
                        who.index,
                        state,
                        track,
                        shared.clone(),
                    )));
                }
            }
            "subscribe_offer" => {
                let number = msg["negotiation"].as_u64().expect("negotiation");
                let pc = subscribe.as_mut().expect("made at joined");
                let sdp = msg["sdp"].as_str().expect("sdp");
                let offer = RTCSessionDescription::offer(sdp.to_owned()).expect("offer");
                pc.set_remote_description(offer, who.path).await;
                let answer = pc.pc.create_answer(None).await.expect("answer");
                pc.pc
                    .set_local_description(answer)
                    .await
                    .expect("set answer");
                let local = pc.gathered_sdp().await;
                signal
                    .send(json!({"type": "subscribe_answer", "negotiation": number, "sdp": local}))
                    .await;
                // After our answer is set: on a restart, setting it replaces webrtc-rs's
                // sockets and TCP transport, and a connection dialled before could go with them.
                pc.trickle_tcp(sdp, who.path).await;
            }
            _ => {}
        }
    }

    let ends = Ends {
        publish: publish.as_ref().map(|p| *p.state.borrow()),
        subscribe: subscribe.as_ref().map(|p| *p.state.borrow()),
    };
    for t in tasks {
        t.abort();
    }
    for pc in [publish, subscribe].into_iter().flatten() {
        let _ = pc.pc.close().await;
    }
    ends
}

/// Polls `done` every 20 ms until it holds or `limit` passes; returns whether it held.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Haven's media port (UDP and ICE-TCP), from its start-up line.
async fn media_port(server: &Server) -> u16 {
    let find = || {
        server
            .log_text()
            .split_whitespace()
            .find_map(|w| w.strip_prefix("media="))
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
    };
    // The line reaches the log a moment after `Server::start` has read it.
    until(WAIT, || find().is_some()).await;
    find().unwrap_or_else(|| panic!("no media address in the log:\n{}", server.log_text()))
}

/// The local ports of the established TCP connections to `port` in this network namespace,
/// from the kernel's socket tables: the TCP-only client's connections to Haven's media port.
fn tcp_connections_to(port: u16) -> Vec<u16> {
    let port_of = |a: &str| {
        a.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; state 01 is ESTABLISHED.
            let (Some(local), Some(remote)) = (
                f.get(1).and_then(|a| port_of(a)),
                f.get(2).and_then(|a| port_of(a)),
            ) else {
                continue;
            };
            if remote == port && f.get(3) == Some(&"01") {
                ports.push(local);
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// The ICE ufrag of an SDP in a signaling message.
fn ufrag(msg: &Value) -> String {
    msg["sdp"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_only_client_moves_and_restarts_ice_keeping_media_subscriptions_and_stay() {
    common::require_netns("network_paths");
    let server = Server::start();
    let port = media_port(&server).await;
    let started = Instant::now();
    let t = Live::start(
        &server,
        Person {
            id: "t-net-2",
            role: "therapist",
            index: 3,
            path: Path::Udp,
        },
        4,
    );
    // The therapist first, so the client finds them there and waits to be admitted.
    let present = until(WAIT, || !t.shared.said("joined").is_empty()).await;
    assert!(present, "the therapist joined\n{}", server.log_text());
    let c = Live::start(
        &server,
        Person {
            id: "p-net-2",
            role: "client",
            index: 4,
            path: Path::TcpOnly,
        },
        3,
    );

    // Audio both ways over ICE-TCP, on one TCP connection per peer connection.
    let flowing = until(WAIT, || {
        t.shared.received() >= BEFORE_MOVE && c.shared.received() >= BEFORE_MOVE
    })
    .await;
    assert!(
        flowing,
        "before the move: therapist got {}, client got {}\n--- server log ---\n{}",
        t.shared.received(),
        c.shared.received(),
        server.log_text()
    );
    let before = tcp_connections_to(port);
    assert_eq!(
        before.len(),
        2,
        "publish and subscribe over TCP: {before:?}"
    );
    let offers_before = c.shared.said("subscribe_offer");
    let setup = started.elapsed();

    // The move. Packets counted from here on were sent after it.
    let (from_t, from_c) = (
        t.shared.sent.load(Ordering::Relaxed),
        c.shared.sent.load(Ordering::Relaxed),
    );
    let moved_at = Instant::now();
    c.order(Order::Move);
    let resumed = until(WAIT, || {
        t.shared.received_from(from_c) >= AFTER_MOVE && c.shared.received_from(from_t) >= AFTER_MOVE
    })
    .await;
    let end = Instant::now();
    let after = tcp_connections_to(port);

    // Resumed: when the longest silence after the move ended, measured from the move.
    let silence_to_t = t.shared.longest_silence(moved_at, end);
    let silence_to_c = c.shared.longest_silence(moved_at, end);
    let resume_to_t = silence_to_t.map(|(_, back)| back - moved_at);
    let resume_to_c = silence_to_c.map(|(_, back)| back - moved_at);
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis());
    println!(
        "figure: ice_tcp_restart resume_ms client_to_therapist={:?} therapist_to_client={:?} \
         longest_gap_ms client_to_therapist={:?} therapist_to_client={:?}",
        ms(resume_to_t),
        ms(resume_to_c),
        ms(silence_to_t.map(|(gap, _)| gap)),
        ms(silence_to_c.map(|(gap, _)| gap)),
    );
    println!(
        "figure: ice_tcp_restart packets_after_move to_therapist={} to_client={} \
         client_writes_refused={} tcp_ports_before={before:?} after={after:?} \
         (setup {:.1} s, total {:.1} s)",
        t.shared.received_from(from_c),
        c.shared.received_from(from_t),
        c.shared.refused.load(Ordering::Relaxed),
        setup.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        resumed,
        "after the move: therapist got {} new packets, client {}; client heard {:?}\n\
         --- server log ---\n{}",
        t.shared.received_from(from_c),
        c.shared.received_from(from_t),
        c.shared.said.lock().map(|m| m.clone()).unwrap_or_default(),
        server.log_text()
    );
    assert!(
        resume_to_t.is_some_and(|d| d <= MAX_RESUME)
            && resume_to_c.is_some_and(|d| d <= MAX_RESUME),
        "media came back after {resume_to_t:?} (to the therapist), {resume_to_c:?} (to the client)"
    );

    // The client really moved: both old connections are gone, two new ones carry the media.
    assert_eq!(after.len(), 2, "publish and subscribe over TCP: {after:?}");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "new connections, from new ports: before {before:?}, after {after:?}"
    );

    // Both connections restarted with new credentials from Haven.
    let answers = c.shared.said("publish_answer");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[1]["negotiation"], 2, "the restart's answer");
    assert_ne!(ufrag(&answers[0]), ufrag(&answers[1]));
    let offers = c.shared.said("subscribe_offer");
    assert!(
        offers.len() > offers_before.len(),
        "a restart offer: {offers:?}"
    );
    let (first, last) = (&offers[0], &offers[offers.len() - 1]);
    assert_ne!(
        ufrag(first),
        ufrag(last),
        "the subscribe connection restarted"
    );

    // The subscription stayed: the restart offer carries the same track, still active, and
    // the client's audio from the therapist kept arriving on the track it had.
    let tracks = |o: &Value| o["tracks"].clone();
    let subscribed = tracks(&offers_before[offers_before.len() - 1]);
    assert_eq!(tracks(last), subscribed, "{offers:?}");
    let subscribed_to: Vec<_> = subscribed
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| (&t["participant_id"], &t["kind"], &t["active"]))
        .collect();
    assert_eq!(
        subscribed_to,
        [(&json!("t-net-2"), &json!("audio"), &json!(true))],
        "{subscribed}"
    );
    assert_eq!(c.shared.tracks.load(Ordering::Relaxed), 1, "no new track");
    let bad = t.shared.bad.load(Ordering::Relaxed) + c.shared.bad.load(Ordering::Relaxed);
    assert_eq!(bad, 0, "packets from the wrong publisher");

    // The same participant throughout: one `joined`, never resumed, nobody told it left or
    // joined again, no errors.
    let joined = c.shared.said("joined");
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert_eq!(joined[0]["resumed"], false);
    assert!(t.shared.said("participant_left").is_empty());
    let joins = t
        .shared
        .said("participant_joined")
        .into_iter()
        .filter(|m| m["participant_id"] == "p-net-2")
        .count();
    assert!(
        joins <= 1,
        "the therapist heard the client join {joins} times"
    );
    for who in [&t, &c] {
        let errors = who.shared.said("error");
        assert!(errors.is_empty(), "{}: {errors:?}", who.id);
        assert!(who.shared.said("socket_closed").is_empty(), "{}", who.id);
    }

    // One stay in the ledger, its media never lost across the move.
    let kinds = server.ledger_kinds("p-net-2");
    println!("figure: ice_tcp_restart ledger p-net-2 {kinds:?}");
    assert_eq!(kinds, ["admitted", "media_connected"], "{kinds:?}");

    let ends_c = c.leave().await;
    let ends_t = t.leave().await;
    for ends in [&ends_c, &ends_t] {
        assert_eq!(
            ends.publish,
            Some(RTCPeerConnectionState::Connected),
            "{ends:?}"
        );
        assert_eq!(
            ends.subscribe,
            Some(RTCPeerConnectionState::Connected),
            "{ends:?}"
        );
    }
    let kinds = server.ledger_kinds("p-net-2");
    assert_eq!(kinds, ["admitted", "media_connected", "left"], "{kinds:?}");
    let report = server.report(RESTART_SESSION);
    let stays = report["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["participant_id"] == "p-net-2")
        .map(|p| p["stays"].as_array().map_or(0, Vec::len));
    assert_eq!(stays, Some(1), "{report}");
}
