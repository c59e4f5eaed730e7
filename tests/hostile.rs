//! Hostile traffic on loopback, against a splitter and peers running in this process (so their
//! counters can be read): datagrams of every size, goodbyes and loss reports from strangers,
//! chunks from unknown senders and far outside the window, floods of half-open and slow TCP
//! joins, a full splitter, and endpoints that never joined. Every test is bounded in count and
//! time, and checks that the honest peers lose nothing. See `docs/security.md`.
//!
//! The tests run one at a time (each starts a splitter and a team that must keep real-time
//! deadlines on a 2-core machine).

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use p2psp::peer::{self, PeerCounters, PeerOptions};
use p2psp::proto::peer::PeerStats;
use p2psp::splitter::{self, Splitter, SplitterArgs, SplitterStats};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

struct Running {
    splitter: Option<Splitter>,
    stop: Arc<AtomicBool>,
    port: u16,
    peers: Vec<HonestPeer>,
}

struct HonestPeer {
    counters: Arc<PeerCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl HonestPeer {
    fn stats(&self) -> PeerStats {
        *self.counters.stats.lock().unwrap()
    }

    fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(LOCALHOST, self.counters.port.load(Ordering::Relaxed) as u16)
    }

    fn finish(mut self) -> anyhow::Result<PeerStats> {
        self.stop.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else {
            anyhow::bail!("already stopped")
        };
        let r = thread.join().unwrap();
        r.map(|()| *self.counters.stats.lock().unwrap())
    }
}

/// 500 kbit/s: 61 chunks a second, so half a buffer is two seconds of slack for a loaded
/// machine (the floods and the team share two cores here).
fn args() -> SplitterArgs {
    SplitterArgs {
        bitrate: 500_000,
        port: 0,
        bind: LOCALHOST,
        header_size: p2psp::media::HeaderSize::Bytes(1024),
        shards: Some(2),
        lrs: true,
        ..SplitterArgs::default()
    }
}

fn start(a: SplitterArgs) -> Running {
    let settings = splitter::Settings::from_args(&a).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = splitter::start(settings, stop.clone()).unwrap();
    let port = s.port();
    Running {
        splitter: Some(s),
        stop,
        port,
        peers: Vec::new(),
    }
}

fn spawn_peer(port: u16, monitor: bool) -> HonestPeer {
    let counters = Arc::new(PeerCounters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let opts = PeerOptions {
        monitor,
        lrs: true,
        counters: counters.clone(),
        ..PeerOptions::new(SocketAddrV4::new(LOCALHOST, port))
    };
    let s = stop.clone();
    let thread = std::thread::spawn(move || peer::run(opts, s));
    HonestPeer {
        counters,
        stop,
        thread: Some(thread),
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Running {
    /// A monitor and `n - 1` plain peers, all playing.
    fn team(&mut self, n: usize) {
        for i in 0..n {
            let p = spawn_peer(self.port, i == 0);
            self.peers.push(p);
            std::thread::sleep(Duration::from_millis(30));
        }
        for p in &mut self.peers {
            let deadline = Instant::now() + Duration::from_secs(10);
            while p.counters.played.load(Ordering::Relaxed) == 0 {
                if p.thread.as_ref().is_some_and(|t| t.is_finished()) {
                    let r = p.thread.take().unwrap().join().unwrap();
                    panic!("an honest peer stopped: {r:?}");
                }
                assert!(Instant::now() < deadline, "a peer did not start playing");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn stats(&self) -> SplitterStats {
        self.splitter.as_ref().unwrap().stats()
    }

    fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(LOCALHOST, self.port)
    }

    /// Checks that every peer has lost nothing and played on, then stops them all and the
    /// splitter.
    fn finish(mut self) -> Vec<PeerStats> {
        // Every peer plays on for a while after the attack (two seconds of stream at least).
        for p in &self.peers {
            let at = p.stats().played;
            wait_until("the peers play on", Duration::from_secs(15), || {
                p.stats().played >= at + 120
            });
        }
        let all: Vec<PeerStats> = self.peers.iter().map(|p| p.stats()).collect();
        for (i, s) in all.iter().enumerate() {
            assert_eq!(s.lost, 0, "honest peer {i} lost chunks: {s:?}");
            assert!(s.played >= 120, "honest peer {i} played only {}", s.played);
        }
        for p in self.peers.drain(..) {
            p.finish().expect("an honest peer ran without error");
        }
        self.stop.store(true, Ordering::SeqCst);
        self.splitter.take().unwrap().wait().unwrap();
        all
    }
}

impl Drop for Running {
    /// A failed test still stops its splitter and peers, so that the next test runs alone.
    fn drop(&mut self) {
        for p in &self.peers {
            p.stop.store(true, Ordering::SeqCst);
        }
        self.stop.store(true, Ordering::SeqCst);
        for p in self.peers.drain(..) {
            let _ = p.finish();
        }
        if let Some(s) = self.splitter.take() {
            let _ = s.wait();
        }
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A UDP socket of a stranger on `ip`.
fn stranger(ip: Ipv4Addr) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s
}

/// Sends `d` to `to`, retrying while the socket buffer is full.
fn send(s: &UdpSocket, d: &[u8], to: SocketAddrV4) {
    loop {
        match s.send_to(d, to) {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => panic!("send_to {to}: {e}"),
        }
    }
}

/// Nothing arrives at `s` within its read timeout.
fn assert_silent(s: &UdpSocket, who: &str) {
    let mut buf = [0u8; 2048];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_millis(600);
    while Instant::now() < deadline {
        if s.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    assert_eq!(got, 0, "{who} received {got} datagrams");
}

/// Every size from 0 to 65507 bytes, paced so that the receiver counts every one (`seen` reads
/// how many it has taken in so far): returns how many were sent.
fn every_size(s: &UdpSocket, to: SocketAddrV4, fill: u8, mut seen: impl FnMut() -> u64) -> u64 {
    let base = seen();
    let payload = vec![fill; 65507];
    let mut sent = 0u64;
    for size in 0..=65507usize {
        send(s, &payload[..size], to);
        sent += 1;
        // At most 16 in flight: the large ones fill a socket buffer quickly, and a datagram the
        // kernel drops is one nobody can count.
        if sent % 16 == 0 || size == 65507 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while seen() - base < sent {
                assert!(
                    Instant::now() < deadline,
                    "the receiver took in only {} of {sent} (size {size})",
                    seen() - base
                );
                std::thread::yield_now();
            }
        }
    }
    sent
}

#[test]
fn datagrams_of_every_size_to_the_splitter_are_counted_and_dropped() {
    let _turn = turn();
    let mut run = start(args());
    run.team(4);
    let before = run.stats();
    let evil = stranger(Ipv4Addr::new(127, 0, 0, 7));
    // Fill with `G`: size 1 is a goodbye, size 2 a loss report, from a stranger.
    let seen = || {
        let s = run.stats();
        s.truncated + s.foreign_datagrams + s.foreign_dropped + s.forward_dropped
    };
    every_size(&evil, run.addr(), b'G', seen);
    let rss_warm = rss_kib();
    // Again, to see that memory stays flat.
    every_size(&evil, run.addr(), b'G', seen);
    let rss_after = rss_kib();
    let after = run.stats();
    let d = |f: fn(&SplitterStats) -> u64| f(&after) - f(&before);
    // Nothing valid is longer than 2 bytes: the 63459 longer than the 2048-byte receive buffers
    // are dropped by the receive path, the rest reach the control plane as a stranger's.
    assert_eq!(
        d(|s| s.truncated),
        2 * 63_459,
        "before {before:?}\nafter {after:?}"
    );
    assert_eq!(
        d(|s| s.foreign_datagrams + s.foreign_dropped + s.forward_dropped),
        2 * 2049,
        "before {before:?}\nafter {after:?}"
    );
    assert_eq!(after.peers, 4, "no state change");
    assert_eq!(after.team.left + after.team.expelled, 0);
    assert_eq!(d(|s| s.team.stray_goodbyes + s.team.stray_loss_reports), 0);
    assert!(
        rss_after < rss_warm + 8 * 1024,
        "memory grew from {rss_warm} KiB to {rss_after} KiB"
    );
    assert_silent(&evil, "the stranger");
    eprintln!(
        "splitter, every size twice: {} truncated, {} foreign, {} dropped at the queue; RSS {rss_warm} -> {rss_after} KiB",
        d(|s| s.truncated),
        d(|s| s.foreign_datagrams),
        d(|s| s.foreign_dropped + s.forward_dropped)
    );
    run.finish();
}

#[test]
fn datagrams_of_every_size_to_a_peer_are_counted_and_dropped() {
    let _turn = turn();
    let mut run = start(args());
    run.team(4);
    let target = run.peers[2].endpoint();
    let neighbours = run.peers[2].counters.neighbours.load(Ordering::Relaxed);
    let evil = stranger(Ipv4Addr::new(127, 0, 0, 8));
    let counters = run.peers[2].counters.clone();
    // Only what the stranger sends counts here (the team's chunks keep coming meanwhile).
    // A chunk far from the playout position counts as late when it is behind it (by serial
    // arithmetic) and as out of the window when it is ahead; which one depends on where the
    // stream is, so either counts here.
    let seen = || {
        let s = *counters.stats.lock().unwrap();
        s.malformed + s.strangers_out_of_window + s.late
    };
    let before = run.peers[2].stats();
    let rss_before = rss_kib();
    // 0xA5: size 1026 is a chunk numbered 0xA5A5, far from anything the stream is at.
    every_size(&evil, target, 0xA5, seen);
    let after = run.peers[2].stats();
    assert_eq!(after.malformed - before.malformed, 65_507);
    assert!(
        (after.strangers_out_of_window - before.strangers_out_of_window)
            + (after.late - before.late)
            >= 1,
        "the stranger's far-off chunk was not counted"
    );
    assert_eq!(after.hellos, before.hellos, "no hello");
    assert_eq!(
        counters.neighbours.load(Ordering::Relaxed),
        neighbours,
        "no new neighbour"
    );
    assert!(rss_kib() < rss_before + 8 * 1024);
    assert_silent(&evil, "the stranger");
    run.finish();
}

#[test]
fn goodbyes_and_loss_reports_from_strangers_and_non_members_change_nothing() {
    let _turn = turn();
    let mut run = start(args());
    run.team(4);
    let before = run.stats();
    // Strangers on several addresses, with every kind of splitter-bound message, chunk numbers
    // near the stream's and far from it.
    let evils: Vec<UdpSocket> = (10..14)
        .map(|i| stranger(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    for round in 0..500u16 {
        for s in &evils {
            send(s, b"G", run.addr());
            send(s, &round.to_be_bytes(), run.addr());
            send(s, &(round * 131).to_be_bytes(), run.addr());
        }
        if round % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let total = 4 * 500 * 3;
    wait_until("every datagram is counted", Duration::from_secs(5), || {
        let s = run.stats();
        s.foreign_datagrams + s.foreign_dropped + s.forward_dropped
            - (before.foreign_datagrams + before.foreign_dropped + before.forward_dropped)
            >= total
    });
    let after = run.stats();
    assert_eq!(after.peers, 4);
    assert_eq!(after.team.expelled + after.team.left, 0);
    for s in &evils {
        assert_silent(s, "a stranger");
    }
    // Goodbyes to the peers from strangers: counted, nobody removed.
    let target = run.peers[1].endpoint();
    let before_peer = run.peers[1].stats();
    for _ in 0..1000 {
        send(&evils[0], b"G", target);
    }
    wait_until("the peer counts them", Duration::from_secs(5), || {
        run.peers[1].stats().stray_goodbyes - before_peer.stray_goodbyes >= 1000
    });
    assert_eq!(run.peers[1].stats().goodbyes, before_peer.goodbyes);
    run.finish();
}

#[test]
fn chunks_from_unknown_senders_are_dropped_far_off_and_a_forged_hello_buys_little() {
    let _turn = turn();
    let mut run = start(args());
    run.team(4);
    let target = run.peers[1].endpoint();
    let before = run.peers[1].stats();
    let far = stranger(Ipv4Addr::new(127, 0, 0, 20));
    // Chunks numbered far ahead of the stream (5000 and more), from a stranger.
    let newest = (before.chunks_received as u16).wrapping_add(5000);
    let mut d = vec![0u8; 1026];
    for i in 0..2000u16 {
        d[..2].copy_from_slice(&newest.wrapping_add(i % 1000).to_be_bytes());
        send(&far, &d, target);
    }
    wait_until("the peer counts them", Duration::from_secs(5), || {
        run.peers[1].stats().strangers_out_of_window - before.strangers_out_of_window >= 2000
    });
    assert_silent(&far, "the sender of far-off chunks");
    // A forged hello: the victim (a real socket here) gets a few chunks, then nothing.
    let victim = stranger(Ipv4Addr::new(127, 0, 0, 21));
    send(&victim, b"H", target);
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, _)) = victim.recv_from(&mut buf) {
            assert_eq!(n, 1026, "only relayed chunks");
            got += 1;
        }
    }
    // The peer originates a quarter of 61 chunks a second; a second of probation is about 15.
    assert!(
        got <= 30,
        "one forged hello bought {got} chunks (about a second of probation)"
    );
    assert_silent(&victim, "the victim after probation");
    run.finish();
}

/// A TCP connection from `ip` that is left open without a byte.
fn silent_connection(ip: Ipv4Addr, to: SocketAddrV4) -> Option<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&SocketAddrV4::new(ip, 0).into()).ok()?;
    s.connect_timeout(&to.into(), Duration::from_secs(1)).ok()?;
    Some(s.into())
}

#[test]
fn thousands_of_half_open_and_slow_joins_leave_room_for_an_honest_peer() {
    let _turn = turn();
    let mut a = args();
    a.max_pending_joins = 256;
    a.max_pending_per_ip = 32;
    a.join_timeout = 2.0;
    let mut run = start(a);
    run.team(2);
    // 2000 silent connections from 100 addresses (20 each), and 64 slow header requests that
    // send one byte every 200 ms.
    let mut silent = Vec::new();
    for i in 0..2000u32 {
        let ip = Ipv4Addr::new(127, 0, 1, 1 + (i % 100) as u8);
        if let Some(c) = silent_connection(ip, run.addr()) {
            silent.push(c);
        }
    }
    assert!(silent.len() >= 1900, "only {} connections", silent.len());
    let slow_stop = Arc::new(AtomicBool::new(false));
    let slow = {
        let stop = slow_stop.clone();
        let to = run.addr();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut conns: Vec<TcpStream> = (0..64)
                .filter_map(|i| silent_connection(Ipv4Addr::new(127, 0, 2, 1 + i as u8 % 4), to))
                .collect();
            let request = b"GET /test HTTP/1.1\r\nHost: x\r\n\r\n";
            for &b in request.iter().cycle().take(request.len() - 1) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                conns.retain_mut(|c| c.write_all(&[b]).is_ok());
                std::thread::sleep(Duration::from_millis(200));
            }
            conns.len()
        })
    };
    // Wait until the splitter has taken in the whole silent flood from its accept queue (each
    // connection pending, refused, displaced or timed out): the honest peer below must get in
    // among the flood's pending connections, not merely queue up behind them in the kernel.
    let flood = silent.len() as u64;
    wait_until(
        "the splitter took in the flood",
        Duration::from_secs(5),
        || {
            let s = run.stats();
            s.pending + s.refused_pending + s.displaced + s.timeouts >= flood
        },
    );
    // Then let time pass: a connection silent for less than 100 ms is safe from being displaced
    // (`DISPLACE_AFTER` in src/splitter/control.rs), and the flood is to be old enough to make
    // room for the honest peer.
    std::thread::sleep(Duration::from_millis(150));
    let s = run.stats();
    assert!(s.pending <= 256, "{} pending", s.pending);
    assert!(
        s.refused_pending + s.displaced > 0,
        "the limits were reached: {s:?}"
    );
    // An honest peer still joins within a second.
    let t0 = Instant::now();
    let honest = spawn_peer(run.port, false);
    wait_until("the honest peer joins", Duration::from_secs(1), || {
        honest.counters.port.load(Ordering::Relaxed) != 0
    });
    let joined_in = t0.elapsed();
    run.peers.push(honest);
    // Every silent or slow connection runs out of time; none became a peer.
    wait_until("they all time out", Duration::from_secs(6), || {
        run.stats().pending == 0
    });
    slow_stop.store(true, Ordering::Relaxed);
    let _ = slow.join();
    let s = run.stats();
    assert_eq!(s.peers, 3, "{s:?}");
    assert!(s.timeouts > 0, "{s:?}");
    eprintln!(
        "half-open flood: honest peer joined in {joined_in:?}; {} refused, {} displaced, {} timed out",
        s.refused_pending, s.displaced, s.timeouts
    );
    drop(silent);
    wait_until("the honest peer plays", Duration::from_secs(5), || {
        run.peers[2].counters.played.load(Ordering::Relaxed) > 0
    });
    // `finish` waits until every peer played on for two seconds of stream.
    run.finish();
}

#[test]
fn over_max_peers_a_join_is_refused_with_a_reason() {
    let _turn = turn();
    let mut a = args();
    a.max_peers = 3;
    let mut run = start(a);
    run.team(3);
    let extra = spawn_peer(run.port, false);
    let err = extra
        .finish()
        .expect_err("the fourth peer is refused")
        .to_string();
    assert!(err.contains("refused the join"), "{err}");
    assert!(err.contains("--max-peers"), "{err}");
    let s = run.stats();
    assert_eq!(s.refused_full, 1);
    assert_eq!(s.peers, 3);
    // `finish` waits until every peer played on for two seconds of stream.
    run.finish();
}

#[test]
fn the_splitter_never_sends_to_an_endpoint_that_did_not_complete_a_join() {
    use std::io::{Read, Write};
    let _turn = turn();
    let mut run = start(args());
    run.team(3);
    // 1. Strangers that only talk UDP, in every way a peer would.
    let udp_only: Vec<UdpSocket> = (30..34)
        .map(|i| stranger(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let mut chunk = vec![7u8; 1026];
    for n in 0..200u16 {
        chunk[..2].copy_from_slice(&n.to_be_bytes());
        for s in &udp_only {
            for d in [&b"H"[..], b"G", &n.to_be_bytes(), &chunk] {
                send(s, d, run.addr());
            }
        }
    }
    // 2. A join that gives up after the configuration, without the ready byte; its UDP port,
    // like a peer's, is the TCP one.
    let mut tcp = silent_connection(Ipv4Addr::new(127, 0, 0, 40), run.addr()).unwrap();
    let local = tcp.local_addr().unwrap();
    let abandoned = UdpSocket::bind(local).unwrap();
    abandoned
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    tcp.write_all(b"P").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut config = [0u8; 64];
    let n = tcp.read(&mut config).unwrap();
    assert!(n >= 18, "got the configuration");
    drop(tcp);
    // 3. A connection that says nothing at all.
    let silent = silent_connection(Ipv4Addr::new(127, 0, 0, 41), run.addr()).unwrap();
    let silent_udp = UdpSocket::bind(silent.local_addr().unwrap()).unwrap();
    silent_udp
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    wait_until(
        "the abandoned join is forgotten",
        Duration::from_secs(5),
        || run.stats().abandoned == 1,
    );
    // Meanwhile the stream goes on: nothing reaches any of them.
    for s in &udp_only {
        assert_silent(s, "a UDP-only stranger");
    }
    assert_silent(&abandoned, "the abandoned join");
    assert_silent(&silent_udp, "the silent connection");
    assert_eq!(run.stats().peers, 3);
    drop(silent);
    run.finish();
}
