//! The chat framing (PROTOCOL.md section 7): length-prefixed binary frames with a type byte,
//! a fixed little-endian layout per type and a maximum size. Decoding is a zero-copy view over
//! the received bytes; encoding appends to a caller's buffer.
//!
//! ```text
//! frame = length: u32 LE (bytes after this field, 1..=MAX_FRAME) | type: u8 | payload
//! ```

/// Protocol version spoken in HELLO/WELCOME.
pub const VERSION: u16 = 1;
/// Largest value of the length field.
pub const MAX_FRAME: usize = 64 * 1024;
/// Size of the length field.
pub const LEN_BYTES: usize = 4;
/// A client-generated message id (UUIDv7/ULID bytes).
pub type MsgId = [u8; 16];

/// Frame types.
pub mod ty {
    /// C->R: authenticate.
    pub const HELLO: u8 = 0x01;
    /// C->R: send a message, edit, delete or read receipt.
    pub const SEND: u8 = 0x02;
    /// C->R: cumulative delivery acknowledgements.
    pub const ACK: u8 = 0x03;
    /// C->R: create a group.
    pub const GROUP_CREATE: u8 = 0x04;
    /// C->R: add a member.
    pub const GROUP_ADD: u8 = 0x05;
    /// C->R: remove a member.
    pub const GROUP_REMOVE: u8 = 0x06;
    /// C->R: leave a group.
    pub const GROUP_LEAVE: u8 = 0x07;
    /// C->R: list my groups.
    pub const GROUP_LIST: u8 = 0x08;
    /// C->R and R->C: typing indicator (ephemeral).
    pub const TYPING: u8 = 0x09;
    /// C->R: keepalive.
    pub const PING: u8 = 0x0A;
    /// C->R: replace the set of users whose presence this session watches.
    pub const PRESENCE_WATCH: u8 = 0x0B;
    /// R->C: authenticated.
    pub const WELCOME: u8 = 0x81;
    /// R->C: a message is durable ("sent", one tick).
    pub const SENT: u8 = 0x82;
    /// R->C: a chat entry (message, edit, delete, receipt, membership event).
    pub const MSG: u8 = 0x83;
    /// R->C: the stored backlog has been sent.
    pub const BACKLOG_END: u8 = 0x84;
    /// R->C: an error; fatal ones are followed by close.
    pub const ERROR: u8 = 0x85;
    /// R->C: the answer to GROUP_LIST.
    pub const GROUPS: u8 = 0x86;
    /// R->C: a watched user is online or offline (ephemeral).
    pub const PRESENCE: u8 = 0x87;
    /// R->C: keepalive answer.
    pub const PONG: u8 = 0x8A;
}

/// Users one session may watch the presence of at most.
pub const MAX_PRESENCE_WATCH: usize = 256;

/// Entry kinds carried by SEND and MSG.
pub mod kind {
    /// Opaque message body.
    pub const TEXT: u8 = 0;
    /// Replaces the body of the message `ref_id`.
    pub const EDIT: u8 = 1;
    /// Deletes the message `ref_id`.
    pub const DELETE: u8 = 2;
    /// Relay-generated: the sender of this entry has received the chat up to the seq in the body.
    pub const DELIVERED: u8 = 3;
    /// Client receipt: the sender has read the chat up to the seq in the body.
    pub const READ: u8 = 4;
    /// Relay-generated: the user in the body joined the group.
    pub const MEMBER_ADDED: u8 = 5;
    /// Relay-generated: the user in the body left or was removed.
    pub const MEMBER_REMOVED: u8 = 6;
    /// Relay-generated: the group was created; body lists the members.
    pub const GROUP_CREATED: u8 = 7;

    /// Whether a client may send this kind.
    pub fn client_may_send(k: u8) -> bool {
        matches!(k, TEXT | EDIT | DELETE | READ)
    }
}

/// Error codes of ERROR frames.
pub mod code {
    /// The frame could not be parsed.
    pub const BAD_FRAME: u16 = 1;
    /// Unknown frame type.
    pub const UNKNOWN_TYPE: u16 = 2;
    /// Frame longer than MAX_FRAME.
    pub const TOO_LARGE: u16 = 3;
    /// A frame other than HELLO before authentication.
    pub const NOT_AUTHENTICATED: u16 = 4;
    /// The token was refused.
    pub const BAD_TOKEN: u16 = 5;
    /// Not a member of the chat.
    pub const NOT_MEMBER: u16 = 6;
    /// Sending too fast.
    pub const RATE_LIMITED: u16 = 7;
    /// The recipient's inbox is full.
    pub const INBOX_FULL: u16 = 8;
    /// No such chat.
    pub const UNKNOWN_CHAT: u16 = 9;
    /// No HELLO within the deadline.
    pub const HELLO_TIMEOUT: u16 = 10;
    /// The client did not read its frames in time.
    pub const SLOW_READER: u16 = 11;
    /// Unsupported protocol version.
    pub const BAD_VERSION: u16 = 12;
    /// The relay cannot take the request now (a queue is full); retry.
    pub const UNAVAILABLE: u16 = 13;
    /// Too many connections from this address.
    pub const TOO_MANY_CONNECTIONS: u16 = 14;
    /// A request that is not valid in its context (kind, group size, self-message).
    pub const INVALID: u16 = 15;
}

/// Why bytes are not a valid frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length field is 0 or above MAX_FRAME.
    BadLength(u32),
    /// Unknown type byte.
    UnknownType(u8),
    /// The payload does not match the type's layout.
    Malformed(u8),
}

impl FrameError {
    /// The ERROR code for this error.
    pub fn code(self) -> u16 {
        match self {
            Self::BadLength(_) => code::TOO_LARGE,
            Self::UnknownType(_) => code::UNKNOWN_TYPE,
            Self::Malformed(_) => code::BAD_FRAME,
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadLength(n) => write!(f, "frame length {n} outside 1..={MAX_FRAME}"),
            Self::UnknownType(t) => write!(f, "unknown frame type 0x{t:02x}"),
            Self::Malformed(t) => write!(f, "malformed frame of type 0x{t:02x}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A chat entry as delivered in MSG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Chat id.
    pub chat_id: u64,
    /// Per-chat sequence number.
    pub seq: u64,
    /// Author.
    pub sender: u64,
    /// Author's message id.
    pub msg_id: MsgId,
    /// Kind (see [`kind`]).
    pub kind: u8,
    /// Referenced message id (edit, delete) or zero.
    pub ref_id: MsgId,
    /// Relay time of acceptance, unix milliseconds.
    pub ts_ms: u64,
    /// Body.
    pub body: &'a [u8],
}

/// A decoded frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Authenticate with a token (base64url text).
    Hello {
        /// Protocol version.
        version: u16,
        /// Token text.
        token: &'a [u8],
    },
    /// Send an entry.
    Send {
        /// Client message id.
        msg_id: MsgId,
        /// Group chat id, or 0 for a direct message to `to`.
        chat_id: u64,
        /// Recipient of a direct message, or 0.
        to: u64,
        /// Kind.
        kind: u8,
        /// Referenced message id.
        ref_id: MsgId,
        /// Body.
        body: &'a [u8],
    },
    /// Cumulative acknowledgements: (chat id, seq) pairs, 16 bytes each.
    Ack {
        /// Raw pairs; iterate with [`ack_pairs`].
        pairs: &'a [u8],
    },
    /// Create a group with these members (u64 LE each) besides the creator.
    GroupCreate {
        /// Client message id.
        msg_id: MsgId,
        /// Raw member ids; iterate with [`u64s`].
        members: &'a [u8],
    },
    /// Add a member.
    GroupAdd {
        /// Client message id.
        msg_id: MsgId,
        /// Group.
        chat_id: u64,
        /// User.
        user: u64,
    },
    /// Remove a member.
    GroupRemove {
        /// Client message id.
        msg_id: MsgId,
        /// Group.
        chat_id: u64,
        /// User.
        user: u64,
    },
    /// Leave a group.
    GroupLeave {
        /// Client message id.
        msg_id: MsgId,
        /// Group.
        chat_id: u64,
    },
    /// List my groups.
    GroupList,
    /// Typing indicator: chat (group) or direct peer; relayed as `from` on the way out.
    Typing {
        /// Group chat id, or 0.
        chat_id: u64,
        /// Direct peer (C->R) or the typist (R->C).
        user: u64,
    },
    /// Keepalive.
    Ping {
        /// Echoed in PONG.
        nonce: u64,
    },
    /// The users (u64 LE each, at most [`MAX_PRESENCE_WATCH`]) whose presence to watch; replaces
    /// the previous set; empty stops watching.
    PresenceWatch {
        /// Raw user ids; iterate with [`u64s`].
        users: &'a [u8],
    },
    /// A watched user's presence.
    Presence {
        /// User.
        user: u64,
        /// Whether it has a session now.
        online: bool,
    },
    /// Authenticated.
    Welcome {
        /// Version.
        version: u16,
        /// The authenticated user.
        user_id: u64,
        /// Largest frame accepted.
        max_frame: u32,
        /// Unacknowledged MSG frames the relay keeps in flight.
        window: u16,
    },
    /// Durable.
    Sent {
        /// Client message id.
        msg_id: MsgId,
        /// Chat.
        chat_id: u64,
        /// Assigned sequence number.
        seq: u64,
    },
    /// A chat entry.
    Msg(Entry<'a>),
    /// End of the stored backlog.
    BacklogEnd,
    /// An error.
    Error {
        /// Code (see [`code`]).
        code: u16,
        /// The message id concerned, or zero.
        msg_id: MsgId,
        /// Human-readable reason.
        text: &'a [u8],
    },
    /// Groups: raw records, iterate with [`groups`].
    Groups {
        /// Raw records.
        raw: &'a [u8],
    },
    /// Keepalive answer.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn id(&mut self) -> Option<MsgId> {
        self.take(16).map(|b| b.try_into().expect("16 bytes"))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Option<()> {
        self.buf.is_empty().then_some(())
    }
}

/// Splits the first complete frame off `buf`. Returns `Ok(None)` when more bytes are needed,
/// `Ok(Some((frame, consumed)))` for a frame, and an error for bytes that can never form one
/// (the connection must then be closed: framing is lost).
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(len_bytes) = buf.get(..LEN_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes"));
    if len == 0 || len as usize > MAX_FRAME {
        return Err(FrameError::BadLength(len));
    }
    let Some(body) = buf.get(LEN_BYTES..LEN_BYTES + len as usize) else {
        return Ok(None);
    };
    let frame = parse_body(body[0], &body[1..])?;
    Ok(Some((frame, LEN_BYTES + len as usize)))
}

fn parse_body(t: u8, payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    let mut r = Reader { buf: payload };
    let bad = FrameError::Malformed(t);
    let f = match t {
        ty::HELLO => {
            let version = r.u16().ok_or(bad)?;
            let n = r.u16().ok_or(bad)?;
            let token = r.take(usize::from(n)).ok_or(bad)?;
            r.end().ok_or(bad)?;
            Frame::Hello { version, token }
        }
        ty::SEND => Frame::Send {
            msg_id: r.id().ok_or(bad)?,
            chat_id: r.u64().ok_or(bad)?,
            to: r.u64().ok_or(bad)?,
            kind: r.u8().ok_or(bad)?,
            ref_id: r.id().ok_or(bad)?,
            body: r.rest(),
        },
        ty::ACK => {
            let pairs = r.rest();
            if pairs.is_empty() || !pairs.len().is_multiple_of(16) {
                return Err(bad);
            }
            Frame::Ack { pairs }
        }
        ty::GROUP_CREATE => {
            let msg_id = r.id().ok_or(bad)?;
            let members = r.rest();
            if !members.len().is_multiple_of(8) {
                return Err(bad);
            }
            Frame::GroupCreate { msg_id, members }
        }
        ty::GROUP_ADD | ty::GROUP_REMOVE => {
            let (msg_id, chat_id, user) =
                (r.id().ok_or(bad)?, r.u64().ok_or(bad)?, r.u64().ok_or(bad)?);
            r.end().ok_or(bad)?;
            if t == ty::GROUP_ADD {
                Frame::GroupAdd {
                    msg_id,
                    chat_id,
                    user,
                }
            } else {
                Frame::GroupRemove {
                    msg_id,
                    chat_id,
                    user,
                }
            }
        }
        ty::GROUP_LEAVE => {
            let (msg_id, chat_id) = (r.id().ok_or(bad)?, r.u64().ok_or(bad)?);
            r.end().ok_or(bad)?;
            Frame::GroupLeave { msg_id, chat_id }
        }
        ty::GROUP_LIST => {
            r.end().ok_or(bad)?;
            Frame::GroupList
        }
        ty::TYPING => {
            let (chat_id, user) = (r.u64().ok_or(bad)?, r.u64().ok_or(bad)?);
            r.end().ok_or(bad)?;
            Frame::Typing { chat_id, user }
        }
        ty::PING | ty::PONG => {
            let nonce = r.u64().ok_or(bad)?;
            r.end().ok_or(bad)?;
            if t == ty::PING {
                Frame::Ping { nonce }
            } else {
                Frame::Pong { nonce }
            }
        }
        ty::PRESENCE_WATCH => {
            let users = r.rest();
            if !users.len().is_multiple_of(8) || users.len() / 8 > MAX_PRESENCE_WATCH {
                return Err(bad);
            }
            Frame::PresenceWatch { users }
        }
        ty::PRESENCE => {
            let user = r.u64().ok_or(bad)?;
            let online = match r.u8().ok_or(bad)? {
                0 => false,
                1 => true,
                _ => return Err(bad),
            };
            r.end().ok_or(bad)?;
            Frame::Presence { user, online }
        }
        ty::WELCOME => {
            let f = Frame::Welcome {
                version: r.u16().ok_or(bad)?,
                user_id: r.u64().ok_or(bad)?,
                max_frame: r.u32().ok_or(bad)?,
                window: r.u16().ok_or(bad)?,
            };
            r.end().ok_or(bad)?;
            f
        }
        ty::SENT => {
            let f = Frame::Sent {
                msg_id: r.id().ok_or(bad)?,
                chat_id: r.u64().ok_or(bad)?,
                seq: r.u64().ok_or(bad)?,
            };
            r.end().ok_or(bad)?;
            f
        }
        ty::MSG => Frame::Msg(Entry {
            chat_id: r.u64().ok_or(bad)?,
            seq: r.u64().ok_or(bad)?,
            sender: r.u64().ok_or(bad)?,
            msg_id: r.id().ok_or(bad)?,
            kind: r.u8().ok_or(bad)?,
            ref_id: r.id().ok_or(bad)?,
            ts_ms: r.u64().ok_or(bad)?,
            body: r.rest(),
        }),
        ty::BACKLOG_END => {
            r.end().ok_or(bad)?;
            Frame::BacklogEnd
        }
        ty::ERROR => {
            let code = r.u16().ok_or(bad)?;
            let msg_id = r.id().ok_or(bad)?;
            Frame::Error {
                code,
                msg_id,
                text: r.rest(),
            }
        }
        ty::GROUPS => {
            let raw = r.rest();
            if groups(raw).any(|g| g.is_none()) {
                return Err(bad);
            }
            Frame::Groups { raw }
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    Ok(f)
}

/// Iterates little-endian u64s (member lists).
pub fn u64s(raw: &[u8]) -> impl Iterator<Item = u64> + '_ {
    raw.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
}

/// Iterates the (chat id, seq) pairs of an ACK.
pub fn ack_pairs(raw: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    raw.chunks_exact(16).map(|c| {
        (
            u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
        )
    })
}

/// Iterates GROUPS records: `Some((chat_id, members raw))`, or `None` once for a malformed tail.
pub fn groups(raw: &[u8]) -> impl Iterator<Item = Option<(u64, &[u8])>> + '_ {
    let mut r = Reader { buf: raw };
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || r.buf.is_empty() {
            return None;
        }
        let rec = (|| {
            let chat = r.u64()?;
            let n = r.u16()?;
            Some((chat, r.take(8 * usize::from(n))?))
        })();
        failed = rec.is_none();
        Some(rec)
    })
}

/// Appends frames to a buffer. Every method writes one whole frame.
pub struct Encoder<'b> {
    out: &'b mut Vec<u8>,
}

impl<'b> Encoder<'b> {
    /// Frames will be appended to `out`.
    pub fn new(out: &'b mut Vec<u8>) -> Self {
        Self { out }
    }

    fn frame(&mut self, t: u8, parts: &[&[u8]]) {
        let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        debug_assert!(len <= MAX_FRAME, "callers bound bodies below MAX_FRAME");
        self.out.extend_from_slice(&(len as u32).to_le_bytes());
        self.out.push(t);
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }

    /// HELLO.
    pub fn hello(&mut self, token: &[u8]) {
        self.frame(
            ty::HELLO,
            &[
                &VERSION.to_le_bytes(),
                &(token.len() as u16).to_le_bytes(),
                token,
            ],
        );
    }
    /// SEND.
    pub fn send(
        &mut self,
        msg_id: &MsgId,
        chat_id: u64,
        to: u64,
        kind: u8,
        ref_id: &MsgId,
        body: &[u8],
    ) {
        self.frame(
            ty::SEND,
            &[
                msg_id,
                &chat_id.to_le_bytes(),
                &to.to_le_bytes(),
                &[kind],
                ref_id,
                body,
            ],
        );
    }
    /// ACK of (chat, seq) pairs.
    pub fn ack(&mut self, pairs: &[(u64, u64)]) {
        let raw: Vec<u8> = pairs
            .iter()
            .flat_map(|(c, s)| c.to_le_bytes().into_iter().chain(s.to_le_bytes()))
            .collect();
        self.frame(ty::ACK, &[&raw]);
    }
    /// GROUP_CREATE.
    pub fn group_create(&mut self, msg_id: &MsgId, members: &[u64]) {
        let raw: Vec<u8> = members.iter().flat_map(|m| m.to_le_bytes()).collect();
        self.frame(ty::GROUP_CREATE, &[msg_id, &raw]);
    }
    /// PRESENCE_WATCH: the callers bound `users` to [`MAX_PRESENCE_WATCH`].
    pub fn presence_watch(&mut self, users: &[u64]) {
        let raw: Vec<u8> = users.iter().flat_map(|u| u.to_le_bytes()).collect();
        self.frame(ty::PRESENCE_WATCH, &[&raw]);
    }
    /// PRESENCE.
    pub fn presence(&mut self, user: u64, online: bool) {
        self.frame(ty::PRESENCE, &[&user.to_le_bytes(), &[u8::from(online)]]);
    }
    /// GROUP_ADD.
    pub fn group_add(&mut self, msg_id: &MsgId, chat_id: u64, user: u64) {
        self.frame(
            ty::GROUP_ADD,
            &[msg_id, &chat_id.to_le_bytes(), &user.to_le_bytes()],
        );
    }
    /// GROUP_REMOVE.
    pub fn group_remove(&mut self, msg_id: &MsgId, chat_id: u64, user: u64) {
        self.frame(
            ty::GROUP_REMOVE,
            &[msg_id, &chat_id.to_le_bytes(), &user.to_le_bytes()],
        );
    }
    /// GROUP_LEAVE.
    pub fn group_leave(&mut self, msg_id: &MsgId, chat_id: u64) {
        self.frame(ty::GROUP_LEAVE, &[msg_id, &chat_id.to_le_bytes()]);
    }
    /// GROUP_LIST.
    pub fn group_list(&mut self) {
        self.frame(ty::GROUP_LIST, &[]);
    }
    /// TYPING.
    pub fn typing(&mut self, chat_id: u64, user: u64) {
        self.frame(ty::TYPING, &[&chat_id.to_le_bytes(), &user.to_le_bytes()]);
    }
    /// PING.
    pub fn ping(&mut self, nonce: u64) {
        self.frame(ty::PING, &[&nonce.to_le_bytes()]);
    }
    /// PONG.
    pub fn pong(&mut self, nonce: u64) {
        self.frame(ty::PONG, &[&nonce.to_le_bytes()]);
    }
    /// WELCOME.
    pub fn welcome(&mut self, user_id: u64, window: u16) {
        self.frame(
            ty::WELCOME,
            &[
                &VERSION.to_le_bytes(),
                &user_id.to_le_bytes(),
                &(MAX_FRAME as u32).to_le_bytes(),
                &window.to_le_bytes(),
            ],
        );
    }
    /// SENT.
    pub fn sent(&mut self, msg_id: &MsgId, chat_id: u64, seq: u64) {
        self.frame(
            ty::SENT,
            &[msg_id, &chat_id.to_le_bytes(), &seq.to_le_bytes()],
        );
    }
    /// MSG.
    pub fn msg(&mut self, e: &Entry<'_>) {
        self.frame(
            ty::MSG,
            &[
                &e.chat_id.to_le_bytes(),
                &e.seq.to_le_bytes(),
                &e.sender.to_le_bytes(),
                &e.msg_id,
                &[e.kind],
                &e.ref_id,
                &e.ts_ms.to_le_bytes(),
                e.body,
            ],
        );
    }
    /// BACKLOG_END.
    pub fn backlog_end(&mut self) {
        self.frame(ty::BACKLOG_END, &[]);
    }
    /// ERROR.
    pub fn error(&mut self, code: u16, msg_id: &MsgId, text: &str) {
        let text = &text.as_bytes()[..text.len().min(512)];
        self.frame(ty::ERROR, &[&code.to_le_bytes(), msg_id, text]);
    }
    /// The GROUPS answer listing (chat id, members) records: one frame, or several when it
    /// does not fit in one. Each frame holds whole groups and is filled until the next group
    /// would not fit, so every frame but the last has a payload over [`GROUPS_MORE_ABOVE`]
    /// bytes; when the last one would too, an empty GROUPS frame ends the answer. A group of
    /// more than [`MAX_GROUP_MEMBERS`] members (which the relay never makes) is left out.
    pub fn groups(&mut self, groups: &[(u64, Vec<u64>)]) {
        let mut rest = groups;
        loop {
            let mut raw = Vec::new();
            while let Some((chat, members)) = rest.first() {
                let len = GROUP_ENTRY_FIXED + 8 * members.len();
                if members.len() > MAX_GROUP_MEMBERS {
                    rest = &rest[1..];
                    continue;
                }
                if raw.len() + len > MAX_FRAME - 1 {
                    break;
                }
                raw.extend_from_slice(&chat.to_le_bytes());
                raw.extend_from_slice(&(members.len() as u16).to_le_bytes());
                members
                    .iter()
                    .for_each(|m| raw.extend_from_slice(&m.to_le_bytes()));
                rest = &rest[1..];
            }
            let more = raw.len() > GROUPS_MORE_ABOVE;
            self.frame(ty::GROUPS, &[&raw]);
            if !more && rest.is_empty() {
                return;
            }
        }
    }
}

/// Members of a group at most.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// A group's record in GROUPS without its members: chat id and member count.
const GROUP_ENTRY_FIXED: usize = 8 + 2;
/// A GROUPS payload longer than this is followed by another GROUPS frame of the same answer
/// (possibly empty): the payload limit less the largest group record (57,333 bytes). See
/// [`Encoder::groups`].
pub const GROUPS_MORE_ABOVE: usize = MAX_FRAME - 1 - (GROUP_ENTRY_FIXED + 8 * MAX_GROUP_MEMBERS);

/// Size of a MSG frame header before the body (length field included).
pub const MSG_OVERHEAD: usize = LEN_BYTES + 1 + 8 + 8 + 8 + 16 + 1 + 16 + 8;
/// Largest body a SEND may carry.
pub const MAX_BODY: usize = MAX_FRAME - (MSG_OVERHEAD - LEN_BYTES);

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> Frame<'_> {
        let (f, n) = decode(buf).unwrap().unwrap();
        assert_eq!(n, buf.len());
        f
    }

    #[test]
    fn every_frame_round_trips() {
        let id = [7u8; 16];
        let entry = Entry {
            chat_id: 1,
            seq: 2,
            sender: 3,
            msg_id: id,
            kind: kind::EDIT,
            ref_id: [1; 16],
            ts_ms: 9,
            body: b"hi",
        };
        type Case = (Box<dyn Fn(&mut Encoder<'_>)>, Frame<'static>);
        let cases: Vec<Case> = vec![
            (
                Box::new(|e| e.hello(b"tok")),
                Frame::Hello {
                    version: VERSION,
                    token: b"tok",
                },
            ),
            (
                Box::new(move |e| e.send(&id, 5, 6, kind::TEXT, &[0; 16], b"body")),
                Frame::Send {
                    msg_id: id,
                    chat_id: 5,
                    to: 6,
                    kind: kind::TEXT,
                    ref_id: [0; 16],
                    body: b"body",
                },
            ),
            (Box::new(|e| e.group_list()), Frame::GroupList),
            (
                Box::new(|e| e.typing(4, 5)),
                Frame::Typing {
                    chat_id: 4,
                    user: 5,
                },
            ),
            (Box::new(|e| e.ping(77)), Frame::Ping { nonce: 77 }),
            (
                Box::new(|e| e.presence(9, true)),
                Frame::Presence {
                    user: 9,
                    online: true,
                },
            ),
            (
                Box::new(|e| e.presence(9, false)),
                Frame::Presence {
                    user: 9,
                    online: false,
                },
            ),
            (Box::new(|e| e.pong(78)), Frame::Pong { nonce: 78 }),
            (
                Box::new(|e| e.welcome(42, 64)),
                Frame::Welcome {
                    version: VERSION,
                    user_id: 42,
                    max_frame: MAX_FRAME as u32,
                    window: 64,
                },
            ),
            (
                Box::new(move |e| e.sent(&id, 8, 9)),
                Frame::Sent {
                    msg_id: id,
                    chat_id: 8,
                    seq: 9,
                },
            ),
            (Box::new(move |e| e.msg(&entry)), Frame::Msg(entry)),
            (Box::new(|e| e.backlog_end()), Frame::BacklogEnd),
            (
                Box::new(move |e| e.error(code::NOT_MEMBER, &id, "no")),
                Frame::Error {
                    code: code::NOT_MEMBER,
                    msg_id: id,
                    text: b"no",
                },
            ),
            (
                Box::new(move |e| e.group_add(&id, 1, 2)),
                Frame::GroupAdd {
                    msg_id: id,
                    chat_id: 1,
                    user: 2,
                },
            ),
            (
                Box::new(move |e| e.group_remove(&id, 1, 2)),
                Frame::GroupRemove {
                    msg_id: id,
                    chat_id: 1,
                    user: 2,
                },
            ),
            (
                Box::new(move |e| e.group_leave(&id, 1)),
                Frame::GroupLeave {
                    msg_id: id,
                    chat_id: 1,
                },
            ),
        ];
        for (write, expected) in cases {
            let mut buf = Vec::new();
            write(&mut Encoder::new(&mut buf));
            assert_eq!(one(&buf), expected);
            // Every strict prefix is incomplete, never an error.
            for cut in 0..buf.len() {
                assert_eq!(
                    decode(&buf[..cut]),
                    Ok(None),
                    "prefix {cut} of {expected:?}"
                );
            }
        }
    }

    #[test]
    fn lists_round_trip() {
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf);
        e.ack(&[(1, 2), (3, 4)]);
        e.group_create(&[1; 16], &[10, 11]);
        e.groups(&[(5, vec![1, 2]), (6, vec![])]);
        e.presence_watch(&[7, 8]);
        let (f, n) = decode(&buf).unwrap().unwrap();
        let Frame::Ack { pairs } = f else { panic!() };
        assert_eq!(ack_pairs(pairs).collect::<Vec<_>>(), vec![(1, 2), (3, 4)]);
        let (f, m) = decode(&buf[n..]).unwrap().unwrap();
        let Frame::GroupCreate { members, .. } = f else {
            panic!()
        };
        assert_eq!(u64s(members).collect::<Vec<_>>(), vec![10, 11]);
        let (f, k) = decode(&buf[n + m..]).unwrap().unwrap();
        let Frame::Groups { raw } = f else { panic!() };
        let (f, _) = decode(&buf[n + m + k..]).unwrap().unwrap();
        let Frame::PresenceWatch { users } = f else {
            panic!()
        };
        assert_eq!(u64s(users).collect::<Vec<_>>(), vec![7, 8]);
        let g: Vec<_> = groups(raw)
            .map(|g| g.map(|(c, m)| (c, u64s(m).collect::<Vec<_>>())))
            .collect();
        assert_eq!(g, vec![Some((5, vec![1, 2])), Some((6, vec![]))]);
    }

    #[test]
    fn a_groups_answer_too_long_for_one_frame_is_split_and_its_end_is_marked() {
        // 20 groups of 1,024 members: 164,040 bytes, three frames; and exactly 7 (57,414
        // bytes, over the mark), one full frame and an empty one after it.
        for (n_groups, frames) in [(20u64, 3), (7, 2), (2, 1)] {
            let groups: Vec<(u64, Vec<u64>)> = (0..n_groups)
                .map(|c| (c, (0..MAX_GROUP_MEMBERS as u64).collect()))
                .collect();
            let mut buf = Vec::new();
            Encoder::new(&mut buf).groups(&groups);
            let mut at = 0;
            let mut got = Vec::new();
            let mut sizes = Vec::new();
            while let Some((f, n)) = decode(&buf[at..]).unwrap() {
                let Frame::Groups { raw } = f else { panic!() };
                sizes.push(raw.len());
                got.extend(groups_of(raw));
                at += n;
            }
            assert_eq!(at, buf.len());
            assert_eq!(sizes.len(), frames, "{n_groups} groups: {sizes:?}");
            let (last, rest) = sizes.split_last().unwrap();
            assert!(*last <= GROUPS_MORE_ABOVE, "{sizes:?}");
            assert!(rest.iter().all(|&s| s > GROUPS_MORE_ABOVE), "{sizes:?}");
            assert_eq!(got, groups);
        }
    }

    fn groups_of(raw: &[u8]) -> Vec<(u64, Vec<u64>)> {
        groups(raw)
            .map(|g| g.map(|(c, m)| (c, u64s(m).collect())).unwrap())
            .collect()
    }

    #[test]
    fn refuses_bad_frames() {
        assert_eq!(decode(&[0, 0, 0, 0, 1]), Err(FrameError::BadLength(0)));
        let big = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert_eq!(
            decode(&big),
            Err(FrameError::BadLength(MAX_FRAME as u32 + 1))
        );
        assert_eq!(
            decode(&[1, 0, 0, 0, 0x7f]),
            Err(FrameError::UnknownType(0x7f))
        );
        assert_eq!(
            decode(&[2, 0, 0, 0, ty::PING, 1]),
            Err(FrameError::Malformed(ty::PING))
        );
        assert_eq!(
            decode(&[3, 0, 0, 0, ty::ACK, 1, 2]),
            Err(FrameError::Malformed(ty::ACK))
        );
        assert_eq!(
            decode(&[5, 0, 0, 0, ty::HELLO, 1, 0, 9, 0]),
            Err(FrameError::Malformed(ty::HELLO))
        );
        // PRESENCE: the state is 0 or 1; PRESENCE_WATCH: whole ids, at most 256 of them.
        let mut p = vec![10, 0, 0, 0, ty::PRESENCE, 1, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(decode(&p), Err(FrameError::Malformed(ty::PRESENCE)));
        p[13] = 1;
        assert!(decode(&p).unwrap().is_some());
        assert_eq!(
            decode(&[4, 0, 0, 0, ty::PRESENCE_WATCH, 1, 2, 3]),
            Err(FrameError::Malformed(ty::PRESENCE_WATCH))
        );
        let mut many = Vec::new();
        Encoder::new(&mut many).presence_watch(&[1; MAX_PRESENCE_WATCH + 1]);
        assert_eq!(
            decode(&many),
            Err(FrameError::Malformed(ty::PRESENCE_WATCH))
        );
    }

    /// The hex examples of PROTOCOL.md section 7 decode as documented.
    #[test]
    fn protocol_md_examples() {
        let bytes = |hex: &str| -> Vec<u8> {
            let hex: String = hex.split_whitespace().collect();
            (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect()
        };
        assert_eq!(
            one(&bytes("09000000 0a 2a00000000000000")),
            Frame::Ping { nonce: 42 }
        );
        let watch = bytes("11000000 0b 0700000000000000 0800000000000000");
        let Frame::PresenceWatch { users } = one(&watch) else {
            panic!()
        };
        assert_eq!(u64s(users).collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(
            one(&bytes("0a000000 87 0700000000000000 01")),
            Frame::Presence {
                user: 7,
                online: true
            }
        );
        let send = bytes(
            "34000000 02 0102030405060708090a0b0c0d0e0f10 0000000000000000 0700000000000000 00 \
             00000000000000000000000000000000 6869",
        );
        assert_eq!(
            one(&send),
            Frame::Send {
                msg_id: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                chat_id: 0,
                to: 7,
                kind: kind::TEXT,
                ref_id: [0; 16],
                body: b"hi"
            }
        );
    }
}

/// Placement of users and chats on the shards of one relay. Every party (relay shards, ctl,
/// clients) computes these the same way: they are part of the protocol.
pub mod ids {
    /// The splitmix64 finaliser: a fixed, well-mixed 64-bit permutation.
    pub const fn mix(mut x: u64) -> u64 {
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// Maps a hash to `0..n` with its top 32 bits (multiply-shift; the low bits of `mix` of
    /// small consecutive integers are not uniform enough for `%`).
    const fn reduce(h: u64, n: u16) -> u16 {
        (((h >> 32) * n as u64) >> 32) as u16
    }

    /// The shard of a relay with `n_shards` shards that is `user`'s chat home.
    pub const fn home_shard(user: u64, n_shards: u16) -> u16 {
        reduce(mix(user), n_shards)
    }

    /// The shard that owns (sequences and stores) `chat`.
    pub const fn owner_shard(chat: u64, n_shards: u16) -> u16 {
        reduce(mix(chat ^ 0x5bd1_e995_0000_0000), n_shards)
    }

    /// The id of the direct chat between two users: the same for both, top bit clear.
    pub const fn direct_chat(a: u64, b: u64) -> u64 {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        // Chained, not a symmetric XOR of per-user hashes: (1, 3) and (2, 3) must differ.
        mix(lo ^ mix(hi ^ 0x2545_f491_4f6c_dd1d)) >> 1
    }

    /// The id of a group created by `creator` with message id `msg_id`: top bit set.
    pub fn group_chat(creator: u64, msg_id: &super::MsgId) -> u64 {
        let a = u64::from_le_bytes(msg_id[..8].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(msg_id[8..].try_into().expect("8 bytes"));
        (mix(creator) ^ mix(a).rotate_left(17) ^ mix(b).rotate_left(41)) | (1 << 63)
    }

    /// Whether `chat` is a group id.
    pub const fn is_group(chat: u64) -> bool {
        chat >> 63 == 1
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ids_are_symmetric_and_separated() {
            assert_eq!(direct_chat(3, 9), direct_chat(9, 3));
            assert_ne!(direct_chat(3, 9), direct_chat(3, 10));
            // Regression: a symmetric combination made (1, 3) and (2, 3) collide.
            let mut seen = std::collections::HashSet::new();
            for a in 0..200u64 {
                for b in a + 1..200 {
                    assert!(seen.insert(direct_chat(a, b)), "collision at ({a}, {b})");
                }
            }
            assert!(!is_group(direct_chat(1, 2)));
            assert!(is_group(group_chat(1, &[5; 16])));
            // Golden values: these place users and chats; changing them moves every home.
            assert_eq!(mix(1), 6238072747940578789);
            assert_eq!(
                (0..8).map(|u| home_shard(u, 4)).collect::<Vec<_>>(),
                vec![0, 1, 3, 0, 2, 2, 3, 0]
            );
        }
    }
}
