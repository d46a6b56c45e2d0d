//! One room: its task, its participants and the forwarding between them.
//!
//! The task owns every str0m `Rtc` of the room. Inputs are commands from signaling,
//! datagrams from the socket task and timers; after each input [`Room::drive`] polls every
//! connection until it has nothing more to say, acting on the events as they come out.
//! Forwarding a packet writes it into the subscribers' connections, which then have output
//! of their own, so `drive` repeats until a whole pass produces no event.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use haven_ids::{ParticipantId, SessionId};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite};
use str0m::stats::PeerStats;
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::activity::{MediaActivity, Transition};
use crate::demux::{Datagram, DemuxControl, Path, PcId};
use crate::forward::{Forwarder, InPacket, Want};
use crate::keyframe::{
    is_av1_keyframe_start, is_h264_keyframe_start, is_vp9_keyframe_start, KeyframeThrottle,
};
use crate::layer::{
    layers_for_rids, Allocator, AudioOnlyReason, Layer, LayerOption, LossEstimate, RateMeter,
    VideoNeed, ALLOCATION_INTERVAL, AUDIO_BPS, PAUSE_LOSS,
};
use crate::pacer::Pacer;
use crate::red::AudioPacket;
use crate::speaker::{LevelMeter, SpeakerTracker, SPEAKER_INTERVAL};
use crate::tcp::TcpWriter;
use crate::vp8::Descriptor;
use crate::{
    ParticipantQuality, PcSide, RoomCommand, RoomEvent, RoomStats, SfuError, TrackInfo, TrackKind,
};

/// Media sections accepted in a publish offer: audio and video, with room for a screen share.
pub const MAX_PUBLISH_SECTIONS: usize = 4;

/// Rooms hold at most this many people (the design's group size).
pub const MAX_PARTICIPANTS: usize = 16;

/// How many datagrams may wait for the room task before the socket task drops them.
const DATAGRAM_QUEUE: usize = 4096;

/// How often the room looks for subscriptions still waiting for a keyframe.
const KEYFRAME_RETRY: Duration = Duration::from_millis(250);

/// The longest the task sleeps; str0m asks for shorter timeouts whenever it needs them.
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// Retransmission cache of each forwarded video: long enough for a NACK from a home link
/// (64 packets are 0.43 s of a 1.5 Mbit/s top layer, a first request and a repeat at a
/// 150 ms round trip; the lower layers send fewer packets and keep the full second), short
/// enough not to hold seconds of every video for every subscriber. Each cached packet costs
/// about 400 bytes of str0m's bookkeeping (the payload is shared), so 64 packets are 25 KiB
/// per forwarded stream, 0.4 MiB per participant in a room of 16; str0m's default of 1,024
/// packets cost 6.5 MiB per participant there.
const RTX_CACHE_PACKETS: usize = 64;
const RTX_CACHE_AGE: Duration = Duration::from_millis(1000);
/// Queued retransmissions are dropped when they would make up more than this share of what a
/// stream sends: repair must not crowd out new media on a congested link.
const RTX_RATIO_CAP: f32 = 0.15;

/// What video is paced at, as a multiple of the subscriber's estimate: room for a keyframe
/// to drain while the link's own queue absorbs the rest.
const PACING_FACTOR: f64 = 1.25;

/// How long after the last congestion a subscriber's video stays paced.
const PACING_HOLD: Duration = Duration::from_secs(30);

/// Video held back this long by the pacer counts as congestion for the layer choice.
const PACER_CONGESTION: Duration = Duration::from_millis(250);

/// Bytes of an RTP packet beyond its payload, as the pacer counts it (header with the
/// extensions Haven sends, SRTP tag).
const RTP_OVERHEAD: usize = 40;

/// How often str0m reports each connection's figures (loss among them).
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// How often each participant's connection figures are gathered and reported.
pub const QUALITY_INTERVAL: Duration = Duration::from_secs(2);

/// The bandwidth estimate a receiving connection starts from, before feedback refines it:
/// enough for a medium layer. Starting at the top layer would flood a weak link in the first
/// seconds (and its estimate would collapse); on a good link the top layer follows after one
/// step up (see `layer`).
const INITIAL_ESTIMATE_BPS: u64 = 1_000_000;

pub(crate) trait PcIds: Send + Sync {
    fn next_pc_id(&self) -> PcId;
}

/// Where a room's UDP datagrams go: the media socket, or a simulation's wire.
pub(crate) trait Egress: Send + Sync {
    /// Sends without waiting; a full buffer loses the datagram, as the network would.
    fn send_to(&self, data: &[u8], to: SocketAddr);
}

impl Egress for UdpSocket {
    fn send_to(&self, data: &[u8], to: SocketAddr) {
        let _ = self.try_send_to(data, to);
    }
}

pub(crate) struct RoomContext {
    pub session: SessionId,
    pub socket: Arc<dyn Egress>,
    pub advertised: SocketAddr,
    pub demux: mpsc::UnboundedSender<DemuxControl>,
    pub next_pc: Arc<dyn PcIds>,
}

pub(crate) async fn run(
    ctx: RoomContext,
    mut commands: mpsc::Receiver<RoomCommand>,
    events: mpsc::Sender<RoomEvent>,
) {
    let (dgram_tx, mut dgram_rx) = mpsc::channel(DATAGRAM_QUEUE);
    let mut room = Room::new(ctx, events, dgram_tx);
    tracing::debug!(session_id = %room.ctx.session, "room task started");

    loop {
        let deadline = room.next_deadline(Instant::now());
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(cmd) => room.handle_command(cmd, Instant::now()),
                None => break,
            },
            Some(d) = dgram_rx.recv() => {
                room.handle_datagram(d);
                // Take what else has arrived before polling, so a burst costs one drive.
                for _ in 0..64 {
                    match dgram_rx.try_recv() {
                        Ok(d) => room.handle_datagram(d),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => room.handle_timeouts(Instant::now()),
        }
        room.drive(Instant::now());
    }

    room.close();
    tracing::debug!(session_id = %room.ctx.session, "room task stopped");
}

/// A connection to one browser: the str0m state machine and when it next wants time.
struct Peer {
    pc: PcId,
    rtc: Rtc,
    next_timeout: Instant,
    /// The ICE-TCP connections this peer reached us on, by its address; str0m names only the
    /// destination of a TCP transmit, and ICE-lite only ever answers a path it heard from.
    tcp: HashMap<SocketAddr, TcpWriter>,
}

/// A track a participant publishes, identified by its mid on their publishing connection.
#[derive(Debug)]
struct PublishedTrack {
    mid: Mid,
    kind: TrackKind,
    /// Simulcast rids and the layer each carries; empty without simulcast.
    rids: Vec<(String, Layer)>,
    /// Per layer: its bitrate, the picture size its last keyframe announced and the
    /// keyframe request throttle.
    layers: [LayerState; 3],
}

#[derive(Debug, Default)]
struct LayerState {
    meter: RateMeter,
    size: Option<(u32, u32)>,
    keyframes: KeyframeThrottle,
}

impl PublishedTrack {
    fn layer_of(&self, rid: Option<&str>) -> Layer {
        match rid {
            None => Layer::High,
            Some(rid) => self
                .rids
                .iter()
                .find(|(r, _)| r == rid)
                .map(|(_, l)| *l)
                .or_else(|| Layer::from_known_rid(rid))
                .unwrap_or(Layer::High),
        }
    }

    fn rid_of(&self, layer: Layer) -> Option<Rid> {
        self.rids
            .iter()
            .find(|(_, l)| *l == layer)
            .map(|(r, _)| Rid::from(r.as_str()))
    }

    /// The layers that are arriving now, lowest first.
    fn options(&self, now: Instant) -> Vec<LayerOption> {
        Layer::ALL
            .iter()
            .filter_map(|&layer| {
                let state = &self.layers[layer.index()];
                state.meter.bitrate(now).map(|bps| LayerOption {
                    layer,
                    bps,
                    size: state.size,
                })
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TrackRef {
    publisher: ParticipantId,
    mid: Mid,
    kind: TrackKind,
    simulcast: bool,
}

/// A track forwarded to a participant, on an m-line of their receiving connection.
struct Subscription {
    mid: Mid,
    source: TrackRef,
    forwarder: Forwarder,
    active: bool,
    /// The size the subscriber shows this video at, when it said.
    display: Option<(u32, u32)>,
    /// Whether the send stream has been set up (pacing, retransmission cache).
    configured: bool,
}

struct Participant {
    id: ParticipantId,
    publish: Peer,
    subscribe: Peer,
    tracks: Vec<PublishedTrack>,
    subs: Vec<Subscription>,
    /// Changes to the receiving connection waiting for the next offer.
    pending_adds: Vec<TrackRef>,
    pending_removals: Vec<Mid>,
    negotiation: u64,
    pending_offer: Option<(u64, SdpPendingOffer)>,
    activity: MediaActivity,
    /// Muted by a therapist: the room drops this participant's audio.
    audio_muted: bool,
    /// Simulcast rids per publishing m-line, from the latest publish offer.
    simulcast: HashMap<Mid, Vec<(String, Layer)>>,
    /// Layer choice for what this participant receives.
    allocator: Allocator,
    /// What the receiving connection carries, judged from the loss the participant reports.
    estimate: LossEstimate,
    audio_only_requested: bool,
    /// Why this participant receives no video, when it does not.
    audio_only: Option<AudioOnlyReason>,
    level: LevelMeter,
    ice_restart_wanted: bool,

    publish_stats: StatsWindow,
    subscribe_stats: StatsWindow,
    /// Spreads the video sent to this participant over time (see `sfu/src/pacer.rs`).
    pacer: Pacer<(Mid, RtpWrite)>,
    /// When this participant's link last showed congestion; pacing is on for a while after.
    congested_at: Option<Instant>,
    /// The audio sent to this participant (RED doubles a voice's rate where negotiated).
    audio_sent: RateMeter,
}

/// Connection figures from str0m's periodic stats, turned into rates.
#[derive(Debug, Default)]
struct StatsWindow {
    last: Option<(Instant, u64)>,
    bps: Option<u64>,
    loss: Option<f32>,
    rtt: Option<Duration>,
}

impl StatsWindow {
    fn update(&mut self, stats: &PeerStats, bytes: u64, loss: Option<f32>) {
        if let Some((at, before)) = self.last {
            let secs = stats.timestamp.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 {
                self.bps = Some((bytes.saturating_sub(before) as f64 * 8.0 / secs) as u64);
            }
        }
        self.last = Some((stats.timestamp, bytes));
        if loss.is_some() {
            self.loss = loss;
        }
        if stats.rtt.is_some() {
            self.rtt = stats.rtt;
        }
    }
}

impl Participant {
    fn peer(&mut self, side: PcSide) -> &mut Peer {
        match side {
            PcSide::Publish => &mut self.publish,
            PcSide::Subscribe => &mut self.subscribe,
        }
    }
}

/// Maps `Instant`s (what str0m and timers use) to wall-clock time (what the ledger needs).
struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    fn system(&self, at: Instant) -> SystemTime {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.system + d,
            None => self.system - self.instant.duration_since(at),
        }
    }
}

pub(crate) struct Room {
    ctx: RoomContext,
    events: mpsc::Sender<RoomEvent>,
    datagrams: mpsc::Sender<Datagram>,
    participants: Vec<Participant>,
    clock: Clock,
    stats: RoomStats,
    next_keyframe_check: Instant,
    next_allocation: Instant,
    next_speaker_round: Instant,
    next_quality: Instant,
    speaker: SpeakerTracker,
}

/// What an event asks the room to do once the connection that raised it is released.
enum Work {
    Event(usize, PcSide, Event),
}

impl Room {
    pub(crate) fn new(
        ctx: RoomContext,
        events: mpsc::Sender<RoomEvent>,
        datagrams: mpsc::Sender<Datagram>,
    ) -> Self {
        let now = Instant::now();
        Room {
            ctx,
            events,
            datagrams,
            participants: Vec::new(),
            clock: Clock {
                instant: now,
                system: SystemTime::now(),
            },
            stats: RoomStats::default(),
            next_keyframe_check: now,
            next_allocation: now + ALLOCATION_INTERVAL,
            next_speaker_round: now + SPEAKER_INTERVAL,
            next_quality: now + QUALITY_INTERVAL,
            speaker: SpeakerTracker::default(),
        }
    }

    fn index(&self, id: &ParticipantId) -> Option<usize> {
        self.participants.iter().position(|p| &p.id == id)
    }

    fn emit(&self, event: RoomEvent) {
        // The room never waits on signaling; a full queue means signaling has stalled, which
        // is a fault worth a warning, not a reason to stop forwarding media.
        if let Err(e) = self.events.try_send(event) {
            tracing::warn!(session_id = %self.ctx.session, error = %e, "room event dropped");
        }
    }

    fn new_peer(&self, now: Instant) -> Result<Peer, SfuError> {
        // VP8 first: it is what every browser can both send and receive, and simulcast with
        // it is what the forwarder understands best. The others are accepted from publishers
        // that offer nothing else. RED (RFC 2198) is offered and accepted with Opus; str0m
        // keeps it only where the other side lists it too, and `forward` unwraps it for
        // subscribers without it.
        let builder = Rtc::builder()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, true)
            .enable_vp8(true)
            .enable_h264(true)
            .enable_vp9(true)
            .enable_av1(true)
            // The feedback figures (loss, round trip) feed the layer choice, so more often
            // than the quality reports.
            .set_stats_interval(Some(STATS_INTERVAL));
        // str0m's own estimator and pacer are not enabled: its pacer held forwarded packets
        // in rooms of ten and more until the delay reached seconds. Transport-wide congestion
        // control feedback still flows (the extension is negotiated), and str0m turns it into
        // the loss and round trip the layer choice's estimate reads (`LossEstimate`); Haven
        // paces congested subscribers itself (`pacer`).
        let mut rtc = builder.build(now);
        let candidate = Candidate::host(self.ctx.advertised, "udp")
            .map_err(|e| SfuError::BadSdp(format!("local candidate: {e}")))?;
        rtc.add_local_candidate(candidate);
        // ICE-TCP on the same port number; passive, because browsers connect to us (RFC 6544).
        let tcp = Candidate::builder()
            .tcp()
            .host(self.ctx.advertised)
            .tcptype(TcpType::Passive)
            .build()
            .map_err(|e| SfuError::BadSdp(format!("local tcp candidate: {e}")))?;
        rtc.add_local_candidate(tcp);

        // Register before any SDP carrying this ufrag leaves the server (see `socket`).
        let pc = self.ctx.next_pc.next_pc_id();
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let room = self.datagrams.clone();
        let _ = self
            .ctx
            .demux
            .send(DemuxControl::Register { ufrag, pc, room });
        Ok(Peer {
            pc,
            rtc,
            next_timeout: now,
            tcp: HashMap::new(),
        })
    }

    // ---- commands -------------------------------------------------------------------------

    pub(crate) fn handle_command(&mut self, cmd: RoomCommand, now: Instant) {
        match cmd {
            RoomCommand::AddParticipant { id, reply } => {
                let _ = reply.send(self.add_participant(id, now));
            }
            RoomCommand::PublishOffer { id, sdp, reply } => {
                let _ = reply.send(self.publish_offer(&id, &sdp));
            }
            RoomCommand::SubscribeAnswer {
                id,
                negotiation,
                sdp,
                reply,
            } => {
                let _ = reply.send(self.subscribe_answer(&id, negotiation, &sdp, now));
            }
            RoomCommand::RemoteCandidate {
                id,
                side,
                candidate,
            } => {
                self.remote_candidate(&id, side, &candidate);
            }
            RoomCommand::RemoveParticipant { id } => self.remove_participant(&id),
            RoomCommand::SetAudioMuted { id, muted } => {
                if let Some(i) = self.index(&id) {
                    self.participants[i].audio_muted = muted;
                }
            }
            RoomCommand::SetVideoSize {
                id,
                publisher,
                width,
                height,
            } => {
                if let Some(i) = self.index(&id) {
                    for sub in &mut self.participants[i].subs {
                        if sub.source.publisher == publisher && sub.source.kind == TrackKind::Video
                        {
                            sub.display = Some((width, height));
                        }
                    }
                    self.allocate(i, now);
                }
            }
            RoomCommand::SetAudioOnly { id, enabled } => {
                if let Some(i) = self.index(&id) {
                    self.participants[i].audio_only_requested = enabled;
                    self.allocate(i, now);
                }
            }
            RoomCommand::RestartIce { id } => {
                if let Some(i) = self.index(&id) {
                    self.participants[i].ice_restart_wanted = true;
                    self.maybe_offer(i);
                }
            }
            RoomCommand::Stats { reply } => {
                let mut stats = self.stats.clone();
                stats.participants = self.participants.len();
                let _ = reply.send(stats);
            }
        }
    }

    fn add_participant(&mut self, id: ParticipantId, now: Instant) -> Result<(), SfuError> {
        if self.index(&id).is_some() {
            return Err(SfuError::AlreadyPresent);
        }
        if self.participants.len() >= MAX_PARTICIPANTS {
            return Err(SfuError::RoomFull(MAX_PARTICIPANTS));
        }

        // Everything already published in the room goes into the first offer.
        let pending_adds = self
            .participants
            .iter()
            .flat_map(|p| {
                p.tracks.iter().map(|t| TrackRef {
                    publisher: p.id.clone(),
                    mid: t.mid,
                    kind: t.kind,
                    simulcast: !t.rids.is_empty(),
                })
            })
            .collect();

        let participant = Participant {
            id,
            publish: self.new_peer(now)?,
            subscribe: self.new_peer(now)?,
            tracks: Vec::new(),
            subs: Vec::new(),
            pacer: Pacer::default(),
            congested_at: None,
            audio_sent: RateMeter::default(),
            pending_adds,
            pending_removals: Vec::new(),
            negotiation: 0,
            pending_offer: None,
            activity: MediaActivity::default(),
            audio_muted: false,
            simulcast: HashMap::new(),
            allocator: Allocator::default(),
            // Assumed until the first loss report, so the first choice is not the top layer
            // of everything whatever the link.
            estimate: LossEstimate::new(INITIAL_ESTIMATE_BPS),
            audio_only_requested: false,
            audio_only: None,
            level: LevelMeter::default(),
            ice_restart_wanted: false,

            publish_stats: StatsWindow::default(),
            subscribe_stats: StatsWindow::default(),
        };
        tracing::debug!(session_id = %self.ctx.session, participant_id = %participant.id, "participant added to room");
        self.participants.push(participant);
        self.maybe_offer(self.participants.len() - 1);
        Ok(())
    }

    fn publish_offer(&mut self, id: &ParticipantId, sdp: &str) -> Result<String, SfuError> {
        let i = self.index(id).ok_or(SfuError::UnknownParticipant)?;
        // Each published m-line is forwarded to every subscriber; an offer with many would
        // multiply the work of the whole room.
        let sections = sdp.lines().filter(|l| l.starts_with("m=")).count();
        if sections > MAX_PUBLISH_SECTIONS {
            return Err(SfuError::TooManyTracks(MAX_PUBLISH_SECTIONS));
        }
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let simulcast = simulcast_rids(sdp);
        let peer = &mut self.participants[i].publish;
        let ufrag_before = peer.rtc.direct_api().local_ice_credentials().ufrag;
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;

        // A section the publisher sends on but with no codec Haven knows would be a session
        // without that medium: refuse it with a clear error instead.
        for line in answer.to_sdp_string().lines() {
            if let Some(rest) = line.strip_prefix("m=") {
                let mut f = rest.split_whitespace();
                let (kind, port) = (f.next(), f.next());
                if matches!(kind, Some("audio" | "video")) && port == Some("0") {
                    return Err(SfuError::NoCommonCodec(kind.unwrap_or("media").to_string()));
                }
            }
        }
        self.participants[i].simulcast = simulcast;
        let peer = &mut self.participants[i].publish;

        // An offer with new ICE credentials is an ICE restart (a browser whose network changed).
        // str0m answers it with a new ufrag of its own, keeping its candidates; the demux must
        // know that ufrag before the answer leaves, or the browser's checks would go nowhere.
        // The old ufrag stays registered until the connection closes: harmless, it is unique.
        let ufrag = peer.rtc.direct_api().local_ice_credentials().ufrag;
        if ufrag != ufrag_before {
            let pc = peer.pc;
            let room = self.datagrams.clone();
            let _ = self
                .ctx
                .demux
                .send(DemuxControl::Register { ufrag, pc, room });
            tracing::debug!(session_id = %self.ctx.session, participant_id = %id, "ice restart on the publish connection");
        }
        Ok(answer.to_sdp_string())
    }

    fn subscribe_answer(
        &mut self,
        id: &ParticipantId,
        negotiation: u64,
        sdp: &str,
        now: Instant,
    ) -> Result<(), SfuError> {
        let i = self.index(id).ok_or(SfuError::UnknownParticipant)?;
        let p = &mut self.participants[i];
        let pending_no = p.pending_offer.as_ref().map(|(n, _)| *n);
        if pending_no != Some(negotiation) {
            return Err(SfuError::StaleAnswer {
                got: negotiation,
                pending: pending_no,
            });
        }
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let Some((_, pending)) = p.pending_offer.take() else {
            return Err(SfuError::StaleAnswer {
                got: negotiation,
                pending: None,
            });
        };
        p.subscribe
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;

        // New video subscriptions can only start at a keyframe: ask now rather than at the
        // next retry tick.
        self.request_waiting_keyframes(now);
        self.maybe_offer(i);
        Ok(())
    }

    fn remote_candidate(&mut self, id: &ParticipantId, side: PcSide, candidate: &str) {
        let Some(i) = self.index(id) else { return };
        let line = candidate.trim().trim_start_matches("a=");
        if line.is_empty() {
            return;
        }
        match Candidate::from_sdp_string(line) {
            Ok(c) => self.participants[i].peer(side).rtc.add_remote_candidate(c),
            // The parse error quotes the candidate (addresses, ufrag): trace only.
            Err(e) => {
                tracing::debug!(participant_id = %id, "remote candidate ignored: not valid");
                tracing::trace!(participant_id = %id, error = %e, "remote candidate ignored");
            }
        }
    }

    fn remove_participant(&mut self, id: &ParticipantId) {
        let Some(i) = self.index(id) else { return };
        let mut gone = self.participants.remove(i);
        if let Some(last) = gone.activity.last_flowing_packet() {
            let at = self.clock.system(last);
            self.emit(RoomEvent::MediaStopped {
                participant: gone.id.clone(),
                last_packet_at: at,
            });
        }
        gone.publish.rtc.disconnect();
        gone.subscribe.rtc.disconnect();
        let _ = self.ctx.demux.send(DemuxControl::Unregister {
            pc: gone.publish.pc,
        });
        let _ = self.ctx.demux.send(DemuxControl::Unregister {
            pc: gone.subscribe.pc,
        });

        // Everyone else stops receiving the tracks; their m-lines turn inactive.
        for j in 0..self.participants.len() {
            let p = &mut self.participants[j];
            p.pending_adds.retain(|t| &t.publisher != id);
            for sub in p
                .subs
                .iter_mut()
                .filter(|s| &s.source.publisher == id && s.active)
            {
                sub.active = false;
                p.pending_removals.push(sub.mid);
            }
            self.maybe_offer(j);
        }
        tracing::debug!(session_id = %self.ctx.session, participant_id = %id, "participant removed from room");
    }

    /// Sends a new offer to participant `i` if their receiving connection has changes waiting
    /// and no offer is outstanding (one negotiation at a time keeps both sides in step).
    fn maybe_offer(&mut self, i: usize) {
        let p = &mut self.participants[i];
        if p.pending_offer.is_some()
            || (p.pending_adds.is_empty() && p.pending_removals.is_empty() && !p.ice_restart_wanted)
        {
            return;
        }

        let mut api = p.subscribe.rtc.sdp_api();
        let mut new_ufrag = None;
        if std::mem::take(&mut p.ice_restart_wanted) {
            // The participant's network changed: new credentials on the receiving connection,
            // the same candidates (ours did not move).
            new_ufrag = Some(api.ice_restart(true).ufrag);
        }
        for track in p.pending_adds.drain(..) {
            let kind = match track.kind {
                TrackKind::Audio => MediaKind::Audio,
                TrackKind::Video => MediaKind::Video,
            };
            let stream_id = msid_token(track.publisher.as_str());
            // Unique per m-line: a participant who publishes again (after a resume) gets new
            // m-lines while the old ones stay inactive, and browsers refuse an SDP in which two
            // m-lines carry the same msid.
            let track_id = format!("{stream_id}-{}-{}", track.kind.as_str(), p.subs.len());
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(stream_id),
                Some(track_id),
                None,
            );
            let mut forwarder = Forwarder::new(track.kind);
            // A simulcast video starts at its lowest layer, which any link carries; the layer
            // choice moves it up once the subscriber's feedback has shown what the link takes.
            if track.simulcast {
                forwarder.set_want(Want::Layer(Layer::Low));
            }
            p.subs.push(Subscription {
                mid,
                forwarder,
                source: track,
                active: true,
                display: None,
                configured: false,
            });
        }
        for mid in p.pending_removals.drain(..) {
            api.set_direction(mid, Direction::Inactive);
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        if let Some(ufrag) = new_ufrag {
            // Known to the demux before the offer carrying it leaves (see `new_peer`).
            let _ = self.ctx.demux.send(DemuxControl::Register {
                ufrag,
                pc: p.subscribe.pc,
                room: self.datagrams.clone(),
            });
            tracing::debug!(session_id = %self.ctx.session, participant_id = %p.id, "ice restart on the subscribe connection");
        }

        p.negotiation += 1;
        p.pending_offer = Some((p.negotiation, pending));
        let tracks = p
            .subs
            .iter()
            .map(|s| TrackInfo {
                mid: s.mid.to_string(),
                participant: s.source.publisher.clone(),
                kind: s.source.kind,
                active: s.active,
            })
            .collect();
        let event = RoomEvent::SubscribeOffer {
            participant: p.id.clone(),
            negotiation: p.negotiation,
            sdp: offer.to_sdp_string(),
            tracks,
        };
        self.emit(event);
    }

    // ---- network and time -----------------------------------------------------------------

    pub(crate) fn handle_datagram(&mut self, d: Datagram) {
        let found = self.participants.iter().enumerate().find_map(|(i, p)| {
            if p.publish.pc == d.pc {
                Some((i, PcSide::Publish))
            } else if p.subscribe.pc == d.pc {
                Some((i, PcSide::Subscribe))
            } else {
                None
            }
        });
        let Some((i, side)) = found else { return };

        let proto = d.path.protocol();
        let Ok(receive) = Receive::new(proto, d.source, self.ctx.advertised, &d.data) else {
            return;
        };
        let peer = self.participants[i].peer(side);
        if let Path::Tcp(writer) = d.path {
            let known = peer.tcp.get(&d.source).is_some_and(|w| !w.is_closed());
            if !known {
                peer.tcp.insert(d.source, writer);
            }
        }
        if let Err(e) = peer.rtc.handle_input(Input::Receive(d.at, receive)) {
            tracing::debug!(error = %e, "datagram rejected by peer connection");
        }

        // str0m in RTP mode holds one received packet until it is polled: poll this
        // connection now, before the next datagram, or the packet is overwritten and lost.
        // Forwarding only queues packets in the subscribers' connections; those are polled
        // once for the whole batch in `drive`.
        let mut events = Vec::new();
        poll_peer(peer, self.ctx.socket.as_ref(), d.at, |e| events.push(e));
        for e in events {
            self.handle_event(i, side, e, d.at);
        }
    }

    pub(crate) fn handle_timeouts(&mut self, now: Instant) {
        let mut paced = Vec::new();
        for p in &mut self.participants {
            if p.pacer.next_release().is_some_and(|t| t <= now) {
                p.pacer.release(now, &mut paced);
                let mut api = p.subscribe.rtc.direct_api();
                for (mid, write) in paced.drain(..) {
                    if let Some(tx) = api.stream_tx_by_mid(mid, None) {
                        tx.write_rtp(write);
                    }
                }
            }
        }

        for p in &mut self.participants {
            for peer in [&mut p.publish, &mut p.subscribe] {
                if peer.next_timeout <= now {
                    if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                        tracing::debug!(error = %e, "peer connection timeout failed");
                    }
                }
            }
        }

        let mut stopped = Vec::new();
        for p in &mut self.participants {
            if let Some(Transition::Stopped { last_packet }) = p.activity.poll(now) {
                stopped.push((p.id.clone(), last_packet));
            }
        }
        for (participant, last) in stopped {
            tracing::debug!(session_id = %self.ctx.session, participant_id = %participant, "media stopped");
            self.emit(RoomEvent::MediaStopped {
                participant,
                last_packet_at: self.clock.system(last),
            });
        }

        if now >= self.next_keyframe_check {
            self.next_keyframe_check = now + KEYFRAME_RETRY;
            self.request_waiting_keyframes(now);
        }
        if now >= self.next_allocation {
            self.next_allocation = now + ALLOCATION_INTERVAL;
            for i in 0..self.participants.len() {
                self.allocate(i, now);
            }
        }
        if now >= self.next_speaker_round {
            self.next_speaker_round = now + SPEAKER_INTERVAL;
            let meters = self.participants.iter().map(|p| (&p.id, &p.level));
            if let Some(speaker) = self.speaker.round(now, meters) {
                self.emit(RoomEvent::ActiveSpeaker {
                    participant: speaker,
                });
            }
        }
        if now >= self.next_quality {
            self.next_quality = now + QUALITY_INTERVAL;
            if !self.participants.is_empty() {
                self.emit(RoomEvent::Quality(self.quality_report()));
            }
        }
    }

    pub(crate) fn next_deadline(&self, now: Instant) -> Instant {
        let mut deadline = (now + MAX_SLEEP)
            .min(self.next_allocation)
            .min(self.next_speaker_round)
            .min(self.next_quality);
        for p in &self.participants {
            deadline = deadline
                .min(p.publish.next_timeout)
                .min(p.subscribe.next_timeout);
            if let Some(d) = p.activity.deadline() {
                deadline = deadline.min(d);
            }
            if let Some(d) = p.pacer.next_release() {
                deadline = deadline.min(d);
            }
        }
        if self
            .participants
            .iter()
            .any(|p| p.subs.iter().any(|s| s.forwarder.is_waiting_for_keyframe()))
        {
            deadline = deadline.min(self.next_keyframe_check);
        }
        deadline.max(now)
    }

    /// Polls every connection until none has output left, handling events as they appear.
    pub(crate) fn drive(&mut self, now: Instant) {
        // Bounded: each pass only repeats if the previous one produced events, and forwarding
        // cannot produce events without new input. The bound guards against a library bug.
        for _ in 0..16 {
            let mut work = Vec::new();
            for (i, p) in self.participants.iter_mut().enumerate() {
                for side in [PcSide::Publish, PcSide::Subscribe] {
                    let peer = p.peer(side);
                    poll_peer(peer, self.ctx.socket.as_ref(), now, |e| {
                        work.push(Work::Event(i, side, e))
                    });
                }
            }
            if work.is_empty() {
                return;
            }
            for Work::Event(i, side, e) in work {
                self.handle_event(i, side, e, now);
            }
        }
    }

    fn handle_event(&mut self, i: usize, side: PcSide, event: Event, now: Instant) {
        match (side, event) {
            (PcSide::Publish, Event::MediaAdded(m)) => self.track_published(i, m.mid, m.kind),
            (PcSide::Publish, Event::RtpPacket(pkt)) => self.forward(i, pkt, now),
            (PcSide::Subscribe, Event::KeyframeRequest(req)) => {
                let p = &self.participants[i];
                if let Some(sub) = p.subs.iter().find(|s| s.mid == req.mid) {
                    let layer = sub
                        .forwarder
                        .current_layer()
                        .or(sub.forwarder.waiting_for());
                    let source = sub.source.clone();
                    if let Some(layer) = layer {
                        self.request_keyframe(&source, layer, now);
                    }
                }
            }
            (side, Event::PeerStats(stats)) => {
                let p = &mut self.participants[i];
                match side {
                    PcSide::Publish => {
                        let loss = stats.ingress_loss_fraction;
                        p.publish_stats.update(&stats, stats.peer_bytes_rx, loss)
                    }
                    PcSide::Subscribe => {
                        let loss = stats.egress_loss_fraction;
                        p.subscribe_stats.update(&stats, stats.peer_bytes_tx, loss);
                        if let (Some(sent), Some(loss)) = (p.subscribe_stats.bps, loss) {
                            p.estimate.on_report(sent, loss, stats.rtt);
                            tracing::debug!(
                                session_id = %self.ctx.session,
                                participant_id = %p.id,
                                sent_kbps = sent / 1000,
                                loss,
                                rtt_ms = stats.rtt.map(|r| r.as_millis() as u64),
                                estimate_kbps = p.estimate.bps() / 1000,
                                congested = p.estimate.congested(),
                                "feedback"
                            );
                        }
                    }
                }
            }
            (_, Event::IceConnectionStateChange(state)) => {
                let p = &self.participants[i];
                tracing::debug!(session_id = %self.ctx.session, participant_id = %p.id, ?side, ?state, "ice state changed");
            }
            _ => {}
        }
    }

    fn track_published(&mut self, i: usize, mid: Mid, kind: MediaKind) {
        let kind = match kind {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        };
        let publisher = self.participants[i].id.clone();
        if self.participants[i].tracks.iter().any(|t| t.mid == mid) {
            return;
        }
        let rids = self.participants[i]
            .simulcast
            .get(&mid)
            .cloned()
            .unwrap_or_default();
        let simulcast = !rids.is_empty();
        self.participants[i].tracks.push(PublishedTrack {
            mid,
            kind,
            rids,
            layers: Default::default(),
        });
        tracing::debug!(session_id = %self.ctx.session, participant_id = %publisher, kind = kind.as_str(), "track published");

        for j in 0..self.participants.len() {
            if j != i {
                let track = TrackRef {
                    publisher: publisher.clone(),
                    mid,
                    kind,
                    simulcast,
                };
                self.participants[j].pending_adds.push(track);
                self.maybe_offer(j);
            }
        }
    }

    fn forward(&mut self, i: usize, pkt: RtpPacket, now: Instant) {
        self.stats.packets_in += 1;
        let publisher = &mut self.participants[i];

        if let Some(Transition::Started(at)) = publisher.activity.on_packet(pkt.timestamp) {
            let event = RoomEvent::MediaStarted {
                participant: publisher.id.clone(),
                at: self.clock.system(at),
            };
            tracing::debug!(session_id = %self.ctx.session, participant_id = %publisher.id, "media started");
            self.emit(event);
        }
        let publisher = &mut self.participants[i];

        let Some((mid, stream_rid)) = publisher
            .publish
            .rtc
            .direct_api()
            .stream_rx(&pkt.header.ssrc)
            .map(|s| (s.mid(), s.rid()))
        else {
            return;
        };
        let Some((codec, red_wraps)) = codec_of(&publisher.publish.rtc, pkt.header.payload_type)
        else {
            return;
        };
        // Payload types are looked up among the whole connection's codecs: one of the other
        // kind than its m-line's track (audio sent on the video m-line, or the reverse) would
        // otherwise be forwarded on subscribers' tracks of that kind, unpaced, counted as
        // audio or video where it is not.
        let track = publisher.tracks.iter().position(|t| t.mid == mid);
        let kind = track.map(|k| publisher.tracks[k].kind);
        let codec_kind = if codec.is_audio() {
            TrackKind::Audio
        } else {
            TrackKind::Video
        };
        if kind.is_some_and(|k| k != codec_kind) {
            tracing::trace!(session_id = %self.ctx.session, "payload type of the other kind than its track dropped");
            return;
        }
        if codec == Codec::Opus {
            if let Some(level) = pkt.header.ext_vals.audio_level {
                publisher.level.on_level(now, level.unsigned_abs());
            }
            if publisher.audio_muted {
                return;
            }
        }
        // Audio leaves in the form each subscriber negotiated: RED as it came, or its primary
        // block as plain Opus. A payload that is not valid RED reaches nobody.
        let mut audio = match red_wraps {
            Some(opus) => match AudioPacket::red(pkt.payload.clone(), opus) {
                Ok(a) => Some(a),
                Err(error) => {
                    tracing::trace!(session_id = %self.ctx.session, ?error, "malformed RED payload dropped");
                    return;
                }
            },
            None if codec == Codec::Opus => Some(AudioPacket::plain(pkt.payload.clone())),
            None => None,
        };

        let vp8 = (codec == Codec::Vp8)
            .then(|| Descriptor::parse(&pkt.payload))
            .flatten();
        let is_keyframe = match codec {
            Codec::Vp8 => vp8.is_some_and(|d| d.is_keyframe_start(&pkt.payload)),
            Codec::Vp9 => is_vp9_keyframe_start(&pkt.payload),
            Codec::H264 => is_h264_keyframe_start(&pkt.payload),
            Codec::Av1 => is_av1_keyframe_start(&pkt.payload),
            _ => false,
        };
        let picture_id = vp8.and_then(|d| d.picture_id(&pkt.payload));
        let tl0 = vp8.and_then(|d| d.tl0(&pkt.payload));

        let rid = pkt.header.ext_vals.rid.or(stream_rid);
        let layer = match track.and_then(|k| publisher.tracks.get_mut(k)) {
            Some(track) => {
                let layer = track.layer_of(rid.as_deref());
                let state = &mut track.layers[layer.index()];
                state
                    .meter
                    .on_packet(now, pkt.payload.len() + pkt.header.header_len);
                if let Some(size) = vp8.and_then(|d| d.keyframe_size(&pkt.payload)) {
                    state.size = Some(size);
                }
                layer
            }
            None => Layer::High,
        };
        let publisher_id = publisher.id.clone();

        // Only extensions that describe the media itself travel on; mid, rid and transport
        // fields belong to the publisher's connection and would mislead the subscriber.
        let exts = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            video_orientation: pkt.header.ext_vals.video_orientation,
            ..ExtensionValues::default()
        };
        let incoming = InPacket {
            layer,
            seq: *pkt.seq_no,
            timestamp: pkt.header.timestamp,
            keyframe_start: is_keyframe,
            arrival: now,
        };

        let mut forwarded = 0;
        let mut switches = 0;
        for (j, p) in self.participants.iter_mut().enumerate() {
            if j == i {
                continue;
            }
            let Some(sub) = p
                .subs
                .iter_mut()
                .find(|s| s.active && s.source.mid == mid && s.source.publisher == publisher_id)
            else {
                continue;
            };
            let Some((pt, red_pt)) = pt_for(&p.subscribe.rtc, codec) else {
                continue;
            };
            let audio_out = match &mut audio {
                Some(a) => match a.for_subscriber(pt, red_pt) {
                    Some(out) => Some(out),
                    None => continue,
                },
                None => None,
            };
            let mut api = p.subscribe.rtc.direct_api();
            // The stream exists once the subscriber has answered; until then drop quietly.
            let Some(tx) = api.stream_tx_by_mid(sub.mid, None) else {
                continue;
            };
            // A simulcast video starts at its lowest layer until the layer choice has measured
            // the layers (a rid says it is simulcast).
            if rid.is_some() && sub.forwarder.is_undecided() {
                sub.forwarder.set_want(Want::Layer(Layer::Low));
            }
            let Some(out) = sub.forwarder.accept(incoming, picture_id, tl0) else {
                continue;
            };
            if out.switched && sub.forwarder.switches() > 0 {
                switches += 1;
                // Packets of the old layer are of no use once the new layer's keyframe is
                // sent; resending them on request would crowd a link that just proved too
                // small (a switch down) or waste it.
                if sub.configured {
                    tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, Some(RTX_RATIO_CAP));
                }
            }
            let (pt, payload) = match (audio_out, vp8) {
                (Some(audio), _) => audio,
                (None, Some(d)) if out.picture_id_offset != 0 || out.tl0_offset != 0 => {
                    let mut copy = pkt.payload.to_vec();
                    d.rewrite(&mut copy, out.picture_id_offset, out.tl0_offset);
                    (pt, copy.into())
                }
                (None, _) => (pt, pkt.payload.clone()),
            };

            if !sub.configured {
                sub.configured = true;
                tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, Some(RTX_RATIO_CAP));
            }
            let bytes = payload.len() + RTP_OVERHEAD;
            let write = RtpWrite::new(pt, out.seq.into(), out.timestamp, pkt.timestamp, payload)
                .marker(pkt.header.marker)
                .ext_vals(exts.clone())
                .nackable(sub.source.kind == TrackKind::Video);
            if sub.source.kind == TrackKind::Video {
                if let Some((_, write)) = p.pacer.offer(now, bytes, (sub.mid, write)) {
                    tx.write_rtp(write);
                }
            } else {
                p.pacer.pass(now, bytes);
                p.audio_sent.on_packet(now, bytes);
                tx.write_rtp(write);
            }
            forwarded += 1;
        }
        self.stats.packets_forwarded += forwarded;
        self.stats.layer_switches += switches;
    }

    /// Chooses again which layer of each video participant `i` receives.
    fn allocate(&mut self, i: usize, now: Instant) {
        let p = &self.participants[i];
        let mut needs = Vec::new();
        let mut slots = Vec::new();
        let mut audio_streams = 0;
        for (k, sub) in p.subs.iter().enumerate() {
            if !sub.active {
                continue;
            }
            if sub.source.kind == TrackKind::Audio {
                audio_streams += 1;
                continue;
            }
            let Some(track) = self.track(&sub.source) else {
                continue;
            };
            let layers = track.options(now);
            // Nothing measured yet (the publisher just started): leave the choice as it is.
            if layers.is_empty() {
                continue;
            }
            needs.push(VideoNeed {
                layers,
                display: sub.display,
            });
            slots.push(k);
        }
        let estimate = Some(p.estimate.bps());
        let losing = p.subscribe_stats.loss.is_some_and(|l| l >= PAUSE_LOSS);
        // Video held back by the pacer for long means more is forwarded than the link
        // carries, even before any loss is reported.
        let link_congested = p.estimate.congested() || losing;
        let congested = link_congested || p.pacer.delay(now) >= PACER_CONGESTION;
        let proven = p.estimate.proven();
        let requested = p.audio_only_requested;
        // Audio comes first: at least the usual Opus rate per stream, more where measured.
        let audio_bps =
            (AUDIO_BPS * audio_streams as u64).max(p.audio_sent.bitrate(now).unwrap_or(0));
        let p = &mut self.participants[i];
        p.allocator.set_estimate(congested, proven);
        let allocation = p
            .allocator
            .allocate(now, estimate, losing, audio_bps, requested, &needs);
        // Paced on a link that showed congestion in the last PACING_HOLD (a link that never
        // lost or queued anything takes bursts as they come), at a margin above the
        // estimate, or above what was chosen where even the lowest choice exceeds the
        // estimate (a video without layers on a lossy link): the pacer smooths bursts, it
        // does not hold a stream back for good. Without a report backing the estimate (or
        // for a peer that sends no congestion control feedback) nothing is held back.
        // The link's own signals start the hold; the pacer's queue does not (a keyframe
        // that takes long at the pacing rate would otherwise keep the pacer on for good).
        if link_congested {
            p.congested_at = Some(now);
        }
        let recently = p
            .congested_at
            .is_some_and(|t| now.saturating_duration_since(t) < PACING_HOLD);
        let rate = (proven && recently).then(|| {
            let floor = p.estimate.bps().max(allocation.allocated_bps);
            (floor as f64 * PACING_FACTOR) as u64
        });
        p.pacer.set_rate(now, rate);
        let mut changed = false;
        for (k, want) in slots.iter().zip(&allocation.wants) {
            let forwarder = &mut p.subs[*k].forwarder;
            changed |= forwarder.wanted() != Some(*want);
            forwarder.set_want(*want);
        }
        // Formatted only when someone reads it: this runs for every subscriber twice a second.
        if changed && tracing::enabled!(tracing::Level::DEBUG) {
            let layers: Vec<String> = allocation
                .wants
                .iter()
                .zip(&needs)
                .map(|(w, n)| {
                    let rates: Vec<u64> = n.layers.iter().map(|l| l.bps / 1000).collect();
                    match w {
                        Want::Layer(l) => format!("{}{rates:?}", l.as_str()),
                        Want::Paused => format!("paused{rates:?}"),
                    }
                })
                .collect();
            tracing::debug!(
                session_id = %self.ctx.session,
                participant_id = %p.id,
                ?layers,
                estimate_kbps = p.estimate.bps() / 1000,
                sent_kbps = p.subscribe_stats.bps.unwrap_or(0) / 1000,
                loss = p.subscribe_stats.loss.unwrap_or(0.0),
                congested,
                "layers chosen"
            );
        }
        if requested {
            for sub in &mut p.subs {
                sub.forwarder.set_want(Want::Paused);
            }
        }
        // A paused video's retransmission cache is dropped: answering NACKs for it would keep
        // filling a link that was just found too small (each lost resend is asked for again).
        let mut api = p.subscribe.rtc.direct_api();
        for sub in &mut p.subs {
            if sub.configured && sub.forwarder.is_paused() {
                if let Some(tx) = api.stream_tx_by_mid(sub.mid, None) {
                    tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, Some(RTX_RATIO_CAP));
                }
                sub.configured = false;
            }
        }
        // Audio-only when everything shown is paused for lack of bandwidth, or when asked;
        // an unchanged state (or a room with nothing to show yet) keeps the last one.
        let audio_only = if requested {
            Some(AudioOnlyReason::Requested)
        } else if needs.is_empty() {
            p.audio_only.filter(|r| *r == AudioOnlyReason::Bandwidth)
        } else {
            allocation.audio_only
        };
        if audio_only != p.audio_only {
            let reason = audio_only
                .or(p.audio_only)
                .unwrap_or(AudioOnlyReason::Bandwidth);
            p.audio_only = audio_only;
            let event = RoomEvent::ModalityChanged {
                participant: p.id.clone(),
                audio_only: audio_only.is_some(),
                reason,
                at: self.clock.system(now),
            };
            tracing::debug!(session_id = %self.ctx.session, participant_id = %p.id, audio_only = audio_only.is_some(), "modality changed");
            self.emit(event);
        }
        self.request_waiting_keyframes(now);
    }

    fn track(&self, r: &TrackRef) -> Option<&PublishedTrack> {
        let i = self.index(&r.publisher)?;
        self.participants[i].tracks.iter().find(|t| t.mid == r.mid)
    }

    fn quality_report(&self) -> Vec<ParticipantQuality> {
        self.participants
            .iter()
            .map(|p| {
                let layer = p
                    .subs
                    .iter()
                    .filter(|s| s.active && s.source.kind == TrackKind::Video)
                    .filter_map(|s| s.forwarder.current_layer())
                    .max();
                ParticipantQuality {
                    participant: p.id.clone(),
                    bitrate_in_bps: p.publish_stats.bps,
                    bitrate_out_bps: p.subscribe_stats.bps,
                    loss_in: p.publish_stats.loss,
                    loss_out: p.subscribe_stats.loss,
                    rtt: p.subscribe_stats.rtt.or(p.publish_stats.rtt),
                    estimate_bps: Some(p.estimate.bps()),
                    layer: if p.audio_only.is_some() { None } else { layer },
                    audio_only: p.audio_only,
                }
            })
            .collect()
    }

    fn request_waiting_keyframes(&mut self, now: Instant) {
        let mut wanted: Vec<(TrackRef, Layer)> = Vec::new();
        for p in &mut self.participants {
            let mut api = p.subscribe.rtc.direct_api();
            for sub in &p.subs {
                let Some(layer) = sub.forwarder.waiting_for() else {
                    continue;
                };
                let ready = api.stream_tx_by_mid(sub.mid, None).is_some();
                let want = (sub.source.clone(), layer);
                if sub.active && ready && !wanted.contains(&want) {
                    wanted.push(want);
                }
            }
        }
        for (track, layer) in wanted {
            self.request_keyframe(&track, layer, now);
        }
    }

    /// Asks the publisher of `track` for a keyframe of `layer`, at most once per throttle
    /// interval however many subscribers want one.
    fn request_keyframe(&mut self, track: &TrackRef, layer: Layer, now: Instant) {
        let Some(i) = self.index(&track.publisher) else {
            return;
        };
        let p = &mut self.participants[i];
        let Some(t) = p.tracks.iter_mut().find(|t| t.mid == track.mid) else {
            return;
        };
        let rid = t.rid_of(layer);
        if t.kind != TrackKind::Video || !t.layers[layer.index()].keyframes.try_request(now) {
            return;
        }
        if let Some(rx) = p.publish.rtc.direct_api().stream_rx_by_mid(track.mid, rid) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            self.stats.keyframe_requests_sent += 1;
        }
    }

    fn close(&mut self) {
        let ids: HashSet<ParticipantId> = self.participants.iter().map(|p| p.id.clone()).collect();
        for id in ids {
            self.remove_participant(&id);
        }
    }
}

/// Drains a connection's output: datagrams go to the socket, events to `on_event`.
fn poll_peer(peer: &mut Peer, socket: &dyn Egress, now: Instant, mut on_event: impl FnMut(Event)) {
    // str0m guarantees a Timeout output eventually; the bound protects the room task
    // from a connection that would otherwise monopolise it.
    let mut due_now = 0;
    for _ in 0..10_000 {
        match peer.rtc.poll_output() {
            Ok(Output::Transmit(t)) if t.proto == Protocol::Tcp => {
                let gone = match peer.tcp.get(&t.destination) {
                    Some(writer) => !writer.send(&t.contents),
                    None => false,
                };
                if gone {
                    peer.tcp.remove(&t.destination);
                }
            }
            Ok(Output::Transmit(t)) => {
                // Never wait on the socket: a full send buffer loses the datagram like the
                // network would, and congestion control reacts to the loss.
                socket.send_to(&t.contents, t.destination);
            }
            // With bandwidth estimation on, str0m hands out queued packets one per timeout
            // and asks to be woken again at once. Wake it here rather than going round the
            // room's whole loop for every packet (bounded, in case no progress is made).
            Ok(Output::Timeout(t)) if t <= now && due_now < 256 => {
                due_now += 1;
                if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(error = %e, "peer connection timeout failed");
                }
            }
            Ok(Output::Timeout(t)) => {
                peer.next_timeout = t;
                return;
            }
            Ok(Output::Event(e)) => on_event(e),
            Err(e) => {
                tracing::debug!(error = %e, "peer connection failed");
                peer.next_timeout = now + MAX_SLEEP;
                return;
            }
        }
    }
    peer.next_timeout = now;
}

/// The rids of each m-line's `a=simulcast:send` list, with the layer each carries.
fn simulcast_rids(sdp: &str) -> HashMap<Mid, Vec<(String, Layer)>> {
    let mut out = HashMap::new();
    let mut mid: Option<Mid> = None;
    let mut rids: Option<Vec<String>> = None;
    let mut end_section = |mid: &mut Option<Mid>, rids: &mut Option<Vec<String>>| {
        if let (Some(m), Some(r)) = (mid.take(), rids.take()) {
            out.insert(m, layers_for_rids(&r));
        }
    };
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            end_section(&mut mid, &mut rids);
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(Mid::from(m.trim()));
        } else if let Some(list) = line.strip_prefix("a=simulcast:send ") {
            // `q;h;f`, where a rid may be paused (`~q`) or offer alternatives (`q,r`).
            let list: Vec<String> = list
                .split_whitespace()
                .next()
                .unwrap_or("")
                .split(';')
                .filter_map(|alt| alt.split(',').next())
                .map(|r| r.trim_start_matches('~').to_string())
                .filter(|r| !r.is_empty())
                .collect();
            rids = Some(list);
        }
    }
    end_section(&mut mid, &mut rids);
    out
}

/// The codec a publisher's payload type carries and, for a RED payload type (str0m folds
/// RED onto the codec it wraps), the payload type of that codec.
fn codec_of(rtc: &Rtc, pt: str0m::media::Pt) -> Option<(Codec, Option<str0m::media::Pt>)> {
    let params = rtc.codec_config().params();
    if let Some(p) = params.iter().find(|p| p.pt() == pt) {
        return Some((p.spec().codec, None));
    }
    params
        .iter()
        .find(|p| p.red() == Some(pt))
        .map(|p| (p.spec().codec, Some(p.pt())))
}

/// A subscriber's payload type for `codec` and, where it negotiated RED for it, RED's.
fn pt_for(rtc: &Rtc, codec: Codec) -> Option<(str0m::media::Pt, Option<str0m::media::Pt>)> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == codec)
        .map(|p| (p.pt(), p.red()))
}

/// A participant id as an msid token (RFC 8830 token characters only).
fn msid_token(id: &str) -> String {
    id.chars().map(|c| if c == ':' { '-' } else { c }).collect()
}
