//! Markdown tables (medians over runs) and the JSON results file.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use crate::contender::Kind;
use crate::harness::{Config, ContenderRun, Outcome, Scenario, Status};
use crate::json::Json;
use crate::stats::median;

/// Medians of one contender's runs.
struct Summary {
    kind: Kind,
    /// `ok`, or why not.
    status: String,
    ran: usize,
    runs: Vec<ContenderRun>,
}

impl Summary {
    fn new(kind: Kind, all: &[ContenderRun]) -> Self {
        let runs: Vec<ContenderRun> = all.iter().filter(|r| r.kind == kind).cloned().collect();
        let ran = runs.iter().filter(|r| r.status == Status::Ran).count();
        let status = runs
            .iter()
            .find_map(|r| match &r.status {
                Status::Ran => None,
                Status::Unavailable(w) => Some(format!("unavailable ({w})")),
                Status::Failed(w) => Some(format!("failed ({w})")),
            })
            .unwrap_or_else(|| "ok".into());
        Self {
            kind,
            status,
            ran,
            runs,
        }
    }

    /// User-space ns per packet at `label`: from perf's user-mode samples in the companion
    /// `<label>_sampled` step, or else from the kernel's utime ticks.
    fn user_ns(&self, label: &str) -> Option<f64> {
        self.median(&format!("{label}_sampled"), "user_ns_per_pkt_sampled")
            .or_else(|| self.median(label, "user_ns_per_pkt_ticks"))
    }

    /// System ns per packet at `label`: the exact CPU total less the user share.
    fn sys_ns(&self, label: &str) -> Option<f64> {
        Some(self.median(label, "cpu_ns_per_pkt")? - self.user_ns(label)?)
    }

    /// In how many runs the value `key` of measurement `label` was 1 (a flag).
    fn count(&self, label: &str, key: &str) -> usize {
        self.runs
            .iter()
            .flat_map(|r| &r.measurements)
            .filter(|m| m.label == label && m.get(key) == Some(1.0))
            .count()
    }

    /// Median over runs of value `key` of the measurement labelled `label`.
    fn median(&self, label: &str, key: &str) -> Option<f64> {
        let vals = self
            .runs
            .iter()
            .filter(|r| r.status == Status::Ran)
            .flat_map(|r| r.measurements.iter())
            .filter(|m| m.label == label)
            .filter_map(|m| m.get(key));
        median(vals)
    }
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

/// Table cells must not contain the column separator or line breaks.
fn clean(s: &str) -> String {
    s.replace('|', "/").replace('\n', " ")
}

/// The markdown table of one scenario, with the target ratios under it.
pub fn scenario_markdown(sc: Scenario, order: &[Kind], runs: &[ContenderRun]) -> String {
    let sums: Vec<Summary> = order.iter().map(|&k| Summary::new(k, runs)).collect();
    let mut out = String::new();
    match sc {
        Scenario::Fanout => fanout_table(&mut out, &sums),
        Scenario::Rooms => rooms_table(&mut out, &sums),
    }
    targets(&mut out, sc, &sums);
    out
}

fn fanout_table(out: &mut String, sums: &[Summary]) {
    out.push_str("\n### fanout: 1 publisher -> 10 subscribers, 1200 B (medians)\n\n");
    out.push_str("| contender | status | runs | confirmed | zero-loss pub pps | egress pps | loss | dup | reord | user ns/pkt | sys ns/pkt | cpu ns/pkt | syscalls/pkt | p50 us @half | p99 us @half | p99.9 us @half |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in sums {
        const LABEL: &str = "max";
        let m = |k| s.median(LABEL, k);
        let h = |k| s.median("half", k);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.kind.name(),
            clean(&s.status),
            s.ran,
            s.count("max", "zero_loss_confirmed"),
            cell(m("rate_pps_per_publisher"), 0),
            cell(m("egress_pps"), 0),
            cell(m("lost"), 0),
            cell(m("duplicates"), 0),
            cell(m("reordered"), 0),
            cell(s.user_ns(LABEL), 0),
            cell(s.sys_ns(LABEL), 0),
            cell(m("cpu_ns_per_pkt"), 0),
            cell(m("syscalls_per_pkt"), 4),
            cell(h("p50_us"), 1),
            cell(h("p99_us"), 1),
            cell(h("p999_us"), 1),
        );
    }
    out.push_str(
        "\nconfirmed: runs whose measured step at the searched rate (or 5% steps below it) lost \
         nothing. egress, loss, CPU and syscalls at that rate; latency at half of the ideal \
         forwarder's. Each column is a median over runs on its own.\n",
    );
}

fn rooms_table(out: &mut String, sums: &[Summary]) {
    out.push_str("\n### rooms: rooms x 4, everyone publishes 160 B at 50 pps (medians)\n\n");
    out.push_str("| contender | status | runs | egress pps | loss | dup | reord | user ns/pkt | sys ns/pkt | cpu ns/pkt | syscalls/pkt | p50 us | p99 us | p99.9 us |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in sums {
        const LABEL: &str = "load";
        let m = |k| s.median(LABEL, k);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.kind.name(),
            clean(&s.status),
            s.ran,
            cell(m("egress_pps"), 0),
            cell(m("lost"), 0),
            cell(m("duplicates"), 0),
            cell(m("reordered"), 0),
            cell(s.user_ns(LABEL), 0),
            cell(s.sys_ns(LABEL), 0),
            cell(m("cpu_ns_per_pkt"), 0),
            cell(m("syscalls_per_pkt"), 4),
            cell(m("p50_us"), 1),
            cell(m("p99_us"), 1),
            cell(m("p999_us"), 1),
        );
    }
}

/// The targets, as ratios of medians taken in this same invocation.
fn targets(out: &mut String, sc: Scenario, sums: &[Summary]) {
    let find = |k: Kind| sums.iter().find(|s| s.kind == k && s.ran > 0);
    let (ideal, tokio) = (find(Kind::Ideal), find(Kind::Tokio));
    let label = if sc == Scenario::Fanout {
        "max"
    } else {
        "load"
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?).filter(|r| r.is_finite());
    let mut lines = Vec::new();
    for relay in [Kind::RelayUring, Kind::RelayBatch]
        .into_iter()
        .filter_map(find)
    {
        let r = |k| relay.median(label, k);
        let mut parts = Vec::new();
        if sc == Scenario::Fanout {
            let e = ratio(
                r("egress_pps"),
                ideal.and_then(|i| i.median("max", "egress_pps")),
            );
            parts.push(format!("egress {}x ideal (target >= 0.95)", cell(e, 2)));
            let p = ratio(
                relay.median("half", "p99_us"),
                ideal.and_then(|i| i.median("half", "p99_us")),
            );
            parts.push(format!("p99@half {}x ideal (<= 1.2)", cell(p, 2)));
        }
        let u = ratio(relay.user_ns(label), tokio.and_then(|t| t.user_ns(label)));
        parts.push(format!("user CPU/pkt {}x tokio (<= 0.5)", cell(u, 2)));
        parts.push(format!(
            "syscalls/pkt {} (<= 0.0625)",
            cell(r("syscalls_per_pkt"), 4)
        ));
        lines.push(format!("- {}: {}", relay.kind.name(), parts.join("; ")));
    }
    if !lines.is_empty() {
        out.push_str("\nTargets (same invocation):\n");
        out.push_str(&lines.join("\n"));
        out.push('\n');
    }
}

fn run_json(r: &ContenderRun) -> Json {
    let (status, reason) = match &r.status {
        Status::Ran => ("ran", String::new()),
        Status::Unavailable(w) => ("unavailable", w.clone()),
        Status::Failed(w) => ("failed", w.clone()),
    };
    let search = r.search.iter().map(|&(pps, clean, lost)| {
        Json::obj([
            ("rate_pps_per_publisher", Json::Num(pps as f64)),
            ("clean", Json::Bool(clean)),
            ("lost", Json::Num(lost as f64)),
        ])
    });
    let measurements = r.measurements.iter().map(|m| {
        let mut fields = vec![("label".to_string(), Json::str(m.label))];
        fields.extend(m.values.iter().map(|(k, v)| (k.to_string(), Json::opt(*v))));
        Json::Obj(fields)
    });
    Json::obj([
        ("contender", Json::str(r.kind.name())),
        ("status", Json::str(status)),
        ("reason", Json::str(reason)),
        ("ready_line", Json::str(r.ready_line.clone())),
        ("search", Json::Arr(search.collect())),
        ("measurements", Json::Arr(measurements.collect())),
    ])
}

fn medians_json(s: &Summary) -> Json {
    let mut labels: Vec<&'static str> = Vec::new();
    for m in s.runs.iter().flat_map(|r| &r.measurements) {
        if !labels.contains(&m.label) {
            labels.push(m.label);
        }
    }
    let per_label = labels.into_iter().map(|label| {
        let keys = s
            .runs
            .iter()
            .flat_map(|r| &r.measurements)
            .find(|m| m.label == label)
            .map(|m| m.values.iter().map(|(k, _)| *k).collect::<Vec<_>>())
            .unwrap_or_default();
        let fields = keys.into_iter().map(|k| (k, Json::opt(s.median(label, k))));
        (label, Json::obj(fields))
    });
    Json::obj(per_label)
}

/// The whole results file.
pub fn results_json(cfg: &Config, outcome: &Outcome, machine: Json, command: &str) -> Json {
    let scenarios = outcome.scenarios.iter().map(|(sc, runs)| {
        let contenders = cfg.contenders.iter().map(|&k| {
            let s = Summary::new(k, runs);
            Json::obj([
                ("contender", Json::str(k.name())),
                ("status", Json::str(s.status.clone())),
                ("runs_measured", Json::Num(s.ran as f64)),
                ("median", medians_json(&s)),
            ])
        });
        Json::obj([
            ("scenario", Json::str(sc.name())),
            ("summary", Json::Arr(contenders.collect())),
            ("runs", Json::Arr(runs.iter().map(run_json).collect())),
        ])
    });
    Json::obj([
        ("command", Json::str(command)),
        ("quick", Json::Bool(cfg.quick)),
        ("runs", Json::Num(cfg.runs as f64)),
        ("relay_shards", Json::Num(f64::from(cfg.relay_shards))),
        ("priority", Json::str(cfg.priority.name())),
        (
            "cores",
            cfg.cores.map_or(Json::Null, |(l, c)| {
                Json::obj([
                    ("loadgen", Json::Num(l as f64)),
                    ("contender", Json::Num(c as f64)),
                ])
            }),
        ),
        ("syscall_method", Json::str(outcome.syscall_method.clone())),
        (
            "cpu_method",
            Json::str(
                "cpu_ns: sum of /proc/<pid>/task/*/schedstat run time (exact); user/sys: that \
                 total split by perf record cpu-clock:u/cpu-clock:k samples at 4 kHz, or \
                 /proc/<pid>/stat utime/stime ticks without perf (*_ticks always recorded)",
            ),
        ),
        ("machine", machine),
        ("scenarios", Json::Arr(scenarios.collect())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::Measurement;

    fn run(kind: Kind, status: Status, egress: f64, user: f64) -> ContenderRun {
        ContenderRun {
            kind,
            status,
            ready_line: String::new(),
            search: Vec::new(),
            measurements: vec![Measurement {
                label: "load",
                values: vec![
                    ("egress_pps", Some(egress)),
                    ("user_ns_per_pkt_ticks", Some(user)),
                    ("syscalls_per_pkt", None),
                ],
            }],
        }
    }

    #[test]
    fn rooms_table_shows_medians_status_and_ratios() {
        let runs = vec![
            run(Kind::RelayBatch, Status::Ran, 100.0, 10.0),
            run(Kind::Tokio, Status::Ran, 90.0, 40.0),
            run(Kind::RelayBatch, Status::Ran, 300.0, 30.0),
            run(Kind::Tokio, Status::Ran, 110.0, 40.0),
            run(
                Kind::RelayUring,
                Status::Unavailable("no | uring".into()),
                0.0,
                0.0,
            ),
        ];
        let order = [Kind::RelayUring, Kind::RelayBatch, Kind::Tokio];
        let md = scenario_markdown(Scenario::Rooms, &order, &runs);
        assert!(md.contains("| relay/batch | ok | 2 | 200 |"), "{md}");
        assert!(md.contains("| tokio | ok | 2 | 100 |"), "{md}");
        assert!(
            md.contains("| relay/uring | unavailable (no / uring) | 0 | - |"),
            "{md}"
        );
        assert!(md.contains("relay/batch: user CPU/pkt 0.50x tokio"), "{md}");
        assert!(!md.contains("relay/uring: user"), "{md}");
    }
}
