//! Typed identifiers and small shared vocabulary for Haven's crates.
//!
//! Every id is its own type so that a participant id can never be passed where a session id
//! belongs. Ids that come from tokens are pseudonymous strings chosen by the scheduling system;
//! ids Haven makes itself (connections) are numbers.
//!
//! - [`SessionId`]: one scheduled therapy session; also the id of the room that hosts it.
//! - [`ParticipantId`]: the token's subject, a pseudonymous participant id.
//! - [`ConnId`]: one WebSocket connection, for log correlation.
//! - [`Role`], [`SessionKind`]: what the token says about who joins and what kind of session.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id accepted from a token. Longer ids are refused rather than truncated.
pub const MAX_ID_LEN: usize = 128;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Checks the id: 1 to [`MAX_ID_LEN`] characters of `A-Z a-z 0-9 - _ . :`.
            ///
            /// The narrow alphabet keeps ids safe in file names, CSV cells and log fields.
            pub fn parse(s: &str) -> Result<Self, InvalidId> {
                let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_.:".contains(c);
                if s.is_empty() || s.len() > MAX_ID_LEN || !s.chars().all(ok_char) {
                    return Err(InvalidId { kind: stringify!($name) });
                }
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// One scheduled session (and the room that hosts it), as named by the scheduling system.
    SessionId
);
string_id!(
    /// A pseudonymous participant id: the token's subject. Never a clinical name.
    ParticipantId
);

/// An id that does not fit the allowed alphabet or length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId {
    kind: &'static str,
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {}: use 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 - _ . :",
            self.kind
        )
    }
}

impl std::error::Error for InvalidId {}

/// One WebSocket connection on this node, numbered from 1 at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// Who a participant is in a session. The token says it; Haven never changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Client,
    Therapist,
    Sponsor,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Therapist => "therapist",
            Role::Sponsor => "sponsor",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "client" => Some(Role::Client),
            "therapist" => Some(Role::Therapist),
            "sponsor" => Some(Role::Sponsor),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of scheduled session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    Individual,
    Group,
    Family,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Individual => "individual",
            SessionKind::Group => "group",
            SessionKind::Family => "family",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "individual" => Some(SessionKind::Individual),
            "group" => Some(SessionKind::Group),
            "family" => Some(SessionKind::Family),
            _ => None,
        }
    }
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_outside_the_alphabet_are_refused() {
        assert!(SessionId::parse("sess-2026.12:a_b").is_ok());
        assert!(SessionId::parse("").is_err());
        assert!(ParticipantId::parse("has space").is_err());
        assert!(ParticipantId::parse("p\n").is_err());
        assert!(ParticipantId::parse(&"x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn role_names_round_trip() {
        for r in [Role::Client, Role::Therapist, Role::Sponsor, Role::Auditor] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("admin"), None);
    }
}
