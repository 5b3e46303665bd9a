//! Relay configuration: a TOML file whose every field a command-line flag can override.

use crate::engine::EngineConfig;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Which I/O backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// Probe io_uring, else batch (see ARCHITECTURE.md for which one `auto` prefers).
    Auto,
    /// io_uring; fails if unavailable.
    Uring,
    /// recvmmsg/sendmmsg.
    Batch,
}

/// Command-line flags. Each overrides the matching field of the file.
#[derive(Debug, clap::Parser)]
#[command(name = "relay", version, about = "Thread-per-core SFU relay")]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// I/O backend.
    #[arg(long, value_enum)]
    pub io: Option<IoChoice>,
    /// Number of shards (threads); default: one per available CPU.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Address the UDP ports bind to.
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// UDP port of shard 0; shard i listens on base_port + i.
    #[arg(long)]
    pub base_port: Option<u16>,
    /// Address of the Prometheus endpoint.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// ctl's Ed25519 public key, hex.
    #[arg(long)]
    pub public_key: Option<String>,
    /// This relay's id (tokens for other relays are refused; 0 accepts any).
    #[arg(long)]
    pub relay_id: Option<u32>,
    /// Binding TTL in milliseconds.
    #[arg(long)]
    pub binding_ttl_ms: Option<u64>,
    /// ctl's address, `http://host:port` (or several, comma-separated: the processes of a ctl
    /// on Redis); without it the relay runs standalone.
    #[arg(long)]
    pub ctl: Option<String>,
    /// Host name or address clients reach this relay at (reported to ctl).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// TCP port of shard 0's chat listener; shard i listens on chat_port + i. Enables chat.
    #[arg(long)]
    pub chat_port: Option<u16>,
    /// TCP port of the relay links: chat with the other relays of ctl's cluster
    /// (`[chat] link_port`; needs chat, ctl and a relay id of 1 to 255).
    #[arg(long)]
    pub link_port: Option<u16>,
    /// Directory of the chat logs (one subdirectory per shard).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Do not pin shard threads to CPUs.
    #[arg(long)]
    pub no_pin: bool,
}

/// The `[limits]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Rooms per shard.
    pub max_rooms_per_shard: usize,
    /// Participants per room.
    pub max_participants_per_room: usize,
    /// Publishers one explicit subscription may name.
    pub max_subscriptions: usize,
    /// Packets per second per participant.
    pub participant_pps: u64,
    /// Bits per second per participant.
    pub participant_bps: u64,
    /// New bindings (signature checks) per second per shard.
    pub new_bindings_per_s: u64,
    /// Minimum interval between keyframe requests to one publisher, ms.
    pub keyframe_request_interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        let e = EngineConfig::default();
        Self {
            max_rooms_per_shard: e.max_rooms,
            max_participants_per_room: e.max_participants_per_room,
            max_subscriptions: e.max_subscriptions,
            participant_pps: e.participant_pps,
            participant_bps: e.participant_bps,
            new_bindings_per_s: e.new_binding_rate,
            keyframe_request_interval_ms: e.keyframe_request_interval_us / 1000,
        }
    }
}

/// The `[chat]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatSettings {
    /// TCP port of shard 0; none disables chat.
    pub port: Option<u16>,
    /// Directory of the per-shard logs.
    pub data_dir: PathBuf,
    /// TCP port of the relay links (on `bind`, advertised with `advertise_host`): with it the
    /// relay serves chat as one of ctl's cluster, and waits for the cluster to form before it
    /// starts; without it, it serves chat alone.
    pub link_port: Option<u16>,
    /// fdatasync on every commit (turning it off loses durability; for benchmarks only).
    pub sync: bool,
    /// Run each commit's fdatasync on a per-shard sync thread while the shard serves on
    /// (pipelined; the default, which measured more throughput and lower latency), instead of
    /// inline at the end of the loop turn (perf/CHAT_RESULTS.md).
    pub sync_thread: bool,
    /// Unacknowledged MSG frames per session before the backlog pauses.
    pub window: u16,
    /// Connections per remote address.
    pub max_conns_per_ip: u32,
    /// HELLO signature checks per second per shard; more sign-ins get ERROR 13 (0: none).
    pub hellos_per_s: u64,
    /// Open connections per shard (1 to 131,072); a further one gets ERROR 13 and is closed.
    pub max_conns: usize,
    /// Messages each ring between two shards holds (16 to 65,536). Beyond it messages wait in
    /// a spill queue and the shard stops reading its clients until it drains.
    pub ring_capacity: usize,
    /// Seconds a connection has to authenticate.
    pub hello_timeout_ms: u64,
    /// A reader that makes no progress for this long is disconnected.
    pub slow_reader_timeout_ms: u64,
    /// Bytes queued to one session at most.
    pub max_out_bytes: usize,
    /// Requests per second per session.
    pub msgs_per_s: u64,
    /// Size at which a log segment is closed and a new one begun (64 KiB to 1 GiB). A segment
    /// is deleted (recycled) once nothing in it is live; a checkpoint rewrites the chats'
    /// snapshots when the log spans 3 segments.
    pub segment_bytes: u64,
    /// Accepted requests each owner shard remembers (the most recent), so that a client's retry
    /// is answered with its original SENT instead of being stored twice (1,024 to 2^24). Each
    /// costs about 72 bytes once that many have passed (perf/SOAK.md, "Memory budget").
    pub dedup_capacity: usize,
    /// Chats (direct and groups) one user may be in, per owner shard; a new one beyond it is
    /// refused with ERROR 8 "too many chats".
    pub max_chats_per_user: usize,
}

/// Bounds of `[chat] segment_bytes`.
pub const SEGMENT_BYTES_RANGE: std::ops::RangeInclusive<u64> = (64 << 10)..=(1 << 30);

/// Bounds of `[chat] dedup_capacity`.
pub const DEDUP_CAPACITY_RANGE: std::ops::RangeInclusive<usize> = (1 << 10)..=(1 << 24);

impl Default for ChatSettings {
    fn default() -> Self {
        let c = crate::chat::ChatConfig::default();
        Self {
            port: None,
            data_dir: PathBuf::from("relay-data"),
            link_port: None,
            sync: true,
            sync_thread: true,
            window: c.window,
            max_conns_per_ip: c.max_conns_per_ip,
            hellos_per_s: c.hellos_per_s,
            max_conns: crate::io::chat_io::MAX_CONNS,
            ring_capacity: crate::io::mailbox::RING_CAPACITY,
            hello_timeout_ms: c.hello_timeout_us / 1000,
            slow_reader_timeout_ms: c.slow_reader_timeout_us / 1000,
            max_out_bytes: c.max_out_bytes,
            msgs_per_s: c.msgs_per_s,
            segment_bytes: crate::chat::log::LogConfig::default().segment_bytes,
            dedup_capacity: c.dedup_capacity,
            max_chats_per_user: c.max_chats_per_user,
        }
    }
}

impl ChatSettings {
    /// The chat engine's configuration.
    pub fn engine(&self) -> crate::chat::ChatConfig {
        crate::chat::ChatConfig {
            window: self.window,
            max_conns_per_ip: self.max_conns_per_ip,
            hellos_per_s: self.hellos_per_s,
            hello_timeout_us: self.hello_timeout_ms.saturating_mul(1000),
            slow_reader_timeout_us: self.slow_reader_timeout_ms.saturating_mul(1000),
            max_out_bytes: self.max_out_bytes,
            msgs_per_s: self.msgs_per_s,
            msgs_burst: self.msgs_per_s.saturating_mul(2),
            dedup_capacity: self.dedup_capacity,
            max_chats_per_user: self.max_chats_per_user.max(1),
            ..crate::chat::ChatConfig::default()
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// I/O backend.
    pub io: IoChoice,
    /// Shards; 0 means one per available CPU.
    pub shards: usize,
    /// Address the UDP ports bind to.
    pub bind: IpAddr,
    /// UDP port of shard 0.
    pub base_port: u16,
    /// Prometheus endpoint; none to disable.
    pub metrics: Option<SocketAddr>,
    /// ctl's public key, hex.
    pub public_key: Option<String>,
    /// This relay's id.
    pub relay_id: u32,
    /// Binding TTL, ms.
    pub binding_ttl_ms: u64,
    /// Pin shard i to the i-th CPU of the process's affinity mask (modulo their number).
    pub pin: bool,
    /// Socket buffer sizes requested, bytes.
    pub socket_buffer_bytes: usize,
    /// ctl's address, `http://host:port` (comma-separated for several ctl processes); none to
    /// run standalone.
    pub ctl: Option<String>,
    /// This relay's credential at ctl (`ctl credential relay ID` prints it; ctl accepts it
    /// for this relay id only), sent with every heartbeat and command poll. The environment variable `RELAY_CTL_TOKEN`, when set
    /// and not empty, overrides it (so it can live in a root-only environment file rather
    /// than on the command line).
    pub ctl_token: Option<Secret>,
    /// Host clients reach this relay at; default: the bind address.
    pub advertise_host: Option<String>,
    /// NIC capacity reported to ctl, Gbit/s.
    pub nic_gbps: f64,
    /// Labels reported to ctl (region, rack, ...).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Chat.
    pub chat: ChatSettings,
    /// Limits.
    pub limits: Limits,
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

    /// At least 16 bytes, all printable ASCII without spaces: what an HTTP header carries as
    /// is (and what ctl compares after trimming).
    pub fn is_well_formed(&self) -> bool {
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
            io: IoChoice::Auto,
            shards: 0,
            bind: IpAddr::from([127, 0, 0, 1]),
            base_port: 40_000,
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9100))),
            public_key: None,
            relay_id: 0,
            binding_ttl_ms: 30_000,
            pin: true,
            socket_buffer_bytes: 8 << 20,
            ctl: None,
            ctl_token: None,
            advertise_host: None,
            nic_gbps: 10.0,
            labels: Default::default(),
            chat: ChatSettings::default(),
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// Reads the file named by the flags (if any) and applies the flags over it.
    pub fn load(flags: &Flags) -> Result<Self, String> {
        let mut cfg = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => Self::default(),
        };
        cfg.io = flags.io.unwrap_or(cfg.io);
        cfg.shards = flags.shards.unwrap_or(cfg.shards);
        cfg.bind = flags.bind.unwrap_or(cfg.bind);
        cfg.base_port = flags.base_port.unwrap_or(cfg.base_port);
        cfg.metrics = flags.metrics.or(cfg.metrics);
        cfg.public_key = flags.public_key.clone().or(cfg.public_key);
        cfg.relay_id = flags.relay_id.unwrap_or(cfg.relay_id);
        cfg.binding_ttl_ms = flags.binding_ttl_ms.unwrap_or(cfg.binding_ttl_ms);
        cfg.pin &= !flags.no_pin;
        cfg.ctl = flags.ctl.clone().or(cfg.ctl);
        cfg.chat.port = flags.chat_port.or(cfg.chat.port);
        cfg.chat.link_port = flags.link_port.or(cfg.chat.link_port);
        if let Some(d) = &flags.data_dir {
            cfg.chat.data_dir = d.clone();
        }
        cfg.advertise_host = flags.advertise_host.clone().or(cfg.advertise_host);
        if let Some(t) = std::env::var("RELAY_CTL_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            cfg.ctl_token = Some(Secret(t));
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects settings that parse but cannot work together.
    pub fn check(&self) -> Result<(), String> {
        let max = crate::io::chat_io::MAX_CONNS;
        if self.chat.max_conns == 0 || self.chat.max_conns > max {
            return Err(format!("[chat] max_conns must be between 1 and {max}"));
        }
        let ring = crate::io::mailbox::RING_CAPACITY_RANGE;
        if !ring.contains(&self.chat.ring_capacity) {
            return Err(format!(
                "[chat] ring_capacity must be between {} and {}",
                ring.start(),
                ring.end()
            ));
        }
        if !SEGMENT_BYTES_RANGE.contains(&self.chat.segment_bytes) {
            return Err(format!(
                "[chat] segment_bytes must be between {} and {}",
                SEGMENT_BYTES_RANGE.start(),
                SEGMENT_BYTES_RANGE.end()
            ));
        }
        if !DEDUP_CAPACITY_RANGE.contains(&self.chat.dedup_capacity) {
            return Err(format!(
                "[chat] dedup_capacity must be between {} and {}",
                DEDUP_CAPACITY_RANGE.start(),
                DEDUP_CAPACITY_RANGE.end()
            ));
        }
        if self.ctl_token.as_ref().is_some_and(|t| !t.is_well_formed()) {
            return Err(
                "ctl_token must be at least 16 printable ASCII characters, without spaces".into(),
            );
        }
        if self.chat.link_port.is_some()
            && (self.ctl.is_none()
                || self.chat.port.is_none()
                || !(1..=255).contains(&self.relay_id))
        {
            return Err(
                "[chat] link_port needs chat, ctl and a relay_id of 1 to 255 (its \
                        number in the cluster)"
                    .into(),
            );
        }
        if self.chat.link_port.is_some() && self.shards > 256 {
            return Err("a linked relay has at most 256 shards".into());
        }
        if self.ctl.is_some() && self.relay_id == 0 {
            return Err("a relay that talks to ctl needs a nonzero relay_id (--relay-id)".into());
        }
        Ok(())
    }

    /// Parses TOML; unknown fields are errors.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The engine's limits and timers.
    pub fn engine(&self) -> EngineConfig {
        let l = &self.limits;
        EngineConfig {
            max_rooms: l.max_rooms_per_shard,
            max_participants_per_room: l.max_participants_per_room,
            max_subscriptions: l.max_subscriptions,
            binding_ttl_us: self.binding_ttl_ms.saturating_mul(1000),
            participant_pps: l.participant_pps,
            participant_bps: l.participant_bps,
            new_binding_rate: l.new_bindings_per_s,
            keyframe_request_interval_us: l.keyframe_request_interval_ms.saturating_mul(1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_and_rejects_unknown_fields() {
        let cfg = Config::parse(
            "io = \"batch\"\nshards = 2\nbase_port = 5000\n[limits]\nmax_participants_per_room = 8\n",
        )
        .unwrap();
        assert_eq!(cfg.io, IoChoice::Batch);
        assert_eq!(cfg.shards, 2);
        assert_eq!(cfg.engine().max_participants_per_room, 8);
        assert!(Config::parse("bogus = 1").unwrap_err().contains("bogus"));
        assert!(Config::parse("[limits]\nnope = 1").is_err());
    }

    #[test]
    fn chat_max_conns_is_bounded() {
        let with = |n: u64| Config::parse(&format!("[chat]\nmax_conns = {n}")).unwrap();
        assert!(with(5).check().is_ok());
        assert!(with(131_072).check().is_ok());
        for bad in [0, 131_073] {
            let e = with(bad).check().unwrap_err();
            assert!(e.contains("max_conns must be between 1 and 131072"), "{e}");
        }
        let ring = |n: u64| Config::parse(&format!("[chat]\nring_capacity = {n}")).unwrap();
        assert!(ring(16).check().is_ok());
        for bad in [15, 65_537] {
            let e = ring(bad).check().unwrap_err();
            assert!(
                e.contains("ring_capacity must be between 16 and 65536"),
                "{e}"
            );
        }
        let dedup = |n: u64| Config::parse(&format!("[chat]\ndedup_capacity = {n}")).unwrap();
        assert!(dedup(1 << 16).check().is_ok());
        for n in [0, 1023, (1 << 24) + 1] {
            let e = dedup(n).check().unwrap_err();
            assert!(
                e.contains("dedup_capacity must be between 1024 and 16777216"),
                "{e}"
            );
        }
        let seg = |n: u64| Config::parse(&format!("[chat]\nsegment_bytes = {n}")).unwrap();
        assert!(seg(65_536).check().is_ok());
        for bad in [0, 65_535, (1 << 30) + 1] {
            let e = seg(bad).check().unwrap_err();
            assert!(
                e.contains("segment_bytes must be between 65536 and 1073741824"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_ctl_token_must_be_long_and_on_one_line() {
        let with = |t: &str| Config::parse(&format!("ctl_token = {t:?}")).unwrap();
        assert!(with("relay-secret-0123456789").check().is_ok());
        for bad in [
            "short",
            "sixteen-chars-ok\r\nX-Injected: 1",
            "with a space in it, 16+",
        ] {
            let e = with(bad).check().unwrap_err();
            assert!(
                e.contains("ctl_token must be at least 16 printable ASCII characters"),
                "{e}"
            );
        }
    }
}

#[cfg(test)]
mod example_tests {
    /// The example file shipped beside the crate parses and equals the built-in defaults.
    #[test]
    fn shipped_example_matches_defaults() {
        let text = include_str!("../relay.toml");
        let cfg = super::Config::parse(text).unwrap();
        let def = super::Config::default();
        assert_eq!(cfg.engine(), def.engine());
        assert_eq!(
            (cfg.io, cfg.shards, cfg.base_port, cfg.metrics),
            (def.io, def.shards, def.base_port, def.metrics)
        );
    }
}
