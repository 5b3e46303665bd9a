//! The real `ctl` binary on loopback, driven over HTTP, with fake relays (heartbeat and
//! command-poll threads written here against the relay <-> ctl contract).
//!
//! Waits are bounded polls against deadlines, never bare sleeps standing in for an event.

use ctl::client::{self, Response};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running ctl process; killed on drop.
struct Ctl {
    child: Child,
    url: String,
    /// The internal listener's URL, when ctl was started with one.
    internal: Option<String>,
}

impl Ctl {
    fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// Starts ctl with `config` (TOML text) as its configuration file.
    fn start_configured(dir: &Path, config: &str) -> Self {
        let path = dir.join("ctl.toml");
        std::fs::write(&path, config).unwrap();
        Self::start_with(dir, &["--config", path.to_str().unwrap()])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> Self {
        Self::start_env(dir, extra, &[])
    }

    fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ctl"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ctl");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read ready line");
        let rest = line
            .trim()
            .strip_prefix("ready listen=")
            .unwrap_or_else(|| panic!("first line is `ready listen=ADDR`, got {line:?}"));
        let (addr, internal) = match rest.split_once(" internal=") {
            Some((a, i)) => (a, Some(format!("http://{i}"))),
            None => (rest, None),
        };
        Self {
            child,
            url: format!("http://{addr}"),
            internal,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>, auth: Option<&str>) -> Response {
        self.call_bytes(method, path, body.map(str::as_bytes), auth)
    }

    fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        auth: Option<&str>,
    ) -> Response {
        let bearer = auth.map(|a| format!("Bearer {a}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        client::request(
            &self.url,
            method,
            path,
            &headers,
            body,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e} (ctl died?)"))
    }

    fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        auth: Option<&str>,
    ) -> (u16, Value) {
        let r = self.call(method, path, body, auth);
        let v = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {}", r.text()));
        (r.status, v)
    }

    fn create(&self) -> Value {
        let (s, v) = self.json("POST", "/v1/meetings", Some(r#"{"title":"t"}"#), None);
        assert_eq!(s, 201, "{v}");
        v
    }

    fn join(&self, code: &str) -> (u16, Value) {
        self.json(
            "POST",
            "/v1/join",
            Some(&json!({"code": code}).to_string()),
            None,
        )
    }

    /// Kills the process at once (SIGKILL): durability must not depend on a clean exit.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ctl-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fake relay: heartbeats every 200 ms and long-polls its commands, until dropped or
/// stopped. Commands arrive on `commands` with the instant they were received.
struct FakeRelay {
    id: u32,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    commands: Receiver<(Instant, Value)>,
}

fn heartbeat_body(id: u32, state: &str) -> String {
    json!({"relay_id": id, "host": "127.0.0.1", "udp_base_port": 40000 + 10 * id, "shards": 2,
           "nic_gbps": 25.0, "labels": {"region": "local"}, "state": state,
           "load": [{"shard": 0, "rooms": 0, "participants": 0, "rx_pps": 0.0, "tx_pps": 0.0,
                     "rx_bps": 0.0, "tx_bps": 0.0}]})
    .to_string()
}

impl FakeRelay {
    fn start(url: &str, id: u32) -> Self {
        Self::start_as(url, id, None)
    }

    /// A relay presenting `credential` (its own, from `ctl credential relay ID`).
    fn start_as(url: &str, id: u32, credential: Option<String>) -> Self {
        let auth = credential.map(|c| format!("Bearer {c}"));
        let call = move |url: &str, method: &str, path: &str, body: Option<&str>| {
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("Authorization", a.as_str())).collect();
            let body = body.map(str::as_bytes);
            client::request(url, method, path, &headers, body, Duration::from_secs(10))
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, commands) = mpsc::channel();
        // Registered before returning, so that placement can use it at once.
        let r = call(
            url,
            "POST",
            "/v1/relays/heartbeat",
            Some(&heartbeat_body(id, "serving")),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let (u1, s1, c1) = (url.to_string(), stop.clone(), call.clone());
        let beat = std::thread::spawn(move || {
            while !s1.load(Ordering::Relaxed) {
                let _ = c1(
                    &u1,
                    "POST",
                    "/v1/relays/heartbeat",
                    Some(&heartbeat_body(id, "serving")),
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let (u2, s2) = (url.to_string(), stop.clone());
        let poll = std::thread::spawn(move || {
            let path = format!("/v1/relays/{id}/commands?wait_ms=300");
            while !s2.load(Ordering::Relaxed) {
                let Ok(r) = call(&u2, "GET", &path, None) else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                for c in v["commands"].as_array().into_iter().flatten() {
                    let _ = tx.send((Instant::now(), c.clone()));
                }
            }
        });
        Self {
            id,
            stop,
            threads: vec![beat, poll],
            commands,
        }
    }

    /// Stops heartbeating and polling, as a relay that died.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// The next command, waiting at most `within`.
    fn next_command(&self, within: Duration) -> Option<(Instant, Value)> {
        self.commands.recv_timeout(within).ok()
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates meetings until one lands on `relay` (bounded).
fn meeting_on(ctl: &Ctl, relay: u32) -> Value {
    for _ in 0..200 {
        let m = ctl.create();
        if m["join"]["relay_id"] == relay {
            return m;
        }
    }
    panic!("200 meetings and none on relay {relay}");
}

#[test]
fn meeting_lifecycle_create_join_leave_remove_end() {
    let dir = temp_dir("lifecycle");
    let ctl = Ctl::start(&dir);
    let relay = FakeRelay::start(&ctl.url, 7);
    let m = ctl.create();
    let code = m["code"].as_str().unwrap();
    let id = m["meeting_id"].as_u64().unwrap();
    assert!(m["join_link"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/j/{code}")));
    assert_eq!(m["join"]["relay_id"], 7);
    assert_eq!(m["join"]["is_host"], true);
    let secret = m["host_secret"].as_str().unwrap();

    let (s, a) = ctl.join(code);
    assert_eq!(s, 200, "{a}");
    assert_eq!(
        (a["relay_id"].as_u64(), a["relay_host"].as_str()),
        (Some(7), Some("127.0.0.1"))
    );
    let shard = a["shard_idx"].as_u64().unwrap();
    assert_eq!(a["udp_port"].as_u64(), Some(40_070 + shard));
    assert_eq!(a["token"].as_str().unwrap().len(), 134);
    assert_eq!(a["chat"]["port"], Value::Null);
    let (_, b) = ctl.join(&code.to_uppercase().replace('-', ""));
    assert_eq!(
        b["participant_id"], 3,
        "codes work without dashes, in any case"
    );

    // A leaves with its own token; the relay hears of it.
    let a_token = a["token"].as_str().unwrap();
    let (s, v) = ctl.json(
        "POST",
        &format!("/v1/meetings/{id}/leave"),
        None,
        Some(a_token),
    );
    assert_eq!((s, v["status"].as_str()), (200, Some("left")));
    let (_, cmd) = relay
        .next_command(Duration::from_secs(2))
        .expect("remove for the leaver");
    assert_eq!(
        cmd,
        json!({"type": "remove_participant", "room": id, "participant": 2})
    );

    // The host removes B: the command reaches the relay's long poll within 1 s.
    let sent = Instant::now();
    let (s, v) = ctl.json(
        "DELETE",
        &format!("/v1/meetings/{id}/participants/3"),
        None,
        Some(secret),
    );
    assert_eq!((s, v["status"].as_str()), (200, Some("removed")), "{v}");
    let (at, cmd) = relay
        .next_command(Duration::from_secs(1))
        .expect("remove within 1 s");
    assert_eq!(
        cmd,
        json!({"type": "remove_participant", "room": id, "participant": 3})
    );
    eprintln!("remove_participant reached the relay after {:?}", at - sent);
    assert!(at - sent < Duration::from_secs(1));

    // The host ends it with its token; close_room goes out; the code stops working.
    let host_token = m["join"]["token"].as_str().unwrap();
    let (s, v) = ctl.json(
        "DELETE",
        &format!("/v1/meetings/{id}"),
        None,
        Some(host_token),
    );
    assert_eq!((s, v["status"].as_str()), (200, Some("ended")));
    let (_, cmd) = relay
        .next_command(Duration::from_secs(1))
        .expect("close_room");
    assert_eq!(
        (&cmd["type"], &cmd["room"]),
        (&json!("close_room"), &json!(id))
    );
    // The fence refuses every token issued so far: they expire within the hour from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fence = cmd["fence"].as_u64().expect("close_room names a fence");
    assert!((now + 3599..=now + 3601).contains(&fence), "{cmd}");
    let (s, v) = ctl.join(code);
    assert_eq!((s, v["code"].as_str()), (404, Some("unknown_meeting")));
}

#[test]
fn a_silent_relay_is_dead_within_3s_and_joins_go_elsewhere() {
    let dir = temp_dir("death");
    let ctl = Ctl::start(&dir);
    let mut r1 = FakeRelay::start(&ctl.url, 1);
    let _r2 = FakeRelay::start(&ctl.url, 2);
    let m = meeting_on(&ctl, 1);
    let code = m["code"].as_str().unwrap();
    r1.stop();
    let silent_since = Instant::now();
    let deadline = silent_since + Duration::from_millis(3_600);
    let moved_at = loop {
        let (s, j) = ctl.join(code);
        assert_eq!(s, 200, "{j}");
        if j["relay_id"] == 2 {
            break Instant::now();
        }
        assert_eq!(j["relay_id"], r1.id, "either still on 1 or moved to 2");
        assert!(
            Instant::now() < deadline,
            "still on the silent relay after 3.6 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "room moved {:?} after the last heartbeat",
        moved_at - silent_since
    );
    assert!(
        moved_at - silent_since >= Duration::from_millis(2_500),
        "not declared dead early"
    );
    let (_, relays) = ctl.json("GET", "/v1/relays", None, None);
    let states: Vec<(u64, String)> = relays["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["relay_id"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states, vec![(1, "dead".into()), (2, "serving".into())]);
    for _ in 0..10 {
        assert_eq!(
            ctl.create()["join"]["relay_id"],
            2,
            "nothing new on a dead relay"
        );
    }
}

fn cli(ctl: &Ctl, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ctl"))
        .args(args)
        .args(["--ctl", &ctl.url])
        .output()
        .expect("run ctl");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn draining_through_the_cli_stops_new_placements_and_keeps_rooms() {
    let dir = temp_dir("drain");
    let ctl = Ctl::start(&dir);
    let r1 = FakeRelay::start(&ctl.url, 1);
    let _r2 = FakeRelay::start(&ctl.url, 2);
    let kept = meeting_on(&ctl, 1);
    cli(&ctl, &["drain", "1"]);
    let (_, cmd) = r1
        .next_command(Duration::from_secs(1))
        .expect("drain command");
    assert_eq!(cmd, json!({"type": "drain"}));
    for _ in 0..20 {
        assert_eq!(ctl.create()["join"]["relay_id"], 2);
    }
    let (_, j) = ctl.join(kept["code"].as_str().unwrap());
    assert_eq!(j["relay_id"], 1, "a draining relay keeps its rooms");
    let relays = cli(&ctl, &["relays"]);
    assert!(relays.lines().any(|l| l.contains("draining")), "{relays}");
    let rooms = cli(&ctl, &["rooms"]);
    let kept_id = kept["meeting_id"].to_string();
    assert!(rooms.lines().count() > 21, "{rooms}");
    assert!(
        rooms.lines().any(|l| l.trim_start().starts_with(&kept_id)),
        "{rooms}"
    );
    let home = cli(&ctl, &["home", "42"]);
    assert!(home.starts_with("user 42 -> relay 2"), "{home}");
    cli(&ctl, &["undrain", "1"]);
    let (_, cmd) = r1
        .next_command(Duration::from_secs(1))
        .expect("undrain command");
    assert_eq!(cmd, json!({"type": "undrain"}));
}

#[test]
fn restart_keeps_meetings_placements_and_keys() {
    let dir = temp_dir("restart");
    let ctl = Ctl::start(&dir);
    let _r1 = FakeRelay::start(&ctl.url, 1);
    let _r2 = FakeRelay::start(&ctl.url, 2);
    let m = ctl.create();
    let (_, pk1) = ctl.json("GET", "/v1/public-key", None, None);
    let (_, home1) = ctl.json("GET", "/v1/users/42/home", None, None);
    ctl.kill();

    let ctl = Ctl::start(&dir);
    // The fake relays keep heartbeating to the old address; point new ones at the new ctl.
    let _r1 = FakeRelay::start(&ctl.url, 1);
    let _r2 = FakeRelay::start(&ctl.url, 2);
    let (_, pk2) = ctl.json("GET", "/v1/public-key", None, None);
    assert_eq!(pk1, pk2, "same key pair");
    let (s, j) = ctl.join(m["code"].as_str().unwrap());
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["relay_id"], m["join"]["relay_id"], "same placement");
    assert_eq!(j["shard_idx"], m["join"]["shard_idx"]);
    let (_, home2) = ctl.json("GET", "/v1/users/42/home", None, None);
    assert_eq!(
        (home1["relay_id"].clone(), home1["shard_idx"].clone()),
        (home2["relay_id"].clone(), home2["shard_idx"].clone())
    );
    let id = m["meeting_id"].as_u64().unwrap();
    let secret = m["host_secret"].as_str().unwrap();
    let (s, _) = ctl.json("DELETE", &format!("/v1/meetings/{id}"), None, Some(secret));
    assert_eq!(s, 200, "the host secret survives the restart");
}

#[test]
fn a_restarted_ctl_relearns_membership_within_3s() {
    let dir = temp_dir("relearn");
    let ctl = Ctl::start(&dir);
    drop(FakeRelay::start(&ctl.url, 1));
    let m = ctl.create();
    ctl.kill();
    let ctl = Ctl::start(&dir);
    let started = Instant::now();
    let (_, h) = ctl.json("GET", "/health", None, None);
    assert_eq!(h["relearning"], true);
    // Relay 1 comes back 500 ms later: the join waits for it rather than failing or moving.
    let url = ctl.url.clone();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        FakeRelay::start(&url, 1)
    });
    let (s, j) = ctl.join(m["code"].as_str().unwrap());
    assert_eq!((s, j["relay_id"].as_u64()), (200, Some(1)), "{j}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let _r1 = late.join().unwrap();
}

/// (method, path, body, bearer credential)
type Req<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);

fn post<'a>(path: &'a str, body: &'a str) -> Req<'a> {
    ("POST", path, Some(body), None)
}

fn get(path: &str) -> Req<'_> {
    ("GET", path, None, None)
}

fn del<'a>(path: &'a str, auth: Option<&'a str>) -> Req<'a> {
    ("DELETE", path, None, auth)
}

/// Sends one bad request and checks the status, the error code and the JSON error body.
fn refused(ctl: &Ctl, req: Req, status: u16, code: &str) {
    let (method, path, body, auth) = req;
    let r = ctl.call(method, path, body, auth);
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("{method} {path}: body not JSON: {}", r.text()));
    assert_eq!(
        (r.status, v["code"].as_str()),
        (status, Some(code)),
        "{method} {path}: {v}"
    );
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{method} {path}: {v}"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn malformed_oversized_and_unknown_input_gets_a_clear_4xx() {
    let dir = temp_dir("bad-input");
    let ctl = Ctl::start(&dir);
    let _relay = FakeRelay::start(&ctl.url, 7);
    let big = format!(r#"{{"code": "{}"}}"#, "a".repeat(20_000));
    let join = "/v1/join";
    refused(&ctl, post(join, "{\"code\":"), 400, "bad_json");
    refused(&ctl, post(join, "[1,2]"), 400, "bad_json");
    refused(
        &ctl,
        post(join, r#"{"code":"x","admin":true}"#),
        400,
        "bad_json",
    );
    refused(
        &ctl,
        post(join, r#"{"code":"abc-defg-hjk"}"#),
        404,
        "unknown_meeting",
    );
    refused(&ctl, post(join, &big), 413, "body_too_large");
    refused(
        &ctl,
        post("/v1/meetings", r#"{"title":1}"#),
        400,
        "bad_json",
    );
    let beat = "/v1/relays/heartbeat";
    let (zero_id, bad_state) = (heartbeat_body(0, "serving"), heartbeat_body(3, "sleeping"));
    refused(&ctl, post(beat, &zero_id), 400, "invalid");
    refused(&ctl, post(beat, &bad_state), 400, "bad_json");
    refused(&ctl, get("/v1/relays/x/commands"), 400, "bad_request");
    refused(
        &ctl,
        get("/v1/relays/3/commands?wait=1"),
        400,
        "bad_request",
    );
    refused(&ctl, get("/v1/users/0/home"), 400, "invalid");
    refused(&ctl, get("/v1/users/-1/home"), 400, "bad_request");
    refused(&ctl, get("/v2/nothing"), 404, "not_found");
    refused(&ctl, ("PUT", join, None, None), 405, "method_not_allowed");
    refused(
        &ctl,
        ("DELETE", "/v1/meetings/abc", None, None),
        400,
        "bad_request",
    );
    refused(
        &ctl,
        ("POST", "/v1/relays/99/drain", None, None),
        404,
        "unknown_relay",
    );
}

#[test]
fn guessing_join_codes_is_rate_limited_per_address() {
    let dir = temp_dir("guess");
    let ctl = Ctl::start_configured(&dir, "join_failures_per_minute = 3");
    let _relay = FakeRelay::start(&ctl.url, 7);
    let m = ctl.create();
    for guess in ["abc-defg-hjk", "bcd-efgh-jkm", "cde-fghj-kmn"] {
        refused(
            &ctl,
            post("/v1/join", &json!({"code": guess}).to_string()),
            404,
            "unknown_meeting",
        );
    }
    let right = json!({"code": m["code"]}).to_string();
    refused(&ctl, post("/v1/join", &right), 429, "too_many_requests");
}

#[test]
fn forged_expired_foreign_and_non_host_credentials_are_refused() {
    let dir = temp_dir("bad-creds");
    let ctl = Ctl::start(&dir);
    let _relay = FakeRelay::start(&ctl.url, 7);
    let m = ctl.create();
    let id = m["meeting_id"].as_u64().unwrap();
    let secret = m["host_secret"].as_str().unwrap();
    let (_, guest) = ctl.join(m["code"].as_str().unwrap());
    let guest_token = guest["token"].as_str().unwrap();
    let other = ctl.create();
    let other_host = other["join"]["token"].as_str().unwrap();
    let forged = forged_host_token(&m["join"]["token"]);
    let expired = expired_host_token(&dir, id);
    let remove = format!("/v1/meetings/{id}/participants/2");
    refused(&ctl, del(&remove, None), 401, "unauthenticated");
    refused(&ctl, del(&remove, Some("0000")), 401, "bad_credentials");
    refused(&ctl, del(&remove, Some(&forged)), 401, "bad_token");
    refused(&ctl, del(&remove, Some(&expired)), 401, "token_expired");
    refused(&ctl, del(&remove, Some(guest_token)), 403, "not_host");
    refused(&ctl, del(&remove, Some(other_host)), 403, "wrong_meeting");
    let host = format!("/v1/meetings/{id}/participants/1");
    refused(&ctl, del(&host, Some(secret)), 400, "cannot_remove_host");
    let nobody = format!("/v1/meetings/{id}/participants/99");
    refused(&ctl, del(&nobody, Some(secret)), 404, "unknown_participant");
    refused(
        &ctl,
        del("/v1/meetings/123", Some(secret)),
        404,
        "unknown_meeting",
    );
    refused(
        &ctl,
        del(&format!("/v1/meetings/{id}"), Some(guest_token)),
        403,
        "not_host",
    );
    let leave = format!("/v1/meetings/{id}/leave");
    refused(
        &ctl,
        ("POST", &leave, None, Some(other_host)),
        403,
        "wrong_meeting",
    );
    // Nothing above changed the meeting.
    let (_, rooms) = ctl.json("GET", "/v1/rooms", None, None);
    let room = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["meeting_id"] == id)
        .cloned();
    assert_eq!(room.unwrap()["participants"], 2);
}

/// The host's token with its signature bytes flipped: well-formed, but not signed by ctl.
fn forged_host_token(host_token: &Value) -> String {
    let t = host_token.as_str().unwrap();
    let mut chars: Vec<char> = t.chars().collect();
    let i = chars.len() - 10;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

/// A host token for `meeting`, signed with ctl's own key, already expired.
fn expired_host_token(dir: &Path, meeting: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ctl"))
        .args(["token", "--key"])
        .arg(dir.join("ctl.key"))
        .args([
            "--room",
            &meeting.to_string(),
            "--participant",
            "1",
            "--perms",
            "publish,host",
        ])
        .args(["--ttl", "0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    // `--ttl 0`: expires_at is the current second, and a token is invalid at its expiry.
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// xorshift64*: small, deterministic, replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// One random mutation of a JSON text: a byte flip, a cut, an insertion of a random value or
/// field, or a value swapped for one of another type.
fn mutate(rng: &mut Rng, text: &str) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    if rng.below(4) == 0 {
        return b; // unchanged: reach the handlers' logic, not only the parser
    }
    let junk: [&str; 12] = [
        "null",
        "-1",
        "1e999",
        "\"\"",
        "[]",
        "{}",
        "18446744073709551616",
        "\"\u{0}\"",
        "\"zzz\":1,",
        "\u{7f}",
        "true",
        "\"\\ud800\"",
    ];
    match rng.below(6) {
        0 if !b.is_empty() => {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        1 => b.truncate(rng.below(b.len() + 1)),
        2 => {
            let i = rng.below(b.len() + 1);
            b.splice(i..i, rng.pick(&junk).bytes());
        }
        3 => {
            let colon: Vec<usize> = (0..b.len()).filter(|&i| b[i] == b':').collect();
            if let Some(&i) = colon.get(rng.below(colon.len().max(1))) {
                let end = (i + 1..b.len())
                    .find(|&j| b[j] == b',' || b[j] == b'}')
                    .unwrap_or(b.len());
                b.splice(i + 1..end, rng.pick(&junk).bytes());
            }
        }
        4 => b = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
        _ => {
            let n = b.len() + rng.below(5000);
            b.resize(n, b'[');
        }
    }
    b
}

/// Every route of the API (and one method it lacks), with placeholders for path segments.
const FUZZ_ROUTES: [(&str, &str); 16] = [
    ("POST", "/v1/relays/heartbeat"),
    ("GET", "/v1/relays/{r}/commands?wait_ms=0"),
    ("GET", "/v1/relays"),
    ("POST", "/v1/relays/{r}/drain"),
    ("POST", "/v1/relays/{r}/undrain"),
    ("POST", "/v1/meetings"),
    ("POST", "/v1/join"),
    ("POST", "/v1/meetings/{m}/leave"),
    ("DELETE", "/v1/meetings/{m}/participants/{p}"),
    ("DELETE", "/v1/meetings/{m}"),
    ("GET", "/v1/rooms"),
    ("GET", "/v1/users/{p}/home"),
    ("GET", "/v1/public-key"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("PATCH", "/v1/join"),
];

/// Valid inputs of one meeting, which the fuzzer picks from and mutates.
struct FuzzInputs {
    bodies: Vec<String>,
    ids: Vec<String>,
    auths: Vec<Option<String>>,
}

impl FuzzInputs {
    fn of(m: &Value) -> Self {
        let code = m["code"].as_str().unwrap();
        let host_token = m["join"]["token"].as_str().unwrap().to_string();
        let bodies = vec![
            heartbeat_body(999, "serving"),
            json!({"code": code, "name": "fuzz"}).to_string(),
            json!({"code": code, "rejoin_token": host_token}).to_string(),
            json!({"title": "t", "host_name": "h"}).to_string(),
        ];
        let mut ids: Vec<String> = [
            "0",
            "1",
            "999",
            "18446744073709551616",
            "-1",
            "%00",
            "x",
            "1.5",
        ]
        .map(String::from)
        .to_vec();
        ids.push(m["meeting_id"].to_string());
        let secret = m["host_secret"].as_str().unwrap().to_string();
        let auths = vec![
            None,
            Some(secret),
            Some(host_token),
            Some("x".into()),
            Some(String::new()),
        ];
        Self { bodies, ids, auths }
    }

    /// One random request: method, path, body, bearer credential.
    fn request(&self, rng: &mut Rng) -> (&'static str, String, Vec<u8>, Option<String>) {
        let (method, template) = *rng.pick(&FUZZ_ROUTES);
        // Never the live relays 1 and 2: draining them would rightly make joins 503.
        let relay = *rng.pick(&["999", "3", "x", "0", "4294967296"]);
        let path = template
            .replace("{r}", relay)
            .replace("{m}", rng.pick::<String>(&self.ids))
            .replace("{p}", rng.pick::<String>(&self.ids));
        let valid = rng.pick(&self.bodies).clone();
        let body = mutate(rng, &valid);
        (method, path, body, rng.pick(&self.auths).clone())
    }
}

#[test]
fn fuzzed_requests_to_every_route_never_get_a_5xx() {
    let dir = temp_dir("fuzz");
    // No limit on unknown join codes: mutated codes would otherwise lock the fuzzer out.
    let ctl = Ctl::start_configured(&dir, "join_failures_per_minute = 0");
    let _r1 = FakeRelay::start(&ctl.url, 1);
    let _r2 = FakeRelay::start(&ctl.url, 2);
    let inputs = FuzzInputs::of(&ctl.create());
    let seed = std::env::var("CTL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de_u64);
    eprintln!("fuzz seed {seed} (CTL_FUZZ_SEED to replay)");
    let mut rng = Rng(seed | 1);
    let n = 1_500;
    let mut by_status = std::collections::BTreeMap::new();
    for i in 0..n {
        let (method, path, body, auth) = inputs.request(&mut rng);
        let r = ctl.call(
            method,
            &path,
            Some(&String::from_utf8_lossy(&body)),
            auth.as_deref(),
        );
        let what = format!(
            "request {i}: {method} {path} {:?}",
            String::from_utf8_lossy(&body)
        );
        assert!(r.status < 500, "{what} -> {} {}", r.status, r.text());
        if r.status >= 400 {
            let v: Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|_| panic!("{what}: error body not JSON: {}", r.text()));
            assert!(
                v["code"].is_string() && v["error"].is_string(),
                "{what}: {v}"
            );
        }
        *by_status.entry(r.status).or_insert(0) += 1;
    }
    eprintln!("{n} fuzzed requests by status: {by_status:?}");
    let (s, _) = ctl.json("GET", "/health", None, None);
    assert_eq!(s, 200, "still serving");
}

/// 1,100 connections trickling request bodies into the client listener hold all of its 1,024
/// slots (a request there waits); the relay routes live on the internal listener, with slots
/// of their own: heartbeats are answered at once and no relay is declared dead.
#[test]
fn trickling_clients_cannot_delay_heartbeats_on_the_internal_listener() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = temp_dir("trickle");
    let ctl = Ctl::start_with(&dir, &["--internal-listen", "127.0.0.1:0"]);
    let internal = ctl
        .internal
        .clone()
        .expect("ready line names the internal listener");
    let hb = heartbeat_body(7, "serving");
    let r = client::json(&ctl.url, "POST", "/v1/relays/heartbeat", Some(&hb)).unwrap();
    assert_eq!(r.status, 404, "relay routes are not on the client listener");
    let r = client::json(&internal, "POST", "/v1/join", Some("{}")).unwrap();
    assert_eq!(
        r.status, 404,
        "client routes are not on the internal listener"
    );
    let _relay = FakeRelay::start(&internal, 1);

    let addr = ctl.url.strip_prefix("http://").unwrap().to_string();
    let head = "POST /v1/join HTTP/1.1\r\nHost: ctl\r\nContent-Type: application/json\r\n\
                Content-Length: 4096\r\n\r\n{";
    let mut conns: Vec<TcpStream> = (0..1_100)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("conn {i}: {e}"));
            s.write_all(head.as_bytes()).unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut next_trickle = started;
    while started.elapsed() < Duration::from_secs(8) {
        if Instant::now() >= next_trickle {
            // One byte a second on each: a body that is coming, just slowly.
            for s in &mut conns {
                let _ = s.write_all(b" ");
            }
            next_trickle += Duration::from_secs(1);
        }
        let t = Instant::now();
        let r = client::json(&internal, "POST", "/v1/relays/heartbeat", Some(&hb)).unwrap();
        latencies.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The control: the trickle really holds the client listener's slots.
    let starved = client::request(
        &ctl.url,
        "GET",
        "/health",
        &[],
        None,
        Duration::from_secs(1),
    );
    assert!(
        starved.is_err(),
        "the client listener still had a free slot"
    );
    let (s, relays) = {
        let r = client::json(&internal, "GET", "/v1/relays", None).unwrap();
        (r.status, serde_json::from_slice::<Value>(&r.body).unwrap())
    };
    assert_eq!(s, 200);
    for r in relays["relays"].as_array().unwrap() {
        assert_eq!(r["state"], "serving", "{r}");
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() - 1) * p / 100];
    eprintln!(
        "heartbeats under 1,100 trickling clients: {} answered, median {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pct(50),
        pct(99),
        latencies.last().unwrap()
    );
    assert!(latencies.len() >= 50);
    assert!(pct(99) < Duration::from_millis(100), "p99 {:?}", pct(99));
    drop(conns);
}

/// A disk that takes 1 s for every journal write (`CTL_FAULT_JOURNAL_DELAY_MS`): changes wait
/// for it, heartbeats do not. The journal is written by a thread of its own with ctl's lock
/// released, so heartbeats are answered at once and no relay is declared dead; 16 creates at
/// once share a few writes (a group commit), not 16 one after another; each is answered only
/// once durable, and all of them are there after a kill -9.
#[test]
fn a_slow_disk_delays_changes_not_heartbeats() {
    let dir = temp_dir("slow-disk");
    let ctl = Ctl::start_env(&dir, &[], &[("CTL_FAULT_JOURNAL_DELAY_MS", "1000")]);
    let _relay = FakeRelay::start(&ctl.url, 1);
    let started = Instant::now();
    let creators: Vec<_> = (0..16)
        .map(|_| {
            let url = ctl.url.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = client::json(&url, "POST", "/v1/meetings", Some("{}")).unwrap();
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                (t.elapsed(), r.status, v)
            })
        })
        .collect();
    let hb = heartbeat_body(2, "serving");
    let mut latencies = Vec::new();
    while !creators.iter().all(|c| c.is_finished()) {
        assert!(started.elapsed() < Duration::from_secs(30), "creates hang");
        let t = Instant::now();
        let r = client::json(&ctl.url, "POST", "/v1/relays/heartbeat", Some(&hb)).unwrap();
        latencies.push(t.elapsed());
        assert_eq!(r.status, 200, "{}", r.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = started.elapsed();
    let created: Vec<(Duration, u16, Value)> =
        creators.into_iter().map(|c| c.join().unwrap()).collect();
    for (took, status, v) in &created {
        assert_eq!(*status, 201, "{v}");
        // The control: the delay is in effect, and a create waits for its write.
        assert!(
            *took >= Duration::from_millis(950),
            "a create took {took:?}"
        );
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    eprintln!(
        "slow disk (1 s a write): 16 creates at once done in {all:?}; heartbeats meanwhile: {} \
         answered, median {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pct(50),
        pct(99),
        latencies.last().unwrap()
    );
    assert!(
        all < Duration::from_secs(6),
        "16 creates took {all:?}: one write each, not grouped"
    );
    assert!(latencies.len() >= 10);
    assert!(pct(99) < Duration::from_millis(100), "p99 {:?}", pct(99));
    let (_, health) = ctl.json("GET", "/health", None, None);
    assert_eq!(health["relays_alive"], 2, "no relay was declared dead");
    ctl.kill();

    let ctl = Ctl::start(&dir);
    let _relay = FakeRelay::start(&ctl.url, 1);
    for (_, _, m) in &created {
        let (s, j) = ctl.join(m["code"].as_str().unwrap());
        assert_eq!(s, 200, "a meeting answered 201 is there after kill -9: {j}");
    }
}

/// A journal on a file system that fills up (a 256 KiB tmpfs; root). The change whose write
/// fails is answered 503 `storage`; from then on every change is refused with 503 before it is
/// applied, while heartbeats are answered; once space is back the next change succeeds (ctl
/// rewrites its whole state first). After a kill -9 every change answered 201 is there, and
/// none refused after the failure (the one in flight when the write failed may be: like a
/// request that timed out, its outcome is unknown to its client).
#[test]
fn a_full_disk_gets_503_storage_and_loses_nothing_acknowledged() {
    let dir = temp_dir("full-disk");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "ctl-full-disk"])
        .arg(&dir)
        .status()
        .expect("run mount");
    assert!(status.success(), "mounting a tmpfs needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let data = dir.join("data");
    let ctl = Ctl::start(&data);
    let _relay = FakeRelay::start(&ctl.url, 1);
    let mut acknowledged = vec![ctl.create()];
    // Fill the file system.
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    let create = || ctl.json("POST", "/v1/meetings", Some("{}"), None);
    // The journal's last page may still hold a few records.
    let failed = (0..20).find_map(|_| match create() {
        (201, v) => {
            acknowledged.push(v);
            None
        }
        (s, v) => Some((s, v)),
    });
    let (s, v) = failed.expect("a full disk refuses a create within 20");
    assert_eq!((s, &v["code"]), (503, &json!("storage")), "{v}");
    for _ in 0..3 {
        let t = Instant::now();
        let (s, v) = create();
        assert_eq!((s, &v["code"]), (503, &json!("storage")), "{v}");
        assert!(t.elapsed() < Duration::from_secs(1), "refused at once");
    }
    let hb = heartbeat_body(2, "serving");
    let r = client::json(&ctl.url, "POST", "/v1/relays/heartbeat", Some(&hb)).unwrap();
    assert_eq!(r.status, 200, "heartbeats are answered on a full disk");
    std::fs::remove_file(&filler).unwrap();
    let again = (0..50)
        .find_map(|_| match create() {
            (201, v) => Some(v),
            (s, v) => {
                assert_eq!((s, &v["code"]), (503, &json!("storage")), "{v}");
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        })
        .expect("creates succeed again within 10 s of space coming back");
    acknowledged.push(again);
    let metrics = ctl.call("GET", "/metrics", None, None).text();
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ctl_journal_errors_total "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .expect("ctl_journal_errors_total in /metrics");
    assert!(errors >= 1, "journal errors are counted");
    ctl.kill();

    let ctl = Ctl::start(&data);
    let _relay = FakeRelay::start(&ctl.url, 1);
    for m in &acknowledged {
        let (s, j) = ctl.join(m["code"].as_str().unwrap());
        assert_eq!(s, 200, "a meeting answered 201 is there after kill -9: {j}");
    }
    let (_, health) = ctl.json("GET", "/health", None, None);
    let n = health["meetings"].as_u64().unwrap() as usize;
    assert!(
        (acknowledged.len()..=acknowledged.len() + 1).contains(&n),
        "{n} meetings after the restart, {} acknowledged",
        acknowledged.len()
    );
}

/// The newest code the outbox holds for `number`.
fn code_in_outbox(dir: &Path, number: &str) -> String {
    let text = std::fs::read_to_string(dir.join("sms-outbox.jsonl")).expect("an outbox");
    let line = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|v| v["to"] == number)
        .unwrap_or_else(|| panic!("no code for {number}"));
    line["body"]
        .as_str()
        .unwrap()
        .chars()
        .filter(char::is_ascii_digit)
        .collect()
}

#[test]
fn sign_in_by_phone_gives_a_device_credential_and_only_its_own_chat_token() {
    let dir = temp_dir("sign-in");
    let ctl = Ctl::start(&dir);
    let _relay = FakeRelay::start(&ctl.url, 1);
    let start = |number: &str| {
        let body = json!({ "number": number }).to_string();
        ctl.json("POST", "/v1/verification/sessions", Some(&body), None)
    };
    // Not numbers: refused, and nothing is sent.
    for bad in ["2025550143", "+1 555", "call me", "+999 1234567"] {
        let (s, v) = start(bad);
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("invalid_number")),
            "{bad}: {v}"
        );
    }
    assert!(!dir.join("sms-outbox.jsonl").exists());
    // A number, as people write it: normalised, and a code goes out.
    let (s, v) = start("+1 (202) 555-0143");
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["number"], "+12025550143");
    assert_eq!(
        (v["code_sent"].as_bool(), v["next_code_in_s"].as_u64()),
        (Some(true), Some(60))
    );
    let session = v["session_id"].as_str().unwrap().to_string();
    let code = code_in_outbox(&dir, "+12025550143");
    assert_eq!(code.len(), 6);
    // A resend before the minute is up waits; a second session does not reset the schedule.
    let path = |what: &str| format!("/v1/verification/sessions/{session}/{what}");
    let (s, v) = ctl.json("POST", &path("resend"), None, None);
    assert_eq!((s, v["code"].as_str()), (429, Some("retry_later")), "{v}");
    assert!(v["retry_after_s"]
        .as_u64()
        .is_some_and(|r| (1..=60).contains(&r)));
    let (s, v) = start("+12025550143");
    assert_eq!((s, v["code_sent"].as_bool()), (201, Some(false)), "{v}");
    // A wrong code counts down; the right one signs in, once.
    let verify = |code: &str| {
        let body = json!({ "code": code }).to_string();
        ctl.json("POST", &path("verify"), Some(&body), None)
    };
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let (s, v) = verify(wrong);
    assert_eq!(
        (s, v["code"].as_str(), v["checks_left"].as_u64()),
        (401, Some("wrong_code"), Some(4))
    );
    let (s, signed) = verify(&code);
    assert_eq!(s, 200, "{signed}");
    assert_eq!(signed["new_account"], true);
    let user = signed["user_id"].as_u64().unwrap();
    let credential = signed["device_credential"].as_str().unwrap().to_string();
    let (s, v) = verify(&code);
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("unknown_session")),
        "single use"
    );
    // The credential gets its own home and a token for that user only.
    let (s, home) = ctl.json("GET", "/v1/me/home", None, Some(&credential));
    assert_eq!(s, 200, "{home}");
    assert_eq!(home["user_id"].as_u64(), Some(user));
    let (_, pk) = ctl.json("GET", "/v1/public-key", None, None);
    let key = proto::token::public_key_from_hex(pk["public_key"].as_str().unwrap()).unwrap();
    let claims = proto::token::TokenVerifier::new(key, 0)
        .verify_text(home["token"].as_str().unwrap().as_bytes(), 0)
        .unwrap();
    assert_eq!((claims.scope_id, claims.participant_id), (user, user));
    let (s, v) = ctl.json("GET", "/v1/me/home", None, None);
    assert_eq!((s, v["code"].as_str()), (401, Some("unauthenticated")));
    let (s, v) = ctl.json("GET", "/v1/me/home", None, Some(&"0".repeat(64)));
    assert_eq!((s, v["code"].as_str()), (401, Some("bad_credentials")));
    // Durable: a kill -9 and a restart keep the account and the credential.
    ctl.kill();
    let ctl = Ctl::start(&dir);
    let _relay = FakeRelay::start(&ctl.url, 1);
    let (s, again) = ctl.json("GET", "/v1/me/home", None, Some(&credential));
    assert_eq!((s, again["user_id"].as_u64()), (200, Some(user)), "{again}");
    // Contact discovery: a second user signs in; the first finds it among its numbers.
    let body = json!({ "number": "+44 20 7946 0958" }).to_string();
    let (s, v) = ctl.json("POST", "/v1/verification/sessions", Some(&body), None);
    assert_eq!(s, 201, "{v}");
    let second = v["session_id"].as_str().unwrap().to_string();
    let code2 = code_in_outbox(&dir, "+442079460958");
    let body = json!({ "code": code2 }).to_string();
    let (s, other) = ctl.json(
        "POST",
        &format!("/v1/verification/sessions/{second}/verify"),
        Some(&body),
        None,
    );
    assert_eq!(s, 200, "{other}");
    let book = json!({"numbers": ["+44 20 7946 0958", "+1 202 555 0199", "not a number",
                                   "+442079460958"]})
    .to_string();
    let (s, found) = ctl.json(
        "POST",
        "/v1/contacts/discover",
        Some(&book),
        Some(&credential),
    );
    assert_eq!(s, 200, "{found}");
    assert_eq!(
        found["users"],
        json!([{"number": "+442079460958", "user_id": other["user_id"]}])
    );
    assert_eq!(
        (found["invalid"].as_u64(), found["budget_left"].as_u64()),
        (Some(1), Some(4_998))
    );
    let (s, _) = ctl.json("POST", "/v1/contacts/discover", Some(&book), None);
    assert_eq!(s, 401, "only for a signed-in device");
    // Walking the number space runs out of budget.
    let mut refused_at = None;
    for batch in 0..11 {
        let numbers: Vec<String> = (0..500)
            .map(|i| format!("+1202555{:04}", batch * 500 + i))
            .collect();
        let body = json!({ "numbers": numbers }).to_string();
        let (s, v) = ctl.json(
            "POST",
            "/v1/contacts/discover",
            Some(&body),
            Some(&credential),
        );
        if s == 429 {
            assert_eq!(v["code"], "retry_later");
            refused_at = Some(batch);
            break;
        }
        assert_eq!(s, 200, "{v}");
    }
    // 2 + 9 x 500 = 4,502 spent: the tenth batch does not fit in 5,000 and is refused whole.
    assert_eq!(refused_at, Some(9));
    // Deleted: the credential is refused from then on.
    let r = ctl.call("DELETE", "/v1/me", None, Some(&credential));
    assert_eq!(r.status, 204, "{}", r.text());
    let (s, _) = ctl.json("GET", "/v1/me/home", None, Some(&credential));
    assert_eq!(s, 401);
}

/// Signs `number` in through the outbox; returns the device credential.
fn signed_in(ctl: &Ctl, dir: &Path, number: &str) -> String {
    let body = json!({ "number": number }).to_string();
    let (s, v) = ctl.json("POST", "/v1/verification/sessions", Some(&body), None);
    assert_eq!(s, 201, "{v}");
    let session = v["session_id"].as_str().unwrap().to_string();
    let code = code_in_outbox(dir, v["number"].as_str().unwrap());
    let body = json!({ "code": code }).to_string();
    let path = format!("/v1/verification/sessions/{session}/verify");
    let (s, v) = ctl.json("POST", &path, Some(&body), None);
    assert_eq!(s, 200, "{v}");
    v["device_credential"].as_str().unwrap().to_string()
}

/// Issue 16 item 2 and issue 17 item 5: meetings are created by signed-in accounts, each
/// with at most `meetings_per_account` open, or by an operator with the admin credential.
/// Anonymous and forged creations are refused and store nothing; joining by code stays open
/// to guests.
#[test]
fn meetings_are_created_by_accounts_within_their_limit_and_guests_join_by_code() {
    let dir = temp_dir("create-auth");
    let ctl = Ctl::start_configured(&dir, "trust_loopback = false\nmeetings_per_account = 3\n");
    let credential = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ctl"))
            .arg("credential")
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let _relay = FakeRelay::start_as(&ctl.url, 1, Some(credential(&["relay", "1"])));
    let meetings = || ctl.json("GET", "/health", None, None).1["meetings"].clone();
    let create = |auth: Option<&str>| ctl.json("POST", "/v1/meetings", Some("{}"), auth);
    let (s, v) = create(None);
    assert_eq!(
        (s, v["code"].as_str()),
        (401, Some("unauthenticated")),
        "{v}"
    );
    let forged = "ab".repeat(32);
    let (s, v) = create(Some(&forged));
    assert_eq!(
        (s, v["code"].as_str()),
        (401, Some("bad_credentials")),
        "{v}"
    );
    assert_eq!(meetings(), 0, "nothing stored");

    let alice = signed_in(&ctl, &dir, "+12025550143");
    let bob = signed_in(&ctl, &dir, "+12025550144");
    let mut made = Vec::new();
    for _ in 0..3 {
        let (s, v) = create(Some(&alice));
        assert_eq!(s, 201, "{v}");
        made.push(v);
    }
    let (s, v) = create(Some(&alice));
    assert_eq!(
        (s, v["code"].as_str()),
        (429, Some("account_meeting_limit")),
        "{v}"
    );
    assert_eq!(meetings(), 3, "the refused one stored nothing");
    // Another account has its own limit; the operator's credential has none but max_meetings.
    assert_eq!(create(Some(&bob)).0, 201);
    assert_eq!(create(Some(&credential(&["admin"]))).0, 201);
    // A guest joins one of alice's meetings by its code, with no credential.
    let (s, j) = ctl.join(made[0]["code"].as_str().unwrap());
    assert_eq!(s, 200, "{j}");
    // Ending one makes room for another.
    let path = format!("/v1/meetings/{}", made[0]["meeting_id"]);
    let (s, v) = ctl.json("DELETE", &path, None, made[0]["host_secret"].as_str());
    assert_eq!(s, 200, "{v}");
    assert_eq!(create(Some(&alice)).0, 201);
    assert_eq!(meetings(), 5);
}
