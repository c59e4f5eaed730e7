//! The lightweight peers: real DBS peers, thousands per thread.
//!
//! Each peer has its own UDP socket and does the compat join over TCP (role byte, join message,
//! the stream header fetched from the source the join message names, hellos to its team, then the
//! ready byte). After that it lives in a worker thread: the worker receives for all its peers
//! through one [`MultiRecv`] (io_uring multishot receives and one provided-buffer ring), feeds each
//! datagram to that peer's [`Peer`] core (the same sans-IO core `p2psp peer` runs: relaying by
//! DBS, chunk debts, playout), and sends every relay its peers produced in one batch per poll
//! ([`BatchSender::send_from_each`], each datagram from its own peer's socket).
//!
//! With `--sockets shared` a peer is an address, not a socket ([`SocketMode::Shared`]): each
//! worker has one UDP socket on `0.0.0.0:port`, and peer `i` is `virtual_ip(i):port`, an address
//! of 127.0.0.0/8 (all local on Linux). The worker tells its peers' datagrams apart by their
//! destination address (`IP_PKTINFO`, [`MultiRecv::with_dest_addrs`]) and sends each peer's relays
//! with the peer's address as source ([`SourcedSender`]); a join binds its TCP socket to the peer's
//! address and the worker's port, so the splitter sees the endpoint it will send to.
//!
//! In baseline mode peers do not join: they only receive the bare fan-out loop's datagrams and
//! count sequence numbers.

use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use p2psp::driver::{self, BatchSender, MultiRecv, RecvPath, SendPath, SendStats, SourcedSender};
use p2psp::proto::peer::{Peer, PeerEvent, PeerRules};
use p2psp::proto::wire::{CHUNK_HEADER, READY, ROLE_MONITOR, ROLE_PEER};
use socket2::{Domain, Protocol, Socket, Type};

use crate::tally::{self, Latencies, Seen, SeqTracker, Tally};

/// How long a join may take, step by step.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried when the port the kernel gave the UDP socket is taken for TCP.
const BIND_ATTEMPTS: usize = 16;
/// Longest wait of one receive poll.
const POLL_TIMEOUT: Duration = Duration::from_millis(2);
/// How often leaving peers check their goodbye timeout.
const LEAVE_TICK: Duration = Duration::from_millis(10);
/// Longest time a worker keeps waiting before its peers' `want` is reached: `want` is chosen so
/// that at the measured arrival rate it fills in about this long, so receive times stay accurate.
const WANT_FILL: f64 = 20e-6;

/// Shared socket read with `recvmmsg`: after a read that emptied the socket (fewer than a full
/// batch), the worker naps this long (`--recv-nap`) before it waits again, so that the next read
/// takes what arrived meanwhile instead of waking for each datagram. Like [`WANT_FILL`] on the
/// io_uring path it bounds how late a receive time can be read (the timer slack is set to 1 µs
/// for it). It pays where datagrams come in bursts (teams of 1: the splitter's fan-out of each
/// chunk) and costs where they trickle (relays in teams: a nap per datagram or two), so loadgen
/// naps by default only with teams of 1.
pub const RECV_NAP: Duration = Duration::from_micros(20);
/// A full `recvmmsg` batch (`p2psp::driver`'s epoll receiver reads 64 at a time).
const RECV_BATCH: usize = 64;

/// Datagrams sent between two looks at the stop flag.
const SEND_SLICE: usize = 4096;

/// Bytes per receive arena: datagrams handed to the peer cores are copied into shared arenas, so
/// a chunk costs no allocation of its own and relaying it (a clone) only bumps a count.
const ARENA: usize = 64 * 1024;

/// Copies datagrams into shared arenas (see [`ARENA`]).
struct Arena(BytesMut);

impl Arena {
    fn copy(&mut self, data: &[u8]) -> Bytes {
        if self.0.capacity() - self.0.len() < data.len() {
            self.0 = BytesMut::with_capacity(ARENA.max(data.len()));
        }
        self.0.extend_from_slice(data);
        self.0.split().freeze()
    }
}

/// Chunk numbers [`ChunkCache`] remembers (a power of two).
const CACHE_SLOTS: usize = 256;

/// The last copy of each recent chunk a worker received. Every peer of a team gets the same chunk
/// datagram byte for byte (from the splitter, or relayed unchanged), so a worker hands its peers
/// one shared buffer per chunk, as the splitter sends one buffer to all: memory per peer is then
/// its playout slots, not its chunks, and a chunk costs a compare instead of a copy. A datagram
/// that differs from the cached one (another chunk under the same slot) replaces it.
struct ChunkCache {
    slots: Vec<Option<Bytes>>,
}

impl ChunkCache {
    fn new() -> ChunkCache {
        ChunkCache {
            slots: vec![None; CACHE_SLOTS],
        }
    }

    /// The shared copy of chunk datagram `data`.
    fn get(&mut self, data: &[u8], arena: &mut Arena) -> Bytes {
        let number = u16::from_be_bytes([data[0], data[1]]);
        let slot = &mut self.slots[usize::from(number) % CACHE_SLOTS];
        match slot {
            Some(b) if b[..] == *data => b.clone(),
            _ => {
                let b = arena.copy(data);
                *slot = Some(b.clone());
                b
            }
        }
    }
}

/// State shared by the main thread, the joiners and the workers.
#[derive(Debug)]
pub struct Shared {
    /// Start of interval 0.
    pub epoch: Instant,
    /// Peers start leaving politely.
    pub leave: AtomicBool,
    /// Workers stop.
    pub stop: AtomicBool,
    /// Joiners stop.
    pub stop_joins: AtomicBool,
    /// Peers that completed their join (or baseline sockets bound).
    pub joined: AtomicUsize,
    /// Joins that failed.
    pub join_failed: AtomicUsize,
    /// Sockets the workers receive on.
    pub registered: AtomicUsize,
    /// Peers that left (after `leave`).
    pub left: AtomicUsize,
    /// Datagrams received by all workers so far (for the progress bar).
    pub received: AtomicU64,
    /// Local addresses of every peer socket (to read their kernel drop counters).
    pub addrs: std::sync::Mutex<std::collections::HashSet<SocketAddrV4>>,
}

impl Shared {
    /// Fresh state, interval 0 starting now.
    pub fn new() -> Shared {
        Shared {
            epoch: Instant::now(),
            leave: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stop_joins: AtomicBool::new(false),
            joined: AtomicUsize::new(0),
            join_failed: AtomicUsize::new(0),
            registered: AtomicUsize::new(0),
            left: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            addrs: Default::default(),
        }
    }

    /// The interval `t` falls in.
    pub fn interval(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_secs()
    }

    /// When interval `k` starts.
    pub fn interval_start(&self, k: u64) -> Instant {
        self.epoch + Duration::from_secs(k)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// How peers get their endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketMode {
    /// One UDP socket per peer (and a port on one of `127.0.0.1 … 127.0.0.N`): the kernel does
    /// the per-socket work real peers cost it. Bounded by RLIMIT_NOFILE and ports.
    PerPeer,
    /// One UDP socket per worker on `0.0.0.0:port`; a peer is an address `127.a.b.c:port`
    /// (`IP_PKTINFO` names it on receive and picks it on send). Scales to 100,000s of peers.
    Shared,
}

/// Receive token of a worker's shared socket.
const SHARED_TOKEN: u64 = u64::MAX;

/// The address of virtual peer `i`: `127.(1 + q / 256).(q % 256).(1 + i % 254)` with
/// `q = i / 254`, so none is in 127.0.0.0/16 (the splitter's, the source's and per-peer mode's)
/// and none ends in .0 or .255. Up to 254 × 256 × 254 (16.5 million) peers.
pub fn virtual_ip(i: usize) -> Ipv4Addr {
    let q = i / 254;
    Ipv4Addr::new(
        127,
        (1 + q / 256) as u8,
        (q % 256) as u8,
        (1 + i % 254) as u8,
    )
}

/// The `i` of [`virtual_ip`]`(i)`, if `ip` is one.
pub fn virtual_index(ip: Ipv4Addr) -> Option<usize> {
    let [a, b, c, d] = ip.octets();
    if a != 127 || b == 0 || d == 0 || d == 255 {
        return None;
    }
    Some(((usize::from(b) - 1) * 256 + usize::from(c)) * 254 + usize::from(d) - 1)
}

/// A worker's shared socket (`--sockets shared`): `0.0.0.0:port`, `IP_PKTINFO` on, and the
/// don't-fragment bit for `datagram`-byte chunks as `p2psp peer` sets it (which also spares the
/// kernel an IP identification per datagram: `driver::set_dont_fragment`).
pub fn shared_socket(rcvbuf: usize, datagram: usize) -> anyhow::Result<UdpSocket> {
    let s = driver::udp_socket(
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        false,
        Some(rcvbuf),
        Some(4 << 20),
    )
    .map_err(|e| limit_error(e, "cannot bind a shared UDP socket"))?;
    driver::set_pktinfo(s.as_raw_fd()).context("cannot turn IP_PKTINFO on")?;
    let _ = driver::set_dont_fragment(&s, datagram);
    Ok(s)
}

/// A peer handed to a worker.
pub enum NewPeer {
    /// A joined DBS peer on the worker's shared socket.
    Virtual {
        /// Its index (its address is [`virtual_ip`] of it).
        index: usize,
        /// Its protocol core, hellos already sent.
        core: Box<Peer>,
    },
    /// A joined DBS peer.
    Live {
        /// Its socket (its identity in the team).
        socket: UdpSocket,
        /// Its protocol core, hellos already sent.
        core: Box<Peer>,
    },
    /// A baseline receiver.
    Bare {
        /// Its socket.
        socket: UdpSocket,
    },
}

/// One worker's counts for one interval.
pub struct Report {
    /// Which interval (seconds since the epoch).
    pub index: u64,
    /// Counters.
    pub tally: Tally,
    /// Latencies (ns).
    pub hist: Latencies,
    /// Peers the worker has.
    pub peers: usize,
    /// The worker thread's CPU time during the interval.
    pub cpu: Duration,
    /// The worker's last report: it has stopped.
    pub last: bool,
    /// Which splitter the worker's peers joined (index in `--splitter a,b,c`).
    pub group: usize,
    /// The receive ring's counters so far.
    pub recv: p2psp::driver::RecvStats,
}

/// How the workers run.
#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    /// Receive path.
    pub recv_path: RecvPath,
    /// Send path for relays.
    pub send_path: SendPath,
    /// Chunk payload bytes.
    pub chunk_size: usize,
    /// Bytes after the payload: 64 when the splitter signs every chunk (`--sign-mode chunk`).
    pub trailer: usize,
    /// Core to pin the worker to.
    pub core: Option<core_affinity::CoreId>,
    /// Shared socket read with recvmmsg: nap after a read that emptied it ([`RECV_NAP`]).
    pub nap: Duration,
    /// Which splitter its peers join ([`worker_for`]).
    pub group: usize,
}

/// The worker of peer `i` when `workers` workers serve the peers of `splitters` splitters: peer
/// `i` joins splitter `i % splitters`, and worker `w` serves only the peers of splitter
/// `w % splitters` (so every report is one splitter's), in turn.
pub fn worker_for(i: usize, splitters: usize, workers: usize) -> usize {
    let n = splitters.max(1);
    let g = i % n;
    let of_group = (workers.saturating_sub(g)).div_ceil(n).max(1);
    g + n * ((i / n) % of_group)
}

/// A live peer's endpoint: its own socket, or its address on the worker's shared socket.
enum Endpoint {
    Own(UdpSocket),
    Virtual(Ipv4Addr),
}

/// A worker's peer. The core is stored inline (not boxed): one pointer chase less, one cache miss
/// less per datagram, which is most of a peer's cost with thousands of them. Bare slots (the
/// baseline) are as large as live ones; a run has only one kind.
#[allow(clippy::large_enum_variant)]
enum Slot {
    Live {
        socket: Endpoint,
        core: Peer,
        left: bool,
    },
    Bare {
        socket: UdpSocket,
        seq: SeqTracker,
    },
}

/// Runs one worker until `shared.stop`: receives for its peers, runs their cores, sends their
/// relays, reports every interval. Baseline receivers are finished against `last_seq()` (the bare
/// loop's last sequence number) before the last report.
pub fn run_worker(
    opts: WorkerOptions,
    shared_socket: Option<&UdpSocket>,
    incoming: &Receiver<NewPeer>,
    reports: &Sender<Report>,
    shared: &Shared,
    last_seq: &dyn Fn() -> Option<u64>,
) -> anyhow::Result<()> {
    if let Some(core) = opts.core {
        core_affinity::set_for_current(core);
    }
    let datagram = CHUNK_HEADER + opts.chunk_size + opts.trailer;
    let buf_size = (datagram as u32).next_power_of_two().max(2048);
    // Enough buffers for a few ms of arrivals at a few hundred thousand datagrams/s; bigger
    // chunks get fewer (the ring's memory is buf_count * buf_size).
    let buf_count = ((32u32 << 20) / buf_size).clamp(1024, 16384) as u16;
    let buf_count = buf_count.next_power_of_two();
    let mut recv = match shared_socket {
        Some(_) => MultiRecv::with_dest_addrs(opts.recv_path, buf_count, buf_size),
        None => MultiRecv::new(opts.recv_path, buf_count, buf_size),
    }
    .context("cannot set up the receive ring")?;
    // Shared mode: one socket; peers found by their address (index → slot).
    let shared_fd = shared_socket.map(|s| s.as_raw_fd());
    let mut by_index: Vec<u32> = Vec::new();
    let mut sourced = SourcedSender::new(64);
    let nap = shared_socket.is_some() && opts.recv_path == RecvPath::Poll && !opts.nap.is_zero();
    if nap {
        let _ = driver::set_timer_slack(Duration::from_micros(1));
    }
    if let Some(s) = shared_socket {
        recv.add_socket(s.as_raw_fd(), SHARED_TOKEN)
            .context("cannot add the shared socket to the receive ring")?;
        if let Ok(SocketAddr::V4(a)) = s.local_addr() {
            shared.addrs.lock().unwrap().insert(a);
        }
    }
    let mut sender = BatchSender::without_socket(opts.send_path, 256)
        .context("cannot set up the relay sender")?;
    let mut send_stats = SendStats::default();
    let mut sent_before = SendStats::default();
    let mut slots: Vec<Slot> = Vec::new();
    let mut tally = Tally::default();
    let mut hist = Latencies::default();
    let mut index = shared.interval(Instant::now());
    let mut cpu_mark = driver::thread_cpu_time();
    let mut sends: Vec<(RawFd, Ipv4Addr, SocketAddrV4, Bytes)> = Vec::with_capacity(1024);
    let mut want: u32 = 1;
    let mut arena = Arena(BytesMut::new());
    let mut cache = ChunkCache::new();
    let mut leaving = false;
    let mut next_leave_tick = Instant::now();
    loop {
        for np in incoming.try_iter().take(4096) {
            let token = slots.len() as u64;
            let slot = match np {
                NewPeer::Live { socket, core } => Slot::Live {
                    socket: Endpoint::Own(socket),
                    core: *core,
                    left: false,
                },
                NewPeer::Virtual { index, core } => {
                    if by_index.len() <= index {
                        by_index.resize(index + 1, u32::MAX);
                    }
                    by_index[index] = token as u32;
                    Slot::Live {
                        socket: Endpoint::Virtual(virtual_ip(index)),
                        core: *core,
                        left: false,
                    }
                }
                NewPeer::Bare { socket } => Slot::Bare {
                    socket,
                    seq: SeqTracker::default(),
                },
            };
            let own = match &slot {
                Slot::Live {
                    socket: Endpoint::Own(socket),
                    ..
                }
                | Slot::Bare { socket, .. } => Some(socket),
                _ => None,
            };
            if let Some(socket) = own {
                recv.add_socket(socket.as_raw_fd(), token)
                    .context("cannot add a peer socket to the receive ring")?;
                if let Ok(SocketAddr::V4(a)) = socket.local_addr() {
                    shared.addrs.lock().unwrap().insert(a);
                }
            }
            slots.push(slot);
            if leaving && let Some(Slot::Live { socket, core, .. }) = slots.last_mut() {
                // Joined after the others started leaving: leave too.
                core.leave(Instant::now());
                queue_transmits(socket, shared_fd, core, &mut sends);
            }
            shared.registered.fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        if !leaving && shared.leave.load(Ordering::Relaxed) {
            leaving = true;
            for s in &mut slots {
                if let Slot::Live { socket, core, .. } = s {
                    core.leave(now);
                    queue_transmits(socket, shared_fd, core, &mut sends);
                }
            }
        }
        let got = recv.poll(want, POLL_TIMEOUT, |token, d| {
            let idx = if token == SHARED_TOKEN {
                match d.to.and_then(virtual_index).and_then(|i| by_index.get(i)) {
                    Some(&idx) => idx as usize,
                    None => {
                        tally.unknown_dest += 1;
                        return;
                    }
                }
            } else {
                token as usize
            };
            let Some(slot) = slots.get_mut(idx) else {
                return;
            };
            let recv_ns = driver::monotonic_ns();
            tally.datagrams += 1;
            tally.bytes += d.data.len() as u64;
            match slot {
                Slot::Live { socket, core, left } => {
                    let is_chunk = d.data.len() == datagram;
                    let before = Seen::of(core.stats());
                    let checks = (core.stats().signatures_checked, core.stats().hashes_checked);
                    let data = if is_chunk {
                        cache.get(d.data, &mut arena)
                    } else {
                        arena.copy(d.data)
                    };
                    core.handle_datagram(now, d.from, data);
                    tally.signatures += core.stats().signatures_checked - checks.0;
                    tally.hashes += core.stats().hashes_checked - checks.1;
                    if is_chunk {
                        let after = Seen::of(core.stats());
                        tally::account_chunk(
                            &d.data[CHUNK_HEADER..CHUNK_HEADER + opts.chunk_size],
                            recv_ns,
                            before,
                            after,
                            &mut tally,
                            &mut hist,
                        );
                    }
                    queue_transmits(socket, shared_fd, core, &mut sends);
                    drain_events(core, &mut tally, left, shared);
                }
                Slot::Bare { seq, .. } => {
                    if d.data.len() == datagram {
                        tally.chunks += 1;
                        let payload = &d.data[CHUNK_HEADER..];
                        if tally::record_latency(payload, recv_ns, &mut tally, &mut hist).is_some()
                            && let Some(st) = crate::stamp::Stamp::read(payload)
                        {
                            seq.on_seq(st.seq, &mut tally);
                        }
                    }
                }
            }
        })?;
        if nap && got.received > 0 && got.received < RECV_BATCH {
            thread::sleep(opts.nap);
        }
        if leaving && now >= next_leave_tick {
            next_leave_tick = now + LEAVE_TICK;
            for s in &mut slots {
                if let Slot::Live { socket, core, left } = s
                    && !*left
                {
                    core.handle_timeout(now);
                    queue_transmits(socket, shared_fd, core, &mut sends);
                    drain_events(core, &mut tally, left, shared);
                }
            }
        }
        // In slices, so that a worker told to stop while its peers' goodbyes flood in (100,000s
        // at the end of a large run) stops within one slice: what is left then is counted as
        // not sent.
        for part in sends.chunks(SEND_SLICE) {
            if shared.stop.load(Ordering::Relaxed) {
                send_stats.dropped += part.len() as u64;
                continue;
            }
            match shared_fd {
                Some(fd) => {
                    let items: Vec<(Ipv4Addr, SocketAddrV4, &[u8])> = part
                        .iter()
                        .map(|(_, ip, to, b)| (*ip, *to, &b[..]))
                        .collect();
                    sourced.send(fd, &items, &mut send_stats);
                }
                None => {
                    let items: Vec<(RawFd, SocketAddrV4, &[u8])> = part
                        .iter()
                        .map(|(fd, _, to, b)| (*fd, *to, &b[..]))
                        .collect();
                    sender.send_from_each(&items, &mut send_stats);
                }
            }
        }
        sends.clear();
        let stop = shared.stop.load(Ordering::Relaxed);
        let now = Instant::now();
        let current = shared.interval(now);
        if current > index || stop {
            if stop && let Some(last) = last_seq() {
                for s in &mut slots {
                    if let Slot::Bare { seq, .. } = s {
                        seq.finish(last, &mut tally);
                    }
                }
            }
            tally.sent += send_stats.datagrams - sent_before.datagrams;
            tally.send_dropped += send_stats.dropped - sent_before.dropped;
            sent_before = send_stats;
            let cpu = driver::thread_cpu_time();
            shared
                .received
                .fetch_add(tally.datagrams, Ordering::Relaxed);
            // Adapt `want` to the arrival rate of the interval just ended (about one second).
            want = ((tally.datagrams as f64 * WANT_FILL) as u32).clamp(1, 32);
            let report = Report {
                index,
                tally: std::mem::take(&mut tally),
                hist: hist.clone(),
                peers: slots.len(),
                cpu: cpu.saturating_sub(cpu_mark),
                last: stop,
                group: opts.group,
                recv: recv.stats(),
            };
            hist.reset();
            cpu_mark = cpu;
            let _ = reports.send(report);
            // Intervals this worker slept through get empty reports, so none is waited for.
            for k in index + 1..current {
                let _ = reports.send(Report {
                    index: k,
                    tally: Tally::default(),
                    hist: Latencies::default(),
                    peers: slots.len(),
                    cpu: Duration::ZERO,
                    last: false,
                    group: opts.group,
                    recv: recv.stats(),
                });
            }
            index = current.max(index + 1);
            if stop {
                return Ok(());
            }
        }
    }
}

/// Queues the peer's datagrams: from its own socket, or from the shared one with its address.
fn queue_transmits(
    socket: &Endpoint,
    shared_fd: Option<RawFd>,
    core: &mut Peer,
    sends: &mut Vec<(RawFd, Ipv4Addr, SocketAddrV4, Bytes)>,
) {
    let (fd, ip) = match socket {
        Endpoint::Own(s) => (s.as_raw_fd(), Ipv4Addr::UNSPECIFIED),
        Endpoint::Virtual(ip) => (shared_fd.unwrap_or(-1), *ip),
    };
    while let Some(t) = core.poll_transmit() {
        sends.push((fd, ip, t.dest, t.payload));
    }
}

fn drain_events(core: &mut Peer, tally: &mut Tally, left: &mut bool, shared: &Shared) {
    while let Some(e) = core.poll_event() {
        tally::count_event(&e, tally);
        if let PeerEvent::Left { .. } = e
            && !*left
        {
            *left = true;
            shared.left.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How peers join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The splitters: peer `i` joins the `i % n`-th.
    pub splitters: Vec<SocketAddrV4>,
    /// Local addresses to spread peers over.
    pub ips: Vec<Ipv4Addr>,
    /// Peers to join.
    pub peers: usize,
    /// Joins per second.
    pub rate: f64,
    /// Team size: peer `i` asks to be a monitor if `i % team_size < monitors`.
    pub team_size: usize,
    /// Monitors per team.
    pub monitors: usize,
    /// Receive buffer per peer socket.
    pub rcvbuf: usize,
    /// Chunk datagram bytes (the peers set the don't-fragment bit for them, as `p2psp peer`).
    pub datagram: usize,
    /// Seed for the join schedule's jitter.
    pub seed: u64,
    /// `--sockets shared`: each worker's socket (peer `i` joins on worker `i % workers`' port).
    pub shared: Vec<std::sync::Arc<UdpSocket>>,
}

/// The outcome of one join.
pub type JoinResult = Result<Duration, String>;

/// The start time of join `i`: evenly spaced at `rate`, each moved by up to ±25 % of the spacing
/// (a seeded jitter, so runs are repeatable and joins are not in lock-step).
pub fn join_offset(i: usize, rate: f64, seed: u64) -> Duration {
    let spacing = 1.0 / rate;
    let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    let t = (i as f64 + (unit - 0.5) * 0.5) * spacing;
    Duration::from_secs_f64(t.max(0.0))
}

/// Runs one joiner thread: takes peer numbers from `next` until all are taken, joins each at its
/// time, hands it to worker `i % workers`.
pub fn run_joiner(
    opts: &JoinOptions,
    start: Instant,
    next: &AtomicUsize,
    workers: &[Sender<NewPeer>],
    results: &Sender<JoinResult>,
    shared: &Shared,
) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= opts.peers {
            return;
        }
        let due = start + join_offset(i, opts.rate, opts.seed);
        loop {
            if shared.stop_joins.load(Ordering::Relaxed) {
                return;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            thread::sleep((due - now).min(Duration::from_millis(50)));
        }
        let monitor = i % opts.team_size.max(1) < opts.monitors;
        let t = Instant::now();
        let w = worker_for(i, opts.splitters.len(), workers.len());
        let splitter = opts.splitters[i % opts.splitters.len()];
        let joined = match opts.shared.get(w) {
            Some(socket) => join_virtual(splitter, virtual_ip(i), socket, monitor).map(|core| {
                NewPeer::Virtual {
                    index: i,
                    core: Box::new(core),
                }
            }),
            None => join_one(splitter, opts.ips[i % opts.ips.len()], monitor, opts.rcvbuf).map(
                |(socket, core)| {
                    let _ = driver::set_dont_fragment(&socket, opts.datagram);
                    NewPeer::Live {
                        socket,
                        core: Box::new(core),
                    }
                },
            ),
        };
        match joined {
            Ok(peer) => {
                shared.joined.fetch_add(1, Ordering::Relaxed);
                let _ = workers[w].send(peer);
                let _ = results.send(Ok(t.elapsed()));
            }
            Err(e) => {
                shared.join_failed.fetch_add(1, Ordering::Relaxed);
                let _ = results.send(Err(format!("{e:#}")));
            }
        }
    }
}

/// A UDP socket on `ip` and a TCP socket bound to the same address and port: the peer's identity
/// in its team is the TCP source endpoint of its join, which must also be its UDP endpoint. The
/// UDP socket is bound first (a free UDP port from the kernel), then TCP tries that port.
fn bind_pair(ip: Ipv4Addr, rcvbuf: usize) -> anyhow::Result<(UdpSocket, Socket, SocketAddrV4)> {
    for _ in 0..BIND_ATTEMPTS {
        let udp = driver::udp_socket(SocketAddrV4::new(ip, 0), false, Some(rcvbuf), None)
            .map_err(|e| limit_error(e, &format!("cannot bind a UDP socket on {ip}")))?;
        let SocketAddr::V4(local) = udp.local_addr()? else {
            bail!("not IPv4")
        };
        let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| limit_error(e, "cannot open a TCP socket"))?;
        tcp.set_reuse_address(true)?;
        match tcp.bind(&SocketAddr::V4(local).into()) {
            Ok(()) => return Ok((udp, tcp, local)),
            Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e).context(format!("cannot bind TCP {local}")),
        }
    }
    bail!("no port on {ip} was free for both UDP and TCP after {BIND_ATTEMPTS} tries")
}

/// Turns "too many open files" and "address not available" into what the user can do about it.
pub fn limit_error(e: std::io::Error, what: &str) -> anyhow::Error {
    match e.raw_os_error() {
        Some(24) | Some(23) => anyhow::anyhow!(
            "{what}: out of file descriptors ({e}); loadgen raised RLIMIT_NOFILE as far as it \
             could, run fewer --peers or raise the hard limit (ulimit -Hn, fs.nr_open)"
        ),
        Some(99) | Some(98) => anyhow::anyhow!(
            "{what}: out of local ports ({e}); spread peers over more addresses (--addresses) or \
             widen net.ipv4.ip_local_port_range"
        ),
        _ => anyhow::Error::new(e).context(what.to_owned()),
    }
}

/// The compat join of one peer (reference-notes §3.1), as `p2psp peer` does it, returning its
/// socket and its protocol core with the hellos already sent and the ready byte written.
pub fn join_one(
    splitter: SocketAddrV4,
    ip: Ipv4Addr,
    monitor: bool,
    rcvbuf: usize,
) -> anyhow::Result<(UdpSocket, Peer)> {
    let (udp, tcp, _local) = bind_pair(ip, rcvbuf)?;
    let core = join_on(splitter, tcp, monitor, |payload, dest| {
        let _ = udp.send_to(payload, dest);
    })?;
    Ok((udp, core))
}

/// The same join for a virtual peer: TCP bound to `ip` and the shared socket's port, hellos sent
/// from the shared socket with `ip` as their source.
pub fn join_virtual(
    splitter: SocketAddrV4,
    ip: Ipv4Addr,
    socket: &UdpSocket,
    monitor: bool,
) -> anyhow::Result<Peer> {
    let port = socket.local_addr()?.port();
    let local = SocketAddrV4::new(ip, port);
    let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| limit_error(e, "cannot open a TCP socket"))?;
    tcp.set_reuse_address(true)?;
    tcp.bind(&SocketAddr::V4(local).into())
        .map_err(|e| limit_error(e, &format!("cannot bind TCP {local}")))?;
    let fd = socket.as_raw_fd();
    join_on(splitter, tcp, monitor, |payload, dest| {
        let _ = driver::send_from_addr(fd, ip, dest, payload);
    })
}

/// CIS: the splitter's key the peers verify with (`--splitter-key`, or the key of the child
/// started with `--sign`); set once before the joins start.
pub static SPLITTER_KEY: std::sync::OnceLock<p2psp::proto::integrity::ChunkVerifier> =
    std::sync::OnceLock::new();

/// The join over `tcp` (bound to the peer's endpoint): role byte, join message, header, hellos
/// (through `send`), ready byte.
fn join_on(
    splitter: SocketAddrV4,
    tcp: Socket,
    monitor: bool,
    mut send: impl FnMut(&[u8], SocketAddrV4),
) -> anyhow::Result<Peer> {
    tcp.connect_timeout(&SocketAddr::V4(splitter).into(), JOIN_TIMEOUT)
        .map_err(|e| limit_error(e, &format!("cannot connect to the splitter at {splitter}")))?;
    let mut tcp: TcpStream = tcp.into();
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_millis(500)))?;
    tcp.write_all(&[if monitor { ROLE_MONITOR } else { ROLE_PEER }])?;
    let config = p2psp::peer::join::read_config(&mut tcp, splitter, JOIN_TIMEOUT)
        .context("joining (the splitter refuses joins beyond its pending limit: lower --join-rate if this repeats)")?;
    config
        .check_usable()
        .map_err(|e| anyhow::anyhow!("cannot use the splitter: {e}"))?;
    let mut source = config.source;
    if source.ip().is_unspecified() {
        source = SocketAddrV4::new(*splitter.ip(), source.port());
    }
    p2psp::peer::join::fetch_header(source, &config.channel, usize::from(config.header_size))?;
    let mut rules = PeerRules::new(splitter, usize::from(config.chunk_size), config.buffer_size);
    rules.monitor = monitor;
    rules.verify = SPLITTER_KEY.get().copied();
    let mut core = Peer::new(rules, &config.peers, config.monitors);
    // Hellos first, then the ready byte: the splitter adds us to the team on that byte.
    while let Some(t) = core.poll_transmit() {
        send(&t.payload, t.dest);
    }
    tcp.write_all(&[READY])?;
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    Ok(core)
}

/// A baseline receiver socket on `ip`.
pub fn bare_socket(ip: Ipv4Addr, rcvbuf: usize) -> anyhow::Result<UdpSocket> {
    driver::udp_socket(SocketAddrV4::new(ip, 0), false, Some(rcvbuf), None)
        .map_err(|e| limit_error(e, &format!("cannot bind a UDP socket on {ip}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_serves_one_splitters_peers_and_all_workers_get_peers() {
        for (splitters, workers) in [(1, 1), (1, 4), (3, 3), (3, 4), (3, 7), (2, 5)] {
            let mut used = vec![0usize; workers];
            for i in 0..1000 {
                let w = worker_for(i, splitters, workers);
                assert!(w < workers, "{splitters} {workers}: {i} -> {w}");
                assert_eq!(w % splitters, i % splitters, "a worker mixes splitters");
                used[w] += 1;
            }
            assert!(
                used.iter().all(|&u| u > 0),
                "{splitters} {workers}: {used:?}"
            );
        }
        // One splitter: round robin as before.
        assert_eq!(
            (0..6).map(|i| worker_for(i, 1, 3)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn join_schedule_is_paced_jittered_and_repeatable() {
        let rate = 100.0;
        for i in 0..1000 {
            let t = join_offset(i, rate, 7).as_secs_f64();
            let ideal = i as f64 / rate;
            assert!((t - ideal).abs() <= 0.25 / rate + 1e-12, "{i}: {t}");
            assert_eq!(join_offset(i, rate, 7), join_offset(i, rate, 7));
        }
        assert_ne!(join_offset(5, rate, 7), join_offset(5, rate, 8));
    }

    #[test]
    fn chunk_cache_shares_identical_chunks_only() {
        let mut arena = Arena(BytesMut::new());
        let mut cache = ChunkCache::new();
        let chunk = |n: u16, fill: u8| {
            let mut v = n.to_be_bytes().to_vec();
            v.extend_from_slice(&[fill; 100]);
            v
        };
        let a = cache.get(&chunk(7, 1), &mut arena);
        let b = cache.get(&chunk(7, 1), &mut arena);
        assert_eq!(a.as_ptr(), b.as_ptr(), "one buffer for both peers");
        // Same slot, other content (a chunk CACHE_SLOTS later, or different bytes): a new copy.
        let c = cache.get(&chunk(7 + CACHE_SLOTS as u16, 1), &mut arena);
        let d = cache.get(&chunk(7 + CACHE_SLOTS as u16, 2), &mut arena);
        assert_ne!(c.as_ptr(), a.as_ptr());
        assert_eq!(&d[..], &chunk(7 + CACHE_SLOTS as u16, 2)[..]);
        assert_eq!(&a[..], &chunk(7, 1)[..]);
    }

    #[test]
    fn virtual_addresses_are_distinct_and_map_back() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..200_000).chain([16_000_000, 16_515_071]) {
            let ip = virtual_ip(i);
            let [a, b, _, d] = ip.octets();
            assert!(a == 127 && b >= 1 && d != 0 && d != 255, "{i}: {ip}");
            assert_eq!(virtual_index(ip), Some(i), "{ip}");
            assert!(seen.insert(ip));
        }
        assert_eq!(virtual_ip(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(virtual_index(Ipv4Addr::new(127, 0, 0, 1)), None);
        assert_eq!(virtual_index(Ipv4Addr::new(10, 1, 0, 1)), None);
    }
}
