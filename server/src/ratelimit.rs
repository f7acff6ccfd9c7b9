//! Failed logins per source address, across connections (DESIGN: "auth failures per IP
//! per minute"). The per-stream limit (`auth.max_failures_per_stream`) only makes a
//! guesser reconnect; this one makes guessing from one address slow.
//!
//! A sliding window: for each address the times of its most recent failures, at most
//! as many as the limit (older ones cannot matter). An address is refused while it has
//! `limit` failures within the last minute. The table holds at most
//! [`MAX_ADDRESSES`] addresses; beyond that the address that first appeared earliest is
//! forgotten, so a flood of addresses costs bounded memory (it can only make the
//! limiter forget, never refuse someone who did not fail).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Addresses remembered at most.
pub const MAX_ADDRESSES: usize = 65_536;

/// Longest run of failure times kept for one address, whatever the configured limit.
const MAX_TIMES: usize = 1024;

/// The key an address is counted under. An IPv6 host usually controls a whole /64, so
/// its addresses count as one; an IPv4-mapped IPv6 address counts as the IPv4 address
/// (a listener on `[::]` sees IPv4 clients that way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    pub fn new(ip: IpAddr) -> AddrKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddrKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                AddrKey(IpAddr::V6(Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

struct Entry {
    /// Failure times, oldest first, at most the limit in force when they were added.
    times: VecDeque<Instant>,
    /// Which insertion this entry is, to tell stale eviction-queue items from live ones.
    generation: u64,
}

#[derive(Default)]
struct Table {
    entries: HashMap<AddrKey, Entry>,
    /// Entries in the order they were created: the eviction order.
    order: VecDeque<(AddrKey, u64)>,
    next_generation: u64,
}

/// Failed logins by source address.
pub struct AuthLimiter {
    table: Mutex<Table>,
    capacity: usize,
}

impl Default for AuthLimiter {
    fn default() -> Self {
        AuthLimiter::with_capacity(MAX_ADDRESSES)
    }
}

impl AuthLimiter {
    pub fn with_capacity(capacity: usize) -> AuthLimiter {
        AuthLimiter {
            table: Mutex::new(Table::default()),
            capacity: capacity.max(1),
        }
    }

    /// Whether `ip` has used up its failures: `limit` of them within [`WINDOW`] before
    /// `now`. A limit of 0 turns the check off.
    pub fn is_blocked(&self, ip: IpAddr, limit: u32, now: Instant) -> bool {
        if limit == 0 {
            return false;
        }
        let key = AddrKey::new(ip);
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = table.entries.get(&key) else {
            return false;
        };
        let recent = entry
            .times
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < WINDOW)
            .count();
        recent >= limit as usize
    }

    /// Records a failed login from `ip` at `now`.
    pub fn record_failure(&self, ip: IpAddr, limit: u32, now: Instant) {
        if limit == 0 {
            return;
        }
        let keep = (limit as usize).min(MAX_TIMES);
        let key = AddrKey::new(ip);
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let table = &mut *guard;
        if !table.entries.contains_key(&key) {
            if table.entries.len() >= self.capacity {
                table.make_room(self.capacity, now);
            }
            let generation = table.next_generation;
            table.next_generation += 1;
            table.entries.insert(
                key,
                Entry {
                    times: VecDeque::new(),
                    generation,
                },
            );
            table.order.push_back((key, generation));
        }
        if let Some(entry) = table.entries.get_mut(&key) {
            entry.times.push_back(now);
            while entry.times.len() > keep {
                entry.times.pop_front();
            }
        }
        // Items of entries removed by expiry stay in `order`; keep it proportionate.
        if table.order.len() > 2 * table.entries.len() + 64 {
            let entries = &table.entries;
            table
                .order
                .retain(|(k, g)| entries.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// Addresses currently remembered (for tests and statistics).
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Table {
    /// Frees at least one place: first every address whose failures are all older than
    /// the window, else the oldest entry.
    fn make_room(&mut self, capacity: usize, now: Instant) {
        self.entries.retain(|_, e| {
            e.times
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) < WINDOW)
        });
        while self.entries.len() >= capacity {
            let Some((key, generation)) = self.order.pop_front() else {
                break;
            };
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.generation == generation)
            {
                self.entries.remove(&key);
            }
        }
        let entries = &self.entries;
        self.order
            .retain(|(k, g)| entries.get(k).is_some_and(|e| e.generation == *g));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_at_the_limit_within_the_window() {
        let l = AuthLimiter::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..3 {
            assert!(!l.is_blocked(a, 3, t0), "blocked after {i} failures");
            l.record_failure(a, 3, t0 + Duration::from_secs(i));
        }
        assert!(l.is_blocked(a, 3, t0 + Duration::from_secs(3)));
        // Other addresses are not affected.
        assert!(!l.is_blocked(ip("192.0.2.2"), 3, t0));
        // A limit of 0 is off.
        assert!(!l.is_blocked(a, 0, t0));
        // The window slides: once the first failure is a minute old, one more is allowed.
        assert!(!l.is_blocked(a, 3, t0 + WINDOW));
        assert!(l.is_blocked(a, 3, t0 + WINDOW - Duration::from_millis(1)));
        assert!(!l.is_blocked(a, 3, t0 + WINDOW + Duration::from_secs(3)));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let l = AuthLimiter::default();
        let t0 = Instant::now();
        l.record_failure(ip("2001:db8:1:2::1"), 2, t0);
        l.record_failure(ip("2001:db8:1:2:ffff::9"), 2, t0);
        assert!(l.is_blocked(ip("2001:db8:1:2::77"), 2, t0));
        assert!(!l.is_blocked(ip("2001:db8:1:3::1"), 2, t0));
        l.record_failure(ip("::ffff:192.0.2.7"), 1, t0);
        assert!(l.is_blocked(ip("192.0.2.7"), 1, t0));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_addresses() {
        let l = AuthLimiter::with_capacity(100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.record_failure(a, 1000, t0);
            assert!(l.len() <= 100);
        }
        let order = l.table.lock().unwrap().order.len();
        assert!(order <= 2 * 100 + 64, "eviction queue grew to {order}");
        // The newest addresses are still remembered, the oldest forgotten.
        assert!(l.is_blocked(
            IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 9_999)),
            1,
            t0
        ));
        assert!(!l.is_blocked(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000)), 1, t0));
        // Failure times per address are bounded by the limit.
        let a = ip("198.51.100.1");
        for _ in 0..50 {
            l.record_failure(a, 5, t0);
        }
        let table = l.table.lock().unwrap();
        assert_eq!(table.entries[&AddrKey::new(a)].times.len(), 5);
    }

    #[test]
    fn expired_addresses_make_room_first() {
        let l = AuthLimiter::with_capacity(2);
        let t0 = Instant::now();
        l.record_failure(ip("192.0.2.1"), 3, t0);
        l.record_failure(ip("192.0.2.2"), 3, t0 + WINDOW);
        // 192.0.2.1's failure has expired, so it makes room; 192.0.2.2 stays.
        l.record_failure(ip("192.0.2.3"), 3, t0 + WINDOW + Duration::from_secs(1));
        assert_eq!(l.len(), 2);
        assert!(l.is_blocked(ip("192.0.2.2"), 1, t0 + WINDOW));
    }
}
