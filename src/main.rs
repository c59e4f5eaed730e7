//! The `p2psp` command: `splitter`, `peer` and `demo`.
#![deny(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{CommandFactory, Parser, Subcommand};
use mimalloc::MiMalloc;

use p2psp::{demo, peer, splitter};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// P2PSP live streaming: a splitter cuts one live stream into chunks and sends each to one peer
/// of every team; peers relay it to the rest of their team (DBS) and play it to a local player.
/// Byte-compatible with the C++ P2PSP reference.
///
/// Exit codes: 0 done (also after SIGTERM or SIGINT), 1 failed while running, 2 bad flags or
/// configuration file, or a setup error (port in use, unreachable source or splitter).
///
/// `--config FILE` (splitter, peer) reads flags from a TOML file whose keys are the long flag
/// names (`header-size = 16384`); flags on the command line win.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a live stream and send it to teams of peers.
    Splitter(splitter::SplitterArgs),
    /// Join a team, relay chunks and play the stream to a local player.
    Peer(peer::PeerArgs),
    /// Run a splitter with the test source and a small local team in this process, and print
    /// what each peer receives.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `--config FILE`: the file's settings join the command line, which wins.
    let expanded = match p2psp::config::expand(&Cli::command(), std::env::args_os().collect()) {
        Ok(e) => e,
        Err(message) => return usage_error(&message),
    };
    let cli = match Cli::try_parse_from(&expanded.args) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal ends the process at once.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone());
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    match cli.command {
        Command::Splitter(args) => {
            let settings = match splitter::Settings::from_args(&args) {
                Ok(s) => s,
                Err(e) => return usage_error(&expanded.blame(&e)),
            };
            let running = match splitter::start(settings, stop) {
                Ok(r) => r,
                Err(e) => return usage_error(&format!("{e:#}")),
            };
            // Under systemd (`Type=notify`): listening, so ready.
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            let result = running.wait();
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            finish(result)
        }
        Command::Peer(args) => {
            let opts = match peer::PeerOptions::from_args(&args) {
                Ok(o) => o,
                Err(e) => return usage_error(&expanded.blame(&e)),
            };
            finish(peer::run(opts, stop))
        }
        Command::Demo(args) => finish(demo::run(&args, stop)),
    }
}

/// `--help` and `--version` as clap prints them; a bad flag or value as one line (what clap
/// says first, with its usage and tips left out), exit code 2.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("bad arguments");
    usage_error(&format!(
        "{}; see --help",
        first.trim().trim_start_matches("error: ")
    ))
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("p2psp: {message}");
    ExitCode::from(2)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<peer::SetupError>().is_some() => usage_error(&format!("{e:#}")),
        Err(e) => {
            eprintln!("p2psp: {e:#}");
            ExitCode::from(1)
        }
    }
}
