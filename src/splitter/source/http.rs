//! The HTTP source: a live stream over HTTP/1.x (Icecast, a media server...), reconnected for ever.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{HttpUrl, STOP_POLL, Source, SourceError, SourceItem, ready, stopped};
use crate::http::{ChunkedDecoder, ResponseHead};
use crate::io_util::is_transient;

/// Timing of an [`HttpSource`]; the defaults are the documented behaviour, tests shorten them.
#[derive(Clone, Copy, Debug)]
pub(super) struct HttpConfig {
    /// Bound on connecting and receiving the response head.
    pub(super) answer_timeout: Duration,
    /// A connection that brings no byte for this long is dropped.
    pub(super) stall_timeout: Duration,
    /// First wait before reconnecting; doubles after each failed attempt.
    pub(super) backoff_start: Duration,
    /// Longest wait between reconnection attempts.
    pub(super) backoff_cap: Duration,
    /// Size of the read buffer for chunked bodies (and, up to 4 KiB, for the response head).
    pub(super) read_buf: usize,
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

    pub(super) fn with_config(
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
            Err(e) if is_transient(&e) => {
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
            if let Some(item) = ready(&mut self.pending, &mut self.pos, buf) {
                return Ok(item);
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
            Err(e) if is_transient(&e) => {}
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
pub(super) struct IcyStrip {
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
    pub(super) fn new(interval: usize) -> Self {
        let interval = interval.max(1);
        Self {
            interval,
            state: IcyState::Media(interval),
        }
    }

    /// Removes metadata from `data` in place; returns how many media bytes are left at its start.
    pub(super) fn strip(&mut self, data: &mut [u8]) -> usize {
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
