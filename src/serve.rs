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

/// Haven's own crates log lifecycle at info.
const DEFAULT_LOG_LEVEL: &str = "info";

/// The WebRTC libraries underneath log ICE credentials, SDP and peer addresses at debug and
/// info. Such detail belongs at trace in Haven's terms, so they stay at warn whatever
/// RUST_LOG says, unless it names one of them at `trace` explicitly.
const WEBRTC_LIBRARIES: [&str; 5] = ["str0m", "str0m_proto", "str0m_aws_lc_rs", "dimpl", "is"];

/// The log filter for a RUST_LOG value (or none): its directives, with the WebRTC libraries
/// held at warn unless a directive names one of them at trace.
fn log_filter(rust_log: Option<&str>) -> String {
    let given = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let mut directives: Vec<String> = Vec::new();
    let mut traced: Vec<&str> = Vec::new();
    for d in given.unwrap_or(DEFAULT_LOG_LEVEL).split(',').map(str::trim) {
        if d.is_empty() {
            continue;
        }
        let (target, level) = d.split_once('=').unwrap_or((d, ""));
        let target = target.split(['[', '{']).next().unwrap_or(target).trim();
        // The crate itself or any of its modules (`is::agent`).
        let crate_name = target.split("::").next().unwrap_or(target);
        if let Some(lib) = WEBRTC_LIBRARIES.iter().find(|l| **l == crate_name) {
            if level.trim().eq_ignore_ascii_case("trace") {
                traced.push(lib);
                directives.push(d.to_owned());
            }
            continue;
        }
        directives.push(d.to_owned());
    }
    for lib in WEBRTC_LIBRARIES {
        if !traced.contains(&lib) {
            directives.push(format!("{lib}=warn"));
        }
    }
    directives.join(",")
}

/// How often the node proves it is alive in the ledger; a crash is credited no further.
const HEARTBEAT: Duration = attendance::HEARTBEAT_INTERVAL;

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
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(log_filter(rust_log.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new(log_filter(None)));
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
    // Opening may talk to PostgreSQL through its blocking client, which runs a runtime of its
    // own: off this runtime's worker threads.
    let ledger = tokio::task::spawn_blocking(move || attendance::Ledger::open_at(&location))
        .await
        .context("the ledger opening task failed")?
        .context("cannot open the attendance ledger")?;
    let ledger = attendance::LedgerHandle::spawn(ledger);

    // Before anything is recorded: stays a crash of this node left open are closed at its
    // last heartbeat, so no time is credited past the last proof of presence. Stays of other
    // nodes (another `node_id` of this server, or a node sharing the ledger that died) are
    // closed the same way by the heartbeats below, once that node has been silent for
    // `attendance::HEARTBEAT_STALE`.
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
            match heartbeat_ledger.heartbeat(node.clone()).await {
                Ok(recovered) => {
                    for (gone, r) in recovered {
                        tracing::warn!(
                            node = %gone,
                            sessions = r.sessions,
                            stays = r.stays_closed,
                            "closed stays of a node silent too long, at its last heartbeat"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(code = e.code(), error = %e, "ledger heartbeat failed");
                }
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

    if dev_mode {
        tracing::info!(
            %http,
            media = %sfu.local_addr(),
            data_dir = %config.data_dir.display(),
            mode,
            "haven listening; make a join link with `{}`",
            token_hint(&config, http)
        );
    } else {
        // Tokens come from the configured issuers; the development key's would be refused.
        tracing::info!(
            %http,
            media = %sfu.local_addr(),
            data_dir = %config.data_dir.display(),
            mode,
            "haven listening"
        );
    }

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

/// The command that mints a therapist's join link for this server, as the person who started
/// it can type it: `cargo run [--release] -- token ...` when Cargo started it (a checkout
/// without `haven` installed), `haven token ...` otherwise. The session id is the README's.
fn token_hint(config: &Config, http: std::net::SocketAddr) -> String {
    let run_by_cargo = std::env::var_os("CARGO").is_some();
    let release = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()
                .and_then(|dir| dir.file_name())
                .map(|d| d == "release")
        })
        .unwrap_or(false);
    let mut hint = match (run_by_cargo, release) {
        (true, true) => String::from("cargo run --release -- token"),
        (true, false) => String::from("cargo run -- token"),
        (false, _) => String::from("haven token"),
    };
    if config.data_dir != Config::default().data_dir {
        hint.push_str(&format!(" --data-dir {}", config.data_dir.display()));
    }
    hint.push_str(" --session demo-1 --role therapist --subject t-01 --link");
    // `token` builds links on the default address; say so when this server listens elsewhere.
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{http}"));
    if public_url != Config::default().public_url() {
        hint.push_str(&format!(" --public-url {public_url}"));
    }
    hint
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn webrtc_libraries_stay_at_warn_unless_traced_by_name() {
        assert_eq!(
            log_filter(None),
            "info,str0m=warn,str0m_proto=warn,str0m_aws_lc_rs=warn,dimpl=warn,is=warn"
        );
        // RUST_LOG=debug lowers Haven's level, not the libraries'.
        let debug = log_filter(Some("debug"));
        assert!(debug.starts_with("debug,"), "{debug}");
        assert!(
            debug.contains("str0m=warn") && debug.contains("is=warn"),
            "{debug}"
        );
        // Naming a library at debug or info does not let its addresses through either.
        let named = log_filter(Some("info,str0m=debug,is=info"));
        assert!(
            !named.contains("str0m=debug") && !named.contains("is=info"),
            "{named}"
        );
        assert!(
            named.contains("str0m=warn") && named.contains("is=warn"),
            "{named}"
        );
        // Nor does naming one of its modules.
        let module = log_filter(Some("info,is::agent=debug,str0m::ice=info"));
        assert!(
            !module.contains("is::agent") && !module.contains("str0m::ice"),
            "{module}"
        );
        assert!(
            module.contains("is=warn") && module.contains("str0m=warn"),
            "{module}"
        );
        // Only trace, asked for by name, opens one library.
        let traced = log_filter(Some("haven=debug,str0m=trace"));
        assert!(traced.contains("str0m=trace"), "{traced}");
        assert!(!traced.contains("str0m=warn"), "{traced}");
        assert!(traced.contains("dimpl=warn"), "{traced}");
        // An empty RUST_LOG is the default.
        assert_eq!(log_filter(Some(" ")), log_filter(None));
    }
}
