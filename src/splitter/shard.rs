//! A splitter shard: one pinned thread, one UDP socket on the splitter port (`SO_REUSEPORT`), one
//! io_uring (or `sendmmsg`) send path, and the DBS state of the teams it owns.
//!
//! Loop: wait for a wake-up (new chunks, a command) or a datagram; for each new chunk in the ring,
//! one destination per team, all sent in batched submissions pointing at the one datagram; then
//! goodbye confirmations, loss-counter timers and membership events.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;

use super::Settings;
use crate::driver::{BatchSender, MultiRecv, RecvPath, SendPath, SendStats, Waker};
use crate::metrics::Kind;
use crate::proto::Endpoint;
use crate::proto::team::{TeamCounters, TeamEvent, TeamId, TeamMember, TeamRules, Teams};
use crate::ring::{ChunkRing, Read};

/// Send lags from 1 µs to 1 min, 2 significant digits (a few KiB).
fn send_lag_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
}

/// What the control plane tells a shard.
#[derive(Debug)]
pub enum Command {
    /// A peer completed its join: add it to a team.
    Insert {
        /// The team.
        team: TeamId,
        /// The peer's UDP endpoint (its TCP source endpoint).
        peer: Endpoint,
        /// Whether it is a monitor.
        monitor: bool,
    },
    /// NTS forwarding fallback: from now on send `to` a forwarded copy of every chunk sent to
    /// `origin` (`proto::nts_forward`).
    Forward {
        /// The member whose chunks are copied.
        origin: Endpoint,
        /// The member that cannot hear from it.
        to: Endpoint,
    },
    /// NTS forwarding fallback: stop [`Command::Forward`].
    Unforward {
        /// The member whose chunks were copied.
        origin: Endpoint,
        /// The member that now hears from it.
        to: Endpoint,
    },
    /// A datagram for one of this shard's peers that arrived at another shard's socket.
    Datagram {
        /// Sender.
        from: Endpoint,
        /// Bytes.
        data: Vec<u8>,
    },
}

/// What a shard tells the control plane.
#[derive(Debug)]
pub enum Report {
    /// A membership change.
    Event(TeamEvent),
    /// A datagram from an endpoint that is not a member here: the control plane forwards it to
    /// the shard that owns the sender, or counts it. These go over their own bounded queue: when
    /// it is full they are dropped and counted ([`ShardMetric::ForeignDropped`]).
    Foreign {
        /// Sender.
        from: Endpoint,
        /// Bytes.
        data: Vec<u8>,
        /// The shard it arrived at.
        shard: usize,
    },
}

/// One per-shard metric as declared in [`SHARD_METRICS`]: everything that shows a shard's
/// numbers (the status line, `/metrics`, the `/status` JSON, [`super::SplitterStats`]) reads them
/// through this table, so a metric is declared once.
#[derive(Debug, Clone, Copy)]
pub struct ShardMetricInfo {
    /// Key in the `/status` JSON, per shard and, if [`Self::summed`], in the totals.
    pub key: &'static str,
    /// Prometheus family name; samples are labelled with the shard.
    pub name: &'static str,
    /// Help text: the doc comment of its [`ShardMetric`] variant (see [`Self::help`]).
    help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Whether `/metrics` also labels it with the send path.
    pub by_path: bool,
    /// Whether the shards' values add up to a total (not so for buffer sizes and lags).
    pub summed: bool,
    /// The field of the teams' [`TeamCounters`] it publishes, if it is one.
    pub team: Option<fn(&mut TeamCounters) -> &mut u64>,
}

impl ShardMetricInfo {
    /// A counter, summed over the shards.
    const fn counter(key: &'static str, name: &'static str) -> ShardMetricInfo {
        ShardMetricInfo {
            key,
            name,
            help: "",
            kind: Kind::Counter,
            by_path: false,
            summed: true,
            team: None,
        }
    }

    /// A gauge whose values add up over the shards (peers, teams).
    const fn gauge(key: &'static str, name: &'static str) -> ShardMetricInfo {
        ShardMetricInfo {
            kind: Kind::Gauge,
            ..ShardMetricInfo::counter(key, name)
        }
    }

    /// A gauge that only makes sense per shard (a buffer size, a lag).
    const fn level(key: &'static str, name: &'static str) -> ShardMetricInfo {
        ShardMetricInfo {
            summed: false,
            ..ShardMetricInfo::gauge(key, name)
        }
    }

    /// Labelled with the send path too.
    const fn by_path(self) -> ShardMetricInfo {
        ShardMetricInfo {
            by_path: true,
            ..self
        }
    }

    /// Published from this field of the teams' [`TeamCounters`].
    const fn team(self, field: fn(&mut TeamCounters) -> &mut u64) -> ShardMetricInfo {
        ShardMetricInfo {
            team: Some(field),
            ..self
        }
    }

    /// The help text.
    pub fn help(&self) -> &'static str {
        self.help.trim()
    }
}

/// Declares the per-shard metrics: each line's doc comment is its help text, then its variant of
/// [`ShardMetric`] and its [`ShardMetricInfo`].
macro_rules! shard_metrics {
    ($( #[doc = $help:literal] $variant:ident = $info:expr; )*) => {
        /// A per-shard metric: an index into [`SHARD_METRICS`] and into a [`ShardStats`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ShardMetric {
            $( #[doc = $help] $variant, )*
        }

        impl ShardMetric {
            /// Every per-shard metric, in the order of [`SHARD_METRICS`].
            pub const ALL: &'static [ShardMetric] = &[$(ShardMetric::$variant),*];

            /// Its declaration.
            pub fn info(self) -> &'static ShardMetricInfo {
                &SHARD_METRICS[self as usize]
            }
        }

        /// The per-shard metrics, one entry per [`ShardMetric`] in the same order.
        pub const SHARD_METRICS: &[ShardMetricInfo] = &[
            $( ShardMetricInfo { help: $help, ..$info }, )*
        ];
    };
}

shard_metrics! {
    /// Datagrams handed to the kernel, by shard and send path.
    Datagrams = ShardMetricInfo::counter("datagrams_sent", "p2psp_splitter_datagrams_sent_total").by_path();
    /// UDP payload bytes handed to the kernel, by shard and send path.
    Bytes = ShardMetricInfo::counter("bytes_sent", "p2psp_splitter_bytes_sent_total").by_path();
    /// Send system calls (io_uring_enter or sendmmsg), by shard and send path.
    Submissions = ShardMetricInfo::counter("submissions", "p2psp_splitter_send_submissions_total").by_path();
    /// Chunks a shard took from the ring and scheduled to its teams.
    Chunks = ShardMetricInfo::counter("chunks", "p2psp_splitter_chunks_out_total");
    /// Chunks sent to the IMS multicast group (`--ims`): one datagram per chunk, whatever the number of peers.
    ImsChunks = ShardMetricInfo::counter("ims_chunks", "p2psp_splitter_ims_group_chunks_total");
    /// Chunks a shard skipped because it fell a whole ring behind.
    RingMissed = ShardMetricInfo::counter("ring_missed", "p2psp_splitter_ring_missed_chunks_total");
    /// Sends that found the socket buffer full (EAGAIN) and were retried.
    Eagain = ShardMetricInfo::counter("eagain", "p2psp_splitter_send_eagain_total");
    /// Sends that failed with ENOBUFS.
    Enobufs = ShardMetricInfo::counter("enobufs", "p2psp_splitter_send_enobufs_total");
    /// Datagrams given up after send errors.
    SendDropped = ShardMetricInfo::counter("send_dropped", "p2psp_splitter_send_dropped_total");
    /// Datagrams received from peers.
    Received = ShardMetricInfo::counter("datagrams_received", "p2psp_splitter_datagrams_received_total");
    /// Datagrams longer than the receive buffer (2048 bytes; nothing valid is longer than 2), dropped by the receive path.
    Truncated = ShardMetricInfo::counter("truncated", "p2psp_splitter_truncated_datagrams_total");
    /// Datagrams from non-members dropped because the shard's queue to the control plane was full.
    ForeignDropped = ShardMetricInfo::counter("foreign_dropped", "p2psp_splitter_foreign_dropped_total");
    /// Loss reports received from monitors.
    LossReports = ShardMetricInfo::counter("loss_reports", "p2psp_splitter_loss_reports_total").team(|c| &mut c.loss_reports);
    /// Loss reports from endpoints that are not monitors of any team here (ignored).
    StrayLossReports = ShardMetricInfo::counter("stray_loss_reports", "p2psp_splitter_stray_loss_reports_total").team(|c| &mut c.stray_loss_reports);
    /// Loss reports for a chunk whose destination is no longer remembered (ignored).
    UnattributedLossReports = ShardMetricInfo::counter("unattributed_loss_reports", "p2psp_splitter_unattributed_loss_reports_total").team(|c| &mut c.unattributed_loss_reports);
    /// Loss reports from monitors for a chunk already blamed (a retry, or another monitor).
    RepeatedLossReports = ShardMetricInfo::counter("repeated_loss_reports", "p2psp_splitter_repeated_loss_reports_total").team(|c| &mut c.repeated_loss_reports);
    /// Loss reports from plain peers under LRS, asking for a chunk for themselves.
    LossRequests = ShardMetricInfo::counter("loss_requests", "p2psp_splitter_lrs_requests_total").team(|c| &mut c.loss_requests);
    /// Resends queued (LRS).
    Resends = ShardMetricInfo::counter("resends", "p2psp_splitter_lrs_resends_queued_total").team(|c| &mut c.resends);
    /// NTS forwarding fallback: forwarded copies of chunks sent to members that cannot hear from the chunk's origin.
    Forwarded = ShardMetricInfo::counter("forwarded", "p2psp_splitter_forwarded_chunks_total");
    /// Resends refused because the member had used up its budget (LRS).
    ResendsRefused = ShardMetricInfo::counter("resends_refused", "p2psp_splitter_lrs_resends_refused_total").team(|c| &mut c.resends_refused);
    /// Chunks resent to monitors that reported them lost (LRS).
    Resent = ShardMetricInfo::counter("lrs_resent", "p2psp_splitter_lrs_resent_total");
    /// Goodbyes received from members.
    Goodbyes = ShardMetricInfo::counter("goodbyes", "p2psp_splitter_goodbyes_total").team(|c| &mut c.goodbyes);
    /// Goodbyes from endpoints that are not members (ignored).
    StrayGoodbyes = ShardMetricInfo::counter("stray_goodbyes", "p2psp_splitter_stray_goodbyes_total").team(|c| &mut c.stray_goodbyes);
    /// Goodbyes from peers that left recently, confirmed again (the first confirmation may have been lost).
    RepeatedGoodbyes = ShardMetricInfo::counter("repeated_goodbyes", "p2psp_splitter_repeated_goodbyes_total").team(|c| &mut c.repeated_goodbyes);
    /// Peers removed after their goodbye.
    Left = ShardMetricInfo::counter("left", "p2psp_splitter_left_total").team(|c| &mut c.left);
    /// Peers expelled for losses.
    Expelled = ShardMetricInfo::counter("expelled", "p2psp_splitter_expelled_total").team(|c| &mut c.expelled);
    /// Complaints about polluters from members of signed teams (CIS, docs/integrity.md).
    Complaints = ShardMetricInfo::counter("complaints", "p2psp_splitter_complaints_total");
    /// Complaints ignored: from non-members, or about non-members, monitors, other teams' peers or the complainer itself.
    StrayComplaints = ShardMetricInfo::counter("stray_complaints", "p2psp_splitter_stray_complaints_total");
    /// Peers expelled as polluters, on a trusted complaint or a majority of their teammates.
    PollutersExpelled = ShardMetricInfo::counter("polluters_expelled", "p2psp_splitter_polluters_expelled_total");
    /// Digest mode: digests sent ahead of a group's first chunks (one or two members per team).
    DigestsSent = ShardMetricInfo::counter("digests_sent", "p2psp_splitter_digests_sent_total");
    /// Digest mode: digests sent to members that asked for them.
    DigestsResent = ShardMetricInfo::counter("digests_resent", "p2psp_splitter_digests_resent_total");
    /// Digest mode: digest requests refused (the member's resend budget was used up).
    DigestRequestsRefused = ShardMetricInfo::counter("digest_requests_refused", "p2psp_splitter_digest_requests_refused_total");
    /// Datagrams from members that are neither a goodbye nor a loss report.
    Malformed = ShardMetricInfo::counter("malformed", "p2psp_splitter_malformed_datagrams_total").team(|c| &mut c.malformed);
    /// Datagrams ignored: from strangers or non-monitors, or malformed.
    Ignored = ShardMetricInfo::counter("ignored", "p2psp_splitter_ignored_datagrams_total");
    /// Peers a shard serves.
    Peers = ShardMetricInfo::gauge("peers", "p2psp_splitter_shard_peers");
    /// Teams a shard owns.
    Teams = ShardMetricInfo::gauge("teams", "p2psp_splitter_shard_teams");
    /// UDP send buffer the kernel granted a shard's socket.
    SendBuffer = ShardMetricInfo::level("socket_send_buffer", "p2psp_splitter_socket_send_buffer_bytes");
    /// UDP receive buffer the kernel granted a shard's socket.
    RecvBuffer = ShardMetricInfo::level("socket_receive_buffer", "p2psp_splitter_socket_receive_buffer_bytes");
    /// 99th percentile over the last second of the time from a chunk's arrival to a shard's last send of it.
    SendLagP99 = ShardMetricInfo::level("send_lag_p99_us", "p2psp_splitter_send_lag_p99_microseconds");
    /// Largest time over the last second from a chunk's arrival to a shard's last send of it.
    SendLagMax = ShardMetricInfo::level("send_lag_max_us", "p2psp_splitter_send_lag_max_microseconds");
}

/// Number of per-shard metrics.
pub const SHARD_METRIC_COUNT: usize = ShardMetric::ALL.len();

/// A shard's metrics, one relaxed atomic per [`ShardMetric`], and the snapshot of its teams.
#[derive(Debug)]
pub struct ShardStats {
    values: [AtomicU64; SHARD_METRIC_COUNT],
    /// The shard's teams with their members and loss counters, published once a second.
    detail: Mutex<Arc<Vec<TeamSnapshot>>>,
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            detail: Mutex::default(),
        }
    }
}

impl ShardStats {
    /// The current value of `m`.
    pub fn get(&self, m: ShardMetric) -> u64 {
        self.values[m as usize].load(Ordering::Relaxed)
    }

    /// Sets `m`.
    pub fn set(&self, m: ShardMetric, value: u64) {
        self.values[m as usize].store(value, Ordering::Relaxed);
    }

    /// Adds to `m`.
    pub fn add(&self, m: ShardMetric, n: u64) {
        self.values[m as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Publishes the teams' protocol counters (the metrics declared with a [`TeamCounters`]
    /// field).
    pub fn set_team(&self, c: &TeamCounters) {
        let mut c = *c;
        for (&m, info) in ShardMetric::ALL.iter().zip(SHARD_METRICS) {
            if let Some(field) = info.team {
                self.set(m, *field(&mut c));
            }
        }
    }

    /// The last published snapshot of the shard's teams (shared, not copied: status pages read
    /// it while the shard publishes the next).
    pub fn snapshot(&self) -> Arc<Vec<TeamSnapshot>> {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes a snapshot of the shard's teams.
    pub fn publish_teams(&self, teams: Vec<TeamSnapshot>) {
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(teams);
    }
}

/// The teams' protocol counters read back from metrics: `get` gives a metric's value (one
/// shard's, or a sum over shards).
pub fn team_counters(get: impl Fn(ShardMetric) -> u64) -> TeamCounters {
    let mut c = TeamCounters::default();
    for (&m, info) in ShardMetric::ALL.iter().zip(SHARD_METRICS) {
        if let Some(field) = info.team {
            *field(&mut c) = get(m);
        }
    }
    c
}

/// One team as its shard sees it.
#[derive(Debug, Clone)]
pub struct TeamSnapshot {
    /// Team id.
    pub id: TeamId,
    /// Members in round-robin order.
    pub members: Vec<TeamMember>,
    /// NTS forwarding fallback: members that get forwarded chunks, and how many so far.
    pub forwarded: Vec<(Endpoint, u64)>,
}

/// Reads back the socket buffers the kernel granted a shard's socket, publishes them, and warns
/// (once, for shard 0) when they are smaller than asked: bursts to many peers then overflow the
/// send buffer (EAGAIN) or loss reports and goodbyes are dropped.
pub fn check_socket_buffers(socket: &UdpSocket, wanted: usize, shard: usize, stats: &ShardStats) {
    let s = socket2::SockRef::from(socket);
    // Linux reports twice the size asked for (the doubling covers its bookkeeping).
    let send = s.send_buffer_size().unwrap_or(0) / 2;
    let recv = s.recv_buffer_size().unwrap_or(0) / 2;
    stats.set(ShardMetric::SendBuffer, send as u64);
    stats.set(ShardMetric::RecvBuffer, recv as u64);
    if shard == 0 && (send < wanted || recv < wanted) {
        tracing::warn!(
            "UDP socket buffers are {send} bytes (send) and {recv} bytes (receive), not the {wanted} asked: raise net.core.wmem_max and net.core.rmem_max (see docs/operations.md) or run with CAP_NET_ADMIN"
        );
    }
}

/// CIS digest mode: whether the group's digest `digest` goes with chunk `number` (ahead of it,
/// to its destination, which relays it to its team). One chunk of the group, picked by a hash of
/// the group's number so that the relaying member changes from group to group whatever the group
/// and team sizes (a polluter that drops digests gets the job one group in N); and the chunk
/// after it too when the group has 6 chunks or more and teams have teammates (two copies reach
/// every peer then, for at most 56 bytes per chunk; see docs/integrity.md).
fn digest_goes_with(digest: &[u8], number: u16, team_size: usize) -> bool {
    match crate::proto::digest::Digest::parse(digest) {
        Some(d) => {
            let count = d.count() as u32;
            let i = u32::from(number.wrapping_sub(d.first as u16));
            let first = (d.first.wrapping_mul(0x9e37_79b9) >> 16) % count;
            i == first || (count >= 6 && team_size > 2 && i == (first + 1) % count)
        }
        None => false,
    }
}

/// Capacity of the queues between a shard and the control plane for datagrams (each way).
pub const DATAGRAM_QUEUE: usize = 1024;

/// One shard, ready to run on its own thread.
pub struct Shard {
    index: usize,
    socket: UdpSocket,
    sender: BatchSender,
    recv: MultiRecv,
    teams: Teams,
    ring: Arc<ChunkRing>,
    commands: Receiver<Command>,
    datagrams: Receiver<Command>,
    reports: Sender<Report>,
    foreign: Sender<Report>,
    stats: Arc<ShardStats>,
    send_stats: SendStats,
    /// When the team snapshot is published next.
    detail_due: Instant,
    /// Send lag of each chunk sent since the last publish, in microseconds.
    send_lag: Histogram<u64>,
    /// NTS: datagrams of NTS sizes go to the control plane, members' too.
    nts: bool,
    /// Digest mode: digests sent (ahead of chunks, and on request).
    digests_sent: u64,
    /// Most peers per team.
    team_size: usize,
    digests_resent: u64,
    /// IMS: every chunk goes once to this multicast group instead of to the teams.
    ims: Option<Endpoint>,
    /// NTS forwarding fallback: whose chunks go, forwarded, to whom.
    forwards: crate::proto::nts_forward::ForwardTable,
    /// A forwarded copy being built.
    forward_buf: Vec<u8>,
}

/// The queues a shard reads and writes.
pub struct ShardQueues {
    /// Joins from the control plane.
    pub commands: Receiver<Command>,
    /// Datagrams for this shard's peers that arrived at other shards.
    pub datagrams: Receiver<Command>,
    /// Membership events to the control plane.
    pub reports: Sender<Report>,
    /// Datagrams from endpoints this shard does not own, to the control plane (bounded).
    pub foreign: Sender<Report>,
}

impl Shard {
    /// Sets up a shard on `socket` (bound to the splitter port with `SO_REUSEPORT`).
    pub fn new(
        index: usize,
        settings: &Settings,
        socket: UdpSocket,
        ring: Arc<ChunkRing>,
        waker: Waker,
        queues: ShardQueues,
        stats: Arc<ShardStats>,
    ) -> anyhow::Result<Shard> {
        let fd = socket.as_raw_fd();
        let sender = BatchSender::new(fd, settings.send_path, 256)?;
        let recv_path = match settings.send_path {
            SendPath::Uring => RecvPath::Uring,
            SendPath::Sendmmsg => RecvPath::Poll,
        };
        let mut recv = MultiRecv::new(recv_path, 256, 2048)?;
        recv.add_socket(fd, 0)?;
        recv.set_waker(&waker)?;
        let rules = TeamRules {
            buffer_size: settings.buffer_size,
            expulsion: settings.expulsion,
            lrs: settings.lrs,
            acs: settings.acs,
            complaints: settings.signer.is_some(),
            ..TeamRules::default()
        };
        let mut teams = Teams::new(rules);
        teams.set_trusted(settings.trusted.iter().copied());
        Ok(Shard {
            index,
            socket,
            sender,
            recv,
            teams,
            ring,
            commands: queues.commands,
            datagrams: queues.datagrams,
            reports: queues.reports,
            foreign: queues.foreign,
            stats,
            send_stats: SendStats::default(),
            detail_due: Instant::now(),
            send_lag: send_lag_histogram(),
            nts: settings.nts,
            digests_sent: 0,
            digests_resent: 0,
            team_size: settings.team_size,
            ims: settings.ims.map(|i| i.group),
            forwards: Default::default(),
            forward_buf: Vec::new(),
        })
    }

    /// Runs until `stop`; then says goodbye to every peer it owns.
    pub fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut cursor = self.ring.head();
        // The last chunk read (sequence, number): chunk numbers follow sequence numbers, so a
        // chunk number maps back to its place in the ring for LRS resends.
        let mut last: Option<(u64, u16)> = None;
        let mut dests: Vec<Endpoint> = Vec::with_capacity(1024);
        let mut inbox: Vec<(Endpoint, Vec<u8>)> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let timeout = match self.teams.poll_timeout() {
                Some(t) => t
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            self.recv
                .poll(1, timeout, |_, d| inbox.push((d.from, d.data.to_vec())))?;
            self.stats.add(ShardMetric::Received, inbox.len() as u64);
            for (from, data) in inbox.drain(..) {
                self.on_datagram(from, data);
            }
            // Joins first, so that a datagram forwarded for a new member finds it.
            while let Ok(cmd) = self.commands.try_recv() {
                self.on_command(cmd);
            }
            while let Ok(cmd) = self.datagrams.try_recv() {
                self.on_command(cmd);
            }
            // Every new chunk: one destination per team, one batched send.
            loop {
                match self.ring.read(cursor) {
                    Read::NotYet => break,
                    Read::Overrun { resume, missed } => {
                        self.stats.add(ShardMetric::RingMissed, missed);
                        cursor = resume;
                    }
                    Read::Chunk(chunk) => {
                        cursor += 1;
                        last = Some((chunk.seq, chunk.number));
                        self.stats.add(ShardMetric::Chunks, 1);
                        dests.clear();
                        self.teams.on_chunk(chunk.number, &mut dests);
                        if let Some(group) = self.ims {
                            // IMS: the teams only count members (their rounds still pace
                            // goodbyes); the chunk goes once to the group.
                            dests.clear();
                            dests.push(group);
                            self.stats.add(ShardMetric::ImsChunks, 1);
                        }
                        if !dests.is_empty() {
                            // CIS digest mode: the group's digest goes ahead of its first
                            // chunks, to their destinations, which relay it to their teams.
                            if let Some(d) = &chunk.digest
                                && digest_goes_with(d, chunk.number, self.team_size)
                            {
                                self.sender.send_to_all(d, &dests, &mut self.send_stats);
                                self.digests_sent += dests.len() as u64;
                            }
                            self.sender
                                .send_to_all(&chunk.datagram, &dests, &mut self.send_stats);
                            let lag = chunk.published.elapsed().as_micros() as u64;
                            self.send_lag.saturating_record(lag.max(1));
                            if !self.forwards.is_empty() {
                                self.forward(&chunk.datagram, &dests);
                            }
                        }
                        self.flush_control();
                        // Keep the counters, the send lag and the team snapshot current while
                        // catching up on a long run of chunks (publish_detail: once a second).
                        if cursor % 32 == 0 {
                            self.publish_stats();
                            self.publish_detail();
                        }
                    }
                }
            }
            self.teams.handle_timeout(Instant::now());
            self.resend(last);
            self.flush_control();
            self.publish_stats();
            self.publish_detail();
        }
        // Shutting down: tell every peer.
        let all: Vec<Endpoint> = self
            .teams
            .team_ids()
            .into_iter()
            .flat_map(|t| self.teams.members(t).into_iter().map(|m| m.endpoint))
            .collect();
        self.sender
            .send_to_all(crate::proto::wire::GOODBYE, &all, &mut self.send_stats);
        self.publish_stats();
        drop(self.socket);
        Ok(())
    }

    /// NTS forwarding fallback: a forwarded copy of `datagram` to every member that cannot hear
    /// from one of `origins`.
    fn forward(&mut self, datagram: &[u8], origins: &[Endpoint]) {
        let mut to: Vec<Endpoint> = Vec::new();
        for &o in origins {
            for &t in self.forwards.targets(o) {
                if self.teams.contains(t) {
                    to.push(t);
                }
            }
        }
        if to.is_empty() {
            return;
        }
        crate::proto::nts_forward::encode_forwarded(datagram, &mut self.forward_buf);
        self.sender
            .send_to_all(&self.forward_buf, &to, &mut self.send_stats);
        for t in &to {
            self.forwards.count(*t);
        }
        self.stats.add(ShardMetric::Forwarded, to.len() as u64);
    }

    /// LRS: resends reported chunks (still in the ring) to the members that reported them; digest
    /// mode: sends asked-for digests.
    fn resend(&mut self, last: Option<(u64, u16)>) {
        while let Some((number, to)) = self.teams.poll_digest_request() {
            let Some((seq, newest)) = last else { continue };
            let back = crate::proto::seq::diff(newest, number);
            if back < 0 || back as u64 > seq {
                continue;
            }
            if let Read::Chunk(c) = self.ring.read(seq - back as u64)
                && c.number == number
                && let Some(d) = &c.digest
            {
                self.sender.send_to_all(d, &[to], &mut self.send_stats);
                self.digests_resent += 1;
            }
        }
        while let Some((number, to)) = self.teams.poll_resend() {
            let Some((seq, newest)) = last else { continue };
            let back = crate::proto::seq::diff(newest, number);
            if back < 0 || back as u64 > seq {
                continue;
            }
            if let Read::Chunk(c) = self.ring.read(seq - back as u64)
                && c.number == number
            {
                self.sender
                    .send_to_all(&c.datagram, &[to], &mut self.send_stats);
                self.stats.add(ShardMetric::Resent, 1);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Insert {
                team,
                peer,
                monitor,
            } => self.teams.insert(team, peer, monitor),
            Command::Datagram { from, data } => self.teams.handle_datagram(from, &data),
            // The origin may not be inserted yet (a new member's chunks are forwarded from its
            // first on); copies only ever go to members.
            Command::Forward { origin, to } => {
                if self.teams.contains(to) {
                    self.forwards.add(origin, to);
                }
            }
            Command::Unforward { origin, to } => self.forwards.remove_pair(origin, to),
        }
    }

    fn on_datagram(&mut self, from: Endpoint, data: Vec<u8>) {
        let nts = self.nts
            && (crate::proto::nts_splitter::is_nts_size(data.len())
                || crate::proto::nts_probe::is_probe_size(data.len()));
        if !nts && self.teams.contains(from) {
            self.teams.handle_datagram(from, &data);
        } else {
            let report = Report::Foreign {
                from,
                data,
                shard: self.index,
            };
            if self.foreign.try_send(report).is_err() {
                self.stats.add(ShardMetric::ForeignDropped, 1);
            }
        }
    }

    /// Sends goodbye confirmations and reports membership changes.
    fn flush_control(&mut self) {
        let mut control: Vec<(Endpoint, &[u8])> = Vec::new();
        while let Some(t) = self.teams.poll_transmit() {
            control.push(t);
        }
        if !control.is_empty() {
            self.sender.send_each(&control, &mut self.send_stats);
        }
        while let Some(e) = self.teams.poll_event() {
            let (TeamEvent::Left { peer, .. }
            | TeamEvent::Expelled { peer, .. }
            | TeamEvent::Polluter { peer, .. }) = e;
            self.forwards.remove_peer(peer);
            let _ = self.reports.send(Report::Event(e));
        }
    }

    /// Publishes the team snapshot for status pages and the last second's send lag, at most once
    /// a second.
    fn publish_detail(&mut self) {
        let now = Instant::now();
        if now < self.detail_due {
            return;
        }
        self.detail_due = now + Duration::from_secs(1);
        let (p99, max) = if self.send_lag.is_empty() {
            (0, 0)
        } else {
            (self.send_lag.value_at_quantile(0.99), self.send_lag.max())
        };
        self.stats.set(ShardMetric::SendLagP99, p99);
        self.stats.set(ShardMetric::SendLagMax, max);
        self.send_lag.reset();
        let teams = self
            .teams
            .team_ids()
            .into_iter()
            .map(|id| {
                let members = self.teams.members(id);
                let forwarded = members
                    .iter()
                    .filter_map(|m| Some((m.endpoint, self.forwards.forwarded(m.endpoint)?)))
                    .collect();
                TeamSnapshot {
                    id,
                    members,
                    forwarded,
                }
            })
            .collect();
        self.stats.publish_teams(teams);
    }

    fn publish_stats(&self) {
        use ShardMetric as M;
        let s = &self.stats;
        let t = &self.send_stats;
        let c = self.teams.counters();
        s.set(M::Datagrams, t.datagrams);
        s.set(M::Bytes, t.bytes);
        s.set(M::Submissions, t.submissions);
        s.set(M::Eagain, t.eagain);
        s.set(M::Enobufs, t.enobufs);
        s.set(M::SendDropped, t.dropped);
        s.set(M::Teams, self.teams.team_count() as u64);
        s.set(M::Peers, self.teams.peer_count() as u64);
        s.set_team(c);
        let cis = self.teams.cis_counters();
        s.set(M::Complaints, cis.complaints);
        s.set(M::StrayComplaints, cis.stray_complaints);
        s.set(M::PollutersExpelled, cis.polluters_expelled);
        s.set(M::DigestRequestsRefused, cis.digest_requests_refused);
        s.set(M::DigestsSent, self.digests_sent);
        s.set(M::DigestsResent, self.digests_resent);
        s.set(
            M::Ignored,
            c.stray_goodbyes + c.stray_loss_reports + c.unattributed_loss_reports + c.malformed,
        );
        s.set(M::Truncated, self.recv.stats().truncated);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_team_counter_is_a_shard_metric() {
        // Naming every field: a new one fails to compile here until it has a metric.
        let c = TeamCounters {
            goodbyes: 1,
            stray_goodbyes: 2,
            repeated_goodbyes: 3,
            loss_reports: 4,
            stray_loss_reports: 5,
            unattributed_loss_reports: 6,
            repeated_loss_reports: 7,
            loss_requests: 8,
            resends: 9,
            resends_refused: 10,
            malformed: 11,
            left: 12,
            expelled: 13,
        };
        let s = ShardStats::default();
        s.set_team(&c);
        assert_eq!(team_counters(|m| s.get(m)), c);
        assert_eq!(s.get(ShardMetric::ResendsRefused), 10);
        assert_eq!(s.get(ShardMetric::Datagrams), 0);
    }
}
