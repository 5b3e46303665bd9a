//! `cargo xtask dist` and `cargo xtask deploy` for real: two sshd "hosts" on loopback, each
//! with its own temporary root, a real ctl, relays installed and rolled over ssh with the
//! pidfile service manager (this machine has no systemd; the systemd units are checked by
//! `systemd-analyze verify` and by xtask's unit tests).
//!
//! Needs `/usr/sbin/sshd`, `ssh` and `ssh-keygen` (Debian: openssh-server, openssh-client;
//! `cargo xtask test` installs them as root). Runs as root (sshd's privilege separation).
//! Ports: 36000 + (pid % 100) * 30 and the 30 above, apart from the relay tests' ranges.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

fn require_openssh() {
    let missing: Vec<&str> = [SSHD, "ssh", "ssh-keygen"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the deploy test needs {missing:?}: apt-get install openssh-server openssh-client"
    );
}

/// 30 ports for one run, spread by pid: below the kernel's ephemeral range (32768 and up by
/// default), where a client socket of this or another test could hold one of them (an sshd
/// once failed to start here with "Address already in use" on 36240), and above the ranges
/// of the relay's integration tests (10,000-29,999).
fn base_port() -> u16 {
    30_000 + (std::process::id() % 90) as u16 * 30
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// Runs a command with a deadline; kills it and fails the test when it runs over.
fn run_bounded(cmd: &mut Command, within: Duration) -> Output {
    let dir = std::env::temp_dir();
    let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id())
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let (out_path, err_path) = (
        dir.join(format!("xtask-deploy-out-{tag}")),
        dir.join(format!("xtask-deploy-err-{tag}")),
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} ran over {within:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    out
}

fn xtask(args: &[&str], within: Duration) -> (bool, String, String) {
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .current_dir(workspace()),
        within,
    );
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("--- xtask {args:?}: {}\n{o}{e}", out.status);
    (out.status.success(), o, e)
}

/// Everything a test started; killed on drop, including the relays started over ssh (found
/// by their pid files under each host root).
struct Lab {
    dir: PathBuf,
    children: Vec<Child>,
    roots: Vec<PathBuf>,
}

impl Lab {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xtask-deploy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            children: Vec::new(),
            roots: Vec::new(),
        }
    }

    /// A client key, a host key and the authorized_keys file shared by the sshd "hosts".
    fn keys(&self) {
        for key in ["client_key", "host_key"] {
            let out = run_bounded(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
                    .arg(self.dir.join(key)),
                Duration::from_secs(10),
            );
            assert!(out.status.success(), "ssh-keygen: {out:?}");
        }
        std::fs::copy(
            self.dir.join("client_key.pub"),
            self.dir.join("authorized_keys"),
        )
        .unwrap();
    }

    /// An sshd on 127.0.0.1:port and its host root; adds the host key to known_hosts.
    fn sshd(&mut self, name: &str, port: u16) -> PathBuf {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let d = &self.dir;
        let cfg = d.join(format!("sshd-{name}.conf"));
        std::fs::write(
            &cfg,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\n\
                 AuthorizedKeysFile {ak}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPrintMotd no\n",
                hk = d.join("host_key").display(),
                pid = d.join(format!("sshd-{name}.pid")).display(),
                ak = d.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join(format!("sshd-{name}.log"))).unwrap())
            .spawn()
            .expect("sshd starts");
        self.children.push(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until(
            &format!("sshd {name} on {addr}"),
            Duration::from_secs(10),
            || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
        );
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        let mut kh = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("known_hosts"))
            .unwrap();
        writeln!(kh, "[127.0.0.1]:{port} {}", host_pub.trim()).unwrap();
        let root = d.join(format!("root-{name}"));
        std::fs::create_dir_all(&root).unwrap();
        self.roots.push(root.clone());
        root
    }

    /// ctl on a free loopback port, from the binary dist built.
    fn ctl(&mut self) -> SocketAddr {
        let bin = target_dir().join("release/ctl");
        let mut child = Command::new(&bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.dir.join("ctl-data"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.join("ctl.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let mut line = Vec::new();
        let mut out = child.stdout.take().unwrap();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        self.children.push(child);
        let line = String::from_utf8(line).unwrap();
        line.strip_prefix("ready listen=")
            .unwrap_or_else(|| panic!("ctl's first line: {line:?}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for root in &self.roots {
            for name in ["relay", "ctl"] {
                if let Ok(pid) = std::fs::read_to_string(root.join(format!("run/relay/{name}.pid")))
                {
                    let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
                }
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http(ctl: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect_timeout(&ctl, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ctl\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn inventory(lab: &Lab, ctl: SocketAddr, hosts: &[(&str, u16, u16)], extra: &str) -> PathBuf {
    let mut s = format!(
        "[deploy]\nctl = \"http://{ctl}\"\nservice = \"pidfile\"\nidentity_file = \"{}\"\n\
         known_hosts = \"{}\"\ndrain_timeout_s = 2\nhealth_timeout_s = 20\n{extra}\n",
        lab.dir.join("client_key").display(),
        lab.dir.join("known_hosts").display()
    );
    for (i, (name, ssh_port, relay_base)) in hosts.iter().enumerate() {
        s += &format!(
            "[[host]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nssh_port = {ssh_port}\n\
             root = \"{}\"\nrelay_id = {}\nbind = \"127.0.0.1\"\nbase_port = {relay_base}\n\
             chat_port = {}\nmetrics = \"127.0.0.1:{}\"\nshards = 1\n\
             extra_args = [\"--io\", \"batch\", \"--no-pin\"]\n\n",
            lab.dir.join(format!("root-{name}")).display(),
            i + 1,
            relay_base + 1,
            relay_base + 2,
        );
    }
    let path = lab.dir.join("inventory.toml");
    std::fs::write(&path, s).unwrap();
    path
}

fn dist(lab: &Lab, version: &str) -> PathBuf {
    let out = lab.dir.join("dist");
    let (ok, stdout, _) = xtask(
        &["dist", "--version", version, "--out", out.to_str().unwrap()],
        Duration::from_secs(900),
    );
    assert!(ok, "dist");
    let tarball = PathBuf::from(stdout.trim());
    assert_eq!(tarball, out.join(format!("relay-{version}.tar.gz")));
    tarball
}

fn deploy(inv: &Path, tarball: &Path) -> (bool, String, String) {
    xtask(
        &[
            "deploy",
            "--inventory",
            inv.to_str().unwrap(),
            "--tarball",
            tarball.to_str().unwrap(),
        ],
        Duration::from_secs(180),
    )
}

fn current(root: &Path) -> String {
    std::fs::read_link(root.join("opt/relay/current"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn relay_pid(root: &Path) -> String {
    std::fs::read_to_string(root.join("run/relay/relay.pid"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A media participant: a UDP socket bound to the relay ctl named with its token.
struct Participant {
    sock: UdpSocket,
    relay: SocketAddr,
    token: String,
}

impl Participant {
    fn bind(join: &Value) -> Self {
        let relay: SocketAddr = format!(
            "{}:{}",
            join["relay_host"].as_str().unwrap(),
            join["udp_port"]
        )
        .parse()
        .unwrap();
        let p = Self {
            sock: UdpSocket::bind("127.0.0.1:0").unwrap(),
            relay,
            token: join["token"].as_str().unwrap().to_string(),
        };
        proto::binding::bind_blocking(&p.sock, relay, &p.token, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("bound at {relay}: {e}"));
        p
    }

    fn send_rtp(&self, seq: u16) {
        let mut buf = [0u8; 300];
        let n = proto::rtp::write_packet(
            &mut buf,
            96,
            seq,
            u32::from(seq) * 960,
            0xD0,
            false,
            &[1; 160],
        )
        .unwrap();
        self.sock.send_to(&buf[..n], self.relay).unwrap();
    }

    fn received_seqs(&self, quiet: Duration) -> Vec<u16> {
        self.sock.set_read_timeout(Some(quiet)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
            if let Ok(p) = proto::rtp::RtpPacket::parse(&buf[..n]) {
                got.push(p.sequence_number());
            }
        }
        got
    }
}

/// The publisher sends 20 packets; every subscriber receives all of them.
fn media_flows(publisher: &Participant, subscribers: &[Participant], first_seq: u16) {
    for seq in first_seq..first_seq + 20 {
        publisher.send_rtp(seq);
    }
    for s in subscribers {
        let got = s.received_seqs(Duration::from_millis(400));
        assert_eq!(
            got,
            (first_seq..first_seq + 20).collect::<Vec<_>>(),
            "media flows"
        );
    }
}

fn chat_connect(ctl: SocketAddr, user: u64) -> std::io::Result<relay::chat::client::Client> {
    let (status, h) = http(ctl, "GET", &format!("/v1/users/{user}/home"), None);
    if status != 200 || h["chat_port"].is_null() {
        return Err(std::io::Error::other(format!(
            "home of {user}: {status} {h}"
        )));
    }
    let addr: SocketAddr = format!("{}:{}", h["host"].as_str().unwrap(), h["chat_port"])
        .parse()
        .unwrap();
    relay::chat::client::Client::connect(addr, h["token"].as_str().unwrap(), Duration::from_secs(2))
}

/// Sends numbered messages from `from` to `to` until `stop`, reconnecting (through ctl) when
/// the relay goes away; returns the numbers acknowledged as sent.
fn chat_sender(ctl: SocketAddr, from: u64, to: u64, stop: &AtomicBool) -> HashSet<u64> {
    use relay::chat::client::Event;
    let mut acked = HashSet::new();
    let mut next = 0u64;
    let mut reconnects = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = chat_connect(ctl, from) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let mut ids = HashMap::new();
        let failed = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            match c.send_direct(to, &next.to_le_bytes()) {
                Ok(id) => {
                    ids.insert(id, next);
                    next += 1;
                }
                Err(_) => break true,
            }
            let mut closed = false;
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(20) {
                match c.recv(Duration::from_millis(5)) {
                    Ok(Some(Event::Sent { msg_id, .. })) => acked.extend(ids.get(&msg_id).copied()),
                    Ok(_) => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                break true;
            }
        };
        if !failed {
            // Collect the last acknowledgements.
            while let Ok(Some(e)) = c.recv(Duration::from_millis(500)) {
                if let Event::Sent { msg_id, .. } = e {
                    acked.extend(ids.get(&msg_id).copied());
                }
            }
        }
        reconnects += u32::from(failed);
    }
    eprintln!(
        "chat {from} -> {to}: {next} sent, {} acknowledged, {reconnects} reconnects",
        acked.len()
    );
    acked
}

/// Two (sender, recipient) pairs homed on each relay: chat runs inside one relay (a direct
/// chat's owner shard is on the relay of its users), so both users of a pair share a relay.
fn chat_pairs(ctl: SocketAddr) -> Vec<(u64, u64)> {
    let mut by_relay: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for user in 1001..1100 {
        let (status, h) = http(ctl, "GET", &format!("/v1/users/{user}/home"), None);
        assert_eq!(status, 200, "{h}");
        by_relay
            .entry(h["relay_id"].as_u64().unwrap())
            .or_default()
            .push(user);
    }
    assert_eq!(by_relay.len(), 2, "users are homed on both relays");
    by_relay
        .values()
        .flat_map(|users| {
            assert!(users.len() >= 4, "{users:?}");
            [(users[0], users[1]), (users[2], users[3])]
        })
        .collect()
}

/// Everything `user` has stored from `from`, in order.
fn chat_backlog(ctl: SocketAddr, user: u64, from: u64) -> Vec<u64> {
    use relay::chat::client::Event;
    let mut c = chat_connect(ctl, user).expect("receiver connects");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "the backlog of {user} did not end"
        );
        match c.recv(Duration::from_millis(500)).unwrap() {
            Some(Event::Message(m)) if m.sender == from => {
                got.push(u64::from_le_bytes(m.body[..8].try_into().unwrap()));
                if got.len() % 100 == 0 {
                    c.ack_all().unwrap();
                }
            }
            Some(Event::BacklogEnd) => break,
            Some(_) => {}
            None => c.ack_all().unwrap(),
        }
    }
    c.ack_all().unwrap();
    got
}

#[test]
fn rolling_deploy_keeps_rooms_and_chat_and_rolls_back_a_bad_release() {
    require_openssh();
    let mut lab = Lab::new("roll");
    lab.keys();
    let p = base_port();
    let root_a = lab.sshd("a", p);
    let root_b = lab.sshd("b", p + 1);
    let t1 = dist(&lab, "t1");
    let ctl = lab.ctl();
    let inv = inventory(&lab, ctl, &[("a", p, p + 2), ("b", p + 1, p + 6)], "");

    // First install: nothing runs yet, so nothing is drained.
    let (ok, out, _) = deploy(&inv, &t1);
    assert!(ok, "first deploy");
    assert!(out.contains("t1 is live on every host"), "{out}");
    for root in [&root_a, &root_b] {
        assert_eq!(current(root), "releases/t1");
        assert!(root.join("etc/relay/relay.toml").is_file());
        assert!(root.join("etc/systemd/system/relay.service").is_file());
        assert!(root.join("etc/sysctl.d/60-relay.conf").is_file());
        assert!(root.join("opt/relay/releases/t1/bin/relay").is_file());
    }
    let (_, health) = http(ctl, "GET", "/health", None);
    assert_eq!(health["relays_alive"], 2, "{health}");

    // A meeting with three participants and media flowing through the relay ctl named.
    let (status, m) = http(
        ctl,
        "POST",
        "/v1/meetings",
        Some(&serde_json::json!({"title": "roll"})),
    );
    assert_eq!(status, 201, "{m}");
    let code = m["code"].as_str().unwrap().to_string();
    let mut joins = vec![m["join"].clone()];
    for name in ["p1", "p2"] {
        let (status, j) = http(
            ctl,
            "POST",
            "/v1/join",
            Some(&serde_json::json!({"code": code, "name": name})),
        );
        assert_eq!(status, 200, "{j}");
        joins.push(j);
    }
    let room_relay = joins[0]["relay_id"].as_u64().unwrap();
    let parts: Vec<Participant> = joins.iter().map(Participant::bind).collect();
    media_flows(&parts[0], &parts[1..], 0);
    let pids_before = (relay_pid(&root_a), relay_pid(&root_b));

    // Chat users send through the rolling restart; the restart runs meanwhile.
    // The next release: the same binaries under a new version (one build per test run).
    let t2 = repack(&lab, &t1, "t2", "true");
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = chat_pairs(ctl);
    let (acked, (ok, out, err)) = std::thread::scope(|s| {
        let senders: Vec<_> = pairs
            .iter()
            .map(|&(from, to)| {
                let stop = &stop;
                s.spawn(move || chat_sender(ctl, from, to, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let result = deploy(&inv, &t2);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let acked: Vec<HashSet<u64>> = senders.into_iter().map(|h| h.join().unwrap()).collect();
        (acked, result)
    });
    assert!(ok, "rolling deploy: {err}");
    assert!(out.contains("t2 is live on every host"), "{out}");
    let room_host = if room_relay == 1 { "a" } else { "b" };
    assert!(
        out.contains(&format!(
            "{room_host}: 1 rooms still open after drain_timeout_s = 2"
        )),
        "the room's relay was drained with the room active: {out}"
    );
    assert!(
        out.find("deploy: a: t2 is serving") < out.find("deploy: b: rolling to t2"),
        "one at a time"
    );

    // Both relays came back, on the new release, as new processes, serving (undrained).
    for root in [&root_a, &root_b] {
        assert_eq!(current(root), "releases/t2");
    }
    let pids_after = (relay_pid(&root_a), relay_pid(&root_b));
    assert!(
        pids_after.0 != pids_before.0 && pids_after.1 != pids_before.1,
        "restarted"
    );
    let (_, relays) = http(ctl, "GET", "/v1/relays", None);
    for r in relays["relays"].as_array().unwrap() {
        assert_eq!(r["state"], "serving", "{r}");
        assert_eq!(r["drain_requested"], false, "{r}");
    }

    // The participants rejoin through ctl and media flows again.
    let rejoined: Vec<Participant> = joins
        .iter()
        .map(|j| {
            let (status, again) = http(
                ctl,
                "POST",
                "/v1/join",
                Some(&serde_json::json!({"code": code, "rejoin_token": j["token"]})),
            );
            assert_eq!(status, 200, "{again}");
            assert_eq!(again["participant_id"], j["participant_id"]);
            Participant::bind(&again)
        })
        .collect();
    media_flows(&rejoined[0], &rejoined[1..], 100);

    // Every chat message acknowledged as sent is delivered exactly once, in order.
    for (&(from, to), acked) in pairs.iter().zip(&acked) {
        assert!(
            acked.len() > 20,
            "{from} -> {to}: only {} acknowledged",
            acked.len()
        );
        let got = chat_backlog(ctl, to, from);
        let unique: HashSet<u64> = got.iter().copied().collect();
        assert_eq!(unique.len(), got.len(), "{from} -> {to}: exactly once");
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, sorted, "{from} -> {to}: in order");
        let lost: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|i| !unique.contains(i))
            .collect();
        assert!(
            lost.is_empty(),
            "{from} -> {to}: acknowledged but lost: {lost:?}"
        );
        eprintln!(
            "chat {from} -> {to}: {} acknowledged, {} delivered",
            acked.len(),
            got.len()
        );
    }

    // A release whose relay cannot start: the first host fails its health check and is rolled
    // back to t2; the second is not touched.
    let t3 = repack(
        &lab,
        &t1,
        "t3",
        "printf '#!/bin/sh\\necho broken release >&2\\nexit 1\\n' > relay-t3/bin/relay",
    );
    let inv = inventory(&lab, ctl, &[("a", p, p + 2), ("b", p + 1, p + 6)], "");
    let text = std::fs::read_to_string(&inv)
        .unwrap()
        .replace("health_timeout_s = 20", "health_timeout_s = 4");
    std::fs::write(&inv, text).unwrap();
    let (ok, _, err) = deploy(&inv, &t3);
    assert!(!ok, "a broken release fails");
    assert!(err.contains("deploy stopped at host a"), "{err}");
    assert!(
        err.contains("a: rolled back to t2, which is healthy"),
        "{err}"
    );
    assert!(err.contains("not rolled: b"), "{err}");
    assert_eq!(current(&root_a), "releases/t2");
    assert_eq!(current(&root_b), "releases/t2");
    assert_eq!(relay_pid(&root_b), pids_after.1, "b was not restarted");
    wait_until(
        "both relays alive after the rollback",
        Duration::from_secs(5),
        || http(ctl, "GET", "/health", None).1["relays_alive"] == 2,
    );
}

/// `base` repacked as release `version`, after running `edit` in the unpacked tree.
fn repack(lab: &Lab, base: &Path, version: &str, edit: &str) -> PathBuf {
    let work = lab.dir.join(format!("repack-{version}"));
    std::fs::create_dir_all(&work).unwrap();
    let sh = format!(
        "set -e; cd {w}; tar -xzf {base}; mv relay-* relay-{version}; \
         echo {version} > relay-{version}/VERSION; {edit}; \
         tar -czf ../dist/relay-{version}.tar.gz relay-{version}",
        w = work.display(),
        base = base.display()
    );
    let out = run_bounded(
        Command::new("sh").args(["-c", &sh]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    lab.dir.join(format!("dist/relay-{version}.tar.gz"))
}

/// Paths, kinds, sizes, modification times and link targets under `root`.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let link = std::fs::read_link(&p).ok();
        out.insert(
            p.clone(),
            format!(
                "{:?} {} {:?} {link:?}",
                md.file_type(),
                md.len(),
                md.modified().ok()
            ),
        );
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn bad_inventories_change_nothing_on_any_host() {
    require_openssh();
    let mut lab = Lab::new("bad");
    lab.keys();
    let p = base_port() + 10;
    let root = lab.sshd("a", p);
    std::fs::create_dir_all(root.join("etc/relay")).unwrap();
    std::fs::write(root.join("etc/relay/relay.toml"), "# the operator's\n").unwrap();
    // Never unpacked: every case below must stop before anything is uploaded.
    let tarball = lab.dir.join("relay-0.0.0-never.tar.gz");
    std::fs::write(&tarball, "not a tarball").unwrap();
    let ctl = lab.ctl();
    let good = std::fs::read_to_string(inventory(&lab, ctl, &[("a", p, p + 2)], "")).unwrap();
    let before = snapshot(&lab.dir.join("root-a"));

    let second_host = |name: &str, port: u16, id: u32| {
        format!(
            "[[host]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nssh_port = {port}\n\
             root = \"{}\"\nrelay_id = {id}\n",
            lab.dir.join("root-b").display()
        )
    };
    let cases: Vec<(&str, String, String)> = vec![
        (
            "unknown field",
            good.replace("shards = 1\n", "shards = 1\ncolour = \"blue\"\n"),
            "unknown field \"colour\" in [[host]]".into(),
        ),
        (
            "missing field",
            good.replace("relay_id = 1\n", ""),
            "is missing required field \"relay_id\"".into(),
        ),
        (
            "duplicate host",
            format!("{good}{}", second_host("a", p + 1, 2)),
            "duplicate host \"a\"".into(),
        ),
        (
            "unreachable host",
            format!("{good}{}", second_host("b", p + 5, 2)),
            format!("b: cannot reach root@127.0.0.1:{} over ssh", p + 5),
        ),
    ];
    let inv = lab.dir.join("bad.toml");
    for (what, text, message) in &cases {
        std::fs::write(&inv, text).unwrap();
        let (ok, _, err) = deploy(&inv, &tarball);
        assert!(!ok, "{what}: deploy must fail");
        assert!(
            err.contains(message),
            "{what}: expected {message:?} in:\n{err}"
        );
        assert!(err.contains("nothing was changed"), "{what}: {err}");
        assert_eq!(
            snapshot(&lab.dir.join("root-a")),
            before,
            "{what}: host a changed"
        );
    }
    // A dry run of the good inventory pre-flights and changes nothing either.
    std::fs::write(&inv, &good).unwrap();
    let (ok, out, err) = xtask(
        &[
            "deploy",
            "--dry-run",
            "--inventory",
            inv.to_str().unwrap(),
            "--tarball",
        ]
        .into_iter()
        .chain([tarball.to_str().unwrap()])
        .collect::<Vec<_>>(),
        Duration::from_secs(60),
    );
    assert!(ok, "dry run: {err}");
    assert!(
        out.contains("deploy: a: current none, relay stopped"),
        "{out}"
    );
    assert_eq!(
        snapshot(&lab.dir.join("root-a")),
        before,
        "dry run: host a changed"
    );
    // Line numbers point at the problem.
    std::fs::write(&inv, &cases[0].1).unwrap();
    let (_, _, err) = deploy(&inv, &tarball);
    let line = cases[0]
        .1
        .lines()
        .position(|l| l.starts_with("colour"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("bad.toml: line {line}: unknown field")),
        "{err}"
    );
}

/// The shipped units pass `systemd-analyze verify` (where systemd's tools exist) against a
/// scratch root holding the release layout, and the shipped relay.toml is a valid relay
/// configuration.
#[test]
fn shipped_units_and_configuration_are_valid() {
    let relay_toml = std::fs::read_to_string(workspace().join("dist/relay.toml")).unwrap();
    let cfg = relay::config::Config::parse(&relay_toml).expect("dist/relay.toml parses");
    assert_eq!(cfg.chat.port, Some(41000));
    let have = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have || !Path::new("/lib/systemd/system").is_dir() {
        eprintln!(
            "systemd-analyze not installed: the units are checked by xtask's unit tests only"
        );
        return;
    }
    let root = std::env::temp_dir().join(format!("xtask-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "opt/relay/current/bin",
        "etc/systemd/system",
        "usr/lib/systemd",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let sh = format!(
        "set -e; cd {r}; cp -r /lib/systemd/system usr/lib/systemd/; \
         for b in relay ctl; do printf '#!/bin/sh\\n' > opt/relay/current/bin/$b; chmod +x opt/relay/current/bin/$b; done; \
         cp {w}/dist/relay.service {w}/dist/ctl.service etc/systemd/system/",
        r = root.display(),
        w = workspace().display()
    );
    assert!(run_bounded(
        Command::new("sh").args(["-c", &sh]),
        Duration::from_secs(30)
    )
    .status
    .success());
    let out = run_bounded(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.display()))
            .args(["relay.service", "ctl.service"]),
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_dir_all(&root);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && msg.trim().is_empty(),
        "systemd-analyze verify: {msg}"
    );
}

/// ctl deployed on a host of the inventory: started before its relay on the first deploy,
/// restarted first on the next one, and its meetings survive (journal under the host root).
#[test]
fn ctl_on_a_host_is_deployed_and_rolled_first() {
    require_openssh();
    let mut lab = Lab::new("ctl");
    lab.keys();
    let p = base_port() + 20;
    let root = lab.sshd("c", p);
    let t1 = dist(&lab, "c1");
    let ctl: SocketAddr = ([127, 0, 0, 1], p + 5).into();
    let inv = inventory(&lab, ctl, &[("c", p, p + 1)], "");
    let text = std::fs::read_to_string(&inv)
        .unwrap()
        .replace("relay_id = 1\n", "relay_id = 1\nctl = true\n");
    std::fs::write(&inv, text).unwrap();

    let (ok, out, err) = deploy(&inv, &t1);
    assert!(ok, "first deploy: {err}");
    assert!(out.contains("ctl is not answering"), "{out}");
    assert!(root.join("etc/relay/ctl.env").is_file());
    assert!(
        root.join("var/lib/relay-ctl/ctl.key").is_file(),
        "ctl's state under the root"
    );
    let (status, m) = http(ctl, "POST", "/v1/meetings", None);
    assert_eq!(status, 201, "{m}");
    let ctl_pid = std::fs::read_to_string(root.join("run/relay/ctl.pid")).unwrap();

    let t2 = repack(&lab, &t1, "c2", "true");
    let (ok, out, err) = deploy(&inv, &t2);
    assert!(ok, "second deploy: {err}");
    assert!(out.contains("c2 is live on every host"), "{out}");
    assert_ne!(
        std::fs::read_to_string(root.join("run/relay/ctl.pid")).unwrap(),
        ctl_pid,
        "ctl restarted"
    );
    let (status, j) = http(
        ctl,
        "POST",
        "/v1/join",
        Some(&serde_json::json!({"code": m["code"], "name": "after"})),
    );
    assert_eq!(status, 200, "the meeting survived ctl's restart: {j}");
    assert_eq!(j["relay_id"], 1);
}
