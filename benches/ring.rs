//! The chunk ring the splitter's feed publishes into and its shards read from, with 1026-byte
//! datagrams (1024-byte chunks): publish + read on one thread, and one writer with two reader
//! threads that read every chunk.
//!
//! The datagrams come from a pool of pre-built [`Bytes`], so publishing costs a reference count
//! increment and no allocation: this measures the ring itself (slot locks, the head counter, the
//! clone a reader takes), not the feed's allocation of a fresh datagram per chunk.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use p2psp::proto::wire::encode_chunk;
use p2psp::ring::{ChunkRing, Read};

const CHUNK_SIZE: usize = 1024;
/// As the splitter's default (`Settings::ring_slots`).
const RING_SLOTS: usize = 4096;
/// More datagrams than slots, so a slot never gets back the datagram it already holds.
const POOL: usize = 2 * RING_SLOTS;
const READERS: usize = 2;

fn pool() -> Vec<(u16, Bytes)> {
    (0..POOL)
        .map(|i| {
            let n = i as u16;
            let mut d = Vec::new();
            encode_chunk(n, &[n as u8; CHUNK_SIZE], &mut d);
            (n, Bytes::from(d))
        })
        .collect()
}

fn same_thread(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish_read/same_thread", |b| {
        let ring = ChunkRing::new(RING_SLOTS);
        let mut i = 0usize;
        b.iter(|| {
            let (n, d) = &pool[i % POOL];
            i += 1;
            let seq = ring.publish(*n, d.clone());
            match ring.read(black_box(seq)) {
                Read::Chunk(c) => black_box(c.datagram.len()),
                other => panic!("read back {other:?}"),
            }
        })
    });
    g.finish();
}

/// One writer publishes `iters` chunks as fast as it can while [`READERS`] threads read every
/// sequence number (yielding when they are ahead, skipping when overrun, as a shard does). The
/// time is from the first publish until every reader has passed the last chunk.
fn two_readers(c: &mut Criterion) {
    let pool = Arc::new(pool());
    let (published, missed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish_read/1_writer_2_reader_threads", |b| {
        b.iter_custom(|iters| {
            let ring = Arc::new(ChunkRing::new(RING_SLOTS));
            let start = Arc::new(Barrier::new(READERS + 1));
            let readers: Vec<_> = (0..READERS)
                .map(|_| {
                    let (ring, start, missed) = (ring.clone(), start.clone(), missed.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let mut seq = 0u64;
                        while seq < iters {
                            match ring.read(seq) {
                                Read::Chunk(c) => {
                                    black_box(c.datagram.len());
                                    seq += 1;
                                }
                                Read::NotYet => std::thread::yield_now(),
                                Read::Overrun { resume, missed: m } => {
                                    missed.fetch_add(m, Ordering::Relaxed);
                                    seq = resume;
                                }
                            }
                        }
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            for i in 0..iters as usize {
                let (n, d) = &pool[i % POOL];
                ring.publish(*n, d.clone());
            }
            for r in readers {
                r.join().unwrap();
            }
            let elapsed = t0.elapsed();
            published.fetch_add(iters * READERS as u64, Ordering::Relaxed);
            elapsed
        })
    });
    g.finish();
    let (p, m) = (
        published.load(Ordering::Relaxed),
        missed.load(Ordering::Relaxed),
    );
    if p > 0 {
        // A reader that falls a whole ring behind skips chunks; say how often that happened.
        eprintln!(
            "ring/publish_read/1_writer_2_reader_threads: readers skipped {m} of {p} chunk reads \
             ({:.3} %) after overruns",
            100.0 * m as f64 / p as f64
        );
    }
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(1), Duration::from_secs(3), 20);
    targets = same_thread, two_readers
}
criterion_main!(benches);
