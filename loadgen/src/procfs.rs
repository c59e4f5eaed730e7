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
    fn reads_its_own_numbers() {
        assert!(self_cpu().is_some());
        assert!(thread_cpu().is_some());
        let (rss, hwm) = self_rss();
        assert!(rss > 0 && hwm >= rss);
        let (lo, hi) = local_port_range();
        assert!(lo < hi);
    }
}
