//! ctl on Redis (DESIGN.md section 8): any number of ctl processes with one `redis_url` serve
//! one cluster. The state lives in Redis; one process at a time acts on it.
//!
//! - **The lease.** `ctl:lease` holds the acting process (its node id and addresses), set with
//!   `PX redis_lease_ms` and renewed every fifth of that by a script that renews only its own
//!   value. A process that reads another's value follows; one that finds none takes it.
//! - **Acting.** On taking the lease a process reads the log (`ctl:log`, one entry per journal
//!   record, the journal's own encoding) into a fresh [`Core`], exactly as a restart reads the
//!   journal file, and from then on runs the state machine: membership is re-learned from the
//!   relays' heartbeats under the restart grace (no relay is declared dead before it could
//!   have heartbeated), so a takeover ends no meeting.
//! - **Fencing.** Every write is one script that appends only while `ctl:lease` still holds
//!   the writer's own node id, so a process that lost its lease (paused, partitioned) can
//!   never write after another took over. It also stops acting by its own clock: its lease
//!   counts from before it sent the renewal and ends a fifth early, while Redis counts from
//!   when it received it, so the two never both believe they act.
//! - **Following.** A process that does not act passes every request to the acting one on
//!   the same listener (client or internal), with the client's address in a header that the
//!   acting process trusts only with the cluster's forwarding secret (derived from ctl's key,
//!   which the processes share through `ctl:key`). With no process acting, requests get 503
//!   `no_leader`.
//!
//! What a takeover loses: commands queued for relays and not yet taken (a remove or a close;
//! as after a restart of a single ctl) and the placements' load counts since the last report.
#![forbid(unsafe_code)]

use crate::config::Config;
use crate::core::{Core, Now, Record};
use crate::error::ApiError;
use crate::journal::Batch;
use crate::server::{App, Peer, Serves, Shared, Store};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Router;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The records of the state, in commit order.
const LOG: &str = "ctl:log";
/// The acting process.
const LEASE: &str = "ctl:lease";
/// ctl's signing key (hex seed), shared by every process of the cluster.
const KEY: &str = "ctl:key";
/// The client address of a request passed on by another ctl process.
const FORWARDED_FOR: &str = "x-ctl-forwarded-for";
/// The forwarding secret that makes [`FORWARDED_FOR`] trusted.
const FORWARD_AUTH: &str = "x-ctl-forward";
/// Redis connects and answers within this, or the attempt counts as failed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// Takes the lease when it is free, renews it when it is ours; answers the holder.
const LEASE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return ARGV[1]
end
if string.sub(v, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return ARGV[1]
end
return v
";

/// Appends records (after deleting the log, for a snapshot) only while the lease is ours.
const WRITE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, string.len(ARGV[1])) ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
return 1
";

/// One ctl process, as the lease names it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    /// Random per process start.
    pub id: String,
    /// Its client listener (every route when it has no internal one).
    pub listen: SocketAddr,
    /// Its internal listener, if any.
    pub internal: Option<SocketAddr>,
}

impl Node {
    /// The lease value of term `term` of this process: `ID:TERM JSON`, so that the lease
    /// script renews any term of this process (prefix `ID:`) and the write script accepts
    /// only the current one (prefix `ID:TERM `).
    fn lease_value(&self, term: u64) -> String {
        format!(
            "{}:{term} {}",
            self.id,
            serde_json::to_string(self).expect("a node serializes")
        )
    }

    fn from_lease_value(v: &str) -> Option<Self> {
        serde_json::from_str(v.split_once(' ')?.1).ok()
    }
}

enum Role {
    /// Another process acts (as of when it was last read from Redis), or none is known.
    Follower { leader: Option<(Node, Instant)> },
    /// This process acts until `until` unless it renews.
    Leader {
        app: Shared,
        routers: Vec<(Serves, Router)>,
        until: Instant,
    },
}

/// The process's part in the cluster.
pub struct Ha {
    me: Node,
    cfg: Config,
    client: redis::Client,
    lease: Duration,
    /// The key, once read from (or first written to) Redis.
    key: Mutex<Option<SigningKey>>,
    role: Mutex<Role>,
    /// How many times this process has taken the lease: a term's writer is fenced as soon as
    /// the next term's lease is set, even within one process.
    term: std::sync::atomic::AtomicU64,
    /// Bumped whenever the acting process changes: requests passed on to the old one are
    /// answered 503 at once (it may be paused, holding them), and the client retries.
    changes: tokio::sync::watch::Sender<u64>,
    rt: tokio::runtime::Handle,
    local_key: SigningKey,
}

/// Where a request goes.
enum Route {
    Local(Router),
    Remote(SocketAddr),
    Nowhere,
}

impl Ha {
    /// Starts the lease thread of this process (run from inside the runtime).
    pub fn start(cfg: Config, local_key: SigningKey, url: &str) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let client = redis::Client::open(url).context("redis_url")?;
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let advertise = |a: SocketAddr| match cfg.advertise_ip {
            Some(ip) if a.ip().is_unspecified() => SocketAddr::new(ip, a.port()),
            _ => a,
        };
        let me = Node {
            id: proto::token::hex(&id),
            listen: advertise(cfg.listen),
            internal: cfg.internal_listen.map(advertise),
        };
        let ha = Arc::new(Self {
            me,
            lease: Duration::from_millis(cfg.redis_lease_ms),
            cfg,
            client,
            key: Mutex::new(None),
            role: Mutex::new(Role::Follower { leader: None }),
            term: std::sync::atomic::AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
            rt: tokio::runtime::Handle::current(),
            local_key,
        });
        let runner = ha.clone();
        std::thread::Builder::new()
            .name("ctl-lease".into())
            .spawn(move || runner.run_lease())
            .context("cannot start the lease thread")?;
        Ok(ha)
    }

    /// This process's node id (in its `ready` line and the lease).
    pub fn node_id(&self) -> &str {
        &self.me.id
    }

    fn role(&self) -> std::sync::MutexGuard<'_, Role> {
        self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease loop: renew or follow every fifth of the lease, for the life of the process.
    fn run_lease(self: Arc<Self>) {
        let every = self.lease / 5;
        let mut con: Option<redis::Connection> = None;
        let mut failing = false;
        loop {
            let sent = Instant::now();
            match self.lease_round(&mut con, sent) {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        eprintln!("ctl: Redis reachable again");
                    }
                }
                Err(e) => {
                    con = None;
                    if !std::mem::replace(&mut failing, true) {
                        eprintln!("ctl: Redis: {e}");
                    }
                    self.lapse(Instant::now());
                }
            }
            std::thread::sleep(every.saturating_sub(sent.elapsed()));
        }
    }

    fn lease_round(
        &self,
        con: &mut Option<redis::Connection>,
        sent: Instant,
    ) -> Result<(), String> {
        if con.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(REDIS_TIMEOUT)
                .map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(REDIS_TIMEOUT))
                .and_then(|()| c.set_write_timeout(Some(REDIS_TIMEOUT)))
                .map_err(|e| e.to_string())?;
            *con = Some(c);
        }
        let c = con.as_mut().expect("connected above");
        if self.key.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            let key = shared_key(c, &self.local_key)?;
            *self.key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        }
        use std::sync::atomic::Ordering;
        let acting = matches!(*self.role(), Role::Leader { .. });
        // Renewing keeps the term; taking the lease starts the next one.
        let term = self.term.load(Ordering::SeqCst) + u64::from(!acting);
        let value = self.me.lease_value(term);
        let holder: String = redis::cmd("EVAL")
            .arg(LEASE_SCRIPT)
            .arg(1)
            .arg(LEASE)
            .arg(&value)
            .arg(format!("{}:", self.me.id))
            .arg(self.lease.as_millis() as u64)
            .query(c)
            .map_err(|e| e.to_string())?;
        // Ours from `sent`, by our clock, for four fifths of the lease.
        let until = sent + self.lease - self.lease / 5;
        if holder == value {
            if acting {
                if let Role::Leader { until: u, .. } = &mut *self.role() {
                    *u = until;
                }
            } else {
                self.term.store(term, Ordering::SeqCst);
                self.take_over(c, term, until)?;
            }
        } else {
            self.step_down("another ctl process holds the lease");
            let leader = Node::from_lease_value(&holder);
            let mut role = self.role();
            if let Role::Follower {
                leader: Some((old, _)),
            } = &*role
            {
                if Some(old) != leader.as_ref() {
                    self.changes.send_modify(|n| *n += 1);
                }
            }
            *role = Role::Follower {
                leader: leader.map(|n| (n, Instant::now())),
            };
        }
        Ok(())
    }

    /// Starts acting: the state from the log, a writer, a ticker.
    fn take_over(
        &self,
        c: &mut redis::Connection,
        term: u64,
        until: Instant,
    ) -> Result<(), String> {
        let entries: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(LOG)
            .arg(0)
            .arg(-1)
            .query(c)
            .map_err(|e| e.to_string())?;
        let n = entries.len();
        let records: Vec<Record> = crate::journal::decode_entries(entries)
            .map_err(|i| format!("{LOG} entry {i} is damaged; not taking over"))?;
        let key = self
            .key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or("no key yet")?;
        let core = Core::restore(self.cfg.clone(), key, records, Now::system());
        let app = App::new(core);
        let log = RedisLog {
            client: self.client.clone(),
            con: None,
            me: format!("{}:{term} ", self.me.id),
        };
        let writer = app.clone();
        std::thread::Builder::new()
            .name("ctl-redis-writer".into())
            .spawn(move || writer.write_journal(log))
            .map_err(|e| format!("cannot start the writer: {e}"))?;
        self.rt.spawn(crate::server::ticker(app.clone()));
        let max_body = self.cfg.max_body_bytes;
        let routers = [Serves::All, Serves::Client, Serves::Internal]
            .into_iter()
            .map(|s| (s, crate::server::router(app.clone(), max_body, s).0))
            .collect();
        eprintln!(
            "ctl: acting for the cluster (node {}, {n} records)",
            self.me.id
        );
        *self.role() = Role::Leader {
            app,
            routers,
            until,
        };
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Stops acting if this process acts.
    fn step_down(&self, why: &str) {
        let mut role = self.role();
        if let Role::Leader { app, .. } = &*role {
            eprintln!("ctl: no longer acting: {why}");
            app.retire();
            *role = Role::Follower { leader: None };
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Redis did not answer: stop acting once the lease may have passed to another, and stop
    /// passing requests to a leader not confirmed for a whole lease.
    fn lapse(&self, now: Instant) {
        let expired = match &*self.role() {
            Role::Leader { until, .. } => now >= *until,
            Role::Follower { .. } => false,
        };
        if expired {
            self.step_down("the lease could not be renewed");
        }
        if let Role::Follower { leader } = &mut *self.role() {
            if leader
                .as_ref()
                .is_some_and(|(_, seen)| now.duration_since(*seen) >= self.lease)
            {
                *leader = None;
                self.changes.send_modify(|n| *n += 1);
            }
        }
    }

    fn route(&self, serves: Serves) -> Route {
        let now = Instant::now();
        let role = self.role();
        match &*role {
            Role::Leader { until, .. } if now >= *until => {
                drop(role);
                self.step_down("the lease was not renewed in time");
                Route::Nowhere
            }
            Role::Leader { routers, .. } => routers
                .iter()
                .find(|(s, _)| *s == serves)
                .map_or(Route::Nowhere, |(_, r)| Route::Local(r.clone())),
            Role::Follower {
                leader: Some((node, _)),
            } => {
                let addr = match serves {
                    Serves::Internal => node.internal.unwrap_or(node.listen),
                    Serves::Client | Serves::All => node.listen,
                };
                Route::Remote(addr)
            }
            Role::Follower { leader: None } => Route::Nowhere,
        }
    }

    /// The secret that makes a forwarded client address trusted: derived from the shared key,
    /// so every process of the cluster has it and nobody else does.
    fn forward_secret(&self) -> Option<String> {
        use sha2::{Digest, Sha256};
        let key = self.key.lock().unwrap_or_else(|e| e.into_inner());
        let seed = key.as_ref()?.to_bytes();
        let mut h = Sha256::new();
        h.update(b"ctl forwarding secret v1");
        h.update(seed);
        Some(proto::token::hex(&h.finalize()))
    }

    /// The client address of a request passed on by another process of the cluster.
    fn forwarded_for(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let secret = self.forward_secret()?;
        let given = headers.get(FORWARD_AUTH)?.as_bytes();
        if !crate::accounts::constant_time_eq(given, secret.as_bytes()) {
            return None;
        }
        headers.get(FORWARDED_FOR)?.to_str().ok()?.parse().ok()
    }
}

/// The cluster's key: the first process to reach Redis stores its own; every other takes that.
fn shared_key(c: &mut redis::Connection, local: &SigningKey) -> Result<SigningKey, String> {
    let _: Option<String> = redis::cmd("SET")
        .arg(KEY)
        .arg(proto::token::hex(&local.to_bytes()))
        .arg("NX")
        .query(c)
        .map_err(|e| e.to_string())?;
    let hex: String = redis::cmd("GET")
        .arg(KEY)
        .query(c)
        .map_err(|e| e.to_string())?;
    proto::token::signing_key_from_hex(&hex).ok_or_else(|| format!("{KEY} is not a key"))
}

/// The cluster's key as stored in Redis at `url` (for `ctl credential`), if a ctl stored one.
pub fn stored_key(url: &str) -> anyhow::Result<SigningKey> {
    use anyhow::Context;
    let client = redis::Client::open(url).context("redis_url")?;
    let mut c = client
        .get_connection_with_timeout(REDIS_TIMEOUT)
        .context("cannot reach Redis")?;
    let hex: Option<String> = redis::cmd("GET").arg(KEY).query(&mut c)?;
    let hex = hex.context("no key in Redis yet: start ctl once first")?;
    proto::token::signing_key_from_hex(&hex).with_context(|| format!("{KEY} is not a key"))
}

/// The state's store in Redis, written only under the lease.
struct RedisLog {
    client: redis::Client,
    con: Option<redis::Connection>,
    /// The lease value's prefix of this term (`ID:TERM `).
    me: String,
}

impl Store for RedisLog {
    fn name(&self) -> &'static str {
        "Redis"
    }

    fn write(&mut self, batch: &Batch) -> Result<(), String> {
        let r = self.try_write(batch);
        if r.is_err() {
            self.con = None;
        }
        r
    }
}

impl RedisLog {
    fn try_write(&mut self, batch: &Batch) -> Result<(), String> {
        if self.con.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(REDIS_TIMEOUT)
                .map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(REDIS_TIMEOUT * 5))
                .map_err(|e| e.to_string())?;
            self.con = Some(c);
        }
        let c = self.con.as_mut().expect("connected above");
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(WRITE_SCRIPT)
            .arg(2)
            .arg(LEASE)
            .arg(LOG)
            .arg(&self.me)
            .arg(if batch.is_snapshot() { "1" } else { "0" });
        for line in batch.lines() {
            cmd.arg(line);
        }
        let ok: i64 = cmd.query(c).map_err(|e| e.to_string())?;
        if ok == 1 {
            Ok(())
        } else {
            Err("this ctl process no longer holds the lease".into())
        }
    }
}

/// The router of one listener of a ctl on Redis: every request to the acting process.
pub fn router(ha: Arc<Ha>, serves: Serves) -> Router {
    Router::new()
        .fallback(dispatch)
        .layer(axum::middleware::from_fn(crate::listener::request_deadline))
        .with_state((ha, serves))
}

async fn dispatch(State((ha, serves)): State<(Arc<Ha>, Serves)>, mut req: Request) -> Response {
    use tower::ServiceExt;
    let forwarded = req.headers().contains_key(FORWARD_AUTH);
    if let Some(ip) = ha.forwarded_for(req.headers()) {
        req.extensions_mut().insert(Peer(ip));
    }
    // Subscribed before the route is chosen: a change after it aborts the passing on.
    let changes = ha.changes.subscribe();
    match ha.route(serves) {
        Route::Local(router) => match router.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        // A request another process passed on is never passed again (two processes that
        // disagree about who acts would bounce it between them).
        Route::Remote(addr) if !forwarded => proxy(&ha, addr, req, changes).await,
        Route::Remote(_) | Route::Nowhere => ApiError::NoLeader.into_response(),
    }
}

/// Passes `req` to the acting process at `addr` and its answer back.
async fn proxy(
    ha: &Ha,
    addr: SocketAddr,
    req: Request,
    mut changes: tokio::sync::watch::Receiver<u64>,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let (Some(secret), Some(peer)) = (ha.forward_secret(), parts.extensions.get::<Peer>()) else {
        return ApiError::NoLeader.into_response();
    };
    let headers = &mut parts.headers;
    headers.remove(FORWARDED_FOR);
    if let (Ok(s), Ok(p)) = (
        HeaderValue::from_str(&secret),
        HeaderValue::from_str(&peer.0.to_string()),
    ) {
        headers.insert(FORWARD_AUTH, s);
        headers.insert(FORWARDED_FOR, p);
    }
    let connect = tokio::time::timeout(REDIS_TIMEOUT * 2, tokio::net::TcpStream::connect(addr));
    let Ok(Ok(stream)) = connect.await else {
        return ApiError::NoLeader.into_response();
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return ApiError::NoLeader.into_response();
    };
    tokio::spawn(conn);
    let answer = sender.send_request(axum::http::Request::from_parts(parts, body));
    tokio::select! {
        r = answer => match r {
            Ok(resp) => resp.map(axum::body::Body::new),
            Err(_) => ApiError::NoLeader.into_response(),
        },
        _ = changes.changed() => ApiError::NoLeader.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_value_names_its_node_and_term() {
        let n = Node {
            id: "0123456789abcdef".into(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            internal: Some("10.0.0.1:8081".parse().unwrap()),
        };
        let v = n.lease_value(7);
        assert!(v.starts_with("0123456789abcdef:7 "), "{v}");
        assert_eq!(Node::from_lease_value(&v), Some(n));
        assert_eq!(Node::from_lease_value("garbage"), None);
    }
}
