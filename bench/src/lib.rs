//! Haven's load generator: R rooms of P participants that join like browsers, publish synthetic
//! VP8 and Opus, subscribe to everyone and measure what comes back.
//!
//! Map of the crate:
//!
//! - [`run`]: the orchestration: rooms, the measurement window, ramp mode ([`run::run`]).
//! - `participant`: one participant's task: its signaling socket, both peer connections and
//!   the media it sends; one select loop per participant.
//! - `haven` and `janus`: the two signaling dialects (Haven's protocol, Janus VideoRoom over
//!   its WebSocket transport), each a small state machine fed with the server's messages.
//! - `peer`: a str0m peer connection in RTP mode on its own UDP socket.
//! - `payload`: synthetic media: VP8 frames cut into packets (optionally three simulcast
//!   layers), Opus-sized audio, and the trailer every payload carries (publisher, kind,
//!   layer, sequence number, send time).
//! - `stats`: what each participant sent and received inside the window, percentiles, and
//!   CPU and memory from `/proc`.
//! - `report`: the run's figures, printed as a table and written as JSON.
//! - [`server`]: starting a `haven` process for a run, and minting tokens with its key.
//!
//! The client stack is str0m in RTP mode, sans-IO, driven by tokio tasks on as many threads as
//! asked (one by default), so the tool's CPU stays small next to the server's and is reported
//! beside it.
//!
//! Errors are `anyhow` throughout: this is a measuring tool, and every error ends a
//! participant or the run with a sentence saying what failed.

mod haven;
mod janus;
mod participant;
mod payload;
mod peer;
pub mod report;
pub mod run;
pub mod server;
mod stats;

pub use payload::{Kind, VideoShape};
pub use report::{FlowReport, RunReport};
pub use run::{run, LoadConfig, RampConfig, Target};
pub use server::HavenProcess;
