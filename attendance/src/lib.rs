//! Haven's attendance ledger: what happened in each session, stored so that any later change
//! shows, and the rules that turn it into credited client time.
//!
//! # Crate map
//!
//! - [`event`]: what is recorded. [`Event`] (as the server reports it), [`EventKind`],
//!   [`LeaveReason`], [`Modality`], [`AgeGroup`], [`Amendment`] with its [`Correction`], and
//!   [`Entry`] (an event as stored, with its hashes).
//! - [`ledger`]: [`Ledger`]: append (one event or a batch in one transaction), read back,
//!   [`Ledger::verify`] both hash chains, node heartbeats and [`Ledger::recover`], the audit
//!   log of reads ([`Ledger::record_read`]).
//! - [`store`]: the [`Store`] trait and its backends, SQLite (default) and PostgreSQL.
//! - [`chain`]: the canonical encoding of a row and its SHA-256 hash, specified for anyone
//!   who wants to check the ledger with other tools.
//! - [`handle`]: [`LedgerHandle`], the async front that servers use; one thread owns the
//!   ledger, tasks send it typed commands, appends waiting together share one commit.
//! - [`counting`]: [`session_report`] applies the counting rules (grace period, therapist
//!   presence, window, amendments) under [`CountingRules`].
//! - [`rules`]: [`AttendanceRules`], program rules as configuration, and [`Rounding`].
//! - [`weekly`]: [`client_weeks`] and [`program_week`]: local days and ISO weeks against the
//!   requirement, with a [`Status`].
//! - `report`: table, CSV and JSON of every report.
//! - [`error`]: [`LedgerError`], with a stable code per variant.
//!
//! The rules and the reason for each are in `docs/attendance.md`.
//!
//! # Storage and integrity
//!
//! Each entry stores the SHA-256 of its own columns and of the entry before, and
//! [`Ledger::verify`] recomputes them all. Times are stored as unix nanoseconds (UTC). An
//! append is one transaction, durable when it returns (SQLite: WAL with `synchronous=FULL`;
//! PostgreSQL: `synchronous_commit=on`).

pub mod chain;
pub mod counting;
pub mod error;
pub mod event;
pub mod handle;
pub mod ledger;
pub mod rules;
pub mod store;
pub mod weekly;

mod report;

pub use counting::{
    session_report, AppliedAmendment, CountingRules, ParticipantReport, SessionReport, StayReport,
    Stretch,
};
pub use error::LedgerError;
pub use event::{
    AgeGroup, Amendment, Correction, Entry, Event, EventKind, LeaveReason, Modality, StaffId,
};
pub use handle::LedgerHandle;
pub use ledger::{
    BadEntry, Ledger, Location, NodeId, RecoveryReport, VerifyReport, HEARTBEAT_INTERVAL,
    HEARTBEAT_STALE,
};
pub use report::{entries_csv, entries_json, Format};
pub use rules::{AttendanceRules, ProgramRules, Requirement, Rounding};
pub use store::{IndexedSession, Store};
pub use weekly::{
    client_weeks, program_week, ClientWeeksReport, DayLine, IsoWeek, ProgramWeekReport, Status,
    WeekLine,
};

/// The ledger's file name inside the data directory.
pub const LEDGER_FILE: &str = "attendance.sqlite3";
