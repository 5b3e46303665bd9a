//! The shard's turn, written once over its I/O.
//!
//! A [`Transport`] moves bytes (datagrams, and chat's TCP connections when the shard serves
//! chat); a [`ChatCore`] over its [`Storage`] commits and sequences; a [`Clock`] tells the time.
//! [`ShardLoop::turn`] puts them in one order, the same for every backend and for the
//! simulation:
//!
//! 1. **stop**: once the stop flag is set, chat's drain ([`ChatCore::stop_turn`]) decides when
//!    the loop ends;
//! 2. **wait**: the transport submits what the last turn queued and blocks for readiness or
//!    completions, at most as long as the last turn's *prepare to sleep* allowed;
//! 3. **wake**: the mailbox learns the shard is awake;
//! 4. **media**: the transport runs what arrived through the media engine and sends what it
//!    decides;
//! 5. **chat**: accepted, read, written and closed connections go to the chat core;
//! 6. **end of turn**: the core takes the other shards' messages, commits, releases;
//!    the transport then writes and closes what the commit released;
//! 7. **housekeeping and publish**: the control thread's commands, the media engine's timers,
//!    counters every [`PUBLISH_INTERVAL_US`];
//! 8. **prepare to sleep**: the next wait's bound, from the media engine's, chat's and the
//!    transport's timers, or zero when work is left that must not wait for a wake-up.
//!
//! Transports: `batch::Batch` (recvmmsg/sendmmsg, and epoll with chat), `uring::Driver`
//! (io_uring), and the simulation's (`io/sim.rs`), which plays clients and faults in virtual
//! time. A fourth (relay-to-relay links, TLS) is one more `impl Transport`.

use super::chat_io::ChatCore;
use super::storage::Storage;
use super::{IoCounters, ShardCtx, MAX_WAIT_MS, PUBLISH_INTERVAL_US};
use crate::engine::{Now, Shard};
use crate::error::ShardError;
use std::io;

/// The time the shard reads: the host's clocks in the relay, virtual time in the simulation.
pub trait Clock {
    /// Now.
    fn now(&self) -> Now;
}

/// A fixed instant: virtual time in the simulation, the fuzz target and the benches.
impl Clock for Now {
    #[inline]
    fn now(&self) -> Now {
        *self
    }
}

impl Clock for ShardCtx {
    #[inline]
    fn now(&self) -> Now {
        ShardCtx::now(self)
    }
}

/// What a shard's I/O provides to [`ShardLoop`]. Chat's two calls are made only when the shard
/// serves chat.
pub trait Transport<S: Storage> {
    /// Submits what the last turn queued and blocks until input is ready, something completes,
    /// a wake-up arrives or `timeout_us` has passed (zero: only collects what is there). A
    /// transport may instead block in its first receive of [`Transport::media`], bounded the
    /// same way.
    fn wait(&mut self, timeout_us: u64) -> io::Result<()>;

    /// Runs the datagrams that arrived (at most one turn's worth) through `engine` and sends, or
    /// queues, every copy and reply it decides.
    fn media(&mut self, engine: &mut Shard, clock: &impl Clock) -> io::Result<()>;

    /// Hands chat's new, read, written and closed connections to `chat`, and clears the
    /// shard's wake-up.
    fn chat_input(&mut self, chat: &mut ChatCore<S>, now: Now);

    /// After `chat`'s end of turn: writes (or queues) what it released, closes what it closes.
    fn chat_output(&mut self, chat: &mut ChatCore<S>, now: Now) -> io::Result<()>;

    /// Whether work is left that must not wait for a wake-up (a full turn's datagrams, a full
    /// submission queue, bytes held back).
    fn must_not_sleep(&self) -> bool;

    /// The transport's own next timer (a paused listener), in the clock's microseconds.
    fn poll_timeout(&self) -> u64 {
        u64::MAX
    }

    /// The driver's counters.
    fn counters(&self) -> IoCounters;
}

/// Whether the loop goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Turn again.
    Continue,
    /// Stopped: chat's connections are drained (or out of time).
    Stopped,
}

/// While stopping, the longest wait: chat's ERROR 13s are being flushed.
const STOP_WAIT_US: u64 = 1_000;

/// One shard's loop state: its chat core (if it serves chat), and its timers.
pub struct ShardLoop<S: Storage> {
    chat: Option<ChatCore<S>>,
    /// The bound of the next wait, set by the last turn's *prepare to sleep*.
    wait_us: u64,
    next_publish_us: u64,
}

impl<S: Storage> ShardLoop<S> {
    /// A loop for a shard with `chat` (or media only).
    pub fn new(chat: Option<ChatCore<S>>) -> Self {
        Self {
            chat,
            wait_us: 0,
            next_publish_us: 0,
        }
    }

    /// Turns until stopped, then publishes the last counters.
    pub fn run<T: Transport<S>, C: Clock>(
        &mut self,
        engine: &mut Shard,
        transport: &mut T,
        clock: &C,
        ctx: &ShardCtx,
    ) -> Result<(), ShardError> {
        let result = loop {
            match self.turn(engine, transport, clock, ctx) {
                Ok(Turn::Continue) => {}
                Ok(Turn::Stopped) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.publish(engine, transport, ctx);
        result
    }

    /// One turn, in the order of the module documentation. An error is the transport's or the
    /// storage's, and says which (the shard must stop: acknowledging without durability is not
    /// an option).
    pub fn turn<T: Transport<S>, C: Clock>(
        &mut self,
        engine: &mut Shard,
        transport: &mut T,
        clock: &C,
        ctx: &ShardCtx,
    ) -> Result<Turn, ShardError> {
        if ctx.stopping() {
            if self.chat.as_mut().is_none_or(|c| c.stop_turn(clock.now())) {
                return Ok(Turn::Stopped);
            }
            self.wait_us = self.wait_us.min(STOP_WAIT_US);
        }
        transport
            .wait(self.wait_us)
            .map_err(ShardError::Transport)?;
        if let Some(chat) = &self.chat {
            chat.woke();
        }
        transport
            .media(engine, clock)
            .map_err(ShardError::Transport)?;
        if let Some(chat) = &mut self.chat {
            let now = clock.now();
            transport.chat_input(chat, now);
            chat.end_turn(now).map_err(ShardError::Storage)?;
            transport
                .chat_output(chat, now)
                .map_err(ShardError::Transport)?;
        }
        let now = clock.now();
        ctx.housekeeping(engine, now);
        // A drain just begun: the sessions' ERROR 13s go out next turn, without a wait.
        let drained = self
            .chat
            .as_mut()
            .is_some_and(|c| c.set_draining(now, engine.draining()));
        if now.mono_us >= self.next_publish_us {
            self.publish(engine, transport, ctx);
            self.next_publish_us = now.mono_us + PUBLISH_INTERVAL_US;
        }
        let sleep = !drained
            && !transport.must_not_sleep()
            && self.chat.as_mut().is_none_or(ChatCore::prepare_sleep);
        self.wait_us = if sleep {
            let chat = self.chat.as_ref().map_or(u64::MAX, ChatCore::poll_timeout);
            engine
                .poll_timeout()
                .min(chat)
                .min(transport.poll_timeout())
                .saturating_sub(now.mono_us)
                .min(MAX_WAIT_MS * 1000)
        } else {
            0
        };
        Ok(Turn::Continue)
    }

    /// Whether the last turn prepared to sleep (the next wait may block).
    pub fn sleeping(&self) -> bool {
        self.wait_us > 0
    }

    /// The bound of the next wait.
    pub fn wait_us(&self) -> u64 {
        self.wait_us
    }

    /// The chat core.
    pub fn chat(&self) -> Option<&ChatCore<S>> {
        self.chat.as_ref()
    }

    /// The chat core, to change.
    pub fn chat_mut(&mut self) -> Option<&mut ChatCore<S>> {
        self.chat.as_mut()
    }

    /// The chat core, given up (a simulated crash takes its storage).
    pub fn into_chat(self) -> Option<ChatCore<S>> {
        self.chat
    }

    fn publish<T: Transport<S>>(&self, engine: &Shard, transport: &T, ctx: &ShardCtx) {
        ctx.stats.publish(engine, &transport.counters());
        if let Some(chat) = &self.chat {
            ctx.stats.publish_chat(chat.stats());
        }
    }
}
