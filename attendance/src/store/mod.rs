//! Where the ledger's rows live: the [`Store`] trait and its two backends.
//!
//! - [`sqlite`]: one file in the data directory; the default.
//! - [`postgres`]: a shared database, for several nodes (`--database-url postgres://...`).
//!
//! Both keep the same tables:
//!
//! | table | what | chained |
//! |---|---|---|
//! | `ledger_entries` | every event, append-only (triggers refuse UPDATE and DELETE) | yes |
//! | `ledger_head` | the last `seq` and `hash`, written with each append | checks the chain's end |
//! | `audit_reads` | who read which report when, append-only | yes, its own chain |
//! | `audit_head` | the last read's `seq` and `hash` | checks that chain's end |
//! | `session_index` | program and window of each session, whether it is open, which node opened it | no: a lookup, rebuilt and compared by `verify` |
//! | `session_participants` | which participants appear in which session | no: as above |
//! | `node_heartbeats` | each node's last heartbeat, one row per node, overwritten | no |
//! | `stay_nodes` | which node admitted each stay, when, and whether it may still be open | no: the node is not in the entries |
//!
//! The hashes are computed by the caller-independent code in [`crate::chain`]; a backend only
//! moves rows. An append takes the head under a lock (SQLite: an IMMEDIATE transaction;
//! PostgreSQL: an EXCLUSIVE table lock) so two writers never link to the same entry, and
//! returns only after the transaction committed.

pub mod postgres;
pub mod sqlite;

use crate::chain::Cell;
use crate::event::unix_nanos;
use crate::{EventKind, LedgerError};

/// The eight hashed columns of one entry in chain order, then its stored `hash`.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRow {
    pub cells: [Cell; 8],
    pub hash: Cell,
}

/// One read in the audit log: `seq, auditor_id, what, at, prev_hash`, then `hash`.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRead {
    pub cells: [Cell; 5],
    pub hash: Cell,
}

/// An entry ready to be linked and written: every column but `seq`, `prev_hash` and `hash`.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub session_id: String,
    pub participant_id: Option<String>,
    pub role: Option<String>,
    pub kind_json: String,
    pub at: i64,
    pub recorded_at: i64,
    pub index: IndexChange,
    pub stay: StayChange,
}

/// What an entry changes in `stay_nodes`, the record of which node holds each stay. Applied
/// only when the appending node is known.
#[derive(Clone, Debug, PartialEq)]
pub enum StayChange {
    None,
    /// The appending node admitted the participant: a stay is open on that node.
    Admitted {
        participant: String,
        role: String,
    },
    /// The participant's stay on the appending node ended.
    Left {
        participant: String,
        role: String,
    },
    /// The session ended: every stay the appending node held in it ended.
    SessionEnded,
}

impl StayChange {
    pub(crate) fn of(kind: &EventKind, participant: Option<&str>, role: Option<&str>) -> Self {
        let who = || Some((participant?.to_owned(), role?.to_owned()));
        match kind {
            EventKind::Admitted => who()
                .map(|(participant, role)| StayChange::Admitted { participant, role })
                .unwrap_or(StayChange::None),
            EventKind::Left { .. } => who()
                .map(|(participant, role)| StayChange::Left { participant, role })
                .unwrap_or(StayChange::None),
            EventKind::SessionEnded => StayChange::SessionEnded,
            _ => StayChange::None,
        }
    }
}

/// A stay that `stay_nodes` shows open on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenStay {
    pub session_id: String,
    pub participant_id: String,
    pub role: String,
    /// The `at` of the node's last `admitted` of this participant in this session.
    pub admitted_at: i64,
}

/// What recovery found before it wrote: the node, the heartbeat it read and the stays it is
/// about to close. [`Store::append_recovery`] writes only if all of it still holds.
#[derive(Clone, Debug)]
pub struct RecoveryClaim<'a> {
    pub node: &'a str,
    pub heartbeat: Option<i64>,
    pub stays: &'a [OpenStay],
}

/// What an entry changes in the lookup tables.
#[derive(Clone, Debug, PartialEq)]
pub enum IndexChange {
    None,
    /// A session opened: record its program and window, mark it open.
    Opened {
        program: Option<String>,
        starts_at: i64,
        ends_at: i64,
    },
    /// The session ended for everyone: mark it closed.
    Ended,
    /// The participant appears in the session.
    Participant(String),
}

impl IndexChange {
    pub(crate) fn of(kind: &EventKind, participant: Option<&str>) -> IndexChange {
        match kind {
            EventKind::SessionOpened {
                starts_at,
                ends_at,
                program,
                ..
            } => IndexChange::Opened {
                program: program.clone(),
                starts_at: unix_nanos(*starts_at).unwrap_or_default(),
                ends_at: unix_nanos(*ends_at).unwrap_or_default(),
            },
            EventKind::SessionEnded => IndexChange::Ended,
            EventKind::Admitted | EventKind::Amended(_) => participant
                .map(|p| IndexChange::Participant(p.to_owned()))
                .unwrap_or(IndexChange::None),
            _ => IndexChange::None,
        }
    }
}

/// One session as the lookup table knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedSession {
    pub session_id: String,
    pub program: Option<String>,
    pub starts_at: i64,
    pub ends_at: i64,
    pub node_id: Option<String>,
    pub open: bool,
}

/// Links new entries to the chain: returns `(seq, prev_hash, hash)` for each, given the head.
pub(crate) fn link(head: (i64, String), rows: &[NewEntry]) -> Vec<(i64, String, String)> {
    let (mut seq, mut prev) = head;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        seq += 1;
        let cells = entry_cells(seq, row, &prev);
        let hash = crate::chain::entry_hash(&prev, &cells);
        out.push((seq, std::mem::replace(&mut prev, hash.clone()), hash));
    }
    out
}

pub(crate) fn entry_cells(seq: i64, row: &NewEntry, prev_hash: &str) -> [Cell; 8] {
    [
        Cell::Integer(seq),
        Cell::text(row.session_id.clone()),
        Cell::opt_text(row.participant_id.clone()),
        Cell::opt_text(row.role.clone()),
        Cell::text(row.kind_json.clone()),
        Cell::Integer(row.at),
        Cell::Integer(row.recorded_at),
        Cell::text(prev_hash),
    ]
}

/// Where an appended entry went: `(seq, prev_hash, hash)`.
pub type Linked = (i64, String, String);

/// The lookup tables as stored: sessions, then `(session_id, participant_id)` pairs.
pub type IndexDump = (Vec<IndexedSession>, Vec<(String, String)>);

/// The audit log as stored: every read, then its head record.
pub type ReadsDump = (Vec<StoredRead>, Option<(i64, String)>);

/// A place the ledger's rows live. Every method is blocking; the ledger calls them from its
/// own thread. Times are unix nanoseconds, UTC.
pub trait Store: Send {
    /// `"sqlite"` or `"postgresql"`, for logs and reports.
    fn backend(&self) -> &'static str;

    /// Links and writes the entries in one transaction, together with the head record and the
    /// lookup tables; `node` (when known) is recorded as the node that opened a session.
    /// Returns `(seq, prev_hash, hash)` for each entry once the transaction is durable.
    fn append(
        &mut self,
        rows: &[NewEntry],
        node: Option<&str>,
    ) -> Result<Vec<(i64, String, String)>, LedgerError>;

    /// The rows of one session in `seq` order.
    fn session_rows(&mut self, session_id: &str) -> Result<Vec<StoredRow>, LedgerError>;

    /// The rows of several sessions in `seq` order (one query, for reports).
    fn sessions_rows(&mut self, session_ids: &[String]) -> Result<Vec<StoredRow>, LedgerError>;

    /// Every row in `seq` order, handed to `visit` one at a time.
    fn scan(
        &mut self,
        visit: &mut dyn FnMut(StoredRow) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError>;

    /// The head record: last `seq` and `hash`, `None` if no entry was ever written.
    fn head(&mut self) -> Result<Option<(i64, String)>, LedgerError>;

    /// Entries stored.
    fn count(&mut self) -> Result<u64, LedgerError>;

    /// Sessions whose scheduled start is in `[from, to)`, of one program or of any.
    fn sessions_starting(
        &mut self,
        program: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<IndexedSession>, LedgerError>;

    /// Sessions of one participant whose scheduled start is in `[from, to)`.
    fn participant_sessions(
        &mut self,
        participant_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<IndexedSession>, LedgerError>;

    /// Every row of both lookup tables, for `verify` to compare with the entries:
    /// sessions, then `(session_id, participant_id)` pairs.
    fn index_dump(&mut self) -> Result<IndexDump, LedgerError>;

    /// Sessions still marked open that `node` opened (or that no known node opened).
    fn open_sessions(&mut self, node: &str) -> Result<Vec<String>, LedgerError>;

    /// Marks a session closed in the lookup table (after recovery closed its stays).
    fn mark_closed(&mut self, session_id: &str) -> Result<(), LedgerError>;

    /// Stays `stay_nodes` shows open on `node`, ordered by session.
    fn open_stays(&mut self, node: &str) -> Result<Vec<OpenStay>, LedgerError>;

    /// Every node with a stay still open in `stay_nodes`, with its last heartbeat.
    fn nodes_with_open_stays(&mut self) -> Result<Vec<(String, Option<i64>)>, LedgerError>;

    /// `(participant_id, role)` of every stay `stay_nodes` knows in the session, open or not:
    /// the stays start-up recovery leaves to [`Store::open_stays`].
    fn attributed_stays(&mut self, session_id: &str) -> Result<Vec<(String, String)>, LedgerError>;

    /// Recovery's write, in one transaction under the append lock: if the node's heartbeat is
    /// still the one in `claim` and each claimed stay is still open with the same
    /// `admitted_at`, appends `rows` (linked like [`Store::append`], but changing no stay
    /// by themselves) and marks the claimed stays closed; otherwise writes nothing and
    /// returns `None`, because the node came back or another node recovered it first.
    fn append_recovery(
        &mut self,
        claim: &RecoveryClaim<'_>,
        rows: &[NewEntry],
    ) -> Result<Option<Vec<Linked>>, LedgerError>;

    /// Overwrites the node's heartbeat; durable when it returns.
    fn put_heartbeat(&mut self, node: &str, at: i64) -> Result<(), LedgerError>;

    /// The node's last heartbeat.
    fn heartbeat(&mut self, node: &str) -> Result<Option<i64>, LedgerError>;

    /// Appends one read to the audit log, in its own chain; returns its `seq`.
    fn append_read(&mut self, auditor: &str, what: &str, at: i64) -> Result<i64, LedgerError>;

    /// Every read in `seq` order, and the audit log's head record.
    fn reads(&mut self) -> Result<ReadsDump, LedgerError>;
}

pub(crate) fn read_cells(seq: i64, auditor: &str, what: &str, at: i64, prev: &str) -> [Cell; 5] {
    [
        Cell::Integer(seq),
        Cell::text(auditor),
        Cell::text(what),
        Cell::Integer(at),
        Cell::text(prev),
    ]
}
