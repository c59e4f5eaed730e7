//! io_uring receive backend: one multishot `RecvMsg` per socket, all drawing from one provided
//! buffer ring, on a `SINGLE_ISSUER | DEFER_TASKRUN` ring (udp-limits.md sections 6 and 7).
//!
//! Lifetimes of the memory lent to the kernel:
//! - the buffer ring and the buffers ([`BufRing`], two anonymous mappings) and the `msghdr`
//!   template are owned here and freed only after the ring is closed and every request on it has
//!   completed (see `Drop`); if that cannot be confirmed they are leaked instead;
//! - a buffer belongs to the kernel from the moment it is published in the ring until a CQE hands
//!   it back; it is lent to the user callback as a [`Datagram`] and published again right after.
//!
//! The waker: a single-shot `PollAdd` on the waker's eventfd, linked to a 100 µs `Timeout`. A
//! completion alone cannot end a wait for `want` completions, but an expiring timeout request ends
//! every wait (the kernel's `cq_timeouts` check), so the wake ends the poll ~100 µs later.

use std::io;
use std::mem;
use std::os::fd::RawFd;
use std::ptr;
use std::slice;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::pktinfo::{PKTINFO_SPACE, pktinfo_dest};
use super::recv::{Datagram, PollOutcome, RecvStats};
use super::slots::SlotTable;
use super::sys::{SOCKADDR_IN_LEN, Waker, sockaddr_from_bytes};

/// Buffer group id of our one provided-buffer ring.
const BGID: u16 = 0;
/// `struct io_uring_recvmsg_out` precedes the source address in each buffer.
const RECVMSG_OUT_LEN: u32 = 16;
/// Submission queue size; `add_socket` of many sockets submits in chunks of this.
const SQ_ENTRIES: u32 = 4096;
/// Consecutive failed re-arms of a socket's receive (errors other than ENOBUFS, no datagram in
/// between) before it is left disarmed. Keeps a broken socket from looping.
const MAX_FAILS: u8 = 4;
/// Delay of the timeout linked to the waker's poll (see the module docs).
const WAKE_TIMER: Duration = Duration::from_micros(100);
/// How long `Drop` waits for the cancelled requests to complete before leaking the buffers.
const DROP_DRAIN: Duration = Duration::from_secs(1);

// user_data: kind in the top 2 bits, then a 30-bit generation, then a 32-bit slot index.
const KIND_RECV: u64 = 0;
const KIND_WAKE_POLL: u64 = 1;
const KIND_WAKE_TIMER: u64 = 2;
const KIND_CANCEL: u64 = 3;
const GEN_MASK: u32 = (1 << 30) - 1;

fn user_data(kind: u64, generation: u32, idx: u32) -> u64 {
    (kind << 62) | (u64::from(generation & GEN_MASK) << 32) | u64::from(idx)
}

fn kind_of(ud: u64) -> u64 {
    ud >> 62
}

fn generation_of(ud: u64) -> u32 {
    (ud >> 32) as u32 & GEN_MASK
}

/// An anonymous private mapping, unmapped on drop.
struct Mmap {
    ptr: *mut u8,
    len: usize,
}

impl Mmap {
    fn new(len: usize) -> io::Result<Mmap> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap { ptr: p.cast(), len })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping we created and still own. Owners only drop a
        // `Mmap` once the kernel can no longer use it (see `UringRecv`'s Drop).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `struct io_uring_buf`, written field by field: the `resv` field of entry 0 is the ring's tail,
/// which the kernel reads concurrently, so we never write (or reference) a whole entry.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(mem::size_of::<RawBuf>() == mem::size_of::<types::BufRingEntry>());

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`) and its buffers.
struct BufRing {
    /// `count` entries of 16 bytes, page aligned (mmap).
    ring: Mmap,
    /// `count` buffers of `stride` bytes.
    data: Mmap,
    count: u16,
    stride: usize,
    /// Bytes the kernel may write per buffer: header + address + the payload limit.
    buf_len: u32,
    /// Our tail: entries before it are published (or about to be, see `dirty`).
    tail: u16,
    dirty: bool,
}

impl BufRing {
    /// `count` (a power of two) buffers, each taking up to `payload` bytes of datagram after the
    /// recvmsg header, the source address and `control` bytes of control messages.
    fn new(count: u16, payload: u32, control: u32) -> io::Result<BufRing> {
        let buf_len = RECVMSG_OUT_LEN + SOCKADDR_IN_LEN + control + payload;
        let stride = (buf_len as usize).next_multiple_of(64);
        let mut ring = BufRing {
            ring: Mmap::new(usize::from(count) * mem::size_of::<RawBuf>())?,
            data: Mmap::new(usize::from(count) * stride)?,
            count,
            stride,
            buf_len,
            tail: 0,
            dirty: false,
        };
        for bid in 0..count {
            ring.recycle(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Gives buffer `bid` back to the kernel (visible after [`publish`](Self::publish)).
    fn recycle(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let slot = usize::from(self.tail & (self.count - 1));
        let entry = self.ring.ptr.cast::<RawBuf>().wrapping_add(slot);
        let addr = self.data.ptr.wrapping_add(usize::from(bid) * self.stride) as u64;
        // SAFETY: `slot < count`, so `entry` lies inside the ring mapping, aligned (page-aligned
        // base, 16-byte entries). The kernel reads only entries between its head and our
        // published tail; `slot` is at the tail, outside that range, since at most `count`
        // buffers exist and `bid` is one the kernel already returned (or, at start, never had).
        // The writes go field by field and skip `resv`, the tail word of entry 0.
        unsafe {
            (*entry).addr = addr;
            (*entry).len = self.buf_len;
            (*entry).bid = bid;
        }
        self.tail = self.tail.wrapping_add(1);
        self.dirty = true;
    }

    /// Publishes recycled buffers to the kernel.
    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        // SAFETY: `ring.ptr` is the page-aligned base of the ring mapping, which holds at least
        // one entry; `tail` only computes the address of entry 0's `resv` field.
        let tail = unsafe { types::BufRingEntry::tail(self.ring.ptr.cast()) };
        // SAFETY: that address is a 2-aligned u16 inside our mapping. We only access it
        // atomically, and the kernel reads it with acquire semantics: a Release store orders our
        // entry writes before the new tail.
        unsafe { AtomicU16::from_ptr(tail.cast_mut()) }.store(self.tail, Ordering::Release);
        self.dirty = false;
    }

    /// The first `len` bytes of buffer `bid`.
    ///
    /// # Safety
    /// The kernel must have handed `bid` back in a CQE and the buffer must not have been
    /// recycled since: then nobody writes it while the slice lives.
    unsafe fn get(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.count {
            return &[];
        }
        let start = self.data.ptr.wrapping_add(usize::from(bid) * self.stride);
        // SAFETY: `bid < count`, and `len` is clamped to `buf_len <= stride`, so the range is
        // inside the data mapping; the caller guarantees no concurrent writer.
        unsafe { slice::from_raw_parts(start, len.min(self.buf_len as usize)) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// Unused (on the free list).
    Free,
    /// Its receive must be (re-)armed at the next opportunity (index is in `idle`).
    Idle,
    /// Its multishot receive is submitted (or queued in the SQ).
    Armed,
    /// Removed; waiting for the cancelled receive's final CQE before the slot is reused.
    Cancelling,
    /// Given up after [`MAX_FAILS`] errors; not armed.
    Dead,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    fd: RawFd,
    token: u64,
    generation: u32,
    state: SlotState,
    fails: u8,
}

/// The io_uring receiver.
pub(crate) struct UringRecv {
    // Declared first: dropped (closed) before the memory the kernel used.
    ring: IoUring,
    /// The thread that enabled the ring; the only one allowed to enter it.
    issuer: Option<ThreadId>,
    /// Memory lent to the kernel. `None` only inside `Drop`, when it is leaked.
    bufs: Option<BufRing>,
    msghdr: Option<Box<libc::msghdr>>,
    /// Delay of the waker's linked timeout (the kernel copies it at submission).
    wake_ts: Box<types::Timespec>,
    slots: SlotTable<Slot>,
    /// Slots to arm (entries may be stale; `arm_pending` checks the state).
    idle: Vec<u32>,
    waker: Option<Waker>,
    wake_generation: u32,
    /// The waker's poll chain is submitted and not completed.
    wake_armed: bool,
    /// The waker's poll chain must be (re-)armed.
    wake_rearm: bool,
    /// Requests pushed whose final CQE has not been reaped yet.
    inflight: usize,
    /// Largest `min_complete` that can be satisfied.
    want_cap: u32,
    stats: RecvStats,
}

// SAFETY: the raw pointers (mappings, the msghdr template's null fields) are owned by this value
// and used only through `&mut self`; the ring is bound to one issuing thread, which is checked
// on every entry (`claim`), so moving the receiver to another thread shares nothing.
unsafe impl Send for UringRecv {}

impl UringRecv {
    /// `dest`: reserve room for an `IP_PKTINFO` message (the destination address) per datagram.
    pub(crate) fn new(buf_count: u16, buf_size: u32, dest: bool) -> io::Result<UringRecv> {
        let control = if dest { PKTINFO_SPACE as u32 } else { 0 };
        let cq_entries = (u32::from(buf_count) * 2).clamp(2 * SQ_ENTRIES, 65536);
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .setup_cqsize(cq_entries)
            .setup_clamp()
            .build(SQ_ENTRIES)?;
        let bufs = BufRing::new(buf_count, buf_size, control)?;
        // SAFETY: the ring mapping is page aligned, holds `buf_count` entries, and stays mapped
        // until the ring is closed (the ring field is dropped before `bufs`, and `bufs` is leaked
        // if requests may still be running).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring.ptr as u64,
                buf_count,
                BGID,
                0,
            )?;
        }
        // SAFETY: msghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
        let mut msghdr: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
        // Only the lengths matter to multishot recvmsg: reserve room for an IPv4 source address
        // (and the control messages, if asked for).
        msghdr.msg_namelen = SOCKADDR_IN_LEN;
        msghdr.msg_controllen = control as _;
        let want_cap = (ring.params().cq_entries() / 2)
            .min(u32::from(buf_count) / 2)
            .max(1);
        Ok(UringRecv {
            ring,
            issuer: None,
            bufs: Some(bufs),
            msghdr: Some(msghdr),
            wake_ts: Box::new(
                types::Timespec::new()
                    .sec(WAKE_TIMER.as_secs())
                    .nsec(WAKE_TIMER.subsec_nanos()),
            ),
            slots: SlotTable::new(),
            idle: Vec::new(),
            waker: None,
            wake_generation: 0,
            wake_armed: false,
            wake_rearm: false,
            inflight: 0,
            want_cap,
            stats: RecvStats::default(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn stats(&self) -> RecvStats {
        self.stats
    }

    /// Binds the ring to the calling thread on first use; fails on any other thread later.
    fn claim(&mut self) -> io::Result<()> {
        let me = thread::current().id();
        match self.issuer {
            Some(t) if t == me => Ok(()),
            Some(_) => Err(io::Error::other(
                "MultiRecv (io_uring) used from a thread other than the one that first polled it",
            )),
            None => {
                self.ring.submitter().register_enable_rings()?;
                self.issuer = Some(me);
                Ok(())
            }
        }
    }

    /// Pushes `entries` to the SQ together (so a link chain is not split by a submit), submitting
    /// first if they do not fit.
    ///
    /// # Safety
    /// Every pointer in the entries must stay valid until the entry's final CQE is reaped, and
    /// the ring must be claimed by this thread.
    unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < entries.len() {
            self.ring.submit()?;
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.ring.submission().push_multiple(entries) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.inflight += entries.len();
        Ok(())
    }

    pub(crate) fn add_socket(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let idx = self.slots.vacant(token, || Slot {
            fd: -1,
            token: 0,
            generation: 0,
            state: SlotState::Free,
            fails: 0,
        })?;
        let slot = &mut self.slots[idx];
        *slot = Slot {
            fd,
            token,
            generation: slot.generation.wrapping_add(1) & GEN_MASK,
            state: SlotState::Idle,
            fails: 0,
        };
        self.idle.push(idx);
        self.slots.insert(token, idx);
        Ok(())
    }

    pub(crate) fn remove_socket(&mut self, token: u64) -> io::Result<()> {
        let idx = self.slots.index_of(token)?;
        let slot = self.slots[idx];
        if slot.state == SlotState::Armed {
            self.claim()?;
            let target = user_data(KIND_RECV, slot.generation, idx);
            let cancel = opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data(KIND_CANCEL, 0, 0));
            // SAFETY: a cancel request references no memory; the ring is claimed above.
            unsafe { self.push(&[cancel]) }?;
            self.slots[idx].state = SlotState::Cancelling;
            self.slots.remove_token(token)?;
            // Submit now: from here on the socket's data stays in the socket. (If this fails,
            // the cancel goes with the next submission.)
            self.ring.submit()?;
        } else {
            // Idle (never submitted; its stale `idle` entry is skipped) or Dead.
            self.slots[idx].state = SlotState::Free;
            self.slots.release(idx);
            self.slots.remove_token(token)?;
        }
        Ok(())
    }

    pub(crate) fn set_waker(&mut self, waker: &Waker) -> io::Result<()> {
        if self.wake_armed {
            self.claim()?;
            let target = user_data(KIND_WAKE_POLL, self.wake_generation, 0);
            let cancel = opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data(KIND_CANCEL, 0, 0));
            // SAFETY: a cancel request references no memory; the ring is claimed above. The
            // cancelled poll holds its own reference to the old eventfd.
            unsafe { self.push(&[cancel]) }?;
            self.wake_armed = false;
        }
        self.waker = Some(waker.clone());
        self.wake_rearm = true;
        Ok(())
    }

    /// Pushes the receives of idle slots and the waker chain. Returns whether anything was pushed.
    fn arm_pending(&mut self) -> io::Result<bool> {
        let mut pushed = false;
        let msghdr: *const libc::msghdr = match &self.msghdr {
            Some(m) => &**m,
            None => return Ok(false),
        };
        while let Some(idx) = self.idle.pop() {
            let slot = self.slots[idx];
            if slot.state != SlotState::Idle {
                continue;
            }
            let entry = opcode::RecvMsgMulti::new(types::Fd(slot.fd), msghdr, BGID)
                .build()
                .user_data(user_data(KIND_RECV, slot.generation, idx));
            // SAFETY: the entry points at the boxed msghdr template and draws buffers from the
            // registered buffer ring; both live until every request has completed (or are
            // leaked), see `Drop`. Callers claim the ring first.
            if let Err(e) = unsafe { self.push(&[entry]) } {
                self.idle.push(idx);
                return Err(e);
            }
            self.slots[idx].state = SlotState::Armed;
            pushed = true;
        }
        if self.wake_rearm {
            if let Some(waker) = &self.waker {
                self.wake_generation = self.wake_generation.wrapping_add(1) & GEN_MASK;
                let poll = opcode::PollAdd::new(types::Fd(waker.raw_fd()), libc::POLLIN as u32)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(user_data(KIND_WAKE_POLL, self.wake_generation, 0));
                let timer = opcode::Timeout::new(&*self.wake_ts)
                    .build()
                    .user_data(user_data(KIND_WAKE_TIMER, self.wake_generation, 0));
                // SAFETY: the poll references only the eventfd (the request holds its own file
                // reference); the timeout points at `wake_ts`, boxed for the receiver's life
                // (and copied by the kernel at submission anyway). Callers claim the ring.
                unsafe { self.push(&[poll, timer]) }?;
                self.wake_armed = true;
                pushed = true;
            }
            self.wake_rearm = false;
        }
        Ok(pushed)
    }

    /// Handles every CQE in the completion queue.
    fn reap(&mut self, f: &mut dyn FnMut(u64, Datagram<'_>), out: &mut PollOutcome) {
        let UringRecv {
            ring,
            bufs,
            msghdr,
            slots,
            idle,
            waker,
            wake_generation,
            wake_armed,
            wake_rearm,
            inflight,
            stats,
            ..
        } = self;
        let (Some(bufs), Some(msghdr)) = (bufs.as_mut(), msghdr.as_deref()) else {
            return;
        };
        for cqe in ring.completion() {
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            let more = cqueue::more(flags);
            if !more {
                *inflight = inflight.saturating_sub(1);
            }
            match kind_of(ud) {
                KIND_RECV => {
                    let idx = ud as u32 as usize;
                    let Some(slot) = slots
                        .get_mut(idx)
                        .filter(|s| s.generation == generation_of(ud))
                    else {
                        // Cannot happen (slots are never shrunk); still give the buffer back.
                        if let Some(bid) = cqueue::buffer_select(flags) {
                            bufs.recycle(bid);
                        }
                        continue;
                    };
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        if res >= 0 && slot.state == SlotState::Armed {
                            slot.fails = 0;
                            // SAFETY: this CQE hands `bid` back to us; it is recycled only
                            // below, after the callback returned.
                            let buf = unsafe { bufs.get(bid, res as usize) };
                            deliver(buf, msghdr, slot.token, f, out, stats);
                        }
                        bufs.recycle(bid);
                    }
                    if !more {
                        match slot.state {
                            SlotState::Cancelling => {
                                slot.state = SlotState::Free;
                                slots.release(idx as u32);
                            }
                            SlotState::Armed => {
                                if res == -libc::ENOBUFS {
                                    stats.enobufs += 1;
                                } else if res < 0 {
                                    stats.errors += 1;
                                    slot.fails += 1;
                                }
                                if slot.fails > MAX_FAILS {
                                    slot.state = SlotState::Dead;
                                } else {
                                    stats.rearms += 1;
                                    slot.state = SlotState::Idle;
                                    idle.push(idx as u32);
                                }
                            }
                            _ => {}
                        }
                    } else if res < 0 {
                        stats.errors += 1;
                    }
                }
                KIND_WAKE_POLL if generation_of(ud) == *wake_generation => {
                    *wake_armed = false;
                    if res >= 0 {
                        out.woken = true;
                        if let Some(w) = waker.as_ref() {
                            w.drain();
                        }
                        *wake_rearm = true;
                    } else if res != -libc::ECANCELED {
                        stats.errors += 1;
                    }
                }
                // Timer expiries, cancel results, stale waker polls.
                _ => {}
            }
        }
        bufs.publish();
    }

    pub(crate) fn poll(
        &mut self,
        want: u32,
        timeout: Duration,
        f: &mut dyn FnMut(u64, Datagram<'_>),
    ) -> io::Result<PollOutcome> {
        self.claim()?;
        let mut out = PollOutcome::default();
        // Completions posted since the last poll (inline completions, an early wake).
        self.reap(f, &mut out);
        self.arm_pending()?;
        if out.woken || (want > 0 && out.received >= want as usize) {
            self.ring.submit()?;
        } else {
            // want = 0: run the deferred work once (GETEVENTS needs min_complete >= 1) without
            // waiting.
            let (left, timeout) = match want {
                0 => (1, Duration::ZERO),
                w => ((w as usize - out.received) as u32, timeout),
            };
            let ts = types::Timespec::new()
                .sec(timeout.as_secs())
                .nsec(timeout.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            let min_complete = left.min(self.want_cap) as usize;
            if let Err(e) = self.ring.submitter().submit_with_args(min_complete, &args) {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) {
                    return Err(e);
                }
            }
            self.reap(f, &mut out);
        }
        // Re-arm what ended in this round right away, so those sockets keep receiving.
        if self.arm_pending()? {
            self.ring.submit()?;
        }
        Ok(out)
    }

    /// Cancels everything and waits for the final CQEs. True if the kernel is provably done with
    /// our memory.
    fn shutdown(&mut self) -> bool {
        match self.issuer {
            // Never enabled: nothing was ever submitted.
            None => return true,
            Some(t) if t != thread::current().id() => return false,
            Some(_) => {}
        }
        if self.inflight == 0 {
            return true;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
            .build()
            .user_data(user_data(KIND_CANCEL, 0, 0));
        // SAFETY: a cancel request references no memory; the ring is ours (checked above).
        if unsafe { self.push(&[cancel]) }.is_err() {
            return false;
        }
        let deadline = Instant::now() + DROP_DRAIN;
        let ts = types::Timespec::new().nsec(10_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let mut out = PollOutcome::default();
        while self.inflight > 0 && Instant::now() < deadline {
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args) {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) {
                    return false;
                }
            }
            self.reap(&mut |_, _| {}, &mut out);
        }
        self.inflight == 0
    }
}

impl Drop for UringRecv {
    fn drop(&mut self) {
        if !self.shutdown() {
            // The kernel may still write into the buffers: leak them rather than free them.
            mem::forget(self.bufs.take());
            mem::forget(self.msghdr.take());
            #[cfg(test)]
            LEAKS.with(|n| n.set(n.get() + 1));
        }
        // Fields drop next, the ring (declared first) before the memory it used.
    }
}

#[cfg(test)]
thread_local! {
    /// Receivers dropped on this thread whose buffers had to be leaked.
    pub(crate) static LEAKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Parses one filled buffer and hands the datagram to `f`.
fn deliver(
    buf: &[u8],
    msghdr: &libc::msghdr,
    token: u64,
    f: &mut dyn FnMut(u64, Datagram<'_>),
    out: &mut PollOutcome,
    stats: &mut RecvStats,
) {
    let Ok(msg) = types::RecvMsgOut::parse(buf, msghdr) else {
        stats.errors += 1;
        return;
    };
    if msg.is_payload_truncated() {
        stats.truncated += 1;
        return;
    }
    let Some(from) = sockaddr_from_bytes(msg.name_data()) else {
        stats.errors += 1;
        return;
    };
    let to = if msghdr.msg_controllen > 0 {
        pktinfo_dest(msg.control_data())
    } else {
        None
    };
    let data = msg.payload_data();
    stats.datagrams += 1;
    stats.bytes += data.len() as u64;
    out.received += 1;
    f(token, Datagram { from, data, to });
}
