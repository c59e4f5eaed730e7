//! `p2psp splitter`: reads one live stream, cuts it into chunks and sends them to teams of peers.
//!
//! Threads:
//! - the **feed** ([`feed`]) reads the source, keeps the stream header, numbers chunks and
//!   publishes each once into the [`ChunkRing`](crate::ring::ChunkRing);
//! - **shards** ([`shard`]), one per core by default, each pinned to a core, own a set of teams and
//!   an io_uring (or `sendmmsg`) UDP socket bound to the splitter port with `SO_REUSEPORT`; each
//!   chunk goes out in batched submissions that all point at the one datagram in the ring;
//! - the **control plane** ([`control`]) accepts TCP joins (no thread per peer), places peers in
//!   teams, serves the stream header over HTTP and prints the status line.

pub mod control;
pub mod feed;
pub mod settings;
pub mod shard;
pub mod source;

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
    let udp_addr = std::net::SocketAddrV4::new(*settings.bind.ip(), port);
    let source = source::open(&settings.source, settings.bitrate, stop.clone())
        .with_context(|| format!("cannot open the source {}", settings.source_text))?;

    let ring = Arc::new(ChunkRing::new(settings.ring_slots));
    let header = Arc::new(feed::HeaderCell::new(settings.header_size));
    let feed_stats = Arc::new(feed::FeedStats::default());
    let cores = core_affinity::get_core_ids().unwrap_or_default();

    let mut shard_handles = Vec::new();
    let mut shard_links = Vec::new();
    let (report_tx, report_rx) = crossbeam_channel::unbounded();
    for index in 0..settings.shards {
        let socket = driver::udp_socket(
            udp_addr,
            true,
            Some(settings.socket_buffer),
            Some(settings.socket_buffer),
        )
        .with_context(|| format!("cannot bind UDP {udp_addr}"))?;
        let waker = Waker::new().context("cannot create an eventfd")?;
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(shard::ShardStats::default());
        let core = cores.get(index % cores.len().max(1)).copied();
        let shard_stop = stop.clone();
        let (ring, waker2, report_tx, stats2, settings2) = (
            ring.clone(),
            waker.clone(),
            report_tx.clone(),
            stats.clone(),
            settings.clone(),
        );
        // io_uring rings are single-issuer: each shard builds its own on its own thread and says
        // whether that worked before the splitter announces itself.
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let handle = thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || -> anyhow::Result<()> {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                let shard = shard::Shard::new(
                    index, &settings2, socket, ring, waker2, cmd_rx, report_tx, stats2,
                );
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
            waker,
            stats,
        });
    }
    drop(report_tx);

    let wakers: Vec<Waker> = shard_links.iter().map(|l| l.waker.clone()).collect();
    let feed_handle = {
        let (ring, header, stats, stop) = (
            ring.clone(),
            header.clone(),
            feed_stats.clone(),
            stop.clone(),
        );
        let chunk_size = settings.chunk_size;
        let first = settings.first_chunk_number;
        thread::Builder::new().name("feed".into()).spawn(move || {
            let result = feed::run(
                source, chunk_size, first, &ring, &header, &stats, &wakers, &stop,
            );
            // The source ended or failed for good: the splitter stops with it.
            stop.store(true, Ordering::SeqCst);
            for w in &wakers {
                w.wake();
            }
            result
        })?
    };

    tracing::info!(
        "p2psp splitter listening on {}:{port} (TCP joins and UDP), {} shard(s), {} sends, source {}",
        settings.bind.ip(),
        settings.shards,
        settings.send_path.name(),
        settings.source_text
    );
    eprintln!("p2psp splitter listening on {}:{port}", settings.bind.ip());

    let control = control::Control::new(
        &settings,
        listener,
        header,
        feed_stats,
        shard_links,
        report_rx,
    );
    let control_stop = stop.clone();
    let control = thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let result = control.run(&control_stop);
            control_stop.store(true, Ordering::SeqCst);
            result
        })?;
    Ok(Splitter {
        port,
        feed: feed_handle,
        shards: shard_handles,
        control,
    })
}

impl Splitter {
    /// The port it listens on (useful with `--port 0`).
    pub fn port(&self) -> u16 {
        self.port
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
