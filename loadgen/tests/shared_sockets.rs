//! Virtual peers (`--sockets shared`): 2,000 peers on one UDP socket per worker, each an address
//! of 127.0.0.0/8, join a real `p2psp splitter` child in teams of 4 and stream 3 s. The JSON
//! report must show every peer joined, zero loss, and relays: in teams of 4 each chunk from the
//! splitter goes on to 3 team mates, so the peers send about 3/4 of what they receive, from the
//! right addresses (a relay from an address that is no team mate would not be played).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{json_report, p2psp_next_to, wait_for};

#[test]
fn two_thousand_virtual_peers_relay_and_lose_nothing() {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    let p2psp = p2psp_next_to(loadgen);
    let json = std::env::temp_dir().join(format!("loadgen-shared-{}.json", std::process::id()));
    let child = Command::new(loadgen)
        .args(["--sockets", "shared", "--peers", "2000", "--team-size", "4"])
        .args([
            "--bitrate",
            "100k",
            "--buffer-size",
            "16",
            "--duration",
            "3",
        ])
        .args(["--join-rate", "2000", "--no-progress", "--no-pin", "-q"])
        .arg("--splitter-bin")
        .arg(&p2psp)
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let out = wait_for(child, Duration::from_secs(90));
    out.assert_success("");
    let stdout = &out.stdout;
    let report = json_report(&json);
    let num = |p: &str| {
        report
            .pointer(p)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{p} missing in {report}"))
    };
    let ctx = format!("\n{stdout}");
    assert_eq!(report["config"]["sockets"], "shared", "{ctx}");
    assert_eq!(num("/joins/ok"), 2000.0, "{ctx}");
    assert_eq!(num("/joins/failed"), 0.0, "{ctx}");
    assert!(num("/measured_seconds") >= 3.0, "{ctx}");
    assert_eq!(num("/chunks/lost"), 0.0, "{ctx}");
    assert_eq!(num("/loss_ratio"), 0.0, "{ctx}");
    assert_eq!(num("/chunks/unknown_dest"), 0.0, "{ctx}");
    assert_eq!(num("/chunks/send_dropped"), 0.0, "{ctx}");
    // 100 kbit/s of 1 KiB chunks: 12.2 chunks/s; every peer receives each, and plays nearly all
    // once its buffer (16 chunks, 1.3 s) has filled.
    let per_s = num("/config/chunks_per_second");
    let ideal = 2000.0 * per_s * num("/measured_seconds");
    let chunks = num("/chunks/chunks");
    assert!(
        chunks > 0.9 * ideal && chunks < 1.1 * ideal,
        "chunks {chunks} of {ideal}{ctx}"
    );
    let played = num("/chunks/played");
    assert!(
        played > 0.8 * ideal && played < 1.05 * ideal,
        "played {played} of {ideal}{ctx}"
    );
    // Relays: the splitter sends each chunk to one peer per team (500 teams); the peers pass it
    // on to their 3 team mates, so they send about 3 datagrams for each 4 they receive.
    let rx = num("/fanout/rx_datagrams_per_s");
    let peer_tx = num("/fanout/peer_tx_datagrams_per_s");
    let tx = num("/fanout/tx_datagrams_per_s");
    assert!(rx > 0.8 * 2000.0 * per_s, "rx {rx}{ctx}");
    assert!(
        peer_tx > 0.6 * rx && peer_tx < 0.9 * rx,
        "peer tx {peer_tx} rx {rx}{ctx}"
    );
    assert!(
        tx > 0.5 * 500.0 * per_s && tx < 1.5 * 500.0 * per_s,
        "tx {tx}{ctx}"
    );
}
