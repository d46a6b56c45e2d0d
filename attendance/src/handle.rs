//! The async front of the ledger: one thread owns the [`Ledger`], tasks send it commands.
//!
//! SQLite calls block, and an fsync on commit can take milliseconds, so they run on a thread
//! of their own instead of a runtime worker. Commands go over a bounded queue and each carries
//! a oneshot for its reply; there is no lock to share.

use haven_ids::SessionId;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace};

use crate::{Entry, Event, Ledger, LedgerError, VerifyReport};

/// Commands waiting for the ledger thread. When the queue is full, callers wait in `send`:
/// the back-pressure reaches the tasks that produce events instead of growing memory.
const QUEUE_DEPTH: usize = 256;

enum Command {
    Append {
        event: Event,
        reply: oneshot::Sender<Result<Entry, LedgerError>>,
    },
    SessionEvents {
        session: SessionId,
        reply: oneshot::Sender<Result<Vec<Entry>, LedgerError>>,
    },
    Verify {
        reply: oneshot::Sender<Result<VerifyReport, LedgerError>>,
    },
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
        self.ask(|reply| Command::Append { event, reply }).await
    }

    /// Every entry of one session, in ledger order; see [`Ledger::session_events`].
    pub async fn session_events(&self, session: SessionId) -> Result<Vec<Entry>, LedgerError> {
        self.ask(|reply| Command::SessionEvents { session, reply })
            .await
    }

    /// Walks the whole chain; see [`Ledger::verify`]. Appends wait while it runs.
    pub async fn verify(&self) -> Result<VerifyReport, LedgerError> {
        self.ask(|reply| Command::Verify { reply }).await
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, LedgerError>>) -> Command,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| LedgerError::Closed)?;

        // A dropped reply means the thread died mid-command (a panic inside SQLite code).
        answer.await.map_err(|_| LedgerError::Closed)?
    }
}

/// The ledger thread: one command at a time, in arrival order.
fn run(mut ledger: Ledger, mut queue: mpsc::Receiver<Command>) {
    trace!("attendance ledger thread started");

    // A send error only means the caller stopped waiting; the work is done either way.
    while let Some(command) = queue.blocking_recv() {
        match command {
            Command::Append { event, reply } => {
                let _ = reply.send(ledger.append(event));
            }
            Command::SessionEvents { session, reply } => {
                let _ = reply.send(ledger.session_events(&session));
            }
            Command::Verify { reply } => {
                let _ = reply.send(ledger.verify());
            }
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
        let other = Ledger::open(&path).expect("second connection");
        assert_eq!(other.count().expect("count"), 1);
        assert_eq!(entry.seq, 1);
    }
}
