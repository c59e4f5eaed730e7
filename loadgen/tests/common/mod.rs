//! What every loadgen test does around the real binary: find (or build) the `p2psp` binary next
//! to it, wait for a run within a bound, check it exited 0, and read its JSON report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The `p2psp` binary next to `loadgen` (cargo builds the root package's binary for the
/// workspace's tests); built here if this package is tested alone.
pub fn p2psp_next_to(loadgen: &Path) -> PathBuf {
    let dir = loadgen.parent().expect("in a target directory");
    let p = dir.join("p2psp");
    if !p.is_file() {
        let target = dir.parent().expect("target/<profile>");
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.args(["build", "-p", "p2psp", "--bin", "p2psp"])
            .env("CARGO_TARGET_DIR", target);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cannot run cargo to build p2psp");
        assert!(status.success(), "building p2psp failed");
    }
    assert!(p.is_file(), "no p2psp binary at {}", p.display());
    p
}

/// A loadgen run that ended, with what it printed.
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output (the per-second lines and the summary).
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Waits for `child` (started with piped stdout and stderr) for at most `limit`; past it, kills
/// it and fails the test.
pub fn wait_for(mut child: Child, limit: Duration) -> Finished {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loadgen did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Finished {
    /// Fails the test, with everything loadgen printed, unless it exited 0; `what` names the
    /// run in the message.
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what}loadgen failed ({}):\n{}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// The JSON report loadgen wrote at `path` (removed once read).
pub fn json_report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("JSON report written");
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("valid JSON")
}
