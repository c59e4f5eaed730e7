//! Small system helpers: socket setup, file-descriptor limits, `poll(2)`, clocks, the eventfd
//! [`Waker`], and IPv4 sockaddr conversions shared by the send and receive paths.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// `poll(2)` event: data to read.
pub const POLLIN: i16 = libc::POLLIN;
/// `poll(2)` event: writing will not block.
pub const POLLOUT: i16 = libc::POLLOUT;
/// `poll(2)` result: an error is pending on the descriptor.
pub const POLLERR: i16 = libc::POLLERR;
/// `poll(2)` result: the peer hung up.
pub const POLLHUP: i16 = libc::POLLHUP;
/// `poll(2)` result: the descriptor is not open.
pub const POLLNVAL: i16 = libc::POLLNVAL;

/// Length of a `sockaddr_in`, as the kernel wants it.
pub(crate) const SOCKADDR_IN_LEN: libc::socklen_t = mem::size_of::<libc::sockaddr_in>() as _;

/// The kernel's form of an IPv4 socket address.
pub(crate) fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Back from the kernel's form; `None` unless it is an IPv4 address.
pub(crate) fn from_sockaddr_in(sa: &libc::sockaddr_in) -> Option<SocketAddrV4> {
    (i32::from(sa.sin_family) == libc::AF_INET).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )
    })
}

/// Parses a `sockaddr_in` from raw bytes as the kernel wrote them (native-endian family, then
/// big-endian port and address). `None` if too short or not IPv4.
pub(crate) fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddrV4> {
    let family = u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?);
    if i32::from(family) != libc::AF_INET {
        return None;
    }
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    let ip = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
    Some(SocketAddrV4::new(Ipv4Addr::from(ip), port))
}

/// The errno of the last failed libc call.
pub(crate) fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Converts a libc `-1`-and-errno return into `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sets an integer socket option.
fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length passed is exactly its size; the kernel only
    // reads it during the call. An invalid `fd` makes the call fail with EBADF, nothing worse.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            ptr::from_ref(&value).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

/// Largest UDP payload [`set_dont_fragment`] is meant for: with the 8-byte UDP and 20-byte IPv4
/// headers it fits the 1280-byte MTU every IPv6 path guarantees, so in practice it crosses any
/// path in one piece, fragmentation allowed or not.
pub const DONT_FRAGMENT_MAX: usize = 1280 - 20 - 8;

/// Sends every datagram of `socket` with the don't-fragment bit and ignores the path MTU the
/// kernel learns from ICMP (`IP_MTU_DISCOVER` = `IP_PMTUDISC_PROBE`), if its datagrams, of at most
/// `datagram_len` bytes, fit [`DONT_FRAGMENT_MAX`]; larger ones keep the default (fragmentable),
/// since they could be dropped on a path with a smaller MTU instead. Returns whether it was set.
///
/// Why: a datagram that may be fragmented needs a unique IP identification, which an unconnected
/// socket gets from a hash and an atomic counter in a table every core shares
/// (`__ip_select_ident`, 9 % of a splitter's CPU in the flame graph); a datagram with DF set
/// gets ID 0 and skips it. Ignoring learned MTUs keeps a forged "fragmentation needed" from
/// making sends fail.
pub fn set_dont_fragment(socket: &UdpSocket, datagram_len: usize) -> io::Result<bool> {
    if datagram_len > DONT_FRAGMENT_MAX {
        return Ok(false);
    }
    setsockopt_int(
        socket.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_PROBE,
    )?;
    Ok(true)
}

/// Sets a socket buffer size: first the `*FORCE` variant (bypasses `rmem_max`/`wmem_max`, needs
/// CAP_NET_ADMIN), then the plain one (clamped by the kernel). Failures are ignored: a buffer size
/// is a tuning knob, never a reason to fail.
fn set_buffer(fd: RawFd, force: i32, plain: i32, bytes: usize) {
    // The kernel doubles the value; it takes an int.
    let v = i32::try_from(bytes).unwrap_or(i32::MAX);
    if setsockopt_int(fd, libc::SOL_SOCKET, force, v).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, v);
    }
}

fn bound_udp(
    addr: SocketAddrV4,
    reuse_addr: bool,
    reuse_port: bool,
    rcvbuf: Option<usize>,
    sndbuf: Option<usize>,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    if reuse_addr {
        socket.set_reuse_address(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    let fd = socket.as_raw_fd();
    if let Some(bytes) = rcvbuf {
        set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes);
    }
    if let Some(bytes) = sndbuf {
        set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes);
    }
    socket.bind(&SocketAddr::V4(addr).into())?;
    Ok(socket.into())
}

/// Non-blocking IPv4 UDP socket bound to `addr`, with `SO_REUSEPORT` if `reuse_port` (splitter
/// shards share one port).
///
/// `rcvbuf`/`sndbuf` are tried with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (works as root, beyond
/// `net.core.rmem_max`), then with `SO_RCVBUF`/`SO_SNDBUF`; a refused size never fails the call.
pub fn udp_socket(
    addr: SocketAddrV4,
    reuse_port: bool,
    rcvbuf: Option<usize>,
    sndbuf: Option<usize>,
) -> io::Result<UdpSocket> {
    bound_udp(addr, false, reuse_port, rcvbuf, sndbuf)
}

/// As [`udp_socket`] but with `SO_REUSEADDR` (and no `SO_REUSEPORT`): a peer binds its UDP socket
/// to the port number of its connected TCP stream, as the reference implementation does.
pub fn udp_socket_reuse_addr(
    addr: SocketAddrV4,
    rcvbuf: Option<usize>,
    sndbuf: Option<usize>,
) -> io::Result<UdpSocket> {
    bound_udp(addr, true, false, rcvbuf, sndbuf)
}

/// Non-blocking IPv4 TCP listener on `addr` with `SO_REUSEADDR`, listening with a backlog of 1024.
///
/// Accepted streams do not inherit `O_NONBLOCK` on Linux; set it on them if needed.
pub fn tcp_listener(addr: SocketAddrV4) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(addr).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call's duration.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok(lim)
}

fn set_nofile(cur: libc::rlim_t, max: libc::rlim_t) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: `lim` is a valid rlimit, only read during the call.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }).map(drop)
}

/// Raises the `RLIMIT_NOFILE` soft limit toward `want` (never lowers it) and returns the new soft
/// limit. Beyond the hard limit it tries to raise the hard limit as well (allowed as root, up to
/// `fs.nr_open`); if that is refused, the soft limit goes up to the hard limit.
pub fn raise_nofile_limit(want: u64) -> io::Result<u64> {
    let lim = get_nofile()?;
    let want = want as libc::rlim_t;
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur as u64);
    }
    if want > lim.rlim_max && set_nofile(want, want).is_ok() {
        return Ok(get_nofile()?.rlim_cur as u64);
    }
    set_nofile(want.min(lim.rlim_max), lim.rlim_max)?;
    Ok(get_nofile()?.rlim_cur as u64)
}

/// One entry of a [`poll`] set; layout-identical to `struct pollfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollFd {
    fd: RawFd,
    events: i16,
    revents: i16,
}

// `poll` passes a `[PollFd]` to the kernel as `struct pollfd[]`.
const _: () = {
    assert!(mem::size_of::<PollFd>() == mem::size_of::<libc::pollfd>());
    assert!(mem::align_of::<PollFd>() == mem::align_of::<libc::pollfd>());
    assert!(mem::offset_of!(PollFd, fd) == mem::offset_of!(libc::pollfd, fd));
    assert!(mem::offset_of!(PollFd, events) == mem::offset_of!(libc::pollfd, events));
    assert!(mem::offset_of!(PollFd, revents) == mem::offset_of!(libc::pollfd, revents));
};

impl PollFd {
    /// Watch `fd` for `events` (a mix of [`POLLIN`], [`POLLOUT`]); a negative `fd` is ignored by
    /// the kernel, which is a cheap way to disable an entry.
    pub fn new(fd: RawFd, events: i16) -> PollFd {
        PollFd {
            fd,
            events,
            revents: 0,
        }
    }

    /// The descriptor watched.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// The events asked for.
    pub fn events(&self) -> i16 {
        self.events
    }

    /// Change the events asked for (for example add [`POLLOUT`] while output is queued).
    pub fn set_events(&mut self, events: i16) {
        self.events = events;
    }

    /// The events the last [`poll`] reported (may include [`POLLERR`], [`POLLHUP`], [`POLLNVAL`]).
    pub fn revents(&self) -> i16 {
        self.revents
    }
}

/// `struct timespec` from a `Duration`, saturating.
pub(crate) fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// `poll(2)` (as `ppoll`, so the timeout has nanosecond resolution) on `fds`; `None` waits
/// forever. Returns how many entries have non-zero `revents`; an interrupted wait (EINTR) returns
/// `Ok(0)`.
pub fn poll(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let ts = timeout.map(timespec);
    let ts_ptr = ts.as_ref().map_or(ptr::null(), ptr::from_ref);
    // SAFETY: `PollFd` is layout-identical to `pollfd` (checked at compile time above) and the
    // slice is valid and writable for `fds.len()` entries during the call; `ts_ptr` is null or
    // points at a live timespec; a null sigmask means "do not change the mask".
    let ret = unsafe {
        libc::ppoll(
            fds.as_mut_ptr().cast::<libc::pollfd>(),
            fds.len() as libc::nfds_t,
            ts_ptr,
            ptr::null(),
        )
    };
    match cvt(ret) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(0),
        Err(e) => Err(e),
    }
}

fn clock(id: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid and writable during the call. The clock ids used here exist on every
    // supported Linux; on failure `ts` stays zero.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts
}

/// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`, at least 1 ns): how late the
/// kernel may end its sleeps to group wake-ups (50 µs by default). A thread that naps for tens
/// of microseconds needs it small for its naps to last what it asked.
pub fn set_timer_slack(slack: Duration) -> io::Result<()> {
    let ns = slack.as_nanos().clamp(1, u128::from(u32::MAX)) as libc::c_ulong;
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no user memory.
    cvt(unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) }).map(drop)
}

/// `struct sched_attr` as the kernel reads it (its first version, 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// The calling thread's scheduling attributes (`sched_getattr`).
fn sched_getattr() -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: pid 0 is the calling thread; the kernel writes at most `size` bytes into `attr`,
    // which is live and exactly that large.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            ptr::from_mut(&mut attr),
            size,
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Asks the fair scheduler for a time slice of `slice` for the calling thread (Linux 6.12+,
/// EEVDF: a `SCHED_OTHER` thread's `sched_runtime`, clamped by the kernel to 0.1–100 ms). A
/// shorter slice than the default (0.75 ms × (1 + log2 CPUs)) gives the thread an earlier
/// deadline: when it wakes on a busy core it runs at once instead of waiting for the current
/// thread's slice to end. It gets no more CPU time than before (nice still sets the share), and
/// needs no privilege. Only for `SCHED_OTHER` threads: a real-time thread is left as it is. On
/// older kernels the call succeeds and changes nothing; [`thread_slice`] tells.
pub fn set_thread_slice(slice: Duration) -> io::Result<()> {
    let mut attr = sched_getattr()?;
    if attr.policy != libc::SCHED_OTHER as u32 {
        return Ok(());
    }
    attr.size = mem::size_of::<SchedAttr>() as u32;
    attr.flags = 0;
    attr.runtime = slice.as_nanos().min(u128::from(u64::MAX)) as u64;
    // SAFETY: pid 0 is the calling thread; the kernel reads `attr.size` bytes from `attr`,
    // which is live and that large. The nice value read above is written back unchanged.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, ptr::from_ref(&attr), 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread in the real-time `SCHED_FIFO` class at `priority` (1–99): it then
/// runs whenever it is runnable on its core, before every fair-class (`SCHED_OTHER`) thread, so a
/// wake-up (a new chunk) is served at once whatever else the core was doing. It keeps the core
/// until it blocks, so it is only for threads that block between bursts of work; the kernel's
/// real-time throttling (`sched_rt_runtime_us`, 95 % by default) leaves the rest to others.
/// Needs root, `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least `priority`; the error is the
/// kernel's (`EPERM`).
pub fn set_realtime(priority: u8) -> io::Result<()> {
    if !(1..=99).contains(&priority) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("real-time priority {priority} is outside 1..=99"),
        ));
    }
    let mut attr = sched_getattr()?;
    attr.size = mem::size_of::<SchedAttr>() as u32;
    attr.policy = libc::SCHED_FIFO as u32;
    attr.flags = 0;
    attr.nice = 0;
    attr.priority = u32::from(priority);
    attr.runtime = 0;
    // SAFETY: pid 0 is the calling thread; the kernel reads `attr.size` bytes from `attr`,
    // which is live and that large.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, ptr::from_ref(&attr), 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's real-time priority: `Some(1..=99)` in `SCHED_FIFO` or `SCHED_RR`, `None`
/// in a fair class.
pub fn realtime_priority() -> io::Result<Option<u8>> {
    let a = sched_getattr()?;
    let rt = a.policy == libc::SCHED_FIFO as u32 || a.policy == libc::SCHED_RR as u32;
    Ok(rt.then(|| a.priority.min(99) as u8))
}

/// Whether this process may put threads in `SCHED_FIFO` at `priority`: tried on a short-lived
/// thread, so the caller's own class is left alone.
pub fn check_realtime(priority: u8) -> io::Result<()> {
    std::thread::spawn(move || set_realtime(priority))
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the probe thread panicked")))
}

/// The calling thread's fair-scheduler slice as the kernel reports it (`sched_runtime`; the
/// default slice unless [`set_thread_slice`] set one; zero on kernels before 6.12).
pub fn thread_slice() -> io::Result<Duration> {
    sched_getattr().map(|a| Duration::from_nanos(a.runtime))
}

/// CPU time consumed by the calling thread so far (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    let ts = clock(libc::CLOCK_THREAD_CPUTIME_ID);
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// `CLOCK_MONOTONIC` now, in nanoseconds. Comparable across threads and processes of one boot
/// (the load generator stamps chunks with it).
pub fn monotonic_ns() -> u64 {
    let ts = clock(libc::CLOCK_MONOTONIC);
    (ts.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec.max(0) as u64)
}

/// Wakes a thread blocked in [`MultiRecv::poll`](super::MultiRecv::poll): an eventfd. Clones share
/// the eventfd; it is `Send + Sync`, so any thread may call [`wake`](Waker::wake).
#[derive(Clone, Debug)]
pub struct Waker {
    fd: Arc<OwnedFd>,
}

impl Waker {
    /// A new eventfd (non-blocking, close-on-exec).
    pub fn new() -> io::Result<Waker> {
        // SAFETY: plain syscall with constant flags; no memory is passed.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by eventfd, is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker { fd: Arc::new(fd) })
    }

    /// Ends the current (or the next) poll of every [`MultiRecv`](super::MultiRecv) this waker is
    /// set on. Wakes coalesce; never blocks, never fails.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. The only possible failure,
        // EAGAIN (counter saturated), means a wake is already pending, so it is ignored.
        unsafe { libc::write(self.fd.as_raw_fd(), ptr::from_ref(&one).cast(), 8) };
    }

    /// Resets the eventfd counter (called by the receiver after it saw the wake).
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64. EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), ptr::from_mut(&mut v).cast(), 8) };
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realtime_is_set_for_this_thread_only_or_refused_with_the_kernels_error() {
        assert!(set_realtime(0).is_err(), "priority 0 is not real-time");
        assert!(set_realtime(100).is_err());
        let other = std::thread::spawn(|| {
            set_realtime(7)?;
            realtime_priority()
        })
        .join()
        .unwrap();
        match other {
            Ok(p) => assert_eq!(p, Some(7)),
            // Not root and no CAP_SYS_NICE: the kernel's refusal, and the probe agrees.
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                assert!(check_realtime(7).is_err());
                return;
            }
        }
        assert!(check_realtime(7).is_ok());
        assert_eq!(
            realtime_priority().unwrap(),
            None,
            "the test thread stays fair-class"
        );
    }

    #[test]
    fn thread_slice_is_set_for_this_thread_only_and_keeps_nice() {
        let nice_before = sched_getattr().unwrap().nice;
        let other = std::thread::spawn(|| {
            set_thread_slice(Duration::from_micros(300)).unwrap();
            let a = sched_getattr().unwrap();
            (thread_slice().unwrap(), a.nice)
        });
        let (slice, nice) = other.join().unwrap();
        assert_eq!(
            nice, nice_before,
            "the nice value is written back unchanged"
        );
        // Kernels before 6.12 accept the call and report no slice; from 6.12 on (EEVDF custom
        // slices) the slice reads back as set.
        let custom = kernel_at_least(6, 12);
        if custom {
            assert_eq!(slice, Duration::from_micros(300));
        }
        // The calling thread keeps its own (default) slice.
        if custom {
            assert_ne!(thread_slice().unwrap(), Duration::from_micros(300));
        }
    }

    /// Whether the running kernel's release is at least `major.minor`.
    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (a, b) >= (major, minor)
    }

    #[test]
    fn dont_fragment_is_set_and_the_largest_datagram_still_goes_out() {
        let rx = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), false, None, None).unwrap();
        let tx = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), false, None, None).unwrap();
        assert!(!set_dont_fragment(&tx, DONT_FRAGMENT_MAX + 1).unwrap());
        assert!(set_dont_fragment(&tx, DONT_FRAGMENT_MAX).unwrap());
        let mut value: i32 = -1;
        let mut len = mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live, writable and sized for an int option.
        let ret = unsafe {
            libc::getsockopt(
                tx.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(ret, 0);
        assert_eq!(value, libc::IP_PMTUDISC_PROBE);
        tx.set_nonblocking(false).unwrap();
        rx.set_nonblocking(false).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let big = vec![7u8; DONT_FRAGMENT_MAX];
        tx.send_to(&big, rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &big[..]);
    }

    #[test]
    fn sockaddr_round_trip() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 4567);
        let sa = sockaddr_in(a);
        assert_eq!(from_sockaddr_in(&sa), Some(a));
        // SAFETY: sockaddr_in is plain old data; viewing it as bytes is fine.
        let bytes: [u8; 16] = unsafe { mem::transmute(sa) };
        assert_eq!(sockaddr_from_bytes(&bytes), Some(a));
        assert_eq!(sockaddr_from_bytes(&bytes[..7]), None);
    }

    #[test]
    fn udp_socket_is_nonblocking_and_bound() {
        let s = udp_socket(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            true,
            Some(1 << 20),
            Some(1 << 20),
        )
        .unwrap();
        let mut buf = [0u8; 8];
        let e = s.recv_from(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_ne!(s.local_addr().unwrap().port(), 0);
        // A huge buffer request must not fail the call.
        udp_socket(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            false,
            Some(usize::MAX),
            Some(usize::MAX),
        )
        .unwrap();
    }

    #[test]
    fn reuse_port_shares_a_port() {
        let a = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), true, None, None).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = udp_socket(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            true,
            None,
            None,
        );
        assert!(b.is_ok());
    }

    #[test]
    fn tcp_listener_and_udp_on_same_port() {
        // The kernel picks the TCP port without looking at UDP, and tests running in parallel
        // hold thousands of UDP ports: try a few listeners until the number is free for UDP.
        let mut bound = None;
        for _ in 0..20 {
            let l = tcp_listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = l.local_addr().unwrap().port();
            let udp = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
            if let Ok(u) = udp_socket_reuse_addr(udp, None, None) {
                bound = Some((l, u));
                break;
            }
        }
        let (l, u) = bound.expect("no TCP port number was free for UDP");
        assert_eq!(
            u.local_addr().unwrap().port(),
            l.local_addr().unwrap().port()
        );
        assert_eq!(
            l.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "listener must be non-blocking"
        );
    }

    #[test]
    fn nofile_limit_never_lowers() {
        let before = get_nofile().unwrap().rlim_cur as u64;
        assert_eq!(raise_nofile_limit(16).unwrap(), before);
        let now = raise_nofile_limit(before + 1).unwrap();
        assert!(now >= before);
    }

    #[test]
    fn poll_reports_readable_and_times_out() {
        let a = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), false, None, None).unwrap();
        let b = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), false, None, None).unwrap();
        let mut fds = [PollFd::new(a.as_raw_fd(), POLLIN)];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        b.send_to(b"x", a.local_addr().unwrap()).unwrap();
        assert_eq!(poll(&mut fds, Some(Duration::from_secs(5))).unwrap(), 1);
        assert_ne!(fds[0].revents() & POLLIN, 0);
        let mut out = [PollFd::new(b.as_raw_fd(), POLLOUT)];
        assert_eq!(poll(&mut out, None).unwrap(), 1);
    }

    #[test]
    fn clocks_advance() {
        let t0 = monotonic_ns();
        let c0 = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..200_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(monotonic_ns() > t0);
        assert!(thread_cpu_time() > c0);
    }

    #[test]
    fn waker_is_send_sync_and_coalesces() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Waker>();
        let w = Waker::new().unwrap();
        w.wake();
        w.clone().wake();
        let mut fds = [PollFd::new(w.raw_fd(), POLLIN)];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 1);
        w.drain();
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
    }
}
