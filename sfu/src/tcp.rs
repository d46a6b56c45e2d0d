//! ICE-TCP: the TCP port beside the UDP port, for networks that block UDP.
//!
//! Haven offers one passive TCP candidate per peer connection (RFC 6544) on the same port
//! number as the UDP socket. The browser connects; every STUN, DTLS, RTP and RTCP packet on
//! the connection is framed with a two-byte big-endian length (RFC 4571). Each frame goes
//! through the same routing table as a UDP datagram (by ufrag, then by connection), so a
//! room sees a TCP frame as a datagram whose answers go back through the connection's
//! [`TcpWriter`].
//!
//! A connection costs two small tasks. It is closed when no packet on it reached a peer
//! connection for [`TCP_IDLE`] (a live peer sends a consent check every few seconds; empty
//! frames and packets for no known connection do not count), when its peer closes it, or when its writer falls [`TCP_WRITE_QUEUE`] frames
//! behind for good (the peer stopped reading). One address holds at most
//! [`MAX_TCP_PER_ADDRESS`] connections, so a single host cannot take the whole port from
//! everyone else's TCP-only participants.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::per_address::PerAddress;

/// Connections open at once on the node; further ones are refused until one closes. A room of
/// 16 needs 32 (two per participant).
pub const MAX_TCP_CONNECTIONS: usize = 2048;

/// Connections open at once from one IP address. A participant needs two; a clinic or a
/// household behind one NAT address has room for 32 participants.
pub const MAX_TCP_PER_ADDRESS: usize = 64;

/// A connection with no frame for this long is closed. Peers send ICE consent checks every
/// few seconds (RFC 7675), so only a dead or idle connection gets here.
pub const TCP_IDLE: Duration = Duration::from_secs(30);

/// Frames that may wait for a slow connection before new ones are dropped, as a full UDP
/// send buffer would drop them. Whole frames are dropped, so the framing stays intact.
pub const TCP_WRITE_QUEUE: usize = 512;

/// RFC 4571 frames hold at most 65535 bytes; the two-byte length cannot say more.
const MAX_FRAME: usize = u16::MAX as usize;

/// Writes frames to one ICE-TCP connection. Cloning it is cheap; sending never waits.
#[derive(Clone, Debug)]
pub struct TcpWriter {
    tx: mpsc::Sender<Vec<u8>>,
    /// Frames of this connection that reached a peer connection (counted by the socket task).
    routed: Arc<AtomicU64>,
}

impl TcpWriter {
    /// Notes that a frame from this connection reached a peer connection: what keeps the
    /// connection open (see [`TCP_IDLE`]).
    pub fn mark_routed(&self) {
        self.routed.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues one packet; returns false when the connection is gone (the caller forgets it).
    /// A full queue drops the packet and keeps the connection.
    pub fn send(&self, packet: &[u8]) -> bool {
        if packet.len() > MAX_FRAME {
            return true;
        }
        match self.tx.try_send(packet.to_vec()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// What a connection's reader tells the socket task.
#[derive(Debug)]
pub enum TcpEvent {
    Frame {
        source: SocketAddr,
        writer: TcpWriter,
        data: Vec<u8>,
    },
    Closed {
        source: SocketAddr,
    },
}

/// Splits an RFC 4571 byte stream into packets.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        let len = usize::from(u16::from_be_bytes([*self.buf.first()?, *self.buf.get(1)?]));
        if self.buf.len() < 2 + len {
            return None;
        }
        let frame = self.buf[2..2 + len].to_vec();
        self.buf.drain(..2 + len);
        Some(frame)
    }
}

/// Prefixes a packet with its RFC 4571 length.
pub fn frame(packet: &[u8]) -> Vec<u8> {
    // `TcpWriter::send` refuses longer packets, so the length fits in two bytes.
    let len = u16::try_from(packet.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + packet.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
    out
}

/// Accepts ICE-TCP connections until the event receiver (the socket task) is gone.
pub async fn accept(listener: TcpListener, events: mpsc::Sender<TcpEvent>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let per_address = PerAddress::new(MAX_TCP_PER_ADDRESS);
    loop {
        let (stream, source) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::debug!(error = %e, "ice-tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if events.is_closed() {
            break;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = MAX_TCP_CONNECTIONS,
                "ice-tcp connection refused, at limit"
            );
            continue;
        };
        let Some(address_slot) = per_address.take(source.ip()) else {
            tracing::debug!(
                limit = MAX_TCP_PER_ADDRESS,
                "ice-tcp connection refused, at the limit for its address"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let events = events.clone();
        tokio::spawn(async move {
            serve(stream, source, events).await;
            drop(address_slot);
            drop(slot);
        });
    }
}

/// Reads frames from one connection and hands them to the socket task; a second task writes.
async fn serve(stream: TcpStream, source: SocketAddr, events: mpsc::Sender<TcpEvent>) {
    let (mut read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_WRITE_QUEUE);
    let routed = Arc::new(AtomicU64::new(0));
    let writer = TcpWriter {
        tx,
        routed: routed.clone(),
    };

    let write_task = tokio::spawn(async move {
        while let Some(packet) = rx.recv().await {
            if write.write_all(&frame(&packet)).await.is_err() {
                break;
            }
        }
    });

    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 8192];
    // Only packets that reach a peer connection keep a connection open: bytes that never
    // make a packet, and packets for no known connection (junk, STUN with an unknown ufrag),
    // do not. Every TCP_IDLE the count of routed frames must have grown.
    let mut idle_until = tokio::time::Instant::now() + TCP_IDLE;
    let mut routed_before = 0;
    loop {
        let n = match tokio::time::timeout_at(idle_until, read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Err(_) => {
                let now_routed = routed.load(Ordering::Relaxed);
                if now_routed == routed_before {
                    break;
                }
                routed_before = now_routed;
                idle_until = tokio::time::Instant::now() + TCP_IDLE;
                continue;
            }
            Ok(Ok(n)) => n,
        };
        decoder.extend(&buf[..n]);
        while let Some(data) = decoder.next_frame() {
            if data.is_empty() {
                continue;
            }
            let event = TcpEvent::Frame {
                source,
                writer: writer.clone(),
                data,
            };
            // Waiting here only slows this connection's reads, which TCP turns into
            // back-pressure on its sender; other connections and UDP go on.
            if events.send(event).await.is_err() {
                write_task.abort();
                return;
            }
        }
    }

    write_task.abort();
    let _ = events.send(TcpEvent::Closed { source }).await;
    tracing::trace!("ice-tcp connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_and_joined_in_one_read_come_out_whole() {
        let a = frame(&[1, 2, 3]);
        let b = frame(&[]);
        let c = frame(&[9; 300]);
        let stream: Vec<u8> = [a, b, c].concat();

        let mut d = FrameDecoder::default();
        // One byte at a time: nothing comes out before a frame is whole.
        let mut out = Vec::new();
        for byte in &stream[..5] {
            d.extend(&[*byte]);
            out.extend(std::iter::from_fn(|| d.next_frame()));
        }
        assert_eq!(out, vec![vec![1, 2, 3]]);

        d.extend(&stream[5..]);
        out.extend(std::iter::from_fn(|| d.next_frame()));
        assert_eq!(out, vec![vec![1, 2, 3], vec![], vec![9; 300]]);
        assert!(d.next_frame().is_none());
    }

    /// Accepts on a loopback port; frames go to the returned receiver.
    async fn listening() -> (SocketAddr, mpsc::Receiver<TcpEvent>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept(listener, tx));
        (addr, rx)
    }

    /// Whether the server closed `stream` within a second (as opposed to keeping it open).
    async fn closed_by_server(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_connections() {
        let (addr, mut events) = listening().await;
        let mut held = Vec::new();
        for _ in 0..MAX_TCP_PER_ADDRESS {
            held.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // The next one from the same address is closed at once.
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        assert!(
            closed_by_server(&mut extra).await,
            "over the per-address limit"
        );
        // Those within the limit are served: a frame on the last one reaches the socket task.
        let last = held.last_mut().expect("connections");
        last.write_all(&frame(&[0, 1, 2])).await.expect("write");
        let got = tokio::time::timeout(Duration::from_secs(2), events.recv())
            .await
            .expect("a frame in time")
            .expect("an event");
        assert!(matches!(got, TcpEvent::Frame { ref data, .. } if data == &[0, 1, 2]));
        // Closing one frees its place for a new connection.
        drop(held.pop());
        let mut again = None;
        for _ in 0..50 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            if !closed_by_server(&mut s).await {
                again = Some(s);
                break;
            }
        }
        assert!(again.is_some(), "a place came free after a close");
    }

    #[tokio::test(start_paused = true)]
    async fn empty_frames_do_not_keep_a_connection_open() {
        let (addr, _events) = listening().await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // An empty frame every 10 s, three times as long as the idle limit.
        let mut closed = false;
        for _ in 0..(TCP_IDLE.as_secs() * 3 / 10) {
            if s.write_all(&frame(&[])).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        // Had the empty frames counted, the connection would stay open until 30 s after the
        // last of them, well past this short wait.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await;
        closed = closed || matches!(read, Ok(Ok(0)) | Ok(Err(_)));
        assert!(
            closed,
            "the server closed a connection that only sent empty frames"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_frames_that_reach_a_peer_keep_a_connection_open() {
        let (addr, mut events) = listening().await;
        // The socket task's part: frames starting with 1 reach a peer, others do not.
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let TcpEvent::Frame { writer, data, .. } = event {
                    if data.first() == Some(&1) {
                        writer.mark_routed();
                    }
                }
            }
        });
        let mut live = TcpStream::connect(addr).await.expect("connect");
        let mut junk = TcpStream::connect(addr).await.expect("connect");
        // A frame every 8 s on both, for three times the idle limit.
        for _ in 0..(TCP_IDLE.as_secs() * 3 / 8) {
            let _ = live.write_all(&frame(&[1, 0, 0, 0])).await;
            let _ = junk.write_all(&frame(&[7, 0, 0, 0])).await;
            tokio::time::sleep(Duration::from_secs(8)).await;
        }
        let mut byte = [0u8; 1];
        let junk_read = tokio::time::timeout(Duration::from_secs(1), junk.read(&mut byte)).await;
        assert!(
            matches!(junk_read, Ok(Ok(0)) | Ok(Err(_))),
            "a connection whose frames reach no peer was closed"
        );
        let live_read = tokio::time::timeout(Duration::from_secs(1), live.read(&mut byte)).await;
        assert!(
            live_read.is_err(),
            "a connection whose frames reach a peer stays open"
        );
    }

    #[test]
    fn the_length_prefix_is_big_endian() {
        assert_eq!(&frame(&[0; 258])[..2], &[1, 2]);
    }
}
