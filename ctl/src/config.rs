//! `ctl serve` configuration: a TOML file (`--config ctl.toml`), then flags over it.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything `ctl serve` can be told. Every field has a default; see `ctl/ctl.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on (port 0: any free port, printed at start-up).
    pub listen: SocketAddr,
    /// If set, a second listener for the relay routes (heartbeat, command poll) and the admin
    /// routes, with its own connection slots; `listen` then serves only the client routes, so
    /// that no client (slow, trickling or hostile) can hold a slot a heartbeat needs. Unset:
    /// `listen` serves every route.
    pub internal_listen: Option<SocketAddr>,
    /// Directory for the key pair and the journal; created if absent.
    pub data_dir: PathBuf,
    /// Base of join links, `{public_url}/j/{code}`; default `http://{listen}`.
    pub public_url: Option<String>,
    /// The admin routes' credential (`Authorization: Bearer <admin_token>`). Unset: the one
    /// ctl derives from its key at first start (`ctl credential admin` prints it).
    pub admin_token: Option<Secret>,
    /// Whether requests from a loopback address may use the admin and relay routes without a
    /// credential (a single host, as `cargo xtask demo` runs it). From any other address
    /// those routes always need one: the admin credential, or the relay's own (`ctl
    /// credential relay ID`). Set false when a reverse proxy on ctl's host forwards clients.
    pub trust_loopback: bool,
    /// Lifetime of issued join tokens, seconds.
    pub token_ttl_s: u64,
    /// Heartbeat period relays are told to use, milliseconds.
    pub heartbeat_ms: u64,
    /// Silence after which a relay is dead, milliseconds.
    pub dead_after_ms: u64,
    /// A meeting nobody joined or rejoined for this long is ended, seconds (clients rejoin
    /// before their token expires, so a live meeting is never idle for a token lifetime).
    pub meeting_idle_s: u64,
    /// Participants per meeting.
    pub max_participants: usize,
    /// Meetings in existence at once.
    pub max_meetings: usize,
    /// Meetings one account may have open at once (an operator's, made with the admin
    /// credential, count against `max_meetings` only).
    pub meetings_per_account: usize,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Open HTTP connections at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Open connections at once on `internal_listen` (relays hold two each).
    pub max_internal_connections: usize,
    /// Joins with an unknown code allowed per client address per minute (0: no limit).
    pub join_failures_per_minute: u32,
    /// Candidates kept per placement (k >= 2).
    pub placement_candidates: usize,
    /// Bounded-load cap: no shard takes more than `load_cap` times the mean rooms per unit of
    /// capacity.
    pub load_cap: f64,
    /// The journal is compacted (rewritten with only the live records) once it holds more than
    /// twice the live records plus this many: its disk bound, in records.
    pub journal_slack_records: usize,
    /// ... or once it holds more than twice the bytes of its last rewrite plus this many: its
    /// disk bound, in bytes.
    pub journal_slack_bytes: u64,
    /// Relays whose shards own the chats of the cluster (0: relays serve chat alone). Once
    /// this many relays with a link port have registered, ctl fixes the list of chat owners
    /// (all their shards) for good and hands it to every linked relay; a relay added later
    /// homes users and rooms but owns no chat (ARCHITECTURE.md, "Chat across relays").
    pub cluster_relays: usize,
    /// If set (`redis://host:port/db`), ctl keeps its state in Redis instead of the journal,
    /// and any number of ctl processes with the same `redis_url` serve one cluster: one of
    /// them at a time (the holder of a lease in Redis) runs the state machine, the others pass
    /// requests to it (ARCHITECTURE.md, "ctl on Redis").
    pub redis_url: Option<Secret>,
    /// The Redis lease of the acting ctl, milliseconds: how long the others wait after it
    /// falls silent before one of them takes over. Renewed every fifth of it.
    pub redis_lease_ms: u64,
    /// With `redis_url`: the address the other ctl processes reach this one at, when it
    /// listens on an unspecified address (0.0.0.0 or ::).
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Where sign-in codes go: this URL gets an HTTP POST per code (ctl/API.md, "Accounts");
    /// unset, they are appended to `DATA_DIR/sms-outbox.jsonl`.
    pub sms_webhook_url: Option<String>,
    /// Sent as `Authorization: Bearer <sms_webhook_token>` with each POST when set.
    pub sms_webhook_token: Option<Secret>,
}

/// A credential read from the configuration: `Debug` does not show it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The credential itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// At least 16 bytes, all printable ASCII without spaces, so that it travels in an
    /// `Authorization` header as is.
    fn is_well_formed(&self) -> bool {
        self.0.len() >= 16 && self.0.bytes().all(|b| b.is_ascii_graphic())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            internal_listen: None,
            data_dir: PathBuf::from("ctl-data"),
            public_url: None,
            admin_token: None,
            trust_loopback: true,
            token_ttl_s: 3600,
            heartbeat_ms: 1000,
            dead_after_ms: 3000,
            meeting_idle_s: 86_400,
            max_participants: 100,
            max_meetings: 100_000,
            meetings_per_account: 10,
            max_body_bytes: 16 * 1024,
            max_connections: 1024,
            max_internal_connections: 256,
            join_failures_per_minute: 30,
            placement_candidates: 3,
            load_cap: 1.25,
            journal_slack_records: 1024,
            journal_slack_bytes: 1 << 20,
            cluster_relays: 0,
            redis_url: None,
            redis_lease_ms: 3000,
            advertise_ip: None,
            sms_webhook_url: None,
            sms_webhook_token: None,
        }
    }
}

impl Config {
    /// Parses a TOML file's text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).context("invalid configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges that the types do not.
    pub fn validate(&self) -> Result<()> {
        if self.token_ttl_s == 0 || self.token_ttl_s > 7 * 24 * 3600 {
            bail!("token_ttl_s must be in 1..=604800");
        }
        if self.meeting_idle_s < self.token_ttl_s {
            bail!("meeting_idle_s must be at least token_ttl_s");
        }
        if self.cluster_relays > 255 {
            bail!("cluster_relays: at most 255 relays own chats");
        }
        if self.heartbeat_ms == 0 || self.dead_after_ms < 2 * self.heartbeat_ms {
            bail!("dead_after_ms must be at least two heartbeats");
        }
        if self.max_participants == 0 || self.max_meetings == 0 {
            bail!("max_participants and max_meetings must be positive");
        }
        if !(1..=self.max_meetings).contains(&self.meetings_per_account) {
            bail!("meetings_per_account must be in 1..=max_meetings");
        }
        for (name, n) in [
            ("max_connections", self.max_connections),
            ("max_internal_connections", self.max_internal_connections),
        ] {
            if !(1..=65_536).contains(&n) {
                bail!("{name} must be in 1..=65536");
            }
        }
        if self
            .internal_listen
            .is_some_and(|a| a == self.listen && a.port() != 0)
        {
            bail!("internal_listen must differ from listen");
        }
        if !(256..=1 << 20).contains(&self.max_body_bytes) {
            bail!("max_body_bytes must be in 256..=1048576");
        }
        let cap_ok = self.load_cap.is_finite() && self.load_cap >= 1.0;
        let k_ok = (2..=crate::placement::MAX_K).contains(&self.placement_candidates);
        if !k_ok || !cap_ok {
            bail!(
                "placement_candidates must be in 2..={} and load_cap >= 1",
                crate::placement::MAX_K
            );
        }
        if !(16..=1 << 20).contains(&self.journal_slack_records) {
            bail!("journal_slack_records must be in 16..=1048576");
        }
        if !(1 << 16..=1 << 30).contains(&self.journal_slack_bytes) {
            bail!("journal_slack_bytes must be in 65536..=1073741824");
        }
        if !(500..=60_000).contains(&self.redis_lease_ms) {
            bail!("redis_lease_ms must be in 500..=60000");
        }
        if self.redis_url.is_some() {
            let unspecified = self.listen.ip().is_unspecified()
                || self
                    .internal_listen
                    .is_some_and(|a| a.ip().is_unspecified());
            if unspecified && self.advertise_ip.is_none() {
                bail!(
                    "with redis_url, a ctl listening on an unspecified address needs \
                     advertise_ip: the address the other ctl processes reach it at"
                );
            }
        }
        if self
            .sms_webhook_url
            .as_ref()
            .is_some_and(|u| !u.starts_with("http://"))
        {
            bail!("sms_webhook_url must be an http:// URL (a local bridge to the provider)");
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| !t.is_well_formed())
        {
            bail!("admin_token must be at least 16 printable ASCII characters, without spaces");
        }
        Ok(())
    }

    /// The lease a heartbeat grants, milliseconds: how long a relay may take new joins
    /// without hearing from ctl. Shorter than `dead_after_ms` by a sixth of it (at least
    /// 500 ms, at most half): the relay counts its lease from when it sent the heartbeat,
    /// ctl counts a relay's silence from when it received one, so by the time ctl declares
    /// the relay dead and moves its rooms, the lease has lapsed for at least that margin.
    pub fn lease_ms(&self) -> u64 {
        let margin = (self.dead_after_ms / 6)
            .max(500)
            .min(self.dead_after_ms / 2);
        self.dead_after_ms - margin
    }

    /// Where sign-in codes go.
    pub fn sms_gateway(&self) -> crate::sms::Gateway {
        match &self.sms_webhook_url {
            Some(url) => crate::sms::Gateway::Webhook {
                url: url.clone(),
                token: self.sms_webhook_token.clone(),
            },
            None => crate::sms::Gateway::Outbox(self.data_dir.join("sms-outbox.jsonl")),
        }
    }

    /// Base URL of join links.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.listen),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses_to_the_defaults() {
        let cfg = Config::from_toml(include_str!("../ctl.toml")).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn the_lease_lapses_before_the_relay_is_declared_dead() {
        assert_eq!(Config::default().lease_ms(), 2_500);
        for (hb, dead) in [(1_000, 2_000), (1_000, 3_000), (100, 200), (2_000, 60_000)] {
            let text = format!("heartbeat_ms = {hb}\ndead_after_ms = {dead}");
            let cfg = Config::from_toml(&text).unwrap();
            let lease = cfg.lease_ms();
            assert!(
                lease >= hb,
                "a lease outlasts one heartbeat: {lease} < {hb}"
            );
            // The margin ctl's and the relay's clocks get: 500 ms, or half of a shorter
            // dead_after.
            assert!(dead - lease >= 500.min(dead / 2), "{lease} vs {dead}");
        }
    }

    #[test]
    fn refuses_unknown_keys_and_bad_ranges() {
        assert!(Config::from_toml("nope = 1").is_err());
        assert!(Config::from_toml("token_ttl_s = 0").is_err());
        assert!(Config::from_toml("journal_slack_records = 15").is_err());
        assert!(Config::from_toml("journal_slack_records = 64").is_ok());
        assert!(Config::from_toml("placement_candidates = 9").is_err());
        assert!(Config::from_toml("max_internal_connections = 0").is_err());
        let same = "listen = \"127.0.0.1:9000\"\ninternal_listen = \"127.0.0.1:9000\"";
        assert!(Config::from_toml(same).is_err());
        assert!(Config::from_toml("load_cap = nan").is_err());
        assert!(Config::from_toml("admin_token = \"short\"").is_err());
        assert!(Config::from_toml("admin_token = \"has a space, and 16+\"").is_err());
        let ok = Config::from_toml("admin_token = \"admin-secret-0123456789\"").unwrap();
        assert!(
            !format!("{ok:?}").contains("admin-secret"),
            "Debug hides tokens"
        );
        let cfg =
            Config::from_toml("listen = \"127.0.0.1:0\"\npublic_url = \"https://m.example/\"")
                .unwrap();
        assert_eq!(cfg.public_url(), "https://m.example");
    }
}
