//! The signaling messages, version 1. `docs/protocol.md` shows an example of each.

use haven_ids::{ParticipantId, Role, SessionKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::SignalError;
use crate::ErrorCode;

pub const PROTOCOL_VERSION: u32 = 1;

/// Which peer connection a candidate belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PcName {
    Publish,
    Subscribe,
}

/// A message from the browser.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Join {
        token: String,
        #[serde(default)]
        resume: Option<String>,
    },
    PublishOffer {
        sdp: String,
        /// The browser's number for this offer; the answer carries it back.
        #[serde(default)]
        negotiation: Option<u64>,
    },
    SubscribeAnswer {
        negotiation: u64,
        sdp: String,
    },
    Candidate {
        pc: PcName,
        candidate: String,
    },
    Admit {
        participant_id: String,
    },
    Deny {
        participant_id: String,
    },
    Mute {
        participant_id: String,
        muted: bool,
    },
    Remove {
        participant_id: String,
    },
    EndSession,
    Leave,
    Ping,
    /// The size, in device pixels, at which this browser shows `participant_id`'s camera;
    /// `0 x 0` when it is not shown. The server sends the simulcast layer that fits.
    VideoSize {
        participant_id: String,
        width: u32,
        height: u32,
    },
    /// The participant wants no video (`enabled: true`) or wants it back.
    AudioOnly {
        enabled: bool,
    },
    /// Restart ICE on the subscribe connection; a new `subscribe_offer` follows.
    IceRestart,
}

const CLIENT_TYPES: &[&str] = &[
    "join",
    "publish_offer",
    "subscribe_answer",
    "candidate",
    "admit",
    "deny",
    "mute",
    "remove",
    "end_session",
    "leave",
    "ping",
    "video_size",
    "audio_only",
    "ice_restart",
];

impl ClientMsg {
    /// Parses one text frame, telling an unknown type apart from a malformed message.
    pub fn parse(text: &str) -> Result<ClientMsg, SignalError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|_| {
            SignalError::new(ErrorCode::BadMessage, "The message is not valid JSON.")
        })?;
        // serde_json keeps the last of repeated keys; a message that says two things at once
        // is refused instead, so nothing in front of Haven can read it differently.
        if serde_json::from_str::<NoRepeatedKeys>(text).is_err() {
            return Err(SignalError::new(
                ErrorCode::BadMessage,
                "The message has the same field more than once; send each field once.",
            ));
        }
        let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
            return Err(SignalError::new(
                ErrorCode::BadMessage,
                "The message has no \"type\" field.",
            ));
        };
        if !CLIENT_TYPES.contains(&kind) {
            return Err(SignalError::new(
                ErrorCode::UnknownType,
                "This message type is not part of protocol version 1.",
            ));
        }
        let kind = kind.to_owned();
        serde_json::from_value(value).map_err(|e| {
            // serde's sentence names the field and the expected type; it never echoes values.
            SignalError::new(
                ErrorCode::BadMessage,
                format!("The \"{kind}\" message is malformed: {e}."),
            )
        })
    }
}

/// Checks that no JSON object, at any depth, repeats a key; keeps nothing.
struct NoRepeatedKeys;

impl<'de> Deserialize<'de> for NoRepeatedKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoRepeatedKeysVisitor)
    }
}

struct NoRepeatedKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoRepeatedKeysVisitor {
    type Value = NoRepeatedKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value without repeated keys")
    }

    fn visit_bool<E>(self, _: bool) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }

    fn visit_i64<E>(self, _: i64) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }

    fn visit_u64<E>(self, _: u64) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }

    fn visit_f64<E>(self, _: f64) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }

    fn visit_str<E>(self, _: &str) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }

    fn visit_unit<E>(self) -> Result<NoRepeatedKeys, E> {
        Ok(NoRepeatedKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<NoRepeatedKeys, A::Error> {
        while seq.next_element::<NoRepeatedKeys>()?.is_some() {}
        Ok(NoRepeatedKeys)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<NoRepeatedKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(serde::de::Error::custom("repeated key"));
            }
            map.next_value::<NoRepeatedKeys>()?;
        }
        Ok(NoRepeatedKeys)
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SessionView {
    pub id: String,
    pub kind: SessionKind,
    #[serde(with = "time::serde::rfc3339")]
    pub starts_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub ends_at: OffsetDateTime,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PeerView {
    pub participant_id: ParticipantId,
    pub role: Role,
    pub display_name: Option<String>,
    pub muted: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TrackView {
    pub mid: String,
    pub participant_id: ParticipantId,
    pub kind: &'static str,
    pub active: bool,
}

/// A TURN server and the short-lived credentials issued for it, shaped like the browser's
/// `RTCIceServer` so the client can hand it to `RTCPeerConnection` as it is.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct IceServerView {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

/// One participant's connection as the server sees it, for the therapist's panel.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct QualityView {
    pub participant_id: ParticipantId,
    pub bitrate_in_kbps: Option<u64>,
    pub bitrate_out_kbps: Option<u64>,
    pub loss_in: Option<f32>,
    pub loss_out: Option<f32>,
    pub rtt_ms: Option<u64>,
    /// The bandwidth estimate toward the participant.
    pub estimate_kbps: Option<u64>,
    /// The best layer the participant receives: "high", "medium", "low", or null.
    pub layer: Option<&'static str>,
    /// "video" or "audio_only".
    pub modality: &'static str,
}

impl From<&sfu::ParticipantQuality> for QualityView {
    fn from(q: &sfu::ParticipantQuality) -> Self {
        QualityView {
            participant_id: q.participant.clone(),
            bitrate_in_kbps: q.bitrate_in_bps.map(|b| b / 1000),
            bitrate_out_kbps: q.bitrate_out_bps.map(|b| b / 1000),
            loss_in: q.loss_in,
            loss_out: q.loss_out,
            rtt_ms: q.rtt.map(|d| d.as_millis() as u64),
            estimate_kbps: q.estimate_bps.map(|b| b / 1000),
            layer: q.layer.map(|l| l.as_str()),
            modality: if q.audio_only.is_some() {
                "audio_only"
            } else {
                "video"
            },
        }
    }
}

/// A message to the browser.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Joined {
        protocol: u32,
        participant_id: ParticipantId,
        role: Role,
        session: SessionView,
        participants: Vec<PeerView>,
        display_name: Option<String>,
        resume_token: String,
        resume_grace_seconds: u64,
        resumed: bool,
        muted: bool,
        /// TURN servers for both peer connections; empty when the node has none.
        ice_servers: Vec<IceServerView>,
    },
    Waiting {
        session: SessionView,
        therapist_present: bool,
    },
    WaitingList {
        waiting: Vec<PeerView>,
    },
    /// Someone entered the room; the same fields as an entry of `participants`.
    ParticipantJoined(PeerView),
    ParticipantLeft {
        participant_id: ParticipantId,
        reason: &'static str,
    },
    Muted {
        muted: bool,
    },
    ParticipantMuted {
        participant_id: ParticipantId,
        muted: bool,
    },
    PublishAnswer {
        sdp: String,
        /// The `negotiation` of the offer this answers, when the offer had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        negotiation: Option<u64>,
    },
    SubscribeOffer {
        negotiation: u64,
        sdp: String,
        tracks: Vec<TrackView>,
    },
    Left {
        reason: &'static str,
        /// For a client: the minutes credited for this session so far, as the ledger counts
        /// them; absent for other roles.
        #[serde(skip_serializing_if = "Option::is_none")]
        credited_minutes: Option<f64>,
    },
    /// Who speaks now (null when nobody does).
    ActiveSpeaker {
        participant_id: Option<ParticipantId>,
    },
    /// Video to this participant paused ("audio_only") or resumed ("video"), and why:
    /// "bandwidth" or "requested".
    Modality {
        modality: &'static str,
        reason: &'static str,
    },
    /// Connection figures of everyone in the room; to therapists only, every few seconds.
    Quality {
        participants: Vec<QualityView>,
    },
    /// The server is draining for maintenance; sessions should wrap up by `deadline`.
    GoingAway {
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    Pong,
    Error {
        code: &'static str,
        message: String,
        #[serde(
            skip_serializing_if = "Option::is_none",
            with = "time::serde::rfc3339::option"
        )]
        opens_at: Option<OffsetDateTime>,
    },
}

impl From<&SignalError> for ServerMsg {
    fn from(e: &SignalError) -> Self {
        ServerMsg::Error {
            code: e.code.as_str(),
            message: e.message.clone(),
            opens_at: e.opens_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_type_and_malformed_messages_get_different_codes() {
        let code = |s: &str| ClientMsg::parse(s).err().map(|e| e.code);
        assert_eq!(code("not json"), Some(ErrorCode::BadMessage));
        assert_eq!(code("{}"), Some(ErrorCode::BadMessage));
        assert_eq!(code(r#"{"type":"dance"}"#), Some(ErrorCode::UnknownType));
        assert_eq!(code(r#"{"type":"join"}"#), Some(ErrorCode::BadMessage));
        assert_eq!(
            code(r#"{"type":"subscribe_answer","negotiation":"x","sdp":""}"#),
            Some(ErrorCode::BadMessage)
        );
        assert!(matches!(
            ClientMsg::parse(r#"{"type":"leave","extra":1}"#),
            Ok(ClientMsg::Leave)
        ));
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        let code = |s: &str| ClientMsg::parse(s).err().map(|e| e.code);
        assert_eq!(
            code(r#"{"type":"mute","participant_id":"p-01","muted":true,"muted":false}"#),
            Some(ErrorCode::BadMessage)
        );
        // The same key spelled with an escape is the same key.
        assert_eq!(
            code(r#"{"type":"leave","\u0074ype":"ping"}"#),
            Some(ErrorCode::BadMessage)
        );
        assert_eq!(
            code(r#"{"type":"leave","extra":[{"a":1,"a":2}]}"#),
            Some(ErrorCode::BadMessage)
        );
        // Not valid JSON is still said as such, and the same key in sibling objects is fine.
        assert_eq!(
            ClientMsg::parse(r#"{"type":"leave","#)
                .err()
                .map(|e| e.message),
            Some("The message is not valid JSON.".to_owned())
        );
        assert!(matches!(
            ClientMsg::parse(r#"{"type":"leave","extra":[{"a":1},{"a":2}],"nested":{"a":null}}"#),
            Ok(ClientMsg::Leave)
        ));
        assert!(matches!(
            ClientMsg::parse(r#"{"type":"admit","participant_id":"p-01"}"#),
            Ok(ClientMsg::Admit { .. })
        ));
    }

    #[test]
    fn error_message_carries_opens_at_only_when_set() {
        let e = SignalError::new(ErrorCode::TokenExpired, "expired");
        let json = serde_json::to_value(ServerMsg::from(&e)).expect("serializable");
        assert_eq!(json["type"], "error");
        assert_eq!(json["code"], "token_expired");
        assert!(json.get("opens_at").is_none());
    }
}

#[cfg(test)]
mod fuzz {
    //! A bounded property pass over the parser: whatever arrives, parsing never panics and a
    //! refusal always carries one of the two parse codes. The test command runs it on every
    //! build (256 cases per property).

    use proptest::prelude::*;

    use super::*;

    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::hash_map("[a-z_]{1,12}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn check(text: &str) {
        if let Err(e) = ClientMsg::parse(text) {
            assert!(
                matches!(e.code, ErrorCode::BadMessage | ErrorCode::UnknownType),
                "{:?}",
                e.code
            );
            assert!(!e.message.is_empty());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            check(&text);
        }

        #[test]
        fn known_types_with_arbitrary_fields_never_panic(
            kind in prop::sample::select(CLIENT_TYPES.to_vec()),
            fields in prop::collection::hash_map("[a-z_]{1,14}", any_json(), 0..5),
        ) {
            let mut obj: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
            obj.insert("type".into(), kind.into());
            check(&serde_json::Value::Object(obj).to_string());
        }
    }
}
