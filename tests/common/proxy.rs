//! A UDP impairment proxy on loopback, started by a test inside its own process.
//!
//! Clients send to the proxy instead of Haven's media port (their copy of Haven's SDP names
//! the proxy's port, see [`super::peer::Route::Proxy`]). For each client address the proxy
//! opens a socket of its own toward Haven, so Haven sees one address per client, as behind a
//! NAT, and relays both directions through an impaired link:
//!
//! - loss: each datagram is dropped with a fixed probability, drawn from a seeded generator,
//!   so a run with the same seed and the same packet order drops the same packets;
//! - a bandwidth cap: a token bucket (rate and burst) in front of a FIFO queue; a datagram
//!   that would wait longer than the queue limit (200 ms by default) is dropped, as by a
//!   home router's drop-tail queue;
//! - added delay, after the queue.
//!
//! Impairments are set per direction and may change while traffic flows. [`Proxy::rebind`]
//! gives every client a new socket toward Haven: Haven sees the client's packets come from a
//! new port and its own packets to the old port go nowhere, which is what a NAT rebinding or
//! a move to another network looks like from the server.
//!
//! Only loopback: the proxy binds `127.0.0.1:0` and relays to the one address it was given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What a datagram costs on the capped link besides its payload: IPv4 and UDP headers.
const IP_UDP_OVERHEAD: usize = 28;

/// Larger than any datagram WebRTC sends (they stay under the path MTU).
const MAX_DATAGRAM: usize = 65_536;

/// A direction through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the client to Haven.
    Up,
    /// From Haven to the client.
    Down,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
}

/// How one direction is impaired. The default passes everything at once.
#[derive(Clone, Debug)]
pub struct Impairment {
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss: f64,
    /// The link's rate in bits per second, IP and UDP headers included; `None` for no cap.
    pub rate_bps: Option<u64>,
    /// Bytes the link may send at once after being idle (the token bucket's depth).
    pub burst_bytes: usize,
    /// The longest a datagram may wait in the queue before the cap drops it.
    pub queue_limit: Duration,
    /// Added to every datagram's trip, after the queue.
    pub delay: Duration,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            loss: 0.0,
            rate_bps: None,
            burst_bytes: 10_000,
            queue_limit: Duration::from_millis(200),
            delay: Duration::ZERO,
        }
    }
}

impl Impairment {
    pub fn loss(fraction: f64) -> Impairment {
        Impairment {
            loss: fraction,
            ..Impairment::default()
        }
    }

    pub fn rate_kbps(kbps: u64) -> Impairment {
        Impairment {
            rate_bps: Some(kbps * 1000),
            ..Impairment::default()
        }
    }
}

/// What went through one direction, and what it dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams (and their payload bytes) sent on.
    pub passed: u64,
    pub passed_bytes: u64,
    /// Dropped by the random loss.
    pub lost: u64,
    /// Dropped because the cap's queue was full.
    pub overflowed: u64,
}

impl Counts {
    pub fn dropped(&self) -> u64 {
        self.lost + self.overflowed
    }

    /// The fraction of datagrams dropped, by either cause.
    pub fn drop_fraction(&self) -> f64 {
        let all = self.passed + self.dropped();
        if all == 0 {
            0.0
        } else {
            self.dropped() as f64 / all as f64
        }
    }
}

/// SplitMix64: a small seeded generator, enough for loss draws and the same on every machine.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Where a datagram leaves the proxy.
enum Exit {
    /// Toward Haven, from the client's socket (connected to Haven).
    Haven(Arc<UdpSocket>),
    /// Toward a client, from the proxy's listening socket.
    Client(Arc<UdpSocket>, SocketAddr),
}

struct Outgoing {
    at: Instant,
    exit: Exit,
    data: Vec<u8>,
}

/// One direction's impairment state.
struct Link {
    impairment: Impairment,
    rng: SplitMix64,
    /// When the bucket will have refilled from everything accepted so far (the theoretical
    /// arrival time of GCRA); a datagram may leave `burst` before it.
    full_at: Instant,
    counts: Counts,
    out: mpsc::UnboundedSender<Outgoing>,
}

impl Link {
    /// Decides a datagram's fate: `None` when dropped, or when it may leave.
    fn admit(&mut self, len: usize, now: Instant) -> Option<Instant> {
        let imp = &self.impairment;
        if imp.loss > 0.0 && self.rng.next_f64() < imp.loss {
            self.counts.lost += 1;
            return None;
        }
        let mut leave = now;
        if let Some(rate) = imp.rate_bps.filter(|r| *r > 0) {
            let seconds = |bytes: usize| Duration::from_secs_f64(bytes as f64 * 8.0 / rate as f64);
            let burst = seconds(imp.burst_bytes);
            let full_at = self.full_at.max(now);
            leave = full_at.checked_sub(burst).unwrap_or(now).max(now);
            if leave.duration_since(now) > imp.queue_limit {
                self.counts.overflowed += 1;
                return None;
            }
            self.full_at = full_at + seconds(len + IP_UDP_OVERHEAD);
        }
        self.counts.passed += 1;
        self.counts.passed_bytes += len as u64;
        Some(leave + imp.delay)
    }
}

/// A client's own path toward Haven.
struct Flow {
    upstream: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

struct Shared {
    haven: SocketAddr,
    listen: Arc<UdpSocket>,
    flows: Mutex<HashMap<SocketAddr, Flow>>,
    links: [Mutex<Link>; 2],
}

impl Shared {
    /// Impairs a datagram in `dir` and queues it for its exit.
    fn relay(&self, dir: Dir, exit: Exit, data: Vec<u8>) {
        let Ok(mut link) = self.links[dir.index()].lock() else {
            return;
        };
        if let Some(at) = link.admit(data.len(), Instant::now()) {
            // The sender task lives as long as the proxy; after that nothing is relayed.
            let _ = link.out.send(Outgoing { at, exit, data });
        }
    }
}

/// The proxy; it stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and relays to `haven` (which must be on loopback). `seed`
    /// makes the loss draws repeatable; each direction draws from its own sequence.
    pub async fn start(haven: SocketAddr, seed: u64) -> Proxy {
        assert!(
            haven.ip().is_loopback(),
            "the proxy relays to loopback only, not {haven}"
        );
        let listen = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the proxy on loopback"),
        );
        let addr = listen.local_addr().expect("a bound socket has an address");

        let mut tasks = Vec::new();
        let mut link = |salt: u64| {
            let (out, queue) = mpsc::unbounded_channel();
            tasks.push(tokio::spawn(send_in_order(queue)));
            Mutex::new(Link {
                impairment: Impairment::default(),
                rng: SplitMix64(seed ^ salt),
                full_at: Instant::now(),
                counts: Counts::default(),
                out,
            })
        };
        let links = [link(0x5550), link(0xD0D0)];
        let shared = Arc::new(Shared {
            haven,
            listen,
            flows: Mutex::new(HashMap::new()),
            links,
        });
        tasks.push(tokio::spawn(listen_to_clients(shared.clone())));
        Proxy {
            addr,
            shared,
            tasks,
        }
    }

    /// Where clients send instead of Haven.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the impairment of one direction; datagrams already queued keep their times.
    pub fn set(&self, dir: Dir, impairment: Impairment) {
        if let Ok(mut link) = self.shared.links[dir.index()].lock() {
            link.impairment = impairment;
        }
    }

    /// Sets both directions alike.
    pub fn set_both(&self, impairment: Impairment) {
        self.set(Dir::Up, impairment.clone());
        self.set(Dir::Down, impairment);
    }

    /// What has gone through `dir` so far.
    pub fn counts(&self, dir: Dir) -> Counts {
        self.shared.links[dir.index()]
            .lock()
            .map(|l| l.counts)
            .unwrap_or_default()
    }

    /// The addresses Haven sees, one per client so far.
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        let Ok(flows) = self.shared.flows.lock() else {
            return Vec::new();
        };
        flows
            .values()
            .filter_map(|f| f.upstream.local_addr().ok())
            .collect()
    }

    /// Gives every client a new socket (a new source port) toward Haven and closes the old
    /// one. Returns how many clients moved.
    pub fn rebind(&self) -> usize {
        let clients: Vec<SocketAddr> = match self.shared.flows.lock() {
            Ok(flows) => flows.keys().copied().collect(),
            Err(_) => return 0,
        };
        let mut moved = 0;
        for client in clients {
            let Ok(upstream) = bind_upstream(self.shared.haven) else {
                continue;
            };
            let reader = tokio::spawn(read_from_haven(
                self.shared.clone(),
                upstream.clone(),
                client,
            ));
            let Ok(mut flows) = self.shared.flows.lock() else {
                reader.abort();
                return moved;
            };
            if let Some(old) = flows.insert(client, Flow { upstream, reader }) {
                old.reader.abort();
                moved += 1;
            }
        }
        moved
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(flows) = self.shared.flows.lock() {
            for f in flows.values() {
                f.reader.abort();
            }
        }
    }
}

/// A new socket toward Haven, connected so that it only hears Haven.
fn bind_upstream(haven: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let std_socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    std_socket.connect(haven)?;
    std_socket.set_nonblocking(true)?;
    Ok(Arc::new(UdpSocket::from_std(std_socket)?))
}

/// Datagrams from clients: each new client address gets its own path toward Haven.
async fn listen_to_clients(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, client)) = shared.listen.recv_from(&mut buf).await else {
            // ICMP errors surface here on some systems; the socket itself is still good.
            continue;
        };
        let upstream = {
            let Ok(mut flows) = shared.flows.lock() else {
                return;
            };
            match flows.get(&client) {
                Some(f) => f.upstream.clone(),
                None => {
                    let Ok(upstream) = bind_upstream(shared.haven) else {
                        continue;
                    };
                    let reader =
                        tokio::spawn(read_from_haven(shared.clone(), upstream.clone(), client));
                    flows.insert(
                        client,
                        Flow {
                            upstream: upstream.clone(),
                            reader,
                        },
                    );
                    upstream
                }
            }
        };
        shared.relay(Dir::Up, Exit::Haven(upstream), buf[..n].to_vec());
    }
}

/// Datagrams from Haven to one client's socket, relayed to that client.
async fn read_from_haven(shared: Arc<Shared>, upstream: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match upstream.recv(&mut buf).await {
            Ok(n) => shared.relay(
                Dir::Down,
                Exit::Client(shared.listen.clone(), client),
                buf[..n].to_vec(),
            ),
            // A connected UDP socket reports an ICMP "port unreachable" as an error on the
            // next receive; Haven may simply not be listening yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Sends each queued datagram at its time, in the order queued (a link is FIFO).
async fn send_in_order(mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(o) = queue.recv().await {
        if o.at > Instant::now() {
            tokio::time::sleep_until(o.at.into()).await;
        }
        // A closed peer loses the datagram, as a network would; the proxy itself waits for
        // room in its socket buffer rather than drop what its impairment let through.
        let _ = match &o.exit {
            Exit::Haven(socket) => socket.send(&o.data).await,
            Exit::Client(socket, to) => socket.send_to(&o.data, *to).await,
        };
    }
}
