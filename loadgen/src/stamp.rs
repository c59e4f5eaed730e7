//! The timestamped record the load generator's source streams: one record per chunk.
//!
//! The splitter chunks the HTTP body of its source from byte 0, so records of exactly
//! `chunk_size` bytes make every chunk payload one record, and every peer can tell when the chunk
//! it receives left the source:
//!
//! ```text
//! u64 sequence ‖ u64 scheduled CLOCK_MONOTONIC ns ‖ u64 written CLOCK_MONOTONIC ns ‖ u64 MAGIC ‖ fill
//! ```
//!
//! All big-endian. `scheduled` is when the record was due by the source's steady schedule, and is
//! what latency is measured from (as wrk2 measures from the scheduled send time): a source held
//! back by a slow reader (TCP back-pressure from the splitter) then shows up as latency instead of
//! hiding it. `written` is when it was actually handed to the socket; `written - scheduled` is the
//! source's own lag, reported separately.

/// Bytes of the record head; the chunk size must be at least this (it is at least 64 anyway).
pub const STAMP_LEN: usize = 32;

/// Marks a record of ours (`"p2psplg1"`), so foreign bytes are not taken for stamps.
pub const MAGIC: u64 = u64::from_be_bytes(*b"p2psplg1");

/// The head of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Record number, from 0 at the source's start.
    pub seq: u64,
    /// When the record was due, CLOCK_MONOTONIC ns.
    pub scheduled_ns: u64,
    /// When it was written to the socket (or the baseline's buffer), CLOCK_MONOTONIC ns.
    pub written_ns: u64,
}

impl Stamp {
    /// Writes a whole record into `buf` (its length is the chunk size): the head, then a fill
    /// that depends on `seq` (so chunks differ, as a real stream's do).
    pub fn write_record(&self, buf: &mut [u8]) {
        assert!(buf.len() >= STAMP_LEN, "a record holds at least the stamp");
        self.write_head(buf);
        let mut x = self.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for b in &mut buf[STAMP_LEN..] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }

    /// Rewrites only the head of a record (the baseline reuses one buffer).
    pub fn write_head(&self, buf: &mut [u8]) {
        buf[0..8].copy_from_slice(&self.seq.to_be_bytes());
        buf[8..16].copy_from_slice(&self.scheduled_ns.to_be_bytes());
        buf[16..24].copy_from_slice(&self.written_ns.to_be_bytes());
        buf[24..32].copy_from_slice(&MAGIC.to_be_bytes());
    }

    /// Reads the stamp at the start of a chunk payload; `None` if it is too short or not ours.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(payload.get(i..i + 8)?.try_into().ok()?))
        };
        if word(24)? != MAGIC {
            return None;
        }
        Some(Stamp {
            seq: word(0)?,
            scheduled_ns: word(8)?,
            written_ns: word(16)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_foreign_bytes() {
        let s = Stamp {
            seq: 7,
            scheduled_ns: 1_000_000_123,
            written_ns: 1_000_050_000,
        };
        let mut rec = vec![0u8; 1024];
        s.write_record(&mut rec);
        assert_eq!(Stamp::read(&rec), Some(s));
        // Fills differ between records.
        let mut other = vec![0u8; 1024];
        Stamp { seq: 8, ..s }.write_record(&mut other);
        assert_ne!(rec[STAMP_LEN..], other[STAMP_LEN..]);
        assert_eq!(Stamp::read(&rec[..31]), None);
        assert_eq!(Stamp::read(&[0u8; 64]), None);
        rec[30] ^= 1;
        assert_eq!(Stamp::read(&rec), None);
    }
}
