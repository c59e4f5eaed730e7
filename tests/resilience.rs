//! Peers that never give up: the splitter is killed (`kill -9`) and a new one starts on the same
//! port, as systemd restarts a service; every peer joins again with backoff and jitter, and a
//! player stays connected across the gap. Real processes on loopback.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{
    Proc, Splitter, count_in, one_at_a_time, peer_log, start_peer, start_peer_with_player,
    test_dir, wait_until,
};

/// A player on a peer's player port that reads until stopped; counts bytes and EOFs.
struct Player {
    bytes: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Player {
    fn connect(port: u16) -> Player {
        let bytes = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot connect to the player port {port}: {e}"),
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        write!(s, "GET / HTTP/1.0\r\n\r\n").unwrap();
        let (b, c, st) = (bytes.clone(), closed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => {
                        c.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => {
                        b.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => {
                        c.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        Player {
            bytes,
            closed,
            stop,
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Count of `needle` in a peer's log.
fn count_in_log(dir: &std::path::Path, name: &str, needle: &str) -> usize {
    count_in(&peer_log(dir, name), needle)
}

fn restart_with(peers: usize) {
    let _one = one_at_a_time();
    let dir = test_dir(&format!("restart-{peers}"));
    let args = ["--bitrate", "256k", "--team-size", "16"];
    let first = Splitter::start(&dir, &args, Stdio::null());
    let port = first.port;
    let mut first = Some(first);
    let mut player_port = 0;
    let mut procs: Vec<(String, Proc)> = Vec::new();
    for i in 0..peers {
        let name = format!("peer{i}");
        let proc = match i {
            0 => start_peer(&dir, &name, port, &["--player-port", "0", "--monitor"]),
            1 => {
                let (p, pp) = start_peer_with_player(&dir, &name, port, &[], &[]);
                player_port = pp;
                p
            }
            _ => start_peer(&dir, &name, port, &["--player-port", "0"]),
        };
        procs.push((name, proc));
    }
    let all_in = |s: &Splitter| s.peers() == Some(peers);
    assert!(
        wait_until(Duration::from_secs(30), || all_in(first.as_ref().unwrap())),
        "not every peer joined: {:?}",
        first.as_ref().unwrap().last_status()
    );
    let player = Player::connect(player_port);
    assert!(
        wait_until(Duration::from_secs(15), || player.bytes() > 20_000),
        "the player got {} bytes before the restart",
        player.bytes()
    );

    // kill -9, and a new splitter on the same port a second later.
    first.take().unwrap().proc.signal("KILL");
    std::thread::sleep(Duration::from_secs(1));
    let second = Splitter::start_on(&dir, port, &args, Stdio::null(), &[]);
    let listening = Instant::now();
    let before = player.bytes();
    assert!(
        wait_until(Duration::from_secs(10), || all_in(&second)),
        "after the restart: {:?}",
        second.last_status()
    );
    let back = listening.elapsed();
    eprintln!(
        "restart: {peers} peers back in a team {:.2} s after the new splitter listened",
        back.as_secs_f64()
    );
    assert!(
        back < Duration::from_secs(5),
        "{peers} peers took {back:?} to join the new splitter"
    );
    // The player never reconnected and plays again.
    assert!(
        wait_until(Duration::from_secs(10), || player.bytes() > before + 20_000),
        "the player got {} bytes after the restart",
        player.bytes() - before
    );
    assert!(
        !player.closed.load(Ordering::SeqCst),
        "the player lost its connection"
    );
    for (name, p) in &mut procs {
        assert!(p.running(), "{name} exited");
        assert!(
            count_in_log(&dir, name, ": joined ") >= 2,
            "{name} did not join again:\n{}",
            std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
        );
        assert_eq!(
            count_in_log(&dir, name, "joining again"),
            1,
            "{name} stalled more than once"
        );
    }
    // Every peer says why, in one line.
    assert!(count_in_log(&dir, "peer1", "no data from the splitter or the team") == 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn after_kill_9_and_a_restart_on_the_same_port_every_peer_is_back_within_5_s() {
    restart_with(20);
}

/// The figure: 50 peers (`cargo test --release --test resilience -- --ignored`).
#[test]
#[ignore]
fn fifty_peers_are_back_within_5_s_of_a_splitter_restart() {
    restart_with(50);
}

#[test]
fn a_peer_gives_up_when_asked_to() {
    let _one = one_at_a_time();
    let dir = test_dir("give-up");
    let splitter = Splitter::start(&dir, &["--bitrate", "256k"], Stdio::null());
    let mut peer = start_peer(
        &dir,
        "peer",
        splitter.port,
        &[
            "--player-port",
            "0",
            "--stall-timeout",
            "1s",
            "--give-up-after",
            "2s",
        ],
    );
    assert!(wait_until(Duration::from_secs(15), || splitter.peers() == Some(1)));
    drop(splitter);
    let status = peer
        .wait_exit(Duration::from_secs(15))
        .expect("the peer gave up");
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(dir.join("peer.log")).unwrap();
    assert!(log.contains("joining again"), "{log}");
    assert!(log.contains("rejoining (attempt 1)"), "{log}");
    assert!(log.contains("gave up: no team for"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
