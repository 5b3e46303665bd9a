//! The bookkeeping of a pipelined group commit, without I/O. The shard writes a batch of
//! records and hands its fdatasync to another thread ([`crate::chat::log::SyncJob`]); while
//! that runs, the shard goes on reading, sequencing and appending the next batch. At most one
//! batch is in flight. What needs care is the engine's dead marks (acknowledged or superseded
//! records): one may reach the log only once every record the engine produced before it is
//! durable, or a crash could delete an entry whose acknowledgement never became durable. So a
//! mark made while records wait to be taken rides with the next batch; one made while only a
//! batch is in flight rides with that batch; one made with nothing outstanding applies at once.

/// See the module documentation.
#[derive(Debug, Default)]
pub struct CommitPipeline {
    in_flight: Option<InFlight>,
    next_dead: Vec<u64>,
}

#[derive(Debug)]
struct InFlight {
    lsns: Vec<u64>,
    dead: Vec<u64>,
}

impl CommitPipeline {
    /// Nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a batch's sync is running.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Dead marks the engine just produced, while `records_waiting` (the engine holds records
    /// not yet taken). Returns the marks that may be applied to the log now.
    pub fn dead(&mut self, dead: Vec<u64>, records_waiting: bool) -> Vec<u64> {
        if dead.is_empty() {
            return dead;
        }
        if records_waiting {
            self.next_dead.extend(dead);
            Vec::new()
        } else if let Some(f) = &mut self.in_flight {
            f.dead.extend(dead);
            Vec::new()
        } else {
            dead
        }
    }

    /// A batch was taken, appended at `lsns` and its sync started.
    pub fn started(&mut self, lsns: Vec<u64>) {
        debug_assert!(self.in_flight.is_none(), "one batch in flight at a time");
        self.in_flight = Some(InFlight {
            lsns,
            dead: std::mem::take(&mut self.next_dead),
        });
    }

    /// The batch's sync succeeded: its Lsns (for the engine's `handle_committed`) and the dead
    /// marks that may now be applied. `None` if nothing was in flight.
    pub fn finished(&mut self) -> Option<(Vec<u64>, Vec<u64>)> {
        self.in_flight.take().map(|f| (f.lsns, f.dead))
    }

    /// Marks held for later.
    #[cfg(test)]
    fn held_dead(&self) -> usize {
        self.next_dead.len() + self.in_flight.as_ref().map_or(0, |f| f.dead.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_wait_for_everything_produced_before_them() {
        let mut p = CommitPipeline::new();
        // Nothing outstanding: at once.
        assert_eq!(p.dead(vec![1], false), vec![1]);
        // Records waiting: with the next batch, not the one in flight.
        p.started(vec![10, 11]);
        assert!(p.dead(vec![2], true).is_empty());
        // Only the batch in flight is outstanding: with it.
        assert!(p.dead(vec![3], false).is_empty());
        assert_eq!(p.held_dead(), 2);
        assert_eq!(p.finished(), Some((vec![10, 11], vec![3])));
        p.started(vec![12]);
        assert_eq!(p.finished(), Some((vec![12], vec![2])));
        assert_eq!(p.finished(), None);
        assert_eq!(p.held_dead(), 0);
    }
}
