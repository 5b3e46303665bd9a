//! Read-only views of the core for the admin routes (`GET /v1/relays`, `GET /v1/rooms`).
#![forbid(unsafe_code)]

use crate::api_types::*;
use crate::core::{Core, Now, Scope};
use std::collections::BTreeMap;

/// Every known relay with its reported load, ctl's placement counts and its rooms.
pub fn relays(core: &Core, now: &Now) -> RelayList {
    // (relay, shard) -> (rooms, users) placed; relay -> meeting ids.
    let mut per_shard: BTreeMap<(u32, u16), (u64, u64)> = BTreeMap::new();
    let mut rooms: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for p in core.placements() {
        let e = per_shard.entry((p.relay_id, p.shard_idx)).or_default();
        match p.scope {
            Scope::Room => {
                e.0 += 1;
                rooms.entry(p.relay_id).or_default().push(p.id);
            }
            Scope::User => e.1 += 1,
        }
    }
    let relays = core
        .members()
        .iter()
        .map(|r| {
            let load = r
                .load
                .iter()
                .map(|l| {
                    let (placed_rooms, placed_users) =
                        per_shard.get(&(r.id, l.shard)).copied().unwrap_or_default();
                    ShardView {
                        reported: l.clone(),
                        placed_rooms,
                        placed_users,
                    }
                })
                .collect();
            RelayView {
                relay_id: r.id,
                host: r.host.clone(),
                udp_base_port: r.udp_base_port,
                shards: r.shards,
                nic_gbps: r.nic_gbps,
                labels: r.labels.clone(),
                chat_port: r.chat_port,
                state: r.liveness(),
                drain_requested: r.drain_requested,
                last_seen_ms: millis(now.mono.saturating_duration_since(r.last_seen)),
                load,
                rooms: rooms.remove(&r.id).unwrap_or_default(),
            }
        })
        .collect();
    RelayList { relays }
}

/// Every meeting with its placement.
pub fn rooms(core: &Core) -> RoomList {
    let rooms = core
        .meetings()
        .iter()
        .map(|m| {
            let p = core.placement(Scope::Room, m.id);
            RoomView {
                meeting_id: m.id,
                code: m.display_code(),
                title: m.title.clone(),
                created_at: m.created_at,
                participants: m.participants.len(),
                relay_id: p.map(|p| p.relay_id),
                shard_idx: p.map(|p| p.shard_idx),
                relay_state: p
                    .and_then(|p| core.members().get(p.relay_id))
                    .map(|r| r.liveness()),
                candidates: p.map(|p| p.candidates.clone()).unwrap_or_default(),
            }
        })
        .collect();
    RoomList { rooms }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
