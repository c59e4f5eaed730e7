//! Container-aware stream headers and start points, with the real binaries: ffmpeg encodes a live
//! test pattern (`-re`) into `p2psp splitter --source -` with the default `--header-size auto`,
//! a peer serves its player port, and ffmpeg decodes 10 s from it without a single error line:
//!
//! - MPEG-TS H.264 + AAC (the command of the bug report: AAC errors at start with a raw 8192-byte
//!   header), Ogg Theora + Vorbis, Ogg Opus, WebM VP8 + Opus, MP3, AAC in ADTS;
//! - MPEG-TS and Ogg Theora + Vorbis again with the peer joining 20 s after the stream began (well
//!   into it: past several keyframes and Ogg pages, while the header is the one derived at the
//!   start).
//!
//! The cases run in parallel threads (about 25 s in all). Each prints the time from a player's
//! connection to its first byte after the header (its start point). Without ffmpeg the test skips
//! with a loud message, or fails when `CI` is set.
//!
//! Run: `cargo test --release --test containers -- --nocapture`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    Proc, Splitter, http_get, one_at_a_time, start_peer_with_player, test_dir, tools_present,
    wait_until,
};

/// Seconds of media each decoder reads.
const DECODE_SECONDS: u32 = 10;
/// How long after the stream began the late peers join.
const LATE: Duration = Duration::from_secs(20);

const VIDEO: &[&str] = &["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"];
const AUDIO: &[&str] = &["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"];

struct Case {
    name: &'static str,
    /// The container name the splitter logs for the stream.
    container: &'static str,
    video: bool,
    encode: &'static [&'static str],
    /// Splitter chunk size: smaller for audio, so that a chunk is a fraction of a second.
    chunk_size: &'static str,
    join_after: Duration,
}

const TS: &[&str] = &[
    "-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-c:a", "aac", "-f", "mpegts",
];
const OGG_THEORA: &[&str] = &[
    "-c:v",
    "libtheora",
    "-q:v",
    "5",
    "-g",
    "25",
    "-c:a",
    "libvorbis",
    "-q:a",
    "2",
    "-f",
    "ogg",
];

fn cases() -> Vec<Case> {
    let now = Duration::ZERO;
    vec![
        Case {
            name: "mpegts-h264-aac",
            container: "MPEG-TS",
            video: true,
            encode: TS,
            chunk_size: "1024",
            join_after: now,
        },
        Case {
            name: "ogg-theora-vorbis",
            container: "Ogg",
            video: true,
            encode: OGG_THEORA,
            chunk_size: "1024",
            join_after: now,
        },
        Case {
            name: "ogg-opus",
            container: "Ogg",
            video: false,
            encode: &["-c:a", "libopus", "-b:a", "64k", "-f", "ogg"],
            chunk_size: "256",
            join_after: now,
        },
        Case {
            name: "webm-vp8-opus",
            container: "Matroska/WebM",
            video: true,
            encode: &[
                "-c:v",
                "libvpx",
                "-deadline",
                "realtime",
                "-cpu-used",
                "8",
                "-b:v",
                "500k",
                "-g",
                "25",
                "-c:a",
                "libopus",
                "-b:a",
                "64k",
                "-f",
                "webm",
            ],
            chunk_size: "1024",
            join_after: now,
        },
        Case {
            name: "mp3",
            container: "MP3",
            video: false,
            encode: &["-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3"],
            chunk_size: "256",
            join_after: now,
        },
        Case {
            name: "aac-adts",
            container: "AAC (ADTS)",
            video: false,
            encode: &["-c:a", "aac", "-b:a", "128k", "-f", "adts"],
            chunk_size: "256",
            join_after: now,
        },
        Case {
            name: "mpegts-h264-aac-late",
            container: "MPEG-TS",
            video: true,
            encode: TS,
            chunk_size: "1024",
            join_after: LATE,
        },
        Case {
            name: "ogg-theora-vorbis-late",
            container: "Ogg",
            video: true,
            encode: OGG_THEORA,
            chunk_size: "1024",
            join_after: LATE,
        },
    ]
}

/// What one case measured.
struct Figures {
    header_bytes: usize,
    first_byte: Duration,
    decoded: Duration,
}

/// Whether ffmpeg is here; without it the test skips, or fails under CI.
fn tools(test: &str) -> bool {
    tools_present(test, &[("ffmpeg", "-version")])
}

/// The stream header the splitter hands out for channel `stdin` (the body of its answer).
fn header_len(splitter: &Splitter) -> Option<usize> {
    let (head, body) = http_get(splitter.port, "/stdin", 1 << 17)?;
    head.contains(" 200").then_some(body.len())
}

/// Connects as a player and times the first byte after the HTTP head and `header` bytes.
fn first_played_byte(port: u16, header: usize) -> Result<Duration, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n")
            && got.len() > end + 4 + header
        {
            return Ok(started.elapsed());
        }
        match s.read(&mut buf) {
            Ok(0) => return Err("the player connection closed".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no played byte ({e})")),
        }
    }
}

/// The last `out_time_us` of an ffmpeg `-progress` file.
fn progress(path: &Path) -> Duration {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let us = text
        .lines()
        .filter_map(|l| l.strip_prefix("out_time_us="))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .next_back()
        .unwrap_or(0);
    Duration::from_micros(us)
}

fn run(case: &Case) -> Result<Figures, String> {
    let dir = test_dir(&format!("containers-{}", case.name));
    let log = std::fs::File::create(dir.join("encoder.log")).unwrap();
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-re"]);
    if case.video {
        cmd.args(VIDEO);
    }
    cmd.args(AUDIO)
        .args(case.encode)
        .arg("-")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut encoder = Proc::spawn("encoder", &mut cmd);
    let stream = encoder.child.stdout.take().unwrap();
    let began = Instant::now();
    let splitter = Splitter::start(
        &dir,
        &[
            "--source",
            "-",
            "--shards",
            "1",
            "--chunk-size",
            case.chunk_size,
            "--buffer-size",
            "64",
        ],
        Stdio::from(stream),
    );
    std::thread::sleep(case.join_after.saturating_sub(began.elapsed()));
    let (mut peer, player) =
        start_peer_with_player(&dir, "peer", splitter.port, &["--monitor"], &[]);
    if !wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", player)).is_ok()
    }) {
        return Err("the peer's player port never opened".into());
    }
    let header = header_len(&splitter).ok_or("no stream header from the splitter")?;
    let errors = dir.join("decode.log");
    let progress_file = dir.join("decode.progress");
    let mut decoder = Proc::spawn(
        "decode",
        Command::new("ffmpeg")
            .args(["-nostdin", "-hide_banner", "-v", "error", "-i"])
            .arg(format!("http://127.0.0.1:{player}/"))
            .args(["-t", &DECODE_SECONDS.to_string(), "-progress"])
            .arg(&progress_file)
            .args(["-f", "null", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errors).unwrap()),
    );
    let first_byte = first_played_byte(player, header)?;
    let status = decoder.wait_exit(Duration::from_secs(60));
    let said = std::fs::read_to_string(&errors).unwrap_or_default();
    let decoded = progress(&progress_file);
    let log = splitter.log_text();
    let fail = |what: String| {
        let tail: Vec<&str> = log.lines().rev().take(12).collect();
        Err(format!(
            "{what}\n--- splitter log, newest first:\n{}",
            tail.join("\n")
        ))
    };
    match status {
        None => return fail(format!("still decoding after 60 s (decoded {decoded:?})")),
        Some(s) if !s.success() || !said.trim().is_empty() => {
            let lines = said.lines().count();
            return fail(format!("decoder exit {s}, {lines} error lines:\n{said}"));
        }
        Some(_) => {}
    }
    if decoded < Duration::from_secs(u64::from(DECODE_SECONDS) - 1) {
        return fail(format!("decoded only {decoded:?}"));
    }
    let derived = format!("stream 1: {} (", case.container);
    if !log.contains(&derived) {
        return fail(format!("the splitter did not log `{derived}...`"));
    }
    if !peer.running() {
        return fail("the peer died".into());
    }
    Ok(Figures {
        header_bytes: header,
        first_byte,
        decoded,
    })
}

#[test]
fn every_container_decodes_at_a_peer_without_errors() {
    let _one = one_at_a_time();
    if !tools("every_container_decodes_at_a_peer_without_errors") {
        return;
    }
    let started = Instant::now();
    let cases = cases();
    let results: Vec<Result<Figures, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = cases.iter().map(|c| s.spawn(move || run(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    eprintln!(
        "\n{:<24} {:>10} {:>13} {:>16} {:>9}",
        "case", "joined at", "header bytes", "first byte after", "decoded"
    );
    let mut failures = Vec::new();
    for (c, r) in cases.iter().zip(&results) {
        match r {
            Ok(f) => eprintln!(
                "{:<24} {:>9.1}s {:>13} {:>15.2}s {:>8.1}s  0 error lines",
                c.name,
                c.join_after.as_secs_f64(),
                f.header_bytes,
                f.first_byte.as_secs_f64(),
                f.decoded.as_secs_f64()
            ),
            Err(e) => {
                eprintln!("{:<24} FAILED", c.name);
                failures.push(format!("{}: {e}", c.name));
            }
        }
    }
    eprintln!("all cases: {:.1} s\n", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// ffmpeg encoding the live test pattern with `encode` to its standard output, its errors in
/// `dir/<name>.log`.
fn encoder(dir: &Path, name: &str, video: bool, encode: &[&str]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-re"]);
    if video {
        cmd.args(VIDEO);
    }
    cmd.args(AUDIO)
        .args(encode)
        .arg("-")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    Proc::spawn(name, &mut cmd)
}

/// The last `key=` value of an ffmpeg `-progress` file (`frame`, `out_time_us`).
fn progress_value(path: &Path, key: &str) -> u64 {
    let prefix = format!("{key}=");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .next_back()
        .unwrap_or(0)
}

/// A splitter fed by ffmpeg on stdin is killed (`kill -9`; its encoder dies with it) and a new
/// one, fed by a new encoder, starts on the same port. The peer joins it again and its player, an
/// ffmpeg decoder that stays connected across the gap, must keep decoding after it and print not
/// one error line. `frames`: the progress key that counts what was decoded.
fn across_a_splitter_restart(name: &str, video: bool, encode: &[&str], chunk_size: &str) {
    let _one = one_at_a_time();
    if !tools(name) {
        return;
    }
    let dir = test_dir(&format!("containers-restart-{name}"));
    let args = [
        "--source",
        "-",
        "--shards",
        "1",
        "--chunk-size",
        chunk_size,
        "--buffer-size",
        "64",
    ];
    let mut enc1 = encoder(&dir, "encoder1", video, encode);
    let first = Splitter::start(&dir, &args, Stdio::from(enc1.child.stdout.take().unwrap()));
    let port = first.port;
    let (mut peer, player) = start_peer_with_player(
        &dir,
        "peer",
        port,
        &["--monitor", "--stall-timeout", "1s"],
        &[],
    );
    let errors = dir.join("decode.log");
    let progress_file = dir.join("decode.progress");
    let mut decoder = Proc::spawn(
        "decode",
        Command::new("ffmpeg")
            .args(["-nostdin", "-hide_banner", "-v", "error", "-i"])
            .arg(format!("http://127.0.0.1:{player}/"))
            .args(["-progress"])
            .arg(&progress_file)
            .args(["-f", "null", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errors).unwrap()),
    );
    let decoded = || Duration::from_micros(progress_value(&progress_file, "out_time_us"));
    assert!(
        wait_until(Duration::from_secs(30), || decoded()
            >= Duration::from_secs(4)),
        "decoded {:?} before the restart; it said:\n{}",
        decoded(),
        std::fs::read_to_string(&errors).unwrap_or_default()
    );

    // kill -9: the splitter and, with its pipe, the encoder. A new encoder and splitter on the
    // same port a second later.
    first.proc.signal("KILL");
    let _ = enc1.wait_exit(Duration::from_secs(5));
    let before = decoded();
    let frames_before = progress_value(&progress_file, "frame");
    std::thread::sleep(Duration::from_secs(1));
    let mut enc2 = encoder(&dir, "encoder2", video, encode);
    let second = Splitter::start_on(
        &dir,
        port,
        &args,
        Stdio::from(enc2.child.stdout.take().unwrap()),
        &[],
    );
    let listening = Instant::now();
    let resumed = wait_until(Duration::from_secs(30), || {
        decoded() >= before + Duration::from_secs(6)
    });
    let said = std::fs::read_to_string(&errors).unwrap_or_default();
    let frames_after = progress_value(&progress_file, "frame");
    eprintln!(
        "{name}: decoded {:.1} s before the kill, {:.1} s in all ({} frames then {}), \
         {:.1} s after the new splitter listened; {} error lines",
        before.as_secs_f64(),
        decoded().as_secs_f64(),
        frames_before,
        frames_after,
        listening.elapsed().as_secs_f64(),
        said.lines().count()
    );
    assert!(decoder.running(), "the decoder exited; it said:\n{said}");
    assert!(
        resumed,
        "the decoder did not go on after the restart ({:?} decoded); the new splitter said:\n{}",
        decoded(),
        second.log_text()
    );
    if video {
        assert!(
            frames_after > frames_before + 100,
            "{frames_before} -> {frames_after} frames"
        );
    }
    assert!(said.trim().is_empty(), "the decoder said:\n{said}");
    assert!(peer.running(), "the peer exited");
    let log = std::fs::read_to_string(dir.join("peer.log")).unwrap_or_default();
    assert!(log.contains("joining again"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mpeg_ts_players_decode_across_a_splitter_restart_without_errors() {
    across_a_splitter_restart("mpegts-restart", true, TS, "1024");
}

/// Fails today (hence ignored): the decoder prints `CRC mismatch!` (the page cut by the kill)
/// and `failed to create or replace stream` (the new stream's header pages, with new serials,
/// mid-stream), then stops. The peer's resume needs to end the old stream at a whole page and
/// the player needs a chained Ogg stream it can follow (see the report on issue 10).
#[test]
#[ignore]
fn ogg_players_decode_across_a_splitter_restart_without_errors() {
    across_a_splitter_restart("ogg-restart", true, OGG_THEORA, "1024");
}
