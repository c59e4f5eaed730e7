//! `p2psp peer`: joins a team, relays chunks by DBS and plays the stream to a local player.
//!
//! The peer drives the sans-IO [`Peer`](crate::proto::peer::Peer) core from one thread over one
//! plain UDP socket: a peer handles one stream, a few hundred datagrams per second, so io_uring
//! would buy nothing here (the load generator, which runs thousands of peers per thread, uses the
//! io_uring driver instead). A second thread serves players over HTTP and writes `--output`.

pub mod attack;
pub mod ims;
pub mod join;
pub mod nts;
pub mod nts_probe;
pub mod player;
pub mod status;

use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;

use crate::io_util::is_transient;
use crate::proto::choice::Choice;
use crate::proto::peer::{Peer, PeerEvent, PeerRules, PeerStats, Removal};
use crate::proto::rejoin::{self, Backoff, Stall, Watchdog};

/// Flags of `p2psp peer`.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// The splitter to join. Several, comma-separated (`a:8001,b:8001,c:8001`), or a host name
    /// with several addresses: the peer asks each for its load and joins the least loaded, tries
    /// the next when one refuses or does not answer, and when its splitter stops it joins another
    /// (players stay connected; see docs/scale-out.md).
    #[arg(long, default_value = "127.0.0.1:8001", value_name = "HOST:PORT[,...]")]
    pub splitter: String,
    /// TCP port where players (VLC, mpv, ffplay) get the stream over HTTP, on 127.0.0.1;
    /// 0 turns the player endpoint off.
    #[arg(long, default_value_t = 9999)]
    pub player_port: u16,
    /// Also write the played stream (stream header, then chunks in order) to this file; `-` is
    /// standard output.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Join as a monitor: report chunks lost at playout time to the splitter.
    #[arg(long)]
    pub monitor: bool,
    /// NAT traversal (NTS, reference-notes §6.4): for a splitter started with `--nts` (the
    /// reference's default build). With the wrong profile for its splitter the peer stops at
    /// once and says so.
    #[arg(long)]
    pub nts: bool,
    /// IP multicast (IMS, reference-notes §6.1): for a splitter started with `--ims GROUP:PORT`
    /// on this LAN (or the reference's IMS build). The peer reads the group from the join,
    /// listens to it on the interface it reaches the splitter by, plays, and relays nothing.
    /// With the wrong profile for its splitter the peer stops within seconds and says so.
    #[arg(long, conflicts_with_all = ["nts", "monitor", "lrs", "pollute"])]
    pub ims: bool,
    /// EMS (reference-notes §6.5, needs `--nts`): join with this peer's private endpoint, so that
    /// teammates behind the same NAT reach it over the LAN (no hair-pinning needed). For a
    /// splitter started with `--ems`.
    #[arg(long, requires = "nts")]
    pub ems: bool,
    /// NTS: when no teammate of the list of peers has said hello 4 s after it came, retry up to
    /// N times (as the reference does) from a new UDP port: `ID‖N` to the splitter and the
    /// monitors, which measure the peer's NAT ports again and announce the new endpoint to the
    /// team. It helps when the first mappings were spoilt (a port prediction that other traffic
    /// used up, a mapping the NAT moved, a firewall that dropped the first hellos); each retry
    /// costs about 4 s more before the peer plays. A peer that heard some of them joins 1 s
    /// after the list came and greets the rest as a member; with 0 retries (or once they are
    /// used up) it joins then whatever it heard. The splitter forwards the chunks of teammates
    /// not heard yet.
    #[arg(long, requires = "nts", default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u8).range(0..=8))]
    pub nts_retries: u8,
    /// Drop a neighbour that is owed more than this many chunks.
    #[arg(long, default_value_t = 128)]
    pub max_debt: i32,
    /// Lost-chunk recovery as a plain peer too: ask the splitter to resend chunks still missing
    /// three eighths of a buffer before they play (a `p2psp splitter --lrs` resends them to this
    /// peer alone). Monitors always report. A reference splitter would count the requests as
    /// monitor loss reports, so use it with splitters of this project.
    #[arg(long)]
    pub lrs: bool,
    /// Testing: drop this share (0 to 1) of the datagrams received, to inject loss.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub drop_rate: f64,
    /// Testing: seed of the `--drop-rate` choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Testing: never relay a chunk (a free rider), to test that teammates and the splitter
    /// drop it.
    #[arg(long)]
    pub free_ride: bool,
    /// The splitter's public key (64 hex digits, printed by `p2psp splitter --sign`): verify
    /// every chunk and drop, ban and report peers that send bad ones (docs/integrity.md); the
    /// splitter's `--sign-mode` (a signature per chunk, or a digest per group) is recognised. The
    /// peer stops with an error if the splitter does not sign, or signs with another key.
    #[arg(long, value_name = "HEX", value_parser = crate::proto::integrity::ChunkVerifier::from_hex)]
    pub splitter_key: Option<crate::proto::integrity::ChunkVerifier>,
    /// Testing: attack the team (docs/integrity.md): `persistent`, `on-off`,
    /// `selective:ADDR:PORT,...`, `replay` or `bad-mouth`; against digest signing also
    /// `drop-digest`, `forge-digest` or `replay-digest`.
    #[arg(long, value_name = "MODE")]
    pub pollute: Option<attack::Pollute>,
    /// Rejoin when no chunk arrived for this long (`500ms`, `3s`, ...) [default: a quarter of
    /// the buffer's duration, between 3 s and 10 s; at most 2 s with several splitters]. The
    /// peer says why in one line and joins again with exponential backoff (another splitter
    /// first, when it knows several); players stay connected.
    #[arg(long, value_parser = crate::config::parse_duration, value_name = "TIME")]
    pub stall_timeout: Option<Duration>,
    /// Exit (code 1) when rejoining has not succeeded for this long [default: never give up].
    #[arg(long, value_parser = crate::config::parse_duration, value_name = "TIME")]
    pub give_up_after: Option<Duration>,
    /// No status line.
    #[arg(long, short)]
    pub quiet: bool,
    /// `--config` and `--metrics`.
    #[command(flatten)]
    pub service: crate::config::ServiceArgs,
}

/// Where played chunks go.
#[derive(Debug, Clone)]
pub enum Output {
    /// A file.
    File(PathBuf),
    /// Standard output.
    Stdout,
    /// Checked against the test source's pattern (the demo).
    Check(Arc<crate::pattern::Checker>),
}

/// Faults a peer injects into itself, for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Share of received datagrams dropped, 0 to 1.
    pub drop_rate: f64,
    /// Seed of the drop choices.
    pub seed: u64,
    /// Never relay.
    pub free_ride: bool,
}

/// When a peer decides its team is gone, and how long it keeps trying to join again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Fixed stall timeout; `None`: derived from the stream's rate and the buffer size
    /// ([`rejoin::stall_timeout`]).
    pub stall_timeout: Option<Duration>,
    /// Give up (exit 1) after rejoining failed for this long; `None`: never.
    pub give_up_after: Option<Duration>,
}

/// Checked peer options.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// The splitter (the first of several).
    pub splitter: SocketAddrV4,
    /// More splitters to choose from and fail over to (`--splitter a,b,c`).
    pub more_splitters: Vec<SocketAddrV4>,
    /// Player endpoint, if any.
    pub player: Option<SocketAddrV4>,
    /// Output file, if any.
    pub output: Option<Output>,
    /// Monitor or not.
    pub monitor: bool,
    /// Debt limit.
    pub max_debt: i32,
    /// Ask the splitter for lost chunks as a plain peer too.
    pub lrs: bool,
    /// Injected faults (tests).
    pub faults: Faults,
    /// Print a status line every second (prefixed with this name).
    pub status: Option<String>,
    /// Shared counters (for the demo and for status pages).
    pub counters: Arc<PeerCounters>,
    /// Where to serve metrics and the status page.
    pub metrics: Option<std::net::SocketAddr>,
    /// Stall detection and rejoining.
    pub liveness: Liveness,
    /// CIS: the splitter's public key; chunks are verified.
    pub splitter_key: Option<crate::proto::integrity::ChunkVerifier>,
    /// Testing: a pollution attack.
    pub pollute: Option<attack::Pollute>,
    /// NTS (`--nts`).
    pub nts: bool,
    /// IMS (`--ims`).
    pub ims: bool,
    /// EMS (`--ems`).
    pub ems: bool,
    /// NTS retries from a new port (`--nts-retries`).
    pub nts_retries: u8,
}

/// Counters a running peer publishes.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Chunks played.
    pub played: AtomicU64,
    /// Chunks lost.
    pub lost: AtomicU64,
    /// Chunks relayed.
    pub relayed: AtomicU64,
    /// Chunks received.
    pub received: AtomicU64,
    /// Neighbours.
    pub neighbours: AtomicU64,
    /// Played chunks the player endpoint could not take in time.
    pub player_overruns: AtomicU64,
    /// Set once joined; the UDP port.
    pub port: AtomicU64,
    /// Datagrams dropped by `--drop-rate`.
    pub injected_drops: AtomicU64,
    /// Everything the protocol core counted, as of the last datagram.
    pub stats: Mutex<PeerStats>,
    /// Players connected now.
    pub players: AtomicU64,
    /// Players that connected since the start.
    pub player_connects: AtomicU64,
    /// Generation of the newest stream header known (0: the splitter does not say).
    pub stream_generation: AtomicU64,
    /// Neighbours and protocol counters, published once a second.
    pub detail: status::DetailCell,
    /// 0 while in a team; k while trying to join again for the k-th time in a row.
    pub rejoin_attempt: AtomicU64,
    /// Times the peer joined a team again after its team session ended.
    pub rejoins: AtomicU64,
    /// IMS: the multicast group of the current session, once joined.
    pub ims_group: Mutex<Option<SocketAddrV4>>,
    /// IMS: what the peer's filter counted, over all sessions.
    pub ims: Mutex<crate::proto::ims::ImsCounters>,
    /// Times the peer joined another splitter than the one it was on.
    pub failovers: AtomicU64,
    /// The splitter of its team now (see [`PeerCounters::splitter`]).
    splitter: AtomicU64,
    /// The playout gap of the last failover: from the last chunk played on the old splitter
    /// to the first played on the new one, in milliseconds.
    pub failover_gap_ms: AtomicU64,
    /// When the last failover's first chunk played (Unix time, milliseconds).
    pub failover_resumed_ms: AtomicU64,
    /// NTS port probing (issue 11): sessions the splitter started, teammates reached, sessions
    /// that ended without, and datagrams or rendezvous not taken (strangers, repeats, limits).
    pub nat_probe: [AtomicU64; 4],
}

impl PeerCounters {
    /// The splitter of the team the peer is in (or was in last).
    pub fn splitter(&self) -> Option<SocketAddrV4> {
        let v = self.splitter.load(Ordering::Relaxed);
        (v != 0).then(|| SocketAddrV4::new(((v >> 16) as u32).into(), v as u16))
    }

    fn set_splitter(&self, s: SocketAddrV4) {
        let v = (u64::from(u32::from(*s.ip())) << 16) | u64::from(s.port());
        self.splitter.store(v, Ordering::Relaxed);
    }
}

impl PeerOptions {
    /// A plain peer of `splitter` with the flags' defaults, no player, no output, no status
    /// line: for programs that run peers in-process (the demo, tests).
    pub fn new(splitter: SocketAddrV4) -> PeerOptions {
        PeerOptions {
            splitter,
            more_splitters: Vec::new(),
            player: None,
            output: None,
            monitor: false,
            max_debt: 128,
            lrs: false,
            faults: Faults::default(),
            status: None,
            counters: Arc::default(),
            metrics: None,
            liveness: Liveness::default(),
            splitter_key: None,
            pollute: None,
            nts: false,
            ims: false,
            ems: false,
            nts_retries: 0,
        }
    }

    /// Checks the flags.
    pub fn from_args(a: &PeerArgs) -> Result<PeerOptions, String> {
        let splitters =
            resolve_all_v4(&a.splitter).map_err(|e| format!("--splitter {}: {e}", a.splitter))?;
        if a.max_debt < 1 {
            return Err(format!("--max-debt {} must be at least 1", a.max_debt));
        }
        if !(0.0..=1.0).contains(&a.drop_rate) {
            return Err(format!(
                "--drop-rate {} must be between 0 and 1",
                a.drop_rate
            ));
        }
        Ok(PeerOptions {
            splitter: splitters[0],
            more_splitters: splitters[1..].to_vec(),
            player: (a.player_port != 0)
                .then(|| SocketAddrV4::new([127, 0, 0, 1].into(), a.player_port)),
            output: a.output.as_ref().map(|p| {
                if p.as_os_str() == "-" {
                    Output::Stdout
                } else {
                    Output::File(p.clone())
                }
            }),
            monitor: a.monitor,
            max_debt: a.max_debt,
            lrs: a.lrs,
            faults: Faults {
                drop_rate: a.drop_rate,
                seed: a.seed,
                free_ride: a.free_ride,
            },
            status: (!a.quiet).then(|| "peer".to_owned()),
            counters: Arc::default(),
            metrics: a.service.metrics,
            liveness: Liveness {
                stall_timeout: a.stall_timeout,
                give_up_after: a.give_up_after,
            },
            splitter_key: a.splitter_key,
            pollute: a.pollute.clone(),
            nts: a.nts,
            ims: a.ims,
            ems: a.ems,
            nts_retries: a.nts_retries,
        })
    }
}

/// An error the operator must fix before the peer can run (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct SetupError(pub anyhow::Error);

impl SetupError {
    /// Marks `e` as a setup error.
    pub fn wrap(e: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(SetupError(e))
    }
}

/// Resolves `host:port` to an IPv4 endpoint (the wire protocol is IPv4 only).
pub fn resolve_v4(s: &str) -> Result<SocketAddrV4, String> {
    let addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?;
    addrs
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| "no IPv4 address (P2PSP is IPv4 only)".to_owned())
}

/// Resolves a comma-separated list of `host:port`, each host to all its IPv4 addresses, in
/// order, without duplicates; at least one.
pub fn resolve_all_v4(s: &str) -> Result<Vec<SocketAddrV4>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err("an empty entry in the list".to_owned());
        }
        let v4: Vec<SocketAddrV4> = part
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {part}: {e}"))?
            .filter_map(|a| match a {
                SocketAddr::V4(v4) => Some(v4),
                SocketAddr::V6(_) => None,
            })
            .collect();
        if v4.is_empty() {
            return Err(format!("{part}: no IPv4 address (P2PSP is IPv4 only)"));
        }
        for a in v4 {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

/// Joins the splitter and runs until `stop` (then leaves politely) or an error. When the stream
/// stalls (the splitter stopped, restarted, or removed this peer) it says why, joins again with
/// backoff and keeps its players connected, until `--give-up-after`.
///
/// Errors before the peer has first joined (a player or metrics port in use, a splitter that
/// cannot be reached or refuses) are [`SetupError`]s: the operator's to fix.
pub fn run(opts: PeerOptions, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let player_listener = match opts.player {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for players on {addr}"))
                .map_err(SetupError::wrap)?,
        ),
        None => None,
    };
    if let Some(addr) = opts.metrics {
        let endpoint = crate::metrics::Endpoint::bind(addr).map_err(SetupError::wrap)?;
        let bound = endpoint.local_addr();
        endpoint.serve(Arc::new(status::PeerExporter::new(&opts)), stop.clone())?;
        if opts.status.is_some() {
            eprintln!("p2psp peer metrics on http://{bound}/");
        }
    }
    let mut rng = Xorshift::new(opts.faults.seed ^ u64::from(std::process::id()));
    let mut choice = Choice::new(&opts.splitters());
    let (mut at, mut joined) =
        join_best(&opts, &mut choice, JOIN_TIMEOUT, &mut rng).map_err(SetupError::wrap)?;
    choice.on_joined(at);
    opts.counters.set_splitter(at);
    // Where players that connect get the stream header: the current splitter's header endpoint
    // (updated when the peer joins another).
    let refetch_of = |j: &join::Joined| player::Refetch {
        source: j.header_source,
        channel: j.config.channel.clone(),
        size: usize::from(j.config.header_size),
    };
    let refetch = Arc::new(Mutex::new(refetch_of(&joined)));
    let (tx, player) = player::spawn(
        player_listener,
        opts.output.clone(),
        std::mem::take(&mut joined.header),
        Some(refetch.clone()),
        opts.counters.clone(),
        stop.clone(),
    )?;
    let mut totals = PeerStats::default();
    let mut playout = Playout::default();
    let outcome = loop {
        let end = session(
            &opts,
            at,
            choice.has_alternatives(),
            joined,
            &tx,
            &stop,
            &mut totals,
            &mut playout,
        );
        let stall = match end {
            Ok(SessionEnd::Left) => break Ok(()),
            Ok(SessionEnd::Stalled(stall)) => stall,
            Err(e) => break Err(e),
        };
        if let Some(name) = &opts.status {
            eprintln!("{name}: {}; joining again", stall.describe());
        } else {
            tracing::warn!("{}; joining again", stall.describe());
        }
        choice.on_stalled(Instant::now());
        match rejoin_with_backoff(&opts, &mut choice, &stop, &mut rng) {
            Ok(Some((a, j))) => {
                if choice.on_joined(a) {
                    opts.counters.failovers.fetch_add(1, Ordering::Relaxed);
                    playout.failover_from = Some(playout.last_play.unwrap_or_else(Instant::now));
                    if let Some(name) = &opts.status {
                        eprintln!("{name}: failed over from {at} to {a}");
                    } else {
                        tracing::warn!("failed over from splitter {at} to {a}");
                    }
                }
                at = a;
                opts.counters.set_splitter(a);
                *refetch.lock().unwrap_or_else(|e| e.into_inner()) = refetch_of(&j);
                joined = j;
                let header = std::mem::take(&mut joined.header);
                let _ = tx.send(player::ToPlayer::Rejoined(header));
                opts.counters.rejoins.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    stop.store(true, Ordering::SeqCst);
    let _ = player.join();
    outcome
}

/// How long the splitter may take to answer the first join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a splitter may take to answer the load probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// The longest stall timeout when the peer has other splitters to go to: a failover must be
/// over within 5 s (docs/scale-out.md).
const FAILOVER_STALL_TIMEOUT: Duration = Duration::from_secs(2);

impl PeerOptions {
    /// Every splitter the peer may join, the first first.
    pub fn splitters(&self) -> Vec<SocketAddrV4> {
        std::iter::once(self.splitter)
            .chain(self.more_splitters.iter().copied())
            .collect()
    }
}

/// Playout across team sessions, to time failovers.
#[derive(Debug, Default)]
struct Playout {
    /// When the last chunk played.
    last_play: Option<Instant>,
    /// Set after a failover: when playout stopped on the old splitter.
    failover_from: Option<Instant>,
}

/// Asks every splitter of `choice` for its load at once and tells `choice` the answers.
fn probe_all(choice: &mut Choice) {
    let list: Vec<SocketAddrV4> = choice.splitters().collect();
    choice.forget_loads();
    let answers: Vec<_> = std::thread::scope(|s| {
        let probes: Vec<_> = list
            .iter()
            .map(|&a| s.spawn(move || (a, join::probe_load(a, PROBE_TIMEOUT))))
            .collect();
        probes.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for (a, answer) in answers {
        match answer {
            Ok(load) => choice.on_load(a, load),
            Err(e) => {
                tracing::info!("load probe: {e:#}");
                choice.on_failed(Instant::now(), a);
            }
        }
    }
}

/// Joins `splitter` with the profile `opts` says (DBS, with or without NTS).
fn join_at(
    opts: &PeerOptions,
    splitter: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<join::Joined> {
    if opts.ims {
        // Signed IMS teams sign each chunk (`--ims` refuses digests): the chunks are longer.
        let trailer = if opts.splitter_key.is_some() {
            crate::proto::integrity::SIGNATURE_LEN
        } else {
            0
        };
        ims::join(splitter, timeout, trailer)
    } else {
        join::join_profile_with(
            splitter,
            opts.monitor,
            timeout,
            opts.nts,
            opts.ems,
            opts.nts_retries,
        )
    }
}

/// Joins a splitter of `choice`: with one, that one; with several, the least loaded, then the
/// others in [`Choice::order`] until one takes the peer. Each may take `timeout`.
fn join_best(
    opts: &PeerOptions,
    choice: &mut Choice,
    timeout: Duration,
    rng: &mut Xorshift,
) -> anyhow::Result<(SocketAddrV4, join::Joined)> {
    if !choice.has_alternatives() {
        let j = join_at(opts, opts.splitter, timeout)?;
        return Ok((opts.splitter, j));
    }
    probe_all(choice);
    let mut errors = Vec::new();
    for a in choice.order(Instant::now(), rng.next_u64()) {
        match join_at(opts, a, timeout) {
            Ok(j) => return Ok((a, j)),
            Err(e) => {
                tracing::info!("joining {a}: {e:#}");
                choice.on_failed(Instant::now(), a);
                errors.push(format!("{e:#}"));
            }
        }
    }
    anyhow::bail!(
        "none of the {} splitters took the peer: {}",
        errors.len(),
        errors.join("; ")
    )
}

/// How a team session ended.
enum SessionEnd {
    /// The peer left politely (asked to stop).
    Left,
    /// The stream stopped arriving.
    Stalled(Stall),
}

/// Joins again after a stall: attempt k waits [`Backoff::delay`] first. `Ok(None)`: asked to
/// stop meanwhile. Fails after `--give-up-after`.
fn rejoin_with_backoff(
    opts: &PeerOptions,
    choice: &mut Choice,
    stop: &AtomicBool,
    rng: &mut Xorshift,
) -> anyhow::Result<Option<(SocketAddrV4, join::Joined)>> {
    /// A rejoin attempt that takes longer is abandoned for the next one.
    const REJOIN_TIMEOUT: Duration = Duration::from_secs(3);
    let backoff = Backoff::default();
    let since = Instant::now();
    let mut attempt = 0u32;
    let result = loop {
        attempt += 1;
        opts.counters
            .rejoin_attempt
            .store(u64::from(attempt), Ordering::Relaxed);
        // With other splitters to go to, the first attempt goes at once.
        let delay = if attempt == 1 && choice.has_alternatives() {
            Duration::ZERO
        } else {
            backoff.delay(attempt, rng.next_f64())
        };
        let wake = Instant::now() + delay;
        while Instant::now() < wake {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(limit) = opts.liveness.give_up_after
            && since.elapsed() >= limit
        {
            break Err(anyhow::anyhow!(
                "gave up: no team for {:.0?} after {} attempts to join {} again (--give-up-after)",
                since.elapsed(),
                attempt - 1,
                choice
                    .splitters()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        if let Some(name) = &opts.status {
            eprintln!("{name}: rejoining (attempt {attempt})");
        }
        match join_best(opts, choice, REJOIN_TIMEOUT, rng) {
            Ok(j) => break Ok(Some(j)),
            Err(e) => {
                if let Some(name) = &opts.status {
                    eprintln!("{name}: rejoining (attempt {attempt}) failed: {e:#}");
                }
            }
        }
    };
    opts.counters.rejoin_attempt.store(0, Ordering::Relaxed);
    result
}

/// One team session: from a completed join until the peer leaves or the stream stalls. Counters
/// of earlier sessions are in `totals` (this one's are added when it ends).
#[allow(clippy::too_many_arguments)]
fn session(
    opts: &PeerOptions,
    splitter: SocketAddrV4,
    alternatives: bool,
    mut joined: join::Joined,
    tx: &crossbeam_channel::Sender<player::ToPlayer>,
    stop: &AtomicBool,
    totals: &mut PeerStats,
    playout: &mut Playout,
) -> anyhow::Result<SessionEnd> {
    let config = joined.config.clone();
    let me = joined.local;
    opts.counters
        .port
        .store(u64::from(me.port()), Ordering::Relaxed);

    // The playout ring must be a power of two so that `chunk number % size` stays continuous at
    // the 65535 → 0 wrap; a reference splitter may announce any size, so round it up.
    let buffer = config.buffer_size.next_power_of_two();
    let mut rules = PeerRules::new(splitter, usize::from(config.chunk_size), buffer);
    rules.monitor = opts.monitor;
    rules.max_debt = opts.max_debt;
    rules.request_lost = opts.lrs;
    rules.relay = !opts.faults.free_ride;
    rules.verify = opts.splitter_key;
    let mut ims = joined.ims.take();
    if ims.is_some() {
        // IMS: chunks come from the group; nobody is relayed to (the filter lets no neighbour in).
        rules.relay = false;
        rules.monitor = false;
        rules.request_lost = false;
    }
    let ims_before = *opts.counters.ims.lock().unwrap_or_else(|e| e.into_inner());
    *opts
        .counters
        .ims_group
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = ims.as_ref().map(|i| i.group);
    let mut polluter = opts.pollute.clone().map(|m| {
        let len = crate::proto::wire::CHUNK_HEADER + usize::from(config.chunk_size);
        attack::Polluter::new(m, Instant::now(), len)
    });
    let mut drops = Xorshift::new(opts.faults.seed);
    let mut core = Peer::new(rules, &config.peers, config.monitors);
    let socket = joined.socket.try_clone()?;
    socket.set_read_timeout(Some(Duration::from_millis(10)))?;
    let mut nts = joined.nts.take();
    if let Some(n) = &mut nts {
        n.start(Instant::now(), &mut core);
    }
    // Hellos first, then the ready byte: see `Joined::ready`.
    while let Some(t) = core.poll_transmit() {
        let from = nts.as_ref().map_or(&socket, |n| n.route(&socket, t.dest));
        let _ = from.send_to(&t.payload, t.dest);
    }
    joined.ready();
    // Under systemd (`Type=notify`): joined.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(name) = &opts.status {
        let team = match &ims {
            Some(i) => format!("multicast group {}, relaying nothing", i.group),
            None => format!("team of {}", config.peers.len() + 1),
        };
        eprintln!(
            "{name} {me}: joined {} as {} ({team}, chunk {} B, buffer {} chunks)",
            splitter,
            match (&ims, opts.monitor) {
                (Some(_), _) => "IMS peer",
                (None, true) => "monitor",
                (None, false) => "peer",
            },
            config.chunk_size,
            config.buffer_size
        );
        if let Some(n) = &nts {
            let c = n.counters();
            eprintln!(
                "{name} {me}: NTS ID {}, incorporated in {:.0?}{}: {} teammates reached ({} direct, {} predicted, {} announced), {} not",
                n.core.id(),
                n.incorporation,
                match c.retries {
                    0 => String::new(),
                    k => format!(
                        " after {k} retr{} from a new port",
                        if k == 1 { "y" } else { "ies" }
                    ),
                },
                n.neighbours.len(),
                c.direct,
                c.predicted,
                c.announced,
                c.unreached
            );
        }
    }
    // With other splitters to go to, a stalled peer goes there sooner.
    let cap = |t: Duration| {
        if alternatives {
            t.min(FAILOVER_STALL_TIMEOUT)
        } else {
            t
        }
    };
    let mut watchdog = Watchdog::new(
        Instant::now(),
        opts.liveness
            .stall_timeout
            .unwrap_or_else(|| cap(rejoin::stall_timeout(0.0, buffer))),
    );

    let mut buf = vec![0u8; 65536];
    let mut next_status = Instant::now() + Duration::from_secs(1);
    // The neighbour set last published on /status, and the last second's rates: the detail is
    // published once a second and at once when a neighbour comes or goes.
    let mut published_neighbours = None;
    let mut rates = [0.0; 4];
    let mut last_tick = Instant::now();
    let mut last = *totals + *core.stats();
    let mut peak_rate = 0.0;
    let end = loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) {
            core.leave(now);
        }
        let received = match &mut ims {
            Some(i) => i.recv(&socket, &mut buf, Duration::from_millis(10)),
            None => socket.recv_from(&mut buf),
        };
        if let Some(i) = &ims {
            *opts.counters.ims.lock().unwrap_or_else(|e| e.into_inner()) =
                ims_before + i.counters();
        }
        match received {
            Ok((_, SocketAddr::V4(_)))
                if opts.faults.drop_rate > 0.0 && drops.next_f64() < opts.faults.drop_rate =>
            {
                opts.counters.injected_drops.fetch_add(1, Ordering::Relaxed);
            }
            Ok((n, SocketAddr::V4(from)))
                if nts.as_mut().is_some_and(|s| {
                    s.handle_datagram(now, from, &buf[..n], &socket, &mut core)
                }) => {}
            Ok((n, SocketAddr::V4(from))) => {
                let before = *core.stats();
                core.handle_datagram(now, from, Bytes::copy_from_slice(&buf[..n]));
                let after = *core.stats();
                if after.chunks_received > before.chunks_received {
                    watchdog.on_chunk(now, after.from_splitter > before.from_splitter);
                }
                *opts
                    .counters
                    .stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = *totals + after;
            }
            Ok(_) => {}
            Err(e) if is_transient(&e) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => break Err(anyhow::anyhow!("UDP receive failed: {e}")),
        }
        // What a teammate reached by port probing sent to the socket kept for it (issue 11).
        if let Some(n) = &mut nts {
            for (from, d) in n.probe_datagrams(now, &mut buf) {
                if n.handle_datagram(now, from, &d, &socket, &mut core) {
                    continue;
                }
                let before = *core.stats();
                core.handle_datagram(now, from, Bytes::from(d));
                let after = *core.stats();
                if after.chunks_received > before.chunks_received {
                    watchdog.on_chunk(now, after.from_splitter > before.from_splitter);
                }
            }
        }
        core.handle_timeout(Instant::now());
        if let Some(n) = &mut nts {
            n.handle_timeout(Instant::now(), &socket, &mut core);
            if let Some(p) = &n.probe {
                let c = p.core.counters();
                for (a, v) in opts.counters.nat_probe.iter().zip([
                    c.sessions,
                    c.reached,
                    c.failed,
                    c.strays + c.refused,
                ]) {
                    a.store(v, Ordering::Relaxed);
                }
            }
        }
        while let Some(t) = core.poll_transmit() {
            let payload = match &mut polluter {
                Some(p) => {
                    let first = p.first_bad.is_none();
                    let d = p.outgoing(now, t.dest, t.payload);
                    if first && p.first_bad.is_some() {
                        eprintln!("{me}: pollute: first bad chunk, to {}", t.dest);
                    }
                    d
                }
                None => Some(t.payload),
            };
            // A neighbour that vanished answers with ICMP; that is the debt rule's job.
            if let Some(payload) = payload {
                let from = nts.as_ref().map_or(&socket, |n| n.route(&socket, t.dest));
                let _ = from.send_to(&payload, t.dest);
            }
        }
        if let Some(p) = &mut polluter {
            let first = p.first_bad.is_none();
            for c in p.bad_mouth(now, core.neighbours().map(|n| n.0)) {
                let _ = socket.send_to(&c, splitter);
            }
            if first && p.first_bad.is_some() {
                eprintln!("{me}: pollute: first false complaints");
            }
        }
        let mut left = false;
        let mut fatal = None;
        while let Some(e) = core.poll_event() {
            match e {
                // Once asked to stop, the peer only relays until it has said goodbye: what it
                // would still play is not wanted, and no longer recovered (the splitter may
                // already have let it go).
                PeerEvent::Play { .. } if stop.load(Ordering::Relaxed) => {}
                PeerEvent::Play { number, payload } => {
                    let now = Instant::now();
                    if let Some(from) = playout.failover_from.take() {
                        let c = &opts.counters;
                        let gap = now.saturating_duration_since(from).as_millis() as u64;
                        c.failover_gap_ms.store(gap, Ordering::Relaxed);
                        let unix = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64);
                        c.failover_resumed_ms.store(unix, Ordering::Relaxed);
                    }
                    playout.last_play = Some(now);
                    let overrun = tx
                        .try_send(player::ToPlayer::Chunk(player::Played { number, payload }))
                        .is_err();
                    opts.counters
                        .player_overruns
                        .fetch_add(u64::from(overrun), Ordering::Relaxed);
                }
                PeerEvent::Left { confirmed } => {
                    tracing::info!(
                        "left the team ({})",
                        if confirmed {
                            "confirmed by the splitter"
                        } else {
                            "the splitter did not answer"
                        }
                    );
                    left = true;
                }
                PeerEvent::SplitterGoodbye => watchdog.on_splitter_goodbye(),
                PeerEvent::Polluter { peer, number } => tracing::warn!(
                    "{peer} sent chunk {number} with a bad signature: dropped, banned and reported to the splitter"
                ),
                PeerEvent::IntegrityMismatch(m) => {
                    fatal = Some(SetupError::wrap(anyhow::anyhow!("{m}")));
                }
                PeerEvent::NeighbourRemoved {
                    peer,
                    reason: Removal::Debt,
                } => {
                    tracing::info!(
                        "dropped neighbour {peer}: it does not relay (chunk debt over the limit, {} or 8 on probation)",
                        opts.max_debt
                    );
                }
                PeerEvent::Lost { number } => tracing::debug!("lost chunk {number}"),
                PeerEvent::Skipped { count } => {
                    tracing::warn!("skipped {count} chunks: the splitter jumped ahead")
                }
                _ => {}
            }
        }
        let s = *totals + *core.stats();
        let c = &opts.counters;
        c.played.store(s.played, Ordering::Relaxed);
        c.lost.store(s.lost, Ordering::Relaxed);
        c.relayed.store(s.relayed, Ordering::Relaxed);
        c.received.store(s.chunks_received, Ordering::Relaxed);
        c.neighbours
            .store(core.neighbours().count() as u64, Ordering::Relaxed);
        c.detail.set_buffered(core.buffered());
        let tick = now >= next_status;
        let neighbour_set = status::neighbour_fingerprint(core.neighbours().map(|(e, _)| e));
        if tick {
            let dt = now.duration_since(last_tick).as_secs_f64().max(1e-3);
            last_tick = now;
            next_status = now + Duration::from_secs(1);
            let rate = (s.chunks_received - last.chunks_received) as f64 / dt;
            // The stream's rate is its highest over whole seconds: a stall lowers the rate of
            // the second it begins in, and must not lengthen the timeout that detects it.
            if opts.liveness.stall_timeout.is_none() && rate > peak_rate {
                peak_rate = rate;
                watchdog.set_timeout(cap(rejoin::stall_timeout(rate, buffer)));
            }
            rates = [
                (s.played - last.played) as f64 / dt,
                rate,
                (s.relayed - last.relayed) as f64 / dt,
                (s.lost - last.lost) as f64 / dt,
            ];
        }
        if tick || published_neighbours != Some(neighbour_set) {
            published_neighbours = Some(neighbour_set);
            opts.counters.detail.publish(status::PeerDetail {
                me: Some(me),
                chunk_size: config.chunk_size,
                buffer_size: config.buffer_size,
                playing: core.is_playing(),
                stats: s,
                neighbours: core.neighbours().collect(),
                rates,
                nts: nts.as_ref().map(|n| n.detail()),
            });
        }
        if tick {
            if let Some(name) = &opts.status {
                // NTS: how the teammates are reached.
                let nts_part = nts.as_ref().map_or(String::new(), |n| {
                    let mut t = format!(" | NTS teammates: {}", n.detail().summary());
                    if s.forwarded > 0 {
                        t += &format!(", {} chunks forwarded", s.forwarded);
                    }
                    t
                });
                eprintln!(
                    "{name} {me}: {} | played {} (+{}) lost {} late {} dup {} | received {} relayed {} | {} neighbours | player overruns {}{}{nts_part} | splitter {splitter}, {} failovers",
                    if core.is_playing() {
                        "playing"
                    } else {
                        "buffering"
                    },
                    s.played,
                    s.played - last.played,
                    s.lost,
                    s.late,
                    s.duplicates,
                    s.chunks_received,
                    s.relayed,
                    core.neighbours().count(),
                    c.player_overruns.load(Ordering::Relaxed),
                    ims.as_ref().map_or(String::new(), |i| {
                        let k = ims_before + i.counters();
                        format!(
                            " | IMS {}: {} chunks, dropped {}",
                            i.group,
                            k.group_chunks,
                            k.dropped()
                        )
                    }),
                    c.failovers.load(Ordering::Relaxed),
                );
            }
            last = s;
        }
        if let Some(e) = fatal {
            break Err(e);
        }
        if left {
            break Ok(SessionEnd::Left);
        }
        if !stop.load(Ordering::Relaxed)
            && let Some(stall) = watchdog.check(now)
        {
            break Ok(SessionEnd::Stalled(stall));
        }
    };
    *totals = *totals + *core.stats();
    if let Ok(SessionEnd::Stalled(_)) = end {
        // If the splitter is still there (it removed us, or lost us), its old entry for us goes
        // at its next round boundary instead of waiting for loss reports.
        let _ = socket.send_to(crate::proto::wire::GOODBYE, splitter);
    }
    drop::<UdpSocket>(socket);
    drop(joined);
    end
}

/// A small seeded generator for `--drop-rate` (xorshift64*): reproducible, no dependency.
struct Xorshift(u64);

impl Xorshift {
    fn new(seed: u64) -> Xorshift {
        // Never zero, and different seeds start far apart.
        Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Uniform over u64.
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::{Xorshift, resolve_all_v4};

    #[test]
    fn splitter_lists_resolve_in_order_without_duplicates() {
        let l = resolve_all_v4("127.0.0.1:8001, 127.0.0.2:8001,127.0.0.1:8001").unwrap();
        assert_eq!(
            l.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["127.0.0.1:8001", "127.0.0.2:8001"]
        );
        assert!(
            resolve_all_v4("127.0.0.1:8001,")
                .unwrap_err()
                .contains("empty")
        );
        assert!(resolve_all_v4("[::1]:8001").unwrap_err().contains("IPv4"));
        assert!(resolve_all_v4("127.0.0.1").is_err(), "no port");
    }

    #[test]
    fn drop_choices_are_seeded_and_near_the_rate() {
        let count = |seed| {
            let mut r = Xorshift::new(seed);
            (0..100_000).filter(|_| r.next_f64() < 0.02).count()
        };
        assert_eq!(count(7), count(7));
        assert_ne!(count(7), count(8));
        assert!((1800..2200).contains(&count(7)), "{}", count(7));
    }
}
