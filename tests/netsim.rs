//! A deterministic in-memory team: the splitter's DBS core and many peer cores exchange datagrams
//! through a seeded, reordering "network" with time as a plain counter. No sockets, no sleeps.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2psp::proto::Endpoint;
use p2psp::proto::directory::{Directory, DirectoryRules};
use p2psp::proto::peer::{Peer, PeerEvent, PeerRules};
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
        }
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
            let (TeamEvent::Left { peer, .. } | TeamEvent::Expelled { peer, .. }) = e;
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
