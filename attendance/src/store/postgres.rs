//! The PostgreSQL backend, for several nodes sharing one ledger.
//!
//! Same tables and columns as SQLite (`BIGINT` for integers), so the same rows hash alike.
//! Appends take an EXCLUSIVE lock on `ledger_head` for the length of their transaction, so
//! the chain stays a single line even with many writers; commits wait for the WAL flush
//! (`synchronous_commit` is forced on for the session), so an append is durable when it
//! returns. Row triggers refuse UPDATE and DELETE and a statement trigger refuses TRUNCATE on
//! the chained tables.
//!
//! The synchronous `postgres` client is used because the ledger already runs on a thread of
//! its own; there is nothing to gain from an async driver there.

use postgres::{Client, NoTls, Row};
use tracing::debug;

use super::{
    link, read_cells, IndexChange, IndexDump, IndexedSession, Linked, NewEntry, OpenStay,
    ReadsDump, RecoveryClaim, StayChange, Store, StoredRead, StoredRow,
};
use crate::chain::{entry_hash, Cell, GENESIS_HASH};
use crate::LedgerError;

/// The schema this code writes, kept in `haven_schema`. Version 2 had no `stay_nodes`;
/// connecting to one adds it (empty: stays opened before are recovered by session, as
/// version 2 did).
const SCHEMA_VERSION: i32 = 3;

/// Serializes schema creation between nodes that start at the same time.
const SCHEMA_LOCK: i64 = 0x6861_7665_6e00_0001;

const SCHEMA: &str = "
CREATE TABLE ledger_entries (
    seq            BIGINT PRIMARY KEY,
    session_id     TEXT NOT NULL,
    participant_id TEXT,
    role           TEXT,
    kind_json      TEXT NOT NULL,
    at             BIGINT NOT NULL,
    recorded_at    BIGINT NOT NULL,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);
CREATE INDEX ledger_entries_by_session ON ledger_entries (session_id, seq);
CREATE TABLE ledger_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE session_index (
    session_id TEXT PRIMARY KEY,
    program    TEXT,
    starts_at  BIGINT NOT NULL,
    ends_at    BIGINT NOT NULL,
    node_id    TEXT,
    open       BOOLEAN NOT NULL
);
CREATE INDEX session_index_by_program ON session_index (program, starts_at);
CREATE INDEX session_index_open ON session_index (open) WHERE open;
CREATE TABLE session_participants (
    participant_id TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    PRIMARY KEY (participant_id, session_id)
);
CREATE TABLE node_heartbeats (
    node_id TEXT PRIMARY KEY,
    at      BIGINT NOT NULL
);
CREATE TABLE audit_reads (
    seq        BIGINT PRIMARY KEY,
    auditor_id TEXT NOT NULL,
    what       TEXT NOT NULL,
    at         BIGINT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
CREATE FUNCTION haven_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'attendance ledger tables are append-only'; END $$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION haven_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION haven_append_only();
CREATE TRIGGER audit_reads_append_only BEFORE UPDATE OR DELETE ON audit_reads
    FOR EACH ROW EXECUTE FUNCTION haven_append_only();
CREATE TRIGGER audit_reads_no_truncate BEFORE TRUNCATE ON audit_reads
    FOR EACH STATEMENT EXECUTE FUNCTION haven_append_only();
CREATE TABLE haven_schema (version INTEGER NOT NULL);
";

const SCHEMA_V3: &str = "
CREATE TABLE stay_nodes (
    session_id     TEXT NOT NULL,
    participant_id TEXT NOT NULL,
    role           TEXT NOT NULL,
    node_id        TEXT NOT NULL,
    admitted_at    BIGINT NOT NULL,
    open           BOOLEAN NOT NULL,
    PRIMARY KEY (session_id, participant_id, role, node_id)
);
CREATE INDEX stay_nodes_open ON stay_nodes (node_id, session_id) WHERE open;
";

const SELECT_ENTRY: &str = "SELECT seq, session_id, participant_id, role, kind_json, at, \
                            recorded_at, prev_hash, hash FROM ledger_entries";

const SELECT_SESSION: &str =
    "SELECT s.session_id, s.program, s.starts_at, s.ends_at, s.node_id, s.open \
     FROM session_index s";

/// The ledger in a PostgreSQL database.
pub struct PostgresStore {
    client: Client,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may hold a password; never print it.
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects and creates the schema if the database has none.
    pub fn connect(url: &str) -> Result<Self, LedgerError> {
        Self::connect_in_schema(url, None)
    }

    /// Connects with `search_path` set to `schema` (created if missing), so that tests and
    /// several ledgers can share one database.
    pub fn connect_in_schema(url: &str, schema: Option<&str>) -> Result<Self, LedgerError> {
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute("SET synchronous_commit = on")?;
        if let Some(schema) = schema {
            if !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(LedgerError::Location(
                    "a schema name uses only A-Z a-z 0-9 _".into(),
                ));
            }
            client.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
            ))?;
        }

        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        let exists: bool = tx
            .query_one("SELECT to_regclass('haven_schema') IS NOT NULL", &[])?
            .get(0);
        if exists {
            let found: i32 = tx
                .query_one("SELECT version FROM haven_schema", &[])?
                .get(0);
            if found == 2 {
                tx.batch_execute(SCHEMA_V3)?;
                tx.execute("UPDATE haven_schema SET version = $1", &[&SCHEMA_VERSION])?;
                debug!(
                    from = found,
                    version = SCHEMA_VERSION,
                    "attendance ledger schema upgraded"
                );
            } else if found != SCHEMA_VERSION {
                return Err(LedgerError::UnsupportedSchema {
                    found: found.into(),
                    expected: SCHEMA_VERSION.into(),
                });
            }
        } else {
            tx.batch_execute(SCHEMA)?;
            tx.batch_execute(SCHEMA_V3)?;
            tx.execute(
                "INSERT INTO haven_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )?;
            debug!(version = SCHEMA_VERSION, "attendance ledger schema created");
        }
        tx.commit()?;
        Ok(PostgresStore { client })
    }

    /// The client, for tests that tamper with rows.
    #[doc(hidden)]
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    fn query_sessions(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<IndexedSession>, LedgerError> {
        let rows = self.client.query(sql, params)?;
        Ok(rows
            .iter()
            .map(|r| IndexedSession {
                session_id: r.get(0),
                program: r.get(1),
                starts_at: r.get(2),
                ends_at: r.get(3),
                node_id: r.get(4),
                open: r.get(5),
            })
            .collect())
    }
}

fn stored_row(r: &Row) -> StoredRow {
    StoredRow {
        cells: [
            Cell::Integer(r.get(0)),
            Cell::Text(r.get(1)),
            Cell::opt_text(r.get::<_, Option<String>>(2)),
            Cell::opt_text(r.get::<_, Option<String>>(3)),
            Cell::Text(r.get(4)),
            Cell::Integer(r.get(5)),
            Cell::Integer(r.get(6)),
            Cell::Text(r.get(7)),
        ],
        hash: Cell::Text(r.get(8)),
    }
}

fn apply_index(
    tx: &mut postgres::Transaction<'_>,
    session: &str,
    change: &IndexChange,
    node: Option<&str>,
) -> Result<(), LedgerError> {
    match change {
        IndexChange::None => {}
        IndexChange::Opened {
            program,
            starts_at,
            ends_at,
        } => {
            tx.execute(
                "INSERT INTO session_index (session_id, program, starts_at, ends_at, node_id, \
                 open) VALUES ($1, $2, $3, $4, $5, true) ON CONFLICT (session_id) DO UPDATE \
                 SET open = true, node_id = coalesce(excluded.node_id, session_index.node_id)",
                &[&session, program, starts_at, ends_at, &node],
            )?;
        }
        IndexChange::Ended => {
            tx.execute(
                "UPDATE session_index SET open = false WHERE session_id = $1",
                &[&session],
            )?;
        }
        IndexChange::Participant(p) => {
            tx.execute(
                "INSERT INTO session_participants (participant_id, session_id) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[p, &session],
            )?;
        }
    }
    Ok(())
}

/// Records in `stay_nodes` what an entry appended by `node` changes.
fn apply_stay(
    tx: &mut postgres::Transaction<'_>,
    session: &str,
    change: &StayChange,
    node: &str,
    at: i64,
) -> Result<(), LedgerError> {
    match change {
        StayChange::None => {}
        StayChange::Admitted { participant, role } => {
            tx.execute(
                "INSERT INTO stay_nodes (session_id, participant_id, role, node_id, \
                 admitted_at, open) VALUES ($1, $2, $3, $4, $5, true) ON CONFLICT \
                 (session_id, participant_id, role, node_id) DO UPDATE SET \
                 admitted_at = excluded.admitted_at, open = true",
                &[&session, participant, role, &node, &at],
            )?;
        }
        StayChange::Left { participant, role } => {
            tx.execute(
                "UPDATE stay_nodes SET open = false WHERE session_id = $1 \
                 AND participant_id = $2 AND role = $3 AND node_id = $4 AND open",
                &[&session, participant, role, &node],
            )?;
        }
        StayChange::SessionEnded => {
            tx.execute(
                "UPDATE stay_nodes SET open = false WHERE session_id = $1 AND node_id = $2 \
                 AND open",
                &[&session, &node],
            )?;
        }
    }
    Ok(())
}

/// Links and inserts the entries, applies their lookup changes (and, when the appending node
/// is named, their `stay_nodes` changes) and moves the head record, inside `tx`, which
/// holds the lock on `ledger_head`.
fn write_entries(
    tx: &mut postgres::Transaction<'_>,
    rows: &[NewEntry],
    node: Option<&str>,
) -> Result<Vec<(i64, String, String)>, LedgerError> {
    // As on SQLite: the head record first, the last row if the head was removed.
    let head = match head_of(tx, "ledger_head")? {
        Some(h) => Some(h),
        None => tx
            .query_opt(
                "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1",
                &[],
            )?
            .map(|r| (r.get(0), r.get(1))),
    };
    let linked = link(head.unwrap_or((0, GENESIS_HASH.to_owned())), rows);

    let insert = tx.prepare(
        "INSERT INTO ledger_entries (seq, session_id, participant_id, role, kind_json, at, \
         recorded_at, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )?;
    for (row, (seq, prev, hash)) in rows.iter().zip(&linked) {
        tx.execute(
            &insert,
            &[
                seq,
                &row.session_id,
                &row.participant_id,
                &row.role,
                &row.kind_json,
                &row.at,
                &row.recorded_at,
                prev,
                hash,
            ],
        )?;
        apply_index(tx, &row.session_id, &row.index, node)?;
        if let Some(node) = node {
            apply_stay(tx, &row.session_id, &row.stay, node, row.at)?;
        }
    }
    if let Some((seq, _, hash)) = linked.last() {
        tx.execute(
            "INSERT INTO ledger_head (id, seq, hash) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            &[seq, hash],
        )?;
    }
    Ok(linked)
}

fn head_of(
    tx: &mut postgres::Transaction<'_>,
    table: &str,
) -> Result<Option<(i64, String)>, LedgerError> {
    let row = tx.query_opt(&format!("SELECT seq, hash FROM {table} WHERE id = 1"), &[])?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgresql"
    }

    fn append(
        &mut self,
        rows: &[NewEntry],
        node: Option<&str>,
    ) -> Result<Vec<(i64, String, String)>, LedgerError> {
        let mut tx = self.client.transaction()?;
        // Every writer on every node queues here, so each links to the true last entry.
        tx.batch_execute("LOCK TABLE ledger_head IN EXCLUSIVE MODE")?;
        let linked = write_entries(&mut tx, rows, node)?;
        tx.commit()?;
        Ok(linked)
    }

    fn session_rows(&mut self, session_id: &str) -> Result<Vec<StoredRow>, LedgerError> {
        let rows = self.client.query(
            &format!("{SELECT_ENTRY} WHERE session_id = $1 ORDER BY seq"),
            &[&session_id],
        )?;
        Ok(rows.iter().map(stored_row).collect())
    }

    fn sessions_rows(&mut self, session_ids: &[String]) -> Result<Vec<StoredRow>, LedgerError> {
        let rows = self.client.query(
            &format!("{SELECT_ENTRY} WHERE session_id = ANY($1) ORDER BY seq"),
            &[&session_ids],
        )?;
        Ok(rows.iter().map(stored_row).collect())
    }

    fn scan(
        &mut self,
        visit: &mut dyn FnMut(StoredRow) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        // Pages by seq so a large ledger is never held in memory at once.
        let mut after = i64::MIN;
        loop {
            let rows = self.client.query(
                &format!("{SELECT_ENTRY} WHERE seq > $1 ORDER BY seq LIMIT 10000"),
                &[&after],
            )?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = last.get(0);
            for r in &rows {
                visit(stored_row(r))?;
            }
        }
    }

    fn head(&mut self) -> Result<Option<(i64, String)>, LedgerError> {
        let row = self
            .client
            .query_opt("SELECT seq, hash FROM ledger_head WHERE id = 1", &[])?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    fn count(&mut self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .client
            .query_one("SELECT COUNT(*) FROM ledger_entries", &[])?
            .get(0);
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
                    "{SELECT_SESSION} WHERE s.program = $1 AND s.starts_at >= $2 \
                     AND s.starts_at < $3 ORDER BY s.starts_at, s.session_id"
                ),
                &[&p, &from, &to],
            ),
            None => self.query_sessions(
                &format!(
                    "{SELECT_SESSION} WHERE s.starts_at >= $1 AND s.starts_at < $2 \
                     ORDER BY s.starts_at, s.session_id"
                ),
                &[&from, &to],
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
                 WHERE p.participant_id = $1 AND s.starts_at >= $2 AND s.starts_at < $3 \
                 ORDER BY s.starts_at, s.session_id"
            ),
            &[&participant_id, &from, &to],
        )
    }

    fn index_dump(&mut self) -> Result<IndexDump, LedgerError> {
        let sessions = self.query_sessions(&format!("{SELECT_SESSION} ORDER BY 1"), &[])?;
        let pairs = self
            .client
            .query(
                "SELECT session_id, participant_id FROM session_participants ORDER BY 1, 2",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok((sessions, pairs))
    }

    fn open_sessions(&mut self, node: &str) -> Result<Vec<String>, LedgerError> {
        let rows = self.client.query(
            "SELECT session_id FROM session_index WHERE open \
             AND (node_id = $1 OR node_id IS NULL) ORDER BY session_id",
            &[&node],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn mark_closed(&mut self, session_id: &str) -> Result<(), LedgerError> {
        self.client.execute(
            "UPDATE session_index SET open = false WHERE session_id = $1",
            &[&session_id],
        )?;
        Ok(())
    }

    fn open_stays(&mut self, node: &str) -> Result<Vec<OpenStay>, LedgerError> {
        let rows = self.client.query(
            "SELECT session_id, participant_id, role, admitted_at FROM stay_nodes \
             WHERE node_id = $1 AND open ORDER BY session_id, participant_id, role",
            &[&node],
        )?;
        Ok(rows
            .iter()
            .map(|r| OpenStay {
                session_id: r.get(0),
                participant_id: r.get(1),
                role: r.get(2),
                admitted_at: r.get(3),
            })
            .collect())
    }

    fn nodes_with_open_stays(&mut self) -> Result<Vec<(String, Option<i64>)>, LedgerError> {
        let rows = self.client.query(
            "SELECT s.node_id, h.at FROM (SELECT DISTINCT node_id FROM stay_nodes \
             WHERE open) s LEFT JOIN node_heartbeats h ON h.node_id = s.node_id \
             ORDER BY s.node_id",
            &[],
        )?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn attributed_stays(&mut self, session_id: &str) -> Result<Vec<(String, String)>, LedgerError> {
        let rows = self.client.query(
            "SELECT DISTINCT participant_id, role FROM stay_nodes WHERE session_id = $1 \
             ORDER BY 1, 2",
            &[&session_id],
        )?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn append_recovery(
        &mut self,
        claim: &RecoveryClaim<'_>,
        rows: &[NewEntry],
    ) -> Result<Option<Vec<Linked>>, LedgerError> {
        // Dropping the transaction without commit rolls it back.
        let mut tx = self.client.transaction()?;
        // The append lock: no other append or recovery changes the stays meanwhile.
        tx.batch_execute("LOCK TABLE ledger_head IN EXCLUSIVE MODE")?;
        let heartbeat: Option<i64> = tx
            .query_opt(
                "SELECT at FROM node_heartbeats WHERE node_id = $1",
                &[&claim.node],
            )?
            .map(|r| r.get(0));
        if heartbeat != claim.heartbeat {
            return Ok(None);
        }
        for stay in claim.stays {
            let admitted: Option<i64> = tx
                .query_opt(
                    "SELECT admitted_at FROM stay_nodes WHERE session_id = $1 \
                     AND participant_id = $2 AND role = $3 AND node_id = $4 AND open",
                    &[
                        &stay.session_id,
                        &stay.participant_id,
                        &stay.role,
                        &claim.node,
                    ],
                )?
                .map(|r| r.get(0));
            if admitted != Some(stay.admitted_at) {
                return Ok(None);
            }
        }
        // The entries change nothing in `stay_nodes` by themselves (no node named); the
        // claimed stays are closed below, and only those.
        let linked = write_entries(&mut tx, rows, None)?;
        for stay in claim.stays {
            tx.execute(
                "UPDATE stay_nodes SET open = false WHERE session_id = $1 \
                 AND participant_id = $2 AND role = $3 AND node_id = $4",
                &[
                    &stay.session_id,
                    &stay.participant_id,
                    &stay.role,
                    &claim.node,
                ],
            )?;
        }
        tx.commit()?;
        Ok(Some(linked))
    }

    fn put_heartbeat(&mut self, node: &str, at: i64) -> Result<(), LedgerError> {
        self.client.execute(
            "INSERT INTO node_heartbeats (node_id, at) VALUES ($1, $2) ON CONFLICT (node_id) \
             DO UPDATE SET at = greatest(node_heartbeats.at, excluded.at)",
            &[&node, &at],
        )?;
        Ok(())
    }

    fn heartbeat(&mut self, node: &str) -> Result<Option<i64>, LedgerError> {
        let row = self.client.query_opt(
            "SELECT at FROM node_heartbeats WHERE node_id = $1",
            &[&node],
        )?;
        Ok(row.map(|r| r.get(0)))
    }

    fn append_read(&mut self, auditor: &str, what: &str, at: i64) -> Result<i64, LedgerError> {
        let mut tx = self.client.transaction()?;
        tx.batch_execute("LOCK TABLE audit_head IN EXCLUSIVE MODE")?;
        let (last, prev) = head_of(&mut tx, "audit_head")?.unwrap_or((0, GENESIS_HASH.to_owned()));
        let seq = last + 1;
        let hash = entry_hash(&prev, &read_cells(seq, auditor, what, at, &prev));
        tx.execute(
            "INSERT INTO audit_reads (seq, auditor_id, what, at, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&seq, &auditor, &what, &at, &prev, &hash],
        )?;
        tx.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            &[&seq, &hash],
        )?;
        tx.commit()?;
        Ok(seq)
    }

    fn reads(&mut self) -> Result<ReadsDump, LedgerError> {
        let rows = self.client.query(
            "SELECT seq, auditor_id, what, at, prev_hash, hash FROM audit_reads ORDER BY seq",
            &[],
        )?;
        let reads = rows
            .iter()
            .map(|r| StoredRead {
                cells: [
                    Cell::Integer(r.get(0)),
                    Cell::Text(r.get(1)),
                    Cell::Text(r.get(2)),
                    Cell::Integer(r.get(3)),
                    Cell::Text(r.get(4)),
                ],
                hash: Cell::Text(r.get(5)),
            })
            .collect();
        let head = self
            .client
            .query_opt("SELECT seq, hash FROM audit_head WHERE id = 1", &[])?
            .map(|r| (r.get(0), r.get(1)));
        Ok((reads, head))
    }
}
