//! What participants sent and received inside the measurement window, and the server's and
//! the tool's CPU and memory from `/proc`.
//!
//! Only packets whose *send time* lies inside the window count, on both sides: a publisher
//! counts what it sent in the window, a receiver what it got of those. So loss is exact per
//! flow (nothing in flight at the window's edges is mistaken for loss), provided the receivers
//! are read a grace period after the window closes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::payload::{Kind, Trailer, SIMULCAST_RIDS};

/// One stream as receivers see it: publisher, kind and simulcast layer (`None` for audio and
/// for video without simulcast).
pub type FlowKey = (u32, Kind, Option<u8>);

/// The run's clock: nanoseconds since one `Instant`, shared by every sender and receiver of
/// the run (they live in one process, so they share the machine's monotonic clock).
#[derive(Debug)]
pub struct Clock {
    epoch: Instant,
    /// The window is `[start, end)` in clock nanoseconds. `start` is always set before `end`,
    /// and a new window starts after the old one ended, so a reader that sees a mix of old
    /// and new values sees an empty window, never a wrong one.
    start: AtomicU64,
    end: AtomicU64,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            epoch: Instant::now(),
            start: AtomicU64::new(u64::MAX),
            end: AtomicU64::new(0),
        }
    }

    pub fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub fn instant(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    pub fn set_window(&self, start: Instant, end: Instant) {
        self.start.store(self.ns(start), Ordering::SeqCst);
        self.end.store(self.ns(end), Ordering::SeqCst);
    }

    pub fn in_window(&self, ns: u64) -> bool {
        ns >= self.start.load(Ordering::Relaxed) && ns < self.end.load(Ordering::Relaxed)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// One (publisher, kind, layer) as one receiver saw it inside the window.
#[derive(Debug, Default, Clone)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
    pub duplicates: u64,
    seen: HashSet<u32>,
}

impl FlowStats {
    /// How many sequence numbers the received packets span (lowest to highest, inclusive):
    /// what a receiver that cannot know the sender's count expects.
    pub fn seq_span(&self) -> u64 {
        match (self.seen.iter().min(), self.seen.iter().max()) {
            (Some(lo), Some(hi)) => u64::from(hi - lo) + 1,
            _ => 0,
        }
    }
}

/// Everything one participant counted in the current window.
#[derive(Debug, Default, Clone)]
pub struct WindowStats {
    /// Packets and payload bytes sent inside the window, by kind (all layers together).
    pub sent: [u64; 2],
    pub sent_bytes: [u64; 2],
    /// Video packets sent inside the window, by simulcast layer (zero without simulcast).
    pub sent_layers: [u64; SIMULCAST_RIDS.len()],
    pub flows: HashMap<FlowKey, FlowStats>,
    /// One-way delay of every packet received, in microseconds.
    pub delays_us: Vec<u32>,
    /// Packets that arrived without this tool's trailer or from the participant itself.
    pub foreign: u64,
}

impl WindowStats {
    pub fn record(&mut self, t: &Trailer, len: usize, delay: Duration) {
        let flow = self
            .flows
            .entry((t.publisher, t.kind, t.layer))
            .or_default();
        if !flow.seen.insert(t.seq) {
            flow.duplicates += 1;
            return;
        }
        flow.packets += 1;
        flow.bytes += len as u64;
        self.delays_us
            .push(delay.as_micros().min(u128::from(u32::MAX)) as u32);
    }
}

/// A participant's counters, shared with the orchestrator behind a mutex.
#[derive(Debug, Default)]
pub struct ParticipantStats {
    pub window: WindowStats,
    /// Every (publisher, kind) ever received, window or not: readiness is when all are here.
    pub ever: HashSet<(u32, Kind)>,
    /// WebSocket opened to first remote video packet.
    pub join_time: Option<Duration>,
    pub keyframe_requests: u64,
    /// Set when the participant stopped because of an error.
    pub error: Option<String>,
}

/// `q` in 0..=1 of sorted values.
pub fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied()
}

/// CPU and memory of a process, read from `/proc/<pid>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    /// Peak resident set since the process started (VmHWM).
    pub peak_rss_kib: u64,
}

/// `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`, 100 on every Linux build a
/// server runs.
const TICKS_PER_SECOND: f64 = 100.0;

/// Reads `/proc/<pid>` (`"self"` for this process). `None` when the process is gone.
pub fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_seconds: ticks / TICKS_PER_SECOND,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// UDP datagrams the kernel dropped because a socket's receive buffer was full, and sends
/// refused for a full send buffer, in this network namespace (`/proc/net/snmp`). Counts both
/// the server's and the tool's sockets: the namespace holds nothing else.
pub fn udp_buffer_errors() -> Option<(u64, u64)> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some((get("RcvbufErrors")?, get("SndbufErrors")?))
}

/// Datagrams the kernel dropped on UDP sockets, split between the sockets `pid` holds open
/// (the server's) and all others in this network namespace (the tool's), from the `drops`
/// column of `/proc/net/udp` and `/proc/net/udp6`. Sockets closed in between lose their
/// counts, so take both samples while everyone is connected.
pub fn udp_drops_by_owner(pid: &str) -> Option<(u64, u64)> {
    let mut owned = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
        {
            owned.insert(inode.to_owned());
        }
    }
    let (mut server, mut others) = (0, 0);
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(inode), Some(drops)) = (f.get(9), f.last()) else {
                continue;
            };
            let drops: u64 = drops.parse().unwrap_or(0);
            if owned.contains(*inode) {
                server += drops;
            } else {
                others += drops;
            }
        }
    }
    Some((server, others))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_sorted_values() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(51));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn duplicates_are_counted_once() {
        let mut w = WindowStats::default();
        let t = Trailer {
            publisher: 1,
            kind: Kind::Audio,
            layer: None,
            seq: 5,
            sent_ns: 0,
        };
        w.record(&t, 100, Duration::from_micros(300));
        w.record(&t, 100, Duration::from_micros(300));
        let f = &w.flows[&(1, Kind::Audio, None)];
        assert_eq!((f.packets, f.duplicates), (1, 1));
        assert_eq!(w.delays_us, vec![300]);
    }

    #[test]
    fn simulcast_layers_are_separate_flows_with_their_own_sequence_numbers() {
        let mut w = WindowStats::default();
        for (layer, seqs) in [(0u8, &[10u32, 11, 13][..]), (2, &[10, 12][..])] {
            for &seq in seqs {
                let t = Trailer {
                    publisher: 4,
                    kind: Kind::Video,
                    layer: Some(layer),
                    seq,
                    sent_ns: 0,
                };
                w.record(&t, 1000, Duration::from_micros(100));
            }
        }
        let q = &w.flows[&(4, Kind::Video, Some(0))];
        let f = &w.flows[&(4, Kind::Video, Some(2))];
        assert_eq!((q.packets, q.duplicates, q.seq_span()), (3, 0, 4));
        assert_eq!((f.packets, f.duplicates, f.seq_span()), (2, 0, 3));
        assert_eq!(FlowStats::default().seq_span(), 0);
    }

    #[test]
    fn udp_drops_of_this_process_are_read() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let (mine, _) = udp_drops_by_owner("self").expect("/proc/net/udp exists on Linux");
        assert_eq!(mine, 0, "a fresh socket has dropped nothing");
        drop(socket);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample("self").expect("/proc/self exists on Linux");
        assert!(s.rss_kib > 0 && s.peak_rss_kib >= s.rss_kib);
    }
}
