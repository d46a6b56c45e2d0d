//! Simulcast layers and the choice, per subscriber, of which layer of each video to send.
//!
//! A publisher's camera arrives in up to three layers. For each subscriber the room runs an
//! [`Allocator`] every [`ALLOCATION_INTERVAL`]: it takes the subscriber's bandwidth estimate
//! (send-side, from transport-wide congestion control feedback), subtracts what audio needs,
//! and gives each video the best layer that fits both the remaining budget and the size at
//! which the subscriber shows that video. Videos shown larger are served first. When not
//! even the lowest layer of any shown video fits, video to the subscriber pauses and audio
//! carries on: the subscriber is audio-only until the estimate recovers.
//!
//! Going down happens at once, going up only when the budget has room to spare
//! ([`UPGRADE_HEADROOM`]) and not sooner than [`UPGRADE_HOLD`] after the last change, so a
//! noisy estimate does not make the picture flap between layers.

use std::time::{Duration, Instant};

use crate::forward::Want;

/// How often each subscriber's layers are chosen again.
pub const ALLOCATION_INTERVAL: Duration = Duration::from_millis(500);

/// The share of the estimate the allocator plans to use; the rest absorbs bursts such as
/// keyframes and retransmissions.
pub const ESTIMATE_SHARE: f64 = 0.9;

/// A higher layer (or leaving audio-only) needs this much more budget than its bitrate.
pub const UPGRADE_HEADROOM: f64 = 1.25;

/// The shortest time between two upgrades for one subscriber. Downgrades are never held.
pub const UPGRADE_HOLD: Duration = Duration::from_secs(2);

/// Loss reported by a subscriber at or above which the link counts as congested (and a
/// too-low estimate pauses video). Random loss below it, as on a busy Wi-Fi, is repaired by
/// retransmission and does not cost the picture.
pub const PAUSE_LOSS: f32 = 0.2;

/// An estimate below this share of its recent peak means the estimator saw congestion.
pub const CONGESTION_DROP: f64 = 0.75;

/// How far back the estimate's peak is remembered.
pub const PEAK_WINDOW: Duration = Duration::from_secs(5);

/// How far above the estimate a step up may take the sent rate. The estimator caps its
/// estimate at about 1.5 times what it saw sent and probes at up to twice that; a step
/// between the two can be learned, one far beyond would only flood the link.
pub const STEP_REACH: f64 = 1.75;

/// How long loss must go on at the lowest layer before video pauses. Loss reports arrive a
/// second or two late, so loss seen right after stepping down is the old layer's.
pub const LOSS_CONFIRM: Duration = Duration::from_secs(3);

/// The longest wait between two steps up.
pub const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// How long video stays paused for bandwidth before the lowest layer is tried again. While
/// only audio is sent the estimate cannot learn that the link grew, so video comes back by
/// trial, as a step up does.
pub const RESUME_HOLD: Duration = Duration::from_secs(4);

/// The longest wait between two tries; each try that ends in a pause again doubles the wait.
pub const MAX_RESUME_HOLD: Duration = Duration::from_secs(32);

/// A pause this soon after a try means the try failed.
const FAILED_RESUME: Duration = Duration::from_secs(10);

/// What one Opus stream is assumed to need, including RTP and SRTP overhead.
pub const AUDIO_BPS: u64 = 48_000;

/// A layer that sent nothing for this long is treated as gone (a publisher whose own uplink
/// is weak stops sending its upper layers).
pub const LAYER_IDLE: Duration = Duration::from_millis(1500);

/// What one subscriber's link carries, judged from loss (the way the loss-based half of
/// Google's congestion control does it): more than [`LOSS_DECREASE`] lost and the estimate
/// drops by half the loss (and to no more than what got through); under [`LOSS_INCREASE`]
/// and it grows by 8 % a
/// report, up to [`GROWTH_CAP`] times what was sent (so it never claims much more than it has
/// seen carried); in between it holds.
///
/// A queue building on the way counts too: a round-trip time [`QUEUE_DELAY`] above the
/// lowest seen means a router is holding packets rather than dropping them (a deep buffer),
/// and the estimate drops to 85 % of what was sent.
///
/// The starting value is a guess: until a report has shown a link carrying at least
/// 1 / [`GROWTH_CAP`] of it, clean reports bring it down to [`GROWTH_CAP`] times what was
/// carried, so a guess above what a weak link carries never lets the allocator jump layers.
///
/// Loss and round-trip time come from the subscriber's transport-wide congestion control
/// feedback (str0m matches each feedback to the packets it sent, by transport sequence
/// number): loss over the last second and the round trip of the latest packet reported.
#[derive(Debug, Clone)]
pub struct LossEstimate {
    estimate: u64,
    min_rtt: Option<Duration>,
    /// Whether the last report showed congestion (see [`LossEstimate::congested`]).
    congested: bool,
    /// Whether a report has backed the estimate: a loss or a queue set it, or a clean report
    /// showed the link carrying enough that the estimate is within reach of what it saw.
    proven: bool,
}

/// Round-trip time above the lowest seen that means a queue is building.
pub const QUEUE_DELAY: Duration = Duration::from_millis(100);

/// Loss above which the estimate goes down.
pub const LOSS_DECREASE: f32 = 0.10;
/// Loss below which the estimate goes up.
pub const LOSS_INCREASE: f32 = 0.02;
/// How far above what was sent the estimate may grow.
pub const GROWTH_CAP: f64 = 1.6;
/// Sending at least this share of the estimate while losing more than [`LOSS_INCREASE`]
/// counts as congestion.
pub const FULL_USE: f64 = 0.85;

impl LossEstimate {
    pub fn new(initial_bps: u64) -> Self {
        LossEstimate {
            estimate: initial_bps,
            min_rtt: None,
            congested: false,
            proven: false,
        }
    }

    pub fn bps(&self) -> u64 {
        self.estimate
    }

    /// Whether a report has backed the estimate (see [`LossEstimate`]); until then it is the
    /// starting guess or below it.
    pub fn proven(&self) -> bool {
        self.proven
    }

    /// Whether the last report showed congestion: it lowered the estimate (loss over
    /// [`LOSS_DECREASE`], or a queue), or packets were lost while more than the estimate was
    /// sent.
    pub fn congested(&self) -> bool {
        self.congested
    }

    /// Takes one report: what was sent toward the subscriber over the last interval, the
    /// fraction of it the subscriber reported lost, and the round-trip time when known.
    pub fn on_report(&mut self, sent_bps: u64, loss: f32, rtt: Option<Duration>) {
        if let Some(rtt) = rtt {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        let queueing = rtt
            .zip(self.min_rtt)
            .is_some_and(|(rtt, min)| rtt > min + QUEUE_DELAY);
        // Loss beyond the random kind while the estimate was (nearly) all used: the link is
        // full (a step up overfilled it, or the estimate sits just above what it carries, and
        // a drop-tail queue loses a few percent while its delay builds). The estimate holds,
        // but what is sent must come down below it.
        let overfull = loss >= LOSS_INCREASE && sent_bps as f64 >= self.estimate as f64 * FULL_USE;
        self.congested = queueing || loss > LOSS_DECREASE || overfull;
        if queueing {
            let kept = (self.estimate.min(sent_bps) as f64 * 0.85) as u64;
            self.estimate = kept.max(MIN_ESTIMATE);
            self.proven = true;
        } else if loss > LOSS_DECREASE {
            // Down by half the loss, and never above what got through: a link that dropped
            // a quarter of what was sent carries at most the rest.
            let kept = (self.estimate as f64 * (1.0 - 0.5 * f64::from(loss))) as u64;
            let delivered = (sent_bps as f64 * (1.0 - f64::from(loss))) as u64;
            self.estimate = kept.min(delivered).max(MIN_ESTIMATE);
            self.proven = true;
        } else if loss < LOSS_INCREASE {
            let grown = (self.estimate.max(sent_bps) as f64 * 1.08) as u64;
            let reach = (sent_bps as f64 * GROWTH_CAP) as u64;
            // A proven estimate is not lowered by a quiet moment (a still picture sends
            // little); the starting guess is, until what was carried reaches it.
            let ceiling = if self.proven {
                reach.max(self.estimate)
            } else {
                reach
            };
            self.estimate = grown.min(ceiling).max(MIN_ESTIMATE);
            self.proven |= reach >= self.estimate;
        }
    }
}

/// The estimate never goes below this: enough for audio and the lowest layer to be tried.
const MIN_ESTIMATE: u64 = 100_000;

/// One simulcast layer of a video. Tracks without simulcast have one layer, `High`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    Low,
    Medium,
    High,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Low, Layer::Medium, Layer::High];

    /// The layer a well-known rid names: `q`/`h`/`f` (quarter, half, full), `l`/`m`/`h`
    /// is ambiguous with the first and is not used; `0`/`1`/`2` lowest first.
    pub fn from_known_rid(rid: &str) -> Option<Layer> {
        match rid {
            "q" | "0" | "low" => Some(Layer::Low),
            "h" | "1" | "mid" | "medium" => Some(Layer::Medium),
            "f" | "2" | "high" | "full" => Some(Layer::High),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Low => "low",
            Layer::Medium => "medium",
            Layer::High => "high",
        }
    }
}

/// Assigns layers to the rids of one `a=simulcast:send` list: well-known names by their
/// meaning, any others in the order listed, lowest first (the order browsers are given
/// their encodings in).
pub fn layers_for_rids(rids: &[String]) -> Vec<(String, Layer)> {
    let mut out: Vec<(String, Layer)> = Vec::new();
    let mut free: Vec<Layer> = Layer::ALL.to_vec();
    for rid in rids {
        if let Some(l) = Layer::from_known_rid(rid) {
            if free.contains(&l) {
                free.retain(|f| *f != l);
                out.push((rid.clone(), l));
            }
        }
    }
    for rid in rids {
        if out.iter().any(|(r, _)| r == rid) {
            continue;
        }
        if free.is_empty() {
            break;
        }
        out.push((rid.clone(), free.remove(0)));
    }
    out
}

/// The bitrate of one incoming layer, measured over windows of about a second.
#[derive(Debug, Default, Clone)]
pub struct RateMeter {
    window_start: Option<Instant>,
    window_bytes: u64,
    bps: Option<u64>,
    last_packet: Option<Instant>,
}

const RATE_WINDOW: Duration = Duration::from_millis(1000);

impl RateMeter {
    pub fn on_packet(&mut self, now: Instant, bytes: usize) {
        self.last_packet = Some(now);
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            let bps = self.window_bytes * 8 * 1_000_000 / elapsed.as_micros().max(1) as u64;
            // Smooth over windows so one keyframe does not double a layer's rate.
            self.bps = Some(match self.bps {
                Some(old) => (old * 3 + bps) / 4,
                None => bps,
            });
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
        self.window_bytes += bytes as u64;
    }

    /// The layer's bitrate, or `None` while unmeasured or after it went idle.
    pub fn bitrate(&self, now: Instant) -> Option<u64> {
        let last = self.last_packet?;
        if now.saturating_duration_since(last) > LAYER_IDLE {
            return None;
        }
        Some(self.bps.unwrap_or_else(|| {
            // Before the first full window: what arrived so far, scaled to a second.
            let start = self.window_start.unwrap_or(last);
            let elapsed = last.saturating_duration_since(start).max(RATE_WINDOW / 4);
            self.window_bytes * 8 * 1_000_000 / elapsed.as_micros().max(1) as u64
        }))
    }
}

/// A layer a subscriber could be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerOption {
    pub layer: Layer,
    pub bps: u64,
    /// Width and height of the layer's pictures, when a keyframe told them.
    pub size: Option<(u32, u32)>,
}

/// One video the subscriber receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoNeed {
    /// The publisher's active layers, lowest first. Empty when nothing arrives.
    pub layers: Vec<LayerOption>,
    /// The size the subscriber shows the video at; `None` until told, `(0, 0)` when hidden.
    pub display: Option<(u32, u32)>,
}

/// Why a subscriber receives no video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AudioOnlyReason {
    /// The participant asked for audio only.
    Requested,
    /// Not even the lowest layer fits the bandwidth estimate.
    Bandwidth,
}

/// The outcome of one allocation round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// One entry per [`VideoNeed`], in the same order.
    pub wants: Vec<Want>,
    /// Set when the subscriber receives no video at all although some is shown.
    pub audio_only: Option<AudioOnlyReason>,
    /// The bitrate the allocation would like to send, for the estimator's probing.
    pub desired_bps: u64,
    /// The bitrate of what was allocated.
    pub allocated_bps: u64,
    /// The rate the next step up would need (with headroom), for the estimator to probe
    /// for; zero when no step is wanted.
    pub probe_bps: u64,
}

/// Per subscriber: the last decision, when it last went up, and the estimate's recent peak.
#[derive(Debug, Default)]
pub struct Allocator {
    last: Vec<Want>,
    last_upgrade: Option<Instant>,
    audio_only: Option<AudioOnlyReason>,
    /// The highest estimate of the last [`PEAK_WINDOW`], and when it was seen.
    peak: Option<(u64, Instant)>,
    /// The wait between upgrades; doubles each time an upgrade is followed by congestion.
    backoff: Option<Duration>,
    /// What the last round allocated, video and audio.
    last_allocated: u64,
    /// Since when every shown video has been at its lowest layer with the link losing.
    lowest_since: Option<Instant>,
    /// Whether the estimate's last report showed congestion (see [`Allocator::set_estimate`]).
    congested: bool,
    /// Whether the estimate is still the starting guess, backed by no report (see
    /// [`LossEstimate::proven`]).
    guess: bool,
    /// Since when video has been paused for bandwidth (or since the last failed try).
    paused_since: Option<Instant>,
    /// The wait before the next try of video after a pause; `None` is [`RESUME_HOLD`].
    resume_hold: Option<Duration>,
    /// When video was last tried again after a pause.
    resumed_at: Option<Instant>,
}

impl Allocator {
    /// Tells the allocator what the estimator knows beyond the figure: whether its last
    /// report showed congestion (see [`LossEstimate::congested`]; layers go down to what the
    /// budget covers, though this is not a reason to pause video), and whether the figure is
    /// backed by a report yet (see [`LossEstimate::proven`]; the starting guess is no peak to
    /// fall from).
    pub fn set_estimate(&mut self, congested: bool, proven: bool) {
        self.congested = congested;
        self.guess = !proven;
    }

    /// Chooses a layer for each video.
    ///
    /// `estimate_bps` is `None` while no estimate exists; then only the display sizes limit
    /// what is sent. `losing` says the subscriber reports loss of [`PAUSE_LOSS`] or more.
    /// `audio_bps` is what the subscriber's audio takes; it comes off the budget first.
    ///
    /// An estimator learns what a link carries only from what is sent, and lags behind what
    /// it could carry, so the estimate alone would hold a subscriber at a low layer forever.
    /// The allocator therefore reads *congestion* (loss, or an estimate that fell well below
    /// its recent peak, which is how the estimator answers growing delay) rather than the
    /// estimate's size:
    ///
    /// - congested: every video drops to the best layer the budget covers, at once; if not
    ///   even the lowest layer fits and the link is losing packets, video pauses
    ///   (audio-only);
    /// - not congested: nothing goes down, and one video steps up one layer every
    ///   [`UPGRADE_HOLD`] (or at once, several steps, where the budget already covers it
    ///   with [`UPGRADE_HEADROOM`]). A step followed by congestion within [`UPGRADE_HOLD`]
    ///   doubles the wait before the next one, up to [`MAX_BACKOFF`].
    pub fn allocate(
        &mut self,
        now: Instant,
        estimate_bps: Option<u64>,
        losing: bool,
        audio_bps: u64,
        requested_audio_only: bool,
        needs: &[VideoNeed],
    ) -> Allocation {
        if requested_audio_only {
            self.last = vec![Want::Paused; needs.len()];
            self.audio_only = Some(AudioOnlyReason::Requested);
            return Allocation {
                wants: self.last.clone(),
                audio_only: self.audio_only,
                desired_bps: 0,
                allocated_bps: 0,
                probe_bps: 0,
            };
        }
        if self.last.len() != needs.len() {
            self.last.resize(needs.len(), Want::Paused);
        }
        if self.audio_only == Some(AudioOnlyReason::Requested) {
            self.audio_only = None;
        }

        if self.guess {
            self.peak = None;
        } else if let Some(e) = estimate_bps {
            let stale = self
                .peak
                .is_none_or(|(p, at)| e >= p || now.saturating_duration_since(at) > PEAK_WINDOW);
            if stale {
                self.peak = Some((e, now));
            }
        }
        let congested = estimate_bps.is_some()
            && (losing
                || self.congested
                || estimate_bps
                    .zip(self.peak)
                    .is_some_and(|(e, (p, _))| (e as f64) < p as f64 * CONGESTION_DROP));
        let hold = self.backoff.unwrap_or(UPGRADE_HOLD);
        let since_upgrade = self.last_upgrade.map(|t| now.saturating_duration_since(t));
        let may_step = !congested && since_upgrade.is_none_or(|d| d >= hold);
        let mut stepped = false;

        let audio = audio_bps;
        let mut budget =
            estimate_bps.map(|e| ((e as f64 * ESTIMATE_SHARE) as u64).saturating_sub(audio));
        let staying_audio_only = self.audio_only == Some(AudioOnlyReason::Bandwidth);
        // Paused long enough with a clean link: the lowest layer of one video is tried again.
        let mut resume_trial = staying_audio_only
            && !losing
            && !self.congested
            && self.paused_since.is_some_and(|t| {
                now.saturating_duration_since(t) >= self.resume_hold.unwrap_or(RESUME_HOLD)
            });
        let mut tried = false;
        let on_trial = self
            .resumed_at
            .is_some_and(|t| now.saturating_duration_since(t) < FAILED_RESUME);

        // Larger shown videos first; unknown sizes count as large.
        let mut order: Vec<usize> = (0..needs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(display_area(needs[i].display)));

        let mut wants = vec![Want::Paused; needs.len()];
        let mut shown = 0;
        let mut starved = 0;
        let mut desired = 0;
        let mut allocated = 0;
        let mut upgraded = false;
        let mut downgraded = false;
        let mut next_step: Option<u64> = None;
        for i in order {
            let need = &needs[i];
            if need.display == Some((0, 0)) || need.layers.is_empty() {
                continue;
            }
            shown += 1;
            // Until a report backs the estimate, the lowest layer only. Starting low keeps a
            // weak link's queue empty while the first feedback arrives, so its round trip is
            // learnt unloaded and a queue built later shows (a link flooded from the start
            // has a standing queue, and its round trip never rises again); and layers
            // measured in a publisher's first seconds are still climbing and look cheap.
            let cap = match need.layers.first() {
                Some(lowest) if self.guess => lowest.layer,
                _ => size_cap(need),
            };
            let under_cap: Vec<&LayerOption> =
                need.layers.iter().filter(|l| l.layer <= cap).collect();
            let Some(lowest) = under_cap.first().copied().or(need.layers.first()) else {
                continue;
            };
            desired += under_cap.last().map_or(lowest.bps, |l| l.bps);
            let previous = match self.last[i] {
                Want::Layer(l) => need.layers.iter().find(|o| o.layer == l.min(cap)),
                Want::Paused => None,
            };

            // What the budget covers: staying needs the bitrate, going up needs headroom.
            let covered = |l: &LayerOption| -> bool {
                let Some(b) = budget else { return true };
                let up = previous.is_none_or(|p| l.layer > p.layer);
                let factor = if up { UPGRADE_HEADROOM } else { 1.0 };
                (l.bps as f64 * factor) as u64 <= b
            };
            let by_budget = under_cap.iter().rev().copied().find(|l| covered(l));

            let choice = match (previous, by_budget) {
                // Audio-only stays until the budget covers the lowest layer with headroom.
                (None, None) if staying_audio_only && resume_trial => {
                    resume_trial = false;
                    tried = true;
                    Some(lowest)
                }
                (None, _) if staying_audio_only => by_budget,
                // Nothing fits: with loss, pause; without, the lowest layer.
                // Nothing fits and packets are lost: the lowest layer first, and a pause only
                // if the loss goes on there (a link that suddenly shrank usually still carries
                // the lowest layer, while its estimate has collapsed for a while).
                // A try of video after a pause that brings loss back ends at once: the pause
                // before it already showed the link cannot carry the lowest layer, and audio
                // must not suffer for the try longer than the loss takes to be reported.
                (Some(_), None) if losing && on_trial => None,
                (Some(p), None) if losing && p.layer > lowest.layer => Some(lowest),
                (Some(_), None)
                    if losing
                        && self
                            .lowest_since
                            .is_none_or(|t| now.saturating_duration_since(t) < LOSS_CONFIRM) =>
                {
                    Some(lowest)
                }
                (_, None) if losing => None,
                (_, None) => Some(lowest),
                (Some(p), Some(b)) if b.layer < p.layer && !congested => Some(p),
                // Congested: down to what the budget covers, never up.
                (Some(p), Some(b)) if b.layer > p.layer && congested => Some(p),
                (Some(p), Some(b)) if b.layer <= p.layer => Some(b),
                // Covered by the budget, but too soon after the last step: stay. (Only the base
                // hold applies here; the backoff is for steps beyond the budget.)
                (Some(p), Some(_)) if since_upgrade.is_some_and(|d| d < UPGRADE_HOLD) => Some(p),
                (_, Some(b)) => Some(b),
            };
            // Not congested and the budget does not reach higher: one step on trial.
            let choice = match choice {
                Some(c) if may_step && !stepped && previous.is_some_and(|p| p.layer == c.layer) => {
                    // A step may overshoot the estimate at most as far as the estimator's own
                    // probes do (twice it): a layer far beyond it would only flood the link.
                    let within_reach = |next: &LayerOption| {
                        estimate_bps.is_none_or(|e| {
                            let total = self.last_allocated + next.bps.saturating_sub(c.bps);
                            total as f64 <= e as f64 * STEP_REACH
                        })
                    };
                    match under_cap.iter().copied().find(|l| l.layer > c.layer) {
                        Some(next) if within_reach(next) => {
                            stepped = true;
                            Some(next)
                        }
                        _ => Some(c),
                    }
                }
                other => other,
            };

            match choice {
                Some(l) => {
                    wants[i] = Want::Layer(l.layer);
                    if let Some(b) = budget.as_mut() {
                        *b = b.saturating_sub(l.bps);
                    }
                    allocated += l.bps;
                    match previous {
                        None => upgraded = true,
                        Some(p) if l.layer > p.layer => upgraded = true,
                        Some(p) if l.layer < p.layer => downgraded = true,
                        _ => {}
                    }
                }
                None => {
                    starved += 1;
                    downgraded |= previous.is_some();
                }
            }
            // The first video below its cap names the next step, which padding makes room
            // for so the estimator can see whether the link carries it.
            if next_step.is_none() {
                let current = wants[i];
                let next = under_cap.iter().find(|l| match current {
                    Want::Layer(c) => l.layer > c,
                    Want::Paused => true,
                });
                if let Some(next) = next {
                    let sent = match current {
                        Want::Layer(c) => need
                            .layers
                            .iter()
                            .find(|l| l.layer == c)
                            .map_or(0, |l| l.bps),
                        Want::Paused => 0,
                    };
                    next_step = Some(next.bps.saturating_sub(sent));
                }
            }
        }

        if downgraded && congested && since_upgrade.is_some_and(|d| d < hold * 2) {
            // The last step up did not hold: wait twice as long before the next.
            self.backoff = Some(hold.saturating_mul(2).min(MAX_BACKOFF));
        } else if since_upgrade.is_some_and(|d| d >= hold * 2) && !congested {
            self.backoff = None;
        }
        if upgraded && estimate_bps.is_some() {
            self.last_upgrade = Some(now);
        }
        self.last_allocated = allocated + audio;
        let all_lowest = needs.iter().zip(&wants).all(|(need, want)| {
            need.display == Some((0, 0))
                || need.layers.is_empty()
                || matches!(want, Want::Layer(l) if Some(*l) == need.layers.first().map(|o| o.layer))
        });
        // A video without layers is always at its lowest: what counts is how long it has
        // been losing there, not how long it has been there (one burst of loss, as when a
        // client's address changes, must not pause it).
        if !all_lowest || !losing {
            self.lowest_since = None;
        } else if self.lowest_since.is_none() {
            self.lowest_since = Some(now);
        }

        let audio_only = (shown > 0 && starved == shown).then_some(AudioOnlyReason::Bandwidth);
        if audio_only.is_some() && !staying_audio_only {
            // Paused now. If the last try of video is what just failed, wait twice as long.
            let failed = self
                .resumed_at
                .is_some_and(|t| now.saturating_duration_since(t) < FAILED_RESUME);
            self.resume_hold = failed.then(|| {
                self.resume_hold
                    .unwrap_or(RESUME_HOLD)
                    .saturating_mul(2)
                    .min(MAX_RESUME_HOLD)
            });
            self.paused_since = Some(now);
        } else if audio_only.is_none() {
            self.paused_since = None;
        }
        if tried {
            self.resumed_at = Some(now);
        }
        self.last = wants.clone();
        self.audio_only = audio_only;
        let desired_bps =
            ((desired as f64 * UPGRADE_HEADROOM + audio as f64) / ESTIMATE_SHARE) as u64;
        let probe_bps = next_step.map_or(0, |step| {
            (((allocated + step) as f64 * UPGRADE_HEADROOM + audio as f64) / ESTIMATE_SHARE) as u64
        });
        Allocation {
            wants,
            audio_only,
            desired_bps,
            allocated_bps: allocated + audio,
            probe_bps,
        }
    }
}

fn display_area(display: Option<(u32, u32)>) -> u64 {
    match display {
        None => u64::MAX,
        Some((w, h)) => w as u64 * h as u64,
    }
}

/// The highest layer worth sending for the size the video is shown at: the smallest layer
/// at least as large as the display (within a tenth), or the top one.
fn size_cap(need: &VideoNeed) -> Layer {
    let top = need.layers.last().map(|l| l.layer).unwrap_or(Layer::High);
    let Some((dw, dh)) = need.display else {
        return top;
    };
    for l in &need.layers {
        let (w, h) = match l.size {
            Some(s) => s,
            // Unknown picture size: assume the usual ladder under a 1280x720 top layer.
            None => match l.layer {
                Layer::Low => (320, 180),
                Layer::Medium => (640, 360),
                Layer::High => (1280, 720),
            },
        };
        if w * 10 >= dw * 9 && h * 10 >= dh * 9 {
            return l.layer;
        }
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder() -> Vec<LayerOption> {
        vec![
            LayerOption {
                layer: Layer::Low,
                bps: 150_000,
                size: Some((320, 180)),
            },
            LayerOption {
                layer: Layer::Medium,
                bps: 500_000,
                size: Some((640, 360)),
            },
            LayerOption {
                layer: Layer::High,
                bps: 1_500_000,
                size: Some((1280, 720)),
            },
        ]
    }

    fn need(display: Option<(u32, u32)>) -> VideoNeed {
        VideoNeed {
            layers: ladder(),
            display,
        }
    }

    #[test]
    fn rids_map_to_layers_by_name_then_by_order() {
        let rids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            layers_for_rids(&rids(&["f", "q", "h"])),
            vec![
                ("f".to_string(), Layer::High),
                ("q".to_string(), Layer::Low),
                ("h".to_string(), Layer::Medium)
            ]
        );
        assert_eq!(
            layers_for_rids(&rids(&["a", "b"])),
            vec![
                ("a".to_string(), Layer::Low),
                ("b".to_string(), Layer::Medium)
            ]
        );
    }

    #[test]
    fn plenty_of_bandwidth_gives_the_top_layer_unless_shown_small() {
        let t = Instant::now();
        let mut a = Allocator::default();
        let out = a.allocate(
            t,
            Some(10_000_000),
            false,
            AUDIO_BPS,
            false,
            &[need(None), need(Some((300, 170)))],
        );
        assert_eq!(
            out.wants,
            vec![Want::Layer(Layer::High), Want::Layer(Layer::Low)]
        );
        assert_eq!(out.audio_only, None);
        // A video shown at 0x0 (hidden) is not sent at all, and is not audio-only.
        let out = a.allocate(
            t,
            Some(10_000_000),
            true,
            AUDIO_BPS,
            false,
            &[need(Some((0, 0)))],
        );
        assert_eq!(out.wants, vec![Want::Paused]);
        assert_eq!(out.audio_only, None);
    }

    #[test]
    fn a_cap_below_the_top_layer_gives_a_lower_one_and_larger_videos_first() {
        let t = Instant::now();
        let mut a = Allocator::default();
        // 900 kbit/s: after audio, room for one medium (500) and one low (150).
        let out = a.allocate(
            t,
            Some(900_000),
            true,
            2,
            false,
            &[need(Some((320, 180))), need(Some((1280, 720)))],
        );
        assert_eq!(
            out.wants,
            vec![Want::Layer(Layer::Low), Want::Layer(Layer::Medium)]
        );
    }

    #[test]
    fn too_little_for_the_lowest_layer_means_audio_only_and_it_comes_back_with_headroom() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut a = Allocator::default();
        let out = a.allocate(s(0), Some(150_000), true, AUDIO_BPS, false, &[need(None)]);
        assert_eq!(out.wants, vec![Want::Paused]);
        assert_eq!(out.audio_only, Some(AudioOnlyReason::Bandwidth));
        assert!(out.desired_bps > 1_500_000, "probes for the top layer");

        // Just enough for the low layer, but not with headroom: still audio-only.
        let out = a.allocate(s(1), Some(260_000), false, AUDIO_BPS, false, &[need(None)]);
        assert_eq!(out.audio_only, Some(AudioOnlyReason::Bandwidth));
        // With headroom, video returns at the low layer.
        let out = a.allocate(s(3), Some(300_000), false, AUDIO_BPS, false, &[need(None)]);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
        assert_eq!(out.audio_only, None);
    }

    #[test]
    fn paused_video_is_tried_again_on_a_clean_link_and_a_failed_try_waits_longer() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = Allocator::default();
        let n = [need(None)];
        let paused = Some(AudioOnlyReason::Bandwidth);
        let low = vec![Want::Layer(Layer::Low)];
        // The lowest layer, then loss there for LOSS_CONFIRM: paused.
        assert_eq!(
            a.allocate(ms(0), Some(100_000), false, AUDIO_BPS, false, &n)
                .wants,
            low
        );
        assert_eq!(
            a.allocate(ms(500), Some(100_000), true, AUDIO_BPS, false, &n)
                .wants,
            low
        );
        let out = a.allocate(ms(3500), Some(100_000), true, AUDIO_BPS, false, &n);
        assert_eq!(out.audio_only, paused);
        // The loss stops (only audio is sent), but the estimate, which learns from what is
        // sent, stays far below the lowest layer: no try before RESUME_HOLD.
        let out = a.allocate(ms(5500), Some(100_000), false, AUDIO_BPS, false, &n);
        assert_eq!(out.audio_only, paused);
        // RESUME_HOLD after the pause, on a clean link: the lowest layer, on trial.
        let out = a.allocate(ms(7500), Some(100_000), false, AUDIO_BPS, false, &n);
        assert_eq!(out.wants, low);
        assert_eq!(out.audio_only, None);
        // It holds while the link carries it (no loss), even with a low estimate.
        assert_eq!(
            a.allocate(ms(8000), Some(110_000), false, AUDIO_BPS, false, &n)
                .wants,
            low
        );
        // The link still cannot carry it: the first loss report ends the try (no
        // LOSS_CONFIRM this time; the audio has suffered enough).
        let out = a.allocate(ms(8500), Some(100_000), true, AUDIO_BPS, false, &n);
        assert_eq!(out.audio_only, paused);
        // The failed try doubles the wait: nothing at RESUME_HOLD, a try at twice it.
        let out = a.allocate(ms(8500 + 4_500), Some(100_000), false, AUDIO_BPS, false, &n);
        assert_eq!(out.audio_only, paused);
        let out = a.allocate(ms(8500 + 8_000), Some(100_000), false, AUDIO_BPS, false, &n);
        assert_eq!(out.wants, low);
        // Never while the link is still losing.
        let mut b = Allocator::default();
        b.allocate(ms(0), Some(100_000), true, AUDIO_BPS, false, &n);
        let out = b.allocate(ms(30_000), Some(100_000), true, AUDIO_BPS, false, &n);
        assert_eq!(out.audio_only, paused);
    }

    #[test]
    fn downgrades_are_immediate_upgrades_wait_for_the_hold() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = Allocator::default();
        let n = [need(None)];
        assert_eq!(
            a.allocate(ms(0), Some(5_000_000), false, AUDIO_BPS, false, &n)
                .wants,
            vec![Want::Layer(Layer::High)]
        );
        assert_eq!(
            a.allocate(ms(500), Some(800_000), false, AUDIO_BPS, false, &n)
                .wants,
            vec![Want::Layer(Layer::Medium)]
        );
        // The estimate recovers at once, but the upgrade waits for the hold.
        assert_eq!(
            a.allocate(ms(1000), Some(5_000_000), false, AUDIO_BPS, false, &n)
                .wants,
            vec![Want::Layer(Layer::Medium)]
        );
        // Once the hold has passed, the budget covers the top layer again.
        assert_eq!(
            a.allocate(ms(2000), Some(5_000_000), false, AUDIO_BPS, false, &n)
                .wants,
            vec![Want::Layer(Layer::High)]
        );
    }

    #[test]
    fn a_low_estimate_without_loss_gives_the_lowest_layer_not_a_pause() {
        let t0 = Instant::now();
        let mut a = Allocator::default();
        let out = a.allocate(t0, Some(150_000), false, AUDIO_BPS, false, &[need(None)]);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
        assert_eq!(out.audio_only, None);
        // Loss there: one report of it is a burst (an address change, a moment of
        // interference), not yet a reason to pause, however long the video was at its lowest.
        let later = t0 + LOSS_CONFIRM;
        let out = a.allocate(later, Some(150_000), true, AUDIO_BPS, false, &[need(None)]);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
        // With loss going on at the lowest layer for LOSS_CONFIRM, it pauses.
        let out = a.allocate(
            later + LOSS_CONFIRM,
            Some(150_000),
            true,
            AUDIO_BPS,
            false,
            &[need(None)],
        );
        assert_eq!(out.wants, vec![Want::Paused]);
        assert_eq!(out.audio_only, Some(AudioOnlyReason::Bandwidth));
    }

    #[test]
    fn without_congestion_layers_step_up_on_trial_and_a_failed_step_backs_off() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = Allocator::default();
        let n = [need(None)];
        let mut at = |t, est, losing| {
            a.allocate(ms(t), Some(est), losing, AUDIO_BPS, false, &n)
                .wants
        };
        // 400 kbit/s: the low layer (150) fits the budget, medium (500) does not.
        assert_eq!(at(0, 400_000, false), vec![Want::Layer(Layer::Low)]);
        assert_eq!(at(1_000, 400_000, false), vec![Want::Layer(Layer::Low)]);
        // No congestion after the hold: one step up, although the estimate lags behind (the
        // step stays within one and a half times the estimate).
        assert_eq!(at(2_000, 400_000, false), vec![Want::Layer(Layer::Medium)]);
        // Kept while nothing says the link is congested.
        assert_eq!(at(3_000, 420_000, false), vec![Want::Layer(Layer::Medium)]);
        // Loss: back to what the budget covers at once, and the next step waits 4 s.
        assert_eq!(at(4_000, 400_000, true), vec![Want::Layer(Layer::Low)]);
        assert_eq!(at(5_000, 400_000, false), vec![Want::Layer(Layer::Low)]);
        assert_eq!(at(6_000, 400_000, false), vec![Want::Layer(Layer::Medium)]);
        // An estimate falling well below its recent peak is congestion too.
        assert_eq!(at(6_500, 200_000, false), vec![Want::Layer(Layer::Low)]);
    }

    #[test]
    fn a_link_that_shrinks_goes_to_the_lowest_layer_before_pausing() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = Allocator::default();
        let n = [need(None)];
        let mut at = |t, est, losing| a.allocate(ms(t), Some(est), losing, AUDIO_BPS, false, &n);
        assert_eq!(
            at(0, 5_000_000, false).wants,
            vec![Want::Layer(Layer::High)]
        );
        // Heavy loss and a collapsed estimate: the lowest layer, still video.
        let out = at(500, 100_000, true);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
        assert_eq!(out.audio_only, None);
        // Loss reported right after the step down is the old layer's: still video.
        let out = at(1_000, 100_000, true);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
        // The loss goes on at the lowest layer for three seconds: now audio-only.
        let out = at(3_500, 100_000, true);
        assert_eq!(out.wants, vec![Want::Paused]);
        assert_eq!(out.audio_only, Some(AudioOnlyReason::Bandwidth));
    }

    #[test]
    fn loss_estimate_falls_with_loss_and_grows_only_near_what_was_carried() {
        let mut e = LossEstimate::new(1_000_000);
        // Sending 1.5 Mbit/s into a smaller link: half lost, down by a quarter.
        e.on_report(1_500_000, 0.50, None);
        assert_eq!(e.bps(), 750_000);
        // Clean reports while sending 500 kbit/s: up 8 % a report, no further than 1.6 times
        // what was sent.
        e.on_report(500_000, 0.0, None);
        assert_eq!(e.bps(), 800_000, "capped at 1.6 times what was carried");
        e.on_report(500_000, 0.0, None);
        assert_eq!(e.bps(), 800_000);
        // Moderate loss holds.
        e.on_report(500_000, 0.05, None);
        assert_eq!(e.bps(), 800_000);
        // Sending more and it is carried: grows with it.
        e.on_report(1_000_000, 0.0, None);
        assert_eq!(e.bps(), 1_080_000);
        // A quarter lost while sending 1.2 Mbit/s: not above the 900 kbit/s that got through
        // (half the loss off the estimate alone would have kept 945 kbit/s).
        e.on_report(1_200_000, 0.25, None);
        assert_eq!(e.bps(), 900_000);
        // Heavy loss while sending a little: never below the floor.
        e.on_report(150_000, 0.9, None);
        assert_eq!(e.bps(), 100_000);

        // A queue building without loss: the round trip rises 100 ms over its lowest.
        let ms = Duration::from_millis;
        let mut q = LossEstimate::new(1_000_000);
        q.on_report(600_000, 0.0, Some(ms(20)));
        assert_eq!(q.bps(), 960_000);
        q.on_report(600_000, 0.0, Some(ms(90)));
        assert_eq!(
            q.bps(),
            960_000,
            "a rise under the threshold is not a queue"
        );
        assert!(!q.congested());
        q.on_report(600_000, 0.0, Some(ms(180)));
        assert_eq!(q.bps(), 510_000, "85 % of what was sent");
        assert!(q.congested());
    }

    #[test]
    fn the_starting_guess_comes_down_to_what_the_link_was_seen_to_carry() {
        let mut e = LossEstimate::new(1_000_000);
        assert!(!e.proven());
        // The first clean report while little is sent: the guess is not kept above 1.6
        // times what was carried, so it cannot let the allocator jump two layers at once.
        e.on_report(300_000, 0.0, None);
        assert_eq!(e.bps(), 480_000);
        assert!(e.proven());
        // Once backed, a quiet moment (a still picture) does not lower it.
        e.on_report(100_000, 0.0, None);
        assert_eq!(e.bps(), 480_000);
        // A guess already below what was carried grows as before, and is backed at once.
        let mut low = LossEstimate::new(200_000);
        low.on_report(300_000, 0.0, None);
        assert_eq!(low.bps(), 324_000);
        assert!(low.proven());
    }

    #[test]
    fn the_starting_guess_is_no_peak_to_fall_from() {
        let now = Instant::now();
        let need = |bps: [u64; 3]| VideoNeed {
            layers: Layer::ALL
                .iter()
                .zip(bps)
                .map(|(&layer, bps)| LayerOption {
                    layer,
                    bps,
                    size: None,
                })
                .collect(),
            display: None,
        };
        let needs = [need([150_000, 300_000, 600_000])];
        let mut a = Allocator::default();
        // The guess would cover the top layer; until a report backs it, the lowest only.
        a.set_estimate(false, false);
        let out = a.allocate(now, Some(1_000_000), false, AUDIO_BPS, false, &needs);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
        // The first report brings the guess down to 560 kbit/s: backed now, and not a fall
        // (a fall would be congestion, and nothing goes up while congested); the budget
        // covers the middle layer with headroom, so the video goes up to it at once.
        a.set_estimate(false, true);
        let out = a.allocate(
            now + Duration::from_secs(3),
            Some(560_000),
            false,
            AUDIO_BPS,
            false,
            &needs,
        );
        assert_eq!(out.wants, vec![Want::Layer(Layer::Medium)]);
        // A real fall from there is congestion: down to what the budget covers.
        let out = a.allocate(
            now + Duration::from_secs(4),
            Some(300_000),
            false,
            AUDIO_BPS,
            false,
            &needs,
        );
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
    }

    #[test]
    fn loss_while_sending_beyond_the_estimate_is_congestion() {
        let mut e = LossEstimate::new(500_000);
        // 5 % lost while sending well below the estimate: random loss, the estimate holds.
        e.on_report(400_000, 0.05, None);
        assert_eq!(e.bps(), 500_000);
        assert!(!e.congested());
        // The same loss while sending more than the estimate: a step up overfilled the link.
        e.on_report(620_000, 0.05, None);
        assert_eq!(e.bps(), 500_000, "the estimate holds");
        assert!(e.congested(), "but the layers must come down to it");
        // Or sending nearly all of it: the estimate sits just above what the link carries.
        e.on_report(450_000, 0.04, None);
        assert!(
            e.congested(),
            "a full link losing a few percent is congested"
        );
        // Sending beyond the estimate with no loss is a probe that worked.
        e.on_report(620_000, 0.0, None);
        assert!(!e.congested());
        assert!(e.bps() > 500_000);
    }

    #[test]
    fn a_falling_estimate_brings_layers_down_without_pausing() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut a = Allocator::default();
        let n = [need(None)];
        assert_eq!(
            a.allocate(ms(0), Some(5_000_000), false, AUDIO_BPS, false, &n)
                .wants,
            vec![Want::Layer(Layer::High)]
        );
        // 4.5 Mbit/s is within the peak's 75 %: not congested, nothing goes down.
        assert_eq!(
            a.allocate(ms(500), Some(4_500_000), false, AUDIO_BPS, false, &n)
                .wants,
            vec![Want::Layer(Layer::High)]
        );
        // The estimate's last report lowered it (loss over 10 %): down to what fits.
        a.set_estimate(true, true);
        let out = a.allocate(ms(1000), Some(800_000), false, AUDIO_BPS, false, &n);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Medium)]);
        // Falling alone never pauses: the lowest layer at worst.
        let out = a.allocate(ms(5000), Some(100_000), false, AUDIO_BPS, false, &n);
        assert_eq!(out.wants, vec![Want::Layer(Layer::Low)]);
        assert_eq!(out.audio_only, None);
    }

    #[test]
    fn requested_audio_only_pauses_everything() {
        let mut a = Allocator::default();
        let out = a.allocate(
            Instant::now(),
            None,
            false,
            1,
            true,
            &[need(None), need(None)],
        );
        assert_eq!(out.wants, vec![Want::Paused, Want::Paused]);
        assert_eq!(out.audio_only, Some(AudioOnlyReason::Requested));
    }

    #[test]
    fn without_an_estimate_only_the_display_limits() {
        let mut a = Allocator::default();
        let out = a.allocate(
            Instant::now(),
            None,
            false,
            AUDIO_BPS,
            false,
            &[need(Some((640, 360)))],
        );
        assert_eq!(out.wants, vec![Want::Layer(Layer::Medium)]);
    }

    #[test]
    fn rate_meter_measures_and_forgets_idle_layers() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        // 100 packets of 1250 bytes a second = 1 Mbit/s.
        for i in 0..=300u64 {
            m.on_packet(t0 + Duration::from_millis(i * 10), 1250);
        }
        let bps = m.bitrate(t0 + Duration::from_secs(3)).expect("measured");
        assert!((900_000..1_100_000).contains(&bps), "{bps}");
        assert_eq!(m.bitrate(t0 + Duration::from_secs(5)), None);
    }
}
