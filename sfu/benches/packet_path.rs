//! Micro-benchmarks of Haven's packet path (issue 7):
//!
//! - `route_datagram`: what the socket task does for each datagram after `recv_from`, on a
//!   node with [`CONNECTIONS`] peer connections: find the connection by the sender's address
//!   (SRTP), or by the ufrag in a STUN request, and hand the datagram to its room's queue.
//! - `forward_to_one_subscriber`: what forwarding one RTP packet to one subscriber costs: the
//!   payload copied into a new `RtpWrite` with the subscriber's sequence number, `write_rtp`
//!   on the subscriber's connection, and `poll_output` until it has nothing more to send,
//!   which is where str0m writes the RTP header and SRTP encrypts. The subscriber's connection
//!   is a str0m `Rtc` configured like Haven's receiving connections, connected in memory to a
//!   str0m client (no sockets): ICE, DTLS and SRTP all ran for real.
//!
//! - `room_step`: a 16-person room on simulated time (`haven_sfu::sim`, the production room
//!   with its datagrams captured), everyone publishing VP8 and Opus without simulcast. One
//!   iteration is 20 ms of media: each publisher's audio packet and about two-thirds of a
//!   video frame reach the room and are forwarded to the 15 others. The clients' own str0m
//!   work (encrypting what they send, decrypting what they receive) is inside the
//!   measurement, so the figure is an upper bound on the room's share.
//!
//! Run with `cargo bench -p haven-sfu --bench packet_path`; figures go to `docs/benchmarks.md`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use haven_sfu::bench_api::{Datagram, Router};
use str0m::bwe::Bitrate;
use str0m::format::Codec;
use str0m::ice::{StunMessage, TransId};
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::sync::mpsc;

/// Peer connections registered on the benchmark's node: 64 participants, two each.
const CONNECTIONS: usize = 128;

/// A video packet's payload as browsers send it (the packet stays under 1,200 bytes).
const VIDEO_PAYLOAD: usize = 1_100;

/// Time between two packets of one 1.5 Mbit/s video stream of 1,100-byte packets.
const PACKET_INTERVAL: Duration = Duration::from_micros(5_900);

/// Haven's initial bandwidth estimate toward a subscriber when BWE is on.
const INITIAL_ESTIMATE_KBPS: u64 = 2_500;

/// The most simulated time the in-memory handshake may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

// ---- routing a datagram ---------------------------------------------------------------------

/// A STUN binding request as a browser sends it (the routing reads only the USERNAME).
fn stun_request(username: &str) -> Vec<u8> {
    let msg = StunMessage::binding_request(username, TransId::new(), true, 1, 100, false);
    let mut buf = vec![0u8; 512];
    let n = msg
        .to_bytes(Some(b"password"), &mut buf, |_, _| [0u8; 20])
        .expect("serialize STUN");
    buf.truncate(n);
    buf
}

/// An SRTP packet's first bytes (the routing reads only the first byte).
fn srtp_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x80;
    p[1] = 96;
    p
}

fn route_datagram(c: &mut Criterion) {
    let (tx, mut rx) = mpsc::channel::<Datagram>(1024);
    let mut router = Router::default();
    let mut peers = Vec::new();
    for i in 0..CONNECTIONS {
        let ufrag = format!("srv{i:05}");
        router.register(&ufrag, i as u64, tx.clone());
        let addr = SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16));
        let stun = stun_request(&format!("{ufrag}:cli{i:05}"));
        // The first request teaches the table the address; later SRTP routes by it.
        assert_eq!(router.route(addr, &stun), Some(i as u64));
        peers.push((addr, stun));
    }
    let srtp = srtp_packet(VIDEO_PAYLOAD + 40);
    assert_eq!(router.route(peers[7].0, &srtp), Some(7));

    let mut group = c.benchmark_group("route_datagram");
    group.throughput(Throughput::Elements(1));
    group.bench_function("srtp_by_address", |b| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % CONNECTIONS;
            black_box(router.route(peers[k].0, black_box(&srtp)))
        })
    });
    group.bench_function("stun_by_ufrag", |b| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % CONNECTIONS;
            let (addr, stun) = &peers[k];
            black_box(router.route(*addr, black_box(stun)))
        })
    });
    // Route, copy into a `Datagram`, `try_send` to the room's queue; the room's `recv` is
    // counted too, since every datagram pays it.
    group.bench_function("srtp_to_room_queue", |b| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % CONNECTIONS;
            let queued = router.dispatch(peers[k].0, black_box(&srtp));
            black_box((queued, rx.try_recv().is_ok()))
        })
    });
    group.finish();
}

// ---- forwarding one packet to one subscriber ------------------------------------------------

/// A datagram in flight between the two in-memory peers.
struct Wire {
    source: SocketAddr,
    destination: SocketAddr,
    contents: Vec<u8>,
}

/// Polls `rtc` until it asks for a timeout. Datagrams go to `out`, events to `events`.
fn drain(rtc: &mut Rtc, out: &mut Vec<Wire>, events: &mut Vec<Event>) -> Instant {
    loop {
        match rtc.poll_output().expect("poll_output") {
            Output::Transmit(t) => out.push(Wire {
                source: t.source,
                destination: t.destination,
                contents: t.contents.into(),
            }),
            Output::Event(e) => events.push(e),
            Output::Timeout(at) => return at,
        }
    }
}

/// Hands datagrams to `rtc`, polling after each (str0m in RTP mode keeps one packet).
fn deliver(
    rtc: &mut Rtc,
    wires: Vec<Wire>,
    now: Instant,
    out: &mut Vec<Wire>,
    events: &mut Vec<Event>,
) {
    for w in wires {
        let receive = Receive::new(Protocol::Udp, w.source, w.destination, &w.contents)
            .expect("a datagram str0m wrote");
        rtc.handle_input(Input::Receive(now, receive))
            .expect("the peer takes its datagram");
        drain(rtc, out, events);
    }
}

/// A subscriber's connection as Haven sets it up, connected in memory to a client, with one
/// video m-line that Haven sends on.
struct Subscription {
    server: Rtc,
    client: Rtc,
    now: Instant,
    server_timeout: Instant,
    client_timeout: Instant,
    mid: Mid,
    pt: Pt,
    /// Datagrams the server sent toward the client, not delivered yet.
    to_client: Vec<Wire>,
    /// RTP packets the client received.
    client_rtp: u64,
}

impl Subscription {
    fn connect(bwe: bool) -> Subscription {
        let start = Instant::now();
        let server_addr = SocketAddr::from(([127, 0, 0, 1], 7601));
        let client_addr = SocketAddr::from(([127, 0, 0, 1], 50_000));

        // Like `new_peer` in sfu/src/room.rs.
        let mut builder = Rtc::builder()
            .set_rtp_mode(true)
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true);
        if bwe {
            builder = builder.enable_bwe(Some(Bitrate::kbps(INITIAL_ESTIMATE_KBPS)));
        }
        let mut server = builder.build(start);
        server.add_local_candidate(Candidate::host(server_addr, "udp").expect("candidate"));

        let mut client = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(start);
        client.add_local_candidate(Candidate::host(client_addr, "udp").expect("candidate"));

        // The server offers, like `maybe_offer`: one send-only video m-line per track.
        let mut api = server.sdp_api();
        let mid = api.add_media(
            MediaKind::Video,
            Direction::SendOnly,
            Some("p-1".into()),
            Some("p-1-video-0".into()),
            None,
        );
        let (offer, pending) = api.apply().expect("an m-line to offer");
        let answer = client
            .sdp_api()
            .accept_offer(offer)
            .expect("client accepts");
        server
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("server accepts");
        let pt = server
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Vp8)
            .map(|p| p.pt())
            .expect("VP8 negotiated");

        let mut s = Subscription {
            server,
            client,
            now: start,
            server_timeout: start,
            client_timeout: start,
            mid,
            pt,
            to_client: Vec::new(),
            client_rtp: 0,
        };
        while !(s.server.is_connected()
            && s.client.is_connected()
            && s.server.direct_api().stream_tx_by_mid(mid, None).is_some())
        {
            assert!(
                s.now.duration_since(start) < CONNECT_LIMIT,
                "the in-memory peers did not connect"
            );
            s.now = s.server_timeout.min(s.client_timeout).clamp(
                s.now + Duration::from_millis(1),
                s.now + Duration::from_millis(50),
            );
            s.exchange();
        }
        s
    }

    /// Everything that is not the measured write: timers of both sides, and the datagrams
    /// between them (the client's receiver reports and the server's RTCP), until both are
    /// quiet. Keeps ICE, DTLS and bandwidth estimation alive however long the benchmark runs.
    fn exchange(&mut self) {
        let now = self.now;
        for _ in 0..100 {
            let mut to_server = Vec::new();
            let mut events = Vec::new();
            if self.client_timeout <= now {
                self.client
                    .handle_input(Input::Timeout(now))
                    .expect("client timeout");
            }
            self.client_timeout = drain(&mut self.client, &mut to_server, &mut events);
            let to_client = std::mem::take(&mut self.to_client);
            deliver(
                &mut self.client,
                to_client,
                now,
                &mut to_server,
                &mut events,
            );
            self.client_rtp += events
                .iter()
                .filter(|e| matches!(e, Event::RtpPacket(_)))
                .count() as u64;
            self.client_timeout = drain(&mut self.client, &mut to_server, &mut events);

            let mut ignored = Vec::new();
            if self.server_timeout <= now {
                self.server
                    .handle_input(Input::Timeout(now))
                    .expect("server timeout");
            }
            let quiet = to_server.is_empty();
            deliver(
                &mut self.server,
                to_server,
                now,
                &mut self.to_client,
                &mut ignored,
            );
            self.server_timeout = drain(&mut self.server, &mut self.to_client, &mut ignored);
            if quiet && self.to_client.is_empty() {
                return;
            }
        }
    }

    /// The measured step: forward one packet with outgoing sequence number `seq`.
    fn forward(&mut self, payload: &[u8], seq: u64, timestamp: u32) {
        let mut api = self.server.direct_api();
        let tx = api
            .stream_tx_by_mid(self.mid, None)
            .expect("the subscriber answered");
        let write = RtpWrite::new(self.pt, seq.into(), timestamp, self.now, payload.to_vec())
            .marker(true)
            .nackable(true);
        tx.write_rtp(write);
        let mut ignored = Vec::new();
        self.server_timeout = drain(&mut self.server, &mut self.to_client, &mut ignored);
    }
}

fn forward_to_one_subscriber(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_to_one_subscriber");
    group.throughput(Throughput::Elements(1));
    let payload: Vec<u8> = (0..VIDEO_PAYLOAD).map(|i| (i * 7) as u8).collect();
    for (name, bwe) in [("video_1100B", false), ("video_1100B_bwe", true)] {
        let mut sub = Subscription::connect(bwe);
        let mut seq = 1000u64;

        // The path works before it is timed: a forwarded packet reaches the client.
        let before = sub.client_rtp;
        for _ in 0..10 {
            sub.now += PACKET_INTERVAL;
            sub.forward(&payload, seq, (seq * 3000) as u32);
            seq += 1;
            sub.exchange();
        }
        assert!(
            sub.client_rtp >= before + 8,
            "forwarded packets reach the client ({} of 10)",
            sub.client_rtp - before
        );

        let (written, received) = (seq, sub.client_rtp);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    sub.now += PACKET_INTERVAL;
                    let t0 = Instant::now();
                    sub.forward(black_box(&payload), seq, (seq * 3000) as u32);
                    timed += t0.elapsed();
                    seq += 1;
                    sub.exchange();
                }
                timed
            })
        });
        // And it still worked at the end: what was timed went out and arrived.
        sub.now += Duration::from_secs(1);
        sub.exchange();
        let (written, received) = (seq - written, sub.client_rtp - received);
        assert!(
            received * 100 >= written * 99,
            "{name}: {received} of {written} forwarded packets reached the client"
        );
    }
    group.finish();
}

fn room_step(c: &mut Criterion) {
    use haven_sfu::sim::SimRoom;
    const PEOPLE: usize = 16;
    const STEP: Duration = Duration::from_millis(5);
    const ITERATION: Duration = Duration::from_millis(20);

    let mut sim = SimRoom::new(16);
    for i in 0..PEOPLE {
        sim.join(&format!("p-{i:02}"), false);
    }
    // Connections up, every subscription started at a keyframe.
    sim.run(Duration::from_secs(4), STEP);
    let before = sim.stats().packets_forwarded;
    sim.run(Duration::from_secs(1), STEP);
    let per_second = sim.stats().packets_forwarded - before;
    assert!(
        per_second > 30_000,
        "a room of 16 forwards every packet to 15 others: {per_second} a second"
    );
    let per_iteration = per_second * ITERATION.as_millis() as u64 / 1000;

    let mut group = c.benchmark_group("room_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(per_iteration));
    group.bench_function("16_people_20ms_of_media", |b| {
        b.iter(|| sim.run(black_box(ITERATION), STEP))
    });
    group.finish();
}

criterion_group!(
    benches,
    route_datagram,
    forward_to_one_subscriber,
    room_step
);
criterion_main!(benches);
