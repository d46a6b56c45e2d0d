//! The task that reads the media socket and hands datagrams to rooms.
//!
//! Frames from ICE-TCP connections (see `tcp`) arrive here too and go through the same
//! routing table, so one table knows every path to every peer connection.
//!
//! It never waits on a room: a room whose queue is full loses the datagram, as the network
//! would, and the other rooms on the node are not slowed down.

use std::sync::Arc;
use std::time::Instant;

use str0m::net::Protocol;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::demux::{Datagram, DemuxControl, Path, RouteTable};
use crate::tcp::TcpEvent;

/// Larger than any datagram a WebRTC peer sends (they stay under the path MTU).
const MAX_DATAGRAM: usize = 2048;

pub async fn run(
    socket: Arc<UdpSocket>,
    mut control: mpsc::UnboundedReceiver<DemuxControl>,
    mut tcp: mpsc::Receiver<TcpEvent>,
) {
    let mut table = RouteTable::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut dropped: u64 = 0;

    loop {
        tokio::select! {
            // Registration first: a room registers a connection before its SDP leaves the
            // server, so the control message is queued before the peer's first STUN request.
            biased;
            ctl = control.recv() => match ctl {
                Some(ctl) => table.apply(ctl),
                None => break,
            },
            res = socket.recv_from(&mut buf) => {
                let (n, source) = match res {
                    Ok(v) => v,
                    Err(e) => {
                        // ICMP errors from a vanished peer surface here on Linux; keep reading.
                        tracing::trace!(error = %e, "media socket receive error");
                        continue;
                    }
                };
                let data = &buf[..n];
                let Some(route) = table.route(Protocol::Udp, source, data) else {
                    tracing::trace!(len = n, "datagram for no known connection");
                    continue;
                };
                let dgram = Datagram {
                    pc: route.pc,
                    source,
                    path: Path::Udp,
                    at: Instant::now(),
                    data: data.to_vec(),
                };
                if route.room.try_send(dgram).is_err() {
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        tracing::debug!(dropped, "room queue full, datagrams dropped");
                    }
                }
            }
            Some(event) = tcp.recv() => match event {
                TcpEvent::Frame { source, writer, data } => {
                    let Some(route) = table.route(Protocol::Tcp, source, &data) else {
                        tracing::trace!(len = data.len(), "ice-tcp frame for no known connection");
                        continue;
                    };
                    writer.mark_routed();
                    let dgram = Datagram {
                        pc: route.pc,
                        source,
                        path: Path::Tcp(writer),
                        at: Instant::now(),
                        data,
                    };
                    if route.room.try_send(dgram).is_err() {
                        dropped += 1;
                        if dropped.is_power_of_two() {
                            tracing::debug!(dropped, "room queue full, datagrams dropped");
                        }
                    }
                }
                TcpEvent::Closed { source } => table.apply(DemuxControl::TcpClosed { source }),
            },
        }
    }
    tracing::debug!("media socket task stopped");
}
