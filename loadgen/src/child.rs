//! The `p2psp splitter` child process: started with the run's settings, its status line parsed
//! once a second, its CPU read from `/proc`, stopped with SIGTERM.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procfs::{self, CpuTimes};

/// What the splitter's status line says (the fields loadgen uses).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Status {
    /// Peers it counts in its teams.
    pub peers: u64,
    /// Teams.
    pub teams: u64,
    /// Datagrams sent per second.
    pub datagrams_per_s: f64,
    /// Megabits sent per second.
    pub mbit_per_s: f64,
    /// Datagrams it gave up sending (and ring overruns), total.
    pub send_drops: u64,
    /// Its send lag over the last second (feed to last send of a chunk, worst shard), ms:
    /// 99th percentile and largest.
    pub send_lag_p99_ms: f64,
    /// See `send_lag_p99_ms`.
    pub send_lag_max_ms: f64,
}

/// Parses `splitter: 1000 peers in 63 teams | in 122 chunks/s | out 7812 datagrams/s 64.06
/// Mbit/s | ... | send drops 0 | ...`. Tolerant: fields it cannot find stay 0; `None` only if
/// the line is not a status line.
pub fn parse_status(line: &str) -> Option<Status> {
    let rest = line.trim().strip_prefix("splitter:")?;
    let words: Vec<&str> = rest
        .split(|c: char| c.is_ascii_whitespace() || c == '|' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let num_before = |unit: &str| -> Option<f64> {
        let i = words.iter().position(|w| *w == unit)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    let after = |a: &str, b: &str| -> Option<f64> {
        let i = words.windows(2).position(|w| w[0] == a && w[1] == b)?;
        words.get(i + 2)?.parse().ok()
    };
    Some(Status {
        peers: num_before("peers").unwrap_or(0.0) as u64,
        teams: num_before("teams").unwrap_or(0.0) as u64,
        datagrams_per_s: num_before("datagrams/s").unwrap_or(0.0),
        mbit_per_s: num_before("Mbit/s").unwrap_or(0.0),
        send_drops: after("send", "drops").unwrap_or(0.0) as u64,
        send_lag_p99_ms: after("lag", "p99").unwrap_or(0.0),
        send_lag_max_ms: after("ms", "max").unwrap_or(0.0),
    })
}

/// The splitter's settings loadgen passes on.
#[derive(Debug, Clone)]
pub struct ChildSettings {
    /// The binary.
    pub binary: PathBuf,
    /// Source URL (loadgen's timestamped source).
    pub source: String,
    /// Team size.
    pub team_size: usize,
    /// Chunk size.
    pub chunk_size: usize,
    /// Buffer size.
    pub buffer_size: u32,
    /// Monitors per team.
    pub monitors: usize,
    /// Shards.
    pub shards: usize,
    /// Send path (`io_uring`, `sendmmsg` or `auto`).
    pub io: String,
    /// Extra arguments, verbatim.
    pub extra: Vec<String>,
}

/// A running splitter child.
pub struct SplitterChild {
    child: Child,
    /// Where it listens (TCP joins and UDP).
    pub addr: SocketAddrV4,
    samples: Arc<Mutex<Vec<(Instant, Status)>>>,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// Lines of the splitter's other output kept for error messages.
const LOG_LINES: usize = 40;

impl SplitterChild {
    /// Finds the `p2psp` binary next to this executable (cargo puts both in the same target
    /// directory), or in its parent (for test binaries in `deps/`).
    pub fn find_binary() -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe().context("cannot find loadgen's own executable")?;
        let dir = exe.parent().unwrap_or(Path::new("."));
        for d in [Some(dir), dir.parent()].into_iter().flatten() {
            let p = d.join("p2psp");
            if p.is_file() {
                return Ok(p);
            }
        }
        bail!(
            "no p2psp binary next to {} (build it with `cargo build --release`, or pass \
             --splitter-bin PATH, or --splitter HOST:PORT for a splitter started by hand)",
            exe.display()
        )
    }

    /// Starts the splitter on 127.0.0.1 with a free port and waits (at most 10 s) until it says
    /// where it listens.
    pub fn start(s: &ChildSettings) -> anyhow::Result<SplitterChild> {
        let mut cmd = Command::new(&s.binary);
        cmd.arg("splitter")
            .args(["--source", &s.source])
            .args(["--bind", "127.0.0.1", "--port", "0", "--header-size", "0"])
            .args(["--team-size", &s.team_size.to_string()])
            .args(["--chunk-size", &s.chunk_size.to_string()])
            .args(["--buffer-size", &s.buffer_size.to_string()])
            .args(["--monitors", &s.monitors.to_string()])
            .args(["--shards", &s.shards.to_string()])
            .args(["--io", &s.io])
            .args(&s.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", s.binary.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let samples: Arc<Mutex<Vec<(Instant, Status)>>> = Arc::default();
        let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (addr_tx, addr_rx) = crossbeam_channel::bounded(1);
        {
            let (samples, log) = (samples.clone(), log.clone());
            thread::Builder::new()
                .name("splitter-log".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        if let Some(st) = parse_status(&line) {
                            samples.lock().unwrap().push((Instant::now(), st));
                            continue;
                        }
                        if let Some(a) = line.strip_prefix("p2psp splitter listening on ") {
                            let _ = addr_tx.try_send(a.trim().parse::<SocketAddrV4>());
                        }
                        let mut l = log.lock().unwrap();
                        if l.len() == LOG_LINES {
                            l.pop_front();
                        }
                        l.push_back(line);
                    }
                })?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut me = SplitterChild {
            child,
            addr: SocketAddrV4::new([127, 0, 0, 1].into(), 0),
            samples,
            log,
        };
        loop {
            match addr_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(addr)) => {
                    me.addr = addr;
                    return Ok(me);
                }
                Ok(Err(e)) => {
                    let log = me.stop_and_log();
                    bail!("cannot parse the splitter's address ({e}); it said:\n{log}")
                }
                Err(_) => {}
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                thread::sleep(Duration::from_millis(50));
                bail!(
                    "the splitter exited ({status}) before listening; it said:\n{}",
                    me.log_text()
                );
            }
            if Instant::now() > deadline {
                let log = me.stop_and_log();
                bail!("the splitter did not start listening within 10 s; it said:\n{log}");
            }
        }
    }

    /// Its CPU times so far (`None` once it has exited).
    pub fn cpu(&self) -> Option<CpuTimes> {
        procfs::process_cpu(self.child.id())
    }

    /// Its resident memory now and at its peak, bytes (zeros once it has exited).
    pub fn rss(&self) -> (u64, u64) {
        procfs::rss_of(&self.child.id().to_string())
    }

    /// The status samples so far.
    pub fn samples(&self) -> Vec<(Instant, Status)> {
        self.samples.lock().unwrap().clone()
    }

    /// The newest status sample.
    pub fn latest(&self) -> Option<Status> {
        self.samples.lock().unwrap().last().map(|s| s.1)
    }

    /// `Some(description)` if it has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// Its last lines of output other than status lines.
    pub fn log_text(&self) -> String {
        let l = self.log.lock().unwrap();
        l.iter().map(|s| format!("  | {s}\n")).collect()
    }

    /// SIGTERM, then SIGKILL after 3 s; returns its last output lines.
    pub fn stop_and_log(&mut self) -> String {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        self.log_text()
    }
}

impl Drop for SplitterChild {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_status_line() {
        let l = "splitter: 1000 peers in 63 teams | in 122 chunks/s | out 7812 datagrams/s 64.06 \
                 Mbit/s | send lag p99 1.25 ms max 7.50 ms | losses 0/s (0 total) expelled 0 | \
                 send drops 3 | ignored 0";
        let s = parse_status(l).unwrap();
        assert_eq!(s.peers, 1000);
        assert_eq!(s.teams, 63);
        assert_eq!(s.datagrams_per_s, 7812.0);
        assert_eq!(s.mbit_per_s, 64.06);
        assert_eq!(s.send_drops, 3);
        assert_eq!((s.send_lag_p99_ms, s.send_lag_max_ms), (1.25, 7.5));
        assert_eq!(
            parse_status("p2psp splitter listening on 127.0.0.1:8001"),
            None
        );
        // A reworded line still gives what it can.
        let s = parse_status("splitter: out 5 datagrams/s").unwrap();
        assert_eq!((s.peers, s.datagrams_per_s), (0, 5.0));
    }
}
