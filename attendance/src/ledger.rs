//! The ledger: append, read back, verify the hash chains, heartbeats and crash recovery, the
//! audit log of reads. Storage is behind [`Store`]; see [`crate::store`] for the tables and
//! [`crate::chain`] for what each hash covers.
//!
//! Limitation: anyone who can write the database can drop the triggers, rewrite rows and
//! recompute every hash after them; the chain alone cannot show that. Record the `last_hash`
//! of a [`VerifyReport`] somewhere else (a report, a ticket) and compare it later to catch it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use haven_ids::{ParticipantId, Role, SessionId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::{debug, error, info, trace};

use crate::chain::{entry_hash, Cell, GENESIS_HASH};
use crate::event::{from_unix_nanos, unix_nanos};
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{
    IndexChange, IndexedSession, NewEntry, OpenStay, RecoveryClaim, StayChange, Store, StoredRow,
};
use crate::{Entry, Event, EventKind, LeaveReason, LedgerError, StaffId};

/// Where a ledger lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (the default: `attendance.sqlite3` in the data directory).
    SqliteFile(PathBuf),
    /// A SQLite database in memory; gone when the ledger is dropped.
    InMemory,
    /// A PostgreSQL database, optionally in one schema (`search_path`).
    Postgres { url: String, schema: Option<String> },
}

impl Location {
    /// `--database-url` wins over the data directory; only `postgres://` and
    /// `postgresql://` URLs are accepted.
    pub fn from_args(data_dir: &Path, database_url: Option<&str>) -> Result<Self, LedgerError> {
        match database_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Location::Postgres {
                    url: url.to_owned(),
                    schema: None,
                })
            }
            Some(_) => Err(LedgerError::Location(
                "--database-url must start with postgres:// or postgresql://".into(),
            )),
            None => Ok(Location::SqliteFile(data_dir.join(crate::LEDGER_FILE))),
        }
    }
}

/// How often a server writes its heartbeat ([`Ledger::heartbeat`]).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// A node whose last heartbeat is at least this old is taken as gone: six heartbeats in a row
/// missed, far more than a slow commit or a busy ledger thread delays one, and enough for
/// clocks a few seconds apart. Its open stays are then closed at that last heartbeat by the
/// next heartbeat of a node that is running (see [`Ledger::heartbeat_at`]). The threshold
/// only decides *when* they are closed, never *at what time*.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(30);

/// The longest gap between two of this node's own heartbeats that still counts as one
/// unbroken run. Other nodes are judged only on this node's unbroken run: after an outage of
/// the database every node's heartbeat is old, and none of them is gone.
const HEARTBEAT_RUN_GAP: Duration = Duration::from_secs(15);

/// A node's name in heartbeats and recovery: same alphabet as other ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        ParticipantId::parse(s)
            .map(|_| NodeId(s.to_owned()))
            .map_err(|_| LedgerError::InvalidEvent {
                reason: "a node id is 1 to 128 characters of A-Z a-z 0-9 - _ . :",
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The append-only attendance ledger. Every call is synchronous; servers use it through a
/// [`LedgerHandle`](crate::LedgerHandle).
pub struct Ledger {
    store: Box<dyn Store>,
    /// The node this process runs as, once `heartbeat` or `recover` named it; recorded with
    /// each session it opens so recovery closes only its own sessions.
    node: Option<NodeId>,
    /// Nodes recovered by this process: a heartbeat first recovers, so the previous run's
    /// last heartbeat is never overwritten before recovery read it.
    recovered: HashSet<NodeId>,
    /// Per node heartbeating through this ledger: the first and the last heartbeat of its
    /// current unbroken run (gaps of at most [`HEARTBEAT_RUN_GAP`], no failed write).
    runs: HashMap<NodeId, (OffsetDateTime, OffsetDateTime)>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.store.backend())
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The result of walking both hash chains and the lookup tables.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Entries stored.
    pub entries: u64,
    /// The first place where the chain is broken, in `seq` order; `None` if it is intact.
    pub first_bad: Option<BadEntry>,
    /// The hash of the newest entry, `None` for an empty ledger. Keep it outside the ledger to
    /// detect a later rewrite of the whole chain.
    pub last_hash: Option<String>,
    /// Reads in the audit log.
    pub reads: u64,
    /// The first broken place in the audit log's own chain.
    pub first_bad_read: Option<BadEntry>,
    /// A lookup table that does not match the entries (reports would miss or misplace a
    /// session); `None` when they agree.
    pub index_problem: Option<String>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.first_bad.is_none() && self.first_bad_read.is_none() && self.index_problem.is_none()
    }
}

/// Where a chain breaks and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadEntry {
    /// The entry that was changed, or that is missing.
    pub seq: u64,
    pub problem: String,
}

/// What [`Ledger::recover`] did, or what a heartbeat did about a node that is gone.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    /// The node's last heartbeat before this start (or before it went silent), if it ever
    /// wrote one.
    pub last_heartbeat: Option<OffsetDateTime>,
    /// Sessions in which recovery closed stays (or, for stays recorded without their node,
    /// that were still open).
    pub sessions: u64,
    /// Stays closed with [`LeaveReason::NodeRecovered`].
    pub stays_closed: u64,
}

impl Ledger {
    /// Opens (or creates) the SQLite ledger file.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Ok(Self::with_store(Box::new(SqliteStore::open(path)?)))
    }

    /// A ledger that lives only as long as this value; for tests and tools.
    pub fn open_in_memory() -> Result<Self, LedgerError> {
        Ok(Self::with_store(Box::new(SqliteStore::open_in_memory()?)))
    }

    /// Connects to PostgreSQL, creating the schema if the database has none.
    pub fn connect_postgres(url: &str) -> Result<Self, LedgerError> {
        Ok(Self::with_store(Box::new(PostgresStore::connect(url)?)))
    }

    pub fn open_at(location: &Location) -> Result<Self, LedgerError> {
        match location {
            Location::SqliteFile(path) => Self::open(path),
            Location::InMemory => Self::open_in_memory(),
            Location::Postgres { url, schema } => Ok(Self::with_store(Box::new(
                PostgresStore::connect_in_schema(url, schema.as_deref())?,
            ))),
        }
    }

    pub fn with_store(store: Box<dyn Store>) -> Self {
        Ledger {
            store,
            node: None,
            recovered: HashSet::new(),
            runs: HashMap::new(),
        }
    }

    /// `"sqlite"` or `"postgresql"`.
    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// Writes one event. When this returns `Ok` the entry is committed and durable.
    pub fn append(&mut self, event: Event) -> Result<Entry, LedgerError> {
        let mut out = self.append_batch(vec![event]);
        // One event in, one result out.
        out.pop().unwrap_or(Err(LedgerError::Closed))
    }

    /// Writes several events in one transaction (one fsync) and returns a result per event,
    /// in order; each `Ok` entry is durable. Refused events are skipped without failing the
    /// others. If the transaction fails, each event is retried alone, so every caller gets
    /// its own outcome.
    pub fn append_batch(&mut self, events: Vec<Event>) -> Vec<Result<Entry, LedgerError>> {
        let recorded_at = OffsetDateTime::now_utc();
        let mut results: Vec<Option<Result<Entry, LedgerError>>> = Vec::new();
        let mut pending: Vec<(usize, Event, NewEntry)> = Vec::new();
        for (i, event) in events.into_iter().enumerate() {
            results.push(None);
            match prepare(event, recorded_at) {
                Ok((event, row)) => pending.push((i, event, row)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }

        let rows: Vec<NewEntry> = pending.iter().map(|p| p.2.clone()).collect();
        let node = self.node.as_ref().map(|n| n.as_str().to_owned());
        match self.store.append(&rows, node.as_deref()) {
            Ok(linked) => {
                for ((i, event, _), (seq, prev_hash, hash)) in pending.into_iter().zip(linked) {
                    debug!(seq, session_id = %event.session_id, "attendance entry appended");
                    results[i] = Some(Ok(Entry {
                        seq: u64::try_from(seq).unwrap_or_default(),
                        event,
                        recorded_at,
                        prev_hash,
                        hash,
                    }));
                }
            }
            Err(e) if pending.len() == 1 => {
                results[pending[0].0] = Some(Err(e));
            }
            Err(_) => {
                for (i, event, _) in pending {
                    results[i] = Some(self.append(event));
                }
            }
        }
        // Every slot was filled above: refused, linked, or retried.
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(LedgerError::Closed)))
            .collect()
    }

    /// Every entry of one session, in ledger order.
    ///
    /// Each row's own hash is checked on the way out, so a report is never built from a row
    /// that was edited; such a row fails the call with [`LedgerError::Corrupt`]. (The links
    /// between rows are for [`Ledger::verify`]: a session's rows are not contiguous.)
    pub fn session_events(&mut self, session: &SessionId) -> Result<Vec<Entry>, LedgerError> {
        let rows = self.store.session_rows(session.as_str())?;
        let entries = rows
            .into_iter()
            .map(checked_entry)
            .collect::<Result<Vec<_>, _>>()?;
        trace!(session_id = %session, entries = entries.len(), "attendance session read");
        Ok(entries)
    }

    /// The entries of several sessions, grouped by session, each in ledger order; checked
    /// like [`Ledger::session_events`].
    pub fn sessions_events(
        &mut self,
        sessions: &[SessionId],
    ) -> Result<BTreeMap<SessionId, Vec<Entry>>, LedgerError> {
        let ids: Vec<String> = sessions.iter().map(|s| s.as_str().to_owned()).collect();
        let mut out: BTreeMap<SessionId, Vec<Entry>> = BTreeMap::new();
        for row in self.store.sessions_rows(&ids)? {
            let entry = checked_entry(row)?;
            out.entry(entry.event.session_id.clone())
                .or_default()
                .push(entry);
        }
        Ok(out)
    }

    /// Sessions whose scheduled start is in `[from, to)`, of one program or of all.
    pub fn sessions_starting(
        &mut self,
        program: Option<&str>,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<IndexedSession>, LedgerError> {
        self.store
            .sessions_starting(program, nanos_or_edge(from), nanos_or_edge(to))
    }

    /// Sessions of one participant whose scheduled start is in `[from, to)`.
    pub fn participant_sessions(
        &mut self,
        participant: &ParticipantId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<IndexedSession>, LedgerError> {
        self.store.participant_sessions(
            participant.as_str(),
            nanos_or_edge(from),
            nanos_or_edge(to),
        )
    }

    /// Number of entries stored.
    pub fn count(&mut self) -> Result<u64, LedgerError> {
        self.store.count()
    }

    /// Every entry in ledger order (for exports), each checked like
    /// [`Ledger::session_events`]; `keep` picks which ones are returned.
    pub fn entries_where(
        &mut self,
        keep: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<Vec<Entry>, LedgerError> {
        let mut out = Vec::new();
        self.store.scan(&mut |row| {
            let entry = checked_entry(row)?;
            if keep(&entry) {
                out.push(entry);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Writes the node's heartbeat at the current time, then closes the open stays of nodes
    /// that are gone (see [`Ledger::heartbeat_at`]). The first heartbeat of a node in this
    /// process runs [`Ledger::recover`] first, so the last heartbeat of a crashed run is used
    /// before it is overwritten.
    pub fn heartbeat(
        &mut self,
        node: &NodeId,
    ) -> Result<Vec<(NodeId, RecoveryReport)>, LedgerError> {
        self.heartbeat_at(node, OffsetDateTime::now_utc())
    }

    /// [`Ledger::heartbeat`] with the time given, for tests and tools.
    ///
    /// After writing, it recovers every *other* node that still holds open stays and is gone:
    /// its last heartbeat is at least [`HEARTBEAT_STALE`] older than `at`, counted from no
    /// earlier than the start of `node`'s own unbroken run of heartbeats (so `node` must
    /// itself have been heartbeating for that long). Each such stay is closed with
    /// [`LeaveReason::NodeRecovered`] at the gone node's last heartbeat (or at the stay's
    /// admission, if that is later). A node that never wrote a heartbeat is never judged.
    /// Returns the nodes recovered. An error means the heartbeat was not written; a failed
    /// recovery of another node is logged (and tried again at the next heartbeat) instead.
    pub fn heartbeat_at(
        &mut self,
        node: &NodeId,
        at: OffsetDateTime,
    ) -> Result<Vec<(NodeId, RecoveryReport)>, LedgerError> {
        if !self.recovered.contains(node) {
            self.recover(node)?;
        }
        let nanos = unix_nanos(at).ok_or(LedgerError::InvalidEvent {
            reason: "a time is outside 1677 to 2262",
        })?;
        if let Err(e) = self.store.put_heartbeat(node.as_str(), nanos) {
            self.runs.remove(node);
            return Err(e);
        }
        let since = match self.runs.get(node) {
            Some(&(since, last)) if at >= last && at - last <= HEARTBEAT_RUN_GAP => since,
            _ => at,
        };
        self.runs.insert(node.clone(), (since, at));
        Ok(self.recover_gone_nodes(node, since, at))
    }

    /// Closes the stays that a previous run of `node` left open, with
    /// [`LeaveReason::NodeRecovered`]. Call it at start-up, before the node records anything;
    /// from then on the ledger records `node` as the node of each session it opens and of
    /// each stay it admits.
    ///
    /// Each stay `node` admitted and did not end is closed at its last heartbeat, or at the
    /// stay's admission if that is later (nothing after the last proof of the node is
    /// credited); if the node never wrote a heartbeat, at the session's last entry. A stay
    /// another node admitted is never touched here, even in a session `node` opened.
    ///
    /// Stays recorded before the ledger knew which node admitted them (a ledger of schema
    /// version 2 or older, or appends without a node) are closed by session, as before: in
    /// sessions still marked open that `node` opened (or whose node is unknown), at the
    /// heartbeat or at the session's last entry if that is later.
    pub fn recover(&mut self, node: &NodeId) -> Result<RecoveryReport, LedgerError> {
        self.node = Some(node.clone());
        self.recovered.insert(node.clone());

        let heartbeat = self.store.heartbeat(node.as_str())?;
        let mut sessions = BTreeSet::new();
        let mut report = RecoveryReport {
            last_heartbeat: heartbeat.and_then(from_unix_nanos),
            ..RecoveryReport::default()
        };
        report.stays_closed += self.recover_stays(node, heartbeat, &mut sessions)?;

        for session in self.store.open_sessions(node.as_str())? {
            let Ok(session_id) = SessionId::parse(&session) else {
                continue;
            };
            let entries = self.session_events(&session_id)?;
            // Stays whose node is known are the business of that node's recovery.
            let attributed: HashSet<(String, String)> =
                self.store.attributed_stays(&session)?.into_iter().collect();
            let open = crate::counting::open_participants(&entries)
                .into_iter()
                .filter(|(p, r)| {
                    !attributed.contains(&(p.as_str().to_owned(), r.as_str().to_owned()))
                });
            let last_entry = entries.iter().map(|e| e.event.at).max();
            let close_at = match (report.last_heartbeat, last_entry) {
                (Some(h), Some(l)) => h.max(l),
                (h, l) => h.or(l).unwrap_or_else(OffsetDateTime::now_utc),
            };
            let events = open
                .map(|(pid, role)| {
                    let left = EventKind::Left {
                        reason: LeaveReason::NodeRecovered,
                    };
                    Event::participant(session_id.clone(), pid, role, left, close_at)
                })
                .collect::<Vec<_>>();
            report.stays_closed += events.len() as u64;
            for result in self.append_batch(events) {
                result?;
            }
            self.store.mark_closed(&session)?;
            sessions.insert(session);
        }
        report.sessions = sessions.len() as u64;
        info!(
            node = %node,
            sessions = report.sessions,
            stays_closed = report.stays_closed,
            "attendance recovery done"
        );
        Ok(report)
    }

    /// Recovers every node other than `this` that holds open stays and has been silent for
    /// [`HEARTBEAT_STALE`] while `this` was heartbeating (since `since`).
    fn recover_gone_nodes(
        &mut self,
        this: &NodeId,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Vec<(NodeId, RecoveryReport)> {
        let mut out = Vec::new();
        let nodes = match self.store.nodes_with_open_stays() {
            Ok(nodes) => nodes,
            Err(e) => {
                error!(code = e.code(), error = %e, "attendance: cannot look for gone nodes");
                return out;
            }
        };
        for (node, heartbeat) in nodes {
            // A node that never wrote a heartbeat gives no time to close at; one that just
            // started has not written it yet.
            let Some(last) = heartbeat.and_then(from_unix_nanos) else {
                continue;
            };
            let Ok(node) = NodeId::parse(&node) else {
                continue;
            };
            if &node == this || now - last.max(since) < HEARTBEAT_STALE {
                continue;
            }
            let mut sessions = BTreeSet::new();
            let stays_closed = match self.recover_stays(&node, heartbeat, &mut sessions) {
                Ok(n) => n,
                Err(e) => {
                    error!(
                        node = %node,
                        code = e.code(),
                        error = %e,
                        "attendance: recovery of a gone node failed"
                    );
                    continue;
                }
            };
            if sessions.is_empty() {
                continue;
            }
            info!(
                node = %node,
                last_heartbeat = %last,
                sessions = sessions.len(),
                stays_closed,
                "attendance: node silent too long, its open stays closed at its last heartbeat"
            );
            out.push((
                node,
                RecoveryReport {
                    last_heartbeat: Some(last),
                    sessions: sessions.len() as u64,
                    stays_closed,
                },
            ));
        }
        out
    }

    /// Closes the stays `stay_nodes` shows open on `node`, each at `heartbeat` or at its
    /// admission if that is later (at the session's last entry without a heartbeat), one
    /// session per transaction. Skips a session whose stays or heartbeat changed since they
    /// were read (the node came back, or another node recovered it first). Adds the sessions
    /// written to `sessions`; returns the stays closed.
    fn recover_stays(
        &mut self,
        node: &NodeId,
        heartbeat: Option<i64>,
        sessions: &mut BTreeSet<String>,
    ) -> Result<u64, LedgerError> {
        let mut by_session: BTreeMap<String, Vec<OpenStay>> = BTreeMap::new();
        for stay in self.store.open_stays(node.as_str())? {
            by_session
                .entry(stay.session_id.clone())
                .or_default()
                .push(stay);
        }
        let mut closed = 0;
        for (session, stays) in by_session {
            // Ids were checked when the entries were appended.
            let Ok(session_id) = SessionId::parse(&session) else {
                continue;
            };
            let entries = self.session_events(&session_id)?;
            let last_entry = entries.iter().map(|e| e.event.at).max();
            let mut events = Vec::new();
            for stay in &stays {
                let (Ok(pid), Some(role)) = (
                    ParticipantId::parse(&stay.participant_id),
                    Role::parse(&stay.role),
                ) else {
                    continue;
                };
                let admitted = from_unix_nanos(stay.admitted_at);
                let close_at = match (heartbeat.and_then(from_unix_nanos), admitted) {
                    (Some(h), Some(a)) => h.max(a),
                    (Some(h), None) => h,
                    (None, a) => match last_entry.or(a) {
                        Some(t) => t,
                        None => continue,
                    },
                };
                // The stay as the ledger shows it at that time: open, unless something
                // already ended it (the session's end, say). Later entries, such as another
                // node admitting the participant again, are after the close and untouched.
                let until: Vec<Entry> = entries
                    .iter()
                    .filter(|e| e.event.at <= close_at)
                    .cloned()
                    .collect();
                let open = crate::counting::open_participants(&until)
                    .into_iter()
                    .any(|(p, r)| p == pid && r == role);
                if open {
                    let left = EventKind::Left {
                        reason: LeaveReason::NodeRecovered,
                    };
                    events.push(Event::participant(
                        session_id.clone(),
                        pid,
                        role,
                        left,
                        close_at,
                    ));
                }
            }
            let recorded_at = OffsetDateTime::now_utc();
            let rows = events
                .into_iter()
                .map(|e| prepare(e, recorded_at).map(|(_, row)| row))
                .collect::<Result<Vec<_>, _>>()?;
            let claim = RecoveryClaim {
                node: node.as_str(),
                heartbeat,
                stays: &stays,
            };
            match self.store.append_recovery(&claim, &rows)? {
                Some(linked) => {
                    for (seq, _, _) in &linked {
                        debug!(
                            seq,
                            session_id = %session_id,
                            node = %node,
                            "stay closed by recovery"
                        );
                    }
                    closed += linked.len() as u64;
                    sessions.insert(session);
                }
                None => debug!(
                    session_id = %session_id,
                    node = %node,
                    "recovery skipped: the node came back or was recovered by another node"
                ),
            }
        }
        Ok(closed)
    }

    /// The node's last heartbeat.
    pub fn last_heartbeat(&mut self, node: &NodeId) -> Result<Option<OffsetDateTime>, LedgerError> {
        Ok(self
            .store
            .heartbeat(node.as_str())?
            .and_then(from_unix_nanos))
    }

    /// Writes one read to the audit log (its own hash chain), durably; returns its number.
    /// `what` names the report and its parameters, never its content.
    pub fn record_read(&mut self, auditor: &StaffId, what: &str) -> Result<u64, LedgerError> {
        let at = unix_nanos(OffsetDateTime::now_utc()).unwrap_or_default();
        let seq = self.store.append_read(auditor.as_str(), what, at)?;
        Ok(u64::try_from(seq).unwrap_or_default())
    }

    /// The audit log of reads: `(seq, auditor, what, at)`, unverified (see `verify`).
    pub fn reads(&mut self) -> Result<Vec<(u64, String, String, OffsetDateTime)>, LedgerError> {
        let (rows, _) = self.store.reads()?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let [seq, auditor, what, at, _] = r.cells;
                (
                    seq.as_integer()
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(0),
                    auditor.as_text().unwrap_or_default().to_owned(),
                    what.as_text().unwrap_or_default().to_owned(),
                    at.as_integer()
                        .and_then(from_unix_nanos)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                )
            })
            .collect())
    }

    /// Walks the whole chain: recomputes every hash, checks every `prev_hash` link, checks that
    /// `seq` runs 1, 2, 3, ... and that the last entry is the one the head table recorded;
    /// then the same for the audit log of reads; then rebuilds the lookup tables from the
    /// entries and compares.
    ///
    /// Any change to any stored column, a deleted entry or two swapped entries shows up as
    /// `first_bad`. Reports the first problem only; fix or explain it, then run again.
    pub fn verify(&mut self) -> Result<VerifyReport, LedgerError> {
        let mut entries = 0u64;
        let mut prev_hash = GENESIS_HASH.to_owned();
        let mut first_bad = None;
        let mut index = IndexRebuild::default();
        self.store.scan(&mut |row| {
            entries += 1;
            if first_bad.is_none() {
                first_bad = check_link(&row.cells, &row.hash, entries, &prev_hash);
            }
            if first_bad.is_none() {
                index.add(&row);
            }
            prev_hash = text(&row.hash);
            Ok(())
        })?;

        let last_hash = (entries > 0).then(|| prev_hash.clone());
        if first_bad.is_none() {
            first_bad = check_head(self.store.head()?, entries, last_hash.as_deref());
        }

        let (reads, read_head) = self.store.reads()?;
        let mut first_bad_read = None;
        let mut prev = GENESIS_HASH.to_owned();
        for (n, read) in reads.iter().enumerate() {
            if first_bad_read.is_none() {
                first_bad_read = check_link(&read.cells, &read.hash, n as u64 + 1, &prev);
            }
            prev = text(&read.hash);
        }
        let reads_n = reads.len() as u64;
        if first_bad_read.is_none() {
            let last = (reads_n > 0).then_some(prev.as_str());
            first_bad_read = check_head(read_head, reads_n, last);
        }

        let index_problem = if first_bad.is_none() {
            index.compare(self.store.index_dump()?)
        } else {
            None
        };

        debug!(
            entries,
            intact = first_bad.is_none(),
            "attendance ledger verified"
        );
        Ok(VerifyReport {
            entries,
            first_bad,
            last_hash,
            reads: reads_n,
            first_bad_read,
            index_problem,
        })
    }
}

/// Checks an event and turns it into the row to store.
fn prepare(event: Event, recorded_at: OffsetDateTime) -> Result<(Event, NewEntry), LedgerError> {
    let event = event.checked()?;
    let kind_json = serde_json::to_string(&event.kind).map_err(|_| LedgerError::InvalidEvent {
        reason: "event cannot be encoded",
    })?;
    let participant = event.participant_id.as_ref().map(|p| p.as_str().to_owned());
    let role = event.role.map(|r| r.as_str().to_owned());
    let row = NewEntry {
        session_id: event.session_id.as_str().to_owned(),
        index: IndexChange::of(&event.kind, participant.as_deref()),
        stay: StayChange::of(&event.kind, participant.as_deref(), role.as_deref()),
        participant_id: participant,
        role,
        kind_json,
        // `checked` guarantees the event's time fits; `now` fits until 2262.
        at: unix_nanos(event.at).unwrap_or_default(),
        recorded_at: unix_nanos(recorded_at).unwrap_or_default(),
    };
    Ok((event, row))
}

fn nanos_or_edge(t: OffsetDateTime) -> i64 {
    unix_nanos(t).unwrap_or(if t.year() < 1970 { i64::MIN } else { i64::MAX })
}

/// Checks one row's own hash and parses it.
fn checked_entry(row: StoredRow) -> Result<Entry, LedgerError> {
    let seq = row.cells[0].as_integer().unwrap_or(0);
    let seq = u64::try_from(seq).map_err(|_| LedgerError::Corrupt {
        seq: 0,
        problem: format!("negative seq {seq}"),
    })?;
    let prev_hash = text(&row.cells[7]);
    if entry_hash(&prev_hash, &row.cells) != text(&row.hash) {
        return Err(LedgerError::Corrupt {
            seq,
            problem: "hash does not match".into(),
        });
    }
    entry_from_cells(seq, row)
}

/// Parses a row whose hash was already checked.
fn entry_from_cells(seq: u64, row: StoredRow) -> Result<Entry, LedgerError> {
    let corrupt = |problem: &str| LedgerError::Corrupt {
        seq,
        problem: problem.to_owned(),
    };
    let [_, session, participant, role, kind, at, recorded_at, prev_hash] = row.cells;

    let session_id = session
        .as_text()
        .and_then(|s| SessionId::parse(s).ok())
        .ok_or_else(|| corrupt("session_id"))?;
    let participant_id = match participant {
        Cell::Null => None,
        Cell::Text(p) => Some(ParticipantId::parse(&p).map_err(|_| corrupt("participant_id"))?),
        _ => return Err(corrupt("participant_id")),
    };
    let role = match role {
        Cell::Null => None,
        Cell::Text(r) => Some(Role::parse(&r).ok_or_else(|| corrupt("role"))?),
        _ => return Err(corrupt("role")),
    };
    let kind: EventKind = kind
        .as_text()
        .and_then(|k| serde_json::from_str(k).ok())
        .ok_or_else(|| corrupt("kind_json"))?;
    let at = at
        .as_integer()
        .and_then(from_unix_nanos)
        .ok_or_else(|| corrupt("at"))?;
    let recorded_at = recorded_at
        .as_integer()
        .and_then(from_unix_nanos)
        .ok_or_else(|| corrupt("recorded_at"))?;
    Ok(Entry {
        seq,
        event: Event {
            session_id,
            participant_id,
            role,
            kind,
            at,
        },
        recorded_at,
        prev_hash: text(&prev_hash),
        hash: text(&row.hash),
    })
}

/// Checks one row against the previous row's hash, given the seq it must have. `cells[0]` is
/// the seq and the last cell the stored `prev_hash`.
fn check_link(cells: &[Cell], hash: &Cell, expected: u64, prev_hash: &str) -> Option<BadEntry> {
    let bad = |seq, problem: String| Some(BadEntry { seq, problem });

    let seq = cells[0]
        .as_integer()
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    if seq < expected {
        return bad(
            expected,
            format!("an entry has seq {seq} where {expected} belongs"),
        );
    }
    if seq != expected {
        // A gap means `expected` was deleted or renumbered; say which seq is absent.
        return bad(
            expected,
            format!("entry is missing (the next stored entry is {seq})"),
        );
    }
    if cells.last().map(text).as_deref() != Some(prev_hash) {
        return bad(
            seq,
            "prev_hash does not match the previous entry's hash".into(),
        );
    }
    if entry_hash(prev_hash, cells) != text(hash) {
        return bad(seq, "hash does not match the entry's columns".into());
    }
    None
}

/// Compares the end of an intact chain with its head record, which catches deleted newest
/// entries that the links alone cannot show.
fn check_head(head: Option<(i64, String)>, entries: u64, last: Option<&str>) -> Option<BadEntry> {
    let bad = |seq, problem: String| Some(BadEntry { seq, problem });
    match (head, last) {
        (None, None) => None,
        (None, Some(_)) => bad(entries, "the head record is missing".into()),
        (Some((seq, _)), _) if u64::try_from(seq).ok() != Some(entries) => {
            // The chain up to `entries` is intact, so the missing one is the next.
            bad(
                entries + 1,
                format!("entry is missing: the head record counts {seq} entries"),
            )
        }
        (Some((_, hash)), Some(last)) if hash != last => bad(
            entries,
            "entry does not match the hash in the head record".into(),
        ),
        _ => None,
    }
}

/// Text of a cell, empty for anything else, so a tampered value compares unequal.
fn text(c: &Cell) -> String {
    c.as_text().unwrap_or_default().to_owned()
}

/// The lookup tables as the entries say they must be.
#[derive(Default)]
struct IndexRebuild {
    sessions: BTreeMap<String, (Option<String>, i64, i64)>,
    pairs: BTreeSet<(String, String)>,
}

impl IndexRebuild {
    fn add(&mut self, row: &StoredRow) {
        let (Some(session), Some(kind)) = (row.cells[1].as_text(), row.cells[4].as_text()) else {
            return;
        };
        let Ok(kind) = serde_json::from_str::<EventKind>(kind) else {
            return;
        };
        match IndexChange::of(&kind, row.cells[2].as_text()) {
            IndexChange::Opened {
                program,
                starts_at,
                ends_at,
            } => {
                self.sessions
                    .entry(session.to_owned())
                    .or_insert((program, starts_at, ends_at));
            }
            IndexChange::Participant(p) => {
                self.pairs.insert((session.to_owned(), p));
            }
            IndexChange::Ended | IndexChange::None => {}
        }
    }

    fn compare(
        self,
        (sessions, pairs): (Vec<IndexedSession>, Vec<(String, String)>),
    ) -> Option<String> {
        let stored: BTreeMap<String, (Option<String>, i64, i64)> = sessions
            .into_iter()
            .map(|s| (s.session_id, (s.program, s.starts_at, s.ends_at)))
            .collect();
        if let Some((id, _)) = self
            .sessions
            .iter()
            .find(|(id, v)| stored.get(*id) != Some(*v))
        {
            return Some(format!(
                "session_index does not match the entries for session {id}"
            ));
        }
        if let Some(id) = stored.keys().find(|id| !self.sessions.contains_key(*id)) {
            return Some(format!(
                "session_index lists session {id}, which has no entries"
            ));
        }
        let stored: BTreeSet<(String, String)> = pairs.into_iter().collect();
        if let Some((s, p)) = self.pairs.symmetric_difference(&stored).next() {
            return Some(format!(
                "session_participants does not match the entries for {p} in session {s}"
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use haven_ids::SessionKind;
    use time::macros::datetime;

    use std::path::Path;

    use haven_ids::{ParticipantId, Role, SessionId};
    use rusqlite::Connection;
    use time::OffsetDateTime;

    use super::*;
    use crate::chain::GENESIS_HASH;
    use crate::{Entry, Event, EventKind, LeaveReason};

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

        assert_eq!(report, VerifyReport::default());
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

        let mut ledger = Ledger::open(&path).expect("reopen again");
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
        let store = SqliteStore::open(&path).expect("open");

        let mode: String = store
            .connection()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("pragma");
        let sync: i64 = store
            .connection()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("pragma");
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "FULL");
    }
}
