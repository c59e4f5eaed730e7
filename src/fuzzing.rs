//! Harnesses shared by the cargo-fuzz targets (`fuzz/`) and the property tests
//! (`tests/decoders.rs`). Each takes arbitrary bytes, feeds them to one decoder or protocol state
//! machine and panics if an invariant breaks, so `cargo test` and `cargo fuzz` check the same
//! things. Not part of the stable API.
//!
//! The state-machine harnesses read their input as a little program: one byte chooses an
//! operation, the next bytes its arguments, until the input runs out.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::http::{ChunkedDecoder, RequestHead, ResponseHead};
use crate::proto::Endpoint;
use crate::proto::peer::{Peer, PeerEvent, PeerRules};
use crate::proto::seq;
use crate::proto::team::{TeamMember, TeamRules, Teams};
use crate::proto::wire::{CHUNK_HEADER, JoinConfig, ToPeer, ToSplitter, encode_chunk};
use crate::splitter::control::{Request, classify_request};

/// The `p2psp` command line as `main` builds it, for the configuration-file harness.
fn cli() -> &'static clap::Command {
    use clap::Args;
    static CLI: std::sync::OnceLock<clap::Command> = std::sync::OnceLock::new();
    CLI.get_or_init(|| {
        clap::Command::new("p2psp")
            .subcommand(crate::splitter::SplitterArgs::augment_args(
                clap::Command::new("splitter"),
            ))
            .subcommand(crate::peer::PeerArgs::augment_args(clap::Command::new(
                "peer",
            )))
    })
}

/// A `--config` file (TOML; keys are long flag names): the parser never panics, an error is one
/// line naming the file, and what it accepts is a command line clap parses into the
/// subcommand's flags.
pub fn config_file(data: &[u8]) {
    use clap::FromArgMatches;
    let (which, text) = match data.split_first() {
        Some((b, rest)) => (*b & 1, String::from_utf8_lossy(rest).into_owned()),
        None => (0, String::new()),
    };
    let sub = if which == 0 { "splitter" } else { "peer" };
    let raw: Vec<std::ffi::OsString> = ["p2psp", sub, "--config", "fuzz.toml"]
        .iter()
        .map(Into::into)
        .collect();
    match crate::config::expand_with(cli(), raw, |_| Ok(text)) {
        Ok(expanded) => {
            assert!(expanded.args.len() >= 4);
            if let Ok(m) = cli().clone().try_get_matches_from(&expanded.args) {
                let (name, sub) = m.subcommand().expect("a subcommand was given");
                if name == "splitter" {
                    let _ = crate::splitter::SplitterArgs::from_arg_matches(sub);
                } else {
                    let _ = crate::peer::PeerArgs::from_arg_matches(sub);
                }
            }
        }
        Err(e) => {
            assert!(!e.contains('\n'), "a multi-line error: {e}");
            assert!(e.starts_with("--config fuzz.toml: "), "{e}");
        }
    }
}

/// Reads the harness input byte by byte; zeros once it runs out.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    /// Up to `n` of the remaining bytes.
    fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.at.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.at = end.max(self.at);
        &self.data[start..end]
    }
}

fn ep(port: u16) -> Endpoint {
    Endpoint::new([127, 0, 0, 1].into(), port)
}

/// The join message a splitter sends (reference-notes §3.1): decoding never panics, a decoded
/// message re-encodes to exactly the bytes it came from, and every shorter prefix asks for more.
pub fn join_config(data: &[u8]) {
    match JoinConfig::decode(data) {
        Ok(Some((config, used))) => {
            assert!(used <= data.len());
            assert_eq!(used, config.encoded_len());
            let mut out = Vec::new();
            config
                .encode(&mut out)
                .expect("a decoded configuration encodes");
            assert_eq!(out, &data[..used], "re-encoding gives the same bytes");
            assert_eq!(JoinConfig::decode(&data[..used - 1]), Ok(None));
            let _ = config.check_usable();
        }
        Ok(None) => {}
        Err(_) => {
            // Only the channel can be wrong, and it is decided once its bytes are all there.
            assert!(data.len() >= 8);
        }
    }
}

/// An IMS join message (`proto::ims`, reference-notes §3.2), then the same bytes as datagrams
/// through an IMS peer's filter: never panics; a decoded message re-encodes to exactly its
/// bytes and every shorter prefix asks for more; the filter hands the core only the splitter's
/// endpoint, and a group datagram only when it is chunk-sized and from the splitter's address
/// (or 0.0.0.0).
pub fn ims_config(data: &[u8]) {
    use crate::proto::ims::{ImsConfig, ImsFilter, Via};
    match ImsConfig::decode(data) {
        Ok(Some((config, used))) => {
            assert!(used <= data.len());
            assert_eq!(used, config.encoded_len());
            let mut out = Vec::new();
            config
                .encode(&mut out)
                .expect("a decoded configuration encodes");
            assert_eq!(out, &data[..used], "re-encoding gives the same bytes");
            assert_eq!(ImsConfig::decode(&data[..used - 1]), Ok(None));
            if config.check_usable().is_ok() {
                assert!(config.group.ip().is_multicast() && config.group.port() != 0);
                let join = config.as_join_config();
                assert!(join.peers.is_empty() && join.monitors == 0);
            }
        }
        Ok(None) => {}
        Err(_) => assert!(data.len() >= 8),
    }
    let splitter = Endpoint::new([198, 18, 0, 1].into(), 8001);
    let mut filter = ImsFilter::new(splitter, CHUNK_HEADER + 64);
    let mut admitted = 0;
    for d in data.chunks(7) {
        if d.len() < 7 {
            break;
        }
        let from = Endpoint::new(
            [d[0], d[1], d[2], d[3]].into(),
            u16::from_be_bytes([d[4], d[5]]),
        );
        let via = if d[6] & 1 == 0 {
            Via::Group
        } else {
            Via::Unicast
        };
        let len = usize::from(d[6] >> 1) * 2;
        if let Some(as_from) = filter.admit(via, from, len) {
            admitted += 1;
            assert_eq!(as_from, splitter);
            match via {
                Via::Group => {
                    assert_eq!(len, CHUNK_HEADER + 64);
                    assert!(from.ip() == splitter.ip() || from.ip().is_unspecified());
                }
                Via::Unicast => assert_eq!(from, splitter),
            }
        }
    }
    let c = filter.counters();
    assert_eq!(c.group_chunks + c.dropped(), admitted + c.dropped());
    assert!(c.group_chunks <= admitted);
}

/// What a connection to the splitter's port asks for (its first bytes): never panics, decided by
/// the first byte for a join, and a prefix never decides differently from the whole.
pub fn join_request(data: &[u8]) {
    let r = classify_request(data);
    match r {
        Request::Join { monitor } => assert_eq!(data[0], if monitor { b'M' } else { b'P' }),
        Request::Header { head_len } => {
            assert!(head_len <= data.len() && data[0] == b'G');
            assert_eq!(classify_request(&data[..head_len]), r);
        }
        Request::NeedMore => assert!(data.is_empty() || data[0] == b'G'),
        Request::Bad => {}
    }
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let p = classify_request(&data[..cut]);
        if p != Request::NeedMore && !matches!(r, Request::Bad) {
            assert_eq!(p, r, "the first {cut} bytes decided otherwise");
        }
    }
    if let Ok(Some((head, used))) = RequestHead::parse(data) {
        assert!(used <= data.len());
        let _ = (head.method(), head.path(), head.version());
    }
}

/// The HTTP response head a source (Icecast, any HTTP server) sends, and a chunked body: the
/// parsers never panic, and decoding a body in two pieces gives what decoding it whole gives.
pub fn http_response(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b));
    if let Ok(Some((head, used))) = ResponseHead::parse(data) {
        assert!(used <= data.len());
        let _ = (head.status(), head.content_type(), head.content_length());
        assert_eq!(
            ResponseHead::parse(&data[..used]).map(|r| r.map(|(_, n)| n)),
            Ok(Some(used))
        );
        if head.is_chunked() {
            chunked(&data[used..], split);
        }
    }
    chunked(data, split);
}

fn chunked(body: &[u8], split: usize) {
    let mut whole = ChunkedDecoder::new();
    let mut whole_out = Vec::new();
    let whole_result = whole.decode(body, &mut whole_out);
    if let Ok(n) = whole_result {
        assert!(n <= body.len());
        assert!(n == body.len() || whole.is_done());
    }
    let at = split.min(body.len());
    let mut parts = ChunkedDecoder::new();
    let mut parts_out = Vec::new();
    let parts_result = parts.decode(&body[..at], &mut parts_out).and_then(|n| {
        if parts.is_done() {
            Ok(n)
        } else {
            parts.decode(&body[at..], &mut parts_out).map(|m| at + m)
        }
    });
    assert_eq!(whole_result.is_ok(), parts_result.is_ok());
    if let (Ok(a), Ok(b)) = (whole_result, parts_result) {
        assert_eq!(a, b);
        assert_eq!(whole_out, parts_out);
        assert_eq!(whole.is_done(), parts.is_done());
    }
}

/// Arbitrary datagrams, chunks, joins, leaves and time at the splitter's teams. Checks: the
/// splitter only ever sends to endpoints that joined (no reflection), datagrams from strangers
/// change nothing, and the counts agree.
pub fn udp_splitter(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let mut teams = Teams::new(TeamRules {
        buffer_size: 1 << (1 + flags % 8),
        expulsion: crate::proto::team::Expulsion {
            min_lost: u32::from(input.byte() % 8),
            fraction: f32::from(input.byte()) / 128.0,
        },
        loss_halving: Duration::from_millis(100),
        lrs: flags & 0x10 != 0,
        max_resends: u32::from(input.byte()),
        acs: flags & 0x20 != 0,
        complaints: flags & 0x40 != 0,
    });
    let start = Instant::now();
    let mut now = start;
    teams.handle_timeout(now);
    // Members are ports 1..=16, strangers 1000 and up.
    let mut joined: HashSet<Endpoint> = HashSet::new();
    let mut number = input.u16();
    let mut dests = Vec::new();
    while !input.done() {
        match input.byte() % 8 {
            0 => {
                dests.clear();
                let before = teams.team_count();
                teams.on_chunk(number, &mut dests);
                assert!(dests.len() <= before, "one destination per team");
                for d in &dests {
                    assert!(joined.contains(d), "chunk to {d}, which never joined");
                }
                number = number.wrapping_add(1 + u16::from(input.byte() % 4 == 0) * 100);
            }
            1 | 2 => {
                let from = ep(1 + u16::from(input.byte() % 16));
                let len = usize::from(input.byte() % 4);
                let d = input.take(len);
                check_to_splitter(d);
                teams.handle_datagram(from, d);
            }
            3 => {
                let from = ep(1000 + u16::from(input.byte()));
                let len = usize::from(input.byte());
                let d = input.take(len);
                let before = snapshot(&teams);
                teams.handle_datagram(from, d);
                assert_eq!(
                    before,
                    snapshot(&teams),
                    "a stranger's datagram changed the teams"
                );
            }
            4 => {
                now += Duration::from_millis(u64::from(input.byte()) * 4);
                teams.handle_timeout(now);
                if let Some(t) = teams.poll_timeout() {
                    assert!(t > now);
                }
            }
            5 => {
                let who = ep(1 + u16::from(input.byte() % 16));
                let b = input.byte();
                teams.insert(u32::from(b % 3), who, b & 0x80 != 0);
                joined.insert(who);
            }
            6 => {
                let who = ep(1 + u16::from(input.byte() % 16));
                teams.remove(who);
            }
            _ => {}
        }
        while let Some((to, payload)) = teams.poll_transmit() {
            assert!(joined.contains(&to), "goodbye to {to}, which never joined");
            assert_eq!(payload, b"G");
        }
        while let Some((_, to)) = teams.poll_resend() {
            assert!(teams.contains(to), "resend to {to}, not a member");
        }
        while teams.poll_event().is_some() {}
        let listed: usize = teams
            .team_ids()
            .iter()
            .map(|&t| teams.members(t).len())
            .sum();
        assert_eq!(listed, teams.peer_count());
    }
}

/// Every team's members with their monitor flags and loss counters.
type Snapshot = Vec<(u32, Vec<TeamMember>)>;

fn snapshot(teams: &Teams) -> Snapshot {
    teams
        .team_ids()
        .into_iter()
        .map(|t| (t, teams.members(t)))
        .collect()
}

fn check_to_splitter(d: &[u8]) {
    match ToSplitter::parse(d) {
        ToSplitter::LossReport(n) => assert_eq!(d, n.to_be_bytes()),
        ToSplitter::Goodbye => assert_eq!(d, b"G"),
        ToSplitter::Complaint { accused, number } => {
            assert_eq!(d, crate::proto::integrity::complaint(accused, number))
        }
        ToSplitter::DigestRequest(n) => assert_eq!(d, crate::proto::digest::request(n)),
        ToSplitter::Malformed => assert!(d.len() != 2 && d != b"G"),
    }
}

/// Arbitrary datagrams from the splitter, neighbours and strangers at a peer, with leaves and
/// time. Checks: a peer sends only to the splitter, to the peers it was given, or to endpoints
/// that sent it a hello or a chunk (no amplification toward anyone else); what it sends a
/// neighbour is byte-identical to a chunk from the splitter; the neighbour list stays bounded;
/// playout goes forward one chunk at a time.
pub fn udp_peer(data: &[u8]) {
    const C: usize = 64;
    let mut input = Input::new(data);
    let flags = input.byte();
    let splitter = ep(8001);
    let buffer = 1u16 << (1 + flags % 8);
    let mut rules = PeerRules::new(splitter, C, buffer);
    rules.monitor = flags & 0x10 != 0;
    rules.request_lost = flags & 0x20 != 0;
    rules.relay = flags & 0x40 == 0;
    rules.max_neighbours = 1 + usize::from(input.byte() % 8);
    rules.max_debt = 1 + i32::from(input.byte() % 130);
    let listed = [ep(1), ep(2), ep(3)];
    let mut peer = Peer::new(rules, &listed, u16::from(flags >> 7));
    let mut heard: HashSet<Endpoint> = listed.iter().copied().collect();
    let mut from_splitter: HashSet<Bytes> = HashSet::new();
    let start = Instant::now();
    let mut now = start;
    let mut newest = input.u16();
    let mut last_played: Option<u16> = None;
    let mut datagram = Vec::new();
    while !input.done() {
        match input.byte() % 8 {
            op @ 0..=2 => {
                let from = match op {
                    0 => splitter,
                    1 => ep(1 + u16::from(input.byte() % 4)),
                    _ => ep(100 + u16::from(input.byte())),
                };
                let scale = if input.byte() & 1 == 0 { 1 } else { 300 };
                let delta = i32::from(input.byte() as i8) * scale;
                let n = newest.wrapping_add(delta as u16);
                if op == 0 && seq::gt(n, newest) {
                    newest = n;
                }
                encode_chunk(n, &[n as u8; C], &mut datagram);
                let d = Bytes::copy_from_slice(&datagram);
                if from == splitter {
                    from_splitter.insert(d.clone());
                } else {
                    heard.insert(from);
                }
                peer.handle_datagram(now, from, d);
            }
            3 => {
                let from = ep(100 + u16::from(input.byte() % 8));
                let len = usize::from(input.byte() % 3);
                let d = Bytes::copy_from_slice(input.take(len));
                if d == b"H"[..] {
                    heard.insert(from);
                }
                check_to_peer(&d, C);
                peer.handle_datagram(now, from, d);
            }
            4 => {
                let from = ep(1 + u16::from(input.byte() % 4));
                let len = usize::from(input.u16() % 2048);
                let d = Bytes::copy_from_slice(input.take(len));
                check_to_peer(&d, C);
                if d.len() == CHUNK_HEADER + C || d == b"H"[..] {
                    heard.insert(from);
                }
                peer.handle_datagram(now, from, d);
            }
            5 => peer.leave(now),
            6 => {
                now += Duration::from_millis(u64::from(input.byte()) * 20);
                peer.handle_timeout(now);
            }
            _ => {}
        }
        assert!(peer.neighbours().count() <= listed.len().max(peer.rules().max_neighbours));
        while let Some(t) = peer.poll_transmit() {
            if t.dest == splitter {
                assert!(t.payload == b"G"[..] || t.payload.len() == 2);
                continue;
            }
            assert!(
                heard.contains(&t.dest),
                "sent to {}, never heard of",
                t.dest
            );
            assert!(
                t.payload == b"H"[..]
                    || t.payload == b"G"[..]
                    || from_splitter.contains(&t.payload),
                "sent a neighbour something that is not a chunk from the splitter"
            );
        }
        while let Some(e) = peer.poll_event() {
            match e {
                PeerEvent::Play { number, payload } => {
                    assert_eq!(payload.len(), C);
                    if let Some(last) = last_played {
                        assert!(seq::gt(number, last), "played {number} after {last}");
                    }
                    last_played = Some(number);
                }
                // After jumps (each under half the number space) order is relative again.
                PeerEvent::Skipped { .. } => last_played = None,
                _ => {}
            }
        }
    }
}

/// CIS digest mode (`proto::digest`): the digest and request decoders never panic and agree with
/// the encoders; then the bytes drive a verifying peer (a little program: valid digests from the
/// splitter, true and polluted chunks, forged and replayed digests, arbitrary datagrams, time).
/// Checks: every chunk played is the splitter's byte for byte (never a polluted one); a peer
/// sends neighbours only datagrams the splitter sent (chunks and digests, unchanged), hellos and
/// goodbyes, and the splitter only goodbyes, loss reports, complaints and digest requests.
pub fn digest(data: &[u8]) {
    use crate::proto::digest::{self as dg, DigestBook, DigestCheck};
    use crate::proto::integrity::{COMPLAINT_LEN, ChunkSigner};
    let signer = ChunkSigner::from_secret(&[5; 32]);
    let key = signer.verifier();
    // The decoders, on the raw bytes.
    if let Some(d) = dg::Digest::parse(data) {
        assert_eq!(data.len(), dg::digest_len(d.count()));
        assert!(d.covers(d.first as u16));
        assert_eq!(d.last().wrapping_sub(d.first) as usize, d.count() - 1);
    }
    if let Some(n) = dg::parse_request(data) {
        assert_eq!(data, dg::request(n));
    }
    let mut book = DigestBook::new(64);
    let check = book.check_digest(data, &key);
    assert_eq!(
        check == DigestCheck::Malformed,
        dg::Digest::parse(data).is_none()
    );
    assert_ne!(check, DigestCheck::Good, "only the splitter's key signs");

    // The peer program.
    const C: usize = 64;
    let content = |n: u16| -> Vec<u8> {
        let mut d = Vec::new();
        encode_chunk(n, &[n as u8 ^ 0xa5; C], &mut d);
        d
    };
    let mut input = Input::new(data);
    let splitter = ep(8001);
    let mut rules = PeerRules::new(splitter, C, 1 << (1 + input.byte() % 7));
    rules.verify = Some(key);
    let listed = [ep(1), ep(2), ep(3)];
    let mut peer = Peer::new(rules, &listed, 0);
    let mut heard: HashSet<Endpoint> = listed.iter().copied().collect();
    let mut from_splitter: HashSet<Bytes> = HashSet::new();
    let mut digests: Vec<Bytes> = Vec::new();
    let mut next: u32 = u32::from(input.u16());
    let mut now = Instant::now();
    while !input.done() {
        let from = match input.byte() % 3 {
            0 => splitter,
            n => ep(u16::from(n)),
        };
        match input.byte() % 8 {
            0 => {
                // The splitter's next group.
                let n = 1 + u32::from(input.byte() % 8);
                let hashes: Vec<dg::Hash> = (0..n)
                    .map(|i| dg::chunk_hash(&content(next.wrapping_add(i) as u16)))
                    .collect();
                let d = Bytes::from(dg::sign_digest(&signer, next, &hashes));
                next = next.wrapping_add(n);
                from_splitter.insert(d.clone());
                digests.push(d.clone());
                peer.handle_datagram(now, splitter, d);
            }
            1 | 2 => {
                // A true chunk near the newest group.
                let n = (next as u16).wrapping_sub(u16::from(input.byte() % 16));
                let d = Bytes::from(content(n));
                if from == splitter {
                    from_splitter.insert(d.clone());
                }
                peer.handle_datagram(now, from, d);
            }
            3 => {
                // A polluted chunk.
                let n = (next as u16).wrapping_sub(u16::from(input.byte() % 16));
                let mut d = content(n);
                let at = CHUNK_HEADER + usize::from(input.byte()) % C;
                d[at] ^= 1 | input.byte();
                peer.handle_datagram(now, from, Bytes::from(d));
            }
            4 => {
                // A forged digest: random hashes, no valid signature.
                let n = usize::from(1 + input.byte() % 4);
                let mut d = dg::DIGEST_TAG.to_vec();
                d.extend_from_slice(&next.wrapping_sub(u32::from(input.byte())).to_be_bytes());
                d.push(n as u8);
                d.extend_from_slice(input.take(dg::HASH_LEN * n + 64));
                d.resize(dg::digest_len(n), 0);
                peer.handle_datagram(now, from, Bytes::from(d));
            }
            5 => {
                // A replayed digest.
                if !digests.is_empty() {
                    let i = usize::from(input.byte()) % digests.len();
                    peer.handle_datagram(now, from, digests[i].clone());
                }
            }
            6 => {
                let len = usize::from(input.u16() % 700);
                let d = Bytes::copy_from_slice(input.take(len));
                if from == splitter {
                    from_splitter.insert(d.clone());
                }
                peer.handle_datagram(now, from, d);
            }
            _ => {
                now += Duration::from_millis(u64::from(input.byte()) * 10);
                peer.handle_timeout(now);
            }
        }
        while let Some(t) = peer.poll_transmit() {
            if t.dest == splitter {
                let p = &t.payload[..];
                assert!(
                    p == b"G"
                        || p.len() == 2
                        || p.len() == COMPLAINT_LEN
                        || dg::parse_request(p).is_some(),
                    "sent the splitter {p:?}"
                );
                continue;
            }
            heard.insert(t.dest);
            assert!(
                t.payload == b"H"[..]
                    || t.payload == b"G"[..]
                    || from_splitter.contains(&t.payload),
                "sent a neighbour something that is not the splitter's"
            );
        }
        while let Some(e) = peer.poll_event() {
            if let PeerEvent::Play { number, payload } = e {
                assert_eq!(
                    payload[..],
                    content(number)[CHUNK_HEADER..],
                    "played a chunk {number} that is not the splitter's"
                );
            }
        }
    }
}

fn check_to_peer(d: &[u8], chunk_size: usize) {
    match ToPeer::parse(d, chunk_size) {
        ToPeer::Chunk { number, payload } => {
            assert_eq!(d.len(), CHUNK_HEADER + chunk_size);
            assert_eq!(d[..2], number.to_be_bytes());
            assert_eq!(payload, &d[2..]);
        }
        ToPeer::Hello => assert_eq!(d, b"H"),
        ToPeer::Goodbye => assert_eq!(d, b"G"),
        ToPeer::Malformed => {
            assert!(d.len() != CHUNK_HEADER + chunk_size && d != b"H" && d != b"G")
        }
    }
}

/// NTS (reference-notes §6.4): the first byte picks who receives the rest (splitter from a
/// monitor or a peer, peer or monitor from the splitter or a teammate); every decoder never
/// panics, and what decodes re-encodes to exactly its bytes. The rest also goes through the TCP
/// decoders (ID, list 2) with the same round trip.
pub fn nts(data: &[u8]) {
    use crate::proto::nts::{self, PeerId, ToPeer as NtsToPeer, ToSplitter as NtsToSplitter};
    let Some((&selector, d)) = data.split_first() else {
        return;
    };
    let me = PeerId::from_random(u64::from(selector));
    let mut out = Vec::new();
    let m = NtsToSplitter::parse(d, selector & 1 == 1);
    if m != NtsToSplitter::Malformed {
        m.encode(&mut out);
        assert_eq!(out, d, "{m:?} re-encodes to its bytes");
    }
    match NtsToPeer::parse(d, selector & 2 == 2, &me, selector & 4 == 4) {
        NtsToPeer::NewPeer(n) => {
            n.encode(&mut out);
            assert_eq!(out, d);
        }
        NtsToPeer::NewPeerAtMonitor { id, endpoint } => {
            nts::encode_new_peer_at_monitor(&id, endpoint, &mut out);
            assert_eq!(out, d);
        }
        NtsToPeer::Ack(b) | NtsToPeer::Dbs(b) => assert_eq!(b, d),
        NtsToPeer::Hello { id, retry } => {
            assert_eq!(&d[..nts::ID_LEN], id.as_bytes());
            assert_eq!(d.len(), nts::ID_LEN + usize::from(retry));
        }
    }
    if let Ok(Some(id)) = nts::decode_id(d) {
        assert_eq!(&d[..nts::ID_LEN], id.as_bytes());
    }
    if let Ok(Some((entries, used))) = nts::decode_list2(d) {
        out.clear();
        nts::encode_list2(&entries, &mut out).expect("a decoded list encodes");
        assert_eq!(out, &d[..used]);
    }
}

/// A splitter's answer to the load probe (`proto::choice`): never panics, a closed connection
/// always decides, a prefix that decides decides as the whole does, and [`load_response`]
/// decodes to what it encodes. The bytes also drive a [`Choice`] whose order is always every
/// splitter once.
///
/// [`load_response`]: crate::proto::choice::load_response
/// [`Choice`]: crate::proto::choice::Choice
pub fn load_probe(data: &[u8]) {
    use crate::proto::choice::{Choice, Load, ProbeAnswer, load_response};
    let whole = ProbeAnswer::decode(data, false);
    assert_ne!(ProbeAnswer::decode(data, true), ProbeAnswer::NeedMore);
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let p = ProbeAnswer::decode(&data[..cut], false);
        if p != ProbeAnswer::NeedMore {
            assert_eq!(p, whole, "the first {cut} bytes decided otherwise");
        }
    }
    let mut input = Input::new(data);
    let (peers, max) = (u32::from(input.u16()), u32::from(input.u16()));
    let answer = ProbeAnswer::decode(&load_response(peers as usize, max as usize), false);
    let load = Load {
        peers,
        max: (max > 0).then_some(max),
    };
    assert_eq!(answer, ProbeAnswer::Ours(load));
    let list: Vec<Endpoint> = (0..(input.byte() % 6) + 1)
        .map(|_| ep(u16::from(input.byte() % 8)))
        .collect();
    let mut choice = Choice::new(&list);
    let t0 = Instant::now();
    let mut now = t0;
    while !input.done() {
        let at = ep(u16::from(input.byte() % 8));
        match input.byte() % 5 {
            0 => choice.on_load(
                at,
                Load {
                    peers: u32::from(input.byte()),
                    max: Some(u32::from(input.byte())).filter(|&m| m > 0),
                },
            ),
            1 => choice.on_failed(now, at),
            2 => {
                choice.on_joined(at);
            }
            3 => choice.on_stalled(now),
            _ => now += Duration::from_millis(u64::from(input.u16())),
        }
        let mut order = choice.order(now, u64::from(input.u16()));
        assert_eq!(order.len(), choice.splitters().count());
        order.sort();
        order.dedup();
        assert_eq!(order.len(), choice.splitters().count(), "a splitter twice");
    }
}

/// The forwarding fallback's decoders (`proto::nts_forward`): a forward request and a forwarded
/// chunk re-encode to their bytes; a forwarded chunk from the splitter is played but never
/// relayed; a forward request from a stranger changes nothing at an NTS splitter.
pub fn nts_forward(data: &[u8]) {
    use crate::proto::nts_forward::{ForwardRequest, encode_forwarded, parse_forwarded};
    use crate::proto::nts_splitter::NtsSplitter;
    let Some((&selector, d)) = data.split_first() else {
        return;
    };
    let mut out = Vec::new();
    if let Some(r) = ForwardRequest::parse(d) {
        r.encode(&mut out);
        assert_eq!(out, d, "{r:?} re-encodes to its bytes");
    }
    if let Some(c) = parse_forwarded(d, usize::from(selector)) {
        encode_forwarded(c, &mut out);
        assert_eq!(out, d);
    }
    // EMS (`proto::nts_ems`): the 7-byte join re-encodes to its bytes.
    if let Ok(Some(j)) = crate::proto::nts_ems::EmsJoin::decode(d) {
        assert_eq!(&j.encode()[..], &d[..crate::proto::nts_ems::EMS_JOIN_LEN]);
    }
    // A peer with one neighbour, chunks of 64 bytes: a forwarded chunk (67 bytes) from the
    // splitter is never relayed.
    let now = Instant::now();
    let splitter = Endpoint::new(std::net::Ipv4Addr::new(198, 18, 0, 1), 8001);
    let neighbour = Endpoint::new(std::net::Ipv4Addr::new(198, 18, 0, 2), 4000);
    let mut peer = Peer::new(PeerRules::new(splitter, 64, 16), &[neighbour], 0);
    while peer.poll_transmit().is_some() {}
    let before = peer.stats().relayed;
    peer.handle_datagram(now, splitter, Bytes::copy_from_slice(d));
    if parse_forwarded(d, CHUNK_HEADER + 64).is_some() {
        assert_eq!(peer.stats().forwarded, 1);
        assert_eq!(
            peer.stats().relayed,
            before,
            "a forwarded chunk is never relayed"
        );
        assert!(peer.poll_transmit().is_none());
    }
    // An NTS splitter without members: nothing is taken, nothing sent.
    let mut s = NtsSplitter::new(4);
    s.handle_datagram(now, neighbour, d);
    if ForwardRequest::parse(d).is_some() {
        assert!(
            s.poll_action().is_none(),
            "a stranger's forward request is not echoed"
        );
        assert_eq!(s.counters().forward_requests, 0);
    }
}

/// NTS port probing (issue 11, `proto::nts_probe`): a program of operations on one probing peer
/// and one splitter planner. Every byte string goes through both decoders, and what decodes
/// re-encodes to exactly its bytes. Whatever arrives, the peer keeps within its socket and
/// session bounds, routes traffic only to endpoints a probe socket heard the expected teammate
/// at, and the planner answers only queries for its sessions.
///
/// Operations (first byte `% 6`), each followed by a length byte and that many bytes:
/// 0 a rendezvous from the splitter; 1 a datagram at probe socket (byte 0, byte 1) from an
/// endpoint made of bytes 2–7; 2 time passes (byte 0 × 50 ms); 3 a message to the splitter
/// planner from the peer named by its bytes; 4 a pair and U4 reports; 5 the planner's timeout.
pub fn nts_probe(data: &[u8]) {
    use std::net::Ipv4Addr;

    use crate::proto::nts::PeerId;
    use crate::proto::nts_probe::{
        MAX_SOCKETS, PeerView, ProbeAction, ProbePeer, ProbePlanner, ProbeToSplitter, Rendezvous,
        SockRef,
    };
    let t0 = Instant::now();
    let mut now = t0;
    let splitter: Endpoint = Endpoint::new(Ipv4Addr::new(198, 18, 0, 1), 8001);
    let me = PeerId::from_random(7);
    let mut peer = ProbePeer::new(now, me, splitter, 11);
    let mut planner = ProbePlanner::default();
    // The teammates a rendezvous named, with the address it gave.
    let mut named: Vec<(u32, PeerId, Ipv4Addr)> = Vec::new();
    let mut rest = data;
    let mut out = Vec::new();
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (d, next) = tail.split_at(n);
        rest = next;
        if let Some(m) = ProbeToSplitter::parse(d) {
            m.encode(&mut out);
            assert_eq!(out, d, "{m:?} re-encodes to its bytes");
        }
        if let Some(r) = Rendezvous::parse(d) {
            r.encode(&mut out);
            assert_eq!(out, d, "{r:?} re-encodes to its bytes");
        }
        match op % 6 {
            0 => {
                if let Some(r) = Rendezvous::parse(d) {
                    named.push((r.session, r.other, *r.endpoint.ip()));
                    peer.on_rendezvous(now, r);
                }
            }
            1 if d.len() >= 8 => {
                let via = SockRef::Probe {
                    session: u32::from(d[0]),
                    index: u16::from(d[1]),
                };
                let from = Endpoint::new(
                    Ipv4Addr::new(d[2], d[3], d[4], d[5]),
                    u16::from_be_bytes([d[6], d[7]]),
                );
                let before = peer.route(from);
                peer.handle_datagram(now, via, from, &d[8..]);
                if before.is_none() && peer.route(from) == Some(via) {
                    // Only the teammate a rendezvous of that session named, at its address,
                    // saying hello with its ID.
                    assert!(
                        named.iter().any(|&(s, id, ip)| {
                            u32::from(d[0]) == s && ip == *from.ip() && &d[8..] == id.as_bytes()
                        }),
                        "routed to {from} without a probe hit"
                    );
                }
            }
            2 => {
                now += Duration::from_millis(50 * u64::from(d.first().copied().unwrap_or(1)));
                peer.handle_timeout(now);
            }
            3 if d.len() >= 6 => {
                let from = Endpoint::new(
                    Ipv4Addr::new(198, 18, 0, d[0]),
                    u16::from_be_bytes([d[1], d[2]]),
                );
                if let Some(m) = ProbeToSplitter::parse(&d[3..]) {
                    match m {
                        ProbeToSplitter::Capable(id) => planner.capable(id),
                        ProbeToSplitter::Query { id, session } => {
                            let mut sweeps = Vec::new();
                            let took = planner.query(id, session, from, &mut sweeps);
                            assert!(took || sweeps.is_empty());
                            for (_, s) in sweeps {
                                assert!(Rendezvous::parse(&s).is_some());
                            }
                        }
                    }
                }
            }
            4 if d.len() >= 4 => {
                let a = PeerId::from_random(u64::from(d[0] % 4));
                let b = PeerId::from_random(u64::from(d[1] % 4));
                planner.pair(now, a, b);
                planner.heard(b, a);
                planner.observe(a, u16::from_be_bytes([d[2], d[3]]));
            }
            5 => {
                planner.handle_timeout(now);
                for (a, b) in planner.due(now + Duration::from_secs(2)) {
                    let view = |id: PeerId, k: u8| PeerView {
                        id,
                        endpoint: Endpoint::new(Ipv4Addr::new(198, 18, 0, 100 + k), 20000),
                        step: u16::from(d.first().copied().unwrap_or(0) & k),
                        last_port: 20000,
                    };
                    for (_, m) in planner.start(now, view(a, 1), view(b, 2)) {
                        assert!(Rendezvous::parse(&m).is_some());
                    }
                }
            }
            _ => {}
        }
        assert!(peer.open_sockets() <= MAX_SOCKETS);
        while let Some(a) = peer.poll_action() {
            if let ProbeAction::Open { count, .. } = a {
                assert!(usize::from(count) <= MAX_SOCKETS);
            }
        }
        named.truncate(4096);
    }
}
