//! Janus VideoRoom over Janus's WebSocket transport (subprotocol `janus-protocol`), as its
//! JavaScript library speaks it, with multistream subscriptions (Janus 1.x): one publishing
//! handle, and one subscribing handle that receives every other publisher of the room on one
//! peer connection, the same layout as Haven's.
//!
//! Limitation: the subscription is made once every publisher of the room has published (the
//! tool knows the room's size), instead of following `publishers` events and renegotiating.
//! Join time against Janus therefore includes waiting for the slowest publisher of the room
//! and is not comparable with Haven's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::haven::Ws;
use crate::participant::{Media, Reply};

/// Janus drops a session that says nothing for 60 s by default.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// Janus's error code for "room already exists", harmless when several runs share a server.
const ROOM_EXISTS: u64 = 427;

/// Janus's "no such feed": a publisher whose connection is not up yet. Retried.
const NO_SUCH_FEED: u64 = 428;
const SUBSCRIBE_RETRY: Duration = Duration::from_millis(250);
const SUBSCRIBE_ATTEMPTS: u32 = 40;

pub async fn connect(url: &str) -> anyhow::Result<Ws> {
    let mut req = url
        .into_client_request()
        .map_err(|e| anyhow!("bad Janus URL {url}: {e}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("janus-protocol"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| anyhow!("cannot open {url}: {e}"))?;
    Ok(ws)
}

/// What the participants of one Janus room share.
#[derive(Debug)]
pub struct JanusRoom {
    pub id: u64,
    /// Every feed (publisher id) of the room.
    pub feeds: Vec<u64>,
    /// How many of them have their publishing connection up (Janus said `webrtcup`).
    pub published: AtomicUsize,
    /// The room's bitrate cap (REMB), bits per second.
    pub bitrate: u64,
}

pub struct Janus {
    room: Arc<JanusRoom>,
    feed: u64,
    /// The first participant of a room creates it.
    creates_room: bool,
    session: Option<u64>,
    publisher_handle: Option<u64>,
    subscriber_handle: Option<u64>,
    published: bool,
    subscribe_requested: bool,
    subscribe_attempts: u32,
    retry_subscribe_at: Option<Instant>,
    last_keepalive: Instant,
    transactions: u64,
}

impl Janus {
    pub fn new(room: Arc<JanusRoom>, feed: u64, creates_room: bool) -> Self {
        Janus {
            room,
            feed,
            creates_room,
            session: None,
            publisher_handle: None,
            subscriber_handle: None,
            published: false,
            subscribe_requested: false,
            subscribe_attempts: 0,
            retry_subscribe_at: None,
            last_keepalive: Instant::now(),
            transactions: 0,
        }
    }

    pub fn start(&mut self) -> Vec<Value> {
        vec![json!({"janus": "create", "transaction": "create"})]
    }

    fn tx(&mut self, what: &str) -> String {
        self.transactions += 1;
        format!("{what}-{}", self.transactions)
    }

    fn message(&mut self, handle: u64, what: &str, body: Value, jsep: Option<Value>) -> Value {
        let mut m = json!({
            "janus": "message",
            "session_id": self.session,
            "handle_id": handle,
            "transaction": self.tx(what),
            "body": body,
        });
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        m
    }

    /// Says that every candidate of ours is in the SDP already.
    fn candidates_done(&mut self, handle: u64) -> Value {
        json!({
            "janus": "trickle",
            "session_id": self.session,
            "handle_id": handle,
            "transaction": self.tx("trickle"),
            "candidate": {"completed": true},
        })
    }

    fn attach(&mut self, what: &str) -> Value {
        json!({
            "janus": "attach",
            "session_id": self.session,
            "plugin": "janus.plugin.videoroom",
            "transaction": self.tx(what),
        })
    }

    fn join_publisher(&mut self, handle: u64) -> Value {
        let body = json!({
            "request": "join",
            "ptype": "publisher",
            "room": self.room.id,
            "id": self.feed,
        });
        self.message(handle, "join", body, None)
    }

    /// Subscribes to every other feed of the room on one handle (multistream).
    fn join_subscriber(&mut self, handle: u64) -> Value {
        self.subscribe_attempts += 1;
        let streams: Vec<Value> = self
            .room
            .feeds
            .iter()
            .filter(|f| **f != self.feed)
            .map(|f| json!({"feed": f}))
            .collect();
        let body = json!({
            "request": "join",
            "ptype": "subscriber",
            "room": self.room.id,
            "streams": streams,
        });
        self.message(handle, "sub", body, None)
    }

    pub fn on_message(&mut self, msg: &Value, media: &mut Media) -> anyhow::Result<Reply> {
        let mut reply = Reply::default();
        let kind = msg["janus"].as_str().unwrap_or_default();
        let tx = msg["transaction"].as_str().unwrap_or_default();
        let step = tx.split('-').next().unwrap_or_default();
        let data = &msg["plugindata"]["data"];

        if kind == "error" {
            bail!(
                "janus error {}: {}",
                msg["error"]["code"],
                msg["error"]["reason"]
            );
        }
        if let Some(code) = data["error_code"].as_u64() {
            if step == "sub" && code == NO_SUCH_FEED && self.subscribe_attempts < SUBSCRIBE_ATTEMPTS
            {
                self.retry_subscribe_at = Some(Instant::now() + SUBSCRIBE_RETRY);
                return Ok(reply);
            }
            if !(step == "room" && code == ROOM_EXISTS) {
                bail!("videoroom error {code}: {}", data["error"]);
            }
        }

        match (kind, step) {
            ("success", "create") => {
                self.session = msg["data"]["id"].as_u64();
                reply.send.push(self.attach("attachpub"));
            }
            ("success", "attachpub") => {
                let handle = msg["data"]["id"].as_u64().context("attach without id")?;
                self.publisher_handle = Some(handle);
                if self.creates_room {
                    let body = json!({
                        "request": "create",
                        "room": self.room.id,
                        "publishers": self.room.feeds.len(),
                        "bitrate": self.room.bitrate,
                        "audiocodec": "opus",
                        "videocodec": "vp8",
                        "permanent": false,
                    });
                    let m = self.message(handle, "room", body, None);
                    reply.send.push(m);
                } else {
                    reply.send.push(self.join_publisher(handle));
                }
            }
            ("success", "room") => {
                let handle = self.publisher_handle.context("room made before attach")?;
                reply.send.push(self.join_publisher(handle));
            }
            ("event", "join") if data["videoroom"] == "joined" => {
                reply.joined = true;
                let handle = self.publisher_handle.context("joined before attach")?;
                let sdp = media.publish_offer()?;
                let jsep = json!({"type": "offer", "sdp": sdp, "trickle": false});
                let m = self.message(handle, "publish", json!({"request": "publish"}), Some(jsep));
                reply.send.push(m);
                reply.send.push(self.candidates_done(handle));
            }
            ("event", "publish") => {
                if let Some(sdp) = msg["jsep"]["sdp"].as_str() {
                    media.publish_answer(sdp)?;
                }
            }
            ("webrtcup", _)
                if msg["sender"].as_u64() == self.publisher_handle && !self.published =>
            {
                self.published = true;
                self.room.published.fetch_add(1, Ordering::SeqCst);
            }
            ("success", "attachsub") => {
                let handle = msg["data"]["id"].as_u64().context("attach without id")?;
                self.subscriber_handle = Some(handle);
                reply.send.push(self.join_subscriber(handle));
            }
            ("event", _) if msg["jsep"]["type"] == "offer" => {
                let handle = self.subscriber_handle.context("offer before subscribing")?;
                let sdp = msg["jsep"]["sdp"].as_str().context("offer without sdp")?;
                let answer = media.subscribe_offer(sdp)?;
                let jsep = json!({"type": "answer", "sdp": answer, "trickle": false});
                let m = self.message(handle, "start", json!({"request": "start"}), Some(jsep));
                reply.send.push(m);
                reply.send.push(self.candidates_done(handle));
            }
            _ => {}
        }
        Ok(reply)
    }

    pub fn on_tick(&mut self, now: Instant) -> Vec<Value> {
        let mut out = Vec::new();
        let everyone_published =
            self.room.published.load(Ordering::SeqCst) >= self.room.feeds.len();
        if self.published && !self.subscribe_requested && everyone_published {
            self.subscribe_requested = true;
            out.push(self.attach("attachsub"));
        }
        if let (Some(at), Some(handle)) = (self.retry_subscribe_at, self.subscriber_handle) {
            if now >= at {
                self.retry_subscribe_at = None;
                out.push(self.join_subscriber(handle));
            }
        }
        if self.session.is_some() && now.duration_since(self.last_keepalive) >= KEEPALIVE_EVERY {
            self.last_keepalive = now;
            let tx = self.tx("keepalive");
            out.push(json!({"janus": "keepalive", "session_id": self.session, "transaction": tx}));
        }
        out
    }

    pub fn leave(&mut self) -> Vec<Value> {
        match self.session {
            Some(s) => {
                let tx = self.tx("destroy");
                vec![json!({"janus": "destroy", "session_id": s, "transaction": tx})]
            }
            None => Vec::new(),
        }
    }
}
