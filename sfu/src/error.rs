use thiserror::Error;

/// What can go wrong in the media plane. Each variant has a stable [`SfuError::code`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SfuError {
    #[error(
        "cannot bind the media socket (is another haven running? choose another --media-port)"
    )]
    Bind(#[source] std::io::Error),
    #[error("the room has closed")]
    RoomClosed,
    #[error("no such participant in the room")]
    UnknownParticipant,
    #[error("the participant is already in the room")]
    AlreadyPresent,
    #[error("the room is full ({0} people)")]
    RoomFull(usize),
    #[error("a participant publishes at most {0} media sections")]
    TooManyTracks(usize),
    #[error("the session description could not be used: {0}")]
    BadSdp(String),
    #[error("no {0} codec in common: Haven takes Opus audio and VP8, H.264, VP9 or AV1 video")]
    NoCommonCodec(String),
    #[error(
        "the answer does not belong to the pending offer (negotiation {got}, pending {pending:?})"
    )]
    StaleAnswer { got: u64, pending: Option<u64> },
}

impl SfuError {
    /// A stable code for logs, signaling errors and tests.
    pub fn code(&self) -> &'static str {
        match self {
            SfuError::Bind(_) => "media_bind",
            SfuError::RoomClosed => "room_closed",
            SfuError::UnknownParticipant => "unknown_participant",
            SfuError::AlreadyPresent => "already_joined",
            SfuError::RoomFull(_) => "room_full",
            SfuError::BadSdp(_) | SfuError::TooManyTracks(_) => "negotiation_failed",
            SfuError::StaleAnswer { .. } => "stale_answer",
            SfuError::NoCommonCodec(_) => "no_common_codec",
        }
    }
}
