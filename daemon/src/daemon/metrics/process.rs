//! The `process_*` metrics every Prometheus client library exports (memory, CPU,
//! file descriptors, start time), read from `/proc/self` at each scrape. Linux
//! only: where `/proc` is missing, or a file in it does not parse, that series is
//! left out rather than reported as 0 (a 0 RSS would pass an alert silently).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub(super) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = Sample::read();
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.rss_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
                s.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        if let Some(v) = s.start_time_seconds {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(v) = s.cpu_seconds {
            // The encoder appends `_total` to a counter's name.
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// One reading of `/proc/self`.
#[derive(Debug, Default)]
struct Sample {
    rss_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
}

impl Sample {
    fn read() -> Sample {
        let (cpu_seconds, start_time_seconds) = cpu_and_start().unzip();
        Sample {
            rss_bytes: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| vm_rss_bytes(&s)),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                // The directory being read is one of the fds: not the daemon's.
                .map(|d| (d.count() as u64).saturating_sub(1)),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| soft_open_files(&s)),
            cpu_seconds,
            start_time_seconds,
        }
    }
}

/// `VmRSS:  12345 kB` of `/proc/self/status`.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn soft_open_files(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// CPU seconds (user + system) and the start time (Unix seconds), from
/// `/proc/self/stat` in clock ticks and the boot time of `/proc/stat`.
fn cpu_and_start() -> Option<(f64, f64)> {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    parse_stat(&stat, &boot, ticks as f64)
}

fn parse_stat(stat: &str, boot: &str, ticks: f64) -> Option<(f64, f64)> {
    // The command name (field 2) is in parentheses and may hold spaces and `)`:
    // the fields after it start at the last `)`, with field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    let cpu = (field(14)? + field(15)?) / ticks;
    let btime: f64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some((cpu, btime + field(22)? / ticks))
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_files_parse() {
        assert_eq!(
            super::vm_rss_bytes("Name:\tx\nVmRSS:\t    2048 kB\nVmData: 1 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(super::vm_rss_bytes("Name:\tx\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1024                 524288               files     \n";
        assert_eq!(super::soft_open_files(limits), Some(1024));
        // A command name with a space and a `)` in it.
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1000 1000 100";
        let (cpu, start) = super::parse_stat(stat, "cpu 1 2 3\nbtime 1700000000\n", 100.0).unwrap();
        assert_eq!(cpu, 3.0);
        assert_eq!(start, 1_700_000_010.0);
        assert_eq!(super::parse_stat("42 (x", "btime 1\n", 100.0), None);
    }

    #[test]
    fn this_process_is_read() {
        let s = super::Sample::read();
        assert!(s.rss_bytes.is_some_and(|b| b > 0), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        assert!(s.max_fds.is_some_and(|n| n > 0), "{s:?}");
        assert!(s.cpu_seconds.is_some(), "{s:?}");
        assert!(s.start_time_seconds.is_some_and(|t| t > 1.0e9), "{s:?}");
    }
}
