//! NTS port probing (issue 11, `src/proto/nts_probe.rs`) in memory: the splitter's planner and
//! two probing peers exchange datagrams through model NATs, with time as a counter; no
//! sockets, no sleeps. Many pairs with different seeds and different amounts of other traffic
//! give success rates that the lab cannot (it takes ≈ 35 s per team).
//!
//! NAT model (filtering by remote endpoint everywhere, as the lab's port-restricted and
//! symmetric kinds): port-restricted keeps the private port for every destination; sequential
//! symmetric gives each new (private port, destination) the next port of a counter; random
//! symmetric a random free port in 1024–65535.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use p2psp::proto::Endpoint;
use p2psp::proto::nts::{ID_LEN, PeerId};
use p2psp::proto::nts_probe::{
    PAIR_GRACE, PeerView, ProbeAction, ProbePeer, ProbePlanner, ProbeToSplitter, Rendezvous,
    SESSION_TIME, SockRef,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PortRestricted,
    Sequential,
    Random,
}

struct Nat {
    kind: Kind,
    ip: Ipv4Addr,
    out: HashMap<(u16, Endpoint), u16>,
    back: HashMap<u16, (u16, HashSet<Endpoint>)>,
    next: u16,
    rng: u64,
}

impl Nat {
    fn new(kind: Kind, ip: Ipv4Addr, seed: u64) -> Nat {
        Nat {
            kind,
            ip,
            out: HashMap::new(),
            back: HashMap::new(),
            next: 20000,
            rng: seed | 1,
        }
    }

    fn map_out(&mut self, private: u16, to: Endpoint) -> u16 {
        let port = match self.out.get(&(private, to)) {
            Some(&p) => p,
            None => {
                let p = match self.kind {
                    Kind::PortRestricted => private,
                    Kind::Sequential => {
                        self.next += 1;
                        self.next - 1
                    }
                    Kind::Random => loop {
                        self.rng ^= self.rng << 13;
                        self.rng ^= self.rng >> 7;
                        self.rng ^= self.rng << 17;
                        let p = 1024 + (self.rng % 64512) as u16;
                        if !self.back.contains_key(&p) {
                            break p;
                        }
                    },
                };
                self.out.insert((private, to), p);
                p
            }
        };
        self.back
            .entry(port)
            .or_insert_with(|| (private, HashSet::new()))
            .1
            .insert(to);
        port
    }

    fn map_in(&self, port: u16, from: Endpoint) -> Option<u16> {
        let (private, sent_to) = self.back.get(&port)?;
        sent_to.contains(&from).then_some(*private)
    }
}

const MAIN: u16 = 5000;

struct Node {
    id: PeerId,
    nat: Nat,
    probe: ProbePeer,
    /// Probe sockets by private port.
    sockets: HashMap<SockRef, u16>,
    next_private: u16,
    /// The teammates it heard from (at a probe socket or the team socket).
    reached: HashSet<PeerId>,
}

struct Net {
    nodes: Vec<Node>,
    planner: ProbePlanner,
    splitter: Endpoint,
    /// (from public endpoint, to, bytes)
    queue: VecDeque<(Endpoint, Endpoint, Vec<u8>)>,
}

impl Net {
    fn send(&mut self, n: usize, private: u16, to: Endpoint, data: Vec<u8>) {
        let node = &mut self.nodes[n];
        let port = node.nat.map_out(private, to);
        self.queue
            .push_back((Endpoint::new(node.nat.ip, port), to, data));
    }

    fn pump(&mut self, n: usize) {
        while let Some(a) = self.nodes[n].probe.poll_action() {
            let node = &mut self.nodes[n];
            match a {
                ProbeAction::Open { session, count } => {
                    for index in 0..count {
                        node.sockets
                            .insert(SockRef::Probe { session, index }, node.next_private);
                        node.next_private += 1;
                    }
                }
                ProbeAction::Send { from, to, data } => {
                    if let Some(p) = self.private(n, from) {
                        self.send(n, p, to, data);
                    }
                }
                ProbeAction::SendEach { session, to, data } => {
                    let mut ports: Vec<u16> = node
                        .sockets
                        .iter()
                        .filter(|(s, _)| matches!(s, SockRef::Probe { session: x, .. } if *x == session))
                        .map(|(_, &p)| p)
                        .collect();
                    ports.sort_unstable();
                    for p in ports {
                        self.send(n, p, to, data.clone());
                    }
                }
                ProbeAction::SendMany {
                    from,
                    ip,
                    ports,
                    data,
                } => {
                    if let Some(p) = self.private(n, from) {
                        for port in ports {
                            self.send(n, p, Endpoint::new(ip, port), data.clone());
                        }
                    }
                }
                ProbeAction::Close { session, keep } => {
                    node.sockets.retain(|s, _| match s {
                        SockRef::Probe { session: x, index } => {
                            *x != session || Some(*index) == keep
                        }
                        SockRef::Main => true,
                    });
                }
                ProbeAction::Reached { id, .. } => {
                    node.reached.insert(id);
                }
            }
        }
    }

    fn private(&self, n: usize, s: SockRef) -> Option<u16> {
        match s {
            SockRef::Main => Some(MAIN),
            p => self.nodes[n].sockets.get(&p).copied(),
        }
    }

    /// Delivers everything queued (and what that makes).
    fn deliver(&mut self, now: Instant) {
        let mut budget = 200_000;
        while let Some((from, to, data)) = self.queue.pop_front() {
            budget -= 1;
            assert!(budget > 0, "a datagram storm");
            if to == self.splitter {
                if let Some(ProbeToSplitter::Query { id, session }) = ProbeToSplitter::parse(&data)
                {
                    let mut out = Vec::new();
                    if self.planner.query(id, session, from, &mut out) {
                        self.queue.push_back((self.splitter, from, data.clone()));
                    }
                    for (to, d) in out {
                        self.queue.push_back((self.splitter, to, d));
                    }
                }
                if let Some(ProbeToSplitter::Capable(id)) = ProbeToSplitter::parse(&data) {
                    self.planner.capable(id);
                }
                continue;
            }
            let Some(n) = self.nodes.iter().position(|x| x.nat.ip == *to.ip()) else {
                continue;
            };
            let Some(private) = self.nodes[n].nat.map_in(to.port(), from) else {
                continue; // filtered
            };
            let other = (data.len() == ID_LEN)
                .then(|| {
                    self.nodes
                        .iter()
                        .map(|x| x.id)
                        .find(|id| id.as_bytes()[..] == data[..])
                })
                .flatten()
                .filter(|id| *id != self.nodes[n].id);
            if private == MAIN {
                if from == self.splitter {
                    if let Some(r) = Rendezvous::parse(&data) {
                        self.nodes[n].probe.on_rendezvous(now, r);
                    }
                } else if let Some(other) = other {
                    // What NTS does with a teammate's hello: echo it, say hello back.
                    let node = &mut self.nodes[n];
                    node.probe.note_heard(other);
                    if node.reached.insert(other) {
                        let me = node.id.as_bytes().to_vec();
                        self.send(n, MAIN, from, data.clone());
                        self.send(n, MAIN, from, me);
                    }
                }
            } else if let Some((&via, _)) =
                self.nodes[n].sockets.iter().find(|(_, p)| **p == private)
            {
                self.nodes[n].probe.handle_datagram(now, via, from, &data);
            }
            self.pump(n);
        }
    }
}

/// One pair: `a` and `b` behind NATs of those kinds; each NAT made `other_a`/`other_b`
/// mappings for other traffic between the splitter's last look and the probing. Whether both
/// ended up hearing each other within the session time, and after how long.
fn pair(a: Kind, b: Kind, other_a: u16, other_b: u16, seed: u64) -> Option<Duration> {
    joiner_and_team(&[a, b], &[other_a, other_b], seed)[0]
}

/// A joiner (`kinds[0]`) and the team it joins (`kinds[1..]`), each behind its own NAT that
/// made `other[i]` mappings for other traffic between the splitter's last look and the probing;
/// the splitter pairs the joiner with every member at once, as when list 2 goes out. Per member:
/// whether it and the joiner ended up hearing each other within the session time, and after how
/// long (from the rendezvous).
fn joiner_and_team(kinds: &[Kind], other: &[u16], seed: u64) -> Vec<Option<Duration>> {
    let t0 = Instant::now();
    let splitter = Endpoint::new(Ipv4Addr::new(198, 18, 0, 1), 8001);
    let node = |i: u8, kind: Kind| Node {
        id: PeerId::from_random(seed.wrapping_mul(31).wrapping_add(u64::from(i))),
        nat: Nat::new(
            kind,
            Ipv4Addr::new(198, 18, 0, 100 + i),
            seed ^ u64::from(i) << 32,
        ),
        probe: ProbePeer::new(
            t0,
            PeerId::from_random(seed.wrapping_mul(31).wrapping_add(u64::from(i))),
            splitter,
            seed.wrapping_add(u64::from(i)),
        ),
        sockets: HashMap::new(),
        next_private: 6000,
        reached: HashSet::new(),
    };
    let mut net = Net {
        nodes: kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| node(i as u8 + 1, k))
            .collect(),
        planner: ProbePlanner::default(),
        splitter,
        queue: VecDeque::new(),
    };
    // The capability messages; the splitter's views (a monitor saw each once more).
    for n in 0..kinds.len() {
        net.pump(n);
    }
    net.deliver(t0);
    let monitor = Endpoint::new(Ipv4Addr::new(198, 18, 0, 2), 8002);
    let mut views = Vec::new();
    for (n, &other) in other.iter().enumerate() {
        let node = &mut net.nodes[n];
        let to_splitter = node.nat.map_out(MAIN, splitter);
        let to_monitor = node.nat.map_out(MAIN, monitor);
        net.planner.observe(node.id, to_splitter);
        net.planner.observe(node.id, to_monitor);
        let step = if node.nat.kind == Kind::PortRestricted {
            0
        } else {
            p2psp::proto::nts::gcd(to_splitter.abs_diff(to_monitor), 0)
        };
        views.push(PeerView {
            id: node.id,
            endpoint: Endpoint::new(node.nat.ip, to_splitter),
            step,
            last_port: to_monitor,
        });
        // Other traffic behind that NAT since.
        for k in 0..other {
            node.nat
                .map_out(MAIN, Endpoint::new(Ipv4Addr::new(198, 18, 1, 1), 10000 + k));
        }
    }
    for m in &net.nodes[1..] {
        net.planner.pair(t0, net.nodes[0].id, m.id);
    }
    let view = |id: PeerId| *views.iter().find(|v| v.id == id).unwrap();
    // The splitter's turn: the pairs (and waiting sweeps) due now get their rendezvous.
    let plan = |net: &mut Net, t: Instant| {
        net.planner.handle_timeout(t);
        for (a, b) in net.planner.due(t) {
            for (to, d) in net.planner.start(t, view(a), view(b)) {
                net.queue.push_back((splitter, to, d));
            }
        }
    };
    let now = t0 + PAIR_GRACE;
    let mut done = vec![None; kinds.len() - 1];
    let mut t = now;
    while t < now + SESSION_TIME {
        plan(&mut net, t);
        net.deliver(t);
        for (i, d) in done.iter_mut().enumerate() {
            let (j, m) = (&net.nodes[0], &net.nodes[i + 1]);
            if d.is_none() && j.reached.contains(&m.id) && m.reached.contains(&j.id) {
                *d = Some(t - now);
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        t += Duration::from_millis(50);
        for n in 0..kinds.len() {
            net.nodes[n].probe.handle_timeout(t);
            net.pump(n);
        }
    }
    done
}

fn rate(a: Kind, b: Kind, runs: u64, other: impl Fn(u64) -> (u16, u16)) -> (u64, Duration) {
    let mut ok = 0;
    let mut worst = Duration::ZERO;
    for seed in 1..=runs {
        let (x, y) = other(seed);
        if let Some(t) = pair(a, b, x, y, seed * 0x9E37_79B9) {
            ok += 1;
            worst = worst.max(t);
        }
    }
    (ok, worst)
}

/// Birthday probing: a port-restricted cone and a random symmetric NAT, 500 pairs; and a
/// port-restricted with a sequential NAT that other traffic moved on by up to 400 ports.
#[test]
fn birthday_probing_connects_port_restricted_with_symmetric() {
    let (ok, worst) = rate(Kind::PortRestricted, Kind::Random, 500, |_| (0, 0));
    eprintln!("prcn – symrp: {ok}/500 within {worst:?} of the rendezvous");
    // Theory: (1 − 256/64512)^(3·2048) ≈ 3·10⁻¹¹ to miss; allow a little.
    assert!(ok >= 498, "{ok}/500");
    let (ok, worst) = rate(Kind::Random, Kind::PortRestricted, 200, |_| (0, 0));
    eprintln!("symrp – prcn: {ok}/200 within {worst:?}");
    assert!(ok >= 199, "{ok}/200");
    let (ok, worst) = rate(Kind::PortRestricted, Kind::Sequential, 200, |s| {
        (0, (s * 2) as u16)
    });
    eprintln!("prcn – symsp (other traffic 0–400 ports): {ok}/200 within {worst:?}");
    assert_eq!(ok, 200);
}

/// The two-rate sweep: two sequential NATs, each moved on by 0–19 mappings of other traffic
/// between the splitter's look and the probing: every pair meets.
#[test]
fn two_rate_sweep_connects_sequential_pairs() {
    let (ok, worst) = rate(Kind::Sequential, Kind::Sequential, 400, |s| {
        ((s % 20) as u16, ((s / 20) % 20) as u16)
    });
    eprintln!("symsp – symsp: {ok}/400 within {worst:?}");
    assert_eq!(ok, 400);
}

/// A random symmetric NAT with a sequential one: no probing is started (the fallback's job),
/// so nothing is sent for it.
#[test]
fn no_probing_between_random_and_sequential() {
    let (ok, _) = rate(Kind::Random, Kind::Sequential, 20, |_| (0, 0));
    assert_eq!(ok, 0);
}

/// A peer joining a team of k sequential symmetric peers has k sweeps at once: the splitter
/// gives it one at a time (each query, then its sweep), so that one sweep's hellos do not move
/// its NAT past the ports the next one aims at. Teams of 10 and 25, 0–9 mappings of other
/// traffic behind each NAT: every pair meets.
#[test]
fn a_joiner_sweeps_with_every_sequential_teammate() {
    for (size, teams) in [(10usize, 40u64), (25, 10)] {
        let (mut ok, mut all, mut worst) = (0, 0, Duration::ZERO);
        for seed in 1..=teams {
            let kinds = vec![Kind::Sequential; size];
            let other: Vec<u16> = (0..size as u64)
                .map(|i| ((seed * 7 + i * 3) % 10) as u16)
                .collect();
            for d in joiner_and_team(&kinds, &other, seed * 0x9E37_79B9) {
                all += 1;
                if let Some(d) = d {
                    ok += 1;
                    worst = worst.max(d);
                }
            }
        }
        eprintln!(
            "symsp joining {} symsp: {ok}/{all} pairs within {worst:?} of the rendezvous",
            size - 1
        );
        assert_eq!(ok, all, "teams of {size}");
    }
}
