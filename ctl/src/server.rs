//! The HTTP driver: axum routes over one [`Core`] behind a mutex, the relays' long polls, the
//! periodic tick, and start-up (`ctl serve`).
//!
//! Every handler parses its input itself (path segments, query, JSON body) so that every
//! refusal is an [`ApiError`] with a JSON body; axum's own rejections never reach a client.
#![forbid(unsafe_code)]

use crate::api_types::*;
use crate::config::Config;
use crate::core::{Core, Now};
use crate::error::ApiError;
use crate::guard::JoinGuard;
use crate::membership::Heartbeat;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Extension;
use axum::Router;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// Longest long poll a relay may ask for.
const MAX_WAIT_MS: u64 = 30_000;
/// How often the state machine's periodic work runs.
const TICK: Duration = Duration::from_millis(250);
/// While membership is re-learned after a restart, a join whose room's relay has not yet
/// heartbeated is retried this often, until the relay shows up or the grace ends.
const GRACE_RETRY: Duration = Duration::from_millis(100);
/// How long a request waits for its changes to become durable before it is answered 503
/// `storage` (the journal writer is failing, or the disk is that slow).
const STORAGE_WAIT: Duration = Duration::from_secs(5);
/// The journal writer's pause after a failed write, before it tries a full rewrite.
const REWRITE_BACKOFF: Duration = Duration::from_millis(500);

/// Shared state of the handlers.
pub struct App {
    core: Mutex<Core>,
    /// Signalled (with `core`) when changes are staged for the journal writer.
    staged: Condvar,
    /// What the journal writer has done: the last change it made durable, and its failures.
    durable: tokio::sync::watch::Sender<Synced>,
    /// One notifier per relay id with a poll in flight, woken when commands are queued.
    wakers: Mutex<HashMap<u32, Arc<Notify>>>,
    /// The admin routes' credential: `admin_token`, or the one derived from the key.
    admin_credential: String,
    /// The key's secret seed, from which each relay's credential is derived.
    key: ed25519_dalek::SigningKey,
    /// `trust_loopback`: loopback callers need no credential on the admin and relay routes.
    trust_loopback: bool,
    max_body_bytes: usize,
    join_guard: Mutex<JoinGuard>,
    /// ctl on Redis: this process stopped acting (its lease lapsed); the writer and the
    /// ticker of this state stop, and nothing it stages is written.
    retired: std::sync::atomic::AtomicBool,
    /// Where sign-in codes go.
    sms: crate::sms::Gateway,
}

/// The journal writer's progress, for requests waiting on it.
#[derive(Clone, Copy, Debug, Default)]
struct Synced {
    seq: u64,
    failures: u64,
}

/// The client's address, attached to each request by the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::IpAddr);

pub(crate) type Shared = Arc<App>;
type Result<T> = std::result::Result<T, ApiError>;

impl App {
    pub fn new(core: Core) -> Shared {
        let key = core.signing_key().clone();
        let admin_credential = match &core.config().admin_token {
            Some(t) => t.expose().to_string(),
            None => crate::keys::admin_credential(&key),
        };
        let trust_loopback = core.config().trust_loopback;
        let max_body_bytes = core.config().max_body_bytes;
        let join_guard = Mutex::new(JoinGuard::new(core.config().join_failures_per_minute));
        let sms = core.config().sms_gateway();
        Arc::new(Self {
            core: Mutex::new(core),
            staged: Condvar::new(),
            durable: tokio::sync::watch::Sender::new(Synced::default()),
            wakers: Mutex::new(HashMap::new()),
            admin_credential,
            key,
            trust_loopback,
            max_body_bytes,
            join_guard,
            retired: std::sync::atomic::AtomicBool::new(false),
            sms,
        })
    }

    /// Stops this state's writer and ticker (ctl on Redis: another process acts now).
    pub(crate) fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _core = self.lock();
        self.staged.notify_all();
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock is a bug in ctl; the state is still consistent at
        // every await-free step, so keep serving rather than poison every later request.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the core, then wakes the journal writer if `f` staged changes and the long
    /// polls of relays that got commands. Answers at once: for a request whose answer must
    /// wait for its changes to be durable, use [`App::durable`].
    pub fn with_core<T>(&self, f: impl FnOnce(&mut Core) -> T) -> T {
        self.run(f).0
    }

    /// Runs `f` on the core like [`App::with_core`], and returns once every change `f` made or
    /// saw is durable; 503 `storage` if a write fails meanwhile or takes longer than
    /// `STORAGE_WAIT`. Such a change may still become durable with the writer's next full
    /// rewrite (as with any request that times out); changes made after a failure are refused
    /// before they are applied, until a rewrite succeeds.
    pub async fn durable<T>(&self, f: impl FnOnce(&mut Core) -> T) -> Result<T> {
        let (out, unsynced) = self.run(f);
        if let Some(seq) = unsynced {
            self.synced(seq).await?;
        }
        Ok(out)
    }

    /// Waits until the journal writer has made `seq` durable, or has failed a write.
    async fn synced(&self, seq: u64) -> Result<()> {
        let mut rx = self.durable.subscribe();
        let failures = rx.borrow().failures;
        let wait = rx.wait_for(|d| d.seq >= seq || d.failures > failures);
        let reached = match tokio::time::timeout(STORAGE_WAIT, wait).await {
            Ok(Ok(d)) => d.seq >= seq,
            _ => false,
        };
        if reached {
            Ok(())
        } else {
            Err(ApiError::Storage)
        }
    }

    fn run<T>(&self, f: impl FnOnce(&mut Core) -> T) -> (T, Option<u64>) {
        let (out, unsynced, woken) = {
            let mut core = self.lock();
            let out = f(&mut core);
            if core.has_staged() {
                self.staged.notify_one();
            }
            let woken: Vec<u32> = std::iter::from_fn(|| core.poll_woken()).collect();
            (out, core.unsynced(), woken)
        };
        let wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        for relay_id in woken {
            if let Some(n) = wakers.get(&relay_id) {
                n.notify_waiters();
            }
        }
        (out, unsynced)
    }

    /// The journal writer (a thread of its own): takes what is staged with the core's lock
    /// held only for the hand-over, and writes and syncs it with the lock released, so that
    /// heartbeats and every other request that reads or stages never wait on the disk. Every
    /// change staged while a write is under way goes into the next write (a group commit).
    /// Returns once the state is retired.
    pub(crate) fn write_journal(&self, mut journal: impl Store) {
        // Fault injection for tests: a disk this much slower on every write.
        let delay = std::env::var("CTL_FAULT_JOURNAL_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        let mut failing = false;
        loop {
            let batch = {
                let mut core = self.lock();
                loop {
                    if self.is_retired() {
                        return;
                    }
                    if let Some(batch) = core.take_batch() {
                        break batch;
                    }
                    core = self.staged.wait(core).unwrap_or_else(|e| e.into_inner());
                }
            };
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            let written = journal.write(&batch);
            match (&written, failing) {
                (Err(e), false) => eprintln!(
                    "ctl: {} write failed ({e}); changes are refused (503 storage) until \
                     a full rewrite of the state succeeds",
                    journal.name()
                ),
                (Ok(()), true) => eprintln!("ctl: the {} is written again", journal.name()),
                _ => {}
            }
            failing = written.is_err();
            self.with_core(|c| c.batch_written(&batch, written.is_ok()));
            self.durable.send_modify(|d| match written {
                Ok(()) => d.seq = d.seq.max(batch.seq),
                Err(_) => d.failures += 1,
            });
            if written.is_err() {
                std::thread::sleep(REWRITE_BACKOFF);
            }
        }
    }

    fn waker(&self, relay_id: u32) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if wakers.len() > crate::membership::MAX_RELAYS {
            wakers.retain(|_, n| Arc::strong_count(n) > 1);
        }
        wakers.entry(relay_id).or_default().clone()
    }

    /// Whether a request from `peer` may skip the credential (`trust_loopback`).
    fn trusted(&self, peer: Option<Extension<Peer>>) -> bool {
        self.trust_loopback && peer.is_some_and(|Extension(Peer(ip))| ip.is_loopback())
    }

    /// The admin routes: the admin credential, unless the caller is a trusted loopback one.
    fn check_admin(&self, peer: Option<Extension<Peer>>, headers: &HeaderMap) -> Result<()> {
        if self.trusted(peer) {
            return Ok(());
        }
        check_bearer(&self.admin_credential, headers)
    }

    /// Who creates a meeting: a signed-in account (its device credential; the account's
    /// id), or an operator (the admin credential, or a trusted loopback caller; 0).
    fn meeting_creator(&self, peer: Option<Extension<Peer>>, headers: &HeaderMap) -> Result<u64> {
        match bearer(headers) {
            Some(_) if check_bearer(&self.admin_credential, headers).is_ok() => Ok(0),
            Some(b) => self.with_core(|c| c.device_user(Some(b))),
            None if self.trusted(peer) => Ok(0),
            None => Err(ApiError::Unauthenticated),
        }
    }

    /// The relay routes (heartbeat, command poll) for `relay_id`: that relay's own
    /// credential, unless the caller is a trusted loopback one.
    fn check_relay(
        &self,
        peer: Option<Extension<Peer>>,
        headers: &HeaderMap,
        relay_id: u32,
    ) -> Result<()> {
        if self.trusted(peer) {
            return Ok(());
        }
        check_bearer(&crate::keys::relay_credential(&self.key, relay_id), headers)
    }
}

/// Where the writer makes batches durable: the journal file, or Redis ([`crate::ha`]).
pub(crate) trait Store {
    /// For log lines: "journal", "Redis".
    fn name(&self) -> &'static str;
    /// Makes `batch` durable, or fails leaving what was durable as it was.
    fn write(&mut self, batch: &crate::journal::Batch) -> std::result::Result<(), String>;
}

impl Store for crate::journal::Journal<crate::core::Record> {
    fn name(&self) -> &'static str {
        "journal"
    }

    fn write(&mut self, batch: &crate::journal::Batch) -> std::result::Result<(), String> {
        crate::journal::Journal::write(self, batch).map_err(|e| e.to_string())
    }
}

/// Whether `headers` carry `Authorization: Bearer <want>`.
fn check_bearer(want: &str, headers: &HeaderMap) -> Result<()> {
    let got = bearer(headers).ok_or(ApiError::Unauthenticated)?;
    // Compare digests so that the comparison's timing says nothing about the token.
    use sha2::{Digest, Sha256};
    if Sha256::digest(got.as_bytes()) == Sha256::digest(want.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::BadCredentials)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let headers = [(header::CONTENT_TYPE, "application/json")];
        (status, headers, self.body()).into_response()
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    // Our response types are plain data; serializing them cannot fail.
    let text = serde_json::to_string(body).expect("response bodies serialize");
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

fn ok<T: Serialize>(r: Result<T>) -> Response {
    match r {
        Ok(body) => json(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    }
}

/// Parses a JSON body, mapping every failure (size, syntax, shape) to a 4xx.
fn parse_body<T: DeserializeOwned>(
    app: &App,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<T> {
    let bytes = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge(app.max_body_bytes),
        _ => ApiError::BadRequest("unreadable request body".into()),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// Like [`parse_body`], but an empty body means the type's default.
fn parse_optional_body<T: DeserializeOwned + Default>(
    app: &App,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<T> {
    match &body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        _ => parse_body(app, body),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::trim)
}

fn id<T: std::str::FromStr>(segment: &str, what: &str) -> Result<T> {
    segment
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{what} must be an unsigned integer")))
}

fn one_segment(p: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
    p.map(|Path(s)| s)
        .map_err(|_| ApiError::BadRequest("bad path".into()))
}

fn two_segments(
    p: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String)> {
    p.map(|Path(s)| s)
        .map_err(|_| ApiError::BadRequest("bad path".into()))
}

async fn heartbeat(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    // The body names the relay; its credential is checked before anything else is done.
    let r = parse_body::<Heartbeat>(&app, body)
        .and_then(|hb| app.check_relay(peer, &headers, hb.relay_id).map(|()| hb))
        .and_then(|hb| app.with_core(|c| c.handle_heartbeat(&Now::system(), hb)));
    ok(r)
}

/// `wait_ms` from the query string: default 1000, at most [`MAX_WAIT_MS`].
fn wait_ms(query: Option<&str>) -> Result<u64> {
    let mut wait = 1000;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("wait_ms", v)) => wait = id::<u64>(v, "wait_ms")?.min(MAX_WAIT_MS),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {pair:?}"
                )))
            }
        }
    }
    Ok(wait)
}

async fn relay_commands(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    path: std::result::Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let parsed = one_segment(path)
        .and_then(|s| id::<u32>(&s, "relay id"))
        .and_then(|r| app.check_relay(peer, &headers, r).map(|()| r))
        .and_then(|r| Ok((r, wait_ms(query.as_deref())?)));
    let (relay_id, wait) = match parsed {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let waker = app.waker(relay_id);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
    loop {
        // Registered before the queue is checked, so a wake in between is not lost.
        let notified = waker.notified();
        // Commands go out once the changes that queued them are durable.
        if let Some(seq) = app.with_core(|c| c.unsynced()) {
            let _ = app.synced(seq).await;
        }
        let commands = app.with_core(|c| c.take_commands(relay_id));
        if !commands.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
            return json(StatusCode::OK, &CommandsAnswer { commands });
        }
    }
}

/// `n` random bytes (for session ids and credentials).
fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|_| ApiError::Storage)?;
    Ok(b)
}

/// Six uniformly random decimal digits (bytes of 250 and above are drawn again).
fn random_code() -> Result<[u8; 6]> {
    let mut code = [0u8; 6];
    let mut i = 0;
    while i < 6 {
        for b in random_bytes::<16>()? {
            if b < 250 && i < 6 {
                code[i] = b % 10;
                i += 1;
            }
        }
    }
    Ok(code)
}

impl App {
    /// Hands a sign-in code to the gateway, off the runtime's thread.
    async fn send_sms(&self, sms: crate::accounts::Sms) -> Result<()> {
        let gateway = self.sms.clone();
        let unix_s = Now::system().unix_s;
        let sent = tokio::task::spawn_blocking(move || gateway.send(&sms, unix_s)).await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                eprintln!("ctl: {e}");
                Err(ApiError::SmsGateway)
            }
            Err(_) => Err(ApiError::SmsGateway),
        }
    }
}

async fn start_verification(
    State(app): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let req = parse_body::<StartVerification>(&app, body)?;
        let id = proto::token::hex(&random_bytes::<16>()?);
        let code = random_code()?;
        let (started, sms) =
            app.with_core(|c| c.start_verification(&Now::system(), &req.number, id, code))?;
        if let Some(sms) = sms {
            app.send_sms(sms).await?;
        }
        Ok::<_, ApiError>(started)
    };
    match r.await {
        Ok(started) => json(StatusCode::CREATED, &started),
        Err(e) => e.into_response(),
    }
}

async fn resend_code(
    State(app): State<Shared>,
    path: std::result::Result<Path<String>, PathRejection>,
) -> Response {
    let r = async {
        let id = one_segment(path)?;
        let code = random_code()?;
        let (resent, sms) = app.with_core(|c| c.resend_code(&Now::system(), &id, code))?;
        app.send_sms(sms).await?;
        Ok::<_, ApiError>(resent)
    };
    ok(r.await)
}

async fn verify_code(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    path: std::result::Result<Path<String>, PathRejection>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let id = one_segment(path)?;
        let req = parse_body::<VerifyCode>(&app, body)?;
        let from = peer.map_or(
            std::net::IpAddr::from([0, 0, 0, 0]),
            |Extension(Peer(ip))| ip,
        );
        // A fresh user id (below 2^53, so that JSON clients read it exactly) in case this is
        // the number's first sign-in, and the device's credential.
        let new_user = (u64::from_le_bytes(random_bytes::<8>()?) >> 11).max(1);
        let credential = proto::token::hex(&random_bytes::<32>()?);
        app.durable(|c| c.verify(&Now::system(), &id, &req.code, from, new_user, credential))
            .await?
    };
    ok(r.await)
}

async fn my_home(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let r = async {
        let user = app.with_core(|c| c.device_user(bearer(&headers)))?;
        app.durable(|c| c.user_home(&Now::system(), user)).await?
    };
    ok(r.await)
}

async fn discover_contacts(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| {
        let user = app.with_core(|c| c.device_user(bearer(&headers)))?;
        let req = parse_body::<DiscoverContacts>(&app, body)?;
        if req.numbers.len() > crate::accounts::DISCOVERY_BATCH {
            return Err(ApiError::Invalid(format!(
                "at most {} numbers per request",
                crate::accounts::DISCOVERY_BATCH
            )));
        }
        // Normalised before the lock: parsing is the expensive part.
        let mut numbers = std::collections::BTreeSet::new();
        let mut invalid = 0;
        for n in &req.numbers {
            match crate::accounts::normalize(n) {
                Ok(e164) => {
                    numbers.insert(e164);
                }
                Err(_) => invalid += 1,
            }
        }
        app.with_core(|c| c.discover(&Now::system(), user, numbers, invalid))
    })();
    ok(r)
}

async fn delete_me(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let r = async {
        let user = app.with_core(|c| c.device_user(bearer(&headers)))?;
        app.durable(|c| c.delete_account(user)).await?
    };
    match r.await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create_meeting(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let owner = app.meeting_creator(peer, &headers)?;
        let req = parse_optional_body::<CreateMeeting>(&app, body)?;
        app.durable(|c| c.create_meeting(&Now::system(), req, owner))
            .await?
    };
    match r.await {
        Ok(created) => json(StatusCode::CREATED, &created),
        Err(e) => e.into_response(),
    }
}

async fn join(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let req = match parse_body::<JoinRequest>(&app, body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let peer = peer.map(|Extension(Peer(ip))| ip);
    let guard = || app.join_guard.lock().unwrap_or_else(|e| e.into_inner());
    if peer.is_some_and(|ip| !guard().allows(ip, std::time::Instant::now())) {
        return ApiError::TooManyRequests.into_response();
    }
    let r = join_in_grace(&app, req, bearer(&headers)).await;
    if let (Some(ip), Err(ApiError::UnknownMeeting)) = (peer, &r) {
        guard().handle_failure(ip, std::time::Instant::now());
    }
    ok(r)
}

/// Joins; while membership is re-learned after a restart, waits for the room's relay.
async fn join_in_grace(app: &App, req: JoinRequest, auth: Option<&str>) -> Result<Joined> {
    loop {
        let now = Now::system();
        let (r, grace) = app
            .durable(|c| (c.join(&now, req.clone(), auth), c.in_grace(&now)))
            .await?;
        match r {
            Err(ApiError::NoRelay) if grace => tokio::time::sleep(GRACE_RETRY).await,
            r => return r,
        }
    }
}

async fn leave(
    State(app): State<Shared>,
    headers: HeaderMap,
    path: std::result::Result<Path<String>, PathRejection>,
) -> Response {
    let r = async {
        let m = id::<u64>(&one_segment(path)?, "meeting id")?;
        let p = app
            .durable(|c| c.leave(&Now::system(), m, bearer(&headers)))
            .await??;
        Ok(Done {
            meeting_id: m,
            participant_id: Some(p),
            status: "left".into(),
        })
    };
    ok(r.await)
}

async fn remove_participant(
    State(app): State<Shared>,
    headers: HeaderMap,
    path: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let r = async {
        let (m, p) = two_segments(path)?;
        let (m, p) = (
            id::<u64>(&m, "meeting id")?,
            id::<u64>(&p, "participant id")?,
        );
        app.durable(|c| c.remove(&Now::system(), m, p, bearer(&headers)))
            .await??;
        Ok(Done {
            meeting_id: m,
            participant_id: Some(p),
            status: "removed".into(),
        })
    };
    ok(r.await)
}

async fn end_meeting(
    State(app): State<Shared>,
    headers: HeaderMap,
    path: std::result::Result<Path<String>, PathRejection>,
) -> Response {
    let r = async {
        let m = id::<u64>(&one_segment(path)?, "meeting id")?;
        app.durable(|c| c.end(&Now::system(), m, bearer(&headers)))
            .await??;
        Ok(Done {
            meeting_id: m,
            participant_id: None,
            status: "ended".into(),
        })
    };
    ok(r.await)
}

async fn user_home(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    path: std::result::Result<Path<String>, PathRejection>,
) -> Response {
    let r = async {
        app.check_admin(peer, &headers)?;
        let user = id::<u64>(&one_segment(path)?, "user id")?;
        app.durable(|c| c.user_home(&Now::system(), user)).await?
    };
    ok(r.await)
}

async fn list_relays(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    ok(app
        .check_admin(peer, &headers)
        .map(|()| app.with_core(|c| crate::views::relays(c, &Now::system()))))
}

async fn list_rooms(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    ok(app
        .check_admin(peer, &headers)
        .map(|()| app.with_core(|c| crate::views::rooms(c))))
}

async fn drain(
    app: Shared,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    path: std::result::Result<Path<String>, PathRejection>,
    on: bool,
) -> Response {
    let r = app.check_admin(peer, &headers).and_then(|()| {
        let relay_id = id::<u32>(&one_segment(path)?, "relay id")?;
        app.with_core(|c| c.set_drain(relay_id, on, &Now::system()))?;
        Ok(serde_json::json!({"relay_id": relay_id, "drain_requested": on}))
    });
    ok(r)
}

async fn drain_relay(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    path: std::result::Result<Path<String>, PathRejection>,
) -> Response {
    drain(app, peer, headers, path, true).await
}

async fn undrain_relay(
    State(app): State<Shared>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    path: std::result::Result<Path<String>, PathRejection>,
) -> Response {
    drain(app, peer, headers, path, false).await
}

async fn public_key(State(app): State<Shared>) -> Response {
    let pk = app.with_core(|c| c.public_key_hex().to_string());
    json(StatusCode::OK, &serde_json::json!({ "public_key": pk }))
}

async fn health(State(app): State<Shared>) -> Response {
    let h = app.with_core(|c| {
        let now = Now::system();
        Health {
            status: "ok".into(),
            relays_alive: c.members().n_alive(),
            meetings: c.meetings().len(),
            relearning: c.in_grace(&now),
        }
    });
    json(StatusCode::OK, &h)
}

async fn metrics(State(app): State<Shared>) -> Response {
    let text = app.with_core(|c| crate::metrics::render(c, &Now::system()));
    let ct = "text/plain; version=0.0.4; charset=utf-8";
    (StatusCode::OK, [(header::CONTENT_TYPE, ct)], text).into_response()
}

/// Which listener a route is served on when ctl has an internal listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// Clients: meetings, joins.
    Client,
    /// Relays (heartbeat, command poll) and operators (admin routes, metrics).
    Internal,
    /// Both listeners (health, the public key).
    Both,
}

/// The routes one listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    /// Every route: ctl has one listener.
    All,
    /// The client listener of a ctl with an internal listener.
    Client,
    /// The internal listener.
    Internal,
}

impl Serves {
    fn serves(self, reach: Reach) -> bool {
        match (self, reach) {
            (Serves::All, _) | (_, Reach::Both) => true,
            (Serves::Client, r) => r == Reach::Client,
            (Serves::Internal, r) => r == Reach::Internal,
        }
    }
}

/// Builds a router while recording every (method, path) it serves, so that a test can hold
/// the OpenAPI description to exactly this list.
struct Routes {
    router: Router<Shared>,
    list: Vec<(&'static str, &'static str)>,
    serves: Serves,
}

impl Routes {
    fn add<H, T>(
        mut self,
        method: &'static str,
        path: &'static str,
        reach: Reach,
        handler: H,
    ) -> Self
    where
        H: Handler<T, Shared>,
        T: 'static,
    {
        if !self.serves.serves(reach) {
            return self;
        }
        let filter = match method {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "DELETE" => MethodFilter::DELETE,
            other => unreachable!("route table uses GET, POST, DELETE only, not {other}"),
        };
        self.list.push((method, path));
        self.router = self.router.route(path, on(filter, handler));
        self
    }
}

/// The API as one listener serves it: the router and the list of (method, path) it serves.
pub fn router(
    app: Shared,
    max_body_bytes: usize,
    serves: Serves,
) -> (Router, Vec<(&'static str, &'static str)>) {
    use Reach::{Both, Client, Internal};
    let r = Routes {
        router: Router::new(),
        list: Vec::new(),
        serves,
    };
    let r = r
        .add("POST", "/v1/relays/heartbeat", Internal, heartbeat)
        .add(
            "GET",
            "/v1/relays/{relay_id}/commands",
            Internal,
            relay_commands,
        )
        .add("GET", "/v1/relays", Internal, list_relays)
        .add("POST", "/v1/relays/{relay_id}/drain", Internal, drain_relay)
        .add(
            "POST",
            "/v1/relays/{relay_id}/undrain",
            Internal,
            undrain_relay,
        )
        .add("POST", "/v1/meetings", Client, create_meeting)
        .add("POST", "/v1/join", Client, join)
        .add("POST", "/v1/meetings/{meeting_id}/leave", Client, leave)
        .add(
            "DELETE",
            "/v1/meetings/{meeting_id}/participants/{participant_id}",
            Client,
            remove_participant,
        )
        .add("DELETE", "/v1/meetings/{meeting_id}", Client, end_meeting)
        .add("GET", "/v1/rooms", Internal, list_rooms)
        .add("GET", "/v1/users/{user_id}/home", Internal, user_home)
        .add(
            "POST",
            "/v1/verification/sessions",
            Client,
            start_verification,
        )
        .add(
            "POST",
            "/v1/verification/sessions/{session_id}/resend",
            Client,
            resend_code,
        )
        .add(
            "POST",
            "/v1/verification/sessions/{session_id}/verify",
            Client,
            verify_code,
        )
        .add("GET", "/v1/me/home", Client, my_home)
        .add("DELETE", "/v1/me", Client, delete_me)
        .add("POST", "/v1/contacts/discover", Client, discover_contacts)
        .add("GET", "/v1/public-key", Both, public_key)
        .add("GET", "/health", Both, health)
        .add("GET", "/metrics", Internal, metrics);
    let router = r
        .router
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(crate::listener::request_deadline))
        .with_state(app);
    (router, r.list)
}

/// Runs the periodic work until the state is retired.
pub(crate) async fn ticker(app: Shared) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !app.is_retired() {
        every.tick().await;
        app.with_core(|c| c.tick(&Now::system()));
    }
}

/// `ctl serve`: opens the data directory (creating the key pair on first start), binds, prints
/// `ready listen=ADDR` (then ` internal=ADDR` when it has an internal listener) as the first
/// line of stdout, and serves until SIGINT or SIGTERM.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let key = crate::keys::load_or_create(&cfg.data_dir.join(crate::keys::KEY_FILE))?;
    let bind = |a: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("cannot listen on {a}"))
    };
    let listener = bind(cfg.listen).await?;
    let internal = match cfg.internal_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let addr = listener.local_addr()?;
    let mut cfg = cfg;
    cfg.listen = addr;
    let mut ready = format!("ready listen={addr}");
    if let Some(l) = &internal {
        let a = l.local_addr()?;
        cfg.internal_listen = Some(a);
        ready.push_str(&format!(" internal={a}"));
    }
    let (max_body, max_connections) = (cfg.max_body_bytes, cfg.max_connections);
    let max_internal = cfg.max_internal_connections;
    let (client_serves, internal_serves) = match internal {
        Some(_) => (Serves::Client, Some(Serves::Internal)),
        None => (Serves::All, None),
    };
    // The router of each listener: over this process's own state, or (ctl on Redis) over
    // whichever process acts now.
    let routers: Box<dyn Fn(Serves) -> Router> = match cfg.redis_url.clone() {
        Some(url) => {
            let ha = crate::ha::Ha::start(cfg, key, url.expose())?;
            ready.push_str(&format!(" node={}", ha.node_id()));
            Box::new(move |serves| crate::ha::router(ha.clone(), serves))
        }
        None => {
            let data_dir = cfg.data_dir.clone();
            let mut core = Core::open(cfg, key, &data_dir, Now::system())
                .with_context(|| format!("cannot open the journal in {}", data_dir.display()))?;
            let journal = core
                .detach_journal()
                .expect("a freshly opened core has its journal");
            let app = App::new(core);
            let writer = app.clone();
            std::thread::Builder::new()
                .name("ctl-journal".into())
                .spawn(move || writer.write_journal(journal))
                .context("cannot start the journal writer")?;
            tokio::spawn(ticker(app.clone()));
            Box::new(move |serves| router(app.clone(), max_body, serves).0)
        }
    };
    // One shutdown signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let internal = internal.zip(internal_serves).map(|(l, serves)| {
        let stop = stopped(stop_rx.clone());
        tokio::spawn(crate::listener::serve(
            l,
            routers(serves),
            max_internal,
            stop,
        ))
    });
    let router = routers(client_serves);
    println!("{ready}");
    std::io::stdout().flush()?;
    crate::listener::serve(listener, router, max_connections, stopped(stop_rx)).await;
    if let Some(task) = internal {
        let _ = task.await;
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// (METHOD, path) pairs under `paths:` in the OpenAPI file.
    fn openapi_routes(yaml: &str) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        let mut path = None;
        let section = yaml
            .split("\npaths:\n")
            .nth(1)
            .and_then(|s| s.split("\ncomponents:").next())
            .expect("openapi.yaml has paths: then components:");
        for line in section.lines() {
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
                if ["get", "post", "put", "delete", "patch"].contains(&m) {
                    let p = path.clone().expect("a method under a path");
                    out.insert((m.to_uppercase(), p));
                }
            }
        }
        out
    }

    fn served_routes() -> BTreeSet<(String, String)> {
        let dir = std::env::temp_dir().join(format!("ctl-routes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let core = Core::open(Config::default(), key, &dir, Now::system()).unwrap();
        let (_, list) = router(App::new(core), 1024, Serves::All);
        std::fs::remove_dir_all(&dir).unwrap();
        list.iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect()
    }

    #[test]
    fn openapi_lists_exactly_the_served_routes() {
        let served = served_routes();
        let documented = openapi_routes(include_str!("../openapi.yaml"));
        assert_eq!(served.len(), 21);
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "served but not in openapi.yaml: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "in openapi.yaml but not served: {extra:?}"
        );
    }

    #[test]
    fn api_md_documents_every_served_route() {
        let md = include_str!("../API.md");
        let headings: BTreeSet<(String, String)> = md
            .lines()
            .filter_map(|l| l.strip_prefix("### `"))
            .filter_map(|l| l.strip_suffix('`'))
            .filter_map(|l| l.split_once(' '))
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(
            served_routes(),
            headings,
            "API.md `### `METHOD path`` headings"
        );
    }

    #[test]
    fn an_internal_listener_takes_the_relay_and_admin_routes_from_clients() {
        let dir = std::env::temp_dir().join(format!("ctl-reach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let core = Core::open(Config::default(), key, &dir, Now::system()).unwrap();
        let app = App::new(core);
        let (_, client) = router(app.clone(), 1024, Serves::Client);
        let (_, internal) = router(app, 1024, Serves::Internal);
        std::fs::remove_dir_all(&dir).unwrap();
        let has = |l: &[(&str, &str)], p: &str| l.iter().any(|(_, q)| *q == p);
        for p in [
            "/v1/relays/heartbeat",
            "/v1/relays",
            "/v1/rooms",
            "/metrics",
        ] {
            assert!(!has(&client, p) && has(&internal, p), "{p}");
        }
        for p in ["/v1/join", "/v1/meetings"] {
            assert!(has(&client, p) && !has(&internal, p), "{p}");
        }
        assert!(has(&client, "/health") && has(&internal, "/health"));
        assert_eq!(client.len() + internal.len(), served_routes().len() + 2);
    }

    #[test]
    fn wait_ms_is_bounded_and_unknown_parameters_refused() {
        assert_eq!(wait_ms(None), Ok(1000));
        assert_eq!(wait_ms(Some("wait_ms=5")), Ok(5));
        assert_eq!(wait_ms(Some("wait_ms=99999999")), Ok(MAX_WAIT_MS));
        assert!(wait_ms(Some("wait_ms=-1")).is_err());
        assert!(wait_ms(Some("x=1")).is_err());
    }
}
