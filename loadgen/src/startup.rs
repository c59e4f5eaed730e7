//! Start-up of a run, in order: the timestamped source, the sender (splitter child, splitters
//! started by hand, or the baseline's state), the CIS key, the header, the workers, then the
//! joiners (or, for the baseline, the bare peer sockets and the loop). Each piece takes what it
//! needs and hands back what it started; [`Started`] owns all of it for the rest of the run.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use core_affinity::CoreId;
use crossbeam_channel::{Receiver, unbounded};
use p2psp::driver::{RecvPath, SendPath};
use p2psp::proto::integrity::ChunkVerifier;
use p2psp::proto::wire::CHUNK_HEADER;

use crate::Args;
use crate::baseline::{self, BaselineEnd, BaselineStats};
use crate::child::{ChildSettings, SplitterChild};
use crate::noise::NoiseProbe;
use crate::peers::{self, JoinOptions, JoinResult, NewPeer, Shared, SocketMode, WorkerOptions};
use crate::plan::Plan;
use crate::sender::Sender;
use crate::source::SourceServer;

/// Everything a run started: the source, the sender, the workers and the joiners.
pub struct Started {
    /// The timestamped source (none for the baseline, or a hand-started splitter fed elsewhere).
    pub source: Option<SourceServer>,
    /// What sends the chunks.
    pub sender: Sender,
    /// State shared with the workers and joiners.
    pub shared: Arc<Shared>,
    /// The machine's scheduling noise.
    pub noise: NoiseProbe,
    /// The workers' per-interval reports.
    pub report_rx: Receiver<peers::Report>,
    /// The joiners' results.
    pub join_rx: Receiver<JoinResult>,
    /// Worker threads.
    pub workers: Vec<thread::JoinHandle<anyhow::Result<()>>>,
    /// Join threads (none for the baseline).
    pub joiners: Vec<thread::JoinHandle<()>>,
    /// When the joins' schedule starts.
    pub join_start: Instant,
    /// CIS: what a signature check and a chunk hash cost here, when the peers verify.
    pub verify_costs: Option<(f64, f64)>,
}

/// Starts the source, the sender, the workers and the joiners (or, for the baseline, binds the
/// bare sockets and starts the loop), and prints the header.
pub fn start(
    a: &Args,
    plan: &Plan,
    cores: &[CoreId],
    recv_path: RecvPath,
) -> anyhow::Result<Started> {
    let pin = !a.no_pin;
    let core = |i: Option<usize>| i.and_then(|i| cores.get(i).copied());
    // The source's writer runs with the workers on the last core, off the cores of the splitter
    // child's shards (0..shards).
    let source = start_source(a, plan, core(plan.source_core(pin)))?;
    let mut sender = start_sender(a, plan, source.as_ref())?;
    let verify_costs = verification(a, &sender)?;
    check_reach(plan, &sender)?;
    println!("{}", header(a, plan, &sender, recv_path));
    if let (Sender::Manual(addrs), Some(src)) = (&sender, &source) {
        wait_for_splitters(addrs, &src.url())?;
    }
    let shared = Arc::new(Shared::new());
    let noise = NoiseProbe::start(shared.interval_start(0))
        .context("cannot start the noise probe thread")?;
    let workers = Workers::start(a, plan, cores, recv_path, &sender, &shared)?;
    // Peers: joins paced by --join-rate, or bare sockets for the baseline.
    let (join_tx, join_rx) = unbounded::<JoinResult>();
    let join_start = Instant::now();
    let splitters = sender.splitter_addrs();
    let joiners = if let Sender::Baseline {
        stats,
        stop,
        handle,
        ..
    } = &mut sender
    {
        let dests = bare_peers(a, plan, &workers.txs, &shared)?;
        let core = core((pin && plan.ncores > 1).then_some(0));
        let (stats, stop) = (stats.clone(), stop.clone());
        *handle = Some(start_baseline(a, plan, core, stats, stop, dests)?);
        Vec::new()
    } else {
        start_joiners(a, plan, splitters, &workers, join_start, &join_tx, &shared)?
    };
    drop(join_tx);
    Ok(Started {
        source,
        sender,
        shared,
        noise,
        report_rx: workers.report_rx,
        join_rx,
        workers: workers.handles,
        joiners,
        join_start,
        verify_costs,
    })
}

/// The timestamped source, for the splitter child or for `--source-listen`; none for the
/// baseline, which stamps its own buffer.
fn start_source(
    a: &Args,
    plan: &Plan,
    core: Option<CoreId>,
) -> anyhow::Result<Option<SourceServer>> {
    let listen = match (&a.baseline, &a.splitter, a.source_listen) {
        (Some(_), _, _) | (None, Some(_), None) => return Ok(None),
        (None, None, _) => SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        (None, Some(_), Some(listen)) => listen,
    };
    let source = SourceServer::start(listen, a.chunk_size, plan.chunks_per_second, core)?;
    Ok(Some(source))
}

/// The sender: the baseline's state (its loop starts later), the splitters named by
/// `--splitter`, or a splitter child fed by `source`.
fn start_sender(a: &Args, plan: &Plan, source: Option<&SourceServer>) -> anyhow::Result<Sender> {
    if a.baseline.is_some() {
        return Ok(Sender::baseline());
    }
    if let Some(addr) = &a.splitter {
        let addrs = p2psp::peer::resolve_all_v4(addr)
            .map_err(|e| anyhow::anyhow!("--splitter {addr}: {e}"))?;
        return Ok(Sender::Manual(addrs));
    }
    let binary = match &a.splitter_bin {
        Some(p) => p.clone(),
        None => SplitterChild::find_binary()?,
    };
    let src = source.expect("the source starts with the splitter child");
    let child = SplitterChild::start(&ChildSettings {
        binary,
        source: src.url(),
        team_size: a.team_size,
        chunk_size: a.chunk_size,
        buffer_size: a.buffer_size,
        monitors: a.monitors,
        shards: plan.shards,
        io: a.io.clone(),
        extra: child_extra_args(a),
    })?;
    Ok(Sender::Child(child))
}

/// The splitter child's flags beyond the settings: `--thread-slice`, `--rt-priority`, and
/// `--sign` for CIS.
fn child_extra_args(a: &Args) -> Vec<String> {
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
}

/// CIS: gives the peers the key they verify with and prices verifying here; `None` when they
/// do not verify.
fn verification(a: &Args, sender: &Sender) -> anyhow::Result<Option<(f64, f64)>> {
    let key = splitter_key(a, sender)?;
    if a.no_verify && a.sign_mode == "chunk" {
        bail!(
            "--no-verify needs --sign-mode digest (signed chunks are longer than loadgen's peers take)"
        );
    }
    Ok(key.map(|k| {
        let _ = peers::SPLITTER_KEY.set(k);
        verify_costs()
    }))
}

/// CIS: the key the peers verify with: given, or printed by the signing child.
fn splitter_key(a: &Args, sender: &Sender) -> anyhow::Result<Option<ChunkVerifier>> {
    match (sender, a.splitter_key) {
        (_, Some(k)) => Ok(Some(k)),
        (Sender::Child(c), None) if a.sign.is_some() && !a.no_verify => {
            let log = c.log_text();
            let hex = log
                .lines()
                .find_map(|l| l.split("--splitter-key ").nth(1))
                .ok_or_else(|| anyhow::anyhow!("the signing splitter printed no key:\n{log}"))?;
            let key = ChunkVerifier::from_hex(hex)
                .map_err(|e| anyhow::anyhow!("the splitter's key: {e}"))?;
            Ok(Some(key))
        }
        _ => Ok(None),
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

/// Shared sockets give peers 127.x.y.z addresses: every splitter must be on this machine.
fn check_reach(plan: &Plan, sender: &Sender) -> anyhow::Result<()> {
    if let Some(addr) = sender
        .splitter_addrs()
        .iter()
        .find(|a| !a.ip().is_loopback())
        && plan.sockets == SocketMode::Shared
    {
        bail!(
            "--sockets shared gives peers 127.x.y.z addresses, which a splitter at {addr} \
             cannot reach: run it on this machine (127.0.0.1) or use --sockets per-peer"
        );
    }
    Ok(())
}

/// The header, as wrk prints it.
fn header(a: &Args, plan: &Plan, sender: &Sender, recv_path: RecvPath) -> String {
    format!(
        "Running {:.0}s test @ {}\n  {} peers{}, {} B chunks at {:.3} Mbit/s ({:.1} chunks/s), {} worker thread(s) ({} receive), joins at {}/s over {}",
        a.duration.as_secs_f64(),
        sender.target(plan, &a.io),
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
    )
}

/// A splitter started by hand may not be up yet (it needs our source, at `source_url`, first):
/// waits up to 120 s for each to accept connections.
fn wait_for_splitters(addrs: &[SocketAddrV4], source_url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for addr in addrs {
        eprintln!(
            "loadgen: serving the source at {source_url}; waiting up to 120 s for the splitter at {addr}"
        );
        while std::net::TcpStream::connect_timeout(&(*addr).into(), Duration::from_secs(1)).is_err()
        {
            if Instant::now() > deadline {
                bail!("no splitter answered at {addr} within 120 s");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    // Let it read a few records (its source connects before it listens).
    thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// The worker threads and what the rest of the run reaches them by.
struct Workers {
    handles: Vec<thread::JoinHandle<anyhow::Result<()>>>,
    /// Hands each worker its new peers.
    txs: Vec<crossbeam_channel::Sender<NewPeer>>,
    /// `--sockets shared`: each worker's socket.
    sockets: Vec<Arc<UdpSocket>>,
    report_rx: Receiver<peers::Report>,
}

impl Workers {
    /// Starts `plan.threads` workers, pinned to the last cores (the splitter pins its shards from
    /// core 0 on); with `--sockets shared`, binds each one's socket first.
    fn start(
        a: &Args,
        plan: &Plan,
        cores: &[CoreId],
        recv_path: RecvPath,
        sender: &Sender,
        shared: &Arc<Shared>,
    ) -> anyhow::Result<Workers> {
        let (report_tx, report_rx) = unbounded::<peers::Report>();
        let last_seq = sender.last_seq();
        let sockets = shared_sockets(a, plan)?;
        let groups = sender.splitter_addrs().len().max(1);
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        for w in 0..plan.threads {
            let (tx, rx) = unbounded::<NewPeer>();
            let socket = sockets.get(w).cloned();
            txs.push(tx);
            let core = plan
                .worker_core(w, !a.no_pin)
                .and_then(|i| cores.get(i).copied());
            let opts = worker_options(a, recv_path, core, w % groups);
            let (report_tx, shared, last_seq) =
                (report_tx.clone(), shared.clone(), last_seq.clone());
            handles.push(
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
        Ok(Workers {
            handles,
            txs,
            sockets,
            report_rx,
        })
    }
}

/// `--sockets shared`: one socket per worker; none with per-peer sockets.
fn shared_sockets(a: &Args, plan: &Plan) -> anyhow::Result<Vec<Arc<UdpSocket>>> {
    match plan.sockets {
        SocketMode::Shared => (0..plan.threads)
            .map(|_| {
                peers::shared_socket(plan.shared_rcvbuf, a.chunk_size + CHUNK_HEADER).map(Arc::new)
            })
            .collect(),
        SocketMode::PerPeer => Ok(Vec::new()),
    }
}

/// A worker's settings: its receive path (and the send path that goes with it), core and group.
fn worker_options(
    a: &Args,
    recv_path: RecvPath,
    core: Option<CoreId>,
    group: usize,
) -> WorkerOptions {
    WorkerOptions {
        recv_path,
        send_path: match recv_path {
            RecvPath::Uring => SendPath::detect(),
            RecvPath::Poll => SendPath::Sendmmsg,
        },
        chunk_size: a.chunk_size,
        trailer: if a.sign.is_some() && a.sign_mode == "chunk" {
            p2psp::proto::integrity::SIGNATURE_LEN
        } else {
            0
        },
        core,
        group,
        nap: a.recv_nap.map_or(
            if a.team_size == 1 {
                peers::RECV_NAP
            } else {
                Duration::ZERO
            },
            Duration::from_micros,
        ),
    }
}

/// Starts the join threads: `--join-threads` of them share the peers, paced by `--join-rate`
/// from `join_start`, and hand each joined peer to its worker.
fn start_joiners(
    a: &Args,
    plan: &Plan,
    splitters: Vec<SocketAddrV4>,
    workers: &Workers,
    join_start: Instant,
    results: &crossbeam_channel::Sender<JoinResult>,
    shared: &Arc<Shared>,
) -> anyhow::Result<Vec<thread::JoinHandle<()>>> {
    let opts = JoinOptions {
        splitters,
        ips: plan.ips.clone(),
        peers: a.peers,
        rate: a.join_rate,
        team_size: a.team_size,
        monitors: a.monitors,
        rcvbuf: a.rcvbuf,
        datagram: a.chunk_size + CHUNK_HEADER,
        seed: a.seed,
        shared: workers.sockets.clone(),
    };
    let next = Arc::new(AtomicUsize::new(0));
    let mut joiners = Vec::new();
    for j in 0..a.join_threads.min(a.peers) {
        let (opts, next, txs, results, shared) = (
            opts.clone(),
            next.clone(),
            workers.txs.clone(),
            results.clone(),
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
    Ok(joiners)
}

/// The baseline's peers: a bare socket each, spread over the workers. Returns their addresses
/// once every worker receives on its sockets (within 30 s).
fn bare_peers(
    a: &Args,
    plan: &Plan,
    workers: &[crossbeam_channel::Sender<NewPeer>],
    shared: &Shared,
) -> anyhow::Result<Vec<SocketAddrV4>> {
    let mut dests = Vec::with_capacity(a.peers);
    for i in 0..a.peers {
        let socket = peers::bare_socket(plan.ips[i % plan.ips.len()], a.rcvbuf)?;
        let SocketAddr::V4(addr) = socket.local_addr()? else {
            bail!("not IPv4")
        };
        dests.push(addr);
        shared.joined.fetch_add(1, Ordering::Relaxed);
        let _ = workers[i % plan.threads].send(NewPeer::Bare { socket });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.registered.load(Ordering::Relaxed) < a.peers {
        if Instant::now() > deadline || shared.stop.load(Ordering::Relaxed) {
            bail!("the workers did not take the peer sockets within 30 s");
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(dests)
}

/// Starts the baseline loop sending to `dests`, counting in `stats` until `stop`.
fn start_baseline(
    a: &Args,
    plan: &Plan,
    core: Option<CoreId>,
    stats: Arc<BaselineStats>,
    stop: Arc<AtomicBool>,
    dests: Vec<SocketAddrV4>,
) -> anyhow::Result<thread::JoinHandle<anyhow::Result<BaselineEnd>>> {
    let (chunk_size, cps) = (a.chunk_size, plan.chunks_per_second);
    Ok(thread::Builder::new()
        .name("baseline".into())
        .spawn(move || baseline::run(dests, chunk_size, cps, core, stats, stop))?)
}
