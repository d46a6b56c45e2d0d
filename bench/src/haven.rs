//! Haven's signaling protocol (`docs/protocol.md`), as a browser speaks it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::participant::{Media, Reply};

/// Browsers ping this often so proxies keep the socket open.
const PING_EVERY: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| anyhow!("cannot open {url}: {e}"))?;
    Ok(ws)
}

pub struct Haven {
    token: String,
    is_therapist: bool,
    admitted: HashSet<String>,
    last_ping: Instant,
}

impl Haven {
    pub fn new(token: String, is_therapist: bool) -> Self {
        Haven {
            token,
            is_therapist,
            admitted: HashSet::new(),
            last_ping: Instant::now(),
        }
    }

    pub fn start(&mut self) -> Vec<Value> {
        vec![json!({"type": "join", "token": self.token})]
    }

    pub fn on_message(&mut self, msg: &Value, media: &mut Media) -> anyhow::Result<Reply> {
        let mut reply = Reply::default();
        let sdp = || {
            msg["sdp"]
                .as_str()
                .ok_or_else(|| anyhow!("{} without sdp", msg["type"]))
        };
        match msg["type"].as_str().unwrap_or_default() {
            // The therapist lets in everyone who waits.
            "waiting_list" if self.is_therapist => {
                for w in msg["waiting"].as_array().into_iter().flatten() {
                    let id = w["participant_id"].as_str().unwrap_or_default().to_owned();
                    if self.admitted.insert(id.clone()) {
                        reply
                            .send
                            .push(json!({"type": "admit", "participant_id": id}));
                    }
                }
            }
            "joined" => {
                reply.joined = true;
                let sdp = media.publish_offer()?;
                reply
                    .send
                    .push(json!({"type": "publish_offer", "sdp": sdp}));
            }
            "publish_answer" => media.publish_answer(sdp()?)?,
            "subscribe_offer" => {
                let negotiation = msg["negotiation"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("subscribe_offer without negotiation"))?;
                let answer = media.subscribe_offer(sdp()?)?;
                reply.send.push(json!({
                    "type": "subscribe_answer",
                    "negotiation": negotiation,
                    "sdp": answer,
                }));
            }
            "error" => bail!("haven error {}: {}", msg["code"], msg["message"]),
            "left" => reply.done = true,
            _ => {}
        }
        Ok(reply)
    }

    pub fn on_tick(&mut self, now: Instant) -> Vec<Value> {
        if now.duration_since(self.last_ping) < PING_EVERY {
            return Vec::new();
        }
        self.last_ping = now;
        vec![json!({"type": "ping"})]
    }

    pub fn leave(&self) -> Vec<Value> {
        vec![json!({"type": "leave"})]
    }
}
