//! The relay's side of the relay <-> ctl contract (PROTOCOL.md section "Relay and ctl"):
//! a heartbeat every second with capacity and load, and a long poll for commands, which are
//! passed to the shards over their command rings. Runs on its own control thread with a tiny
//! blocking HTTP/1.1 client (one request per connection), far from the packet path.

use crate::engine::Command;
use crate::io::ShardStats;
use crate::ring::Producer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Heartbeat period; ctl declares a relay dead after 3 s without one.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Largest response body accepted from ctl.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// What the relay tells ctl about itself.
#[derive(Clone, Debug, Serialize)]
pub struct Identity {
    /// Nonzero relay id.
    pub relay_id: u32,
    /// Host clients should send media to.
    pub host: String,
    /// UDP port of shard 0.
    pub udp_base_port: u16,
    /// Number of shards.
    pub shards: usize,
    /// NIC capacity, Gbit/s.
    pub nic_gbps: f64,
    /// Free-form labels (region, rack).
    pub labels: BTreeMap<String, String>,
    /// TCP port of shard 0's chat listener, when chat is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_port: Option<u16>,
    /// TCP port of the relay links, when the relay is one of a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_port: Option<u16>,
}

#[derive(Serialize)]
struct Heartbeat<'a> {
    #[serde(flatten)]
    identity: &'a Identity,
    state: &'static str,
    load: Vec<ShardLoad>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
struct ShardLoad {
    shard: usize,
    rooms: u64,
    participants: u64,
    rx_pps: f64,
    tx_pps: f64,
    rx_bps: f64,
    tx_bps: f64,
}

/// ctl's answer to a heartbeat.
#[derive(Clone, Debug, Deserialize)]
pub struct HeartbeatReply {
    /// ctl's Ed25519 public key, hex.
    pub public_key: String,
    /// Requested heartbeat period.
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
    /// The lease: how long from sending the heartbeat the relay may take new joins (0: not
    /// yet). Absent from an older ctl, which fences nothing.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// The cluster, for a relay with a link port once it has formed.
    #[serde(default)]
    pub cluster: Option<ClusterView>,
}

/// What a linked relay learns of its cluster from ctl (PROTOCOL.md section 8).
#[derive(Clone, Debug, Deserialize)]
pub struct ClusterView {
    /// The chat owners, fixed: owner index -> shard address (relay number * 256 + shard).
    pub owners: Vec<u16>,
    /// The other linked relays: relay number -> "host:port" of their link listener.
    pub links: BTreeMap<u32, String>,
    /// This relay's link credential.
    pub link_token: String,
}

impl ClusterView {
    /// The peers and token as the link thread keeps them (unresolvable addresses skipped).
    pub fn directory(&self) -> crate::io::link::Directory {
        crate::io::link::Directory {
            token: self.link_token.clone(),
            peers: self
                .links
                .iter()
                .filter_map(|(&id, a)| {
                    let addr = a.to_socket_addrs().ok()?.next()?;
                    Some((u8::try_from(id).ok()?, addr))
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Commands {
    commands: Vec<WireCommand>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireCommand {
    RemoveParticipant {
        room: u64,
        participant: u64,
    },
    CloseRoom {
        room: u64,
        /// Absent from an older ctl: the relay fences the tokens it has seen.
        #[serde(default)]
        fence: u64,
    },
    Drain,
    Undrain,
}

/// Resolves `http://host:port` (the only form accepted) to a socket address.
pub fn parse_url(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("ctl URL must start with http://: {url}"))?;
    let hostport = rest.trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("ctl URL {url}: {e}"))?
        .next()
        .ok_or_else(|| format!("ctl URL {url}: no address"))
}

/// Where ctl is and what the relay proves itself with.
#[derive(Clone, Debug)]
pub struct Ctl {
    /// ctl's addresses: one, or every process of a ctl on Redis (any of them serves).
    addrs: Vec<SocketAddr>,
    /// The one tried first; the next after a request to it fails.
    current: Arc<std::sync::atomic::AtomicUsize>,
    /// Sent as `Authorization: Bearer <token>` on every request when set (the relay's
    /// credential; PROTOCOL.md section 6).
    pub token: Option<crate::config::Secret>,
}

impl Ctl {
    /// ctl at `url` (`http://host:port`, or several separated by commas: the processes of
    /// a ctl on Redis), with `token` if any.
    pub fn new(url: &str, token: Option<crate::config::Secret>) -> Result<Self, String> {
        Ok(Self {
            addrs: url
                .split(',')
                .map(|u| parse_url(u.trim()))
                .collect::<Result<_, _>>()?,
            current: Arc::default(),
            token,
        })
    }

    /// The address requests go to now.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()]
    }

    /// The next address, after a request to this one failed.
    fn rotate(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }
}

/// A failed heartbeat.
#[derive(Debug)]
pub struct HeartbeatError {
    /// ctl refused the relay's credentials (HTTP 401 or 403): retrying will not help.
    pub refused: bool,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for HeartbeatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for HeartbeatError {
    fn from(message: String) -> Self {
        Self {
            refused: false,
            message,
        }
    }
}

/// What to tell an operator when ctl refuses the relay.
const REFUSED_HINT: &str = "ctl refused this relay's credentials: set ctl_token in relay.toml (or \
     RELAY_CTL_TOKEN) to what `ctl credential relay ID` prints for this relay's id";

/// One HTTP request; returns the status code and body.
fn request(
    ctl: &Ctl,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let r = request_once(ctl, method, path, body, timeout);
    if r.is_err() {
        ctl.rotate();
    }
    r
}

fn request_once(
    ctl: &Ctl,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let (addr, token) = (ctl.addr(), ctl.token.as_ref().map(|t| t.expose()));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body))
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut resp = Vec::new();
    s.take(MAX_RESPONSE_BYTES as u64 + 4096)
        .read_to_end(&mut resp)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status_line = std::str::from_utf8(&resp[..split]).map_err(|_| "malformed HTTP response")?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("malformed HTTP status line")?;
    Ok((status, resp[split + 4..].to_vec()))
}

fn heartbeat(
    ctl: &Ctl,
    identity: &Identity,
    draining: bool,
    load: Vec<ShardLoad>,
) -> Result<HeartbeatReply, HeartbeatError> {
    let body = serde_json::to_vec(&Heartbeat {
        identity,
        state: if draining { "draining" } else { "serving" },
        load,
    })
    .map_err(|e| e.to_string())?;
    let (status, body) = request(
        ctl,
        "POST",
        "/v1/relays/heartbeat",
        &body,
        Duration::from_secs(3),
    )?;
    if status != 200 {
        let refused = status == 401 || status == 403;
        let hint = if refused { REFUSED_HINT } else { "" };
        return Err(HeartbeatError {
            refused,
            message: format!(
                "heartbeat: HTTP {status}: {}{}{hint}",
                String::from_utf8_lossy(&body).trim(),
                if refused { "; " } else { "" }
            ),
        });
    }
    Ok(serde_json::from_slice(&body).map_err(|e| format!("heartbeat reply: {e}"))?)
}

/// Registers with ctl (the first heartbeat) and returns its public key, retrying until
/// `deadline`; a refusal of its credentials is an error at once.
pub fn register(
    ctl: &Ctl,
    identity: &Identity,
    deadline: Instant,
) -> Result<HeartbeatReply, crate::error::Error> {
    use crate::error::Error;
    let zero_load = (0..identity.shards)
        .map(|shard| ShardLoad {
            shard,
            ..ShardLoad::default()
        })
        .collect::<Vec<_>>();
    loop {
        match heartbeat(ctl, identity, false, zero_load.clone()) {
            Ok(reply) => return Ok(reply),
            Err(e) if e.refused => {
                return Err(Error::CtlRefused(format!("cannot register with ctl: {e}")))
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::CtlUnavailable(format!(
                    "cannot register with ctl: {e}"
                )))
            }
            Err(e) => {
                eprintln!("relay: ctl not reachable yet ({e}); retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// The control-plane loop: heartbeats and command long-polls until `stop`.
pub struct CtlLoop {
    /// ctl.
    pub ctl: Ctl,
    /// What we report.
    pub identity: Identity,
    /// Each shard's published counters.
    pub stats: Vec<Arc<ShardStats>>,
    /// Each shard's command ring.
    pub commands: Vec<Producer<Command>>,
    /// Set when the process is stopping.
    pub stop: Arc<AtomicBool>,
    /// The origin of the shards' monotonic clock.
    pub origin: Instant,
    /// The lease of the registration: (when its heartbeat was sent, at the latest; lease_ms).
    pub first_lease: Option<(Instant, u64)>,
    /// The link thread's view of the cluster, kept current from the heartbeats' answers.
    pub links: Option<Arc<std::sync::Mutex<crate::io::link::Directory>>>,
}

impl CtlLoop {
    /// Runs until `stop` is set. Errors talking to ctl are logged and retried: the relay keeps
    /// serving its rooms while ctl is away.
    pub fn run(mut self) {
        let mut draining = false;
        let mut last = Snapshot::take(&self.stats);
        let mut next_heartbeat = Instant::now();
        // The end of the lease, and whether its lapse was reported.
        let mut lease: Option<(Instant, bool)> = None;
        if let Some((sent, ms)) = self.first_lease {
            lease = self.grant(sent, ms).map(|end| (end, false));
        }
        while !self.stop.load(Ordering::Relaxed) {
            if Instant::now() >= next_heartbeat {
                let now = Snapshot::take(&self.stats);
                let load = now.rates_since(&last);
                last = now;
                let sent = Instant::now();
                let mut stale = false;
                match heartbeat(&self.ctl, &self.identity, draining, load) {
                    Ok(reply) => {
                        if let (Some(dir), Some(c)) = (&self.links, &reply.cluster) {
                            *dir.lock().unwrap_or_else(|e| e.into_inner()) = c.directory();
                        }
                        if let Some(end) = reply.lease_ms.and_then(|ms| self.grant(sent, ms)) {
                            if end <= Instant::now() {
                                // ctl held this heartbeat past its own lease (it was stopped,
                                // or slow): ask again at once rather than a second later.
                                stale = true;
                            } else if lease.is_some_and(|(_, lapsed)| lapsed) {
                                eprintln!("relay: lease from ctl renewed: taking new joins");
                            }
                            lease = Some((end, false));
                        }
                    }
                    Err(e) => eprintln!("relay: {e}"),
                }
                if let Some((end, lapsed)) = &mut lease {
                    if !*lapsed && Instant::now() >= *end {
                        *lapsed = true;
                        eprintln!(
                            "relay: lease from ctl lapsed: taking no new joins until ctl \
                             answers (ctl may move this relay's rooms)"
                        );
                    }
                }
                next_heartbeat += HEARTBEAT_INTERVAL;
                if next_heartbeat < Instant::now() {
                    next_heartbeat = Instant::now() + HEARTBEAT_INTERVAL;
                }
                if stale {
                    next_heartbeat = Instant::now();
                }
            }
            let wait = next_heartbeat
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(1000));
            match self.poll_commands(wait) {
                Ok(cmds) => {
                    for c in cmds {
                        draining = self.apply(c, draining);
                    }
                }
                Err(e) => {
                    eprintln!("relay: commands: {e}");
                    std::thread::sleep(wait.min(Duration::from_millis(200)));
                }
            }
        }
    }

    /// Hands the shards a lease of `ms` from `sent` (0: none); returns its end.
    fn grant(&mut self, sent: Instant, ms: u64) -> Option<Instant> {
        if ms == 0 {
            return None;
        }
        let lease = Duration::from_millis(ms);
        let until = sent.saturating_duration_since(self.origin) + lease;
        let until_us = u64::try_from(until.as_micros()).unwrap_or(u64::MAX);
        self.send_to_shards(Command::Lease { until_us });
        Some(sent + lease)
    }

    fn poll_commands(&self, wait: Duration) -> Result<Vec<WireCommand>, String> {
        let path = format!(
            "/v1/relays/{}/commands?wait_ms={}",
            self.identity.relay_id,
            wait.as_millis()
        );
        let (status, body) = request(&self.ctl, "GET", &path, &[], wait + Duration::from_secs(2))?;
        if status != 200 {
            let hint = if status == 401 || status == 403 {
                format!("; {REFUSED_HINT}")
            } else {
                String::new()
            };
            return Err(format!(
                "HTTP {status}: {}{hint}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        Ok(serde_json::from_slice::<Commands>(&body)
            .map_err(|e| format!("commands reply: {e}"))?
            .commands)
    }

    /// Hands a command to every shard (a room's shard is not known here, and the others ignore
    /// ids they do not host). Returns the new draining state.
    fn apply(&mut self, c: WireCommand, draining: bool) -> bool {
        let (cmd, draining) = match c {
            WireCommand::RemoveParticipant { room, participant } => {
                (Command::RemoveParticipant { room, participant }, draining)
            }
            WireCommand::CloseRoom { room, fence } => {
                (Command::CloseRoom { room, fence }, draining)
            }
            WireCommand::Drain => (Command::SetDraining(true), true),
            WireCommand::Undrain => (Command::SetDraining(false), false),
        };
        self.send_to_shards(cmd);
        draining
    }

    /// Hands `cmd` to every shard.
    fn send_to_shards(&mut self, cmd: Command) {
        for (i, ring) in self.commands.iter_mut().enumerate() {
            // The shard drains 64 commands per turn (every ~10 ms): a full ring is a burst far
            // beyond what ctl sends; retry briefly, then report.
            let mut pending = cmd;
            let mut tries = 0;
            while let Err(back) = ring.push(pending) {
                pending = back;
                tries += 1;
                if tries == 100 {
                    eprintln!("relay: shard {i} command ring full; dropped {cmd:?}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Counters at one instant, to turn into rates.
struct Snapshot {
    at: Instant,
    shards: Vec<[u64; 6]>,
}

impl Snapshot {
    fn take(stats: &[Arc<ShardStats>]) -> Self {
        let get = |s: &ShardStats, f: &str| s.get(f).unwrap_or(0);
        let shards = stats
            .iter()
            .map(|s| {
                let s = &**s;
                [
                    get(s, "rx_packets"),
                    get(s, "tx_packets"),
                    get(s, "rx_bytes"),
                    get(s, "tx_bytes"),
                    get(s, "rooms"),
                    get(s, "participants"),
                ]
            })
            .collect();
        Self {
            at: Instant::now(),
            shards,
        }
    }

    fn rates_since(&self, before: &Snapshot) -> Vec<ShardLoad> {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        self.shards
            .iter()
            .zip(&before.shards)
            .enumerate()
            .map(|(shard, (n, b))| ShardLoad {
                shard,
                rooms: n[4],
                participants: n[5],
                rx_pps: rate(n[0], b[0]),
                tx_pps: rate(n[1], b[1]),
                rx_bps: 8.0 * rate(n[2], b[2]),
                tx_bps: 8.0 * rate(n[3], b[3]),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_urls() {
        let c: Commands = serde_json::from_str(
            r#"{"commands":[{"type":"remove_participant","room":1,"participant":2},{"type":"close_room","room":3},{"type":"close_room","room":4,"fence":99},{"type":"drain"},{"type":"undrain"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.commands,
            vec![
                WireCommand::RemoveParticipant {
                    room: 1,
                    participant: 2
                },
                WireCommand::CloseRoom { room: 3, fence: 0 },
                WireCommand::CloseRoom { room: 4, fence: 99 },
                WireCommand::Drain,
                WireCommand::Undrain
            ]
        );
        assert!(serde_json::from_str::<Commands>(r#"{"commands":[{"type":"explode"}]}"#).is_err());
        assert_eq!(
            parse_url("http://127.0.0.1:7000").unwrap(),
            "127.0.0.1:7000".parse().unwrap()
        );
        assert!(parse_url("https://x:1").is_err());
    }

    #[test]
    fn heartbeat_body_matches_the_contract() {
        let identity = Identity {
            relay_id: 7,
            host: "127.0.0.1".into(),
            udp_base_port: 40000,
            shards: 1,
            nic_gbps: 25.0,
            labels: BTreeMap::from([("region".into(), "local".into())]),
            chat_port: Some(41000),
            link_port: None,
        };
        let hb = Heartbeat {
            identity: &identity,
            state: "serving",
            load: vec![ShardLoad::default()],
        };
        let v: serde_json::Value = serde_json::to_value(&hb).unwrap();
        for key in [
            "relay_id",
            "host",
            "udp_base_port",
            "shards",
            "nic_gbps",
            "labels",
            "state",
            "load",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["load"][0]["rx_pps"], 0.0);
    }
}
