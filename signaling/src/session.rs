//! One scheduled session: who is waiting, who is in, and what the ledger records.
//!
//! Each session is an actor task. Connections send it typed commands; the media room sends
//! it [`sfu::RoomEvent`]s. It is the only writer of the session's attendance events, so
//! their order in the ledger is the order in which the session saw them. Every event is
//! durable before the person it concerns is told about it.

use std::collections::HashMap;
use std::time::Duration;

use attendance::{Event, EventKind, LeaveReason, LedgerHandle};
use haven_ids::{ConnId, ParticipantId, Role, SessionId, SessionKind};
use sfu::{PcSide, RoomEvent, RoomHandle, Sfu};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::error::{ErrorCode, SignalError};
use crate::protocol::{PeerView, ServerMsg, SessionView, TrackView, PROTOCOL_VERSION};
use crate::token::JoinGrant;

/// A session with nobody in it stays open this long, so a quick reconnect finds it.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// What a session needs from the rest of the server.
#[derive(Clone)]
pub struct SessionDeps {
    pub sfu: Sfu,
    pub ledger: LedgerHandle,
}

/// Where a session sends a connection's messages. Bounded: a client that stops reading
/// loses messages rather than holding the session up.
pub type Outbox = mpsc::Sender<ServerMsg>;

pub enum SessionCmd {
    Join {
        grant: JoinGrant,
        conn: ConnId,
        outbox: Outbox,
        reply: oneshot::Sender<Result<(), SignalError>>,
    },
    Admit {
        by: ParticipantId,
        conn: ConnId,
        target: String,
        reply: oneshot::Sender<Result<(), SignalError>>,
    },
    PublishOffer {
        from: ParticipantId,
        conn: ConnId,
        sdp: String,
        reply: oneshot::Sender<Result<String, SignalError>>,
    },
    SubscribeAnswer {
        from: ParticipantId,
        conn: ConnId,
        negotiation: u64,
        sdp: String,
        reply: oneshot::Sender<Result<(), SignalError>>,
    },
    Candidate {
        from: ParticipantId,
        conn: ConnId,
        side: PcSide,
        candidate: String,
    },
    Leave {
        who: ParticipantId,
        conn: ConnId,
        reason: LeaveReason,
    },
}

#[derive(Clone)]
pub struct SessionHandle {
    tx: mpsc::Sender<SessionCmd>,
}

impl SessionHandle {
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends a command; `false` when the session has closed.
    pub async fn send(&self, cmd: SessionCmd) -> bool {
        self.tx.send(cmd).await.is_ok()
    }
}

pub fn spawn(grant: &JoinGrant, deps: SessionDeps) -> SessionHandle {
    let (tx, rx) = mpsc::channel(256);
    let (room, room_events) = deps.sfu.open_room(grant.session.clone());
    let session = Session {
        id: grant.session.clone(),
        kind: grant.kind,
        starts_at: grant.starts_at,
        ends_at: grant.ends_at,
        program: grant.program.clone(),
        room,
        ledger: deps.ledger,
        members: HashMap::new(),
        opened_in_ledger: false,
    };
    tracing::info!(session_id = %session.id, kind = %session.kind, "session opened");
    tokio::spawn(session.run(rx, room_events));
    SessionHandle { tx }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Waiting,
    Admitted,
}

struct Member {
    role: Role,
    conn: ConnId,
    outbox: Outbox,
    stage: Stage,
    /// Whether the ledger's last media event for this member says media is flowing, and
    /// whether it ever flowed (the first start is `MediaConnected`, later ones `MediaRestored`).
    media_flowing: bool,
    media_ever: bool,
}

struct Session {
    id: SessionId,
    kind: SessionKind,
    starts_at: OffsetDateTime,
    ends_at: OffsetDateTime,
    program: Option<String>,
    room: RoomHandle,
    ledger: LedgerHandle,
    members: HashMap<ParticipantId, Member>,
    opened_in_ledger: bool,
}

impl Session {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<SessionCmd>,
        mut room_events: mpsc::Receiver<RoomEvent>,
    ) {
        loop {
            let idle = tokio::time::sleep(IDLE_CLOSE);
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                Some(ev) = room_events.recv() => self.room_event(ev).await,
                _ = idle, if self.members.is_empty() => break,
            }
        }
        tracing::info!(session_id = %self.id, "session closed");
    }

    fn view(&self) -> SessionView {
        SessionView {
            id: self.id.to_string(),
            kind: self.kind,
            starts_at: self.starts_at,
            ends_at: self.ends_at,
        }
    }

    fn therapist_present(&self) -> bool {
        self.members
            .values()
            .any(|m| m.role == Role::Therapist && m.stage == Stage::Admitted)
    }

    /// Checks that a command comes from the connection that currently holds the member.
    fn member_of(&self, who: &ParticipantId, conn: ConnId) -> Result<&Member, SignalError> {
        match self.members.get(who) {
            Some(m) if m.conn == conn => Ok(m),
            _ => Err(SignalError::new(
                ErrorCode::NotAdmitted,
                "You are not in the session.",
            )),
        }
    }

    fn send_to(&self, who: &ParticipantId, msg: ServerMsg) {
        if let Some(m) = self.members.get(who) {
            if m.outbox.try_send(msg).is_err() {
                tracing::warn!(session_id = %self.id, participant_id = %who, "outbox full, message dropped");
            }
        }
    }

    fn broadcast_admitted(&self, except: &ParticipantId, msg: ServerMsg) {
        for (id, m) in &self.members {
            if id != except && m.stage == Stage::Admitted {
                self.send_to(id, msg.clone());
            }
        }
    }

    async fn record(
        &mut self,
        participant: Option<(&ParticipantId, Role)>,
        kind: EventKind,
        at: OffsetDateTime,
    ) -> Result<(), SignalError> {
        if !self.opened_in_ledger {
            let opened = Event {
                session_id: self.id.clone(),
                participant_id: None,
                role: None,
                kind: EventKind::SessionOpened {
                    kind: self.kind,
                    starts_at: self.starts_at,
                    ends_at: self.ends_at,
                    program: self.program.clone(),
                },
                at,
            };
            self.ledger
                .append(opened)
                .await
                .map_err(|e| SignalError::internal(&e))?;
            self.opened_in_ledger = true;
        }
        let event = Event {
            session_id: self.id.clone(),
            participant_id: participant.map(|(p, _)| p.clone()),
            role: participant.map(|(_, r)| r),
            kind,
            at,
        };
        self.ledger
            .append(event)
            .await
            .map_err(|e| SignalError::internal(&e))?;
        Ok(())
    }

    async fn handle(&mut self, cmd: SessionCmd) {
        match cmd {
            SessionCmd::Join {
                grant,
                conn,
                outbox,
                reply,
            } => {
                let _ = reply.send(self.join(grant, conn, outbox).await);
            }
            SessionCmd::Admit {
                by,
                conn,
                target,
                reply,
            } => {
                let _ = reply.send(self.admit_by(&by, conn, &target).await);
            }
            SessionCmd::PublishOffer {
                from,
                conn,
                sdp,
                reply,
            } => {
                let res = match self.admitted(&from, conn) {
                    Ok(()) => self
                        .room
                        .publish_offer(from, sdp)
                        .await
                        .map_err(SignalError::from),
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
            SessionCmd::SubscribeAnswer {
                from,
                conn,
                negotiation,
                sdp,
                reply,
            } => {
                let res = match self.admitted(&from, conn) {
                    Ok(()) => self
                        .room
                        .subscribe_answer(from, negotiation, sdp)
                        .await
                        .map_err(SignalError::from),
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
            SessionCmd::Candidate {
                from,
                conn,
                side,
                candidate,
            } => {
                if self.admitted(&from, conn).is_ok() {
                    self.room.remote_candidate(from, side, candidate).await;
                }
            }
            SessionCmd::Leave { who, conn, reason } => self.leave(&who, conn, reason).await,
        }
    }

    fn admitted(&self, who: &ParticipantId, conn: ConnId) -> Result<(), SignalError> {
        match self.member_of(who, conn)?.stage {
            Stage::Admitted => Ok(()),
            Stage::Waiting => Err(SignalError::new(
                ErrorCode::NotAdmitted,
                "Wait until the therapist lets you in.",
            )),
        }
    }

    async fn join(
        &mut self,
        grant: JoinGrant,
        conn: ConnId,
        outbox: Outbox,
    ) -> Result<(), SignalError> {
        let who = grant.participant.clone();

        // The same person opening the link again (a reloaded tab) takes over from the old
        // connection; the old one is told and closed.
        if let Some(old) = self.members.get(&who) {
            let old_conn = old.conn;
            let _ = old.outbox.try_send(ServerMsg::Left { reason: "replaced" });
            self.leave(&who, old_conn, LeaveReason::ConnectionLost)
                .await;
        }

        let member = Member {
            role: grant.role,
            conn,
            outbox,
            stage: Stage::Waiting,
            media_flowing: false,
            media_ever: false,
        };
        self.members.insert(who.clone(), member);

        if grant.role == Role::Therapist {
            if let Err(e) = self.admit(&who).await {
                self.members.remove(&who);
                return Err(e);
            }
            // Waiting people learn that their therapist has arrived.
            self.notify_waiting();
        } else {
            self.send_to(
                &who,
                ServerMsg::Waiting {
                    session: self.view(),
                    therapist_present: self.therapist_present(),
                },
            );
            self.notify_waiting_list();
        }
        Ok(())
    }

    async fn admit_by(
        &mut self,
        by: &ParticipantId,
        conn: ConnId,
        target: &str,
    ) -> Result<(), SignalError> {
        let m = self.member_of(by, conn)?;
        if m.role != Role::Therapist || m.stage != Stage::Admitted {
            return Err(SignalError::new(
                ErrorCode::Forbidden,
                "Only the therapist can let people in.",
            ));
        }
        let target = ParticipantId::parse(target)
            .ok()
            .filter(|t| {
                self.members
                    .get(t)
                    .is_some_and(|m| m.stage == Stage::Waiting)
            })
            .ok_or_else(|| {
                SignalError::new(
                    ErrorCode::UnknownParticipant,
                    "Nobody with that id is waiting.",
                )
            })?;
        self.admit(&target).await?;
        self.notify_waiting_list();
        Ok(())
    }

    /// Moves a member into the room: ledger first, then media, then everyone is told.
    async fn admit(&mut self, who: &ParticipantId) -> Result<(), SignalError> {
        let role = self
            .members
            .get(who)
            .map(|m| m.role)
            .ok_or_else(|| SignalError::internal(&"admit of unknown member"))?;
        self.room.add_participant(who.clone()).await?;
        if let Err(e) = self
            .record(
                Some((who, role)),
                EventKind::Admitted,
                OffsetDateTime::now_utc(),
            )
            .await
        {
            self.room.remove_participant(who.clone()).await;
            return Err(e);
        }
        if let Some(m) = self.members.get_mut(who) {
            m.stage = Stage::Admitted;
        }
        tracing::info!(session_id = %self.id, participant_id = %who, role = %role, "participant admitted");

        let participants = self
            .members
            .iter()
            .filter(|(id, m)| *id != who && m.stage == Stage::Admitted)
            .map(|(id, m)| PeerView {
                participant_id: id.clone(),
                role: m.role,
            })
            .collect();
        let joined = ServerMsg::Joined {
            protocol: PROTOCOL_VERSION,
            participant_id: who.clone(),
            role,
            session: self.view(),
            participants,
        };
        self.send_to(who, joined);
        self.broadcast_admitted(
            who,
            ServerMsg::ParticipantJoined {
                participant_id: who.clone(),
                role,
            },
        );
        Ok(())
    }

    async fn leave(&mut self, who: &ParticipantId, conn: ConnId, reason: LeaveReason) {
        // A close from a connection that was already replaced concerns nobody.
        if self.members.get(who).is_none_or(|m| m.conn != conn) {
            return;
        }
        let Some(m) = self.members.remove(who) else {
            return;
        };

        if m.stage == Stage::Admitted {
            self.room.remove_participant(who.clone()).await;
            if let Err(e) = self
                .record(
                    Some((who, m.role)),
                    EventKind::Left { reason },
                    OffsetDateTime::now_utc(),
                )
                .await
            {
                tracing::error!(session_id = %self.id, participant_id = %who, code = e.code.as_str(), "leave not recorded");
            }
            tracing::info!(session_id = %self.id, participant_id = %who, reason = reason.as_str(), "participant left");
            self.broadcast_admitted(
                who,
                ServerMsg::ParticipantLeft {
                    participant_id: who.clone(),
                    reason: reason.as_str(),
                },
            );
            if m.role == Role::Therapist {
                self.notify_waiting();
            }
        } else {
            tracing::info!(session_id = %self.id, participant_id = %who, "participant left the waiting room");
            self.notify_waiting_list();
        }
    }

    fn notify_waiting(&self) {
        let present = self.therapist_present();
        for (id, m) in &self.members {
            if m.stage == Stage::Waiting {
                self.send_to(
                    id,
                    ServerMsg::Waiting {
                        session: self.view(),
                        therapist_present: present,
                    },
                );
            }
        }
    }

    fn notify_waiting_list(&self) {
        let waiting: Vec<PeerView> = self
            .members
            .iter()
            .filter(|(_, m)| m.stage == Stage::Waiting)
            .map(|(id, m)| PeerView {
                participant_id: id.clone(),
                role: m.role,
            })
            .collect();
        for (id, m) in &self.members {
            if m.role == Role::Therapist && m.stage == Stage::Admitted {
                self.send_to(
                    id,
                    ServerMsg::WaitingList {
                        waiting: waiting.clone(),
                    },
                );
            }
        }
    }

    async fn room_event(&mut self, ev: RoomEvent) {
        match ev {
            RoomEvent::SubscribeOffer {
                participant,
                negotiation,
                sdp,
                tracks,
            } => {
                let tracks = tracks
                    .into_iter()
                    .map(|t| TrackView {
                        mid: t.mid,
                        participant_id: t.participant,
                        kind: t.kind.as_str(),
                        active: t.active,
                    })
                    .collect();
                self.send_to(
                    &participant,
                    ServerMsg::SubscribeOffer {
                        negotiation,
                        sdp,
                        tracks,
                    },
                );
            }
            RoomEvent::MediaStarted { participant, at } => {
                let Some(m) = self
                    .members
                    .get(&participant)
                    .filter(|m| m.stage == Stage::Admitted)
                else {
                    return;
                };
                if m.media_flowing {
                    return;
                }
                let kind = if m.media_ever {
                    EventKind::MediaRestored
                } else {
                    EventKind::MediaConnected
                };
                let role = m.role;
                if self
                    .record(Some((&participant, role)), kind, at.into())
                    .await
                    .is_ok()
                {
                    if let Some(m) = self.members.get_mut(&participant) {
                        m.media_flowing = true;
                        m.media_ever = true;
                    }
                }
            }
            RoomEvent::MediaStopped {
                participant,
                last_packet_at,
            } => {
                let Some(m) = self.members.get(&participant).filter(|m| m.media_flowing) else {
                    return;
                };
                let role = m.role;
                if self
                    .record(
                        Some((&participant, role)),
                        EventKind::MediaLost,
                        last_packet_at.into(),
                    )
                    .await
                    .is_ok()
                {
                    if let Some(m) = self.members.get_mut(&participant) {
                        m.media_flowing = false;
                    }
                }
            }
        }
    }
}
