//! The hash that links each ledger entry to the one before it.
//!
//! ```text
//! hash = hex(sha256(prev_hash || encode(seq) || encode(session_id) || encode(participant_id)
//!                   || encode(role) || encode(kind_json) || encode(at) || encode(recorded_at)
//!                   || encode(prev_hash)))
//! ```
//!
//! where `prev_hash` in front is the 64 ASCII hex characters and `encode` writes one SQLite
//! value with its storage class, so that no two different rows can encode alike:
//!
//! | value | bytes |
//! |---|---|
//! | NULL | `0x00` |
//! | INTEGER | `0x01`, 8 bytes big-endian two's complement |
//! | REAL | `0x02`, 8 bytes big-endian IEEE 754 bits |
//! | TEXT | `0x03`, length as 8 bytes big-endian, the UTF-8 bytes |
//! | BLOB | `0x04`, length as 8 bytes big-endian, the bytes |
//!
//! The hash is computed from the values exactly as the database stores them ([`Cell`]), so
//! verification needs no knowledge of what the columns mean and, on SQLite, also catches a
//! change of storage class. PostgreSQL columns are typed, so there a value always reads back
//! as the class it was written with, and both backends produce the same hashes for the same
//! entries.
//!
//! The audit log of reads is a second chain with the same encoding over its own columns
//! (`seq`, `auditor_id`, `what`, `at`, `prev_hash`).

use sha2::{Digest, Sha256};

/// One stored value, as read back from either backend.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Cell {
    #[default]
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cell {
    pub(crate) fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    pub(crate) fn opt_text(s: Option<impl Into<String>>) -> Cell {
        s.map_or(Cell::Null, |s| Cell::Text(s.into()))
    }

    pub(crate) fn as_text(&self) -> Option<&str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_integer(&self) -> Option<i64> {
        match self {
            Cell::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

/// The `prev_hash` of the first entry.
pub(crate) const GENESIS_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// Hex SHA-256 of one row, given its hashed columns in order (eight for an entry, five for
/// a read in the audit log).
pub(crate) fn entry_hash(prev_hash: &str, columns: &[Cell]) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    for value in columns {
        encode(&mut h, value);
    }
    hex::encode(h.finalize())
}

fn encode(h: &mut Sha256, value: &Cell) {
    match value {
        Cell::Null => h.update([0x00]),
        Cell::Integer(i) => {
            h.update([0x01]);
            h.update(i.to_be_bytes());
        }
        Cell::Real(f) => {
            h.update([0x02]);
            h.update(f.to_bits().to_be_bytes());
        }
        Cell::Text(s) => with_len(h, 0x03, s.as_bytes()),
        Cell::Blob(bytes) => with_len(h, 0x04, bytes),
    }
}

fn with_len(h: &mut Sha256, tag: u8, bytes: &[u8]) {
    // usize always fits in u64 on the platforms Rust supports.
    let len = bytes.len() as u64;
    h.update([tag]);
    h.update(len.to_be_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(session: &str, participant: Option<&str>) -> [Cell; 8] {
        [
            Cell::Integer(1),
            Cell::text(session),
            Cell::opt_text(participant),
            Cell::Null,
            Cell::text(r#"{"type":"admitted"}"#),
            Cell::Integer(1_000),
            Cell::Integer(2_000),
            Cell::text(GENESIS_HASH),
        ]
    }

    #[test]
    fn moving_bytes_between_columns_changes_the_hash() {
        let a = entry_hash(GENESIS_HASH, &row("sess-001", Some("p-7f3a")));
        let b = entry_hash(GENESIS_HASH, &row("sess-001p-7f3a", Some("")));

        assert_ne!(a, b);
    }

    #[test]
    fn null_and_empty_text_hash_differently() {
        let a = entry_hash(GENESIS_HASH, &row("sess-001", None));
        let b = entry_hash(GENESIS_HASH, &row("sess-001", Some("")));

        assert_ne!(a, b);
    }

    #[test]
    fn integer_and_text_of_same_digits_hash_differently() {
        let mut text = row("sess-001", None);
        text[5] = Cell::text("1000");

        assert_ne!(
            entry_hash(GENESIS_HASH, &row("sess-001", None)),
            entry_hash(GENESIS_HASH, &text)
        );
    }

    #[test]
    fn hash_depends_on_previous_hash() {
        let other_prev = "1".repeat(64);

        assert_ne!(
            entry_hash(GENESIS_HASH, &row("sess-001", None)),
            entry_hash(&other_prev, &row("sess-001", None))
        );
    }

    #[test]
    fn hash_is_64_lowercase_hex() {
        let h = entry_hash(GENESIS_HASH, &row("sess-001", None));

        assert_eq!(h.len(), 64);
        assert!(h
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
