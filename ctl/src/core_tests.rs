//! Tests of the control state machine in virtual time: no sockets, no sleeps.

use super::*;
use crate::membership::{Liveness, RelayState, ShardLoad};
use std::path::PathBuf;

struct Rig {
    dir: PathBuf,
    core: Core,
    t0: Instant,
    unix0: u64,
    /// The last tick `run_to` made.
    ticked_ms: u64,
    /// Whether `run_to` ticks (off: time jumps, as if ctl had been stopped in between).
    ticks: bool,
}

fn hb(relay_id: u32, shards: u16) -> Heartbeat {
    Heartbeat {
        relay_id,
        host: format!("10.0.0.{relay_id}"),
        udp_base_port: 40_000,
        shards,
        nic_gbps: 25.0,
        labels: BTreeMap::new(),
        state: RelayState::Serving,
        load: vec![ShardLoad::default()],
        chat_port: None,
        link_port: None,
    }
}

impl Rig {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ctl-core-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = Instant::now();
        let unix0 = 1_700_000_000;
        let core = Self::open_at(&dir, t0, unix0);
        Self {
            dir,
            core,
            t0,
            unix0,
            ticked_ms: 0,
            ticks: true,
        }
    }

    /// ctl's ticker: a tick every 250 ms up to `ms`, as the server runs one (ctl counts a
    /// relay's silence on its own running time, `membership::POLL_GAP`).
    fn run_to(&mut self, ms: u64) {
        while self.ticks && self.ticked_ms + 250 <= ms {
            self.ticked_ms += 250;
            let now = self.at(self.ticked_ms);
            self.core.tick(&now);
        }
    }

    fn open_at(dir: &Path, t0: Instant, unix0: u64) -> Core {
        let key = SigningKey::from_bytes(&[7; 32]);
        let now = Now {
            mono: t0,
            unix_s: unix0,
        };
        Core::open(Config::default(), key, dir, now).unwrap()
    }

    /// Restarts the core on the same directory, `after_ms` later.
    fn restart(&mut self, after_ms: u64) {
        self.ticked_ms = after_ms;
        let now = self.at(after_ms);
        self.core = Self::open_at(&self.dir, now.mono, now.unix_s);
    }

    fn at(&self, ms: u64) -> Now {
        Now {
            mono: self.t0 + Duration::from_millis(ms),
            unix_s: self.unix0 + ms / 1000,
        }
    }

    fn beat(&mut self, ms: u64, relays: &[u32]) {
        self.run_to(ms);
        let now = self.at(ms);
        for &r in relays {
            self.core.handle_heartbeat(&now, hb(r, 2)).unwrap();
        }
        self.core.tick(&now);
    }

    fn create(&mut self, ms: u64) -> Created {
        self.run_to(ms);
        let req = CreateMeeting::default();
        self.core.create_meeting(&self.at(ms), req, 0).unwrap()
    }

    fn join(&mut self, ms: u64, code: &str) -> Result<Joined, ApiError> {
        self.run_to(ms);
        let req = JoinRequest {
            code: code.into(),
            ..JoinRequest::default()
        };
        self.core.join(&self.at(ms), req, None)
    }

    fn verify(&self, token: &str, ms: u64) -> Claims {
        let v = TokenVerifier::new(self.core.key.verifying_key(), 0);
        v.verify_text(token.as_bytes(), self.at(ms).unix_s).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn create_then_join_places_on_a_live_relay_with_a_matching_token() {
    let mut rig = Rig::new("join");
    rig.beat(0, &[7]);
    let c = rig.create(10);
    let host = c.join.clone().expect("a relay is serving");
    assert!(host.is_host);
    let j = rig.join(20, &c.code).unwrap();
    assert_eq!(
        (j.relay_id, j.participant_id, j.meeting_id),
        (7, 2, c.meeting_id)
    );
    assert_eq!(
        (j.shard_idx, j.relay_host.as_str()),
        (host.shard_idx, "10.0.0.7")
    );
    assert_eq!(j.udp_port, 40_000 + j.shard_idx);
    let claims = rig.verify(&j.token, 20);
    assert_eq!(claims.kind, TokenKind::Room);
    assert_eq!((claims.scope_id, claims.participant_id), (c.meeting_id, 2));
    assert_eq!((claims.relay_id, claims.shard_idx), (7, j.shard_idx));
    assert!(!claims.permissions.contains(Permissions::HOST));
    assert!(rig
        .verify(&host.token, 20)
        .permissions
        .contains(Permissions::HOST));
    assert_eq!(rig.join(30, "zzz-zzzz-zzz"), Err(ApiError::UnknownMeeting));
}

#[test]
fn no_relay_means_no_placement_but_the_meeting_exists() {
    let mut rig = Rig::new("norelay");
    let c = rig.create(5_000);
    assert!(c.join.is_none());
    assert_eq!(rig.join(5_000, &c.code), Err(ApiError::NoRelay));
    rig.beat(5_100, &[3]);
    assert_eq!(rig.join(5_200, &c.code).unwrap().relay_id, 3);
}

#[test]
fn a_dead_relays_rooms_move_to_live_ones_and_joins_follow() {
    let mut rig = Rig::new("death");
    rig.beat(0, &[1, 2, 3]);
    let meetings: Vec<Created> = (0..30).map(|i| rig.create(i)).collect();
    let on_1: Vec<&Created> = meetings
        .iter()
        .filter(|c| c.join.as_ref().unwrap().relay_id == 1)
        .collect();
    assert!(
        !on_1.is_empty(),
        "30 rooms over 3 relays put some on relay 1"
    );
    for ms in [1_000, 2_000, 2_900] {
        rig.beat(ms, &[2, 3]);
    }
    assert_eq!(
        rig.core.members().get(1).unwrap().liveness(),
        Liveness::Serving
    );
    rig.beat(3_100, &[2, 3]);
    assert_eq!(
        rig.core.members().get(1).unwrap().liveness(),
        Liveness::Dead
    );
    for c in &on_1 {
        let p = rig
            .core
            .placement(Scope::Room, c.meeting_id)
            .unwrap()
            .clone();
        assert_ne!(p.relay_id, 1, "moved off the dead relay");
        assert_eq!(rig.join(3_200, &c.code).unwrap().relay_id, p.relay_id);
    }
    for c in meetings
        .iter()
        .filter(|c| c.join.as_ref().unwrap().relay_id != 1)
    {
        let p = rig.core.placement(Scope::Room, c.meeting_id).unwrap();
        assert_eq!(p.relay_id, c.join.as_ref().unwrap().relay_id, "others stay");
    }
}

#[test]
fn draining_relays_get_nothing_new_and_keep_their_rooms() {
    let mut rig = Rig::new("drain");
    rig.beat(0, &[1, 2]);
    let before: Vec<Created> = (0..10).map(|i| rig.create(i)).collect();
    let homed_on_1 = (1..50)
        .filter(|&u| rig.core.user_home(&rig.at(0), u).unwrap().relay_id == 1)
        .count();
    assert!(homed_on_1 > 0);
    rig.core.set_drain(1, true, &rig.at(100)).unwrap();
    assert_eq!(rig.core.take_commands(1), vec![Command::Drain]);
    for i in 0..20 {
        assert_eq!(rig.create(200 + i).join.unwrap().relay_id, 2);
    }
    for c in &before {
        let was = c.join.as_ref().unwrap().relay_id;
        assert_eq!(rig.join(300, &c.code).unwrap().relay_id, was);
    }
    // Alone (no cluster), a relay keeps its users' chat homes: their chats are stored there.
    let still_on_1 = (1..50)
        .filter(|&u| rig.core.user_home(&rig.at(300), u).unwrap().relay_id == 1)
        .count();
    assert_eq!(still_on_1, homed_on_1);
    assert_eq!(
        rig.core.set_drain(9, true, &rig.at(300)),
        Err(ApiError::UnknownRelay)
    );
    rig.core.set_drain(1, false, &rig.at(400)).unwrap();
    assert_eq!(rig.core.take_commands(1), vec![Command::Undrain]);
    assert!(rig.core.members().get(1).unwrap().takes_new());
}

#[test]
fn host_removes_a_participant_and_the_relay_is_told() {
    let mut rig = Rig::new("remove");
    rig.beat(0, &[4]);
    let c = rig.create(0);
    let guest = rig.join(10, &c.code).unwrap();
    let now = rig.at(20);
    let id = c.meeting_id;
    assert_eq!(
        rig.core.remove(&now, id, 2, None),
        Err(ApiError::Unauthenticated)
    );
    assert_eq!(
        rig.core.remove(&now, id, 2, Some("00")),
        Err(ApiError::BadCredentials)
    );
    assert_eq!(
        rig.core.remove(&now, id, 1, Some(&guest.token)),
        Err(ApiError::NotHost),
        "a guest's valid token is not a host's"
    );
    assert_eq!(
        rig.core.remove(&now, id, 1, Some(&c.host_secret)),
        Err(ApiError::CannotRemoveHost)
    );
    assert_eq!(
        rig.core.remove(&now, id, 9, Some(&c.host_secret)),
        Err(ApiError::UnknownParticipant)
    );
    rig.core.remove(&now, id, 2, Some(&c.host_secret)).unwrap();
    let cmds = rig.core.take_commands(4);
    assert_eq!(
        cmds,
        vec![Command::RemoveParticipant {
            room: id,
            participant: 2
        }]
    );
    assert_eq!(rig.core.poll_woken(), Some(4));
    assert_eq!(
        rig.core.leave(&now, id, Some(&guest.token)),
        Err(ApiError::UnknownParticipant)
    );
}

#[test]
fn forged_expired_and_foreign_host_tokens_are_refused() {
    let mut rig = Rig::new("forged");
    rig.beat(0, &[4]);
    let a = rig.create(0);
    let b = rig.create(0);
    let host_a = a.join.unwrap().token;
    let now = rig.at(10);
    let forged = Claims {
        kind: TokenKind::Room,
        permissions: Permissions::ALL,
        relay_id: 4,
        shard_idx: 0,
        expires_at: u64::MAX,
        scope_id: a.meeting_id,
        participant_id: 1,
    }
    .sign_text(&SigningKey::from_bytes(&[8; 32]));
    let id = a.meeting_id;
    assert!(matches!(
        rig.core.end(&now, id, Some(&forged)),
        Err(ApiError::BadToken(_))
    ));
    assert_eq!(
        rig.core.end(&now, b.meeting_id, Some(&host_a)),
        Err(ApiError::WrongMeeting)
    );
    let late = rig.at(1000 * (Config::default().token_ttl_s + 1));
    assert_eq!(
        rig.core.end(&late, id, Some(&host_a)),
        Err(ApiError::TokenExpired)
    );
    rig.core.end(&now, id, Some(&host_a)).unwrap();
    let fence = now.unix_s + Config::default().token_ttl_s;
    assert_eq!(
        rig.core.take_commands(4),
        vec![Command::CloseRoom { room: id, fence }],
        "every token issued so far is refused"
    );
    assert_eq!(rig.join(20, &a.code), Err(ApiError::UnknownMeeting));
    assert!(rig.core.placement(Scope::Room, id).is_none());
}

#[test]
fn leave_with_own_token_and_rejoin_keeps_the_participant_id() {
    let mut rig = Rig::new("leave");
    rig.beat(0, &[5]);
    let c = rig.create(0);
    let g = rig.join(10, &c.code).unwrap();
    let req = JoinRequest {
        code: c.code.clone(),
        name: None,
        rejoin_token: Some(g.token.clone()),
    };
    let again = rig.core.join(&rig.at(20), req, None).unwrap();
    assert_eq!(again.participant_id, g.participant_id);
    let host = rig
        .core
        .join(
            &rig.at(20),
            JoinRequest {
                code: c.code.clone(),
                ..Default::default()
            },
            Some(&c.host_secret),
        )
        .unwrap();
    assert!(host.is_host && host.participant_id == 1);
    assert_eq!(
        rig.core.leave(&rig.at(30), c.meeting_id, Some(&g.token)),
        Ok(2)
    );
    assert_eq!(
        rig.core.take_commands(5),
        vec![Command::RemoveParticipant {
            room: c.meeting_id,
            participant: 2
        }]
    );
}

#[test]
fn restart_keeps_meetings_placements_and_waits_for_heartbeats() {
    let mut rig = Rig::new("restart");
    rig.beat(0, &[1, 2]);
    let c = rig.create(0);
    let placed = c.join.as_ref().unwrap().relay_id;
    rig.restart(10_000);
    assert_eq!(rig.core.meetings().len(), 1);
    assert_eq!(
        rig.core
            .placement(Scope::Room, c.meeting_id)
            .unwrap()
            .relay_id,
        placed
    );
    assert_eq!(
        rig.join(10_100, &c.code),
        Err(ApiError::NoRelay),
        "relays not re-learned yet"
    );
    rig.beat(10_500, &[1, 2]);
    assert_eq!(
        rig.join(10_600, &c.code).unwrap().relay_id,
        placed,
        "sticky across restarts"
    );
    assert!(rig
        .core
        .meetings()
        .get(c.meeting_id)
        .unwrap()
        .is_host_secret(&c.host_secret));
}

#[test]
fn after_a_restart_rooms_of_relays_that_never_return_move() {
    let mut rig = Rig::new("gone");
    rig.beat(0, &[1]);
    let c = rig.create(0);
    rig.restart(60_000);
    rig.beat(60_100, &[2]);
    assert_eq!(
        rig.core
            .placement(Scope::Room, c.meeting_id)
            .unwrap()
            .relay_id,
        1,
        "grace"
    );
    rig.beat(63_100, &[2]);
    assert_eq!(
        rig.core
            .placement(Scope::Room, c.meeting_id)
            .unwrap()
            .relay_id,
        2
    );
    assert_eq!(rig.join(63_200, &c.code).unwrap().relay_id, 2);
}

#[test]
fn user_homes_are_sticky_and_tokens_are_user_kind() {
    let mut rig = Rig::new("users");
    rig.beat(0, &[1, 2, 3]);
    let a = rig.core.user_home(&rig.at(0), 42).unwrap();
    let b = rig.core.user_home(&rig.at(10), 42).unwrap();
    assert_eq!((a.relay_id, a.shard_idx), (b.relay_id, b.shard_idx));
    assert_eq!(a.chat_port, None);
    let claims = rig.verify(&a.token, 0);
    assert_eq!(
        (claims.kind, claims.scope_id, claims.participant_id),
        (TokenKind::User, 42, 42)
    );
    assert!(matches!(
        rig.core.user_home(&rig.at(0), 0),
        Err(ApiError::Invalid(_))
    ));
}

#[test]
fn meeting_limits_hold() {
    let mut rig = Rig::new("limits");
    rig.beat(0, &[1]);
    let c = rig.create(0);
    for _ in 1..Config::default().max_participants {
        rig.join(10, &c.code).unwrap();
    }
    assert_eq!(rig.join(10, &c.code), Err(ApiError::MeetingFull));
    let long = JoinRequest {
        code: c.code.clone(),
        name: Some("x".repeat(MAX_NAME_LEN + 1)),
        rejoin_token: None,
    };
    assert!(matches!(
        rig.core.join(&rig.at(10), long, None),
        Err(ApiError::Invalid(_))
    ));
}

#[test]
fn the_journal_is_compacted_and_still_replays_the_same_state() {
    let mut rig = Rig::new("compact");
    rig.beat(0, &[1]);
    let c = rig.create(0);
    for _ in 0..1_100 {
        let g = rig.join(10, &c.code).unwrap();
        rig.core
            .leave(&rig.at(10), c.meeting_id, Some(&g.token))
            .unwrap();
    }
    rig.core.tick(&rig.at(20));
    assert!(rig.core.stats.compactions >= 1);
    let before = rig.core.meetings().get(c.meeting_id).cloned();
    rig.restart(100);
    assert_eq!(rig.core.meetings().get(c.meeting_id).cloned(), before);
}

/// Detached (the server's writer thread has the file): changes are staged and applied, and
/// handed over as one batch; after a failed write new changes are refused before they are
/// applied, and the next batch is the whole state, after which changes are taken again.
#[test]
fn a_detached_journal_groups_changes_and_rewrites_everything_after_a_failure() {
    let mut rig = Rig::new("detached");
    let mut journal = rig.core.detach_journal().unwrap();
    rig.beat(0, &[1]);
    assert_eq!(rig.core.unsynced(), None, "heartbeats stage nothing");
    let a = rig.create(0);
    let b = rig.create(0);
    let staged = rig.core.unsynced().expect("two creates wait for the disk");
    let batch = rig.core.take_batch().unwrap();
    assert!(!batch.is_snapshot());
    assert_eq!(batch.seq, staged);
    assert!(rig.core.take_batch().is_none(), "taken once");
    rig.core.batch_written(&batch, false);
    assert_eq!(rig.core.stats.journal_errors, 1);
    let n = rig.core.meetings().len();
    let refused = rig
        .core
        .create_meeting(&rig.at(0), CreateMeeting::default(), 0);
    assert!(matches!(refused, Err(ApiError::Storage)));
    assert_eq!(
        rig.core.meetings().len(),
        n,
        "a refused change is not applied"
    );
    let rewrite = rig.core.take_batch().unwrap();
    assert!(rewrite.is_snapshot(), "after a failure, the whole state");
    journal.write(&rewrite).unwrap();
    rig.core.batch_written(&rewrite, true);
    assert_eq!(rig.core.unsynced(), None);
    let c = rig.create(0);
    let batch = rig.core.take_batch().unwrap();
    journal.write(&batch).unwrap();
    rig.core.batch_written(&batch, true);
    drop(journal);
    rig.restart(100);
    for m in [a, b, c] {
        assert!(rig.core.meetings().get(m.meeting_id).is_some());
    }
    assert_eq!(rig.core.meetings().len(), 3);
}

#[test]
fn idle_meetings_expire_and_rejoins_keep_them_alive() {
    let mut rig = Rig::new("expiry");
    // Half days pass between the steps below; the relay stands for one that heartbeats all
    // along (ctl sees the jumps as its own pauses, not as the relay's silence).
    rig.ticks = false;
    rig.beat(0, &[1]);
    let idle = rig.create(0);
    let busy = rig.create(0);
    let g = rig.join(0, &busy.code).unwrap();
    let day_ms = 1000 * Config::default().meeting_idle_s;
    // The busy meeting's guest rejoins (to renew its token) every half day.
    let half = day_ms / 2;
    for k in 1..=3 {
        rig.beat(k * half, &[1]);
        let req = JoinRequest {
            code: busy.code.clone(),
            name: None,
            rejoin_token: Some(g.token.clone()),
        };
        let at = rig.at(k * half);
        // Tokens last an hour; a fresh one from the host's secret stands in for the renewal.
        let host = rig.core.join(&at, req, Some(&busy.host_secret)).unwrap();
        assert!(host.is_host);
    }
    assert!(
        rig.core.meetings().get(idle.meeting_id).is_none(),
        "idle one expired"
    );
    assert_eq!(rig.core.stats.meetings_expired, 1);
    assert!(
        rig.core.meetings().get(busy.meeting_id).is_some(),
        "busy one kept"
    );
    let closed = rig.core.take_commands(1);
    assert!(
        closed
            .iter()
            .any(|c| matches!(c, Command::CloseRoom { room, .. }
            if *room == idle.meeting_id)),
        "{closed:?}"
    );
}

#[test]
fn a_relay_that_comes_back_closes_the_rooms_that_moved_away() {
    let mut rig = Rig::new("partition");
    rig.beat(0, &[1, 2]);
    let m = (0..50)
        .map(|i| rig.create(i))
        .find(|c| c.join.as_ref().unwrap().relay_id == 1)
        .expect("some room on relay 1");
    rig.beat(2_900, &[2]);
    // No tick between: the join itself notices that relay 1 has been silent for 3 s.
    assert_eq!(rig.join(3_000, &m.code).unwrap().relay_id, 2);
    rig.run_to(4_000);
    let back = rig.core.handle_heartbeat(&rig.at(4_000), hb(1, 2)).unwrap();
    assert_eq!(
        back.lease_ms, 0,
        "no lease while its rooms wait to be closed"
    );
    rig.beat(4_000, &[2]);
    let cmds = rig.core.take_commands(1);
    let next = rig.core.handle_heartbeat(&rig.at(4_100), hb(1, 2)).unwrap();
    assert_eq!(next.lease_ms, 2_500, "a lease once it has taken them");
    // The fence covers every token issued for relay 1 before the move (at 3 s).
    let fence = rig.at(3_000).unix_s + Config::default().token_ttl_s;
    assert!(
        cmds.contains(&Command::CloseRoom {
            room: m.meeting_id,
            fence
        }),
        "{cmds:?}"
    );
    assert_eq!(
        rig.join(4_100, &m.code).unwrap().relay_id,
        2,
        "the room stays moved"
    );
    // Relay 2 dies: the room comes back to relay 1, whose fence must not refuse the fresh
    // tokens (before, relay 1 refused the room until the old tokens had expired: an hour).
    rig.beat(6_000, &[1]);
    let back = rig.join(7_100, &m.code).unwrap();
    assert_eq!(back.relay_id, 1, "the room is back on relay 1");
    assert!(
        back.expires_at > fence,
        "a fresh token ({}) expires after the fence ({fence})",
        back.expires_at
    );
}

#[test]
fn user_load_is_counted_from_the_record_across_restarts() {
    let mut rig = Rig::new("userload");
    rig.beat(0, &[1, 2]);
    for user in 1..=40 {
        rig.core.user_home(&rig.at(0), user).unwrap();
    }
    let on = |core: &Core, relay: u32| {
        (0..2u16)
            .map(|s| {
                core.placer_load(
                    Scope::User,
                    Slot {
                        relay_id: relay,
                        shard_idx: s,
                    },
                )
                .unwrap()
            })
            .sum::<u64>()
    };
    rig.beat(100, &[1, 2]);
    assert_eq!(
        on(&rig.core, 1) + on(&rig.core, 2),
        40,
        "a heartbeat keeps the count"
    );
    rig.restart(1_000);
    rig.beat(1_100, &[1, 2]);
    assert_eq!(
        on(&rig.core, 1) + on(&rig.core, 2),
        40,
        "restored placements count"
    );
}

#[test]
fn the_cluster_forms_once_with_its_chat_owners_fixed_for_good() {
    let dir = std::env::temp_dir().join(format!("ctl-core-{}-cluster", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = Config {
        cluster_relays: 2,
        ..Config::default()
    };
    let t0 = Instant::now();
    let now = |ms: u64| Now {
        mono: t0 + Duration::from_millis(ms),
        unix_s: 1_700_000_000 + ms / 1000,
    };
    let open =
        |ms| Core::open(cfg.clone(), SigningKey::from_bytes(&[7; 32]), &dir, now(ms)).unwrap();
    let linked = |id, shards| Heartbeat {
        link_port: Some(7000 + id as u16),
        ..hb(id, shards)
    };
    let mut core = open(0);
    // One linked relay is not a cluster of two; a relay without links never gets a view.
    let a = core.handle_heartbeat(&now(0), linked(3, 2)).unwrap();
    assert_eq!(a.cluster, None);
    core.handle_heartbeat(&now(0), hb(9, 4)).unwrap();
    let b = core.handle_heartbeat(&now(10), linked(1, 3)).unwrap();
    let view = b.cluster.expect("formed by the second linked relay");
    // Every shard of both, by relay number: relay 1's three, then relay 3's two.
    assert_eq!(view.owners, vec![0x100, 0x101, 0x102, 0x300, 0x301]);
    assert_eq!(
        view.links.get(&3).map(String::as_str),
        Some("10.0.0.3:7003")
    );
    assert!(!view.links.contains_key(&1), "not itself");
    assert!(
        !view.links.contains_key(&9),
        "a relay without links is no peer"
    );
    let claims = core
        .verifier
        .verify_text(view.link_token.as_bytes(), now(10).unix_s)
        .unwrap();
    assert_eq!((claims.kind, claims.scope_id), (TokenKind::Relay, 1));
    assert_eq!(
        core.handle_heartbeat(&now(20), hb(9, 4)).unwrap().cluster,
        None
    );
    // Users are homed on linked relays only (relay 9 has the most shards and no links).
    assert!((1..200).all(|u| core.user_home(&now(20), u).unwrap().relay_id != 9));
    // In a cluster a draining relay's users are homed elsewhere (it ends their sessions).
    let on_3: Vec<u64> = (1..200)
        .filter(|&u| core.user_home(&now(20), u).unwrap().relay_id == 3)
        .collect();
    assert!(!on_3.is_empty());
    core.set_drain(3, true, &now(20)).unwrap();
    assert!(on_3
        .iter()
        .all(|&u| core.user_home(&now(20), u).unwrap().relay_id == 1));
    // A relay added later changes no owner, and neither does a restart.
    let c = core.handle_heartbeat(&now(30), linked(2, 8)).unwrap();
    assert_eq!(c.cluster.unwrap().owners, view.owners);
    drop(core);
    let mut core = open(40);
    let again = core.handle_heartbeat(&now(40), linked(2, 8)).unwrap();
    assert_eq!(again.cluster.unwrap().owners, view.owners);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay that comes back and dies again before it takes its `close_room`s is told again
/// when it comes back the second time (the commands were dropped with its queue, and it then
/// got a lease while still serving a room that had moved).
#[test]
fn close_rooms_owed_to_a_relay_survive_its_second_death() {
    let mut rig = Rig::new("owed");
    rig.beat(0, &[1, 2]);
    let m = (0..50)
        .map(|i| rig.create(i))
        .find(|c| c.join.as_ref().unwrap().relay_id == 1)
        .expect("some room on relay 1");
    rig.beat(2_900, &[2]);
    assert_eq!(rig.join(3_000, &m.code).unwrap().relay_id, 2);
    rig.run_to(4_000);
    let back = rig.core.handle_heartbeat(&rig.at(4_000), hb(1, 2)).unwrap();
    assert_eq!(back.lease_ms, 0);
    // Dead again before its command poll: 3 s of silence, relay 2 alive throughout (so the
    // room stays on relay 2 and nothing else tells relay 1 about it).
    for ms in [4_500, 5_500, 6_500, 7_500] {
        rig.beat(ms, &[2]);
    }
    assert!(rig.core.members().get(1).unwrap().dead);
    let again = rig.core.handle_heartbeat(&rig.at(8_000), hb(1, 2)).unwrap();
    assert_eq!(again.lease_ms, 0, "still owes the close");
    let mut cmds = Vec::new();
    loop {
        let more = rig.core.take_commands(1);
        if more.is_empty() {
            break;
        }
        cmds.extend(more);
    }
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::CloseRoom { room, .. } if *room == m.meeting_id)),
        "{cmds:?}"
    );
    let next = rig.core.handle_heartbeat(&rig.at(8_100), hb(1, 2)).unwrap();
    assert_eq!(next.lease_ms, 2_500);
}

#[test]
fn a_second_device_replaces_the_first_and_accounts_survive_restarts() {
    let mut rig = Rig::new("accounts");
    let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let now = rig.at(0);
    let (started, sms) = rig
        .core
        .start_verification(&now, "+1 202 555 0143", "a".into(), [1, 2, 3, 4, 5, 6])
        .unwrap();
    assert_eq!(started.number, "+12025550143");
    assert!(sms.is_some_and(|s| s.body.contains("123456")));
    let first = rig
        .core
        .verify(&now, "a", "123456", ip, 77, "cred-one".into())
        .unwrap();
    assert_eq!((first.user_id, first.new_account), (77, true));
    // A new device a minute later: the same account, and only the new credential works.
    let later = rig.at(61_000);
    let (_, sms) = rig
        .core
        .start_verification(&later, "+12025550143", "b".into(), [6, 5, 4, 3, 2, 1])
        .unwrap();
    assert!(sms.is_some());
    let second = rig
        .core
        .verify(&later, "b", "654321", ip, 78, "cred-two".into())
        .unwrap();
    assert_eq!((second.user_id, second.new_account), (77, false));
    assert_eq!(
        rig.core.device_user(Some("cred-one")),
        Err(ApiError::BadCredentials)
    );
    assert_eq!(rig.core.device_user(Some("cred-two")), Ok(77));
    assert_eq!(rig.core.device_user(None), Err(ApiError::Unauthenticated));
    rig.restart(62_000);
    assert_eq!(rig.core.device_user(Some("cred-two")), Ok(77));
    assert_eq!(rig.core.account_count(), 1);
    // Deleted: gone for good, and the number signs in as a new account.
    rig.core.delete_account(77).unwrap();
    rig.restart(63_000);
    assert_eq!(rig.core.account_count(), 0);
    assert_eq!(
        rig.core.device_user(Some("cred-two")),
        Err(ApiError::BadCredentials)
    );
    let t = rig.at(200_000);
    rig.core
        .start_verification(&t, "+12025550143", "c".into(), [0; 6])
        .unwrap();
    let third = rig
        .core
        .verify(&t, "c", "000000", ip, 79, "cred-three".into())
        .unwrap();
    assert_eq!((third.user_id, third.new_account), (79, true));
}

/// A join and a leave with the longest names, over and over, in a meeting of 100 such
/// participants: each change rewrites the whole meeting record (about 17 KB). Compacted by
/// record count alone, the journal grew to about 1,028 such records (17 MB) before a rewrite;
/// by bytes it stays within twice the live state plus `journal_slack_bytes` (1 MiB).
#[test]
fn a_join_and_leave_loop_with_long_names_keeps_the_journal_small() {
    let mut rig = Rig::new("journal-bytes");
    rig.beat(0, &[1]);
    let m = rig.create(0);
    let name = |i: usize| format!("{i:03}{}", "n".repeat(MAX_NAME_LEN - 3));
    let join = |rig: &mut Rig, i: usize| {
        let req = JoinRequest {
            code: m.code.clone(),
            name: Some(name(i)),
            ..JoinRequest::default()
        };
        rig.core.join(&rig.at(100), req, None).unwrap()
    };
    for i in 0..98 {
        join(&mut rig, i);
    }
    let mut largest = 0u64;
    for round in 0..1_500 {
        let j = join(&mut rig, round % 1000);
        rig.core
            .leave(&rig.at(100), j.meeting_id, Some(&j.token))
            .unwrap();
        rig.core.tick(&rig.at(100));
        let size = std::fs::metadata(rig.dir.join("state.journal"))
            .unwrap()
            .len();
        largest = largest.max(size);
    }
    let record = serde_json::to_string(&rig.core.meetings().iter().next().unwrap()).unwrap();
    assert!(record.len() > 15_000, "{}", record.len());
    assert!(
        largest < 2 * record.len() as u64 + (1 << 20) + 64 * 1024,
        "the journal reached {largest} bytes (a meeting record is {} bytes)",
        record.len()
    );
}

#[test]
fn an_account_has_at_most_its_limit_of_open_meetings_across_restarts() {
    let mut rig = Rig::new("per-account");
    rig.beat(0, &[7]);
    let limit = Config::default().meetings_per_account;
    let now = rig.at(10);
    let mut made = Vec::new();
    for _ in 0..limit {
        let c = rig
            .core
            .create_meeting(&now, CreateMeeting::default(), 42)
            .unwrap();
        made.push(c);
    }
    let before = rig.core.meetings.len();
    let refused = rig.core.create_meeting(&now, CreateMeeting::default(), 42);
    assert_eq!(refused.unwrap_err(), ApiError::AccountMeetingLimit(limit));
    assert_eq!(rig.core.meetings.len(), before, "nothing stored");
    // Another account, and an operator, are not held by account 42's limit.
    rig.core
        .create_meeting(&now, CreateMeeting::default(), 43)
        .unwrap();
    rig.create(20);
    // The count survives a restart (it is rebuilt from the journal's meetings).
    rig.restart(100);
    let now = rig.at(100);
    let again = rig.core.create_meeting(&now, CreateMeeting::default(), 42);
    assert_eq!(again.unwrap_err(), ApiError::AccountMeetingLimit(limit));
    // Ending one of its meetings makes room for one more.
    let first = &made[0];
    rig.core
        .end(&now, first.meeting_id, Some(&first.host_secret))
        .unwrap();
    rig.core
        .create_meeting(&now, CreateMeeting::default(), 42)
        .unwrap();
    let refused = rig.core.create_meeting(&now, CreateMeeting::default(), 42);
    assert_eq!(refused.unwrap_err(), ApiError::AccountMeetingLimit(limit));
}
