//! `haven drain`: asks the server running on a data directory to drain, the same as sending
//! it SIGTERM. It finds the server by the `haven.pid` file the server writes at start.

use std::path::Path;

pub const PID_FILE: &str = "haven.pid";

pub fn run(data_dir: &Path) -> anyhow::Result<std::process::ExitCode> {
    let path = data_dir.join(PID_FILE);
    let pid = std::fs::read_to_string(&path).map_err(|_| {
        anyhow::anyhow!(
            "no server is running on {} (no {PID_FILE})",
            data_dir.display()
        )
    })?;
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{} is damaged", path.display()))?;
    // A server killed outright leaves its pid file behind, and the number may since belong to
    // another program: signal it only if it is a haven.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    if !String::from_utf8_lossy(program).ends_with("haven") {
        anyhow::bail!(
            "no haven is running on {} (stale {PID_FILE}, pid {pid})",
            data_dir.display()
        );
    }
    // The `kill` command rather than a signal crate: the binary forbids unsafe code, and this
    // runs once.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if !status.success() {
        anyhow::bail!("could not signal process {pid}");
    }
    println!("draining haven (pid {pid}); it exits once its sessions have ended or the drain deadline passes");
    Ok(std::process::ExitCode::SUCCESS)
}
