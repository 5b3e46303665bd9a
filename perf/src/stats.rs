//! Pure bookkeeping of what subscribers received: per-stream loss, duplicates and reordering,
//! one-way latency histograms, and the median over runs.
#![forbid(unsafe_code)]

use hdrhistogram::Histogram;

/// Highest latency the histogram resolves; anything slower is recorded as this.
const LATENCY_MAX_NS: u64 = 10_000_000_000;

/// What one (subscriber, publisher) stream has delivered in a step. The sequence space is
/// bounded by the number of packets the publisher was asked to send, so the bitmap is too.
#[derive(Clone, Debug)]
pub struct StreamTracker {
    seen: Vec<u64>,
    limit: u64,
    highest: Option<u64>,
    /// Distinct sequence numbers received.
    pub unique: u64,
    /// Copies of a sequence number already received.
    pub duplicates: u64,
    /// Packets that arrived after a higher sequence number of the same stream.
    pub reordered: u64,
    /// Sequence numbers the publisher never sent (a corrupted or foreign payload).
    pub invalid: u64,
}

impl StreamTracker {
    /// A tracker for sequence numbers `0..limit`.
    pub fn new(limit: u64) -> Self {
        Self {
            seen: vec![0; limit.div_ceil(64) as usize],
            limit,
            highest: None,
            unique: 0,
            duplicates: 0,
            reordered: 0,
            invalid: 0,
        }
    }

    /// Accounts one received packet carrying `seq`.
    pub fn record(&mut self, seq: u64) {
        if seq >= self.limit {
            self.invalid += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.unique += 1;
        match self.highest {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
    }
}

/// One-way latency samples in nanoseconds.
#[derive(Clone, Debug)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // Three significant digits: 0.1% resolution, enough for p99.9 comparisons.
        Self(Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("static, valid bounds"))
    }
}

impl Latency {
    /// Records one sample; a receive clock behind the send clock (impossible with one
    /// CLOCK_MONOTONIC, but cheap to guard) counts as 1 ns.
    pub fn record(&mut self, sent_ns: u64, received_ns: u64) {
        self.0
            .saturating_record(received_ns.saturating_sub(sent_ns).max(1));
    }

    /// p50, p99, p99.9 and max in microseconds; `None` without samples.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.0.is_empty() {
            return None;
        }
        let us = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        Some(LatencySummary {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: self.0.max() as f64 / 1000.0,
        })
    }
}

/// Latency quantiles of one measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencySummary {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

/// Median of the finite values; the mean of the middle two for an even count.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_unique_duplicates_reordering_and_invalid() {
        let mut t = StreamTracker::new(100);
        for seq in [0, 1, 3, 2, 2, 5, 4, 99, 100, 1 << 40] {
            t.record(seq);
        }
        assert_eq!(t.unique, 7);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.reordered, 2, "2 after 3 and 4 after 5");
        assert_eq!(t.invalid, 2);
    }

    #[test]
    fn empty_limit_accepts_nothing() {
        let mut t = StreamTracker::new(0);
        t.record(0);
        assert_eq!((t.unique, t.invalid), (0, 1));
    }

    #[test]
    fn latency_quantiles_in_microseconds() {
        let mut l = Latency::default();
        assert!(l.summary().is_none());
        for i in 1..=1000u64 {
            l.record(0, i * 1000);
        }
        l.record(5_000, 1_000); // clock behind: clamped to 1 ns, not a panic
        let s = l.summary().unwrap();
        assert!((s.p50_us - 500.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() <= 1.0, "{s:?}");
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([f64::NAN]), None);
        assert_eq!(median(std::iter::empty()), None);
    }
}
