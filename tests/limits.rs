//! Limits on what comes in, slow and silent clients, draining, and logs without private
//! data. Each limit test also checks that another room did not notice.

mod common;

use std::time::Duration;

use common::{Server, Signal};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A therapist alone in a room of their own, to check that other rooms carry on.
async fn bystander(server: &Server) -> Signal {
    let mut t = Signal::connect(server).await;
    t.join(&server.token("sess-bystander", "therapist", "t-by-01", &[]))
        .await;
    t.expect("joined").await;
    t
}

async fn still_fine(s: &mut Signal) {
    s.send(json!({"type": "ping"})).await;
    s.expect("pong").await;
}

/// The close code the server sends, reading until the close frame.
async fn close_code<S>(ws: &mut S) -> Option<u16>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()?? {
            Ok(Message::Close(Some(f))) => return Some(f.code.into()),
            Ok(Message::Close(None)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let server = Server::start();
    let mut other = bystander(&server).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    let token = server.token("sess-big", "therapist", "t-big-01", &[]);
    ws.send(Message::Text(
        json!({"type": "join", "token": token}).to_string().into(),
    ))
    .await
    .expect("send");
    let big = json!({"type": "publish_offer", "sdp": "x".repeat(100 * 1024)}).to_string();
    ws.send(Message::Text(big.into())).await.expect("send");
    assert_eq!(close_code(&mut ws).await, Some(1009));
    still_fine(&mut other).await;
}

#[tokio::test]
async fn a_flooding_client_is_warned_then_closed_with_1008() {
    let server = Server::start_with_env(&[
        ("HAVEN_MESSAGES_PER_SECOND", "5"),
        ("HAVEN_MESSAGE_BURST", "10"),
    ]);
    let mut other = bystander(&server).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    let token = server.token("sess-flood", "therapist", "t-fl-01", &[]);
    ws.send(Message::Text(
        json!({"type": "join", "token": token}).to_string().into(),
    ))
    .await
    .expect("send");
    for _ in 0..200 {
        if ws
            .send(Message::Text(json!({"type": "ping"}).to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut warned = false;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Text(t))) => warned |= t.contains("rate_limited"),
            Some(Ok(Message::Close(Some(f)))) => break Some(u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => break None,
        }
    };
    assert!(warned, "a rate_limited warning comes first");
    assert_eq!(code, Some(1008));
    still_fine(&mut other).await;
}

/// Sends a raw HTTP request and returns the status code.
async fn raw_status(server: &Server, request: String) -> u16 {
    let mut s = tokio::net::TcpStream::connect(&server.http)
        .await
        .expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line")
}

fn upgrade_request(server: &Server, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n",
        server.http
    )
}

#[tokio::test]
async fn oversized_urls_headers_and_foreign_origins_are_refused_at_the_upgrade() {
    let server = Server::start();
    let mut other = bystander(&server).await;

    let long_path = format!("/ws?{}", "a".repeat(8 * 1024));
    assert_eq!(
        raw_status(&server, upgrade_request(&server, &long_path, "")).await,
        414
    );
    let fat = format!("X-Padding: {}\r\n", "b".repeat(20 * 1024));
    assert_eq!(
        raw_status(&server, upgrade_request(&server, "/ws", &fat)).await,
        431
    );
    let foreign = "Origin: https://elsewhere.example\r\n";
    assert_eq!(
        raw_status(&server, upgrade_request(&server, "/ws", foreign)).await,
        403
    );
    let own = format!("Origin: http://{}\r\n", server.http);
    assert_eq!(
        raw_status(&server, upgrade_request(&server, "/ws", &own)).await,
        101
    );

    still_fine(&mut other).await;
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let server = Server::start_with_env(&[("HAVEN_CONNECTIONS_PER_ADDRESS", "3")]);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            tokio_tungstenite::connect_async(server.ws_url())
                .await
                .expect("within the cap"),
        );
    }
    assert_eq!(
        raw_status(&server, upgrade_request(&server, "/ws", "")).await,
        429
    );
    drop(open);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = Signal::connect(&server).await;
    again
        .join(&server.token("sess-cap2", "therapist", "t-cap-01", &[]))
        .await;
    again.expect("joined").await;
}

#[tokio::test]
async fn a_silent_client_is_closed_and_its_stay_ends_at_its_last_sign_of_life() {
    let server = Server::start_with_env(&[
        ("HAVEN_SILENCE_TIMEOUT_SECONDS", "5"),
        ("HAVEN_RESUME_GRACE_SECONDS", "1"),
    ]);
    let mut other = bystander(&server).await;

    // Joins, then never reads again: no pongs, no messages.
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    let token = server.token("sess-silent", "therapist", "t-si-01", &[]);
    ws.send(Message::Text(
        json!({"type": "join", "token": token}).to_string().into(),
    ))
    .await
    .expect("send");
    let last_sign = time::OffsetDateTime::now_utc();

    // Closed within the silence timeout plus one ping interval, then the grace period. The
    // bystander keeps talking meanwhile, so only the silent client is closed.
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        still_fine(&mut other).await;
    }
    let report = server.report("sess-silent");
    let row = report.to_string();
    assert!(
        row.contains("connection_lost"),
        "stay closed as connection lost: {row}"
    );
    let left_at = find_left_at(&report, "t-si-01").expect("left_at");
    let diff = (left_at - last_sign).abs();
    assert!(
        diff < time::Duration::seconds(2),
        "left at the last sign of life, not later: {diff}"
    );
    drop(ws);
}

fn find_left_at(report: &serde_json::Value, who: &str) -> Option<time::OffsetDateTime> {
    let rows = report.get("participants")?.as_array()?;
    let row = rows.iter().find(|r| r["participant_id"] == who)?;
    time::OffsetDateTime::parse(
        row["left_at"].as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
}

#[tokio::test]
async fn draining_refuses_joins_tells_everyone_and_closes_stays_with_server_shutdown() {
    let server = Server::start_with_env(&[("HAVEN_DRAIN_SECONDS", "3")]);
    let mut t = Signal::connect(&server).await;
    t.join(&server.token("sess-drain", "therapist", "t-dr-01", &[]))
        .await;
    t.expect("joined").await;

    let status = std::process::Command::new(common::BIN)
        .args(["drain", "--data-dir"])
        .arg(&server.data_dir)
        .status()
        .expect("haven drain");
    assert!(status.success());
    t.expect("going_away").await;

    let mut late = Signal::connect(&server).await;
    late.join(&server.token("sess-drain", "client", "p-dr-01", &[]))
        .await;
    let refused = late.recv_within(Duration::from_secs(5)).await;
    assert_eq!(
        refused.as_ref().map(|m| m["code"].clone()),
        Some(json!("server_draining")),
        "got {refused:?}"
    );

    assert_eq!(t.expect("left").await["reason"], "server_shutdown");
    let mut server = server;
    let exit = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return (status, server);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server exits after draining"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .expect("wait");
    assert!(exit.0.success(), "exit status 0");
    let report = exit.1.report("sess-drain");
    assert!(report.to_string().contains("server_shutdown"), "{report}");
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once_and_still_writes_the_ledger() {
    let server = Server::start_with_env(&[("HAVEN_DRAIN_SECONDS", "120")]);
    let mut t = Signal::connect(&server).await;
    t.join(&server.token("sess-drain2", "therapist", "t-dr-02", &[]))
        .await;
    t.expect("joined").await;

    let pid = server.child.id().to_string();
    let kill = |pid: &str| {
        std::process::Command::new("kill")
            .args(["-TERM", pid])
            .status()
            .expect("kill")
    };
    kill(&pid);
    t.expect("going_away").await;
    kill(&pid);
    assert_eq!(t.expect("left").await["reason"], "server_shutdown");

    let mut server = server;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(s)) = server.child.try_wait() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exits promptly after the second signal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success());
    assert!(server
        .report("sess-drain2")
        .to_string()
        .contains("server_shutdown"));
}

#[tokio::test]
async fn logs_above_trace_hold_no_names_tokens_sdp_or_addresses() {
    // At debug, the most an operator turns on short of trace (the WebRTC libraries stay at
    // warn unless traced by name).
    let server = Server::start_with_env(&[("RUST_LOG", "debug")]);
    let name = "Zqx-Canary Client";
    let session = "sess-priv";
    let therapist_token = server.token(
        session,
        "therapist",
        "t-pr-01",
        &["--display-name", "Zqx-Canary Therapist"],
    );
    let client_token = server.token(session, "client", "p-pr-01", &["--display-name", name]);

    let mut t = Signal::connect(&server).await;
    t.join(&therapist_token).await;
    t.expect("joined").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    let local = ws.get_ref().get_ref_addr();
    ws.send(Message::Text(
        json!({"type": "join", "token": client_token})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    t.waiting_list_with("p-pr-01").await;
    t.send(json!({"type": "admit", "participant_id": "p-pr-01"}))
        .await;
    t.expect("participant_joined").await;
    let sdp = "v=0\r\no=- 1 2 IN IP4 203.0.113.77\r\ns=-\r\na=ice-ufrag:SecretUfragXyz\r\n";
    ws.send(Message::Text(
        json!({"type": "publish_offer", "sdp": sdp})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::Text(json!({"type": "leave"}).to_string().into()))
        .await
        .expect("send");
    t.expect("participant_left").await;
    t.send(json!({"type": "remove", "participant_id": "p-pr-01"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut server = server;
    server.stop();
    let log = server.log_text();
    assert!(
        log.contains("participant admitted"),
        "the log is being read: {log}"
    );
    let secrets = [
        name.to_owned(),
        "Zqx-Canary".to_owned(),
        therapist_token.clone(),
        client_token.clone(),
        // Any part of a token, not just the whole of it.
        client_token
            .split('.')
            .nth(2)
            .unwrap_or_default()
            .to_owned(),
        "SecretUfragXyz".to_owned(),
        "203.0.113.77".to_owned(),
        local.clone(),
    ];
    for s in secrets {
        assert!(!log.contains(&s), "the log contains {s:?}:\n{log}");
    }
}

/// The local address of a client socket as "ip:port".
trait LocalAddr {
    fn get_ref_addr(&self) -> String;
}

impl LocalAddr for tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream> {
    fn get_ref_addr(&self) -> String {
        match self {
            tokio_tungstenite::MaybeTlsStream::Plain(s) => {
                s.local_addr().map(|a| a.to_string()).unwrap_or_default()
            }
            _ => String::new(),
        }
    }
}

/// A small deterministic generator, so a failing sequence can be replayed from its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[tokio::test]
async fn random_message_sequences_from_both_sides_never_break_the_server() {
    let server = Server::start_with_env(&[
        ("HAVEN_MESSAGES_PER_SECOND", "1000"),
        ("HAVEN_MESSAGE_BURST", "1000"),
    ]);
    let mut other = bystander(&server).await;
    let types = [
        "publish_offer",
        "subscribe_answer",
        "candidate",
        "admit",
        "deny",
        "mute",
        "remove",
        "ping",
        "join",
        "dance",
        "",
    ];
    let ids = ["p-fz-01", "t-fz-01", "nobody", "", "../../etc", "p-fz-01\n"];

    for seed in [7u64, 42, 1234] {
        let mut rng = XorShift(seed);
        let mut t = Signal::connect(&server).await;
        t.join(&server.token("sess-fuzz", "therapist", "t-fz-01", &[]))
            .await;
        let mut c = Signal::connect(&server).await;
        c.join(&server.token("sess-fuzz", "client", "p-fz-01", &[]))
            .await;

        for _ in 0..150 {
            let to_therapist = rng.next().is_multiple_of(2);
            let msg = json!({
                "type": rng.pick(&types),
                "participant_id": rng.pick(&ids),
                "negotiation": rng.next() % 5,
                "sdp": rng.pick(&["v=0", "", "garbage\r\n", "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"]),
                "pc": rng.pick(&["publish", "subscribe", "both"]),
                "candidate": rng.pick(&["", "candidate:1 1 udp 1 127.0.0.1 9 typ host", "nonsense"]),
                "muted": rng.next().is_multiple_of(2),
                "token": "x",
            });
            // A sequence may get a socket closed (a removal, a bad join); the other keeps going.
            let (who, other) = if to_therapist {
                (&mut t, &mut c)
            } else {
                (&mut c, &mut t)
            };
            if !who.try_send(msg).await && !other.try_send(json!({"type": "ping"})).await {
                break;
            }
        }
        // Both sockets may have been closed by the sequence (a removal, say); the server and
        // the other room must be fine either way.
        still_fine(&mut other).await;
    }
    let mut server = server;
    server.stop();
    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_refuses_to_start_and_changes_nothing() {
    let server = Server::start();
    let mut t = Signal::connect(&server).await;
    t.join(&server.token("sess-lock", "therapist", "t-lk-01", &[]))
        .await;
    t.expect("joined").await;
    let before = server.ledger_entries();

    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--media-port",
            "0",
            "--data-dir",
        ])
        .arg(&server.data_dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("second haven");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("another haven is already running"), "{said}");
    assert_eq!(
        server.ledger_entries(),
        before,
        "no recovery ran on the live ledger"
    );
    assert!(
        server.data_dir.join("haven.pid").exists(),
        "the running server's pid file stays"
    );
    still_fine(&mut t).await;
}

#[tokio::test]
async fn drain_does_not_signal_a_stale_pid_that_is_not_haven() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    std::fs::write(dir.path().join("haven.pid"), format!("{}\n", other.id())).expect("pid file");
    let out = std::process::Command::new(common::BIN)
        .args(["drain", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("haven drain");
    assert!(!out.status.success());
    assert!(
        other.try_wait().expect("wait").is_none(),
        "the other program was not signalled"
    );
    let _ = other.kill();
    let _ = other.wait();
}

#[tokio::test]
async fn a_publish_offer_with_many_media_sections_is_refused() {
    let server = Server::start();
    let mut t = Signal::connect(&server).await;
    t.join(&server.token("sess-mlines", "therapist", "t-ml-01", &[]))
        .await;
    t.expect("joined").await;
    let mut sdp = String::from("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
    for _ in 0..50 {
        sdp.push_str("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n");
    }
    t.send(json!({"type": "publish_offer", "sdp": sdp})).await;
    let e = t.expect("error").await;
    assert_eq!(e["code"], "negotiation_failed");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("at most 4 media sections"),
        "{e}"
    );
    // The sentence never carries parser internals such as memory addresses.
    assert!(!e["message"].as_str().unwrap_or("").contains("0x"), "{e}");
    still_fine(&mut t).await;
}

#[tokio::test]
async fn a_request_whose_headers_never_finish_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = Server::start();
    let mut s = tokio::net::TcpStream::connect(&server.http)
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // Never the blank line that ends the headers: the server closes within its 10-second
    // header timeout (plus scheduling slack), instead of holding the connection forever.
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert_eq!(closed, Ok(true), "the connection was closed");
}

/// A publish offer whose video section names only a codec Haven does not forward.
fn offer_with_video_codec(rtpmap: &str, fmtp: Option<&str>) -> String {
    let mut sdp = String::from(
        "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
         a=group:BUNDLE 0\r\na=msid-semantic: WMS\r\n\
         m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
         a=ice-ufrag:Abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=ice-options:trickle\r\n\
         a=fingerprint:sha-256 12:34:56:78:9A:BC:DE:F0:12:34:56:78:9A:BC:DE:F0:12:34:56:78:9A:BC:DE:F0:12:34:56:78:9A:BC:DE:F0\r\n\
         a=setup:actpass\r\na=mid:0\r\na=sendonly\r\na=rtcp-mux\r\na=rtcp-rsize\r\n",
    );
    sdp.push_str(&format!("a=rtpmap:96 {rtpmap}\r\n"));
    if let Some(f) = fmtp {
        sdp.push_str(&format!("a=fmtp:96 {f}\r\n"));
    }
    sdp.push_str("a=ssrc:1234 cname:c-01\r\n");
    sdp
}

#[tokio::test]
async fn a_publisher_with_no_codec_in_common_gets_no_common_codec() {
    let server = Server::start();
    let mut t = Signal::connect(&server).await;
    t.join(&server.token("sess-codec", "therapist", "t-cd-01", &[]))
        .await;
    t.expect("joined").await;

    // A made-up codec: refused with its own code, and the socket stays usable.
    t.send(json!({"type": "publish_offer", "sdp": offer_with_video_codec("X-NOPE/90000", None)}))
        .await;
    let e = t.expect("error").await;
    assert_eq!(e["code"], "no_common_codec", "{e}");
    assert!(e["message"].as_str().unwrap_or_default().contains("video"));

    // H.264 at a higher level than Haven's own (5.2 instead of 3.1), constrained baseline:
    // matched on the profile, so it is accepted.
    let h264 = offer_with_video_codec(
        "H264/90000",
        Some("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e034"),
    );
    t.send(json!({"type": "publish_offer", "sdp": h264})).await;
    let answer = t.expect("publish_answer").await;
    let sdp = answer["sdp"].as_str().unwrap_or_default();
    assert!(sdp.contains("H264/90000"), "H.264 accepted: {sdp}");
}
