//! Days and ISO weeks: credited time per client per local day and week, against the
//! program's requirement, with a status.
//!
//! - Credited time is cut at local midnight in the time zone of the session's program, so a
//!   stay crossing midnight counts on both days, and a week holding a daylight-saving change
//!   is simply the time between two local Monday midnights (167 or 169 hours).
//! - A week's program is the one the client was credited most time in that week (the last
//!   known one if none); its level and the client's age group pick the requirement.
//! - A *service day* is a day with credited time. With a daily floor, each service day must
//!   reach it.
//! - Status: `met` when the week reaches the requirement and no service day is under the
//!   floor; otherwise `step_down` while it is one of the first `step_down_weeks` short weeks
//!   right after a met week; otherwise `short`.
//!
//! Limitation: the ledger knows no enrolment dates, so weeks before a client's first session
//! in the requested range are shown (as short), and a program week lists only clients who
//! attended at least one of its sessions that week or the weeks before it that were read.

use std::collections::BTreeMap;

use haven_ids::{ParticipantId, Role, SessionId};
use jiff::civil::{Date, ISOWeekDate, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;
use time::OffsetDateTime;

use crate::{session_report, AgeGroup, AttendanceRules, Ledger, LedgerError, SessionReport};

/// An ISO 8601 week, `2026-W10`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IsoWeek(ISOWeekDate);

impl IsoWeek {
    /// Parses `2026-W10` (or `2026-W1`).
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        let bad = || LedgerError::InvalidEvent {
            reason: "an ISO week looks like 2026-W10",
        };
        let (year, week) = s.split_once("-W").ok_or_else(bad)?;
        let year: i16 = year.parse().map_err(|_| bad())?;
        let week: i8 = week.parse().map_err(|_| bad())?;
        ISOWeekDate::new(year, week, Weekday::Monday)
            .map(IsoWeek)
            .map_err(|_| bad())
    }

    /// The week holding a local date.
    pub fn of(date: Date) -> Self {
        let w = date.iso_week_date();
        // Monday of the same week always exists.
        IsoWeek(ISOWeekDate::new(w.year(), w.week(), Weekday::Monday).unwrap_or(w))
    }

    pub fn monday(self) -> Date {
        self.0.date()
    }

    pub fn next(self) -> Self {
        IsoWeek::of(self.monday().saturating_add(jiff::Span::new().days(7)))
    }

    pub fn previous(self) -> Self {
        IsoWeek::of(self.monday().saturating_sub(jiff::Span::new().days(7)))
    }

    /// `[start, end)` of the week in a time zone.
    pub fn bounds(self, tz: &TimeZone) -> (OffsetDateTime, OffsetDateTime) {
        (
            local_midnight(self.monday(), tz),
            local_midnight(self.next().monday(), tz),
        )
    }
}

impl std::fmt::Display for IsoWeek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-W{:02}", self.0.year(), self.0.week())
    }
}

impl Serialize for IsoWeek {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Whether a client's week meets the requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    // Declared in "short ones first" order, which program reports sort by.
    Short,
    StepDown,
    Met,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Short => "short",
            Status::StepDown => "step_down",
            Status::Met => "met",
        }
    }
}

/// One local day of one client.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DayLine {
    #[serde(serialize_with = "date_str")]
    pub date: Date,
    pub credited_seconds: f64,
    pub credited_audio_only_seconds: f64,
    /// `None` without a daily floor.
    pub floor_met: Option<bool>,
}

/// One ISO week of one client.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeekLine {
    pub client_id: ParticipantId,
    pub week: IsoWeek,
    pub program: Option<String>,
    pub level: String,
    pub age_group: Option<AgeGroup>,
    pub required_seconds: f64,
    pub credited_seconds: f64,
    pub credited_audio_only_seconds: f64,
    /// Sum over sessions of each session's credited time rounded by the payer option.
    pub rounded_minutes: f64,
    pub sessions: u32,
    pub days: Vec<DayLine>,
    pub short_days: u32,
    pub status: Status,
}

/// A client's weeks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientWeeksReport {
    pub client_id: ParticipantId,
    pub from: IsoWeek,
    pub to: IsoWeek,
    pub weeks: Vec<WeekLine>,
}

/// Every client of a program in one week, short ones first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProgramWeekReport {
    pub program: String,
    pub week: IsoWeek,
    pub time_zone: String,
    pub clients: Vec<WeekLine>,
}

/// What one session contributed to one client.
struct Contribution {
    program: Option<String>,
    starts_at: OffsetDateTime,
    age_group: Option<AgeGroup>,
    /// `(local date, credited seconds, audio-only seconds)`.
    days: Vec<(Date, f64, f64)>,
    rounded_minutes: f64,
}

/// How far around the requested weeks sessions are read: a session starting up to two days
/// before a week can still credit time inside it (across midnight and time zones).
const MARGIN: time::Duration = time::Duration::days(2);

/// A client's days and weeks from `from` to `to` (ISO weeks, inclusive).
pub fn client_weeks(
    ledger: &mut Ledger,
    rules: &AttendanceRules,
    client: &ParticipantId,
    from: IsoWeek,
    to: IsoWeek,
) -> Result<ClientWeeksReport, LedgerError> {
    let lookback = lookback_weeks(rules);
    let first = (0..lookback).fold(from, |w, _| w.previous());
    let (start, _) = first.bounds(&TimeZone::UTC);
    let (_, end) = to.bounds(&TimeZone::UTC);

    let sessions = ledger.participant_sessions(client, start - MARGIN, end + MARGIN)?;
    let ids = session_ids(&sessions);
    let by_session = ledger.sessions_events(&ids)?;

    let mut contributions = Vec::new();
    for entries in by_session.values() {
        let report = session_report(entries, &rules.counting());
        if let Some(c) = contribution(&report, client, rules) {
            contributions.push(c);
        }
    }
    let mut weeks = weeks_of(client, &contributions, rules, first, to);
    weeks.retain(|w| w.week >= from);
    Ok(ClientWeeksReport {
        client_id: client.clone(),
        from,
        to,
        weeks,
    })
}

/// Every client of a program in one ISO week (in the program's time zone), short first.
pub fn program_week(
    ledger: &mut Ledger,
    rules: &AttendanceRules,
    program: &str,
    week: IsoWeek,
) -> Result<ProgramWeekReport, LedgerError> {
    let tz = rules.time_zone(Some(program));
    let lookback = lookback_weeks(rules.program(Some(program)));
    let first = (0..lookback).fold(week, |w, _| w.previous());
    let (start, _) = first.bounds(&tz);
    let (_, end) = week.bounds(&tz);

    let sessions = ledger.sessions_starting(Some(program), start - MARGIN, end)?;
    let by_session = ledger.sessions_events(&session_ids(&sessions))?;

    let mut per_client: BTreeMap<ParticipantId, Vec<Contribution>> = BTreeMap::new();
    for entries in by_session.values() {
        let report = session_report(entries, &rules.counting());
        for p in report
            .participants
            .iter()
            .filter(|p| p.role == Role::Client)
        {
            if let Some(c) = contribution(&report, &p.participant_id, rules) {
                per_client
                    .entry(p.participant_id.clone())
                    .or_default()
                    .push(c);
            }
        }
    }

    let mut clients: Vec<WeekLine> = per_client
        .iter()
        .filter_map(|(client, cs)| {
            weeks_of(client, cs, rules, first, week)
                .into_iter()
                .find(|w| w.week == week)
        })
        .filter(|w| w.sessions > 0 || w.credited_seconds > 0.0)
        .collect();
    clients.sort_by(|a, b| {
        (a.status, a.credited_seconds, &a.client_id)
            .partial_cmp(&(b.status, b.credited_seconds, &b.client_id))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(ProgramWeekReport {
        program: program.to_owned(),
        week,
        time_zone: rules.program(Some(program)).time_zone.clone(),
        clients,
    })
}

/// Weeks read before the first requested one, so step-down can see the met week before a
/// run of short weeks.
fn lookback_weeks(rules: &impl StepDown) -> u32 {
    match rules.step_down_weeks() {
        0 => 0,
        k => k + 1,
    }
}

trait StepDown {
    fn step_down_weeks(&self) -> u32;
}

impl StepDown for crate::ProgramRules {
    fn step_down_weeks(&self) -> u32 {
        self.step_down_weeks
    }
}

impl StepDown for AttendanceRules {
    fn step_down_weeks(&self) -> u32 {
        self.programs
            .values()
            .chain([&self.default_program])
            .map(|p| p.step_down_weeks)
            .max()
            .unwrap_or(0)
    }
}

fn session_ids(sessions: &[crate::IndexedSession]) -> Vec<SessionId> {
    sessions
        .iter()
        .filter_map(|s| SessionId::parse(&s.session_id).ok())
        .collect()
}

/// One client's credited time in one session, cut into local days.
fn contribution(
    report: &SessionReport,
    client: &ParticipantId,
    rules: &AttendanceRules,
) -> Option<Contribution> {
    let lines: Vec<_> = report
        .participants
        .iter()
        .filter(|p| &p.participant_id == client && p.role == Role::Client)
        .collect();
    if lines.is_empty() {
        return None;
    }
    let program = report.program.clone();
    let tz = rules.time_zone(program.as_deref());
    let mut days: BTreeMap<Date, (f64, f64)> = BTreeMap::new();
    let mut credited = 0.0;
    for p in &lines {
        credited += p.credited_seconds;
        let audio: Vec<_> = p
            .stays
            .iter()
            .flat_map(|s| &s.stretches)
            .filter(|s| s.modality == crate::Modality::AudioOnly)
            .map(|s| (s.from, s.to))
            .collect();
        for &(from, to) in &p.credited {
            for (date, a, b) in split_days(from, to, &tz) {
                let audio_secs: f64 = audio.iter().map(|&(s, e)| overlap(a, b, s, e)).sum();
                let d = days.entry(date).or_default();
                d.0 += (b - a).as_seconds_f64();
                d.1 += audio_secs;
            }
        }
    }
    Some(Contribution {
        starts_at: report.starts_at.unwrap_or(OffsetDateTime::UNIX_EPOCH),
        age_group: lines.iter().find_map(|p| p.age_group),
        days: days.into_iter().map(|(d, (c, a))| (d, c, a)).collect(),
        rounded_minutes: rules.rounding.minutes(credited),
        program,
    })
}

fn overlap(a: OffsetDateTime, b: OffsetDateTime, s: OffsetDateTime, e: OffsetDateTime) -> f64 {
    let (lo, hi) = (a.max(s), b.min(e));
    if hi > lo {
        (hi - lo).as_seconds_f64()
    } else {
        0.0
    }
}

/// Cuts `[from, to)` at local midnights.
fn split_days(
    from: OffsetDateTime,
    to: OffsetDateTime,
    tz: &TimeZone,
) -> Vec<(Date, OffsetDateTime, OffsetDateTime)> {
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let date = local_date(start, tz);
        let next = local_midnight(date.tomorrow().unwrap_or(date), tz);
        let end = if next > start { next.min(to) } else { to };
        out.push((date, start, end));
        start = end;
    }
    out
}

fn local_date(t: OffsetDateTime, tz: &TimeZone) -> Date {
    let ts = Timestamp::from_nanosecond(t.unix_timestamp_nanos()).unwrap_or(Timestamp::UNIX_EPOCH);
    ts.to_zoned(tz.clone()).date()
}

/// The first instant of a local date (midnight, or the end of a DST gap at midnight).
fn local_midnight(date: Date, tz: &TimeZone) -> OffsetDateTime {
    let nanos = date
        .to_zoned(tz.clone())
        .map(|z| z.timestamp().as_nanosecond())
        .unwrap_or(0);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A session's contribution and its days inside one week.
type WeekPart<'a> = (&'a Contribution, Vec<&'a (Date, f64, f64)>);

/// The client's week lines from `first` to `last`, statuses in order.
fn weeks_of(
    client: &ParticipantId,
    contributions: &[Contribution],
    rules: &AttendanceRules,
    first: IsoWeek,
    last: IsoWeek,
) -> Vec<WeekLine> {
    let mut sorted: Vec<&Contribution> = contributions.iter().collect();
    sorted.sort_by_key(|c| c.starts_at);
    let age_group = sorted.iter().rev().find_map(|c| c.age_group);
    let last_program = sorted.iter().rev().find_map(|c| c.program.clone());

    let mut lines = Vec::new();
    let mut short_run = 0u32;
    let mut met_before = false;
    let mut week = first;
    while week <= last {
        let in_week: Vec<WeekPart<'_>> = sorted
            .iter()
            .map(|c| {
                (
                    *c,
                    c.days
                        .iter()
                        .filter(|d| IsoWeek::of(d.0) == week)
                        .collect::<Vec<_>>(),
                )
            })
            .filter(|(_, d)| !d.is_empty())
            .collect();

        // The program credited most this week, else the last known.
        let mut by_program: BTreeMap<Option<String>, f64> = BTreeMap::new();
        let mut days: BTreeMap<Date, (f64, f64)> = BTreeMap::new();
        let mut rounded = 0.0;
        for (c, ds) in &in_week {
            rounded += c.rounded_minutes;
            for d in ds {
                *by_program.entry(c.program.clone()).or_default() += d.1;
                let e = days.entry(d.0).or_default();
                e.0 += d.1;
                e.1 += d.2;
            }
        }
        let program = by_program
            .iter()
            .max_by(|a, b| a.1.partial_cmp(b.1).unwrap_or(std::cmp::Ordering::Equal))
            .map(|(p, _)| p.clone())
            .unwrap_or_else(|| last_program.clone());
        let program_rules = rules.program(program.as_deref());
        let floor = program_rules.daily_floor_hours.map(|h| h * 3600.0);

        let days: Vec<DayLine> = days
            .into_iter()
            .filter(|(_, (c, _))| *c > 0.0)
            .map(|(date, (c, a))| DayLine {
                date,
                credited_seconds: c,
                credited_audio_only_seconds: a,
                floor_met: floor.map(|f| c >= f),
            })
            .collect();
        let credited: f64 = days.iter().map(|d| d.credited_seconds).sum();
        let audio: f64 = days.iter().map(|d| d.credited_audio_only_seconds).sum();
        let short_days = days.iter().filter(|d| d.floor_met == Some(false)).count() as u32;
        let required = rules.weekly_seconds(program.as_deref(), age_group);

        let status = if credited >= required && short_days == 0 {
            short_run = 0;
            met_before = true;
            Status::Met
        } else {
            short_run += 1;
            if met_before && short_run <= program_rules.step_down_weeks {
                Status::StepDown
            } else {
                met_before = false;
                Status::Short
            }
        };
        lines.push(WeekLine {
            client_id: client.clone(),
            week,
            level: program_rules.level.clone(),
            program,
            age_group,
            required_seconds: required,
            credited_seconds: credited,
            credited_audio_only_seconds: audio,
            rounded_minutes: rounded,
            sessions: in_week.len() as u32,
            days,
            short_days,
            status,
        });
        week = week.next();
    }
    lines
}

fn date_str<S: serde::Serializer>(d: &Date, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_week_parses_and_prints() {
        let w = IsoWeek::parse("2026-W10").expect("valid");
        assert_eq!(w.to_string(), "2026-W10");
        assert_eq!(w.monday().to_string(), "2026-03-02");
        assert_eq!(w.next().to_string(), "2026-W11");
        assert_eq!(
            IsoWeek::parse("2026-W01")
                .expect("valid")
                .previous()
                .to_string(),
            "2025-W52"
        );
        assert!(IsoWeek::parse("2026-10").is_err());
        assert!(IsoWeek::parse("2026-W54").is_err());
    }

    #[test]
    fn week_with_dst_change_is_167_hours_in_new_york() {
        let tz = TimeZone::get("America/New_York").expect("tz");
        // 2026-03-08 is the second Sunday of March: clocks go forward.
        let (start, end) = IsoWeek::parse("2026-W10").expect("valid").bounds(&tz);
        assert_eq!((end - start).whole_hours(), 167);
    }

    #[test]
    fn span_across_local_midnight_is_cut_in_two_days() {
        let tz = TimeZone::get("America/New_York").expect("tz");
        let from = time::macros::datetime!(2026-03-03 04:30 UTC); // 23:30 local
        let to = time::macros::datetime!(2026-03-03 05:15 UTC); // 00:15 local
        let parts = split_days(from, to, &tz);
        let secs: Vec<(String, i64)> = parts
            .iter()
            .map(|(d, a, b)| (d.to_string(), (*b - *a).whole_seconds()))
            .collect();
        assert_eq!(
            secs,
            [
                ("2026-03-02".to_string(), 1800),
                ("2026-03-03".to_string(), 900)
            ]
        );
    }
}
