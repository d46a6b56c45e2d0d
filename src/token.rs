//! `haven token`: mints a join token with the development key, standing in for the
//! scheduling system during development and tests.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use haven_ids::{ParticipantId, Role, SessionId, SessionKind};
use jsonwebtoken::{Algorithm, Header};
use signaling::token::{Admission, AgeGroup, SponsorPolicy};
use signaling::{JoinClaims, SessionClaim};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::config;
use crate::devkey;

#[derive(Args)]
pub struct TokenArgs {
    #[arg(long, env = config::ENV_DATA_DIR, default_value = "haven-data")]
    data_dir: PathBuf,
    /// The scheduled session's id.
    #[arg(long)]
    session: String,
    /// client, therapist, sponsor or auditor.
    #[arg(long)]
    role: String,
    /// The pseudonymous participant id.
    #[arg(long)]
    subject: String,
    /// Scheduled start, RFC 3339 (default: now).
    #[arg(long)]
    starts_at: Option<String>,
    /// Scheduled end, RFC 3339 (default: one hour after the start).
    #[arg(long)]
    ends_at: Option<String>,
    #[arg(long, default_value = "individual")]
    kind: String,
    #[arg(long)]
    program: Option<String>,
    /// A name shown on screens (never logged).
    #[arg(long)]
    display_name: Option<String>,
    /// adult or adolescent: which weekly requirement applies to a client.
    #[arg(long)]
    age_group: Option<String>,
    /// Admit people as soon as a therapist is present, without a click.
    #[arg(long)]
    auto_admit: bool,
    /// Allow a sponsor in this session, accompanying this client id (required for a sponsor).
    #[arg(long)]
    sponsor_for: Option<String>,
    /// How long the token stays valid after the scheduled end, in minutes.
    #[arg(long, default_value_t = 15)]
    valid_after_end_minutes: i64,
    /// Print the full join URL instead of the bare token.
    #[arg(long)]
    link: bool,
    /// Base URL for `--link` (default: the configuration's public URL, else http://127.0.0.1:7600).
    #[arg(long, env = config::ENV_PUBLIC_URL)]
    public_url: Option<String>,
}

pub fn run(args: TokenArgs) -> anyhow::Result<std::process::ExitCode> {
    let session = SessionId::parse(&args.session)?;
    let subject = ParticipantId::parse(&args.subject)?;
    let role = Role::parse(&args.role).with_context(|| {
        format!(
            "unknown role {:?}: use client, therapist, sponsor or auditor",
            args.role
        )
    })?;
    let kind = SessionKind::parse(&args.kind).with_context(|| {
        format!(
            "unknown kind {:?}: use individual, group or family",
            args.kind
        )
    })?;

    let age_group = match args.age_group.as_deref() {
        None => None,
        Some("adult") => Some(AgeGroup::Adult),
        Some("adolescent") => Some(AgeGroup::Adolescent),
        Some(other) => anyhow::bail!("unknown age group {other:?}: use adult or adolescent"),
    };

    let now = OffsetDateTime::now_utc();
    let starts_at = match &args.starts_at {
        Some(s) => OffsetDateTime::parse(s, &Rfc3339)
            .with_context(|| format!("--starts-at {s:?} is not RFC 3339"))?,
        // The current minute, so that links minted together for one session (a therapist's
        // and a client's) carry the same schedule.
        None => now
            .replace_second(0)
            .and_then(|t| t.replace_nanosecond(0))
            .unwrap_or(now),
    };
    let ends_at = match &args.ends_at {
        Some(s) => OffsetDateTime::parse(s, &Rfc3339)
            .with_context(|| format!("--ends-at {s:?} is not RFC 3339"))?,
        None => starts_at + Duration::hours(1),
    };
    if ends_at <= starts_at {
        anyhow::bail!("--ends-at must be after --starts-at");
    }

    let key_path = args.data_dir.join(devkey::DEV_KEY_FILE);
    if !key_path.exists() {
        anyhow::bail!(
            "no development key at {}: run `haven serve --data-dir {}` once first",
            key_path.display(),
            args.data_dir.display()
        );
    }
    let key = devkey::load(&key_path)?;

    let claims = JoinClaims {
        iss: devkey::DEV_ISSUER.into(),
        aud: devkey::DEV_AUDIENCE.into(),
        sub: subject.to_string(),
        role: role.as_str().into(),
        iat: Some(now.unix_timestamp()),
        nbf: now.unix_timestamp(),
        exp: (ends_at + Duration::minutes(args.valid_after_end_minutes)).unix_timestamp(),
        jti: token_id(),
        name: args.display_name,
        age_group,
        session: SessionClaim {
            id: session.to_string(),
            kind,
            starts_at,
            ends_at,
            program: args.program,
            admission: if args.auto_admit {
                Admission::Auto
            } else {
                Admission::Manual
            },
            sponsors: args.sponsor_for.map(|c| SponsorPolicy { for_client: c }),
        },
    };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key.encoding)?;

    if args.link {
        let base = args
            .public_url
            .unwrap_or_else(|| config::Config::default().public_url());
        println!("{}/join#token={token}", base.trim_end_matches('/'));
    } else {
        println!("{token}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// 128 random bits, hex: unique per token so that one token can be revoked alone.
fn token_id() -> String {
    let mut bytes = [0u8; 16];
    // The system's random source only fails on a broken machine; a time-based id is still
    // unique enough for a development token.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return format!("{:x}", OffsetDateTime::now_utc().unix_timestamp_nanos());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
