//! The `compat` wire codec: the join configuration a splitter sends every joining peer (team lists
//! of 1, 16 and 256 peers), classifying UDP datagrams at a peer and at the splitter, and writing a
//! 1024-byte chunk datagram.

mod common;

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use p2psp::proto::wire::{JoinConfig, ToPeer, ToSplitter, encode_chunk, loss_report};

const CHUNK_SIZE: usize = 1024;

fn join_config(peers: usize) -> JoinConfig {
    JoinConfig {
        source: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8000),
        channel: "test.ogg".into(),
        header_size: 8192,
        chunk_size: CHUNK_SIZE as u16,
        buffer_size: 256,
        monitors: 1,
        peers: (0..peers)
            .map(|i| {
                SocketAddrV4::new(
                    Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8),
                    40_000 + i as u16,
                )
            })
            .collect(),
    }
}

fn join(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire/join_config");
    for peers in [1usize, 16, 256] {
        let config = join_config(peers);
        let mut encoded = Vec::new();
        config.encode(&mut encoded).unwrap();
        g.throughput(Throughput::Bytes(encoded.len() as u64));
        // The splitter encodes into a reused buffer (one per joining peer's TCP stream).
        let mut out = Vec::with_capacity(encoded.len());
        g.bench_function(BenchmarkId::new("encode", peers), |b| {
            b.iter(|| {
                out.clear();
                black_box(&config).encode(&mut out).unwrap();
                black_box(out.len())
            })
        });
        // Decoding allocates the channel name and the peer list, as a joining peer does.
        g.bench_function(BenchmarkId::new("decode", peers), |b| {
            b.iter(|| JoinConfig::decode(black_box(&encoded)).unwrap().unwrap())
        });
    }
    g.finish();
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire/parse");
    g.throughput(Throughput::Elements(1));
    let mut chunk = Vec::new();
    encode_chunk(0x1234, &[0xa5; CHUNK_SIZE], &mut chunk);
    g.bench_function("to_peer/chunk", |b| {
        b.iter(|| ToPeer::parse(black_box(&chunk), black_box(CHUNK_SIZE)))
    });
    g.bench_function("to_peer/hello", |b| {
        b.iter(|| ToPeer::parse(black_box(b"H"), black_box(CHUNK_SIZE)))
    });
    let report = loss_report(0x1234);
    g.bench_function("to_splitter/loss_report", |b| {
        b.iter(|| ToSplitter::parse(black_box(&report)))
    });
    g.bench_function("to_splitter/goodbye", |b| {
        b.iter(|| ToSplitter::parse(black_box(b"G")))
    });
    g.finish();
}

fn chunk(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire/encode_chunk");
    let payload = vec![0xa5u8; CHUNK_SIZE];
    let mut out = Vec::with_capacity(CHUNK_SIZE + 2);
    g.throughput(Throughput::Bytes(CHUNK_SIZE as u64));
    let mut n = 0u16;
    g.bench_function("1024", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            encode_chunk(black_box(n), black_box(&payload), &mut out);
            black_box(out.as_ptr());
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_millis(500), Duration::from_millis(1500), 30);
    targets = join, parse, chunk
}
criterion_main!(benches);
