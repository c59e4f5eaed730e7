#![forbid(unsafe_code)]
//! Where the splitter's bytes come from: the test pattern, standard input, or a live HTTP stream.
//!
//! `--source` names one ([`SourceSpec`]); [`open`] turns it into a [`Source`] that the splitter's
//! reader thread polls with [`Source::next`]. A source says when a stream starts
//! ([`SourceItem::StreamStart`], so the splitter captures the stream header from the bytes that
//! follow), hands over data, and says when no more will come.
//!
//! Unlike the reference splitter, which chunked the raw HTTP response, the HTTP source parses the
//! response ([`crate::http`]) and hands over only the body: status checked, headers dropped, chunked
//! transfer coding removed, ICY metadata never requested. A live source that drops or stalls is
//! reconnected for ever (with backoff) until the stop flag is raised; each new connection starts a
//! new stream.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};

use crate::http::{ChunkedDecoder, HttpError, ResponseHead};
use crate::pattern;

/// What `--source` names: `test`, `-` (stdin) or `http://host[:port]/mount`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// `test`: the deterministic [`pattern`] stream, paced at the configured bitrate.
    Test,
    /// `-`: standard input, read as it comes.
    Stdin,
    /// `http://host[:port]/mount`: a live HTTP stream (Icecast, a media server...).
    Http(HttpUrl),
}

/// An `http://` URL, reduced to what a GET request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// Host name or IP address (an IPv6 address without its brackets).
    pub host: String,
    /// TCP port, 80 unless the URL names one.
    pub port: u16,
    /// Request target: the path, starting with `/`, and the query if any.
    pub path: String,
}

/// Why a `--source` value is not usable. The user's input is at fault; the message says how.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// An `https://` URL: TLS is not supported.
    #[error(
        "https is not supported in {url:?}: give an http:// URL (a local TLS-terminating proxy can \
         front an https source)"
    )]
    Https {
        /// The value given.
        url: String,
    },
    /// A URL with a scheme other than `http`.
    #[error("unsupported URL scheme {scheme:?} in {url:?}: only http:// is supported")]
    UnsupportedScheme {
        /// The scheme, as given.
        scheme: String,
        /// The value given.
        url: String,
    },
    /// Neither `test`, `-` nor a URL.
    #[error("unknown source {given:?}: expected `test`, `-` (stdin) or `http://host[:port]/mount`")]
    Unknown {
        /// The value given.
        given: String,
    },
    /// No host between `http://` and the path.
    #[error("missing host in {url:?}: expected `http://host[:port]/mount`")]
    MissingHost {
        /// The value given.
        url: String,
    },
    /// The host has characters a host name or IP address cannot have.
    #[error("invalid host {host:?} in {url:?}")]
    BadHost {
        /// The host, as given.
        host: String,
        /// The value given.
        url: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("invalid port {port:?} in {url:?}: expected a number from 1 to 65535")]
    BadPort {
        /// The port, as given.
        port: String,
        /// The value given.
        url: String,
    },
    /// `user:password@` in the URL.
    #[error("credentials in the source URL are not supported: {url:?}")]
    Credentials {
        /// The value given.
        url: String,
    },
    /// Whitespace or control characters in the path.
    #[error(
        "invalid character in the path of {url:?}: percent-encode spaces and control characters"
    )]
    BadPath {
        /// The value given.
        url: String,
    },
}

impl FromStr for SourceSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "test" => return Ok(Self::Test),
            "-" => return Ok(Self::Stdin),
            _ => {}
        }
        let Some((scheme, _)) = s.split_once("://") else {
            return Err(SpecError::Unknown {
                given: s.to_owned(),
            });
        };
        if scheme.eq_ignore_ascii_case("http") {
            s.parse().map(Self::Http)
        } else if scheme.eq_ignore_ascii_case("https") {
            Err(SpecError::Https { url: s.to_owned() })
        } else {
            Err(SpecError::UnsupportedScheme {
                scheme: scheme.to_owned(),
                url: s.to_owned(),
            })
        }
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Test => f.write_str("test"),
            Self::Stdin => f.write_str("-"),
            Self::Http(url) => url.fmt(f),
        }
    }
}

impl FromStr for HttpUrl {
    type Err = SpecError;

    /// Parses `http://host[:port][/path][?query][#fragment]`; the fragment is dropped, an empty
    /// path becomes `/`.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let url = || s.to_owned();
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(SpecError::Https { url: url() });
            }
            Some((scheme, _)) => {
                return Err(SpecError::UnsupportedScheme {
                    scheme: scheme.to_owned(),
                    url: url(),
                });
            }
            None => return Err(SpecError::Unknown { given: url() }),
        };
        let rest = rest.split('#').next().unwrap_or("");
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(SpecError::Credentials { url: url() });
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(SpecError::BadHost {
                    host: authority.to_owned(),
                    url: url(),
                });
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(SpecError::BadHost {
                    host: host.to_owned(),
                    url: url(),
                });
            }
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => {
                        return Err(SpecError::BadHost {
                            host: authority.to_owned(),
                            url: url(),
                        });
                    }
                },
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(SpecError::MissingHost { url: url() });
        }
        let host_ok = host.contains(':')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok {
            return Err(SpecError::BadHost {
                host: host.to_owned(),
                url: url(),
            });
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(SpecError::BadPort {
                        port: p.to_owned(),
                        url: url(),
                    });
                }
            },
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(SpecError::BadPath { url: url() });
        }
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            path,
        })
    }
}

impl HttpUrl {
    /// The `Host` header value: `host`, or `host:port` when the port is not 80 (IPv6 bracketed).
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.path)
    }
}

/// What a source gives the splitter.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceItem {
    /// A (new) stream starts: the bytes that follow are from its beginning (the splitter captures
    /// its header from them). First item of every source; again after each reconnect.
    StreamStart {
        /// The stream's media type, when the source tells it.
        content_type: Option<String>,
    },
    /// `n` bytes were written at the start of the caller's buffer.
    Data(usize),
    /// No more data will ever come (stdin EOF, or the stop flag was raised).
    End,
}

/// Why a source cannot be opened or read. Which side is at fault shows in the variant: the
/// configuration ([`SourceError::ZeroBitrate`]), the network or the remote server (the rest).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The test source was asked for 0 bit/s.
    #[error("the test source needs a bitrate above 0 bit/s")]
    ZeroBitrate,
    /// The host name does not resolve.
    #[error("cannot resolve host {host:?}: {source}")]
    Resolve {
        /// The host name.
        host: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// No TCP connection could be made (refused, unreachable, timed out...).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The source URL.
        url: String,
        /// The error of the last address tried.
        source: io::Error,
    },
    /// Connecting and receiving the response head took longer than allowed.
    #[error("{url} did not answer within {} s", timeout.as_secs_f32())]
    Timeout {
        /// The source URL.
        url: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The server answered with a status other than 200.
    #[error(
        "{url} answered `{status} {reason}`{}, expected `200 OK`",
        location.as_ref().map(|l| format!(" (redirect to {l}; redirects are not followed)")).unwrap_or_default()
    )]
    Status {
        /// The source URL.
        url: String,
        /// The status code.
        status: u16,
        /// The reason phrase.
        reason: String,
        /// The `Location` header, if any.
        location: Option<String>,
    },
    /// The server's answer is not a valid HTTP response (or its body is malformed).
    #[error("{url} did not answer with valid HTTP: {source}")]
    NotHttp {
        /// The source URL.
        url: String,
        /// What is wrong with the answer.
        source: HttpError,
    },
    /// The server closed the connection before the end of the response head.
    #[error("{url} closed the connection before a complete HTTP response head")]
    ClosedEarly {
        /// The source URL.
        url: String,
    },
    /// A socket error while sending the request or reading the head.
    #[error("I/O error talking to {url}: {source}")]
    Io {
        /// The source URL.
        url: String,
        /// The socket error.
        source: io::Error,
    },
    /// Reading standard input failed.
    #[error("cannot read standard input: {source}")]
    Stdin {
        /// The read error.
        source: io::Error,
    },
    /// The stop flag was raised while connecting.
    #[error("stopped while connecting to {url}")]
    Stopped {
        /// The source URL.
        url: String,
    },
}

/// A stream of bytes for the splitter.
pub trait Source: Send {
    /// Blocks until there is something to report, and reports it. Data is written to the start of
    /// `buf` (an empty `buf` gets `Data(0)`). Returns [`SourceItem::End`] once the stop flag is
    /// raised, within about 100 ms even while waiting for data.
    fn next(&mut self, buf: &mut [u8]) -> Result<SourceItem, SourceError>;
    /// A short description for logs: `test pattern at 1000000 bit/s`, `stdin`, the URL.
    fn describe(&self) -> String;
    /// How many times the source reconnected after losing its stream (0 for sources that never
    /// reconnect).
    fn reconnects(&self) -> u64;
}

/// Opens the source `spec` names. The test source sends at `bitrate_bps` bits per second (other
/// sources ignore it). An HTTP source connects once up front and fails within 5 s with a clear
/// error if the server is unreachable, refuses, answers other than 200, or does not speak HTTP.
/// Raising `stop` makes every source end.
pub fn open(
    spec: &SourceSpec,
    bitrate_bps: u64,
    stop: Arc<AtomicBool>,
) -> Result<Box<dyn Source>, SourceError> {
    Ok(match spec {
        SourceSpec::Test => Box::new(TestSource::new(bitrate_bps, stop)?),
        SourceSpec::Stdin => Box::new(StdinSource::new(stop)),
        SourceSpec::Http(url) => Box::new(HttpSource::connect(url.clone(), stop)?),
    })
}

/// How often a blocked source looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Whether `stop` is raised.
fn stopped(stop: &AtomicBool) -> bool {
    stop.load(Ordering::Relaxed)
}

/// Copies as much of `pending[*pos..]` as fits into `buf`; clears `pending` once drained.
fn drain(pending: &mut Vec<u8>, pos: &mut usize, buf: &mut [u8]) -> usize {
    let n = (pending.len() - *pos).min(buf.len());
    buf[..n].copy_from_slice(&pending[*pos..*pos + n]);
    *pos += n;
    if *pos == pending.len() {
        pending.clear();
        *pos = 0;
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Test source

/// The media type the test source announces.
pub const TEST_CONTENT_TYPE: &str = "application/octet-stream";

/// The [`pattern`] stream from offset 0, paced at a steady bitrate.
#[derive(Debug)]
pub struct TestSource {
    pacer: Pacer,
    epoch: Instant,
    offset: u64,
    started: bool,
    stop: Arc<AtomicBool>,
}

impl TestSource {
    /// A test source sending `bitrate_bps` bits per second; fails when that is 0.
    pub fn new(bitrate_bps: u64, stop: Arc<AtomicBool>) -> Result<Self, SourceError> {
        if bitrate_bps == 0 {
            return Err(SourceError::ZeroBitrate);
        }
        Ok(Self {
            pacer: Pacer::new(bitrate_bps),
            epoch: Instant::now(),
            offset: 0,
            started: false,
            stop,
        })
    }
}

impl Source for TestSource {
    fn next(&mut self, buf: &mut [u8]) -> Result<SourceItem, SourceError> {
        if stopped(&self.stop) {
            return Ok(SourceItem::End);
        }
        if !self.started {
            self.started = true;
            // Pacing starts with the stream, not when the source was made.
            self.epoch = Instant::now();
            return Ok(SourceItem::StreamStart {
                content_type: Some(TEST_CONTENT_TYPE.to_owned()),
            });
        }
        if buf.is_empty() {
            return Ok(SourceItem::Data(0));
        }
        loop {
            match self.pacer.poll(self.epoch.elapsed(), buf.len()) {
                Pace::Send(n) => {
                    pattern::fill(self.offset, &mut buf[..n]);
                    self.offset = self.offset.wrapping_add(n as u64);
                    return Ok(SourceItem::Data(n));
                }
                Pace::Wait(d) => thread::sleep(d.min(STOP_POLL)),
            }
            if stopped(&self.stop) {
                return Ok(SourceItem::End);
            }
        }
    }

    fn describe(&self) -> String {
        format!("test pattern at {} bit/s", self.pacer.bits_per_sec)
    }

    fn reconnects(&self) -> u64 {
        0
    }
}

/// What a [`Pacer`] allows now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pace {
    /// Send this many bytes now (already counted as sent).
    Send(usize),
    /// Nothing worth sending before this much more time passes.
    Wait(Duration),
}

/// Paces a byte stream at a bitrate against a clock given as an argument (time since an epoch), so
/// that it is tested without sleeping. Sends in pieces of about [`Pacer::PIECE`]; after a stall
/// (the caller did not ask for a while) it catches up at most [`Pacer::MAX_BURST`] of backlog.
#[derive(Clone, Debug)]
struct Pacer {
    bits_per_sec: u64,
    /// The time from which `sent` counts.
    origin: Duration,
    /// Bytes sent since `origin`.
    sent: u64,
}

impl Pacer {
    /// Smallest piece worth waking up for, in time at the bitrate.
    const PIECE: Duration = Duration::from_millis(2);
    /// Most backlog sent at once after a stall, in time at the bitrate.
    const MAX_BURST: Duration = Duration::from_millis(50);

    fn new(bits_per_sec: u64) -> Self {
        Self {
            bits_per_sec: bits_per_sec.max(1),
            origin: Duration::ZERO,
            sent: 0,
        }
    }

    /// Bytes due in `d` at the bitrate.
    fn bytes_in(&self, d: Duration) -> u64 {
        let bytes = d.as_nanos() * u128::from(self.bits_per_sec) / 8_000_000_000;
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }

    /// Time until `bytes` are due, at the bitrate (rounded up).
    fn time_for(&self, bytes: u64) -> Duration {
        let nanos = (u128::from(bytes) * 8_000_000_000).div_ceil(u128::from(self.bits_per_sec));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// What to do at time `now` with room for `room` bytes (`room` > 0).
    fn poll(&mut self, now: Duration, room: usize) -> Pace {
        let due = self.bytes_in(now.saturating_sub(self.origin));
        let burst = self.bytes_in(Self::MAX_BURST).max(1);
        if due.saturating_sub(self.sent) > burst {
            // Stalled: drop the backlog beyond one burst rather than flood the team.
            self.origin = now.saturating_sub(Self::MAX_BURST);
            self.sent = 0;
        }
        let due = self.bytes_in(now.saturating_sub(self.origin));
        let available = due.saturating_sub(self.sent);
        let piece = self.bytes_in(Self::PIECE).max(1).min(room as u64);
        if available >= piece {
            let n = available.min(room as u64);
            self.sent += n;
            // n <= room, so it fits in usize.
            Pace::Send(usize::try_from(n).unwrap_or(room))
        } else {
            let at = self.origin + self.time_for(self.sent + piece);
            Pace::Wait(at.saturating_sub(now).max(Duration::from_micros(100)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stdin source

/// Standard input (or any byte stream), read as it comes. A helper thread does the blocking reads
/// so that [`Source::next`] can still see the stop flag; it ends at end of input, or at its next
/// read once the source is dropped.
#[derive(Debug)]
pub struct StdinSource {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    pending: Vec<u8>,
    pos: usize,
    started: bool,
    ended: bool,
    stop: Arc<AtomicBool>,
}

impl StdinSource {
    /// Reads standard input.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self::from_reader(io::stdin(), stop)
    }

    /// Reads `reader` the same way as standard input (for pipes and tests).
    pub fn from_reader<R: Read + Send + 'static>(mut reader: R, stop: Arc<AtomicBool>) -> Self {
        // A few reads of look-ahead: enough to ride out scheduling, small enough to bound memory.
        let (tx, rx) = mpsc::sync_channel(8);
        let spawned = thread::Builder::new()
            .name("source-stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let msg = match reader.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => Ok(buf[..n].to_vec()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(e),
                    };
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            });
        let rx = match spawned {
            Ok(_) => rx,
            Err(e) => {
                // Report the failure on the first read.
                let (tx, rx) = mpsc::sync_channel(1);
                let _ = tx.send(Err(e));
                rx
            }
        };
        Self {
            rx,
            pending: Vec::new(),
            pos: 0,
            started: false,
            ended: false,
            stop,
        }
    }
}

impl Source for StdinSource {
    fn next(&mut self, buf: &mut [u8]) -> Result<SourceItem, SourceError> {
        if stopped(&self.stop) {
            return Ok(SourceItem::End);
        }
        if !self.started {
            self.started = true;
            return Ok(SourceItem::StreamStart { content_type: None });
        }
        if buf.is_empty() {
            return Ok(SourceItem::Data(0));
        }
        if !self.pending.is_empty() {
            return Ok(SourceItem::Data(drain(
                &mut self.pending,
                &mut self.pos,
                buf,
            )));
        }
        while !self.ended {
            match self.rx.recv_timeout(STOP_POLL) {
                Ok(Ok(data)) => {
                    self.pending = data;
                    self.pos = 0;
                    return Ok(SourceItem::Data(drain(
                        &mut self.pending,
                        &mut self.pos,
                        buf,
                    )));
                }
                Ok(Err(source)) => {
                    self.ended = true;
                    return Err(SourceError::Stdin { source });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if stopped(&self.stop) {
                        return Ok(SourceItem::End);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => self.ended = true,
            }
        }
        Ok(SourceItem::End)
    }

    fn describe(&self) -> String {
        "stdin".to_owned()
    }

    fn reconnects(&self) -> u64 {
        0
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP source

/// Timing of an [`HttpSource`]; the defaults are the documented behaviour, tests shorten them.
#[derive(Clone, Copy, Debug)]
struct HttpConfig {
    /// Bound on connecting and receiving the response head.
    answer_timeout: Duration,
    /// A connection that brings no byte for this long is dropped.
    stall_timeout: Duration,
    /// First wait before reconnecting; doubles after each failed attempt.
    backoff_start: Duration,
    /// Longest wait between reconnection attempts.
    backoff_cap: Duration,
    /// Size of the read buffer for chunked bodies (and, up to 4 KiB, for the response head).
    read_buf: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            answer_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(5),
            backoff_start: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            read_buf: 64 * 1024,
        }
    }
}

/// How the body of a response ends.
#[derive(Debug)]
enum Body {
    /// `Transfer-Encoding: chunked`.
    Chunked(ChunkedDecoder),
    /// `Content-Length`: this many bytes to go.
    Length(u64),
    /// Neither: the body is everything until the server closes.
    UntilClose,
}

/// One connection to the source server, past its response head.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    body: Body,
    /// When the last byte arrived (or the connection was made).
    last_byte: Instant,
    /// Whether any body byte came on this connection.
    got_body: bool,
    /// Why the body is already known to be over (malformed after the data in `pending`).
    broken: Option<String>,
    /// Removes ICY metadata, when the server interleaves it although asked not to.
    icy: Option<IcyStrip>,
}

/// What one read on a connection gave.
enum Step {
    /// `n` body bytes are in the caller's buffer.
    Data(usize),
    /// Nothing for the caller yet (a read timeout, framing bytes only, or data in `pending`).
    Again,
    /// The stream is over on this connection, for this reason.
    Dropped(String),
}

/// A live HTTP stream: one connection at a time, reconnected for ever when it drops or stalls.
///
/// Sends `GET <path> HTTP/1.1` with `Host`, `User-Agent: p2psp/<version>`, `Icy-MetaData: 0` (so
/// that no ICY metadata is interleaved in the body) and `Connection: close`; accepts `HTTP/1.0`,
/// `HTTP/1.1` and `ICY` answers with status 200, and hands over the body only: chunked coding is
/// removed, `Content-Length` is honoured, otherwise the body runs until the server closes. A server
/// that interleaves ICY metadata anyway (`icy-metaint`) has it removed, with a warning.
///
/// The end of a body, a closed connection, a malformed body or 5 s without a byte all count as the
/// source dropping: a warning is logged and the source reconnects after a backoff (100 ms,
/// doubling up to 5 s, reset once a connection delivers data), for ever, until the stop flag is
/// raised. Each new connection starts with [`SourceItem::StreamStart`].
#[derive(Debug)]
pub struct HttpSource {
    url: HttpUrl,
    stop: Arc<AtomicBool>,
    cfg: HttpConfig,
    conn: Option<Connection>,
    /// Decoded body bytes not yet handed out, from `pos` on.
    pending: Vec<u8>,
    pos: usize,
    /// Read buffer for chunked bodies.
    raw: Vec<u8>,
    /// A stream start to report before any more data, with its content type.
    announce: Option<Option<String>>,
    reconnects: u64,
    backoff: Duration,
}

impl HttpSource {
    /// Connects to `url` and reads the response head, within 5 s; fails with a clear error if the
    /// server is unreachable, refuses, answers other than 200 or does not speak HTTP.
    pub fn connect(url: HttpUrl, stop: Arc<AtomicBool>) -> Result<Self, SourceError> {
        Self::with_config(url, stop, HttpConfig::default())
    }

    fn with_config(
        url: HttpUrl,
        stop: Arc<AtomicBool>,
        cfg: HttpConfig,
    ) -> Result<Self, SourceError> {
        let (conn, head, pending) = connect(&url, &cfg, &stop)?;
        info!(source = %url, status = head.status(), content_type = ?head.content_type(), "source connected");
        Ok(Self {
            announce: Some(head.content_type().map(str::to_owned)),
            conn: Some(conn),
            pending,
            pos: 0,
            raw: vec![0; cfg.read_buf.max(1)],
            reconnects: 0,
            backoff: cfg.backoff_start,
            url,
            stop,
            cfg,
        })
    }

    /// Reads once from the current connection.
    fn read_body(&mut self, buf: &mut [u8]) -> Step {
        let Some(conn) = self.conn.as_mut() else {
            return Step::Dropped("no connection".into());
        };
        if let Some(why) = conn.broken.take() {
            return Step::Dropped(why);
        }
        let result = match &mut conn.body {
            Body::Length(0) => return Step::Dropped("end of body (Content-Length reached)".into()),
            Body::Chunked(d) if d.is_done() => return Step::Dropped("end of chunked body".into()),
            Body::Length(left) => {
                let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
                conn.stream.read(&mut buf[..n])
            }
            Body::UntilClose => conn.stream.read(buf),
            Body::Chunked(_) => conn.stream.read(&mut self.raw),
        };
        match result {
            Ok(0) => Step::Dropped("the server closed the connection".into()),
            Ok(n) => {
                conn.last_byte = Instant::now();
                match &mut conn.body {
                    Body::Length(left) => *left -= n as u64,
                    Body::UntilClose => {}
                    Body::Chunked(d) => {
                        // `pending` is empty here: reads happen only once it is drained.
                        let decoded = d.decode(&self.raw[..n], &mut self.pending);
                        if let Some(icy) = &mut conn.icy {
                            let kept = icy.strip(&mut self.pending);
                            self.pending.truncate(kept);
                        }
                        if !self.pending.is_empty() {
                            conn.got_body = true;
                        }
                        return match decoded {
                            Ok(_) => Step::Again,
                            // Hand out what decoded before the error first (`pending`).
                            Err(e) => Step::Dropped(format!("malformed chunked body: {e}")),
                        };
                    }
                }
                let n = match &mut conn.icy {
                    Some(icy) => icy.strip(&mut buf[..n]),
                    None => n,
                };
                if n == 0 {
                    return Step::Again;
                }
                conn.got_body = true;
                Step::Data(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if conn.last_byte.elapsed() >= self.cfg.stall_timeout {
                    Step::Dropped(format!(
                        "no data for {} s",
                        self.cfg.stall_timeout.as_secs_f32()
                    ))
                } else {
                    Step::Again
                }
            }
            Err(e) => Step::Dropped(format!("read error: {e}")),
        }
    }

    /// Waits out the backoff and reconnects, retrying until it works; `false` if stopped first.
    fn reconnect(&mut self) -> bool {
        loop {
            let until = Instant::now() + self.backoff;
            loop {
                if stopped(&self.stop) {
                    return false;
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                thread::sleep((until - now).min(STOP_POLL));
            }
            match connect(&self.url, &self.cfg, &self.stop) {
                Ok((conn, head, pending)) => {
                    self.reconnects += 1;
                    info!(source = %self.url, reconnects = self.reconnects, content_type = ?head.content_type(), "source reconnected");
                    self.conn = Some(conn);
                    self.pending = pending;
                    self.pos = 0;
                    self.announce = Some(head.content_type().map(str::to_owned));
                    return true;
                }
                Err(SourceError::Stopped { .. }) => return false,
                Err(e) => {
                    self.backoff = (self.backoff * 2).min(self.cfg.backoff_cap);
                    warn!(source = %self.url, error = %e, retry_in = ?self.backoff, "source reconnection failed");
                }
            }
        }
    }
}

impl Source for HttpSource {
    fn next(&mut self, buf: &mut [u8]) -> Result<SourceItem, SourceError> {
        loop {
            if stopped(&self.stop) {
                return Ok(SourceItem::End);
            }
            if let Some(content_type) = self.announce.take() {
                return Ok(SourceItem::StreamStart { content_type });
            }
            if buf.is_empty() {
                return Ok(SourceItem::Data(0));
            }
            if !self.pending.is_empty() {
                return Ok(SourceItem::Data(drain(
                    &mut self.pending,
                    &mut self.pos,
                    buf,
                )));
            }
            if self.conn.is_none() {
                if !self.reconnect() {
                    return Ok(SourceItem::End);
                }
                continue;
            }
            match self.read_body(buf) {
                Step::Data(n) => return Ok(SourceItem::Data(n)),
                Step::Again => {}
                Step::Dropped(why) => {
                    if let Some(conn) = self.conn.take() {
                        if conn.got_body {
                            self.backoff = self.cfg.backoff_start;
                        }
                    }
                    warn!(source = %self.url, reason = %why, retry_in = ?self.backoff, "source dropped, reconnecting");
                }
            }
        }
    }

    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn reconnects(&self) -> u64 {
        self.reconnects
    }
}

/// The request an [`HttpSource`] sends.
fn request(url: &HttpUrl) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: p2psp/{}\r\nIcy-MetaData: 0\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
    )
}

/// Connects, sends the request and reads the response head, within `cfg.answer_timeout`.
/// Returns the connection, the head and the body bytes that came with the head, decoded.
fn connect(
    url: &HttpUrl,
    cfg: &HttpConfig,
    stop: &AtomicBool,
) -> Result<(Connection, ResponseHead, Vec<u8>), SourceError> {
    let deadline = Instant::now() + cfg.answer_timeout;
    let timeout = || SourceError::Timeout {
        url: url.to_string(),
        timeout: cfg.answer_timeout,
    };
    let io_err = |source| SourceError::Io {
        url: url.to_string(),
        source,
    };
    let mut stream = tcp_connect(url, deadline, cfg.answer_timeout, stop)?;
    stream.set_read_timeout(Some(STOP_POLL)).map_err(io_err)?;
    stream
        .set_write_timeout(Some(cfg.answer_timeout))
        .map_err(io_err)?;
    stream.write_all(request(url).as_bytes()).map_err(io_err)?;

    let mut received = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; cfg.read_buf.clamp(1, 4096)];
    let (head, used) = loop {
        if stopped(stop) {
            return Err(SourceError::Stopped {
                url: url.to_string(),
            });
        }
        if Instant::now() >= deadline {
            return Err(timeout());
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(SourceError::ClosedEarly {
                    url: url.to_string(),
                });
            }
            Ok(n) => {
                received.extend_from_slice(&chunk[..n]);
                match ResponseHead::parse(&received) {
                    Ok(Some(parsed)) => break parsed,
                    Ok(None) => {}
                    Err(source) => {
                        return Err(SourceError::NotHttp {
                            url: url.to_string(),
                            source,
                        });
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(io_err(e)),
        }
    };
    if head.status() != 200 {
        return Err(SourceError::Status {
            url: url.to_string(),
            status: head.status(),
            reason: head.reason().to_owned(),
            location: head.header("location").map(str::to_owned),
        });
    }
    let leftover = &received[used..];
    let mut pending = Vec::new();
    let mut broken = None;
    let body = if head.is_chunked() {
        let mut decoder = ChunkedDecoder::new();
        // A malformed body is the stream dropping, as on any later read: the data before the
        // error is handed out first.
        if let Err(e) = decoder.decode(leftover, &mut pending) {
            broken = Some(format!("malformed chunked body: {e}"));
        }
        Body::Chunked(decoder)
    } else if let Some(len) = head.content_length() {
        let take = usize::try_from(len).map_or(leftover.len(), |l| l.min(leftover.len()));
        pending.extend_from_slice(&leftover[..take]);
        Body::Length(len - take as u64)
    } else {
        pending.extend_from_slice(leftover);
        Body::UntilClose
    };
    let mut icy = icy_strip(url, &head);
    if let Some(icy) = &mut icy {
        let kept = icy.strip(&mut pending);
        pending.truncate(kept);
    }
    let conn = Connection {
        stream,
        body,
        last_byte: Instant::now(),
        got_body: !pending.is_empty(),
        broken,
        icy,
    };
    Ok((conn, head, pending))
}

/// An [`IcyStrip`] when the response says metadata is interleaved (`icy-metaint`). We ask for none
/// (`Icy-MetaData: 0`), but a server that sends it anyway must not corrupt the stream.
fn icy_strip(url: &HttpUrl, head: &ResponseHead) -> Option<IcyStrip> {
    let value = head.header("icy-metaint")?;
    match value.trim().parse::<usize>() {
        Ok(0) => None,
        Ok(interval) => {
            warn!(source = %url, interval, "source interleaves ICY metadata although asked not to; removing it");
            Some(IcyStrip::new(interval))
        }
        Err(_) => {
            warn!(source = %url, value, "ignoring invalid icy-metaint header");
            None
        }
    }
}

/// Removes ICY (Shoutcast) metadata from a body: after every `interval` bytes of media comes one
/// length byte `L`, then `16 * L` bytes of metadata. Sans-IO: works on the bytes it is given, in
/// pieces of any size.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IcyStrip {
    interval: usize,
    state: IcyState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IcyState {
    /// This many media bytes until the next length byte.
    Media(usize),
    /// The next byte is a metadata length.
    Length,
    /// This many metadata bytes to skip.
    Meta(usize),
}

impl IcyStrip {
    fn new(interval: usize) -> Self {
        let interval = interval.max(1);
        Self {
            interval,
            state: IcyState::Media(interval),
        }
    }

    /// Removes metadata from `data` in place; returns how many media bytes are left at its start.
    fn strip(&mut self, data: &mut [u8]) -> usize {
        let (mut read, mut kept) = (0, 0);
        while read < data.len() {
            let avail = data.len() - read;
            self.state = match self.state {
                IcyState::Media(left) => {
                    let n = left.min(avail);
                    data.copy_within(read..read + n, kept);
                    (read, kept) = (read + n, kept + n);
                    if n == left {
                        IcyState::Length
                    } else {
                        IcyState::Media(left - n)
                    }
                }
                IcyState::Length => {
                    let len = usize::from(data[read]) * 16;
                    read += 1;
                    if len == 0 {
                        IcyState::Media(self.interval)
                    } else {
                        IcyState::Meta(len)
                    }
                }
                IcyState::Meta(left) => {
                    let n = left.min(avail);
                    read += n;
                    if n == left {
                        IcyState::Media(self.interval)
                    } else {
                        IcyState::Meta(left - n)
                    }
                }
            };
        }
        kept
    }
}

/// Resolves and connects in a helper thread, so that neither a slow resolver nor a slow connect
/// keeps the caller from seeing the stop flag or the deadline. A thread left behind ends by itself
/// (its connect attempts are bounded by the deadline).
fn tcp_connect(
    url: &HttpUrl,
    deadline: Instant,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<TcpStream, SourceError> {
    let (tx, rx) = mpsc::sync_channel(1);
    let (host, port, shown) = (url.host.clone(), url.port, url.to_string());
    let spawned = thread::Builder::new()
        .name("source-connect".into())
        .spawn(move || {
            let _ = tx.send(tcp_connect_blocking(&host, port, &shown, deadline));
        });
    if let Err(source) = spawned {
        return Err(SourceError::Connect {
            url: url.to_string(),
            source,
        });
    }
    loop {
        let now = Instant::now();
        // A little grace past the deadline, for the thread's own timeout error to arrive.
        let wait = (deadline + Duration::from_millis(50))
            .saturating_duration_since(now)
            .min(STOP_POLL);
        match rx.recv_timeout(wait) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stopped(stop) {
                    return Err(SourceError::Stopped {
                        url: url.to_string(),
                    });
                }
                if Instant::now() >= deadline + Duration::from_millis(50) {
                    return Err(SourceError::Timeout {
                        url: url.to_string(),
                        timeout,
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(SourceError::Connect {
                    url: url.to_string(),
                    source: io::Error::other("connect thread ended without a result"),
                });
            }
        }
    }
}

fn tcp_connect_blocking(
    host: &str,
    port: u16,
    shown: &str,
    deadline: Instant,
) -> Result<TcpStream, SourceError> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => (host, port)
            .to_socket_addrs()
            .map_err(|source| SourceError::Resolve {
                host: host.to_owned(),
                source,
            })?
            .collect(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(SourceError::Connect {
        url: shown.to_owned(),
        source: last,
    })
}

#[cfg(test)]
mod tests;
