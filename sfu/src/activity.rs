//! Whether a participant's media is flowing.
//!
//! Attendance is counted from these transitions, so a stop is dated at the last packet that
//! arrived, not at the moment the silence was noticed: time is never credited past the last
//! proof of presence.

use std::time::{Duration, Instant};

/// Silence longer than this means the media stopped. Browsers send audio every 20 ms and
/// video many times a second, even when muted (silence and black frames), so a few seconds
/// without a packet means the connection is gone.
pub const MEDIA_TIMEOUT: Duration = Duration::from_secs(4);

#[derive(Debug, Default)]
pub struct MediaActivity {
    last_packet: Option<Instant>,
    flowing: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    Started(Instant),
    Stopped { last_packet: Instant },
}

impl MediaActivity {
    /// Records a packet; returns `Started` when media was not flowing before.
    pub fn on_packet(&mut self, at: Instant) -> Option<Transition> {
        // Packets handed over out of order must not move the last sign of life backwards.
        if self.last_packet.is_none_or(|t| at > t) {
            self.last_packet = Some(at);
        }
        if self.flowing {
            return None;
        }
        self.flowing = true;
        Some(Transition::Started(at))
    }

    /// Returns `Stopped` once the silence has lasted [`MEDIA_TIMEOUT`].
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        let last = self.last_packet?;
        if self.flowing && now.saturating_duration_since(last) >= MEDIA_TIMEOUT {
            self.flowing = false;
            return Some(Transition::Stopped { last_packet: last });
        }
        None
    }

    /// The last packet's time while media is flowing; `None` when it is not.
    pub fn last_flowing_packet(&self) -> Option<Instant> {
        self.last_packet.filter(|_| self.flowing)
    }

    /// When [`MediaActivity::poll`] must next run.
    pub fn deadline(&self) -> Option<Instant> {
        self.flowing
            .then(|| self.last_packet.map(|t| t + MEDIA_TIMEOUT))
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_is_dated_at_the_last_packet_not_when_noticed() {
        let t0 = Instant::now();
        let mut a = MediaActivity::default();
        assert_eq!(a.on_packet(t0), Some(Transition::Started(t0)));
        assert_eq!(a.on_packet(t0 + Duration::from_millis(20)), None);

        let last = t0 + Duration::from_secs(1);
        a.on_packet(last);
        assert_eq!(
            a.poll(last + MEDIA_TIMEOUT - Duration::from_millis(1)),
            None
        );
        assert_eq!(
            a.poll(last + MEDIA_TIMEOUT + Duration::from_secs(3)),
            Some(Transition::Stopped { last_packet: last })
        );
        assert_eq!(a.deadline(), None);

        let again = last + Duration::from_secs(30);
        assert_eq!(a.on_packet(again), Some(Transition::Started(again)));
    }

    #[test]
    fn late_packets_do_not_move_presence_backwards() {
        let t0 = Instant::now();
        let mut a = MediaActivity::default();
        a.on_packet(t0 + Duration::from_secs(2));
        a.on_packet(t0);
        assert_eq!(
            a.deadline(),
            Some(t0 + Duration::from_secs(2) + MEDIA_TIMEOUT)
        );
    }
}
