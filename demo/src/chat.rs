//! Simulated chat users: in each room the participants are also the members of one group chat
//! that the first of them creates. Each sends text messages at a steady pace, acknowledges what
//! it receives (which makes the relay send DELIVERED receipts to the authors) and sends READ
//! receipts. At the end every message the relay acknowledged as "sent" must have reached every
//! other member exactly once, and its author must hold a DELIVERED and a READ receipt from each.

use crate::http;
use crate::STOP;
use proto::chat::{kind, MsgId};
use relay::chat::client::{Client, Event};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often a user acknowledges and sends READ receipts.
const RECEIPT_INTERVAL: Duration = Duration::from_millis(100);
/// How long after the sending phase users may take to settle every receipt.
pub const SETTLE: Duration = Duration::from_secs(15);

/// A user's chat home, from ctl.
pub struct Home {
    pub user: u64,
    /// The account's device credential (it creates meetings, fetches its home).
    pub credential: String,
    pub addr: SocketAddr,
    pub token: String,
}

/// Counters the progress line reads.
#[derive(Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub read: AtomicU64,
}

/// What one room's members share: the group id once created, and who has settled.
pub struct Room {
    pub group: OnceLock<u64>,
    pub settled: Vec<AtomicBool>,
}

impl Room {
    pub fn new(members: usize) -> Self {
        Self {
            group: OnceLock::new(),
            settled: (0..members).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

/// What one user saw.
#[derive(Default)]
pub struct Outcome {
    pub user: u64,
    /// Messages the relay acknowledged as durable ("sent").
    pub sent: HashSet<MsgId>,
    /// Messages sent but never acknowledged (none expected on a healthy relay).
    pub unacknowledged: usize,
    /// Of `sent`, those with a DELIVERED receipt from every other member.
    pub delivered: usize,
    /// Of `sent`, those with a READ receipt from every other member.
    pub read: usize,
    /// (author, message id) of every text received.
    pub received: HashSet<(u64, MsgId)>,
    pub duplicates: u64,
    /// Other members this user's presence watch reported online at some point.
    pub seen_online: HashSet<u64>,
}

/// Signs each of `numbers` in by phone, as a client does: a verification session, the code
/// from ctl's SMS outbox (`outbox`, the development gateway), the device credential it gives;
/// then the user's own home with that credential (`GET /v1/me/home`).
pub fn sign_in(ctl: SocketAddr, outbox: &Path, numbers: &[String]) -> Result<Vec<Home>, String> {
    numbers
        .iter()
        .map(|number| {
            let body = serde_json::json!({ "number": number });
            let s = http::expect(ctl, "POST", "/v1/verification/sessions", Some(&body), 201)?;
            let (Some(id), Some(e164)) = (s["session_id"].as_str(), s["number"].as_str()) else {
                return Err(format!("verification session without an id: {s}"));
            };
            let code = code_in_outbox(outbox, e164)?;
            let body = serde_json::json!({ "code": code });
            let path = format!("/v1/verification/sessions/{id}/verify");
            let v = http::expect(ctl, "POST", &path, Some(&body), 200)?;
            let (Some(user), Some(credential)) =
                (v["user_id"].as_u64(), v["device_credential"].as_str())
            else {
                return Err(format!("sign-in without a credential: {v}"));
            };
            wait_home(user, credential, || {
                http::get_as(ctl, "/v1/me/home", credential)
            })
        })
        .collect()
}

/// The newest code in the outbox for `number`.
fn code_in_outbox(outbox: &Path, number: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(outbox).map_err(|e| format!("{}: {e}", outbox.display()))?;
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["to"] == number)
        .ok_or_else(|| format!("no code for {number} in {}", outbox.display()))?;
    Ok(line["body"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect())
}

/// A user's home from `fetch`, asked again until the relay reports its chat listener.
fn wait_home(
    user: u64,
    credential: &str,
    fetch: impl Fn() -> Result<serde_json::Value, String>,
) -> Result<Home, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = fetch()?;
        if let (Some(host), Some(port)) = (h["host"].as_str(), h["chat_port"].as_u64()) {
            return Ok(Home {
                user,
                credential: credential.to_string(),
                addr: format!("{host}:{port}")
                    .parse()
                    .map_err(|_| format!("bad chat home {h}"))?,
                token: h["token"].as_str().ok_or("home without token")?.to_string(),
            });
        }
        if Instant::now() > deadline {
            return Err(format!("ctl reports no chat port for user {user}: {h}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn io(e: std::io::Error) -> String {
    format!("chat: {e}")
}

fn seq_of(body: &[u8]) -> u64 {
    body.get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// Runs member `me` of `room` (member 0 creates the group) until its messages are settled and
/// so are everyone else's in the room, or until the deadline.
#[allow(clippy::too_many_arguments)]
pub fn user(
    me: usize,
    home: &Home,
    members: &[u64],
    room: &Room,
    per_second: f64,
    until: Instant,
    live: &Arc<Live>,
) -> Result<Outcome, String> {
    let mut c = Client::connect(home.addr, &home.token, Duration::from_secs(5)).map_err(io)?;
    let mut out = Outcome {
        user: home.user,
        ..Outcome::default()
    };
    // Everyone watches the others' presence: each shows up online once it connects.
    let others_ids: Vec<u64> = members
        .iter()
        .copied()
        .filter(|&u| u != home.user)
        .collect();
    c.watch_presence(&others_ids).map_err(io)?;
    if me == 0 {
        let id = relay::chat::client::new_msg_id();
        c.queue(|e| e.group_create(&id, &members[1..]));
        c.flush().map_err(io)?;
    }
    // Until the group exists, only member 0 has something to wait for.
    let wait_deadline = Instant::now() + Duration::from_secs(10);
    let group = loop {
        if let Some(g) = room.group.get() {
            break *g;
        }
        if Instant::now() > wait_deadline || STOP.load(Ordering::Relaxed) {
            return Err(format!("user {}: the group was never created", home.user));
        }
        match c.recv(Duration::from_millis(20)).map_err(io)? {
            Some(Event::Sent { chat, .. }) if me == 0 => {
                let _ = room.group.set(chat);
            }
            Some(Event::Presence { user, online: true }) => {
                out.seen_online.insert(user);
            }
            _ => {}
        }
    };
    let others = members.len() - 1;
    // Own messages: id -> seq once "sent".
    let mut mine: HashMap<MsgId, Option<u64>> = HashMap::new();
    // Highest seq each other member acknowledged (DELIVERED) and read (READ).
    let mut delivered_upto: HashMap<u64, u64> = HashMap::new();
    let mut read_upto: HashMap<u64, u64> = HashMap::new();
    let mut last_text: Option<(u64, MsgId)> = None;
    let mut read_sent_upto = 0u64;
    let interval = Duration::from_secs_f64(1.0 / per_second.max(0.01));
    let mut next_send = Instant::now() + interval.mul_f64((me as f64 + 1.0) / members.len() as f64);
    let mut next_receipts = Instant::now();
    let hard_deadline = until + SETTLE;
    let mut index = 0u64;
    loop {
        let now = Instant::now();
        if now >= hard_deadline || STOP.load(Ordering::Relaxed) {
            break;
        }
        if now < until && now >= next_send {
            let mut body = index.to_le_bytes().to_vec();
            body.extend_from_slice(format!(" hello from user {}", home.user).as_bytes());
            let id = c
                .send_group(group, kind::TEXT, &[0; 16], &body)
                .map_err(io)?;
            mine.insert(id, None);
            index += 1;
            next_send += interval;
        }
        if now >= next_receipts {
            c.ack_all().map_err(io)?;
            if let Some((seq, id)) = last_text.filter(|(seq, _)| *seq > read_sent_upto) {
                let rid = relay::chat::client::new_msg_id();
                c.queue(|e| e.send(&rid, group, 0, kind::READ, &id, &seq.to_le_bytes()));
                c.flush().map_err(io)?;
                read_sent_upto = seq;
            }
            next_receipts = now + RECEIPT_INTERVAL;
        }
        let wake = if now < until {
            next_send.min(next_receipts)
        } else {
            next_receipts
        };
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let event = c.recv(wait).map_err(io)?;
        // Only "sent", DELIVERED and READ change the receipt counts below.
        let receipts_changed = matches!(&event, Some(Event::Sent { .. }))
            || matches!(&event, Some(Event::Message(m))
                if m.chat == group && matches!(m.kind, kind::DELIVERED | kind::READ));
        match event {
            Some(Event::Sent { msg_id, seq, .. }) => {
                if let Some(slot) = mine.get_mut(&msg_id) {
                    if slot.is_none() {
                        live.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    *slot = Some(seq);
                }
            }
            Some(Event::Message(m)) if m.chat == group => match m.kind {
                kind::TEXT if m.sender != home.user => {
                    if out.received.insert((m.sender, m.msg_id)) {
                        live.delivered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        out.duplicates += 1;
                    }
                    last_text = Some((m.seq, m.msg_id));
                }
                kind::DELIVERED => {
                    let e = delivered_upto.entry(m.sender).or_default();
                    *e = (*e).max(seq_of(&m.body));
                }
                kind::READ if m.sender != home.user => {
                    let e = read_upto.entry(m.sender).or_default();
                    *e = (*e).max(seq_of(&m.body));
                }
                _ => {}
            },
            Some(Event::Presence { user, online: true }) => {
                out.seen_online.insert(user);
            }
            Some(Event::Error { code, text, .. }) => {
                return Err(format!("user {}: relay error {code}: {text}", home.user));
            }
            _ => {}
        }
        if receipts_changed {
            // Receipts are cumulative: a message is covered when every other member's highest
            // receipt reached its seq.
            let floor = |upto: &HashMap<u64, u64>| {
                members
                    .iter()
                    .filter(|&&u| u != home.user)
                    .map(|u| upto.get(u).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(u64::MAX)
            };
            let (d, r) = (floor(&delivered_upto), floor(&read_upto));
            let seqs = || mine.values().filter_map(|s| *s);
            let (n_delivered, n_read) = (
                seqs().filter(|&s| s <= d).count(),
                seqs().filter(|&s| s <= r).count(),
            );
            if n_read > out.read {
                live.read
                    .fetch_add((n_read - out.read) as u64, Ordering::Relaxed);
            }
            out.delivered = n_delivered;
            out.read = n_read;
        }
        let settled = now >= until
            && out.seen_online.len() == others
            && mine.values().all(Option::is_some)
            && out.delivered == mine.len()
            && out.read == mine.len()
            && others > 0;
        room.settled[me].store(settled, Ordering::Relaxed);
        // Stay until the whole room has settled: the others need this user's receipts.
        if settled && room.settled.iter().all(|s| s.load(Ordering::Relaxed)) {
            // One last round so that the final receipts leave.
            c.ack_all().map_err(io)?;
            break;
        }
    }
    out.sent = mine
        .iter()
        .filter(|(_, s)| s.is_some())
        .map(|(id, _)| *id)
        .collect();
    out.unacknowledged = mine.len() - out.sent.len();
    out.duplicates += c.duplicates;
    Ok(out)
}

/// Chat totals over all rooms.
#[derive(Default)]
pub struct Totals {
    pub sent: usize,
    pub unacknowledged: usize,
    /// Copies that should have arrived: each sent message times the other members.
    pub expected: usize,
    pub received: usize,
    pub lost: usize,
    pub duplicates: u64,
    pub delivered: usize,
    pub read: usize,
    /// Users whose presence watch saw every other member of the room online.
    pub presence_complete: usize,
    pub users: usize,
}

/// Checks every acknowledged message against every other member's received set.
pub fn totals(rooms: &[Vec<Outcome>]) -> Totals {
    let mut t = Totals::default();
    for room in rooms {
        for author in room {
            t.sent += author.sent.len();
            t.unacknowledged += author.unacknowledged;
            t.delivered += author.delivered;
            t.read += author.read;
            t.duplicates += author.duplicates;
            t.users += 1;
            if author.seen_online.len() + 1 == room.len() {
                t.presence_complete += 1;
            }
            for reader in room.iter().filter(|r| r.user != author.user) {
                for id in &author.sent {
                    t.expected += 1;
                    if reader.received.contains(&(author.user, *id)) {
                        t.received += 1;
                    } else {
                        t.lost += 1;
                    }
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(user: u64, sent: &[u8], received: &[(u64, u8)]) -> Outcome {
        Outcome {
            user,
            sent: sent.iter().map(|&b| [b; 16]).collect(),
            delivered: sent.len(),
            read: sent.len(),
            received: received.iter().map(|&(a, b)| (a, [b; 16])).collect(),
            ..Outcome::default()
        }
    }

    #[test]
    fn a_copy_missing_from_one_member_counts_as_lost() {
        // Users 1, 2, 3; user 1 sent messages 1 and 2; user 3 never got message 2.
        let room = vec![
            user(1, &[1, 2], &[]),
            user(2, &[], &[(1, 1), (1, 2)]),
            user(3, &[], &[(1, 1)]),
        ];
        let t = totals(&[room]);
        assert_eq!((t.sent, t.expected, t.received, t.lost), (2, 4, 3, 1));
    }

    #[test]
    fn a_complete_room_loses_nothing() {
        let room = vec![user(1, &[1], &[(2, 2)]), user(2, &[2], &[(1, 1)])];
        let t = totals(&[room]);
        assert_eq!((t.sent, t.expected, t.received, t.lost), (2, 2, 2, 0));
    }
}
