//! `--baseline sendmmsg`: the splitter replaced by a bare fan-out loop, the best this kernel does
//! with no protocol at all. One UDP socket, one chunk buffer (a chunk datagram of the same size,
//! stamped like the source's records), `sendmmsg(2)` batches of 64 destinations whose iovecs all
//! point at that buffer, to the same peer sockets the splitter run uses; paced at the same chunk
//! rate (at saturation it simply never waits). Like the splitter, it sets the don't-fragment bit
//! when the datagrams are small enough (`driver::set_dont_fragment`), so that both pay the same
//! kernel path per datagram.

use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use p2psp::driver::{self, BatchSender, SendPath, SendStats};
use p2psp::proto::wire::CHUNK_HEADER;

use crate::procfs::{self, CpuTimes};
use crate::stamp::Stamp;

/// Destinations per `sendmmsg` call (udp-limits.md: 64 is best or tied at every team size).
pub const BATCH: usize = 64;

/// What the loop counted, readable while it runs.
#[derive(Debug, Default)]
pub struct BaselineStats {
    /// Rounds (chunks) sent.
    pub rounds: AtomicU64,
    /// Datagrams the kernel accepted.
    pub datagrams: AtomicU64,
    /// Bytes the kernel accepted.
    pub bytes: AtomicU64,
    /// Datagrams dropped (EAGAIN past the budget, errors).
    pub dropped: AtomicU64,
    /// Sequence number of the last round, plus one (0: none yet).
    pub last_seq_plus_one: AtomicU64,
}

/// The loop's thread CPU when it ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct BaselineEnd {
    /// User and system time of the sending thread.
    pub cpu: CpuTimes,
    /// How long it ran.
    pub wall: Duration,
}

/// Sends one stamped chunk to every destination per round, `chunks_per_second` rounds per second,
/// until `stop`. Pinned to `core` if given.
pub fn run(
    dests: Vec<SocketAddrV4>,
    chunk_size: usize,
    chunks_per_second: f64,
    core: Option<core_affinity::CoreId>,
    stats: Arc<BaselineStats>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<BaselineEnd> {
    if let Some(c) = core {
        core_affinity::set_for_current(c);
    }
    crate::sched::apply("baseline");
    let socket = driver::udp_socket(
        SocketAddrV4::new([127, 0, 0, 1].into(), 0),
        false,
        None,
        Some(8 << 20),
    )?;
    // As the splitter's shards do (no IP ID to pick per datagram).
    let _ = driver::set_dont_fragment(&socket, CHUNK_HEADER + chunk_size);
    let mut sender = BatchSender::new(socket.as_raw_fd(), SendPath::Sendmmsg, BATCH)?;
    let mut chunk = vec![0u8; CHUNK_HEADER + chunk_size];
    let cpu0 = procfs::thread_cpu().unwrap_or_default();
    let started = std::time::Instant::now();
    let period_ns = 1e9 / chunks_per_second;
    let t0 = driver::monotonic_ns();
    let mut seq: u64 = 0;
    let mut send_stats = SendStats::default();
    Stamp {
        seq: 0,
        scheduled_ns: t0,
        written_ns: t0,
    }
    .write_record(&mut chunk[CHUNK_HEADER..]);
    while !stop.load(Ordering::Relaxed) {
        let scheduled_ns = t0 + (seq as f64 * period_ns) as u64;
        let now = driver::monotonic_ns();
        if scheduled_ns > now {
            thread::sleep(Duration::from_nanos(scheduled_ns - now).min(Duration::from_millis(20)));
            continue;
        }
        chunk[..CHUNK_HEADER].copy_from_slice(&(seq as u16).to_be_bytes());
        Stamp {
            seq,
            scheduled_ns,
            written_ns: now,
        }
        .write_head(&mut chunk[CHUNK_HEADER..]);
        sender.send_to_all(&chunk, &dests, &mut send_stats);
        seq += 1;
        stats.rounds.store(seq, Ordering::Relaxed);
        stats.last_seq_plus_one.store(seq, Ordering::Relaxed);
        stats
            .datagrams
            .store(send_stats.datagrams, Ordering::Relaxed);
        stats.bytes.store(send_stats.bytes, Ordering::Relaxed);
        stats.dropped.store(send_stats.dropped, Ordering::Relaxed);
    }
    let cpu = procfs::thread_cpu().unwrap_or_default().since(&cpu0);
    Ok(BaselineEnd {
        cpu,
        wall: started.elapsed(),
    })
}
