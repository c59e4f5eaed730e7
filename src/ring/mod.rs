//! The chunk ring: the splitter's source thread writes each chunk once; every shard reads it and
//! hands the same bytes to the kernel for all its destinations (no copy per destination).
//!
//! One writer, many readers. Each slot holds a reference-counted datagram ([`Bytes`]): a reader
//! takes a reference (a counter increment) and sends from it while the writer may already have
//! moved on, so a slow shard never holds the writer back. A reader that falls a whole ring behind
//! is told how many chunks it missed ([`Read::Overrun`]) and skips them; it counts them, it never
//! blocks the writer. A slot's lock is held only to swap or clone a pointer.

#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use std::time::Instant;

/// A chunk as published: its position in the ring's sequence, its chunk number and the datagram
/// (`u16 chunk number ‖ payload`) every destination gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Position in the ring's sequence (never wraps).
    pub seq: u64,
    /// The 16-bit chunk number on the wire.
    pub number: u16,
    /// The whole datagram.
    pub datagram: Bytes,
    /// When the writer published it (given by the writer: the ring reads no clock). Shards
    /// measure their send lag from it.
    pub published: Instant,
    /// CIS digest mode: the signed digest of the chunk's group (shared by every chunk of the
    /// group), sent ahead of the group's first chunks and to peers that ask for it.
    pub digest: Option<Bytes>,
}

/// What a reader finds at a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The chunk.
    Chunk(Chunk),
    /// Not written yet.
    NotYet,
    /// Overwritten: the reader fell behind. Continue at `resume`; `missed` chunks are lost to it.
    Overrun {
        /// Where to continue.
        resume: u64,
        /// How many chunks were skipped.
        missed: u64,
    },
}

/// A fixed-size ring of chunks.
#[derive(Debug)]
pub struct ChunkRing {
    slots: Box<[Mutex<Option<Chunk>>]>,
    /// Sequence number the next publish gets.
    head: AtomicU64,
}

impl ChunkRing {
    /// A ring of `capacity` slots (at least 2).
    pub fn new(capacity: usize) -> ChunkRing {
        let capacity = capacity.max(2);
        ChunkRing {
            slots: (0..capacity).map(|_| Mutex::new(None)).collect(),
            head: AtomicU64::new(0),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Sequence number of the next chunk to be published: where a new reader starts.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn slot(&self, seq: u64) -> &Mutex<Option<Chunk>> {
        &self.slots[(seq % self.slots.len() as u64) as usize]
    }

    /// Publishes a chunk at `now` (only one thread may publish). Returns its sequence number.
    pub fn publish(&self, number: u16, datagram: Bytes, now: Instant) -> u64 {
        self.publish_with(number, datagram, None, now)
    }

    /// [`ChunkRing::publish`] with the digest of the chunk's group (CIS digest mode).
    pub fn publish_with(
        &self,
        number: u16,
        datagram: Bytes,
        digest: Option<Bytes>,
        now: Instant,
    ) -> u64 {
        let seq = self.head.load(Ordering::Relaxed);
        let old = {
            let mut slot = self.slot(seq).lock().unwrap_or_else(|e| e.into_inner());
            slot.replace(Chunk {
                seq,
                number,
                datagram,
                published: now,
                digest,
            })
        };
        self.head.store(seq + 1, Ordering::Release);
        // The previous occupant is freed here, outside the lock (or later, by its last reader).
        drop(old);
        seq
    }

    /// Reads the chunk at `seq`.
    pub fn read(&self, seq: u64) -> Read {
        let head = self.head();
        if seq >= head {
            return Read::NotYet;
        }
        let cap = self.slots.len() as u64;
        // Leave one slot of slack: the writer may be overwriting the oldest slot right now.
        let oldest = head.saturating_sub(cap - 1);
        if seq < oldest {
            return Read::Overrun {
                resume: oldest,
                missed: oldest - seq,
            };
        }
        let slot = self.slot(seq).lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(c) if c.seq == seq => Read::Chunk(c.clone()),
            Some(c) if c.seq > seq => {
                let resume = self.head().saturating_sub(cap - 1).max(seq + 1);
                Read::Overrun {
                    resume,
                    missed: resume - seq,
                }
            }
            _ => Read::NotYet,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn datagram(n: u16) -> Bytes {
        let mut v = n.to_be_bytes().to_vec();
        v.extend_from_slice(&[n as u8; 62]);
        Bytes::from(v)
    }

    #[test]
    fn readers_get_every_chunk_in_order() {
        let ring = ChunkRing::new(8);
        assert_eq!(ring.read(0), Read::NotYet);
        for n in 0..5u16 {
            assert_eq!(ring.publish(n, datagram(n), Instant::now()), u64::from(n));
        }
        for s in 0..5u64 {
            let Read::Chunk(c) = ring.read(s) else {
                panic!()
            };
            assert_eq!((c.seq, c.number), (s, s as u16));
            assert_eq!(c.datagram, datagram(s as u16));
        }
        assert_eq!(ring.read(5), Read::NotYet);
    }

    #[test]
    fn a_reader_that_falls_behind_skips_and_knows_how_much() {
        let ring = ChunkRing::new(4);
        for n in 0..10u16 {
            ring.publish(n, datagram(n), Instant::now());
        }
        assert_eq!(
            ring.read(2),
            Read::Overrun {
                resume: 7,
                missed: 5
            }
        );
        assert!(matches!(ring.read(7), Read::Chunk(c) if c.number == 7));
    }

    #[test]
    fn a_reader_keeps_its_chunk_after_the_writer_moves_on() {
        let ring = ChunkRing::new(2);
        ring.publish(1, datagram(1), Instant::now());
        let Read::Chunk(c) = ring.read(0) else {
            panic!()
        };
        for n in 2..10 {
            ring.publish(n, datagram(n), Instant::now());
        }
        assert_eq!(c.datagram, datagram(1));
    }

    #[test]
    fn concurrent_readers_see_consistent_chunks() {
        let ring = Arc::new(ChunkRing::new(64));
        let total = 20_000u64;
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    let (mut seq, mut seen, mut missed) = (0u64, 0u64, 0u64);
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                    while seq < total && std::time::Instant::now() < deadline {
                        match ring.read(seq) {
                            Read::Chunk(c) => {
                                assert_eq!(c.datagram, datagram(c.number));
                                assert_eq!(u64::from(c.number), seq % 65536);
                                seen += 1;
                                seq += 1;
                            }
                            Read::NotYet => std::thread::yield_now(),
                            Read::Overrun { resume, missed: m } => {
                                missed += m;
                                seq = resume;
                            }
                        }
                    }
                    assert_eq!(seen + missed, total);
                })
            })
            .collect();
        for s in 0..total {
            ring.publish(
                (s % 65536) as u16,
                datagram((s % 65536) as u16),
                Instant::now(),
            );
        }
        for r in readers {
            r.join().unwrap();
        }
    }
}
