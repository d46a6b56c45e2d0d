//! Counting rules: from a session's entries to connected and credited time per participant.
//!
//! The rules, in the order they apply:
//!
//! 1. Entries are taken in time order (`at`, then `seq` for equal times). A `MediaLost` is
//!    stamped with the last packet's time, so it may be recorded after events that happened
//!    later; time order puts it where it belongs.
//! 2. A participant's media is *flowing* while they are admitted (after `Admitted`, before
//!    `Left`) and their media is up (after `MediaConnected` or `MediaRestored`, before
//!    `MediaLost`). Waiting-room time never counts because it is before `Admitted`.
//! 3. `SessionEnded` ends every stay. Events after it open nothing.
//! 4. A stay still open after the last entry ends at the `at` of the session's last entry, the
//!    last proof that the server was running the session; it is never extended to "now".
//! 5. The window is `[starts_at, ends_at + overrun_allowance]` from the session's first
//!    `SessionOpened` (by `seq`). Without one, nobody is credited.
//! 6. Credited time: clients get their flowing time that overlaps the flowing time of at least
//!    one therapist, inside the window; two therapists at once count once. Therapists get their
//!    flowing time inside the window (whether or not a client was there). Sponsors and
//!    auditors get none: their time never adds to a client's hours.
//!
//! Times are counted in whole nanoseconds and turned into `f64` seconds only at the end, so
//! nothing is rounded here; rounding is for the report formats.

use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
use time::{Duration, OffsetDateTime};

use crate::{Entry, EventKind, LeaveReason, Modality};

/// What the program configures about counting.
#[derive(Clone, Debug, PartialEq)]
pub struct CountingRules {
    /// How long after the scheduled end time still counts. A negative value counts as zero.
    pub overrun_allowance: Duration,
}

impl Default for CountingRules {
    fn default() -> Self {
        CountingRules {
            overrun_allowance: Duration::minutes(15),
        }
    }
}

/// Attendance of one session, computed from its ledger entries.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionReport {
    /// `None` only when there were no entries at all.
    pub session_id: Option<SessionId>,
    pub kind: Option<SessionKind>,
    pub program: Option<String>,
    pub starts_at: Option<OffsetDateTime>,
    pub ends_at: Option<OffsetDateTime>,
    /// In order of each participant's first event in time.
    pub participants: Vec<ParticipantReport>,
}

/// Attendance of one participant in one session. Seconds are raw, not rounded.
#[derive(Clone, Debug, PartialEq)]
pub struct ParticipantReport {
    pub participant_id: ParticipantId,
    pub role: Role,
    /// The first `Admitted`.
    pub joined_at: Option<OffsetDateTime>,
    /// When the last stay ended (`Left`, or `SessionEnded` while in the room); `None` if the
    /// participant was still in the room at the last entry.
    pub left_at: Option<OffsetDateTime>,
    pub left_reason: Option<LeaveReason>,
    /// All time with media flowing, inside the window or not.
    pub connected_seconds: f64,
    /// The time that counts toward the program's requirement (see the module rules).
    pub credited_seconds: f64,
    /// The part of `credited_seconds` spent audio-only. Media counts as video until a
    /// `ModalityChanged` says otherwise, and again after each `Left`.
    pub credited_audio_only_seconds: f64,
}

/// Computes the report of one session.
///
/// Takes the session of the first entry and ignores entries of any other session, so pass the
/// result of [`Ledger::session_events`](crate::Ledger::session_events).
pub fn session_report(entries: &[Entry], rules: &CountingRules) -> SessionReport {
    let session_id = entries.first().map(|e| e.event.session_id.clone());
    let mut ours: Vec<&Entry> = entries
        .iter()
        .filter(|e| Some(&e.event.session_id) == session_id.as_ref())
        .collect();

    let opened = ours.iter().find_map(|e| match &e.event.kind {
        EventKind::SessionOpened {
            kind,
            starts_at,
            ends_at,
            program,
        } => Some((*kind, *starts_at, *ends_at, program.clone())),
        _ => None,
    });

    ours.sort_by_key(|e| (e.event.at, e.seq));
    let stays = replay(&ours);

    let allowance = rules.overrun_allowance.max(Duration::ZERO);
    // An allowance too large to add means "no end", not a panic.
    let window_end = |end: &OffsetDateTime| end.checked_add(allowance).map_or(i128::MAX, nanos);
    let window = opened
        .as_ref()
        .map(|(_, start, end, _)| vec![(nanos(*start), window_end(end))]);
    let therapists = union(
        stays
            .iter()
            .filter(|s| s.role == Role::Therapist)
            .flat_map(|s| s.flowing.clone())
            .collect(),
    );

    let participants = stays
        .into_iter()
        .map(|s| {
            let credited = match (&window, s.role) {
                (Some(w), Role::Client) => intersect(&intersect(&s.flowing, &therapists), w),
                (Some(w), Role::Therapist) => intersect(&s.flowing, w),
                _ => Vec::new(),
            };
            let audio_only = intersect(&credited, &union(s.audio_only));
            ParticipantReport {
                participant_id: s.participant_id,
                role: s.role,
                joined_at: s.joined_at,
                left_at: s.left.map(|(at, _)| at),
                left_reason: s.left.map(|(_, r)| r),
                connected_seconds: seconds(&s.flowing),
                credited_seconds: seconds(&credited),
                credited_audio_only_seconds: seconds(&audio_only),
            }
        })
        .collect();

    SessionReport {
        session_id,
        kind: opened.as_ref().map(|o| o.0),
        program: opened.as_ref().and_then(|o| o.3.clone()),
        starts_at: opened.as_ref().map(|o| o.1),
        ends_at: opened.as_ref().map(|o| o.2),
        participants,
    }
}

/// A half-open interval `[start, end)` in unix nanoseconds.
type Span = (i128, i128);

/// One participant's replayed state and the intervals found so far.
struct Stay {
    participant_id: ParticipantId,
    role: Role,
    admitted: bool,
    media_up: bool,
    flowing_since: Option<i128>,
    flowing: Vec<Span>,
    audio_since: Option<i128>,
    audio_only: Vec<Span>,
    joined_at: Option<OffsetDateTime>,
    left: Option<(OffsetDateTime, LeaveReason)>,
}

impl Stay {
    fn new(participant_id: ParticipantId, role: Role) -> Self {
        Stay {
            participant_id,
            role,
            admitted: false,
            media_up: false,
            flowing_since: None,
            flowing: Vec::new(),
            audio_since: None,
            audio_only: Vec::new(),
            joined_at: None,
            left: None,
        }
    }

    /// Opens or closes the flowing interval after `admitted` or `media_up` changed at `t`.
    fn settle(&mut self, t: i128) {
        let flowing = self.admitted && self.media_up;
        match (flowing, self.flowing_since) {
            (true, None) => self.flowing_since = Some(t),
            (false, Some(since)) => {
                push(&mut self.flowing, since, t);
                self.flowing_since = None;
            }
            _ => {}
        }
    }

    fn end_audio_only(&mut self, t: i128) {
        if let Some(since) = self.audio_since.take() {
            push(&mut self.audio_only, since, t);
        }
    }

    /// Closes intervals still open at the end of the ledger, without marking a departure.
    fn close_open(&mut self, t: i128) {
        if let Some(since) = self.flowing_since.take() {
            push(&mut self.flowing, since, t);
        }
        self.end_audio_only(t);
    }

    /// Ends the stay at `t`: out of the room, media down, back to video.
    fn end(&mut self, t: i128) {
        self.admitted = false;
        self.media_up = false;
        self.settle(t);
        self.end_audio_only(t);
    }
}

/// Replays the entries (already in time order) into one [`Stay`] per participant and role.
///
/// Keyed by participant and role together: should one id ever appear with two roles, the
/// report shows two lines instead of crediting one role's time to the other.
fn replay(entries: &[&Entry]) -> Vec<Stay> {
    let mut stays: Vec<Stay> = Vec::new();
    let mut ended = false;

    for entry in entries {
        let event = &entry.event;
        let t = nanos(event.at);
        if let EventKind::SessionEnded = event.kind {
            for s in stays.iter_mut().filter(|s| s.admitted) {
                s.left = Some((event.at, LeaveReason::SessionEnded));
            }
            stays.iter_mut().for_each(|s| s.end(t));
            ended = true;
            continue;
        }
        let (Some(pid), Some(role)) = (&event.participant_id, event.role) else {
            continue;
        };

        let i = match stays
            .iter()
            .position(|s| &s.participant_id == pid && s.role == role)
        {
            Some(i) => i,
            None => {
                stays.push(Stay::new(pid.clone(), role));
                stays.len() - 1
            }
        };
        // Listed even when all their events came after the end, so the report shows them.
        if !ended {
            apply(&mut stays[i], &event.kind, event.at);
        }
    }

    // Open stays end at the last proof of presence: the session's last entry.
    if let Some(last) = entries.last() {
        let t = nanos(last.event.at);
        stays.iter_mut().for_each(|s| s.close_open(t));
    }
    stays
}

fn apply(stay: &mut Stay, kind: &EventKind, at: OffsetDateTime) {
    let t = nanos(at);
    match kind {
        EventKind::Admitted => {
            stay.admitted = true;
            stay.joined_at.get_or_insert(at);
            stay.left = None;
        }
        EventKind::MediaConnected | EventKind::MediaRestored => stay.media_up = true,
        EventKind::MediaLost => stay.media_up = false,
        EventKind::ModalityChanged {
            modality: Modality::AudioOnly,
        } => {
            stay.audio_since.get_or_insert(t);
        }
        EventKind::ModalityChanged {
            modality: Modality::Video,
        } => stay.end_audio_only(t),
        EventKind::Left { reason } => {
            stay.end(t);
            stay.left = Some((at, *reason));
        }
        // Session events never reach here: `Ledger::append` refuses them with a participant.
        EventKind::SessionOpened { .. } | EventKind::SessionEnded => {}
    }
    stay.settle(t);
}

fn nanos(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos()
}

/// Adds `[start, end)` unless it is empty.
fn push(spans: &mut Vec<Span>, start: i128, end: i128) {
    if end > start {
        spans.push((start, end));
    }
}

/// Sorted, non-overlapping spans covering the same time as `spans`.
fn union(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_unstable();

    let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// The time covered by both; each input is first made sorted and non-overlapping.
fn intersect(a: &[Span], b: &[Span]) -> Vec<Span> {
    let (a, b) = (union(a.to_vec()), union(b.to_vec()));

    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        push(&mut out, a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        // Drop whichever span ends first; the other may still overlap the next one.
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Total length of the spans in seconds; they must not overlap (a union or intersection).
fn seconds(spans: &[Span]) -> f64 {
    let total: i128 = union(spans.to_vec()).iter().map(|(s, e)| e - s).sum();
    // Precision: f64 holds whole nanoseconds exactly up to about 104 days.
    total as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use haven_ids::SessionKind;
    use proptest::prelude::*;
    use time::macros::datetime;

    use super::*;
    use crate::Event;

    const START: OffsetDateTime = datetime!(2026-03-02 09:00 UTC);

    /// `min` minutes after 09:00, the scheduled start; fractions allowed.
    fn at(min: f64) -> OffsetDateTime {
        START + Duration::seconds_f64(min * 60.0)
    }

    /// Builds entries directly; the counting rules never look at hashes.
    struct Script {
        entries: Vec<Entry>,
    }

    impl Script {
        /// A session scheduled 09:00 to 10:00.
        fn new() -> Self {
            let mut s = Script {
                entries: Vec::new(),
            };
            let opened = EventKind::SessionOpened {
                kind: SessionKind::Group,
                starts_at: START,
                ends_at: at(60.0),
                program: Some("iop-adult".into()),
            };
            s.session(-5.0, opened);
            s
        }

        fn session(&mut self, min: f64, kind: EventKind) -> &mut Self {
            let event = Event::session(sid(), kind, at(min));
            self.push(event)
        }

        fn p(&mut self, who: &str, role: Role, min: f64, kind: EventKind) -> &mut Self {
            let pid = ParticipantId::parse(who).expect("valid test id");
            let event = Event::participant(sid(), pid, role, kind, at(min));
            self.push(event)
        }

        fn push(&mut self, event: Event) -> &mut Self {
            let seq = self.entries.len() as u64 + 1;
            let recorded_at = event.at;
            let hash = String::new();
            self.entries.push(Entry {
                seq,
                event,
                recorded_at,
                prev_hash: String::new(),
                hash,
            });
            self
        }

        /// Admitted and media connected at `from`, left at `to`.
        fn stay(&mut self, who: &str, role: Role, from: f64, to: f64) -> &mut Self {
            self.p(who, role, from, EventKind::Admitted)
                .p(who, role, from, EventKind::MediaConnected)
                .p(
                    who,
                    role,
                    to,
                    EventKind::Left {
                        reason: LeaveReason::Left,
                    },
                )
        }

        fn report(&self) -> SessionReport {
            session_report(&self.entries, &CountingRules::default())
        }
    }

    fn sid() -> SessionId {
        SessionId::parse("sess-001").expect("valid test id")
    }

    fn person<'r>(r: &'r SessionReport, who: &str) -> &'r ParticipantReport {
        r.participants
            .iter()
            .find(|p| p.participant_id.as_str() == who)
            .expect("in report")
    }

    fn minutes(secs: f64) -> f64 {
        (secs / 60.0 * 1e6).round() / 1e6
    }

    #[test]
    fn client_is_credited_only_while_a_therapist_is_flowing() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 10.0, 50.0)
            .stay("p-7f3a", Role::Client, 0.0, 60.0)
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.connected_seconds), 60.0);
        assert_eq!(minutes(client.credited_seconds), 40.0);
    }

    #[test]
    fn media_gap_is_subtracted_and_the_stay_continues() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 60.0)
            .p("p-7f3a", Role::Client, 0.0, EventKind::Admitted)
            .p("p-7f3a", Role::Client, 0.0, EventKind::MediaConnected)
            .p("p-7f3a", Role::Client, 20.0, EventKind::MediaLost)
            .p("p-7f3a", Role::Client, 27.5, EventKind::MediaRestored)
            .p(
                "p-7f3a",
                Role::Client,
                60.0,
                EventKind::Left {
                    reason: LeaveReason::Left,
                },
            )
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.connected_seconds), 52.5);
        assert_eq!(minutes(client.credited_seconds), 52.5);
        assert_eq!(client.joined_at, Some(at(0.0)));
    }

    #[test]
    fn media_lost_recorded_late_counts_from_the_last_packet() {
        // The loss is noticed (and recorded) after the Left, but stamped with the last packet.
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 60.0)
            .p("p-7f3a", Role::Client, 0.0, EventKind::Admitted)
            .p("p-7f3a", Role::Client, 0.0, EventKind::MediaConnected)
            .p(
                "p-7f3a",
                Role::Client,
                31.0,
                EventKind::Left {
                    reason: LeaveReason::ConnectionLost,
                },
            )
            .p("p-7f3a", Role::Client, 30.0, EventKind::MediaLost)
            .report();

        assert_eq!(minutes(person(&r, "p-7f3a").credited_seconds), 30.0);
    }

    #[test]
    fn waiting_room_time_before_admit_is_not_counted() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 60.0)
            .p("p-7f3a", Role::Client, 0.0, EventKind::MediaConnected)
            .p("p-7f3a", Role::Client, 12.0, EventKind::Admitted)
            .p(
                "p-7f3a",
                Role::Client,
                60.0,
                EventKind::Left {
                    reason: LeaveReason::Left,
                },
            )
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.connected_seconds), 48.0);
        assert_eq!(minutes(client.credited_seconds), 48.0);
        assert_eq!(client.joined_at, Some(at(12.0)));
    }

    #[test]
    fn time_outside_window_and_overrun_allowance_is_clipped() {
        // Window 09:00 to 10:00 plus 15 minutes; everyone flows 08:50 to 10:30.
        let r = Script::new()
            .stay("t-01", Role::Therapist, -10.0, 90.0)
            .stay("p-7f3a", Role::Client, -10.0, 90.0)
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.connected_seconds), 100.0);
        assert_eq!(minutes(client.credited_seconds), 75.0);
        assert_eq!(minutes(person(&r, "t-01").credited_seconds), 75.0);
    }

    #[test]
    fn overrun_allowance_comes_from_the_rules() {
        let mut s = Script::new();
        s.stay("t-01", Role::Therapist, 0.0, 90.0)
            .stay("p-7f3a", Role::Client, 0.0, 90.0);
        let rules = CountingRules {
            overrun_allowance: Duration::minutes(5),
        };

        let r = session_report(&s.entries, &rules);
        assert_eq!(minutes(person(&r, "p-7f3a").credited_seconds), 65.0);
    }

    #[test]
    fn sponsor_is_never_credited() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 60.0)
            .stay("s-22b1", Role::Sponsor, 0.0, 60.0)
            .report();

        let sponsor = person(&r, "s-22b1");
        assert_eq!(minutes(sponsor.connected_seconds), 60.0);
        assert_eq!(sponsor.credited_seconds, 0.0);
    }

    #[test]
    fn sponsor_media_does_not_stand_in_for_a_therapist() {
        let r = Script::new()
            .stay("s-22b1", Role::Sponsor, 0.0, 60.0)
            .stay("p-7f3a", Role::Client, 0.0, 60.0)
            .report();

        assert_eq!(person(&r, "p-7f3a").credited_seconds, 0.0);
    }

    #[test]
    fn overlapping_therapists_are_not_double_counted() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 40.0)
            .stay("t-02", Role::Therapist, 20.0, 50.0)
            .stay("p-7f3a", Role::Client, 0.0, 60.0)
            .report();

        assert_eq!(minutes(person(&r, "p-7f3a").credited_seconds), 50.0);
    }

    #[test]
    fn open_stay_ends_at_the_last_ledger_event() {
        // Nobody leaves and the session never ends: the last entry is at 09:42.
        let r = Script::new()
            .p("t-01", Role::Therapist, 0.0, EventKind::Admitted)
            .p("t-01", Role::Therapist, 0.0, EventKind::MediaConnected)
            .p("p-7f3a", Role::Client, 2.0, EventKind::Admitted)
            .p("p-7f3a", Role::Client, 2.0, EventKind::MediaConnected)
            .p("p-91c2", Role::Client, 42.0, EventKind::Admitted)
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.connected_seconds), 40.0);
        assert_eq!(minutes(client.credited_seconds), 40.0);
        assert_eq!(client.left_at, None);
    }

    #[test]
    fn session_ended_closes_every_stay_and_later_events_open_nothing() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 70.0)
            .p("p-7f3a", Role::Client, 0.0, EventKind::Admitted)
            .p("p-7f3a", Role::Client, 0.0, EventKind::MediaConnected)
            .session(45.0, EventKind::SessionEnded)
            .p("p-7f3a", Role::Client, 46.0, EventKind::Admitted)
            .p("p-7f3a", Role::Client, 46.0, EventKind::MediaConnected)
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.connected_seconds), 45.0);
        assert_eq!(client.left_at, Some(at(45.0)));
        assert_eq!(client.left_reason, Some(LeaveReason::SessionEnded));
    }

    #[test]
    fn huge_overrun_allowance_does_not_panic() {
        let mut s = Script::new();
        s.stay("t-01", Role::Therapist, 0.0, 90.0)
            .stay("p-7f3a", Role::Client, 0.0, 90.0);
        let rules = CountingRules {
            overrun_allowance: Duration::MAX,
        };

        let r = session_report(&s.entries, &rules);
        assert_eq!(minutes(person(&r, "p-7f3a").credited_seconds), 90.0);
    }

    #[test]
    fn rejoin_after_left_needs_new_media_and_reports_last_departure() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 60.0)
            .stay("p-7f3a", Role::Client, 0.0, 10.0)
            .p("p-7f3a", Role::Client, 15.0, EventKind::Admitted)
            .p("p-7f3a", Role::Client, 20.0, EventKind::MediaConnected)
            .p(
                "p-7f3a",
                Role::Client,
                30.0,
                EventKind::Left {
                    reason: LeaveReason::Removed,
                },
            )
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.credited_seconds), 20.0);
        assert_eq!(client.joined_at, Some(at(0.0)));
        assert_eq!(client.left_at, Some(at(30.0)));
        assert_eq!(client.left_reason, Some(LeaveReason::Removed));
    }

    #[test]
    fn session_without_window_credits_nobody() {
        let mut s = Script::new();
        s.entries.clear();
        s.stay("t-01", Role::Therapist, 0.0, 60.0)
            .stay("p-7f3a", Role::Client, 0.0, 60.0);

        let r = s.report();
        assert_eq!(r.starts_at, None);
        assert_eq!(person(&r, "p-7f3a").credited_seconds, 0.0);
        assert_eq!(minutes(person(&r, "p-7f3a").connected_seconds), 60.0);
    }

    #[test]
    fn audio_only_share_of_credited_time_is_reported() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 60.0)
            .p("p-7f3a", Role::Client, 0.0, EventKind::Admitted)
            .p("p-7f3a", Role::Client, 0.0, EventKind::MediaConnected)
            .p(
                "p-7f3a",
                Role::Client,
                10.0,
                EventKind::ModalityChanged {
                    modality: Modality::AudioOnly,
                },
            )
            .p(
                "p-7f3a",
                Role::Client,
                25.0,
                EventKind::ModalityChanged {
                    modality: Modality::Video,
                },
            )
            .p(
                "p-7f3a",
                Role::Client,
                60.0,
                EventKind::Left {
                    reason: LeaveReason::Left,
                },
            )
            .report();

        let client = person(&r, "p-7f3a");
        assert_eq!(minutes(client.credited_seconds), 60.0);
        assert_eq!(minutes(client.credited_audio_only_seconds), 15.0);
    }

    #[test]
    fn sub_second_times_are_counted_exactly() {
        let r = Script::new()
            .stay("t-01", Role::Therapist, 0.0, 60.0)
            .stay("p-7f3a", Role::Client, 1.0, 1.0 + 1.5 / 60.0)
            .report();

        assert!((person(&r, "p-7f3a").credited_seconds - 1.5).abs() < 1e-9);
    }

    #[test]
    fn entries_of_other_sessions_are_ignored() {
        let mut s = Script::new();
        s.stay("t-01", Role::Therapist, 0.0, 60.0)
            .stay("p-7f3a", Role::Client, 0.0, 60.0);
        let other = SessionId::parse("sess-002").expect("valid test id");
        let pid = ParticipantId::parse("p-0000").expect("valid test id");
        s.push(Event::participant(
            other,
            pid,
            Role::Client,
            EventKind::Admitted,
            at(5.0),
        ));

        let r = s.report();
        assert_eq!(r.participants.len(), 2);
        assert_eq!(r.session_id, Some(sid()));
    }

    #[test]
    fn intersect_keeps_only_common_time() {
        let a = [(0, 10), (20, 30)];
        let b = [(5, 25)];

        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25)]);
        assert_eq!(
            union(vec![(0, 10), (5, 12), (20, 21)]),
            vec![(0, 12), (20, 21)]
        );
    }

    fn arb_kind() -> impl Strategy<Value = EventKind> {
        prop_oneof![
            Just(EventKind::Admitted),
            Just(EventKind::MediaConnected),
            Just(EventKind::MediaLost),
            Just(EventKind::MediaRestored),
            Just(EventKind::ModalityChanged {
                modality: Modality::AudioOnly
            }),
            Just(EventKind::ModalityChanged {
                modality: Modality::Video
            }),
            Just(EventKind::Left {
                reason: LeaveReason::ConnectionLost
            }),
        ]
    }

    fn arb_role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Client),
            Just(Role::Therapist),
            Just(Role::Sponsor)
        ]
    }

    proptest! {
        #[test]
        fn credited_never_exceeds_connected_or_window(
            events in prop::collection::vec(
                (0usize..4, arb_role(), -30.0f64..120.0, arb_kind()),
                0..60,
            ),
            end_at in prop::option::of(0.0f64..120.0),
            overrun in 0i64..30,
        ) {
            let mut s = Script::new();
            for (who, role, min, kind) in events {
                s.p(&format!("p-{who}"), role, min, kind);
            }
            if let Some(min) = end_at {
                s.session(min, EventKind::SessionEnded);
            }
            let rules = CountingRules { overrun_allowance: Duration::minutes(overrun) };
            let window_seconds = (60 + overrun) as f64 * 60.0;

            let r = session_report(&s.entries, &rules);
            for p in &r.participants {
                prop_assert!(p.credited_seconds <= p.connected_seconds + 1e-9, "{p:?}");
                prop_assert!(p.credited_seconds <= window_seconds + 1e-9, "{p:?}");
                prop_assert!(p.credited_audio_only_seconds <= p.credited_seconds + 1e-9);
                prop_assert!(p.connected_seconds >= 0.0);
                if p.role == Role::Sponsor {
                    prop_assert_eq!(p.credited_seconds, 0.0);
                }
            }
        }
    }
}
