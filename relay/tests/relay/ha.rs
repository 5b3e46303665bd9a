//! ctl on Redis: two ctl processes over one Debian `redis-server` serve one cluster, as real
//! processes on loopback. Either answers every route; each is killed under a stream of creates
//! and joins through both, the acting one is paused, Redis is stopped, and no meeting notices.

use super::ctl_e2e::{ctl_binary, http, metric_at, wait_until, Proc};
use super::{rtp, seqs, Client};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A `redis-server` of the test's own, persisting every write (as ctl asks of its Redis).
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start(dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; .ci/run installs it)");
        wait_until("Redis answering", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Started again on the same port and data.
    fn restart(&mut self) {
        self.stop();
        *self = Self::start(&self.dir.clone(), self.port);
    }

    /// `GET key` with a hand-written RESP request.
    fn get(&self, key: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let (head, rest) = text.split_once("\r\n")?;
        (head != "$-1").then(|| rest.trim_end().to_string())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_ctl(dir: &Path, config: &Path, listen: &str) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(ctl_binary());
    cmd.args(["serve", "--listen", listen])
        .args(["--config", config.to_str().unwrap()])
        .args(["--data-dir", dir.to_str().unwrap()]);
    let p = Proc::start(cmd);
    let addr = p.field("listen").parse().unwrap();
    (p, addr)
}

/// A participant of meeting `code`, joined through `ctl` and bound at its relay; `None` while
/// ctl or the relay refuses (503: no ctl acting yet, or the relay's lease not yet renewed).
fn try_join(ctl: SocketAddr, code: &str, name: &str) -> Option<Client> {
    let (status, j) = http(
        ctl,
        "POST",
        "/v1/join",
        Some(&json!({"code": code, "name": name})),
        None,
    );
    if status != 200 {
        assert_eq!(status, 503, "join through {ctl}: {j}");
        return None;
    }
    let addr: SocketAddr = format!("{}:{}", j["relay_host"].as_str().unwrap(), j["udp_port"])
        .parse()
        .unwrap();
    let c = Client::new(addr, j["token"].as_str().unwrap().to_string());
    match c.bind() {
        (proto::stun::Class::Success, _, _) => Some(c),
        (_, Some(503), _) => None,
        (_, code, _) => panic!("{name}: bind refused with {code:?}"),
    }
}

/// How long until a new participant joins through `ctl` and binds (within 15 s).
fn joined_within(ctl: SocketAddr, code: &str, name: &str) -> (Duration, Client) {
    let from = Instant::now();
    loop {
        if let Some(c) = try_join(ctl, code, name) {
            return (from.elapsed(), c);
        }
        assert!(from.elapsed() < Duration::from_secs(15), "{name}: no join");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request; `None` when ctl cannot be reached or does not answer.
fn try_http(ctl: SocketAddr, method: &str, path: &str, body: &Value) -> Option<(u16, Value)> {
    let mut s = TcpStream::connect_timeout(&ctl, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let body = body.to_string();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ctl\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let json = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, serde_json::from_str(json).unwrap_or(Value::Null)))
}

/// What a client behind a load balancer did: meetings made (code, and where the join put its
/// participant), and requests sent again to the other process after one failed.
#[derive(Default)]
struct Streamed {
    made: Vec<(String, String)>,
    retried: u32,
}

/// One request through process `i % 2`, moving to the other after a failure or a 503, until
/// one answers (within 10 s).
fn call(
    addrs: [SocketAddr; 2],
    i: &mut usize,
    retried: &mut u32,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let from = Instant::now();
    loop {
        match try_http(addrs[*i % 2], "POST", path, body) {
            Some((status, v)) if status != 503 => return (status, v),
            _ => {
                *retried += 1;
                *i += 1;
            }
        }
        assert!(
            from.elapsed() < Duration::from_secs(10),
            "no ctl answered {path} in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes meetings and joins each through the process the create did not use, until `stop`.
fn stream_creates_and_joins(addrs: [SocketAddr; 2], stop: &AtomicBool) -> Streamed {
    let mut out = Streamed::default();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let body = json!({"title": "stream"});
        let (status, m) = call(addrs, &mut i, &mut out.retried, "/v1/meetings", &body);
        assert_eq!(status, 201, "{m}");
        i += 1;
        let body = json!({"code": m["code"], "name": "s"});
        let (status, j) = call(addrs, &mut i, &mut out.retried, "/v1/join", &body);
        assert_eq!(status, 200, "{j}");
        let at = format!("{}:{}", j["relay_host"], j["udp_port"]);
        out.made.push((m["code"].as_str().unwrap().to_string(), at));
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

/// A meeting created through `ctl`, retried while it answers 503 (within 5 s).
fn created_within(ctl: SocketAddr, title: &str) -> Value {
    let from = Instant::now();
    loop {
        let (status, m) = http(
            ctl,
            "POST",
            "/v1/meetings",
            Some(&json!({"title": title})),
            None,
        );
        match status {
            201 => return m,
            503 => assert!(from.elapsed() < Duration::from_secs(5), "{m}"),
            other => panic!("{other}: {m}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Which of the two ctl processes acts now, by the lease in Redis (`ID:TERM {...}`).
fn acting(redis: &Redis, ctls: &[&Proc]) -> usize {
    let lease = redis.get("ctl:lease").expect("a lease");
    let id = lease.split(':').next().unwrap();
    ctls.iter()
        .position(|p| p.field("node") == id)
        .expect("the lease names one of the two")
}

#[test]
fn two_ctls_on_redis_serve_one_cluster_and_no_takeover_ends_a_meeting() {
    let dir = std::env::temp_dir().join(format!("relay-ctl-ha-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis = Redis::start(&dir.join("redis"), free_port());
    let config = dir.join("ctl.toml");
    std::fs::write(
        &config,
        format!("redis_url = \"{}\"\nredis_lease_ms = 1500\n", redis.url()),
    )
    .unwrap();
    let (a_proc, a) = start_ctl(&dir.join("a"), &config, "127.0.0.1:0");
    let (b_proc, b) = start_ctl(&dir.join("b"), &config, "127.0.0.1:0");
    let mut procs = [Some(a_proc), Some(b_proc)];
    let addrs = [a, b];
    // One relay that knows both (any of them serves it).
    // Ports 32,760-32,999: below the ephemeral range, apart from the other tests' blocks.
    let base = 32_760 + (std::process::id() % 60) as u16 * 4;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.args(["--io", "batch", "--shards", "1", "--no-pin"])
        .args(["--metrics", "127.0.0.1:0", "--relay-id", "1"])
        .args(["--base-port", &base.to_string()])
        .args(["--ctl", &format!("http://{a},http://{b}")])
        .env_remove("RELAY_CTL_TOKEN");
    let _relay = Proc::start(cmd);
    for ctl in addrs {
        wait_until(
            "the relay, seen through either ctl",
            Duration::from_secs(10),
            || http(ctl, "GET", "/health", None, None).1["relays_alive"] == 1,
        );
    }
    let both: Vec<&Proc> = procs.iter().flatten().collect();
    let first = acting(&redis, &both);
    let (leader, follower) = (addrs[first], addrs[1 - first]);

    // Either answers every route: a meeting created through the one that does not act is
    // joined through the one that does, with one key (tokens from either verify at the relay).
    let (status, m) = http(
        follower,
        "POST",
        "/v1/meetings",
        Some(&json!({"title": "ha"})),
        None,
    );
    assert_eq!(status, 201, "{m}");
    let code = m["code"].as_str().unwrap().to_string();
    let (_, guest) = joined_within(leader, &code, "guest");
    let (_, publisher) = joined_within(follower, &code, "publisher");
    let (s1, k1) = http(a, "GET", "/v1/public-key", None, None);
    let (s2, k2) = http(b, "GET", "/v1/public-key", None, None);
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(k1, k2, "one key for the cluster");
    let mut seq = 0u16;
    let mut send = |n: u16| {
        for _ in 0..n {
            publisher.send(&rtp(0xAB, seq, 200));
            seq += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // A client making meetings and joining them through both, in turn, as behind a load
    // balancer, and sending a failed request again to the other one; until after step 1.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let stop = stop.clone();
        std::thread::spawn(move || stream_creates_and_joins(addrs, &stop))
    };
    // 0. The process that does not act killed under the stream, and restarted at its address.
    std::thread::sleep(Duration::from_millis(500));
    procs[1 - first].take().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(1));
    let (again, _) = start_ctl(&dir.join("b-again"), &config, &follower.to_string());
    procs[1 - first] = Some(again);
    std::thread::sleep(Duration::from_secs(1));

    // 1. The acting ctl killed: the other takes over within the lease, from the state in
    // Redis; media never stops, no relay is declared dead, and new participants join.
    procs[first].take().unwrap().kill9();
    let killed = Instant::now();
    send(100);
    let (_, third) = joined_within(follower, &code, "after the kill");
    let took = killed.elapsed();
    eprintln!("acting ctl killed: a new participant joined {took:?} after (media sent meanwhile)");
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert_eq!(
        seqs(&guest.drain(Duration::from_millis(300))).len(),
        100,
        "every packet forwarded across the takeover"
    );
    assert_eq!(metric_at(follower, "ctl_relay_deaths_total"), Some(0));
    let survivor = 1 - first;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let streamed = stream.join().unwrap();
    eprintln!(
        "stream through both: {} meetings made and joined, {} requests sent again to the other",
        streamed.made.len(),
        streamed.retried
    );
    assert!(streamed.retried > 0, "the stream met the kills");
    // Meetings, placements and the key survived both kills: every meeting the stream made is
    // joined at the place it was, with a token the relay takes.
    let (_, key_after) = http(follower, "GET", "/v1/public-key", None, None);
    assert_eq!(key_after, k1, "the key survives");
    for (code, at) in &streamed.made {
        let (status, j) = http(
            follower,
            "POST",
            "/v1/join",
            Some(&json!({"code": code, "name": "check"})),
            None,
        );
        assert_eq!(status, 200, "{code}: {j}");
        assert_eq!(&format!("{}:{}", j["relay_host"], j["udp_port"]), at);
    }

    // 2. Restarted (at its address, which the relay knows), it follows and passes requests on.
    let (again, c) = start_ctl(&dir.join("again"), &config, &addrs[first].to_string());
    procs[first] = Some(again);
    let (_, fourth) = joined_within(c, &code, "through the restarted one");
    let both: Vec<&Proc> = procs.iter().flatten().collect();
    assert_eq!(acting(&redis, &both), survivor, "the survivor still acts");

    // 3. The acting process paused past its lease: the other takes over, and the paused one,
    // resumed, writes nothing (its lease's term is fenced) and follows.
    let pid = procs[survivor].as_ref().unwrap().pid();
    // SAFETY: signals to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let (took, fifth) = joined_within(c, &code, "while the acting one is paused");
    eprintln!("acting ctl paused: a new participant joined {took:?} after");
    let both: Vec<&Proc> = procs.iter().flatten().collect();
    assert_eq!(acting(&redis, &both), first, "the restarted one acts");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let resumed = addrs[survivor];
    // Its first answers may be 503 (it finds its lease lapsed before it learns who acts).
    let m2 = created_within(resumed, "after the pause");
    let code2 = m2["code"].as_str().unwrap().to_string();
    let (status, j) = http(
        c,
        "POST",
        "/v1/join",
        Some(&json!({"code": code2, "name": "x"})),
        None,
    );
    assert_eq!(
        status, 200,
        "the meeting is in the acting process's state: {j}"
    );

    // 4. Redis down: changes are refused with 503 (never a wrong answer), media goes on; Redis
    // back on its data: every meeting is still there.
    redis.stop();
    let down = Instant::now();
    let refused = loop {
        let (status, e) = http(
            c,
            "POST",
            "/v1/meetings",
            Some(&json!({"title": "no redis"})),
            None,
        );
        if status == 503 {
            break e;
        }
        assert!(
            down.elapsed() < Duration::from_secs(5),
            "still {status}: {e}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let code_of = |v: &Value| v["code"].as_str().unwrap_or_default().to_string();
    assert!(
        ["no_leader", "storage"].contains(&code_of(&refused).as_str()),
        "{refused}"
    );
    eprintln!(
        "Redis stopped: 503 {} after {:?}",
        code_of(&refused),
        down.elapsed()
    );
    for c in [&guest, &publisher, &third, &fourth, &fifth] {
        assert_eq!(c.bind().0, proto::stun::Class::Success, "a refresh");
    }
    send(50);
    assert_eq!(seqs(&guest.drain(Duration::from_millis(300))).len(), 50);
    for c in [&third, &fourth, &fifth] {
        assert_eq!(seqs(&c.drain(Duration::from_millis(100))).len(), 50);
    }
    redis.restart();
    let (took, _) = joined_within(c, &code, "after Redis came back");
    eprintln!("Redis restarted: a new participant joined {took:?} after");
    let (_, _) = joined_within(resumed, &code2, "into the meeting made after the pause");
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
