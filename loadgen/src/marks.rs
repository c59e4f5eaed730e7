//! Readings taken at interval starts, for what the collector cannot count itself: the splitter
//! child's and loadgen's CPU and the baseline's datagram count at every interval start; the
//! kernel drops at the peers' sockets, every core's ticks and the child's memory at the measured
//! seconds' edges. The figures over the measured seconds come out of them at the end.

use std::collections::BTreeMap;

use crate::peers::Shared;
use crate::procfs::{self, CoreTicks, CpuTimes};
use crate::report::{CoreUse, Cpu};
use crate::sender::Sender;

/// The readings at one interval start.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The splitter child's CPU.
    sender_cpu: Option<CpuTimes>,
    /// loadgen's own CPU.
    own_cpu: Option<CpuTimes>,
    /// The baseline's datagrams sent so far.
    baseline_tx: u64,
}

/// Every reading taken so far, by interval.
#[derive(Default)]
pub struct Marks {
    window: BTreeMap<u64, Mark>,
    drops: BTreeMap<u64, u64>,
    cores: BTreeMap<u64, Vec<(String, CoreTicks)>>,
    /// The splitter child's resident memory (now, peak) at the end of the measured seconds.
    pub sender_rss: Option<(u64, u64)>,
    seen: Option<u64>,
}

impl Marks {
    /// Takes the readings of interval `current` when it starts (once per interval).
    pub fn take(
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
        let mark = Mark {
            sender_cpu,
            own_cpu: procfs::self_cpu(),
            baseline_tx: sender.baseline_datagrams(),
        };
        self.window.insert(current, mark);
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

    /// Datagrams per second the splitter or the baseline sent during interval `k`: the
    /// splitter's status lines that fall in it (averaged), or the baseline's counter between
    /// marks.
    pub fn interval_tx(&self, sender: &Sender, shared: &Shared, k: u64) -> Option<f64> {
        match sender {
            Sender::Baseline { .. } => {
                let a = self.window.get(&k)?.baseline_tx;
                let b = self.window.get(&(k + 1))?.baseline_tx;
                Some(b.saturating_sub(a) as f64)
            }
            _ => sender.child_tx(shared.interval_start(k), shared.interval_start(k + 1)),
        }
    }

    /// The splitter child's CPU over the intervals `from..until`.
    pub fn sender_cpu(&self, from: u64, until: u64) -> Option<Cpu> {
        let c0 = self.window.get(&from)?.sender_cpu?;
        let c1 = self.window.get(&until)?.sender_cpu?;
        Some(Cpu::new(c1.since(&c0), (until - from) as f64))
    }

    /// loadgen's whole CPU over the intervals `from..until`, seconds (0 unreadable).
    pub fn process_cpu_s(&self, from: u64, until: u64) -> f64 {
        let own = |k| self.window.get(&k).and_then(|m| m.own_cpu);
        match (own(from), own(until)) {
            (Some(p0), Some(p1)) => p1.since(&p0).total().as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Kernel drops at the peers' sockets over the intervals `from..until`.
    pub fn socket_drops(&self, from: u64, until: u64) -> Option<u64> {
        let (a, b) = (self.drops.get(&from)?, self.drops.get(&until)?);
        Some(b.saturating_sub(*a))
    }

    /// Every core's use over the intervals `from..until`.
    pub fn cores(&self, from: u64, until: u64) -> Vec<CoreUse> {
        let (Some(a), Some(b)) = (self.cores.get(&from), self.cores.get(&until)) else {
            return Vec::new();
        };
        b.iter()
            .filter_map(|(name, t1)| {
                let (_, t0) = a.iter().find(|(n, _)| n == name)?;
                Some(CoreUse::of(name, &t1.since(t0)))
            })
            .collect()
    }
}
