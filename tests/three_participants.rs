//! A group session of three, end to end: a therapist and two clients join through the
//! signaling WebSocket, publish synthetic VP8 and Opus over WebRTC, receive each other, leave,
//! and the attendance ledger says what happened.
//!
//! The clients are webrtc-rs (the async `webrtc` crate), a WebRTC stack independent of the
//! server's str0m, so this is an interop test of ICE-lite, DTLS-SRTP, BUNDLE, renegotiation of
//! the receiving connection and keyframe requests, not only of Haven's own code.
//!
//! Every payload carries who sent it and a counter, and the rest of its bytes follow from those
//! two, so a receiver can rebuild the exact payload it should have got and compare it byte for
//! byte. Video payloads start with a real VP8 payload descriptor and frame header, because the
//! server reads them to find keyframes.
//!
//! The test sends UDP and must run in a private network namespace (see `common::require_netns`).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Attribute, Interceptor, Packet as ChainPacket, Slot, StreamInfo};
use rtc::interceptor::{Registry, TaggedPacket};
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::RtpSender;

use common::{Server, Signal, BIN};

const SESSION: &str = "sess-e2e-rust";

/// How long all three publish while the server's CPU time is measured.
const MEDIA_WINDOW: Duration = Duration::from_secs(10);
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// One VP8 frame per packet at about 30 frames a second.
const VIDEO_INTERVAL: Duration = Duration::from_millis(33);
/// A keyframe every this many frames (about one a second) even without a request.
const KEYFRAME_EVERY: u32 = 30;
const AUDIO_PAYLOAD_LEN: usize = 80;
const VIDEO_KEY_PAYLOAD_LEN: usize = 1_000;
const VIDEO_DELTA_PAYLOAD_LEN: usize = 300;

/// What the ledger may differ from the test's own clock by: the server stamps media at the
/// first packet it reads and a leave when it handles it, a few scheduler hops from where the
/// test took its time.
const LEDGER_TOLERANCE_SECONDS: f64 = 1.5;

/// Every wait in the test is bounded by one of these.
const SIGNAL_WAIT: Duration = Duration::from_secs(15);
/// A participant's socket may be quiet this long: nothing is said while media flows.
const SOCKET_QUIET: Duration = Duration::from_secs(60);
const CONNECT_WAIT: Duration = Duration::from_secs(15);
const FLOWS_WAIT: Duration = Duration::from_secs(15);

/// Marks the bytes after a payload's codec header as this test's.
const MAGIC: [u8; 4] = *b"HVN1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Audio,
    Video,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        match s {
            "audio" => Some(Kind::Audio),
            "video" => Some(Kind::Video),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::Audio => 0xA0,
            Kind::Video => 0x0D,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Person {
    id: &'static str,
    role: &'static str,
    /// Written into every payload this person publishes.
    index: u8,
}

const THERAPIST: Person = Person {
    id: "t-01",
    role: "therapist",
    index: 1,
};
const CLIENT_1: Person = Person {
    id: "p-01",
    role: "client",
    index: 2,
};
const CLIENT_2: Person = Person {
    id: "p-02",
    role: "client",
    index: 3,
};
const PEOPLE: [Person; 3] = [THERAPIST, CLIENT_1, CLIENT_2];

fn person_by_index(index: u8) -> Option<Person> {
    PEOPLE.into_iter().find(|p| p.index == index)
}

// ---- payloads ------------------------------------------------------------------------------

/// The 10 bytes after the codec header: magic, publisher, kind, counter.
fn marker(publisher: u8, kind: Kind, counter: u32) -> [u8; 10] {
    let mut m = [0; 10];
    m[..4].copy_from_slice(&MAGIC);
    m[4] = publisher;
    m[5] = kind.code();
    m[6..].copy_from_slice(&counter.to_be_bytes());
    m
}

/// Pads `p` to `len` with bytes that depend on position, publisher and counter, so a byte
/// moved, dropped or taken from another packet shows.
fn fill(p: &mut Vec<u8>, len: usize, publisher: u8, counter: u32) {
    while p.len() < len {
        let i = p.len() as u32;
        let byte = i.wrapping_mul(31) ^ counter.rotate_left(i % 32) ^ (u32::from(publisher) * 77);
        p.push(byte as u8);
    }
}

fn audio_payload(publisher: u8, counter: u32) -> Vec<u8> {
    // Opus TOC byte: configuration 31 (CELT fullband, 20 ms), mono, one frame.
    let mut p = vec![0xF8];
    p.extend_from_slice(&marker(publisher, Kind::Audio, counter));
    fill(&mut p, AUDIO_PAYLOAD_LEN, publisher, counter);
    p
}

/// One whole VP8 frame in one packet (RFC 7741 payload descriptor, RFC 6386 frame header).
fn video_payload(publisher: u8, frame: u32, key: bool) -> Vec<u8> {
    let picture_id = (frame & 0x7FFF) as u16;
    let [pid_hi, pid_lo] = picture_id.to_be_bytes();
    // X=1, S=1 (start of a partition), PID=0; then I=1 and a 15-bit PictureID.
    let mut p = vec![0x90, 0x80, 0x80 | pid_hi, pid_lo];

    let len = if key {
        VIDEO_KEY_PAYLOAD_LEN
    } else {
        VIDEO_DELTA_PAYLOAD_LEN
    };
    // Frame tag: P (0 for a keyframe), version 0, show_frame 1, first partition size.
    let first_partition = (len - p.len() - 10) as u32;
    let tag = (first_partition << 5) | (1 << 4) | u32::from(!key);
    p.extend_from_slice(&tag.to_le_bytes()[..3]);
    if key {
        // Keyframe start code and a 320x240 picture.
        p.extend_from_slice(&[0x9D, 0x01, 0x2A]);
        p.extend_from_slice(&320u16.to_le_bytes());
        p.extend_from_slice(&240u16.to_le_bytes());
    }
    p.extend_from_slice(&marker(publisher, Kind::Video, frame));
    fill(&mut p, len, publisher, frame);
    p
}

/// A payload that arrived intact: who sent it, its counter, whether it is a keyframe.
#[derive(Debug)]
struct Decoded {
    publisher: u8,
    counter: u32,
    keyframe: bool,
}

/// Rebuilds the payload the marker says this is and compares every byte.
fn decode(kind: Kind, payload: &[u8]) -> Result<Decoded, String> {
    let (at, keyframe) = match kind {
        Kind::Audio => (1, false),
        Kind::Video => {
            let tag = *payload
                .get(4)
                .ok_or("video payload shorter than its header")?;
            let key = tag & 0x01 == 0;
            (if key { 14 } else { 7 }, key)
        }
    };
    let m = payload
        .get(at..at + 10)
        .ok_or_else(|| format!("{kind:?} payload of {} bytes has no marker", payload.len()))?;
    if m[..4] != MAGIC || m[5] != kind.code() {
        return Err(format!(
            "{kind:?} payload without this test's marker: {m:02x?}"
        ));
    }
    let publisher = m[4];
    let counter = u32::from_be_bytes([m[6], m[7], m[8], m[9]]);
    let expected = match kind {
        Kind::Audio => audio_payload(publisher, counter),
        Kind::Video => video_payload(publisher, counter, keyframe),
    };
    if expected != payload {
        let first_diff = expected.iter().zip(payload).position(|(a, b)| a != b);
        return Err(format!(
            "{kind:?} payload {counter} of publisher {publisher} altered: {} bytes, expected {}, \
             first difference at {first_diff:?}",
            payload.len(),
            expected.len()
        ));
    }
    Ok(Decoded {
        publisher,
        counter,
        keyframe,
    })
}

// ---- what the receivers saw -----------------------------------------------------------------

/// One publisher's track as seen by one receiver.
#[derive(Debug, Default)]
struct Flow {
    packets: u64,
    first_at: Option<Instant>,
    first_was_keyframe: Option<bool>,
    duplicates: u64,
    seen: HashSet<u32>,
}

/// Everything the receivers saw, keyed by (receiver, publisher, kind).
#[derive(Default)]
struct Received {
    flows: Mutex<HashMap<(&'static str, &'static str, Kind), Flow>>,
    /// Payloads that failed to verify or came from the wrong publisher. Must stay empty.
    problems: Mutex<Vec<String>>,
}

impl Received {
    fn problem(&self, p: String) {
        eprintln!("problem: {p}");
        if let Ok(mut all) = self.problems.lock() {
            all.push(p);
        }
    }

    fn record(&self, receiver: &'static str, publisher: &'static str, kind: Kind, d: &Decoded) {
        let Ok(mut flows) = self.flows.lock() else {
            return;
        };
        let flow = flows.entry((receiver, publisher, kind)).or_default();
        flow.packets += 1;
        if flow.first_at.is_none() {
            flow.first_at = Some(Instant::now());
            flow.first_was_keyframe = Some(d.keyframe);
        }
        if !flow.seen.insert(d.counter) {
            flow.duplicates += 1;
        }
    }

    fn packets(&self, receiver: &str, publisher: &str, kind: Kind) -> u64 {
        self.flows
            .lock()
            .map(|f| {
                f.iter()
                    .find(|((r, p, k), _)| *r == receiver && *p == publisher && *k == kind)
                    .map_or(0, |(_, flow)| flow.packets)
            })
            .unwrap_or(0)
    }

    fn snapshot(&self) -> HashMap<(&'static str, &'static str, Kind), u64> {
        self.flows
            .lock()
            .map(|f| f.iter().map(|(k, v)| (*k, v.packets)).collect())
            .unwrap_or_default()
    }
}

/// The six (receiver, publisher) pairs, each with audio and video.
fn all_flows() -> Vec<(&'static str, &'static str, Kind)> {
    let mut out = Vec::new();
    for r in PEOPLE {
        for p in PEOPLE {
            if r.id != p.id {
                out.push((r.id, p.id, Kind::Audio));
                out.push((r.id, p.id, Kind::Video));
            }
        }
    }
    out
}

// ---- webrtc-rs plumbing ---------------------------------------------------------------------

/// Peer connection events, turned into channels the participant task can wait on.
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

/// Lets keyframe requests (PLI, FIR) through to the application, where the publisher answers
/// them; webrtc-rs ends inbound RTCP inside the interceptor chain unless a packet is marked.
#[derive(Default)]
struct KeyframeRequestsToApp {
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestsToApp {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        let wants_keyframe = match &msg.message.packet {
            ChainPacket::Rtcp(packets) => packets.iter().any(|p| is_keyframe_request(p.as_ref())),
            _ => false,
        };
        if wants_keyframe {
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for KeyframeRequestsToApp {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

fn is_keyframe_request(p: &dyn rtc::rtcp::Packet) -> bool {
    let any = p.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// A peer connection as the test's "browser": loopback only, no mDNS, no ICE servers.
struct Pc {
    pc: Arc<dyn PeerConnection>,
    gathered: watch::Receiver<bool>,
    state: watch::Receiver<RTCPeerConnectionState>,
    tracks: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
}

async fn peer_connection() -> Pc {
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .expect("the default codecs register on an empty engine");
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .expect("default interceptors register");
    // Application-most, after every interceptor that reads RTCP.
    let registry = registry.with(Slot::from(14_000), KeyframeRequestsToApp::default());

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

    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(events))
        // One concrete loopback address: one socket, one host candidate, nothing else.
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
    /// The local description once every candidate is in it.
    async fn gathered_sdp(&mut self, who: &str) -> String {
        tokio::time::timeout(CONNECT_WAIT, self.gathered.wait_for(|g| *g))
            .await
            .unwrap_or_else(|_| panic!("{who}: ICE gathering did not complete"))
            .expect("the event handler lives as long as the peer connection");
        self.pc
            .local_description()
            .await
            .expect("a local description was set")
            .sdp
    }
}

fn local_track(kind: Kind, ssrc: u32, who: &str) -> Arc<TrackLocalStaticRTP> {
    let (codec_kind, codec) = match kind {
        Kind::Audio => (
            RtpCodecKind::Audio,
            RTCRtpCodec {
                mime_type: MIME_TYPE_OPUS.to_owned(),
                clock_rate: 48_000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                rtcp_feedback: vec![],
            },
        ),
        Kind::Video => (
            RtpCodecKind::Video,
            RTCRtpCodec {
                mime_type: MIME_TYPE_VP8.to_owned(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                rtcp_feedback: vec![],
            },
        ),
    };
    let label = format!("{who}-{kind:?}").to_lowercase();
    let track = MediaStreamTrack::new(
        format!("{who}-stream"),
        label.clone(),
        label,
        codec_kind,
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

/// The payload type the answer gave `sender`'s codec.
async fn negotiated_pt(sender: &Arc<dyn RtpSender>, mime: &str) -> u8 {
    let params = sender
        .get_parameters()
        .await
        .expect("sender of a live connection");
    params
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
        .unwrap_or_else(|| panic!("{mime} was not negotiated: {:?}", params.rtp_parameters))
}

// ---- one participant ------------------------------------------------------------------------

/// What a participant task measured.
#[derive(Debug)]
struct Outcome {
    ws_opened: Instant,
    /// When the first RTP packet went out (after the publish connection was up).
    first_sent: Option<Instant>,
    leave_sent: Instant,
    keyframe_requests: u64,
}

/// Counters a participant's sender shares with the test while it runs.
#[derive(Default)]
struct Sending {
    first_sent: Mutex<Option<Instant>>,
    audio: AtomicU64,
    video: AtomicU64,
    keyframe_requests: AtomicU64,
    stop: AtomicBool,
}

struct Publisher {
    audio: Arc<TrackLocalStaticRTP>,
    video: Arc<TrackLocalStaticRTP>,
    audio_sender: Arc<dyn RtpSender>,
    video_sender: Arc<dyn RtpSender>,
}

/// Sends audio every 20 ms and a video frame every 33 ms until told to stop; answers
/// keyframe requests with the next frame.
async fn send_media(
    who: Person,
    publisher: Publisher,
    mut state: watch::Receiver<RTCPeerConnectionState>,
    sending: Arc<Sending>,
) {
    let wait = state.wait_for(|s| *s == RTCPeerConnectionState::Connected);
    let connected = matches!(tokio::time::timeout(CONNECT_WAIT, wait).await, Ok(Ok(_)));
    assert!(
        connected,
        "{}: publish connection not connected after {CONNECT_WAIT:?}, state {:?}",
        who.id,
        *state.borrow()
    );

    let audio_pt = negotiated_pt(&publisher.audio_sender, MIME_TYPE_OPUS).await;
    let video_pt = negotiated_pt(&publisher.video_sender, MIME_TYPE_VP8).await;

    let want_keyframe = Arc::new(AtomicBool::new(false));
    let requests = {
        let video = publisher.video.clone();
        let want = want_keyframe.clone();
        let sending = sending.clone();
        tokio::spawn(async move {
            while let Some(event) = video.poll().await {
                if let TrackLocalEvent::OnRtcpPacket(packets) = event {
                    if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                        sending.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                        want.store(true, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let audio_ssrc = ssrc(who, Kind::Audio);
    let video_ssrc = ssrc(who, Kind::Video);
    let mut audio_tick = tokio::time::interval(AUDIO_INTERVAL);
    let mut video_tick = tokio::time::interval(VIDEO_INTERVAL);
    let (mut a, mut v) = (0u32, 0u32);
    while !sending.stop.load(Ordering::Relaxed) {
        let packet = tokio::select! {
            _ = audio_tick.tick() => {
                let p = rtp(audio_pt, audio_ssrc, a, a.wrapping_mul(960), a == 0, audio_payload(who.index, a));
                a += 1;
                (Kind::Audio, p)
            }
            _ = video_tick.tick() => {
                let key = v % KEYFRAME_EVERY == 0 || want_keyframe.swap(false, Ordering::Relaxed);
                let p = rtp(video_pt, video_ssrc, v, v.wrapping_mul(3_000), true, video_payload(who.index, v, key));
                v += 1;
                (Kind::Video, p)
            }
        };
        let (kind, packet) = packet;
        let track = match kind {
            Kind::Audio => &publisher.audio,
            Kind::Video => &publisher.video,
        };
        if let Err(e) = track.write_rtp(packet).await {
            // The connection closes under the sender when the participant leaves.
            if !sending.stop.load(Ordering::Relaxed) {
                panic!("{}: write_rtp failed while publishing: {e}", who.id);
            }
            break;
        }
        if let Ok(mut first) = sending.first_sent.lock() {
            first.get_or_insert_with(Instant::now);
        }
        match kind {
            Kind::Audio => sending.audio.fetch_add(1, Ordering::Relaxed),
            Kind::Video => sending.video.fetch_add(1, Ordering::Relaxed),
        };
    }
    requests.abort();
}

fn ssrc(who: Person, kind: Kind) -> u32 {
    0x4856_0000 + u32::from(who.index) * 16 + u32::from(kind == Kind::Video)
}

fn rtp(
    pt: u8,
    ssrc: u32,
    n: u32,
    timestamp: u32,
    marker: bool,
    payload: Vec<u8>,
) -> rtc::rtp::Packet {
    rtc::rtp::Packet {
        header: rtc::rtp::Header {
            version: 2,
            marker,
            payload_type: pt,
            // Starts away from zero so a receiver's rollover guess is exercised a little.
            sequence_number: (n as u16).wrapping_add(40_000),
            timestamp,
            ssrc,
            ..Default::default()
        },
        payload: Bytes::from(payload),
    }
}

/// Reads one remote track until it ends, checking every payload against the publisher that
/// the subscribe offer's `tracks` named for its mid.
async fn read_track(
    receiver: Person,
    track: Arc<dyn TrackRemote>,
    pc: Arc<dyn PeerConnection>,
    mids: Arc<Mutex<HashMap<String, (String, Kind)>>>,
    received: Arc<Received>,
) {
    // The first event names the receiver, and through it the transceiver and its mid.
    let Some(TrackRemoteEvent::OnOpen(init)) = track.poll().await else {
        received.problem(format!(
            "{}: a remote track did not start with OnOpen",
            receiver.id
        ));
        return;
    };
    let mut mid = None;
    for t in pc.get_transceivers().await {
        if let Ok(Some(r)) = t.receiver().await {
            if r.id() == init.receiver_id {
                mid = t.mid().await.ok().flatten();
            }
        }
    }
    let Some(mid) = mid else {
        received.problem(format!("{}: no mid for a remote track", receiver.id));
        return;
    };
    let source = mids.lock().ok().and_then(|m| m.get(&mid).cloned());
    let Some((publisher_id, kind)) = source else {
        received.problem(format!(
            "{}: mid {mid} is not in any offer's tracks",
            receiver.id
        ));
        return;
    };
    let Some(publisher) = PEOPLE.into_iter().find(|p| p.id == publisher_id) else {
        received.problem(format!(
            "{}: mid {mid} names unknown {publisher_id}",
            receiver.id
        ));
        return;
    };

    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(pkt) = event else {
            continue;
        };
        match decode(kind, &pkt.payload) {
            Ok(d) if d.publisher == publisher.index => {
                received.record(receiver.id, publisher.id, kind, &d)
            }
            Ok(d) => received.problem(format!(
                "{}: mid {mid} is {}'s {kind:?} but carried {:?}'s packet {}",
                receiver.id,
                publisher.id,
                person_by_index(d.publisher).map(|p| p.id),
                d.counter
            )),
            Err(e) => received.problem(format!("{}: mid {mid}: {e}", receiver.id)),
        }
    }
}

/// Joins, publishes, subscribes and leaves when told. The therapist admits every client that
/// waits.
async fn participant(
    who: Person,
    ws_url: String,
    token: String,
    joined: oneshot::Sender<()>,
    mut leave: oneshot::Receiver<()>,
    sending: Arc<Sending>,
    received: Arc<Received>,
) -> Outcome {
    let ws_opened = Instant::now();
    let mut signal = Signal::connect_url(&ws_url).await;
    signal.join(&token).await;

    let mut joined = Some(joined);
    let mut publish: Option<Pc> = None;
    let mut pending_publisher: Option<Publisher> = None;
    let mut subscribe: Option<Pc> = None;
    let mids: Arc<Mutex<HashMap<String, (String, Kind)>>> = Arc::default();
    let mut admitted: HashSet<String> = HashSet::new();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut leave_sent = None;

    loop {
        // The subscribe connection's tracks arrive on a channel; poll it alongside the socket.
        let next_track = async {
            match subscribe.as_mut() {
                Some(pc) => pc.tracks.recv().await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            msg = signal.recv_within(SOCKET_QUIET) => msg,
            Some(track) = next_track => {
                let pc = subscribe.as_ref().map(|s| s.pc.clone()).expect("tracks come from it");
                tasks.push(tokio::spawn(read_track(who, track, pc, mids.clone(), received.clone())));
                continue;
            }
            Ok(()) = &mut leave, if leave_sent.is_none() => {
                leave_sent = Some(Instant::now());
                signal.send(json!({"type": "leave"})).await;
                continue;
            }
        };
        let Some(msg) = msg else {
            panic!("{}: socket closed or silent for {SOCKET_QUIET:?}", who.id);
        };

        eprintln!("[{:?}] {} <- {}", ws_opened.elapsed(), who.id, msg["type"]);
        match msg["type"].as_str().unwrap_or_default() {
            "waiting" => assert_ne!(who.role, "therapist", "a therapist never waits"),
            "waiting_list" => {
                // Only the therapist hears who waits; it lets every client in.
                for w in msg["waiting"].as_array().into_iter().flatten() {
                    let id = w["participant_id"].as_str().unwrap_or_default().to_owned();
                    if w["role"] == "client" && admitted.insert(id.clone()) {
                        signal
                            .send(json!({"type": "admit", "participant_id": id}))
                            .await;
                    }
                }
            }
            "joined" => {
                assert_eq!(msg["participant_id"], who.id, "{msg}");
                assert_eq!(msg["role"], who.role, "{msg}");
                assert_eq!(msg["session"]["id"], SESSION, "{msg}");
                assert_eq!(msg["session"]["kind"], "group", "{msg}");

                // Both connections exist before the first offer can arrive.
                subscribe = Some(peer_connection().await);
                let mut pc = peer_connection().await;
                let audio = local_track(Kind::Audio, ssrc(who, Kind::Audio), who.id);
                let video = local_track(Kind::Video, ssrc(who, Kind::Video), who.id);
                let audio_sender = pc
                    .pc
                    .add_track(audio.clone() as Arc<dyn TrackLocal>)
                    .await
                    .expect("add audio track");
                let video_sender = pc
                    .pc
                    .add_track(video.clone() as Arc<dyn TrackLocal>)
                    .await
                    .expect("add video track");
                let offer = pc.pc.create_offer(None).await.expect("create offer");
                pc.pc
                    .set_local_description(offer)
                    .await
                    .expect("set local offer");
                let sdp = pc.gathered_sdp(who.id).await;
                signal
                    .send(json!({"type": "publish_offer", "sdp": sdp}))
                    .await;
                publish = Some(pc);
                pending_publisher = Some(Publisher {
                    audio,
                    video,
                    audio_sender,
                    video_sender,
                });
                if let Some(j) = joined.take() {
                    let _ = j.send(());
                }
            }
            "publish_answer" => {
                let pc = publish.as_ref().expect("an answer follows our offer");
                let sdp = msg["sdp"].as_str().expect("answer has sdp").to_owned();
                let answer = RTCSessionDescription::answer(sdp).expect("answer SDP parses");
                pc.pc
                    .set_remote_description(answer)
                    .await
                    .expect("webrtc-rs accepts Haven's publish answer");
                let publisher = pending_publisher.take().expect("one answer per offer");
                let state = pc.state.clone();
                tasks.push(tokio::spawn(send_media(
                    who,
                    publisher,
                    state,
                    sending.clone(),
                )));
            }
            "subscribe_offer" => {
                let negotiation = msg["negotiation"].as_u64().expect("negotiation number");
                if let Ok(mut m) = mids.lock() {
                    for t in msg["tracks"].as_array().into_iter().flatten() {
                        let mid = t["mid"].as_str().expect("track mid").to_owned();
                        let from = t["participant_id"]
                            .as_str()
                            .expect("track owner")
                            .to_owned();
                        let kind = Kind::parse(t["kind"].as_str().unwrap_or_default())
                            .expect("track kind audio or video");
                        m.insert(mid, (from, kind));
                    }
                }
                let pc = subscribe
                    .as_mut()
                    .expect("subscribe connection made at joined");
                let sdp = msg["sdp"].as_str().expect("offer has sdp").to_owned();
                let offer = RTCSessionDescription::offer(sdp).expect("offer SDP parses");
                pc.pc
                    .set_remote_description(offer)
                    .await
                    .unwrap_or_else(|e| panic!("{}: subscribe offer {negotiation}: {e}", who.id));
                let answer = pc.pc.create_answer(None).await.expect("create answer");
                pc.pc
                    .set_local_description(answer)
                    .await
                    .expect("set local answer");
                let sdp = pc.gathered_sdp(who.id).await;
                signal
                    .send(
                        json!({"type": "subscribe_answer", "negotiation": negotiation, "sdp": sdp}),
                    )
                    .await;
            }
            "left" => {
                assert_eq!(msg["reason"], "left", "{msg}");
                break;
            }
            "error" => panic!("{}: server error {msg}", who.id),
            _ => {}
        }
    }

    sending.stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    for pc in [publish, subscribe].into_iter().flatten() {
        let _ = pc.pc.close().await;
    }
    let first_sent = sending.first_sent.lock().ok().and_then(|f| *f);
    Outcome {
        ws_opened,
        first_sent,
        leave_sent: leave_sent.expect("the loop ends only after leave"),
        keyframe_requests: sending.keyframe_requests.load(Ordering::Relaxed),
    }
}

struct Running {
    who: Person,
    sending: Arc<Sending>,
    leave: oneshot::Sender<()>,
    task: JoinHandle<Outcome>,
}

async fn start(who: Person, server: &Server, received: &Arc<Received>) -> Running {
    let token = server.token(SESSION, who.role, who.id, &["--kind", "group"]);
    let (joined_tx, joined_rx) = oneshot::channel();
    let (leave_tx, leave_rx) = oneshot::channel();
    let sending = Arc::new(Sending::default());
    let task = tokio::spawn(participant(
        who,
        server.ws_url(),
        token,
        joined_tx,
        leave_rx,
        sending.clone(),
        received.clone(),
    ));
    // The therapist must be in before clients come, or nobody hears them wait.
    if who.role == "therapist" {
        tokio::time::timeout(SIGNAL_WAIT, joined_rx)
            .await
            .expect("therapist joined in time")
            .expect("therapist task alive");
    }
    Running {
        who,
        sending,
        leave: leave_tx,
        task,
    }
}

async fn leave(r: Running) -> Outcome {
    let _ = r.leave.send(());
    tokio::time::timeout(SIGNAL_WAIT, r.task)
        .await
        .unwrap_or_else(|_| panic!("{} did not get `left` in time", r.who.id))
        .unwrap_or_else(|e| panic!("{} task failed: {e}", r.who.id))
}

fn overlap(a: (Instant, Instant), b: (Instant, Instant)) -> f64 {
    let start = a.0.max(b.0);
    let end = a.1.min(b.1);
    end.saturating_duration_since(start).as_secs_f64()
}

fn approx(what: &str, got: f64, want: f64) {
    println!("{what}: ledger {got:.3} s, measured {want:.3} s");
    assert!(
        (got - want).abs() <= LEDGER_TOLERANCE_SECONDS,
        "{what}: ledger says {got:.3} s, the test measured {want:.3} s"
    );
}

// ---- the test -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_participants_exchange_intact_media_and_are_credited_for_it() {
    common::require_netns("three_participants");

    let mut server = Server::start();
    let received = Arc::new(Received::default());

    let therapist = start(THERAPIST, &server, &received).await;
    let client_1 = start(CLIENT_1, &server, &received).await;
    let client_2 = start(CLIENT_2, &server, &received).await;
    let running = [&therapist, &client_1, &client_2];

    // Everyone receives everyone else's audio and video.
    let deadline = Instant::now() + FLOWS_WAIT;
    loop {
        let missing: Vec<_> = all_flows()
            .into_iter()
            .filter(|(r, p, k)| received.packets(r, p, *k) == 0)
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline || running.iter().any(|r| r.task.is_finished()) {
            panic!(
                "no media after {FLOWS_WAIT:?} on (receiver, publisher, kind) {missing:?}; \
                 problems {:?}\n--- server log ---\n{}",
                received
                    .problems
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default(),
                server.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A fixed window with all three publishing: server CPU and what got through.
    let sent_before: Vec<(u64, u64)> = running
        .iter()
        .map(|r| {
            (
                r.sending.audio.load(Ordering::Relaxed),
                r.sending.video.load(Ordering::Relaxed),
            )
        })
        .collect();
    let got_before = received.snapshot();
    let cpu_before = server.cpu_seconds();
    let window_start = Instant::now();
    tokio::time::sleep(MEDIA_WINDOW).await;
    let cpu = server.cpu_seconds() - cpu_before;
    let window = window_start.elapsed().as_secs_f64();
    let got_after = received.snapshot();
    let sent_in_window: HashMap<&str, (u64, u64)> = running
        .iter()
        .zip(&sent_before)
        .map(|(r, (a, v))| {
            let a = r.sending.audio.load(Ordering::Relaxed) - a;
            let v = r.sending.video.load(Ordering::Relaxed) - v;
            (r.who.id, (a, v))
        })
        .collect();

    let mut total = 0;
    for flow @ (r, p, kind) in all_flows() {
        let got = got_after.get(&flow).copied().unwrap_or(0)
            - got_before.get(&flow).copied().unwrap_or(0);
        total += got;
        let (a, v) = sent_in_window[p];
        let sent = if kind == Kind::Audio { a } else { v };
        let ratio = got as f64 / sent.max(1) as f64;
        println!("flow {p} -> {r} {kind:?}: {got} of {sent} sent in the window ({ratio:.3})");
        let minimum = if kind == Kind::Audio { 50 } else { 20 };
        assert!(
            got >= minimum,
            "{p} -> {r} {kind:?}: only {got} packets in {window:.1} s"
        );
        // Loopback loses nothing; a fifth missing means the server dropped media.
        assert!(
            ratio >= 0.8,
            "{p} -> {r} {kind:?}: {got} of {sent} packets arrived"
        );
    }
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "figure: server_cpu_percent_3p={:.1} (over {window:.1} s, {build} build)",
        cpu / window * 100.0
    );
    println!("figure: packets_received_3p={total} (all 12 flows, over {window:.1} s)");

    {
        let flows = received
            .flows
            .lock()
            .expect("no reader panicked holding the lock");
        for ((r, p, kind), flow) in flows.iter() {
            // Counters never seen between the first and the last one that arrived: packets
            // lost on the way, as opposed to not yet sent or sent before the subscription.
            let (lo, hi) = (flow.seen.iter().min(), flow.seen.iter().max());
            let span = lo.zip(hi).map_or(0, |(lo, hi)| u64::from(hi - lo) + 1);
            println!(
                "flow {p} -> {r} {kind:?}: {} packets, {} missing inside the received range",
                flow.packets,
                span - flow.seen.len() as u64
            );
            // Audio is never sent twice. Video may be: the bandwidth estimator probes with
            // retransmissions of packets already sent (RTX padding), which a browser's jitter
            // buffer drops; this raw reader sees them. They must stay a small share.
            if *kind == Kind::Audio {
                assert_eq!(flow.duplicates, 0, "{p} -> {r} audio delivered duplicates");
            } else {
                println!(
                    "flow {p} -> {r} video: {} probe retransmissions",
                    flow.duplicates
                );
                assert!(
                    flow.duplicates * 10 <= flow.packets,
                    "{p} -> {r}: {} duplicates in {} packets is more than probing explains",
                    flow.duplicates,
                    flow.packets
                );
            }
            if *kind == Kind::Video {
                assert_eq!(
                    flow.first_was_keyframe,
                    Some(true),
                    "{p} -> {r}: video must start at a keyframe"
                );
            }
        }
    }
    let problems = received
        .problems
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    assert!(
        problems.is_empty(),
        "payloads not intact or misattributed: {problems:#?}"
    );

    // Leave one by one: p-01, then the therapist, then p-02 three seconds later, so p-02's
    // credited time (overlap with the therapist) must come out clearly shorter than its
    // connected time.
    let c1 = leave(client_1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = leave(therapist).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c2 = leave(client_2).await;

    for (id, o) in [("t-01", &t), ("p-01", &c1), ("p-02", &c2)] {
        println!("{id}: keyframe requests answered {}", o.keyframe_requests);
    }
    for (who, o) in [(CLIENT_1, &c1), (CLIENT_2, &c2)] {
        let first_video = received
            .flows
            .lock()
            .expect("readers done")
            .iter()
            .filter(|((r, _, k), _)| *r == who.id && *k == Kind::Video)
            .filter_map(|(_, f)| f.first_at)
            .min()
            .expect("video arrived");
        println!(
            "figure: ws_open_to_first_remote_video_ms_{}={}",
            who.id,
            first_video.duration_since(o.ws_opened).as_millis()
        );
    }

    server.stop();
    let report = server.report(SESSION);
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );

    let people = report["participants"]
        .as_array()
        .expect("participants array");
    assert_eq!(people.len(), 3, "{report}");
    let row = |id: &str| -> &Value {
        people
            .iter()
            .find(|p| p["participant_id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {report}"))
    };
    let flowing = |o: &Outcome| (o.first_sent.expect("published"), o.leave_sent);
    let secs = |v: &Value, field: &str| {
        v[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} in {v}"))
    };

    for (who, o) in [(THERAPIST, &t), (CLIENT_1, &c1), (CLIENT_2, &c2)] {
        let r = row(who.id);
        assert_eq!(r["role"], who.role, "{r}");
        assert_eq!(r["left_reason"], "left", "{r}");
        let (from, to) = flowing(o);
        approx(
            &format!("{} connected_seconds", who.id),
            secs(r, "connected_seconds"),
            to.duration_since(from).as_secs_f64(),
        );
        assert_eq!(secs(r, "credited_audio_only_seconds"), 0.0, "{r}");
    }
    for (who, o) in [(CLIENT_1, &c1), (CLIENT_2, &c2)] {
        let r = row(who.id);
        let connected = secs(r, "connected_seconds");
        let credited = secs(r, "credited_seconds");
        assert!(credited > 0.0, "{r}");
        assert!(credited <= connected, "{r}");
        approx(
            &format!("{} credited_seconds", who.id),
            credited,
            overlap(flowing(o), flowing(&t)),
        );
    }

    let verify = std::process::Command::new(BIN)
        .args(["attendance", "verify", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .expect("run haven attendance verify");
    assert!(
        verify.status.success(),
        "ledger verify failed: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
