//! An SVG picture of a run, written beside the JSON: per scenario, one panel of horizontal bars
//! per headline metric (the median over runs of each contender), so the ratios between the
//! relay's backends and the two baselines show at a glance. Plain SVG text, no dependency.

use crate::harness::{ContenderRun, Outcome, Scenario, Status};
use std::fmt::Write as _;

/// (measurement label, value key, panel title, unit, lower is better).
const PANELS: [(&str, &str, &str, &str, bool); 4] = [
    ("max", "egress_pps", "zero-loss egress", "packets/s", false),
    ("max", "cpu_ns_per_pkt", "CPU per egress packet", "ns", true),
    ("half", "p99_us", "p99 latency at half load", "us", true),
    (
        "load",
        "cpu_ns_per_pkt",
        "CPU per egress packet",
        "ns",
        true,
    ),
];

const BAR_H: usize = 18;
const LABEL_W: usize = 110;
const BAR_W: usize = 360;
const PANEL_W: usize = LABEL_W + BAR_W + 120;

/// Egress packets per second of a measurement, or one of its named values.
fn value(run: &ContenderRun, label: &str, key: &str) -> Option<f64> {
    let m = run.measurements.iter().find(|m| m.label == label)?;
    if key == "egress_pps" {
        let d = m.get("delivered")?;
        let s = m.get("send_duration_s")?;
        return (s > 0.0).then_some(d / s);
    }
    m.get(key)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The panels of one scenario: (title, unit, lower is better, [(contender, median)]).
type Panel = (String, &'static str, bool, Vec<(&'static str, f64)>);

fn panels(scenario: Scenario, runs: &[ContenderRun]) -> Vec<Panel> {
    let mut kinds: Vec<_> = Vec::new();
    for r in runs {
        if !kinds.contains(&r.kind) {
            kinds.push(r.kind);
        }
    }
    let mut out = Vec::new();
    for (label, key, title, unit, lower) in PANELS {
        let bars: Vec<(&'static str, f64)> = kinds
            .iter()
            .filter_map(|&k| {
                let vals: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.kind == k && r.status == Status::Ran)
                    .filter_map(|r| value(r, label, key))
                    .collect();
                median(vals).map(|m| (k.name(), m))
            })
            .collect();
        if !bars.is_empty() {
            let title = format!("{}: {title} ({label})", scenario.name());
            out.push((title, unit, lower, bars));
        }
    }
    out
}

/// The whole picture; `caption` names the command that produced it.
pub fn chart(outcome: &Outcome, caption: &str) -> String {
    let all: Vec<Panel> = outcome
        .scenarios
        .iter()
        .flat_map(|(s, runs)| panels(*s, runs))
        .collect();
    let height: usize = 40
        + all
            .iter()
            .map(|p| 34 + p.3.len() * (BAR_H + 4))
            .sum::<usize>();
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL_W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r##"<text x="8" y="18" font-size="11" fill="#555">{}</text>"##,
        escape(caption)
    );
    let mut y = 40;
    for (title, unit, lower, bars) in &all {
        let better = if *lower {
            "lower is better"
        } else {
            "higher is better"
        };
        let _ = writeln!(
            svg,
            r#"<text x="8" y="{}" font-weight="bold">{} [{unit}, {better}]</text>"#,
            y + 14,
            escape(title)
        );
        y += 24;
        let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
        for (name, v) in bars {
            let w = ((v / max) * BAR_W as f64).round().max(1.0) as usize;
            let fill = if name.starts_with("relay") {
                "#2b6cb0"
            } else {
                "#a0aec0"
            };
            let _ = writeln!(
                svg,
                r##"<text x="8" y="{}">{name}</text><rect x="{LABEL_W}" y="{y}" width="{w}" height="{BAR_H}" fill="{fill}"/><text x="{}" y="{}">{}</text>"##,
                y + 13,
                LABEL_W + w + 6,
                y + 13,
                fmt(*v)
            );
            y += BAR_H + 4;
        }
        y += 10;
    }
    svg.push_str("</svg>\n");
    svg
}

fn fmt(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contender::Kind;
    use crate::harness::Measurement;

    fn run(kind: Kind, delivered: f64, p99: f64) -> ContenderRun {
        ContenderRun {
            kind,
            status: Status::Ran,
            ready_line: String::new(),
            search: Vec::new(),
            measurements: vec![
                Measurement {
                    label: "max",
                    values: vec![
                        ("delivered", Some(delivered)),
                        ("send_duration_s", Some(2.0)),
                    ],
                },
                Measurement {
                    label: "half",
                    values: vec![("p99_us", Some(p99))],
                },
            ],
        }
    }

    #[test]
    fn bars_are_medians_scaled_to_the_largest() {
        let runs = vec![
            run(Kind::Ideal, 1000.0, 10.0),
            run(Kind::RelayBatch, 800.0, 20.0),
            run(Kind::RelayBatch, 900.0, 30.0),
            run(Kind::RelayBatch, 100.0, 40.0),
        ];
        let p = panels(Scenario::Fanout, &runs);
        let egress = &p[0].3;
        assert_eq!(egress, &vec![("ideal", 500.0), ("relay/batch", 400.0)]);
        let p99 = &p.iter().find(|p| p.0.contains("p99")).unwrap().3;
        assert_eq!(p99, &vec![("ideal", 10.0), ("relay/batch", 30.0)]);
        let outcome = Outcome {
            scenarios: vec![(Scenario::Fanout, runs)],
            syscall_method: String::new(),
        };
        let svg = chart(&outcome, "perf run <test>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("perf run &lt;test&gt;"));
        // The largest bar spans the whole width.
        assert!(svg.contains(&format!(r#"width="{BAR_W}""#)));
    }
}
