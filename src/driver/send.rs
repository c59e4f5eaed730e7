//! Batched UDP sends on one non-blocking socket: io_uring `Send` with a destination address, or
//! `sendmmsg(2)`. Both share one retry policy ([`drive`]): EAGAIN waits for `POLLOUT` within a
//! per-call budget and retries, anything else is counted and dropped, nothing is lost silently.

use std::fmt;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::ptr;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::path::kernel_path;
use super::sys::{self, POLLOUT, PollFd, SOCKADDR_IN_LEN, errno, sockaddr_in};

/// Largest batch: `sendmmsg` silently caps a call at `UIO_MAXIOV` (1024) messages.
pub const MAX_BATCH: usize = 1024;

/// How long one [`BatchSender::send_to_all`] / [`BatchSender::send_each`] call may wait, in total,
/// for the socket to become writable again after EAGAIN before it drops what is left.
pub const EAGAIN_WAIT_BUDGET: Duration = Duration::from_millis(20);

/// Consecutive send rounds without progress (nothing sent, nothing dropped) before giving up,
/// even with wait budget left. Bounds the loop when `poll` says "writable" but sends still fail.
const MAX_IDLE_ROUNDS: u32 = 8;

/// How long a [`BatchSender::send_from_each`] retry round waits after EAGAIN.
const MANY_SOCKETS_WAIT: Duration = Duration::from_micros(200);

/// Consecutive EINTRs from `sendmmsg` before the rest of the batch goes to the retry round.
const MAX_EINTR: u32 = 16;

/// How long the io_uring path keeps retrying transient `io_uring_enter` failures while its sends
/// are in flight before it gives up (and aborts, see [`lent_memory_lost`]).
const ENTER_RETRY_LIMIT: Duration = Duration::from_secs(10);

/// Kernel interface used for batched UDP sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendPath {
    /// io_uring `IORING_OP_SEND` with a destination address, one `io_uring_enter` per batch.
    Uring,
    /// `sendmmsg(2)`, one call per batch.
    Sendmmsg,
}

kernel_path! {
    SendPath, Sendmmsg, "send", uring_send_supported,
    names: "sendmmsg";
    /// io_uring if this kernel/container allows it (a small ring builds and its probe lists
    /// `IORING_OP_SEND`), else sendmmsg. Probed once per process.
}

fn uring_send_supported() -> bool {
    let Ok(ring) = IoUring::<squeue::Entry, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(8)
    else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok() && probe.is_supported(opcode::Send::CODE)
}

/// Counters a sender updates. Plain `u64`s owned by one thread; [`add`](SendStats::add) merges.
///
/// Every datagram asked for ends up in exactly one of `datagrams` (accepted by the kernel) and
/// `dropped`: `datagrams + dropped` equals the number of destinations given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Kernel submissions: `io_uring_enter` calls that submitted sends, or `sendmmsg` calls.
    pub submissions: u64,
    /// Datagrams the kernel accepted.
    pub datagrams: u64,
    /// Payload bytes the kernel accepted.
    pub bytes: u64,
    /// Send attempts refused with EAGAIN (each was retried after waiting for `POLLOUT`, or
    /// dropped when the wait budget ran out). sendmmsg reports one EAGAIN per call, for the first
    /// datagram it could not send.
    pub eagain: u64,
    /// Datagrams refused with ENOBUFS (also counted in `dropped`; not retried).
    pub enobufs: u64,
    /// Accepted datagrams the kernel reported shorter than the payload (also in `datagrams`).
    pub partial: u64,
    /// Datagrams refused with any other error (also counted in `dropped`).
    pub errors: u64,
    /// Datagrams not sent: ENOBUFS, other errors, or still EAGAIN when the wait budget ran out.
    pub dropped: u64,
}

impl SendStats {
    /// Adds `other`'s counters to these.
    pub fn add(&mut self, other: &SendStats) {
        self.submissions += other.submissions;
        self.datagrams += other.datagrams;
        self.bytes += other.bytes;
        self.eagain += other.eagain;
        self.enobufs += other.enobufs;
        self.partial += other.partial;
        self.errors += other.errors;
        self.dropped += other.dropped;
    }

    pub(super) fn drop_one(&mut self, res: i32) {
        if res == -libc::ENOBUFS {
            self.enobufs += 1;
        } else {
            self.errors += 1;
        }
        self.dropped += 1;
    }
}

/// The payload of batch entry `i`.
#[derive(Clone, Copy)]
enum Payloads<'a> {
    /// One payload for every destination.
    Same(&'a [u8]),
    /// This batch's `(destination, payload)` items.
    Each(&'a [(SocketAddrV4, &'a [u8])]),
    /// This batch's `(socket, destination, payload)` items: each from its own socket.
    From(&'a [(RawFd, SocketAddrV4, &'a [u8])]),
}

impl<'a> Payloads<'a> {
    fn get(self, i: u32) -> &'a [u8] {
        match self {
            Payloads::Same(p) => p,
            Payloads::Each(items) => items[i as usize].1,
            Payloads::From(items) => items[i as usize].2,
        }
    }

    /// The socket entry `i` goes out from: its own for [`Payloads::From`], else the sender's.
    fn fd(self, i: u32, own: RawFd) -> RawFd {
        match self {
            Payloads::From(items) => items[i as usize].0,
            _ => own,
        }
    }
}

/// A SINGLE_ISSUER ring, created disabled and enabled by the first thread that sends.
struct SendRing {
    ring: IoUring,
    issuer: Option<ThreadId>,
    entries: u32,
}

impl SendRing {
    fn build(entries: u32) -> io::Result<IoUring> {
        IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_r_disabled()
            .setup_cqsize(entries * 2)
            .build(entries)
    }

    fn new(entries: u32) -> io::Result<SendRing> {
        Ok(SendRing {
            ring: SendRing::build(entries)?,
            issuer: None,
            entries,
        })
    }

    /// Makes the calling thread the ring's issuer. The first call enables the ring; a call from
    /// another thread later (the sender was moved) replaces the ring, which holds nothing: every
    /// send call reaps all it submitted.
    fn claim(&mut self) -> io::Result<()> {
        let me = thread::current().id();
        if self.issuer == Some(me) {
            return Ok(());
        }
        if self.issuer.is_some() {
            self.ring = SendRing::build(self.entries)?;
            self.issuer = None;
        }
        self.ring.submitter().register_enable_rings()?;
        self.issuer = Some(me);
        Ok(())
    }

    /// Submits what is queued and reaps exactly `submitted` completions, passing each
    /// `(user_data, result)` to `on_cqe`. Does not return before all are reaped: the entries point
    /// at memory the caller lent only for the duration of its call.
    fn complete(&mut self, submitted: usize, mut on_cqe: impl FnMut(u32, i32)) {
        let mut reaped = 0;
        let mut failing_since: Option<Instant> = None;
        while reaped < submitted {
            // Ok means at least `submitted - reaped` completions are now in the CQ; each Ok round
            // therefore reaps at least one, which bounds the loop.
            if let Err(e) = self.ring.submit_and_wait(submitted - reaped) {
                let transient = matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ENOMEM)
                );
                let since = *failing_since.get_or_insert_with(Instant::now);
                if !transient || since.elapsed() > ENTER_RETRY_LIMIT {
                    lent_memory_lost(&e);
                }
                if e.raw_os_error() != Some(libc::EINTR) {
                    thread::yield_now();
                }
            }
            for cqe in self.ring.completion() {
                on_cqe(cqe.user_data() as u32, cqe.result());
                reaped += 1;
            }
        }
    }
}

/// The kernel holds send requests pointing into memory this call borrowed, and refuses to complete
/// them. Returning would let the caller free that memory under the kernel; aborting is the only
/// sound way out. Only reachable through a kernel or programming error: the ring is private, sized
/// for the batch, used from its issuer thread, and UDP sends with MSG_DONTWAIT complete inline.
#[cold]
fn lent_memory_lost(e: &io::Error) -> ! {
    eprintln!(
        "p2psp::driver: io_uring_enter kept failing ({e}) with sends in flight; aborting rather \
         than returning while the kernel may still read the caller's buffers"
    );
    std::process::abort()
}

/// Batched UDP sender on one non-blocking socket. See the [module docs](super) for how the
/// memory lent to the kernel is kept valid.
pub struct BatchSender {
    fd: RawFd,
    path: SendPath,
    max_batch: usize,
    ring: Option<SendRing>,
    /// Destination addresses of the current batch. Fixed length `max_batch`, never reallocated.
    addrs: Box<[libc::sockaddr_in]>,
    /// sendmmsg scratch: one iovec per entry (or entry 0 shared by all). Fixed length.
    iovs: Box<[libc::iovec]>,
    /// sendmmsg scratch: one header per entry. Fixed length.
    msgs: Box<[libc::mmsghdr]>,
    /// Batch indices still to send, and those to retry after EAGAIN.
    pending: Vec<u32>,
    retry: Vec<u32>,
}

// SAFETY: the raw pointers in `iovs` and `msgs` are scratch: rewritten at the start of every send
// and read by the kernel only during that send; between calls nothing dereferences them. The ring
// is `Send` and is re-claimed by whichever thread sends next. So moving the sender between threads
// shares nothing.
unsafe impl Send for BatchSender {}

impl fmt::Debug for BatchSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchSender")
            .field("fd", &self.fd)
            .field("path", &self.path)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl BatchSender {
    /// A sender on `fd`, which must stay open for the sender's life (the caller keeps the
    /// `UdpSocket`). `max_batch` is the number of destinations per submission (e.g. 64..256),
    /// clamped to `1..=`[`MAX_BATCH`]. Fails if `fd` is negative or, for [`SendPath::Uring`], if
    /// the ring cannot be built.
    pub fn new(fd: RawFd, path: SendPath, max_batch: usize) -> io::Result<BatchSender> {
        if fd < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "BatchSender: negative fd",
            ));
        }
        let max_batch = max_batch.clamp(1, MAX_BATCH);
        let ring = match path {
            SendPath::Uring => Some(SendRing::new(max_batch.next_power_of_two() as u32)?),
            SendPath::Sendmmsg => None,
        };
        let unspecified = sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let empty_iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: mmsghdr is plain old data (pointers and integers); all-zero is a valid value
        // (null pointers, zero lengths), and no field is read before it is set.
        let empty_msg: libc::mmsghdr = unsafe { mem::zeroed() };
        Ok(BatchSender {
            fd,
            path,
            max_batch,
            ring,
            addrs: vec![unspecified; max_batch].into_boxed_slice(),
            iovs: vec![empty_iov; max_batch].into_boxed_slice(),
            msgs: vec![empty_msg; max_batch].into_boxed_slice(),
            pending: Vec::with_capacity(max_batch),
            retry: Vec::with_capacity(max_batch),
        })
    }

    /// The kernel interface this sender uses.
    pub fn path(&self) -> SendPath {
        self.path
    }

    /// The batch size in use (after clamping).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Sends the same `payload` to every address in `dests`.
    ///
    /// One submission (`io_uring_enter` / `sendmmsg`) per batch of up to `max_batch`
    /// destinations; every entry points at the one `payload` buffer (no copy per destination).
    /// Returns when every datagram was accepted by the kernel or counted as dropped (see
    /// [`SendStats`]); waits for `POLLOUT` at most [`EAGAIN_WAIT_BUDGET`] in total. Never fails:
    /// errors are counted.
    ///
    /// On the io_uring path, if `io_uring_enter` fails permanently while sends are in flight
    /// (a kernel or programming error, never seen), the process aborts: returning would let the
    /// caller free `payload` while the kernel may still read it.
    pub fn send_to_all(&mut self, payload: &[u8], dests: &[SocketAddrV4], stats: &mut SendStats) {
        let mut budget = EAGAIN_WAIT_BUDGET;
        for batch in dests.chunks(self.max_batch) {
            for (slot, dest) in self.addrs.iter_mut().zip(batch) {
                *slot = sockaddr_in(*dest);
            }
            self.send_batch(Payloads::Same(payload), batch.len(), stats, &mut budget);
        }
    }

    /// Sends a different payload to each destination (relays, goodbyes, small control messages),
    /// with the same batching, retry policy and accounting as [`send_to_all`](Self::send_to_all).
    pub fn send_each(&mut self, items: &[(SocketAddrV4, &[u8])], stats: &mut SendStats) {
        let mut budget = EAGAIN_WAIT_BUDGET;
        for batch in items.chunks(self.max_batch) {
            for (slot, (dest, _)) in self.addrs.iter_mut().zip(batch) {
                *slot = sockaddr_in(*dest);
            }
            self.send_batch(Payloads::Each(batch), batch.len(), stats, &mut budget);
        }
    }

    /// A sender with no socket of its own, for [`send_from_each`](Self::send_from_each) only
    /// (its [`send_to_all`](Self::send_to_all) and [`send_each`](Self::send_each) count every
    /// datagram as an error). Used where thousands of sockets each send a little, as the load
    /// generator's peers relaying chunks: one submission carries sends from many sockets.
    pub fn without_socket(path: SendPath, max_batch: usize) -> io::Result<BatchSender> {
        let mut sender = BatchSender::new(0, path, max_batch)?;
        sender.fd = -1;
        Ok(sender)
    }

    /// Sends each payload from its own socket (`(socket, destination, payload)`; every socket must
    /// stay open during the call), with the same accounting as [`send_each`](Self::send_each).
    ///
    /// io_uring: one submission per batch, whatever the sockets. sendmmsg: one call per run of
    /// consecutive items from the same socket, so group items by socket for fewer calls. After
    /// EAGAIN the retry round waits a short while (up to the same total budget) instead of for
    /// `POLLOUT` on one socket.
    pub fn send_from_each(
        &mut self,
        items: &[(RawFd, SocketAddrV4, &[u8])],
        stats: &mut SendStats,
    ) {
        let mut budget = EAGAIN_WAIT_BUDGET;
        for batch in items.chunks(self.max_batch) {
            for (slot, (_, dest, _)) in self.addrs.iter_mut().zip(batch) {
                *slot = sockaddr_in(*dest);
            }
            self.send_batch(Payloads::From(batch), batch.len(), stats, &mut budget);
        }
    }

    /// Sends batch entries `0..n` (addresses already in `self.addrs`).
    fn send_batch(
        &mut self,
        payloads: Payloads<'_>,
        n: usize,
        stats: &mut SendStats,
        budget: &mut Duration,
    ) {
        let BatchSender {
            fd,
            ring,
            addrs,
            iovs,
            msgs,
            pending,
            retry,
            ..
        } = self;
        let fd = *fd;
        pending.clear();
        pending.extend(0..n as u32);
        let attempt = |pend: &[u32], retry: &mut Vec<u32>, stats: &mut SendStats| match ring {
            Some(ring) => uring_attempt(ring, fd, addrs, payloads, pend, retry, stats),
            None if matches!(payloads, Payloads::From(_)) => {
                // One sendmmsg per run of entries from the same socket.
                let mut rest = pend;
                while let Some(&first) = rest.first() {
                    let run_fd = payloads.fd(first, fd);
                    let run = rest
                        .iter()
                        .position(|&i| payloads.fd(i, fd) != run_fd)
                        .unwrap_or(rest.len());
                    mmsg_attempt(
                        run_fd,
                        addrs,
                        iovs,
                        msgs,
                        payloads,
                        &rest[..run],
                        retry,
                        stats,
                    );
                    rest = &rest[run..];
                }
            }
            None => mmsg_attempt(fd, addrs, iovs, msgs, payloads, pend, retry, stats),
        };
        let many = matches!(payloads, Payloads::From(_));
        drive(pending, retry, stats, budget, attempt, |max| {
            if many {
                // Several sockets may be full: no single one to wait on.
                let start = Instant::now();
                let _ = sys::poll(&mut [], Some(max.min(MANY_SOCKETS_WAIT)));
                start.elapsed()
            } else {
                wait_writable(fd, max)
            }
        });
    }
}

/// The retry policy shared by both paths. `attempt` tries to send `pending`, counts what it sent
/// or dropped, and puts what got EAGAIN (or EINTR) in `retry`. Between rounds, `wait` blocks until
/// the socket is writable (at most the remaining `budget`) and returns the time it took. Ends when
/// nothing is left, or counts what is left as dropped when the budget is spent or
/// [`MAX_IDLE_ROUNDS`] rounds in a row made no progress.
fn drive(
    pending: &mut Vec<u32>,
    retry: &mut Vec<u32>,
    stats: &mut SendStats,
    budget: &mut Duration,
    mut attempt: impl FnMut(&[u32], &mut Vec<u32>, &mut SendStats),
    mut wait: impl FnMut(Duration) -> Duration,
) {
    let mut idle_rounds = 0;
    loop {
        retry.clear();
        attempt(pending, retry, stats);
        if retry.is_empty() {
            return;
        }
        // `retry` is a subset of `pending`: shorter means something was sent or dropped.
        if retry.len() < pending.len() {
            idle_rounds = 0;
        } else {
            idle_rounds += 1;
        }
        if budget.is_zero() || idle_rounds > MAX_IDLE_ROUNDS {
            break;
        }
        let spent = wait(*budget);
        *budget = budget.saturating_sub(spent);
        mem::swap(pending, retry);
    }
    stats.dropped += retry.len() as u64;
    retry.clear();
}

/// Waits until `fd` is writable or `max` passed; returns the time spent. Errors are ignored: the
/// caller's budget and idle-round limit bound the retries anyway.
pub(super) fn wait_writable(fd: RawFd, max: Duration) -> Duration {
    let start = Instant::now();
    let mut fds = [PollFd::new(fd, POLLOUT)];
    let _ = sys::poll(&mut fds, Some(max));
    start.elapsed()
}

/// Counts one send result (`res` = bytes sent, or `-errno`) for batch entry `i` of `len` bytes.
fn account(res: i32, len: usize, i: u32, retry: &mut Vec<u32>, stats: &mut SendStats) {
    if res >= 0 {
        stats.datagrams += 1;
        stats.bytes += res as u64;
        if (res as usize) < len {
            stats.partial += 1;
        }
    } else if res == -libc::EAGAIN {
        stats.eagain += 1;
        retry.push(i);
    } else if res == -libc::EINTR {
        retry.push(i);
    } else {
        stats.drop_one(res);
    }
}

/// One io_uring round: one SQE per pending entry, one `io_uring_enter`, reap all.
fn uring_attempt(
    ring: &mut SendRing,
    fd: RawFd,
    addrs: &[libc::sockaddr_in],
    payloads: Payloads<'_>,
    pending: &[u32],
    retry: &mut Vec<u32>,
    stats: &mut SendStats,
) {
    if ring.claim().is_err() {
        for _ in pending {
            stats.drop_one(-libc::EIO);
        }
        return;
    }
    let mut pushed = 0;
    {
        let mut sq = ring.ring.submission();
        for &i in pending {
            let payload = payloads.get(i);
            let Ok(len) = u32::try_from(payload.len()) else {
                stats.drop_one(-libc::EMSGSIZE);
                continue;
            };
            // MSG_DONTWAIT: EAGAIN comes back to us instead of io_uring arming a poll.
            let entry = opcode::Send::new(types::Fd(payloads.fd(i, fd)), payload.as_ptr(), len)
                .dest_addr(ptr::from_ref(&addrs[i as usize]).cast())
                .dest_addr_len(SOCKADDR_IN_LEN)
                .flags(libc::MSG_DONTWAIT)
                .build()
                .user_data(u64::from(i));
            // SAFETY: the entry points at `payload` (borrowed by our caller for the whole call)
            // and at `addrs[i]` (owned by the sender, fixed-size, not touched until the next
            // call). `complete` below reaps this entry's completion before we return, so both
            // outlive the kernel's use of them.
            match unsafe { sq.push(&entry) } {
                Ok(()) => pushed += 1,
                // Unreachable: the queue is empty here and holds at least max_batch entries.
                Err(_) => stats.drop_one(-libc::EBUSY),
            }
        }
    }
    if pushed == 0 {
        return;
    }
    stats.submissions += 1;
    ring.complete(pushed, |i, res| {
        account(res, payloads.get(i).len(), i, retry, stats)
    });
}

/// One sendmmsg round over `pending`: a short count advances past what was sent (never drops the
/// rest, unlike libuv#3129); -1 applies to the first unsent entry.
#[allow(clippy::too_many_arguments)]
fn mmsg_attempt(
    fd: RawFd,
    addrs: &[libc::sockaddr_in],
    iovs: &mut [libc::iovec],
    msgs: &mut [libc::mmsghdr],
    payloads: Payloads<'_>,
    pending: &[u32],
    retry: &mut Vec<u32>,
    stats: &mut SendStats,
) {
    let n = pending.len();
    let iovec = |p: &[u8]| libc::iovec {
        iov_base: p.as_ptr().cast_mut().cast(),
        iov_len: p.len(),
    };
    let shared = matches!(payloads, Payloads::Same(_));
    if let Payloads::Same(p) = payloads {
        iovs[0] = iovec(p);
    } else {
        for (iov, &i) in iovs.iter_mut().zip(pending) {
            *iov = iovec(payloads.get(i));
        }
    }
    // Raw pointers are taken after the last write through `iovs`/`addrs` in this call.
    let iov_base = iovs.as_mut_ptr();
    let addr_base = addrs.as_ptr();
    for (k, (msg, &i)) in msgs.iter_mut().zip(pending).enumerate() {
        let h = &mut msg.msg_hdr;
        h.msg_name = addr_base.wrapping_add(i as usize).cast_mut().cast();
        h.msg_namelen = SOCKADDR_IN_LEN;
        h.msg_iov = if shared {
            iov_base
        } else {
            iov_base.wrapping_add(k)
        };
        h.msg_iovlen = 1;
        msg.msg_len = 0;
    }
    let mut p = 0;
    let mut interrupted = 0;
    while p < n {
        let vlen = (n - p) as libc::c_uint;
        // SAFETY: `msgs[p..n]` were initialised above; they point only into `addrs` and `iovs`
        // (owned by the sender, not touched during the call) and the payloads (borrowed by our
        // caller). sendmmsg reads them and writes `msg_len` during the call only. `p < n <=
        // msgs.len()` keeps the pointer in bounds.
        let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr().add(p), vlen, libc::MSG_DONTWAIT) };
        stats.submissions += 1;
        if r > 0 {
            let sent = (r as usize).min(n - p);
            for k in p..p + sent {
                account(
                    msgs[k].msg_len as i32,
                    payloads.get(pending[k]).len(),
                    pending[k],
                    retry,
                    stats,
                );
            }
            p += sent;
            continue;
        }
        // r == 0 cannot happen for vlen > 0; treat it like EAGAIN rather than loop.
        let err = if r == 0 { libc::EAGAIN } else { errno() };
        match err {
            libc::EAGAIN => {
                stats.eagain += 1;
                retry.extend_from_slice(&pending[p..]);
                return;
            }
            libc::EINTR => {
                interrupted += 1;
                if interrupted > MAX_EINTR {
                    retry.extend_from_slice(&pending[p..]);
                    return;
                }
            }
            _ => {
                stats.drop_one(-err);
                p += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sys::udp_socket;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    const BOTH: [SendPath; 2] = [SendPath::Uring, SendPath::Sendmmsg];

    fn localhost() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)
    }

    fn addr_of(s: &UdpSocket) -> SocketAddrV4 {
        match s.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!(),
        }
    }

    fn receivers(n: usize) -> Vec<UdpSocket> {
        (0..n)
            .map(|_| udp_socket(localhost(), false, Some(1 << 20), None).unwrap())
            .collect()
    }

    /// Receives exactly one datagram from `s`, waiting at most 5 s.
    fn recv_one(s: &UdpSocket) -> Vec<u8> {
        let mut fds = [PollFd::new(s.as_raw_fd(), sys::POLLIN)];
        let ready = sys::poll(&mut fds, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ready, 1, "datagram did not arrive");
        let mut buf = vec![0u8; 65536];
        let (n, _) = s.recv_from(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Reads until `expected` datagrams arrived over all sockets (or 5 s passed); returns the
    /// count received.
    fn drain_count(socks: &[UdpSocket], expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        while got < expected && Instant::now() < deadline {
            let mut fds: Vec<PollFd> = socks
                .iter()
                .map(|s| PollFd::new(s.as_raw_fd(), sys::POLLIN))
                .collect();
            sys::poll(&mut fds, Some(Duration::from_millis(100))).unwrap();
            for s in socks {
                while s.recv_from(&mut buf).is_ok() {
                    got += 1;
                }
            }
        }
        got
    }

    fn assert_nothing_queued(socks: &[UdpSocket]) {
        let mut buf = [0u8; 16];
        for s in socks {
            assert!(s.recv_from(&mut buf).is_err(), "unexpected extra datagram");
        }
    }

    /// Whether this kernel (or container) lets a process build the ring the io_uring send path
    /// needs (`SINGLE_ISSUER | COOP_TASKRUN`) and lists `IORING_OP_SEND`; probed here with the
    /// io-uring crate, apart from `detect`.
    fn io_uring_sends_here() -> bool {
        use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
        let Ok(ring) = IoUring::<squeue::Entry, cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(8)
        else {
            return false;
        };
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::Send::CODE)
    }

    /// Holds on any kernel: io_uring where a ring can be built here (as on the project machine,
    /// see udp-limits.md section 3), else the sendmmsg fallback, and whichever was picked sends.
    #[test]
    fn detect_picks_io_uring_exactly_when_it_works_here_and_the_pick_sends() {
        let path = SendPath::detect();
        let expected = if io_uring_sends_here() {
            SendPath::Uring
        } else {
            SendPath::Sendmmsg
        };
        assert_eq!(path, expected);
        let rx = receivers(1);
        let tx = udp_socket(localhost(), false, None, None).unwrap();
        let mut sender = BatchSender::new(tx.as_raw_fd(), path, 8).unwrap();
        let mut stats = SendStats::default();
        sender.send_to_all(b"detected", &[addr_of(&rx[0])], &mut stats);
        assert_eq!(stats.datagrams, 1, "{path}: {stats:?}");
        assert_eq!(recv_one(&rx[0]), b"detected", "{path}");
    }

    #[test]
    fn path_names_parse_back() {
        for p in BOTH {
            assert_eq!(p.name().parse::<SendPath>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!("uring".parse::<SendPath>(), Ok(SendPath::Uring));
        assert_eq!("SendMMsg".parse::<SendPath>(), Ok(SendPath::Sendmmsg));
        assert!("epoll".parse::<SendPath>().unwrap_err().contains("epoll"));
    }

    #[test]
    fn stats_add_merges_every_field() {
        let one = SendStats {
            submissions: 1,
            datagrams: 2,
            bytes: 3,
            eagain: 4,
            enobufs: 5,
            partial: 6,
            errors: 7,
            dropped: 8,
        };
        let mut sum = one;
        sum.add(&one);
        assert_eq!(
            sum,
            SendStats {
                submissions: 2,
                datagrams: 4,
                bytes: 6,
                eagain: 8,
                enobufs: 10,
                partial: 12,
                errors: 14,
                dropped: 16,
            }
        );
    }

    #[test]
    fn rejects_negative_fd() {
        assert!(BatchSender::new(-1, SendPath::Sendmmsg, 64).is_err());
    }

    #[test]
    fn send_to_all_reaches_300_receivers_byte_identical() {
        for path in BOTH {
            let rx = receivers(300);
            let dests: Vec<SocketAddrV4> = rx.iter().map(addr_of).collect();
            let tx = udp_socket(localhost(), false, None, Some(4 << 20)).unwrap();
            let mut sender = BatchSender::new(tx.as_raw_fd(), path, 64).unwrap();
            assert_eq!(sender.path(), path);
            let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
            let mut stats = SendStats::default();
            sender.send_to_all(&payload, &dests, &mut stats);
            assert_eq!(stats.datagrams, 300, "{path}: {stats:?}");
            assert_eq!(stats.bytes, 300 * 1024);
            assert_eq!(stats.dropped + stats.errors + stats.partial, 0, "{stats:?}");
            // 300 destinations in batches of 64: 5 submissions (more only after EAGAIN).
            assert_eq!(stats.submissions, 5 + stats.eagain, "{stats:?}");
            let from = addr_of(&tx);
            for s in &rx {
                let mut buf = vec![0u8; 2048];
                let mut fds = [PollFd::new(s.as_raw_fd(), sys::POLLIN)];
                assert_eq!(
                    sys::poll(&mut fds, Some(Duration::from_secs(5))).unwrap(),
                    1
                );
                let (n, src) = s.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], &payload[..], "{path}");
                assert_eq!(src, std::net::SocketAddr::V4(from));
            }
            assert_nothing_queued(&rx);
        }
    }

    #[test]
    fn send_each_delivers_distinct_payloads() {
        for path in BOTH {
            let rx = receivers(50);
            let payloads: Vec<Vec<u8>> = (0..50u8)
                .map(|i| vec![i; 1 + usize::from(i) * 13])
                .collect();
            let items: Vec<(SocketAddrV4, &[u8])> = rx
                .iter()
                .zip(&payloads)
                .map(|(s, p)| (addr_of(s), p.as_slice()))
                .collect();
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            let mut sender = BatchSender::new(tx.as_raw_fd(), path, 16).unwrap();
            let mut stats = SendStats::default();
            sender.send_each(&items, &mut stats);
            let total: usize = payloads.iter().map(Vec::len).sum();
            assert_eq!(stats.datagrams, 50, "{path}: {stats:?}");
            assert_eq!(stats.bytes, total as u64);
            assert_eq!(stats.dropped, 0);
            for (s, p) in rx.iter().zip(&payloads) {
                assert_eq!(&recv_one(s), p, "{path}");
            }
            assert_nothing_queued(&rx);
        }
    }

    /// Each datagram leaves from the socket named with it (receivers see that socket's address),
    /// in one batch mixing sockets, and runs of one socket, on both paths.
    #[test]
    fn send_from_each_sends_from_each_named_socket() {
        for path in BOTH {
            let rx = receivers(40);
            let tx: Vec<UdpSocket> = (0..4)
                .map(|_| udp_socket(localhost(), false, None, None).unwrap())
                .collect();
            let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
            // Items 0..20 alternate sockets; 20..40 come in runs of 5 from one socket.
            let from = |k: usize| if k < 20 { k % 4 } else { (k / 5) % 4 };
            let items: Vec<(RawFd, SocketAddrV4, &[u8])> = (0..40)
                .map(|k| {
                    (
                        tx[from(k)].as_raw_fd(),
                        addr_of(&rx[k]),
                        payloads[k].as_slice(),
                    )
                })
                .collect();
            let mut sender = BatchSender::without_socket(path, 16).unwrap();
            let mut stats = SendStats::default();
            sender.send_from_each(&items, &mut stats);
            assert_eq!(stats.datagrams, 40, "{path}: {stats:?}");
            assert_eq!(stats.dropped, 0, "{path}: {stats:?}");
            let mut buf = [0u8; 256];
            for (k, s) in rx.iter().enumerate() {
                let mut fds = [PollFd::new(s.as_raw_fd(), sys::POLLIN)];
                assert_eq!(
                    sys::poll(&mut fds, Some(Duration::from_secs(5))).unwrap(),
                    1
                );
                let (n, src) = s.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], payloads[k].as_slice(), "{path}");
                assert_eq!(src, tx[from(k)].local_addr().unwrap(), "{path}: item {k}");
            }
            assert_nothing_queued(&rx);
            // Without a socket of its own, the single-socket calls count errors, nothing else.
            let mut stats = SendStats::default();
            sender.send_to_all(b"x", &[addr_of(&rx[0])], &mut stats);
            assert_eq!(
                (stats.datagrams, stats.dropped),
                (0, 1),
                "{path}: {stats:?}"
            );
        }
    }

    #[test]
    fn empty_inputs_and_empty_payload() {
        for path in BOTH {
            let rx = receivers(3);
            let dests: Vec<SocketAddrV4> = rx.iter().map(addr_of).collect();
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            let mut sender = BatchSender::new(tx.as_raw_fd(), path, 8).unwrap();
            let mut stats = SendStats::default();
            sender.send_to_all(b"x", &[], &mut stats);
            sender.send_each(&[], &mut stats);
            assert_eq!(stats, SendStats::default());
            sender.send_to_all(b"", &dests, &mut stats);
            assert_eq!(stats.datagrams, 3, "{path}: {stats:?}");
            assert_eq!(stats.bytes, 0);
            for s in &rx {
                assert!(recv_one(s).is_empty());
            }
        }
    }

    /// A destination the kernel refuses (port 0: EINVAL) in the middle of a batch. sendmmsg
    /// returns a short count there; the sender must resume after it, not drop the rest
    /// (libuv#3129).
    #[test]
    fn error_mid_batch_is_counted_and_the_rest_still_sent() {
        for path in BOTH {
            let rx = receivers(10);
            let mut dests: Vec<SocketAddrV4> = rx.iter().map(addr_of).collect();
            dests.insert(4, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            let mut sender = BatchSender::new(tx.as_raw_fd(), path, 64).unwrap();
            let mut stats = SendStats::default();
            sender.send_to_all(b"chunk", &dests, &mut stats);
            assert_eq!(stats.datagrams, 10, "{path}: {stats:?}");
            assert_eq!(stats.errors, 1, "{path}: {stats:?}");
            assert_eq!(stats.dropped, 1, "{path}: {stats:?}");
            let expected_submissions = match path {
                SendPath::Uring => 1,
                // 4 sent, then -1 EINVAL for the bad one, then the last 6.
                SendPath::Sendmmsg => 3,
            };
            assert_eq!(stats.submissions, expected_submissions, "{path}: {stats:?}");
            for s in &rx {
                assert_eq!(recv_one(s), b"chunk");
            }
        }
    }

    /// Oversized datagrams are refused (EMSGSIZE) and counted, not silently lost.
    #[test]
    fn oversize_payload_is_counted_as_error() {
        for path in BOTH {
            let rx = receivers(3);
            let dests: Vec<SocketAddrV4> = rx.iter().map(addr_of).collect();
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            let mut sender = BatchSender::new(tx.as_raw_fd(), path, 8).unwrap();
            let mut stats = SendStats::default();
            sender.send_to_all(&vec![0u8; 70_000], &dests, &mut stats);
            assert_eq!(stats.datagrams, 0, "{path}: {stats:?}");
            assert_eq!(stats.errors, 3);
            assert_eq!(stats.dropped, 3);
        }
    }

    /// A burst far beyond a minimal send buffer: whatever the kernel does (on loopback it rarely
    /// says EAGAIN, because delivery frees the send buffer at once), every datagram is either
    /// accepted or counted as dropped, and every accepted one arrives.
    #[test]
    fn burst_through_tiny_sndbuf_loses_nothing_silently() {
        for path in BOTH {
            let rx = receivers(200);
            let dests: Vec<SocketAddrV4> = rx.iter().map(addr_of).collect();
            let tx = udp_socket(localhost(), false, None, Some(1)).unwrap();
            let mut sender = BatchSender::new(tx.as_raw_fd(), path, 256).unwrap();
            let mut stats = SendStats::default();
            let payload = vec![0xabu8; 1400];
            let rounds = 20u64;
            for _ in 0..rounds {
                sender.send_to_all(&payload, &dests, &mut stats);
            }
            let requested = rounds * dests.len() as u64;
            assert_eq!(
                stats.datagrams + stats.dropped,
                requested,
                "{path}: {stats:?}"
            );
            assert_eq!(stats.errors, 0, "{path}: {stats:?}");
            assert_eq!(drain_count(&rx, stats.datagrams), stats.datagrams, "{path}");
        }
    }

    /// Real EAGAINs. On loopback a datagram frees its send-buffer charge as soon as it is
    /// delivered, so one thread never sees EAGAIN; three threads bursting 60 KB datagrams through
    /// one socket with a minimal send buffer do, when one allocates while another's datagram is in
    /// flight. Every EAGAIN must be retried after POLLOUT (or counted as dropped) and every
    /// accepted datagram arrive. Bounded by time: it needs the threads to overlap on the CPUs.
    #[test]
    fn concurrent_bursts_hit_eagain_and_retry() {
        const THREADS: usize = 3;
        const ROUNDS: u64 = 50;
        for path in BOTH {
            let rx: Vec<UdpSocket> = (0..4)
                .map(|_| udp_socket(localhost(), false, Some(64 << 20), None).unwrap())
                .collect();
            let dests: Vec<SocketAddrV4> = rx.iter().map(addr_of).collect();
            let tx = udp_socket(localhost(), false, None, Some(1)).unwrap();
            let fd = tx.as_raw_fd();
            let mut total = SendStats::default();
            let deadline = Instant::now() + Duration::from_secs(20);
            while total.eagain == 0 && Instant::now() < deadline {
                let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
                let threads: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let dests = dests.clone();
                        let barrier = barrier.clone();
                        thread::spawn(move || {
                            let mut sender = BatchSender::new(fd, path, 64).unwrap();
                            let mut stats = SendStats::default();
                            let payload = vec![0x5au8; 60_000];
                            barrier.wait();
                            for _ in 0..ROUNDS {
                                sender.send_to_all(&payload, &dests, &mut stats);
                            }
                            stats
                        })
                    })
                    .collect();
                let mut round = SendStats::default();
                for t in threads {
                    round.add(&t.join().unwrap());
                }
                let requested = THREADS as u64 * ROUNDS * dests.len() as u64;
                assert_eq!(
                    round.datagrams + round.dropped,
                    requested,
                    "{path}: {round:?}"
                );
                assert_eq!(round.errors + round.enobufs, 0, "{path}: {round:?}");
                assert_eq!(drain_count(&rx, round.datagrams), round.datagrams, "{path}");
                total.add(&round);
            }
            assert!(total.eagain > 0, "{path}: never hit EAGAIN: {total:?}");
        }
    }

    #[test]
    fn uring_sender_moved_to_another_thread_keeps_working() {
        let rx = receivers(4);
        let dests: Vec<SocketAddrV4> = rx.iter().map(addr_of).collect();
        let tx = udp_socket(localhost(), false, None, None).unwrap();
        let mut sender = BatchSender::new(tx.as_raw_fd(), SendPath::Uring, 8).unwrap();
        let mut stats = SendStats::default();
        sender.send_to_all(b"one", &dests, &mut stats);
        let (sender, stats) = thread::spawn({
            let dests = dests.clone();
            move || {
                let mut sender = sender;
                let mut stats = stats;
                sender.send_to_all(b"two", &dests, &mut stats);
                (sender, stats)
            }
        })
        .join()
        .unwrap();
        drop(sender);
        assert_eq!(stats.datagrams, 8, "{stats:?}");
        for s in &rx {
            assert_eq!(recv_one(s), b"one");
            assert_eq!(recv_one(s), b"two");
        }
    }

    /// The retry policy, driven by a scripted kernel: EAGAIN twice, then success.
    #[test]
    fn drive_retries_eagain_after_waiting() {
        let mut pending: Vec<u32> = (0..10).collect();
        let mut retry = Vec::new();
        let mut stats = SendStats::default();
        let mut budget = EAGAIN_WAIT_BUDGET;
        let mut rounds = 0;
        let mut waits = 0;
        drive(
            &mut pending,
            &mut retry,
            &mut stats,
            &mut budget,
            |pend, retry, stats| {
                rounds += 1;
                for (k, &i) in pend.iter().enumerate() {
                    // Round 1: the last 4 get EAGAIN; round 2: the last one again.
                    let eagain = (rounds == 1 && k >= 6) || (rounds == 2 && k == pend.len() - 1);
                    let res = if eagain { -libc::EAGAIN } else { 100 };
                    account(res, 100, i, retry, stats);
                }
            },
            |_| {
                waits += 1;
                Duration::from_millis(1)
            },
        );
        assert_eq!(rounds, 3);
        assert_eq!(waits, 2);
        assert_eq!(stats.datagrams, 10);
        assert_eq!(stats.eagain, 5);
        assert_eq!(stats.dropped, 0);
        assert_eq!(budget, EAGAIN_WAIT_BUDGET - Duration::from_millis(2));
    }

    /// EAGAIN forever: one wait uses the whole budget, one more try, then everything left is
    /// dropped, and counted.
    #[test]
    fn drive_drops_when_budget_is_spent() {
        let mut pending: Vec<u32> = (0..7).collect();
        let mut retry = Vec::new();
        let mut stats = SendStats::default();
        let mut budget = EAGAIN_WAIT_BUDGET;
        let mut rounds = 0;
        drive(
            &mut pending,
            &mut retry,
            &mut stats,
            &mut budget,
            |pend, retry, stats| {
                rounds += 1;
                for &i in pend {
                    account(-libc::EAGAIN, 10, i, retry, stats);
                }
            },
            |max| max,
        );
        assert_eq!(rounds, 2);
        assert_eq!(stats.eagain, 14);
        assert_eq!(stats.dropped, 7);
        assert_eq!(stats.datagrams, 0);
        assert!(budget.is_zero());
        // The next call starts with an empty budget: one try, then drop.
        let mut pending: Vec<u32> = (0..3).collect();
        drive(
            &mut pending,
            &mut retry,
            &mut stats,
            &mut budget,
            |pend, retry, stats| {
                for &i in pend {
                    account(-libc::EAGAIN, 10, i, retry, stats);
                }
            },
            |_| panic!("no budget left to wait"),
        );
        assert_eq!(stats.dropped, 10);
    }

    /// `poll` keeps saying "writable" but sends keep failing: bounded by the idle-round limit even
    /// though no time passes.
    #[test]
    fn drive_is_bounded_without_progress() {
        let mut pending: Vec<u32> = (0..3).collect();
        let mut retry = Vec::new();
        let mut stats = SendStats::default();
        let mut budget = EAGAIN_WAIT_BUDGET;
        let mut rounds = 0;
        drive(
            &mut pending,
            &mut retry,
            &mut stats,
            &mut budget,
            |pend, retry, stats| {
                rounds += 1;
                for &i in pend {
                    account(-libc::EAGAIN, 10, i, retry, stats);
                }
            },
            |_| Duration::ZERO,
        );
        assert_eq!(rounds, MAX_IDLE_ROUNDS + 1);
        assert_eq!(stats.dropped, 3);
    }

    /// ENOBUFS and other errors are dropped at once, never retried.
    #[test]
    fn drive_does_not_retry_enobufs_or_errors() {
        let mut pending: Vec<u32> = (0..4).collect();
        let mut retry = Vec::new();
        let mut stats = SendStats::default();
        let mut budget = EAGAIN_WAIT_BUDGET;
        drive(
            &mut pending,
            &mut retry,
            &mut stats,
            &mut budget,
            |pend, retry, stats| {
                for &i in pend {
                    let res = [-libc::ENOBUFS, -libc::ECONNREFUSED, 5, 3][i as usize];
                    account(res, 5, i, retry, stats);
                }
            },
            |_| panic!("nothing to wait for"),
        );
        assert_eq!(
            stats,
            SendStats {
                datagrams: 2,
                bytes: 8,
                enobufs: 1,
                partial: 1,
                errors: 1,
                dropped: 2,
                ..SendStats::default()
            }
        );
    }
}
