//! Messages between the shards of one relay, carried by the bounded SPSC rings. A user's home
//! shard talks to the owner shards of the user's chats and back.

use crate::chat::records::MsgFrame;
use proto::chat::{ids, MsgId};

/// A chat connection on its shard, named by the transport's accept and never reused while the
/// shard runs (so that answers for a closed session are recognised and dropped). Transports
/// carry it in their own tags (an epoll event's data, io_uring user data below the kind bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conn {}", self.0)
    }
}

/// A user (nonzero): the participant id of the chat token ctl issues when it places the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u64);

impl UserId {
    /// The shard of a relay with `n_shards` shards that holds this user's sessions.
    #[inline]
    pub const fn home_shard(self, n_shards: u16) -> u16 {
        ids::home_shard(self.0, n_shards)
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user {}", self.0)
    }
}

/// A chat, derived by its opener's home: from both users (direct) or creator and msg id (group).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChatId(pub u64);

impl ChatId {
    /// The direct chat between `a` and `b` (the same for both; top bit clear).
    #[inline]
    pub const fn direct(a: UserId, b: UserId) -> Self {
        Self(ids::direct_chat(a.0, b.0))
    }

    /// The group `creator` creates with the request `msg_id` (top bit set).
    #[inline]
    pub fn group(creator: UserId, msg_id: &MsgId) -> Self {
        Self(ids::group_chat(creator.0, msg_id))
    }

    /// Whether this is a group's id.
    #[inline]
    pub const fn is_group(self) -> bool {
        ids::is_group(self.0)
    }

    /// The shard of a relay with `n_shards` shards that owns (sequences and stores) this chat.
    #[inline]
    pub const fn owner_shard(self, n_shards: u16) -> u16 {
        ids::owner_shard(self.0, n_shards)
    }
}

impl std::fmt::Display for ChatId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chat {}", self.0)
    }
}

/// A place in one chat's total order, assigned by the chat's owner from 1 up (0: none yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(pub u64);

impl Seq {
    /// The seq after this one.
    #[inline]
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }

    /// The seq before this one (of a seq from 1 up).
    #[inline]
    pub const fn prev(self) -> Self {
        Self(self.0 - 1)
    }
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

/// A shard's address in a cluster: its relay's number in the high byte, the shard in the low
/// one (relay 0 is a relay on its own). A relay alone has the addresses 0..n_shards, so a
/// home's address is its shard, as before relays were linked.
#[inline]
pub const fn addr(relay: u8, shard: u16) -> u16 {
    ((relay as u16) << 8) | (shard & 0xff)
}

/// The relay number of an address.
#[inline]
pub const fn addr_relay(addr: u16) -> u8 {
    (addr >> 8) as u8
}

/// The shard of an address, on its relay.
#[inline]
pub const fn addr_shard(addr: u16) -> u16 {
    addr & 0xff
}

/// Where a shard sits: its address, its relay's shard count, and the address of every chat
/// owner of the cluster. The owner list is fixed when the cluster forms (ctl records it): a
/// chat's owner is `owners[chat.owner_shard(owners.len())]` for as long as the cluster lives,
/// so no chat ever moves, and a relay added later homes users and rooms but owns no chat.
#[derive(Clone, Debug)]
pub struct Place {
    /// This shard's address ([`addr`]).
    pub addr: u16,
    /// Shards on this relay (a user's home shard here is a function of it).
    pub n_local: u16,
    /// Owner index -> the address of the shard owning the chats of that index.
    pub owners: std::sync::Arc<[u16]>,
}

impl Place {
    /// Shard `shard` of a relay of `n_shards` on its own: it and its siblings own every chat.
    pub fn standalone(shard: u16, n_shards: u16) -> Self {
        Self {
            addr: shard,
            n_local: n_shards,
            owners: (0..n_shards).collect(),
        }
    }

    /// This shard, on its relay.
    pub fn shard(&self) -> u16 {
        addr_shard(self.addr)
    }

    /// The number of chat owners in the cluster.
    pub fn n_owners(&self) -> u16 {
        self.owners.len() as u16
    }

    /// This shard's owner index, if it owns chats.
    pub fn owner_index(&self) -> Option<u16> {
        self.owners
            .iter()
            .position(|&a| a == self.addr)
            .map(|i| i as u16)
    }
}

/// One message between shards, by the role it is for on the receiving shard: the owner of a
/// chat, or the home of a user. A ring carries both. Messages to the owner role are addressed
/// by owner index (see [`Place`]), messages to the home role by shard address.
#[derive(Clone, Debug)]
pub enum ShardMsg {
    /// To the owner role ([`crate::chat::owner`]).
    ToOwner(ToOwner),
    /// To the home role ([`crate::chat::home`]).
    ToHome(ToHome),
}

/// What a home shard asks of the owner of a chat.
#[derive(Clone, Debug)]
pub enum ToOwner {
    /// Home -> owner: store and sequence an entry.
    Submit(Box<Submit>),
    /// Home -> owner: the user has received the chat up to `seq`.
    Ack {
        /// User.
        user: UserId,
        /// Chat.
        chat: ChatId,
        /// Cumulative seq.
        seq: Seq,
    },
    /// Home -> owner: create a group.
    CreateGroup {
        /// Requesting user, its home and session.
        from: Origin,
        /// Client message id (deduplication).
        msg_id: MsgId,
        /// The group's id.
        chat: ChatId,
        /// Members besides the creator.
        members: Vec<UserId>,
    },
    /// Home -> owner: add or remove `target`.
    ChangeMember {
        /// Requesting user, its home and session.
        from: Origin,
        /// Client message id.
        msg_id: MsgId,
        /// Group.
        chat: ChatId,
        /// The member concerned.
        target: UserId,
        /// Add or remove.
        add: bool,
    },
    /// Home -> owner: start streaming `user`'s stored backlog (epoch identifies the session).
    BacklogStart {
        /// User.
        user: UserId,
        /// Session epoch.
        epoch: u64,
        /// Home shard.
        home: u16,
        /// Entries the first chunk may hold at most.
        budget: u16,
    },
    /// Home -> owner: the session has room for the next chunk.
    BacklogMore {
        /// User.
        user: UserId,
        /// Home shard (address).
        home: u16,
        /// Session epoch.
        epoch: u64,
        /// Entries this chunk may hold at most.
        budget: u16,
    },
    /// Home -> owner: the session is gone.
    BacklogCancel {
        /// User.
        user: UserId,
        /// The home whose session it was (a newer one elsewhere is not cancelled).
        home: u16,
    },
    /// Home -> owner: list the groups `user` belongs to.
    ListGroups {
        /// Requesting user, its home and session.
        from: Origin,
    },
    /// Home -> owner: a typing indicator in a group, for every member.
    TypingInGroup {
        /// Typist.
        from: UserId,
        /// Group.
        chat: ChatId,
    },
    /// Home -> owner of the direct chat: a typing indicator for `to`, wherever its session is
    /// (every owner knows that, from the session's backlog request).
    TypingDirect {
        /// Typist.
        from: UserId,
        /// Recipient.
        to: UserId,
        /// The direct chat.
        chat: ChatId,
    },
    /// Watcher's home -> the shard keeping `target`'s presence (owner index
    /// `owner_shard(target)`): start or stop telling `watcher` about `target`.
    PresenceWatch {
        /// The watching user.
        watcher: UserId,
        /// The watcher's home (address).
        watcher_home: u16,
        /// The watched user.
        target: UserId,
        /// Start (true) or stop.
        watch: bool,
    },
    /// A user's home -> the shard keeping its presence: a session opened or closed there.
    PresenceState {
        /// User.
        user: UserId,
        /// The home (address) of the session.
        home: u16,
        /// Opened (true) or closed.
        online: bool,
    },
}

/// What an owner, or another home, tells a user's home shard.
#[derive(Clone, Debug)]
pub enum ToHome {
    /// Owner -> the recipient's home: a typing indicator.
    Typing {
        /// Typist.
        from: UserId,
        /// Chat.
        chat: ChatId,
        /// Recipient.
        to: UserId,
    },
    /// Presence keeper -> home (watcher's): `user` is online or offline now.
    Presence {
        /// The watcher to tell.
        to: UserId,
        /// The watched user.
        user: UserId,
        /// Whether it has a session.
        online: bool,
    },
    /// Owner -> home: the entry is durable.
    Sent {
        /// Requesting user, its home and session.
        to: Origin,
        /// Client message id.
        msg_id: MsgId,
        /// Chat.
        chat: ChatId,
        /// Assigned seq.
        seq: Seq,
        /// The box of the SEND's [`Submit`], going back to the pool of the home shard that
        /// made it (see [`SubmitPool`]); `None` for group requests.
        spent: Option<Box<Submit>>,
    },
    /// Owner -> home: the request failed.
    Failed {
        /// Requesting user, its home and session.
        to: Origin,
        /// Client message id.
        msg_id: MsgId,
        /// Error code.
        code: u16,
        /// Reason.
        text: &'static str,
    },
    /// Owner -> home: deliver an encoded MSG frame to `user`.
    Deliver {
        /// Recipient.
        user: UserId,
        /// Chat and seq of the entry, for the window.
        chat: ChatId,
        /// Seq.
        seq: Seq,
        /// The MSG frame, encoded once by the owner and shared.
        frame: MsgFrame,
        /// `Some(epoch)` when part of a backlog stream.
        backlog: Option<u64>,
    },
    /// Owner -> home: a backlog chunk is complete; `more` when the owner has more for `user`.
    BacklogChunk {
        /// User.
        user: UserId,
        /// Session epoch.
        epoch: u64,
        /// Owner shard.
        owner: u16,
        /// Whether more remains.
        more: bool,
    },
    /// The link thread -> every home of its relay: a link to another relay came up (again),
    /// and what crossed it while it was down may be lost. Never sent over a link.
    LinkUp,
    /// The link thread -> every home of its relay: the link from relay N closed (N died,
    /// restarted or was cut off). The presence kept here for sessions homed on N, and the
    /// watches of its sessions, are dropped: those users come back online with their sessions,
    /// wherever those reopen. Never sent over a link.
    RelayDown(u8),
    /// Owner -> home: a piece of this owner's part of a GROUPS answer (pieces keep a link
    /// frame small; `last` ends the owner's part).
    GroupsPart {
        /// Requesting user, its home and session.
        to: Origin,
        /// (chat, members) of the groups owned here that the user belongs to.
        groups: Vec<(ChatId, Vec<UserId>)>,
        /// The owner's last piece.
        last: bool,
    },
}

/// Who asked: user, home shard and session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// User.
    pub user: UserId,
    /// Home shard.
    pub home: u16,
    /// Session.
    pub conn: ConnId,
}

/// A message to store.
#[derive(Clone, Debug)]
pub struct Submit {
    /// Author, its home and session.
    pub from: Origin,
    /// Client message id.
    pub msg_id: MsgId,
    /// Chat (resolved by the home shard for direct messages).
    pub chat: ChatId,
    /// Recipient of a direct message (`None` for groups; the home never makes it user 0,
    /// which is "nobody" on the wire).
    pub to: Option<UserId>,
    /// Kind.
    pub kind: u8,
    /// Referenced id.
    pub ref_id: MsgId,
    /// Body (inline up to [`crate::chat::records::BODY_INLINE`] bytes). The box itself is
    /// reused: see [`SubmitPool`].
    pub body: crate::chat::records::Body,
}

/// Boxes of spent submits, for the next ones: a home shard boxes a SEND's submit, and its
/// owner shard sends the box back with the SEND's answer ([`ToHome::Sent`]'s `spent`), so
/// every box returns to the pool that made it, however lopsided the traffic between shards
/// (an owner that kept the boxes would leave a home shard whose users mostly write to chats
/// owned elsewhere allocating one per message, and free the surplus from another thread). A
/// box is in flight from the SEND until its entry is durable; beyond that the pool keeps at
/// most [`SubmitPool::MAX_BOXES`]. A SEND the owner refuses leaves its box in the owner's pool.
#[derive(Default)]
pub struct SubmitPool {
    // The boxes themselves are what is kept (they travel in `ToOwner::Submit`).
    #[allow(clippy::vec_box)]
    free: Vec<Box<Submit>>,
    /// Boxes allocated so far (the pool was empty).
    made: u64,
}

impl SubmitPool {
    /// Boxes kept at most.
    pub const MAX_BOXES: usize = 1024;

    /// `s`, boxed (in a kept box when there is one).
    pub fn boxed(&mut self, s: Submit) -> Box<Submit> {
        match self.free.pop() {
            Some(mut b) => {
                *b = s;
                b
            }
            None => {
                self.made += 1;
                Box::new(s)
            }
        }
    }

    /// Boxes allocated so far because the pool was empty.
    pub fn made(&self) -> u64 {
        self.made
    }

    /// A spent submit's box. A body on the heap (over 128 bytes; one the owner refused is
    /// still in the box) is freed first: a kept box holds no more than its own size.
    pub fn give_back(&mut self, mut b: Box<Submit>) {
        if self.free.len() < Self::MAX_BOXES {
            if b.body.spilled() {
                b.body = crate::chat::records::Body::new();
            }
            self.free.push(b);
        }
    }

    /// Boxes kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::records::FramePool;

    #[test]
    fn a_message_fits_in_a_ring_slot_of_at_most_96_bytes() {
        // Every ring slot is this big (the chat module docs give the rings' memory from it).
        let size = std::mem::size_of::<ShardMsg>();
        assert!(size <= 96, "ShardMsg is {size} bytes");
        // The split by role costs one word: 80 bytes, against 72 for one flat enum.
        assert!(size <= 8 + std::mem::size_of::<ToHome>().max(std::mem::size_of::<ToOwner>()));
    }

    #[test]
    fn kept_submit_boxes_are_bounded_and_hold_no_long_body() {
        let submit = |body: &[u8]| Submit {
            from: Origin {
                user: UserId(1),
                home: 0,
                conn: ConnId(1),
            },
            msg_id: [1; 16],
            chat: ChatId(2),
            to: Some(UserId(3)),
            kind: 1,
            ref_id: [0; 16],
            body: crate::chat::records::Body::from_slice(body),
        };
        let mut pool = SubmitPool::default();
        let b = pool.boxed(submit(&[9; 4000]));
        assert!(b.body.spilled());
        pool.give_back(b);
        assert_eq!(pool.len(), 1);
        assert!(
            !pool.free[0].body.spilled(),
            "a long body is freed with its box kept"
        );
        let b = pool.boxed(submit(b"new"));
        assert_eq!(
            &b.body[..],
            b"new",
            "a reused box holds the new submit only"
        );
        assert_eq!(pool.len(), 0);
        for _ in 0..SubmitPool::MAX_BOXES + 5 {
            pool.give_back(Box::new(submit(b"x")));
        }
        assert_eq!(pool.len(), SubmitPool::MAX_BOXES);
    }

    #[test]
    fn frame_buffers_are_reused_only_when_nobody_else_holds_them() {
        let mut pool = FramePool::default();
        let a = pool.make(|v| v.extend_from_slice(b"first"));
        assert_eq!(a.as_bytes(), b"first");
        let held = a.clone();
        pool.give_back(a);
        assert!(pool.is_empty(), "a frame a home still holds is not reused");
        pool.give_back(held);
        assert_eq!(pool.len(), 1);
        let b = pool.make(|v| v.extend_from_slice(b"second"));
        assert_eq!(b.as_bytes(), b"second", "a reused buffer starts empty");
        assert!(pool.is_empty());
        // A long frame's buffer is freed, not kept.
        let long = pool.make(|v| v.resize(FramePool::MAX_KEPT_BYTES + 1, 7));
        pool.give_back(long);
        assert!(pool.is_empty());
        // Bounded.
        let frames: Vec<_> = (0..FramePool::MAX_FRAMES + 10)
            .map(|_| pool.make(|v| v.push(1)))
            .collect();
        frames.into_iter().for_each(|f| pool.give_back(f));
        assert_eq!(pool.len(), FramePool::MAX_FRAMES);
    }
}
