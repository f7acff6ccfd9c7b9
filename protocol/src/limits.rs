//! What one peer may take of what every peer shares, for the client and the server
//! listeners alike: connections per source address ([`ConnectionLimiter`]), the bytes
//! that streams not yet authenticated hold of unfinished elements ([`ByteBudget`]), and
//! events per key within a sliding minute ([`WindowLimiter`], for failed logins per
//! address and dialback verifications per claimed domain). Nothing here does I/O.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- connections per address -------------------------------------------------------------

/// Open connections by source address ([`AddrKey`]). An address has an entry only while
/// it has connections, so the table is never larger than the number of connections the
/// listener holds.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLimiter {
    open: Arc<Mutex<HashMap<AddrKey, usize>>>,
}

/// One counted connection; dropping it (when the connection ends) gives its place back.
#[derive(Debug)]
pub struct AddressPermit {
    open: Arc<Mutex<HashMap<AddrKey, usize>>>,
    key: AddrKey,
}

impl ConnectionLimiter {
    pub fn new() -> ConnectionLimiter {
        ConnectionLimiter::default()
    }

    /// Counts a new connection from `ip`, or `None` when its address already has `limit`
    /// of them. A limit of 0 refuses nothing (the connection is still counted, so that a
    /// limit set later by a reload sees it).
    pub fn try_acquire(&self, ip: IpAddr, limit: usize) -> Option<AddressPermit> {
        let key = AddrKey::new(ip);
        let mut open = lock(&self.open);
        let n = open.entry(key).or_insert(0);
        if limit != 0 && *n >= limit {
            return None;
        }
        *n += 1;
        Some(AddressPermit {
            open: self.open.clone(),
            key,
        })
    }

    /// Connections open from the address of `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        lock(&self.open)
            .get(&AddrKey::new(ip))
            .copied()
            .unwrap_or(0)
    }

    /// Addresses with at least one connection.
    pub fn addresses(&self) -> usize {
        lock(&self.open).len()
    }
}

impl AddressPermit {
    /// The address this connection is counted under.
    pub fn key(&self) -> AddrKey {
        self.key
    }
}

impl Drop for AddressPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

// ---- bytes held before authentication ----------------------------------------------------

/// A number of bytes shared by many holders: what all streams not yet authenticated may
/// hold, together, of elements they have not finished sending. Each stream holds its
/// part through a [`BudgetShare`].
#[derive(Debug)]
pub struct ByteBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held now, by all shares together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A new limit for what shares take from now on (what they hold stays held).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }
}

/// One holder's part of a [`ByteBudget`]; given back when dropped.
#[derive(Debug)]
pub struct BudgetShare {
    budget: Arc<ByteBudget>,
    held: usize,
}

impl BudgetShare {
    pub fn new(budget: Arc<ByteBudget>) -> BudgetShare {
        BudgetShare { budget, held: 0 }
    }

    /// Makes this share hold `bytes` (more or less than before). False when the budget has
    /// not that much left: the share then keeps what it held.
    pub fn hold(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            self.budget
                .used
                .fetch_sub(self.held - bytes, Ordering::Relaxed);
            self.held = bytes;
            return true;
        }
        let more = bytes - self.held;
        let limit = self.budget.limit();
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(more).filter(|total| *total <= limit)
            });
        if taken.is_err() {
            return false;
        }
        self.held = bytes;
        true
    }

    /// Bytes this share holds.
    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.hold(0);
    }
}

// ---- events per key within a minute ------------------------------------------------------

/// The window events are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Longest run of event times kept for one key, whatever the limit.
const MAX_TIMES: usize = 1024;

struct Entry {
    /// Event times, oldest first, at most the limit in force when they were added.
    times: VecDeque<Instant>,
    /// Which insertion this entry is, to tell stale eviction-queue items from live ones.
    generation: u64,
}

struct Table<K> {
    entries: HashMap<K, Entry>,
    /// Entries in the order they were created: the eviction order.
    order: VecDeque<(K, u64)>,
    next_generation: u64,
}

/// Events per key in a sliding window of a minute: for each key the times of its most
/// recent events, at most as many as the limit (older ones cannot matter). A key is
/// blocked while it has `limit` events within the last minute. The table holds at most
/// `capacity` keys; beyond that the key that first appeared earliest is forgotten, so a
/// flood of keys costs bounded memory (it can only make the limiter forget, never block
/// a key that had no events).
pub struct WindowLimiter<K> {
    table: Mutex<Table<K>>,
    capacity: usize,
}

impl<K: Clone + Eq + Hash> WindowLimiter<K> {
    pub fn with_capacity(capacity: usize) -> WindowLimiter<K> {
        WindowLimiter {
            table: Mutex::new(Table {
                entries: HashMap::new(),
                order: VecDeque::new(),
                next_generation: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    /// Whether `key` has had `limit` events within [`WINDOW`] before `now`. A limit of 0
    /// blocks nothing.
    pub fn is_blocked(&self, key: &K, limit: u32, now: Instant) -> bool {
        if limit == 0 {
            return false;
        }
        let table = lock(&self.table);
        let Some(entry) = table.entries.get(key) else {
            return false;
        };
        let recent = entry
            .times
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < WINDOW)
            .count();
        recent >= limit as usize
    }

    /// Records an event of `key` at `now`.
    pub fn record(&self, key: &K, limit: u32, now: Instant) {
        if limit == 0 {
            return;
        }
        let keep = (limit as usize).min(MAX_TIMES);
        let mut guard = lock(&self.table);
        let table = &mut *guard;
        if !table.entries.contains_key(key) {
            if table.entries.len() >= self.capacity {
                table.make_room(self.capacity, now);
            }
            let generation = table.next_generation;
            table.next_generation += 1;
            table.entries.insert(
                key.clone(),
                Entry {
                    times: VecDeque::new(),
                    generation,
                },
            );
            table.order.push_back((key.clone(), generation));
        }
        if let Some(entry) = table.entries.get_mut(key) {
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

    /// Records an event of `key` unless it is blocked; false (and nothing recorded) if
    /// it is.
    pub fn try_record(&self, key: &K, limit: u32, now: Instant) -> bool {
        if self.is_blocked(key, limit, now) {
            return false;
        }
        self.record(key, limit, now);
        true
    }

    /// Keys currently remembered (for tests and statistics).
    pub fn len(&self) -> usize {
        lock(&self.table).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Clone + Eq + Hash> Table<K> {
    /// Frees at least one place: first every key whose events are all older than the
    /// window, else the oldest entry.
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
    fn connections_are_counted_per_address_and_given_back() {
        let l = ConnectionLimiter::new();
        let a = ip("192.0.2.1");
        let held: Vec<_> = (0..3).map(|_| l.try_acquire(a, 3).unwrap()).collect();
        assert!(l.try_acquire(a, 3).is_none());
        // Another address has its own count; IPv6 counts per /64.
        let v6: Vec<_> = (1..=3)
            .map(|i| l.try_acquire(ip(&format!("2001:db8::{i}")), 3).unwrap())
            .collect();
        assert!(l.try_acquire(ip("2001:db8::ffff:1"), 3).is_none());
        assert!(l.try_acquire(ip("2001:db8:0:1::1"), 3).is_some());
        assert_eq!(l.count(ip("2001:db8::77")), 3);
        // Limit 0 refuses nothing but still counts.
        let more = l.try_acquire(a, 0).unwrap();
        assert_eq!(l.count(a), 4);
        drop(more);
        drop(held);
        drop(v6);
        assert_eq!(l.count(a), 0);
        // Nothing is left behind for addresses without connections.
        assert_eq!(l.addresses(), 0);
        assert!(l.try_acquire(a, 1).is_some());
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = ByteBudget::new(100);
        let mut a = BudgetShare::new(budget.clone());
        let mut b = BudgetShare::new(budget.clone());
        assert!(a.hold(60));
        assert!(!b.hold(41));
        assert_eq!(b.held(), 0);
        assert!(b.hold(40));
        assert_eq!(budget.used(), 100);
        // Less is always possible, and frees room for others.
        assert!(a.hold(10));
        assert!(b.hold(90));
        drop(b);
        assert_eq!(budget.used(), 10);
        assert!(!a.hold(101));
        assert_eq!(a.held(), 10);
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn blocks_at_the_limit_within_the_window() {
        let l = WindowLimiter::with_capacity(16);
        let t0 = Instant::now();
        let a = "a.example".to_string();
        for i in 0..3 {
            assert!(!l.is_blocked(&a, 3, t0), "blocked after {i} events");
            assert!(l.try_record(&a, 3, t0 + Duration::from_secs(i)));
        }
        assert!(!l.try_record(&a, 3, t0 + Duration::from_secs(3)));
        assert!(!l.is_blocked(&"b.example".to_string(), 3, t0));
        assert!(!l.is_blocked(&a, 0, t0));
        assert!(!l.is_blocked(&a, 3, t0 + WINDOW));
        assert!(l.is_blocked(&a, 3, t0 + WINDOW - Duration::from_millis(1)));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_keys() {
        let l = WindowLimiter::with_capacity(100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            l.record(&i, 1000, t0);
            assert!(l.len() <= 100);
        }
        let order = lock(&l.table).order.len();
        assert!(order <= 2 * 100 + 64, "eviction queue grew to {order}");
        // The newest keys are still remembered, the oldest forgotten.
        assert!(l.is_blocked(&9_999, 1, t0));
        assert!(!l.is_blocked(&0, 1, t0));
        // Event times per key are bounded by the limit.
        for _ in 0..50 {
            l.record(&u32::MAX, 5, t0);
        }
        assert_eq!(lock(&l.table).entries[&u32::MAX].times.len(), 5);
    }

    #[test]
    fn expired_keys_make_room_first() {
        let l = WindowLimiter::with_capacity(2);
        let t0 = Instant::now();
        l.record(&1, 3, t0);
        l.record(&2, 3, t0 + WINDOW);
        // 1's event has expired, so it makes room; 2 stays.
        l.record(&3, 3, t0 + WINDOW + Duration::from_secs(1));
        assert_eq!(l.len(), 2);
        assert!(l.is_blocked(&2, 1, t0 + WINDOW));
    }
}
