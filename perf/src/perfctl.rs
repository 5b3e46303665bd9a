//! Counting a contender's system calls from outside, so that the count does not depend on the
//! contender's honesty or on which runtime it uses: `perf stat -e raw_syscalls:sys_enter -p PID`
//! (package linux-perf). Tracepoints work on these machines even though hardware counters do
//! not. Counting starts disabled (`-D -1`) and is switched on and off through `--control`
//! fifos; perf acknowledges each command, so the window is exact and known to be attached.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EVENT: &str = "raw_syscalls:sys_enter";
/// How long perf may take to acknowledge a control command (it starts in well under 1 s).
const ACK_TIMEOUT_MS: i32 = 5_000;

/// A working `perf` executable.
#[derive(Clone, Debug)]
pub struct SyscallCounter {
    perf: PathBuf,
}

impl SyscallCounter {
    /// Finds Linux `perf` on PATH (skipping this binary, which is also called `perf`) and checks
    /// that it can count the syscall tracepoint. `Err` says why not.
    pub fn probe() -> Result<Self, String> {
        let me = std::env::current_exe()
            .ok()
            .and_then(|p| p.canonicalize().ok());
        let path = std::env::var_os("PATH").unwrap_or_default();
        let perf = std::env::split_paths(&path)
            .map(|d| d.join("perf"))
            .find(|p| p.is_file() && p.canonicalize().ok() != me)
            .ok_or("no `perf` on PATH (apt-get install linux-perf)")?;
        let out = Command::new(&perf)
            .args(["stat", "-x", ",", "-e", EVENT, "--", "true"])
            .output()
            .map_err(|e| format!("running perf: {e}"))?;
        match parse_count(&String::from_utf8_lossy(&out.stderr)) {
            Some(_) => Ok(Self { perf }),
            None => Err(format!(
                "perf cannot count {EVENT}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Attaches to `pid` and starts counting; `dir` holds the control fifos.
    pub fn start(&self, pid: u32, dir: &Path) -> anyhow::Result<SyscallWindow> {
        let ctl_path = dir.join(format!("perf-ctl-{pid}"));
        let ack_path = dir.join(format!("perf-ack-{pid}"));
        for p in [&ctl_path, &ack_path] {
            let _ = std::fs::remove_file(p);
            crate::sys::mkfifo(p)?;
        }
        // Opening a fifo read-write never blocks, even if perf dies before opening its end.
        let rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let (ctl, ack) = (rw(&ctl_path)?, rw(&ack_path)?);
        let control = format!("fifo:{},{}", ctl_path.display(), ack_path.display());
        let child = Command::new(&self.perf)
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                EVENT,
                "-D",
                "-1",
                "--control",
                &control,
            ])
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut w = SyscallWindow {
            child,
            ctl,
            ack,
            paths: [ctl_path, ack_path],
        };
        if let Err(e) = w.command("enable") {
            let _ = w.child.kill();
            let _ = w.child.wait();
            w.paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
            return Err(e);
        }
        Ok(w)
    }
}

/// An attached, counting perf process.
pub struct SyscallWindow {
    child: Child,
    ctl: File,
    ack: File,
    paths: [PathBuf; 2],
}

impl SyscallWindow {
    fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        self.ctl.write_all(format!("{cmd}\n").as_bytes())?;
        let deadline = Instant::now() + Duration::from_millis(ACK_TIMEOUT_MS as u64);
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

    /// Stops counting and returns the number of system calls entered in the window.
    pub fn finish(mut self) -> anyhow::Result<u64> {
        let disabled = self.command("disable");
        crate::sys::kill(self.child.id(), libc::SIGINT)?;
        let out = self.child.wait_with_output()?;
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
        disabled?;
        let text = String::from_utf8_lossy(&out.stderr);
        parse_count(&text).ok_or_else(|| anyhow::anyhow!("no count in perf output: {text}"))
    }
}

/// The count from `perf stat -x ,` output: the first field of the line naming the event.
/// `<not counted>` and `<not supported>` are not counts.
fn parse_count(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find(|l| l.contains(EVENT))?
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
