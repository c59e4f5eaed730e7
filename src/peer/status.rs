//! What a peer shows an operator with `--metrics`: its counters as Prometheus text, at
//! `/status` its neighbours with their chunk debts, and at `/history` the last 10 minutes of the
//! figures its page charts ([`PEER_SERIES`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;

use super::{PeerCounters, PeerOptions};
use crate::metrics::{Exporter, History, Kind, Prom, Series};
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
    /// NTS (`--nts`): how each teammate is reached.
    pub nts: Option<NtsDetail>,
}

/// A fingerprint of a set of neighbours, the same whatever their order: the peer publishes its
/// detail at once when it changes (a neighbour came or went), so that `/status` shows when a
/// teammate was kept to within a poll, not within a second.
pub fn neighbour_fingerprint(neighbours: impl Iterator<Item = Endpoint>) -> (usize, u64) {
    neighbours.fold((0, 0u64), |(n, sum), e| {
        // SplitMix64's finaliser on IP and port: the sum of such mixes collides only by chance.
        let mut x = (u64::from(u32::from(*e.ip())) << 16) | u64::from(e.port());
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (n + 1, sum.wrapping_add(x ^ (x >> 31)))
    })
}

/// How an NTS peer reaches its teammates (`/status`, `/metrics`, the status line).
#[derive(Debug, Clone, Default)]
pub struct NtsDetail {
    /// Our NTS ID.
    pub id: String,
    /// Per teammate: ID, the endpoint it is reached at (`None`: never heard from), how
    /// (`direct`, `predicted`, `probed`, `announced`, `forwarded`; `None`: not yet), and the
    /// port step the splitter announced for its NAT.
    pub teammates: Vec<(String, Option<Endpoint>, Option<&'static str>, u16)>,
    /// Forward requests sent (teammates never heard from).
    pub forward_requests: u64,
    /// Retries of the incorporation from a new port (`--nts-retries`).
    pub retries: u64,
}

/// The ways a teammate can be reached, as `/metrics` labels them (`unreached`: not yet, or
/// never and no fallback).
pub const REACHED: &[&str] = &[
    "direct",
    "predicted",
    "probed",
    "announced",
    "forwarded",
    "unreached",
];

impl NtsDetail {
    /// Teammates reached each way, in the order of [`REACHED`].
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        REACHED
            .iter()
            .map(|&w| {
                let n = self
                    .teammates
                    .iter()
                    .filter(|t| t.2.unwrap_or("unreached") == w)
                    .count();
                (w, n)
            })
            .collect()
    }

    /// For the status line: `2 direct, 1 forwarded` (the ways with at least one teammate).
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .counts()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(w, n)| format!("{n} {w}"))
            .collect();
        if parts.is_empty() {
            "no teammates".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// Shared between the peer's loop and its exporter.
#[derive(Debug)]
pub struct DetailCell {
    detail: Mutex<PeerDetail>,
    /// Chunks in the playout buffer ([`UNKNOWN`] until the loop publishes it).
    buffered: AtomicU64,
}

/// A level nobody published yet.
const UNKNOWN: u64 = u64::MAX;

impl Default for DetailCell {
    fn default() -> Self {
        DetailCell {
            detail: Mutex::default(),
            buffered: AtomicU64::new(UNKNOWN),
        }
    }
}

impl DetailCell {
    /// Replaces the published detail.
    pub fn publish(&self, d: PeerDetail) {
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }

    /// The last published detail.
    pub fn get(&self) -> PeerDetail {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes how many chunks the playout buffer holds (received, not yet played): the
    /// page's buffer fill and `p2psp_peer_buffered_chunks`.
    pub fn set_buffered(&self, chunks: u64) {
        self.buffered
            .store(chunks.min(UNKNOWN - 1), Ordering::Relaxed);
    }

    /// Chunks in the playout buffer, once published.
    pub fn buffered(&self) -> Option<u64> {
        match self.buffered.load(Ordering::Relaxed) {
            UNKNOWN => None,
            n => Some(n),
        }
    }
}

/// One peer metric, declared once: `/metrics` and the `/status` totals both read it here.
struct PeerMetric {
    /// Key in the `/status` totals.
    key: &'static str,
    /// Prometheus family name.
    name: &'static str,
    /// Help text.
    help: &'static str,
    /// Counter or gauge.
    kind: Kind,
    /// Its value.
    read: fn(&PeerStats, &PeerCounters) -> u64,
}

impl PeerMetric {
    const fn counter(
        key: &'static str,
        name: &'static str,
        help: &'static str,
        read: fn(&PeerStats, &PeerCounters) -> u64,
    ) -> PeerMetric {
        PeerMetric {
            key,
            name,
            help,
            kind: Kind::Counter,
            read,
        }
    }

    const fn gauge(
        key: &'static str,
        name: &'static str,
        help: &'static str,
        read: fn(&PeerStats, &PeerCounters) -> u64,
    ) -> PeerMetric {
        PeerMetric {
            kind: Kind::Gauge,
            ..PeerMetric::counter(key, name, help, read)
        }
    }
}

/// The peer's counters: the protocol core's [`PeerStats`] and the player's.
const PEER_METRICS: &[PeerMetric] = &[
    PeerMetric::counter(
        "chunks_received",
        "p2psp_peer_chunks_received_total",
        "Chunk datagrams received (from anybody).",
        |s, _| s.chunks_received,
    ),
    PeerMetric::counter(
        "from_splitter",
        "p2psp_peer_chunks_from_splitter_total",
        "Chunk datagrams received from the splitter.",
        |s, _| s.from_splitter,
    ),
    PeerMetric::counter(
        "relayed",
        "p2psp_peer_chunks_relayed_total",
        "Chunk datagrams relayed to neighbours.",
        |s, _| s.relayed,
    ),
    PeerMetric::counter(
        "played",
        "p2psp_peer_chunks_played_total",
        "Chunks played in order.",
        |s, _| s.played,
    ),
    PeerMetric::counter(
        "lost",
        "p2psp_peer_chunks_lost_total",
        "Chunks missing at playout time (skipped).",
        |s, _| s.lost,
    ),
    PeerMetric::counter(
        "late",
        "p2psp_peer_chunks_late_total",
        "Chunks that arrived after their playout time.",
        |s, _| s.late,
    ),
    PeerMetric::counter(
        "duplicates",
        "p2psp_peer_chunks_duplicate_total",
        "Chunks received twice.",
        |s, _| s.duplicates,
    ),
    PeerMetric::counter(
        "out_of_window",
        "p2psp_peer_chunks_out_of_window_total",
        "Chunks from neighbours a buffer or more ahead of playout (dropped).",
        |s, _| s.out_of_window,
    ),
    PeerMetric::counter(
        "strangers_out_of_window",
        "p2psp_peer_stranger_chunks_out_of_window_total",
        "Chunks from strangers a buffer or more ahead of playout (dropped, sender not taken as a neighbour).",
        |s, _| s.strangers_out_of_window,
    ),
    PeerMetric::counter(
        "neighbours_refused",
        "p2psp_peer_neighbours_refused_total",
        "Hellos and chunks from strangers not taken as neighbours because the list was full.",
        |s, _| s.neighbours_refused,
    ),
    PeerMetric::counter(
        "resent_received",
        "p2psp_peer_chunks_resent_received_total",
        "Chunks the splitter resent (LRS).",
        |s, _| s.resent_received,
    ),
    PeerMetric::counter(
        "malformed",
        "p2psp_peer_malformed_datagrams_total",
        "Datagrams that are neither a chunk, a hello nor a goodbye.",
        |s, _| s.malformed,
    ),
    PeerMetric::counter(
        "hellos",
        "p2psp_peer_hellos_total",
        "Hellos received from newcomers.",
        |s, _| s.hellos,
    ),
    PeerMetric::counter(
        "goodbyes",
        "p2psp_peer_goodbyes_total",
        "Goodbyes received from neighbours.",
        |s, _| s.goodbyes,
    ),
    PeerMetric::counter(
        "stray_goodbyes",
        "p2psp_peer_stray_goodbyes_total",
        "Goodbyes from endpoints that are neither neighbours nor the splitter.",
        |s, _| s.stray_goodbyes,
    ),
    PeerMetric::counter(
        "debt_drops",
        "p2psp_peer_debt_drops_total",
        "Neighbours dropped because they did not relay (chunk debt).",
        |s, _| s.debt_drops,
    ),
    PeerMetric::counter(
        "loss_reports",
        "p2psp_peer_loss_reports_total",
        "Loss reports sent to the splitter (monitors).",
        |s, _| s.loss_reports,
    ),
    PeerMetric::counter(
        "bad_chunks",
        "p2psp_peer_bad_chunks_total",
        "Chunks with a bad signature, dropped (CIS).",
        |s, _| s.bad_chunks,
    ),
    PeerMetric::counter(
        "forged",
        "p2psp_peer_forged_chunks_total",
        "Chunks with a bad signature and the splitter's address (CIS).",
        |s, _| s.forged,
    ),
    PeerMetric::counter(
        "from_polluters",
        "p2psp_peer_from_polluters_total",
        "Datagrams from banned polluters, ignored (CIS).",
        |s, _| s.from_polluters,
    ),
    PeerMetric::counter(
        "complaints",
        "p2psp_peer_complaints_total",
        "Complaints about polluters sent to the splitter (CIS).",
        |s, _| s.complaints,
    ),
    PeerMetric::counter(
        "digests",
        "p2psp_peer_digests_total",
        "Signed digests of chunk groups verified (CIS digest mode).",
        |s, _| s.digests,
    ),
    PeerMetric::counter(
        "bad_digests",
        "p2psp_peer_bad_digests_total",
        "Digests with a bad signature, dropped; the sender blamed (CIS digest mode).",
        |s, _| s.bad_digests,
    ),
    PeerMetric::counter(
        "stale_digests",
        "p2psp_peer_stale_digests_total",
        "Digests older than the peer keeps (replays), dropped unchecked (CIS digest mode).",
        |s, _| s.stale_digests,
    ),
    PeerMetric::counter(
        "digests_relayed",
        "p2psp_peer_digests_relayed_total",
        "Digests from the splitter relayed to neighbours (CIS digest mode).",
        |s, _| s.digests_relayed,
    ),
    PeerMetric::counter(
        "digest_requests",
        "p2psp_peer_digest_requests_total",
        "Digests asked for from the splitter after a chunk waited for one (CIS digest mode).",
        |s, _| s.digest_requests,
    ),
    PeerMetric::counter(
        "unverified_dropped",
        "p2psp_peer_unverified_dropped_total",
        "Chunks dropped because no digest came for them in time, never played (CIS digest mode).",
        |s, _| s.unverified_dropped,
    ),
    PeerMetric::counter(
        "signatures_checked",
        "p2psp_peer_signatures_checked_total",
        "Ed25519 signatures checked, of chunks or digests (CIS).",
        |s, _| s.signatures_checked,
    ),
    PeerMetric::counter(
        "hashes_checked",
        "p2psp_peer_hashes_checked_total",
        "Chunks checked against a digest's hash (CIS digest mode).",
        |s, _| s.hashes_checked,
    ),
    PeerMetric::counter(
        "forwarded",
        "p2psp_peer_forwarded_chunks_total",
        "Chunks the splitter forwarded for teammates this peer cannot reach (NTS forwarding fallback).",
        |s, _| s.forwarded,
    ),
    PeerMetric::counter(
        "player_overruns",
        "p2psp_peer_player_overruns_total",
        "Played chunks the player thread could not take in time.",
        |_, c| c.player_overruns.load(Ordering::Relaxed),
    ),
    PeerMetric::counter(
        "player_connects",
        "p2psp_peer_player_connects_total",
        "Players that connected.",
        |_, c| c.player_connects.load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "players",
        "p2psp_peer_players",
        "Players connected now.",
        |_, c| c.players.load(Ordering::Relaxed),
    ),
    PeerMetric::counter(
        "rejoins",
        "p2psp_peer_rejoins_total",
        "Times the peer joined a team again after its team session stalled.",
        |_, c| c.rejoins.load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "rejoin_attempt",
        "p2psp_peer_rejoin_attempt",
        "0 in a team; k while trying to join again for the k-th time in a row.",
        |_, c| c.rejoin_attempt.load(Ordering::Relaxed),
    ),
    PeerMetric::counter(
        "ims_group_chunks",
        "p2psp_peer_ims_group_chunks_total",
        "IMS (--ims): chunks taken from the multicast group.",
        |_, c| c.ims.lock().unwrap_or_else(|e| e.into_inner()).group_chunks,
    ),
    PeerMetric::counter(
        "ims_dropped",
        "p2psp_peer_ims_dropped_total",
        "IMS (--ims): datagrams dropped: on the group from others than the splitter or not chunks, on the unicast socket from others than the splitter.",
        |_, c| c.ims.lock().unwrap_or_else(|e| e.into_inner()).dropped(),
    ),
    PeerMetric::counter(
        "failovers",
        "p2psp_peer_failovers_total",
        "Times the peer joined another splitter than the one it was on (--splitter a,b,c).",
        |_, c| c.failovers.load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "failover_gap_ms",
        "p2psp_peer_last_failover_gap_milliseconds",
        "Playout gap of the last failover: last chunk played on the old splitter to first on the new.",
        |_, c| c.failover_gap_ms.load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "failover_resumed_ms",
        "p2psp_peer_last_failover_resumed_unix_milliseconds",
        "When the first chunk played after the last failover (Unix time, ms; 0: none yet).",
        |_, c| c.failover_resumed_ms.load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "stream_generation",
        "p2psp_peer_stream_generation",
        "Generation of the newest stream header known (0: the splitter does not say).",
        |_, c| c.stream_generation.load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "nat_probe_sessions",
        "p2psp_peer_nat_probe_sessions",
        "NTS port-probing sessions the splitter started with this peer (this team session).",
        |_, c| c.nat_probe[0].load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "nat_probe_reached",
        "p2psp_peer_nat_probe_reached",
        "Teammates reached by NTS port probing (this team session).",
        |_, c| c.nat_probe[1].load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "nat_probe_failed",
        "p2psp_peer_nat_probe_failed",
        "NTS port-probing sessions that ended without reaching the teammate.",
        |_, c| c.nat_probe[2].load(Ordering::Relaxed),
    ),
    PeerMetric::gauge(
        "nat_probe_ignored",
        "p2psp_peer_nat_probe_ignored",
        "Datagrams at probe sockets from others than the expected teammate, and rendezvous \
         not taken (repeats excepted: limits, unknown sessions).",
        |_, c| c.nat_probe[3].load(Ordering::Relaxed),
    ),
];

/// What the peer's page charts over the last 10 minutes (`/history`); the Grafana dashboard
/// (`dist/grafana/p2psp.json`) has a panel of the same title for each chart, on the same metric.
/// Counters are read through [`PEER_METRICS`] by their Prometheus name.
pub const PEER_SERIES: &[Series] = &[
    Series::rate(
        "played",
        "chunks/s played and relayed",
        "played",
        "/s",
        "p2psp_peer_chunks_played_total",
    ),
    Series::rate(
        "relayed",
        "chunks/s played and relayed",
        "relayed",
        "/s",
        "p2psp_peer_chunks_relayed_total",
    ),
    Series::rate(
        "lost",
        "chunks lost/s",
        "lost",
        "/s",
        "p2psp_peer_chunks_lost_total",
    ),
    Series::level(
        "neighbours",
        "neighbours",
        "neighbours",
        "",
        "p2psp_peer_neighbours",
    ),
    Series::level(
        "buffered",
        "buffer fill (chunks)",
        "buffered",
        "chunks",
        "p2psp_peer_buffered_chunks",
    ),
];

/// Every metric of [`PEER_METRICS`] as Prometheus text.
fn counters(p: &mut Prom, s: &PeerStats, c: &PeerCounters) {
    for m in PEER_METRICS {
        p.family(m.name, m.kind.name(), m.help);
        p.sample(m.name, &[], (m.read)(s, c));
    }
}

/// The `/status` totals: every metric of [`PEER_METRICS`] by its key.
fn totals(s: &PeerStats, c: &PeerCounters) -> serde_json::Value {
    PEER_METRICS
        .iter()
        .map(|m| (m.key.to_string(), (m.read)(s, c).into()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The peer's `--metrics` exporter.
pub struct PeerExporter {
    opts: PeerOptions,
    counters: Arc<PeerCounters>,
    started: Instant,
    history: Mutex<History>,
}

impl PeerExporter {
    /// An exporter over a peer's counters.
    pub fn new(opts: &PeerOptions) -> PeerExporter {
        PeerExporter {
            counters: opts.counters.clone(),
            opts: opts.clone(),
            started: Instant::now(),
            history: Mutex::new(History::ten_minutes(PEER_SERIES, Instant::now())),
        }
    }

    /// The raw value of the history series with Prometheus family `metric` (a counter's total for
    /// a rate; `NaN` while unknown).
    fn read(&self, d: &PeerDetail, metric: &str) -> Option<f64> {
        let c = &self.counters;
        // The loop's live counters where there are some: the once-a-second detail, sampled on
        // a grid of its own, would alias a steady rate into 0, 2x, x, ...
        let live = |a: &AtomicU64| Some(a.load(Ordering::Relaxed) as f64);
        match metric {
            "p2psp_peer_chunks_played_total" => live(&c.played),
            "p2psp_peer_chunks_relayed_total" => live(&c.relayed),
            "p2psp_peer_chunks_lost_total" => live(&c.lost),
            "p2psp_peer_neighbours" => Some(d.neighbours.len() as f64),
            "p2psp_peer_buffered_chunks" => {
                Some(c.detail.buffered().map_or(f64::NAN, |n| n as f64))
            }
            _ => PEER_METRICS
                .iter()
                .find(|m| m.name == metric)
                .map(|m| (m.read)(&d.stats, c) as f64),
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
            "p2psp_peer_ims",
            "1 for an IMS peer (--ims): chunks from a multicast group, nothing relayed.",
            u8::from(self.opts.ims),
        );
        p.gauge(
            "p2psp_peer_playing",
            "1 once playout has started.",
            u8::from(d.playing),
        );
        p.gauge(
            "p2psp_peer_neighbours",
            "Neighbours in the team.",
            d.neighbours.len(),
        );
        counters(p, s, c);
        p.family(
            "p2psp_peer_splitter_info",
            "gauge",
            "The splitter of the peer's team (label splitter).",
        );
        if let Some(at) = c.splitter() {
            p.sample(
                "p2psp_peer_splitter_info",
                &[("splitter", &at.to_string())],
                1,
            );
        }
        p.family(
            "p2psp_peer_buffered_chunks",
            "gauge",
            "Chunks in the playout buffer (received, not yet played).",
        );
        if let Some(n) = c.detail.buffered() {
            p.sample("p2psp_peer_buffered_chunks", &[], n);
        }
        if let Some(n) = &d.nts {
            p.family(
                "p2psp_peer_nts_teammates",
                "gauge",
                "NTS teammates by how they are reached (direct, predicted, probed, announced, forwarded by the splitter, unreached).",
            );
            for (how, count) in n.counts() {
                p.sample("p2psp_peer_nts_teammates", &[("how", how)], count);
            }
            p.gauge(
                "p2psp_peer_nts_max_port_step",
                "Largest NAT port step the splitter announced for a teammate (0: all cone or port-preserving).",
                n.teammates.iter().map(|t| t.3).max().unwrap_or(0),
            );
            p.family(
                "p2psp_peer_nts_forward_requests_total",
                "counter",
                "Teammates never heard from whose chunks this peer asked the splitter to forward.",
            );
            p.sample(
                "p2psp_peer_nts_forward_requests_total",
                &[],
                n.forward_requests,
            );
            p.family(
                "p2psp_peer_nts_retries_total",
                "counter",
                "Retries of the NTS incorporation from a new UDP port (--nts-retries).",
            );
            p.sample("p2psp_peer_nts_retries_total", &[], n.retries);
        }
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
        let nts = d.nts.as_ref().map(|n| {
            let teammates: Vec<serde_json::Value> = n
                .teammates
                .iter()
                .map(|(id, ep, how, step)| {
                    json!({
                        "id": id,
                        "endpoint": ep.map(|e| e.to_string()),
                        "how": how.unwrap_or("unreached"),
                        "port_step": step,
                    })
                })
                .collect();
            let counts: serde_json::Map<String, serde_json::Value> = n
                .counts()
                .into_iter()
                .map(|(w, c)| (w.to_owned(), c.into()))
                .collect();
            json!({
                "id": n.id,
                "reached": counts,
                "forward_requests": n.forward_requests,
                "retries": n.retries,
                "teammates": teammates,
            })
        });
        json!({
            "role": if self.opts.monitor { "monitor" } else { "peer" },
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "me": d.me.map(|m| m.to_string()),
            "state": state,
            "splitter": c.splitter().map(|s| s.to_string()),
            "config": {
                "splitter": self.opts.splitter.to_string(),
                "splitters": self.opts.splitters().iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "monitor": self.opts.monitor,
                "ims": self.opts.ims,
                "ims_group": c.ims_group.lock().unwrap_or_else(|e| e.into_inner()).map(|g| g.to_string()),
                "player": self.opts.player.map(|p| p.to_string()),
                "max_debt": self.opts.max_debt,
                "chunk_size": d.chunk_size,
                "buffer_size": d.buffer_size,
            },
            "totals": totals(s, c),
            "rates": {
                "played_per_second": d.rates[0],
                "bits_played_per_second": d.rates[0] * f64::from(d.chunk_size) * 8.0,
                "received_per_second": d.rates[1],
                "relayed_per_second": d.rates[2],
                "lost_per_second": d.rates[3],
            },
            "neighbours": neighbours,
            "buffered": c.detail.buffered(),
            "nts": nts,
        })
    }

    fn history(&self, since: Option<u64>) -> Option<serde_json::Value> {
        Some(crate::metrics::history_json(&self.history, since))
    }

    fn tick(&self, now: Instant) {
        crate::metrics::history_tick(&self.history, now, || {
            let d = self.counters.detail.get();
            PEER_SERIES
                .iter()
                .map(|s| self.read(&d, s.metric).unwrap_or(f64::NAN))
                .collect()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_peer_counter_is_in_metrics_and_status() {
        // Naming every field: a new one fails to compile here until it has a metric.
        let s = PeerStats {
            chunks_received: 101,
            from_splitter: 102,
            relayed: 103,
            played: 104,
            lost: 105,
            late: 106,
            duplicates: 107,
            out_of_window: 108,
            strangers_out_of_window: 109,
            neighbours_refused: 110,
            resent_received: 111,
            malformed: 112,
            hellos: 113,
            goodbyes: 114,
            stray_goodbyes: 115,
            debt_drops: 116,
            loss_reports: 117,
            bad_chunks: 118,
            forged: 119,
            from_polluters: 120,
            complaints: 121,
            digests: 122,
            bad_digests: 123,
            stale_digests: 124,
            digests_relayed: 125,
            digest_requests: 126,
            unverified_dropped: 127,
            signatures_checked: 128,
            hashes_checked: 129,

            forwarded: 130,
        };
        let c = PeerCounters::default();
        let mut p = Prom::new();
        counters(&mut p, &s, &c);
        let text = p.finish();
        let totals = totals(&s, &c);
        for v in 101..=129u64 {
            assert!(text.contains(&format!(" {v}\n")), "{v} not in\n{text}");
            assert!(totals.as_object().unwrap().values().any(|t| *t == v), "{v}");
        }
        let mut names = std::collections::HashSet::new();
        for m in PEER_METRICS {
            assert!(names.insert(m.name), "{} twice", m.name);
            assert!(totals.get(m.key).is_some(), "{}", m.key);
        }
        assert_eq!(totals.as_object().unwrap().len(), PEER_METRICS.len());
    }

    /// Options for an exporter that is not attached to a running peer.
    pub(crate) fn options() -> PeerOptions {
        PeerOptions {
            max_debt: 32,
            ..PeerOptions::new("127.0.0.1:8001".parse().unwrap())
        }
    }

    #[test]
    fn every_history_series_is_read_and_exported() {
        let opts = options();
        let e = PeerExporter::new(&opts);
        opts.counters.detail.set_buffered(128);
        let mut p = Prom::new();
        e.metrics(&mut p);
        let text = p.finish();
        assert!(
            text.contains("\np2psp_peer_buffered_chunks 128\n"),
            "{text}"
        );
        let d = opts.counters.detail.get();
        let mut keys = std::collections::HashSet::new();
        for s in PEER_SERIES {
            assert!(keys.insert(s.key), "{} twice", s.key);
            assert!(e.read(&d, s.metric).is_some(), "{} is not read", s.key);
            assert!(
                text.contains(&format!("# TYPE {} ", s.metric)),
                "{} charts {}, which /metrics lacks",
                s.key,
                s.metric
            );
        }
        let t0 = Instant::now();
        e.tick(t0);
        opts.counters.played.store(250, Ordering::Relaxed);
        opts.counters.detail.publish(PeerDetail {
            neighbours: vec![("127.0.0.1:4000".parse().unwrap(), 0)],
            ..PeerDetail::default()
        });
        e.tick(t0 + Duration::from_secs(1));
        let h = e.history(None).unwrap();
        assert_eq!(h["values"]["played"][1], 250);
        assert_eq!(h["values"]["neighbours"], serde_json::json!([0, 1]));
        assert_eq!(h["values"]["buffered"][1], 128);
        // Before it is published the buffer fill is unknown, and /metrics has no sample.
        let opts = options();
        let mut p = Prom::new();
        PeerExporter::new(&opts).metrics(&mut p);
        assert!(!p.finish().contains("\np2psp_peer_buffered_chunks "));
    }
}
