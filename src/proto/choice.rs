//! Which splitter a peer joins when it knows several (`p2psp peer --splitter a,b,c`), and where it
//! goes when its splitter refuses, does not answer or dies (docs/scale-out.md).
//!
//! Sans-IO: [`Choice`] is told what each splitter said and when, and gives the order in which to
//! try them; the peer program does the probing and joining. The load probe's answer is decoded by
//! [`ProbeAnswer::decode`].
//!
//! How peers spread: before joining, a peer asks every splitter for its load (`GET` [`LOAD_PATH`]
//! on the join port; a splitter of this project answers with [`LOAD_HEADER`]: its peers and its
//! `--max-peers`). It tries the least loaded first, a random one among equals, so peers that
//! arrive one after another fill the splitters evenly. A reference splitter does not know the
//! request: it takes it for a join and sends its configuration, whose team list gives its load
//! just as well (the prober then says goodbye). Splitters that are full, refused the last join,
//! did not answer, or that the peer just left because its stream stopped are tried last, for
//! [`AVOID_FOR`]. A peer failing over is one of a herd (every peer of the stopped splitter), so its
//! first choice is drawn with weights that even the loads out instead (see [`Choice::order`]).

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use super::wire::JoinConfig;

/// The path of the load probe on a splitter's join port.
pub const LOAD_PATH: &str = "/.p2psp/load";

/// The response header that carries a splitter's load: `<peers> <max peers>` (0: no limit).
pub const LOAD_HEADER: &str = "X-P2PSP-Load";

/// How long a splitter that failed is tried only after the others.
pub const AVOID_FOR: Duration = Duration::from_secs(15);

/// A splitter's load as its probe answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Peers in its teams (joins in progress included).
    pub peers: u32,
    /// Its `--max-peers`; `None`: no limit, or not said (a reference splitter).
    pub max: Option<u32>,
}

impl Load {
    /// Parses the [`LOAD_HEADER`] value `<peers> <max>`.
    pub fn parse(v: &str) -> Option<Load> {
        let mut it = v.split_ascii_whitespace();
        let peers = it.next()?.parse().ok()?;
        let max: u32 = it.next()?.parse().ok()?;
        it.next().is_none().then_some(Load {
            peers,
            max: (max > 0).then_some(max),
        })
    }

    /// Whether a join would be refused.
    pub fn full(&self) -> bool {
        self.max.is_some_and(|m| self.peers >= m)
    }
}

/// What the bytes a load probe received so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// Not enough bytes yet.
    NeedMore,
    /// A splitter of this project, with its load.
    Ours(Load),
    /// A reference splitter: it sent a join configuration (and so counts the prober as a member
    /// until it says goodbye); its team list gives its load.
    Reference(Load),
    /// Neither (an HTTP answer without the load, or bytes that are no configuration).
    Bad,
}

impl ProbeAnswer {
    /// Decodes what a splitter answered to the load probe. `closed`: the connection ended, so no
    /// more bytes will come.
    pub fn decode(input: &[u8], closed: bool) -> ProbeAnswer {
        if input.len() < 5 && b"HTTP/".starts_with(input) && !closed {
            return ProbeAnswer::NeedMore;
        }
        if input.starts_with(b"HTTP/") {
            return match crate::http::ResponseHead::parse(input) {
                Ok(Some((head, _))) => match head.header(LOAD_HEADER).and_then(Load::parse) {
                    Some(load) if head.status() == 200 => ProbeAnswer::Ours(load),
                    _ => ProbeAnswer::Bad,
                },
                Ok(None) if !closed => ProbeAnswer::NeedMore,
                _ => ProbeAnswer::Bad,
            };
        }
        match JoinConfig::decode(input) {
            Ok(Some((config, _))) => ProbeAnswer::Reference(Load {
                peers: u32::try_from(config.peers.len()).unwrap_or(u32::MAX),
                max: None,
            }),
            Ok(None) if !closed => ProbeAnswer::NeedMore,
            _ => ProbeAnswer::Bad,
        }
    }
}

/// The answer [`LOAD_PATH`] gets from a splitter of this project.
pub fn load_response(peers: usize, max_peers: usize) -> Vec<u8> {
    let value = format!("{peers} {max_peers}");
    crate::http::response_head(200, "OK", &[(LOAD_HEADER, &value), ("Content-Length", "0")])
}

/// What the peer knows of one splitter.
#[derive(Debug, Clone)]
struct Known {
    addr: SocketAddrV4,
    load: Option<Load>,
    avoid_until: Option<Instant>,
}

/// A peer's splitters: which to try, in what order, and which it is on.
#[derive(Debug, Clone)]
pub struct Choice {
    splitters: Vec<Known>,
    current: Option<usize>,
    failovers: u64,
    /// The peer's splitter stalled and it has not joined another yet: it is one of a herd.
    herd: bool,
}

impl Choice {
    /// The splitters a peer was given (duplicates dropped; at least one).
    pub fn new(list: &[SocketAddrV4]) -> Choice {
        let mut splitters: Vec<Known> = Vec::new();
        for &addr in list {
            if !splitters.iter().any(|k| k.addr == addr) {
                splitters.push(Known {
                    addr,
                    load: None,
                    avoid_until: None,
                });
            }
        }
        Choice {
            splitters,
            current: None,
            failovers: 0,
            herd: false,
        }
    }

    /// All splitters, in the order given.
    pub fn splitters(&self) -> impl Iterator<Item = SocketAddrV4> + '_ {
        self.splitters.iter().map(|k| k.addr)
    }

    /// Whether there is more than one splitter to choose from.
    pub fn has_alternatives(&self) -> bool {
        self.splitters.len() > 1
    }

    /// The splitter of the team the peer is in, if any.
    pub fn current(&self) -> Option<SocketAddrV4> {
        self.current.map(|i| self.splitters[i].addr)
    }

    /// Times the peer joined a splitter other than the one it was on.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    fn find(&mut self, addr: SocketAddrV4) -> Option<&mut Known> {
        self.splitters.iter_mut().find(|k| k.addr == addr)
    }

    /// The load probe of `addr` answered with `load`.
    pub fn on_load(&mut self, addr: SocketAddrV4, load: Load) {
        if let Some(k) = self.find(addr) {
            k.load = Some(load);
        }
    }

    /// `addr` did not answer (the probe or the join), refused the join, or its stream stopped:
    /// try it after the others until `now` + [`AVOID_FOR`].
    pub fn on_failed(&mut self, now: Instant, addr: SocketAddrV4) {
        if let Some(k) = self.find(addr) {
            k.avoid_until = Some(now + AVOID_FOR);
        }
    }

    /// The peer joined `addr`; true when that is a failover (it was on another splitter).
    pub fn on_joined(&mut self, addr: SocketAddrV4) -> bool {
        let Some(i) = self.splitters.iter().position(|k| k.addr == addr) else {
            return false;
        };
        let failover = self.current.is_some_and(|c| c != i);
        self.failovers += u64::from(failover);
        self.current = Some(i);
        self.splitters[i].avoid_until = None;
        self.herd = false;
        failover
    }

    /// The peer's team session on its current splitter ended (the stream stopped): that
    /// splitter is tried last for a while. It stays [`Choice::current`] until the next join.
    pub fn on_stalled(&mut self, now: Instant) {
        if let Some(i) = self.current
            && self.splitters.len() > 1
        {
            self.splitters[i].avoid_until = Some(now + AVOID_FOR);
            self.herd = true;
        }
    }

    /// Forgets the loads (before a new round of probes).
    pub fn forget_loads(&mut self) {
        for k in &mut self.splitters {
            k.load = None;
        }
    }

    /// The order in which to try the splitters at `now`: first those not avoided and not full,
    /// least loaded first (a splitter whose load is unknown counts as loaded as the average of
    /// the known ones), equals in an order drawn from `random`; then the full ones; then the
    /// avoided ones, the one avoided longest ago first. Every splitter is in the list. After a
    /// stall (until the next join) the first is instead drawn among those not avoided and not
    /// full, with weights that even their loads out over a herd of the average load's size.
    pub fn order(&self, now: Instant, random: u64) -> Vec<SocketAddrV4> {
        let known: Vec<u32> = self
            .splitters
            .iter()
            .filter_map(|k| k.load.map(|l| l.peers))
            .collect();
        let average = if known.is_empty() {
            0
        } else {
            (known.iter().map(|&p| u64::from(p)).sum::<u64>() / known.len() as u64) as u32
        };
        let mut rng = random | 1;
        let mut keyed: Vec<((u8, u64, u64), SocketAddrV4)> = self
            .splitters
            .iter()
            .map(|k| {
                // xorshift64: one tie-breaking draw per splitter.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = match k.avoid_until {
                    Some(t) if t > now => (2, t.duration_since(now).as_millis() as u64, rng),
                    _ => match k.load {
                        Some(l) if l.full() => (1, u64::from(l.peers), rng),
                        Some(l) => (0, u64::from(l.peers), rng),
                        None => (0, u64::from(average), rng),
                    },
                };
                (key, k.addr)
            })
            .collect();
        keyed.sort_by_key(|&(key, _)| key);
        let mut order: Vec<SocketAddrV4> = keyed.iter().map(|&(_, a)| a).collect();
        if self.herd {
            // All the peers of a splitter that stopped probe at about the same moment and see
            // the same loads: were each to take the least loaded, they would all land on it.
            // Instead the first choice is drawn with weights that, over the herd (about as many
            // peers as the others have on average), even the loads out.
            let live: Vec<(usize, u32)> = keyed
                .iter()
                .enumerate()
                .filter(|(_, ((rank, _, _), _))| *rank == 0)
                .map(|(i, ((_, load, _), _))| (i, *load as u32))
                .collect();
            if live.len() > 1 {
                let sum: u64 = live.iter().map(|&(_, l)| u64::from(l)).sum();
                let n = live.len() as u64;
                let target = (sum + sum / n).div_ceil(n);
                let weights: Vec<u64> = live
                    .iter()
                    .map(|&(_, l)| target.saturating_sub(u64::from(l)).max(1))
                    .collect();
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let mut draw = rng % weights.iter().sum::<u64>();
                let pick = weights
                    .iter()
                    .position(|&w| {
                        if draw < w {
                            true
                        } else {
                            draw -= w;
                            false
                        }
                    })
                    .unwrap_or(0);
                let chosen = order.remove(live[pick].0);
                order.insert(0, chosen);
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new([198, 18, 0, last].into(), 8001)
    }

    #[test]
    fn loads_parse() {
        assert_eq!(
            Load::parse("12 20"),
            Some(Load {
                peers: 12,
                max: Some(20)
            })
        );
        assert_eq!(
            Load::parse("3 0"),
            Some(Load {
                peers: 3,
                max: None
            })
        );
        assert!(Load::parse("20 20").unwrap().full());
        assert_eq!(Load::parse("1"), None);
        assert_eq!(Load::parse("1 2 3"), None);
        assert_eq!(Load::parse("-1 2"), None);
    }

    #[test]
    fn probe_answers_decode() {
        let ours = load_response(7, 50);
        assert_eq!(
            ProbeAnswer::decode(&ours, false),
            ProbeAnswer::Ours(Load {
                peers: 7,
                max: Some(50)
            })
        );
        assert_eq!(
            ProbeAnswer::decode(&ours[..10], false),
            ProbeAnswer::NeedMore
        );
        assert_eq!(ProbeAnswer::decode(&ours[..10], true), ProbeAnswer::Bad);
        assert_eq!(ProbeAnswer::decode(b"HT", false), ProbeAnswer::NeedMore);
        assert_eq!(ProbeAnswer::decode(b"", false), ProbeAnswer::NeedMore);
        assert_eq!(
            ProbeAnswer::decode(b"HTTP/1.0 404 Not Found\r\n\r\n", false),
            ProbeAnswer::Bad
        );
        let config = JoinConfig {
            source: ep(1),
            channel: "stream".into(),
            header_size: 100,
            chunk_size: 1024,
            buffer_size: 256,
            monitors: 1,
            peers: vec![ep(2), ep(3), ep(4)],
        };
        let mut bytes = Vec::new();
        config.encode(&mut bytes).unwrap();
        assert_eq!(
            ProbeAnswer::decode(&bytes, false),
            ProbeAnswer::Reference(Load {
                peers: 3,
                max: None
            })
        );
        assert_eq!(
            ProbeAnswer::decode(&bytes[..bytes.len() - 1], false),
            ProbeAnswer::NeedMore
        );
        assert_eq!(
            ProbeAnswer::decode(&bytes[..bytes.len() - 1], true),
            ProbeAnswer::Bad
        );
    }

    #[test]
    fn the_least_loaded_goes_first_and_ties_are_random() {
        let t0 = Instant::now();
        let mut c = Choice::new(&[ep(1), ep(2), ep(3), ep(2)]);
        assert_eq!(c.splitters().count(), 3);
        assert!(c.has_alternatives());
        for (i, n) in [(1, 5), (2, 3), (3, 5)] {
            c.on_load(
                ep(i),
                Load {
                    peers: n,
                    max: Some(6),
                },
            );
        }
        let mut firsts = std::collections::HashSet::new();
        let mut seconds = std::collections::HashSet::new();
        for r in 0..64 {
            let o = c.order(t0, r * 0x9e37_79b9);
            assert_eq!(o[0], ep(2));
            firsts.insert(o[0]);
            seconds.insert(o[1]);
        }
        assert_eq!(firsts.len(), 1);
        assert_eq!(seconds.len(), 2, "equals in a random order");
    }

    #[test]
    fn full_and_failed_splitters_go_last_for_a_while() {
        let t0 = Instant::now();
        let mut c = Choice::new(&[ep(1), ep(2), ep(3)]);
        c.on_load(
            ep(1),
            Load {
                peers: 6,
                max: Some(6),
            },
        );
        c.on_load(
            ep(2),
            Load {
                peers: 0,
                max: None,
            },
        );
        c.on_load(
            ep(3),
            Load {
                peers: 4,
                max: None,
            },
        );
        c.on_failed(t0, ep(2));
        assert_eq!(c.order(t0, 1), vec![ep(3), ep(1), ep(2)]);
        assert_eq!(
            c.order(t0 + AVOID_FOR, 1),
            vec![ep(2), ep(3), ep(1)],
            "avoided no longer"
        );
        // An unknown load counts as the average of the known ones: (6 + 0 + 4) / 3 = 3.
        let mut u = Choice::new(&[ep(1), ep(2), ep(3)]);
        u.on_load(
            ep(1),
            Load {
                peers: 2,
                max: None,
            },
        );
        u.on_load(
            ep(2),
            Load {
                peers: 6,
                max: None,
            },
        );
        assert_eq!(u.order(t0, 7), vec![ep(1), ep(3), ep(2)]);
    }

    #[test]
    fn a_herd_from_a_stopped_splitter_evens_the_others_out() {
        let t0 = Instant::now();
        let mut c = Choice::new(&[ep(1), ep(2), ep(3)]);
        c.on_joined(ep(1));
        c.on_stalled(t0);
        for (i, n) in [(2, 18), (3, 22)] {
            c.on_load(
                ep(i),
                Load {
                    peers: n,
                    max: None,
                },
            );
        }
        // About 20 peers arrive at once: 12 to the one with 18 and 8 to the other make 30/30, so
        // weights 12:8 (60 %), not all of them to the least loaded.
        let draws = 10_000;
        let to_2 = (0..draws)
            .filter(|&r| c.order(t0, r * 0x9e37_79b9_7f4a_7c15 + 1)[0] == ep(2))
            .count();
        assert!((5700..6300).contains(&to_2), "{to_2}");
        // Every splitter still in the order, the stopped one last.
        let o = c.order(t0, 5);
        assert_eq!(o.len(), 3);
        assert_eq!(o[2], ep(1));
        // Once joined, arrivals take the least loaded again.
        c.on_joined(ep(3));
        assert!((0..100).all(|r| c.order(t0, r)[0] == ep(2)));
    }

    #[test]
    fn a_stall_moves_the_peer_to_another_splitter_and_counts_a_failover() {
        let t0 = Instant::now();
        let mut c = Choice::new(&[ep(1), ep(2)]);
        assert!(!c.on_joined(ep(1)), "the first join is no failover");
        assert_eq!(c.current(), Some(ep(1)));
        c.on_stalled(t0 + Duration::from_secs(1));
        assert_eq!(c.order(t0 + Duration::from_secs(2), 5)[0], ep(2));
        assert!(c.on_joined(ep(2)));
        assert_eq!(c.failovers(), 1);
        // Rejoining the same splitter (it restarted) is no failover.
        assert!(!c.on_joined(ep(2)));
        assert_eq!(c.failovers(), 1);
        // With one splitter a stall does not push it back.
        let mut one = Choice::new(&[ep(1)]);
        one.on_joined(ep(1));
        one.on_stalled(t0);
        assert_eq!(one.order(t0, 3), vec![ep(1)]);
    }
}
