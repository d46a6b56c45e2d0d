//! The SQLite backend: one file, WAL journal, `synchronous=FULL`, so a committed append
//! survives a power loss.
//!
//! Times are INTEGER nanoseconds rather than RFC 3339 text because one instant then has
//! exactly one stored form, which keeps the hash input canonical. Tables are STRICT, and
//! triggers refuse UPDATE and DELETE on the two chained tables, so only someone who drops them
//! first can edit the ledger; `verify` shows where they did.

use std::path::Path;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use tracing::debug;

use super::{
    link, read_cells, IndexChange, IndexDump, IndexedSession, Linked, NewEntry, OpenStay,
    ReadsDump, RecoveryClaim, StayChange, Store, StoredRead, StoredRow,
};
use crate::chain::{entry_hash, Cell, GENESIS_HASH};
use crate::{EventKind, LedgerError};

/// The schema this code writes, kept in SQLite's `user_version`. Version 1 had only the
/// entries and the head; opening one adds the rest and fills the lookup tables. Version 2
/// had no `stay_nodes`; opening one adds it (empty: stays opened before are recovered by
/// session, as version 2 did).
const SCHEMA_VERSION: i64 = 3;

/// How long a call waits for another connection's write lock (a verify run from the command
/// line, say) before it fails with [`LedgerError::Storage`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
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

const SCHEMA_V2: &str = "
CREATE TABLE session_index (
    session_id TEXT PRIMARY KEY,
    program    TEXT,
    starts_at  INTEGER NOT NULL,
    ends_at    INTEGER NOT NULL,
    node_id    TEXT,
    open       INTEGER NOT NULL
) STRICT;
CREATE INDEX session_index_by_program ON session_index (program, starts_at);
CREATE INDEX session_index_open ON session_index (open) WHERE open = 1;
CREATE TABLE session_participants (
    participant_id TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    PRIMARY KEY (participant_id, session_id)
) STRICT, WITHOUT ROWID;
CREATE TABLE node_heartbeats (
    node_id TEXT PRIMARY KEY,
    at      INTEGER NOT NULL
) STRICT;
CREATE TABLE audit_reads (
    seq        INTEGER PRIMARY KEY,
    auditor_id TEXT NOT NULL,
    what       TEXT NOT NULL,
    at         INTEGER NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
) STRICT;
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
) STRICT;
CREATE TRIGGER audit_reads_no_update BEFORE UPDATE ON audit_reads
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_reads_no_delete BEFORE DELETE ON audit_reads
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

const SCHEMA_V3: &str = "
CREATE TABLE stay_nodes (
    session_id     TEXT NOT NULL,
    participant_id TEXT NOT NULL,
    role           TEXT NOT NULL,
    node_id        TEXT NOT NULL,
    admitted_at    INTEGER NOT NULL,
    open           INTEGER NOT NULL,
    PRIMARY KEY (session_id, participant_id, role, node_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX stay_nodes_open ON stay_nodes (node_id, session_id) WHERE open = 1;
";

const SELECT_ENTRY: &str = "SELECT seq, session_id, participant_id, role, kind_json, at, \
                            recorded_at, prev_hash, hash FROM ledger_entries";

const SELECT_SESSION: &str =
    "SELECT s.session_id, s.program, s.starts_at, s.ends_at, s.node_id, s.open \
     FROM session_index s";

/// The ledger in one SQLite file (or in memory, for tests and tools).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens the file, creating it and its schema if needed.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let conn = Connection::open(path)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        debug!(journal_mode = %mode, "attendance ledger opened");
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Self, LedgerError> {
        Self::init(Connection::open_in_memory()?)
    }

    /// The connection, for tests that inspect pragmas or tamper with rows.
    #[doc(hidden)]
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn init(conn: Connection) -> Result<Self, LedgerError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "FULL")?;

        let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let mut store = SqliteStore { conn };
        match found {
            // Schema and version in one transaction, so a crash cannot leave a half schema.
            0 => store.conn.execute_batch(&format!(
                "BEGIN; {SCHEMA_V1} {SCHEMA_V2} {SCHEMA_V3} \
                 PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?,
            1 | 2 => store.upgrade_from(found)?,
            SCHEMA_VERSION => {}
            found => {
                return Err(LedgerError::UnsupportedSchema {
                    found,
                    expected: SCHEMA_VERSION,
                })
            }
        }
        Ok(store)
    }

    /// From version 1: adds the version 2 tables and fills the lookup tables from the
    /// entries. From version 1 or 2: adds `stay_nodes`. One transaction.
    fn upgrade_from(&mut self, found: i64) -> Result<(), LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if found < 2 {
            Self::fill_v2(&tx)?;
        }
        tx.execute_batch(SCHEMA_V3)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        debug!(
            from = found,
            version = SCHEMA_VERSION,
            "attendance ledger schema upgraded"
        );
        Ok(())
    }

    /// Adds the version 2 tables and fills the lookup tables from the entries.
    fn fill_v2(tx: &Transaction<'_>) -> Result<(), LedgerError> {
        tx.execute_batch(SCHEMA_V2)?;
        let rows: Vec<(String, Option<String>, String)> = {
            let mut stmt = tx.prepare(
                "SELECT session_id, participant_id, kind_json FROM ledger_entries ORDER BY seq",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (session, participant, kind_json) in rows {
            // A row that does not parse is left to `verify` to report.
            if let Ok(kind) = serde_json::from_str::<EventKind>(&kind_json) {
                let change = IndexChange::of(&kind, participant.as_deref());
                apply_index(tx, &session, &change, None)?;
            }
        }
        Ok(())
    }

    fn query_sessions(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<IndexedSession>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |r| {
            Ok(IndexedSession {
                session_id: r.get(0)?,
                program: r.get(1)?,
                starts_at: r.get(2)?,
                ends_at: r.get(3)?,
                node_id: r.get(4)?,
                open: r.get::<_, i64>(5)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn apply_index(
    tx: &Transaction<'_>,
    session: &str,
    change: &IndexChange,
    node: Option<&str>,
) -> Result<(), LedgerError> {
    match change {
        IndexChange::None => {}
        // The first opening fixes program and window (as the counting rules do); a reopening
        // after a restart only marks the session open again and names the node now running it.
        IndexChange::Opened {
            program,
            starts_at,
            ends_at,
        } => {
            tx.prepare_cached(
                "INSERT INTO session_index (session_id, program, starts_at, ends_at, node_id, \
                 open) VALUES (?1, ?2, ?3, ?4, ?5, 1) ON CONFLICT (session_id) DO UPDATE SET \
                 open = 1, node_id = coalesce(excluded.node_id, node_id)",
            )?
            .execute(params![session, program, starts_at, ends_at, node])?;
        }
        IndexChange::Ended => {
            tx.prepare_cached("UPDATE session_index SET open = 0 WHERE session_id = ?1")?
                .execute([session])?;
        }
        IndexChange::Participant(p) => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO session_participants (participant_id, session_id) \
                 VALUES (?1, ?2)",
            )?
            .execute([p, session])?;
        }
    }
    Ok(())
}

/// Records in `stay_nodes` what an entry appended by `node` changes.
fn apply_stay(
    tx: &Transaction<'_>,
    session: &str,
    change: &StayChange,
    node: &str,
    at: i64,
) -> Result<(), LedgerError> {
    match change {
        StayChange::None => {}
        StayChange::Admitted { participant, role } => {
            tx.prepare_cached(
                "INSERT INTO stay_nodes (session_id, participant_id, role, node_id, \
                 admitted_at, open) VALUES (?1, ?2, ?3, ?4, ?5, 1) ON CONFLICT \
                 (session_id, participant_id, role, node_id) DO UPDATE SET \
                 admitted_at = excluded.admitted_at, open = 1",
            )?
            .execute(params![session, participant, role, node, at])?;
        }
        StayChange::Left { participant, role } => {
            tx.prepare_cached(
                "UPDATE stay_nodes SET open = 0 WHERE session_id = ?1 AND participant_id = ?2 \
                 AND role = ?3 AND node_id = ?4 AND open = 1",
            )?
            .execute(params![session, participant, role, node])?;
        }
        StayChange::SessionEnded => {
            tx.prepare_cached(
                "UPDATE stay_nodes SET open = 0 WHERE session_id = ?1 AND node_id = ?2 \
                 AND open = 1",
            )?
            .execute(params![session, node])?;
        }
    }
    Ok(())
}

/// Links and inserts the entries, applies their lookup changes (and, when the appending node
/// is named, their `stay_nodes` changes) and moves the head record, inside `tx`.
fn write_entries(
    tx: &Transaction<'_>,
    rows: &[NewEntry],
    node: Option<&str>,
) -> Result<Vec<(i64, String, String)>, LedgerError> {
    // The head record is the authority, so that appending after deleted newest entries
    // leaves a visible gap; the last row is the fallback if the head itself was removed.
    let head = |sql: &str| {
        tx.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    };
    let head = match head("SELECT seq, hash FROM ledger_head WHERE id = 1")? {
        Some(h) => Some(h),
        None => head("SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1")?,
    };
    let linked = link(head.unwrap_or((0, GENESIS_HASH.to_owned())), rows);

    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO ledger_entries (seq, session_id, participant_id, role, kind_json, \
             at, recorded_at, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for (row, (seq, prev, hash)) in rows.iter().zip(&linked) {
            insert.execute(params![
                seq,
                row.session_id,
                row.participant_id,
                row.role,
                row.kind_json,
                row.at,
                row.recorded_at,
                prev,
                hash
            ])?;
            apply_index(tx, &row.session_id, &row.index, node)?;
            if let Some(node) = node {
                apply_stay(tx, &row.session_id, &row.stay, node, row.at)?;
            }
        }
    }
    if let Some((seq, _, hash)) = linked.last() {
        tx.execute(
            "INSERT INTO ledger_head (id, seq, hash) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            params![seq, hash],
        )?;
    }
    Ok(linked)
}

fn cell(v: ValueRef<'_>) -> Cell {
    match v {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(i) => Cell::Integer(i),
        ValueRef::Real(f) => Cell::Real(f),
        ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
    }
}

fn stored_row(row: &Row<'_>) -> rusqlite::Result<StoredRow> {
    let mut cells: [Cell; 8] = Default::default();
    for (i, c) in cells.iter_mut().enumerate() {
        *c = cell(row.get_ref(i)?);
    }
    Ok(StoredRow {
        cells,
        hash: cell(row.get_ref(8)?),
    })
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn append(
        &mut self,
        rows: &[NewEntry],
        node: Option<&str>,
    ) -> Result<Vec<(i64, String, String)>, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let linked = write_entries(&tx, rows, node)?;
        tx.commit()?;
        Ok(linked)
    }

    fn session_rows(&mut self, session_id: &str) -> Result<Vec<StoredRow>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{SELECT_ENTRY} WHERE session_id = ?1 ORDER BY seq"
        ))?;
        let rows = stmt.query_map([session_id], stored_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn sessions_rows(&mut self, session_ids: &[String]) -> Result<Vec<StoredRow>, LedgerError> {
        let mut out = Vec::new();
        for s in session_ids {
            out.extend(self.session_rows(s)?);
        }
        out.sort_by_key(|r| r.cells[0].as_integer());
        Ok(out)
    }

    fn scan(
        &mut self,
        visit: &mut dyn FnMut(StoredRow) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let mut stmt = self.conn.prepare(&format!("{SELECT_ENTRY} ORDER BY seq"))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            visit(stored_row(row)?)?;
        }
        Ok(())
    }

    fn head(&mut self) -> Result<Option<(i64, String)>, LedgerError> {
        Ok(self
            .conn
            .query_row("SELECT seq, hash FROM ledger_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    fn count(&mut self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    fn sessions_starting(
        &mut self,
        program: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<IndexedSession>, LedgerError> {
        match program {
            Some(p) => self.query_sessions(
                &format!(
                    "{SELECT_SESSION} WHERE s.program = ?1 AND s.starts_at >= ?2 \
                     AND s.starts_at < ?3 ORDER BY s.starts_at, s.session_id"
                ),
                params![p, from, to],
            ),
            None => self.query_sessions(
                &format!(
                    "{SELECT_SESSION} WHERE s.starts_at >= ?1 AND s.starts_at < ?2 \
                     ORDER BY s.starts_at, s.session_id"
                ),
                params![from, to],
            ),
        }
    }

    fn participant_sessions(
        &mut self,
        participant_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<IndexedSession>, LedgerError> {
        self.query_sessions(
            &format!(
                "{SELECT_SESSION} JOIN session_participants p ON p.session_id = s.session_id \
                 WHERE p.participant_id = ?1 AND s.starts_at >= ?2 AND s.starts_at < ?3 \
                 ORDER BY s.starts_at, s.session_id"
            ),
            params![participant_id, from, to],
        )
    }

    fn index_dump(&mut self) -> Result<IndexDump, LedgerError> {
        let sessions = self.query_sessions(&format!("{SELECT_SESSION} ORDER BY 1"), [])?;
        let mut stmt = self
            .conn
            .prepare("SELECT session_id, participant_id FROM session_participants ORDER BY 1, 2")?;
        let pairs = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((sessions, pairs.collect::<Result<_, _>>()?))
    }

    fn open_sessions(&mut self, node: &str) -> Result<Vec<String>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT session_id FROM session_index WHERE open = 1 \
             AND (node_id = ?1 OR node_id IS NULL) ORDER BY session_id",
        )?;
        let rows = stmt.query_map([node], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mark_closed(&mut self, session_id: &str) -> Result<(), LedgerError> {
        self.conn.execute(
            "UPDATE session_index SET open = 0 WHERE session_id = ?1",
            [session_id],
        )?;
        Ok(())
    }

    fn open_stays(&mut self, node: &str) -> Result<Vec<OpenStay>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT session_id, participant_id, role, admitted_at FROM stay_nodes \
             WHERE node_id = ?1 AND open = 1 ORDER BY session_id, participant_id, role",
        )?;
        let rows = stmt.query_map([node], |r| {
            Ok(OpenStay {
                session_id: r.get(0)?,
                participant_id: r.get(1)?,
                role: r.get(2)?,
                admitted_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn nodes_with_open_stays(&mut self) -> Result<Vec<(String, Option<i64>)>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.node_id, h.at FROM (SELECT DISTINCT node_id FROM stay_nodes \
             WHERE open = 1) s LEFT JOIN node_heartbeats h ON h.node_id = s.node_id \
             ORDER BY s.node_id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn attributed_stays(&mut self, session_id: &str) -> Result<Vec<(String, String)>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT participant_id, role FROM stay_nodes WHERE session_id = ?1 \
             ORDER BY 1, 2",
        )?;
        let rows = stmt.query_map([session_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn append_recovery(
        &mut self,
        claim: &RecoveryClaim<'_>,
        rows: &[NewEntry],
    ) -> Result<Option<Vec<Linked>>, LedgerError> {
        // Dropping the transaction without commit rolls it back.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let heartbeat: Option<i64> = tx
            .query_row(
                "SELECT at FROM node_heartbeats WHERE node_id = ?1",
                [claim.node],
                |r| r.get(0),
            )
            .optional()?;
        if heartbeat != claim.heartbeat {
            return Ok(None);
        }
        for stay in claim.stays {
            let admitted: Option<i64> = tx
                .prepare_cached(
                    "SELECT admitted_at FROM stay_nodes WHERE session_id = ?1 \
                     AND participant_id = ?2 AND role = ?3 AND node_id = ?4 AND open = 1",
                )?
                .query_row(
                    params![stay.session_id, stay.participant_id, stay.role, claim.node],
                    |r| r.get(0),
                )
                .optional()?;
            if admitted != Some(stay.admitted_at) {
                return Ok(None);
            }
        }
        // The entries change nothing in `stay_nodes` by themselves (no node named); the
        // claimed stays are closed below, and only those.
        let linked = write_entries(&tx, rows, None)?;
        for stay in claim.stays {
            tx.prepare_cached(
                "UPDATE stay_nodes SET open = 0 WHERE session_id = ?1 AND participant_id = ?2 \
                 AND role = ?3 AND node_id = ?4",
            )?
            .execute(params![
                stay.session_id,
                stay.participant_id,
                stay.role,
                claim.node
            ])?;
        }
        tx.commit()?;
        Ok(Some(linked))
    }

    fn put_heartbeat(&mut self, node: &str, at: i64) -> Result<(), LedgerError> {
        self.conn
            .prepare_cached(
                "INSERT INTO node_heartbeats (node_id, at) VALUES (?1, ?2) \
                 ON CONFLICT (node_id) DO UPDATE SET at = max(at, excluded.at)",
            )?
            .execute(params![node, at])?;
        Ok(())
    }

    fn heartbeat(&mut self, node: &str) -> Result<Option<i64>, LedgerError> {
        Ok(self
            .conn
            .query_row(
                "SELECT at FROM node_heartbeats WHERE node_id = ?1",
                [node],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn append_read(&mut self, auditor: &str, what: &str, at: i64) -> Result<i64, LedgerError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (last, prev): (i64, String) = tx
            .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .unwrap_or((0, GENESIS_HASH.to_owned()));
        let seq = last + 1;
        let hash = entry_hash(&prev, &read_cells(seq, auditor, what, at, &prev));
        tx.execute(
            "INSERT INTO audit_reads (seq, auditor_id, what, at, prev_hash, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![seq, auditor, what, at, prev, hash],
        )?;
        tx.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            params![seq, hash],
        )?;
        tx.commit()?;
        Ok(seq)
    }

    fn reads(&mut self) -> Result<ReadsDump, LedgerError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, auditor_id, what, at, prev_hash, hash FROM audit_reads ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredRead {
                cells: [
                    cell(r.get_ref(0)?),
                    cell(r.get_ref(1)?),
                    cell(r.get_ref(2)?),
                    cell(r.get_ref(3)?),
                    cell(r.get_ref(4)?),
                ],
                hash: cell(r.get_ref(5)?),
            })
        })?;
        let reads = rows.collect::<Result<_, _>>()?;
        let head = self
            .conn
            .query_row("SELECT seq, hash FROM audit_head WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok((reads, head))
    }
}
