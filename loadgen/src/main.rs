//! `loadgen`: thousands of real P2PSP peers against a splitter, measuring fan-out, latency and
//! loss; or, with `--baseline sendmmsg`, the same peers fed by a bare `sendmmsg` loop, the
//! kernel's best with no protocol.
//!
//! With no flags it starts its timestamped source and a `p2psp splitter` child fed by it, joins
//! 1000 peers, streams for 10 s, prints the report and exits 0. See `loadgen/README.md`.
//!
//! Exit codes: 0 the run completed (whatever it measured), 1 it could not run or was cut short
//! (setup failed, every join failed, the splitter died), 2 bad flags.
//!
//! A run, in order: `plan.rs` decides threads, cores and descriptors; `startup.rs` starts the
//! source, the sender (`sender.rs`), the workers and the joiners; the loop here feeds the
//! sans-IO `collector.rs` and carries out its commands while `marks.rs` reads `/proc`; then
//! everything stops and `report.rs` builds, prints and writes the report.

mod baseline;
mod child;
mod collector;
mod marks;
mod noise;
mod peers;
mod plan;
mod procfs;
mod report;
mod sched;
mod sender;
mod source;
mod stamp;
mod startup;
mod tally;

use p2psp::config::parse_duration;
use std::io::IsTerminal;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mimalloc::MiMalloc;
use p2psp::driver::{self, RecvPath};
use p2psp::splitter::settings::parse_bitrate;

use crate::collector::{Collector, Command, Counts, Phase, Status};
use crate::marks::Marks;
use crate::peers::{Shared, SocketMode};
use crate::plan::{Plan, PlanInput};
use crate::report::{Latency, Report};
use crate::sender::Sender;
use crate::startup::Started;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Load generator for the P2PSP splitter: thousands of real DBS peers (a UDP socket each, or a
/// 127.x.y.z address each on a shared socket; compat join, hellos, relaying and debts through the
/// same protocol core as `p2psp peer`) measure fan-out, source-to-peer latency and loss.
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
    /// Target a splitter started by hand instead of starting one. Several, comma-separated
    /// (`a:8001,b:8001,c:8001`): peer i joins the (i mod n)-th, each worker thread serves one
    /// splitter's peers, and the report gives the figures by splitter beside the totals.
    #[arg(long, value_name = "HOST:PORT[,...]")]
    splitter: Option<String>,
    /// With --splitter: serve the timestamped source here, for that splitter's (or those
    /// splitters') `--source http://ADDR/loadgen` (start loadgen first; a splitter connects at
    /// start).
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
    /// Receive buffer per peer socket, bytes (shared sockets get this times their peers, 8 to
    /// 128 MiB).
    #[arg(long, default_value_t = 256 * 1024)]
    rcvbuf: usize,
    /// Peer endpoints: `per-peer` (a UDP socket each) or `shared` (one socket per worker, a peer
    /// is a 127.x.y.z address) [default: per-peer up to 10,000 peers, shared above; per-peer for
    /// the baseline].
    #[arg(long, value_enum, value_name = "MODE")]
    sockets: Option<SocketMode>,
    /// Shared sockets read with recvmmsg: microseconds a worker naps after a read that emptied
    /// its socket, to wake once for what arrives meanwhile (0: never) [default: 20 with teams of
    /// 1, where datagrams come in bursts; 0 with relaying teams, where they trickle].
    #[arg(long, value_name = "MICROS")]
    recv_nap: Option<u64>,
    /// Workers' receive path: io_uring or poll [default: io_uring where the kernel allows with
    /// per-peer sockets, poll (recvmmsg) with shared sockets].
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
    /// Scheduler slice (Linux 6.12+) of the threads that put chunks on the wire: passed to the
    /// splitter child as its `--thread-slice`, and applied to the source's writer and to the
    /// baseline loop, so that both kinds of run are alike (`off`: the kernel's default).
    #[arg(long, default_value = "off", value_parser = p2psp::splitter::settings::parse_slice, value_name = "DURATION|off")]
    thread_slice: p2psp::splitter::settings::ThreadSlice,
    /// Real-time `SCHED_FIFO` priority (1-99) of the threads that put chunks on the wire: passed
    /// to the splitter child as its `--rt-priority`, and applied to the source's writer and to
    /// the baseline loop, so that both kinds of run are alike; the peers' workers stay in the
    /// ordinary class. Needs root or CAP_SYS_NICE (`off`: the ordinary scheduler).
    #[arg(long, default_value = "off", value_parser = p2psp::splitter::settings::parse_rt_priority, value_name = "1-99|off")]
    rt_priority: p2psp::splitter::settings::RtPriority,
    /// CIS (docs/integrity.md): start the splitter child with `--sign KEYFILE` (created on first
    /// use); the peers verify with the key it prints (unless --no-verify), and the report shows
    /// what verifying cost them.
    #[arg(long, value_name = "KEYFILE", conflicts_with = "splitter")]
    sign: Option<PathBuf>,
    /// With --sign: the child's `--sign-mode` (`digest`: one signed digest per group of chunks;
    /// `chunk`: a signature per chunk).
    #[arg(long, default_value = "digest", value_name = "MODE", value_parser = ["digest", "chunk"])]
    sign_mode: String,
    /// The peers verify with this splitter key (64 hex digits, as `p2psp splitter --sign`
    /// prints it), for a splitter started by hand with `--sign`.
    #[arg(long, value_name = "HEX", value_parser = p2psp::proto::integrity::ChunkVerifier::from_hex)]
    splitter_key: Option<p2psp::proto::integrity::ChunkVerifier>,
    /// With --sign --sign-mode digest: the peers join the signed team without verifying
    /// (digests are counted and ignored): the splitter's cost alone, as perf/fanout-ratio.sh
    /// measures it.
    #[arg(long, requires = "sign")]
    no_verify: bool,
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
    sched::check(p2psp::splitter::settings::WireSched {
        slice: a.thread_slice.0,
        rt_priority: a.rt_priority.0,
    })?;
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
    if a.baseline.is_some() && a.sockets == Some(SocketMode::Shared) {
        return Err("--baseline runs per-peer sockets only: drop --sockets shared".into());
    }
    if a.baseline.is_some() && a.splitter.is_some() {
        return Err("--baseline replaces the splitter: drop --splitter".into());
    }
    Ok(())
}

/// One run: the plan, start-up (`startup.rs`), the collecting loop, the stop, the report.
fn run(a: &Args) -> anyhow::Result<()> {
    sched::set(p2psp::splitter::settings::WireSched {
        slice: a.thread_slice.0,
        rt_priority: a.rt_priority.0,
    });
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let plan = plan(a, cores.len())?;
    // One socket per worker: recvmmsg drains up to 64 datagrams per call, cheaper per datagram
    // than a completion each (loadgen/README.md, "Socket modes"); many sockets: io_uring.
    let recv_path = a.recv.unwrap_or_else(|| match plan.sockets {
        SocketMode::Shared => RecvPath::Poll,
        SocketMode::PerPeer => RecvPath::detect(),
    });
    let mut st = startup::start(a, &plan, &cores, recv_path)?;
    let (collector, marks, failure) = collect(a, &plan, &mut st);
    let collector = stop(&mut st, collector, failure)?;
    let outcome = collector
        .finish()
        .context("the run never reached its measurement")?;
    finish(a, &plan, recv_path, st, &marks, outcome)
}

/// The run's plan for `ncores` cores, with the file descriptor limit raised to what it needs.
fn plan(a: &Args, ncores: usize) -> anyhow::Result<Plan> {
    let splitters = match (&a.splitter, &a.baseline) {
        (Some(s), None) => p2psp::peer::resolve_all_v4(s)
            .map_err(|e| anyhow::anyhow!("--splitter {s}: {e}"))?
            .len(),
        _ => 1,
    };
    let plan = Plan::new(
        &PlanInput {
            peers: a.peers,
            team_size: a.team_size,
            baseline: a.baseline.is_some(),
            threads: a.threads,
            shards: a.shards,
            join_threads: a.join_threads,
            addresses: a.addresses,
            bitrate: a.bitrate,
            chunk_size: a.chunk_size,
            sockets: a.sockets,
            rcvbuf: a.rcvbuf,
            splitters,
        },
        ncores,
        procfs::local_port_range(),
    )
    .map_err(anyhow::Error::msg)?;
    let got = driver::raise_nofile_limit(plan.fds + 1024).context("cannot read RLIMIT_NOFILE")?;
    if got < plan.fds {
        bail!(
            "--peers {} needs about {} file descriptors but RLIMIT_NOFILE stops at {got}; \
             raise the hard limit (ulimit -Hn) or run fewer peers",
            a.peers,
            plan.fds
        );
    }
    Ok(plan)
}

/// The progress bar on a terminal (hidden otherwise or with `--no-progress`).
fn progress_bar(a: &Args) -> ProgressBar {
    if a.no_progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb =
        ProgressBar::with_draw_target(Some(a.peers as u64), ProgressDrawTarget::stderr_with_hz(4));
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:10} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message("joining");
    pb
}

/// The main loop: feeds the collector, prints, carries out its commands. Every wait in it is
/// bounded. Returns the collector, the readings taken, and why the run failed, if it did.
fn collect(a: &Args, plan: &Plan, st: &mut Started) -> (Collector, Marks, Option<String>) {
    let tx_name = if a.baseline.is_some() {
        "baseline"
    } else {
        "splitter"
    };
    let pb = progress_bar(a);
    let mut c = Collector::new(collector_settings(a, plan, st), Instant::now());
    let mut marks = Marks::default();
    let mut commands = Vec::new();
    let failure = loop {
        let now = Instant::now();
        let current = c.interval(now);
        marks.take(current, c.measure(), &st.sender, &st.shared);
        for r in st.join_rx.try_iter() {
            c.on_join(r);
        }
        for r in st.report_rx.try_iter() {
            c.on_report(r);
        }
        let tx = |k| marks.interval_tx(&st.sender, &st.shared, k);
        for iv in c.close_intervals(now, &tx) {
            if !a.quiet {
                let line = iv.line(tx_name);
                pb.suspend(|| println!("{line}"));
            }
        }
        watch_child(&mut c, &mut st.sender);
        let counts = counts(&st.shared);
        commands.clear();
        let status = c.advance(now, counts, &mut commands);
        for cmd in &commands {
            carry_out(*cmd, st, &mut c, &pb);
        }
        match status {
            Status::Running => {}
            Status::Done => break None,
            Status::Failed(why) => break Some(why),
        }
        show_progress(&pb, &c, current, counts.joined);
        thread::sleep(Duration::from_millis(20));
    };
    pb.finish_and_clear();
    (c, marks, failure)
}

/// The collector's settings for this run.
fn collector_settings(a: &Args, plan: &Plan, st: &Started) -> collector::Settings {
    collector::Settings {
        epoch: st.shared.epoch,
        join_start: st.join_start,
        threads: plan.threads,
        peers: a.peers,
        join_rate: a.join_rate,
        duration: a.duration,
        baseline: a.baseline.is_some(),
    }
}

/// The sender must stay alive: fails the run when the splitter child has exited.
fn watch_child(c: &mut Collector, sender: &mut Sender) {
    if let Sender::Child(child) = sender
        && let Some(status) = child.exited()
    {
        c.fail(format!(
            "the splitter exited ({status}) during the run; it said:\n{}",
            child.log_text()
        ));
    }
}

/// The workers' and joiners' counters, for the collector.
fn counts(shared: &Shared) -> Counts {
    Counts {
        joined: shared.joined.load(Ordering::Relaxed),
        join_failed: shared.join_failed.load(Ordering::Relaxed),
        left: shared.left.load(Ordering::Relaxed),
        stopped: shared.stop.load(Ordering::Relaxed),
    }
}

/// Carries out one of the collector's commands.
fn carry_out(cmd: Command, st: &mut Started, c: &mut Collector, pb: &ProgressBar) {
    let shared = &st.shared;
    match cmd {
        Command::Measure { from, until } => {
            shared.stop_joins.store(true, Ordering::SeqCst);
            pb.set_length(until - from);
            pb.set_position(0);
            pb.set_message("streaming");
        }
        Command::Leave => {
            pb.set_message("leaving");
            shared.leave.store(true, Ordering::SeqCst);
            st.sender.stop_baseline();
        }
        Command::StopWorkers => {
            if let Some(joined) = st.sender.join_baseline() {
                if let Err(why) = joined {
                    c.fail(why);
                }
                // Let the last datagrams land before the receivers count the tail.
                thread::sleep(Duration::from_millis(200));
            }
            shared.stop.store(true, Ordering::SeqCst);
        }
    }
}

/// The progress bar's position: peers joined, then measured seconds.
fn show_progress(pb: &ProgressBar, c: &Collector, current: u64, joined: usize) {
    match (c.phase(), c.measure()) {
        (Phase::Join, _) => pb.set_position(joined as u64),
        (Phase::Measure, Some((from, until))) => {
            pb.set_position(current.saturating_sub(from).min(until - from));
        }
        _ => {}
    }
}

/// Stops every thread and the splitter child; accounts the late reports. Fails with `failure`
/// (and a worker's error) if the run failed.
fn stop(st: &mut Started, mut c: Collector, failure: Option<String>) -> anyhow::Result<Collector> {
    st.shared.stop_joins.store(true, Ordering::SeqCst);
    st.shared.stop.store(true, Ordering::SeqCst);
    st.sender.stop_baseline();
    for j in st.joiners.drain(..) {
        let _ = j.join();
    }
    let worker_error = join_workers(&mut st.workers);
    // Late reports of measured intervals (the last one of each worker is partial: ignored).
    for r in st.report_rx.try_iter() {
        c.late_report(r);
    }
    if let Sender::Child(child) = &mut st.sender {
        child.stop_and_log();
    }
    match (failure, worker_error) {
        (Some(f), Some(e)) => bail!("{f}: {e:#}"),
        (Some(f), None) => bail!("{f}"),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(c),
    }
}

/// Joins the worker threads; the last error any of them ended with.
fn join_workers(
    workers: &mut Vec<thread::JoinHandle<anyhow::Result<()>>>,
) -> Option<anyhow::Error> {
    let mut worker_error = None;
    for w in workers.drain(..) {
        match w.join() {
            Ok(Err(e)) => worker_error = Some(e),
            Err(_) => worker_error = Some(anyhow::anyhow!("a worker thread panicked")),
            Ok(Ok(())) => {}
        }
    }
    worker_error
}

/// Builds the report from the settings, the collector's outcome and the other facts, stops the
/// source, and prints and writes the report.
fn finish(
    a: &Args,
    plan: &Plan,
    recv_path: RecvPath,
    st: Started,
    marks: &Marks,
    outcome: collector::Outcome,
) -> anyhow::Result<()> {
    let config = config(a, plan, recv_path, &st.sender);
    let Started {
        source,
        sender,
        shared,
        noise,
        verify_costs,
        ..
    } = st;
    let facts = facts(
        &sender,
        source.as_ref(),
        &shared,
        marks,
        noise,
        verify_costs,
        outcome.measure,
    );
    if let Some(s) = source {
        s.stop();
    }
    let scheduled = outcome.total_hist.scheduled.clone();
    let report = Report::build(config, outcome, facts);
    let out = report::Outputs {
        json: a.json.as_deref(),
        hgrm: a.hgrm.as_deref(),
        plot: a.plot.as_deref(),
    };
    report.emit(&scheduled, out)
}

/// The run's settings, as the report gives them.
fn config(a: &Args, plan: &Plan, recv_path: RecvPath, sender: &Sender) -> report::Config {
    let child = matches!(sender, Sender::Child(_));
    report::Config {
        mode: plan.mode.to_owned(),
        splitter: match sender.splitter_addrs() {
            addrs if addrs.is_empty() => "-".to_owned(),
            addrs => addrs
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
        },
        splitter_child: child,
        peers: a.peers,
        team_size: a.team_size,
        chunk_size: a.chunk_size,
        bitrate_bps: a.bitrate,
        chunks_per_second: plan.chunks_per_second,
        duration_s: a.duration.as_secs_f64(),
        join_rate: a.join_rate,
        shards: child.then_some(plan.shards),
        io: child.then(|| a.io.clone()),
        buffer_size: child.then_some(a.buffer_size),
        monitors: a.monitors,
        threads: plan.threads,
        addresses: match plan.sockets {
            SocketMode::PerPeer => plan.ips.iter().map(|i| i.to_string()).collect(),
            SocketMode::Shared => vec![format!(
                "{}-{}",
                peers::virtual_ip(0),
                peers::virtual_ip(a.peers - 1)
            )],
        },
        sockets: match plan.sockets {
            SocketMode::PerPeer => "per-peer",
            SocketMode::Shared => "shared",
        }
        .to_owned(),
        recv_path: recv_path.to_string(),
        seed: a.seed,
    }
}

/// What the run observed beside the collector, over the measured intervals `from..until`: the
/// sender's side, the marks, the source's lag, the machine's noise (the probe stops here).
fn facts(
    sender: &Sender,
    source: Option<&source::SourceServer>,
    shared: &Shared,
    marks: &Marks,
    noise: noise::NoiseProbe,
    verify_costs: Option<(f64, f64)>,
    (from, until): (u64, u64),
) -> report::Facts {
    report::Facts {
        sender_cpu: match sender {
            // The loop's whole life (it starts before the measured seconds and stops after them).
            Sender::Baseline { .. } => sender.baseline_cpu(),
            _ => marks.sender_cpu(from, until),
        },
        process_cpu_s: marks.process_cpu_s(from, until),
        tx_drops: sender.tx_drops(),
        socket_drops: marks.socket_drops(from, until),
        rss: procfs::self_rss(),
        source_lag_ms: source.and_then(|s| s.stats.lag.lock().unwrap().as_ref().map(Latency::of)),
        splitter_send_lag_ms: sender
            .send_lag(shared.interval_start(from), shared.interval_start(until)),
        cores: marks.cores(from, until),
        machine_noise_ms: noise.finish(from, until).as_ref().map(Latency::of),
        joined: shared.joined.load(Ordering::Relaxed),
        join_failed: shared.join_failed.load(Ordering::Relaxed),
        sender_rss: marks.sender_rss,
        verify_costs,
    }
}
