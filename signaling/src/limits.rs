//! Limits on everything that comes in, so that one misbehaving client never costs another
//! room anything. `docs/operations.md` lists each with its default and how to change it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every limit of the signaling server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest request target (path and query) accepted; longer gets 414.
    pub max_url_bytes: usize,
    /// Most bytes of request headers accepted; more gets 431.
    pub max_header_bytes: usize,
    /// Largest WebSocket message; a larger one closes the socket with 1009.
    pub max_message_bytes: usize,
    /// Sustained messages per second per connection, and the burst allowed above it.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// Warnings (`rate_limited` errors) before a flooding connection is closed with 1008.
    pub rate_warnings: u32,
    /// Open WebSockets per client address.
    pub connections_per_address: usize,
    /// WebSockets that have not joined yet, across the node.
    pub pending_connections: usize,
    /// The first message (`join`) must arrive within this time.
    pub join_timeout: Duration,
    /// Haven pings every connection this often...
    pub ping_interval: Duration,
    /// ...and closes one that has shown no sign of life for this long.
    pub silence_timeout: Duration,
    /// A write to a client that does not read for this long closes its connection.
    pub send_timeout: Duration,
    /// Messages queued for one connection; a client whose queue stays full past
    /// `send_timeout` is closed.
    pub outbox_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_url_bytes: 4 * 1024,
            max_header_bytes: 16 * 1024,
            max_message_bytes: 64 * 1024,
            messages_per_second: 20,
            message_burst: 60,
            rate_warnings: 3,
            connections_per_address: 64,
            pending_connections: 1000,
            join_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(15),
            silence_timeout: Duration::from_secs(45),
            send_timeout: Duration::from_secs(10),
            outbox_messages: 256,
        }
    }
}

/// A token bucket for one connection's messages.
///
/// Hand-written rather than taken from a rate-limiting crate: it is owned by one task, needs
/// no synchronisation and no clock abstraction, and is a dozen lines.
#[derive(Debug)]
pub struct MessageRate {
    tokens: f64,
    per_second: f64,
    burst: f64,
    last: Instant,
}

impl MessageRate {
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        MessageRate {
            tokens: f64::from(burst),
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token; `false` when the connection is over its rate.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts open and not-yet-joined sockets. The lock is taken once when a socket opens and
/// once when it closes, never per message.
#[derive(Default)]
pub struct ConnectionCounter {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    per_address: HashMap<IpAddr, usize>,
    pending: usize,
}

/// Why a new socket was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    TooManyFromAddress,
    TooManyPending,
}

impl ConnectionCounter {
    /// Registers a new socket from `ip`, or refuses it.
    pub fn open(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<ConnectionSlot, Refused> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.per_address.get(&ip).copied().unwrap_or(0);
        if n >= limits.connections_per_address {
            return Err(Refused::TooManyFromAddress);
        }
        if c.pending >= limits.pending_connections {
            return Err(Refused::TooManyPending);
        }
        c.per_address.insert(ip, n + 1);
        c.pending += 1;
        Ok(ConnectionSlot {
            counter: self.clone(),
            ip,
            pending: true,
        })
    }
}

/// One open socket's place in the counts; released when dropped.
pub struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    ip: IpAddr,
    pending: bool,
}

impl ConnectionSlot {
    /// The socket has joined: it no longer counts as pending.
    pub fn joined(&mut self) {
        if self.pending {
            self.pending = false;
            let mut c = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
            c.pending = c.pending.saturating_sub(1);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
        if self.pending {
            c.pending = c.pending.saturating_sub(1);
        }
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_sustained_rate() {
        let t0 = Instant::now();
        let mut r = MessageRate::new(10, 5, t0);
        for _ in 0..5 {
            assert!(r.allow(t0));
        }
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_millis(100)));
        assert!(!r.allow(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn slots_count_per_address_and_pending_and_are_released() {
        let limits = Limits {
            connections_per_address: 2,
            pending_connections: 3,
            ..Limits::default()
        };
        let counter = Arc::new(ConnectionCounter::default());
        let a: IpAddr = "127.0.0.1".parse().expect("literal");
        let b: IpAddr = "127.0.0.2".parse().expect("literal");

        let s1 = counter.open(a, &limits).expect("first");
        let mut s2 = counter.open(a, &limits).expect("second");
        assert_eq!(
            counter.open(a, &limits).err(),
            Some(Refused::TooManyFromAddress)
        );
        let _s3 = counter.open(b, &limits).expect("other address");
        assert_eq!(
            counter.open(b, &limits).err(),
            Some(Refused::TooManyPending)
        );

        s2.joined();
        let _s4 = counter.open(b, &limits).expect("a pending place was freed");
        drop(s1);
        drop(s2);
        let _s5 = counter.open(a, &limits).expect("address places were freed");
    }
}
