//! Messages between shards on different relays: the frames of a relay link (PROTOCOL.md
//! section 8). A link frame is a little-endian `u32` length (of what follows), the address of
//! the shard it is for (`u16`, see [`crate::chat::msg::addr`]), a tag and the message's fields
//! in a fixed little-endian layout. Decoding is total: a frame that does not parse is an
//! error, never a panic, and the link that sent it is closed.

use super::msg::{ChatId, ConnId, Origin, Seq, ShardMsg, Submit, ToHome, ToOwner, UserId};
use super::records::{Body, MsgFrame};
use proto::chat::MsgId;

/// Largest link frame (a MSG frame of up to `proto::chat::MAX_FRAME` and its header, or a
/// GROUPS part).
pub const MAX_LINK_FRAME: usize = proto::chat::MAX_FRAME + 1024;
/// Bytes before a frame's body: length, address, tag.
const HEADER: usize = 4 + 2 + 1;

mod tag {
    pub const SUBMIT: u8 = 1;
    pub const ACK: u8 = 2;
    pub const CREATE_GROUP: u8 = 3;
    pub const CHANGE_MEMBER: u8 = 4;
    pub const BACKLOG_START: u8 = 5;
    pub const BACKLOG_MORE: u8 = 6;
    pub const BACKLOG_CANCEL: u8 = 7;
    pub const LIST_GROUPS: u8 = 8;
    pub const TYPING_IN_GROUP: u8 = 9;
    pub const TYPING_DIRECT: u8 = 10;
    pub const PRESENCE_WATCH: u8 = 11;
    pub const PRESENCE_STATE: u8 = 12;
    pub const TYPING: u8 = 32;
    pub const PRESENCE: u8 = 33;
    pub const SENT: u8 = 34;
    pub const FAILED: u8 = 35;
    pub const DELIVER: u8 = 36;
    pub const BACKLOG_CHUNK: u8 = 37;
    pub const GROUPS_PART: u8 = 38;
    /// Local only: refused from a link.
    pub const LINK_UP: u8 = 39;
    /// Local only: refused from a link.
    pub const RELAY_DOWN: u8 = 40;
}

/// The reasons an owner gives (`ToHome::Failed` carries a static text; the far side gets it
/// back from this list, or [`OTHER_REASON`]).
const REASONS: &[&str] = &[
    "bad direct chat",
    "group too large or id in use",
    "not a member",
    "recipient inbox full",
    "unknown chat",
    "unknown group",
    "too many of your messages are undelivered",
    "already a member or group full",
    "only the creator removes others",
    "the chat's owner is unreachable; retry",
    "too many chats",
];
/// The text of a reason not in [`REASONS`].
const OTHER_REASON: &str = "refused by the chat's owner";

/// A link frame that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame(pub &'static str);

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad link frame: {}", self.0)
    }
}

impl std::error::Error for BadFrame {}

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn id(&mut self, v: &MsgId) {
        self.0.extend_from_slice(v);
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.0.extend_from_slice(v);
    }
    fn origin(&mut self, o: &Origin) {
        self.u64(o.user.0);
        self.u16(o.home);
        self.u64(o.conn.0);
    }
    fn users(&mut self, v: &[UserId]) {
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        for u in v {
            self.u64(u.0);
        }
    }
}

/// Appends `m`, for the shard at `dest`, as one link frame.
pub fn encode(out: &mut Vec<u8>, dest: u16, m: &ShardMsg) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut w = W(out);
    w.u16(dest);
    match m {
        ShardMsg::ToOwner(m) => match m {
            ToOwner::Submit(s) => {
                w.u8(tag::SUBMIT);
                w.origin(&s.from);
                w.id(&s.msg_id);
                w.u64(s.chat.0);
                w.u64(s.to.map_or(0, |u| u.0));
                w.u8(s.kind);
                w.id(&s.ref_id);
                w.bytes(&s.body);
            }
            ToOwner::Ack { user, chat, seq } => {
                w.u8(tag::ACK);
                w.u64(user.0);
                w.u64(chat.0);
                w.u64(seq.0);
            }
            ToOwner::CreateGroup {
                from,
                msg_id,
                chat,
                members,
            } => {
                w.u8(tag::CREATE_GROUP);
                w.origin(from);
                w.id(msg_id);
                w.u64(chat.0);
                w.users(members);
            }
            ToOwner::ChangeMember {
                from,
                msg_id,
                chat,
                target,
                add,
            } => {
                w.u8(tag::CHANGE_MEMBER);
                w.origin(from);
                w.id(msg_id);
                w.u64(chat.0);
                w.u64(target.0);
                w.u8(u8::from(*add));
            }
            ToOwner::BacklogStart {
                user,
                epoch,
                home,
                budget,
            } => {
                w.u8(tag::BACKLOG_START);
                w.u64(user.0);
                w.u64(*epoch);
                w.u16(*home);
                w.u16(*budget);
            }
            ToOwner::BacklogMore {
                user,
                home,
                epoch,
                budget,
            } => {
                w.u8(tag::BACKLOG_MORE);
                w.u64(user.0);
                w.u16(*home);
                w.u64(*epoch);
                w.u16(*budget);
            }
            ToOwner::BacklogCancel { user, home } => {
                w.u8(tag::BACKLOG_CANCEL);
                w.u64(user.0);
                w.u16(*home);
            }
            ToOwner::ListGroups { from } => {
                w.u8(tag::LIST_GROUPS);
                w.origin(from);
            }
            ToOwner::TypingInGroup { from, chat } => {
                w.u8(tag::TYPING_IN_GROUP);
                w.u64(from.0);
                w.u64(chat.0);
            }
            ToOwner::TypingDirect { from, to, chat } => {
                w.u8(tag::TYPING_DIRECT);
                w.u64(from.0);
                w.u64(to.0);
                w.u64(chat.0);
            }
            ToOwner::PresenceWatch {
                watcher,
                watcher_home,
                target,
                watch,
            } => {
                w.u8(tag::PRESENCE_WATCH);
                w.u64(watcher.0);
                w.u16(*watcher_home);
                w.u64(target.0);
                w.u8(u8::from(*watch));
            }
            ToOwner::PresenceState { user, home, online } => {
                w.u8(tag::PRESENCE_STATE);
                w.u64(user.0);
                w.u16(*home);
                w.u8(u8::from(*online));
            }
        },
        ShardMsg::ToHome(m) => match m {
            ToHome::Typing { from, chat, to } => {
                w.u8(tag::TYPING);
                w.u64(from.0);
                w.u64(chat.0);
                w.u64(to.0);
            }
            ToHome::Presence { to, user, online } => {
                w.u8(tag::PRESENCE);
                w.u64(to.0);
                w.u64(user.0);
                w.u8(u8::from(*online));
            }
            ToHome::Sent {
                to,
                msg_id,
                chat,
                seq,
                spent: _,
            } => {
                w.u8(tag::SENT);
                w.origin(to);
                w.id(msg_id);
                w.u64(chat.0);
                w.u64(seq.0);
            }
            ToHome::Failed {
                to,
                msg_id,
                code,
                text,
            } => {
                w.u8(tag::FAILED);
                w.origin(to);
                w.id(msg_id);
                w.u16(*code);
                let i = REASONS.iter().position(|r| r == text).unwrap_or(255);
                w.u8(i as u8);
            }
            ToHome::Deliver {
                user,
                chat,
                seq,
                frame,
                backlog,
            } => {
                w.u8(tag::DELIVER);
                w.u64(user.0);
                w.u64(chat.0);
                w.u64(seq.0);
                w.u64(backlog.map_or(0, |e| e.wrapping_add(1)));
                w.bytes(frame.as_bytes());
            }
            ToHome::BacklogChunk {
                user,
                epoch,
                owner,
                more,
            } => {
                w.u8(tag::BACKLOG_CHUNK);
                w.u64(user.0);
                w.u64(*epoch);
                w.u16(*owner);
                w.u8(u8::from(*more));
            }
            ToHome::LinkUp => w.u8(tag::LINK_UP),
            ToHome::RelayDown(relay) => {
                w.u8(tag::RELAY_DOWN);
                w.u8(*relay);
            }
            ToHome::GroupsPart { to, groups, last } => {
                w.u8(tag::GROUPS_PART);
                w.origin(to);
                w.u8(u8::from(*last));
                w.0.extend_from_slice(&(groups.len() as u32).to_le_bytes());
                for (chat, members) in groups {
                    w.u64(chat.0);
                    w.users(members);
                }
            }
        },
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadFrame> {
        if self.0.len() < n {
            return Err(BadFrame("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BadFrame> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool, BadFrame> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(BadFrame("bad flag")),
        }
    }
    fn u16(&mut self) -> Result<u16, BadFrame> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, BadFrame> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, BadFrame> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn user(&mut self) -> Result<UserId, BadFrame> {
        match self.u64()? {
            0 => Err(BadFrame("user 0")),
            u => Ok(UserId(u)),
        }
    }
    fn id(&mut self) -> Result<MsgId, BadFrame> {
        Ok(self.take(16)?.try_into().expect("16 bytes"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], BadFrame> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn origin(&mut self) -> Result<Origin, BadFrame> {
        Ok(Origin {
            user: self.user()?,
            home: self.u16()?,
            conn: ConnId(self.u64()?),
        })
    }
    fn users(&mut self) -> Result<Vec<UserId>, BadFrame> {
        let n = self.u32()? as usize;
        if n > proto::chat::MAX_GROUP_MEMBERS {
            return Err(BadFrame("too many members"));
        }
        (0..n).map(|_| self.user()).collect()
    }
}

/// The length of the link frame at the start of `buf`, once all of it is there: `Ok(None)`
/// while more is needed, an error for a frame over [`MAX_LINK_FRAME`].
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, BadFrame> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    if !(HEADER - 4..=MAX_LINK_FRAME).contains(&len) {
        return Err(BadFrame("bad length"));
    }
    Ok((buf.len() >= 4 + len).then_some(4 + len))
}

/// Decodes one whole link frame (as [`frame_len`] measured it): the address and the message.
pub fn decode(frame: &[u8]) -> Result<(u16, ShardMsg), BadFrame> {
    let mut r = R(frame.get(4..).ok_or(BadFrame("truncated"))?);
    let dest = r.u16()?;
    let m = match r.u8()? {
        tag::SUBMIT => {
            let from = r.origin()?;
            let msg_id = r.id()?;
            let chat = ChatId(r.u64()?);
            let to = match r.u64()? {
                0 => None,
                u => Some(UserId(u)),
            };
            let kind = r.u8()?;
            let ref_id = r.id()?;
            let body = Body::from_slice(r.bytes()?);
            ShardMsg::ToOwner(ToOwner::Submit(Box::new(Submit {
                from,
                msg_id,
                chat,
                to,
                kind,
                ref_id,
                body,
            })))
        }
        tag::ACK => ShardMsg::ToOwner(ToOwner::Ack {
            user: r.user()?,
            chat: ChatId(r.u64()?),
            seq: Seq(r.u64()?),
        }),
        tag::CREATE_GROUP => ShardMsg::ToOwner(ToOwner::CreateGroup {
            from: r.origin()?,
            msg_id: r.id()?,
            chat: ChatId(r.u64()?),
            members: r.users()?,
        }),
        tag::CHANGE_MEMBER => ShardMsg::ToOwner(ToOwner::ChangeMember {
            from: r.origin()?,
            msg_id: r.id()?,
            chat: ChatId(r.u64()?),
            target: r.user()?,
            add: r.flag()?,
        }),
        tag::BACKLOG_START => ShardMsg::ToOwner(ToOwner::BacklogStart {
            user: r.user()?,
            epoch: r.u64()?,
            home: r.u16()?,
            budget: r.u16()?,
        }),
        tag::BACKLOG_MORE => ShardMsg::ToOwner(ToOwner::BacklogMore {
            user: r.user()?,
            home: r.u16()?,
            epoch: r.u64()?,
            budget: r.u16()?,
        }),
        tag::BACKLOG_CANCEL => ShardMsg::ToOwner(ToOwner::BacklogCancel {
            user: r.user()?,
            home: r.u16()?,
        }),
        tag::LIST_GROUPS => ShardMsg::ToOwner(ToOwner::ListGroups { from: r.origin()? }),
        tag::TYPING_IN_GROUP => ShardMsg::ToOwner(ToOwner::TypingInGroup {
            from: r.user()?,
            chat: ChatId(r.u64()?),
        }),
        tag::TYPING_DIRECT => ShardMsg::ToOwner(ToOwner::TypingDirect {
            from: r.user()?,
            to: r.user()?,
            chat: ChatId(r.u64()?),
        }),
        tag::PRESENCE_WATCH => ShardMsg::ToOwner(ToOwner::PresenceWatch {
            watcher: r.user()?,
            watcher_home: r.u16()?,
            target: r.user()?,
            watch: r.flag()?,
        }),
        tag::PRESENCE_STATE => ShardMsg::ToOwner(ToOwner::PresenceState {
            user: r.user()?,
            home: r.u16()?,
            online: r.flag()?,
        }),
        tag::TYPING => ShardMsg::ToHome(ToHome::Typing {
            from: r.user()?,
            chat: ChatId(r.u64()?),
            to: r.user()?,
        }),
        tag::PRESENCE => ShardMsg::ToHome(ToHome::Presence {
            to: r.user()?,
            user: r.user()?,
            online: r.flag()?,
        }),
        tag::SENT => ShardMsg::ToHome(ToHome::Sent {
            to: r.origin()?,
            msg_id: r.id()?,
            chat: ChatId(r.u64()?),
            seq: Seq(r.u64()?),
            spent: None,
        }),
        tag::FAILED => ShardMsg::ToHome(ToHome::Failed {
            to: r.origin()?,
            msg_id: r.id()?,
            code: r.u16()?,
            text: REASONS
                .get(usize::from(r.u8()?))
                .copied()
                .unwrap_or(OTHER_REASON),
        }),
        tag::DELIVER => {
            let user = r.user()?;
            let chat = ChatId(r.u64()?);
            let seq = Seq(r.u64()?);
            let backlog = r.u64()?.checked_sub(1);
            let frame = r.bytes()?;
            // A MSG frame with its length prefix (a SEND of the largest body makes one).
            if frame.len() > proto::chat::MAX_FRAME + proto::chat::LEN_BYTES {
                return Err(BadFrame("MSG frame too large"));
            }
            ShardMsg::ToHome(ToHome::Deliver {
                user,
                chat,
                seq,
                frame: MsgFrame::from_bytes(frame),
                backlog,
            })
        }
        tag::BACKLOG_CHUNK => ShardMsg::ToHome(ToHome::BacklogChunk {
            user: r.user()?,
            epoch: r.u64()?,
            owner: r.u16()?,
            more: r.flag()?,
        }),
        tag::GROUPS_PART => {
            let to = r.origin()?;
            let last = r.flag()?;
            let n = r.u32()? as usize;
            // Each group takes at least 12 bytes: no count can ask for more than is there.
            if n > r.0.len() / 12 {
                return Err(BadFrame("bad group count"));
            }
            let mut groups = Vec::with_capacity(n);
            for _ in 0..n {
                groups.push((ChatId(r.u64()?), r.users()?));
            }
            ShardMsg::ToHome(ToHome::GroupsPart { to, groups, last })
        }
        _ => return Err(BadFrame("unknown tag")),
    };
    if !r.0.is_empty() {
        return Err(BadFrame("trailing bytes"));
    }
    Ok((dest, m))
}

/// The answer a home gets for a message to an owner that could not be sent (its link is
/// down), given the owner's index when known: for a request, ERROR 13 (retryable, not stored;
/// PROTOCOL.md section 8); for a backlog request, "nothing more" (the link's return resyncs
/// the session); for a group list, an empty last piece. Nothing for the rest.
pub fn unreachable(m: ShardMsg, owner: Option<u16>) -> Option<(u16, ShardMsg)> {
    let (to, msg_id) = match m {
        ShardMsg::ToOwner(ToOwner::Submit(s)) => (s.from, s.msg_id),
        ShardMsg::ToOwner(ToOwner::CreateGroup { from, msg_id, .. })
        | ShardMsg::ToOwner(ToOwner::ChangeMember { from, msg_id, .. }) => (from, msg_id),
        ShardMsg::ToOwner(ToOwner::ListGroups { from }) => {
            let part = ToHome::GroupsPart {
                to: from,
                groups: Vec::new(),
                last: true,
            };
            return Some((from.home, ShardMsg::ToHome(part)));
        }
        ShardMsg::ToOwner(ToOwner::BacklogStart {
            user, epoch, home, ..
        }) => {
            let chunk = ToHome::BacklogChunk {
                user,
                epoch,
                owner: owner?,
                more: false,
            };
            return Some((home, ShardMsg::ToHome(chunk)));
        }
        _ => return None,
    };
    Some((
        to.home,
        ShardMsg::ToHome(ToHome::Failed {
            to,
            msg_id,
            code: proto::chat::code::UNAVAILABLE,
            text: "the chat's owner is unreachable; retry",
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            user: UserId(7),
            home: 0x0201,
            conn: ConnId(99),
        }
    }

    fn all() -> Vec<ShardMsg> {
        let mut pool = super::super::records::FramePool::default();
        vec![
            ShardMsg::ToOwner(ToOwner::Submit(Box::new(Submit {
                from: origin(),
                msg_id: [3; 16],
                chat: ChatId(5),
                to: Some(UserId(8)),
                kind: 0,
                ref_id: [0; 16],
                body: Body::from_slice(&[1; 300]),
            }))),
            ShardMsg::ToOwner(ToOwner::Ack {
                user: UserId(1),
                chat: ChatId(2),
                seq: Seq(3),
            }),
            ShardMsg::ToOwner(ToOwner::CreateGroup {
                from: origin(),
                msg_id: [4; 16],
                chat: ChatId(1 << 63),
                members: vec![UserId(2), UserId(3)],
            }),
            ShardMsg::ToOwner(ToOwner::ChangeMember {
                from: origin(),
                msg_id: [4; 16],
                chat: ChatId(9),
                target: UserId(3),
                add: true,
            }),
            ShardMsg::ToOwner(ToOwner::BacklogStart {
                user: UserId(1),
                epoch: 5,
                home: 0x0300,
                budget: 64,
            }),
            ShardMsg::ToOwner(ToOwner::BacklogMore {
                user: UserId(1),
                home: 0x0300,
                epoch: 5,
                budget: 64,
            }),
            ShardMsg::ToOwner(ToOwner::BacklogCancel {
                user: UserId(1),
                home: 0x0300,
            }),
            ShardMsg::ToOwner(ToOwner::ListGroups { from: origin() }),
            ShardMsg::ToOwner(ToOwner::TypingInGroup {
                from: UserId(1),
                chat: ChatId(2),
            }),
            ShardMsg::ToOwner(ToOwner::TypingDirect {
                from: UserId(1),
                to: UserId(2),
                chat: ChatId(3),
            }),
            ShardMsg::ToOwner(ToOwner::PresenceWatch {
                watcher: UserId(1),
                watcher_home: 0x0101,
                target: UserId(2),
                watch: false,
            }),
            ShardMsg::ToOwner(ToOwner::PresenceState {
                user: UserId(1),
                home: 0x0101,
                online: true,
            }),
            ShardMsg::ToHome(ToHome::Typing {
                from: UserId(1),
                chat: ChatId(2),
                to: UserId(3),
            }),
            ShardMsg::ToHome(ToHome::Presence {
                to: UserId(1),
                user: UserId(2),
                online: true,
            }),
            ShardMsg::ToHome(ToHome::Sent {
                to: origin(),
                msg_id: [6; 16],
                chat: ChatId(2),
                seq: Seq(10),
                spent: None,
            }),
            ShardMsg::ToHome(ToHome::Failed {
                to: origin(),
                msg_id: [6; 16],
                code: 6,
                text: "not a member",
            }),
            ShardMsg::ToHome(ToHome::Deliver {
                user: UserId(1),
                chat: ChatId(2),
                seq: Seq(3),
                frame: pool.make(|v| v.extend_from_slice(b"msg frame")),
                backlog: Some(0),
            }),
            ShardMsg::ToHome(ToHome::Deliver {
                user: UserId(1),
                chat: ChatId(2),
                seq: Seq(3),
                frame: pool.make(|v| v.extend_from_slice(b"live")),
                backlog: None,
            }),
            ShardMsg::ToHome(ToHome::BacklogChunk {
                user: UserId(1),
                epoch: 2,
                owner: 4,
                more: true,
            }),
            ShardMsg::ToHome(ToHome::GroupsPart {
                to: origin(),
                groups: vec![(ChatId(1), vec![UserId(1), UserId(2)]), (ChatId(2), vec![])],
                last: true,
            }),
        ]
    }

    #[test]
    fn every_message_survives_the_link() {
        let mut buf = Vec::new();
        let msgs = all();
        for (i, m) in msgs.iter().enumerate() {
            encode(&mut buf, i as u16, m);
        }
        let mut at = 0;
        for (i, m) in msgs.iter().enumerate() {
            let n = frame_len(&buf[at..]).unwrap().unwrap();
            let (dest, back) = decode(&buf[at..at + n]).unwrap();
            assert_eq!(dest, i as u16);
            // Debug shows every field (a frame by its length; compared below by bytes).
            assert_eq!(format!("{back:?}"), format!("{m:?}"));
            if let (
                ShardMsg::ToHome(ToHome::Deliver { frame: a, .. }),
                ShardMsg::ToHome(ToHome::Deliver { frame: b, .. }),
            ) = (m, &back)
            {
                assert_eq!(a.as_bytes(), b.as_bytes());
            }
            if let (ShardMsg::ToOwner(ToOwner::Submit(a)), ShardMsg::ToOwner(ToOwner::Submit(b))) =
                (m, &back)
            {
                assert_eq!(a.body, b.body);
            }
            at += n;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn the_largest_msg_frame_crosses_a_link() {
        // A SEND of the largest body makes a MSG frame of MAX_FRAME plus its length prefix;
        // refusing it closed the link, again after every resync.
        let mut pool = super::super::records::FramePool::default();
        let frame = pool.make(|v| v.resize(proto::chat::MAX_FRAME + proto::chat::LEN_BYTES, 7));
        let m = ShardMsg::ToHome(ToHome::Deliver {
            user: UserId(1),
            chat: ChatId(2),
            seq: Seq(3),
            frame,
            backlog: None,
        });
        let mut buf = Vec::new();
        encode(&mut buf, 1, &m);
        assert_eq!(frame_len(&buf).unwrap(), Some(buf.len()));
        assert!(decode(&buf).is_ok());
    }

    #[test]
    fn no_prefix_or_corruption_of_a_frame_panics_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        for m in all() {
            buf.clear();
            encode(&mut buf, 1, &m);
            for cut in 0..buf.len() {
                assert_eq!(
                    frame_len(&buf[..cut]).unwrap(),
                    None,
                    "a prefix waits for more"
                );
                let mut short = buf[..cut].to_vec();
                if cut >= 4 {
                    short[..4].copy_from_slice(&((cut - 4) as u32).to_le_bytes());
                    assert!(decode(&short).is_err(), "a truncated body is refused");
                }
            }
            for i in 4..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0xff;
                let _ = decode(&bad);
            }
        }
        let mut huge = vec![0u8; 8];
        huge[..4].copy_from_slice(&((MAX_LINK_FRAME + 1) as u32).to_le_bytes());
        assert!(frame_len(&huge).is_err());
        let mut unknown = vec![3, 0, 0, 0, 0, 0, 200];
        assert_eq!(decode(&unknown).unwrap_err(), BadFrame("unknown tag"));
        unknown[6] = tag::ACK;
        assert_eq!(decode(&unknown).unwrap_err(), BadFrame("truncated"));
    }
}
