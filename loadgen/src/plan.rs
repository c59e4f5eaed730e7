//! The run's plan, decided before anything starts: worker threads and splitter shards over the
//! cores, the local addresses the peers use, the file descriptors they need. Pure arithmetic over
//! the flags and what the machine reports (core count, ephemeral port range), so it is
//! unit-tested here; `main` applies it (raises the fd limit, pins threads).

use std::net::Ipv4Addr;

use crate::peers::SocketMode;

/// Above this many peers `--sockets` defaults to `shared`.
pub const PER_PEER_DEFAULT_MAX: usize = 10_000;

/// What a run will use.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Cores seen.
    pub ncores: usize,
    /// Worker threads running the peers.
    pub threads: usize,
    /// Shards of the splitter child.
    pub shards: usize,
    /// Chunks per second of the stream.
    pub chunks_per_second: f64,
    /// `splitter` or `baseline-sendmmsg`.
    pub mode: &'static str,
    /// File descriptors the run needs.
    pub fds: u64,
    /// Local addresses the peers are spread over (per-peer sockets; none when shared).
    pub ips: Vec<Ipv4Addr>,
    /// How peers get their endpoints.
    pub sockets: SocketMode,
    /// Receive buffer of each shared socket, bytes.
    pub shared_rcvbuf: usize,
}

/// The flags the plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput {
    /// `--peers`.
    pub peers: usize,
    /// `--team-size`.
    pub team_size: usize,
    /// `--baseline` given.
    pub baseline: bool,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--shards`.
    pub shards: Option<usize>,
    /// `--join-threads`.
    pub join_threads: usize,
    /// `--addresses`.
    pub addresses: Option<usize>,
    /// `--bitrate`, bits per second.
    pub bitrate: u64,
    /// `--chunk-size`.
    pub chunk_size: usize,
    /// `--sockets`.
    pub sockets: Option<SocketMode>,
    /// `--rcvbuf`.
    pub rcvbuf: usize,
    /// Splitters driven (`--splitter a,b,c`; 1 otherwise): each worker serves the peers of one,
    /// so there are at least as many workers.
    pub splitters: usize,
}

/// The local addresses `127.0.0.1 … 127.0.0.n`.
pub fn local_ips(n: usize) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|k| Ipv4Addr::new(127, 0, 0, 1 + k as u8))
        .collect()
}

impl Plan {
    /// The plan for `a` on a machine with `ncores` cores and the ephemeral port range
    /// `ports = (low, high)`.
    pub fn new(a: &PlanInput, ncores: usize, ports: (u16, u16)) -> Result<Plan, String> {
        let ncores = ncores.max(1);
        // Relaying peers carry most of the load (they send about what they receive); with teams
        // of one the splitter does, and gets the cores the workers leave.
        let relaying = a.team_size > 1 && !a.baseline;
        let threads = a.threads.unwrap_or(if relaying {
            ncores
        } else {
            (ncores / 2).max(1)
        });
        if threads < a.splitters && a.threads.is_some() {
            return Err(format!(
                "--threads {threads}: each worker serves one splitter's peers, so at least {} for {} splitters",
                a.splitters, a.splitters
            ));
        }
        let threads = threads.max(a.splitters.max(1));
        let shards = a.shards.unwrap_or((ncores.saturating_sub(threads)).max(1));
        let chunks_per_second = a.bitrate as f64 / (8.0 * a.chunk_size as f64);
        let mode = if a.baseline {
            "baseline-sendmmsg"
        } else {
            "splitter"
        };
        let sockets = a
            .sockets
            .unwrap_or(if a.peers > PER_PEER_DEFAULT_MAX && !a.baseline {
                SocketMode::Shared
            } else {
                SocketMode::PerPeer
            });
        if sockets == SocketMode::Shared {
            // One socket per worker: its buffer holds what all its peers' sockets would.
            let per_worker = a.peers.div_ceil(threads);
            return Ok(Plan {
                ncores,
                threads,
                shards,
                chunks_per_second,
                mode,
                fds: threads as u64 + 4 * a.join_threads as u64 + 256,
                ips: Vec::new(),
                sockets,
                shared_rcvbuf: a
                    .rcvbuf
                    .saturating_mul(per_worker)
                    .clamp(8 << 20, 128 << 20),
            });
        }
        // File descriptors: one per peer, plus join sockets in flight, rings, pipes.
        let fds = a.peers as u64 + 4 * a.join_threads as u64 + 256;
        // Ports: each peer holds one UDP port on its address (and its join's TCP port, the same
        // number); use at most half the ephemeral range per address.
        let (lo, hi) = ports;
        let per_ip = (usize::from(hi).saturating_sub(usize::from(lo)))
            .div_ceil(2)
            .max(1);
        let naddr = a.addresses.unwrap_or(a.peers.div_ceil(per_ip)).max(1);
        if naddr > 250 {
            return Err(format!(
                "--peers {} needs more than 250 local addresses",
                a.peers
            ));
        }
        Ok(Plan {
            ncores,
            threads,
            shards,
            chunks_per_second,
            mode,
            fds,
            ips: local_ips(naddr),
            sockets,
            shared_rcvbuf: 0,
        })
    }

    /// The core worker `w` is pinned to: the last cores (the splitter pins its shards from core
    /// 0 on); none with `--no-pin` or on one core.
    pub fn worker_core(&self, w: usize, pin: bool) -> Option<usize> {
        (pin && self.ncores > 1).then(|| self.ncores - 1 - (w % self.ncores))
    }

    /// The core of the source's writer: the last one, off the shards' cores, if there is one.
    pub fn source_core(&self, pin: bool) -> Option<usize> {
        (pin && self.ncores > self.shards).then(|| self.ncores - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PlanInput {
        PlanInput {
            peers: 1000,
            team_size: 16,
            baseline: false,
            threads: None,
            shards: None,
            join_threads: 8,
            addresses: None,
            bitrate: 1_000_000,
            chunk_size: 1024,
            sockets: None,
            rcvbuf: 256 * 1024,
            splitters: 1,
        }
    }

    #[test]
    fn each_splitter_gets_a_worker() {
        let p = Plan::new(
            &PlanInput {
                splitters: 3,
                ..input()
            },
            2,
            (32768, 60999),
        )
        .unwrap();
        assert_eq!(p.threads, 3);
        let err = Plan::new(
            &PlanInput {
                splitters: 3,
                threads: Some(2),
                ..input()
            },
            2,
            (32768, 60999),
        )
        .unwrap_err();
        assert!(err.contains("at least 3"), "{err}");
    }

    #[test]
    fn shared_sockets_above_ten_thousand_peers_need_few_descriptors() {
        let p = Plan::new(
            &PlanInput {
                peers: 100_000,
                ..input()
            },
            2,
            (32768, 60999),
        )
        .unwrap();
        assert_eq!(p.sockets, SocketMode::Shared);
        assert_eq!(p.fds, 2 + 32 + 256);
        assert!(p.ips.is_empty());
        assert_eq!(p.shared_rcvbuf, 128 << 20);
        let small = Plan::new(
            &PlanInput {
                sockets: Some(SocketMode::Shared),
                ..input()
            },
            2,
            (32768, 60999),
        )
        .unwrap();
        assert_eq!(small.shared_rcvbuf, 500 * 256 * 1024);
        assert_eq!(
            Plan::new(&input(), 2, (32768, 60999)).unwrap().sockets,
            SocketMode::PerPeer
        );
    }

    #[test]
    fn relaying_peers_get_every_core_and_teams_of_one_half() {
        let p = Plan::new(&input(), 2, (32768, 60999)).unwrap();
        assert_eq!((p.threads, p.shards), (2, 1));
        assert_eq!(p.mode, "splitter");
        assert!((p.chunks_per_second - 122.07).abs() < 0.01);
        assert_eq!(p.fds, 1000 + 32 + 256);
        assert_eq!(p.ips, vec![Ipv4Addr::new(127, 0, 0, 1)]);
        let one = Plan::new(
            &PlanInput {
                team_size: 1,
                ..input()
            },
            2,
            (32768, 60999),
        )
        .unwrap();
        assert_eq!((one.threads, one.shards), (1, 1));
        assert_eq!(one.worker_core(0, true), Some(1));
        assert_eq!(one.worker_core(0, false), None);
        assert_eq!(one.source_core(true), Some(1));
    }

    #[test]
    fn addresses_cover_half_the_port_range_each() {
        let p = Plan::new(
            &PlanInput {
                peers: 30_000,
                sockets: Some(SocketMode::PerPeer),
                ..input()
            },
            2,
            (32768, 60999),
        )
        .unwrap();
        assert_eq!(p.ips.len(), 3);
        assert_eq!(p.ips[2], Ipv4Addr::new(127, 0, 0, 3));
        assert!(
            Plan::new(
                &PlanInput {
                    peers: 10_000_000,
                    sockets: Some(SocketMode::PerPeer),
                    ..input()
                },
                2,
                (32768, 60999)
            )
            .is_err()
        );
    }
}
