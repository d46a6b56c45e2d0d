//! Haven's attendance ledger: what happened in each session, stored so that any later change
//! shows, and the rules that turn it into credited client time.
//!
//! # Crate map
//!
//! - [`event`]: what is recorded. [`Event`] (as the server reports it), [`EventKind`],
//!   [`LeaveReason`], [`Modality`], and [`Entry`] (an event as stored, with its hashes).
//! - [`ledger`]: [`Ledger`], the append-only SQLite store; [`Ledger::verify`] walks the hash
//!   chain and returns a [`VerifyReport`].
//! - [`chain`]: the canonical encoding of a row and its SHA-256 hash, specified for anyone
//!   who wants to check the ledger with other tools.
//! - [`handle`]: [`LedgerHandle`], the async front that servers use; one thread owns the
//!   ledger and tasks send it typed commands.
//! - [`counting`]: [`session_report`] applies the counting rules under [`CountingRules`].
//! - `report`: [`SessionReport::to_table`], [`SessionReport::to_csv`] and
//!   [`SessionReport::to_json`].
//! - [`error`]: [`LedgerError`], with a stable code per variant.
//!
//! # Counting rules, in short
//!
//! - Media *flows* from `MediaConnected` or `MediaRestored` until `MediaLost`, `Left` or
//!   `SessionEnded`, and only while the participant is admitted: waiting-room time never counts,
//!   and a gap inside one stay is subtracted.
//! - A stay still open at the end of the ledger ends at the session's last entry, never later:
//!   time is not credited past the last proof of presence.
//! - A client is credited for flowing time that overlaps any therapist's flowing time, inside
//!   `[starts_at, ends_at + overrun_allowance]`. Overlapping therapists count once.
//! - Therapists are credited their flowing time inside the window; sponsors and auditors are
//!   never credited.
//! - Seconds are kept raw; reports round minutes to two decimals for display only.
//!
//! The full rules, with the reasons for each, are in the [`counting`] module.
//!
//! # Storage and integrity
//!
//! Each entry stores the SHA-256 of its own columns and of the entry before, and
//! [`Ledger::verify`] recomputes them all. Times are stored as unix nanoseconds (UTC). An
//! append is one SQLite transaction in a WAL journal with `synchronous=FULL`, so it is durable
//! when it returns. See [`ledger`] for the schema and for what the chain cannot show.
//!
//! rusqlite is used rather than sqlx because the ledger is a single writer on its own thread;
//! a PostgreSQL store for clusters is not written yet.

pub mod chain;
pub mod counting;
pub mod error;
pub mod event;
pub mod handle;
pub mod ledger;

mod report;

pub use counting::{session_report, CountingRules, ParticipantReport, SessionReport};
pub use error::LedgerError;
pub use event::{Entry, Event, EventKind, LeaveReason, Modality};
pub use handle::LedgerHandle;
pub use ledger::{BadEntry, Ledger, VerifyReport};
