#![forbid(unsafe_code)]
//! Sans-IO HTTP/1.x pieces: response and request heads, the chunked body decoder, and a response
//! head writer.
//!
//! The splitter reads its live source over HTTP and chunks only the body (the reference chunked the
//! raw response, head included); its small servers (the stream-header endpoint, the player endpoint,
//! the metrics endpoint) read request heads. Nothing here does I/O: callers feed bytes and get back
//! parsed heads, decoded body bytes, or a typed [`HttpError`].
//!
//! The parsers are incremental. Call them again with the whole buffer received so far (from the
//! start of the head) until they return `Ok(Some(..))`; `Ok(None)` means "need more bytes". Every
//! prefix of a valid head gives `Ok(None)`, never an error, and a head is bounded:
//! [`MAX_HEAD_LEN`] bytes and [`MAX_HEADERS`] header lines, past which parsing fails instead of
//! asking for ever more bytes. Bare `\n` line ends are accepted as well as `\r\n`.

use std::fmt;

use thiserror::Error;

/// Longest accepted head (start line, header lines and the blank line), in bytes.
pub const MAX_HEAD_LEN: usize = 16 * 1024;

/// Most header lines accepted in one head.
pub const MAX_HEADERS: usize = 100;

/// Longest accepted chunk size line (size, extensions and line end) of a chunked body, in bytes.
pub const MAX_CHUNK_LINE_LEN: usize = 4 * 1024;

/// Longest accepted trailer section (after the last chunk, blank line included), in bytes.
pub const MAX_TRAILERS_LEN: usize = 16 * 1024;

/// How many bytes of an offending line an error quotes.
const QUOTE_LEN: usize = 80;

/// What is wrong with HTTP bytes received from a peer. Every variant is the sender's fault
/// (malformed or unsupported input); none is a bug of the caller.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HttpError {
    /// No blank line ended the head within [`MAX_HEAD_LEN`] bytes.
    #[error("HTTP head is longer than {limit} bytes")]
    HeadTooLong {
        /// The limit, [`MAX_HEAD_LEN`].
        limit: usize,
    },
    /// The head has more than [`MAX_HEADERS`] header lines.
    #[error("HTTP head has more than {limit} header lines")]
    TooManyHeaders {
        /// The limit, [`MAX_HEADERS`].
        limit: usize,
    },
    /// The bytes do not start like an HTTP (or ICY) response at all.
    #[error("not an HTTP response: it starts with {start:?}")]
    NotAResponse {
        /// The first bytes received, quoted.
        start: String,
    },
    /// The status line (`HTTP/1.1 200 OK`) is malformed.
    #[error("malformed HTTP status line {line:?}: {why}")]
    BadStatusLine {
        /// The line, quoted.
        line: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The request line (`GET /path HTTP/1.1`) is malformed.
    #[error("malformed HTTP request line {line:?}: {why}")]
    BadRequestLine {
        /// The line, quoted.
        line: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The protocol version is not HTTP/1.0 or HTTP/1.1 (or ICY for a response).
    #[error("unsupported HTTP version {version:?} (HTTP/1.0 and HTTP/1.1 are supported)")]
    UnsupportedVersion {
        /// The version as received, quoted.
        version: String,
    },
    /// A header line is malformed.
    #[error("malformed HTTP header line {line:?}: {why}")]
    BadHeader {
        /// The line, quoted.
        line: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `Content-Length` is not a decimal number, or several disagree.
    #[error("invalid Content-Length {value:?}")]
    BadContentLength {
        /// The offending value, quoted.
        value: String,
    },
    /// A chunk size line of a chunked body is malformed.
    #[error("malformed chunk size line in chunked body: unexpected byte 0x{byte:02x} {why}")]
    BadChunkSize {
        /// The unexpected byte.
        byte: u8,
        /// Where it was found.
        why: &'static str,
    },
    /// A chunk size does not fit in 64 bits.
    #[error("chunk size in chunked body does not fit in 64 bits")]
    ChunkSizeOverflow,
    /// A chunk size line is longer than [`MAX_CHUNK_LINE_LEN`].
    #[error("chunk size line in chunked body is longer than {limit} bytes")]
    ChunkLineTooLong {
        /// The limit, [`MAX_CHUNK_LINE_LEN`].
        limit: usize,
    },
    /// Chunk data is not followed by a line end.
    #[error("chunk data in chunked body is followed by byte 0x{byte:02x} instead of CRLF")]
    MissingChunkEnd {
        /// The unexpected byte.
        byte: u8,
    },
    /// The trailer section is longer than [`MAX_TRAILERS_LEN`].
    #[error("trailer section of chunked body is longer than {limit} bytes")]
    TrailersTooLong {
        /// The limit, [`MAX_TRAILERS_LEN`].
        limit: usize,
    },
}

/// Quotes at most [`QUOTE_LEN`] bytes of `bytes` for an error message.
fn quote(bytes: &[u8]) -> String {
    let end = bytes.len().min(QUOTE_LEN);
    let mut s = String::from_utf8_lossy(&bytes[..end]).into_owned();
    if bytes.len() > end {
        s.push('…');
    }
    s
}

/// Bytes as text: UTF-8 when valid, otherwise each byte as one Latin-1 character (lossless, the
/// historical charset of HTTP heads).
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// RFC 9110 `tchar`: the bytes of a token (header name, method).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes allowed in a header value or reason phrase: HTAB, SP, visible ASCII, obs-text.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The protocol version of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// `HTTP/1.0`.
    Http10,
    /// `HTTP/1.1`.
    Http11,
    /// `ICY`: the status line of Shoutcast v1 and old Icecast servers (`ICY 200 OK`), whose head is
    /// otherwise like HTTP/1.0.
    Icy,
}

impl Version {
    fn from_http(bytes: &[u8]) -> Result<Self, HttpError> {
        match bytes {
            b"HTTP/1.0" => Ok(Self::Http10),
            b"HTTP/1.1" => Ok(Self::Http11),
            _ => Err(HttpError::UnsupportedVersion {
                version: quote(bytes),
            }),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
            Self::Icy => "ICY",
        })
    }
}

/// The header fields of a head, in the order received. Lookups ignore ASCII case of names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    fields: Vec<(String, String)>,
}

impl Headers {
    /// The value of the first field named `name` (any case), if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The values of every field named `name` (any case), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every field as `(name, value)`, in the order received, names as sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Complete lines of a buffer, each without its line end (`\n` or `\r\n`).
struct Lines<'a> {
    buf: &'a [u8],
    /// Bytes consumed so far: the start of the next line.
    pos: usize,
}

impl<'a> Lines<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// The next complete line, or `None` when no line end follows yet.
    fn next_line(&mut self) -> Option<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        let nl = rest.iter().position(|&b| b == b'\n')?;
        self.pos += nl + 1;
        let line = &rest[..nl];
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }

    /// The bytes after the last complete line.
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// Parses header lines up to and including the blank line. `Ok(None)`: the blank line has not
/// arrived yet (limits are still enforced on what has).
fn parse_headers(lines: &mut Lines<'_>) -> Result<Option<Headers>, HttpError> {
    let mut fields: Vec<(String, String)> = Vec::new();
    loop {
        let Some(line) = lines.next_line() else {
            return Ok(None);
        };
        if line.is_empty() {
            return Ok(Some(Headers { fields }));
        }
        if !line.iter().all(|&b| is_field_byte(b)) {
            return Err(HttpError::BadHeader {
                line: quote(line),
                why: "control character",
            });
        }
        if matches!(line[0], b' ' | b'\t') {
            // obs-fold (RFC 9112 §5.2): a continuation of the previous value, joined with a space.
            let Some((_, value)) = fields.last_mut() else {
                return Err(HttpError::BadHeader {
                    line: quote(line),
                    why: "continuation line without a header before it",
                });
            };
            let more = trim_ows(line);
            if !more.is_empty() {
                if !value.is_empty() {
                    value.push(' ');
                }
                value.push_str(&text(more));
            }
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(HttpError::BadHeader {
                line: quote(line),
                why: "no ':'",
            });
        };
        let name = &line[..colon];
        if !name.iter().all(|&b| is_tchar(b)) {
            return Err(HttpError::BadHeader {
                line: quote(line),
                why: "invalid character in header name",
            });
        }
        if fields.len() == MAX_HEADERS {
            return Err(HttpError::TooManyHeaders { limit: MAX_HEADERS });
        }
        fields.push((text(name), text(trim_ows(&line[colon + 1..]))));
    }
}

/// What to return when the head is not complete in `buf`: more bytes, or too long already.
fn incomplete<T>(buf: &[u8]) -> Result<Option<T>, HttpError> {
    if buf.len() >= MAX_HEAD_LEN {
        Err(HttpError::HeadTooLong {
            limit: MAX_HEAD_LEN,
        })
    } else {
        Ok(None)
    }
}

/// The head bytes the parsers look at: at most [`MAX_HEAD_LEN`].
fn head_window(buf: &[u8]) -> &[u8] {
    &buf[..buf.len().min(MAX_HEAD_LEN)]
}

/// Checks `Content-Length` fields: each is a list of equal decimal numbers (RFC 9110 §8.6).
fn check_content_length(headers: &Headers) -> Result<Option<u64>, HttpError> {
    let mut found: Option<u64> = None;
    for value in headers.get_all("content-length") {
        for item in value.split(',') {
            let item = item.trim_matches([' ', '\t']);
            let bad = || HttpError::BadContentLength {
                value: quote(value.as_bytes()),
            };
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = item.parse().map_err(|_| bad())?;
            if found.is_some_and(|f| f != n) {
                return Err(bad());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// The head of an HTTP/1.x (or ICY) response: status line and header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    version: Version,
    status: u16,
    reason: String,
    headers: Headers,
    content_length: Option<u64>,
}

impl ResponseHead {
    /// Parses a response head from the start of `buf`.
    ///
    /// `Ok(None)`: the head is not complete yet; call again with more bytes appended.
    /// `Ok(Some((head, n)))`: the head took the first `n` bytes of `buf`, blank line included; the
    /// body starts at `buf[n..]`. Fails on malformed heads, on bytes that cannot start a response,
    /// and past [`MAX_HEAD_LEN`] bytes or [`MAX_HEADERS`] headers.
    pub fn parse(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
        let window = head_window(buf);
        let mut lines = Lines::new(window);
        let Some(first) = lines.next_line() else {
            check_response_start(lines.rest())?;
            return incomplete(buf);
        };
        check_response_start(first)?;
        let (version, status, reason) = parse_status_line(first)?;
        let Some(headers) = parse_headers(&mut lines)? else {
            return incomplete(buf);
        };
        let content_length = check_content_length(&headers)?;
        let head = ResponseHead {
            version,
            status,
            reason,
            headers,
            content_length,
        };
        Ok(Some((head, lines.pos)))
    }

    /// The protocol version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The status code, `100..=999`.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The reason phrase (possibly empty).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// All header fields.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The value of the first header field named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The `Content-Type` value, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }

    /// Whether the body uses chunked transfer coding: the last coding of `Transfer-Encoding` is
    /// `chunked`.
    pub fn is_chunked(&self) -> bool {
        is_chunked(&self.headers)
    }

    /// The body length from `Content-Length`, if sent. Checked at parse time: a malformed or
    /// contradictory `Content-Length` fails [`ResponseHead::parse`]. When [`is_chunked`] is true,
    /// chunked coding takes precedence over this.
    ///
    /// [`is_chunked`]: ResponseHead::is_chunked
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }
}

/// Whether the last coding of `Transfer-Encoding` is `chunked`.
fn is_chunked(headers: &Headers) -> bool {
    headers
        .get_all("transfer-encoding")
        .flat_map(|v| v.split(','))
        .map(|c| c.split(';').next().unwrap_or("").trim_matches([' ', '\t']))
        .filter(|c| !c.is_empty())
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
}

/// Fails when `start` (the first line, complete or not) cannot begin a response.
fn check_response_start(start: &[u8]) -> Result<(), HttpError> {
    let fits = |prefix: &[u8]| {
        let n = start.len().min(prefix.len());
        start[..n] == prefix[..n]
    };
    if fits(b"HTTP/") || fits(b"ICY ") {
        Ok(())
    } else {
        Err(HttpError::NotAResponse {
            start: quote(start),
        })
    }
}

fn parse_status_line(line: &[u8]) -> Result<(Version, u16, String), HttpError> {
    let bad = |why| HttpError::BadStatusLine {
        line: quote(line),
        why,
    };
    let Some(sp) = line.iter().position(|&b| b == b' ') else {
        return Err(bad("no status code"));
    };
    let version = match &line[..sp] {
        b"ICY" => Version::Icy,
        v => Version::from_http(v)?,
    };
    let rest = &line[sp + 1..];
    let (code, reason) = match rest.iter().position(|&b| b == b' ') {
        Some(sp) => (&rest[..sp], &rest[sp + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let status = match code {
        [a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(bad("status code is not three digits")),
    };
    if !reason.iter().all(|&b| is_field_byte(b)) {
        return Err(bad("control character in reason phrase"));
    }
    Ok((version, status, text(trim_ows(reason))))
}

/// The head of an HTTP/1.x request: request line and header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    method: String,
    path: String,
    version: Version,
    headers: Headers,
}

impl RequestHead {
    /// Parses a request head from the start of `buf`; empty lines before the request line are
    /// skipped (RFC 9112 §2.2).
    ///
    /// `Ok(None)`: the head is not complete yet; call again with more bytes appended.
    /// `Ok(Some((head, n)))`: the head took the first `n` bytes of `buf`, blank line included.
    /// Fails on malformed heads and past [`MAX_HEAD_LEN`] bytes or [`MAX_HEADERS`] headers.
    pub fn parse(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
        let window = head_window(buf);
        let mut lines = Lines::new(window);
        let first = loop {
            match lines.next_line() {
                Some([]) => continue,
                Some(line) => break line,
                None => {
                    check_request_start(lines.rest())?;
                    return incomplete(buf);
                }
            }
        };
        let (method, path, version) = parse_request_line(first)?;
        let Some(headers) = parse_headers(&mut lines)? else {
            return incomplete(buf);
        };
        let head = RequestHead {
            method,
            path,
            version,
            headers,
        };
        Ok(Some((head, lines.pos)))
    }

    /// The method, as sent (methods are case-sensitive): `GET`, `HEAD`...
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request target as sent, usually a path such as `/channel` (query included).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The protocol version: [`Version::Http10`] or [`Version::Http11`].
    pub fn version(&self) -> Version {
        self.version
    }

    /// All header fields.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The value of the first header field named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }
}

/// Fails when an incomplete request line already cannot be one (binary garbage, say).
fn check_request_start(start: &[u8]) -> Result<(), HttpError> {
    let method_end = start.iter().position(|&b| b == b' ').unwrap_or(start.len());
    let ok_method = start[..method_end]
        .iter()
        .all(|&b| is_tchar(b) || b == b'\r');
    if ok_method && !start[method_end..].iter().any(|&b| b < 0x20 && b != b'\r') {
        Ok(())
    } else {
        Err(HttpError::BadRequestLine {
            line: quote(start),
            why: "invalid character",
        })
    }
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, Version), HttpError> {
    let bad = |why| HttpError::BadRequestLine {
        line: quote(line),
        why,
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "expected `METHOD target HTTP/1.x` separated by single spaces",
        ));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(bad("invalid method"));
    }
    if path.is_empty() || !path.iter().all(|&b| b > 0x20 && b != 0x7f) {
        return Err(bad("invalid request target"));
    }
    let version = Version::from_http(version)?;
    Ok((text(method), text(path), version))
}

/// Writes a response head `HTTP/1.0 <status> <reason>\r\n<name>: <value>\r\n...\r\n`.
///
/// Header names should be tokens (`Content-Type`). CR and LF inside `reason`, names or values are
/// replaced by spaces so that a value taken from elsewhere cannot split the head.
pub fn response_head(status: u16, reason: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, s: &str) {
        out.extend(
            s.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    }
    let mut out = Vec::with_capacity(64 + headers.len() * 32);
    out.extend_from_slice(format!("HTTP/1.0 {status} ").as_bytes());
    put(&mut out, reason);
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        put(&mut out, name);
        out.extend_from_slice(b": ");
        put(&mut out, value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Where a [`ChunkedDecoder`] is in the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// In the hex digits of a chunk size line (`digits` read so far).
    Size { digits: u32 },
    /// After the size, in optional whitespace before `;` or the line end.
    SizeWs,
    /// In chunk extensions (`;name=value`), skipped up to the line end.
    Ext,
    /// After the `\r` of a chunk size line.
    SizeLf,
    /// In chunk data, this many bytes to go.
    Data { left: u64 },
    /// After chunk data, expecting `\r\n` (or a bare `\n`).
    DataEnd,
    /// After chunk data and `\r`.
    DataLf,
    /// At the start of a trailer line (or of the final blank line).
    TrailerStart,
    /// Inside a trailer field line, skipped.
    TrailerLine,
    /// After the `\r` of the final blank line.
    TrailerLf,
    /// The body is complete.
    Done,
}

/// Incremental decoder of a `Transfer-Encoding: chunked` body (RFC 9112 §7.1).
///
/// Feed it body bytes in pieces of any size; it appends the decoded data to a `Vec` and keeps the
/// little state it needs between calls (a size line may be split anywhere). Chunk extensions and
/// trailer fields are skipped. Sizes are hex in any case; a size that overflows 64 bits is an
/// error.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// The chunk size read so far.
    size: u64,
    /// Bytes of the current size line, or of the trailer section, so far.
    line_len: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a chunked body.
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size { digits: 0 },
            size: 0,
            line_len: 0,
        }
    }

    /// Whether the terminating zero-size chunk and the trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes as much of `input` as possible, appending data to `out`. Returns how many bytes of
    /// `input` were consumed: all of them, unless the body ended inside `input` (then
    /// [`is_done`](Self::is_done) is true and the rest belongs to whatever follows the body).
    ///
    /// After an error the decoder is not usable any more (the body is malformed).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            if let ChunkState::Data { left } = self.state {
                let avail = input.len() - i;
                let n = usize::try_from(left).map_or(avail, |l| l.min(avail));
                out.extend_from_slice(&input[i..i + n]);
                i += n;
                let left = left - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data { left }
                };
                continue;
            }
            if self.state == ChunkState::Done {
                break;
            }
            let b = input[i];
            i += 1;
            self.step(b)?;
        }
        Ok(i)
    }

    /// Advances the state machine by one byte outside chunk data.
    fn step(&mut self, b: u8) -> Result<(), HttpError> {
        use ChunkState as S;
        match self.state {
            S::Size { .. } | S::SizeWs | S::Ext | S::SizeLf => {
                self.line_len += 1;
                if self.line_len > MAX_CHUNK_LINE_LEN {
                    return Err(HttpError::ChunkLineTooLong {
                        limit: MAX_CHUNK_LINE_LEN,
                    });
                }
            }
            S::TrailerStart | S::TrailerLine | S::TrailerLf => {
                self.line_len += 1;
                if self.line_len > MAX_TRAILERS_LEN {
                    return Err(HttpError::TrailersTooLong {
                        limit: MAX_TRAILERS_LEN,
                    });
                }
            }
            S::Data { .. } | S::DataEnd | S::DataLf | S::Done => {}
        }
        let bad_size = |why| Err(HttpError::BadChunkSize { byte: b, why });
        self.state = match (self.state, b) {
            (S::Size { digits }, _) if b.is_ascii_hexdigit() => {
                let d = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(d))
                    .ok_or(HttpError::ChunkSizeOverflow)?;
                S::Size { digits: digits + 1 }
            }
            (S::Size { digits: 0 }, _) => return bad_size("where a hex chunk size should start"),
            (S::Size { .. } | S::SizeWs, b' ' | b'\t') => S::SizeWs,
            (S::Size { .. } | S::SizeWs, b';') => S::Ext,
            (S::Size { .. } | S::SizeWs | S::Ext, b'\r') => S::SizeLf,
            (S::Size { .. } | S::SizeWs | S::Ext | S::SizeLf, b'\n') => self.end_size_line(),
            (S::Size { .. } | S::SizeWs, _) => return bad_size("after the chunk size"),
            (S::Ext, _) => S::Ext,
            (S::SizeLf, _) => return bad_size("after CR in chunk size line"),
            (S::DataEnd, b'\r') => S::DataLf,
            (S::DataEnd | S::DataLf, b'\n') => S::Size { digits: 0 },
            (S::DataEnd | S::DataLf, _) => return Err(HttpError::MissingChunkEnd { byte: b }),
            (S::TrailerStart, b'\r') => S::TrailerLf,
            (S::TrailerStart | S::TrailerLf, b'\n') => S::Done,
            (S::TrailerLf, _) => return Err(HttpError::MissingChunkEnd { byte: b }),
            (S::TrailerLine, b'\n') => S::TrailerStart,
            (S::TrailerStart | S::TrailerLine, _) => S::TrailerLine,
            // `decode` handles these before calling `step`.
            (S::Data { .. } | S::Done, _) => self.state,
        };
        Ok(())
    }

    /// The state after a complete chunk size line.
    fn end_size_line(&mut self) -> ChunkState {
        let size = std::mem::take(&mut self.size);
        self.line_len = 0;
        if size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data { left: size }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), so that tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const ICECAST: &[u8] = b"HTTP/1.0 200 OK\r\n\
        Content-Type: audio/ogg\r\n\
        Cache-Control: no-cache, no-store\r\n\
        icy-name: Radio \xc3\xa9t\xc3\xa9\r\n\
        Server: Icecast 2.4.4\r\n\
        \r\n";

    fn parse_resp(buf: &[u8]) -> (ResponseHead, usize) {
        ResponseHead::parse(buf).unwrap().unwrap()
    }

    #[test]
    fn parses_icecast_response() {
        let mut buf = ICECAST.to_vec();
        buf.extend_from_slice(b"OggS body");
        let (h, n) = parse_resp(&buf);
        assert_eq!(n, ICECAST.len());
        assert_eq!(h.version(), Version::Http10);
        assert_eq!(h.status(), 200);
        assert_eq!(h.reason(), "OK");
        assert_eq!(h.content_type(), Some("audio/ogg"));
        assert_eq!(h.header("CONTENT-type"), Some("audio/ogg"));
        assert_eq!(h.header("icy-name"), Some("Radio été"));
        assert_eq!(h.header("cache-control"), Some("no-cache, no-store"));
        assert_eq!(h.headers().len(), 4);
        assert!(!h.is_chunked());
        assert_eq!(h.content_length(), None);
        assert_eq!(&buf[n..], b"OggS body");
    }

    #[test]
    fn parses_icy_and_bare_lf() {
        let buf = b"ICY 200 OK\nicy-br:128\ncontent-type: audio/mpeg\n\nxyz";
        let (h, n) = parse_resp(buf);
        assert_eq!(h.version(), Version::Icy);
        assert_eq!(h.status(), 200);
        assert_eq!(h.header("Icy-Br"), Some("128"));
        assert_eq!(h.content_type(), Some("audio/mpeg"));
        assert_eq!(&buf[n..], b"xyz");
    }

    #[test]
    fn status_line_variants() {
        let (h, _) = parse_resp(b"HTTP/1.1 404 Not Found\r\n\r\n");
        assert_eq!(
            (h.version(), h.status(), h.reason()),
            (Version::Http11, 404, "Not Found")
        );
        let (h, _) = parse_resp(b"HTTP/1.1 204\r\n\r\n");
        assert_eq!((h.status(), h.reason()), (204, ""));
        let (h, _) = parse_resp(b"HTTP/1.1 200 \r\n\r\n");
        assert_eq!((h.status(), h.reason()), (200, ""));
        let (h, _) = parse_resp(b"HTTP/1.1 200 OK \t\r\n\r\n");
        assert_eq!(h.reason(), "OK");
    }

    #[test]
    fn chunked_and_content_length() {
        let (h, _) = parse_resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
        assert!(h.is_chunked());
        let (h, _) = parse_resp(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(h.is_chunked());
        let (h, _) = parse_resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert!(!h.is_chunked());
        let (h, _) = parse_resp(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n");
        assert_eq!(h.content_length(), Some(42));
        let (h, _) =
            parse_resp(b"HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(h.content_length(), Some(7));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 4, 5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert!(
                matches!(
                    ResponseHead::parse(bad),
                    Err(HttpError::BadContentLength { .. })
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn obs_fold_joins_values() {
        let (h, _) = parse_resp(b"HTTP/1.0 200 OK\r\nX-A: one\r\n  two\r\n\tthree\r\n\r\n");
        assert_eq!(h.header("x-a"), Some("one two three"));
        assert!(matches!(
            ResponseHead::parse(b"HTTP/1.0 200 OK\r\n two\r\n\r\n"),
            Err(HttpError::BadHeader { .. })
        ));
    }

    #[test]
    fn malformed_responses_are_errors() {
        type Expect = fn(&HttpError) -> bool;
        let cases: &[(&[u8], Expect)] = &[
            (b"SOURCE /x HTTP/1.0\r\n\r\n", |e| {
                matches!(e, HttpError::NotAResponse { .. })
            }),
            (b"\x00\x01\x02", |e| {
                matches!(e, HttpError::NotAResponse { .. })
            }),
            (b"OggS\x00\x02", |e| {
                matches!(e, HttpError::NotAResponse { .. })
            }),
            (b"HTTP/2.0 200 OK\r\n\r\n", |e| {
                matches!(e, HttpError::UnsupportedVersion { .. })
            }),
            (b"HTTP/1.1\r\n\r\n", |e| {
                matches!(e, HttpError::BadStatusLine { .. })
            }),
            (b"HTTP/1.1 20 OK\r\n\r\n", |e| {
                matches!(e, HttpError::BadStatusLine { .. })
            }),
            (b"HTTP/1.1 2000 OK\r\n\r\n", |e| {
                matches!(e, HttpError::BadStatusLine { .. })
            }),
            (b"HTTP/1.1 099 OK\r\n\r\n", |e| {
                matches!(e, HttpError::BadStatusLine { .. })
            }),
            (b"HTTP/1.1 abc OK\r\n\r\n", |e| {
                matches!(e, HttpError::BadStatusLine { .. })
            }),
            (b"HTTP/1.1 200 O\x01K\r\n\r\n", |e| {
                matches!(e, HttpError::BadStatusLine { .. })
            }),
            (b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", |e| {
                matches!(e, HttpError::BadHeader { .. })
            }),
            (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", |e| {
                matches!(e, HttpError::BadHeader { .. })
            }),
            (b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n", |e| {
                matches!(e, HttpError::BadHeader { .. })
            }),
            (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", |e| {
                matches!(e, HttpError::BadHeader { .. })
            }),
            (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", |e| {
                matches!(e, HttpError::BadHeader { .. })
            }),
        ];
        for (input, is_expected) in cases {
            let err = ResponseHead::parse(input).expect_err(&quote(input));
            assert!(is_expected(&err), "{:?}: {err}", quote(input));
            // The message quotes what is wrong and is printable.
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn response_limits() {
        // Exactly MAX_HEADERS headers is fine, one more is an error.
        let mut ok = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            ok.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let mut too_many = ok.clone();
        ok.extend_from_slice(b"\r\n");
        assert_eq!(parse_resp(&ok).0.headers().len(), MAX_HEADERS);
        too_many.extend_from_slice(b"X-last: v\r\n");
        // Detected before the blank line arrives.
        assert_eq!(
            ResponseHead::parse(&too_many),
            Err(HttpError::TooManyHeaders { limit: MAX_HEADERS })
        );

        // A head of exactly MAX_HEAD_LEN bytes parses; one byte more does not.
        let head_of_len = |len: usize| {
            let mut h = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
            h.resize(len - 4, b'a');
            h.extend_from_slice(b"\r\n\r\n");
            h
        };
        let exact = head_of_len(MAX_HEAD_LEN);
        assert_eq!(parse_resp(&exact).1, MAX_HEAD_LEN);
        let over = head_of_len(MAX_HEAD_LEN + 1);
        assert_eq!(
            ResponseHead::parse(&over),
            Err(HttpError::HeadTooLong {
                limit: MAX_HEAD_LEN
            })
        );
        // An endless head fails once it passes the limit, without reading further.
        let mut endless = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        endless.resize(MAX_HEAD_LEN - 1, b'a');
        assert_eq!(ResponseHead::parse(&endless), Ok(None));
        endless.push(b'a');
        assert!(matches!(
            ResponseHead::parse(&endless),
            Err(HttpError::HeadTooLong { .. })
        ));
        endless.resize(1 << 20, b'a');
        assert!(matches!(
            ResponseHead::parse(&endless),
            Err(HttpError::HeadTooLong { .. })
        ));
    }

    /// Every proper prefix of `full` must ask for more; the whole must parse to `expect`.
    fn check_split_response(full: &[u8]) {
        let whole = ResponseHead::parse(full).unwrap().unwrap();
        for cut in 0..whole.1 {
            assert_eq!(
                ResponseHead::parse(&full[..cut]),
                Ok(None),
                "prefix of {cut} bytes of {:?}",
                quote(full)
            );
        }
        for cut in whole.1..=full.len() {
            assert_eq!(ResponseHead::parse(&full[..cut]).unwrap().unwrap(), whole);
        }
    }

    #[test]
    fn response_split_at_every_byte() {
        check_split_response(ICECAST);
        check_split_response(b"ICY 200 OK\r\nicy-br: 128\r\n\r\nbody");
        check_split_response(b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n5\r\nhello");
        check_split_response(b"HTTP/1.1 302 Found\r\nLocation: /x\r\n  folded\r\n\r\n");
    }

    #[test]
    fn malformed_response_prefixes_never_panic() {
        // Errors may come early, but a prefix never errors with an error the whole would not,
        // unless it is an error at all; and nothing panics.
        let mut rng = Rng(7);
        for _ in 0..2000 {
            let len = rng.below(64) as usize;
            let mut buf: Vec<u8> = ICECAST.to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(buf.len() as u64) as usize;
                buf[at] = rng.next() as u8;
            }
            buf.truncate(buf.len().saturating_sub(len));
            for cut in 0..=buf.len() {
                let _ = ResponseHead::parse(&buf[..cut]);
            }
        }
    }

    #[test]
    fn parses_requests() {
        let buf = b"GET /channel HTTP/1.1\r\nHost: example:8000\r\nIcy-MetaData: 0\r\n\r\nrest";
        let (h, n) = RequestHead::parse(buf).unwrap().unwrap();
        assert_eq!(h.method(), "GET");
        assert_eq!(h.path(), "/channel");
        assert_eq!(h.version(), Version::Http11);
        assert_eq!(h.header("host"), Some("example:8000"));
        assert_eq!(h.header("icy-metadata"), Some("0"));
        assert_eq!(&buf[n..], b"rest");

        let buf = b"\r\n\nHEAD /m?x=1 HTTP/1.0\n\n";
        let (h, n) = RequestHead::parse(buf).unwrap().unwrap();
        assert_eq!(
            (h.method(), h.path(), h.version()),
            ("HEAD", "/m?x=1", Version::Http10)
        );
        assert_eq!(n, buf.len());
        assert!(h.headers().is_empty());
    }

    #[test]
    fn malformed_requests_are_errors() {
        for input in [
            &b"GET /x\r\n\r\n"[..],
            b"GET  /x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1 extra\r\n\r\n",
            b"G(T /x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/2\r\n\r\n",
            b"GET /x ICY\r\n\r\n",
            b"GET /x HTTP/1.1\r\nBad\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01",
            b"GET /a\x00b HTTP/1.1\r\n",
        ] {
            assert!(RequestHead::parse(input).is_err(), "{:?}", quote(input));
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        assert_eq!(
            RequestHead::parse(&many),
            Err(HttpError::TooManyHeaders { limit: MAX_HEADERS })
        );
        let mut long = b"GET /".to_vec();
        long.resize(MAX_HEAD_LEN + 10, b'a');
        assert!(matches!(
            RequestHead::parse(&long),
            Err(HttpError::HeadTooLong { .. })
        ));
    }

    #[test]
    fn request_split_at_every_byte() {
        for full in [
            &b"GET /channel HTTP/1.1\r\nHost: h\r\nUser-Agent: p2psp/0.1\r\n\r\n"[..],
            b"\r\nGET / HTTP/1.0\n\n",
        ] {
            let whole = RequestHead::parse(full).unwrap().unwrap();
            for cut in 0..whole.1 {
                assert_eq!(RequestHead::parse(&full[..cut]), Ok(None), "cut {cut}");
            }
            assert_eq!(RequestHead::parse(full).unwrap().unwrap(), whole);
        }
    }

    #[test]
    fn response_head_round_trips() {
        let mut rng = Rng(42);
        for _ in 0..300 {
            let status = 100 + rng.below(900) as u16;
            let word = |rng: &mut Rng, alphabet: &[u8]| -> String {
                (0..rng.below(12))
                    .map(|_| char::from(alphabet[rng.below(alphabet.len() as u64) as usize]))
                    .collect()
            };
            let reason = word(&mut rng, b"ABCxyz -_.");
            let reason = reason.trim_matches(' ').to_owned();
            let mut owned = Vec::new();
            for _ in 0..rng.below(10) {
                let mut name = word(&mut rng, b"abcXYZ-0123");
                if name.is_empty() {
                    name.push('x');
                }
                let value = word(&mut rng, b"abc 123/;=,\"")
                    .trim_matches(' ')
                    .to_owned();
                owned.push((name, value));
            }
            let fields: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (&**n, &**v)).collect();
            let bytes = response_head(status, &reason, &fields);
            let (h, n) = parse_resp(&bytes);
            assert_eq!(n, bytes.len());
            assert_eq!(h.version(), Version::Http10);
            assert_eq!(h.status(), status);
            assert_eq!(h.reason(), reason);
            let got: Vec<(&str, &str)> = h.headers().iter().collect();
            assert_eq!(got, fields);
        }
    }

    #[test]
    fn response_head_cannot_be_split_by_callers() {
        let bytes = response_head(200, "OK\r\nX-Evil: 1", &[("X-A", "b\r\n\r\nbody")]);
        let (h, n) = parse_resp(&bytes);
        assert_eq!(n, bytes.len());
        assert_eq!(h.headers().len(), 1);
        assert_eq!(h.reason(), "OK  X-Evil: 1");
    }

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), HttpError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let n = d.decode(input, &mut out)?;
        Ok((out, n, d.is_done()))
    }

    /// Decodes `input` fed in pieces cut at `cuts`; returns data, consumed total, done.
    fn decode_pieces(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize, bool), HttpError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&input.len())) {
            let piece = &input[start..end];
            let n = d.decode(piece, &mut out)?;
            consumed += n;
            if n < piece.len() {
                assert!(d.is_done());
                return Ok((out, consumed, true));
            }
            start = end;
        }
        Ok((out, consumed, d.is_done()))
    }

    const CHUNKED: &[u8] = b"5\r\nhello\r\n\
        A;name=value;flag\r\n, world!!!\r\n\
        1a \t ; ext=\"q;uoted\"\r\nabcdefghijklmnopqrstuvwxyz\r\n\
        0000F\nfifteen bytes!!\n\
        0\r\nTrailer: x\r\nOther: y\r\n\r\nNEXT";

    #[test]
    fn decodes_chunked() {
        let (out, n, done) = decode_all(CHUNKED).unwrap();
        assert_eq!(
            out,
            b"hello, world!!!abcdefghijklmnopqrstuvwxyzfifteen bytes!!".to_vec()
        );
        assert!(done);
        assert_eq!(&CHUNKED[n..], b"NEXT");
        // Nothing more is consumed once done.
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let n = d.decode(b"0\r\n\r\n", &mut out).unwrap();
        assert_eq!((n, d.is_done()), (5, true));
        assert_eq!(d.decode(b"more", &mut out), Ok(0));
        assert!(out.is_empty());
    }

    #[test]
    fn chunked_split_at_every_byte() {
        let whole = decode_all(CHUNKED).unwrap();
        for cut in 0..=CHUNKED.len() {
            assert_eq!(decode_pieces(CHUNKED, &[cut]).unwrap(), whole, "cut {cut}");
        }
        for a in 0..=CHUNKED.len() {
            for b in a..=CHUNKED.len() {
                assert_eq!(
                    decode_pieces(CHUNKED, &[a, b]).unwrap(),
                    whole,
                    "cuts {a} {b}"
                );
            }
        }
        // Byte at a time.
        let cuts: Vec<usize> = (1..CHUNKED.len()).collect();
        assert_eq!(decode_pieces(CHUNKED, &cuts).unwrap(), whole);
    }

    #[test]
    fn chunked_hex_any_case() {
        let (out, _, done) =
            decode_all(b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!(out.len(), 20);
        assert!(done);
        let mut input = b"1F\r\n".to_vec();
        input.extend_from_slice(&[b'x'; 31]);
        input.extend_from_slice(b"\r\n1f\r\n");
        input.extend_from_slice(&[b'y'; 31]);
        input.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(decode_all(&input).unwrap().0.len(), 62);
    }

    #[test]
    fn chunked_errors() {
        assert_eq!(
            decode_all(b"10000000000000000\r\n"),
            Err(HttpError::ChunkSizeOverflow)
        );
        // The largest size is fine (the data just never completes).
        let (_, _, done) = decode_all(b"ffffffffffffffff\r\nabc").unwrap();
        assert!(!done);
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b";ext\r\n",
            b" 5\r\n",
            b"5 x\r\n",
            b"5\rx",
            b"-5\r\n",
            b"0x5\r\n",
        ] {
            assert!(
                matches!(decode_all(bad), Err(HttpError::BadChunkSize { .. })),
                "{:?}: {:?}",
                quote(bad),
                decode_all(bad)
            );
        }
        assert_eq!(
            decode_all(b"3\r\nabcX"),
            Err(HttpError::MissingChunkEnd { byte: b'X' })
        );
        assert_eq!(
            decode_all(b"3\r\nabc\rX"),
            Err(HttpError::MissingChunkEnd { byte: b'X' })
        );
        assert_eq!(
            decode_all(b"0\r\n\rX"),
            Err(HttpError::MissingChunkEnd { byte: b'X' })
        );
        let mut long = b"5;".to_vec();
        long.resize(MAX_CHUNK_LINE_LEN + 1, b'e');
        assert_eq!(
            decode_all(&long),
            Err(HttpError::ChunkLineTooLong {
                limit: MAX_CHUNK_LINE_LEN
            })
        );
        let mut zeros = vec![b'0'; MAX_CHUNK_LINE_LEN + 1];
        zeros.push(b'\n');
        assert!(matches!(
            decode_all(&zeros),
            Err(HttpError::ChunkLineTooLong { .. })
        ));
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILERS_LEN + 100 {
            trailers.extend_from_slice(b"X: y\r\n");
        }
        assert_eq!(
            decode_all(&trailers),
            Err(HttpError::TrailersTooLong {
                limit: MAX_TRAILERS_LEN
            })
        );
    }

    /// Encodes `data` as a chunked body with chunk sizes from `rng`, random extensions, hex case
    /// and line ends, and trailers.
    fn encode_chunked(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let eol =
            |rng: &mut Rng| -> &'static [u8] { if rng.below(4) == 0 { b"\n" } else { b"\r\n" } };
        let mut rest = data;
        while !rest.is_empty() {
            let n = (1 + rng.below(300) as usize).min(rest.len());
            let size = if rng.below(2) == 0 {
                format!("{n:x}")
            } else {
                format!("{n:X}")
            };
            out.extend_from_slice(size.as_bytes());
            if rng.below(3) == 0 {
                out.extend_from_slice(b" ;a=b;c");
            }
            out.extend_from_slice(eol(rng));
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(eol(rng));
            rest = &rest[n..];
        }
        out.extend_from_slice(b"0");
        out.extend_from_slice(eol(rng));
        for _ in 0..rng.below(3) {
            out.extend_from_slice(b"T: v");
            out.extend_from_slice(eol(rng));
        }
        out.extend_from_slice(eol(rng));
        out
    }

    #[test]
    fn chunked_round_trips_in_random_pieces() {
        let mut rng = Rng(0x5eed);
        for _ in 0..300 {
            let data: Vec<u8> = (0..rng.below(3000)).map(|_| rng.next() as u8).collect();
            let mut encoded = encode_chunked(&mut rng, &data);
            let body_len = encoded.len();
            encoded.extend_from_slice(b"after");
            let mut cuts: Vec<usize> = (0..rng.below(20))
                .map(|_| rng.below(encoded.len() as u64 + 1) as usize)
                .collect();
            cuts.sort_unstable();
            let (out, consumed, done) = decode_pieces(&encoded, &cuts).unwrap();
            assert_eq!(out, data);
            assert_eq!(consumed, body_len);
            assert!(done);
        }
    }

    #[test]
    fn chunked_garbage_never_panics() {
        let mut rng = Rng(99);
        for _ in 0..3000 {
            let data: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
            let mut encoded = encode_chunked(&mut rng, &data);
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(encoded.len() as u64) as usize;
                encoded[at] = rng.next() as u8;
            }
            let _ = decode_pieces(&encoded, &[rng.below(encoded.len() as u64) as usize]);
        }
    }
}
