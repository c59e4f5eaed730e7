//! Port probing at a `p2psp peer --nts` (issue 11) over real sockets, around the sans-IO
//! [`ProbePeer`]: the probe sockets a rendezvous asks for, the sends from them, and the one socket
//! kept per teammate reached that way, through which the team's traffic to and from that
//! teammate then goes ([`ProbeIo::route`], [`ProbeIo::recv`]).
//!
//! Bounded: at most [`MAX_SOCKETS`] probe sockets at once (a session's are closed when it ends),
//! of which at most [`MAX_KEPT`](crate::proto::nts_probe::MAX_KEPT) are kept; [`ProbeIo::recv`]
//! reads at most [`RECV_BUDGET`] datagrams per call.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::driver::{POLLIN, PollFd};
use crate::proto::Endpoint;
use crate::proto::nts::PeerId;
use crate::proto::nts_probe::{MAX_SOCKETS, ProbeAction, ProbePeer, SockRef};

/// Most datagrams [`ProbeIo::recv`] reads per call.
pub const RECV_BUDGET: usize = 256;

/// The probe sockets of one peer session.
#[derive(Debug)]
pub struct ProbeIo {
    /// The protocol core.
    pub core: ProbePeer,
    sockets: HashMap<u32, Vec<Option<UdpSocket>>>,
    bind: std::net::Ipv4Addr,
    /// Probe sockets that could not be opened.
    pub open_errors: u64,
}

impl ProbeIo {
    /// Probing for the peer `me` of `splitter`, whose team socket is bound to `local`.
    pub fn new(now: Instant, me: PeerId, splitter: Endpoint, local: SocketAddrV4) -> ProbeIo {
        // Room for the probe sockets beside everything else (a soft limit of 1024 is common).
        let _ = crate::driver::raise_nofile_limit(MAX_SOCKETS as u64 + 512);
        let seed = getrandom::u64().unwrap_or(0x9E37_79B9_7F4A_7C15);
        ProbeIo {
            core: ProbePeer::new(now, me, splitter, seed),
            sockets: HashMap::new(),
            bind: *local.ip(),
            open_errors: 0,
        }
    }

    fn socket(&self, s: SockRef) -> Option<&UdpSocket> {
        match s {
            SockRef::Main => None,
            SockRef::Probe { session, index } => self
                .sockets
                .get(&session)?
                .get(usize::from(index))?
                .as_ref(),
        }
    }

    /// The socket traffic to `to` goes from: a kept probe socket, or `main`.
    pub fn route<'a>(&'a self, main: &'a UdpSocket, to: Endpoint) -> &'a UdpSocket {
        self.core
            .route(to)
            .and_then(|s| self.socket(s))
            .unwrap_or(main)
    }

    /// Carries out what the core asks; `reached` gets each teammate reached at a probe socket.
    pub fn pump(&mut self, main: &UdpSocket, mut reached: impl FnMut(PeerId, Endpoint)) {
        while let Some(a) = self.core.poll_action() {
            match a {
                ProbeAction::Open { session, count } => {
                    let mut v = Vec::with_capacity(usize::from(count));
                    for _ in 0..count {
                        match UdpSocket::bind(SocketAddrV4::new(self.bind, 0))
                            .and_then(|s| s.set_nonblocking(true).map(|()| s))
                        {
                            Ok(s) => v.push(Some(s)),
                            Err(_) => {
                                self.open_errors += 1;
                                v.push(None);
                            }
                        }
                    }
                    self.sockets.insert(session, v);
                }
                ProbeAction::Send { from, to, data } => {
                    let s = match from {
                        SockRef::Main => Some(main),
                        p => self.socket(p),
                    };
                    if let Some(s) = s {
                        let _ = s.send_to(&data, to);
                    }
                }
                ProbeAction::SendEach { session, to, data } => {
                    for s in self.sockets.get(&session).into_iter().flatten().flatten() {
                        let _ = s.send_to(&data, to);
                    }
                }
                ProbeAction::SendMany {
                    from,
                    ip,
                    ports,
                    data,
                } => {
                    let s = match from {
                        SockRef::Main => Some(main),
                        p => self.socket(p),
                    };
                    if let Some(s) = s {
                        for p in ports {
                            let _ = s.send_to(&data, SocketAddrV4::new(ip, p));
                        }
                    }
                }
                ProbeAction::Close { session, keep } => match keep {
                    None => {
                        self.sockets.remove(&session);
                    }
                    Some(k) => {
                        if let Some(v) = self.sockets.get_mut(&session) {
                            for (i, s) in v.iter_mut().enumerate() {
                                if i != usize::from(k) {
                                    *s = None;
                                }
                            }
                        }
                    }
                },
                ProbeAction::Reached { id, endpoint, via } => {
                    tracing::info!(
                        "NTS: teammate {id} reached at {endpoint} by port probing ({via:?})"
                    );
                    reached(id, endpoint)
                }
            }
        }
    }

    /// Reads what arrived at the probe sockets (without waiting): probes go to the core; the
    /// rest (a kept socket's teammate traffic) is returned for NTS and DBS.
    pub fn recv(&mut self, now: Instant, buf: &mut [u8]) -> Vec<(Endpoint, Vec<u8>)> {
        let mut team = Vec::new();
        if self.sockets.is_empty() {
            return team;
        }
        let mut fds = Vec::new();
        let mut refs = Vec::new();
        for (&session, v) in &self.sockets {
            for (i, s) in v.iter().enumerate() {
                if let Some(s) = s {
                    fds.push(PollFd::new(s.as_raw_fd(), POLLIN));
                    refs.push(SockRef::Probe {
                        session,
                        index: i as u16,
                    });
                }
            }
        }
        if crate::driver::poll(&mut fds, Some(Duration::ZERO)).unwrap_or(0) == 0 {
            return team;
        }
        let mut budget = RECV_BUDGET;
        for (fd, via) in fds.iter().zip(refs) {
            if fd.revents() == 0 {
                continue;
            }
            while budget > 0 {
                let Some(s) = self.socket(via) else { break };
                match s.recv_from(buf) {
                    Ok((n, SocketAddr::V4(from))) => {
                        budget -= 1;
                        if !self.core.handle_datagram(now, via, from, &buf[..n]) {
                            team.push((from, buf[..n].to_vec()));
                        }
                    }
                    Ok(_) => budget -= 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        budget -= 1;
                    }
                }
            }
        }
        team
    }
}
