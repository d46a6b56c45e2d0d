//! Haven's signaling server: HTTP, the WebSocket protocol and the session lifecycle.
//!
//! Map of the crate:
//!
//! - [`app`] builds the axum router: `/healthz`, `/ws`, and the web client.
//! - `conn`: one WebSocket connection, from `join` to close.
//! - `session`: one actor per scheduled session: waiting room, admission, the ledger events.
//! - `router`: finds (or opens) a session's actor; in process on one node.
//! - `token`: join tokens and the rules that check them.
//! - `permission`: the table of who may do what.
//! - `revocation`: tokens that may no longer join (removed people, revocations).
//! - `api`: the HTTP API for the scheduling system (revocations).
//! - `protocol`: the message types of `docs/protocol.md`.
//! - `error`: the one error type, with stable codes.
//! - `web`: the embedded web client and its security headers.

mod api;
mod conn;
mod error;
pub mod permission;
pub mod protocol;
pub mod revocation;
mod router;
mod session;
pub mod token;
mod web;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub use error::{ErrorCode, SignalError};
pub use router::RouterHandle;
pub use session::{Capacity, SessionDeps, SessionPolicy};
pub use token::{JoinClaims, JoinGrant, SessionClaim, TokenRules, TokenVerifier, TrustedKey};

/// Largest WebSocket message accepted. An SDP offer of a browser is a few kilobytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Shared, read-mostly state of the server. Mutable state lives in the session actors.
pub struct ServerState {
    pub tokens: TokenVerifier,
    pub router: RouterHandle,
    pub revocations: Arc<revocation::RevocationList>,
    next_conn: AtomicU64,
    ready: AtomicBool,
}

impl ServerState {
    pub fn new(tokens: TokenVerifier, deps: SessionDeps) -> Arc<ServerState> {
        Arc::new(ServerState {
            tokens,
            revocations: deps.revocations.clone(),
            router: RouterHandle::spawn(deps),
            next_conn: AtomicU64::new(1),
            ready: AtomicBool::new(true),
        })
    }

    /// Readiness as `/healthz` reports it.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// The HTTP application.
pub fn app(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ws", get(ws))
        .route("/api/v1/revocations", axum::routing::post(api::revoke))
        .route("/", get(web::index))
        .route("/join", get(web::index))
        .fallback(get(web::static_file))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<ServerState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

async fn ws(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin WebSocket refused\n").into_response();
    }
    upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| conn::serve(socket, state))
}

/// A browser always sends `Origin` on a WebSocket; it must name the host it connects to, so a
/// page on another site cannot open a socket here. Clients that are not browsers send none.
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
