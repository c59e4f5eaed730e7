//! The forwarding fallback through the NAT lab (`docs/nat.md`, `src/proto/nts_forward.rs`): a
//! team with two peers behind random-port symmetric NATs (which no NAT traversal method
//! connects, to each other or to the sequential symmetric peer) plays byte-exact: every peer's
//! `--output` is the test pattern without a gap, the random ones' missing teammates' chunks
//! forwarded by the splitter. Needs root, `ip` and `nft`: skipped loudly without them, a failure
//! when `CI` is set.

mod natlab;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use natlab::{Home, Host, Lab, NatKind, lab_possible};
use p2psp::pattern;

const CHUNK: usize = 1024;
const HEADER: usize = 4096;

/// A peer's `/status`, from inside its namespace.
fn status_in(host: &Host) -> serde_json::Value {
    natlab::status_in(host, natlab::METRICS_PORT)
}

/// Whether `host`'s peer keeps a neighbour at `ip` (behind the NAT whose public address it is).
fn keeps(host: &Host, ip: std::net::Ipv4Addr) -> bool {
    !natlab::entry_at(&status_in(host)["neighbours"], ip).is_null()
}

/// How long after `start` both the peer in `joiner` and the one in `cone` keep each other
/// (polled every 20 ms, each peer publishes its neighbours on `/status` as they change); `None`
/// if not within `bound`.
fn kept_within(start: Instant, joiner: &Home, cone: &Home, bound: Duration) -> Option<Duration> {
    let (mut j, mut c) = (false, false);
    while start.elapsed() <= bound {
        j = j || keeps(&joiner.host, cone.nat.wan);
        c = c || keeps(&cone.host, joiner.nat.wan);
        if j && c {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The stream header then contiguous chunks of the test pattern; the number of chunks played.
fn check_output(path: &Path, name: &str) -> usize {
    let data =
        std::fs::read(path).unwrap_or_else(|e| panic!("{name}: no output {}: {e}", path.display()));
    assert!(
        data.len() >= HEADER,
        "{name}: output shorter than the header"
    );
    let (header, chunks) = data.split_at(HEADER);
    assert_eq!(
        pattern::first_mismatch(0, header),
        None,
        "{name}: the stream header is not the pattern start"
    );
    assert!(chunks.len() >= 16 * CHUNK, "{name}: played nothing");
    let offset = pattern::locate(&chunks[..chunks.len().min(4096)])
        .unwrap_or_else(|| panic!("{name}: the first played chunk is not the pattern"));
    assert_eq!(
        offset as usize % CHUNK,
        0,
        "{name}: not at a chunk boundary"
    );
    if let Some(at) = pattern::first_mismatch(offset, chunks) {
        panic!(
            "{name}: played stream breaks at byte {at} (chunk {} after the first): a chunk was lost",
            at / CHUNK
        );
    }
    chunks.len() / CHUNK
}

/// Two random-symmetric peers among a full-cone, a port-restricted and a sequential symmetric
/// one: every peer plays byte-exact for 15 s, the random ones through forwarded chunks (from
/// their first played chunk on: the splitter forwards from their `Y`), and every joiner and the
/// full-cone peer keep each other within 2 s of the joiner's start (the joiner says `Y` 1 s
/// after list 2 and does not wait for the teammates it cannot hear).
#[test]
fn random_symmetric_peers_play_byte_exact_through_the_forwarding_fallback() {
    if !lab_possible("random_symmetric_peers_play_byte_exact_through_the_forwarding_fallback") {
        return;
    }
    let _one = support::one_at_a_time();
    let dir = support::test_dir("nat-fallback");
    let mut lab = Lab::new();
    let public = lab.public_host("splitter", 1);
    let monitor_host = lab.public_host("monitor", 1);
    let order = [
        NatKind::FullCone,
        NatKind::SymmetricRandom,
        NatKind::PortRestricted,
        NatKind::SymmetricRandom,
        NatKind::SymmetricSequential,
    ];
    let homes: Vec<Home> = order.iter().map(|&k| lab.home(k, 0)).collect();
    let header = HEADER.to_string();
    let mut procs = Vec::new();
    let mut splitter = natlab::start_splitter(
        &public,
        &dir,
        &[
            "--nts",
            "--source",
            "test",
            "--header-size",
            &header,
            "--bitrate",
            "500k",
            "--buffer-size",
            "128",
            "--metrics",
            &format!("127.0.0.1:{}", natlab::METRICS_PORT),
        ],
    );
    let output = |name: &str| dir.join(format!("{name}.out")).display().to_string();
    let peer_args = |name: &str, monitor: bool| {
        let mut a = natlab::peer_args(&public, &["--nts", "--output", &output(name)]);
        if monitor {
            a.push("--monitor".into());
        }
        a
    };
    let args = peer_args("monitor", true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut monitor = natlab::spawn_in(&monitor_host, &dir, "monitor", &args);
    support::wait_joined(&dir, &mut monitor);
    procs.push(monitor);
    let mut names = Vec::new();
    for (i, home) in homes.iter().enumerate() {
        let name = format!("{i}-{}", home.nat.kind.short());
        let args = peer_args(&name, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let mut p = natlab::spawn_in(&home.host, &dir, &name, &args);
        let log = support::peer_log(&dir, &name);
        let line = support::wait_for_line(&mut p, &log, Duration::from_secs(25), |l| {
            l.contains(": NTS ID ")
        })
        .unwrap_or_else(|t| panic!("{name} was not incorporated:\n{t}"));
        eprintln!("{name:<8} {line}");
        if i > 0 {
            // The goal for every pair with a full- or address-restricted cone (issue 11).
            let bound = Duration::from_secs(2);
            match kept_within(started, home, &homes[0], bound) {
                Some(t) => eprintln!("{name:<8} and 0-fcn keep each other {t:.2?} after its start"),
                None => {
                    panic!("{name} and 0-fcn did not keep each other within {bound:?} of its start")
                }
            }
        }
        procs.push(p);
        names.push(name);
    }
    std::thread::sleep(Duration::from_secs(15));
    let statuses: Vec<serde_json::Value> = homes.iter().map(|h| status_in(&h.host)).collect();
    let split = natlab::http_get_in(&public, natlab::METRICS_PORT, "/status")
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    eprintln!(
        "{:<8} {:>7} {:>7} {:>5} {:>9}  how its teammates are reached",
        "peer", "played", "lost", "fwd", "splitter"
    );
    // The splitter knows each peer by its NAT's public address.
    let at_splitter = |h: &Home| natlab::entry_at(&split["nts"]["peers"], h.nat.wan);
    for ((name, s), h) in names.iter().zip(&statuses).zip(&homes) {
        let t = &s["totals"];
        let served = at_splitter(h)["served"].as_str().unwrap_or("?").to_owned();
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let how: Vec<String> = s["nts"]["reached"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(_, c)| n(c) > 0)
                    .map(|(w, c)| format!("{w} {}", n(c)))
                    .collect()
            })
            .unwrap_or_default();
        eprintln!(
            "{name:<8} {:>7} {:>7} {:>5} {served:>9}  {}",
            n(&t["played"]),
            n(&t["lost"]),
            n(&t["forwarded"]),
            how.join(", ")
        );
    }
    eprintln!(
        "splitter: {} forward pairs set up, {} refused, {} forwarded chunks sent",
        split["nts"]["forward_requests"],
        split["nts"]["forward_refused"],
        split["totals"]["forwarded"]
    );
    // The splitter's probing planner, on its /status: the prcn joiner and the two symrp peers
    // are birthday pairs; symrp–symrp and symrp–symsp (three pairs) are left to the fallback.
    let probing = &split["nts"]["probing"];
    eprintln!("splitter probing: {probing}");
    assert!(
        probing["birthday"].as_u64().unwrap_or(0) >= 1,
        "no birthday session on the splitter's /status: {probing}"
    );
    assert!(
        probing["left"].as_u64().unwrap_or(0) >= 3,
        "the three pairs no method connects are not counted as left: {probing}"
    );
    // Stop the peers (they write their output as they play), then the splitter.
    let mut played = Vec::new();
    let mut peers: Vec<support::Proc> = procs.drain(1..).collect();
    for (name, mut p) in names.iter().zip(peers.drain(..)) {
        assert!(p.stop(Duration::from_secs(10)), "{name} did not leave");
        played.push(check_output(Path::new(&output(name)), name));
    }
    drop(procs);
    splitter.kill();
    for ((name, s), n) in names.iter().zip(&statuses).zip(&played) {
        assert!(*n > 500, "{name} played only {n} chunks");
        assert_eq!(s["totals"]["lost"], 0, "{name} lost chunks");
    }
    for (i, k) in order.iter().enumerate() {
        if *k == NatKind::SymmetricRandom {
            let s = &statuses[i];
            assert!(
                s["totals"]["forwarded"].as_u64().unwrap_or(0) > 50,
                "{}: no forwarded chunks: {s}",
                names[i]
            );
            assert!(
                s["nts"]["reached"]["forwarded"].as_u64().unwrap_or(0) >= 1,
                "{}: no teammate shown as forwarded: {}",
                names[i],
                s["nts"]
            );
            let served = at_splitter(&homes[i]);
            assert_eq!(served["served"], "forwarded", "{}: {split}", names[i]);
            assert!(served["forwarded_chunks"].as_u64().unwrap_or(0) > 50);
        }
    }
}
