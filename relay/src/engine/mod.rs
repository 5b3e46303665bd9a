//! The shard engine: the sans-IO heart of the relay.
//!
//! A [`Shard`] owns the rooms, bindings and counters of one core. It performs no syscall, reads
//! no clock and spawns nothing: the driver passes the time in ([`Now`]) and acts on the
//! [`Verdict`] it gets back. The driver contract:
//!
//! 1. For every received datagram call [`Shard::handle_datagram`] and act on the verdict
//!    before handing the engine the next datagram (a `Forward` borrows the engine).
//! 2. Whenever the monotonic clock passes [`Shard::poll_timeout`], call
//!    [`Shard::handle_timeout`].
//!
//! Architecture Invariant: the per-packet path of a bound participant (RTP and RTCP) allocates
//! nothing, takes no lock and touches no shared atomic.

mod counters;
mod hash;
pub(crate) mod limits;
mod room;
mod rtcp_route;

pub use counters::{Counters, DropReason};
pub use room::Subscription;
pub use rtcp_route::{SUBSCRIBE_ALL, SUBSCRIBE_ONLY, SUBSCRIPTION_APP_NAME};

use hash::{AddrKey, FxHashMap};
use limits::TokenBucket;
use proto::demux::{classify, PacketKind};
use proto::stun::{self, Class, StunMessage};
use proto::token::{Permissions, TokenError, TokenKind, TokenVerifier};
use room::{Participant, Room, MAX_SSRCS};
use std::net::SocketAddr;

/// The current time as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic microseconds since an arbitrary origin fixed for the engine's lifetime.
    pub mono_us: u64,
    /// Wall clock, unix seconds (token expiry).
    pub unix_s: u64,
}

/// Limits and timers of one shard. Every table the engine keeps is bounded by these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Rooms one shard hosts at most.
    pub max_rooms: usize,
    /// Participants one room holds at most.
    pub max_participants_per_room: usize,
    /// Publisher ids one explicit subscription names at most.
    pub max_subscriptions: usize,
    /// A binding not refreshed for this long expires.
    pub binding_ttl_us: u64,
    /// Packets per second one participant may send (0: unlimited).
    pub participant_pps: u64,
    /// Bits per second one participant may send (0: unlimited).
    pub participant_bps: u64,
    /// Binding requests that need a signature check, per second per shard (0: unlimited).
    pub new_binding_rate: u64,
    /// Minimum interval between keyframe requests (PLI/FIR) forwarded to one publisher.
    pub keyframe_request_interval_us: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_rooms: 4096,
            max_participants_per_room: 64,
            max_subscriptions: 64,
            binding_ttl_us: 30_000_000,
            participant_pps: 5_000,
            participant_bps: 20_000_000,
            new_binding_rate: 2_000,
            keyframe_request_interval_us: 500_000,
        }
    }
}

/// What the driver must do with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'s> {
    /// Send the datagram, unchanged, to each of these addresses.
    Forward(&'s [SocketAddr]),
    /// Send the first `n` bytes of the reply buffer back to the source.
    Reply(usize),
    /// The engine consumed the datagram (a control message); nothing to send.
    Consumed,
    /// Nothing to send; the reason has been counted.
    Drop(DropReason),
}

/// The engine's decision before it is turned into a borrowed [`Verdict`].
#[derive(Clone, Copy, Debug)]
enum Decision {
    /// Forward to the scratch list.
    Scratch,
    Reply(usize),
    Consumed,
    Drop(DropReason),
}

/// An instruction from the control plane (ctl, via the control thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Unbind a participant; it stops receiving and its packets are dropped as unbound.
    RemoveParticipant {
        /// Room id.
        room: u64,
        /// Participant id.
        participant: u64,
    },
    /// Unbind every participant of a room, and refuse its tokens that expire at or before
    /// `fence` (unix seconds; ctl's latest expiry of a token issued before the command, 0 when
    /// ctl names none): tokens issued later, when the room comes back, are taken.
    CloseRoom {
        /// Room id.
        room: u64,
        /// Tokens for the room expiring at or before this are refused.
        fence: u64,
    },
    /// Refuse new rooms (existing rooms go on) while `true`.
    SetDraining(bool),
    /// ctl's lease: take new joins until `until_us` (the engine's monotonic clock). Without
    /// one (no ctl, or a ctl that grants none) a shard is never fenced.
    Lease {
        /// End of the lease.
        until_us: u64,
    },
}

/// Removed participants and closed rooms remembered at most (their tokens stay refused until
/// they expire; a closed room's, only those issued before it closed).
pub const MAX_REMOVED: usize = 65_536;

/// Stand-in participant id for "every participant of the room".
const WHOLE_ROOM: u64 = u64::MAX;

/// Where a bound address lives: room slot and participant slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BindingRef {
    room: u32,
    participant: u16,
}

/// One shard's rooms, bindings and counters.
pub struct Shard {
    cfg: EngineConfig,
    shard_idx: u16,
    verifier: TokenVerifier,
    bindings: FxHashMap<AddrKey, BindingRef>,
    rooms: Vec<Option<Room>>,
    free_rooms: Vec<u32>,
    room_by_id: FxHashMap<u64, u32>,
    n_participants: usize,
    new_bindings: TokenBucket,
    draining: bool,
    /// Participants removed by the control plane (participant `u64::MAX`: a closed room), with
    /// the unix time until which their tokens stay refused. Bounded by [`MAX_REMOVED`].
    removed: FxHashMap<(u64, u64), u64>,
    next_sweep_us: u64,
    /// End of ctl's lease ([`Command::Lease`]); `None` before the first (never fenced).
    lease_until_us: Option<u64>,
    /// Scratch destination list for RTCP feedback routing; capacity reserved up front.
    scratch: Vec<SocketAddr>,
    counters: Counters,
    /// Key of the return-routability cookies ([`proto::stun::address_cookie`]), random per
    /// shard and process: an address enters no fan-out before it echoes its cookie.
    cookie_secret: [u8; 32],
}

/// A return-routability cookie is valid in the window it was made in and the next one.
const COOKIE_WINDOW_US: u64 = 30_000_000;

/// Why a Binding request was refused, by who is to blame: the peer (a bad or expired token, a
/// failed integrity check, a token for elsewhere, a removed participant) or a limit (rate,
/// room, shard, drain). Each maps to a drop reason and a STUN error response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindRefusal {
    /// Peer: no USERNAME attribute.
    NoUsername,
    /// Peer: the token does not verify.
    BadToken,
    /// Peer: MESSAGE-INTEGRITY does not match the token's key.
    BadIntegrity,
    /// Peer: the token has expired (a refresh must bring a new one).
    Expired,
    /// Peer: the token names another relay.
    WrongRelay,
    /// Peer: the token is not a room token for this shard.
    WrongShard,
    /// Peer: the participant, or the whole room, was removed.
    Removed,
    /// Limit: new bindings on this shard are arriving faster than its budget.
    RateLimited,
    /// Limit: the room holds its most participants.
    RoomFull,
    /// Limit: the shard holds its most rooms.
    ShardFull,
    /// Limit: the relay is draining and takes no new room.
    Draining,
    /// Limit: the relay's lease from ctl lapsed (it is cut off from ctl, which may have moved
    /// the room): no new participant, no new room, until ctl answers again.
    NoLease,
    /// Not a refusal: a new address must first echo its return-routability cookie (401 with
    /// a NONCE; 438 when the cookie it brought is not, or no longer, its own).
    Challenge { stale: bool },
}

impl BindRefusal {
    /// Whether the peer is to blame (else a limit of this relay is).
    pub fn peer_fault(self) -> bool {
        !matches!(
            self,
            Self::RateLimited
                | Self::RoomFull
                | Self::ShardFull
                | Self::Draining
                | Self::NoLease
                | Self::Challenge { .. }
        )
    }

    /// The drop counter it is counted under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            Self::NoUsername | Self::BadToken => DropReason::BadToken,
            Self::BadIntegrity => DropReason::BadIntegrity,
            Self::Expired => DropReason::ExpiredToken,
            Self::WrongRelay | Self::WrongShard => DropReason::WrongScope,
            Self::Removed => DropReason::NotPermitted,
            Self::RateLimited => DropReason::RateLimited,
            Self::RoomFull => DropReason::ParticipantLimit,
            Self::ShardFull | Self::Draining | Self::NoLease => DropReason::RoomLimit,
            // Never counted as a drop: challenges have their own counter.
            Self::Challenge { .. } => DropReason::BadToken,
        }
    }

    /// The STUN error response: code and reason phrase (PROTOCOL.md).
    pub fn stun_error(self) -> (u16, &'static str) {
        match self {
            Self::NoUsername => (400, "Bad Request"),
            Self::BadToken | Self::BadIntegrity => (401, "Unauthorized"),
            Self::Expired => (401, "Token expired"),
            Self::WrongRelay => (403, "Wrong relay"),
            Self::WrongShard => (403, "Wrong shard"),
            Self::Removed => (403, "Removed"),
            Self::RateLimited => (503, "Try later"),
            Self::RoomFull => (403, "Room full"),
            Self::ShardFull => (403, "Shard full"),
            Self::Draining => (403, "Draining"),
            Self::NoLease => (503, "No lease"),
            Self::Challenge { stale: false } => (401, "Echo the nonce"),
            Self::Challenge { stale: true } => (438, "Stale nonce"),
        }
    }
}

impl Shard {
    /// An empty shard with index `shard_idx` that trusts tokens checked by `verifier`.
    pub fn new(cfg: EngineConfig, shard_idx: u16, verifier: TokenVerifier, now: Now) -> Self {
        let new_bindings =
            TokenBucket::new(cfg.new_binding_rate, cfg.new_binding_rate, now.mono_us);
        Self {
            scratch: Vec::with_capacity(cfg.max_participants_per_room),
            next_sweep_us: now.mono_us + sweep_interval_us(&cfg),
            lease_until_us: None,
            cfg,
            shard_idx,
            verifier,
            bindings: FxHashMap::default(),
            rooms: Vec::new(),
            free_rooms: Vec::new(),
            room_by_id: FxHashMap::default(),
            n_participants: 0,
            new_bindings,
            draining: false,
            removed: FxHashMap::default(),
            counters: Counters::default(),
            cookie_secret: {
                let mut s = [0u8; 32];
                getrandom::getrandom(&mut s).expect("the operating system's random generator");
                s
            },
        }
    }

    /// Counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    /// Rooms currently hosted.
    pub fn n_rooms(&self) -> usize {
        self.room_by_id.len()
    }
    /// Participants currently bound.
    pub fn n_participants(&self) -> usize {
        self.n_participants
    }
    /// This shard's index.
    pub fn shard_idx(&self) -> u16 {
        self.shard_idx
    }

    /// Handles one received datagram from `src`. `reply` must be at least 128 bytes; a reply
    /// is never longer than `data` (no amplification).
    pub fn handle_datagram(
        &mut self,
        now: Now,
        src: SocketAddr,
        data: &[u8],
        reply: &mut [u8],
    ) -> Verdict<'_> {
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += data.len() as u64;
        let decision = match classify(data) {
            PacketKind::Rtp => return self.handle_rtp(now, src, data),
            PacketKind::Rtcp => self.handle_rtcp(now, src, data),
            PacketKind::Stun => self.handle_stun(now, src, data, reply),
            PacketKind::Dtls => Decision::Drop(DropReason::Dtls),
            PacketKind::Unknown => Decision::Drop(DropReason::Malformed),
        };
        match decision {
            Decision::Scratch => {}
            Decision::Reply(n) => {
                self.counters.stun_replies += 1;
                return Verdict::Reply(n);
            }
            Decision::Consumed => {
                self.counters.rtcp_consumed += 1;
                return Verdict::Consumed;
            }
            Decision::Drop(reason) => {
                self.counters.drop(reason);
                return Verdict::Drop(reason);
            }
        };
        if self.scratch.is_empty() {
            return self.counters.dropped_now(DropReason::NoRoute);
        }
        let n = self.scratch.len() as u64;
        self.counters.fwd_packets += n;
        self.counters.fwd_bytes += n * data.len() as u64;
        Verdict::Forward(&self.scratch)
    }

    fn lookup(&self, src: &SocketAddr) -> Option<BindingRef> {
        self.bindings.get(&AddrKey::new(*src)).copied()
    }

    fn participant_mut(&mut self, b: BindingRef) -> &mut Participant {
        self.rooms[b.room as usize]
            .as_mut()
            .and_then(|r| r.get_mut(b.participant))
            .expect("invariant: every binding points at a live participant")
    }

    /// RTP from a bound publisher goes to its precomputed fan-out list. This is the hot path:
    /// one table lookup, one header check, and a borrowed slice back; fields are borrowed
    /// separately so that nothing is looked up twice.
    #[inline]
    fn handle_rtp(&mut self, now: Now, src: SocketAddr, data: &[u8]) -> Verdict<'_> {
        let Self {
            bindings,
            rooms,
            counters,
            ..
        } = self;
        let Some(&b) = bindings.get(&AddrKey::new(src)) else {
            return counters.dropped_now(DropReason::Unbound);
        };
        let Ok(rtp) = proto::rtp::RtpPacket::parse(data) else {
            return counters.dropped_now(DropReason::Malformed);
        };
        let ssrc = rtp.ssrc();
        let room = rooms[b.room as usize]
            .as_mut()
            .expect("invariant: bound room is live");
        let p = room
            .get_mut(b.participant)
            .expect("invariant: bound participant is live");
        if !p.permissions.contains(Permissions::PUBLISH) {
            return counters.dropped_now(DropReason::NotPermitted);
        }
        if !p.pps.try_take(1, now.mono_us) || !p.bytes.try_take(data.len() as u64, now.mono_us) {
            return counters.dropped_now(DropReason::RateLimited);
        }
        if !p.owns_ssrc(ssrc) && !room.learn_ssrc(b.participant, ssrc) {
            return counters.dropped_now(DropReason::SsrcRejected);
        }
        let fanout = &room.get(b.participant).expect("checked above").fanout;
        if fanout.is_empty() {
            return counters.dropped_now(DropReason::NoRoute);
        }
        counters.fwd_packets += fanout.len() as u64;
        counters.fwd_bytes += (fanout.len() * data.len()) as u64;
        Verdict::Forward(fanout)
    }

    fn handle_rtcp(&mut self, now: Now, src: SocketAddr, data: &[u8]) -> Decision {
        let Some(b) = self.lookup(&src) else {
            return Decision::Drop(DropReason::Unbound);
        };
        {
            let p = self.participant_mut(b);
            if !p.pps.try_take(1, now.mono_us) || !p.bytes.try_take(data.len() as u64, now.mono_us)
            {
                return Decision::Drop(DropReason::RateLimited);
            }
        }
        let room = self.rooms[b.room as usize]
            .as_mut()
            .expect("invariant: bound room is live");
        match rtcp_route::route(
            room,
            b.participant,
            data,
            now.mono_us,
            &self.cfg,
            &mut self.scratch,
        ) {
            Ok(rtcp_route::Routed::Forward) => Decision::Scratch,
            Ok(rtcp_route::Routed::Consumed) => Decision::Consumed,
            Err(reason) => Decision::Drop(reason),
        }
    }

    fn handle_stun(
        &mut self,
        now: Now,
        src: SocketAddr,
        data: &[u8],
        reply: &mut [u8],
    ) -> Decision {
        let Ok(msg) = StunMessage::parse(data) else {
            return Decision::Drop(DropReason::Malformed);
        };
        if msg.class() != Class::Request || msg.method() != stun::METHOD_BINDING {
            return Decision::Drop(DropReason::StunUnexpected);
        }
        let txid = *msg.transaction_id();
        match self.bind(now, src, &msg) {
            Ok(key) => match stun::write_binding_success(reply, &txid, src, &key) {
                Ok(n) if n <= data.len() => Decision::Reply(n),
                _ => Decision::Drop(DropReason::ReplySuppressed),
            },
            Err(refusal @ BindRefusal::Challenge { .. }) => {
                self.counters.challenges += 1;
                let (code, text) = refusal.stun_error();
                let cookie = self.cookie(src, now.mono_us / COOKIE_WINDOW_US);
                // Never larger than the request: an address that did not ask gets less than
                // the spoofer sent.
                match stun::write_binding_challenge(reply, &txid, code, text, &cookie) {
                    Ok(n) if n <= data.len() => Decision::Reply(n),
                    _ => Decision::Drop(DropReason::ReplySuppressed),
                }
            }
            Err(refusal) => {
                // Count the real reason even when no error response is sent.
                self.counters.drop(refusal.drop_reason());
                let (code, text) = refusal.stun_error();
                match stun::write_binding_error(reply, &txid, code, text) {
                    Ok(n) if n <= data.len() => Decision::Reply(n),
                    _ => Decision::Drop(DropReason::ReplySuppressed),
                }
            }
        }
    }

    /// Authenticates a Binding request and creates or refreshes the binding of `src`.
    /// Returns the integrity key for the success response.
    fn bind(
        &mut self,
        now: Now,
        src: SocketAddr,
        msg: &StunMessage<'_>,
    ) -> Result<[u8; 20], BindRefusal> {
        let username = msg.username().ok_or(BindRefusal::NoUsername)?;
        let key = proto::token::stun_key(username);
        // A refresh from a bound address with the same token skips the signature check.
        if let Some(b) = self.lookup(&src) {
            let p = self.participant_mut(b);
            if p.stun_key == key {
                msg.verify_integrity(&key)
                    .map_err(|_| BindRefusal::BadIntegrity)?;
                if p.expires_at <= now.unix_s {
                    return Err(BindRefusal::Expired);
                }
                p.last_refresh_us = now.mono_us;
                return Ok(key);
            }
        }
        // Return routability (as QUIC's address validation and ICE's checks): a new address
        // must echo the cookie the relay sent to it, so that a spoofed source never enters a
        // fan-out and spoofed floods never reach the signature budget. The integrity check
        // (cheap) makes the echo the token holder's own.
        let window = now.mono_us / COOKIE_WINDOW_US;
        let Some(nonce) = msg.attribute(stun::attr::NONCE) else {
            return Err(BindRefusal::Challenge { stale: false });
        };
        let fresh = [window, window.saturating_sub(1)]
            .iter()
            .any(|&w| stun::constant_time_eq(nonce, &self.cookie(src, w)));
        if !fresh {
            return Err(BindRefusal::Challenge { stale: true });
        }
        msg.verify_integrity(&key)
            .map_err(|_| BindRefusal::BadIntegrity)?;
        if !self.new_bindings.try_take(1, now.mono_us) {
            return Err(BindRefusal::RateLimited);
        }
        let claims = self
            .verifier
            .verify_text(username, now.unix_s)
            .map_err(|e| match e {
                TokenError::Expired => BindRefusal::Expired,
                TokenError::WrongRelay => BindRefusal::WrongRelay,
                _ => BindRefusal::BadToken,
            })?;
        if claims.kind != TokenKind::Room || claims.shard_idx != self.shard_idx {
            return Err(BindRefusal::WrongShard);
        }
        let refused_until = |pid| {
            self.removed
                .get(&(claims.scope_id, pid))
                .copied()
                .unwrap_or(0)
        };
        // A removed participant stays out while any token it may hold is valid; a closed room
        // refuses the tokens issued before it closed, which expire by its fence.
        let removed = refused_until(claims.participant_id) > now.unix_s;
        if removed || claims.expires_at <= refused_until(WHOLE_ROOM) {
            return Err(BindRefusal::Removed);
        }
        self.attach(now, src, &claims, key)?;
        Ok(key)
    }

    /// The return-routability cookie of `src` in cookie window `window`.
    fn cookie(&self, src: SocketAddr, window: u64) -> [u8; stun::COOKIE_LEN] {
        stun::address_cookie(&self.cookie_secret, src, window)
    }

    /// Binds `src` to the participant named by `claims`, creating the room if needed and
    /// moving the participant if it was bound elsewhere.
    fn attach(
        &mut self,
        now: Now,
        src: SocketAddr,
        claims: &proto::token::Claims,
        key: [u8; 20],
    ) -> Result<(), BindRefusal> {
        // Fencing: once the lease lapsed, ctl may have moved the room elsewhere; only
        // participants already here (a refresh, a NAT rebinding) are taken.
        if self.lease_until_us.is_some_and(|t| now.mono_us >= t) {
            let here = self
                .room_by_id
                .get(&claims.scope_id)
                .and_then(|&s| self.rooms[s as usize].as_ref())
                .and_then(|r| r.slot_of(claims.participant_id))
                .is_some();
            if !here {
                return Err(BindRefusal::NoLease);
            }
        }
        // A different participant bound to this address is replaced.
        if let Some(old) = self.lookup(&src) {
            self.unbind(old);
        }
        let room_slot = self.room_slot(claims.scope_id)?;
        let room = self.rooms[room_slot as usize]
            .as_mut()
            .expect("room_slot returns live rooms");
        if let Some(slot) = room.slot_of(claims.participant_id) {
            // The same participant from a new address (NAT rebinding, reconnect): move it.
            let p = room.get_mut(slot).expect("slot_of returns live slots");
            let old_addr = std::mem::replace(&mut p.addr, src);
            p.stun_key = key;
            p.expires_at = claims.expires_at;
            p.permissions = claims.permissions;
            p.last_refresh_us = now.mono_us;
            room.rebuild_fanout();
            self.bindings.remove(&AddrKey::new(old_addr));
            self.bindings.insert(
                AddrKey::new(src),
                BindingRef {
                    room: room_slot,
                    participant: slot,
                },
            );
            return Ok(());
        }
        let p = Participant {
            id: claims.participant_id,
            addr: src,
            permissions: claims.permissions,
            subscription: Subscription::All,
            fanout: Vec::with_capacity(self.cfg.max_participants_per_room),
            ssrcs: [0; MAX_SSRCS],
            n_ssrcs: 0,
            last_refresh_us: now.mono_us,
            expires_at: claims.expires_at,
            stun_key: key,
            pps: TokenBucket::new(
                self.cfg.participant_pps,
                self.cfg.participant_pps,
                now.mono_us,
            ),
            bytes: TokenBucket::new(
                self.cfg.participant_bps / 8,
                self.cfg.participant_bps / 8,
                now.mono_us,
            ),
            last_keyframe_request_us: None,
            subscription_changes: TokenBucket::new(
                rtcp_route::SUBSCRIPTION_CHANGES_PER_S,
                rtcp_route::SUBSCRIPTION_CHANGES_PER_S,
                now.mono_us,
            ),
        };
        let Some(slot) = room.insert(p) else {
            if room.is_empty() {
                self.release_room(room_slot);
            }
            return Err(BindRefusal::RoomFull);
        };
        self.n_participants += 1;
        self.counters.bindings_created += 1;
        self.bindings.insert(
            AddrKey::new(src),
            BindingRef {
                room: room_slot,
                participant: slot,
            },
        );
        Ok(())
    }

    /// The slot of room `id`, created if absent and the shard has room for it.
    fn room_slot(&mut self, id: u64) -> Result<u32, BindRefusal> {
        if let Some(&slot) = self.room_by_id.get(&id) {
            return Ok(slot);
        }
        if self.room_by_id.len() >= self.cfg.max_rooms {
            return Err(BindRefusal::ShardFull);
        }
        if self.draining {
            return Err(BindRefusal::Draining);
        }
        let room = Room::new(id, self.cfg.max_participants_per_room);
        let slot = match self.free_rooms.pop() {
            Some(slot) => {
                self.rooms[slot as usize] = Some(room);
                slot
            }
            None => {
                self.rooms.push(Some(room));
                (self.rooms.len() - 1) as u32
            }
        };
        self.room_by_id.insert(id, slot);
        Ok(slot)
    }

    fn release_room(&mut self, slot: u32) {
        if let Some(room) = self.rooms[slot as usize].take() {
            self.room_by_id.remove(&room.id);
            self.free_rooms.push(slot);
        }
    }

    /// Removes the participant behind `b` and its binding; drops the room when it empties.
    fn unbind(&mut self, b: BindingRef) {
        let room = self.rooms[b.room as usize]
            .as_mut()
            .expect("invariant: bound room is live");
        if let Some(p) = room.remove(b.participant) {
            self.bindings.remove(&AddrKey::new(p.addr));
            self.n_participants -= 1;
        }
        if room.is_empty() {
            self.release_room(b.room);
        }
    }

    /// Removes participant `participant_id` from room `room_id` (a host's or ctl's decision).
    /// Returns whether it was present.
    pub fn remove_participant(&mut self, room_id: u64, participant_id: u64) -> bool {
        let Some(&room_slot) = self.room_by_id.get(&room_id) else {
            return false;
        };
        let room = self.rooms[room_slot as usize]
            .as_ref()
            .expect("indexed rooms are live");
        match room.slot_of(participant_id) {
            Some(slot) => {
                self.unbind(BindingRef {
                    room: room_slot,
                    participant: slot,
                });
                true
            }
            None => false,
        }
    }

    /// Removes every participant of room `room_id`. Returns how many were removed.
    pub fn close_room(&mut self, room_id: u64) -> usize {
        let Some(&room_slot) = self.room_by_id.get(&room_id) else {
            return 0;
        };
        let room = self.rooms[room_slot as usize]
            .as_ref()
            .expect("indexed rooms are live");
        let slots: Vec<u16> = room.iter().map(|(slot, _)| slot).collect();
        for &slot in &slots {
            self.unbind(BindingRef {
                room: room_slot,
                participant: slot,
            });
        }
        slots.len()
    }

    /// The latest token expiry among the room's participants (or of one participant), if the
    /// room lives here: how long a removed token must stay refused.
    fn token_expiry(&self, room_id: u64, participant: Option<u64>) -> Option<u64> {
        let room = self.rooms[*self.room_by_id.get(&room_id)? as usize].as_ref()?;
        room.iter()
            .filter(|(_, p)| participant.is_none_or(|id| p.id == id))
            .map(|(_, p)| p.expires_at)
            .max()
    }

    fn remember_removed(&mut self, room: u64, participant: u64, until: u64) {
        if self.removed.len() >= MAX_REMOVED {
            // Full of live entries: the oldest grants are the least useful to keep.
            if let Some((&k, _)) = self.removed.iter().min_by_key(|(_, &u)| u) {
                self.removed.remove(&k);
            }
        }
        self.removed.insert((room, participant), until);
    }

    /// Applies a control-plane command.
    pub fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::RemoveParticipant { room, participant } => {
                if let Some(until) = self.token_expiry(room, Some(participant)) {
                    self.remember_removed(room, participant, until);
                }
                self.remove_participant(room, participant);
            }
            Command::CloseRoom { room, fence } => {
                let seen = self.token_expiry(room, None).unwrap_or(0);
                let fence = fence.max(seen);
                if fence > 0 {
                    self.remember_removed(room, WHOLE_ROOM, fence);
                }
                self.close_room(room);
            }
            Command::SetDraining(on) => self.draining = on,
            Command::Lease { until_us } => {
                self.lease_until_us =
                    Some(self.lease_until_us.map_or(until_us, |t| t.max(until_us)));
            }
        }
    }

    /// Sets the subscription of participant `participant_id` in room `room_id`.
    pub fn set_subscription(
        &mut self,
        room_id: u64,
        participant_id: u64,
        sub: Subscription,
    ) -> bool {
        let Some(&room_slot) = self.room_by_id.get(&room_id) else {
            return false;
        };
        let room = self.rooms[room_slot as usize]
            .as_mut()
            .expect("indexed rooms are live");
        rtcp_route::apply_subscription(room, participant_id, sub, self.cfg.max_subscriptions)
    }

    /// Whether ctl drains the relay (`Command::SetDraining`).
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// When [`Shard::handle_timeout`] must next be called, in monotonic microseconds.
    pub fn poll_timeout(&self) -> u64 {
        self.next_sweep_us
    }

    /// Expires bindings that were not refreshed within the TTL.
    pub fn handle_timeout(&mut self, now: Now) {
        if now.mono_us < self.next_sweep_us {
            return;
        }
        self.next_sweep_us = now.mono_us + sweep_interval_us(&self.cfg);
        self.removed.retain(|_, until| *until > now.unix_s);
        let ttl = self.cfg.binding_ttl_us;
        let mut expired = Vec::new();
        for (&addr, &b) in &self.bindings {
            let p = self.rooms[b.room as usize]
                .as_ref()
                .and_then(|r| r.get(b.participant))
                .expect("invariant: every binding points at a live participant");
            if now.mono_us.saturating_sub(p.last_refresh_us) >= ttl {
                expired.push((addr, b));
            }
        }
        for (_, b) in expired {
            self.unbind(b);
            self.counters.bindings_expired += 1;
        }
    }

    /// Checks the engine's internal invariants; for tests and fuzzing.
    pub fn check_invariants(&self) {
        let mut n = 0;
        for (addr, b) in &self.bindings {
            let room = self.rooms[b.room as usize]
                .as_ref()
                .expect("binding to a live room");
            let p = room
                .get(b.participant)
                .expect("binding to a live participant");
            assert_eq!(
                &AddrKey::new(p.addr),
                addr,
                "binding and participant agree on the address"
            );
            assert_eq!(self.room_by_id.get(&room.id), Some(&b.room));
            n += 1;
        }
        assert_eq!(n, self.n_participants);
        let in_rooms: usize = self.rooms.iter().flatten().map(Room::len).sum();
        assert_eq!(in_rooms, self.n_participants);
        assert!(
            self.rooms.iter().flatten().all(|r| !r.is_empty()),
            "empty rooms are released"
        );
    }
}

fn sweep_interval_us(cfg: &EngineConfig) -> u64 {
    (cfg.binding_ttl_us / 4).clamp(1_000, 1_000_000)
}

#[cfg(test)]
mod tests;
