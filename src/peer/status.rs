//! What a peer shows an operator with `--metrics`: its counters as Prometheus text and, at
//! `/status`, its neighbours with their chunk debts.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;

use super::{PeerCounters, PeerOptions};
use crate::metrics::{Exporter, Prom};
use crate::proto::Endpoint;
use crate::proto::peer::PeerStats;

/// What the peer's loop publishes once a second.
#[derive(Debug, Clone, Default)]
pub struct PeerDetail {
    /// Our endpoint in the team, once joined.
    pub me: Option<Endpoint>,
    /// Chunk size and buffer size from the join message.
    pub chunk_size: u16,
    /// Buffer size in chunks.
    pub buffer_size: u16,
    /// Whether playout has started.
    pub playing: bool,
    /// The protocol core's counters.
    pub stats: PeerStats,
    /// Neighbours in relay order with their chunk debts.
    pub neighbours: Vec<(Endpoint, i32)>,
    /// Per-second rates: played, received, relayed, lost chunks.
    pub rates: [f64; 4],
}

/// Shared between the peer's loop and its exporter.
#[derive(Debug, Default)]
pub struct DetailCell(Mutex<PeerDetail>);

impl DetailCell {
    /// Replaces the published detail.
    pub fn publish(&self, d: PeerDetail) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }

    /// The last published detail.
    pub fn get(&self) -> PeerDetail {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The peer's `--metrics` exporter.
pub struct PeerExporter {
    opts: PeerOptions,
    counters: Arc<PeerCounters>,
    started: Instant,
}

impl PeerExporter {
    /// An exporter over a peer's counters.
    pub fn new(opts: &PeerOptions) -> PeerExporter {
        PeerExporter {
            counters: opts.counters.clone(),
            opts: opts.clone(),
            started: Instant::now(),
        }
    }
}

impl Exporter for PeerExporter {
    fn metrics(&self, p: &mut Prom) {
        let d = self.counters.detail.get();
        let c = &self.counters;
        let s = &d.stats;
        let role = if self.opts.monitor { "monitor" } else { "peer" };
        p.family("p2psp_build_info", "gauge", "Version of this program.");
        p.sample(
            "p2psp_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("role", role)],
            1,
        );
        p.gauge(
            "p2psp_peer_uptime_seconds",
            "Seconds since the peer started.",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        p.gauge(
            "p2psp_peer_playing",
            "1 once playout has started.",
            u8::from(d.playing),
        );
        p.gauge(
            "p2psp_peer_rejoin_attempt",
            "0 in a team; k while trying to join again for the k-th time in a row.",
            c.rejoin_attempt.load(Ordering::Relaxed),
        );
        p.counter(
            "p2psp_peer_rejoins_total",
            "Times the peer joined a team again after its team session stalled.",
            c.rejoins.load(Ordering::Relaxed),
        );
        p.gauge(
            "p2psp_peer_neighbours",
            "Neighbours in the team.",
            d.neighbours.len(),
        );
        let counters: [(&str, &str, u64); 14] = [
            (
                "p2psp_peer_chunks_received_total",
                "Chunk datagrams received (from anybody).",
                s.chunks_received,
            ),
            (
                "p2psp_peer_chunks_from_splitter_total",
                "Chunk datagrams received from the splitter.",
                s.from_splitter,
            ),
            (
                "p2psp_peer_chunks_relayed_total",
                "Chunk datagrams relayed to neighbours.",
                s.relayed,
            ),
            (
                "p2psp_peer_chunks_played_total",
                "Chunks played in order.",
                s.played,
            ),
            (
                "p2psp_peer_chunks_lost_total",
                "Chunks missing at playout time (skipped).",
                s.lost,
            ),
            (
                "p2psp_peer_chunks_late_total",
                "Chunks that arrived after their playout time.",
                s.late,
            ),
            (
                "p2psp_peer_chunks_duplicate_total",
                "Chunks received twice.",
                s.duplicates,
            ),
            (
                "p2psp_peer_malformed_datagrams_total",
                "Datagrams that are neither a chunk, a hello nor a goodbye.",
                s.malformed,
            ),
            (
                "p2psp_peer_hellos_total",
                "Hellos received from newcomers.",
                s.hellos,
            ),
            (
                "p2psp_peer_goodbyes_total",
                "Goodbyes received from neighbours.",
                s.goodbyes,
            ),
            (
                "p2psp_peer_debt_drops_total",
                "Neighbours dropped because they did not relay (chunk debt).",
                s.debt_drops,
            ),
            (
                "p2psp_peer_loss_reports_total",
                "Loss reports sent to the splitter (monitors).",
                s.loss_reports,
            ),
            (
                "p2psp_peer_player_overruns_total",
                "Played chunks the player thread could not take in time.",
                c.player_overruns.load(Ordering::Relaxed),
            ),
            (
                "p2psp_peer_player_connects_total",
                "Players that connected.",
                c.player_connects.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            p.counter(name, help, v);
        }
        p.gauge(
            "p2psp_peer_players",
            "Players connected now.",
            c.players.load(Ordering::Relaxed),
        );
        p.gauge(
            "p2psp_peer_stream_generation",
            "Generation of the newest stream header known (0: the splitter does not say).",
            c.stream_generation.load(Ordering::Relaxed),
        );
        p.gauge(
            "p2psp_peer_buffer_chunks",
            "Playout buffer size in chunks (from the join).",
            d.buffer_size,
        );
        p.gauge(
            "p2psp_peer_chunk_bytes",
            "Chunk payload size in bytes (from the join).",
            d.chunk_size,
        );
    }

    fn status(&self) -> serde_json::Value {
        let d = self.counters.detail.get();
        let c = &self.counters;
        let s = &d.stats;
        let neighbours: Vec<serde_json::Value> = d
            .neighbours
            .iter()
            .map(|(ep, debt)| json!({ "endpoint": ep.to_string(), "debt": debt }))
            .collect();
        let attempt = c.rejoin_attempt.load(Ordering::Relaxed);
        let state = match (d.me, d.playing) {
            _ if attempt > 0 => format!("rejoining (attempt {attempt})"),
            (None, _) => "joining".to_owned(),
            (Some(_), false) => "buffering".to_owned(),
            (Some(_), true) => "playing".to_owned(),
        };
        json!({
            "role": if self.opts.monitor { "monitor" } else { "peer" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "me": d.me.map(|m| m.to_string()),
            "state": state,
            "config": {
                "splitter": self.opts.splitter.to_string(),
                "monitor": self.opts.monitor,
                "player": self.opts.player.map(|p| p.to_string()),
                "max_debt": self.opts.max_debt,
                "chunk_size": d.chunk_size,
                "buffer_size": d.buffer_size,
            },
            "totals": {
                "chunks_received": s.chunks_received,
                "from_splitter": s.from_splitter,
                "relayed": s.relayed,
                "played": s.played,
                "lost": s.lost,
                "late": s.late,
                "duplicates": s.duplicates,
                "out_of_window": s.out_of_window,
                "malformed": s.malformed,
                "hellos": s.hellos,
                "goodbyes": s.goodbyes,
                "debt_drops": s.debt_drops,
                "loss_reports": s.loss_reports,
                "player_overruns": c.player_overruns.load(Ordering::Relaxed),
                "players": c.players.load(Ordering::Relaxed),
                "rejoins": c.rejoins.load(Ordering::Relaxed),
                "player_connects": c.player_connects.load(Ordering::Relaxed),
                "stream_generation": c.stream_generation.load(Ordering::Relaxed),
            },
            "rates": {
                "played_per_second": d.rates[0],
                "bits_played_per_second": d.rates[0] * f64::from(d.chunk_size) * 8.0,
                "received_per_second": d.rates[1],
                "relayed_per_second": d.rates[2],
                "lost_per_second": d.rates[3],
            },
            "neighbours": neighbours,
        })
    }
}
