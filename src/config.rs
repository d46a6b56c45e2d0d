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
pub const ENV_DATABASE_URL: &str = "HAVEN_DATABASE_URL";
pub const ENV_NODE_ID: &str = "HAVEN_NODE_ID";
pub const ENV_MAX_MESSAGE_BYTES: &str = "HAVEN_MAX_MESSAGE_BYTES";
pub const ENV_MESSAGES_PER_SECOND: &str = "HAVEN_MESSAGES_PER_SECOND";
pub const ENV_MESSAGE_BURST: &str = "HAVEN_MESSAGE_BURST";
pub const ENV_CONNECTIONS_PER_ADDRESS: &str = "HAVEN_CONNECTIONS_PER_ADDRESS";
pub const ENV_PENDING_CONNECTIONS: &str = "HAVEN_PENDING_CONNECTIONS";
pub const ENV_SILENCE_TIMEOUT_SECONDS: &str = "HAVEN_SILENCE_TIMEOUT_SECONDS";

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
    /// Development only: also accept HS256 tokens from issuer `haven-dev` signed with this
    /// shared secret.
    pub dev_hs256_secret: Option<String>,
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
            (ENV_DATABASE_URL, "database_url"),
            (ENV_NODE_ID, "node_id"),
            (ENV_MAX_MESSAGE_BYTES, "max_message_bytes"),
            (ENV_MESSAGES_PER_SECOND, "messages_per_second"),
            (ENV_MESSAGE_BURST, "message_burst"),
            (ENV_CONNECTIONS_PER_ADDRESS, "connections_per_address"),
            (ENV_PENDING_CONNECTIONS, "pending_connections"),
            (ENV_SILENCE_TIMEOUT_SECONDS, "silence_timeout_seconds"),
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
    fn unknown_keys_in_the_file_are_rejected() {
        let dir = std::env::temp_dir().join(format!("haven-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("haven.toml");
        std::fs::write(&path, "media_port = 7700\nmedia_prot = 1\n").expect("write");
        let err = Config::load(Some(path), Overrides::default()).expect_err("unknown key");
        assert!(err.to_string().contains("media_prot"), "{err}");
    }
}
