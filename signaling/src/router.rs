//! How a connection finds its session.
//!
//! On one node the router is a task with a map from session id to the session's actor; in a
//! cluster it would be an implementation over Redis with the same handle. Callers only see
//! [`RouterHandle::session`].

use std::collections::HashMap;

use haven_ids::SessionId;
use tokio::sync::{mpsc, oneshot};

use crate::revocation::Revoked;
use crate::session::{self, SessionCmd, SessionDeps, SessionHandle};
use crate::token::JoinGrant;

enum RouterCmd {
    Session {
        grant: JoinGrant,
        reply: oneshot::Sender<SessionHandle>,
    },
    Revoke {
        what: Revoked,
    },
    /// Every open session, for node-wide notices.
    All {
        reply: oneshot::Sender<Vec<SessionHandle>>,
    },
    Count {
        reply: oneshot::Sender<usize>,
    },
}

#[derive(Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<RouterCmd>,
}

impl RouterHandle {
    pub fn spawn(deps: SessionDeps) -> RouterHandle {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(run(deps, rx));
        RouterHandle { tx }
    }

    /// The actor of the grant's session, opened if it is not running.
    pub async fn session(&self, grant: &JoinGrant) -> Option<SessionHandle> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(RouterCmd::Session {
                grant: grant.clone(),
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Tells the sessions a revocation names, so they disconnect whoever holds it.
    pub async fn revoke(&self, what: Revoked) {
        let _ = self.tx.send(RouterCmd::Revoke { what }).await;
    }

    /// Every open session of this node.
    pub async fn all(&self) -> Vec<SessionHandle> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(RouterCmd::All { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// How many people are in sessions on this node, waiting or in a room.
    pub async fn people(&self) -> usize {
        let mut n = 0;
        for s in self.all().await {
            let (reply, rx) = oneshot::channel();
            if s.send(SessionCmd::Count { reply }).await {
                n += rx.await.unwrap_or(0);
            }
        }
        n
    }

    /// Tells everyone on the node that it is going away at `deadline`.
    pub async fn going_away(&self, deadline: time::OffsetDateTime) {
        for s in self.all().await {
            s.send(SessionCmd::GoingAway { deadline }).await;
        }
    }

    /// Ends every stay on the node with `server_shutdown`; returns once each session has
    /// written its ledger entries.
    pub async fn shutdown(&self) {
        for s in self.all().await {
            let (reply, rx) = oneshot::channel();
            if s.send(SessionCmd::Shutdown { reply }).await {
                let _ = rx.await;
            }
        }
    }

    /// How many sessions are open on this node.
    pub async fn open_sessions(&self) -> usize {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(RouterCmd::Count { reply }).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }
}

async fn run(deps: SessionDeps, mut rx: mpsc::Receiver<RouterCmd>) {
    let mut sessions: HashMap<SessionId, SessionHandle> = HashMap::new();
    while let Some(cmd) = rx.recv().await {
        // Sessions whose actor has ended (idle and empty) are forgotten here.
        sessions.retain(|_, h| !h.is_closed());
        match cmd {
            RouterCmd::Session { grant, reply } => {
                let handle = sessions
                    .entry(grant.session.clone())
                    .or_insert_with(|| session::spawn(&grant, deps.clone()))
                    .clone();
                let _ = reply.send(handle);
            }
            RouterCmd::Revoke { what } => {
                let targets: Vec<SessionHandle> = match &what {
                    Revoked::Subject { session, .. } => {
                        sessions.get(session).cloned().into_iter().collect()
                    }
                    Revoked::Token { .. } => sessions.values().cloned().collect(),
                };
                for s in targets {
                    // Sessions are independent: a slow one must not hold the router, so each
                    // gets its notice from a task of its own.
                    let what = what.clone();
                    tokio::spawn(async move { s.send(SessionCmd::Revoke { what }).await });
                }
            }
            RouterCmd::All { reply } => {
                let _ = reply.send(sessions.values().cloned().collect());
            }
            RouterCmd::Count { reply } => {
                let _ = reply.send(sessions.len());
            }
        }
    }
}
