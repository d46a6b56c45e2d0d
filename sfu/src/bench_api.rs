//! What the criterion benchmarks in `sfu/benches/` need from private modules. Not part of the
//! crate's API: hidden from the documentation and free to change with the benchmarks.

use std::net::SocketAddr;

use str0m::net::Protocol;
use tokio::sync::mpsc;

use crate::demux::{DemuxControl, Path, PcId, RouteTable};

/// A datagram on its way to a room's queue.
pub use crate::demux::Datagram;

/// The media socket's routing table, as the socket task holds it.
#[derive(Default)]
pub struct Router {
    table: RouteTable,
}

impl Router {
    /// Registers a peer connection under its local ICE ufrag, as a room does in `new_peer`.
    pub fn register(&mut self, ufrag: &str, pc: u64, room: mpsc::Sender<Datagram>) {
        self.table.apply(DemuxControl::Register {
            ufrag: ufrag.to_owned(),
            pc: PcId(pc),
            room,
        });
    }

    /// Which peer connection a UDP datagram from `source` belongs to. A STUN request with a
    /// registered ufrag teaches the table the sender's address.
    pub fn route(&mut self, source: SocketAddr, data: &[u8]) -> Option<u64> {
        self.table
            .route(Protocol::Udp, source, data)
            .map(|route| route.pc.0)
    }

    /// Routes a UDP datagram and hands it to its room's queue, the work the socket task does
    /// for each datagram after `recv_from`: look up the route, copy the bytes into a
    /// [`Datagram`], `try_send` it. Returns whether the room's queue took it.
    pub fn dispatch(&mut self, source: SocketAddr, data: &[u8]) -> bool {
        let Some(route) = self.table.route(Protocol::Udp, source, data) else {
            return false;
        };
        let dgram = Datagram {
            pc: route.pc,
            source,
            path: Path::Udp,
            at: std::time::Instant::now(),
            data: data.to_vec(),
        };
        route.room.try_send(dgram).is_ok()
    }
}
