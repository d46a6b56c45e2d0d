//! The async front of the ledger: one thread owns the [`Ledger`], tasks send it commands.
//!
//! Database calls block, and an fsync on commit can take milliseconds, so they run on a
//! thread of their own instead of a runtime worker. Commands go over a bounded queue and each
//! carries a oneshot for its reply; there is no lock to share.
//!
//! Group commit: when the thread takes an append, it also takes every append already waiting
//! (up to [`MAX_BATCH`]) and writes them in one transaction, then answers each. Every answer
//! still comes after the commit, so "durable before acknowledged" holds, and one fsync serves
//! many events under load.

use haven_ids::{ParticipantId, SessionId};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace};

use crate::{
    AttendanceRules, ClientWeeksReport, Entry, Event, IsoWeek, Ledger, LedgerError, NodeId,
    ProgramWeekReport, RecoveryReport, SessionReport, StaffId, VerifyReport,
};

/// Commands waiting for the ledger thread. When the queue is full, callers wait in `send`:
/// the back-pressure reaches the tasks that produce events instead of growing memory.
const QUEUE_DEPTH: usize = 4096;

/// Most appends written in one transaction.
pub const MAX_BATCH: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;
type Job = Box<dyn FnOnce(&mut Ledger) + Send>;

enum Command {
    Append {
        event: Event,
        reply: Reply<Entry>,
    },
    /// Anything else: a closure run on the ledger thread, which answers through its own
    /// oneshot. Typed methods below build these.
    Run(Job),
}

/// A cheap, cloneable handle to a ledger running on its own thread.
///
/// The thread stops after the last handle is dropped and every queued command is done, so
/// nothing accepted is lost on an orderly shutdown.
#[derive(Clone, Debug)]
pub struct LedgerHandle {
    commands: mpsc::Sender<Command>,
}

impl LedgerHandle {
    /// Moves the ledger to a new thread named `haven-ledger`.
    ///
    /// If the thread cannot be started, every call on the handle returns
    /// [`LedgerError::Closed`].
    pub fn spawn(ledger: Ledger) -> LedgerHandle {
        let (commands, queue) = mpsc::channel(QUEUE_DEPTH);

        let thread = std::thread::Builder::new().name("haven-ledger".into());
        if let Err(error) = thread.spawn(move || run(ledger, queue)) {
            // The closure, and with it the queue's receiver, is dropped, so sends fail.
            debug!(%error, "attendance ledger thread did not start");
        }
        LedgerHandle { commands }
    }

    /// Appends an event; resolves only after the entry is committed to disk.
    ///
    /// Dropping the future after the command was queued does not cancel it: the entry may
    /// still be written.
    pub async fn append(&self, event: Event) -> Result<Entry, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append { event, reply })
            .await
            .map_err(|_| LedgerError::Closed)?;
        // A dropped reply means the thread died mid-command (a panic inside database code).
        answer.await.map_err(|_| LedgerError::Closed)?
    }

    /// Every entry of one session, in ledger order; see [`Ledger::session_events`].
    pub async fn session_events(&self, session: SessionId) -> Result<Vec<Entry>, LedgerError> {
        self.run(move |l| l.session_events(&session)).await
    }

    /// Walks the whole chain; see [`Ledger::verify`]. Appends wait while it runs.
    pub async fn verify(&self) -> Result<VerifyReport, LedgerError> {
        self.run(|l| l.verify()).await
    }

    /// Records that `node` is alive now, then closes the open stays of other nodes that are
    /// gone, at their last heartbeat; returns those nodes (see [`Ledger::heartbeat_at`]).
    /// Call every [`HEARTBEAT_INTERVAL`](crate::HEARTBEAT_INTERVAL); it overwrites one row.
    /// The first call of a node in a process runs [`LedgerHandle::recover`] first.
    pub async fn heartbeat(
        &self,
        node: NodeId,
    ) -> Result<Vec<(NodeId, RecoveryReport)>, LedgerError> {
        self.run(move |l| l.heartbeat(&node)).await
    }

    /// Closes stays a crashed run of `node` left open, at its last heartbeat; see
    /// [`Ledger::recover`]. Call once at start-up, before the server records anything.
    pub async fn recover(&self, node: NodeId) -> Result<RecoveryReport, LedgerError> {
        self.run(move |l| l.recover(&node)).await
    }

    /// Writes one read to the audit log, durably; see [`Ledger::record_read`].
    pub async fn record_read(&self, auditor: StaffId, what: String) -> Result<u64, LedgerError> {
        self.run(move |l| l.record_read(&auditor, &what)).await
    }

    /// The per-session report for an auditor; the read is logged first, and without a
    /// logged read there is no report.
    pub async fn session_report(
        &self,
        auditor: StaffId,
        session: SessionId,
        rules: AttendanceRules,
    ) -> Result<SessionReport, LedgerError> {
        self.run(move |l| {
            l.record_read(&auditor, &format!("session {session}"))?;
            let entries = l.session_events(&session)?;
            Ok(crate::session_report(&entries, &rules.counting()))
        })
        .await
    }

    /// A client's days and weeks from `from` to `to` for an auditor; the read is logged first.
    pub async fn client_weeks(
        &self,
        auditor: StaffId,
        client: ParticipantId,
        from: IsoWeek,
        to: IsoWeek,
        rules: AttendanceRules,
    ) -> Result<ClientWeeksReport, LedgerError> {
        self.run(move |l| {
            l.record_read(&auditor, &format!("client {client} weeks {from} to {to}"))?;
            crate::client_weeks(l, &rules, &client, from, to)
        })
        .await
    }

    /// One program's week for an auditor, short clients first; the read is logged first.
    pub async fn program_week(
        &self,
        auditor: StaffId,
        program: String,
        week: IsoWeek,
        rules: AttendanceRules,
    ) -> Result<ProgramWeekReport, LedgerError> {
        self.run(move |l| {
            l.record_read(&auditor, &format!("program {program} week {week}"))?;
            crate::program_week(l, &rules, &program, week)
        })
        .await
    }

    /// Runs `f` on the ledger thread and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |l| {
            // A send error only means the caller stopped waiting; the work is done either way.
            let _ = reply.send(f(l));
        });
        self.commands
            .send(Command::Run(job))
            .await
            .map_err(|_| LedgerError::Closed)?;
        answer.await.map_err(|_| LedgerError::Closed)?
    }
}

/// The ledger thread: commands in arrival order, waiting appends committed together.
fn run(mut ledger: Ledger, mut queue: mpsc::Receiver<Command>) {
    trace!("attendance ledger thread started");

    let mut next = queue.blocking_recv();
    while let Some(command) = next.take() {
        match command {
            Command::Run(job) => job(&mut ledger),
            Command::Append { event, reply } => {
                let mut events = vec![event];
                let mut replies = vec![reply];
                // Take the appends already waiting; stop at anything else, which runs after
                // the batch so order is kept.
                while events.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(Command::Append { event, reply }) => {
                            events.push(event);
                            replies.push(reply);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                trace!(events = events.len(), "attendance batch");
                for (reply, result) in replies.into_iter().zip(ledger.append_batch(events)) {
                    let _ = reply.send(result);
                }
            }
        }
        if next.is_none() {
            next = queue.blocking_recv();
        }
    }
    debug!("attendance ledger thread stopped");
}
#[cfg(test)]
mod tests {
    use haven_ids::{ParticipantId, Role};
    use time::macros::datetime;

    use super::*;
    use crate::EventKind;

    fn admitted(session: &str, participant: &str) -> Event {
        Event::participant(
            SessionId::parse(session).expect("valid test id"),
            ParticipantId::parse(participant).expect("valid test id"),
            Role::Client,
            EventKind::Admitted,
            datetime!(2026-03-02 09:00 UTC),
        )
    }

    #[tokio::test]
    async fn appends_from_many_tasks_form_one_intact_chain() {
        let handle = LedgerHandle::spawn(Ledger::open_in_memory().expect("in-memory ledger"));

        let mut tasks = Vec::new();
        for i in 0..20 {
            let h = handle.clone();
            tasks.push(tokio::spawn(async move {
                h.append(admitted("sess-001", &format!("p-{i}"))).await
            }));
        }
        for t in tasks {
            t.await.expect("task finished").expect("append committed");
        }

        let report = handle.verify().await.expect("verify runs");
        assert_eq!(report.entries, 20);
        assert!(report.is_intact(), "{report:?}");
    }

    #[tokio::test]
    async fn session_events_returns_only_that_session_in_order() {
        let handle = LedgerHandle::spawn(Ledger::open_in_memory().expect("in-memory ledger"));
        handle
            .append(admitted("sess-001", "p-7f3a"))
            .await
            .expect("append");
        handle
            .append(admitted("sess-002", "p-7f3a"))
            .await
            .expect("append");
        handle
            .append(admitted("sess-001", "p-91c2"))
            .await
            .expect("append");

        let session = SessionId::parse("sess-001").expect("valid test id");
        let entries = handle.session_events(session).await.expect("read");

        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 3]);
    }

    #[tokio::test]
    async fn invalid_event_error_reaches_the_caller() {
        let handle = LedgerHandle::spawn(Ledger::open_in_memory().expect("in-memory ledger"));
        let mut e = admitted("sess-001", "p-7f3a");
        e.participant_id = None;

        let err = handle.append(e).await.expect_err("refused");
        assert_eq!(err.code(), "ledger_invalid_event");
    }

    #[tokio::test]
    async fn append_resolves_after_the_row_is_readable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.sqlite");
        let handle = LedgerHandle::spawn(Ledger::open(&path).expect("open"));

        let entry = handle
            .append(admitted("sess-001", "p-7f3a"))
            .await
            .expect("append");

        // A separate connection sees the committed row as soon as append returned.
        let mut other = Ledger::open(&path).expect("second connection");
        assert_eq!(other.count().expect("count"), 1);
        assert_eq!(entry.seq, 1);
    }
}
