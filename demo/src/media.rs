//! Simulated conference participants: each joins through ctl, binds its UDP socket to the
//! relay with STUN, publishes an audio stream (50 packets/s of 160 bytes) and a video stream
//! (30 frames/s of 3 packets of 1,000 bytes), and receives everyone else's. Every packet carries
//! its send time and its index, so receivers measure latency on one clock and count each
//! (stream, index) once: loss is what publishers sent times the room's other participants, less
//! what arrived.

use crate::http;
use crate::STOP;
use hdrhistogram::Histogram;
use proto::binding::{Answer, Binding};
use serde_json::{json, Value};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
const AUDIO_BYTES: usize = 160;
const VIDEO_FRAME_INTERVAL: Duration = Duration::from_micros(33_333);
const VIDEO_PACKETS_PER_FRAME: u64 = 3;
const VIDEO_BYTES: usize = 1_000;
/// How long receivers keep listening after the publishers stop.
const GRACE: Duration = Duration::from_millis(500);
/// Streams per participant: audio and video.
const STREAMS: u32 = 2;

/// A participant's admission, from ctl.
#[derive(Clone)]
pub struct Admission {
    pub relay: SocketAddr,
    pub token: String,
    pub participant_id: u64,
    /// The meeting's code, for renewing the token (`rejoin_token`).
    pub code: String,
    /// The token's expiry, unix seconds.
    pub expires_at: u64,
}

/// Counters the progress line reads while the run goes on.
#[derive(Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// What one participant saw.
#[derive(Debug)]
pub struct Outcome {
    /// Packets it published, per stream (audio, video).
    pub sent: [u64; STREAMS as usize],
    /// Distinct packets it received, per publisher ssrc.
    pub received: Vec<(u32, u64)>,
    pub duplicates: u64,
    /// RTP packets that were not from another member of this room (its own, another room's).
    pub misrouted: u64,
    /// Binding refreshes the relay refused (none expected: the token is renewed in time).
    pub refusals: u64,
    /// Binding requests sent, the first one and every refresh.
    pub binding_requests: u64,
    pub latency_us: Histogram<u64>,
}

/// Creates a meeting per host (the device credential of a signed-in account) through ctl and
/// admits `participants` to each (the host is the first; the others join by the code, as
/// guests). Returns the admissions per room.
pub fn join_rooms(
    ctl: SocketAddr,
    hosts: &[&str],
    participants: usize,
) -> Result<Vec<Vec<Admission>>, String> {
    let mut out = Vec::new();
    for (r, host) in hosts.iter().enumerate() {
        let body = json!({"title": format!("demo room {r}"), "host_name": "p0"});
        let (status, m) = http::call_as(ctl, "POST", "/v1/meetings", Some(&body), Some(host))?;
        if status != 201 {
            return Err(format!("ctl POST /v1/meetings: {status} {m}"));
        }
        let code = m["code"]
            .as_str()
            .ok_or("meeting without a code")?
            .to_string();
        let mut joins = vec![m["join"].clone()];
        for p in 1..participants {
            joins.push(http::expect(
                ctl,
                "POST",
                "/v1/join",
                Some(&json!({"code": code, "name": format!("p{p}")})),
                200,
            )?);
        }
        out.push(
            joins
                .iter()
                .map(|j| admission(j, &code))
                .collect::<Result<_, _>>()?,
        );
    }
    Ok(out)
}

pub fn admission(j: &Value, code: &str) -> Result<Admission, String> {
    let relay = format!(
        "{}:{}",
        j["relay_host"].as_str().unwrap_or("?"),
        j["udp_port"]
    )
    .parse()
    .map_err(|_| format!("ctl's join answer names no relay: {j}"))?;
    Ok(Admission {
        relay,
        token: j["token"].as_str().ok_or("join without token")?.to_string(),
        participant_id: j["participant_id"].as_u64().ok_or("join without id")?,
        code: code.to_string(),
        expires_at: j["expires_at"].as_u64().ok_or("join without expiry")?,
    })
}

/// A fresh token for the same participant (`POST /v1/join` with `rejoin_token`), taken when
/// the current one has less than [`RENEW_BEFORE_S`] left: a relay refuses to refresh a
/// binding with an expired token, so a session longer than ctl's `token_ttl_s` needs it.
pub fn renew(ctl: SocketAddr, a: &Admission) -> Result<Admission, String> {
    let j = http::expect(
        ctl,
        "POST",
        "/v1/join",
        Some(&json!({"code": a.code, "rejoin_token": a.token})),
        200,
    )?;
    let renewed = admission(&j, &a.code)?;
    if renewed.participant_id != a.participant_id {
        return Err(format!(
            "rejoin gave participant {} instead of {}",
            renewed.participant_id, a.participant_id
        ));
    }
    Ok(renewed)
}

/// How long before its expiry a token is renewed.
pub const RENEW_BEFORE_S: u64 = 60;

/// The relay's default binding TTL (PROTOCOL.md section 3); bindings are refreshed every third
/// of it.
pub const BINDING_TTL_US: u64 = 30_000_000;

/// Monotonic microseconds since the first call, the clock of [`Binding`].
pub fn mono_us() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Unix seconds.
pub fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The ssrc of stream `s` of participant `p` in room `r`: unique across the demo.
fn ssrc(room: usize, p: usize, s: u32) -> u32 {
    0x1000_0000 | ((room as u32) << 12) | ((p as u32) << 2) | s
}

/// Whether `x` is a stream of another participant of `room` (which has `members`), i.e. what
/// participant `me` of it should receive.
fn from_room_peer(x: u32, room: usize, me: usize, members: usize) -> bool {
    let (r, p, s) = (
        ((x >> 12) & 0xffff) as usize,
        ((x >> 2) & 0x3ff) as usize,
        x & 3,
    );
    x & 0xf000_0000 == 0x1000_0000 && r == room && p != me && p < members && s < STREAMS
}

/// Binds `sock` to the relay: Binding requests, retransmitted, until the relay answers; a
/// refusal or 5 s without an answer is an error. Returns the binding, to be kept refreshed.
pub fn bind(sock: &UdpSocket, a: &Admission) -> Result<Binding, String> {
    let key = proto::token::stun_key(a.token.as_bytes());
    let mut b = Binding::new(a.token.as_bytes(), &key, a.participant_id, BINDING_TTL_US);
    let mut req = [0u8; 512];
    let mut resp = [0u8; 2048];
    let deadline = mono_us() + 5_000_000;
    while mono_us() < deadline {
        if let Some(n) = b.poll_transmit(mono_us(), &mut req) {
            sock.send(&req[..n]).map_err(|e| format!("bind: {e}"))?;
        }
        let wait = b.poll_timeout().saturating_sub(mono_us()).max(1_000);
        sock.set_read_timeout(Some(Duration::from_micros(wait)))
            .map_err(|e| e.to_string())?;
        while let Ok(m) = sock.recv(&mut resp) {
            match b.handle_response(mono_us(), &resp[..m]) {
                Some(Answer::Bound) => return Ok(b),
                // The relay's cookie came: the request goes again at once.
                Some(Answer::Challenged) => break,
                Some(Answer::Refused(code)) => {
                    return Err(format!(
                        "participant {}: the relay refused the binding with {code}",
                        a.participant_id
                    ))
                }
                None => {}
            }
        }
    }
    Err(format!(
        "participant {}: no STUN answer from {}",
        a.participant_id, a.relay
    ))
}

/// Distinct indices seen, as a growable bitset.
#[derive(Default)]
pub struct Seen(Vec<u64>);

impl Seen {
    /// Marks `i`; false if it was already marked.
    pub fn insert(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let fresh = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        fresh
    }
}

/// A socket bound to the relay for `a`. Everyone binds before anyone publishes, so that no
/// packet is sent to a room whose members are not all there yet.
pub fn connect(a: &Admission) -> Result<(UdpSocket, Binding), String> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.connect(a.relay).map_err(|e| e.to_string())?;
    let b = bind(&sock, a)?;
    Ok((sock, b))
}

/// A bound participant: its socket, its binding (kept refreshed), its admission (renewed
/// before it expires) and ctl, which renews it.
pub struct Session {
    pub sock: UdpSocket,
    pub binding: Binding,
    pub admission: Admission,
    pub ctl: SocketAddr,
}

impl Session {
    /// Sends a refresh if one is due and renews the token shortly before it expires.
    fn keep_alive(&mut self, buf: &mut [u8]) -> Result<(), String> {
        if unix_s() + RENEW_BEFORE_S >= self.admission.expires_at {
            self.admission = renew(self.ctl, &self.admission)?;
            let key = proto::token::stun_key(self.admission.token.as_bytes());
            self.binding
                .set_token(self.admission.token.as_bytes(), &key);
        }
        if let Some(n) = self.binding.poll_transmit(mono_us(), buf) {
            match self.sock.send(&buf[..n]) {
                Ok(_) => {}
                // A lost request is retransmitted.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("binding refresh: {e}")),
            }
        }
        Ok(())
    }

    /// When [`Session::keep_alive`] has something to do next.
    fn next_keep_alive(&self) -> Instant {
        let us = self.binding.poll_timeout().saturating_sub(mono_us());
        Instant::now() + Duration::from_micros(us)
    }
}

/// Runs participant `p` of room `room` on its bound session until `until` plus the grace
/// period, refreshing its binding every third of the relay's TTL and renewing its token.
pub fn participant(
    room: usize,
    p: usize,
    members: usize,
    session: &mut Session,
    epoch: Instant,
    until: Instant,
    live: &Arc<Live>,
) -> Result<Outcome, String> {
    let mut out = Outcome {
        sent: [0; STREAMS as usize],
        received: Vec::new(),
        duplicates: 0,
        misrouted: 0,
        refusals: 0,
        binding_requests: 0,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    };
    let mut stun_buf = [0u8; 512];
    let mut seen: Vec<(u32, Seen, u64)> = Vec::new();
    let mut buf = [0u8; 2048];
    let mut pkt = [0u8; 1200];
    let mut payload = [0u8; VIDEO_BYTES];
    let start = Instant::now();
    let (mut next_audio, mut next_video) = (start, start + Duration::from_millis(p as u64 % 20));
    let end = until + GRACE;
    loop {
        let now = Instant::now();
        if now >= end || STOP.load(Ordering::Relaxed) {
            break;
        }
        let sending = now < until;
        session.keep_alive(&mut stun_buf)?;
        let sock = &session.sock;
        if sending && now >= next_audio {
            send(
                sock,
                &mut pkt,
                &mut payload[..AUDIO_BYTES],
                ssrc(room, p, 0),
                out.sent[0],
                epoch,
            )?;
            out.sent[0] += 1;
            live.sent.fetch_add(1, Ordering::Relaxed);
            next_audio += AUDIO_INTERVAL;
        }
        if sending && now >= next_video {
            for _ in 0..VIDEO_PACKETS_PER_FRAME {
                send(
                    sock,
                    &mut pkt,
                    &mut payload,
                    ssrc(room, p, 1),
                    out.sent[1],
                    epoch,
                )?;
                out.sent[1] += 1;
            }
            live.sent
                .fetch_add(VIDEO_PACKETS_PER_FRAME, Ordering::Relaxed);
            next_video += VIDEO_FRAME_INTERVAL;
        }
        let wake = if sending {
            next_audio.min(next_video)
        } else {
            end
        }
        .min(session.next_keep_alive());
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(200));
        sock.set_read_timeout(Some(wait))
            .map_err(|e| e.to_string())?;
        // Wait for the first datagram, then take what is queued without waiting (one switch to
        // non-blocking per wake-up, not a timeout per packet), then back to sending.
        let mut draining = false;
        while let Ok(n) = sock.recv(&mut buf) {
            if !draining {
                sock.set_nonblocking(true).map_err(|e| e.to_string())?;
                draining = true;
            }
            let now = Instant::now();
            if buf[0] < 4 {
                if let Some(Answer::Refused(_)) =
                    session.binding.handle_response(mono_us(), &buf[..n])
                {
                    out.refusals += 1;
                }
                continue;
            }
            let Ok(rtp) = proto::rtp::RtpPacket::parse(&buf[..n]) else {
                continue; // RTCP
            };
            let body = rtp.payload();
            if body.len() < 16 || !from_room_peer(rtp.ssrc(), room, p, members) {
                out.misrouted += 1;
                continue;
            }
            let sent_ns = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            let index = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
            let now_ns = now.duration_since(epoch).as_nanos() as u64;
            let _ = out
                .latency_us
                .record((now_ns.saturating_sub(sent_ns) / 1_000).max(1));
            let s = match seen.iter().position(|(x, _, _)| *x == rtp.ssrc()) {
                Some(i) => i,
                None => {
                    seen.push((rtp.ssrc(), Seen::default(), 0));
                    seen.len() - 1
                }
            };
            if seen[s].1.insert(index) {
                seen[s].2 += 1;
                live.received.fetch_add(1, Ordering::Relaxed);
            } else {
                out.duplicates += 1;
            }
            if now >= wake {
                break;
            }
        }
        if draining {
            sock.set_nonblocking(false).map_err(|e| e.to_string())?;
        }
    }
    out.received = seen.iter().map(|&(x, _, n)| (x, n)).collect();
    out.binding_requests = u64::from(session.binding.requests_sent());
    Ok(out)
}

fn send(
    sock: &UdpSocket,
    pkt: &mut [u8],
    payload: &mut [u8],
    ssrc: u32,
    index: u64,
    epoch: Instant,
) -> Result<(), String> {
    payload[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
    payload[8..16].copy_from_slice(&index.to_le_bytes());
    let pt = if ssrc & 1 == 0 { 111 } else { 96 };
    let n = proto::rtp::write_packet(
        pkt,
        pt,
        index as u16,
        (index * 960) as u32,
        ssrc,
        false,
        payload,
    )
    .ok_or("RTP packet does not fit")?;
    match sock.send(&pkt[..n]) {
        Ok(_) => Ok(()),
        // A full socket buffer drops the packet; it shows as loss, as it would in service.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(format!("sending media: {e}")),
    }
}

/// Media totals over every participant of every room.
pub struct Totals {
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub misrouted: u64,
    pub refusals: u64,
    pub binding_requests: u64,
    pub silent_receivers: usize,
    pub latency_us: Histogram<u64>,
}

/// Loss accounting: each packet a participant published should reach the room's others once.
pub fn totals(rooms: &[Vec<Outcome>]) -> Totals {
    let mut t = Totals {
        sent: 0,
        expected: 0,
        received: 0,
        duplicates: 0,
        misrouted: 0,
        refusals: 0,
        binding_requests: 0,
        silent_receivers: 0,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    };
    for room in rooms {
        let others = room.len().saturating_sub(1) as u64;
        for o in room {
            let sent: u64 = o.sent.iter().sum();
            t.sent += sent;
            t.expected += sent * others;
            t.received += o.received.iter().map(|(_, c)| c).sum::<u64>();
            t.duplicates += o.duplicates;
            t.misrouted += o.misrouted;
            t.refusals += o.refusals;
            t.binding_requests += o.binding_requests;
            if others > 0 && o.received.is_empty() {
                t.silent_receivers += 1;
            }
            let _ = t.latency_us.add(&o.latency_us);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(sent: [u64; 2], received: &[(u32, u64)]) -> Outcome {
        Outcome {
            sent,
            received: received.to_vec(),
            duplicates: 0,
            misrouted: 0,
            refusals: 0,
            binding_requests: 0,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        }
    }

    #[test]
    fn only_other_members_of_the_room_count() {
        let x = ssrc(3, 2, 1);
        assert!(from_room_peer(x, 3, 0, 4));
        assert!(!from_room_peer(x, 3, 2, 4), "its own stream");
        assert!(!from_room_peer(x, 4, 0, 4), "another room's");
        assert!(!from_room_peer(x, 3, 0, 2), "not a member");
        assert!(!from_room_peer(0xdead_beef, 3, 0, 4));
    }

    #[test]
    fn expected_is_what_each_published_times_the_others() {
        // Three participants, each publishing 10 + 20; participant 2 missed 5 packets of 0's.
        let room = vec![
            outcome([10, 20], &[(2, 30), (3, 30)]),
            outcome([10, 20], &[(1, 30), (3, 30)]),
            outcome([10, 20], &[(1, 25), (2, 30)]),
        ];
        let t = totals(&[room]);
        assert_eq!((t.sent, t.expected, t.received), (90, 180, 175));
        assert_eq!(t.silent_receivers, 0);
        let deaf = vec![outcome([1, 0], &[]), outcome([1, 0], &[(1, 1)])];
        assert_eq!(totals(&[deaf]).silent_receivers, 1);
    }

    #[test]
    fn seen_counts_each_index_once() {
        let mut s = Seen::default();
        assert!(s.insert(0) && s.insert(1000) && !s.insert(1000) && s.insert(63));
    }
}
