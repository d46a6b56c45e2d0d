//! A run: rooms join, everyone publishes and receives, the window is measured, everyone
//! leaves. In ramp mode rooms are added step by step, each step measured, until a limit is
//! passed.
//!
//! Every wait is bounded: joining by `join_timeout`, each window by its duration, and leaving
//! by a fixed grace; a run cannot outlive the sum.

use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::haven::Haven;
use crate::janus::{Janus, JanusRoom};
use crate::participant::{self, Dialect, Shared};
use crate::payload::{Kind, VideoShape, SIMULCAST_RIDS};
use crate::report::{
    FlowReport, Machine, Percentiles, RampLimits, RunReport, SimulcastReport, StepReport,
};
use crate::server::Minter;
use crate::stats::{
    percentile, sample, udp_buffer_errors, udp_drops_by_owner, Clock, FlowStats, ParticipantStats,
    ProcSample, WindowStats,
};

/// Packets sent in the window may arrive this long after it; later ones count as lost.
const GRACE: Duration = Duration::from_secs(1);
/// The window opens this long after it is set, so no sender sees half of it.
const WINDOW_LEAD: Duration = Duration::from_millis(100);
/// How long everyone gets to leave at the end.
const LEAVE_GRACE: Duration = Duration::from_secs(5);
/// How often readiness is checked while joining.
const READY_POLL: Duration = Duration::from_millis(50);
/// How many participant errors a step report quotes.
const ERRORS_QUOTED: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Haven,
    Janus,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Haven => "haven",
            Target::Janus => "janus",
        }
    }
}

#[derive(Clone, Debug)]
pub struct RampConfig {
    /// Rooms added per step (the first step has `LoadConfig::rooms`).
    pub step_rooms: usize,
    pub max_rooms: usize,
    pub max_loss: f64,
    pub max_delay_p99_ms: f64,
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: Target,
    /// Haven: `ws://host:port/ws`; Janus: its WebSocket transport, `ws://host:8188`.
    pub url: String,
    /// Haven: the key tokens are signed with.
    pub key_file: Option<std::path::PathBuf>,
    /// The server process measured from `/proc`.
    pub server_pid: Option<u32>,
    pub rooms: usize,
    pub participants: usize,
    /// The measurement window (per step in ramp mode).
    pub duration: Duration,
    /// How long to wait between the rooms being ready and the window: the joins' handshakes,
    /// renegotiations and first keyframes are then over before anything is measured. In ramp
    /// mode the new rooms join while the others run, so this matters most there.
    pub settle: Duration,
    pub join_timeout: Duration,
    /// The video each participant publishes; with `simulcast`, the top layer's.
    pub video: VideoShape,
    /// Publish three simulcast layers (rids q, h, f) instead of one video stream.
    pub simulcast: bool,
    pub audio_bytes: usize,
    pub client_ip: IpAddr,
    /// Janus: the rooms' bitrate cap in bits per second.
    pub janus_bitrate: u64,
    /// Janus: room ids start here (distinct per run when runs share a server).
    pub first_room_id: u64,
    pub label: String,
    pub ramp: Option<RampConfig>,
}

struct Person {
    id: String,
    publisher: u32,
    stats: Arc<Mutex<ParticipantStats>>,
    task: JoinHandle<()>,
}

struct Room {
    people: Vec<Person>,
}

struct Runner {
    cfg: LoadConfig,
    shared: Arc<Shared>,
    minter: Option<Minter>,
    stop: watch::Sender<bool>,
    rooms: Vec<Room>,
    next_publisher: u32,
    tag: String,
}

/// Runs the load and returns what was measured.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<RunReport> {
    if cfg.participants < 2 || cfg.participants > 16 {
        bail!("participants per room must be 2 to 16 (Haven's group size)");
    }
    let minter = match (cfg.target, &cfg.key_file) {
        (Target::Haven, Some(k)) => Some(Minter::from_pem_file(k)?),
        (Target::Haven, None) => bail!("Haven needs the key to sign tokens with"),
        (Target::Janus, _) => None,
    };
    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        clock: Arc::new(Clock::new()),
        video: cfg.video,
        simulcast: cfg.simulcast,
        audio_bytes: cfg.audio_bytes,
        client_ip: cfg.client_ip,
    });
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let mut runner = Runner {
        cfg: cfg.clone(),
        shared,
        minter,
        stop,
        rooms: Vec::new(),
        next_publisher: 1,
        tag,
    };

    let server_pid = cfg.server_pid.map(|p| p.to_string());
    let baseline = server_pid.as_deref().and_then(sample).unwrap_or_default();
    let mut steps = Vec::new();
    let mut last_good = None;
    let mut flows = Vec::new();

    let result: anyhow::Result<()> = async {
        let mut add = cfg.rooms;
        loop {
            let first_new = runner.rooms.len();
            runner.add_rooms(add).await?;
            runner.wait_ready(first_new).await;
            tokio::time::sleep(cfg.settle).await;
            let (step, step_flows) = runner
                .measure(server_pid.as_deref(), baseline, first_new)
                .await;
            flows = step_flows;
            let Some(ramp) = &cfg.ramp else {
                steps.push(step);
                break;
            };
            let good = step.loss <= ramp.max_loss
                && step.delay_ms.p99 <= ramp.max_delay_p99_ms
                && step.dead_flows == 0
                && step.error_count == 0;
            steps.push(step);
            if good {
                last_good = Some(steps.len() - 1);
            }
            if !good || runner.rooms.len() + ramp.step_rooms > ramp.max_rooms {
                break;
            }
            add = ramp.step_rooms;
        }
        Ok(())
    }
    .await;

    runner.finish().await;
    result?;
    Ok(RunReport {
        target: cfg.target.as_str().into(),
        label: cfg.label.clone(),
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        machine: Machine::this(),
        participants_per_room: cfg.participants,
        video_kbps: cfg.video.bitrate_bps / 1000,
        simulcast: cfg.simulcast,
        fps: cfg.video.fps,
        audio_payload_bytes: cfg.audio_bytes,
        steps,
        ramp_limits: cfg.ramp.as_ref().map(|r| RampLimits {
            max_loss: r.max_loss,
            max_delay_p99_ms: r.max_delay_p99_ms,
        }),
        last_good_step: last_good,
        flows,
    })
}

impl Runner {
    /// Opens `n` more rooms, all at once; in each, the first participant (the therapist) is in
    /// before the others come.
    async fn add_rooms(&mut self, n: usize) -> anyhow::Result<()> {
        let mut joins = Vec::new();
        for _ in 0..n {
            let r = self.rooms.len();
            let publishers: Vec<u32> = (0..self.cfg.participants as u32)
                .map(|i| self.next_publisher + i)
                .collect();
            self.next_publisher += self.cfg.participants as u32;
            let janus_room = Arc::new(JanusRoom {
                id: self.cfg.first_room_id + r as u64,
                feeds: publishers.iter().map(|p| u64::from(*p)).collect(),
                published: AtomicUsize::new(0),
                bitrate: self.cfg.janus_bitrate,
            });

            let mut people = Vec::new();
            let mut room_joins = Vec::new();
            for (i, publisher) in publishers.into_iter().enumerate() {
                let (id, role) = if i == 0 {
                    (format!("t-{r:03}"), "therapist")
                } else {
                    (format!("p-{r:03}-{i:02}"), "client")
                };
                let dialect = match self.cfg.target {
                    Target::Haven => {
                        let kind = if self.cfg.participants == 2 {
                            "individual"
                        } else {
                            "group"
                        };
                        let session = format!("load-{}-{r:03}", self.tag);
                        let minter = self.minter.as_ref().context("a key for Haven")?;
                        let token = minter.token(&session, kind, role, &id)?;
                        Dialect::Haven(Haven::new(token, i == 0))
                    }
                    Target::Janus => {
                        Dialect::Janus(Janus::new(janus_room.clone(), u64::from(publisher), i == 0))
                    }
                };
                let stats = Arc::new(Mutex::new(ParticipantStats::default()));
                let (joined_tx, joined_rx) = oneshot::channel();
                room_joins.push(joined_rx);
                let start = (
                    self.cfg.url.clone(),
                    dialect,
                    publisher,
                    self.shared.clone(),
                    stats.clone(),
                    joined_tx,
                    self.stop.subscribe(),
                );
                people.push((id, publisher, stats, start));
            }

            // The therapist first; the others once it is in (or could not get in).
            let mut started = Vec::new();
            let mut iter = people.into_iter();
            let mut first_joined = room_joins.remove(0);
            if let Some((id, publisher, stats, (url, d, p, sh, st, j, s))) = iter.next() {
                let task = tokio::spawn(participant::run(url, d, p, sh, st, j, s));
                started.push(Person {
                    id,
                    publisher,
                    stats,
                    task,
                });
            }
            let rest: Vec<_> = iter.collect();
            let timeout = self.cfg.join_timeout;
            let join = tokio::spawn(async move {
                let _ = tokio::time::timeout(timeout, &mut first_joined).await;
                let mut tasks = Vec::new();
                for (id, publisher, stats, (url, d, p, sh, st, j, s)) in rest {
                    let task = tokio::spawn(participant::run(url, d, p, sh, st, j, s));
                    tasks.push(Person {
                        id,
                        publisher,
                        stats,
                        task,
                    });
                }
                tasks
            });
            joins.push((started, join));
            self.rooms.push(Room { people: Vec::new() });
        }

        let first = self.rooms.len() - n;
        for (k, (mut started, join)) in joins.into_iter().enumerate() {
            let rest = join.await.context("room start task")?;
            started.extend(rest);
            self.rooms[first + k].people = started;
        }
        Ok(())
    }

    /// Waits until every participant of the rooms from `first_room` on receives every flow it
    /// should, or the join timeout passes (what is missing then shows as dead flows).
    async fn wait_ready(&self, first_room: usize) {
        let deadline = Instant::now() + self.cfg.join_timeout;
        while Instant::now() < deadline {
            let all = self.rooms[first_room..].iter().all(|room| {
                room.people.iter().all(|p| {
                    let Ok(s) = p.stats.lock() else { return false };
                    s.error.is_some() || expected_flows(room, p).all(|f| s.ever.contains(&f))
                })
            });
            if all {
                return;
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    async fn measure(
        &self,
        server_pid: Option<&str>,
        baseline: ProcSample,
        first_new_room: usize,
    ) -> (StepReport, Vec<FlowReport>) {
        let clock = &self.shared.clock;
        let start = Instant::now() + WINDOW_LEAD;
        let end = start + self.cfg.duration;
        clock.set_window(start, end);

        tokio::time::sleep_until(start.into()).await;
        let server0 = server_pid.and_then(sample);
        let tool0 = sample("self");
        let udp0 = udp_buffer_errors();
        let drops0 = server_pid.and_then(udp_drops_by_owner);
        tokio::time::sleep_until(end.into()).await;
        let server1 = server_pid.and_then(sample);
        let tool1 = sample("self");
        let udp1 = udp_buffer_errors();
        let drops1 = server_pid.and_then(udp_drops_by_owner);
        let window = start.elapsed().as_secs_f64();
        tokio::time::sleep(GRACE).await;

        // Take each participant's window counters and start empty ones.
        let mut windows: Vec<Vec<WindowStats>> = Vec::new();
        let mut errors = Vec::new();
        let mut keyframe_requests = 0;
        let mut join_ms = Vec::new();
        for (r, room) in self.rooms.iter().enumerate() {
            let mut w = Vec::new();
            for (i, p) in room.people.iter().enumerate() {
                let Ok(mut s) = p.stats.lock() else {
                    w.push(WindowStats::default());
                    continue;
                };
                w.push(std::mem::take(&mut s.window));
                keyframe_requests += s.keyframe_requests;
                if let Some(e) = &s.error {
                    errors.push(format!("{}: {e}", p.id));
                }
                if r >= first_new_room && i > 0 {
                    if let Some(j) = s.join_time {
                        join_ms.push(j.as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                }
            }
            windows.push(w);
        }

        let mut step = StepReport {
            rooms: self.rooms.len(),
            participants: self.rooms.iter().map(|r| r.people.len()).sum(),
            window_seconds: window,
            keyframe_requests,
            error_count: errors.len(),
            ..StepReport::default()
        };
        errors.truncate(ERRORS_QUOTED);
        step.errors = errors;

        let mut flows = Vec::new();
        let mut delays: Vec<u32> = Vec::new();
        let mut simulcast = self.cfg.simulcast.then(SimulcastReport::default);
        for (room, w) in self.rooms.iter().zip(&windows) {
            for (receiver, rw) in room.people.iter().zip(w) {
                step.duplicates += rw.flows.values().map(|f| f.duplicates).sum::<u64>();
                delays.extend_from_slice(&rw.delays_us);
                for (publisher, pw) in room.people.iter().zip(w) {
                    if publisher.publisher == receiver.publisher {
                        step.published_packets += pw.sent.iter().sum::<u64>();
                        if let Some(sim) = simulcast.as_mut() {
                            sim.add_sent(&pw.sent_layers, room.people.len() - 1);
                        }
                        continue;
                    }
                    for kind in [Kind::Audio, Kind::Video] {
                        let flow = match (kind, simulcast.as_mut()) {
                            (Kind::Video, Some(sim)) => {
                                simulcast_flow(sim, rw, publisher.publisher, &pw.sent_layers)
                            }
                            _ => {
                                let got = rw.flows.get(&(publisher.publisher, kind, None));
                                Flow {
                                    expected: pw.sent[kind.index()],
                                    received: got.map_or(0, |f| f.packets),
                                    bytes: got.map_or(0, |f| f.bytes),
                                    layers: None,
                                }
                            }
                        };
                        step.flows += 1;
                        step.expected_packets += flow.expected;
                        step.forwarded_packets += flow.received;
                        step.forwarded_bytes += flow.bytes;
                        if flow.received == 0 {
                            step.dead_flows += 1;
                        }
                        flows.push(FlowReport {
                            receiver: receiver.id.clone(),
                            publisher: publisher.id.clone(),
                            kind,
                            expected: flow.expected,
                            received: flow.received,
                            layers: flow.layers,
                        });
                    }
                }
            }
        }
        step.simulcast = simulcast;
        if step.expected_packets > 0 {
            step.loss = 1.0
                - (step.forwarded_packets.min(step.expected_packets) as f64
                    / step.expected_packets as f64);
        }
        step.delay_ms = percentiles_ms(&mut delays);
        step.join_ms = percentiles_ms(&mut join_ms);

        if let (Some(a), Some(b)) = (server0, server1) {
            step.server_cpu_seconds = b.cpu_seconds - a.cpu_seconds;
            step.server_cpu_percent = step.server_cpu_seconds / window * 100.0;
            if step.forwarded_packets > 0 {
                step.server_cpu_us_per_forwarded_packet =
                    step.server_cpu_seconds * 1e6 / step.forwarded_packets as f64;
            }
            step.server_rss_mib = b.rss_kib as f64 / 1024.0;
            step.server_peak_rss_mib = b.peak_rss_kib as f64 / 1024.0;
            if step.participants > 0 {
                step.server_mib_per_participant = (b.rss_kib as f64 - baseline.rss_kib as f64)
                    / 1024.0
                    / step.participants as f64;
            }
        }
        if let (Some(a), Some(b)) = (udp0, udp1) {
            step.udp_rcvbuf_errors = b.0.saturating_sub(a.0);
            step.udp_sndbuf_errors = b.1.saturating_sub(a.1);
        }
        if let (Some(a), Some(b)) = (drops0, drops1) {
            step.udp_drops_server = Some(b.0.saturating_sub(a.0));
            step.udp_drops_tool = Some(b.1.saturating_sub(a.1));
        }
        if let (Some(a), Some(b)) = (tool0, tool1) {
            step.tool_cpu_seconds = b.cpu_seconds - a.cpu_seconds;
            step.tool_cpu_percent = step.tool_cpu_seconds / window * 100.0;
        }
        (step, flows)
    }

    /// Everyone leaves; tasks that do not finish in time are aborted.
    async fn finish(&mut self) {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + LEAVE_GRACE;
        for room in &mut self.rooms {
            for p in &mut room.people {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, &mut p.task).await.is_err() {
                    p.task.abort();
                }
            }
        }
    }
}

/// What one receiver got of one publisher's audio or video in the window.
struct Flow {
    expected: u64,
    received: u64,
    bytes: u64,
    /// With simulcast: packets received per layer, by rid.
    layers: Option<std::collections::BTreeMap<String, u64>>,
}

/// One publisher's simulcast video as one receiver got it. The receiver's single m-line
/// carries whichever layers the server chose to forward:
///
/// - one layer: expected is what the publisher sent on that layer in the window, so loss is
///   exact, as without simulcast;
/// - several layers (the server switched, or forwarded more than one): each layer's expected
///   is the span of sequence numbers received on it, since the tool cannot know which packets
///   the server meant to forward;
/// - none: a dead flow, expected as much as the lowest layer sent.
fn simulcast_flow(
    sim: &mut SimulcastReport,
    rw: &WindowStats,
    publisher: u32,
    sent_layers: &[u64; SIMULCAST_RIDS.len()],
) -> Flow {
    let got: Vec<(usize, &FlowStats)> = (0..SIMULCAST_RIDS.len())
        .filter_map(|l| {
            rw.flows
                .get(&(publisher, Kind::Video, Some(l as u8)))
                .filter(|f| f.packets > 0)
                .map(|f| (l, f))
        })
        .collect();
    let expected = match got.as_slice() {
        [] => sent_layers[0],
        [(l, _)] => sent_layers[*l],
        several => several.iter().map(|(_, f)| f.seq_span()).sum(),
    };
    let received = got.iter().map(|(_, f)| f.packets).sum();
    let bytes = got.iter().map(|(_, f)| f.bytes).sum();
    let layers: Vec<usize> = got.iter().map(|(l, _)| *l).collect();
    let per_layer = got
        .iter()
        .map(|(l, f)| (SIMULCAST_RIDS[*l].to_owned(), f.packets))
        .collect();
    sim.add_flow(&layers, got.iter().map(|(l, f)| (*l, f.packets)));
    Flow {
        expected,
        received,
        bytes,
        layers: Some(per_layer),
    }
}

/// The (publisher, kind) pairs participant `p` of `room` should receive.
fn expected_flows<'a>(room: &'a Room, p: &'a Person) -> impl Iterator<Item = (u32, Kind)> + 'a {
    room.people
        .iter()
        .filter(move |o| o.publisher != p.publisher)
        .flat_map(|o| [(o.publisher, Kind::Audio), (o.publisher, Kind::Video)])
}

fn percentiles_ms(us: &mut [u32]) -> Percentiles {
    us.sort_unstable();
    let ms = |q: f64| percentile(us, q).map_or(0.0, |v| f64::from(v) / 1000.0);
    Percentiles {
        p50: ms(0.50),
        p95: ms(0.95),
        p99: ms(0.99),
        max: ms(1.0),
    }
}
