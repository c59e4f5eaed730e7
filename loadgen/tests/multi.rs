//! `loadgen --splitter a,b,c`: the real loadgen serves its source to three real `p2psp splitter`s
//! started by the test, joins 90 peers over them for 3 s; the JSON report must show the peers
//! spread 30/30/30, zero loss, and per-splitter figures that add up to the totals exactly.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{json_report, p2psp_next_to, wait_for};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills the splitters however the test ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn three_splitters_report_per_splitter_figures_that_add_up_to_the_totals() {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    let p2psp = p2psp_next_to(loadgen);
    let json = std::env::temp_dir().join(format!("loadgen-multi-{}.json", std::process::id()));
    let source = free_port();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let lg = Command::new(loadgen)
        .args(["--splitter", &list.join(",")])
        .args(["--source-listen", &format!("127.0.0.1:{source}")])
        .args([
            "--peers",
            "90",
            "--duration",
            "3",
            "--no-progress",
            "--no-pin",
        ])
        .args(["--join-rate", "300"])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    // loadgen serves the source first; each splitter connects to it when it starts.
    std::thread::sleep(Duration::from_millis(500));
    let mut splitters = Children(Vec::new());
    for port in &ports {
        splitters.0.push(
            Command::new(&p2psp)
                .arg("splitter")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--source", &format!("http://127.0.0.1:{source}/loadgen")])
                .args([
                    "--header-size",
                    "0",
                    "--chunk-size",
                    "1024",
                    "--shards",
                    "1",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("p2psp splitter starts"),
        );
    }
    let out = wait_for(lg, Duration::from_secs(90));
    out.assert_success("");
    let stdout = &out.stdout;
    assert!(stdout.contains("By splitter"), "{stdout}");
    let report = json_report(&json);
    let ctx = format!("\n{stdout}");
    let num = |v: &serde_json::Value, p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{p} missing{ctx}"))
    };
    assert_eq!(num(&report, "/joins/ok"), 90.0, "{ctx}");
    assert_eq!(num(&report, "/chunks/lost"), 0.0, "zero loss{ctx}");
    let per = report["splitters"].as_array().expect("splitters");
    assert_eq!(per.len(), 3, "{ctx}");
    for (p, name) in per.iter().zip(&list) {
        assert_eq!(p["splitter"].as_str(), Some(name.as_str()), "{ctx}");
        assert_eq!(num(p, "/peers"), 30.0, "{ctx}");
        assert!(num(p, "/chunks/played") > 0.0, "{ctx}");
    }
    // Every counter, sample count and rate adds up to the total.
    let sum = |p: &str| per.iter().map(|s| num(s, p)).sum::<f64>();
    let counters = report["chunks"].as_object().expect("chunks").keys();
    for key in counters {
        let path = format!("/chunks/{key}");
        assert_eq!(sum(&path), num(&report, &path), "{path}{ctx}");
    }
    assert_eq!(sum("/peers"), 90.0, "{ctx}");
    assert_eq!(
        sum("/latency_ms/count"),
        num(&report, "/latency_ms/count"),
        "{ctx}"
    );
    for (mine, total) in [
        ("/rx_datagrams_per_s", "/fanout/rx_datagrams_per_s"),
        (
            "/peer_tx_datagrams_per_s",
            "/fanout/peer_tx_datagrams_per_s",
        ),
    ] {
        let (a, b) = (sum(mine), num(&report, total));
        assert!(
            (a - b).abs() <= 1e-6 * b.max(1.0),
            "{mine}: {a} vs {b}{ctx}"
        );
    }
    let max = per
        .iter()
        .map(|s| num(s, "/latency_ms/max"))
        .fold(0.0, f64::max);
    assert_eq!(max, num(&report, "/latency_ms/max"), "{ctx}");
}
