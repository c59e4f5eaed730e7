//! The compat join (reference-notes §3.1), peer side, and the stream-header fetch.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::driver;
use crate::io_util::is_transient;
use crate::proto::choice::{LOAD_PATH, Load, ProbeAnswer};
use crate::proto::wire::{JoinConfig, READY, ROLE_MONITOR, ROLE_PEER, STREAM_HEADER};

/// How long the splitter may take to answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A completed join.
#[derive(Debug)]
pub struct Joined {
    /// What the splitter sent.
    pub config: JoinConfig,
    /// The UDP socket, bound to the port of our TCP connection (our identity in the team).
    pub socket: UdpSocket,
    /// Its address.
    pub local: SocketAddrV4,
    /// The first `header_size` bytes of `GET /<channel>` from the source the splitter named.
    pub header: FetchedHeader,
    /// Where the header came from (to fetch it again when it changes).
    pub header_source: SocketAddrV4,
    /// The join connection, still open: [`Joined::ready`] completes the join.
    tcp: TcpStream,
    /// NTS (`--nts`): the incorporated peer's NTS state.
    pub nts: Option<super::nts::NtsSession>,
    /// IMS (`--ims`): the multicast group's socket.
    pub ims: Option<super::ims::ImsSocket>,
}

impl Joined {
    /// An IMS join ([`super::ims::join`]): `config` has no peers.
    pub(super) fn with_ims(
        config: JoinConfig,
        socket: UdpSocket,
        local: SocketAddrV4,
        header: FetchedHeader,
        header_source: SocketAddrV4,
        tcp: TcpStream,
        ims: super::ims::ImsSocket,
    ) -> Joined {
        Joined {
            config,
            socket,
            local,
            header,
            header_source,
            tcp,
            nts: None,
            ims: Some(ims),
        }
    }

    /// Sends the ready byte and closes the join connection. Call it after the hellos went out:
    /// our splitter adds the peer to its team (and so starts sending it chunks) on this byte, so
    /// every teammate already knows the newcomer when its first chunk is relayed. The reference
    /// splitter does not read it.
    pub fn ready(&mut self) {
        let _ = self.tcp.write_all(&[READY]);
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// Joins the team of `splitter`, giving it [`JOIN_TIMEOUT`] to answer.
pub fn join(splitter: SocketAddrV4, monitor: bool) -> anyhow::Result<Joined> {
    join_within(splitter, monitor, JOIN_TIMEOUT)
}

/// Joins the team of `splitter`, giving up when connecting or reading its configuration takes
/// longer than `timeout`.
pub fn join_within(
    splitter: SocketAddrV4,
    monitor: bool,
    timeout: Duration,
) -> anyhow::Result<Joined> {
    join_profile(splitter, monitor, timeout, false)
}

/// [`join_within`] under NTS when `nts` (reference-notes §6.4): after the configuration the
/// splitter sends a peer ID, and the peer is incorporated over UDP before the join completes.
/// Either way a splitter of the other profile is told apart and the join fails with one line
/// saying so.
pub fn join_profile(
    splitter: SocketAddrV4,
    monitor: bool,
    timeout: Duration,
    nts: bool,
) -> anyhow::Result<Joined> {
    join_profile_with(splitter, monitor, timeout, nts, false, 0)
}

/// [`join_profile`], with EMS (`ems`, reference-notes §6.5): the join starts with this peer's
/// private endpoint (its TCP source address and UDP port) and role, 7 bytes, instead of the
/// role byte. `nts_retries`: how many times an NTS peer may retry its incorporation from a new
/// UDP port (`N`, [`super::nts::incorporate`]); the returned socket is then the last one.
pub fn join_profile_with(
    splitter: SocketAddrV4,
    monitor: bool,
    timeout: Duration,
    nts: bool,
    ems: bool,
    nts_retries: u8,
) -> anyhow::Result<Joined> {
    let mut attempts = 0;
    let (mut tcp, socket, local) = loop {
        attempts += 1;
        let tcp = TcpStream::connect_timeout(&splitter.into(), timeout)
            .with_context(|| format!("cannot connect to the splitter at {splitter}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(1)))?;
        tcp.set_nodelay(true)?;
        let SocketAddr::V4(local) = tcp.local_addr()? else {
            bail!("not an IPv4 connection")
        };
        // Our team identity is the TCP source endpoint: bind UDP to the same port before asking
        // to join, so no chunk can arrive before we listen. The kernel picked the TCP port among
        // free TCP ports only: when that UDP port is taken, connect again from another one.
        // Without SO_REUSEADDR (unlike the reference): a UDP port shared with another socket
        // (another peer on this host whose connection to another splitter got the same local
        // port, or a local process waiting for it) would take our datagrams.
        match driver::udp_socket(local, false, Some(4 << 20), Some(4 << 20)) {
            Ok(socket) => break (tcp, socket, local),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 8 => {
                tracing::debug!(
                    "UDP port {} is taken; joining from another port",
                    local.port()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("cannot bind UDP {local}")),
        }
    };
    socket.set_nonblocking(false)?;
    if ems {
        let join = crate::proto::nts_ems::EmsJoin {
            private: local,
            monitor,
        };
        tcp.write_all(&join.encode())?;
    } else {
        tcp.write_all(&[if monitor { ROLE_MONITOR } else { ROLE_PEER }])?;
    }

    let (config, rest) = read_config_rest(&mut tcp, splitter, timeout).map_err(|e| {
        // EMS changes the join's first bytes, which the wire cannot announce: a splitter of the
        // other profile closes the connection (without --ems, at once) or waits for the rest
        // of a 7-byte join until its --join-timeout (with --ems).
        match (nts, ems) {
            (true, true) => anyhow::anyhow!(
                "{e:#} (this peer runs --ems: if the splitter does not, run the peer without --ems)"
            ),
            (true, false) => {
                anyhow::anyhow!("{e:#} (if the splitter runs --ems, run this peer with --ems too)")
            }
            _ => e,
        }
    })?;
    let nts_id = if nts {
        match super::nts::read_id(&mut tcp, rest, splitter) {
            Ok(id) => Some(id),
            Err(e) => {
                // A compat splitter may count us as a member by now.
                drop(tcp);
                for _ in 0..3 {
                    let _ = socket.send_to(crate::proto::wire::GOODBYE, splitter);
                }
                return Err(e);
            }
        }
    } else {
        if let Some(group) = crate::proto::ims::dbs_reads_ims(&config, &rest) {
            bail!(
                "the splitter at {splitter} runs IMS (its configuration ends with the multicast group {group}): run this peer with --ims, or the splitter without it"
            );
        }
        super::nts::refuse_nts_splitter(&mut tcp, &rest, splitter)?;
        None
    };
    // From here on a reference splitter already counts us as a member (it adds a peer as soon as
    // it has read the role byte): if we give up now, say goodbye so it stops sending to us.
    let fetched = config
        .check_usable()
        .map_err(|e| anyhow::anyhow!("cannot use the splitter at {splitter}: {e}"))
        .and_then(|()| {
            let mut source = config.source;
            if source.ip().is_unspecified() {
                source = SocketAddrV4::new(*splitter.ip(), source.port());
            }
            let header = fetch_header(source, &config.channel, usize::from(config.header_size))?;
            Ok((source, header))
        });
    let (source, header) = match fetched {
        Ok(f) => f,
        Err(e) => {
            drop(tcp);
            for _ in 0..5 {
                let _ = socket.send_to(crate::proto::wire::GOODBYE, splitter);
                std::thread::sleep(Duration::from_millis(100));
            }
            return Err(e);
        }
    };
    // Relays are this peer's bulk of sends; see `set_dont_fragment`. A tuning knob only.
    let datagram = crate::proto::wire::CHUNK_HEADER + usize::from(config.chunk_size);
    let _ = driver::set_dont_fragment(&socket, datagram);
    let mut joined = Joined {
        config,
        socket,
        local,
        header,
        header_source: source,
        tcp,
        nts: None,
        ims: None,
    };
    if let Some(id) = nts_id {
        let session = super::nts::incorporate(
            &mut joined.tcp,
            &mut joined.socket,
            &mut joined.local,
            &joined.config,
            id,
            splitter,
            monitor,
            nts_retries,
        )?;
        joined.nts = Some(session);
    }
    Ok(joined)
}

/// Asks `splitter` for its load (docs/scale-out.md), giving it `timeout` in all.
///
/// A reference splitter takes the probe for a join and sends its configuration: its team list
/// gives the load, and the prober says goodbye from the UDP port the splitter now counts as a
/// member's, so that it stops sending there.
pub fn probe_load(splitter: SocketAddrV4, timeout: Duration) -> anyhow::Result<Load> {
    let deadline = Instant::now() + timeout;
    let mut tcp = TcpStream::connect_timeout(&splitter.into(), timeout)
        .with_context(|| format!("cannot connect to the splitter at {splitter}"))?;
    let SocketAddr::V4(local) = tcp.local_addr()? else {
        bail!("not an IPv4 connection")
    };
    let udp = driver::udp_socket(local, false, None, None).ok();
    let request = format!("GET {LOAD_PATH} HTTP/1.0\r\nHost: {splitter}\r\n\r\n");
    tcp.write_all(request.as_bytes())?;
    let mut input = Vec::new();
    let mut closed = false;
    loop {
        match ProbeAnswer::decode(&input, closed) {
            ProbeAnswer::Ours(load) => return Ok(load),
            ProbeAnswer::Reference(load) => {
                drop(tcp);
                if let Some(u) = &udp {
                    for _ in 0..3 {
                        let _ = u.send_to(crate::proto::wire::GOODBYE, splitter);
                    }
                }
                return Ok(load);
            }
            ProbeAnswer::Bad => {
                bail!("the splitter at {splitter} answered the load probe with something else")
            }
            ProbeAnswer::NeedMore => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || closed || input.len() > 1 << 16 {
            bail!("the splitter at {splitter} did not answer the load probe within {timeout:?}");
        }
        tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk) {
            Ok(0) => closed = true,
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e) if is_transient(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("probing the splitter at {splitter}")),
        }
    }
}

/// Reads the splitter's join message from `tcp` (after the role byte was sent), waiting at most
/// `timeout`.
pub fn read_config(
    tcp: &mut TcpStream,
    splitter: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<JoinConfig> {
    read_config_rest(tcp, splitter, timeout).map(|(c, _)| c)
}

/// [`read_config`], also returning the bytes read after the configuration.
pub fn read_config_rest(
    tcp: &mut TcpStream,
    splitter: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<(JoinConfig, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    loop {
        if let Some((config, used)) = JoinConfig::decode(&buf)
            .map_err(|e| anyhow::anyhow!("the splitter sent a malformed configuration: {e}"))?
        {
            return Ok((config, buf.split_off(used)));
        }
        if Instant::now() >= deadline {
            bail!("the splitter at {splitter} sent no configuration within {timeout:?}");
        }
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk) {
            Ok(0) => {
                if let Some(group) = crate::proto::ims::looks_like_ims(&buf) {
                    bail!(
                        "the splitter at {splitter} runs IMS (its configuration ends with the multicast group {group}): run this peer with --ims, or the splitter without it"
                    );
                }
                bail!(
                    "the splitter at {splitter} closed the connection before sending its configuration: it refused the join (it may be full, see its --max-peers, or too busy)"
                )
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_transient(&e) => {}
            Err(e) => return Err(e).context("reading the splitter's configuration"),
        }
    }
}

/// Which stream a header starts, as our splitter says in its header response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamId {
    /// Counts the source's stream starts at the splitter.
    pub generation: u64,
    /// Chunks from this number on carry this stream from its first byte.
    pub first_chunk: u16,
    /// How many chunks of this stream the splitter had sent when it answered.
    pub chunks: u64,
}

/// A stream header as fetched from the source the splitter named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchedHeader {
    /// What a reference peer hands its player: the HTTP response head and the header bytes.
    pub raw: Vec<u8>,
    /// Which stream it starts, when the splitter is one of ours.
    pub stream: Option<StreamId>,
}

/// Most bytes read from a header endpoint that closes after the header (ours).
const MAX_HEADER_RESPONSE: usize = 1 << 20;

/// Reads the first `size` bytes of `GET /<channel>` from `source`, exactly as the reference peer
/// does (they include the HTTP response head, which the player needs).
///
/// Our splitter marks its answer with [`STREAM_HEADER`] and closes after the header; its answer is
/// read to the end instead, since after a source restart the header may differ in length from the
/// `size` the join message gave.
pub fn fetch_header(
    source: SocketAddrV4,
    channel: &str,
    size: usize,
) -> anyhow::Result<FetchedHeader> {
    fetch_header_within(source, channel, size, JOIN_TIMEOUT)
}

/// [`fetch_header`] with a time limit for connecting and for each read.
pub fn fetch_header_within(
    source: SocketAddrV4,
    channel: &str,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<FetchedHeader> {
    if size == 0 {
        return Ok(FetchedHeader::default());
    }
    let mut s = TcpStream::connect_timeout(&source.into(), timeout)
        .with_context(|| format!("cannot fetch the stream header from {source}"))?;
    s.set_read_timeout(Some(timeout))?;
    let request = format!(
        "GET /{} HTTP/1.1\r\nHost: {source}\r\nUser-Agent: p2psp/{}\r\nIcy-MetaData: 0\r\n\r\n",
        channel.trim_start_matches('/'),
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::with_capacity(size);
    let mut buf = [0u8; 16 * 1024];
    let mut ours: Option<Option<StreamId>> = None;
    loop {
        let limit = match ours {
            Some(Some(_)) => MAX_HEADER_RESPONSE,
            _ => size,
        };
        if raw.len() >= limit {
            break;
        }
        let want = (limit - raw.len()).min(buf.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(e).with_context(|| format!("reading the stream header from {source}"));
            }
        }
        if ours.is_none()
            && let Ok(Some((head, _))) = crate::http::ResponseHead::parse(&raw)
        {
            ours = Some(head.header(STREAM_HEADER).and_then(parse_stream_id));
        }
    }
    match ours {
        Some(Some(id)) => Ok(FetchedHeader {
            raw,
            stream: Some(id),
        }),
        _ if raw.len() < size => bail!(
            "the stream header from {source} ended after {} of {size} bytes",
            raw.len()
        ),
        _ => Ok(FetchedHeader { raw, stream: None }),
    }
}

/// Parses `<generation> <first chunk> <chunks sent>`.
fn parse_stream_id(v: &str) -> Option<StreamId> {
    let mut it = v.split_ascii_whitespace();
    let id = StreamId {
        generation: it.next()?.parse().ok()?,
        first_chunk: it.next()?.parse().ok()?,
        chunks: it.next()?.parse().ok()?,
    };
    it.next().is_none().then_some(id)
}

impl StreamId {
    /// Whether a peer whose playout is at chunk `played` has not reached this stream's first
    /// chunk yet (the stream started after the chunks it is playing now).
    pub fn ahead_of(&self, played: u16) -> bool {
        if self.chunks >= 32768 {
            return false;
        }
        // The splitter's newest chunk when it answered, and how far playout is behind it.
        let newest = self
            .first_chunk
            .wrapping_add(self.chunks as u16)
            .wrapping_sub(1);
        let behind = crate::proto::seq::diff(newest, played);
        (self.chunks as i64) <= i64::from(behind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids() {
        assert_eq!(
            parse_stream_id("3 65535 0000000012"),
            Some(StreamId {
                generation: 3,
                first_chunk: 65535,
                chunks: 12
            })
        );
        assert_eq!(parse_stream_id("3 1"), None);
        assert_eq!(parse_stream_id("x 1 2"), None);
        assert_eq!(parse_stream_id("1 2 3 4"), None);
    }

    #[test]
    fn stream_ahead_of_playout() {
        // Stream starts at chunk 65530, 10 chunks sent: the splitter is at chunk 3.
        let id = StreamId {
            generation: 2,
            first_chunk: 65530,
            chunks: 10,
        };
        assert!(id.ahead_of(65529));
        assert!(id.ahead_of(65400));
        assert!(!id.ahead_of(65530));
        assert!(!id.ahead_of(2));
        // No chunk of the new stream sent yet: whatever is playing is older.
        let fresh = StreamId { chunks: 0, ..id };
        assert!(fresh.ahead_of(65529));
        // A stream started long ago is never ahead.
        let old = StreamId {
            chunks: 1 << 20,
            ..id
        };
        assert!(!old.ahead_of(65529));
    }
}
