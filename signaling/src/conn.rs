//! One WebSocket connection: the join handshake, then relaying between the browser and its
//! session.
//!
//! The connection task owns the socket. Messages from the session arrive on a bounded
//! outbox; the task writes them out in order. Closing the socket, for whatever reason, ends
//! the participant's stay.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attendance::LeaveReason;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use haven_ids::{ConnId, ParticipantId};
use sfu::PcSide;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::error::{ErrorCode, SignalError};
use crate::limits::{ConnectionSlot, MessageRate};
use crate::protocol::{ClientMsg, PcName, ServerMsg};
use crate::session::{MediaAction, SessionCmd, SessionHandle, TherapistAction};
use crate::ServerState;

/// How long a closing connection waits for the browser's Close (and discards what it sends).
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// Close codes (RFC 6455 section 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;
const CLOSE_TRY_AGAIN: u16 = 1013;

pub async fn serve(socket: WebSocket, state: Arc<ServerState>, slot: ConnectionSlot) {
    let conn = ConnId(state.next_conn.fetch_add(1, Ordering::Relaxed));
    let span = tracing::debug_span!(
        "conn",
        conn_id = %conn,
        session_id = tracing::field::Empty,
        participant_id = tracing::field::Empty
    );
    let rate = MessageRate::new(
        state.limits.messages_per_second,
        state.limits.message_burst,
        Instant::now(),
    );
    Conn {
        socket,
        state,
        conn,
        slot,
        rate,
        rate_warnings: 0,
        last_seen: Instant::now(),
    }
    .run()
    .instrument(span)
    .await
}

struct Conn {
    socket: WebSocket,
    state: Arc<ServerState>,
    conn: ConnId,
    /// This socket's place in the per-address and pending counts.
    slot: ConnectionSlot,
    rate: MessageRate,
    rate_warnings: u32,
    /// The last frame of any kind from the browser: its last sign of life.
    last_seen: Instant,
}

/// A frame could not be written: the socket broke, or the browser stopped reading.
#[derive(Debug)]
struct SendError;

/// How a joined connection's relay ended.
enum Ending {
    /// The participant said `leave`.
    Left,
    /// The socket closed or broke, or the browser went silent; the stay waits for a resume
    /// from the last sign of life.
    Lost,
    /// The session sent `left` (or dropped the outbox) and the socket was closed.
    ClosedByServer,
}

/// Where a connection stands once joined.
struct Joined {
    who: ParticipantId,
    session: SessionHandle,
    outbox_rx: mpsc::Receiver<ServerMsg>,
}

impl Conn {
    async fn run(mut self) {
        let joined = match self.handshake().await {
            Ok(Some(j)) => j,
            Ok(None) => return,
            Err(e) => {
                self.fail(&e).await;
                return;
            }
        };
        let span = tracing::Span::current();
        span.record("participant_id", tracing::field::display(&joined.who));

        let Joined {
            who,
            session,
            mut outbox_rx,
        } = joined;
        let conn = self.conn;
        let ending = self.relay(&who, &session, &mut outbox_rx).await;
        let silent_for = self.last_seen.elapsed();
        let last_seen = OffsetDateTime::now_utc() - silent_for;
        match ending {
            // The stay already ended through the session, before `left` was sent.
            Ending::Left => {}
            // Closed by the server (removed, replaced, ended): the session knows already, and
            // ignores this because the stay is gone or belongs to another connection now.
            Ending::Lost | Ending::ClosedByServer => {
                session
                    .send(SessionCmd::Disconnected {
                        who,
                        conn,
                        last_seen,
                    })
                    .await;
            }
        }
    }

    /// Waits for `join`, verifies the token and hands the connection to its session.
    async fn handshake(&mut self) -> Result<Option<Joined>, SignalError> {
        let first =
            match tokio::time::timeout(self.state.limits.join_timeout, self.socket.recv()).await {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return Ok(None),
                Ok(Some(Ok(_))) => {
                    return Err(SignalError::new(
                        ErrorCode::JoinRequired,
                        "Send a join message first.",
                    ))
                }
                Err(_) => {
                    return Err(SignalError::new(
                        ErrorCode::JoinRequired,
                        "No join message arrived in time.",
                    ))
                }
            };
        if first.len() > self.state.limits.max_message_bytes {
            tracing::warn!(len = first.len(), "join message too large, closing");
            self.close(CLOSE_TOO_BIG, "message too large").await;
            return Ok(None);
        }
        let (token, resume) = match ClientMsg::parse(&first) {
            Ok(ClientMsg::Join { token, resume }) => (token, resume),
            Ok(_) => {
                return Err(SignalError::new(
                    ErrorCode::JoinRequired,
                    "Send a join message first.",
                ))
            }
            Err(e) if e.code == ErrorCode::BadMessage => {
                return Err(SignalError::new(
                    ErrorCode::JoinRequired,
                    "The first message must be a join message.",
                ));
            }
            Err(e) => return Err(e),
        };

        if self.state.is_draining() {
            return Err(SignalError::new(
                ErrorCode::ServerDraining,
                "This server is restarting. Try again in a moment; you will reach another one.",
            ));
        }
        let grant = self
            .state
            .tokens
            .verify(&token, OffsetDateTime::now_utc())?;
        tracing::Span::current().record("session_id", tracing::field::display(&grant.session));

        // A session whose actor closed between lookup and send is opened again: try twice.
        for _ in 0..2 {
            let session = self
                .state
                .router
                .session(&grant)
                .await
                .ok_or_else(|| SignalError::internal(&"router stopped"))?;
            let (outbox, outbox_rx) = mpsc::channel(self.state.limits.outbox_messages);
            let (reply, rx) = oneshot::channel();
            let cmd = SessionCmd::Join {
                grant: grant.clone(),
                resume: resume.clone(),
                conn: self.conn,
                outbox,
                reply,
            };
            if !session.send(cmd).await {
                continue;
            }
            match rx.await {
                Ok(Ok(())) => {
                    self.slot.joined();
                    return Ok(Some(Joined {
                        who: grant.participant.clone(),
                        session,
                        outbox_rx,
                    }));
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => continue,
            }
        }
        Err(SignalError::internal(&"session closed during join"))
    }

    /// Relays until the stay ends; returns how it ended.
    async fn relay(
        &mut self,
        who: &ParticipantId,
        session: &SessionHandle,
        outbox: &mut mpsc::Receiver<ServerMsg>,
    ) -> Ending {
        let limits = self.state.limits.clone();
        let mut ping = tokio::time::interval(limits.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                out = outbox.recv() => {
                    let Some(msg) = out else { return Ending::ClosedByServer };
                    let ends = matches!(msg, ServerMsg::Left { .. });
                    if self.send(&msg).await.is_err() {
                        return Ending::Lost;
                    }
                    if ends {
                        self.close(CLOSE_NORMAL, "left").await;
                        return Ending::ClosedByServer;
                    }
                }
                _ = ping.tick() => {
                    if self.last_seen.elapsed() >= limits.silence_timeout {
                        tracing::debug!("connection silent, closing");
                        self.close(CLOSE_GOING_AWAY, "silent").await;
                        return Ending::Lost;
                    }
                    if self.send_frame(Message::Ping(Vec::new().into())).await.is_err() {
                        return Ending::Lost;
                    }
                }
                incoming = self.socket.recv() => {
                    let text = match incoming {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ending::Lost,
                        Some(Ok(_)) => {
                            // Pongs and other frames are signs of life, nothing more.
                            self.last_seen = Instant::now();
                            continue;
                        }
                    };
                    self.last_seen = Instant::now();
                    if text.len() > limits.max_message_bytes {
                        tracing::warn!(len = text.len(), "message too large, closing");
                        self.close(CLOSE_TOO_BIG, "message too large").await;
                        return Ending::Lost;
                    }
                    if !self.rate.allow(Instant::now()) {
                        self.rate_warnings += 1;
                        if self.rate_warnings > limits.rate_warnings {
                            tracing::warn!("message flood, closing");
                            self.close(CLOSE_POLICY, "rate limit").await;
                            return Ending::Lost;
                        }
                        let e = SignalError::new(
                            ErrorCode::RateLimited,
                            "Too many messages; slow down or the connection will be closed.",
                        );
                        if self.send(&ServerMsg::from(&e)).await.is_err() {
                            return Ending::Lost;
                        }
                        continue;
                    }
                    match ClientMsg::parse(&text) {
                        Ok(ClientMsg::Leave) => {
                            // The session ends the stay first, so the minutes shown are final.
                            let (reply, rx) = oneshot::channel();
                            let cmd = SessionCmd::Leave { who: who.clone(), conn: self.conn, reply };
                            let credited_minutes = if session.send(cmd).await { rx.await.ok().flatten() } else { None };
                            let left = ServerMsg::Left { reason: LeaveReason::Left.as_str(), credited_minutes };
                            let _ = self.send(&left).await;
                            self.close(CLOSE_NORMAL, "left").await;
                            return Ending::Left;
                        }
                        Ok(msg) => {
                            if let Err(e) = self.dispatch(who, session, msg).await {
                                if self.send(&ServerMsg::from(&e)).await.is_err() || e.code.closes_socket() {
                                    self.close(CLOSE_INTERNAL, e.code.as_str()).await;
                                    return Ending::Lost;
                                }
                            }
                        }
                        Err(e) => {
                            if self.send(&ServerMsg::from(&e)).await.is_err() {
                                return Ending::Lost;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn dispatch(
        &mut self,
        who: &ParticipantId,
        session: &SessionHandle,
        msg: ClientMsg,
    ) -> Result<(), SignalError> {
        let conn = self.conn;
        let closed = || SignalError::internal(&"session closed");
        match msg {
            ClientMsg::Join { .. } => Err(SignalError::new(
                ErrorCode::AlreadyJoined,
                "This connection has already joined.",
            )),
            ClientMsg::Ping => self.send(&ServerMsg::Pong).await.map_err(|_| closed()),
            ClientMsg::Leave => Ok(()),
            ClientMsg::PublishOffer { sdp, negotiation } => {
                tracing::trace!(%sdp, "publish offer");
                let (reply, rx) = oneshot::channel();
                if !session
                    .send(SessionCmd::PublishOffer {
                        from: who.clone(),
                        conn,
                        sdp,
                        reply,
                    })
                    .await
                {
                    return Err(closed());
                }
                let sdp = rx.await.map_err(|_| closed())??;
                self.send(&ServerMsg::PublishAnswer { sdp, negotiation })
                    .await
                    .map_err(|_| closed())
            }
            ClientMsg::SubscribeAnswer { negotiation, sdp } => {
                let (reply, rx) = oneshot::channel();
                let cmd = SessionCmd::SubscribeAnswer {
                    from: who.clone(),
                    conn,
                    negotiation,
                    sdp,
                    reply,
                };
                if !session.send(cmd).await {
                    return Err(closed());
                }
                rx.await.map_err(|_| closed())?
            }
            ClientMsg::Candidate { pc, candidate } => {
                let side = match pc {
                    PcName::Publish => PcSide::Publish,
                    PcName::Subscribe => PcSide::Subscribe,
                };
                session
                    .send(SessionCmd::Candidate {
                        from: who.clone(),
                        conn,
                        side,
                        candidate,
                    })
                    .await;
                Ok(())
            }
            ClientMsg::VideoSize {
                participant_id,
                width,
                height,
            } => {
                Self::media(
                    conn,
                    who,
                    session,
                    MediaAction::VideoSize {
                        participant_id,
                        width,
                        height,
                    },
                )
                .await
            }
            ClientMsg::AudioOnly { enabled } => {
                Self::media(conn, who, session, MediaAction::AudioOnly(enabled)).await
            }
            ClientMsg::IceRestart => Self::media(conn, who, session, MediaAction::IceRestart).await,
            ClientMsg::Admit { participant_id } => {
                Self::therapist(conn, who, session, TherapistAction::Admit(participant_id)).await
            }
            ClientMsg::Deny { participant_id } => {
                Self::therapist(conn, who, session, TherapistAction::Deny(participant_id)).await
            }
            ClientMsg::Mute {
                participant_id,
                muted,
            } => {
                Self::therapist(
                    conn,
                    who,
                    session,
                    TherapistAction::Mute(participant_id, muted),
                )
                .await
            }
            ClientMsg::Remove { participant_id } => {
                Self::therapist(conn, who, session, TherapistAction::Remove(participant_id)).await
            }
            ClientMsg::EndSession => {
                Self::therapist(conn, who, session, TherapistAction::End).await
            }
        }
    }

    async fn media(
        conn: ConnId,
        who: &ParticipantId,
        session: &SessionHandle,
        action: MediaAction,
    ) -> Result<(), SignalError> {
        let from = who.clone();
        Self::ask(session, |reply| SessionCmd::Media {
            from,
            conn,
            action,
            reply,
        })
        .await
    }

    async fn therapist(
        conn: ConnId,
        who: &ParticipantId,
        session: &SessionHandle,
        action: TherapistAction,
    ) -> Result<(), SignalError> {
        let by = who.clone();
        Self::ask(session, |reply| SessionCmd::Therapist {
            by,
            conn,
            action,
            reply,
        })
        .await
    }

    /// Sends a command that answers on its own channel, and waits for the answer.
    async fn ask(
        session: &SessionHandle,
        make: impl FnOnce(oneshot::Sender<Result<(), SignalError>>) -> SessionCmd,
    ) -> Result<(), SignalError> {
        let (reply, rx) = oneshot::channel();
        if !session.send(make(reply)).await {
            return Err(SignalError::internal(&"session closed"));
        }
        rx.await
            .map_err(|_| SignalError::internal(&"session closed"))?
    }

    async fn send(&mut self, msg: &ServerMsg) -> Result<(), SendError> {
        // Serializing our own message types cannot fail: no maps with non-string keys.
        let text = serde_json::to_string(msg).unwrap_or_default();
        self.send_frame(Message::Text(text.into())).await
    }

    /// Writes one frame, giving up when the browser has not taken it within the send
    /// timeout: a client that stops reading must not hold its connection task forever.
    async fn send_frame(&mut self, frame: Message) -> Result<(), SendError> {
        match tokio::time::timeout(self.state.limits.send_timeout, self.socket.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendError),
            Err(_) => {
                tracing::warn!("client stopped reading, closing");
                // Best effort: a client that does not read will not see this either.
                let frame = CloseFrame {
                    code: CLOSE_TRY_AGAIN,
                    reason: "not reading".into(),
                };
                let _ = tokio::time::timeout(
                    Duration::from_millis(100),
                    self.socket.send(Message::Close(Some(frame))),
                )
                .await;
                Err(SendError)
            }
        }
    }

    async fn fail(&mut self, e: &SignalError) {
        tracing::debug!(code = e.code.as_str(), "join refused");
        let _ = self.send(&ServerMsg::from(e)).await;
        let code = if e.code == ErrorCode::Internal {
            CLOSE_INTERNAL
        } else {
            CLOSE_POLICY
        };
        self.close(code, e.code.as_str()).await;
    }

    /// The closing handshake (RFC 6455 section 7.1.1): send Close, then read until the
    /// browser's Close, for at most [`CLOSE_HANDSHAKE`]. Dropping the socket while the peer's
    /// messages are still unread would reset the TCP connection, and the browser would lose
    /// the error and the close code that say why it was closed.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let sent = tokio::time::timeout(
            self.state.limits.send_timeout,
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(msg)) = self.socket.recv().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}
