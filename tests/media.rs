//! Real media end to end: icecast2 and ffmpeg feed a `p2psp splitter`, peers play, and ffmpeg
//! decodes what each peer's player port serves.
//!
//! - Ogg (Theora + Vorbis) pushed by ffmpeg to an icecast2 mount, pulled by the splitter; a monitor
//!   and 3 peers; every peer's player port decodes 10 s without a single error message.
//! - MPEG-TS (H.264 + AAC) from ffmpeg into `--source -`, decoded at a peer the same way.
//! - icecast2 restarted mid-stream: the splitter reconnects, keeps its peers, takes the new
//!   stream's header (generation 2), and players that connect afterwards decode cleanly.
//!
//! When icecast2 or ffmpeg is missing the tests fail under CI (`CI` set; `.ci/run` installs both)
//! and elsewhere skip with a loud message. They run one at a time: each encodes video in real
//! time.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::MutexGuard;
use std::time::Duration;

use support::{
    Proc, Splitter, http_get, on_a_free_port, one_at_a_time, start_monitor, start_peer_with_player,
    test_dir, tools_present, wait_until,
};

const MOUNT: &str = "/live.ogg";
const PASSWORD: &str = "p2psp-test";

/// The start of every test: its turn (one at a time), icecast2 and ffmpeg (without them the test
/// fails under CI and is skipped elsewhere, see [`tools_present`]: `None`), a fresh directory
/// `p2psp-media-<short>-PID`.
fn begin(test: &str, short: &str) -> Option<(MutexGuard<'static, ()>, PathBuf)> {
    let turn = one_at_a_time();
    tools_present(test, &[("icecast2", "-v"), ("ffmpeg", "-version")])
        .then(|| (turn, test_dir(&format!("media-{short}"))))
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
    /// icecast2 on a loopback port; another port if it finds its port taken.
    fn start(dir: &Path) -> Icecast {
        let dir = dir.join("icecast");
        std::fs::create_dir_all(&dir).unwrap();
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
        on_a_free_port("icecast2", |port| {
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
                dir: dir.clone(),
                config: path,
                port,
            };
            ice.try_run().then_some(ice)
        })
    }

    /// Starts icecast2 again on its port, the one the splitter reconnects to (the old server
    /// released it when it exited).
    fn run(&mut self) {
        assert!(
            self.try_run(),
            "icecast2 found its port {} taken on restart",
            self.port
        );
    }

    /// Starts icecast2 and waits until it serves; false if it could not listen on its port (it
    /// exits at once, saying so).
    fn try_run(&mut self) -> bool {
        let out = std::fs::File::create(self.dir.join("stdout.log")).unwrap();
        let mut proc = Proc::spawn(
            "icecast2",
            Command::new("icecast2")
                .arg("-c")
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        );
        let port = self.port;
        let serves =
            || http_get(port, "/status-json.xsl", 1 << 16).is_some_and(|(h, _)| h.contains(" 200"));
        wait_until(Duration::from_secs(10), || serves() || !proc.running());
        let running = proc.running();
        if running && serves() {
            self.proc = Some(proc);
            return true;
        }
        let said = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
        if !running && said.contains("Could not create listener socket") {
            return false;
        }
        let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        panic!("icecast2 did not come up on port {port}:\n{said}\n{log}");
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
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

/// Decodes `seconds` of media from each peer's player port at once (ffmpeg `<prefix><i>`), and
/// checks that each decoder exited 0 with nothing on its error output.
fn check_decodes(
    dir: &Path,
    splitter: &Splitter,
    peers: &[(Proc, u16)],
    seconds: u32,
    prefix: &str,
) {
    let decoders: Vec<Proc> = peers
        .iter()
        .enumerate()
        .map(|(i, (_, port))| decode(dir, *port, seconds, &format!("{prefix}{i}")))
        .collect();
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

/// A monitor and then `n` peers with player ports, all joined and counted by the splitter.
fn team(dir: &Path, splitter: &Splitter, n: usize) -> (Proc, Vec<(Proc, u16)>) {
    let (monitor, _) = start_monitor(dir, splitter.port);
    let peers = (0..n)
        .map(|i| start_peer_with_player(dir, &format!("peer{i}"), splitter.port, &[], &[]))
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || splitter.peers() == Some(n + 1)),
        "the team did not form: {:?}",
        splitter.last_status()
    );
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
    // The default `--header-size auto`: the Ogg BOS and header pages (about 6.6 KB here).
];

#[test]
fn ogg_from_icecast_decodes_at_three_peers() {
    let Some((_turn, dir)) = begin("ogg_from_icecast_decodes_at_three_peers", "ogg") else {
        return;
    };
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
    check_decodes(&dir, &splitter, &peers, 10, "decode");
    for (p, _) in &mut peers {
        assert!(p.running(), "{} stopped", p.name);
    }
}

/// ffmpeg pushing a sine tone encoded with `codec` as `format` to `mount`.
fn push_audio(dir: &Path, ice: &Icecast, mount: &str, codec: &[&str], format: &str) -> Proc {
    let name = format!("pusher-{format}");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let content_type = if format == "mp3" {
        "audio/mpeg"
    } else {
        "audio/aac"
    };
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(codec)
        .args(["-content_type", content_type, "-f", format])
        .arg(format!(
            "icecast://source:{PASSWORD}@127.0.0.1:{}{mount}",
            ice.port
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn(&name, &mut cmd)
}

#[test]
fn mp3_and_aac_from_icecast_decode_at_peers() {
    let Some((_turn, dir)) = begin("mp3_and_aac_from_icecast_decode_at_peers", "audio") else {
        return;
    };
    let ice = Icecast::start(&dir);
    for (mount, codec, format) in [
        (
            "/live.mp3",
            &["-c:a", "libmp3lame", "-b:a", "128k"][..],
            "mp3",
        ),
        ("/live.aac", &["-c:a", "aac", "-b:a", "128k"][..], "adts"),
    ] {
        let sub = dir.join(format);
        std::fs::create_dir_all(&sub).unwrap();
        let _pusher = push_audio(&sub, &ice, mount, codec, format);
        assert!(
            wait_until(Duration::from_secs(20), || {
                http_get(ice.port, mount, 4096)
                    .is_some_and(|(h, b)| h.contains(" 200") && !b.is_empty())
            }),
            "the {format} mount never came on the air"
        );
        // The default --header-size auto: MP3 and ADTS need no header.
        let url = format!("http://127.0.0.1:{}{mount}", ice.port);
        let splitter = Splitter::start(
            &sub,
            &[
                "--source",
                &url,
                "--chunk-size",
                "512",
                "--buffer-size",
                "128",
            ],
            Stdio::null(),
        );
        let (_monitor, mut peers) = team(&sub, &splitter, 2);
        check_decodes(&sub, &splitter, &peers, 10, "decode");
        for (p, _) in &mut peers {
            assert!(p.running(), "{format}: {} stopped", p.name);
        }
    }
}

#[test]
fn mpeg_ts_from_stdin_decodes_at_a_peer() {
    let Some((_turn, dir)) = begin("mpeg_ts_from_stdin_decodes_at_a_peer", "ts") else {
        return;
    };
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
    check_decodes(&dir, &splitter, &peers, 10, "decode");
    assert!(peers[0].0.running());
}

#[test]
fn icecast_restart_keeps_the_peers_and_new_players_get_the_new_header() {
    let Some((_turn, dir)) = begin(
        "icecast_restart_keeps_the_peers_and_new_players_get_the_new_header",
        "restart",
    ) else {
        return;
    };
    let mut ice = Icecast::start(&dir);
    let mut pusher = push_ogg(&dir, &ice, "pusher1");
    assert!(wait_until(Duration::from_secs(20), || ice.mount_up()));
    let url = ice.url();
    let mut args = vec!["--source", url.as_str()];
    args.extend_from_slice(SPLITTER_OGG);
    let splitter = Splitter::start(&dir, &args, Stdio::null());
    let (mut monitor, mut peers) = team(&dir, &splitter, 3);
    assert_eq!(header_generation(&splitter), Some(1));
    // Players work before the restart.
    check_decodes(&dir, &splitter, &peers[..1], 3, "before");

    // The Icecast server goes away (and its source client with it), and comes back.
    ice.stop();
    pusher.kill();
    assert!(
        wait_until(Duration::from_secs(15), || splitter
            .log_text()
            .contains("source dropped, reconnecting")),
        "the splitter did not notice that the source went away"
    );
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
    check_decodes(&dir, &splitter, &peers, 10, "after");
}
