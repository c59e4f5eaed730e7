//! The compat join (reference-notes §3.1), peer side, and the stream-header fetch.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::driver;
use crate::proto::wire::{JoinConfig, READY, ROLE_MONITOR, ROLE_PEER};

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
    pub header: Vec<u8>,
    /// The join connection, still open: [`Joined::ready`] completes the join.
    tcp: TcpStream,
}

impl Joined {
    /// Sends the ready byte and closes the join connection. Call it after the hellos went out:
    /// our splitter adds the peer to its team (and so starts sending it chunks) on this byte, so
    /// every teammate already knows the newcomer when its first chunk is relayed. The reference
    /// splitter does not read it.
    pub fn ready(&mut self) {
        let _ = self.tcp.write_all(&[READY]);
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// Joins the team of `splitter`.
pub fn join(splitter: SocketAddrV4, monitor: bool) -> anyhow::Result<Joined> {
    // Our team identity is the TCP source endpoint: bind UDP to the same port before asking to
    // join, so no chunk can arrive before we listen. Without SO_REUSEADDR: a UDP port shared with
    // another socket (another peer on this host whose TCP connection got the same local port for
    // another splitter, or a local process waiting for it) would take our datagrams. If the port
    // is taken, a new connection gets another one.
    let mut attempt = 0;
    let (mut tcp, local, socket) = loop {
        attempt += 1;
        let tcp = TcpStream::connect_timeout(&splitter.into(), JOIN_TIMEOUT)
            .with_context(|| format!("cannot connect to the splitter at {splitter}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(1)))?;
        tcp.set_nodelay(true)?;
        let SocketAddr::V4(local) = tcp.local_addr()? else {
            bail!("not an IPv4 connection")
        };
        match driver::udp_socket(local, false, Some(4 << 20), Some(4 << 20)) {
            Ok(socket) => break (tcp, local, socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < 8 => {
                tracing::info!("UDP port {} is taken here; reconnecting", local.port());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot bind UDP {local}")),
        }
    };
    socket.set_nonblocking(false)?;
    tcp.write_all(&[if monitor { ROLE_MONITOR } else { ROLE_PEER }])?;

    let deadline = Instant::now() + JOIN_TIMEOUT;
    let mut buf = Vec::new();
    let config = loop {
        if let Some((config, _)) = JoinConfig::decode(&buf)
            .map_err(|e| anyhow::anyhow!("the splitter sent a malformed configuration: {e}"))?
        {
            break config;
        }
        if Instant::now() >= deadline {
            bail!("the splitter at {splitter} sent no configuration within {JOIN_TIMEOUT:?}");
        }
        let mut chunk = [0u8; 4096];
        match tcp.read(&mut chunk) {
            Ok(0) => bail!(
                "the splitter at {splitter} closed the connection before sending its configuration: it refused the join (it may be full, see its --max-peers, or too busy)"
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("reading the splitter's configuration"),
        }
    };
    config
        .check_usable()
        .map_err(|e| anyhow::anyhow!("cannot use the splitter at {splitter}: {e}"))?;
    // The hellos go out from the caller's core before the ready byte; the header comes first.
    let mut source = config.source;
    if source.ip().is_unspecified() {
        source = SocketAddrV4::new(*splitter.ip(), source.port());
    }
    let header = fetch_header(source, &config.channel, usize::from(config.header_size))?;
    Ok(Joined {
        config,
        socket,
        local,
        header,
        tcp,
    })
}

/// Reads the first `size` bytes of `GET /<channel>` from `source`, exactly as the reference peer
/// does (they include the HTTP response head, which the player needs).
pub fn fetch_header(source: SocketAddrV4, channel: &str, size: usize) -> anyhow::Result<Vec<u8>> {
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut s = TcpStream::connect_timeout(&source.into(), JOIN_TIMEOUT)
        .with_context(|| format!("cannot fetch the stream header from {source}"))?;
    s.set_read_timeout(Some(JOIN_TIMEOUT))?;
    let request = format!(
        "GET /{} HTTP/1.1\r\nHost: {source}\r\nUser-Agent: p2psp/{}\r\nIcy-MetaData: 0\r\n\r\n",
        channel.trim_start_matches('/'),
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(request.as_bytes())?;
    let mut header = vec![0u8; size];
    let mut got = 0;
    while got < size {
        match s.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                return Err(e).with_context(|| format!("reading the stream header from {source}"));
            }
        }
    }
    if got < size {
        bail!("the stream header from {source} ended after {got} of {size} bytes");
    }
    Ok(header)
}
