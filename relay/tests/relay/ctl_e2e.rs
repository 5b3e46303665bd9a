//! ctl and three relays as real processes on loopback: meetings through ctl's API, media
//! through the relay ctl named, removal within 1 s, a relay killed with SIGKILL and its room
//! re-placed within 5 s, and a ctl restart that keeps meetings and keys.

use super::{rtp, seqs, Client};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The ctl binary: beside the relay binary (`cargo test --workspace` builds both first); built
/// on demand when this package's tests run alone.
pub(crate) fn ctl_binary() -> PathBuf {
    let relay = PathBuf::from(env!("CARGO_BIN_EXE_relay"));
    let ctl = relay.with_file_name("ctl");
    if !ctl.exists() {
        let release = relay.parent().is_some_and(|d| d.ends_with("release"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "ctl"]);
        if release {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building ctl");
    }
    ctl
}

pub(crate) struct Proc {
    child: Child,
    first_line: String,
}

impl Proc {
    pub(crate) fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starts");
        let mut first_line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first_line)
            .unwrap();
        assert!(
            first_line.starts_with("ready "),
            "unexpected first line {first_line:?}"
        );
        Self { child, first_line }
    }

    pub(crate) fn field(&self, name: &str) -> String {
        self.first_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.first_line))
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn start_ctl(dir: &std::path::Path, listen: &str) -> (Proc, SocketAddr) {
    start_ctl_with(dir, listen, &[])
}

fn start_ctl_with(dir: &std::path::Path, listen: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(ctl_binary());
    cmd.args([
        "serve",
        "--listen",
        listen,
        "--data-dir",
        dir.to_str().unwrap(),
    ])
    .args(extra);
    let p = Proc::start(cmd);
    let addr = p.field("listen").parse().unwrap();
    (p, addr)
}

fn start_relay(ctl: SocketAddr, id: u32, base_port: u16) -> Proc {
    Proc::start(relay_command(ctl, id, base_port))
}

fn relay_command(ctl: SocketAddr, id: u32, base_port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.args([
        "--io",
        "batch",
        "--shards",
        "1",
        "--no-pin",
        "--metrics",
        "127.0.0.1:0",
    ])
    .args([
        "--base-port",
        &base_port.to_string(),
        "--relay-id",
        &id.to_string(),
    ])
    .args(["--ctl", &format!("http://{ctl}")])
    .env_remove("RELAY_CTL_TOKEN");
    cmd
}

/// One HTTP request; returns status and JSON body.
pub(crate) fn http(
    ctl: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    auth: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = auth
        .map(|a| format!("Authorization: Bearer {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ctl\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

/// The text of a `/metrics` endpoint (ctl's or a relay's).
pub(crate) fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut m = String::new();
    s.read_to_string(&mut m).unwrap();
    m
}

/// Sample `name` (no labels, or its labels written out) of a `/metrics` endpoint.
pub(crate) fn metric_at(addr: SocketAddr, name: &str) -> Option<u64> {
    scrape(addr)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

pub(crate) fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn join(ctl: SocketAddr, code: &str, name: &str) -> Value {
    let (status, j) = http(
        ctl,
        "POST",
        "/v1/join",
        Some(&serde_json::json!({"code": code, "name": name})),
        None,
    );
    assert_eq!(status, 200, "join: {j}");
    j
}

/// A participant bound to the relay and port ctl named.
fn bind(j: &Value) -> Client {
    let addr: SocketAddr = format!("{}:{}", j["relay_host"].as_str().unwrap(), j["udp_port"])
        .parse()
        .unwrap();
    let c = Client::new(addr, j["token"].as_str().unwrap().to_string());
    assert_eq!(c.bind().0, proto::stun::Class::Success, "bound at {addr}");
    c
}

#[test]
fn ctl_places_meetings_on_live_relays_and_survives_failures() {
    let dir = std::env::temp_dir().join(format!("relay-ctl-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut ctl_proc, ctl) = start_ctl(&dir, "127.0.0.1:0");
    // The three ctl tests take 30,000-31,199, 31,200-31,799 and 31,800-32,399: below the
    // kernel's ephemeral range (32,768 and up), where ctl's and the relays' own outgoing
    // connections would otherwise take a port a relay is about to bind.
    let base = 30_000 + (std::process::id() % 60) as u16 * 20;
    let mut relays: Vec<Option<Proc>> = (1..=3)
        .map(|id| Some(start_relay(ctl, id, base + id as u16)))
        .collect();
    wait_until("3 relays alive", Duration::from_secs(5), || {
        http(ctl, "GET", "/health", None, None).1["relays_alive"] == 3
    });

    // A meeting and four participants, all sent to the same relay and port.
    let (status, m) = http(
        ctl,
        "POST",
        "/v1/meetings",
        Some(&serde_json::json!({"title": "e2e"})),
        None,
    );
    assert_eq!(status, 201, "{m}");
    let (meeting, code, secret) = (
        m["meeting_id"].as_u64().unwrap(),
        m["code"].as_str().unwrap().to_string(),
        m["host_secret"].as_str().unwrap().to_string(),
    );
    let host = m["join"].clone();
    let joins: Vec<Value> = (0..3).map(|i| join(ctl, &code, &format!("p{i}"))).collect();
    let relay_id = host["relay_id"].as_u64().unwrap();
    assert!(joins
        .iter()
        .all(|j| j["relay_id"] == host["relay_id"] && j["udp_port"] == host["udp_port"]));
    let publisher = bind(&host);
    let subs: Vec<Client> = joins.iter().map(bind).collect();
    for seq in 0..50 {
        publisher.send(&rtp(0xE2E, seq, 200));
    }
    for s in &subs {
        assert_eq!(
            seqs(&s.drain(Duration::from_millis(300))).len(),
            50,
            "media flows through the relay ctl named"
        );
    }

    // Removal through the API stops forwarding within 1 s.
    let victim = joins[0]["participant_id"].as_u64().unwrap();
    let (status, r) = http(
        ctl,
        "DELETE",
        &format!("/v1/meetings/{meeting}/participants/{victim}"),
        None,
        Some(&secret),
    );
    assert_eq!(status, 200, "{r}");
    let removed_at = Instant::now();
    let mut last_received = removed_at;
    let mut seq = 100u16;
    while removed_at.elapsed() < Duration::from_millis(1500) {
        publisher.send(&rtp(0xE2E, seq, 200));
        seq += 1;
        if !seqs(&subs[0].drain(Duration::from_millis(10))).is_empty() {
            last_received = Instant::now();
        }
    }
    let stopped_after = last_received.duration_since(removed_at);
    eprintln!("e2e: removed participant stopped receiving {stopped_after:?} after the API call");
    assert!(
        stopped_after < Duration::from_secs(1),
        "forwarding stopped after {stopped_after:?}"
    );
    assert!(
        !seqs(&subs[1].drain(Duration::from_millis(200))).is_empty(),
        "the others still receive"
    );

    // SIGKILL the room's relay: within 5 s joins go to a live relay.
    let killed_at = Instant::now();
    relays[relay_id as usize - 1].take().unwrap().kill9();
    let mut moved = Value::Null;
    wait_until(
        "the room re-placed on a live relay",
        Duration::from_secs(5),
        || {
            let (status, j) = http(
                ctl,
                "POST",
                "/v1/join",
                Some(&serde_json::json!({"code": code, "name": "late"})),
                None,
            );
            moved = j;
            status == 200 && moved["relay_id"].as_u64().is_some_and(|r| r != relay_id)
        },
    );
    eprintln!(
        "e2e: room moved from relay {relay_id} to relay {} in {:?}",
        moved["relay_id"],
        killed_at.elapsed()
    );
    let late = bind(&moved);
    let rejoined = http(
        ctl,
        "POST",
        "/v1/join",
        Some(&serde_json::json!({"code": code, "rejoin_token": host["token"]})),
        None,
    )
    .1;
    assert_eq!(rejoined["relay_id"], moved["relay_id"]);
    let host_again = bind(&rejoined);
    host_again.send(&rtp(0xE2F, 1, 100));
    assert_eq!(
        seqs(&late.drain(Duration::from_millis(300))),
        vec![1],
        "media flows on the new relay"
    );

    // Restart ctl on the same port and data: the meeting and the key survive.
    let (_, key_before) = http(ctl, "GET", "/v1/public-key", None, None);
    ctl_proc.kill9();
    let (_ctl_proc2, ctl2) = start_ctl(&dir, &ctl.to_string());
    assert_eq!(
        http(ctl2, "GET", "/v1/public-key", None, None).1,
        key_before,
        "same key"
    );
    wait_until("relays re-learned", Duration::from_secs(5), || {
        http(ctl2, "GET", "/health", None, None).1["relays_alive"] == 2
    });
    let after = join(ctl2, &code, "after-restart");
    assert_eq!(
        after["meeting_id"].as_u64(),
        Some(meeting),
        "the meeting survived"
    );
    assert_eq!(
        after["relay_id"], moved["relay_id"],
        "its placement survived"
    );
    drop(relays);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `user`'s chat home as ctl answers it, and a session opened there with its token.
fn chat_home(ctl: SocketAddr, user: u64) -> (Value, relay::chat::client::Client) {
    let (status, h) = http(ctl, "GET", &format!("/v1/users/{user}/home"), None, None);
    assert_eq!(status, 200, "{h}");
    let addr: SocketAddr = format!("{}:{}", h["host"].as_str().unwrap(), h["chat_port"])
        .parse()
        .unwrap();
    let session = relay::chat::client::Client::connect(
        addr,
        h["token"].as_str().unwrap(),
        Duration::from_secs(5),
    )
    .expect("chat session");
    (h, session)
}

/// A user's chat home looked up through ctl leads to a working chat session on the relay.
#[test]
fn chat_homes_from_ctl_work_on_the_relay() {
    use relay::chat::client::Event;
    let dir = std::env::temp_dir().join(format!("relay-ctl-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_ctl_proc, ctl) = start_ctl(&dir.join("ctl"), "127.0.0.1:0");
    let base = 31_200 + (std::process::id() % 60) as u16 * 10;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.args([
        "--io",
        "batch",
        "--shards",
        "2",
        "--no-pin",
        "--metrics",
        "127.0.0.1:0",
    ])
    .args(["--base-port", &base.to_string(), "--relay-id", "9"])
    .args([
        "--chat-port",
        &(base + 4).to_string(),
        "--data-dir",
        dir.join("relay").to_str().unwrap(),
    ])
    .args(["--ctl", &format!("http://{ctl}")]);
    let _relay = Proc::start(cmd);
    wait_until("relay alive", Duration::from_secs(5), || {
        http(ctl, "GET", "/health", None, None).1["relays_alive"] == 1
    });
    let home = |user: u64| {
        let (h, session) = chat_home(ctl, user);
        assert_eq!(
            h["shard_idx"].as_u64(),
            Some(u64::from(proto::chat::ids::home_shard(user, 2)))
        );
        session
    };
    let (a, b) = (11u64, 12u64);
    let mut ca = home(a);
    let mut cb = home(b);
    ca.send_direct(b, b"via ctl").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        if let Some(Event::Message(m)) = cb.recv(Duration::from_millis(200)).unwrap() {
            got = Some(m.body);
        }
    }
    assert_eq!(got.as_deref(), Some(&b"via ctl"[..]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `ctl credential ARGS --data-dir DIR` prints.
pub(crate) fn ctl_credential(data_dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(ctl_binary())
        .arg("credential")
        .args(args)
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .output()
        .expect("ctl credential runs");
    assert!(out.status.success(), "{:?}", out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Issue 17, item 2: nothing but the client routes is open to a caller without a credential.
/// With `trust_loopback = false` this loopback ctl treats its callers as any remote address is
/// treated: the admin routes need the admin credential, the relay routes the relay's own, and
/// one relay's credential opens nothing for another relay id.
#[test]
fn admin_and_relay_routes_need_their_own_credentials() {
    let dir = std::env::temp_dir().join(format!("relay-ctl-creds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("ctl.toml");
    std::fs::write(&config, "trust_loopback = false\n").unwrap();
    let data = dir.join("ctl");
    let (_ctl_proc, ctl) = start_ctl_with(
        &data,
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    );
    let admin = ctl_credential(&data, &["admin"]);
    let seven = ctl_credential(&data, &["relay", "7"]);
    assert_eq!(admin.len(), 64);
    assert_ne!(seven, ctl_credential(&data, &["relay", "5"]));
    let base = 31_800 + (std::process::id() % 60) as u16 * 10;

    // Without a credential, or with relay 7's as relay 5 (a stolen or misplaced one), a relay
    // is refused at once: it exits with a clear error instead of retrying for 30 s, and ctl
    // never lists it.
    for (i, token) in [None, Some(seven.as_str())].into_iter().enumerate() {
        let mut cmd = relay_command(ctl, 5 + i as u32, base + i as u16);
        if let Some(t) = token {
            cmd.env("RELAY_CTL_TOKEN", t);
        }
        let started = Instant::now();
        let out = cmd.stdin(Stdio::null()).output().expect("relay runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a refused relay fails: {err}");
        assert_eq!(
            out.status.code(),
            Some(77),
            "EX_NOPERM: not restarted by systemd"
        );
        assert!(
            err.contains("HTTP 40") && err.contains("ctl refused this relay's credentials"),
            "the error says why: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no retrying a refusal"
        );
    }
    let health = || http(ctl, "GET", "/health", None, None).1;
    assert_eq!(health()["relays_alive"], 0);
    // The command poll is closed to strangers and to other relays' credentials.
    let poll = "/v1/relays/5/commands?wait_ms=0";
    let (status, body) = http(ctl, "GET", poll, None, None);
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    for wrong in [seven.as_str(), admin.as_str()] {
        let (status, body) = http(ctl, "GET", poll, None, Some(wrong));
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("bad_credentials"))
        );
    }

    // With its own (from the environment, as an EnvironmentFile gives it), relay 7
    // registers, serves, and keeps heartbeating.
    let mut cmd = relay_command(ctl, 7, base + 7);
    cmd.env("RELAY_CTL_TOKEN", &seven);
    let _relay = Proc::start(cmd);
    wait_until("the relay alive in ctl", Duration::from_secs(5), || {
        health()["relays_alive"] == 1
    });
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        health()["relays_alive"],
        1,
        "still alive after ctl's 3 s dead-after: its heartbeats are accepted"
    );

    // Every admin route: refused without a credential and with a relay's, served with the
    // admin credential. Nothing was drained by the refused attempts.
    let admin_routes = [
        ("GET", "/v1/relays"),
        ("GET", "/v1/rooms"),
        ("GET", "/v1/users/42/home"),
        ("POST", "/v1/relays/7/drain"),
        ("POST", "/v1/relays/7/undrain"),
    ];
    for (method, path) in admin_routes {
        for auth in [None, Some(seven.as_str())] {
            let (status, body) = http(ctl, method, path, None, auth);
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {body}");
            let want = if auth.is_some() {
                "bad_credentials"
            } else {
                "unauthenticated"
            };
            assert_eq!(body["code"], want, "{method} {path}");
        }
    }
    let (_, relays) = http(ctl, "GET", "/v1/relays", None, Some(&admin));
    assert_eq!(relays["relays"][0]["relay_id"], 7, "{relays}");
    for (method, path) in admin_routes {
        let (status, body) = http(ctl, method, path, None, Some(&admin));
        assert_eq!(status, 200, "{method} {path}: {body}");
    }
    // Meetings are made by accounts or operators (the admin credential), not by anonymous
    // callers; joining by the code stays open to guests.
    let create = |auth| {
        http(
            ctl,
            "POST",
            "/v1/meetings",
            Some(&serde_json::json!({})),
            auth,
        )
    };
    assert_eq!(create(None).0, 401);
    let (status, m) = create(Some(&admin));
    assert_eq!(status, 201, "{m}");
    let join = serde_json::json!({"code": m["code"], "name": "guest"});
    let (status, j) = http(ctl, "POST", "/v1/join", Some(&join), None);
    assert_eq!(status, 200, "{j}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay with media and chat (one 1:1 conversation) while ctl is stopped (SIGSTOP) for 10 s,
/// then resumed, then killed (SIGKILL) and started again on its data directory. ctl counts a
/// relay's silence on its own running time (`ctl::membership::POLL_GAP`), so its pause is
/// nobody's death, and relays serve without it: no room is closed, no packet and no message is
/// lost, the participants' refreshes work throughout. New participants are refused (STUN 503
/// "No lease") while the relay's lease is lapsed, and are taken again within 2 s of ctl's
/// return, after the pause and after the restart.
#[test]
fn a_paused_or_restarted_ctl_ends_no_meeting_and_loses_no_message() {
    use relay::chat::client::{Client as ChatClient, Event};
    let dir = std::env::temp_dir().join(format!("relay-ctl-pause-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ctl_proc, ctl) = start_ctl(&dir.join("ctl"), "127.0.0.1:0");
    // Ports 32,400-32,759: below the ephemeral range, beside the other ctl tests' blocks.
    let base = 32_400 + (std::process::id() % 60) as u16 * 6;
    let mut cmd = relay_command(ctl, 1, base);
    cmd.args(["--chat-port", &(base + 3).to_string()])
        .args(["--data-dir", dir.join("relay").to_str().unwrap()]);
    let _relay = Proc::start(cmd);
    wait_until("relay alive", Duration::from_secs(5), || {
        http(ctl, "GET", "/health", None, None).1["relays_alive"] == 1
    });
    let (status, m) = http(
        ctl,
        "POST",
        "/v1/meetings",
        Some(&serde_json::json!({"title": "pause"})),
        None,
    );
    assert_eq!(status, 201, "{m}");
    let code = m["code"].as_str().unwrap().to_string();
    let publisher = bind(&m["join"]);
    let guest = bind(&join(ctl, &code, "guest"));
    let chat = |user: u64| chat_home(ctl, user).1;
    let (a, b) = (21u64, 22u64);
    let mut author = chat(a);
    let mut reader = chat(b);
    // The reader takes what comes, acknowledging as it goes, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let reading = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Some(Event::Message(m)) = reader.recv(Duration::from_millis(50)).unwrap() {
                    got.push(m.body.to_vec());
                    reader.ack_all().unwrap();
                }
            }
            got
        })
    };
    let mut seq = 0u16;
    let mut said = 0u32;
    // One tick of load: a packet from the publisher and a message from the author.
    let mut load = |author: &mut ChatClient| {
        publisher.send(&rtp(0xCA5E, seq, 200));
        seq += 1;
        author
            .send_direct(b, format!("m{said}").as_bytes())
            .unwrap();
        said += 1;
    };
    // A new participant: one bind attempt with a fresh token (None: refused with `code`).
    let newcomer = |name: &str| {
        let j = join(ctl, &code, name);
        let addr: SocketAddr = format!("{}:{}", j["relay_host"].as_str().unwrap(), j["udp_port"])
            .parse()
            .unwrap();
        let c = Client::new(addr, j["token"].as_str().unwrap().to_string());
        match c.bind() {
            (proto::stun::Class::Success, _, _) => Ok(c),
            (_, code, _) => Err(code),
        }
    };
    // How long after `from` a new participant is taken (refusals must be 503 "No lease").
    let taken_after = |from: Instant, name: &str| loop {
        match newcomer(name) {
            Ok(c) => break (from.elapsed(), c),
            Err(Some(503)) => std::thread::sleep(Duration::from_millis(50)),
            Err(other) => panic!("a new participant got {other:?}"),
        }
        assert!(
            from.elapsed() < Duration::from_secs(10),
            "no new join within 10 s"
        );
    };

    let pid = ctl_proc.child.id() as libc::pid_t;
    // SAFETY: signals to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // Media and chat go on while ctl is stopped: 100 ticks over 10 s.
    for _ in 0..100 {
        load(&mut author);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        seqs(&guest.drain(Duration::from_millis(300))).len(),
        100,
        "the relay forwarded every packet while ctl was stopped"
    );
    assert_eq!(publisher.bind().0, proto::stun::Class::Success, "a refresh");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let (after_pause, late) = taken_after(Instant::now(), "late");
    let metrics = scrape(ctl);
    assert!(
        metrics.lines().any(|l| l == "ctl_relay_deaths_total 0"),
        "no relay declared dead: {metrics}"
    );

    // ctl killed and started again on its data directory, at the same address.
    drop(ctl_proc);
    for _ in 0..20 {
        load(&mut author);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ctl_proc, again) = start_ctl(&dir.join("ctl"), &ctl.to_string());
    assert_eq!(again, ctl);
    let (after_restart, later) = taken_after(Instant::now(), "later");
    eprintln!(
        "ctl paused 10 s: a new participant was taken {after_pause:?} after it resumed; \
         restarted: {after_restart:?} after it was ready"
    );
    assert!(after_pause < Duration::from_secs(2), "{after_pause:?}");
    assert!(after_restart < Duration::from_secs(2), "{after_restart:?}");
    for _ in 0..10 {
        load(&mut author);
    }
    assert_eq!(seqs(&guest.drain(Duration::from_millis(300))).len(), 30);
    assert_eq!(seqs(&late.drain(Duration::from_millis(300))).len(), 30);
    assert_eq!(seqs(&later.drain(Duration::from_millis(300))).len(), 10);
    assert_eq!(publisher.bind().0, proto::stun::Class::Success);
    assert_eq!(guest.bind().0, proto::stun::Class::Success);

    // Every message was acknowledged as sent, and delivered once, in order.
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while sent < said && Instant::now() < deadline {
        if let Some(Event::Sent { .. }) = author.recv(Duration::from_millis(100)).unwrap() {
            sent += 1;
        }
    }
    assert_eq!(sent, said, "SENT for every message");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let got = reading.join().unwrap();
    let want: Vec<Vec<u8>> = (0..said).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(got, want, "every message delivered once, in order");
    drop(ctl_proc);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay's link to ctl, through a proxy the test can cut and heal, while the relay's
/// clients still reach it directly.
struct Link {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Link {
    fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(a) = conn else { continue };
                if flag.load(Ordering::SeqCst) {
                    continue; // dropped: the relay sees its connection closed
                }
                let Ok(b) = TcpStream::connect(to) else {
                    continue;
                };
                let pairs = [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)];
                for (mut from, mut into) in pairs {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        from.set_read_timeout(Some(Duration::from_millis(50)))
                            .unwrap();
                        let mut buf = [0u8; 16 * 1024];
                        while !flag.load(Ordering::SeqCst) {
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) if into.write_all(&buf[..n]).is_err() => break,
                                Ok(_) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = into.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

/// A relay cut off from ctl (its link to ctl down) while its clients still reach it. Its lease
/// lapses 2.5 s after it sent its last answered heartbeat, before ctl declares it dead (3 s
/// after it last heard from it) and moves its room: from then on it takes no new participant
/// (STUN 503 "No lease"), while the participants it has keep their media. When the link heals,
/// ctl has it close the moved room (with a fence for every token issued before) before it grants
/// a new lease: its participants get 403 "Removed" and join again through ctl, on the relay the
/// room moved to. No relay takes a new join for the room once ctl has moved it.
#[test]
fn a_relay_cut_off_from_ctl_takes_no_new_join_once_its_lease_lapses() {
    let dir = std::env::temp_dir().join(format!("relay-ctl-cut-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("ctl.toml");
    std::fs::write(&config, "max_participants = 1000\n").unwrap();
    let (_ctl_proc, ctl) = start_ctl_with(
        &dir.join("data"),
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    );
    // Ports 29,400-29,999: below the ephemeral range, apart from the other tests' blocks.
    let base = 29_400 + (std::process::id() % 60) as u16 * 10;
    let link = Link::start(ctl);
    let _relay1 = start_relay(link.addr, 1, base);
    let _relay2 = start_relay(ctl, 2, base + 2);
    wait_until("both relays alive", Duration::from_secs(5), || {
        http(ctl, "GET", "/health", None, None).1["relays_alive"] == 2
    });
    let m = (0..100)
        .map(|_| {
            let body = serde_json::json!({"title": "cut"});
            let (status, m) = http(ctl, "POST", "/v1/meetings", Some(&body), None);
            assert_eq!(status, 201, "{m}");
            m
        })
        .find(|m| m["join"]["relay_id"] == 1)
        .expect("a meeting on relay 1 among 100");
    let code = m["code"].as_str().unwrap().to_string();
    let host = bind(&m["join"]);
    let guest = bind(&join(ctl, &code, "guest"));
    // Tokens for new participants on relay 1, taken before the cut and each tried once.
    let mut fresh = (0..40)
        .map(|i| join(ctl, &code, &format!("new{i}")))
        .collect::<Vec<_>>()
        .into_iter();
    let try_fresh = |j: Value| {
        assert_eq!(j["relay_id"], 1);
        let relay: SocketAddr = format!("127.0.0.1:{}", j["udp_port"]).parse().unwrap();
        let (class, code, _) = Client::new(relay, j["token"].as_str().unwrap().into()).bind();
        (class == proto::stun::Class::Success, code)
    };
    let mut seq = 0u16;
    let mut sent = 0usize;
    let mut send = |n: u16| {
        for _ in 0..n {
            host.send(&rtp(0xC07, seq, 200));
            seq += 1;
        }
        sent += usize::from(n);
    };
    send(10);
    assert_eq!(seqs(&guest.drain(Duration::from_millis(300))).len(), 10);

    link.set_cut(true);
    let cut_at = Instant::now();
    let refused_at = loop {
        assert!(
            cut_at.elapsed() < Duration::from_secs(3),
            "relay 1 still takes new participants 3 s after the cut"
        );
        match try_fresh(fresh.next().unwrap()) {
            (true, _) => {}
            (false, Some(503)) => break Instant::now(),
            other => panic!("a new participant on relay 1 got {other:?}"),
        }
        send(1);
        std::thread::sleep(Duration::from_millis(100));
    };
    // ctl declares relay 1 dead and moves the room to relay 2.
    let (moved_at, on2) = loop {
        let j = join(ctl, &code, "after");
        if j["relay_id"] == 2 {
            break (Instant::now(), j);
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(6),
            "the room did not move within 6 s of the cut"
        );
        send(1);
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "cut: relay 1 refused new participants after {:?}; ctl moved the room after {:?}",
        refused_at - cut_at,
        moved_at - cut_at
    );
    assert!(refused_at < moved_at, "relay 1 was fenced before the move");
    let newcomer = bind(&on2);
    assert_eq!(
        try_fresh(fresh.next().unwrap()),
        (false, Some(503)),
        "relay 1 takes no new participant once the room moved"
    );
    // The participants relay 1 had keep their media, and their refreshes work.
    send(10);
    let got = seqs(&guest.drain(Duration::from_millis(300))).len();
    assert_eq!(
        got,
        sent - 10,
        "the guest got everything sent since the cut"
    );
    assert_eq!(
        host.bind().0,
        proto::stun::Class::Success,
        "a refresh on relay 1"
    );

    link.set_cut(false);
    // Relay 1 heartbeats again; ctl has it close the moved room before it grants a lease.
    wait_until(
        "relay 1 closes the moved room",
        Duration::from_secs(5),
        || host.bind().1 == Some(403),
    );
    assert_eq!(
        try_fresh(fresh.next().unwrap()),
        (false, Some(403)),
        "a token issued before the move is fenced on relay 1"
    );
    // The old participants join again through ctl, where the room is now.
    let again = join(ctl, &code, "host again");
    assert_eq!(again["relay_id"], 2);
    let host2 = bind(&again);
    for s in 0..10u16 {
        host2.send(&rtp(0xC08, s, 200));
    }
    assert_eq!(seqs(&newcomer.drain(Duration::from_millis(300))).len(), 10);
    let _ = std::fs::remove_dir_all(&dir);
}
