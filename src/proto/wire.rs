//! Byte layouts of the `compat` profile (reference-notes §3.1 and §4.1). All integers big-endian,
//! addresses IPv4.
//!
//! TCP join, peer → splitter: one role byte ([`ROLE_PEER`] or [`ROLE_MONITOR`]).
//! Splitter → peer: a [`JoinConfig`]:
//!
//! ```text
//! IPv4 source | u16 port | u16 len | channel | u16 header size (bytes) | u16 chunk size
//! | u16 buffer size (chunks) | u16 monitors | u16 N | N × (IPv4 | u16 port)
//! ```
//!
//! UDP: a chunk is `u16 chunk number ‖ chunk-size payload`, relayed byte-identical; a hello is the
//! single byte `H`, a goodbye `G`, a loss report (monitor → splitter) a bare `u16` chunk number.
//! Nothing carries a type: messages are told apart by length, which is why the chunk size must be
//! at least [`MIN_CHUNK_SIZE`].

use std::net::{Ipv4Addr, SocketAddrV4};

/// Role byte a peer sends when it joins.
pub const ROLE_PEER: u8 = b'P';
/// Role byte a monitor sends when it joins.
pub const ROLE_MONITOR: u8 = b'M';
/// The byte a peer sends after reading the configuration (the reference splitter never reads it).
pub const READY: u8 = b'R';
/// Hello datagram, sent by a new peer to every peer in the list it received.
pub const HELLO: &[u8] = b"H";
/// Goodbye datagram: peer → splitter and peers when leaving; splitter → peer as confirmation.
pub const GOODBYE: &[u8] = b"G";
/// Bytes before the payload in a chunk datagram.
pub const CHUNK_HEADER: usize = 2;
/// Smallest chunk size that cannot be confused with a control message.
pub const MIN_CHUNK_SIZE: usize = 64;
/// Largest chunk size: the datagram must fit one UDP payload (65507 bytes).
pub const MAX_CHUNK_SIZE: usize = 65507 - CHUNK_HEADER;
/// Size of a loss report datagram.
pub const LOSS_REPORT_LEN: usize = 2;

/// HTTP response header with which our splitter marks its answer to `GET /<channel>` (the stream
/// header), naming the stream that header starts: `<generation> <first chunk number> <chunks of it
/// sent so far>`. The splitter writes it, the peer reads it; the reference splitter never sends it.
pub const STREAM_HEADER: &str = "X-P2PSP-Stream";

/// Why bytes could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The channel name is not UTF-8.
    #[error("the channel name is not UTF-8")]
    ChannelNotUtf8,
    /// A field does not fit its 16-bit length or count.
    #[error("{what} is {len}, more than the 65535 a u16 field can carry")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length or count.
        len: usize,
    },
}

/// What a splitter tells a joining peer (reference-notes §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinConfig {
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
    /// How many of the first entries of `peers` are monitors.
    pub monitors: u16,
    /// The team's current members, monitors first; the peer says hello to each.
    pub peers: Vec<SocketAddrV4>,
}

pub(crate) fn put_endpoint(out: &mut Vec<u8>, ep: SocketAddrV4) {
    out.extend_from_slice(&ep.ip().octets());
    out.extend_from_slice(&ep.port().to_be_bytes());
}

pub(crate) fn get_endpoint(b: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    )
}

pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

impl JoinConfig {
    /// Length of the encoded message.
    pub fn encoded_len(&self) -> usize {
        6 + 2 + self.channel.len() + 2 * 5 + 6 * self.peers.len()
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let channel_len = u16::try_from(self.channel.len()).map_err(|_| WireError::TooLong {
            what: "the channel name length",
            len: self.channel.len(),
        })?;
        let peers = u16::try_from(self.peers.len()).map_err(|_| WireError::TooLong {
            what: "the number of peers",
            len: self.peers.len(),
        })?;
        out.reserve(self.encoded_len());
        put_endpoint(out, self.source);
        out.extend_from_slice(&channel_len.to_be_bytes());
        out.extend_from_slice(self.channel.as_bytes());
        for v in [
            self.header_size,
            self.chunk_size,
            self.buffer_size,
            self.monitors,
            peers,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for &p in &self.peers {
            put_endpoint(out, p);
        }
        Ok(())
    }

    /// Decodes a configuration from the start of `buf`. `Ok(None)` means more bytes are needed;
    /// `Ok(Some((config, used)))` gives the configuration and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(JoinConfig, usize)>, WireError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let source = get_endpoint(buf);
        let channel_len = usize::from(get_u16(buf, 6));
        let fixed = 8 + channel_len;
        if buf.len() < fixed + 10 {
            return Ok(None);
        }
        let channel = std::str::from_utf8(&buf[8..fixed])
            .map_err(|_| WireError::ChannelNotUtf8)?
            .to_owned();
        let header_size = get_u16(buf, fixed);
        let chunk_size = get_u16(buf, fixed + 2);
        let buffer_size = get_u16(buf, fixed + 4);
        let monitors = get_u16(buf, fixed + 6);
        let n = usize::from(get_u16(buf, fixed + 8));
        let list = fixed + 10;
        let end = list + 6 * n;
        if buf.len() < end {
            return Ok(None);
        }
        let peers = buf[list..end].chunks_exact(6).map(get_endpoint).collect();
        let config = JoinConfig {
            source,
            channel,
            header_size,
            chunk_size,
            buffer_size,
            monitors,
            peers,
        };
        Ok(Some((config, end)))
    }

    /// Checks what a peer of this project needs from a splitter's configuration, with a message
    /// that names the problem (an incompatible splitter, not a malformed message).
    pub fn check_usable(&self) -> Result<(), String> {
        let c = usize::from(self.chunk_size);
        if c < MIN_CHUNK_SIZE {
            return Err(format!(
                "the splitter uses {c}-byte chunks; at least {MIN_CHUNK_SIZE} are needed to tell chunks from control messages"
            ));
        }
        let b = self.buffer_size;
        if !(2..=32768).contains(&b) {
            return Err(format!(
                "the splitter's buffer size {b} is not between 2 and 32768 chunks"
            ));
        }
        // `monitors` may exceed the list: a reference splitter sends its configured number of
        // monitors, and the list is empty for the first peer to join.
        Ok(())
    }
}

/// A UDP datagram as the splitter sees it (§4.1, stricter than the reference: only `G` is a
/// goodbye, anything else that is not 2 bytes is malformed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToSplitter {
    /// A monitor reports that it did not have this chunk at playout time.
    LossReport(u16),
    /// The sender is leaving.
    Goodbye,
    /// A peer of a signed team got a bad chunk from `accused` (CIS, [`super::integrity`]).
    Complaint {
        /// Who sent the bad chunk.
        accused: SocketAddrV4,
        /// Its chunk number.
        number: u16,
    },
    /// A peer of a digest-signed team asks for the digest that covers this chunk (CIS digest
    /// mode, [`super::digest`]).
    DigestRequest(u16),
    /// Anything else.
    Malformed,
}

impl ToSplitter {
    /// Classifies a datagram received by the splitter.
    pub fn parse(d: &[u8]) -> ToSplitter {
        match d {
            [a, b] => ToSplitter::LossReport(u16::from_be_bytes([*a, *b])),
            GOODBYE => ToSplitter::Goodbye,
            _ => match super::integrity::parse_complaint(d) {
                Some((accused, number)) => ToSplitter::Complaint { accused, number },
                None => match super::digest::parse_request(d) {
                    Some(number) => ToSplitter::DigestRequest(number),
                    None => ToSplitter::Malformed,
                },
            },
        }
    }
}

/// A UDP datagram as a peer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToPeer<'a> {
    /// A chunk: its number and payload.
    Chunk {
        /// The chunk number.
        number: u16,
        /// `chunk_size` bytes of stream.
        payload: &'a [u8],
    },
    /// A new team member says hello.
    Hello,
    /// A neighbour leaves, or the splitter confirms our goodbye.
    Goodbye,
    /// Anything else (the reference would take it as a goodbye).
    Malformed,
}

impl<'a> ToPeer<'a> {
    /// Classifies a datagram received by a peer of a team with `chunk_size`-byte chunks.
    pub fn parse(d: &'a [u8], chunk_size: usize) -> ToPeer<'a> {
        if d.len() == CHUNK_HEADER + chunk_size {
            return ToPeer::Chunk {
                number: u16::from_be_bytes([d[0], d[1]]),
                payload: &d[CHUNK_HEADER..],
            };
        }
        match d {
            HELLO => ToPeer::Hello,
            GOODBYE => ToPeer::Goodbye,
            _ => ToPeer::Malformed,
        }
    }
}

/// Writes chunk `number` with `payload` as a datagram into `out` (cleared first).
pub fn encode_chunk(number: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(CHUNK_HEADER + payload.len());
    out.extend_from_slice(&number.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Encodes a loss report for chunk `number`.
pub fn loss_report(number: u16) -> [u8; LOSS_REPORT_LEN] {
    number.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::hex;

    /// The configuration a C++ reference splitter sent on loopback (reference-notes Appendix A.1).
    const APPENDIX_A1: &str = "7f0000011f40 0008 746573742e6f6767 0400 0400 0100 0001 0002 \
                               7f000001c903 7f000001a085";

    #[test]
    fn appendix_a1_decodes_and_reencodes_exactly() {
        let bytes = hex(APPENDIX_A1);
        let (config, used) = JoinConfig::decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(config.source, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(config.channel, "test.ogg");
        assert_eq!(config.header_size, 1024);
        assert_eq!(config.chunk_size, 1024);
        assert_eq!(config.buffer_size, 256);
        assert_eq!(config.monitors, 1);
        assert_eq!(
            config.peers,
            vec![
                "127.0.0.1:51459".parse().unwrap(),
                "127.0.0.1:41093".parse().unwrap()
            ]
        );
        assert_eq!(config.encoded_len(), bytes.len());
        let mut out = Vec::new();
        config.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
        config.check_usable().unwrap();
    }

    #[test]
    fn decode_needs_every_byte() {
        let bytes = hex(APPENDIX_A1);
        for cut in 0..bytes.len() {
            assert_eq!(JoinConfig::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn unusable_configurations_are_named() {
        let (mut c, _) = JoinConfig::decode(&hex(APPENDIX_A1)).unwrap().unwrap();
        c.chunk_size = 9;
        assert!(c.check_usable().unwrap_err().contains("9-byte chunks"));
        c.chunk_size = 1024;
        c.buffer_size = 1;
        assert!(
            c.check_usable()
                .unwrap_err()
                .contains("between 2 and 32768")
        );
        // A reference splitter may use any buffer size.
        c.buffer_size = 100;
        c.check_usable().unwrap();
    }

    #[test]
    fn a_reference_splitter_counts_monitors_it_does_not_list_yet() {
        // The first peer to join a reference splitter with one monitor configured: 1 monitor,
        // an empty list.
        let bytes = hex("7f0000011f40 0008 746573742e6f6767 0400 0400 0100 0001 0000");
        let (c, _) = JoinConfig::decode(&bytes).unwrap().unwrap();
        assert_eq!((c.monitors, c.peers.len()), (1, 0));
        c.check_usable().unwrap();
    }

    #[test]
    fn channel_too_long_is_an_error() {
        let c = JoinConfig {
            source: "127.0.0.1:1".parse().unwrap(),
            channel: "x".repeat(70_000),
            header_size: 0,
            chunk_size: 1024,
            buffer_size: 256,
            monitors: 0,
            peers: vec![],
        };
        assert!(matches!(
            c.encode(&mut Vec::new()),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn udp_demultiplexing_by_length() {
        assert_eq!(
            ToSplitter::parse(&[0x12, 0x34]),
            ToSplitter::LossReport(0x1234)
        );
        assert_eq!(ToSplitter::parse(b"G"), ToSplitter::Goodbye);
        assert_eq!(ToSplitter::parse(b""), ToSplitter::Malformed);
        assert_eq!(ToSplitter::parse(b"GG"), ToSplitter::LossReport(0x4747));
        assert_eq!(ToSplitter::parse(&[0; 1026]), ToSplitter::Malformed);

        let mut d = Vec::new();
        encode_chunk(0xfffe, &[7; 64], &mut d);
        assert_eq!(d.len(), 66);
        assert_eq!(
            ToPeer::parse(&d, 64),
            ToPeer::Chunk {
                number: 0xfffe,
                payload: &[7; 64]
            }
        );
        assert_eq!(ToPeer::parse(&d, 1024), ToPeer::Malformed);
        assert_eq!(ToPeer::parse(b"H", 64), ToPeer::Hello);
        assert_eq!(ToPeer::parse(b"G", 64), ToPeer::Goodbye);
        assert_eq!(ToPeer::parse(b"", 64), ToPeer::Malformed);
        assert_eq!(loss_report(0x0102), [1, 2]);
    }
}
