//! CPU time and memory of a child process (the broker, or the NATS peer), from `/proc`.

use anyhow::Context;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// CPU and memory of a process at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) cpu_secs: f64,
    pub(crate) rss_kib: u64,
    pub(crate) peak_rss_kib: u64,
}

/// Reads user+system CPU seconds, RSS and peak RSS of `pid`.
pub(crate) fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let after = stat.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Usage { cpu_secs: ticks / CLK_TCK, rss_kib: kib("VmRSS:"), peak_rss_kib: kib("VmHWM:") })
}
