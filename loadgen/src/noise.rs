//! The machine's own scheduling noise during a run, measured the way `cyclictest` does (at normal
//! priority, unpinned): a thread sleeps 1 ms again and again and records how late each wake-up is.
//!
//! On a shared VM the hypervisor preempts vCPUs and neighbours steal time; that shows up here as
//! wake-ups tens of milliseconds late even on an idle guest. Every chunk's path (source, splitter
//! feed and shard, peer worker) needs a few such wake-ups, so a latency tail no longer than this
//! probe's is the machine's before it is the splitter's. The figure puts the tail in context; it
//! does not excuse it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::tally::latency_histogram;

/// How long each probe sleep asks for.
pub const PERIOD: Duration = Duration::from_millis(1);

/// A running probe; `finish` stops it and hands over its wake-up delays per interval.
pub struct NoiseProbe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<BTreeMap<u64, Histogram<u64>>>,
}

impl NoiseProbe {
    /// Starts the probe; delays are filed under the interval (whole seconds since `epoch`) in which
    /// the wake-up happened, as the workers file their reports.
    pub fn start(epoch: Instant) -> std::io::Result<NoiseProbe> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::Builder::new()
            .name("noise-probe".into())
            .spawn(move || {
                let mut by_interval: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
                while !flag.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    thread::sleep(PERIOD);
                    let woke = Instant::now();
                    let late = woke.saturating_duration_since(asked + PERIOD);
                    let k = woke.saturating_duration_since(epoch).as_secs();
                    by_interval
                        .entry(k)
                        .or_insert_with(latency_histogram)
                        .saturating_record((late.as_nanos() as u64).max(1));
                }
                by_interval
            })?;
        Ok(NoiseProbe { stop, handle })
    }

    /// Stops the probe; the wake-up delays of intervals `[from, until)`, merged (`None` if the
    /// thread died).
    pub fn finish(self, from: u64, until: u64) -> Option<Histogram<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        let by_interval = self.handle.join().ok()?;
        let mut h = latency_histogram();
        for (_, v) in by_interval.range(from..until) {
            let _ = h.add(v);
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_one_delay_per_wake_up_in_its_interval() {
        let epoch = Instant::now();
        let p = NoiseProbe::start(epoch).unwrap();
        thread::sleep(Duration::from_millis(60));
        let h = p.finish(0, 10).unwrap();
        // 60 ms of 1 ms sleeps: at least a few wake-ups, at most 60.
        assert!(h.len() >= 3 && h.len() <= 61, "{} wake-ups", h.len());
        assert!(h.min() >= 1);
        // Nothing filed outside the asked range.
        let p = NoiseProbe::start(epoch).unwrap();
        thread::sleep(Duration::from_millis(5));
        assert_eq!(p.finish(100, 200).unwrap().len(), 0);
    }
}
