//! Relay membership: which relays are alive, what they can carry, how loaded they are, and
//! whether they take new rooms. Pure state: every input carries `now`; nothing here reads a
//! clock or performs I/O.
//!
//! A relay registers with its first heartbeat and is dead once `dead_after` (3 s) passes
//! without one. Dead relays stay listed (state `dead`) until `forget_after` so that operators
//! see them, then are forgotten.
//!
//! Silence is counted on ctl's own running time. ctl looks every tick (250 ms, and before every
//! placement); a stretch between two looks longer than [`POLL_GAP`] is time ctl was not
//! running (stopped, a VM migration, a stalled runtime, a lock held across a slow fsync), and
//! is not held against the relays: their heartbeats were waiting for ctl, not missing. A
//! relay that did die meanwhile is seen dead that much later. (A relay cut off while ctl runs
//! is still declared dead after `dead_after`.)
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Upper bounds on what a heartbeat may claim; anything beyond is refused as malformed.
pub const MAX_SHARDS: u16 = 1024;
const MAX_LABELS: usize = 32;
const MAX_LABEL_LEN: usize = 64;
const MAX_HOST_LEN: usize = 253;
const MAX_NIC_GBPS: f64 = 10_000.0;
const MIN_NIC_GBPS: f64 = 0.001;
/// At most this many relays are tracked; a registration beyond it is refused.
pub const MAX_RELAYS: usize = 16_384;

/// What a relay says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// Takes new rooms.
    Serving,
    /// Keeps its rooms until they end and takes nothing new.
    Draining,
}

/// Load of one shard, as reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardLoad {
    pub shard: u16,
    pub rooms: u32,
    pub participants: u32,
    pub rx_pps: f64,
    pub tx_pps: f64,
    pub rx_bps: f64,
    pub tx_bps: f64,
    /// Busy fraction of the shard's core, 0..=1, when the relay reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
}

/// `POST /v1/relays/heartbeat` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub relay_id: u32,
    pub host: String,
    pub udp_base_port: u16,
    pub shards: u16,
    pub nic_gbps: f64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub state: RelayState,
    #[serde(default)]
    pub load: Vec<ShardLoad>,
    /// TCP port of the relay's chat listener, once relays have one.
    #[serde(default)]
    pub chat_port: Option<u16>,
    /// TCP port of the relay's links to the other relays of the cluster.
    #[serde(default)]
    pub link_port: Option<u16>,
}

/// Why a heartbeat was refused. All are the relay's fault.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum HeartbeatError {
    /// A field is out of range; the string names it.
    Invalid(&'static str),
    /// The membership table is full.
    TooManyRelays,
}

impl Heartbeat {
    /// Checks every field against its bounds.
    pub fn validate(&self) -> Result<(), HeartbeatError> {
        use HeartbeatError::Invalid;
        let ok_host = !self.host.is_empty()
            && self.host.len() <= MAX_HOST_LEN
            && self
                .host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            // Clients are sent to this host: a wildcard address reaches nobody.
            && !["0.0.0.0", "::", "[::]"].contains(&self.host.as_str());
        let last_port = u32::from(self.udp_base_port) + u32::from(self.shards);
        let checks = [
            (self.relay_id != 0, "relay_id must be nonzero"),
            (ok_host, "host must be a host name or IP address"),
            (self.udp_base_port != 0, "udp_base_port must be nonzero"),
            (
                (1..=MAX_SHARDS).contains(&self.shards),
                "shards out of range",
            ),
            (last_port <= 65_536, "udp_base_port + shards exceeds 65535"),
            (
                (MIN_NIC_GBPS..=MAX_NIC_GBPS).contains(&self.nic_gbps),
                "nic_gbps out of range",
            ),
            (self.labels_ok(), "too many or too long labels"),
            (self.chat_port != Some(0), "chat_port must be nonzero"),
            (
                self.load.len() <= usize::from(self.shards),
                "too many load entries",
            ),
        ];
        for (ok, why) in checks {
            if !ok {
                return Err(Invalid(why));
            }
        }
        self.load.iter().try_for_each(|l| self.check_load(l))
    }

    fn labels_ok(&self) -> bool {
        self.labels.len() <= MAX_LABELS
            && self
                .labels
                .iter()
                .all(|(k, v)| !k.is_empty() && k.len() <= MAX_LABEL_LEN && v.len() <= MAX_LABEL_LEN)
    }

    fn check_load(&self, l: &ShardLoad) -> Result<(), HeartbeatError> {
        let rates = [l.rx_pps, l.tx_pps, l.rx_bps, l.tx_bps];
        if l.shard >= self.shards {
            return Err(HeartbeatError::Invalid(
                "load names a shard the relay lacks",
            ));
        }
        if !rates.iter().all(|r| r.is_finite() && *r >= 0.0) {
            return Err(HeartbeatError::Invalid(
                "load rates must be finite and >= 0",
            ));
        }
        match l.cpu {
            Some(c) if !(0.0..=1.0).contains(&c) => {
                Err(HeartbeatError::Invalid("cpu not in 0..=1"))
            }
            _ => Ok(()),
        }
    }
}

/// One relay as ctl knows it.
#[derive(Clone, Debug)]
pub struct Relay {
    pub id: u32,
    pub host: String,
    pub udp_base_port: u16,
    pub shards: u16,
    pub nic_gbps: f64,
    pub labels: BTreeMap<String, String>,
    pub chat_port: Option<u16>,
    pub link_port: Option<u16>,
    /// The state the relay last reported.
    pub reported: RelayState,
    /// An operator asked ctl to drain it (takes effect at once, before the relay confirms).
    pub drain_requested: bool,
    pub last_seen: Instant,
    /// Set by [`Membership::poll_deaths`] once the relay has been silent for `dead_after`.
    pub dead: bool,
    /// Per shard, indexed by shard. (The placements ctl made since this report are counted by
    /// the placer, which corrects stale reports with them.)
    pub load: Vec<ShardLoad>,
}

/// A relay's state for display and for placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    Serving,
    Draining,
    Dead,
}

impl Relay {
    fn from_heartbeat(hb: Heartbeat, now: Instant) -> Self {
        let mut relay = Self {
            id: hb.relay_id,
            host: String::new(),
            udp_base_port: 0,
            shards: 0,
            nic_gbps: 0.0,
            labels: BTreeMap::new(),
            chat_port: None,
            link_port: None,
            reported: hb.state,
            drain_requested: false,
            last_seen: now,
            dead: false,
            load: Vec::new(),
        };
        relay.update(hb, now);
        relay
    }

    fn update(&mut self, hb: Heartbeat, now: Instant) {
        self.load = (0..hb.shards)
            .map(|shard| ShardLoad {
                shard,
                ..ShardLoad::default()
            })
            .collect();
        for l in hb.load {
            let idx = usize::from(l.shard);
            self.load[idx] = l;
        }
        self.host = hb.host;
        self.udp_base_port = hb.udp_base_port;
        self.shards = hb.shards;
        self.nic_gbps = hb.nic_gbps;
        self.labels = hb.labels;
        self.chat_port = hb.chat_port;
        self.link_port = hb.link_port;
        self.reported = hb.state;
        self.last_seen = now;
        self.dead = false;
    }

    /// Serving, draining (by its own word or an operator's) or dead.
    pub fn liveness(&self) -> Liveness {
        if self.dead {
            Liveness::Dead
        } else if self.reported == RelayState::Draining || self.drain_requested {
            Liveness::Draining
        } else {
            Liveness::Serving
        }
    }

    /// Whether new rooms and users may be placed here.
    pub fn takes_new(&self) -> bool {
        self.liveness() == Liveness::Serving
    }

    /// Whether rooms already placed here stay.
    pub fn keeps_existing(&self) -> bool {
        self.liveness() != Liveness::Dead
    }

    /// Reported rooms on `shard`.
    pub fn shard_rooms(&self, shard: u16) -> u32 {
        self.load.get(usize::from(shard)).map_or(0, |l| l.rooms)
    }
}

/// What a heartbeat changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// First heartbeat from this relay id.
    Registered,
    /// A relay that was dead came back.
    Revived,
    /// A live relay refreshed its entry.
    Refreshed,
}

/// The longest ctl is expected to go between two looks at the table (two ticks). Beyond it,
/// the rest of the gap does not count as any relay's silence.
pub const POLL_GAP: Duration = Duration::from_millis(500);

/// The membership table.
#[derive(Debug)]
pub struct Membership {
    relays: BTreeMap<u32, Relay>,
    dead_after: Duration,
    forget_after: Duration,
    /// When [`Membership::poll_deaths`] last looked.
    last_poll: Option<Instant>,
}

impl Membership {
    pub fn new(dead_after: Duration, forget_after: Duration) -> Self {
        Self {
            relays: BTreeMap::new(),
            dead_after,
            forget_after,
            last_poll: None,
        }
    }

    /// Applies a heartbeat.
    pub fn handle_heartbeat(
        &mut self,
        now: Instant,
        hb: Heartbeat,
    ) -> Result<HeartbeatOutcome, HeartbeatError> {
        hb.validate()?;
        if let Some(relay) = self.relays.get_mut(&hb.relay_id) {
            let was_dead = relay.dead;
            relay.update(hb, now);
            return Ok(if was_dead {
                HeartbeatOutcome::Revived
            } else {
                HeartbeatOutcome::Refreshed
            });
        }
        if self.relays.len() >= MAX_RELAYS {
            self.forget_old(now);
            if self.relays.len() >= MAX_RELAYS {
                return Err(HeartbeatError::TooManyRelays);
            }
        }
        self.relays
            .insert(hb.relay_id, Relay::from_heartbeat(hb, now));
        Ok(HeartbeatOutcome::Registered)
    }

    /// Marks relays silent for `dead_after` of ctl's running time as dead and returns the ids
    /// that died just now. Also forgets relays dead for `forget_after`.
    pub fn poll_deaths(&mut self, now: Instant) -> Vec<u32> {
        let gap = self
            .last_poll
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(last));
        self.last_poll = Some(self.last_poll.map_or(now, |last| last.max(now)));
        // ctl did not run for the part of the gap beyond POLL_GAP: not the relays' silence.
        let stalled = gap.saturating_sub(POLL_GAP);
        if !stalled.is_zero() {
            for relay in self.relays.values_mut().filter(|r| !r.dead) {
                relay.last_seen = (relay.last_seen + stalled).min(now);
            }
        }
        let mut died = Vec::new();
        for relay in self.relays.values_mut() {
            if !relay.dead && now.saturating_duration_since(relay.last_seen) >= self.dead_after {
                relay.dead = true;
                died.push(relay.id);
            }
        }
        self.forget_old(now);
        died
    }

    fn forget_old(&mut self, now: Instant) {
        let limit = self.dead_after + self.forget_after;
        self.relays
            .retain(|_, r| !r.dead || now.saturating_duration_since(r.last_seen) < limit);
    }

    /// Sets or clears the operator's drain flag; false if the relay is unknown.
    pub fn set_drain(&mut self, relay_id: u32, drain: bool) -> bool {
        match self.relays.get_mut(&relay_id) {
            Some(r) => {
                r.drain_requested = drain;
                true
            }
            None => false,
        }
    }

    pub fn get(&self, relay_id: u32) -> Option<&Relay> {
        self.relays.get(&relay_id)
    }

    /// Every known relay, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Relay> {
        self.relays.values()
    }

    /// Relays that take new placements, by id.
    pub fn serving(&self) -> impl Iterator<Item = &Relay> {
        self.relays.values().filter(|r| r.takes_new())
    }

    /// Number of relays not dead.
    pub fn n_alive(&self) -> usize {
        self.relays.values().filter(|r| !r.dead).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn hb(id: u32) -> Heartbeat {
        Heartbeat {
            relay_id: id,
            host: "127.0.0.1".into(),
            udp_base_port: 40_000,
            shards: 2,
            nic_gbps: 25.0,
            labels: BTreeMap::from([("region".into(), "local".into())]),
            state: RelayState::Serving,
            load: vec![ShardLoad {
                shard: 1,
                rooms: 3,
                ..ShardLoad::default()
            }],
            chat_port: None,
            link_port: None,
        }
    }

    fn table() -> Membership {
        Membership::new(Duration::from_secs(3), Duration::from_secs(60))
    }

    /// Polls every 250 ms, as ctl's ticker does, from `from` to `to` (both included); returns
    /// the deaths in order.
    fn poll_every_tick(m: &mut Membership, from: Instant, to: Instant) -> Vec<(u32, Duration)> {
        let mut died = Vec::new();
        let mut t = from;
        while t <= to {
            died.extend(m.poll_deaths(t).into_iter().map(|id| (id, t - from)));
            t += Duration::from_millis(250);
        }
        died
    }

    #[test]
    fn registers_refreshes_dies_and_revives() {
        let t0 = Instant::now();
        let mut m = table();
        assert_eq!(
            m.handle_heartbeat(t0, hb(7)),
            Ok(HeartbeatOutcome::Registered)
        );
        let s = Duration::from_secs(1);
        assert_eq!(
            m.handle_heartbeat(t0 + s, hb(7)),
            Ok(HeartbeatOutcome::Refreshed)
        );
        assert!(
            poll_every_tick(&mut m, t0 + s, t0 + 3 * s).is_empty(),
            "2 s of silence is not death"
        );
        let died = poll_every_tick(&mut m, t0 + 3 * s + s / 4, t0 + 5 * s);
        assert_eq!(
            died,
            vec![(7, s * 3 / 4)],
            "dead at 3 s of silence, reported once"
        );
        assert_eq!(m.get(7).unwrap().liveness(), Liveness::Dead);
        assert_eq!(
            m.handle_heartbeat(t0 + 6 * s, hb(7)),
            Ok(HeartbeatOutcome::Revived)
        );
        assert!(m.get(7).unwrap().takes_new());
        poll_every_tick(&mut m, t0 + 6 * s, t0 + 100 * s);
        assert!(m.get(7).is_none(), "forgotten after forget_after");
    }

    /// ctl stopped for 4.5 s (SIGSTOP, a VM migration): the relays' heartbeats waited for it,
    /// so the pause is not their silence. Without them afterwards, a relay dies 3 s of ctl's
    /// running time after its last one; one that died during the pause is seen that much later.
    #[test]
    fn a_pause_of_ctl_is_not_silence_of_the_relays() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut m = table();
        m.handle_heartbeat(t0, hb(7)).unwrap();
        assert!(poll_every_tick(&mut m, t0, t0 + s).is_empty());
        // ctl does not run from t0 + 1 s to t0 + 5.5 s; the next look is at t0 + 5.5 s.
        let resume = t0 + s * 11 / 2;
        assert!(
            m.poll_deaths(resume).is_empty(),
            "5.5 s since the last heartbeat, but ctl ran for 1.5 s of it"
        );
        m.handle_heartbeat(resume + s / 10, hb(7)).unwrap();
        assert!(poll_every_tick(&mut m, resume, resume + 2 * s).is_empty());
        // Then silence while ctl runs: dead after 3 s of it, as ever.
        let died = poll_every_tick(&mut m, resume + 2 * s, resume + 5 * s);
        assert_eq!(died.len(), 1);
        assert!(
            (s * 11 / 10..=s * 13 / 10).contains(&died[0].1),
            "dead 3 s after the heartbeat at resume + 0.1 s: {died:?}"
        );
    }

    #[test]
    fn draining_takes_nothing_new_but_keeps_rooms() {
        let t0 = Instant::now();
        let mut m = table();
        let mut h = hb(1);
        h.state = RelayState::Draining;
        m.handle_heartbeat(t0, h).unwrap();
        m.handle_heartbeat(t0, hb(2)).unwrap();
        assert_eq!(m.serving().map(|r| r.id).collect::<Vec<_>>(), vec![2]);
        assert!(m.get(1).unwrap().keeps_existing());
        assert!(m.set_drain(2, true));
        assert_eq!(m.serving().count(), 0);
        assert!(!m.set_drain(3, true));
    }

    #[test]
    fn load_report_replaces_the_previous_one() {
        let t0 = Instant::now();
        let mut m = table();
        m.handle_heartbeat(t0, hb(1)).unwrap();
        assert_eq!(m.get(1).unwrap().shard_rooms(1), 3);
        let mut h = hb(1);
        h.load.clear();
        m.handle_heartbeat(t0, h).unwrap();
        assert_eq!(
            m.get(1).unwrap().shard_rooms(1),
            0,
            "absent entries are zero"
        );
    }

    #[test]
    fn refuses_out_of_range_heartbeats() {
        let bad: [fn(&mut Heartbeat); 9] = [
            |h| h.relay_id = 0,
            |h| h.host = "0.0.0.0".into(),
            |h| h.host = String::new(),
            |h| h.host = "a b".into(),
            |h| h.shards = 0,
            |h| h.udp_base_port = 65_535,
            |h| h.nic_gbps = f64::NAN,
            |h| h.load[0].shard = 2,
            |h| h.load[0].rx_pps = -1.0,
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut h = hb(1);
            f(&mut h);
            assert!(
                matches!(h.validate(), Err(HeartbeatError::Invalid(_))),
                "case {i}"
            );
        }
        assert_eq!(hb(1).validate(), Ok(()));
    }
}
