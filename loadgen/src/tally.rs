//! What the peers count, per peer and per interval: received, played, lost, late, duplicate
//! chunks and the source-to-peer latency histogram. Pure bookkeeping, no I/O and no clock, so it
//! is unit-tested here.

use hdrhistogram::Histogram;
use p2psp::proto::peer::{PeerEvent, PeerStats};
use serde::Serialize;

use crate::stamp::Stamp;

/// Latencies are recorded in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub const LATENCY_MAX_NS: u64 = 100_000_000_000;

/// A new, empty latency histogram.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid bounds")
}

/// The two latency histograms of an interval, in ns. `scheduled` is the headline: receive time
/// minus the record's scheduled time (as wrk2 measures, so a source held back shows up).
/// `written` is receive time minus the source's actual write: what the splitter and the kernel
/// add, without the load generator's own source lag.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// From the source's schedule.
    pub scheduled: Histogram<u64>,
    /// From the source's write.
    pub written: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            scheduled: latency_histogram(),
            written: latency_histogram(),
        }
    }
}

impl Latencies {
    /// Adds `o`'s samples to these.
    pub fn add(&mut self, o: &Latencies) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.scheduled.add(&o.scheduled);
        let _ = self.written.add(&o.written);
    }

    /// Empties both.
    pub fn reset(&mut self) {
        self.scheduled.reset();
        self.written.reset();
    }
}

/// Counters of one interval (or of a whole run), summed over peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Datagrams received by peers (chunks, hellos, goodbyes...).
    pub datagrams: u64,
    /// Payload bytes of those datagrams.
    pub bytes: u64,
    /// Chunk datagrams received (first copies, duplicates and late ones included).
    pub chunks: u64,
    /// Chunks played in order by the peers' playout.
    pub played: u64,
    /// Chunks a peer did not have at its playout deadline (skipped chunks included).
    pub lost: u64,
    /// Chunks that arrived after their playout deadline.
    pub late: u64,
    /// Chunks a peer received twice.
    pub duplicates: u64,
    /// Chunks from neighbours numbered beyond the playout buffer (dropped by the peer).
    pub out_of_window: u64,
    /// Chunk datagrams whose payload carried no stamp of ours.
    pub unstamped: u64,
    /// Datagrams the peers sent (relays, hellos, goodbyes, loss reports).
    pub sent: u64,
    /// Datagrams the peers could not send (counted by the driver).
    pub send_dropped: u64,
    /// `--sockets shared`: datagrams to an address that is no peer of the worker (dropped).
    pub unknown_dest: u64,
    /// CIS: signatures the peers checked (of chunks, or of digests).
    pub signatures: u64,
    /// CIS digest mode: chunks the peers checked against a digest's hash.
    pub hashes: u64,
}

impl Tally {
    /// Adds `o` to these counters.
    pub fn add(&mut self, o: &Tally) {
        self.datagrams += o.datagrams;
        self.bytes += o.bytes;
        self.chunks += o.chunks;
        self.played += o.played;
        self.lost += o.lost;
        self.late += o.late;
        self.duplicates += o.duplicates;
        self.out_of_window += o.out_of_window;
        self.unstamped += o.unstamped;
        self.sent += o.sent;
        self.send_dropped += o.send_dropped;
        self.unknown_dest += o.unknown_dest;
        self.signatures += o.signatures;
        self.hashes += o.hashes;
    }

    /// Lost chunks over chunks due (played + lost); 0 when none were due.
    pub fn loss_ratio(&self) -> f64 {
        let due = self.played + self.lost;
        if due == 0 {
            0.0
        } else {
            self.lost as f64 / due as f64
        }
    }
}

/// Counts one peer's playout events into `t`. `Lost` is one chunk; `Skipped` is `count` chunks
/// the splitter jumped over, which the peer never had either.
pub fn count_event(e: &PeerEvent, t: &mut Tally) {
    match e {
        PeerEvent::Play { .. } => t.played += 1,
        PeerEvent::Lost { .. } => t.lost += 1,
        PeerEvent::Skipped { count } => t.lost += u64::from(*count),
        _ => {}
    }
}

/// The part of a peer's own counters that says whether the last chunk was a first copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    late: u64,
    duplicates: u64,
    out_of_window: u64,
}

impl Seen {
    /// Reads them from the peer core's stats.
    pub fn of(s: &PeerStats) -> Seen {
        Seen {
            late: s.late,
            duplicates: s.duplicates,
            out_of_window: s.out_of_window,
        }
    }
}

/// Accounts one chunk datagram a DBS peer just handled, given its counters before (`before`) and
/// after (`after`) it: late, duplicate and out-of-window chunks are counted; the latency (receive
/// time minus the stamp's scheduled time) is recorded for every chunk that was not a duplicate
/// or out of window (a late chunk's latency is real, and large). Returns the latency recorded.
pub fn account_chunk(
    payload: &[u8],
    recv_ns: u64,
    before: Seen,
    after: Seen,
    t: &mut Tally,
    hist: &mut Latencies,
) -> Option<u64> {
    t.chunks += 1;
    t.late += after.late - before.late;
    t.duplicates += after.duplicates - before.duplicates;
    t.out_of_window += after.out_of_window - before.out_of_window;
    if after.duplicates != before.duplicates || after.out_of_window != before.out_of_window {
        return None;
    }
    record_latency(payload, recv_ns, t, hist)
}

/// Records `recv_ns` minus the payload's scheduled stamp, and minus its written stamp; counts an
/// unstamped payload. Returns the latency from the schedule.
pub fn record_latency(
    payload: &[u8],
    recv_ns: u64,
    t: &mut Tally,
    hist: &mut Latencies,
) -> Option<u64> {
    let Some(stamp) = Stamp::read(payload) else {
        t.unstamped += 1;
        return None;
    };
    // Same clock, same boot: only a clock bug could make this negative; count it as 1 ns.
    let lat = recv_ns.saturating_sub(stamp.scheduled_ns).max(1);
    hist.scheduled.saturating_record(lat);
    hist.written
        .saturating_record(recv_ns.saturating_sub(stamp.written_ns).max(1));
    Some(lat)
}

/// A baseline receiver's view of the sequence numbers one peer got from the bare fan-out loop:
/// gaps are losses, a number seen again a duplicate, an old one seen for the first time fills its
/// gap (late, no longer lost). The last 64 numbers are remembered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTracker {
    /// Next number expected; `None` before the first.
    next: Option<u64>,
    /// Bit `k` set: `next - 1 - k` was received.
    window: u64,
}

impl SeqTracker {
    /// Counts sequence number `seq` into `t` (`played`, `lost`, `late`, `duplicates`).
    pub fn on_seq(&mut self, seq: u64, t: &mut Tally) {
        let Some(next) = self.next else {
            self.next = Some(seq + 1);
            self.window = 1;
            t.played += 1;
            return;
        };
        if seq >= next {
            let gap = seq - next;
            t.lost += gap;
            t.played += 1;
            self.window = if gap + 1 >= 64 {
                1
            } else {
                (self.window << (gap + 1)) | 1
            };
            self.next = Some(seq + 1);
            return;
        }
        let back = next - 1 - seq;
        if back >= 64 {
            t.late += 1;
            return;
        }
        if self.window & (1 << back) != 0 {
            t.duplicates += 1;
        } else {
            self.window |= 1 << back;
            t.late += 1;
            t.lost = t.lost.saturating_sub(1);
            t.played += 1;
        }
    }

    /// At the end: numbers up to `last_sent` that never came are lost.
    pub fn finish(&mut self, last_sent: u64, t: &mut Tally) {
        match self.next {
            Some(next) if next <= last_sent => {
                t.lost += last_sent + 1 - next;
                self.next = Some(last_sent + 1);
            }
            Some(_) => {}
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use p2psp::proto::Endpoint;
    use p2psp::proto::peer::{Peer, PeerRules};
    use p2psp::proto::wire::encode_chunk;
    use std::time::Instant;

    const C: usize = 64;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new([127, 0, 0, 1].into(), port)
    }

    fn chunk(n: u16, scheduled_ns: u64) -> Bytes {
        chunk_written(n, scheduled_ns, scheduled_ns)
    }

    fn chunk_written(n: u16, scheduled_ns: u64, written_ns: u64) -> Bytes {
        let mut payload = vec![0u8; C];
        Stamp {
            seq: u64::from(n),
            scheduled_ns,
            written_ns,
        }
        .write_record(&mut payload);
        let mut v = Vec::new();
        encode_chunk(n, &payload, &mut v);
        Bytes::from(v)
    }

    /// Feeds `data` from `from` to a real DBS peer core at `recv_ns`, accounting as a worker does.
    fn feed(p: &mut Peer, from: u16, data: Bytes, recv_ns: u64, t: &mut Tally, h: &mut Latencies) {
        let before = Seen::of(p.stats());
        p.handle_datagram(Instant::now(), ep(from), data.clone());
        account_chunk(&data[2..], recv_ns, before, Seen::of(p.stats()), t, h);
        while let Some(e) = p.poll_event() {
            count_event(&e, t);
        }
        while p.poll_transmit().is_some() {}
    }

    #[test]
    fn latency_is_receive_time_minus_the_scheduled_stamp() {
        let mut t = Tally::default();
        let mut h = Latencies::default();
        // Due at 5 ms, written 100 µs late, received at 5.25 ms.
        let c = chunk_written(1, 5_000_000, 5_100_000);
        assert_eq!(
            record_latency(&c[2..], 5_250_000, &mut t, &mut h),
            Some(250_000)
        );
        assert_eq!(h.scheduled.len(), 1);
        assert!((h.scheduled.value_at_quantile(0.5) as i64 - 250_000).abs() < 250);
        // From the write: the source's 100 µs of lag left out.
        assert_eq!(h.written.len(), 1);
        assert!((h.written.value_at_quantile(0.5) as i64 - 150_000).abs() < 150);
        // A clock that went backwards records 1 ns rather than wrapping.
        assert_eq!(record_latency(&c[2..], 4_000_000, &mut t, &mut h), Some(1));
        assert_eq!(record_latency(&[0u8; 64], 1, &mut t, &mut h), None);
        assert_eq!(t.unstamped, 1);
    }

    #[test]
    fn peer_core_loss_late_and_duplicates_are_counted() {
        // Buffer of 8: playout runs 4 behind the newest chunk. Endpoint 7 is a teammate (a
        // stranger's chunks far from the playout position would be dropped, not counted late).
        let mut p = Peer::new(PeerRules::new(ep(9), C, 8), &[ep(7)], 0);
        let (mut t, mut h) = (Tally::default(), Latencies::default());
        for n in (0..20u16).filter(|&n| n != 10) {
            feed(&mut p, 9, chunk(n, 1000), 2000, &mut t, &mut h);
        }
        // 0..=15 are due (19 - 4): 15 played, 10 lost.
        assert_eq!((t.played, t.lost), (15, 1));
        assert!((t.loss_ratio() - 1.0 / 16.0).abs() < 1e-12);
        // 10 arrives after its deadline (still within a buffer of it): late, and its (large)
        // latency is recorded.
        feed(&mut p, 7, chunk(10, 1000), 9000, &mut t, &mut h);
        assert_eq!(t.late, 1);
        assert_eq!(h.scheduled.len(), 20);
        // 18 again: a duplicate, no latency recorded.
        feed(&mut p, 7, chunk(18, 1000), 3000, &mut t, &mut h);
        assert_eq!(t.duplicates, 1);
        assert_eq!(h.scheduled.len(), 20);
        assert_eq!(t.chunks, 21);
        assert_eq!(t.lost, p.stats().lost);
        assert_eq!(t.played, p.stats().played);
    }

    #[test]
    fn a_splitter_jump_counts_the_skipped_chunks_as_lost() {
        let mut p = Peer::new(PeerRules::new(ep(9), C, 8), &[], 0);
        let (mut t, mut h) = (Tally::default(), Latencies::default());
        feed(&mut p, 9, chunk(0, 1), 2, &mut t, &mut h);
        feed(&mut p, 9, chunk(100, 1), 2, &mut t, &mut h);
        assert_eq!(t.lost, p.stats().lost);
        // The jump skips to half a buffer behind 100 (0..=95 skipped, 96 numbers), and 96 is
        // then missing at its deadline.
        assert_eq!(t.lost, 96 + 1);
    }

    #[test]
    fn seq_tracker_gaps_duplicates_and_late_fills() {
        let mut s = SeqTracker::default();
        let mut t = Tally::default();
        for seq in [10, 11, 13, 14] {
            s.on_seq(seq, &mut t);
        }
        assert_eq!((t.played, t.lost), (4, 1));
        s.on_seq(14, &mut t);
        assert_eq!(t.duplicates, 1);
        s.on_seq(12, &mut t); // fills the gap
        assert_eq!((t.played, t.lost, t.late), (5, 0, 1));
        s.on_seq(12, &mut t);
        assert_eq!(t.duplicates, 2);
        s.on_seq(200, &mut t); // a gap wider than the window
        assert_eq!(t.lost, 185);
        s.on_seq(100, &mut t); // too old to tell: late
        assert_eq!(t.late, 2);
        s.finish(203, &mut t);
        assert_eq!(t.lost, 188);
        s.finish(203, &mut t);
        assert_eq!(t.lost, 188);
    }

    #[test]
    fn tallies_add_up() {
        let a = Tally {
            datagrams: 1,
            bytes: 2,
            chunks: 3,
            played: 4,
            lost: 5,
            late: 6,
            duplicates: 7,
            out_of_window: 8,
            unstamped: 9,
            sent: 10,
            send_dropped: 11,
            unknown_dest: 12,
            signatures: 13,
            hashes: 14,
        };
        let mut b = a;
        b.add(&a);
        assert_eq!(b.send_dropped, 22);
        assert_eq!(b.unknown_dest, 24);
        assert_eq!((b.signatures, b.hashes), (26, 28));
        assert_eq!(b.datagrams, 2);
        assert_eq!(Tally::default().loss_ratio(), 0.0);
    }
}
