//! `haven serve`: wires the ledger, the media plane and the signaling server together.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use jsonwebtoken::Algorithm;
use signaling::revocation::RevocationList;
use signaling::{
    Capacity, ServerState, SessionDeps, SessionPolicy, TokenRules, TokenVerifier, TrustedKey,
};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, Overrides};
use crate::{devkey, LEDGER_FILE};

/// Haven's own crates log lifecycle at info. The WebRTC libraries underneath log ICE
/// credentials and peer addresses at debug, so they stay at warn unless RUST_LOG says
/// otherwise (and such detail belongs at trace in Haven's terms).
const DEFAULT_LOG_FILTER: &str = "info,str0m=warn,dimpl=warn,is=warn";

/// Tokens that may no longer join, one JSON object per line.
const REVOCATIONS_FILE: &str = "revocations.jsonl";

#[derive(Args, Default)]
pub struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP and WebSocket address (default 127.0.0.1:7600).
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// UDP port for media, on the HTTP address's IP (default 7601).
    #[arg(long)]
    media_port: Option<u16>,
    /// Data directory (default ./haven-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// IP to put in ICE candidates when peers reach this node at another address.
    #[arg(long)]
    advertise_ip: Option<IpAddr>,
    /// Base URL of join links.
    #[arg(long)]
    public_url: Option<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<std::process::ExitCode> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // The log goes to stderr, so that stdout stays free for what commands print; colours
    // only on a terminal (and never with NO_COLOR set).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();

    let flags = Overrides {
        http: args.http,
        media_port: args.media_port,
        data_dir: args.data_dir,
        advertise_ip: args.advertise_ip,
        public_url: args.public_url,
    };
    let config = Config::load(args.config, flags)?;

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(config))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;

    // Development mode when no issuer keys are configured: the generated key is trusted.
    let dev_mode = config.issuers.is_empty();
    let mut keys = crate::keys::load(&config.issuers)?;
    if dev_mode {
        let dev = devkey::load_or_create(&config.data_dir)?;
        keys.push(TrustedKey {
            issuer: devkey::DEV_ISSUER.into(),
            algorithm: Algorithm::EdDSA,
            key: dev.decoding,
            kid: None,
        });
    }
    if let Some(secret) = &config.dev_hs256_secret {
        tracing::warn!(
            "dev_hs256_secret is set: HS256 tokens are accepted; never do this in production"
        );
        keys.push(TrustedKey {
            issuer: devkey::DEV_ISSUER.into(),
            algorithm: Algorithm::HS256,
            key: jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            kid: None,
        });
    }
    let mode = if dev_mode {
        "development: trusting the generated key in dev-signing-key.pem"
    } else {
        "production: trusting the configured issuers only"
    };

    let rules = TokenRules {
        audience: devkey::DEV_AUDIENCE.into(),
        join_opens_before: Duration::from_secs(u64::from(config.join_opens_minutes) * 60),
        overrun: Duration::from_secs(u64::from(config.overrun_minutes) * 60),
        ..TokenRules::default()
    };

    let ledger_path = config.data_dir.join(LEDGER_FILE);
    let ledger = attendance::Ledger::open(&ledger_path)
        .with_context(|| format!("cannot open the ledger at {}", ledger_path.display()))?;
    let ledger = attendance::LedgerHandle::spawn(ledger);

    let sfu = sfu::Sfu::start(sfu::SfuConfig {
        bind: config.media_bind(),
        advertise_ip: config.advertise_ip,
    })
    .await
    .with_context(|| format!("cannot bind media UDP port {}", config.media_bind()))?;

    let revocations =
        RevocationList::open(&config.data_dir.join(REVOCATIONS_FILE)).with_context(|| {
            format!(
                "cannot open the revocation list in {}",
                config.data_dir.display()
            )
        })?;
    let policy = SessionPolicy {
        capacity: Capacity {
            individual: config.capacity_individual,
            group: config.capacity_group,
            family: config.capacity_family,
        },
        resume_grace: Duration::from_secs(config.resume_grace_seconds.into()),
    };
    let deps = SessionDeps {
        sfu: sfu.clone(),
        ledger,
        revocations: Arc::new(revocations),
        policy,
    };
    let state = ServerState::new(TokenVerifier::new(keys, rules), deps);
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen on {}", config.http))?;
    let http = listener.local_addr()?;

    tracing::info!(
        %http,
        media = %sfu.local_addr(),
        data_dir = %config.data_dir.display(),
        mode,
        "haven listening; make a join link with `haven token --data-dir {} --session demo --role therapist --subject t-01 --link`",
        config.data_dir.display()
    );

    axum::serve(listener, signaling::app(Arc::clone(&state)))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("haven stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
