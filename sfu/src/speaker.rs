//! The active speaker, from the audio level each publisher puts in its packets (RFC 6464).
//!
//! Levels are in -dBov: 0 is the loudest, 127 silence. For each publisher the loudest level
//! of the last half second counts; every [`SPEAKER_INTERVAL`] the loudest publisher above
//! [`SPEECH_THRESHOLD_DBOV`] becomes the speaker. A new speaker must be louder than the
//! current one for two rounds in a row, so two voices do not make the highlight flicker, and
//! the speaker is cleared after [`SILENCE_CLEARS`] with nobody above the threshold.

use std::time::{Duration, Instant};

use haven_ids::ParticipantId;

/// How often the speaker is chosen again.
pub const SPEAKER_INTERVAL: Duration = Duration::from_millis(300);

/// Quieter than this (in -dBov, so larger numbers are quieter) is not speech.
pub const SPEECH_THRESHOLD_DBOV: f32 = 50.0;

/// With nobody speaking for this long, there is no active speaker.
pub const SILENCE_CLEARS: Duration = Duration::from_millis(1500);

/// A level older than this no longer counts (the publisher muted or left).
const LEVEL_STALE: Duration = Duration::from_millis(500);

/// One publisher's recent loudness: the loudest level heard in the last two buckets of
/// [`LEVEL_BUCKET`]. Speech comes in bursts (and a browser's test tone in short beeps), so the
/// loudest recent packet says more than an average over silences.
#[derive(Debug, Clone, Default)]
pub struct LevelMeter {
    /// Start of the current bucket and the loudest level (smallest -dBov) in it.
    current: Option<(Instant, u8)>,
    /// The loudest level of the bucket before.
    previous: Option<u8>,
    last: Option<Instant>,
}

/// The length of one loudness bucket.
const LEVEL_BUCKET: Duration = Duration::from_millis(250);

impl LevelMeter {
    /// Records one packet's level (`level` in -dBov, 0..=127).
    pub fn on_level(&mut self, now: Instant, level: u8) {
        let level = level.min(127);
        self.current = Some(match self.current {
            Some((start, loudest)) if now.saturating_duration_since(start) < LEVEL_BUCKET => {
                (start, loudest.min(level))
            }
            Some((start, loudest)) => {
                // A new bucket; the old one is remembered only if it just ended.
                let just_ended = now.saturating_duration_since(start) < LEVEL_BUCKET * 2;
                self.previous = just_ended.then_some(loudest);
                (now, level)
            }
            None => (now, level),
        });
        self.last = Some(now);
    }

    fn current(&self, now: Instant) -> Option<f32> {
        let last = self.last?;
        if now.saturating_duration_since(last) > LEVEL_STALE {
            return None;
        }
        let (_, loudest) = self.current?;
        let loudest = self.previous.map_or(loudest, |p| p.min(loudest));
        Some(f32::from(loudest))
    }
}

/// Chooses the speaker of one room.
#[derive(Debug, Default)]
pub struct SpeakerTracker {
    current: Option<ParticipantId>,
    challenger: Option<ParticipantId>,
    last_speech: Option<Instant>,
}

impl SpeakerTracker {
    /// Runs one round over `(participant, meter)` pairs. Returns `Some(new)` when the speaker
    /// changed (`Some(None)` when it was cleared).
    pub fn round<'a>(
        &mut self,
        now: Instant,
        meters: impl IntoIterator<Item = (&'a ParticipantId, &'a LevelMeter)>,
    ) -> Option<Option<ParticipantId>> {
        let mut loudest: Option<(&ParticipantId, f32)> = None;
        let mut current_level = None;
        for (id, meter) in meters {
            let Some(level) = meter.current(now) else {
                continue;
            };
            if Some(id) == self.current.as_ref() {
                current_level = Some(level);
            }
            if level <= SPEECH_THRESHOLD_DBOV && loudest.is_none_or(|(_, l)| level < l) {
                loudest = Some((id, level));
            }
        }

        let Some((id, level)) = loudest else {
            self.challenger = None;
            let silent_long = self
                .last_speech
                .is_none_or(|t| now.saturating_duration_since(t) >= SILENCE_CLEARS);
            if self.current.is_some() && silent_long {
                self.current = None;
                return Some(None);
            }
            return None;
        };
        self.last_speech = Some(now);
        if self.current.as_ref() == Some(id) {
            self.challenger = None;
            return None;
        }
        let current_speaking = current_level.is_some_and(|l| l <= SPEECH_THRESHOLD_DBOV);
        // Louder than the current speaker (smaller -dBov) for two rounds, or the current
        // speaker is silent.
        let takes_over = match (current_speaking, &self.challenger) {
            (false, _) => true,
            (true, Some(c)) => c == id && current_level.is_some_and(|l| level < l),
            (true, None) => false,
        };
        if takes_over {
            self.current = Some(id.clone());
            self.challenger = None;
            Some(Some(id.clone()))
        } else {
            self.challenger = Some(id.clone());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut LevelMeter, from: Instant, ms: u64, level: u8) {
        for i in 0..ms / 20 {
            m.on_level(from + Duration::from_millis(i * 20), level);
        }
    }

    #[test]
    fn loudest_speaker_wins_without_flicker_and_silence_clears() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let a = ParticipantId::parse("p-01").expect("valid id");
        let b = ParticipantId::parse("p-02").expect("valid id");
        let (mut ma, mut mb) = (LevelMeter::default(), LevelMeter::default());
        let mut s = SpeakerTracker::default();

        // a speaks, b is quiet.
        feed(&mut ma, at(0), 600, 20);
        feed(&mut mb, at(0), 600, 110);
        assert_eq!(
            s.round(at(580), [(&a, &ma), (&b, &mb)]),
            Some(Some(a.clone()))
        );

        // b becomes louder: one round is not enough, the second is.
        feed(&mut ma, at(600), 600, 40);
        feed(&mut mb, at(600), 600, 10);
        assert_eq!(s.round(at(1180), [(&a, &ma), (&b, &mb)]), None);
        assert_eq!(
            s.round(at(1190), [(&a, &ma), (&b, &mb)]),
            Some(Some(b.clone()))
        );

        // Everybody quiet: cleared only after the silence period.
        feed(&mut ma, at(1200), 3000, 120);
        feed(&mut mb, at(1200), 3000, 120);
        assert_eq!(s.round(at(1500), [(&a, &ma), (&b, &mb)]), None);
        assert_eq!(s.round(at(2700), [(&a, &ma), (&b, &mb)]), Some(None));
    }

    #[test]
    fn stale_levels_do_not_count() {
        let t0 = Instant::now();
        let a = ParticipantId::parse("p-01").expect("valid id");
        let mut ma = LevelMeter::default();
        ma.on_level(t0, 10);
        let mut s = SpeakerTracker::default();
        assert_eq!(s.round(t0 + Duration::from_secs(2), [(&a, &ma)]), None);
    }
}
