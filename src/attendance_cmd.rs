//! `haven attendance report | export | verify | amend`: the ledger from the command line.
//!
//! Every report and export is a read of treatment records, so it names its auditor
//! (`--auditor`, env `HAVEN_AUDITOR`) and is written to the audit log before it is printed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use attendance::{
    AgeGroup, Amendment, AttendanceRules, Correction, Event, EventKind, IsoWeek, Ledger, Location,
    Rounding, StaffId,
};
use clap::{Args, Subcommand, ValueEnum};
use figment::providers::Format as _;
use haven_ids::{ParticipantId, Role, SessionId};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config;

/// Env var naming the PostgreSQL ledger, instead of the SQLite file in the data dir.
pub const ENV_DATABASE_URL: &str = "HAVEN_DATABASE_URL";
/// Env var naming the auditor who reads.
pub const ENV_AUDITOR: &str = "HAVEN_AUDITOR";
/// Env var naming the TOML file with program rules.
pub const ENV_ATTENDANCE_RULES: &str = "HAVEN_ATTENDANCE_RULES";

#[derive(Subcommand)]
pub enum AttendanceCmd {
    /// A report: one session (--session), a client's weeks (--client --from --to) or a
    /// program's week (--program --week).
    Report {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        read: ReadArgs,
        #[arg(long, conflicts_with_all = ["client", "program"])]
        session: Option<String>,
        #[arg(long, requires_all = ["from", "to"], conflicts_with = "program")]
        client: Option<String>,
        /// First ISO week, e.g. 2026-W10.
        #[arg(long)]
        from: Option<String>,
        /// Last ISO week (inclusive).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, requires = "week")]
        program: Option<String>,
        /// ISO week of a program report.
        #[arg(long)]
        week: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Every entry with `at` in [--from, --to) (RFC 3339), as CSV or JSON.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        read: ReadArgs,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Check both hash chains (entries, audit log) and the lookup tables.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Record a correction; nothing stored is changed, reports apply it on top.
    Amend {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        session: String,
        #[arg(long)]
        participant: String,
        /// The participant's role; taken from the session when omitted.
        #[arg(long)]
        role: Option<String>,
        /// Staff id of the person making the amendment.
        #[arg(long)]
        author: String,
        #[arg(long)]
        reason: String,
        #[arg(long, value_enum)]
        correction: CorrectionKind,
        /// Start of the interval (add-presence, remove-presence), RFC 3339.
        #[arg(long, required_if_eq_any = [("correction", "add-presence"), ("correction", "remove-presence")])]
        from: Option<String>,
        /// End of the interval (add-presence, remove-presence), RFC 3339.
        #[arg(long, required_if_eq_any = [("correction", "add-presence"), ("correction", "remove-presence")])]
        to: Option<String>,
        /// The entry recorded in error (void-entry).
        #[arg(long, required_if_eq("correction", "void-entry"))]
        seq: Option<u64>,
        /// adult or adolescent (set-age-group).
        #[arg(long, required_if_eq("correction", "set-age-group"))]
        age_group: Option<String>,
    },
}

#[derive(Args)]
pub struct StoreArgs {
    #[arg(long, env = config::ENV_DATA_DIR, default_value = "haven-data")]
    data_dir: PathBuf,
    /// A PostgreSQL ledger (postgres://...) instead of the SQLite file in the data dir.
    #[arg(long, env = ENV_DATABASE_URL)]
    database_url: Option<String>,
}

#[derive(Args)]
pub struct ReadArgs {
    /// Staff id of the auditor reading; written to the audit log.
    #[arg(long, env = ENV_AUDITOR)]
    auditor: String,
    /// Program rules (TOML); the defaults are ASAM 2.1, 9 h adults, 6 h adolescents, UTC.
    #[arg(long, env = ENV_ATTENDANCE_RULES)]
    rules: Option<PathBuf>,
    /// Payer rounding of each session's credited minutes; overrides the rules file.
    #[arg(long, value_enum)]
    rounding: Option<RoundingArg>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoundingArg {
    None,
    FifteenMinuteUnits,
    MidpointBands,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CorrectionKind {
    AddPresence,
    RemovePresence,
    VoidEntry,
    SetAgeGroup,
}

pub fn run(cmd: AttendanceCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AttendanceCmd::Report {
            store,
            read,
            session,
            client,
            from,
            to,
            program,
            week,
            format,
        } => {
            let (mut ledger, rules, auditor) = open_for_read(&store, &read)?;
            let out = if let Some(session) = session {
                let session = SessionId::parse(&session)?;
                ledger.record_read(&auditor, &format!("session {session}"))?;
                let entries = ledger.session_events(&session)?;
                if entries.is_empty() {
                    bail!("the ledger has no events for session {session}");
                }
                let r = attendance::session_report(&entries, &rules.counting());
                match format {
                    Format::Table => r.to_table(),
                    Format::Csv => r.to_csv_with(rules.rounding),
                    Format::Json => pretty(&r.to_json_with(rules.rounding))?,
                }
            } else if let Some(client) = client {
                let client = ParticipantId::parse(&client)?;
                let (from, to) = (week_arg(from)?, week_arg(to)?);
                ledger.record_read(&auditor, &format!("client {client} weeks {from} to {to}"))?;
                let r = attendance::client_weeks(&mut ledger, &rules, &client, from, to)?;
                match format {
                    Format::Table => r.to_table(),
                    Format::Csv => r.to_csv(),
                    Format::Json => pretty(&r.to_json())?,
                }
            } else if let Some(program) = program {
                let week = week_arg(week)?;
                ledger.record_read(&auditor, &format!("program {program} week {week}"))?;
                let r = attendance::program_week(&mut ledger, &rules, &program, week)?;
                match format {
                    Format::Table => r.to_table(),
                    Format::Csv => r.to_csv(),
                    Format::Json => pretty(&r.to_json())?,
                }
            } else {
                bail!("say which report: --session, --client with --from and --to, or --program with --week");
            };
            emit(&out)
        }
        AttendanceCmd::Export {
            store,
            read,
            from,
            to,
            format,
        } => {
            let (mut ledger, _, auditor) = open_for_read(&store, &read)?;
            let (from, to) = (rfc3339(&from)?, rfc3339(&to)?);
            let what = format!(
                "export {} to {}",
                from.format(&Rfc3339)?,
                to.format(&Rfc3339)?
            );
            ledger.record_read(&auditor, &what)?;
            let entries = ledger.entries_where(&mut |e| e.event.at >= from && e.event.at < to)?;
            match format {
                Format::Csv => emit(&attendance::entries_csv(&entries)),
                Format::Json | Format::Table => emit(&pretty(&attendance::entries_json(&entries))?),
            }
        }
        AttendanceCmd::Verify { store } => {
            let mut ledger = open_existing(&store)?;
            let report = ledger.verify()?;
            if report.is_intact() {
                println!(
                    "ledger intact: {} and {}, hash chains verified; last hash {}",
                    count(report.entries, "entry", "entries"),
                    count(report.reads, "logged read", "logged reads"),
                    report.last_hash.as_deref().unwrap_or("-")
                );
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(bad) = report.first_bad {
                println!(
                    "ledger altered: entry {} does not fit the chain: {}",
                    bad.seq, bad.problem
                );
            }
            if let Some(bad) = report.first_bad_read {
                println!(
                    "audit log altered: read {} does not fit the chain: {}",
                    bad.seq, bad.problem
                );
            }
            if let Some(problem) = report.index_problem {
                println!("ledger lookup tables altered: {problem}");
            }
            Ok(ExitCode::from(1))
        }
        AttendanceCmd::Amend {
            store,
            session,
            participant,
            role,
            author,
            reason,
            correction,
            from,
            to,
            seq,
            age_group,
        } => {
            let mut ledger = open_existing(&store)?;
            let session = SessionId::parse(&session)?;
            let participant = ParticipantId::parse(&participant)?;
            let entries = ledger.session_events(&session)?;
            if entries.is_empty() {
                bail!("the ledger has no events for session {session}");
            }
            let role = match role {
                Some(r) => Role::parse(&r).context("--role: client, therapist or sponsor")?,
                None => entries
                    .iter()
                    .find(|e| e.event.participant_id.as_ref() == Some(&participant))
                    .and_then(|e| e.event.role)
                    .context("the participant is not in this session; give --role")?,
            };
            let interval = || -> anyhow::Result<(OffsetDateTime, OffsetDateTime)> {
                let from = from.as_deref().context("--from is required")?;
                let to = to.as_deref().context("--to is required")?;
                Ok((rfc3339(from)?, rfc3339(to)?))
            };
            let correction = match correction {
                CorrectionKind::AddPresence => {
                    let (from, to) = interval()?;
                    Correction::AddPresence { from, to }
                }
                CorrectionKind::RemovePresence => {
                    let (from, to) = interval()?;
                    Correction::RemovePresence { from, to }
                }
                CorrectionKind::VoidEntry => {
                    let seq = seq.context("--seq is required")?;
                    if !entries.iter().any(|e| e.seq == seq) {
                        bail!("entry {seq} is not an entry of session {session}");
                    }
                    Correction::VoidEntry { seq }
                }
                CorrectionKind::SetAgeGroup => {
                    let a = age_group.as_deref().unwrap_or_default();
                    let age_group =
                        AgeGroup::parse(a).context("--age-group: adult or adolescent")?;
                    Correction::SetAgeGroup { age_group }
                }
            };
            let amendment = Amendment {
                author: StaffId::parse(&author)?,
                reason,
                correction,
            };
            let event = Event::participant(
                session,
                participant,
                role,
                EventKind::Amended(amendment),
                OffsetDateTime::now_utc(),
            );
            let entry = ledger.append(event)?;
            println!("amendment recorded as entry {} ({})", entry.seq, entry.hash);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn open_existing(store: &StoreArgs) -> anyhow::Result<Ledger> {
    let location = Location::from_args(&store.data_dir, store.database_url.as_deref())?;
    if let Location::SqliteFile(path) = &location {
        if !path.exists() {
            bail!(
                "no ledger at {} (has haven serve run with this data dir?)",
                path.display()
            );
        }
    }
    Ok(Ledger::open_at(&location)?)
}

fn open_for_read(
    store: &StoreArgs,
    read: &ReadArgs,
) -> anyhow::Result<(Ledger, AttendanceRules, StaffId)> {
    let auditor = StaffId::parse(&read.auditor).context("--auditor")?;
    let mut rules = match &read.rules {
        Some(path) => load_rules(path)?,
        None => AttendanceRules::default(),
    };
    if let Some(r) = read.rounding {
        rules.rounding = match r {
            RoundingArg::None => Rounding::None,
            RoundingArg::FifteenMinuteUnits => Rounding::FifteenMinuteUnits,
            RoundingArg::MidpointBands => Rounding::MidpointBands,
        };
    }
    Ok((open_existing(store)?, rules, auditor))
}

/// Reads the `[attendance]` table of a TOML file (or the whole file if it has none) and
/// reports every bad setting at once.
pub fn load_rules(path: &Path) -> anyhow::Result<AttendanceRules> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read rules file {}", path.display()))?;
    let file = figment::Figment::from(figment::providers::Toml::string(&text));
    let file = if file.find_value("attendance").is_ok() {
        file.focus("attendance")
    } else {
        file
    };
    let rules: AttendanceRules = file
        .extract()
        .with_context(|| format!("bad attendance rules in {}", path.display()))?;
    if let Err(problems) = rules.validate() {
        bail!(
            "bad attendance rules in {}:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
    }
    Ok(rules)
}

fn week_arg(w: Option<String>) -> anyhow::Result<IsoWeek> {
    let w = w.context("an ISO week is required, e.g. 2026-W10")?;
    Ok(IsoWeek::parse(&w)?)
}

fn rfc3339(s: &str) -> anyhow::Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).with_context(|| format!("{s:?} is not an RFC 3339 time"))
}

/// Prints a report; a reader that stops early (`| head`) is not an error.
fn emit(out: &str) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn pretty(v: &serde_json::Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

/// `1 entry`, `2 entries`, `0 entries`.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_are_singular_for_one_only() {
        assert_eq!(count(0, "logged read", "logged reads"), "0 logged reads");
        assert_eq!(count(1, "logged read", "logged reads"), "1 logged read");
        assert_eq!(count(1, "entry", "entries"), "1 entry");
        assert_eq!(count(2, "entry", "entries"), "2 entries");
    }
}
