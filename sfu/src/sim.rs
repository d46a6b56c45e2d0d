//! A room on simulated time, with str0m clients wired to it in memory: no sockets, no
//! sleeps, and loss drawn from a seeded generator. (str0m picks its own random ids and keys,
//! so two runs differ in detail, not in behaviour.)
//!
//! The room is the production [`Room`] with its datagrams captured instead of sent; client
//! datagrams reach it through the production routing table, exactly as the socket task
//! routes them. Tests use it to check forwarding under loss and layer switching; the
//! criterion benchmarks use it to time the per-room forwarding step.
//!
//! Not part of the crate's API: hidden from the documentation and free to change.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_ids::{ParticipantId, SessionId};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::sync::{mpsc, oneshot};

use crate::demux::{Datagram, DemuxControl, Path, PcId, RouteTable};
use crate::room::{Egress, PcIds, Room, RoomContext};
use crate::{RoomCommand, RoomEvent, RoomStats};

/// The rids a simulcast client sends, lowest first, and the payload byte that marks each.
pub const SIM_RIDS: [&str; 3] = ["q", "h", "f"];

/// Video frames a second and packets per frame of each simulated layer.
const FPS: u64 = 30;
const PACKETS_PER_FRAME: [usize; 3] = [1, 2, 5];
const PAYLOAD_BYTES: usize = 1000;
/// A keyframe every this many frames (2 s), besides those asked for.
const KEYFRAME_EVERY: u64 = 60;

const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7601);

/// Datagrams the room sent, waiting to be delivered.
#[derive(Default)]
struct Wire {
    out: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
}

impl Egress for Wire {
    fn send_to(&self, data: &[u8], to: SocketAddr) {
        if let Ok(mut out) = self.out.lock() {
            out.push((to, data.to_vec()));
        }
    }
}

#[derive(Default)]
struct Ids {
    next: std::sync::atomic::AtomicU64,
}

impl PcIds for Ids {
    fn next_pc_id(&self) -> PcId {
        PcId(self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
    }
}

/// xorshift64*: enough randomness for loss, and the same sequence for the same seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// A number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One media packet a simulated client received.
#[derive(Clone, Debug)]
pub struct Received {
    pub mid: Mid,
    /// The payload type it arrived on.
    pub pt: u8,
    pub seq: u64,
    pub timestamp: u32,
    pub payload: Vec<u8>,
}

/// A client: publishes audio and video (optionally three simulcast layers) on one
/// connection and receives on another, both str0m in RTP mode.
pub struct SimClient {
    pub id: ParticipantId,
    index: u16,
    publish: Rtc,
    subscribe: Rtc,
    publish_timeout: Instant,
    subscribe_timeout: Instant,
    simulcast: bool,
    audio: Option<Mid>,
    video: Option<Mid>,
    /// Per layer (index into `SIM_RIDS`, 0 without simulcast): next sequence number.
    video_seq: [u64; 3],
    audio_seq: u64,
    frame: u64,
    keyframe_wanted: bool,
    media_start: Option<Instant>,
    /// Loss on the way to the server and on the way back.
    pub loss_up: f64,
    pub loss_down: f64,
    /// The audio level (RFC 6464, -dBov) put on audio packets; none when `None`.
    pub audio_level: Option<i8>,
    /// Sends every third video frame on its publish connection's Opus payload type instead
    /// of VP8's (a misbehaving client: a payload type of the other kind than its m-line).
    pub video_as_opus: bool,
    pub received: Vec<Received>,
    /// Mids of the subscribe connection and whose video/audio each carries.
    pub tracks: HashMap<Mid, (ParticipantId, &'static str)>,
}

impl SimClient {
    fn publish_addr(&self) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            40_000 + self.index * 2,
        )
    }

    fn subscribe_addr(&self) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            40_001 + self.index * 2,
        )
    }

    /// Packets received on the mid that carries `publisher`'s video.
    pub fn video_from(&self, publisher: &ParticipantId) -> Vec<&Received> {
        self.from(publisher, "video")
    }

    pub fn audio_from(&self, publisher: &ParticipantId) -> Vec<&Received> {
        self.from(publisher, "audio")
    }

    /// The Opus payload type and, where negotiated, the RED payload type of the publish
    /// connection (`false`) or the subscribe connection (`true`).
    pub fn opus_pts(&self, subscribe: bool) -> Option<(u8, Option<u8>)> {
        let rtc = if subscribe {
            &self.subscribe
        } else {
            &self.publish
        };
        rtc.codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| (*p.pt(), p.red().map(|r| *r)))
    }

    fn from(&self, publisher: &ParticipantId, kind: &str) -> Vec<&Received> {
        self.received
            .iter()
            .filter(|r| {
                self.tracks
                    .get(&r.mid)
                    .is_some_and(|(p, k)| p == publisher && *k == kind)
            })
            .collect()
    }
}

/// A room, its clients and the simulated clock.
pub struct SimRoom {
    room: Room,
    table: RouteTable,
    controls: mpsc::UnboundedReceiver<DemuxControl>,
    events: mpsc::Receiver<RoomEvent>,
    /// The room's own datagram queue; the simulation delivers directly, but the room keeps
    /// the sender in its routes.
    _datagrams: mpsc::Receiver<Datagram>,
    wire: Arc<Wire>,
    pub clients: Vec<SimClient>,
    pub now: Instant,
    rng: Rng,
    room_deadline: Instant,
    pending_events: Vec<RoomEvent>,
    /// RTP and RTCP datagrams delivered to subscribe connections.
    pub delivered_media: u64,
}

impl SimRoom {
    pub fn new(seed: u64) -> SimRoom {
        let (control_tx, controls) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::channel(4096);
        let (dgram_tx, datagrams) = mpsc::channel(16);
        let wire = Arc::new(Wire::default());
        let ctx = RoomContext {
            session: SessionId::parse("s-sim").unwrap_or_else(|_| unreachable!()),
            socket: wire.clone(),
            advertised: SERVER,
            demux: control_tx,
            next_pc: Arc::new(Ids::default()),
        };
        let room = Room::new(ctx, event_tx, dgram_tx);
        let now = Instant::now();
        SimRoom {
            room,
            table: RouteTable::default(),
            controls,
            events,
            _datagrams: datagrams,
            wire,
            clients: Vec::new(),
            now,
            rng: Rng::new(seed),
            room_deadline: now,
            pending_events: Vec::new(),
            delivered_media: 0,
        }
    }

    /// Adds a participant to the room and gives them a client that publishes audio and video.
    pub fn join(&mut self, id: &str, simulcast: bool) -> usize {
        self.join_with_red(id, simulcast, false, false)
    }

    /// Like [`SimRoom::join`], with RED (RFC 2198) for Opus offered on the publish
    /// connection (the client then sends every audio packet as RED, carrying the previous
    /// packet as a redundant block, if the room accepts it) and accepted on the subscribe
    /// connection.
    pub fn join_with_red(
        &mut self,
        id: &str,
        simulcast: bool,
        publish_red: bool,
        receive_red: bool,
    ) -> usize {
        let id = ParticipantId::parse(id).unwrap_or_else(|_| unreachable!());
        let (reply, mut rx) = oneshot::channel();
        self.room.handle_command(
            RoomCommand::AddParticipant {
                id: id.clone(),
                reply,
            },
            self.now,
        );
        assert!(matches!(rx.try_recv(), Ok(Ok(()))), "the room took {id}");

        let index = self.clients.len() as u16;
        let mut client = SimClient {
            id: id.clone(),
            index,
            publish: client_rtc(self.now, publish_red),
            subscribe: client_rtc(self.now, receive_red),
            publish_timeout: self.now,
            subscribe_timeout: self.now,
            simulcast,
            audio: None,
            video: None,
            video_seq: [1; 3],
            audio_seq: 1,
            frame: 0,
            keyframe_wanted: true,
            media_start: None,
            loss_up: 0.0,
            loss_down: 0.0,
            audio_level: None,
            video_as_opus: false,
            received: Vec::new(),
            tracks: HashMap::new(),
        };
        let (pa, sa) = (client.publish_addr(), client.subscribe_addr());
        for (rtc, addr) in [(&mut client.publish, pa), (&mut client.subscribe, sa)] {
            if let Ok(c) = Candidate::host(addr, "udp") {
                rtc.add_local_candidate(c);
            }
        }

        // Publish: audio and video, the video in three layers with simulcast.
        let mut api = client.publish.sdp_api();
        let audio = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let layers = simulcast.then(|| {
            let mut s = Simulcast::new();
            for rid in SIM_RIDS {
                s.add_send_layer(SimulcastLayer::new(rid));
            }
            s
        });
        let video = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, layers);
        let Some((offer, pending)) = api.apply() else {
            unreachable!("two m-lines to offer")
        };
        client.audio = Some(audio);
        client.video = Some(video);
        let (reply, mut rx) = oneshot::channel();
        self.room.handle_command(
            RoomCommand::PublishOffer {
                id: id.clone(),
                sdp: offer.to_sdp_string(),
                reply,
            },
            self.now,
        );
        let answer = match rx.try_recv() {
            Ok(Ok(sdp)) => sdp,
            other => panic!("publish offer refused: {other:?}"),
        };
        let answer = SdpAnswer::from_sdp_string(&answer).unwrap_or_else(|e| panic!("{e}"));
        client
            .publish
            .sdp_api()
            .accept_answer(pending, answer)
            .unwrap_or_else(|e| panic!("{e}"));
        self.clients.push(client);
        self.clients.len() - 1
    }

    /// Tells the room the size at which client `viewer` shows `publisher`'s video.
    pub fn set_video_size(&mut self, viewer: usize, publisher: usize, width: u32, height: u32) {
        let cmd = RoomCommand::SetVideoSize {
            id: self.clients[viewer].id.clone(),
            publisher: self.clients[publisher].id.clone(),
            width,
            height,
        };
        self.room.handle_command(cmd, self.now);
    }

    pub fn stats(&mut self) -> RoomStats {
        let (reply, mut rx) = oneshot::channel();
        self.room
            .handle_command(RoomCommand::Stats { reply }, self.now);
        rx.try_recv().unwrap_or_default()
    }

    /// Events the room raised that the simulation does not act on itself.
    pub fn take_events(&mut self) -> Vec<RoomEvent> {
        self.take_events_into_answers();
        std::mem::take(&mut self.pending_events)
    }

    fn answer(
        &mut self,
        who: &ParticipantId,
        negotiation: u64,
        sdp: &str,
        tracks: Vec<crate::TrackInfo>,
    ) {
        let Some(c) = self.clients.iter_mut().find(|c| &c.id == who) else {
            return;
        };
        for t in tracks {
            let mid = Mid::from(t.mid.as_str());
            c.tracks.insert(mid, (t.participant, t.kind.as_str()));
        }
        let offer = SdpOffer::from_sdp_string(sdp).unwrap_or_else(|e| panic!("{e}"));
        let answer = c
            .subscribe
            .sdp_api()
            .accept_offer(offer)
            .unwrap_or_else(|e| panic!("{e}"));
        let (reply, mut rx) = oneshot::channel();
        self.room.handle_command(
            RoomCommand::SubscribeAnswer {
                id: who.clone(),
                negotiation,
                sdp: answer.to_sdp_string(),
                reply,
            },
            self.now,
        );
        assert!(matches!(rx.try_recv(), Ok(Ok(()))), "answer taken");
    }

    /// Runs the simulation for `duration` in steps of `step`, clients sending media.
    pub fn run(&mut self, duration: Duration, step: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.now += step;
            self.step();
        }
    }

    /// One step at `self.now`: clients send what is due, every datagram in flight is
    /// delivered (subject to loss), and timers that are due fire.
    pub fn step(&mut self) {
        let now = self.now;
        let mut to_server: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            send_media(c, now);
            for side in [0, 1] {
                let (rtc, timeout, addr) = if side == 0 {
                    let a = c.publish_addr();
                    (&mut c.publish, &mut c.publish_timeout, a)
                } else {
                    let a = c.subscribe_addr();
                    (&mut c.subscribe, &mut c.subscribe_timeout, a)
                };
                if *timeout <= now {
                    let _ = rtc.handle_input(Input::Timeout(now));
                }
                *timeout = drain(rtc, now, addr, &mut to_server, &mut Vec::new());
            }
        }

        // Up to a few round trips per step: datagrams in, the room's answers out, clients'
        // answers to those (RTCP, DTLS) back in.
        for _ in 0..32 {
            self.drain_controls();
            for (source, data) in to_server.drain(..) {
                let loss = self
                    .clients
                    .iter()
                    .find(|c| c.publish_addr() == source || c.subscribe_addr() == source)
                    .map_or(0.0, |c| c.loss_up);
                if loss > 0.0 && is_rtp_or_rtcp(&data) && self.rng.next_f64() < loss {
                    continue;
                }
                let Some(route) = self.table.route(Protocol::Udp, source, &data) else {
                    continue;
                };
                let d = Datagram {
                    pc: route.pc,
                    source,
                    path: Path::Udp,
                    at: now,
                    data,
                };
                self.room.handle_datagram(d);
            }
            if self.room_deadline <= now {
                self.room.handle_timeouts(now);
            }
            self.room.drive(now);
            self.room_deadline = self.room.next_deadline(now);
            self.take_events_into_answers();

            let sent: Vec<(SocketAddr, Vec<u8>)> = match self.wire.out.lock() {
                Ok(mut out) => std::mem::take(&mut *out),
                Err(_) => Vec::new(),
            };
            if sent.is_empty() {
                break;
            }
            for (to, data) in sent {
                let Some(c) = self
                    .clients
                    .iter_mut()
                    .find(|c| c.publish_addr() == to || c.subscribe_addr() == to)
                else {
                    continue;
                };
                if c.loss_down > 0.0 && is_rtp_or_rtcp(&data) && self.rng.next_f64() < c.loss_down {
                    continue;
                }
                let publish = c.publish_addr() == to;
                if !publish && is_rtp_or_rtcp(&data) {
                    self.delivered_media += 1;
                }
                let addr = to;
                let Ok(receive) = Receive::new(Protocol::Udp, SERVER, addr, &data) else {
                    continue;
                };
                let mut events = Vec::new();
                let rtc = if publish {
                    &mut c.publish
                } else {
                    &mut c.subscribe
                };
                let _ = rtc.handle_input(Input::Receive(now, receive));
                let timeout = drain(rtc, now, addr, &mut to_server, &mut events);
                if publish {
                    c.publish_timeout = timeout;
                } else {
                    c.subscribe_timeout = timeout;
                }
                for e in events {
                    match e {
                        Event::RtpPacket(p) if !publish => {
                            let mid = c
                                .subscribe
                                .direct_api()
                                .stream_rx(&p.header.ssrc)
                                .map(|s| s.mid());
                            if let Some(mid) = mid {
                                c.received.push(Received {
                                    mid,
                                    pt: *p.header.payload_type,
                                    seq: *p.seq_no,
                                    timestamp: p.header.timestamp,
                                    payload: p.payload.to_vec(),
                                });
                            }
                        }
                        Event::KeyframeRequest(_) if publish => c.keyframe_wanted = true,
                        _ => {}
                    }
                }
            }
            if to_server.is_empty() {
                break;
            }
        }
    }

    fn take_events_into_answers(&mut self) {
        // Subscribe offers are answered at once; other events stay queued for `take_events`.
        let mut kept = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            match e {
                RoomEvent::SubscribeOffer {
                    participant,
                    negotiation,
                    sdp,
                    tracks,
                } => self.answer(&participant, negotiation, &sdp, tracks),
                other => kept.push(other),
            }
        }
        self.pending_events.extend(kept);
    }

    fn drain_controls(&mut self) {
        while let Ok(c) = self.controls.try_recv() {
            self.table.apply(c);
        }
    }
}

/// A client connection: str0m in RTP mode, full ICE (the server is ICE-lite).
fn client_rtc(now: Instant, red: bool) -> Rtc {
    Rtc::builder()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, red)
        .enable_vp8(true)
        .build(now)
}

fn drain(
    rtc: &mut Rtc,
    now: Instant,
    addr: SocketAddr,
    out: &mut Vec<(SocketAddr, Vec<u8>)>,
    events: &mut Vec<Event>,
) -> Instant {
    let mut due_now = 0;
    for _ in 0..100_000 {
        match rtc.poll_output() {
            Ok(Output::Transmit(t)) => out.push((addr, t.contents.to_vec())),
            Ok(Output::Event(e)) => events.push(e),
            Ok(Output::Timeout(t)) if t <= now && due_now < 256 => {
                due_now += 1;
                let _ = rtc.handle_input(Input::Timeout(now));
            }
            Ok(Output::Timeout(t)) => return t,
            Err(_) => return now + Duration::from_millis(100),
        }
    }
    now
}

/// RTP or RTCP (RFC 7983: first byte 128..=191); STUN and DTLS are never dropped, so the
/// connection always comes up and loss tests measure media.
fn is_rtp_or_rtcp(data: &[u8]) -> bool {
    data.first().is_some_and(|b| (128..=191).contains(b))
}

/// Writes the audio and video packets due at `now`: audio every 20 ms, a video frame every
/// 1/30 s on each layer, from the moment the publish connection is up.
fn send_media(c: &mut SimClient, now: Instant) {
    if !c.publish.is_connected() {
        return;
    }
    let (Some(audio), Some(video)) = (c.audio, c.video) else {
        return;
    };
    let start = *c.media_start.get_or_insert(now);
    let elapsed = now.saturating_duration_since(start).as_micros() as u64;
    let opus = pt_of(&c.publish, Codec::Opus);
    let red = c.opus_pts(false).and_then(|(_, red)| red);
    let vp8 = pt_of(&c.publish, Codec::Vp8);

    while (c.audio_seq - 1) * 20_000 <= elapsed {
        let Some(opus) = opus else { break };
        let mut api = c.publish.direct_api();
        let Some(tx) = api.stream_tx_by_mid(audio, None) else {
            break;
        };
        let payload = marked(c.index, c.audio_seq, 120);
        let ts = ((c.audio_seq - 1) * 960) as u32;
        // With RED, the previous packet's payload rides along, 960 ticks (20 ms) back.
        let (pt, payload) = match red {
            Some(red) => {
                let previous = (c.audio_seq > 1).then(|| marked(c.index, c.audio_seq - 1, 120));
                let redundant: Vec<(u8, u16, &[u8])> = previous
                    .iter()
                    .map(|p| (*opus, 960, p.as_slice()))
                    .collect();
                match crate::red::wrap(&redundant, *opus, &payload) {
                    Some(wrapped) => (Pt::from(red), wrapped),
                    None => (opus, payload),
                }
            }
            None => (opus, payload),
        };
        let exts = ExtensionValues {
            audio_level: c.audio_level,
            // str0m writes the level only together with the voice activity flag.
            voice_activity: c.audio_level.map(|_| true),
            ..ExtensionValues::default()
        };
        tx.write_rtp(RtpWrite::new(pt, c.audio_seq.into(), ts, now, payload).ext_vals(exts));
        c.audio_seq += 1;
    }

    while c.frame * 1_000_000 / FPS <= elapsed {
        let Some(vp8) = vp8 else { break };
        let keyframe = c.keyframe_wanted || c.frame.is_multiple_of(KEYFRAME_EVERY);
        c.keyframe_wanted = false;
        let layers: Vec<(usize, Option<Rid>)> = if c.simulcast {
            (0..3).map(|l| (l, Some(Rid::from(SIM_RIDS[l])))).collect()
        } else {
            vec![(2, None)]
        };
        for (layer, rid) in layers {
            let mut api = c.publish.direct_api();
            let Some(tx) = api.stream_tx_by_mid(video, rid) else {
                continue;
            };
            let n = PACKETS_PER_FRAME[layer];
            for k in 0..n {
                let seq = c.video_seq[layer];
                c.video_seq[layer] += 1;
                let mut payload = vec![0u8; PAYLOAD_BYTES];
                // VP8 descriptor: X=1, I=1 with a 15-bit picture id, S on the first packet.
                payload[0] = 0x80 | if k == 0 { 0x10 } else { 0 };
                payload[1] = 0x80;
                let pid = (c.frame & 0x7fff) as u16;
                payload[2] = 0x80 | (pid >> 8) as u8;
                payload[3] = pid as u8;
                // VP8 payload header: lowest bit 0 on a keyframe.
                payload[4] = if keyframe { 0x00 } else { 0x01 };
                payload[5] = layer as u8;
                payload[6..8].copy_from_slice(&c.index.to_be_bytes());
                payload[8..16].copy_from_slice(&seq.to_be_bytes());
                let ts = (c.frame * 3000) as u32;
                let pt = match opus {
                    Some(opus) if c.video_as_opus && c.frame % 3 == 2 => opus,
                    _ => vp8,
                };
                let w = RtpWrite::new(pt, seq.into(), ts, now, payload)
                    .marker(k + 1 == n)
                    .nackable(true);
                tx.write_rtp(w);
            }
        }
        c.frame += 1;
    }
}

/// An audio payload naming its sender and sequence number (what a RED packet's primary
/// block carries, too).
pub fn marked(index: u16, seq: u64, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0..2].copy_from_slice(&index.to_be_bytes());
    p[2..10].copy_from_slice(&seq.to_be_bytes());
    p
}

fn pt_of(rtc: &Rtc, codec: Codec) -> Option<Pt> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == codec)
        .map(|p| p.pt())
}

/// The simulcast layer a forwarded video payload came from (see `send_media`).
pub fn layer_of(payload: &[u8]) -> Option<u8> {
    payload.get(5).copied()
}

/// The blocks of a RED payload, oldest first, the primary last: payload type, timestamp
/// offset and bytes. `None` when the payload is not valid RED.
pub fn red_blocks(payload: &[u8]) -> Option<Vec<(u8, u16, Vec<u8>)>> {
    let red = crate::red::Red::parse(payload).ok()?;
    red.blocks()
        .map(|b| {
            let bytes = payload.get(b.range.clone())?.to_vec();
            Some((b.pt, b.timestamp_offset, bytes))
        })
        .collect()
}
