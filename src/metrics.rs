#![forbid(unsafe_code)]
//! The `--metrics ADDR` endpoint of the splitter and the peer: one small thread with a plain
//! `TcpListener` that answers
//!
//! - `GET /metrics`: Prometheus text format (version 0.0.4), written by hand ([`Prom`]);
//! - `GET /status`: the same and more as JSON, per team and per peer;
//! - `GET /`: a status page that fetches `/status` every second and shows teams, peers, bit rates
//!   and losses.
//!
//! Requests are served one at a time with short timeouts: this is an operator's endpoint, not a
//! web server. Nothing here touches the data path; exporters read relaxed atomics and snapshots
//! that the threads publish once a second.

use std::fmt::{Display, Write as _};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::driver::{self, PollFd};
use crate::http::RequestHead;

/// The live status page (plain HTML and JavaScript, no external resources).
pub const PAGE: &str = include_str!("metrics_page.html");

/// What a program exports.
pub trait Exporter: Send + Sync + 'static {
    /// Writes every metric family.
    fn metrics(&self, out: &mut Prom);
    /// The `/status` document.
    fn status(&self) -> serde_json::Value;
}

/// What a metric family is in Prometheus terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (from 0 when the program starts).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    /// The `# TYPE` word.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// Builds Prometheus text exposition format.
#[derive(Debug, Default)]
pub struct Prom {
    out: String,
}

impl Prom {
    /// An empty exposition.
    pub fn new() -> Prom {
        Prom::default()
    }

    /// Starts a metric family: `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A bound metrics endpoint, not yet serving.
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    /// Binds `addr`. Errors name the address (port in use, address not available).
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Endpoint> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen for --metrics on {addr}: {e}"))?;
        Ok(Endpoint { listener })
    }

    /// The address it is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves `exporter` on a thread of its own until `stop`.
    pub fn serve(
        self,
        exporter: Arc<dyn Exporter>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<JoinHandle<()>> {
        self.listener.set_nonblocking(true)?;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || run(&self.listener, exporter.as_ref(), &stop))
    }
}

fn run(listener: &TcpListener, exporter: &dyn Exporter, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_raw_fd(), driver::POLLIN)];
        if driver::poll(&mut fds, Some(Duration::from_millis(100))).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => answer(stream, exporter),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// What a request gets: status, content type, body.
pub fn route(method: &str, target: &str, exporter: &dyn Exporter) -> (u16, &'static str, Vec<u8>) {
    if method != "GET" && method != "HEAD" {
        return (405, "text/plain", b"only GET\n".to_vec());
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    match path {
        "/metrics" => {
            let mut p = Prom::new();
            exporter.metrics(&mut p);
            (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                p.finish().into_bytes(),
            )
        }
        "/status" => {
            let mut body = serde_json::to_vec_pretty(&exporter.status()).unwrap_or_default();
            body.push(b'\n');
            (200, "application/json", body)
        }
        "/" | "/index.html" => (200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        _ => (
            404,
            "text/plain",
            b"not found: try /, /status or /metrics\n".to_vec(),
        ),
    }
}

fn answer(mut stream: TcpStream, exporter: &dyn Exporter) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (status, content_type, body, head_only) = loop {
        match RequestHead::parse(&buf) {
            Ok(Some((req, _))) => {
                let (s, ct, b) = route(req.method(), req.path(), exporter);
                break (s, ct, b, req.method() == "HEAD");
            }
            Ok(None) if buf.len() < 16 * 1024 => {}
            _ => break (400, "text/plain", b"bad request\n".to_vec(), false),
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Bad Request",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    if !head_only {
        let _ = stream.write_all(&body);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Let the client read the response before the close (no reset on unread request bytes).
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.read(&mut chunk);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;

    impl Exporter for Fake {
        fn metrics(&self, out: &mut Prom) {
            out.counter("p2psp_test_total", "A test counter.", 7);
            out.family("p2psp_test_labelled", "gauge", "Labels.");
            out.sample(
                "p2psp_test_labelled",
                &[("shard", "0"), ("odd", "a\"b\\c\nd")],
                1.5,
            );
        }

        fn status(&self) -> serde_json::Value {
            serde_json::json!({ "peers": 3 })
        }
    }

    #[test]
    fn prometheus_text() {
        let (status, ct, body) = route("GET", "/metrics?x=1", &Fake);
        assert_eq!(status, 200);
        assert!(ct.starts_with("text/plain; version=0.0.4"));
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            "# HELP p2psp_test_total A test counter.\n# TYPE p2psp_test_total counter\np2psp_test_total 7\n\
             # HELP p2psp_test_labelled Labels.\n# TYPE p2psp_test_labelled gauge\n\
             p2psp_test_labelled{shard=\"0\",odd=\"a\\\"b\\\\c\\nd\"} 1.5\n"
        );
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/status", &Fake).0, 200);
        assert_eq!(route("GET", "/", &Fake).1, "text/html; charset=utf-8");
        assert_eq!(route("GET", "/nope", &Fake).0, 404);
        assert_eq!(route("POST", "/", &Fake).0, 405);
    }

    #[test]
    fn serves_over_tcp() {
        let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let h = ep.serve(Arc::new(Fake), stop.clone()).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("\"peers\": 3"), "{out}");
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
        // In use: a clear error naming the address.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = l.local_addr().unwrap();
        let err = Endpoint::bind(taken).err().unwrap().to_string();
        assert!(err.contains(&taken.to_string()), "{err}");
    }
}
