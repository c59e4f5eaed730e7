#![forbid(unsafe_code)]
//! The deterministic byte stream of the test source (`--source test`).
//!
//! The stream is a sequence of 8-byte words; word `k` (stream bytes `8k .. 8k + 8`) holds the
//! number `k` as a big-endian `u64`. So the byte at stream offset `i` is byte `i % 8` of
//! `(i / 8).to_be_bytes()`:
//!
//! ```text
//! offset  0: 00 00 00 00 00 00 00 00   word 0
//! offset  8: 00 00 00 00 00 00 00 01   word 1
//! offset 16: 00 00 00 00 00 00 00 02   word 2
//! ...
//! offset 8 * 0x1234: 00 00 00 00 00 00 12 34
//! ```
//!
//! Any 16 or more consecutive bytes of it tell where in the stream they are, so whoever receives
//! the stream (a player behind a peer, a test) can check it without knowing where it joined:
//! [`locate`] finds the offset of a window, and [`first_mismatch`] checks the bytes that follow
//! against the pattern. Offsets wrap modulo 2^64, a length no stream reaches.

/// The byte at stream offset `offset`.
pub fn byte_at(offset: u64) -> u8 {
    (offset / 8).to_be_bytes()[(offset % 8) as usize]
}

/// Fills `buf` with the stream bytes starting at `offset`, a word at a time.
pub fn fill(offset: u64, buf: &mut [u8]) {
    // Leading bytes up to the next word boundary.
    let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
    let (first, rest) = buf.split_at_mut(head);
    for (i, b) in first.iter_mut().enumerate() {
        *b = byte_at(offset.wrapping_add(i as u64));
    }
    let mut word = offset.wrapping_add(head as u64) / 8;
    let mut words = rest.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&word.to_be_bytes());
        word = next_word(word);
    }
    let tail = words.into_remainder();
    let bytes = word.to_be_bytes();
    tail.copy_from_slice(&bytes[..tail.len()]);
}

/// The word after `word`, wrapping where the offset would pass 2^64.
fn next_word(word: u64) -> u64 {
    word.wrapping_add(1) & (u64::MAX / 8)
}

/// The index of the first byte of `buf` that differs from the stream at `offset`, or `None` when
/// `buf` is exactly the stream bytes `offset .. offset + buf.len()`.
pub fn first_mismatch(offset: u64, buf: &[u8]) -> Option<usize> {
    let head = (((8 - offset % 8) % 8) as usize).min(buf.len());
    if let Some(i) = (0..head).find(|&i| buf[i] != byte_at(offset.wrapping_add(i as u64))) {
        return Some(i);
    }
    let mut word = offset.wrapping_add(head as u64) / 8;
    let mut pos = head;
    let mut words = buf[head..].chunks_exact(8);
    for w in &mut words {
        let expected = word.to_be_bytes();
        if w != expected {
            let i = w.iter().zip(&expected).position(|(a, b)| a != b);
            return i.map(|i| pos + i);
        }
        pos += 8;
        word = next_word(word);
    }
    let expected = word.to_be_bytes();
    words
        .remainder()
        .iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
        .map(|i| pos + i)
}

/// The stream offset at which `buf` starts, if `buf` is at least 16 bytes long and every byte of
/// it matches the stream there; `None` otherwise.
pub fn locate(buf: &[u8]) -> Option<u64> {
    if buf.len() < 16 {
        return None;
    }
    // For each possible alignment, the first whole word in `buf` names the offset; check the rest.
    (0..8usize).find_map(|skip| {
        let word: [u8; 8] = buf[skip..skip + 8].try_into().ok()?;
        let word = u64::from_be_bytes(word);
        let offset = word.checked_mul(8)?.checked_sub(skip as u64)?;
        first_mismatch(offset, buf).is_none().then_some(offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_layout() {
        let mut buf = [0xffu8; 24];
        fill(0, &mut buf);
        assert_eq!(buf[..8], [0; 8]);
        assert_eq!(buf[8..16], [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(buf[16..], [0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(byte_at(8 * 0x1234 + 6), 0x12);
        assert_eq!(byte_at(8 * 0x1234 + 7), 0x34);
        assert_eq!(byte_at(8 * 0x0102_0304_0506_0708), 0x01);
    }

    #[test]
    fn fill_matches_byte_at_everywhere() {
        let starts = [0, 1, 7, 8, 9, 1000, 1 << 40, u64::MAX - 40, u64::MAX - 3];
        for &start in &starts {
            for len in 0..40 {
                let mut buf = vec![0xaa; len];
                fill(start, &mut buf);
                for (i, &b) in buf.iter().enumerate() {
                    assert_eq!(
                        b,
                        byte_at(start.wrapping_add(i as u64)),
                        "{start} {len} {i}"
                    );
                }
                assert_eq!(first_mismatch(start, &buf), None);
            }
        }
    }

    #[test]
    fn wraps_at_the_end_of_the_offset_space() {
        let mut buf = [0u8; 16];
        fill(u64::MAX - 7, &mut buf);
        assert_eq!(buf[..8], (u64::MAX / 8).to_be_bytes());
        assert_eq!(buf[8..], [0; 8]);
    }

    #[test]
    fn first_mismatch_finds_every_position() {
        for start in [0u64, 3, 8, 12345] {
            let mut buf = vec![0u8; 50];
            fill(start, &mut buf);
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x40;
                assert_eq!(first_mismatch(start, &bad), Some(i));
            }
            assert!(first_mismatch(start + 1, &buf).is_some());
        }
    }

    #[test]
    fn locate_finds_every_offset() {
        let mut offsets: Vec<u64> = (0..300).collect();
        offsets.extend([
            1 << 20,
            (1 << 32) + 5,
            8 * 0x0101_0101_0101_0101 + 3,
            u64::MAX - 20,
        ]);
        for &offset in &offsets {
            for len in [16, 17, 23, 24, 100] {
                let mut buf = vec![0u8; len];
                fill(offset, &mut buf);
                assert_eq!(locate(&buf), Some(offset), "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn windows_match_only_one_alignment() {
        // A window of 16 bytes matches the stream at a single offset, so `locate` is unambiguous.
        let mut offsets: Vec<u64> = (0..2048).collect();
        offsets.extend((0..2048).map(|i| (i << 50) + i));
        for &offset in &offsets {
            let mut buf = [0u8; 16];
            fill(offset, &mut buf);
            let matches = (0..8u64)
                .map(|a| (offset & !7).wrapping_add(a).wrapping_sub(8))
                .chain((0..8).map(|a| (offset & !7) + a))
                .chain((0..8).map(|a| (offset & !7).wrapping_add(8 + a)))
                .filter(|&o| first_mismatch(o, &buf).is_none())
                .count();
            assert_eq!(matches, 1, "offset {offset}");
        }
    }

    #[test]
    fn locate_rejects_non_pattern() {
        assert_eq!(locate(&[]), None);
        let mut buf = [0u8; 15];
        fill(0, &mut buf);
        assert_eq!(locate(&buf), None, "too short");
        let mut buf = vec![0u8; 64];
        fill(777, &mut buf);
        // A single wrong byte anywhere, even at the very end, is caught.
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] = bad[i].wrapping_add(1);
            assert_eq!(locate(&bad), None, "corrupt byte {i}");
        }
        assert_eq!(locate(&[0xff; 32]), None);
        assert_eq!(locate(&[0x00; 32]), None);
        assert_eq!(locate(b"OggS\0\x02 and something else"), None);
    }
}

/// Checks a played stream against the pattern as it goes: the stream header must be the pattern
/// from offset 0, and the chunks after it must continue the pattern from wherever playout started
/// (a lost or misplaced chunk breaks it). Shared between the thread that plays and the one that
/// reports.
#[derive(Debug, Default)]
pub struct Checker {
    state: std::sync::Mutex<CheckState>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct CheckState {
    header_ok: Option<bool>,
    next: Option<u64>,
    first: Option<u64>,
    verified: u64,
    breaks: u64,
}

/// What a [`Checker`] found so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CheckReport {
    /// Whether the stream header matched (None before it was seen).
    pub header_ok: Option<bool>,
    /// Stream offset of the first played chunk.
    pub first: Option<u64>,
    /// Chunk bytes that continued the pattern.
    pub verified: u64,
    /// Places where the played stream broke off the pattern.
    pub breaks: u64,
}

impl Checker {
    fn state(&self) -> std::sync::MutexGuard<'_, CheckState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the stream header.
    pub fn header(&self, bytes: &[u8]) {
        self.state().header_ok = Some(first_mismatch(0, bytes).is_none());
    }

    /// Checks the next played chunk payload.
    pub fn chunk(&self, bytes: &[u8]) {
        let mut s = self.state();
        let at = match s.next {
            Some(at) if first_mismatch(at, bytes).is_none() => at,
            _ => {
                // First chunk, or the stream broke: find where we are now.
                if s.next.is_some() {
                    s.breaks += 1;
                }
                match locate(bytes) {
                    Some(at) => {
                        s.first.get_or_insert(at);
                        at
                    }
                    None => {
                        s.next = None;
                        return;
                    }
                }
            }
        };
        s.verified += bytes.len() as u64;
        s.next = Some(at.wrapping_add(bytes.len() as u64));
    }

    /// What was found so far.
    pub fn report(&self) -> CheckReport {
        let s = *self.state();
        CheckReport {
            header_ok: s.header_ok,
            first: s.first,
            verified: s.verified,
            breaks: s.breaks,
        }
    }
}

#[cfg(test)]
mod checker_tests {
    use super::*;

    #[test]
    fn a_checker_follows_the_stream_and_counts_breaks() {
        let c = Checker::default();
        let mut h = vec![0; 100];
        fill(0, &mut h);
        c.header(&h);
        let mut chunk = vec![0; 64];
        for k in [10u64, 11, 12, 14, 15] {
            fill(k * 64, &mut chunk);
            c.chunk(&chunk);
        }
        let r = c.report();
        assert_eq!(r.header_ok, Some(true));
        assert_eq!(r.first, Some(640));
        assert_eq!(r.verified, 5 * 64);
        assert_eq!(r.breaks, 1);
    }
}
