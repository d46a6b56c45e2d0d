//! One scheduled session: who is waiting, who is in, and what the ledger records.
//!
//! Each session is an actor task. Connections send it typed commands; the media room sends
//! it [`sfu::RoomEvent`]s. It is the only writer of the session's attendance events, so
//! their order in the ledger is the order in which the session saw them, and admission is
//! atomic: capacity is checked and taken in one step of one task. Every event is durable
//! before the person it concerns is told about it.
//!
//! A stay survives a lost connection for the resume grace period: the member stays in the
//! room, and a `join` carrying their resume token (or a second tab while the first is still
//! open) takes the stay over. Every command names the connection it came from, so a late
//! close from an old connection never ends the stay of the new one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use attendance::{Event, EventKind, LeaveReason, LedgerHandle, Modality};
use haven_ids::{ConnId, ParticipantId, Role, SessionId, SessionKind};
use sfu::{AudioOnlyReason, PcSide, RoomEvent, RoomHandle, Sfu};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::error::{ErrorCode, SignalError};
use crate::metrics::Metrics;
use crate::permission::{self, Action};
use crate::protocol::{PeerView, QualityView, ServerMsg, SessionView, TrackView, PROTOCOL_VERSION};
use crate::revocation::{RevocationList, Revoked};
use crate::token::{Admission, AgeGroup, JoinGrant};
use crate::turn::TurnPolicy;

/// A session with nobody in it stays open this long, so a quick reconnect finds it.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// How many people each kind of session holds, therapists included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub individual: usize,
    pub group: usize,
    pub family: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            individual: 4,
            group: 15,
            family: 10,
        }
    }
}

impl Capacity {
    fn of(&self, kind: SessionKind) -> usize {
        let n = match kind {
            SessionKind::Individual => self.individual,
            SessionKind::Group => self.group,
            SessionKind::Family => self.family,
        };
        // A room of the media plane never holds more than its own maximum.
        n.min(16)
    }
}

/// Lifecycle settings shared by all sessions of a node.
#[derive(Clone, Debug)]
pub struct SessionPolicy {
    pub capacity: Capacity,
    /// How credited minutes are counted for the session-ended page.
    pub counting: attendance::CountingRules,
    /// How long a stay survives a lost connection, waiting for a resume.
    pub resume_grace: Duration,
    /// TURN servers whose credentials `joined` carries.
    pub turn: TurnPolicy,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            capacity: Capacity::default(),
            counting: attendance::CountingRules::default(),
            resume_grace: Duration::from_secs(60),
            turn: TurnPolicy::default(),
        }
    }
}

/// What a session needs from the rest of the server.
#[derive(Clone)]
pub struct SessionDeps {
    pub sfu: Sfu,
    pub ledger: LedgerHandle,
    pub revocations: Arc<RevocationList>,
    pub policy: SessionPolicy,
    /// Where rooms' connection figures go for `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// Where a session sends a connection's messages. Bounded: a client that stops reading
/// loses messages rather than holding the session up.
pub type Outbox = mpsc::Sender<ServerMsg>;

type Reply<T> = oneshot::Sender<Result<T, SignalError>>;

/// What any admitted participant may ask of the media plane for themselves.
#[derive(Debug)]
pub enum MediaAction {
    VideoSize {
        participant_id: String,
        width: u32,
        height: u32,
    },
    AudioOnly(bool),
    IceRestart,
}

/// What only a therapist may do.
#[derive(Debug)]
pub enum TherapistAction {
    Admit(String),
    Deny(String),
    Mute(String, bool),
    Remove(String),
    End,
}

pub enum SessionCmd {
    Join {
        grant: JoinGrant,
        resume: Option<String>,
        conn: ConnId,
        outbox: Outbox,
        reply: Reply<()>,
    },
    Therapist {
        by: ParticipantId,
        conn: ConnId,
        action: TherapistAction,
        reply: Reply<()>,
    },
    PublishOffer {
        from: ParticipantId,
        conn: ConnId,
        sdp: String,
        reply: Reply<String>,
    },
    SubscribeAnswer {
        from: ParticipantId,
        conn: ConnId,
        negotiation: u64,
        sdp: String,
        reply: Reply<()>,
    },
    Candidate {
        from: ParticipantId,
        conn: ConnId,
        side: PcSide,
        candidate: String,
    },
    Media {
        from: ParticipantId,
        conn: ConnId,
        action: MediaAction,
        reply: Reply<()>,
    },
    /// The participant said `leave`.
    Leave {
        who: ParticipantId,
        conn: ConnId,
        reply: oneshot::Sender<Option<f64>>,
    },
    /// The participant's socket closed without `leave`; `last_seen` is their last sign of
    /// life on it.
    Disconnected {
        who: ParticipantId,
        conn: ConnId,
        last_seen: OffsetDateTime,
    },
    /// A revocation from the scheduling system; members it names are disconnected.
    Revoke { what: Revoked },
    /// The node is draining: tell everyone it is going away.
    GoingAway { deadline: OffsetDateTime },
    /// The node stops: end every stay with `server_shutdown`, ledger first.
    Shutdown { reply: oneshot::Sender<()> },
    /// How many people are in the session (waiting or in the room).
    Count { reply: oneshot::Sender<usize> },
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
        admission: grant.admission,
        room,
        ledger: deps.ledger,
        revocations: deps.revocations,
        policy: deps.policy,
        metrics: deps.metrics,
        members: HashMap::new(),
        opened_in_ledger: false,
        ended: false,
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
    display_name: Option<String>,
    token_id: String,
    token_expires_at: OffsetDateTime,
    sponsor_for: Option<ParticipantId>,
    /// Recorded for clients right after admission; picks their weekly requirement.
    age_group: Option<AgeGroup>,
    /// The connection that holds the stay now; commands from any other are ignored.
    conn: ConnId,
    /// `None` while the connection is lost and the stay waits for a resume.
    outbox: Option<Outbox>,
    disconnected_at: Option<OffsetDateTime>,
    resume_token: String,
    stage: Stage,
    /// Whether the ledger's last media event for this member says media is flowing, and
    /// whether it ever flowed (the first start is `MediaConnected`, later ones `MediaRestored`).
    media_flowing: bool,
    media_ever: bool,
    muted: bool,
    /// When the ledger recorded the admission; no later event of this stay is dated before.
    admitted_at: Option<OffsetDateTime>,
    /// Whether the ledger's last modality for this stay is audio-only.
    audio_only: bool,
}

struct Session {
    id: SessionId,
    kind: SessionKind,
    starts_at: OffsetDateTime,
    ends_at: OffsetDateTime,
    program: Option<String>,
    admission: Admission,
    room: RoomHandle,
    ledger: LedgerHandle,
    revocations: Arc<RevocationList>,
    policy: SessionPolicy,
    metrics: Arc<Metrics>,
    members: HashMap<ParticipantId, Member>,
    opened_in_ledger: bool,
    /// Ended by a therapist: nobody joins again, even after this actor closes and reopens.
    ended: bool,
}

impl Session {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<SessionCmd>,
        mut room_events: mpsc::Receiver<RoomEvent>,
    ) {
        // What the ledger already knows about this session: an actor reopened after an idle
        // close must not open it twice, nor let anyone into a session that was ended.
        if let Ok(entries) = self.ledger.session_events(self.id.clone()).await {
            self.opened_in_ledger = entries
                .iter()
                .any(|e| matches!(e.event.kind, EventKind::SessionOpened { .. }));
            self.ended = entries
                .iter()
                .any(|e| matches!(e.event.kind, EventKind::SessionEnded));
        }

        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut idle_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                Some(ev) = room_events.recv() => self.room_event(ev).await,
                _ = tick.tick() => {
                    self.expire_lost_connections().await;
                    if !self.members.is_empty() {
                        idle_since = tokio::time::Instant::now();
                    } else if idle_since.elapsed() >= IDLE_CLOSE {
                        break;
                    }
                }
            }
        }
        self.metrics.remove_session(&self.id);
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

    fn admitted_count(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.stage == Stage::Admitted)
            .count()
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

    fn admitted(&self, who: &ParticipantId, conn: ConnId) -> Result<(), SignalError> {
        match self.member_of(who, conn)?.stage {
            Stage::Admitted => Ok(()),
            Stage::Waiting => Err(SignalError::new(
                ErrorCode::NotAdmitted,
                "Wait until the therapist lets you in.",
            )),
        }
    }

    fn send_to(&self, who: &ParticipantId, msg: ServerMsg) {
        let Some(outbox) = self.members.get(who).and_then(|m| m.outbox.as_ref()) else {
            return;
        };
        if outbox.try_send(msg).is_err() {
            // Debug, not warn: a client that stopped reading would repeat this for every
            // message; its connection logs one warning when it is closed for it.
            tracing::debug!(session_id = %self.id, participant_id = %who, "outbox full, message dropped");
        }
    }

    fn broadcast_admitted(&self, except: &ParticipantId, msg: ServerMsg) {
        for (id, m) in &self.members {
            if id != except && m.stage == Stage::Admitted {
                self.send_to(id, msg.clone());
            }
        }
    }

    fn peer_view(id: &ParticipantId, m: &Member) -> PeerView {
        PeerView {
            participant_id: id.clone(),
            role: m.role,
            display_name: m.display_name.clone(),
            muted: m.muted,
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
                resume,
                conn,
                outbox,
                reply,
            } => {
                let _ = reply.send(self.join(grant, resume, conn, outbox).await);
            }
            SessionCmd::Therapist {
                by,
                conn,
                action,
                reply,
            } => {
                let _ = reply.send(self.therapist(&by, conn, action).await);
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
            SessionCmd::Media {
                from,
                conn,
                action,
                reply,
            } => {
                let res = match self.admitted(&from, conn) {
                    Ok(()) => self.media_action(from, action).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
            SessionCmd::Leave { who, conn, reply } => {
                let mut credited = None;
                if let Ok(m) = self.member_of(&who, conn) {
                    let role = m.role;
                    self.finish(&who, LeaveReason::Left, OffsetDateTime::now_utc(), false)
                        .await;
                    credited = self.credited_minutes(&who, role).await;
                }
                let _ = reply.send(credited);
            }
            SessionCmd::Disconnected {
                who,
                conn,
                last_seen,
            } => self.disconnected(&who, conn, last_seen).await,
            SessionCmd::GoingAway { deadline } => {
                for id in self.members.keys() {
                    self.send_to(id, ServerMsg::GoingAway { deadline });
                }
            }
            SessionCmd::Shutdown { reply } => {
                let everyone: Vec<ParticipantId> = self.members.keys().cloned().collect();
                for id in everyone {
                    self.finish(
                        &id,
                        LeaveReason::ServerShutdown,
                        OffsetDateTime::now_utc(),
                        true,
                    )
                    .await;
                }
                let _ = reply.send(());
            }
            SessionCmd::Count { reply } => {
                let _ = reply.send(self.members.len());
            }
            SessionCmd::Revoke { what } => self.revoke(what).await,
        }
    }

    async fn join(
        &mut self,
        grant: JoinGrant,
        resume: Option<String>,
        conn: ConnId,
        outbox: Outbox,
    ) -> Result<(), SignalError> {
        if self.ended {
            return Err(SignalError::new(
                ErrorCode::SessionOver,
                "This session has been ended by the therapist.",
            ));
        }
        if self
            .revocations
            .is_revoked(&grant.token_id, &self.id, &grant.participant)
        {
            return Err(SignalError::new(
                ErrorCode::TokenRevoked,
                "This join link can no longer be used. Contact your program if you think this is a mistake.",
            ));
        }
        let who = grant.participant.clone();

        if let Some(m) = self.members.get(&who) {
            // One person, one stay: a token for the same subject in another role (or for
            // another client, as a sponsor) never continues it, nor ends it. Its role and
            // links were granted by the token that opened it.
            if m.role != grant.role || m.sponsor_for != grant.sponsor_for {
                tracing::warn!(session_id = %self.id, participant_id = %who, role = ?grant.role, held_as = ?m.role, "join refused: the subject already holds a stay in another role");
                return Err(SignalError::new(
                    ErrorCode::IdentityConflict,
                    "This person is already in the session in another role. Contact your program.",
                ));
            }
            let connected = m.outbox.is_some();
            let resumes = resume
                .as_deref()
                .is_some_and(|r| constant_time_eq(r.as_bytes(), m.resume_token.as_bytes()));
            if connected || resumes {
                return self.take_over(&grant, conn, outbox).await;
            }
            // The old connection is gone and this join does not prove it continues that
            // stay: the old stay ends where its connection was lost.
            let at = m.disconnected_at.unwrap_or_else(OffsetDateTime::now_utc);
            self.finish(&who, LeaveReason::ConnectionLost, at, false)
                .await;
        }

        let member = Member {
            role: grant.role,
            display_name: grant.display_name,
            token_id: grant.token_id,
            token_expires_at: grant.expires_at,
            sponsor_for: grant.sponsor_for,
            age_group: grant.age_group,
            conn,
            outbox: Some(outbox),
            disconnected_at: None,
            resume_token: new_resume_token(),
            stage: Stage::Waiting,
            media_flowing: false,
            media_ever: false,
            muted: false,
            audio_only: false,
            admitted_at: None,
        };
        self.members.insert(who.clone(), member);

        if grant.role == Role::Therapist {
            if let Err(e) = self.admit(&who, false).await {
                self.members.remove(&who);
                return Err(e);
            }
            if self.admission == Admission::Auto {
                self.admit_waiting().await;
            }
            self.notify_waiting();
            self.notify_waiting_list();
            return Ok(());
        }

        if self.admission == Admission::Auto
            && self.therapist_present()
            && self.admit(&who, false).await.is_ok()
        {
            self.notify_waiting_list();
            return Ok(());
        }
        self.send_to(
            &who,
            ServerMsg::Waiting {
                session: self.view(),
                therapist_present: self.therapist_present(),
            },
        );
        self.notify_waiting_list();
        Ok(())
    }

    /// A new connection continues an existing stay (second tab, or resume after a drop).
    async fn take_over(
        &mut self,
        grant: &JoinGrant,
        conn: ConnId,
        outbox: Outbox,
    ) -> Result<(), SignalError> {
        let who = &grant.participant;
        let Some(m) = self.members.get_mut(who) else {
            return Err(SignalError::internal(&"take over of unknown member"));
        };
        // The stay now rests on the newer token: a removal must revoke the one in use.
        m.token_id = grant.token_id.clone();
        m.token_expires_at = grant.expires_at;
        if let Some(old) = m.outbox.replace(outbox) {
            let _ = old.try_send(ServerMsg::Left {
                reason: "replaced",
                credited_minutes: None,
            });
        }
        m.conn = conn;
        m.disconnected_at = None;
        let stage = m.stage;
        tracing::info!(session_id = %self.id, participant_id = %who, "stay continued on a new connection");

        match stage {
            Stage::Waiting => {
                self.send_to(
                    who,
                    ServerMsg::Waiting {
                        session: self.view(),
                        therapist_present: self.therapist_present(),
                    },
                );
            }
            Stage::Admitted => {
                // The browser negotiates afresh; its old connections are dropped. If their
                // media was flowing, the room reports it stopped at its last packet, so the
                // gap until the new media flows is not credited.
                self.room.remove_participant(who.clone()).await;
                self.room.add_participant(who.clone()).await?;
                // The room starts the new connections with video; so does the ledger. The
                // browser asks for audio only again if it still wants it.
                self.record_modality(who, false, OffsetDateTime::now_utc())
                    .await;
                self.send_joined(who, true);
            }
        }
        Ok(())
    }

    async fn admit_waiting(&mut self) {
        let waiting: Vec<ParticipantId> = self
            .members
            .iter()
            .filter(|(_, m)| m.stage == Stage::Waiting)
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            // People who cannot be admitted yet (full, sponsor without client) keep waiting.
            let _ = self.admit(&id, false).await;
        }
    }

    async fn therapist(
        &mut self,
        by: &ParticipantId,
        conn: ConnId,
        action: TherapistAction,
    ) -> Result<(), SignalError> {
        let m = self.member_of(by, conn)?;
        let needed = match action {
            TherapistAction::Admit(_) => Action::Admit,
            TherapistAction::Deny(_) => Action::Deny,
            TherapistAction::Mute(..) => Action::Mute,
            TherapistAction::Remove(_) => Action::Remove,
            TherapistAction::End => Action::EndSession,
        };
        if !permission::allowed(m.role, needed) || m.stage != Stage::Admitted {
            return Err(SignalError::new(
                ErrorCode::Forbidden,
                "Only the therapist can do that.",
            ));
        }
        match action {
            TherapistAction::Admit(target) => {
                let target = self.target(&target, Some(Stage::Waiting))?;
                self.admit(&target, true).await?;
                self.notify_waiting_list();
            }
            TherapistAction::Deny(target) => {
                let target = self.target(&target, Some(Stage::Waiting))?;
                tracing::info!(session_id = %self.id, participant_id = %target, "participant denied");
                self.finish(
                    &target,
                    LeaveReason::Denied,
                    OffsetDateTime::now_utc(),
                    true,
                )
                .await;
            }
            TherapistAction::Mute(target, muted) => {
                let target = self.target(&target, Some(Stage::Admitted))?;
                self.room.set_audio_muted(target.clone(), muted).await;
                if let Some(m) = self.members.get_mut(&target) {
                    m.muted = muted;
                }
                tracing::info!(session_id = %self.id, participant_id = %target, muted, "participant mute changed");
                self.send_to(&target, ServerMsg::Muted { muted });
                self.broadcast_admitted(
                    &target,
                    ServerMsg::ParticipantMuted {
                        participant_id: target.clone(),
                        muted,
                    },
                );
            }
            TherapistAction::Remove(target) => {
                let target = self.target(&target, None)?;
                if &target == by {
                    let e = "A therapist leaves with Leave, or ends the session for everyone.";
                    return Err(SignalError::new(ErrorCode::Forbidden, e));
                }
                if let Some(m) = self.members.get(&target) {
                    // Remembered for the token's whole life, so neither the same link nor a
                    // resume brings them back.
                    let what = Revoked::Token {
                        jti: m.token_id.clone(),
                    };
                    if let Err(e) = self.revocations.revoke(what, m.token_expires_at) {
                        return Err(SignalError::internal(&e));
                    }
                }
                tracing::info!(session_id = %self.id, participant_id = %target, "participant removed");
                self.finish(
                    &target,
                    LeaveReason::Removed,
                    OffsetDateTime::now_utc(),
                    true,
                )
                .await;
            }
            TherapistAction::End => self.end(by).await?,
        }
        Ok(())
    }

    /// A participant a therapist's action names, in the given stage (any stage when `None`).
    fn target(&self, id: &str, stage: Option<Stage>) -> Result<ParticipantId, SignalError> {
        ParticipantId::parse(id)
            .ok()
            .filter(|t| {
                self.members
                    .get(t)
                    .is_some_and(|m| stage.is_none_or(|s| m.stage == s))
            })
            .ok_or_else(|| {
                SignalError::new(
                    ErrorCode::UnknownParticipant,
                    "Nobody with that id is in that state.",
                )
            })
    }

    /// Moves a member into the room: checks, ledger first, then media, then everyone is told.
    async fn admit(&mut self, who: &ParticipantId, by_therapist: bool) -> Result<(), SignalError> {
        let m = self
            .members
            .get(who)
            .ok_or_else(|| SignalError::internal(&"admit of unknown member"))?;
        let role = m.role;

        let capacity = self.policy.capacity.of(self.kind);
        if self.admitted_count() >= capacity {
            return Err(SignalError::new(
                ErrorCode::SessionFull,
                format!("This session already has its maximum of {capacity} people."),
            ));
        }
        if let Some(client) = &m.sponsor_for {
            let present = self
                .members
                .get(client)
                .is_some_and(|c| c.stage == Stage::Admitted && c.role == Role::Client);
            if !present {
                let _ = by_therapist;
                return Err(SignalError::new(
                    ErrorCode::ClientNotPresent,
                    "A sponsor can join only while the client they accompany is in the session.",
                ));
            }
        }

        self.room.add_participant(who.clone()).await?;
        let admitted_at = OffsetDateTime::now_utc();
        if let Err(e) = self
            .record(Some((who, role)), EventKind::Admitted, admitted_at)
            .await
        {
            self.room.remove_participant(who.clone()).await;
            return Err(e);
        }
        if let Some(m) = self.members.get_mut(who) {
            m.stage = Stage::Admitted;
            m.admitted_at = Some(admitted_at);
        }
        // Which weekly requirement applies is part of the record, next to the admission.
        let age_group = self.members.get(who).and_then(|m| m.age_group);
        if let (Role::Client, Some(group)) = (role, age_group) {
            let age_group = match group {
                AgeGroup::Adult => attendance::AgeGroup::Adult,
                AgeGroup::Adolescent => attendance::AgeGroup::Adolescent,
            };
            if let Err(e) = self
                .record(
                    Some((who, role)),
                    EventKind::AgeGroupRecorded { age_group },
                    admitted_at,
                )
                .await
            {
                tracing::error!(session_id = %self.id, participant_id = %who, code = e.code.as_str(), "age group not recorded");
            }
        }
        tracing::info!(session_id = %self.id, participant_id = %who, role = %role, "participant admitted");

        self.send_joined(who, false);
        if let Some(view) = self.members.get(who).map(|m| Self::peer_view(who, m)) {
            self.broadcast_admitted(who, ServerMsg::ParticipantJoined(view));
        }
        if role == Role::Therapist {
            self.notify_waiting();
        }
        if role == Role::Client && self.admission == Admission::Auto && self.therapist_present() {
            // A sponsor waiting for this client can come in now.
            Box::pin(self.admit_waiting()).await;
        }
        Ok(())
    }

    fn send_joined(&self, who: &ParticipantId, resumed: bool) {
        let Some(m) = self.members.get(who) else {
            return;
        };
        let participants = self
            .members
            .iter()
            .filter(|(id, m)| *id != who && m.stage == Stage::Admitted)
            .map(|(id, m)| Self::peer_view(id, m))
            .collect();
        let joined = ServerMsg::Joined {
            protocol: PROTOCOL_VERSION,
            participant_id: who.clone(),
            role: m.role,
            session: self.view(),
            participants,
            display_name: m.display_name.clone(),
            resume_token: m.resume_token.clone(),
            resume_grace_seconds: self.policy.resume_grace.as_secs(),
            resumed,
            muted: m.muted,
            // Fresh at every `joined`, so a resume late in a session gets a full lifetime.
            ice_servers: self.policy.turn.ice_servers(who, OffsetDateTime::now_utc()),
        };
        self.send_to(who, joined);
    }

    /// Ends a member's stay for `reason`, dated `at`. With `tell`, their connection gets
    /// `left` (and closes); otherwise it is already closing.
    async fn finish(
        &mut self,
        who: &ParticipantId,
        reason: LeaveReason,
        at: OffsetDateTime,
        tell: bool,
    ) {
        let Some(m) = self.members.remove(who) else {
            return;
        };
        let tell_them = |credited_minutes| {
            if let (true, Some(outbox)) = (tell, &m.outbox) {
                let _ = outbox.try_send(ServerMsg::Left {
                    reason: reason.as_str(),
                    credited_minutes,
                });
            }
        };

        if m.stage != Stage::Admitted {
            tell_them(None);
            tracing::info!(session_id = %self.id, participant_id = %who, reason = reason.as_str(), "participant left the waiting room");
            self.notify_waiting_list();
            return;
        }

        self.room.remove_participant(who.clone()).await;
        if let Err(e) = self
            .record(Some((who, m.role)), EventKind::Left { reason }, at)
            .await
        {
            tracing::error!(session_id = %self.id, participant_id = %who, code = e.code.as_str(), "leave not recorded");
        }
        // Told after the ledger has the departure, so the minutes they see are final.
        if tell {
            tell_them(self.credited_minutes(who, m.role).await);
        }
        tracing::info!(session_id = %self.id, participant_id = %who, reason = reason.as_str(), "participant left");
        self.broadcast_admitted(
            who,
            ServerMsg::ParticipantLeft {
                participant_id: who.clone(),
                reason: reason.as_str(),
            },
        );

        // A freed place goes to the next person waiting when the session admits by itself.
        if self.admission == Admission::Auto && self.therapist_present() {
            Box::pin(self.admit_waiting()).await;
            self.notify_waiting_list();
        }

        match m.role {
            Role::Therapist => self.notify_waiting(),
            Role::Client => {
                // Sponsors are in the room only while the client they accompany is.
                let sponsors: Vec<ParticipantId> = self
                    .members
                    .iter()
                    .filter(|(_, s)| s.sponsor_for.as_ref() == Some(who))
                    .map(|(id, _)| id.clone())
                    .collect();
                for s in sponsors {
                    Box::pin(self.finish(&s, LeaveReason::SponsoredClientLeft, at, true)).await;
                }
            }
            _ => {}
        }
    }

    async fn disconnected(&mut self, who: &ParticipantId, conn: ConnId, last_seen: OffsetDateTime) {
        let Some(m) = self.members.get_mut(who).filter(|m| m.conn == conn) else {
            return;
        };
        if m.stage == Stage::Waiting {
            self.finish(
                who,
                LeaveReason::ConnectionLost,
                OffsetDateTime::now_utc(),
                false,
            )
            .await;
            return;
        }
        // Admitted: the stay waits for a resume. Media keeps flowing if only the socket
        // broke; if the network went, the room reports the media stop on its own.
        m.outbox = None;
        // A socket silent since before its admission was still there when admitted.
        m.disconnected_at = Some(m.admitted_at.map_or(last_seen, |a| last_seen.max(a)));
        tracing::info!(session_id = %self.id, participant_id = %who, "connection lost, waiting for resume");
    }

    async fn expire_lost_connections(&mut self) {
        let grace = self.policy.resume_grace;
        let now = OffsetDateTime::now_utc();
        let expired: Vec<(ParticipantId, OffsetDateTime)> = self
            .members
            .iter()
            .filter_map(|(id, m)| {
                m.disconnected_at
                    .filter(|t| now - *t >= grace)
                    .map(|t| (id.clone(), t))
            })
            .collect();
        for (id, at) in expired {
            // The stay ended when the connection was lost, not when the grace ran out.
            self.finish(&id, LeaveReason::ConnectionLost, at, false)
                .await;
        }
    }

    async fn revoke(&mut self, what: Revoked) {
        let hit: Vec<ParticipantId> = self
            .members
            .iter()
            .filter(|(id, m)| match &what {
                Revoked::Token { jti } => &m.token_id == jti,
                Revoked::Subject { session, subject } => session == &self.id && *id == subject,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in hit {
            tracing::info!(session_id = %self.id, participant_id = %id, "token revoked, participant disconnected");
            self.finish(
                &id,
                LeaveReason::TokenRevoked,
                OffsetDateTime::now_utc(),
                true,
            )
            .await;
        }
    }

    async fn end(&mut self, by: &ParticipantId) -> Result<(), SignalError> {
        let now = OffsetDateTime::now_utc();
        // One entry closes every open stay at this moment; see the counting rules. It is a
        // session event (no participant); the therapist who ended it is in the log.
        self.record(None, EventKind::SessionEnded, now).await?;
        self.ended = true;
        tracing::info!(session_id = %self.id, ended_by = %by, "session ended by therapist");

        let everyone: Vec<ParticipantId> = self.members.keys().cloned().collect();
        for id in everyone {
            let role = self
                .members
                .get(&id)
                .map(|m| m.role)
                .unwrap_or(Role::Client);
            let credited_minutes = self.credited_minutes(&id, role).await;
            let reason = LeaveReason::SessionEnded.as_str();
            self.send_to(
                &id,
                ServerMsg::Left {
                    reason,
                    credited_minutes,
                },
            );
            if let Some(m) = self.members.remove(&id) {
                if m.stage == Stage::Admitted {
                    self.room.remove_participant(id.clone()).await;
                }
            }
        }
        Ok(())
    }

    /// A client's credited minutes in this session so far, from the ledger and the counting
    /// rules, for the session-ended page. `None` for other roles, or if the ledger cannot be
    /// read (the page then says where the record is kept).
    async fn credited_minutes(&self, who: &ParticipantId, role: Role) -> Option<f64> {
        if role != Role::Client {
            return None;
        }
        let entries = self.ledger.session_events(self.id.clone()).await.ok()?;
        let report = attendance::session_report(&entries, &self.policy.counting);
        let row = report
            .participants
            .iter()
            .find(|p| &p.participant_id == who)?;
        Some((row.credited_seconds / 60.0 * 100.0).round() / 100.0)
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
            .map(|(id, m)| Self::peer_view(id, m))
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

    async fn media_action(
        &mut self,
        from: ParticipantId,
        action: MediaAction,
    ) -> Result<(), SignalError> {
        match action {
            MediaAction::VideoSize {
                participant_id,
                width,
                height,
            } => {
                let publisher = ParticipantId::parse(&participant_id)
                    .ok()
                    .filter(|p| self.members.contains_key(p))
                    .ok_or_else(|| {
                        SignalError::new(
                            ErrorCode::UnknownParticipant,
                            "No such participant in this session.",
                        )
                    })?;
                // Larger than any screen is a mistake; clamp rather than refuse.
                let (width, height) = (width.min(16_384), height.min(16_384));
                self.room
                    .set_video_size(from, publisher, width, height)
                    .await;
            }
            MediaAction::AudioOnly(enabled) => self.room.set_audio_only(from, enabled).await,
            MediaAction::IceRestart => self.room.restart_ice(from).await,
        }
        Ok(())
    }

    /// Writes a modality change to the ledger when it differs from the last one written for
    /// this stay.
    async fn record_modality(&mut self, who: &ParticipantId, audio_only: bool, at: OffsetDateTime) {
        let Some(m) = self
            .members
            .get(who)
            .filter(|m| m.stage == Stage::Admitted && m.audio_only != audio_only)
        else {
            return;
        };
        let role = m.role;
        let modality = if audio_only {
            Modality::AudioOnly
        } else {
            Modality::Video
        };
        let at = m.admitted_at.map_or(at, |a| a.max(at));
        if self
            .record(
                Some((who, role)),
                EventKind::ModalityChanged { modality },
                at,
            )
            .await
            .is_ok()
        {
            if let Some(m) = self.members.get_mut(who) {
                m.audio_only = audio_only;
            }
        }
    }

    async fn room_event(&mut self, ev: RoomEvent) {
        match ev {
            RoomEvent::ModalityChanged {
                participant,
                audio_only,
                reason,
                at,
            } => {
                self.record_modality(&participant, audio_only, at.into())
                    .await;
                self.send_to(
                    &participant,
                    ServerMsg::Modality {
                        modality: if audio_only { "audio_only" } else { "video" },
                        reason: match reason {
                            AudioOnlyReason::Bandwidth => "bandwidth",
                            AudioOnlyReason::Requested => "requested",
                        },
                    },
                );
            }
            RoomEvent::ActiveSpeaker { participant } => {
                for (id, m) in &self.members {
                    if m.stage == Stage::Admitted {
                        self.send_to(
                            id,
                            ServerMsg::ActiveSpeaker {
                                participant_id: participant.clone(),
                            },
                        );
                    }
                }
            }
            RoomEvent::Quality(report) => {
                self.metrics.update_session(&self.id, &report);
                let participants: Vec<QualityView> = report.iter().map(QualityView::from).collect();
                for (id, m) in &self.members {
                    if m.stage == Stage::Admitted && m.role == Role::Therapist {
                        self.send_to(
                            id,
                            ServerMsg::Quality {
                                participants: participants.clone(),
                            },
                        );
                    }
                }
            }
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

/// 32 random bytes, hex. Only the holder of the `joined` message knows it.
fn new_resume_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets without stopping at the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
