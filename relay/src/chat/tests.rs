//! Deterministic simulation of a relay's chat shards: in-memory logs with explicit commits and
//! crashes, shard rings as queues, clients as byte streams. Failures replay from their seed.

use super::*;
use crate::chat::log::Lsn;
use crate::engine::Now;
use ed25519_dalek::SigningKey;
use proto::chat::{code, ids, kind, Encoder, Frame, MsgId};
use proto::token::{Claims, Permissions, TokenKind};
use std::collections::{BTreeMap, HashMap};

const N_SHARDS: u16 = 3;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}

/// A received frame, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Got {
    Welcome,
    Sent {
        msg_id: MsgId,
        chat: u64,
        seq: u64,
    },
    Msg {
        chat: u64,
        seq: u64,
        sender: u64,
        kind: u8,
        msg_id: MsgId,
        ref_id: MsgId,
        body: Vec<u8>,
    },
    BacklogEnd,
    Error(u16),
    Groups(Vec<(u64, Vec<u64>)>),
    Typing {
        chat: u64,
        from: u64,
    },
    Pong,
    Presence {
        user: u64,
        online: bool,
    },
}

fn own(f: Frame<'_>) -> Got {
    match f {
        Frame::Welcome { .. } => Got::Welcome,
        Frame::Sent {
            msg_id,
            chat_id,
            seq,
        } => Got::Sent {
            msg_id,
            chat: chat_id,
            seq,
        },
        Frame::Msg(e) => Got::Msg {
            chat: e.chat_id,
            seq: e.seq,
            sender: e.sender,
            kind: e.kind,
            msg_id: e.msg_id,
            ref_id: e.ref_id,
            body: e.body.to_vec(),
        },
        Frame::BacklogEnd => Got::BacklogEnd,
        Frame::Error { code, .. } => Got::Error(code),
        Frame::Groups { raw } => Got::Groups(
            proto::chat::groups(raw)
                .map(|g| g.map(|(c, m)| (c, proto::chat::u64s(m).collect())).unwrap())
                .collect(),
        ),
        Frame::Typing { chat_id, user } => Got::Typing {
            chat: chat_id,
            from: user,
        },
        Frame::Pong { .. } => Got::Pong,
        Frame::Presence { user, online } => Got::Presence { user, online },
        other => panic!("unexpected frame to a client: {other:?}"),
    }
}

/// A log with the real one's deletion rule: records are physically removed only as a dead
/// prefix (whole segments, oldest first); dead records after a live one are replayed.
#[derive(Default)]
struct MemLog {
    /// Committed records still on "disk": lsn -> (kind, payload).
    durable: BTreeMap<u64, (u8, Vec<u8>)>,
    dead: std::collections::HashSet<u64>,
    next_lsn: u64,
}

impl MemLog {
    fn mark_dead(&mut self, lsn: Lsn) {
        self.dead.insert(lsn.0);
        while let Some((&first, _)) = self.durable.first_key_value() {
            if !self.dead.remove(&first) {
                break;
            }
            self.durable.remove(&first);
        }
    }
}

struct Client {
    shard: u16,
    conn: ConnId,
    inbox: Vec<u8>,
    got: Vec<Got>,
    closed: bool,
    /// Not reading: its output stays queued in the shard.
    paused: bool,
}

/// A record as the engine hands it over: kind and payload.
type Rec = (u8, Vec<u8>);

struct Sim {
    now: Now,
    shards: Vec<ChatShard>,
    logs: Vec<MemLog>,
    rings: Vec<VecDeque<ShardMsg>>,
    clients: HashMap<u64, Client>,
    next_conn: ConnId,
    cfg: ChatConfig,
    /// Commit as the I/O layer does with a sync thread: a batch's records are written in one
    /// pass and made durable in a later one, while the shard goes on with other work.
    pipelined: bool,
    pipes: Vec<super::pipeline::CommitPipeline>,
    /// Per shard: the records of the batch in flight (written, not yet durable).
    flying: Vec<Vec<(u64, Rec)>>,
    /// BacklogMore requests that went between shards (each a round trip to an owner).
    backlog_pulls: usize,
}

impl Sim {
    fn new(cfg: ChatConfig) -> Self {
        let now = Now {
            mono_us: 1_000_000,
            unix_s: 1_700_000_000,
        };
        let mut sim = Self {
            now,
            shards: Vec::new(),
            logs: (0..N_SHARDS)
                .map(|_| MemLog {
                    next_lsn: 1,
                    ..MemLog::default()
                })
                .collect(),
            rings: (0..N_SHARDS).map(|_| VecDeque::new()).collect(),
            clients: HashMap::new(),
            next_conn: ConnId(1),
            cfg,
            pipelined: false,
            pipes: (0..N_SHARDS).map(|_| Default::default()).collect(),
            flying: (0..N_SHARDS).map(|_| Vec::new()).collect(),
            backlog_pulls: 0,
        };
        sim.boot();
        sim
    }

    /// (Re)creates the shard engines and replays their durable logs: a restart after a crash.
    fn boot(&mut self) {
        let verifier = TokenVerifier::new(key().verifying_key(), 0);
        self.shards = (0..N_SHARDS)
            .map(|i| ChatShard::new(i, N_SHARDS, self.cfg.clone(), verifier.clone()))
            .collect();
        for (shard, log) in self.shards.iter_mut().zip(&mut self.logs) {
            for (&lsn, (k, p)) in &log.durable {
                shard.replay(Lsn(lsn), *k, p).unwrap();
            }
            shard.finish_replay().unwrap();
            shard.check_invariants();
            for lsn in shard.take_dead() {
                log.mark_dead(lsn);
            }
        }
        self.rings.iter_mut().for_each(VecDeque::clear);
        self.clients.clear();
        // A batch in flight at the crash never became durable.
        self.pipes = (0..N_SHARDS).map(|_| Default::default()).collect();
        self.flying.iter_mut().for_each(Vec::clear);
    }

    fn token(&self, user: u64) -> String {
        Claims {
            kind: TokenKind::User,
            permissions: Permissions::CHAT,
            relay_id: 0,
            shard_idx: ids::home_shard(user, N_SHARDS),
            expires_at: self.now.unix_s + 600,
            scope_id: user,
            participant_id: user,
        }
        .sign_text(&key())
    }

    fn connect_raw(&mut self, user: u64, shard: u16) -> ConnId {
        let conn = self.next_conn;
        self.next_conn.0 += 1;
        assert!(self.shards[usize::from(shard)].handle_accept(
            self.now,
            conn,
            [127, 0, 0, 1].into()
        ));
        self.clients.insert(
            user,
            Client {
                shard,
                conn,
                inbox: Vec::new(),
                got: Vec::new(),
                closed: false,
                paused: false,
            },
        );
        conn
    }

    fn connect(&mut self, user: u64) {
        let shard = ids::home_shard(user, N_SHARDS);
        self.connect_raw(user, shard);
        let t = self.token(user);
        self.send(user, |e| e.hello(t.as_bytes()));
        let mut got = self.take(user);
        assert_eq!(got.first(), Some(&Got::Welcome));
        got.remove(0);
        self.clients.get_mut(&user).unwrap().got = got;
    }

    /// Connects each of `users`, their empty backlogs taken.
    fn connect_all(&mut self, users: &[u64]) {
        for &u in users {
            self.connect(u);
            self.take(u);
        }
    }

    /// `creator` creates a group with `members` (request id `id(n)`); returns its id.
    fn create_group(&mut self, creator: u64, n: u64, members: &[u64]) -> u64 {
        self.send(creator, |e| e.group_create(&id(n), members));
        let got = self.take(creator);
        got.iter()
            .find_map(|g| match g {
                Got::Sent { msg_id, chat, .. } if *msg_id == id(n) => Some(*chat),
                _ => None,
            })
            .unwrap_or_else(|| panic!("group not created: {got:?}"))
    }

    fn send(&mut self, user: u64, write: impl FnOnce(&mut Encoder<'_>)) {
        let mut buf = Vec::new();
        write(&mut Encoder::new(&mut buf));
        let c = &self.clients[&user];
        let (shard, conn) = (usize::from(c.shard), c.conn);
        self.shards[shard].handle_read(self.now, conn, &buf);
        self.run();
    }

    /// Runs every shard until quiet: commits (all durable), rings, client output.
    fn run(&mut self) {
        self.run_with(true);
    }

    /// One pass per shard repeated until nothing moves; with `commit` false, records are
    /// appended but never made durable (what a crash before fdatasync loses).
    fn run_with(&mut self, commit: bool) {
        if !self.run_passes(commit, 10_000) {
            panic!("simulation did not settle");
        }
    }

    /// At most `passes` passes over the shards; true once nothing moves. A crash after a
    /// bounded number of passes catches pipelined batches in flight.
    fn run_passes(&mut self, commit: bool, passes: usize) -> bool {
        for _ in 0..passes {
            let mut moved = false;
            for i in 0..usize::from(N_SHARDS) {
                if !self.rings[i].is_empty() {
                    // As the driver does: the ring's messages together, in order.
                    let msgs: Vec<ShardMsg> = self.rings[i].drain(..).collect();
                    self.shards[i].handle_shard_msgs(self.now, msgs);
                    moved = true;
                }
                if commit && self.pipelined {
                    moved |= self.pipeline_step(i);
                } else if commit && self.shards[i].has_records() {
                    let log = &mut self.logs[i];
                    let records = self.shards[i].take_records();
                    let lsns: Vec<Lsn> = records
                        .iter()
                        .map(|(kind, payload)| {
                            let r = (kind, payload.to_vec());
                            let lsn = log.next_lsn;
                            log.next_lsn += 1;
                            log.durable.insert(lsn, r);
                            Lsn(lsn)
                        })
                        .collect();
                    self.shards[i].give_back_records(records);
                    self.shards[i].handle_committed(self.now, &lsns);
                    moved = true;
                }
                if !self.pipelined {
                    let dead = self.shards[i].take_dead();
                    for &lsn in &dead {
                        self.logs[i].mark_dead(lsn);
                    }
                    self.shards[i].give_back_dead(dead);
                }
                let mut outbox = self.shards[i].take_outbox();
                for (dest, m) in outbox.drain(..) {
                    self.backlog_pulls +=
                        usize::from(matches!(m, ShardMsg::ToOwner(ToOwner::BacklogMore { .. })));
                    self.rings[usize::from(dest)].push_back(m);
                    moved = true;
                }
                self.shards[i].give_back_outbox(outbox);
                let dirty = self.shards[i].take_dirty();
                for &conn in &dirty {
                    let out = self.shards[i].output(conn).to_vec();
                    if let Some(c) = self.clients.values_mut().find(|c| c.conn == conn) {
                        if c.paused {
                            continue;
                        }
                        c.inbox.extend_from_slice(&out);
                    }
                    self.shards[i].handle_written(self.now, conn, out.len());
                    moved = true;
                }
                self.shards[i].give_back_dirty(dirty);
                let closing = self.shards[i].take_closing();
                for &conn in &closing {
                    if let Some(c) = self.clients.values_mut().find(|c| c.conn == conn) {
                        c.inbox.extend_from_slice(self.shards[i].output(conn));
                        c.closed = true;
                    }
                    self.shards[i].handle_closed(self.now, conn);
                    moved = true;
                }
                self.shards[i].give_back_closing(closing);
            }
            for shard in &self.shards {
                shard.check_invariants();
            }
            if !moved {
                return true;
            }
        }
        false
    }

    /// One pipelined step of shard `i`: finish the batch in flight (durable now, its dead
    /// marks applied), or else take the next batch and "start its sync". Dead marks go through
    /// the same [`super::pipeline::CommitPipeline`] as in the I/O layer.
    fn pipeline_step(&mut self, i: usize) -> bool {
        let waiting = self.shards[i].has_records();
        let mut dead = self.shards[i].take_dead();
        self.pipes[i].dead(&mut dead, waiting);
        for &lsn in &dead {
            self.logs[i].mark_dead(lsn);
        }
        self.shards[i].give_back_dead(dead);
        if let Some((lsns, dead)) = self.pipes[i].finished() {
            for (lsn, r) in self.flying[i].drain(..) {
                self.logs[i].durable.insert(lsn, r);
            }
            self.shards[i].handle_committed(self.now, &lsns);
            for &lsn in &dead {
                self.logs[i].mark_dead(lsn);
            }
            self.pipes[i].give_back(lsns, dead);
            return true;
        }
        if !self.shards[i].has_records() {
            return false;
        }
        let log = &mut self.logs[i];
        // The same recycled lists as the I/O layer (`ChatCore::end_turn`) uses.
        let mut lsns = self.pipes[i].lsn_list();
        let records = self.shards[i].take_records();
        for (kind, payload) in records.iter() {
            let r = (kind, payload.to_vec());
            let lsn = log.next_lsn;
            log.next_lsn += 1;
            self.flying[i].push((lsn, r));
            lsns.push(Lsn(lsn));
        }
        self.shards[i].give_back_records(records);
        self.pipes[i].started(lsns);
        true
    }

    /// Decodes and returns everything `user` received since the last call.
    fn take(&mut self, user: u64) -> Vec<Got> {
        let c = self.clients.get_mut(&user).unwrap();
        let mut at = 0;
        let mut got = std::mem::take(&mut c.got);
        while let Some((f, n)) = proto::chat::decode(&c.inbox[at..]).unwrap() {
            got.push(own(f));
            at += n;
        }
        c.inbox.drain(..at);
        got
    }

    fn ack_all(&mut self, user: u64, got: &[Got]) {
        let mut last: BTreeMap<u64, u64> = BTreeMap::new();
        for g in got {
            if let Got::Msg { chat, seq, .. } = g {
                let e = last.entry(*chat).or_default();
                *e = (*e).max(*seq);
            }
        }
        if !last.is_empty() {
            let pairs: Vec<(u64, u64)> = last.into_iter().collect();
            self.send(user, |e| e.ack(&pairs));
        }
    }

    /// `user` stops reading: its output piles up in its shard.
    fn pause(&mut self, user: u64) {
        self.clients.get_mut(&user).unwrap().paused = true;
    }

    /// A paused `user` reads once: everything queued for it is written, then the shards run
    /// (and queue more, which waits for the next read).
    fn read_once(&mut self, user: u64) {
        let c = self.clients.get_mut(&user).unwrap();
        let (shard, conn) = (usize::from(c.shard), c.conn);
        let out = self.shards[shard].output(conn).to_vec();
        c.inbox.extend_from_slice(&out);
        self.shards[shard].handle_written(self.now, conn, out.len());
        self.run();
    }

    /// A paused `user` reads `rounds` times at most, as the client library does (an entry at
    /// or below the highest seq it has seen of its chat is a duplicate), acknowledging after
    /// each read, until it has `want` entries. Returns the first body byte of each, in order.
    fn read_slowly(&mut self, user: u64, rounds: usize, want: usize) -> Vec<u8> {
        let mut highest: HashMap<u64, u64> = HashMap::new();
        let mut firsts = Vec::new();
        for _ in 0..rounds {
            self.read_once(user);
            let got = self.take(user);
            for g in &got {
                if let Got::Msg {
                    chat, seq, body, ..
                } = g
                {
                    let h = highest.entry(*chat).or_default();
                    if *seq > *h {
                        *h = *seq;
                        firsts.push(body[0]);
                    }
                }
            }
            self.ack_all(user, &got);
            if firsts.len() >= want {
                break;
            }
        }
        firsts
    }

    /// The peer closes `user`'s connection.
    fn disconnect(&mut self, user: u64) {
        let c = self.clients.remove(&user).unwrap();
        self.shards[usize::from(c.shard)].handle_closed(self.now, c.conn);
        self.run();
    }

    fn pending(&self) -> usize {
        self.shards.iter().map(ChatShard::n_pending).sum()
    }

    fn durable_records(&self) -> usize {
        self.logs.iter().map(|l| l.durable.len()).sum()
    }
}

fn id(n: u64) -> MsgId {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(&n.to_le_bytes());
    m[15] = 0xee;
    m
}

/// Two users with different home shards, and a third on yet another, for cross-shard tests.
fn users() -> (u64, u64, u64) {
    let mut by_shard: BTreeMap<u16, u64> = BTreeMap::new();
    for u in 1..100u64 {
        by_shard.entry(ids::home_shard(u, N_SHARDS)).or_insert(u);
    }
    let v: Vec<u64> = by_shard.values().copied().collect();
    (v[0], v[1], v[2])
}

fn msgs(got: &[Got]) -> Vec<(u64, u8, Vec<u8>)> {
    got.iter()
        .filter_map(|g| match g {
            Got::Msg {
                sender, kind, body, ..
            } => Some((*sender, *kind, body.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn direct_message_sent_delivered_read_in_order() {
    let mut sim = Sim::new(ChatConfig::default());
    let (alice, bob, _) = users();
    sim.connect(alice);
    sim.connect(bob);
    assert_eq!(sim.take(alice), vec![Got::BacklogEnd]);
    assert_eq!(sim.take(bob), vec![Got::BacklogEnd]);
    let chat = ids::direct_chat(alice, bob);
    sim.send(alice, |e| {
        e.send(&id(1), 0, bob, kind::TEXT, &[0; 16], b"hi bob")
    });
    assert_eq!(
        sim.take(alice),
        vec![Got::Sent {
            msg_id: id(1),
            chat,
            seq: 1
        }],
        "one tick"
    );
    let got = sim.take(bob);
    assert_eq!(msgs(&got), vec![(alice, kind::TEXT, b"hi bob".to_vec())]);
    sim.ack_all(bob, &got);
    let delivered = sim.take(alice);
    assert_eq!(
        msgs(&delivered),
        vec![(bob, kind::DELIVERED, 1u64.to_le_bytes().to_vec())],
        "two ticks"
    );
    sim.send(bob, |e| {
        e.send(&id(2), 0, alice, kind::READ, &id(1), &1u64.to_le_bytes())
    });
    let read = sim.take(alice);
    assert_eq!(
        msgs(&read),
        vec![(bob, kind::READ, 1u64.to_le_bytes().to_vec())],
        "read"
    );
    sim.ack_all(alice, &[delivered, read].concat());
    let got = sim.take(bob);
    sim.ack_all(bob, &got);
    assert_eq!(sim.pending(), 0);
}

#[test]
fn offline_recipient_gets_backlog_in_order_then_inbox_is_empty() {
    let mut sim = Sim::new(ChatConfig {
        backlog_chunk: 4,
        window: 6,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    sim.connect(alice);
    for i in 0..50u64 {
        sim.send(alice, |e| {
            e.send(&id(i), 0, bob, kind::TEXT, &[0; 16], &i.to_le_bytes())
        });
    }
    assert_eq!(
        sim.take(alice)
            .iter()
            .filter(|g| matches!(g, Got::Sent { .. }))
            .count(),
        51 - 1
    );
    sim.connect(bob);
    let mut bodies = Vec::new();
    let mut ended = false;
    for _ in 0..100 {
        let got = sim.take(bob);
        ended |= got.contains(&Got::BacklogEnd);
        bodies.extend(
            msgs(&got)
                .into_iter()
                .map(|(_, _, b)| u64::from_le_bytes(b.try_into().unwrap())),
        );
        if got.is_empty() {
            break;
        }
        sim.ack_all(bob, &got);
    }
    assert!(ended, "end-of-backlog marker");
    assert_eq!(
        bodies,
        (0..50).collect::<Vec<_>>(),
        "whole backlog, in order, once"
    );
    // Alice acknowledges the DELIVERED receipts; then nothing is stored anywhere.
    let receipts = sim.take(alice);
    assert!(msgs(&receipts).iter().all(|m| m.1 == kind::DELIVERED));
    sim.ack_all(alice, &receipts);
    assert_eq!(sim.pending(), 0);
    // After a checkpoint (fresh snapshots), everything before them is a dead prefix: only the
    // chat snapshot is left in the log.
    sim.shards.iter_mut().for_each(ChatShard::checkpoint);
    sim.run();
    assert_eq!(sim.durable_records(), 1);
}

#[test]
fn group_member_added_later_sees_only_from_its_join() {
    let mut sim = Sim::new(ChatConfig::default());
    let members: Vec<u64> = (10..15).collect();
    sim.connect_all(&members);
    let creator = members[0];
    let group = sim.create_group(creator, 100, &members[1..4]);
    assert!(ids::is_group(group));
    sim.send(members[1], |e| {
        e.send(&id(1), group, 0, kind::TEXT, &[0; 16], b"before")
    });
    sim.send(creator, |e| e.group_add(&id(101), group, members[4]));
    sim.send(members[2], |e| {
        e.send(&id(2), group, 0, kind::TEXT, &[0; 16], b"after")
    });
    let late = msgs(&sim.take(members[4]));
    assert_eq!(
        late,
        vec![
            (
                creator,
                kind::MEMBER_ADDED,
                members[4].to_le_bytes().to_vec()
            ),
            (members[2], kind::TEXT, b"after".to_vec())
        ]
    );
    let early = msgs(&sim.take(members[3]));
    assert_eq!(
        early.iter().filter(|m| m.1 == kind::TEXT).count(),
        2,
        "a founding member saw both"
    );
    sim.send(members[4], |e| e.group_list());
    assert_eq!(
        sim.take(members[4]),
        vec![Got::Groups(vec![(group, members.clone())])]
    );
    // A non-member cannot post; a member cannot remove others unless creator.
    sim.connect(99);
    sim.take(99);
    sim.send(99, |e| e.send(&id(3), group, 0, kind::TEXT, &[0; 16], b"x"));
    assert_eq!(sim.take(99), vec![Got::Error(code::NOT_MEMBER)]);
    sim.take(members[1]);
    sim.send(members[1], |e| e.group_remove(&id(4), group, members[2]));
    assert_eq!(sim.take(members[1]), vec![Got::Error(code::NOT_MEMBER)]);
    sim.send(members[2], |e| e.group_leave(&id(5), group));
    sim.send(members[1], |e| {
        e.send(&id(6), group, 0, kind::TEXT, &[0; 16], b"gone")
    });
    assert!(
        msgs(&sim.take(members[2]))
            .iter()
            .all(|m| m.2 != b"gone".to_vec()),
        "left members get nothing new"
    );
}

#[test]
fn retried_message_is_stored_once_and_edits_and_deletes_reach_everyone() {
    let mut sim = Sim::new(ChatConfig::default());
    let (a, b, c) = users();
    sim.connect_all(&[a, b, c]);
    let g = sim.create_group(a, 1, &[b, c]);
    sim.send(a, |e| e.send(&id(2), g, 0, kind::TEXT, &[0; 16], b"v1"));
    sim.send(a, |e| e.send(&id(2), g, 0, kind::TEXT, &[0; 16], b"v1"));
    let sents = sim.take(a);
    assert_eq!(sents.len(), 2);
    assert_eq!(
        sents[0], sents[1],
        "the retry is answered with the same seq"
    );
    sim.send(a, |e| e.send(&id(3), g, 0, kind::EDIT, &id(2), b"v2"));
    sim.send(a, |e| e.send(&id(4), g, 0, kind::DELETE, &id(2), b""));
    for u in [b, c] {
        let got = msgs(&sim.take(u));
        let kinds: Vec<u8> = got.iter().map(|m| m.1).collect();
        assert_eq!(
            kinds,
            vec![kind::GROUP_CREATED, kind::TEXT, kind::EDIT, kind::DELETE],
            "user {u}"
        );
    }
}

#[test]
fn bad_input_gets_an_error_then_close_and_others_are_unaffected() {
    let mut sim = Sim::new(ChatConfig::default());
    let (a, b, _) = users();
    sim.connect(a);
    sim.take(a);
    let shard = ids::home_shard(b, N_SHARDS);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            ((proto::chat::MAX_FRAME + 1) as u32).to_le_bytes().to_vec(),
            code::TOO_LARGE,
        ),
        (vec![1, 0, 0, 0, 0x77], code::UNKNOWN_TYPE),
        (vec![3, 0, 0, 0, 0x0a, 1, 2], code::BAD_FRAME),
        (
            {
                let mut v = Vec::new();
                Encoder::new(&mut v).ping(1);
                v
            },
            code::NOT_AUTHENTICATED,
        ),
        (
            {
                let mut v = Vec::new();
                Encoder::new(&mut v).hello(b"not a token");
                v
            },
            code::BAD_TOKEN,
        ),
        (
            {
                // A valid token for another user's home shard.
                let other = (1..100)
                    .find(|&u| ids::home_shard(u, N_SHARDS) != shard)
                    .unwrap();
                let t = sim.token(other);
                let mut v = Vec::new();
                Encoder::new(&mut v).hello(t.as_bytes());
                v
            },
            code::BAD_TOKEN,
        ),
    ];
    for (bytes, expected) in cases {
        sim.connect_raw(b, shard);
        let conn = sim.clients[&b].conn;
        sim.shards[usize::from(shard)].handle_read(sim.now, conn, &bytes);
        sim.run();
        assert_eq!(sim.take(b), vec![Got::Error(expected)]);
        assert!(sim.clients[&b].closed, "closed after {expected}");
    }
    sim.send(a, |e| e.ping(5));
    assert_eq!(
        sim.take(a),
        vec![Got::Pong],
        "the shard still serves others"
    );
}

/// Only the PRESENCE frames of what a client received.
fn presence(got: Vec<Got>) -> Vec<Got> {
    got.into_iter()
        .filter(|g| matches!(g, Got::Presence { .. }))
        .collect()
}

#[test]
fn presence_reaches_watchers_across_shards_and_stops_when_unwatched() {
    let mut sim = Sim::new(ChatConfig::default());
    let (a, b, c) = users();
    sim.connect(a);
    // Watching an offline user answers "offline" at once; the watcher's own state is not
    // reported to itself, and unknown ids (0) are ignored.
    sim.send(a, |e| e.presence_watch(&[b, c, 0]));
    let mut got = presence(sim.take(a));
    got.sort_by_key(|g| format!("{g:?}"));
    let mut want = vec![
        Got::Presence {
            user: b,
            online: false,
        },
        Got::Presence {
            user: c,
            online: false,
        },
    ];
    want.sort_by_key(|g| format!("{g:?}"));
    assert_eq!(got, want);
    // b comes online, then c; a hears both, on its own (different) home shard.
    sim.connect(b);
    sim.connect(c);
    assert_eq!(
        presence(sim.take(a)),
        vec![
            Got::Presence {
                user: b,
                online: true
            },
            Got::Presence {
                user: c,
                online: true
            },
        ]
    );
    // A new session of b replaces the old one: b stays online, nobody hears a change.
    sim.connect(b);
    assert_eq!(presence(sim.take(a)), vec![]);
    sim.disconnect(b);
    assert_eq!(
        presence(sim.take(a)),
        vec![Got::Presence {
            user: b,
            online: false
        }]
    );
    // a narrows its watch to b (already watched: no new answer); c's departure is no longer
    // reported.
    sim.send(a, |e| e.presence_watch(&[b]));
    assert_eq!(presence(sim.take(a)), vec![]);
    sim.disconnect(c);
    assert_eq!(presence(sim.take(a)), vec![]);
    // When a leaves, its watches go with it: nothing is kept for it on b's home.
    sim.disconnect(a);
    let kept: usize = sim.shards.iter().map(|s| s.home_watch_entries()).sum();
    assert_eq!(kept, 0, "watch entries left after the watcher left");
}

/// A relay's link closing takes its users offline for their watchers elsewhere: the keeper
/// of b's presence heard b's session open on relay 2, then relay 2 went down.
#[test]
fn a_relay_going_down_takes_its_users_offline_for_their_watchers() {
    let mut sim = Sim::new(ChatConfig::default());
    let (a, b, _) = users();
    sim.connect(a);
    sim.send(a, |e| e.presence_watch(&[b]));
    assert_eq!(
        presence(sim.take(a)),
        vec![Got::Presence {
            user: b,
            online: false
        }]
    );
    let keeper = usize::from(ids::owner_shard(b, N_SHARDS));
    let on_relay_2 = super::msg::addr(2, 0);
    sim.rings[keeper].push_back(ShardMsg::ToOwner(ToOwner::PresenceState {
        user: super::msg::UserId(b),
        home: on_relay_2,
        online: true,
    }));
    sim.run();
    assert_eq!(
        presence(sim.take(a)),
        vec![Got::Presence {
            user: b,
            online: true
        }]
    );
    // Another relay's departure changes nothing; relay 2's takes b offline, once.
    let offline = vec![Got::Presence {
        user: b,
        online: false,
    }];
    for (relay, want) in [(3u8, vec![]), (2, offline), (2, vec![])] {
        for ring in &mut sim.rings {
            ring.push_back(ShardMsg::ToHome(super::msg::ToHome::RelayDown(relay)));
        }
        sim.run();
        assert_eq!(presence(sim.take(a)), want, "relay {relay} down");
    }
}

/// With pipelined commits, a SEND retried while its original is in the batch being synced is
/// answered when that batch is durable, even though the retry makes no record of its own.
#[test]
fn a_retry_while_the_original_is_in_flight_gets_its_sent() {
    let mut sim = Sim::new(ChatConfig::default());
    sim.pipelined = true;
    let (a, b, _) = users();
    sim.connect(a);
    sim.connect(b);
    sim.take(a);
    let owner = usize::from(ids::owner_shard(ids::direct_chat(a, b), N_SHARDS));
    let send = |sim: &mut Sim| {
        let c = &sim.clients[&a];
        let (shard, conn) = (usize::from(c.shard), c.conn);
        let mut buf = Vec::new();
        Encoder::new(&mut buf).send(&id(7), 0, b, kind::TEXT, &[0; 16], b"once");
        sim.shards[shard].handle_read(sim.now, conn, &buf);
    };
    send(&mut sim);
    // Pass by pass until the owner's batch holding the entry is in flight.
    let mut passes = 0;
    while !sim.pipes[owner].in_flight() {
        sim.run_passes(true, 1);
        passes += 1;
        assert!(passes < 20, "the entry never went in flight");
    }
    send(&mut sim);
    sim.run();
    let sent: Vec<_> = sim
        .take(a)
        .into_iter()
        .filter(|g| matches!(g, Got::Sent { .. }))
        .collect();
    assert_eq!(
        sent.len(),
        2,
        "the original and the retry are both answered: {sent:?}"
    );
    assert_eq!(sent[0], sent[1], "with the same chat and seq");
}

/// Alternating large watch sets cost tokens in proportion to the change: the session is
/// rate-limited long before it can flood the shards with watch messages.
#[test]
fn presence_watch_churn_is_rate_limited() {
    let mut sim = Sim::new(ChatConfig::default());
    let (a, _, _) = users();
    sim.connect(a);
    sim.take(a);
    let set = |k: u64| -> Vec<u64> { (0..256).map(|i| 10_000 + k * 1_000 + i).collect() };
    let mut limited = false;
    for round in 0..200u64 {
        let users = set(round % 2);
        sim.send(a, |e| e.presence_watch(&users));
        if sim.take(a).contains(&Got::Error(code::RATE_LIMITED)) {
            limited = true;
            assert!(round > 10, "a few large changes are allowed ({round})");
            break;
        }
    }
    assert!(limited, "200 alternations of 256 users were never limited");
}

#[test]
fn silent_connections_are_closed_after_the_hello_deadline() {
    let mut sim = Sim::new(ChatConfig::default());
    sim.connect_raw(5, 0);
    sim.now.mono_us += 4_000_000;
    sim.shards[0].handle_timeout(sim.now);
    sim.run();
    assert!(!sim.clients[&5].closed);
    sim.now.mono_us += 1_000_000;
    sim.shards[0].handle_timeout(sim.now);
    sim.run();
    assert_eq!(sim.take(5), vec![Got::Error(code::HELLO_TIMEOUT)]);
    assert!(sim.clients[&5].closed);
}

#[test]
fn crash_loses_nothing_acknowledged_as_sent() {
    crash_test(false);
}

#[test]
fn crash_loses_nothing_acknowledged_as_sent_with_pipelined_commits() {
    crash_test(true);
}

fn crash_test(pipelined: bool) {
    // Random traffic between three users; at random points the relay "crashes": records that
    // were appended but not committed are lost, everything committed survives. Every message
    // whose author saw SENT must reach its recipient exactly once (after the client's seq
    // deduplication), in per-chat order.
    for seed in 1..=20u64 {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sim = Sim::new(ChatConfig {
            backlog_chunk: 3,
            window: 4,
            ..ChatConfig::default()
        });
        sim.pipelined = pipelined;
        let (a, b, c) = users();
        let all = [a, b, c];
        let mut sent_ok: HashMap<(u64, u64), Vec<u64>> = HashMap::new(); // (from, to) -> bodies
        let mut received: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
        let mut last_seq: HashMap<(u64, u64), u64> = HashMap::new(); // (user, chat) -> seq seen
        let mut counter = 0u64;
        let mut settle = |sim: &mut Sim,
                          received: &mut HashMap<(u64, u64), Vec<u64>>,
                          sent_ok: &mut HashMap<(u64, u64), Vec<u64>>| {
            for &u in &all {
                if !sim.clients.contains_key(&u) {
                    continue;
                }
                let got = sim.take(u);
                for g in &got {
                    match g {
                        Got::Msg {
                            chat,
                            seq,
                            sender,
                            kind: kind::TEXT,
                            body,
                            ..
                        } => {
                            let last = last_seq.entry((u, *chat)).or_default();
                            if *seq > *last {
                                *last = *seq;
                                received
                                    .entry((*sender, u))
                                    .or_default()
                                    .push(u64::from_le_bytes(body[..8].try_into().unwrap()));
                            }
                        }
                        Got::Sent { msg_id, .. } => {
                            let n = u64::from_le_bytes(msg_id[..8].try_into().unwrap());
                            let to = u64::from_le_bytes(msg_id[8..16].try_into().unwrap()) & 0xff;
                            sent_ok.entry((u, all[to as usize])).or_default().push(n);
                        }
                        _ => {}
                    }
                }
                sim.ack_all(u, &got);
            }
        };
        for &u in &all {
            sim.connect(u);
        }
        for _step in 0..60 {
            // Now and then a user goes away (its entries wait) or comes back, and the shards
            // checkpoint (fresh snapshots, older records die): the log a restart replays then
            // has entries of chats whose snapshot comes later, and dead prefixes removed.
            if next() % 8 == 0 {
                let u = all[(next() % 3) as usize];
                if sim.clients.contains_key(&u) {
                    settle(&mut sim, &mut received, &mut sent_ok);
                    sim.disconnect(u);
                } else {
                    sim.connect(u);
                }
            }
            if next() % 6 == 0 {
                sim.shards.iter_mut().for_each(ChatShard::checkpoint);
                sim.run();
            }
            let from = all[(next() % 3) as usize];
            if !sim.clients.contains_key(&from) {
                continue;
            }
            let to_i = (next() % 3) as usize;
            if all[to_i] == from {
                continue;
            }
            counter += 1;
            let mut mid = [0u8; 16];
            mid[..8].copy_from_slice(&counter.to_le_bytes());
            mid[8] = to_i as u8;
            let (shard, conn) = (
                usize::from(sim.clients[&from].shard),
                sim.clients[&from].conn,
            );
            let mut buf = Vec::new();
            Encoder::new(&mut buf).send(
                &mid,
                0,
                all[to_i],
                kind::TEXT,
                &[0; 16],
                &counter.to_le_bytes(),
            );
            sim.shards[shard].handle_read(sim.now, conn, &buf);
            if next() % 5 == 0 {
                // Crash: process without committing (pipelined: a few passes, so that a batch
                // may be in flight and others durable), then restart from the durable logs.
                if pipelined {
                    let passes = (next() % 6) as usize;
                    sim.run_passes(true, passes);
                } else {
                    sim.run_with(false);
                }
                settle(&mut sim, &mut received, &mut sent_ok);
                sim.boot();
                for &u in &all {
                    sim.connect(u);
                }
            } else {
                sim.run();
            }
            settle(&mut sim, &mut received, &mut sent_ok);
        }
        for &u in &all {
            if !sim.clients.contains_key(&u) {
                sim.connect(u);
            }
        }
        sim.run();
        for _ in 0..20 {
            settle(&mut sim, &mut received, &mut sent_ok);
            sim.run();
        }
        for (pair, bodies) in &sent_ok {
            let mut expect = bodies.clone();
            expect.sort_unstable();
            expect.dedup();
            let got = received.get(pair).cloned().unwrap_or_default();
            let mut sorted = got.clone();
            sorted.sort_unstable();
            assert_eq!(got, sorted, "seed {seed}: per-chat order for {pair:?}");
            for n in &expect {
                assert_eq!(
                    got.iter().filter(|&&x| x == *n).count(),
                    1,
                    "seed {seed}: message {n} of {pair:?} exactly once"
                );
            }
        }
        assert_eq!(
            sim.pending(),
            0,
            "seed {seed}: everything acknowledged is gone"
        );
    }
}

#[test]
fn lists_handed_back_are_reused_empty_unless_they_grew_too_long() {
    let mut v: Vec<u64> = Vec::with_capacity(64);
    v.extend([1, 2, 3]);
    let v = super::emptied(v);
    assert!(v.is_empty() && v.capacity() >= 64);
    let long: Vec<u64> = Vec::with_capacity(super::MAX_KEPT_LEN + 1);
    assert_eq!(
        super::emptied(long).capacity(),
        0,
        "a burst's list is freed"
    );
}

/// A SEND's submit is boxed by its author's home shard and handled by the chat's owner shard.
/// The box goes back to the home shard with the SENT, so traffic that only flows one way
/// between two shards (a shard's users writing to chats owned elsewhere, nothing coming back)
/// reuses the same few boxes instead of allocating one per message on the home shard while
/// the owner's pool fills up and frees the rest, from another thread.
#[test]
fn submit_boxes_go_back_to_the_home_shard_that_made_them() {
    // The simulated clock stands still: no rate limit refills.
    let mut sim = Sim::new(ChatConfig {
        msgs_burst: 1 << 20,
        ..ChatConfig::default()
    });
    let (a, b, c) = users();
    // The author's home shard must not own the chat, so that every box crosses shards.
    let (author, reader) = [(a, b), (a, c), (b, a), (b, c), (c, a), (c, b)]
        .into_iter()
        .find(|&(x, y)| {
            ids::home_shard(x, N_SHARDS) != ids::owner_shard(ids::direct_chat(x, y), N_SHARDS)
        })
        .expect("three users on three shards");
    sim.connect(author);
    sim.connect(reader);
    sim.take(author);
    sim.take(reader);
    const BATCH: u64 = 32;
    const ROUNDS: u64 = 100;
    for round in 0..ROUNDS {
        sim.send(author, |e| {
            for i in 0..BATCH {
                let n = round * BATCH + i + 1;
                e.send(&id(n), 0, reader, kind::TEXT, &[0; 16], b"one way");
            }
        });
        let got = sim.take(reader);
        assert_eq!(msgs(&got).len(), BATCH as usize, "{got:?}");
        sim.ack_all(reader, &got);
        let got = sim.take(author);
        sim.ack_all(author, &got);
    }
    let home = usize::from(ids::home_shard(author, N_SHARDS));
    let made = sim.shards[home].submit_boxes_made();
    assert!(
        made <= 2 * BATCH,
        "{made} boxes made for {} messages",
        ROUNDS * BATCH
    );
    assert_eq!(sim.pending(), 0);
}

/// A checkpoint can leave a chat's entries before its snapshot in the log: the old snapshot
/// dies with the new one, and the segment that held it goes once everything else in it is
/// dead, while an entry for a recipient who is away lives on in a later segment. A restart
/// must still recover the chat (the relay refused to start: "entry for unknown chat").
#[test]
fn a_restart_after_a_checkpoint_recovers_entries_logged_before_their_chats_snapshot() {
    let mut sim = Sim::new(ChatConfig::default());
    let (alice, bob, _) = users();
    sim.connect(alice);
    sim.connect(bob);
    sim.take(alice);
    sim.take(bob);
    // The chat's first snapshot, then an exchange acknowledged on both sides: all dead but
    // the snapshot.
    sim.send(alice, |e| {
        e.send(&id(1), 0, bob, kind::TEXT, &[0; 16], b"seen")
    });
    let got = sim.take(bob);
    sim.ack_all(bob, &got);
    let got = sim.take(alice);
    sim.ack_all(alice, &got);
    // Bob goes away; what Alice writes now waits for him.
    sim.disconnect(bob);
    sim.send(alice, |e| {
        e.send(&id(2), 0, bob, kind::TEXT, &[0; 16], b"later")
    });
    sim.send(alice, |e| {
        e.send(&id(3), 0, bob, kind::TEXT, &[0; 16], b"later still")
    });
    // The checkpoint's snapshot kills the first one: the dead prefix before the waiting
    // entries goes, the new snapshot comes after them.
    sim.shards.iter_mut().for_each(ChatShard::checkpoint);
    sim.run();
    sim.boot();
    sim.connect(bob);
    let got = sim.take(bob);
    assert_eq!(
        msgs(&got),
        vec![
            (alice, kind::TEXT, b"later".to_vec()),
            (alice, kind::TEXT, b"later still".to_vec()),
        ]
    );
    assert!(got.contains(&Got::BacklogEnd));
    // The chat goes on where it was: the next entry takes the next seq.
    sim.connect(alice);
    sim.take(alice);
    sim.send(alice, |e| {
        e.send(&id(4), 0, bob, kind::TEXT, &[0; 16], b"after")
    });
    let sent: Vec<_> = sim
        .take(alice)
        .into_iter()
        .filter_map(|g| match g {
            Got::Sent { seq, .. } => Some(seq),
            _ => None,
        })
        .collect();
    let seqs: Vec<u64> = got
        .iter()
        .filter_map(|g| match g {
            Got::Msg { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![seqs[1] + 1]);
}

/// After a restart a member who left a group is no longer listed in it: replaying the later
/// snapshot removes it (it used to keep the group in its GROUP_LIST answer).
#[test]
fn a_member_who_left_does_not_list_the_group_after_a_restart() {
    let mut sim = Sim::new(ChatConfig::default());
    let members: Vec<u64> = (10..13).collect();
    sim.connect_all(&members);
    // An entry waiting for an absent user on the group's owner shard, logged first, keeps the
    // group's first snapshot in the log (records go only as a dead prefix).
    let group = ids::group_chat(members[0], &id(100));
    let owner = ids::owner_shard(group, N_SHARDS);
    let absent = (100..)
        .find(|&u| ids::owner_shard(ids::direct_chat(members[0], u), N_SHARDS) == owner)
        .unwrap();
    sim.send(members[0], |e| {
        e.send(&id(99), 0, absent, kind::TEXT, &[0; 16], b"wait")
    });
    assert_eq!(sim.create_group(members[0], 100, &members[1..]), group);
    sim.send(members[2], |e| e.group_leave(&id(101), group));
    sim.boot();
    sim.connect_all(&members);
    sim.send(members[2], |e| e.group_list());
    assert_eq!(sim.take(members[2]), vec![Got::Groups(vec![])]);
    sim.send(members[1], |e| e.group_list());
    assert_eq!(
        sim.take(members[1]),
        vec![Got::Groups(vec![(group, members[..2].to_vec())])]
    );
}

/// The owner's records have one interpreter (`Owner::apply`), live and in replay: after a mix
/// of everything an owner stores (direct and group chats, members added, removed and leaving,
/// messages, receipts, acknowledgements, an absent recipient), the state a restart rebuilds
/// from the log is the state the shards had.
#[test]
fn a_restart_rebuilds_exactly_the_state_the_owners_had() {
    for pipelined in [false, true] {
        let mut sim = Sim::new(ChatConfig::default());
        sim.pipelined = pipelined;
        let members: Vec<u64> = (10..15).collect();
        let absent = 99;
        sim.connect_all(&members);
        let group = sim.create_group(members[0], 100, &members[1..4]);
        let other = sim.create_group(members[1], 101, &[members[2], absent]);
        for (i, &m) in members.iter().enumerate() {
            let n = i as u64;
            sim.send(m, |e| {
                e.send(
                    &id(200 + n),
                    group,
                    0,
                    kind::TEXT,
                    &[0; 16],
                    b"to the group",
                )
            });
            sim.send(m, |e| {
                e.send(
                    &id(300 + n),
                    0,
                    absent,
                    kind::TEXT,
                    &[0; 16],
                    b"to the absent",
                )
            });
            sim.send(m, |e| {
                e.send(
                    &id(400 + n),
                    0,
                    members[(i + 1) % 5],
                    kind::TEXT,
                    &[0; 16],
                    b"hi",
                )
            });
        }
        sim.send(members[0], |e| e.group_add(&id(500), group, members[4]));
        sim.send(members[0], |e| e.group_remove(&id(501), group, members[1]));
        sim.send(members[2], |e| e.group_leave(&id(502), group));
        sim.send(members[1], |e| {
            e.send(&id(503), other, 0, kind::TEXT, &[0; 16], b"other")
        });
        sim.run();
        // Some acknowledge what they got (making DELIVERED receipts), some do not.
        for &m in &members[..3] {
            let got = sim.take(m);
            sim.ack_all(m, &got);
        }
        sim.run();
        for _ in 0..3 {
            sim.run();
        }
        let live: Vec<String> = sim.shards.iter().map(|s| s.owner_digest()).collect();
        assert!(sim.pending() > 0, "the test keeps entries waiting");
        sim.boot();
        let replayed: Vec<String> = sim.shards.iter().map(|s| s.owner_digest()).collect();
        for (shard, (a, b)) in live.iter().zip(&replayed).enumerate() {
            assert_eq!(a, b, "shard {shard}, pipelined {pipelined}");
        }
    }
}

/// A group every member has left is forgotten, live and after a restart, and its records die
/// with it: creating groups and leaving them cannot fill an owner's memory or its log.
#[test]
fn a_group_every_member_left_is_forgotten() {
    let mut sim = Sim::new(ChatConfig::default());
    let members: Vec<u64> = (10..13).collect();
    sim.connect_all(&members);
    let chats = |sim: &Sim| sim.shards.iter().map(|s| s.n_chats()).sum::<usize>();
    for round in 0..20u64 {
        let group = sim.create_group(members[0], 200 + round, &members[1..]);
        sim.send(members[0], |e| {
            e.send(&id(1000 + round), group, 0, kind::TEXT, &[0; 16], b"bye")
        });
        sim.run();
        for (i, &m) in members.iter().enumerate() {
            sim.send(m, |e| {
                e.group_leave(&id(2000 + 10 * round + i as u64), group)
            });
        }
        sim.run();
        for &m in &members {
            let got = sim.take(m);
            sim.ack_all(m, &got);
        }
        sim.run();
    }
    assert_eq!(chats(&sim), 0, "20 groups created and left, none kept");
    assert_eq!(sim.durable_records(), 0, "every record of theirs is dead");
    sim.send(members[0], |e| e.group_list());
    assert_eq!(sim.take(members[0]), vec![Got::Groups(vec![])]);
    // A restart replays the log: the groups stay forgotten, and their records are dead.
    sim.boot();
    assert_eq!(chats(&sim), 0, "not resurrected by the replay");
    // One group still has a member: it is kept, through a restart too.
    sim.connect_all(&members);
    let kept = sim.create_group(members[0], 300, &members[1..]);
    sim.send(members[1], |e| e.group_leave(&id(301), kept));
    sim.run();
    sim.boot();
    assert_eq!(chats(&sim), 1);
    sim.connect_all(&members);
    sim.send(members[0], |e| e.group_list());
    assert_eq!(
        sim.take(members[0]),
        vec![Got::Groups(vec![(kept, vec![members[0], members[2]])])]
    );
}

/// Entries whose chat never gets a snapshot mean the log lost records: recovery fails with a
/// clear error instead of serving a chat with no members.
#[test]
fn entries_without_any_snapshot_of_their_chat_fail_recovery() {
    let mut sim = Sim::new(ChatConfig::default());
    let (alice, bob, _) = users();
    sim.connect(alice);
    sim.send(alice, |e| {
        e.send(&id(1), 0, bob, kind::TEXT, &[0; 16], b"lost?")
    });
    let owner = usize::from(ids::owner_shard(ids::direct_chat(alice, bob), N_SHARDS));
    let log = &mut sim.logs[owner].durable;
    let before = log.len();
    log.retain(|_, (k, _)| *k != records::CHAT);
    assert_eq!(log.len(), before - 1, "the chat's one snapshot removed");
    let verifier = TokenVerifier::new(key().verifying_key(), 0);
    let mut shard = ChatShard::new(owner as u16, N_SHARDS, ChatConfig::default(), verifier);
    for (&lsn, (k, p)) in log.iter() {
        shard.replay(Lsn(lsn), *k, p).unwrap();
    }
    let err = shard.finish_replay().unwrap_err();
    assert_eq!(
        err,
        crate::chat::owner::ReplayError::NoSnapshot {
            chat: crate::chat::msg::ChatId(ids::direct_chat(alice, bob))
        }
    );
}

/// A reader too slow for its output limit: an entry that does not fit is deferred (fetched
/// again from the inbox once the reader catches up), and so is every entry after it, even
/// one small enough to fit. Queuing a later, smaller entry put its seq ahead: the client,
/// which ignores seqs at or below the highest it has seen, then dropped the deferred one
/// when it came back, and its cumulative ACK deleted it.
#[test]
fn a_slow_reader_gets_deferred_entries_in_order_once_it_reads_again() {
    let mut sim = Sim::new(ChatConfig {
        max_out_bytes: 4096,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    sim.connect(alice);
    sim.connect(bob);
    sim.take(bob);
    sim.pause(bob);
    for (n, body) in [
        (1, vec![1u8; 3000]),
        (2, vec![2u8; 3000]),
        (3, b"tiny".to_vec()),
    ] {
        sim.send(alice, |e| {
            e.send(&id(n), 0, bob, kind::TEXT, &[0; 16], &body)
        });
    }
    // Bob reads with the client's rule, acknowledging what it read after each read.
    let bodies = sim.read_slowly(bob, 10, 3);
    assert_eq!(bodies, [1, 2, b't'], "every message, in order");
    let receipts = sim.take(alice);
    sim.ack_all(alice, &receipts);
    assert_eq!(sim.pending(), 0);
}

/// An author who left a group gets no DELIVERED receipt for what it wrote there: it could
/// never acknowledge one (it is no longer a member), so the receipt stayed stored for good.
#[test]
fn no_receipt_is_stored_for_an_author_who_left_the_group() {
    let mut sim = Sim::new(ChatConfig::default());
    let members: Vec<u64> = (10..13).collect();
    sim.connect_all(&members);
    let group = sim.create_group(members[0], 100, &members[1..]);
    sim.send(members[1], |e| {
        e.send(&id(1), group, 0, kind::TEXT, &[0; 16], b"bye")
    });
    sim.send(members[1], |e| e.group_leave(&id(2), group));
    for &u in &[members[0], members[2]] {
        let got = sim.take(u);
        assert!(msgs(&got).iter().any(|m| m.2 == b"bye".to_vec()));
        sim.ack_all(u, &got);
    }
    let got = sim.take(members[1]);
    assert!(msgs(&got).iter().all(|m| m.1 != kind::DELIVERED), "{got:?}");
    sim.ack_all(members[1], &got);
    assert_eq!(sim.pending(), 0, "nothing stays stored");
}

/// Every request a peer can repeat costs from its session's rate: group changes and listings
/// (refused with ERROR 7), acknowledgements (refused, not applied), TYPING and PING (dropped
/// without an answer).
#[test]
fn group_changes_acks_typing_and_pings_are_rate_limited() {
    let mut sim = Sim::new(ChatConfig {
        msgs_per_s: 1,
        msgs_burst: 3,
        ..ChatConfig::default()
    });
    let members: Vec<u64> = (10..13).collect();
    sim.connect_all(&members);
    // The burst: a group and a message, then nothing more (the clock stands still).
    let group = sim.create_group(members[0], 100, &members[1..2]);
    sim.send(members[0], |e| {
        e.send(&id(1), group, 0, kind::TEXT, &[0; 16], b"x")
    });
    sim.take(members[0]);
    sim.send(members[0], |e| e.ping(1));
    assert_eq!(
        sim.take(members[0]),
        vec![Got::Pong],
        "the burst's last token"
    );
    for (n, write) in [
        (
            2u64,
            &(|e: &mut Encoder<'_>| e.group_add(&id(2), 0, 0)) as &dyn Fn(&mut Encoder<'_>),
        ),
        (3, &|e: &mut Encoder<'_>| e.group_remove(&id(3), 0, 0)),
        (4, &|e: &mut Encoder<'_>| e.group_leave(&id(4), 0)),
        (5, &|e: &mut Encoder<'_>| e.group_list()),
        (6, &|e: &mut Encoder<'_>| e.ack(&[(group, 1)])),
    ] {
        sim.send(members[0], |e| write(e));
        assert_eq!(
            sim.take(members[0]),
            vec![Got::Error(code::RATE_LIMITED)],
            "request {n}"
        );
    }
    sim.send(members[0], |e| e.ping(2));
    sim.send(members[0], |e| e.typing(group, 0));
    assert_eq!(sim.take(members[0]), vec![], "dropped quietly");
    assert!(
        sim.take(members[1])
            .iter()
            .all(|g| !matches!(g, Got::Typing { .. })),
        "no TYPING went out"
    );
}

/// A peer that keeps sending requests and never reads the answers is closed with ERROR 11
/// once its queued output reaches twice `max_out_bytes`, instead of growing it for good.
#[test]
fn a_peer_that_never_reads_its_answers_is_closed() {
    let mut sim = Sim::new(ChatConfig {
        max_out_bytes: 4096,
        msgs_per_s: 1,
        msgs_burst: 1,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    sim.connect(alice);
    sim.take(alice);
    sim.pause(alice);
    // Every SEND past the first is refused with an ERROR that nobody reads.
    for n in 0..1000 {
        sim.send(alice, |e| {
            e.send(&id(n), 0, bob, kind::TEXT, &[0; 16], b"x")
        });
    }
    sim.read_once(alice);
    let got = sim.take(alice);
    assert_eq!(
        got.last(),
        Some(&Got::Error(code::SLOW_READER)),
        "{}",
        got.len()
    );
    assert!(got.len() < 400, "bounded: {} frames", got.len());
}

/// An ACK beyond the chat's last seq, repeated, is stored once.
#[test]
fn a_repeated_ack_beyond_the_last_seq_writes_one_record() {
    let mut sim = Sim::new(ChatConfig::default());
    let (alice, bob, _) = users();
    sim.connect(alice);
    sim.connect(bob);
    sim.take(bob);
    sim.send(alice, |e| {
        e.send(&id(1), 0, bob, kind::TEXT, &[0; 16], b"x")
    });
    let chat = ids::direct_chat(alice, bob);
    // The first makes the DELIVERED receipt (seq 2), which the second takes in.
    sim.send(bob, |e| e.ack(&[(chat, u64::MAX)]));
    sim.send(bob, |e| e.ack(&[(chat, u64::MAX)]));
    let after_first = sim.logs.iter().map(|l| l.next_lsn).sum::<u64>();
    for _ in 0..5 {
        sim.send(bob, |e| e.ack(&[(chat, u64::MAX)]));
    }
    assert_eq!(
        sim.logs.iter().map(|l| l.next_lsn).sum::<u64>(),
        after_first
    );
}

/// A user's undelivered messages are bounded like an inbox: writing to users who never come
/// (made-up ids, each with an empty inbox) is refused with ERROR 8 past the limit, and allowed
/// again once recipients acknowledge.
#[test]
fn a_senders_undelivered_messages_are_bounded() {
    let mut sim = Sim::new(ChatConfig {
        max_pending_per_user: 5,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    sim.connect(alice);
    sim.take(alice);
    // The count is kept by each owner shard: recipients whose chats with Alice one shard owns.
    let owner = ids::owner_shard(ids::direct_chat(alice, bob), N_SHARDS);
    let mut strangers =
        (1000..).filter(|&u| ids::owner_shard(ids::direct_chat(alice, u), N_SHARDS) == owner);
    for n in 0..8u64 {
        let to = if n == 0 {
            bob
        } else {
            strangers.next().unwrap()
        };
        sim.send(alice, |e| {
            e.send(&id(n), 0, to, kind::TEXT, &[0; 16], b"hello?")
        });
    }
    let got = sim.take(alice);
    let sent = got.iter().filter(|g| matches!(g, Got::Sent { .. })).count();
    let full = got
        .iter()
        .filter(|g| **g == Got::Error(code::INBOX_FULL))
        .count();
    assert_eq!((sent, full), (5, 3), "{got:?}");
    // Bob comes and acknowledges: one more may go.
    sim.connect(bob);
    let got = sim.take(bob);
    sim.ack_all(bob, &got);
    let to = strangers.next().unwrap();
    sim.send(alice, |e| {
        e.send(&id(9), 0, to, kind::TEXT, &[0; 16], b"hello?")
    });
    let got = sim.take(alice);
    assert!(got.iter().any(|g| matches!(g, Got::Sent { .. })), "{got:?}");
}

/// A user in more big groups than one GROUPS frame holds gets its answer over several frames,
/// every one but the last filled past the protocol's mark.
#[test]
fn a_groups_answer_longer_than_a_frame_is_split() {
    let mut sim = Sim::new(ChatConfig::default());
    let creator = 10;
    sim.connect_all(&[creator]);
    let mut made = Vec::new();
    for g in 0..8u64 {
        let members: Vec<u64> = (0..1023).map(|i| 100_000 + g * 10_000 + i).collect();
        made.push(sim.create_group(creator, 100 + g, &members));
    }
    sim.send(creator, |e| e.group_list());
    let got = sim.take(creator);
    assert_eq!(
        got.len(),
        2,
        "7 groups of 1,024 fill a frame, the 8th goes in a second"
    );
    let mut listed: Vec<u64> = got
        .iter()
        .flat_map(|g| match g {
            Got::Groups(list) => list
                .iter()
                .map(|(c, m)| {
                    assert_eq!(m.len(), 1024);
                    *c
                })
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        })
        .collect();
    listed.sort_unstable();
    made.sort_unstable();
    assert_eq!(listed, made);
}

/// A backlog held by chats of every owner shard still comes at most `window` unacknowledged
/// entries at a time: each owner sends its share of half the window (each sent a whole chunk,
/// so three owners put 12 entries in flight against a window of 6).
#[test]
fn a_backlog_from_every_owner_shard_keeps_to_the_window() {
    let mut sim = Sim::new(ChatConfig {
        backlog_chunk: 4,
        window: 6,
        ..ChatConfig::default()
    });
    let bob = 7;
    // Three senders whose chats with Bob three different shards own.
    let mut senders: Vec<u64> = Vec::new();
    for u in 100.. {
        let owner = ids::owner_shard(ids::direct_chat(u, bob), N_SHARDS);
        if senders
            .iter()
            .all(|&v| ids::owner_shard(ids::direct_chat(v, bob), N_SHARDS) != owner)
        {
            senders.push(u);
        }
        if senders.len() == usize::from(N_SHARDS) {
            break;
        }
    }
    for &from in &senders {
        sim.connect(from);
        for n in 0..10u64 {
            sim.send(from, |e| {
                e.send(
                    &id(from * 100 + n),
                    0,
                    bob,
                    kind::TEXT,
                    &[0; 16],
                    &n.to_le_bytes(),
                )
            });
        }
    }
    sim.connect(bob);
    let mut total = 0;
    for _ in 0..100 {
        let got = sim.take(bob);
        let n = msgs(&got).len();
        assert!(n <= 6, "{n} unacknowledged entries in flight, window 6");
        total += n;
        if got.contains(&Got::BacklogEnd) {
            break;
        }
        sim.ack_all(bob, &got);
    }
    assert_eq!(total, 30);
}

/// A backlog held by one owner shard gets the whole half window per round once the other
/// owners have said they hold nothing: it does not stay at the share of one owner among all
/// shards (a window of 12 over 3 shards: 2 entries a round trip).
#[test]
fn a_backlog_from_one_owner_takes_the_whole_half_window() {
    let mut sim = Sim::new(ChatConfig {
        window: 12,
        ..ChatConfig::default()
    });
    // The owner of their chat is not Bob's home: every pull crosses between shards.
    let (alice, bob) = (1u64..)
        .flat_map(|a| (1u64..100).map(move |b| (a, b)))
        .find(|&(a, b)| {
            a != b
                && ids::owner_shard(ids::direct_chat(a, b), N_SHARDS)
                    != ids::home_shard(b, N_SHARDS)
        })
        .unwrap();
    sim.connect(alice);
    for n in 0..60u64 {
        sim.send(alice, |e| {
            e.send(&id(n), 0, bob, kind::TEXT, &[0; 16], &n.to_le_bytes())
        });
    }
    sim.connect(bob);
    let (mut rounds, mut bodies) = (0, Vec::new());
    for _ in 0..100 {
        let got = sim.take(bob);
        let m = msgs(&got);
        assert!(
            m.len() <= 12,
            "{} unacknowledged entries in flight, window 12",
            m.len()
        );
        bodies.extend(
            m.into_iter()
                .map(|m| u64::from_le_bytes(m.2[..8].try_into().unwrap())),
        );
        rounds += 1;
        if got.contains(&Got::BacklogEnd) {
            break;
        }
        sim.ack_all(bob, &got);
    }
    assert_eq!(bodies, (0..60).collect::<Vec<_>>(), "all, in order");
    eprintln!("{rounds} rounds, {} pulls", sim.backlog_pulls);
    // 2 entries in the first chunk (every owner's share of half the window), then 6 a chunk.
    assert!(
        sim.backlog_pulls <= 12,
        "{} pulls for 60 entries",
        sim.backlog_pulls
    );
}

/// Beyond the rate, an ACK that takes in what the session was sent still goes: refusing it
/// would hold back the client's backlog, which waits for acknowledgements.
#[test]
fn an_ack_of_what_was_sent_goes_beyond_the_rate() {
    let mut sim = Sim::new(ChatConfig {
        msgs_per_s: 1,
        msgs_burst: 2,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    sim.connect_all(&[alice, bob]);
    sim.send(alice, |e| {
        e.send(&id(1), 0, bob, kind::TEXT, &[0; 16], b"x")
    });
    // Bob spends his rate on pings, then acknowledges.
    sim.send(bob, |e| e.ping(1));
    sim.send(bob, |e| e.ping(2));
    let got = sim.take(bob);
    assert_eq!(msgs(&got).len(), 1);
    sim.ack_all(bob, &got);
    assert!(
        sim.take(bob).is_empty(),
        "no ERROR 7 for an ACK of what was sent"
    );
    let receipts = sim.take(alice);
    assert!(msgs(&receipts).iter().any(|m| m.1 == kind::DELIVERED));
}

/// An entry larger than the output limit goes when the output is empty; it was deferred for
/// good (nothing queued, so nothing written, so no resync).
#[test]
fn an_entry_larger_than_the_output_limit_still_goes() {
    let mut sim = Sim::new(ChatConfig {
        max_out_bytes: 1024,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    sim.connect_all(&[alice, bob]);
    sim.send(alice, |e| {
        e.send(&id(1), 0, bob, kind::TEXT, &[0; 16], &[7; 3000])
    });
    sim.send(alice, |e| {
        e.send(&id(2), 0, bob, kind::TEXT, &[0; 16], b"small")
    });
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let got = sim.take(bob);
        bodies.extend(msgs(&got).into_iter().map(|m| m.2.len()));
        sim.ack_all(bob, &got);
    }
    assert_eq!(bodies, [3000, 5]);
}

/// A deferral during a backlog restarts the backlog once the output drains instead of
/// pulling (and deferring) the rest of it chunk after chunk.
#[test]
fn a_backlog_of_large_entries_comes_in_order_without_streaming_it_for_nothing() {
    let mut sim = Sim::new(ChatConfig {
        max_out_bytes: 8192,
        backlog_chunk: 4,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    sim.connect_all(&[alice, bob]);
    // Bob does not read while 40 entries of 3,000 bytes come: most are deferred, and come
    // again in the resync backlogs, which defer in turn.
    sim.pause(bob);
    for n in 0..40u64 {
        sim.send(alice, |e| {
            e.send(&id(n), 0, bob, kind::TEXT, &[0; 16], &[n as u8; 3000])
        });
    }
    let bodies = sim.read_slowly(bob, 200, 40);
    assert_eq!(bodies, (0..40).collect::<Vec<u8>>());
    let home = usize::from(ids::home_shard(bob, N_SHARDS));
    let deferred = sim.shards[home].home_counters().deferred;
    // 112 here; 420 when the rest of each backlog was pulled and deferred chunk by chunk.
    assert!(
        deferred <= 160,
        "{deferred} entries deferred for 40 delivered"
    );
}

/// After a restart a sender's undelivered messages are counted from what waits, however the
/// chats are ordered: a settled entry of one chat did not take one off another's count.
#[test]
fn a_senders_bound_holds_after_a_restart() {
    let mut sim = Sim::new(ChatConfig {
        max_pending_per_user: 2,
        ..ChatConfig::default()
    });
    let (alice, bob, _) = users();
    let owner = ids::owner_shard(ids::direct_chat(alice, bob), N_SHARDS);
    let mut strangers =
        (1000..).filter(|&u| ids::owner_shard(ids::direct_chat(alice, u), N_SHARDS) == owner);
    sim.connect_all(&[alice, bob]);
    // One waits (a stranger's), logged first; one to Bob is delivered and acknowledged (its
    // record stays in the log behind the waiting one).
    let first = strangers.next().unwrap();
    sim.send(alice, |e| {
        e.send(&id(1), 0, first, kind::TEXT, &[0; 16], b"wait")
    });
    sim.send(alice, |e| {
        e.send(&id(2), 0, bob, kind::TEXT, &[0; 16], b"seen")
    });
    let got = sim.take(bob);
    sim.ack_all(bob, &got);
    sim.boot();
    sim.connect_all(&[alice]);
    // One waits: one more may, the next not.
    for n in 3..5u64 {
        let to = strangers.next().unwrap();
        sim.send(alice, |e| {
            e.send(&id(n), 0, to, kind::TEXT, &[0; 16], b"more")
        });
    }
    let got = sim.take(alice);
    let sent = got.iter().filter(|g| matches!(g, Got::Sent { .. })).count();
    assert_eq!(sent, 1, "{got:?}");
    assert!(got.contains(&Got::Error(code::INBOX_FULL)), "{got:?}");
}

/// A user moving between relays: the backlog requests of its two homes reach an owner in either
/// order, and one home's cancel never takes the other's deliveries (it took them all when an
/// owner kept one home per user: a late request from the old home, then its cancel, left the
/// new session with nothing live).
#[test]
fn an_owner_delivers_to_each_home_of_a_user_and_a_cancel_removes_only_its_own() {
    use crate::chat::msg::{addr, ChatId, ConnId, Origin, Submit, ToHome, ToOwner, UserId};
    let verifier = TokenVerifier::new(key().verifying_key(), 0);
    let mut shard = ChatShard::new(0, 1, ChatConfig::default(), verifier);
    let now = Now {
        mono_us: 1,
        unix_s: 1_700_000_000,
    };
    let (alice, bob) = (UserId(5), UserId(6));
    let (old, new) = (addr(1, 0), addr(2, 0));
    let start = |home, epoch| {
        ShardMsg::ToOwner(ToOwner::BacklogStart {
            user: bob,
            epoch,
            home,
            budget: 64,
        })
    };
    shard.handle_shard_msgs(
        now,
        [
            start(new, 1),
            start(old, 9),
            ShardMsg::ToOwner(ToOwner::BacklogCancel {
                user: bob,
                home: old,
            }),
        ],
    );
    let send = |n: u64| {
        ShardMsg::ToOwner(ToOwner::Submit(Box::new(Submit {
            from: Origin {
                user: alice,
                home: addr(3, 0),
                conn: ConnId(1),
            },
            msg_id: id(n),
            chat: ChatId::direct(alice, bob),
            to: Some(bob),
            kind: kind::TEXT,
            ref_id: [0; 16],
            body: crate::chat::records::Body::from_slice(b"hi"),
        })))
    };
    let mut next_lsn = 1;
    let mut commit = |shard: &mut ChatShard| {
        let records = shard.take_records();
        let lsns: Vec<Lsn> = records
            .iter()
            .map(|_| {
                next_lsn += 1;
                Lsn(next_lsn)
            })
            .collect();
        shard.give_back_records(records);
        shard.handle_committed(now, &lsns);
        shard.take_outbox()
    };
    let delivered_to = |out: &[(u16, ShardMsg)]| -> Vec<u16> {
        out.iter()
            .filter(|(_, m)| matches!(m, ShardMsg::ToHome(ToHome::Deliver { .. })))
            .map(|(to, _)| *to)
            .collect()
    };
    commit(&mut shard);
    shard.handle_shard_msgs(now, [send(1)]);
    assert_eq!(delivered_to(&commit(&mut shard)), vec![new]);
    // Both homes at once (the old one's request came after the new one's): both get it.
    shard.handle_shard_msgs(now, [start(old, 10)]);
    commit(&mut shard);
    shard.handle_shard_msgs(now, [send(2)]);
    let mut both = delivered_to(&commit(&mut shard));
    both.sort_unstable();
    assert_eq!(both, vec![old, new]);
}

/// One session writing to made-up users, or making groups of them, cannot fill an owner with
/// chats: past `max_chats_per_user` a new chat is refused before anything is created (a
/// refused SEND to a new user id had created the chat and written its snapshot first).
#[test]
fn a_session_creates_no_more_chats_than_its_cap_and_a_refusal_leaves_nothing() {
    let cap = 2;
    let mut sim = Sim::new(ChatConfig {
        max_chats_per_user: cap,
        ..ChatConfig::default()
    });
    let (alice, _, _) = users();
    sim.connect(alice);
    for (n, to) in (1_000..1_040u64).enumerate() {
        sim.send(alice, |e| {
            e.send(&id(n as u64), 0, to, kind::TEXT, &[0; 16], b"hi")
        });
    }
    let got = sim.take(alice);
    let sent = got.iter().filter(|g| matches!(g, Got::Sent { .. })).count();
    let refused = got
        .iter()
        .filter(|g| **g == Got::Error(code::INBOX_FULL))
        .count();
    let chats: usize = sim.shards.iter().map(|s| s.n_chats()).sum();
    // At most `cap` chats of alice's at each owner shard.
    assert!(sent <= cap * usize::from(N_SHARDS), "{sent} sent");
    assert_eq!(sent + refused, 40, "every SEND answered");
    assert_eq!(chats, sent, "a refused SEND created no chat");
    let snapshots = sim
        .logs
        .iter()
        .flat_map(|l| l.durable.values())
        .filter(|(k, _)| *k == records::CHAT)
        .count();
    assert_eq!(snapshots, sent, "nor wrote a snapshot");
    // Groups count too: 30 new groups of made-up users make at most `cap` more chats of
    // alice's per owner shard.
    for n in 100..130u64 {
        sim.send(alice, |e| e.group_create(&id(n), &[n * 10, n * 10 + 1]));
    }
    let got = sim.take(alice);
    let groups = got.iter().filter(|g| matches!(g, Got::Sent { .. })).count();
    let refused = got
        .iter()
        .filter(|g| **g == Got::Error(code::INBOX_FULL))
        .count();
    assert_eq!(groups + refused, 30, "{got:?}");
    let chats: usize = sim.shards.iter().map(|s| s.n_chats()).sum();
    assert!(chats <= cap * usize::from(N_SHARDS), "{chats} chats");
    assert_eq!(chats, sent + groups);
    sim.shards.iter().for_each(ChatShard::check_invariants);
}

/// Issue 17 item 5: HELLO's Ed25519 check runs on the shard thread that forwards media, so it
/// has a budget. Tokens that cannot pass (garbage, another shard's, expired) are refused
/// without spending it; a flood of well-formed forgeries spends it, and a sign-in beyond it
/// gets ERROR 13 (retry) until the budget refills a second later.
#[test]
fn hellos_beyond_the_shards_signature_budget_are_told_to_retry() {
    let cfg = ChatConfig {
        hellos_per_s: 100,
        ..ChatConfig::default()
    };
    let mut sim = Sim::new(cfg);
    let on_shard_0: Vec<u64> = (1..)
        .filter(|&u| ids::home_shard(u, N_SHARDS) == 0)
        .take(400)
        .collect();
    let hello_as = |sim: &mut Sim, client: u64, token: &str| {
        sim.connect_raw(client, 0);
        sim.send(client, |e| e.hello(token.as_bytes()));
        sim.take(client)
    };
    // 200 garbage tokens: refused, and free.
    for &u in &on_shard_0[..200] {
        let got = hello_as(&mut sim, u, &"A".repeat(proto::token::TOKEN_TEXT_LEN));
        assert_eq!(got, vec![Got::Error(code::BAD_TOKEN)]);
    }
    // 100 well-formed forgeries (another key): refused, each a signature check.
    let forged = |user: u64| {
        Claims {
            kind: TokenKind::User,
            permissions: Permissions::CHAT,
            relay_id: 0,
            shard_idx: 0,
            expires_at: sim.now.unix_s + 600,
            scope_id: user,
            participant_id: user,
        }
        .sign_text(&SigningKey::from_bytes(&[77; 32]))
    };
    let tokens: Vec<String> = on_shard_0[200..300].iter().map(|&u| forged(u)).collect();
    for (&u, t) in on_shard_0[200..300].iter().zip(&tokens) {
        assert_eq!(hello_as(&mut sim, u, t), vec![Got::Error(code::BAD_TOKEN)]);
    }
    // The budget is spent: a real user is told to retry, and is not signed in.
    let user = on_shard_0[300];
    let real = sim.token(user);
    assert_eq!(
        hello_as(&mut sim, user, &real),
        vec![Got::Error(code::UNAVAILABLE)]
    );
    // A second later it is taken.
    sim.now.mono_us += 1_000_000;
    let token = sim.token(on_shard_0[301]);
    let got = hello_as(&mut sim, on_shard_0[301], &token);
    assert_eq!(got.first(), Some(&Got::Welcome));
}
