//! The HTTP API for the scheduling system.
//!
//! `POST /api/v1/revocations` revokes one token (by `jti`) or one person in one session, for
//! as long as the caller says (by default a week, longer than any join token lives), and
//! disconnects whoever holds it. The caller authenticates with a JWT signed by a trusted
//! issuer key whose `scope` includes `revocations`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use haven_ids::{ParticipantId, SessionId};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::error::{ErrorCode, SignalError};
use crate::protocol::ServerMsg;
use crate::revocation::Revoked;
use crate::ServerState;

/// Revocations last this long unless the caller gives `until`.
const DEFAULT_REVOCATION: time::Duration = time::Duration::days(7);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRequest {
    jti: Option<String>,
    session_id: Option<String>,
    subject: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    until: Option<OffsetDateTime>,
}

pub async fn revoke(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Result<Json<RevocationRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let now = OffsetDateTime::now_utc();
    let token = bearer(&headers);
    let Some(token) = token else {
        return error(
            StatusCode::UNAUTHORIZED,
            SignalError::new(ErrorCode::Unauthorized, "Send a bearer token."),
        );
    };
    if let Err(e) = state.tokens.verify_api(token, "revocations") {
        let status = if e.code == ErrorCode::Forbidden {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        return error(status, e);
    }
    let Ok(Json(req)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            SignalError::new(
                ErrorCode::BadMessage,
                "The body must be JSON with jti, or session_id and subject.",
            ),
        );
    };

    let what = match (req.jti, req.session_id, req.subject) {
        (Some(jti), None, None) if !jti.is_empty() && jti.len() <= 128 => Revoked::Token { jti },
        (None, Some(s), Some(p)) => match (SessionId::parse(&s), ParticipantId::parse(&p)) {
            (Ok(session), Ok(subject)) => Revoked::Subject { session, subject },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    SignalError::new(ErrorCode::BadMessage, "Invalid session_id or subject."),
                )
            }
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                SignalError::new(
                    ErrorCode::BadMessage,
                    "Give either jti, or session_id and subject.",
                ),
            );
        }
    };
    let until = req.until.unwrap_or(now + DEFAULT_REVOCATION);
    if let Err(e) = state.revocations.revoke(what.clone(), until) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, SignalError::internal(&e));
    }
    tracing::info!("token revoked by the scheduling system");
    state.router.revoke(what).await;
    StatusCode::NO_CONTENT.into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    v.strip_prefix("Bearer ").map(str::trim)
}

fn error(status: StatusCode, e: SignalError) -> Response {
    (status, Json(ServerMsg::from(&e))).into_response()
}
