//! `haven-load`: opens R rooms of P participants against Haven (or Janus VideoRoom), publishes
//! synthetic VP8 and Opus, receives everyone, and reports forwarding loss, delay, join time and
//! the server's CPU and memory. Run it where WebRTC traffic stays on the machine (inside
//! `unshare -n`, as `bench/compare` does).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use haven_bench::{HavenProcess, LoadConfig, RampConfig, Target, VideoShape};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TargetArg {
    Haven,
    Janus,
}

#[derive(Parser, Debug)]
#[command(
    name = "haven-load",
    about = "Load generator for Haven (and Janus VideoRoom)"
)]
struct Args {
    #[arg(long, value_enum, default_value = "haven")]
    target: TargetArg,
    /// Signaling URL: Haven `ws://127.0.0.1:7600/ws`, Janus `ws://127.0.0.1:8188`. Not
    /// needed with --spawn-haven. Every participant connects from one address: start the
    /// server with `HAVEN_CONNECTIONS_PER_ADDRESS` above the run's participant count.
    #[arg(long)]
    url: Option<String>,
    /// Haven's data directory; tokens are signed with its dev-signing-key.pem.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start this `haven` binary for the run (own data directory, ports the OS picks).
    #[arg(long)]
    spawn_haven: Option<PathBuf>,
    /// The server process to measure (CPU, memory) from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Participants per room, 2 to 16; the first of each room is the therapist.
    #[arg(long, default_value_t = 2)]
    participants: usize,
    /// Measurement window, seconds (per step in ramp mode).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds between everyone receiving everyone and the window's start (per step in ramp
    /// mode), so that joining is over before anything is measured.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// How long joining may take before the window starts anyway, seconds.
    #[arg(long, default_value_t = 30.0)]
    join_timeout: f64,
    /// Video bitrate; with --simulcast, the top layer's.
    #[arg(long, default_value_t = 1500)]
    video_kbps: u64,
    /// Publish video as three simulcast layers, rids q, h and f, at a tenth, a third and all
    /// of --video-kbps (150, 500 and 1,500 kbit/s at the default).
    #[arg(long)]
    simulcast: bool,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Seconds between unrequested keyframes.
    #[arg(long, default_value_t = 3.0)]
    keyframe_interval: f64,
    /// Opus payload bytes (50 packets a second).
    #[arg(long, default_value_t = 100)]
    audio_bytes: usize,
    /// Address the clients' sockets bind to (Janus needs 127.0.0.2, see bench/compare).
    #[arg(long, default_value = "127.0.0.1")]
    client_ip: IpAddr,
    /// Worker threads of the tool; 1 runs every participant on one thread.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Janus rooms' bitrate cap, bit/s (0: Janus's default).
    #[arg(long, default_value_t = 4_000_000)]
    janus_bitrate: u64,
    /// Janus room ids start here.
    #[arg(long, default_value_t = 5000)]
    first_room_id: u64,
    /// A name for the scenario, carried into the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Ramp mode: add --ramp-step rooms per step until loss or delay passes its limit. Works
    /// for any room size: `--participants 10 --ramp` adds one group of ten per step.
    #[arg(long)]
    ramp: bool,
    #[arg(long, default_value_t = 1)]
    ramp_step: usize,
    #[arg(long, default_value_t = 50)]
    ramp_max_rooms: usize,
    /// Ramp limit: loss as a fraction.
    #[arg(long, default_value_t = 0.01)]
    max_loss: f64,
    /// Ramp limit: delay p99 in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    max_p99_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut spawned = match &args.spawn_haven {
        Some(bin) => Some(HavenProcess::start(bin)?),
        None => None,
    };
    let target = match args.target {
        TargetArg::Haven => Target::Haven,
        TargetArg::Janus => Target::Janus,
    };
    let url = match (&spawned, &args.url) {
        (Some(h), _) => h.ws_url.clone(),
        (None, Some(u)) => u.clone(),
        (None, None) => anyhow::bail!("give --url or --spawn-haven"),
    };
    let key_file = match (&spawned, &args.data_dir) {
        (Some(h), _) => Some(h.key_path()),
        (None, Some(d)) => Some(d.join(haven_bench::server::DEV_KEY_FILE)),
        (None, None) => None,
    };
    let server_pid = args.server_pid.or(spawned.as_ref().map(|h| h.pid()));

    let cfg = LoadConfig {
        target,
        url,
        key_file,
        server_pid,
        rooms: args.rooms,
        participants: args.participants,
        duration: Duration::from_secs_f64(args.duration),
        settle: Duration::from_secs_f64(args.settle),
        join_timeout: Duration::from_secs_f64(args.join_timeout),
        video: VideoShape {
            bitrate_bps: args.video_kbps * 1000,
            fps: args.fps,
            keyframe_interval: Duration::from_secs_f64(args.keyframe_interval),
        },
        simulcast: args.simulcast,
        audio_bytes: args.audio_bytes,
        client_ip: args.client_ip,
        janus_bitrate: args.janus_bitrate,
        first_room_id: args.first_room_id,
        label: args.label.clone(),
        ramp: args.ramp.then_some(RampConfig {
            step_rooms: args.ramp_step,
            max_rooms: args.ramp_max_rooms,
            max_loss: args.max_loss,
            max_delay_p99_ms: args.max_p99_ms,
        }),
    };

    let report = haven_bench::run(cfg).await;
    if let Some(h) = spawned.as_mut() {
        if !h.is_running() {
            eprintln!(
                "haven exited during the run; its last lines:\n{}",
                h.log_text()
            );
        }
        h.stop();
    }
    let report = report?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
