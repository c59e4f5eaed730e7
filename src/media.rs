#![forbid(unsafe_code)]
//! Just enough of the container formats to start a player in the middle of a live stream.
//!
//! P2PSP itself is format-blind: chunks are byte ranges of the stream. A player that connects to a
//! peer mid-stream gets the stream header (the first bytes of the stream, captured by the
//! splitter) and then chunks, and where those chunks happen to cut the stream matters:
//!
//! - **Ogg**: a stream header cut inside a page makes demuxers read a page whose end is missing
//!   (`CRC mismatch`). [`ogg_complete_len`] trims a header to its last complete page; the player
//!   then starts at the next page boundary (`OggS`) of the live stream.
//! - **MPEG-TS**: H.264 cannot be decoded before a random access point, and a demuxer needs the
//!   program tables first. The player starts at the next video packet that starts a PES with the
//!   random access indicator set, preceded by the latest PAT and PMT seen ([`StartFinder`]).
//! - anything else starts at the next chunk boundary.

/// The capture pattern at the start of every Ogg page.
pub const OGG_CAPTURE: &[u8; 4] = b"OggS";

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
    /// Something else: players start at a chunk boundary.
    Other,
}

/// Bytes to see before deciding that a stream is neither MPEG-TS nor Ogg.
const SNIFF_LIMIT: usize = 16 * 1024;
const TS_PACKET: usize = 188;

/// Follows a played stream and finds where a player that connects now may start.
///
/// Feed it the played bytes in order with [`StartFinder::push`], and call
/// [`StartFinder::gap`] when bytes are missing (a lost chunk). When asked (`want`), `push`
/// returns the bytes a new player gets from this point: for MPEG-TS the latest PAT and PMT, then
/// the stream from the next video random access point; for Ogg the stream from the next page.
#[derive(Debug)]
pub struct StartFinder {
    container: Container,
    /// Bytes of the previous pushes not yet parsed: a partial TS packet, the tail of an Ogg
    /// stream where a capture pattern may begin, or (while sniffing) everything seen.
    carry: Vec<u8>,
    /// MPEG-TS: whether `carry` starts at a packet boundary.
    synced: bool,
    pat: Option<Vec<u8>>,
    pmt_pid: Option<u16>,
    pmt: Option<Vec<u8>>,
    video_pids: Vec<u16>,
    es_pids: Vec<u16>,
    sniffed: usize,
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
            sniffed: 0,
        }
    }

    /// The container as judged so far.
    pub fn container(&self) -> Container {
        self.container
    }

    /// Bytes are missing before the next push: forget partial state (not the tables).
    pub fn gap(&mut self) {
        self.carry.clear();
        self.synced = false;
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
            Container::Ogg => {
                let mut buf = std::mem::take(&mut self.carry);
                buf.extend_from_slice(data);
                let start = if want {
                    buf.windows(4).position(|w| w == OGG_CAPTURE)
                } else {
                    None
                };
                // A capture pattern may straddle this push and the next.
                let keep = buf.len().min(3);
                self.carry = buf[buf.len() - keep..].to_vec();
                start.map(|s| buf[s..].to_vec())
            }
            Container::Ts => self.push_ts(data, want),
        }
    }

    fn push_ts(&mut self, data: &[u8], want: bool) -> Option<Vec<u8>> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        let mut at = 0;
        let mut start = None;
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
                    break;
                }
                self.on_packet(packet);
                if want && start.is_none() && self.is_start(packet) {
                    start = Some(at);
                }
                at += TS_PACKET;
            }
            if self.synced {
                break;
            }
        }
        self.carry = buf[at..].to_vec();
        let s = start?;
        let mut out = Vec::with_capacity(2 * TS_PACKET + buf.len() - s);
        out.extend_from_slice(self.pat.as_deref().unwrap_or_default());
        out.extend_from_slice(self.pmt.as_deref().unwrap_or_default());
        out.extend_from_slice(&buf[s..]);
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

fn sniff(buf: &[u8], give_up: bool) -> Container {
    if ts_sync(buf).is_some() {
        return Container::Ts;
    }
    if buf.windows(4).any(|w| w == OGG_CAPTURE) {
        return Container::Ogg;
    }
    if give_up {
        Container::Other
    } else {
        Container::Unknown
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
}
