//! What the splitter shows an operator: the `--metrics` exporter (Prometheus text and the
//! `/status` JSON) over the counters the feed, the shards and the control plane publish.
//!
//! Nothing here is on the data path. Shards publish relaxed atomics as they go and a snapshot of
//! their teams once a second; the control plane publishes its counters and the rates it computes
//! for the status line once a second ([`Board`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use super::Settings;
use super::feed::{FeedStats, HeaderCell};
use super::shard::ShardStats;
use crate::metrics::{Exporter, Prom};
use crate::proto::team::{TeamId, TeamMember};

/// Reads back the socket buffers the kernel granted a shard's socket, publishes them, and warns
/// (once, for shard 0) when they are smaller than asked: bursts to many peers then overflow the
/// send buffer (EAGAIN) or loss reports and goodbyes are dropped.
pub fn check_socket_buffers(
    socket: &std::net::UdpSocket,
    wanted: usize,
    shard: usize,
    stats: &ShardStats,
) {
    let s = socket2::SockRef::from(socket);
    // Linux reports twice the size asked for (the doubling covers its bookkeeping).
    let send = s.send_buffer_size().unwrap_or(0) / 2;
    let recv = s.recv_buffer_size().unwrap_or(0) / 2;
    stats.send_buffer.store(send as u64, Ordering::Relaxed);
    stats.recv_buffer.store(recv as u64, Ordering::Relaxed);
    if shard == 0 && (send < wanted || recv < wanted) {
        tracing::warn!(
            "UDP socket buffers are {send} bytes (send) and {recv} bytes (receive), not the {wanted} asked: raise net.core.wmem_max and net.core.rmem_max (see docs/operations.md) or run with CAP_NET_ADMIN"
        );
    }
}

/// One team as its shard sees it.
#[derive(Debug, Clone)]
pub struct TeamSnapshot {
    /// Team id.
    pub id: TeamId,
    /// Members in round-robin order.
    pub members: Vec<TeamMember>,
}

/// Rates over the last second, as on the status line.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rates {
    /// Chunks read from the source per second.
    pub chunks_in_per_second: f64,
    /// Stream bits read from the source per second.
    pub bits_in_per_second: f64,
    /// Datagrams sent per second.
    pub datagrams_out_per_second: f64,
    /// Bits sent per second (UDP payload).
    pub bits_out_per_second: f64,
    /// Loss reports received per second.
    pub loss_reports_per_second: f64,
}

/// The control plane's counters.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ControlCounters {
    /// Joins completed.
    pub joins: u64,
    /// Connections refused (too many pending, not IPv4).
    pub refused: u64,
    /// Connections that took too long.
    pub timeouts: u64,
    /// Connections that did not speak the protocol.
    pub bad_requests: u64,
    /// Stream header requests answered.
    pub header_requests: u64,
    /// Datagrams from endpoints that are no member anywhere.
    pub foreign_datagrams: u64,
}

/// What the control plane publishes once a second.
#[derive(Debug, Default)]
pub struct Board {
    state: Mutex<(ControlCounters, Rates)>,
}

impl Board {
    /// Publishes the control plane's counters and the last second's rates.
    pub fn publish(&self, counters: ControlCounters, rates: Rates) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (counters, rates);
    }

    fn get(&self) -> (ControlCounters, Rates) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The splitter's `--metrics` exporter.
pub struct SplitterExporter {
    settings: Settings,
    listen: String,
    started: Instant,
    feed: Arc<FeedStats>,
    header: Arc<HeaderCell>,
    shards: Vec<Arc<ShardStats>>,
    board: Arc<Board>,
}

impl SplitterExporter {
    /// An exporter over the splitter's shared counters.
    pub fn new(
        settings: &Settings,
        port: u16,
        feed: Arc<FeedStats>,
        header: Arc<HeaderCell>,
        shards: Vec<Arc<ShardStats>>,
        board: Arc<Board>,
    ) -> SplitterExporter {
        SplitterExporter {
            listen: format!("{}:{port}", settings.bind.ip()),
            settings: settings.clone(),
            started: Instant::now(),
            feed,
            header,
            shards,
            board,
        }
    }

    fn sum(&self, f: impl Fn(&ShardStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }
}

/// Per-shard counters: metric name, help, field.
type ShardField = (
    &'static str,
    &'static str,
    fn(&ShardStats) -> &std::sync::atomic::AtomicU64,
);

const SHARD_COUNTERS: &[ShardField] = &[
    (
        "p2psp_splitter_chunks_out_total",
        "Chunks a shard took from the ring and scheduled to its teams.",
        |s| &s.chunks,
    ),
    (
        "p2psp_splitter_ring_missed_chunks_total",
        "Chunks a shard skipped because it fell a whole ring behind.",
        |s| &s.ring_missed,
    ),
    (
        "p2psp_splitter_send_eagain_total",
        "Sends that found the socket buffer full (EAGAIN) and were retried.",
        |s| &s.eagain,
    ),
    (
        "p2psp_splitter_send_enobufs_total",
        "Sends that failed with ENOBUFS.",
        |s| &s.enobufs,
    ),
    (
        "p2psp_splitter_send_dropped_total",
        "Datagrams given up after send errors.",
        |s| &s.send_dropped,
    ),
    (
        "p2psp_splitter_datagrams_received_total",
        "Datagrams received from peers.",
        |s| &s.received,
    ),
    (
        "p2psp_splitter_loss_reports_total",
        "Loss reports received from monitors.",
        |s| &s.loss_reports,
    ),
    (
        "p2psp_splitter_goodbyes_total",
        "Goodbyes received from members.",
        |s| &s.goodbyes,
    ),
    (
        "p2psp_splitter_expelled_total",
        "Peers expelled for losses.",
        |s| &s.expelled,
    ),
    (
        "p2psp_splitter_lrs_resent_total",
        "Chunks resent to monitors that reported them lost (LRS).",
        |s| &s.resent,
    ),
    (
        "p2psp_splitter_ignored_datagrams_total",
        "Datagrams ignored: from strangers or non-monitors, or malformed.",
        |s| &s.ignored,
    ),
];

/// Per-shard counters labelled with the send path.
const SEND_COUNTERS: &[ShardField] = &[
    (
        "p2psp_splitter_datagrams_sent_total",
        "Datagrams handed to the kernel, by shard and send path.",
        |s| &s.datagrams,
    ),
    (
        "p2psp_splitter_bytes_sent_total",
        "UDP payload bytes handed to the kernel, by shard and send path.",
        |s| &s.bytes,
    ),
    (
        "p2psp_splitter_send_submissions_total",
        "Send system calls (io_uring_enter or sendmmsg), by shard and send path.",
        |s| &s.submissions,
    ),
];

impl Exporter for SplitterExporter {
    fn metrics(&self, p: &mut Prom) {
        let (control, _) = self.board.get();
        let header = self.header.peek();
        let f = &self.feed;
        p.family("p2psp_build_info", "gauge", "Version of this program.");
        p.sample(
            "p2psp_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("role", "splitter")],
            1,
        );
        p.gauge(
            "p2psp_splitter_uptime_seconds",
            "Seconds since the splitter started.",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        p.gauge(
            "p2psp_splitter_peers",
            "Peers in teams (monitors included).",
            self.sum(|s| &s.peers),
        );
        p.gauge("p2psp_splitter_teams", "Teams.", self.sum(|s| &s.teams));
        p.counter(
            "p2psp_splitter_chunks_in_total",
            "Chunks cut from the source stream.",
            f.chunks.load(Ordering::Relaxed),
        );
        p.counter(
            "p2psp_splitter_source_bytes_total",
            "Stream bytes read from the source.",
            f.bytes.load(Ordering::Relaxed),
        );
        p.counter(
            "p2psp_splitter_source_reconnects_total",
            "Times the source was reconnected after it dropped.",
            f.reconnects.load(Ordering::Relaxed),
        );
        p.counter(
            "p2psp_splitter_source_partial_dropped_bytes_total",
            "Bytes of an unfinished chunk dropped because the source restarted.",
            f.partial_dropped.load(Ordering::Relaxed),
        );
        p.gauge(
            "p2psp_splitter_stream_generation",
            "Streams started by the source (1 + reconnects); each has its own header.",
            header.generation,
        );
        p.gauge(
            "p2psp_splitter_header_bytes",
            "Bytes of the current stream header (0 until it is complete).",
            if header.complete {
                header.bytes.len()
            } else {
                0
            },
        );
        p.gauge(
            "p2psp_splitter_source_up",
            "1 while the source feeds the splitter, 0 once it ended for good.",
            u8::from(!f.ended.load(Ordering::Relaxed)),
        );
        p.counter(
            "p2psp_splitter_joins_total",
            "Peers that completed a join.",
            control.joins,
        );
        p.counter(
            "p2psp_splitter_joins_refused_total",
            "Connections refused at once (too many pending, not IPv4).",
            control.refused,
        );
        p.counter(
            "p2psp_splitter_join_timeouts_total",
            "Connections dropped for taking too long.",
            control.timeouts,
        );
        p.counter(
            "p2psp_splitter_bad_requests_total",
            "Connections that did not speak the protocol.",
            control.bad_requests,
        );
        p.counter(
            "p2psp_splitter_header_requests_total",
            "Stream header requests answered.",
            control.header_requests,
        );
        p.counter(
            "p2psp_splitter_foreign_datagrams_total",
            "Datagrams from endpoints that are not members of any team.",
            control.foreign_datagrams,
        );
        let path = self.settings.send_path.name();
        for (name, help, field) in SEND_COUNTERS {
            p.family(name, "counter", help);
            for (i, s) in self.shards.iter().enumerate() {
                let shard = i.to_string();
                p.sample(
                    name,
                    &[("shard", &shard), ("path", path)],
                    field(s).load(Ordering::Relaxed),
                );
            }
        }
        for (name, help, field) in SHARD_COUNTERS {
            p.family(name, "counter", help);
            for (i, s) in self.shards.iter().enumerate() {
                let shard = i.to_string();
                p.sample(name, &[("shard", &shard)], field(s).load(Ordering::Relaxed));
            }
        }
        for (name, help, field) in [
            (
                "p2psp_splitter_shard_peers",
                "Peers a shard serves.",
                (|s| &s.peers) as fn(&ShardStats) -> &std::sync::atomic::AtomicU64,
            ),
            ("p2psp_splitter_shard_teams", "Teams a shard owns.", |s| {
                &s.teams
            }),
            (
                "p2psp_splitter_socket_send_buffer_bytes",
                "UDP send buffer the kernel granted a shard's socket.",
                |s| &s.send_buffer,
            ),
            (
                "p2psp_splitter_socket_receive_buffer_bytes",
                "UDP receive buffer the kernel granted a shard's socket.",
                |s| &s.recv_buffer,
            ),
            (
                "p2psp_splitter_send_lag_p99_microseconds",
                "99th percentile over the last second of the time from a chunk's arrival to a shard's last send of it.",
                |s| &s.send_lag_p99_us,
            ),
            (
                "p2psp_splitter_send_lag_max_microseconds",
                "Largest time over the last second from a chunk's arrival to a shard's last send of it.",
                |s| &s.send_lag_max_us,
            ),
        ] {
            p.family(name, "gauge", help);
            for (i, s) in self.shards.iter().enumerate() {
                let shard = i.to_string();
                p.sample(name, &[("shard", &shard)], field(s).load(Ordering::Relaxed));
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let (control, rates) = self.board.get();
        let header = self.header.peek();
        let s = &self.settings;
        let f = &self.feed;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let shards: Vec<serde_json::Value> = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, st)| {
                json!({
                    "index": i,
                    "peers": load(&st.peers),
                    "teams": load(&st.teams),
                    "chunks": load(&st.chunks),
                    "ring_missed": load(&st.ring_missed),
                    "datagrams_sent": load(&st.datagrams),
                    "bytes_sent": load(&st.bytes),
                    "submissions": load(&st.submissions),
                    "eagain": load(&st.eagain),
                    "enobufs": load(&st.enobufs),
                    "send_dropped": load(&st.send_dropped),
                    "datagrams_received": load(&st.received),
                    "loss_reports": load(&st.loss_reports),
                    "goodbyes": load(&st.goodbyes),
                    "expelled": load(&st.expelled),
                    "lrs_resent": load(&st.resent),
                    "ignored": load(&st.ignored),
                    "socket_send_buffer": load(&st.send_buffer),
                    "socket_receive_buffer": load(&st.recv_buffer),
                    "send_lag_p99_us": load(&st.send_lag_p99_us),
                    "send_lag_max_us": load(&st.send_lag_max_us),
                })
            })
            .collect();
        let mut teams: Vec<serde_json::Value> = Vec::new();
        for (i, st) in self.shards.iter().enumerate() {
            for t in st.snapshot() {
                let peers: Vec<serde_json::Value> = t
                    .members
                    .iter()
                    .map(|m| {
                        json!({
                            "endpoint": m.endpoint.to_string(),
                            "monitor": m.monitor,
                            "losses": m.losses,
                        })
                    })
                    .collect();
                teams.push(json!({
                    "id": t.id,
                    "shard": i,
                    "size": t.members.len(),
                    "monitors": t.members.iter().filter(|m| m.monitor).count(),
                    "peers": peers,
                }));
            }
        }
        teams.sort_by_key(|t| t["id"].as_u64());
        json!({
            "role": "splitter",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "config": {
                "listen": self.listen,
                "source": s.source_text,
                "channel": s.channel,
                "chunk_size": s.chunk_size,
                "buffer_size": s.buffer_size,
                "header_size": s.header_size,
                "team_size": s.team_size,
                "monitors": s.monitors,
                "shards": s.shards,
                "send_path": s.send_path.name(),
                "max_losses": s.max_losses,
                "lrs": s.lrs,
            },
            "stream": {
                "generation": header.generation,
                "first_chunk": header.first_chunk,
                "content_type": header.content_type,
                "header_bytes": if header.complete { header.bytes.len() } else { 0 },
                "header_complete": header.complete,
                "chunks_in_stream": self.header.chunks_in_stream(),
                "source_reconnects": load(&f.reconnects),
                "source_streams": load(&f.streams),
                "ended": f.ended.load(Ordering::Relaxed),
            },
            "totals": {
                "peers": self.sum(|s| &s.peers),
                "teams": self.sum(|s| &s.teams),
                "chunks_in": load(&f.chunks),
                "bytes_in": load(&f.bytes),
                "datagrams_out": self.sum(|s| &s.datagrams),
                "bytes_out": self.sum(|s| &s.bytes),
                "loss_reports": self.sum(|s| &s.loss_reports),
                "expelled": self.sum(|s| &s.expelled),
                "goodbyes": self.sum(|s| &s.goodbyes),
                "eagain": self.sum(|s| &s.eagain),
                "enobufs": self.sum(|s| &s.enobufs),
                "send_dropped": self.sum(|s| &s.send_dropped),
                "lrs_resent": self.sum(|s| &s.resent),
                "ignored": self.sum(|s| &s.ignored) + control.foreign_datagrams,
                "joins": control.joins,
                "joins_refused": control.refused,
                "join_timeouts": control.timeouts,
                "bad_requests": control.bad_requests,
                "header_requests": control.header_requests,
            },
            "rates": rates,
            "shards": shards,
            "teams": teams,
        })
    }
}
