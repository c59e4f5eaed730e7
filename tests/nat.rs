//! The NAT lab (`tests/natlab`, `docs/nat.md`): first proof that each of its five NAT kinds
//! behaves as its name says (mapping and filtering, with UDP probes), then the real splitter and
//! peers through it. Needs root, `ip` and `nft`: skipped loudly without them, a failure when `CI`
//! is set.

mod natlab;
mod support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use natlab::{Home, Host, Lab, NatKind, lab_possible, recv};

/// What a probe saw of a NAT.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Behaviour {
    /// The home endpoint's private port.
    private_port: u16,
    /// The public endpoints its datagrams to three destinations came from, in order: (A, p1),
    /// (A, p2), (B, p1'), then (A, p1) again.
    mapped: [SocketAddrV4; 4],
    /// Who got through to a fresh mapping made by sending to (A, p1): among "A:p1", "A:p2",
    /// "B:p".
    let_in: BTreeSet<&'static str>,
}

/// A datagram from `from` to `to`, retried (at most 3 times) until `to` sees it; the public
/// endpoint it came from.
fn seen_from(from: &UdpSocket, to: &UdpSocket) -> SocketAddrV4 {
    let dest = to.local_addr().unwrap();
    for _ in 0..3 {
        from.send_to(b"probe", dest).unwrap();
        if let Some((_, seen)) = recv(to, Duration::from_millis(500)) {
            return seen;
        }
    }
    panic!(
        "no probe from {:?} reached {dest}",
        from.local_addr().unwrap()
    );
}

fn probe(public: &Host, home: &Home) -> Behaviour {
    let (a, b) = (public.ips[0], public.ips[1]);
    let a1 = public.udp(a, 0);
    let a2 = public.udp(a, 0);
    let b1 = public.udp(b, 0);
    let h = home.host.udp(home.host.ip(), 0);
    let private_port = h.local_addr().unwrap().port();
    let mapped = [
        seen_from(&h, &a1),
        seen_from(&h, &a2),
        seen_from(&h, &b1),
        seen_from(&h, &a1),
    ];

    // Filtering: a fresh endpoint sends to A:p1 only; then all three try to reach its mapping.
    let h2 = home.host.udp(home.host.ip(), 0);
    let m = seen_from(&h2, &a1);
    for (sock, tag) in [(&a2, "A:p2"), (&b1, "B:p"), (&a1, "A:p1")] {
        sock.send_to(tag.as_bytes(), m).unwrap();
    }
    let mut let_in = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_millis(600);
    while let_in.len() < 3 && Instant::now() < deadline {
        if let Some((bytes, _)) = recv(&h2, Duration::from_millis(100)) {
            for tag in ["A:p1", "A:p2", "B:p"] {
                if bytes == tag.as_bytes() {
                    let_in.insert(tag);
                }
            }
        }
    }
    Behaviour {
        private_port,
        mapped,
        let_in,
    }
}

/// Checks `seen` against what `kind` must do; the problems found.
fn check(kind: NatKind, wan: Ipv4Addr, seen: &Behaviour) -> Vec<String> {
    let mut problems = Vec::new();
    let m = seen.mapped;
    if m.iter().any(|e| *e.ip() != wan) {
        problems.push(format!("not all mapped to the NAT's address {wan}"));
    }
    if m[3] != m[0] {
        problems.push("a second datagram to the same destination got another mapping".into());
    }
    let ports = [m[0].port(), m[1].port(), m[2].port()];
    let same = ports.iter().all(|&p| p == ports[0]);
    let expected_in: &[&str] = match kind {
        NatKind::FullCone => &["A:p1", "A:p2", "B:p"],
        NatKind::AddressRestricted => &["A:p1", "A:p2"],
        _ => &["A:p1"],
    };
    match kind {
        NatKind::FullCone | NatKind::AddressRestricted | NatKind::PortRestricted => {
            if !same || ports[0] != seen.private_port {
                problems.push(format!(
                    "mapping should be one port-preserved port for every destination: private {}, public {ports:?}",
                    seen.private_port
                ));
            }
        }
        NatKind::SymmetricSequential => {
            if ports[1] != ports[0].wrapping_add(1) || ports[2] != ports[1].wrapping_add(1) {
                problems.push(format!(
                    "mapping should take consecutive ports per destination: {ports:?}"
                ));
            }
        }
        NatKind::SymmetricRandom => {
            let distinct: BTreeSet<u16> = ports.into_iter().collect();
            let consecutive =
                ports[1] == ports[0].wrapping_add(1) && ports[2] == ports[1].wrapping_add(1);
            if distinct.len() != 3 || consecutive {
                problems.push(format!(
                    "mapping should take a random port per destination: {ports:?}"
                ));
            }
        }
    }
    let let_in: Vec<&str> = seen.let_in.iter().copied().collect();
    let mut expected: Vec<&str> = expected_in.to_vec();
    expected.sort();
    if let_in != expected {
        problems.push(format!(
            "filtering let in {let_in:?}, expected {expected:?}"
        ));
    }
    problems
}

/// Each NAT kind's mapping and filtering, probed: the lab is what it claims before anything runs
/// on it.
#[test]
fn each_nat_kind_maps_and_filters_as_named() {
    if !lab_possible("each_nat_kind_maps_and_filters_as_named") {
        return;
    }
    let started = Instant::now();
    let mut lab = Lab::new();
    let public = lab.public_host("pub", 2);
    let homes: Vec<Home> = NatKind::ALL.iter().map(|&k| lab.home(k, 0)).collect();
    let mut failures = Vec::new();
    for home in &homes {
        let seen = probe(&public, home);
        let problems = check(home.nat.kind, home.nat.wan, &seen);
        eprintln!(
            "{:<21} private port {:5} → public {:?}; let in {:?}{}",
            home.nat.kind,
            seen.private_port,
            seen.mapped.map(|e| e.port()),
            seen.let_in,
            if problems.is_empty() { "" } else { "  WRONG" }
        );
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\nits rules:\n{}",
                home.nat.kind,
                problems.join("; "),
                lab.ruleset(&home.nat)
            ));
        }
    }
    eprintln!("probed 5 NAT kinds in {:?}", started.elapsed());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `numgen random` loss: a NAT set to drop 20 % of UDP drops about that many.
#[test]
fn nat_loss_drops_about_the_share_asked() {
    if !lab_possible("nat_loss_drops_about_the_share_asked") {
        return;
    }
    let mut lab = Lab::new();
    let public = lab.public_host("pub", 1);
    let home = lab.home(NatKind::PortRestricted, 200);
    let sink = public.udp(public.ip(), 0);
    let dest = sink.local_addr().unwrap();
    let h = home.host.udp(home.host.ip(), 0);
    const SENT: usize = 1000;
    // In bursts of 50, drained between bursts, so that the receive buffer never overflows.
    let mut got = 0;
    for burst in 0..SENT / 50 {
        for i in 0..50 {
            h.send_to(&((burst * 50 + i) as u32).to_be_bytes(), dest)
                .unwrap();
        }
        while recv(&sink, Duration::from_millis(50)).is_some() {
            got += 1;
        }
    }
    let loss = 1.0 - got as f64 / SENT as f64;
    eprintln!(
        "asked 20 % loss, measured {:.1} % ({got}/{SENT} arrived)",
        loss * 100.0
    );
    // Binomial, n = 1000, p = 0.2: sd ≈ 1.3 %; ±6 % is over 4 sd.
    assert!((0.14..=0.26).contains(&loss), "loss {loss}");
}

/// Two labs one after the other leave nothing behind.
#[test]
fn a_lab_leaves_nothing_behind() {
    if !lab_possible("a_lab_leaves_nothing_behind") {
        return;
    }
    let prefix = {
        let mut lab = Lab::new();
        lab.public_host("pub", 1);
        lab.home(NatKind::FullCone, 0);
        lab.prefix().to_owned()
    };
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A peer's `/status`, from inside its namespace.
fn peer_status(host: &Host) -> serde_json::Value {
    natlab::status_in(host, natlab::METRICS_PORT)
}

/// Today's DBS (compat profile, no NAT traversal) through the lab, the baseline for NTS: a
/// splitter and a monitor on the public segment, then one peer behind each kind of NAT, joining
/// in the order full cone → random symmetric. Prints what each peer received and whom it keeps
/// as neighbours.
#[test]
fn dbs_through_each_nat_kind_baseline() {
    if !lab_possible("dbs_through_each_nat_kind_baseline") {
        return;
    }
    let _one = support::one_at_a_time();
    let dir = support::test_dir("nat-dbs");
    let mut lab = Lab::new();
    let public = lab.public_host("splitter", 1);
    let monitor_host = lab.public_host("monitor", 1);
    let homes: Vec<Home> = NatKind::ALL.iter().map(|&k| lab.home(k, 0)).collect();
    let mut procs = vec![natlab::start_splitter(
        &public,
        &dir,
        &["--bitrate", "500k", "--buffer-size", "64"],
    )];
    let peer_args = |monitor: bool| {
        let flags: &[&str] = if monitor { &["--monitor"] } else { &[] };
        natlab::peer_args(&public, flags)
    };
    let mut monitor = natlab::spawn_in(&monitor_host, &dir, "monitor", &peer_args(true));
    support::wait_joined(&dir, &mut monitor);
    procs.push(monitor);
    for home in &homes {
        let mut p = natlab::spawn_in(&home.host, &dir, home.nat.kind.name(), &peer_args(false));
        support::wait_joined(&dir, &mut p);
        procs.push(p);
    }
    std::thread::sleep(Duration::from_secs(8));

    let kind_of = |endpoint: &str| -> String {
        let ip: Ipv4Addr = endpoint
            .split(':')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        if ip == monitor_host.ip() {
            return "monitor".into();
        }
        homes
            .iter()
            .find(|h| h.nat.wan == ip)
            .map_or(endpoint.to_owned(), |h| h.nat.kind.short().to_owned())
    };
    eprintln!(
        "\nDBS through NATs (compat, no traversal), 8 s after the last join, 500 kbit/s:\n\
         {:<21} {:>8} {:>9} {:>7} {:>6} {:>7}  neighbours kept",
        "peer behind", "splitter", "received", "played", "lost", "rejoins"
    );
    let mut from_splitter = Vec::new();
    for (name, host) in std::iter::once(("monitor (public)".to_owned(), &monitor_host)).chain(
        homes
            .iter()
            .map(|h| (h.nat.kind.name().to_owned(), &h.host)),
    ) {
        let s = peer_status(host);
        let t = &s["totals"];
        let neighbours: Vec<String> = s["neighbours"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| kind_of(n["endpoint"].as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        eprintln!(
            "{name:<21} {:>8} {:>9} {:>7} {:>6} {:>7}  {}",
            t["from_splitter"].as_u64().unwrap_or(0),
            t["chunks_received"].as_u64().unwrap_or(0),
            t["played"].as_u64().unwrap_or(0),
            t["lost"].as_u64().unwrap_or(0),
            t["rejoins"].as_u64().unwrap_or(0),
            neighbours.join(" ")
        );
        from_splitter.push(t["from_splitter"].as_u64().unwrap_or(0));
    }
    drop(procs);
    // What the baseline must show: the public monitor and the full-cone peer get the splitter's
    // chunks; a symmetric NAT lets none through (the splitter sends to the port the peer used
    // for TCP, which a symmetric NAT never maps to the peer's UDP socket).
    assert!(from_splitter[0] > 0, "the monitor got no chunks");
    assert!(from_splitter[1] > 0, "the full-cone peer got no chunks");
    assert_eq!(
        from_splitter[4], 0,
        "sequential symmetric got splitter chunks"
    );
    assert_eq!(from_splitter[5], 0, "random symmetric got splitter chunks");
}

/// What one NTS team through the lab showed.
struct NtsRun {
    /// Per peer (in join order): its NAT kind, chunks from the splitter, played, lost, and the
    /// neighbours it keeps (as indices of these peers).
    peers: Vec<(NatKind, u64, u64, u64, Vec<usize>)>,
    /// Each peer's incorporation line (`NTS ID ..., incorporated in ...`).
    incorporations: Vec<String>,
    /// Per pair of peers `(i, j)`, `i < j`: when (after the later one, `j`, was started) both
    /// first kept each other as neighbours, between two bounds (see [`Seen`]).
    direct_after: std::collections::HashMap<(usize, usize), Seen>,
    /// The same, for the earlier peer (`i`, already playing) keeping the later one.
    kept_after: std::collections::HashMap<(usize, usize), Seen>,
    /// Per peer: from its start to its incorporation line (the splitter echoed its `Y`).
    incorporated_after: Vec<Duration>,
    /// Per peer: teammates reached by port probing (`/status` `nat_probe_reached`).
    probe_reached: Vec<u64>,
    /// Per peer: how its `/status` says it reaches each other peer (by index), at the end:
    /// `direct`, `predicted`, `probed`, `forwarded`, `unreached` (`nts.teammates[].how`).
    how: Vec<std::collections::HashMap<usize, String>>,
    /// Per peer: chunks the splitter forwarded to it (`/status` `totals.forwarded`).
    forwarded: Vec<u64>,
    /// Per peer, with [`TeamSetup::byte_exact`]: its `--output` checked against the test
    /// pattern (chunks played byte-exact, or what is wrong).
    exact: Vec<Option<Result<usize, String>>>,
    /// The longest round of `/status` polls (every peer once): how sharp the times are.
    slowest_poll: Duration,
}

/// When `/status` showed a pair of peers keeping each other, after the later one's start: not
/// before `lower`, not after `upper`. A peer publishes its neighbour list on `/status` as soon as
/// it changes (and once a second besides) and the watcher polls every [`WATCH_EVERY`]: `upper`,
/// the poll that first showed the change, is at most one round of polls late; `lower` is the
/// poll before the one that showed the peer's previous publication (a conservative bound);
/// a joining peer keeps nobody before its incorporation (its session starts after the splitter
/// echoed its `Y`; the last read of its log without the line bounds that).
#[derive(Debug, Clone, Copy)]
struct Seen {
    lower: Duration,
    upper: Duration,
}

/// How often [`nts_team`] polls every peer's `/status` to time the pairs.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Chunk payload and stream header (test pattern) of the byte-exact runs.
const CHUNK: usize = 1024;
const HEADER: usize = 4096;

/// How a pair of peers that was not direct within the limit was served at the end of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// Each gets the other's chunks, at least one way forwarded by the splitter.
    Forwarded,
    /// Both keep each other, but only after the limit.
    LateDirect,
    /// At least one of them gets none of the other's chunks.
    Neither,
}

/// Per ordered pair of kinds (joining, already there; indices in [`NatKind::ALL`]): pairs,
/// pairs direct within the limit, served by the fallback, by neither; times; chunks lost by the
/// joining peer.
#[derive(Default)]
struct PairStats {
    pairs: u32,
    direct: u32,
    forwarded: u32,
    neither: u32,
    times: Vec<Duration>,
    times_lower: Vec<Duration>,
    kept: Vec<Duration>,
    kept_lower: Vec<Duration>,
    lost: Vec<u64>,
    incorporation: Vec<Duration>,
}

type Matrix = std::collections::BTreeMap<(usize, usize), PairStats>;

/// Index of `k` in [`NatKind::ALL`].
fn kind_index(k: NatKind) -> usize {
    NatKind::ALL.iter().position(|&x| x == k).unwrap()
}

impl NtsRun {
    /// Whether peers `i` and `j` keep each other as neighbours: both directions work.
    fn direct_pair(&self, i: usize, j: usize) -> bool {
        self.peers[i].4.contains(&j) && self.peers[j].4.contains(&i)
    }

    /// Whether every pair of peers behind `a` and `b` is direct.
    fn direct(&self, a: NatKind, b: NatKind) -> bool {
        self.pairs(a, b)
            .iter()
            .all(|&(i, j)| self.direct_pair(i, j))
    }

    /// The pairs of peers behind `a` and `b`.
    fn pairs(&self, a: NatKind, b: NatKind) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for i in 0..self.peers.len() {
            for j in i + 1..self.peers.len() {
                let (x, y) = (self.peers[i].0, self.peers[j].0);
                if (x, y) == (a, b) || (x, y) == (b, a) {
                    out.push((i, j));
                }
            }
        }
        out
    }

    /// Whether peer `to` gets peer `from`'s chunks at the end: `from` relays to it (keeps it
    /// as a neighbour), or `to` says the splitter forwards them and got forwarded chunks.
    fn gets(&self, to: usize, from: usize) -> bool {
        self.peers[from].4.contains(&to) || self.forwarded_to(to, from)
    }

    /// Whether `to` gets `from`'s chunks forwarded (its `/status` and its counter agree).
    fn forwarded_to(&self, to: usize, from: usize) -> bool {
        self.how[to].get(&from).map(String::as_str) == Some("forwarded") && self.forwarded[to] > 0
    }

    /// Whether the pair `(i, j)`, `i < j`, was direct within `limit` of `j`'s start (by the
    /// poll that showed it: an upper bound).
    fn direct_within(&self, i: usize, j: usize, limit: Duration) -> bool {
        self.direct_after
            .get(&(i, j))
            .is_some_and(|s| s.upper <= limit)
            && self.direct_pair(i, j)
    }

    /// How a pair that was not direct within the limit was served.
    fn fallback(&self, i: usize, j: usize) -> Fallback {
        if self.gets(i, j)
            && self.gets(j, i)
            && (self.forwarded_to(i, j) || self.forwarded_to(j, i))
        {
            Fallback::Forwarded
        } else if self.direct_pair(i, j) {
            Fallback::LateDirect
        } else {
            Fallback::Neither
        }
    }

    /// What the two peers of a pair served by neither say of each other, for the log.
    fn describe_pair(&self, i: usize, j: usize) -> String {
        let side = |a: usize, b: usize| {
            format!(
                "{a}-{} reaches {b}: {}, keeps it: {}, forwarded chunks {}",
                self.peers[a].0.short(),
                self.how[a].get(&b).map_or("not listed", String::as_str),
                self.peers[a].4.contains(&b),
                self.forwarded[a]
            )
        };
        format!("{}; {}", side(i, j), side(j, i))
    }

    /// Adds each pair to `m` under (kind of the later peer, kind of the earlier one): direct
    /// when both kept each other within `limit` of the later one's start, else served by the
    /// fallback or by neither. Returns a line for each pair served by neither.
    fn count_ordered(&self, m: &mut Matrix, limit: Duration) -> Vec<String> {
        let mut unserved = Vec::new();
        for i in 0..self.peers.len() {
            for j in i + 1..self.peers.len() {
                let e = m
                    .entry((kind_index(self.peers[j].0), kind_index(self.peers[i].0)))
                    .or_default();
                e.pairs += 1;
                e.lost.push(self.peers[j].3);
                e.incorporation.push(self.incorporated_after[j]);
                if self.direct_within(i, j, limit) {
                    let t = self.direct_after[&(i, j)];
                    e.direct += 1;
                    e.times.push(t.upper);
                    e.times_lower.push(t.lower);
                    if let Some(k) = self.kept_after.get(&(i, j)) {
                        e.kept.push(k.upper);
                        e.kept_lower.push(k.lower);
                    }
                    continue;
                }
                match self.fallback(i, j) {
                    Fallback::Forwarded => e.forwarded += 1,
                    f => {
                        e.neither += 1;
                        unserved.push(format!(
                            "pair {i}-{} (earlier) / {j}-{} (joining): {}; {}",
                            self.peers[i].0.short(),
                            self.peers[j].0.short(),
                            if f == Fallback::LateDirect {
                                "direct only after the limit"
                            } else {
                                "served by neither"
                            },
                            self.describe_pair(i, j)
                        ));
                    }
                }
            }
        }
        unserved
    }

    /// Adds (direct pairs, pairs) per pair of kinds (by index in [`NatKind::ALL`]) to `counts`.
    fn count(&self, counts: &mut std::collections::BTreeMap<(usize, usize), (u32, u32)>) {
        for i in 0..self.peers.len() {
            for j in i + 1..self.peers.len() {
                let (a, b) = (kind_index(self.peers[i].0), kind_index(self.peers[j].0));
                let e = counts.entry((a.min(b), a.max(b))).or_insert((0, 0));
                e.0 += u32::from(self.direct_pair(i, j));
                e.1 += 1;
            }
        }
    }
}

/// How [`nts_team_with`] sets a team up.
#[derive(Debug, Clone, Copy, Default)]
struct TeamSetup {
    /// Every NAT drops this share of the UDP it forwards, both ways, per mille.
    loss_permille: u16,
    /// Every peer writes `--output`, checked against the test pattern at the end.
    byte_exact: bool,
}

/// A splitter with `--nts` and a monitor on the public segment, then one peer behind each NAT
/// kind of `order`, joining one after another (each as soon as the previous one is a member),
/// all with `--nts`; reads every peer's `/status` `settle` after the last join.
fn nts_team(order: &[NatKind], settle: Duration, dir_name: &str) -> NtsRun {
    nts_team_with(order, settle, dir_name, TeamSetup::default())
}

/// The stream header then contiguous chunks of the test pattern from a chunk boundary (the
/// file may end in the middle of a chunk: the peer was killed); the chunks played, or what is
/// wrong.
fn check_output(path: &std::path::Path) -> Result<usize, String> {
    use p2psp::pattern;
    let data = std::fs::read(path).map_err(|e| format!("no output {}: {e}", path.display()))?;
    if data.len() < HEADER + 16 {
        return Err(format!("output of {} bytes: played nothing", data.len()));
    }
    let (header, chunks) = data.split_at(HEADER);
    if pattern::first_mismatch(0, header).is_some() {
        return Err("the stream header is not the pattern's start".into());
    }
    let offset = pattern::locate(&chunks[..chunks.len().min(CHUNK)])
        .ok_or("the first played chunk is not the pattern")?;
    if offset as usize % CHUNK != 0 {
        return Err(format!(
            "played stream starts at {offset}, not a chunk boundary"
        ));
    }
    match pattern::first_mismatch(offset, chunks) {
        Some(at) => Err(format!(
            "played stream breaks at byte {at} (chunk {} after the first)",
            at / CHUNK
        )),
        None => Ok(chunks.len() / CHUNK),
    }
}

/// Waits (at most 25 s) for `proc`'s incorporation line in `log`: the line, and the time of
/// the last read of the log that did not hold it yet.
fn wait_incorporated(proc: &mut support::Proc, log: &std::path::Path) -> (String, Instant) {
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut absent = Instant::now();
    loop {
        let read_at = Instant::now();
        let running = proc.running();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(": NTS ID ")) {
            return (line.to_owned(), absent);
        }
        assert!(
            running && Instant::now() < deadline,
            "{} was not incorporated:\n{text}",
            proc.name
        );
        absent = read_at;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the watcher knows of one peer's `/status` publications.
#[derive(Default)]
struct Watched {
    /// The last snapshot's `(me, chunks_received, played, neighbours)`.
    last: Option<(serde_json::Value, u64, u64, Vec<usize>)>,
    /// Start of the previous poll of this peer.
    prev_poll: Option<Instant>,
    /// Start of the poll before the one that last showed a new publication: the publication
    /// came after it.
    published_after: Option<Instant>,
    /// Per neighbour: the earliest it can have been kept (see [`Seen`]).
    since: std::collections::HashMap<usize, Instant>,
    /// Per neighbour: the end of the poll that first showed it.
    shown: std::collections::HashMap<usize, Instant>,
}

impl Watched {
    /// One poll of the peer, started at `start`, done at `end`: `status` its answer, `index_of`
    /// maps an endpoint to a peer; `floor` is the earliest any new neighbour can have come.
    fn poll(
        &mut self,
        status: &serde_json::Value,
        start: Instant,
        end: Instant,
        floor: Instant,
        index_of: impl Fn(&str) -> Option<usize>,
    ) {
        if !status.is_null() {
            let neighbours: Vec<usize> = status["neighbours"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| index_of(n["endpoint"].as_str()?))
                        .collect()
                })
                .unwrap_or_default();
            let t = &status["totals"];
            let sig = (
                status["me"].clone(),
                t["chunks_received"].as_u64().unwrap_or(0),
                t["played"].as_u64().unwrap_or(0),
                neighbours.clone(),
            );
            if self.last.as_ref() != Some(&sig) {
                // A publication between the previous poll's start and this one's end; whatever
                // it shows first happened after the publication before it.
                let lower = self.published_after.unwrap_or(floor).max(floor);
                for &n in &neighbours {
                    self.since.entry(n).or_insert(lower);
                    self.shown.entry(n).or_insert(end);
                }
                self.published_after = self.prev_poll;
                self.last = Some(sig);
            }
        }
        self.prev_poll = Some(start);
    }
}

/// [`nts_team`] with `setup` (loss at every NAT, byte-exact output). The splitter's team size
/// and buffer fit the team (team size ≥ the peers and the monitor, buffer ≥ twice that, at
/// least 64 chunks).
fn nts_team_with(order: &[NatKind], settle: Duration, dir_name: &str, setup: TeamSetup) -> NtsRun {
    let dir = support::test_dir(dir_name);
    let mut lab = Lab::new();
    let public = lab.public_host("splitter", 1);
    let monitor_host = lab.public_host("monitor", 1);
    let homes: Vec<Home> = order
        .iter()
        .map(|&k| lab.home(k, setup.loss_permille))
        .collect();
    let team_size = (order.len() + 1).max(16);
    let buffer_size = (2 * team_size).next_power_of_two().max(64);
    let mut splitter_flags: Vec<String> = vec![
        "--nts".into(),
        "--bitrate".into(),
        "500k".into(),
        "--buffer-size".into(),
        buffer_size.to_string(),
        "--team-size".into(),
        team_size.to_string(),
    ];
    if setup.byte_exact {
        splitter_flags.extend(["--header-size".to_owned(), HEADER.to_string()]);
    }
    let mut procs = vec![natlab::start_splitter(&public, &dir, &splitter_flags)];
    let output = |name: &str| dir.join(format!("{name}.out"));
    let peer_args = |name: &str, monitor: bool| {
        let mut a = natlab::peer_args(&public, &["--nts"]);
        if monitor {
            a.push("--monitor".into());
        } else if setup.byte_exact {
            a.push("--output".into());
            a.push(output(name).display().to_string());
        }
        a
    };
    let mut monitor = natlab::spawn_in(&monitor_host, &dir, "monitor", &peer_args("monitor", true));
    support::wait_joined(&dir, &mut monitor);
    procs.push(monitor);
    let mut incorporations = Vec::new();
    let mut incorporated_after = Vec::new();
    // The watcher: every peer started so far (its start, and once known the last read of its
    // log without its incorporation line), polled for its neighbours.
    type Started = Vec<(Instant, Option<Instant>)>;
    let started: std::sync::Arc<std::sync::Mutex<Started>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (started, stop) = (started.clone(), stop.clone());
        let homes = homes.clone();
        std::thread::spawn(move || {
            let index_of = |e: &str| -> Option<usize> {
                let ip: Ipv4Addr = e.split(':').next()?.parse().ok()?;
                homes.iter().position(|h| h.nat.wan == ip)
            };
            let mut watched: Vec<Watched> = Vec::new();
            let mut slowest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = Instant::now();
                let spawned = started.lock().unwrap().clone();
                watched.resize_with(spawned.len(), Watched::default);
                for (i, w) in watched.iter_mut().enumerate() {
                    let start = Instant::now();
                    let status = peer_status(&homes[i].host);
                    // Nobody keeps a neighbour before its own session starts (its
                    // incorporation), nor a peer before that peer is started; the second floor
                    // is applied per pair below.
                    let floor = spawned[i].1.unwrap_or(spawned[i].0);
                    w.poll(&status, start, Instant::now(), floor, index_of);
                }
                slowest = slowest.max(t0.elapsed());
                std::thread::sleep(WATCH_EVERY.saturating_sub(t0.elapsed()));
            }
            let spawned = started.lock().unwrap().clone();
            let mut both = std::collections::HashMap::new();
            let mut kept = std::collections::HashMap::new();
            for j in 0..watched.len() {
                let t = |at: Instant| at.saturating_duration_since(spawned[j].0);
                for i in 0..j {
                    let (wi, wj) = (&watched[i], &watched[j]);
                    if let (Some(&l), Some(&u)) = (wi.since.get(&j), wi.shown.get(&j)) {
                        kept.insert(
                            (i, j),
                            Seen {
                                lower: t(l),
                                upper: t(u),
                            },
                        );
                    }
                    if let (Some(&li), Some(&ui), Some(&lj), Some(&uj)) = (
                        wi.since.get(&j),
                        wi.shown.get(&j),
                        wj.since.get(&i),
                        wj.shown.get(&i),
                    ) {
                        both.insert(
                            (i, j),
                            Seen {
                                lower: t(li.max(lj)),
                                upper: t(ui.max(uj)),
                            },
                        );
                    }
                }
            }
            (both, kept, slowest)
        })
    };
    for (i, home) in homes.iter().enumerate() {
        let name = format!("{i}-{}", home.nat.kind.name());
        let at = Instant::now();
        started.lock().unwrap().push((at, None));
        let mut p = natlab::spawn_in(&home.host, &dir, &name, &peer_args(&name, false));
        let (line, absent) = wait_incorporated(&mut p, &support::peer_log(&dir, &name));
        incorporated_after.push(at.elapsed());
        started.lock().unwrap()[i].1 = Some(absent);
        incorporations.push(format!("{:<21} {}", home.nat.kind.name(), line));
        procs.push(p);
    }
    std::thread::sleep(settle);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (direct_after, kept_after, slowest_poll) = watcher.join().unwrap();
    let index_of = |endpoint: &str| -> Option<usize> {
        let ip: Ipv4Addr = endpoint.split(':').next()?.parse().ok()?;
        homes.iter().position(|h| h.nat.wan == ip)
    };
    let statuses: Vec<serde_json::Value> = homes.iter().map(|h| peer_status(&h.host)).collect();
    let ids: Vec<String> = statuses
        .iter()
        .map(|s| s["nts"]["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    let mut probe_reached = Vec::new();
    let mut how = Vec::new();
    let mut forwarded = Vec::new();
    let peers = homes
        .iter()
        .zip(&statuses)
        .map(|(h, s)| {
            let t = &s["totals"];
            probe_reached.push(t["nat_probe_reached"].as_u64().unwrap_or(0));
            forwarded.push(t["forwarded"].as_u64().unwrap_or(0));
            how.push(
                s["nts"]["teammates"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|m| {
                                let at = ids.iter().position(|id| m["id"].as_str() == Some(id))?;
                                Some((at, m["how"].as_str().unwrap_or("?").to_owned()))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            );
            let neighbours: Vec<usize> = s["neighbours"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| index_of(n["endpoint"].as_str().unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default();
            (
                h.nat.kind,
                t["from_splitter"].as_u64().unwrap_or(0),
                t["played"].as_u64().unwrap_or(0),
                t["lost"].as_u64().unwrap_or(0),
                neighbours,
            )
        })
        .collect();
    // The peers write their output as they play: killed, a file ends at most in the middle of
    // a chunk.
    drop(procs);
    let exact = homes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            setup.byte_exact.then(|| {
                let path = output(&format!("{i}-{}", h.nat.kind.name()));
                let r = check_output(&path);
                let _ = std::fs::remove_file(&path);
                r
            })
        })
        .collect();
    NtsRun {
        peers,
        incorporations,
        direct_after,
        kept_after,
        incorporated_after,
        probe_reached,
        how,
        forwarded,
        exact,
        slowest_poll,
    }
}

/// Whether the reference's theory (§6.4) and this project's goal expect a direct connection:
/// a full- or address-restricted cone on either side, or a port-restricted cone with a
/// port-restricted or sequential symmetric NAT.
fn cone_pair(a: NatKind, b: NatKind) -> bool {
    use NatKind::*;
    let open = |k| matches!(k, FullCone | AddressRestricted);
    open(a) || open(b) || (a == PortRestricted && b == PortRestricted)
}

/// Whether port probing (`src/proto/nts_probe.rs`) is to connect the pair: a port-restricted
/// cone with a symmetric NAT of either kind (birthday probing), or two sequential symmetric
/// NATs (the two-rate sweep).
fn probed_pair(a: NatKind, b: NatKind) -> bool {
    use NatKind::*;
    let sym = |k| matches!(k, SymmetricSequential | SymmetricRandom);
    (a == PortRestricted && sym(b))
        || (b == PortRestricted && sym(a))
        || (a == SymmetricSequential && b == SymmetricSequential)
}

fn print_matrix(title: &str, counts: &std::collections::BTreeMap<(usize, usize), (u32, u32)>) {
    eprintln!(
        "\n{title}\n{:<7}{}",
        "",
        NatKind::ALL.map(|k| format!("{:>8}", k.short())).join("")
    );
    for (i, a) in NatKind::ALL.iter().enumerate() {
        let row: Vec<String> = (0..5)
            .map(|j| match counts.get(&(i.min(j), i.max(j))) {
                Some((ok, n)) => format!("{:>8}", format!("{ok}/{n}")),
                None => format!("{:>8}", "-"),
            })
            .collect();
        eprintln!("{:<7}{}", a.short(), row.join(""));
    }
}

/// NTS through the lab: one peer behind each NAT kind in one team, then a second
/// port-restricted and a second sequential symmetric peer (21 pairs at once). The splitter
/// reaches every peer (it sends to the mapping each peer's own hello made), and every pair with
/// a full- or address-restricted cone on one side, or two port-restricted cones, connects
/// directly; so do, through port probing, port-restricted ↔ symmetric (sequential and random)
/// and sequential ↔ sequential. Prints the pairs.
#[test]
fn nts_through_each_nat_kind() {
    if !lab_possible("nts_through_each_nat_kind") {
        return;
    }
    let _one = support::one_at_a_time();
    let started = Instant::now();
    // Each kind once, then a second port-restricted peer (a cone pair of one kind) and a
    // second sequential symmetric one (a pair for the sweep).
    let mut order = NatKind::ALL.to_vec();
    order.push(NatKind::PortRestricted);
    order.push(NatKind::SymmetricSequential);
    // 8 s: the last pairs' probing sessions start 1.5 s after their list 2 and took up to 3.9 s
    // (p99, quiet machine); 5 s was once too short under load.
    let run = nts_team(&order, Duration::from_secs(8), "nat-nts");
    eprintln!("\nNTS through NATs, one team, 8 s after the last join, 500 kbit/s:");
    for l in &run.incorporations {
        eprintln!("{l}");
    }
    eprintln!(
        "{:<21} {:>8} {:>7} {:>6}  neighbours kept",
        "peer behind", "splitter", "played", "lost"
    );
    for (k, splitter, played, lost, n) in &run.peers {
        let n: Vec<&str> = n.iter().map(|&i| run.peers[i].0.short()).collect();
        eprintln!(
            "{:<21} {splitter:>8} {played:>7} {lost:>6}  {}",
            k.name(),
            n.join(" ")
        );
    }
    let mut counts = std::collections::BTreeMap::new();
    run.count(&mut counts);
    print_matrix("direct pairs (both keep each other) / pairs:", &counts);
    eprintln!("in {:?}", started.elapsed());
    for (i, (k, splitter, played, _, _)) in run.peers.iter().enumerate() {
        assert!(*splitter > 0, "{k}: the splitter does not reach it");
        assert!(*played > 0, "{k}: plays nothing");
        // The random symmetric peer meets both port-restricted ones by birthday probing only,
        // and its /status counts them.
        if *k == NatKind::SymmetricRandom {
            assert!(
                run.probe_reached[i] >= 2,
                "{k}: nat_probe_reached {}",
                run.probe_reached[i]
            );
        }
    }
    for (i, &a) in NatKind::ALL.iter().enumerate() {
        for &b in &NatKind::ALL[i..] {
            if cone_pair(a, b) {
                assert!(run.direct(a, b), "{a} and {b} did not connect");
            }
            if probed_pair(a, b) {
                assert!(run.direct(a, b), "{a} and {b} did not connect by probing");
            }
        }
    }
}

/// Median and 99th percentile (nearest rank) of `v`, sorted in place.
fn p50_p99<T: Ord + Copy>(v: &mut [T]) -> Option<(T, T)> {
    v.sort_unstable();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (!v.is_empty()).then(|| (at(0.5), at(0.99)))
}

/// `p50/p99` of `times` in ms, `-` when empty.
fn ms_p50_p99(times: &[Duration]) -> String {
    let mut t: Vec<u128> = times.iter().map(Duration::as_millis).collect();
    p50_p99(&mut t).map_or("-".to_owned(), |(a, b)| format!("{a}/{b}"))
}

/// `part/whole pct%`.
fn share(part: u32, whole: u32) -> String {
    format!(
        "{part}/{whole} {:>3.0}%",
        100.0 * f64::from(part) / f64::from(whole.max(1))
    )
}

/// Prints the ordered-pair tables of `m`: direct share, shares served by the forwarding
/// fallback and by neither, incorporation time, time to direct (both bounds), chunks lost by
/// the joining peer.
fn print_ordered(m: &Matrix, limit: Duration) {
    let head = NatKind::ALL.map(|k| format!("{:>14}", k.short())).join("");
    let table = |title: &str, cell: &dyn Fn(&PairStats) -> String| {
        eprintln!("\n{title}\njoining{head}");
        for (i, a) in NatKind::ALL.iter().enumerate() {
            let row: Vec<String> = (0..5)
                .map(|j| {
                    let c = m.get(&(i, j)).map_or("-".to_owned(), cell);
                    format!("{c:>14}")
                })
                .collect();
            eprintln!("{:<7}{}", a.short(), row.join(""));
        }
    };
    table(
        &format!(
            "direct within {limit:?} / pairs (row: the peer that joined later; column: the one already there):"
        ),
        &|e| share(e.direct, e.pairs),
    );
    table(
        &format!(
            "served by the forwarding fallback (not direct within {limit:?}; each gets the other's \
             chunks, at least one way forwarded by the splitter) / pairs:"
        ),
        &|e| share(e.forwarded, e.pairs),
    );
    table(
        &format!("served by neither (not direct within {limit:?}, not forwarded) / pairs:"),
        &|e| share(e.neither, e.pairs),
    );
    table(
        "the joining peer's incorporation (its start to the splitter's echo of its Y), p50/p99 (ms):",
        &|e| ms_p50_p99(&e.incorporation),
    );
    table(
        "from the later peer's start until /status showed both keeping each other, p50/p99 (ms; \
         direct pairs; upper bound: the poll that showed it):",
        &|e| ms_p50_p99(&e.times),
    );
    table(
        "the same, lower bound (the poll before the peer's previous /status publication; the \
         joining peer's incorporation):",
        &|e| ms_p50_p99(&e.times_lower),
    );
    table(
        "from the later peer's start until the earlier one (playing already) kept it, p50/p99 \
         (ms; direct pairs; upper bound):",
        &|e| ms_p50_p99(&e.kept),
    );
    table("the same, lower bound:", &|e| ms_p50_p99(&e.kept_lower));
    table("chunks lost by the joining peer, p50/max:", &|e| {
        let mut l = e.lost.clone();
        let max = l.iter().copied().max().unwrap_or(0);
        p50_p99(&mut l).map_or("-".to_owned(), |(a, _)| format!("{a}/{max}"))
    });
}

/// Per NAT kind, over all runs: peers, their lost chunks and forwarded chunks, and how many
/// played byte-exact.
#[derive(Default)]
struct KindStats {
    peers: u32,
    exact: u32,
    lost: Vec<u64>,
    forwarded: Vec<u64>,
    /// What was wrong with the outputs that were not byte-exact.
    broken: Vec<String>,
}

/// The ordered cells whose kinds (joining, earlier) `pick` accepts, merged into one.
fn merged(m: &Matrix, pick: impl Fn(NatKind, NatKind) -> bool) -> PairStats {
    let mut out = PairStats::default();
    for (&(j, i), e) in m {
        if pick(NatKind::ALL[j], NatKind::ALL[i]) {
            out.pairs += e.pairs;
            out.direct += e.direct;
            out.forwarded += e.forwarded;
            out.neither += e.neither;
            out.times.extend(&e.times);
            out.times_lower.extend(&e.times_lower);
            out.kept.extend(&e.kept);
            out.kept_lower.extend(&e.kept_lower);
            out.lost.extend(&e.lost);
        }
    }
    out
}

/// The goals (issue 11) against the matrix.
fn print_goals(m: &Matrix, kinds: &[KindStats; 5], limit: Duration) {
    use NatKind::*;
    let two = Duration::from_secs(2);
    let within = |v: &[Duration]| v.iter().filter(|&&t| t <= two).count();
    let open = |k: NatKind| matches!(k, FullCone | AddressRestricted);
    let cone = merged(m, |a, b| open(a) || open(b));
    eprintln!(
        "\ngoals (issue 11):\n\
         - pairs with a full- or address-restricted cone: direct within {limit:?} {}; both \
         keeping each other within 2 s, by the joining peer's kind (for sure: upper bound ≤ 2 s; \
         possibly: lower bound ≤ 2 s), and the earlier peer keeping the joining one within 2 s:",
        share(cone.direct, cone.pairs),
    );
    for joining in NatKind::ALL {
        let e = merged(m, |a, b| a == joining && (open(a) || open(b)));
        eprintln!(
            "    {:<6} joining: both {} for sure, {} possibly, of {} (p99 upper/lower {}/{} ms); \
             the earlier one {} for sure, {} possibly",
            joining.short(),
            within(&e.times),
            within(&e.times_lower),
            e.pairs,
            p50_p99(&mut e.times.clone()).map_or(0, |t| t.1.as_millis()),
            p50_p99(&mut e.times_lower.clone()).map_or(0, |t| t.1.as_millis()),
            within(&e.kept),
            within(&e.kept_lower),
        );
    }
    for (a, b) in [
        (PortRestricted, SymmetricSequential),
        (PortRestricted, SymmetricRandom),
        (SymmetricSequential, SymmetricSequential),
    ] {
        let e = merged(m, |x, y| (x, y) == (a, b) || (x, y) == (b, a));
        eprintln!(
            "- {} – {}: direct within {limit:?} {} (goal ≥ 95 %); p99 upper bound {} ms",
            a.short(),
            b.short(),
            share(e.direct, e.pairs),
            p50_p99(&mut e.times.clone()).map_or(0, |t| t.1.as_millis())
        );
    }
    let rr = merged(m, |a, b| a == SymmetricRandom && b == SymmetricRandom);
    let r = &kinds[kind_index(SymmetricRandom)];
    eprintln!(
        "- symrp – symrp: served by the fallback {}, by neither {}; symrp peers byte-exact {}/{}, \
         chunks lost max {}",
        share(rr.forwarded, rr.pairs),
        rr.neither,
        r.exact,
        r.peers,
        r.lost.iter().max().copied().unwrap_or(0)
    );
    let all = merged(m, |_, _| true);
    eprintln!(
        "- every pair: direct {}, forwarded {}, neither {}",
        share(all.direct, all.pairs),
        share(all.forwarded, all.pairs),
        share(all.neither, all.pairs)
    );
}

/// Prints, per NAT kind, the peers that played byte-exact, their lost and forwarded chunks.
fn print_kinds(kinds: &[KindStats; 5]) {
    eprintln!(
        "\nper peer, by its NAT kind: played byte-exact (--output against the test pattern) / \
         peers; chunks lost p50/max; chunks forwarded to it by the splitter p50/max:"
    );
    for (k, s) in NatKind::ALL.iter().zip(kinds) {
        let p50_max = |v: &[u64]| {
            let mut v = v.to_vec();
            let max = v.iter().copied().max().unwrap_or(0);
            p50_p99(&mut v).map_or("-".to_owned(), |(a, _)| format!("{a}/{max}"))
        };
        eprintln!(
            "{:<7}{:>14}{:>12}{:>12}",
            k.short(),
            share(s.exact, s.peers),
            p50_max(&s.lost),
            p50_max(&s.forwarded)
        );
        for b in &s.broken {
            eprintln!("        not byte-exact: {b}");
        }
    }
}

/// The number in environment variable `name`, `default` when it is not set; a panic naming it
/// when it is not a number in `range`.
fn env_number(name: &str, default: u32, range: std::ops::RangeInclusive<u32>) -> u32 {
    let v = match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a whole number")),
        Err(_) => default,
    };
    assert!(
        range.contains(&v),
        "{name}={v}: must be {} to {}",
        range.start(),
        range.end()
    );
    v
}

/// The NAT kinds of the matrix's teams: `NTS_MATRIX_KINDS` (short names, comma-separated, e.g.
/// `symsp,prcn`), every kind unless set.
fn matrix_kinds() -> Vec<NatKind> {
    let Ok(v) = std::env::var("NTS_MATRIX_KINDS") else {
        return NatKind::ALL.to_vec();
    };
    let mut kinds = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let k = NatKind::ALL
            .into_iter()
            .find(|k| k.short() == name)
            .unwrap_or_else(|| {
                panic!(
                    "NTS_MATRIX_KINDS={v:?}: {name:?} is not a NAT kind (one of {})",
                    NatKind::ALL.map(|k| k.short()).join(", ")
                )
            });
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    assert!(
        !kinds.is_empty(),
        "NTS_MATRIX_KINDS={v:?}: no NAT kind named"
    );
    kinds
}

/// The full matrix: teams of `NTS_MATRIX_PER_KIND` (default 2) peers per NAT kind (each behind
/// its own NAT), joining in a shuffled order each time, each read 10 s after the last join; per
/// ordered pair of kinds (the later peer's, the earlier one's): the pairs of peers that kept
/// each other as neighbours within 10 s of the later one's start, the time that took (p50/p99,
/// upper and lower bounds), the pairs served by the forwarding fallback instead and by neither,
/// the joining peer's incorporation time and the chunks it lost; per kind, the peers whose
/// `--output` is byte-exact. A team of k per kind adds about k²/2 pairs to each ordered pair of
/// two kinds and k(k−1)/2 to each of one kind.
/// How many teams: `NTS_MATRIX_RUNS` (default 10); or, with `NTS_MATRIX_PAIRS=N`, until every
/// ordered pair has at least N pairs, at most `NTS_MATRIX_MAX_RUNS` teams (default 40) and
/// `NTS_MATRIX_MAX_MINUTES` (default 60; no new team after that).
/// `NTS_MATRIX_LOSS=10` makes every NAT drop 1 % of the UDP it forwards (as the reference's runs);
/// `NTS_MATRIX_SEED` picks the join orders; `NTS_MATRIX_KINDS=symsp,prcn` makes teams of those
/// kinds only. `perf/nat-matrix.sh` runs the full matrix.
/// `NTS_MATRIX_RUNS=10 cargo test --release --test nat nts_success_matrix -- --ignored --nocapture`
#[test]
#[ignore]
fn nts_success_matrix() {
    if !lab_possible("nts_success_matrix") {
        return;
    }
    let _one = support::one_at_a_time();
    let per_kind = env_number("NTS_MATRIX_PER_KIND", 2, 1..=20) as usize;
    let team_kinds = matrix_kinds();
    let target = std::env::var_os("NTS_MATRIX_PAIRS")
        .map(|_| env_number("NTS_MATRIX_PAIRS", 0, 1..=100_000));
    let runs = match target {
        Some(_) => env_number("NTS_MATRIX_MAX_RUNS", 40, 1..=1000),
        None => env_number("NTS_MATRIX_RUNS", 10, 1..=1000),
    };
    if target.is_some() && std::env::var_os("NTS_MATRIX_RUNS").is_some() {
        eprintln!(
            "NTS_MATRIX_PAIRS is set: NTS_MATRIX_RUNS is ignored (NTS_MATRIX_MAX_RUNS bounds the teams)"
        );
    }
    let max_time =
        Duration::from_secs(60 * u64::from(env_number("NTS_MATRIX_MAX_MINUTES", 60, 1..=24 * 60)));
    let limit = Duration::from_secs(10);
    // Per mille of UDP each NAT drops (the reference measured with 1 %: 10).
    let loss = env_number("NTS_MATRIX_LOSS", 0, 0..=1000) as u16;
    let mut seed = std::env::var("NTS_MATRIX_SEED")
        .ok()
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("NTS_MATRIX_SEED={v:?}: not a whole number"))
        })
        .unwrap_or(0x2545_F491_4F6C_DD1Du64)
        .max(1);
    let started = Instant::now();
    let mut counts = std::collections::BTreeMap::new();
    let mut ordered = Matrix::new();
    let mut kinds: [KindStats; 5] = Default::default();
    let mut unserved = Vec::new();
    let indices: Vec<usize> = team_kinds.iter().map(|&k| kind_index(k)).collect();
    let fewest = |m: &Matrix| {
        indices
            .iter()
            .flat_map(|&j| indices.iter().map(move |&i| (j, i)))
            .map(|c| (m.get(&c).map_or(0, |e| e.pairs), c))
            .min()
            .unwrap()
    };
    eprintln!(
        "NTS matrix: teams of {} peers ({per_kind} per NAT kind: {}), NAT loss {loss} ‰, {}",
        team_kinds.len() * per_kind,
        team_kinds
            .iter()
            .map(|k| k.short())
            .collect::<Vec<_>>()
            .join(" "),
        match target {
            Some(n) => format!(
                "until every ordered pair has {n} pairs (at most {runs} teams, {max_time:?})"
            ),
            None => format!("{runs} teams"),
        }
    );
    let mut done = 0;
    for r in 0..runs {
        if target.is_some_and(|n| fewest(&ordered).0 >= n) {
            break;
        }
        if started.elapsed() >= max_time {
            eprintln!("NTS_MATRIX_MAX_MINUTES reached: no more teams");
            break;
        }
        let t = Instant::now();
        let mut order: Vec<NatKind> = team_kinds
            .iter()
            .flat_map(|&k| std::iter::repeat_n(k, per_kind))
            .collect();
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let setup = TeamSetup {
            loss_permille: loss,
            byte_exact: true,
        };
        let run = nts_team_with(&order, limit, &format!("nat-nts-matrix-{r}"), setup);
        run.count(&mut counts);
        unserved.extend(
            run.count_ordered(&mut ordered, limit)
                .into_iter()
                .map(|l| format!("run {r}: {l}")),
        );
        for (i, p) in run.peers.iter().enumerate() {
            let s = &mut kinds[kind_index(p.0)];
            s.peers += 1;
            s.lost.push(p.3);
            s.forwarded.push(run.forwarded[i]);
            match &run.exact[i] {
                Some(Ok(_)) => s.exact += 1,
                Some(Err(e)) => s.broken.push(format!("run {r}, peer {i}: {e}")),
                None => {}
            }
        }
        done += 1;
        let played: Vec<u64> = run.peers.iter().map(|p| p.2).collect();
        let (n, (j, i)) = fewest(&ordered);
        eprintln!(
            "run {r}: order {:?}, played {played:?}\n  {:.1} s, slowest /status poll round {} ms; fewest pairs: {n} ({} joining, {} there){}; {:.0} s in all",
            order.iter().map(|k| k.short()).collect::<Vec<_>>(),
            t.elapsed().as_secs_f64(),
            run.slowest_poll.as_millis(),
            NatKind::ALL[j].short(),
            NatKind::ALL[i].short(),
            target.map_or(String::new(), |n| format!(" of {n}")),
            started.elapsed().as_secs_f64()
        );
    }
    print_matrix(
        &format!(
            "NTS direct pairs of peers at the end / pairs, over {done} teams of {} peers, NAT loss {loss} ‰:",
            team_kinds.len() * per_kind
        ),
        &counts,
    );
    print_ordered(&ordered, limit);
    print_kinds(&kinds);
    print_goals(&ordered, &kinds, limit);
    for l in &unserved {
        eprintln!("{l}");
    }
    eprintln!(
        "{done} teams of {} peers in {:.0} s",
        team_kinds.len() * per_kind,
        started.elapsed().as_secs_f64()
    );
    assert!(
        unserved.is_empty(),
        "{} pairs served by neither direct links nor the fallback (listed above)",
        unserved.len()
    );
    if let Some(n) = target {
        let (got, (j, i)) = fewest(&ordered);
        assert!(
            got >= n,
            "{} joining with {} there has {got} pairs, fewer than NTS_MATRIX_PAIRS={n}: raise NTS_MATRIX_MAX_RUNS or NTS_MATRIX_PER_KIND",
            NatKind::ALL[j].short(),
            NatKind::ALL[i].short()
        );
    }
}

/// NAT keep-alives: a team behind port-restricted and sequential symmetric NATs whose UDP
/// mappings expire after `NTS_NAT_TIMEOUT` s (default 30) survives a source outage three times
/// as long: no peer rejoins, and every peer gets the splitter's chunks again afterwards.
/// `cargo test --release --test nat nts_team_survives_a_source_outage -- --ignored --nocapture`
#[test]
#[ignore]
fn nts_team_survives_a_source_outage_longer_than_the_nat_timeout() {
    use std::io::Write;
    if !lab_possible("nts_team_survives_a_source_outage_longer_than_the_nat_timeout") {
        return;
    }
    let _one = support::one_at_a_time();
    let timeout: u32 = std::env::var("NTS_NAT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = support::test_dir("nat-nts-outage");
    let mut lab = Lab::new();
    lab.udp_timeout = timeout;
    let public = lab.public_host("splitter", 1);
    let monitor_host = lab.public_host("monitor", 1);
    let kinds = [NatKind::PortRestricted, NatKind::SymmetricSequential];
    let homes: Vec<Home> = kinds.iter().map(|&k| lab.home(k, 0)).collect();
    let log = std::fs::File::create(support::peer_log(&dir, "splitter")).unwrap();
    let mut cmd = public.command(support::BIN);
    cmd.env("RUST_LOG", "p2psp=info")
        .args([
            "splitter",
            "--nts",
            "--source",
            "-",
            "--header-size",
            "0",
            "--bind",
            &public.ip().to_string(),
            "--port",
            &natlab::SPLITTER_PORT.to_string(),
            "--buffer-size",
            "64",
            "--shards",
            "1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let mut splitter = support::Proc::spawn("splitter", &mut cmd);
    let mut source = splitter.child.stdin.take().unwrap();
    // The monitor's join is refused until the splitter listens.
    natlab::wait_listening(&mut splitter, &dir);
    let feeding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (f2, s2) = (feeding.clone(), stop.clone());
    let feeder = std::thread::spawn(move || {
        // 64 KiB/s (512 kbit/s) in 1 KiB pieces while feeding.
        let piece = [0x5au8; 1024];
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if f2.load(std::sync::atomic::Ordering::Relaxed) && source.write_all(&piece).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_micros(15_625));
        }
    });
    let mut procs = Vec::new();
    let args = |monitor: bool| {
        let mut flags = vec!["--nts", "--stall-timeout", "1000s"];
        if monitor {
            flags.push("--monitor");
        }
        natlab::peer_args(&public, &flags)
    };
    let mut monitor = natlab::spawn_in(&monitor_host, &dir, "monitor", &args(true));
    support::wait_joined(&dir, &mut monitor);
    procs.push(monitor);
    for h in &homes {
        let mut p = natlab::spawn_in(&h.host, &dir, h.nat.kind.name(), &args(false));
        support::wait_joined(&dir, &mut p);
        procs.push(p);
    }
    std::thread::sleep(Duration::from_secs(5));
    // (from the splitter, rejoins, from teammates: relayed or forwarded)
    let counts = |what: &str| -> Vec<(u64, u64, u64)> {
        homes
            .iter()
            .map(|h| {
                let t = &peer_status(&h.host)["totals"];
                let n = |k: &str| t[k].as_u64().unwrap_or(0);
                let v = (
                    n("from_splitter"),
                    n("rejoins"),
                    n("chunks_received").saturating_sub(n("from_splitter")),
                );
                eprintln!(
                    "{what}: {:<21} from splitter {:>6}, from teammates {:>6}, rejoins {}",
                    h.nat.kind.name(),
                    v.0,
                    v.2,
                    v.1
                );
                v
            })
            .collect()
    };
    let before = counts("before");
    let outage = Duration::from_secs(u64::from(timeout) * 3);
    eprintln!("source outage of {outage:?}, NAT UDP timeout {timeout} s");
    feeding.store(false, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(outage);
    feeding.store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(5));
    let after = counts("after");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(procs);
    splitter.kill();
    let _ = feeder.join();
    for (i, h) in homes.iter().enumerate() {
        assert!(before[i].0 > 0, "{}: nothing before", h.nat.kind);
        assert!(
            after[i].0 > before[i].0 + 50,
            "{}: splitter lost it",
            h.nat.kind
        );
        assert_eq!(after[i].1, 0, "{}: rejoined", h.nat.kind);
        // The teammates' mappings survived too: their relays come in again.
        assert!(
            after[i].2 > before[i].2 + 50,
            "{}: teammates' relays lost",
            h.nat.kind
        );
    }
}
