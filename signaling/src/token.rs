//! Join tokens: what they claim and how Haven checks them.
//!
//! A token is a JWT signed by the scheduling system for one person, one scheduled session and
//! one role. Haven trusts a fixed set of keys, each with its algorithm pinned: the `alg` in a
//! token's header is never what decides how it is checked. Beyond the signature and the usual
//! claims, Haven enforces the session's own window: the waiting room opens a configured time
//! before the start, and nobody new joins after the end plus the allowed overrun.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{ErrorCode, SignalError};

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of a join token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinClaims {
    pub iss: String,
    pub aud: Audience,
    /// The pseudonymous participant id.
    pub sub: String,
    pub role: String,
    pub exp: i64,
    pub nbf: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// The token id; removal and revocation are remembered by it.
    pub jti: String,
    /// A name for screens only; Haven never logs or stores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `adult` or `adolescent`: which weekly requirement applies to a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_group: Option<AgeGroup>,
    pub session: SessionClaim,
}

/// A token's audience: one name or a list of them (RFC 7519, 4.1.3). The signature check
/// has already required Haven's audience among them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(aud: &str) -> Self {
        Audience::One(aud.to_owned())
    }
}

/// The claims of a bearer token for the HTTP API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiClaims {
    pub iss: String,
    pub sub: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Space-separated permissions, for example `revocations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Which weekly intensity requirement applies to a client.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgeGroup {
    Adult,
    Adolescent,
}

/// How people leave the waiting room.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// A therapist admits each person (the default).
    #[default]
    Manual,
    /// Everyone is admitted as soon as a therapist is present.
    Auto,
}

/// Whether sponsors may join, and for which client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SponsorPolicy {
    /// The client the sponsor accompanies; the sponsor is in the room only while they are.
    pub for_client: String,
}

/// The scheduled session a token admits to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClaim {
    pub id: String,
    pub kind: SessionKind,
    #[serde(with = "time::serde::rfc3339")]
    pub starts_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub ends_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    #[serde(default)]
    pub admission: Admission,
    /// Present only in sessions that allow a sponsor; required in a sponsor's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sponsors: Option<SponsorPolicy>,
}

/// A key Haven trusts, with the issuer it belongs to and its pinned algorithm.
#[derive(Clone)]
pub struct TrustedKey {
    pub issuer: String,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    /// When set, only tokens whose header names this `kid` are checked with this key.
    pub kid: Option<String>,
}

/// Rules for checking tokens.
#[derive(Clone, Debug)]
pub struct TokenRules {
    pub audience: String,
    /// Allowed clock difference with the issuer; at most 60 seconds.
    pub leeway: Duration,
    /// How long before the scheduled start the waiting room opens.
    pub join_opens_before: Duration,
    /// How long after the scheduled end people may still join.
    pub overrun: Duration,
}

impl Default for TokenRules {
    fn default() -> Self {
        TokenRules {
            audience: "haven".into(),
            leeway: Duration::from_secs(30),
            join_opens_before: Duration::from_secs(15 * 60),
            overrun: Duration::from_secs(15 * 60),
        }
    }
}

/// What a verified token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinGrant {
    pub participant: ParticipantId,
    pub role: Role,
    pub session: SessionId,
    pub kind: SessionKind,
    pub starts_at: OffsetDateTime,
    pub ends_at: OffsetDateTime,
    pub program: Option<String>,
    pub token_id: String,
    pub expires_at: OffsetDateTime,
    pub display_name: Option<String>,
    pub age_group: Option<AgeGroup>,
    pub admission: Admission,
    /// For a sponsor: the client they accompany.
    pub sponsor_for: Option<ParticipantId>,
}

/// Longest display name shown on screens; longer names are cut, not refused.
const MAX_DISPLAY_NAME: usize = 64;

/// The longest scheduled session a join token may name. Therapy sessions last an hour or
/// three; a day is generous, and a window of years would keep a room open for ever.
pub const MAX_SESSION_LENGTH: time::Duration = time::Duration::hours(24);

pub struct TokenVerifier {
    /// Replaced whole when key files are read again (rotation); a check takes a snapshot, so
    /// the lock is held only to clone an `Arc`.
    keys: RwLock<Arc<Vec<TrustedKey>>>,
    rules: TokenRules,
}

impl TokenVerifier {
    pub fn new(keys: Vec<TrustedKey>, rules: TokenRules) -> Self {
        TokenVerifier {
            keys: RwLock::new(Arc::new(keys)),
            rules,
        }
    }

    /// Trusts `keys` from now on, instead of the ones before (key rotation).
    pub fn replace_keys(&self, keys: Vec<TrustedKey>) {
        let mut current = self.keys.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(keys);
    }

    pub fn rules(&self) -> &TokenRules {
        &self.rules
    }

    /// Checks a token at `now`: signature, claims, role and the session window.
    pub fn verify(&self, token: &str, now: OffsetDateTime) -> Result<JoinGrant, SignalError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid(
                "The join link is too long to be a Haven join link.",
            ));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("The join link is damaged or incomplete."))?;

        let claims = self.decode(token, header.kid.as_deref())?;
        let grant = grant_from(claims)?;
        self.check_window(&grant, now)?;
        Ok(grant)
    }

    /// Checks a bearer token for the HTTP API: a trusted issuer's signature, audience,
    /// expiry, and a `scope` (space-separated) that includes `scope`.
    pub fn verify_api(&self, token: &str, scope: &str) -> Result<ApiClaims, SignalError> {
        let claims = self.decode_bearer(token)?;
        let scopes = claims.scope.as_deref().unwrap_or("");
        if !scopes.split_whitespace().any(|s| s == scope) {
            let message = format!("The token's scope does not include {scope}.");
            return Err(SignalError::new(ErrorCode::Forbidden, message));
        }
        Ok(claims)
    }

    /// Checks an auditor's bearer token: a trusted issuer's signature, audience, expiry and
    /// a role the permission table lets read attendance (any other gets `forbidden`).
    pub fn verify_auditor(&self, token: &str) -> Result<ApiClaims, SignalError> {
        let claims = self.decode_bearer(token)?;
        let role = claims.role.as_deref().and_then(Role::parse);
        let may_read = |r| crate::permission::allowed(r, crate::permission::Action::ReadAttendance);
        if !role.is_some_and(may_read) {
            return Err(SignalError::new(
                ErrorCode::Forbidden,
                "Only auditors may read attendance.",
            ));
        }
        Ok(claims)
    }

    /// The claims of a bearer token whose signature, audience, issuer and expiry hold.
    fn decode_bearer(&self, token: &str) -> Result<ApiClaims, SignalError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("The token is too long."));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("The token is damaged or incomplete."))?;
        self.decode_as(token, header.kid.as_deref(), &["exp", "aud", "iss", "sub"])
    }

    fn decode(&self, token: &str, kid: Option<&str>) -> Result<JoinClaims, SignalError> {
        self.decode_as(token, kid, &["exp", "nbf", "aud", "iss", "sub", "jti"])
    }

    fn decode_as<C: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        kid: Option<&str>,
        required: &[&str],
    ) -> Result<C, SignalError> {
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()));
        let candidates = keys
            .iter()
            .filter(|k| k.kid.is_none() || k.kid.as_deref() == kid);
        let mut last =
            invalid("The join link was not signed by a scheduling system this server trusts.");

        for key in candidates {
            let mut v = Validation::new(key.algorithm);
            v.set_audience(&[&self.rules.audience]);
            v.set_issuer(&[&key.issuer]);
            v.set_required_spec_claims(required);
            v.leeway = self.rules.leeway.as_secs().min(60);
            v.validate_nbf = true;

            match jsonwebtoken::decode::<C>(token, &key.key, &v) {
                Ok(data) => return Ok(data.claims),
                // The signature matched this key, so its verdict on the claims is final.
                Err(e) => match e.kind() {
                    ErrorKind::ExpiredSignature => {
                        return Err(SignalError::new(
                            ErrorCode::TokenExpired,
                            "This join link has expired. Ask your program for a new link.",
                        ));
                    }
                    ErrorKind::ImmatureSignature => {
                        return Err(SignalError::new(
                            ErrorCode::TooEarly,
                            "This join link is not valid yet. Try again closer to the session time.",
                        ));
                    }
                    ErrorKind::InvalidAudience => {
                        return Err(SignalError::new(
                            ErrorCode::WrongAudience,
                            "This link was issued for another service, not for this video server.",
                        ));
                    }
                    ErrorKind::MissingRequiredClaim(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::InvalidIssuer => {
                        last = invalid("The join link is missing information this server needs.");
                    }
                    _ => {}
                },
            }
        }
        Err(last)
    }

    fn check_window(&self, grant: &JoinGrant, now: OffsetDateTime) -> Result<(), SignalError> {
        // Times at the edge of the calendar (year 9999) would overflow.
        let out_of_range = || invalid("The session times in the join link are out of range.");
        let opens_at = grant
            .starts_at
            .checked_sub(duration(self.rules.join_opens_before))
            .ok_or_else(out_of_range)?;
        let closes_at = grant
            .ends_at
            .checked_add(duration(self.rules.overrun))
            .ok_or_else(out_of_range)?;
        if now < opens_at {
            let mut e = SignalError::new(
                ErrorCode::TooEarly,
                format!("The waiting room opens at {}.", rfc3339(opens_at)),
            );
            e.opens_at = Some(opens_at);
            return Err(e);
        }
        if now > closes_at {
            return Err(SignalError::new(
                ErrorCode::SessionOver,
                "This session has ended; it can no longer be joined.",
            ));
        }
        Ok(())
    }
}

fn grant_from(c: JoinClaims) -> Result<JoinGrant, SignalError> {
    let role = Role::parse(&c.role).ok_or_else(|| {
        SignalError::new(
            ErrorCode::RoleNotAllowed,
            "The role in this join link is not one this server knows.",
        )
    })?;
    if role == Role::Auditor {
        return Err(SignalError::new(
            ErrorCode::RoleNotAllowed,
            "Auditors read attendance through the compliance API and never join a session.",
        ));
    }
    let participant = ParticipantId::parse(&c.sub)
        .map_err(|_| invalid("The participant id in the join link is not valid."))?;
    let session = SessionId::parse(&c.session.id)
        .map_err(|_| invalid("The session id in the join link is not valid."))?;
    if c.session.ends_at <= c.session.starts_at {
        return Err(invalid(
            "The session in the join link ends before it starts.",
        ));
    }
    if c.session.ends_at - c.session.starts_at > MAX_SESSION_LENGTH {
        return Err(invalid(
            "The session in the join link is longer than a day; ask the program for a new link.",
        ));
    }
    // An expiry past the calendar (milliseconds by mistake, say) would be remembered as
    // 1970, and a removal of the token would not last.
    let expires_at = OffsetDateTime::from_unix_timestamp(c.exp)
        .map_err(|_| invalid("The join link's expiry is not a valid time."))?;
    if c.jti.is_empty() || c.jti.len() > 128 {
        return Err(invalid("The join link has no valid token id."));
    }

    // A sponsor needs a session that allows sponsors, naming the client they accompany.
    let sponsor_for = match (&c.session.sponsors, role) {
        (Some(p), Role::Sponsor) => Some(ParticipantId::parse(&p.for_client).map_err(|_| {
            SignalError::new(
                ErrorCode::SponsorNotAllowed,
                "The join link does not name a valid client to accompany.",
            )
        })?),
        (None, Role::Sponsor) => {
            return Err(SignalError::new(
                ErrorCode::SponsorNotAllowed,
                "This session does not allow sponsors. Ask the program for a family session link.",
            ));
        }
        _ => None,
    };

    let display_name = c.name.map(|n| {
        n.chars()
            .filter(|c| !c.is_control())
            .take(MAX_DISPLAY_NAME)
            .collect()
    });
    Ok(JoinGrant {
        participant,
        role,
        session,
        kind: c.session.kind,
        starts_at: c.session.starts_at,
        ends_at: c.session.ends_at,
        program: c.session.program,
        token_id: c.jti,
        expires_at,
        display_name,
        age_group: c.age_group,
        admission: c.session.admission,
        sponsor_for,
    })
}

/// A configured duration as a calendar one (saturating; configured durations are minutes).
fn duration(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

fn invalid(message: &str) -> SignalError {
    SignalError::new(ErrorCode::TokenInvalid, message)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
