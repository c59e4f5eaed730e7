//! A deterministic in-memory team: the splitter's DBS core and many peer cores exchange datagrams
//! through a seeded, reordering "network" with time as a plain counter. No sockets, no sleeps.
//! The network can drop a share of what each peer receives (as `p2psp peer --drop-rate` does).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2psp::proto::Endpoint;
use p2psp::proto::directory::{Directory, DirectoryRules};
use p2psp::proto::peer::{Peer, PeerEvent, PeerRules, Removal};
use p2psp::proto::team::{TeamEvent, TeamRules, Teams};
use p2psp::proto::wire::encode_chunk;

const C: usize = 64;
const B: u16 = 64;

fn ep(port: u16) -> Endpoint {
    Endpoint::new([127, 0, 0, 1].into(), port)
}

struct Net {
    splitter: Endpoint,
    dir: Directory,
    teams: Teams,
    peers: HashMap<Endpoint, Peer>,
    played: HashMap<Endpoint, Vec<u16>>,
    lost: HashMap<Endpoint, u64>,
    dead: Vec<Endpoint>,
    wire: VecDeque<(Endpoint, Endpoint, Bytes)>,
    rng: u64,
    now: Instant,
    team_events: Vec<TeamEvent>,
    buffer: u16,
    /// Share of the datagrams each peer receives that the network drops.
    drop_rate: f64,
    /// Plain peers ask the splitter for their own losses (`p2psp peer --lrs`).
    request_lost: bool,
    /// Peers that never relay.
    free_riders: HashSet<Endpoint>,
    /// (who, whom) a peer dropped for debt.
    debt_drops: Vec<(Endpoint, Endpoint)>,
    dropped: u64,
}

impl Net {
    fn new(team_size: usize) -> Net {
        Net {
            splitter: ep(8001),
            dir: Directory::new(DirectoryRules {
                team_size,
                monitors: 1,
                shards: 1,
            }),
            teams: Teams::new(TeamRules {
                buffer_size: B,
                ..TeamRules::default()
            }),
            peers: HashMap::new(),
            played: HashMap::new(),
            lost: HashMap::new(),
            dead: Vec::new(),
            wire: VecDeque::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
            now: Instant::now(),
            team_events: Vec::new(),
            buffer: B,
            drop_rate: 0.0,
            request_lost: false,
            free_riders: HashSet::new(),
            debt_drops: Vec::new(),
            dropped: 0,
        }
    }

    /// A team with LRS at the splitter and at plain peers, and a buffer of `buffer` chunks.
    fn with_lrs(team_size: usize, buffer: u16) -> Net {
        let mut net = Net::new(team_size);
        net.buffer = buffer;
        net.request_lost = true;
        net.teams = Teams::new(TeamRules {
            buffer_size: buffer,
            lrs: true,
            ..TeamRules::default()
        });
        net
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn join(&mut self, who: Endpoint, monitor: bool) {
        let placement = self.dir.place(who, monitor);
        let mut rules = PeerRules::new(self.splitter, C, self.buffer);
        rules.monitor = placement.monitor;
        rules.request_lost = self.request_lost;
        rules.relay = !self.free_riders.contains(&who);
        let mut peer = Peer::new(rules, &placement.peers, placement.monitors);
        // Hellos go out before the splitter adds the peer (it waits for the ready byte).
        self.flush(who, &mut peer);
        self.peers.insert(who, peer);
        self.teams.insert(placement.team, who, placement.monitor);
    }

    fn flush(&mut self, from: Endpoint, peer: &mut Peer) {
        while let Some(t) = peer.poll_transmit() {
            self.wire.push_back((from, t.dest, t.payload));
        }
        while let Some(e) = peer.poll_event() {
            match e {
                PeerEvent::Play { number, .. } => self.played.entry(from).or_default().push(number),
                PeerEvent::Lost { .. } => *self.lost.entry(from).or_default() += 1,
                PeerEvent::NeighbourRemoved {
                    peer,
                    reason: Removal::Debt,
                } => self.debt_drops.push((from, peer)),
                _ => {}
            }
        }
    }

    /// Delivers everything in flight, in a seeded shuffled order.
    fn deliver(&mut self) {
        while !self.wire.is_empty() {
            let i = (self.random() % self.wire.len().min(4) as u64) as usize;
            let (from, to, data) = self.wire.remove(i).unwrap();
            if to == self.splitter {
                self.teams.handle_datagram(from, &data);
                continue;
            }
            if self.dead.contains(&to) {
                continue;
            }
            if self.drop_rate > 0.0
                && (self.random() >> 11) as f64 / (1u64 << 53) as f64 <= self.drop_rate
            {
                self.dropped += 1;
                continue;
            }
            if let Some(mut peer) = self.peers.remove(&to) {
                peer.handle_datagram(self.now, from, data);
                self.flush(to, &mut peer);
                self.peers.insert(to, peer);
            }
        }
        while let Some((to, g)) = self.teams.poll_transmit() {
            self.wire
                .push_back((self.splitter, to, Bytes::from_static(g)));
        }
        while let Some(e) = self.teams.poll_event() {
            let (TeamEvent::Left { peer, .. }
            | TeamEvent::Expelled { peer, .. }
            | TeamEvent::Polluter { peer, .. }) = e;
            self.dir.remove(peer);
            self.team_events.push(e);
        }
    }

    fn chunk(&mut self, n: u16) {
        self.now += Duration::from_millis(4);
        self.teams.handle_timeout(self.now);
        let mut d = Vec::new();
        encode_chunk(n, &[n as u8; C], &mut d);
        let d = Bytes::from(d);
        let mut dests = Vec::new();
        self.teams.on_chunk(n, &mut dests);
        for to in dests {
            self.wire.push_back((self.splitter, to, d.clone()));
        }
        self.deliver();
    }

    /// Like `chunk`, and also resends what the splitter's LRS asks for, from a history of chunks.
    fn chunk_lrs(&mut self, n: u16) {
        self.chunk(n);
        while let Some((number, to)) = self.teams.poll_resend() {
            let mut d = Vec::new();
            encode_chunk(number, &[number as u8; C], &mut d);
            self.wire.push_back((self.splitter, to, Bytes::from(d)));
        }
        self.deliver();
    }

    /// A peer leaves: politely (goodbye) or by vanishing.
    fn leave(&mut self, who: Endpoint, politely: bool) {
        if politely {
            let now = self.now;
            let mut peer = self.peers.remove(&who).unwrap();
            peer.leave(now);
            self.flush(who, &mut peer);
            self.peers.insert(who, peer);
        } else {
            self.dead.push(who);
        }
    }

    fn assert_contiguous(&self, who: Endpoint) -> usize {
        let played = &self.played[&who];
        for w in played.windows(2) {
            assert_eq!(
                w[1],
                w[0].wrapping_add(1),
                "{who} played out of order or skipped"
            );
        }
        assert_eq!(
            self.lost.get(&who).copied().unwrap_or(0),
            0,
            "{who} lost chunks"
        );
        played.len()
    }
}

#[test]
fn a_team_of_16_plays_everything_across_the_wrap() {
    let mut net = Net::new(16);
    net.join(ep(1000), true);
    for p in 1..16 {
        net.join(ep(1000 + p), false);
    }
    let mut n = 65000u16;
    for _ in 0..2000 {
        net.chunk(n);
        n = n.wrapping_add(1);
    }
    for p in 0..16 {
        let played = net.assert_contiguous(ep(1000 + p));
        assert!(played > 1900, "peer {p} played only {played}");
    }
}

#[test]
fn several_teams_of_4() {
    let mut net = Net::new(4);
    for p in 0..16 {
        net.join(ep(2000 + p), p % 4 == 0);
    }
    assert_eq!(net.teams.team_count(), 4);
    for n in 0..1000 {
        net.chunk(n);
    }
    for p in 0..16 {
        net.assert_contiguous(ep(2000 + p));
    }
}

#[test]
fn churn_with_goodbyes_and_joins_loses_nothing_for_those_who_stay() {
    let mut net = Net::new(16);
    net.join(ep(3000), true);
    for p in 1..12 {
        net.join(ep(3000 + p), false);
    }
    for n in 0..300 {
        net.chunk(n);
    }
    for p in [3, 5, 7] {
        let now = net.now;
        let mut peer = net.peers.remove(&ep(3000 + p)).unwrap();
        peer.leave(now);
        net.flush(ep(3000 + p), &mut peer);
        net.peers.insert(ep(3000 + p), peer);
    }
    for p in 20..25 {
        net.join(ep(3000 + p), false);
    }
    for n in 300..1000 {
        net.chunk(n);
    }
    for p in [3, 5, 7] {
        assert!(net.peers[&ep(3000 + p)].has_left());
        assert!(net.team_events.contains(&TeamEvent::Left {
            peer: ep(3000 + p),
            team: 0
        }));
    }
    for p in (0..12).filter(|p| ![3, 5, 7].contains(p)).chain(20..25) {
        net.assert_contiguous(ep(3000 + p));
    }
}

#[test]
fn a_vanished_peer_is_expelled_through_the_monitors_loss_reports() {
    let mut net = Net::new(4);
    for p in 0..4 {
        net.join(ep(4000 + p), p == 0);
    }
    for n in 0..200 {
        net.chunk(n);
    }
    net.dead.push(ep(4002));
    for n in 200..700 {
        net.chunk(n);
    }
    assert!(
        net.team_events
            .iter()
            .any(|e| matches!(e, TeamEvent::Expelled { peer, .. } if *peer == ep(4002)))
    );
    // Once it is gone nothing more is lost.
    let monitor = &net.played[&ep(4000)];
    let tail = &monitor[monitor.len() - 100..];
    assert!(tail.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn with_lrs_vanished_peers_cost_the_others_nothing() {
    // LRS needs the round (team size) well inside a quarter of the buffer: a monitor reports a
    // chunk B/4 behind the newest and the resend must reach everyone before B/2.
    let mut net = Net::new(16);
    net.buffer = 128;
    net.teams = Teams::new(TeamRules {
        buffer_size: 128,
        lrs: true,
        ..TeamRules::default()
    });
    for p in 0..10 {
        net.join(ep(5000 + p), p == 0);
    }
    for n in 0..200 {
        net.chunk(n);
    }
    // Two peers vanish at once, in the middle of relaying.
    net.dead.push(ep(5004));
    net.dead.push(ep(5005));
    for n in 200..1200 {
        net.chunk_lrs(n);
    }
    assert_eq!(
        net.team_events
            .iter()
            .filter(|e| matches!(e, TeamEvent::Expelled { .. }))
            .count(),
        2
    );
    for p in (0..10).filter(|p| *p != 4 && *p != 5) {
        net.assert_contiguous(ep(5000 + p));
    }
}

#[test]
fn with_lrs_and_2_percent_loss_at_every_peer_nobody_loses_a_chunk() {
    let mut net = Net::with_lrs(16, 256);
    net.drop_rate = 0.02;
    for p in 0..16 {
        net.join(ep(6000 + p), p == 0);
    }
    for n in 0..5000u16 {
        net.chunk_lrs(n.wrapping_add(63000));
    }
    // Every peer receives each chunk about once: 2 % of 80 000.
    assert!(
        net.dropped > 1200,
        "the network dropped only {}",
        net.dropped
    );
    for p in 0..16 {
        let played = net.assert_contiguous(ep(6000 + p));
        assert!(played > 4700, "peer {p} played only {played}");
    }
    let c = net.teams.counters();
    assert!(c.loss_reports > 0 && c.loss_requests > 0, "{c:?}");
    assert_eq!(c.expelled, 0, "nobody is expelled for the network's losses");
    assert_eq!(c.resends_refused, 0, "{c:?}");
}

#[test]
fn without_lrs_2_percent_loss_does_cost_chunks() {
    // The control for the test above: the losses are real.
    let mut net = Net::new(16);
    net.buffer = 256;
    net.teams = Teams::new(TeamRules {
        buffer_size: 256,
        ..TeamRules::default()
    });
    net.drop_rate = 0.02;
    for p in 0..16 {
        net.join(ep(6100 + p), p == 0);
    }
    for n in 0..2000 {
        net.chunk(n);
    }
    let lost: u64 = net.lost.values().sum();
    assert!(lost > 100, "only {lost} lost");
}

#[test]
fn a_free_rider_is_dropped_by_its_teammates_and_expelled_by_the_splitter() {
    let mut net = Net::with_lrs(8, 64);
    let rider = ep(7004);
    net.free_riders.insert(rider);
    for p in 0..8 {
        net.join(ep(7000 + p), p == 0);
    }
    for n in 0..3000 {
        net.chunk_lrs(n);
    }
    assert!(
        net.team_events
            .iter()
            .any(|e| matches!(e, TeamEvent::Expelled { peer, .. } if *peer == rider)),
        "the splitter expelled the free rider: {:?}",
        net.team_events
    );
    for p in (0..8).filter(|&p| ep(7000 + p) != rider) {
        let who = ep(7000 + p);
        assert!(
            net.debt_drops.contains(&(who, rider)),
            "{who} dropped the free rider for debt"
        );
        assert!(net.peers[&who].neighbours().all(|n| n.0 != rider));
        // With LRS its teammates lose nothing meanwhile.
        net.assert_contiguous(who);
    }
    assert_eq!(
        net.team_events.len(),
        1,
        "only the free rider was removed: {:?}",
        net.team_events
    );
}

/// 60 s of stream (4 ms chunks) in two teams of 10 (room for 12); every 6 s a peer leaves (half of them
/// vanishing without a goodbye) and a new one joins: 30 % of the peers are replaced. With LRS
/// nobody who is there at the end lost a chunk.
#[test]
fn churn_of_30_percent_in_60_seconds_costs_the_stayers_nothing() {
    let mut net = Net::with_lrs(12, 128);
    let mut present = Vec::new();
    for p in 0..20 {
        net.join(ep(20000 + p), p < 2);
        present.push(ep(20000 + p));
    }
    let mut next_port = 20100;
    let (mut gone, mut killed) = (0, 0);
    for n in 0..15_000u16 {
        net.chunk_lrs(n);
        // Every 1250 chunks (5 s) a plain peer goes, every other one without a goodbye, and a
        // newcomer takes its place.
        if n % 1250 == 625 {
            let i = 1 + (net.random() as usize % (present.len() - 1));
            let who = present[i];
            if net.peers[&who].rules().monitor {
                continue;
            }
            present.remove(i);
            let politely = gone % 2 == 0;
            killed += usize::from(!politely);
            gone += 1;
            net.leave(who, politely);
            net.join(ep(next_port), false);
            present.push(ep(next_port));
            next_port += 1;
        }
    }
    assert!(
        gone >= 6 && killed >= 3,
        "{gone} left, {killed} without goodbye"
    );
    assert_eq!(
        net.teams.team_count(),
        2,
        "newcomers found room in the two teams"
    );
    let expelled = net
        .team_events
        .iter()
        .filter(|e| matches!(e, TeamEvent::Expelled { .. }))
        .count();
    assert_eq!(
        expelled, killed,
        "every vanished peer was expelled: {:?}",
        net.team_events
    );
    for who in present {
        let played = net.assert_contiguous(who);
        assert!(played > 400, "{who} played only {played}");
    }
}
