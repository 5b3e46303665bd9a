//! Cross-shard mailboxes: one bounded SPSC ring per (sender, receiver) pair of shards, and an
//! eventfd per shard to wake it when it sleeps. A sender writes the eventfd only when the
//! receiver has announced that it is about to sleep, so a busy receiver costs no syscalls.

use crate::chat::msg::ShardMsg;
use crate::ring::{self, Consumer, Producer};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

/// Messages per ring.
pub const RING_CAPACITY: usize = 4096;
/// The range `[chat] ring_capacity` may take.
pub const RING_CAPACITY_RANGE: std::ops::RangeInclusive<usize> = 16..=65_536;
/// Messages a shard takes from its rings per loop turn.
pub const MAX_RECV_PER_TURN: usize = 4096;

/// Wakes one shard.
pub struct Waker {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Waker {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    /// The descriptor the owning shard polls.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter (EAGAIN) means
        // a wake-up is already pending, which is all we need.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears pending wake-ups.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN when nothing is pending is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// One shard's ends of every ring.
pub struct Mailbox {
    me: usize,
    inbound: Vec<Option<Consumer<ShardMsg>>>,
    outbound: Vec<Option<Producer<ShardMsg>>>,
    /// Messages a full ring refused, retried first next turn, in order.
    overflow: Vec<VecDeque<ShardMsg>>,
    /// Messages that went to `overflow` since the start.
    spilled: u64,
    /// The inbound ring `receive` starts with, rotating, so that one full ring cannot take
    /// the whole per-turn budget every turn.
    first_inbound: usize,
    wakers: Arc<Vec<Waker>>,
    to_wake: Vec<bool>,
}

/// Builds the mailboxes of `n` shards, each ring holding `capacity` messages.
pub fn mailboxes(n: usize, capacity: usize) -> io::Result<Vec<Mailbox>> {
    let wakers: Arc<Vec<Waker>> =
        Arc::new((0..n).map(|_| Waker::new()).collect::<io::Result<_>>()?);
    let mut boxes: Vec<Mailbox> = (0..n)
        .map(|me| Mailbox {
            me,
            inbound: (0..n).map(|_| None).collect(),
            outbound: (0..n).map(|_| None).collect(),
            overflow: (0..n).map(|_| VecDeque::new()).collect(),
            spilled: 0,
            first_inbound: 0,
            wakers: wakers.clone(),
            to_wake: vec![false; n],
        })
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (p, c) = ring::ring(capacity);
                boxes[from].outbound[to] = Some(p);
                boxes[to].inbound[from] = Some(c);
            }
        }
    }
    Ok(boxes)
}

impl Mailbox {
    /// This shard's waker.
    pub fn waker(&self) -> &Waker {
        &self.wakers[self.me]
    }

    /// Queues `m` for shard `to`. Never loses it: a full ring spills into a local queue that
    /// is retried first; the caller stops reading clients while [`Mailbox::backlogged`].
    pub fn send(&mut self, to: u16, m: ShardMsg) {
        let to = usize::from(to);
        if !self.overflow[to].is_empty() {
            self.overflow[to].push_back(m);
            self.spilled += 1;
            return;
        }
        let ring = self.outbound[to]
            .as_mut()
            .expect("no ring to self: local messages stay local");
        if let Err(m) = ring.push(m) {
            self.overflow[to].push_back(m);
            self.spilled += 1;
        }
        self.to_wake[to] = true;
    }

    /// Retries spilled messages and wakes every shard sent to since the last flush.
    pub fn flush(&mut self) {
        for to in 0..self.overflow.len() {
            while let Some(m) = self.overflow[to].pop_front() {
                let ring = self.outbound[to]
                    .as_mut()
                    .expect("overflow only for other shards");
                if let Err(m) = ring.push(m) {
                    self.overflow[to].push_front(m);
                    break;
                }
                self.to_wake[to] = true;
            }
        }
        // Pair with the receiver's fence in `prepare_sleep`: either it sees our messages or we
        // see that it sleeps.
        fence(Ordering::SeqCst);
        for to in 0..self.to_wake.len() {
            if std::mem::take(&mut self.to_wake[to])
                && self.wakers[to].sleeping.load(Ordering::SeqCst)
            {
                self.wakers[to].wake();
            }
        }
    }

    /// Messages that found their ring full and waited in a spill queue, since the start.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Whether messages wait in the spill queues.
    pub fn backlogged(&self) -> bool {
        self.overflow.iter().any(|q| !q.is_empty())
    }

    /// Takes up to [`MAX_RECV_PER_TURN`] messages from the inbound rings, starting each turn
    /// with the next ring in turn (each ring keeps its order).
    pub fn receive(&mut self, mut handle: impl FnMut(ShardMsg)) -> usize {
        let rings = self.inbound.len();
        let first = self.first_inbound % rings.max(1);
        self.first_inbound = first + 1;
        let mut n = 0;
        for k in 0..rings {
            let Some(c) = self.inbound[(first + k) % rings].as_mut() else {
                continue;
            };
            while n < MAX_RECV_PER_TURN {
                let Some(m) = c.pop() else { break };
                handle(m);
                n += 1;
            }
        }
        n
    }

    /// Messages waiting in the spill queues now.
    pub fn spill_depth(&self) -> usize {
        self.overflow.iter().map(VecDeque::len).sum()
    }

    /// Announces that this shard is about to sleep; returns false (and cancels) when a
    /// message is already waiting.
    pub fn prepare_sleep(&mut self) -> bool {
        let w = &self.wakers[self.me];
        w.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.inbound.iter_mut().flatten().any(|c| c.peek_nonempty()) {
            w.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Marks this shard awake.
    pub fn woke(&self) {
        self.wakers[self.me].sleeping.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(user: u64) -> ShardMsg {
        ShardMsg::BacklogCancel { user }
    }

    fn user(m: &ShardMsg) -> u64 {
        match m {
            ShardMsg::BacklogCancel { user } => *user,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_ring_does_not_starve_the_others_and_spills_keep_order() {
        let mut boxes = mailboxes(3, 2 * MAX_RECV_PER_TURN).unwrap();
        let mut b2 = boxes.pop().unwrap();
        let mut b1 = boxes.pop().unwrap();
        let mut b0 = boxes.pop().unwrap();
        // Shard 0 sends more than one turn's budget (and more than its ring: the rest
        // spills), shard 2 one message.
        let n0 = 2 * MAX_RECV_PER_TURN as u64 + 10;
        for u in 0..n0 {
            b0.send(1, msg(u));
        }
        assert_eq!(b0.spill_depth(), 10);
        assert_eq!(b0.spilled(), 10);
        assert!(b0.backlogged());
        b2.send(1, msg(u64::MAX));
        let mut turns: Vec<Vec<u64>> = Vec::new();
        while turns.len() < 4 {
            let mut got = Vec::new();
            b1.receive(|m| got.push(user(&m)));
            b0.flush();
            turns.push(got);
        }
        // The first turn is shard 0's budget; the second starts with shard 2's ring.
        assert_eq!(turns[0].len(), MAX_RECV_PER_TURN);
        assert_eq!(turns[1].first(), Some(&u64::MAX));
        // Shard 0's messages arrive once each, in order, spilled ones included.
        let from0: Vec<u64> = turns
            .concat()
            .into_iter()
            .filter(|&u| u != u64::MAX)
            .collect();
        assert_eq!(from0, (0..n0).collect::<Vec<_>>());
        assert_eq!(b0.spill_depth(), 0);
        assert!(!b0.backlogged());
    }
}
