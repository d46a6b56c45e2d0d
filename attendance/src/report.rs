//! Report formats: a text table for people, CSV and JSON for other systems.
//!
//! Table and CSV show minutes with two decimals; that is the only rounding, and it happens here.
//! JSON carries raw seconds and unrounded minutes, so a payer's own rounding rule can be applied
//! downstream.

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use crate::{
    ClientWeeksReport, Entry, ParticipantReport, ProgramWeekReport, Rounding, SessionReport,
    WeekLine,
};

/// Output formats of every report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

const CSV_HEADER: [&str; 18] = [
    "session_id",
    "session_kind",
    "program",
    "starts_at",
    "ends_at",
    "participant_id",
    "role",
    "joined_at",
    "left_at",
    "left_reason",
    "connected_minutes",
    "credited_minutes",
    "credited_audio_only_minutes",
    "age_group",
    "stays",
    "end_reasons",
    "rounding",
    "rounded_minutes",
];

impl SessionReport {
    /// A fixed-width table for a terminal, times to the second in UTC.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "session {} ({}), program {}, scheduled {} to {}\n",
            or_dash(self.session_id.as_ref().map(|s| s.to_string())),
            or_dash(self.kind.map(|k| k.as_str().to_owned())),
            or_dash(self.program.clone()),
            or_dash(self.starts_at.map(short_time)),
            or_dash(self.ends_at.map(short_time)),
        );

        let header = [
            "participant",
            "role",
            "joined",
            "left",
            "reason",
            "connected min",
        ];
        let header = header.iter().chain(&["credited min", "audio-only min"]);
        let mut rows = vec![header.map(|h| h.to_string()).collect::<Vec<_>>()];
        rows.extend(self.participants.iter().map(|p| {
            vec![
                p.participant_id.to_string(),
                p.role.as_str().to_owned(),
                or_dash(p.joined_at.map(short_time)),
                or_dash(p.left_at.map(short_time)),
                or_dash(p.left_reason.map(|r| r.as_str().to_owned())),
                minutes(p.connected_seconds),
                minutes(p.credited_seconds),
                minutes(p.credited_audio_only_seconds),
            ]
        }));

        out.push_str(&align(&rows, 5));
        out
    }

    /// One header line and one line per participant, RFC 4180 (CRLF line ends, quoted where
    /// needed). Times are RFC 3339 UTC; empty cells mean "not known".
    pub fn to_csv(&self) -> String {
        self.to_csv_with(Rounding::None)
    }

    /// [`SessionReport::to_csv`] with each participant's credited time also rounded for a
    /// payer.
    pub fn to_csv_with(&self, rounding: Rounding) -> String {
        let mut out = csv_line(CSV_HEADER.iter().map(|h| h.to_string()));

        let session = [
            or_empty(self.session_id.as_ref().map(|s| s.to_string())),
            or_empty(self.kind.map(|k| k.as_str().to_owned())),
            or_empty(self.program.clone()),
            or_empty(self.starts_at.map(rfc3339)),
            or_empty(self.ends_at.map(rfc3339)),
        ];
        for p in &self.participants {
            let cells = [
                p.participant_id.to_string(),
                p.role.as_str().to_owned(),
                or_empty(p.joined_at.map(rfc3339)),
                or_empty(p.left_at.map(rfc3339)),
                or_empty(p.left_reason.map(|r| r.as_str().to_owned())),
                minutes(p.connected_seconds),
                minutes(p.credited_seconds),
                minutes(p.credited_audio_only_seconds),
                or_empty(p.age_group.map(|a| a.as_str().to_owned())),
                p.stays.len().to_string(),
                end_reasons(p),
                rounding.as_str().to_owned(),
                format!("{:.2}", rounding.minutes(p.credited_seconds)),
            ];
            out.push_str(&csv_line(session.iter().cloned().chain(cells)));
        }
        out
    }

    /// The report as JSON; every duration both as raw seconds and as unrounded minutes.
    pub fn to_json(&self) -> Value {
        self.to_json_with(Rounding::None)
    }

    /// [`SessionReport::to_json`] with each participant's credited time also rounded.
    pub fn to_json_with(&self, rounding: Rounding) -> Value {
        json!({
            "rounding": rounding.as_str(),
            "session_id": self.session_id,
            "kind": self.kind,
            "program": self.program,
            "starts_at": self.starts_at.map(rfc3339),
            "ends_at": self.ends_at.map(rfc3339),
            "participants": self
                .participants
                .iter()
                .map(|p| participant_json(p, rounding))
                .collect::<Vec<_>>(),
        })
    }
}

fn end_reasons(p: &ParticipantReport) -> String {
    p.stays
        .iter()
        .map(|s| s.end_reason.map_or("open", |r| r.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn participant_json(p: &ParticipantReport, rounding: Rounding) -> Value {
    let stays: Vec<Value> = p
        .stays
        .iter()
        .map(|s| {
            json!({
                "started_at": rfc3339(s.started_at),
                "ended_at": rfc3339(s.ended_at),
                "end_reason": s.end_reason,
                "connected_seconds": s.connected_seconds,
                "credited_seconds": s.credited_seconds,
                "stretches": s.stretches.iter().map(|t| json!({
                    "from": rfc3339(t.from),
                    "to": rfc3339(t.to),
                    "modality": t.modality,
                    "credited_seconds": t.credited_seconds,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let amendments: Vec<Value> = p
        .amendments
        .iter()
        .map(|a| {
            json!({
                "seq": a.seq,
                "at": rfc3339(a.at),
                "author": a.author,
                "reason": a.reason,
                "correction": a.correction,
            })
        })
        .collect();
    json!({
        "age_group": p.age_group,
        "stays": stays,
        "amendments": amendments,
        "credited_video_seconds": p.credited_seconds - p.credited_audio_only_seconds,
        "rounded_minutes": rounding.minutes(p.credited_seconds),
        "participant_id": p.participant_id,
        "role": p.role,
        "joined_at": p.joined_at.map(rfc3339),
        "left_at": p.left_at.map(rfc3339),
        "left_reason": p.left_reason,
        "connected_seconds": p.connected_seconds,
        "connected_minutes": p.connected_seconds / 60.0,
        "credited_seconds": p.credited_seconds,
        "credited_minutes": p.credited_seconds / 60.0,
        "credited_audio_only_seconds": p.credited_audio_only_seconds,
        "credited_audio_only_minutes": p.credited_audio_only_seconds / 60.0,
    })
}

impl ClientWeeksReport {
    pub fn to_json(&self) -> Value {
        json!({
            "client_id": self.client_id,
            "from": self.from,
            "to": self.to,
            "weeks": self.weeks.iter().map(week_json).collect::<Vec<_>>(),
        })
    }

    /// One line per week (days are in the JSON form).
    pub fn to_csv(&self) -> String {
        weeks_csv(&self.weeks)
    }

    pub fn to_table(&self) -> String {
        format!(
            "client {}, weeks {} to {}\n{}",
            self.client_id,
            self.from,
            self.to,
            weeks_table(&self.weeks)
        )
    }
}

impl ProgramWeekReport {
    pub fn to_json(&self) -> Value {
        json!({
            "program": self.program,
            "week": self.week,
            "time_zone": self.time_zone,
            "clients": self.clients.iter().map(week_json).collect::<Vec<_>>(),
        })
    }

    /// One line per client, short ones first.
    pub fn to_csv(&self) -> String {
        weeks_csv(&self.clients)
    }

    pub fn to_table(&self) -> String {
        format!(
            "program {}, week {} ({})\n{}",
            self.program,
            self.week,
            self.time_zone,
            weeks_table(&self.clients)
        )
    }
}

fn week_json(w: &WeekLine) -> Value {
    let mut v = serde_json::to_value(w).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("credited_hours".into(), json!(w.credited_seconds / 3600.0));
        m.insert("required_hours".into(), json!(w.required_seconds / 3600.0));
    }
    v
}

const WEEK_HEADER: [&str; 13] = [
    "client_id",
    "week",
    "program",
    "level",
    "age_group",
    "required_hours",
    "credited_hours",
    "credited_audio_only_hours",
    "rounded_hours",
    "sessions",
    "service_days",
    "short_days",
    "status",
];

fn week_cells(w: &WeekLine) -> Vec<String> {
    vec![
        w.client_id.to_string(),
        w.week.to_string(),
        or_empty(w.program.clone()),
        w.level.clone(),
        or_empty(w.age_group.map(|a| a.as_str().to_owned())),
        hours(w.required_seconds),
        hours(w.credited_seconds),
        hours(w.credited_audio_only_seconds),
        format!("{:.2}", w.rounded_minutes / 60.0),
        w.sessions.to_string(),
        w.days.len().to_string(),
        w.short_days.to_string(),
        w.status.as_str().to_owned(),
    ]
}

fn weeks_csv(weeks: &[WeekLine]) -> String {
    let mut out = csv_line(WEEK_HEADER.iter().map(|h| h.to_string()));
    for w in weeks {
        out.push_str(&csv_line(week_cells(w).into_iter()));
    }
    out
}

fn weeks_table(weeks: &[WeekLine]) -> String {
    let mut rows = vec![WEEK_HEADER
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()];
    rows.extend(weeks.iter().map(week_cells));
    align(&rows, 5)
}

fn hours(seconds: f64) -> String {
    format!("{:.2}", seconds / 3600.0)
}

/// Every entry as JSON lines' worth of objects: seq, hashes, the event.
pub fn entries_json(entries: &[Entry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
            .collect(),
    )
}

/// Every entry as CSV: the stored columns, times in RFC 3339 UTC.
pub fn entries_csv(entries: &[Entry]) -> String {
    let header = [
        "seq",
        "session_id",
        "participant_id",
        "role",
        "kind_json",
        "at",
        "recorded_at",
        "prev_hash",
        "hash",
    ];
    let mut out = csv_line(header.iter().map(|h| h.to_string()));
    for e in entries {
        out.push_str(&csv_line(
            [
                e.seq.to_string(),
                e.event.session_id.to_string(),
                or_empty(e.event.participant_id.as_ref().map(|p| p.to_string())),
                or_empty(e.event.role.map(|r| r.as_str().to_owned())),
                serde_json::to_string(&e.event.kind).unwrap_or_default(),
                rfc3339(e.event.at),
                rfc3339(e.recorded_at),
                e.prev_hash.clone(),
                e.hash.clone(),
            ]
            .into_iter(),
        ));
    }
    out
}

fn minutes(seconds: f64) -> String {
    format!("{:.2}", seconds / 60.0)
}

fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    // Only years outside 0 to 9999 fail, and the ledger stores nothing outside 1677 to 2262.
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn short_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    t.format(&format).unwrap_or_else(|_| t.to_string())
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".to_owned())
}

fn or_empty(v: Option<String>) -> String {
    v.unwrap_or_default()
}

/// Pads columns to equal width; columns from `first_number` on are right-aligned.
fn align(rows: &[Vec<String>], first_number: usize) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let width = |c: usize| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns).map(width).collect();

    let mut out = String::new();
    for row in rows {
        let cells = row.iter().zip(&widths).enumerate().map(|(c, (cell, w))| {
            if c >= first_number {
                format!("{cell:>w$}")
            } else {
                format!("{cell:<w$}")
            }
        });
        out.push_str(cells.collect::<Vec<_>>().join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn csv_line(cells: impl Iterator<Item = String>) -> String {
    let mut line = cells.map(|c| csv_cell(&c)).collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
}

/// Quotes a cell that holds a comma, quote or line break. Ids cannot (their alphabet is
/// `A-Z a-z 0-9 - _ . :`), but a program name from a token can.
fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
    use time::macros::datetime;

    use super::*;
    use crate::LeaveReason;

    fn report() -> SessionReport {
        SessionReport {
            session_id: Some(SessionId::parse("sess-001").expect("valid test id")),
            kind: Some(SessionKind::Group),
            program: Some("iop, adult".into()),
            starts_at: Some(datetime!(2026-03-02 09:00 UTC)),
            ends_at: Some(datetime!(2026-03-02 10:00 UTC)),
            participants: vec![ParticipantReport {
                participant_id: ParticipantId::parse("p-7f3a").expect("valid test id"),
                role: Role::Client,
                joined_at: Some(datetime!(2026-03-02 09:01:02.5 UTC)),
                left_at: Some(datetime!(2026-03-02 09:58 UTC)),
                left_reason: Some(LeaveReason::Left),
                connected_seconds: 3000.0,
                credited_seconds: 2_745.6,
                credited_audio_only_seconds: 0.0,
                age_group: None,
                stays: Vec::new(),
                credited: Vec::new(),
                amendments: Vec::new(),
            }],
        }
    }

    #[test]
    fn table_shows_minutes_with_two_decimals() {
        let table = report().to_table();

        assert!(table.contains("sess-001 (group)"), "{table}");
        assert!(table.contains("2026-03-02 09:01:02Z"), "{table}");
        assert!(table.contains("50.00"), "{table}");
        assert!(table.contains("45.76"), "{table}");
        assert!(!table.contains("45.760"), "{table}");
    }

    #[test]
    fn csv_has_header_and_one_row_per_participant() {
        let csv = report().to_csv();
        let lines: Vec<&str> = csv.split_terminator("\r\n").collect();

        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("session_id,session_kind,program,"));
        assert_eq!(
            lines[1],
            "sess-001,group,\"iop, adult\",2026-03-02T09:00:00Z,2026-03-02T10:00:00Z,p-7f3a,\
             client,2026-03-02T09:01:02.5Z,2026-03-02T09:58:00Z,left,50.00,45.76,0.00,,0,,none,\
             45.76"
        );
    }

    #[test]
    fn json_carries_raw_seconds_and_minutes() {
        let json = report().to_json();
        let p = &json["participants"][0];

        assert_eq!(json["session_id"], "sess-001");
        assert_eq!(p["credited_seconds"], 2_745.6);
        assert!((p["credited_minutes"].as_f64().expect("number") - 45.76).abs() < 1e-9);
        assert_eq!(p["left_reason"], "left");
        assert_eq!(p["joined_at"], "2026-03-02T09:01:02.5Z");
    }
}
