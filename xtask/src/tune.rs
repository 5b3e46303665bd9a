//! `cargo xtask tune --check | --apply [--root DIR]`: host tuning for a relay machine.
//!
//! The recommendations are one table ([`SYSCTLS`]) plus rules for NIC queues: RPS, XPS and IRQ
//! affinity per queue, and the memlock limit. Everything is read through a root directory
//! (`/` by default) so that tests run against a fake `/proc` and `/sys` tree. The dist
//! tarball's sysctl drop-in is rendered from the same table ([`sysctl_dropin`]).
//!
//! `--check` prints current and recommended values and fails if anything differs. `--apply`
//! writes what differs (live sysctls, the persistent drop-in under `etc/sysctl.d`, queue masks,
//! IRQ affinity) and reports what it could not write (read-only `/proc/sys` in a container,
//! not root); it fails if anything still differs afterwards.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::Result;

/// What a sysctl should be.
#[derive(Clone, Copy, Debug)]
pub enum Want {
    /// At least this value.
    AtLeast(u64),
    /// Exactly this value.
    Exactly(u64),
}

/// One recommended sysctl.
pub struct Sysctl {
    pub key: &'static str,
    pub want: Want,
    pub why: &'static str,
}

/// The sysctls a relay host wants; the dist drop-in `60-relay.conf` is rendered from this.
pub const SYSCTLS: &[Sysctl] = &[
    Sysctl {
        key: "net.core.rmem_max",
        want: Want::AtLeast(33_554_432),
        why: "the relay asks 8 MiB per UDP socket (socket_buffer_bytes); the kernel caps it here",
    },
    Sysctl {
        key: "net.core.wmem_max",
        want: Want::AtLeast(33_554_432),
        why: "same for send buffers (fan-out bursts)",
    },
    Sysctl {
        key: "net.core.rmem_default",
        want: Want::AtLeast(1_048_576),
        why: "sockets that do not ask (clients of the chat port) still absorb bursts",
    },
    Sysctl {
        key: "net.core.wmem_default",
        want: Want::AtLeast(1_048_576),
        why: "same for send buffers",
    },
    Sysctl {
        key: "net.core.netdev_max_backlog",
        want: Want::AtLeast(30_000),
        why: "packets queued per CPU between the NIC and the stack at high packet rates",
    },
    Sysctl {
        key: "net.core.busy_poll",
        want: Want::AtLeast(50),
        why: "busy-poll the NIC queue for 50 us in poll/epoll before sleeping (lower latency)",
    },
    Sysctl {
        key: "net.core.busy_read",
        want: Want::AtLeast(50),
        why: "same for blocking reads (recvmmsg)",
    },
    Sysctl {
        key: "net.core.somaxconn",
        want: Want::AtLeast(4096),
        why: "accept backlog of the chat listeners during reconnect storms",
    },
    Sysctl {
        key: "kernel.io_uring_disabled",
        want: Want::Exactly(0),
        why: "io_uring allowed (--io uring); absent before Linux 6.6, where it always is",
    },
];

/// The memlock limit the relay wants (io_uring rings count against it before Linux 5.12).
const MEMLOCK_MIN_BYTES: u64 = 64 << 20;

/// The sysctl drop-in shipped as `etc/sysctl.d/60-relay.conf`.
pub fn sysctl_dropin() -> String {
    let mut s = String::from(
        "# Relay host tuning, installed by `cargo xtask deploy`; generated from xtask/src/tune.rs\n\
         # (`cargo xtask tune --check` compares a host with the same values).\n",
    );
    for c in SYSCTLS {
        let v = match c.want {
            Want::AtLeast(v) | Want::Exactly(v) => v,
        };
        let _ = write!(s, "\n# {}\n{} = {v}\n", c.why, c.key);
    }
    s
}

/// One line of the report.
#[derive(Debug)]
pub struct Finding {
    pub what: String,
    pub current: String,
    pub recommended: String,
    pub ok: bool,
    /// Where to write the recommended value (None: not writable by tune).
    pub fix: Option<(PathBuf, String)>,
    pub note: String,
}

/// Reads the host under `root` and compares it with the recommendations.
pub fn inspect(root: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    for c in SYSCTLS {
        let path = root.join("proc/sys").join(c.key.replace('.', "/"));
        let current = read_trim(&path);
        let (ok, rec, target) = match (c.want, current.as_deref().map(str::parse::<u64>)) {
            (Want::Exactly(0), None) if c.key == "kernel.io_uring_disabled" => {
                (true, "0".to_string(), 0)
            }
            (Want::AtLeast(w), Some(Ok(v))) => (v >= w, format!(">= {w}"), w),
            (Want::Exactly(w), Some(Ok(v))) => (v == w, w.to_string(), w),
            (Want::AtLeast(w), _) => (false, format!(">= {w}"), w),
            (Want::Exactly(w), _) => (false, w.to_string(), w),
        };
        out.push(Finding {
            what: c.key.to_string(),
            current: current.unwrap_or_else(|| "absent".into()),
            recommended: rec,
            ok,
            fix: Some((path, target.to_string())),
            note: c.why.to_string(),
        });
    }
    out.push(memlock(root));
    let cpus = online_cpus(root);
    for nic in nics(root) {
        nic_findings(root, &nic, cpus, &mut out);
    }
    out
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// The memlock limit of a login shell here (`proc/self/limits`); the relay's own comes from
/// its unit (LimitMEMLOCK=infinity), which tune does not change.
fn memlock(root: &Path) -> Finding {
    let limits = read_trim(&root.join("proc/self/limits")).unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .map(str::to_string);
    let ok = match soft.as_deref() {
        Some("unlimited") => true,
        Some(v) => v.parse::<u64>().is_ok_and(|b| b >= MEMLOCK_MIN_BYTES),
        None => false,
    };
    Finding {
        what: "memlock (RLIMIT_MEMLOCK)".into(),
        current: soft.unwrap_or_else(|| "unknown".into()),
        recommended: format!(">= {MEMLOCK_MIN_BYTES} or unlimited"),
        ok,
        fix: None,
        note: "relay.service sets LimitMEMLOCK=infinity; for a relay started by hand, \
               `ulimit -l unlimited`"
            .into(),
    }
}

/// Number of online CPUs from `sys/devices/system/cpu/online` ("0-15,32-47").
pub fn online_cpus(root: &Path) -> usize {
    let text = read_trim(&root.join("sys/devices/system/cpu/online")).unwrap_or_default();
    let n: usize = text
        .split(',')
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?),
            None => r.parse::<usize>().ok().map(|_| 1),
        })
        .sum();
    n.max(1)
}

/// Physical NICs: entries of `sys/class/net` with a `device` link.
fn nics(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root.join("sys/class/net"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Sorted numbers of the `prefix-N` entries of a directory.
fn numbered(dir: &Path, prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// A CPU mask as the kernel prints it: hex in comma-separated 32-bit groups.
pub fn format_mask(cpus: &[usize]) -> String {
    let top = cpus.iter().copied().max().unwrap_or(0);
    let mut words = vec![0u32; top / 32 + 1];
    for &c in cpus {
        words[c / 32] |= 1 << (c % 32);
    }
    let parts: Vec<String> = words
        .iter()
        .rev()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                format!("{w:x}")
            } else {
                format!("{w:08x}")
            }
        })
        .collect();
    parts.join(",")
}

/// The CPUs of a kernel mask (`"00000000,0000ff0f"`), or None if it is not one.
pub fn parse_mask(mask: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for (i, word) in mask.trim().split(',').rev().enumerate() {
        let w = u32::from_str_radix(word, 16).ok()?;
        cpus.extend((0..32).filter(|b| w & (1 << b) != 0).map(|b| i * 32 + b));
    }
    Some(cpus)
}

fn nic_findings(root: &Path, nic: &str, cpus: usize, out: &mut Vec<Finding>) {
    let dev = root.join("sys/class/net").join(nic);
    let rx = numbered(&dev.join("queues"), "rx-");
    let tx = numbered(&dev.join("queues"), "tx-");
    let all: Vec<usize> = (0..cpus).collect();
    // With a receive queue per CPU, RSS already spreads the load and RPS only adds a hop; with
    // fewer queues, RPS spreads protocol processing over every CPU.
    let rps: Vec<usize> = if rx.len() >= cpus { Vec::new() } else { all };
    for q in &rx {
        let path = dev.join(format!("queues/rx-{q}/rps_cpus"));
        out.push(mask_finding(
            format!("{nic} rx-{q} rps_cpus"),
            path,
            &rps,
            "RPS: off with a receive queue per CPU, else all CPUs",
        ));
    }
    // XPS: transmit queue i serves CPUs i, i + n, ... so each shard sends on its own queue.
    for (i, q) in tx.iter().enumerate() {
        let want: Vec<usize> = (0..cpus).filter(|c| c % tx.len() == i).collect();
        let path = dev.join(format!("queues/tx-{q}/xps_cpus"));
        out.push(mask_finding(
            format!("{nic} tx-{q} xps_cpus"),
            path,
            &want,
            "XPS: queue i for CPUs i, i+n, ... (shard i sends on its own queue)",
        ));
    }
    // IRQ affinity: the k-th queue interrupt on CPU k mod n, so shard k's packets are received
    // on its own core (stop irqbalance, which would move them back).
    for (k, irq) in numbered(&dev.join("device/msi_irqs"), "")
        .iter()
        .enumerate()
    {
        let path = root.join(format!("proc/irq/{irq}/smp_affinity_list"));
        let want = (k % cpus).to_string();
        let current = read_trim(&path);
        out.push(Finding {
            what: format!("{nic} irq {irq} affinity"),
            ok: current.as_deref() == Some(want.as_str()),
            current: current.unwrap_or_else(|| "absent".into()),
            recommended: want.clone(),
            fix: Some((path, want)),
            note: "queue interrupt k on CPU k (stop irqbalance)".into(),
        });
    }
}

fn mask_finding(what: String, path: PathBuf, want: &[usize], note: &str) -> Finding {
    let current = read_trim(&path);
    let ok = current
        .as_deref()
        .and_then(parse_mask)
        .is_some_and(|c| c == want);
    Finding {
        what,
        current: current.unwrap_or_else(|| "absent".into()),
        recommended: format_mask(want),
        ok,
        fix: Some((path, format_mask(want))),
        note: note.into(),
    }
}

/// The report as a table.
pub fn render(findings: &[Finding]) -> String {
    let w = findings.iter().map(|f| f.what.len()).max().unwrap_or(0);
    let mut s = String::new();
    for f in findings {
        let _ = writeln!(
            s,
            "{:<5} {:<w$}  current {:<12} recommended {:<14} {}",
            if f.ok { "ok" } else { "DIFF" },
            f.what,
            f.current,
            f.recommended,
            f.note
        );
    }
    s
}

/// Writes the recommended value of every differing finding that has a target; returns what
/// could not be written.
pub fn apply(root: &Path, findings: &[Finding]) -> Vec<String> {
    let mut failed = Vec::new();
    let dropin = root.join("etc/sysctl.d/60-relay.conf");
    let persisted = fs::create_dir_all(root.join("etc/sysctl.d"))
        .and_then(|()| fs::write(&dropin, sysctl_dropin()));
    if let Err(e) = persisted {
        failed.push(format!("{}: {e}", dropin.display()));
    }
    for f in findings.iter().filter(|f| !f.ok) {
        match &f.fix {
            Some((path, value)) => {
                if let Err(e) = fs::write(path, format!("{value}\n")) {
                    failed.push(format!("{} ({}): {e}", f.what, path.display()));
                }
            }
            None => failed.push(format!("{}: not changed by tune; {}", f.what, f.note)),
        }
    }
    failed
}

/// `tune --check | --apply [--root DIR]`.
pub fn tune(args: &[String]) -> Result {
    let mut root = PathBuf::from("/");
    let mut mode = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--check" | "--apply" => mode = Some(a.clone()),
            "--root" => root = it.next().ok_or("--root needs a directory")?.into(),
            other => return Err(format!("tune: unknown argument {other:?}")),
        }
    }
    let mode = mode.ok_or("usage: cargo xtask tune --check | --apply [--root DIR]")?;
    let findings = inspect(&root);
    println!(
        "tune: {} ({} CPUs online)",
        root.display(),
        online_cpus(&root)
    );
    print!("{}", render(&findings));
    let differ = findings.iter().filter(|f| !f.ok).count();
    if mode == "--check" {
        return match differ {
            0 => Ok(()),
            n => Err(format!(
                "{n} settings differ from the recommendation (`cargo xtask tune --apply` as root)"
            )),
        };
    }
    let failed = apply(&root, &findings);
    for f in &failed {
        println!("not applied: {f}");
    }
    let after = inspect(&root).iter().filter(|f| !f.ok).count();
    println!(
        "tune --apply: {} settings differed, {after} still differ; IRQ, RPS and XPS settings \
         do not survive a reboot (run tune --apply from a boot-time unit), the sysctls do \
         (etc/sysctl.d/60-relay.conf)",
        differ
    );
    match after {
        0 => Ok(()),
        n => Err(format!("{n} settings could not be applied (see above)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn fake_host(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("xtask-tune-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for c in SYSCTLS {
            put(
                &root,
                &format!("proc/sys/{}", c.key.replace('.', "/")),
                "0\n",
            );
        }
        put(&root, "sys/devices/system/cpu/online", "0-3\n");
        put(
            &root,
            "proc/self/limits",
            "Limit Soft Hard Units\nMax locked memory         8388608              8388608              bytes\n",
        );
        // eth0: two queues of each kind, two MSI interrupts; lo: virtual, ignored.
        for q in ["rx-0", "rx-1"] {
            put(
                &root,
                &format!("sys/class/net/eth0/queues/{q}/rps_cpus"),
                "0\n",
            );
        }
        for q in ["tx-0", "tx-1"] {
            put(
                &root,
                &format!("sys/class/net/eth0/queues/{q}/xps_cpus"),
                "f\n",
            );
        }
        for irq in ["40", "41"] {
            put(
                &root,
                &format!("sys/class/net/eth0/device/msi_irqs/{irq}"),
                "msix\n",
            );
            put(&root, &format!("proc/irq/{irq}/smp_affinity_list"), "0-3\n");
        }
        put(&root, "sys/class/net/lo/queues/rx-0/rps_cpus", "0\n");
        root
    }

    #[test]
    fn masks_round_trip() {
        assert_eq!(format_mask(&[0, 1, 2, 3]), "f");
        assert_eq!(format_mask(&[]), "0");
        assert_eq!(format_mask(&[0, 33]), "2,00000001");
        assert_eq!(parse_mask("00000002,00000001"), Some(vec![0, 33]));
        assert_eq!(parse_mask("0"), Some(vec![]));
        assert_eq!(parse_mask("xyz"), None);
    }

    #[test]
    fn check_reports_differences_and_apply_fixes_them() {
        let root = fake_host("apply");
        let f = inspect(&root);
        let get = |f: &[Finding], what: &str| {
            f.iter()
                .find(|x| x.what == what)
                .map(|x| (x.ok, x.current.clone(), x.recommended.clone()))
                .unwrap()
        };
        assert_eq!(
            get(&f, "net.core.rmem_max"),
            (false, "0".into(), ">= 33554432".into())
        );
        assert!(get(&f, "kernel.io_uring_disabled").0);
        assert_eq!(
            get(&f, "eth0 rx-0 rps_cpus").2,
            "f",
            "2 queues < 4 CPUs: RPS on"
        );
        assert_eq!(get(&f, "eth0 tx-1 xps_cpus").2, "a", "CPUs 1 and 3");
        assert_eq!(
            get(&f, "eth0 irq 41 affinity"),
            (false, "0-3".into(), "1".into())
        );
        assert!(!get(&f, "memlock (RLIMIT_MEMLOCK)").0);
        assert!(
            !f.iter().any(|x| x.what.starts_with("lo ")),
            "virtual NICs skipped"
        );
        let report = render(&f);
        assert!(report.contains("DIFF  net.core.busy_poll"), "{report}");

        let failed = apply(&root, &f);
        assert_eq!(failed.len(), 1, "only memlock is left: {failed:?}");
        let after = inspect(&root);
        assert_eq!(after.iter().filter(|x| !x.ok).count(), 1);
        assert_eq!(
            fs::read_to_string(root.join("etc/sysctl.d/60-relay.conf")).unwrap(),
            sysctl_dropin()
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_dropin_lists_every_sysctl() {
        let d = sysctl_dropin();
        for c in SYSCTLS {
            assert!(d.contains(&format!("\n{} = ", c.key)), "{}", c.key);
        }
    }

    #[test]
    fn an_absent_io_uring_sysctl_is_fine_and_an_absent_buffer_is_not() {
        let root = fake_host("absent");
        fs::remove_file(root.join("proc/sys/kernel/io_uring_disabled")).unwrap();
        fs::remove_file(root.join("proc/sys/net/core/rmem_max")).unwrap();
        let f = inspect(&root);
        assert!(f
            .iter()
            .any(|x| x.what == "kernel.io_uring_disabled" && x.ok));
        assert!(f
            .iter()
            .any(|x| x.what == "net.core.rmem_max" && !x.ok && x.current == "absent"));
        let _ = fs::remove_dir_all(&root);
    }
}
