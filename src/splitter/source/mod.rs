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

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use thiserror::Error;

use crate::http::HttpError;

mod http;
mod spec;
mod stdin;
mod test;

pub use http::HttpSource;
pub use spec::{HttpUrl, SourceSpec, SpecError};
pub use stdin::StdinSource;
pub use test::{TEST_CONTENT_TYPE, TestSource};

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

/// What a source hands out before it reads more: `Data(0)` when `buf` is empty, or the bytes
/// read earlier and not handed out yet (`pending[*pos..]`).
fn ready(pending: &mut Vec<u8>, pos: &mut usize, buf: &mut [u8]) -> Option<SourceItem> {
    if buf.is_empty() {
        return Some(SourceItem::Data(0));
    }
    (!pending.is_empty()).then(|| SourceItem::Data(drain(pending, pos, buf)))
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

#[cfg(test)]
mod tests;
