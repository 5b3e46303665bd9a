//! Chat across relays: one ctl and three linked relays as real processes, each relay in its
//! own network namespace with its own address (as root, as `cargo xtask up` runs them), or
//! else each on its own loopback address.

use super::ctl_e2e::{ctl_binary, ctl_credential, http, wait_until, Proc};
use proto::chat::{code, kind, MsgId};
use relay::chat::client::{new_msg_id, Client, Event, Message};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Cluster {
    ctl: SocketAddr,
    _ctl_proc: Proc,
    relays: Vec<Proc>,
    /// Dropped after the processes.
    hosts: Hosts,
}

/// Where the relays of one test's cluster (number `net`) live.
struct Hosts {
    net: u8,
    /// A bridge and a namespace per relay (root), or none (loopback addresses).
    spaces: Option<(super::netns::Bridge, Vec<super::netns::Netns>)>,
}

impl Hosts {
    fn new(net: u8, n: u32) -> Self {
        let spaces = super::netns::available().then(|| {
            let bridge = super::netns::Bridge::numbered(u32::from(net)).expect("a bridge");
            let spaces = (1..=n)
                .map(|i| super::netns::Netns::create(&bridge, i).expect("a namespace"))
                .collect();
            (bridge, spaces)
        });
        Self { net, spaces }
    }

    /// The address of relay `id`: in its namespace, or a loopback address of its own that no
    /// other test binds (they use 127.0.0.1), so that fixed ports cannot collide.
    fn relay(&self, id: u32) -> String {
        match &self.spaces {
            Some((_, spaces)) => spaces[id as usize - 1].ns_ip.clone(),
            None => format!("127.0.{}.{id}", self.net),
        }
    }

    /// Where ctl listens: the bridge (every namespace's gateway), or loopback.
    fn ctl(&self) -> String {
        match &self.spaces {
            Some((bridge, _)) => bridge.ip.clone(),
            None => "127.0.0.1".into(),
        }
    }

    /// `program` as relay `id` runs it.
    fn command(&self, id: u32, program: &Path) -> Command {
        match &self.spaces {
            Some((_, spaces)) => spaces[id as usize - 1].command(program),
            None => Command::new(program),
        }
    }
}

/// Ports of every cluster relay, each on its own address.
const BASE_PORT: u16 = 33_000;

/// ctl waiting for `n` linked relays, and `n` relays of 2 shards, each on its own host.
fn start_cluster(dir: &Path, n: u32, net: u8) -> Cluster {
    std::fs::create_dir_all(dir).unwrap();
    let hosts = Hosts::new(net, n);
    let cfg = dir.join("ctl.toml");
    std::fs::write(&cfg, format!("cluster_relays = {n}\n")).unwrap();
    let mut cmd = Command::new(ctl_binary());
    cmd.args(["serve", "--config", cfg.to_str().unwrap()])
        .args(["--listen", &format!("{}:0", hosts.ctl())])
        .args(["--data-dir", dir.join("ctl").to_str().unwrap()]);
    let ctl_proc = Proc::start(cmd);
    let ctl: SocketAddr = ctl_proc.field("listen").parse().unwrap();
    ADMIN
        .lock()
        .unwrap()
        .insert(ctl, ctl_credential(&dir.join("ctl"), &["admin"]));
    // Each relay waits for the others before it says it is ready: start them together.
    let starting: Vec<_> = (1..=n)
        .map(|id| {
            let cmd = relay_command(dir, ctl, &hosts, id);
            std::thread::spawn(move || Proc::start(cmd))
        })
        .collect();
    let relays = starting.into_iter().map(|t| t.join().unwrap()).collect();
    Cluster {
        ctl,
        _ctl_proc: ctl_proc,
        relays,
        hosts,
    }
}

/// Relay `id` of a cluster, on its data directory under `dir`.
fn relay_command(dir: &Path, ctl: SocketAddr, hosts: &Hosts, id: u32) -> Command {
    let host = hosts.relay(id);
    let base = BASE_PORT;
    let mut cmd = hosts.command(id, Path::new(env!("CARGO_BIN_EXE_relay")));
    cmd.args(["--io", "batch", "--shards", "2", "--no-pin"])
        .args(["--metrics", &format!("{host}:0")])
        .args(["--bind", &host, "--advertise-host", &host])
        .args(["--base-port", &base.to_string()])
        .args(["--chat-port", &(base + 4).to_string()])
        .args(["--link-port", &(base + 8).to_string()])
        .args(["--relay-id", &id.to_string()])
        .args([
            "--data-dir",
            dir.join(format!("relay-{id}")).to_str().unwrap(),
        ])
        .args(["--ctl", &format!("http://{ctl}")])
        .env(
            "RELAY_CTL_TOKEN",
            ctl_credential(&dir.join("ctl"), &["relay", &id.to_string()]),
        );
    cmd
}

/// The admin credential of each running test ctl, by its address: the test process reaches a
/// ctl in another network namespace from a bridge address, not loopback.
static ADMIN: std::sync::Mutex<BTreeMap<SocketAddr, String>> =
    std::sync::Mutex::new(BTreeMap::new());

/// An admin request to the test ctl at `ctl`.
fn admin(ctl: SocketAddr, method: &str, path: &str) -> (u16, serde_json::Value) {
    let cred = ADMIN.lock().unwrap().get(&ctl).cloned();
    http(ctl, method, path, None, cred.as_deref())
}

/// A user's session at the home ctl gives it, and what it has seen.
struct User {
    id: u64,
    relay: u64,
    c: Client,
    /// Messages, per chat, in arrival order.
    msgs: BTreeMap<u64, Vec<Message>>,
    sent: HashMap<MsgId, (u64, u64)>,
    /// Requests answered with ERROR 13 (the owner's relay not reachable yet): sent again.
    retry: Vec<MsgId>,
    /// ERROR 13s seen.
    unavailable: u64,
    /// SENDs sent again for want of an answer in 2 s.
    resent: u64,
    typing: Vec<(u64, u64)>,
    presence: Vec<(u64, bool)>,
}

impl User {
    fn connect(ctl: SocketAddr, id: u64) -> Self {
        let (status, h) = admin(ctl, "GET", &format!("/v1/users/{id}/home"));
        assert_eq!(status, 200, "{h}");
        let addr: SocketAddr = format!("{}:{}", h["host"].as_str().unwrap(), h["chat_port"])
            .parse()
            .unwrap();
        let c = Client::connect(addr, h["token"].as_str().unwrap(), Duration::from_secs(5))
            .expect("chat session");
        Self {
            id,
            relay: h["relay_id"].as_u64().unwrap(),
            c,
            msgs: BTreeMap::new(),
            sent: HashMap::new(),
            retry: Vec::new(),
            unavailable: 0,
            resent: 0,
            typing: Vec::new(),
            presence: Vec::new(),
        }
    }

    /// Takes what has arrived, waiting at most `wait` for the first event.
    fn pump(&mut self, wait: Duration) {
        self.try_pump(wait).expect("session open");
    }

    /// [`User::pump`]; an error when the session is gone.
    fn try_pump(&mut self, wait: Duration) -> std::io::Result<()> {
        let mut wait = wait;
        while let Some(e) = self.c.recv(wait)? {
            wait = Duration::ZERO;
            match e {
                Event::Message(m) => self.msgs.entry(m.chat).or_default().push(m),
                Event::Sent { msg_id, chat, seq } => {
                    // A SEND sent again may be answered twice: with the same seq.
                    let first = *self.sent.entry(msg_id).or_insert((chat, seq));
                    assert_eq!(first, (chat, seq), "user {}: two SENTs differ", self.id);
                }
                Event::Error {
                    code: code::UNAVAILABLE,
                    msg_id,
                    ..
                } => {
                    self.unavailable += 1;
                    self.retry.push(msg_id);
                }
                Event::Error { code, text, .. } => panic!("user {}: error {code}: {text}", self.id),
                Event::Typing { chat, from } => self.typing.push((chat, from)),
                Event::Presence { user, online } => self.presence.push((user, online)),
                Event::BacklogEnd | Event::Groups(_) | Event::Pong => {}
            }
        }
        Ok(())
    }

    /// A new session at the home ctl gives now, keeping what the client has seen; retried
    /// every 100 ms until `within` passes.
    fn reconnect(&mut self, ctl: SocketAddr, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            assert!(Instant::now() < deadline, "user {} found no home", self.id);
            let (status, h) = admin(ctl, "GET", &format!("/v1/users/{}/home", self.id));
            if status == 200 {
                let addr: SocketAddr =
                    format!("{}:{}", h["host"].as_str().unwrap(), h["chat_port"])
                        .parse()
                        .unwrap();
                let token = h["token"].as_str().unwrap();
                if let Ok(mut c) = Client::connect(addr, token, Duration::from_secs(1)) {
                    c.set_last_seqs(self.c.last_seqs().clone());
                    self.c = c;
                    self.relay = h["relay_id"].as_u64().unwrap();
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn texts(&self, chat: u64) -> Vec<(u64, Vec<u8>)> {
        self.msgs
            .get(&chat)
            .into_iter()
            .flatten()
            .filter(|m| m.kind == kind::TEXT)
            .map(|m| (m.sender, m.body.clone()))
            .collect()
    }
}

/// A SEND, kept so that an ERROR 13 can be answered by sending it again with the same id.
#[derive(Clone)]
struct Send {
    id: MsgId,
    chat: u64,
    to: u64,
    kind: u8,
    ref_id: MsgId,
    body: Vec<u8>,
}

fn send(u: &mut User, s: &Send) {
    u.c.queue(|e| e.send(&s.id, s.chat, s.to, s.kind, &s.ref_id, &s.body));
    u.c.flush().unwrap();
}

/// Pumps every session, resending what got ERROR 13, until `done` or `within` passes.
fn pump_until(
    users: &mut [User],
    sends: &HashMap<MsgId, (usize, Send)>,
    within: Duration,
    what: &str,
    mut done: impl FnMut(&[User]) -> bool,
) {
    let deadline = Instant::now() + within;
    // A SEND not answered in 2 s is sent again with the same id, as a client does (PROTOCOL.md
    // 7.3, 8): its SENT may have been lost with a link that was not up yet.
    let mut last_try: HashMap<MsgId, Instant> = HashMap::new();
    loop {
        for u in users.iter_mut() {
            u.pump(Duration::from_millis(2));
        }
        let now = Instant::now();
        for (id, (i, s)) in sends {
            let Some(u) = users.get_mut(*i) else { continue };
            if u.sent.contains_key(id) {
                continue;
            }
            let t = last_try.entry(*id).or_insert(now);
            if now.duration_since(*t) >= Duration::from_secs(2) {
                *t = now;
                u.resent += 1;
                send(u, s);
            }
        }
        for u in users.iter_mut() {
            for id in std::mem::take(&mut u.retry) {
                let (_, s) = sends.get(&id).expect("an ERROR 13 for a request we made");
                std::thread::sleep(Duration::from_millis(20));
                send(u, s);
            }
        }
        if done(users) {
            return;
        }
        if Instant::now() >= deadline {
            for u in users.iter() {
                eprintln!(
                    "user {} (relay {}): {} SENT, texts per chat {:?}",
                    u.id,
                    u.relay,
                    u.sent.len(),
                    u.msgs
                        .iter()
                        .map(|(c, m)| (c % 1000, m.len()))
                        .collect::<Vec<_>>()
                );
            }
            panic!("timed out waiting for {what}");
        }
    }
}

#[test]
fn sixty_users_on_three_relays_chat_exactly_once_in_order_with_receipts_typing_and_presence() {
    let dir = std::env::temp_dir().join(format!("relay-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = start_cluster(&dir, 3, 1);
    assert_eq!(cluster.relays.len(), 3);
    wait_until("three relays alive", Duration::from_secs(10), || {
        http(cluster.ctl, "GET", "/health", None, None).1["relays_alive"] == 3
    });
    let mut users: Vec<User> = (1..=60).map(|id| User::connect(cluster.ctl, id)).collect();
    let per_relay: BTreeMap<u64, usize> = users.iter().fold(BTreeMap::new(), |mut m, u| {
        *m.entry(u.relay).or_default() += 1;
        m
    });
    assert_eq!(
        per_relay.len(),
        3,
        "every relay homes some users: {per_relay:?}"
    );
    let n = users.len();
    let mut sends: HashMap<MsgId, (usize, Send)> = HashMap::new();
    // 1:1: each user writes 3 messages to the next one (the last to the first).
    let partner = |i: usize| (i + 1) % n;
    let crossing = (0..n)
        .filter(|&i| users[i].relay != users[partner(i)].relay)
        .count();
    assert!(crossing >= 20, "only {crossing} of the pairs cross relays");
    for k in 0..3u8 {
        for i in 0..n {
            let to = users[partner(i)].id;
            let s = Send {
                id: new_msg_id(),
                chat: 0,
                to,
                kind: kind::TEXT,
                ref_id: [0; 16],
                body: vec![k, i as u8],
            };
            send(&mut users[i], &s);
            sends.insert(s.id, (i, s));
        }
    }
    // A group of 12 with members on every relay, created by user 1.
    let members: Vec<u64> = (2..=12).collect();
    let create = new_msg_id();
    users[0].c.queue(|e| e.group_create(&create, &members));
    users[0].c.flush().unwrap();
    let mut group = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tried = Instant::now();
    while group == 0 {
        assert!(Instant::now() < deadline, "group never created");
        users[0].pump(Duration::from_millis(50));
        if let Some(&(chat, _)) = users[0].sent.get(&create) {
            group = chat;
        }
        // Refused (ERROR 13) or unanswered for 2 s: the same request again.
        if users[0].retry.contains(&create) || tried.elapsed() >= Duration::from_secs(2) {
            users[0].retry.retain(|id| *id != create);
            tried = Instant::now();
            std::thread::sleep(Duration::from_millis(100));
            users[0].c.queue(|e| e.group_create(&create, &members));
            users[0].c.flush().unwrap();
        }
    }
    let group_relays: BTreeSet<u64> = users[..12].iter().map(|u| u.relay).collect();
    assert_eq!(group_relays.len(), 3, "the group spans every relay");
    for i in [2usize, 5, 9] {
        for k in 0..2u8 {
            let s = Send {
                id: new_msg_id(),
                chat: group,
                to: 0,
                kind: kind::TEXT,
                ref_id: [0; 16],
                body: vec![b'g', k, i as u8],
            };
            send(&mut users[i], &s);
            sends.insert(s.id, (i, s));
        }
    }
    let all_sent = |users: &[User], sends: &HashMap<MsgId, (usize, Send)>| {
        sends
            .iter()
            .all(|(id, (i, _))| users[*i].sent.contains_key(id))
    };
    let direct = |a: u64, b: u64| proto::chat::ids::direct_chat(a, b);
    // Users 3, 6 and 10 wrote two each; nobody gets its own entries back.
    let group_texts_for = |id: u64| if [3, 6, 10].contains(&id) { 4 } else { 6 };
    pump_until(
        &mut users,
        &sends,
        Duration::from_secs(60),
        "every SENT and every delivery",
        |users| {
            all_sent(users, &sends)
                && (0..n).all(|i| {
                    let from = users[(i + n - 1) % n].id;
                    users[i].texts(direct(from, users[i].id)).len() >= 3
                })
                && users[..12]
                    .iter()
                    .all(|u| u.texts(group).len() >= group_texts_for(u.id))
        },
    );
    // Exactly once and in order: each recipient has its predecessor's three, in the chat's
    // order (seqs rising), which is the send order unless a SEND was refused (ERROR 13, while
    // a link was still coming up) or went unanswered, and was sent again after a later one
    // was taken.
    for i in 0..n {
        let from = (i + n - 1) % n;
        let chat = direct(users[from].id, users[i].id);
        let got = users[i].texts(chat);
        let want: Vec<(u64, Vec<u8>)> = (0..3u8)
            .map(|k| (users[from].id, vec![k, from as u8]))
            .collect();
        let who = format!("user {} from user {}", users[i].id, users[from].id);
        let mut once = got.clone();
        once.sort();
        assert_eq!(once, want, "{who}: each message once");
        let seqs: Vec<u64> = users[i].msgs[&chat].iter().map(|m| m.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{who}: {seqs:?}");
        if users[from].unavailable == 0 && users[from].resent == 0 {
            assert_eq!(got, want, "{who}: send order, nothing refused");
        }
    }
    // One total order per chat: every member saw the group's entries in seq order, each once,
    // and a seq names the same entry for every member.
    let mut by_seq: BTreeMap<u64, MsgId> = BTreeMap::new();
    for u in &users[..12] {
        let seqs: Vec<u64> = u.msgs[&group].iter().map(|m| m.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "user {}: {seqs:?}",
            u.id
        );
        assert_eq!(u.texts(group).len(), group_texts_for(u.id), "user {}", u.id);
        for m in &u.msgs[&group] {
            assert_eq!(
                *by_seq.entry(m.seq).or_insert(m.msg_id),
                m.msg_id,
                "seq {}",
                m.seq
            );
        }
    }
    assert_eq!(by_seq.len(), 7, "the creation and six texts");
    // SENT carries the seq the recipients saw.
    for (id, (i, s)) in &sends {
        let (chat, seq) = users[*i].sent[id];
        let to = if s.chat == 0 { partner(*i) } else { 1 };
        let seen = users[to].msgs[&chat]
            .iter()
            .find(|m| m.msg_id == *id)
            .unwrap();
        assert_eq!(seen.seq, seq);
    }
    // Receipts: every recipient acknowledges (DELIVERED for the author) and sends READ.
    let mut reads = HashMap::new();
    for i in 0..n {
        users[i].c.ack_all().unwrap();
        let from = (i + n - 1) % n;
        let last = users[i].msgs[&direct(users[from].id, users[i].id)]
            .last()
            .unwrap()
            .clone();
        let s = Send {
            id: new_msg_id(),
            chat: 0,
            to: users[from].id,
            kind: kind::READ,
            ref_id: last.msg_id,
            body: last.seq.to_le_bytes().to_vec(),
        };
        send(&mut users[i], &s);
        reads.insert(s.id, (i, s));
    }
    pump_until(
        &mut users,
        &reads,
        Duration::from_secs(30),
        "DELIVERED and READ for every author",
        |users| {
            (0..n).all(|i| {
                let to = users[partner(i)].id;
                let chat = users[i].msgs.get(&direct(users[i].id, to));
                let has = |k| chat.is_some_and(|c| c.iter().any(|m| m.kind == k));
                has(kind::DELIVERED) && has(kind::READ)
            })
        },
    );
    // Typing, direct and in the group, from relay to relay.
    let (a, b) = (0..n)
        .find(|&i| users[i].relay != users[partner(i)].relay)
        .map(|i| (i, partner(i)))
        .unwrap();
    let to = users[b].id;
    users[a].c.queue(|e| e.typing(0, to));
    users[a].c.flush().unwrap();
    let from_a = users[a].id;
    let g = (1..12).find(|&i| users[i].relay != users[0].relay).unwrap();
    users[0].c.queue(|e| e.typing(group, 0));
    users[0].c.flush().unwrap();
    pump_until(
        &mut users,
        &HashMap::new(),
        Duration::from_secs(10),
        "typing",
        |users| users[b].typing.contains(&(0, from_a)) && users[g].typing.contains(&(group, 1)),
    );
    // Presence: a watcher on one relay sees a user on another come and go.
    let (w, t) = (0..n)
        .flat_map(|w| (0..n).map(move |t| (w, t)))
        .find(|&(w, t)| users[w].relay != users[t].relay && w != t && t != b)
        .unwrap();
    let target = users[t].id;
    users[w].c.watch_presence(&[target]).unwrap();
    pump_until(
        &mut users,
        &HashMap::new(),
        Duration::from_secs(10),
        "online",
        |users| users[w].presence.contains(&(target, true)),
    );
    let gone = users.remove(t);
    drop(gone);
    let w = if w > t { w - 1 } else { w };
    pump_until(
        &mut users,
        &HashMap::new(),
        Duration::from_secs(10),
        "offline",
        |users| users[w].presence.contains(&(target, false)),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads a counter from a relay's metrics endpoint (0 when absent).
fn metric(relay: &Proc, name: &str) -> u64 {
    super::ctl_e2e::metric_at(relay.field("metrics").parse().unwrap(), name).unwrap_or(0)
}

/// Whether the relay closes `s` within 10 s (reads to the end; what it sent is ignored).
fn closed_by_relay(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn link_hello(relay: u8, token: &str) -> Vec<u8> {
    let mut h = b"RLNK".to_vec();
    h.extend_from_slice(&1u16.to_le_bytes());
    h.push(relay);
    h.extend_from_slice(&(token.len() as u16).to_le_bytes());
    h.extend_from_slice(token.as_bytes());
    h
}

#[test]
fn strangers_and_garbage_on_a_relay_link_are_refused_and_counted_and_chat_goes_on() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("relay-cluster-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = start_cluster(&dir, 2, 2);
    let mut users: Vec<User> = (1..=20).map(|id| User::connect(cluster.ctl, id)).collect();
    let a = users.iter().position(|u| u.relay == 1).unwrap();
    let b = users.iter().position(|u| u.relay == 2).unwrap();
    let relay1 = &cluster.relays[0];
    let link: SocketAddr = format!("{}:{}", cluster.hosts.relay(1), BASE_PORT + 8)
        .parse()
        .unwrap();
    let attack = |bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(link).unwrap();
        s.write_all(bytes).unwrap();
        assert!(closed_by_relay(&mut s), "the relay closes it");
    };
    let refused_before = metric(relay1, "relay_link_refused_total");
    // Not a link at all.
    attack(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // A user's chat token is not a relay's credential.
    let (_, home) = admin(cluster.ctl, "GET", "/v1/users/1/home");
    attack(&link_hello(2, home["token"].as_str().unwrap()));
    // A made-up token.
    attack(&link_hello(2, &"A".repeat(proto::token::TOKEN_TEXT_LEN)));
    // A real relay token, claimed for another relay number: a stranger registers as relay 9
    // (with relay 9's own credential) and presents its token as relay 2.
    let (status, answer) = http(
        cluster.ctl,
        "POST",
        "/v1/relays/heartbeat",
        Some(&serde_json::json!({
            "relay_id": 9, "host": "127.0.2.9", "udp_base_port": 40000, "shards": 1,
            "nic_gbps": 1.0, "state": "serving", "link_port": 1
        })),
        Some(&ctl_credential(&dir.join("ctl"), &["relay", "9"])),
    );
    assert_eq!(status, 200, "{answer}");
    let token9 = answer["cluster"]["link_token"]
        .as_str()
        .unwrap()
        .to_string();
    attack(&link_hello(2, &token9));
    let refused = metric(relay1, "relay_link_refused_total") - refused_before;
    assert_eq!(refused, 4, "each stranger is refused and counted");
    // Relay 9's own token is a link; garbage after it closes that link and is counted.
    let mut hello = link_hello(9, &token9);
    hello.extend_from_slice(&[12, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    attack(&hello);
    assert_eq!(metric(relay1, "relay_link_bad_frames_total"), 1);
    // The relays' own links and their users noticed nothing.
    let mut sends = HashMap::new();
    for (from, to) in [(a, b), (b, a)] {
        let s = Send {
            id: new_msg_id(),
            chat: 0,
            to: users[to].id,
            kind: kind::TEXT,
            ref_id: [0; 16],
            body: b"still here".to_vec(),
        };
        send(&mut users[from], &s);
        sends.insert(s.id, (from, s));
    }
    let chat = proto::chat::ids::direct_chat(users[a].id, users[b].id);
    pump_until(
        &mut users,
        &sends,
        Duration::from_secs(20),
        "chat",
        |users| users[a].texts(chat).len() == 1 && users[b].texts(chat).len() == 1,
    );
    assert!(metric(relay1, "relay_links_up") >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a run of [`chat_under_load`] saw.
struct LoadRun {
    cluster: Cluster,
    users: Vec<User>,
    /// Users of relay 2 when the load began.
    homed: Vec<usize>,
    /// User -> time from the event to its new session.
    rehomed: BTreeMap<u64, Duration>,
    messages: usize,
}

/// 12 users on a cluster of 3 (test `net`) write to each other for 10 s, every 100 ms each to
/// the next one; `event(elapsed, cluster)` runs before each round and returns true once it has
/// done what the test is about (from then on reconnections count as rehoming). Afterwards
/// every message is sent again until SENT, and checked: delivered exactly once, in its chat's
/// order, with the seq its SENT gave.
fn chat_under_load(
    name: &str,
    net: u8,
    mut event: impl FnMut(Duration, &mut Cluster) -> bool,
) -> LoadRun {
    let dir = std::env::temp_dir().join(format!("relay-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = start_cluster(&dir, 3, net);
    let ctl = cluster.ctl;
    let mut users: Vec<User> = (1..=12).map(|id| User::connect(ctl, id)).collect();
    let homed: Vec<usize> = (0..users.len()).filter(|&i| users[i].relay == 2).collect();
    assert!(!homed.is_empty(), "relay 2 homes some users");
    let n = users.len();
    let partner = |i: usize| (i + 1) % n;
    let mut sends: HashMap<MsgId, (usize, Send)> = HashMap::new();
    let mut last_try: HashMap<MsgId, Instant> = HashMap::new();
    let start = Instant::now();
    let mut happened: Option<Instant> = None;
    let mut rehomed: BTreeMap<u64, Duration> = BTreeMap::new();
    let mut k = 0u32;
    while start.elapsed() < Duration::from_secs(10) {
        if event(start.elapsed(), &mut cluster) && happened.is_none() {
            happened = Some(Instant::now());
        }
        for i in 0..n {
            let to = users[partner(i)].id;
            let s = Send {
                id: new_msg_id(),
                chat: 0,
                to,
                kind: kind::TEXT,
                ref_id: [0; 16],
                body: k.to_le_bytes().to_vec(),
            };
            k += 1;
            last_try.insert(s.id, Instant::now());
            send_or_reconnect(&mut users[i], &s, ctl, happened, &mut rehomed);
            sends.insert(s.id, (i, s));
        }
        let tick = Instant::now() + Duration::from_millis(100);
        while Instant::now() < tick {
            for (i, u) in users.iter_mut().enumerate() {
                if u.try_pump(Duration::from_millis(1)).is_err() {
                    u.reconnect(ctl, Duration::from_secs(10));
                    if let Some(t) = happened {
                        rehomed.entry(u.id).or_insert(t.elapsed());
                    }
                }
                resend(u, i, &sends, &mut last_try);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, u) in users.iter_mut().enumerate() {
            if u.try_pump(Duration::from_millis(2)).is_err() {
                u.reconnect(ctl, Duration::from_secs(10));
            }
            resend(u, i, &sends, &mut last_try);
        }
        let sent = sends
            .iter()
            .all(|(id, (i, _))| users[*i].sent.contains_key(id));
        let delivered = (0..n).all(|i| {
            let from = (i + n - 1) % n;
            let chat = proto::chat::ids::direct_chat(users[from].id, users[i].id);
            users[i].texts(chat).len() >= sends.values().filter(|(f, _)| *f == from).count()
        });
        if sent && delivered {
            break;
        }
        if Instant::now() >= deadline {
            for (id, (i, s)) in &sends {
                if !users[*i].sent.contains_key(id) {
                    let chat = proto::chat::ids::direct_chat(users[*i].id, s.to);
                    eprintln!(
                        "no SENT: user {} (relay {}) to {}, chat {chat}",
                        users[*i].id, users[*i].relay, s.to
                    );
                }
            }
            for i in 0..n {
                let from = (i + n - 1) % n;
                let chat = proto::chat::ids::direct_chat(users[from].id, users[i].id);
                let want = sends.values().filter(|(f, _)| *f == from).count();
                let got = users[i].texts(chat).len();
                if got < want {
                    eprintln!(
                        "user {} (relay {}) has {got} of {want} from user {} (relay {})",
                        users[i].id, users[i].relay, users[from].id, users[from].relay
                    );
                }
            }
            panic!("sent {sent}, delivered {delivered}");
        }
    }
    for i in 0..n {
        let from = (i + n - 1) % n;
        let chat = proto::chat::ids::direct_chat(users[from].id, users[i].id);
        let got = &users[i].msgs[&chat];
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "user {}: order",
            users[i].id
        );
        let ids: BTreeSet<MsgId> = got.iter().map(|m| m.msg_id).collect();
        assert_eq!(
            ids.len(),
            got.len(),
            "user {}: a message twice",
            users[i].id
        );
        for (id, (f, _)) in sends.iter().filter(|(_, (f, _))| *f == from) {
            let (_, seq) = users[*f].sent[id];
            let m = got.iter().find(|m| m.msg_id == *id);
            assert_eq!(
                m.map(|m| m.seq),
                Some(seq),
                "user {}: message lost",
                users[i].id
            );
        }
        assert_eq!(
            got.len(),
            sends.values().filter(|(f, _)| *f == from).count()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    LoadRun {
        cluster,
        users,
        homed,
        rehomed,
        messages: sends.len(),
    }
}

#[test]
fn kill_9_of_a_relay_under_chat_load_rehomes_its_users_and_loses_nothing_sent() {
    // Relay 2 is killed at 2 s and started again on its data directory at 7 s; meanwhile its
    // users are rehomed and the chats it owns refuse SENDs (ERROR 13, sent again until it is
    // back).
    let (mut killed, mut restarted) = (false, false);
    let run = chat_under_load("kill", 3, |t, cluster| {
        if !killed && t >= Duration::from_secs(2) {
            cluster.relays[1].kill9();
            killed = true;
        }
        if !restarted && t >= Duration::from_secs(7) {
            let dir =
                std::env::temp_dir().join(format!("relay-cluster-kill-{}", std::process::id()));
            cluster.relays[1] = Proc::start(relay_command(&dir, cluster.ctl, &cluster.hosts, 2));
            restarted = true;
        }
        killed
    });
    for &i in &run.homed {
        let u = &run.users[i];
        let t = run.rehomed.get(&u.id).copied();
        assert!(
            t.is_some_and(|t| t <= Duration::from_secs(5)),
            "user {} rehomed after {t:?}",
            u.id
        );
        assert_ne!(u.relay, 2, "user {} still on the dead relay", u.id);
    }
    let unavailable: u64 = run.users.iter().map(|u| u.unavailable).sum();
    assert!(unavailable > 0, "no SEND met the dead owner");
    eprintln!(
        "kill -9: {} messages, {unavailable} ERROR 13 while the owner was dead, users rehomed \
         after at most {:?}",
        run.messages,
        run.rehomed.values().max()
    );
}

#[test]
fn a_drained_relay_under_chat_load_hands_its_sessions_over_and_loses_nothing() {
    let mut drained = false;
    let run = chat_under_load("drain", 4, |t, cluster| {
        if !drained && t >= Duration::from_secs(2) {
            let (status, body) = admin(cluster.ctl, "POST", "/v1/relays/2/drain");
            assert_eq!(status, 200, "{body}");
            drained = true;
        }
        drained
    });
    for &i in &run.homed {
        let u = &run.users[i];
        assert_ne!(u.relay, 2, "user {} still on the drained relay", u.id);
        assert!(run.rehomed.contains_key(&u.id), "user {} never moved", u.id);
    }
    // The drained relay holds no session, and still owns its chats (they were served).
    let relay2 = &run.cluster.relays[1];
    let sessions: u64 = (0..2)
        .map(|s| metric(relay2, &format!("relay_chat_sessions{{shard=\"{s}\"}}")))
        .sum();
    assert_eq!(sessions, 0, "sessions left on the drained relay");
    eprintln!(
        "drain: {} messages, sessions moved after at most {:?}",
        run.messages,
        run.rehomed.values().max()
    );
}

/// Sends `s`; a session found closed is replaced first (and the time since the event noted).
fn send_or_reconnect(
    u: &mut User,
    s: &Send,
    ctl: SocketAddr,
    killed_at: Option<Instant>,
    rehomed: &mut BTreeMap<u64, Duration>,
) {
    u.c.queue(|e| e.send(&s.id, s.chat, s.to, s.kind, &s.ref_id, &s.body));
    if u.c.flush().is_err() {
        u.reconnect(ctl, Duration::from_secs(10));
        if let Some(t) = killed_at {
            rehomed.entry(u.id).or_insert(t.elapsed());
        }
        send(u, s);
    }
}

/// Sends again, with the same id, what got ERROR 13 or no SENT for 2 s.
fn resend(
    u: &mut User,
    i: usize,
    sends: &HashMap<MsgId, (usize, Send)>,
    last_try: &mut HashMap<MsgId, Instant>,
) {
    let now = Instant::now();
    let retry: BTreeSet<MsgId> = std::mem::take(&mut u.retry).into_iter().collect();
    for (id, (f, s)) in sends.iter().filter(|(_, (f, _))| *f == i) {
        debug_assert_eq!(*f, i);
        if u.sent.contains_key(id) {
            continue;
        }
        let t = last_try.entry(*id).or_insert(now);
        let due = now.duration_since(*t) >= Duration::from_secs(2);
        if due || (retry.contains(id) && now.duration_since(*t) >= Duration::from_millis(200)) {
            *t = now;
            u.c.queue(|e| e.send(&s.id, s.chat, s.to, s.kind, &s.ref_id, &s.body));
            let _ = u.c.flush();
        }
    }
}
