//! The splitter's flags, checked once and turned into [`Settings`].

use std::net::{Ipv4Addr, SocketAddrV4};

use clap::Args;

use super::source::SourceSpec;
use crate::driver::SendPath;
pub use crate::media::HeaderSize;
use crate::proto::wire::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// `--thread-slice`: a scheduler slice, or `off` (the kernel's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSlice(pub Option<std::time::Duration>);

/// Parses `--thread-slice`: `off`, or a duration in `us` or `ms` (`300us`, `0.5ms`) from 100 µs
/// to 100 ms, the range the kernel takes.
pub fn parse_slice(s: &str) -> Result<ThreadSlice, String> {
    let t = s.trim();
    if t == "off" {
        return Ok(ThreadSlice(None));
    }
    let not_a_slice =
        || format!("`{s}` is not a slice: give `off` or a duration such as 300us or 1ms");
    let (num, ns_per_unit) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e6)
    } else {
        return Err(not_a_slice());
    };
    let v: f64 = num.trim().parse().map_err(|_| not_a_slice())?;
    let ns = (v * ns_per_unit).round();
    if !(100_000.0..=100_000_000.0).contains(&ns) {
        return Err(format!(
            "--thread-slice `{s}` must be between 100us and 100ms (or off)"
        ));
    }
    Ok(ThreadSlice(Some(std::time::Duration::from_nanos(
        ns as u64,
    ))))
}

/// Parses `--rt-priority`: `off`, or a `SCHED_FIFO` priority from 1 to 99.
pub fn parse_rt_priority(s: &str) -> Result<RtPriority, String> {
    let t = s.trim();
    if t == "off" {
        return Ok(RtPriority(None));
    }
    match t.parse::<u8>() {
        Ok(p @ 1..=99) => Ok(RtPriority(Some(p))),
        _ => Err(format!(
            "`{s}` is not a real-time priority: give `off` or a number from 1 to 99"
        )),
    }
}

/// `--rt-priority`: a `SCHED_FIFO` priority, or `off` (the fair scheduler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtPriority(pub Option<u8>);

/// How the threads that put chunks on the wire (shards, feed, signer) are scheduled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireSched {
    /// Fair-scheduler slice (`--thread-slice`); `None`: the kernel's default.
    pub slice: Option<std::time::Duration>,
    /// Real-time priority (`--rt-priority`); `None`: fair class. Takes precedence over the
    /// slice, which only applies to fair-class threads.
    pub rt_priority: Option<u8>,
}

/// Flags of `p2psp splitter`.
#[derive(Debug, Clone, Args)]
pub struct SplitterArgs {
    /// Where the stream comes from: `test` (built-in test pattern), `-` (stdin) or
    /// `http://host:port/mount` (an Icecast mount or any HTTP stream).
    #[arg(long, default_value = "test", value_name = "SOURCE")]
    pub source: String,
    /// Rate of the test source, in bits per second (suffixes k, M, G: `2M`).
    #[arg(long, default_value = "1M", value_parser = parse_bitrate, value_name = "BITS/S")]
    pub bitrate: u64,
    /// Port for TCP joins and UDP chunks (one port for both, as the reference).
    #[arg(long, default_value_t = 8001)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", value_name = "IPV4")]
    pub bind: Ipv4Addr,
    /// Payload bytes per chunk (at least 64: shorter ones could be taken for control messages).
    #[arg(long, default_value_t = 1024)]
    pub chunk_size: usize,
    /// Peers' playout buffer in chunks: a power of two (it must divide 65536).
    #[arg(long, default_value_t = 256)]
    pub buffer_size: u32,
    /// The stream header every joining peer gets for its players: `auto` derives it from the
    /// container (Ogg: the codec header pages; WebM/Matroska: everything before the first Cluster;
    /// MPEG-TS, MP3, AAC: none); a number takes exactly that many bytes of the stream start, as
    /// the reference splitter (0: none).
    #[arg(long, default_value = "auto", value_name = "auto|BYTES")]
    pub header_size: HeaderSize,
    /// Most peers per team. A new peer joins the team with the most free room, or a new team.
    #[arg(long, default_value_t = 16)]
    pub team_size: usize,
    /// Monitors per team: the first peers that say they are monitors (`p2psp peer --monitor`).
    #[arg(long, default_value_t = 1)]
    pub monitors: usize,
    /// Sending threads, each pinned to a core and owning a share of the teams [default: one per
    /// core].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Channel name peers use to fetch the stream header [default: the source's mount, or `test`
    /// or `stdin`].
    #[arg(long)]
    pub channel: Option<String>,
    /// UDP send path: `auto` (io_uring where the kernel allows it), `io_uring` or `sendmmsg`.
    #[arg(long = "io", default_value = "auto", value_name = "PATH")]
    pub io: String,
    /// Scheduler time slice of the shards and the feed (Linux 6.12+ fair scheduler, 100us to
    /// 100ms): with a slice shorter than the kernel's default (about 1.5 ms on two cores), a
    /// shard woken by a new chunk runs at once on a busy core instead of after the running
    /// thread's slice, so chunks leave sooner. It gives the threads no more CPU time. `off`
    /// keeps the kernel's default (docs/operations.md, "Latency").
    #[arg(long, default_value = "off", value_parser = parse_slice, value_name = "DURATION|off")]
    pub thread_slice: ThreadSlice,
    /// Run the shards, the feed and the signer in the real-time `SCHED_FIFO` class at this
    /// priority (1-99): a new chunk is sent as soon as it is read, before any ordinary process
    /// on those cores runs, which cuts the latency tail on a busy machine. Needs root or
    /// CAP_SYS_NICE (checked at start). The kernel still leaves 5 % of each core to others.
    /// `off`: the ordinary scheduler (docs/operations.md, "Latency").
    #[arg(long, default_value = "off", value_parser = parse_rt_priority, value_name = "1-99|off")]
    pub rt_priority: RtPriority,
    /// Expel a peer when this fraction of its own chunks is reported lost, both among its last
    /// 16 judged chunks and over the last seconds (docs/recovery.md, "Expulsion"). Monitors are
    /// never expelled.
    #[arg(long, default_value_t = 0.5, value_name = "FRACTION")]
    pub expel_fraction: f32,
    /// ...and at least this many of its last 16 judged chunks are lost.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub expel_min_losses: u32,
    /// Lost-chunk recovery (LRS): resend each chunk a monitor reports lost to that monitor, which
    /// relays it to its team in time for the other peers (monitors play half a buffer earlier).
    #[arg(long)]
    pub lrs: bool,
    /// Adaptive chunk rate (ACS): a peer blamed for lost chunks gets chunks to relay less often
    /// (one more round between its chunks per loss, one less every second).
    #[arg(long)]
    pub acs: bool,
    /// NAT traversal (NTS, reference-notes §6.4), as the reference's default build: peers get a
    /// 7-character ID, say hello over UDP first and are incorporated once the splitter and the
    /// monitors have seen them, so that peers behind NATs are reached. Peers must run with
    /// `--nts` too (the wire cannot announce it; a peer with the wrong profile stops and says so).
    #[arg(long)]
    pub nts: bool,
    /// IP multicast for a LAN team (IMS, reference-notes §6.1), as the reference's IMS build:
    /// every chunk goes once to this IPv4 multicast group and port (`239.0.0.1:8001`; the
    /// reference's default is 224.0.0.1:8001), whatever the number of peers; peers join with
    /// `p2psp peer --ims`, listen to the group and relay nothing. Uses one shard, no monitors
    /// and no loss reports; chunks leave by the interface of `--bind` (or the route to the group).
    #[arg(long, value_name = "GROUP:PORT")]
    pub ims: Option<String>,
    /// With `--ims`: the multicast TTL (hops), 1 to keep the chunks on the LAN.
    #[arg(long, default_value_t = crate::proto::ims::DEFAULT_TTL, value_name = "HOPS")]
    pub ims_ttl: u32,
    /// EMS (reference-notes §6.5, needs `--nts`): peers join with their private endpoint (a
    /// 7-byte join message instead of the role byte), and a peer is told of teammates behind the
    /// same NAT (same public address) by their private endpoints, so that they reach each other
    /// over their LAN whether or not the NAT hair-pins. Peers must run with `--ems` too.
    #[arg(long, requires = "nts")]
    pub ems: bool,
    /// Most peers over all teams; a join over the limit is refused (the connection is closed
    /// before the configuration, and the splitter logs why). 0: no limit.
    #[arg(long, default_value_t = 100_000)]
    pub max_peers: usize,
    /// Most TCP connections in the middle of a join or a stream-header request. When full, the
    /// oldest connection that has not sent a byte yet makes room, or the new one is closed.
    #[arg(long, default_value_t = 1024)]
    pub max_pending_joins: usize,
    /// Most such connections from one IPv4 address.
    #[arg(long, default_value_t = 64)]
    pub max_pending_per_ip: usize,
    /// Seconds a connection may take to join or to fetch the stream header.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub join_timeout: f64,
    /// Sign the stream with the Ed25519 key in this file (CIS, docs/integrity.md), created with
    /// mode 0600 on first use; the public key is printed on stderr for the peers'
    /// `--splitter-key`. Peers without the key cannot join.
    #[arg(long, value_name = "KEYFILE")]
    pub sign: Option<std::path::PathBuf>,
    /// With `--sign`: `digest` signs one digest per group of chunks (a 16-byte hash per chunk,
    /// sent ahead of the group; chunks stay compat-sized; a peer checks one signature per group),
    /// `chunk` appends a 64-byte signature to every chunk (a peer checks every one).
    #[arg(long, value_enum, default_value_t = super::signing::SignMode::Digest, requires = "sign")]
    pub sign_mode: super::signing::SignMode,
    /// With `--sign-mode digest`: milliseconds a group of chunks stays open for more chunks; a
    /// group of one waits for a second chunk up to twice this, or, on a stream slower than that,
    /// one and a half times the time between chunks, at most 1 s (a digest of one chunk costs 88
    /// bytes on the wire, of two 52), so signing adds at most that to a chunk's latency.
    #[arg(long, default_value_t = 20.0, value_name = "MS")]
    pub digest_window: f64,
    /// With `--sign-mode digest`: most chunks per group (1 to 32).
    #[arg(long, default_value_t = 32, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=32))]
    pub digest_max: u8,
    /// With `--sign`: a peer whose complaints about a polluter expel it at once (STrPe), as
    /// monitors' do; others need a majority of the team. Repeat for more.
    #[arg(long, value_name = "ADDR:PORT", requires = "sign")]
    pub trusted: Vec<SocketAddrV4>,
    /// Testing only: number of the first chunk (to test the 65535 → 0 wrap).
    #[arg(long, default_value_t = 0, hide = true)]
    pub first_chunk_number: u16,
    /// `--config` and `--metrics`.
    #[command(flatten)]
    pub service: crate::config::ServiceArgs,
}

impl Default for SplitterArgs {
    /// The flags' own defaults, as `p2psp splitter` with no flags gets them (one source of truth
    /// for code that starts a splitter in-process: the demo, tests).
    fn default() -> Self {
        use clap::FromArgMatches;
        let cmd = SplitterArgs::augment_args(clap::Command::new("splitter").no_binary_name(true));
        let matches = cmd
            .try_get_matches_from(std::iter::empty::<String>())
            .expect("every splitter flag has a default");
        SplitterArgs::from_arg_matches(&matches).expect("defaults parse")
    }
}

/// Parses `2000000`, `2M`, `500k`, `1.5M`, `2Mbit`, `2Mbps` into bits per second.
pub fn parse_bitrate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .trim_end_matches("bps")
        .trim_end_matches("bit/s")
        .trim_end_matches("bit")
        .trim_end_matches("b/s");
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a bit rate (try 2M or 500k)"))?;
    let bits = v * mult;
    if !(bits.is_finite() && bits >= 8.0) {
        return Err(format!("bit rate `{s}` must be at least 8 bits per second"));
    }
    if bits > 100e9 {
        return Err(format!("bit rate `{s}` is over 100 Gbit/s"));
    }
    Ok(bits as u64)
}

/// Checked splitter settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The source.
    pub source: SourceSpec,
    /// The source as the user wrote it.
    pub source_text: String,
    /// Test source rate in bits per second.
    pub bitrate: u64,
    /// TCP and UDP listening address.
    pub bind: SocketAddrV4,
    /// Payload bytes per chunk.
    pub chunk_size: usize,
    /// Buffer size in chunks.
    pub buffer_size: u16,
    /// How the stream header is chosen (`--header-size`).
    pub header_size: HeaderSize,
    /// Most peers per team.
    pub team_size: usize,
    /// Monitors per team.
    pub monitors: usize,
    /// Number of shards.
    pub shards: usize,
    /// Channel name.
    pub channel: String,
    /// Send path.
    pub send_path: SendPath,
    /// How the shards, the feed and the signer are scheduled.
    pub wire_sched: WireSched,
    /// When a peer is expelled for its losses.
    pub expulsion: crate::proto::team::Expulsion,
    /// First chunk number.
    pub first_chunk_number: u16,
    /// LRS on.
    pub lrs: bool,
    /// ACS on.
    pub acs: bool,
    /// NTS on.
    pub nts: bool,
    /// EMS on (with NTS).
    pub ems: bool,
    /// Most peers (0: no limit).
    pub max_peers: usize,
    /// Most connections in the middle of a join or header request.
    pub max_pending_joins: usize,
    /// Most such connections per IPv4 address.
    pub max_pending_per_ip: usize,
    /// Time a connection has to join or fetch the header.
    pub join_timeout: std::time::Duration,
    /// Chunks the ring holds.
    pub ring_slots: usize,
    /// UDP socket buffer bytes.
    pub socket_buffer: usize,
    /// Where to serve metrics and the status page.
    pub metrics: Option<std::net::SocketAddr>,
    /// CIS: the key every chunk is signed with.
    pub signer: Option<crate::proto::integrity::ChunkSigner>,
    /// CIS: peers whose complaints expel at once.
    pub trusted: Vec<SocketAddrV4>,
    /// CIS: per chunk or per group (`--sign-mode`).
    pub sign_mode: super::signing::SignMode,
    /// CIS digest mode: `--digest-window`.
    pub digest_window: std::time::Duration,
    /// CIS digest mode: `--digest-max`.
    pub digest_max: usize,
    /// IMS (`--ims`): the group every chunk goes to, and its TTL.
    pub ims: Option<Ims>,
}

/// IMS settings (`--ims`, `--ims-ttl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ims {
    /// The multicast group and port.
    pub group: SocketAddrV4,
    /// Multicast TTL.
    pub ttl: u32,
}

/// Largest stream header: the join message carries its size (plus the HTTP head the splitter
/// adds) in a u16.
pub const MAX_HEADER_SIZE: usize = 60_000;

impl Settings {
    /// Checks the flags; the error is one line naming the flag.
    pub fn from_args(a: &SplitterArgs) -> Result<Settings, String> {
        let source: SourceSpec = a
            .source
            .parse()
            .map_err(|e| format!("--source {}: {e}", a.source))?;
        if !(a.expel_fraction > 0.0 && a.expel_fraction <= 1.0) {
            return Err(format!(
                "--expel-fraction {} must be over 0 and at most 1 (the fraction of a peer's chunks lost at which it is expelled)",
                a.expel_fraction
            ));
        }
        if a.expel_min_losses == 0 || a.expel_min_losses > crate::proto::team::EXPULSION_WINDOW {
            return Err(format!(
                "--expel-min-losses {} must be between 1 and {} (the losses counted among a peer's last {} judged chunks)",
                a.expel_min_losses,
                crate::proto::team::EXPULSION_WINDOW,
                crate::proto::team::EXPULSION_WINDOW
            ));
        }
        if let Some(p) = a.rt_priority.0
            && let Err(e) = crate::driver::check_realtime(p)
        {
            return Err(format!(
                "--rt-priority {p}: the kernel refuses SCHED_FIFO ({e}); run as root, give the binary CAP_SYS_NICE (setcap cap_sys_nice+ep), raise RLIMIT_RTPRIO (ulimit -r {p}), or use --rt-priority off"
            ));
        }
        if a.chunk_size < MIN_CHUNK_SIZE || a.chunk_size > MAX_CHUNK_SIZE {
            return Err(format!(
                "--chunk-size {} must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} (under {MIN_CHUNK_SIZE} chunks could be taken for control messages)",
                a.chunk_size
            ));
        }
        if a.buffer_size < 2 || a.buffer_size > 32768 || !a.buffer_size.is_power_of_two() {
            return Err(format!(
                "--buffer-size {} must be a power of two between 2 and 32768 (it must divide 65536)",
                a.buffer_size
            ));
        }
        if a.team_size == 0 {
            return Err("--team-size must be at least 1".into());
        }
        if a.team_size > a.buffer_size as usize / 2 {
            return Err(format!(
                "--team-size {} is over half of --buffer-size {}: a chunk may wait a whole round at its first peer, so peers need a buffer of at least twice the team size",
                a.team_size, a.buffer_size
            ));
        }
        if let HeaderSize::Bytes(n) = a.header_size
            && n > MAX_HEADER_SIZE
        {
            return Err(format!("--header-size {n} is over {MAX_HEADER_SIZE} bytes"));
        }
        if a.monitors > a.team_size {
            return Err(format!(
                "--monitors {} is more than --team-size {}",
                a.monitors, a.team_size
            ));
        }
        if a.max_pending_joins == 0 || a.max_pending_per_ip == 0 {
            return Err("--max-pending-joins and --max-pending-per-ip must be at least 1".into());
        }
        if !(a.join_timeout >= 0.1 && a.join_timeout <= 600.0) {
            return Err(format!(
                "--join-timeout {} must be between 0.1 and 600 seconds",
                a.join_timeout
            ));
        }
        let cores = core_affinity::get_core_ids()
            .map(|c| c.len())
            .unwrap_or(1)
            .max(1);
        let shards = a.shards.unwrap_or(cores);
        if shards == 0 || shards > 256 {
            return Err(format!("--shards {shards} must be between 1 and 256"));
        }
        let ims = match &a.ims {
            Some(group) => Some(check_ims(a, group)?),
            None => None,
        };
        // IMS: one datagram per chunk needs one sender (each shard would send every chunk).
        let shards = if ims.is_some() { 1 } else { shards };
        let send_path = match a.io.as_str() {
            "auto" => SendPath::detect(),
            other => other.parse().map_err(|e| format!("--io {other}: {e}"))?,
        };
        let channel = match &a.channel {
            Some(c) => c.trim_start_matches('/').to_owned(),
            None => match &source {
                SourceSpec::Test => "test".into(),
                SourceSpec::Stdin => "stdin".into(),
                SourceSpec::Http(u) => u.path.trim_start_matches('/').to_owned(),
            },
        };
        if channel.len() > 1024 || channel.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!(
                "--channel `{channel}` must be a short name without spaces"
            ));
        }
        Ok(Settings {
            source,
            source_text: a.source.clone(),
            bitrate: a.bitrate,
            bind: SocketAddrV4::new(a.bind, a.port),
            chunk_size: a.chunk_size,
            buffer_size: a.buffer_size as u16,
            header_size: a.header_size,
            team_size: a.team_size,
            // IMS peers send no loss reports: a monitor would be a peer like the others.
            monitors: if ims.is_some() { 0 } else { a.monitors },
            shards,
            channel,
            send_path,
            wire_sched: WireSched {
                slice: a.thread_slice.0,
                rt_priority: a.rt_priority.0,
            },
            expulsion: crate::proto::team::Expulsion {
                min_lost: a.expel_min_losses,
                fraction: a.expel_fraction,
            },
            first_chunk_number: a.first_chunk_number,
            lrs: a.lrs,
            acs: a.acs,
            nts: a.nts,
            ems: a.ems,
            max_peers: a.max_peers,
            max_pending_joins: a.max_pending_joins,
            max_pending_per_ip: a.max_pending_per_ip,
            join_timeout: std::time::Duration::from_secs_f64(a.join_timeout),
            ring_slots: 4096,
            socket_buffer: 8 << 20,
            metrics: a.service.metrics,
            signer: match &a.sign {
                Some(path) => {
                    if a.chunk_size + crate::proto::integrity::SIGNATURE_LEN > MAX_CHUNK_SIZE {
                        return Err(format!(
                            "--chunk-size {} leaves no room for the 64-byte signature of --sign",
                            a.chunk_size
                        ));
                    }
                    let (signer, created) = super::signing::load_or_create(path)?;
                    if created {
                        tracing::info!("--sign: created the key file {}", path.display());
                    }
                    Some(signer)
                }
                None => None,
            },
            trusted: a.trusted.clone(),
            sign_mode: a.sign_mode,
            digest_window: {
                if !(0.0..=1000.0).contains(&a.digest_window) {
                    return Err(format!(
                        "--digest-window {} ms: give 0 to 1000 ms",
                        a.digest_window
                    ));
                }
                std::time::Duration::from_secs_f64(a.digest_window / 1000.0)
            },
            digest_max: usize::from(a.digest_max),
            ims,
        })
    }
}

/// Checks `--ims` and its use with the other flags.
fn check_ims(a: &SplitterArgs, group: &str) -> Result<Ims, String> {
    let group = crate::proto::ims::parse_group(group).map_err(|e| format!("--ims {e}"))?;
    if !(1..=255).contains(&a.ims_ttl) {
        return Err(format!(
            "--ims-ttl {} must be between 1 and 255 (1 keeps the chunks on the LAN)",
            a.ims_ttl
        ));
    }
    for (on, flag, why) in [
        (a.nts, "--nts", "IMS peers are on the splitter's LAN"),
        (a.lrs, "--lrs", "IMS peers send no loss reports"),
        (a.acs, "--acs", "IMS peers relay nothing"),
        (
            a.shards.is_some_and(|s| s > 1),
            "--shards over 1",
            "IMS sends each chunk once, from one shard",
        ),
        (
            a.sign.is_some() && a.sign_mode == super::signing::SignMode::Digest,
            "--sign-mode digest",
            "IMS peers relay nothing, so no digest would reach the group (use --sign-mode chunk)",
        ),
    ] {
        if on {
            return Err(format!("--ims cannot be used with {flag}: {why}"));
        }
    }
    Ok(Ims {
        group,
        ttl: a.ims_ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rt_priority_takes_off_and_1_to_99() {
        assert_eq!(parse_rt_priority("off"), Ok(RtPriority(None)));
        assert_eq!(parse_rt_priority("1"), Ok(RtPriority(Some(1))));
        assert_eq!(parse_rt_priority(" 99 "), Ok(RtPriority(Some(99))));
        for bad in ["0", "100", "-1", "high", ""] {
            let e = parse_rt_priority(bad).unwrap_err();
            assert!(e.contains("1 to 99"), "{bad}: {e}");
        }
    }

    #[test]
    fn thread_slice_takes_off_and_microseconds_to_milliseconds() {
        use std::time::Duration;
        assert_eq!(parse_slice("off"), Ok(ThreadSlice(None)));
        assert_eq!(
            parse_slice("100us"),
            Ok(ThreadSlice(Some(Duration::from_micros(100))))
        );
        assert_eq!(
            parse_slice("0.3ms"),
            Ok(ThreadSlice(Some(Duration::from_micros(300))))
        );
        assert_eq!(
            parse_slice("100ms"),
            Ok(ThreadSlice(Some(Duration::from_millis(100))))
        );
        for bad in ["99us", "101ms", "1s", "300", "fast", "-1ms", "NaNus"] {
            let e = parse_slice(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn default_args_are_the_flags_defaults() {
        let a = SplitterArgs::default();
        assert_eq!(
            (a.source.as_str(), a.bitrate, a.port),
            ("test", 1_000_000, 8001)
        );
        assert_eq!(
            (a.chunk_size, a.buffer_size, a.header_size),
            (1024, 256, HeaderSize::Auto)
        );
        assert_eq!(
            (
                a.team_size,
                a.monitors,
                a.expel_fraction,
                a.expel_min_losses
            ),
            (16, 1, 0.5, 2)
        );
        assert_eq!(
            (a.io.as_str(), a.lrs, a.max_peers),
            ("auto", false, 100_000)
        );
        Settings::from_args(&a).unwrap();
    }

    #[test]
    fn bitrates() {
        assert_eq!(parse_bitrate("2M"), Ok(2_000_000));
        assert_eq!(parse_bitrate("500k"), Ok(500_000));
        assert_eq!(parse_bitrate("1.5Mbit"), Ok(1_500_000));
        assert_eq!(parse_bitrate("64000"), Ok(64_000));
        assert!(parse_bitrate("fast").is_err());
        assert!(parse_bitrate("0").is_err());
    }
}
