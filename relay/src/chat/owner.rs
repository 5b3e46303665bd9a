//! The owner role of a shard: it sequences, stores and tracks the chats whose id maps to it
//! (`proto::chat::ids::owner_shard`). Every entry gets the chat's next seq, is appended to the
//! shard's log, and only once the log has committed it is the author told "sent" and the
//! audience sent the entry. Acknowledgements are cumulative per (chat, member); an entry every
//! member of its audience has acknowledged is dead and its log record can go.
//!
//! Every change to the durable state goes through one function, `Owner::apply`: a handler
//! validates a request, appends the record that states the change and applies that record;
//! recovery applies the records read back ([`Owner::replay`]) with the same function, so the
//! state after a restart is the state before it (`a_restart_rebuilds_exactly_the_state_the_owners_had`).
//!
//! Sans-IO: outputs are drained by the engine ([`Owner::take_batch`], `out`).

use super::dedup::Dedup;
use super::log::Lsn;
use super::map::Map;
use super::msg::{ChatId, Origin, Seq, ShardMsg, Submit, ToHome, ToOwner, UserId};
use super::records::{
    self, Audience, Body, ChatRec, EntryRec, FramePool, MemberRec, MsgFrame, Rec,
};
use super::ChatConfig;
use proto::chat::{code, kind, Encoder, Entry, MsgId};
use std::collections::VecDeque;

/// What a log record belongs to, so that its LSN can be filed once known.
#[derive(Clone, Copy, Debug)]
enum RecOwner {
    Entry { chat: ChatId, seq: Seq },
    Chat { chat: ChatId },
    Ack,
}

#[derive(Debug)]
struct Member {
    user: UserId,
    joined_after: Seq,
    acked: Seq,
}

#[derive(Debug)]
struct Stored {
    seq: Seq,
    sender: UserId,
    kind: u8,
    frame: MsgFrame,
    /// Audience members that have not acknowledged it yet.
    unacked: Audience,
    lsn: Option<Lsn>,
    committed: bool,
}

#[derive(Debug)]
struct Chat {
    group: bool,
    creator: UserId,
    next_seq: Seq,
    members: Vec<Member>,
    pending: VecDeque<Stored>,
    state_lsn: Option<Lsn>,
}

impl Chat {
    /// A group every member has left, with nothing left to deliver: nobody can write to it,
    /// read it or rejoin it (only members add members), so it is forgotten ([`Owner::forget`]).
    /// Without this every group ever created would stay in memory, and a peer could fill it.
    fn is_abandoned(&self) -> bool {
        self.group && self.members.is_empty() && self.pending.is_empty()
    }

    fn member(&self, user: UserId) -> Option<&Member> {
        self.members.iter().find(|m| m.user == user)
    }
    fn snapshot(&self, chat: ChatId) -> ChatRec {
        ChatRec {
            chat,
            group: self.group,
            creator: self.creator,
            next_seq: self.next_seq,
            members: self
                .members
                .iter()
                .map(|m| MemberRec {
                    user: m.user,
                    joined_after: m.joined_after,
                    acked: m.acked,
                })
                .collect(),
        }
    }
}

/// Removes the committed entries that every recipient has acknowledged and hands their LSNs to
/// `dead`. Uncommitted entries stay: their LSN is not known yet, and "sent" still waits on them.
/// Settled entries at the front (the usual case: acknowledgements arrive in order) give their
/// frames back to `frames`.
/// Each gone entry a client wrote comes off its author's count in `by_sender`.
fn drop_settled(
    pending: &mut VecDeque<Stored>,
    dead: &mut Vec<Lsn>,
    frames: &mut FramePool,
    by_sender: &mut Map<UserId, usize>,
) {
    let settled = |s: &Stored| s.committed && s.unacked.is_empty();
    while let Some(s) = pending.pop_front_if(|s| settled(s)) {
        dead.extend(s.lsn);
        if kind::client_may_send(s.kind) {
            count_down(by_sender, s.sender);
        }
        frames.give_back(s.frame);
    }
    if pending.iter().any(settled) {
        pending.retain(|s| {
            if settled(s) {
                dead.extend(s.lsn);
                if kind::client_may_send(s.kind) {
                    count_down(by_sender, s.sender);
                }
            }
            !settled(s)
        });
    }
}

/// `user` is no longer a member of `chat`; a list left empty is removed.
fn forget_membership(member_of: &mut Map<UserId, Vec<ChatId>>, user: UserId, chat: ChatId) {
    if let Some(list) = member_of.get_mut(&user) {
        list.retain(|&c| c != chat);
        if list.is_empty() {
            member_of.remove(&user);
        }
    }
}

/// One less for `user`; a count that reaches zero is removed (the maps would otherwise keep
/// an entry for every user ever counted).
fn count_down(counts: &mut Map<UserId, usize>, user: UserId) {
    if let Some(n) = counts.get_mut(&user) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&user);
        }
    }
}

/// Homes an owner keeps for one user at most (sessions on as many relays at once).
const MAX_HOMES_PER_USER: usize = 8;

/// A backlog being streamed to a user's session.
#[derive(Debug)]
struct Stream {
    epoch: u64,
    home: u16,
    /// Per chat, the last seq sent in this stream.
    cursors: Map<ChatId, Seq>,
}

/// The last batch taken for commit: what each record belongs to, and the actions waiting on it.
type Committing = (Vec<RecOwner>, Vec<(u16, ShardMsg)>);

/// A log whose records do not replay: corruption (a damaged disk, or records lost), never a
/// peer's doing. The shard does not start on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayError {
    /// The record at `lsn` of kind `kind` does not decode.
    Undecodable { lsn: Lsn, kind: u8 },
    /// A chat snapshot with next seq 0 (seqs start at 1).
    ZeroNextSeq { lsn: Lsn, chat: ChatId },
    /// An entry with seq 0 or the largest seq.
    BadSeq { lsn: Lsn, seq: Seq },
    /// Entries of `chat` but no snapshot of it.
    NoSnapshot { chat: ChatId },
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Undecodable { lsn, kind } => {
                write!(f, "undecodable chat record of kind {kind} at lsn {}", lsn.0)
            }
            Self::ZeroNextSeq { lsn, chat } => {
                write!(f, "{chat} with next seq 0 at lsn {}", lsn.0)
            }
            Self::BadSeq { lsn, seq } => write!(f, "entry with {seq} at lsn {}", lsn.0),
            Self::NoSnapshot { chat } => write!(f, "entries for {chat} but no snapshot of it"),
        }
    }
}

impl std::error::Error for ReplayError {}

/// The owner role of one shard.
pub struct Owner {
    /// This shard's owner index (what BacklogChunk names).
    index: u16,
    /// Where each user's session is (its home's address), from its backlog request: live
    /// deliveries and typing go there; a user with none gets its entries from its next backlog.
    /// (Usually one home; two while a user moves between relays, in either order.)
    located: Map<UserId, smallvec::SmallVec<[u16; 2]>>,
    cfg: ChatConfig,
    chats: Map<ChatId, Chat>,
    /// Chats owned here that each user belongs to.
    member_of: Map<UserId, Vec<ChatId>>,
    dedup: Dedup,
    pending_per_user: Map<UserId, usize>,
    /// Stored entries each user wrote (kinds a client sends) that not every recipient has
    /// acknowledged: bounded like an inbox, so that writing to users who never come (made-up
    /// ids among them) cannot fill the relay.
    pending_per_sender: Map<UserId, usize>,
    /// Backlogs being streamed, per user and home.
    streams: Map<(UserId, u16), Stream>,
    /// Records to append, and what each belongs to.
    records: records::Batch,
    rec_owners: Vec<RecOwner>,
    /// Buffers for MSG frames.
    frames: FramePool,
    after_commit: Vec<(u16, ShardMsg)>,
    committing: Option<Committing>,
    /// Emptied buffers of the last batch and commit, for the next ones.
    spare_records: records::Batch,
    spare_committing: Committing,
    /// Chats of the batch being committed (kept for its capacity).
    touched: Vec<ChatId>,
    /// Chats still to snapshot in the running checkpoint.
    checkpoint_todo: Vec<ChatId>,
    /// LSNs of records that became dead; the driver marks them in the log.
    pub dead: Vec<Lsn>,
    /// Messages to other shards (or this one) that need no durability.
    pub out: Vec<(u16, ShardMsg)>,
    /// Entries accepted (not counting duplicates).
    pub n_accepted: u64,
}

impl Owner {
    /// An empty owner for shard `shard` of a relay of `n_shards` on its own.
    pub fn new(shard: u16, n_shards: u16, cfg: ChatConfig) -> Self {
        Self::at(&super::msg::Place::standalone(shard, n_shards), cfg)
    }

    /// An empty owner at `place` (a shard that owns no chat answers to nobody).
    pub fn at(place: &super::msg::Place, cfg: ChatConfig) -> Self {
        Self {
            index: place.owner_index().unwrap_or(u16::MAX),
            located: Map::default(),
            dedup: Dedup::new(cfg.dedup_capacity),
            cfg,
            chats: Map::default(),
            member_of: Map::default(),
            pending_per_user: Map::default(),
            pending_per_sender: Map::default(),
            streams: Map::default(),
            records: records::Batch::default(),
            rec_owners: Vec::new(),
            frames: FramePool::default(),
            after_commit: Vec::new(),
            committing: None,
            spare_records: records::Batch::default(),
            spare_committing: Committing::default(),
            touched: Vec::new(),
            checkpoint_todo: Vec::new(),
            dead: Vec::new(),
            out: Vec::new(),
            n_accepted: 0,
        }
    }

    fn fail(&mut self, to: Origin, msg_id: MsgId, code: u16, text: &'static str) {
        self.out.push((
            to.home,
            ShardMsg::ToHome(ToHome::Failed {
                to,
                msg_id,
                code,
                text,
            }),
        ));
    }

    /// Warms the cache for handling `msg` soon: the deduplication bucket of a SEND, which is
    /// otherwise a cache miss on every new message.
    pub fn prefetch(&self, msg: &ShardMsg) {
        if let ShardMsg::ToOwner(ToOwner::Submit(s)) = msg {
            self.dedup.prefetch(s.from.user, &s.msg_id);
        }
    }

    /// Handles one message addressed to the owner role.
    pub fn handle(&mut self, msg: ToOwner, now_ms: u64) {
        match msg {
            ToOwner::Submit(s) => {
                self.submit(s, now_ms);
            }
            ToOwner::Ack { user, chat, seq } => self.ack(user, chat, seq, now_ms),
            ToOwner::CreateGroup {
                from,
                msg_id,
                chat,
                members,
            } => self.create_group(from, msg_id, chat, members, now_ms),
            ToOwner::ChangeMember {
                from,
                msg_id,
                chat,
                target,
                add,
            } => self.change_member(from, msg_id, chat, target, add, now_ms),
            ToOwner::BacklogStart {
                user,
                epoch,
                home,
                budget,
            } => {
                // Each home's session is its own: a home's requests never undo another's,
                // whichever order they arrive in from different relays.
                let homes = self.located.entry(user).or_default();
                if !homes.contains(&home) && homes.len() < MAX_HOMES_PER_USER {
                    homes.push(home);
                }
                self.streams.insert(
                    (user, home),
                    Stream {
                        epoch,
                        home,
                        cursors: Map::default(),
                    },
                );
                self.stream_chunk(user, home, epoch, budget);
            }
            ToOwner::BacklogMore {
                user,
                home,
                epoch,
                budget,
            } => self.stream_chunk(user, home, epoch, budget),
            ToOwner::BacklogCancel { user, home } => {
                if let Some(homes) = self.located.get_mut(&user) {
                    homes.retain(|h| *h != home);
                    if homes.is_empty() {
                        self.located.remove(&user);
                    }
                }
                self.streams.remove(&(user, home));
            }
            ToOwner::ListGroups { from } => self.list_groups(from),
            ToOwner::TypingInGroup { from, chat } => self.typing(from, chat),
            ToOwner::TypingDirect { from, to, chat } => {
                for &home in self.located.get(&to).into_iter().flatten() {
                    self.out
                        .push((home, ShardMsg::ToHome(ToHome::Typing { from, chat, to })));
                }
            }
            ToOwner::PresenceWatch { .. } | ToOwner::PresenceState { .. } => {
                unreachable!("presence is the home role's (ChatShard::dispatch)")
            }
        }
    }

    /// A retry of an accepted request is answered with its original outcome, and "sent" still
    /// waits for durability if the original has not committed yet.
    /// `spent` is the SEND's box, which goes back with the answer.
    fn answer_duplicate(
        &mut self,
        from: Origin,
        msg_id: MsgId,
        spent: &mut Option<Box<Submit>>,
    ) -> bool {
        let Some((chat, seq)) = self.dedup.get(from.user, &msg_id) else {
            return false;
        };
        let committed = self
            .chats
            .get(&chat)
            .is_none_or(|c| c.pending.iter().all(|s| s.seq != seq || s.committed));
        let sent = ShardMsg::ToHome(ToHome::Sent {
            to: from,
            msg_id,
            chat,
            seq,
            spent: spent.take(),
        });
        let in_flight = self.committing.as_mut().filter(|(owners, _)| {
            owners
                .iter()
                .any(|o| matches!(*o, RecOwner::Entry { chat: c, seq: s } if c == chat && s == seq))
        });
        if committed {
            self.out.push((from.home, sent));
        } else if let Some((_, actions)) = in_flight {
            // The original is in the batch being synced: answer with that batch (a retry makes
            // no record, so nothing else would start a commit that releases it).
            actions.push((from.home, sent));
        } else {
            self.after_commit.push((from.home, sent));
        }
        true
    }

    /// Handles a SEND's submit. Its box goes back to its home shard with the SENT; a refused
    /// SEND's box is returned for reuse here.
    pub fn submit(&mut self, s: Box<Submit>, now_ms: u64) -> Option<Box<Submit>> {
        let mut s = Some(s);
        self.submit_inner(&mut s, now_ms);
        s
    }

    /// `spent` is taken when the SENT carries it.
    fn submit_inner(&mut self, spent: &mut Option<Box<Submit>>, now_ms: u64) {
        let s = spent.as_deref_mut().expect("a submit to handle");
        let (from, msg_id) = (s.from, s.msg_id);
        if self.answer_duplicate(from, msg_id, spent) {
            return;
        }
        let s = spent.as_deref_mut().expect("not taken: no answer yet");
        if !s.chat.is_group() && !self.chats.contains_key(&s.chat) {
            let author = s.from.user;
            let Some(to) =
                s.to.filter(|&to| to != author && ChatId::direct(author, to) == s.chat)
            else {
                return self.fail(s.from, s.msg_id, code::INVALID, "bad direct chat");
            };
            // Every limit before the chat exists: a refused SEND leaves no chat behind.
            if let Some(why) = self.new_chat_refusal(author, &[to]) {
                return self.fail(s.from, s.msg_id, code::INBOX_FULL, why);
            }
            self.open_direct(s.chat, author, to);
        }
        let Some(chat) = self.chats.get(&s.chat) else {
            return self.fail(s.from, s.msg_id, code::UNKNOWN_CHAT, "unknown chat");
        };
        if chat.member(s.from.user).is_none()
            || (!chat.group && s.to.is_none_or(|to| chat.member(to).is_none()))
        {
            return self.fail(s.from, s.msg_id, code::NOT_MEMBER, "not a member");
        }
        let seq = chat.next_seq;
        let audience: Audience = chat
            .members
            .iter()
            .filter(|m| m.user != s.from.user && m.joined_after < seq)
            .map(|m| m.user)
            .collect();
        if audience.iter().any(|u| {
            self.pending_per_user.get(u).copied().unwrap_or(0) >= self.cfg.max_pending_per_user
        }) {
            return self.fail(s.from, s.msg_id, code::INBOX_FULL, "recipient inbox full");
        }
        let limit = self.cfg.max_pending_per_user;
        if !audience.is_empty()
            && self
                .pending_per_sender
                .get(&s.from.user)
                .copied()
                .unwrap_or(0)
                >= limit
        {
            return self.fail(
                s.from,
                s.msg_id,
                code::INBOX_FULL,
                "too many of your messages are undelivered",
            );
        }
        let e = EntryRec {
            chat: s.chat,
            seq,
            sender: s.from.user,
            msg_id: s.msg_id,
            kind: s.kind,
            ref_id: s.ref_id,
            ts_ms: now_ms,
            audience,
            body: std::mem::take(&mut s.body),
        };
        self.append_entry(e, Some((from, spent.take())));
    }

    /// Chats owned here that `user` is in.
    fn chats_of(&self, user: UserId) -> usize {
        self.member_of.get(&user).map_or(0, Vec::len)
    }

    /// Why a new chat of `author` with `others` must be refused, checked before anything is
    /// created: a chat too many for any of them, a recipient's inbox full, or too many of the
    /// author's entries undelivered.
    fn new_chat_refusal(&self, author: UserId, others: &[UserId]) -> Option<&'static str> {
        let count = |m: &Map<UserId, usize>, u: &UserId| m.get(u).copied().unwrap_or(0);
        let limit = self.cfg.max_pending_per_user;
        if std::iter::once(&author)
            .chain(others)
            .any(|&u| self.chats_of(u) >= self.cfg.max_chats_per_user)
        {
            return Some("too many chats");
        }
        if others
            .iter()
            .any(|u| count(&self.pending_per_user, u) >= limit)
        {
            return Some("recipient inbox full");
        }
        if !others.is_empty() && count(&self.pending_per_sender, &author) >= limit {
            return Some("too many of your messages are undelivered");
        }
        None
    }

    /// Creates the direct chat between `a` and `b` and records it.
    fn open_direct(&mut self, id: ChatId, a: UserId, b: UserId) {
        let members = [a, b]
            .map(|user| MemberRec {
                user,
                joined_after: Seq(0),
                acked: Seq(0),
            })
            .into();
        self.log_snapshot(ChatRec {
            chat: id,
            group: false,
            creator: UserId(0),
            next_seq: Seq(1),
            members,
        });
    }

    /// Records a change of a chat's membership or counters as its new snapshot, and applies it.
    fn log_snapshot(&mut self, rec: ChatRec) {
        self.records
            .push(records::CHAT, |out| records::encode_chat(out, &rec));
        self.rec_owners.push(RecOwner::Chat { chat: rec.chat });
        self.apply(Rec::Chat(rec), None);
    }

    /// Writes the current state of `chat` again (a checkpoint): no change to apply.
    fn write_snapshot(&mut self, chat: ChatId) {
        let c = self.chats.get(&chat).expect("snapshot of a live chat");
        let snapshot = c.snapshot(chat);
        self.records
            .push(records::CHAT, |out| records::encode_chat(out, &snapshot));
        self.rec_owners.push(RecOwner::Chat { chat });
    }

    /// Sequences a new entry: stores it, appends its record, and queues "sent" for `from` and
    /// delivery to its audience for when the record is durable.
    /// `from` is the requester and, for a SEND, its submit's box (which goes back with the
    /// SENT).
    fn append_entry(&mut self, e: EntryRec, from: Option<(Origin, Option<Box<Submit>>)>) {
        debug_assert_eq!(
            self.chats.get(&e.chat).map(|c| c.next_seq),
            Some(e.seq),
            "entries are appended to live chats, in seq order"
        );
        let (chat_id, seq, msg_id) = (e.chat, e.seq, e.msg_id);
        self.records
            .push(records::ENTRY, |out| records::encode_entry(out, &e));
        self.rec_owners.push(RecOwner::Entry { chat: chat_id, seq });
        self.n_accepted += 1;
        self.apply(Rec::Entry(e), None);
        if let Some((from, spent)) = from {
            self.after_commit.push((
                from.home,
                ShardMsg::ToHome(ToHome::Sent {
                    to: from,
                    msg_id,
                    chat: chat_id,
                    seq,
                    spent,
                }),
            ));
        }
        // Queued for everyone: `handle_committed` drops it for a user whose backlog stream
        // is still running then (the stream carries the entry once committed); a stream that
        // ends before the commit cannot carry it, and then this live delivery does.
        let stored = self
            .chats
            .get(&chat_id)
            .and_then(|c| c.pending.back())
            .expect("the entry just applied");
        for &user in &stored.unacked {
            // Addressed when released (`handle_committed`), to where the user is then.
            let home = u16::MAX;
            let d = ShardMsg::ToHome(ToHome::Deliver {
                user,
                chat: chat_id,
                seq,
                frame: stored.frame.clone(),
                backlog: None,
            });
            self.after_commit.push((home, d));
        }
    }

    fn ack(&mut self, user: UserId, chat_id: ChatId, seq: Seq, now_ms: u64) {
        let Some(chat) = self.chats.get(&chat_id) else {
            return;
        };
        let Some(m) = chat.member(user) else {
            return;
        };
        // Clamped to what exists first: an ACK beyond it, repeated, must not write a record
        // each time.
        let seq = seq.min(chat.next_seq.prev());
        if seq <= m.acked {
            return;
        }
        let next_seq = chat.next_seq;
        self.records.push(records::ACK, |out| {
            records::encode_ack(out, chat_id, user, seq)
        });
        self.rec_owners.push(RecOwner::Ack);
        let senders = self.apply(
            Rec::Ack {
                chat: chat_id,
                user,
                seq,
            },
            None,
        );
        // Receipts do not beget receipts: only messages, edits and deletes are acknowledged
        // with a DELIVERED entry, one per acknowledgement batch, to their authors.
        if !senders.is_empty() {
            let e = EntryRec {
                chat: chat_id,
                seq: next_seq,
                sender: user,
                msg_id: receipt_id(user, seq),
                kind: kind::DELIVERED,
                ref_id: [0; 16],
                ts_ms: now_ms,
                audience: senders,
                body: Body::from_slice(&seq.0.to_le_bytes()),
            };
            self.append_entry(e, None);
        }
    }

    fn create_group(
        &mut self,
        from: Origin,
        msg_id: MsgId,
        chat_id: ChatId,
        members: Vec<UserId>,
        now_ms: u64,
    ) {
        if self.answer_duplicate(from, msg_id, &mut None) {
            return;
        }
        // Without duplicates, in the order given (linear: the list is up to
        // `max_group_members` long, and checked for that by the home shard).
        let mut all = vec![from.user];
        let mut seen: Map<UserId, ()> = Map::default();
        seen.insert(from.user, ());
        for m in members {
            if m != UserId(0) && seen.insert(m, ()).is_none() {
                all.push(m);
            }
        }
        if all.len() > self.cfg.max_group_members
            || self.chats.contains_key(&chat_id)
            || !chat_id.is_group()
        {
            return self.fail(from, msg_id, code::INVALID, "group too large or id in use");
        }
        // Its GROUP_CREATED entry goes to every member: counted like a message.
        if let Some(why) = self.new_chat_refusal(from.user, &all[1..]) {
            return self.fail(from, msg_id, code::INBOX_FULL, why);
        }
        let members = all
            .iter()
            .map(|&user| MemberRec {
                user,
                joined_after: Seq(0),
                acked: Seq(0),
            })
            .collect();
        self.log_snapshot(ChatRec {
            chat: chat_id,
            group: true,
            creator: from.user,
            next_seq: Seq(1),
            members,
        });
        let body: Body = all.iter().flat_map(|u| u.0.to_le_bytes()).collect();
        let audience = Audience::from_slice(&all[1..]);
        let e = EntryRec {
            chat: chat_id,
            seq: Seq(1),
            sender: from.user,
            msg_id,
            kind: kind::GROUP_CREATED,
            ref_id: [0; 16],
            ts_ms: now_ms,
            audience,
            body,
        };
        self.append_entry(e, Some((from, None)));
    }

    fn change_member(
        &mut self,
        from: Origin,
        msg_id: MsgId,
        chat_id: ChatId,
        target: UserId,
        add: bool,
        now_ms: u64,
    ) {
        if self.answer_duplicate(from, msg_id, &mut None) {
            return;
        }
        let Some(chat) = self.chats.get(&chat_id).filter(|c| c.group) else {
            return self.fail(from, msg_id, code::UNKNOWN_CHAT, "unknown group");
        };
        if chat.member(from.user).is_none() {
            return self.fail(from, msg_id, code::NOT_MEMBER, "not a member");
        }
        let seq = chat.next_seq;
        let present = chat.member(target).is_some();
        let mut rec = chat.snapshot(chat_id);
        let k = if add {
            if present || target == UserId(0) || chat.members.len() >= self.cfg.max_group_members {
                return self.fail(
                    from,
                    msg_id,
                    code::INVALID,
                    "already a member or group full",
                );
            }
            if self.chats_of(target) >= self.cfg.max_chats_per_user {
                return self.fail(from, msg_id, code::INBOX_FULL, "too many chats");
            }
            // The new member sees the announcement of its own arrival and everything after.
            rec.members.push(MemberRec {
                user: target,
                joined_after: seq.prev(),
                acked: seq.prev(),
            });
            kind::MEMBER_ADDED
        } else {
            if !present || (target != from.user && from.user != chat.creator) {
                return self.fail(
                    from,
                    msg_id,
                    code::NOT_MEMBER,
                    "only the creator removes others",
                );
            }
            rec.members.retain(|m| m.user != target);
            kind::MEMBER_REMOVED
        };
        let audience: Audience = rec
            .members
            .iter()
            .map(|m| m.user)
            .filter(|&u| u != from.user)
            .collect();
        self.log_snapshot(rec);
        let e = EntryRec {
            chat: chat_id,
            seq,
            sender: from.user,
            msg_id,
            kind: k,
            ref_id: [0; 16],
            ts_ms: now_ms,
            audience,
            body: Body::from_slice(&target.0.to_le_bytes()),
        };
        self.append_entry(e, Some((from, None)));
    }

    /// Sends the next chunk of `user`'s committed, unacknowledged entries (in seq order per
    /// chat), at most `budget` (the home's share of the session's window for this owner) and
    /// `backlog_chunk`, then a BacklogChunk marker saying whether more remains.
    fn stream_chunk(&mut self, user: UserId, home: u16, epoch: u64, budget: u16) {
        let Some(stream) = self
            .streams
            .get_mut(&(user, home))
            .filter(|s| s.epoch == epoch)
        else {
            return;
        };
        let mut budget = self.cfg.backlog_chunk.min(usize::from(budget)).max(1);
        let mut more = false;
        for chat_id in self.member_of.get(&user).map(Vec::as_slice).unwrap_or(&[]) {
            let Some(chat) = self.chats.get(chat_id) else {
                continue;
            };
            let cursor = stream.cursors.entry(*chat_id).or_insert(Seq(0));
            let from = *cursor;
            for s in chat
                .pending
                .iter()
                .filter(|s| s.seq > from && s.committed && s.unacked.contains(&user))
            {
                if budget == 0 {
                    more = true;
                    break;
                }
                budget -= 1;
                *cursor = s.seq;
                let d = ShardMsg::ToHome(ToHome::Deliver {
                    user,
                    chat: *chat_id,
                    seq: s.seq,
                    frame: s.frame.clone(),
                    backlog: Some(epoch),
                });
                self.out.push((stream.home, d));
            }
            if more {
                break;
            }
        }
        let home = stream.home;
        if !more {
            // Caught up: entries committed from now on are delivered live.
            self.streams.remove(&(user, home));
        }
        self.out.push((
            home,
            ShardMsg::ToHome(ToHome::BacklogChunk {
                user,
                epoch,
                owner: self.index,
                more,
            }),
        ));
    }

    fn list_groups(&mut self, from: Origin) {
        // Pieces of at most this many members (a link frame of about 32 KiB).
        const PIECE_MEMBERS: usize = 4096;
        let mut piece: Vec<(ChatId, Vec<UserId>)> = Vec::new();
        let mut members = 0;
        let groups = self.member_of.get(&from.user).into_iter().flatten();
        for id in groups {
            let Some(c) = self.chats.get(id).filter(|c| c.group) else {
                continue;
            };
            if members + c.members.len() > PIECE_MEMBERS && !piece.is_empty() {
                let groups = std::mem::take(&mut piece);
                self.out.push((
                    from.home,
                    ShardMsg::ToHome(ToHome::GroupsPart {
                        to: from,
                        groups,
                        last: false,
                    }),
                ));
                members = 0;
            }
            members += c.members.len();
            piece.push((*id, c.members.iter().map(|m| m.user).collect()));
        }
        self.out.push((
            from.home,
            ShardMsg::ToHome(ToHome::GroupsPart {
                to: from,
                groups: piece,
                last: true,
            }),
        ));
    }

    fn typing(&mut self, from: UserId, chat_id: ChatId) {
        let Some(chat) = self.chats.get(&chat_id) else {
            return;
        };
        if chat.member(from).is_none() {
            return;
        }
        for m in chat.members.iter().filter(|m| m.user != from) {
            for &home in self.located.get(&m.user).into_iter().flatten() {
                self.out.push((
                    home,
                    ShardMsg::ToHome(ToHome::Typing {
                        from,
                        chat: chat_id,
                        to: m.user,
                    }),
                ));
            }
        }
    }

    /// Moves the records produced so far out for appending. The actions that wait on them are
    /// released by [`Owner::handle_committed`] once the driver has committed the log.
    pub fn take_batch(&mut self) -> records::Batch {
        debug_assert!(self.committing.is_none(), "one commit at a time");
        let (spare_owners, spare_actions) = std::mem::take(&mut self.spare_committing);
        let owners = std::mem::replace(&mut self.rec_owners, spare_owners);
        let actions = std::mem::replace(&mut self.after_commit, spare_actions);
        self.committing = Some((owners, actions));
        std::mem::replace(&mut self.records, std::mem::take(&mut self.spare_records))
    }

    /// A batch from [`Owner::take_batch`], appended: its buffers serve the next one.
    pub fn give_back_batch(&mut self, mut batch: records::Batch) {
        batch.clear();
        if batch.capacity() <= super::MAX_KEPT_LEN {
            self.spare_records = batch;
        }
    }

    /// The records of the last batch are durable at these LSNs (same order): file the LSNs,
    /// mark the entries committed and release "sent" and deliveries.
    pub fn handle_committed(&mut self, lsns: &[Lsn]) {
        let Some((mut owners, mut actions)) = self.committing.take() else {
            return;
        };
        debug_assert_eq!(owners.len(), lsns.len());
        let mut touched = std::mem::take(&mut self.touched);
        for (owner, &lsn) in owners.iter().zip(lsns) {
            match *owner {
                RecOwner::Ack => self.dead.push(lsn),
                RecOwner::Chat { chat } => match self.chats.get_mut(&chat) {
                    Some(c) => {
                        if let Some(old) = c.state_lsn.replace(lsn) {
                            self.dead.push(old);
                        }
                    }
                    // A snapshot of a group forgotten since (a checkpoint's): nothing holds it.
                    None => self.dead.push(lsn),
                },
                RecOwner::Entry { chat, seq } => {
                    let Some(c) = self.chats.get_mut(&chat) else {
                        self.dead.push(lsn);
                        continue;
                    };
                    // Pending entries are kept in seq order.
                    if let Ok(i) = c.pending.binary_search_by_key(&seq, |s| s.seq) {
                        c.pending[i].lsn = Some(lsn);
                        c.pending[i].committed = true;
                        if touched.last() != Some(&chat) {
                            touched.push(chat);
                        }
                    }
                }
            }
        }
        // Entries acknowledged before their commit can go now; only the chats of this batch
        // can hold such entries.
        touched.sort_unstable();
        touched.dedup();
        for chat in touched.drain(..) {
            if let Some(c) = self.chats.get_mut(&chat) {
                drop_settled(
                    &mut c.pending,
                    &mut self.dead,
                    &mut self.frames,
                    &mut self.pending_per_sender,
                );
                if c.is_abandoned() {
                    self.forget(chat);
                }
            }
        }
        if touched.capacity() <= super::MAX_KEPT_LEN {
            self.touched = touched;
        }
        // A user whose backlog is being streamed gets these entries from the stream, in order,
        // now that they are committed.
        // Everyone else gets them where its session is now, if it has one.
        let (streams, located, out) = (&self.streams, &self.located, &mut self.out);
        for (to, a) in actions.drain(..) {
            let user = match &a {
                ShardMsg::ToHome(ToHome::Deliver { user, .. }) => *user,
                _ => {
                    out.push((to, a));
                    continue;
                }
            };
            let mut homes = located
                .get(&user)
                .into_iter()
                .flatten()
                .filter(|&&h| !streams.contains_key(&(user, h)))
                .copied()
                .peekable();
            while let Some(home) = homes.next() {
                if homes.peek().is_some() {
                    out.push((home, a.clone()));
                } else {
                    out.push((home, a));
                    break;
                }
            }
        }
        owners.clear();
        if owners.capacity().max(actions.capacity()) <= super::MAX_KEPT_LEN {
            self.spare_committing = (owners, actions);
        }
    }

    /// Drops an abandoned group; its last snapshot dies with it (every earlier record of it is
    /// dead already, and since the log deletes only a dead prefix, the last snapshot, which
    /// says "no members", is still there whenever an older one is, so a replay drops the group
    /// again in `finish_replay`).
    fn forget(&mut self, chat: ChatId) {
        if let Some(c) = self.chats.remove(&chat) {
            self.dead.extend(c.state_lsn);
        }
    }

    /// Whether records wait to be appended.
    pub fn has_records(&self) -> bool {
        !self.records.is_empty()
    }

    /// Writes a fresh snapshot of every chat, all at once (the worst case of a checkpoint;
    /// the relay writes only those [`Owner::start_selective_checkpoint`] picks, spread over
    /// loop turns by [`Owner::checkpoint_step`]). A running checkpoint is finished instead.
    pub fn checkpoint(&mut self) {
        if self.checkpoint_todo.is_empty() {
            self.checkpoint_todo.extend(self.chats.keys().copied());
        }
        while self.checkpoint_step(usize::MAX) {}
    }

    /// Starts a checkpoint of only the chats whose snapshot holds back compaction, given the
    /// first Lsn of every log segment (oldest first): those whose committed snapshot lies in
    /// a segment older than both the newest one and the one holding the oldest entry still
    /// waiting for a recipient. Segments from that entry's on stay whatever is snapshotted,
    /// so rewriting the snapshots in them only writes (a shard owning a million chats
    /// appended 80 MiB for each checkpoint, most of it for nothing while a recipient was away).
    /// Returns whether there is anything to write.
    pub fn start_selective_checkpoint(&mut self, segment_starts: &[u64]) -> bool {
        if !self.checkpoint_todo.is_empty() {
            return true;
        }
        let Some(&newest) = segment_starts.last() else {
            return false;
        };
        let oldest_live = self
            .chats
            .values()
            .filter_map(|c| c.pending.front().and_then(|s| s.lsn))
            .min();
        let cutoff = match oldest_live {
            // The start of the segment that holds it.
            Some(lsn) => segment_starts
                .iter()
                .copied()
                .take_while(|&start| start <= lsn.0)
                .last()
                .unwrap_or(0)
                .min(newest),
            None => newest,
        };
        self.checkpoint_todo.extend(
            self.chats
                .iter()
                .filter(|(_, c)| c.state_lsn.is_some_and(|l| l.0 < cutoff))
                .map(|(&id, _)| id),
        );
        if self.checkpoint_todo.is_empty() {
            self.checkpoint_todo = Vec::new();
            return false;
        }
        true
    }

    /// Snapshots up to `budget` chats of the running checkpoint; returns whether any remain.
    /// A chat created meanwhile wrote its own snapshot when it was created.
    pub fn checkpoint_step(&mut self, budget: usize) -> bool {
        for _ in 0..budget {
            let Some(id) = self.checkpoint_todo.pop() else {
                break;
            };
            if self.chats.contains_key(&id) {
                self.write_snapshot(id);
            }
        }
        if self.checkpoint_todo.is_empty() {
            // Free a large list once done (one u64 per chat).
            self.checkpoint_todo = Vec::new();
            return false;
        }
        true
    }

    /// Rebuilds state from one recovered record (in log order), through the same `Owner::apply`
    /// as the live path.
    pub fn replay(&mut self, lsn: Lsn, kind: u8, payload: &[u8]) -> Result<(), ReplayError> {
        let rec = records::decode(kind, payload).ok_or(ReplayError::Undecodable { lsn, kind })?;
        match &rec {
            Rec::Chat(c) if c.next_seq == Seq(0) => {
                return Err(ReplayError::ZeroNextSeq { lsn, chat: c.chat });
            }
            Rec::Entry(e) if e.seq == Seq(0) || e.seq == Seq(u64::MAX) => {
                return Err(ReplayError::BadSeq { lsn, seq: e.seq });
            }
            _ => {}
        }
        self.apply(rec, Some(lsn));
        Ok(())
    }

    /// Applies one durable fact to the owner's state. This is the one interpreter of the
    /// owner's records: live, a handler validates a request, appends its record and applies
    /// it (`lsn` is `None`: the record learns its place at commit, `handle_committed`); in
    /// recovery, [`Owner::replay`] applies each record read back (`lsn` is known). So the
    /// state after a restart is the state before it, but for what `finish_replay` settles.
    /// Returns, for an acknowledgement, the authors owed a DELIVERED receipt.
    fn apply(&mut self, rec: Rec, lsn: Option<Lsn>) -> Audience {
        match rec {
            Rec::Chat(c) => {
                self.apply_snapshot(c, lsn);
                Audience::new()
            }
            Rec::Entry(e) => {
                self.apply_entry(e, lsn);
                Audience::new()
            }
            Rec::Ack { chat, user, seq } => self.apply_ack(chat, user, seq, lsn),
        }
    }

    /// A chat's new membership and counters. Members it no longer has leave the chat: they
    /// no longer hold its entries back.
    fn apply_snapshot(&mut self, c: ChatRec, lsn: Option<Lsn>) {
        let old = self.chats.remove(&c.chat);
        let mut state_lsn = old.as_ref().and_then(|o| o.state_lsn);
        if let Some(lsn) = lsn {
            // In recovery the newer snapshot supersedes the older at once; live, at commit.
            if let Some(old_lsn) = state_lsn.replace(lsn) {
                self.dead.push(old_lsn);
            }
        }
        let mut pending = VecDeque::new();
        if let Some(mut old) = old {
            for m in &old.members {
                if c.members.iter().any(|n| n.user == m.user) {
                    continue;
                }
                forget_membership(&mut self.member_of, m.user, c.chat);
                for s in old.pending.iter_mut() {
                    if let Some(i) = s.unacked.iter().position(|&u| u == m.user) {
                        s.unacked.swap_remove(i);
                        count_down(&mut self.pending_per_user, m.user);
                    }
                }
            }
            pending = old.pending;
            drop_settled(
                &mut pending,
                &mut self.dead,
                &mut self.frames,
                &mut self.pending_per_sender,
            );
        }
        for m in &c.members {
            let list = self.member_of.entry(m.user).or_default();
            if !list.contains(&c.chat) {
                list.push(c.chat);
            }
        }
        let members = c
            .members
            .iter()
            .map(|m| Member {
                user: m.user,
                joined_after: m.joined_after,
                acked: m.acked,
            })
            .collect();
        let next_seq = c
            .next_seq
            .max(pending.back().map_or(Seq(1), |s| s.seq.next()));
        self.chats.insert(
            c.chat,
            Chat {
                group: c.group,
                creator: c.creator,
                next_seq,
                members,
                pending,
                state_lsn,
            },
        );
    }

    /// A sequenced entry, stored until its audience has acknowledged it. In recovery a chat's
    /// entries may come before its snapshot: a checkpoint's snapshot follows entries still
    /// waiting for a recipient once the segment with the previous snapshot is gone. The
    /// snapshot, further on, fills in the rest; `finish_replay` fails if it never comes.
    fn apply_entry(&mut self, e: EntryRec, lsn: Option<Lsn>) {
        let chat = self.chats.entry(e.chat).or_insert_with(|| Chat {
            group: false,
            creator: UserId(0),
            next_seq: Seq(1),
            members: Vec::new(),
            pending: VecDeque::new(),
            state_lsn: None,
        });
        chat.next_seq = chat.next_seq.max(e.seq.next());
        let frame = encode_frame(&mut self.frames, &e);
        for u in &e.audience {
            *self.pending_per_user.entry(*u).or_default() += 1;
        }
        if kind::client_may_send(e.kind) {
            *self.pending_per_sender.entry(e.sender).or_default() += 1;
        }
        remember(&mut self.dedup, &e);
        chat.pending.push_back(Stored {
            seq: e.seq,
            sender: e.sender,
            kind: e.kind,
            frame,
            unacked: e.audience,
            lsn,
            committed: lsn.is_some(),
        });
    }

    /// `user` has `chat` up to `seq` (cumulative). Returns the authors of the messages, edits
    /// and deletes it acknowledged who are still members (owed a DELIVERED receipt).
    fn apply_ack(&mut self, chat_id: ChatId, user: UserId, seq: Seq, lsn: Option<Lsn>) -> Audience {
        // An acknowledgement is spent once applied: nothing reads it again but a replay.
        self.dead.extend(lsn);
        let mut senders = Audience::new();
        let Some(chat) = self.chats.get_mut(&chat_id) else {
            return senders;
        };
        let Some(m) = chat.members.iter_mut().find(|m| m.user == user) else {
            return senders;
        };
        if seq <= m.acked {
            return senders;
        }
        let previous = std::mem::replace(&mut m.acked, seq);
        let members = &chat.members;
        // `pending` is in seq order: start at the first entry after `previous` (acknowledging
        // one entry at a time must not scan the whole inbox each time).
        let from = chat.pending.partition_point(|s| s.seq <= previous);
        for s in chat.pending.range_mut(from..).take_while(|s| s.seq <= seq) {
            if let Some(i) = s.unacked.iter().position(|&u| u == user) {
                s.unacked.swap_remove(i);
                count_down(&mut self.pending_per_user, user);
                // Not to an author who has left the group: it could never acknowledge the
                // receipt, which would then stay stored (and hold every later log segment).
                if matches!(s.kind, kind::TEXT | kind::EDIT | kind::DELETE)
                    && !senders.contains(&s.sender)
                    && members.iter().any(|m| m.user == s.sender)
                {
                    senders.push(s.sender);
                }
            }
        }
        drop_settled(
            &mut chat.pending,
            &mut self.dead,
            &mut self.frames,
            &mut self.pending_per_sender,
        );
        senders
    }

    /// Completes recovery: drops what members have acknowledged (or who left) and recounts the
    /// inboxes. Fails if a chat had entries but no snapshot (a log that lost records).
    pub fn finish_replay(&mut self) -> Result<(), ReplayError> {
        if let Some((&chat, _)) = self.chats.iter().find(|(_, c)| c.state_lsn.is_none()) {
            return Err(ReplayError::NoSnapshot { chat });
        }
        self.pending_per_user.clear();
        self.pending_per_sender.clear();
        for c in self.chats.values_mut() {
            let acked: Map<UserId, Seq> = c.members.iter().map(|m| (m.user, m.acked)).collect();
            for s in c.pending.iter_mut() {
                s.unacked
                    .retain(|u| acked.get(u).is_some_and(|&a| a < s.seq));
                for u in &s.unacked {
                    *self.pending_per_user.entry(*u).or_default() += 1;
                }
            }
            // Counted below from what stays, so nothing to count down here.
            drop_settled(
                &mut c.pending,
                &mut self.dead,
                &mut self.frames,
                &mut Map::default(),
            );
            for s in c.pending.iter().filter(|s| kind::client_may_send(s.kind)) {
                *self.pending_per_sender.entry(s.sender).or_default() += 1;
            }
        }
        let abandoned: Vec<ChatId> = self
            .chats
            .iter()
            .filter(|(_, c)| c.is_abandoned())
            .map(|(&id, _)| id)
            .collect();
        for chat in abandoned {
            self.forget(chat);
        }
        Ok(())
    }

    /// Entries stored and not yet acknowledged by every recipient.
    pub fn n_pending(&self) -> usize {
        self.chats.values().map(|c| c.pending.len()).sum()
    }

    /// Request ids the deduplication index forgot before their time.
    pub fn n_dedup_early_evictions(&self) -> u64 {
        self.dedup.early_evictions()
    }

    /// Chats owned here.
    pub fn n_chats(&self) -> usize {
        self.chats.len()
    }

    /// Checks the owner's internal invariants; for tests, the simulation and fuzzing (like the
    /// media engine's `Shard::check_invariants`). Panics on the first violation.
    pub fn check_invariants(&self) {
        let mut per_user: Map<UserId, usize> = Map::default();
        let mut per_sender: Map<UserId, usize> = Map::default();
        for (&id, c) in &self.chats {
            assert!(c.next_seq >= Seq(1), "{id}: next seq 0");
            let mut last = Seq(0);
            for s in &c.pending {
                assert!(s.seq > last, "{id}: pending out of seq order");
                assert!(s.seq < c.next_seq, "{id}: {} not below next", s.seq);
                assert_eq!(s.committed, s.lsn.is_some(), "{id}: committed iff filed");
                for (i, u) in s.unacked.iter().enumerate() {
                    assert!(
                        !s.unacked[..i].contains(u),
                        "{id}: audience repeats {}",
                        u.0
                    );
                    *per_user.entry(*u).or_default() += 1;
                }
                if kind::client_may_send(s.kind) {
                    *per_sender.entry(s.sender).or_default() += 1;
                }
                last = s.seq;
            }
            for (i, m) in c.members.iter().enumerate() {
                assert!(
                    c.members[..i].iter().all(|n| n.user != m.user),
                    "{id}: member {} twice",
                    m.user.0
                );
                assert!(
                    self.member_of.get(&m.user).is_some_and(|l| l.contains(&id)),
                    "{id}: member {} not indexed",
                    m.user.0
                );
            }
            assert!(!c.is_abandoned(), "{id}: abandoned group kept");
        }
        for (&user, list) in &self.member_of {
            assert!(!list.is_empty(), "{user}: empty membership list kept");
            for (i, chat) in list.iter().enumerate() {
                assert!(!list[..i].contains(chat), "{user}: {chat} twice");
                assert!(
                    self.chats
                        .get(chat)
                        .is_some_and(|c| c.member(user).is_some()),
                    "{user}: indexed in {chat} without being a member"
                );
            }
        }
        let sorted = |m: &Map<UserId, usize>| {
            let mut v: Vec<(UserId, usize)> = m.iter().map(|(&k, &v)| (k, v)).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(
            sorted(&self.pending_per_user),
            sorted(&per_user),
            "per-user counts match the stored audiences (and keep no zeros)"
        );
        assert_eq!(
            sorted(&self.pending_per_sender),
            sorted(&per_sender),
            "per-sender counts match the stored entries (and keep no zeros)"
        );
    }

    /// The durable state in a canonical form, for tests: per chat (by id) its kind, creator,
    /// next seq, members (user, joined after, acked) and stored entries (seq, sender, kind,
    /// audience still to acknowledge), and the per-user and per-sender counts.
    #[cfg(test)]
    pub(crate) fn digest(&self) -> String {
        let mut chats: Vec<_> = self.chats.iter().collect();
        chats.sort_by_key(|(id, _)| **id);
        let mut out = String::new();
        for (id, c) in chats {
            let mut members: Vec<_> = c
                .members
                .iter()
                .map(|m| (m.user, m.joined_after, m.acked))
                .collect();
            members.sort_unstable();
            let pending: Vec<_> = c
                .pending
                .iter()
                .map(|s| {
                    let mut u = s.unacked.to_vec();
                    u.sort_unstable();
                    (s.seq, s.sender, s.kind, u)
                })
                .collect();
            out += &format!(
                "{id}: group {} creator {} next {} members {members:?} pending {pending:?}\n",
                c.group, c.creator, c.next_seq
            );
        }
        let sorted = |m: &Map<UserId, usize>| {
            let mut v: Vec<_> = m.iter().map(|(&k, &v)| (k, v)).collect();
            v.sort_unstable();
            v
        };
        let mut member_of: Vec<_> = self
            .member_of
            .iter()
            .map(|(&u, l)| {
                let mut l = l.clone();
                l.sort_unstable();
                (u, l)
            })
            .collect();
        member_of.sort_unstable();
        out += &format!(
            "per user {:?}\nper sender {:?}\nmember of {member_of:?}\n",
            sorted(&self.pending_per_user),
            sorted(&self.pending_per_sender)
        );
        out
    }
}

/// Files an accepted entry for retries, live and in replay alike. Only client requests can be
/// retried; the relay's own DELIVERED receipts (which clients may not send) are left out, so
/// they take no slots from requests.
fn remember(dedup: &mut Dedup, e: &EntryRec) {
    if e.kind != kind::DELIVERED {
        dedup.insert(e.sender, e.msg_id, e.chat, e.seq);
    }
}

/// The id of a relay-generated DELIVERED receipt: derived from the acknowledging user and seq,
/// so that the same acknowledgement makes the same frame. Receipts are not deduplicated.
fn receipt_id(user: UserId, seq: Seq) -> MsgId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&user.0.to_le_bytes());
    id[8..].copy_from_slice(&seq.0.to_le_bytes());
    id[0] ^= 0xd1;
    id
}

/// The MSG frame of `e`, in a buffer from `frames`.
fn encode_frame(frames: &mut FramePool, e: &EntryRec) -> MsgFrame {
    frames.make(|out| {
        Encoder::new(out).msg(&Entry {
            chat_id: e.chat.0,
            seq: e.seq.0,
            sender: e.sender.0,
            msg_id: e.msg_id,
            kind: e.kind,
            ref_id: e.ref_id,
            ts_ms: e.ts_ms,
            body: &e.body,
        })
    })
}
