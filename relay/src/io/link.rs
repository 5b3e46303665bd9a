//! Relay links: chat messages between shards on different relays (DESIGN.md section 8,
//! PROTOCOL.md section 8), on one thread per relay, off the shards' threads.
//!
//! Every relay dials every other relay of its cluster once and sends on that connection only;
//! it reads on the connections the others dialed. A dialer first sends a HELLO with its link
//! token (signed by ctl for its relay number); the acceptor verifies it with ctl's public key
//! and refuses (closes, counts) anything else, before reading a single message.
//!
//! Shards hand the thread messages for other relays by their link rings
//! ([`super::mailbox::link_ports`]); the thread encodes them ([`crate::chat::wire`]) into one
//! buffer per destination relay and writes each buffer with one `write` per round, so a busy
//! link carries many frames per system call (Discord's Manifold pattern; counted in
//! [`LinkStats`]). Bounds: a destination's buffer holds at most [`OUT_LIMIT`] bytes; past it the
//! thread stops taking from the shard that filled it (the shard spills and then stops reading
//! its clients, as for a full ring between its own shards). A link's read buffer holds one
//! frame of at most [`crate::chat::wire::MAX_LINK_FRAME`]; a frame for a shard whose ring is
//! full is held and the link is not read until it fits (TCP pushes back on the sender).
//!
//! A link being dialed queues what is for it, within the same bound: its peer resyncs on the
//! HELLO, which may arrive before this thread sees the dial finish, and the answers to that
//! resync must not be dropped. A destination whose link is down (not being dialed, refused,
//! broken; a failed dial's queue included): requests that would be
//! stored (SEND, group changes) are answered at once with ERROR 13 (retryable, not stored; the
//! client retries with the same message id, so the owner's deduplication keeps it
//! exactly-once); everything else is dropped. A broken link's unsent buffer is answered the
//! same way. Nothing acknowledged is lost by this: an entry lives in its owner's log until its
//! recipient acknowledges it. So when a link comes up (again), in either direction, every
//! home of this relay restarts its sessions' backlogs ([`ToHome::LinkUp`]): what was dropped
//! is streamed again from the owners, and clients ignore what they already have. A link from
//! a relay closing (not replaced by a newer one) tells every home that relay is down
//! ([`ToHome::RelayDown`]): the presence its sessions had here goes offline. A dialer
//! retries with a backoff doubling from 100 ms to 5 s; connecting runs on a short-lived
//! thread, so a dead peer never stalls the others.

use super::mailbox::LinkHub;
use crate::chat::msg::{addr_relay, addr_shard, ShardMsg, ToHome};
use crate::chat::wire;
use proto::token::{TokenKind, TokenVerifier};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes queued for one destination relay at most.
pub const OUT_LIMIT: usize = 4 << 20;
/// Time a dialer has to send its HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// The first bytes of a link HELLO.
const MAGIC: &[u8; 4] = b"RLNK";
/// Link protocol version.
const LINK_VERSION: u16 = 1;
/// Connections being dialed or greeted at most (a stranger's connections beyond it are
/// closed at once).
const MAX_HANDSHAKES: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What ctl told this relay about its cluster: its number, its link token, its peers.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    /// This relay's link token (text), presented when dialing.
    pub token: String,
    /// The other relays: number -> link address.
    pub peers: BTreeMap<u8, SocketAddr>,
}

/// Counters of the link thread, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Frames written to links.
    pub frames_out: AtomicU64,
    /// `write` calls that carried them.
    pub writes: AtomicU64,
    /// Frames read from links and handed to shards.
    pub frames_in: AtomicU64,
    /// Connections refused: no or a bad HELLO, or a bad token.
    pub refused: AtomicU64,
    /// Links closed for a frame that does not decode or is for no shard of this relay.
    pub bad_frames: AtomicU64,
    /// Requests answered with ERROR 13 because their owner's relay was unreachable.
    pub bounced: AtomicU64,
    /// Messages dropped because their relay was unreachable (restored by the resync).
    pub dropped: AtomicU64,
    /// Links (re)established, both directions.
    pub ups: AtomicU64,
    /// Outbound links up now.
    pub up_now: AtomicU64,
}

/// An outbound link: to one relay.
struct Out {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    connecting: bool,
    next_try: Instant,
    backoff: Duration,
    buf: Vec<u8>,
    frames: u64,
    /// The last poll saw it readable or hung up: an outbound link is never read, so its peer
    /// closed it.
    hup: bool,
    /// Bytes at the front of `buf` that finish a frame already partly written.
    partial: usize,
    /// Since when the buffer has been full (a peer that stopped reading is cut off).
    full_since: Option<Instant>,
    /// When the link came up (its backoff is reset once it has stayed up a while).
    up_since: Option<Instant>,
}

/// An inbound link: from one relay, once it has said HELLO.
struct In {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the frames not yet taken start in `buf` (consumed bytes go once per read, not
    /// once per frame: a read carries hundreds).
    start: usize,
    relay: Option<u8>,
    deadline: Instant,
    /// A message for a shard whose ring was full.
    held: Option<(usize, ShardMsg)>,
    /// The last poll saw it readable (or it is new): worth a `read`.
    readable: bool,
    /// A newer link from the same relay replaced it: closed at the next read.
    replaced: bool,
}

/// A dialer's result: the relay and its connection, greeted.
type Dialed = (u8, io::Result<TcpStream>);

/// The link thread of one relay.
pub struct Links {
    hub: LinkHub,
    listener: TcpListener,
    dir: Arc<Mutex<Directory>>,
    verifier: TokenVerifier,
    me: u8,
    outs: BTreeMap<u8, Out>,
    ins: Vec<In>,
    /// Per shard: a message taken from its ring and not yet placed.
    stash: Vec<Option<(u16, ShardMsg)>>,
    /// Per shard: messages for it that found its ring full (answers and link-up notices;
    /// at most one per message taken, and taking stops while any waits).
    to_shard: Vec<VecDeque<ShardMsg>>,
    pushed: Vec<bool>,
    dialed: (mpsc::Sender<Dialed>, mpsc::Receiver<Dialed>),
    stats: Arc<LinkStats>,
    stop: Arc<AtomicBool>,
    /// The last poll saw the listener readable (or nothing has polled yet).
    accept_ready: bool,
    /// When the directory was last read for dialing.
    last_dial: Instant,
    /// The cluster's chat owners (to answer a backlog request for an unreachable one).
    owners: Arc<[u16]>,
}

impl Links {
    /// The link thread of relay number `me`, on `listener` (non-blocking).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        hub: LinkHub,
        listener: TcpListener,
        dir: Arc<Mutex<Directory>>,
        verifier: TokenVerifier,
        me: u8,
        owners: Arc<[u16]>,
        stats: Arc<LinkStats>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let n = hub.to_shards.len();
        Ok(Self {
            hub,
            listener,
            dir,
            verifier,
            me,
            outs: BTreeMap::new(),
            ins: Vec::new(),
            stash: (0..n).map(|_| None).collect(),
            to_shard: (0..n).map(|_| VecDeque::new()).collect(),
            pushed: vec![false; n],
            dialed: mpsc::channel(),
            stats,
            stop,
            accept_ready: true,
            last_dial: Instant::now(),
            owners,
        })
    }

    /// Runs until the stop flag is set.
    pub fn run(mut self) {
        let mut last_dir = Instant::now() - Duration::from_secs(1);
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now.duration_since(last_dir) >= Duration::from_millis(250) {
                last_dir = now;
                self.refresh_directory(now);
            }
            self.dial(now);
            self.take_dialed(now);
            self.accept(now);
            self.take_from_shards(now);
            self.write(now);
            self.read(now);
            self.push_to_shards();
            self.sleep(now);
        }
    }

    fn refresh_directory(&mut self, now: Instant) {
        let peers = self.dir.lock().expect("directory lock").peers.clone();
        for (&relay, &addr) in &peers {
            if relay == self.me {
                continue;
            }
            let out = self.outs.entry(relay).or_insert_with(|| Out {
                addr,
                stream: None,
                connecting: false,
                next_try: now,
                backoff: BACKOFF_MIN,
                buf: Vec::new(),
                frames: 0,
                hup: false,
                partial: 0,
                full_since: None,
                up_since: None,
            });
            out.addr = addr;
        }
    }

    fn dial(&mut self, now: Instant) {
        // Nothing to dial, or dialed less than 50 ms ago: no lock, no token copy.
        let due = self
            .outs
            .values()
            .any(|o| o.stream.is_none() && !o.connecting && now >= o.next_try);
        if !due || now.duration_since(self.last_dial) < Duration::from_millis(50) {
            return;
        }
        self.last_dial = now;
        let token = self.dir.lock().expect("directory lock").token.clone();
        for (&relay, out) in &mut self.outs {
            if out.stream.is_some() || out.connecting || now < out.next_try || token.is_empty() {
                continue;
            }
            out.connecting = true;
            let (addr, tx, me, token) = (out.addr, self.dialed.0.clone(), self.me, token.clone());
            let waker = self.hub.waker.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("link-dial-{relay}"))
                .spawn(move || {
                    let r = dial_one(addr, me, &token);
                    let _ = tx.send((relay, r));
                    waker.wake();
                });
            if spawned.is_err() {
                out.connecting = false;
                out.next_try = now + out.backoff;
            }
        }
    }

    fn take_dialed(&mut self, now: Instant) {
        while let Ok((relay, r)) = self.dialed.1.try_recv() {
            let Some(out) = self.outs.get_mut(&relay) else {
                continue;
            };
            out.connecting = false;
            match r.and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = set_user_timeout(&s);
                    eprintln!("relay: link to relay {relay} ({}) up", out.addr);
                    out.stream = Some(s);
                    out.up_since = Some(now);
                    out.partial = 0;
                    out.full_since = None;
                    self.stats.up_now.fetch_add(1, Ordering::Relaxed);
                    self.link_up();
                }
                Err(e) => {
                    if out.backoff == BACKOFF_MIN {
                        eprintln!("relay: link to relay {relay} ({}): {e}", out.addr);
                    }
                    // What was queued while dialing is answered as for a broken link.
                    self.down(relay, now);
                }
            }
        }
    }

    /// Tells every shard that a link came up: its homes resync their sessions (once for any
    /// number of links that came up before the shard took the notice).
    fn link_up(&mut self) {
        self.stats.ups.fetch_add(1, Ordering::Relaxed);
        for q in &mut self.to_shard {
            if !matches!(q.back(), Some(ShardMsg::ToHome(ToHome::LinkUp))) {
                q.push_back(ShardMsg::ToHome(ToHome::LinkUp));
            }
        }
    }

    /// Tells every shard that relay `relay`'s link closed: its homes' sessions are offline
    /// until they open again (the presence its users had here would otherwise stay).
    fn relay_down(&mut self, relay: u8) {
        for q in &mut self.to_shard {
            q.push_back(ShardMsg::ToHome(ToHome::RelayDown(relay)));
        }
    }

    fn accept(&mut self, now: Instant) {
        if !std::mem::take(&mut self.accept_ready) {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((s, from)) => {
                    let greeting = self.ins.iter().filter(|i| i.relay.is_none()).count();
                    if greeting >= MAX_HANDSHAKES {
                        // Full of strangers' connections: a known peer's address takes the
                        // slot of the oldest one that is not a peer's.
                        let known = self.known_peer(&from);
                        let victim = known
                            .then(|| {
                                self.ins.iter().position(|l| {
                                    l.relay.is_none()
                                        && !l.stream.peer_addr().is_ok_and(|a| self.known_peer(&a))
                                })
                            })
                            .flatten();
                        match victim {
                            Some(i) => {
                                self.ins.swap_remove(i);
                                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {
                                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = s.set_nodelay(true);
                    let _ = set_user_timeout(&s);
                    self.ins.push(In {
                        stream: s,
                        buf: Vec::new(),
                        start: 0,
                        relay: None,
                        deadline: now + HELLO_TIMEOUT,
                        held: None,
                        readable: true,
                        replaced: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }

    /// Takes messages from the shards' rings into the destinations' buffers.
    fn take_from_shards(&mut self, _now: Instant) {
        for i in 0..self.stash.len() {
            let mut took = false;
            loop {
                // A full ring back to a shard stops taking: each message may need an answer.
                if self.to_shard.iter().any(|q| q.len() > 1024) {
                    break;
                }
                let Some((dest, m)) = self.stash[i]
                    .take()
                    .or_else(|| self.hub.from_shards[i].pop())
                else {
                    break;
                };
                took = true;
                let relay = addr_relay(dest);
                match self.outs.get_mut(&relay) {
                    // A link being dialed queues: its peer learns that it is up (and resyncs
                    // its homes) from its HELLO, which may come before this thread sees the
                    // dial finish. Dropping the answers to that resync would leave the peer's
                    // sessions waiting for backlogs that never come.
                    Some(out) if out.stream.is_some() || out.connecting => {
                        if out.buf.len() >= OUT_LIMIT {
                            out.full_since.get_or_insert(Instant::now());
                            self.stash[i] = Some((dest, m));
                            break;
                        }
                        wire::encode(&mut out.buf, dest, &m);
                        out.frames += 1;
                    }
                    _ => self.unreachable(dest, m),
                }
            }
            if took {
                // It may sleep waiting for room in its ring.
                self.hub.wake_shard(i);
            }
        }
    }

    /// Whether `addr` is a peer relay's (by IP).
    fn known_peer(&self, addr: &SocketAddr) -> bool {
        self.dir
            .lock()
            .map(|d| d.peers.values().any(|p| p.ip() == addr.ip()))
            .unwrap_or(false)
    }

    /// A message for the shard at `dest`, on a relay that cannot be reached now.
    fn unreachable(&mut self, dest: u16, m: ShardMsg) {
        let owner = self
            .owners
            .iter()
            .position(|&a| a == dest)
            .map(|i| i as u16);
        match wire::unreachable(m, owner) {
            Some((home, answer)) if addr_relay(home) == self.me => {
                self.stats.bounced.fetch_add(1, Ordering::Relaxed);
                if let Some(q) = self.to_shard.get_mut(usize::from(addr_shard(home))) {
                    q.push_back(answer);
                }
            }
            _ => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn write(&mut self, now: Instant) {
        let mut broken = Vec::new();
        for (&relay, out) in &mut self.outs {
            let Some(s) = out.stream.as_mut() else {
                continue;
            };
            if out.buf.is_empty() {
                continue;
            }
            match s.write(&out.buf) {
                Ok(n) => {
                    self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    out.partial = partial_after(&out.buf, out.partial, n);
                    out.buf.drain(..n);
                    if out.buf.len() < OUT_LIMIT {
                        out.full_since = None;
                    }
                    if out.buf.is_empty() {
                        self.stats
                            .frames_out
                            .fetch_add(std::mem::take(&mut out.frames), Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("relay: link to relay {relay}: {e}");
                    broken.push(relay);
                }
            }
        }
        // An outbound link is never read: a readable one has been closed by its peer. One
        // whose buffer stayed full for 5 s has a peer that stopped reading: cut off, its
        // requests answered, and the resync after the next link-up restores the rest.
        for (&relay, out) in &mut self.outs {
            if out.stream.is_none() {
                continue;
            }
            if std::mem::take(&mut out.hup)
                || out
                    .full_since
                    .is_some_and(|t| now.duration_since(t) >= STALL_LIMIT)
            {
                broken.push(relay);
            }
            // Backoff starts over only for a link that stayed up (one refused at once does not
            // redial every 100 ms).
            if out
                .up_since
                .is_some_and(|t| now.duration_since(t) >= Duration::from_secs(5))
            {
                out.backoff = BACKOFF_MIN;
            }
        }
        broken.sort_unstable();
        broken.dedup();
        for relay in broken {
            self.down(relay, now);
        }
    }

    /// The link to `relay` broke: its unsent frames are answered as unreachable.
    fn down(&mut self, relay: u8, now: Instant) {
        let Some(out) = self.outs.get_mut(&relay) else {
            return;
        };
        if out.stream.take().is_some() {
            self.stats.up_now.fetch_sub(1, Ordering::Relaxed);
        }
        out.next_try = now + out.backoff;
        out.backoff = (out.backoff * 2).min(BACKOFF_MAX);
        out.up_since = None;
        out.full_since = None;
        out.frames = 0;
        let buf = std::mem::take(&mut out.buf);
        // The frame partly written (if any) went; the rest is answered.
        let mut at = std::mem::take(&mut out.partial).min(buf.len());
        while let Ok(Some(n)) = wire::frame_len(&buf[at..]) {
            if let Ok((dest, m)) = wire::decode(&buf[at..at + n]) {
                self.unreachable(dest, m);
            }
            at += n;
        }
    }

    fn read(&mut self, now: Instant) {
        let n_shards = self.hub.to_shards.len();
        let mut i = 0;
        while i < self.ins.len() {
            match self.read_one(i, now, n_shards) {
                Ok(()) => i += 1,
                Err(why) => {
                    let link = self.ins.swap_remove(i);
                    match link.relay {
                        Some(r) => {
                            if why.starts_with("bad link frame")
                                || why.starts_with("a frame for")
                                || why == "frame too large"
                            {
                                self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                            }
                            eprintln!("relay: link from relay {r} closed: {why}");
                            if !link.replaced {
                                self.relay_down(r);
                            }
                        }
                        None => {
                            self.stats.refused.fetch_add(1, Ordering::Relaxed);
                            eprintln!("relay: link refused: {why}");
                        }
                    }
                }
            }
        }
    }

    /// Reads what link `i` has; an error closes it.
    fn read_one(&mut self, i: usize, now: Instant, n_shards: usize) -> Result<(), String> {
        let link = &mut self.ins[i];
        if link.relay.is_none() && now >= link.deadline {
            return Err("no HELLO in time".into());
        }
        if link.replaced {
            return Err("replaced by a newer link from the same relay".into());
        }
        if let Some((shard, m)) = link.held.take() {
            if let Err(m) = self.hub.to_shards[shard].push(m) {
                link.held = Some((shard, m));
                return Ok(());
            }
            self.pushed[shard] = true;
        }
        let mut chunk = [0u8; 64 * 1024];
        let mut may_read = std::mem::take(&mut self.ins[i].readable);
        loop {
            let link = &mut self.ins[i];
            if link.held.is_some() {
                return Ok(());
            }
            // Whole frames first; read more only when none is complete.
            match link.relay {
                None => {
                    if let Some(relay) = self.hello(i, now)? {
                        // An older link from the same relay (its process restarted, or it
                        // redialed) is read no more: frames from two links could interleave.
                        for (j, l) in self.ins.iter_mut().enumerate() {
                            if j != i && l.relay == Some(relay) {
                                l.replaced = true;
                            }
                        }
                        let link = &mut self.ins[i];
                        link.relay = Some(relay);
                        eprintln!("relay: link from relay {relay} up");
                        self.link_up();
                        continue;
                    }
                }
                Some(_) => {
                    let at = link.start;
                    if let Some(n) = wire::frame_len(&link.buf[at..]).map_err(|e| e.to_string())? {
                        let (dest, m) =
                            wire::decode(&link.buf[at..at + n]).map_err(|e| e.to_string())?;
                        link.start += n;
                        let shard = usize::from(addr_shard(dest));
                        if addr_relay(dest) != self.me || shard >= n_shards {
                            return Err(format!("a frame for address {dest:#06x}"));
                        }
                        self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                        if let Err(m) = self.hub.to_shards[shard].push(m) {
                            link.held = Some((shard, m));
                            return Ok(());
                        }
                        self.pushed[shard] = true;
                        continue;
                    }
                }
            }
            let link = &mut self.ins[i];
            if link.start > 0 {
                link.buf.drain(..link.start);
                link.start = 0;
            }
            if link.buf.len() >= wire::MAX_LINK_FRAME + 4 {
                return Err("frame too large".into());
            }
            // Only after a poll said so (a short read means the socket is empty for now).
            if !may_read {
                return Ok(());
            }
            match link.stream.read(&mut chunk) {
                Ok(0) => return Err("closed by the peer".into()),
                Ok(n) => {
                    may_read = n == chunk.len();
                    link.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Checks link `i`'s HELLO once it is all there: MAGIC, version, relay number, token.
    fn hello(&mut self, i: usize, _now: Instant) -> Result<Option<u8>, String> {
        let buf = &self.ins[i].buf;
        if buf.len() < 4 + 2 + 1 + 2 {
            if !MAGIC.starts_with(&buf[..buf.len().min(4)]) {
                return Err("not a relay link".into());
            }
            return Ok(None);
        }
        if &buf[..4] != MAGIC {
            return Err("not a relay link".into());
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != LINK_VERSION {
            return Err(format!("link version {version}"));
        }
        let relay = buf[6];
        let len = usize::from(u16::from_le_bytes([buf[7], buf[8]]));
        if len > 256 {
            return Err("token too long".into());
        }
        if buf.len() < 9 + len {
            return Ok(None);
        }
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = self
            .verifier
            .verify_text(&buf[9..9 + len], now_s)
            .map_err(|e| format!("relay {relay}: {e}"))?;
        if claims.kind != TokenKind::Relay || claims.scope_id != u64::from(relay) || relay == 0 {
            return Err(format!("relay {relay}: not its link token"));
        }
        self.ins[i].buf.drain(..9 + len);
        Ok(Some(relay))
    }

    fn push_to_shards(&mut self) {
        for (i, q) in self.to_shard.iter_mut().enumerate() {
            while let Some(m) = q.pop_front() {
                if let Err(m) = self.hub.to_shards[i].push(m) {
                    q.push_front(m);
                    break;
                }
                self.pushed[i] = true;
            }
        }
        for i in 0..self.pushed.len() {
            if std::mem::take(&mut self.pushed[i]) {
                self.hub.wake_shard(i);
            }
        }
    }

    fn sleep(&mut self, now: Instant) {
        // Work left: a stash, answers, or bytes a link could take without waiting.
        let busy = self.stash.iter().any(Option::is_some)
            || self.to_shard.iter().any(|q| !q.is_empty())
            || self.ins.iter().any(|l| l.held.is_some());
        let mut fds = vec![libc::pollfd {
            fd: self.hub.waker.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        fds.push(libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for out in self.outs.values() {
            if let Some(s) = &out.stream {
                let out_events = if out.buf.is_empty() { 0 } else { libc::POLLOUT };
                fds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN | out_events,
                    revents: 0,
                });
            }
        }
        for l in self.ins.iter().filter(|l| l.held.is_none()) {
            fds.push(libc::pollfd {
                fd: l.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut timeout = Duration::from_millis(250);
        for out in self.outs.values() {
            if out.stream.is_none() && !out.connecting {
                timeout = timeout.min(out.next_try.saturating_duration_since(now));
            }
        }
        if busy {
            timeout = Duration::from_millis(1);
        }
        if !self.hub.prepare_sleep() {
            timeout = Duration::ZERO;
        }
        // SAFETY: `fds` is a live, initialised array of `fds.len()` pollfd structures.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as libc::c_int,
            )
        };
        self.hub.woke();
        if n < 0 {
            // EINTR: look at everything again.
            self.accept_ready = true;
            self.ins.iter_mut().for_each(|l| l.readable = true);
            return;
        }
        // The same order as above: the waker, the listener, the outbound links with a stream,
        // the inbound links not held.
        let mut revents = fds.iter().map(|f| f.revents).skip(1);
        self.accept_ready = revents.next().is_some_and(|r| r != 0);
        for out in self.outs.values_mut().filter(|o| o.stream.is_some()) {
            let r = revents.next().unwrap_or(0);
            out.hup = r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        }
        for l in self.ins.iter_mut().filter(|l| l.held.is_none()) {
            l.readable |= revents.next().is_some_and(|r| r != 0);
        }
    }
}

/// How long a peer may leave its link's buffer full before it is cut off.
const STALL_LIMIT: Duration = Duration::from_secs(5);

/// Where the first whole frame starts in `buf` after `n` bytes of it were written, given that
/// its first `partial` bytes finished a frame already partly written: the bytes of the frame
/// now partly written that are still to go (0 at a frame boundary).
fn partial_after(buf: &[u8], partial: usize, n: usize) -> usize {
    if n < partial {
        return partial - n;
    }
    let mut at = partial;
    while at < n {
        let Some(len) = buf.get(at..at + 4) else {
            break;
        };
        let len = 4 + u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if at + len > n {
            return at + len - n;
        }
        at += len;
    }
    0
}

/// Unacknowledged data older than this breaks the connection (a peer gone without a FIN).
fn set_user_timeout(s: &TcpStream) -> io::Result<()> {
    let ms: libc::c_uint = 10_000;
    // SAFETY: setsockopt on a live socket with a pointer to a live c_uint and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Dials `addr` and says HELLO as relay `me` with `token`.
fn dial_one(addr: SocketAddr, me: u8, token: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut hello = Vec::with_capacity(9 + token.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&LINK_VERSION.to_le_bytes());
    hello.push(me);
    hello.extend_from_slice(&(token.len() as u16).to_le_bytes());
    hello.extend_from_slice(token.as_bytes());
    s.write_all(&hello)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::partial_after;

    #[test]
    fn a_partial_write_is_tracked_to_the_next_frame_boundary() {
        // Two frames of 4 + 6 and 4 + 2 bytes.
        let mut buf = vec![6, 0, 0, 0, 1, 2, 3, 4, 5, 6];
        buf.extend_from_slice(&[2, 0, 0, 0, 7, 8]);
        assert_eq!(partial_after(&buf, 0, 0), 0);
        assert_eq!(
            partial_after(&buf, 0, 3),
            7,
            "inside the first frame's length"
        );
        assert_eq!(partial_after(&buf, 0, 10), 0, "at the boundary");
        assert_eq!(partial_after(&buf, 0, 12), 4, "inside the second frame");
        // The buffer after 12 bytes went: 4 bytes finish a frame, then whole frames.
        let rest = &buf[12..];
        assert_eq!(partial_after(rest, 4, 1), 3);
        assert_eq!(partial_after(rest, 4, 4), 0);
    }
}
