//! Real media end to end: icecast2 and ffmpeg feed a `p2psp splitter`, peers play, and ffmpeg
//! decodes what each peer's player port serves.
//!
//! - Ogg (Theora + Vorbis) pushed by ffmpeg to an icecast2 mount, pulled by the splitter; a monitor
//!   and 3 peers; every peer's player port decodes 10 s without a single error message.
//! - MPEG-TS (H.264 + AAC) from ffmpeg into `--source -`, decoded at a peer the same way.
//! - icecast2 restarted mid-stream: the splitter reconnects, keeps its peers, takes the new
//!   stream's header (generation 2), and players that connect afterwards decode cleanly.
//!
//! The tests skip with a loud message only when icecast2 or ffmpeg is missing (`.ci/run` installs
//! both). They run one at a time: each encodes video in real time.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use support::{Proc, Splitter, free_port, have, http_get, skip, start_peer, test_dir, wait_until};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const MOUNT: &str = "/live.ogg";
const PASSWORD: &str = "p2psp-test";
/// The Ogg header pages of the stream below (Theora and Vorbis identification, comment and setup
/// headers) measure about 6.6 KB; the splitter trims its header to whole pages, so a larger size
/// only adds a few media pages.
const OGG_HEADER_SIZE: &str = "16384";

fn tools(test: &str) -> bool {
    let mut missing = Vec::new();
    if !have("icecast2", "-v") {
        missing.push("icecast2");
    }
    if !have("ffmpeg", "-version") {
        missing.push("ffmpeg");
    }
    if missing.is_empty() {
        return true;
    }
    skip(test, &format!("{} not installed", missing.join(" and ")));
    false
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// An icecast2 server on a loopback port, with its config, logs and pid file in a directory.
struct Icecast {
    proc: Option<Proc>,
    dir: PathBuf,
    config: PathBuf,
    port: u16,
}

impl Icecast {
    fn start(dir: &Path) -> Icecast {
        let dir = dir.join("icecast");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        // Debian's icecast2 refuses to run as root; as root it must drop to another user itself
        // (`changeowner`), which then has to write the logs.
        let security = if is_root() {
            let group = if std::fs::read_to_string("/etc/group")
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("nogroup:"))
            {
                "nogroup"
            } else {
                "nobody"
            };
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            format!("<changeowner><user>nobody</user><group>{group}</group></changeowner>")
        } else {
            String::new()
        };
        let d = dir.display();
        let config = format!(
            r#"<icecast>
  <location>p2psp test</location><admin>test@localhost</admin>
  <limits>
    <clients>50</clients><sources>2</sources><queue-size>1048576</queue-size>
    <client-timeout>30</client-timeout><header-timeout>15</header-timeout>
    <source-timeout>10</source-timeout><burst-on-connect>1</burst-on-connect>
    <burst-size>65535</burst-size>
  </limits>
  <authentication>
    <source-password>{PASSWORD}</source-password>
    <admin-user>admin</admin-user><admin-password>{PASSWORD}</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>{port}</port><bind-address>127.0.0.1</bind-address></listen-socket>
  <fileserve>0</fileserve>
  <paths>
    <basedir>{d}</basedir><logdir>{d}</logdir><pidfile>{d}/icecast.pid</pidfile>
    <webroot>/usr/share/icecast2/web</webroot><adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging>
    <accesslog>access.log</accesslog><errorlog>error.log</errorlog><loglevel>3</loglevel>
  </logging>
  <security><chroot>0</chroot>{security}</security>
</icecast>
"#
        );
        let path = dir.join("icecast.xml");
        std::fs::write(&path, config).unwrap();
        let mut ice = Icecast {
            proc: None,
            dir,
            config: path,
            port,
        };
        ice.run();
        ice
    }

    fn run(&mut self) {
        let out = std::fs::File::create(self.dir.join("stdout.log")).unwrap();
        let proc = Proc::spawn(
            "icecast2",
            Command::new("icecast2")
                .arg("-c")
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        );
        self.proc = Some(proc);
        let port = self.port;
        let up = wait_until(Duration::from_secs(10), || {
            http_get(port, "/status-json.xsl", 1 << 16).is_some_and(|(h, _)| h.contains(" 200"))
        });
        if !up {
            let said = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
            let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
            panic!("icecast2 did not come up on port {port}:\n{said}\n{log}");
        }
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal("TERM");
            if p.wait_exit(Duration::from_secs(5)).is_none() {
                p.kill();
            }
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}{MOUNT}", self.port)
    }

    /// Whether the mount is on the air.
    fn mount_up(&self) -> bool {
        http_get(self.port, MOUNT, 4096).is_some_and(|(h, b)| h.contains(" 200") && !b.is_empty())
    }
}

impl Drop for Icecast {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A live test pattern, `-re`: 320x240 at 25 frame/s with a 440 Hz tone.
const PATTERN: &[&str] = &[
    "-f",
    "lavfi",
    "-i",
    "testsrc=size=320x240:rate=25",
    "-f",
    "lavfi",
    "-i",
    "sine=frequency=440:sample_rate=44100",
];

/// ffmpeg pushing Ogg (Theora + Vorbis) to the icecast mount.
fn push_ogg(dir: &Path, ice: &Icecast, name: &str) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-re"])
        .args(PATTERN)
        .args(["-c:v", "libtheora", "-q:v", "5", "-g", "25"])
        .args(["-c:a", "libvorbis", "-q:a", "2"])
        .args(["-content_type", "application/ogg", "-f", "ogg"])
        .arg(format!(
            "icecast://source:{PASSWORD}@127.0.0.1:{}{MOUNT}",
            ice.port
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn(name, &mut cmd)
}

/// ffmpeg reading a peer's player port for `seconds` of media; its error output.
fn decode(dir: &Path, player_port: u16, seconds: u32, name: &str) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-v", "error", "-i"])
        .arg(format!("http://127.0.0.1:{player_port}/"))
        .args(["-t", &seconds.to_string(), "-f", "null", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn(name, &mut cmd)
}

/// Waits for the decoders and checks each exited 0 with nothing on its error output.
fn check_decodes(dir: &Path, decoders: Vec<Proc>, splitter: &Splitter) {
    let mut failures = Vec::new();
    for mut d in decoders {
        let status: Option<ExitStatus> = d.wait_exit(Duration::from_secs(90));
        let errors =
            std::fs::read_to_string(dir.join(format!("{}.log", d.name))).unwrap_or_default();
        match status {
            Some(s) if s.success() && errors.trim().is_empty() => {}
            Some(s) => failures.push(format!("{}: exit {s}, said:\n{errors}", d.name)),
            None => failures.push(format!("{}: still decoding after 90 s", d.name)),
        }
    }
    if !failures.is_empty() {
        let log = std::fs::read_to_string(&splitter.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "decoding failed:\n{}\n--- splitter log (last lines, newest first):\n{}",
            failures.join("\n"),
            tail.join("\n")
        );
    }
}

/// A monitor and `n` peers with player ports.
fn team(dir: &Path, splitter: &Splitter, n: usize) -> (Proc, Vec<(Proc, u16)>) {
    let monitor = start_peer(
        dir,
        "monitor",
        splitter.port,
        &["--monitor", "--player-port", "0"],
    );
    std::thread::sleep(Duration::from_millis(200));
    let peers = (0..n)
        .map(|i| {
            let port = free_port();
            let p = start_peer(
                dir,
                &format!("peer{i}"),
                splitter.port,
                &["--player-port", &port.to_string()],
            );
            std::thread::sleep(Duration::from_millis(100));
            (p, port)
        })
        .collect();
    (monitor, peers)
}

/// The generation in the splitter's stream-header answer (`X-P2PSP-Stream`).
fn header_generation(splitter: &Splitter) -> Option<u64> {
    let (head, _) = http_get(splitter.port, MOUNT, 1 << 17)?;
    head.lines()
        .find_map(|l| l.strip_prefix("X-P2PSP-Stream: "))?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// About 36 chunks/s: a buffer of 128 chunks holds 3.5 s, enough to ride out a loaded machine,
/// and LRS recovers what a stalled peer drops.
const SPLITTER_OGG: &[&str] = &[
    "--shards",
    "1",
    "--chunk-size",
    "512",
    "--buffer-size",
    "128",
    "--lrs",
    "--header-size",
    OGG_HEADER_SIZE,
];

#[test]
fn ogg_from_icecast_decodes_at_three_peers() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("ogg_from_icecast_decodes_at_three_peers") {
        return;
    }
    let dir = test_dir("media-ogg");
    let ice = Icecast::start(&dir);
    let _pusher = push_ogg(&dir, &ice, "pusher");
    assert!(
        wait_until(Duration::from_secs(20), || ice.mount_up()),
        "the Ogg mount never came on the air"
    );
    let url = ice.url();
    let mut args = vec!["--source", url.as_str()];
    args.extend_from_slice(SPLITTER_OGG);
    let splitter = Splitter::start(&dir, &args, Stdio::null());
    let (_monitor, mut peers) = team(&dir, &splitter, 3);
    assert!(
        wait_until(Duration::from_secs(15), || splitter.peers() == Some(4)),
        "the team did not form: {:?}",
        splitter.last_status()
    );
    let decoders = peers
        .iter()
        .enumerate()
        .map(|(i, (_, port))| decode(&dir, *port, 10, &format!("decode{i}")))
        .collect();
    check_decodes(&dir, decoders, &splitter);
    for (p, _) in &mut peers {
        assert!(p.running(), "{} stopped", p.name);
    }
}

#[test]
fn mpeg_ts_from_stdin_decodes_at_a_peer() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("mpeg_ts_from_stdin_decodes_at_a_peer") {
        return;
    }
    let dir = test_dir("media-ts");
    let log = std::fs::File::create(dir.join("encoder.log")).unwrap();
    // A live encoder repeats SPS/PPS at every keyframe (`repeat-headers`): a player joining
    // mid-stream has nothing else to start from.
    let mut encoder = Proc::spawn(
        "encoder",
        Command::new("ffmpeg")
            .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-re"])
            .args(PATTERN)
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-tune",
                "zerolatency",
            ])
            .args([
                "-g",
                "25",
                "-x264-params",
                "repeat-headers=1",
                "-pix_fmt",
                "yuv420p",
            ])
            .args(["-c:a", "aac", "-b:a", "64k", "-f", "mpegts", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log),
    );
    let ts = encoder.child.stdout.take().unwrap();
    let splitter = Splitter::start(
        &dir,
        &[
            "--source",
            "-",
            "--shards",
            "1",
            "--header-size",
            "0",
            "--buffer-size",
            "128",
            "--lrs",
        ],
        Stdio::from(ts),
    );
    let (_monitor, mut peers) = team(&dir, &splitter, 1);
    assert!(
        wait_until(Duration::from_secs(15), || splitter.peers() == Some(2)),
        "the team did not form: {:?}",
        splitter.last_status()
    );
    let decoders = vec![decode(&dir, peers[0].1, 10, "decode")];
    check_decodes(&dir, decoders, &splitter);
    assert!(peers[0].0.running());
}

#[test]
fn icecast_restart_keeps_the_peers_and_new_players_get_the_new_header() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !tools("icecast_restart_keeps_the_peers_and_new_players_get_the_new_header") {
        return;
    }
    let dir = test_dir("media-restart");
    let mut ice = Icecast::start(&dir);
    let mut pusher = push_ogg(&dir, &ice, "pusher1");
    assert!(wait_until(Duration::from_secs(20), || ice.mount_up()));
    let url = ice.url();
    let mut args = vec!["--source", url.as_str()];
    args.extend_from_slice(SPLITTER_OGG);
    let splitter = Splitter::start(&dir, &args, Stdio::null());
    let (mut monitor, mut peers) = team(&dir, &splitter, 3);
    assert!(wait_until(Duration::from_secs(15), || splitter.peers() == Some(4)));
    assert_eq!(header_generation(&splitter), Some(1));
    // Players work before the restart.
    check_decodes(&dir, vec![decode(&dir, peers[0].1, 3, "before")], &splitter);

    // The Icecast server goes away (and its source client with it), and comes back.
    ice.stop();
    pusher.kill();
    std::thread::sleep(Duration::from_secs(2));
    ice.run();
    let _pusher = push_ogg(&dir, &ice, "pusher2");
    assert!(wait_until(Duration::from_secs(20), || ice.mount_up()));
    assert!(
        wait_until(Duration::from_secs(30), || header_generation(&splitter)
            == Some(2)),
        "the splitter did not take the new stream's header; it said: {:?}",
        splitter.last_status()
    );
    let log = std::fs::read_to_string(&splitter.log).unwrap();
    assert!(
        log.contains("source reconnected"),
        "no reconnection in the log"
    );

    // The peers are all still there, and players that connect now decode the new stream.
    assert!(monitor.running(), "the monitor stopped");
    for (p, _) in &mut peers {
        assert!(p.running(), "{} stopped", p.name);
    }
    assert!(
        wait_until(Duration::from_secs(5), || splitter.peers() == Some(4)),
        "the splitter lost peers: {:?}",
        splitter.last_status()
    );
    let decoders = peers
        .iter()
        .enumerate()
        .map(|(i, (_, port))| decode(&dir, *port, 10, &format!("after{i}")))
        .collect();
    check_decodes(&dir, decoders, &splitter);
}
