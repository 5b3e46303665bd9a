//! A blocking chat client for tests, the perf harness and the demo. It speaks PROTOCOL.md
//! section 7 over one TCP connection and applies the client side of the delivery contract:
//! entries are delivered at least once, so it drops any entry whose seq is not above the last
//! one it saw in that chat (and acknowledges cumulatively).

use proto::chat::{self, Encoder, Frame, MsgId};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A chat entry, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Chat.
    pub chat: u64,
    /// Seq.
    pub seq: u64,
    /// Author.
    pub sender: u64,
    /// Author's id.
    pub msg_id: MsgId,
    /// Kind.
    pub kind: u8,
    /// Referenced id.
    pub ref_id: MsgId,
    /// Relay time, unix ms.
    pub ts_ms: u64,
    /// Body.
    pub body: Vec<u8>,
}

/// Something the relay sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Durable.
    Sent {
        /// Id.
        msg_id: MsgId,
        /// Chat.
        chat: u64,
        /// Seq.
        seq: u64,
    },
    /// A new entry (duplicates are filtered).
    Message(Message),
    /// The stored backlog has been delivered.
    BacklogEnd,
    /// An error (fatal ones are followed by close).
    Error {
        /// Code.
        code: u16,
        /// Id concerned.
        msg_id: MsgId,
        /// Reason.
        text: String,
    },
    /// GROUP_LIST answer.
    Groups(Vec<(u64, Vec<u64>)>),
    /// Someone is typing.
    Typing {
        /// Group, or 0 for a direct chat.
        chat: u64,
        /// Typist.
        from: u64,
    },
    /// A watched user came online or went offline (see [`Client::watch_presence`]).
    Presence {
        /// User.
        user: u64,
        /// Whether it has a session.
        online: bool,
    },
    /// PING answer.
    Pong,
}

/// One authenticated session.
pub struct Client {
    stream: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// The authenticated user.
    pub user: u64,
    /// The window the relay announced.
    pub window: u16,
    last_seq: HashMap<u64, u64>,
    /// Entries dropped as duplicates (redelivered after a reconnect).
    pub duplicates: u64,
    /// The groups of a GROUPS answer spanning several frames, so far.
    groups: Vec<(u64, Vec<u64>)>,
}

/// A fresh message id: 8 bytes of time and 8 of a counter mixed with the process id
/// (UUIDv7-like ordering is not required by the relay, only uniqueness per sender).
pub fn new_msg_id() -> MsgId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 40);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&t.to_be_bytes());
    id[8..].copy_from_slice(&c.to_be_bytes());
    id
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Client {
    /// Connects, sends HELLO with `token` and waits for WELCOME.
    pub fn connect(addr: SocketAddr, token: &str, timeout: Duration) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        let mut c = Self {
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            user: 0,
            window: 0,
            last_seq: HashMap::new(),
            duplicates: 0,
            groups: Vec::new(),
        };
        Encoder::new(&mut c.out).hello(token.as_bytes());
        c.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no WELCOME"));
            }
            match c.next_frame(left)? {
                Some(Owned::Welcome { user, window }) => {
                    c.user = user;
                    c.window = window;
                    return Ok(c);
                }
                Some(Owned::Event(Event::Error { code, text, .. })) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("error {code}: {text}"),
                    ));
                }
                _ => {}
            }
        }
    }

    /// Writes queued frames.
    pub fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// Queues frames through an encoder (sent on the next `flush`).
    pub fn queue(&mut self, write: impl FnOnce(&mut Encoder<'_>)) {
        write(&mut Encoder::new(&mut self.out));
    }

    /// Sends a text message to `to` (direct) and returns its id.
    pub fn send_direct(&mut self, to: u64, body: &[u8]) -> io::Result<MsgId> {
        let id = new_msg_id();
        self.queue(|e| e.send(&id, 0, to, chat::kind::TEXT, &[0; 16], body));
        self.flush()?;
        Ok(id)
    }

    /// Sends an entry of `kind` to a group chat.
    pub fn send_group(
        &mut self,
        chat_id: u64,
        kind: u8,
        ref_id: &MsgId,
        body: &[u8],
    ) -> io::Result<MsgId> {
        let id = new_msg_id();
        self.queue(|e| e.send(&id, chat_id, 0, kind, ref_id, body));
        self.flush()?;
        Ok(id)
    }

    /// Watches the presence of `users` (replacing the previous set): the relay answers with
    /// each one's current state, then reports every change.
    pub fn watch_presence(&mut self, users: &[u64]) -> io::Result<()> {
        if users.len() > chat::MAX_PRESENCE_WATCH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many users to watch",
            ));
        }
        self.queue(|e| e.presence_watch(users));
        self.flush()
    }

    /// Acknowledges every chat up to the highest seq seen.
    pub fn ack_all(&mut self) -> io::Result<()> {
        let pairs: Vec<(u64, u64)> = self.last_seq.iter().map(|(&c, &s)| (c, s)).collect();
        if !pairs.is_empty() {
            self.queue(|e| e.ack(&pairs));
            self.flush()?;
        }
        Ok(())
    }

    /// The next event, waiting at most `timeout`. `Ok(None)` on timeout; an error when the
    /// relay closed the connection.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Event>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left)? {
                None => return Ok(None),
                Some(Owned::Event(e)) => return Ok(Some(e)),
                Some(Owned::Duplicate | Owned::Partial | Owned::Welcome { .. }) => {
                    if left.is_zero() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn next_frame(&mut self, timeout: Duration) -> io::Result<Option<Owned>> {
        loop {
            let mut inbuf = std::mem::take(&mut self.inbuf);
            let decoded = match chat::decode(&inbuf) {
                Ok(Some((frame, n))) => Ok(Some((self.own(frame), n))),
                Ok(None) => Ok(None),
                Err(e) => Err(other(e)),
            };
            if let Ok(Some((_, n))) = &decoded {
                inbuf.drain(..*n);
            }
            self.inbuf = inbuf;
            if let Some((owned, _)) = decoded? {
                return Ok(Some(owned));
            }
            if timeout.is_zero() {
                self.stream.set_nonblocking(true)?;
            } else {
                self.stream.set_nonblocking(false)?;
                self.stream.set_read_timeout(Some(timeout))?;
            }
            let mut buf = [0u8; 64 * 1024];
            let r = self.stream.read(&mut buf);
            match r {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "closed by the relay",
                    ))
                }
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn own(&mut self, f: Frame<'_>) -> Owned {
        Owned::Event(match f {
            Frame::Welcome {
                user_id, window, ..
            } => {
                return Owned::Welcome {
                    user: user_id,
                    window,
                }
            }
            Frame::Sent {
                msg_id,
                chat_id,
                seq,
            } => Event::Sent {
                msg_id,
                chat: chat_id,
                seq,
            },
            Frame::Msg(e) => {
                let last = self.last_seq.entry(e.chat_id).or_default();
                if e.seq <= *last {
                    self.duplicates += 1;
                    return Owned::Duplicate;
                }
                *last = e.seq;
                Event::Message(Message {
                    chat: e.chat_id,
                    seq: e.seq,
                    sender: e.sender,
                    msg_id: e.msg_id,
                    kind: e.kind,
                    ref_id: e.ref_id,
                    ts_ms: e.ts_ms,
                    body: e.body.to_vec(),
                })
            }
            Frame::BacklogEnd => Event::BacklogEnd,
            Frame::Error { code, msg_id, text } => Event::Error {
                code,
                msg_id,
                text: String::from_utf8_lossy(text).into(),
            },
            Frame::Groups { raw } => {
                // An answer may span several frames (PROTOCOL.md 7.1, GROUPS).
                self.groups.extend(
                    chat::groups(raw)
                        .flatten()
                        .map(|(c, m)| (c, chat::u64s(m).collect())),
                );
                if raw.len() > chat::GROUPS_MORE_ABOVE {
                    return Owned::Partial;
                }
                Event::Groups(std::mem::take(&mut self.groups))
            }
            Frame::Typing { chat_id, user } => Event::Typing {
                chat: chat_id,
                from: user,
            },
            Frame::Pong { .. } => Event::Pong,
            Frame::Presence { user, online } => Event::Presence { user, online },
            other => Event::Error {
                code: 0,
                msg_id: [0; 16],
                text: format!("unexpected frame {other:?}"),
            },
        })
    }

    /// The highest seq seen per chat (what the client would persist to survive its own restart).
    pub fn last_seqs(&self) -> &HashMap<u64, u64> {
        &self.last_seq
    }

    /// Starts from a remembered position (a reconnecting client keeps its dedup state).
    pub fn set_last_seqs(&mut self, seqs: HashMap<u64, u64>) {
        self.last_seq = seqs;
    }
}

enum Owned {
    Welcome {
        user: u64,
        window: u16,
    },
    Event(Event),
    Duplicate,
    /// A GROUPS frame of an answer that goes on in the next one.
    Partial,
}
