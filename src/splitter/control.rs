//! The splitter's control plane: TCP joins without a thread per peer, the stream-header HTTP
//! endpoint, team placement, forwarding of datagrams between shards, and the status line.
//!
//! One thread, non-blocking sockets and `poll(2)`. A TCP connection's first byte says what it is:
//! `P` or `M` is a join (reference-notes §3.1), `G` the start of `GET /<channel>` from a peer
//! fetching the stream header (the join message names this splitter as the source).
//!
//! Hostile connections (`docs/security.md`): at most `--max-pending-joins` connections are in
//! progress, at most `--max-pending-per-ip` from one address; when full, the oldest connection that
//! has not sent a byte makes room. Each has `--join-timeout` in all to finish. A join is committed
//! (the peer added to its team, so the splitter starts sending to it) only on its ready byte, or
//! when the ready timeout passes with the connection still open; a connection that closes before
//! is forgotten. Over `--max-peers` a join is refused: the connection is closed before the
//! configuration (the compat wire has no refusal message) and the splitter logs why.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::Settings;
use super::feed::{FeedStats, HeaderCell, StreamHeader};
use super::shard::{Command, Report, ShardStats};
use super::status::{Board, ControlCounters, PlaneView, Rates, StatusLine};
use crate::driver::{self, PollFd, Waker};
use crate::proto::Endpoint;
use crate::proto::directory::{Directory, DirectoryRules, Placement};
use crate::proto::nts::PeerId;
use crate::proto::nts_splitter::{NtsAction, NtsSplitter};
use crate::proto::team::TeamEvent;
use crate::proto::wire::{JoinConfig, ROLE_MONITOR, ROLE_PEER};

/// How the control plane reaches a shard.
pub struct ShardLink {
    /// Commands to the shard (joins; bounded, the control plane waits when it is full).
    pub commands: Sender<Command>,
    /// Datagrams for the shard's peers that arrived at another shard (bounded; dropped and counted
    /// when full).
    pub datagrams: Sender<Command>,
    /// Wakes the shard after a command.
    pub waker: Waker,
    /// The shard's counters.
    pub stats: Arc<ShardStats>,
}

/// How long to wait for the ready byte after the configuration (then the peer is added anyway if
/// the connection is still open: a reference peer fetches the header before it sends the byte).
const READY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection that has not sent a byte is safe from being displaced by a newcomer
/// when the pending connections are at their limit.
const DISPLACE_AFTER: Duration = Duration::from_millis(100);

enum State {
    /// Waiting for the first byte.
    Hello,
    /// A join waiting for the stream header to be complete.
    JoinWaitHeader { monitor: bool },
    /// Writing the configuration; then waiting for the ready byte.
    JoinConfig { placement: Placement },
    /// Configuration sent; waiting for the ready byte or the end of the connection.
    JoinReady { placement: Placement },
    /// NTS: configuration and ID sent; waiting for the peer's hellos (list 2 is written when
    /// the splitter and the monitors have seen them) and its `Y`.
    NtsArriving { placement: Placement },
    /// Reading an HTTP request head.
    HttpRequest,
    /// Writing an HTTP response, then closing.
    HttpResponse,
}

struct Conn {
    stream: TcpStream,
    remote: Endpoint,
    local: Endpoint,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
    accepted: Instant,
    /// This connection's key in `Control::conns`.
    key: u64,
    /// NTS: the ID given to the peer.
    nts_id: Option<PeerId>,
    /// NTS: incorporated at this UDP endpoint; the join completes once the output is written.
    nts_done: Option<Endpoint>,
    /// NTS: origins whose chunks are forwarded to this peer from its first chunk on (the
    /// forwarding fallback), sent to its shard right after it is inserted there.
    nts_forwards: Vec<Endpoint>,
    /// NTS: the peer closed its side (a reference peer does so before its `Y`).
    eof: bool,
    /// EMS: the private endpoint of its 7-byte join message.
    ems_private: Option<Endpoint>,
}

/// NTS at the control plane: the sans-IO core, the socket its datagrams go out on, and which
/// connection each arriving ID belongs to.
struct Nts {
    core: NtsSplitter,
    socket: std::net::UdpSocket,
    /// The extra sockets for U2x (reference `ListenExtraSocketThread`), oldest first: the last
    /// is the one announced now; the others stay open for IDs still on their way to them.
    extra: std::collections::VecDeque<(u16, std::net::UdpSocket)>,
    conns: HashMap<PeerId, u64>,
    rng: u64,
}

/// Extra sockets kept open at once (the newest is announced).
const EXTRA_SOCKETS: usize = 4;
/// Most datagrams read from one extra socket per turn of the control loop.
const EXTRA_BUDGET: usize = 64;

/// A new extra socket on `ip`, any port, non-blocking.
fn extra_socket(ip: Ipv4Addr) -> std::io::Result<(u16, std::net::UdpSocket)> {
    let s = std::net::UdpSocket::bind(SocketAddrV4::new(ip, 0))?;
    s.set_nonblocking(true)?;
    Ok((s.local_addr()?.port(), s))
}

/// How long an NTS peer that closed its join connection has to say `Y`.
const NTS_EOF_GRACE: Duration = Duration::from_secs(5);

/// Counters of the control plane (relaxed atomics, read by [`super::Splitter::stats`]).
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Joins completed (peers handed to a shard).
    pub joins: AtomicU64,
    /// Connections closed at once because too many were pending (in all or from the address).
    pub refused_pending: AtomicU64,
    /// Silent connections closed to make room for a new one.
    pub displaced: AtomicU64,
    /// Joins refused because the splitter has `--max-peers` peers.
    pub refused_full: AtomicU64,
    /// Connections that ran out of time.
    pub timeouts: AtomicU64,
    /// Connections that closed after the configuration without the ready byte.
    pub abandoned: AtomicU64,
    /// Connections whose first bytes were neither a join nor `GET`.
    pub bad_requests: AtomicU64,
    /// Stream headers served.
    pub header_requests: AtomicU64,
    /// Load probes answered (peers that know several splitters, docs/scale-out.md).
    pub load_probes: AtomicU64,
    /// Datagrams from endpoints that are no member of any team (counted, dropped).
    pub foreign_datagrams: AtomicU64,
    /// Datagrams for a member of another shard dropped because that shard's queue was full.
    pub forward_dropped: AtomicU64,
    /// Connections in progress now.
    pub pending: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The control plane.
pub struct Control {
    settings: Settings,
    listener: TcpListener,
    header: Arc<HeaderCell>,
    feed: Arc<FeedStats>,
    shards: Vec<ShardLink>,
    reports: Receiver<Report>,
    foreign: Receiver<Report>,
    directory: Directory,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    stats: Arc<ControlStats>,
    last_full_log: Option<Instant>,
    /// Where the status line's numbers are published for `--metrics`.
    board: Arc<Board>,
    /// NTS, with `--nts`.
    nts: Option<Nts>,
}

impl Control {
    /// A control plane over the listening socket and the shards. `reports` carries membership
    /// events, `foreign` the datagrams shards received from endpoints they do not own.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: &Settings,
        listener: TcpListener,
        header: Arc<HeaderCell>,
        feed: Arc<FeedStats>,
        shards: Vec<ShardLink>,
        reports: Receiver<Report>,
        foreign: Receiver<Report>,
        stats: Arc<ControlStats>,
    ) -> Control {
        let directory = Directory::new(DirectoryRules {
            team_size: settings.team_size,
            monitors: settings.monitors,
            shards: shards.len(),
        });
        Control {
            settings: settings.clone(),
            listener,
            header,
            feed,
            shards,
            reports,
            foreign,
            directory,
            conns: HashMap::new(),
            next_conn: 0,
            stats,
            last_full_log: None,
            board: Arc::default(),
            nts: None,
        }
    }

    /// Runs NTS (`--nts`), sending from `socket` (a duplicate of a shard's socket, so that
    /// datagrams leave from the splitter's port); `None` leaves it off.
    pub fn with_nts(mut self, socket: Option<std::net::UdpSocket>) -> Control {
        self.nts = socket.map(|socket| {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()).rotate_left(32);
            let mut core = NtsSplitter::new(self.settings.max_pending_joins);
            let ip = match socket.local_addr() {
                Ok(SocketAddr::V4(a)) => *a.ip(),
                _ => Ipv4Addr::UNSPECIFIED,
            };
            let mut extra = std::collections::VecDeque::new();
            match extra_socket(ip) {
                Ok((port, s)) => {
                    eprintln!(
                        "p2psp splitter NTS extra port {ip}:{port} (U2x: members behind symmetric NATs send their ID there; a new port after each announcement that names it)"
                    );
                    core.set_extra_port(port);
                    extra.push_back((port, s));
                }
                Err(e) => eprintln!(
                    "p2psp splitter: no NTS extra port ({e}): announcements go as plain U2, without U2x"
                ),
            }
            Nts {
                core,
                socket,
                extra,
                conns: HashMap::new(),
                rng: seed | 1,
            }
        });
        self
    }

    /// Reads what came to the extra sockets (at most [`EXTRA_BUDGET`] datagrams each).
    fn read_extra(&mut self) {
        let Some(nts) = &mut self.nts else { return };
        let mut buf = [0u8; 64];
        for (port, s) in &nts.extra {
            for _ in 0..EXTRA_BUDGET {
                match s.recv_from(&mut buf) {
                    Ok((n, SocketAddr::V4(from))) => {
                        nts.core.handle_extra_datagram(*port, from, &buf[..n])
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ICMP errors of earlier echoes, and the like.
                    Err(_) => {}
                }
            }
        }
    }

    /// Publishes the control plane's counters and rates to `board` once a second.
    pub fn with_board(mut self, board: Arc<Board>) -> Control {
        board.attach(self.stats.clone());
        self.board = board;
        self
    }

    /// Runs until `stop`.
    pub fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        self.listener.set_nonblocking(true)?;
        let mut status = StatusLine::new(Instant::now());
        let mut fds: Vec<PollFd> = Vec::new();
        let mut ids: Vec<u64> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            fds.clear();
            ids.clear();
            fds.push(PollFd::new(self.listener.as_raw_fd(), driver::POLLIN));
            for (id, c) in &self.conns {
                let events = match c.state {
                    State::JoinConfig { .. } | State::HttpResponse => driver::POLLOUT,
                    State::JoinWaitHeader { .. } => 0,
                    State::NtsArriving { .. } if c.eof => 0,
                    State::NtsArriving { .. } if c.written < c.output.len() => {
                        driver::POLLIN | driver::POLLOUT
                    }
                    _ => driver::POLLIN,
                };
                fds.push(PollFd::new(c.stream.as_raw_fd(), events));
                ids.push(*id);
            }
            if let Some(nts) = &self.nts {
                for (_, s) in &nts.extra {
                    fds.push(PollFd::new(s.as_raw_fd(), driver::POLLIN));
                }
            }
            driver::poll(&mut fds, Some(Duration::from_millis(10)))?;
            if fds[0].revents() != 0 {
                self.accept();
            }
            let now = Instant::now();
            for (i, id) in ids.iter().enumerate() {
                let ready = fds[i + 1].revents() != 0;
                self.progress(*id, ready, now);
            }
            self.drain_reports();
            self.read_extra();
            self.drain_nts(now);
            let plane = PlaneView {
                peers: self.directory.peer_count(),
                teams: self.directory.team_count(),
                ignored: self.stats.foreign_datagrams.load(Ordering::Relaxed)
                    + self.stats.forward_dropped.load(Ordering::Relaxed)
                    + self.nts.as_ref().map_or(0, |n| {
                        let c = n.core.counters();
                        c.ignored + c.forward_refused + c.extra_ignored + c.retries_refused
                    }),
            };
            let shards = self.shards.iter().map(|l| &*l.stats);
            if let Some(line) = status.tick(now, &self.feed, shards, plane) {
                match self.settings.ims {
                    Some(ims) => eprintln!(
                        "{line} | IMS to {}: {} chunks",
                        ims.group,
                        super::status::sum(
                            self.shards.iter().map(|l| &*l.stats),
                            super::shard::ShardMetric::ImsChunks
                        )
                    ),
                    None => eprintln!("{line}"),
                }
                self.publish(status.rates());
            }
            if self.feed.ended.load(Ordering::Relaxed) {
                break;
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, remote)) => {
                    let (SocketAddr::V4(remote), Ok(SocketAddr::V4(local))) =
                        (remote, stream.local_addr())
                    else {
                        bump(&self.stats.refused_pending);
                        continue;
                    };
                    let now = Instant::now();
                    if !self.make_room(*remote.ip(), now) || stream.set_nonblocking(true).is_err() {
                        bump(&self.stats.refused_pending);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(
                        id,
                        Conn {
                            stream,
                            remote,
                            local,
                            state: State::Hello,
                            input: Vec::new(),
                            output: Vec::new(),
                            written: 0,
                            deadline: now + self.settings.join_timeout,
                            accepted: now,
                            key: id,
                            nts_id: None,
                            nts_done: None,
                            nts_forwards: Vec::new(),
                            eof: false,
                            ems_private: None,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors and the like: log, keep serving the others.
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Whether a new connection from `ip` may be served: under the per-address limit, and under
    /// the global one, if need be by closing the oldest connection that has been silent for a
    /// while (an honest peer sends its role byte at once).
    fn make_room(&mut self, ip: Ipv4Addr, now: Instant) -> bool {
        let from_ip = self.conns.values().filter(|c| *c.remote.ip() == ip).count();
        if from_ip >= self.settings.max_pending_per_ip {
            return false;
        }
        if self.conns.len() < self.settings.max_pending_joins {
            return true;
        }
        let oldest_silent = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, State::Hello) && now.duration_since(c.accepted) >= DISPLACE_AFTER
            })
            .min_by_key(|(id, _)| **id)
            .map(|(id, _)| *id);
        match oldest_silent {
            Some(id) => {
                self.conns.remove(&id);
                bump(&self.stats.displaced);
                true
            }
            None => false,
        }
    }

    /// Moves one connection along; drops it when done or failed.
    fn progress(&mut self, id: u64, ready: bool, now: Instant) {
        let Some(mut c) = self.conns.remove(&id) else {
            return;
        };
        match self.step(&mut c, ready, now) {
            Step::Keep => {
                self.conns.insert(id, c);
            }
            Step::Done => {}
            Step::Fail => {
                if let State::JoinConfig { placement }
                | State::JoinReady { placement }
                | State::NtsArriving { placement } = &c.state
                {
                    let _ = placement;
                    self.directory.remove(c.remote);
                }
                if let (Some(nts), Some(id)) = (&mut self.nts, c.nts_id) {
                    nts.core.abandon(&id);
                    nts.conns.remove(&id);
                }
            }
        }
    }

    fn step(&mut self, c: &mut Conn, ready: bool, now: Instant) -> Step {
        loop {
            match &c.state {
                State::Hello if self.settings.ems => {
                    // EMS: a join is 7 bytes (private endpoint, role); `GET ` is a header
                    // request.
                    if !ready {
                        return self.timeout(c, now);
                    }
                    let mut b = [0u8; crate::proto::nts_ems::EMS_JOIN_LEN];
                    let want = crate::proto::nts_ems::EMS_JOIN_LEN.saturating_sub(c.input.len());
                    match c.stream.read(&mut b[..want.max(1)]) {
                        Ok(0) => return Step::Fail,
                        Ok(n) => c.input.extend_from_slice(&b[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            return self.timeout(c, now);
                        }
                        Err(_) => return Step::Fail,
                    }
                    if c.input.len() >= 4 && c.input.starts_with(b"GET ") {
                        c.state = State::HttpRequest;
                        continue;
                    }
                    match crate::proto::nts_ems::EmsJoin::decode(&c.input) {
                        Ok(None) => return self.timeout(c, now),
                        Ok(Some(j)) => {
                            c.ems_private = Some(j.private);
                            c.input.clear();
                            c.state = State::JoinWaitHeader { monitor: j.monitor };
                        }
                        Err(()) => {
                            bump(&self.stats.bad_requests);
                            return Step::Fail;
                        }
                    }
                }
                State::Hello => {
                    if !ready {
                        // IMS: a reference IMS peer sends nothing before the configuration.
                        if self.settings.ims.is_some()
                            && now.duration_since(c.accepted) >= super::ims::SILENT_JOIN
                        {
                            c.state = State::JoinWaitHeader { monitor: false };
                            continue;
                        }
                        return self.timeout(c, now);
                    }
                    let mut b = [0u8; 1];
                    match c.stream.read(&mut b) {
                        Ok(0) => return Step::Fail,
                        Ok(_) => match classify_request(&b) {
                            Request::Join { monitor } => {
                                c.state = State::JoinWaitHeader { monitor }
                            }
                            Request::NeedMore | Request::Header { .. } => {
                                c.input.push(b[0]);
                                c.state = State::HttpRequest;
                            }
                            Request::Bad => {
                                bump(&self.stats.bad_requests);
                                return Step::Fail;
                            }
                        },
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return self.timeout(c, now),
                        Err(_) => return Step::Fail,
                    }
                }
                State::JoinWaitHeader { monitor } => {
                    let Some(header) = self.header.get() else {
                        return self.timeout(c, now);
                    };
                    let response = header_response(&header, self.header.chunks_in_stream());
                    let Ok(header_size) = u16::try_from(response.len()) else {
                        // Cannot happen with the checked --header-size and the capped content
                        // type; refuse rather than send a wrong size.
                        tracing::error!("stream header too long for the join message");
                        return Step::Fail;
                    };
                    let max = self.settings.max_peers;
                    if max > 0 && self.directory.peer_count() >= max {
                        self.refuse_full(c.remote, now);
                        return Step::Fail;
                    }
                    let placement = self.directory.place(c.remote, *monitor);
                    let mut config = JoinConfig {
                        source: SocketAddrV4::new(*c.local.ip(), c.local.port()),
                        channel: self.settings.channel.clone(),
                        header_size,
                        chunk_size: self.settings.chunk_size as u16,
                        buffer_size: self.settings.buffer_size,
                        monitors: placement.monitors,
                        peers: placement.peers.clone(),
                    };
                    if let Some(nts) = &self.nts {
                        // NTS: the list holds the monitors only (§6.4).
                        config.peers = nts.core.monitors(placement.team);
                        config.monitors = config.peers.len() as u16;
                    }
                    let encoded = match self.settings.ims {
                        // IMS (§3.2): the core configuration and the group, no peer list.
                        Some(ims) => crate::proto::ims::ImsConfig {
                            source: config.source,
                            channel: config.channel.clone(),
                            header_size,
                            chunk_size: config.chunk_size,
                            buffer_size: config.buffer_size,
                            group: ims.group,
                        }
                        .encode(&mut c.output),
                        None => config.encode(&mut c.output),
                    };
                    if encoded.is_err() {
                        self.directory.remove(c.remote);
                        return Step::Fail;
                    }
                    if let Some(nts) = &mut self.nts {
                        let id = loop {
                            nts.rng ^= nts.rng << 13;
                            nts.rng ^= nts.rng >> 7;
                            nts.rng ^= nts.rng << 17;
                            let id = PeerId::from_random(nts.rng);
                            if !nts.core.knows(&id) {
                                break id;
                            }
                        };
                        if !nts
                            .core
                            .arrive(now, placement.team, id, c.remote, placement.monitor)
                        {
                            self.directory.remove(c.remote);
                            return Step::Fail;
                        }
                        if let Some(p) = c.ems_private {
                            nts.core.set_private(id, p);
                        }
                        nts.conns.insert(id, c.key);
                        c.nts_id = Some(id);
                        c.output.extend_from_slice(id.as_bytes());
                    }
                    c.state = State::JoinConfig { placement };
                }
                State::JoinConfig { .. } => match write_out(c) {
                    Ok(true) => {
                        let State::JoinConfig { placement } =
                            std::mem::replace(&mut c.state, State::Hello)
                        else {
                            unreachable!()
                        };
                        if c.nts_id.is_some() {
                            c.deadline = now + crate::proto::nts::MAX_TOTAL_INCORPORATION_TIME;
                            c.state = State::NtsArriving { placement };
                            continue;
                        }
                        c.deadline = now + READY_TIMEOUT;
                        c.state = State::JoinReady { placement };
                        return Step::Keep;
                    }
                    Ok(false) => return self.timeout(c, now),
                    Err(()) => return Step::Fail,
                },
                State::JoinReady { .. } => {
                    // The ready byte (or the end of the connection, or the timeout) completes the
                    // join: by then the peer has bound its UDP socket and said hello to its team.
                    let done = if ready {
                        let mut b = [0u8; 16];
                        match c.stream.read(&mut b) {
                            Ok(0) => {
                                // Gone before its ready byte: it never listened for chunks.
                                bump(&self.stats.abandoned);
                                return Step::Fail;
                            }
                            Ok(_) => true,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                            Err(e) if e.kind() == ErrorKind::Interrupted => false,
                            Err(_) => {
                                bump(&self.stats.abandoned);
                                return Step::Fail;
                            }
                        }
                    } else {
                        now >= c.deadline
                    };
                    if !done {
                        return Step::Keep;
                    }
                    let State::JoinReady { placement } =
                        std::mem::replace(&mut c.state, State::Hello)
                    else {
                        unreachable!()
                    };
                    self.commit(c.remote, &placement);
                    return Step::Done;
                }
                State::NtsArriving { .. } => {
                    match write_out(c) {
                        Ok(true) => {}
                        Ok(false) => return self.timeout(c, now),
                        Err(()) => c.eof = true,
                    }
                    if let Some(endpoint) = c.nts_done {
                        let State::NtsArriving { placement } =
                            std::mem::replace(&mut c.state, State::Hello)
                        else {
                            unreachable!()
                        };
                        self.directory.rename(c.remote, endpoint);
                        self.commit(endpoint, &placement);
                        // After its insertion, on the same queue: the shard forwards to members
                        // only.
                        let link = &self.shards[placement.shard];
                        for origin in c.nts_forwards.drain(..) {
                            let _ = link.commands.send(Command::Forward {
                                origin,
                                to: endpoint,
                            });
                        }
                        link.waker.wake();
                        return Step::Done;
                    }
                    if ready && !c.eof {
                        let mut b = [0u8; 64];
                        match c.stream.read(&mut b) {
                            // A reference peer closes before its Y: give it a little longer.
                            Ok(0) => {
                                c.eof = true;
                                c.deadline = c.deadline.min(now + NTS_EOF_GRACE);
                            }
                            // Nothing is expected; a compat peer's ready byte is ignored.
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => {
                                c.eof = true;
                                c.deadline = c.deadline.min(now + NTS_EOF_GRACE);
                            }
                        }
                    }
                    if now >= c.deadline {
                        bump(&self.stats.abandoned);
                        return Step::Fail;
                    }
                    return Step::Keep;
                }
                State::HttpRequest => {
                    if ready {
                        let mut b = [0u8; 1024];
                        let room = MAX_REQUEST_HEAD
                            .saturating_sub(c.input.len())
                            .clamp(1, 1024);
                        match c.stream.read(&mut b[..room]) {
                            Ok(0) => return Step::Fail,
                            Ok(n) => c.input.extend_from_slice(&b[..n]),
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                            Err(_) => return Step::Fail,
                        }
                    }
                    match classify_request(&c.input) {
                        Request::Header { .. } => {}
                        Request::NeedMore => return self.timeout(c, now),
                        Request::Join { .. } | Request::Bad => {
                            bump(&self.stats.bad_requests);
                            return Step::Fail;
                        }
                    }
                    let probe = crate::http::RequestHead::parse(&c.input).is_ok_and(|h| {
                        h.is_some_and(|(h, _)| h.path() == crate::proto::choice::LOAD_PATH)
                    });
                    if probe {
                        // A peer that knows several splitters asks which is least loaded.
                        bump(&self.stats.load_probes);
                        c.output = crate::proto::choice::load_response(
                            self.directory.peer_count(),
                            self.settings.max_peers,
                        );
                    } else {
                        let Some(header) = self.header.get() else {
                            return self.timeout(c, now);
                        };
                        bump(&self.stats.header_requests);
                        c.output = header_response(&header, self.header.chunks_in_stream());
                    }
                    c.state = State::HttpResponse;
                }
                State::HttpResponse => {
                    return match write_out(c) {
                        Ok(true) => Step::Done,
                        Ok(false) => self.timeout(c, now),
                        Err(()) => Step::Fail,
                    };
                }
            }
        }
    }

    fn timeout(&mut self, c: &Conn, now: Instant) -> Step {
        if now >= c.deadline {
            bump(&self.stats.timeouts);
            Step::Fail
        } else {
            Step::Keep
        }
    }

    /// Refuses a join over `--max-peers`: the caller closes the connection before sending the
    /// configuration. Logged at most once a second (a full splitter may see many).
    fn refuse_full(&mut self, peer: Endpoint, now: Instant) {
        bump(&self.stats.refused_full);
        if self
            .last_full_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_full_log = Some(now);
            tracing::warn!(
                "refused the join of {peer}: the splitter has {} peers, its --max-peers ({} refused so far)",
                self.directory.peer_count(),
                self.stats.refused_full.load(Ordering::Relaxed)
            );
        }
    }

    fn commit(&mut self, peer: Endpoint, placement: &Placement) {
        bump(&self.stats.joins);
        let link = &self.shards[placement.shard];
        let _ = link.commands.send(Command::Insert {
            team: placement.team,
            peer,
            monitor: placement.monitor,
        });
        link.waker.wake();
        tracing::info!(
            "{} {peer} joined team {} (shard {})",
            if placement.monitor { "monitor" } else { "peer" },
            placement.team,
            placement.shard
        );
    }

    fn drain_reports(&mut self) {
        while let Ok(r) = self.reports.try_recv() {
            self.on_report(r);
        }
        // Bounded per call: a flood of foreign datagrams cannot keep joins waiting.
        for _ in 0..4096 {
            let Ok(r) = self.foreign.try_recv() else {
                break;
            };
            self.on_report(r);
        }
        self.stats
            .pending
            .store(self.conns.len() as u64, Ordering::Relaxed);
    }

    fn on_report(&mut self, r: Report) {
        match r {
            Report::Event(e) => {
                let (TeamEvent::Left { peer, team }
                | TeamEvent::Expelled { peer, team, .. }
                | TeamEvent::Polluter { peer, team, .. }) = e;
                if let Some(nts) = &mut self.nts {
                    nts.core.remove(peer);
                }
                // Only forget it if it was not placed again meanwhile.
                if self.directory.lookup(peer).is_some_and(|(t, _)| t == team) {
                    self.directory.remove(peer);
                }
                match e {
                    TeamEvent::Left { .. } => tracing::info!("{peer} left team {team}"),
                    TeamEvent::Expelled { losses, judged, .. } => tracing::warn!(
                        "{peer} expelled from team {team}: {losses} of its last {judged} chunks lost"
                    ),
                    TeamEvent::Polluter {
                        accusers, trusted, ..
                    } => tracing::warn!(
                        "{peer} expelled from team {team} as a polluter: {accusers} teammate(s) got chunks with bad signatures from it{}",
                        if trusted {
                            ", a trusted one among them"
                        } else {
                            ""
                        }
                    ),
                }
            }
            Report::Foreign { from, data, .. }
                if self
                    .nts
                    .as_mut()
                    .is_some_and(|n| n.core.handle_datagram(Instant::now(), from, &data)) => {}
            Report::Foreign { from, data, .. } => match self.directory.lookup(from) {
                // A member of another shard (the kernel spreads datagrams over the shards'
                // sockets by address), or placed but not yet inserted at its shard: hand it over.
                Some((_, owner)) => {
                    let link = &self.shards[owner];
                    if link
                        .datagrams
                        .try_send(Command::Datagram { from, data })
                        .is_err()
                    {
                        bump(&self.stats.forward_dropped);
                    }
                    link.waker.wake();
                }
                None => bump(&self.stats.foreign_datagrams),
            },
        }
    }
}

impl Control {
    /// Carries out what NTS asks: datagrams, list 2 on join connections, incorporations.
    fn drain_nts(&mut self, now: Instant) {
        let Some(nts) = &mut self.nts else { return };
        nts.core.handle_timeout(now);
        while let Some(a) = nts.core.poll_action() {
            match a {
                NtsAction::Send { to, data } => {
                    let _ = nts.socket.send_to(&data, to);
                }
                NtsAction::SendFromExtra { port, to, data } => {
                    if let Some((_, s)) = nts.extra.iter().find(|(p, _)| *p == port) {
                        let _ = s.send_to(&data, to);
                    }
                }
                NtsAction::RenewExtraPort => {
                    let ip = match nts.extra.back().map(|(_, s)| s.local_addr()) {
                        Some(Ok(SocketAddr::V4(a))) => *a.ip(),
                        _ => continue,
                    };
                    match extra_socket(ip) {
                        Ok((port, s)) => {
                            tracing::debug!("NTS extra port now {ip}:{port}");
                            nts.core.set_extra_port(port);
                            nts.extra.push_back((port, s));
                            if nts.extra.len() > EXTRA_SOCKETS {
                                nts.extra.pop_front();
                            }
                        }
                        // The current one is announced again.
                        Err(e) => tracing::warn!("cannot open a new NTS extra port: {e}"),
                    }
                }
                NtsAction::List2 { id, bytes } => {
                    if let Some(c) = nts.conns.get(&id).and_then(|k| self.conns.get_mut(k)) {
                        c.output.drain(..c.written);
                        c.written = 0;
                        c.output.extend_from_slice(&bytes);
                    }
                }
                NtsAction::Incorporate { id, endpoint } => {
                    if let Some(c) = nts.conns.remove(&id).and_then(|k| self.conns.get_mut(&k)) {
                        c.nts_done = Some(endpoint);
                    }
                }
                NtsAction::Forward { origin, to } | NtsAction::Unforward { origin, to } => {
                    let cmd = if matches!(a, NtsAction::Forward { .. }) {
                        Command::Forward { origin, to }
                    } else {
                        Command::Unforward { origin, to }
                    };
                    // The receiver's shard: a new origin may still be placed under its TCP
                    // endpoint, the receiver is a member.
                    // On the commands queue, as joins: the requester is not asked again once
                    // echoed, so this must not be dropped (the control plane waits instead).
                    // A receiver just incorporated is not in its shard yet: held for it.
                    if let Some(c) = self
                        .conns
                        .values_mut()
                        .find(|c| c.nts_id.is_some() && c.nts_done == Some(to))
                    {
                        if matches!(cmd, Command::Forward { .. }) {
                            c.nts_forwards.push(origin);
                        } else {
                            c.nts_forwards.retain(|o| *o != origin);
                        }
                    } else if let Some((_, shard)) = self.directory.lookup(to) {
                        let link = &self.shards[shard];
                        let _ = link.commands.send(cmd);
                        link.waker.wake();
                    }
                }
                NtsAction::GiveUp { id } => {
                    if let Some(c) = nts.conns.remove(&id).and_then(|k| self.conns.remove(&k)) {
                        bump(&self.stats.timeouts);
                        self.directory.remove(c.remote);
                    }
                }
            }
        }
    }
}

enum Step {
    Keep,
    Done,
    Fail,
}

/// Most bytes of an HTTP request head the splitter reads before giving up on it.
pub const MAX_REQUEST_HEAD: usize = 8192;

/// What a TCP connection to the splitter's port asks for, judged from the bytes received so far
/// (sans-IO, so that it can be fuzzed and tested without sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Not enough bytes to tell yet.
    NeedMore,
    /// A join (reference-notes §3.1): the first byte is `P`, or `M` for a monitor. Whatever
    /// follows the role byte belongs to the join (the ready byte).
    Join {
        /// Whether the peer asks to be a monitor.
        monitor: bool,
    },
    /// `GET /<channel>` for the stream header; the request head took this many bytes.
    Header {
        /// Length of the request head.
        head_len: usize,
    },
    /// Anything else: the connection is closed.
    Bad,
}

/// Classifies the start of a connection. A join is told by its first byte; an HTTP request by a
/// first `G` and then a complete, well-formed request head of at most [`MAX_REQUEST_HEAD`] bytes.
pub fn classify_request(input: &[u8]) -> Request {
    match input.first() {
        None => Request::NeedMore,
        Some(&ROLE_PEER) => Request::Join { monitor: false },
        Some(&ROLE_MONITOR) => Request::Join { monitor: true },
        Some(b'G') => match crate::http::RequestHead::parse(input) {
            Ok(Some((head, head_len))) if head.method() == "GET" => Request::Header { head_len },
            Ok(None) if input.len() < MAX_REQUEST_HEAD => Request::NeedMore,
            _ => Request::Bad,
        },
        Some(_) => Request::Bad,
    }
}

/// Writes what is left of `c.output`; `Ok(true)` when all is written.
fn write_out(c: &mut Conn) -> Result<bool, ()> {
    while c.written < c.output.len() {
        match c.stream.write(&c.output[c.written..]) {
            Ok(0) => return Err(()),
            Ok(n) => c.written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    Ok(true)
}

/// The response to `GET /<channel>`: an HTTP head then the stream header. A reference peer relays
/// exactly these `header_size` bytes to its player, which so sees a valid HTTP response.
///
/// [`STREAM_HEADER`] tells our peers which stream this header starts, from which chunk on that
/// stream runs and how many of its chunks were sent so far (`chunks`), so that a peer hands
/// players that connect after a source restart the new header, from the right chunk on; players
/// ignore it. Its length does not change while the stream runs, so `header_size` in a join message
/// stays right for the reference peer, which reads exactly that many bytes.
///
/// [`STREAM_HEADER`]: crate::proto::wire::STREAM_HEADER
pub fn header_response(h: &StreamHeader, chunks: u64) -> Vec<u8> {
    // The source's content type, capped so the response always fits the join message's u16.
    let ct = match h.content_type.as_deref() {
        Some(ct) if ct.len() <= 200 => ct,
        _ => "application/octet-stream",
    };
    let stream = format!(
        "{} {} {:010}",
        h.generation,
        h.first_chunk,
        chunks.min(9_999_999_999)
    );
    let mut out = crate::http::response_head(
        200,
        "OK",
        &[
            ("Content-Type", ct),
            ("Cache-Control", "no-cache"),
            (crate::proto::wire::STREAM_HEADER, &stream),
        ],
    );
    out.extend_from_slice(&h.bytes);
    out
}

impl Control {
    /// Publishes the counters and the last second's rates for `--metrics`, and tells systemd.
    fn publish(&self, rates: Rates) {
        let c = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.board.publish(
            ControlCounters {
                joins: get(&c.joins),
                refused: get(&c.refused_pending) + get(&c.refused_full),
                timeouts: get(&c.timeouts),
                bad_requests: get(&c.bad_requests),
                header_requests: get(&c.header_requests),
                load_probes: get(&c.load_probes),
                foreign_datagrams: get(&c.foreign_datagrams),
            },
            rates,
        );
        if let Some(nts) = &self.nts {
            self.board.publish_nts(nts_view(&nts.core));
        }
        let status = format!(
            "{} peers in {} teams, {:.2} Mbit/s out",
            self.directory.peer_count(),
            self.directory.team_count(),
            rates.bits_out_per_second / 1e6
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
    }
}

/// Most NTS members `/status` lists.
const NTS_STATUS_PEERS: usize = 1000;

/// The splitter's NTS view for `/status`: its counters, its port-probing planner's, and, per member (at most
/// [`NTS_STATUS_PEERS`]), its ID, the port step measured for its NAT and how it is served
/// (`direct`, or `forwarded` when the splitter forwards it some teammates' chunks).
fn nts_view(core: &NtsSplitter) -> serde_json::Value {
    let c = core.counters();
    let pc = core.probe_counters();
    let views = core.member_views();
    let peers: Vec<serde_json::Value> = views
        .iter()
        .take(NTS_STATUS_PEERS)
        .map(|(id, endpoint, monitor, step, forwarded_from)| {
            serde_json::json!({
                "id": id.to_string(),
                "endpoint": endpoint.to_string(),
                "monitor": monitor,
                "port_step": step,
                "served": if *forwarded_from > 0 { "forwarded" } else { "direct" },
                "forwarded_from": forwarded_from,
            })
        })
        .collect();
    serde_json::json!({
        "members": views.len(),
        "arriving": core.arriving_count(),
        "incorporated": c.incorporated,
        "given_up": c.given_up,
        "ignored": c.ignored,
        "port_reports": c.port_reports,
        "retries": c.retries,
        "retries_refused": c.retries_refused,
        "extra_port": core.extra_port(),
        "extra_seen": c.extra_seen,
        "extra_ignored": c.extra_ignored,
        "u2x_sent": c.u2x_sent,
        "forward_requests": c.forward_requests,
        "forward_refused": c.forward_refused,
        "probing": {
            "capable": pc.capable,
            "direct": pc.direct,
            "birthday": pc.birthday,
            "sweeps": pc.sweeps,
            "waited": pc.waited,
            "left": pc.left,
            "ignored": pc.ignored,
        },
        "peers": peers,
    })
}
