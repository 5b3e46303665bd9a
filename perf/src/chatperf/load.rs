//! The 1:1 load: pairs of connections (a sender and its partner, the receiver), each sender
//! keeping at most `window` messages in flight end to end (sent, not yet received by its
//! partner), optionally paced at a fixed rate. The same client machinery drives every
//! contender: a few OS threads, each a single-threaded tokio runtime owning its pairs.

use super::wire::{self, NatsOp, Resp};
use anyhow::{bail, Context as _};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use proto::chat::{self, Encoder, Frame};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What the pairs talk to.
#[derive(Clone)]
pub enum Target {
    /// The relay's chat: users `base + 2i + 1` send to `base + 2i + 2`.
    Relay {
        /// Where senders and where receivers are homed: a relay's address and the chat port
        /// of its shard 0 (the same relay twice, or two linked relays).
        homes: [(std::net::Ipv4Addr, u16); 2],
        /// Shards.
        shards: u16,
        /// Token key.
        key: Box<SigningKey>,
        /// First user id minus one.
        base: u64,
    },
    /// NATS core: receiver `i` subscribes to `p.i`, its sender publishes there.
    Nats(u16),
    /// Redis pub/sub: receiver `i` subscribes to channel `c.i`, its sender publishes there.
    Redis(u16),
    /// Redis Streams, the durable peer (its server runs with `appendfsync always`): sender `i`
    /// appends to stream `s.i` (XADD, answered once fsync'd: its SENT); receiver `i` reads it
    /// in a consumer group (XREADGROUP), then acknowledges and deletes what it got (XACK,
    /// XDEL), as the relay deletes an entry on its recipient's ACK.
    RedisStreams(u16),
}

/// The consumer group read receiver `i` keeps outstanding on its stream.
fn xreadgroup(out: &mut Vec<u8>, stream: &str) {
    wire::resp_cmd(
        out,
        &[
            b"XREADGROUP",
            b"GROUP",
            b"g",
            b"c",
            b"COUNT",
            b"256",
            b"BLOCK",
            b"0",
            b"STREAMS",
            stream.as_bytes(),
            b">",
        ],
    );
}

/// The load's shape.
#[derive(Clone, Copy, Debug)]
pub struct LoadCfg {
    /// Sender-receiver pairs.
    pub pairs: usize,
    /// Messages in flight per sender at most.
    pub window: usize,
    /// Body bytes (at least 16).
    pub size: usize,
    /// Not counted, at the start.
    pub warmup: Duration,
    /// Counted.
    pub measure: Duration,
    /// Messages per second per sender, or as fast as the window allows.
    pub rate_per_pair: Option<f64>,
    /// Client threads.
    pub threads: usize,
}

/// What one load run measured.
pub struct LoadResult {
    /// Messages received during the measured interval.
    pub delivered: u64,
    /// `delivered` per second.
    pub rate: f64,
    /// Send-to-deliver latency, ns, of those messages.
    pub hist: Histogram<u64>,
    /// The relay only: send-to-SENT latency, ns (the time to durability as the author sees
    /// it), of the SENTs received during the measured interval.
    pub sent_hist: Histogram<u64>,
    /// Paced runs: how late each send was against its schedule, ns (timer resolution, or a
    /// full window when the server falls behind).
    pub lag: Histogram<u64>,
    /// Error replies or broken connections.
    pub errors: u64,
    /// The first error seen.
    pub first_error: Option<String>,
}

struct Conn {
    s: TcpStream,
    inb: Vec<u8>,
    out: Vec<u8>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "closed by the server")
}

impl Conn {
    async fn connect(addr: SocketAddr, src: Option<std::net::Ipv4Addr>) -> io::Result<Self> {
        let s = match src {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let sock = tokio::net::TcpSocket::new_v4()?;
                bind_no_port(&sock);
                sock.bind(SocketAddr::from((ip, 0)))?;
                sock.connect(addr).await?
            }
        };
        s.set_nodelay(true)?;
        Ok(Self {
            s,
            inb: Vec::with_capacity(64 << 10),
            out: Vec::with_capacity(16 << 10),
        })
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.out.len() {
            match self.s.try_write(&self.out[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.out.drain(..done);
        Ok(())
    }

    /// Reads what the socket has now.
    fn fill(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 16 << 10];
        let mut got = false;
        loop {
            match self.s.try_read(&mut scratch) {
                // What came before the close (an ERROR frame, say) is read first; the close
                // is reported by the next call.
                Ok(0) if got => return Ok(()),
                Ok(0) => return Err(closed()),
                Ok(n) => {
                    got = true;
                    self.inb.extend_from_slice(&scratch[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Flushes everything and waits for more input (bounded by `deadline`).
    async fn exchange(&mut self, deadline: Instant) -> anyhow::Result<()> {
        while !self.out.is_empty() {
            self.flush()?;
            if !self.out.is_empty() {
                tokio::time::timeout_at(deadline.into(), self.s.writable())
                    .await
                    .context("timed out writing")??;
            }
        }
        tokio::time::timeout_at(deadline.into(), self.s.readable())
            .await
            .context("timed out waiting for the server")??;
        self.fill()?;
        Ok(())
    }
}

/// One pair's endpoints.
struct PairSpec {
    idx: usize,
    receiver: u64,
    s_addr: SocketAddr,
    r_addr: SocketAddr,
    s_token: String,
    r_token: String,
}

fn specs(target: &Target, pairs: usize) -> Vec<PairSpec> {
    (0..pairs)
        .map(|idx| {
            let (sender, receiver) = match target {
                Target::Relay { base, .. } => {
                    (base + 2 * idx as u64 + 1, base + 2 * idx as u64 + 2)
                }
                _ => (0, 0),
            };
            let (s_addr, r_addr, s_token, r_token) = match target {
                Target::Relay {
                    homes, shards, key, ..
                } => {
                    let addr = |u, (ip, port): (std::net::Ipv4Addr, u16)| {
                        let shard = chat::ids::home_shard(u, *shards);
                        SocketAddr::from((ip, port + shard))
                    };
                    (
                        addr(sender, homes[0]),
                        addr(receiver, homes[1]),
                        super::servers::token(key, sender, *shards),
                        super::servers::token(key, receiver, *shards),
                    )
                }
                Target::Nats(p) | Target::Redis(p) | Target::RedisStreams(p) => {
                    let a = SocketAddr::from(([127, 0, 0, 1], *p));
                    (a, a, String::new(), String::new())
                }
            };
            PairSpec {
                idx,
                receiver,
                s_addr,
                r_addr,
                s_token,
                r_token,
            }
        })
        .collect()
}

/// Lets the kernel pick the source port at connect time (by the whole 4-tuple), so that many
/// connections can share one source address.
fn bind_no_port(sock: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Relay: connects from `src` (or any address), sends HELLO and waits for WELCOME and
/// BACKLOG_END. Returns the idle stream.
pub async fn relay_idle_login(
    src: Option<std::net::Ipv4Addr>,
    addr: SocketAddr,
    token: &str,
    deadline: Instant,
) -> anyhow::Result<TcpStream> {
    Ok(relay_login_from(src, addr, token, deadline).await?.s)
}

async fn relay_login(addr: SocketAddr, token: &str, deadline: Instant) -> anyhow::Result<Conn> {
    relay_login_from(None, addr, token, deadline).await
}

/// Relay: HELLO, then wait for WELCOME and BACKLOG_END; told to retry (ERROR 13: the shard's
/// sign-in budget is spent), connects again 100 ms later, as a client does.
async fn relay_login_from(
    src: Option<std::net::Ipv4Addr>,
    addr: SocketAddr,
    token: &str,
    deadline: Instant,
) -> anyhow::Result<Conn> {
    loop {
        match relay_login_once(src, addr, token, deadline).await? {
            Some(c) => return Ok(c),
            None if Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            None => bail!("relay error 13 until the deadline"),
        }
    }
}

/// One HELLO; `None` if the relay said to retry.
async fn relay_login_once(
    src: Option<std::net::Ipv4Addr>,
    addr: SocketAddr,
    token: &str,
    deadline: Instant,
) -> anyhow::Result<Option<Conn>> {
    let mut c = Conn::connect(addr, src).await?;
    Encoder::new(&mut c.out).hello(token.as_bytes());
    let mut welcomed = false;
    loop {
        c.exchange(deadline).await?;
        let mut at = 0;
        while let Some((f, n)) = chat::decode(&c.inb[at..])? {
            at += n;
            match f {
                Frame::Welcome { .. } => welcomed = true,
                Frame::BacklogEnd if welcomed => {
                    c.inb.drain(..at);
                    return Ok(Some(c));
                }
                Frame::Error { code: 13, .. } if !welcomed => return Ok(None),
                Frame::Error { code, text, .. } => {
                    bail!("relay error {code}: {}", String::from_utf8_lossy(text))
                }
                _ => {}
            }
        }
        c.inb.drain(..at);
    }
}

/// NATS: CONNECT (and SUB), then PING and wait for PONG (the subscription is then in place).
async fn nats_login(
    addr: SocketAddr,
    sub: Option<&str>,
    deadline: Instant,
) -> anyhow::Result<Conn> {
    let mut c = Conn::connect(addr, None).await?;
    c.out
        .extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\n");
    if let Some(s) = sub {
        c.out.extend_from_slice(format!("SUB {s} 1\r\n").as_bytes());
    }
    c.out.extend_from_slice(b"PING\r\n");
    loop {
        c.exchange(deadline).await?;
        let mut at = 0;
        while let Some((op, n)) = wire::nats_parse(&c.inb[at..]).map_err(anyhow::Error::msg)? {
            at += n;
            match op {
                NatsOp::Pong => {
                    c.inb.drain(..at);
                    return Ok(c);
                }
                NatsOp::Err(e) => bail!("NATS error {e}"),
                _ => {}
            }
        }
        c.inb.drain(..at);
    }
}

/// Redis: sends `cmd` (SUBSCRIBE, PING, XGROUP CREATE) and waits for its answer.
async fn redis_login(addr: SocketAddr, cmd: &[&[u8]], deadline: Instant) -> anyhow::Result<Conn> {
    let mut c = Conn::connect(addr, None).await?;
    wire::resp_cmd(&mut c.out, cmd);
    loop {
        c.exchange(deadline).await?;
        if let Some((v, _)) = wire::resp_parse(&c.inb).map_err(anyhow::Error::msg)? {
            if let Resp::Error(e) = v {
                bail!("Redis error {}", String::from_utf8_lossy(e));
            }
            c.inb.clear();
            return Ok(c);
        }
    }
}

/// What one pair measured.
struct PairStats {
    delivered: u64,
    hist: Histogram<u64>,
    sent_hist: Histogram<u64>,
    lag: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

struct Clock {
    epoch: Instant,
    start: Instant,
    warm_end: Instant,
    end: Instant,
}

impl Clock {
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_pair(
    target: Target,
    spec: PairSpec,
    mut s: Conn,
    mut r: Conn,
    cfg: LoadCfg,
    clock: Arc<Clock>,
) -> PairStats {
    let mut st = PairStats {
        delivered: 0,
        hist: wire::new_hist(),
        sent_hist: wire::new_hist(),
        lag: wire::new_hist(),
        errors: 0,
        first_error: None,
    };
    if let Err(e) = pair_loop(&target, &spec, &mut s, &mut r, cfg, &clock, &mut st).await {
        st.errors += 1;
        st.first_error
            .get_or_insert(format!("pair {}: {e:#}", spec.idx));
    }
    st
}

#[allow(clippy::too_many_arguments)]
async fn pair_loop(
    target: &Target,
    spec: &PairSpec,
    s: &mut Conn,
    r: &mut Conn,
    cfg: LoadCfg,
    clock: &Clock,
    st: &mut PairStats,
) -> anyhow::Result<()> {
    let subject = match target {
        Target::Nats(_) => format!("p.{}", spec.idx),
        Target::RedisStreams(_) => format!("s.{}", spec.idx),
        _ => format!("c.{}", spec.idx),
    };
    let interval = cfg.rate_per_pair.map(|r| Duration::from_secs_f64(1.0 / r));
    // Spread the pairs' first sends over one interval.
    let mut next_due = match interval {
        Some(i) => clock.start + i.mul_f64(spec.idx as f64 / cfg.pairs.max(1) as f64),
        None => clock.start,
    };
    let mut body = vec![0u8; cfg.size.max(16)];
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    // The relay (and Redis Streams): (seq, send time in ns) of SENDs (XADDs) not yet answered
    // with SENT (an XADD reply), oldest first (they come in order: one chat, one owner; one
    // connection). Bounded; a lost answer only drops a sample.
    let unanswered_cap = 4 * cfg.window;
    let mut unanswered: std::collections::VecDeque<(u64, u64)> =
        std::collections::VecDeque::with_capacity(unanswered_cap);
    let id_base = (clock.ns(Instant::now()) << 8) ^ (spec.idx as u64);
    let error = |st: &mut PairStats, e: String| {
        st.errors += 1;
        st.first_error.get_or_insert(e);
    };
    loop {
        let now = Instant::now();
        if now >= clock.end {
            return Ok(());
        }
        // Send what the window and the pacing allow.
        while in_flight < cfg.window && s.out.len() < (256 << 10) {
            let t = match interval {
                Some(_) if next_due > now => break,
                Some(i) => {
                    if now >= clock.warm_end {
                        let _ = st
                            .lag
                            .record(clock.ns(now).saturating_sub(clock.ns(next_due)).max(1));
                    }
                    next_due += i;
                    now
                }
                None => now,
            };
            seq += 1;
            wire::stamp(&mut body, clock.ns(t), seq);
            match target {
                Target::Relay { .. } => {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&id_base.to_le_bytes());
                    id[8..].copy_from_slice(&seq.to_le_bytes());
                    if unanswered.len() >= unanswered_cap {
                        unanswered.pop_front();
                    }
                    unanswered.push_back((seq, clock.ns(t)));
                    Encoder::new(&mut s.out).send(
                        &id,
                        0,
                        spec.receiver,
                        chat::kind::TEXT,
                        &[0; 16],
                        &body,
                    );
                }
                Target::Nats(_) => wire::nats_pub(&mut s.out, &subject, &body),
                Target::Redis(_) => {
                    wire::resp_cmd(&mut s.out, &[b"PUBLISH", subject.as_bytes(), &body])
                }
                Target::RedisStreams(_) => {
                    if unanswered.len() >= unanswered_cap {
                        unanswered.pop_front();
                    }
                    unanswered.push_back((seq, clock.ns(t)));
                    wire::resp_cmd(
                        &mut s.out,
                        &[b"XADD", subject.as_bytes(), b"*", b"m", &body],
                    )
                }
            }
            in_flight += 1;
        }
        s.flush()?;
        r.flush()?;
        let wake = match interval {
            Some(_) if in_flight < cfg.window => next_due.min(clock.end),
            _ => clock.end,
        };
        tokio::select! {
            res = r.s.readable() => res?,
            res = s.s.readable() => res?,
            res = s.s.writable(), if !s.out.is_empty() => res?,
            res = r.s.writable(), if !r.out.is_empty() => res?,
            () = tokio::time::sleep_until(wake.into()) => {}
        }
        // The receiver: deliveries (and, for the relay, a cumulative ACK).
        r.fill()?;
        let now = Instant::now();
        let now_ns = clock.ns(now);
        let counted = now >= clock.warm_end && now < clock.end;
        let deliver = |st: &mut PairStats, payload: &[u8], in_flight: &mut usize| {
            *in_flight = in_flight.saturating_sub(1);
            if let (true, Some((t, _))) = (counted, wire::read_stamp(payload)) {
                st.delivered += 1;
                let _ = st.hist.record(now_ns.saturating_sub(t).max(1));
            }
        };
        let mut at = 0;
        match target {
            Target::Relay { .. } => {
                let mut ack = None;
                while let Some((f, n)) = chat::decode(&r.inb[at..])? {
                    at += n;
                    match f {
                        Frame::Msg(e) => {
                            if e.kind == chat::kind::TEXT {
                                deliver(st, e.body, &mut in_flight);
                            }
                            ack = Some((e.chat_id, e.seq));
                        }
                        Frame::Error { code, text, .. } => error(
                            st,
                            format!("receiver: error {code}: {}", String::from_utf8_lossy(text)),
                        ),
                        _ => {}
                    }
                }
                if let Some(a) = ack {
                    Encoder::new(&mut r.out).ack(&[a]);
                }
            }
            Target::Nats(_) => {
                while let Some((op, n)) =
                    wire::nats_parse(&r.inb[at..]).map_err(anyhow::Error::msg)?
                {
                    at += n;
                    match op {
                        NatsOp::Msg(p) => deliver(st, p, &mut in_flight),
                        NatsOp::Ping => r.out.extend_from_slice(b"PONG\r\n"),
                        NatsOp::Err(e) => error(st, format!("receiver: NATS {e}")),
                        _ => {}
                    }
                }
            }
            Target::Redis(_) => {
                while let Some((v, n)) =
                    wire::resp_parse(&r.inb[at..]).map_err(anyhow::Error::msg)?
                {
                    at += n;
                    if let Some(p) = wire::resp_message(&v) {
                        deliver(st, p, &mut in_flight);
                    }
                }
            }
            Target::RedisStreams(_) => {
                while let Some((v, n)) =
                    wire::resp_parse(&r.inb[at..]).map_err(anyhow::Error::msg)?
                {
                    at += n;
                    // XACK and XDEL answer with integers; XREADGROUP with the entries.
                    if let Resp::Error(e) = v {
                        error(
                            st,
                            format!("receiver: Redis {}", String::from_utf8_lossy(e)),
                        );
                        continue;
                    }
                    let Some(entries) = wire::resp_stream_entries(&v) else {
                        continue;
                    };
                    let mut ids: Vec<&[u8]> = Vec::with_capacity(entries.len() + 3);
                    for (id, p) in entries {
                        deliver(st, p, &mut in_flight);
                        ids.push(id);
                    }
                    if !ids.is_empty() {
                        let mut ack: Vec<&[u8]> = vec![b"XACK", subject.as_bytes(), b"g"];
                        ack.extend_from_slice(&ids);
                        wire::resp_cmd(&mut r.out, &ack);
                        let mut del: Vec<&[u8]> = vec![b"XDEL", subject.as_bytes()];
                        del.extend_from_slice(&ids);
                        wire::resp_cmd(&mut r.out, &del);
                    }
                    xreadgroup(&mut r.out, &subject);
                }
            }
        }
        r.inb.drain(..at);
        // The sender: SENT, DELIVERED receipts (acknowledged), errors, keepalives.
        s.fill()?;
        let now_ns = clock.ns(Instant::now());
        let mut at = 0;
        match target {
            Target::Relay { .. } => {
                let mut ack = None;
                while let Some((f, n)) = chat::decode(&s.inb[at..])? {
                    at += n;
                    match f {
                        Frame::Msg(e) => ack = Some((e.chat_id, e.seq)),
                        Frame::Sent { msg_id, .. } => {
                            let q = u64::from_le_bytes(msg_id[8..].try_into().expect("8 bytes"));
                            while let Some(&(front, t)) = unanswered.front() {
                                if front > q {
                                    break;
                                }
                                unanswered.pop_front();
                                if front == q && counted {
                                    let _ = st.sent_hist.record(now_ns.saturating_sub(t).max(1));
                                }
                            }
                        }
                        Frame::Error { code, msg_id, text } => {
                            if msg_id != [0; 16] {
                                // A refused SEND will never arrive.
                                in_flight = in_flight.saturating_sub(1);
                            }
                            error(
                                st,
                                format!("sender: error {code}: {}", String::from_utf8_lossy(text)),
                            )
                        }
                        _ => {}
                    }
                }
                if let Some(a) = ack {
                    Encoder::new(&mut s.out).ack(&[a]);
                }
            }
            Target::Nats(_) => {
                while let Some((op, n)) =
                    wire::nats_parse(&s.inb[at..]).map_err(anyhow::Error::msg)?
                {
                    at += n;
                    match op {
                        NatsOp::Ping => s.out.extend_from_slice(b"PONG\r\n"),
                        NatsOp::Err(e) => error(st, format!("sender: NATS {e}")),
                        _ => {}
                    }
                }
            }
            Target::Redis(_) => {
                while let Some((v, n)) =
                    wire::resp_parse(&s.inb[at..]).map_err(anyhow::Error::msg)?
                {
                    at += n;
                    if let Resp::Error(e) = v {
                        error(st, format!("sender: Redis {}", String::from_utf8_lossy(e)));
                    }
                }
            }
            Target::RedisStreams(_) => {
                while let Some((v, n)) =
                    wire::resp_parse(&s.inb[at..]).map_err(anyhow::Error::msg)?
                {
                    at += n;
                    match v {
                        Resp::Bulk(Some(_)) => {
                            if let Some((_, t)) = unanswered.pop_front() {
                                if counted {
                                    let _ = st.sent_hist.record(now_ns.saturating_sub(t).max(1));
                                }
                            }
                        }
                        Resp::Error(e) => {
                            unanswered.pop_front();
                            in_flight = in_flight.saturating_sub(1);
                            error(st, format!("sender: Redis {}", String::from_utf8_lossy(e)));
                        }
                        _ => {}
                    }
                }
            }
        }
        s.inb.drain(..at);
    }
}

async fn login(
    target: &Target,
    spec: &PairSpec,
    deadline: Instant,
) -> anyhow::Result<(Conn, Conn)> {
    let sub = match target {
        Target::Nats(_) => format!("p.{}", spec.idx),
        _ => format!("c.{}", spec.idx),
    };
    Ok(match target {
        Target::Relay { .. } => (
            relay_login(spec.s_addr, &spec.s_token, deadline).await?,
            relay_login(spec.r_addr, &spec.r_token, deadline).await?,
        ),
        Target::Nats(_) => (
            nats_login(spec.s_addr, None, deadline).await?,
            nats_login(spec.r_addr, Some(&sub), deadline).await?,
        ),
        Target::Redis(_) => (
            redis_login(spec.s_addr, &[b"PING"], deadline).await?,
            redis_login(spec.r_addr, &[b"SUBSCRIBE", sub.as_bytes()], deadline).await?,
        ),
        Target::RedisStreams(_) => {
            // The receiver creates its stream and consumer group, then leaves its first
            // XREADGROUP queued.
            let stream = format!("s.{}", spec.idx);
            let group = [
                b"XGROUP",
                b"CREATE",
                stream.as_bytes(),
                b"g",
                b"$",
                b"MKSTREAM",
            ];
            let mut r = redis_login(spec.r_addr, &group, deadline).await?;
            xreadgroup(&mut r.out, &stream);
            (redis_login(spec.s_addr, &[b"PING"], deadline).await?, r)
        }
    })
}

/// Connects every pair, runs the load and merges the pairs' results. `at_warm_end` and
/// `at_end` run on the calling thread at those instants (to sample server counters).
pub fn run(
    target: &Target,
    cfg: LoadCfg,
    mut at_warm_end: impl FnMut(),
    mut at_end: impl FnMut(),
) -> anyhow::Result<LoadResult> {
    let epoch = Instant::now();
    let threads = cfg.threads.clamp(1, cfg.pairs.max(1));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let failed = Arc::new(AtomicBool::new(false));
    let mut per_thread: Vec<Vec<PairSpec>> = (0..threads).map(|_| Vec::new()).collect();
    for spec in specs(target, cfg.pairs) {
        per_thread[spec.idx % threads].push(spec);
    }
    let mut handles = Vec::new();
    for mine in per_thread {
        let (target, barrier, failed) = (target.clone(), barrier.clone(), failed.clone());
        handles.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<PairStats>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let setup_deadline = Instant::now() + Duration::from_secs(30);
                let conns: anyhow::Result<Vec<(PairSpec, Conn, Conn)>> = rt.block_on(async {
                    let mut v = Vec::new();
                    for spec in mine {
                        let (s, r) = login(&target, &spec, setup_deadline)
                            .await
                            .with_context(|| format!("connecting pair {}", spec.idx))?;
                        v.push((spec, s, r));
                    }
                    Ok(v)
                });
                if conns.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                barrier.wait();
                let conns = conns?;
                if failed.load(Ordering::SeqCst) {
                    return Ok(Vec::new());
                }
                let start = Instant::now();
                let clock = Arc::new(Clock {
                    epoch,
                    start,
                    warm_end: start + cfg.warmup,
                    end: start + cfg.warmup + cfg.measure,
                });
                rt.block_on(async {
                    let tasks: Vec<_> = conns
                        .into_iter()
                        .map(|(spec, s, r)| {
                            tokio::spawn(run_pair(target.clone(), spec, s, r, cfg, clock.clone()))
                        })
                        .collect();
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await?);
                    }
                    Ok(out)
                })
            },
        ));
    }
    barrier.wait();
    if !failed.load(Ordering::SeqCst) {
        let start = Instant::now();
        std::thread::sleep(cfg.warmup);
        at_warm_end();
        std::thread::sleep(
            (start + cfg.warmup + cfg.measure).saturating_duration_since(Instant::now()),
        );
        at_end();
    }
    let mut res = LoadResult {
        delivered: 0,
        rate: 0.0,
        hist: wire::new_hist(),
        sent_hist: wire::new_hist(),
        lag: wire::new_hist(),
        errors: 0,
        first_error: None,
    };
    let mut setup_error = None;
    for h in handles {
        match h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
        {
            Ok(stats) => {
                for p in stats {
                    res.delivered += p.delivered;
                    res.hist.add(&p.hist).context("merging histograms")?;
                    res.sent_hist
                        .add(&p.sent_hist)
                        .context("merging histograms")?;
                    res.lag.add(&p.lag).context("merging histograms")?;
                    res.errors += p.errors;
                    if res.first_error.is_none() {
                        res.first_error = p.first_error;
                    }
                }
            }
            Err(e) => {
                setup_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = setup_error {
        return Err(e);
    }
    res.rate = res.delivered as f64 / cfg.measure.as_secs_f64();
    Ok(res)
}
