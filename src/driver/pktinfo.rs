//! `IP_PKTINFO`: the local address of a datagram, on a socket bound to the wildcard address.
//!
//! On receive the kernel adds an `IP_PKTINFO` control message naming the address the datagram was
//! sent to ([`set_pktinfo`], then [`MultiRecv::with_dest_addrs`] hands it out as
//! [`Datagram::to`]); on send an `IP_PKTINFO` control message with `ipi_spec_dst` set picks the
//! source address ([`send_from_addr`], [`SourcedSender`]). With both, one UDP socket on
//! `0.0.0.0:port` stands for any number of endpoints `a.b.c.d:port` with local addresses, as all of
//! 127.0.0.0/8 is on Linux: the load generator's virtual peers.
//!
//! [`MultiRecv::with_dest_addrs`]: super::MultiRecv::with_dest_addrs
//! [`Datagram::to`]: super::Datagram::to

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::ptr;
use std::time::Duration;

use super::send::{EAGAIN_WAIT_BUDGET, SendStats, wait_writable};
use super::sys::{SOCKADDR_IN_LEN, errno, sockaddr_in};

/// A control buffer with room for one `IP_PKTINFO` message (`CMSG_SPACE(sizeof(in_pktinfo))`),
/// laid out as the kernel reads it: the header, then the data at `CMSG_ALIGN(sizeof(cmsghdr))`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct PktinfoCmsg {
    hdr: libc::cmsghdr,
    info: libc::in_pktinfo,
}

/// Bytes of control buffer one `IP_PKTINFO` message needs.
pub(crate) const PKTINFO_SPACE: usize = mem::size_of::<PktinfoCmsg>();

const _: () = assert!(PKTINFO_SPACE % mem::size_of::<usize>() == 0);

/// A zeroed, `cmsghdr`-aligned receive buffer for one `IP_PKTINFO` message.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub(crate) struct CmsgSpace(pub(crate) [u8; PKTINFO_SPACE]);

const _: () = assert!(mem::align_of::<CmsgSpace>() >= mem::align_of::<libc::cmsghdr>());
const _: () = assert!(mem::size_of::<libc::cmsghdr>() % mem::size_of::<usize>() == 0);

impl PktinfoCmsg {
    /// The message that sends a datagram from `src` (`ipi_spec_dst`; interface left to routing).
    pub(crate) fn source(src: Ipv4Addr) -> PktinfoCmsg {
        PktinfoCmsg {
            hdr: libc::cmsghdr {
                cmsg_len: (mem::size_of::<libc::cmsghdr>() + mem::size_of::<libc::in_pktinfo>())
                    as _,
                cmsg_level: libc::IPPROTO_IP,
                cmsg_type: libc::IP_PKTINFO,
            },
            info: libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(src).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            },
        }
    }
}

/// The destination address in a received control buffer (`ipi_addr` of its `IP_PKTINFO`
/// message), if it has one. Parsed from the bytes, as `CMSG_FIRSTHDR`/`CMSG_NXTHDR` walk them.
pub(crate) fn pktinfo_dest(control: &[u8]) -> Option<Ipv4Addr> {
    const WORD: usize = mem::size_of::<usize>();
    let hdr = mem::size_of::<libc::cmsghdr>();
    let mut off = 0;
    while off + hdr <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + WORD].try_into().ok()?);
        let level = i32::from_ne_bytes(control[off + WORD..off + WORD + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[off + WORD + 4..off + WORD + 8].try_into().ok()?);
        if len < hdr {
            return None;
        }
        if level == libc::IPPROTO_IP
            && kind == libc::IP_PKTINFO
            && len >= hdr + mem::size_of::<libc::in_pktinfo>()
        {
            // in_pktinfo: ipi_ifindex (4), ipi_spec_dst (4), ipi_addr (4), network order.
            let a = control.get(off + hdr + 8..off + hdr + 12)?;
            return Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        }
        off += len.next_multiple_of(WORD);
    }
    None
}

/// Asks the kernel for the destination address of every datagram `fd` receives (`IP_PKTINFO`).
pub fn set_pktinfo(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid c_int for the call's duration and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            ptr::from_ref(&on).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `payload` to `dest` from `fd` with `src` as its source address (one `sendmsg` with an
/// `IP_PKTINFO` message; `src` must be a local address, the port is `fd`'s).
pub fn send_from_addr(
    fd: RawFd,
    src: Ipv4Addr,
    dest: SocketAddrV4,
    payload: &[u8],
) -> io::Result<usize> {
    let mut name = sockaddr_in(dest);
    let mut cmsg = PktinfoCmsg::source(src);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = ptr::from_mut(&mut name).cast();
    msg.msg_namelen = SOCKADDR_IN_LEN;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ptr::from_mut(&mut cmsg).cast();
    msg.msg_controllen = PKTINFO_SPACE as _;
    // SAFETY: `msg` points at `name`, `iov` (which points at `payload`) and `cmsg`, all alive and
    // unaliased for the call; sendmsg only reads them.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Batched sends from one socket, each with its own source address: `sendmmsg(2)` with an
/// `IP_PKTINFO` message per datagram. The retry policy is [`BatchSender`]'s: EAGAIN waits for
/// `POLLOUT` within [`EAGAIN_WAIT_BUDGET`] per call, other errors are counted and dropped.
///
/// [`BatchSender`]: super::BatchSender
pub struct SourcedSender {
    batch: usize,
    names: Box<[libc::sockaddr_in]>,
    iovs: Box<[libc::iovec]>,
    cmsgs: Box<[PktinfoCmsg]>,
    msgs: Box<[libc::mmsghdr]>,
}

// SAFETY: the raw pointers in `iovs`/`msgs` are rewritten before every `sendmmsg` and used by the
// kernel only during that call; nothing else dereferences them.
unsafe impl Send for SourcedSender {}

/// Consecutive rounds without progress before the rest of a batch is dropped.
const MAX_IDLE_ROUNDS: u32 = 8;

impl SourcedSender {
    /// A sender of up to `batch` datagrams per `sendmmsg` (1..=1024).
    pub fn new(batch: usize) -> SourcedSender {
        let batch = batch.clamp(1, super::MAX_BATCH);
        let empty_iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: mmsghdr is plain old data; all-zero (null pointers, zero lengths) is valid.
        let empty_msg: libc::mmsghdr = unsafe { mem::zeroed() };
        SourcedSender {
            batch,
            names: vec![sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); batch]
                .into_boxed_slice(),
            iovs: vec![empty_iov; batch].into_boxed_slice(),
            cmsgs: vec![PktinfoCmsg::source(Ipv4Addr::UNSPECIFIED); batch].into_boxed_slice(),
            msgs: vec![empty_msg; batch].into_boxed_slice(),
        }
    }

    /// Sends each `(source address, destination, payload)` from `fd`.
    pub fn send(
        &mut self,
        fd: RawFd,
        items: &[(Ipv4Addr, SocketAddrV4, &[u8])],
        stats: &mut SendStats,
    ) {
        let mut budget = EAGAIN_WAIT_BUDGET;
        for batch in items.chunks(self.batch) {
            let n = batch.len();
            for (k, (src, dest, payload)) in batch.iter().enumerate() {
                self.names[k] = sockaddr_in(*dest);
                self.cmsgs[k] = PktinfoCmsg::source(*src);
                self.iovs[k] = libc::iovec {
                    iov_base: payload.as_ptr().cast_mut().cast(),
                    iov_len: payload.len(),
                };
            }
            // Raw pointers are taken after the last write through the arrays in this call.
            let (names, iovs, cmsgs) = (
                self.names.as_mut_ptr(),
                self.iovs.as_mut_ptr(),
                self.cmsgs.as_mut_ptr(),
            );
            for (k, msg) in self.msgs[..n].iter_mut().enumerate() {
                let h = &mut msg.msg_hdr;
                h.msg_name = names.wrapping_add(k).cast();
                h.msg_namelen = SOCKADDR_IN_LEN;
                h.msg_iov = iovs.wrapping_add(k);
                h.msg_iovlen = 1;
                h.msg_control = cmsgs.wrapping_add(k).cast();
                h.msg_controllen = PKTINFO_SPACE as _;
                h.msg_flags = 0;
                msg.msg_len = 0;
            }
            let mut p = 0;
            let mut idle = 0;
            while p < n {
                // SAFETY: `msgs[p..n]` were initialised above and point only into `names`,
                // `iovs`, `cmsgs` (owned by us, not touched during the call) and the payloads
                // (borrowed by our caller); sendmmsg writes only `msg_len`. `p < n <= batch`.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.msgs.as_mut_ptr().add(p),
                        (n - p) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                stats.submissions += 1;
                if r > 0 {
                    let sent = (r as usize).min(n - p);
                    let done = self.msgs[p..p + sent].iter().zip(&batch[p..p + sent]);
                    for (msg, (_, _, payload)) in done {
                        let len = msg.msg_len as usize;
                        stats.datagrams += 1;
                        stats.bytes += len as u64;
                        if len < payload.len() {
                            stats.partial += 1;
                        }
                    }
                    p += sent;
                    idle = 0;
                    continue;
                }
                let err = if r == 0 { libc::EAGAIN } else { errno() };
                idle += 1;
                match err {
                    libc::EAGAIN | libc::EINTR => {
                        if err == libc::EAGAIN {
                            stats.eagain += 1;
                        }
                        if budget.is_zero() || idle > MAX_IDLE_ROUNDS {
                            stats.dropped += (n - p) as u64;
                            break;
                        }
                        if err == libc::EAGAIN {
                            let spent = wait_writable(fd, budget.min(Duration::from_millis(5)));
                            budget = budget.saturating_sub(spent);
                        }
                    }
                    _ => {
                        stats.drop_one(-err);
                        p += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{MultiRecv, RecvPath, udp_socket};
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    #[test]
    fn control_messages_parse_as_the_kernel_lays_them_out() {
        // cmsghdr (len, level, type), then in_pktinfo (ifindex, spec_dst, addr), padded.
        let msg = |level: i32, kind: i32, addr: [u8; 4]| {
            let mut b = Vec::new();
            b.extend_from_slice(&(mem::size_of::<libc::cmsghdr>() + 12).to_ne_bytes());
            b.extend_from_slice(&level.to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(&7i32.to_ne_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&addr);
            b.resize(PKTINFO_SPACE, 0);
            b
        };
        let one = msg(libc::IPPROTO_IP, libc::IP_PKTINFO, [127, 9, 8, 7]);
        assert_eq!(pktinfo_dest(&one), Some(Ipv4Addr::new(127, 9, 8, 7)));
        // Another message first, then ours.
        let mut two = msg(libc::SOL_SOCKET, 1, [1, 2, 3, 4]);
        two.extend_from_slice(&one);
        assert_eq!(pktinfo_dest(&two), Some(Ipv4Addr::new(127, 9, 8, 7)));
        assert_eq!(pktinfo_dest(&[]), None);
        assert_eq!(pktinfo_dest(&one[..20]), None);
        assert_eq!(pktinfo_dest(&[0u8; 16]), None);
        assert_eq!(mem::size_of::<PktinfoCmsg>(), PKTINFO_SPACE);
    }

    /// One wildcard socket receives for many 127.x addresses, names each datagram's destination,
    /// and answers from that address.
    #[test]
    fn one_wildcard_socket_is_many_endpoints() {
        for path in [RecvPath::Uring, RecvPath::Poll] {
            let shared = udp_socket(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                false,
                None,
                None,
            )
            .unwrap();
            set_pktinfo(shared.as_raw_fd()).unwrap();
            let port = shared.local_addr().unwrap().port();
            let other =
                udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), false, None, None).unwrap();
            let std::net::SocketAddr::V4(other_addr) = other.local_addr().unwrap() else {
                unreachable!()
            };
            let mut rx = MultiRecv::with_dest_addrs(path, 64, 2048).unwrap();
            rx.add_socket(shared.as_raw_fd(), 5).unwrap();
            let peers: Vec<Ipv4Addr> = (1..=20).map(|i| Ipv4Addr::new(127, 3, 0, i)).collect();
            for (i, ip) in peers.iter().enumerate() {
                other
                    .send_to(format!("to {i}").as_bytes(), SocketAddrV4::new(*ip, port))
                    .unwrap();
            }
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.len() < peers.len() && Instant::now() < deadline {
                rx.poll(1, Duration::from_millis(5), |token, d| {
                    got.push((token, d.to, d.from, d.data.to_vec()))
                })
                .unwrap();
            }
            assert_eq!(got.len(), peers.len(), "{path}");
            for (i, (token, to, from, data)) in got.iter().enumerate() {
                assert_eq!(*token, 5);
                assert_eq!(*to, Some(peers[i]), "{path}");
                assert_eq!(*from, other_addr);
                assert_eq!(data, format!("to {i}").as_bytes());
            }
            // Answers leave from each peer's own address, single and batched.
            send_from_addr(shared.as_raw_fd(), peers[0], other_addr, b"single").unwrap();
            let mut s = SourcedSender::new(4);
            let items: Vec<(Ipv4Addr, SocketAddrV4, &[u8])> = peers
                .iter()
                .map(|ip| (*ip, other_addr, &b"batch"[..]))
                .collect();
            let mut stats = SendStats::default();
            s.send(shared.as_raw_fd(), &items, &mut stats);
            assert_eq!(stats.datagrams, 20);
            assert_eq!(stats.dropped, 0);
            other
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = other.recv_from(&mut buf).unwrap();
            assert_eq!(
                (&buf[..n], from),
                (&b"single"[..], SocketAddrV4::new(peers[0], port).into())
            );
            for ip in &peers {
                let (n, from) = other.recv_from(&mut buf).unwrap();
                assert_eq!(
                    (&buf[..n], from),
                    (&b"batch"[..], SocketAddrV4::new(*ip, port).into())
                );
            }
        }
    }
}
