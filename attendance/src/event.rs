//! What the ledger records: events as the server reports them, and entries as stored.

use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, UtcOffset};

use crate::LedgerError;

/// Why a participant's stay ended. The ledger stores it with the [`EventKind::Left`] event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LeaveReason {
    /// The participant hung up.
    Left,
    /// The connection dropped and the participant did not come back within the grace period.
    ConnectionLost,
    /// A therapist removed the participant.
    Removed,
    /// A therapist ended the session for everyone.
    SessionEnded,
    /// The node shut down (drain or restart).
    ServerShutdown,
    /// A therapist denied entry from the waiting room.
    Denied,
    /// The scheduling system revoked the participant's token.
    TokenRevoked,
    /// A sponsor's stay ends when the client they accompany leaves.
    SponsoredClientLeft,
    /// The node that ran the session stopped without closing the stay (a crash or kill);
    /// at its next start-up the ledger closed the stay at the node's last heartbeat.
    NodeRecovered,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Left => "left",
            LeaveReason::ConnectionLost => "connection_lost",
            LeaveReason::Removed => "removed",
            LeaveReason::SessionEnded => "session_ended",
            LeaveReason::ServerShutdown => "server_shutdown",
            LeaveReason::Denied => "denied",
            LeaveReason::TokenRevoked => "token_revoked",
            LeaveReason::SponsoredClientLeft => "sponsored_client_left",
            LeaveReason::NodeRecovered => "node_recovered",
        }
    }
}

/// How a participant takes part. Payers treat audio-only telehealth differently from video,
/// so reports show the audio-only share of credited time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Video,
    AudioOnly,
}

impl Modality {
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Video => "video",
            Modality::AudioOnly => "audio_only",
        }
    }
}

/// What happened. Stored as JSON (`{"type": "media_lost"}`) in the `kind_json` column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// The room for a scheduled session opened. Carries the window that credited time is
    /// clipped to; a session without one credits no client time.
    SessionOpened {
        kind: SessionKind,
        #[serde(with = "time::serde::rfc3339")]
        starts_at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        ends_at: OffsetDateTime,
        program: Option<String>,
    },
    /// The participant left the waiting room and entered the room. Waiting time never counts.
    Admitted,
    /// The first media packet from this participant arrived.
    MediaConnected,
    /// Media stopped. `at` is the time of the last packet received, which can be earlier than
    /// the moment the loss was noticed and recorded.
    MediaLost,
    /// Media flows again after [`EventKind::MediaLost`].
    MediaRestored,
    /// The participant switched between video and audio only.
    ModalityChanged { modality: Modality },
    /// The participant's stay ended.
    Left { reason: LeaveReason },
    /// The session ended for everyone; every open stay ends here.
    SessionEnded,
    /// The client's age group, which picks the weekly requirement. The server records it for
    /// each client right after [`EventKind::Admitted`], from the join token.
    AgeGroupRecorded { age_group: AgeGroup },
    /// A correction by a person, applied by reports on top of the recorded events; nothing
    /// recorded before it changes. `at` is when the amendment was made.
    Amended(Amendment),
}

/// Which weekly requirement applies to a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgeGroup {
    Adult,
    Adolescent,
}

impl AgeGroup {
    pub fn as_str(self) -> &'static str {
        match self {
            AgeGroup::Adult => "adult",
            AgeGroup::Adolescent => "adolescent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "adult" => Some(AgeGroup::Adult),
            "adolescent" => Some(AgeGroup::Adolescent),
            _ => None,
        }
    }
}

/// Who made an amendment or read a report: a staff member's pseudonymous id, with the same
/// alphabet as participant ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StaffId(String);

impl StaffId {
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        // Same rules as participant ids, so a staff id can never smuggle a name or a newline.
        ParticipantId::parse(s)
            .map(|_| StaffId(s.to_owned()))
            .map_err(|_| LedgerError::InvalidEvent {
                reason: "a staff id is 1 to 128 characters of A-Z a-z 0-9 - _ . :",
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StaffId {
    type Error = LedgerError;
    fn try_from(s: String) -> Result<Self, LedgerError> {
        StaffId::parse(&s)
    }
}

impl From<StaffId> for String {
    fn from(s: StaffId) -> String {
        s.0
    }
}

impl std::fmt::Display for StaffId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A correction of one participant's attendance in one session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amendment {
    pub author: StaffId,
    /// Why; shown in every report the amendment changes.
    pub reason: String,
    pub correction: Correction,
}

/// What an amendment corrects. Every correction names times or entries, never totals, so the
/// counting rules still decide what is credited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Correction {
    /// The participant's media flowed in `[from, to)` although the ledger does not show it
    /// (an outage documented elsewhere). Credited like recorded media: it still needs a
    /// therapist and the window.
    AddPresence {
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        to: OffsetDateTime,
    },
    /// The participant was not really there in `[from, to)` (a camera left running in an
    /// empty room); that time is removed before crediting.
    RemovePresence {
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        to: OffsetDateTime,
    },
    /// The entry with this `seq` in the same session was recorded in error; reports ignore it.
    VoidEntry { seq: u64 },
    /// The client's age group was recorded wrongly (or not at all).
    SetAgeGroup { age_group: AgeGroup },
}

impl EventKind {
    /// Session events describe the whole session and carry no participant.
    pub fn is_session_event(&self) -> bool {
        matches!(
            self,
            EventKind::SessionOpened { .. } | EventKind::SessionEnded
        )
    }
}

/// One thing that happened in a session, as the server reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub session_id: SessionId,
    /// Set for participant events, `None` for session events.
    pub participant_id: Option<ParticipantId>,
    /// Set for participant events, `None` for session events.
    pub role: Option<Role>,
    pub kind: EventKind,
    /// When it happened, server clock. Stored in UTC; any other offset is converted on append.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl Event {
    /// An event about one participant.
    pub fn participant(
        session_id: SessionId,
        participant_id: ParticipantId,
        role: Role,
        kind: EventKind,
        at: OffsetDateTime,
    ) -> Self {
        Event {
            session_id,
            participant_id: Some(participant_id),
            role: Some(role),
            kind,
            at,
        }
    }

    /// An event about the whole session: [`EventKind::SessionOpened`] or
    /// [`EventKind::SessionEnded`].
    pub fn session(session_id: SessionId, kind: EventKind, at: OffsetDateTime) -> Self {
        Event {
            session_id,
            participant_id: None,
            role: None,
            kind,
            at,
        }
    }

    /// Checks that the event makes sense on its own and converts its times to UTC.
    ///
    /// Only stateless checks: an event that is odd in sequence (a `MediaLost` with no media
    /// before it) is still recorded, because losing a real event in a race between tasks is
    /// worse than storing one that the counting rules ignore.
    pub(crate) fn checked(mut self) -> Result<Self, LedgerError> {
        let refuse = |reason| Err(LedgerError::InvalidEvent { reason });

        let has_participant = self.participant_id.is_some() || self.role.is_some();
        let full_participant = self.participant_id.is_some() && self.role.is_some();
        if self.kind.is_session_event() && has_participant {
            return refuse("a session event carries no participant id or role");
        }
        if !self.kind.is_session_event() && !full_participant {
            return refuse("a participant event needs both a participant id and a role");
        }

        self.at = to_utc(self.at)?;
        if let EventKind::Amended(a) = &mut self.kind {
            if a.reason.trim().is_empty() || a.reason.len() > 2000 {
                return refuse("an amendment needs a reason of 1 to 2000 bytes");
            }
            if let Correction::AddPresence { from, to } | Correction::RemovePresence { from, to } =
                &mut a.correction
            {
                *from = to_utc(*from)?;
                *to = to_utc(*to)?;
                if *to <= *from {
                    return refuse("a corrected interval must end after it starts");
                }
            }
        }
        if let EventKind::SessionOpened {
            starts_at, ends_at, ..
        } = &mut self.kind
        {
            *starts_at = to_utc(*starts_at)?;
            *ends_at = to_utc(*ends_at)?;
            if *ends_at <= *starts_at {
                return refuse("a session window must end after it starts");
            }
        }
        Ok(self)
    }
}

/// An event as stored in the ledger, with its place in the hash chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the ledger, from 1, without gaps.
    pub seq: u64,
    pub event: Event,
    /// When the ledger wrote the entry (server clock, UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    /// Hex SHA-256 of the entry before; 64 zeros for the first entry.
    pub prev_hash: String,
    /// Hex SHA-256 of this entry; see [`crate::ledger`] for what it covers.
    pub hash: String,
}

/// Converts to UTC and checks the instant fits the stored form (unix nanoseconds in an i64:
/// years 1677 to 2262).
fn to_utc(t: OffsetDateTime) -> Result<OffsetDateTime, LedgerError> {
    let t = t.to_offset(UtcOffset::UTC);
    match unix_nanos(t) {
        Some(_) => Ok(t),
        None => Err(LedgerError::InvalidEvent {
            reason: "a time is outside 1677 to 2262",
        }),
    }
}

/// The stored form of a time: nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos(t: OffsetDateTime) -> Option<i64> {
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

/// Reads a stored time back, in UTC.
pub(crate) fn from_unix_nanos(nanos: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos)).ok()
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn sess() -> SessionId {
        SessionId::parse("sess-001").expect("valid test id")
    }

    fn pid() -> ParticipantId {
        ParticipantId::parse("p-7f3a").expect("valid test id")
    }

    #[test]
    fn participant_event_without_role_is_refused() {
        let mut e = Event::participant(
            sess(),
            pid(),
            Role::Client,
            EventKind::Admitted,
            datetime!(2026-03-02 09:00 UTC),
        );
        e.role = None;

        let err = e.checked().expect_err("missing role must be refused");
        assert_eq!(err.code(), "ledger_invalid_event");
    }

    #[test]
    fn session_event_with_participant_is_refused() {
        let mut e = Event::session(
            sess(),
            EventKind::SessionEnded,
            datetime!(2026-03-02 10:00 UTC),
        );
        e.participant_id = Some(pid());

        assert!(e.checked().is_err());
    }

    #[test]
    fn session_window_that_ends_before_it_starts_is_refused() {
        let kind = EventKind::SessionOpened {
            kind: SessionKind::Group,
            starts_at: datetime!(2026-03-02 10:00 UTC),
            ends_at: datetime!(2026-03-02 09:00 UTC),
            program: None,
        };
        let e = Event::session(sess(), kind, datetime!(2026-03-02 08:55 UTC));

        assert!(e.checked().is_err());
    }

    #[test]
    fn times_are_converted_to_utc() {
        let e = Event::participant(
            sess(),
            pid(),
            Role::Client,
            EventKind::Admitted,
            datetime!(2026-03-02 04:00:00.5 -5),
        );

        let e = e.checked().expect("valid event");
        assert_eq!(e.at.offset(), UtcOffset::UTC);
        assert_eq!(e.at, datetime!(2026-03-02 09:00:00.5 UTC));
    }

    #[test]
    fn times_outside_the_stored_range_are_refused() {
        let e = Event::participant(
            sess(),
            pid(),
            Role::Client,
            EventKind::Admitted,
            datetime!(2300-01-01 00:00 UTC),
        );

        assert!(e.checked().is_err());
    }

    #[test]
    fn kind_json_uses_snake_case_tags_and_keeps_nanoseconds() {
        let kind = EventKind::SessionOpened {
            kind: SessionKind::Family,
            starts_at: datetime!(2026-03-02 09:00:00.123456789 UTC),
            ends_at: datetime!(2026-03-02 10:00 UTC),
            program: Some("iop-adult".into()),
        };

        let json = serde_json::to_string(&kind).expect("serializable");
        assert!(json.contains(r#""type":"session_opened""#), "{json}");
        assert!(json.contains("09:00:00.123456789Z"), "{json}");
        let back: EventKind = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, kind);

        let left = EventKind::Left {
            reason: LeaveReason::ConnectionLost,
        };
        let json = serde_json::to_string(&left).expect("serializable");
        assert_eq!(json, r#"{"type":"left","reason":"connection_lost"}"#);
    }

    #[test]
    fn leave_reason_names_match_serde() {
        for r in [
            LeaveReason::Left,
            LeaveReason::ConnectionLost,
            LeaveReason::Removed,
            LeaveReason::SessionEnded,
            LeaveReason::ServerShutdown,
            LeaveReason::Denied,
            LeaveReason::NodeRecovered,
        ] {
            let json = serde_json::to_string(&r).expect("serializable");
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }
}
