//! The home role of a shard: the TCP sessions of the users homed here. It authenticates HELLO,
//! decodes frames, routes requests to the owner shards of their chats, and writes what owners
//! deliver into the sessions' bounded outbound buffers, with the backlog flow control.

use super::map::Map;
use super::msg::{
    ChatId, ConnId, Origin, Place, Seq, ShardMsg, Submit, SubmitPool, ToHome, ToOwner, UserId,
};
use super::ChatConfig;
use crate::engine::limits::TokenBucket;
use crate::engine::Now;
use proto::chat::{code, ids, kind, Encoder, Frame, MsgId};
use proto::token::{TokenError, TokenKind, TokenVerifier};
use std::collections::VecDeque;
use std::net::IpAddr;

/// The stored backlog being streamed to a session.
#[derive(Debug)]
struct Backlog {
    epoch: u64,
    /// Per owner shard: has answered its last request.
    answered: Vec<bool>,
    /// Per owner shard: has more to send.
    more: Vec<bool>,
}

/// Entries one owner may send in a backlog chunk: a session asks for more only while at most
/// half its window is unacknowledged, and the `owners` still streaming share the other half
/// (at least 1 each). Once the other owners have said they hold nothing, the one left gets
/// the whole half: a share of 1 / n_shards throughout made a backlog held by one owner of
/// many shards come an entry or two per round trip.
fn chunk_budget(window: u16, owners: usize) -> u16 {
    let share = usize::from(window) / (2 * owners.max(1));
    u16::try_from(share.max(1)).unwrap_or(u16::MAX)
}

#[derive(Debug)]
struct Session {
    ip: IpAddr,
    user: Option<UserId>,
    epoch: u64,
    opened_us: u64,
    out: Vec<u8>,
    /// When the outbound buffer last made progress while non-empty.
    stalled_since_us: Option<u64>,
    /// MSG frames sent and not yet acknowledged: (chat, seq).
    inflight: VecDeque<(ChatId, Seq)>,
    backlog: Option<Backlog>,
    /// Live deliveries were dropped for lack of room: fetch the backlog again when drained.
    resync: bool,
    /// Bytes of errors and ephemeral frames queued since the output was last empty.
    unread_small: usize,
    rate: TokenBucket,
    closing: bool,
    /// Users whose presence this session watches (at most `MAX_PRESENCE_WATCH`).
    watching: Vec<UserId>,
}

/// Watchers one user may have at most; further watches are answered once and not kept.
pub const MAX_WATCHERS_PER_USER: usize = 4096;

/// Counters of the home role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HomeCounters {
    /// Sessions accepted.
    pub accepted: u64,
    /// Sessions refused for the per-address cap.
    pub refused_per_ip: u64,
    /// HELLOs refused for the shard's signature budget ([`ChatConfig::hellos_per_s`]).
    pub hellos_refused: u64,
    /// Frames received.
    pub frames_in: u64,
    /// ERROR frames sent, by code (index = code).
    pub errors: [u64; 16],
    /// MSG frames queued to sessions.
    pub delivered: u64,
    /// Live deliveries dropped for a full outbound buffer (re-sent from the inbox later).
    pub deferred: u64,
}

/// A GROUPS answer being assembled: owners still to answer, groups so far.
type GroupList = (u16, Vec<(ChatId, Vec<UserId>)>);

/// The home role of one shard.
pub struct Home {
    shard: u16,
    n_shards: u16,
    /// This shard's address (what owners answer to).
    addr: u16,
    /// Chat owners in the cluster.
    n_owners: u16,
    cfg: ChatConfig,
    verifier: TokenVerifier,
    sessions: Map<ConnId, Session>,
    users: Map<UserId, ConnId>,
    per_ip: Map<IpAddr, u32>,
    /// The budget of HELLO signature checks ([`ChatConfig::hellos_per_s`]).
    hellos: TokenBucket,
    next_epoch: u64,
    /// Pending GROUPS answers: conn -> (owners still to answer, groups so far).
    group_lists: Map<ConnId, GroupList>,
    /// Users whose presence is kept here -> who watches it, and the watchers' homes.
    watchers: Map<UserId, Vec<(UserId, u16)>>,
    /// Users whose presence is kept here -> the homes where they have a session now.
    present: Map<UserId, Vec<u16>>,
    /// The relay is draining: sessions are ended, HELLOs refused.
    draining: bool,
    /// One of a cluster of linked relays (its users can be homed elsewhere).
    linked: bool,
    /// Messages to other shards (or this one).
    pub out: Vec<(u16, ShardMsg)>,
    /// Sessions with bytes to write.
    pub dirty: Vec<ConnId>,
    /// Boxes for submits (spent ones come back from the owner role, see `ChatShard`).
    pub submits: SubmitPool,
    /// Sessions to close once their output is flushed.
    pub closing: Vec<ConnId>,
    /// Counters.
    pub counters: HomeCounters,
}

impl Home {
    /// An empty home role.
    pub fn new(place: &Place, cfg: ChatConfig, verifier: TokenVerifier) -> Self {
        // Full from the start (time 0 is before any shard's clock).
        let hellos = TokenBucket::new(cfg.hellos_per_s, cfg.hellos_per_s, 0);
        Self {
            shard: place.shard(),
            n_shards: place.n_local,
            addr: place.addr,
            n_owners: place.n_owners(),
            cfg,
            verifier,
            sessions: Map::default(),
            users: Map::default(),
            per_ip: Map::default(),
            hellos,
            next_epoch: 1,
            group_lists: Map::default(),
            watchers: Map::default(),
            present: Map::default(),
            draining: false,
            linked: super::msg::addr_relay(place.addr) != 0,
            out: Vec::new(),
            dirty: Vec::new(),
            submits: SubmitPool::default(),
            closing: Vec::new(),
            counters: HomeCounters::default(),
        }
    }

    /// Open sessions.
    pub fn n_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// (watched user, watcher) pairs kept on this shard.
    pub fn n_watch_entries(&self) -> usize {
        self.watchers.values().map(Vec::len).sum()
    }

    /// A new connection from `ip`. Returns false (and queues an error and close) when the
    /// address already has its maximum of connections.
    pub fn accept(&mut self, now: Now, conn: ConnId, ip: IpAddr) -> bool {
        let n = self.per_ip.entry(ip).or_default();
        *n += 1;
        let over = *n > self.cfg.max_conns_per_ip;
        let s = Session {
            ip,
            user: None,
            epoch: 0,
            opened_us: now.mono_us,
            out: Vec::new(),
            stalled_since_us: None,
            inflight: VecDeque::new(),
            backlog: None,
            resync: false,
            unread_small: 0,
            rate: TokenBucket::new(self.cfg.msgs_per_s, self.cfg.msgs_burst, now.mono_us),
            closing: false,
            watching: Vec::new(),
        };
        self.sessions.insert(conn, s);
        if over {
            self.counters.refused_per_ip += 1;
            self.fatal(
                conn,
                code::TOO_MANY_CONNECTIONS,
                "too many connections from this address",
            );
            return false;
        }
        self.counters.accepted += 1;
        true
    }

    /// The connection is gone (closed by the peer or by us).
    pub fn closed(&mut self, conn: ConnId) {
        let Some(s) = self.sessions.remove(&conn) else {
            return;
        };
        if let Some(n) = self.per_ip.get_mut(&s.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&s.ip);
            }
        }
        self.group_lists.remove(&conn);
        if let Some(user) = s.user {
            if self.users.get(&user) == Some(&conn) {
                self.users.remove(&user);
                let home = self.addr;
                for owner in 0..self.n_owners {
                    self.out.push((
                        owner,
                        ShardMsg::ToOwner(ToOwner::BacklogCancel { user, home }),
                    ));
                }
                for &target in &s.watching {
                    self.send_watch(user, target, false);
                }
                self.send_presence(user, false);
            }
        }
    }

    /// The owner index of the shard that keeps `user`'s presence: wherever the user's session
    /// is (on any relay), its home reports there, and watchers register there.
    fn presence_keeper(&self, user: UserId) -> u16 {
        ids::owner_shard(user.0, self.n_owners)
    }

    fn send_watch(&mut self, watcher: UserId, target: UserId, watch: bool) {
        self.out.push((
            self.presence_keeper(target),
            ShardMsg::ToOwner(ToOwner::PresenceWatch {
                watcher,
                watcher_home: self.addr,
                target,
                watch,
            }),
        ));
    }

    fn send_presence(&mut self, user: UserId, online: bool) {
        self.out.push((
            self.presence_keeper(user),
            ShardMsg::ToOwner(ToOwner::PresenceState {
                user,
                home: self.addr,
                online,
            }),
        ));
    }

    /// A session of `user` opened or closed at `home`; kept here, announced to the watchers
    /// when the user comes online (its first home) or goes offline (its last).
    pub fn presence_state(&mut self, user: UserId, home: u16, online: bool) {
        let homes = self.present.entry(user).or_default();
        let was = !homes.is_empty();
        homes.retain(|&h| h != home);
        if online {
            homes.push(home);
        }
        let is = !homes.is_empty();
        if !is {
            self.present.remove(&user);
        }
        if was != is {
            self.announce(user, is);
        }
    }

    /// Relay `relay` is gone: the sessions it homed are offline (each watcher hears it for
    /// a user with no session left elsewhere), and its sessions' watches are dropped.
    fn relay_down(&mut self, relay: u8) {
        let on_it = |h: u16| super::msg::addr_relay(h) == relay;
        let users: Vec<UserId> = self
            .present
            .iter()
            .filter(|(_, homes)| homes.iter().any(|&h| on_it(h)))
            .map(|(&u, _)| u)
            .collect();
        for user in users {
            let homes: Vec<u16> = self.present[&user]
                .iter()
                .copied()
                .filter(|&h| on_it(h))
                .collect();
            for home in homes {
                self.presence_state(user, home, false);
            }
        }
        for ws in self.watchers.values_mut() {
            ws.retain(|&(_, home)| !on_it(home));
        }
        self.watchers.retain(|_, ws| !ws.is_empty());
    }

    /// Tells everyone watching `user` (its presence kept here) that it came online or went
    /// offline.
    fn announce(&mut self, user: UserId, online: bool) {
        if let Some(ws) = self.watchers.get(&user) {
            for &(to, home) in ws {
                self.out.push((
                    home,
                    ShardMsg::ToHome(ToHome::Presence { to, user, online }),
                ));
            }
        }
    }

    /// A session's new watch list: unwatch what left it, watch what joined it.
    /// Costs one request plus one per 16 users added or removed, so that alternating large
    /// sets cannot turn one request into hundreds of cross-shard messages.
    fn presence_watch(&mut self, now: Now, conn: ConnId, user: UserId, users: &[u8]) {
        let mut new: Vec<UserId> = proto::chat::u64s(users)
            .filter(|&u| u != 0)
            .map(UserId)
            .collect();
        new.sort_unstable();
        new.dedup();
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        let changed = new
            .iter()
            .filter(|t| s.watching.binary_search(t).is_err())
            .count()
            + s.watching
                .iter()
                .filter(|t| new.binary_search(t).is_err())
                .count();
        if !s.rate.try_take(1 + changed as u64 / 16, now.mono_us) {
            return self.error(conn, code::RATE_LIMITED, &[0; 16], "slow down");
        }
        let old = std::mem::replace(&mut s.watching, new.clone());
        for &t in old.iter().filter(|t| new.binary_search(t).is_err()) {
            self.send_watch(user, t, false);
        }
        for &t in new.iter().filter(|t| old.binary_search(t).is_err()) {
            self.send_watch(user, t, true);
        }
    }

    /// A watch request for `target`, its presence kept here: (un)register it and answer with
    /// the state.
    pub fn watch(&mut self, watcher: UserId, watcher_home: u16, target: UserId, watch: bool) {
        let ws = self.watchers.entry(target).or_default();
        ws.retain(|&(w, _)| w != watcher);
        if watch {
            if ws.len() < MAX_WATCHERS_PER_USER {
                ws.push((watcher, watcher_home));
            }
            let online = self.present.contains_key(&target);
            self.out.push((
                watcher_home,
                ShardMsg::ToHome(ToHome::Presence {
                    to: watcher,
                    user: target,
                    online,
                }),
            ));
        }
        if ws.is_empty() {
            self.watchers.remove(&target);
        }
    }

    /// Queues an answer the client needs (WELCOME, SENT, GROUPS, BACKLOG_END) for `conn`:
    /// bounded by the request rate, and GROUPS by [`Home::frame`]'s refusal of a GROUP_LIST
    /// while the output is full. Nothing goes after the ERROR of a closing session.
    fn queue(&mut self, conn: ConnId, write: impl FnOnce(&mut Encoder<'_>)) {
        self.queue_frame(conn, false, write);
    }

    /// Queues an error or an ephemeral frame (PONG, TYPING, PRESENCE). A session that has
    /// had `max_out_bytes` of these queued since its output was last empty is a peer that
    /// sends requests and does not read the answers: it gets ERROR 11 instead and is closed
    /// (its entries stay in its inbox). Entries and answers do not count: a large GROUPS
    /// answer waiting to be written does not close a session that reads.
    fn queue_capped(&mut self, conn: ConnId, write: impl FnOnce(&mut Encoder<'_>)) {
        self.queue_frame(conn, true, write);
    }

    fn queue_frame(&mut self, conn: ConnId, capped: bool, write: impl FnOnce(&mut Encoder<'_>)) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        if s.closing {
            return;
        }
        let was_empty = s.out.is_empty();
        if capped && s.unread_small >= self.cfg.max_out_bytes {
            self.counters.errors[usize::from(code::SLOW_READER)] += 1;
            Encoder::new(&mut s.out).error(code::SLOW_READER, &[0; 16], "not reading");
            s.closing = true;
            self.closing.push(conn);
        } else {
            let before = s.out.len();
            write(&mut Encoder::new(&mut s.out));
            if capped {
                s.unread_small += s.out.len() - before;
            }
        }
        if was_empty {
            self.dirty.push(conn);
        }
    }

    fn error(&mut self, conn: ConnId, code: u16, msg_id: &MsgId, text: &str) {
        self.counters.errors[usize::from(code).min(15)] += 1;
        self.queue_capped(conn, |e| e.error(code, msg_id, text));
    }

    /// Sends ERROR and closes the session once it is flushed; ignores further input.
    fn fatal(&mut self, conn: ConnId, code: u16, text: &str) {
        self.error(conn, code, &[0; 16], text);
        if let Some(s) = self.sessions.get_mut(&conn) {
            if !s.closing {
                s.closing = true;
                self.closing.push(conn);
            }
        }
    }

    /// The relay is stopping: every session is sent ERROR 13 ("unavailable, retry") after what
    /// it already has queued, and closed once that is flushed; input from now on is ignored.
    /// Not counted as an error.
    pub fn stop_sessions(&mut self) {
        self.end_sessions("the relay is stopping; reconnect");
    }

    /// While draining (ctl's word), every session is ended as at a stop and a HELLO is refused
    /// the same way: the user's home is elsewhere now (PROTOCOL.md 7.2). Returns whether the
    /// state changed.
    pub fn set_draining(&mut self, on: bool) -> bool {
        // A relay on its own keeps its sessions: its users' chats are stored here, and ctl
        // does not move them (it moves users only between the linked relays of a cluster).
        if on == self.draining || !self.linked {
            return false;
        }
        self.draining = on;
        if on {
            self.end_sessions("the relay is draining; reconnect");
        }
        true
    }

    fn end_sessions(&mut self, why: &'static str) {
        let conns: Vec<ConnId> = self.sessions.keys().copied().collect();
        for conn in conns {
            if self.sessions.get(&conn).is_some_and(|s| !s.closing) {
                self.queue(conn, |e| e.error(code::UNAVAILABLE, &[0; 16], why));
                if let Some(s) = self.sessions.get_mut(&conn) {
                    s.closing = true;
                }
                self.closing.push(conn);
            }
        }
    }

    /// Bytes received on `conn`: decodes and handles every whole frame. Returns how many bytes
    /// were consumed; the driver keeps the rest for the next read.
    pub fn read(&mut self, now: Now, conn: ConnId, data: &[u8]) -> usize {
        let mut used = 0;
        loop {
            if self.sessions.get(&conn).is_none_or(|s| s.closing) {
                return data.len();
            }
            match proto::chat::decode(&data[used..]) {
                Ok(None) => return used,
                Ok(Some((frame, n))) => {
                    used += n;
                    self.counters.frames_in += 1;
                    self.frame(now, conn, frame);
                }
                Err(e) => {
                    self.fatal(conn, e.code(), &e.to_string());
                    return data.len();
                }
            }
        }
    }

    fn frame(&mut self, now: Now, conn: ConnId, frame: Frame<'_>) {
        let Some(user) = self.sessions.get(&conn).and_then(|s| s.user) else {
            return match frame {
                Frame::Hello { version, token } => self.hello(now, conn, version, token),
                _ => self.fatal(conn, code::NOT_AUTHENTICATED, "HELLO first"),
            };
        };
        let from = Origin {
            user,
            home: self.addr,
            conn,
        };
        match frame {
            Frame::Hello { .. } => self.fatal(conn, code::BAD_FRAME, "HELLO twice"),
            Frame::Send {
                msg_id,
                chat_id,
                to,
                kind: k,
                ref_id,
                body,
            } => {
                if !self.take_rate(now, conn, &msg_id) {
                    return;
                }
                if !kind::client_may_send(k)
                    || (chat_id == 0) == (to == 0)
                    || body.len() > proto::chat::MAX_BODY
                {
                    return self.error(conn, code::INVALID, &msg_id, "invalid kind, chat or body");
                }
                let chat = if chat_id == 0 {
                    ChatId::direct(user, UserId(to))
                } else {
                    ChatId(chat_id)
                };
                let to = (to != 0).then_some(UserId(to));
                let s = Submit {
                    from,
                    msg_id,
                    chat,
                    to,
                    kind: k,
                    ref_id,
                    body: crate::chat::records::Body::from_slice(body),
                };
                let s = self.submits.boxed(s);
                self.route_to_owner(chat, ShardMsg::ToOwner(ToOwner::Submit(s)));
            }
            Frame::Ack { pairs } => {
                // One request, and one more per 64 pairs (each is a message to an owner and
                // a record). A refused ACK is not applied: acknowledge again later.
                let n_pairs = (pairs.len() / 16) as u64;
                if !self.take_quietly(now, conn, 1 + n_pairs / 64) {
                    // Beyond the rate, an ACK that takes in the oldest entry this session was
                    // sent still goes (refusing it would hold back the client's backlog, which
                    // waits for acknowledgements); one that acknowledges nothing sent is
                    // refused.
                    let oldest = self.sessions.get(&conn).and_then(|s| s.inflight.front());
                    let needed = oldest.is_some_and(|&(chat, seq)| {
                        proto::chat::ack_pairs(pairs)
                            .any(|(c, q)| ChatId(c) == chat && Seq(q) >= seq)
                    });
                    if !needed {
                        return self.error(conn, code::RATE_LIMITED, &[0; 16], "slow down");
                    }
                }
                for (chat, seq) in proto::chat::ack_pairs(pairs) {
                    let (chat, seq) = (ChatId(chat), Seq(seq));
                    self.route_to_owner(chat, ShardMsg::ToOwner(ToOwner::Ack { user, chat, seq }));
                    if let Some(s) = self.sessions.get_mut(&conn) {
                        s.inflight.retain(|&(c, q)| c != chat || q > seq);
                    }
                }
                self.pull_backlog(conn);
            }
            Frame::GroupCreate { msg_id, members } => {
                if !self.take_rate(now, conn, &msg_id) {
                    return;
                }
                if members.len() / 8 > self.cfg.max_group_members {
                    return self.error(conn, code::INVALID, &msg_id, "group too large");
                }
                let chat = ChatId::group(user, &msg_id);
                let members = proto::chat::u64s(members).map(UserId).collect();
                self.route_to_owner(
                    chat,
                    ShardMsg::ToOwner(ToOwner::CreateGroup {
                        from,
                        msg_id,
                        chat,
                        members,
                    }),
                );
            }
            Frame::GroupAdd {
                msg_id,
                chat_id,
                user: target,
            }
            | Frame::GroupRemove {
                msg_id,
                chat_id,
                user: target,
            } => {
                if !self.take_rate(now, conn, &msg_id) {
                    return;
                }
                let add = matches!(frame, Frame::GroupAdd { .. });
                let chat = ChatId(chat_id);
                self.route_to_owner(
                    chat,
                    ShardMsg::ToOwner(ToOwner::ChangeMember {
                        from,
                        msg_id,
                        chat,
                        target: UserId(target),
                        add,
                    }),
                );
            }
            Frame::GroupLeave { msg_id, chat_id } => {
                if !self.take_rate(now, conn, &msg_id) {
                    return;
                }
                let chat = ChatId(chat_id);
                self.route_to_owner(
                    chat,
                    ShardMsg::ToOwner(ToOwner::ChangeMember {
                        from,
                        msg_id,
                        chat,
                        target: user,
                        add: false,
                    }),
                );
            }
            Frame::GroupList => {
                if !self.take_rate(now, conn, &[0; 16]) {
                    return;
                }
                // An answer can be large: not another while the output is full.
                if self
                    .sessions
                    .get(&conn)
                    .is_some_and(|s| s.out.len() > self.cfg.max_out_bytes)
                {
                    return self.error(conn, code::UNAVAILABLE, &[0; 16], "read first, then ask");
                }
                if self
                    .group_lists
                    .insert(conn, (self.n_owners, Vec::new()))
                    .is_none()
                {
                    for owner in 0..self.n_owners {
                        self.out
                            .push((owner, ShardMsg::ToOwner(ToOwner::ListGroups { from })));
                    }
                }
            }
            Frame::Typing { chat_id, user: to } => {
                // A TYPING to a group fans out to every member: it costs a request.
                if !self.take_quietly(now, conn, 1) {
                    return;
                }
                let chat = ChatId(chat_id);
                if chat_id != 0 && chat.is_group() {
                    self.route_to_owner(
                        chat,
                        ShardMsg::ToOwner(ToOwner::TypingInGroup { from: user, chat }),
                    );
                } else if to != 0 {
                    let to = UserId(to);
                    let chat = ChatId::direct(user, to);
                    self.route_to_owner(
                        chat,
                        ShardMsg::ToOwner(ToOwner::TypingDirect {
                            from: user,
                            to,
                            chat,
                        }),
                    );
                }
            }
            Frame::Ping { nonce } => {
                if self.take_quietly(now, conn, 1) {
                    self.queue_capped(conn, |e| e.pong(nonce));
                }
            }
            Frame::PresenceWatch { users } => self.presence_watch(now, conn, user, users),
            _ => self.fatal(conn, code::UNKNOWN_TYPE, "not a client frame"),
        }
    }

    fn take_rate(&mut self, now: Now, conn: ConnId, msg_id: &MsgId) -> bool {
        let ok = self.take_quietly(now, conn, 1);
        if !ok {
            self.error(conn, code::RATE_LIMITED, msg_id, "slow down");
        }
        ok
    }

    /// Takes `n` of the session's request rate without answering when there is none left
    /// (ephemeral frames, TYPING and PING, are then dropped).
    fn take_quietly(&mut self, now: Now, conn: ConnId, n: u64) -> bool {
        self.sessions
            .get_mut(&conn)
            .is_some_and(|s| s.rate.try_take(n, now.mono_us))
    }

    fn route_to_owner(&mut self, chat: ChatId, msg: ShardMsg) {
        self.out.push((chat.owner_shard(self.n_owners), msg));
    }

    /// Whether `c` is a chat token for a user homed on this shard. User 0 means "nobody" on
    /// the wire (TYPING and SEND use it so).
    fn is_chat_token_here(&self, c: &proto::token::Claims) -> bool {
        let user = c.participant_id;
        user != 0
            && c.kind == TokenKind::User
            && c.scope_id == user
            && c.permissions.contains(proto::token::Permissions::CHAT)
            && c.shard_idx == self.shard
            && ids::home_shard(user, self.n_shards) == self.shard
    }

    fn hello(&mut self, now: Now, conn: ConnId, version: u16, token: &[u8]) {
        if version != proto::chat::VERSION {
            return self.fatal(conn, code::BAD_VERSION, "unsupported version");
        }
        if self.draining {
            return self.fatal(conn, code::UNAVAILABLE, "the relay is draining; reconnect");
        }
        // What the token claims is checked first, for free; only a token that could pass
        // spends the shard's budget of signature checks.
        match TokenVerifier::peek_text(token) {
            Ok(c) if c.expires_at <= now.unix_s && self.is_chat_token_here(&c) => {
                return self.fatal(conn, code::BAD_TOKEN, &TokenError::Expired.to_string())
            }
            Ok(c) if self.is_chat_token_here(&c) => {}
            Ok(_) => {
                return self.fatal(
                    conn,
                    code::BAD_TOKEN,
                    "token is not a chat token for this shard",
                )
            }
            Err(e) => return self.fatal(conn, code::BAD_TOKEN, &e.to_string()),
        }
        if !self.hellos.try_take(1, now.mono_us) {
            self.counters.hellos_refused += 1;
            return self.fatal(
                conn,
                code::UNAVAILABLE,
                "too many sign-ins on this shard right now; retry in a second",
            );
        }
        // The verified claims are the ones just checked (the same bytes, decoded alike).
        let claims = match self.verifier.verify_text(token, now.unix_s) {
            Ok(c) => c,
            Err(e) => return self.fatal(conn, code::BAD_TOKEN, &e.to_string()),
        };
        let user = claims.participant_id;
        // User 0 means "nobody" on the wire (TYPING and SEND use it so).
        let user = UserId(user);
        // One session per user: a new one replaces the old (and the user stays online).
        match self.users.insert(user, conn) {
            Some(old) => {
                // The old session's watches go with it.
                let watched = self
                    .sessions
                    .get_mut(&old)
                    .map(|s| std::mem::take(&mut s.watching))
                    .unwrap_or_default();
                for t in watched {
                    self.send_watch(user, t, false);
                }
                self.fatal(old, code::INVALID, "replaced by a new session");
            }
            None => self.send_presence(user, true),
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let s = self
            .sessions
            .get_mut(&conn)
            .expect("hello on a live session");
        s.user = Some(user);
        s.epoch = epoch;
        let window = self.cfg.window;
        self.queue(conn, |e| e.welcome(user.0, window));
        self.start_backlog(conn);
    }

    fn start_backlog(&mut self, conn: ConnId) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let n = usize::from(self.n_owners);
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        let Some(user) = s.user else { return };
        if s.closing {
            return;
        }
        s.epoch = epoch;
        s.resync = false;
        s.backlog = Some(Backlog {
            epoch,
            answered: vec![false; n],
            more: vec![false; n],
        });
        let budget = chunk_budget(self.cfg.window, n);
        for owner in 0..self.n_owners {
            self.out.push((
                owner,
                ShardMsg::ToOwner(ToOwner::BacklogStart {
                    user,
                    epoch,
                    home: self.addr,
                    budget,
                }),
            ));
        }
    }

    /// Asks owners with more backlog for their next chunk once the window has room.
    fn pull_backlog(&mut self, conn: ConnId) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        let (Some(user), Some(b)) = (s.user, s.backlog.as_mut()) else {
            return;
        };
        if s.resync
            || s.inflight.len() > usize::from(self.cfg.window) / 2
            || s.out.len() > self.cfg.max_out_bytes / 2
        {
            return;
        }
        // Owners not done yet: each has at most one chunk outstanding, sized when it was
        // asked; this count only falls during a backlog, so the chunks outstanding at once
        // stay within half the window.
        let left = (0..b.answered.len())
            .filter(|&o| !b.answered[o] || b.more[o])
            .count();
        let budget = chunk_budget(self.cfg.window, left);
        for owner in 0..usize::from(self.n_owners) {
            if b.answered[owner] && b.more[owner] {
                b.answered[owner] = false;
                self.out.push((
                    owner as u16,
                    ShardMsg::ToOwner(ToOwner::BacklogMore {
                        user,
                        home: self.addr,
                        epoch: b.epoch,
                        budget,
                    }),
                ));
            }
        }
    }

    /// Handles a message addressed to the home role.
    pub fn handle(&mut self, msg: ToHome) {
        match msg {
            ToHome::Sent {
                to,
                msg_id,
                chat,
                seq,
                spent,
            } => {
                if let Some(b) = spent {
                    self.submits.give_back(b);
                }
                if self.is_current(to) {
                    self.queue(to.conn, |e| e.sent(&msg_id, chat.0, seq.0));
                }
            }
            ToHome::Failed {
                to,
                msg_id,
                code,
                text,
            } => {
                if self.is_current(to) {
                    self.error(to.conn, code, &msg_id, text);
                }
            }
            ToHome::Deliver {
                user,
                chat,
                seq,
                frame,
                backlog,
            } => self.deliver(user, chat, seq, frame.as_bytes(), backlog),
            ToHome::BacklogChunk {
                user,
                epoch,
                owner,
                more,
            } => self.backlog_chunk(user, epoch, owner, more),
            ToHome::GroupsPart { to, groups, last } => {
                let Some((left, acc)) = self.group_lists.get_mut(&to.conn) else {
                    return;
                };
                acc.extend(groups);
                if !last {
                    return;
                }
                *left = left.saturating_sub(1);
                if *left == 0 {
                    let (_, acc) = self.group_lists.remove(&to.conn).expect("present above");
                    // To the wire's ids (in place: same layout, no allocation).
                    let acc: Vec<(u64, Vec<u64>)> = acc
                        .into_iter()
                        .map(|(chat, members)| (chat.0, members.into_iter().map(|u| u.0).collect()))
                        .collect();
                    self.queue(to.conn, |e| e.groups(&acc));
                }
            }
            ToHome::Typing { from, chat, to } => {
                if let Some(&conn) = self.users.get(&to) {
                    let peer = if chat.is_group() { chat.0 } else { 0 };
                    self.queue_capped(conn, |e| e.typing(peer, from.0));
                }
            }
            ToHome::LinkUp => self.relink(),
            ToHome::RelayDown(relay) => self.relay_down(relay),
            ToHome::Presence { to, user, online } => {
                // Only to a session that still watches `user` (an unwatch may be in flight).
                if let Some(&conn) = self.users.get(&to) {
                    if self
                        .sessions
                        .get(&conn)
                        .is_some_and(|s| s.watching.binary_search(&user).is_ok())
                    {
                        self.queue_capped(conn, |e| e.presence(user.0, online));
                    }
                }
            }
        }
    }

    /// A link to another relay came up (again): requests, deliveries and acknowledgements
    /// that crossed it while it was down may be lost. Every session restarts its backlog (the
    /// client ignores what it has already seen; what it missed is still stored at its owner,
    /// since nothing is deleted before its acknowledgement), and reports its presence and
    /// watches again.
    fn relink(&mut self) {
        let conns: Vec<ConnId> = self.users.values().copied().collect();
        for conn in conns {
            let Some(s) = self.sessions.get(&conn) else {
                continue;
            };
            let (Some(user), false) = (s.user, s.closing) else {
                continue;
            };
            let watching = s.watching.clone();
            self.start_backlog(conn);
            self.send_presence(user, true);
            for t in watching {
                self.send_watch(user, t, true);
            }
        }
    }

    fn is_current(&self, o: Origin) -> bool {
        self.users.get(&o.user) == Some(&o.conn)
    }

    fn deliver(
        &mut self,
        user: UserId,
        chat: ChatId,
        seq: Seq,
        frame: &[u8],
        backlog: Option<u64>,
    ) {
        let Some(&conn) = self.users.get(&user) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        if backlog.is_some_and(|e| e != s.epoch) || s.closing {
            return;
        }
        // A live entry sent before this session's backlog request reached its owner: the
        // owner's stream will carry it, in order. Delivering it now would put it ahead of
        // older entries still to come from the stream.
        let owner = usize::from(chat.owner_shard(self.n_owners));
        if backlog.is_none()
            && s.backlog
                .as_ref()
                .is_some_and(|b| !b.answered[owner] || b.more[owner])
        {
            return;
        }
        // The entry is safe in its owner's inbox; fetch it again once the reader catches up.
        // Once one is deferred, so is every later one, even one small enough to fit: queued,
        // its seq would pass the deferred entry's, and the client (which ignores seqs at or
        // below the highest it has seen) would drop that one when the resync brings it, and
        // acknowledge it away.
        // (An entry larger than the limit still goes when the output is empty.)
        if s.resync || (!s.out.is_empty() && s.out.len() + frame.len() > self.cfg.max_out_bytes) {
            s.resync = true;
            self.counters.deferred += 1;
            return;
        }
        let was_empty = s.out.is_empty();
        s.out.extend_from_slice(frame);
        s.inflight.push_back((chat, seq));
        // Bounded: entries the client never acknowledges only matter for the backlog window.
        if s.inflight.len() > 4 * usize::from(self.cfg.window) {
            s.inflight.pop_front();
        }
        self.counters.delivered += 1;
        if was_empty {
            self.dirty.push(conn);
        }
    }

    fn backlog_chunk(&mut self, user: UserId, epoch: u64, owner: u16, more: bool) {
        let Some(&conn) = self.users.get(&user) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        let Some(b) = s.backlog.as_mut().filter(|b| b.epoch == epoch) else {
            return;
        };
        // The owner index comes from another shard, maybe another relay: checked.
        let Some(answered) = b.answered.get_mut(usize::from(owner)) else {
            return;
        };
        *answered = true;
        b.more[usize::from(owner)] = more;
        if b.answered.iter().all(|&a| a) && !b.more.iter().any(|&m| m) {
            s.backlog = None;
            self.queue(conn, |e| e.backlog_end());
        } else {
            self.pull_backlog(conn);
        }
    }

    /// The bytes queued for `conn`.
    pub fn output(&self, conn: ConnId) -> &[u8] {
        self.sessions.get(&conn).map_or(&[], |s| &s.out)
    }

    /// The driver wrote `n` bytes of `conn`'s output.
    pub fn written(&mut self, now: Now, conn: ConnId, n: usize) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        s.out.drain(..n.min(s.out.len()));
        s.stalled_since_us = (!s.out.is_empty()).then_some(now.mono_us);
        if s.out.is_empty() {
            s.unread_small = 0;
        }
        // A deferral means a fresh backlog from the inbox once the output has drained, also
        // when one is running (the new epoch replaces its stream; what it would still send
        // would only be deferred too).
        let resync = s.resync && s.out.len() < self.cfg.max_out_bytes / 2;
        if resync {
            self.start_backlog(conn);
        } else {
            self.pull_backlog(conn);
        }
    }

    /// Closes sessions that did not authenticate in time and readers that stopped reading.
    pub fn timeout(&mut self, now: Now) {
        let mut late = Vec::new();
        for (&conn, s) in &mut self.sessions {
            if s.closing {
                continue;
            }
            if s.user.is_none()
                && now.mono_us.saturating_sub(s.opened_us) >= self.cfg.hello_timeout_us
            {
                late.push((conn, code::HELLO_TIMEOUT, "no HELLO in time"));
            } else if !s.out.is_empty() {
                let since = *s.stalled_since_us.get_or_insert(now.mono_us);
                if now.mono_us.saturating_sub(since) >= self.cfg.slow_reader_timeout_us {
                    late.push((conn, code::SLOW_READER, "not reading"));
                }
            }
        }
        for (conn, code, text) in late {
            self.fatal(conn, code, text);
        }
    }
}
