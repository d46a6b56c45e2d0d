//! The HTTP listener: axum's router served by hyper, with the limits axum's own `serve` does
//! not set.
//!
//! - A client must send its request headers within [`HEADER_READ_TIMEOUT`]; a connection that
//!   trickles them (the "slowloris" attack) is closed instead of holding a file descriptor.
//! - One client address holds at most [`CONNECTIONS_PER_ADDRESS`] TCP connections; further
//!   ones are closed at once.
//!
//! WebSocket upgrades go through the same path; once upgraded, a connection is governed by the
//! signaling limits (`docs/operations.md`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use sfu::per_address::PerAddress;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Time allowed for a request's headers to arrive.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Open TCP connections per client address (WebSockets included; they have a lower limit of
/// their own).
pub const CONNECTIONS_PER_ADDRESS: usize = 256;

/// Serves `app` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) {
    let per_address = PerAddress::new(CONNECTIONS_PER_ADDRESS);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|done| *done) => return,
        };
        let (stream, remote) = match accepted {
            Ok(v) => v,
            Err(e) => {
                // Out of file descriptors, usually: wait rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = per_address.take(remote.ip()) else {
            tracing::debug!("too many connections from one address, closed");
            continue;
        };
        let service = TowerToHyperService::new(
            app.clone()
                .layer(Extension(ConnectInfo::<SocketAddr>(remote))),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::trace!(error = %e, "http connection ended with an error");
            }
        });
    }
}
