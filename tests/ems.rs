//! EMS through the NAT lab (reference-notes §6.5, `src/proto/nts_ems.rs`): two peers behind
//! one port-restricted NAT that does not hair-pin, with `--ems`, reach each other over their LAN
//! (their relays are bridged on the LAN, never sent to the NAT's public address) and play
//! byte-exact. Needs root, `ip` and `nft`: skipped loudly without them, a failure when `CI` is
//! set.

mod natlab;
mod support;

use std::path::Path;
use std::time::Duration;

use natlab::{Host, Lab, NatKind, lab_possible};
use p2psp::pattern;

const CHUNK: usize = 1024;
const HEADER: usize = 4096;

/// A peer's `/status`, from inside its namespace.
fn status_in(host: &Host) -> serde_json::Value {
    natlab::status_in(host, natlab::METRICS_PORT)
}

/// Packets counted by the named nftables counter `family table name` in `netns`.
fn counter(netns: &str, family: &str, table: &str, name: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "nft", "list", "counter", family, table, name,
        ])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in {netns}: {text}"))
}

/// The stream header then contiguous chunks of the test pattern; the number of chunks played.
fn check_output(path: &Path, name: &str) -> usize {
    let data =
        std::fs::read(path).unwrap_or_else(|e| panic!("{name}: no output {}: {e}", path.display()));
    assert!(data.len() >= HEADER + 16 * CHUNK, "{name}: played nothing");
    let (header, chunks) = data.split_at(HEADER);
    assert_eq!(
        pattern::first_mismatch(0, header),
        None,
        "{name}: bad header"
    );
    let offset = pattern::locate(&chunks[..chunks.len().min(4096)])
        .unwrap_or_else(|| panic!("{name}: the first played chunk is not the pattern"));
    assert_eq!(
        offset as usize % CHUNK,
        0,
        "{name}: not at a chunk boundary"
    );
    if let Some(at) = pattern::first_mismatch(offset, chunks) {
        panic!("{name}: played stream breaks at chunk {}", at / CHUNK);
    }
    chunks.len() / CHUNK
}

#[test]
fn two_peers_behind_one_nat_without_hairpinning_reach_each_other_over_their_lan() {
    if !lab_possible("two_peers_behind_one_nat_without_hairpinning_reach_each_other_over_their_lan")
    {
        return;
    }
    two_mates(true);
}

/// The same without `--ems`, for comparison: the NAT-mates try each other's public endpoints,
/// which end at the NAT (no hair-pinning), never connect, and get each other's chunks through
/// the forwarding fallback.
/// `cargo test --release --test ems without_ems -- --ignored --nocapture`
#[test]
#[ignore]
fn without_ems_nat_mates_need_the_forwarding_fallback() {
    if !lab_possible("without_ems_nat_mates_need_the_forwarding_fallback") {
        return;
    }
    two_mates(false);
}

fn two_mates(ems: bool) {
    let _one = support::one_at_a_time();
    let dir = support::test_dir("nat-ems");
    let mut lab = Lab::new();
    let public = lab.public_host("splitter", 1);
    let monitor_host = lab.public_host("monitor", 1);
    let (nat, mates) = lab.shared_home(NatKind::PortRestricted, 0, 2);
    let (a, b) = (mates[0].ip(), mates[1].ip());
    // Relay-sized UDP between the two hosts, bridged on the LAN; UDP from the LAN to the NAT's
    // public address (what hair-pinning would need).
    natlab::nft_in(
        &nat.netns,
        &format!(
            "table bridge emsproof {{
               counter a_to_b {{}}
               counter b_to_a {{}}
               chain lan_forward {{
                 type filter hook forward priority 0; policy accept;
                 ip saddr {a} ip daddr {b} ip length > 500 meta l4proto udp counter name \"a_to_b\"
                 ip saddr {b} ip daddr {a} ip length > 500 meta l4proto udp counter name \"b_to_a\"
               }}
             }}
             table ip emsproof {{
               counter hairpin {{}}
               chain to_self {{
                 type filter hook input priority -10; policy accept;
                 iifname \"lan\" ip daddr {} meta l4proto udp counter name \"hairpin\"
               }}
             }}",
            nat.wan
        ),
    );
    let mut splitter_flags = vec![
        "--nts".to_owned(),
        "--source".into(),
        "test".into(),
        "--header-size".into(),
        HEADER.to_string(),
        "--bitrate".into(),
        "500k".into(),
        "--buffer-size".into(),
        "128".into(),
    ];
    if ems {
        splitter_flags.push("--ems".into());
    }
    let mut splitter = natlab::start_splitter(&public, &dir, &splitter_flags);
    let output = |name: &str| dir.join(format!("{name}.out")).display().to_string();
    let peer_args = |name: &str, monitor: bool| {
        let mut flags = vec!["--nts".to_owned(), "--output".into(), output(name)];
        if monitor {
            flags.push("--monitor".into());
        }
        if ems {
            flags.push("--ems".into());
        }
        natlab::peer_args(&public, &flags)
    };
    let mut monitor = natlab::spawn_in(&monitor_host, &dir, "monitor", &peer_args("monitor", true));
    support::wait_joined(&dir, &mut monitor);
    let mut peers = Vec::new();
    for (k, host) in mates.iter().enumerate() {
        let name = format!("mate{k}");
        let mut p = natlab::spawn_in(host, &dir, &name, &peer_args(&name, false));
        let line = support::wait_for_line(
            &mut p,
            &support::peer_log(&dir, &name),
            Duration::from_secs(25),
            |l| l.contains(": NTS ID "),
        )
        .unwrap_or_else(|t| panic!("{name} was not incorporated:\n{t}"));
        eprintln!("{name}: {line}");
        peers.push((name, p));
    }
    std::thread::sleep(Duration::from_secs(10));
    let statuses: Vec<serde_json::Value> = mates.iter().map(status_in).collect();
    let (ab, ba, hairpin) = (
        counter(&nat.netns, "bridge", "emsproof", "a_to_b"),
        counter(&nat.netns, "bridge", "emsproof", "b_to_a"),
        counter(&nat.netns, "ip", "emsproof", "hairpin"),
    );
    eprintln!(
        "over the LAN: {ab} relay-sized datagrams mate0 → mate1, {ba} mate1 → mate0; to the NAT's public address: {hairpin}"
    );
    for (k, st) in statuses.iter().enumerate() {
        eprintln!(
            "mate{k}: played {} lost {} forwarded {} neighbours {} teammates {}",
            st["totals"]["played"],
            st["totals"]["lost"],
            st["totals"]["forwarded"],
            st["neighbours"],
            st["nts"]["teammates"]
        );
    }
    let mut played = Vec::new();
    for (name, mut p) in peers {
        assert!(p.stop(Duration::from_secs(10)), "{name} did not leave");
        played.push(check_output(Path::new(&output(&name)), &name));
    }
    drop(monitor);
    splitter.kill();
    if !ems {
        for (k, st) in statuses.iter().enumerate() {
            assert_eq!(st["totals"]["lost"], 0, "mate{k} lost chunks");
            assert!(st["totals"]["forwarded"].as_u64().unwrap_or(0) > 50);
        }
        assert!(
            ab == 0 && ba == 0,
            "relays over the LAN without EMS: {ab}, {ba}"
        );
        assert!(hairpin > 0, "no hellos to the NAT's public address");
        return;
    }
    for (k, st) in statuses.iter().enumerate() {
        let mate = natlab::entry_at(&st["nts"]["teammates"], mates[1 - k].ip());
        assert_eq!(mate["how"], "direct", "mate{k} reaches its NAT-mate: {st}");
        assert_eq!(st["totals"]["lost"], 0, "mate{k} lost chunks");
        assert_eq!(st["totals"]["forwarded"], 0, "mate{k} needed the fallback");
        assert!(played[k] > 300, "mate{k} played only {}", played[k]);
    }
    assert!(ab > 50 && ba > 50, "relays over the LAN: {ab}, {ba}");
    assert_eq!(hairpin, 0, "datagrams to the NAT's public address");
}

/// The wire cannot announce EMS: a peer of the other profile stops within seconds with one line
/// that says what to change (on loopback, no lab needed).
#[test]
fn a_peer_of_the_other_ems_profile_stops_within_seconds_saying_so() {
    for splitter_ems in [true, false] {
        let dir = support::test_dir(&format!("ems_wrong_profile_{splitter_ems}"));
        let mut args = vec!["--nts", "--bitrate", "200k"];
        if splitter_ems {
            args.push("--ems");
        }
        let mut splitter = support::Splitter::start(&dir, &args, std::process::Stdio::null());
        let at = format!("127.0.0.1:{}", splitter.port);
        let mut peer = vec!["peer", "--nts", "--splitter", &at, "--player-port", "0"];
        if !splitter_ems {
            peer.push("--ems");
        }
        let t0 = std::time::Instant::now();
        let line = support::one_line_exit_2(&peer);
        let hint = if splitter_ems {
            "run this peer with --ems"
        } else {
            "run the peer without --ems"
        };
        assert!(line.contains(hint), "{line}");
        // An EMS splitter waits for the rest of a 7-byte join until its 5 s join timeout.
        assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
        splitter.proc.stop(Duration::from_secs(5));
    }
}
