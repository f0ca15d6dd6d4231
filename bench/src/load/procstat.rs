//! CPU time and resident memory of a process, from Linux's /proc.

use std::fs;

/// Clock ticks per second of /proc's utime and stime: USER_HZ, which Linux fixes at 100 in
/// its user-space ABI on every architecture (`getconf CLK_TCK`).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSample {
    /// utime + stime, in ticks.
    pub cpu_ticks: u64,
    /// VmRSS, in KiB.
    pub rss_kib: u64,
}

/// Reads /proc/PID/stat and /proc/PID/status; `None` when the process is gone or unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_ticks: parse_cpu_ticks(&stat)?,
        rss_kib: parse_vm_rss_kib(&status)?,
    })
}

/// The same for this process.
pub fn sample_self() -> Option<ProcSample> {
    sample(std::process::id())
}

/// utime + stime from /proc/PID/stat: fields 14 and 15, counted after the command name, which
/// is in parentheses and may itself hold spaces and parentheses (so split at the last `)`).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // `after` starts at field 3 (state): utime is field 14, the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS from /proc/PID/status (`VmRSS:     1234 kB`).
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU used between two readings over `seconds` of wall time, in percent of one core.
pub fn cpu_percent(before: u64, after: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    let pct = after.saturating_sub(before) as f64 / TICKS_PER_SECOND / seconds * 100.0;
    (pct * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let stat = "4242 (tally d) (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    350 125 0 0 20 0 9 0 123456 1000000 2500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(475));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\ttallyd\nVmPeak:\t  200000 kB\nVmRSS:\t   54321 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss_kib(status), Some(54_321));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let s = sample_self().expect("/proc/self is readable on Linux");
        assert!(s.rss_kib > 0);
        assert_eq!(cpu_percent(100, 250, 1.5), 100.0);
        assert_eq!(cpu_percent(5, 5, 0.0), 0.0);
    }
}
