//! The timestamped source: a small HTTP server that streams [`Stamp`] records at a steady rate to
//! whoever asks (the splitter's `--source http://HOST:PORT/MOUNT`), like a live broadcast: every
//! client gets the stream from the current record on, starting on a record boundary.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::stamp::Stamp;
use crate::tally::latency_histogram;

/// Most records written in one go when the writer is behind its schedule.
const MAX_BURST: u64 = 256;
/// A client that cannot take a burst within this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the source counted.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Records due so far (the sequence number of the next one).
    pub records: AtomicU64,
    /// Records written to at least one client.
    pub written: AtomicU64,
    /// Clients served so far.
    pub clients: AtomicU64,
    /// Clients dropped after a write error or timeout.
    pub dropped_clients: AtomicU64,
    /// How late records were written against their schedule (ns).
    pub lag: Mutex<Option<Histogram<u64>>>,
}

/// A running source.
pub struct SourceServer {
    /// Where it listens.
    pub addr: SocketAddrV4,
    /// The URL path it serves (any path is accepted; this one is what the splitter is told).
    pub mount: String,
    /// Its counters.
    pub stats: Arc<SourceStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl SourceServer {
    /// Listens on `listen` and streams records of `chunk_size` bytes at `chunks_per_second`; the
    /// writing thread runs on `core` if given.
    pub fn start(
        listen: SocketAddrV4,
        chunk_size: usize,
        chunks_per_second: f64,
        core: Option<core_affinity::CoreId>,
    ) -> anyhow::Result<SourceServer> {
        let listener = TcpListener::bind(listen)
            .with_context(|| format!("cannot listen for the splitter's source on {listen}"))?;
        let SocketAddr::V4(addr) = listener.local_addr()? else {
            anyhow::bail!("not an IPv4 address: {listen}")
        };
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(SourceStats::default());
        *stats.lag.lock().unwrap() = Some(latency_histogram());
        let clients: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept = {
            let (stop, clients, stats) = (stop.clone(), clients.clone(), stats.clone());
            thread::Builder::new()
                .name("source-accept".into())
                .spawn(move || accept_loop(&listener, &clients, &stats, &stop))?
        };
        let writer = {
            let (stop, stats) = (stop.clone(), stats.clone());
            thread::Builder::new()
                .name("source".into())
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    crate::sched::apply("source");
                    write_loop(chunk_size, chunks_per_second, &clients, &stats, &stop)
                })?
        };
        Ok(SourceServer {
            addr,
            mount: "loadgen".into(),
            stats,
            stop,
            threads: vec![accept, writer],
        })
    }

    /// The URL to give the splitter.
    pub fn url(&self) -> String {
        format!("http://{}/{}", self.addr, self.mount)
    }

    /// Stops and waits for its threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    clients: &Mutex<Vec<TcpStream>>,
    stats: &SourceStats,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some(s) = answer(stream) {
                    stats.clients.fetch_add(1, Ordering::Relaxed);
                    clients.lock().unwrap().push(s);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Reads the request head (bounded in size and time) and answers 200 with a live body.
fn answer(mut s: TcpStream) -> Option<TcpStream> {
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 16 * 1024 || Instant::now() > deadline {
            return None;
        }
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
    if !head.starts_with(b"GET ") {
        let _ = s.write_all(b"HTTP/1.0 405 Method Not Allowed\r\n\r\n");
        return None;
    }
    s.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
    s.set_nodelay(true).ok()?;
    s.write_all(
        b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nCache-Control: no-cache\r\n\r\n",
    )
    .ok()?;
    Some(s)
}

fn write_loop(
    chunk_size: usize,
    rate: f64,
    clients: &Mutex<Vec<TcpStream>>,
    stats: &SourceStats,
    stop: &AtomicBool,
) {
    let period_ns = 1e9 / rate;
    let t0 = p2psp::driver::monotonic_ns();
    let mut seq: u64 = 0;
    let mut buf = vec![0u8; chunk_size * MAX_BURST as usize];
    let mut lag = latency_histogram();
    let mut last_publish = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now_ns = p2psp::driver::monotonic_ns();
        // Records whose time has come: seq * period <= elapsed.
        let elapsed = now_ns.saturating_sub(t0) as f64;
        let due = (elapsed / period_ns).floor() as u64 + 1;
        if due > seq {
            let n = (due - seq).min(MAX_BURST);
            for k in 0..n {
                let s = seq + k;
                let stamp = Stamp {
                    seq: s,
                    scheduled_ns: t0 + (s as f64 * period_ns) as u64,
                    written_ns: now_ns,
                };
                lag.saturating_record(now_ns.saturating_sub(stamp.scheduled_ns).max(1));
                let at = k as usize * chunk_size;
                stamp.write_record(&mut buf[at..at + chunk_size]);
            }
            let bytes = &buf[..n as usize * chunk_size];
            let mut list = clients.lock().unwrap();
            let before = list.len();
            list.retain_mut(|c| c.write_all(bytes).is_ok());
            stats
                .dropped_clients
                .fetch_add((before - list.len()) as u64, Ordering::Relaxed);
            if !list.is_empty() {
                stats.written.fetch_add(n, Ordering::Relaxed);
            }
            drop(list);
            seq += n;
            stats.records.store(seq, Ordering::Relaxed);
        }
        if last_publish.elapsed() > Duration::from_millis(500) {
            *stats.lag.lock().unwrap() = Some(lag.clone());
            last_publish = Instant::now();
        }
        // Sleep until the next record is due (at most 20 ms, to see the stop flag).
        let next_ns = t0 + (seq as f64 * period_ns) as u64;
        let now_ns = p2psp::driver::monotonic_ns();
        if next_ns > now_ns {
            thread::sleep(Duration::from_nanos(next_ns - now_ns).min(Duration::from_millis(20)));
        }
    }
    *stats.lag.lock().unwrap() = Some(lag);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client gets a 200 head and then whole records, in order, on a record boundary, at about
    /// the asked rate.
    #[test]
    fn streams_stamped_records_at_the_rate() {
        let src = SourceServer::start(
            SocketAddrV4::new([127, 0, 0, 1].into(), 0),
            128,
            500.0,
            None,
        )
        .unwrap();
        thread::sleep(Duration::from_millis(50));
        let mut s = TcpStream::connect(src.addr).unwrap();
        s.write_all(b"GET /loadgen HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 4096 + 200 && t.elapsed() < Duration::from_secs(5) {
            let n = s.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(got.starts_with(b"HTTP/1.0 200 OK\r\n"));
        let body = &got[body_at..];
        let recs: Vec<Stamp> = body
            .chunks_exact(128)
            .map(|r| Stamp::read(r).expect("record boundary"))
            .collect();
        assert!(recs.len() >= 30);
        for w in recs.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1);
            assert_eq!(w[1].scheduled_ns - w[0].scheduled_ns, 2_000_000);
        }
        // 32 records at 500/s take ~64 ms: well under a second even on a busy machine.
        assert!(t.elapsed() < Duration::from_secs(2));
        src.stop();
    }
}
