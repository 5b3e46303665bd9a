//! The control state machine: membership, placement, meetings, tokens and command queues. No
//! networking and no clock: each input carries a [`Now`]; the HTTP layer (`server`) holds one
//! `Core` behind a mutex.
//!
//! Storage: every change is encoded into the journal's [`Stager`] as it is applied. With the
//! journal attached (the default, and the tests), each change is written and synced before it
//! is applied, and a failed write changes nothing. Detached (`Core::detach_journal`), the
//! server's writer thread takes what was staged ([`Core::take_batch`]) and writes it with the
//! lock released, so heartbeats never wait on a disk; the server answers a request only once
//! the changes it saw are durable ([`Core::unsynced`]). After a failed
//! write ctl refuses new changes (503 `storage`) until a full rewrite of its state succeeds.
//!
//! Driver contract: after every call that may queue commands (`join`, `leave`, `remove`, `end`,
//! `set_drain`, `tick`), drain [`Core::poll_woken`] and wake the long polls of those relays; call
//! [`Core::tick`] at least every 500 ms.
#![forbid(unsafe_code)]

use crate::accounts::{AccountRecord, Accounts, DiscoveryBudget, Refusal, Sms, Verifier};
use crate::commands::{Command, Queues};
use crate::config::Config;
use crate::error::ApiError;
use crate::journal::{Batch, Journal, JournalError, Stager};
use crate::meetings::{Meeting, Meetings, Seeds, MAX_NAME_LEN};
use crate::membership::{Heartbeat, HeartbeatError, HeartbeatOutcome, Membership, Relay};
use crate::placement::{Key, Move, Node, NodeId, NodeState, Placement, Placer, PlacerConfig};
use ed25519_dalek::SigningKey;
use proto::token::{Claims, Permissions, TokenKind, TokenVerifier, TOKEN_TEXT_LEN};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::api_types::*;

/// Per-shard weight ceiling, Gbit/s: one shard is one core, and one core forwards about this
/// much. A relay's weight is its NIC spread over its shards, capped by what a core can do, so
/// that neither a fat NIC on two cores nor many cores on a thin NIC looks bigger than it is.
pub const SHARD_GBPS_MAX: f64 = 10.0;
/// Relays dead this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How often idle meetings are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);
/// A rejoin refreshes a meeting's `last_active` on disk at most this often.
const TOUCH_EVERY_S: u64 = 60;
/// Meeting creation retries on an id or code collision (each has probability below 2^-40).
const CREATE_TRIES: usize = 8;

/// The time of an input: monotonic for liveness, unix seconds for tokens and records.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub unix_s: u64,
}

impl Now {
    /// The system clocks.
    pub fn system() -> Self {
        let unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            mono: Instant::now(),
            unix_s,
        }
    }
}

/// What is placed: a meeting's room, or a user's chat home. Each has its own placer, because
/// relays report rooms per shard but not users, and a load report must not erase the count of
/// users placed since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Room,
    User,
}

/// A (relay, shard) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub relay_id: u32,
    pub shard_idx: u16,
}

impl Slot {
    fn of(node: NodeId) -> Self {
        // Node ids are built from u32 relay ids (`node_id`), so the relay part fits.
        Self {
            relay_id: u32::try_from(node.relay_id()).expect("node ids hold u32 relay ids"),
            shard_idx: node.shard_idx(),
        }
    }
}

/// A placement as stored and listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub scope: Scope,
    pub id: u64,
    pub relay_id: u32,
    pub shard_idx: u16,
    /// The top-k ranked slots when placed, best first.
    pub candidates: Vec<Slot>,
    pub placed_at: u64,
}

/// One journal record.
///
/// Externally tagged (`{"meeting": {...}}`): serde buffers internally tagged enums, and the
/// buffer loses serde_json's reading of numeric map keys (participant ids) from strings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Record {
    Meeting(Meeting),
    MeetingEnded(u64),
    Placed(Placed),
    Released {
        scope: Scope,
        id: u64,
    },
    /// The cluster's chat owners (shard addresses), fixed once and for good.
    Cluster(Vec<u16>),
    /// A sign-in's account or device, or an account deleted.
    Account(AccountRecord),
}

/// Counters for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub heartbeats: u64,
    pub registrations: u64,
    pub relay_deaths: u64,
    pub meetings_created: u64,
    pub meetings_ended: u64,
    pub meetings_expired: u64,
    pub joins: u64,
    pub leaves: u64,
    pub removals: u64,
    pub placements: u64,
    pub moves: u64,
    pub commands_queued: u64,
    pub commands_delivered: u64,
    pub journal_errors: u64,
    pub compactions: u64,
}

/// Who is joining.
enum Joiner {
    Existing { participant: u64, host: bool },
    New,
}

/// The control state.
pub struct Core {
    cfg: Config,
    key: SigningKey,
    verifier: TokenVerifier,
    public_key_hex: String,
    members: Membership,
    rooms: Placer,
    users: Placer,
    placed: BTreeMap<(Scope, u64), Placed>,
    /// The id of every placed key: the placer reports moves by key, a hash of the id.
    ids: HashMap<(Scope, Key), u64>,
    /// Placements on record per (scope, relay, shard). Relays report no user load, so this is
    /// the users placer's load report; it also counts placements restored from the journal,
    /// which the placer (fresh at every start) does not know.
    per_slot: HashMap<(Scope, u32, u16), u64>,
    meetings: Meetings,
    /// The file, while the core writes it itself (inline); `None` once a writer thread has it.
    journal: Option<Journal<Record>>,
    stager: Stager<Record>,
    /// A detached write failed: new changes are refused until a full rewrite succeeds.
    journal_failed: bool,
    queues: Queues,
    started: Instant,
    /// Placements on relays not heard from since start are left alone until the grace ends.
    swept_after_grace: bool,
    /// When idle meetings are next looked for.
    next_expiry_sweep: Instant,
    /// Rooms moved off each relay while it was dead, to close there if it comes back, each
    /// with the fence of its `CloseRoom`: the latest expiry of a token issued for it there.
    evicted: BTreeMap<u32, Vec<(u64, u64)>>,
    /// Relays that came back and have not yet taken the `CloseRoom`s of their moved rooms: no
    /// lease for them until they have, so that they take no join for a room that moved.
    fencing: BTreeSet<u32>,
    /// The chat owners of the cluster (shard addresses), once formed.
    cluster: Option<Vec<u16>>,
    /// The stager's sequence number of the record that formed it (0: restored from disk).
    cluster_seq: u64,
    /// Accounts by phone number, and their device credentials (durable).
    accounts: Accounts,
    /// Verification sessions under way (in memory: a restart asks for a new code).
    sign_ins: Verifier,
    /// Contact-discovery lookups each account has spent today (in memory).
    discovery: DiscoveryBudget,
    pub stats: Stats,
}

fn node_id(relay_id: u32, shard_idx: u16) -> NodeId {
    NodeId::shard(u64::from(relay_id), shard_idx)
}

fn key(id: u64) -> Key {
    Key::from_u64(id)
}

fn shard_weight(relay: &Relay) -> f64 {
    (relay.nic_gbps / f64::from(relay.shards)).min(SHARD_GBPS_MAX)
}

impl Core {
    /// Opens the journal in `data_dir` and rebuilds the state from it.
    pub fn open(
        cfg: Config,
        key: SigningKey,
        data_dir: &Path,
        now: Now,
    ) -> Result<Self, JournalError> {
        let (journal, records) = Journal::open(&data_dir.join("state.journal"))?;
        let mut core = Self::restore(cfg, key, records, now);
        core.journal = Some(journal);
        Ok(core)
    }

    /// Rebuilds the state from `records` (in commit order) with no journal attached: changes
    /// are staged for a writer ([`Core::take_batch`]), as with a detached journal.
    pub(crate) fn restore(cfg: Config, key: SigningKey, records: Vec<Record>, now: Now) -> Self {
        let placer_cfg = PlacerConfig {
            n_candidates: cfg.placement_candidates,
            load_cap: cfg.load_cap,
        };
        // Config::validate checked the ranges Placer::new checks.
        let placer = || Placer::new(placer_cfg).expect("validated placer config");
        let dead_after = Duration::from_millis(cfg.dead_after_ms);
        let mut core = Self {
            verifier: TokenVerifier::new(key.verifying_key(), 0),
            public_key_hex: crate::keys::public_hex(&key),
            key,
            members: Membership::new(dead_after, FORGET_AFTER),
            rooms: placer(),
            users: placer(),
            placed: BTreeMap::new(),
            ids: HashMap::new(),
            per_slot: HashMap::new(),
            meetings: Meetings::default(),
            stager: Stager::new(records.len()),
            journal: None,
            journal_failed: false,
            queues: Queues::default(),
            started: now.mono,
            swept_after_grace: false,
            next_expiry_sweep: now.mono,
            evicted: BTreeMap::new(),
            fencing: BTreeSet::new(),
            cluster: None,
            cluster_seq: 0,
            accounts: Accounts::default(),
            sign_ins: Verifier::default(),
            discovery: DiscoveryBudget::default(),
            stats: Stats::default(),
            cfg,
        };
        for r in records {
            core.apply(r);
        }
        core
    }

    fn apply(&mut self, r: Record) {
        match r {
            Record::Meeting(meeting) => self.meetings.insert(meeting),
            Record::MeetingEnded(id) => {
                self.meetings.remove(id);
            }
            Record::Placed(placed) => {
                self.ids.insert((placed.scope, key(placed.id)), placed.id);
                self.count_slot(&placed, 1);
                let old = self.placed.insert((placed.scope, placed.id), placed);
                if let Some(old) = old {
                    self.count_slot(&old, -1);
                }
            }
            Record::Cluster(owners) => self.cluster = Some(owners),
            Record::Account(r) => self.accounts.apply(&r),
            Record::Released { scope, id } => {
                self.ids.remove(&(scope, key(id)));
                if let Some(old) = self.placed.remove(&(scope, id)) {
                    self.count_slot(&old, -1);
                }
            }
        }
    }

    fn count_slot(&mut self, p: &Placed, delta: i64) {
        let n = self
            .per_slot
            .entry((p.scope, p.relay_id, p.shard_idx))
            .or_default();
        *n = n.saturating_add_signed(delta);
    }

    /// Stages `r` and applies it; with the journal attached, makes it durable first. On a
    /// storage error nothing changes.
    fn commit(&mut self, r: Record) -> Result<(), ApiError> {
        if self.journal_failed {
            return Err(ApiError::Storage);
        }
        self.stager.stage(&r);
        if self.write_inline().is_err() {
            self.stats.journal_errors += 1;
            return Err(ApiError::Storage);
        }
        self.apply(r);
        Ok(())
    }

    /// With the journal attached, writes whatever is staged.
    fn write_inline(&mut self) -> Result<(), JournalError> {
        let Some(journal) = &mut self.journal else {
            return Ok(());
        };
        let Some(batch) = self.stager.take() else {
            return Ok(());
        };
        journal.write(&batch)?;
        self.stager.written(batch.seq);
        if batch.is_snapshot() {
            self.stats.compactions += 1;
        }
        Ok(())
    }

    /// Hands the journal to a writer thread: from now on changes are staged, and the writer
    /// takes them with [`Core::take_batch`] and reports with [`Core::batch_written`].
    pub(crate) fn detach_journal(&mut self) -> Option<Journal<Record>> {
        self.journal.take()
    }

    /// What the writer should write next: everything staged since the last batch, or after a
    /// failed write the whole state (a failed append may have lost records it had taken).
    pub fn take_batch(&mut self) -> Option<Batch> {
        if self.journal_failed {
            self.stage_snapshot();
        }
        self.stager.take()
    }

    /// The writer's report on a batch it took: written and synced, or failed.
    pub fn batch_written(&mut self, batch: &Batch, ok: bool) {
        if ok {
            self.stager.written(batch.seq);
            self.journal_failed = false;
            if batch.is_snapshot() {
                self.stats.compactions += 1;
            }
        } else {
            self.journal_failed = true;
            self.stats.journal_errors += 1;
        }
    }

    /// With the journal detached, the sequence number a request that saw the current state
    /// must see durable before it is answered (None: nothing it saw is still in flight).
    pub fn unsynced(&self) -> Option<u64> {
        let staged = self.stager.staged_seq();
        (self.journal.is_none() && self.stager.durable_seq() < staged).then_some(staged)
    }

    /// Whether a detached writer has something to take.
    pub fn has_staged(&self) -> bool {
        self.journal.is_none() && self.journal_failed || self.unsynced().is_some()
    }

    fn stage_snapshot(&mut self) {
        let records: Vec<Record> = self
            .meetings
            .iter()
            .map(|m| Record::Meeting(m.clone()))
            .chain(self.placed.values().map(|p| Record::Placed(p.clone())))
            .chain(self.cluster.iter().map(|o| Record::Cluster(o.clone())))
            .chain(self.accounts.records().map(Record::Account))
            .collect();
        self.stager.stage_snapshot(records.iter());
    }

    /// Whether ctl is still within `dead_after` of its start, re-learning membership.
    pub fn in_grace(&self, now: &Now) -> bool {
        now.mono.saturating_duration_since(self.started) < self.dead_after()
    }

    fn dead_after(&self) -> Duration {
        Duration::from_millis(self.cfg.dead_after_ms)
    }

    /// ctl's key: tokens are signed with it and credentials derived from it.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The configuration this core runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn public_key_hex(&self) -> &str {
        &self.public_key_hex
    }

    pub fn members(&self) -> &Membership {
        &self.members
    }

    pub fn meetings(&self) -> &Meetings {
        &self.meetings
    }

    pub fn queues(&self) -> &Queues {
        &self.queues
    }

    /// Every placement, rooms first, by id.
    pub fn placements(&self) -> impl Iterator<Item = &Placed> {
        self.placed.values()
    }

    pub fn placement(&self, scope: Scope, id: u64) -> Option<&Placed> {
        self.placed.get(&(scope, id))
    }

    /// The placer's load count of a slot (last report, corrected by placements since).
    pub fn placer_load(&self, scope: Scope, slot: Slot) -> Option<u64> {
        self.placer(scope)
            .load(node_id(slot.relay_id, slot.shard_idx))
    }

    fn placer(&self, scope: Scope) -> &Placer {
        match scope {
            Scope::Room => &self.rooms,
            Scope::User => &self.users,
        }
    }

    fn placer_mut(&mut self, scope: Scope) -> &mut Placer {
        match scope {
            Scope::Room => &mut self.rooms,
            Scope::User => &mut self.users,
        }
    }

    /// The next relay with newly queued commands.
    pub fn poll_woken(&mut self) -> Option<u32> {
        self.queues.poll_woken()
    }

    /// Takes the commands waiting for `relay_id` (at most once).
    pub fn take_commands(&mut self, relay_id: u32) -> Vec<Command> {
        let cmds = self.queues.take(relay_id);
        if self.queues.pending(relay_id) == 0 {
            self.fencing.remove(&relay_id);
        }
        self.stats.commands_delivered += cmds.len() as u64;
        cmds
    }

    fn send(&mut self, relay_id: u32, cmd: Command) {
        self.stats.commands_queued += 1;
        self.queues.push(relay_id, cmd);
    }

    /// Sends `cmd` to the relay hosting the meeting's room, if it is placed on a relay that is
    /// not known to be dead.
    fn send_to_room(&mut self, meeting_id: u64, cmd: Command) {
        let Some(p) = self.placed.get(&(Scope::Room, meeting_id)) else {
            return;
        };
        let relay_id = p.relay_id;
        // Unknown (just restarted) counts as alive: it may be about to heartbeat.
        let known_dead = self
            .members
            .get(relay_id)
            .is_some_and(|r| !r.keeps_existing());
        if !known_dead {
            self.send(relay_id, cmd);
        }
    }
}

// Membership and placement upkeep.
impl Core {
    /// A relay's heartbeat: updates membership and the placers' nodes and loads.
    pub fn handle_heartbeat(
        &mut self,
        now: &Now,
        hb: Heartbeat,
    ) -> Result<HeartbeatAnswer, ApiError> {
        let relay_id = hb.relay_id;
        let before = self
            .members
            .get(relay_id)
            .filter(|r| !r.dead)
            .map(|r| (r.shards, shard_weight(r), r.takes_new()));
        let outcome = self
            .members
            .handle_heartbeat(now.mono, hb)
            .map_err(|e| match e {
                HeartbeatError::Invalid(why) => ApiError::Invalid(why.to_string()),
                HeartbeatError::TooManyRelays => ApiError::TooManyRelays,
            })?;
        self.stats.heartbeats += 1;
        if outcome != HeartbeatOutcome::Refreshed {
            self.stats.registrations += 1;
            self.close_evicted(relay_id);
        }
        self.sync_nodes(relay_id, before, now);
        let lease_ms = if self.fencing.contains(&relay_id) {
            0
        } else {
            self.cfg.lease_ms()
        };
        self.form_cluster();
        Ok(HeartbeatAnswer {
            public_key: self.public_key_hex.clone(),
            heartbeat_ms: self.cfg.heartbeat_ms,
            lease_ms,
            cluster: self.cluster_view(relay_id, now),
        })
    }

    /// Fixes the chat owners once `cluster_relays` relays with link ports are alive: every
    /// shard of each, by relay number. Never changes them again (a chat never moves).
    fn form_cluster(&mut self) {
        if self.cluster.is_some() || self.cfg.cluster_relays == 0 {
            return;
        }
        let mut linked: Vec<(u32, u16)> = self
            .members
            .iter()
            .filter(|r| !r.dead && r.link_port.is_some() && (1..=255).contains(&r.id))
            .map(|r| (r.id, r.shards.min(256)))
            .collect();
        if linked.len() < self.cfg.cluster_relays {
            return;
        }
        linked.sort_unstable();
        let owners = linked
            .iter()
            .flat_map(|&(id, shards)| (0..shards).map(move |s| ((id as u16) << 8) | s))
            .collect();
        // Durable before any relay hears of it (`cluster_view` waits for the writer).
        if self.commit(Record::Cluster(owners)).is_ok() {
            self.cluster_seq = self.stager.staged_seq();
        }
    }

    /// The cluster as relay `relay_id` should see it, once formed and durable.
    fn cluster_view(&self, relay_id: u32, now: &Now) -> Option<ClusterView> {
        let owners = self.cluster.as_ref()?;
        if self.stager.durable_seq() < self.cluster_seq && self.journal.is_none() {
            return None;
        }
        self.members.get(relay_id)?.link_port?;
        let links = self
            .members
            .iter()
            .filter(|r| !r.dead && r.id != relay_id)
            .filter_map(|r| Some((r.id, format!("{}:{}", r.host, r.link_port?))))
            .collect();
        let claims = Claims {
            kind: TokenKind::Relay,
            permissions: Permissions::default(),
            relay_id: 0,
            shard_idx: 0,
            expires_at: now.unix_s + self.cfg.token_ttl_s,
            scope_id: u64::from(relay_id),
            participant_id: 0,
        };
        Some(ClusterView {
            owners: owners.clone(),
            links,
            link_token: claims.sign_text(&self.key),
        })
    }

    /// Brings the placers' view of a relay's shards in line with membership. Rebuilding a
    /// ranker costs O(n log n), so nodes are touched only when shards, weight or state change;
    /// load reports are cheap and go in every time.
    fn sync_nodes(&mut self, relay_id: u32, before: Option<(u16, f64, bool)>, now: &Now) {
        let Some(relay) = self.members.get(relay_id) else {
            return;
        };
        let now_shape = (relay.shards, shard_weight(relay), relay.takes_new());
        let linked_or_alone = self.cfg.cluster_relays == 0 || relay.link_port.is_some();
        let loads: Vec<u64> = (0..relay.shards)
            .map(|s| u64::from(relay.shard_rooms(s)))
            .collect();
        if before != Some(now_shape) {
            let (shards, weight, serving) = now_shape;
            let state = if serving {
                NodeState::Serving
            } else {
                NodeState::Draining
            };
            for shard_idx in 0..shards {
                let node = Node {
                    id: node_id(relay_id, shard_idx),
                    weight,
                    state,
                };
                // Weights were validated with the heartbeat: finite, positive, normal.
                let _ = self.rooms.upsert_node(node);
                // In a cluster, a relay without links homes no user: its users could not reach
                // the chats owned elsewhere.
                let user_node = Node {
                    state: if linked_or_alone {
                        state
                    } else {
                        NodeState::Draining
                    },
                    ..node
                };
                let _ = self.users.upsert_node(user_node);
            }
            let old_shards = before.map_or(0, |b| b.0);
            for shard_idx in shards..old_shards {
                self.remove_node(relay_id, shard_idx, now);
            }
        }
        for (shard_idx, rooms) in (0u16..).zip(loads) {
            let node = node_id(relay_id, shard_idx);
            let _ = self.rooms.handle_load_report(node, rooms);
            let users = self.per_slot.get(&(Scope::User, relay_id, shard_idx));
            let _ = self
                .users
                .handle_load_report(node, users.copied().unwrap_or(0));
        }
    }

    fn remove_node(&mut self, relay_id: u32, shard_idx: u16, now: &Now) {
        for scope in [Scope::Room, Scope::User] {
            if let Ok(moves) = self
                .placer_mut(scope)
                .remove_node(node_id(relay_id, shard_idx))
            {
                self.apply_moves(scope, &moves, now);
            }
        }
    }

    fn apply_moves(&mut self, scope: Scope, moves: &[Move], now: &Now) {
        for m in moves {
            let Some(&id) = self.ids.get(&(scope, m.key)) else {
                continue;
            };
            let placement =
                m.to.and_then(|_| self.placer(scope).placement(m.key).copied());
            let record = match placement {
                Some(p) => Record::Placed(placed(scope, id, &p, now)),
                None => Record::Released { scope, id },
            };
            self.stats.moves += 1;
            self.note_eviction(scope, Slot::of(m.from).relay_id, id, now);
            // A failed write leaves the old placement on record; the sweep retries it.
            let _ = self.commit(record);
        }
    }

    /// Periodic work: relay deaths (their rooms move to their next candidates), the sweep of
    /// placements left on relays that never came back after a restart, journal compaction.
    pub fn tick(&mut self, now: &Now) {
        self.reap(now);
        self.evicted
            .retain(|relay_id, _| self.members.get(*relay_id).is_some());
        if !self.swept_after_grace && !self.in_grace(now) {
            self.swept_after_grace = true;
            self.sweep(now);
        }
        if now.mono >= self.next_expiry_sweep {
            self.next_expiry_sweep = now.mono + EXPIRY_SWEEP;
            self.expire_idle(now);
            self.sign_ins.sweep(now.mono);
        }
        self.maybe_compact();
    }

    /// Declares relays silent for `dead_after` dead and moves their placements. Runs on every
    /// tick and before every placement lookup, so that no join is sent to a relay that has
    /// just crossed the line between two ticks.
    fn reap(&mut self, now: &Now) {
        for relay_id in self.members.poll_deaths(now.mono) {
            self.stats.relay_deaths += 1;
            // The rooms it was still to close stay owed: if it comes back again it is told
            // again (and gets no lease until it has taken them), or it would serve them
            // beside the relays they moved to.
            while self.queues.pending(relay_id) > 0 {
                for cmd in self.queues.take(relay_id) {
                    if let Command::CloseRoom { room, fence } = cmd {
                        self.evicted
                            .entry(relay_id)
                            .or_default()
                            .push((room, fence));
                    }
                }
            }
            self.fencing.remove(&relay_id);
            let shards = self.members.get(relay_id).map_or(0, |r| r.shards);
            for shard_idx in 0..shards {
                self.remove_node(relay_id, shard_idx, now);
            }
            self.sweep(now);
        }
    }

    /// Remembers that a room moved off `relay_id`, so that if the relay comes back (it was
    /// cut off, not dead) it is told to close the room rather than keep half the meeting.
    ///
    /// Every token for the room on that relay was issued before now, so it expires by
    /// [`Core::fence`]; a token issued once the room may return there (the relay must heartbeat
    /// again first, seconds later) expires after it.
    fn note_eviction(&mut self, scope: Scope, relay_id: u32, id: u64, now: &Now) {
        if scope == Scope::Room {
            let fence = self.fence(now);
            self.evicted.entry(relay_id).or_default().push((id, fence));
        }
    }

    /// The expiry of a token issued now: the fence that refuses every token issued so far.
    fn fence(&self, now: &Now) -> u64 {
        now.unix_s + self.cfg.token_ttl_s
    }

    /// A relay came back: close the rooms that moved away while it was gone.
    fn close_evicted(&mut self, relay_id: u32) {
        for (room, fence) in self.evicted.remove(&relay_id).unwrap_or_default() {
            let back = self
                .placed
                .get(&(Scope::Room, room))
                .is_some_and(|p| p.relay_id == relay_id);
            if !back {
                self.send(relay_id, Command::CloseRoom { room, fence });
                self.fencing.insert(relay_id);
            }
        }
    }

    /// Ends meetings nobody joined or rejoined for `meeting_idle_s`.
    fn expire_idle(&mut self, now: &Now) {
        let horizon = now.unix_s.saturating_sub(self.cfg.meeting_idle_s);
        let idle: Vec<u64> = self
            .meetings
            .iter()
            .filter(|m| m.last_active < horizon)
            .map(|m| m.id)
            .collect();
        for id in idle {
            if self.close_meeting(now, id).is_ok() {
                self.stats.meetings_expired += 1;
            }
        }
    }

    /// Re-places every placement whose relay is dead, gone, too small for its shard, or (after
    /// the start-up grace) never heard from: the placer does not know placements restored from
    /// the journal, so it cannot move them itself.
    fn sweep(&mut self, now: &Now) {
        let grace = self.in_grace(now);
        let orphans: Vec<(Scope, u64)> = self
            .placed
            .values()
            .filter(|p| match self.members.get(p.relay_id) {
                Some(r) => !r.keeps_existing() || p.shard_idx >= r.shards,
                None => !grace,
            })
            .map(|p| (p.scope, p.id))
            .collect();
        for (scope, id) in orphans {
            let _ = self.replace(scope, id, now);
        }
    }

    /// A new placement for (scope, id), made durable.
    fn replace(&mut self, scope: Scope, id: u64, now: &Now) -> Result<Placed, ApiError> {
        let k = key(id);
        let p = self
            .placer_mut(scope)
            .place(k)
            .map_err(|_| ApiError::NoRelay)?;
        let placed = placed(scope, id, &p, now);
        let from = self.placed.get(&(scope, id)).map(|old| old.relay_id);
        if let Err(e) = self.commit(Record::Placed(placed.clone())) {
            self.placer_mut(scope).release(k);
            return Err(e);
        }
        self.stats.placements += 1;
        if let Some(relay_id) = from.filter(|&r| r != placed.relay_id) {
            self.stats.moves += 1;
            self.note_eviction(scope, relay_id, id, now);
        }
        Ok(placed)
    }

    /// Where (scope, id) lives: its sticky placement while its relay lives, else a new one.
    fn locate(&mut self, scope: Scope, id: u64, now: &Now) -> Result<Placed, ApiError> {
        self.reap(now);
        if let Some(p) = self.placed.get(&(scope, id)) {
            match self.members.get(p.relay_id) {
                // A room stays on a draining relay until it ends; in a cluster a user's chat
                // home moves (the relay ends its sessions, PROTOCOL.md 7.2; alone, the relay
                // keeps them: the user's chats are stored there).
                Some(r)
                    if r.keeps_existing()
                        && (scope == Scope::Room
                            || r.takes_new()
                            || self.cfg.cluster_relays == 0)
                        && p.shard_idx < r.shards =>
                {
                    return Ok(p.clone())
                }
                // Just restarted: the relay may still be alive and about to heartbeat.
                None if self.in_grace(now) => return Err(ApiError::NoRelay),
                // A user on a draining relay: the placer keeps a key on a draining node, so it
                // lets go of it first.
                Some(r) if r.keeps_existing() => {
                    let _ = self.placer_mut(scope).release(key(id));
                }
                _ => {}
            }
        }
        self.replace(scope, id, now)
    }

    fn release(&mut self, scope: Scope, id: u64) -> Result<(), ApiError> {
        if self.placed.contains_key(&(scope, id)) {
            self.commit(Record::Released { scope, id })?;
        }
        self.placer_mut(scope).release(key(id));
        Ok(())
    }

    /// Drains a relay (or puts it back in service) on an operator's word.
    pub fn set_drain(&mut self, relay_id: u32, drain: bool, now: &Now) -> Result<(), ApiError> {
        let before = self
            .members
            .get(relay_id)
            .filter(|r| !r.dead)
            .map(|r| (r.shards, shard_weight(r), r.takes_new()));
        if !self.members.set_drain(relay_id, drain) {
            return Err(ApiError::UnknownRelay);
        }
        self.sync_nodes(relay_id, before, now);
        self.send(
            relay_id,
            if drain {
                Command::Drain
            } else {
                Command::Undrain
            },
        );
        Ok(())
    }

    /// Rewrites the journal with only the live state once it holds more than twice the live
    /// records plus `journal_slack_records`, or more than twice the bytes of the last rewrite
    /// plus `journal_slack_bytes`: by count alone, a loop of changes to large records (a join
    /// and a leave with the longest names in a full meeting rewrite its whole record each)
    /// would grow it by the largest record's size times the slack.
    fn maybe_compact(&mut self) {
        let live = self.meetings.len()
            + self.placed.len()
            + self.accounts.record_count()
            + usize::from(self.cluster.is_some());
        let by_count = self.stager.on_file() > 2 * live + self.cfg.journal_slack_records;
        let by_bytes = self.stager.bytes_on_file()
            > 2 * self.stager.snapshot_bytes() + self.cfg.journal_slack_bytes;
        if self.journal_failed || !(by_count || by_bytes) {
            return;
        }
        self.stage_snapshot();
        if self.write_inline().is_err() {
            self.stats.journal_errors += 1;
        }
    }
}

fn placed(scope: Scope, id: u64, p: &Placement, now: &Now) -> Placed {
    let slot = Slot::of(p.node);
    Placed {
        scope,
        id,
        relay_id: slot.relay_id,
        shard_idx: slot.shard_idx,
        candidates: p.candidates.iter().map(|&n| Slot::of(n)).collect(),
        placed_at: now.unix_s,
    }
}

// Meetings.
impl Core {
    /// Creates a meeting; its creator is the host, participant 1, and is admitted at once when
    /// a relay is serving.
    /// Creates a meeting for account `owner` (0: an operator's, with the admin credential),
    /// which may have at most `meetings_per_account` open at once; every limit is checked
    /// before anything is stored.
    pub fn create_meeting(
        &mut self,
        now: &Now,
        req: CreateMeeting,
        owner: u64,
    ) -> Result<Created, ApiError> {
        let title = bounded_name(req.title, "title")?;
        let host_name = bounded_name(req.host_name, "host_name")?;
        if self.meetings.len() >= self.cfg.max_meetings {
            return Err(ApiError::TooManyMeetings);
        }
        let limit = self.cfg.meetings_per_account;
        if owner != 0 && self.meetings.owned_by(owner) >= limit {
            return Err(ApiError::AccountMeetingLimit(limit));
        }
        let (id, secret) = self.insert_meeting(title, host_name, owner, now)?;
        self.stats.meetings_created += 1;
        let m = self.meetings.get(id).expect("just inserted");
        let code = m.display_code();
        let join = match self.locate(Scope::Room, id, now) {
            Ok(p) => Some(self.admission(id, 1, true, &p, now)),
            Err(_) => None,
        };
        Ok(Created {
            meeting_id: id,
            code: code.clone(),
            join_link: format!("{}/j/{code}", self.cfg.public_url()),
            host_participant_id: 1,
            host_secret: secret,
            join,
        })
    }

    fn insert_meeting(
        &mut self,
        title: String,
        host: String,
        owner: u64,
        now: &Now,
    ) -> Result<(u64, String), ApiError> {
        for _ in 0..CREATE_TRIES {
            let seeds = Seeds::random().map_err(|_| ApiError::Storage)?;
            let mut scratch = Meetings::default();
            let Some((id, secret)) =
                scratch.create(&seeds, title.clone(), host.clone(), now.unix_s)
            else {
                continue;
            };
            let mut m = scratch.remove(id).expect("just created");
            m.owner = owner;
            if self.meetings.get(id).is_some() || self.meetings.by_code(&m.code).is_some() {
                continue;
            }
            self.commit(Record::Meeting(m))?;
            return Ok((id, secret));
        }
        Err(ApiError::Storage)
    }

    /// Joins the meeting with `req.code`: as the host with the host's credential in `auth`, as
    /// the same participant again with a `rejoin_token`, else as a new participant.
    pub fn join(
        &mut self,
        now: &Now,
        req: JoinRequest,
        auth: Option<&str>,
    ) -> Result<Joined, ApiError> {
        let name = bounded_name(req.name, "name")?;
        let m = self
            .meetings
            .by_code(&req.code)
            .ok_or(ApiError::UnknownMeeting)?;
        let id = m.id;
        let joiner = match auth {
            Some(cred) => {
                self.check_host(m, cred, now)?;
                Joiner::Existing {
                    participant: m.host_participant,
                    host: true,
                }
            }
            None => self.rejoiner(m, req.rejoin_token.as_deref(), now),
        };
        if matches!(joiner, Joiner::New) && m.participants.len() >= self.cfg.max_participants {
            return Err(ApiError::MeetingFull);
        }
        let placed = self.locate(Scope::Room, id, now)?;
        let (participant, host) = match joiner {
            Joiner::Existing { participant, host } => {
                self.touch(id, now)?;
                (participant, host)
            }
            Joiner::New => (self.add_participant(id, name, now)?, false),
        };
        self.stats.joins += 1;
        Ok(self.admission(id, participant, host, &placed, now))
    }

    fn rejoiner(&self, m: &Meeting, token: Option<&str>, now: &Now) -> Joiner {
        let claims = token.and_then(|t| self.verifier.verify_text(t.as_bytes(), now.unix_s).ok());
        match claims {
            Some(c) if c.kind == TokenKind::Room && c.scope_id == m.id => {
                match m.participants.get(&c.participant_id) {
                    Some(p) => Joiner::Existing {
                        participant: c.participant_id,
                        host: p.host,
                    },
                    None => Joiner::New,
                }
            }
            _ => Joiner::New,
        }
    }

    /// Records that the meeting is in use (a rejoin), at most once a minute.
    fn touch(&mut self, id: u64, now: &Now) -> Result<(), ApiError> {
        let m = self.meeting(id)?;
        if now.unix_s < m.last_active.saturating_add(TOUCH_EVERY_S) {
            return Ok(());
        }
        let mut m = m.clone();
        m.last_active = now.unix_s;
        self.commit(Record::Meeting(m))
    }

    fn add_participant(&mut self, id: u64, name: String, now: &Now) -> Result<u64, ApiError> {
        let mut m = self
            .meetings
            .get(id)
            .ok_or(ApiError::UnknownMeeting)?
            .clone();
        let participant = m.add_participant(name, false, now.unix_s);
        self.commit(Record::Meeting(m))?;
        Ok(participant)
    }

    /// The answer to a successful join: where to send media and the token to bind with.
    fn admission(
        &self,
        meeting_id: u64,
        participant: u64,
        host: bool,
        p: &Placed,
        now: &Now,
    ) -> Joined {
        let mut permissions = Permissions::PUBLISH | Permissions::SUBSCRIBE | Permissions::CHAT;
        if host {
            permissions = permissions | Permissions::HOST;
        }
        let expires_at = now.unix_s + self.cfg.token_ttl_s;
        let claims = Claims {
            kind: TokenKind::Room,
            permissions,
            relay_id: p.relay_id,
            shard_idx: p.shard_idx,
            expires_at,
            scope_id: meeting_id,
            participant_id: participant,
        };
        let relay = self.members.get(p.relay_id);
        let relay_host = relay.map_or_else(String::new, |r| r.host.clone());
        let udp_port = relay.map_or(0, |r| r.udp_base_port.saturating_add(p.shard_idx));
        Joined {
            meeting_id,
            participant_id: participant,
            is_host: host,
            relay_id: p.relay_id,
            relay_host: relay_host.clone(),
            udp_port,
            shard_idx: p.shard_idx,
            token: claims.sign_text(&self.key),
            expires_at,
            chat: ChatEndpoint {
                host: relay_host,
                port: relay.and_then(|r| r.chat_port),
            },
        }
    }

    /// Checks that `cred` is the meeting's host secret or a valid host token for it.
    fn check_host(&self, m: &Meeting, cred: &str, now: &Now) -> Result<(), ApiError> {
        if cred.len() != TOKEN_TEXT_LEN {
            return if m.is_host_secret(cred) {
                Ok(())
            } else {
                Err(ApiError::BadCredentials)
            };
        }
        let c = self.verifier.verify_text(cred.as_bytes(), now.unix_s)?;
        if c.kind != TokenKind::Room || c.scope_id != m.id {
            return Err(ApiError::WrongMeeting);
        }
        if !c.permissions.contains(Permissions::HOST) || c.participant_id != m.host_participant {
            return Err(ApiError::NotHost);
        }
        Ok(())
    }

    fn meeting(&self, id: u64) -> Result<&Meeting, ApiError> {
        self.meetings.get(id).ok_or(ApiError::UnknownMeeting)
    }

    /// A participant leaves, authenticated by its own join token.
    pub fn leave(
        &mut self,
        now: &Now,
        meeting_id: u64,
        auth: Option<&str>,
    ) -> Result<u64, ApiError> {
        let m = self.meeting(meeting_id)?;
        let cred = auth.ok_or(ApiError::Unauthenticated)?;
        let c = self.verifier.verify_text(cred.as_bytes(), now.unix_s)?;
        if c.kind != TokenKind::Room || c.scope_id != meeting_id {
            return Err(ApiError::WrongMeeting);
        }
        if !m.participants.contains_key(&c.participant_id) {
            return Err(ApiError::UnknownParticipant);
        }
        self.drop_participant(meeting_id, c.participant_id)?;
        self.stats.leaves += 1;
        Ok(c.participant_id)
    }

    /// The host removes a participant; the relay is told to stop forwarding for it.
    pub fn remove(
        &mut self,
        now: &Now,
        meeting_id: u64,
        participant: u64,
        auth: Option<&str>,
    ) -> Result<(), ApiError> {
        let m = self.meeting(meeting_id)?;
        self.check_host(m, auth.ok_or(ApiError::Unauthenticated)?, now)?;
        if participant == m.host_participant {
            return Err(ApiError::CannotRemoveHost);
        }
        if !m.participants.contains_key(&participant) {
            return Err(ApiError::UnknownParticipant);
        }
        self.drop_participant(meeting_id, participant)?;
        self.stats.removals += 1;
        Ok(())
    }

    fn drop_participant(&mut self, meeting_id: u64, participant: u64) -> Result<(), ApiError> {
        let mut m = self.meeting(meeting_id)?.clone();
        m.participants.remove(&participant);
        self.commit(Record::Meeting(m))?;
        let cmd = Command::RemoveParticipant {
            room: meeting_id,
            participant,
        };
        self.send_to_room(meeting_id, cmd);
        Ok(())
    }

    /// The host ends the meeting: the relay closes the room, the code stops working.
    pub fn end(&mut self, now: &Now, meeting_id: u64, auth: Option<&str>) -> Result<(), ApiError> {
        let m = self.meeting(meeting_id)?;
        self.check_host(m, auth.ok_or(ApiError::Unauthenticated)?, now)?;
        self.close_meeting(now, meeting_id)?;
        self.stats.meetings_ended += 1;
        Ok(())
    }

    /// Forgets a meeting, its code and its placement; its relay closes the room.
    fn close_meeting(&mut self, now: &Now, meeting_id: u64) -> Result<(), ApiError> {
        self.commit(Record::MeetingEnded(meeting_id))?;
        let close = Command::CloseRoom {
            room: meeting_id,
            fence: self.fence(now),
        };
        self.send_to_room(meeting_id, close);
        self.release(Scope::Room, meeting_id)
    }

    /// A user's chat home: its relay and shard (placed on first lookup, sticky after), and a
    /// user token for it.
    pub fn user_home(&mut self, now: &Now, user_id: u64) -> Result<UserHome, ApiError> {
        if user_id == 0 {
            return Err(ApiError::Invalid("user id must be nonzero".into()));
        }
        let p = self.locate(Scope::User, user_id, now)?;
        let relay = self.members.get(p.relay_id);
        // Placement picks the relay; inside it the user's home shard is fixed by the chat
        // protocol (PROTOCOL.md section 7.6), which the relay checks against the token.
        let shard_idx = relay.map_or(p.shard_idx, |r| {
            proto::chat::ids::home_shard(user_id, r.shards)
        });
        let expires_at = now.unix_s + self.cfg.token_ttl_s;
        let claims = Claims {
            kind: TokenKind::User,
            permissions: Permissions::CHAT,
            relay_id: p.relay_id,
            shard_idx,
            expires_at,
            scope_id: user_id,
            participant_id: user_id,
        };
        Ok(UserHome {
            user_id,
            relay_id: p.relay_id,
            host: relay.map_or_else(String::new, |r| r.host.clone()),
            shard_idx,
            chat_port: relay
                .and_then(|r| r.chat_port)
                .and_then(|base| base.checked_add(shard_idx)),
            token: claims.sign_text(&self.key),
            expires_at,
        })
    }
}

fn bounded_name(s: Option<String>, field: &str) -> Result<String, ApiError> {
    let s = s.unwrap_or_default();
    if s.len() > MAX_NAME_LEN || s.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "{field}: at most {MAX_NAME_LEN} bytes, no control characters"
        )));
    }
    Ok(s)
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;

/// Sign-in by phone (ctl/API.md, "Accounts"): verification sessions in memory, accounts and
/// device credentials durable.
impl Core {
    /// Starts a verification session for the number `input` with id `id` and first code
    /// `code` (random, from the caller); the code to send, if the number may get one now.
    pub fn start_verification(
        &mut self,
        now: &Now,
        input: &str,
        id: String,
        code: [u8; 6],
    ) -> Result<(VerificationStarted, Option<Sms>), ApiError> {
        let number = crate::accounts::normalize(input).map_err(refused)?;
        let (sms, next) = self
            .sign_ins
            .start(now.mono, &number, id.clone(), code)
            .map_err(refused)?;
        let started = VerificationStarted {
            session_id: id,
            number,
            code_sent: sms.is_some(),
            next_code_in_s: next,
            expires_in_s: crate::accounts::SESSION_TTL.as_secs(),
        };
        Ok((started, sms))
    }

    /// A new code for session `id`, if its number may get one now.
    pub fn resend_code(
        &mut self,
        now: &Now,
        id: &str,
        code: [u8; 6],
    ) -> Result<(CodeResent, Sms), ApiError> {
        let (sms, next) = self.sign_ins.resend(now.mono, id, code).map_err(refused)?;
        Ok((
            CodeResent {
                next_code_in_s: next,
            },
            sms,
        ))
    }

    /// Checks `code` for session `id`; on a match, signs the number in: its account (made
    /// now, with the unused id `new_user`, on the first sign-in) gets `credential` as its one
    /// device credential, replacing any other device's.
    pub fn verify(
        &mut self,
        now: &Now,
        id: &str,
        code: &str,
        from: std::net::IpAddr,
        new_user: u64,
        credential: String,
    ) -> Result<SignedIn, ApiError> {
        if self.journal_failed {
            return Err(ApiError::Storage);
        }
        let number = self
            .sign_ins
            .check(now.mono, id, code, from)
            .map_err(refused)?;
        let (user_id, new_account) = match self.accounts.user(&number) {
            Some(u) => (u, false),
            None => {
                if self.accounts.exists(new_user) || new_user == 0 {
                    return Err(ApiError::Storage);
                }
                self.commit(Record::Account(AccountRecord::Created {
                    number,
                    user_id: new_user,
                }))?;
                (new_user, true)
            }
        };
        self.commit(Record::Account(AccountRecord::Device {
            user_id,
            credential_sha256: proto::token::hex(&crate::accounts::credential_hash(&credential)),
        }))?;
        Ok(SignedIn {
            user_id,
            device_credential: credential,
            new_account,
        })
    }

    /// The account whose device credential `credential` is.
    pub fn device_user(&self, credential: Option<&str>) -> Result<u64, ApiError> {
        let c = credential.ok_or(ApiError::Unauthenticated)?;
        self.accounts
            .by_credential(c)
            .ok_or(ApiError::BadCredentials)
    }

    /// Removes account `user_id`: its number's mapping and its device credential.
    pub fn delete_account(&mut self, user_id: u64) -> Result<(), ApiError> {
        self.commit(Record::Account(AccountRecord::Deleted { user_id }))
    }

    /// Which of `numbers` (E.164, normalised by the caller, outside the lock) are users,
    /// charged to `user`'s daily budget; `invalid` is how many the caller could not normalise.
    pub fn discover(
        &mut self,
        now: &Now,
        user: u64,
        numbers: std::collections::BTreeSet<String>,
        invalid: usize,
    ) -> Result<Discovered, ApiError> {
        if numbers.len() + invalid > crate::accounts::DISCOVERY_BATCH {
            return Err(ApiError::Invalid(format!(
                "at most {} numbers per request",
                crate::accounts::DISCOVERY_BATCH
            )));
        }
        let n = u32::try_from(numbers.len()).unwrap_or(u32::MAX);
        let budget_left = self.discovery.spend(now.mono, user, n).map_err(refused)?;
        let users = numbers
            .into_iter()
            .filter_map(|number| {
                let user_id = self.accounts.user(&number)?;
                Some(Contact { number, user_id })
            })
            .collect();
        Ok(Discovered {
            users,
            invalid,
            budget_left,
        })
    }

    /// Accounts on record.
    pub fn account_count(&self) -> usize {
        self.accounts.len()
    }
}

fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::InvalidNumber(why) => ApiError::InvalidNumber(why),
        Refusal::UnknownSession => ApiError::UnknownSession,
        Refusal::RetryAfter(s) => ApiError::RetryAfter(s),
        Refusal::WrongCode(left) => ApiError::WrongCode(left),
        Refusal::CodeExpired => ApiError::CodeExpired,
        Refusal::Full => ApiError::TooManySessions,
    }
}
