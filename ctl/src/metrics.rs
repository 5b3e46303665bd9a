//! `/metrics`: Prometheus text exposition format 0.0.4, written by hand (a few dozen series do
//! not need a metrics crate).
#![forbid(unsafe_code)]

use crate::core::{Core, Now, Scope, Stats};
use crate::membership::Liveness;
use std::fmt::Write;

/// A counter: name, help text, and how to read it from [`Stats`].
type Counter = (&'static str, &'static str, fn(&Stats) -> u64);

/// Every counter in [`Stats`].
#[rustfmt::skip]
const COUNTERS: [Counter; 15] = [
    ("ctl_heartbeats_total", "Relay heartbeats accepted.", |s| s.heartbeats),
    ("ctl_relay_registrations_total", "Relays registered or revived.", |s| s.registrations),
    ("ctl_relay_deaths_total", "Relays declared dead after missed heartbeats.", |s| s.relay_deaths),
    ("ctl_meetings_created_total", "Meetings created.", |s| s.meetings_created),
    ("ctl_meetings_ended_total", "Meetings ended by their host.", |s| s.meetings_ended),
    ("ctl_meetings_expired_total", "Meetings ended for being idle.", |s| s.meetings_expired),
    ("ctl_joins_total", "Successful joins.", |s| s.joins),
    ("ctl_leaves_total", "Participants that left.", |s| s.leaves),
    ("ctl_removals_total", "Participants removed by a host.", |s| s.removals),
    ("ctl_placements_total", "New placements made (rooms and users).", |s| s.placements),
    ("ctl_placement_moves_total", "Placements moved off a dead or shrunken relay.", |s| s.moves),
    ("ctl_commands_queued_total", "Commands queued for relays.", |s| s.commands_queued),
    ("ctl_commands_delivered_total", "Commands handed to relays' polls.", |s| s.commands_delivered),
    ("ctl_journal_errors_total", "Journal writes or compactions that failed.", |s| s.journal_errors),
    ("ctl_journal_compactions_total", "Journal compactions.", |s| s.compactions),
];

/// The whole exposition.
pub fn render(core: &Core, now: &Now) -> String {
    let mut out = String::new();
    let o = &mut out;
    for (name, help, value) in COUNTERS {
        one(o, name, help, "counter", value(&core.stats) as f64);
    }
    let q = core.queues();
    let help = "Commands dropped (queue overflow, relay died).";
    one(
        o,
        "ctl_commands_dropped_total",
        help,
        "counter",
        q.n_dropped() as f64,
    );
    one(
        o,
        "ctl_commands_queued",
        "Commands waiting for relays.",
        "gauge",
        q.n_queued() as f64,
    );
    let meetings = core.meetings();
    one(
        o,
        "ctl_meetings",
        "Meetings in existence.",
        "gauge",
        meetings.len() as f64,
    );
    let n: usize = meetings.iter().map(|m| m.participants.len()).sum();
    one(
        o,
        "ctl_participants",
        "Participants over all meetings.",
        "gauge",
        n as f64,
    );
    let placed = |scope| core.placements().filter(|p| p.scope == scope).count() as f64;
    let scopes = [
        ("{scope=\"room\"}", placed(Scope::Room)),
        ("{scope=\"user\"}", placed(Scope::User)),
    ];
    series(
        o,
        "ctl_placements",
        "Sticky placements on record.",
        "gauge",
        &scopes,
    );
    let by_state = |st| core.members().iter().filter(|r| r.liveness() == st).count() as f64;
    let states = [
        ("{state=\"serving\"}", by_state(Liveness::Serving)),
        ("{state=\"draining\"}", by_state(Liveness::Draining)),
        ("{state=\"dead\"}", by_state(Liveness::Dead)),
    ];
    series(o, "ctl_relays", "Known relays by state.", "gauge", &states);
    let help = "1 while membership is re-learned after a start.";
    one(
        o,
        "ctl_relearning",
        help,
        "gauge",
        f64::from(u8::from(core.in_grace(now))),
    );
    relay_series(o, core);
    out
}

/// A series with one unlabelled sample.
fn one(out: &mut String, name: &str, help: &str, kind: &str, value: f64) {
    series(out, name, help, kind, &[("", value)]);
}

fn relay_series(out: &mut String, core: &Core) {
    let mut rooms = Vec::new();
    let mut participants = Vec::new();
    for r in core.members().iter() {
        for l in &r.load {
            let labels = format!("{{relay=\"{}\",shard=\"{}\"}}", r.id, l.shard);
            rooms.push((labels.clone(), f64::from(l.rooms)));
            participants.push((labels, f64::from(l.participants)));
        }
    }
    let help = "Rooms per relay shard, as reported.";
    series(
        out,
        "ctl_relay_shard_rooms",
        help,
        "gauge",
        &as_refs(&rooms),
    );
    let help = "Participants per relay shard, as reported.";
    series(
        out,
        "ctl_relay_shard_participants",
        help,
        "gauge",
        &as_refs(&participants),
    );
}

fn as_refs(v: &[(String, f64)]) -> Vec<(&str, f64)> {
    v.iter().map(|(l, x)| (l.as_str(), *x)).collect()
}

fn series(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(&str, f64)]) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_line_follows_its_help_and_type() {
        let dir = std::env::temp_dir().join(format!("ctl-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let cfg = crate::config::Config::default();
        let core = Core::open(cfg, key, &dir, Now::system()).unwrap();
        let text = render(&core, &Now::system());
        std::fs::remove_dir_all(&dir).unwrap();
        let mut typed = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{line}: no # TYPE before it");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        assert!(text.contains("ctl_relays{state=\"serving\"} 0"));
    }
}
