//! Spreads the video forwarded to one subscriber over time, so that a burst (a keyframe after
//! a layer switch is several times a second's worth of the layer's ordinary frames) does not
//! overflow the queue of a small link and lose the very packets the subscriber waits for.
//!
//! A token bucket: bytes may go while the bucket holds tokens, which refill at the pacing
//! rate up to [`BURST`] worth of it; a packet that finds the bucket empty (or others already
//! waiting) waits in order. Audio never waits: it is small, steady and late audio is useless,
//! so it only takes its tokens. Nothing waits longer than [`MAX_QUEUE`]: past that the queue
//! is released at once, as if there were no pacer, and the layer choice (told through
//! [`Pacer::delay`]) must bring the rate down. Nothing is dropped: every packet was given its
//! sequence number when it was forwarded, and a gap would only be asked for again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How much of the pacing rate may leave at once.
pub const BURST: Duration = Duration::from_millis(40);

/// The longest a packet waits; past it the queue is released at once. Long enough for the
/// keyframe of a layer that suits the link (a tenth of a second to a few tenths at its rate),
/// short enough that a rate the layer choice could not lower never holds video for long.
pub const MAX_QUEUE: Duration = Duration::from_millis(1000);

/// The bucket never holds less than this, so one full-size packet can always leave.
const MIN_BURST_BYTES: f64 = 2_400.0;

#[derive(Debug)]
struct Waiting<T> {
    since: Instant,
    bytes: usize,
    item: T,
}

/// One subscriber's pacer; `T` is what waits (a packet and where it goes).
#[derive(Debug)]
pub struct Pacer<T> {
    /// Bytes per second, or `None` while no rate is known (then nothing waits).
    rate: Option<f64>,
    tokens: f64,
    refilled: Option<Instant>,
    queue: VecDeque<Waiting<T>>,
}

impl<T> Default for Pacer<T> {
    fn default() -> Self {
        Pacer {
            rate: None,
            tokens: 0.0,
            refilled: None,
            queue: VecDeque::new(),
        }
    }
}

impl<T> Pacer<T> {
    /// Sets the pacing rate; `None` stops pacing (what waits is released at the next
    /// [`Pacer::release`]).
    pub fn set_rate(&mut self, now: Instant, bps: Option<u64>) {
        self.refill(now);
        let first = self.rate.is_none();
        self.rate = bps.map(|b| (b as f64 / 8.0).max(1.0));
        // A bucket that starts pacing starts full; a new rate keeps what it holds.
        self.tokens = if first {
            self.capacity()
        } else {
            self.tokens.min(self.capacity())
        };
    }

    /// Offers a packet that may wait: returns it when it may go now, or keeps it.
    pub fn offer(&mut self, now: Instant, bytes: usize, item: T) -> Option<T> {
        self.refill(now);
        if self.rate.is_none() || (self.queue.is_empty() && self.tokens > 0.0) {
            self.tokens -= bytes as f64;
            return Some(item);
        }
        self.queue.push_back(Waiting {
            since: now,
            bytes,
            item,
        });
        None
    }

    /// Counts a packet that never waits (audio).
    pub fn pass(&mut self, now: Instant, bytes: usize) {
        self.refill(now);
        if self.rate.is_some() {
            self.tokens -= bytes as f64;
        }
    }

    /// Takes what may go now, in the order it came, into `out`.
    pub fn release(&mut self, now: Instant, out: &mut Vec<T>) {
        self.refill(now);
        let overdue = self
            .queue
            .front()
            .is_some_and(|w| now.saturating_duration_since(w.since) >= MAX_QUEUE);
        while let Some(w) = self.queue.front() {
            if self.rate.is_some() && !overdue && self.tokens <= 0.0 {
                break;
            }
            self.tokens -= w.bytes as f64;
            if let Some(w) = self.queue.pop_front() {
                out.push(w.item);
            }
        }
        if overdue {
            // Whatever the bucket owes after a forced release is forgiven: the queue was
            // already late, and holding the next packets for it would only add to that.
            self.tokens = self.tokens.max(0.0);
        }
    }

    /// When [`Pacer::release`] will next have something to take, if anything waits.
    pub fn next_release(&self) -> Option<Instant> {
        let first = self.queue.front()?;
        let overdue = first.since + MAX_QUEUE;
        let (Some(rate), Some(at)) = (self.rate, self.refilled) else {
            return Some(first.since);
        };
        if self.tokens > 0.0 {
            return Some(at);
        }
        // Just past the moment the bucket is above zero again.
        let wait = Duration::from_secs_f64((-self.tokens + 1.0) / rate);
        Some((at + wait).min(overdue))
    }

    /// How long the oldest waiting packet has waited.
    pub fn delay(&self, now: Instant) -> Duration {
        self.queue
            .front()
            .map_or(Duration::ZERO, |w| now.saturating_duration_since(w.since))
    }

    /// How many packets wait.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    fn capacity(&self) -> f64 {
        self.rate
            .map_or(0.0, |r| (r * BURST.as_secs_f64()).max(MIN_BURST_BYTES))
    }

    fn refill(&mut self, now: Instant) {
        if let (Some(rate), Some(at)) = (self.rate, self.refilled) {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + rate * elapsed).min(self.capacity());
        }
        if self.refilled.is_none_or(|at| now > at) {
            self.refilled = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs a pacer on simulated time, releasing whenever it asks; returns when each item left.
    fn drain(p: &mut Pacer<u32>, mut now: Instant, sent: &mut Vec<(u32, Instant)>) -> Instant {
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let Some(at) = p.next_release() else {
                break;
            };
            now = now.max(at);
            p.release(now, &mut out);
            sent.extend(out.drain(..).map(|i| (i, now)));
        }
        now
    }

    #[test]
    fn without_a_rate_nothing_waits() {
        let now = Instant::now();
        let mut p = Pacer::default();
        for i in 0..100u32 {
            assert_eq!(p.offer(now, 1_200, i), Some(i));
        }
        assert_eq!(p.waiting(), 0);
        assert_eq!(p.next_release(), None);
    }

    #[test]
    fn a_keyframe_burst_leaves_at_the_pacing_rate_and_in_order() {
        let start = Instant::now();
        let mut p = Pacer::default();
        // 400 kbit/s: 50,000 bytes a second.
        p.set_rate(start, Some(400_000));
        // A 36 kB keyframe arrives at once: 30 packets of 1,200 bytes.
        let mut sent = Vec::new();
        for i in 0..30u32 {
            if let Some(i) = p.offer(start, 1_200, i) {
                sent.push((i, start));
            }
        }
        // The bucket starts full: 40 ms of the rate (2 kB, at least 2.4 kB) goes at once.
        assert_eq!(sent.len(), 2);
        let end = drain(&mut p, start, &mut sent);
        let order: Vec<u32> = sent.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..30).collect::<Vec<_>>(), "order is kept");
        // 36 kB at 50 kB/s, less what the full bucket let go at once: about 0.67 s.
        let took = end.saturating_duration_since(start);
        assert!(
            took >= ms(640) && took <= ms(700),
            "the burst took {took:?}"
        );
        // And never faster than the rate: by any moment, at most what the rate allowed plus
        // the full bucket and one packet of credit.
        for (k, (_, at)) in sent.iter().enumerate() {
            let allowed = 2
                + (at.saturating_duration_since(start).as_secs_f64() * 50_000.0 / 1_200.0).ceil()
                    as usize;
            assert!(
                k < allowed + 1,
                "packet {k} left at {at:?}, ahead of the rate"
            );
        }
    }

    #[test]
    fn a_queue_that_waited_too_long_is_released_at_once() {
        let start = Instant::now();
        let mut p = Pacer::default();
        p.set_rate(start, Some(400_000));
        // 120 kB: 2.4 s at the rate; the queue is let go when its head has waited 1 s.
        let mut sent = Vec::new();
        for i in 0..100u32 {
            if let Some(i) = p.offer(start, 1_200, i) {
                sent.push((i, start));
            }
        }
        let end = drain(&mut p, start, &mut sent);
        assert_eq!(end.saturating_duration_since(start), MAX_QUEUE);
        assert_eq!(sent.len(), 100);
        assert_eq!(p.delay(end), Duration::ZERO);
    }

    #[test]
    fn steady_video_under_the_rate_never_waits() {
        let start = Instant::now();
        let mut p = Pacer::default();
        p.set_rate(start, Some(1_000_000));
        // 500 kbit/s of video: 1,000-byte packets every 16 ms.
        let mut now = start;
        for i in 0..500u32 {
            now += ms(16);
            assert_eq!(p.offer(now, 1_000, i), Some(i), "packet {i} waited");
        }
    }

    #[test]
    fn audio_never_waits_but_takes_its_share() {
        let start = Instant::now();
        let mut p: Pacer<u32> = Pacer::default();
        p.set_rate(start, Some(100_000));
        let mut now = start;
        // 80 kbit/s of audio alone: 200-byte packets every 20 ms, all counted.
        for _ in 0..50 {
            now += ms(20);
            p.pass(now, 200);
        }
        // Video at 80 kbit/s beside it exceeds the rate: some of it must wait.
        let mut waited = 0;
        for i in 0..50u32 {
            now += ms(20);
            p.pass(now, 200);
            if p.offer(now, 200, i).is_none() {
                waited += 1;
            }
            let mut out = Vec::new();
            p.release(now, &mut out);
        }
        assert!(waited > 10, "only {waited} video packets waited");
    }

    #[test]
    fn removing_the_rate_releases_everything() {
        let start = Instant::now();
        let mut p = Pacer::default();
        p.set_rate(start, Some(100_000));
        for i in 0..20u32 {
            p.offer(start, 1_200, i);
        }
        assert!(p.delay(start + ms(10)) == ms(10));
        p.set_rate(start + ms(10), None);
        let mut out = Vec::new();
        p.release(start + ms(10), &mut out);
        assert_eq!(p.waiting(), 0);
        assert!(out.len() >= 18);
    }
}
