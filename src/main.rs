//! The `haven` binary: configuration, wiring and the command line.
//!
//! - `haven serve` (the default): the signaling server, the media plane and the ledger.
//! - `haven token`: mints a development join token or link.
//! - `haven attendance report | export | verify | amend`: the ledger (see `attendance_cmd`).

mod attendance_cmd;
mod config;
mod devkey;
mod drain;
mod http;
mod keys;
mod serve;
mod token;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "haven",
    version,
    about = "Video sessions for online intensive outpatient therapy",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no command, `haven` serves: the serve flags work here too (`haven --http ...`).
    #[command(flatten)]
    serve: serve::ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(serve::ServeArgs),
    /// Mint a join token signed with the development key.
    Token(token::TokenArgs),
    /// Read, export, verify and amend the attendance ledger.
    #[command(subcommand)]
    Attendance(attendance_cmd::AttendanceCmd),
    /// Drain the server running on a data directory: no new joins, sessions end by the
    /// configured deadline, then it exits (the same as sending it SIGTERM).
    Drain {
        #[arg(long, env = config::ENV_DATA_DIR, default_value = "haven-data")]
        data_dir: PathBuf,
    },
}

pub const LEDGER_FILE: &str = attendance::LEDGER_FILE;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(args) => serve::run(args),
        Command::Token(args) => token::run(args),
        Command::Drain { data_dir } => drain::run(&data_dir),
        Command::Attendance(cmd) => attendance_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("haven: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
