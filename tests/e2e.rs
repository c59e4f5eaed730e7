//! End to end, as real processes on loopback: a `p2psp splitter` with the test source and teams of
//! `p2psp peer` processes. Every peer's output must be the test pattern: the stream header, then
//! contiguous chunks from its first played chunk (a lost chunk would break the pattern).

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use p2psp::pattern;
use support::{
    Proc, Splitter, one_at_a_time, one_line_exit_2, peer_log, start_peer_env,
    start_peer_with_player, test_dir, wait_joined,
};

const CHUNK: usize = 1024;
const HEADER: usize = 4096;

/// Peers log their protocol decisions too.
const PEER_LOG: [(&str, &str); 1] = [("RUST_LOG", "p2psp=info,p2psp::peer=debug")];

/// A splitter with the test source at 2 Mbit/s, and the peers started against it. Its streaming
/// tests run one at a time ([`one_at_a_time`]): each starts up to 17 processes that must keep
/// real-time deadlines (half a buffer is half a second at 2 Mbit/s), and a 2-core CI machine
/// running four teams at once would measure its scheduler, not the protocol.
struct Run {
    dir: PathBuf,
    splitter: Splitter,
    next_peer: usize,
    // Last: released after the splitter is gone.
    _turn: MutexGuard<'static, ()>,
}

impl Run {
    fn start(name: &str, extra: &[&str]) -> Run {
        let turn = one_at_a_time();
        let dir = test_dir(&format!("e2e-{name}"));
        let header = HEADER.to_string();
        let mut args = vec!["--source", "test", "--bitrate", "2M"];
        args.extend_from_slice(&["--header-size", &header, "--shards", "2"]);
        args.extend_from_slice(extra);
        let splitter = Splitter::start(&dir, &args, Stdio::null());
        Run {
            dir,
            splitter,
            next_peer: 0,
            _turn: turn,
        }
    }

    fn peer(&mut self, monitor: bool) -> Proc {
        self.peer_with(monitor, &["--player-port", "0"])
    }

    /// A peer with `extra` flags that writes what it plays to `<name>.out` ([`Run::output`]).
    fn peer_with(&mut self, monitor: bool, extra: &[&str]) -> Proc {
        let (name, args) = self.next(monitor, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let peer = start_peer_env(&self.dir, &name, self.splitter.port, &args, &PEER_LOG);
        // People arrive one after another.
        std::thread::sleep(Duration::from_millis(50));
        peer
    }

    /// [`Run::peer_with`] with a player port; the peer, once joined, and the port.
    fn player_peer(&mut self, monitor: bool, extra: &[&str]) -> (Proc, u16) {
        let (name, args) = self.next(monitor, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        start_peer_with_player(&self.dir, &name, self.splitter.port, &args, &PEER_LOG)
    }

    /// The next peer's name and its flags: `extra`, its output file, maybe `--monitor`.
    fn next(&mut self, monitor: bool, extra: &[&str]) -> (String, Vec<String>) {
        self.next_peer += 1;
        let name = format!("peer{}", self.next_peer);
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        args.push("--output".into());
        args.push(self.output(&name).display().to_string());
        if monitor {
            args.push("--monitor".into());
        }
        (name, args)
    }

    /// Where the peer `name` writes the stream it plays.
    fn output(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.out"))
    }

    /// Stops `peer` (it must leave cleanly within 10 s) and checks its output against the
    /// pattern ([`check_output`]); returns the number of chunks it played.
    fn stop_and_check_output(&self, mut peer: Proc) -> usize {
        assert!(
            peer.stop(Duration::from_secs(10)),
            "{} did not leave cleanly",
            peer.name
        );
        check_output(&self.output(&peer.name), &peer.name)
    }

    /// [`Run::stop_and_check_output`], and the peer played more than `at_least` chunks.
    fn stop_and_check(&self, peer: Proc, at_least: usize) -> usize {
        let name = peer.name.clone();
        let played = self.stop_and_check_output(peer);
        assert!(played > at_least, "{name} played only {played} chunks");
        played
    }

    /// Stops a peer that must leave cleanly, without looking at its output.
    fn leave(&self, mut peer: Proc) {
        assert!(
            peer.stop(Duration::from_secs(10)),
            "{} did not leave cleanly",
            peer.name
        );
    }

    /// Stops the splitter, which must exit cleanly.
    fn stop_splitter(&mut self) {
        assert!(
            self.splitter.proc.stop(Duration::from_secs(10)),
            "the splitter did not stop cleanly"
        );
    }
}

/// Checks that `path` holds the stream header then contiguous chunks of the test pattern; returns
/// the number of chunks played.
fn check_output(path: &Path, name: &str) -> usize {
    let data =
        std::fs::read(path).unwrap_or_else(|e| panic!("{name}: no output {}: {e}", path.display()));
    assert!(
        data.len() >= HEADER,
        "{name}: output shorter than the stream header"
    );
    let (header, chunks) = data.split_at(HEADER);
    assert_eq!(
        pattern::first_mismatch(0, header),
        None,
        "{name}: the stream header is not the pattern start"
    );
    assert!(chunks.len() >= 16, "{name}: played nothing");
    let offset = pattern::locate(&chunks[..chunks.len().min(4096)])
        .unwrap_or_else(|| panic!("{name}: the first played chunk is not the pattern"));
    assert_eq!(
        offset as usize % CHUNK,
        0,
        "{name}: playout does not start at a chunk boundary"
    );
    if let Some(at) = pattern::first_mismatch(offset, chunks) {
        panic!(
            "{name}: played stream breaks at byte {at} (chunk {} after the first): a chunk was lost or misplaced",
            at / CHUNK
        );
    }
    chunks.len() / CHUNK
}

/// `n` peers (monitors where `monitor(i)`) stream for `time`: each must have played more than
/// `at_least` chunks without a gap, and the splitter must stop cleanly.
fn team_streams(mut run: Run, n: usize, monitor: fn(usize) -> bool, time: u64, at_least: usize) {
    let peers: Vec<Proc> = (0..n).map(|i| run.peer(monitor(i))).collect();
    std::thread::sleep(Duration::from_secs(time));
    for p in peers {
        run.stop_and_check(p, at_least);
    }
    run.stop_splitter();
}

#[test]
fn one_team_of_a_monitor_and_15_peers_loses_nothing() {
    // 2 Mbit/s is 244 chunks/s; a peer joins within about a second and buffers 128 chunks.
    team_streams(Run::start("team16", &[]), 16, |i| i == 0, 20, 3000);
}

#[test]
fn several_teams_of_4_lose_nothing() {
    // This one also covers the sendmmsg send path (the others take io_uring).
    let run = Run::start("teams4", &["--team-size", "4", "--io", "sendmmsg"]);
    team_streams(run, 16, |i| i % 4 == 0, 20, 3000);
}

#[test]
fn streaming_across_the_chunk_number_wrap() {
    // 244 chunks/s: 65535 is passed after about 4 s; fewer chunks would mean a stall at the wrap.
    let run = Run::start("wrap", &["--first-chunk-number", "64600"]);
    team_streams(run, 6, |i| i == 0, 12, 2000);
}

#[test]
fn churn_goodbyes_kills_and_joins_cost_the_stayers_nothing() {
    // LRS on (a killed peer's chunks can only be recovered by resending them), with a one-second
    // half buffer so that resends have slack on a busy 2-core CI machine.
    let mut run = Run::start("churn", &["--lrs", "--buffer-size", "512"]);
    let mut stayers = vec![run.peer(true)];
    let mut leavers = Vec::new();
    for i in 0..10 {
        if i < 5 {
            leavers.push(run.peer(false));
        } else {
            stayers.push(run.peer(false));
        }
    }
    std::thread::sleep(Duration::from_secs(6));
    // Three leave politely, two are killed.
    let killed: Vec<Proc> = leavers.drain(3..).collect();
    for mut p in killed {
        p.kill();
    }
    for p in leavers {
        run.leave(p);
    }
    // Five join mid-stream.
    for _ in 0..5 {
        stayers.push(run.peer(false));
    }
    std::thread::sleep(Duration::from_secs(10));
    for p in stayers {
        run.stop_and_check(p, 1500);
    }
}

/// Each argument list must make `p2psp` exit with code 2 after one line on stderr.
fn refused_with_one_line(cases: &[&[&str]]) {
    for args in cases {
        one_line_exit_2(args);
    }
}

#[test]
fn bad_flags_give_one_line_and_exit_code_2() {
    refused_with_one_line(&[
        &["splitter", "--chunk-size", "63"][..],
        &["splitter", "--buffer-size", "100"],
        &["splitter", "--team-size", "0"],
        &["splitter", "--source", "http://127.0.0.1:1/none"],
        &["splitter", "--source", "https://example.org/x"],
    ]);
}

/// Scheduling class and real-time priority of each thread of process `pid`, by thread name
/// (`/proc/PID/task/TID/stat`: policy is field 41, rt_priority field 40).
fn thread_classes(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The name is in parentheses and may hold spaces; the fields after it are plain.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let name = stat[stat.find('(').unwrap() + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        // rest[0] is field 3 (state): field n is rest[n - 3].
        let (prio, policy) = (rest[40 - 3].parse().unwrap(), rest[41 - 3].parse().unwrap());
        out.push((name, policy, prio));
    }
    out
}

#[test]
fn rt_priority_puts_exactly_the_wire_threads_in_sched_fifo() {
    if p2psp::driver::check_realtime(3).is_err() {
        // Not root and no CAP_SYS_NICE: the splitter must say so in one line and exit 2.
        let line = one_line_exit_2(&["splitter", "--source", "test", "--rt-priority", "3"]);
        assert!(line.contains("--rt-priority 3"), "{line}");
        return;
    }
    refused_with_one_line(&[
        &["splitter", "--rt-priority", "0"][..],
        &["splitter", "--rt-priority", "100"],
    ]);
    let mut run = Run::start("rt-priority", &["--rt-priority", "3"]);
    let peer = run.peer(false);
    let classes = thread_classes(run.splitter.proc.pid());
    let fifo: Vec<&str> = classes
        .iter()
        .filter(|(_, policy, prio)| {
            assert!(*policy == 0 || (*policy == 1 && *prio == 3), "{classes:?}");
            *policy == 1
        })
        .map(|(name, _, _)| name.as_str())
        .collect();
    // The test source has no signer; the two shards and the feed put chunks on the wire.
    let mut want = vec!["feed", "shard-0", "shard-1"];
    let mut got = fifo.clone();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "SCHED_FIFO threads: {classes:?}");
    // And the stream flows as without it (2 Mbit/s: 244 chunks a second).
    std::thread::sleep(Duration::from_secs(3));
    run.stop_and_check(peer, 200);
    run.stop_splitter();
}

/// Reads an HTTP response head and `want` bytes of body from a player connection.
fn play(port: u16, want: usize) -> (String, Vec<u8>) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot connect to the player port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::Write;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n")
            && data.len() >= end + 4 + want
        {
            let head = String::from_utf8_lossy(&data[..end + 4]).into_owned();
            return (head, data[end + 4..end + 4 + want].to_vec());
        }
        assert!(
            Instant::now() < deadline,
            "the player got only {} bytes",
            data.len()
        );
        let n = s.read(&mut buf).expect("read from the player port");
        assert!(n > 0, "the peer closed the player connection");
        data.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn a_player_gets_http_then_the_header_then_chunks_and_may_come_back() {
    let mut run = Run::start("player", &[]);
    let (peer, port) = run.player_peer(true, &[]);
    for round in 0..2 {
        let (head, body) = play(port, HEADER + 64 * CHUNK);
        assert!(head.starts_with("HTTP/1.0 200"), "round {round}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/octet-stream")
        );
        assert_eq!(
            pattern::first_mismatch(0, &body[..HEADER]),
            None,
            "round {round}: header"
        );
        let chunks = &body[HEADER..];
        let offset = pattern::locate(chunks).expect("chunks follow the header");
        assert_eq!(offset as usize % CHUNK, 0);
    }
    run.leave(peer);
}

#[test]
fn with_lrs_and_2_percent_loss_at_every_peer_nobody_loses_a_chunk() {
    let mut run = Run::start("loss2", &["--lrs"]);
    let mut peers = Vec::new();
    for i in 0..10 {
        let seed = (i + 1).to_string();
        let args = [
            "--player-port",
            "0",
            "--lrs",
            "--drop-rate",
            "0.02",
            "--seed",
            &seed,
        ];
        peers.push(run.peer_with(i == 0, &args));
    }
    std::thread::sleep(Duration::from_secs(20));
    let mut total = 0;
    for p in peers {
        // Any lost chunk would break the pattern in the output.
        total += run.stop_and_check(p, 3000);
    }
    let log = run.splitter.log_text();
    assert!(
        !log.contains(" expelled from team"),
        "nobody is expelled for injected loss:\n{log}"
    );
    run.stop_splitter();
    assert!(total > 30_000);
}

#[test]
fn a_free_rider_is_dropped_by_its_teammates_and_expelled_by_the_splitter() {
    let mut run = Run::start("freerider", &["--lrs"]);
    let mut honest = vec![run.peer_with(true, &["--player-port", "0", "--lrs"])];
    for _ in 0..3 {
        honest.push(run.peer_with(false, &["--player-port", "0", "--lrs"]));
    }
    let mut rider = run.peer_with(false, &["--player-port", "0", "--free-ride"]);
    let rider_ep = wait_joined(&run.dir, &mut rider);
    for _ in 0..2 {
        honest.push(run.peer_with(false, &["--player-port", "0", "--lrs"]));
    }
    std::thread::sleep(Duration::from_secs(12));
    let log = run.splitter.log_text();
    assert!(
        log.contains(&format!("{rider_ep} expelled")),
        "the splitter expelled {rider_ep}:\n{log}"
    );
    drop(rider); // killed
    for (i, p) in honest.into_iter().enumerate() {
        let name = p.name.clone();
        // With LRS the team loses nothing to the free rider.
        run.stop_and_check(p, 1500);
        let text = std::fs::read_to_string(peer_log(&run.dir, &name)).unwrap();
        // The four that were there when it joined drop it for debt. The two after it may never
        // meet it: the splitter expels it at its second reported loss (it then joins again
        // from another port, and is dropped and expelled again).
        assert!(
            i >= 4 || text.contains(&format!("dropped neighbour {rider_ep}: it does not relay")),
            "{name} dropped the free rider {rider_ep} for debt:\n{text}"
        );
    }
}

/// Over `total`, 30 % of `peers` are replaced one at a time, every other one without a goodbye
/// (killed). The splitter and the peers run LRS; every peer there at the end, the newcomers
/// included, must have played its stream without a gap.
fn churn_with_lrs(name: &str, peers: usize, total: Duration) {
    let mut run = Run::start(name, &["--lrs"]);
    let args = ["--player-port", "0", "--lrs"];
    let mut present = vec![run.peer_with(true, &args)];
    for _ in 1..peers {
        present.push(run.peer_with(false, &args));
    }
    let replace = (peers * 3).div_ceil(10);
    let step = total / (replace as u32 + 1);
    for i in 0..replace {
        std::thread::sleep(step);
        // Never the monitor (index 0); the oldest plain peers first.
        let leaver = present.remove(1);
        if i % 2 == 0 {
            run.leave(leaver);
        } else {
            drop(leaver); // killed: no goodbye
        }
        present.push(run.peer_with(false, &args));
    }
    std::thread::sleep(step);
    for p in present {
        run.stop_and_check_output(p);
    }
    let log = run.splitter.log_text();
    let expelled = log.matches(" expelled from team").count();
    assert_eq!(
        expelled,
        replace / 2,
        "each killed peer was expelled:\n{log}"
    );
}

#[test]
fn churn_of_30_percent_with_lrs_costs_nobody_a_chunk() {
    churn_with_lrs("churn30", 10, Duration::from_secs(20));
}

/// The full-length version: `cargo test --release --test e2e -- --ignored churn_60`.
#[test]
#[ignore = "60 s; run with --ignored"]
fn churn_60_seconds_of_30_percent_with_lrs_costs_nobody_a_chunk() {
    churn_with_lrs("churn60", 20, Duration::from_secs(60));
}

#[test]
fn fault_and_limit_flags_are_checked() {
    refused_with_one_line(&[
        &["peer", "--drop-rate", "1.5"][..],
        &["peer", "--drop-rate=-0.1"],
        &["splitter", "--join-timeout", "0"],
        &["splitter", "--max-pending-joins", "0"],
        &["splitter", "--max-pending-per-ip", "0"],
    ]);
}
