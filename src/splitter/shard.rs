//! A splitter shard: one pinned thread, one UDP socket on the splitter port (`SO_REUSEPORT`), one
//! io_uring (or `sendmmsg`) send path, and the DBS state of the teams it owns.
//!
//! Loop: wait for a wake-up (new chunks, a command) or a datagram; for each new chunk in the ring,
//! one destination per team, all sent in batched submissions pointing at the one datagram; then
//! goodbye confirmations, loss-counter timers and membership events.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;

use super::Settings;
use crate::driver::{BatchSender, MultiRecv, RecvPath, SendPath, SendStats, Waker};
use crate::proto::Endpoint;
use crate::proto::team::{TeamCounters, TeamEvent, TeamId, TeamRules, Teams};
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
    /// it is full they are dropped and counted ([`ShardStats::foreign_dropped`]).
    Foreign {
        /// Sender.
        from: Endpoint,
        /// Bytes.
        data: Vec<u8>,
        /// The shard it arrived at.
        shard: usize,
    },
}

/// A shard's counters, published for the status line (relaxed atomics).
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Chunks taken from the ring.
    pub chunks: AtomicU64,
    /// Chunks skipped because this shard fell a whole ring behind.
    pub ring_missed: AtomicU64,
    /// Datagrams handed to the kernel.
    pub datagrams: AtomicU64,
    /// Bytes handed to the kernel.
    pub bytes: AtomicU64,
    /// Send submissions (io_uring_enter or sendmmsg calls).
    pub submissions: AtomicU64,
    /// EAGAIN results (retried after waiting for room).
    pub eagain: AtomicU64,
    /// ENOBUFS results.
    pub enobufs: AtomicU64,
    /// Datagrams given up after errors.
    pub send_dropped: AtomicU64,
    /// Datagrams received on this shard's socket.
    pub received: AtomicU64,
    /// Teams owned.
    pub teams: AtomicU64,
    /// Peers owned.
    pub peers: AtomicU64,
    /// Loss reports from monitors.
    pub loss_reports: AtomicU64,
    /// Goodbyes from members.
    pub goodbyes: AtomicU64,
    /// Peers expelled for losses.
    pub expelled: AtomicU64,
    /// Chunks resent to monitors (LRS).
    pub resent: AtomicU64,
    /// Ignored datagrams: goodbyes and loss reports from strangers or non-monitors, malformed.
    pub ignored: AtomicU64,
    /// Datagrams longer than the receive buffer (2048 bytes; nothing valid is longer than 2):
    /// dropped by the receive path.
    pub truncated: AtomicU64,
    /// Datagrams from non-members dropped because the queue to the control plane was full.
    pub foreign_dropped: AtomicU64,
    /// Loss requests from plain peers (LRS), resends refused for a used-up budget.
    pub loss_requests: AtomicU64,
    /// Resends refused because the member had used up its budget.
    pub resends_refused: AtomicU64,
    /// Everything the teams' protocol core counted, as of the last loop.
    pub team: std::sync::Mutex<TeamCounters>,
    /// The shard's teams with their members and loss counters, published once a second.
    pub detail: std::sync::Mutex<Vec<super::status::TeamSnapshot>>,
    /// The UDP socket's send buffer as the kernel granted it, in bytes.
    pub send_buffer: AtomicU64,
    /// The UDP socket's receive buffer as the kernel granted it, in bytes.
    pub recv_buffer: AtomicU64,
    /// Send lag over the last whole second, in microseconds: from the feed's publishing a chunk
    /// to this shard's handing its last datagram to the kernel. 99th percentile...
    pub send_lag_p99_us: AtomicU64,
    /// ...and the largest.
    pub send_lag_max_us: AtomicU64,
}

impl ShardStats {
    /// The last published snapshot of the shard's teams.
    pub fn snapshot(&self) -> Vec<super::status::TeamSnapshot> {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
            max_losses: settings.max_losses,
            lrs: settings.lrs,
            acs: settings.acs,
            ..TeamRules::default()
        };
        Ok(Shard {
            index,
            socket,
            sender,
            recv,
            teams: Teams::new(rules),
            ring,
            commands: queues.commands,
            datagrams: queues.datagrams,
            reports: queues.reports,
            foreign: queues.foreign,
            stats,
            send_stats: SendStats::default(),
            detail_due: Instant::now(),
            send_lag: send_lag_histogram(),
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
            self.stats
                .received
                .fetch_add(inbox.len() as u64, Ordering::Relaxed);
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
                        self.stats.ring_missed.fetch_add(missed, Ordering::Relaxed);
                        cursor = resume;
                    }
                    Read::Chunk(chunk) => {
                        cursor += 1;
                        last = Some((chunk.seq, chunk.number));
                        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
                        dests.clear();
                        self.teams.on_chunk(chunk.number, &mut dests);
                        if !dests.is_empty() {
                            self.sender
                                .send_to_all(&chunk.datagram, &dests, &mut self.send_stats);
                            let lag = chunk.published.elapsed().as_micros() as u64;
                            self.send_lag.saturating_record(lag.max(1));
                        }
                        self.flush_control();
                        // Keep the counters current while catching up on a long run of chunks.
                        if cursor % 32 == 0 {
                            self.publish_stats();
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

    /// LRS: resends reported chunks (still in the ring) to the members that reported them.
    fn resend(&mut self, last: Option<(u64, u16)>) {
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
                self.stats.resent.fetch_add(1, Ordering::Relaxed);
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
        }
    }

    fn on_datagram(&mut self, from: Endpoint, data: Vec<u8>) {
        if self.teams.contains(from) {
            self.teams.handle_datagram(from, &data);
        } else {
            let report = Report::Foreign {
                from,
                data,
                shard: self.index,
            };
            if self.foreign.try_send(report).is_err() {
                self.stats.foreign_dropped.fetch_add(1, Ordering::Relaxed);
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
        self.stats.send_lag_p99_us.store(p99, Ordering::Relaxed);
        self.stats.send_lag_max_us.store(max, Ordering::Relaxed);
        self.send_lag.reset();
        let teams = self
            .teams
            .team_ids()
            .into_iter()
            .map(|id| super::status::TeamSnapshot {
                id,
                members: self.teams.members(id),
            })
            .collect();
        *self.stats.detail.lock().unwrap_or_else(|e| e.into_inner()) = teams;
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let t = &self.send_stats;
        let c = self.teams.counters();
        s.datagrams.store(t.datagrams, Ordering::Relaxed);
        s.bytes.store(t.bytes, Ordering::Relaxed);
        s.submissions.store(t.submissions, Ordering::Relaxed);
        s.eagain.store(t.eagain, Ordering::Relaxed);
        s.enobufs.store(t.enobufs, Ordering::Relaxed);
        s.send_dropped.store(t.dropped, Ordering::Relaxed);
        s.teams
            .store(self.teams.team_count() as u64, Ordering::Relaxed);
        s.peers
            .store(self.teams.peer_count() as u64, Ordering::Relaxed);
        s.loss_reports.store(c.loss_reports, Ordering::Relaxed);
        s.goodbyes.store(c.goodbyes, Ordering::Relaxed);
        s.expelled.store(c.expelled, Ordering::Relaxed);
        s.ignored.store(
            c.stray_goodbyes + c.stray_loss_reports + c.unattributed_loss_reports + c.malformed,
            Ordering::Relaxed,
        );
        s.truncated
            .store(self.recv.stats().truncated, Ordering::Relaxed);
        s.loss_requests.store(c.loss_requests, Ordering::Relaxed);
        s.resends_refused
            .store(c.resends_refused, Ordering::Relaxed);
        *s.team.lock().unwrap_or_else(|e| e.into_inner()) = *c;
    }
}
