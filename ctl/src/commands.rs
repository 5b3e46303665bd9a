//! Per-relay command queues, drained by the relays' long polls
//! (`GET /v1/relays/{id}/commands`). Delivery is at most once: a command leaves its queue when
//! it is handed to a poll.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// Commands waiting for one relay beyond this are dropped, oldest first, and counted: a relay
/// that stops polling must not grow ctl's memory without bound.
pub const MAX_QUEUED: usize = 4096;
/// At most this many commands are handed out per poll; the rest wait for the next one.
pub const MAX_PER_POLL: usize = 256;

/// One instruction for a relay, as it goes over the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Stop forwarding for this participant and forget its binding.
    RemoveParticipant { room: u64, participant: u64 },
    /// Drop the room and every participant in it, and refuse the room's tokens that expire at
    /// or before `fence` (unix seconds): every token issued before the command. Tokens issued
    /// later expire later, so the room can come back to the relay with fresh tokens.
    CloseRoom { room: u64, fence: u64 },
    /// Take nothing new; keep existing rooms.
    Drain,
    /// Back into service.
    Undrain,
}

/// The queues of every relay.
#[derive(Debug, Default)]
pub struct Queues {
    by_relay: HashMap<u32, VecDeque<Command>>,
    /// Relays whose queue went from empty to non-empty since the last `poll_woken`.
    woken: Vec<u32>,
    n_dropped: u64,
}

impl Queues {
    /// Queues `cmd` for `relay_id`.
    pub fn push(&mut self, relay_id: u32, cmd: Command) {
        let q = self.by_relay.entry(relay_id).or_default();
        if q.is_empty() {
            self.woken.push(relay_id);
        }
        if q.len() >= MAX_QUEUED {
            q.pop_front();
            self.n_dropped += 1;
        }
        q.push_back(cmd);
    }

    /// Takes up to [`MAX_PER_POLL`] commands for `relay_id`, oldest first.
    pub fn take(&mut self, relay_id: u32) -> Vec<Command> {
        let Some(q) = self.by_relay.get_mut(&relay_id) else {
            return Vec::new();
        };
        let n = q.len().min(MAX_PER_POLL);
        let out: Vec<Command> = q.drain(..n).collect();
        if q.is_empty() {
            self.by_relay.remove(&relay_id);
        }
        out
    }

    /// Forgets everything queued for a relay (it died; its rooms moved elsewhere).
    pub fn clear(&mut self, relay_id: u32) {
        if let Some(q) = self.by_relay.remove(&relay_id) {
            self.n_dropped += q.len() as u64;
        }
    }

    /// The next relay with newly queued commands, for the driver to wake its pollers.
    pub fn poll_woken(&mut self) -> Option<u32> {
        self.woken.pop()
    }

    /// Commands waiting for one relay.
    pub fn pending(&self, relay_id: u32) -> usize {
        self.by_relay.get(&relay_id).map_or(0, VecDeque::len)
    }

    /// Commands waiting, over all relays.
    pub fn n_queued(&self) -> usize {
        self.by_relay.values().map(VecDeque::len).sum()
    }

    /// Commands dropped so far (overflow, or the relay died).
    pub fn n_dropped(&self) -> u64 {
        self.n_dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_matches_the_relay_contract() {
        let cmds = [
            Command::RemoveParticipant {
                room: 1,
                participant: 2,
            },
            Command::CloseRoom { room: 1, fence: 9 },
            Command::Drain,
            Command::Undrain,
        ];
        assert_eq!(
            serde_json::to_string(&cmds).unwrap(),
            r#"[{"type":"remove_participant","room":1,"participant":2},{"type":"close_room","room":1,"fence":9},{"type":"drain"},{"type":"undrain"}]"#
        );
    }

    #[test]
    fn queues_are_fifo_bounded_and_wake_once() {
        let mut q = Queues::default();
        q.push(7, Command::Drain);
        q.push(7, Command::Undrain);
        assert_eq!(q.poll_woken(), Some(7));
        assert_eq!(q.poll_woken(), None, "one wake per empty -> non-empty");
        assert_eq!(q.take(7), vec![Command::Drain, Command::Undrain]);
        assert!(q.take(7).is_empty(), "at most once");
        for room in 0..MAX_QUEUED as u64 + 1 {
            q.push(1, Command::CloseRoom { room, fence: 9 });
        }
        assert_eq!(q.n_dropped(), 1);
        assert_eq!(q.take(1)[0], Command::CloseRoom { room: 1, fence: 9 });
        q.clear(1);
        assert_eq!(q.n_queued(), 0);
    }
}
