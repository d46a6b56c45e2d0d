//! Connections open at once per IP address, for the listeners that take connections from
//! anywhere (HTTP and WebSocket, ICE-TCP): a single host must not hold them all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts open connections per address against a limit. Cloning shares the counts.
#[derive(Clone, Debug)]
pub struct PerAddress {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

/// One connection's place in its address's count; dropping it frees the place.
#[derive(Debug)]
pub struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerAddress {
    pub fn new(limit: usize) -> Self {
        PerAddress {
            counts: Arc::default(),
            limit,
        }
    }

    /// A place for one more connection from `ip`, or `None` when it holds `limit` already.
    pub fn take(&self, ip: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: self.counts.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_count_and_a_dropped_slot_frees_its_place() {
        let limit = PerAddress::new(2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let first = limit.take(a).expect("first");
        let _second = limit.take(a).expect("second");
        assert!(limit.take(a).is_none(), "a third from the same address");
        assert!(limit.take(b).is_some(), "another address is not affected");
        drop(first);
        assert!(limit.take(a).is_some(), "a place came free");
    }
}
