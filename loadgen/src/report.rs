//! What loadgen prints and writes: the per-second line, the final summary, the JSON report, the
//! HdrHistogram percentile distribution (`.hgrm`, as wrk2 writes it) and the SVG plot.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::tally::Tally;

/// Nanoseconds to milliseconds.
pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub stdev: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// 99.99th percentile.
    pub p99_99: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// From a histogram of nanoseconds (all zero when empty).
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let q = |x: f64| ms(h.value_at_quantile(x));
        Latency {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1e6,
            stdev: h.stdev() / 1e6,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p99_9: q(0.999),
            p99_99: q(0.9999),
            max: ms(h.max()),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Interval {
    /// Seconds since loadgen started its clock (start of this interval).
    pub t: u64,
    /// `join`, `measure` or `leave`.
    pub phase: &'static str,
    /// Peers receiving.
    pub peers: usize,
    /// Datagrams received by the peers per second.
    pub rx_datagrams_per_s: f64,
    /// Gigabits received by the peers per second (UDP payload).
    pub rx_gbit_per_s: f64,
    /// Datagrams the splitter (or the baseline loop) sent per second, if known.
    pub tx_datagrams_per_s: Option<f64>,
    /// Chunks lost at playout over chunks due, in percent.
    pub loss_pct: f64,
    /// Chunks lost.
    pub lost: u64,
    /// Chunks played.
    pub played: u64,
    /// Median latency in ms (null without samples).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in ms.
    pub p99_ms: Option<f64>,
}

impl Interval {
    /// Builds the line's figures from one second of counts.
    pub fn new(
        t: u64,
        phase: &'static str,
        peers: usize,
        tally: &Tally,
        hist: &Histogram<u64>,
        tx: Option<f64>,
    ) -> Interval {
        let q = |x: f64| (!hist.is_empty()).then(|| ms(hist.value_at_quantile(x)));
        Interval {
            t,
            phase,
            peers,
            rx_datagrams_per_s: tally.datagrams as f64,
            rx_gbit_per_s: tally.bytes as f64 * 8.0 / 1e9,
            tx_datagrams_per_s: tx,
            loss_pct: tally.loss_ratio() * 100.0,
            lost: tally.lost,
            played: tally.played,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
        }
    }

    /// The once-a-second line (iperf3 style).
    pub fn line(&self, tx_name: &str) -> String {
        let lat = |v: Option<f64>| v.map_or("     -".to_owned(), |v| format!("{v:6.3}"));
        let tx = self
            .tx_datagrams_per_s
            .map_or("-".to_owned(), |v| group(v.round() as u64));
        format!(
            "[{:>4}-{:<4}s] {:<7} {:>6} peers  rx {:>10} dgram/s {:6.3} Gbit/s  {tx_name} {:>10} dgram/s  loss {:7.3} %  p50 {} ms  p99 {} ms",
            self.t,
            self.t + 1,
            self.phase,
            self.peers,
            group(self.rx_datagrams_per_s.round() as u64),
            self.rx_gbit_per_s,
            tx,
            self.loss_pct,
            lat(self.p50_ms),
            lat(self.p99_ms),
        )
    }
}

/// `1234567` as `1,234,567`.
pub fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The run's settings, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// `splitter` or `baseline-sendmmsg`.
    pub mode: String,
    /// Where peers joined, comma-separated when several (or the baseline's destinations' first address).
    pub splitter: String,
    /// Whether loadgen started the splitter itself.
    pub splitter_child: bool,
    /// Peers asked for.
    pub peers: usize,
    /// Team size.
    pub team_size: usize,
    /// Chunk payload bytes.
    pub chunk_size: usize,
    /// Stream bit rate (bits/s of chunk payload).
    pub bitrate_bps: u64,
    /// Chunks per second.
    pub chunks_per_second: f64,
    /// Seconds measured, as asked.
    pub duration_s: f64,
    /// Joins per second asked.
    pub join_rate: f64,
    /// Splitter shards (child only).
    pub shards: Option<usize>,
    /// Splitter send path asked (child only).
    pub io: Option<String>,
    /// Peers' playout buffer in chunks (child only).
    pub buffer_size: Option<u32>,
    /// Monitors per team.
    pub monitors: usize,
    /// Worker threads.
    pub threads: usize,
    /// Local addresses the peers were spread over.
    pub addresses: Vec<String>,
    /// `per-peer` or `shared` (`--sockets`).
    pub sockets: String,
    /// Receive path of the workers.
    pub recv_path: String,
    /// Seed.
    pub seed: u64,
}

/// How the joins went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Joins {
    /// Joins completed.
    pub ok: usize,
    /// Joins failed.
    pub failed: usize,
    /// Seconds from the first join's start to the last join's end.
    pub seconds: f64,
    /// Join time (connect to ready byte) percentiles.
    pub latency_ms: Latency,
    /// The first few distinct errors.
    pub errors: Vec<String>,
}

/// Fan-out figures over the measured seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fanout {
    /// Datagrams received by all peers per second.
    pub rx_datagrams_per_s: f64,
    /// Gigabits received by all peers per second (UDP payload).
    pub rx_gbit_per_s: f64,
    /// Datagrams the peers sent per second (relays, hellos, goodbyes, loss reports).
    pub peer_tx_datagrams_per_s: f64,
    /// Datagrams the kernel dropped at the peers' full receive buffers in the measured seconds
    /// (`/proc/net/udp`): the senders outran loadgen's receive threads.
    pub socket_drops: Option<u64>,
    /// (received + socket drops) per second: what reached the peers' sockets, whatever loadgen
    /// could read. With teams of 1 this is the sender's fan-out, independent of loadgen's speed.
    pub delivered_datagrams_per_s: Option<f64>,
    /// Datagrams the splitter (or baseline loop) sent per second, if known.
    pub tx_datagrams_per_s: Option<f64>,
    /// Gigabits the splitter (or baseline loop) sent per second, if known.
    pub tx_gbit_per_s: Option<f64>,
    /// Datagrams the splitter or baseline loop gave up sending (and splitter ring overruns).
    pub tx_drops: Option<u64>,
}

/// CPU time of the splitter process (or the baseline's sending thread).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    /// User-space seconds.
    pub user_s: f64,
    /// Kernel seconds.
    pub system_s: f64,
    /// (user + system) / wall time: cores kept busy.
    pub cores: f64,
    /// user / (user + system).
    pub user_share: f64,
}

impl Cpu {
    /// From CPU times over `wall` seconds.
    pub fn new(t: crate::procfs::CpuTimes, wall: f64) -> Cpu {
        let (u, s) = (t.user.as_secs_f64(), t.system.as_secs_f64());
        Cpu {
            user_s: u,
            system_s: s,
            cores: if wall > 0.0 { (u + s) / wall } else { 0.0 },
            user_share: if u + s > 0.0 { u / (u + s) } else { 0.0 },
        }
    }
}

/// loadgen's own costs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Own {
    /// Worker threads' CPU seconds in the measured seconds.
    pub worker_cpu_s: f64,
    /// Worker CPU per received datagram, microseconds.
    pub cpu_us_per_datagram: f64,
    /// Whole process CPU seconds in the measured seconds.
    pub process_cpu_s: f64,
    /// Receive ring: multishot receives that ended because the provided buffers ran out.
    pub recv_enobufs: u64,
    /// Receive ring: multishot receives re-armed.
    pub recv_rearms: u64,
    /// Datagrams longer than the receive buffers (dropped).
    pub recv_truncated: u64,
    /// Receive errors.
    pub recv_errors: u64,
    /// Resident memory at the end, MiB.
    pub rss_mib: f64,
    /// Peak resident memory, MiB.
    pub rss_peak_mib: f64,
    /// CIS: what verifying cost the peers, when they verify (`--sign` or `--splitter-key`).
    pub verify: Option<VerifyCost>,
}

/// CIS: the peers' verification cost: the signatures and hashes they checked, priced at what one
/// of each cost on this machine when loadgen started (timed on one thread, best of 3).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VerifyCost {
    /// µs of CPU per chunk received spent verifying.
    pub us_per_chunk: f64,
    /// Signatures checked (of chunks with `--sign-mode chunk`, of digests with `digest`).
    pub signatures: u64,
    /// Chunks checked against a digest's hash.
    pub hashes: u64,
    /// One signature check, µs.
    pub signature_us: f64,
    /// One chunk hash, µs.
    pub hash_us: f64,
}

/// The splitter's send lag (from its feed's reading a chunk to its last send of it, worst shard)
/// over the measured seconds, from the per-second figures of its status lines.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct SendLag {
    /// Median of the per-second 99th percentiles, ms.
    pub p99_median: f64,
    /// Largest per-second 99th percentile, ms.
    pub p99_worst: f64,
    /// Largest lag seen, ms.
    pub max: f64,
    /// Status lines used.
    pub seconds: usize,
}

impl SendLag {
    /// From (p99, max) pairs of status lines; `None` when there are none.
    pub fn of(per_second: &[(f64, f64)]) -> Option<SendLag> {
        if per_second.is_empty() {
            return None;
        }
        let mut p99: Vec<f64> = per_second.iter().map(|p| p.0).collect();
        p99.sort_by(f64::total_cmp);
        let n = p99.len();
        let median = if n % 2 == 1 {
            p99[n / 2]
        } else {
            (p99[n / 2 - 1] + p99[n / 2]) / 2.0
        };
        Some(SendLag {
            p99_median: median,
            p99_worst: p99[n - 1],
            max: per_second.iter().map(|p| p.1).fold(0.0, f64::max),
            seconds: n,
        })
    }
}

/// What one core did over the measured seconds, in percent of its time.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CoreUse {
    /// `cpu0`, `cpu1`...
    pub core: String,
    /// User space (user + nice).
    pub user_pct: f64,
    /// Kernel time charged to tasks.
    pub system_pct: f64,
    /// Interrupt and softirq work (loopback delivery among it).
    pub irq_pct: f64,
    /// Idle (and iowait).
    pub idle_pct: f64,
    /// Stolen by the hypervisor, where the VM reports it.
    pub steal_pct: f64,
}

impl CoreUse {
    /// From a core's tick difference.
    pub fn of(core: &str, t: &crate::procfs::CoreTicks) -> CoreUse {
        let pct = |v: u64| v as f64 * 100.0 / t.total().max(1) as f64;
        CoreUse {
            core: core.to_owned(),
            user_pct: pct(t.user),
            system_pct: pct(t.system),
            irq_pct: pct(t.irq),
            idle_pct: pct(t.idle),
            steal_pct: pct(t.steal),
        }
    }
}

/// The splitter child's resident memory.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SplitterMemory {
    /// Resident set, MiB.
    pub rss_mib: f64,
    /// Peak resident set, MiB.
    pub rss_peak_mib: f64,
    /// Resident set per joined peer, KiB (the splitter's own start-up memory included).
    pub rss_per_peer_kib: f64,
}

/// One splitter's figures over the measured seconds (`--splitter a,b,c`; one entry otherwise).
/// Each is measured by the workers that serve only that splitter's peers, so counters, sample
/// counts and rates add up to the totals.
#[derive(Debug, Clone, Serialize)]
pub struct PerSplitter {
    /// The splitter.
    pub splitter: String,
    /// Peers its workers ran in the last measured second.
    pub peers: usize,
    /// Counters.
    pub chunks: Tally,
    /// lost / (played + lost).
    pub loss_ratio: f64,
    /// Source-to-peer latency, from the source's schedule.
    pub latency_ms: Latency,
    /// Datagrams its peers received per second.
    pub rx_datagrams_per_s: f64,
    /// Datagrams its peers sent per second (relays and control).
    pub peer_tx_datagrams_per_s: f64,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// loadgen's version.
    pub loadgen_version: &'static str,
    /// Settings.
    pub config: Config,
    /// Joins.
    pub joins: Joins,
    /// Seconds measured (whole intervals after every join finished).
    pub measured_seconds: f64,
    /// Counters over the measured seconds.
    pub chunks: Tally,
    /// lost / (played + lost) over the measured seconds.
    pub loss_ratio: f64,
    /// Source-to-peer latency over the measured seconds, from the source's schedule.
    pub latency_ms: Latency,
    /// The same from the source's actual write (the source's own lag left out).
    pub latency_from_write_ms: Latency,
    /// Fan-out.
    pub fanout: Fanout,
    /// The same figures by splitter; they add up to the totals.
    pub splitters: Vec<PerSplitter>,
    /// Splitter process CPU (child only), or the baseline loop's thread.
    pub sender_cpu: Option<Cpu>,
    /// loadgen's own costs.
    pub loadgen: Own,
    /// The splitter child's memory at the end of the measured seconds (null otherwise).
    pub splitter_memory: Option<SplitterMemory>,
    /// How late the source wrote its records against its schedule.
    pub source_lag_ms: Option<Latency>,
    /// The splitter child's own send lag over the measured seconds, from its status lines.
    pub splitter_send_lag_ms: Option<SendLag>,
    /// Every core's use over the measured seconds (`/proc/stat`).
    pub cores: Vec<CoreUse>,
    /// How late a thread sleeping 1 ms at a time woke during the measured seconds (the machine's
    /// own scheduling noise; `noise.rs`).
    pub machine_noise_ms: Option<Latency>,
    /// Every second of the run.
    pub intervals: Vec<Interval>,
}

/// What the run observed beside the collector's counts: the sender's side, `/proc` readings
/// taken at the measured seconds' edges, loadgen's memory. Raw figures; [`Report::build`] derives
/// the rates and ratios.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Splitter process CPU over the measured seconds (child), or the baseline loop's.
    pub sender_cpu: Option<Cpu>,
    /// loadgen's whole CPU over the measured seconds, in seconds.
    pub process_cpu_s: f64,
    /// Datagrams the sender gave up (splitter status, or the baseline's counter).
    pub tx_drops: Option<u64>,
    /// Kernel drops at the peers' sockets over the measured seconds.
    pub socket_drops: Option<u64>,
    /// loadgen's resident memory now and at its peak, bytes.
    pub rss: (u64, u64),
    /// The source's lag.
    pub source_lag_ms: Option<Latency>,
    /// The splitter child's send lag.
    pub splitter_send_lag_ms: Option<SendLag>,
    /// Per-core use over the measured seconds.
    pub cores: Vec<CoreUse>,
    /// The machine's scheduling noise over the measured seconds.
    pub machine_noise_ms: Option<Latency>,
    /// Joins completed and failed.
    pub joined: usize,
    /// Joins failed.
    pub join_failed: usize,
    /// The splitter child's resident memory (now, peak) at the end of the measured seconds.
    pub sender_rss: Option<(u64, u64)>,
    /// CIS: what one signature check and one chunk hash cost here, µs (when the peers verify).
    pub verify_costs: Option<(f64, f64)>,
}

impl Report {
    /// The report of a run: its settings, what the collector gathered, and the other facts.
    pub fn build(config: Config, o: crate::collector::Outcome, f: Facts) -> Report {
        let measured_s = o.measured.max(1) as f64;
        let total = o.total;
        let window: Vec<&Interval> = o
            .intervals
            .iter()
            .filter(|i| i.phase == "measure")
            .collect();
        let tx_rates: Vec<f64> = window.iter().filter_map(|i| i.tx_datagrams_per_s).collect();
        let tx_datagrams_per_s =
            (!tx_rates.is_empty()).then(|| tx_rates.iter().sum::<f64>() / tx_rates.len() as f64);
        let datagram_bytes = (config.chunk_size + p2psp::proto::wire::CHUNK_HEADER) as f64;
        let rs = &o.recv_stats;
        let names: Vec<&str> = config.splitter.split(',').collect();
        let splitters = o
            .groups
            .iter()
            .enumerate()
            .map(|(k, g)| PerSplitter {
                splitter: names.get(k).copied().unwrap_or("-").to_owned(),
                peers: g.peers,
                chunks: g.tally,
                loss_ratio: g.tally.loss_ratio(),
                latency_ms: Latency::of(&g.hist.scheduled),
                rx_datagrams_per_s: g.tally.datagrams as f64 / measured_s,
                peer_tx_datagrams_per_s: g.tally.sent as f64 / measured_s,
            })
            .collect();
        Report {
            loadgen_version: env!("CARGO_PKG_VERSION"),
            config,
            joins: Joins {
                ok: f.joined,
                failed: f.join_failed,
                seconds: o.join_seconds,
                latency_ms: Latency::of(&o.join_hist),
                errors: o.join_errors,
            },
            measured_seconds: o.measured as f64,
            chunks: total,
            loss_ratio: total.loss_ratio(),
            latency_ms: Latency::of(&o.total_hist.scheduled),
            latency_from_write_ms: Latency::of(&o.total_hist.written),
            fanout: Fanout {
                rx_datagrams_per_s: total.datagrams as f64 / measured_s,
                rx_gbit_per_s: total.bytes as f64 * 8.0 / 1e9 / measured_s,
                peer_tx_datagrams_per_s: total.sent as f64 / measured_s,
                socket_drops: f.socket_drops,
                delivered_datagrams_per_s: f
                    .socket_drops
                    .map(|d| (total.datagrams + d) as f64 / measured_s),
                tx_datagrams_per_s,
                tx_gbit_per_s: tx_datagrams_per_s.map(|d| d * datagram_bytes * 8.0 / 1e9),
                tx_drops: f.tx_drops,
            },
            splitters,
            sender_cpu: f.sender_cpu,
            splitter_memory: f.sender_rss.map(|(rss, hwm)| SplitterMemory {
                rss_mib: rss as f64 / (1 << 20) as f64,
                rss_peak_mib: hwm as f64 / (1 << 20) as f64,
                rss_per_peer_kib: rss as f64 / 1024.0 / f.joined.max(1) as f64,
            }),
            loadgen: Own {
                worker_cpu_s: o.worker_cpu.as_secs_f64(),
                cpu_us_per_datagram: if total.datagrams > 0 {
                    o.worker_cpu.as_secs_f64() * 1e6 / total.datagrams as f64
                } else {
                    0.0
                },
                process_cpu_s: f.process_cpu_s,
                recv_enobufs: rs.iter().map(|r| r.enobufs).sum(),
                recv_rearms: rs.iter().map(|r| r.rearms).sum(),
                recv_truncated: rs.iter().map(|r| r.truncated).sum(),
                recv_errors: rs.iter().map(|r| r.errors).sum(),
                rss_mib: f.rss.0 as f64 / (1 << 20) as f64,
                rss_peak_mib: f.rss.1 as f64 / (1 << 20) as f64,
                verify: f.verify_costs.map(|(sig, hash)| VerifyCost {
                    us_per_chunk: (total.signatures as f64 * sig + total.hashes as f64 * hash)
                        / total.chunks.max(1) as f64,
                    signatures: total.signatures,
                    hashes: total.hashes,
                    signature_us: sig,
                    hash_us: hash,
                }),
            },
            source_lag_ms: f.source_lag_ms,
            splitter_send_lag_ms: f.splitter_send_lag_ms,
            cores: f.cores,
            machine_noise_ms: f.machine_noise_ms,
            intervals: o.intervals,
        }
    }

    /// The final summary (vegeta / wrk2 style).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let tx_name = if c.mode == "splitter" {
            "splitter"
        } else {
            "baseline"
        };
        let teams = if c.mode == "splitter" {
            format!("splitter, teams of {}", c.team_size)
        } else {
            c.mode.clone()
        };
        let _ = writeln!(
            s,
            "\n{} peers ({teams}), {} B chunks at {:.3} Mbit/s ({:.1} chunks/s), {:.0} s measured",
            self.joins.ok,
            c.chunk_size,
            c.bitrate_bps as f64 / 1e6,
            c.chunks_per_second,
            self.measured_seconds
        );
        if c.mode == "splitter" {
            let j = &self.joins;
            let _ = writeln!(
                s,
                "  Joins      {} ok, {} failed in {:.2} s   join time p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                j.ok, j.failed, j.seconds, j.latency_ms.p50, j.latency_ms.p99, j.latency_ms.max
            );
            for e in &j.errors {
                let _ = writeln!(s, "             error: {e}");
            }
        }
        let t = &self.chunks;
        let _ = writeln!(
            s,
            "  Chunks     played {}  lost {} ({:.4} %)  late {}  duplicates {}  out of window {}  unstamped {}",
            group(t.played),
            group(t.lost),
            self.loss_ratio * 100.0,
            group(t.late),
            group(t.duplicates),
            group(t.out_of_window),
            group(t.unstamped)
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  Latency    mean {:.3} ms  stdev {:.3} ms  max {:.3} ms  ({} samples, source schedule to peer)",
            l.mean,
            l.stdev,
            l.max,
            group(l.count)
        );
        let _ = writeln!(
            s,
            "  Latency Distribution (HdrHistogram - Recorded Latency)"
        );
        for (name, v) in [
            ("50.000%", l.p50),
            ("90.000%", l.p90),
            ("99.000%", l.p99),
            ("99.900%", l.p99_9),
            ("99.990%", l.p99_99),
            ("100.000%", l.max),
        ] {
            let _ = writeln!(s, "   {name:>8}  {v:9.3} ms");
        }
        let f = &self.fanout;
        let _ = write!(
            s,
            "  Fan-out    peers rx {} dgram/s ({:.3} Gbit/s), peers tx {} dgram/s",
            group(f.rx_datagrams_per_s.round() as u64),
            f.rx_gbit_per_s,
            group(f.peer_tx_datagrams_per_s.round() as u64)
        );
        if let (Some(d), Some(del)) = (f.socket_drops, f.delivered_datagrams_per_s)
            && d > 0
        {
            let _ = write!(
                s,
                "; {} dropped at full peer sockets (delivered {} dgram/s)",
                group(d),
                group(del.round() as u64)
            );
        }
        match (f.tx_datagrams_per_s, f.tx_gbit_per_s) {
            (Some(d), Some(g)) => {
                let _ = writeln!(
                    s,
                    "; {tx_name} tx {} dgram/s ({g:.3} Gbit/s), drops {}",
                    group(d.round() as u64),
                    f.tx_drops.unwrap_or(0)
                );
            }
            _ => {
                let _ = writeln!(s);
            }
        }
        if self.splitters.len() > 1 {
            let _ = writeln!(s, "  By splitter (adding up to the figures above)");
            for p in &self.splitters {
                let _ = writeln!(
                    s,
                    "   {:<21} {} peers  played {}  lost {} ({:.4} %)  rx {} dgram/s  tx {} dgram/s  latency p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
                    p.splitter,
                    p.peers,
                    group(p.chunks.played),
                    group(p.chunks.lost),
                    p.loss_ratio * 100.0,
                    group(p.rx_datagrams_per_s.round() as u64),
                    group(p.peer_tx_datagrams_per_s.round() as u64),
                    p.latency_ms.p50,
                    p.latency_ms.p99,
                    p.latency_ms.max
                );
            }
        }
        if let Some(cpu) = &self.sender_cpu {
            let _ = writeln!(
                s,
                "  {:<10} CPU user {:.2} s  system {:.2} s  = {:.2} cores; user share {:.1} %",
                if c.mode == "splitter" {
                    "Splitter"
                } else {
                    "Baseline"
                },
                cpu.user_s,
                cpu.system_s,
                cpu.cores,
                cpu.user_share * 100.0
            );
        }
        let o = &self.loadgen;
        let _ = writeln!(
            s,
            "  Loadgen    {:.2} µs CPU per received datagram ({:.2} s on {} worker(s)), process {:.2} s; RSS {:.0} MiB, peak {:.0} MiB",
            o.cpu_us_per_datagram,
            o.worker_cpu_s,
            c.threads,
            o.process_cpu_s,
            o.rss_mib,
            o.rss_peak_mib
        );
        if let Some(v) = &o.verify {
            let _ = writeln!(
                s,
                "  Verifying  {:.2} µs CPU per chunk received ({} signatures at {:.1} µs, {} chunk hashes at {:.2} µs, over {} chunks)",
                v.us_per_chunk,
                v.signatures,
                v.signature_us,
                v.hashes,
                v.hash_us,
                self.chunks.chunks
            );
        }
        if let Some(m) = &self.splitter_memory {
            let _ = writeln!(
                s,
                "  Splitter   RSS {:.0} MiB ({:.2} KiB per peer), peak {:.0} MiB",
                m.rss_mib, m.rss_per_peer_kib, m.rss_peak_mib
            );
        }
        if o.recv_enobufs + o.recv_truncated + o.recv_errors > 0 {
            let _ = writeln!(
                s,
                "  Receive    buffer ring ran dry {} times ({} re-arms), {} truncated, {} errors",
                o.recv_enobufs, o.recv_rearms, o.recv_truncated, o.recv_errors
            );
        }
        if let Some(lag) = &self.source_lag_ms {
            let _ = writeln!(
                s,
                "  Source lag p99 {:.3} ms  max {:.3} ms (writes behind the schedule latency is measured from)",
                lag.p99, lag.max
            );
            let w = &self.latency_from_write_ms;
            let _ = writeln!(
                s,
                "  From write p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms (receive minus the source's actual write: the source's lag left out)",
                w.p50, w.p99, w.p99_9, w.max
            );
        }
        if let Some(l) = &self.splitter_send_lag_ms {
            let _ = writeln!(
                s,
                "  Send lag   p99 {:.3} ms (median second), {:.3} ms (worst second)  max {:.3} ms (the splitter's own: its feed's reading a chunk to its last send)",
                l.p99_median, l.p99_worst, l.max
            );
        }
        if !self.cores.is_empty() {
            let parts: Vec<String> = self
                .cores
                .iter()
                .map(|c| {
                    let steal = if c.steal_pct > 0.0 {
                        format!(" steal {:.0} %", c.steal_pct)
                    } else {
                        String::new()
                    };
                    format!(
                        "{} user {:.0} % system {:.0} % irq {:.0} % idle {:.0} %{steal}",
                        c.core, c.user_pct, c.system_pct, c.irq_pct, c.idle_pct
                    )
                })
                .collect();
            let _ = writeln!(s, "  Cores      {}", parts.join("; "));
        }
        if let Some(n) = &self.machine_noise_ms {
            let _ = writeln!(
                s,
                "  Machine    1 ms sleeps woke late p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms (scheduling noise, not loadgen's or the splitter's)",
                n.p50, n.p99, n.p99_9, n.max
            );
        }
        s
    }
}

/// The HdrHistogram percentile distribution in milliseconds, as wrk2 (and HdrHistogram's
/// `outputPercentileDistribution`) print it; plotted by HdrHistogram's online plotter.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total = 0u64;
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = ms(v.value_iterated_to());
            if q < 1.0 {
                let _ = writeln!(
                    s,
                    "{value:12.3} {q:14.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(s, "{value:12.3} {q:14.12} {total:10}");
            }
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1e6,
        h.stdev() / 1e6
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        ms(h.max()),
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        h.distinct_values()
    );
    s
}

/// Writes the SVG: the latency percentile curve on top, the per-second throughput and loss
/// timeline below.
pub fn plot(
    path: &Path,
    h: &Histogram<u64>,
    intervals: &[Interval],
    title: &str,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(430);

    // Latency by percentile: x is the number of nines, -log10(1 - p).
    let mut points = Vec::new();
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                points.push((-(1.0 - q).log10(), ms(v.value_iterated_to())));
            }
        }
    }
    let x_max = points.last().map_or(1.0, |p| p.0).clamp(1.0, 6.0);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(0.001) * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Latency by percentile (source schedule to peer)",
            ("sans-serif", 16),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_labels(7)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            format!("{p:.3}%")
        })
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(points, &BLUE))
        .map_err(|e| err(&e))?;

    // Timeline.
    let t_max = intervals.last().map_or(1, |i| i.t + 1) as f64;
    let g_max = intervals
        .iter()
        .map(|i| i.rx_gbit_per_s)
        .fold(0.0, f64::max)
        .max(0.001)
        * 1.15;
    let l_max = intervals
        .iter()
        .map(|i| i.loss_pct)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "Per second: received Gbit/s (blue), loss % (red)",
            ("sans-serif", 16),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..g_max)
        .map_err(|e| err(&e))?
        .set_secondary_coord(0.0..t_max, 0.0..l_max);
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("Gbit/s received")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("loss %")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            intervals
                .iter()
                .map(|i| (i.t as f64 + 0.5, i.rx_gbit_per_s)),
            &BLUE,
        ))
        .map_err(|e| err(&e))?;
    chart
        .draw_secondary_series(LineSeries::new(
            intervals.iter().map(|i| (i.t as f64 + 0.5, i.loss_pct)),
            &RED,
        ))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `text` to `path`, naming the file in the error.
pub fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Where the report goes beside the summary on stdout: `--json`, `--hgrm`, `--plot`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs<'a> {
    /// The report as JSON.
    pub json: Option<&'a Path>,
    /// The latency percentile distribution.
    pub hgrm: Option<&'a Path>,
    /// The SVG plot.
    pub plot: Option<&'a Path>,
}

impl Report {
    /// Prints the summary and writes the files `out` asks for; `scheduled` is the latency from
    /// the source's schedule, which the `.hgrm` and the plot's percentile curve show.
    pub fn emit(&self, scheduled: &Histogram<u64>, out: Outputs<'_>) -> anyhow::Result<()> {
        print!("{}", self.summary());
        if let Some(p) = out.json {
            write_file(p, &serde_json::to_string_pretty(self)?)?;
        }
        if let Some(p) = out.hgrm {
            write_file(p, &hgrm(scheduled))?;
        }
        if let Some(p) = out.plot {
            plot(p, scheduled, &self.intervals, &self.plot_title())?;
        }
        Ok(())
    }

    /// The plot's title: peers joined, chunk size, bit rate, mode.
    fn plot_title(&self) -> String {
        format!(
            "loadgen: {} peers, {} B chunks at {:.2} Mbit/s, {}",
            self.joins.ok,
            self.config.chunk_size,
            self.config.bitrate_bps as f64 / 1e6,
            self.config.mode
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tally::latency_histogram;

    fn sample_hist() -> Histogram<u64> {
        let mut h = latency_histogram();
        for i in 1..=10_000u64 {
            h.record(i * 1000).unwrap(); // 1 µs .. 10 ms
        }
        h
    }

    #[test]
    fn latency_percentiles_in_ms() {
        let l = Latency::of(&sample_hist());
        assert_eq!(l.count, 10_000);
        assert!((l.p50 - 5.0).abs() < 0.01, "{l:?}");
        assert!((l.p99 - 9.9).abs() < 0.01, "{l:?}");
        assert!((l.max - 10.0).abs() < 0.01, "{l:?}");
        assert!(l.min <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p99_9);
        assert_eq!(Latency::of(&latency_histogram()), Latency::default());
    }

    #[test]
    fn hgrm_has_wrk2_columns_and_footer() {
        let text = hgrm(&sample_hist());
        let mut lines = text.lines();
        let head = lines.next().unwrap();
        for col in ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"] {
            assert!(head.contains(col));
        }
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.contains("Value"))
            .collect();
        assert!(rows.len() > 20);
        // Last row is the 100th percentile with the whole count, and no 1/(1-p) column.
        let last: Vec<&str> = rows.last().unwrap().split_whitespace().collect();
        assert_eq!(last.len(), 3);
        assert_eq!(last[1].parse::<f64>().unwrap(), 1.0);
        assert_eq!(last[2], "10000");
        assert!(text.contains("#[Mean    ="));
        assert!(text.contains("Total count    =        10000]"));
    }

    #[test]
    fn json_report_has_the_documented_fields() {
        let h = sample_hist();
        let mut t = Tally {
            datagrams: 100,
            bytes: 102_600,
            played: 99,
            lost: 1,
            ..Tally::default()
        };
        t.chunks = 100;
        let iv = Interval::new(3, "measure", 10, &t, &h, Some(50.0));
        assert!((iv.loss_pct - 1.0).abs() < 1e-9);
        assert!(iv.line("splitter").contains("loss   1.000 %"));
        let r = Report {
            loadgen_version: "0",
            config: Config {
                mode: "splitter".into(),
                splitter: "127.0.0.1:1".into(),
                splitter_child: true,
                peers: 10,
                team_size: 2,
                chunk_size: 1024,
                bitrate_bps: 1_000_000,
                chunks_per_second: 122.0,
                duration_s: 1.0,
                join_rate: 100.0,
                shards: Some(1),
                io: Some("auto".into()),
                buffer_size: Some(256),
                monitors: 0,
                threads: 1,
                addresses: vec!["127.0.0.1".into()],
                sockets: "per-peer".into(),
                recv_path: "io_uring".into(),
                seed: 1,
            },
            joins: Joins::default(),
            measured_seconds: 1.0,
            chunks: t,
            loss_ratio: t.loss_ratio(),
            latency_ms: Latency::of(&h),
            latency_from_write_ms: Latency::of(&h),
            fanout: Fanout::default(),
            splitters: ["127.0.0.1:1", "127.0.0.1:2"]
                .iter()
                .map(|s| PerSplitter {
                    splitter: s.to_string(),
                    peers: 5,
                    chunks: t,
                    loss_ratio: t.loss_ratio(),
                    latency_ms: Latency::of(&h),
                    rx_datagrams_per_s: 50.0,
                    peer_tx_datagrams_per_s: 0.0,
                })
                .collect(),
            sender_cpu: Some(Cpu::default()),
            splitter_memory: None,
            loadgen: Own::default(),
            source_lag_ms: Some(Latency::of(&h)),
            splitter_send_lag_ms: SendLag::of(&[(1.0, 2.0), (3.0, 9.0), (2.0, 4.0)]),
            cores: vec![CoreUse::of(
                "cpu0",
                &crate::procfs::CoreTicks {
                    user: 1,
                    system: 5,
                    irq: 3,
                    idle: 1,
                    steal: 0,
                },
            )],
            machine_noise_ms: Some(Latency::of(&h)),
            intervals: vec![iv],
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for path in [
            "/config/peers",
            "/config/mode",
            "/joins/ok",
            "/joins/latency_ms/p99",
            "/measured_seconds",
            "/chunks/played",
            "/chunks/lost",
            "/chunks/late",
            "/chunks/duplicates",
            "/loss_ratio",
            "/latency_ms/p50",
            "/latency_ms/p99_99",
            "/latency_ms/max",
            "/latency_from_write_ms/p99_9",
            "/source_lag_ms/max",
            "/machine_noise_ms/p99",
            "/splitter_send_lag_ms/p99_worst",
            "/cores/0/irq_pct",
            "/fanout/rx_datagrams_per_s",
            "/fanout/tx_datagrams_per_s",
            "/sender_cpu/user_share",
            "/loadgen/cpu_us_per_datagram",
            "/loadgen/rss_peak_mib",
            "/intervals/0/loss_pct",
            "/intervals/0/p99_ms",
            "/splitters/1/splitter",
            "/splitters/1/peers",
            "/splitters/1/chunks/played",
            "/splitters/1/loss_ratio",
            "/splitters/1/latency_ms/p99",
            "/splitters/1/rx_datagrams_per_s",
        ] {
            assert!(v.pointer(path).is_some(), "missing {path}");
        }
        assert_eq!(v.pointer("/chunks/lost").unwrap(), 1);
        assert_eq!(
            r.plot_title(),
            "loadgen: 0 peers, 1024 B chunks at 1.00 Mbit/s, splitter"
        );
        let text = r.summary();
        assert!(text.contains("99.990%"));
        assert!(text.contains("By splitter"), "{text}");
        assert!(
            text.contains("   127.0.0.1:2           5 peers  played 99  lost 1"),
            "{text}"
        );
        assert!(text.contains("From write p50"));
        assert!(text.contains(
            "Send lag   p99 2.000 ms (median second), 3.000 ms (worst second)  max 9.000 ms"
        ));
        assert_eq!(SendLag::of(&[]), None);
        assert!(text.contains("Cores      cpu0 user 10 % system 50 % irq 30 % idle 10 %\n"));
        assert!(text.contains("Machine    1 ms sleeps woke late"));
    }

    #[test]
    fn plot_writes_an_svg() {
        let h = sample_hist();
        let t = Tally::default();
        let ivs: Vec<Interval> = (0..5)
            .map(|k| Interval::new(k, "measure", 1, &t, &h, None))
            .collect();
        let path = std::env::temp_dir().join(format!("loadgen-plot-{}.svg", std::process::id()));
        plot(&path, &h, &ivs, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("percentile"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }
}
