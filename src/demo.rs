//! `p2psp demo`: a splitter with the test source and a small local team in one process, printing
//! what each peer receives and checking it against the test pattern.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;

use crate::pattern::Checker;
use crate::peer::{self, Output, PeerCounters, PeerOptions};
use crate::splitter::{self, SplitterArgs};

/// Flags of `p2psp demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Peers in the team (the first is the monitor).
    #[arg(long, default_value_t = 4)]
    pub peers: usize,
    /// Test source rate (suffixes k, M).
    #[arg(long, default_value = "1M", value_parser = splitter::settings::parse_bitrate)]
    pub bitrate: u64,
    /// Seconds to run; 0 runs until Ctrl-C.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Most peers per team (smaller than --peers makes several teams).
    #[arg(long, default_value_t = 16)]
    pub team_size: usize,
}

/// Runs the demo.
pub fn run(args: &DemoArgs, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let splitter_args = SplitterArgs {
        bitrate: args.bitrate,
        port: 0,
        bind: Ipv4Addr::LOCALHOST,
        header_size: crate::media::HeaderSize::Bytes(1024),
        team_size: args.team_size,
        lrs: true,
        ..SplitterArgs::default()
    };
    let settings = splitter::Settings::from_args(&splitter_args).map_err(anyhow::Error::msg)?;
    let splitter_stop = Arc::new(AtomicBool::new(false));
    let running = splitter::start(settings, splitter_stop.clone())?;
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, running.port());
    println!(
        "demo: splitter on {addr} with the test source at {} kbit/s; {} peers join (the first as monitor)",
        args.bitrate / 1000,
        args.peers
    );
    let mut peers = Vec::new();
    for i in 0..args.peers {
        let counters = Arc::new(PeerCounters::default());
        let checker = Arc::new(Checker::default());
        let opts = PeerOptions {
            output: Some(Output::Check(checker.clone())),
            monitor: i == 0,
            counters: counters.clone(),
            ..PeerOptions::new(addr)
        };
        let peer_stop = stop.clone();
        let h = std::thread::spawn(move || peer::run(opts, peer_stop));
        peers.push((counters, checker, h));
        // Joins one after another, as people arrive.
        std::thread::sleep(Duration::from_millis(100));
    }
    let start = Instant::now();
    let mut last: Vec<u64> = vec![0; peers.len()];
    while !stop.load(Ordering::Relaxed)
        && (args.seconds == 0 || start.elapsed() < Duration::from_secs(args.seconds))
    {
        std::thread::sleep(Duration::from_secs(1));
        println!("demo: t={:>3}s", start.elapsed().as_secs());
        for (i, (c, check, _)) in peers.iter().enumerate() {
            let played = c.played.load(Ordering::Relaxed);
            let r = check.report();
            let verdict = match (r.header_ok, r.breaks) {
                (None, _) => "waiting for the stream".to_owned(),
                (Some(false), _) => "WRONG stream header".to_owned(),
                (Some(true), 0) if r.first.is_some() => format!(
                    "stream OK from byte {} ({} KiB checked)",
                    r.first.unwrap_or(0),
                    r.verified / 1024
                ),
                (Some(true), 0) => "header OK, buffering".to_owned(),
                (Some(true), b) => format!("stream BROKEN {b} times"),
            };
            println!(
                "  peer {:>2}{} udp port {:>5}: played {:>6} chunks (+{:>4}, {:>6.0} kbit/s), lost {}, relayed {}, {} neighbours; {verdict}",
                i + 1,
                if i == 0 { " (monitor)" } else { "          " },
                c.port.load(Ordering::Relaxed),
                played,
                played - last[i],
                (played - last[i]) as f64 * 1024.0 * 8.0 / 1000.0,
                c.lost.load(Ordering::Relaxed),
                c.relayed.load(Ordering::Relaxed),
                c.neighbours.load(Ordering::Relaxed),
            );
            last[i] = played;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut failed = None;
    for (_, _, h) in peers {
        if let Ok(Err(e)) = h.join() {
            failed = Some(e);
        }
    }
    splitter_stop.store(true, Ordering::SeqCst);
    running.wait()?;
    match failed {
        Some(e) => Err(e),
        None => {
            println!("demo: done; every peer left the team politely");
            Ok(())
        }
    }
}
