//! A room and its participants: membership, subscriptions and precomputed fan-out lists.

use super::limits::TokenBucket;
use proto::token::Permissions;
use std::net::SocketAddr;

/// Which publishers a participant receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subscription {
    /// Every other publisher in the room (the default).
    All,
    /// Only these participant ids.
    Only(Vec<u64>),
}

/// One participant of a room, bound to one transport address.
#[derive(Debug)]
pub struct Participant {
    /// Participant id from the token.
    pub id: u64,
    /// The bound 5-tuple's remote address.
    pub addr: SocketAddr,
    /// What the token permits.
    pub permissions: Permissions,
    /// Which publishers this participant receives.
    pub subscription: Subscription,
    /// Destinations of the media this participant publishes; rebuilt on every membership or
    /// subscription change so that the per-packet path only reads it.
    pub fanout: Vec<SocketAddr>,
    /// SSRCs this participant has sent, learned from its RTP.
    pub ssrcs: [u32; MAX_SSRCS],
    /// Number of valid entries in `ssrcs`.
    pub n_ssrcs: u8,
    /// Last successful binding request, monotonic microseconds.
    pub last_refresh_us: u64,
    /// Token expiry, unix seconds.
    pub expires_at: u64,
    /// STUN MESSAGE-INTEGRITY key derived from the token.
    pub stun_key: [u8; 20],
    /// Packet rate limit.
    pub pps: TokenBucket,
    /// Bit rate limit, in bytes.
    pub bytes: TokenBucket,
    /// Last time a PLI or FIR was forwarded to this participant as a publisher.
    pub last_keyframe_request_us: Option<u64>,
    /// Subscription changes (each rebuilds the room's fan-out lists, O(n²)):
    /// [`super::rtcp_route::SUBSCRIPTION_CHANGES_PER_S`].
    pub subscription_changes: TokenBucket,
}

/// SSRCs one publisher may use (audio, video layers, RTX).
pub const MAX_SSRCS: usize = 8;

impl Participant {
    /// Whether `ssrc` is one of this participant's.
    #[inline]
    pub fn owns_ssrc(&self, ssrc: u32) -> bool {
        self.ssrcs[..usize::from(self.n_ssrcs)].contains(&ssrc)
    }

    fn receives_from(&self, publisher_id: u64) -> bool {
        self.permissions.contains(Permissions::SUBSCRIBE)
            && match &self.subscription {
                Subscription::All => true,
                Subscription::Only(ids) => ids.contains(&publisher_id),
            }
    }
}

/// A room on one shard. Participants sit in a fixed-capacity slab so that slot indices held by
/// the shard's address table stay valid while others come and go.
#[derive(Debug)]
pub struct Room {
    /// Room id from the tokens.
    pub id: u64,
    slots: Vec<Option<Participant>>,
    n_participants: usize,
}

impl Room {
    /// An empty room with room for `capacity` participants.
    pub fn new(id: u64, capacity: usize) -> Self {
        Self {
            id,
            slots: (0..capacity).map(|_| None).collect(),
            n_participants: 0,
        }
    }

    /// Number of participants.
    pub fn len(&self) -> usize {
        self.n_participants
    }

    /// Whether the room has no participants.
    pub fn is_empty(&self) -> bool {
        self.n_participants == 0
    }

    /// The participant in `slot`.
    #[inline]
    pub fn get(&self, slot: u16) -> Option<&Participant> {
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// The participant in `slot`, mutably.
    #[inline]
    pub fn get_mut(&mut self, slot: u16) -> Option<&mut Participant> {
        self.slots.get_mut(usize::from(slot))?.as_mut()
    }

    /// The slot of participant `id`.
    pub fn slot_of(&self, id: u64) -> Option<u16> {
        self.iter().find(|(_, p)| p.id == id).map(|(s, _)| s)
    }

    /// Slot and participant pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &Participant)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i as u16, p.as_ref()?)))
    }

    /// Adds a participant; `None` when the room is full.
    pub fn insert(&mut self, p: Participant) -> Option<u16> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(p);
        self.n_participants += 1;
        self.rebuild_fanout();
        Some(slot as u16)
    }

    /// Removes the participant in `slot`.
    pub fn remove(&mut self, slot: u16) -> Option<Participant> {
        let p = self.slots.get_mut(usize::from(slot))?.take()?;
        self.n_participants -= 1;
        self.rebuild_fanout();
        Some(p)
    }

    /// The slot of the publisher that owns `ssrc`.
    pub fn owner_of_ssrc(&self, ssrc: u32) -> Option<u16> {
        self.iter().find(|(_, p)| p.owns_ssrc(ssrc)).map(|(s, _)| s)
    }

    /// Records `ssrc` as published by the participant in `slot`, unless another participant of
    /// the room owns it or this one has used up its SSRCs. Runs once per new stream.
    pub fn learn_ssrc(&mut self, slot: u16, ssrc: u32) -> bool {
        if self.owner_of_ssrc(ssrc).is_some() {
            return false;
        }
        let Some(p) = self.get_mut(slot) else {
            return false;
        };
        if usize::from(p.n_ssrcs) == MAX_SSRCS {
            return false;
        }
        p.ssrcs[usize::from(p.n_ssrcs)] = ssrc;
        p.n_ssrcs += 1;
        true
    }

    /// Recomputes every publisher's destination list. O(n^2) in the room size, run only on
    /// membership and subscription changes, never per packet. Reuses each list's capacity.
    pub fn rebuild_fanout(&mut self) {
        for i in 0..self.slots.len() {
            let Some(publisher) = self.slots[i].as_ref() else {
                continue;
            };
            let publisher_id = publisher.id;
            let mut fanout = std::mem::take(&mut self.slots[i].as_mut().expect("checked").fanout);
            fanout.clear();
            for (j, sub) in self.slots.iter().enumerate() {
                if let Some(sub) = sub {
                    if j != i && sub.receives_from(publisher_id) {
                        fanout.push(sub.addr);
                    }
                }
            }
            self.slots[i].as_mut().expect("checked").fanout = fanout;
        }
    }
}
