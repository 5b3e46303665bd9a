//! The bookkeeping of a pipelined group commit, without I/O. The shard writes a batch of
//! records and hands its fdatasync to another thread ([`crate::chat::log::SyncJob`]); while
//! that runs, the shard goes on reading, sequencing and appending the next batch. At most one
//! batch is in flight. What needs care is the engine's dead marks (acknowledged or superseded
//! records): one may reach the log only once every record the engine produced before it is
//! durable, or a crash could delete an entry whose acknowledgement never became durable. So a
//! mark made while records wait to be taken rides with the next batch; one made while only a
//! batch is in flight rides with that batch; one made with nothing outstanding applies at once.

use crate::chat::log::Lsn;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct CommitPipeline {
    in_flight: Option<InFlight>,
    next_dead: Vec<Lsn>,
    /// The emptied lists of the last batch ([`CommitPipeline::give_back`]).
    spare: InFlight,
}

#[derive(Debug, Default)]
struct InFlight {
    lsns: Vec<Lsn>,
    dead: Vec<Lsn>,
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
    /// not yet taken). Moves the marks that must wait out of `dead`; what stays there may be
    /// applied to the log now.
    pub fn dead(&mut self, dead: &mut Vec<Lsn>, records_waiting: bool) {
        if records_waiting {
            self.next_dead.append(dead);
        } else if let Some(f) = &mut self.in_flight {
            f.dead.append(dead);
        }
    }

    /// An empty list for the Lsns of the next batch.
    pub fn lsn_list(&mut self) -> Vec<Lsn> {
        std::mem::take(&mut self.spare.lsns)
    }

    /// A batch was taken, appended at `lsns` and its sync started.
    pub fn started(&mut self, lsns: Vec<Lsn>) {
        debug_assert!(self.in_flight.is_none(), "one batch in flight at a time");
        let dead = std::mem::replace(&mut self.next_dead, std::mem::take(&mut self.spare.dead));
        self.in_flight = Some(InFlight { lsns, dead });
    }

    /// The batch's sync succeeded: its Lsns (for the engine's `handle_committed`) and the dead
    /// marks that may now be applied. `None` if nothing was in flight.
    pub fn finished(&mut self) -> Option<(Vec<Lsn>, Vec<Lsn>)> {
        self.in_flight.take().map(|f| (f.lsns, f.dead))
    }

    /// The lists [`CommitPipeline::finished`] returned, done with.
    pub fn give_back(&mut self, mut lsns: Vec<Lsn>, mut dead: Vec<Lsn>) {
        lsns.clear();
        dead.clear();
        // A checkpoint's batch can be as long as there are chats: not kept.
        if lsns.capacity().max(dead.capacity()) <= crate::chat::MAX_KEPT_LEN {
            self.spare = InFlight { lsns, dead };
        }
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
        let l = |v: &[u64]| v.iter().map(|&n| Lsn(n)).collect::<Vec<Lsn>>();
        let dead = |p: &mut CommitPipeline, marks: &[u64], waiting: bool| {
            let mut v = l(marks);
            p.dead(&mut v, waiting);
            v
        };
        // Nothing outstanding: at once.
        assert_eq!(dead(&mut p, &[1], false), l(&[1]));
        // Records waiting: with the next batch, not the one in flight.
        p.started(l(&[10, 11]));
        assert!(dead(&mut p, &[2], true).is_empty());
        // Only the batch in flight is outstanding: with it.
        assert!(dead(&mut p, &[3], false).is_empty());
        assert_eq!(p.held_dead(), 2);
        let (lsns, marks) = p.finished().unwrap();
        assert_eq!((lsns.clone(), marks.clone()), (l(&[10, 11]), l(&[3])));
        // Lists given back are reused empty.
        p.give_back(lsns, marks);
        let list = p.lsn_list();
        assert!(list.is_empty() && list.capacity() >= 2);
        p.started(l(&[12]));
        assert_eq!(p.finished(), Some((l(&[12]), l(&[2]))));
        assert_eq!(p.finished(), None);
        assert_eq!(p.held_dead(), 0);
    }
}
