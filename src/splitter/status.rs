//! What the splitter shows an operator: the once-a-second status line ([`StatusLine`], printed
//! by the control plane) and the `--metrics` exporter (Prometheus text and the `/status` JSON)
//! over the counters the feed, the shards and the control plane publish.
//!
//! Nothing here is on the data path. Shards publish relaxed atomics as they go and a snapshot of
//! their teams once a second; the control plane publishes its counters and the rates it computes
//! for the status line once a second ([`Board`]). The shards' metrics are declared once, in
//! [`SHARD_METRICS`]: the status line, `/metrics` and `/status` all go through that table, and
//! the charted history ([`SPLITTER_SERIES`]) names its metrics from it.
//!
//! `/status` stays small whatever the audience: totals, rates, shards and the lossiest teams.
//! Teams and peers are listed a page at a time, filtered and sorted, under `/status/teams` and
//! `/status/peers` ([`teams_page`], [`peers_page`]; sans-IO, over the shards' snapshots).

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::Settings;
use super::feed::{FeedStats, HeaderCell};
use super::shard::{SHARD_METRICS, ShardMetric, ShardStats, TeamSnapshot};
use crate::metrics::{Exporter, History, Prom, Query, Series};
use crate::proto::Endpoint;
use crate::proto::team::TeamMember;

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
        let complaints = sum(&[M::Complaints]);
        let polluters = sum(&[M::PollutersExpelled]);
        let forwarded = sum(&[M::Forwarded]);
        let mut line = format!(
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
        if complaints + polluters > 0 {
            // CIS: shown once a signed team has had any.
            line.push_str(&format!(
                " | pollution: {complaints} complaints, {polluters} polluters expelled"
            ));
        }
        if forwarded > 0 {
            // NTS forwarding fallback.
            line += &format!(" | forwarded {forwarded}");
        }
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
    /// Load probes answered (peers choosing among several splitters).
    pub load_probes: u64,
    /// Datagrams from endpoints that are no member anywhere.
    pub foreign_datagrams: u64,
}

/// What the control plane publishes once a second.
#[derive(Debug, Default)]
pub struct Board {
    state: Mutex<(ControlCounters, Rates)>,
    /// The control plane's live counters, for the history's joins (sampled on a grid of its
    /// own: the once-a-second copy would alias into 0, 2, 1, ...).
    live: std::sync::OnceLock<Arc<super::control::ControlStats>>,
    /// NTS (`--nts`): the splitter's view of its NTS members, for `/status`.
    nts: Mutex<Option<serde_json::Value>>,
}

impl Board {
    /// Gives the board the control plane's live counters.
    pub fn attach(&self, stats: Arc<super::control::ControlStats>) {
        let _ = self.live.set(stats);
    }

    /// Joins completed so far: live once attached, else as last published.
    fn joins(&self) -> u64 {
        match self.live.get() {
            Some(s) => s.joins.load(Ordering::Relaxed),
            None => self.get().0.joins,
        }
    }

    /// Publishes the control plane's counters and the last second's rates.
    pub fn publish(&self, counters: ControlCounters, rates: Rates) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (counters, rates);
    }

    /// Publishes the NTS view (`--nts`): counters and, per member, its port step and how it is
    /// served.
    pub fn publish_nts(&self, v: serde_json::Value) {
        *self.nts.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    }

    fn nts(&self) -> Option<serde_json::Value> {
        self.nts.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
    history: Mutex<History>,
}

/// The Prometheus family of a shard metric (in a `const`).
const fn shard_name(m: ShardMetric) -> &'static str {
    SHARD_METRICS[m as usize].name
}

/// What the splitter's page charts over the last 10 minutes (`/history`); the Grafana dashboard
/// (`dist/grafana/p2psp.json`) has a panel of the same title for each chart, on the same metric.
pub const SPLITTER_SERIES: &[Series] = &[
    Series::level("peers", "peers", "peers", "", "p2psp_splitter_peers"),
    Series::level("teams", "teams", "teams", "", "p2psp_splitter_teams"),
    Series::rate(
        "mbit_in",
        "Mbit/s in and out",
        "in",
        "Mbit/s",
        "p2psp_splitter_source_bytes_total",
    )
    .scaled(8e-6),
    Series::rate(
        "mbit_out",
        "Mbit/s in and out",
        "out",
        "Mbit/s",
        shard_name(ShardMetric::Bytes),
    )
    .scaled(8e-6),
    Series::rate(
        "loss_reports",
        "loss reports/s",
        "loss reports",
        "/s",
        shard_name(ShardMetric::LossReports),
    ),
    Series::rate(
        "expelled",
        "expulsions/s",
        "expelled",
        "/s",
        shard_name(ShardMetric::Expelled),
    ),
    Series::level(
        "send_lag_p99_ms",
        "send lag p99 (ms)",
        "p99, worst shard",
        "ms",
        shard_name(ShardMetric::SendLagP99),
    )
    .scaled(1e-3),
    Series::rate(
        "joins",
        "joins and leaves/s",
        "joins",
        "/s",
        "p2psp_splitter_joins_total",
    ),
    Series::rate(
        "leaves",
        "joins and leaves/s",
        "leaves",
        "/s",
        shard_name(ShardMetric::Left),
    ),
    Series::rate(
        "send_dropped",
        "send drops/s",
        "dropped",
        "/s",
        shard_name(ShardMetric::SendDropped),
    ),
];

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
            history: Mutex::new(History::ten_minutes(SPLITTER_SERIES, Instant::now())),
        }
    }

    fn sum(&self, m: ShardMetric) -> u64 {
        sum(self.shards.iter().map(|s| &**s), m)
    }

    /// The raw value of the history series `key` now (a counter's total for a rate).
    fn read(&self, key: &str) -> Option<f64> {
        use ShardMetric as M;
        let shards = || self.shards.iter().map(|s| &**s);
        Some(match key {
            "peers" => self.sum(M::Peers) as f64,
            "teams" => self.sum(M::Teams) as f64,
            "mbit_in" => self.feed.bytes.load(Ordering::Relaxed) as f64,
            "mbit_out" => self.sum(M::Bytes) as f64,
            "loss_reports" => self.sum(M::LossReports) as f64,
            "expelled" => self.sum(M::Expelled) as f64,
            "send_lag_p99_ms" => max(shards(), M::SendLagP99) as f64,
            "joins" => self.board.joins() as f64,
            "leaves" => self.sum(M::Left) as f64,
            "send_dropped" => self.sum(M::SendDropped) as f64,
            _ => return None,
        })
    }

    /// The shards' last team snapshots, with their shard's index.
    fn snapshots(&self) -> Vec<(usize, Arc<Vec<TeamSnapshot>>)> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.snapshot()))
            .collect()
    }
}

/// Teams listed in `/status` (the lossiest), and the most `/status/teams` and `/status/peers`
/// give at a time.
pub const STATUS_TEAMS: usize = 20;
/// Most entries in one page of `/status/teams` or `/status/peers`.
pub const MAX_PAGE: usize = 1000;
/// Entries in a page of `/status/teams` or `/status/peers` when `limit` is not given.
pub const DEFAULT_PAGE: usize = 50;

/// One team in a few numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TeamSummary {
    /// Team id.
    pub id: u32,
    /// The shard that serves it.
    pub shard: usize,
    /// Members, monitors included.
    pub size: usize,
    /// Monitors.
    pub monitors: usize,
    /// The sum of its members' loss counters.
    pub losses: u64,
    /// The highest loss counter of a member.
    pub max_losses: u32,
}

impl TeamSummary {
    fn of(shard: usize, t: &TeamSnapshot) -> TeamSummary {
        TeamSummary {
            id: t.id,
            shard,
            size: t.members.len(),
            monitors: t.members.iter().filter(|m| m.monitor).count(),
            losses: t.members.iter().map(|m| u64::from(m.losses)).sum(),
            max_losses: t.members.iter().map(|m| m.losses).max().unwrap_or(0),
        }
    }
}

/// Every team of the snapshots, with its shard, by id.
fn all_teams(snapshots: &[(usize, Arc<Vec<TeamSnapshot>>)]) -> Vec<(usize, &TeamSnapshot)> {
    let mut teams: Vec<(usize, &TeamSnapshot)> = snapshots
        .iter()
        .flat_map(|(i, ts)| ts.iter().map(move |t| (*i, t)))
        .collect();
    teams.sort_unstable_by_key(|(_, t)| t.id);
    teams
}

/// Sorts `v` by `key` and keeps `offset..offset + limit`, sorting only what it keeps.
fn page_of<T, K: Ord>(v: Vec<T>, offset: usize, limit: usize, key: impl Fn(&T) -> K) -> Vec<T> {
    let end = offset.saturating_add(limit).min(v.len());
    if offset >= end {
        return Vec::new();
    }
    // The first `end` by key: a bounded max-heap of (key, index) when that is a small part, a
    // sort of the keys otherwise. The items themselves are not moved until picked.
    let mut picked: Vec<(K, usize)> = if end <= v.len() / 8 {
        let mut heap = std::collections::BinaryHeap::with_capacity(end + 1);
        for (i, t) in v.iter().enumerate() {
            let k = key(t);
            if heap.len() < end {
                heap.push((k, i));
            } else if heap.peek().is_some_and(|top| (&k, i) < (&top.0, top.1)) {
                heap.pop();
                heap.push((k, i));
            }
        }
        heap.into_vec()
    } else {
        v.iter().enumerate().map(|(i, t)| (key(t), i)).collect()
    };
    picked.sort_unstable();
    let mut slots: Vec<Option<T>> = v.into_iter().map(Some).collect();
    picked[offset..end]
        .iter()
        .filter_map(|(_, i)| slots[*i].take())
        .collect()
}

/// `offset` and `limit` of a page query, and rejects keys other than `allowed`.
fn paging(q: &Query, allowed: &[&str]) -> Result<(usize, usize), String> {
    if let Some(k) = q.keys().find(|k| !allowed.contains(k)) {
        return Err(format!(
            "unknown query key `{k}`; this path takes: {}",
            allowed.join(", ")
        ));
    }
    let offset = q.number("offset", 0usize)?;
    let limit = q.number("limit", DEFAULT_PAGE)?;
    if limit > MAX_PAGE {
        return Err(format!("limit={limit}: at most {MAX_PAGE}"));
    }
    Ok((offset, limit))
}

/// The lossiest first, then by id.
fn lossiest(t: &TeamSummary) -> (std::cmp::Reverse<u64>, u32) {
    (std::cmp::Reverse(t.losses), t.id)
}

/// `/status/teams`: a page of team summaries. Query: `sort=id|lossiest|size` (default `id`),
/// `offset`, `limit` (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
pub fn teams_page(
    snapshots: &[(usize, Arc<Vec<TeamSnapshot>>)],
    q: &Query,
) -> Result<serde_json::Value, String> {
    let (offset, limit) = paging(q, &["sort", "offset", "limit"])?;
    let sort = q.get("sort").unwrap_or("id");
    let all: Vec<TeamSummary> = all_teams(snapshots)
        .into_iter()
        .map(|(i, t)| TeamSummary::of(i, t))
        .collect();
    let total = all.len();
    let page = match sort {
        "id" => page_of(all, offset, limit, |t| t.id),
        "lossiest" => page_of(all, offset, limit, lossiest),
        "size" => page_of(all, offset, limit, |t| (std::cmp::Reverse(t.size), t.id)),
        other => return Err(format!("sort={other}: one of id, lossiest, size")),
    };
    Ok(json!({
        "total": total,
        "offset": offset,
        "limit": limit,
        "sort": sort,
        "teams": page,
    }))
}

/// Which peers `/status/peers` lists.
enum AddrFilter {
    Any,
    Exact(Endpoint),
    Ip(Ipv4Addr),
    Text(String),
}

impl AddrFilter {
    fn parse(v: Option<&str>) -> AddrFilter {
        match v {
            None | Some("") => AddrFilter::Any,
            Some(v) => {
                if let Ok(ep) = v.parse() {
                    AddrFilter::Exact(ep)
                } else if let Ok(ip) = v.parse() {
                    AddrFilter::Ip(ip)
                } else {
                    AddrFilter::Text(v.to_owned())
                }
            }
        }
    }

    fn matches(&self, ep: &Endpoint) -> bool {
        match self {
            AddrFilter::Any => true,
            AddrFilter::Exact(e) => e == ep,
            AddrFilter::Ip(ip) => ep.ip() == ip,
            AddrFilter::Text(t) => ep.to_string().contains(t.as_str()),
        }
    }
}

/// `/status/peers`: a page of peers. Query: `team=ID`, `addr=IP:PORT` (that peer), `IP` (its
/// peers) or any text (endpoints that contain it), `monitor=true|false`,
/// `sort=team|lossiest|endpoint` (default `team`: by team, in round-robin order), `offset`,
/// `limit` (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
pub fn peers_page(
    snapshots: &[(usize, Arc<Vec<TeamSnapshot>>)],
    q: &Query,
) -> Result<serde_json::Value, String> {
    let (offset, limit) = paging(q, &["team", "addr", "monitor", "sort", "offset", "limit"])?;
    let team: Option<u32> = match q.get("team") {
        None | Some("") => None,
        Some(_) => Some(q.number("team", 0)?),
    };
    let monitor: Option<bool> = match q.get("monitor") {
        None | Some("") => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(v) => return Err(format!("monitor={v}: true or false")),
    };
    let addr = AddrFilter::parse(q.get("addr"));
    let sort = q.get("sort").unwrap_or("team");
    if !matches!(sort, "team" | "lossiest" | "endpoint") {
        return Err(format!("sort={sort}: one of team, lossiest, endpoint"));
    }
    // (team's position by id, member's position in the team, shard, team id, member)
    let mut hits: Vec<(u32, u32, usize, u32, &TeamMember)> = Vec::new();
    for (k, (shard, t)) in all_teams(snapshots).into_iter().enumerate() {
        if team.is_some_and(|id| id != t.id) {
            continue;
        }
        for (j, m) in t.members.iter().enumerate() {
            if monitor.is_some_and(|w| w != m.monitor) || !addr.matches(&m.endpoint) {
                continue;
            }
            hits.push((k as u32, j as u32, shard, t.id, m));
        }
    }
    let total = hits.len();
    let page = match sort {
        "lossiest" => page_of(hits, offset, limit, |h| {
            (std::cmp::Reverse(h.4.losses), h.0, h.1)
        }),
        "endpoint" => page_of(hits, offset, limit, |h| {
            (h.4.endpoint.ip().to_bits(), h.4.endpoint.port())
        }),
        _ => hits.into_iter().skip(offset).take(limit).collect(),
    };
    let peers: Vec<serde_json::Value> = page
        .iter()
        .map(|(_, _, shard, id, m)| {
            json!({
                "endpoint": m.endpoint.to_string(),
                "team": id,
                "shard": shard,
                "monitor": m.monitor,
                "losses": m.losses,
            })
        })
        .collect();
    Ok(json!({
        "total": total,
        "offset": offset,
        "limit": limit,
        "sort": sort,
        "peers": peers,
    }))
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
        if let Some(nts) = self.board.nts() {
            let n = |k: &str| nts[k].as_u64().unwrap_or(0);
            p.counter(
                "p2psp_splitter_nts_ignored_total",
                "NTS-sized datagrams ignored (unknown IDs, wrong senders).",
                n("ignored"),
            );
            p.counter(
                "p2psp_splitter_nts_retries_total",
                "NTS retries taken: arriving peers that said N from a new port and were measured again.",
                n("retries"),
            );
            p.counter(
                "p2psp_splitter_nts_extra_ids_total",
                "IDs taken at the NTS extra port (U2x): samples of a member's current NAT port.",
                n("extra_seen"),
            );
            p.counter(
                "p2psp_splitter_nts_u2x_total",
                "U2x sent: announcements of a newcomer carrying the extra port, to members whose NAT's port step is not 0.",
                n("u2x_sent"),
            );
            p.counter(
                "p2psp_splitter_nts_forward_pairs_total",
                "Forwarding fallback: (origin, receiver) pairs set up, on request or for a newcomer's teammates that missed its hellos.",
                n("forward_requests"),
            );
            p.counter(
                "p2psp_splitter_nts_forward_refused_total",
                "Forward requests refused: from strangers, forged, naming non-members or other teams' peers, or over the bound.",
                n("forward_refused"),
            );
            let probing = |k: &str| nts["probing"][k].as_u64().unwrap_or(0);
            p.counter(
                "p2psp_splitter_nts_probe_sweeps_total",
                "Port probing: sweeps started for pairs with a sequential symmetric NAT (both sides queried).",
                probing("sweeps"),
            );
            p.counter(
                "p2psp_splitter_nts_probe_birthday_total",
                "Port probing: birthday sessions started for pairs with a random symmetric NAT.",
                probing("birthday"),
            );
            p.counter(
                "p2psp_splitter_nts_probe_left_total",
                "Port probing: pairs left to the forwarding fallback (no method can connect them, or a side does not take part).",
                probing("left"),
            );
            let forwarded = nts["peers"].as_array().map_or(0, |a| {
                a.iter().filter(|p| p["served"] == "forwarded").count()
            });
            p.gauge(
                "p2psp_splitter_nts_members_forwarded",
                "NTS members the splitter forwards some teammates' chunks to (the rest are served direct).",
                forwarded,
            );
        }
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
        p.counter(
            "p2psp_splitter_signed_groups_total",
            "CIS digest mode: groups of chunks whose digest was signed.",
            f.signed_groups.load(Ordering::Relaxed),
        );
        p.counter(
            "p2psp_splitter_signed_chunks_total",
            "CIS digest mode: chunks published with a signed digest.",
            f.signed_chunks.load(Ordering::Relaxed),
        );
        p.counter(
            "p2psp_splitter_signing_busy_microseconds_total",
            "CIS digest mode: time the signer thread spent hashing chunks and signing digests.",
            f.signing_busy_ns.load(Ordering::Relaxed) / 1000,
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
            "p2psp_splitter_load_probes_total",
            "Load probes answered (peers choosing among several splitters).",
            control.load_probes,
        );
        p.counter(
            "p2psp_splitter_foreign_datagrams_total",
            "Datagrams from endpoints that are not members of any team.",
            control.foreign_datagrams,
        );
        p.family(
            "p2psp_splitter_ims",
            "gauge",
            "1 with --ims: every chunk goes once to the multicast group named in the labels.",
        );
        match self.settings.ims {
            Some(ims) => p.sample(
                "p2psp_splitter_ims",
                &[
                    ("group", &ims.group.to_string()),
                    ("ttl", &ims.ttl.to_string()),
                ],
                1,
            ),
            None => p.sample("p2psp_splitter_ims", &[], 0),
        }
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
        let snapshots = self.snapshots();
        let summaries: Vec<TeamSummary> = all_teams(&snapshots)
            .into_iter()
            .map(|(i, t)| TeamSummary::of(i, t))
            .collect();
        let team_count = summaries.len();
        let peers_with_losses: usize = snapshots
            .iter()
            .flat_map(|(_, ts)| ts.iter())
            .map(|t| t.members.iter().filter(|m| m.losses > 0).count())
            .sum();
        let max_losses = summaries.iter().map(|t| t.max_losses).max().unwrap_or(0);
        let teams = page_of(summaries, 0, STATUS_TEAMS, lossiest);
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
            "load_probes": control.load_probes,
            "peers_with_losses": peers_with_losses,
            "max_losses": max_losses,
            "team_count": team_count,
        });
        for (&m, info) in ShardMetric::ALL.iter().zip(SHARD_METRICS) {
            if info.summed && totals.get(info.key).is_none() {
                totals[info.key] = self.sum(m).into();
            }
        }
        let mut doc = json!({
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
                "ims_group": s.ims.map(|i| i.group.to_string()),
                "ims_ttl": s.ims.map(|i| i.ttl),
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
            "teams_listed": format!(
                "the {} lossiest of {team_count}; all at /status/teams, peers at /status/peers",
                teams.len()
            ),
        });
        if let Some(mut nts) = self.board.nts() {
            // The chunks each member got forwarded, as its shard counted them.
            let forwarded: std::collections::HashMap<String, u64> = snapshots
                .iter()
                .flat_map(|(_, ts)| ts.iter())
                .flat_map(|t| t.forwarded.iter())
                .map(|(e, n)| (e.to_string(), *n))
                .collect();
            if let Some(peers) = nts["peers"].as_array_mut() {
                for p in peers {
                    let n = p["endpoint"]
                        .as_str()
                        .and_then(|e| forwarded.get(e))
                        .copied()
                        .unwrap_or(0);
                    p["forwarded_chunks"] = n.into();
                }
            }
            doc["nts"] = nts;
        }
        doc
    }

    fn document(&self, path: &str, query: &Query) -> Option<Result<serde_json::Value, String>> {
        match path {
            "teams" => Some(teams_page(&self.snapshots(), query)),
            "peers" => Some(peers_page(&self.snapshots(), query)),
            _ => None,
        }
    }

    fn history(&self, since: Option<u64>) -> Option<serde_json::Value> {
        Some(crate::metrics::history_json(&self.history, since))
    }

    fn tick(&self, now: Instant) {
        crate::metrics::history_tick(&self.history, now, || {
            SPLITTER_SERIES
                .iter()
                .map(|s| self.read(s.key).unwrap_or(f64::NAN))
                .collect()
        });
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

    fn exporter(shards: Vec<Arc<ShardStats>>) -> SplitterExporter {
        let settings = Settings::from_args(&SplitterArgs::default()).unwrap();
        SplitterExporter::new(
            &settings,
            8001,
            Arc::default(),
            Arc::new(HeaderCell::new(crate::media::HeaderSize::Bytes(16))),
            shards,
            Arc::default(),
        )
    }

    #[test]
    fn every_history_series_is_read_and_exported() {
        let e = exporter(shards(2));
        let mut p = Prom::new();
        e.metrics(&mut p);
        let text = p.finish();
        let mut keys = std::collections::HashSet::new();
        for s in SPLITTER_SERIES {
            assert!(keys.insert(s.key), "{} twice", s.key);
            assert!(e.read(s.key).is_some(), "{} is not read", s.key);
            assert!(
                text.contains(&format!("# TYPE {} ", s.metric)),
                "{} charts {}, which /metrics lacks",
                s.key,
                s.metric
            );
        }
        let t0 = Instant::now();
        e.tick(t0);
        e.shards[0].set(ShardMetric::Peers, 7);
        e.shards[1].set(ShardMetric::Bytes, 250_000);
        e.tick(t0 + Duration::from_millis(500));
        e.tick(t0 + Duration::from_secs(2));
        let h = e.history(None).unwrap();
        assert_eq!(h["values"]["peers"].as_array().unwrap().len(), 2);
        assert_eq!(h["values"]["peers"][1], 7);
        assert!(h["values"]["mbit_out"][1].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn status_status_teams_and_status_peers_are_paged_and_filtered() {
        let shards = shards(2);
        let mut port = 4000;
        for t in 0..5u32 {
            let members: Vec<TeamMember> = (0..4)
                .map(|j| {
                    port += 1;
                    TeamMember {
                        endpoint: Endpoint::new(Ipv4Addr::new(127, 0, 0, 1 + (j % 2) as u8), port),
                        monitor: j == 0,
                        losses: if t == 3 { 10 + j } else { 0 },
                    }
                })
                .collect();
            shards[(t % 2) as usize].publish_teams(vec![TeamSnapshot {
                id: t,
                members,
                forwarded: Vec::new(),
            }]);
        }
        // Publish a second team on shard 0 next to the last one (publish_teams replaces).
        let extra: Vec<TeamSnapshot> = shards[0].snapshot().iter().cloned().collect();
        let mut all = extra;
        all.push(TeamSnapshot {
            id: 9,
            members: vec![TeamMember {
                endpoint: "127.0.0.9:5000".parse().unwrap(),
                monitor: false,
                losses: 50,
            }],
            forwarded: Vec::new(),
        });
        shards[0].publish_teams(all);
        let e = exporter(shards);
        let q = |s: &str| Query::parse(s);
        // Teams now: 4 (shard 0), 3 (shard 1), 9 (shard 0).
        let status = e.status();
        assert_eq!(status["totals"]["team_count"], 3);
        assert_eq!(status["teams"][0]["id"], 9);
        assert_eq!(status["teams"][1]["id"], 3);
        assert_eq!(status["teams"][1]["losses"], 10 + 11 + 12 + 13);
        assert_eq!(status["teams"][1]["max_losses"], 13);
        assert_eq!(status["totals"]["max_losses"], 50);
        assert_eq!(status["totals"]["peers_with_losses"], 5);

        let t = e.document("teams", &q("")).unwrap().unwrap();
        assert_eq!(t["total"], 3);
        let ids: Vec<u64> = t["teams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [3, 4, 9]);
        let t = e
            .document("teams", &q("sort=size&limit=1&offset=2"))
            .unwrap()
            .unwrap();
        assert_eq!(t["teams"][0]["id"], 9);

        let p = |s: &str| e.document("peers", &q(s)).unwrap();
        let all = p("").unwrap();
        assert_eq!(all["total"], 9);
        assert_eq!(all["peers"][0]["team"], 3);
        assert_eq!(all["peers"][0]["monitor"], true);
        let lossiest = p("sort=lossiest&limit=2").unwrap();
        assert_eq!(lossiest["peers"][0]["endpoint"], "127.0.0.9:5000");
        assert_eq!(lossiest["peers"][1]["losses"], 13);
        assert_eq!(lossiest["peers"].as_array().unwrap().len(), 2);
        let one = p("addr=127.0.0.9%3A5000").unwrap();
        assert_eq!(one["total"], 1);
        assert_eq!(one["peers"][0]["team"], 9);
        assert_eq!(p("addr=127.0.0.2").unwrap()["total"], 4);
        assert_eq!(p("addr=0.0.9").unwrap()["total"], 1);
        assert_eq!(p("team=4").unwrap()["total"], 4);
        assert_eq!(p("team=4&monitor=false").unwrap()["total"], 3);
        let second = p("team=4&offset=3&limit=2").unwrap();
        assert_eq!(second["peers"].as_array().unwrap().len(), 1);
        assert_eq!(p("offset=100").unwrap()["peers"], serde_json::json!([]));
        let sorted = p("sort=endpoint").unwrap();
        assert_eq!(sorted["peers"][8]["endpoint"], "127.0.0.9:5000");
        // Bad queries say what is wrong.
        assert!(p("limit=5000").unwrap_err().contains("at most"));
        assert!(p("sort=best").unwrap_err().contains("sort=best"));
        assert!(p("teem=1").unwrap_err().contains("`teem`"));
        assert!(p("team=x").unwrap_err().contains("team=x"));
        assert!(e.document("nope", &q("")).is_none());
        let (code, _, body) = crate::metrics::route("GET", "/status/peers?limit=x", &e);
        assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
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
