//! The ledger on SQLite: append, read a session back, verify the hash chain.
//!
//! One table holds the entries:
//!
//! | column | stored as |
//! |---|---|
//! | `seq` | INTEGER, 1, 2, 3, ... without gaps |
//! | `session_id`, `participant_id`, `role` | TEXT; the last two NULL for session events |
//! | `kind_json` | TEXT, the [`EventKind`] as JSON |
//! | `at`, `recorded_at` | INTEGER, nanoseconds since the Unix epoch, UTC |
//! | `prev_hash`, `hash` | TEXT, 64 lowercase hex characters |
//!
//! Times are integers rather than RFC 3339 text because one instant then has exactly one
//! stored form, which keeps the hash input canonical and lets SQLite sort by time.
//!
//! `hash` covers every other column and the previous entry's hash (see [`crate::chain`]).
//! A one-row table `ledger_head` holds the last `seq` and `hash`, written in the same
//! transaction as the entry, so that deleting the newest entries is also caught. Triggers refuse
//! UPDATE and DELETE on entries, so only someone who drops them first can edit the ledger, and
//! [`Ledger::verify`] shows where they did.
//!
//! Limitation: anyone who can write the file can drop the triggers, rewrite rows and recompute
//! every hash after them; the chain alone cannot show that. Record the `last_hash` of a
//! [`VerifyReport`] somewhere else (a report, a ticket) and compare it later to catch it.

use std::path::Path;
use std::time::Duration;

use haven_ids::{ParticipantId, Role, SessionId};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use time::OffsetDateTime;
use tracing::{debug, trace};

use crate::chain::{entry_hash, GENESIS_HASH};
use crate::event::{from_unix_nanos, unix_nanos};
use crate::{Entry, Event, EventKind, LedgerError};

/// The schema this code writes, kept in SQLite's `user_version`.
const SCHEMA_VERSION: i64 = 1;

/// How long a call waits for another connection's write lock (a verify run from the command
/// line, say) before it fails with [`LedgerError::Storage`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE ledger_entries (
    seq            INTEGER PRIMARY KEY,
    session_id     TEXT NOT NULL,
    participant_id TEXT,
    role           TEXT,
    kind_json      TEXT NOT NULL,
    at             INTEGER NOT NULL,
    recorded_at    INTEGER NOT NULL,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
) STRICT;
CREATE INDEX ledger_entries_by_session ON ledger_entries (session_id, seq);
CREATE TABLE ledger_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
) STRICT;
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'attendance ledger entries are append-only'); END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'attendance ledger entries are append-only'); END;
";

/// Columns in hashing order, then `hash`.
const SELECT_ENTRY: &str = "SELECT seq, session_id, participant_id, role, kind_json, at, \
                            recorded_at, prev_hash, hash FROM ledger_entries";

/// The append-only attendance ledger. Owns one SQLite connection; every call is synchronous.
/// Servers use it through a [`LedgerHandle`](crate::LedgerHandle).
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
}

/// The result of walking the whole hash chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries stored.
    pub entries: u64,
    /// The first place where the chain is broken, in `seq` order; `None` if it is intact.
    pub first_bad: Option<BadEntry>,
    /// The hash of the newest entry, `None` for an empty ledger. Keep it outside the ledger to
    /// detect a later rewrite of the whole chain.
    pub last_hash: Option<String>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Where the chain breaks and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadEntry {
    /// The entry that was changed, or that is missing.
    pub seq: u64,
    pub problem: String,
}

impl Ledger {
    /// Opens the ledger file, creating it and its schema if needed.
    ///
    /// The journal is WAL with `synchronous=FULL`: a committed append survives a power loss.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let conn = Connection::open(path)?;

        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        debug!(journal_mode = %mode, "attendance ledger opened");
        Self::init(conn)
    }

    /// A ledger that lives only as long as this value; for tests and tools.
    pub fn open_in_memory() -> Result<Self, LedgerError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, LedgerError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "FULL")?;

        let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        match found {
            0 => {
                // Schema and version in one transaction, so a crash cannot leave a half schema.
                conn.execute_batch(&format!(
                    "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))?;
                debug!(version = SCHEMA_VERSION, "attendance ledger schema created");
            }
            SCHEMA_VERSION => {}
            found => {
                return Err(LedgerError::UnsupportedSchema {
                    found,
                    expected: SCHEMA_VERSION,
                })
            }
        }
        Ok(Ledger { conn })
    }

    /// Writes one event. When this returns `Ok` the entry is committed and durable.
    ///
    /// Reading the previous hash and inserting happen in one IMMEDIATE transaction, so two
    /// writers can never link to the same entry and a crash leaves either the whole entry or
    /// none of it.
    pub fn append(&mut self, event: Event) -> Result<Entry, LedgerError> {
        let event = event.checked()?;
        let kind_json =
            serde_json::to_string(&event.kind).map_err(|_| LedgerError::InvalidEvent {
                reason: "event cannot be encoded",
            })?;
        let recorded_at = OffsetDateTime::now_utc();

        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (last_seq, prev_hash) = chain_head(&tx)?;
        let seq = last_seq + 1;

        // `checked` guarantees both times fit; `now` fits until 2262.
        let at = unix_nanos(event.at).unwrap_or_default();
        let recorded = unix_nanos(recorded_at).unwrap_or_default();
        let columns = [
            Value::Integer(seq),
            Value::Text(event.session_id.as_str().to_owned()),
            event
                .participant_id
                .as_ref()
                .map_or(Value::Null, |p| Value::Text(p.to_string())),
            event
                .role
                .map_or(Value::Null, |r| Value::Text(r.as_str().to_owned())),
            Value::Text(kind_json),
            Value::Integer(at),
            Value::Integer(recorded),
            Value::Text(prev_hash.clone()),
        ];
        let hash = entry_hash(&prev_hash, &columns.each_ref().map(ValueRef::from));

        let [c0, c1, c2, c3, c4, c5, c6, c7] = columns;
        tx.execute(
            "INSERT INTO ledger_entries (seq, session_id, participant_id, role, kind_json, at, \
             recorded_at, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![c0, c1, c2, c3, c4, c5, c6, c7, hash],
        )?;
        tx.execute(
            "INSERT INTO ledger_head (id, seq, hash) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            params![seq, hash],
        )?;
        tx.commit()?;

        let kind = kind_name(&event.kind);
        debug!(seq, session_id = %event.session_id, kind, "attendance entry appended");
        // seq starts at 1 and only grows, so it is never negative.
        let seq = u64::try_from(seq).unwrap_or_default();
        Ok(Entry {
            seq,
            event,
            recorded_at,
            prev_hash,
            hash,
        })
    }

    /// Every entry of one session, in ledger order.
    ///
    /// Each row's own hash is checked on the way out, so a report is never built from a row
    /// that was edited; such a row fails the call with [`LedgerError::Corrupt`]. (The links
    /// between rows are for [`Ledger::verify`]: a session's rows are not contiguous.)
    pub fn session_events(&self, session: &SessionId) -> Result<Vec<Entry>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{SELECT_ENTRY} WHERE session_id = ?1 ORDER BY seq"
        ))?;
        let mut rows = stmt.query([session.as_str()])?;

        let mut entries = Vec::new();
        while let Some(row) = rows.next()? {
            let (seq, columns) = hashed_columns(row)?;
            let seq = u64::try_from(seq).map_err(|_| LedgerError::Corrupt {
                seq: 0,
                problem: format!("negative seq {seq}"),
            })?;
            let prev_hash = text(&columns[7]);
            if entry_hash(&prev_hash, &columns) != text(&row.get_ref(8)?) {
                return Err(LedgerError::Corrupt {
                    seq,
                    problem: "hash does not match".into(),
                });
            }
            entries.push(entry_from_row(seq, row)?);
        }
        trace!(session_id = %session, entries = entries.len(), "attendance session read");
        Ok(entries)
    }

    /// Walks the whole chain: recomputes every hash, checks every `prev_hash` link, checks that
    /// `seq` runs 1, 2, 3, ... and that the last entry is the one the head table recorded.
    ///
    /// Any change to any stored column, a deleted entry or two swapped entries shows up as
    /// `first_bad`. Reports the first problem only; fix or explain it, then run again.
    pub fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let mut stmt = self.conn.prepare(&format!("{SELECT_ENTRY} ORDER BY seq"))?;
        let mut rows = stmt.query([])?;

        let mut entries = 0u64;
        let mut prev_hash = GENESIS_HASH.to_owned();
        let mut first_bad = None;
        while let Some(row) = rows.next()? {
            entries += 1;
            if first_bad.is_none() {
                first_bad = check_link(row, entries, &prev_hash)?;
            }
            prev_hash = text(&row.get_ref(8)?);
        }

        let last_hash = (entries > 0).then(|| prev_hash.clone());
        if first_bad.is_none() {
            first_bad = self.check_head(entries, last_hash.as_deref())?;
        }
        debug!(
            entries,
            intact = first_bad.is_none(),
            "attendance ledger verified"
        );
        Ok(VerifyReport {
            entries,
            first_bad,
            last_hash,
        })
    }

    /// Number of entries stored.
    pub fn count(&self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// Compares the end of an intact chain with the head table, which catches deleted newest
    /// entries that the links alone cannot show.
    fn check_head(
        &self,
        entries: u64,
        last_hash: Option<&str>,
    ) -> Result<Option<BadEntry>, LedgerError> {
        let head: Option<(i64, String)> = self
            .conn
            .query_row("SELECT seq, hash FROM ledger_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;

        let bad = |seq, problem: String| Ok(Some(BadEntry { seq, problem }));
        match (head, last_hash) {
            (None, None) => Ok(None),
            (None, Some(_)) => bad(entries, "the ledger head record is missing".into()),
            (Some((seq, _)), _) if u64::try_from(seq).ok() != Some(entries) => {
                // The chain up to `entries` is intact, so the missing one is the next.
                bad(
                    entries + 1,
                    format!("entry is missing: the ledger head records {seq} entries"),
                )
            }
            (Some((_, hash)), Some(last)) if hash != last => bad(
                entries,
                "entry does not match the hash in the ledger head".into(),
            ),
            _ => Ok(None),
        }
    }
}

/// The seq and hash to link the next entry to. The head table is the authority, so that
/// appending after deleted newest entries leaves a visible gap; the last row is the fallback
/// if the head record itself was removed.
fn chain_head(conn: &Connection) -> Result<(i64, String), LedgerError> {
    let head = |sql: &str| {
        conn.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    };

    if let Some(h) = head("SELECT seq, hash FROM ledger_head WHERE id = 1")? {
        return Ok(h);
    }
    let last = head("SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1")?;
    Ok(last.unwrap_or((0, GENESIS_HASH.to_owned())))
}

/// Checks one row against the previous entry's hash, given the seq it must have.
fn check_link(
    row: &Row<'_>,
    expected: u64,
    prev_hash: &str,
) -> Result<Option<BadEntry>, LedgerError> {
    let (seq, columns) = hashed_columns(row)?;
    let stored_hash = text(&row.get_ref(8)?);
    let bad = |seq, problem: &str| {
        Ok(Some(BadEntry {
            seq,
            problem: problem.to_owned(),
        }))
    };

    let seq = u64::try_from(seq).unwrap_or(0);
    if seq < expected {
        return bad(
            expected,
            &format!("an entry has seq {seq} where {expected} belongs"),
        );
    }
    if seq != expected {
        // A gap means `expected` was deleted or renumbered; say which seq is absent.
        return bad(
            expected,
            &format!("entry is missing (the next stored entry is {seq})"),
        );
    }
    if text(&columns[7]) != prev_hash {
        return bad(seq, "prev_hash does not match the previous entry's hash");
    }
    if entry_hash(prev_hash, &columns) != stored_hash {
        return bad(seq, "hash does not match the entry's columns");
    }
    Ok(None)
}

/// The seq and the eight hashed columns of a row, as SQLite stores them.
///
/// `seq` is an INTEGER PRIMARY KEY, so SQLite keeps it an integer; only tampering makes it
/// zero or negative, which callers report.
fn hashed_columns<'r>(row: &'r Row<'_>) -> Result<(i64, [ValueRef<'r>; 8]), LedgerError> {
    let mut columns = [ValueRef::Null; 8];
    for (i, c) in columns.iter_mut().enumerate() {
        *c = row.get_ref(i)?;
    }
    Ok((row.get(0)?, columns))
}

/// Text of a column, lossy for non-UTF-8 so a tampered value compares unequal instead of failing.
fn text(v: &ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

/// Parses a row whose hash was already checked.
fn entry_from_row(seq: u64, row: &Row<'_>) -> Result<Entry, LedgerError> {
    let corrupt = |problem: &str| LedgerError::Corrupt {
        seq,
        problem: problem.to_owned(),
    };

    let session_id =
        SessionId::parse(&row.get::<_, String>(1)?).map_err(|_| corrupt("session_id"))?;
    let participant_id = match row.get::<_, Option<String>>(2)? {
        Some(p) => Some(ParticipantId::parse(&p).map_err(|_| corrupt("participant_id"))?),
        None => None,
    };
    let role = match row.get::<_, Option<String>>(3)? {
        Some(r) => Some(Role::parse(&r).ok_or_else(|| corrupt("role"))?),
        None => None,
    };
    let kind: EventKind =
        serde_json::from_str(&row.get::<_, String>(4)?).map_err(|_| corrupt("kind_json"))?;

    let at = from_unix_nanos(row.get(5)?).ok_or_else(|| corrupt("at"))?;
    let recorded_at = from_unix_nanos(row.get(6)?).ok_or_else(|| corrupt("recorded_at"))?;
    let event = Event {
        session_id,
        participant_id,
        role,
        kind,
        at,
    };
    Ok(Entry {
        seq,
        event,
        recorded_at,
        prev_hash: row.get(7)?,
        hash: row.get(8)?,
    })
}

/// A short name of the event kind for log fields.
fn kind_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::SessionOpened { .. } => "session_opened",
        EventKind::Admitted => "admitted",
        EventKind::MediaConnected => "media_connected",
        EventKind::MediaLost => "media_lost",
        EventKind::MediaRestored => "media_restored",
        EventKind::ModalityChanged { .. } => "modality_changed",
        EventKind::Left { .. } => "left",
        EventKind::SessionEnded => "session_ended",
    }
}

#[cfg(test)]
mod tests {
    use haven_ids::SessionKind;
    use time::macros::datetime;

    use super::*;
    use crate::LeaveReason;

    fn sid() -> SessionId {
        SessionId::parse("sess-001").expect("valid test id")
    }

    fn client_event(kind: EventKind, at: OffsetDateTime) -> Event {
        let pid = ParticipantId::parse("p-7f3a").expect("valid test id");
        Event::participant(sid(), pid, Role::Client, kind, at)
    }

    /// Three entries: session opened, client admitted, client media connected.
    fn three_entries(ledger: &mut Ledger) -> Vec<Entry> {
        let opened = EventKind::SessionOpened {
            kind: SessionKind::Group,
            starts_at: datetime!(2026-03-02 09:00 UTC),
            ends_at: datetime!(2026-03-02 10:00 UTC),
            program: Some("iop-adult".into()),
        };
        let events = [
            Event::session(sid(), opened, datetime!(2026-03-02 08:55 UTC)),
            client_event(EventKind::Admitted, datetime!(2026-03-02 09:00:01.25 UTC)),
            client_event(
                EventKind::MediaConnected,
                datetime!(2026-03-02 09:00:02.000000007 UTC),
            ),
        ];
        events
            .into_iter()
            .map(|e| ledger.append(e).expect("append"))
            .collect()
    }

    /// A ledger file with three entries, and the temp dir that keeps it alive.
    fn ledger_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.sqlite");
        three_entries(&mut Ledger::open(&path).expect("open"));
        (dir, path)
    }

    /// Changes the file behind Haven's back, as someone with write access could: drop the
    /// append-only triggers, then run `sql`.
    fn tamper(path: &Path, sql: &str) {
        let conn = Connection::open(path).expect("second connection");
        conn.execute_batch(
            "DROP TRIGGER ledger_entries_no_update; DROP TRIGGER ledger_entries_no_delete;",
        )
        .expect("drop triggers");
        conn.execute_batch(sql).expect("tamper");
    }

    fn first_bad(path: &Path) -> Option<u64> {
        let report = Ledger::open(path)
            .expect("open")
            .verify()
            .expect("verify runs");
        report.first_bad.map(|b| b.seq)
    }

    #[test]
    fn each_entry_links_to_the_one_before() {
        let mut ledger = Ledger::open_in_memory().expect("open");
        let entries = three_entries(&mut ledger);

        assert_eq!(entries[0].prev_hash, GENESIS_HASH);
        assert_eq!(entries[1].prev_hash, entries[0].hash);
        assert_eq!(entries[2].prev_hash, entries[1].hash);
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);

        let report = ledger.verify().expect("verify runs");
        assert_eq!(report.entries, 3);
        assert_eq!(report.first_bad, None);
        assert_eq!(report.last_hash.as_deref(), Some(entries[2].hash.as_str()));
    }

    #[test]
    fn entries_read_back_exactly_as_appended() {
        let mut ledger = Ledger::open_in_memory().expect("open");
        let written = three_entries(&mut ledger);

        let read = ledger.session_events(&sid()).expect("read");
        assert_eq!(read, written);
    }

    #[test]
    fn refused_event_writes_nothing() {
        let mut ledger = Ledger::open_in_memory().expect("open");
        let mut e = client_event(EventKind::Admitted, datetime!(2026-03-02 09:00 UTC));
        e.participant_id = None;

        assert!(ledger.append(e).is_err());
        assert_eq!(ledger.count().expect("count"), 0);
    }

    #[test]
    fn empty_ledger_verifies() {
        let report = Ledger::open_in_memory()
            .expect("open")
            .verify()
            .expect("verify runs");

        assert_eq!(
            report,
            VerifyReport {
                entries: 0,
                first_bad: None,
                last_hash: None
            }
        );
    }

    #[test]
    fn reopened_ledger_still_verifies_and_continues_the_chain() {
        let (_dir, path) = ledger_file();

        let mut ledger = Ledger::open(&path).expect("reopen");
        assert_eq!(ledger.count().expect("count"), 3);
        let left = EventKind::Left {
            reason: LeaveReason::Left,
        };
        let fourth = ledger
            .append(client_event(left, datetime!(2026-03-02 10:00 UTC)))
            .expect("append");
        drop(ledger);

        let ledger = Ledger::open(&path).expect("reopen again");
        let report = ledger.verify().expect("verify runs");
        assert_eq!(fourth.seq, 4);
        assert_eq!(report.entries, 4);
        assert!(report.is_intact(), "{report:?}");
    }

    #[test]
    fn change_to_any_column_is_named_by_verify() {
        let changes = [
            "UPDATE ledger_entries SET session_id = 'sess-002' WHERE seq = 2",
            "UPDATE ledger_entries SET participant_id = 'p-0000' WHERE seq = 2",
            "UPDATE ledger_entries SET role = 'therapist' WHERE seq = 2",
            "UPDATE ledger_entries SET kind_json = '{\"type\":\"media_lost\"}' WHERE seq = 2",
            "UPDATE ledger_entries SET at = at - 60000000000 WHERE seq = 2",
            "UPDATE ledger_entries SET recorded_at = recorded_at + 1 WHERE seq = 2",
            "UPDATE ledger_entries SET prev_hash = hash WHERE seq = 2",
            "UPDATE ledger_entries SET hash = prev_hash WHERE seq = 2",
            "UPDATE ledger_entries SET seq = 7 WHERE seq = 2",
        ];
        for sql in changes {
            let (_dir, path) = ledger_file();
            assert_eq!(first_bad(&path), None, "intact before: {sql}");

            tamper(&path, sql);
            assert_eq!(first_bad(&path), Some(2), "not caught: {sql}");
        }
    }

    #[test]
    fn deleted_entry_is_named_by_verify() {
        let (_dir, path) = ledger_file();

        tamper(&path, "DELETE FROM ledger_entries WHERE seq = 2");

        let report = Ledger::open(&path)
            .expect("open")
            .verify()
            .expect("verify runs");
        let bad = report.first_bad.expect("deletion caught");
        assert_eq!(bad.seq, 2);
        assert!(bad.problem.contains("missing"), "{}", bad.problem);
    }

    #[test]
    fn entry_renumbered_below_one_is_reported_not_an_error() {
        let (_dir, path) = ledger_file();

        tamper(&path, "UPDATE ledger_entries SET seq = -2 WHERE seq = 2");
        assert_eq!(first_bad(&path), Some(1));
    }

    #[test]
    fn deleted_newest_entry_is_caught_by_the_head_record() {
        let (_dir, path) = ledger_file();

        tamper(&path, "DELETE FROM ledger_entries WHERE seq = 3");
        assert_eq!(first_bad(&path), Some(3));
    }

    #[test]
    fn append_after_deleted_newest_entry_keeps_the_gap_visible() {
        let (_dir, path) = ledger_file();
        tamper(&path, "DELETE FROM ledger_entries WHERE seq = 3");

        let mut ledger = Ledger::open(&path).expect("open");
        let next = ledger.append(client_event(
            EventKind::MediaLost,
            datetime!(2026-03-02 09:30 UTC),
        ));
        assert_eq!(next.expect("append").seq, 4);
        assert_eq!(first_bad(&path), Some(3));
    }

    #[test]
    fn swapped_entries_are_caught() {
        let (_dir, path) = ledger_file();

        // Swap every column but seq between entries 2 and 3.
        tamper(
            &path,
            "UPDATE ledger_entries SET seq = -2 WHERE seq = 2;
             UPDATE ledger_entries SET seq = 2 WHERE seq = 3;
             UPDATE ledger_entries SET seq = 3 WHERE seq = -2;",
        );
        assert_eq!(first_bad(&path), Some(2));
    }

    #[test]
    fn removed_head_record_is_caught() {
        let (_dir, path) = ledger_file();

        tamper(&path, "DELETE FROM ledger_head");
        assert_eq!(first_bad(&path), Some(3));
    }

    #[test]
    fn updates_and_deletes_are_refused_while_triggers_stand() {
        let (_dir, path) = ledger_file();
        let conn = Connection::open(&path).expect("second connection");

        assert!(conn
            .execute("UPDATE ledger_entries SET role = 'therapist'", [])
            .is_err());
        assert!(conn.execute("DELETE FROM ledger_entries", []).is_err());
        assert_eq!(first_bad(&path), None);
    }

    #[test]
    fn reading_an_edited_entry_fails_instead_of_returning_it() {
        let (_dir, path) = ledger_file();
        tamper(
            &path,
            "UPDATE ledger_entries SET at = at - 600000000000 WHERE seq = 2",
        );

        let err = Ledger::open(&path)
            .expect("open")
            .session_events(&sid())
            .expect_err("refused");
        assert!(
            matches!(err, LedgerError::Corrupt { seq: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn ledger_of_unknown_schema_version_is_refused() {
        let (_dir, path) = ledger_file();
        tamper(&path, "PRAGMA user_version = 99");

        let err = Ledger::open(&path).expect_err("refused");
        assert_eq!(err.code(), "ledger_schema");
    }

    #[test]
    fn ledger_file_uses_wal_and_full_sync() {
        let (_dir, path) = ledger_file();
        let ledger = Ledger::open(&path).expect("open");

        let mode: String = ledger
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("pragma");
        let sync: i64 = ledger
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("pragma");
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "FULL");
    }
}
