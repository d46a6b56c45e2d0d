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
use crate::devkey;

/// Haven's own crates log lifecycle at info. The WebRTC libraries underneath log ICE
/// credentials and peer addresses at debug, so they stay at warn unless RUST_LOG says
/// otherwise (and such detail belongs at trace in Haven's terms).
const DEFAULT_LOG_FILTER: &str = "info,str0m=warn,dimpl=warn,is=warn";

/// How often the node proves it is alive in the ledger; a crash is credited no further.
const HEARTBEAT: Duration = Duration::from_secs(5);

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
    // One server per data directory: a second one would run crash recovery on the first
    // one's live stays. Held until the process exits.
    let _lock = lock_data_dir(&config.data_dir)?;

    // Development mode when no issuer keys are configured: the generated key is trusted.
    let dev_mode = config.issuers.is_empty();
    if config.dev_hs256_secret.is_some() {
        tracing::warn!(
            "dev_hs256_secret is set: HS256 tokens are accepted; never do this in production"
        );
    }
    let keys = trusted_keys(&config)?;
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

    // The ledger: SQLite in the data directory, or PostgreSQL with `database_url`.
    let location =
        attendance::Location::from_args(&config.data_dir, config.database_url.as_deref())?;
    let ledger =
        attendance::Ledger::open_at(&location).context("cannot open the attendance ledger")?;
    let ledger = attendance::LedgerHandle::spawn(ledger);

    // Before anything is recorded: stays a crash of this node left open are closed at its
    // last heartbeat, so no time is credited past the last proof of presence.
    let node = attendance::NodeId::parse(&config.node_id).context("invalid node_id")?;
    let recovered = ledger
        .recover(node.clone())
        .await
        .context("crash recovery of the ledger failed")?;
    if recovered.stays_closed > 0 {
        tracing::warn!(
            sessions = recovered.sessions,
            stays = recovered.stays_closed,
            "closed stays left open by an earlier crash, at its last heartbeat"
        );
    }
    let heartbeat_ledger = ledger.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            if let Err(e) = heartbeat_ledger.heartbeat(node.clone()).await {
                tracing::error!(code = e.code(), error = %e, "ledger heartbeat failed");
            }
        }
    });

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
        counting: config.attendance.counting(),
        turn: config.turn_policy(),
    };
    let deps = SessionDeps {
        sfu: sfu.clone(),
        ledger,
        revocations: Arc::new(revocations),
        policy,
        metrics: Arc::new(signaling::metrics::Metrics::default()),
    };
    let silence = Duration::from_secs(config.silence_timeout_seconds.into());
    let limits = signaling::Limits {
        max_message_bytes: config.max_message_bytes,
        messages_per_second: config.messages_per_second,
        message_burst: config.message_burst,
        connections_per_address: config.connections_per_address,
        pending_connections: config.pending_connections,
        silence_timeout: silence,
        // Ping a third of the way into the silence allowed, so two pings can go unanswered.
        ping_interval: silence / 3,
        ..signaling::Limits::default()
    };
    let http_settings = signaling::HttpSettings {
        limits,
        allowed_origins: config.allowed_origins.clone(),
        attendance_rules: config.attendance.clone(),
    };
    let state = ServerState::new(TokenVerifier::new(keys, rules), deps, http_settings);
    // Key rotation: JWKS and PEM files are read again every `keys_refresh_seconds`. A file
    // that cannot be read or parsed keeps the keys in use and is reported.
    if !dev_mode && config.keys_refresh_seconds > 0 {
        let refresh_state = Arc::clone(&state);
        let refresh_config = config.clone();
        let every = Duration::from_secs(config.keys_refresh_seconds.into());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                match trusted_keys(&refresh_config) {
                    Ok(keys) => refresh_state.tokens.replace_keys(keys),
                    Err(e) => {
                        tracing::warn!(error = %e, "issuer keys not refreshed; keeping the current ones")
                    }
                }
            }
        });
    }

    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen on {}", config.http))?;
    let http = listener.local_addr()?;
    let pid_file = PidFile::write(&config.data_dir)?;

    tracing::info!(
        %http,
        media = %sfu.local_addr(),
        data_dir = %config.data_dir.display(),
        mode,
        "haven listening; make a join link with `haven token --data-dir {} --session demo --role therapist --subject t-01 --link`",
        config.data_dir.display()
    );

    // The first SIGTERM (or Ctrl-C) drains: no new joins, sessions get `drain_seconds` to end,
    // then every remaining stay ends with `server_shutdown`, ledger first. A second signal
    // cuts the wait short; the ledger entries are still written.
    let (drained_tx, drained_rx) = tokio::sync::watch::channel(false);
    let drain_state = Arc::clone(&state);
    let drain_deadline = Duration::from_secs(config.drain_seconds.into());
    // Registered now, before any signal can arrive, so a second SIGTERM during the drain is
    // never missed.
    let mut signals = Signals::new()?;
    tokio::spawn(async move {
        signals.next().await;
        drain_state.drain(drain_deadline, signals.next()).await;
        let _ = drained_tx.send(true);
    });

    let app = signaling::app(Arc::clone(&state));
    let server = tokio::spawn(crate::http::serve(listener, app, drained_rx.clone()));
    let mut done = drained_rx;
    let _ = done.wait_for(|d| *d).await;
    // Open WebSockets were told `left` by now; give them a moment to close cleanly.
    let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    drop(pid_file);
    tracing::info!("haven stopped");
    Ok(())
}

/// Every key the server trusts under `config`: the configured issuers' keys, the development
/// key when no issuer is configured, and the development HS256 secret when set.
fn trusted_keys(config: &Config) -> anyhow::Result<Vec<TrustedKey>> {
    let mut keys = crate::keys::load(&config.issuers)?;
    if config.issuers.is_empty() {
        let dev = devkey::load_or_create(&config.data_dir)?;
        keys.push(TrustedKey {
            issuer: devkey::DEV_ISSUER.into(),
            algorithm: Algorithm::EdDSA,
            key: dev.decoding,
            kid: None,
        });
    }
    if let Some(secret) = &config.dev_hs256_secret {
        keys.push(TrustedKey {
            issuer: devkey::DEV_ISSUER.into(),
            algorithm: Algorithm::HS256,
            key: jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            kid: None,
        });
    }
    Ok(keys)
}

/// Takes the data directory's lock file, or says which server holds it.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("haven.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another haven is already running on {}; stop it first, or give this one its own --data-dir",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// `haven.pid` in the data directory, for `haven drain`; removed when the server stops.
struct PidFile(std::path::PathBuf);

impl PidFile {
    fn write(data_dir: &std::path::Path) -> anyhow::Result<PidFile> {
        let path = data_dir.join(crate::drain::PID_FILE);
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
/// SIGTERM and SIGINT (Ctrl-C), as one stream.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
