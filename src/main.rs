//! The `haven` binary: configuration, wiring and the command line.
//!
//! - `haven serve` (the default): the signaling server, the media plane and the ledger.
//! - `haven token`: mints a development join token or link.
//! - `haven attendance report | verify`: reads the ledger.

mod config;
mod devkey;
mod keys;
mod serve;
mod token;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "haven",
    version,
    about = "Video sessions for online intensive outpatient therapy"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(serve::ServeArgs),
    /// Mint a join token signed with the development key.
    Token(token::TokenArgs),
    /// Read the attendance ledger.
    #[command(subcommand)]
    Attendance(AttendanceCmd),
}

#[derive(Subcommand)]
enum AttendanceCmd {
    /// Per participant of one session: role, joined and left, connected and credited minutes.
    Report {
        #[arg(long, env = config::ENV_DATA_DIR, default_value = "haven-data")]
        data_dir: PathBuf,
        #[arg(long)]
        session: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Minutes after the scheduled end that still count.
        #[arg(long, default_value_t = 15)]
        overrun_minutes: u32,
    },
    /// Check the hash chain of the whole ledger.
    Verify {
        #[arg(long, env = config::ENV_DATA_DIR, default_value = "haven-data")]
        data_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

pub const LEDGER_FILE: &str = "attendance.sqlite3";

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli
        .command
        .unwrap_or(Command::Serve(serve::ServeArgs::default()))
    {
        Command::Serve(args) => serve::run(args),
        Command::Token(args) => token::run(args),
        Command::Attendance(cmd) => attendance_cmd(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("haven: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn attendance_cmd(cmd: AttendanceCmd) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        AttendanceCmd::Report {
            data_dir,
            session,
            format,
            overrun_minutes,
        } => {
            let session = haven_ids::SessionId::parse(&session)?;
            let ledger = open_existing_ledger(&data_dir)?;
            let entries = ledger.session_events(&session)?;
            if entries.is_empty() {
                anyhow::bail!("the ledger has no events for session {session}");
            }
            let rules = attendance::CountingRules {
                overrun_allowance: time::Duration::minutes(overrun_minutes.into()),
            };
            let report = attendance::session_report(&entries, &rules);
            match format {
                Format::Table => print!("{}", report.to_table()),
                Format::Csv => print!("{}", report.to_csv()),
                Format::Json => println!("{}", serde_json::to_string_pretty(&report.to_json())?),
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        AttendanceCmd::Verify { data_dir } => {
            let ledger = open_existing_ledger(&data_dir)?;
            let report = ledger.verify()?;
            match report.first_bad {
                None => {
                    println!(
                        "ledger intact: {} entries, hash chain verified",
                        report.entries
                    );
                    Ok(std::process::ExitCode::SUCCESS)
                }
                Some(bad) => {
                    println!(
                        "ledger altered: entry {} does not fit the chain: {}",
                        bad.seq, bad.problem
                    );
                    Ok(std::process::ExitCode::from(1))
                }
            }
        }
    }
}

fn open_existing_ledger(data_dir: &std::path::Path) -> anyhow::Result<attendance::Ledger> {
    let path = data_dir.join(LEDGER_FILE);
    if !path.exists() {
        anyhow::bail!(
            "no ledger at {} (has haven serve run with this data dir?)",
            path.display()
        );
    }
    Ok(attendance::Ledger::open(&path)?)
}
