//! IMS, IP multicast for a LAN team (`docs/scale-out.md`, "IMS on a LAN"): 20 real
//! `p2psp peer --ims` processes on a namespace bridge play the test pattern byte for byte while
//! the splitter sends each chunk once, to the group (its own counters and an nftables counter on
//! its interface agree), and no peer sends a chunk to anyone. On loopback: the join a reference IMS
//! peer gets (it sends no role byte), and peers of the wrong profile stopping with one line.
//!
//! The lab (`tests/natlab`) needs root, `ip` and `nft`: skipped loudly without them, a failure
//! when `CI` is set. Its multicast group is administratively scoped (239.0.0.0/8), TTL 1, and
//! exists only inside the lab's namespaces, which are deleted when the test ends however it ends.

mod natlab;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use natlab::{Host, Lab, http_get_in, lab_possible};
use p2psp::pattern;
use p2psp::proto::ims::ImsConfig;
use support::{BIN, Proc, Splitter, one_at_a_time, one_line_exit_2, test_dir, wait_for_line};

const CHUNK: usize = 1024;
const HEADER: usize = 2048;
const PEERS: usize = 20;
/// Hosts on the bridge the peers are spread over.
const HOSTS: usize = 4;
const GROUP: &str = "239.0.0.1:9100";
/// Bytes of one chunk datagram on the wire, IPv4 and UDP headers included.
const WIRE: u64 = 20 + 8 + 2 + CHUNK as u64;

/// nftables counters in a namespace: UDP datagrams it sends to the group, and UDP datagrams it
/// sends to anything else but `allowed` (the splitter's port, for peers' goodbyes; nothing, for
/// the splitter).
fn count_udp_out(host: &Host, dir: &Path, allowed: &str) {
    let rules = format!(
        "table ip imslab {{
    chain out {{
        type filter hook output priority 0; policy accept;
        ip daddr 239.0.0.1 udp dport 9100 counter comment \"group\"
        ip daddr != 239.0.0.1 meta l4proto udp {allowed} counter comment \"unicast\"
    }}
}}
"
    );
    let file = dir.join(format!("{}.nft", host.netns));
    std::fs::write(&file, rules).unwrap();
    let st = host
        .command("nft")
        .arg("-f")
        .arg(&file)
        .status()
        .expect("nft");
    assert!(st.success(), "nft -f {} in {}", file.display(), host.netns);
}

/// The (packets, bytes) of the counter commented `name` in `host`'s `imslab` table.
fn counter(host: &Host, name: &str) -> (u64, u64) {
    let out = host
        .command("nft")
        .args(["list", "table", "ip", "imslab"])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{name}\"")))
        .unwrap_or_else(|| panic!("no counter {name} in {}:\n{text}", host.netns));
    let num = |key: &str| -> u64 {
        let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
        line[at..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {line}"))
    };
    (num("packets "), num("bytes "))
}

/// The sum of the samples of `family` in Prometheus text.
fn metric(text: &str, family: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("a value in {l}")) as u64
        })
        .sum()
}

/// Checks that `path` holds the stream header then contiguous chunks of the test pattern; the
/// number of chunks played.
fn check_output(path: &Path, name: &str) -> usize {
    let data =
        std::fs::read(path).unwrap_or_else(|e| panic!("{name}: no output {}: {e}", path.display()));
    assert!(
        data.len() >= HEADER,
        "{name}: output shorter than the header"
    );
    let (header, chunks) = data.split_at(HEADER);
    assert_eq!(pattern::first_mismatch(0, header), None, "{name}: header");
    assert!(chunks.len() >= 16, "{name}: played nothing");
    let offset = pattern::locate(&chunks[..chunks.len().min(4096)])
        .unwrap_or_else(|| panic!("{name}: the first played chunk is not the pattern"));
    assert_eq!(
        offset as usize % CHUNK,
        0,
        "{name}: not at a chunk boundary"
    );
    if let Some(at) = pattern::first_mismatch(offset, chunks) {
        panic!(
            "{name}: played stream breaks at byte {at} (chunk {} after the first)",
            at / CHUNK
        );
    }
    assert_eq!(chunks.len() % CHUNK, 0, "{name}: a partial chunk");
    chunks.len() / CHUNK
}

/// 400 chunks of 1 KiB, one every 20 ms (about 400 kbit/s, 8 s).
#[test]
fn twenty_ims_peers_on_a_bridge_play_byte_exact_from_one_datagram_per_chunk() {
    lab_run(400, Duration::from_millis(20), "64", 150);
}

/// 2000 chunks, one every 4 ms (about 2 Mbit/s, 8 s), a buffer of 256 chunks: longer to set up
/// on a loaded machine, so not in the default suite.
#[test]
#[ignore]
fn twenty_ims_peers_at_2_mbits() {
    lab_run(2000, Duration::from_millis(4), "256", 1000);
}

/// The lab: `CHUNKS` chunks written into the splitter's standard input, one every `PACE`, to 20
/// peers with a buffer of `buffer` chunks; each must play at least `at_least` of them.
#[allow(non_snake_case)]
fn lab_run(CHUNKS: u64, PACE: Duration, buffer: &str, at_least: usize) {
    if !lab_possible("ims lab") {
        return;
    }
    let _turn = one_at_a_time();
    let dir = test_dir("ims-lab");
    // Declared before the processes: they are dropped (killed) first, then the namespaces.
    let mut lab = Lab::new();
    let origin = lab.public_host("splitter", 1);
    let hosts: Vec<Host> = (0..HOSTS)
        .map(|i| lab.public_host(&format!("lan{i}"), 1))
        .collect();
    let splitter_at = SocketAddrV4::new(origin.ip(), 8001);
    count_udp_out(&origin, &dir, "");
    for h in &hosts {
        count_udp_out(h, &dir, "ip daddr != 198.18.0.1");
    }

    // Without --bind there is no route to the group in the lab (no default route): one line.
    let out = origin
        .command(BIN)
        .args(["splitter", "--ims", GROUP, "--port", "8001"])
        .stdin(Stdio::null())
        .output()
        .expect("splitter");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("no route to the group"), "{err}");

    let log = std::fs::File::create(dir.join("splitter.log")).unwrap();
    let ip = origin.ip().to_string();
    let header = HEADER.to_string();
    let chunk = CHUNK.to_string();
    let mut splitter = Proc::spawn(
        "splitter",
        origin
            .command(BIN)
            .env("RUST_LOG", "p2psp=info")
            .args(["splitter", "--source", "-", "--bind", &ip, "--port", "8001"])
            .args(["--ims", GROUP, "--header-size", &header])
            .args(["--chunk-size", &chunk, "--buffer-size", buffer])
            .args(["--metrics", "127.0.0.1:9090"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log),
    );
    // The source: the test pattern, one chunk every PACE, then nothing (stdin stays open, so
    // the splitter's counters come to rest).
    let mut stdin = splitter.child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let start = Instant::now();
        let mut buf = vec![0u8; CHUNK];
        for k in 0..CHUNKS {
            pattern::fill(k * CHUNK as u64, &mut buf);
            if stdin.write_all(&buf).is_err() {
                break;
            }
            let _ = stdin.flush();
            let due = start + PACE * (k as u32 + 1);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        stdin
    });

    wait_for_line(
        &mut splitter,
        &dir.join("splitter.log"),
        Duration::from_secs(15),
        |l| l.starts_with("p2psp splitter listening on "),
    )
    .unwrap_or_else(|text| panic!("the splitter did not start; its log:\n{text}"));
    let splitter_arg = splitter_at.to_string();
    let mut peers: Vec<Proc> = (0..PEERS)
        .map(|i| {
            let name = format!("peer{i}");
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
            let out = dir.join(format!("{name}.out"));
            // The first peer shows its mode on /metrics.
            let metrics: &[&str] = if i == 0 {
                &["--metrics", "127.0.0.1:9191"]
            } else {
                &[]
            };
            let p = Proc::spawn(
                &name,
                hosts[i % HOSTS]
                    .command(BIN)
                    .env("RUST_LOG", "p2psp=info")
                    .args(["peer", "--ims", "--splitter", &splitter_arg])
                    .args(["--player-port", "0", "--stall-timeout", "30s", "--output"])
                    .arg(&out)
                    .args(metrics)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log),
            );
            std::thread::sleep(Duration::from_millis(30));
            p
        })
        .collect();
    for p in &mut peers {
        let log = dir.join(format!("{}.log", p.name));
        let line = wait_for_line(p, &log, Duration::from_secs(15), |l| {
            l.contains(": joined ")
        })
        .unwrap_or_else(|text| panic!("{} did not join; its log:\n{text}", p.name));
        assert!(line.contains("as IMS peer"), "{line}");
    }
    let _stdin = feeder.join().expect("feeder");
    // Let the last chunks go out (nothing new comes after): the counters reach CHUNKS and stay.
    let read = || {
        let m = http_get_in(&origin, 9090, "/metrics").expect("the splitter's /metrics");
        String::from_utf8_lossy(&m).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut metrics = read();
    while metric(&metrics, "p2psp_splitter_datagrams_sent_total") < CHUNKS
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        metrics = read();
    }
    std::thread::sleep(Duration::from_millis(500));
    let metrics = read();
    let chunks_in = metric(&metrics, "p2psp_splitter_chunks_in_total");
    let to_group = metric(&metrics, "p2psp_splitter_ims_group_chunks_total");
    let datagrams = metric(&metrics, "p2psp_splitter_datagrams_sent_total");
    let members = metric(&metrics, "p2psp_splitter_peers");
    let (wire_group, wire_bytes) = counter(&origin, "group");
    let (wire_unicast, _) = counter(&origin, "unicast");
    eprintln!(
        "IMS lab: {chunks_in} chunks in, {to_group} to the group, {datagrams} datagrams sent, {members} members; on the wire {wire_group} datagrams ({wire_bytes} bytes) to the group, {wire_unicast} others"
    );
    assert_eq!(chunks_in, CHUNKS, "chunks cut from the source");
    assert_eq!(to_group, CHUNKS, "the splitter counted one send per chunk");
    assert_eq!(datagrams, CHUNKS, "the splitter sent nothing else");
    assert_eq!(members as usize, PEERS, "every peer is a member");
    assert_eq!(wire_group, CHUNKS, "one datagram per chunk on the wire");
    assert_eq!(wire_bytes, CHUNKS * WIRE);
    assert_eq!(wire_unicast, 0, "no unicast datagram from the splitter");
    assert!(
        metrics.contains("p2psp_splitter_ims{group=\"239.0.0.1:9100\",ttl=\"1\"} 1"),
        "the splitter's /metrics shows IMS"
    );
    let peer = http_get_in(&hosts[0], 9191, "/metrics").expect("peer0's /metrics");
    let peer = String::from_utf8_lossy(&peer);
    assert_eq!(
        metric(&peer, "p2psp_peer_ims"),
        1,
        "peer0's /metrics shows IMS"
    );
    assert!(metric(&peer, "p2psp_peer_ims_group_chunks_total") > 0);
    assert_eq!(metric(&peer, "p2psp_peer_ims_dropped_total"), 0);
    assert_eq!(metric(&peer, "p2psp_peer_chunks_relayed_total"), 0);

    // Everyone leaves at once (nothing paces the goodbyes' confirmations now: they may go
    // unanswered, and the peers leave anyway).
    for p in &peers {
        p.signal("TERM");
    }
    let mut played = Vec::new();
    for mut p in peers {
        let status = p.wait_exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not leave cleanly: {status:?}",
            p.name
        );
        played.push(check_output(&dir.join(format!("{}.out", p.name)), &p.name));
    }
    played.sort_unstable();
    eprintln!(
        "IMS lab: chunks played per peer: min {} median {} max {}",
        played[0],
        played[PEERS / 2],
        played[PEERS - 1]
    );
    // Every peer joined within the first seconds of 8 and plays up to half a buffer behind.
    assert!(played[0] >= at_least, "played {played:?}");
    for h in &hosts {
        let (n, _) = counter(h, "unicast");
        assert_eq!(
            n, 0,
            "a peer in {} sent to someone else than the splitter",
            h.netns
        );
        assert_eq!(
            counter(h, "group").0,
            0,
            "a peer in {} sent to the group",
            h.netns
        );
    }
    assert!(splitter.stop(Duration::from_secs(10)), "splitter stop");
}

/// Joins an IMS splitter as the reference IMS peer does: connects and says nothing. It gets
/// exactly the core configuration and the group, then its ready byte completes the join.
#[test]
fn a_silent_connection_gets_the_reference_ims_join() {
    let _turn = one_at_a_time();
    let dir = test_dir("ims-silent");
    let splitter = Splitter::start(
        &dir,
        &[
            "--ims",
            GROUP,
            "--bitrate",
            "200k",
            "--header-size",
            "1024",
            "--metrics",
            "127.0.0.1:0",
        ],
        Stdio::null(),
    );
    let mut s = TcpStream::connect(("127.0.0.1", splitter.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let config = loop {
        if let Some((c, used)) = ImsConfig::decode(&got).unwrap() {
            assert_eq!(used, got.len(), "nothing after the group");
            break c;
        }
        let n = s.read(&mut buf).expect("the configuration within 5 s");
        assert!(n > 0, "closed after {got:?}");
        got.extend_from_slice(&buf[..n]);
    };
    assert_eq!(config.group, GROUP.parse::<SocketAddrV4>().unwrap());
    assert_eq!(
        (
            config.chunk_size,
            config.buffer_size,
            config.channel.as_str()
        ),
        (1024, 256, "test")
    );
    // The source endpoint is the splitter's header endpoint.
    assert_eq!(config.source.port(), splitter.port);
    s.write_all(b"R").unwrap();
    assert!(
        support::wait_until(Duration::from_secs(5), || splitter
            .status()
            .is_some_and(|v| v["totals"]["peers"] == 1)),
        "the silent peer is a member: {:?}",
        splitter.status()
    );
}

/// Each peer of the wrong profile stops within seconds with one line saying what to do.
#[test]
fn peers_of_the_wrong_profile_stop_with_one_line() {
    let _turn = one_at_a_time();
    // Each splitter logs to splitter.log in its own directory.
    let dbs = Splitter::start(
        &test_dir("ims-wrong-profile-dbs"),
        &["--bitrate", "200k"],
        Stdio::null(),
    );
    let ims = Splitter::start(
        &test_dir("ims-wrong-profile-ims"),
        &["--bitrate", "200k", "--ims", GROUP],
        Stdio::null(),
    );
    // Its group's low 16 bits are 0: a DBS decoder reads a whole message with no peers in it.
    let ims0 = Splitter::start(
        &test_dir("ims-wrong-profile-ims0"),
        &["--bitrate", "200k", "--ims", "239.1.0.0:9100"],
        Stdio::null(),
    );
    for (port, flags, says) in [
        (dbs.port, vec!["--ims"], "does not run IMS"),
        (ims.port, vec![], "runs IMS"),
        (ims.port, vec!["--nts"], "runs IMS"),
        (ims0.port, vec![], "runs IMS"),
    ] {
        let splitter = format!("127.0.0.1:{port}");
        let mut args = vec!["peer", "--splitter", &splitter, "--player-port", "0"];
        args.extend(flags);
        let started = Instant::now();
        let line = one_line_exit_2(&args);
        assert!(line.contains(says), "{line}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "took {:?}",
            started.elapsed()
        );
    }
    for args in [
        ["splitter", "--ims", "198.18.0.1:9000"],
        ["splitter", "--ims", "239.0.0.1:0"],
    ] {
        let line = one_line_exit_2(&args);
        assert!(line.contains("--ims"), "{line}");
    }
    let line = one_line_exit_2(&["splitter", "--ims", GROUP, "--lrs"]);
    assert!(line.contains("--lrs"), "{line}");
}
