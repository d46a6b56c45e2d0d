//! One participant: a signaling WebSocket, a publishing and a receiving peer connection, and
//! the synthetic media it sends, all driven from one select loop.
//!
//! The signaling dialect (Haven's or Janus's) is a state machine fed with the server's
//! messages; it asks [`Media`] for offers and answers and returns the messages to send.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, KeyframeRequest, MediaKind, Mid, Rid, Simulcast, SimulcastLayer};
use str0m::rtp::RtpWrite;
use str0m::{Event, Rtc};
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::haven::Haven;
use crate::janus::Janus;
use crate::payload::{audio_payload, Kind, Trailer, VideoShape, VideoSource, SIMULCAST_RIDS};
use crate::peer::{Peer, MAX_DATAGRAM};
use crate::stats::{Clock, ParticipantStats};

const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
/// Audio RTP clock ticks per packet (48 kHz, 20 ms).
const AUDIO_TICKS: u32 = 960;
const VIDEO_CLOCK: f64 = 90_000.0;
/// A sender that fell this far behind its schedule skips ahead instead of bursting.
const MAX_LAG: Duration = Duration::from_millis(200);
/// Datagrams read from one socket before the loop looks at the others.
const READ_BATCH: usize = 32;
/// How long a leaving participant waits for the server to close the socket.
const LEAVE_WAIT: Duration = Duration::from_secs(2);

/// What every participant of a run shares.
pub struct Shared {
    pub clock: Arc<Clock>,
    pub video: VideoShape,
    /// Publish video as three simulcast layers ([`SIMULCAST_RIDS`]) instead of one stream.
    pub simulcast: bool,
    pub audio_bytes: usize,
    pub client_ip: IpAddr,
}

/// One outgoing video stream: the only one, or one simulcast layer.
struct VideoLayer {
    /// The layer's rid and its index in [`SIMULCAST_RIDS`]; `None` without simulcast.
    rid: Option<(Rid, u8)>,
    source: VideoSource,
    /// Per layer, from 0, one per packet (the trailer's and, plus one, the RTP sequence).
    seq: u32,
    /// A keyframe was asked for (or none was sent yet).
    want_keyframe: bool,
}

impl VideoLayer {
    /// The video streams a participant sends under `shared`'s settings.
    fn all(shared: &Shared) -> Vec<VideoLayer> {
        if !shared.simulcast {
            return vec![VideoLayer {
                rid: None,
                source: VideoSource::new(shared.video),
                seq: 0,
                want_keyframe: true,
            }];
        }
        SIMULCAST_RIDS
            .iter()
            .enumerate()
            .map(|(i, rid)| VideoLayer {
                rid: Some((Rid::from(*rid), i as u8)),
                source: VideoSource::simulcast_layer(shared.video, i),
                seq: 0,
                want_keyframe: true,
            })
            .collect()
    }
}

/// The signaling dialect a participant speaks.
pub enum Dialect {
    Haven(Haven),
    Janus(Janus),
}

/// What a dialect asks the participant loop to do after a message or tick.
#[derive(Default)]
pub struct Reply {
    pub send: Vec<Value>,
    /// The server let the participant into the room.
    pub joined: bool,
    /// The server ended the stay; the loop stops.
    pub done: bool,
}

/// The participant's two connections and its media sources.
pub struct Media {
    publish: Peer,
    subscribe: Peer,
    publisher: u32,
    pending_offer: Option<SdpPendingOffer>,
    audio_mid: Option<Mid>,
    video_mid: Option<Mid>,
    video: Vec<VideoLayer>,
    video_interval: Duration,
    audio_seq: u32,
    video_frames: u32,
    next_audio: Instant,
    next_video: Instant,
    shared: Arc<Shared>,
    stats: Arc<Mutex<ParticipantStats>>,
    ws_opened: Instant,
}

impl Media {
    async fn new(
        publisher: u32,
        shared: Arc<Shared>,
        stats: Arc<Mutex<ParticipantStats>>,
        now: Instant,
    ) -> anyhow::Result<Media> {
        Ok(Media {
            publish: Peer::bind(shared.client_ip, now).await?,
            subscribe: Peer::bind(shared.client_ip, now).await?,
            publisher,
            pending_offer: None,
            audio_mid: None,
            video_mid: None,
            video: VideoLayer::all(&shared),
            video_interval: shared.video.frame_interval(),
            audio_seq: 0,
            video_frames: 0,
            next_audio: now,
            next_video: now,
            shared,
            stats,
            ws_opened: now,
        })
    }

    /// The offer for the publishing connection: one audio and one video track, send only. With
    /// simulcast the video m-line announces the layers (`a=rid:q send` ...,
    /// `a=simulcast:send q;h;f`) and str0m declares one send stream per rid.
    pub fn publish_offer(&mut self) -> anyhow::Result<String> {
        let simulcast = self.shared.simulcast.then(|| {
            let mut s = Simulcast::new();
            for rid in SIMULCAST_RIDS {
                s.add_send_layer(SimulcastLayer::new(rid));
            }
            s
        });
        let mut api = self.publish.rtc.sdp_api();
        let stream = format!("load-{}", self.publisher);
        let audio = api.add_media(
            MediaKind::Audio,
            Direction::SendOnly,
            Some(stream.clone()),
            Some(format!("{stream}-audio")),
            None,
        );
        let video = api.add_media(
            MediaKind::Video,
            Direction::SendOnly,
            Some(stream.clone()),
            Some(format!("{stream}-video")),
            simulcast,
        );
        let (offer, pending) = api
            .apply()
            .context("a new connection has changes to offer")?;
        self.audio_mid = Some(audio);
        self.video_mid = Some(video);
        self.pending_offer = Some(pending);
        Ok(offer.to_sdp_string())
    }

    pub fn publish_answer(&mut self, sdp: &str) -> anyhow::Result<()> {
        let pending = self
            .pending_offer
            .take()
            .ok_or_else(|| anyhow!("an answer came without an offer of ours"))?;
        let answer = SdpAnswer::from_sdp_string(sdp).context("publish answer does not parse")?;
        self.publish
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .context("publish answer refused")?;
        let now = Instant::now();
        self.publish.poll(now, |_, _| {});
        Ok(())
    }

    /// Answers the server's offer for the receiving connection.
    pub fn subscribe_offer(&mut self, sdp: &str) -> anyhow::Result<String> {
        let offer = SdpOffer::from_sdp_string(sdp).context("subscribe offer does not parse")?;
        let answer = self
            .subscribe
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .context("subscribe offer refused")?;
        Ok(answer.to_sdp_string())
    }

    fn next_deadline(&self) -> Instant {
        let mut d = self
            .publish
            .next_timeout()
            .min(self.subscribe.next_timeout());
        if self.publish.rtc.is_connected() {
            d = d.min(self.next_audio).min(self.next_video);
        }
        d
    }

    /// Timers of both connections, then whatever media is due.
    fn tick(&mut self, now: Instant) {
        let (layers, stats) = (&mut self.video, &self.stats);
        self.publish
            .timeout(now, |_, e| on_publish_event(e, layers, stats));
        let (shared, stats, opened) = (&self.shared, &self.stats, self.ws_opened);
        self.subscribe.timeout(now, |rtc, e| {
            on_subscribe_event(rtc, e, shared, stats, opened)
        });
        if self.publish.rtc.is_connected() {
            self.send_due(now);
        }
    }

    fn send_due(&mut self, now: Instant) {
        let (Some(audio_mid), Some(video_mid)) = (self.audio_mid, self.video_mid) else {
            return;
        };
        let mut sent = false;
        if now >= self.next_audio {
            self.next_audio = catch_up(self.next_audio, now, AUDIO_INTERVAL);
            let payload = audio_payload(self.shared.audio_bytes);
            let time = self.audio_seq.wrapping_mul(AUDIO_TICKS);
            sent |= self.write(audio_mid, None, vec![payload], time, now);
        }
        if now >= self.next_video {
            self.next_video = catch_up(self.next_video, now, self.video_interval);
            // Every layer encodes the same picture, so they share the RTP timestamp.
            let time = (f64::from(self.video_frames) * VIDEO_CLOCK
                / f64::from(self.shared.video.fps)) as u32;
            self.video_frames += 1;
            for layer in 0..self.video.len() {
                let v = &mut self.video[layer];
                let (packets, key) = v.source.next_frame(std::mem::take(&mut v.want_keyframe));
                let written = self.write(video_mid, Some(layer), packets, time, now);
                if !written && key {
                    // The stream is not there yet: the keyframe is still owed.
                    self.video[layer].want_keyframe = true;
                }
                sent |= written;
            }
        }
        if sent {
            let (layers, stats) = (&mut self.video, &self.stats);
            self.publish
                .poll(now, |_, e| on_publish_event(e, layers, stats));
        }
    }

    /// Writes one frame's packets, audio (`video_layer` `None`) or one video stream; the last
    /// packet carries the marker bit.
    fn write(
        &mut self,
        mid: Mid,
        video_layer: Option<usize>,
        packets: Vec<Vec<u8>>,
        time: u32,
        now: Instant,
    ) -> bool {
        let kind = if video_layer.is_some() {
            Kind::Video
        } else {
            Kind::Audio
        };
        let pt = {
            let params = self.publish.rtc.codec_config().params();
            let want = match kind {
                Kind::Audio => str0m::format::Codec::Opus,
                Kind::Video => str0m::format::Codec::Vp8,
            };
            match params.iter().find(|p| p.spec().codec == want) {
                Some(p) => p.pt(),
                None => return false,
            }
        };
        let sent_ns = self.shared.clock.ns(now);
        let in_window = self.shared.clock.in_window(sent_ns);
        let count = packets.len();
        let (seq, rid) = match video_layer.and_then(|l| self.video.get_mut(l)) {
            Some(v) => (&mut v.seq, v.rid),
            None => (&mut self.audio_seq, None),
        };
        let mut api = self.publish.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, rid.map(|(rid, _)| rid)) else {
            return false;
        };
        let mut bytes = 0;
        for (i, mut payload) in packets.into_iter().enumerate() {
            Trailer {
                publisher: self.publisher,
                kind,
                layer: rid.map(|(_, index)| index),
                seq: *seq,
                sent_ns,
            }
            .write(&mut payload);
            bytes += payload.len() as u64;
            // RTP sequence numbers start low so the SRTP rollover counter starts at zero.
            let rtp_seq = u64::from(*seq) + 1;
            *seq += 1;
            let marker = kind == Kind::Audio || i + 1 == count;
            let w = RtpWrite::new(pt, rtp_seq.into(), time, now, payload)
                .marker(marker)
                .nackable(kind == Kind::Video);
            tx.write_rtp(w);
        }
        if in_window {
            if let Ok(mut s) = self.stats.lock() {
                s.window.sent[kind.index()] += count as u64;
                s.window.sent_bytes[kind.index()] += bytes;
                if let Some((_, index)) = rid {
                    s.window.sent_layers[usize::from(index)] += count as u64;
                }
            }
        }
        true
    }
}

/// The next send time after `at`, skipping ahead when the loop fell far behind.
fn catch_up(at: Instant, now: Instant, interval: Duration) -> Instant {
    if now.saturating_duration_since(at) > MAX_LAG {
        now + interval
    } else {
        at + interval
    }
}

/// A keyframe request names its simulcast layer by rid; one without a rid (or for a rid we
/// do not send) asks every layer.
fn on_publish_event(e: Event, layers: &mut [VideoLayer], stats: &Mutex<ParticipantStats>) {
    if let Event::KeyframeRequest(KeyframeRequest { rid, .. }) = e {
        let named = rid.filter(|r| layers.iter().any(|l| l.rid.map(|(x, _)| x) == Some(*r)));
        for l in layers.iter_mut() {
            if named.is_none() || l.rid.map(|(x, _)| x) == named {
                l.want_keyframe = true;
            }
        }
        if let Ok(mut s) = stats.lock() {
            s.keyframe_requests += 1;
        }
    }
}

fn on_subscribe_event(
    _rtc: &mut Rtc,
    e: Event,
    shared: &Shared,
    stats: &Mutex<ParticipantStats>,
    ws_opened: Instant,
) {
    let Event::RtpPacket(pkt) = e else { return };
    let Ok(mut s) = stats.lock() else { return };
    let Some(t) = Trailer::read(&pkt.payload) else {
        s.window.foreign += 1;
        return;
    };
    if s.join_time.is_none() && t.kind == Kind::Video {
        s.join_time = Some(pkt.timestamp.saturating_duration_since(ws_opened));
    }
    s.ever.insert((t.publisher, t.kind));
    if shared.clock.in_window(t.sent_ns) {
        let delay = pkt
            .timestamp
            .saturating_duration_since(shared.clock.instant(t.sent_ns));
        s.window.record(&t, pkt.payload.len(), delay);
    }
}

/// Runs one participant until `stop` turns true or the server ends its stay. Errors end up in
/// the participant's stats.
pub async fn run(
    url: String,
    mut dialect: Dialect,
    publisher: u32,
    shared: Arc<Shared>,
    stats: Arc<Mutex<ParticipantStats>>,
    joined: oneshot::Sender<()>,
    stop: watch::Receiver<bool>,
) {
    let result = drive(
        url,
        &mut dialect,
        publisher,
        shared,
        stats.clone(),
        joined,
        stop,
    )
    .await;
    if let Err(e) = result {
        if let Ok(mut s) = stats.lock() {
            s.error = Some(format!("{e:#}"));
        }
    }
}

async fn drive(
    url: String,
    dialect: &mut Dialect,
    publisher: u32,
    shared: Arc<Shared>,
    stats: Arc<Mutex<ParticipantStats>>,
    joined: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let now = Instant::now();
    let mut media = Media::new(publisher, shared.clone(), stats.clone(), now).await?;
    let mut ws = match dialect {
        Dialect::Haven(_) => crate::haven::connect(&url).await?,
        Dialect::Janus(_) => crate::janus::connect(&url).await?,
    };
    media.ws_opened = now;
    let mut joined = Some(joined);

    let first = match dialect {
        Dialect::Haven(h) => h.start(),
        Dialect::Janus(j) => j.start(),
    };
    for m in first {
        ws.send(Message::text(m.to_string())).await?;
    }

    let mut pub_buf = vec![0u8; MAX_DATAGRAM];
    let mut sub_buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let deadline = media.next_deadline().max(Instant::now());
        let mut reply = Reply::default();
        tokio::select! {
            r = media.publish.socket.recv_from(&mut pub_buf) => {
                let (n, src) = r.context("publish socket")?;
                let at = Instant::now();
                let (layers, st) = (&mut media.video, &media.stats);
                media.publish.receive(&pub_buf[..n], src, at, |_, e| on_publish_event(e, layers, st));
                for _ in 0..READ_BATCH {
                    let Ok((n, src)) = media.publish.socket.try_recv_from(&mut pub_buf) else { break };
                    let at = Instant::now();
                    media.publish.receive(&pub_buf[..n], src, at, |_, e| on_publish_event(e, layers, st));
                }
            }
            r = media.subscribe.socket.recv_from(&mut sub_buf) => {
                let (n, src) = r.context("subscribe socket")?;
                let at = Instant::now();
                let (sh, st, opened) = (&media.shared, &media.stats, media.ws_opened);
                media.subscribe.receive(&sub_buf[..n], src, at, |rtc, e| on_subscribe_event(rtc, e, sh, st, opened));
                for _ in 0..READ_BATCH {
                    let Ok((n, src)) = media.subscribe.socket.try_recv_from(&mut sub_buf) else { break };
                    let at = Instant::now();
                    media.subscribe.receive(&sub_buf[..n], src, at, |rtc, e| on_subscribe_event(rtc, e, sh, st, opened));
                }
            }
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => return Err(anyhow!("server closed the signaling socket: {f:?}")),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(anyhow!("signaling socket: {e}")),
                    None => return Err(anyhow!("server closed the signaling socket")),
                };
                let msg: Value = serde_json::from_str(&text).context("server sent invalid JSON")?;
                reply = match dialect {
                    Dialect::Haven(h) => h.on_message(&msg, &mut media)?,
                    Dialect::Janus(j) => j.on_message(&msg, &mut media)?,
                };
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = stop.changed() => break,
        }
        let now = Instant::now();
        media.tick(now);
        let tick = match dialect {
            Dialect::Haven(h) => h.on_tick(now),
            Dialect::Janus(j) => j.on_tick(now),
        };
        reply.send.extend(tick);
        for m in reply.send {
            ws.send(Message::text(m.to_string())).await?;
        }
        if reply.joined {
            if let Some(j) = joined.take() {
                let _ = j.send(());
            }
        }
        if reply.done {
            return Ok(());
        }
    }

    // Leave like a browser would, then give the server a moment to close the socket.
    let bye = match dialect {
        Dialect::Haven(h) => h.leave(),
        Dialect::Janus(j) => j.leave(),
    };
    for m in bye {
        let _ = ws.send(Message::text(m.to_string())).await;
    }
    let _ = tokio::time::timeout(LEAVE_WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    Ok(())
}
