//! Bounded search for the highest zero-loss rate: grow geometrically until a step loses
//! packets, then bisect between the best clean rate and the lowest lossy one. Pure: the caller
//! runs each step and reports whether it was clean.
#![forbid(unsafe_code)]

/// Search state. Rates are publisher packets per second.
#[derive(Clone, Debug)]
pub struct RateSearch {
    start_pps: u64,
    max_pps: u64,
    /// Stop bisecting when the bracket is narrower than this fraction of its upper end.
    precision: f64,
    max_steps: usize,
    steps: usize,
    good_pps: Option<u64>,
    bad_pps: Option<u64>,
}

impl RateSearch {
    /// A search starting at `start_pps`, never above `max_pps`, at most `max_steps` steps.
    pub fn new(start_pps: u64, max_pps: u64, precision: f64, max_steps: usize) -> Self {
        Self {
            start_pps: start_pps.clamp(1, max_pps.max(1)),
            max_pps: max_pps.max(1),
            precision,
            max_steps,
            steps: 0,
            good_pps: None,
            bad_pps: None,
        }
    }

    /// The next rate to try, or `None` when the search is over.
    pub fn poll_rate(&self) -> Option<u64> {
        if self.steps >= self.max_steps {
            return None;
        }
        let lo = self.good_pps.unwrap_or(0);
        match self.bad_pps {
            None if self.good_pps.is_none() => Some(self.start_pps),
            None if lo >= self.max_pps => None,
            None => Some((lo * 2).min(self.max_pps)),
            Some(hi) => {
                let width = hi.saturating_sub(lo);
                let tolerance = ((hi as f64 * self.precision) as u64).max(1);
                (width > tolerance).then_some(lo + width / 2)
            }
        }
    }

    /// Reports the outcome of a step at `rate_pps`.
    pub fn handle_result(&mut self, rate_pps: u64, clean: bool) {
        self.steps += 1;
        if clean {
            self.good_pps = Some(self.good_pps.map_or(rate_pps, |g| g.max(rate_pps)));
        } else {
            self.bad_pps = Some(self.bad_pps.map_or(rate_pps, |b| b.min(rate_pps)));
        }
    }

    /// The highest rate that ran clean so far.
    pub fn best_pps(&self) -> Option<u64> {
        self.good_pps
    }

    /// Steps run so far.
    #[cfg(test)]
    pub fn steps(&self) -> usize {
        self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a search against a system that is clean up to `limit` pps.
    fn run(mut s: RateSearch, limit: u64) -> RateSearch {
        while let Some(r) = s.poll_rate() {
            s.handle_result(r, r <= limit);
        }
        s
    }

    #[test]
    fn brackets_the_limit_within_precision() {
        let s = run(RateSearch::new(1_000, 1_000_000, 0.05, 30), 37_000);
        let best = s.best_pps().unwrap();
        assert!(best <= 37_000 && best as f64 >= 37_000.0 * 0.95, "{best}");
        assert!(s.steps() < 15, "{} steps", s.steps());
    }

    #[test]
    fn stops_at_the_cap_when_nothing_fails() {
        let s = run(RateSearch::new(1_000, 5_000, 0.05, 30), u64::MAX);
        assert_eq!(s.best_pps(), Some(5_000));
    }

    #[test]
    fn bisects_below_a_failing_start_and_respects_the_step_bound() {
        let s = run(RateSearch::new(1_000, 5_000, 0.05, 30), 300);
        assert!(matches!(s.best_pps(), Some(b) if (250..=300).contains(&b)));
        let s = run(RateSearch::new(1_000, 5_000, 0.05, 3), 0);
        assert_eq!((s.best_pps(), s.steps()), (None, 3));
    }
}
