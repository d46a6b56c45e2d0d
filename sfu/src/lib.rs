//! Haven's media plane: a selective forwarding unit on one UDP port (and the TCP port of the
//! same number for ICE-TCP).
//!
//! Map of the crate:
//!
//! - [`Sfu`] binds the node's media sockets and opens rooms ([`Sfu::open_room`]).
//! - `socket`: the one task that reads the UDP socket and routes each datagram to the room
//!   that owns its peer connection (`demux` holds the routing table).
//! - `tcp`: the ICE-TCP listener; its connections' frames go through the same routing.
//! - `room`: one task per room. It owns every peer connection of the room (str0m `Rtc`s in
//!   RTP mode) and forwards packets between them; nothing on the packet path takes a lock.
//! - `forward`: per subscriber and track, rewrites sequence numbers and waits for a keyframe.
//! - `keyframe`: keyframe detection and the per-track request throttle.
//! - `activity`: notices when a participant's media starts and stops flowing.
//!
//! The rest of Haven talks to a room through [`RoomHandle`] (commands with typed replies) and
//! hears from it through [`RoomEvent`]s. str0m stays an implementation detail of this crate.

mod activity;
#[doc(hidden)]
pub mod bench_api;
mod demux;
mod error;
mod forward;
mod keyframe;
mod layer;
mod pacer;
pub mod per_address;
mod red;
mod room;
#[doc(hidden)]
pub mod sim;
mod socket;
mod speaker;
mod tcp;
mod vp8;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use haven_ids::{ParticipantId, SessionId};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};

pub use error::SfuError;
pub use layer::{AudioOnlyReason, Layer};

/// How many commands may queue for one room before senders wait.
const ROOM_COMMAND_QUEUE: usize = 256;

/// How many events may queue from a room toward signaling. A room never waits on this queue
/// for media; see [`RoomEvent`].
const ROOM_EVENT_QUEUE: usize = 1024;

/// ICE-TCP frames that may wait for the socket task before their connections' reads pause.
const TCP_FRAME_QUEUE: usize = 1024;

/// With port 0, how many UDP ports to try before giving up on finding one whose TCP twin is
/// free too.
const PORT_PAIR_ATTEMPTS: usize = 16;

/// Settings for the media plane.
#[derive(Clone, Debug)]
pub struct SfuConfig {
    /// Where the media sockets bind, for example `127.0.0.1:7601`: UDP, and TCP on the same
    /// port number for ICE-TCP.
    pub bind: SocketAddr,
    /// The address put in ICE candidates; the bound address when `None`. Set it when the node
    /// is behind NAT and peers must reach it at another address.
    pub advertise_ip: Option<IpAddr>,
}

/// A running media plane: the UDP socket task and the rooms opened on it.
#[derive(Clone)]
pub struct Sfu {
    inner: Arc<SfuInner>,
}

struct SfuInner {
    socket: Arc<UdpSocket>,
    /// The candidate address peers are told to send media to.
    advertised: SocketAddr,
    /// Control channel of the socket task: rooms register and drop their peer connections.
    demux: mpsc::UnboundedSender<demux::DemuxControl>,
    next_pc: AtomicU64,
}

impl Sfu {
    /// Binds the media sockets (UDP, and TCP on the same port) and starts the tasks that
    /// read them.
    pub async fn start(config: SfuConfig) -> Result<Sfu, SfuError> {
        let (socket, listener) = bind_pair(config.bind).await?;
        let bound = socket.local_addr().map_err(SfuError::Bind)?;
        let advertised = SocketAddr::new(config.advertise_ip.unwrap_or(bound.ip()), bound.port());

        let socket = Arc::new(socket);
        let (demux_tx, demux_rx) = mpsc::unbounded_channel();
        let (tcp_tx, tcp_rx) = mpsc::channel(TCP_FRAME_QUEUE);
        tokio::spawn(socket::run(socket.clone(), demux_rx, tcp_rx));
        tokio::spawn(tcp::accept(listener, tcp_tx));

        tracing::debug!(%bound, "media socket bound");
        let inner = SfuInner {
            socket,
            advertised,
            demux: demux_tx,
            next_pc: AtomicU64::new(1),
        };
        Ok(Sfu {
            inner: Arc::new(inner),
        })
    }

    /// The local address of the media socket (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // The socket was bound in `start`; asking again cannot fail on Linux, but fall back to
        // the advertised address rather than panicking.
        self.inner
            .socket
            .local_addr()
            .unwrap_or(self.inner.advertised)
    }

    /// Opens a room. Events about the room arrive on the returned receiver; dropping every
    /// [`RoomHandle`] closes the room and its peer connections.
    pub fn open_room(&self, session: SessionId) -> (RoomHandle, mpsc::Receiver<RoomEvent>) {
        let (cmd_tx, cmd_rx) = mpsc::channel(ROOM_COMMAND_QUEUE);
        let (event_tx, event_rx) = mpsc::channel(ROOM_EVENT_QUEUE);
        let ctx = room::RoomContext {
            session: session.clone(),
            socket: self.inner.socket.clone(),
            advertised: self.inner.advertised,
            demux: self.inner.demux.clone(),
            next_pc: self.inner.clone(),
        };
        tokio::spawn(room::run(ctx, cmd_rx, event_tx));
        (
            RoomHandle {
                session,
                tx: cmd_tx,
            },
            event_rx,
        )
    }
}

/// Binds UDP and TCP on one port number. With port 0 the kernel picks the UDP port, and the
/// TCP port of that number may be taken: then another UDP port is tried.
///
/// The UDP socket takes every participant's media, so its kernel buffers are raised well
/// above the default (about 200 KiB, some 90 full-size datagrams on Linux): a room task that
/// is busy for a few milliseconds must not cost datagrams. Linux caps the request at
/// `net.core.rmem_max` / `net.core.wmem_max`; what it granted is logged at debug.
async fn bind_pair(bind: SocketAddr) -> Result<(UdpSocket, TcpListener), SfuError> {
    /// Requested receive and send buffer of the media socket. Linux doubles the value for
    /// its bookkeeping, and counts each datagram's whole allocation (about 2.3 KiB for a
    /// 1,200-byte packet), so 8 MiB holds a few thousand datagrams: a quarter of a second at
    /// 16,000 packets a second.
    const MEDIA_SOCKET_BUFFER: usize = 8 << 20;

    let attempts = if bind.port() == 0 {
        PORT_PAIR_ATTEMPTS
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(bind).await.map_err(SfuError::Bind)?;
        let port = udp.local_addr().map_err(SfuError::Bind)?.port();
        match TcpListener::bind(SocketAddr::new(bind.ip(), port)).await {
            Ok(tcp) => {
                // A smaller buffer than asked for still works; only the log says so.
                let sock = socket2::SockRef::from(&udp);
                let rcv = sock.set_recv_buffer_size(MEDIA_SOCKET_BUFFER);
                let snd = sock.set_send_buffer_size(MEDIA_SOCKET_BUFFER);
                tracing::debug!(
                    requested = MEDIA_SOCKET_BUFFER,
                    receive = ?rcv.and_then(|()| sock.recv_buffer_size()),
                    send = ?snd.and_then(|()| sock.send_buffer_size()),
                    "media socket buffers granted (bytes; Linux reports twice the usable size, \
                     capped by net.core.rmem_max and wmem_max)"
                );
                return Ok((udp, tcp));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(SfuError::Bind(last.unwrap_or_else(|| {
        std::io::Error::other("no port free for both UDP and TCP")
    })))
}

impl room::PcIds for SfuInner {
    fn next_pc_id(&self) -> demux::PcId {
        demux::PcId(self.next_pc.fetch_add(1, Ordering::Relaxed))
    }
}

/// Which of a participant's two peer connections a message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PcSide {
    /// What the participant sends; the browser offers.
    Publish,
    /// What the participant receives; the server offers.
    Subscribe,
}

/// Audio or video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrackKind {
    Audio,
    Video,
}

impl TrackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TrackKind::Audio => "audio",
            TrackKind::Video => "video",
        }
    }
}

/// One m-line of a subscriber's receiving connection and whose media it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackInfo {
    pub mid: String,
    pub participant: ParticipantId,
    pub kind: TrackKind,
    /// False once the publisher left; the m-line stays in the SDP, inactive.
    pub active: bool,
}

/// What a room tells the rest of Haven.
#[derive(Debug)]
pub enum RoomEvent {
    /// A new offer for a participant's receiving connection; signaling relays it and returns
    /// the answer with [`RoomHandle::subscribe_answer`].
    SubscribeOffer {
        participant: ParticipantId,
        negotiation: u64,
        sdp: String,
        tracks: Vec<TrackInfo>,
    },
    /// The participant's media started flowing, for the first time or again after a stop.
    MediaStarted {
        participant: ParticipantId,
        at: SystemTime,
    },
    /// The participant's media stopped. `last_packet_at` is when the last packet arrived,
    /// which is earlier than when the stop was noticed.
    MediaStopped {
        participant: ParticipantId,
        last_packet_at: SystemTime,
    },
    /// Video to the participant paused (`audio_only`) or resumed, for `reason`.
    ModalityChanged {
        participant: ParticipantId,
        audio_only: bool,
        reason: AudioOnlyReason,
        at: SystemTime,
    },
    /// Who speaks now; `None` when nobody has for a while.
    ActiveSpeaker { participant: Option<ParticipantId> },
    /// Connection figures of everyone in the room, every few seconds.
    Quality(Vec<ParticipantQuality>),
}

/// One participant's connection as the server sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParticipantQuality {
    pub participant: ParticipantId,
    /// What the participant sends to the server, in bits per second.
    pub bitrate_in_bps: Option<u64>,
    /// What the server sends to the participant.
    pub bitrate_out_bps: Option<u64>,
    /// Loss on the way in (the server's receive side) and out (as the participant reports).
    pub loss_in: Option<f32>,
    pub loss_out: Option<f32>,
    pub rtt: Option<Duration>,
    /// The bandwidth estimate toward the participant.
    pub estimate_bps: Option<u64>,
    /// The best layer the participant receives; `None` when receiving no video.
    pub layer: Option<Layer>,
    pub audio_only: Option<AudioOnlyReason>,
}

/// Commands to a room. Each reply arrives on its own oneshot channel.
#[derive(Debug)]
pub(crate) enum RoomCommand {
    AddParticipant {
        id: ParticipantId,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    PublishOffer {
        id: ParticipantId,
        sdp: String,
        reply: oneshot::Sender<Result<String, SfuError>>,
    },
    SubscribeAnswer {
        id: ParticipantId,
        negotiation: u64,
        sdp: String,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    RemoteCandidate {
        id: ParticipantId,
        side: PcSide,
        candidate: String,
    },
    RemoveParticipant {
        id: ParticipantId,
    },
    SetAudioMuted {
        id: ParticipantId,
        muted: bool,
    },
    SetVideoSize {
        id: ParticipantId,
        publisher: ParticipantId,
        width: u32,
        height: u32,
    },
    SetAudioOnly {
        id: ParticipantId,
        enabled: bool,
    },
    RestartIce {
        id: ParticipantId,
    },
    Stats {
        reply: oneshot::Sender<RoomStats>,
    },
}

/// Counters of one room, for tests, benchmarks and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomStats {
    pub participants: usize,
    pub packets_in: u64,
    pub packets_forwarded: u64,
    pub keyframe_requests_sent: u64,
    /// Times a subscriber moved from one simulcast layer to another.
    pub layer_switches: u64,
}

/// The way into one room's task.
#[derive(Clone, Debug)]
pub struct RoomHandle {
    session: SessionId,
    tx: mpsc::Sender<RoomCommand>,
}

impl RoomHandle {
    pub fn session(&self) -> &SessionId {
        &self.session
    }

    /// Adds a participant (once admitted) and gives them a receiving connection. Their first
    /// `SubscribeOffer` follows as soon as there is something to receive.
    pub async fn add_participant(&self, id: ParticipantId) -> Result<(), SfuError> {
        self.ask(|reply| RoomCommand::AddParticipant { id, reply })
            .await?
    }

    /// Applies the participant's offer for their publishing connection and returns the answer.
    pub async fn publish_offer(&self, id: ParticipantId, sdp: String) -> Result<String, SfuError> {
        self.ask(|reply| RoomCommand::PublishOffer { id, sdp, reply })
            .await?
    }

    /// Applies the participant's answer to the offer numbered `negotiation`.
    pub async fn subscribe_answer(
        &self,
        id: ParticipantId,
        negotiation: u64,
        sdp: String,
    ) -> Result<(), SfuError> {
        self.ask(|reply| RoomCommand::SubscribeAnswer {
            id,
            negotiation,
            sdp,
            reply,
        })
        .await?
    }

    /// Adds a trickled remote candidate. Haven is ICE-lite and learns addresses from the
    /// connectivity checks, so a candidate that cannot be parsed is ignored.
    pub async fn remote_candidate(&self, id: ParticipantId, side: PcSide, candidate: String) {
        let _ = self
            .tx
            .send(RoomCommand::RemoteCandidate {
                id,
                side,
                candidate,
            })
            .await;
    }

    /// Removes a participant: closes both connections and stops forwarding their tracks. If
    /// their media was flowing, a `MediaStopped` dated at their last packet follows.
    pub async fn remove_participant(&self, id: ParticipantId) {
        let _ = self.tx.send(RoomCommand::RemoveParticipant { id }).await;
    }

    /// Stops (or resumes) forwarding a participant's audio to everyone.
    pub async fn set_audio_muted(&self, id: ParticipantId, muted: bool) {
        let _ = self.tx.send(RoomCommand::SetAudioMuted { id, muted }).await;
    }

    /// Tells the room the size (in device pixels) at which participant `id` shows
    /// `publisher`'s video; `0 x 0` when not shown. The layer sent follows it.
    pub async fn set_video_size(
        &self,
        id: ParticipantId,
        publisher: ParticipantId,
        width: u32,
        height: u32,
    ) {
        let _ = self
            .tx
            .send(RoomCommand::SetVideoSize {
                id,
                publisher,
                width,
                height,
            })
            .await;
    }

    /// Stops (or resumes) sending video to a participant who asked for audio only.
    pub async fn set_audio_only(&self, id: ParticipantId, enabled: bool) {
        let _ = self
            .tx
            .send(RoomCommand::SetAudioOnly { id, enabled })
            .await;
    }

    /// Restarts ICE on the participant's receiving connection: a `SubscribeOffer` with new
    /// credentials follows (after any offer still waiting for its answer).
    pub async fn restart_ice(&self, id: ParticipantId) {
        let _ = self.tx.send(RoomCommand::RestartIce { id }).await;
    }

    pub async fn stats(&self) -> Result<RoomStats, SfuError> {
        self.ask(|reply| RoomCommand::Stats { reply }).await
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> RoomCommand,
    ) -> Result<T, SfuError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SfuError::RoomClosed)?;
        rx.await.map_err(|_| SfuError::RoomClosed)
    }
}
