//! The splitter's fan-out of one chunk: choosing one destination per team
//! ([`Teams::on_chunk`]) and handing the batch to the kernel ([`BatchSender::send_to_all`], on the
//! io_uring and the `sendmmsg` path) for receivers on 127.0.0.1. Throughput is in destinations
//! (datagrams) per chunk.
//!
//! The send benches time `send_to_all` only. Between iterations, untimed, every receiver socket is
//! drained, so nothing is dropped for lack of buffer space. On loopback the kernel delivers each
//! datagram on the sending core (softirq), so the send time includes the receive-side enqueue;
//! no thread is blocked on the receivers, so there is no reader wakeup in it (see
//! shared/research/udp-limits.md §5: over a NIC the send path costs about half).

mod common;

use std::hint::black_box;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use p2psp::driver::{BatchSender, SendPath, SendStats, udp_socket};
use p2psp::proto::Endpoint;
use p2psp::proto::team::{TeamRules, Teams};
use p2psp::proto::wire::encode_chunk;

const CHUNK_SIZE: usize = 1024;
/// As the splitter's shards (`BatchSender::new(.., 256)` in `splitter/shard.rs`).
const MAX_BATCH: usize = 256;

fn on_chunk(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout/on_chunk");
    for (teams, size) in [(1usize, 16usize), (1000, 1), (100, 16)] {
        let mut t = Teams::new(TeamRules::default());
        let mut port = 10_000u32;
        for team in 0..teams {
            for i in 0..size {
                let ip = Ipv4Addr::new(10, (port >> 16) as u8, (port >> 8) as u8, port as u8);
                t.insert(team as u32, Endpoint::new(ip, 40_000), i == 0);
                port += 1;
            }
        }
        assert_eq!((t.team_count(), t.peer_count()), (teams, teams * size));
        let mut dests = Vec::with_capacity(teams);
        let mut n = 0u16;
        // One destination per team per chunk.
        g.throughput(Throughput::Elements(teams as u64));
        g.bench_function(
            BenchmarkId::from_parameter(format!("{teams}x{size}")),
            |b| {
                b.iter(|| {
                    dests.clear();
                    n = n.wrapping_add(1);
                    t.on_chunk(black_box(n), &mut dests);
                    black_box(dests.len())
                })
            },
        );
    }
    g.finish();
}

/// Reads everything queued on `r` (non-blocking); returns the number of datagrams.
fn drain(r: &UdpSocket, buf: &mut [u8]) -> u64 {
    let mut got = 0;
    loop {
        match r.recv(buf) {
            Ok(_) => got += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return got,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("receiver: {e}"),
        }
    }
}

fn send(c: &mut Criterion) {
    let localhost = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
    let mut datagram = Vec::new();
    encode_chunk(7, &[0xa5; CHUNK_SIZE], &mut datagram);
    let mut g = c.benchmark_group("fanout/send_to_all");
    for path in [SendPath::Sendmmsg, SendPath::Uring] {
        for n in [64usize, 256] {
            let receivers: Vec<UdpSocket> = (0..n)
                .map(|_| udp_socket(localhost, false, Some(4 << 20), None).unwrap())
                .collect();
            let dests: Vec<SocketAddrV4> = receivers
                .iter()
                .map(|r| match r.local_addr().unwrap() {
                    std::net::SocketAddr::V4(a) => a,
                    other => panic!("receiver bound to {other}"),
                })
                .collect();
            let socket = udp_socket(localhost, false, None, Some(8 << 20)).unwrap();
            // Built here, on the thread that sends: io_uring rings are single-issuer.
            let mut sender = match BatchSender::new(socket.as_raw_fd(), path, MAX_BATCH) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("fanout/send_to_all/{path}: skipped, no sender: {e}");
                    continue;
                }
            };
            let mut stats = SendStats::default();
            let mut received = 0u64;
            let mut buf = vec![0u8; 2048];
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(BenchmarkId::new(path.name(), n), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        sender.send_to_all(&datagram, &dests, &mut stats);
                        timed += t0.elapsed();
                        received += receivers.iter().map(|r| drain(r, &mut buf)).sum::<u64>();
                    }
                    timed
                })
            });
            // What the kernel did with all of it: nothing should be dropped.
            if stats.datagrams + stats.dropped == 0 {
                continue; // filtered out
            }
            eprintln!(
                "fanout/send_to_all/{}/{n}: {} datagrams sent in {} submissions, {} received, \
                 {} dropped, {} EAGAIN",
                path.name(),
                stats.datagrams,
                stats.submissions,
                received,
                stats.dropped,
                stats.eagain
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(1), Duration::from_secs(3), 20);
    targets = on_chunk, send
}
criterion_main!(benches);
