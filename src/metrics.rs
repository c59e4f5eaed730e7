#![forbid(unsafe_code)]
//! The `--metrics ADDR` endpoint of the splitter and the peer: one small thread with a plain
//! `TcpListener` that answers
//!
//! - `GET /metrics`: Prometheus text format (version 0.0.4), written by hand ([`Prom`]);
//! - `GET /status`: the same and more as JSON: totals, rates and summaries whose size does not
//!   grow with the audience; an exporter may answer more paths under it (`/status/peers?...`);
//! - `GET /history`: the last 10 minutes, one sample a second ([`History`]);
//! - `GET /`: a status page that fetches these every second and draws charts from the history.
//!
//! Requests are served one at a time with short timeouts: this is an operator's endpoint, not a
//! web server. Nothing here touches the data path; exporters read relaxed atomics and snapshots
//! that the threads publish once a second.

use std::collections::VecDeque;
use std::fmt::{Display, Write as _};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// Another document under `/status/` (`path` is what follows it, `query` the parsed query):
    /// `None` if there is no such path, `Some(Err(why))` for a bad query.
    fn document(&self, path: &str, query: &Query) -> Option<Result<serde_json::Value, String>> {
        let _ = (path, query);
        None
    }
    /// The `/history` document from sample `since` on (all of it for `None`), if there is one.
    fn history(&self, since: Option<u64>) -> Option<serde_json::Value> {
        let _ = since;
        None
    }
    /// Called by the endpoint's thread about ten times a second: the time to take a history
    /// sample when one is due.
    fn tick(&self, now: Instant) {
        let _ = now;
    }
}

/// The query string of a request, decoded (`%XX` and `+`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses what follows the `?` of a request target.
    pub fn parse(query: &str) -> Query {
        let query = query.split('#').next().unwrap_or("");
        Query(
            query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    /// The value of `key`, if given (the last one if given twice).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key` as a number: `default` when absent, an error naming the key when not a number.
    pub fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.get(key) {
            None | Some("") => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{key}={v}: not a number in range")),
        }
    }

    /// The keys given.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

/// Percent-decoding of a query component (`+` is a space); bad escapes are kept as they are.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// One series of a [`History`]: how a raw sample becomes the value charted, and what it is.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    /// Key in the `/history` JSON.
    pub key: &'static str,
    /// Title of the chart it is drawn in (series with the same title share a chart), and of the
    /// Grafana panel that shows the same.
    pub chart: &'static str,
    /// Its name in the chart's legend.
    pub label: &'static str,
    /// Unit of the charted value.
    pub unit: &'static str,
    /// A per-second rate of a counter (the raw samples are the counter's values), or a level.
    pub rate: bool,
    /// Factor from the raw sample (or its rate) to the charted value.
    pub scale: f64,
    /// The Prometheus family that exports the same number.
    pub metric: &'static str,
}

impl Series {
    /// A level: charted as sampled, times `scale`.
    pub const fn level(
        key: &'static str,
        chart: &'static str,
        label: &'static str,
        unit: &'static str,
        metric: &'static str,
    ) -> Series {
        Series {
            key,
            chart,
            label,
            unit,
            rate: false,
            scale: 1.0,
            metric,
        }
    }

    /// A counter, charted as its rate per second.
    pub const fn rate(
        key: &'static str,
        chart: &'static str,
        label: &'static str,
        unit: &'static str,
        metric: &'static str,
    ) -> Series {
        Series {
            rate: true,
            ..Series::level(key, chart, label, unit, metric)
        }
    }

    /// Scaled by `scale`.
    pub const fn scaled(self, scale: f64) -> Series {
        Series { scale, ..self }
    }
}

/// Most series a [`History`] holds.
pub const MAX_SERIES: usize = 12;

/// One sample: when (ms since the history started) and the charted values (NaN: unknown).
#[derive(Debug, Clone, Copy)]
struct Point {
    at_ms: u64,
    values: [f32; MAX_SERIES],
}

/// The last minutes of a program's figures, one sample a second, in bounded memory: a ring of
/// fixed-size records (`capacity` × 56 bytes; 600 samples, 10 minutes, are 33 KB). Sans-IO: the
/// caller passes the time and the raw values.
#[derive(Debug)]
pub struct History {
    series: &'static [Series],
    capacity: usize,
    interval: Duration,
    start: Instant,
    start_unix_ms: u64,
    due: Instant,
    /// The previous raw sample, for rates.
    last: Option<(Instant, [f64; MAX_SERIES])>,
    points: VecDeque<Point>,
    /// Sequence number of the next sample.
    next: u64,
}

/// Samples the page charts: 10 minutes, one a second.
pub const HISTORY_SAMPLES: usize = 600;

/// `/history` from a history shared with the thread that samples it.
pub fn history_json(h: &std::sync::Mutex<History>, since: Option<u64>) -> serde_json::Value {
    h.lock().unwrap_or_else(|e| e.into_inner()).json(since)
}

/// Records a sample in a shared history when one is due; `sample` reads the series only then.
pub fn history_tick(
    h: &std::sync::Mutex<History>,
    now: Instant,
    sample: impl FnOnce() -> Vec<f64>,
) {
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    if h.due(now) {
        let raw = sample();
        h.record(now, &raw);
    }
}

impl History {
    /// An empty history of `series` that keeps `capacity` samples taken `interval` apart; the
    /// first is due at `start`.
    pub fn new(
        series: &'static [Series],
        capacity: usize,
        interval: Duration,
        start: Instant,
    ) -> History {
        assert!(series.len() <= MAX_SERIES, "at most {MAX_SERIES} series");
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        History {
            series,
            capacity: capacity.max(1),
            interval,
            start,
            start_unix_ms,
            due: start,
            last: None,
            points: VecDeque::with_capacity(capacity.max(1)),
            next: 0,
        }
    }

    /// The page's history: [`HISTORY_SAMPLES`] one second apart, from `start`.
    pub fn ten_minutes(series: &'static [Series], start: Instant) -> History {
        History::new(series, HISTORY_SAMPLES, Duration::from_secs(1), start)
    }

    /// Whether a sample is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.due
    }

    /// Records the raw values `raw` (one per series, in order) taken at `now`, if a sample is
    /// due; whether it did. A rate's first sample is unknown, and so is one whose counter went
    /// down.
    pub fn record(&mut self, now: Instant, raw: &[f64]) -> bool {
        if !self.due(now) {
            return false;
        }
        // Keep to the grid; after a stall, start again from now.
        self.due += self.interval;
        if self.due <= now {
            self.due = now + self.interval;
        }
        let mut values = [f32::NAN; MAX_SERIES];
        let mut kept = [f64::NAN; MAX_SERIES];
        for (i, s) in self.series.iter().enumerate() {
            let x = raw.get(i).copied().unwrap_or(f64::NAN);
            kept[i] = x;
            let v = if s.rate {
                match self.last {
                    Some((then, last)) if x >= last[i] => {
                        let dt = now.duration_since(then).as_secs_f64();
                        if dt > 0.0 {
                            (x - last[i]) / dt
                        } else {
                            f64::NAN
                        }
                    }
                    _ => f64::NAN,
                }
            } else {
                x
            };
            values[i] = (v * s.scale) as f32;
        }
        self.last = Some((now, kept));
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back(Point {
            at_ms: now.saturating_duration_since(self.start).as_millis() as u64,
            values,
        });
        self.next += 1;
        true
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The last value of series `key`, if there is a sample.
    pub fn last_value(&self, key: &str) -> Option<f32> {
        let i = self.series.iter().position(|s| s.key == key)?;
        self.points.back().map(|p| p.values[i])
    }

    /// The `/history` document: the samples from number `since` on (all held for `None`, and
    /// then the series' descriptions too). `next` is the `since` of the next request; `t` the
    /// samples' times in seconds since `start_unix_ms`; values are rounded to 4 significant
    /// digits, `null` where unknown.
    pub fn json(&self, since: Option<u64>) -> serde_json::Value {
        let first = self.next - self.points.len() as u64;
        let from = since.unwrap_or(first).clamp(first, self.next);
        let skip = (from - first) as usize;
        let t: Vec<serde_json::Value> = self
            .points
            .iter()
            .skip(skip)
            .map(|p| round(p.at_ms as f64 / 1e3))
            .collect();
        let mut values = serde_json::Map::new();
        for (i, s) in self.series.iter().enumerate() {
            let v: Vec<serde_json::Value> = self
                .points
                .iter()
                .skip(skip)
                .map(|p| round(f64::from(p.values[i])))
                .collect();
            values.insert(s.key.into(), v.into());
        }
        let mut doc = serde_json::json!({
            "start_unix_ms": self.start_unix_ms,
            "interval_ms": self.interval.as_millis() as u64,
            "capacity": self.capacity,
            "from": from,
            "next": self.next,
            "t": t,
            "values": values,
        });
        if since.is_none() {
            doc["series"] = self
                .series
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "key": s.key, "chart": s.chart, "label": s.label, "unit": s.unit,
                        "metric": s.metric,
                    })
                })
                .collect::<Vec<_>>()
                .into();
        }
        doc
    }
}

/// `x` to 4 significant digits, as a JSON number (an integer when it is one); `null` if not
/// finite.
fn round(x: f64) -> serde_json::Value {
    if !x.is_finite() {
        return serde_json::Value::Null;
    }
    if x == 0.0 {
        return 0.into();
    }
    let digits = 3 - x.abs().log10().floor() as i32;
    let r = if digits > 0 {
        let f = 10f64.powi(digits);
        (x * f).round() / f
    } else {
        x.round()
    };
    if r.fract() == 0.0 && r.abs() < 9e15 {
        (r as i64).into()
    } else {
        r.into()
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
        exporter.tick(Instant::now());
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
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let json = |v: &serde_json::Value| {
        let mut body = serde_json::to_vec(v).unwrap_or_default();
        body.push(b'\n');
        (200, "application/json", body)
    };
    let not_found = || {
        (
            404,
            "text/plain",
            b"not found: try /, /status, /history or /metrics\n".to_vec(),
        )
    };
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
        "/status" => json(&exporter.status()),
        "/history" => {
            let q = Query::parse(query);
            let since = match q.get("since") {
                None | Some("") => None,
                Some(v) => match v.parse() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        return (
                            400,
                            "text/plain",
                            format!("since={v}: not a number\n").into_bytes(),
                        );
                    }
                },
            };
            match exporter.history(since) {
                Some(doc) => json(&doc),
                None => not_found(),
            }
        }
        "/" | "/index.html" => (200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        _ => match path
            .strip_prefix("/status/")
            .and_then(|p| exporter.document(p, &Query::parse(query)))
        {
            Some(Ok(doc)) => json(&doc),
            Some(Err(why)) => (400, "text/plain", format!("{why}\n").into_bytes()),
            None => not_found(),
        },
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
    let length = body.len().to_string();
    let head = crate::http::response_head(
        status,
        reason,
        &[
            ("Content-Type", content_type),
            ("Content-Length", &length),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ],
    );
    let _ = stream.write_all(&head);
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

    const SERIES: &[Series] = &[
        Series::level("peers", "peers", "peers", "", "p2psp_test_peers"),
        Series::rate("out", "Mbit/s", "out", "Mbit/s", "p2psp_test_bytes_total").scaled(8e-6),
    ];

    #[test]
    fn history_one_sample_a_second_bounded_with_rates() {
        let t0 = Instant::now();
        let mut h = History::new(SERIES, 5, Duration::from_secs(1), t0);
        assert!(h.record(t0, &[3.0, 0.0]));
        // Not due again within the second.
        assert!(!h.record(t0 + Duration::from_millis(900), &[4.0, 1e6]));
        assert_eq!(h.len(), 1);
        let doc = h.json(None);
        assert_eq!(doc["values"]["peers"], serde_json::json!([3]));
        // A rate's first sample is unknown.
        assert_eq!(doc["values"]["out"], serde_json::json!([null]));
        assert_eq!(doc["series"][1]["chart"], "Mbit/s");
        for k in 1..=8u64 {
            let now = t0 + Duration::from_millis(1000 * k + 50);
            assert!(h.record(now, &[3.0 + k as f64, 1.25e6 * k as f64]));
        }
        // Bounded: the last 5.
        assert_eq!(h.len(), 5);
        let doc = h.json(None);
        assert_eq!(doc["next"], 9);
        assert_eq!(doc["from"], 4);
        assert_eq!(doc["values"]["peers"], serde_json::json!([7, 8, 9, 10, 11]));
        assert_eq!(
            doc["values"]["out"],
            serde_json::json!([10, 10, 10, 10, 10])
        );
        assert_eq!(doc["t"], serde_json::json!([4.05, 5.05, 6.05, 7.05, 8.05]));
        // Only what is new since the last answer; no descriptions then.
        let doc = h.json(Some(8));
        assert_eq!(doc["values"]["peers"], serde_json::json!([11]));
        assert!(doc.get("series").is_none());
        assert_eq!(h.json(Some(9))["t"], serde_json::json!([]));
        // Older than what is kept: all that is kept.
        assert_eq!(h.json(Some(0))["from"], 4);
        // A counter that went down (a restart): unknown, not negative.
        let now = t0 + Duration::from_secs(10);
        assert!(h.record(now, &[1.0, 5.0]));
        assert!(h.last_value("out").unwrap().is_nan());
        // After a stall the next sample is a second after the late one.
        let late = t0 + Duration::from_secs(30);
        assert!(h.record(late, &[1.0, 5.0]));
        assert!(!h.record(late + Duration::from_millis(999), &[1.0, 5.0]));
        assert!(h.record(late + Duration::from_secs(1), &[1.0, 5.0]));
    }

    #[test]
    fn ten_minutes_are_600_small_records() {
        let t0 = Instant::now();
        let mut h = History::ten_minutes(SERIES, t0);
        for k in 0..700u64 {
            h.record(t0 + Duration::from_secs(k), &[100_000.0, 1e9 * k as f64]);
        }
        assert_eq!(h.len(), HISTORY_SAMPLES);
        assert!(std::mem::size_of::<Point>() <= 56);
        let body = serde_json::to_vec(&h.json(None)).unwrap();
        assert!(body.len() < 20_000, "{} bytes", body.len());
    }

    #[test]
    fn numbers_to_4_digits() {
        assert_eq!(round(1234.567), serde_json::json!(1235));
        assert_eq!(round(0.0123456), serde_json::json!(0.01235));
        assert_eq!(round(16.000001), serde_json::json!(16));
        assert_eq!(round(f64::NAN), serde_json::Value::Null);
        assert_eq!(round(0.0), serde_json::json!(0));
    }

    #[test]
    fn queries() {
        let q = Query::parse("addr=127.0.0.1%3A4000&sort=lossiest&limit=5&x=a+b&bad=%zz&t=%4");
        assert_eq!(q.get("addr"), Some("127.0.0.1:4000"));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(q.get("t"), Some("%4"));
        assert_eq!(q.number("limit", 50usize), Ok(5));
        assert_eq!(q.number("offset", 7usize), Ok(7));
        assert!(q.number::<usize>("sort", 0).unwrap_err().contains("sort="));
        assert_eq!(Query::parse("").keys().count(), 0);
        assert_eq!(route("GET", "/history", &Fake).0, 404);
        assert_eq!(route("GET", "/status/peers", &Fake).0, 404);
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
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(out.contains("\"peers\":3"), "{out}");
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
        // In use: a clear error naming the address.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = l.local_addr().unwrap();
        let err = Endpoint::bind(taken).err().unwrap().to_string();
        assert!(err.contains(&taken.to_string()), "{err}");
    }
}
