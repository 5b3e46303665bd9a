//! `/metrics`: Prometheus text exposition format 0.0.4, written by hand (a dozen series do
//! not need a metrics crate).
#![forbid(unsafe_code)]

use crate::core::{Core, Now, Scope};
use crate::membership::Liveness;
use std::fmt::Write;

/// The whole exposition.
pub fn render(core: &Core, now: &Now) -> String {
    let mut out = String::new();
    let s = &core.stats;
    let counters: [(&str, &str, u64); 14] = [
        (
            "ctl_heartbeats_total",
            "Relay heartbeats accepted.",
            s.heartbeats,
        ),
        (
            "ctl_relay_registrations_total",
            "Relays registered or revived.",
            s.registrations,
        ),
        (
            "ctl_relay_deaths_total",
            "Relays declared dead after missed heartbeats.",
            s.relay_deaths,
        ),
        (
            "ctl_meetings_created_total",
            "Meetings created.",
            s.meetings_created,
        ),
        (
            "ctl_meetings_ended_total",
            "Meetings ended by their host.",
            s.meetings_ended,
        ),
        ("ctl_joins_total", "Successful joins.", s.joins),
        ("ctl_leaves_total", "Participants that left.", s.leaves),
        (
            "ctl_removals_total",
            "Participants removed by a host.",
            s.removals,
        ),
        (
            "ctl_placements_total",
            "New placements made (rooms and users).",
            s.placements,
        ),
        (
            "ctl_placement_moves_total",
            "Placements moved off a dead or shrunken relay.",
            s.moves,
        ),
        (
            "ctl_commands_queued_total",
            "Commands queued for relays.",
            s.commands_queued,
        ),
        (
            "ctl_commands_delivered_total",
            "Commands handed to relays' polls.",
            s.commands_delivered,
        ),
        (
            "ctl_journal_errors_total",
            "Journal writes or compactions that failed.",
            s.journal_errors,
        ),
        (
            "ctl_journal_compactions_total",
            "Journal compactions.",
            s.compactions,
        ),
    ];
    for (name, help, value) in counters {
        series(&mut out, name, help, "counter", &[("", value as f64)]);
    }
    let q = core.queues();
    series(
        &mut out,
        "ctl_commands_dropped_total",
        "Commands dropped (queue overflow, relay died).",
        "counter",
        &[("", q.n_dropped() as f64)],
    );
    series(
        &mut out,
        "ctl_commands_queued",
        "Commands waiting for relays.",
        "gauge",
        &[("", q.n_queued() as f64)],
    );
    series(
        &mut out,
        "ctl_meetings",
        "Meetings in existence.",
        "gauge",
        &[("", core.meetings().len() as f64)],
    );
    let participants: usize = core.meetings().iter().map(|m| m.participants.len()).sum();
    series(
        &mut out,
        "ctl_participants",
        "Participants over all meetings.",
        "gauge",
        &[("", participants as f64)],
    );
    let placed = |scope| core.placements().filter(|p| p.scope == scope).count() as f64;
    series(
        &mut out,
        "ctl_placements",
        "Sticky placements on record.",
        "gauge",
        &[
            ("{scope=\"room\"}", placed(Scope::Room)),
            ("{scope=\"user\"}", placed(Scope::User)),
        ],
    );
    let by_state = |st| core.members().iter().filter(|r| r.liveness() == st).count() as f64;
    let states = [
        ("{state=\"serving\"}", by_state(Liveness::Serving)),
        ("{state=\"draining\"}", by_state(Liveness::Draining)),
        ("{state=\"dead\"}", by_state(Liveness::Dead)),
    ];
    series(
        &mut out,
        "ctl_relays",
        "Known relays by state.",
        "gauge",
        &states,
    );
    series(
        &mut out,
        "ctl_relearning",
        "1 while membership is re-learned after start.",
        "gauge",
        &[("", f64::from(u8::from(core.in_grace(now))))],
    );
    relay_series(&mut out, core);
    out
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
    series(
        out,
        "ctl_relay_shard_rooms",
        "Rooms per relay shard, as reported.",
        "gauge",
        &as_refs(&rooms),
    );
    series(
        out,
        "ctl_relay_shard_participants",
        "Participants per relay shard, as reported.",
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
