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
            let seq = ring.publish(*n, d.clone(), std::time::Instant::now());
            match ring.read(black_box(seq)) {
                Read::Chunk(c) => black_box(c.datagram.len()),
                other => panic!("read back {other:?}"),
            }
        })
    });
    g.finish();
}

/// Where each reader is, for the writer's flow control. Padded so that the readers' stores do not
/// share a cache line.
#[repr(align(128))]
#[derive(Default)]
struct Cursor(AtomicU64);

/// How often a reader tells the writer where it is.
const REPORT_EVERY: u64 = 64;

/// One writer publishes `iters` chunks as fast as the slowest of [`READERS`] reader threads
/// lets it, and every reader reads every chunk (yielding when it is ahead, as a shard does). The
/// ring itself never waits for readers (a slow shard skips chunks instead); the writer here stops
/// one ring short of the slowest reader so that nothing is skipped and the figure is chunks
/// published *and* read by both readers per second. The time runs from the first publish until
/// every reader has passed the last chunk. Three busy threads share two cores here.
fn two_readers(c: &mut Criterion) {
    let pool = Arc::new(pool());
    let (reads, skipped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish_read/1_writer_2_reader_threads", |b| {
        b.iter_custom(|iters| {
            let ring = Arc::new(ChunkRing::new(RING_SLOTS));
            let cursors: Arc<[Cursor; READERS]> = Arc::new(Default::default());
            let start = Arc::new(Barrier::new(READERS + 1));
            let readers: Vec<_> = (0..READERS)
                .map(|r| {
                    let (ring, cursors) = (ring.clone(), cursors.clone());
                    let (start, skipped) = (start.clone(), skipped.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let mut seq = 0u64;
                        while seq < iters {
                            match ring.read(seq) {
                                Read::Chunk(c) => {
                                    black_box(c.datagram.len());
                                    seq += 1;
                                    if seq % REPORT_EVERY == 0 {
                                        cursors[r].0.store(seq, Ordering::Release);
                                    }
                                }
                                Read::NotYet => {
                                    cursors[r].0.store(seq, Ordering::Release);
                                    std::thread::yield_now();
                                }
                                Read::Overrun { resume, missed } => {
                                    skipped.fetch_add(missed, Ordering::Relaxed);
                                    seq = resume;
                                }
                            }
                        }
                    })
                })
                .collect();
            // Publishing up to `slowest + capacity - 2` never overwrites a chunk a reader has
            // still to read (the ring keeps one slot of slack).
            let room = (RING_SLOTS - 2) as u64;
            let slowest = || {
                cursors
                    .iter()
                    .map(|c| c.0.load(Ordering::Acquire))
                    .min()
                    .unwrap()
            };
            start.wait();
            let t0 = Instant::now();
            let mut limit = room;
            for seq in 0..iters {
                while seq >= limit {
                    limit = slowest() + room;
                    if seq >= limit {
                        std::thread::yield_now();
                    }
                }
                let (n, d) = &pool[seq as usize % POOL];
                ring.publish(*n, d.clone(), std::time::Instant::now());
            }
            for r in readers {
                r.join().unwrap();
            }
            let elapsed = t0.elapsed();
            reads.fetch_add(iters * READERS as u64, Ordering::Relaxed);
            elapsed
        })
    });
    g.finish();
    let (r, s) = (
        reads.load(Ordering::Relaxed),
        skipped.load(Ordering::Relaxed),
    );
    // The flow control above should make this 0; say so if it does not.
    if r > 0 {
        eprintln!("ring/publish_read/1_writer_2_reader_threads: {s} of {r} chunk reads skipped");
    }
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(1), Duration::from_secs(3), 20);
    targets = same_thread, two_readers
}
criterion_main!(benches);
