//! Chat against a real relay process on loopback, on both I/O backends: every scenario runs
//! as `chat::batch::*` and `chat::uring::*`. Each test gets its own ports and a temporary data
//! directory.

use super::{unix_now, RelayProc};
use proto::chat::{code, ids, kind};
use proto::token::{Claims, Permissions, TokenKind};
use relay::chat::client::{Client, Event, Message};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);
const SHARDS: u16 = 2;

static CHAT_SLOT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
/// Data directories handed out to the tests of this binary; they run in parallel.
static DIR_SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A fresh temporary directory, unique to this test process and call.
fn temp_dir(what: &str, io: &str) -> PathBuf {
    let seq = DIR_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("relay-{what}-{io}-{}-{seq}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub(super) struct ChatRelay {
    relay: RelayProc,
    chat_port: u16,
    dir: PathBuf,
}

impl ChatRelay {
    fn start(io: &str) -> Self {
        Self::start_in(io, temp_dir("chat-test", io), None)
    }

    /// A relay whose configuration file (in its data directory) is `toml`.
    fn start_with_config(io: &str, toml: &str) -> Self {
        let dir = temp_dir("chat-test", io);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("relay.toml");
        std::fs::write(&config, toml).unwrap();
        let extra = ["--config".to_string(), config.to_str().unwrap().to_string()];
        Self::start_with(io, dir, None, &extra)
    }

    fn start_in(io: &str, dir: PathBuf, chat_port: Option<u16>) -> Self {
        Self::start_with(io, dir, chat_port, &[])
    }

    fn start_with(io: &str, dir: PathBuf, chat_port: Option<u16>, extra: &[String]) -> Self {
        Self::start_limited(io, dir, chat_port, None, extra)
    }

    /// [`ChatRelay::start_with`], the relay's RLIMIT_NOFILE set to `nofile` (soft, hard) when
    /// given.
    fn start_limited(
        io: &str,
        dir: PathBuf,
        chat_port: Option<u16>,
        nofile: Option<(u64, u64)>,
        extra: &[String],
    ) -> Self {
        // A fixed port when restarting on the same data; else one per attempt, below the
        // ephemeral range and away from the UDP ports RelayProc hands out. 300 slots per
        // process, so that a port is not handed to a new relay while a test that killed its
        // relay waits to restart on it (with 24 slots that happened under parallel tests).
        let pick = || {
            chat_port.unwrap_or_else(|| {
                let slot = CHAT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 300;
                20_000 + (std::process::id() % 8) as u16 * 1_200 + slot * 4
            })
        };
        if let Some(port) = chat_port {
            // A relay killed with SIGKILL may hold its listener a while longer: with io_uring
            // the kernel releases files its ring still references after the process is gone.
            // Wait for the port rather than spend every start attempt at once.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "chat port {port} still held 10 s after its relay was killed"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let chosen = std::sync::Mutex::new(0u16);
        let relay = RelayProc::start_limited(io, SHARDS, nofile, |_| {
            let port = pick();
            *chosen.lock().unwrap() = port;
            let mut args = vec![
                "--chat-port".into(),
                port.to_string(),
                "--data-dir".into(),
                dir.to_str().unwrap().into(),
            ];
            args.extend_from_slice(extra);
            args
        });
        let chat_port = *chosen.lock().unwrap();
        Self {
            relay,
            chat_port,
            dir,
        }
    }

    fn token(&self, user: u64) -> String {
        Claims {
            kind: TokenKind::User,
            permissions: Permissions::CHAT,
            relay_id: 0,
            shard_idx: ids::home_shard(user, SHARDS),
            expires_at: unix_now() + 600,
            scope_id: user,
            participant_id: user,
        }
        .sign_text(&self.relay.key)
    }

    fn addr(&self, user: u64) -> SocketAddr {
        SocketAddr::from((
            [127, 0, 0, 1],
            self.chat_port + ids::home_shard(user, SHARDS),
        ))
    }

    fn connect(&self, user: u64) -> Client {
        let mut c = Client::connect(self.addr(user), &self.token(user), T).expect("connect");
        // Every session starts with its stored backlog, here empty.
        match c.recv(T).unwrap() {
            Some(Event::BacklogEnd) => c,
            other => panic!("expected BACKLOG_END first, got {other:?}"),
        }
    }

    pub(super) fn total(&self, metric: &str) -> u64 {
        (0..SHARDS)
            .map(|s| self.relay.metric(&format!("{metric}{{shard=\"{s}\"}}")))
            .sum()
    }
}

impl Drop for ChatRelay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Receives events until `pred` has matched `n` of them or the deadline passes.
fn collect(c: &mut Client, n: usize, pred: impl Fn(&Event) -> bool) -> Vec<Event> {
    collect_within(c, n, pred, T)
}

/// [`collect`] with its own deadline.
fn collect_within(
    c: &mut Client,
    n: usize,
    pred: impl Fn(&Event) -> bool,
    within: Duration,
) -> Vec<Event> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.iter().filter(|e| pred(e)).count() < n && Instant::now() < deadline {
        if let Some(e) = c.recv(Duration::from_millis(200)).unwrap() {
            got.push(e);
        }
    }
    got
}

fn messages(events: &[Event]) -> Vec<&Message> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// Users homed on shard 0 and on shard 1.
fn users_on_both_shards() -> (u64, u64) {
    let a = (1..).find(|&u| ids::home_shard(u, SHARDS) == 0).unwrap();
    let b = (1..).find(|&u| ids::home_shard(u, SHARDS) == 1).unwrap();
    (a, b)
}

fn direct_chat_gets_sent_delivered_and_read_in_order_across_shards(io: &str) {
    let r = ChatRelay::start(io);
    let (alice, bob) = users_on_both_shards();
    let mut a = r.connect(alice);
    let mut b = r.connect(bob);
    let id = a.send_direct(bob, b"hello bob").unwrap();
    let got = collect(&mut b, 1, |e| matches!(e, Event::Message(_)));
    let m = messages(&got)[0].clone();
    assert_eq!(
        (m.sender, m.kind, m.body.as_slice(), m.msg_id),
        (alice, kind::TEXT, &b"hello bob"[..], id)
    );
    b.ack_all().unwrap();
    let read_id = b.send_direct(alice, &m.seq.to_le_bytes()).unwrap();
    // Bob's READ receipt is an ordinary SEND of kind READ.
    b.queue(|e| {
        e.send(
            &relay::chat::client::new_msg_id(),
            0,
            alice,
            kind::READ,
            &id,
            &m.seq.to_le_bytes(),
        )
    });
    b.flush().unwrap();
    let events = collect(&mut a, 3, |e| {
        matches!(e, Event::Sent { .. }) || matches!(e, Event::Message(m) if m.kind != kind::TEXT)
    });
    let order: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sent { msg_id, .. } if *msg_id == id => Some("sent"),
            Event::Message(m) if m.kind == kind::DELIVERED => Some("delivered"),
            Event::Message(m) if m.kind == kind::READ => Some("read"),
            _ => None,
        })
        .collect();
    assert_eq!(order, vec!["sent", "delivered", "read"]);
    assert!(messages(&events)
        .iter()
        .any(|m| m.msg_id == read_id && m.kind == kind::TEXT));
    // Every SENT waited for a commit: the time batches were held is counted.
    let commits = r.relay.wait_metric_sum(&r, "relay_chat_commits_total", 1);
    let held_us = r.relay.wait_metric_sum(&r, "relay_chat_commit_us_total", 1);
    assert!(
        commits >= 1 && held_us >= 1,
        "{commits} commits, held {held_us} us"
    );
}

fn offline_recipient_gets_backlog_in_order_and_the_inbox_empties(io: &str) {
    let r = ChatRelay::start(io);
    let (alice, bob) = users_on_both_shards();
    let mut a = r.connect(alice);
    const N: u64 = 500;
    for i in 0..N {
        a.send_direct(bob, &i.to_le_bytes()).unwrap();
    }
    let sent = collect(&mut a, N as usize, |e| matches!(e, Event::Sent { .. }));
    assert_eq!(
        sent.iter()
            .filter(|e| matches!(e, Event::Sent { .. }))
            .count(),
        N as usize
    );
    assert!(r.relay.wait_metric_sum(&r, "relay_chat_pending", N) >= N);
    let mut b = Client::connect(r.addr(bob), &r.token(bob), T).unwrap();
    let mut bodies = Vec::new();
    let deadline = Instant::now() + T;
    let mut ended = false;
    while !ended && Instant::now() < deadline {
        match b.recv(Duration::from_millis(200)).unwrap() {
            Some(Event::Message(m)) => {
                bodies.push(u64::from_le_bytes(m.body[..8].try_into().unwrap()))
            }
            Some(Event::BacklogEnd) => ended = true,
            Some(other) => panic!("unexpected {other:?}"),
            None => b.ack_all().unwrap(),
        }
        if bodies.len().is_multiple_of(64) {
            b.ack_all().unwrap();
        }
    }
    assert!(ended, "end-of-backlog marker");
    assert_eq!(
        bodies,
        (0..N).collect::<Vec<_>>(),
        "the whole backlog, in order, once"
    );
    b.ack_all().unwrap();
    // Alice acknowledges her DELIVERED receipts too; then nothing is stored.
    let deadline = Instant::now() + T;
    while r.total("relay_chat_pending") > 0 && Instant::now() < deadline {
        while a.recv(Duration::from_millis(50)).unwrap().is_some() {}
        a.ack_all().unwrap();
        b.ack_all().unwrap();
    }
    assert_eq!(r.total("relay_chat_pending"), 0, "inbox empty");
}

fn group_of_five_member_added_later_sees_only_from_its_join(io: &str) {
    let r = ChatRelay::start(io);
    let users: Vec<u64> = (100..105).collect();
    let mut cs: Vec<Client> = users.iter().map(|&u| r.connect(u)).collect();
    let create = relay::chat::client::new_msg_id();
    cs[0].queue(|e| e.group_create(&create, &users[1..4]));
    cs[0].flush().unwrap();
    let got = collect(&mut cs[0], 1, |e| matches!(e, Event::Sent { .. }));
    let Some(Event::Sent { chat: group, .. }) = got.last().cloned() else {
        panic!("created: {got:?}")
    };
    cs[1]
        .send_group(group, kind::TEXT, &[0; 16], b"before")
        .unwrap();
    collect(&mut cs[1], 1, |e| matches!(e, Event::Sent { .. }));
    let add = relay::chat::client::new_msg_id();
    cs[0].queue(|e| e.group_add(&add, group, users[4]));
    cs[0].flush().unwrap();
    collect(
        &mut cs[0],
        1,
        |e| matches!(e, Event::Sent { msg_id, .. } if *msg_id == add),
    );
    cs[2]
        .send_group(group, kind::TEXT, &[0; 16], b"after")
        .unwrap();
    let late = collect(&mut cs[4], 2, |e| matches!(e, Event::Message(_)));
    let kinds: Vec<(u8, Vec<u8>)> = messages(&late)
        .iter()
        .map(|m| (m.kind, m.body.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (kind::MEMBER_ADDED, users[4].to_le_bytes().to_vec()),
            (kind::TEXT, b"after".to_vec())
        ]
    );
    let early = collect(&mut cs[3], 4, |e| matches!(e, Event::Message(_)));
    let texts: Vec<&[u8]> = messages(&early)
        .iter()
        .filter(|m| m.kind == kind::TEXT)
        .map(|m| m.body.as_slice())
        .collect();
    assert_eq!(texts, vec![&b"before"[..], &b"after"[..]]);
}

fn resent_id_is_delivered_once_and_edits_and_deletes_reach_every_member(io: &str) {
    let r = ChatRelay::start(io);
    let users: Vec<u64> = (200..203).collect();
    let mut cs: Vec<Client> = users.iter().map(|&u| r.connect(u)).collect();
    let create = relay::chat::client::new_msg_id();
    cs[0].queue(|e| e.group_create(&create, &users[1..]));
    cs[0].flush().unwrap();
    let got = collect(&mut cs[0], 1, |e| matches!(e, Event::Sent { .. }));
    let Some(Event::Sent { chat: group, .. }) = got.last().cloned() else {
        panic!()
    };
    let id = relay::chat::client::new_msg_id();
    for _ in 0..3 {
        cs[0].queue(|e| e.send(&id, group, 0, kind::TEXT, &[0; 16], b"once"));
    }
    cs[0].flush().unwrap();
    let sents = collect(&mut cs[0], 3, |e| matches!(e, Event::Sent { .. }));
    let seqs: Vec<u64> = sents
        .iter()
        .filter_map(|e| {
            if let Event::Sent { seq, .. } = e {
                Some(*seq)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(seqs.len(), 3);
    assert!(
        seqs.iter().all(|&s| s == seqs[0]),
        "every retry answered with the same seq: {seqs:?}"
    );
    cs[0].send_group(group, kind::EDIT, &id, b"edited").unwrap();
    cs[0].send_group(group, kind::DELETE, &id, b"").unwrap();
    for c in cs.iter_mut().skip(1) {
        let got = collect(c, 4, |e| matches!(e, Event::Message(_)));
        let k: Vec<u8> = messages(&got).iter().map(|m| m.kind).collect();
        assert_eq!(
            k,
            vec![kind::GROUP_CREATED, kind::TEXT, kind::EDIT, kind::DELETE]
        );
    }
}

fn bad_input_gets_an_error_then_close_while_others_are_served(io: &str) {
    use std::io::{Read, Write};
    let r = ChatRelay::start(io);
    let (alice, _) = users_on_both_shards();
    let mut a = r.connect(alice);
    let addr = SocketAddr::from(([127, 0, 0, 1], r.chat_port));
    let mut hello_other_shard = Vec::new();
    let other = (1..).find(|&u| ids::home_shard(u, SHARDS) == 1).unwrap();
    proto::chat::Encoder::new(&mut hello_other_shard).hello(r.token(other).as_bytes());
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "oversized",
            ((proto::chat::MAX_FRAME + 1) as u32).to_le_bytes().to_vec(),
            code::TOO_LARGE,
        ),
        ("unknown type", vec![1, 0, 0, 0, 0x7e], code::UNKNOWN_TYPE),
        (
            "garbage",
            vec![3, 0, 0, 0, 0x0a, 0xde, 0xad],
            code::BAD_FRAME,
        ),
        (
            "before hello",
            vec![9, 0, 0, 0, 0x0a, 1, 2, 3, 4, 5, 6, 7, 8],
            code::NOT_AUTHENTICATED,
        ),
        (
            "bad token",
            {
                let mut v = Vec::new();
                proto::chat::Encoder::new(&mut v).hello(b"forged");
                v
            },
            code::BAD_TOKEN,
        ),
        ("wrong shard", hello_other_shard, code::BAD_TOKEN),
    ];
    for (name, bytes, expected) in &cases {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(bytes).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (frame, _) = proto::chat::decode(&resp)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no frame"));
        assert!(
            matches!(frame, proto::chat::Frame::Error { code, .. } if code == *expected),
            "{name}: {frame:?}"
        );
    }
    // The shard keeps serving the others (the HELLO deadline is covered by the engine tests).
    let mut a2 = r.connect((300..).find(|&u| ids::home_shard(u, SHARDS) == 0).unwrap());
    a.send_direct(a2.user, b"still here").unwrap();
    let got = collect(&mut a2, 1, |e| matches!(e, Event::Message(_)));
    assert_eq!(messages(&got)[0].body, b"still here");
    assert!(
        r.relay
            .wait_metric_sum(&r, "relay_chat_errors_total", cases.len() as u64)
            >= cases.len() as u64
    );
}

/// A shard at `[chat] max_conns` answers a further connection with ERROR 13 and closes it,
/// counts it, and keeps serving the connections it has; once one closes, a new one is served.
fn connections_beyond_max_conns_get_an_error_and_are_closed(io: &str) {
    use std::io::Read;
    let r = ChatRelay::start_with_config(io, "[chat]\nmax_conns = 2\n");
    let on_shard_0: Vec<u64> = (1..)
        .filter(|&u| ids::home_shard(u, SHARDS) == 0)
        .take(3)
        .collect();
    let mut a = r.connect(on_shard_0[0]);
    let b = r.connect(on_shard_0[1]);
    // A client sends its HELLO at once; the relay still answers with the ERROR, then closes.
    let mut refused = std::net::TcpStream::connect(r.addr(on_shard_0[2])).unwrap();
    refused.set_read_timeout(Some(T)).unwrap();
    let mut hello = Vec::new();
    proto::chat::Encoder::new(&mut hello).hello(r.token(on_shard_0[2]).as_bytes());
    std::io::Write::write_all(&mut refused, &hello).unwrap();
    let mut resp = Vec::new();
    refused.read_to_end(&mut resp).unwrap();
    let (frame, n) = proto::chat::decode(&resp).unwrap().expect("an ERROR frame");
    assert!(
        matches!(frame, proto::chat::Frame::Error { code, .. } if code == code::UNAVAILABLE),
        "{frame:?}"
    );
    assert_eq!(n, resp.len(), "the ERROR frame, then the close");
    assert_eq!(
        r.relay.wait_metric_sum(&r, "relay_chat_refused_total", 1),
        1
    );
    // The two sessions it has are served.
    a.send_direct(b.user, b"still here").unwrap();
    let mut b = b;
    let got = collect(&mut b, 1, |e| matches!(e, Event::Message(_)));
    assert_eq!(messages(&got)[0].body, b"still here");
    // A slot frees when a connection closes; the other shard has its own limit.
    drop(a);
    let deadline = Instant::now() + T;
    while r.total("relay_chat_sessions") != 1 {
        assert!(
            Instant::now() < deadline,
            "the closed session was never dropped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = r.connect(on_shard_0[2]);
    b.send_direct(c.user, b"room again").unwrap();
    let got = collect(&mut c, 1, |e| matches!(e, Event::Message(_)));
    assert_eq!(messages(&got)[0].body, b"room again");
}

/// On io_uring, chat sockets are direct descriptors in each ring's table, never in the process's
/// descriptor table: a relay limited to 256 descriptors serves 384 authenticated sessions on its
/// 2 shards (each ring's table gets RLIMIT_NOFILE = 256 slots, of which 64 are held back for
/// accepts and refusals in flight), and the next connection to a full shard gets ERROR 13
/// (which needs IORING_OP_FIXED_FD_INSTALL, Linux 6.8: an older kernel closes it silently).
#[test]
fn uring_chat_serves_more_sessions_than_the_process_may_hold_descriptors() {
    use std::io::Read;
    const NOFILE: u64 = 256;
    const PER_SHARD: usize = 256 - 64;
    let r = ChatRelay::start_limited(
        "uring",
        temp_dir("chat-nofile", "uring"),
        None,
        Some((NOFILE, NOFILE)),
        &[],
    );
    let users = |shard: u16| {
        (1u64..)
            .filter(move |&u| ids::home_shard(u, SHARDS) == shard)
            .take(PER_SHARD + 1)
            .collect::<Vec<_>>()
    };
    let (on_0, on_1) = (users(0), users(1));
    let mut sessions: Vec<Client> = on_0[..PER_SHARD]
        .iter()
        .chain(&on_1[..PER_SHARD])
        .map(|&u| r.connect(u))
        .collect();
    assert!(sessions.len() as u64 > NOFILE);
    assert_eq!(
        r.relay
            .wait_metric_sum(&r, "relay_chat_sessions", 2 * PER_SHARD as u64),
        2 * PER_SHARD as u64
    );
    // The first and the last sessions talk, across the shards.
    let last = sessions.len() - 1;
    let to = sessions[last].user;
    sessions[0]
        .send_direct(to, b"past the descriptor limit")
        .unwrap();
    let got = collect(&mut sessions[last], 1, |e| matches!(e, Event::Message(_)));
    assert_eq!(messages(&got)[0].body, b"past the descriptor limit");
    // Shard 0's table is full (but for its reserve): the next connection is refused.
    let mut refused = std::net::TcpStream::connect(r.addr(on_0[PER_SHARD])).unwrap();
    refused.set_read_timeout(Some(T)).unwrap();
    let mut hello = Vec::new();
    proto::chat::Encoder::new(&mut hello).hello(r.token(on_0[PER_SHARD]).as_bytes());
    std::io::Write::write_all(&mut refused, &hello).unwrap();
    let mut resp = Vec::new();
    refused.read_to_end(&mut resp).unwrap();
    let (frame, _) = proto::chat::decode(&resp).unwrap().expect("an ERROR frame");
    assert!(
        matches!(frame, proto::chat::Frame::Error { code, .. } if code == code::UNAVAILABLE),
        "{frame:?}"
    );
    assert_eq!(
        r.relay.wait_metric_sum(&r, "relay_chat_refused_total", 1),
        1
    );
    // Closing sessions frees their slots: a new one on shard 0 is served.
    sessions.drain(..2);
    let deadline = Instant::now() + T;
    while r.total("relay_chat_sessions") > 2 * PER_SHARD as u64 - 2 {
        assert!(
            Instant::now() < deadline,
            "closed sessions were never dropped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = r.connect(on_0[PER_SHARD]);
}

/// This process's hard RLIMIT_NOFILE (a child may not be given more).
fn hard_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
    rl.rlim_max
}

/// The relay raises its soft RLIMIT_NOFILE to the hard limit: started with a soft limit of 256
/// (the usual default is 1,024), the batch backend still serves 300 sessions, one descriptor
/// each.
#[test]
fn batch_chat_is_not_capped_by_the_soft_descriptor_limit() {
    const SESSIONS: usize = 300;
    let r = ChatRelay::start_limited(
        "batch",
        temp_dir("chat-soft-nofile", "batch"),
        None,
        Some((256, hard_nofile().min(4096))),
        &[],
    );
    let mut sessions: Vec<Client> = (1..=SESSIONS as u64).map(|u| r.connect(u)).collect();
    assert_eq!(
        r.relay
            .wait_metric_sum(&r, "relay_chat_sessions", SESSIONS as u64),
        SESSIONS as u64
    );
    let to = sessions[SESSIONS - 1].user;
    sessions[0].send_direct(to, b"past the soft limit").unwrap();
    let got = collect(&mut sessions[SESSIONS - 1], 1, |e| {
        matches!(e, Event::Message(_))
    });
    assert_eq!(messages(&got)[0].body, b"past the soft limit");
}

/// A batch relay out of descriptors neither spins nor leaves waiting clients unanswered: it
/// gives up a reserved descriptor to refuse one waiting connection with ERROR 13 and takes the
/// listener out of its epoll set for 100 ms at a time; once sessions close, new ones are served.
#[test]
fn batch_chat_at_the_descriptor_limit_refuses_and_does_not_spin() {
    use std::io::{Read, Write};
    let r = ChatRelay::start_limited(
        "batch",
        temp_dir("chat-emfile", "batch"),
        None,
        Some((64, 64)),
        &[],
    );
    // Sessions on shard 0 until a connection is refused.
    let on_shard_0 = (1u64..).filter(|&u| ids::home_shard(u, SHARDS) == 0);
    let mut held = Vec::new();
    let mut refused = None;
    for user in on_shard_0.take(64) {
        let mut s = std::net::TcpStream::connect(r.addr(user)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut hello = Vec::new();
        proto::chat::Encoder::new(&mut hello).hello(r.token(user).as_bytes());
        s.write_all(&hello).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).expect("an answer to every HELLO");
        let (frame, _) = proto::chat::decode(&buf[..n])
            .unwrap()
            .expect("a whole frame");
        match frame {
            proto::chat::Frame::Welcome { .. } => held.push(s),
            proto::chat::Frame::Error { code, .. } => {
                refused = Some(code);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, Some(code::UNAVAILABLE), "{} sessions", held.len());
    assert!(held.len() > 10, "{} sessions before the limit", held.len());
    // Silent clients wait in the listen backlog: the first takes the spare descriptor again
    // (refused, it lingers for up to 1 s holding it), so the others keep the listener paused
    // for the whole measurement; the relay must not spin on them.
    let _waiting: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(r.addr(1)).unwrap())
        .collect();
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", r.relay.child.id())).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = after_comm
            .split_whitespace()
            .map(|w| w.parse().unwrap_or(0))
            .collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        f[11] + f[12]
    };
    let (t0, c0) = (Instant::now(), cpu_ticks());
    std::thread::sleep(Duration::from_secs(2));
    let used = (cpu_ticks() - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64();
    assert!(
        used < 0.5,
        "the relay used {used:.2} cores while out of descriptors"
    );
    // Sessions close: descriptors free, and a new session is served.
    held.truncate(held.len() - 5);
    let fresh = 1_000_000;
    let mut c =
        Client::connect(r.addr(fresh), &r.token(fresh), Duration::from_secs(10)).expect("served");
    match c.recv(T).unwrap() {
        Some(Event::BacklogEnd) => {}
        other => panic!("expected BACKLOG_END, got {other:?}"),
    }
}

/// SIGTERM: every chat session gets what was queued for it, then ERROR 13 ("unavailable,
/// reconnect"), then the close (a FIN: the test's reads end cleanly, not with a reset); the
/// relay exits cleanly and promptly.
fn sigterm_tells_chat_sessions_to_reconnect(io: &str) {
    let r = ChatRelay::start(io);
    let users: Vec<u64> = (1..=6).collect();
    let mut sessions: Vec<Client> = users.iter().map(|&u| r.connect(u)).collect();
    // Traffic before the stop (the sender's SENT and DELIVERED may still be queued).
    let to = sessions[5].user;
    sessions[0].send_direct(to, b"before the stop").unwrap();
    let got = collect(&mut sessions[5], 1, |e| matches!(e, Event::Message(_)));
    assert_eq!(messages(&got)[0].body, b"before the stop");
    let mut r = r;
    let t0 = Instant::now();
    let pid = r.relay.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = loop {
        if let Some(status) = r.relay.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the relay did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t0.elapsed();
    assert!(status.success(), "clean exit, got {status}");
    assert!(took < Duration::from_secs(2), "stopped in {took:?}");
    for (i, s) in sessions.iter_mut().enumerate() {
        let mut notice = None;
        let closed = loop {
            match s.recv(T) {
                Ok(Some(Event::Error { code, .. })) => notice = Some(code),
                Ok(Some(_)) => {}
                Ok(None) => break false,
                Err(e) => break e.kind() == std::io::ErrorKind::ConnectionAborted,
            }
        };
        assert_eq!(
            notice,
            Some(code::UNAVAILABLE),
            "session {i}: the stop notice"
        );
        assert!(closed, "session {i}: closed after the notice");
    }
}

/// With rings of 16 messages between the shards, a burst of 5,000 SENDs whose chat is owned
/// by the other shard overflows the ring: messages wait in the spill queue while the home shard
/// stops reading its clients, then it resumes; every message is stored once, answered with
/// SENT and delivered once, in order.
fn cross_shard_burst_spills_then_delivers_everything_in_order(io: &str) {
    const N: usize = 5_000;
    let r = ChatRelay::start_with_config(io, "[chat]\nring_capacity = 16\nmsgs_per_s = 1000000\n");
    let (alice, bob) = (1u64..)
        .filter(|&a| ids::home_shard(a, SHARDS) == 0)
        .flat_map(|a| (1u64..200).map(move |b| (a, b)))
        .find(|&(a, b)| a != b && ids::owner_shard(ids::direct_chat(a, b), SHARDS) == 1)
        .unwrap();
    let mut a = r.connect(alice);
    let mut b = r.connect(bob);
    let mut sent_ids = Vec::with_capacity(N);
    for i in 0..N as u32 {
        let id = relay::chat::client::new_msg_id();
        a.queue(|e| e.send(&id, 0, bob, kind::TEXT, &[0; 16], &i.to_le_bytes()));
        sent_ids.push(id);
    }
    // One write of all 5,000 frames (320 KB).
    a.flush().unwrap();
    // Generous: thousands of hand-offs between shards on a shared 2-core machine; it returns as
    // soon as everything has arrived.
    let within = Duration::from_secs(30);
    let sent = collect_within(&mut a, N, |e| matches!(e, Event::Sent { .. }), within);
    let mut acked: Vec<_> = sent
        .iter()
        .filter_map(|e| match e {
            Event::Sent { msg_id, .. } => Some(*msg_id),
            _ => None,
        })
        .collect();
    assert_eq!(acked.len(), N, "every SEND answered with SENT");
    acked.sort_unstable();
    acked.dedup();
    assert_eq!(acked.len(), N, "once each");
    let got = collect_within(&mut b, N, |e| matches!(e, Event::Message(_)), within);
    let msgs = messages(&got);
    assert_eq!(msgs.len(), N, "every message delivered");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.msg_id, sent_ids[i], "in order, once");
        assert_eq!(m.body, (i as u32).to_le_bytes());
    }
    assert!(msgs.windows(2).all(|w| w[0].seq < w[1].seq));
    // The path under test was taken: messages waited in a spill queue.
    let spilled = r.relay.wait_metric_sum(&r, "relay_chat_spilled_total", 1);
    eprintln!("{io}: {spilled} messages waited in a spill queue");
    assert!(spilled > 0);
}

/// A connection that never says HELLO and a recipient that stops reading are both closed (the
/// latter within the flush deadline after the engine gives up on it), while others are served.
fn silent_and_stalled_peers_are_closed(io: &str) {
    use std::io::{Read, Write};
    let r = ChatRelay::start_with_config(
        io,
        "[chat]\nhello_timeout_ms = 300\nslow_reader_timeout_ms = 200\nmax_out_bytes = 65536\n",
    );
    let (alice, bob) = users_on_both_shards();
    // Silent: HELLO_TIMEOUT, then the relay closes.
    let mut silent = std::net::TcpStream::connect(r.addr(alice)).unwrap();
    silent.set_read_timeout(Some(T)).unwrap();
    let mut resp = Vec::new();
    silent.read_to_end(&mut resp).unwrap();
    let (frame, _) = proto::chat::decode(&resp).unwrap().expect("an ERROR frame");
    assert!(
        matches!(frame, proto::chat::Frame::Error { code, .. } if code == code::HELLO_TIMEOUT),
        "{frame:?}"
    );
    // Stalled: bob authenticates, then never reads while 12 MB are sent to him, more than the
    // loopback socket buffers hold.
    let mut a = r.connect(alice);
    let mut b = std::net::TcpStream::connect(r.addr(bob)).unwrap();
    let mut hello = Vec::new();
    proto::chat::Encoder::new(&mut hello).hello(r.token(bob).as_bytes());
    b.write_all(&hello).unwrap();
    assert!(r.relay.wait_metric_sum(&r, "relay_chat_sessions", 2) >= 2);
    let body = vec![7u8; 60_000];
    for _ in 0..200 {
        a.send_direct(bob, &body).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.total("relay_chat_sessions") != 1 {
        assert!(
            Instant::now() < deadline,
            "the stalled reader was never closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Alice is still served.
    let mut a2 = r.connect((300..).find(|&u| ids::home_shard(u, SHARDS) == 0).unwrap());
    a.send_direct(a2.user, b"still here").unwrap();
    let got = collect(&mut a2, 1, |e| matches!(e, Event::Message(_)));
    assert_eq!(messages(&got)[0].body, b"still here");
    assert!(r.relay.wait_metric_sum(&r, "relay_chat_errors_total", 2) >= 2);
    drop(b);
}

/// Both commit modes: `[chat] sync_thread = true` (fdatasync on the sync thread, pipelined,
/// the default) and `false` (inline per loop turn); the guarantee must not change.
fn kill_9_under_load_loses_nothing_acknowledged_as_sent(io: &str, sync_thread: bool) {
    use std::collections::{HashMap, HashSet};
    let dir = temp_dir("chat-crash", io);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("relay.toml");
    std::fs::write(&config, format!("[chat]\nsync_thread = {sync_thread}\n")).unwrap();
    let extra = vec!["--config".to_string(), config.to_str().unwrap().to_string()];
    let mut r = ChatRelay::start_with(io, dir.clone(), None, &extra);
    let chat_port = r.chat_port;
    let pid = r.relay.child.id();
    let senders: Vec<u64> = (400..404).collect();
    let receivers: Vec<u64> = (500..504).collect();
    // Senders stream messages without waiting; "sent" acknowledgements are collected until the
    // relay is killed mid-stream.
    let sent_ok: HashMap<u64, HashSet<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = senders
            .iter()
            .zip(&receivers)
            .map(|(&from, &to)| {
                let r = &r;
                s.spawn(move || {
                    let mut c = r.connect(from);
                    let mut ids = HashMap::new();
                    let mut acked = HashSet::new();
                    for i in 0..3000u64 {
                        let id = c.send_direct(to, &i.to_le_bytes());
                        let Ok(id) = id else { break };
                        ids.insert(id, i);
                        while let Ok(Some(Event::Sent { msg_id, .. })) = c.recv(Duration::ZERO) {
                            acked.extend(ids.get(&msg_id).copied());
                        }
                    }
                    loop {
                        match c.recv(Duration::from_millis(500)) {
                            Ok(Some(Event::Sent { msg_id, .. })) => {
                                acked.extend(ids.get(&msg_id).copied())
                            }
                            Ok(Some(_)) => {}
                            _ => break,
                        }
                    }
                    (from, acked)
                })
            })
            .collect();
        // Let the load run, then kill the relay abruptly.
        std::thread::sleep(Duration::from_millis(300));
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    r.relay.kill9();
    let total: usize = sent_ok.values().map(HashSet::len).sum();
    assert!(
        total > 100,
        "some messages were acknowledged before the kill ({total})"
    );
    let r2 = ChatRelay::start_with(io, dir.clone(), Some(chat_port), &extra);
    for (&from, &to) in senders.iter().zip(&receivers) {
        let mut c = Client::connect(r2.addr(to), &r2.token(to), T).unwrap();
        let mut got: Vec<u64> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match c.recv(Duration::from_millis(500)).unwrap() {
                Some(Event::Message(m)) if m.sender == from && m.kind == kind::TEXT => {
                    got.push(u64::from_le_bytes(m.body[..8].try_into().unwrap()));
                }
                Some(Event::BacklogEnd) => break,
                Some(_) => {}
                None => c.ack_all().unwrap(),
            }
            if got.len().is_multiple_of(100) {
                c.ack_all().unwrap();
            }
            assert!(Instant::now() < deadline, "backlog did not end");
        }
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, sorted, "per-chat order for {from} -> {to}");
        let unique: HashSet<u64> = got.iter().copied().collect();
        assert_eq!(unique.len(), got.len(), "exactly once for {from} -> {to}");
        let missing: Vec<u64> = sent_ok[&from]
            .iter()
            .copied()
            .filter(|i| !unique.contains(i))
            .collect();
        assert!(
            missing.is_empty(),
            "{from} -> {to}: acknowledged but lost: {missing:?}"
        );
        eprintln!(
            "crash test {from} -> {to}: {} acknowledged as sent, {} delivered after restart",
            sent_ok[&from].len(),
            got.len()
        );
    }
    drop(r);
}

/// The log a checkpoint leaves behind after an acknowledged conversation and two messages for a
/// recipient who went away (the chat's newest snapshot after its waiting entries, the older
/// segments recycled) survives kill -9: the relay starts again and delivers both. It refused
/// to start ("entry for unknown chat") before replay took entries ahead of their snapshot.
fn kill_9_after_a_checkpoint_restarts_and_delivers_what_waits(io: &str) {
    let dir = temp_dir("chat-checkpoint", io);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("relay.toml");
    // 64 KiB segments: a few hundred messages fill three, which calls for a checkpoint.
    std::fs::write(
        &config,
        "[chat]\nsegment_bytes = 65536\nmsgs_per_s = 100000\n",
    )
    .unwrap();
    let extra = vec!["--config".to_string(), config.to_str().unwrap().to_string()];
    let mut r = ChatRelay::start_with(io, dir.clone(), None, &extra);
    let (alice, bob) = users_on_both_shards();
    let owner = ids::owner_shard(ids::direct_chat(alice, bob), SHARDS);
    let first_segment = dir
        .join(format!("shard-{owner}"))
        .join(format!("{:020}.seg", 1));
    let mut a = r.connect(alice);
    let mut b = r.connect(bob);
    assert!(first_segment.exists(), "{}", first_segment.display());
    // An exchange acknowledged on both sides: everything in it dies but the chat's snapshot.
    for round in 0..16 {
        for _ in 0..50 {
            a.send_direct(bob, &[round as u8; 100]).unwrap();
        }
        let got = collect(&mut b, 50, |e| matches!(e, Event::Message(_)));
        assert_eq!(messages(&got).len(), 50);
        b.ack_all().unwrap();
        // The DELIVERED receipt (one per acknowledgement), acknowledged in turn.
        let got = collect(
            &mut a,
            1,
            |e| matches!(e, Event::Message(m) if m.kind == kind::DELIVERED),
        );
        assert!(!messages(&got).is_empty());
        a.ack_all().unwrap();
    }
    drop(b);
    a.send_direct(bob, b"waiting 1").unwrap();
    a.send_direct(bob, b"waiting 2").unwrap();
    let sent = collect(&mut a, 2, |e| matches!(e, Event::Sent { .. }));
    assert_eq!(
        sent.iter()
            .filter(|e| matches!(e, Event::Sent { .. }))
            .count(),
        2
    );
    // Housekeeping (every 100 ms) checkpoints; the first segment then holds nothing live and
    // is recycled.
    let deadline = Instant::now() + Duration::from_secs(10);
    while first_segment.exists() {
        assert!(
            Instant::now() < deadline,
            "the checkpoint never freed the first segment"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let chat_port = r.chat_port;
    r.relay.kill9();
    let r2 = ChatRelay::start_with(io, dir.clone(), Some(chat_port), &extra);
    let mut b = Client::connect(r2.addr(bob), &r2.token(bob), T).unwrap();
    let got = collect(&mut b, 1, |e| matches!(e, Event::BacklogEnd));
    let bodies: Vec<&[u8]> = messages(&got).iter().map(|m| &m.body[..]).collect();
    assert_eq!(bodies, [&b"waiting 1"[..], &b"waiting 2"[..]]);
    drop(r);
}

/// A GROUP_LIST answer too long for one frame (8 groups of 1,024 members, 65,616 bytes) comes
/// over several GROUPS frames, which the client library puts back together.
fn a_groups_answer_longer_than_a_frame_reaches_the_client_whole(io: &str) {
    let r = ChatRelay::start(io);
    let (alice, _) = users_on_both_shards();
    let mut a = r.connect(alice);
    for g in 0..8u64 {
        let members: Vec<u64> = (0..1023).map(|i| 1_000_000 + g * 10_000 + i).collect();
        a.queue(|e| e.group_create(&relay::chat::client::new_msg_id(), &members));
    }
    a.flush().unwrap();
    let sent = collect(&mut a, 8, |e| matches!(e, Event::Sent { .. }));
    let mut made: Vec<u64> = sent
        .iter()
        .filter_map(|e| match e {
            Event::Sent { chat, .. } => Some(*chat),
            _ => None,
        })
        .collect();
    assert_eq!(made.len(), 8, "{sent:?}");
    a.queue(|e| e.group_list());
    a.flush().unwrap();
    let got = collect(&mut a, 1, |e| matches!(e, Event::Groups(_)));
    let Some(Event::Groups(groups)) = got.into_iter().find(|e| matches!(e, Event::Groups(_)))
    else {
        panic!("no GROUPS answer")
    };
    assert!(groups.iter().all(|(_, m)| m.len() == 1024));
    let mut listed: Vec<u64> = groups.iter().map(|(c, _)| *c).collect();
    listed.sort_unstable();
    made.sort_unstable();
    assert_eq!(listed, made);
}

/// Frames a peer sends just before it closes are handled: 16 KiB of SENDs (the batch
/// backend's read size, so its first read fills up and the next one sees the end of stream)
/// written in one go, then the close; the recipient gets every message.
fn sends_right_before_a_close_are_stored(io: &str) {
    use std::io::Write;
    let r = ChatRelay::start(io);
    let (alice, bob) = users_on_both_shards();
    let mut raw = std::net::TcpStream::connect(r.addr(alice)).unwrap();
    let mut hello = Vec::new();
    proto::chat::Encoder::new(&mut hello).hello(r.token(alice).as_bytes());
    raw.write_all(&hello).unwrap();
    assert!(r.relay.wait_metric_sum(&r, "relay_chat_sessions", 1) >= 1);
    // 256 SEND frames of 64 bytes (a 10-byte body): 16,384 bytes.
    let mut sends = Vec::new();
    for i in 0..256u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        let mut body = [0u8; 10];
        body[..4].copy_from_slice(&i.to_le_bytes());
        proto::chat::Encoder::new(&mut sends).send(&id, 0, bob, kind::TEXT, &[0; 16], &body);
    }
    assert_eq!(sends.len(), 16 * 1024);
    raw.write_all(&sends).unwrap();
    drop(raw);
    let mut b = Client::connect(r.addr(bob), &r.token(bob), T).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 256 && Instant::now() < deadline {
        match b.recv(Duration::from_millis(200)).unwrap() {
            Some(Event::Message(m)) => {
                got.push(u32::from_le_bytes(m.body[..4].try_into().unwrap()))
            }
            Some(_) => {}
            None => b.ack_all().unwrap(),
        }
    }
    assert_eq!(got, (0..256).collect::<Vec<u32>>());
}

/// Every chat scenario, on one backend.
macro_rules! chat_for_backend {
    ($backend:ident) => {
        mod $backend {
            #[test]
            fn direct_chat_gets_sent_delivered_and_read_in_order_across_shards() {
                super::direct_chat_gets_sent_delivered_and_read_in_order_across_shards(stringify!(
                    $backend
                ));
            }
            #[test]
            fn offline_recipient_gets_backlog_in_order_and_the_inbox_empties() {
                super::offline_recipient_gets_backlog_in_order_and_the_inbox_empties(stringify!(
                    $backend
                ));
            }
            #[test]
            fn group_of_five_member_added_later_sees_only_from_its_join() {
                super::group_of_five_member_added_later_sees_only_from_its_join(stringify!(
                    $backend
                ));
            }
            #[test]
            fn resent_id_is_delivered_once_and_edits_and_deletes_reach_every_member() {
                super::resent_id_is_delivered_once_and_edits_and_deletes_reach_every_member(
                    stringify!($backend),
                );
            }
            #[test]
            fn bad_input_gets_an_error_then_close_while_others_are_served() {
                super::bad_input_gets_an_error_then_close_while_others_are_served(stringify!(
                    $backend
                ));
            }
            #[test]
            fn sigterm_tells_chat_sessions_to_reconnect() {
                super::sigterm_tells_chat_sessions_to_reconnect(stringify!($backend));
            }
            #[test]
            fn connections_beyond_max_conns_get_an_error_and_are_closed() {
                super::connections_beyond_max_conns_get_an_error_and_are_closed(stringify!(
                    $backend
                ));
            }
            #[test]
            fn cross_shard_burst_spills_then_delivers_everything_in_order() {
                super::cross_shard_burst_spills_then_delivers_everything_in_order(stringify!(
                    $backend
                ));
            }
            #[test]
            fn silent_and_stalled_peers_are_closed() {
                super::silent_and_stalled_peers_are_closed(stringify!($backend));
            }
            #[test]
            fn kill_9_with_inline_commits_loses_nothing_acknowledged_as_sent() {
                super::kill_9_under_load_loses_nothing_acknowledged_as_sent(
                    stringify!($backend),
                    false,
                );
            }
            #[test]
            fn kill_9_after_a_checkpoint_restarts_and_delivers_what_waits() {
                super::kill_9_after_a_checkpoint_restarts_and_delivers_what_waits(stringify!(
                    $backend
                ));
            }
            #[test]
            fn a_groups_answer_longer_than_a_frame_reaches_the_client_whole() {
                super::a_groups_answer_longer_than_a_frame_reaches_the_client_whole(stringify!(
                    $backend
                ));
            }
            #[test]
            fn sends_right_before_a_close_are_stored() {
                super::sends_right_before_a_close_are_stored(stringify!($backend));
            }
            #[test]
            fn kill_9_with_the_sync_thread_loses_nothing_acknowledged_as_sent() {
                super::kill_9_under_load_loses_nothing_acknowledged_as_sent(
                    stringify!($backend),
                    true,
                );
            }
        }
    };
}

chat_for_backend!(batch);
chat_for_backend!(uring);
