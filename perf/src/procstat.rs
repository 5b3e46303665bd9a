//! CPU time of a process from `/proc` (shared by `perf` and `chatperf`).

/// Clock ticks per second, the unit of utime/stime in `/proc/<pid>/stat`.
pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// User plus system CPU time of a whole process, threads that have exited included, in
/// seconds (tick resolution). Used by `chatperf`, not by `perf`.
#[allow(dead_code)]
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let (user, system) = cpu_ticks(pid)?;
    Some((user + system) as f64 / clock_ticks_per_s() as f64)
}

/// User and system CPU time of a whole process (all its threads, live and exited), in clock
/// ticks, from `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    parse_stat_times(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime and stime are fields 14 and 15 of `/proc/<pid>/stat` (proc(5)); the command name in
/// field 2 may contain spaces, so count from the last ')'.
fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// On-CPU time of every live thread of `pid` in ns, summed: the first field of
/// `/proc/<pid>/task/<tid>/schedstat`, which the scheduler keeps exactly (no tick sampling). It
/// cannot split user from system time, which is what the tick-based [`cpu_ticks`] is for.
pub fn cpu_total_ns(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let per_thread = dir.flatten().filter_map(|t| {
        let text = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        text.split_whitespace().next()?.parse::<u64>().ok()
    });
    Some(per_thread.sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_spaces_in_the_name() {
        let stat = "1234 (relay shard 0) S 1 1234 1234 0 -1 4194560 100 0 0 0 57 31 0 0 20 0 3";
        assert_eq!(parse_stat_times(stat), Some((57, 31)));
        assert_eq!(parse_stat_times("garbage"), None);
    }

    #[test]
    fn reads_this_process_cpu_time() {
        assert!(cpu_total_ns(std::process::id()).is_some_and(|ns| ns > 0));
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
