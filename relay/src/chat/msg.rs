//! Messages between the shards of one relay, carried by the bounded SPSC rings. A user's home
//! shard talks to the owner shards of the user's chats and back.

use crate::chat::records::MsgFrame;
use proto::chat::MsgId;

/// A session on a home shard: connection id and the epoch of the session's user binding, so
/// that answers for a closed session are recognised and dropped.
pub type ConnId = u64;

/// One message between shards.
#[derive(Clone, Debug)]
pub enum ShardMsg {
    /// Home -> owner: store and sequence an entry.
    Submit(Submit),
    /// Home -> owner: the user has received the chat up to `seq`.
    Ack {
        /// User.
        user: u64,
        /// Chat.
        chat: u64,
        /// Cumulative seq.
        seq: u64,
    },
    /// Home -> owner: create a group.
    CreateGroup {
        /// Requesting user, its home and session.
        from: Origin,
        /// Client message id (deduplication).
        msg_id: MsgId,
        /// The group's id.
        chat: u64,
        /// Members besides the creator.
        members: Vec<u64>,
    },
    /// Home -> owner: add or remove `target`.
    ChangeMember {
        /// Requesting user, its home and session.
        from: Origin,
        /// Client message id.
        msg_id: MsgId,
        /// Group.
        chat: u64,
        /// The member concerned.
        target: u64,
        /// Add or remove.
        add: bool,
    },
    /// Home -> owner: start streaming `user`'s stored backlog (epoch identifies the session).
    BacklogStart {
        /// User.
        user: u64,
        /// Session epoch.
        epoch: u64,
        /// Home shard.
        home: u16,
    },
    /// Home -> owner: the session has room for the next chunk.
    BacklogMore {
        /// User.
        user: u64,
        /// Session epoch.
        epoch: u64,
    },
    /// Home -> owner: the session is gone.
    BacklogCancel {
        /// User.
        user: u64,
    },
    /// Home -> owner: list the groups `user` belongs to.
    ListGroups {
        /// Requesting user, its home and session.
        from: Origin,
    },
    /// Home -> owner (groups) or home -> home (direct): a typing indicator.
    Typing {
        /// Typist.
        from: u64,
        /// Chat.
        chat: u64,
        /// Recipient (direct), or 0 for every member of the group.
        to: u64,
    },
    /// Home (watcher's) -> home (target's): start or stop telling `watcher` about `target`.
    PresenceWatch {
        /// The watching user and its home shard.
        watcher: u64,
        /// The watcher's home shard.
        watcher_home: u16,
        /// The watched user (homed on the receiving shard).
        target: u64,
        /// Start (true) or stop.
        watch: bool,
    },
    /// Home (target's) -> home (watcher's): `user` is online or offline now.
    Presence {
        /// The watcher to tell.
        to: u64,
        /// The watched user.
        user: u64,
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
        chat: u64,
        /// Assigned seq.
        seq: u64,
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
        user: u64,
        /// Chat and seq of the entry, for the window.
        chat: u64,
        /// Seq.
        seq: u64,
        /// The MSG frame, encoded once by the owner.
        frame: MsgFrame,
        /// `Some(epoch)` when part of a backlog stream.
        backlog: Option<u64>,
    },
    /// Owner -> home: a backlog chunk is complete; `more` when the owner has more for `user`.
    BacklogChunk {
        /// User.
        user: u64,
        /// Session epoch.
        epoch: u64,
        /// Owner shard.
        owner: u16,
        /// Whether more remains.
        more: bool,
    },
    /// Owner -> home: this owner's part of a GROUPS answer.
    GroupsPart {
        /// Requesting user, its home and session.
        to: Origin,
        /// (chat, members) of the groups owned here that the user belongs to.
        groups: Vec<(u64, Vec<u64>)>,
    },
}

/// Who asked: user, home shard and session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// User.
    pub user: u64,
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
    pub chat: u64,
    /// Recipient of a direct message (0 for groups).
    pub to: u64,
    /// Kind.
    pub kind: u8,
    /// Referenced id.
    pub ref_id: MsgId,
    /// Body (inline up to [`crate::chat::records::BODY_INLINE`] bytes: a typical message
    /// travels to its owner without an allocation).
    pub body: crate::chat::records::Body,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::records::{MsgFrame, FRAME_INLINE};

    #[test]
    fn a_message_fits_in_a_ring_slot_of_at_most_256_bytes() {
        // Every ring slot is this big (ARCHITECTURE.md gives the rings' memory from it).
        let size = std::mem::size_of::<ShardMsg>();
        assert!(size <= 256, "ShardMsg is {size} bytes");
    }

    #[test]
    fn frames_up_to_the_inline_size_are_inline_and_longer_ones_shared() {
        for len in [0, 1, FRAME_INLINE - 1, FRAME_INLINE, FRAME_INLINE + 1, 4000] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = MsgFrame::new(&bytes);
            assert_eq!(f.as_bytes(), &bytes[..], "len {len}");
            assert_eq!(f.clone().as_bytes(), &bytes[..], "clone of len {len}");
            assert_eq!(matches!(f, MsgFrame::Inline { .. }), len <= FRAME_INLINE);
        }
    }
}
