//! Counting rules: from a session's entries to stays, connected and credited time.
//!
//! The rules, in the order they apply (`docs/attendance.md` gives the reason for each):
//!
//! 1. Amendments are taken out first. A [`Correction::VoidEntry`] removes the entry it names
//!    (of this session) before anything else is counted; voiding a void has no effect.
//! 2. The remaining entries are taken in time order (`at`, then `seq` for equal times). A
//!    `MediaLost` is stamped with the last packet's time, so it may be recorded after events
//!    that happened later; time order puts it where it belongs.
//! 3. A participant's media is *flowing* while they are admitted (after `Admitted`, before
//!    `Left`) and their media is up (after `MediaConnected` or `MediaRestored`, before
//!    `MediaLost`). Waiting-room time never counts because it is before `Admitted`.
//! 4. `SessionEnded` ends every stay. Events after it open nothing.
//! 5. A stay still open after the last entry ends at the `at` of the session's last entry, the
//!    last proof that the server was running the session; it is never extended to "now".
//!    (Crash recovery closes such stays explicitly at the node's last heartbeat.)
//! 6. [`Correction::AddPresence`] adds flowing time, [`Correction::RemovePresence`] removes
//!    it, both before crediting, so a correction is credited by the same rules as media.
//! 7. Stays: flowing stretches separated by a media drop no longer than the grace period are
//!    one stay (the gap is not credited); a longer drop ends the stay with `connection_lost`
//!    and the next stretch starts a new one. `Left` always ends the stay.
//! 8. The window is `[starts_at, ends_at + overrun_allowance]` from the session's first
//!    `SessionOpened` (by `seq`). Without one, nobody is credited.
//! 9. Credited time: clients get their flowing time that overlaps the flowing time of at least
//!    one therapist, inside the window; two therapists at once count once. Therapists get their
//!    flowing time inside the window (whether or not a client was there). Sponsors and
//!    auditors get none: their time never adds to a client's hours.
//! 10. Modality: media counts as video until a `ModalityChanged` says audio only, and again
//!     after each `Left`; every stretch of a stay carries its modality.
//!
//! Times are counted in whole nanoseconds and turned into `f64` seconds only at the end, so
//! nothing is rounded here; rounding is a report option ([`crate::Rounding`]).

use std::collections::HashSet;

use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
use time::{Duration, OffsetDateTime};

use crate::{AgeGroup, Correction, Entry, EventKind, LeaveReason, Modality, StaffId};

/// What the program configures about counting one session.
#[derive(Clone, Debug, PartialEq)]
pub struct CountingRules {
    /// How long after the scheduled end time still counts. A negative value counts as zero.
    pub overrun_allowance: Duration,
    /// The longest media drop that keeps one stay. A negative value counts as zero.
    pub grace: Duration,
}

impl Default for CountingRules {
    fn default() -> Self {
        CountingRules {
            overrun_allowance: Duration::minutes(15),
            grace: Duration::seconds(30),
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
    /// The last age group recorded or amended for this participant in the session.
    pub age_group: Option<AgeGroup>,
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
    /// The part of `credited_seconds` spent audio-only; the rest is video.
    pub credited_audio_only_seconds: f64,
    /// Each stay with its stretches.
    pub stays: Vec<StayReport>,
    /// The credited time itself, sorted and not overlapping: what days and weeks add up.
    pub credited: Vec<(OffsetDateTime, OffsetDateTime)>,
    /// Amendments applied to this participant, in ledger order.
    pub amendments: Vec<AppliedAmendment>,
}

/// One stay: media flowing, with drops no longer than the grace period inside it.
#[derive(Clone, Debug, PartialEq)]
pub struct StayReport {
    pub started_at: OffsetDateTime,
    pub ended_at: OffsetDateTime,
    /// `None` when the stay was still open at the last entry.
    pub end_reason: Option<LeaveReason>,
    pub connected_seconds: f64,
    pub credited_seconds: f64,
    /// Flowing stretches in time order, each with one modality.
    pub stretches: Vec<Stretch>,
}

/// A stretch of flowing media with one modality.
#[derive(Clone, Debug, PartialEq)]
pub struct Stretch {
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub modality: Modality,
    pub credited_seconds: f64,
}

/// An amendment as a report shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedAmendment {
    pub seq: u64,
    pub at: OffsetDateTime,
    pub author: StaffId,
    pub reason: String,
    pub correction: Correction,
}

/// Computes the report of one session.
///
/// Takes the session of the first entry and ignores entries of any other session, so pass the
/// result of [`Ledger::session_events`](crate::Ledger::session_events).
pub fn session_report(entries: &[Entry], rules: &CountingRules) -> SessionReport {
    let session_id = entries.first().map(|e| e.event.session_id.clone());
    let ours: Vec<&Entry> = entries
        .iter()
        .filter(|e| Some(&e.event.session_id) == session_id.as_ref())
        .collect();

    // Rule 1: voids first.
    let void_seqs: HashSet<u64> = ours
        .iter()
        .filter(|e| matches!(&e.event.kind, EventKind::Amended(a) if matches!(a.correction, Correction::VoidEntry { .. })))
        .map(|e| e.seq)
        .collect();
    let voided: HashSet<u64> = ours
        .iter()
        .filter_map(|e| match &e.event.kind {
            EventKind::Amended(a) => match a.correction {
                Correction::VoidEntry { seq } if !void_seqs.contains(&seq) => Some(seq),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let mut ours: Vec<&Entry> = ours
        .into_iter()
        .filter(|e| !voided.contains(&e.seq))
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
    let mut people = replay(&ours);
    for p in &mut people {
        p.apply_amendments();
    }

    let allowance = rules.overrun_allowance.max(Duration::ZERO);
    let grace = nanos_of(rules.grace.max(Duration::ZERO));
    // An allowance too large to add means "no end", not a panic.
    let window_end = |end: &OffsetDateTime| end.checked_add(allowance).map_or(i128::MAX, nanos);
    let window = opened
        .as_ref()
        .map(|(_, start, end, _)| vec![(nanos(*start), window_end(end))]);
    let therapists = union(
        people
            .iter()
            .filter(|s| s.role == Role::Therapist)
            .flat_map(|s| s.flowing())
            .collect(),
    );

    let participants = people
        .into_iter()
        .map(|p| {
            let flowing = p.flowing();
            let credited = match (&window, p.role) {
                (Some(w), Role::Client) => intersect(&intersect(&flowing, &therapists), w),
                (Some(w), Role::Therapist) => intersect(&flowing, w),
                _ => Vec::new(),
            };
            let audio = union(p.audio_only.clone());
            let stays = p.stays(grace, &credited, &audio);
            ParticipantReport {
                connected_seconds: seconds(&flowing),
                credited_seconds: seconds(&credited),
                credited_audio_only_seconds: seconds(&intersect(&credited, &audio)),
                credited: credited
                    .iter()
                    .map(|&(s, e)| (time_of(s), time_of(e)))
                    .collect(),
                stays,
                participant_id: p.participant_id,
                role: p.role,
                age_group: p.age_group,
                joined_at: p.joined_at,
                left_at: p.left.map(|(at, _)| at),
                left_reason: p.left.map(|(_, r)| r),
                amendments: p.amendments,
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

/// Participants admitted and not yet gone at the end of these entries (what crash recovery
/// must close), in order of first appearance.
pub(crate) fn open_participants(entries: &[Entry]) -> Vec<(ParticipantId, Role)> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by_key(|e| (e.event.at, e.seq));
    replay(&sorted)
        .into_iter()
        .filter(|p| p.admitted)
        .map(|p| (p.participant_id, p.role))
        .collect()
}

/// A half-open interval `[start, end)` in unix nanoseconds.
type Span = (i128, i128);

/// How a flowing interval ended.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cause {
    MediaLost,
    Left(LeaveReason),
    /// Still flowing at the last entry.
    Open,
    /// Added by an amendment.
    Amended,
}

/// One participant's replayed state and the intervals found so far.
struct Person {
    participant_id: ParticipantId,
    role: Role,
    admitted: bool,
    media_up: bool,
    flowing_since: Option<i128>,
    intervals: Vec<(i128, i128, Cause)>,
    audio_since: Option<i128>,
    audio_only: Vec<Span>,
    joined_at: Option<OffsetDateTime>,
    left: Option<(OffsetDateTime, LeaveReason)>,
    age_group: Option<AgeGroup>,
    pending: Vec<AppliedAmendment>,
    amendments: Vec<AppliedAmendment>,
}

impl Person {
    fn new(participant_id: ParticipantId, role: Role) -> Self {
        Person {
            participant_id,
            role,
            admitted: false,
            media_up: false,
            flowing_since: None,
            intervals: Vec::new(),
            audio_since: None,
            audio_only: Vec::new(),
            joined_at: None,
            left: None,
            age_group: None,
            pending: Vec::new(),
            amendments: Vec::new(),
        }
    }

    /// Opens or closes the flowing interval after `admitted` or `media_up` changed at `t`.
    fn settle(&mut self, t: i128, cause: Cause) {
        let flowing = self.admitted && self.media_up;
        match (flowing, self.flowing_since) {
            (true, None) => self.flowing_since = Some(t),
            (false, Some(since)) => {
                if t > since {
                    self.intervals.push((since, t, cause));
                }
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
            if t > since {
                self.intervals.push((since, t, Cause::Open));
            }
        }
        self.end_audio_only(t);
    }

    /// Ends the stay at `t`: out of the room, media down, back to video. A `Left` while the
    /// media was already down names why the last interval's stay ended.
    fn end(&mut self, t: i128, reason: LeaveReason) {
        if self.flowing_since.is_none() {
            if let Some(last) = self.intervals.last_mut() {
                if last.2 == Cause::MediaLost && self.admitted {
                    last.2 = Cause::Left(reason);
                }
            }
        }
        self.admitted = false;
        self.media_up = false;
        self.settle(t, Cause::Left(reason));
        self.end_audio_only(t);
    }

    fn flowing(&self) -> Vec<Span> {
        union(self.intervals.iter().map(|&(s, e, _)| (s, e)).collect())
    }

    /// Rule 6: presence corrections, in ledger order.
    fn apply_amendments(&mut self) {
        self.pending.sort_by_key(|a| a.seq);
        for a in std::mem::take(&mut self.pending) {
            match &a.correction {
                Correction::AddPresence { from, to } => {
                    self.intervals
                        .push((nanos(*from), nanos(*to), Cause::Amended));
                }
                Correction::RemovePresence { from, to } => {
                    let (from, to) = (nanos(*from), nanos(*to));
                    let mut kept = Vec::new();
                    for (s, e, c) in self.intervals.drain(..) {
                        if s < from.min(e) {
                            kept.push((s, from.min(e), c));
                        }
                        if to.max(s) < e {
                            kept.push((to.max(s), e, c));
                        }
                    }
                    self.intervals = kept;
                }
                Correction::SetAgeGroup { age_group } => self.age_group = Some(*age_group),
                Correction::VoidEntry { .. } => {}
            }
            self.amendments.push(a);
        }
        self.intervals.sort_by_key(|&(s, e, _)| (s, e));
    }

    /// Rule 7: groups the flowing intervals into stays.
    fn stays(&self, grace: i128, credited: &[Span], audio: &[Span]) -> Vec<StayReport> {
        // Merge overlapping intervals first (an amendment may overlap recorded media); the
        // later-ending interval's cause wins.
        let mut merged: Vec<(i128, i128, Cause)> = Vec::new();
        for &(s, e, c) in &self.intervals {
            match merged.last_mut() {
                Some(last) if s <= last.1 => {
                    if e >= last.1 {
                        last.1 = e;
                        last.2 = c;
                    }
                }
                _ => merged.push((s, e, c)),
            }
        }

        let mut groups: Vec<Vec<(i128, i128, Cause)>> = Vec::new();
        for iv in merged {
            let joins = groups.last().and_then(|g| g.last()).is_some_and(|prev| {
                matches!(prev.2, Cause::MediaLost | Cause::Amended) && iv.0 - prev.1 <= grace
            });
            match groups.last_mut() {
                Some(g) if joins => g.push(iv),
                _ => groups.push(vec![iv]),
            }
        }

        groups
            .into_iter()
            .map(|g| {
                let spans: Vec<Span> = g.iter().map(|&(s, e, _)| (s, e)).collect();
                let (start, end) = (g[0].0, g[g.len() - 1].1);
                let end_reason = match g[g.len() - 1].2 {
                    Cause::Left(r) => Some(r),
                    Cause::MediaLost => Some(LeaveReason::ConnectionLost),
                    Cause::Open | Cause::Amended => None,
                };
                let mut stretches = Vec::new();
                for (modality, part) in [
                    (Modality::Video, subtract(&spans, audio)),
                    (Modality::AudioOnly, intersect(&spans, audio)),
                ] {
                    for (s, e) in part {
                        stretches.push(Stretch {
                            from: time_of(s),
                            to: time_of(e),
                            modality,
                            credited_seconds: seconds(&intersect(&[(s, e)], credited)),
                        });
                    }
                }
                stretches.sort_by_key(|s| s.from);
                StayReport {
                    started_at: time_of(start),
                    ended_at: time_of(end),
                    end_reason,
                    connected_seconds: seconds(&spans),
                    credited_seconds: seconds(&intersect(&spans, credited)),
                    stretches,
                }
            })
            .collect()
    }
}

/// Replays the entries (already in time order) into one [`Person`] per participant and role.
///
/// Keyed by participant and role together: should one id ever appear with two roles, the
/// report shows two lines instead of crediting one role's time to the other.
fn replay(entries: &[&Entry]) -> Vec<Person> {
    let mut people: Vec<Person> = Vec::new();
    let mut ended = false;

    for entry in entries {
        let event = &entry.event;
        let t = nanos(event.at);
        if let EventKind::SessionEnded = event.kind {
            for s in people.iter_mut().filter(|s| s.admitted) {
                s.left = Some((event.at, LeaveReason::SessionEnded));
            }
            people
                .iter_mut()
                .for_each(|s| s.end(t, LeaveReason::SessionEnded));
            ended = true;
            continue;
        }
        let (Some(pid), Some(role)) = (&event.participant_id, event.role) else {
            continue;
        };

        let i = match people
            .iter()
            .position(|s| &s.participant_id == pid && s.role == role)
        {
            Some(i) => i,
            None => {
                people.push(Person::new(pid.clone(), role));
                people.len() - 1
            }
        };
        // Amendments and age groups apply whenever they were written.
        match &event.kind {
            EventKind::Amended(a) => {
                people[i].pending.push(AppliedAmendment {
                    seq: entry.seq,
                    at: event.at,
                    author: a.author.clone(),
                    reason: a.reason.clone(),
                    correction: a.correction.clone(),
                });
                continue;
            }
            EventKind::AgeGroupRecorded { age_group } => {
                people[i].age_group = Some(*age_group);
                continue;
            }
            _ => {}
        }
        // Listed even when all their events came after the end, so the report shows them.
        if !ended {
            apply(&mut people[i], &event.kind, event.at);
        }
    }

    // Open stays end at the last proof of presence: the session's last recorded event
    // (amendments are written later and prove nothing about the session).
    let last = entries
        .iter()
        .filter(|e| !matches!(e.event.kind, EventKind::Amended(_)))
        .map(|e| nanos(e.event.at))
        .max();
    if let Some(t) = last {
        people.iter_mut().for_each(|s| s.close_open(t));
    }
    people
}

fn apply(p: &mut Person, kind: &EventKind, at: OffsetDateTime) {
    let t = nanos(at);
    let mut cause = Cause::MediaLost;
    match kind {
        EventKind::Admitted => {
            p.admitted = true;
            p.joined_at.get_or_insert(at);
            p.left = None;
        }
        EventKind::MediaConnected | EventKind::MediaRestored => p.media_up = true,
        EventKind::MediaLost => p.media_up = false,
        EventKind::ModalityChanged {
            modality: Modality::AudioOnly,
        } => {
            p.audio_since.get_or_insert(t);
        }
        EventKind::ModalityChanged {
            modality: Modality::Video,
        } => p.end_audio_only(t),
        EventKind::Left { reason } => {
            p.end(t, *reason);
            p.left = Some((at, *reason));
            cause = Cause::Left(*reason);
        }
        // Session events never reach here: `Ledger::append` refuses them with a participant;
        // amendments and age groups are taken before.
        EventKind::SessionOpened { .. }
        | EventKind::SessionEnded
        | EventKind::AgeGroupRecorded { .. }
        | EventKind::Amended(_) => {}
    }
    p.settle(t, cause);
}

fn nanos(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos()
}

fn nanos_of(d: Duration) -> i128 {
    d.whole_nanoseconds()
}

fn time_of(n: i128) -> OffsetDateTime {
    // Spans come from stored times (years 1677 to 2262) or the window end, which is clipped
    // to a stored time by intersection before it gets here.
    OffsetDateTime::from_unix_timestamp_nanos(n).unwrap_or(OffsetDateTime::UNIX_EPOCH)
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

/// The time of `a` not covered by `b`.
fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let b = union(b.to_vec());
    let mut out = Vec::new();
    for &(mut s, e) in &union(a.to_vec()) {
        for &(bs, be) in &b {
            if be <= s || bs >= e {
                continue;
            }
            push(&mut out, s, bs);
            s = s.max(be);
        }
        push(&mut out, s, e);
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
            ..CountingRules::default()
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
            ..CountingRules::default()
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
    fn subtract_removes_covered_time() {
        assert_eq!(
            subtract(&[(0, 10), (20, 30)], &[(5, 22)]),
            vec![(0, 5), (22, 30)]
        );
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
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
            let rules = CountingRules {
                overrun_allowance: Duration::minutes(overrun),
                ..CountingRules::default()
            };
            let window_seconds = (60 + overrun) as f64 * 60.0;

            let r = session_report(&s.entries, &rules);
            let therapist_seconds: f64 = r
                .participants
                .iter()
                .filter(|p| p.role == Role::Therapist)
                .map(|p| p.connected_seconds)
                .sum();
            for p in &r.participants {
                prop_assert!(p.credited_seconds <= p.connected_seconds + 1e-9, "{p:?}");
                if p.role == Role::Client {
                    prop_assert!(p.credited_seconds <= therapist_seconds + 1e-9, "{p:?}");
                }
                let in_stays: f64 = p.stays.iter().map(|s| s.credited_seconds).sum();
                prop_assert!((in_stays - p.credited_seconds).abs() < 1e-6, "{p:?}");
                let in_stretches: f64 = p
                    .stays
                    .iter()
                    .flat_map(|s| &s.stretches)
                    .map(|s| s.credited_seconds)
                    .sum();
                prop_assert!((in_stretches - p.credited_seconds).abs() < 1e-6, "{p:?}");
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
