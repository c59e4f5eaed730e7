//! The small load test of the suite: the real `loadgen` binary starts its source and a real
//! `p2psp splitter` child, joins 200 peers, streams 3 s; the JSON report must show every peer
//! joined, zero loss and sane figures. Timing targets live in `perf/fanout-ratio.sh`, not here:
//! the figures checked are counts and orders of magnitude that hold on a busy 2-core machine.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{json_report, p2psp_next_to, wait_for};

#[test]
fn two_hundred_peers_for_three_seconds_lose_nothing() {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    let p2psp = p2psp_next_to(loadgen);
    let json = std::env::temp_dir().join(format!("loadgen-smoke-{}.json", std::process::id()));
    let hgrm = json.with_extension("hgrm");
    let child = Command::new(loadgen)
        .args(["--peers", "200", "--duration", "3", "--no-progress"])
        .args(["--join-rate", "500"])
        // Unpinned: on a shared machine the scheduler then keeps the peers off a busy core.
        .arg("--no-pin")
        .arg("--splitter-bin")
        .arg(&p2psp)
        .arg("--json")
        .arg(&json)
        .arg("--hgrm")
        .arg(&hgrm)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    // Bounded: 3 s of streaming plus joins, leaving and start-up take ~6 s; allow for a busy
    // machine, then kill.
    let out = wait_for(child, Duration::from_secs(90));
    out.assert_success("");
    let stdout = &out.stdout;
    assert!(stdout.contains("Latency Distribution"), "{stdout}");
    let report = json_report(&json);
    let num = |p: &str| {
        report
            .pointer(p)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{p} missing in {report}"))
    };
    let ctx = format!("\n{stdout}");
    assert_eq!(num("/joins/ok"), 200.0, "{ctx}");
    assert_eq!(num("/joins/failed"), 0.0, "{ctx}");
    assert!(num("/measured_seconds") >= 3.0, "{ctx}");
    // Zero loss, nothing unstamped or out of window.
    assert_eq!(num("/chunks/lost"), 0.0, "{ctx}");
    assert_eq!(num("/loss_ratio"), 0.0, "{ctx}");
    assert_eq!(num("/chunks/unstamped"), 0.0, "{ctx}");
    assert_eq!(num("/chunks/out_of_window"), 0.0, "{ctx}");
    // 1 Mbit/s of 1 KiB chunks is 122 chunks/s; every peer plays nearly all of them.
    let per_s = num("/config/chunks_per_second");
    assert!((per_s - 122.07).abs() < 0.1);
    let played = num("/chunks/played");
    let ideal = 200.0 * per_s * num("/measured_seconds");
    assert!(
        played > 0.8 * ideal && played < 1.05 * ideal,
        "played {played} of {ideal}{ctx}"
    );
    // Peers relay (teams of 16): they send about as much as they receive.
    let rx = num("/fanout/rx_datagrams_per_s");
    assert!(rx > 0.8 * 200.0 * per_s, "{ctx}");
    assert!(num("/fanout/peer_tx_datagrams_per_s") > 0.5 * rx, "{ctx}");
    // The splitter sends one datagram per team per chunk: 13 teams.
    let tx = num("/fanout/tx_datagrams_per_s");
    assert!(
        tx > 0.5 * 13.0 * per_s && tx < 1.5 * 13.0 * per_s,
        "tx {tx}{ctx}"
    );
    // Latency: positive, ordered, below the playout buffer (256 chunks, 2 s).
    let (p50, p99, max) = (
        num("/latency_ms/p50"),
        num("/latency_ms/p99"),
        num("/latency_ms/max"),
    );
    assert!(num("/latency_ms/count") > 0.8 * ideal, "{ctx}");
    assert!(
        p50 > 0.0 && p50 <= p99 && p99 <= max && max < 2100.0,
        "{ctx}"
    );
    assert!(num("/sender_cpu/system_s") > 0.0, "{ctx}");
    assert!(num("/loadgen/rss_peak_mib") > 1.0, "{ctx}");
    assert!(report["intervals"].as_array().unwrap().len() >= 4, "{ctx}");
    let hgrm_text = std::fs::read_to_string(&hgrm).expect("hgrm written");
    assert!(hgrm_text.contains("#[Max     ="));
    let _ = std::fs::remove_file(&hgrm);
}

/// CIS: 32 verifying peers in teams of 16 join a signing splitter child, in each signing mode, for
/// 2 s: nothing lost or left unplayed, every chunk checked (by a hash against a digest, or by its
/// own signature), and the report prices the checks (`loadgen.verify`, the `Verifying` line).
#[test]
fn verifying_peers_of_a_signing_splitter_lose_nothing_and_report_the_cost() {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    let p2psp = p2psp_next_to(loadgen);
    for mode in ["digest", "chunk"] {
        let tag = format!("loadgen-signed-{mode}-{}", std::process::id());
        let json = std::env::temp_dir().join(format!("{tag}.json"));
        let key = std::env::temp_dir().join(format!("{tag}.key"));
        let child = Command::new(loadgen)
            .args(["--peers", "32", "--team-size", "16", "--bitrate", "1M"])
            .args([
                "--duration",
                "2",
                "--no-progress",
                "--no-pin",
                "--sign-mode",
                mode,
            ])
            .arg("--sign")
            .arg(&key)
            .arg("--splitter-bin")
            .arg(&p2psp)
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("loadgen starts");
        let out = wait_for(child, Duration::from_secs(60));
        let _ = std::fs::remove_file(&key);
        out.assert_success(&format!("{mode}: "));
        let stdout = &out.stdout;
        assert!(stdout.contains("Verifying"), "{mode}:\n{stdout}");
        let report = json_report(&json);
        let num = |p: &str| {
            report
                .pointer(p)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or_else(|| panic!("{mode}: {p} missing in {report}"))
        };
        let ctx = format!("{mode}:\n{stdout}");
        assert_eq!(num("/joins/ok"), 32.0, "{ctx}");
        assert_eq!(num("/chunks/lost"), 0.0, "{ctx}");
        assert!(num("/chunks/played") > 0.0, "{ctx}");
        let chunks = num("/chunks/chunks");
        let (sigs, hashes) = (num("/chunks/signatures"), num("/chunks/hashes"));
        if mode == "digest" {
            // Every chunk by one hash; one signature per group (groups of 2 or more here).
            assert!(hashes >= 0.95 * chunks, "{ctx}");
            assert!(sigs > 0.0 && sigs <= 0.6 * chunks, "{ctx}");
        } else {
            assert!(sigs >= 0.95 * chunks && hashes == 0.0, "{ctx}");
        }
        assert!(num("/loadgen/verify/us_per_chunk") > 0.0, "{ctx}");
        assert!(num("/loadgen/verify/signature_us") > 1.0, "{ctx}");
    }
}
