#![forbid(unsafe_code)]
//! Just enough of the container formats to hand a player the stream header and to start it in
//! the middle of a live stream.
//!
//! P2PSP itself is format-blind: chunks are byte ranges of the stream. A player that connects to a
//! peer mid-stream gets the stream header (derived by the splitter from the first bytes of the
//! stream, [`stream_header_len`]) and then the stream from a point where its decoder can start
//! ([`StartFinder`]):
//!
//! | container | header | start point |
//! |---|---|---|
//! | Ogg | the BOS pages and the codec header pages | the next page that starts a packet |
//! | Matroska, WebM | the EBML header and the Segment up to the first Cluster | the next Cluster whose first video block is a keyframe |
//! | MPEG-TS | none | the next video random access point, after the latest PAT and PMT, every other PID from its next payload unit start |
//! | MP3, AAC (ADTS) | none | the next frame that the frame after it confirms |
//! | anything else | none | the next chunk |
//!
//! An explicit `--header-size N` keeps the reference's meaning: the first N bytes. An Ogg header
//! of N bytes cut inside a page makes demuxers read a page whose end is missing (`CRC mismatch`);
//! [`ogg_complete_len`] trims such a header to its last complete page.

use std::fmt;
use std::str::FromStr;

/// The capture pattern at the start of every Ogg page.
pub const OGG_CAPTURE: &[u8; 4] = b"OggS";

/// The EBML magic a Matroska or WebM stream starts with.
pub const EBML_MAGIC: &[u8; 4] = &[0x1a, 0x45, 0xdf, 0xa3];

/// How the splitter chooses the stream header (`--header-size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderSize {
    /// Derived from the container ([`stream_header_len`]).
    #[default]
    Auto,
    /// Exactly this many bytes of the stream start (0: none), as the reference splitter.
    Bytes(usize),
}

impl FromStr for HeaderSize {
    type Err = String;

    fn from_str(s: &str) -> Result<HeaderSize, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(HeaderSize::Auto);
        }
        t.parse()
            .map(HeaderSize::Bytes)
            .map_err(|_| format!("`{s}` is not `auto` or a number of bytes"))
    }
}

impl fmt::Display for HeaderSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderSize::Auto => f.write_str("auto"),
            HeaderSize::Bytes(n) => write!(f, "{n}"),
        }
    }
}

impl serde::Serialize for HeaderSize {
    /// `"auto"` or the number of bytes.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HeaderSize::Auto => s.serialize_str("auto"),
            HeaderSize::Bytes(n) => s.serialize_u64(*n as u64),
        }
    }
}

/// Length of the Ogg page at the start of `buf` when `buf` holds all of it; `None` when `buf`
/// does not start with a page or ends before the page does.
pub fn ogg_page_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 27 || &buf[..4] != OGG_CAPTURE || buf[4] != 0 {
        return None;
    }
    let segments = usize::from(buf[26]);
    let table = buf.get(27..27 + segments)?;
    let len = 27 + segments + table.iter().map(|&l| usize::from(l)).sum::<usize>();
    (len <= buf.len()).then_some(len)
}

/// When `header` is Ogg (it starts with a page): how many of its bytes are whole pages. A header
/// of N bytes cut inside its last page is trimmed to the pages before that one. `None` when it is
/// not Ogg.
pub fn ogg_complete_len(header: &[u8]) -> Option<usize> {
    if header.len() < 4 || &header[..4] != OGG_CAPTURE {
        return None;
    }
    let mut at = 0;
    while let Some(len) = ogg_page_len(&header[at..]) {
        at += len;
    }
    Some(at)
}

/// The container a stream seems to be in, judged from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// Not decided yet: too few bytes seen.
    Unknown,
    /// MPEG transport stream (188-byte packets starting with 0x47).
    Ts,
    /// Ogg pages.
    Ogg,
    /// Matroska or WebM (EBML).
    Matroska,
    /// MPEG audio frames (MP3), maybe after an ID3 tag.
    Mp3,
    /// AAC in ADTS frames.
    Adts,
    /// Something else: players start at a chunk boundary.
    Other,
}

impl Container {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Container::Unknown => "unknown",
            Container::Ts => "MPEG-TS",
            Container::Ogg => "Ogg",
            Container::Matroska => "Matroska/WebM",
            Container::Mp3 => "MP3",
            Container::Adts => "AAC (ADTS)",
            Container::Other => "unrecognised",
        }
    }
}

/// Bytes to see before deciding that a stream is none of the containers above.
pub const SNIFF_LIMIT: usize = 16 * 1024;
const TS_PACKET: usize = 188;

/// Where the stream header ends, judged from the first bytes of a stream
/// ([`stream_header_len`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderEnd {
    /// More bytes are needed to tell.
    More,
    /// The header is the first `len` bytes (0: the container needs none).
    Found {
        /// The container.
        container: Container,
        /// Header length.
        len: usize,
    },
    /// The header goes on past the limit: `len` is its part (whole pages or elements) that fits.
    TooLong {
        /// The container.
        container: Container,
        /// The whole pages or elements that fit under the limit.
        len: usize,
    },
}

/// The stream header a player needs before any start point, judged from the first bytes of a
/// stream (`buf`, from its first byte) and never longer than `limit`:
///
/// - Ogg: the pages up to the first one that carries media data. For Vorbis, Theora, Opus, FLAC
///   and Speex streams, the pages until each stream's header packets are complete (3, 3, 2, 1 +
///   the count FLAC gives, 2 + the count Speex gives); for other codecs, pages up to the first
///   one whose granule position is not 0.
/// - Matroska / WebM: the EBML header and the Segment up to (not including) the first Cluster.
/// - MPEG-TS, MP3, ADTS and unrecognised streams: none.
///
/// The answer depends only on `buf`: call again with more bytes while it says
/// [`HeaderEnd::More`]. It never needs more than `limit` + 4 KiB bytes (or [`SNIFF_LIMIT`]).
pub fn stream_header_len(buf: &[u8], limit: usize) -> HeaderEnd {
    let container = sniff(buf, buf.len() >= SNIFF_LIMIT);
    let end = match container {
        Container::Unknown => HeaderEnd::More,
        Container::Ogg => {
            let at = buf.windows(4).position(|w| w == OGG_CAPTURE).unwrap_or(0);
            match ogg_header_len(&buf[at..], limit.saturating_sub(at)) {
                HeaderEnd::Found { len, .. } => HeaderEnd::Found {
                    container,
                    len: at + len,
                },
                HeaderEnd::TooLong { len, .. } => HeaderEnd::TooLong {
                    container,
                    len: at + len,
                },
                HeaderEnd::More => HeaderEnd::More,
            }
        }
        Container::Matroska => matroska_header_len(buf, limit),
        Container::Ts | Container::Mp3 | Container::Adts | Container::Other => {
            HeaderEnd::Found { container, len: 0 }
        }
    };
    match end {
        HeaderEnd::More if buf.len() >= limit.saturating_add(4096) => {
            HeaderEnd::TooLong { container, len: 0 }
        }
        e => e,
    }
}

/// Header packets of the logical Ogg stream whose first packet starts with `first`: `None` when
/// the codec is not known (or does not say).
fn ogg_header_packets(first: &[u8]) -> Option<u32> {
    if first.starts_with(b"\x01vorbis") || first.starts_with(b"\x80theora") {
        Some(3)
    } else if first.starts_with(b"OpusHead") {
        Some(2)
    } else if first.starts_with(b"\x7fFLAC") {
        // Mapping version (2 bytes), then the count of header packets after this one (0: unknown).
        let n = u16::from_be_bytes([*first.get(7)?, *first.get(8)?]);
        (n > 0).then(|| 1 + u32::from(n))
    } else if first.starts_with(b"Speex   ") {
        let extra = u32::from_le_bytes(first.get(76..80)?.try_into().ok()?);
        (extra < 16).then_some(2 + extra)
    } else {
        None
    }
}

/// One logical Ogg stream seen in the header.
struct OggStream {
    serial: u32,
    /// Header packets, when the codec is known.
    headers: Option<u32>,
    /// Packets completed so far.
    packets: u32,
}

/// [`stream_header_len`] for a stream that starts with an Ogg page.
fn ogg_header_len(buf: &[u8], limit: usize) -> HeaderEnd {
    let container = Container::Ogg;
    let mut streams: Vec<OggStream> = Vec::new();
    let mut at = 0;
    loop {
        let p = &buf[at..];
        if p.len() < 27 {
            return HeaderEnd::More;
        }
        if &p[..4] != OGG_CAPTURE || p[4] != 0 {
            // Not a page where one should be: what came before is the header.
            return HeaderEnd::Found { container, len: at };
        }
        let bos = p[5] & 0x02 != 0;
        let granule = u64::from_le_bytes(p[6..14].try_into().expect("8 bytes"));
        let serial = u32::from_le_bytes(p[14..18].try_into().expect("4 bytes"));
        if !bos {
            let header_page = match streams.iter().find(|s| s.serial == serial) {
                Some(OggStream {
                    headers: Some(n),
                    packets,
                    ..
                }) => packets < n,
                _ => granule == 0,
            };
            if !header_page {
                return HeaderEnd::Found { container, len: at };
            }
        }
        let segments = usize::from(p[26]);
        let Some(table) = p.get(27..27 + segments) else {
            return HeaderEnd::More;
        };
        let body = 27 + segments;
        let len = body + table.iter().map(|&l| usize::from(l)).sum::<usize>();
        let completed = table.iter().filter(|&&l| l < 255).count() as u32;
        if bos {
            // The codec is named by the first bytes of the first packet.
            let first = &p[body.min(p.len())..len.min(p.len())];
            let need = usize::from(table.first().copied().unwrap_or(0)).min(80);
            if first.len() < need && len > p.len() {
                return HeaderEnd::More;
            }
            streams.push(OggStream {
                serial,
                headers: ogg_header_packets(first),
                packets: 0,
            });
        }
        if at + len > limit {
            return HeaderEnd::TooLong { container, len: at };
        }
        if len > p.len() {
            return HeaderEnd::More;
        }
        if let Some(s) = streams.iter_mut().find(|s| s.serial == serial) {
            s.packets += completed;
        }
        at += len;
        // After the BOS pages, the header is complete once every stream has its header packets.
        let all_done = !bos
            && streams
                .iter()
                .all(|s| s.headers.is_some_and(|n| s.packets >= n));
        if all_done {
            return HeaderEnd::Found { container, len: at };
        }
    }
}

const MKV_SEGMENT: u32 = 0x1853_8067;
const MKV_CLUSTER: u32 = 0x1f43_b675;
const MKV_TRACKS: u32 = 0x1654_ae6b;
const MKV_TRACK_ENTRY: u32 = 0xae;
const MKV_TRACK_NUMBER: u32 = 0xd7;
const MKV_TRACK_TYPE: u32 = 0x83;
const MKV_TIMESTAMP: u32 = 0xe7;
const MKV_SIMPLE_BLOCK: u32 = 0xa3;
const MKV_BLOCK_GROUP: u32 = 0xa0;
const MKV_BLOCK: u32 = 0xa1;
const MKV_REFERENCE_BLOCK: u32 = 0xfb;
/// An element size of all ones: unknown (a live stream's Segment and Clusters).
const MKV_UNKNOWN: u64 = u64::MAX;

/// What reading a little of a stream found.
#[derive(Debug, PartialEq, Eq)]
enum Read<T> {
    /// The bytes end too early to tell.
    More,
    /// Not what was expected.
    Bad,
    /// Found.
    Ok(T),
}

/// An EBML element ID (marker bits kept) and its length.
fn ebml_id(b: &[u8]) -> Read<(u32, usize)> {
    let Some(&first) = b.first() else {
        return Read::More;
    };
    let len = first.leading_zeros() as usize + 1;
    if len > 4 {
        return Read::Bad;
    }
    let Some(bytes) = b.get(..len) else {
        return Read::More;
    };
    Read::Ok((bytes.iter().fold(0, |v, &x| (v << 8) | u32::from(x)), len))
}

/// An EBML element size ([`MKV_UNKNOWN`] when all ones) and its length.
fn ebml_size(b: &[u8]) -> Read<(u64, usize)> {
    let Some(&first) = b.first() else {
        return Read::More;
    };
    let len = first.leading_zeros() as usize + 1;
    if len > 8 {
        return Read::Bad;
    }
    let Some(bytes) = b.get(..len) else {
        return Read::More;
    };
    let mask = if len == 8 { 0 } else { 0xffu8 >> len };
    let value = bytes[1..]
        .iter()
        .fold(u64::from(first & mask), |v, &x| (v << 8) | u64::from(x));
    let all_ones = (1u64 << (7 * len)) - 1;
    Read::Ok((
        if value == all_ones {
            MKV_UNKNOWN
        } else {
            value
        },
        len,
    ))
}

/// An element head: ID, body size, head length.
fn ebml_head(b: &[u8]) -> Read<(u32, u64, usize)> {
    let (id, il) = match ebml_id(b) {
        Read::Ok(v) => v,
        Read::More => return Read::More,
        Read::Bad => return Read::Bad,
    };
    match ebml_size(&b[il..]) {
        Read::Ok((size, sl)) => Read::Ok((id, size, il + sl)),
        Read::More => Read::More,
        Read::Bad => Read::Bad,
    }
}

/// The body range of an element of known size at the start of `b`, if it is all there.
fn ebml_body(b: &[u8]) -> Option<(u32, &[u8], usize)> {
    let Read::Ok((id, size, head)) = ebml_head(b) else {
        return None;
    };
    let end = head.checked_add(usize::try_from(size).ok()?)?;
    Some((id, b.get(head..end)?, end))
}

/// [`stream_header_len`] for a stream that starts with the EBML magic.
fn matroska_header_len(buf: &[u8], limit: usize) -> HeaderEnd {
    let container = Container::Matroska;
    let found = |len| HeaderEnd::Found { container, len };
    // The EBML header element.
    let (size, head) = match ebml_head(buf) {
        Read::Ok((_, size, head)) if size != MKV_UNKNOWN => (size, head),
        Read::More => return HeaderEnd::More,
        _ => return found(0),
    };
    let mut at = head + size as usize;
    // The Segment, usually of unknown size in a live stream.
    match ebml_head(buf.get(at..).unwrap_or_default()) {
        Read::Ok((MKV_SEGMENT, _, head)) => at += head,
        Read::Ok(_) | Read::Bad => return found(at),
        Read::More => return HeaderEnd::More,
    }
    // Its children up to the first Cluster.
    loop {
        if buf
            .get(at..)
            .unwrap_or_default()
            .starts_with(&MKV_CLUSTER.to_be_bytes())
        {
            return found(at);
        }
        match ebml_head(buf.get(at..).unwrap_or_default()) {
            Read::Ok((MKV_CLUSTER, _, _)) => return found(at),
            Read::Ok((_, MKV_UNKNOWN, _)) | Read::Bad => return found(at),
            Read::Ok((_, size, head)) => {
                let end = at.saturating_add(head).saturating_add(size as usize);
                if end > limit {
                    return HeaderEnd::TooLong { container, len: at };
                }
                if end > buf.len() {
                    return HeaderEnd::More;
                }
                at = end;
            }
            Read::More => {
                return if at > limit {
                    HeaderEnd::TooLong { container, len: 0 }
                } else {
                    HeaderEnd::More
                };
            }
        }
    }
}

/// The video track numbers a Matroska header declares (its Tracks element).
pub fn matroska_video_tracks(header: &[u8]) -> Vec<u64> {
    let mut video = Vec::new();
    let Some((_, _, mut at)) = ebml_body(header) else {
        return video;
    };
    let Read::Ok((MKV_SEGMENT, _, head)) = ebml_head(header.get(at..).unwrap_or_default()) else {
        return video;
    };
    at += head;
    while let Some((id, body, len)) = ebml_body(&header[at..]) {
        if id == MKV_TRACKS {
            let mut t = body;
            while let Some((id, entry, len)) = ebml_body(t) {
                if id == MKV_TRACK_ENTRY {
                    let (mut number, mut kind) = (None, None);
                    let mut e = entry;
                    while let Some((id, value, len)) = ebml_body(e) {
                        let uint = value.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x));
                        match id {
                            MKV_TRACK_NUMBER => number = Some(uint),
                            MKV_TRACK_TYPE => kind = Some(uint),
                            _ => {}
                        }
                        e = &e[len..];
                    }
                    if let (Some(n), Some(1)) = (number, kind) {
                        video.push(n);
                    }
                }
                t = &t[len..];
            }
        }
        at += len;
    }
    video
}

/// A block of a Matroska Cluster: its track and whether it is a keyframe (a SimpleBlock with the
/// keyframe flag, or a BlockGroup without a ReferenceBlock). `body` holds the element's body, or
/// for a SimpleBlock at least its first bytes.
fn matroska_block(id: u32, body: &[u8]) -> Option<(u64, bool)> {
    if id == MKV_SIMPLE_BLOCK {
        let Read::Ok((track, tl)) = ebml_size(body) else {
            return None;
        };
        return Some((track, body.get(tl + 2)? & 0x80 != 0));
    }
    let (mut track, mut reference) = (None, false);
    let mut g = body;
    while let Some((id, value, len)) = ebml_body(g) {
        match id {
            MKV_BLOCK => {
                if let Read::Ok((t, _)) = ebml_size(value) {
                    track = Some(t);
                }
            }
            MKV_REFERENCE_BLOCK => reference = true,
            _ => {}
        }
        g = &g[len..];
    }
    Some((track?, !reference))
}

/// Whether `b` starts with what looks like a Matroska Cluster: its head, a Timestamp, and the
/// head of a block.
fn matroska_cluster_like(b: &[u8]) -> Read<()> {
    let mut at = match ebml_head(b) {
        Read::Ok((MKV_CLUSTER, _, head)) => head,
        Read::Ok(_) | Read::Bad => return Read::Bad,
        Read::More => return Read::More,
    };
    for want in [MKV_TIMESTAMP, MKV_SIMPLE_BLOCK] {
        match ebml_head(b.get(at..).unwrap_or_default()) {
            Read::Ok((MKV_TIMESTAMP, size @ 1..=8, head)) if want == MKV_TIMESTAMP => {
                at += head + size as usize;
            }
            Read::Ok((MKV_SIMPLE_BLOCK | MKV_BLOCK_GROUP, size, _))
                if want == MKV_SIMPLE_BLOCK && size != MKV_UNKNOWN => {}
            Read::Ok(_) | Read::Bad => return Read::Bad,
            Read::More => return Read::More,
        }
    }
    Read::Ok(())
}

/// Where a player may start in the Cluster at the start of `b`: its first video keyframe block
/// (its first keyframe block when `video` is empty). `Ok(Some((block, timestamp)))`: the block's
/// offset and the range of the Cluster's Timestamp element; `Ok(None)`: the Cluster has no such
/// block.
fn matroska_cluster_key(b: &[u8], video: &[u64]) -> Read<Option<(usize, (usize, usize))>> {
    let (size, mut at) = match ebml_head(b) {
        Read::Ok((MKV_CLUSTER, size, head)) => (size, head),
        Read::Ok(_) | Read::Bad => return Read::Bad,
        Read::More => return Read::More,
    };
    let end = if size == MKV_UNKNOWN {
        usize::MAX
    } else {
        at.saturating_add(size as usize)
    };
    let mut timestamp = None;
    for _ in 0..100_000 {
        if at >= end {
            return Read::Ok(None);
        }
        let (id, size, head) = match ebml_head(b.get(at..).unwrap_or_default()) {
            Read::Ok(h) => h,
            Read::More => return Read::More,
            Read::Bad => return Read::Bad,
        };
        let body = at + head;
        match id {
            MKV_TIMESTAMP if (1..=8).contains(&size) && timestamp.is_none() => {
                timestamp = Some((at, body + size as usize));
            }
            // CRC-32, Void, Position, PrevSize.
            0xbf | 0xec | 0xa7 | 0xab if size != MKV_UNKNOWN => {}
            MKV_SIMPLE_BLOCK | MKV_BLOCK_GROUP if size != MKV_UNKNOWN => {
                let Some(ts) = timestamp else {
                    return Read::Bad;
                };
                let size = size as usize;
                // A SimpleBlock's track and flags come first; a BlockGroup must be whole.
                let need = if id == MKV_SIMPLE_BLOCK {
                    size.min(12)
                } else {
                    size
                };
                let Some(block) = b.get(body..body + need) else {
                    return Read::More;
                };
                let Some((track, key)) = matroska_block(id, block) else {
                    return Read::Bad;
                };
                if key && (video.is_empty() || video.contains(&track)) {
                    return Read::Ok(Some((at, ts)));
                }
            }
            // The end of a Cluster of unknown size: the next Cluster or another top-level
            // element.
            _ if size != MKV_UNKNOWN || id == MKV_CLUSTER => {
                return if timestamp.is_some() && end == usize::MAX {
                    Read::Ok(None)
                } else {
                    Read::Bad
                };
            }
            _ => return Read::Bad,
        }
        at = body.saturating_add(size as usize);
    }
    Read::Ok(None)
}

/// The frame length and a key (the fields every frame of one stream shares) of the MPEG audio
/// frame header at the start of `h`.
fn mp3_frame(h: &[u8]) -> Read<(usize, u32)> {
    if h.len() < 4 {
        return Read::More;
    }
    if h[0] != 0xff || h[1] & 0xe0 != 0xe0 {
        return Read::Bad;
    }
    let version = (h[1] >> 3) & 3; // 0: 2.5, 2: 2, 3: 1
    let layer = (h[1] >> 1) & 3; // 1: III, 2: II, 3: I
    let rate = usize::from(h[2] >> 4);
    let sr = usize::from((h[2] >> 2) & 3);
    if version == 1 || layer == 0 || rate == 0 || rate == 15 || sr == 3 {
        return Read::Bad;
    }
    const V1: [[u16; 14]; 3] = [
        [
            32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
        ],
        [
            32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
        ],
        [
            32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
        ],
    ];
    const V2: [[u16; 14]; 2] = [
        [
            32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
        ],
        [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
    ];
    let kbps = usize::from(match (version, layer) {
        (3, 3) => V1[0][rate - 1],
        (3, 2) => V1[1][rate - 1],
        (3, _) => V1[2][rate - 1],
        (_, 3) => V2[0][rate - 1],
        _ => V2[1][rate - 1],
    });
    let hz = [44_100, 48_000, 32_000][sr]
        >> match version {
            3 => 0,
            2 => 1,
            _ => 2,
        };
    let pad = usize::from((h[2] >> 1) & 1);
    let len = match (version, layer) {
        (_, 3) => (12_000 * kbps / hz + pad) * 4,
        (3, _) | (_, 2) => 144_000 * kbps / hz + pad,
        _ => 72_000 * kbps / hz + pad,
    };
    let key = (u32::from(h[1] & 0xfe) << 8) | u32::from(h[2] & 0x0c);
    Read::Ok((len, key))
}

/// The frame length and key of the ADTS header at the start of `h`.
fn adts_frame(h: &[u8]) -> Read<(usize, u32)> {
    if h.len() < 7 {
        return Read::More;
    }
    if h[0] != 0xff || h[1] & 0xf6 != 0xf0 {
        return Read::Bad;
    }
    if (h[2] >> 2) & 0x0f >= 13 {
        return Read::Bad;
    }
    let len = (usize::from(h[3] & 3) << 11) | (usize::from(h[4]) << 3) | usize::from(h[5] >> 5);
    let min = if h[1] & 1 == 0 { 9 } else { 7 };
    if len < min {
        return Read::Bad;
    }
    let key = (u32::from(h[1]) << 16) | (u32::from(h[2] & 0xfd) << 8) | u32::from(h[3] & 0xc0);
    Read::Ok((len, key))
}

/// Whether `n` frames of the same stream follow each other from the start of `b`.
fn frame_chain(b: &[u8], frame: fn(&[u8]) -> Read<(usize, u32)>, n: usize) -> Read<()> {
    let mut at = 0;
    let mut key = None;
    for _ in 0..n {
        match frame(&b[at.min(b.len())..]) {
            Read::Ok((len, k)) if key.is_none_or(|key| key == k) => {
                key = Some(k);
                at += len;
            }
            Read::Ok(_) | Read::Bad => return Read::Bad,
            Read::More => return Read::More,
        }
    }
    Read::Ok(())
}

/// Where an ID3v2 tag at the start of `b` ends (0 when there is none).
fn id3_len(b: &[u8]) -> Read<usize> {
    if b.len() < 10 {
        return if b"ID3".starts_with(&b[..b.len().min(3)]) {
            Read::More
        } else {
            Read::Ok(0)
        };
    }
    if &b[..3] != b"ID3" || b[6..10].iter().any(|&x| x & 0x80 != 0) {
        return Read::Ok(0);
    }
    let size = b[6..10]
        .iter()
        .fold(0usize, |v, &x| (v << 7) | usize::from(x));
    let footer = if b[5] & 0x10 != 0 { 10 } else { 0 };
    Read::Ok(10 + size + footer)
}

/// Judges the container from `buf` (from the start of a stream or from anywhere in it).
/// `give_up`: decide [`Container::Other`] rather than wait for more bytes.
pub fn sniff(buf: &[u8], give_up: bool) -> Container {
    if ts_sync(buf).is_some() {
        return Container::Ts;
    }
    if buf.starts_with(EBML_MAGIC) {
        return Container::Matroska;
    }
    if buf.windows(4).any(|w| w == OGG_CAPTURE) {
        return Container::Ogg;
    }
    let from = match id3_len(buf) {
        Read::Ok(n) => n,
        Read::More | Read::Bad => return Container::Unknown,
    };
    if from > 0 && !give_up && buf.len() < from + 4 * 1024 {
        // An ID3 tag: the frames after it tell MP3 from AAC.
        return Container::Unknown;
    }
    for i in from..buf.len() {
        match buf[i] {
            0xff => {
                if frame_chain(&buf[i..], adts_frame, 3) == Read::Ok(()) {
                    return Container::Adts;
                }
                if frame_chain(&buf[i..], mp3_frame, 3) == Read::Ok(()) {
                    return Container::Mp3;
                }
            }
            0x1f if buf[i..].starts_with(&MKV_CLUSTER.to_be_bytes())
                && matroska_cluster_like(&buf[i..]) == Read::Ok(()) =>
            {
                return Container::Matroska;
            }
            _ => {}
        }
    }
    if give_up {
        Container::Other
    } else {
        Container::Unknown
    }
}

/// Most bytes held while deciding whether a candidate start point is one (a Matroska BlockGroup
/// must be whole to tell a keyframe).
const CANDIDATE_LIMIT: usize = 4 << 20;
/// Most bytes of MPEG-TS held back for a player while waiting for every PID's payload unit start.
const TS_PENDING_LIMIT: usize = 1 << 20;

/// Follows a played stream and finds where a player that connects now may start.
///
/// Feed it the played bytes in order with [`StartFinder::push`], and call
/// [`StartFinder::gap`] when bytes are missing (a lost chunk). When asked (`want`), `push`
/// returns the bytes a new player gets from this point on (the table in the [module
/// docs](self)); everything pushed after that goes to the player as it is. Give it the stream
/// header with [`StartFinder::learn_header`]: a Matroska stream cannot be recognised from its
/// middle as surely as from its header, which also names the video tracks.
#[derive(Debug)]
pub struct StartFinder {
    container: Container,
    /// Bytes of the previous pushes not yet parsed: a partial TS packet, a candidate start point
    /// that needs more bytes to be judged, the tail of the stream where one may begin, or (while
    /// sniffing) everything seen.
    carry: Vec<u8>,
    /// MPEG-TS: whether `carry` starts at a packet boundary.
    synced: bool,
    pat: Option<Vec<u8>>,
    pmt_pid: Option<u16>,
    pmt: Option<Vec<u8>>,
    video_pids: Vec<u16>,
    es_pids: Vec<u16>,
    /// MPEG-TS: a start found, held until every elementary stream reaches a payload unit start.
    pending: Option<TsPending>,
    /// Matroska: the video tracks the header names.
    video_tracks: Vec<u64>,
    sniffed: usize,
}

/// A player's first MPEG-TS bytes, from a random access point on, without the packets of the
/// elementary streams that have not started a PES yet (a decoder fed the tail of a PES reports
/// errors: AAC's "Input buffer exhausted before END element found").
#[derive(Debug)]
struct TsPending {
    out: Vec<u8>,
    waiting: Vec<u16>,
}

impl Default for StartFinder {
    fn default() -> Self {
        StartFinder::new()
    }
}

impl StartFinder {
    /// A finder that has seen nothing.
    pub fn new() -> StartFinder {
        StartFinder {
            container: Container::Unknown,
            carry: Vec::new(),
            synced: false,
            pat: None,
            pmt_pid: None,
            pmt: None,
            video_pids: Vec::new(),
            es_pids: Vec::new(),
            pending: None,
            video_tracks: Vec::new(),
            sniffed: 0,
        }
    }

    /// The container as judged so far.
    pub fn container(&self) -> Container {
        self.container
    }

    /// Learns the container (Ogg, Matroska) and the Matroska video tracks from the stream header
    /// players get. An empty or unrecognised header changes nothing.
    pub fn learn_header(&mut self, header: &[u8]) {
        let container = if header.starts_with(EBML_MAGIC) {
            self.video_tracks = matroska_video_tracks(header);
            Container::Matroska
        } else if header.starts_with(OGG_CAPTURE) {
            Container::Ogg
        } else {
            return;
        };
        if self.container != container {
            self.container = container;
            self.carry.clear();
            self.pending = None;
        }
    }

    /// Bytes are missing before the next push: forget partial state (not the tables).
    pub fn gap(&mut self) {
        self.carry.clear();
        self.synced = false;
        self.pending = None;
    }

    /// Takes the next bytes of the stream. With `want`, returns what a player starting now gets
    /// (`None`: no start point in these bytes; keep asking).
    pub fn push(&mut self, data: &[u8], want: bool) -> Option<Vec<u8>> {
        if self.container == Container::Unknown {
            self.sniffed += data.len();
            self.carry.extend_from_slice(data);
            self.container = sniff(&self.carry, self.sniffed >= SNIFF_LIMIT);
            if self.container == Container::Unknown {
                return None;
            }
            let seen = std::mem::take(&mut self.carry);
            if self.container == Container::Other {
                return want.then(|| data.to_vec());
            }
            return self.push_known(&seen, want);
        }
        self.push_known(data, want)
    }

    fn push_known(&mut self, data: &[u8], want: bool) -> Option<Vec<u8>> {
        match self.container {
            Container::Unknown => None,
            Container::Other => want.then(|| data.to_vec()),
            Container::Ts => self.push_ts(data, want),
            Container::Ogg | Container::Matroska | Container::Mp3 | Container::Adts => {
                self.push_scan(data, want)
            }
        }
    }

    /// Whether a player may start at the start of `b`: `Ok(Some((prefix, from)))` when it may,
    /// getting `prefix` then `b[from..]`.
    fn start_at(&self, b: &[u8]) -> Read<Option<(Vec<u8>, usize)>> {
        let here = Read::Ok(Some((Vec::new(), 0)));
        match self.container {
            Container::Ogg => {
                if !OGG_CAPTURE.starts_with(&b[..b.len().min(4)]) {
                    return Read::Bad;
                }
                match b.get(..6) {
                    None => Read::More,
                    // Version 0, and a page that does not continue a packet of the page before.
                    Some(p) if &p[..4] == OGG_CAPTURE && p[4] == 0 && p[5] & 1 == 0 => here,
                    Some(_) => Read::Bad,
                }
            }
            Container::Matroska => {
                let id = MKV_CLUSTER.to_be_bytes();
                if !id.starts_with(&b[..b.len().min(4)]) {
                    return Read::Bad;
                }
                match matroska_cluster_key(b, &self.video_tracks) {
                    Read::Ok(Some((block, (ts, ts_end)))) => {
                        if ts_end == block {
                            // The keyframe comes first: the Cluster as it is.
                            return here;
                        }
                        // Blocks before the keyframe are left out: a Cluster of unknown size
                        // (it ends where the next one starts) with the Timestamp, then the
                        // keyframe and the rest.
                        let mut prefix = id.to_vec();
                        prefix.extend_from_slice(&[0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
                        prefix.extend_from_slice(&b[ts..ts_end]);
                        Read::Ok(Some((prefix, block)))
                    }
                    Read::Ok(None) | Read::Bad => Read::Bad,
                    Read::More => Read::More,
                }
            }
            Container::Mp3 | Container::Adts => {
                if b[0] != 0xff {
                    return Read::Bad;
                }
                let frame = if self.container == Container::Mp3 {
                    mp3_frame
                } else {
                    adts_frame
                };
                match frame_chain(b, frame, 2) {
                    Read::Ok(()) => here,
                    Read::More => Read::More,
                    Read::Bad => Read::Bad,
                }
            }
            Container::Ts | Container::Unknown | Container::Other => Read::Bad,
        }
    }

    /// Scans for the next start point that [`StartFinder::start_at`] accepts.
    fn push_scan(&mut self, data: &[u8], want: bool) -> Option<Vec<u8>> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        if want {
            for i in 0..buf.len() {
                match self.start_at(&buf[i..]) {
                    Read::Ok(Some((mut prefix, from))) => {
                        prefix.extend_from_slice(&buf[i + from..]);
                        return Some(prefix);
                    }
                    Read::More if buf.len() - i <= CANDIDATE_LIMIT => {
                        self.carry = buf.split_off(i);
                        return None;
                    }
                    Read::Ok(None) | Read::More | Read::Bad => {}
                }
            }
        }
        // A start point may straddle this push and the next.
        let keep = buf.len().min(3);
        self.carry = buf.split_off(buf.len() - keep);
        None
    }

    fn push_ts(&mut self, data: &[u8], want: bool) -> Option<Vec<u8>> {
        if !want {
            self.pending = None;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        let mut at = 0;
        let mut opened = None;
        loop {
            if !self.synced {
                match ts_sync(&buf[at..]) {
                    Some(i) => {
                        at += i;
                        self.synced = true;
                    }
                    None => {
                        // Keep enough to find three packet starts next time.
                        let keep = (buf.len() - at).min(3 * TS_PACKET);
                        self.carry = buf[buf.len() - keep..].to_vec();
                        return None;
                    }
                }
            }
            while at + TS_PACKET <= buf.len() {
                let packet = &buf[at..at + TS_PACKET];
                if packet[0] != 0x47 {
                    self.synced = false;
                    if opened.is_none() {
                        self.pending = None;
                    }
                    break;
                }
                self.on_packet(packet);
                if opened.is_none() {
                    if let Some(p) = self.pending.as_mut() {
                        p.take(packet);
                        if p.waiting.is_empty() || p.out.len() >= TS_PENDING_LIMIT {
                            opened = Some(at + TS_PACKET);
                        }
                    } else if want && self.is_start(packet) {
                        let pid = ts_pid(packet);
                        let mut p = TsPending {
                            out: Vec::with_capacity(64 * TS_PACKET),
                            waiting: self.es_pids.iter().copied().filter(|&e| e != pid).collect(),
                        };
                        p.out
                            .extend_from_slice(self.pat.as_deref().unwrap_or_default());
                        p.out
                            .extend_from_slice(self.pmt.as_deref().unwrap_or_default());
                        p.out.extend_from_slice(packet);
                        if p.waiting.is_empty() {
                            opened = Some(at + TS_PACKET);
                        }
                        self.pending = Some(p);
                    }
                }
                at += TS_PACKET;
            }
            if self.synced {
                break;
            }
        }
        self.carry = buf[at..].to_vec();
        let from = opened?;
        let mut out = self.pending.take().map(|p| p.out).unwrap_or_default();
        out.extend_from_slice(&buf[from..]);
        Some(out)
    }

    fn on_packet(&mut self, p: &[u8]) {
        let pid = ts_pid(p);
        let Some(payload) = ts_payload(p) else { return };
        if p[1] & 0x40 == 0 {
            return;
        }
        if pid == 0 {
            if let Some(pmt_pid) = parse_pat(payload) {
                self.pat = Some(p.to_vec());
                if self.pmt_pid != Some(pmt_pid) {
                    self.pmt_pid = Some(pmt_pid);
                    self.pmt = None;
                }
            }
        } else if Some(pid) == self.pmt_pid
            && let Some((video, all)) = parse_pmt(payload)
        {
            self.pmt = Some(p.to_vec());
            self.video_pids = video;
            self.es_pids = all;
        }
    }

    /// Whether a player may start at this packet: the tables are known and it starts a PES of
    /// the video (a random access point), or of any stream when there is no video.
    fn is_start(&self, p: &[u8]) -> bool {
        if self.pat.is_none() || self.pmt.is_none() || p[1] & 0x40 == 0 {
            return false;
        }
        let pid = ts_pid(p);
        if self.video_pids.is_empty() {
            return self.es_pids.contains(&pid);
        }
        let adaptation = p[3] & 0x20 != 0;
        let random_access = adaptation && p[4] > 0 && p[5] & 0x40 != 0;
        self.video_pids.contains(&pid) && random_access
    }
}

impl TsPending {
    /// Takes a packet after the start point: an elementary stream's packets are dropped until
    /// the first that starts a PES.
    fn take(&mut self, packet: &[u8]) {
        let pid = ts_pid(packet);
        if let Some(i) = self.waiting.iter().position(|&w| w == pid) {
            if packet[1] & 0x40 == 0 {
                return;
            }
            self.waiting.swap_remove(i);
        }
        self.out.extend_from_slice(packet);
    }
}

/// The first offset (under one packet) where three packets in a row start with 0x47.
fn ts_sync(buf: &[u8]) -> Option<usize> {
    (0..TS_PACKET).find(|&i| {
        buf.len() > i + 2 * TS_PACKET
            && buf[i] == 0x47
            && buf[i + TS_PACKET] == 0x47
            && buf[i + 2 * TS_PACKET] == 0x47
    })
}

fn ts_pid(p: &[u8]) -> u16 {
    (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2])
}

/// The payload of a TS packet, if it has one.
fn ts_payload(p: &[u8]) -> Option<&[u8]> {
    let control = (p[3] >> 4) & 3;
    if control & 1 == 0 {
        return None;
    }
    let start = if control & 2 != 0 {
        5 + usize::from(p[4])
    } else {
        4
    };
    p.get(start..)
}

/// The section in a payload that starts one (after the pointer field), up to its end.
fn section(payload: &[u8], table_id: u8) -> Option<&[u8]> {
    let pointer = usize::from(*payload.first()?);
    let s = payload.get(1 + pointer..)?;
    if *s.first()? != table_id || s.len() < 3 {
        return None;
    }
    let len = (usize::from(s[1] & 0x0f) << 8) | usize::from(s[2]);
    // Without the CRC; a section that does not fit one packet is not followed.
    s.get(..3 + len.checked_sub(4)?)
}

/// The PID of the first program's PMT.
fn parse_pat(payload: &[u8]) -> Option<u16> {
    let s = section(payload, 0x00)?;
    s.get(8..)?
        .chunks_exact(4)
        .find(|e| u16::from_be_bytes([e[0], e[1]]) != 0)
        .map(|e| (u16::from(e[2] & 0x1f) << 8) | u16::from(e[3]))
}

/// The video PIDs and all elementary PIDs of a PMT.
fn parse_pmt(payload: &[u8]) -> Option<(Vec<u16>, Vec<u16>)> {
    let s = section(payload, 0x02)?;
    let info = (usize::from(*s.get(10)? & 0x0f) << 8) | usize::from(*s.get(11)?);
    let mut es = s.get(12 + info..)?;
    let (mut video, mut all) = (Vec::new(), Vec::new());
    while es.len() >= 5 {
        let stream_type = es[0];
        let pid = (u16::from(es[1] & 0x1f) << 8) | u16::from(es[2]);
        let es_info = (usize::from(es[3] & 0x0f) << 8) | usize::from(es[4]);
        all.push(pid);
        // MPEG-1/2 video, MPEG-4 part 2, H.264, H.265, VVC.
        if matches!(stream_type, 0x01 | 0x02 | 0x10 | 0x1b | 0x24 | 0x33) {
            video.push(pid);
        }
        es = es.get(5 + es_info..).unwrap_or_default();
    }
    (!all.is_empty()).then_some((video, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ogg_page(serial: u8, body: usize) -> Vec<u8> {
        let mut p = b"OggS".to_vec();
        p.push(0);
        p.push(0);
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&[serial, 0, 0, 0]);
        p.extend_from_slice(&[0; 8]);
        let segs = body.div_ceil(255).max(1);
        p.push(segs as u8);
        let mut left = body;
        for _ in 0..segs {
            let l = left.min(255);
            p.push(l as u8);
            left -= l;
        }
        p.extend(std::iter::repeat_n(0xAB, body));
        p
    }

    #[test]
    fn ogg_header_is_trimmed_to_whole_pages() {
        let mut h = ogg_page(1, 100);
        let first = h.len();
        h.extend(ogg_page(2, 600));
        let two = h.len();
        h.extend(&ogg_page(1, 3000)[..500]);
        assert_eq!(ogg_complete_len(&h), Some(two));
        assert_eq!(ogg_complete_len(&h[..first + 10]), Some(first));
        assert_eq!(ogg_complete_len(&h[..10]), Some(0));
        assert_eq!(ogg_complete_len(b"\x47abc"), None);
    }

    #[test]
    fn ogg_player_starts_at_a_page_even_split_across_pushes() {
        let mut s = vec![0x11; 3000];
        s.extend(ogg_page(1, 100));
        s.extend(ogg_page(1, 4000));
        let mut f = StartFinder::new();
        // Sniffing sees OggS early in the first bytes.
        assert_eq!(f.push(&s[3000..3100], false), None);
        assert_eq!(f.container(), Container::Ogg);
        let page2 = 3000 + ogg_page(1, 100).len();
        // A push that ends in the middle of the capture pattern of page 2.
        assert_eq!(f.push(&s[3100..page2 + 2], true), None);
        let got = f.push(&s[page2 + 2..], true).unwrap();
        assert_eq!(&got[..], &s[page2..]);
    }

    /// A TS packet: PID, payload unit start, random access, payload bytes.
    fn ts(pid: u16, pusi: bool, rai: bool, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x47,
            (if pusi { 0x40 } else { 0 }) | (pid >> 8) as u8,
            pid as u8,
        ];
        if rai {
            p.push(0x30);
            p.push(1);
            p.push(0x40);
        } else {
            p.push(0x10);
        }
        p.extend_from_slice(payload);
        p.resize(188, 0xff);
        p
    }

    fn pat() -> Vec<u8> {
        // pointer, table 0, length 13, ts id, version, sections, program 1 -> PMT 0x1000, CRC.
        ts(
            0,
            true,
            false,
            &[
                0, 0x00, 0xb0, 13, 0, 1, 0xc1, 0, 0, 0, 1, 0xf0, 0x00, 1, 2, 3, 4,
            ],
        )
    }

    fn pmt() -> Vec<u8> {
        // H.264 on 0x100, AAC on 0x101.
        ts(
            0x1000,
            true,
            false,
            &[
                0, 0x02, 0xb0, 23, 0, 1, 0xc1, 0, 0, 0xe1, 0x00, 0xf0, 0, 0x1b, 0xe1, 0x00, 0xf0,
                0, 0x0f, 0xe1, 0x01, 0xf0, 0, 1, 2, 3, 4,
            ],
        )
    }

    #[test]
    fn ts_player_starts_at_a_video_random_access_point_after_the_tables() {
        let mut s = Vec::new();
        s.extend(ts(0x100, false, false, b"tail of a frame"));
        s.extend(pat());
        s.extend(pmt());
        s.extend(ts(0x101, true, true, b"audio"));
        s.extend(ts(0x100, true, false, b"P frame"));
        s.extend(ts(0x100, false, false, b"P frame, more"));
        let key = s.len();
        s.extend(ts(0x100, true, true, b"IDR"));
        s.extend(ts(0x101, true, true, b"audio"));
        // Start mid-packet, push in odd pieces that cut packets anywhere.
        let stream = &s[50..];
        let mut f = StartFinder::new();
        let mut got = None;
        for piece in stream.chunks(100) {
            if let Some(g) = f.push(piece, true) {
                got = Some(g);
                break;
            }
        }
        assert_eq!(f.container(), Container::Ts);
        let got = got.expect("a start point");
        assert_eq!(&got[..188], &pat()[..]);
        assert_eq!(&got[188..376], &pmt()[..]);
        assert_eq!(&got[376..376 + 188], &s[key..key + 188]);
    }

    #[test]
    fn ts_resyncs_after_a_gap() {
        let mut s = Vec::new();
        for _ in 0..4 {
            s.extend(pat());
            s.extend(pmt());
            s.extend(ts(0x100, false, false, b"x"));
        }
        let mut f = StartFinder::new();
        assert_eq!(f.push(&s[..1000], false), None);
        f.gap();
        let mut t = s[1234..].to_vec();
        t.extend(ts(0x100, true, true, b"IDR"));
        t.extend(ts(0x101, true, false, b"audio"));
        let got = f.push(&t, true).unwrap();
        assert_eq!(&got[376..379], &[0x47, 0x41, 0x00]);
    }

    #[test]
    fn unknown_bytes_start_at_once_after_sniffing() {
        let mut f = StartFinder::new();
        assert_eq!(f.push(&[1u8; 8000], true), None);
        assert_eq!(f.push(&[2u8; 9000], true).map(|v| v.len()), Some(9000));
        assert_eq!(f.push(&[3u8; 10], true), Some(vec![3u8; 10]));
    }

    #[test]
    fn header_size_flag_values() {
        assert_eq!("auto".parse(), Ok(HeaderSize::Auto));
        assert_eq!("AUTO".parse(), Ok(HeaderSize::Auto));
        assert_eq!("0".parse(), Ok(HeaderSize::Bytes(0)));
        assert_eq!("16384".parse(), Ok(HeaderSize::Bytes(16384)));
        assert!("lots".parse::<HeaderSize>().is_err());
        assert!("-1".parse::<HeaderSize>().is_err());
        assert_eq!(HeaderSize::Auto.to_string(), "auto");
        assert_eq!(HeaderSize::Bytes(7).to_string(), "7");
        assert_eq!(serde_json::to_value(HeaderSize::Auto).unwrap(), "auto");
        assert_eq!(serde_json::to_value(HeaderSize::Bytes(9)).unwrap(), 9);
    }

    /// An Ogg page: flags, granule position, serial, packets (each ends on this page).
    fn page(flags: u8, granule: u64, serial: u32, packets: &[&[u8]]) -> Vec<u8> {
        let mut p = b"OggS\0".to_vec();
        p.push(flags);
        p.extend_from_slice(&granule.to_le_bytes());
        p.extend_from_slice(&serial.to_le_bytes());
        p.extend_from_slice(&[0; 8]);
        let mut table = Vec::new();
        for pk in packets {
            table.extend(std::iter::repeat_n(255u8, pk.len() / 255));
            table.push((pk.len() % 255) as u8);
        }
        p.push(table.len() as u8);
        p.extend_from_slice(&table);
        for pk in packets {
            p.extend_from_slice(pk);
        }
        p
    }

    /// Theora + Vorbis as ffmpeg writes them: two BOS pages, then each stream's comment and setup
    /// headers on one page, then media pages.
    fn theora_vorbis() -> (Vec<u8>, usize) {
        let mut s = page(2, 0, 1, &[b"\x80theora identification"]);
        s.extend(page(2, 0, 2, &[b"\x01vorbis identification"]));
        s.extend(page(
            0,
            0,
            1,
            &[&b"\x81theora comment"[..], &[0x82; 3000][..]],
        ));
        s.extend(page(
            0,
            0,
            2,
            &[&b"\x03vorbis comment"[..], &[0x05; 3000][..]],
        ));
        let header = s.len();
        for i in 0..20u64 {
            s.extend(page(0, 64 + i, 1, &[&[0x10; 700][..], &[0x50; 300][..]]));
            s.extend(page(0, 1000 * i, 2, &[&[0x40u8; 100][..]; 5]));
        }
        (s, header)
    }

    #[test]
    fn ogg_header_is_the_codec_header_pages() {
        let (s, header) = theora_vorbis();
        let found = HeaderEnd::Found {
            container: Container::Ogg,
            len: header,
        };
        assert_eq!(stream_header_len(&s, 60_000), found);
        // Complete as soon as the last header page is in: no need to see a media page.
        assert_eq!(stream_header_len(&s[..header], 60_000), found);
        for cut in [0, 3, 27, 40, 100, header - 1] {
            assert_eq!(
                stream_header_len(&s[..cut], 60_000),
                HeaderEnd::More,
                "{cut}"
            );
        }
        // Opus: OpusHead and OpusTags.
        let mut o = page(2, 0, 9, &[b"OpusHead\x01\x02"]);
        o.extend(page(0, 0, 9, &[b"OpusTags vendor"]));
        let len = o.len();
        o.extend(page(0, 48_000, 9, &[&[0xf8u8; 100][..]; 10]));
        let found = HeaderEnd::Found {
            container: Container::Ogg,
            len,
        };
        assert_eq!(stream_header_len(&o, 60_000), found);
    }

    #[test]
    fn ogg_header_of_unknown_codecs_ends_at_the_first_page_with_a_granule() {
        let mut s = page(2, 0, 5, &[b"\x80kate\0\0\0"]);
        s.extend(page(0, 0, 5, &[b"more headers"]));
        s.extend(page(0, 0, 5, &[b"and more"]));
        let len = s.len();
        s.extend(page(0, 7, 5, &[b"data"]));
        // The page after the header must be seen to know the header ended.
        assert_eq!(stream_header_len(&s[..len + 20], 60_000), HeaderEnd::More);
        let found = HeaderEnd::Found {
            container: Container::Ogg,
            len,
        };
        assert_eq!(stream_header_len(&s[..len + 27], 60_000), found);
        assert_eq!(stream_header_len(&s, 60_000), found);
    }

    #[test]
    fn ogg_header_over_the_limit_is_cut_to_whole_pages() {
        let (s, _) = theora_vorbis();
        let three = page(2, 0, 1, &[b"\x80theora identification"]).len()
            + page(2, 0, 2, &[b"\x01vorbis identification"]).len()
            + page(0, 0, 1, &[&b"\x81theora comment"[..], &[0x82; 3000][..]]).len();
        assert_eq!(
            stream_header_len(&s, 4000),
            HeaderEnd::TooLong {
                container: Container::Ogg,
                len: three
            }
        );
    }

    /// An EBML element with a minimal size.
    fn el(id: u32, body: &[u8]) -> Vec<u8> {
        let mut e: Vec<u8> = id
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        let n = body.len();
        if n < 127 {
            e.push(0x80 | n as u8);
        } else if n < 16383 {
            e.extend_from_slice(&(0x4000 | n as u16).to_be_bytes());
        } else {
            e.extend_from_slice(&(0x1000_0000 | n as u32).to_be_bytes());
        }
        e.extend_from_slice(body);
        e
    }

    fn simple_block(track: u8, key: bool, len: usize) -> Vec<u8> {
        let mut b = vec![0x80 | track, 0, 0, if key { 0x80 } else { 0 }];
        b.resize(len, 0x33);
        el(MKV_SIMPLE_BLOCK, &b)
    }

    /// A cluster with a known size, or of unknown size.
    fn cluster(known: bool, t: u8, blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut body = el(MKV_TIMESTAMP, &[t]);
        for b in blocks {
            body.extend_from_slice(b);
        }
        if known {
            el(MKV_CLUSTER, &body)
        } else {
            let mut c = MKV_CLUSTER.to_be_bytes().to_vec();
            c.extend_from_slice(&[0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
            c.extend(body);
            c
        }
    }

    /// A live WebM header: EBML header, a Segment of unknown size, Info and Tracks (video 1,
    /// audio 2).
    fn webm_header() -> Vec<u8> {
        let mut h = el(0x1a45_dfa3, &el(0x4282, b"webm"));
        h.extend_from_slice(&MKV_SEGMENT.to_be_bytes());
        h.extend_from_slice(&[0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        h.extend(el(0x1549_a966, &el(0x2ad7b1, &[0x0f, 0x42, 0x40])));
        let video = [el(MKV_TRACK_NUMBER, &[1]), el(MKV_TRACK_TYPE, &[1])].concat();
        let audio = [
            el(MKV_TRACK_NUMBER, &[2]),
            el(MKV_TRACK_TYPE, &[2]),
            el(0x63a2, &[0x77; 3000]),
        ]
        .concat();
        h.extend(el(
            MKV_TRACKS,
            &[el(MKV_TRACK_ENTRY, &video), el(MKV_TRACK_ENTRY, &audio)].concat(),
        ));
        h
    }

    #[test]
    fn matroska_header_is_everything_before_the_first_cluster() {
        let h = webm_header();
        let mut s = h.clone();
        s.extend(cluster(true, 0, &[simple_block(1, true, 500)]));
        let found = HeaderEnd::Found {
            container: Container::Matroska,
            len: h.len(),
        };
        assert_eq!(stream_header_len(&s, 60_000), found);
        assert_eq!(stream_header_len(&s[..h.len() + 4], 60_000), found);
        for cut in [2, 10, 40, h.len() - 1, h.len() + 2] {
            assert_eq!(
                stream_header_len(&s[..cut], 60_000),
                HeaderEnd::More,
                "{cut}"
            );
        }
        assert_eq!(
            stream_header_len(&s, 1000),
            HeaderEnd::TooLong {
                container: Container::Matroska,
                len: h
                    .windows(4)
                    .position(|w| w == MKV_TRACKS.to_be_bytes())
                    .unwrap()
            }
        );
        assert_eq!(matroska_video_tracks(&h), vec![1]);
    }

    #[test]
    fn matroska_player_starts_at_a_video_keyframe() {
        let h = webm_header();
        let mut s = vec![0x55; 700];
        // No keyframe: not a start.
        s.extend(cluster(
            true,
            1,
            &[simple_block(2, true, 90), simple_block(1, false, 900)],
        ));
        let second = s.len();
        // Audio first, then the video keyframe: starts at the keyframe in a cluster of unknown
        // size with the same timestamp.
        let audio = simple_block(2, true, 90);
        let key = simple_block(1, true, 2000);
        s.extend(cluster(
            true,
            2,
            &[audio.clone(), key.clone(), simple_block(1, false, 800)],
        ));
        let third = s.len();
        s.extend(cluster(true, 3, &[simple_block(1, true, 900)]));
        let mut f = StartFinder::new();
        f.learn_header(&h);
        assert_eq!(f.container(), Container::Matroska);
        let got = f.push(&s, true).unwrap();
        let keyframe_at =
            second + (s[second..].len() - s[second + 4..].len()) + 2 + 3 + audio.len();
        let mut want = cluster(false, 2, &[]);
        want.extend_from_slice(&s[keyframe_at..]);
        assert_eq!(&got[..want.len().min(40)], &want[..want.len().min(40)]);
        assert_eq!(got, want);
        // A cluster that starts with the keyframe is passed as it is.
        let mut f = StartFinder::new();
        f.learn_header(&h);
        assert_eq!(f.push(&s[third - 1..], true).unwrap(), &s[third..]);
        // BlockGroups: a ReferenceBlock makes a block no keyframe.
        let group = |key: bool| {
            let mut g = el(MKV_BLOCK, &[0x81, 0, 0, 0, 1, 2, 3]);
            if !key {
                g.extend(el(MKV_REFERENCE_BLOCK, &[0xfe]));
            }
            el(MKV_BLOCK_GROUP, &g)
        };
        let mut t = cluster(false, 4, &[group(false)]);
        let keyed = t.len();
        t.extend(cluster(false, 5, &[group(true)]));
        let mut f = StartFinder::new();
        f.learn_header(&h);
        assert_eq!(f.push(&t, true).unwrap(), &t[keyed..]);
    }

    /// MPEG-1 layer III, 128 kbit/s, 44.1 kHz: 417 bytes a frame.
    fn mp3_frames(n: usize) -> Vec<u8> {
        let mut f = vec![0xff, 0xfb, 0x90, 0x64];
        f.resize(417, 0x21);
        f.repeat(n)
    }

    fn adts_frames(n: usize, len: usize) -> Vec<u8> {
        let mut f = vec![
            0xff,
            0xf1,
            0x50,
            0x80 | (len >> 11) as u8,
            (len >> 3) as u8,
            ((len & 7) << 5) as u8 | 0x1f,
            0xfc,
        ];
        f.resize(len, 0x21);
        f.repeat(n)
    }

    #[test]
    fn mp3_and_adts_are_recognised_and_need_no_header() {
        let mut id3 = b"ID3\x04\0\0\0\0\0\x05hello".to_vec();
        id3.extend(mp3_frames(10));
        assert_eq!(
            stream_header_len(&id3, 60_000),
            HeaderEnd::Found {
                container: Container::Mp3,
                len: 0
            }
        );
        assert_eq!(sniff(&mp3_frames(2), false), Container::Unknown);
        assert_eq!(sniff(&mp3_frames(3), false), Container::Mp3);
        assert_eq!(sniff(&adts_frames(3, 300), false), Container::Adts);
        assert_eq!(
            sniff(&adts_frames(3, 300)[..605], false),
            Container::Unknown
        );
        assert_eq!(sniff(&[0u8; 1000], true), Container::Other);
        let mut ts = pat();
        ts.extend(pmt());
        ts.extend(pat());
        assert_eq!(
            stream_header_len(&ts, 60_000),
            HeaderEnd::Found {
                container: Container::Ts,
                len: 0
            }
        );
        // Unrecognised: decided at the sniff limit, no header.
        assert_eq!(stream_header_len(&[7; 1000], 60_000), HeaderEnd::More);
        assert_eq!(
            stream_header_len(&vec![7; SNIFF_LIMIT], 60_000),
            HeaderEnd::Found {
                container: Container::Other,
                len: 0
            }
        );
    }

    #[test]
    fn mp3_and_adts_players_start_at_a_confirmed_frame() {
        for (frames, len) in [(mp3_frames(20), 417), (adts_frames(20, 300), 300)] {
            let mut f = StartFinder::new();
            assert_eq!(f.push(&frames[..len * 5], false), None);
            // Mid-frame: a false sync inside a frame is not confirmed by the next frame.
            let mut s = frames[len * 5 + 10..].to_vec();
            s[20] = 0xff;
            s[21] = 0xfb;
            s[22] = 0x90;
            let got = f.push(&s, true).unwrap();
            assert_eq!(got, &frames[len * 6..]);
        }
    }

    #[test]
    fn ts_player_gets_each_stream_from_its_payload_unit_start() {
        let mut s = Vec::new();
        s.extend(pat());
        s.extend(pmt());
        s.extend(ts(0x101, true, true, b"audio 1"));
        s.extend(ts(0x100, true, true, b"IDR"));
        let start = s.len() - 188;
        s.extend(ts(0x101, false, false, b"audio 1 more"));
        s.extend(ts(0x100, false, false, b"IDR more"));
        s.extend(ts(0x101, false, false, b"audio 1 end"));
        s.extend(ts(0x11, false, false, b"SDT, passed"));
        let audio = s.len();
        s.extend(ts(0x101, true, true, b"audio 2"));
        s.extend(ts(0x101, false, false, b"audio 2 more"));
        let mut want = [pat(), pmt()].concat();
        want.extend_from_slice(&s[start..start + 188]);
        want.extend_from_slice(&s[start + 2 * 188..start + 3 * 188]);
        want.extend_from_slice(&s[start + 4 * 188..]);
        assert_eq!(&want[5 * 188..], &s[audio..]);
        let mut f = StartFinder::new();
        assert_eq!(f.push(&s, true).unwrap(), want);
        // Pushed a packet at a time, the start comes with the audio's first packet, then the rest
        // follows as it is.
        let mut f = StartFinder::new();
        let mut got = Vec::new();
        let mut started = false;
        for p in s.chunks(188) {
            match f.push(p, true) {
                Some(g) if !started => {
                    started = true;
                    got.extend(g);
                }
                _ if started => got.extend_from_slice(p),
                _ => {}
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn sniffing_finds_matroska_mid_stream_and_the_test_pattern_is_other() {
        let mut s = vec![0x42; 100];
        s.extend(cluster(true, 1, &[simple_block(1, true, 3000)]));
        assert_eq!(sniff(&s, false), Container::Matroska);
        let mut pattern = vec![0u8; SNIFF_LIMIT];
        crate::pattern::fill(0, &mut pattern);
        assert_eq!(sniff(&pattern, false), Container::Unknown);
        assert_eq!(sniff(&pattern, true), Container::Other);
    }

    /// Streams of each kind, mid-stream (the finder never sees their start).
    fn streams() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
        let (ogg, header) = theora_vorbis();
        let mut ts_stream = Vec::new();
        for i in 0..30 {
            if i % 10 == 0 {
                ts_stream.extend(pat());
                ts_stream.extend(pmt());
            }
            ts_stream.extend(ts(0x100, i % 7 == 3, i % 7 == 3, b"video"));
            ts_stream.extend(ts(0x101, i % 3 == 0, false, b"audio"));
        }
        let mut webm = Vec::new();
        for i in 0..12u8 {
            webm.extend(cluster(
                i % 2 == 0,
                i,
                &[
                    simple_block(2, true, 200),
                    simple_block(1, i % 3 == 1, 1500),
                    simple_block(1, false, 700),
                ],
            ));
        }
        vec![
            ("ogg", ogg[header + 1000..].to_vec(), ogg[..header].to_vec()),
            ("ts", ts_stream[100..].to_vec(), Vec::new()),
            ("webm", webm[10..].to_vec(), webm_header()),
            ("mp3", mp3_frames(40)[1000..].to_vec(), Vec::new()),
            ("adts", adts_frames(60, 250)[333..].to_vec(), Vec::new()),
        ]
    }

    /// What a player gets: the start then every later push as it is.
    fn play(stream: &[u8], header: &[u8], cuts: &[usize], want_from: usize) -> Vec<u8> {
        let mut f = StartFinder::new();
        f.learn_header(header);
        let mut got = Vec::new();
        let mut started = false;
        let mut at = 0;
        let mut i = 0;
        while at < stream.len() {
            let n = cuts[i % cuts.len()].min(stream.len() - at);
            i += 1;
            let piece = &stream[at..at + n];
            let want = at >= want_from;
            at += n;
            if started {
                got.extend_from_slice(piece);
                f.push(piece, false);
            } else if let Some(s) = f.push(piece, want) {
                started = true;
                got = s;
            }
        }
        got
    }

    #[test]
    fn every_kind_of_stream_starts_somewhere() {
        for (name, stream, header) in streams() {
            let got = play(&stream, &header, &[stream.len()], 0);
            assert!(!got.is_empty(), "{name}: no start point");
            assert!(got.len() < stream.len() + 1000, "{name}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The bytes a player gets do not depend on how the stream is cut into pushes.
        #[test]
        fn start_does_not_depend_on_the_cuts(
            cuts in proptest::collection::vec(1usize..700, 1..40),
        ) {
            for (name, stream, header) in streams() {
                let whole = play(&stream, &header, &[stream.len()], 0);
                let cut = play(&stream, &header, &cuts, 0);
                proptest::prop_assert_eq!(cut, whole, "{}", name);
            }
        }

        /// The derived header does not depend on how the stream start arrives either (it only
        /// grows: a decision never changes once made).
        #[test]
        fn header_decision_is_stable(cuts in proptest::collection::vec(1usize..900, 1..30)) {
            let (ogg, _) = theora_vorbis();
            let mut webm = webm_header();
            webm.extend(cluster(true, 0, &[simple_block(1, true, 500)]));
            for stream in [ogg, webm, mp3_frames(20)] {
                let whole = stream_header_len(&stream, 60_000);
                let mut at = 0;
                let mut i = 0;
                let mut decided = None;
                while at < stream.len() {
                    at = (at + cuts[i % cuts.len()]).min(stream.len());
                    i += 1;
                    match stream_header_len(&stream[..at], 60_000) {
                        HeaderEnd::More => proptest::prop_assert!(decided.is_none()),
                        d => {
                            if let Some(prev) = decided {
                                proptest::prop_assert_eq!(prev, d);
                            }
                            decided = Some(d);
                        }
                    }
                }
                proptest::prop_assert_eq!(decided, Some(whole));
            }
        }

        /// Random bytes never panic and never start a player outside the stream.
        #[test]
        fn random_bytes_are_harmless(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4000), kind in 0usize..5) {
            let _ = stream_header_len(&data, 60_000);
            let _ = matroska_video_tracks(&data);
            let (_, _, header) = streams().swap_remove(kind);
            let got = play(&data, &header, &[97], 0);
            proptest::prop_assert!(got.len() <= data.len() + 2 * 188 + 16);
        }
    }
}
