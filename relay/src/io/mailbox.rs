//! Cross-shard mailboxes: one bounded SPSC ring per (sender, receiver) pair of shards, and an
//! eventfd per shard to wake it when it sleeps. A sender writes the eventfd only when the
//! receiver has announced that it is about to sleep, so a busy receiver costs no syscalls.
//!
//! A sender that found a ring full (its messages spill, and its shard stops reading clients)
//! flags that ring; the receiver, after taking messages from a flagged ring, wakes the sender
//! if it sleeps. So a spilling shard sleeps until there is room instead of spinning, which on
//! a machine with fewer cores than threads would take the receiver's own CPU time.

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
    pub(crate) fn new() -> io::Result<Self> {
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

    pub(crate) fn wake(&self) {
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
    /// `blocked[from * n + to]`: shard `from` found its ring to `to` full and waits for room.
    blocked: Arc<Vec<AtomicBool>>,
    /// The inbound rings the last `receive` took messages from.
    took: Vec<bool>,
    /// This relay's number in its cluster (0 alone), the high byte of its shards' addresses.
    relay: u8,
    /// The shard's ends of the link thread's rings, when relays are linked.
    link: Option<LinkPort>,
}

/// A shard's ends of the rings to and from the link thread (`io::link`).
struct LinkPort {
    tx: Producer<(u16, ShardMsg)>,
    rx: Consumer<ShardMsg>,
    /// Messages for other relays the full ring refused, retried first, in order.
    overflow: VecDeque<(u16, ShardMsg)>,
    waker: Arc<Waker>,
    pushed: bool,
}

/// The link thread's ends of every shard's link rings.
pub struct LinkHub {
    /// Per shard: messages for shards on other relays, with their addresses.
    pub from_shards: Vec<Consumer<(u16, ShardMsg)>>,
    /// Per shard: messages that came over a link.
    pub to_shards: Vec<Producer<ShardMsg>>,
    shard_wakers: Arc<Vec<Waker>>,
    /// Wakes the link thread.
    pub waker: Arc<Waker>,
}

impl LinkHub {
    /// Wakes shard `i` if it sleeps (after pushing to it, or taking from it).
    pub fn wake_shard(&self, i: usize) {
        fence(Ordering::SeqCst);
        if self.shard_wakers[i].sleeping.load(Ordering::SeqCst) {
            self.shard_wakers[i].wake();
        }
    }

    /// Announces that the link thread is about to sleep; false (cancelled) when a shard has
    /// already queued something for it.
    pub fn prepare_sleep(&self) -> bool {
        self.waker.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.from_shards.iter().any(Consumer::peek_nonempty) {
            self.waker.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Marks the link thread awake and clears its wake-ups.
    pub fn woke(&self) {
        self.waker.sleeping.store(false, Ordering::SeqCst);
        self.waker.drain();
    }
}

/// Gives the shards of relay number `relay` their ends of the link thread's rings (each
/// `capacity` messages) and returns the link thread's ends.
pub fn link_ports(boxes: &mut [Mailbox], relay: u8, capacity: usize) -> io::Result<LinkHub> {
    let waker = Arc::new(Waker::new()?);
    let mut from_shards = Vec::new();
    let mut to_shards = Vec::new();
    for b in boxes.iter_mut() {
        let (tx, from) = ring::ring(capacity);
        let (to, rx) = ring::ring(capacity);
        from_shards.push(from);
        to_shards.push(to);
        b.relay = relay;
        b.link = Some(LinkPort {
            tx,
            rx,
            overflow: VecDeque::new(),
            waker: waker.clone(),
            pushed: false,
        });
    }
    Ok(LinkHub {
        from_shards,
        to_shards,
        shard_wakers: boxes.first().map(|b| b.wakers.clone()).unwrap_or_default(),
        waker,
    })
}

/// Builds the mailboxes of `n` shards, each ring holding `capacity` messages.
pub fn mailboxes(n: usize, capacity: usize) -> io::Result<Vec<Mailbox>> {
    let wakers: Arc<Vec<Waker>> =
        Arc::new((0..n).map(|_| Waker::new()).collect::<io::Result<_>>()?);
    let blocked: Arc<Vec<AtomicBool>> =
        Arc::new((0..n * n).map(|_| AtomicBool::new(false)).collect());
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
            blocked: blocked.clone(),
            took: vec![false; n],
            relay: 0,
            link: None,
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

    /// Queues `m` for the shard at address `to` (`chat::msg::addr`): on this relay by its
    /// ring, on another by the link thread. Never loses it here (a full ring spills).
    pub fn send_to(&mut self, to: u16, m: ShardMsg) {
        use crate::chat::msg::{addr_relay, addr_shard};
        if addr_relay(to) == self.relay {
            // An address from another relay (a session's home in a request) may name a shard
            // this relay does not have: dropped, never an index out of bounds.
            if usize::from(addr_shard(to)) < self.overflow.len() {
                self.send(addr_shard(to), m);
            }
            return;
        }
        let Some(link) = self.link.as_mut() else {
            debug_assert!(false, "an address on another relay without links");
            return;
        };
        if !link.overflow.is_empty() {
            link.overflow.push_back((to, m));
            self.spilled += 1;
            return;
        }
        if let Err(m) = link.tx.push((to, m)) {
            link.overflow.push_back(m);
            self.spilled += 1;
        }
        link.pushed = true;
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
            self.flag_blocked(to);
        }
        self.to_wake[to] = true;
    }

    /// Asks shard `to` to wake this one (if it sleeps) whenever it takes from their ring,
    /// until this one's spill queue for `to` is empty again ([`Mailbox::flush`] clears the
    /// flag; only the sender writes it, so a receiver cannot clear a flag set after the
    /// room it made was already used).
    fn flag_blocked(&self, to: usize) {
        let flag = self.blocked_flag(self.me, to);
        // Written only when it changes: the flags of all pairs share cache lines.
        if !flag.load(Ordering::Relaxed) {
            flag.store(true, Ordering::SeqCst);
        }
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
                    self.flag_blocked(to);
                    break;
                }
                self.to_wake[to] = true;
            }
            let flag = self.blocked_flag(self.me, to);
            if self.overflow[to].is_empty() && flag.load(Ordering::Relaxed) {
                flag.store(false, Ordering::Relaxed);
            }
        }
        if let Some(link) = self.link.as_mut() {
            while let Some(m) = link.overflow.pop_front() {
                if let Err(m) = link.tx.push(m) {
                    link.overflow.push_front(m);
                    break;
                }
                link.pushed = true;
            }
        }
        // Pair with the receiver's fence in `prepare_sleep`: either it sees our messages or we
        // see that it sleeps.
        fence(Ordering::SeqCst);
        if let Some(link) = self.link.as_mut() {
            if std::mem::take(&mut link.pushed) && link.waker.sleeping.load(Ordering::SeqCst) {
                link.waker.wake();
            }
        }
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
            || self.link.as_ref().is_some_and(|l| !l.overflow.is_empty())
    }

    /// Takes up to [`MAX_RECV_PER_TURN`] messages from the inbound rings, starting each turn
    /// with the next ring in turn (each ring keeps its order).
    pub fn receive(&mut self, mut handle: impl FnMut(ShardMsg)) -> usize {
        let rings = self.inbound.len();
        let first = self.first_inbound % rings.max(1);
        self.first_inbound = first + 1;
        let mut n = 0;
        for k in 0..rings {
            let from = (first + k) % rings;
            let Some(c) = self.inbound[from].as_mut() else {
                continue;
            };
            let before = n;
            while n < MAX_RECV_PER_TURN {
                let Some(m) = c.pop() else { break };
                handle(m);
                n += 1;
            }
            self.took[from] = n > before;
        }
        if let Some(link) = self.link.as_mut() {
            while n < MAX_RECV_PER_TURN {
                let Some(m) = link.rx.pop() else { break };
                handle(m);
                n += 1;
            }
        }
        if n > 0 && !mutations::skip_wake_blocked_senders() {
            self.wake_blocked_senders();
        }
        n
    }

    /// Whether shard `from` waits for room in its ring to `to`.
    fn blocked_flag(&self, from: usize, to: usize) -> &AtomicBool {
        &self.blocked[from * self.wakers.len() + to]
    }

    /// Wakes the sleeping senders whose flagged rings this turn's `receive` took from.
    fn wake_blocked_senders(&mut self) {
        let n = self.wakers.len();
        // Pairs with the sender's fence in `prepare_sleep`: either it sees the room made by
        // the pops, or this sees that it sleeps, and then also its flag, which it set before
        // announcing the sleep. One fence per turn that received anything.
        fence(Ordering::SeqCst);
        for from in 0..n {
            let took = std::mem::take(&mut self.took[from]);
            if took && mutations::receiver_clears_flags() {
                // The bug before 3d4b42c: the receiver cleared the flag whether or not the
                // sender slept.
                if self
                    .blocked_flag(from, self.me)
                    .swap(false, Ordering::SeqCst)
                    && self.wakers[from].sleeping.load(Ordering::SeqCst)
                {
                    self.wakers[from].wake();
                }
                continue;
            }
            if took
                && self.wakers[from].sleeping.load(Ordering::SeqCst)
                && self.blocked_flag(from, self.me).load(Ordering::SeqCst)
            {
                self.wakers[from].wake();
            }
        }
    }

    /// Messages waiting in the spill queues now.
    pub fn spill_depth(&self) -> usize {
        self.overflow.iter().map(VecDeque::len).sum::<usize>()
            + self.link.as_ref().map_or(0, |l| l.overflow.len())
    }

    /// Announces that this shard is about to sleep; returns false (and cancels) when a
    /// message is already waiting, or a ring this shard spills into has room again. While it
    /// spills, the receiver wakes it when it makes room (see the module documentation).
    pub fn prepare_sleep(&mut self) -> bool {
        let w = &self.wakers[self.me];
        w.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.work_waiting() {
            w.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Whether this shard has mailbox work now: a message waiting, or a spill into a ring
    /// with room. What a sleeping shard must never have without a wake-up pending (checked by
    /// the simulation); [`Mailbox::prepare_sleep`] refuses to sleep on it.
    pub fn work_waiting(&self) -> bool {
        self.inbound.iter().flatten().any(Consumer::peek_nonempty)
            || self
                .overflow
                .iter()
                .zip(&self.outbound)
                .any(|(q, ring)| !q.is_empty() && ring.as_ref().is_some_and(Producer::has_room))
            || self.link.as_ref().is_some_and(|l| {
                l.rx.peek_nonempty() || (!l.overflow.is_empty() && l.tx.has_room())
            })
    }

    /// Marks this shard awake.
    pub fn woke(&self) {
        self.wakers[self.me].sleeping.store(false, Ordering::SeqCst);
    }
}

/// Switches that put a fixed bug back, so that a test can show the simulation catches it
/// (`io/sim.rs`). Compiled to constants outside tests.
pub(crate) mod mutations {
    #[cfg(test)]
    thread_local! {
        static SKIP_WAKE_BLOCKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        static RECEIVER_CLEARS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The receiver clears a sender's "blocked" flag when it takes from the ring, asleep or
    /// not (the bug fixed in 3d4b42c): on this thread, until reset.
    #[cfg(test)]
    pub(crate) fn set_receiver_clears_flags(on: bool) {
        RECEIVER_CLEARS.with(|c| c.set(on));
    }

    #[cfg(test)]
    pub(crate) fn receiver_clears_flags() -> bool {
        RECEIVER_CLEARS.with(std::cell::Cell::get)
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) const fn receiver_clears_flags() -> bool {
        false
    }

    /// The receiver does not wake a sender that sleeps blocked on its full ring (the bug fixed
    /// by the wake in `Mailbox::receive`): on this thread, until reset.
    #[cfg(test)]
    pub(crate) fn set_skip_wake_blocked_senders(on: bool) {
        SKIP_WAKE_BLOCKED.with(|c| c.set(on));
    }

    #[cfg(test)]
    pub(crate) fn skip_wake_blocked_senders() -> bool {
        SKIP_WAKE_BLOCKED.with(std::cell::Cell::get)
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) const fn skip_wake_blocked_senders() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::msg::{ToOwner, UserId};

    fn msg(user: u64) -> ShardMsg {
        ShardMsg::ToOwner(ToOwner::BacklogCancel {
            user: UserId(user),
            home: 0,
        })
    }

    fn user(m: &ShardMsg) -> u64 {
        match m {
            ShardMsg::ToOwner(ToOwner::BacklogCancel { user, .. }) => user.0,
            other => panic!("{other:?}"),
        }
    }

    /// Whether shard `b`'s eventfd has a wake-up pending (and clears it).
    fn woken(b: &Mailbox) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
        let n = unsafe { libc::read(b.waker().fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8 && v > 0
    }

    #[test]
    fn a_spilling_shard_sleeps_and_the_receiver_wakes_it_when_it_makes_room() {
        let mut boxes = mailboxes(2, 16).unwrap();
        let mut b1 = boxes.pop().unwrap();
        let mut b0 = boxes.pop().unwrap();
        for u in 0..20 {
            b0.send(1, msg(u));
        }
        b0.flush();
        assert_eq!(b0.spill_depth(), 4);
        // Nothing to do until shard 1 takes from the ring: shard 0 may sleep.
        assert!(b0.prepare_sleep());
        assert!(!woken(&b0));
        let mut got = Vec::new();
        b1.receive(|m| got.push(user(&m)));
        assert_eq!(got.len(), 16);
        assert!(woken(&b0), "the receiver wakes the spilling sender");
        b0.woke();
        b0.flush();
        assert!(!b0.backlogged());
        b1.receive(|m| got.push(user(&m)));
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        // A sender that is not asleep is not woken, and a sender that finds room before it
        // sleeps does not sleep.
        for u in 20..40 {
            b0.send(1, msg(u));
        }
        b0.flush();
        assert!(b0.backlogged());
        b1.receive(|_| {});
        assert!(!woken(&b0));
        assert!(!b0.prepare_sleep(), "room in the ring it spills into");
        b0.woke();
        b0.flush();
        assert!(!b0.backlogged());
    }

    /// The schedule behind 3d4b42c, scripted: the receiver's turn is cut between its pops and
    /// its wake check, and the sender, awake in between, uses the room and fills the ring
    /// again. The sender then sleeps; the receiver's next pops must wake it. Run once as the
    /// code is, once with the old receiver (`mutations::set_receiver_clears_flags`), which
    /// cleared the flag at the wake check and so left the sender asleep with room in its ring.
    #[test]
    fn a_sender_that_refills_its_ring_before_the_wake_check_is_still_woken() {
        let schedule = |old_receiver: bool| -> bool {
            mutations::set_receiver_clears_flags(old_receiver);
            let mut boxes = mailboxes(2, 16).unwrap();
            let mut b1 = boxes.pop().unwrap();
            let mut b0 = boxes.pop().unwrap();
            for u in 0..40 {
                b0.send(1, msg(u));
            }
            b0.flush();
            assert_eq!(b0.spill_depth(), 24);
            // Shard 1's turn, first half: its pops.
            mutations::set_skip_wake_blocked_senders(true);
            assert_eq!(b1.receive(|_| {}), 16);
            mutations::set_skip_wake_blocked_senders(false);
            // Shard 0, awake, uses the room: the ring is full again, 8 still spill.
            b0.flush();
            assert_eq!(b0.spill_depth(), 8);
            // Shard 1's turn, second half: its wake check sees shard 0 awake.
            b1.wake_blocked_senders();
            assert!(!woken(&b0));
            // Shard 0 can do nothing (no room, no message): it sleeps.
            assert!(b0.prepare_sleep());
            // Shard 1's next turn makes room: shard 0 must be woken.
            assert_eq!(b1.receive(|_| {}), 16);
            let woke = woken(&b0);
            mutations::set_receiver_clears_flags(false);
            woke
        };
        assert!(schedule(false), "the sender sleeps with room in its ring");
        assert!(
            !schedule(true),
            "the old receiver is not caught: the schedule does not show the bug"
        );
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
