//! Haven's signaling server: HTTP, the WebSocket protocol and the session lifecycle.
//!
//! Map of the crate:
//!
//! - [`app`] builds the axum router: `/healthz`, `/ws`, and the web client.
//! - `conn`: one WebSocket connection, from `join` to close.
//! - `session`: one actor per scheduled session: waiting room, admission, the ledger events.
//! - `router`: finds (or opens) a session's actor; in process on one node.
//! - `token`: join tokens and the rules that check them.
//! - `limits`: every limit on what comes in (sizes, rates, connection counts, timeouts).
//! - `permission`: the table of who may do what.
//! - `revocation`: tokens that may no longer join (removed people, revocations).
//! - `turn`: short-lived TURN credentials handed out in `joined`.
//! - `api`: the HTTP API for the scheduling system (revocations).
//! - `compliance`: the HTTP API for auditors (attendance reports, every read logged).
//! - `protocol`: the message types of `docs/protocol.md`.
//! - `error`: the one error type, with stable codes.
//! - `web`: the embedded web client and its security headers.

mod api;
mod compliance;
mod conn;
mod error;
pub mod limits;
pub mod metrics;
pub mod permission;
pub mod protocol;
pub mod revocation;
mod router;
mod session;
pub mod token;
pub mod turn;
mod web;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub use error::{ErrorCode, SignalError};
use limits::ConnectionCounter;
pub use limits::Limits;
pub use router::RouterHandle;
pub use session::{Capacity, SessionDeps, SessionPolicy};
pub use token::{JoinClaims, JoinGrant, SessionClaim, TokenRules, TokenVerifier, TrustedKey};
pub use turn::{TurnPolicy, TurnServer};

/// Shared, read-mostly state of the server. Mutable state lives in the session actors.
pub struct ServerState {
    pub tokens: TokenVerifier,
    pub router: RouterHandle,
    pub revocations: Arc<revocation::RevocationList>,
    pub limits: Limits,
    /// Origins allowed to open the WebSocket besides the server's own.
    pub allowed_origins: Vec<String>,
    pub ledger: attendance::LedgerHandle,
    pub attendance_rules: attendance::AttendanceRules,
    pub metrics: Arc<metrics::Metrics>,
    connections: Arc<ConnectionCounter>,
    next_conn: AtomicU64,
    ready: AtomicBool,
    draining: AtomicBool,
}

/// Settings of the HTTP side.
#[derive(Clone, Debug, Default)]
pub struct HttpSettings {
    pub limits: Limits,
    pub allowed_origins: Vec<String>,
    /// The rules attendance reports are computed with.
    pub attendance_rules: attendance::AttendanceRules,
}

impl ServerState {
    pub fn new(tokens: TokenVerifier, deps: SessionDeps, http: HttpSettings) -> Arc<ServerState> {
        Arc::new(ServerState {
            tokens,
            revocations: deps.revocations.clone(),
            ledger: deps.ledger.clone(),
            attendance_rules: http.attendance_rules,
            metrics: deps.metrics.clone(),
            router: RouterHandle::spawn(deps),
            limits: http.limits,
            allowed_origins: http.allowed_origins,
            connections: Arc::new(ConnectionCounter::default()),
            next_conn: AtomicU64::new(1),
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        })
    }

    /// Readiness as `/healthz` reports it.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Drains the node: no new joins (readiness false), everyone is told the node is going
    /// away, sessions get until `deadline` to end on their own; then every remaining stay
    /// ends with `server_shutdown`, ledger entries written. `stop_now` cuts the wait short
    /// (a second SIGTERM); the ledger entries are still written.
    pub async fn drain(
        &self,
        deadline: std::time::Duration,
        stop_now: impl std::future::Future<Output = ()>,
    ) {
        self.draining.store(true, Ordering::Relaxed);
        self.set_ready(false);
        let until = time::OffsetDateTime::now_utc() + deadline;
        tracing::info!(
            deadline_s = deadline.as_secs(),
            "draining: no new joins, waiting for sessions to end"
        );
        self.router.going_away(until).await;

        let wait = async {
            let end = tokio::time::Instant::now() + deadline;
            loop {
                let people = self.router.people().await;
                if people == 0 {
                    tracing::info!("drain: every session has ended");
                    return;
                }
                if tokio::time::Instant::now() >= end {
                    tracing::info!(people, "drain deadline reached");
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        };
        tokio::select! {
            _ = wait => {},
            _ = stop_now => tracing::info!("second signal: stopping now"),
        }
        self.router.shutdown().await;
    }
}

/// The HTTP application.
pub fn app(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws))
        .route("/api/v1/revocations", axum::routing::post(api::revoke))
        .route("/api/v1/attendance/sessions/{id}", get(compliance::session))
        .route(
            "/api/v1/attendance/clients/{id}/weeks",
            get(compliance::client_weeks),
        )
        .route(
            "/api/v1/attendance/programs/{program}/weeks/{week}",
            get(compliance::program_week),
        )
        .route("/", get(web::index))
        .route("/join", get(web::index))
        .fallback(get(web::static_file))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_limits,
        ))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<ServerState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

/// Prometheus metrics, for a scraper on the same machine only (see `metrics`).
async fn metrics(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
) -> Response {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "metrics are served to loopback only\n",
        )
            .into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn ws(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&headers, &state.allowed_origins) {
        return (StatusCode::FORBIDDEN, "cross-origin WebSocket refused\n").into_response();
    }
    let slot = match state.connections.open(peer.ip(), &state.limits) {
        Ok(slot) => slot,
        Err(limits::Refused::TooManyFromAddress) => {
            tracing::warn!("too many connections from one address, refused");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address\n",
            )
                .into_response();
        }
        Err(limits::Refused::TooManyPending) => {
            tracing::warn!("too many connections waiting to join, refused");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections waiting to join\n",
            )
                .into_response();
        }
    };
    // Frames up to twice the message limit are read so that an oversized message can be
    // answered with close code 1009 rather than a broken connection.
    let max = state.limits.max_message_bytes * 2;
    upgrade
        // Signaling messages are small: a 128 KiB read buffer (the default) for every
        // participant would be 0.125 MiB each, for nothing.
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| conn::serve(socket, state, slot))
}

/// The WebSocket read buffer; larger messages are read in several chunks.
const WS_READ_BUFFER: usize = 8 * 1024;

/// Refuses requests whose target or headers are too large, before any handler runs.
async fn request_limits(
    State(state): State<Arc<ServerState>>,
    req: Request,
    next: Next,
) -> Response {
    let url = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().len())
        .unwrap_or(0);
    if url > state.limits.max_url_bytes {
        return (StatusCode::URI_TOO_LONG, "request target too long\n").into_response();
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > state.limits.max_header_bytes {
        return (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// A browser always sends `Origin` on a WebSocket; it must name the host it connects to or
/// one of the configured origins, so a page on another site cannot open a socket here with
/// the user's credentials. Clients that are not browsers send none.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin.is_some_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o))) {
        return true;
    }
    same_origin(headers)
}

fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin);
    origin_host.eq_ignore_ascii_case(host)
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(web::CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(self), microphone=(self)"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_origin_websocket_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7600"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7600"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
    }
}
