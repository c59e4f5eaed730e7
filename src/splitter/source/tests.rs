//! Tests of the sources. HTTP tests run a real server on 127.0.0.1 in a test thread; every wait is
//! bounded (a watchdog raises the stop flag if a test hangs), and no sleep is used to order events.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::http::{HttpConfig, IcyStrip};
use super::test::{Pace, Pacer};
use super::*;
use crate::http::RequestHead;
use crate::pattern;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Raises `stop` if the test is still running after `limit`, so that a hang fails instead of
/// blocking the test run. Dropping it disarms it.
struct Watchdog {
    _disarm: mpsc::Sender<()>,
}

impl Watchdog {
    fn new(stop: &Arc<AtomicBool>, limit: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let stop = stop.clone();
        thread::spawn(move || {
            if rx.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
                stop.store(true, Ordering::Relaxed);
            }
        });
        Self { _disarm: tx }
    }
}

/// What a test server does with one accepted connection, after reading its request head.
type Handler = Box<dyn FnOnce(&mut TcpStream) + Send>;

/// A server on 127.0.0.1 that serves one handler per accepted connection, in order, and returns
/// the request heads it read.
struct Server {
    url: HttpUrl,
    thread: JoinHandle<Vec<RequestHead>>,
}

impl Server {
    fn start(path: &str, handlers: Vec<Handler>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = thread::spawn(move || {
            let mut requests = Vec::new();
            let mut handlers_running = Vec::new();
            for handler in handlers {
                let (mut stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut buf = Vec::new();
                let mut piece = [0u8; 512];
                let head = loop {
                    let n = stream.read(&mut piece).unwrap();
                    assert!(n > 0, "client closed before its request head");
                    buf.extend_from_slice(&piece[..n]);
                    if let Some((head, _)) = RequestHead::parse(&buf).unwrap() {
                        break head;
                    }
                };
                requests.push(head);
                // Each connection in its own thread, so that one held open does not keep the
                // next from being served.
                handlers_running.push(thread::spawn(move || handler(&mut stream)));
            }
            for h in handlers_running {
                h.join().unwrap();
            }
            requests
        });
        let url = HttpUrl {
            host: "127.0.0.1".into(),
            port,
            path: path.into(),
        };
        Self { url, thread }
    }

    fn requests(self) -> Vec<RequestHead> {
        self.thread.join().unwrap()
    }
}

/// A handler that writes `pieces`, then closes.
fn send(pieces: &[&[u8]]) -> Handler {
    let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
    Box::new(move |stream| {
        for p in pieces {
            stream.write_all(&p).unwrap();
            stream.flush().unwrap();
        }
    })
}

/// A handler that writes `pieces`, then keeps the connection open until `release` fires (or its
/// sender is dropped).
fn send_and_hold(pieces: &[&[u8]], release: mpsc::Receiver<()>) -> Handler {
    let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
    Box::new(move |stream| {
        for p in pieces {
            stream.write_all(&p).unwrap();
        }
        let _ = release.recv_timeout(Duration::from_secs(10));
    })
}

/// A source item with its data copied out, for comparisons.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Start(Option<String>),
    Bytes(Vec<u8>),
    End,
}

/// Calls `next` with a `buf_len` buffer until `want` data bytes arrived after the items so far,
/// merging consecutive data. Stops early at `End`.
fn collect(src: &mut dyn Source, buf_len: usize, want: usize) -> Vec<Got> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; buf_len];
    let mut bytes = 0;
    while bytes < want {
        match src.next(&mut buf).unwrap() {
            SourceItem::StreamStart { content_type } => got.push(Got::Start(content_type)),
            SourceItem::Data(n) => {
                assert!(n > 0 && n <= buf_len);
                bytes += n;
                match got.last_mut() {
                    Some(Got::Bytes(b)) => b.extend_from_slice(&buf[..n]),
                    _ => got.push(Got::Bytes(buf[..n].to_vec())),
                }
            }
            SourceItem::End => {
                got.push(Got::End);
                break;
            }
        }
    }
    got
}

fn start(ct: &str) -> Got {
    Got::Start(Some(ct.to_owned()))
}

fn bytes(b: &[u8]) -> Got {
    Got::Bytes(b.to_vec())
}

fn fast_config() -> HttpConfig {
    HttpConfig {
        answer_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        backoff_start: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(50),
        read_buf: 64 * 1024,
    }
}

// ---------------------------------------------------------------------------------------------
// SourceSpec

#[test]
fn parses_source_specs() {
    assert_eq!("test".parse(), Ok(SourceSpec::Test));
    assert_eq!("-".parse(), Ok(SourceSpec::Stdin));
    let http = |host: &str, port, path: &str| {
        Ok(SourceSpec::Http(HttpUrl {
            host: host.into(),
            port,
            path: path.into(),
        }))
    };
    assert_eq!(
        "http://example.org/live.ogg".parse(),
        http("example.org", 80, "/live.ogg")
    );
    assert_eq!(
        "HTTP://Example.org:8000".parse(),
        http("Example.org", 8000, "/")
    );
    assert_eq!(
        "http://10.0.0.1:8000/a/b?c=d#frag".parse(),
        http("10.0.0.1", 8000, "/a/b?c=d")
    );
    assert_eq!("http://h?x=1".parse(), http("h", 80, "/?x=1"));
    assert_eq!("http://[::1]:8080/m".parse(), http("::1", 8080, "/m"));
    assert_eq!("http://[fe80::1]/m".parse(), http("fe80::1", 80, "/m"));
    assert_eq!(
        "http://my_host-1.local:65535/".parse(),
        http("my_host-1.local", 65535, "/")
    );
}

#[test]
fn source_spec_errors_say_what_is_wrong() {
    let err = |s: &str| s.parse::<SourceSpec>().unwrap_err();
    assert!(matches!(
        err("https://example.org/x"),
        SpecError::Https { .. }
    ));
    assert!(
        err("https://example.org/x")
            .to_string()
            .contains("https is not supported")
    );
    assert!(matches!(err("HTTPS://x"), SpecError::Https { .. }));
    assert!(matches!(
        err("rtmp://x/y"),
        SpecError::UnsupportedScheme { .. }
    ));
    assert!(matches!(err("file.ogg"), SpecError::Unknown { .. }));
    assert!(matches!(err(""), SpecError::Unknown { .. }));
    assert!(matches!(err("Test"), SpecError::Unknown { .. }));
    for missing in ["http://", "http:///path", "http://:8000/x", "http://?q"] {
        assert!(
            matches!(err(missing), SpecError::MissingHost { .. }),
            "{missing}"
        );
    }
    assert!(err("http:///x").to_string().contains("missing host"));
    for port in [
        "http://h:/x",
        "http://h:0/x",
        "http://h:65536/x",
        "http://h:+80/x",
        "http://h:8o/x",
        "http://h:80:81/x",
        "http://[::1]:x/",
    ] {
        assert!(matches!(err(port), SpecError::BadPort { .. }), "{port}");
    }
    assert!(
        err("http://h:99999/")
            .to_string()
            .contains("invalid port \"99999\"")
    );
    for host in [
        "http://h st/x",
        "http://[::1/x",
        "http://[nope]/x",
        "http://[::1]x/",
        "http://h%41/",
    ] {
        assert!(matches!(err(host), SpecError::BadHost { .. }), "{host}");
    }
    assert!(matches!(
        err("http://u:p@h/x"),
        SpecError::Credentials { .. }
    ));
    assert!(matches!(err("http://h/a b"), SpecError::BadPath { .. }));
    assert!(matches!(err("http://h/a\tb"), SpecError::BadPath { .. }));
}

#[test]
fn url_display_and_host_header() {
    let url: HttpUrl = "http://example.org/live".parse().unwrap();
    assert_eq!(url.host_header(), "example.org");
    assert_eq!(url.to_string(), "http://example.org/live");
    let url: HttpUrl = "http://[::1]:8000/live".parse().unwrap();
    assert_eq!(url.host_header(), "[::1]:8000");
    assert_eq!(url.to_string(), "http://[::1]:8000/live");
    // Display round-trips through FromStr.
    for s in ["test", "-", "http://h:81/a?b", "http://[::1]/"] {
        let spec: SourceSpec = s.parse().unwrap();
        assert_eq!(spec.to_string().parse::<SourceSpec>().unwrap(), spec);
    }
}

// ---------------------------------------------------------------------------------------------
// Test source

#[test]
fn pacer_keeps_the_bitrate_in_small_pieces() {
    let rate = 8_000_000; // 1 MB/s: a 2 ms piece is 2000 bytes.
    let mut p = Pacer::new(rate);
    let mut now = Duration::ZERO;
    let mut sent = 0u64;
    let mut pieces = 0;
    while now < Duration::from_secs(1) {
        match p.poll(now, 1 << 20) {
            Pace::Send(n) => {
                sent += n as u64;
                pieces += 1;
                assert!(n >= 2000, "piece of {n} bytes at {now:?}");
            }
            Pace::Wait(d) => {
                assert!(d <= Duration::from_millis(2) && !d.is_zero(), "{d:?}");
                now += d;
            }
        }
    }
    assert!((998_000..=1_000_000).contains(&sent), "{sent}");
    assert!((400..=500).contains(&pieces), "{pieces}");
}

#[test]
fn pacer_limits_the_burst_after_a_stall() {
    let mut p = Pacer::new(8_000_000);
    assert_eq!(
        p.poll(Duration::from_millis(10), 1 << 20),
        Pace::Send(10_000)
    );
    // The caller stalls for a second: only 50 ms of backlog is sent.
    assert_eq!(
        p.poll(Duration::from_millis(1010), 1 << 20),
        Pace::Send(50_000)
    );
    assert!(matches!(
        p.poll(Duration::from_millis(1010), 1 << 20),
        Pace::Wait(_)
    ));
    // And the rate goes on from there.
    assert_eq!(
        p.poll(Duration::from_millis(1020), 1 << 20),
        Pace::Send(10_000)
    );
    // A small buffer gets what fits.
    assert_eq!(p.poll(Duration::from_millis(1030), 100), Pace::Send(100));
    assert_eq!(
        p.poll(Duration::from_millis(1030), 1 << 20),
        Pace::Send(9_900)
    );
}

#[test]
fn pacer_handles_tiny_bitrates() {
    // 8 bit/s: one byte a second. It waits whole seconds, never sends early.
    let mut p = Pacer::new(8);
    assert_eq!(
        p.poll(Duration::ZERO, 10),
        Pace::Wait(Duration::from_secs(1))
    );
    assert_eq!(
        p.poll(Duration::from_millis(999), 10),
        Pace::Wait(Duration::from_millis(1))
    );
    assert_eq!(p.poll(Duration::from_secs(1), 10), Pace::Send(1));
    let mut p = Pacer::new(u64::MAX);
    assert_eq!(
        p.poll(Duration::from_secs(3600), 1 << 20),
        Pace::Send(1 << 20)
    );
}

#[test]
fn test_source_emits_the_exact_pattern() {
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let mut src = open(&SourceSpec::Test, 80_000_000, stop.clone()).unwrap();
    assert_eq!(src.describe(), "test pattern at 80000000 bit/s");
    let got = collect(&mut *src, 1000, 300_000);
    assert_eq!(got[0], start(TEST_CONTENT_TYPE));
    let Got::Bytes(data) = &got[1] else {
        panic!("{:?}", got[1])
    };
    assert_eq!(got.len(), 2);
    assert_eq!(pattern::first_mismatch(0, data), None);
    assert_eq!(src.reconnects(), 0);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(src.next(&mut [0; 10]).unwrap(), SourceItem::End);
}

#[test]
fn test_source_is_not_faster_than_its_bitrate() {
    let stop = Arc::new(AtomicBool::new(false));
    let mut src = TestSource::new(8_000_000, stop).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    assert!(matches!(
        src.next(&mut buf).unwrap(),
        SourceItem::StreamStart { .. }
    ));
    let t0 = Instant::now();
    let mut total = 0u64;
    while total < 200_000 {
        let SourceItem::Data(n) = src.next(&mut buf).unwrap() else {
            panic!("no data")
        };
        assert!(n <= 50_000, "burst of {n} bytes");
        total += n as u64;
    }
    // 200 kB at 1 MB/s takes at least 200 ms, less one 2 ms piece of slack.
    assert!(
        t0.elapsed() >= Duration::from_millis(195),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn zero_bitrate_is_an_error() {
    let stop = Arc::new(AtomicBool::new(false));
    let err = open(&SourceSpec::Test, 0, stop).err().unwrap();
    assert!(matches!(err, SourceError::ZeroBitrate));
}

// ---------------------------------------------------------------------------------------------
// Stdin source

#[test]
fn reader_source_reads_to_end() {
    let stop = Arc::new(AtomicBool::new(false));
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let mut src = StdinSource::from_reader(std::io::Cursor::new(data.clone()), stop);
    assert_eq!(src.describe(), "stdin");
    let got = collect(&mut src, 4097, usize::MAX);
    assert_eq!(got, vec![Got::Start(None), Got::Bytes(data), Got::End]);
    assert_eq!(src.next(&mut [0; 4]).unwrap(), SourceItem::End);
}

#[test]
fn reader_source_stops_while_blocked() {
    let stop = Arc::new(AtomicBool::new(false));
    // A reader that never returns: the read end of a pipe nobody writes to.
    let (reader, _writer) = pipe_pair();
    let mut src = StdinSource::from_reader(reader, stop.clone());
    assert_eq!(
        src.next(&mut [0; 8]).unwrap(),
        SourceItem::StreamStart { content_type: None }
    );
    let stopper = {
        let stop = stop.clone();
        thread::spawn(move || stop.store(true, Ordering::Relaxed))
    };
    let t0 = Instant::now();
    assert_eq!(src.next(&mut [0; 8]).unwrap(), SourceItem::End);
    assert!(t0.elapsed() < Duration::from_secs(2));
    stopper.join().unwrap();
}

/// A connected pair of TCP streams, standing in for a pipe.
fn pipe_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    (a, b)
}

#[test]
fn reader_source_reports_read_errors() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut src = StdinSource::from_reader(Failing, stop);
    assert!(matches!(
        src.next(&mut [0; 8]).unwrap(),
        SourceItem::StreamStart { .. }
    ));
    let err = src.next(&mut [0; 8]).unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert_eq!(src.next(&mut [0; 8]).unwrap(), SourceItem::End);
}

// ---------------------------------------------------------------------------------------------
// HTTP source

#[test]
fn http_plain_body_and_request() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/live.ogg?x=1",
        vec![send_and_hold(
            &[
                b"HTTP/1.0 200 OK\r\nContent-Type: audio/ogg\r\nServer: Icecast\r\n\r\nOggS",
                b"-rest",
            ],
            hold,
        )],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let mut src = open(&SourceSpec::Http(server.url.clone()), 0, stop).unwrap();
    assert_eq!(src.describe(), server.url.to_string());
    let got = collect(&mut *src, 3, 9);
    assert_eq!(got, vec![start("audio/ogg"), bytes(b"OggS-rest")]);
    release.send(()).unwrap();

    let host = format!("127.0.0.1:{}", server.url.port);
    let requests = server.requests();
    let req = &requests[0];
    assert_eq!(req.method(), "GET");
    assert_eq!(req.path(), "/live.ogg?x=1");
    assert_eq!(req.version(), crate::http::Version::Http11);
    assert_eq!(req.header("host"), Some(host.as_str()));
    assert_eq!(
        req.header("user-agent"),
        Some(format!("p2psp/{}", env!("CARGO_PKG_VERSION"))).as_deref()
    );
    assert_eq!(req.header("icy-metadata"), Some("0"));
    assert_eq!(req.header("connection"), Some("close"));
}

#[test]
fn http_chunked_body_split_everywhere() {
    let body = b"7\r\nOggS-ab\r\n3;ext=1\r\ncde\r\n10\r\n0123456789abcdef\r\n0\r\nT: x\r\n\r\n";
    let mut head_and_body =
        b"HTTP/1.1 200 OK\r\nContent-Type: video/webm\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    head_and_body.extend_from_slice(body);
    // Reads of 1 to 5 bytes (head included, so no body arrives with it) split the chunk framing
    // at every place; the server sends the whole response in one piece or byte by byte.
    for read_buf in 1..=5 {
        let (release, hold) = mpsc::channel();
        let pieces: Vec<&[u8]> = if read_buf % 2 == 0 {
            head_and_body.chunks(1).collect()
        } else {
            vec![&head_and_body]
        };
        let server = Server::start("/m", vec![send_and_hold(&pieces, hold)]);
        let stop = Arc::new(AtomicBool::new(false));
        let _dog = Watchdog::new(&stop, Duration::from_secs(20));
        let cfg = HttpConfig {
            read_buf,
            ..fast_config()
        };
        let mut src = HttpSource::with_config(server.url.clone(), stop, cfg).unwrap();
        let got = collect(&mut src, 4, 26);
        assert_eq!(
            got,
            vec![start("video/webm"), bytes(b"OggS-abcde0123456789abcdef")],
            "read_buf {read_buf}"
        );
        release.send(()).unwrap();
        server.requests();
    }
}

#[test]
fn http_icy_response() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/stream",
        vec![send_and_hold(
            &[b"ICY 200 OK\r\nicy-name: Test FM\r\nicy-br: 128\r\ncontent-type: audio/mpeg\r\n\r\n\xff\xfbmp3"],
            hold,
        )],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let mut src = open(&SourceSpec::Http(server.url.clone()), 0, stop).unwrap();
    let got = collect(&mut *src, 64, 5);
    assert_eq!(got, vec![start("audio/mpeg"), bytes(b"\xff\xfbmp3")]);
    release.send(()).unwrap();
    server.requests();
}

/// Interleaves ICY metadata into `media` every `interval` bytes, with metadata blocks of varying
/// length (including empty ones).
fn with_icy_metadata(media: &[u8], interval: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, block) in media.chunks(interval).enumerate() {
        out.extend_from_slice(block);
        if block.len() == interval {
            let len = i % 3;
            out.push(len as u8);
            out.extend(std::iter::repeat_n(b'M', len * 16));
        }
    }
    out
}

#[test]
fn icy_strip_removes_metadata_in_any_pieces() {
    let media: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    for interval in [1, 7, 16, 100] {
        let body = with_icy_metadata(&media, interval);
        for piece in [1, 2, 3, 17, 64, 5000] {
            let mut icy = IcyStrip::new(interval);
            let mut out = Vec::new();
            for chunk in body.chunks(piece) {
                let mut chunk = chunk.to_vec();
                let kept = icy.strip(&mut chunk);
                out.extend_from_slice(&chunk[..kept]);
            }
            assert_eq!(out, media, "interval {interval} piece {piece}");
        }
    }
}

#[test]
fn http_strips_icy_metadata_sent_anyway() {
    let media = b"0123456789abcdefghij";
    let interleaved = with_icy_metadata(media, 4);
    let mut plain = b"ICY 200 OK\r\ncontent-type: audio/mpeg\r\nicy-metaint: 4\r\n\r\n".to_vec();
    plain.extend_from_slice(&interleaved);
    let mut chunked = b"HTTP/1.1 200 OK\r\ncontent-type: audio/mpeg\r\nicy-metaint: 4\r\n\
        transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    for piece in interleaved.chunks(7) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    let cases = [1, 3, 4096]
        .into_iter()
        .flat_map(|n| [(n, &plain), (n, &chunked)]);
    for (read_buf, response) in cases {
        let (release, hold) = mpsc::channel();
        let server = Server::start("/s", vec![send_and_hold(&[response], hold)]);
        let stop = Arc::new(AtomicBool::new(false));
        let _dog = Watchdog::new(&stop, Duration::from_secs(20));
        let cfg = HttpConfig {
            read_buf,
            ..fast_config()
        };
        let mut src = HttpSource::with_config(server.url.clone(), stop, cfg).unwrap();
        let got = collect(&mut src, 5, media.len());
        assert_eq!(
            got,
            vec![start("audio/mpeg"), bytes(media)],
            "read_buf {read_buf}"
        );
        release.send(()).unwrap();
        server.requests();
    }
}

#[test]
fn http_404_is_a_clear_error() {
    let server = Server::start(
        "/missing",
        vec![send(&[
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        ])],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let err = open(&SourceSpec::Http(server.url.clone()), 0, stop)
        .err()
        .unwrap();
    assert!(
        matches!(err, SourceError::Status { status: 404, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("404 Not Found") && msg.contains(&server.url.to_string()),
        "{msg}"
    );
    server.requests();
}

#[test]
fn http_redirect_names_the_location() {
    let server = Server::start(
        "/old",
        vec![send(&[
            b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/new\r\n\r\n",
        ])],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let err = open(&SourceSpec::Http(server.url.clone()), 0, stop)
        .err()
        .unwrap();
    assert!(err.to_string().contains("http://elsewhere/new"), "{err}");
    server.requests();
}

#[test]
fn http_not_http_is_a_clear_error() {
    // A server that sends raw media instead of an HTTP response.
    let server = Server::start("/raw", vec![send(&[b"OggS\x00\x02\x00\x00\x00\x00"])]);
    let stop = Arc::new(AtomicBool::new(false));
    let err = open(&SourceSpec::Http(server.url.clone()), 0, stop)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            SourceError::NotHttp {
                source: HttpError::NotAResponse { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("not an HTTP response"), "{err}");
    server.requests();

    // One that closes without answering.
    let server = Server::start("/x", vec![send(&[])]);
    let stop = Arc::new(AtomicBool::new(false));
    let err = open(&SourceSpec::Http(server.url.clone()), 0, stop)
        .err()
        .unwrap();
    assert!(matches!(err, SourceError::ClosedEarly { .. }), "{err:?}");
    server.requests();
}

#[test]
fn http_connection_refused_is_a_clear_error_within_the_bound() {
    // A port nobody listens on: bind one, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec: SourceSpec = format!("http://127.0.0.1:{port}/live").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let err = open(&spec, 0, stop).err().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let SourceError::Connect { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        err.to_string()
            .starts_with(&format!("cannot connect to http://127.0.0.1:{port}/live"))
    );
}

#[test]
fn http_silent_server_times_out() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/slow",
        vec![send_and_hold(&[b"HTTP/1.1 200 OK\r\n"], hold)],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = HttpConfig {
        answer_timeout: Duration::from_millis(300),
        ..fast_config()
    };
    let t0 = Instant::now();
    let err = HttpSource::with_config(server.url.clone(), stop, cfg)
        .err()
        .unwrap();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        err.to_string().contains("did not answer within 0.3 s"),
        "{err}"
    );
    release.send(()).unwrap();
    server.requests();
}

#[test]
fn http_reconnects_after_the_server_closes() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/live",
        vec![
            send(&[b"HTTP/1.0 200 OK\r\nContent-Type: audio/ogg\r\n\r\nfirst-body"]),
            send_and_hold(
                &[b"HTTP/1.1 200 OK\r\nContent-Type: video/webm\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n"],
                hold,
            ),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let mut src = HttpSource::with_config(server.url.clone(), stop, fast_config()).unwrap();
    let got = collect(&mut src, 4, 16);
    assert_eq!(
        got,
        vec![
            start("audio/ogg"),
            bytes(b"first-body"),
            start("video/webm"),
            bytes(b"second")
        ]
    );
    assert_eq!(src.reconnects(), 1);
    release.send(()).unwrap();
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn http_reconnect_uses_default_backoff() {
    // With the documented timings (first retry after 100 ms).
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/live",
        vec![
            send(&[b"HTTP/1.0 200 OK\r\n\r\nab"]),
            send_and_hold(&[b"HTTP/1.0 200 OK\r\n\r\ncd"], hold),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let mut src = open(&SourceSpec::Http(server.url.clone()), 0, stop).unwrap();
    let got = collect(&mut *src, 64, 4);
    assert_eq!(
        got,
        vec![
            Got::Start(None),
            bytes(b"ab"),
            Got::Start(None),
            bytes(b"cd")
        ]
    );
    assert_eq!(src.reconnects(), 1);
    release.send(()).unwrap();
    server.requests();
}

#[test]
fn http_content_length_ends_the_body() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/live",
        vec![
            // Bytes past Content-Length are not body.
            send_and_hold(
                &[
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
                    b"loXXXX",
                ],
                hold,
            ),
            send(&[b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcYY"]),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let mut src = HttpSource::with_config(server.url.clone(), stop, fast_config()).unwrap();
    let got = collect(&mut src, 64, 8);
    assert_eq!(
        got,
        vec![
            Got::Start(None),
            bytes(b"hello"),
            Got::Start(None),
            bytes(b"abc")
        ]
    );
    release.send(()).unwrap();
    server.requests();
}

#[test]
fn http_stalled_source_is_reconnected() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/live",
        vec![
            send_and_hold(&[b"HTTP/1.0 200 OK\r\n\r\nabc"], hold),
            send(&[b"HTTP/1.0 200 OK\r\n\r\ndef"]),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let cfg = HttpConfig {
        stall_timeout: Duration::from_millis(300),
        ..fast_config()
    };
    let mut src = HttpSource::with_config(server.url.clone(), stop, cfg).unwrap();
    let got = collect(&mut src, 64, 6);
    assert_eq!(
        got,
        vec![
            Got::Start(None),
            bytes(b"abc"),
            Got::Start(None),
            bytes(b"def")
        ]
    );
    assert_eq!(src.reconnects(), 1);
    release.send(()).unwrap();
    server.requests();
}

#[test]
fn http_malformed_chunked_body_reconnects_after_the_good_part() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/live",
        vec![
            send(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"]),
            send_and_hold(&[b"HTTP/1.0 200 OK\r\n\r\ndef"], hold),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _dog = Watchdog::new(&stop, Duration::from_secs(20));
    let mut src = HttpSource::with_config(server.url.clone(), stop, fast_config()).unwrap();
    let got = collect(&mut src, 64, 6);
    assert_eq!(
        got,
        vec![
            Got::Start(None),
            bytes(b"abc"),
            Got::Start(None),
            bytes(b"def")
        ]
    );
    release.send(()).unwrap();
    server.requests();
}

#[test]
fn http_stop_ends_a_blocked_read() {
    let (release, hold) = mpsc::channel();
    let server = Server::start(
        "/live",
        vec![send_and_hold(&[b"HTTP/1.0 200 OK\r\n\r\nabc"], hold)],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut src = open(&SourceSpec::Http(server.url.clone()), 0, stop.clone()).unwrap();
    let (read_all, all_read) = mpsc::channel();
    let reader = thread::spawn(move || {
        let got = collect(&mut *src, 64, 3);
        read_all.send(()).unwrap();
        // The server sends nothing more: this blocks until the stop flag is seen.
        let item = src.next(&mut [0; 64]).unwrap();
        (got, item, Instant::now())
    });
    all_read.recv_timeout(Duration::from_secs(10)).unwrap();
    let raised = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let (got, item, ended) = reader.join().unwrap();
    assert_eq!(got, vec![Got::Start(None), bytes(b"abc")]);
    assert_eq!(item, SourceItem::End);
    // Seen within one stop poll (100 ms), with slack for a loaded machine.
    assert!(ended.duration_since(raised) < Duration::from_secs(1));
    release.send(()).unwrap();
    server.requests();
}

#[test]
fn http_stop_ends_reconnection_attempts() {
    // The server serves once then goes away: the source retries until stopped.
    let server = Server::start("/live", vec![send(&[b"HTTP/1.0 200 OK\r\n\r\nabc"])]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut src = HttpSource::with_config(server.url.clone(), stop.clone(), fast_config()).unwrap();
    let got = collect(&mut src, 64, 3);
    assert_eq!(got, vec![Got::Start(None), bytes(b"abc")]);
    server.requests(); // The listener is closed from here on.
    let stopper = {
        let stop = stop.clone();
        thread::spawn(move || stop.store(true, Ordering::Relaxed))
    };
    let t0 = Instant::now();
    assert_eq!(src.next(&mut [0; 64]).unwrap(), SourceItem::End);
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(src.reconnects(), 0);
    stopper.join().unwrap();
}
