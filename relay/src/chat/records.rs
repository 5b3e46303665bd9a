//! The chat engine's log records: encoding and decoding of what an owner shard persists.
//!
//! ```text
//! ENTRY (1): chat u64 | seq u64 | sender u64 | msg_id [16] | kind u8 | ref_id [16] | ts_ms u64
//!            | n u16 | audience u64 * n | body
//! ACK   (2): chat u64 | user u64 | seq u64              (cumulative: user has chat up to seq)
//! CHAT  (3): chat u64 | group u8 | creator u64 | next_seq u64 | n u16
//!            | (user u64 | joined_after u64 | acked u64) * n
//! ```
//! All integers little-endian. A CHAT record is a snapshot of a chat's membership and counters;
//! the newest one wins.

use crate::chat::msg::{ChatId, Seq, UserId};
use proto::chat::MsgId;
use std::sync::Arc;

/// Record kind of an entry.
pub const ENTRY: u8 = 1;
/// Record kind of an acknowledgement.
pub const ACK: u8 = 2;
/// Record kind of a chat snapshot.
pub const CHAT: u8 = 3;

/// An entry's audience: inline up to 2 users (every direct chat's), on the heap beyond.
pub type Audience = smallvec::SmallVec<[UserId; 2]>;

/// Bodies up to this many bytes are held inline in [`Body`].
pub const BODY_INLINE: usize = 128;

/// An entry's body: inline up to [`BODY_INLINE`] bytes (a typical text message, every receipt
/// and membership event), on the heap beyond.
pub type Body = smallvec::SmallVec<[u8; BODY_INLINE]>;

/// An encoded MSG frame, as an owner keeps it until its audience acknowledges it and as it
/// travels to the recipients' home shards: one buffer shared by all of them. The buffers come
/// from the owner's [`FramePool`] and go back to it when the entry is settled, so that in a
/// steady load sequencing and delivering a message allocates nothing.
#[derive(Clone)]
pub struct MsgFrame(Arc<Vec<u8>>);

impl MsgFrame {
    /// A frame of its own holding `bytes` (one that came over a relay link).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(Arc::new(bytes.to_vec()))
    }

    /// The frame's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for MsgFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgFrame")
            .field("len", &self.0.len())
            .finish()
    }
}

/// Frame buffers an owner shard made and got back unshared, for its next frames. Bounded in
/// count ([`FramePool::MAX_FRAMES`]) and in what one buffer may keep
/// ([`FramePool::MAX_KEPT_BYTES`]); beyond either a buffer is freed.
#[derive(Default)]
pub struct FramePool {
    free: Vec<Arc<Vec<u8>>>,
}

impl FramePool {
    /// Buffers kept at most.
    pub const MAX_FRAMES: usize = 1024;
    /// A buffer of more capacity than this is freed rather than kept (a long body's).
    pub const MAX_KEPT_BYTES: usize = 1024;
    /// Capacity of a new buffer: a MSG frame with a 128-byte body takes 198 bytes.
    const NEW_BYTES: usize = 256;

    /// A frame holding what `encode` writes into an empty buffer.
    pub fn make(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> MsgFrame {
        let mut buf = self
            .free
            .pop()
            .unwrap_or_else(|| Arc::new(Vec::with_capacity(Self::NEW_BYTES)));
        match Arc::get_mut(&mut buf) {
            Some(v) => {
                v.clear();
                encode(v);
            }
            // Unreachable: only unshared buffers are kept (see `give_back`).
            None => {
                let mut v = Vec::with_capacity(Self::NEW_BYTES);
                encode(&mut v);
                buf = Arc::new(v);
            }
        }
        MsgFrame(buf)
    }

    /// `frame` is no longer needed here: kept for reuse if nobody else holds it (a home shard
    /// drops its copy once it has queued the bytes), else simply dropped.
    pub fn give_back(&mut self, frame: MsgFrame) {
        let mut buf = frame.0;
        let keep = self.free.len() < Self::MAX_FRAMES
            && Arc::get_mut(&mut buf).is_some_and(|v| v.capacity() <= Self::MAX_KEPT_BYTES);
        if keep {
            self.free.push(buf);
        }
    }

    /// Buffers kept now.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    /// Whether no buffer is kept.
    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// A stored chat entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRec {
    /// Chat.
    pub chat: ChatId,
    /// Sequence number.
    pub seq: Seq,
    /// Author.
    pub sender: UserId,
    /// Author's message id.
    pub msg_id: MsgId,
    /// Kind.
    pub kind: u8,
    /// Referenced id.
    pub ref_id: MsgId,
    /// Acceptance time, unix ms.
    pub ts_ms: u64,
    /// Users who must receive it.
    pub audience: Audience,
    /// Body.
    pub body: Body,
}

/// A member in a chat snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberRec {
    /// User.
    pub user: UserId,
    /// The member sees entries with a larger seq.
    pub joined_after: Seq,
    /// The member has acknowledged the chat up to this seq.
    pub acked: Seq,
}

/// A chat snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRec {
    /// Chat.
    pub chat: ChatId,
    /// Group or direct.
    pub group: bool,
    /// Creator (groups) or user 0.
    pub creator: UserId,
    /// Next sequence number to assign.
    pub next_seq: Seq,
    /// Members.
    pub members: Vec<MemberRec>,
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    /// An entry.
    Entry(EntryRec),
    /// An acknowledgement.
    Ack {
        /// Chat.
        chat: ChatId,
        /// User.
        user: UserId,
        /// Cumulative seq.
        seq: Seq,
    },
    /// A snapshot.
    Chat(ChatRec),
}

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends an entry record's payload to `out`.
pub fn encode_entry(out: &mut Vec<u8>, e: &EntryRec) {
    out.reserve(75 + 8 * e.audience.len() + e.body.len());
    put(out, e.chat.0);
    put(out, e.seq.0);
    put(out, e.sender.0);
    out.extend_from_slice(&e.msg_id);
    out.push(e.kind);
    out.extend_from_slice(&e.ref_id);
    put(out, e.ts_ms);
    out.extend_from_slice(&(e.audience.len() as u16).to_le_bytes());
    e.audience.iter().for_each(|u| put(out, u.0));
    out.extend_from_slice(&e.body);
}

/// Appends an ack record's payload to `out`.
pub fn encode_ack(out: &mut Vec<u8>, chat: ChatId, user: UserId, seq: Seq) {
    put(out, chat.0);
    put(out, user.0);
    put(out, seq.0);
}

/// Appends a chat snapshot's payload to `out`.
pub fn encode_chat(out: &mut Vec<u8>, c: &ChatRec) {
    out.reserve(27 + 24 * c.members.len());
    put(out, c.chat.0);
    out.push(u8::from(c.group));
    put(out, c.creator.0);
    put(out, c.next_seq.0);
    out.extend_from_slice(&(c.members.len() as u16).to_le_bytes());
    for m in &c.members {
        put(out, m.user.0);
        put(out, m.joined_after.0);
        put(out, m.acked.0);
    }
}

/// Records waiting to be appended to the log, in order: their payloads back to back in one
/// buffer, so that producing a record allocates nothing once the buffer has grown.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// Kind and end offset in `buf` of each record.
    ends: Vec<(u8, usize)>,
}

impl Batch {
    /// Appends a record of `kind` whose payload `encode` writes.
    pub fn push(&mut self, kind: u8, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.buf);
        self.ends.push((kind, self.buf.len()));
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Kind and payload of each record, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &[u8])> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, end)| end));
        self.ends
            .iter()
            .zip(starts)
            .map(|(&(kind, end), start)| (kind, &self.buf[start..end]))
    }

    /// Records the batch has room for without growing (its bytes counted in records of 64).
    pub fn capacity(&self) -> usize {
        self.ends.capacity().max(self.buf.capacity() / 64)
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, &self.0[n..]);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn id(&mut self) -> Option<MsgId> {
        self.take(16)?.try_into().ok()
    }
}

/// Decodes a record; `None` for a record this version cannot read (the log's CRC already
/// vouches for the bytes, so this means a bug or a newer writer).
pub fn decode(kind: u8, payload: &[u8]) -> Option<Rec> {
    let mut r = R(payload);
    match kind {
        ENTRY => {
            let (chat, seq, sender, msg_id, kind, ref_id, ts_ms) = (
                ChatId(r.u64()?),
                Seq(r.u64()?),
                UserId(r.u64()?),
                r.id()?,
                r.u8()?,
                r.id()?,
                r.u64()?,
            );
            let n = r.u16()?;
            let audience = (0..n)
                .map(|_| r.u64().map(UserId))
                .collect::<Option<Audience>>()?;
            Some(Rec::Entry(EntryRec {
                chat,
                seq,
                sender,
                msg_id,
                kind,
                ref_id,
                ts_ms,
                audience,
                body: Body::from_slice(r.0),
            }))
        }
        ACK => {
            let rec = Rec::Ack {
                chat: ChatId(r.u64()?),
                user: UserId(r.u64()?),
                seq: Seq(r.u64()?),
            };
            r.0.is_empty().then_some(rec)
        }
        CHAT => {
            let (chat, group, creator, next_seq) = (
                ChatId(r.u64()?),
                r.u8()? == 1,
                UserId(r.u64()?),
                Seq(r.u64()?),
            );
            let n = r.u16()?;
            let members = (0..n)
                .map(|_| {
                    Some(MemberRec {
                        user: UserId(r.u64()?),
                        joined_after: Seq(r.u64()?),
                        acked: Seq(r.u64()?),
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            r.0.is_empty().then_some(Rec::Chat(ChatRec {
                chat,
                group,
                creator,
                next_seq,
                members,
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let e = EntryRec {
            chat: ChatId(1),
            seq: Seq(2),
            sender: UserId(3),
            msg_id: [4; 16],
            kind: 0,
            ref_id: [0; 16],
            ts_ms: 5,
            audience: Audience::from_slice(&[UserId(6), UserId(7)]),
            body: Body::from_slice(b"hello"),
        };
        let mut b = Batch::default();
        b.push(ENTRY, |out| encode_entry(out, &e));
        b.push(ACK, |out| encode_ack(out, ChatId(1), UserId(2), Seq(3)));
        assert_eq!(b.len(), 2);
        let recs: Vec<(u8, &[u8])> = b.iter().collect();
        assert_eq!(decode(recs[0].0, recs[0].1), Some(Rec::Entry(e)));
        assert_eq!(
            decode(recs[1].0, recs[1].1),
            Some(Rec::Ack {
                chat: ChatId(1),
                user: UserId(2),
                seq: Seq(3)
            })
        );
        let c = ChatRec {
            chat: ChatId(9),
            group: true,
            creator: UserId(1),
            next_seq: Seq(10),
            members: vec![MemberRec {
                user: UserId(1),
                joined_after: Seq(0),
                acked: Seq(4),
            }],
        };
        let mut out = Vec::new();
        encode_chat(&mut out, &c);
        assert_eq!(decode(CHAT, &out), Some(Rec::Chat(c)));
        assert_eq!(decode(ACK, &[1, 2]), None);
        assert_eq!(decode(9, &[]), None);
    }
}
