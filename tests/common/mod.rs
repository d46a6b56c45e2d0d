//! Helpers shared by the end-to-end tests: a real `haven` process on loopback, join tokens,
//! and a WebSocket client that speaks the signaling protocol.

#![allow(dead_code)]

pub mod peer;
pub mod proxy;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_haven");

/// Set (to `1`) by the test command when the tests run in a private network namespace.
pub const ENV_IN_NETNS: &str = "HAVEN_IN_NETNS";

/// Fails a test that sends WebRTC traffic unless it runs in a private network namespace:
/// WebRTC stacks gather candidates on every interface, and no packet may leave the machine.
pub fn require_netns(test: &str) {
    assert_eq!(
        std::env::var(ENV_IN_NETNS).as_deref(),
        Ok("1"),
        "this test sends WebRTC traffic and must run in a private network namespace: \
         unshare -n sh -c 'ip link set lo up; ip route add 224.0.0.0/4 dev lo; \
         {ENV_IN_NETNS}=1 cargo test --test {test}'"
    );
}

/// Sets the server's `RUST_LOG` for a test run (default `info`), for example
/// `HAVEN_TEST_LOG=debug` to see signaling and media detail in [`Server::log_text`].
pub const ENV_TEST_LOG: &str = "HAVEN_TEST_LOG";

/// How long `haven serve` may take to print its start-up line.
const STARTUP_WAIT: Duration = Duration::from_secs(20);

/// How many of the server's last output lines [`Server::log_text`] keeps.
const LOG_LINES_KEPT: usize = 20_000;

/// A `haven serve` process with its own data directory, on ports the OS picked.
pub struct Server {
    pub child: Child,
    pub http: String,
    pub data_dir: PathBuf,
    /// The server's output lines (its log), the last [`LOG_LINES_KEPT`] of them.
    pub log: Arc<Mutex<VecDeque<String>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start() -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut s = Server::start_in(tmp.path());
        s._tmp = Some(tmp);
        s
    }

    /// Starts with extra environment, for example `HAVEN_CAPACITY_GROUP`.
    pub fn start_with_env(env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut s = Server::start_in_with_env(tmp.path(), env);
        s._tmp = Some(tmp);
        s
    }

    /// Starts on `data_dir`, which outlives the server (for restart tests).
    pub fn start_in(data_dir: &Path) -> Server {
        Server::start_in_with_env(data_dir, &[])
    }

    pub fn start_in_with_env(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--http",
                "127.0.0.1:0",
                "--media-port",
                "0",
                "--data-dir",
            ])
            .arg(data_dir)
            .env(
                "RUST_LOG",
                std::env::var(ENV_TEST_LOG).unwrap_or_else(|_| "info".into()),
            )
            // Plain log lines, whatever the terminal.
            .env("NO_COLOR", "1")
            // Tests stop servers with SIGTERM; they need not wait the production drain.
            .env("HAVEN_DRAIN_SECONDS", "2")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn haven");

        // Every output line goes to `log`, so a failing test can show what the server said;
        // reading all the time also keeps the server from blocking on a full pipe. The log goes
        // to stderr; stdout is read too so nothing the server prints can block it.
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (first_lines, startup) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        collect_lines(stdout, log.clone(), first_lines.clone());
        collect_lines(stderr, log.clone(), first_lines);

        // The start-up line names the address the OS gave us.
        let deadline = std::time::Instant::now() + STARTUP_WAIT;
        let mut http = None;
        while http.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = startup.recv_timeout(left) else {
                break;
            };
            if let Some(rest) = line.split("http=").nth(1) {
                http = rest.split_whitespace().next().map(str::to_owned);
            }
        }
        let Some(http) = http else {
            let _ = child.kill();
            let said = log
                .lock()
                .map(|l| Vec::from(l.clone()).join("\n"))
                .unwrap_or_default();
            panic!("haven printed no start-up line within {STARTUP_WAIT:?}; it said:\n{said}");
        };
        Server {
            child,
            http,
            data_dir: data_dir.to_owned(),
            log,
            _tmp: None,
        }
    }

    /// The server's log so far, one line per line.
    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .map(|l| Vec::from(l.clone()).join("\n"))
            .unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// Mints a token with `haven token`; `extra` adds flags such as `--starts-at`.
    pub fn token(&self, session: &str, role: &str, subject: &str, extra: &[&str]) -> String {
        let out = Command::new(BIN)
            .args([
                "token",
                "--session",
                session,
                "--role",
                role,
                "--subject",
                subject,
                "--data-dir",
            ])
            .arg(&self.data_dir)
            .args(extra)
            .output()
            .expect("run haven token");
        assert!(
            out.status.success(),
            "haven token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// The development key, for tests that mint tokens `haven token` would refuse to make.
    pub fn dev_key(&self) -> jsonwebtoken::EncodingKey {
        let pem = std::fs::read(self.data_dir.join("dev-signing-key.pem")).expect("dev key");
        jsonwebtoken::EncodingKey::from_ed_pem(&pem).expect("Ed25519 PEM")
    }

    /// CPU seconds (user + system) the server has used, from `/proc`.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("proc stat");
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
        ticks / 100.0
    }

    /// Runs `haven attendance report --format json` for a session.
    pub fn report(&self, session: &str) -> Value {
        self.report_with_env(session, &[])
    }

    /// The kinds of the ledger entries about one participant, in order (from the export).
    pub fn ledger_kinds(&self, who: &str) -> Vec<String> {
        let out = Command::new(BIN)
            .args([
                "attendance",
                "export",
                "--auditor",
                "a-test-01",
                "--format",
                "json",
            ])
            .args([
                "--from",
                "2000-01-01T00:00:00Z",
                "--to",
                "2100-01-01T00:00:00Z",
            ])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .expect("run haven attendance export");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entries: Value = serde_json::from_slice(&out.stdout).expect("export is JSON");
        entries
            .as_array()
            .expect("a list of entries")
            .iter()
            .filter(|e| e["event"]["participant_id"] == who)
            .filter_map(|e| e["event"]["kind"]["type"].as_str().map(str::to_owned))
            .collect()
    }

    /// The session report with extra environment (for example `HAVEN_DATABASE_URL`).
    pub fn report_with_env(&self, session: &str, env: &[(&str, &str)]) -> Value {
        let out = Command::new(BIN)
            .args([
                "attendance",
                "report",
                "--auditor",
                "a-test-01",
                "--format",
                "json",
                "--session",
                session,
                "--data-dir",
            ])
            .arg(&self.data_dir)
            .envs(env.iter().copied())
            .output()
            .expect("run haven attendance report");
        assert!(
            out.status.success(),
            "report failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report is JSON")
    }

    /// How many entries the ledger holds, read straight from the SQLite file.
    pub fn ledger_entries(&self) -> i64 {
        let path = self.data_dir.join("attendance.sqlite3");
        let db = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open ledger");
        db.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))
            .expect("count")
    }

    pub fn stop(&mut self) {
        // SIGTERM first, so the server can finish writing; then make sure it is gone.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `from` line by line on its own thread into `log` (bounded) and `first_lines`.
fn collect_lines(
    from: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<VecDeque<String>>>,
    first_lines: std::sync::mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let line = strip_ansi(&line);
            // Nobody listens once start-up is over; that is fine.
            let _ = first_lines.send(line.clone());
            let Ok(mut kept) = log.lock() else { return };
            if kept.len() >= LOG_LINES_KEPT {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    });
}

/// Removes terminal colour sequences (`ESC [ ... letter`) from a log line.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip the sequence up to and including its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A signaling client over a real WebSocket.
pub struct Signal {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Signal {
    pub async fn connect(server: &Server) -> Signal {
        Signal::connect_url(&server.ws_url()).await
    }

    /// Connects to a `ws://` URL, for tasks that do not hold the [`Server`].
    pub async fn connect_url(url: &str) -> Signal {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        Signal { ws }
    }

    /// Sends, returning false when the server has already closed the socket.
    pub async fn try_send(&mut self, v: Value) -> bool {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .is_ok()
    }

    /// Sends a raw text frame (for malformed input).
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    /// Admits everyone a `waiting_list` message names (as a therapist's page would).
    pub async fn admit_all(&mut self, waiting_list: &Value) {
        for w in waiting_list["waiting"].as_array().into_iter().flatten() {
            let id = w["participant_id"].clone();
            self.send(json!({"type": "admit", "participant_id": id}))
                .await;
        }
    }

    pub async fn join(&mut self, token: &str) {
        self.send(json!({"type": "join", "token": token})).await;
    }

    /// The next JSON message, or `None` when the socket closed. Bounded by `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(Message::Text(t)) => {
                    return Some(serde_json::from_str(&t).expect("server sends JSON"))
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("a message within 10 s")
    }

    /// Skips messages until one of type `kind` arrives.
    pub async fn expect(&mut self, kind: &str) -> Value {
        for _ in 0..100 {
            let m = self.recv().await;
            if m["type"] == kind {
                return m;
            }
        }
        panic!("no {kind} message");
    }

    /// Skips messages until one of type `kind` for which `pred` holds arrives.
    pub async fn expect_where(&mut self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..100 {
            let m = self.recv().await;
            if m["type"] == kind && pred(&m) {
                return m;
            }
        }
        panic!("no matching {kind} message");
    }

    /// The waiting list once it names `who`.
    pub async fn waiting_list_with(&mut self, who: &str) -> Value {
        self.expect_where("waiting_list", |m| {
            m["waiting"]
                .as_array()
                .is_some_and(|w| w.iter().any(|p| p["participant_id"] == who))
        })
        .await
    }

    /// True when the server closes the socket within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Sends the next message received to a channel-less caller: the raw stream for tests
    /// that interleave signaling with media.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }
}

/// One HTTP/1.1 request over a fresh TCP connection: enough for the small JSON and CSV
/// answers of Haven's APIs. Returns the status, the content type and the body.
pub async fn http(
    server: &Server,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut s = TcpStream::connect(&server.http).await.expect("connect");
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.http,
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}
