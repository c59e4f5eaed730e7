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
mod collector;
mod noise;
mod peers;
mod plan;
mod procfs;
mod report;
mod sched;
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
use crate::collector::{Collector, Command, Counts, Phase, Status};
use crate::peers::{JoinOptions, JoinResult, NewPeer, Shared, SocketMode, WorkerOptions};
use crate::plan::{Plan, PlanInput};
use crate::procfs::CpuTimes;
use crate::report::{Cpu, Latency, Report};

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

/// What sends the chunks.
enum Sender {
    Child(SplitterChild),
    Manual(Vec<SocketAddrV4>),
    Baseline {
        stats: Arc<baseline::BaselineStats>,
        stop: Arc<AtomicBool>,
        handle: Option<thread::JoinHandle<anyhow::Result<baseline::BaselineEnd>>>,
        end: Option<baseline::BaselineEnd>,
    },
}

impl Sender {
    fn splitter_addr(&self) -> Option<SocketAddrV4> {
        match self {
            Sender::Child(c) => Some(c.addr),
            Sender::Manual(addrs) => addrs.first().copied(),
            Sender::Baseline { .. } => None,
        }
    }

    /// Every splitter the peers join.
    fn splitter_addrs(&self) -> Vec<SocketAddrV4> {
        match self {
            Sender::Manual(addrs) => addrs.clone(),
            _ => self.splitter_addr().into_iter().collect(),
        }
    }

    fn stop_baseline(&self) {
        if let Sender::Baseline { stop, .. } = self {
            stop.store(true, Ordering::SeqCst);
        }
    }
}

/// Everything a run started: the source, the sender, the workers and the joiners.
struct Started {
    source: Option<source::SourceServer>,
    sender: Sender,
    shared: Arc<Shared>,
    noise: noise::NoiseProbe,
    report_rx: crossbeam_channel::Receiver<peers::Report>,
    join_rx: crossbeam_channel::Receiver<JoinResult>,
    workers: Vec<thread::JoinHandle<anyhow::Result<()>>>,
    joiners: Vec<thread::JoinHandle<()>>,
    join_start: Instant,
    /// CIS: what a signature check and a chunk hash cost here, when the peers verify.
    verify_costs: Option<(f64, f64)>,
}

/// Readings taken at interval starts: splitter CPU, loadgen CPU and the baseline's datagram count
/// at each, and the kernel drops at the peers' sockets and every core's ticks at the measured
/// seconds' edges.
#[derive(Default)]
struct Marks {
    window: BTreeMap<u64, (Option<CpuTimes>, Option<CpuTimes>, u64)>,
    drops: BTreeMap<u64, u64>,
    cores: BTreeMap<u64, Vec<(String, procfs::CoreTicks)>>,
    /// The splitter child's resident memory (now, peak) at the end of the measured seconds.
    sender_rss: Option<(u64, u64)>,
    seen: Option<u64>,
}

impl Marks {
    /// Takes the readings of interval `current` when it starts.
    fn take(
        &mut self,
        current: u64,
        measure: Option<(u64, u64)>,
        sender: &Sender,
        shared: &Shared,
    ) {
        if self.seen == Some(current) {
            return;
        }
        self.seen = Some(current);
        let sender_cpu = match sender {
            Sender::Child(c) => c.cpu(),
            _ => None,
        };
        let tx = match sender {
            Sender::Baseline { stats, .. } => stats.datagrams.load(Ordering::Relaxed),
            _ => 0,
        };
        self.window
            .insert(current, (sender_cpu, procfs::self_cpu(), tx));
        if let Some((from, until)) = measure
            && (current == from || current == until)
        {
            self.cores.insert(current, procfs::cores());
            let addrs = shared.addrs.lock().unwrap().clone();
            self.drops.insert(current, procfs::udp_drops(&addrs));
            if let (Sender::Child(c), true) = (sender, current == until) {
                self.sender_rss = Some(c.rss());
            }
        }
    }
}

/// CIS: what one signature check and one chunk hash (1 KiB) cost on this thread, µs: the best of
/// 3 timings of 200 and 2,000 of them (a loaded machine only makes the figures larger).
fn verify_costs() -> (f64, f64) {
    use p2psp::proto::digest;
    use p2psp::proto::integrity::ChunkSigner;
    let signer = ChunkSigner::from_secret(&[7; 32]);
    let key = signer.verifier();
    let chunk = vec![0x5au8; 1026];
    let d = digest::sign_digest(&signer, 0, &[digest::chunk_hash(&chunk); 16]);
    let parsed = digest::Digest::parse(&d).expect("a digest");
    let best = |n: u32, f: &dyn Fn()| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
            })
            .fold(f64::INFINITY, f64::min)
    };
    let sig = best(200, &|| assert!(std::hint::black_box(parsed).verify(&key)));
    let hash = best(2000, &|| {
        std::hint::black_box(digest::chunk_hash(std::hint::black_box(&chunk)));
    });
    (sig, hash)
}

fn run(a: &Args) -> anyhow::Result<()> {
    sched::set(p2psp::splitter::settings::WireSched {
        slice: a.thread_slice.0,
        rt_priority: a.rt_priority.0,
    });
    let cores = core_affinity::get_core_ids().unwrap_or_default();
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
        cores.len(),
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
    // One socket per worker: recvmmsg drains up to 64 datagrams per call, cheaper per datagram
    // than a completion each (loadgen/README.md, "Socket modes"); many sockets: io_uring.
    let recv_path = a.recv.unwrap_or_else(|| match plan.sockets {
        SocketMode::Shared => RecvPath::Poll,
        SocketMode::PerPeer => RecvPath::detect(),
    });
    let mut st = start(a, &plan, &cores, recv_path)?;
    let (collector, marks, failure) = collect(a, &plan, &mut st);
    let (collector, marks) = stop(&mut st, collector, marks, failure)?;
    let outcome = collector
        .finish()
        .context("the run never reached its measurement")?;
    finish(a, &plan, recv_path, st, marks, outcome)
}

/// Starts the source, the sender (splitter child, or the baseline's state), the workers and the
/// joiners (or, for the baseline, binds the bare sockets and starts the loop), and prints the
/// header.
fn start(
    a: &Args,
    plan: &Plan,
    cores: &[core_affinity::CoreId],
    recv_path: RecvPath,
) -> anyhow::Result<Started> {
    let send_path = match recv_path {
        RecvPath::Uring => SendPath::detect(),
        RecvPath::Poll => SendPath::Sendmmsg,
    };
    let core = |i: Option<usize>| i.and_then(|i| cores.get(i).copied());
    let pin = !a.no_pin;

    // The source (not for the baseline, which stamps its own buffer). Its writer runs with the
    // workers on the last core, off the cores of the splitter child's shards (0..shards).
    let source_core = core(plan.source_core(pin));
    let source = match (&a.baseline, &a.splitter, a.source_listen) {
        (Some(_), _, _) => None,
        (None, None, _) => Some(source::SourceServer::start(
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            a.chunk_size,
            plan.chunks_per_second,
            source_core,
        )?),
        (None, Some(_), Some(listen)) => Some(source::SourceServer::start(
            listen,
            a.chunk_size,
            plan.chunks_per_second,
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
            p2psp::peer::resolve_all_v4(addr)
                .map_err(|e| anyhow::anyhow!("--splitter {addr}: {e}"))?,
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
                shards: plan.shards,
                io: a.io.clone(),
                extra: {
                    let mut extra: Vec<String> = Vec::new();
                    if let Some(d) = a.thread_slice.0 {
                        extra.extend(["--thread-slice".into(), format!("{}us", d.as_micros())]);
                    }
                    if let Some(p) = a.rt_priority.0 {
                        extra.extend(["--rt-priority".into(), p.to_string()]);
                    }
                    if let Some(key) = &a.sign {
                        extra.extend([
                            "--sign".into(),
                            key.display().to_string(),
                            "--sign-mode".into(),
                            a.sign_mode.clone(),
                        ]);
                    }
                    extra
                },
            })?)
        }
    };
    // CIS: the key the peers verify with: given, or printed by the signing child.
    let splitter_key = match (&sender, a.splitter_key) {
        (_, Some(k)) => Some(k),
        (Sender::Child(c), None) if a.sign.is_some() && !a.no_verify => {
            let log = c.log_text();
            let hex = log
                .lines()
                .find_map(|l| l.split("--splitter-key ").nth(1))
                .ok_or_else(|| anyhow::anyhow!("the signing splitter printed no key:\n{log}"))?;
            Some(
                p2psp::proto::integrity::ChunkVerifier::from_hex(hex)
                    .map_err(|e| anyhow::anyhow!("the splitter's key: {e}"))?,
            )
        }
        _ => None,
    };
    if a.no_verify && a.sign_mode == "chunk" {
        bail!(
            "--no-verify needs --sign-mode digest (signed chunks are longer than loadgen's peers take)"
        );
    }
    let verify_costs = splitter_key.map(|k| {
        let _ = peers::SPLITTER_KEY.set(k);
        verify_costs()
    });
    let splitter_addr = sender.splitter_addr();
    let splitter_addrs = sender.splitter_addrs();
    if let Some(addr) = splitter_addrs.iter().find(|a| !a.ip().is_loopback())
        && plan.sockets == SocketMode::Shared
    {
        bail!(
            "--sockets shared gives peers 127.x.y.z addresses, which a splitter at {addr} \
             cannot reach: run it on this machine (127.0.0.1) or use --sockets per-peer"
        );
    }

    // Header, as wrk prints it.
    let target = match (&sender, splitter_addr) {
        (Sender::Child(_), Some(addr)) => format!(
            "splitter {addr} (child, {} shard(s), --io {})",
            plan.shards, a.io
        ),
        (Sender::Manual(addrs), Some(_)) if addrs.len() > 1 => format!(
            "{} splitters {} (started by hand; peer i joins splitter i mod {})",
            addrs.len(),
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            addrs.len()
        ),
        (Sender::Manual(_), Some(addr)) => format!("splitter {addr} (started by hand)"),
        _ => "baseline sendmmsg fan-out loop".to_owned(),
    };
    println!(
        "Running {:.0}s test @ {target}\n  {} peers{}, {} B chunks at {:.3} Mbit/s ({:.1} chunks/s), {} worker thread(s) ({} receive), joins at {}/s over {}",
        a.duration.as_secs_f64(),
        a.peers,
        if a.baseline.is_some() {
            String::new()
        } else {
            format!(" in teams of {}", a.team_size)
        },
        a.chunk_size,
        a.bitrate as f64 / 1e6,
        plan.chunks_per_second,
        plan.threads,
        recv_path,
        a.join_rate,
        match plan.sockets {
            SocketMode::PerPeer => format!("{} address(es)", plan.ips.len()),
            SocketMode::Shared => format!(
                "{} virtual addresses on {} shared socket(s)",
                a.peers, plan.threads
            ),
        },
    );

    // A splitter started by hand may not be up yet (it needs our source first): wait for it.
    if let (Sender::Manual(addrs), Some(src)) = (&sender, &source) {
        let deadline = Instant::now() + Duration::from_secs(120);
        for addr in addrs {
            eprintln!(
                "loadgen: serving the source at {}; waiting up to 120 s for the splitter at {addr}",
                src.url()
            );
            while std::net::TcpStream::connect_timeout(&(*addr).into(), Duration::from_secs(1))
                .is_err()
            {
                if Instant::now() > deadline {
                    bail!("no splitter answered at {addr} within 120 s");
                }
                thread::sleep(Duration::from_millis(200));
            }
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
    let shared_sockets: Vec<Arc<std::net::UdpSocket>> = match plan.sockets {
        SocketMode::Shared => (0..plan.threads)
            .map(|_| {
                peers::shared_socket(
                    plan.shared_rcvbuf,
                    a.chunk_size + p2psp::proto::wire::CHUNK_HEADER,
                )
                .map(Arc::new)
            })
            .collect::<anyhow::Result<_>>()?,
        SocketMode::PerPeer => Vec::new(),
    };
    for w in 0..plan.threads {
        let (tx, rx) = crossbeam_channel::unbounded::<NewPeer>();
        let socket = shared_sockets.get(w).cloned();
        worker_txs.push(tx);
        let opts = WorkerOptions {
            recv_path,
            send_path,
            chunk_size: a.chunk_size,
            trailer: if a.sign.is_some() && a.sign_mode == "chunk" {
                p2psp::proto::integrity::SIGNATURE_LEN
            } else {
                0
            },
            core: core(plan.worker_core(w, pin)),
            group: w % splitter_addrs.len().max(1),
            nap: a.recv_nap.map_or(
                if a.team_size == 1 {
                    peers::RECV_NAP
                } else {
                    Duration::ZERO
                },
                Duration::from_micros,
            ),
        };
        let (report_tx, shared, last_seq) = (report_tx.clone(), shared.clone(), last_seq.clone());
        workers.push(
            thread::Builder::new()
                .name(format!("worker-{w}"))
                .spawn(move || {
                    let r = peers::run_worker(
                        opts,
                        socket.as_deref(),
                        &rx,
                        &report_tx,
                        &shared,
                        &*last_seq,
                    );
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
    if splitter_addr.is_some() {
        let opts = JoinOptions {
            splitters: splitter_addrs.clone(),
            ips: plan.ips.clone(),
            peers: a.peers,
            rate: a.join_rate,
            team_size: a.team_size,
            monitors: a.monitors,
            rcvbuf: a.rcvbuf,
            datagram: a.chunk_size + p2psp::proto::wire::CHUNK_HEADER,
            seed: a.seed,
            shared: shared_sockets.clone(),
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
            let socket = peers::bare_socket(plan.ips[i % plan.ips.len()], a.rcvbuf)?;
            let std::net::SocketAddr::V4(addr) = socket.local_addr()? else {
                bail!("not IPv4")
            };
            dests.push(addr);
            shared.joined.fetch_add(1, Ordering::Relaxed);
            let _ = worker_txs[i % plan.threads].send(NewPeer::Bare { socket });
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
            let core = core((pin && plan.ncores > 1).then_some(0));
            let (stats, stop) = (stats.clone(), stop.clone());
            let chunk_size = a.chunk_size;
            let cps = plan.chunks_per_second;
            *handle = Some(
                thread::Builder::new()
                    .name("baseline".into())
                    .spawn(move || baseline::run(dests, chunk_size, cps, core, stats, stop))?,
            );
        }
    }
    drop(join_tx);
    Ok(Started {
        verify_costs,
        source,
        sender,
        shared,
        noise,
        report_rx,
        join_rx,
        workers,
        joiners,
        join_start,
    })
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
/// bounded. Returns the collector and why the run failed, if it did.
fn collect(a: &Args, plan: &Plan, st: &mut Started) -> (Collector, Marks, Option<String>) {
    let tx_name = if a.baseline.is_some() {
        "baseline"
    } else {
        "splitter"
    };
    let pb = progress_bar(a);
    let mut c = Collector::new(
        collector::Settings {
            epoch: st.shared.epoch,
            join_start: st.join_start,
            threads: plan.threads,
            peers: a.peers,
            join_rate: a.join_rate,
            duration: a.duration,
            baseline: a.baseline.is_some(),
        },
        Instant::now(),
    );
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
        let tx = |k| interval_tx(&st.sender, &marks.window, k, &st.shared);
        for iv in c.close_intervals(now, &tx) {
            if !a.quiet {
                let line = iv.line(tx_name);
                pb.suspend(|| println!("{line}"));
            }
        }
        // The sender must stay alive.
        if let Sender::Child(child) = &mut st.sender
            && let Some(status) = child.exited()
        {
            c.fail(format!(
                "the splitter exited ({status}) during the run; it said:\n{}",
                child.log_text()
            ));
        }
        let shared = &st.shared;
        let counts = Counts {
            joined: shared.joined.load(Ordering::Relaxed),
            join_failed: shared.join_failed.load(Ordering::Relaxed),
            left: shared.left.load(Ordering::Relaxed),
            stopped: shared.stop.load(Ordering::Relaxed),
        };
        commands.clear();
        let status = c.advance(now, counts, &mut commands);
        for cmd in &commands {
            match *cmd {
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
                    if let Sender::Baseline { handle, end, .. } = &mut st.sender
                        && let Some(h) = handle.take()
                    {
                        match h.join() {
                            Ok(Ok(e)) => *end = Some(e),
                            Ok(Err(e)) => c.fail(format!("{e:#}")),
                            Err(_) => c.fail("the baseline loop panicked".to_owned()),
                        }
                        // Let the last datagrams land before the receivers count the tail.
                        thread::sleep(Duration::from_millis(200));
                    }
                    shared.stop.store(true, Ordering::SeqCst);
                }
            }
        }
        match status {
            Status::Running => {}
            Status::Done => break None,
            Status::Failed(why) => break Some(why),
        }
        match (c.phase(), c.measure()) {
            (Phase::Join, _) => pb.set_position(counts.joined as u64),
            (Phase::Measure, Some((from, until))) => {
                pb.set_position(current.saturating_sub(from).min(until - from));
            }
            _ => {}
        }
        thread::sleep(Duration::from_millis(20));
    };
    pb.finish_and_clear();
    (c, marks, failure)
}

/// Stops every thread and the splitter child; accounts the late reports.
fn stop(
    st: &mut Started,
    mut c: Collector,
    marks: Marks,
    failure: Option<String>,
) -> anyhow::Result<(Collector, Marks)> {
    st.shared.stop_joins.store(true, Ordering::SeqCst);
    st.shared.stop.store(true, Ordering::SeqCst);
    st.sender.stop_baseline();
    for j in st.joiners.drain(..) {
        let _ = j.join();
    }
    let mut worker_error = None;
    for w in st.workers.drain(..) {
        match w.join() {
            Ok(Err(e)) => worker_error = Some(e),
            Err(_) => worker_error = Some(anyhow::anyhow!("a worker thread panicked")),
            Ok(Ok(())) => {}
        }
    }
    // Late reports of measured intervals (the last one of each worker is partial: ignored).
    for r in st.report_rx.try_iter() {
        c.late_report(r);
    }
    if let Sender::Child(child) = &mut st.sender {
        child.stop_and_log();
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
    Ok((c, marks))
}

/// Builds the report and writes it out.
fn finish(
    a: &Args,
    plan: &Plan,
    recv_path: RecvPath,
    st: Started,
    marks: Marks,
    outcome: collector::Outcome,
) -> anyhow::Result<()> {
    let Started {
        source,
        sender,
        shared,
        noise,
        verify_costs,
        ..
    } = st;
    let (from, until) = outcome.measure;
    let wall = (until - from) as f64;
    let window = |k: u64| marks.window.get(&k).copied();
    let child = matches!(sender, Sender::Child(_));
    let config = report::Config {
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
    };
    let facts = report::Facts {
        sender_cpu: match &sender {
            Sender::Child(_) => match (window(from), window(until)) {
                (Some((Some(c0), _, _)), Some((Some(c1), _, _))) => {
                    Some(Cpu::new(c1.since(&c0), wall))
                }
                _ => None,
            },
            // The loop's whole life (it starts before the measured seconds and stops after them).
            Sender::Baseline { end, .. } => end.map(|e| Cpu::new(e.cpu, e.wall.as_secs_f64())),
            Sender::Manual(_) => None,
        },
        process_cpu_s: match (window(from), window(until)) {
            (Some((_, Some(p0), _)), Some((_, Some(p1), _))) => p1.since(&p0).total().as_secs_f64(),
            _ => 0.0,
        },
        tx_drops: match &sender {
            Sender::Child(c) => c.latest().map(|s| s.send_drops),
            Sender::Baseline { stats, .. } => Some(stats.dropped.load(Ordering::Relaxed)),
            Sender::Manual(_) => None,
        },
        socket_drops: match (marks.drops.get(&from), marks.drops.get(&until)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(*a)),
            _ => None,
        },
        rss: procfs::self_rss(),
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
        cores: match (marks.cores.get(&from), marks.cores.get(&until)) {
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
        joined: shared.joined.load(Ordering::Relaxed),
        join_failed: shared.join_failed.load(Ordering::Relaxed),
        sender_rss: marks.sender_rss,
        verify_costs,
    };
    let scheduled = outcome.total_hist.scheduled.clone();
    let report = Report::build(config, outcome, facts);
    if let Some(s) = source {
        s.stop();
    }
    print!("{}", report.summary());
    if let Some(p) = &a.json {
        report::write_file(p, &serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(p) = &a.hgrm {
        report::write_file(p, &report::hgrm(&scheduled))?;
    }
    if let Some(p) = &a.plot {
        let title = format!(
            "loadgen: {} peers, {} B chunks at {:.2} Mbit/s, {}",
            report.joins.ok,
            a.chunk_size,
            a.bitrate as f64 / 1e6,
            plan.mode
        );
        report::plot(p, &scheduled, &report.intervals, &title)?;
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
