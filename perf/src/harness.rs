//! `perf run`: every contender in the same invocation, each as its own child process pinned to
//! one core, against the same load generator pinned to the other. For each contender and
//! scenario it records egress rate, loss, duplicates, reordering, one-way latency, CPU time per
//! egress packet (from /proc) and system calls per egress packet (from perf's tracepoint
//! counter, outside the contender).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;

use crate::contender::{self, Kind, Launch, Running};
use crate::loadgen::{self, Participant, StepOutcome, StepPlan};
use crate::perfctl::{Perf, Probe, Reading};
use crate::search::RateSearch;
use crate::topology::{write_rooms_file, Topology};

/// Which workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// 1 publisher -> 10 subscribers, 1200-byte packets, highest zero-loss rate.
    Fanout,
    /// 50 rooms x 4 participants, 160-byte packets at 50 packets/s each.
    Rooms,
}

impl Scenario {
    /// Name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Rooms => "rooms",
        }
    }
}

/// What `perf run` was asked to do.
#[derive(Clone, Debug)]
pub struct Config {
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Tiny scale for CI.
    pub quick: bool,
    /// Repetitions of every (scenario, contender); tables show medians.
    pub runs: usize,
    /// Where the JSON goes.
    pub out: PathBuf,
    /// The relay binary.
    pub relay_bin: PathBuf,
    /// Shards the relay runs with.
    pub relay_shards: u16,
    /// Contenders, in the order they run.
    pub contenders: Vec<Kind>,
    /// (load-generator CPU, contender CPU), or `None` to leave placement to the scheduler.
    pub cores: Option<(usize, usize)>,
    /// Scheduling of the harness and, by inheritance, of the contenders.
    pub priority: Priority,
}

/// How the measured processes are protected from other work on a shared machine, which would
/// otherwise preempt them for whole time slices and show up as milliseconds of latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// SCHED_FIFO priority 10: wakes ahead of any normal task.
    Realtime,
    /// Nice -10: a larger share under the fair scheduler, no guarantee on wakeup.
    Nice,
    /// Leave scheduling alone.
    Unchanged,
}

impl Priority {
    /// Name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Realtime => "rt",
            Priority::Nice => "nice",
            Priority::Unchanged => "none",
        }
    }

    /// Applies it to the calling thread (and so to everything started afterwards).
    fn apply(self) {
        let result = match self {
            Priority::Realtime => crate::sys::set_fifo(10),
            Priority::Nice => crate::sys::set_nice(-10),
            Priority::Unchanged => Ok(()),
        };
        if let Err(e) = result {
            eprintln!("cannot apply --priority {}: {e}", self.name());
        }
    }
}

/// Sizes and durations of the workloads.
#[derive(Clone, Debug)]
struct Scale {
    fanout_subscribers: usize,
    fanout_packet_len: usize,
    /// Publisher rates of the search; 0 steps means "measure at `search_start_pps`".
    search_start_pps: u64,
    search_max_pps: u64,
    search_steps: usize,
    search_step: Duration,
    measure: Duration,
    /// Measured attempts at (and 5% steps below) the search's best rate.
    confirm_attempts: usize,
    n_rooms: usize,
    room_size: usize,
    rooms_pps: f64,
    rooms_packet_len: usize,
    rooms_duration: Duration,
    warmup: Duration,
}

impl Scale {
    fn new(quick: bool) -> Self {
        let full = Self {
            fanout_subscribers: 10,
            fanout_packet_len: 1200,
            search_start_pps: 2_000,
            search_max_pps: 200_000,
            search_steps: 12,
            search_step: Duration::from_secs(2),
            measure: Duration::from_secs(5),
            confirm_attempts: 4,
            n_rooms: 50,
            room_size: 4,
            rooms_pps: 50.0,
            rooms_packet_len: 160,
            rooms_duration: Duration::from_secs(10),
            warmup: Duration::from_millis(300),
        };
        if !quick {
            return full;
        }
        Self {
            search_steps: 0,
            measure: Duration::from_millis(500),
            confirm_attempts: 1,
            n_rooms: 10,
            rooms_duration: Duration::from_secs(1),
            warmup: Duration::from_millis(100),
            ..full
        }
    }
}

/// One measured step: named values, `None` where not measurable.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// `max`, `half` (fanout) or `load` (rooms).
    pub label: &'static str,
    /// Named values in a fixed order.
    pub values: Vec<(&'static str, Option<f64>)>,
}

impl Measurement {
    /// The value named `key`, if measured.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| *v)
    }
}

/// How a contender's run went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// It ran and was measured.
    Ran,
    /// It could not start (for example its I/O backend is not available here).
    Unavailable(String),
    /// It started but the run broke.
    Failed(String),
}

/// Everything recorded for one contender in one run of one scenario.
#[derive(Clone, Debug)]
pub struct ContenderRun {
    /// Which contender.
    pub kind: Kind,
    /// How it went.
    pub status: Status,
    /// The ready line it printed.
    pub ready_line: String,
    /// Rate-search steps: (publisher pps, clean, lost).
    pub search: Vec<(u64, bool, u64)>,
    /// Measured steps.
    pub measurements: Vec<Measurement>,
}

impl ContenderRun {
    fn new(kind: Kind, status: Status) -> Self {
        Self {
            kind,
            status,
            ready_line: String::new(),
            search: Vec::new(),
            measurements: Vec::new(),
        }
    }

    /// Whether it ran and every measurement delivered packets.
    pub fn delivered(&self) -> bool {
        self.status == Status::Ran
            && !self.measurements.is_empty()
            && self
                .measurements
                .iter()
                .all(|m| m.get("delivered") > Some(0.0))
    }
}

/// The results of a whole invocation.
pub struct Outcome {
    /// Per scenario, every contender run in order.
    pub scenarios: Vec<(Scenario, Vec<ContenderRun>)>,
    /// How system calls were counted, or why they were not.
    pub syscall_method: String,
}

/// An offered load: every publisher at `rate_pps` for `duration`.
#[derive(Clone, Copy, Debug)]
struct Load {
    rate_pps: f64,
    duration: Duration,
    packet_len: usize,
}

/// The running process being measured and its participants.
struct Ctx<'a> {
    pid: u32,
    /// UDP ports the contender receives on.
    contender_ports: std::ops::Range<u16>,
    metrics: Option<SocketAddr>,
    parts: &'a [Participant],
    topo: &'a Topology,
}

/// Runs every scenario for every contender `cfg.runs` times, interleaving contenders within
/// each run so that slow drift of the machine affects all of them alike.
pub fn run(cfg: &Config) -> anyhow::Result<Outcome> {
    let mut h = Harness::new(cfg)?;
    let mut scenarios = Vec::new();
    for &sc in &cfg.scenarios {
        let mut runs = Vec::new();
        let mut unavailable = Vec::new();
        for r in 0..cfg.runs {
            h.ideal_max_pps = None;
            for &kind in &cfg.contenders {
                if unavailable.contains(&kind) {
                    continue; // its reason is already recorded; starting it again wastes time
                }
                eprintln!("[{} run {}/{}] {}", sc.name(), r + 1, cfg.runs, kind.name());
                let cr = h.run_contender(kind, sc);
                if let Status::Unavailable(why) | Status::Failed(why) = &cr.status {
                    eprintln!("  {}: {why}", kind.name());
                }
                if matches!(cr.status, Status::Unavailable(_)) {
                    unavailable.push(kind);
                }
                runs.push(cr);
            }
        }
        print!(
            "{}",
            crate::report::scenario_markdown(sc, &cfg.contenders, &runs)
        );
        scenarios.push((sc, runs));
    }
    let _ = std::fs::remove_dir_all(&h.tmp);
    Ok(Outcome {
        scenarios,
        syscall_method: h.syscall_method(),
    })
}

struct Harness<'c> {
    cfg: &'c Config,
    scale: Scale,
    perf: Result<Perf, String>,
    key: SigningKey,
    public_key_hex: String,
    tmp: PathBuf,
    step_id: u32,
    /// The ideal forwarder's confirmed fanout rate in the current run.
    ideal_max_pps: Option<f64>,
    /// Private copies of the relay binary and of this one (which serves the baselines), so
    /// that a rebuild during the run (others work in the same tree) cannot mix versions.
    relay_bin: PathBuf,
    perf_bin: PathBuf,
}

impl<'c> Harness<'c> {
    fn new(cfg: &'c Config) -> anyhow::Result<Self> {
        cfg.priority.apply();
        if let Some((loadgen_cpu, _)) = cfg.cores {
            // Threads and children inherit this; contenders are moved to their own core.
            crate::sys::pin(0, loadgen_cpu)?;
        }
        let tmp = std::env::temp_dir().join(format!("perf-harness-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let perf = Perf::probe();
        if let Err(why) = &perf {
            eprintln!("no system call counts or CPU samples: {why}");
        }
        // A fixed key: these tokens only ever reach a relay started by this harness.
        let key = SigningKey::from_bytes(&[0x5a; 32]);
        let public_key_hex = proto::token::hex(key.verifying_key().as_bytes());
        let relay_bin = snapshot(&cfg.relay_bin, &tmp.join("relay"));
        let perf_bin = snapshot(&std::env::current_exe()?, &tmp.join("perf"));
        Ok(Self {
            relay_bin,
            perf_bin,
            cfg,
            scale: Scale::new(cfg.quick),
            perf,
            key,
            public_key_hex,
            tmp,
            step_id: 0,
            ideal_max_pps: None,
        })
    }

    fn syscall_method(&self) -> String {
        match &self.perf {
            Ok(_) => "perf stat -e raw_syscalls:sys_enter -p PID (whole process)".into(),
            Err(why) => format!("not counted: {why}"),
        }
    }

    fn topology(&self, sc: Scenario) -> Topology {
        match sc {
            Scenario::Fanout => Topology::fanout(self.scale.fanout_subscribers),
            Scenario::Rooms => Topology::rooms(self.scale.n_rooms, self.scale.room_size),
        }
    }

    /// Starts `kind`, measures it under scenario `sc`, stops it.
    fn run_contender(&mut self, kind: Kind, sc: Scenario) -> ContenderRun {
        let topo = self.topology(sc);
        let prepared = self.prepare(kind, &topo);
        let (mut parts, mut running) = match prepared {
            Ok(p) => p,
            Err(status) => return ContenderRun::new(kind, status),
        };
        let mut cr = ContenderRun::new(kind, Status::Ran);
        cr.ready_line = running.ready_line.clone();
        if let Err(e) = self.drive(kind, sc, &topo, &mut parts, &running, &mut cr) {
            cr.status = Status::Failed(format!("{e:#}"));
        }
        let exit = running.stop();
        if !exit.contains("exit status: 0") && !exit.contains("signal: 15") {
            eprintln!("  {} ended: {exit}", kind.name());
        }
        cr
    }

    /// Binds the participants, writes the rooms file and starts the contender.
    fn prepare(&self, kind: Kind, topo: &Topology) -> Result<(Vec<Participant>, Running), Status> {
        let failed = |e: anyhow::Error| Status::Failed(format!("{e:#}"));
        let parts = loadgen::bind_participants(topo.members.len()).map_err(failed)?;
        let rooms: Vec<_> = topo
            .rooms
            .iter()
            .map(|r| r.iter().map(|&i| parts[i].addr).collect())
            .collect();
        let rooms_file = self.tmp.join("rooms.txt");
        std::fs::write(&rooms_file, write_rooms_file(&rooms)).map_err(|e| failed(e.into()))?;
        let relay_config = self.tmp.join("relay.toml");
        std::fs::write(&relay_config, contender::RELAY_CONFIG).map_err(|e| failed(e.into()))?;
        let launch = Launch {
            relay_bin: &self.relay_bin,
            perf_bin: &self.perf_bin,
            relay_shards: self.cfg.relay_shards,
            public_key_hex: &self.public_key_hex,
            rooms_file: &rooms_file,
            relay_config: &relay_config,
            stderr_file: self
                .tmp
                .join(format!("{}.stderr", kind.name().replace('/', "-"))),
            cpu: self.cfg.cores.map(|c| c.1),
        };
        let running = contender::start(kind, &launch).map_err(|why| {
            if kind.is_relay() {
                Status::Unavailable(why)
            } else {
                Status::Failed(why) // a baseline that cannot start is a bug, not a platform gap
            }
        })?;
        Ok((parts, running))
    }

    fn drive(
        &mut self,
        kind: Kind,
        sc: Scenario,
        topo: &Topology,
        parts: &mut [Participant],
        running: &Running,
        cr: &mut ContenderRun,
    ) -> anyhow::Result<()> {
        let room_of = |i: usize| topo.members[i].room_idx as u64 + 1;
        loadgen::connect(parts, |i| running.target(room_of(i)))?;
        if kind.is_relay() {
            self.join(parts, topo, running.n_shards)?;
        }
        let first = running.base.port();
        let ctx = Ctx {
            pid: running.pid,
            contender_ports: first..first + running.n_shards,
            metrics: running.metrics,
            parts,
            topo,
        };
        let (rate, len) = match sc {
            Scenario::Fanout => (1_000.0, self.scale.fanout_packet_len),
            Scenario::Rooms => (self.scale.rooms_pps, self.scale.rooms_packet_len),
        };
        let warm = self.step(
            &ctx,
            Load {
                rate_pps: rate,
                duration: self.scale.warmup,
                packet_len: len,
            },
        );
        eprintln!("  warm-up: {}", progress(&warm));
        match sc {
            Scenario::Fanout => self.fanout(kind, &ctx, cr),
            Scenario::Rooms => {
                let load = Load {
                    rate_pps: self.scale.rooms_pps,
                    duration: self.scale.rooms_duration,
                    packet_len: len,
                };
                let m = self.measure(&ctx, "load", load, Some(Probe::Syscalls)).0;
                cr.measurements.push(m);
                self.sample_user_time(&ctx, "load", load, cr);
            }
        }
        Ok(())
    }

    /// Mints a token for every participant and binds it on the shard that owns its room.
    fn join(
        &self,
        parts: &mut [Participant],
        topo: &Topology,
        n_shards: u16,
    ) -> anyhow::Result<()> {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        for (i, p) in parts.iter_mut().enumerate() {
            let room_id = topo.members[i].room_idx as u64 + 1;
            let grant = crate::join::Grant {
                room_id,
                shard_idx: (room_id % u64::from(n_shards)) as u16,
                participant_id: i as u64 + 1,
                publishes: topo.members[i].publishes,
            };
            let creds = crate::join::mint(&self.key, grant, now_s);
            crate::join::bind(&p.sock, &creds)?;
            p.creds = Some(creds);
        }
        Ok(())
    }

    /// Searches the highest zero-loss rate, confirms it with a longer measured step, then
    /// measures latency at half of the ideal forwarder's confirmed rate (the same offered load
    /// for every contender; its own rate if the ideal forwarder has not run in this run).
    fn fanout(&mut self, kind: Kind, ctx: &Ctx, cr: &mut ContenderRun) {
        let best = self.search_zero_loss(ctx, cr);
        let (mut max, rate) = self.confirm(ctx, best.unwrap_or(self.scale.search_start_pps));
        max.values
            .push(("search_found_zero_loss", Some(flag(best.is_some()))));
        cr.measurements.push(max);
        self.sample_user_time(ctx, "max", self.fanout_load(rate), cr);
        if kind == Kind::Ideal {
            self.ideal_max_pps = Some(rate);
        }
        let base = self.ideal_max_pps.unwrap_or(rate);
        let half_load = self.fanout_load(base / 2.0);
        let (mut half, _) = self.measure(ctx, "half", half_load, Some(Probe::Syscalls));
        half.values
            .push(("half_of_ideal", Some(flag(self.ideal_max_pps.is_some()))));
        cr.measurements.push(half);
    }

    /// A fanout load at `rate_pps` for the measured duration.
    fn fanout_load(&self, rate_pps: f64) -> Load {
        Load {
            rate_pps,
            duration: self.scale.measure,
            packet_len: self.scale.fanout_packet_len,
        }
    }

    /// Repeats `load` with perf sampling the contender's user and kernel time, recorded as
    /// `<label>_sampled`. A separate step, because the sampling itself costs the contender CPU
    /// (about half again per packet at the rooms load, from scheduling the sampling timer on
    /// every context switch), which must not leak into the exact CPU total, the latency or
    /// the loss of the main step. User time is counted by the user-mode samples alone, which
    /// that overhead (kernel-mode) does not inflate.
    fn sample_user_time(
        &mut self,
        ctx: &Ctx,
        label: &'static str,
        load: Load,
        cr: &mut ContenderRun,
    ) {
        if self.perf.is_err() {
            return;
        }
        let label = if label == "max" {
            "max_sampled"
        } else {
            "load_sampled"
        };
        let m = self.measure(ctx, label, load, Some(Probe::CpuModes)).0;
        cr.measurements.push(m);
    }

    /// The bounded rate search, in short unobserved steps.
    fn search_zero_loss(&mut self, ctx: &Ctx, cr: &mut ContenderRun) -> Option<u64> {
        let s = self.scale.clone();
        let mut search =
            RateSearch::new(s.search_start_pps, s.search_max_pps, 0.05, s.search_steps);
        while let Some(pps) = search.poll_rate() {
            let load = Load {
                rate_pps: pps as f64,
                duration: s.search_step,
                packet_len: s.fanout_packet_len,
            };
            let (m, clean) = self.measure(ctx, "search", load, None);
            let lost = m.get("lost").unwrap_or(0.0) as u64;
            cr.search.push((pps, clean, lost));
            search.handle_result(pps, clean);
        }
        search.best_pps()
    }

    /// Measures at `best_pps` for the full duration; a short search step that ran clean can
    /// still lose packets over a longer one, so on loss it steps down 5% at a time, a bounded
    /// number of times. Returns the first clean measurement (or the last one) and its rate.
    fn confirm(&mut self, ctx: &Ctx, best_pps: u64) -> (Measurement, f64) {
        let mut rate = best_pps as f64;
        let mut attempt = 1;
        loop {
            let load = self.fanout_load(rate);
            let (mut m, clean) = self.measure(ctx, "max", load, Some(Probe::Syscalls));
            if clean || attempt >= self.scale.confirm_attempts {
                m.values.push(("confirm_attempts", Some(attempt as f64)));
                m.values.push(("zero_loss_confirmed", Some(flag(clean))));
                return (m, rate);
            }
            rate = (rate * 0.95).floor();
            attempt += 1;
        }
    }

    fn step(&mut self, ctx: &Ctx, load: Load) -> StepOutcome {
        self.step_id += 1;
        let plan = StepPlan {
            step_id: self.step_id,
            rate_pps: load.rate_pps,
            duration: load.duration,
            packet_len: load.packet_len,
        };
        loadgen::run_step(ctx.parts, ctx.topo, plan)
    }

    /// One step with the contender's CPU time, socket drops and (relay) counters sampled
    /// around it, and with `probe`, perf attached during it. Returns the measurement and
    /// whether it was clean: no loss, no refused send, and the load generator kept its
    /// schedule (so the rate was really offered).
    fn measure(
        &mut self,
        ctx: &Ctx,
        label: &'static str,
        load: Load,
        probe: Option<Probe>,
    ) -> (Measurement, bool) {
        let before = Sample::take(ctx);
        let window = match (&self.perf, probe) {
            (Ok(perf), Some(p)) => perf
                .start(p, ctx.pid, &self.tmp)
                .map_err(|e| eprintln!("  perf {p:?}: {e:#}"))
                .ok(),
            _ => None,
        };
        let out = self.step(ctx, load);
        let reading = window.and_then(|w| w.finish().map_err(|e| eprintln!("  perf: {e:#}")).ok());
        let after = Sample::take(ctx);
        let on_schedule = out.send_duration_ns as f64 <= load.duration.as_nanos() as f64 * 1.1;
        let clean = out.lost() == 0 && out.send_failures == 0 && on_schedule;
        eprintln!("  {label} {:.0} pps: {}", load.rate_pps, progress(&out));
        let m = Measurement {
            label,
            values: values(load.rate_pps, &out, &before, &after, reading),
        };
        (m, clean)
    }
}

fn progress(o: &StepOutcome) -> String {
    let egress = o.delivered as f64 / (o.send_duration_ns.max(1) as f64 / 1e9);
    let p99 = o.latency.summary().map_or(f64::NAN, |l| l.p99_us);
    format!(
        "delivered {}/{} lost {} dup {} reord {} misrouted {} egress {egress:.0} pps p99 {p99:.1} us",
        o.delivered,
        o.expected,
        o.lost(),
        o.duplicates,
        o.reordered,
        o.misrouted
    )
}

/// Counters of the contender at one instant.
struct Sample {
    /// Receive-buffer drops at the contender's sockets and at the load generator's.
    contender_udp_drops: u64,
    loadgen_udp_drops: u64,
    cpu_ticks: Option<(u64, u64)>,
    cpu_total_ns: Option<u64>,
    relay_syscalls: Option<f64>,
    relay_drops: Option<f64>,
}

impl Sample {
    fn take(ctx: &Ctx) -> Self {
        let text = ctx.metrics.and_then(|m| contender::scrape(m).ok());
        let metric = |name| text.as_deref().and_then(|t| contender::metric_sum(t, name));
        let drops = contender::udp_drops_by_port();
        let sum = |ports: &mut dyn Iterator<Item = u16>| ports.filter_map(|p| drops.get(&p)).sum();
        let pid = ctx.pid;
        Self {
            contender_udp_drops: sum(&mut ctx.contender_ports.clone()),
            loadgen_udp_drops: sum(&mut ctx.parts.iter().map(|p| p.addr.port())),
            cpu_ticks: contender::cpu_ticks(pid),
            cpu_total_ns: contender::cpu_total_ns(pid),
            relay_syscalls: metric("relay_syscalls_total"),
            relay_drops: metric("relay_drops_total"),
        }
    }
}

fn values(
    rate_pps: f64,
    o: &StepOutcome,
    before: &Sample,
    after: &Sample,
    reading: Option<Reading>,
) -> Vec<(&'static str, Option<f64>)> {
    let pkts = o.delivered.max(1) as f64;
    let lat = o.latency.summary();
    let mut v = vec![
        ("rate_pps_per_publisher", Some(rate_pps)),
        ("send_duration_s", Some(o.send_duration_ns as f64 / 1e9)),
        ("sent", Some(o.sent.iter().sum::<u64>() as f64)),
        ("expected", Some(o.expected as f64)),
        ("delivered", Some(o.delivered as f64)),
        ("lost", Some(o.lost() as f64)),
        (
            "loss_ratio",
            Some(o.lost() as f64 / o.expected.max(1) as f64),
        ),
        ("duplicates", Some(o.duplicates as f64)),
        ("reordered", Some(o.reordered as f64)),
        ("misrouted", Some(o.misrouted as f64)),
        ("stale_or_invalid", Some(o.stale_or_invalid as f64)),
        ("send_failures", Some(o.send_failures as f64)),
        (
            "egress_pps",
            Some(o.delivered as f64 / (o.send_duration_ns.max(1) as f64 / 1e9)),
        ),
        ("p50_us", lat.map(|l| l.p50_us)),
        ("p99_us", lat.map(|l| l.p99_us)),
        ("p999_us", lat.map(|l| l.p999_us)),
        ("max_us", lat.map(|l| l.max_us)),
    ];
    v.extend(cpu_values(pkts, before, after));
    v.extend(perf_values(pkts, reading));
    let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    v.push((
        "self_reported_syscalls_per_pkt",
        delta(before.relay_syscalls, after.relay_syscalls).map(|n| n / pkts),
    ));
    v.push(("relay_drops", delta(before.relay_drops, after.relay_drops)));
    let udp = |f: fn(&Sample) -> u64| Some(f(after).saturating_sub(f(before)) as f64);
    v.push(("contender_socket_drops", udp(|s| s.contender_udp_drops)));
    v.push(("loadgen_socket_drops", udp(|s| s.loadgen_udp_drops)));
    v
}

/// Exact CPU time (schedstat) and the kernel's tick-sampled user/system split, per packet.
fn cpu_values(pkts: f64, before: &Sample, after: &Sample) -> Vec<(&'static str, Option<f64>)> {
    let ns_per_tick = 1e9 / crate::sys::clock_ticks_per_s() as f64;
    let ticks = before.cpu_ticks.zip(after.cpu_ticks);
    let tick_ns = |f: fn((u64, u64)) -> u64| {
        ticks.map(|(b, a)| f(a).saturating_sub(f(b)) as f64 * ns_per_tick / pkts)
    };
    let cpu_ns = delta_u64(before.cpu_total_ns, after.cpu_total_ns).map(|d| d as f64 / pkts);
    vec![
        ("cpu_ns_per_pkt", cpu_ns),
        ("user_ns_per_pkt_ticks", tick_ns(|t| t.0)),
        ("sys_ns_per_pkt_ticks", tick_ns(|t| t.1)),
    ]
}

/// What perf measured, per packet: system calls, or user and kernel time from samples (each
/// sample stands for one sampling period of the contender's CPU time).
fn perf_values(pkts: f64, reading: Option<Reading>) -> Vec<(&'static str, Option<f64>)> {
    let period_ns = crate::perfctl::SAMPLE_PERIOD_NS as f64;
    match reading {
        Some(Reading::Syscalls(n)) => vec![("syscalls_per_pkt", Some(n as f64 / pkts))],
        Some(Reading::CpuModes { user, kernel }) => vec![
            (
                "user_ns_per_pkt_sampled",
                Some(user as f64 * period_ns / pkts),
            ),
            (
                "sys_ns_per_pkt_sampled",
                Some(kernel as f64 * period_ns / pkts),
            ),
            ("cpu_samples_user", Some(user as f64)),
            ("cpu_samples_kernel", Some(kernel as f64)),
        ],
        None => Vec::new(),
    }
}

/// Copies `bin` to `copy`; on failure (for example no relay built) the original path is used
/// and starting it reports why.
fn snapshot(bin: &Path, copy: &Path) -> PathBuf {
    match std::fs::copy(bin, copy) {
        Ok(_) => copy.to_path_buf(),
        Err(_) => bin.to_path_buf(),
    }
}

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

fn delta_u64(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?))
}

/// The relay binary next to this one (both live in `target/<profile>/`).
pub fn default_relay_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join("relay")
}
