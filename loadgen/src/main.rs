//! `loadgen`: thousands of real P2PSP peers against a splitter, measuring fan-out, latency and
//! loss; or, with `--baseline sendmmsg`, the same peers fed by a bare `sendmmsg` loop, the
//! kernel's best with no protocol.
//!
//! With no flags it starts its timestamped source and a `p2psp splitter` child fed by it, joins
//! 1000 peers, streams for 10 s, prints the report and exits 0. See `loadgen/README.md`.
//!
//! Exit codes: 0 the run completed (whatever it measured), 1 it could not run or was cut short
//! (setup failed, every join failed, the splitter died), 2 bad flags.

mod baseline;
mod child;
mod noise;
mod peers;
mod procfs;
mod report;
mod source;
mod stamp;
mod tally;

use p2psp::config::parse_duration;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mimalloc::MiMalloc;
use p2psp::driver::{self, RecvPath, SendPath};
use p2psp::splitter::settings::parse_bitrate;

use crate::child::{ChildSettings, SplitterChild};
use crate::peers::{JoinOptions, JoinResult, NewPeer, Shared, WorkerOptions};
use crate::procfs::CpuTimes;
use crate::report::{Cpu, Fanout, Interval, Joins, Latency, Own};
use crate::tally::{Latencies, Tally, latency_histogram};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Load generator for the P2PSP splitter: thousands of real DBS peers (own UDP socket, compat
/// join, hellos, relaying and debts through the same protocol core as `p2psp peer`) measure
/// fan-out, source-to-peer latency and loss.
///
/// With no flags: starts a timestamped source and a `p2psp splitter` child, joins 1000 peers,
/// streams 10 s, prints one line per second and a summary. `--baseline sendmmsg` replaces the
/// splitter by a bare sendmmsg fan-out loop to the same peer sockets.
///
/// Exit codes: 0 run completed, 1 could not run or cut short, 2 bad flags.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Peers to run.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Most peers per team (passed to the splitter child; the baseline ignores it).
    #[arg(long, default_value_t = 16)]
    team_size: usize,
    /// Stream rate: chunk payload bits per second (k, M, G suffixes).
    #[arg(long, default_value = "1M", value_parser = parse_bitrate, value_name = "BITS/S")]
    bitrate: u64,
    /// Chunk payload bytes.
    #[arg(long, default_value_t = 1024)]
    chunk_size: usize,
    /// Seconds to measure once every peer has joined (`10`, `10s`, `2m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "TIME")]
    duration: Duration,
    /// Joins started per second.
    #[arg(long, default_value_t = 1000.0)]
    join_rate: f64,
    /// Target a splitter started by hand instead of starting one.
    #[arg(long, value_name = "HOST:PORT")]
    splitter: Option<String>,
    /// With --splitter: serve the timestamped source here, for that splitter's
    /// `--source http://ADDR/loadgen` (start loadgen first; the splitter connects at start).
    #[arg(long, value_name = "ADDR", requires = "splitter")]
    source_listen: Option<SocketAddrV4>,
    /// The `p2psp` binary to start [default: next to loadgen's own executable].
    #[arg(long, value_name = "PATH")]
    splitter_bin: Option<PathBuf>,
    /// Splitter shards (child) [default: cores minus worker threads, at least 1].
    #[arg(long)]
    shards: Option<usize>,
    /// Splitter send path (child): auto, io_uring or sendmmsg.
    #[arg(long, default_value = "auto", value_name = "PATH")]
    io: String,
    /// Peers' playout buffer in chunks (child); memory is about peers x buffer/2 x chunk size.
    #[arg(long, default_value_t = 256)]
    buffer_size: u32,
    /// Monitors per team: peer i joins as a monitor when i % team-size < monitors.
    #[arg(long, default_value_t = 0)]
    monitors: usize,
    /// Replace the splitter by a bare fan-out loop (peers do not join, they receive and count).
    #[arg(long, value_enum, value_name = "KIND")]
    baseline: Option<Baseline>,
    /// Worker threads running the peers [default: one per core when peers relay (team size over
    /// 1), else half the cores, at least 1].
    #[arg(long)]
    threads: Option<usize>,
    /// Threads doing joins (blocking TCP, paced by --join-rate).
    #[arg(long, default_value_t = 8)]
    join_threads: usize,
    /// Local 127.x addresses to spread peers over [default: enough for the ephemeral port range].
    #[arg(long)]
    addresses: Option<usize>,
    /// Receive buffer per peer socket, bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    rcvbuf: usize,
    /// Workers' receive path: io_uring or poll [default: io_uring where the kernel allows].
    #[arg(long, value_name = "PATH")]
    recv: Option<RecvPath>,
    /// Seed for the join schedule's jitter.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not pin worker threads (and the baseline loop) to cores.
    #[arg(long)]
    no_pin: bool,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// No per-second lines.
    #[arg(long, short)]
    quiet: bool,
    /// Write the report as JSON (fields in loadgen/README.md).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write the latency percentile distribution (HdrHistogram .hgrm, as wrk2).
    #[arg(long, value_name = "PATH")]
    hgrm: Option<PathBuf>,
    /// Write an SVG plot: latency by percentile and the per-second throughput and loss.
    #[arg(long, value_name = "PATH.svg")]
    plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Baseline {
    /// One socket, one chunk buffer, sendmmsg batches of 64.
    Sendmmsg,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check(&args) {
        eprintln!("loadgen: {e}");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn check(a: &Args) -> Result<(), String> {
    if a.peers == 0 {
        return Err("--peers must be at least 1".into());
    }
    if a.chunk_size < stamp::STAMP_LEN.max(p2psp::proto::wire::MIN_CHUNK_SIZE)
        || a.chunk_size > 65000
    {
        return Err(format!(
            "--chunk-size {} must be between 64 and 65000",
            a.chunk_size
        ));
    }
    if !(a.join_rate > 0.0 && a.join_rate <= 100_000.0) {
        return Err(format!(
            "--join-rate {} must be in (0, 100000]",
            a.join_rate
        ));
    }
    if a.team_size == 0 {
        return Err("--team-size must be at least 1".into());
    }
    if a.threads == Some(0) || a.join_threads == 0 {
        return Err("--threads and --join-threads must be at least 1".into());
    }
    if a.addresses == Some(0) || a.addresses.is_some_and(|n| n > 250) {
        return Err("--addresses must be between 1 and 250".into());
    }
    if a.baseline.is_some() && a.splitter.is_some() {
        return Err("--baseline replaces the splitter: drop --splitter".into());
    }
    Ok(())
}

/// Phases of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Join,
    Measure,
    Leave,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Join => "join",
            Phase::Measure => "measure",
            Phase::Leave => "leave",
        }
    }
}

/// One interval's sum over workers.
struct Agg {
    reports: usize,
    tally: Tally,
    hist: Latencies,
    peers: usize,
    cpu: Duration,
}

impl Default for Agg {
    fn default() -> Self {
        Agg {
            reports: 0,
            tally: Tally::default(),
            hist: Latencies::default(),
            peers: 0,
            cpu: Duration::ZERO,
        }
    }
}

/// What sends the chunks.
enum Sender {
    Child(SplitterChild),
    Manual(SocketAddrV4),
    Baseline {
        stats: Arc<baseline::BaselineStats>,
        stop: Arc<AtomicBool>,
        handle: Option<thread::JoinHandle<anyhow::Result<baseline::BaselineEnd>>>,
        end: Option<baseline::BaselineEnd>,
    },
}

fn local_ips(n: usize) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|k| Ipv4Addr::new(127, 0, 0, 1 + k as u8))
        .collect()
}

fn run(a: &Args) -> anyhow::Result<()> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let ncores = cores.len().max(1);
    // Relaying peers carry most of the load (they send about what they receive); with teams of
    // one the splitter does, and gets the cores the workers leave.
    let relaying = a.team_size > 1 && a.baseline.is_none();
    let threads = a.threads.unwrap_or(if relaying {
        ncores
    } else {
        (ncores / 2).max(1)
    });
    let shards = a.shards.unwrap_or((ncores.saturating_sub(threads)).max(1));
    let chunks_per_second = a.bitrate as f64 / (8.0 * a.chunk_size as f64);
    let mode = if a.baseline.is_some() {
        "baseline-sendmmsg"
    } else {
        "splitter"
    };

    // File descriptors: one per peer, plus join sockets in flight, rings, pipes.
    let need = a.peers as u64 + 4 * a.join_threads as u64 + 256;
    let got = driver::raise_nofile_limit(need + 1024).context("cannot read RLIMIT_NOFILE")?;
    if got < need {
        bail!(
            "--peers {} needs about {need} file descriptors but RLIMIT_NOFILE stops at {got}; \
             raise the hard limit (ulimit -Hn) or run fewer peers",
            a.peers
        );
    }
    // Ports: each peer holds one UDP port on its address (and its join's TCP port, the same
    // number); use at most half the ephemeral range per address.
    let (lo, hi) = procfs::local_port_range();
    let per_ip = (usize::from(hi) - usize::from(lo)).div_ceil(2).max(1);
    let naddr = a.addresses.unwrap_or(a.peers.div_ceil(per_ip)).max(1);
    if naddr > 250 {
        bail!("--peers {} needs more than 250 local addresses", a.peers);
    }
    let ips = local_ips(naddr);

    let recv_path = a.recv.unwrap_or_else(RecvPath::detect);
    let send_path = match recv_path {
        RecvPath::Uring => SendPath::detect(),
        RecvPath::Poll => SendPath::Sendmmsg,
    };

    // The source (not for the baseline, which stamps its own buffer). Its writer runs with the
    // workers on the last core, off the cores of the splitter child's shards (0..shards).
    let source_core = (!a.no_pin && ncores > shards).then(|| cores[ncores - 1]);
    let source = match (&a.baseline, &a.splitter, a.source_listen) {
        (Some(_), _, _) => None,
        (None, None, _) => Some(source::SourceServer::start(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            a.chunk_size,
            chunks_per_second,
            source_core,
        )?),
        (None, Some(_), Some(listen)) => Some(source::SourceServer::start(
            listen,
            a.chunk_size,
            chunks_per_second,
            source_core,
        )?),
        (None, Some(_), None) => None,
    };
    let mut sender = match (&a.baseline, &a.splitter) {
        (Some(_), _) => Sender::Baseline {
            stats: Arc::default(),
            stop: Arc::default(),
            handle: None,
            end: None,
        },
        (None, Some(addr)) => Sender::Manual(
            p2psp::peer::resolve_v4(addr).map_err(|e| anyhow::anyhow!("--splitter {addr}: {e}"))?,
        ),
        (None, None) => {
            let binary = match &a.splitter_bin {
                Some(p) => p.clone(),
                None => SplitterChild::find_binary()?,
            };
            let src = source.as_ref().expect("started above");
            Sender::Child(SplitterChild::start(&ChildSettings {
                binary,
                source: src.url(),
                team_size: a.team_size,
                chunk_size: a.chunk_size,
                buffer_size: a.buffer_size,
                monitors: a.monitors,
                shards,
                io: a.io.clone(),
                extra: Vec::new(),
            })?)
        }
    };
    let splitter_addr = match &sender {
        Sender::Child(c) => Some(c.addr),
        Sender::Manual(addr) => Some(*addr),
        Sender::Baseline { .. } => None,
    };

    // Header, as wrk prints it.
    let target = match (&sender, splitter_addr) {
        (Sender::Child(_), Some(addr)) => format!(
            "splitter {addr} (child, {} shard(s), --io {})",
            shards, a.io
        ),
        (Sender::Manual(_), Some(addr)) => format!("splitter {addr} (started by hand)"),
        _ => "baseline sendmmsg fan-out loop".to_owned(),
    };
    println!(
        "Running {:.0}s test @ {target}\n  {} peers{}, {} B chunks at {:.3} Mbit/s ({:.1} chunks/s), {} worker thread(s) ({} receive), joins at {}/s over {} address(es)",
        a.duration.as_secs_f64(),
        a.peers,
        if a.baseline.is_some() {
            String::new()
        } else {
            format!(" in teams of {}", a.team_size)
        },
        a.chunk_size,
        a.bitrate as f64 / 1e6,
        chunks_per_second,
        threads,
        recv_path,
        a.join_rate,
        naddr,
    );

    // A splitter started by hand may not be up yet (it needs our source first): wait for it.
    if let (Sender::Manual(addr), Some(src)) = (&sender, &source) {
        eprintln!(
            "loadgen: serving the source at {}; waiting up to 120 s for the splitter at {addr}",
            src.url()
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect_timeout(&(*addr).into(), Duration::from_secs(1)).is_err()
        {
            if Instant::now() > deadline {
                bail!("no splitter answered at {addr} within 120 s");
            }
            thread::sleep(Duration::from_millis(200));
        }
        // Let it read a few records (its source connects before it listens).
        thread::sleep(Duration::from_millis(500));
    }

    // Workers: pinned to the last cores (the splitter pins its shards from core 0 on).
    let shared = Arc::new(Shared::new());
    let noise = noise::NoiseProbe::start(shared.interval_start(0))
        .context("cannot start the noise probe thread")?;
    let (report_tx, report_rx) = crossbeam_channel::unbounded::<peers::Report>();
    let mut worker_txs = Vec::new();
    let mut workers = Vec::new();
    let last_seq: Arc<dyn Fn() -> Option<u64> + Send + Sync> = match &sender {
        Sender::Baseline { stats, .. } => {
            let stats = stats.clone();
            Arc::new(move || {
                let n = stats.last_seq_plus_one.load(Ordering::Relaxed);
                n.checked_sub(1)
            })
        }
        _ => Arc::new(|| None),
    };
    for w in 0..threads {
        let (tx, rx) = crossbeam_channel::unbounded::<NewPeer>();
        worker_txs.push(tx);
        let core = (!a.no_pin && ncores > 1)
            .then(|| cores.get(ncores - 1 - (w % ncores)).copied())
            .flatten();
        let opts = WorkerOptions {
            recv_path,
            send_path,
            chunk_size: a.chunk_size,
            core,
        };
        let (report_tx, shared, last_seq) = (report_tx.clone(), shared.clone(), last_seq.clone());
        workers.push(
            thread::Builder::new()
                .name(format!("worker-{w}"))
                .spawn(move || {
                    let r = peers::run_worker(opts, &rx, &report_tx, &shared, &*last_seq);
                    if r.is_err() {
                        shared.stop.store(true, Ordering::SeqCst);
                    }
                    r
                })?,
        );
    }
    drop(report_tx);

    // Peers: joins paced by --join-rate, or bare sockets for the baseline.
    let (join_tx, join_rx) = crossbeam_channel::unbounded::<JoinResult>();
    let mut joiners = Vec::new();
    let join_start = Instant::now();
    if let Some(splitter) = splitter_addr {
        let opts = JoinOptions {
            splitter,
            ips: ips.clone(),
            peers: a.peers,
            rate: a.join_rate,
            team_size: a.team_size,
            monitors: a.monitors,
            rcvbuf: a.rcvbuf,
            seed: a.seed,
        };
        let next = Arc::new(AtomicUsize::new(0));
        for j in 0..a.join_threads.min(a.peers) {
            let (opts, next, txs, results, shared) = (
                opts.clone(),
                next.clone(),
                worker_txs.clone(),
                join_tx.clone(),
                shared.clone(),
            );
            joiners.push(
                thread::Builder::new()
                    .name(format!("join-{j}"))
                    .spawn(move || {
                        peers::run_joiner(&opts, join_start, &next, &txs, &results, &shared)
                    })?,
            );
        }
    } else {
        let mut dests = Vec::with_capacity(a.peers);
        for i in 0..a.peers {
            let socket = peers::bare_socket(ips[i % ips.len()], a.rcvbuf)?;
            let std::net::SocketAddr::V4(addr) = socket.local_addr()? else {
                bail!("not IPv4")
            };
            dests.push(addr);
            shared.joined.fetch_add(1, Ordering::Relaxed);
            let _ = worker_txs[i % threads].send(NewPeer::Bare { socket });
        }
        // The loop starts once every socket is receiving.
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.registered.load(Ordering::Relaxed) < a.peers {
            if Instant::now() > deadline || shared.stop.load(Ordering::Relaxed) {
                bail!("the workers did not take the peer sockets within 30 s");
            }
            thread::sleep(Duration::from_millis(5));
        }
        if let Sender::Baseline {
            stats,
            stop,
            handle,
            ..
        } = &mut sender
        {
            let core = (!a.no_pin && ncores > 1).then(|| cores[0]);
            let (stats, stop) = (stats.clone(), stop.clone());
            let chunk_size = a.chunk_size;
            *handle = Some(
                thread::Builder::new()
                    .name("baseline".into())
                    .spawn(move || {
                        baseline::run(dests, chunk_size, chunks_per_second, core, stats, stop)
                    })?,
            );
        }
    }
    drop(join_tx);

    // Progress bar on a terminal.
    let pb = if a.no_progress || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::with_draw_target(
            Some(a.peers as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        );
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg:10} [{bar:40}] {pos}/{len} {elapsed}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message("joining");
        pb
    };

    // The main loop: collect, print, move through the phases. Every wait below is bounded.
    let tx_name = if a.baseline.is_some() {
        "baseline"
    } else {
        "splitter"
    };
    let mut phase = Phase::Join;
    let mut aggs: BTreeMap<u64, Agg> = BTreeMap::new();
    let mut intervals: Vec<Interval> = Vec::new();
    let mut next_print: u64 = shared.interval(Instant::now());
    let mut total_hist = Latencies::default();
    let mut total = Tally::default();
    let mut worker_cpu = Duration::ZERO;
    let mut measured = 0u64;
    let mut join_hist = latency_histogram();
    let mut join_errors: Vec<String> = Vec::new();
    let mut joins_done_at: Option<Instant> = None;
    let mut measure: Option<(u64, u64)> = None; // [from, until) intervals
    let mut window_marks: BTreeMap<u64, (Option<CpuTimes>, Option<CpuTimes>, u64)> =
        BTreeMap::new();
    // Kernel drops at the peers' sockets and every core's ticks, at the start and the end of the
    // measured seconds.
    let mut drop_marks: BTreeMap<u64, u64> = BTreeMap::new();
    let mut core_marks: BTreeMap<u64, Vec<(String, procfs::CoreTicks)>> = BTreeMap::new();
    let mut seen_interval = u64::MAX;
    let mut leave_deadline: Option<Instant> = None;
    let join_deadline = join_start
        + Duration::from_secs_f64(a.peers as f64 / a.join_rate)
        + Duration::from_secs(30);
    let mut failure: Option<String> = None;
    let mut finished_workers = 0usize;
    let mut recv_stats: Vec<p2psp::driver::RecvStats> = Vec::new();
    loop {
        let now = Instant::now();
        let current = shared.interval(now);
        // Marks at interval starts: splitter CPU, loadgen CPU, baseline datagrams.
        if current != seen_interval {
            seen_interval = current;
            let sender_cpu = match &sender {
                Sender::Child(c) => c.cpu(),
                _ => None,
            };
            let tx = match &sender {
                Sender::Baseline { stats, .. } => stats.datagrams.load(Ordering::Relaxed),
                _ => 0,
            };
            window_marks.insert(current, (sender_cpu, procfs::self_cpu(), tx));
            if let Some((from, until)) = measure
                && (current == from || current == until)
            {
                core_marks.insert(current, procfs::cores());
                let addrs = shared.addrs.lock().unwrap().clone();
                drop_marks.insert(current, procfs::udp_drops(&addrs));
            }
        }
        for r in join_rx.try_iter() {
            match r {
                Ok(t) => join_hist.saturating_record(t.as_nanos() as u64),
                Err(e) => {
                    if join_errors.len() < 5 && !join_errors.contains(&e) {
                        join_errors.push(e);
                    }
                }
            }
        }
        for r in report_rx.try_iter() {
            if r.last {
                finished_workers += 1;
                recv_stats.push(r.recv);
            }
            let agg = aggs.entry(r.index).or_default();
            agg.reports += 1;
            agg.tally.add(&r.tally);
            agg.hist.add(&r.hist);
            agg.peers += r.peers;
            agg.cpu += r.cpu;
        }
        // Print (and account) every interval all workers reported, or that is 2 s overdue.
        while let Some(agg) = aggs.get(&next_print) {
            let overdue = now > shared.interval_start(next_print + 3);
            if agg.reports < threads && !overdue {
                break;
            }
            let agg = aggs.remove(&next_print).expect("present");
            let k = next_print;
            next_print += 1;
            let in_window = measure.is_some_and(|(from, until)| k >= from && k < until);
            let iv_phase = match (in_window, measure) {
                (true, _) => Phase::Measure,
                (false, Some((_, until))) if k >= until => Phase::Leave,
                _ => Phase::Join,
            };
            let tx = interval_tx(&sender, &window_marks, k, &shared);
            let iv = Interval::new(
                k,
                iv_phase.name(),
                agg.peers,
                &agg.tally,
                &agg.hist.scheduled,
                tx,
            );
            if in_window {
                total.add(&agg.tally);
                total_hist.add(&agg.hist);
                worker_cpu += agg.cpu;
                measured += 1;
            }
            if !a.quiet {
                let line = iv.line(tx_name);
                pb.suspend(|| println!("{line}"));
            }
            intervals.push(iv);
        }
        if aggs.is_empty() && next_print < current.saturating_sub(3) {
            next_print = current.saturating_sub(3);
        }
        // The sender must stay alive.
        if let Sender::Child(c) = &mut sender
            && let Some(status) = c.exited()
        {
            failure = Some(format!(
                "the splitter exited ({status}) during the run; it said:\n{}",
                c.log_text()
            ));
        }
        if shared.stop.load(Ordering::Relaxed) && phase != Phase::Leave {
            failure.get_or_insert_with(|| "a worker failed".to_owned());
        }
        if failure.is_some() {
            break;
        }
        let joined = shared.joined.load(Ordering::Relaxed);
        let failed = shared.join_failed.load(Ordering::Relaxed);
        match phase {
            Phase::Join => {
                pb.set_position(joined as u64);
                if joined + failed >= a.peers || now > join_deadline {
                    shared.stop_joins.store(true, Ordering::SeqCst);
                    joins_done_at = Some(now);
                    if joined == 0 {
                        failure = Some(format!(
                            "every join failed; first errors:\n  {}",
                            join_errors.join("\n  ")
                        ));
                        break;
                    }
                    let from = current + 1;
                    let until = from + a.duration.as_secs_f64().ceil().max(1.0) as u64;
                    measure = Some((from, until));
                    phase = Phase::Measure;
                    pb.set_length(until - from);
                    pb.set_position(0);
                    pb.set_message("streaming");
                }
            }
            Phase::Measure => {
                let (from, until) = measure.expect("set when measuring");
                pb.set_position(current.saturating_sub(from).min(until - from));
                if current >= until && next_print >= until {
                    phase = Phase::Leave;
                    pb.set_message("leaving");
                    shared.leave.store(true, Ordering::SeqCst);
                    if let Sender::Baseline { stop, .. } = &sender {
                        stop.store(true, Ordering::SeqCst);
                    }
                    // Peers wait up to 2 s for the splitter's goodbye.
                    leave_deadline = Some(now + Duration::from_millis(2500));
                }
            }
            Phase::Leave => {
                let all_left = shared.left.load(Ordering::Relaxed) >= joined;
                let late = leave_deadline.is_some_and(|d| now > d);
                if (all_left || late || a.baseline.is_some())
                    && !shared.stop.load(Ordering::Relaxed)
                {
                    if let Sender::Baseline { handle, end, .. } = &mut sender
                        && let Some(h) = handle.take()
                    {
                        *end = Some(
                            h.join()
                                .map_err(|_| anyhow::anyhow!("the baseline loop panicked"))??,
                        );
                        // Let the last datagrams land before the receivers count the tail.
                        thread::sleep(Duration::from_millis(200));
                    }
                    shared.stop.store(true, Ordering::SeqCst);
                }
                if finished_workers >= threads {
                    break;
                }
                if late && now > leave_deadline.expect("set") + Duration::from_secs(5) {
                    failure = Some("workers did not stop within 5 s".into());
                    break;
                }
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    shared.stop_joins.store(true, Ordering::SeqCst);
    shared.stop.store(true, Ordering::SeqCst);
    if let Sender::Baseline { stop, .. } = &sender {
        stop.store(true, Ordering::SeqCst);
    }
    pb.finish_and_clear();
    for j in joiners {
        let _ = j.join();
    }
    let mut worker_error = None;
    for w in workers {
        match w.join() {
            Ok(Err(e)) => worker_error = Some(e),
            Err(_) => worker_error = Some(anyhow::anyhow!("a worker thread panicked")),
            Ok(Ok(())) => {}
        }
    }
    // Late reports of measured intervals (the last one of each worker is partial: ignored).
    for r in report_rx.try_iter() {
        if r.last {
            recv_stats.push(r.recv);
        }
        if let Some((from, until)) = measure
            && r.index >= from
            && r.index < until
            && !r.last
        {
            total.add(&r.tally);
            total_hist.add(&r.hist);
            worker_cpu += r.cpu;
        }
    }
    if let Sender::Child(c) = &mut sender {
        c.stop_and_log();
    }
    if let Some(f) = failure {
        if let Some(e) = worker_error {
            bail!("{f}: {e:#}");
        }
        bail!("{f}");
    }
    if let Some(e) = worker_error {
        return Err(e);
    }

    // The report.
    let (from, until) = measure.expect("the run reached its measurement");
    let wall = (until - from) as f64;
    let marks = |k: u64| window_marks.get(&k).copied();
    let sender_cpu = match &sender {
        Sender::Child(_) => match (marks(from), marks(until)) {
            (Some((Some(c0), _, _)), Some((Some(c1), _, _))) => Some(Cpu::new(c1.since(&c0), wall)),
            _ => None,
        },
        // The loop's whole life (it starts before the measured seconds and stops after them).
        Sender::Baseline { end, .. } => end.map(|e| Cpu::new(e.cpu, e.wall.as_secs_f64())),
        Sender::Manual(_) => None,
    };
    let process_cpu = match (marks(from), marks(until)) {
        (Some((_, Some(p0), _)), Some((_, Some(p1), _))) => p1.since(&p0).total().as_secs_f64(),
        _ => 0.0,
    };
    let measured_s = measured.max(1) as f64;
    let window: Vec<&Interval> = intervals.iter().filter(|i| i.phase == "measure").collect();
    let tx_rates: Vec<f64> = window.iter().filter_map(|i| i.tx_datagrams_per_s).collect();
    let tx_datagrams_per_s =
        (!tx_rates.is_empty()).then(|| tx_rates.iter().sum::<f64>() / tx_rates.len() as f64);
    let datagram_bytes = (a.chunk_size + p2psp::proto::wire::CHUNK_HEADER) as f64;
    let tx_drops = match &sender {
        Sender::Child(c) => c.latest().map(|s| s.send_drops),
        Sender::Baseline { stats, .. } => Some(stats.dropped.load(Ordering::Relaxed)),
        Sender::Manual(_) => None,
    };
    let socket_drops = match (drop_marks.get(&from), drop_marks.get(&until)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(*a)),
        _ => None,
    };
    let (rss, hwm) = procfs::self_rss();
    let joined = shared.joined.load(Ordering::Relaxed);
    let report = report::Report {
        loadgen_version: env!("CARGO_PKG_VERSION"),
        config: report::Config {
            mode: mode.to_owned(),
            splitter: splitter_addr.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            splitter_child: matches!(sender, Sender::Child(_)),
            peers: a.peers,
            team_size: a.team_size,
            chunk_size: a.chunk_size,
            bitrate_bps: a.bitrate,
            chunks_per_second,
            duration_s: a.duration.as_secs_f64(),
            join_rate: a.join_rate,
            shards: matches!(sender, Sender::Child(_)).then_some(shards),
            io: matches!(sender, Sender::Child(_)).then(|| a.io.clone()),
            buffer_size: matches!(sender, Sender::Child(_)).then_some(a.buffer_size),
            monitors: a.monitors,
            threads,
            addresses: ips.iter().map(|i| i.to_string()).collect(),
            recv_path: recv_path.to_string(),
            seed: a.seed,
        },
        joins: Joins {
            ok: joined,
            failed: shared.join_failed.load(Ordering::Relaxed),
            seconds: joins_done_at.map_or(0.0, |t| t.duration_since(join_start).as_secs_f64()),
            latency_ms: Latency::of(&join_hist),
            errors: join_errors,
        },
        measured_seconds: measured as f64,
        chunks: total,
        loss_ratio: total.loss_ratio(),
        latency_ms: Latency::of(&total_hist.scheduled),
        latency_from_write_ms: Latency::of(&total_hist.written),
        fanout: Fanout {
            rx_datagrams_per_s: total.datagrams as f64 / measured_s,
            rx_gbit_per_s: total.bytes as f64 * 8.0 / 1e9 / measured_s,
            peer_tx_datagrams_per_s: total.sent as f64 / measured_s,
            socket_drops,
            delivered_datagrams_per_s: socket_drops
                .map(|d| (total.datagrams + d) as f64 / measured_s),
            tx_datagrams_per_s,
            tx_gbit_per_s: tx_datagrams_per_s.map(|d| d * datagram_bytes * 8.0 / 1e9),
            tx_drops,
        },
        sender_cpu,
        loadgen: Own {
            worker_cpu_s: worker_cpu.as_secs_f64(),
            cpu_us_per_datagram: if total.datagrams > 0 {
                worker_cpu.as_secs_f64() * 1e6 / total.datagrams as f64
            } else {
                0.0
            },
            process_cpu_s: process_cpu,
            recv_enobufs: recv_stats.iter().map(|r| r.enobufs).sum(),
            recv_rearms: recv_stats.iter().map(|r| r.rearms).sum(),
            recv_truncated: recv_stats.iter().map(|r| r.truncated).sum(),
            recv_errors: recv_stats.iter().map(|r| r.errors).sum(),
            rss_mib: rss as f64 / (1 << 20) as f64,
            rss_peak_mib: hwm as f64 / (1 << 20) as f64,
        },
        source_lag_ms: source
            .as_ref()
            .and_then(|s| s.stats.lag.lock().unwrap().as_ref().map(Latency::of)),
        splitter_send_lag_ms: match &sender {
            Sender::Child(c) => {
                let (t0, t1) = (shared.interval_start(from), shared.interval_start(until));
                let lags: Vec<(f64, f64)> = c
                    .samples()
                    .iter()
                    .filter(|(t, _)| *t > t0 && *t <= t1)
                    .map(|(_, s)| (s.send_lag_p99_ms, s.send_lag_max_ms))
                    .collect();
                report::SendLag::of(&lags)
            }
            _ => None,
        },
        cores: match (core_marks.get(&from), core_marks.get(&until)) {
            (Some(a), Some(b)) => b
                .iter()
                .filter_map(|(name, t1)| {
                    let (_, t0) = a.iter().find(|(n, _)| n == name)?;
                    Some(report::CoreUse::of(name, &t1.since(t0)))
                })
                .collect(),
            _ => Vec::new(),
        },
        machine_noise_ms: noise.finish(from, until).as_ref().map(Latency::of),
        intervals,
    };
    if let Some(s) = source {
        s.stop();
    }
    print!("{}", report.summary());
    if let Some(p) = &a.json {
        report::write_file(p, &serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(p) = &a.hgrm {
        report::write_file(p, &report::hgrm(&total_hist.scheduled))?;
    }
    if let Some(p) = &a.plot {
        let title = format!(
            "loadgen: {} peers, {} B chunks at {:.2} Mbit/s, {}",
            joined,
            a.chunk_size,
            a.bitrate as f64 / 1e6,
            mode
        );
        report::plot(p, &total_hist.scheduled, &report.intervals, &title)?;
    }
    Ok(())
}

/// Datagrams per second the splitter or the baseline sent during interval `k`: the splitter's
/// status lines that fall in it (averaged), or the baseline's counter between marks.
fn interval_tx(
    sender: &Sender,
    marks: &BTreeMap<u64, (Option<CpuTimes>, Option<CpuTimes>, u64)>,
    k: u64,
    shared: &Shared,
) -> Option<f64> {
    match sender {
        Sender::Child(c) => {
            let (t0, t1) = (shared.interval_start(k), shared.interval_start(k + 1));
            // A status line covers the second before it: take those printed in (t0, t1].
            let in_k: Vec<f64> = c
                .samples()
                .iter()
                .filter(|(t, _)| *t > t0 && *t <= t1 + Duration::from_millis(200))
                .map(|(_, s)| s.datagrams_per_s)
                .collect();
            (!in_k.is_empty()).then(|| in_k.iter().sum::<f64>() / in_k.len() as f64)
        }
        Sender::Baseline { .. } => {
            let a = marks.get(&k)?.2;
            let b = marks.get(&(k + 1))?.2;
            Some(b.saturating_sub(a) as f64)
        }
        Sender::Manual(_) => None,
    }
}
