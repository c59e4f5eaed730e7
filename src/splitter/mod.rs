//! `p2psp splitter`: reads one live stream, cuts it into chunks and sends them to teams of peers.
//!
//! Threads:
//! - the **feed** ([`feed`]) reads the source, keeps the stream header, numbers chunks and
//!   publishes each once into the [`ChunkRing`](crate::ring::ChunkRing);
//! - **shards** ([`shard`]), one per core by default, each pinned to a core, own a set of teams and
//!   an io_uring (or `sendmmsg`) UDP socket bound to the splitter port with `SO_REUSEPORT`; each
//!   chunk goes out in batched submissions that all point at the one datagram in the ring;
//! - the **control plane** ([`control`]) accepts TCP joins (no thread per peer), places peers in
//!   teams, serves the stream header over HTTP and prints the status line ([`status`]);
//! - with `--metrics`, a small thread serves what [`status`] exports.

pub mod control;
pub mod feed;
pub mod ims;
pub mod settings;
pub mod shard;
pub mod signing;
pub mod source;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use anyhow::Context;

pub use settings::{Settings, SplitterArgs};

use crate::driver::{self, Waker};
use crate::ring::ChunkRing;

/// A started splitter.
pub struct Splitter {
    port: u16,
    shard_stats: Vec<Arc<shard::ShardStats>>,
    control_stats: Arc<control::ControlStats>,
    feed: thread::JoinHandle<anyhow::Result<()>>,
    shards: Vec<thread::JoinHandle<anyhow::Result<()>>>,
    control: thread::JoinHandle<anyhow::Result<()>>,
}

/// Starts a splitter that runs until `stop` is raised or the source ends for good.
///
/// Errors here are what an operator must fix (port in use, unreachable source, no io_uring where
/// it was asked for); they come back before any peer is served.
pub fn start(settings: Settings, stop: Arc<AtomicBool>) -> anyhow::Result<Splitter> {
    let listener = driver::tcp_listener(settings.bind)
        .with_context(|| format!("cannot listen on TCP {}", settings.bind))?;
    let port = listener.local_addr()?.port();
    let metrics = settings
        .metrics
        .map(crate::metrics::Endpoint::bind)
        .transpose()?;
    let udp_addr = std::net::SocketAddrV4::new(*settings.bind.ip(), port);
    let source = source::open(&settings.source, settings.bitrate, stop.clone())
        .with_context(|| format!("cannot open the source {}", settings.source_text))?;

    if let Some(ims) = settings.ims {
        ims::check_route(*settings.bind.ip(), ims)?;
    }
    let ring = Arc::new(ChunkRing::new(settings.ring_slots));
    let header = Arc::new(feed::HeaderCell::new(settings.header_size));
    let feed_stats = Arc::new(feed::FeedStats::default());
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    // Shards are pinned to cores 0..shards. With a core to spare, the feed and the control plane
    // run on the first one no shard uses: woken thousands of times a second, they would otherwise
    // land on a shard's core and delay its sends.
    let spare_core = cores.get(settings.shards).copied();

    let mut shard_handles = Vec::new();
    let mut shard_links = Vec::new();
    // Membership events: at most one per peer that joined, and the shard waits rather than lose
    // one. Foreign datagrams: dropped and counted when the control plane falls behind.
    let (report_tx, report_rx) = crossbeam_channel::bounded(65536);
    let (foreign_tx, foreign_rx) = crossbeam_channel::bounded(shard::DATAGRAM_QUEUE);
    // NTS: the control plane sends its echoes and U2s from the splitter's port, through a
    // duplicate of shard 0's socket (sending only: receiving stays with the shards).
    let mut nts_socket = None;
    for index in 0..settings.shards {
        let socket = driver::udp_socket(
            udp_addr,
            true,
            Some(settings.socket_buffer),
            Some(settings.socket_buffer),
        )
        .with_context(|| format!("cannot bind UDP {udp_addr}"))?;
        if settings.nts && index == 0 {
            nts_socket = Some(socket.try_clone()?);
        }
        if let Some(ims) = settings.ims {
            ims::configure_socket(&socket, *settings.bind.ip(), ims)?;
        }
        // A tuning knob: chunks still go out without it.
        let datagram = crate::proto::wire::CHUNK_HEADER + settings.chunk_size;
        if let Err(e) = driver::set_dont_fragment(&socket, datagram) {
            tracing::debug!("cannot set IP_MTU_DISCOVER on shard {index}'s socket: {e}");
        }
        let waker = Waker::new().context("cannot create an eventfd")?;
        let (cmd_tx, cmd_rx) = crossbeam_channel::bounded(65536);
        let (dgram_tx, dgram_rx) = crossbeam_channel::bounded(shard::DATAGRAM_QUEUE);
        let stats = Arc::new(shard::ShardStats::default());
        shard::check_socket_buffers(&socket, settings.socket_buffer, index, &stats);
        let core = cores.get(index % cores.len().max(1)).copied();
        let shard_stop = stop.clone();
        let queues = shard::ShardQueues {
            commands: cmd_rx,
            datagrams: dgram_rx,
            reports: report_tx.clone(),
            foreign: foreign_tx.clone(),
        };
        let (ring, waker2, stats2, settings2) =
            (ring.clone(), waker.clone(), stats.clone(), settings.clone());
        // io_uring rings are single-issuer: each shard builds its own on its own thread and says
        // whether that worked before the splitter announces itself.
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let handle = thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || -> anyhow::Result<()> {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                use_wire_sched(settings2.wire_sched, "shard");
                let shard =
                    shard::Shard::new(index, &settings2, socket, ring, waker2, queues, stats2);
                match shard {
                    Ok(shard) => {
                        let _ = ready_tx.send(Ok(()));
                        // A shard that fails takes the splitter down with it: its teams would
                        // silently get nothing otherwise.
                        let guard = StopOnExit(&shard_stop);
                        let result = shard.run(&shard_stop);
                        if let Err(e) = &result {
                            tracing::error!("shard {index} failed: {e:#}");
                        }
                        drop(guard);
                        result
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        Ok(())
                    }
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop.store(true, Ordering::SeqCst);
                anyhow::bail!("shard {index} could not start: {e}")
            }
            Err(_) => {
                stop.store(true, Ordering::SeqCst);
                anyhow::bail!("shard {index} could not start")
            }
        }
        shard_handles.push(handle);
        shard_links.push(control::ShardLink {
            commands: cmd_tx,
            datagrams: dgram_tx,
            waker,
            stats,
        });
    }
    drop(report_tx);
    drop(foreign_tx);
    let shard_stats: Vec<_> = shard_links.iter().map(|l| l.stats.clone()).collect();
    let control_stats = Arc::new(control::ControlStats::default());

    let wakers: Vec<Waker> = shard_links.iter().map(|l| l.waker.clone()).collect();
    // CIS digest mode: a signer thread groups the feed's chunks, signs each group's digest and
    // publishes them (the feed then hands its chunks over instead of publishing them).
    let digest_signing = match (&settings.signer, settings.sign_mode) {
        (Some(signer), signing::SignMode::Digest) => Some(signing::Signing {
            signer: signer.clone(),
            mode: signing::SignMode::Digest,
            window: settings.digest_window,
            max_group: settings.digest_max,
        }),
        _ => None,
    };
    let (digest_tx, signer_handle) = match digest_signing {
        Some(signing) => {
            let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(4096);
            let (ring, stats, wakers) = (ring.clone(), feed_stats.clone(), wakers.clone());
            let chunk_len = crate::proto::wire::CHUNK_HEADER + settings.chunk_size;
            let sched = settings.wire_sched;
            let handle = thread::Builder::new()
                .name("signer".into())
                .spawn(move || {
                    use_wire_sched(sched, "signer");
                    signing::run_digest(&rx, &signing, chunk_len, &ring, &stats, &wakers);
                })?;
            (Some(tx), Some(handle))
        }
        None => (None, None),
    };
    let feed_handle = {
        let (ring, header, stats, stop) = (
            ring.clone(),
            header.clone(),
            feed_stats.clone(),
            stop.clone(),
        );
        let chunk_size = settings.chunk_size;
        let first = settings.first_chunk_number;
        let signer = settings.signer.clone();
        let sched = settings.wire_sched;
        thread::Builder::new().name("feed".into()).spawn(move || {
            if let Some(core) = spare_core {
                core_affinity::set_for_current(core);
            }
            use_wire_sched(sched, "feed");
            let output = match digest_tx {
                Some(tx) => feed::Output::Digest(tx),
                None => feed::Output::Ring(signer.as_ref()),
            };
            let result = feed::run(
                source, chunk_size, first, output, &ring, &header, &stats, &wakers, &stop,
            );
            // The source ended or failed for good: the splitter stops with it.
            stop.store(true, Ordering::SeqCst);
            for w in &wakers {
                w.wake();
            }
            result
        })?
    };
    let _signer_handle = signer_handle;

    if let Some(signer) = &settings.signer {
        // On stderr whatever the log level: the peers need it.
        eprintln!(
            "p2psp splitter: signing chunks ({}); peers join with --splitter-key {}",
            match settings.sign_mode {
                signing::SignMode::Chunk => "a signature per chunk".to_string(),
                signing::SignMode::Digest => format!(
                    "a signed digest per group of up to {} chunks within {} ms",
                    settings.digest_max,
                    settings.digest_window.as_secs_f64() * 1e3
                ),
            },
            signer.public_hex()
        );
    }
    tracing::info!(
        "p2psp splitter listening on {}:{port} (TCP joins and UDP), {} shard(s), {} sends, source {}",
        settings.bind.ip(),
        settings.shards,
        settings.send_path.name(),
        settings.source_text
    );
    let board = Arc::new(status::Board::default());
    if let Some(endpoint) = metrics {
        let addr = endpoint.local_addr();
        let exporter = status::SplitterExporter::new(
            &settings,
            port,
            feed_stats.clone(),
            header.clone(),
            shard_links.iter().map(|l| l.stats.clone()).collect(),
            board.clone(),
        );
        endpoint.serve(Arc::new(exporter), stop.clone())?;
        eprintln!("p2psp splitter metrics on http://{addr}/");
    }
    eprintln!("p2psp splitter listening on {}:{port}", settings.bind.ip());
    if let Some(ims) = settings.ims {
        eprintln!(
            "p2psp splitter: IMS, every chunk once to the multicast group {} (TTL {}); peers join with --ims",
            ims.group, ims.ttl
        );
    }

    let control = control::Control::new(
        &settings,
        listener,
        header,
        feed_stats,
        shard_links,
        report_rx,
        foreign_rx,
        control_stats.clone(),
    )
    .with_board(board)
    .with_nts(nts_socket);
    let control_stop = stop.clone();
    let control = thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            if let Some(core) = spare_core {
                core_affinity::set_for_current(core);
            }
            let result = control.run(&control_stop);
            control_stop.store(true, Ordering::SeqCst);
            result
        })?;
    Ok(Splitter {
        port,
        shard_stats,
        control_stats,
        feed: feed_handle,
        shards: shard_handles,
        control,
    })
}

/// A snapshot of a running splitter's counters ([`Splitter::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitterStats {
    /// The teams' protocol counters, summed over the shards.
    pub team: crate::proto::team::TeamCounters,
    /// Datagrams received on the splitter port.
    pub received: u64,
    /// Of which longer than any valid message and dropped by the receive path.
    pub truncated: u64,
    /// From non-members, dropped because the control plane's queue was full.
    pub foreign_dropped: u64,
    /// From non-members, counted and dropped by the control plane.
    pub foreign_datagrams: u64,
    /// For another shard's member, dropped because its queue was full.
    pub forward_dropped: u64,
    /// Datagrams sent (chunks, resends, goodbyes).
    pub datagrams_sent: u64,
    /// Chunks resent (LRS).
    pub resent: u64,
    /// Peers in the shards' teams.
    pub peers: u64,
    /// Joins completed.
    pub joins: u64,
    /// Connections refused because too many were pending.
    pub refused_pending: u64,
    /// Silent connections closed to make room.
    pub displaced: u64,
    /// Joins refused over `--max-peers`.
    pub refused_full: u64,
    /// Connections that ran out of time.
    pub timeouts: u64,
    /// Joins abandoned before the ready byte.
    pub abandoned: u64,
    /// Connections that asked for nothing known.
    pub bad_requests: u64,
    /// Stream headers served.
    pub header_requests: u64,
    /// Load probes answered.
    pub load_probes: u64,
    /// Connections in progress.
    pub pending: u64,
}

impl Splitter {
    /// The port it listens on (useful with `--port 0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the splitter counted so far, summed over its shards.
    pub fn stats(&self) -> SplitterStats {
        let mut out = SplitterStats::default();
        use shard::ShardMetric as M;
        let sum = |m| status::sum(self.shard_stats.iter().map(|s| &**s), m);
        out.team = shard::team_counters(sum);
        out.received = sum(M::Received);
        out.truncated = sum(M::Truncated);
        out.foreign_dropped = sum(M::ForeignDropped);
        out.datagrams_sent = sum(M::Datagrams);
        out.resent = sum(M::Resent);
        out.peers = sum(M::Peers);
        let c = &self.control_stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        out.joins = get(&c.joins);
        out.refused_pending = get(&c.refused_pending);
        out.displaced = get(&c.displaced);
        out.refused_full = get(&c.refused_full);
        out.timeouts = get(&c.timeouts);
        out.abandoned = get(&c.abandoned);
        out.bad_requests = get(&c.bad_requests);
        out.header_requests = get(&c.header_requests);
        out.load_probes = get(&c.load_probes);
        out.foreign_datagrams = get(&c.foreign_datagrams);
        out.forward_dropped = get(&c.forward_dropped);
        out.pending = get(&c.pending);
        out
    }

    /// Waits until it has stopped.
    pub fn wait(self) -> anyhow::Result<()> {
        let control = self
            .control
            .join()
            .map_err(|_| anyhow::anyhow!("the control thread panicked"))?;
        for h in self.shards {
            h.join()
                .map_err(|_| anyhow::anyhow!("a shard thread panicked"))??;
        }
        control?;
        // A feed blocked reading stdin cannot be interrupted; give it a moment, then leave it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !self.feed.is_finished() && std::time::Instant::now() < deadline {
            thread::sleep(std::time::Duration::from_millis(10));
        }
        if self.feed.is_finished() {
            self.feed
                .join()
                .map_err(|_| anyhow::anyhow!("the feed thread panicked"))??;
        }
        Ok(())
    }
}

/// Raises the stop flag when dropped, also when a thread unwinds from a panic.
struct StopOnExit<'a>(&'a AtomicBool);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Applies `--rt-priority` or `--thread-slice` to the calling thread; a refusal is logged, not
/// fatal (chunks still go out, with the ordinary scheduler; `--rt-priority` was checked at start).
fn use_wire_sched(sched: settings::WireSched, thread: &str) {
    if let Some(p) = sched.rt_priority {
        match driver::set_realtime(p) {
            Ok(()) => return,
            Err(e) => tracing::warn!("cannot put the {thread} thread in SCHED_FIFO {p}: {e}"),
        }
    }
    if let Some(slice) = sched.slice
        && let Err(e) = driver::set_thread_slice(slice)
    {
        tracing::warn!("cannot set the {thread} thread's scheduler slice to {slice:?}: {e}");
    }
}
