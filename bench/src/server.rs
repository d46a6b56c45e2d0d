//! A `haven` process for a run, and join tokens minted with a data directory's development key.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The development key's file in a data directory, its issuer and audience.
pub const DEV_KEY_FILE: &str = "dev-signing-key.pem";
pub const DEV_ISSUER: &str = "haven-dev";
pub const DEV_AUDIENCE: &str = "haven";

/// How long `haven serve` may take to print where it listens.
const STARTUP_WAIT: Duration = Duration::from_secs(20);

/// Haven's setting for open WebSockets per client address, and the value a spawned server
/// gets (unless the environment sets it): more than any run opens.
const ENV_CONNECTIONS_PER_ADDRESS: &str = "HAVEN_CONNECTIONS_PER_ADDRESS";
const CONNECTIONS_PER_ADDRESS: usize = 100_000;

/// Haven's setting for people in a group session, and the value a spawned server gets
/// (unless the environment sets it): the largest room the tool opens.
const ENV_CAPACITY_GROUP: &str = "HAVEN_CAPACITY_GROUP";
const CAPACITY_GROUP: usize = 16;

/// Log lines of the server kept for a report when something fails.
const LOG_LINES_KEPT: usize = 400;

/// Mints join tokens the way the scheduling system would.
pub struct Minter {
    key: EncodingKey,
}

impl Minter {
    /// Reads an Ed25519 PKCS#8 PEM key, such as `<data dir>/dev-signing-key.pem`.
    pub fn from_pem_file(path: &Path) -> anyhow::Result<Minter> {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let key = EncodingKey::from_ed_pem(&pem)
            .with_context(|| format!("{} is not an Ed25519 PEM key", path.display()))?;
        Ok(Minter { key })
    }

    /// A token for one person of one session that starts now and lasts an hour.
    pub fn token(
        &self,
        session: &str,
        kind: &str,
        role: &str,
        subject: &str,
    ) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc();
        let ends = now + time::Duration::hours(1);
        let claims = json!({
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "sub": subject,
            "role": role,
            // Unique per token: Haven requires a token id (revocation is keyed by it).
            "jti": format!("load-{subject}-{}", now.unix_timestamp_nanos()),
            "iat": now.unix_timestamp(),
            "nbf": now.unix_timestamp() - 60,
            "exp": (ends + time::Duration::minutes(15)).unix_timestamp(),
            "session": {
                "id": session,
                "kind": kind,
                "starts_at": now.format(&Rfc3339)?,
                "ends_at": ends.format(&Rfc3339)?,
            },
        });
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &self.key,
        )?)
    }
}

/// A `haven serve` started for a run on ports the OS picked, with a data directory of its own.
/// Stopped (SIGKILL after SIGTERM) when dropped.
pub struct HavenProcess {
    child: Child,
    /// The signaling WebSocket URL.
    pub ws_url: String,
    pub data_dir: PathBuf,
    log: Arc<Mutex<VecDeque<String>>>,
    _tmp: tempfile::TempDir,
}

impl HavenProcess {
    pub fn start(bin: &Path) -> anyhow::Result<HavenProcess> {
        let tmp = tempfile::tempdir()?;
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--http",
                "127.0.0.1:0",
                "--media-port",
                "0",
                "--data-dir",
            ])
            .arg(tmp.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            // Every participant of the run connects from the tool's one address, far more
            // than the default per-address cap (64) lets in.
            .env(
                ENV_CONNECTIONS_PER_ADDRESS,
                std::env::var(ENV_CONNECTIONS_PER_ADDRESS)
                    .unwrap_or_else(|_| CONNECTIONS_PER_ADDRESS.to_string()),
            )
            // Groups as large as the media plane takes (the default group capacity is lower).
            .env(
                ENV_CAPACITY_GROUP,
                std::env::var(ENV_CAPACITY_GROUP).unwrap_or_else(|_| CAPACITY_GROUP.to_string()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;

        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (lines_tx, lines) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            collect(out, log.clone(), lines_tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(err, log.clone(), lines_tx);
        }

        let deadline = Instant::now() + STARTUP_WAIT;
        let http = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = lines.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                bail!("haven printed no start-up line in {STARTUP_WAIT:?}");
            };
            if let Some(rest) = line.split("http=").nth(1) {
                if let Some(addr) = rest.split_whitespace().next() {
                    break addr.to_owned();
                }
            }
        };
        Ok(HavenProcess {
            child,
            ws_url: format!("ws://{http}/ws"),
            data_dir: tmp.path().to_owned(),
            log,
            _tmp: tmp,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn key_path(&self) -> PathBuf {
        self.data_dir.join(DEV_KEY_FILE)
    }

    /// The server's last log lines.
    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .map(|l| Vec::from(l.clone()).join("\n"))
            .unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..30 {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HavenProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop();
        }
    }
}

fn collect(
    from: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<VecDeque<String>>>,
    lines: std::sync::mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            // Nobody listens once start-up is over; that is fine.
            let _ = lines.send(line.clone());
            let Ok(mut kept) = log.lock() else { return };
            if kept.len() >= LOG_LINES_KEPT {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    });
}

/// Finds the `haven` binary next to this program or a test of the workspace
/// (`target/<profile>/haven`).
pub fn sibling_haven_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("haven");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(anyhow!(
        "no haven binary next to {}: build it (cargo build) or pass its path",
        exe.display()
    ))
}
