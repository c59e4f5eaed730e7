//! A peer's relay decision, per datagram: [`Peer::handle_datagram`] and then draining
//! [`Peer::poll_transmit`] and [`Peer::poll_event`], in a team of 16 (the peer and 15 neighbours)
//! with 1024-byte chunks.
//!
//! - `round_of_16`: the steady state. Of every 16 consecutive chunks one comes from the splitter
//!   and 15 from the neighbours that got them from the splitter; each received chunk lets one
//!   relay of the splitter's chunk out, and every chunk is played. 16 datagrams in, 15 relays and
//!   16 plays out per round.
//! - `splitter_only`: the neighbours relay nothing back, so each chunk from the splitter first
//!   bursts the 14 relays of the previous one that are still owed, then relays the new one to the
//!   first neighbour: 15 relays per datagram, the most one datagram can cause. (The debt limit is
//!   lifted so that nobody is dropped.)
//!
//! The datagrams are built outside the timed part; the real peer also copies each received
//! datagram into a fresh [`Bytes`] (`peer/mod.rs`), which is not measured here.

mod common;

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use p2psp::proto::Endpoint;
use p2psp::proto::peer::{Peer, PeerRules};
use p2psp::proto::wire::encode_chunk;

const CHUNK_SIZE: usize = 1024;
const TEAM: usize = 16;
const BUFFER: u16 = 256;

fn ep(port: u16) -> Endpoint {
    Endpoint::new(Ipv4Addr::LOCALHOST, port)
}

const SPLITTER: u16 = 8001;

fn neighbours() -> Vec<Endpoint> {
    (1..TEAM as u16).map(|i| ep(40_000 + i)).collect()
}

fn datagram(n: u16) -> Bytes {
    let mut d = Vec::with_capacity(CHUNK_SIZE + 2);
    encode_chunk(n, &[n as u8; CHUNK_SIZE], &mut d);
    Bytes::from(d)
}

/// Feeds `round` to the peer and drains what comes out; returns the emptied vector so that its
/// deallocation is not timed.
fn feed(
    peer: &mut Peer,
    now: Instant,
    mut round: Vec<(Endpoint, Bytes)>,
) -> Vec<(Endpoint, Bytes)> {
    for (from, d) in round.drain(..) {
        peer.handle_datagram(now, from, d);
        while let Some(t) = peer.poll_transmit() {
            black_box(&t);
        }
        while let Some(e) = peer.poll_event() {
            black_box(&e);
        }
    }
    round
}

/// A peer that joined a team whose list is `neighbours`, the first of them a monitor (the
/// splitter's default of one monitor per team).
fn new_peer(rules: PeerRules, neighbours: &[Endpoint]) -> Peer {
    let mut p = Peer::new(rules, neighbours, 1);
    while p.poll_transmit().is_some() {}
    p
}

fn round_of_16(c: &mut Criterion) {
    let now = Instant::now();
    let neighbours = neighbours();
    let mut peer = new_peer(
        PeerRules::new(ep(SPLITTER), CHUNK_SIZE, BUFFER),
        &neighbours,
    );
    let mut next = 0u16;
    let mut g = c.benchmark_group("relay/team_of_16");
    g.throughput(Throughput::Elements(TEAM as u64));
    g.bench_function("round_of_16", |b| {
        b.iter_batched(
            || {
                // Chunk `next` is ours (from the splitter); chunks next+1..next+15 were sent to
                // neighbours 1..15, which relay them to us.
                let round: Vec<_> = (0..TEAM as u16)
                    .map(|k| {
                        let from = if k == 0 {
                            ep(SPLITTER)
                        } else {
                            neighbours[usize::from(k) - 1]
                        };
                        (from, datagram(next.wrapping_add(k)))
                    })
                    .collect();
                next = next.wrapping_add(TEAM as u16);
                round
            },
            |round| feed(&mut peer, now, round),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    // Sanity checks of the scenario (nothing runs when a filter skips this bench).
    let s = *peer.stats();
    assert_eq!(s.lost + s.late + s.duplicates + s.debt_drops, 0, "{s:?}");
    // Every round relays our chunk once to each of the 15 neighbours.
    assert_eq!(s.relayed, s.from_splitter * (TEAM as u64 - 1), "{s:?}");
}

fn splitter_only(c: &mut Criterion) {
    let now = Instant::now();
    let neighbours = neighbours();
    let mut rules = PeerRules::new(ep(SPLITTER), CHUNK_SIZE, BUFFER);
    rules.max_debt = i32::MAX;
    let mut peer = new_peer(rules, &neighbours);
    let mut next = 0u16;
    let mut g = c.benchmark_group("relay/team_of_16");
    g.throughput(Throughput::Elements(1));
    g.bench_function("splitter_only", |b| {
        b.iter_batched(
            || {
                next = next.wrapping_add(1);
                vec![(ep(SPLITTER), datagram(next))]
            },
            |round| feed(&mut peer, now, round),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    // Sanity checks of the scenario (nothing runs when a filter skips this bench).
    let s = *peer.stats();
    assert_eq!(s.lost + s.late + s.duplicates + s.debt_drops, 0, "{s:?}");
    if s.from_splitter > 0 {
        assert_eq!(
            s.relayed,
            s.from_splitter * (TEAM as u64 - 1) - (TEAM as u64 - 2),
            "{s:?}"
        );
    }
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(1), Duration::from_secs(3), 20);
    targets = round_of_16, splitter_only
}
criterion_main!(benches);
