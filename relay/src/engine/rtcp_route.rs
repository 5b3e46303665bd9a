//! RTCP routing (DESIGN.md section 4): sender reports go to the sender's subscribers; receiver
//! reports and feedback (NACK, PLI, FIR, REMB, transport-wide CC) go to the publisher of the
//! media SSRC they name, with keyframe requests throttled per publisher. An APP packet named
//! `RLYS` is the relay's own subscription control and is consumed (PROTOCOL.md).

use super::room::{Room, Subscription};
use super::{DropReason, EngineConfig};
use proto::rtcp::{parse_compound, Packet};
use std::net::SocketAddr;

/// The APP name of subscription control packets.
pub const SUBSCRIPTION_APP_NAME: [u8; 4] = *b"RLYS";
/// APP subtype: receive every publisher.
pub const SUBSCRIBE_ALL: u8 = 0;
/// APP subtype: receive only the participant ids listed (u64, big-endian).
pub const SUBSCRIBE_ONLY: u8 = 1;

/// Subscription changes one participant may make per second (and in a burst): each rebuilds
/// the room's fan-out lists, so a flood of them must not cost more than a few rebuilds.
pub const SUBSCRIPTION_CHANGES_PER_S: u64 = 10;

/// Distinct publishers one compound packet may address; the rest are ignored. Bounds the work.
const MAX_TARGETS: usize = 16;

/// What the engine does with an RTCP compound packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// Forward the compound to the addresses written into the scratch list.
    Forward,
    /// The relay consumed it (subscription control); nothing to send.
    Consumed,
}

/// Publishers a compound is addressed to.
struct Targets {
    slots: [(u16, bool); MAX_TARGETS],
    n: usize,
}

impl Targets {
    /// Adds publisher `slot`; `keyframe` marks a PLI or FIR. A target stays keyframe-only if
    /// everything addressed to it is a keyframe request.
    fn add(&mut self, slot: u16, keyframe: bool) {
        if let Some(t) = self.slots[..self.n].iter_mut().find(|t| t.0 == slot) {
            t.1 &= keyframe;
        } else if self.n < MAX_TARGETS {
            self.slots[self.n] = (slot, keyframe);
            self.n += 1;
        }
    }
}

/// Routes the compound `data` sent by the participant in slot `from`, writing destinations into
/// `out` (cleared first; its capacity is reserved at start-up).
pub fn route(
    room: &mut Room,
    from: u16,
    data: &[u8],
    now_us: u64,
    cfg: &EngineConfig,
    out: &mut Vec<SocketAddr>,
) -> Result<Routed, DropReason> {
    out.clear();
    let compound = parse_compound(data).map_err(|_| DropReason::Malformed)?;
    let mut targets = Targets {
        slots: [(0, false); MAX_TARGETS],
        n: 0,
    };
    let mut to_subscribers = false;
    let owner = |ssrc: u32, keyframe: bool, t: &mut Targets| {
        if let Some(slot) = room.owner_of_ssrc(ssrc) {
            t.add(slot, keyframe);
        }
    };
    for packet in compound.iter() {
        match packet {
            Packet::SenderReport(sr) => {
                to_subscribers = true;
                sr.reports()
                    .for_each(|r| owner(r.ssrc, false, &mut targets));
            }
            Packet::ReceiverReport(rr) => rr
                .reports()
                .for_each(|r| owner(r.ssrc, false, &mut targets)),
            Packet::Sdes(_) | Packet::Bye(_) => {}
            Packet::App(app) if app.name() == SUBSCRIPTION_APP_NAME => {
                let sub = parse_subscription(app.subtype(), app.data(), cfg.max_subscriptions)?;
                let p = room.get_mut(from).ok_or(DropReason::NoRoute)?;
                if !p.subscription_changes.try_take(1, now_us) {
                    return Err(DropReason::RateLimited);
                }
                let id = p.id;
                apply_subscription(room, id, sub, cfg.max_subscriptions);
                return Ok(Routed::Consumed);
            }
            Packet::App(_) => to_subscribers = true,
            Packet::Nack(n) => owner(n.media_ssrc(), false, &mut targets),
            Packet::TransportCc(f) => owner(f.media_ssrc(), false, &mut targets),
            Packet::Pli(f) => owner(f.media_ssrc(), true, &mut targets),
            Packet::Fir(fir) => fir
                .entries()
                .for_each(|(ssrc, _)| owner(ssrc, true, &mut targets)),
            Packet::Remb(remb) => remb.ssrcs().for_each(|s| owner(s, false, &mut targets)),
            Packet::Other {
                packet_type: 205 | 206,
                body,
                ..
            } => {
                // Unknown feedback: RFC 4585 section 6.1 puts the media SSRC at bytes 4..8.
                if let Some(b) = body.get(4..8) {
                    owner(
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                        false,
                        &mut targets,
                    );
                }
            }
            Packet::Other { .. } => to_subscribers = true,
        }
    }
    let mut throttled = false;
    for &(slot, keyframe_only) in &targets.slots[..targets.n] {
        if slot == from {
            continue;
        }
        let Some(p) = room.get_mut(slot) else {
            continue;
        };
        if keyframe_only {
            let recent = p
                .last_keyframe_request_us
                .is_some_and(|t| now_us.saturating_sub(t) < cfg.keyframe_request_interval_us);
            if recent {
                throttled = true;
                continue;
            }
            p.last_keyframe_request_us = Some(now_us);
        }
        out.push(p.addr);
    }
    if to_subscribers {
        if let Some(sender) = room.get(from) {
            for addr in &sender.fanout {
                if !out.contains(addr) {
                    out.push(*addr);
                }
            }
        }
    }
    match (out.is_empty(), throttled) {
        (true, true) => Err(DropReason::PliThrottled),
        _ => Ok(Routed::Forward),
    }
}

fn parse_subscription(subtype: u8, data: &[u8], max: usize) -> Result<Subscription, DropReason> {
    match subtype {
        SUBSCRIBE_ALL => Ok(Subscription::All),
        SUBSCRIBE_ONLY if data.len().is_multiple_of(8) && data.len() / 8 <= max => {
            Ok(Subscription::Only(
                data.chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().expect("chunks_exact(8)")))
                    .collect(),
            ))
        }
        _ => Err(DropReason::Malformed),
    }
}

/// Sets the subscription of participant `id` and rebuilds the room's fan-out lists.
pub fn apply_subscription(room: &mut Room, id: u64, sub: Subscription, max: usize) -> bool {
    if matches!(&sub, Subscription::Only(ids) if ids.len() > max) {
        return false;
    }
    let Some(slot) = room.slot_of(id) else {
        return false;
    };
    room.get_mut(slot)
        .expect("slot_of returns live slots")
        .subscription = sub;
    room.rebuild_fanout();
    true
}
