//! Receiving on many UDP sockets from one thread: the public face ([`MultiRecv`]) over the two
//! backends, io_uring multishot receives ([`super::recv_uring`]) and epoll + `recvmmsg`
//! ([`super::recv_epoll`]).

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue};

use super::path::kernel_path;
use super::recv_epoll::EpollRecv;
use super::recv_uring::UringRecv;
use super::sys::Waker;

/// Largest provided-buffer count: the kernel's limit for one buffer ring.
pub(crate) const MAX_BUF_COUNT: u16 = 32768;

/// Largest buffer size: a UDP datagram carries at most 65,507 bytes of payload.
pub(crate) const MAX_BUF_SIZE: u32 = 65536;

/// One received datagram, borrowed from a receive buffer until the callback returns.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    /// Source address.
    pub from: SocketAddrV4,
    /// Payload.
    pub data: &'a [u8],
    /// Destination address (`IP_PKTINFO`): only from a receiver built with
    /// [`MultiRecv::with_dest_addrs`], for sockets with [`set_pktinfo`](super::set_pktinfo) on.
    pub to: Option<Ipv4Addr>,
}

/// Kernel interface for receiving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvPath {
    /// io_uring multishot `RecvMsg` per socket, one provided-buffer ring shared by all sockets.
    Uring,
    /// epoll (level-triggered) + `recvmmsg(MSG_DONTWAIT)`.
    Poll,
}

kernel_path! {
    RecvPath, Poll, "receive", uring_recv_supported,
    names: "poll" | "epoll";
    /// io_uring if this kernel/container allows it (a `SINGLE_ISSUER | DEFER_TASKRUN` ring builds,
    /// which means Linux >= 6.1, and its probe lists `IORING_OP_RECVMSG`), else poll. Probed once
    /// per process.
}

fn uring_recv_supported() -> bool {
    let Ok(ring) = IoUring::<squeue::Entry, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
    else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(opcode::RecvMsg::CODE)
        && probe.is_supported(opcode::PollAdd::CODE)
}

/// Receive counters, kept by the [`MultiRecv`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvStats {
    /// Datagrams handed to the callback.
    pub datagrams: u64,
    /// Payload bytes handed to the callback.
    pub bytes: u64,
    /// Datagrams longer than the buffer size: dropped, not handed to the callback.
    pub truncated: u64,
    /// io_uring: multishot receives re-armed after they ended (ENOBUFS, CQ overflow, errors).
    pub rearms: u64,
    /// io_uring: multishot receives that ended because the buffer ring ran dry.
    pub enobufs: u64,
    /// Receive errors (and datagrams with a non-IPv4 source).
    pub errors: u64,
}

/// What one [`MultiRecv::poll`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollOutcome {
    /// The [`Waker`] fired (possibly before this poll started).
    pub woken: bool,
    /// Datagrams handed to the callback.
    pub received: usize,
}

enum Backend {
    Uring(Box<UringRecv>),
    Poll(Box<EpollRecv>),
}

/// Receives on many UDP sockets at once.
///
/// [`RecvPath::Uring`]: one io_uring multishot `RecvMsg` per socket (the source address is
/// needed), all sharing one provided-buffer ring, on a `SINGLE_ISSUER | DEFER_TASKRUN` ring.
/// [`RecvPath::Poll`]: level-triggered epoll + `recvmmsg(MSG_DONTWAIT)`. Scales to tens of
/// thousands of sockets on one thread (raise the fd limit: [`raise_nofile_limit`]).
///
/// A `MultiRecv` may be built and filled with sockets on one thread and moved to another, which
/// becomes its only user at its first [`poll`](Self::poll) (io_uring `SINGLE_ISSUER`); after that
/// calls from another thread fail.
///
/// [`raise_nofile_limit`]: super::raise_nofile_limit
pub struct MultiRecv {
    backend: Backend,
}

impl fmt::Debug for MultiRecv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiRecv")
            .field("path", &self.path())
            .field("sockets", &self.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl MultiRecv {
    /// A receiver with no sockets yet.
    ///
    /// `buf_count`: provided buffers, a power of two up to 32768 (e.g. 4096..16384); they bound
    /// how many datagrams can wait between two polls on the io_uring path (the poll path reads
    /// at most 64 at a time per socket). `buf_size`: payload bytes per buffer (e.g. 2048, at most
    /// 65536); longer datagrams are counted in [`RecvStats::truncated`] and dropped.
    pub fn new(path: RecvPath, buf_count: u16, buf_size: u32) -> io::Result<MultiRecv> {
        MultiRecv::build(path, buf_count, buf_size, false)
    }

    /// As [`new`](Self::new), and every [`Datagram`] also names its destination address
    /// ([`Datagram::to`]) for sockets that have [`set_pktinfo`](super::set_pktinfo) on: room for
    /// one `IP_PKTINFO` control message is reserved per datagram (in each provided buffer on the
    /// io_uring path).
    pub fn with_dest_addrs(path: RecvPath, buf_count: u16, buf_size: u32) -> io::Result<MultiRecv> {
        MultiRecv::build(path, buf_count, buf_size, true)
    }

    fn build(path: RecvPath, buf_count: u16, buf_size: u32, dest: bool) -> io::Result<MultiRecv> {
        if !buf_count.is_power_of_two() || buf_count > MAX_BUF_COUNT {
            return Err(invalid(
                "MultiRecv: buf_count must be a power of two <= 32768",
            ));
        }
        if buf_size == 0 || buf_size > MAX_BUF_SIZE {
            return Err(invalid("MultiRecv: buf_size must be in 1..=65536"));
        }
        let backend = match path {
            RecvPath::Uring => Backend::Uring(Box::new(UringRecv::new(buf_count, buf_size, dest)?)),
            RecvPath::Poll => Backend::Poll(Box::new(EpollRecv::new(buf_count, buf_size, dest)?)),
        };
        Ok(MultiRecv { backend })
    }

    /// The kernel interface in use.
    pub fn path(&self) -> RecvPath {
        match self.backend {
            Backend::Uring(_) => RecvPath::Uring,
            Backend::Poll(_) => RecvPath::Poll,
        }
    }

    /// Number of sockets receiving.
    pub fn len(&self) -> usize {
        match &self.backend {
            Backend::Uring(r) => r.len(),
            Backend::Poll(r) => r.len(),
        }
    }

    /// No socket is receiving.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts receiving on `fd` (a UDP socket, kept open by the caller until
    /// [`remove_socket`](Self::remove_socket) or until this receiver is dropped); its datagrams are
    /// reported with `token`. Fails if `token` is already in use. On the io_uring path the receive
    /// is armed at the next [`poll`](Self::poll).
    pub fn add_socket(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        if fd < 0 {
            return Err(invalid("MultiRecv::add_socket: negative fd"));
        }
        match &mut self.backend {
            Backend::Uring(r) => r.add_socket(fd, token),
            Backend::Poll(r) => r.add_socket(fd, token),
        }
    }

    /// Stops receiving on the socket added with `token` (cancels its multishot receive), before
    /// the caller closes it. Datagrams it received but not yet reported are dropped; later ones
    /// stay in the socket. Fails with `NotFound` for an unknown token.
    pub fn remove_socket(&mut self, token: u64) -> io::Result<()> {
        match &mut self.backend {
            Backend::Uring(r) => r.remove_socket(token),
            Backend::Poll(r) => r.remove_socket(token),
        }
    }

    /// Makes `waker.wake()` end a poll early (`woken = true`). Replaces any previous waker.
    pub fn set_waker(&mut self, waker: &Waker) -> io::Result<()> {
        match &mut self.backend {
            Backend::Uring(r) => r.set_waker(waker),
            Backend::Poll(r) => r.set_waker(waker),
        }
    }

    /// Waits until at least `want` datagrams arrived, the waker fired, or `timeout` passed; then
    /// calls `f(token, datagram)` for each datagram received, recycling each buffer after the
    /// call. `want = 0` does not wait. ETIME (the timeout) is not an error.
    ///
    /// io_uring: `want` is the `min_complete` of `io_uring_enter` (completions, which are almost
    /// all datagrams; capped at half the buffer count). With `DEFER_TASKRUN` each wait processes
    /// about 20 arrivals per wake-up at `want = 1`, so prefer `want >= 32` with a ~1 ms timeout
    /// for throughput. Multishot receives that ended (ENOBUFS etc.) are re-armed and counted. A
    /// wake is normally seen within ~0.1 ms; in a rare race (the wake lands while the poll is
    /// starting) it is seen when `want` is reached or the timeout ends.
    ///
    /// poll: waits on epoll (millisecond resolution) and drains ready sockets, until `want`, the
    /// waker or `timeout`.
    pub fn poll(
        &mut self,
        want: u32,
        timeout: Duration,
        mut f: impl FnMut(u64, Datagram<'_>),
    ) -> io::Result<PollOutcome> {
        match &mut self.backend {
            Backend::Uring(r) => r.poll(want, timeout, &mut f),
            Backend::Poll(r) => r.poll(want, timeout, &mut f),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> RecvStats {
        match &self.backend {
            Backend::Uring(r) => r.stats(),
            Backend::Poll(r) => r.stats(),
        }
    }
}

pub(crate) fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sys::{raise_nofile_limit, udp_socket};
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::thread;
    use std::time::Instant;

    const BOTH: [RecvPath; 2] = [RecvPath::Uring, RecvPath::Poll];

    fn localhost() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)
    }

    fn v4(s: &UdpSocket) -> SocketAddrV4 {
        match s.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        }
    }

    fn sockets(n: usize) -> Vec<UdpSocket> {
        (0..n)
            .map(|_| udp_socket(localhost(), false, None, None).unwrap())
            .collect()
    }

    /// Polls until `done(received so far)` or 10 s; returns what arrived as (token, from, data).
    fn collect(
        rx: &mut MultiRecv,
        want: u32,
        mut done: impl FnMut(&[(u64, SocketAddrV4, Vec<u8>)]) -> bool,
    ) -> Vec<(u64, SocketAddrV4, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while !done(&got) && Instant::now() < deadline {
            rx.poll(want, Duration::from_millis(5), |token, d| {
                got.push((token, d.from, d.data.to_vec()))
            })
            .unwrap();
        }
        got
    }

    /// Whether this kernel (or container) lets a process build the ring the io_uring receive
    /// path needs (`SINGLE_ISSUER | DEFER_TASKRUN`) and lists the opcodes it submits; probed here
    /// with the io-uring crate, apart from `detect`.
    fn io_uring_receives_here() -> bool {
        use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
        let Ok(ring) = IoUring::<squeue::Entry, cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(8)
        else {
            return false;
        };
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::RecvMsg::CODE)
            && probe.is_supported(opcode::PollAdd::CODE)
    }

    /// Holds on any kernel: io_uring where a ring can be built here, else the epoll fallback, and
    /// whichever was picked receives a datagram.
    #[test]
    fn detect_picks_io_uring_exactly_when_it_works_here_and_the_pick_receives() {
        let path = RecvPath::detect();
        let expected = if io_uring_receives_here() {
            RecvPath::Uring
        } else {
            RecvPath::Poll
        };
        assert_eq!(path, expected);
        let [rx_sock, tx]: [UdpSocket; 2] = sockets(2).try_into().unwrap();
        let mut rx = MultiRecv::new(path, 64, 2048).unwrap();
        rx.add_socket(rx_sock.as_raw_fd(), 42).unwrap();
        tx.send_to(b"detected", v4(&rx_sock)).unwrap();
        let got = collect(&mut rx, 8, |g| !g.is_empty());
        assert_eq!(got, [(42, v4(&tx), b"detected".to_vec())], "{path}");
    }

    #[test]
    fn path_names_parse_back() {
        for p in BOTH {
            assert_eq!(p.name().parse::<RecvPath>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!("epoll".parse::<RecvPath>(), Ok(RecvPath::Poll));
        assert_eq!("URING".parse::<RecvPath>(), Ok(RecvPath::Uring));
        assert!("sendmmsg".parse::<RecvPath>().is_err());
    }

    #[test]
    fn new_validates_sizes() {
        for p in BOTH {
            assert!(MultiRecv::new(p, 3, 2048).is_err());
            assert!(MultiRecv::new(p, 0, 2048).is_err());
            assert!(MultiRecv::new(p, 1024, 0).is_err());
            assert!(MultiRecv::new(p, 1024, 65537).is_err());
            let rx = MultiRecv::new(p, 1024, 2048).unwrap();
            assert_eq!(rx.path(), p);
            assert!(rx.is_empty());
        }
    }

    #[test]
    fn types_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<MultiRecv>();
        assert_send::<crate::driver::BatchSender>();
    }

    /// 1000 sockets, datagrams from 4 known senders, half sent before the receives are armed and
    /// half after: every datagram arrives once, with the right token and source address.
    #[test]
    fn thousand_sockets_right_tokens_and_sources() {
        raise_nofile_limit(8192).unwrap();
        for path in BOTH {
            let rx_socks = sockets(1000);
            let senders = sockets(4);
            let mut rx = MultiRecv::new(path, 4096, 2048).unwrap();
            for (i, s) in rx_socks.iter().enumerate() {
                rx.add_socket(s.as_raw_fd(), 7_000_000 + i as u64).unwrap();
            }
            assert_eq!(rx.len(), 1000);
            let send_round = |round: u8| {
                for (i, s) in rx_socks.iter().enumerate() {
                    let payload = format!("{round}:{i}:{}", "x".repeat(i % 300));
                    senders[i % 4].send_to(payload.as_bytes(), v4(s)).unwrap();
                }
            };
            send_round(0);
            let first = collect(&mut rx, 32, |g| g.len() >= 1000);
            send_round(1);
            let second = collect(&mut rx, 32, |g| g.len() >= 1000);
            let mut seen: HashMap<u64, Vec<u8>> = HashMap::new();
            for (round, got) in [first, second].into_iter().enumerate() {
                assert_eq!(got.len(), 1000, "{path}: round {round}");
                for (token, from, data) in got {
                    let i = (token - 7_000_000) as usize;
                    assert!(i < 1000, "{path}: bad token {token}");
                    let expected = format!("{round}:{i}:{}", "x".repeat(i % 300));
                    assert_eq!(data, expected.as_bytes(), "{path}");
                    assert_eq!(from, v4(&senders[i % 4]), "{path}");
                    assert!(seen.insert(token * 2 + round as u64, data).is_none());
                }
            }
            let stats = rx.stats();
            assert_eq!(stats.datagrams, 2000, "{path}: {stats:?}");
            assert_eq!(stats.truncated + stats.errors, 0, "{path}: {stats:?}");
        }
    }

    /// The scale target: 10,000 sockets in one receiver (the SQ holds 4096 entries, so arming
    /// takes several submissions).
    #[test]
    fn ten_thousand_sockets() {
        let limit = raise_nofile_limit(25_000).unwrap();
        assert!(limit >= 10_100, "fd limit {limit} too low for this test");
        for path in BOTH {
            let rx_socks = sockets(10_000);
            let tx = udp_socket(localhost(), false, None, Some(8 << 20)).unwrap();
            let mut rx = MultiRecv::new(path, 16384, 2048).unwrap();
            for (i, s) in rx_socks.iter().enumerate() {
                rx.add_socket(s.as_raw_fd(), i as u64).unwrap();
            }
            // Arm everything, then send one datagram to each socket.
            rx.poll(0, Duration::ZERO, |_, _| panic!("nothing sent yet"))
                .unwrap();
            let mut sender = crate::driver::BatchSender::new(
                tx.as_raw_fd(),
                crate::driver::SendPath::detect(),
                256,
            )
            .unwrap();
            let dests: Vec<SocketAddrV4> = rx_socks.iter().map(v4).collect();
            let mut stats = crate::driver::SendStats::default();
            sender.send_to_all(b"hello", &dests, &mut stats);
            assert_eq!(stats.datagrams, 10_000);
            let mut tokens = vec![0u8; 10_000];
            let mut total = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while total < 10_000 && Instant::now() < deadline {
                rx.poll(256, Duration::from_millis(1), |token, d| {
                    assert_eq!(d.data, b"hello");
                    tokens[token as usize] += 1;
                    total += 1;
                })
                .unwrap();
            }
            assert!(tokens.iter().all(|&n| n == 1), "{path}: {:?}", rx.stats());
        }
    }

    #[test]
    fn waker_ends_a_poll() {
        for path in BOTH {
            let socks = sockets(2);
            let mut rx = MultiRecv::new(path, 1024, 2048).unwrap();
            for (i, s) in socks.iter().enumerate() {
                rx.add_socket(s.as_raw_fd(), i as u64).unwrap();
            }
            let waker = Waker::new().unwrap();
            rx.set_waker(&waker).unwrap();

            // Nothing pending: the timeout ends the poll, which is not an error.
            let out = rx.poll(1, Duration::from_millis(20), |_, _| {}).unwrap();
            assert_eq!(out, PollOutcome::default(), "{path}");

            // A wake before the poll ends the next poll.
            waker.wake();
            let t = Instant::now();
            let out = rx.poll(1000, Duration::from_secs(30), |_, _| {}).unwrap();
            assert!(out.woken, "{path}");
            assert!(t.elapsed() < Duration::from_secs(10), "{path}");

            // A wake while the poll is blocked: the helper waits until this thread sleeps.
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            for _ in 0..3 {
                let w = waker.clone();
                let helper = thread::spawn(move || {
                    let stat = format!("/proc/self/task/{tid}/stat");
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < deadline {
                        let s = std::fs::read_to_string(&stat).unwrap_or_default();
                        // The state follows the ")" closing the command name.
                        if s.rsplit(')')
                            .next()
                            .is_some_and(|r| r.trim_start().starts_with('S'))
                        {
                            break;
                        }
                        thread::yield_now();
                    }
                    w.wake();
                });
                let t = Instant::now();
                let out = rx.poll(1000, Duration::from_secs(30), |_, _| {}).unwrap();
                helper.join().unwrap();
                assert!(out.woken, "{path}");
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{path}: {:?}",
                    t.elapsed()
                );
            }

            // The wake was consumed: the next poll times out again, without `woken`.
            let out = rx.poll(1, Duration::from_millis(20), |_, _| {}).unwrap();
            assert!(!out.woken, "{path}");

            // Data still flows after wakes.
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            tx.send_to(b"after", v4(&socks[1])).unwrap();
            let got = collect(&mut rx, 1, |g| !g.is_empty());
            assert_eq!(got, vec![(1, v4(&tx), b"after".to_vec())], "{path}");

            // Replacing the waker: the new one works.
            let other = Waker::new().unwrap();
            rx.set_waker(&other).unwrap();
            other.wake();
            let out = rx.poll(1000, Duration::from_secs(30), |_, _| {}).unwrap();
            assert!(out.woken, "{path}");
        }
    }

    #[test]
    fn remove_socket_stops_delivery() {
        for path in BOTH {
            let socks = sockets(3);
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            let mut rx = MultiRecv::new(path, 1024, 2048).unwrap();
            for (i, s) in socks.iter().enumerate() {
                rx.add_socket(s.as_raw_fd(), 100 + i as u64).unwrap();
            }
            assert_eq!(
                rx.add_socket(socks[0].as_raw_fd(), 101).unwrap_err().kind(),
                io::ErrorKind::AlreadyExists
            );
            rx.poll(0, Duration::ZERO, |_, _| {}).unwrap();
            rx.remove_socket(100).unwrap();
            assert_eq!(
                rx.remove_socket(100).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
            assert_eq!(rx.len(), 2);
            tx.send_to(b"to-removed", v4(&socks[0])).unwrap();
            tx.send_to(b"to-kept", v4(&socks[1])).unwrap();
            let got = collect(&mut rx, 1, |g| !g.is_empty());
            assert_eq!(got, vec![(101, v4(&tx), b"to-kept".to_vec())], "{path}");
            // The removed socket's datagram was left in the socket.
            let mut buf = [0u8; 64];
            let (n, _) = socks[0].recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"to-removed", "{path}");
            // Removing a socket that was never armed, and re-adding under new tokens.
            rx.remove_socket(102).unwrap();
            rx.add_socket(socks[0].as_raw_fd(), 200).unwrap();
            rx.add_socket(socks[2].as_raw_fd(), 102).unwrap();
            tx.send_to(b"again", v4(&socks[0])).unwrap();
            tx.send_to(b"third", v4(&socks[2])).unwrap();
            let mut got = collect(&mut rx, 2, |g| g.len() >= 2);
            got.sort();
            assert_eq!(
                got,
                vec![
                    (102, v4(&tx), b"third".to_vec()),
                    (200, v4(&tx), b"again".to_vec())
                ],
                "{path}"
            );
        }
    }

    #[test]
    fn oversize_datagram_is_counted_as_truncated() {
        for path in BOTH {
            let socks = sockets(1);
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            let mut rx = MultiRecv::new(path, 64, 256).unwrap();
            rx.add_socket(socks[0].as_raw_fd(), 9).unwrap();
            tx.send_to(&[1u8; 257], v4(&socks[0])).unwrap();
            tx.send_to(&[2u8; 256], v4(&socks[0])).unwrap();
            tx.send_to(&[3u8; 5000], v4(&socks[0])).unwrap();
            let got = collect(&mut rx, 1, |g| !g.is_empty());
            assert_eq!(got, vec![(9, v4(&tx), vec![2u8; 256])], "{path}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while rx.stats().truncated < 2 && Instant::now() < deadline {
                rx.poll(1, Duration::from_millis(5), |_, _| {
                    panic!("only oversize left")
                })
                .unwrap();
            }
            assert_eq!(rx.stats().truncated, 2, "{path}: {:?}", rx.stats());
            assert_eq!(rx.stats().datagrams, 1);
        }
    }

    /// More datagrams queued than provided buffers: the multishot receive ends with ENOBUFS,
    /// is re-armed after the buffers are recycled, and nothing is lost.
    #[test]
    fn buffer_exhaustion_rearms_without_loss() {
        let socks = sockets(2);
        let tx = udp_socket(localhost(), false, None, None).unwrap();
        let mut rx = MultiRecv::new(RecvPath::Uring, 4, 128).unwrap();
        rx.add_socket(socks[0].as_raw_fd(), 1).unwrap();
        rx.add_socket(socks[1].as_raw_fd(), 2).unwrap();
        rx.poll(0, Duration::ZERO, |_, _| {}).unwrap();
        for i in 0..50u8 {
            tx.send_to(&[i; 100], v4(&socks[usize::from(i % 2)]))
                .unwrap();
        }
        let got = collect(&mut rx, 2, |g| g.len() >= 50);
        assert_eq!(got.len(), 50);
        let mut per_socket: HashMap<u64, Vec<u8>> = HashMap::new();
        for (token, _, data) in got {
            per_socket.entry(token).or_default().push(data[0]);
        }
        // Per-socket order is kept.
        assert_eq!(per_socket[&1], (0..50).step_by(2).collect::<Vec<u8>>());
        assert_eq!(per_socket[&2], (1..50).step_by(2).collect::<Vec<u8>>());
        let stats = rx.stats();
        assert!(stats.enobufs >= 1 && stats.rearms >= 1, "{stats:?}");
        assert_eq!(stats.errors, 0, "{stats:?}");
    }

    #[test]
    fn uring_receiver_is_bound_to_its_first_polling_thread() {
        let socks = sockets(1);
        let mut rx = MultiRecv::new(RecvPath::Uring, 64, 2048).unwrap();
        rx.add_socket(socks[0].as_raw_fd(), 1).unwrap();
        // Built here, first polled on another thread: fine.
        let mut rx = thread::spawn(move || {
            rx.poll(0, Duration::ZERO, |_, _| {}).unwrap();
            rx
        })
        .join()
        .unwrap();
        // Now bound to that (finished) thread: an error, not a panic or UB.
        assert!(rx.poll(1, Duration::ZERO, |_, _| {}).is_err());
        assert!(rx.remove_socket(1).is_err());
        // Dropped here, on a foreign thread: the buffers are leaked rather than freed.
        let leaks = crate::driver::recv_uring::LEAKS.with(|n| n.get());
        drop(rx);
        assert_eq!(
            crate::driver::recv_uring::LEAKS.with(|n| n.get()),
            leaks + 1
        );
    }

    #[test]
    fn drop_with_armed_sockets_and_waker() {
        for path in BOTH {
            let socks = sockets(8);
            let tx = udp_socket(localhost(), false, None, None).unwrap();
            let mut rx = MultiRecv::new(path, 64, 2048).unwrap();
            for (i, s) in socks.iter().enumerate() {
                rx.add_socket(s.as_raw_fd(), i as u64).unwrap();
            }
            rx.set_waker(&Waker::new().unwrap()).unwrap();
            rx.poll(0, Duration::ZERO, |_, _| {}).unwrap();
            // Leave datagrams unreaped in flight, then drop: every request is cancelled and
            // completes, so the buffers are freed, not leaked.
            for s in &socks {
                tx.send_to(b"late", v4(s)).unwrap();
            }
            let leaks = crate::driver::recv_uring::LEAKS.with(|n| n.get());
            drop(rx);
            assert_eq!(
                crate::driver::recv_uring::LEAKS.with(|n| n.get()),
                leaks,
                "{path}"
            );
        }
    }
}
