//! Rate limiting for participants: a token bucket in packets and one in bytes.

/// A token bucket with `rate_per_s` tokens per second and a depth of `burst` tokens.
/// Tokens are kept in millionths so that refills at microsecond resolution lose nothing.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_s: u64,
    burst_micro: u64,
    tokens_micro: u64,
    last_us: u64,
}

impl TokenBucket {
    /// A full bucket. A `rate_per_s` of 0 disables the limit.
    pub fn new(rate_per_s: u64, burst: u64, now_us: u64) -> Self {
        let burst_micro = burst.saturating_mul(1_000_000);
        Self {
            rate_per_s,
            burst_micro,
            tokens_micro: burst_micro,
            last_us: now_us,
        }
    }

    /// Takes `n` tokens if available. Time going backwards is treated as no time passing.
    #[inline]
    pub fn try_take(&mut self, n: u64, now_us: u64) -> bool {
        if self.rate_per_s == 0 {
            return true;
        }
        let elapsed_us = now_us.saturating_sub(self.last_us);
        self.last_us = self.last_us.max(now_us);
        // rate tokens/s * elapsed us = rate * elapsed millionths of a token.
        let refill = self.rate_per_s.saturating_mul(elapsed_us);
        self.tokens_micro = self
            .tokens_micro
            .saturating_add(refill)
            .min(self.burst_micro);
        let cost = n.saturating_mul(1_000_000);
        if self.tokens_micro >= cost {
            self.tokens_micro -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_burst_then_rate() {
        let mut b = TokenBucket::new(100, 10, 0);
        assert_eq!((0..20).filter(|_| b.try_take(1, 0)).count(), 10);
        // 100/s: one token every 10 ms.
        assert!(!b.try_take(1, 9_000));
        assert!(b.try_take(1, 10_000));
        // A long pause refills at most the burst.
        assert_eq!((0..20).filter(|_| b.try_take(1, 10_000_000)).count(), 10);
    }

    #[test]
    fn zero_rate_is_unlimited_and_time_may_go_back() {
        let mut b = TokenBucket::new(0, 0, 0);
        assert!((0..1000).all(|_| b.try_take(1500, 0)));
        let mut b = TokenBucket::new(1000, 1, 50);
        assert!(b.try_take(1, 50));
        assert!(!b.try_take(1, 10), "clock going back refills nothing");
    }
}
