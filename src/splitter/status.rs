//! What the splitter shows an operator: the once-a-second status line ([`StatusLine`], printed
//! by the control plane) and the `--metrics` exporter (Prometheus text and the `/status` JSON)
//! over the counters the feed, the shards and the control plane publish.
//!
//! Nothing here is on the data path. Shards publish relaxed atomics as they go and a snapshot of
//! their teams once a second; the control plane publishes its counters and the rates it computes
//! for the status line once a second ([`Board`]). The shards' metrics are declared once, in
//! [`SHARD_METRICS`]: the status line, `/metrics` and `/status` all go through that table.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::Settings;
use super::feed::{FeedStats, HeaderCell};
use super::shard::{SHARD_METRICS, ShardMetric, ShardStats};
use crate::metrics::{Exporter, Prom};

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

/// The control plane's part of the status line.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlaneView {
    /// Peers placed in teams.
    pub peers: usize,
    /// Teams.
    pub teams: usize,
    /// Datagrams the control plane dropped: from endpoints that are no member anywhere, or for a
    /// shard whose queue was full.
    pub ignored: u64,
}

/// The once-a-second status line, and the rates it computes for `/status`.
#[derive(Debug)]
pub struct StatusLine {
    next: Instant,
    last: Instant,
    chunks: u64,
    datagrams: u64,
    bytes: u64,
    loss_reports: u64,
    source_bytes: u64,
    rates: Rates,
}

impl StatusLine {
    /// The first line is due a second after `now`.
    pub fn new(now: Instant) -> StatusLine {
        StatusLine {
            next: now + Duration::from_secs(1),
            last: now,
            chunks: 0,
            datagrams: 0,
            bytes: 0,
            loss_reports: 0,
            source_bytes: 0,
            rates: Rates::default(),
        }
    }

    /// The rates over the second before the last line.
    pub fn rates(&self) -> Rates {
        self.rates
    }

    /// The line, once a second (`None` until it is due).
    pub fn tick<'a>(
        &mut self,
        now: Instant,
        feed: &FeedStats,
        shards: impl Iterator<Item = &'a ShardStats> + Clone,
        plane: PlaneView,
    ) -> Option<String> {
        use ShardMetric as M;
        if now < self.next {
            return None;
        }
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-3);
        self.last = now;
        self.next = now + Duration::from_secs(1);
        let sum = |ms: &[ShardMetric]| ms.iter().map(|&m| sum(shards.clone(), m)).sum::<u64>();
        let chunks = feed.chunks.load(Ordering::Relaxed);
        let datagrams = sum(&[M::Datagrams]);
        let bytes = sum(&[M::Bytes]);
        let loss_reports = sum(&[M::LossReports]);
        let expelled = sum(&[M::Expelled]);
        let dropped = sum(&[M::SendDropped, M::RingMissed]);
        let ignored = sum(&[M::Ignored, M::Truncated, M::ForeignDropped]) + plane.ignored;
        let lag_p99 = max(shards.clone(), M::SendLagP99) as f64 / 1e3;
        let lag_max = max(shards.clone(), M::SendLagMax) as f64 / 1e3;
        let line = format!(
            "splitter: {} peers in {} teams | in {:.0} chunks/s | out {:.0} datagrams/s {:.2} Mbit/s | send lag p99 {:.2} ms max {:.2} ms | losses {:.0}/s ({} total) expelled {} | send drops {} | ignored {}",
            plane.peers,
            plane.teams,
            (chunks - self.chunks) as f64 / dt,
            (datagrams - self.datagrams) as f64 / dt,
            (bytes - self.bytes) as f64 * 8.0 / dt / 1e6,
            lag_p99,
            lag_max,
            (loss_reports - self.loss_reports) as f64 / dt,
            loss_reports,
            expelled,
            dropped,
            ignored,
        );
        let source_bytes = feed.bytes.load(Ordering::Relaxed);
        self.rates = Rates {
            chunks_in_per_second: (chunks - self.chunks) as f64 / dt,
            bits_in_per_second: (source_bytes - self.source_bytes) as f64 * 8.0 / dt,
            datagrams_out_per_second: (datagrams - self.datagrams) as f64 / dt,
            bits_out_per_second: (bytes - self.bytes) as f64 * 8.0 / dt,
            loss_reports_per_second: (loss_reports - self.loss_reports) as f64 / dt,
        };
        self.chunks = chunks;
        self.datagrams = datagrams;
        self.bytes = bytes;
        self.loss_reports = loss_reports;
        self.source_bytes = source_bytes;
        Some(line)
    }
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

    fn sum(&self, m: ShardMetric) -> u64 {
        sum(self.shards.iter().map(|s| &**s), m)
    }
}

/// `m` summed over `shards`.
pub fn sum<'a>(shards: impl IntoIterator<Item = &'a ShardStats>, m: ShardMetric) -> u64 {
    shards.into_iter().map(|s| s.get(m)).sum()
}

/// The largest value of `m` over `shards`.
pub fn max<'a>(shards: impl IntoIterator<Item = &'a ShardStats>, m: ShardMetric) -> u64 {
    shards.into_iter().map(|s| s.get(m)).max().unwrap_or(0)
}

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
            self.sum(ShardMetric::Peers),
        );
        p.gauge(
            "p2psp_splitter_teams",
            "Teams.",
            self.sum(ShardMetric::Teams),
        );
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
        for (&m, info) in ShardMetric::ALL.iter().zip(SHARD_METRICS) {
            p.family(info.name, info.kind.name(), info.help());
            for (i, s) in self.shards.iter().enumerate() {
                let shard = i.to_string();
                let labels: &[(&str, &str)] = if info.by_path {
                    &[("shard", &shard), ("path", path)]
                } else {
                    &[("shard", &shard)]
                };
                p.sample(info.name, labels, s.get(m));
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
                let mut shard = serde_json::Map::new();
                shard.insert("index".into(), i.into());
                for (&m, info) in ShardMetric::ALL.iter().zip(SHARD_METRICS) {
                    shard.insert(info.key.into(), st.get(m).into());
                }
                shard.into()
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
        let mut totals = json!({
            "chunks_in": load(&f.chunks),
            "bytes_in": load(&f.bytes),
            // The names the totals always had for datagrams_sent and bytes_sent.
            "datagrams_out": self.sum(ShardMetric::Datagrams),
            "bytes_out": self.sum(ShardMetric::Bytes),
            // With the datagrams the control plane ignored.
            "ignored": self.sum(ShardMetric::Ignored) + control.foreign_datagrams,
            "joins": control.joins,
            "joins_refused": control.refused,
            "join_timeouts": control.timeouts,
            "bad_requests": control.bad_requests,
            "header_requests": control.header_requests,
        });
        for (&m, info) in ShardMetric::ALL.iter().zip(SHARD_METRICS) {
            if info.summed && totals.get(info.key).is_none() {
                totals[info.key] = self.sum(m).into();
            }
        }
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
                "expel_fraction": s.expulsion.fraction,
                "expel_min_losses": s.expulsion.min_lost,
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
            "totals": totals,
            "rates": rates,
            "shards": shards,
            "teams": teams,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitter::SplitterArgs;

    fn shards(n: usize) -> Vec<Arc<ShardStats>> {
        (0..n).map(|_| Arc::default()).collect()
    }

    #[test]
    fn every_shard_metric_is_in_metrics_and_status() {
        let settings = Settings::from_args(&SplitterArgs::default()).unwrap();
        let shards = shards(2);
        for (k, &m) in ShardMetric::ALL.iter().enumerate() {
            shards[1].set(m, 100 + k as u64);
        }
        let exporter = SplitterExporter::new(
            &settings,
            8001,
            Arc::default(),
            Arc::new(HeaderCell::new(crate::media::HeaderSize::Bytes(16))),
            shards,
            Arc::default(),
        );
        let mut p = Prom::new();
        exporter.metrics(&mut p);
        let text = p.finish();
        let status = exporter.status();
        let path = settings.send_path.name();
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for (k, (&m, info)) in ShardMetric::ALL.iter().zip(SHARD_METRICS).enumerate() {
            assert_eq!(m.info().name, info.name);
            assert!(names.insert(info.name), "{} twice", info.name);
            assert!(keys.insert(info.key), "{} twice", info.key);
            assert!(!info.help().is_empty() && !info.help().starts_with(' '));
            let value = 100 + k as u64;
            let head = format!(
                "# HELP {} {}\n# TYPE {} {}\n",
                info.name,
                info.help(),
                info.name,
                info.kind.name()
            );
            assert!(text.contains(&head), "no family {}:\n{text}", info.name);
            let labels = if info.by_path {
                format!("shard=\"1\",path=\"{path}\"")
            } else {
                "shard=\"1\"".to_string()
            };
            let sample = format!("\n{}{{{labels}}} {value}\n", info.name);
            assert!(text.contains(&sample), "no {sample:?} in\n{text}");
            assert_eq!(status["shards"][1][info.key], value, "{}", info.key);
            assert_eq!(status["shards"][0][info.key], 0, "{}", info.key);
            if info.summed {
                assert!(status["totals"][info.key].is_u64(), "{}", info.key);
            }
        }
        assert_eq!(status["totals"]["peers"], 100 + ShardMetric::Peers as u64);
    }

    #[test]
    fn status_line_once_a_second_from_the_shards_counters() {
        let start = Instant::now();
        let mut line = StatusLine::new(start);
        let shards = shards(2);
        let feed = FeedStats::default();
        let plane = PlaneView {
            peers: 3,
            teams: 1,
            ignored: 1,
        };
        assert!(
            line.tick(start, &feed, shards.iter().map(|s| &**s), plane)
                .is_none()
        );
        for s in &shards {
            s.set(ShardMetric::Datagrams, 500);
            s.set(ShardMetric::Expelled, 1);
            s.set(ShardMetric::Truncated, 2);
        }
        shards[1].set(ShardMetric::SendLagMax, 2500);
        let now = start + Duration::from_secs(1);
        let text = line
            .tick(now, &feed, shards.iter().map(|s| &**s), plane)
            .unwrap();
        assert!(text.starts_with("splitter: 3 peers in 1 teams |"), "{text}");
        assert!(text.contains("out 1000 datagrams/s"), "{text}");
        assert!(text.contains("max 2.50 ms"), "{text}");
        assert!(text.contains("expelled 2 |"), "{text}");
        assert!(text.ends_with("ignored 5"), "{text}");
        assert_eq!(line.rates().datagrams_out_per_second, 1000.0);
        assert!(
            line.tick(now, &feed, shards.iter().map(|s| &**s), plane)
                .is_none()
        );
    }
}
