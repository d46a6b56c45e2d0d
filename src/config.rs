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
