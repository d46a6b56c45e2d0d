//! Tokens that may no longer join: removed participants and revocations from the scheduling
//! system.
//!
//! Each entry lives until the token it concerns would have expired anyway. Entries are kept
//! in memory and appended to a file in the data directory, so a restart does not let a
//! removed person back in.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use haven_ids::{ParticipantId, SessionId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What is revoked: one token, or one person in one session whatever token they hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Revoked {
    Token {
        jti: String,
    },
    Subject {
        session: SessionId,
        subject: ParticipantId,
    },
}

#[derive(Serialize, Deserialize)]
struct Line {
    #[serde(flatten)]
    what: Revoked,
    until: i64,
}

/// The revocation list of this node. The lock is held only to read or insert one entry; it
/// is never on the media path.
pub struct RevocationList {
    entries: Mutex<HashMap<Revoked, i64>>,
    file: Option<PathBuf>,
}

impl RevocationList {
    pub fn in_memory() -> Self {
        RevocationList {
            entries: Mutex::new(HashMap::new()),
            file: None,
        }
    }

    /// Loads the list from `path` (created when missing), dropping entries that expired.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut entries = HashMap::new();
        if path.exists() {
            for line in BufReader::new(std::fs::File::open(path)?).lines() {
                // A torn last line (crash during append) is skipped, not fatal.
                if let Ok(l) = serde_json::from_str::<Line>(&line?) {
                    if l.until > now {
                        entries.insert(l.what, l.until);
                    }
                }
            }
        }
        Ok(RevocationList {
            entries: Mutex::new(entries),
            file: Some(path.to_owned()),
        })
    }

    /// Revokes until `until`, durably when backed by a file.
    pub fn revoke(&self, what: Revoked, until: OffsetDateTime) -> std::io::Result<()> {
        let until = until.unix_timestamp();
        if let Some(path) = &self.file {
            let line = serde_json::to_string(&Line {
                what: what.clone(),
                until,
            })
            .unwrap_or_default();
            let mut f = OpenOptions::new().create(true).append(true).open(path)?;
            writeln!(f, "{line}")?;
            f.sync_data()?;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.entry(what).or_insert(until);
        *e = (*e).max(until);
        Ok(())
    }

    pub fn is_revoked(&self, jti: &str, session: &SessionId, subject: &ParticipantId) -> bool {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let live = |k: &Revoked| entries.get(k).is_some_and(|until| *until > now);
        live(&Revoked::Token {
            jti: jti.to_owned(),
        }) || live(&Revoked::Subject {
            session: session.clone(),
            subject: subject.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_survive_a_restart_and_expire() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revocations.jsonl");
        let s = SessionId::parse("sess-r").expect("id");
        let p = ParticipantId::parse("p-r1").expect("id");
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let past = OffsetDateTime::now_utc() - time::Duration::hours(1);

        let list = RevocationList::open(&path).expect("open");
        list.revoke(
            Revoked::Token {
                jti: "tok-1".into(),
            },
            later,
        )
        .expect("revoke");
        list.revoke(
            Revoked::Token {
                jti: "tok-old".into(),
            },
            past,
        )
        .expect("revoke");
        assert!(list.is_revoked("tok-1", &s, &p));
        assert!(!list.is_revoked("tok-old", &s, &p));
        drop(list);

        let list = RevocationList::open(&path).expect("reopen");
        assert!(list.is_revoked("tok-1", &s, &p));
        assert!(!list.is_revoked("tok-2", &s, &p));
        list.revoke(
            Revoked::Subject {
                session: s.clone(),
                subject: p.clone(),
            },
            later,
        )
        .expect("revoke");
        assert!(list.is_revoked("tok-2", &s, &p));
    }
}
