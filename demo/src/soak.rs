//! `demo soak`: ctl and relays as real processes under a steady, moderate load with the churn
//! of real use, sampled every few seconds, to show that memory, descriptors and disk stay
//! within a bound over a long run.
//!
//! The load:
//! - **Meetings** are created, run for a while and ended by their host. Their participants
//!   publish audio (50 packets/s of 160 bytes), join and leave at random, refresh their STUN
//!   bindings, renew their tokens before they expire (ctl runs with a short `token_ttl_s` so
//!   that this happens), and some move to a new UDP port mid-call (NAT rebinding).
//! - **Chat users** live in circles of four homed on the same relay (chat does not cross
//!   relays yet). Each connects with a fresh token, watches its circle's presence, sends to its
//!   circle's group and directly to a peer, acknowledges, goes offline for a while (the others'
//!   messages wait in its inbox: an offline backlog) and comes back, re-sending with the same id
//!   whatever was not yet acknowledged as sent. Now and then one creates a group with two peers,
//!   writes to it, and every member leaves it.
//!
//! Every `--sample-s` it records each process's RSS, open descriptors and data directory size and
//! the relays' gauges in a CSV, and at the end draws them (SVG). It fails if, after the warm-up,
//! a process's memory, descriptors or disk in the second half of the run rose above the first
//! half's by more than a small tolerance (a bound reached and held passes, a steady slope does
//! not), or if a chat message was lost or duplicated, media was lost beyond
//! [`MAX_MEDIA_LOSS_PERCENT`], or anything was refused or answered with an error.

use crate::media::{self, Admission};
use crate::procs::{self, Proc, TempDir};
use crate::{http, STOP};
use proto::binding::{Answer, Binding};
use proto::chat::{kind, MsgId};
use relay::chat::client::{new_msg_id, Client, Event};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Media loss the soak accepts, in percent of the packets each receiver should have had.
const MAX_MEDIA_LOSS_PERCENT: f64 = 0.1;
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
const AUDIO_BYTES: usize = 160;
/// Participants per meeting at any time.
const PER_MEETING: usize = 4;
/// How long after the load stops chat users get to deliver every backlog.
const SETTLE: Duration = Duration::from_secs(30);

pub struct SoakArgs {
    pub duration: Duration,
    pub relays: usize,
    pub shards: usize,
    pub meetings: usize,
    pub users: usize,
    pub sample: Duration,
    pub warmup: Option<Duration>,
    pub out: Option<PathBuf>,
    pub dedup_capacity: usize,
    pub segment_bytes: u64,
    pub token_ttl_s: u64,
    pub journal_slack: usize,
}

impl Default for SoakArgs {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(3600),
            relays: 2,
            shards: 1,
            meetings: 3,
            users: 48,
            sample: Duration::from_secs(10),
            warmup: None,
            out: None,
            // Small enough to fill within the warm-up at this load (about 12 requests/s per
            // relay), so that the run shows the bound held rather than the filling.
            dedup_capacity: 4_096,
            segment_bytes: 1 << 20,
            token_ttl_s: 180,
            // ctl compacts its journal at twice its live records plus this many; at the
            // default 1,024 and this load (about one record every 4 s) the first compaction
            // comes after more than an hour, so the bound would not be seen.
            journal_slack: 64,
        }
    }
}

impl SoakArgs {
    /// The warm-up: a quarter of the run unless given.
    fn warmup(&self) -> Duration {
        self.warmup.unwrap_or(self.duration / 4)
    }
}

/// A small deterministic generator (xorshift64*), one per worker thread.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A duration uniformly in `lo..hi` seconds.
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let f = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(lo + (hi - lo) * f)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Sleeps until `t` or the load ends, in small steps.
fn sleep_until(t: Instant, end: &AtomicBool) {
    while Instant::now() < t && !end.load(Ordering::Relaxed) && !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(
            t.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100)),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Media

/// Media results, summed over every participant.
#[derive(Default)]
struct MediaTally {
    participants: AtomicU64,
    meetings: AtomicU64,
    rebinds: AtomicU64,
    renewals: AtomicU64,
    sent: AtomicU64,
    /// Packets received, counted once per (receiver, publisher, index).
    received: AtomicU64,
    /// Indices missing between the first and the last a receiver had from a publisher.
    gaps: AtomicU64,
    duplicates: AtomicU64,
    misrouted: AtomicU64,
    refusals: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl MediaTally {
    fn error(&self, e: String) {
        let mut errs = self.errors.lock().expect("not poisoned");
        if errs.len() < 20 {
            errs.push(e);
        }
    }
}

/// What a receiver had from one publisher: the indices (once each) and their span.
struct Stream {
    first: u64,
    last: u64,
    seen: media::Seen,
    count: u64,
}

impl Stream {
    fn new(i: u64) -> Self {
        Self {
            first: i,
            last: i,
            seen: media::Seen::default(),
            count: 0,
        }
    }
    /// Records index `i`; false if it was already recorded.
    fn insert(&mut self, i: u64) -> bool {
        let fresh = self.seen.insert(i);
        if fresh {
            self.count += 1;
            self.first = self.first.min(i);
            self.last = self.last.max(i);
        }
        fresh
    }
    fn gaps(&self) -> u64 {
        (self.last - self.first + 1).saturating_sub(self.count)
    }
}

/// One socket bound to the relay, and its binding.
struct Leg {
    sock: UdpSocket,
    binding: Binding,
}

impl Leg {
    fn new(a: &Admission) -> Result<Self, String> {
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        sock.connect(a.relay).map_err(|e| e.to_string())?;
        sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let key = proto::token::stun_key(a.token.as_bytes());
        let binding = Binding::new(
            a.token.as_bytes(),
            &key,
            a.participant_id,
            media::BINDING_TTL_US,
        );
        Ok(Self { sock, binding })
    }
}

/// Waits until one of `socks` is readable or `timeout` passes.
fn poll_readable(socks: &[&UdpSocket], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(0, 1_000) as libc::c_int;
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that outlives the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

/// Sends `buf` on `sock`; a full buffer drops it (it shows as loss).
fn send(sock: &UdpSocket, buf: &[u8]) -> Result<(), String> {
    match sock.send(buf) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(format!("send: {e}")),
    }
}

/// One participant from join to leave: publishes audio, receives the others', keeps its binding
/// and token alive, and moves to a new port at `rebind_at` if given.
fn participant(
    ctl: SocketAddr,
    mut a: Admission,
    meeting: u64,
    leave_at: Instant,
    rebind_at: Option<Instant>,
    meeting_over: &AtomicBool,
    tally: &MediaTally,
) -> Result<(), String> {
    let mut legs = vec![Leg::new(&a)?];
    // The leg media goes out on, once the first binding succeeded.
    let mut current: Option<usize> = None;
    let mut retire: Option<(usize, Instant)> = None;
    let mut rebind_at = rebind_at;
    let mut streams: HashMap<u64, Stream> = HashMap::new();
    let (mut buf, mut stun, mut pkt) = ([0u8; 2048], [0u8; 512], [0u8; 400]);
    let mut index = 0u64;
    let mut next_audio = Instant::now();
    let join_deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = Instant::now();
        if now >= leave_at || meeting_over.load(Ordering::Relaxed) || STOP.load(Ordering::Relaxed) {
            break;
        }
        if current.is_none() && now > join_deadline {
            return Err(format!("participant {}: never bound", a.participant_id));
        }
        // Renewed on the leg in use only: a request from a leg being retired would move the
        // participant back to it.
        if media::unix_s() + media::RENEW_BEFORE_S >= a.expires_at && retire.is_none() {
            a = media::renew(ctl, &a)?;
            tally.renewals.fetch_add(1, Ordering::Relaxed);
            let key = proto::token::stun_key(a.token.as_bytes());
            for l in &mut legs {
                l.binding.set_token(a.token.as_bytes(), &key);
            }
        }
        // Moving to a new port: its Binding request goes out at once, and media follows it
        // from the same new socket, so the relay sees the request first and moves the
        // participant before the first packet from the new address (packets from the old one
        // after the move would be dropped as unbound). The old socket is still read for a
        // second, for what was already on its way to it.
        if rebind_at.is_some_and(|t| now >= t) && legs.len() == 1 {
            if let Some(old) = current {
                rebind_at = None;
                let mut leg = Leg::new(&a)?;
                if let Some(n) = leg.binding.poll_transmit(media::mono_us(), &mut stun) {
                    send(&leg.sock, &stun[..n])?;
                }
                legs.push(leg);
                current = Some(legs.len() - 1);
                retire = Some((old, now + Duration::from_secs(1)));
                tally.rebinds.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some((i, until)) = retire {
            if now >= until {
                legs.remove(i);
                current = current.map(|c| if c > i { c - 1 } else { c });
                retire = None;
            }
        }
        // Keep every leg's binding fresh except one being retired.
        for (i, l) in legs.iter_mut().enumerate() {
            if retire.is_some_and(|(r, _)| r == i) {
                continue;
            }
            if let Some(n) = l.binding.poll_transmit(media::mono_us(), &mut stun) {
                send(&l.sock, &stun[..n])?;
            }
        }
        if let Some(c) = current {
            while next_audio <= now {
                let mut body = [0u8; AUDIO_BYTES];
                body[..8].copy_from_slice(&meeting.to_le_bytes());
                body[8..16].copy_from_slice(&a.participant_id.to_le_bytes());
                body[16..24].copy_from_slice(&index.to_le_bytes());
                let n = proto::rtp::write_packet(
                    &mut pkt,
                    111,
                    index as u16,
                    (index * 960) as u32,
                    (a.participant_id as u32) | 0x4000_0000,
                    false,
                    &body,
                )
                .ok_or("RTP packet does not fit")?;
                send(&legs[c].sock, &pkt[..n])?;
                index += 1;
                tally.sent.fetch_add(1, Ordering::Relaxed);
                next_audio += AUDIO_INTERVAL;
            }
        }
        for (i, leg) in legs.iter_mut().enumerate() {
            while let Ok(n) = leg.sock.recv(&mut buf) {
                if buf[0] < 4 {
                    match leg.binding.handle_response(media::mono_us(), &buf[..n]) {
                        // The first binding: media may start.
                        Some(Answer::Bound) if current.is_none() => current = Some(i),
                        Some(Answer::Refused(code)) => {
                            tally.refusals.fetch_add(1, Ordering::Relaxed);
                            tally.error(format!(
                                "participant {}: binding refused with {code}",
                                a.participant_id
                            ));
                        }
                        _ => {}
                    }
                    continue;
                }
                let Ok(rtp) = proto::rtp::RtpPacket::parse(&buf[..n]) else {
                    continue;
                };
                let body = rtp.payload();
                if body.len() < 24 {
                    tally.misrouted.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let word = |k: usize| u64::from_le_bytes(body[k..k + 8].try_into().expect("8"));
                let (m, from, idx) = (word(0), word(8), word(16));
                if m != meeting || from == a.participant_id {
                    tally.misrouted.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if streams
                    .entry(from)
                    .or_insert_with(|| Stream::new(idx))
                    .insert(idx)
                {
                    tally.received.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let wake = [
            next_audio,
            Instant::now()
                + Duration::from_micros(
                    legs.iter()
                        .map(|l| l.binding.poll_timeout())
                        .min()
                        .unwrap_or(0)
                        .saturating_sub(media::mono_us()),
                ),
            leave_at,
        ]
        .into_iter()
        .min()
        .expect("three");
        let socks: Vec<&UdpSocket> = legs.iter().map(|l| &l.sock).collect();
        poll_readable(&socks, wake.saturating_duration_since(Instant::now()));
    }
    let gaps: u64 = streams.values().map(Stream::gaps).sum();
    tally.gaps.fetch_add(gaps, Ordering::Relaxed);
    if !meeting_over.load(Ordering::Relaxed) {
        let r = ctl::client::request(
            &format!("http://{ctl}"),
            "POST",
            &format!("/v1/meetings/{meeting}/leave"),
            &[("authorization", &format!("Bearer {}", a.token))],
            None,
            Duration::from_secs(10),
        )
        .map_err(|e| format!("leave: {e}"))?;
        if r.status != 200 {
            return Err(format!("leave: {} {}", r.status, r.text()));
        }
    }
    Ok(())
}

/// Creates meetings one after another for as long as the load runs; each lives 60-180 s with
/// [`PER_MEETING`] participants who come and go.
fn meeting_worker(
    ctl: SocketAddr,
    seed: u64,
    load_over: &AtomicBool,
    tally: &MediaTally,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    while !load_over.load(Ordering::Relaxed) && !STOP.load(Ordering::Relaxed) {
        let m = http::expect(
            ctl,
            "POST",
            "/v1/meetings",
            Some(&json!({"title": "soak", "host_name": "host"})),
            201,
        )?;
        tally.meetings.fetch_add(1, Ordering::Relaxed);
        let id = m["meeting_id"].as_u64().ok_or("meeting without id")?;
        let code = m["code"]
            .as_str()
            .ok_or("meeting without code")?
            .to_string();
        let secret = m["host_secret"].as_str().unwrap_or("").to_string();
        let ends = Instant::now() + rng.secs(60.0, 180.0);
        let over = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<(), String> {
            let mut slots: Vec<Option<std::thread::ScopedJoinHandle<'_, Result<(), String>>>> =
                (0..PER_MEETING).map(|_| None).collect();
            let mut first = Some(media::admission(&m["join"], &code)?);
            while Instant::now() < ends && !load_over.load(Ordering::Relaxed) {
                for slot in slots.iter_mut() {
                    if let Some(h) = slot.take_if(|h| h.is_finished()) {
                        if let Err(e) = h.join().map_err(|_| "participant panicked")? {
                            tally.error(e);
                        }
                    }
                    if slot.is_none() {
                        let a = match first.take() {
                            Some(a) => a,
                            None => media::admission(
                                &http::expect(
                                    ctl,
                                    "POST",
                                    "/v1/join",
                                    Some(&json!({"code": code, "name": "p"})),
                                    200,
                                )?,
                                &code,
                            )?,
                        };
                        tally.participants.fetch_add(1, Ordering::Relaxed);
                        // The host stays until it ends the meeting; the others come and go.
                        let leave_at = if a.participant_id == 1 {
                            ends + Duration::from_secs(3600)
                        } else {
                            Instant::now() + rng.secs(20.0, 240.0)
                        };
                        let rebind_at = rng
                            .chance(0.5)
                            .then(|| Instant::now() + rng.secs(5.0, 60.0));
                        let over = &over;
                        *slot = Some(s.spawn(move || {
                            participant(ctl, a, id, leave_at, rebind_at, over, tally)
                        }));
                    }
                }
                sleep_until(Instant::now() + Duration::from_millis(500), load_over);
            }
            over.store(true, Ordering::Relaxed);
            for h in slots.into_iter().flatten() {
                if let Err(e) = h.join().map_err(|_| "participant panicked")? {
                    tally.error(e);
                }
            }
            Ok(())
        })?;
        let r = ctl::client::request(
            &format!("http://{ctl}"),
            "DELETE",
            &format!("/v1/meetings/{id}"),
            &[("authorization", &format!("Bearer {secret}"))],
            None,
            Duration::from_secs(10),
        )
        .map_err(|e| format!("ending meeting: {e}"))?;
        if r.status != 200 {
            return Err(format!("ending meeting: {} {}", r.status, r.text()));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Chat

/// Every verified message: who must get it, and who did.
#[derive(Default)]
struct Ledger {
    /// (author, id) -> recipients, once the relay acknowledged it as sent.
    expected: HashMap<(u64, MsgId), Vec<u64>>,
    /// (author, id) -> recipients that received it (an entry twice is a duplicate).
    received: HashMap<(u64, MsgId), Vec<u64>>,
    duplicates: u64,
}

#[derive(Default)]
struct ChatTally {
    ledger: Mutex<Ledger>,
    sent: AtomicU64,
    /// Sent and not yet acknowledged as sent.
    unacknowledged: AtomicU64,
    resent: AtomicU64,
    /// Entries the client library filtered as seen before (re-sent after a reconnect: the
    /// protocol delivers at least once).
    redelivered: AtomicU64,
    sessions: AtomicU64,
    groups_created: AtomicU64,
    groups_left: AtomicU64,
    backlog_entries: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl ChatTally {
    fn error(&self, e: String) {
        let mut errs = self.errors.lock().expect("not poisoned");
        if errs.len() < 20 {
            errs.push(e);
        }
    }

    /// Verified messages sent, copies expected and copies missing.
    fn check(&self) -> (usize, usize, usize, u64) {
        let l = self.ledger.lock().expect("not poisoned");
        let (mut copies, mut missing) = (0, 0);
        for (k, to) in &l.expected {
            copies += to.len();
            let got = l.received.get(k).map_or(&[][..], Vec::as_slice);
            missing += to.iter().filter(|u| !got.contains(u)).count();
        }
        (l.expected.len(), copies, missing, l.duplicates)
    }
}

/// Four users homed on one relay, and their group once created.
struct Circle {
    members: Vec<u64>,
    group: OnceLock<u64>,
}

/// Body tags: the first byte says whether the ledger follows the message.
const VERIFIED: u8 = b'V';
const CHURN: u8 = b'C';

/// A user from start to the end of the settle period: online and offline phases.
fn chat_user(
    ctl: SocketAddr,
    me: usize,
    circle: &Circle,
    seed: u64,
    load_over: &AtomicBool,
    settled: &AtomicBool,
    tally: &ChatTally,
) -> Result<(), String> {
    let user = circle.members[me];
    let peers: Vec<u64> = circle
        .members
        .iter()
        .copied()
        .filter(|&u| u != user)
        .collect();
    let mut rng = Rng::new(seed);
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    // Sent and not yet acknowledged: id -> (group chat or 0, direct peer or 0, body).
    let mut pending: HashMap<MsgId, (u64, u64, Vec<u8>, Vec<u64>)> = HashMap::new();
    let mut left: HashSet<u64> = HashSet::new();
    let mut first = true;
    loop {
        let home = http::expect(ctl, "GET", &format!("/v1/users/{user}/home"), None, 200)?;
        let addr: SocketAddr = format!(
            "{}:{}",
            home["host"].as_str().unwrap_or("?"),
            home["chat_port"]
        )
        .parse()
        .map_err(|_| format!("user {user}: no chat home: {home}"))?;
        let token = home["token"].as_str().ok_or("home without token")?;
        let mut c = Client::connect(addr, token, Duration::from_secs(5))
            .map_err(|e| format!("user {user}: connect: {e}"))?;
        tally.sessions.fetch_add(1, Ordering::Relaxed);
        c.set_last_seqs(std::mem::take(&mut seqs));
        c.watch_presence(&peers).map_err(|e| e.to_string())?;
        if first && me == 0 {
            let id = new_msg_id();
            c.queue(|e| e.group_create(&id, &peers));
            c.flush().map_err(|e| e.to_string())?;
        }
        // What was sent and not acknowledged before the last disconnect goes again, same id.
        for (id, (chat, to, body, _)) in &pending {
            c.queue(|e| e.send(id, *chat, *to, kind::TEXT, &[0; 16], body));
            tally.resent.fetch_add(1, Ordering::Relaxed);
        }
        c.flush().map_err(|e| e.to_string())?;
        let online_until = Instant::now() + rng.secs(20.0, 60.0);
        let mut next_send = Instant::now() + rng.secs(0.5, 3.0);
        let mut next_ack = Instant::now();
        let mut churn: Option<MsgId> = None;
        let mut next_churn = Instant::now() + rng.secs(10.0, 60.0);
        let mut backlog = true;
        loop {
            let now = Instant::now();
            let over = load_over.load(Ordering::Relaxed);
            if settled.load(Ordering::Relaxed) || STOP.load(Ordering::Relaxed) {
                c.ack_all().map_err(|e| e.to_string())?;
                tally.redelivered.fetch_add(c.duplicates, Ordering::Relaxed);
                return Ok(());
            }
            if !over && now >= online_until && circle.group.get().is_some() {
                break;
            }
            let group = circle.group.get().copied();
            if !over && now >= next_send {
                if let Some(g) = group {
                    let id = new_msg_id();
                    let mut body = vec![VERIFIED];
                    body.extend_from_slice(&id);
                    let (chat, to, rcpt) = if rng.chance(0.5) {
                        (g, 0, peers.clone())
                    } else {
                        let p = peers[(rng.next() % peers.len() as u64) as usize];
                        (0, p, vec![p])
                    };
                    c.queue(|e| e.send(&id, chat, to, kind::TEXT, &[0; 16], &body));
                    c.flush().map_err(|e| e.to_string())?;
                    pending.insert(id, (chat, to, body, rcpt));
                    tally.unacknowledged.fetch_add(1, Ordering::Relaxed);
                }
                next_send = now + rng.secs(1.0, 5.0);
            }
            if !over && now >= next_churn && churn.is_none() && group.is_some() {
                let id = new_msg_id();
                let with = [peers[0], peers[peers.len() - 1]];
                c.queue(|e| e.group_create(&id, &with));
                c.flush().map_err(|e| e.to_string())?;
                churn = Some(id);
                next_churn = now + rng.secs(20.0, 90.0);
            }
            if now >= next_ack {
                c.ack_all().map_err(|e| e.to_string())?;
                next_ack = now + Duration::from_millis(200);
            }
            let ev = c
                .recv(Duration::from_millis(50))
                .map_err(|e| format!("user {user}: {e}"))?;
            match ev {
                Some(Event::Sent { msg_id, chat, .. }) => {
                    if churn == Some(msg_id) {
                        // The churn group exists: two messages, then leave it.
                        churn = None;
                        tally.groups_created.fetch_add(1, Ordering::Relaxed);
                        for _ in 0..2 {
                            let id = new_msg_id();
                            c.queue(|e| e.send(&id, chat, 0, kind::TEXT, &[0; 16], &[CHURN]));
                        }
                        let id = new_msg_id();
                        c.queue(|e| e.group_leave(&id, chat));
                        c.flush().map_err(|e| e.to_string())?;
                        left.insert(chat);
                        tally.groups_left.fetch_add(1, Ordering::Relaxed);
                    } else if first && me == 0 && circle.group.get().is_none() {
                        let _ = circle.group.set(chat);
                    } else if let Some((_, _, _, rcpt)) = pending.remove(&msg_id) {
                        tally.sent.fetch_add(1, Ordering::Relaxed);
                        tally.unacknowledged.fetch_sub(1, Ordering::Relaxed);
                        let mut l = tally.ledger.lock().expect("not poisoned");
                        l.expected.insert((user, msg_id), rcpt);
                    }
                }
                Some(Event::Message(m)) if m.kind == kind::TEXT && m.sender != user => {
                    if backlog {
                        tally.backlog_entries.fetch_add(1, Ordering::Relaxed);
                    }
                    match m.body.first() {
                        Some(&VERIFIED) => {
                            let mut l = tally.ledger.lock().expect("not poisoned");
                            let got = l.received.entry((m.sender, m.msg_id)).or_default();
                            if got.contains(&user) {
                                l.duplicates += 1;
                            } else {
                                got.push(user);
                            }
                        }
                        Some(&CHURN) if left.insert(m.chat) => {
                            let id = new_msg_id();
                            c.queue(|e| e.group_leave(&id, m.chat));
                            c.flush().map_err(|e| e.to_string())?;
                            tally.groups_left.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                Some(Event::BacklogEnd) => backlog = false,
                Some(Event::Error { code, text, .. }) => {
                    tally.error(format!("user {user}: error {code}: {text}"));
                }
                _ => {}
            }
        }
        // Offline: others' messages to this user wait in its inbox.
        first = false;
        tally.redelivered.fetch_add(c.duplicates, Ordering::Relaxed);
        seqs = c.last_seqs().clone();
        drop(c);
        sleep_until(Instant::now() + rng.secs(5.0, 20.0), load_over);
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling

/// One process to sample.
struct Watched {
    name: String,
    pid: u32,
    data: PathBuf,
    metrics: Option<SocketAddr>,
}

/// The relays' gauges and counters the CSV records.
const GAUGES: [&str; 10] = [
    "relay_rooms",
    "relay_participants",
    "relay_chat_sessions",
    "relay_chat_pending",
    "relay_chat_chats",
    "relay_chat_log_bytes",
    "relay_chat_accepted_total",
    "relay_tx_packets_total",
    "relay_heap_in_use_bytes",
    "relay_heap_free_bytes",
];
/// Index of `relay_chat_chats` in [`GAUGES`].
const CHATS: usize = 4;
/// Index of `relay_chat_accepted_total` in [`GAUGES`].
const ACCEPTED: usize = 6;
/// Index of `relay_heap_in_use_bytes` in [`GAUGES`].
const HEAP: usize = 8;

/// The least-squares slope of `y` against `x`.
fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// Bytes of disk the files under `dir` occupy (allocated blocks, not apparent sizes).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        n += if m.is_dir() {
            disk_bytes(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    n
}

/// One process at one time: (rss KiB, fds, disk bytes, gauges).
type Point = (u64, u64, u64, Vec<u64>);
/// One sample of every process.
type Sample = Vec<Point>;

fn sample(w: &[Watched]) -> Sample {
    w.iter()
        .map(|p| {
            let gauges = p.metrics.map_or_else(Vec::new, |m| {
                GAUGES
                    .iter()
                    .map(|g| http::metric_sum(m, g).unwrap_or(0))
                    .collect()
            });
            (rss_kib(p.pid), open_fds(p.pid), disk_bytes(&p.data), gauges)
        })
        .collect()
}

fn csv_header(w: &[Watched]) -> String {
    let mut h = String::from("t_s");
    for p in w {
        let _ = write!(h, ",{0}_rss_kib,{0}_fds,{0}_disk_bytes", p.name);
        if p.metrics.is_some() {
            for g in GAUGES {
                let _ = write!(h, ",{}_{}", p.name, g.trim_start_matches("relay_"));
            }
        }
    }
    h
}

fn csv_row(t: f64, s: &Sample) -> String {
    let mut r = format!("{t:.0}");
    for (rss, fds, disk, gauges) in s {
        let _ = write!(r, ",{rss},{fds},{disk}");
        for g in gauges {
            let _ = write!(r, ",{g}");
        }
    }
    r
}

/// Whether a series stays within its bound after the warm-up: the second half's maximum is at
/// most the first half's plus `tolerance`. Returns (first half max, second half max, ok).
fn bounded(series: &[(f64, u64)], warmup_s: f64, tolerance: u64) -> (u64, u64, bool) {
    let after: Vec<&(f64, u64)> = series.iter().filter(|(t, _)| *t >= warmup_s).collect();
    if after.len() < 4 {
        return (0, 0, false);
    }
    let mid = after.len() / 2;
    let a = after[..mid].iter().map(|(_, v)| *v).max().unwrap_or(0);
    let b = after[mid..].iter().map(|(_, v)| *v).max().unwrap_or(0);
    (a, b, b <= a + tolerance)
}

/// An SVG with one panel per measure (RSS, descriptors, disk), one line per process.
fn svg(
    names: &[String],
    times: &[f64],
    panels: &[(&str, f64, Vec<Vec<u64>>)],
    warmup_s: f64,
) -> String {
    const W: f64 = 900.0;
    const H: f64 = 220.0;
    const L: f64 = 70.0;
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let t_max = times.last().copied().unwrap_or(1.0).max(1.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        H * panels.len() as f64 + 30.0
    );
    for (k, (title, scale, series)) in panels.iter().enumerate() {
        let top = k as f64 * H + 20.0;
        let (pw, ph) = (W - L - 20.0, H - 60.0);
        let v_max = series
            .iter()
            .flatten()
            .map(|&v| v as f64 / scale)
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.1;
        let _ = writeln!(
            s,
            "<text x=\"{L}\" y=\"{}\" font-weight=\"bold\">{title}</text>",
            top
        );
        let _ = writeln!(
            s,
            "<rect x=\"{L}\" y=\"{}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>",
            top + 10.0
        );
        for i in 0..=4 {
            let v = v_max * i as f64 / 4.0;
            let y = top + 10.0 + ph - ph * i as f64 / 4.0;
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{y}\" text-anchor=\"end\">{v:.1}</text>",
                L - 5.0
            );
        }
        let wx = L + pw * warmup_s / t_max;
        let _ = writeln!(
            s,
            "<line x1=\"{wx}\" y1=\"{}\" x2=\"{wx}\" y2=\"{}\" stroke=\"#aaa\" stroke-dasharray=\"4\"/>",
            top + 10.0,
            top + 10.0 + ph
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds (0 to {t_max:.0}; dashed: end of warm-up)</text>",
            L + pw / 2.0,
            top + ph + 35.0
        );
        for (j, line) in series.iter().enumerate() {
            let pts: Vec<String> = line
                .iter()
                .zip(times)
                .map(|(&v, &t)| {
                    format!(
                        "{:.1},{:.1}",
                        L + pw * t / t_max,
                        top + 10.0 + ph - ph * (v as f64 / scale) / v_max
                    )
                })
                .collect();
            let c = COLORS[j % COLORS.len()];
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>",
                pts.join(" ")
            );
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{}</text>",
                L + 10.0 + 110.0 * j as f64,
                top + 25.0,
                names[j]
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------------------------------------
// The run

fn start_relay(
    dir: &TempDir,
    ctl: SocketAddr,
    id: u32,
    a: &SoakArgs,
) -> Result<(Proc, PathBuf), String> {
    let data = dir.0.join(format!("relay{id}"));
    let conf = dir.0.join(format!("relay{id}.toml"));
    std::fs::write(
        &conf,
        format!(
            "pin = false\n[chat]\ndedup_capacity = {}\nsegment_bytes = {}\n",
            a.dedup_capacity, a.segment_bytes
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut last = String::new();
    for _ in 0..3 {
        let (base, chat) = procs::free_ports("127.0.0.1", a.shards as u16)?;
        let mut cmd = std::process::Command::new(procs::binary("relay")?);
        cmd.arg("--config")
            .arg(&conf)
            .args([
                "--ctl",
                &format!("http://{ctl}"),
                "--relay-id",
                &id.to_string(),
            ])
            .args(["--bind", "127.0.0.1", "--advertise-host", "127.0.0.1"])
            .args([
                "--shards",
                &a.shards.to_string(),
                "--base-port",
                &base.to_string(),
            ])
            .args(["--chat-port", &chat.to_string(), "--metrics", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data);
        match Proc::start(
            &format!("relay{id}"),
            cmd,
            &dir.0.join(format!("relay{id}.log")),
        ) {
            Ok(p) => return Ok((p, data)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Runs the soak; true if every check passed.
pub fn run(a: SoakArgs) -> Result<bool, String> {
    let dir = TempDir::new()?;
    let warmup = a.warmup();
    eprintln!(
        "soak: ctl and {} relays ({} shard(s) each) for {:?} (warm-up {:?}), {} meetings of {PER_MEETING}, {} chat users; sample every {:?}; data in {}",
        a.relays, a.shards, a.duration, warmup, a.meetings, a.users, a.sample, dir.0.display()
    );
    std::fs::write(
        dir.0.join("ctl.toml"),
        format!(
            "token_ttl_s = {}\njournal_slack_records = {}\n",
            a.token_ttl_s, a.journal_slack
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(procs::binary("ctl")?);
    cmd.arg("serve")
        .arg("--config")
        .arg(dir.0.join("ctl.toml"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.0.join("ctl"));
    let mut ctl_proc = Proc::start("ctl", cmd, &dir.0.join("ctl.log"))?;
    let ctl = procs::addr(&ctl_proc, "listen")?;
    let mut watched = vec![Watched {
        name: "ctl".into(),
        pid: ctl_proc.pid(),
        data: dir.0.join("ctl"),
        metrics: None,
    }];
    let mut relays = Vec::new();
    for id in 1..=a.relays as u32 {
        let (p, data) = start_relay(&dir, ctl, id, &a)?;
        watched.push(Watched {
            name: format!("relay{id}"),
            pid: p.pid(),
            data,
            metrics: Some(procs::addr(&p, "metrics")?),
        });
        relays.push(p);
    }
    crate::wait_relays(ctl, a.relays as u64)?;

    // Chat circles: users grouped by the relay ctl homes them on.
    let mut by_relay: HashMap<u64, Vec<u64>> = HashMap::new();
    for i in 0..a.users as u64 {
        let user = 50_000 + i;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = http::expect(ctl, "GET", &format!("/v1/users/{user}/home"), None, 200)?;
            if h["chat_port"].is_u64() {
                by_relay
                    .entry(h["relay_id"].as_u64().unwrap_or(0))
                    .or_default()
                    .push(user);
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("no chat home for user {user}: {h}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let circles: Vec<Circle> = by_relay
        .values()
        .flat_map(|users| users.chunks(4).filter(|c| c.len() >= 2))
        .map(|c| Circle {
            members: c.to_vec(),
            group: OnceLock::new(),
        })
        .collect();

    let media_tally = MediaTally::default();
    let chat_tally = ChatTally::default();
    let load_over = AtomicBool::new(false);
    let settled = AtomicBool::new(false);
    let start = Instant::now();
    let end = start + a.duration;
    let mut times: Vec<f64> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut csv = csv_header(&watched);
    csv.push('\n');
    let mut died = None;
    let worker_errors = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for k in 0..a.meetings {
            let (lo, mt) = (&load_over, &media_tally);
            handles.push(s.spawn(move || meeting_worker(ctl, 1 + k as u64, lo, mt)));
        }
        for (ci, circle) in circles.iter().enumerate() {
            for me in 0..circle.members.len() {
                let (lo, st, ct) = (&load_over, &settled, &chat_tally);
                let seed = 1_000 + (ci * 8 + me) as u64;
                handles.push(s.spawn(move || chat_user(ctl, me, circle, seed, lo, st, ct)));
            }
        }
        let mut next_sample = start;
        let mut settle_deadline = None;
        loop {
            let now = Instant::now();
            if now >= next_sample {
                let t = now.duration_since(start).as_secs_f64();
                let smp = sample(&watched);
                csv.push_str(&csv_row(t, &smp));
                csv.push('\n');
                let parts: Vec<String> = watched
                    .iter()
                    .zip(&smp)
                    .map(|(w, (rss, fds, disk, _))| {
                        format!(
                            "{} {:.1} MiB {fds} fds {:.1} MiB disk",
                            w.name,
                            *rss as f64 / 1024.0,
                            *disk as f64 / 1048576.0
                        )
                    })
                    .collect();
                eprintln!(
                    "soak {t:>6.0} s: {}; media {} sent, chat {} sent",
                    parts.join("; "),
                    media_tally.sent.load(Ordering::Relaxed),
                    chat_tally.sent.load(Ordering::Relaxed)
                );
                times.push(t);
                samples.push(smp);
                next_sample += a.sample;
            }
            if now >= end && !load_over.load(Ordering::Relaxed) {
                load_over.store(true, Ordering::Relaxed);
                settle_deadline = Some(now + SETTLE);
            }
            if let Some(d) = settle_deadline {
                let (_, _, missing, _) = chat_tally.check();
                let unacked = chat_tally.unacknowledged.load(Ordering::Relaxed);
                if (missing == 0 && unacked == 0) || now >= d {
                    settled.store(true, Ordering::Relaxed);
                }
            }
            if STOP.load(Ordering::Relaxed) {
                load_over.store(true, Ordering::Relaxed);
                settled.store(true, Ordering::Relaxed);
            }
            if handles.iter().all(|h| h.is_finished()) {
                break;
            }
            for (i, p) in relays.iter_mut().enumerate() {
                if !p.alive() && died.is_none() {
                    died = Some(format!("relay{} exited:\n{}", i + 1, p.log_tail(20)));
                    STOP.store(true, Ordering::Relaxed);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("a worker panicked".to_string()),
            })
            .collect::<Vec<_>>()
    });
    // A last sample once the load has stopped.
    let t = start.elapsed().as_secs_f64();
    let smp = sample(&watched);
    csv.push_str(&csv_row(t, &smp));
    csv.push('\n');
    times.push(t);
    samples.push(smp);

    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/soak"));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::write(out.join("soak.csv"), &csv).map_err(|e| e.to_string())?;
    let names: Vec<String> = watched.iter().map(|w| w.name.clone()).collect();
    let series = |f: &dyn Fn(&Point) -> u64| -> Vec<Vec<u64>> {
        (0..watched.len())
            .map(|i| samples.iter().map(|s| f(&s[i])).collect())
            .collect()
    };
    let panels = [
        ("RSS (MiB)", 1024.0, series(&|s| s.0)),
        ("open descriptors", 1.0, series(&|s| s.1)),
        ("data directory on disk (MiB)", 1048576.0, series(&|s| s.2)),
    ];
    let warm_s = warmup.as_secs_f64();
    std::fs::write(out.join("soak.svg"), svg(&names, &times, &panels, warm_s))
        .map_err(|e| e.to_string())?;

    // The checks.
    let mut checks: Vec<(String, bool)> = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    // Bounds are judged on the samples taken while the load ran (the last one follows it).
    let during = times.len().saturating_sub(1);
    for (i, name) in names.iter().enumerate() {
        for (get, what) in ["RSS KiB", "descriptors", "disk bytes"]
            .into_iter()
            .enumerate()
        {
            let pts: Vec<(f64, u64)> = (0..during)
                .map(|k| {
                    let s = &samples[k][i];
                    (times[k], [s.0, s.1, s.2][get])
                })
                .collect();
            let first = pts
                .iter()
                .filter(|(t, _)| *t >= warm_s)
                .map(|p| p.1)
                .max()
                .unwrap_or(0);
            // RSS: 2 % or 1 MiB (allocator noise); descriptors: 16; a relay's disk: two more
            // log segments per shard (its designed bound is a few segments: a checkpoint at 3,
            // the active one and a recycled spare, so a sample may catch one or two more);
            // ctl's: 64 KiB.
            let tol = match get {
                0 => (first / 50).max(1024),
                1 => 16,
                _ if name == "ctl" => 64 << 10,
                _ => 2 * a.segment_bytes * a.shards as u64,
            };
            let (h1, h2, ok) = bounded(&pts, warm_s, tol);
            rows.push(format!(
                "| {name} | {what} | {} | {h1} | {h2} | {tol} | {} |",
                pts.first().map_or(0, |p| p.1),
                if ok { "bounded" } else { "GREW" }
            ));
            checks.push((format!("{name} {what} bounded after the warm-up"), ok));
        }
        // The chats a relay owns: the circles' groups and direct chats, and the churn groups
        // not yet left (at most one per user at a time). Every group is left in the end, so
        // a count that keeps rising means groups are kept after their last member left.
        if watched[i].metrics.is_some() {
            let pts: Vec<(f64, u64)> = (0..during)
                .map(|k| (times[k], samples[k][i].3.get(CHATS).copied().unwrap_or(0)))
                .collect();
            let tol = a.users as u64;
            let (h1, h2, ok) = bounded(&pts, warm_s, tol);
            rows.push(format!(
                "| {name} | chats owned | {} | {h1} | {h2} | {tol} | {} |",
                pts.first().map_or(0, |p| p.1),
                if ok { "bounded" } else { "GREW" }
            ));
            checks.push((format!("{name} chats bounded after the warm-up"), ok));
        }
    }
    let m = &media_tally;
    let (sent, recv, gaps) = (
        m.sent.load(Ordering::Relaxed),
        m.received.load(Ordering::Relaxed),
        m.gaps.load(Ordering::Relaxed),
    );
    let loss = 100.0 * gaps as f64 / (recv + gaps).max(1) as f64;
    let (verified, copies, missing, dups) = chat_tally.check();
    let media_errors = m.errors.lock().expect("not poisoned").clone();
    let chat_errors = chat_tally.errors.lock().expect("not poisoned").clone();
    println!("\n| process | measure | first sample | max, first half after warm-up | max, second half | tolerance | verdict |");
    println!("|---|---|---:|---:|---:|---:|---|");
    for r in &rows {
        println!("{r}");
    }
    println!("\n| load | value |\n|---|---|");
    println!(
        "| duration, warm-up, samples | {:.0} s, {:.0} s, {} |",
        a.duration.as_secs_f64(),
        warm_s,
        times.len()
    );
    println!(
        "| meetings, participants (joins), rebinds, token renewals | {}, {}, {}, {} |",
        m.meetings.load(Ordering::Relaxed),
        m.participants.load(Ordering::Relaxed),
        m.rebinds.load(Ordering::Relaxed),
        m.renewals.load(Ordering::Relaxed)
    );
    println!("| media packets sent, received (once per receiver), missing, duplicates, misrouted | {sent}, {recv}, {gaps} ({loss:.4} %), {}, {} |",
        m.duplicates.load(Ordering::Relaxed), m.misrouted.load(Ordering::Relaxed));
    println!("| chat sessions, messages sent (verified), copies expected, lost, duplicates | {}, {verified}, {copies}, {missing}, {dups} |",
        chat_tally.sessions.load(Ordering::Relaxed));
    println!("| chat re-sent after reconnect (same id), redelivered and filtered by seq, backlog entries | {}, {}, {} |",
        chat_tally.resent.load(Ordering::Relaxed), chat_tally.redelivered.load(Ordering::Relaxed),
        chat_tally.backlog_entries.load(Ordering::Relaxed));
    println!(
        "| groups created and left (leaves) | {}, {} |",
        chat_tally.groups_created.load(Ordering::Relaxed),
        chat_tally.groups_left.load(Ordering::Relaxed)
    );
    // How RSS moved with the chat requests a relay accepted after the warm-up: near 0 once the
    // deduplication memory is full, about its 72 bytes (plus the allocator's share) before.
    for (i, w) in watched
        .iter()
        .enumerate()
        .filter(|(_, w)| w.metrics.is_some())
    {
        let pts: Vec<(f64, f64)> = (0..during)
            .filter(|&k| times[k] >= warm_s)
            .map(|k| {
                let s = &samples[k][i];
                let accepted = s.3.get(ACCEPTED).copied().unwrap_or(0);
                (accepted as f64, s.0 as f64 * 1024.0)
            })
            .collect();
        let span = pts.last().map_or(0.0, |p| p.0) - pts.first().map_or(0.0, |p| p.0);
        println!(
            "| {}: chat requests accepted after the warm-up; RSS bytes per request (least squares) | {span:.0}; {:.1} |",
            w.name,
            slope(&pts)
        );
        // RSS and the heap in use over time, per hour: a leak shows in the heap, fragmentation
        // and high-water marks of kept buffers only in RSS.
        let per_hour = |f: &dyn Fn(&Point) -> u64| {
            let pts: Vec<(f64, f64)> = (0..during)
                .filter(|&k| times[k] >= warm_s)
                .map(|k| (times[k], f(&samples[k][i]) as f64))
                .collect();
            slope(&pts) * 3600.0 / 1024.0
        };
        println!(
            "| {}: after the warm-up, RSS and heap in use, KiB per hour (least squares) | {:.0}; {:.0} |",
            w.name,
            per_hour(&|p| p.0 * 1024),
            per_hour(&|p| p.3.get(HEAP).copied().unwrap_or(0))
        );
    }
    checks.push(("media flowed".into(), recv > 0));
    checks.push((
        format!("media loss within {MAX_MEDIA_LOSS_PERCENT} %"),
        loss <= MAX_MEDIA_LOSS_PERCENT,
    ));
    checks.push((
        "no media duplicates or misrouted packets".into(),
        m.duplicates.load(Ordering::Relaxed) == 0 && m.misrouted.load(Ordering::Relaxed) == 0,
    ));
    checks.push((
        "no binding refused".into(),
        m.refusals.load(Ordering::Relaxed) == 0,
    ));
    checks.push(("chat flowed".into(), verified > 0));
    checks.push((
        "every chat message acknowledged as sent".into(),
        chat_tally.unacknowledged.load(Ordering::Relaxed) == 0,
    ));
    checks.push(("no chat message lost".into(), missing == 0));
    checks.push(("no chat duplicates".into(), dups == 0));
    checks.push((
        "no errors".into(),
        media_errors.is_empty() && chat_errors.is_empty() && worker_errors.is_empty(),
    ));
    for e in media_errors
        .iter()
        .chain(&chat_errors)
        .chain(&worker_errors)
    {
        println!("error: {e}");
    }
    if let Some(d) = &died {
        println!("{d}");
    }
    checks.push(("every process ran to the end".into(), died.is_none()));
    let relays_clean = relays.iter_mut().map(Proc::stop).fold(true, |x, y| x & y);
    let ctl_clean = ctl_proc.stop();
    checks.push(("clean stop".into(), relays_clean && ctl_clean));
    println!();
    let mut ok = !STOP.load(Ordering::Relaxed);
    for (what, pass) in &checks {
        println!("{} {what}", if *pass { "ok  " } else { "FAIL" });
        ok &= pass;
    }
    println!(
        "\nsoak: CSV and plot in {} (soak.csv, soak.svg)",
        out.display()
    );
    drop(relays);
    drop(dir);
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_reached_and_held_passes_and_a_slope_does_not() {
        // Grows during the warm-up, then flat: bounded.
        let flat: Vec<(f64, u64)> = (0..60)
            .map(|t| (t as f64, if t < 20 { 100 + 10 * t } else { 300 }))
            .collect();
        assert!(bounded(&flat, 20.0, 5).2);
        // A steady slope after the warm-up, however small against the tolerance per step.
        let slope: Vec<(f64, u64)> = (0..60).map(|t| (t as f64, 1_000 + 2 * t)).collect();
        assert!(!bounded(&slope, 20.0, 5).2);
        assert!(
            bounded(&slope, 20.0, 100).2,
            "within a tolerance larger than the growth"
        );
        // Too few samples after the warm-up prove nothing.
        assert!(!bounded(&flat[..22], 20.0, 5).2);
    }

    #[test]
    fn the_slope_of_a_line_and_of_a_flat_series() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 1.0)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0), (2.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 7.0)]), 0.0, "no spread in x");
    }

    #[test]
    fn gaps_are_missing_indices_between_the_first_and_the_last() {
        let mut s = Stream::new(10);
        for i in [10, 11, 13, 14, 14] {
            s.insert(i);
        }
        assert_eq!((s.count, s.gaps()), (4, 1));
        s.insert(12);
        assert_eq!(s.gaps(), 0);
        // Joining late is not loss: the span starts at the first index received.
        let mut late = Stream::new(500);
        late.insert(500);
        late.insert(501);
        assert_eq!(late.gaps(), 0);
    }
}
