//! Observing a contender from outside with Linux `perf` (package linux-perf), so that what is
//! measured does not depend on the contender's honesty or on which runtime it uses:
//!
//! - **system calls**: `perf stat -e raw_syscalls:sys_enter -p PID`. Tracepoints work on these
//!   machines even though hardware counters do not.
//! - **user-space CPU time**: `perf record -e cpu-clock:u -e cpu-clock:k -c 250000 -p PID`.
//!   Each event's timer fires every 250 us of the contender's CPU time and records a sample
//!   only in its own mode, so user-mode samples x 250 us estimate user time without bias. The
//!   kernel's utime/stime come from 250 Hz ticks reported in 10 ms units, too coarse for a
//!   user share of 1%. Sampling costs the contender CPU (timer reprogramming on every context
//!   switch), so the harness samples in a step of its own, never in the one it times.
//!
//! Both start disabled (`-D -1`) and are switched on and off through `--control` fifos; perf
//! acknowledges each command, so the window is exact and perf is known to be attached.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SYSCALL_EVENT: &str = "raw_syscalls:sys_enter";
/// CPU-clock sampling period, ns of the contender's CPU time.
pub const SAMPLE_PERIOD_NS: u64 = 250_000;
/// How long perf may take to acknowledge a control command (it starts in well under 1 s).
const ACK_TIMEOUT_MS: u64 = 5_000;

/// What a window measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// System calls entered.
    Syscalls,
    /// CPU-clock samples in user and in kernel mode.
    CpuModes,
}

/// What a window measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// System calls entered.
    Syscalls(u64),
    /// Samples taken while the contender ran in user mode and in kernel mode.
    CpuModes {
        /// User-mode samples.
        user: u64,
        /// Kernel-mode samples (system calls, and interrupts taken while it ran).
        kernel: u64,
    },
}

/// A working `perf` executable.
#[derive(Clone, Debug)]
pub struct Perf {
    exe: PathBuf,
}

impl Perf {
    /// Finds Linux `perf` on PATH (skipping this binary, which is also called `perf`) and checks
    /// that it can count the syscall tracepoint. `Err` says why not.
    pub fn probe() -> Result<Self, String> {
        let me = std::env::current_exe()
            .ok()
            .and_then(|p| p.canonicalize().ok());
        let path = std::env::var_os("PATH").unwrap_or_default();
        let exe = std::env::split_paths(&path)
            .map(|d| d.join("perf"))
            .find(|p| p.is_file() && p.canonicalize().ok() != me)
            .ok_or("no `perf` on PATH (apt-get install linux-perf)")?;
        let out = Command::new(&exe)
            .args(["stat", "-x", ",", "-e", SYSCALL_EVENT, "--", "true"])
            .output()
            .map_err(|e| format!("running perf: {e}"))?;
        match parse_count(&String::from_utf8_lossy(&out.stderr)) {
            Some(_) => Ok(Self { exe }),
            None => Err(format!(
                "perf cannot count {SYSCALL_EVENT}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Attaches to `pid` and starts measuring; `dir` holds the control fifos and data file.
    pub fn start(&self, probe: Probe, pid: u32, dir: &Path) -> anyhow::Result<PerfWindow> {
        let tag = format!(
            "{}-{pid}",
            if probe == Probe::Syscalls {
                "stat"
            } else {
                "rec"
            }
        );
        let ctl_path = dir.join(format!("perf-ctl-{tag}"));
        let ack_path = dir.join(format!("perf-ack-{tag}"));
        let data = dir.join(format!("perf-{tag}.data"));
        for p in [&ctl_path, &ack_path] {
            let _ = std::fs::remove_file(p);
            crate::sys::mkfifo(p)?;
        }
        // Opening a fifo read-write never blocks, even if perf dies before opening its end.
        let rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let (ctl, ack) = (rw(&ctl_path)?, rw(&ack_path)?);
        let control = format!("fifo:{},{}", ctl_path.display(), ack_path.display());
        let mut cmd = Command::new(&self.exe);
        match probe {
            Probe::Syscalls => cmd.args(["stat", "-x", ",", "-e", SYSCALL_EVENT]),
            Probe::CpuModes => cmd
                .args(["record", "-q", "-e", "cpu-clock:u", "-e", "cpu-clock:k"])
                .args(["-c", &SAMPLE_PERIOD_NS.to_string(), "-o"])
                .arg(&data),
        };
        crate::sys::die_with_parent(&mut cmd);
        let child = cmd
            .args(["-D", "-1", "--control", &control, "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut w = PerfWindow {
            exe: self.exe.clone(),
            probe,
            child,
            ctl,
            ack,
            files: vec![ctl_path, ack_path, data],
        };
        if let Err(e) = w.command("enable") {
            let _ = w.child.kill();
            let _ = w.child.wait();
            w.remove_files();
            return Err(e);
        }
        Ok(w)
    }
}

/// An attached, measuring perf process.
pub struct PerfWindow {
    exe: PathBuf,
    probe: Probe,
    child: Child,
    ctl: File,
    ack: File,
    files: Vec<PathBuf>,
}

impl PerfWindow {
    fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        self.ctl.write_all(format!("{cmd}\n").as_bytes())?;
        let deadline = Instant::now() + Duration::from_millis(ACK_TIMEOUT_MS);
        let mut got = Vec::new();
        // perf writes "ack\n" followed by a NUL byte.
        while !got.windows(4).any(|w| w == b"ack\n") {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as i32;
            if left == 0 || !crate::sys::wait_readable(self.ack.as_raw_fd(), left)? {
                anyhow::bail!("perf did not acknowledge {cmd:?}");
            }
            let mut buf = [0u8; 64];
            let n = self.ack.read(&mut buf)?;
            got.extend_from_slice(&buf[..n]);
        }
        Ok(())
    }

    fn remove_files(&self) {
        remove_files(&self.files);
    }

    /// Stops measuring and returns what was measured in the window.
    pub fn finish(mut self) -> anyhow::Result<Reading> {
        let disabled = self.command("disable");
        crate::sys::kill(self.child.id(), libc::SIGINT)?;
        let out = self.child.wait_with_output()?;
        let reading = disabled.and_then(|()| match self.probe {
            Probe::Syscalls => {
                let text = String::from_utf8_lossy(&out.stderr);
                let n = parse_count(&text)
                    .ok_or_else(|| anyhow::anyhow!("no count in perf output: {text}"))?;
                Ok(Reading::Syscalls(n))
            }
            Probe::CpuModes => count_samples(&self.exe, &self.files[2]),
        });
        remove_files(&self.files);
        reading
    }
}

fn remove_files(files: &[PathBuf]) {
    for p in files {
        let _ = std::fs::remove_file(p);
    }
}

/// Counts the samples of each event in a `perf record` data file.
fn count_samples(exe: &Path, data: &Path) -> anyhow::Result<Reading> {
    let out = Command::new(exe)
        .args(["script", "-F", "event", "-i"])
        .arg(data)
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let n = |e: &str| text.lines().filter(|l| l.trim() == e).count() as u64;
    Ok(Reading::CpuModes {
        user: n("cpu-clock:u:"),
        kernel: n("cpu-clock:k:"),
    })
}

/// The count from `perf stat -x ,` output: the first field of the line naming the event.
/// `<not counted>` and `<not supported>` are not counts.
fn parse_count(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find(|l| l.contains(SYSCALL_EVENT))?
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_csv_counts() {
        let out =
            "Events disabled\nEvents enabled\n1414522,,raw_syscalls:sys_enter,302984478,100.00,,\n";
        assert_eq!(parse_count(out), Some(1_414_522));
        assert_eq!(
            parse_count("<not counted>,,raw_syscalls:sys_enter,0,0,,"),
            None
        );
        assert_eq!(parse_count("nothing"), None);
    }
}
