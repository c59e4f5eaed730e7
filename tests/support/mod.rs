//! Helpers for tests that run the real `p2psp` binary and other programs (icecast2, ffmpeg,
//! chromium): processes that are killed when the test ends however it ends, ports the programs
//! report (or, where a program cannot pick its own, retried until one is free), bounded waits, a
//! tiny HTTP client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_p2psp");

/// A child process that is killed (and reaped) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills it and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks it to stop (SIGTERM) and waits up to `timeout`; whether it exited with success. One
    /// that does not exit in time is killed.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.signal("TERM");
        match self.wait_exit(timeout) {
            Some(status) => status.success(),
            None => {
                self.kill();
                false
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts something that needs a loopback TCP port given in advance (icecast2's configuration,
/// a peer's `--player-port`, where 0 means "none"): `start` gets a port that was free a moment
/// ago and returns `None` when it found the port taken after all (another process may bind it
/// in between), and then gets another, up to 10 times.
pub fn on_a_free_port<T>(what: &str, mut start: impl FnMut(u16) -> Option<T>) -> T {
    for _ in 0..10 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if let Some(started) = start(port) {
            return started;
        }
        eprintln!("{what}: port {port} was taken meanwhile; another one");
    }
    panic!("{what}: 10 ports in a row were taken");
}

/// The streaming tests of one test binary run one at a time: each starts processes that must
/// keep real-time deadlines on a 2-core machine. Hold the guard for the whole test.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh directory for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("p2psp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `program` runs at all (`arg` makes it print its version and exit).
fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether this is a CI run (`CI` set, as CI services and `.ci/run`'s callers set it): there a
/// missing tool is a failure, never a skip.
fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Whether every `(program, version argument)` in `tools` runs. When one is missing the test
/// `test` fails if `CI` is set (`.ci/run` installs them, so a CI run that skipped would pass
/// without testing anything), and otherwise says loudly that it is skipped: the caller returns.
pub fn tools_present(test: &str, tools: &[(&str, &str)]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(program, arg)| !have(program, arg))
        .map(|(program, _)| *program)
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{} not installed", missing.join(" and "));
    assert!(
        !in_ci(),
        "{test}: {why}, and CI is set: CI must run it, not skip it (.ci/run installs what is missing)"
    );
    eprintln!("\n*** SKIPPED {test}: {why} ***\n*** (.ci/run installs what is missing) ***\n");
    false
}

/// Polls `f` every 50 ms until it is true or `timeout` passed.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` with HTTP/1.0; the response head (as text) and the body read until the server
/// closes or `max` bytes.
pub fn http_get(port: u16, path: &str, max: usize) -> Option<(String, Vec<u8>)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    while data.len() < max {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    Some((head, data[end + 4..].to_vec()))
}

/// A running splitter: its process, port, log file and (with `--metrics`) metrics port.
pub struct Splitter {
    pub proc: Proc,
    pub port: u16,
    pub log: PathBuf,
    pub metrics: Option<u16>,
}

impl Splitter {
    /// Starts `p2psp splitter --port 0 --bind 127.0.0.1 <args>` and waits for it to say where it
    /// listens; the rest of its standard error goes to `dir/splitter.log`.
    pub fn start(dir: &Path, args: &[&str], stdin: Stdio) -> Splitter {
        Self::start_env(dir, args, stdin, &[])
    }

    pub fn start_env(dir: &Path, args: &[&str], stdin: Stdio, env: &[(&str, &str)]) -> Splitter {
        Self::start_on(dir, 0, args, stdin, env)
    }

    /// [`Splitter::start_env`] on `port` (0: any), e.g. to restart a splitter on the port its
    /// peers know; its log is `dir/splitter-<port>.log` then.
    pub fn start_on(
        dir: &Path,
        port: u16,
        args: &[&str],
        stdin: Stdio,
        env: &[(&str, &str)],
    ) -> Splitter {
        let requested = port;
        let mut cmd = Command::new(BIN);
        cmd.env("RUST_LOG", "p2psp=info")
            .args([
                "splitter",
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(args)
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("splitter", &mut cmd);
        let stderr = proc.child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut port, mut metrics) = (None, None);
        let mut seen = Vec::new();
        // The metrics line (with `--metrics`) comes before the listening line.
        while port.is_none() && Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(addr) = line.strip_prefix("p2psp splitter listening on ") {
                port = port_of(addr);
            }
            if let Some(url) = line.strip_prefix("p2psp splitter metrics on ") {
                metrics = port_of(url);
            }
            seen.push(line);
        }
        let Some(port) = port else {
            panic!(
                "the splitter did not announce its port; it said:\n{}",
                seen.join("\n")
            )
        };
        let log = if requested == 0 {
            dir.join("splitter.log")
        } else {
            dir.join(format!("splitter-{requested}.log"))
        };
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(log2).unwrap();
            for line in seen.into_iter().chain(lines.map_while(Result::ok)) {
                let _ = writeln!(f, "{line}");
            }
        });
        Splitter {
            proc,
            port,
            log,
            metrics,
        }
    }

    /// The last status line the splitter printed.
    pub fn last_status(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log).ok()?;
        text.lines()
            .rev()
            .find(|l| l.starts_with("splitter: "))
            .map(str::to_owned)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /status` from its metrics endpoint, parsed.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (head, body) = http_get(self.metrics?, "/status", 1 << 24)?;
        head.contains(" 200").then_some(())?;
        serde_json::from_slice(&body).ok()
    }

    /// Peers in the last status line.
    pub fn peers(&self) -> Option<usize> {
        self.last_status()?
            .strip_prefix("splitter: ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    }
}

/// The port at the end of `HOST:PORT` or `http://HOST:PORT/`.
fn port_of(addr: &str) -> Option<u16> {
    addr.trim()
        .trim_end_matches('/')
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// Waits up to `timeout` for a line that `wanted` accepts in the log file `log` that `proc`
/// writes; the line, or what the log holds if `proc` exited or time ran out first.
pub fn wait_for_line(
    proc: &mut Proc,
    log: &Path,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        // Read before asking whether it runs: a line written just before the exit still counts.
        let running = proc.running();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| wanted(l)) {
            return Ok(line.to_owned());
        }
        if !running || Instant::now() >= deadline {
            return Err(text);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log of the peer `name` started by [`start_peer`] in `dir`.
pub fn peer_log(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// Waits until the peer `name` (started by [`start_peer`] in `dir`, without `--quiet`) joined;
/// its UDP endpoint, from its line `peer 127.0.0.1:PORT: joined ...`.
pub fn wait_joined(dir: &Path, peer: &mut Proc) -> String {
    let log = peer_log(dir, &peer.name);
    match wait_for_line(peer, &log, Duration::from_secs(15), |l| {
        l.contains(": joined ")
    }) {
        Ok(line) => line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches(':')
            .to_owned(),
        Err(text) => panic!("{} did not join; its log:\n{text}", peer.name),
    }
}

/// Starts a monitor (`--player-port 0`) named `monitor` and waits until it joined; it and its
/// UDP endpoint.
pub fn start_monitor(dir: &Path, splitter_port: u16) -> (Proc, String) {
    let mut monitor = start_peer(
        dir,
        "monitor",
        splitter_port,
        &["--monitor", "--player-port", "0"],
    );
    let endpoint = wait_joined(dir, &mut monitor);
    (monitor, endpoint)
}

/// How often `needle` occurs in the file at `path` (0 if it cannot be read).
pub fn count_in(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// The port of the metrics endpoint a peer started with `--metrics 127.0.0.1:0` reports.
pub fn peer_metrics_port(dir: &Path, peer: &mut Proc) -> u16 {
    let log = peer_log(dir, &peer.name);
    let line = wait_for_line(peer, &log, Duration::from_secs(15), |l| {
        l.starts_with("p2psp peer metrics on ")
    })
    .unwrap_or_else(|text| panic!("{} reported no metrics port; its log:\n{text}", peer.name));
    port_of(&line["p2psp peer metrics on ".len()..]).expect("a port in the metrics line")
}

/// [`start_peer`] with a player port (`--player-port` has no "any port": 0 turns the player
/// endpoint off), retried on another port if the peer finds its port taken; the peer and its
/// player port, once it has joined.
pub fn start_peer_with_player(
    dir: &Path,
    name: &str,
    splitter_port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, u16) {
    on_a_free_port(name, |port| {
        let mut args = vec!["--player-port".to_owned(), port.to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut peer = start_peer_env(dir, name, splitter_port, &args, env);
        // The player port is bound before the join; a taken one ends the peer at once.
        let log = peer_log(dir, name);
        match wait_for_line(&mut peer, &log, Duration::from_secs(15), |l| {
            l.contains(": joined ") || l.contains("cannot listen for players")
        }) {
            Ok(line) if line.contains(": joined ") => Some((peer, port)),
            Ok(_) => None,
            Err(text) => panic!("{name} did not join; its log:\n{text}"),
        }
    })
}

/// Runs the binary with `args`, expects exit code 2 and exactly one line (`p2psp: ...`) on
/// standard error, within 15 s; returns that line.
pub fn one_line_exit_2(args: &[&str]) -> String {
    let mut p = Proc::spawn(
        "p2psp",
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    // One line fits in the pipe: waiting for the exit first cannot block the program.
    let status = p
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("{args:?} still running after 15 s"));
    let mut err = String::new();
    p.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{args:?}: {status}, said {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?} printed:\n{err}"
    );
    assert!(err.starts_with("p2psp: "), "{args:?}: {err}");
    err.trim_end().to_owned()
}

/// Starts `p2psp peer` against `splitter_port` with `extra` flags, its standard error in
/// `dir/<name>.log`.
pub fn start_peer(dir: &Path, name: &str, splitter_port: u16, extra: &[&str]) -> Proc {
    start_peer_env(dir, name, splitter_port, extra, &[])
}

/// [`start_peer`] with extra environment variables.
pub fn start_peer_env(
    dir: &Path,
    name: &str,
    splitter_port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let log = std::fs::File::create(peer_log(dir, name)).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env("RUST_LOG", "p2psp=info")
        .envs(env.iter().copied())
        .args(["peer", "--splitter", &format!("127.0.0.1:{splitter_port}")])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn(name, &mut cmd)
}
