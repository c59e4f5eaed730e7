//! The data path: batched UDP sends, many-socket receives, and the few system calls the standard
//! library lacks. This is the crate's only module with `unsafe` code; every `unsafe` block carries a
//! `// SAFETY:` comment (enforced by `clippy::undocumented_unsafe_blocks` below).
//!
//! - [`BatchSender`]: one payload to many peers (or one payload each), over io_uring `Send` or
//!   `sendmmsg(2)` ([`SendPath`]).
//! - [`MultiRecv`]: receive on thousands of UDP sockets from one thread, over io_uring multishot
//!   `RecvMsg` with a shared provided-buffer ring, or `epoll` + `recvmmsg(2)` ([`RecvPath`]).
//! - [`SourcedSender`], [`send_from_addr`], [`set_pktinfo`], [`MultiRecv::with_dest_addrs`]:
//!   `IP_PKTINFO`, so that one socket on the wildcard address is many local endpoints.
//! - System helpers: [`udp_socket`], [`tcp_listener`], [`raise_nofile_limit`], [`poll`],
//!   [`thread_cpu_time`], [`monotonic_ns`].
//!
//! # Memory lent to the kernel
//!
//! Every address handed to the kernel stays valid until the kernel is done with it:
//!
//! - **Sends.** The sockaddr array, iovecs and `mmsghdr`s live in fixed-size boxed slices owned by
//!   the [`BatchSender`] (allocated once in [`BatchSender::new`], never resized), and the payloads
//!   are borrowed by the call. `sendmmsg` is synchronous. On the io_uring path each call reaps the
//!   completion of every entry it submitted before it returns; if the ring ever refused to hand
//!   them back (only possible through a kernel or programming error, see
//!   [`BatchSender::send_to_all`]) the process aborts rather than return while the kernel might
//!   still read the caller's payload.
//! - **Receives.** The provided buffers, their ring and the `msghdr` template are owned by the
//!   [`MultiRecv`] and freed only after every request on the ring has completed (cancelled on
//!   drop). If that cannot be confirmed, they are leaked instead of freed. A [`Datagram`] borrows a
//!   buffer only until the callback returns; the buffer goes back to the kernel after that.
//!
//! # Threads
//!
//! Both io_uring users build their ring with `IORING_SETUP_SINGLE_ISSUER` (and, for receiving,
//! `DEFER_TASKRUN`), created disabled and enabled by the first thread that uses it. So a sender or
//! receiver may be built on one thread and moved to the thread that runs it. A [`BatchSender`]
//! moved again after its first send builds a fresh ring; a [`MultiRecv`] used from a second thread
//! returns an error.

#![deny(clippy::undocumented_unsafe_blocks)]

mod path;
mod pktinfo;
mod recv;
mod recv_epoll;
mod recv_uring;
mod send;
mod slots;
mod sys;

pub use pktinfo::{SourcedSender, send_from_addr, set_pktinfo};
pub use recv::{Datagram, MultiRecv, PollOutcome, RecvPath, RecvStats};
pub use send::{BatchSender, EAGAIN_WAIT_BUDGET, MAX_BATCH, SendPath, SendStats};
pub use sys::{
    DONT_FRAGMENT_MAX, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, PollFd, Waker, check_realtime,
    monotonic_ns, poll, raise_nofile_limit, realtime_priority, set_dont_fragment, set_realtime,
    set_thread_slice, set_timer_slack, tcp_listener, thread_cpu_time, thread_slice, udp_socket,
    udp_socket_reuse_addr,
};
