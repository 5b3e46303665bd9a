//! Per-shard counters. Plain integers owned by the shard; the runtime publishes snapshots.

/// Why the engine dropped a datagram. Every drop is counted under one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Not STUN, RTP or RTCP, or an unparseable header.
    Malformed,
    /// RTP/RTCP from an address with no binding.
    Unbound,
    /// STUN that is not a Binding request (responses, indications, other methods).
    StunUnexpected,
    /// A Binding request without a usable token.
    BadToken,
    /// A Binding request whose token has expired.
    ExpiredToken,
    /// A Binding request whose MESSAGE-INTEGRITY does not match its token.
    BadIntegrity,
    /// A token for another shard, relay or kind.
    WrongScope,
    /// The shard already has `max_rooms` rooms.
    RoomLimit,
    /// The room already has `max_participants_per_room` participants.
    ParticipantLimit,
    /// A participant without the publish permission sent media.
    NotPermitted,
    /// A participant exceeded its packet or bit rate.
    RateLimited,
    /// A publisher used more SSRCs than allowed, or another participant's SSRC.
    SsrcRejected,
    /// A keyframe request inside the per-publisher throttle window.
    PliThrottled,
    /// Nobody to send to (no subscribers, or feedback naming an unknown SSRC).
    NoRoute,
    /// A reply would be larger than the request (anti-amplification) or could not be built.
    ReplySuppressed,
    /// DTLS is not served by this relay (yet).
    Dtls,
}

impl DropReason {
    /// Every reason, in metric order.
    pub const ALL: [DropReason; 16] = [
        Self::Malformed,
        Self::Unbound,
        Self::StunUnexpected,
        Self::BadToken,
        Self::ExpiredToken,
        Self::BadIntegrity,
        Self::WrongScope,
        Self::RoomLimit,
        Self::ParticipantLimit,
        Self::NotPermitted,
        Self::RateLimited,
        Self::SsrcRejected,
        Self::PliThrottled,
        Self::NoRoute,
        Self::ReplySuppressed,
        Self::Dtls,
    ];

    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unbound => "unbound",
            Self::StunUnexpected => "stun_unexpected",
            Self::BadToken => "bad_token",
            Self::ExpiredToken => "expired_token",
            Self::BadIntegrity => "bad_integrity",
            Self::WrongScope => "wrong_scope",
            Self::RoomLimit => "room_limit",
            Self::ParticipantLimit => "participant_limit",
            Self::NotPermitted => "not_permitted",
            Self::RateLimited => "rate_limited",
            Self::SsrcRejected => "ssrc_rejected",
            Self::PliThrottled => "pli_throttled",
            Self::NoRoute => "no_route",
            Self::ReplySuppressed => "reply_suppressed",
            Self::Dtls => "dtls",
        }
    }
}

/// Counters of one shard's engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams handed to the engine.
    pub rx_packets: u64,
    /// Bytes handed to the engine.
    pub rx_bytes: u64,
    /// Copies the engine asked the driver to send (fan-out counts each destination).
    pub fwd_packets: u64,
    /// Bytes of those copies.
    pub fwd_bytes: u64,
    /// STUN replies produced (success and error).
    pub stun_replies: u64,
    /// RTCP control packets the relay consumed (subscription changes).
    pub rtcp_consumed: u64,
    /// Return-routability challenges sent (401 or 438 with a cookie, to a new address).
    pub challenges: u64,
    /// Bindings created (not refreshes).
    pub bindings_created: u64,
    /// Bindings removed because they were not refreshed in time.
    pub bindings_expired: u64,
    /// Drops by reason, indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    /// Counts a drop.
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    /// Counts a drop and returns the verdict for it.
    #[inline]
    pub fn dropped_now<'s>(&mut self, reason: DropReason) -> super::Verdict<'s> {
        self.drop(reason);
        super::Verdict::Drop(reason)
    }

    /// Drops counted under `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let mut c = Counters::default();
        c.drop(DropReason::Dtls);
        assert_eq!(c.dropped(DropReason::Dtls), 1);
        assert_eq!(c.drops.iter().sum::<u64>(), 1);
    }
}
