//! Portable receive backend: level-triggered epoll over all sockets, `recvmmsg(MSG_DONTWAIT)` on
//! each ready one. Buffers, addresses, iovecs and headers are owned here and only lent to the
//! kernel for the duration of one `recvmmsg` call.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::{Duration, Instant};

use super::pktinfo::{CmsgSpace, PKTINFO_SPACE, pktinfo_dest};
use super::recv::{Datagram, PollOutcome, RecvStats};
use super::slots::SlotTable;
use super::sys::{SOCKADDR_IN_LEN, Waker, errno, from_sockaddr_in, sockaddr_in};

/// epoll key of the waker's eventfd (socket keys are slot indices).
const WAKER_KEY: u64 = u64::MAX;
/// Ready events fetched per `epoll_wait`.
const EVENTS: usize = 1024;
/// Datagrams per `recvmmsg` call.
const BATCH: usize = 64;
/// `recvmmsg` calls per ready socket per wake-up, for fairness (level-triggered epoll reports a
/// socket with more data again).
const ROUNDS_PER_SOCKET: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Slot {
    fd: RawFd,
    token: u64,
}

/// The epoll receiver.
pub(crate) struct EpollRecv {
    epfd: OwnedFd,
    slots: SlotTable<Option<Slot>>,
    events: Box<[libc::epoll_event]>,
    batch: usize,
    buf_size: usize,
    /// `batch` buffers of `buf_size` bytes.
    bufs: Box<[u8]>,
    names: Box<[libc::sockaddr_in]>,
    iovs: Box<[libc::iovec]>,
    msgs: Box<[libc::mmsghdr]>,
    /// One control buffer per message, when destination addresses were asked for.
    cmsgs: Option<Box<[CmsgSpace]>>,
    waker: Option<Waker>,
    stats: RecvStats,
}

// SAFETY: the raw pointers in `iovs`/`msgs` point into this value's own boxed buffers, are
// rewritten before every `recvmmsg` and only used by the kernel during that call; nothing else
// dereferences them, so moving the receiver to another thread shares nothing.
unsafe impl Send for EpollRecv {}

fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, key: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: key,
    };
    // SAFETY: `ev` is a valid epoll_event for the call's duration (ignored for EPOLL_CTL_DEL).
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl EpollRecv {
    /// `dest`: receive an `IP_PKTINFO` message (the destination address) with each datagram.
    pub(crate) fn new(buf_count: u16, buf_size: u32, dest: bool) -> io::Result<EpollRecv> {
        // SAFETY: plain syscall, no memory passed.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1, is open and owned by nobody else.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let batch = BATCH.min(usize::from(buf_count)).max(1);
        let buf_size = buf_size as usize;
        let unspecified = sockaddr_in(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            0,
        ));
        let empty_iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: mmsghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
        let empty_msg: libc::mmsghdr = unsafe { mem::zeroed() };
        Ok(EpollRecv {
            epfd,
            slots: SlotTable::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS].into_boxed_slice(),
            batch,
            buf_size,
            bufs: vec![0u8; batch * buf_size].into_boxed_slice(),
            names: vec![unspecified; batch].into_boxed_slice(),
            iovs: vec![empty_iov; batch].into_boxed_slice(),
            msgs: vec![empty_msg; batch].into_boxed_slice(),
            cmsgs: dest.then(|| vec![CmsgSpace([0; PKTINFO_SPACE]); batch].into_boxed_slice()),
            waker: None,
            stats: RecvStats::default(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn stats(&self) -> RecvStats {
        self.stats
    }

    pub(crate) fn add_socket(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let idx = self.slots.vacant(token, || None)?;
        if let Err(e) = epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            u64::from(idx),
        ) {
            self.slots.release(idx);
            return Err(e);
        }
        self.slots[idx] = Some(Slot { fd, token });
        self.slots.insert(token, idx);
        Ok(())
    }

    pub(crate) fn remove_socket(&mut self, token: u64) -> io::Result<()> {
        let idx = self.slots.remove_token(token)?;
        let slot = self.slots[idx].take();
        self.slots.release(idx);
        match slot {
            Some(s) => epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, s.fd, 0),
            None => Ok(()),
        }
    }

    pub(crate) fn set_waker(&mut self, waker: &Waker) -> io::Result<()> {
        if let Some(old) = self.waker.take() {
            // The old eventfd may already be closed elsewhere; nothing to do then.
            let _ = epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, old.raw_fd(), 0);
        }
        epoll_ctl(
            self.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            waker.raw_fd(),
            WAKER_KEY,
        )?;
        self.waker = Some(waker.clone());
        Ok(())
    }

    pub(crate) fn poll(
        &mut self,
        want: u32,
        timeout: Duration,
        f: &mut dyn FnMut(u64, Datagram<'_>),
    ) -> io::Result<PollOutcome> {
        let mut out = PollOutcome::default();
        let start = Instant::now();
        let timeout = if want == 0 { Duration::ZERO } else { timeout };
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            // Round up so a sub-millisecond timeout still waits instead of spinning.
            let ms = i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
            // SAFETY: `events` is a writable array of `EVENTS` epoll_events for the call.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    self.events.len() as i32,
                    ms,
                )
            };
            let n = if n >= 0 {
                n as usize
            } else if errno() == libc::EINTR {
                0
            } else {
                return Err(io::Error::last_os_error());
            };
            for k in 0..n {
                let key = self.events[k].u64;
                if key == WAKER_KEY {
                    out.woken = true;
                    if let Some(w) = &self.waker {
                        w.drain();
                    }
                } else {
                    self.drain_socket(key as usize, f, &mut out);
                }
            }
            if out.woken || out.received >= want as usize || start.elapsed() >= timeout {
                return Ok(out);
            }
        }
    }

    /// Reads what `slots[idx]` has, up to [`ROUNDS_PER_SOCKET`] batches.
    fn drain_socket(
        &mut self,
        idx: usize,
        f: &mut dyn FnMut(u64, Datagram<'_>),
        out: &mut PollOutcome,
    ) {
        let Some(Some(Slot { fd, token })) = self.slots.get(idx).copied() else {
            return;
        };
        for _ in 0..ROUNDS_PER_SOCKET {
            let buf_base = self.bufs.as_mut_ptr();
            for (k, iov) in self.iovs.iter_mut().enumerate() {
                iov.iov_base = buf_base.wrapping_add(k * self.buf_size).cast();
                iov.iov_len = self.buf_size;
            }
            let iov_base = self.iovs.as_mut_ptr();
            let name_base = self.names.as_mut_ptr();
            let cmsg_base = self.cmsgs.as_mut().map(|c| c.as_mut_ptr());
            for (k, msg) in self.msgs.iter_mut().enumerate() {
                let h = &mut msg.msg_hdr;
                h.msg_name = name_base.wrapping_add(k).cast();
                h.msg_namelen = SOCKADDR_IN_LEN;
                h.msg_iov = iov_base.wrapping_add(k);
                h.msg_iovlen = 1;
                if let Some(base) = cmsg_base {
                    h.msg_control = base.wrapping_add(k).cast();
                    h.msg_controllen = PKTINFO_SPACE as _;
                }
                h.msg_flags = 0;
                msg.msg_len = 0;
            }
            // SAFETY: `msgs` holds `batch` initialised headers pointing at `names`, `iovs`,
            // `bufs` and `cmsgs` (each `batch` entries long, owned by us, not otherwise accessed
            // during the call); the kernel writes them only during the call. A null timeout is
            // allowed.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.msgs.as_mut_ptr(),
                    self.batch as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if r < 0 {
                match errno() {
                    libc::EAGAIN | libc::EINTR => {}
                    _ => self.stats.errors += 1,
                }
                return;
            }
            let r = (r as usize).min(self.batch);
            for k in 0..r {
                let msg = &self.msgs[k];
                if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    self.stats.truncated += 1;
                    continue;
                }
                let Some(from) = from_sockaddr_in(&self.names[k]) else {
                    self.stats.errors += 1;
                    continue;
                };
                let to = match &self.cmsgs {
                    Some(c) => {
                        #[allow(clippy::unnecessary_cast)]
                        // socklen_t on some libcs, size_t on glibc
                        let len = (msg.msg_hdr.msg_controllen as usize).min(PKTINFO_SPACE);
                        pktinfo_dest(&c[k].0[..len])
                    }
                    None => None,
                };
                let len = (msg.msg_len as usize).min(self.buf_size);
                let start = k * self.buf_size;
                let data = &self.bufs[start..start + len];
                self.stats.datagrams += 1;
                self.stats.bytes += len as u64;
                out.received += 1;
                f(token, Datagram { from, data, to });
            }
            if r < self.batch {
                return;
            }
        }
    }
}
