//! IMS, the IP Multicast Set (reference-notes §3.2, §6.1): a LAN team whose chunks the splitter
//! sends once each to an IP multicast group; peers only listen, never relay.
//!
//! TCP join, splitter → peer: the core configuration of the reference's `Splitter_core` (no
//! monitor count, no peer list) followed by the group, then the splitter reads one byte and
//! closes (the reference IMS peer sends no role byte first, so that byte is its later `R`):
//!
//! ```text
//! IPv4 source | u16 port | u16 len | channel | u16 header size (bytes) | u16 chunk size
//! | u16 buffer size (chunks) | IPv4 group | u16 group port
//! ```
//!
//! UDP: chunks are `u16 chunk number ‖ payload` as in DBS, sent to the group (default
//! 224.0.0.1:8001, TTL 1). [`ImsFilter`] is the peer's rule for what it takes from the group.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::Endpoint;
use super::wire::{
    CHUNK_HEADER, JoinConfig, MIN_CHUNK_SIZE, WireError, get_endpoint, get_u16, put_endpoint,
};

/// The reference's default group (`Splitter_IMS::kMCastAddr`, "all systems on this subnet").
pub const DEFAULT_GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(224, 0, 0, 1), 8001);
/// The reference's default multicast TTL: the LAN only.
pub const DEFAULT_TTL: u32 = 1;

/// What an IMS splitter tells a joining peer (reference-notes §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImsConfig {
    /// Where the peer fetches the stream header with `GET /<channel>`.
    pub source: SocketAddrV4,
    /// The channel (the source's mount, without the leading `/`).
    pub channel: String,
    /// Bytes the peer relays from `GET /<channel>` to its player before the first chunk.
    pub header_size: u16,
    /// Payload bytes per chunk.
    pub chunk_size: u16,
    /// Playout buffer size in chunks.
    pub buffer_size: u16,
    /// The multicast group and port the chunks go to.
    pub group: SocketAddrV4,
}

impl ImsConfig {
    /// Length of the encoded message.
    pub fn encoded_len(&self) -> usize {
        6 + 2 + self.channel.len() + 2 * 3 + 6
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let channel_len = u16::try_from(self.channel.len()).map_err(|_| WireError::TooLong {
            what: "the channel name length",
            len: self.channel.len(),
        })?;
        out.reserve(self.encoded_len());
        put_endpoint(out, self.source);
        out.extend_from_slice(&channel_len.to_be_bytes());
        out.extend_from_slice(self.channel.as_bytes());
        for v in [self.header_size, self.chunk_size, self.buffer_size] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        put_endpoint(out, self.group);
        Ok(())
    }

    /// Decodes a configuration from the start of `buf`. `Ok(None)` means more bytes are needed;
    /// `Ok(Some((config, used)))` gives the configuration and how many bytes it took. Whether the
    /// values are usable is [`ImsConfig::check_usable`]'s business.
    pub fn decode(buf: &[u8]) -> Result<Option<(ImsConfig, usize)>, WireError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let channel_len = usize::from(get_u16(buf, 6));
        let fixed = 8 + channel_len;
        let end = fixed + 6 + 6;
        if buf.len() < end {
            return Ok(None);
        }
        let channel = std::str::from_utf8(&buf[8..fixed])
            .map_err(|_| WireError::ChannelNotUtf8)?
            .to_owned();
        let config = ImsConfig {
            source: get_endpoint(buf),
            channel,
            header_size: get_u16(buf, fixed),
            chunk_size: get_u16(buf, fixed + 2),
            buffer_size: get_u16(buf, fixed + 4),
            group: get_endpoint(&buf[fixed + 6..]),
        };
        Ok(Some((config, end)))
    }

    /// Checks what a peer of this project needs, with a message naming the problem. A splitter
    /// that is not an IMS splitter (its monitor count and peer list read as a group) fails here.
    pub fn check_usable(&self) -> Result<(), String> {
        check_group(self.group).map_err(|e| format!("the group in its configuration, {e}"))?;
        self.as_join_config().check_usable()
    }

    /// The same configuration as a DBS join message with no monitors and no peers, which is
    /// what the rest of the peer plays from.
    pub fn as_join_config(&self) -> JoinConfig {
        JoinConfig {
            source: self.source,
            channel: self.channel.clone(),
            header_size: self.header_size,
            chunk_size: self.chunk_size,
            buffer_size: self.buffer_size,
            monitors: 0,
            peers: Vec::new(),
        }
    }
}

/// Checks a multicast group: an IPv4 multicast address (224.0.0.0/4) and a port other than 0.
pub fn check_group(group: SocketAddrV4) -> Result<(), String> {
    if !group.ip().is_multicast() {
        return Err(format!(
            "{group}: not an IPv4 multicast address (224.0.0.0 to 239.255.255.255)"
        ));
    }
    if group.port() == 0 {
        return Err(format!("{group}: the port is 0"));
    }
    Ok(())
}

/// Parses `GROUP:PORT` (`239.1.2.3:8001`) and checks it with [`check_group`].
pub fn parse_group(s: &str) -> Result<SocketAddrV4, String> {
    let group: SocketAddrV4 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not an IPv4 GROUP:PORT (try 239.0.0.1:8001)"))?;
    check_group(group)?;
    Ok(group)
}

/// Whether bytes a DBS peer read before the splitter closed the connection are exactly an IMS
/// configuration (a DBS decoder takes the group for the monitor count and the number of peers,
/// then waits for a peer list that never comes): the group, if so.
pub fn looks_like_ims(buf: &[u8]) -> Option<SocketAddrV4> {
    match ImsConfig::decode(buf) {
        Ok(Some((c, used))) if used == buf.len() && check_group(c.group).is_ok() => Some(c.group),
        _ => None,
    }
}

/// Whether a DBS peer's decoding of a join message as `config`, followed by the bytes `rest`, is
/// in fact an IMS configuration (a group whose low 16 bits are 0 reads as "no peers", and its
/// port is left over): the group, if so.
pub fn dbs_reads_ims(config: &JoinConfig, rest: &[u8]) -> Option<SocketAddrV4> {
    if !config.peers.is_empty() {
        return None;
    }
    let mut all = Vec::with_capacity(config.encoded_len() + rest.len());
    config.encode(&mut all).ok()?;
    all.extend_from_slice(rest);
    looks_like_ims(&all)
}

/// Where an IMS peer received a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// On the multicast group's socket.
    Group,
    /// On the peer's own unicast socket (its team identity; goodbyes with the splitter).
    Unicast,
}

/// What an IMS peer's filter counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImsCounters {
    /// Chunks taken from the group.
    pub group_chunks: u64,
    /// Datagrams on the group from an address other than the splitter's (dropped).
    pub group_strangers: u64,
    /// Datagrams on the group from the splitter's address that are not chunks (dropped).
    pub group_malformed: u64,
    /// Datagrams on the unicast socket from anyone but the splitter (dropped: IMS peers have no
    /// neighbours, so hellos and chunks from other peers are not wanted).
    pub unicast_strangers: u64,
}

impl ImsCounters {
    /// Datagrams dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.group_strangers + self.group_malformed + self.unicast_strangers
    }
}

impl std::ops::Add for ImsCounters {
    type Output = ImsCounters;
    fn add(self, o: ImsCounters) -> ImsCounters {
        ImsCounters {
            group_chunks: self.group_chunks + o.group_chunks,
            group_strangers: self.group_strangers + o.group_strangers,
            group_malformed: self.group_malformed + o.group_malformed,
            unicast_strangers: self.unicast_strangers + o.unicast_strangers,
        }
    }
}

/// An IMS peer's rule for what reaches its DBS core: chunks from the group when they come from
/// the splitter's address (from any port: the reference IMS splitter sends from an unbound
/// socket; or from 0.0.0.0, as multicast over `lo` leaves), and only the splitter's own datagrams on the unicast socket. Everything else is
/// counted and dropped, so the peer never learns a neighbour and never relays.
#[derive(Debug, Clone)]
pub struct ImsFilter {
    splitter: Endpoint,
    chunk_len: usize,
    counters: ImsCounters,
}

impl ImsFilter {
    /// A filter for a team of `splitter` whose chunk datagrams are `chunk_len` bytes (the chunk
    /// header, the payload and any signature).
    pub fn new(splitter: Endpoint, chunk_len: usize) -> ImsFilter {
        ImsFilter {
            splitter,
            chunk_len: chunk_len.max(CHUNK_HEADER + MIN_CHUNK_SIZE),
            counters: ImsCounters::default(),
        }
    }

    /// Whether to hand a `len`-byte datagram from `from` to the core, and as coming from whom
    /// (a chunk from the group is the splitter's, whatever its source port).
    pub fn admit(&mut self, via: Via, from: Endpoint, len: usize) -> Option<Endpoint> {
        match via {
            // Over `lo` with no source address on the route, Linux sends multicast from 0.0.0.0.
            Via::Group if from.ip() != self.splitter.ip() && !from.ip().is_unspecified() => {
                self.counters.group_strangers += 1;
                None
            }
            Via::Group if len != self.chunk_len => {
                self.counters.group_malformed += 1;
                None
            }
            Via::Group => {
                self.counters.group_chunks += 1;
                Some(self.splitter)
            }
            Via::Unicast if from == self.splitter => Some(from),
            Via::Unicast => {
                self.counters.unicast_strangers += 1;
                None
            }
        }
    }

    /// What it counted.
    pub fn counters(&self) -> &ImsCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::hex;

    fn sample() -> ImsConfig {
        ImsConfig {
            source: "127.0.0.1:8000".parse().unwrap(),
            channel: "test.ogg".into(),
            header_size: 1024,
            chunk_size: 1024,
            buffer_size: 256,
            group: DEFAULT_GROUP,
        }
    }

    #[test]
    fn layout_is_the_core_configuration_then_the_group() {
        // Splitter_core::SendConfiguration, then Splitter_IMS::SendMcastGroup (§3.2).
        let want = hex("7f000001 1f40 0008 746573742e6f6767 0400 0400 0100 e0000001 1f41");
        let mut out = Vec::new();
        sample().encode(&mut out).unwrap();
        assert_eq!(out, want);
        assert_eq!(out.len(), sample().encoded_len());
        assert_eq!(ImsConfig::decode(&want), Ok(Some((sample(), want.len()))));
        for cut in 0..want.len() {
            assert_eq!(ImsConfig::decode(&want[..cut]), Ok(None), "{cut}");
        }
        assert_eq!(looks_like_ims(&want), Some(DEFAULT_GROUP));
        assert_eq!(sample().check_usable(), Ok(()));
    }

    #[test]
    fn a_dbs_configuration_is_not_taken_for_ims() {
        // The DBS message of reference-notes §3.1 (1 monitor, 2 peers): read as IMS, the
        // "group" is 0.1.0.2, no multicast address.
        let dbs = hex(
            "7f000001 1f40 0008 746573742e6f6767 0400 0400 0100 0001 0002 7f000001 c903 7f000001 a085",
        );
        let (c, _) = ImsConfig::decode(&dbs).unwrap().unwrap();
        let e = c.check_usable().unwrap_err();
        assert!(e.contains("not an IPv4 multicast address"), "{e}");
        assert_eq!(looks_like_ims(&dbs), None);
    }

    #[test]
    fn a_group_that_reads_as_an_empty_dbs_team_is_told_apart() {
        let c = ImsConfig {
            group: "239.1.0.0:9100".parse().unwrap(),
            ..sample()
        };
        let mut out = Vec::new();
        c.encode(&mut out).unwrap();
        let (dbs, used) = JoinConfig::decode(&out).unwrap().unwrap();
        assert_eq!((dbs.monitors, dbs.peers.len()), (0xef01, 0));
        assert_eq!(dbs_reads_ims(&dbs, &out[used..]), Some(c.group));
        assert_eq!(dbs_reads_ims(&dbs, &[]), None);
    }

    #[test]
    fn groups() {
        assert_eq!(
            parse_group("239.0.0.1:9000"),
            Ok("239.0.0.1:9000".parse().unwrap())
        );
        assert!(
            parse_group("198.18.0.1:9000")
                .unwrap_err()
                .contains("multicast")
        );
        assert!(
            parse_group("239.0.0.1:0")
                .unwrap_err()
                .contains("port is 0")
        );
        assert!(parse_group("239.0.0.1").unwrap_err().contains("GROUP:PORT"));
    }

    #[test]
    fn the_filter_admits_the_splitters_chunks_only() {
        let splitter: Endpoint = "198.18.0.1:8001".parse().unwrap();
        let mut f = ImsFilter::new(splitter, 2 + 1024);
        let other_port: Endpoint = "198.18.0.1:40000".parse().unwrap();
        let stranger: Endpoint = "198.18.0.9:8001".parse().unwrap();
        assert_eq!(f.admit(Via::Group, other_port, 1026), Some(splitter));
        assert_eq!(f.admit(Via::Group, stranger, 1026), None);
        assert_eq!(f.admit(Via::Group, splitter, 1), None);
        assert_eq!(f.admit(Via::Unicast, splitter, 1), Some(splitter));
        assert_eq!(f.admit(Via::Unicast, other_port, 1), None);
        assert_eq!(
            *f.counters(),
            ImsCounters {
                group_chunks: 1,
                group_strangers: 1,
                group_malformed: 1,
                unicast_strangers: 1
            }
        );
    }
}
