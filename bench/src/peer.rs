//! One client peer connection: a str0m `Rtc` in RTP mode and the UDP socket it owns.
//!
//! The task that owns a `Peer` reads its socket, hands each datagram in with
//! [`Peer::receive`] and calls [`Peer::timeout`] when [`Peer::next_timeout`] passes; sending
//! happens inside, without waiting. Each connection has its own socket, as a browser's has, so
//! the server sees one address per connection.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

/// The longest a connection goes without being polled; str0m asks sooner when it needs to.
const MAX_SLEEP: Duration = Duration::from_millis(200);

/// Larger than any datagram a WebRTC peer sends.
pub const MAX_DATAGRAM: usize = 2048;

/// Receive buffer asked for each socket (Linux caps it at `net.core.rmem_max`). A subscriber
/// in a group of ten takes some 2,000 packets a second, and every participant shares one
/// thread: with the default buffer (about 90 full-size datagrams) a busy moment of the tool
/// would drop packets the server forwarded in time, and count them against the server.
const SOCKET_RECEIVE_BUFFER: usize = 4 << 20;

pub struct Peer {
    pub rtc: Rtc,
    pub socket: UdpSocket,
    local: SocketAddr,
    next_timeout: Instant,
}

impl Peer {
    /// A connection on a fresh socket bound to `ip`, with its host candidate.
    pub async fn bind(ip: IpAddr, now: Instant) -> anyhow::Result<Peer> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .with_context(|| format!("cannot bind a UDP socket on {ip}"))?;
        let local = socket.local_addr()?;
        // A smaller buffer than asked for still works; kernel drops show in the report.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(SOCKET_RECEIVE_BUFFER);
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(now);
        let candidate = Candidate::host(local, "udp").context("host candidate")?;
        rtc.add_local_candidate(candidate);
        Ok(Peer {
            rtc,
            socket,
            local,
            next_timeout: now,
        })
    }

    pub fn next_timeout(&self) -> Instant {
        self.next_timeout
    }

    /// Hands one datagram in and drains the output at once: str0m in RTP mode holds one
    /// received packet until polled, so the next datagram must not come first.
    pub fn receive(
        &mut self,
        data: &[u8],
        source: SocketAddr,
        at: Instant,
        on_event: impl FnMut(&mut Rtc, Event),
    ) {
        if let Ok(receive) = Receive::new(Protocol::Udp, source, self.local, data) {
            // A datagram str0m refuses (a stray packet) is dropped, as a browser would.
            let _ = self.rtc.handle_input(Input::Receive(at, receive));
        }
        self.poll(at, on_event);
    }

    /// Advances time when the connection asked for it.
    pub fn timeout(&mut self, now: Instant, on_event: impl FnMut(&mut Rtc, Event)) {
        if self.next_timeout <= now {
            let _ = self.rtc.handle_input(Input::Timeout(now));
            self.poll(now, on_event);
        }
    }

    /// Sends what str0m has queued and passes its events on, until it asks for a timeout.
    pub fn poll(&mut self, now: Instant, mut on_event: impl FnMut(&mut Rtc, Event)) {
        // str0m always ends with a timeout; the bound guards against a library bug.
        for _ in 0..100_000 {
            match self.rtc.poll_output() {
                Ok(Output::Transmit(t)) => {
                    // Never wait on the socket: a full buffer loses the datagram as a network
                    // would, and the receiver counts it lost.
                    let _ = self.socket.try_send_to(&t.contents, t.destination);
                }
                Ok(Output::Timeout(t)) => {
                    self.next_timeout = t.min(now + MAX_SLEEP);
                    return;
                }
                Ok(Output::Event(e)) => on_event(&mut self.rtc, e),
                Err(_) => {
                    self.next_timeout = now + MAX_SLEEP;
                    return;
                }
            }
        }
        self.next_timeout = now;
    }
}
