//! Failed logins per source address, across connections (DESIGN: "auth failures per IP
//! per minute"). The per-stream limit (`auth.max_failures_per_stream`) only makes a
//! guesser reconnect; this one makes guessing from one address slow.
//!
//! A sliding window ([`WindowLimiter`]) keyed by [`AddrKey`]: an address is refused while
//! it has `limit` failures within the last minute. The table holds at most
//! [`MAX_ADDRESSES`] addresses; beyond that the address that first appeared earliest is
//! forgotten, so a flood of addresses costs bounded memory (it can only make the
//! limiter forget, never refuse someone who did not fail).

use std::net::IpAddr;
use std::time::Instant;

use confab_protocol::limits::WindowLimiter;
pub use confab_protocol::limits::{AddrKey, WINDOW};

/// Addresses remembered at most.
pub const MAX_ADDRESSES: usize = 65_536;

/// Failed logins by source address.
pub struct AuthLimiter {
    window: WindowLimiter<AddrKey>,
}

impl Default for AuthLimiter {
    fn default() -> Self {
        AuthLimiter::with_capacity(MAX_ADDRESSES)
    }
}

impl AuthLimiter {
    pub fn with_capacity(capacity: usize) -> AuthLimiter {
        AuthLimiter {
            window: WindowLimiter::with_capacity(capacity),
        }
    }

    /// Whether `ip` has used up its failures: `limit` of them within [`WINDOW`] before
    /// `now`. A limit of 0 turns the check off.
    pub fn is_blocked(&self, ip: IpAddr, limit: u32, now: Instant) -> bool {
        self.window.is_blocked(&AddrKey::new(ip), limit, now)
    }

    /// Records a failed login from `ip` at `now`.
    pub fn record_failure(&self, ip: IpAddr, limit: u32, now: Instant) {
        self.window.record(&AddrKey::new(ip), limit, now)
    }

    /// Addresses currently remembered (for tests and statistics).
    pub fn len(&self) -> usize {
        self.window.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        // The newest addresses are still remembered, the oldest forgotten.
        assert!(l.is_blocked(
            IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 9_999)),
            1,
            t0
        ));
        assert!(!l.is_blocked(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000)), 1, t0));
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
