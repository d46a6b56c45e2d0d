//! The one error type of this crate.

/// Why a ledger call failed.
///
/// Each variant has a stable [`code`](LedgerError::code) that callers may put in an API
/// response or a log field; the codes never change meaning once released.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// SQLite refused a read or write (disk full, file locked, I/O error, ...). Nothing was
    /// written by the call that got it: every append is a single transaction.
    #[error("attendance storage failed: {0}")]
    Storage(#[from] rusqlite::Error),

    /// PostgreSQL refused a read or write, or could not be reached. As with SQLite, nothing
    /// was written by the call that got it.
    #[error("attendance storage (PostgreSQL) failed: {0}")]
    Postgres(#[from] postgres::Error),

    /// A `--database-url` or data directory that cannot be used.
    #[error("attendance storage cannot be opened: {0}")]
    Location(String),

    /// The event was refused before anything was written because it cannot be recorded
    /// meaningfully, e.g. a participant event without a participant id.
    #[error("attendance event refused: {reason}")]
    InvalidEvent { reason: &'static str },

    /// A stored row cannot be read back as an entry, or its hash does not match its columns.
    /// The ledger file was changed outside Haven; run `verify` for the whole chain.
    #[error("attendance ledger entry {seq} is damaged: {problem}")]
    Corrupt { seq: u64, problem: String },

    /// The ledger file was written by a newer (or unknown) version of Haven.
    #[error("attendance ledger schema version {found} is not supported (expected {expected})")]
    UnsupportedSchema { found: i64, expected: i64 },

    /// The ledger thread behind a [`LedgerHandle`](crate::LedgerHandle) has stopped, so
    /// the command was not carried out.
    #[error("attendance ledger is closed")]
    Closed,
}

impl LedgerError {
    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::Storage(_) | LedgerError::Postgres(_) => "ledger_storage",
            LedgerError::Location(_) => "ledger_location",
            LedgerError::InvalidEvent { .. } => "ledger_invalid_event",
            LedgerError::Corrupt { .. } => "ledger_corrupt",
            LedgerError::UnsupportedSchema { .. } => "ledger_schema",
            LedgerError::Closed => "ledger_closed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_prefixed() {
        let all = [
            LedgerError::Storage(rusqlite::Error::InvalidQuery),
            LedgerError::Location("x".into()),
            LedgerError::InvalidEvent { reason: "x" },
            LedgerError::Corrupt {
                seq: 1,
                problem: "x".into(),
            },
            LedgerError::UnsupportedSchema {
                found: 9,
                expected: 1,
            },
            LedgerError::Closed,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(LedgerError::code).collect();

        assert_eq!(codes.len(), all.len());
        assert!(codes.iter().all(|c| c.starts_with("ledger_")));
    }
}
