//! The media plane on impaired networks: real WebRTC clients (webrtc-rs) reach Haven through a
//! UDP impairment proxy on loopback that the test starts (`common::proxy`), and each test
//! asserts what the subscriber behind it receives.
//!
//! - `ten_percent_loss_*`: 10 % loss both ways on one subscriber's path. Its audio has no
//!   silence more than [`MAX_AUDIO_GAP_UNDER_LOSS`] longer than a clean-path subscriber's at
//!   the same moment, its video keeps flowing with most losses repaired from Haven's
//!   retransmission cache, and the subscriber on the clean path loses nothing.
//! - `address_change_*`: mid-session the proxy gives the client a new address toward Haven and
//!   the client restarts ICE on both connections; media resumes both ways within
//!   [`MAX_RESUME`], with the same participant and one attendance stay.
//! - `bandwidth_cap_*`: a simulcast publisher (rids q, h, f); a subscriber whose downlink is
//!   capped below the top layer ends up on a lower layer without stalling, while an uncapped
//!   one receives the top layer; when the cap lifts, the top layer comes back.
//!
//! Figures go to stderr as `figure: ...` lines. The proxy's own behaviour (loss, the cap's
//! queue, rebinding) is checked first, on plain UDP, by the `proxy_*` tests.
//!
//! The WebRTC tests must run in a private network namespace (see `common::require_netns`):
//! `unshare -n sh -c 'ip link set lo up; ip route add 224.0.0.0/4 dev lo;
//! HAVEN_IN_NETNS=1 cargo test --test impairment'`. They take turns, so that one test's
//! media does not load the machine under another's timing.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::UdpSocket;

use common::peer::{
    epoch, ms_since_epoch, Arrival, Camera, Kind, Layer, Live, Member, Route, SIMULCAST,
    SINGLE_LAYER,
};
use common::proxy::{Dir, Impairment, Proxy};
use common::Server;

/// The seed of every proxy's loss draws.
const SEED: u64 = 0x4856_3300;

/// The longest a subscriber behind 10 % loss may hear no audio beyond what the subscriber on
/// the clean path missed at the same time (see [`excess_silence`]). With independent loss, a
/// silence of 300 ms needs 14 lost packets in a row (probability 1e-14 per packet), so a gap
/// this long is not the loss: it is audio held up behind something else, such as video
/// retransmissions. Measured against the clean subscriber, a stall of the whole machine
/// (both subscribers, the publisher and Haven share two busy cores) does not count.
const MAX_AUDIO_GAP_UNDER_LOSS: Duration = Duration::from_millis(300);
/// Video on the lossy path may pause no longer than this: a frame is due every 33 ms, and a
/// whole lost frame is recovered by retransmission or replaced by the next keyframe (1 s).
const MAX_VIDEO_GAP_UNDER_LOSS: Duration = Duration::from_millis(1000);
/// On a clean loopback path packets come every 20 ms (audio) and 33 ms (video). Anything
/// longer is the machine: on the shared two-core test machine, with a load average near 8,
/// every process here was seen to stall for up to half a second at once. A paused video
/// (seconds) or a stopped stream still fails.
const MAX_GAP_CLEAN: Duration = Duration::from_millis(1000);
/// How long each test watches media flow once it is up.
const OBSERVE: Duration = Duration::from_secs(20);
/// Every wait for something to happen is bounded by this.
const DEADLINE: Duration = Duration::from_secs(30);
/// "Media resumes within a few seconds" after an address change, in each direction.
const MAX_RESUME: Duration = Duration::from_secs(5);
/// The capped subscriber's downlink: above the medium layer with audio (about 580 kbit/s with
/// headers), below the high layer alone (about 1590 kbit/s).
const CAP_KBPS: u64 = 700;
/// How long the SFU may take, from the first video, to put each subscriber on the layer its
/// link carries: its estimate starts low and climbs.
const CAP_CONVERGENCE: Duration = Duration::from_secs(6);
/// Audio to the capped subscriber may pause no longer than this beyond what the uncapped one
/// missed at the same time (see [`excess_silence`]), even while the SFU adapts: the cap's
/// queue drops audio along with the video that overfills it, but a layer that fits must
/// follow soon enough that no half second of speech is lost.
const MAX_AUDIO_GAP_UNDER_CAP: Duration = Duration::from_millis(500);

/// The tests take turns, so that one test's traffic does not disturb another's timing (each
/// test has its own runtime; this lock works across them).
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Haven's media address, from its start-up line (`media=127.0.0.1:PORT`), which reaches the
/// kept log a moment after `Server::start` has read it.
async fn media_addr(server: &Server) -> SocketAddr {
    let find = || {
        server
            .log_text()
            .split_whitespace()
            .find_map(|w| w.strip_prefix("media="))
            .and_then(|a| a.parse().ok())
    };
    until(Duration::from_secs(5), || find().is_some()).await;
    find().unwrap_or_else(|| {
        panic!(
            "no media address in the start-up line:\n{}",
            server.log_text()
        )
    })
}

// ---- what arrived -------------------------------------------------------------------------

/// The longest time without an arrival in `[from, to]`, counting both edges.
fn longest_gap(arrivals: &[Arrival], from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = arrivals
        .iter()
        .map(|a| a.at)
        .filter(|t| *t >= from && *t <= to)
        .collect();
    times.sort();
    let mut prev = from;
    let mut longest = Duration::ZERO;
    for t in times {
        longest = longest.max(t - prev);
        prev = t;
    }
    longest.max(to.saturating_duration_since(prev))
}

/// How much longer than the `control` subscriber the `subject` went without a packet: for
/// every silence of the subject longer than `threshold`, its length less the control's longest
/// silence within it; the worst of these, with that silence's length. The two subscribers
/// share the publisher, Haven, the test process and the machine; only the path differs, so
/// what the control missed too is not the path's doing.
fn excess_silence(
    subject: &[Arrival],
    control: &[Arrival],
    from: Instant,
    to: Instant,
    threshold: Duration,
) -> (Duration, Duration) {
    let mut times: Vec<Instant> = subject
        .iter()
        .map(|a| a.at)
        .filter(|t| *t >= from && *t <= to)
        .collect();
    times.sort();
    times.insert(0, from);
    times.push(to);
    let mut worst = (Duration::ZERO, Duration::ZERO);
    for w in times.windows(2) {
        let silence = w[1] - w[0];
        if silence <= threshold {
            continue;
        }
        let shared = longest_gap(control, w[0], w[1]);
        let excess = silence.saturating_sub(shared);
        if excess > worst.0 {
            worst = (excess, silence);
        }
    }
    worst
}

/// Delivery of one flow over the packets sent in `[from, to]`: distinct packets that arrived,
/// packets sent (from the first to the last counter seen, each frame `parts` packets), and
/// arrivals that came late enough to be retransmissions.
#[derive(Debug, Default, Clone, Copy)]
struct Delivery {
    distinct: u64,
    expected: u64,
    duplicates: u64,
    /// Arrived more than [`LATE`] after being sent: repaired by a retransmission (a loopback
    /// trip takes a millisecond or two).
    late: u64,
}

const LATE: Duration = Duration::from_millis(40);

impl Delivery {
    fn ratio(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.distinct as f64 / self.expected as f64
        }
    }

    fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.distinct)
    }
}

fn delivery(arrivals: &[Arrival], parts: u64, from: Instant, to: Instant) -> Delivery {
    let (from_ms, to_ms) = (ms_since_epoch(from), ms_since_epoch(to));
    let mut seen = HashSet::new();
    let mut d = Delivery::default();
    let (mut lo, mut hi) = (u32::MAX, 0u32);
    for a in arrivals
        .iter()
        .filter(|a| a.sent_ms >= from_ms && a.sent_ms <= to_ms)
    {
        if !seen.insert((a.counter, a.part)) {
            d.duplicates += 1;
            continue;
        }
        lo = lo.min(a.counter);
        hi = hi.max(a.counter);
        let trip = a.at.saturating_duration_since(epoch()).as_millis() as u64;
        if trip.saturating_sub(u64::from(a.sent_ms)) > LATE.as_millis() as u64 {
            d.late += 1;
        }
    }
    d.distinct = seen.len() as u64;
    if hi >= lo {
        d.expected = (u64::from(hi - lo) + 1) * parts;
    }
    d
}

/// Video packets per layer among the arrivals in `[from, to]`.
fn layers(arrivals: &[Arrival], from: Instant, to: Instant) -> BTreeMap<Layer, u64> {
    let mut out = BTreeMap::new();
    for a in arrivals.iter().filter(|a| a.at >= from && a.at <= to) {
        *out.entry(a.layer).or_insert(0) += 1;
    }
    out
}

/// The layer most of the video in `[from, to]` came on.
fn main_layer(arrivals: &[Arrival], from: Instant, to: Instant) -> Option<Layer> {
    layers(arrivals, from, to)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(l, _)| l)
}

/// `layer:share` per time slice, for the figures: how the layer changed over the run.
fn layer_timeline(arrivals: &[Arrival], from: Instant, to: Instant, slice: Duration) -> String {
    let mut out = Vec::new();
    let mut t = from;
    while t + slice <= to {
        let end = t + slice;
        let l = layers(arrivals, t, end);
        let total: u64 = l.values().sum();
        let cell = match main_layer(arrivals, t, end) {
            Some(main) => format!(
                "{}{:.0}%",
                main.rid(),
                100.0 * l[&main] as f64 / total.max(1) as f64
            ),
            None => "-".to_owned(),
        };
        out.push(cell);
        t = end;
    }
    out.join(" ")
}

/// The `quality` reports `to` received about `about`, as `seconds:layer:kbps_out:loss_out`.
fn quality_of(to: &Live, about: &str, since: Instant) -> String {
    let mut out = Vec::new();
    for (at, q) in to.said.of_type("quality") {
        for p in q["participants"].as_array().into_iter().flatten() {
            if p["participant_id"] != about {
                continue;
            }
            out.push(format!(
                "{:.0}:{}:{}:{:.2}:est={}",
                at.saturating_duration_since(since).as_secs_f64(),
                p["layer"].as_str().unwrap_or("-"),
                p["bitrate_out_kbps"],
                p["loss_out"].as_f64().unwrap_or(0.0),
                p["estimate_kbps"]
            ));
        }
    }
    out.join(" ")
}

/// The machine's load averages, printed with the figures: the SFU's bandwidth estimate is
/// delay-based, and on a crowded machine scheduling delay looks like a congested link.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Waits until `done` holds, checking every 50 ms; false after `limit`.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// Waits for `who` to receive `kind` from `from`; panics with the server's log after
/// [`DEADLINE`].
async fn until_receives(server: &Server, who: &Live, from: &Live, kind: Kind) {
    let ok = until(DEADLINE, || who.seen.count(from.index, kind) > 0).await;
    assert!(
        ok,
        "{} received no {kind:?} from {} within {DEADLINE:?}; it heard {:?}\n--- server log ---\n{}",
        who.id,
        from.id,
        who.said.types(),
        server.log_text()
    );
}

/// Error messages a member received.
fn errors(who: &Live) -> Vec<Value> {
    who.said
        .of_type("error")
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

// ---- the proxy itself, on plain UDP ---------------------------------------------------------

/// A UDP socket that answers every datagram with the same bytes, and remembers who sent it.
struct Echo {
    addr: SocketAddr,
    senders: std::sync::Arc<Mutex<Vec<SocketAddr>>>,
    received: std::sync::Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = socket.local_addr().expect("bound");
        let senders = std::sync::Arc::new(Mutex::new(Vec::new()));
        let received = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (senders.clone(), received.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if let Ok(mut s) = s.lock() {
                    if !s.contains(&from) {
                        s.push(from);
                    }
                }
                if let Ok(mut r) = r.lock() {
                    r.push(buf[..n].to_vec());
                }
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        Echo {
            addr,
            senders,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `n` numbered datagrams of `len` bytes from `client`, one every `every`.
async fn send_numbered(client: &UdpSocket, to: SocketAddr, n: u32, len: usize, every: Duration) {
    let mut tick = tokio::time::interval(every);
    for i in 0..n {
        tick.tick().await;
        let mut p = i.to_be_bytes().to_vec();
        p.resize(len, 0xAB);
        client.send_to(&p, to).await.expect("send to proxy");
    }
}

/// The proxy's upstream counts once it has decided about `n` datagrams.
async fn proxy_saw(proxy: &Proxy, n: u64) -> common::proxy::Counts {
    let all = until(Duration::from_secs(5), || {
        let c = proxy.counts(Dir::Up);
        c.passed + c.dropped() >= n
    })
    .await;
    assert!(all, "the proxy saw only {:?} of {n}", proxy.counts(Dir::Up));
    proxy.counts(Dir::Up)
}

fn numbers(datagrams: &[Vec<u8>]) -> Vec<u32> {
    datagrams
        .iter()
        .filter_map(|d| {
            d.get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        })
        .collect()
}

/// Which of 2 000 datagrams a proxy with `loss` upstream lets through.
async fn survivors(loss: f64) -> (Vec<u32>, common::proxy::Counts) {
    let echo = Echo::start().await;
    let proxy = Proxy::start(echo.addr, SEED).await;
    proxy.set(Dir::Up, Impairment::loss(loss));
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    send_numbered(&client, proxy.addr(), 2000, 100, Duration::from_micros(200)).await;
    let counts = proxy_saw(&proxy, 2000).await;
    let all_in = until(Duration::from_secs(5), || {
        echo.received().len() as u64 == counts.passed
    })
    .await;
    assert!(
        all_in,
        "the echo got {} of {}",
        echo.received().len(),
        counts.passed
    );
    (numbers(&echo.received()), counts)
}

#[tokio::test]
async fn proxy_loss_is_the_set_fraction_and_repeats_with_its_seed() {
    let _turn = one_at_a_time().await;
    let (first, counts) = survivors(0.10).await;
    let (second, _) = survivors(0.10).await;
    eprintln!("figure: proxy_self_test loss=0.10 counts={counts:?}");
    assert_eq!(counts.passed + counts.lost, 2000, "{counts:?}");
    assert_eq!(counts.overflowed, 0);
    let dropped = counts.drop_fraction();
    assert!(
        (0.07..0.13).contains(&dropped),
        "10 % loss dropped {dropped:.3}"
    );
    assert_eq!(first, second, "the same seed drops the same datagrams");

    let (clean, counts) = survivors(0.0).await;
    assert_eq!(clean, (0..2000).collect::<Vec<u32>>(), "{counts:?}");
}

#[tokio::test]
async fn proxy_cap_holds_the_rate_and_drops_past_its_queue() {
    let _turn = one_at_a_time().await;
    let echo = Echo::start().await;
    let proxy = Proxy::start(echo.addr, SEED).await;
    // 1000 datagrams of 972 bytes (1000 on the wire) in 2 s: 4 Mbit/s into a 1 Mbit/s link.
    proxy.set(Dir::Up, Impairment::rate_kbps(1000));
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    let started = Instant::now();
    send_numbered(&client, proxy.addr(), 1000, 972, Duration::from_millis(2)).await;
    let sending = started.elapsed();
    let counts = proxy_saw(&proxy, 1000).await;
    until(Duration::from_secs(2), || {
        echo.received().len() as u64 == counts.passed
    })
    .await;
    let through = echo.received().len() as u64;
    eprintln!(
        "figure: proxy_self_test cap=1000kbit/s offered=4000kbit/s for {:.2} s: {counts:?}",
        sending.as_secs_f64()
    );

    assert_eq!(through, counts.passed);
    assert_eq!(counts.passed + counts.overflowed, 1000);
    assert_eq!(counts.lost, 0);
    // What a 1 Mbit/s link carries in the sending time, plus its 200 ms queue and 10 kB burst.
    let carried = (sending.as_secs_f64() + 0.2) * 1_000_000.0 / 8.0 + 10_000.0;
    let most = (carried / 1000.0).ceil() as u64;
    let least = (sending.as_secs_f64() * 0.8 * 1_000_000.0 / 8.0 / 1000.0) as u64;
    assert!(
        (least..=most).contains(&through),
        "{through} datagrams went through; a 1 Mbit/s link carries {least}..={most}"
    );
    assert!(counts.overflowed > 0, "the queue overflowed: {counts:?}");
}

#[tokio::test]
async fn proxy_rebind_moves_the_client_to_a_new_port_and_keeps_relaying() {
    let _turn = one_at_a_time().await;
    let echo = Echo::start().await;
    let proxy = Proxy::start(echo.addr, SEED).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    let mut buf = [0u8; 64];

    client.send_to(b"before", proxy.addr()).await.expect("send");
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("an echo through the proxy")
        .expect("recv");
    assert_eq!((&buf[..n], from), (&b"before"[..], proxy.addr()));
    let before = proxy.upstream_addrs();

    assert_eq!(proxy.rebind(), 1);
    let after = proxy.upstream_addrs();
    assert_eq!(after.len(), 1);
    assert_ne!(before, after, "a new port toward the server");

    client.send_to(b"after", proxy.addr()).await.expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("an echo through the new port")
        .expect("recv");
    assert_eq!(&buf[..n], b"after");
    let senders = echo.senders.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        senders,
        [before[0], after[0]],
        "the server saw two addresses"
    );

    // Delay is added after the queue.
    proxy.set(
        Dir::Down,
        Impairment {
            delay: Duration::from_millis(150),
            ..Impairment::default()
        },
    );
    let sent = Instant::now();
    client.send_to(b"slow", proxy.addr()).await.expect("send");
    tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .expect("a delayed echo")
        .expect("recv");
    assert!(sent.elapsed() >= Duration::from_millis(150));
}

// ---- WebRTC through the proxy --------------------------------------------------------------

fn therapist(camera: Camera) -> Member {
    Member {
        id: "t-01",
        role: "therapist",
        index: 1,
        route: Route::Udp,
        camera,
        shows_video_at: Some((1280, 720)),
    }
}

fn client(id: &'static str, index: u8, route: Route, camera: Camera) -> Member {
    Member {
        id,
        role: "client",
        index,
        route,
        camera,
        shows_video_at: Some((1280, 720)),
    }
}

/// Starts the therapist and waits for its `joined`, so clients find it there.
async fn therapist_joined(server: &Server, session: &str, camera: Camera) -> Live {
    let t = therapist(camera).start(server, session);
    let ok = until(DEADLINE, || t.joined().is_some()).await;
    assert!(ok, "therapist not joined: {:?}", t.said.types());
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_keeps_audio_continuous_and_video_flowing_and_spares_others() {
    let _turn = one_at_a_time().await;
    common::require_netns("impairment");
    let server = Server::start();
    let session = "sess-imp-loss";
    let proxy = Proxy::start(media_addr(&server).await, SEED).await;
    proxy.set_both(Impairment::loss(0.10));

    let t = therapist_joined(&server, session, Camera::One(SINGLE_LAYER)).await;
    let clean = client("p-01", 2, Route::Udp, Camera::Off).start(&server, session);
    let lossy = client("p-02", 3, Route::Proxy(proxy.addr()), Camera::Off).start(&server, session);
    for who in [&clean, &lossy] {
        until_receives(&server, who, &t, Kind::Audio).await;
        until_receives(&server, who, &t, Kind::Video).await;
    }
    // Let the first keyframe and the connections settle, then watch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = Instant::now();
    tokio::time::sleep(OBSERVE).await;
    let to = Instant::now();
    // Packets sent in the last half second may still be on their way (or being repaired).
    let sent_to = to - Duration::from_millis(500);

    let (t_id, t_ix) = (t.id, t.index);
    let figures = |who: &Live| {
        let audio = who.seen.arrivals(t_ix, Kind::Audio);
        let video = who.seen.arrivals(t_ix, Kind::Video);
        let a = delivery(&audio, 1, from, sent_to);
        let v = delivery(&video, u64::from(SINGLE_LAYER.packets), from, sent_to);
        let gaps = (longest_gap(&audio, from, to), longest_gap(&video, from, to));
        eprintln!(
            "figure: loss10 {} from {t_id}: audio {}/{} ({:.3}) longest_gap_ms={} | video {}/{} \
             ({:.3}) late_over_40ms(repaired)={} duplicates={} longest_gap_ms={} | foreign={}",
            who.id,
            a.distinct,
            a.expected,
            a.ratio(),
            gaps.0.as_millis(),
            v.distinct,
            v.expected,
            v.ratio(),
            v.late,
            v.duplicates,
            gaps.1.as_millis(),
            who.seen.foreign.load(Ordering::Relaxed),
        );
        (a, v, gaps)
    };
    let (clean_a, clean_v, clean_gaps) = figures(&clean);
    let (lossy_a, lossy_v, (audio_gap, video_gap)) = figures(&lossy);
    let up_from_lossy = delivery(&t.seen.arrivals(lossy.index, Kind::Audio), 1, from, sent_to);
    eprintln!(
        "figure: loss10 {t_id} from p-02 (10 % loss on p-02's uplink): audio {}/{} ({:.3})",
        up_from_lossy.distinct,
        up_from_lossy.expected,
        up_from_lossy.ratio()
    );
    eprintln!(
        "figure: loss10 proxy up={:?} down={:?} load={}",
        proxy.counts(Dir::Up),
        proxy.counts(Dir::Down),
        load()
    );
    for who in [&clean, &lossy] {
        for (at, m) in who.said.of_type("modality") {
            let s = at.saturating_duration_since(from).as_secs_f64();
            eprintln!("figure: loss10 {} was told at {s:.1} s {m}", who.id);
        }
        eprintln!(
            "figure: loss10 quality reports to {t_id} about {} (s, layer, out kbit/s, loss_out): {}",
            who.id,
            quality_of(&t, who.id, from)
        );
    }

    // The loss was real: about a tenth of the subscriber's downlink went missing.
    let down = proxy.counts(Dir::Down);
    assert!(
        (0.07..0.13).contains(&down.drop_fraction()),
        "the proxy dropped {:.3} of the downlink",
        down.drop_fraction()
    );
    // Audio: lost packets are lost (no retransmission for audio), but never a long silence.
    assert!(lossy_a.expected > 500, "{lossy_a:?}");
    let (excess, silence) = excess_silence(
        &lossy.seen.arrivals(t_ix, Kind::Audio),
        &clean.seen.arrivals(t_ix, Kind::Audio),
        from,
        to,
        MAX_AUDIO_GAP_UNDER_LOSS,
    );
    eprintln!(
        "figure: loss10 p-02 audio longest_gap_ms={} (beyond the clean path's: {} ms of a {} ms \
         silence)",
        audio_gap.as_millis(),
        excess.as_millis(),
        silence.as_millis()
    );
    assert!(
        excess <= MAX_AUDIO_GAP_UNDER_LOSS,
        "the lossy subscriber heard nothing for {silence:?}, {excess:?} longer than the clean one"
    );
    // Video keeps flowing, and Haven repairs most of what the link lost.
    assert!(
        video_gap <= MAX_VIDEO_GAP_UNDER_LOSS,
        "the lossy subscriber's video stopped for {video_gap:?}; it was told {:?}",
        lossy.said.of_type("modality")
    );
    assert!(
        lossy_v.ratio() >= 0.97,
        "video under 10 % loss: {:.3} of the packets arrived (repairs would bring it near 1)",
        lossy_v.ratio()
    );
    assert!(
        lossy.said.of_type("modality").is_empty(),
        "10 % loss is no reason to stop video: {:?}",
        lossy.said.of_type("modality")
    );
    // The clean subscriber lost nothing, and nothing stopped.
    assert_eq!(clean_a.missing(), 0, "clean audio: {clean_a:?}");
    assert_eq!(clean_v.missing(), 0, "clean video: {clean_v:?}");
    assert!(
        clean_gaps.0 <= MAX_GAP_CLEAN && clean_gaps.1 <= MAX_GAP_CLEAN,
        "the clean subscriber's audio paused {:?} and video {:?}",
        clean_gaps.0,
        clean_gaps.1
    );
    assert!(
        clean.said.of_type("modality").is_empty(),
        "the clean subscriber's video was paused: {:?}",
        clean.said.of_type("modality")
    );
    for who in [&t, &clean, &lossy] {
        assert_eq!(who.seen.foreign.load(Ordering::Relaxed), 0, "{}", who.id);
        assert!(errors(who).is_empty(), "{}: {:?}", who.id, errors(who));
    }

    for who in [lossy, clean, t] {
        who.leave().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_change_with_ice_restart_resumes_media_both_ways_in_the_same_stay() {
    let _turn = one_at_a_time().await;
    common::require_netns("impairment");
    let server = Server::start();
    let session = "sess-imp-move";
    let proxy = Proxy::start(media_addr(&server).await, SEED).await;

    let t = therapist_joined(&server, session, Camera::One(SINGLE_LAYER)).await;
    let c = client(
        "p-02",
        2,
        Route::Proxy(proxy.addr()),
        Camera::One(SINGLE_LAYER),
    )
    .start(&server, session);
    for (who, from) in [(&c, &t), (&t, &c)] {
        until_receives(&server, who, from, Kind::Audio).await;
        until_receives(&server, who, from, Kind::Video).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let haven_saw = proxy.upstream_addrs();

    // The move: Haven sees the client's packets from new ports, and its own go nowhere;
    // the client notices and restarts ICE on both connections.
    let moved_at = Instant::now();
    assert_eq!(proxy.rebind(), 2, "both connections went through the proxy");
    c.restart_ice();
    let moved_ms = ms_since_epoch(moved_at);

    // Resumed: a packet sent after the move arrived. Measured from the move.
    let resumed = |who: &Live, from: &Live, kind: Kind| {
        who.seen
            .arrivals(from.index, kind)
            .iter()
            .filter(|a| a.sent_ms > moved_ms)
            .map(|a| a.at)
            .min()
    };
    let flows = [
        ("to p-02 audio", &c, &t, Kind::Audio),
        ("to p-02 video", &c, &t, Kind::Video),
        ("from p-02 audio", &t, &c, Kind::Audio),
        ("from p-02 video", &t, &c, Kind::Video),
    ];
    until(DEADLINE, || {
        flows
            .iter()
            .all(|(_, who, from, kind)| resumed(who, from, *kind).is_some())
    })
    .await;
    // Run on a little, so the stay is measurably continuous afterwards.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end = Instant::now();

    let mut worst = Duration::ZERO;
    for (name, who, from, kind) in flows {
        let after = resumed(who, from, kind).map(|at| at - moved_at);
        let gap = longest_gap(&who.seen.arrivals(from.index, kind), moved_at, end);
        eprintln!(
            "figure: address_change {name}: resumed_after_ms={:?} longest_gap_ms={}",
            after.map(|d| d.as_millis()),
            gap.as_millis()
        );
        let after = after.unwrap_or_else(|| {
            panic!(
                "{name}: nothing sent after the move arrived within {DEADLINE:?}; p-02 heard \
                 {:?} errors {:?}\n--- server log ---\n{}",
                c.said.types(),
                errors(&c),
                server.log_text()
            )
        });
        worst = worst.max(after);
    }
    eprintln!(
        "figure: address_change haven_saw_before={haven_saw:?} after={:?} worst_resume_ms={} \
         load={}",
        proxy.upstream_addrs(),
        worst.as_millis(),
        load()
    );
    eprintln!(
        "figure: address_change p-02 sent audio={} video_frames={} writes_refused={}",
        c.sent.audio.load(Ordering::Relaxed),
        c.sent.video_frames.load(Ordering::Relaxed),
        c.sent.refused.load(Ordering::Relaxed)
    );
    assert!(worst <= MAX_RESUME, "media resumed only after {worst:?}");

    // The same participant throughout: one `joined`, nobody told it left, no errors.
    let joined: Vec<Value> = c
        .said
        .of_type("joined")
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert_eq!(joined[0]["participant_id"], "p-02");
    assert!(t.said.of_type("participant_left").is_empty());
    assert!(errors(&c).is_empty(), "p-02: {:?}", errors(&c));

    let outcome = c.leave().await;
    t.leave().await;
    // Both connections restarted with new credentials from Haven.
    let (p, s) = (&outcome.publish_ufrags, &outcome.subscribe_ufrags);
    assert!(
        p.len() == 2 && p[0] != p[1],
        "publish answers' ufrags {p:?}"
    );
    assert!(
        s.len() >= 2 && s.first() != s.last(),
        "subscribe offers' ufrags {s:?}"
    );

    // One stay in the ledger: admitted once, media connected once and never lost.
    let kinds = server.ledger_kinds("p-02");
    eprintln!("figure: address_change ledger p-02 {kinds:?}");
    let count = |k: &str| kinds.iter().filter(|x| *x == k).count();
    assert_eq!(count("admitted"), 1, "{kinds:?}");
    assert_eq!(count("media_connected"), 1, "{kinds:?}");
    assert_eq!(count("media_lost"), 0, "{kinds:?}");
    // The loss of the moment the address changed is a burst, not a link too small for
    // video: no audio-only.
    assert_eq!(count("modality_changed"), 0, "{kinds:?}");
    assert_eq!(count("left"), 1, "{kinds:?}");
    let report = server.report(session);
    let stays = report["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["participant_id"] == "p-02")
        .map(|p| p["stays"].as_array().map_or(0, Vec::len));
    assert_eq!(stays, Some(1), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_below_the_top_layer_moves_only_that_subscriber_down() {
    let _turn = one_at_a_time().await;
    common::require_netns("impairment");
    let server = Server::start();
    let session = "sess-imp-cap";
    let proxy = Proxy::start(media_addr(&server).await, SEED).await;
    proxy.set(Dir::Down, Impairment::rate_kbps(CAP_KBPS));
    let rates: Vec<String> = SIMULCAST
        .iter()
        .map(|e| format!("{}={}kbit/s", e.layer.rid(), e.kbps()))
        .collect();
    eprintln!(
        "figure: cap publisher layers (payload) {rates:?}; cap {CAP_KBPS} kbit/s on p-02's downlink"
    );

    let t = therapist_joined(&server, session, Camera::Simulcast).await;
    let open = client("p-01", 2, Route::Udp, Camera::Off).start(&server, session);
    let capped = client("p-02", 3, Route::Proxy(proxy.addr()), Camera::Off).start(&server, session);
    for who in [&open, &capped] {
        until_receives(&server, who, &t, Kind::Audio).await;
        until_receives(&server, who, &t, Kind::Video).await;
    }
    let from = Instant::now();
    tokio::time::sleep(OBSERVE).await;
    let capped_end = Instant::now();
    // After the first seconds (the estimate starts low and climbs), each subscriber must be on
    // the layer that fits; the last 6 s show where it ended up.
    let converged = from + CAP_CONVERGENCE;
    let last = capped_end - Duration::from_secs(6);
    let slice = Duration::from_secs(2);

    let video = |who: &Live| who.seen.arrivals(t.index, Kind::Video);
    let audio = |who: &Live| who.seen.arrivals(t.index, Kind::Audio);
    for who in [&open, &capped] {
        eprintln!(
            "figure: cap {} main layer per 2 s: {} | last 6 s {:?} | audio longest_gap_ms={} \
             video longest_gap_ms={}",
            who.id,
            layer_timeline(&video(who), from, capped_end, slice),
            layers(&video(who), last, capped_end),
            longest_gap(&audio(who), from, capped_end).as_millis(),
            longest_gap(&video(who), from, capped_end).as_millis(),
        );
    }
    eprintln!(
        "figure: cap proxy down={:?} load={}",
        proxy.counts(Dir::Down),
        load()
    );
    for (_, m) in capped.said.of_type("modality") {
        eprintln!("figure: cap p-02 was told {m}");
    }
    eprintln!(
        "figure: cap quality reports to t-01 about p-02 (s, layer, out kbit/s, loss_out): {}",
        quality_of(&t, capped.id, from)
    );

    // The same figures on /metrics, for Prometheus: per participant, by pseudonymous id, with
    // no address or name in any label.
    let (status, ctype, metrics) = common::http(&server, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200, "{metrics}");
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let value = |name: &str, who: &str| -> Option<f64> {
        let prefix = format!("{name}{{session_id=\"{session}\",participant_id=\"{who}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    };
    assert!(metrics.contains("haven_participants 3\n"), "{metrics}");
    let capped_out = value("haven_participant_bitrate_out_bps", "p-02");
    let open_out = value("haven_participant_bitrate_out_bps", "p-01");
    let capped_estimate = value("haven_participant_estimate_bps", "p-02");
    let open_layer = value("haven_participant_layer", "p-01");
    eprintln!(
        "figure: cap /metrics p-02 out={capped_out:?} estimate={capped_estimate:?}, p-01 \
         out={open_out:?} layer={open_layer:?}"
    );
    assert!(open_out.is_some_and(|b| b > 0.0), "{metrics}");
    assert!(capped_out.is_some_and(|b| b > 0.0), "{metrics}");
    assert!(capped_estimate.is_some_and(|e| e > 0.0), "{metrics}");
    assert_eq!(
        open_layer,
        Some(3.0),
        "the uncapped subscriber receives the top layer (3): {metrics}"
    );
    assert!(
        !metrics.contains("127.0.0.1"),
        "an address in /metrics: {metrics}"
    );

    // Lift the cap: the top layer should come back.
    proxy.set(Dir::Down, Impairment::default());
    let lifted = Instant::now();
    let back = until(DEADLINE, || {
        video(&capped)
            .iter()
            .any(|a| a.at > lifted && a.layer == Layer::High)
    })
    .await;
    let back_after = video(&capped)
        .iter()
        .filter(|a| a.at > lifted && a.layer == Layer::High)
        .map(|a| a.at - lifted)
        .min();
    eprintln!(
        "figure: cap lifted: p-02 back on f after {:?} ms",
        back_after.map(|d| d.as_millis())
    );

    // The uncapped subscriber receives the top layer.
    let open_layers = layers(&video(&open), last, capped_end);
    assert_eq!(
        main_layer(&video(&open), last, capped_end),
        Some(Layer::High),
        "uncapped, last 6 s: {open_layers:?}"
    );
    // The capped one receives video in every slice once converged, mostly on a lower layer.
    // Haven retries the top layer now and then (a step up is how it learns whether the link
    // has grown; after each failed try it waits twice as long, up to 8 s), so a slice may be
    // mostly top layer while a try lasts, but not most of them.
    let capped_video = video(&capped);
    let mut at = converged;
    let (mut slices, mut top_slices) = (0, 0);
    while at + slice <= capped_end {
        let main = main_layer(&capped_video, at, at + slice);
        assert!(
            main.is_some(),
            "capped at {CAP_KBPS} kbit/s, {:.0}..{:.0} s: no video; per 2 s: {}",
            (at - from).as_secs_f64(),
            (at + slice - from).as_secs_f64(),
            layer_timeline(&capped_video, from, capped_end, slice)
        );
        slices += 1;
        top_slices += usize::from(main == Some(Layer::High));
        at += slice;
    }
    let after = layers(&capped_video, converged, capped_end);
    let top_share = after.get(&Layer::High).copied().unwrap_or(0) as f64
        / after.values().sum::<u64>().max(1) as f64;
    eprintln!(
        "figure: cap top-layer share after {CAP_CONVERGENCE:?}: {:.1} % ({top_slices} of {slices} \
         slices mostly top)",
        100.0 * top_share
    );
    assert!(
        top_slices * 3 <= slices,
        "capped at {CAP_KBPS} kbit/s, {top_slices} of {slices} slices were mostly the top layer: \
         {}",
        layer_timeline(&capped_video, from, capped_end, slice)
    );
    // Never stalled beyond what the whole machine did to the uncapped subscriber at the same
    // time, and its audio never broke up, not even while the SFU adapted.
    let video_gap = longest_gap(&capped_video, converged, capped_end);
    let open_gap = longest_gap(&video(&open), converged, capped_end);
    assert!(
        video_gap <= open_gap + Duration::from_secs(1),
        "capped video stalled {video_gap:?} (uncapped: {open_gap:?})"
    );
    let (excess, silence) = excess_silence(
        &audio(&capped),
        &audio(&open),
        from,
        capped_end,
        MAX_AUDIO_GAP_UNDER_CAP,
    );
    assert!(
        excess <= MAX_AUDIO_GAP_UNDER_CAP,
        "capped audio stopped for {silence:?}, {excess:?} longer than the uncapped one's"
    );
    assert!(
        back,
        "the top layer did not come back within {DEADLINE:?} of lifting the cap"
    );
    for who in [&t, &open, &capped] {
        assert_eq!(who.seen.foreign.load(Ordering::Relaxed), 0, "{}", who.id);
        assert!(errors(who).is_empty(), "{}: {:?}", who.id, errors(who));
    }

    for who in [capped, open, t] {
        who.leave().await;
    }
}

/// A downlink cap under the lowest layer and above audio alone (the lowest layer is about
/// 150 kbit/s, audio about 50).
const AUDIO_ONLY_CAP_KBPS: u64 = 100;

/// A link that cannot carry even the lowest layer: video to that subscriber pauses, the
/// subscriber and the ledger learn it is audio-only, its audio goes on; when the link grows,
/// video comes back (by trial, as the estimate cannot learn the link grew from audio alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_too_small_for_any_video_goes_audio_only_and_video_returns_when_it_grows() {
    let _turn = one_at_a_time().await;
    common::require_netns("impairment");
    let server = Server::start();
    let session = "sess-imp-ao";
    let proxy = Proxy::start(media_addr(&server).await, SEED).await;

    let t = therapist_joined(&server, session, Camera::Simulcast).await;
    let open = client("p-01", 2, Route::Udp, Camera::Off).start(&server, session);
    let weak = client("p-02", 3, Route::Proxy(proxy.addr()), Camera::Off).start(&server, session);
    for who in [&open, &weak] {
        until_receives(&server, who, &t, Kind::Audio).await;
        until_receives(&server, who, &t, Kind::Video).await;
    }
    let video = |who: &Live| who.seen.arrivals(t.index, Kind::Video);
    let audio = |who: &Live| who.seen.arrivals(t.index, Kind::Audio);
    let modality = |who: &Live, m: &str| {
        who.said
            .of_type("modality")
            .into_iter()
            .filter(|(_, v)| v["modality"] == m)
            .collect::<Vec<_>>()
    };

    proxy.set(Dir::Down, Impairment::rate_kbps(AUDIO_ONLY_CAP_KBPS));
    let capped = Instant::now();
    let paused = until(DEADLINE, || !modality(&weak, "audio_only").is_empty()).await;
    let told = modality(&weak, "audio_only");
    let Some((told_at, told_msg)) = told.first().cloned() else {
        panic!(
            "no audio_only within {DEADLINE:?} of a {AUDIO_ONLY_CAP_KBPS} kbit/s cap ({paused}); \
             quality: {}",
            quality_of(&t, weak.id, capped)
        );
    };
    eprintln!(
        "figure: audio_only p-02 told {told_msg} {} ms after the cap",
        (told_at - capped).as_millis()
    );
    assert_eq!(told_msg["reason"], "bandwidth", "{told_msg}");

    // Paused: for the next 3 s (a try of video comes only after 4 s) audio flows as it does
    // to the uncapped subscriber, and video has stopped once the link's queue drained.
    // (From 1.5 s after the message: what the link's queue still held is gone by then.)
    let quiet_from = told_at + Duration::from_millis(1500);
    let quiet_to = told_at + Duration::from_millis(3800);
    tokio::time::sleep_until((quiet_to + Duration::from_millis(200)).into()).await;
    let video_while_paused = video(&weak)
        .iter()
        .filter(|a| a.at > quiet_from && a.at < quiet_to)
        .count();
    let audio_while_paused = audio(&weak)
        .iter()
        .filter(|a| a.at > quiet_from && a.at < quiet_to)
        .count();
    let (excess, silence) = excess_silence(
        &audio(&weak),
        &audio(&open),
        quiet_from,
        quiet_to,
        MAX_AUDIO_GAP_UNDER_CAP,
    );
    eprintln!(
        "figure: audio_only p-02 while paused (2.3 s): {audio_while_paused} audio packets, \
         {video_while_paused} video packets, longest audio silence {} ms",
        silence.as_millis()
    );
    assert_eq!(video_while_paused, 0, "video kept flowing after audio_only");
    let open_audio = audio(&open)
        .iter()
        .filter(|a| a.at > quiet_from && a.at < quiet_to)
        .count();
    eprintln!("figure: audio_only p-01 (uncapped) audio in the same 2.3 s: {open_audio}");
    assert!(
        audio_while_paused * 2 >= open_audio,
        "audio to the paused subscriber: {audio_while_paused} packets in 2.3 s, to the \
         uncapped one {open_audio}"
    );
    assert!(
        excess <= MAX_AUDIO_GAP_UNDER_CAP,
        "audio stopped for {silence:?} while paused"
    );
    // The uncapped subscriber kept its video all along.
    let open_video = video(&open)
        .iter()
        .filter(|a| a.at > quiet_from && a.at < quiet_to)
        .count();
    assert!(
        open_video > 50,
        "uncapped video while p-02 paused: {open_video}"
    );

    // Keep the cap a while longer (a try of video fails, and the wait doubles), then lift it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set(Dir::Down, Impairment::default());
    let lifted = Instant::now();
    let back = until(DEADLINE, || {
        modality(&weak, "video").iter().any(|(at, _)| *at > lifted)
            && video(&weak)
                .iter()
                .any(|a| a.at > lifted + Duration::from_millis(500))
    })
    .await;
    let back_after = video(&weak)
        .iter()
        .filter(|a| a.at > lifted + Duration::from_millis(500))
        .map(|a| a.at - lifted)
        .min();
    let said: Vec<String> = weak
        .said
        .of_type("modality")
        .into_iter()
        .map(|(at, m)| format!("{}ms:{}", (at - capped).as_millis(), m["modality"]))
        .collect();
    eprintln!(
        "figure: audio_only p-02 modality messages since the cap {said:?}; video back {:?} ms \
         after lifting",
        back_after.map(|d| d.as_millis())
    );
    assert!(
        back,
        "video did not come back within {DEADLINE:?} of lifting the cap"
    );

    // The ledger learned both changes.
    for who in [weak, open, t] {
        who.leave().await;
    }
    let kinds = server.ledger_kinds("p-02");
    eprintln!("figure: audio_only ledger p-02 {kinds:?}");
    let changes = kinds.iter().filter(|k| *k == "modality_changed").count();
    assert!(changes >= 2, "audio-only and back in the ledger: {kinds:?}");
}
