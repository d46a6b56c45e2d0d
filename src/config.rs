//! The one typed configuration of the `haven` binary.
//!
//! Layers, later ones winning: the embedded defaults below, a TOML file (`--config` or
//! `HAVEN_CONFIG`), environment variables (`HAVEN_*`, each named below), then command-line
//! flags. Unknown keys in the file are rejected, and every bad setting is reported together.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub const ENV_CONFIG: &str = "HAVEN_CONFIG";
pub const ENV_HTTP: &str = "HAVEN_HTTP";
pub const ENV_MEDIA_PORT: &str = "HAVEN_MEDIA_PORT";
pub const ENV_DATA_DIR: &str = "HAVEN_DATA_DIR";
pub const ENV_ADVERTISE_IP: &str = "HAVEN_ADVERTISE_IP";
pub const ENV_PUBLIC_URL: &str = "HAVEN_PUBLIC_URL";
pub const ENV_JOIN_OPENS_MINUTES: &str = "HAVEN_JOIN_OPENS_MINUTES";
pub const ENV_OVERRUN_MINUTES: &str = "HAVEN_OVERRUN_MINUTES";
pub const ENV_CAPACITY_INDIVIDUAL: &str = "HAVEN_CAPACITY_INDIVIDUAL";
pub const ENV_CAPACITY_GROUP: &str = "HAVEN_CAPACITY_GROUP";
pub const ENV_CAPACITY_FAMILY: &str = "HAVEN_CAPACITY_FAMILY";
pub const ENV_RESUME_GRACE_SECONDS: &str = "HAVEN_RESUME_GRACE_SECONDS";
pub const ENV_DRAIN_SECONDS: &str = "HAVEN_DRAIN_SECONDS";
pub const ENV_KEYS_REFRESH_SECONDS: &str = "HAVEN_KEYS_REFRESH_SECONDS";
pub const ENV_DATABASE_URL: &str = "HAVEN_DATABASE_URL";
pub const ENV_NODE_ID: &str = "HAVEN_NODE_ID";
pub const ENV_MAX_MESSAGE_BYTES: &str = "HAVEN_MAX_MESSAGE_BYTES";
pub const ENV_MESSAGES_PER_SECOND: &str = "HAVEN_MESSAGES_PER_SECOND";
pub const ENV_MESSAGE_BURST: &str = "HAVEN_MESSAGE_BURST";
pub const ENV_CONNECTIONS_PER_ADDRESS: &str = "HAVEN_CONNECTIONS_PER_ADDRESS";
pub const ENV_PENDING_CONNECTIONS: &str = "HAVEN_PENDING_CONNECTIONS";
pub const ENV_SILENCE_TIMEOUT_SECONDS: &str = "HAVEN_SILENCE_TIMEOUT_SECONDS";
pub const ENV_TURN_CREDENTIAL_TTL_SECONDS: &str = "HAVEN_TURN_CREDENTIAL_TTL_SECONDS";

/// The shortest and longest lifetime of a TURN credential: long enough to set up a call,
/// short enough that a leaked one soon stops working.
const TURN_TTL_RANGE: std::ops::RangeInclusive<u32> = 600..=7 * 24 * 3600;

/// The shortest TURN secret accepted: a short one can be guessed from a credential.
const TURN_SECRET_MIN_BYTES: usize = 16;

/// A TURN server Haven hands credentials for: one `[[turn_servers]]` table.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TurnServerConfig {
    /// `turn:` and `turns:` URLs of the server, as the browser is given them, for example
    /// `turn:turn.example.org:3478?transport=udp` and `turns:turn.example.org:443?transport=tcp`.
    pub urls: Vec<String>,
    /// The server's `static-auth-secret` (coturn's `use-auth-secret` mode).
    pub secret: String,
}

// The secret never reaches a log line through `{:?}`.
impl std::fmt::Debug for TurnServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServerConfig")
            .field("urls", &self.urls)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Every setting, with its default in [`Config::default`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where HTTP and the WebSocket listen.
    pub http: SocketAddr,
    /// The UDP port for media, on the same IP as `http`.
    pub media_port: u16,
    /// Ledger, development key and other state.
    pub data_dir: PathBuf,
    /// The IP put in ICE candidates, when peers must reach the node at another address.
    pub advertise_ip: Option<IpAddr>,
    /// The address people open join links at; derived from `http` when not set.
    pub public_url: Option<String>,
    /// How many minutes before the scheduled start the waiting room opens.
    pub join_opens_minutes: u32,
    /// How many minutes after the scheduled end people may still join and time still counts.
    pub overrun_minutes: u32,
    /// Most people (therapists included) in a one-on-one session.
    pub capacity_individual: usize,
    /// Most people in a group session (at most 16).
    pub capacity_group: usize,
    /// Most people in a family session.
    pub capacity_family: usize,
    /// How long a stay survives a lost connection, waiting for the browser to resume.
    pub resume_grace_seconds: u32,
    /// Trusted issuers. When empty, Haven runs in development mode and trusts only the key it
    /// generated in the data directory.
    pub issuers: Vec<crate::keys::IssuerConfig>,
    /// Origins (`https://portal.example.org`) allowed to open the WebSocket besides Haven's
    /// own; for a web client served from another site.
    pub allowed_origins: Vec<String>,
    /// How long a drain (SIGTERM, `haven drain`) waits for sessions to end on their own.
    pub drain_seconds: u32,
    /// Largest signaling message in bytes; larger closes the socket with 1009.
    pub max_message_bytes: usize,
    /// Sustained signaling messages per second per connection.
    pub messages_per_second: u32,
    /// Messages a connection may send in a burst above the sustained rate.
    pub message_burst: u32,
    /// Open WebSockets per client address.
    pub connections_per_address: usize,
    /// WebSockets that have not joined yet, across the node.
    pub pending_connections: usize,
    /// Seconds without any sign of life after which a connection is closed.
    pub silence_timeout_seconds: u32,
    /// PostgreSQL for the ledger (`postgres://...`); SQLite in the data directory when unset.
    pub database_url: Option<String>,
    /// This node's name in the ledger's heartbeats (unique per node of a cluster).
    pub node_id: String,
    /// Counting and program rules for reports (the `[attendance]` table; see
    /// `docs/attendance.md`).
    pub attendance: attendance::AttendanceRules,
    /// How often issuer key files (JWKS, PEM) are read again, for key rotation; 0 never.
    pub keys_refresh_seconds: u32,
    /// Development only: also accept HS256 tokens from issuer `haven-dev` signed with this
    /// shared secret.
    pub dev_hs256_secret: Option<String>,
    /// TURN servers whose credentials each participant gets in `joined`; none by default.
    pub turn_servers: Vec<TurnServerConfig>,
    /// How long those credentials last: a whole session and its overrun, since an allocation
    /// cannot be refreshed once its credential has expired.
    pub turn_credential_ttl_seconds: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: SocketAddr::from(([127, 0, 0, 1], 7600)),
            media_port: 7601,
            data_dir: PathBuf::from("haven-data"),
            advertise_ip: None,
            public_url: None,
            join_opens_minutes: 15,
            overrun_minutes: 15,
            capacity_individual: 4,
            capacity_group: 15,
            capacity_family: 10,
            resume_grace_seconds: 60,
            issuers: Vec::new(),
            keys_refresh_seconds: 300,
            database_url: None,
            node_id: "haven-1".into(),
            attendance: attendance::AttendanceRules::default(),
            allowed_origins: Vec::new(),
            drain_seconds: 300,
            max_message_bytes: 64 * 1024,
            messages_per_second: 20,
            message_burst: 60,
            connections_per_address: 64,
            pending_connections: 1000,
            silence_timeout_seconds: 45,
            dev_hs256_secret: None,
            turn_servers: Vec::new(),
            turn_credential_ttl_seconds: 6 * 3600,
        }
    }
}

/// Settings given on the command line; `None` leaves the lower layers in place.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

impl Config {
    pub fn load(file: Option<PathBuf>, flags: Overrides) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let file = file.or_else(|| std::env::var_os(ENV_CONFIG).map(PathBuf::from));
        if let Some(path) = file {
            if !path.exists() {
                anyhow::bail!("configuration file {} does not exist", path.display());
            }
            fig = fig.merge(Toml::file(path));
        }
        let env_names = [
            (ENV_HTTP, "http"),
            (ENV_MEDIA_PORT, "media_port"),
            (ENV_DATA_DIR, "data_dir"),
            (ENV_ADVERTISE_IP, "advertise_ip"),
            (ENV_PUBLIC_URL, "public_url"),
            (ENV_JOIN_OPENS_MINUTES, "join_opens_minutes"),
            (ENV_OVERRUN_MINUTES, "overrun_minutes"),
            (ENV_CAPACITY_INDIVIDUAL, "capacity_individual"),
            (ENV_CAPACITY_GROUP, "capacity_group"),
            (ENV_CAPACITY_FAMILY, "capacity_family"),
            (ENV_RESUME_GRACE_SECONDS, "resume_grace_seconds"),
            (ENV_DRAIN_SECONDS, "drain_seconds"),
            (ENV_KEYS_REFRESH_SECONDS, "keys_refresh_seconds"),
            (ENV_DATABASE_URL, "database_url"),
            (ENV_NODE_ID, "node_id"),
            (ENV_MAX_MESSAGE_BYTES, "max_message_bytes"),
            (ENV_MESSAGES_PER_SECOND, "messages_per_second"),
            (ENV_MESSAGE_BURST, "message_burst"),
            (ENV_CONNECTIONS_PER_ADDRESS, "connections_per_address"),
            (ENV_PENDING_CONNECTIONS, "pending_connections"),
            (ENV_SILENCE_TIMEOUT_SECONDS, "silence_timeout_seconds"),
            (
                ENV_TURN_CREDENTIAL_TTL_SECONDS,
                "turn_credential_ttl_seconds",
            ),
        ];
        for (var, key) in env_names {
            fig = fig.merge(Env::raw().only(&[var]).map(move |_| key.into()));
        }
        fig = fig.merge(Serialized::defaults(flags));

        // figment collects every failing key into one error; show them all.
        let config = fig.extract::<Config>().map_err(|e| {
            let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            anyhow::anyhow!("invalid configuration:\n  {}", all.join("\n  "))
        })?;
        config.check()?;
        Ok(config)
    }

    /// Settings that parse but make no sense, all reported together.
    fn check(&self) -> anyhow::Result<()> {
        let mut bad = Vec::new();
        for (name, v) in [
            ("capacity_individual", self.capacity_individual),
            ("capacity_group", self.capacity_group),
            ("capacity_family", self.capacity_family),
        ] {
            if !(2..=16).contains(&v) {
                bad.push(format!("{name} = {v}: must be between 2 and 16"));
            }
        }
        if !(1024..=1024 * 1024).contains(&self.max_message_bytes) {
            bad.push(format!(
                "max_message_bytes = {}: between 1024 and 1048576",
                self.max_message_bytes
            ));
        }
        if self.messages_per_second == 0 || self.message_burst == 0 {
            bad.push("messages_per_second and message_burst must be at least 1".into());
        }
        if self.connections_per_address == 0 || self.pending_connections == 0 {
            bad.push("connections_per_address and pending_connections must be at least 1".into());
        }
        if !(5..=600).contains(&self.silence_timeout_seconds) {
            bad.push(format!(
                "silence_timeout_seconds = {}: between 5 and 600",
                self.silence_timeout_seconds
            ));
        }
        if let Err(problems) = self.attendance.validate() {
            bad.extend(problems.into_iter().map(|p| format!("attendance: {p}")));
        }
        if !TURN_TTL_RANGE.contains(&self.turn_credential_ttl_seconds) {
            bad.push(format!(
                "turn_credential_ttl_seconds = {}: between {} and {}",
                self.turn_credential_ttl_seconds,
                TURN_TTL_RANGE.start(),
                TURN_TTL_RANGE.end()
            ));
        }
        for (i, server) in self.turn_servers.iter().enumerate() {
            if server.urls.is_empty() {
                bad.push(format!("turn_servers[{i}]: urls is empty"));
            }
            for url in &server.urls {
                if !(url.starts_with("turn:") || url.starts_with("turns:")) {
                    bad.push(format!(
                        "turn_servers[{i}]: {url:?} is not a turn: or turns: URL"
                    ));
                }
            }
            if server.secret.len() < TURN_SECRET_MIN_BYTES {
                bad.push(format!(
                    "turn_servers[{i}]: secret is shorter than {TURN_SECRET_MIN_BYTES} bytes"
                ));
            }
        }
        if self.resume_grace_seconds > 600 {
            bad.push(format!(
                "resume_grace_seconds = {}: at most 600",
                self.resume_grace_seconds
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid configuration:\n  {}", bad.join("\n  "))
        }
    }

    /// The TURN settings as the signaling server takes them.
    pub fn turn_policy(&self) -> signaling::TurnPolicy {
        signaling::TurnPolicy {
            servers: self
                .turn_servers
                .iter()
                .map(|s| signaling::TurnServer {
                    urls: s.urls.clone(),
                    secret: s.secret.clone(),
                })
                .collect(),
            credential_ttl: std::time::Duration::from_secs(self.turn_credential_ttl_seconds.into()),
        }
    }

    pub fn media_bind(&self) -> SocketAddr {
        SocketAddr::new(self.http.ip(), self.media_port)
    }

    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.http))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_defaults() {
        let flags = Overrides {
            media_port: Some(9000),
            ..Default::default()
        };
        let c = Config::load(None, flags).expect("valid");
        assert_eq!(c.media_port, 9000);
        assert_eq!(c.http, Config::default().http);
    }

    #[test]
    fn turn_servers_are_read_and_bad_ones_reported_together() {
        let dir = tempfile_dir("turn");
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "turn_credential_ttl_seconds = 3600\n\
             [[turn_servers]]\n\
             urls = [\"turn:127.0.0.1:3478?transport=udp\", \"turns:turn.example.org:443?transport=tcp\"]\n\
             secret = \"0123456789abcdef0123\"\n",
        )
        .expect("write");
        let c = Config::load(Some(good), Overrides::default()).expect("valid");
        let policy = c.turn_policy();
        assert_eq!(policy.servers.len(), 1);
        assert_eq!(policy.servers[0].urls.len(), 2);
        assert_eq!(policy.credential_ttl.as_secs(), 3600);
        assert!(!format!("{c:?}").contains("0123456789abcdef0123"));

        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            "turn_credential_ttl_seconds = 5\n\
             [[turn_servers]]\n\
             urls = [\"stun:127.0.0.1:3478\"]\n\
             secret = \"short\"\n",
        )
        .expect("write");
        let err = Config::load(Some(bad), Overrides::default())
            .expect_err("bad TURN settings")
            .to_string();
        for part in ["turn_credential_ttl_seconds", "stun:", "secret is shorter"] {
            assert!(err.contains(part), "{part} missing from: {err}");
        }
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("haven-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        let dir = std::env::temp_dir().join(format!("haven-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("haven.toml");
        std::fs::write(&path, "media_port = 7700\nmedia_prot = 1\n").expect("write");
        let err = Config::load(Some(path), Overrides::default()).expect_err("unknown key");
        assert!(err.to_string().contains("media_prot"), "{err}");
    }
}
