//! The routing table of the media socket.
//!
//! Every peer connection of the node shares one UDP port (and one TCP port for ICE-TCP), so
//! each datagram must be matched to its connection. The first packet from a browser is a STUN
//! binding request whose USERNAME is `<our ufrag>:<their ufrag>`; our ufrag is unique per
//! connection, so it names the connection. From then on the sender's path is enough: DTLS,
//! SRTP and later STUN packets from that UDP address, or on that TCP connection, go to the
//! same peer connection.

use std::collections::HashMap;
use std::net::SocketAddr;

use str0m::net::Protocol;
use tokio::sync::mpsc;

use crate::tcp::TcpWriter;

/// A peer connection on this node, unique for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PcId(pub u64);

/// How a datagram arrived, and so how an answer to its sender leaves.
#[derive(Clone, Debug)]
pub enum Path {
    Udp,
    /// One framed packet of an ICE-TCP connection; answers go back through its writer.
    Tcp(TcpWriter),
}

impl Path {
    pub fn protocol(&self) -> Protocol {
        match self {
            Path::Udp => Protocol::Udp,
            Path::Tcp(_) => Protocol::Tcp,
        }
    }
}

/// A datagram on its way to the room that owns its peer connection.
#[derive(Debug)]
pub struct Datagram {
    pub pc: PcId,
    pub source: SocketAddr,
    pub path: Path,
    pub at: std::time::Instant,
    pub data: Vec<u8>,
}

/// Changes to the routing table, sent by rooms to the socket task.
#[derive(Debug)]
pub enum DemuxControl {
    Register {
        ufrag: String,
        pc: PcId,
        room: mpsc::Sender<Datagram>,
    },
    Unregister {
        pc: PcId,
    },
    /// An ICE-TCP connection closed: its address no longer routes.
    TcpClosed {
        source: SocketAddr,
    },
}

/// A sender's path: UDP and TCP peers may use the same address and port.
type PathKey = (Protocol, SocketAddr);

/// Where a datagram goes.
#[derive(Default)]
pub struct RouteTable {
    by_ufrag: HashMap<String, Route>,
    by_addr: HashMap<PathKey, Route>,
}

#[derive(Clone)]
pub struct Route {
    pub pc: PcId,
    pub room: mpsc::Sender<Datagram>,
    ufrag: String,
}

impl RouteTable {
    pub fn apply(&mut self, control: DemuxControl) {
        match control {
            DemuxControl::Register { ufrag, pc, room } => {
                let route = Route {
                    pc,
                    room,
                    ufrag: ufrag.clone(),
                };
                self.by_ufrag.insert(ufrag, route);
            }
            DemuxControl::Unregister { pc } => {
                self.by_ufrag.retain(|_, r| r.pc != pc);
                self.by_addr.retain(|_, r| r.pc != pc);
            }
            DemuxControl::TcpClosed { source } => {
                self.by_addr.remove(&(Protocol::Tcp, source));
            }
        }
    }

    /// Finds the route for a datagram that came over `proto` from `source`. A STUN request
    /// with a known ufrag also teaches the table its path, which is how later non-STUN packets
    /// find their way.
    pub fn route(&mut self, proto: Protocol, source: SocketAddr, data: &[u8]) -> Option<&Route> {
        let key = (proto, source);
        if let Some(ufrag) = stun_local_ufrag(data) {
            if let Some(route) = self.by_ufrag.get(ufrag) {
                let known = self.by_addr.get(&key).map(|r| r.ufrag.as_str());
                if known != Some(ufrag) {
                    self.by_addr.insert(key, route.clone());
                }
            }
        }
        self.by_addr.get(&key)
    }

    #[cfg(test)]
    pub fn len(&self) -> (usize, usize) {
        (self.by_ufrag.len(), self.by_addr.len())
    }
}

/// The local (first) half of a STUN USERNAME, if `data` is a STUN message that has one.
fn stun_local_ufrag(data: &[u8]) -> Option<&str> {
    // RFC 7983: STUN messages start with a byte in 0..=3. Anything else (DTLS 20..=63,
    // RTP/RTCP 128..=191) is not STUN and skips the parse.
    if data.first().is_none_or(|b| *b > 3) {
        return None;
    }
    let msg = str0m::ice::StunMessage::parse(data).ok()?;
    let (local, _remote) = msg.split_username()?;
    // The parsed message borrows `data`, so the ufrag slice can be returned from it.
    let start = local.as_ptr() as usize - data.as_ptr() as usize;
    std::str::from_utf8(data.get(start..start + local.len())?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding request as a browser sends it: USERNAME, PRIORITY, ICE-CONTROLLING and
    /// MESSAGE-INTEGRITY (the routing never checks the integrity, so any key will do).
    fn stun_request(username: &str) -> Vec<u8> {
        use str0m::ice::{StunMessage, TransId};
        let msg = StunMessage::binding_request(username, TransId::new(), true, 1, 100, false);
        let mut buf = vec![0u8; 512];
        let n = msg
            .to_bytes(Some(b"password"), &mut buf, |_, _| [0u8; 20])
            .expect("serialize STUN");
        buf.truncate(n);
        buf
    }

    #[test]
    fn stun_username_routes_then_address_routes() {
        let (tx, _rx) = mpsc::channel(1);
        let mut table = RouteTable::default();
        table.apply(DemuxControl::Register {
            ufrag: "srvA".into(),
            pc: PcId(7),
            room: tx,
        });
        let peer: SocketAddr = "127.0.0.1:50000".parse().expect("literal address");

        // A DTLS packet before any STUN has nowhere to go.
        assert!(table.route(Protocol::Udp, peer, &[22, 254, 253]).is_none());

        let stun = stun_request("srvA:browserX");
        assert_eq!(
            table.route(Protocol::Udp, peer, &stun).map(|r| r.pc),
            Some(PcId(7))
        );
        assert_eq!(
            table
                .route(Protocol::Udp, peer, &[22, 254, 253])
                .map(|r| r.pc),
            Some(PcId(7))
        );
    }

    #[test]
    fn unknown_ufrag_and_unregistered_connections_are_not_routed() {
        let (tx, _rx) = mpsc::channel(1);
        let mut table = RouteTable::default();
        table.apply(DemuxControl::Register {
            ufrag: "srvA".into(),
            pc: PcId(1),
            room: tx,
        });
        let peer: SocketAddr = "127.0.0.1:50001".parse().expect("literal address");

        assert!(table
            .route(Protocol::Udp, peer, &stun_request("other:x"))
            .is_none());

        assert!(table
            .route(Protocol::Udp, peer, &stun_request("srvA:x"))
            .is_some());
        table.apply(DemuxControl::Unregister { pc: PcId(1) });
        assert!(table.route(Protocol::Udp, peer, &[128, 0, 0, 1]).is_none());
        assert_eq!(table.len(), (0, 0));
    }

    #[test]
    fn tcp_and_udp_paths_from_one_address_are_told_apart() {
        let (tx, _rx) = mpsc::channel(1);
        let mut table = RouteTable::default();
        table.apply(DemuxControl::Register {
            ufrag: "srvT".into(),
            pc: PcId(3),
            room: tx,
        });
        let peer: SocketAddr = "127.0.0.1:50002".parse().expect("literal address");

        assert!(table
            .route(Protocol::Tcp, peer, &stun_request("srvT:b"))
            .is_some());
        // The TCP connection learned its route; the same address over UDP did not.
        assert!(table.route(Protocol::Tcp, peer, &[22, 254]).is_some());
        assert!(table.route(Protocol::Udp, peer, &[22, 254]).is_none());

        table.apply(DemuxControl::TcpClosed { source: peer });
        assert!(table.route(Protocol::Tcp, peer, &[22, 254]).is_none());
        assert_eq!(table.len(), (1, 0));
    }
}
