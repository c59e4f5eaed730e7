//! CIS digest mode (`--sign-mode digest`, `docs/integrity.md`): one splitter signature per group
//! of chunks instead of one per chunk.
//!
//! Chunks stay compat datagrams (`u16 chunk number ‖ chunk-size payload`, nothing appended). The
//! splitter groups the chunks its feed produces within a short window, hashes each, and sends a
//! signed digest of the group ahead of the group's chunks:
//!
//! ```text
//! "DIG" | u32 first | u8 n (1..=32) | n × 16-byte hash | 64-byte Ed25519 signature
//! ```
//!
//! `first` is the extended number of the group's first chunk (its low 16 bits are the chunk
//! number, the high 16 bits count the wraps of the 16-bit number since the splitter started); the
//! group covers `first .. first + n`. Hash `i` is the first 16 bytes of SHA-256 of the compat
//! datagram of chunk `first + i` (so it binds the number and the payload). The signature covers
//! every byte before it. A digest is `72 + 16 n` bytes (88 to 584), never a chunk's length (the
//! splitter makes no group whose digest would be) nor any control message's.
//!
//! A peer checks the signature of a digest once and each chunk by one hash; a chunk whose digest
//! has not arrived waits in a bounded pending set ([`DigestBook`]) and is neither played nor
//! relayed until it is checked. A peer whose chunk has waited [`FETCH_AFTER`] asks the splitter
//! for the digest with a [`request`] datagram:
//!
//! ```text
//! "DG?" | u16 chunk number      (5 bytes)
//! ```
//!
//! The extended number lets a peer refuse a *replayed* digest (a valid one from a whole 65,536
//! chunks ago, whose 16-bit numbers are the current ones): a digest whose last chunk is more than
//! half the book behind the newest verified one is stale and dropped before its signature is
//! checked (so replays cost no CPU either).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::Digest as _;

use super::Endpoint;
use super::integrity::{ChunkSigner, ChunkVerifier, SIGNATURE_LEN};

/// The first bytes of a digest.
pub const DIGEST_TAG: &[u8; 3] = b"DIG";
/// Bytes of each chunk's hash in a digest (truncated SHA-256).
pub const HASH_LEN: usize = 16;
/// Most chunks in a group.
pub const MAX_GROUP: usize = 32;
/// Bytes of a digest besides its hashes.
pub const DIGEST_FIXED: usize = 3 + 4 + 1 + SIGNATURE_LEN;
/// The first bytes of a digest request.
pub const REQUEST_TAG: &[u8; 3] = b"DG?";
/// Length of a digest request.
pub const REQUEST_LEN: usize = 5;
/// A peer asks the splitter for a digest when a chunk has waited this long for it.
pub const FETCH_AFTER: Duration = Duration::from_millis(100);
/// A chunk that waited this long for its digest is dropped (counted).
pub const HOLD_LIMIT: Duration = Duration::from_secs(2);

/// A chunk's hash: the first [`HASH_LEN`] bytes of SHA-256 of its compat datagram.
pub type Hash = [u8; HASH_LEN];

/// The length of a digest of `n` chunks.
pub const fn digest_len(n: usize) -> usize {
    DIGEST_FIXED + HASH_LEN * n
}

/// The hash of a compat chunk datagram (`u16 number ‖ payload`).
pub fn chunk_hash(datagram: &[u8]) -> Hash {
    let full = sha2::Sha256::digest(datagram);
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&full[..HASH_LEN]);
    h
}

/// Encodes and signs the digest of the chunks `first ..` whose hashes are `hashes` (1 to
/// [`MAX_GROUP`]).
pub fn sign_digest(signer: &ChunkSigner, first: u32, hashes: &[Hash]) -> Vec<u8> {
    assert!((1..=MAX_GROUP).contains(&hashes.len()), "group of 1 to 32");
    let mut out = Vec::with_capacity(digest_len(hashes.len()));
    out.extend_from_slice(DIGEST_TAG);
    out.extend_from_slice(&first.to_be_bytes());
    out.push(hashes.len() as u8);
    for h in hashes {
        out.extend_from_slice(h);
    }
    let sig = signer.sign_bytes(&out);
    out.extend_from_slice(&sig);
    out
}

/// A decoded digest (borrowing the datagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest<'a> {
    /// Extended number of the first chunk.
    pub first: u32,
    hashes: &'a [u8],
    signed: &'a [u8],
    signature: &'a [u8],
}

impl<'a> Digest<'a> {
    /// Decodes a digest; `None` if `d` is not one (wrong tag, count or length).
    pub fn parse(d: &'a [u8]) -> Option<Digest<'a>> {
        if d.len() < DIGEST_FIXED || &d[..3] != DIGEST_TAG {
            return None;
        }
        let n = usize::from(d[7]);
        if !(1..=MAX_GROUP).contains(&n) || d.len() != digest_len(n) {
            return None;
        }
        let first = u32::from_be_bytes([d[3], d[4], d[5], d[6]]);
        let at = d.len() - SIGNATURE_LEN;
        Some(Digest {
            first,
            hashes: &d[8..at],
            signed: &d[..at],
            signature: &d[at..],
        })
    }

    /// Chunks covered.
    pub fn count(&self) -> usize {
        self.hashes.len() / HASH_LEN
    }

    /// Extended number of the last chunk covered.
    pub fn last(&self) -> u32 {
        self.first.wrapping_add(self.count() as u32 - 1)
    }

    /// The extended number and hash of the `i`-th chunk covered.
    pub fn entry(&self, i: usize) -> (u32, Hash) {
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(&self.hashes[i * HASH_LEN..(i + 1) * HASH_LEN]);
        (self.first.wrapping_add(i as u32), h)
    }

    /// Whether the 16-bit chunk `number` is covered.
    pub fn covers(&self, number: u16) -> bool {
        usize::from(number.wrapping_sub(self.first as u16)) < self.count()
    }

    /// Whether the splitter's signature is valid.
    pub fn verify(&self, key: &ChunkVerifier) -> bool {
        key.verify_bytes(self.signed, self.signature)
    }
}

/// Whether a datagram of length `len` looks like a digest (for demultiplexing).
pub fn is_digest(d: &[u8]) -> bool {
    d.len() >= DIGEST_FIXED && &d[..3] == DIGEST_TAG
}

/// Encodes a request for the digest that covers chunk `number`.
pub fn request(number: u16) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[..3].copy_from_slice(REQUEST_TAG);
    out[3..].copy_from_slice(&number.to_be_bytes());
    out
}

/// Decodes a digest request: the chunk number.
pub fn parse_request(d: &[u8]) -> Option<u16> {
    if d.len() != REQUEST_LEN || &d[..3] != REQUEST_TAG {
        return None;
    }
    Some(u16::from_be_bytes([d[3], d[4]]))
}

/// What a peer made of a digest datagram ([`DigestBook::check_digest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestCheck {
    /// Not a digest (bad tag, count or length).
    Malformed,
    /// Older than the book keeps (a replay, or very late): dropped unverified, nobody blamed.
    Stale,
    /// Every entry is already known: nothing to do (no second signature check).
    Duplicate,
    /// The signature fails.
    Bad,
    /// Verified and stored.
    Good,
}

/// A chunk waiting for its digest.
#[derive(Debug, Clone)]
pub struct Held {
    /// Who sent it.
    pub from: Endpoint,
    /// Its number.
    pub number: u16,
    /// The compat datagram.
    pub data: Bytes,
    /// When it arrived.
    pub since: Instant,
    /// When its digest was last asked for.
    asked: Option<Instant>,
}

/// A peer's verified digests and the chunks waiting for one.
#[derive(Debug)]
pub struct DigestBook {
    /// `(extended number, hash)` of chunk `n` at `n % len`.
    table: Vec<Option<(u32, Hash)>>,
    /// Extended number of the newest chunk a verified digest covers.
    newest: Option<u32>,
    pending: VecDeque<Held>,
    max_pending: usize,
}

impl DigestBook {
    /// A book for a playout buffer of `buffer` chunks: it keeps the hashes of at least twice that
    /// many chunks (1,024 at least) and holds up to that many chunks waiting for a digest.
    pub fn new(buffer: usize) -> DigestBook {
        let len = (2 * buffer).next_power_of_two().clamp(1024, 65536);
        DigestBook {
            table: vec![None; len],
            newest: None,
            pending: VecDeque::new(),
            max_pending: len,
        }
    }

    /// Chunks waiting for their digest.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether the book has verified any digest yet.
    pub fn anchored(&self) -> bool {
        self.newest.is_some()
    }

    /// Checks a digest datagram and stores it if it verifies with `key`. Staleness and duplicates
    /// are decided before the (costly) signature check.
    pub fn check_digest(&mut self, d: &[u8], key: &ChunkVerifier) -> DigestCheck {
        let Some(dg) = Digest::parse(d) else {
            return DigestCheck::Malformed;
        };
        let half = (self.table.len() / 2) as i32;
        if let Some(newest) = self.newest
            && (newest.wrapping_sub(dg.last()) as i32) > half
        {
            return DigestCheck::Stale;
        }
        let known = (0..dg.count()).all(|i| {
            let (ext, h) = dg.entry(i);
            self.table[self.slot(ext as u16)] == Some((ext, h))
        });
        if known {
            return DigestCheck::Duplicate;
        }
        if !dg.verify(key) {
            return DigestCheck::Bad;
        }
        for i in 0..dg.count() {
            let (ext, h) = dg.entry(i);
            let slot = self.slot(ext as u16);
            // A newer chunk of the same slot stays (an old digest fetched late).
            let keep = matches!(self.table[slot], Some((e, _)) if (e.wrapping_sub(ext) as i32) > 0);
            if !keep {
                self.table[slot] = Some((ext, h));
            }
        }
        if self
            .newest
            .is_none_or(|n| (dg.last().wrapping_sub(n) as i32) > 0)
        {
            self.newest = Some(dg.last());
        }
        DigestCheck::Good
    }

    fn slot(&self, number: u16) -> usize {
        usize::from(number) & (self.table.len() - 1)
    }

    /// Checks chunk datagram `data` (number `number`) against its digest: `Some(true)` if it
    /// matches, `Some(false)` if it does not, `None` if no digest for it is known.
    pub fn check_chunk(&self, number: u16, data: &[u8]) -> Option<bool> {
        let (ext, h) = self.table[self.slot(number)]?;
        if ext as u16 != number {
            return None;
        }
        Some(chunk_hash(data) == h)
    }

    /// Whether the digest of chunk `number` is known.
    pub fn knows(&self, number: u16) -> bool {
        matches!(self.table[self.slot(number)], Some((ext, _)) if ext as u16 == number)
    }

    /// Holds a chunk until its digest arrives. Returns the oldest held chunk if the set was full
    /// (it is dropped).
    pub fn hold(&mut self, from: Endpoint, number: u16, data: Bytes, now: Instant) -> Option<Held> {
        let evicted = if self.pending.len() >= self.max_pending {
            self.pending.pop_front()
        } else {
            None
        };
        self.pending.push_back(Held {
            from,
            number,
            data,
            since: now,
            asked: None,
        });
        evicted
    }

    /// Takes the held chunks whose digest is now known, in arrival order.
    pub fn release(&mut self, out: &mut Vec<Held>) {
        if self.pending.is_empty() {
            return;
        }
        let mut keep = VecDeque::with_capacity(self.pending.len());
        for h in self.pending.drain(..) {
            let slot = usize::from(h.number) & (self.table.len() - 1);
            if matches!(self.table[slot], Some((ext, _)) if ext as u16 == h.number) {
                out.push(h);
            } else {
                keep.push_back(h);
            }
        }
        self.pending = keep;
    }

    /// Drops held chunks older than [`HOLD_LIMIT`]; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.pending.len();
        self.pending
            .retain(|h| now.saturating_duration_since(h.since) < HOLD_LIMIT);
        before - self.pending.len()
    }

    /// Chunk numbers whose digest to ask the splitter for now (held [`FETCH_AFTER`] and not asked
    /// for since), at most `max`, each number once.
    pub fn due_requests(&mut self, now: Instant, max: usize) -> Vec<u16> {
        let mut out: Vec<u16> = Vec::new();
        for h in &mut self.pending {
            if out.len() >= max {
                break;
            }
            let waited = now.saturating_duration_since(h.since) >= FETCH_AFTER;
            let again = h
                .asked
                .is_none_or(|a| now.saturating_duration_since(a) >= FETCH_AFTER);
            if waited && again {
                h.asked = Some(now);
                if !out.contains(&h.number) {
                    out.push(h.number);
                }
            }
        }
        out
    }

    /// When [`DigestBook::due_requests`] or [`DigestBook::expire`] next have work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|h| match h.asked {
            Some(a) => a + FETCH_AFTER,
            None => h.since + FETCH_AFTER,
        })
    }
}

/// The splitter's side: groups chunks and signs their digest.
#[derive(Debug)]
pub struct DigestGrouper {
    /// Extended number of the next chunk.
    next_ext: Option<u32>,
    hashes: Vec<Hash>,
    first: u32,
    /// Most chunks per group (1 to [`MAX_GROUP`]).
    max: usize,
    /// The length of the team's chunk datagrams: no digest may have it.
    chunk_len: usize,
}

impl DigestGrouper {
    /// A grouper of at most `max` chunks per group for chunk datagrams of `chunk_len` bytes.
    pub fn new(max: usize, chunk_len: usize) -> DigestGrouper {
        DigestGrouper {
            next_ext: None,
            hashes: Vec::with_capacity(MAX_GROUP),
            first: 0,
            max: max.clamp(1, MAX_GROUP),
            chunk_len,
        }
    }

    /// Chunks in the open group.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether the open group is empty.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Adds chunk datagram `d` (compat: `u16 number ‖ payload`) to the open group. Returns
    /// whether the group is full and must be closed now.
    pub fn add(&mut self, d: &[u8]) -> bool {
        let number = u16::from_be_bytes([d[0], d[1]]);
        let ext = match self.next_ext {
            // Extend the 16-bit number past the last one (a jump, as after a source restart,
            // moves on within the same era when it goes forward).
            Some(next) => {
                let delta = number.wrapping_sub(next as u16);
                next.wrapping_add(u32::from(delta))
            }
            None => u32::from(number),
        };
        if !self.hashes.is_empty() && ext != self.first.wrapping_add(self.hashes.len() as u32) {
            // Not consecutive: the caller must close the group first (see `fits`).
            debug_assert!(false, "chunk {number} does not follow the open group");
        }
        if self.hashes.is_empty() {
            self.first = ext;
        }
        self.next_ext = Some(ext.wrapping_add(1));
        self.hashes.push(chunk_hash(d));
        let n = self.hashes.len();
        // A digest never has the length of a chunk datagram, signed or not.
        n >= self.max
            || digest_len(n + 1) == self.chunk_len
            || digest_len(n + 1) == self.chunk_len + SIGNATURE_LEN
    }

    /// Whether chunk `number` continues the open group (it can be added without closing it).
    pub fn fits(&self, number: u16) -> bool {
        self.hashes.is_empty() || self.next_ext.is_some_and(|n| n as u16 == number)
    }

    /// Closes the open group: its signed digest (`None` if it is empty).
    pub fn close(&mut self, signer: &ChunkSigner) -> Option<Vec<u8>> {
        if self.hashes.is_empty() {
            return None;
        }
        let d = sign_digest(signer, self.first, &self.hashes);
        self.hashes.clear();
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::encode_chunk;

    fn signer() -> ChunkSigner {
        ChunkSigner::from_secret(&[3; 32])
    }

    fn chunk(n: u16) -> Vec<u8> {
        let mut d = Vec::new();
        encode_chunk(n, &[n as u8 ^ 0x33; 1024], &mut d);
        d
    }

    fn digest_of(first: u32, n: u16) -> Vec<u8> {
        let hashes: Vec<Hash> = (0..n)
            .map(|i| chunk_hash(&chunk((first as u16).wrapping_add(i))))
            .collect();
        sign_digest(&signer(), first, &hashes)
    }

    fn ep(p: u16) -> Endpoint {
        Endpoint::new(std::net::Ipv4Addr::LOCALHOST, p)
    }

    #[test]
    fn a_digest_round_trips_and_any_change_fails() {
        let key = signer().verifier();
        let d = digest_of(0x0001_fffe, 4);
        assert_eq!(d.len(), digest_len(4));
        let dg = Digest::parse(&d).unwrap();
        assert_eq!(
            (dg.first, dg.count(), dg.last()),
            (0x0001_fffe, 4, 0x0002_0001)
        );
        assert!(dg.covers(0xfffe) && dg.covers(0xffff) && dg.covers(0) && dg.covers(1));
        assert!(!dg.covers(2) && !dg.covers(0xfffd));
        assert!(dg.verify(&key));
        for at in 0..d.len() {
            let mut bad = d.clone();
            bad[at] ^= 0x10;
            assert!(
                Digest::parse(&bad).is_none_or(|g| !g.verify(&key)),
                "byte {at}"
            );
        }
        assert!(!dg.verify(&ChunkSigner::from_secret(&[4; 32]).verifier()));
        assert!(Digest::parse(&d[..d.len() - 1]).is_none());
        assert!(Digest::parse(b"DIG").is_none());
        let mut zero = d.clone();
        zero[7] = 0;
        assert!(Digest::parse(&zero).is_none());
    }

    #[test]
    fn requests_round_trip_and_have_a_length_of_their_own() {
        assert_eq!(parse_request(&request(65535)), Some(65535));
        assert_eq!(parse_request(&[0; REQUEST_LEN]), None);
        assert_eq!(parse_request(&request(1)[..4]), None);
        for len in [1, 2, 9, 11, 13, 17, 34] {
            assert_ne!(len, REQUEST_LEN);
            assert!(digest_len(1) > len);
        }
    }

    #[test]
    fn the_book_verifies_once_then_checks_chunks_by_hash() {
        let key = signer().verifier();
        let mut b = DigestBook::new(256);
        let d = digest_of(10, 3);
        assert!(!b.knows(10));
        assert_eq!(b.check_chunk(10, &chunk(10)), None);
        assert_eq!(b.check_digest(&d, &key), DigestCheck::Good);
        assert_eq!(b.check_digest(&d, &key), DigestCheck::Duplicate);
        assert_eq!(b.check_chunk(10, &chunk(10)), Some(true));
        assert_eq!(b.check_chunk(12, &chunk(12)), Some(true));
        assert_eq!(b.check_chunk(13, &chunk(13)), None);
        let mut bad = chunk(11);
        bad[500] ^= 1;
        assert_eq!(b.check_chunk(11, &bad), Some(false));
        // A replayed chunk under another number fails.
        let mut replay = chunk(10);
        replay[..2].copy_from_slice(&11u16.to_be_bytes());
        assert_eq!(b.check_chunk(11, &replay), Some(false));
        // A forged digest for the same chunks fails the signature.
        let mut forged = digest_of(10, 3);
        forged[9] ^= 1;
        assert_eq!(b.check_digest(&forged, &key), DigestCheck::Bad);
        assert_eq!(b.check_chunk(10, &chunk(10)), Some(true));
        assert_eq!(b.check_digest(b"DIGxx", &key), DigestCheck::Malformed);
    }

    #[test]
    fn a_replayed_digest_from_an_earlier_era_is_stale() {
        let key = signer().verifier();
        let mut b = DigestBook::new(256);
        let old = digest_of(100, 2);
        assert_eq!(
            b.check_digest(&digest_of(65536 + 100, 2), &key),
            DigestCheck::Good
        );
        // Same 16-bit numbers, 65,536 chunks earlier: refused before the signature is checked.
        assert_eq!(b.check_digest(&old, &key), DigestCheck::Stale);
        assert_eq!(b.check_chunk(100, &chunk(100)), Some(true));
        // A late digest a little behind is still taken.
        assert_eq!(
            b.check_digest(&digest_of(65536 + 90, 2), &key),
            DigestCheck::Good
        );
    }

    #[test]
    fn held_chunks_are_released_asked_for_and_expired() {
        let key = signer().verifier();
        let mut b = DigestBook::new(256);
        let t0 = Instant::now();
        for n in 20..24u16 {
            assert!(b.hold(ep(1), n, Bytes::from(chunk(n)), t0).is_none());
        }
        assert_eq!(b.due_requests(t0, 8), Vec::<u16>::new());
        assert_eq!(b.next_deadline(), Some(t0 + FETCH_AFTER));
        let t1 = t0 + FETCH_AFTER;
        assert_eq!(b.due_requests(t1, 2), vec![20, 21]);
        assert_eq!(b.due_requests(t1, 8), vec![22, 23]);
        assert_eq!(b.due_requests(t1, 8), Vec::<u16>::new(), "asked already");
        b.check_digest(&digest_of(20, 2), &key);
        let mut out = Vec::new();
        b.release(&mut out);
        assert_eq!(out.iter().map(|h| h.number).collect::<Vec<_>>(), [20, 21]);
        assert_eq!(b.pending(), 2);
        assert_eq!(b.expire(t0 + HOLD_LIMIT), 2);
        assert_eq!(b.pending(), 0);
        // Bounded: the oldest goes.
        let mut small = DigestBook::new(1);
        for n in 0..1024u16 {
            assert!(small.hold(ep(1), n, Bytes::new(), t0).is_none());
        }
        assert_eq!(small.hold(ep(1), 5000, Bytes::new(), t0).unwrap().number, 0);
    }

    #[test]
    fn the_grouper_closes_full_groups_and_avoids_the_chunk_length() {
        let s = signer();
        let key = s.verifier();
        let mut g = DigestGrouper::new(4, 2 + 1024);
        for n in 0..3u16 {
            assert!(!g.add(&chunk(65534u16.wrapping_add(n))));
        }
        assert!(g.add(&chunk(1)));
        let d = g.close(&s).unwrap();
        let dg = Digest::parse(&d).unwrap();
        assert_eq!((dg.first, dg.count()), (65534, 4));
        assert!(dg.verify(&key));
        assert!(g.close(&s).is_none());
        assert!(g.fits(9), "an empty group takes any chunk");
        g.add(&chunk(2));
        assert!(g.fits(3) && !g.fits(9));
        let dg2 = g.close(&s).unwrap();
        assert_eq!(Digest::parse(&dg2).unwrap().first, 65536 + 2);
        // With 104-byte chunk datagrams, a 2-chunk digest (104 bytes) is never made.
        let mut small = DigestGrouper::new(32, digest_len(2));
        let mut c = Vec::new();
        encode_chunk(0, &[0; 102], &mut c);
        assert!(small.add(&c));
    }
}
