//! Serving the played stream: HTTP to players (VLC, mpv, ffplay) and `--output`.
//!
//! A player gets the splitter's HTTP head (`200 OK` with the stream's content type), the stream
//! header, then the played stream from a point where it can start decoding ([`StartFinder`]): the
//! next Ogg page, the next Matroska/WebM Cluster that starts with a keyframe, the next MP3 or
//! ADTS frame, for MPEG-TS the next video random access point after the latest program tables
//! (each other stream from its next payload unit start); other streams from the next chunk. A player that disconnects and comes back
//! is served again. A slow player never holds the peer back: chunks it cannot take are counted
//! and it is dropped after a write timeout.
//!
//! # When the source restarts
//!
//! A source that restarts (an Icecast server restarted, an encoder reconnected) starts a new
//! stream with a new header at the splitter. Chunks carry the new stream from its first byte, so
//! a player that stays connected receives the new stream's own header bytes inline, as a chained
//! Ogg stream or an MPEG-TS discontinuity; players that cannot follow that reconnect. Each time
//! a player connects, the peer fetches the header again from the splitter, which also says from
//! which chunk on that header holds ([`StreamId`]): a player that connects while the peer still
//! plays chunks of the old stream gets the new stream from its first chunk; otherwise the new
//! header then the stream from a start point. If the splitter cannot be reached, the header the
//! peer has is used.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::join::{FetchedHeader, StreamId, fetch_header_within};
use super::{Output, PeerCounters};
use crate::http::ResponseHead;
use crate::media::{StartFinder, ogg_complete_len};

/// Played chunks waiting for the player thread.
const QUEUE: usize = 4096;
/// How long a player connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How long fetching the header again may take when a player connects.
const REFETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// A played chunk, for the player thread.
#[derive(Debug, Clone)]
pub struct Played {
    /// Its number (a gap in numbers means lost chunks).
    pub number: u16,
    /// Its payload.
    pub payload: Bytes,
}

/// What the peer's main thread tells the player thread.
#[derive(Debug)]
pub enum ToPlayer {
    /// The next played chunk.
    Chunk(Played),
    /// The peer joined a team again after a stall (its splitter restarted, or removed it), with
    /// this stream header: players stay connected and resume at a start point, after the new
    /// header when it differs from the one they had.
    Rejoined(FetchedHeader),
}

/// Where to fetch the stream header again when a player connects.
#[derive(Debug, Clone)]
pub struct Refetch {
    /// The header endpoint the splitter named.
    pub source: SocketAddrV4,
    /// The channel.
    pub channel: String,
    /// The header size the join message gave.
    pub size: usize,
}

/// Splits the fetched header into the HTTP head players get and the stream header bytes.
///
/// A splitter of this project (and a reference splitter in front of Icecast) answers the header
/// request with an HTTP response, whose head goes to players as it is; otherwise a plain
/// `HTTP/1.0 200` head is made up. An Ogg header cut inside a page (from a reference splitter) is
/// trimmed to its whole pages.
pub fn split_header(header: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (head, mut bytes) = match ResponseHead::parse(header) {
        Ok(Some((_, used))) => (header[..used].to_vec(), header[used..].to_vec()),
        _ => (
            crate::http::response_head(200, "OK", &[("Content-Type", "application/octet-stream")]),
            header.to_vec(),
        ),
    };
    if let Some(whole) = ogg_complete_len(&bytes)
        && whole > 0
    {
        bytes.truncate(whole);
    }
    (head, bytes)
}

/// The header players get.
#[derive(Debug, Clone)]
struct Header {
    head: Vec<u8>,
    bytes: Vec<u8>,
    stream: Option<StreamId>,
}

impl Header {
    fn new(h: &FetchedHeader) -> Header {
        let (head, bytes) = split_header(&h.raw);
        Header {
            head,
            bytes,
            stream: h.stream,
        }
    }
}

/// A player that connected, with the header fetched for it.
struct Greeted {
    stream: TcpStream,
    addr: SocketAddr,
    header: Option<FetchedHeader>,
}

enum State {
    /// Waiting for the first chunk of a stream that playout has not reached yet.
    FirstChunk(u16),
    /// Header sent; waiting for a point in the stream where decoding can start.
    StartPoint,
    /// Gets every played chunk.
    Playing,
}

struct Player {
    stream: TcpStream,
    addr: SocketAddr,
    state: State,
    /// Cleared when a write fails: the player is dropped.
    ok: bool,
}

/// Starts the player thread (and, with a listener, the thread that greets players); returns
/// where to send played chunks.
pub fn spawn(
    listener: Option<TcpListener>,
    output: Option<Output>,
    header: FetchedHeader,
    refetch: Option<Arc<std::sync::Mutex<Refetch>>>,
    counters: Arc<PeerCounters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Sender<ToPlayer>, JoinHandle<()>)> {
    let header = Header::new(&header);
    let mut out: Option<Box<dyn Write + Send>> = match output {
        Some(Output::File(p)) => Some(Box::new(std::io::BufWriter::new(
            File::create(&p)
                .map_err(|e| anyhow::anyhow!("cannot create --output {}: {e}", p.display()))?,
        ))),
        Some(Output::Stdout) => Some(Box::new(std::io::stdout())),
        Some(Output::Check(checker)) => Some(Box::new(CheckWriter {
            checker,
            header: true,
        })),
        None => None,
    };
    if let Some(o) = out.as_mut() {
        o.write_all(&header.bytes)?;
    }
    let (greet_tx, greet_rx) = crossbeam_channel::bounded::<Greeted>(16);
    if let Some(l) = listener {
        l.set_nonblocking(true)?;
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("player-accept".into())
            .spawn(move || greet(&l, refetch.as_deref(), &greet_tx, &stop))?;
    } else {
        drop(greet_tx);
    }
    let (tx, rx) = crossbeam_channel::bounded::<ToPlayer>(QUEUE);
    let handle = std::thread::Builder::new()
        .name("player".into())
        .spawn(move || {
            serve(out, header, rx, greet_rx, &counters);
        })?;
    Ok((tx, handle))
}

/// Accepts players, reads their request and fetches the current header for each, from where the
/// peer's current splitter says (the peer updates `refetch` when it joins another).
fn greet(
    listener: &TcpListener,
    refetch: Option<&std::sync::Mutex<Refetch>>,
    tx: &Sender<Greeted>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let (mut stream, addr) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                tracing::warn!("accepting a player failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        // Read (and ignore) the request so closing later does not reset the connection.
        let mut req = [0u8; 4096];
        let _ = stream.read(&mut req);
        let header = refetch.and_then(|r| {
            let r = r.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match fetch_header_within(r.source, &r.channel, r.size, REFETCH_TIMEOUT) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(
                        "cannot fetch the stream header again for player {addr} ({e:#}); it gets the one fetched earlier"
                    );
                    None
                }
            }
        });
        if tx
            .send(Greeted {
                stream,
                addr,
                header,
            })
            .is_err()
        {
            return;
        }
    }
}

fn serve(
    mut out: Option<Box<dyn Write + Send>>,
    mut header: Header,
    rx: Receiver<ToPlayer>,
    mut greetings: Receiver<Greeted>,
    counters: &PeerCounters,
) {
    let mut players: Vec<Player> = Vec::new();
    let mut finder = StartFinder::new();
    finder.learn_header(&header.bytes);
    let mut last: Option<u16> = None;
    if let Some(id) = header.stream {
        counters
            .stream_generation
            .store(id.generation, Ordering::Relaxed);
    }
    loop {
        crossbeam_channel::select! {
            recv(rx) -> msg => match msg {
                Ok(ToPlayer::Rejoined(h)) => {
                    let new = Header::new(&h);
                    let changed = new.bytes != header.bytes;
                    header = new;
                    if let Some(id) = header.stream {
                        counters.stream_generation.store(id.generation, Ordering::Relaxed);
                    }
                    finder.gap();
                    last = None;
                    if changed
                        && let Some(o) = out.as_mut()
                        && o.write_all(&header.bytes).is_err()
                    {
                        out = None;
                    }
                    resume(&mut players, &header, changed);
                }
                Ok(ToPlayer::Chunk(p)) => {
                    if last.is_some_and(|l| p.number != l.wrapping_add(1)) {
                        finder.gap();
                    }
                    last = Some(p.number);
                    if let Some(o) = out.as_mut()
                        && let Err(e) = o.write_all(&p.payload)
                    {
                        if e.kind() != ErrorKind::BrokenPipe {
                            tracing::warn!("--output write failed: {e}; output stops");
                        }
                        out = None;
                    }
                    play(&mut players, &mut finder, &header, &p);
                }
                Err(_) => break,
            },
            recv(greetings) -> g => match g {
                Ok(g) => {
                    if let Some(h) = &g.header
                        && h.stream.map(|s| s.generation) >= header.stream.map(|s| s.generation)
                    {
                        header = Header::new(h);
                        finder.learn_header(&header.bytes);
                        if let Some(id) = header.stream {
                            counters.stream_generation.store(id.generation, Ordering::Relaxed);
                        }
                    }
                    counters.player_connects.fetch_add(1, Ordering::Relaxed);
                    if let Some(p) = attach(g, &header, last) {
                        players.push(p);
                    }
                }
                // No listener (or its thread ended): stop selecting on it.
                Err(_) => greetings = crossbeam_channel::never(),
            },
        }
        counters
            .players
            .store(players.len() as u64, Ordering::Relaxed);
    }
    if let Some(mut o) = out {
        let _ = o.flush();
    }
}

/// Feeds `--output` writes to a pattern checker: the first write is the stream header, every
/// later one a chunk payload.
struct CheckWriter {
    checker: Arc<crate::pattern::Checker>,
    header: bool,
}

impl Write for CheckWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::mem::take(&mut self.header) {
            self.checker.header(buf);
        } else {
            self.checker.chunk(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends a new player what it gets before stream data; `None` if it went away.
fn attach(g: Greeted, header: &Header, last: Option<u16>) -> Option<Player> {
    let mut stream = g.stream;
    let new_stream_ahead = match (header.stream, last) {
        (Some(id), Some(played)) => id.ahead_of(played).then_some(id.first_chunk),
        _ => None,
    };
    let state = match new_stream_ahead {
        // Chunks from the first one on hold the new stream from its first byte, header included.
        Some(first) => {
            stream.write_all(&header.head).ok()?;
            State::FirstChunk(first)
        }
        None => {
            stream.write_all(&header.head).ok()?;
            stream.write_all(&header.bytes).ok()?;
            State::StartPoint
        }
    };
    tracing::info!("player {} connected", g.addr);
    Some(Player {
        stream,
        addr: g.addr,
        state,
        ok: true,
    })
}

/// After a rejoin: every player waits for a start point of the stream, after the new header if
/// the stream changed (a player that already has the header would choke on it again: an Ogg
/// stream's header pages repeated mid-stream, say).
fn resume(players: &mut Vec<Player>, header: &Header, changed: bool) {
    for pl in players.iter_mut() {
        if changed || matches!(pl.state, State::FirstChunk(_)) {
            pl.write(&header.bytes);
        }
        pl.state = State::StartPoint;
    }
    players.retain(|pl| pl.ok);
    tracing::info!(
        "rejoined: {} player(s) resume at the next start point{}",
        players.len(),
        if changed { " after the new header" } else { "" }
    );
}

/// Hands one played chunk to every player, each as its state says.
fn play(players: &mut Vec<Player>, finder: &mut StartFinder, header: &Header, p: &Played) {
    for pl in players.iter_mut() {
        if let State::FirstChunk(first) = pl.state {
            match crate::proto::seq::diff(p.number, first) {
                0 => pl.state = State::Playing,
                d if d > 0 => {
                    // Its first chunk was lost: the header, then a start point.
                    pl.write(&header.bytes);
                    pl.state = State::StartPoint;
                }
                _ => {}
            }
        }
    }
    let want = players
        .iter()
        .any(|pl| matches!(pl.state, State::StartPoint));
    let start = finder.push(&p.payload, want);
    for pl in players.iter_mut() {
        match pl.state {
            State::Playing => pl.write(&p.payload),
            State::StartPoint => {
                if let Some(s) = &start {
                    pl.write(s);
                    pl.state = State::Playing;
                }
            }
            State::FirstChunk(_) => {}
        }
    }
    players.retain(|pl| pl.ok);
}

impl Player {
    fn write(&mut self, bytes: &[u8]) {
        if !self.ok {
            return;
        }
        if let Err(e) = self.stream.write_all(bytes) {
            tracing::info!("player {} went away ({e})", self.addr);
            self.ok = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A player connection: the serving side (for `attach`) and the player's side.
    fn connection() -> (Greeted, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let player = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        player
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (stream, addr) = l.accept().unwrap();
        (
            Greeted {
                stream,
                addr,
                header: None,
            },
            player,
        )
    }

    fn received(player: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = player.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    fn header(stream: Option<StreamId>) -> Header {
        Header {
            head: b"HEAD|".to_vec(),
            bytes: b"HEADER|".to_vec(),
            stream,
        }
    }

    fn chunk(number: u16, payload: &[u8]) -> Played {
        Played {
            number,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn a_player_that_connects_before_a_new_stream_plays_it_from_its_first_chunk() {
        // Stream 2 starts at chunk 10; the splitter has sent 3 of its chunks; playout is at 8.
        let h = header(Some(StreamId {
            generation: 2,
            first_chunk: 10,
            chunks: 3,
        }));
        let (g, mut player) = connection();
        let mut players = vec![attach(g, &h, Some(8)).unwrap()];
        let mut finder = StartFinder::new();
        for (n, p) in [(9, &b"old|"[..]), (10, b"NEW STREAM|"), (11, b"more|")] {
            play(&mut players, &mut finder, &h, &chunk(n, p));
        }
        assert_eq!(received(&mut player), b"HEAD|NEW STREAM|more|");
    }

    #[test]
    fn a_player_that_connects_mid_stream_gets_the_header_then_a_start_point() {
        let h = header(Some(StreamId {
            generation: 1,
            first_chunk: 0,
            chunks: 5000,
        }));
        let (g, mut player) = connection();
        let mut players = vec![attach(g, &h, Some(4000)).unwrap()];
        let mut finder = StartFinder::new();
        // Ogg: the player starts at the next page.
        let mut page = b"OggS\0\0".to_vec();
        page.resize(40, 7);
        let mut c = vec![1u8; 30];
        c.extend_from_slice(&page);
        play(&mut players, &mut finder, &h, &chunk(4001, &c));
        play(&mut players, &mut finder, &h, &chunk(4002, b"next"));
        let mut want = b"HEAD|HEADER|".to_vec();
        want.extend_from_slice(&page);
        want.extend_from_slice(b"next");
        assert_eq!(received(&mut player), want);
    }

    #[test]
    fn a_player_whose_first_chunk_was_lost_gets_the_header_and_a_start_point() {
        let h = header(Some(StreamId {
            generation: 2,
            first_chunk: 10,
            chunks: 0,
        }));
        let (g, mut player) = connection();
        let mut players = vec![attach(g, &h, Some(9)).unwrap()];
        let mut finder = StartFinder::new();
        let mut page = b"OggS\0\0".to_vec();
        page.resize(40, 7);
        play(&mut players, &mut finder, &h, &chunk(11, &page));
        assert_eq!(
            received(&mut player),
            [&b"HEAD|HEADER|"[..], &page].concat()
        );
    }

    #[test]
    fn a_player_that_goes_away_is_dropped() {
        let h = header(None);
        let (g, player) = connection();
        let mut players = vec![attach(g, &h, None).unwrap()];
        drop(player);
        let mut finder = StartFinder::new();
        for n in 0..200 {
            play(&mut players, &mut finder, &h, &chunk(n, &[0u8; 20000]));
            if players.is_empty() {
                return;
            }
        }
        panic!("a closed player was never dropped");
    }

    #[test]
    fn header_split_keeps_the_head_and_trims_ogg() {
        let mut raw = crate::http::response_head(200, "OK", &[("Content-Type", "application/ogg")]);
        let head_len = raw.len();
        // One whole page of 27 + 1 + 5 bytes, then the start of another.
        let mut page = b"OggS\0\x02".to_vec();
        page.extend([0u8; 20]);
        page.push(1);
        page.push(5);
        page.extend(b"hello");
        raw.extend(&page);
        raw.extend(&page[..10]);
        let (head, bytes) = split_header(&raw);
        assert_eq!(head.len(), head_len);
        assert_eq!(bytes, page);
        let (_, plain) = split_header(b"not http at all");
        assert_eq!(plain, b"not http at all");
    }
}
