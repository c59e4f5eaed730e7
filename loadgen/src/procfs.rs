//! The few numbers loadgen reads from `/proc`: a process's (or thread's) user and system CPU time
//! and loadgen's own memory.

use std::time::Duration;

/// `/proc` reports CPU times in clock ticks of `USER_HZ`, which is 100 on Linux on every
/// architecture loadgen runs on (it is part of the ABI, independent of the kernel's HZ).
const USER_HZ: u64 = 100;

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// User-space time.
    pub user: Duration,
    /// Kernel time.
    pub system: Duration,
}

impl CpuTimes {
    /// `self - earlier`, saturating.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    /// User plus system.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

/// Parses the `utime` and `stime` fields (14 and 15) of a `/proc/.../stat` line. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat(line: &str) -> Option<CpuTimes> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After the name: field 3 (state) is the first; utime is field 14, the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let tick = |t: u64| Duration::from_nanos(t.saturating_mul(1_000_000_000 / USER_HZ));
    Some(CpuTimes {
        user: tick(utime),
        system: tick(stime),
    })
}

/// CPU times of process `pid`, or `None` if it is gone.
pub fn process_cpu(pid: u32) -> Option<CpuTimes> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU times of this process.
pub fn self_cpu() -> Option<CpuTimes> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// CPU times of the calling thread.
pub fn thread_cpu() -> Option<CpuTimes> {
    parse_stat(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)
}

/// This process's resident set size now and at its peak, in bytes (`VmRSS`, `VmHWM`).
pub fn self_rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_ascii_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// The local port range for ephemeral ports (`net.ipv4.ip_local_port_range`).
pub fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_ascii_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_name() {
        let line = "4242 (shard 0) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 \
                    5 0 123 0 0";
        let t = parse_stat(line).unwrap();
        assert_eq!(t.user, Duration::from_millis(2500));
        assert_eq!(t.system, Duration::from_millis(370));
        assert_eq!(parse_stat("nonsense"), None);
        let later = CpuTimes {
            user: Duration::from_secs(3),
            system: Duration::from_secs(1),
        };
        assert_eq!(later.since(&t).user, Duration::from_millis(500));
        assert_eq!(later.since(&t).total(), Duration::from_millis(1130));
    }

    #[test]
    fn reads_its_own_numbers() {
        assert!(self_cpu().is_some());
        assert!(thread_cpu().is_some());
        let (rss, hwm) = self_rss();
        assert!(rss > 0 && hwm >= rss);
        let (lo, hi) = local_port_range();
        assert!(lo < hi);
    }
}
