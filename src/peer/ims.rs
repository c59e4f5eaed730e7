//! `p2psp peer --ims`: the peer side of IMS (reference-notes §3.2, §6.1) over real sockets.
//!
//! The join reads the core configuration and the multicast group ([`ImsConfig`]); the peer binds
//! the group's port (on the group's address, so that only the group's datagrams arrive there),
//! joins the group on the interface it reaches the splitter by, and plays what the splitter sends
//! to the group. Its unicast socket, bound to the port of its join connection as a DBS peer's,
//! carries only its goodbye and the splitter's. [`ImsFilter`] keeps everything else out, so the
//! peer never learns a neighbour and relays nothing.
//!
//! Our peer sends the role byte `P` first, as a DBS peer (the reference IMS splitter reads one
//! byte after the configuration, whichever it is; the reference IMS peer sends none and ours
//! takes a silent connection for such a join).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::join::{self, Joined};
use crate::driver::{self, PollFd};
use crate::proto::ims::{ImsConfig, ImsCounters, ImsFilter, Via};
use crate::proto::wire::{CHUNK_HEADER, GOODBYE, ROLE_PEER};

/// The multicast side of an IMS team session.
#[derive(Debug)]
pub struct ImsSocket {
    /// Bound to the group's address and port, a member of the group.
    pub socket: UdpSocket,
    /// The group.
    pub group: SocketAddrV4,
    /// What reaches the DBS core.
    pub filter: ImsFilter,
}

fn wrong_profile(splitter: SocketAddrV4, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the splitter at {splitter} does not run IMS ({what}): run this peer without --ims, or the splitter with --ims GROUP:PORT"
    )
}

/// Joins the IMS team of `splitter`, giving up when connecting or reading its configuration
/// takes longer than `timeout`. A splitter of another profile is told apart with one line.
pub fn join(splitter: SocketAddrV4, timeout: Duration, trailer: usize) -> anyhow::Result<Joined> {
    let mut tcp = TcpStream::connect_timeout(&splitter.into(), timeout)
        .with_context(|| format!("cannot connect to the splitter at {splitter}"))?;
    tcp.set_read_timeout(Some(Duration::from_millis(100)))?;
    tcp.set_nodelay(true)?;
    let SocketAddr::V4(local) = tcp.local_addr()? else {
        bail!("not an IPv4 connection")
    };
    // Our unicast identity, as a DBS peer's: the splitter confirms our goodbye there.
    let socket = driver::udp_socket(local, false, None, None)
        .with_context(|| format!("cannot bind UDP {local}"))?;
    socket.set_nonblocking(false)?;
    tcp.write_all(&[ROLE_PEER])?;
    let config = read_config(&mut tcp, splitter, timeout)?;
    let say_goodbye = |e: anyhow::Error| {
        // A DBS splitter may count us as a member by now.
        for _ in 0..3 {
            let _ = socket.send_to(GOODBYE, splitter);
        }
        e
    };
    config
        .check_usable()
        .map_err(|e| say_goodbye(wrong_profile(splitter, &e)))?;
    let mut source = config.source;
    if source.ip().is_unspecified() {
        source = SocketAddrV4::new(*splitter.ip(), source.port());
    }
    let header = join::fetch_header(source, &config.channel, usize::from(config.header_size))
        .map_err(say_goodbye)?;
    let group = config.group;
    let msocket = driver::udp_socket_reuse_addr(group, Some(4 << 20), None)
        .with_context(|| format!("cannot bind UDP {group} for the multicast group"))?;
    msocket
        .join_multicast_v4(group.ip(), local.ip())
        .with_context(|| {
            format!(
                "cannot join the multicast group {} on the interface of {}",
                group.ip(),
                local.ip()
            )
        })?;
    let chunk_len = CHUNK_HEADER + usize::from(config.chunk_size) + trailer;
    let ims = ImsSocket {
        socket: msocket,
        group,
        filter: ImsFilter::new(splitter, chunk_len),
    };
    Ok(Joined::with_ims(
        config.as_join_config(),
        socket,
        local,
        header,
        source,
        tcp,
        ims,
    ))
}

/// Reads the IMS configuration; a DBS or NTS splitter sends more after it (a peer list, an ID),
/// or closes before it is complete.
fn read_config(
    tcp: &mut TcpStream,
    splitter: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<ImsConfig> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut decoded: Option<(ImsConfig, usize)> = None;
    // Once complete, wait a little for what a splitter of another profile sends after it.
    let mut settle: Option<Instant> = None;
    loop {
        if decoded.is_none() {
            decoded = ImsConfig::decode(&buf).map_err(|e| {
                anyhow::anyhow!("the splitter at {splitter} sent a malformed configuration: {e}")
            })?;
            if let Some((c, _)) = &decoded
                && let Err(e) = c.check_usable()
            {
                bail!(wrong_profile(splitter, &e));
            }
        }
        if let Some((_, used)) = &decoded {
            if buf.len() > *used {
                bail!(wrong_profile(
                    splitter,
                    "it sent more after the configuration and group: a peer list or an NTS ID"
                ));
            }
            let until = *settle.get_or_insert_with(|| Instant::now() + Duration::from_millis(200));
            if Instant::now() >= until {
                return Ok(decoded.take().expect("decoded above").0);
            }
        }
        if Instant::now() >= deadline {
            bail!("the splitter at {splitter} sent no configuration within {timeout:?}");
        }
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk) {
            Ok(0) if decoded.is_some() => {
                // A reference IMS splitter closes after our role byte, taken as its ready byte.
                return Ok(decoded.take().expect("decoded above").0);
            }
            Ok(0) => bail!(wrong_profile(
                splitter,
                &format!(
                    "it closed the join connection after {} bytes, before a configuration with a multicast group",
                    buf.len()
                )
            )),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if crate::io_util::is_transient(&e) => {}
            Err(e) => return Err(e).context("reading the splitter's configuration"),
        }
    }
}

impl ImsSocket {
    /// Waits up to `wait` for a datagram on either socket and returns the first one the filter
    /// admits, as coming from the endpoint it names; `WouldBlock` when none did.
    pub fn recv(
        &mut self,
        unicast: &UdpSocket,
        buf: &mut [u8],
        wait: Duration,
    ) -> std::io::Result<(usize, SocketAddr)> {
        let mut fds = [
            PollFd::new(self.socket.as_raw_fd(), driver::POLLIN),
            PollFd::new(unicast.as_raw_fd(), driver::POLLIN),
        ];
        driver::poll(&mut fds, Some(wait))?;
        for (i, via) in [Via::Group, Via::Unicast].into_iter().enumerate() {
            if fds[i].revents() == 0 {
                continue;
            }
            let socket = if via == Via::Group {
                &self.socket
            } else {
                unicast
            };
            match socket.recv_from(buf) {
                Ok((n, SocketAddr::V4(from))) => {
                    if let Some(from) = self.filter.admit(via, from, n) {
                        return Ok((n, SocketAddr::V4(from)));
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Err(ErrorKind::WouldBlock.into())
    }

    /// What the filter counted.
    pub fn counters(&self) -> ImsCounters {
        *self.filter.counters()
    }
}
