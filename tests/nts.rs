//! `--nts` on loopback: a team of a monitor and peers incorporated by NTS, and a peer started
//! with the wrong profile for its splitter stops within seconds with one line, both ways.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{Splitter, one_line_exit_2, peer_log, start_peer, test_dir, wait_for_line};

#[test]
fn a_compat_peer_stops_at_an_nts_splitter_and_an_nts_peer_at_a_compat_one() {
    let dir = test_dir("nts_wrong_profile");
    let mut nts = Splitter::start(&dir, &["--nts", "--bitrate", "200k"], Stdio::null());
    let t0 = Instant::now();
    let line = one_line_exit_2(&[
        "peer",
        "--splitter",
        &format!("127.0.0.1:{}", nts.port),
        "--player-port",
        "0",
    ]);
    assert!(
        line.contains("runs NTS") && line.contains("with --nts"),
        "{line}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    nts.proc.stop(Duration::from_secs(5));

    let dir = test_dir("nts_wrong_profile_2");
    let mut compat = Splitter::start(&dir, &["--bitrate", "200k"], Stdio::null());
    let t0 = Instant::now();
    let line = one_line_exit_2(&[
        "peer",
        "--nts",
        "--splitter",
        &format!("127.0.0.1:{}", compat.port),
        "--player-port",
        "0",
    ]);
    assert!(
        line.contains("does not run NTS") && line.contains("without --nts"),
        "{line}"
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    // It said goodbye: the compat splitter does not keep it.
    assert!(support::wait_until(Duration::from_secs(5), || compat
        .peers()
        .is_none_or(|n| n == 0)));
    compat.proc.stop(Duration::from_secs(5));
}

#[test]
fn an_nts_team_on_loopback_plays() {
    let dir = test_dir("nts_team");
    let mut s = Splitter::start(
        &dir,
        &["--nts", "--bitrate", "300k", "--buffer-size", "32"],
        Stdio::null(),
    );
    let mut peers = vec![start_peer(
        &dir,
        "monitor",
        s.port,
        &["--nts", "--monitor", "--player-port", "0"],
    )];
    for i in 0..3 {
        // Each joins once the one before is a member, so that list 2 names all before it.
        let prev = peers.last_mut().unwrap();
        let log = peer_log(&dir, &prev.name);
        wait_for_line(prev, &log, Duration::from_secs(15), |l| {
            l.contains(": NTS ID ")
        })
        .unwrap_or_else(|t| panic!("{} was not incorporated:\n{t}", prev.name));
        peers.push(start_peer(
            &dir,
            &format!("peer{i}"),
            s.port,
            &["--nts", "--player-port", "0"],
        ));
    }
    for p in &mut peers {
        let log = peer_log(&dir, &p.name);
        wait_for_line(p, &log, Duration::from_secs(15), |l| {
            l.contains(": playing |")
        })
        .unwrap_or_else(|t| panic!("{} does not play:\n{t}", p.name));
    }
    // The last peer heard from both earlier peers.
    let text = std::fs::read_to_string(peer_log(&dir, "peer2")).unwrap();
    assert!(
        text.contains("2 teammates reached (2 direct, 0 predicted, 0 announced), 0 not"),
        "{text}"
    );
    for p in &mut peers {
        p.stop(Duration::from_secs(5));
    }
    s.proc.stop(Duration::from_secs(5));
}
