//! The run's collector: owns the join → measure → leave phases and the per-second aggregation of
//! the workers' reports. Sans-IO, like the protocol core: time is an argument (`now`), the
//! workers' reports and join results are handed in, and what the run must do next comes back as
//! [`Command`]s, so the phase machine is unit-tested without threads or sockets. `main` owns the
//! I/O around it (channels, the splitter child, `/proc` marks, printing).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::peers::{JoinResult, Report};
use crate::report::Interval;
use crate::tally::{Latencies, Tally, latency_histogram};

/// Peers wait this long for the splitter's goodbye once leaving starts (they wait up to 2 s).
const LEAVE_WAIT: Duration = Duration::from_millis(2500);
/// Workers that have not stopped this long after the leave deadline fail the run.
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Joins may run this long past their schedule.
const JOIN_GRACE: Duration = Duration::from_secs(30);

/// Phases of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Peers joining.
    Join,
    /// The measured seconds.
    Measure,
    /// Peers leaving.
    Leave,
}

impl Phase {
    /// The name in the per-second lines and the JSON report.
    pub fn name(self) -> &'static str {
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
    /// The same by splitter (`Report::group`).
    groups: BTreeMap<usize, Group>,
}

/// One splitter's share of the measured seconds (`--splitter a,b,c`): every worker serves one
/// splitter's peers, so these add up to the totals exactly.
#[derive(Default, Clone)]
pub struct Group {
    /// Counters.
    pub tally: Tally,
    /// Latencies.
    pub hist: Latencies,
    /// Peers its workers had in the last measured second.
    pub peers: usize,
}

impl Group {
    fn add(&mut self, tally: &Tally, hist: &Latencies) {
        self.tally.add(tally);
        self.hist.add(hist);
    }
}

impl Default for Agg {
    fn default() -> Self {
        Agg {
            reports: 0,
            tally: Tally::default(),
            hist: Latencies::default(),
            peers: 0,
            cpu: Duration::ZERO,
            groups: BTreeMap::new(),
        }
    }
}

/// How the collector is set up.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Start of interval 0.
    pub epoch: Instant,
    /// When the joins started.
    pub join_start: Instant,
    /// Worker threads (each reports every interval).
    pub threads: usize,
    /// Peers to join.
    pub peers: usize,
    /// Joins per second.
    pub join_rate: f64,
    /// Seconds to measure.
    pub duration: Duration,
    /// Baseline run: no goodbyes to wait for.
    pub baseline: bool,
}

/// The counters the joiners and workers share, read once per step.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Joins completed.
    pub joined: usize,
    /// Joins failed.
    pub join_failed: usize,
    /// Peers that left.
    pub left: usize,
    /// The workers were told to stop (by us, or because one failed).
    pub stopped: bool,
}

/// What the run must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Every join finished (or the join deadline passed): stop the joiners; measure intervals
    /// `from..until`.
    Measure {
        /// First measured interval.
        from: u64,
        /// First interval after the measured ones.
        until: u64,
    },
    /// The measured seconds are over: peers leave (and the baseline loop stops).
    Leave,
    /// Stop the workers (after the baseline loop has ended and its last datagrams landed).
    StopWorkers,
}

/// Whether the run goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Keep stepping.
    Running,
    /// Every worker stopped after leaving: the run is complete.
    Done,
    /// The run failed (the message says why).
    Failed(String),
}

/// The collector (see the module docs).
pub struct Collector {
    s: Settings,
    phase: Phase,
    aggs: BTreeMap<u64, Agg>,
    intervals: Vec<Interval>,
    next_print: u64,
    total_hist: Latencies,
    total: Tally,
    groups: BTreeMap<usize, Group>,
    worker_cpu: Duration,
    measured: u64,
    join_hist: Histogram<u64>,
    join_errors: Vec<String>,
    joins_done_at: Option<Instant>,
    measure: Option<(u64, u64)>,
    leave_deadline: Option<Instant>,
    failure: Option<String>,
    finished_workers: usize,
    recv_stats: Vec<p2psp::driver::RecvStats>,
}

/// What the collector gathered over the run.
pub struct Outcome {
    /// Counters over the measured seconds.
    pub total: Tally,
    /// Latencies over the measured seconds.
    pub total_hist: Latencies,
    /// The same by splitter, in `--splitter` order (one entry with one splitter).
    pub groups: Vec<Group>,
    /// Worker CPU over the measured seconds.
    pub worker_cpu: Duration,
    /// Measured intervals accounted.
    pub measured: u64,
    /// Join times.
    pub join_hist: Histogram<u64>,
    /// Up to 5 distinct join errors.
    pub join_errors: Vec<String>,
    /// From the first join's start until every join finished.
    pub join_seconds: f64,
    /// The measured intervals `[from, until)`.
    pub measure: (u64, u64),
    /// Every interval printed.
    pub intervals: Vec<Interval>,
    /// Each worker's receive counters at its end.
    pub recv_stats: Vec<p2psp::driver::RecvStats>,
}

impl Collector {
    /// A collector in the join phase; the first interval it closes is the one `now` falls in.
    pub fn new(s: Settings, now: Instant) -> Collector {
        Collector {
            s,
            phase: Phase::Join,
            aggs: BTreeMap::new(),
            intervals: Vec::new(),
            next_print: interval_of(s.epoch, now),
            total_hist: Latencies::default(),
            total: Tally::default(),
            groups: BTreeMap::new(),
            worker_cpu: Duration::ZERO,
            measured: 0,
            join_hist: latency_histogram(),
            join_errors: Vec::new(),
            joins_done_at: None,
            measure: None,
            leave_deadline: None,
            failure: None,
            finished_workers: 0,
            recv_stats: Vec::new(),
        }
    }

    /// The interval `t` falls in.
    pub fn interval(&self, t: Instant) -> u64 {
        interval_of(self.s.epoch, t)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The measured intervals `[from, until)`, once decided.
    pub fn measure(&self) -> Option<(u64, u64)> {
        self.measure
    }

    /// One join's outcome.
    pub fn on_join(&mut self, r: JoinResult) {
        match r {
            Ok(t) => self.join_hist.saturating_record(t.as_nanos() as u64),
            Err(e) => {
                if self.join_errors.len() < 5 && !self.join_errors.contains(&e) {
                    self.join_errors.push(e);
                }
            }
        }
    }

    /// One worker's report of one interval.
    pub fn on_report(&mut self, r: Report) {
        if r.last {
            self.finished_workers += 1;
            self.recv_stats.push(r.recv);
        }
        let agg = self.aggs.entry(r.index).or_default();
        agg.reports += 1;
        agg.tally.add(&r.tally);
        agg.hist.add(&r.hist);
        agg.peers += r.peers;
        agg.cpu += r.cpu;
        let g = agg.groups.entry(r.group).or_default();
        g.add(&r.tally, &r.hist);
        g.peers += r.peers;
    }

    /// Closes every interval all workers reported, or that is 2 s overdue, in order, and returns
    /// them (to print). `tx(k)`: what the sender sent during interval `k`, if known.
    pub fn close_intervals(
        &mut self,
        now: Instant,
        tx: &dyn Fn(u64) -> Option<f64>,
    ) -> &[Interval] {
        let first = self.intervals.len();
        let current = self.interval(now);
        while let Some(agg) = self.aggs.get(&self.next_print) {
            let overdue = now > self.s.epoch + Duration::from_secs(self.next_print + 3);
            if agg.reports < self.s.threads && !overdue {
                break;
            }
            let agg = self.aggs.remove(&self.next_print).expect("present");
            let k = self.next_print;
            self.next_print += 1;
            let measure = self.measure;
            let in_window = measure.is_some_and(|(from, until)| k >= from && k < until);
            let phase = match (in_window, measure) {
                (true, _) => Phase::Measure,
                (false, Some((_, until))) if k >= until => Phase::Leave,
                _ => Phase::Join,
            };
            let iv = Interval::new(
                k,
                phase.name(),
                agg.peers,
                &agg.tally,
                &agg.hist.scheduled,
                tx(k),
            );
            if in_window {
                self.total.add(&agg.tally);
                self.total_hist.add(&agg.hist);
                self.worker_cpu += agg.cpu;
                self.measured += 1;
                for (k, g) in &agg.groups {
                    let total = self.groups.entry(*k).or_default();
                    total.add(&g.tally, &g.hist);
                    total.peers = g.peers;
                }
            }
            self.intervals.push(iv);
        }
        if self.aggs.is_empty() && self.next_print < current.saturating_sub(3) {
            self.next_print = current.saturating_sub(3);
        }
        &self.intervals[first..]
    }

    /// Fails the run (the first reason given is kept).
    pub fn fail(&mut self, why: String) {
        self.failure.get_or_insert(why);
    }

    /// Moves through the phases at `now`, given the shared counters; `commands` gets what the run
    /// must do.
    pub fn advance(&mut self, now: Instant, c: Counts, commands: &mut Vec<Command>) -> Status {
        if c.stopped && self.phase != Phase::Leave {
            self.fail("a worker failed".to_owned());
        }
        if let Some(f) = &self.failure {
            return Status::Failed(f.clone());
        }
        let current = self.interval(now);
        match self.phase {
            Phase::Join => {
                let deadline = self.s.join_start
                    + Duration::from_secs_f64(self.s.peers as f64 / self.s.join_rate)
                    + JOIN_GRACE;
                if c.joined + c.join_failed >= self.s.peers || now > deadline {
                    self.joins_done_at = Some(now);
                    if c.joined == 0 {
                        let why = format!(
                            "every join failed; first errors:\n  {}",
                            self.join_errors.join("\n  ")
                        );
                        self.fail(why.clone());
                        return Status::Failed(why);
                    }
                    let from = current + 1;
                    let until = from + self.s.duration.as_secs_f64().ceil().max(1.0) as u64;
                    self.measure = Some((from, until));
                    self.phase = Phase::Measure;
                    commands.push(Command::Measure { from, until });
                }
            }
            Phase::Measure => {
                let (_, until) = self.measure.expect("set when measuring");
                if current >= until && self.next_print >= until {
                    self.phase = Phase::Leave;
                    self.leave_deadline = Some(now + LEAVE_WAIT);
                    commands.push(Command::Leave);
                }
            }
            Phase::Leave => {
                let deadline = self.leave_deadline.expect("set when leaving");
                let all_left = c.left >= c.joined;
                let late = now > deadline;
                if (all_left || late || self.s.baseline) && !c.stopped {
                    commands.push(Command::StopWorkers);
                }
                if self.finished_workers >= self.s.threads {
                    return Status::Done;
                }
                if late && now > deadline + STOP_WAIT {
                    let why = "workers did not stop within 5 s".to_owned();
                    self.fail(why.clone());
                    return Status::Failed(why);
                }
            }
        }
        Status::Running
    }

    /// Accounts the reports that arrived after the last step (the workers have stopped): those of
    /// measured intervals count, except each worker's last, partial one.
    pub fn late_report(&mut self, r: Report) {
        if r.last {
            self.recv_stats.push(r.recv);
        }
        if let Some((from, until)) = self.measure
            && r.index >= from
            && r.index < until
            && !r.last
        {
            self.total.add(&r.tally);
            self.total_hist.add(&r.hist);
            self.worker_cpu += r.cpu;
            self.groups
                .entry(r.group)
                .or_default()
                .add(&r.tally, &r.hist);
        }
    }

    /// What was gathered; `None` if the run never reached its measurement.
    pub fn finish(mut self) -> Option<Outcome> {
        let measure = self.measure?;
        let n = self.groups.keys().max().map_or(0, |k| k + 1);
        let groups = (0..n)
            .map(|k| self.groups.remove(&k).unwrap_or_default())
            .collect();
        Some(Outcome {
            total: self.total,
            total_hist: self.total_hist,
            groups,
            worker_cpu: self.worker_cpu,
            measured: self.measured,
            join_hist: self.join_hist,
            join_errors: self.join_errors,
            join_seconds: self
                .joins_done_at
                .map_or(0.0, |t| t.duration_since(self.s.join_start).as_secs_f64()),
            measure,
            intervals: self.intervals,
            recv_stats: self.recv_stats,
        })
    }
}

fn interval_of(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(epoch: Instant, threads: usize) -> Settings {
        Settings {
            epoch,
            join_start: epoch,
            threads,
            peers: 10,
            join_rate: 10.0,
            duration: Duration::from_secs(3),
            baseline: false,
        }
    }

    fn report(index: u64, datagrams: u64, last: bool) -> Report {
        Report {
            index,
            tally: Tally {
                datagrams,
                played: datagrams,
                ..Tally::default()
            },
            hist: Latencies::default(),
            peers: 5,
            cpu: Duration::from_millis(10),
            last,
            recv: p2psp::driver::RecvStats::default(),
            group: 0,
        }
    }

    fn at(epoch: Instant, ms: u64) -> Instant {
        epoch + Duration::from_millis(ms)
    }

    #[test]
    fn join_measure_leave_done_with_the_measured_seconds_summed() {
        let epoch = Instant::now();
        let mut c = Collector::new(settings(epoch, 2), epoch);
        let mut cmds = Vec::new();
        let counts = |joined, left, stopped| Counts {
            joined,
            join_failed: 0,
            left,
            stopped,
        };
        // Joining: nothing to do until every join finished.
        assert_eq!(
            c.advance(at(epoch, 500), counts(4, 0, false), &mut cmds),
            Status::Running
        );
        assert!(cmds.is_empty());
        c.on_join(Ok(Duration::from_millis(2)));
        c.on_join(Err("refused".into()));
        c.on_join(Err("refused".into()));
        // All 10 joined during interval 1: measure 2..5.
        c.advance(at(epoch, 1200), counts(10, 0, false), &mut cmds);
        assert_eq!(cmds, [Command::Measure { from: 2, until: 5 }]);
        assert_eq!(c.phase(), Phase::Measure);
        // Intervals close once both workers reported them.
        for k in 0..6 {
            c.on_report(report(k, 100, false));
        }
        assert_eq!(
            c.close_intervals(at(epoch, 2500), &|_| None).len(),
            0,
            "one worker only"
        );
        // The second worker serves the second splitter's peers.
        for k in 0..6 {
            c.on_report(Report {
                group: 1,
                ..report(k, 50, false)
            });
        }
        let lines: Vec<(u64, &str)> = c
            .close_intervals(at(epoch, 6100), &|k| Some(k as f64))
            .iter()
            .map(|i| (i.t, i.phase))
            .collect();
        assert_eq!(
            lines,
            [
                (0, "join"),
                (1, "join"),
                (2, "measure"),
                (3, "measure"),
                (4, "measure"),
                (5, "leave")
            ]
        );
        cmds.clear();
        assert_eq!(
            c.advance(at(epoch, 6100), counts(10, 0, false), &mut cmds),
            Status::Running
        );
        assert_eq!(cmds, [Command::Leave]);
        // Leaving: stop the workers once every peer left, done once every worker stopped.
        cmds.clear();
        c.advance(at(epoch, 6200), counts(10, 3, false), &mut cmds);
        assert!(cmds.is_empty(), "still waiting for goodbyes");
        c.advance(at(epoch, 6300), counts(10, 10, false), &mut cmds);
        assert_eq!(cmds, [Command::StopWorkers]);
        c.on_report(report(6, 1, true));
        assert_eq!(
            c.advance(at(epoch, 6400), counts(10, 10, true), &mut cmds),
            Status::Running
        );
        c.on_report(report(6, 1, true));
        assert_eq!(
            c.advance(at(epoch, 6450), counts(10, 10, true), &mut cmds),
            Status::Done
        );
        // A late report of a measured interval counts; a last one does not.
        c.late_report(report(4, 7, false));
        c.late_report(report(4, 1000, true));
        let o = c.finish().unwrap();
        assert_eq!(o.measure, (2, 5));
        assert_eq!(o.measured, 3);
        assert_eq!(o.total.datagrams, 3 * 150 + 7);
        assert_eq!(o.worker_cpu, Duration::from_millis(70));
        assert_eq!(o.join_errors, ["refused"]);
        assert_eq!(o.join_hist.len(), 1);
        assert!((o.join_seconds - 1.2).abs() < 1e-9);
        assert_eq!(o.recv_stats.len(), 3);
        // By splitter: the totals split exactly.
        assert_eq!(o.groups.len(), 2);
        assert_eq!(o.groups[0].tally.datagrams, 3 * 100 + 7);
        assert_eq!(o.groups[1].tally.datagrams, 3 * 50);
        assert_eq!(
            o.groups[0].tally.played + o.groups[1].tally.played,
            o.total.played
        );
        assert_eq!((o.groups[0].peers, o.groups[1].peers), (5, 5));
    }

    #[test]
    fn overdue_intervals_close_without_every_worker() {
        let epoch = Instant::now();
        let mut c = Collector::new(settings(epoch, 2), epoch);
        c.on_report(report(0, 1, false));
        assert!(c.close_intervals(at(epoch, 2900), &|_| None).is_empty());
        assert_eq!(c.close_intervals(at(epoch, 3100), &|_| None).len(), 1);
    }

    #[test]
    fn failures_end_the_run() {
        let epoch = Instant::now();
        let mut cmds = Vec::new();
        // Every join failed.
        let mut c = Collector::new(settings(epoch, 1), epoch);
        c.on_join(Err("no route".into()));
        let st = c.advance(
            at(epoch, 100),
            Counts {
                join_failed: 10,
                ..Counts::default()
            },
            &mut cmds,
        );
        assert!(
            matches!(st, Status::Failed(ref m) if m.contains("no route")),
            "{st:?}"
        );
        assert!(c.finish().is_none());
        // A worker stopped before leaving.
        let mut c = Collector::new(settings(epoch, 1), epoch);
        let st = c.advance(
            at(epoch, 100),
            Counts {
                stopped: true,
                ..Counts::default()
            },
            &mut cmds,
        );
        assert_eq!(st, Status::Failed("a worker failed".into()));
        // The join deadline passes with some joined: measure anyway.
        let mut c = Collector::new(settings(epoch, 1), epoch);
        let st = c.advance(
            at(epoch, 32_000),
            Counts {
                joined: 3,
                ..Counts::default()
            },
            &mut cmds,
        );
        assert_eq!(st, Status::Running);
        assert_eq!(
            cmds,
            [Command::Measure {
                from: 33,
                until: 36
            }]
        );
        // Workers that never stop after leaving. With no reports at all, intervals are skipped
        // up to 3 s behind the clock, so leaving starts 3 s after the measured seconds.
        cmds.clear();
        let joined = Counts {
            joined: 3,
            ..Counts::default()
        };
        c.close_intervals(at(epoch, 39_100), &|_| None);
        c.advance(at(epoch, 39_100), joined, &mut cmds);
        assert_eq!(cmds, [Command::Leave]);
        assert_eq!(c.phase(), Phase::Leave);
        let st = c.advance(
            at(epoch, 47_000),
            Counts {
                stopped: true,
                ..joined
            },
            &mut cmds,
        );
        assert_eq!(st, Status::Failed("workers did not stop within 5 s".into()));
    }
}
