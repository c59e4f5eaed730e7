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
    rss_of("self")
}

/// Process `pid`'s (`self` for this one) resident set size now and at its peak, in bytes.
pub fn rss_of(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
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

/// Sums the `drops` column of `/proc/net/udp` (datagrams the kernel dropped because a socket's
/// receive buffer was full, counted per socket) over the sockets bound to an address in `ours`.
pub fn udp_drops(ours: &std::collections::HashSet<std::net::SocketAddrV4>) -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    parse_udp_drops(&text, ours)
}

/// The parser of [`udp_drops`]: `local_address` is `IIIIIIII:PPPP` in hex, the address as the
/// kernel stores it (network order read as a little-endian u32 on the machines we run on).
pub fn parse_udp_drops(
    text: &str,
    ours: &std::collections::HashSet<std::net::SocketAddrV4>,
) -> u64 {
    let mut sum = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let (Some(local), Some(drops)) = (f.get(1), f.last()) else {
            continue;
        };
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        let (Ok(ip), Ok(port)) = (u32::from_str_radix(ip, 16), u16::from_str_radix(port, 16))
        else {
            continue;
        };
        let addr = std::net::SocketAddrV4::new(std::net::Ipv4Addr::from(ip.swap_bytes()), port);
        if ours.contains(&addr) {
            sum += drops.parse::<u64>().unwrap_or(0);
        }
    }
    sum
}

/// One core's time from its `cpuN` line of `/proc/stat`, in ticks, folded into what the report
/// shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreTicks {
    /// user + nice.
    pub user: u64,
    /// system (kernel time charged to tasks).
    pub system: u64,
    /// irq + softirq: interrupt work, including the loopback delivery of datagrams, which the
    /// kernel does not charge to the sending or receiving task when it accounts IRQ time apart.
    pub irq: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Time the hypervisor ran something else (0 where it is not reported).
    pub steal: u64,
}

impl CoreTicks {
    /// `self - earlier`, saturating.
    pub fn since(&self, e: &CoreTicks) -> CoreTicks {
        CoreTicks {
            user: self.user.saturating_sub(e.user),
            system: self.system.saturating_sub(e.system),
            irq: self.irq.saturating_sub(e.irq),
            idle: self.idle.saturating_sub(e.idle),
            steal: self.steal.saturating_sub(e.steal),
        }
    }

    /// All of it.
    pub fn total(&self) -> u64 {
        self.user + self.system + self.irq + self.idle + self.steal
    }
}

/// The `cpuN` lines of a `/proc/stat` text (not the `cpu` sum), in order.
pub fn parse_cores(text: &str) -> Vec<(String, CoreTicks)> {
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let name = f.next()?.to_owned();
            let v: Vec<u64> = f.map(|x| x.parse().unwrap_or(0)).collect();
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            Some((
                name,
                CoreTicks {
                    user: at(0) + at(1),
                    system: at(2),
                    idle: at(3) + at(4),
                    irq: at(5) + at(6),
                    steal: at(7),
                },
            ))
        })
        .collect()
}

/// Every core's ticks now.
pub fn cores() -> Vec<(String, CoreTicks)> {
    parse_cores(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
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
    fn udp_drops_of_our_sockets_only() {
        let text = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
          1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 17\n\
          2: 0200007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5\n\
          3: 0100007F:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 100\n";
        let ours: std::collections::HashSet<std::net::SocketAddrV4> = [
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.2:8080".parse().unwrap(),
        ]
        .into();
        assert_eq!(parse_udp_drops(text, &ours), 22);
        // A real socket of ours shows up with its count (0 here).
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(a) = s.local_addr().unwrap() else {
            unreachable!()
        };
        let text = std::fs::read_to_string("/proc/net/udp").unwrap();
        assert!(text.contains(&format!(":{:04X}", a.port())));
        assert_eq!(udp_drops(&[a].into()), 0);
    }

    #[test]
    fn core_lines_of_proc_stat() {
        let text = "cpu  10 1 20 300 4 5 6 7 0 0\n\
                    cpu0 5 1 10 150 2 3 4 7 0 0\n\
                    cpu1 5 0 10 150 2 2 2 0 0 0\n\
                    intr 123\n";
        let c = parse_cores(text);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0, "cpu0");
        assert_eq!(
            c[0].1,
            CoreTicks {
                user: 6,
                system: 10,
                irq: 7,
                idle: 152,
                steal: 7
            }
        );
        assert_eq!(c[1].1.total(), 5 + 10 + 152 + 4);
        assert_eq!(c[0].1.since(&c[1].1).steal, 7);
        assert!(!cores().is_empty());
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
