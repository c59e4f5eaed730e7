//! What sends the chunks to the peers: the splitter child loadgen started, splitters started by
//! hand, or the baseline's bare fan-out loop; and what each of them can tell about itself (CPU,
//! drops, send rate, send lag).

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::baseline::{BaselineEnd, BaselineStats};
use crate::child::SplitterChild;
use crate::plan::Plan;
use crate::report::{Cpu, SendLag};

/// What sends the chunks.
pub enum Sender {
    /// A `p2psp splitter` loadgen started.
    Child(SplitterChild),
    /// Splitters started by hand (`--splitter a,b,c`).
    Manual(Vec<SocketAddrV4>),
    /// The bare sendmmsg loop (`--baseline sendmmsg`).
    Baseline {
        /// Its counters, read while it runs.
        stats: Arc<BaselineStats>,
        /// Tells it to stop.
        stop: Arc<AtomicBool>,
        /// Its thread, once started.
        handle: Option<thread::JoinHandle<anyhow::Result<BaselineEnd>>>,
        /// What it measured of itself, once stopped.
        end: Option<BaselineEnd>,
    },
}

impl Sender {
    /// A baseline loop not started yet.
    pub fn baseline() -> Sender {
        Sender::Baseline {
            stats: Arc::default(),
            stop: Arc::default(),
            handle: None,
            end: None,
        }
    }

    /// The (first) splitter the peers join; none for the baseline.
    pub fn splitter_addr(&self) -> Option<SocketAddrV4> {
        match self {
            Sender::Child(c) => Some(c.addr),
            Sender::Manual(addrs) => addrs.first().copied(),
            Sender::Baseline { .. } => None,
        }
    }

    /// Every splitter the peers join.
    pub fn splitter_addrs(&self) -> Vec<SocketAddrV4> {
        match self {
            Sender::Manual(addrs) => addrs.clone(),
            _ => self.splitter_addr().into_iter().collect(),
        }
    }

    /// What the header's "Running … @" names.
    pub fn target(&self, plan: &Plan, io: &str) -> String {
        match (self, self.splitter_addr()) {
            (Sender::Child(_), Some(addr)) => {
                format!(
                    "splitter {addr} (child, {} shard(s), --io {io})",
                    plan.shards
                )
            }
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
        }
    }

    /// Tells the baseline loop to stop (nothing for a splitter).
    pub fn stop_baseline(&self) {
        if let Sender::Baseline { stop, .. } = self {
            stop.store(true, Ordering::SeqCst);
        }
    }

    /// Waits for the baseline loop to end and keeps what it measured; `None` for a splitter or a
    /// loop already joined, else whether it ended well.
    pub fn join_baseline(&mut self) -> Option<Result<(), String>> {
        let Sender::Baseline { handle, end, .. } = self else {
            return None;
        };
        Some(match handle.take()?.join() {
            Ok(Ok(e)) => {
                *end = Some(e);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the baseline loop panicked".to_owned()),
        })
    }

    /// The baseline's sequence number of the last chunk sent, read by the workers to count loss.
    pub fn last_seq(&self) -> Arc<dyn Fn() -> Option<u64> + Send + Sync> {
        match self {
            Sender::Baseline { stats, .. } => {
                let stats = stats.clone();
                Arc::new(move || {
                    let n = stats.last_seq_plus_one.load(Ordering::Relaxed);
                    n.checked_sub(1)
                })
            }
            _ => Arc::new(|| None),
        }
    }

    /// The baseline loop's whole life (it starts before the measured seconds and stops after
    /// them); the child's comes from the marks.
    pub fn baseline_cpu(&self) -> Option<Cpu> {
        match self {
            Sender::Baseline { end, .. } => end.map(|e| Cpu::new(e.cpu, e.wall.as_secs_f64())),
            _ => None,
        }
    }

    /// Datagrams the sender gave up: the child's last status, or the baseline's counter.
    pub fn tx_drops(&self) -> Option<u64> {
        match self {
            Sender::Child(c) => c.latest().map(|s| s.send_drops),
            Sender::Baseline { stats, .. } => Some(stats.dropped.load(Ordering::Relaxed)),
            Sender::Manual(_) => None,
        }
    }

    /// The baseline's datagrams sent so far (0 for a splitter).
    pub fn baseline_datagrams(&self) -> u64 {
        match self {
            Sender::Baseline { stats, .. } => stats.datagrams.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// The child's send lag over the status lines printed in `(t0, t1]`.
    pub fn send_lag(&self, t0: Instant, t1: Instant) -> Option<SendLag> {
        let Sender::Child(c) = self else {
            return None;
        };
        let lags: Vec<(f64, f64)> = c
            .samples()
            .iter()
            .filter(|(t, _)| *t > t0 && *t <= t1)
            .map(|(_, s)| (s.send_lag_p99_ms, s.send_lag_max_ms))
            .collect();
        SendLag::of(&lags)
    }

    /// The child's datagrams per second over the interval `[t0, t1)`: its status lines that fall
    /// in it, averaged.
    pub fn child_tx(&self, t0: Instant, t1: Instant) -> Option<f64> {
        let Sender::Child(c) = self else {
            return None;
        };
        // A status line covers the second before it: take those printed in (t0, t1].
        let in_k: Vec<f64> = c
            .samples()
            .iter()
            .filter(|(t, _)| *t > t0 && *t <= t1 + Duration::from_millis(200))
            .map(|(_, s)| s.datagrams_per_s)
            .collect();
        (!in_k.is_empty()).then(|| in_k.iter().sum::<f64>() / in_k.len() as f64)
    }
}
