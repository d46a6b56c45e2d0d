//! The one error type of the signaling server: a stable code and a sentence a person can act
//! on. It becomes an `error` message on the WebSocket or a JSON body over HTTP.

use serde::Serialize;
use time::OffsetDateTime;

/// A stable error code; the wire names are listed in `docs/protocol.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    JoinRequired,
    TokenInvalid,
    TokenExpired,
    TooEarly,
    SessionOver,
    WrongAudience,
    RoleNotAllowed,
    SponsorNotAllowed,
    TokenRevoked,
    SessionFull,
    ClientNotPresent,
    Unauthorized,
    RateLimited,
    ServerDraining,
    AlreadyJoined,
    IdentityConflict,
    NotAdmitted,
    Forbidden,
    UnknownParticipant,
    UnknownSession,
    BadMessage,
    UnknownType,
    NegotiationFailed,
    NoCommonCodec,
    StaleAnswer,
    RoomFull,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::JoinRequired => "join_required",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TooEarly => "too_early",
            ErrorCode::SessionOver => "session_over",
            ErrorCode::WrongAudience => "wrong_audience",
            ErrorCode::RoleNotAllowed => "role_not_allowed",
            ErrorCode::SponsorNotAllowed => "sponsor_not_allowed",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::SessionFull => "session_full",
            ErrorCode::ClientNotPresent => "client_not_present",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ServerDraining => "server_draining",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::IdentityConflict => "identity_conflict",
            ErrorCode::NotAdmitted => "not_admitted",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownParticipant => "unknown_participant",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::NegotiationFailed => "negotiation_failed",
            ErrorCode::NoCommonCodec => "no_common_codec",
            ErrorCode::StaleAnswer => "stale_answer",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether the server closes the socket after sending this error.
    pub fn closes_socket(self) -> bool {
        matches!(
            self,
            ErrorCode::JoinRequired
                | ErrorCode::TokenInvalid
                | ErrorCode::TokenExpired
                | ErrorCode::TooEarly
                | ErrorCode::SessionOver
                | ErrorCode::WrongAudience
                | ErrorCode::RoleNotAllowed
                | ErrorCode::SponsorNotAllowed
                | ErrorCode::TokenRevoked
                | ErrorCode::IdentityConflict
                | ErrorCode::ServerDraining
                | ErrorCode::Internal
        )
    }
}

/// An error for the person on the other end.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct SignalError {
    pub code: ErrorCode,
    pub message: String,
    /// For `too_early`: when the waiting room opens.
    pub opens_at: Option<OffsetDateTime>,
}

impl SignalError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SignalError {
            code,
            message: message.into(),
            opens_at: None,
        }
    }

    /// A fault on our side. The cause is logged once, here; the person sees a generic sentence.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        SignalError::new(
            ErrorCode::Internal,
            "Something went wrong on the server. Please try again in a minute.",
        )
    }
}

impl From<sfu::SfuError> for SignalError {
    fn from(e: sfu::SfuError) -> Self {
        use sfu::SfuError as E;
        match e {
            E::BadSdp(why) => {
                // The parser's words can carry internal detail (addresses of the server's
                // memory); they go to the debug log, the person gets a plain sentence.
                tracing::debug!(%why, "session description refused");
                SignalError::new(
                    ErrorCode::NegotiationFailed,
                    "The media description could not be used. Reload the page to try again.",
                )
            }
            E::TooManyTracks(n) => SignalError::new(
                ErrorCode::NegotiationFailed,
                format!("Publish at most {n} media sections (camera and microphone)."),
            ),
            E::NoCommonCodec(kind) => SignalError::new(
                ErrorCode::NoCommonCodec,
                format!(
                    "This browser offered no {kind} format the server can forward (Opus audio; \
                     VP8, H.264, VP9 or AV1 video). Try an up-to-date Chrome, Firefox or Safari."
                ),
            ),
            E::StaleAnswer { .. } => SignalError::new(
                ErrorCode::StaleAnswer,
                "That answer is for an offer that is no longer pending; answer the latest offer.",
            ),
            E::RoomFull(n) => SignalError::new(
                ErrorCode::RoomFull,
                format!("This session already has {n} people in it."),
            ),
            E::UnknownParticipant => {
                SignalError::new(ErrorCode::NotAdmitted, "You are not in the session yet.")
            }
            other => SignalError::internal(&other),
        }
    }
}
