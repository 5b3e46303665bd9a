//! A limit on guessing join codes: each client address may fail to find a meeting at most
//! `per_minute` times in a fixed one-minute window. A code has about 45 bits, so guessing is
//! hopeless at this rate; the limit keeps someone from trying anyway at line rate.
//!
//! Behind a reverse proxy every client shares the proxy's address; raise the limit there (or
//! set it to 0, off) and rate-limit at the proxy.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; beyond this, expired windows are dropped, then the table is
/// cleared (a flood of addresses must not grow memory without bound).
const MAX_TRACKED: usize = 65_536;

/// Failed lookups per address in the current window.
#[derive(Debug)]
pub struct JoinGuard {
    per_minute: u32,
    failures: HashMap<IpAddr, (Instant, u32)>,
}

impl JoinGuard {
    /// `per_minute` 0 turns the limit off.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            failures: HashMap::new(),
        }
    }

    /// Whether `addr` may look up a code now.
    pub fn allows(&self, addr: IpAddr, now: Instant) -> bool {
        match self.failures.get(&addr) {
            Some(&(start, n)) if self.per_minute > 0 && now < start + WINDOW => n < self.per_minute,
            _ => true,
        }
    }

    /// Counts a lookup by `addr` that found no meeting.
    pub fn handle_failure(&mut self, addr: IpAddr, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        if self.failures.len() >= MAX_TRACKED {
            self.failures.retain(|_, (start, _)| now < *start + WINDOW);
            if self.failures.len() >= MAX_TRACKED {
                self.failures.clear();
            }
        }
        let e = self.failures.entry(addr).or_insert((now, 0));
        if now >= e.0 + WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_failures_per_address_per_window() {
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        let mut g = JoinGuard::new(3);
        for _ in 0..3 {
            assert!(g.allows(a, t0));
            g.handle_failure(a, t0);
        }
        assert!(!g.allows(a, t0 + Duration::from_secs(59)));
        assert!(g.allows(b, t0), "per address");
        assert!(g.allows(a, t0 + WINDOW), "a new window");
        g.handle_failure(a, t0 + WINDOW);
        assert!(g.allows(a, t0 + WINDOW));
        let off = JoinGuard::new(0);
        assert!(off.allows(a, t0));
    }
}
