//! Short-lived TURN credentials for the `joined` message.
//!
//! The scheme is the shared-secret one that coturn checks with `use-auth-secret` (often called
//! the TURN REST API): the username is `<unix time of expiry>:<participant id>` and the
//! password is base64(HMAC-SHA1(secret, username)). The TURN server needs only the secret to
//! check a credential, so Haven keeps no state per credential and the two never talk.
//!
//! A credential stops working at its expiry, for refreshing an allocation made with it too,
//! so its lifetime must cover a whole session and its overrun; a resume gets fresh ones.

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use haven_ids::ParticipantId;
use time::OffsetDateTime;

use crate::protocol::IceServerView;

/// One TURN server (its `turn:` and `turns:` URLs) and the secret it shares with Haven.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnServer {
    pub urls: Vec<String>,
    pub secret: String,
}

// The secret never reaches a log line through `{:?}`.
impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer")
            .field("urls", &self.urls)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The TURN servers of a node and how long the credentials for them last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnPolicy {
    /// Empty: no TURN, and `joined` carries an empty `ice_servers` list.
    pub servers: Vec<TurnServer>,
    pub credential_ttl: Duration,
}

impl Default for TurnPolicy {
    fn default() -> Self {
        TurnPolicy {
            servers: Vec::new(),
            credential_ttl: Duration::from_secs(6 * 3600),
        }
    }
}

impl TurnPolicy {
    /// Credentials for `who`, valid from `now` for the policy's lifetime, one entry per server.
    pub fn ice_servers(&self, who: &ParticipantId, now: OffsetDateTime) -> Vec<IceServerView> {
        let ttl = i64::try_from(self.credential_ttl.as_secs()).unwrap_or(i64::MAX);
        let expires = now.unix_timestamp().saturating_add(ttl);
        let username = format!("{expires}:{who}");
        self.servers
            .iter()
            .map(|s| IceServerView {
                urls: s.urls.clone(),
                username: username.clone(),
                credential: credential(&s.secret, &username),
            })
            .collect()
    }
}

/// base64(HMAC-SHA1(secret, username)): what coturn computes from its `static-auth-secret`.
fn credential(secret: &str, username: &str) -> String {
    // SHA-1 because the TURN scheme fixes it; as an HMAC it is not open to collision attacks.
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let tag = hmac::sign(&key, username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "an-example-secret-of-32-bytes-xx";

    #[test]
    fn credential_matches_the_turn_rest_scheme() {
        // Computed independently: printf %s "$user" | openssl dgst -sha1 -hmac "$secret"
        // -binary | base64
        assert_eq!(
            credential(SECRET, "1700000000:p-7f3a"),
            "SVJv94wRFUCx+FBLkK2l203DyH8="
        );
    }

    #[test]
    fn username_carries_expiry_and_participant() {
        let policy = TurnPolicy {
            servers: vec![TurnServer {
                urls: vec!["turn:turn.example.org:3478?transport=udp".into()],
                secret: SECRET.into(),
            }],
            credential_ttl: Duration::from_secs(600),
        };
        let who = ParticipantId::parse("p-7f3a").expect("valid id");
        let now = OffsetDateTime::from_unix_timestamp(1_699_999_400).expect("valid time");
        let servers = policy.ice_servers(&who, now);
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].username, "1700000000:p-7f3a");
        assert_eq!(servers[0].credential, "SVJv94wRFUCx+FBLkK2l203DyH8=");
        assert_eq!(servers[0].urls, policy.servers[0].urls);
    }

    #[test]
    fn no_servers_means_an_empty_list_and_no_secret_in_debug() {
        let who = ParticipantId::parse("p-1").expect("valid id");
        let none = TurnPolicy::default().ice_servers(&who, OffsetDateTime::now_utc());
        assert!(none.is_empty());

        let server = TurnServer {
            urls: vec![],
            secret: SECRET.into(),
        };
        assert!(!format!("{server:?}").contains(SECRET));
    }
}
