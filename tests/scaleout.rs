//! The scale-out lab (`lab/scaleout.sh`, `docs/scale-out.md`): an origin Icecast fed by ffmpeg,
//! two Icecast relays pulling it with `<relay>`, three splitters each pulling a relay, and 60
//! peers told all three splitters (`--splitter a,b,c`), each with a player connected.
//!
//! Checked: the peers spread 20/20/20 (± 2); when one splitter is killed (`kill -9`) its peers
//! play again on the others within 5 s and no player connection closes or is made again; a relay
//! restart is survived as a source restart is (every peer plays again, players stay). The
//! figures are printed (spread, failover time per peer p50/max, player reconnects).
//!
//! Needs root, `ip`, `icecast2`, `ffmpeg` and `curl`: skipped loudly without them, a failure
//! when `CI` is set. The lab's namespaces are deleted when the test ends, however it ends (and
//! those of a test killed before are deleted by the next run).

mod natlab;
mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use natlab::{Host, in_netns, lab_possible};
use support::{Proc, test_dir, tools_present, wait_until};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/lab/scaleout.sh");
const SPLITTERS: &str = "198.18.0.21:8001,198.18.0.22:8001,198.18.0.23:8001";
const PEERS: usize = 60;

/// The lab, torn down when dropped (declare it before the processes started in it).
struct Lab {
    dir: PathBuf,
    prefix: String,
}

impl Lab {
    fn up(dir: &Path) -> Lab {
        let out = Command::new(SCRIPT)
            .args(["--dir", &dir.display().to_string()])
            .args(["--owner", &std::process::id().to_string(), "up"])
            .env("P2PSP", env!("CARGO_BIN_EXE_p2psp"))
            .stdin(Stdio::null())
            .output()
            .expect("lab/scaleout.sh runs");
        let prefix = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let lab = Lab {
            dir: dir.to_owned(),
            prefix,
        };
        assert!(
            out.status.success(),
            "lab/scaleout.sh up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn script(&self, args: &[&str]) {
        let out = Command::new(SCRIPT)
            .args(["--dir", &self.dir.display().to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("lab/scaleout.sh runs");
        assert!(
            out.status.success(),
            "lab/scaleout.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn host(&self, name: &str) -> Host {
        Host {
            netns: format!("{}-{name}", self.prefix),
            ips: Vec::new(),
        }
    }

    /// A splitter's metric (`p2psp_splitter_...`), from its `--metrics` in its host.
    fn splitter_metric(&self, n: usize, name: &str) -> Option<f64> {
        let addr: SocketAddr = format!("198.18.0.2{n}:9000").parse().unwrap();
        metric(&http_get_at(&self.host(&format!("split{n}")), addr)?, name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT)
            .args(["--dir", &self.dir.display().to_string(), "down"])
            .stdin(Stdio::null())
            .status();
    }
}

/// `GET /metrics` from `addr` inside `host`'s namespace; the body.
fn http_get_at(host: &Host, addr: SocketAddr) -> Option<String> {
    use std::io::Write;
    let mut s = in_netns(&host.netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut data = String::new();
    s.take(1 << 22).read_to_string(&mut data).ok()?;
    let end = data.find("\r\n\r\n")?;
    data.contains(" 200 ").then(|| data[end + 4..].to_owned())
}

/// The value of the first sample of `name` (with labels or not).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// One peer of the lab, with its player.
struct LabPeer {
    proc: Proc,
    host: Host,
    metrics: u16,
    player: Player,
}

impl LabPeer {
    fn metrics(&self) -> Option<String> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.metrics).parse().unwrap();
        http_get_at(&self.host, addr)
    }

    fn get(&self, name: &str) -> Option<f64> {
        metric(&self.metrics()?, name)
    }

    /// The splitter the peer says it is on.
    fn splitter(&self) -> Option<String> {
        let text = self.metrics()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("p2psp_peer_splitter_info{"))?;
        Some(line.split('"').nth(1)?.to_owned())
    }
}

/// A player: one TCP connection to a peer's player port, read on a thread until it closes.
struct Player {
    bytes: Arc<AtomicU64>,
    /// The longest time without data since the last [`Player::reset_gap`], in milliseconds.
    gap_ms: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    stream: Option<TcpStream>,
}

impl Player {
    fn connect(host: &Host, port: u16) -> Option<Player> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let stream = in_netns(&host.netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .ok()?;
        let bytes = Arc::new(AtomicU64::new(0));
        let gap_ms = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let mut s = stream.try_clone().ok()?;
        let (b, g, c) = (bytes.clone(), gap_ms.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            let mut last: Option<Instant> = None;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let now = Instant::now();
                        if let Some(l) = last {
                            g.fetch_max(
                                now.duration_since(l).as_millis() as u64,
                                Ordering::Relaxed,
                            );
                        }
                        last = Some(now);
                        b.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            c.store(true, Ordering::Relaxed);
        });
        Some(Player {
            bytes,
            gap_ms,
            closed,
            stream: Some(stream),
        })
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn reset_gap(&self) {
        self.gap_ms.store(0, Ordering::Relaxed);
    }

    fn gap_ms(&self) -> u64 {
        self.gap_ms.load(Ordering::Relaxed)
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted[(sorted.len() - 1) * p / 100]
}

/// Starts the 60 peers (20 per peer host, 50 ms apart) and connects a player to each.
fn start_peers(lab: &Lab, dir: &Path) -> Vec<LabPeer> {
    let mut started = Vec::new();
    for i in 0..PEERS {
        let host = lab.host(&format!("peers{}", i % 3 + 1));
        let (player, metrics) = (10000 + i as u16, 11000 + i as u16);
        let log = std::fs::File::create(dir.join(format!("peer{i}.log"))).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.netns])
            .arg(env!("CARGO_BIN_EXE_p2psp"))
            .args(["peer", "--splitter", SPLITTERS, "--quiet"])
            .args(["--player-port", &player.to_string()])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        started.push((
            Proc::spawn(&format!("peer{i}"), &mut cmd),
            host,
            player,
            metrics,
        ));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut peers = Vec::new();
    for (mut proc, host, port, metrics) in started {
        let mut player = None;
        assert!(
            wait_until(Duration::from_secs(20), || {
                player = Player::connect(&host, port);
                player.is_some() || !proc.running()
            }) && proc.running(),
            "{} did not serve players; its log: {}",
            proc.name,
            std::fs::read_to_string(dir.join(format!("{}.log", proc.name))).unwrap_or_default()
        );
        peers.push(LabPeer {
            proc,
            host,
            metrics,
            player: player.unwrap(),
        });
    }
    peers
}

/// Waits until every peer's player got more than it had in `before`; how long that took.
fn all_players_advance(peers: &[LabPeer], before: &[u64], within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    wait_until(within, || {
        peers.iter().zip(before).all(|(p, &b)| p.player.bytes() > b)
    })
    .then(|| t0.elapsed())
}

/// Kills splitter `n` and waits until each of `victims` (its peers) plays again on another; the
/// times from the kill, sorted (ms).
fn kill_and_time(lab: &Lab, peers: &[LabPeer], n: usize, victims: &[usize]) -> Vec<u64> {
    let killed_at = unix_ms();
    lab.script(&["kill-splitter", &n.to_string()]);
    let resumed = |i: usize| {
        let p = &peers[i];
        match p.get("p2psp_peer_last_failover_resumed_unix_milliseconds") {
            Some(t) if t as u64 > killed_at => Some(t as u64 - killed_at),
            _ => None,
        }
    };
    let mut times = Vec::new();
    assert!(
        wait_until(Duration::from_secs(12), || {
            times = victims.iter().filter_map(|&i| resumed(i)).collect();
            times.len() == victims.len()
        }),
        "only {} of the {} peers of killed splitter {n} play again: {times:?}",
        times.len(),
        victims.len()
    );
    times.sort_unstable();
    times
}

/// Every peer's splitter.
fn splitters_of(peers: &[LabPeer]) -> Vec<String> {
    peers
        .iter()
        .map(|p| p.splitter().expect("a peer's splitter"))
        .collect()
}

#[test]
fn sixty_peers_spread_over_three_splitters_and_fail_over_with_their_players() {
    let test = "sixty_peers_spread_over_three_splitters_and_fail_over_with_their_players";
    if !lab_possible(test)
        || !tools_present(
            test,
            &[
                ("icecast2", "-v"),
                ("ffmpeg", "-version"),
                ("curl", "--version"),
            ],
        )
    {
        return;
    }
    let _turn = support::one_at_a_time();
    let dir = test_dir("scaleout");
    let started = Instant::now();
    let lab = Lab::up(&dir);
    let setup = started.elapsed();
    let mut peers = start_peers(&lab, &dir);

    // Spread: what the splitters count, and where the peers say they are.
    let counts = || -> Vec<Option<f64>> {
        (1..=3)
            .map(|n| lab.splitter_metric(n, "p2psp_splitter_peers"))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || counts()
            .iter()
            .map(|c| c.unwrap_or(0.0))
            .sum::<f64>()
            == PEERS as f64),
        "the splitters do not count {PEERS} peers: {:?}",
        counts()
    );
    let spread: Vec<u64> = counts().iter().map(|c| c.unwrap() as u64).collect();
    let on = splitters_of(&peers);
    for (n, &count) in spread.iter().enumerate() {
        let said = on
            .iter()
            .filter(|s| **s == format!("198.18.0.2{}:8001", n + 1))
            .count() as u64;
        assert_eq!(
            said,
            count,
            "splitter {} counts {count}, its peers say {said}",
            n + 1
        );
        assert!(
            (18..=22).contains(&count),
            "spread {spread:?}: not 20/20/20 ± 2"
        );
    }
    let before: Vec<u64> = peers.iter().map(|p| p.player.bytes()).collect();
    assert!(
        all_players_advance(&peers, &before, Duration::from_secs(15)).is_some(),
        "not every player gets the stream: {:?}",
        peers.iter().map(|p| p.player.bytes()).collect::<Vec<_>>()
    );

    // Kill splitter 1: its peers play again on the others within 5 s.
    let victims: Vec<usize> = (0..PEERS)
        .filter(|&i| on[i] == "198.18.0.21:8001")
        .collect();
    for p in &peers {
        p.player.reset_gap();
    }
    let times = kill_and_time(&lab, &peers, 1, &victims);
    let after_kill: Vec<u64> = peers.iter().map(|p| p.player.bytes()).collect();
    assert!(
        all_players_advance(&peers, &after_kill, Duration::from_secs(10)).is_some(),
        "players stopped getting the stream after the failover"
    );
    let moved_spread: Vec<u64> = counts().iter().map(|c| c.unwrap_or(0.0) as u64).collect();
    let mut kill_gaps: Vec<u64> = victims.iter().map(|&i| peers[i].player.gap_ms()).collect();
    kill_gaps.sort_unstable();
    for p in &peers {
        p.player.reset_gap();
    }

    // Restart relay 2 (splitter 2's source): the splitter reconnects; every peer plays again.
    let before_restart: Vec<u64> = peers.iter().map(|p| p.player.bytes()).collect();
    let restart = Instant::now();
    lab.script(&["restart-relay", "2"]);
    let relay_down = restart.elapsed();
    let reconnected = wait_until(Duration::from_secs(20), || {
        lab.splitter_metric(2, "p2psp_splitter_source_reconnects_total")
            .is_some_and(|r| r >= 1.0)
    });
    assert!(reconnected, "splitter 2 did not reconnect to its relay");
    // Every player gets data again after the relay came back (measured from the restart).
    let mark: Vec<u64> = peers.iter().map(|p| p.player.bytes()).collect();
    let replay = all_players_advance(&peers, &mark, Duration::from_secs(15));
    assert!(
        replay.is_some(),
        "not every player plays after the relay restart"
    );
    assert!(
        peers
            .iter()
            .zip(&before_restart)
            .all(|(p, &b)| p.player.bytes() > b)
    );
    let mut restart_gaps: Vec<u64> = peers.iter().map(|p| p.player.gap_ms()).collect();
    restart_gaps.sort_unstable();

    // No player connection closed, and no peer saw a second one.
    let mut reconnects = 0;
    for p in &mut peers {
        assert!(p.proc.running(), "{} stopped", p.proc.name);
        assert!(
            !p.player.closed.load(Ordering::Relaxed),
            "{}: its player was disconnected",
            p.proc.name
        );
        let connects = p.get("p2psp_peer_player_connects_total").unwrap_or(-1.0);
        assert_eq!(connects, 1.0, "{}: player connections", p.proc.name);
        reconnects += connects as u64 - 1;
    }
    let failovers: f64 = peers
        .iter()
        .filter_map(|p| p.get("p2psp_peer_failovers_total"))
        .sum();
    let after_restart: Vec<u64> = counts().iter().map(|c| c.unwrap_or(0.0) as u64).collect();
    eprintln!(
        "scaleout: lab up in {:.1} s; spread {spread:?}; splitter 1 killed: its {} peers play again \
         after p50 {} ms, max {} ms, their players' longest silence p50 {} ms, max {} ms (peers \
         then {moved_spread:?}); relay 2 restarted in {:.1} s, every player had data again {:.1} s \
         after it was back, players' longest silence p50 {} ms, max {} ms (peers then \
         {after_restart:?}); {failovers} failovers in all; player reconnects {reconnects}",
        setup.as_secs_f64(),
        victims.len(),
        percentile(&times, 50),
        times[times.len() - 1],
        percentile(&kill_gaps, 50),
        kill_gaps[kill_gaps.len() - 1],
        relay_down.as_secs_f64(),
        replay.unwrap().as_secs_f64(),
        percentile(&restart_gaps, 50),
        restart_gaps[restart_gaps.len() - 1],
    );
    assert!(
        times[times.len() - 1] <= 5000,
        "failover took more than 5 s: {times:?}"
    );
    // A player that connects after a failover gets the header from the peer's new splitter (the
    // old one is dead): it plays, and the peer did not have to fall back.
    let moved = &peers[victims[0]];
    let late = Player::connect(&moved.host, 10000 + victims[0] as u16).expect("a new player");
    assert!(
        wait_until(Duration::from_secs(5), || late.bytes() > 0),
        "a player connecting after the failover gets nothing"
    );
    let log = std::fs::read_to_string(dir.join(format!("{}.log", moved.proc.name))).unwrap();
    assert!(
        !log.contains("cannot fetch the stream header again"),
        "the header came from the old splitter:\n{log}"
    );
    drop(late);
    drop(peers);
    drop(lab);
}

/// A splitter look-alike that says it is empty when probed and refuses every join (it closes the
/// connection before the configuration, as a full splitter does): what a peer meets when a
/// splitter fills up between its probe and its join. Counts probes and joins.
struct Refuser {
    port: u16,
    probes: Arc<AtomicU64>,
    joins: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Refuser {
    fn start() -> Refuser {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (probes, joins, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (p, j, s) = (probes.clone(), joins.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut first = [0u8; 64];
                let n = conn.read(&mut first).unwrap_or(0);
                if first[..n].starts_with(b"GET /.p2psp/load ") {
                    p.fetch_add(1, Ordering::Relaxed);
                    use std::io::Write;
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\nX-P2PSP-Load: 0 0\r\nContent-Length: 0\r\n\r\n",
                    );
                } else if first[..n].starts_with(b"P") {
                    j.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Refuser {
            port,
            probes,
            joins,
            stop,
        }
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_peer_passes_over_splitters_that_are_down_silent_or_refuse() {
    let _turn = support::one_at_a_time();
    let dir = test_dir("scaleout-choice");
    // The splitter that works, with one peer already: the refuser (load 0) looks better.
    let good = support::Splitter::start(
        &dir,
        &["--bitrate", "256k", "--metrics", "127.0.0.1:0"],
        Stdio::null(),
    );
    let mut first = support::start_peer(&dir, "first", good.port, &["--player-port", "0"]);
    support::wait_joined(&dir, &mut first);
    let refuser = Refuser::start();
    // Accepts connections (the kernel does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let list = format!(
        "{dead},{},127.0.0.1:{},127.0.0.1:{}",
        silent.local_addr().unwrap(),
        refuser.port,
        good.port
    );
    let log = support::peer_log(&dir, "chooser");
    let mut peer = Proc::spawn(
        "chooser",
        Command::new(support::BIN)
            .env("RUST_LOG", "p2psp=info")
            .args(["peer", "--splitter", &list, "--player-port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let joined = support::wait_joined(&dir, &mut peer);
    let text = std::fs::read_to_string(&log).unwrap();
    let on_good = format!("joined 127.0.0.1:{} ", good.port);
    assert!(
        text.contains(&on_good),
        "{joined}: not on the good splitter:\n{text}"
    );
    assert!(refuser.probes.load(Ordering::Relaxed) >= 1, "never probed");
    assert_eq!(
        refuser.joins.load(Ordering::Relaxed),
        1,
        "the least loaded is tried first, once"
    );
    // The status line says where it is; the good splitter counted the probe.
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&format!(
                "| splitter 127.0.0.1:{}, 0 failovers",
                good.port
            ))),
        "no status line naming the splitter"
    );
    let (_, body) = support::http_get(good.metrics.unwrap(), "/metrics", 1 << 20).unwrap();
    let probes = metric(
        &String::from_utf8_lossy(&body),
        "p2psp_splitter_load_probes_total",
    );
    assert!(probes >= Some(1.0), "load probes counted: {probes:?}");
    drop(silent);
}

#[test]
fn splitter_lists_that_cannot_work_are_one_line_errors() {
    let dead: Vec<String> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .to_string()
        })
        .collect();
    let line =
        support::one_line_exit_2(&["peer", "--player-port", "0", "--splitter", &dead.join(",")]);
    assert!(
        line.contains("none of the 2 splitters took the peer"),
        "{line}"
    );
    let line = support::one_line_exit_2(&["peer", "--splitter", "127.0.0.1:8001,,127.0.0.1:8002"]);
    assert!(line.contains("an empty entry"), "{line}");
}

/// The longer variant (`cargo test --release --test scaleout -- --ignored`, about 45 s): every
/// splitter in turn is killed and started again, then each relay is restarted; after each kill
/// the killed splitter's peers play again within 5 s, and no player ever reconnects.
#[test]
#[ignore = "about 45 s: run with --ignored"]
fn every_splitter_killed_in_turn_and_every_relay_restarted() {
    let test = "every_splitter_killed_in_turn_and_every_relay_restarted";
    if !lab_possible(test)
        || !tools_present(
            test,
            &[
                ("icecast2", "-v"),
                ("ffmpeg", "-version"),
                ("curl", "--version"),
            ],
        )
    {
        return;
    }
    let _turn = support::one_at_a_time();
    let dir = test_dir("scaleout-long");
    let lab = Lab::up(&dir);
    let peers = start_peers(&lab, &dir);
    let mut all = Vec::new();
    for n in 1..=3 {
        // Wait until every peer is settled on a splitter that is up.
        std::thread::sleep(Duration::from_secs(3));
        let on = splitters_of(&peers);
        let victims: Vec<usize> = (0..PEERS)
            .filter(|&i| on[i] == format!("198.18.0.2{n}:8001"))
            .collect();
        let times = kill_and_time(&lab, &peers, n, &victims);
        eprintln!(
            "scaleout: splitter {n} killed: {} peers play again after p50 {} ms, max {} ms",
            victims.len(),
            if times.is_empty() {
                0
            } else {
                percentile(&times, 50)
            },
            times.last().copied().unwrap_or(0)
        );
        all.extend(times);
        lab.script(&["start-splitter", &n.to_string()]);
    }
    for n in 1..=2 {
        let mark: Vec<u64> = peers.iter().map(|p| p.player.bytes()).collect();
        lab.script(&["restart-relay", &n.to_string()]);
        assert!(
            all_players_advance(&peers, &mark, Duration::from_secs(20)).is_some(),
            "not every player plays after relay {n} restarted"
        );
    }
    all.sort_unstable();
    for p in &peers {
        assert!(!p.player.closed.load(Ordering::Relaxed), "{}", p.proc.name);
        assert_eq!(
            p.get("p2psp_peer_player_connects_total"),
            Some(1.0),
            "{}",
            p.proc.name
        );
    }
    eprintln!(
        "scaleout: {} failovers after kills: p50 {} ms, max {} ms; player reconnects 0",
        all.len(),
        percentile(&all, 50),
        all[all.len() - 1]
    );
    assert!(all[all.len() - 1] <= 5000, "failover over 5 s: {all:?}");
    drop(peers);
    drop(lab);
}
