//! Helpers for tests that run the real `p2psp` binary and other programs (icecast2, ffmpeg,
//! chromium): processes that are killed when the test ends however it ends, free loopback ports,
//! bounded waits, a tiny HTTP client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh directory for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("p2psp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `program` runs at all.
pub fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Says loudly that a test did not run.
pub fn skip(test: &str, why: &str) {
    eprintln!("\n*** SKIPPED {test}: {why} ***\n*** (.ci/run installs what is missing) ***\n");
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
                port = addr.rsplit(':').next().and_then(|p| p.trim().parse().ok());
            }
            if let Some(url) = line.strip_prefix("p2psp splitter metrics on http://") {
                metrics = url
                    .trim_end_matches('/')
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.trim().parse().ok());
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
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
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
