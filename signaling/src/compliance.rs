//! The compliance HTTP API: attendance reports for auditors.
//!
//! - `GET /api/v1/attendance/sessions/{id}`
//! - `GET /api/v1/attendance/clients/{id}/weeks?from=2026-W10&to=2026-W12`
//! - `GET /api/v1/attendance/programs/{id}/weeks/{iso-week}`
//!
//! Each needs `Authorization: Bearer <token>` from a trusted issuer with `role: auditor`:
//! no token gets 401, another role 403. JSON by default; CSV with `?format=csv` or
//! `Accept: text/csv`. Every read is written to the ledger's audit log before the report is
//! built, so there is no report without its logged read.

use std::sync::Arc;

use attendance::{IsoWeek, LedgerError, StaffId};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use haven_ids::{ParticipantId, SessionId};
use serde::Deserialize;

use crate::error::{ErrorCode, SignalError};
use crate::protocol::ServerMsg;
use crate::ServerState;

#[derive(Deserialize)]
pub struct FormatQuery {
    format: Option<String>,
}

#[derive(Deserialize)]
pub struct WeeksQuery {
    format: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

enum Format {
    Json,
    Csv,
}

/// A refused request: the status and the error for its body.
type Refusal = Box<(StatusCode, SignalError)>;

fn refuse(status: StatusCode, e: SignalError) -> Refusal {
    Box::new((status, e))
}

fn format_of(query: Option<&str>, headers: &HeaderMap) -> Result<Format, Refusal> {
    match query {
        Some("csv") => return Ok(Format::Csv),
        Some("json") => return Ok(Format::Json),
        Some(_) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                bad("format must be json or csv"),
            ))
        }
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(if accept.contains("text/csv") {
        Format::Csv
    } else {
        Format::Json
    })
}

/// The auditor behind the request, or the response refusing it.
fn auditor(state: &ServerState, headers: &HeaderMap) -> Result<StaffId, Refusal> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        let e = SignalError::new(ErrorCode::Unauthorized, "Send an auditor's bearer token.");
        return Err(refuse(StatusCode::UNAUTHORIZED, e));
    };
    let claims = state.tokens.verify_auditor(token).map_err(|e| {
        let status = if e.code == ErrorCode::Forbidden {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        refuse(status, e)
    })?;
    StaffId::parse(&claims.sub).map_err(|_| {
        refuse(
            StatusCode::UNAUTHORIZED,
            bad("the token's subject is not a valid staff id"),
        )
    })
}

/// The auditor and format of a request, or why it is refused.
fn admit(
    state: &ServerState,
    headers: &HeaderMap,
    format: Option<&str>,
) -> Result<(StaffId, Format), Refusal> {
    Ok((auditor(state, headers)?, format_of(format, headers)?))
}

pub async fn session(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<FormatQuery>,
) -> Response {
    let (who, format) = match admit(&state, &headers, q.format.as_deref()) {
        Ok(v) => v,
        Err(r) => return error(r.0, r.1),
    };
    let Ok(session) = SessionId::parse(&id) else {
        return error(StatusCode::BAD_REQUEST, bad("invalid session id"));
    };
    let rules = state.attendance_rules.clone();
    let rounding = rules.rounding;
    match state.ledger.session_report(who, session, rules).await {
        Ok(r) if r.session_id.is_none() => error(
            StatusCode::NOT_FOUND,
            SignalError::new(ErrorCode::UnknownSession, "The ledger has no such session."),
        ),
        Ok(r) => render(format, r.to_json_with(rounding), || r.to_csv_with(rounding)),
        Err(e) => ledger_error(e),
    }
}

pub async fn client_weeks(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<WeeksQuery>,
) -> Response {
    let (who, format) = match admit(&state, &headers, q.format.as_deref()) {
        Ok(v) => v,
        Err(r) => return error(r.0, r.1),
    };
    let Ok(client) = ParticipantId::parse(&id) else {
        return error(StatusCode::BAD_REQUEST, bad("invalid client id"));
    };
    let (Some(from), Some(to)) = (q.from.as_deref(), q.to.as_deref()) else {
        return error(
            StatusCode::BAD_REQUEST,
            bad("give from and to as ISO weeks, for example 2026-W10"),
        );
    };
    let (Ok(from), Ok(to)) = (IsoWeek::parse(from), IsoWeek::parse(to)) else {
        return error(
            StatusCode::BAD_REQUEST,
            bad("from and to must be ISO weeks, for example 2026-W10"),
        );
    };
    if !range_within(from, to, MAX_WEEKS) {
        let why =
            format!("from must not be after to, and a request covers at most {MAX_WEEKS} weeks");
        return error(StatusCode::BAD_REQUEST, bad(&why));
    }
    match state
        .ledger
        .client_weeks(who, client, from, to, state.attendance_rules.clone())
        .await
    {
        Ok(r) => render(format, r.to_json(), || r.to_csv()),
        Err(e) => ledger_error(e),
    }
}

pub async fn program_week(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path((program, week)): Path<(String, String)>,
    Query(q): Query<FormatQuery>,
) -> Response {
    let (who, format) = match admit(&state, &headers, q.format.as_deref()) {
        Ok(v) => v,
        Err(r) => return error(r.0, r.1),
    };
    let Ok(week) = IsoWeek::parse(&week) else {
        return error(
            StatusCode::BAD_REQUEST,
            bad("the week must be an ISO week, for example 2026-W10"),
        );
    };
    if program.is_empty() || program.len() > 128 {
        return error(StatusCode::BAD_REQUEST, bad("invalid program id"));
    }
    match state
        .ledger
        .program_week(who, program, week, state.attendance_rules.clone())
        .await
    {
        Ok(r) => render(format, r.to_json(), || r.to_csv()),
        Err(e) => ledger_error(e),
    }
}

/// The longest range of weeks one request may cover: two years. The report's cost grows
/// with the range, and one request must not hold the ledger thread (or memory) for long.
const MAX_WEEKS: u32 = 104;

/// Whether `from..=to` is ordered and at most `max` weeks long.
fn range_within(from: IsoWeek, to: IsoWeek, max: u32) -> bool {
    let mut week = from;
    for _ in 0..max {
        if week == to {
            return true;
        }
        if week > to {
            return false;
        }
        week = week.next();
    }
    false
}

fn render(format: Format, json: serde_json::Value, csv: impl FnOnce() -> String) -> Response {
    match format {
        Format::Json => Json(json).into_response(),
        Format::Csv => {
            let mut res = csv().into_response();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            res
        }
    }
}

fn bad(message: &str) -> SignalError {
    SignalError::new(ErrorCode::BadMessage, format!("Bad request: {message}."))
}

fn ledger_error(e: LedgerError) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, SignalError::internal(&e))
}

fn error(status: StatusCode, e: SignalError) -> Response {
    (status, Json(ServerMsg::from(&e))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn week_ranges_are_ordered_and_bounded() {
        let w = |s: &str| IsoWeek::parse(s).expect("week");
        assert!(range_within(w("2026-W10"), w("2026-W10"), MAX_WEEKS));
        assert!(range_within(w("2025-W50"), w("2026-W02"), MAX_WEEKS));
        assert!(!range_within(w("2026-W12"), w("2026-W10"), MAX_WEEKS));
        assert!(!range_within(w("0001-W01"), w("9999-W52"), MAX_WEEKS));
    }
}
