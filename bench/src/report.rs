//! A run's figures: one [`StepReport`] per measurement window (one for a plain run, one per
//! step in ramp mode), printed as a table and serialised as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::payload::{Kind, SIMULCAST_RIDS};

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub target: String,
    pub label: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub machine: Machine,
    pub participants_per_room: usize,
    /// Without simulcast the video's bitrate; with it, the top layer's.
    pub video_kbps: u64,
    /// Publishers sent three simulcast layers (q, h, f).
    pub simulcast: bool,
    pub fps: u32,
    pub audio_payload_bytes: usize,
    pub steps: Vec<StepReport>,
    /// Ramp mode: the limits a step had to stay inside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp_limits: Option<RampLimits>,
    /// Ramp mode: the last step inside the limits (index into `steps`).
    pub last_good_step: Option<usize>,
    /// Every (receiver, publisher, kind) of the last step.
    pub flows: Vec<FlowReport>,
}

/// What a ramp step must stay inside to count as good: loss, delay p99, no dead flows and no
/// participant errors.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RampLimits {
    pub max_loss: f64,
    pub max_delay_p99_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
}

impl Machine {
    pub fn this() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowReport {
    pub receiver: String,
    pub publisher: String,
    pub kind: Kind,
    /// Packets the publisher sent inside the window.
    pub expected: u64,
    /// Of those, packets the receiver got (duplicates counted once).
    pub received: u64,
    /// Simulcast video: packets received per layer, by rid (layers that sent nothing to this
    /// receiver are left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<BTreeMap<String, u64>>,
}

/// Which simulcast layers reached the subscribers in one window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimulcastReport {
    /// Video packets the publishers sent inside the window, per layer (rid), times the
    /// number of receivers each publisher has: what would arrive if every receiver got every
    /// packet of that layer.
    pub offered: BTreeMap<String, u64>,
    /// Video packets the receivers got of those, per layer (rid), all receivers together.
    pub received: BTreeMap<String, u64>,
    /// (receiver, publisher) video flows by the layers they received: "f" for a flow that got
    /// only the top layer, "q+h+f" for one that got all three, "none" for a dead one.
    pub flows_by_layers: BTreeMap<String, usize>,
}

impl SimulcastReport {
    /// One publisher's packets sent per layer, which `receivers` others should get.
    pub fn add_sent(&mut self, sent: &[u64; SIMULCAST_RIDS.len()], receivers: usize) {
        for (rid, n) in SIMULCAST_RIDS.iter().zip(sent) {
            *self.offered.entry((*rid).to_owned()).or_default() += n * receivers as u64;
        }
    }

    /// One video flow that received `layers` (indices, lowest first) and these packets on them.
    pub fn add_flow(&mut self, layers: &[usize], packets: impl Iterator<Item = (usize, u64)>) {
        let name = if layers.is_empty() {
            "none".to_owned()
        } else {
            layers
                .iter()
                .map(|l| SIMULCAST_RIDS[*l])
                .collect::<Vec<_>>()
                .join("+")
        };
        *self.flows_by_layers.entry(name).or_default() += 1;
        for (l, n) in packets {
            *self
                .received
                .entry(SIMULCAST_RIDS[l].to_owned())
                .or_default() += n;
        }
    }

    /// `q 1200/1200, h 0/3100, f 0/8800 · flows: q 30`: received/offered per layer, then flows
    /// by the layers they got.
    fn summary(&self) -> String {
        let layers = SIMULCAST_RIDS
            .iter()
            .map(|rid| {
                let got = self.received.get(*rid).copied().unwrap_or(0);
                let offered = self.offered.get(*rid).copied().unwrap_or(0);
                format!("{rid} {got}/{offered}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let flows = self
            .flows_by_layers
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "packets received/offered per layer: {layers} · video flows by layers received: {flows}"
        )
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StepReport {
    pub rooms: usize,
    pub participants: usize,
    /// (receiver, publisher, kind) flows, audio and video.
    pub flows: usize,
    pub window_seconds: f64,
    pub published_packets: u64,
    pub expected_packets: u64,
    /// Packets the receivers got of those sent in the window: what the server forwarded.
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub loss: f64,
    /// Flows that received nothing at all in the window.
    pub dead_flows: usize,
    pub duplicates: u64,
    pub delay_ms: Percentiles,
    /// WebSocket open to first remote video packet, for everyone but each room's first
    /// participant, of the rooms added in this step.
    pub join_ms: Percentiles,
    pub server_cpu_seconds: f64,
    pub server_cpu_percent: f64,
    pub server_cpu_us_per_forwarded_packet: f64,
    pub server_rss_mib: f64,
    pub server_peak_rss_mib: f64,
    /// (RSS at the window's end − RSS before anyone joined) / participants.
    pub server_mib_per_participant: f64,
    pub tool_cpu_seconds: f64,
    pub tool_cpu_percent: f64,
    pub keyframe_requests: u64,
    /// UDP datagrams dropped by the kernel for a full receive buffer during the window, on
    /// any socket of the network namespace (server's or tool's), and sends refused for a full
    /// send buffer.
    pub udp_rcvbuf_errors: u64,
    pub udp_sndbuf_errors: u64,
    /// Of the datagrams dropped at receive, those on the server's sockets and those on the
    /// tool's (per-socket `drops` in `/proc/net/udp`; known when the server's pid is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_drops_server: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_drops_tool: Option<u64>,
    /// Participants that stopped with an error (first few messages).
    pub errors: Vec<String>,
    pub error_count: usize,
    /// With simulcast: which layers the subscribers received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulcast: Option<SimulcastReport>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl RunReport {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} ({}) · {} · {} × {} · video {} kbit/s{} at {} fps + audio · {} cores, {}",
            self.target,
            self.label,
            self.date,
            self.steps.last().map_or(0, |st| st.rooms),
            self.participants_per_room,
            self.video_kbps,
            if self.simulcast {
                " (top of 3 simulcast layers)"
            } else {
                ""
            },
            self.fps,
            self.machine.nproc,
            self.machine.cpu_model
        );
        let _ = writeln!(
            s,
            "{:>5} {:>5} {:>9} {:>8} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>6} {:>5}",
            "rooms", "ppl", "fwd pps", "Mbit/s", "loss%", "dead", "d p50", "d p95", "d p99",
            "join50", "join95", "srv cpu", "us/pkt", "RSS MiB", "MiB/pp", "tool", "errs"
        );
        for (i, st) in self.steps.iter().enumerate() {
            let w = st.window_seconds.max(1e-9);
            let mark = if self.last_good_step == Some(i) {
                " <- last good"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "{:>5} {:>5} {:>9.0} {:>8.1} {:>7.3} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>7.0} {:>7.0} {:>6.1}% {:>8.2} {:>8.1} {:>7.2} {:>5.1}% {:>5}{mark}",
                st.rooms,
                st.participants,
                st.forwarded_packets as f64 / w,
                st.forwarded_bytes as f64 * 8.0 / w / 1e6,
                st.loss * 100.0,
                st.dead_flows,
                st.delay_ms.p50,
                st.delay_ms.p95,
                st.delay_ms.p99,
                st.join_ms.p50,
                st.join_ms.p95,
                st.server_cpu_percent,
                st.server_cpu_us_per_forwarded_packet,
                st.server_rss_mib,
                st.server_mib_per_participant,
                st.tool_cpu_percent,
                st.error_count,
            );
        }
        for st in self
            .steps
            .iter()
            .filter(|st| st.udp_rcvbuf_errors + st.udp_sndbuf_errors > 0)
        {
            let split = match (st.udp_drops_server, st.udp_drops_tool) {
                (Some(server), Some(tool)) => {
                    format!(" (server's sockets {server}, tool's {tool})")
                }
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  {} rooms: kernel dropped {} datagrams for full receive buffers{split}, {} sends for full send buffers",
                st.rooms, st.udp_rcvbuf_errors, st.udp_sndbuf_errors
            );
        }
        if let Some(limits) = &self.ramp_limits {
            let verdict = match self.last_good_step.and_then(|i| self.steps.get(i)) {
                Some(st) => format!(
                    "{} rooms of {} ({} participants)",
                    st.rooms, self.participants_per_room, st.participants
                ),
                None => "none (the first step already passed a limit)".to_owned(),
            };
            let _ = writeln!(
                s,
                "  ramp: last good step {verdict}; limits: loss {} %, delay p99 {} ms, no dead flows, no errors",
                limits.max_loss * 100.0,
                limits.max_delay_p99_ms
            );
        }
        for st in &self.steps {
            if let Some(sim) = &st.simulcast {
                let _ = writeln!(s, "  {} rooms: simulcast {}", st.rooms, sim.summary());
            }
        }
        for e in self.steps.iter().flat_map(|st| &st.errors) {
            let _ = writeln!(s, "  error: {e}");
        }
        s
    }
}
