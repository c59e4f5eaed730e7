//! DBS at a peer: relaying, chunk debts, the playout buffer, loss reports and the polite goodbye
//! (reference-notes §5.2, §5.3, §5.5, §5.6).
//!
//! Feed every datagram to [`Peer::handle_datagram`]; send what [`Peer::poll_transmit`] gives;
//! play what [`Peer::poll_event`] gives. Relaying follows the reference exactly: a chunk from the
//! splitter is relayed byte-identical to every neighbour, first to `neighbours[0]` at once, then one
//! more neighbour per chunk received from anybody, and whatever is left goes out in a burst when
//! the next chunk from the splitter arrives. Chunks from neighbours are never relayed.
//!
//! Deliberate differences from the reference (none visible on the wire): chunk numbers compare as
//! serial numbers (no stall at the wrap); a lost chunk is skipped, counted and, by a monitor,
//! reported; when a neighbour is dropped for debt mid-round the next one is not skipped.
//!
//! Hostile input (see `docs/security.md`): anyone can send a peer a hello or a chunk with any
//! source address, so the peer bounds what a stranger can get out of it. A neighbour learnt from a
//! hello is on probation until it sends a chunk: once it has been on probation for
//! [`PeerRules::probation_grace`] (1 s, so that a burst of chunks after a stall cannot drop an
//! honest newcomer) it is dropped as soon as it is owed more than [`PeerRules::probation_debt`]
//! chunks (8), not 128. A forged hello so buys a victim what this peer originates in about a
//! second (a 16th of the stream in a team of 16), at most 129 chunks. A chunk from a stranger makes it a neighbour (a lost hello must not cut a peer off)
//! only if its number is within a buffer of the playout position; other chunks from strangers, and
//! chunks from neighbours that far off, are counted and dropped without crediting any debt. The
//! neighbour list is bounded by [`PeerRules::max_neighbours`].

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Endpoint;
use super::digest::{self, DigestBook, DigestCheck};
use super::integrity::{ChunkVerifier, SIGNATURE_LEN, complaint};
use super::seq;
use super::wire::{CHUNK_HEADER, GOODBYE, HELLO, ToPeer, loss_report};

/// The peer-side DBS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRules {
    /// The splitter's UDP endpoint.
    pub splitter: Endpoint,
    /// Payload bytes per chunk (from the join message).
    pub chunk_size: usize,
    /// Playout buffer size B in chunks, a power of two (from the join message).
    pub buffer_size: u16,
    /// A neighbour we sent this many more chunks than it sent us is dropped (reference: 128).
    pub max_debt: i32,
    /// Whether this peer is a monitor (sends loss reports to the splitter).
    pub monitor: bool,
    /// Whether to relay at all. Only a test of free-riding turns this off.
    pub relay: bool,
    /// How long to wait for the splitter's goodbye before leaving anyway.
    pub leave_timeout: Duration,
    /// A plain peer (not a monitor) also sends loss reports, asking the splitter to resend the
    /// chunks it misses (LRS at a splitter of this project resends them to it alone). Monitors
    /// always report.
    pub request_lost: bool,
    /// A neighbour that has never sent us a chunk (learnt from a hello), on probation for longer
    /// than `probation_grace`, is dropped once owed more than this many chunks.
    pub probation_debt: i32,
    /// How long a neighbour on probation is held only to `max_debt`.
    pub probation_grace: Duration,
    /// Most neighbours. Hellos and chunks from strangers beyond this are counted and ignored
    /// (a stranger on probation may be displaced).
    pub max_neighbours: usize,
    /// CIS (`docs/integrity.md`): the splitter's public key. Chunks then carry a signature and
    /// one that fails is dropped, never played or relayed, and its sender banned and complained
    /// about. `None`: a compat team, nothing verified.
    pub verify: Option<ChunkVerifier>,
}

impl PeerRules {
    /// Rules for a team with the given splitter and sizes, reference defaults otherwise.
    pub fn new(splitter: Endpoint, chunk_size: usize, buffer_size: u16) -> PeerRules {
        PeerRules {
            splitter,
            chunk_size,
            buffer_size,
            max_debt: 128,
            monitor: false,
            relay: true,
            leave_timeout: Duration::from_secs(2),
            request_lost: false,
            probation_debt: 8,
            probation_grace: Duration::from_secs(1),
            // DBS rule 8: a team is never larger than the buffer (reference-notes §5.7).
            max_neighbours: usize::from(buffer_size).max(1),
            verify: None,
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub dest: Endpoint,
    /// The bytes (shared, not copied, when a chunk goes to many neighbours).
    pub payload: Bytes,
}

/// Why a neighbour was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// It said goodbye.
    Goodbye,
    /// Its chunk debt went over the limit (it does not relay to us).
    Debt,
    /// It was on probation and made room for a newcomer when the neighbour list was full.
    Displaced,
    /// It sent a chunk with a bad signature (CIS).
    Polluter,
}

/// Why a peer cannot take part in its team's integrity rules (CIS): the program stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityMismatch {
    /// The splitter signs its chunks, and this peer has no key to check them.
    Signed,
    /// This peer has a key, and the splitter does not sign.
    Unsigned,
    /// The splitter's chunks do not verify with this peer's key.
    WrongKey,
}

impl std::fmt::Display for IntegrityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IntegrityMismatch::Signed => {
                "the splitter signs its chunks: join with --splitter-key HEX (the splitter prints its key at start)"
            }
            IntegrityMismatch::Unsigned => {
                "--splitter-key is given but the splitter does not sign its chunks (start it with --sign KEYFILE, or drop --splitter-key)"
            }
            IntegrityMismatch::WrongKey => {
                "the splitter's chunks do not verify with --splitter-key: check the key the splitter printed"
            }
        })
    }
}

/// Something the program using the peer acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// Buffering is done: playout starts with chunk `first`.
    Started {
        /// The first chunk number played.
        first: u16,
    },
    /// The next chunk in order, to hand to the player.
    Play {
        /// Its number.
        number: u16,
        /// `chunk_size` bytes of stream.
        payload: Bytes,
    },
    /// A chunk was missing at its playout time and is skipped.
    Lost {
        /// Its number.
        number: u16,
    },
    /// The splitter jumped further ahead than the buffer holds; `count` chunks were skipped.
    Skipped {
        /// How many chunk numbers were skipped.
        count: u32,
    },
    /// A new neighbour (from a hello or a chunk).
    NeighbourAdded(Endpoint),
    /// A neighbour was dropped.
    NeighbourRemoved {
        /// Who.
        peer: Endpoint,
        /// Why.
        reason: Removal,
    },
    /// The peer has left the team after [`Peer::leave`]; `confirmed` tells whether the splitter
    /// answered the goodbye before the timeout.
    Left {
        /// Whether the splitter confirmed.
        confirmed: bool,
    },
    /// The splitter said goodbye although we did not leave.
    SplitterGoodbye,
    /// CIS: `peer` sent chunk `number` with a bad signature: it was dropped as a neighbour,
    /// banned, and complained about to the splitter.
    Polluter {
        /// Who.
        peer: Endpoint,
        /// The bad chunk's number.
        number: u16,
    },
    /// CIS: this peer and its splitter disagree on signing; it cannot play (emitted once).
    IntegrityMismatch(IntegrityMismatch),
}

/// What the peer counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Chunk datagrams received (from anybody).
    pub chunks_received: u64,
    /// Of which from the splitter.
    pub from_splitter: u64,
    /// Chunk datagrams relayed to neighbours.
    pub relayed: u64,
    /// Chunks played in order.
    pub played: u64,
    /// Chunks missing at playout time (skipped).
    pub lost: u64,
    /// Chunks that arrived after their playout time.
    pub late: u64,
    /// Chunks received twice.
    pub duplicates: u64,
    /// Chunks from neighbours numbered a buffer or more ahead of the playout position (dropped,
    /// no debt credited). Chunks more than a buffer behind it count as `late`.
    pub out_of_window: u64,
    /// Chunks from strangers numbered a buffer or more ahead (dropped; the sender is not made a
    /// neighbour).
    pub strangers_out_of_window: u64,
    /// Hellos and chunks from strangers not taken as neighbours because the list was full.
    pub neighbours_refused: u64,
    /// Chunks the splitter resent (LRS), to this peer alone or for its team.
    pub resent_received: u64,
    /// Datagrams that are neither a chunk, a hello nor a goodbye.
    pub malformed: u64,
    /// Hellos received.
    pub hellos: u64,
    /// Goodbyes from neighbours.
    pub goodbyes: u64,
    /// Goodbyes from endpoints that are neither neighbours nor the splitter.
    pub stray_goodbyes: u64,
    /// Neighbours dropped for debt.
    pub debt_drops: u64,
    /// Loss reports sent (monitors, and peers with [`PeerRules::request_lost`]), retries included.
    pub loss_reports: u64,
    /// CIS: chunks with a bad signature (dropped, never played or relayed).
    pub bad_chunks: u64,
    /// CIS: of which with the splitter's address (forged by a stranger; nobody blamed).
    pub forged: u64,
    /// CIS: datagrams from banned polluters, ignored unchecked.
    pub from_polluters: u64,
    /// CIS: complaints about polluters sent to the splitter.
    pub complaints: u64,
    /// CIS digest mode: digests whose signature verified.
    pub digests: u64,
    /// CIS digest mode: digests with a bad signature (dropped; the sender blamed as for a chunk).
    pub bad_digests: u64,
    /// CIS digest mode: digests older than the book keeps (replays): dropped unchecked.
    pub stale_digests: u64,
    /// CIS digest mode: digests relayed to neighbours (those from the splitter, once verified).
    pub digests_relayed: u64,
    /// CIS digest mode: digests asked for from the splitter (a chunk waited too long for one).
    pub digest_requests: u64,
    /// CIS digest mode: chunks dropped unverified because no digest came for them in time (or
    /// the pending set was full); never played or relayed.
    pub unverified_dropped: u64,
    /// CIS: Ed25519 signatures checked (per chunk, or per digest).
    pub signatures_checked: u64,
    /// CIS digest mode: chunks checked against a digest's hash.
    pub hashes_checked: u64,
    /// Forwarding fallback (`nts_forward`): chunks the splitter forwarded for teammates this peer
    /// cannot hear from (played, never relayed).
    pub forwarded: u64,
}

impl std::ops::Add for PeerStats {
    type Output = PeerStats;

    /// Field by field: the counts of two team sessions of one peer.
    fn add(self, o: PeerStats) -> PeerStats {
        PeerStats {
            chunks_received: self.chunks_received + o.chunks_received,
            from_splitter: self.from_splitter + o.from_splitter,
            relayed: self.relayed + o.relayed,
            played: self.played + o.played,
            lost: self.lost + o.lost,
            late: self.late + o.late,
            duplicates: self.duplicates + o.duplicates,
            out_of_window: self.out_of_window + o.out_of_window,
            strangers_out_of_window: self.strangers_out_of_window + o.strangers_out_of_window,
            neighbours_refused: self.neighbours_refused + o.neighbours_refused,
            resent_received: self.resent_received + o.resent_received,
            malformed: self.malformed + o.malformed,
            hellos: self.hellos + o.hellos,
            goodbyes: self.goodbyes + o.goodbyes,
            stray_goodbyes: self.stray_goodbyes + o.stray_goodbyes,
            debt_drops: self.debt_drops + o.debt_drops,
            loss_reports: self.loss_reports + o.loss_reports,
            bad_chunks: self.bad_chunks + o.bad_chunks,
            forged: self.forged + o.forged,
            from_polluters: self.from_polluters + o.from_polluters,
            complaints: self.complaints + o.complaints,
            digests: self.digests + o.digests,
            bad_digests: self.bad_digests + o.bad_digests,
            stale_digests: self.stale_digests + o.stale_digests,
            digests_relayed: self.digests_relayed + o.digests_relayed,
            digest_requests: self.digest_requests + o.digest_requests,
            unverified_dropped: self.unverified_dropped + o.unverified_dropped,
            signatures_checked: self.signatures_checked + o.signatures_checked,
            hashes_checked: self.hashes_checked + o.hashes_checked,
            forwarded: self.forwarded + o.forwarded,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Neighbour {
    endpoint: Endpoint,
    debt: i32,
    monitor: bool,
    /// Listed by the splitter, or has sent us a chunk; otherwise on probation.
    proven: bool,
    /// When it became a neighbour.
    since: Option<Instant>,
    /// It has relayed a chunk to us: its debt is forgiven one chunk in [`DEBT_FORGIVEN_EVERY`]
    /// and held to the rate-scaled limit ([`Peer::debt_limit`]).
    relays: bool,
    /// Chunks relayed to it since its debt was last forgiven a chunk.
    since_forgiven: u32,
}

/// A neighbour that relays is forgiven one chunk of debt for every this many chunks relayed to
/// it: a datagram lost on the way (a socket buffer overflowing for a moment, a lossy link) raises
/// its debt for good otherwise, and at 8,000 chunks/s a 0.1 % loss reaches 128 in 16 s, so two
/// honest peers dropped each other. Losses up to one in 16 (6 %) no longer add up; a free rider
/// that relays nothing is not forgiven at all (dropped after 129 chunks, as in the reference).
pub const DEBT_FORGIVEN_EVERY: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Member,
    Leaving { deadline: Instant },
    Left,
}

/// Playout state: a circular buffer of B slots indexed by `chunk number % B`.
#[derive(Debug)]
struct Playout {
    slots: Vec<Option<(u16, Bytes)>>,
    /// Next chunk number to play; `None` until the first chunk from the splitter.
    next: Option<u16>,
    /// Monitors and peers that ask for their losses: for each report horizon (chunks behind the
    /// newest), the next chunk number to check. The first is the report, the others retries
    /// (a resend may be lost as well).
    checks: Vec<(i32, u16)>,
    /// `n` at `n % B` for the chunks this peer reported, to recognise their resends.
    reported: Vec<Option<u16>>,
    /// Monitors: the next chunk number to check at the early horizon ([`early_horizon`]).
    early: Option<u16>,
    /// When each chunk number was first known to exist (it, or a later one, arrived), at
    /// `n % B`: a monitor reports a chunk only once it is [`Peer::report_floor`] old.
    seen_at: Vec<Option<(u16, Instant)>>,
    /// Chunks per second, measured over the last whole second of arrivals.
    rate: f64,
    /// When the rate was last measured, and the newest chunk number then.
    rate_mark: Option<(Instant, u16)>,
    highest: u16,
    started: bool,
}

/// How far behind the newest chunk ([`Peer::estimated_newest`]) a monitor first reports a
/// missing chunk, when that is sooner than its first fixed horizon: the team's round (`team`
/// chunks: a peer relays a chunk one datagram per chunk it receives and bursts the rest at its
/// next chunk from the splitter, so the last teammate has it within a round) plus a quarter of a
/// second of stream (`rate` chunks/s, at least 2 chunks) for the jitter of a busy host. A monitor
/// uses it only once it has measured the rate (after its first second of chunks).
/// Every report also waits until the chunk is [`Peer::report_floor`] old.
///
/// With the usual buffer of 256 chunks the fixed horizon is 64 chunks: half a second at 1 Mbit/s
/// but 8 s at 64 kbit/s, where a team of 16 gives each peer one chunk every 2 s. Reporting after
/// a round instead lets the splitter judge a dead peer within a few seconds at any rate
/// (`docs/recovery.md`, "Expulsion").
fn early_horizon(team: usize, rate: f64) -> i32 {
    let quarter_second = (rate * 0.25).ceil().min(f64::from(i32::MAX)) as i32;
    (team as i32).saturating_add(quarter_second.max(2))
}

/// Bounds of [`Peer::report_floor`].
const REPORT_FLOOR: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(300));

/// How far behind the newest chunk a missing chunk is reported, first and then again, by a
/// monitor (`monitor`) or by a plain peer that asks for its losses. Empty if it reports nothing.
///
/// A monitor reports a quarter of a buffer behind the newest chunk and retries every sixteenth
/// until half a buffer (playout), four times in all with the usual B: a resend can be lost as
/// well, and the splitter blames the chunk's origin once however often it is reported. A plain
/// peer asks from three eighths on, every thirty-second: a chunk the whole team lost comes back
/// through the monitor before that, and only its own losses are left to ask for.
fn report_horizons(buffer: usize, reports: bool, monitor: bool) -> Vec<i32> {
    if !reports {
        return Vec::new();
    }
    let half = (buffer / 2) as i32;
    let (first, step) = if monitor {
        (buffer / 4, buffer / 16)
    } else {
        (3 * buffer / 8, buffer / 32)
    };
    let (first, step) = ((first as i32).max(1), (step as i32).max(1));
    let mut out: Vec<i32> = (0..4)
        .map(|k| first + k * step)
        .filter(|&h| h < half)
        .collect();
    if out.is_empty() {
        out.push(first);
    }
    out
}

/// One DBS peer.
#[derive(Debug)]
pub struct Peer {
    rules: PeerRules,
    neighbours: Vec<Neighbour>,
    /// The last chunk datagram from the splitter, relayed byte-identical.
    prev: Option<Bytes>,
    /// Whether `prev` is a chunk the splitter resent (LRS): relaying it charges no debt, since the
    /// neighbours cannot return the favour.
    prev_resent: bool,
    /// Number of the newest chunk the splitter sent us.
    newest_from_splitter: Option<u16>,
    /// Chunks from neighbours since then: the stream went on by about as many chunks.
    since_from_splitter: u32,
    /// Index of the next neighbour `prev` goes to.
    counter: usize,
    modified_list: bool,
    playout: Playout,
    membership: Membership,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PeerEvent>,
    stats: PeerStats,
    /// The time of the datagram being handled.
    now: Option<Instant>,
    /// CIS: the last [`MAX_BANNED`] peers that sent bad chunks, ignored from then on.
    banned: HashSet<Endpoint>,
    banned_order: VecDeque<Endpoint>,
    /// CIS: chunks from the splitter that verified.
    splitter_verified: u64,
    /// CIS: whether [`PeerEvent::IntegrityMismatch`] was emitted.
    mismatch: bool,
    /// CIS: chunk-like datagrams from the splitter of the other kind (signed or not).
    other_kind: u32,
    /// CIS digest mode: verified digests and the chunks waiting for theirs.
    book: Option<DigestBook>,
    /// CIS: when the first chunk from the splitter arrived (a key holder whose splitter signs
    /// nothing finds out from the time that passes without any valid signature).
    first_from_splitter: Option<Instant>,
}

/// CIS: a peer with a key that has had chunks from the splitter for this long and not one valid
/// signature or digest stops ([`IntegrityMismatch::Unsigned`]).
pub const UNSIGNED_AFTER: Duration = Duration::from_secs(2);

/// CIS: how many chunks from the splitter of the wrong kind (or that fail with this peer's key),
/// and none good, make a [`PeerEvent::IntegrityMismatch`].
pub const MISMATCH_AFTER: u32 = 4;

/// How many polluters a peer remembers (oldest forgotten first).
pub const MAX_BANNED: usize = 256;

impl Peer {
    /// A peer that just read its join message: `peers` is the team list, whose first `monitors`
    /// entries are monitors; a hello goes to each.
    ///
    /// Monitors come last in the relay order (the reference relays to them first). A peer that
    /// vanishes in the middle of relaying a chunk then always leaves a monitor without it, so the
    /// monitor reports the loss and LRS recovers it for the whole team; the other way round the
    /// monitor would have it and the peers that missed it could not say so.
    pub fn new(rules: PeerRules, peers: &[Endpoint], monitors: u16) -> Peer {
        let b = usize::from(rules.buffer_size.max(2));
        let mut peer = Peer {
            rules,
            neighbours: Vec::with_capacity(peers.len()),
            prev: None,
            prev_resent: false,
            newest_from_splitter: None,
            since_from_splitter: 0,
            counter: 0,
            modified_list: false,
            playout: Playout {
                slots: vec![None; b],
                next: None,
                checks: report_horizons(b, rules.monitor || rules.request_lost, rules.monitor)
                    .into_iter()
                    .map(|h| (h, 0))
                    .collect(),
                reported: vec![None; b],
                early: rules.monitor.then_some(0),
                seen_at: vec![None; b],
                rate: 0.0,
                rate_mark: None,
                highest: 0,
                started: false,
            },
            membership: Membership::Member,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: PeerStats::default(),
            now: None,
            banned: HashSet::new(),
            banned_order: VecDeque::new(),
            splitter_verified: 0,
            mismatch: false,
            other_kind: 0,
            book: rules.verify.map(|_| DigestBook::new(b)),
            first_from_splitter: None,
        };
        let m = usize::from(monitors).min(peers.len());
        for (i, &p) in peers
            .iter()
            .enumerate()
            .skip(m)
            .chain(peers.iter().enumerate().take(m))
        {
            if p != rules.splitter && peer.position(p).is_none() {
                peer.neighbours.push(Neighbour {
                    endpoint: p,
                    debt: 0,
                    monitor: i < m,
                    proven: true,
                    since: None,
                    relays: false,
                    since_forgiven: 0,
                });
                peer.send(p, Bytes::from_static(HELLO));
            }
        }
        peer
    }

    fn position(&self, ep: Endpoint) -> Option<usize> {
        self.neighbours.iter().position(|n| n.endpoint == ep)
    }

    fn send(&mut self, dest: Endpoint, payload: Bytes) {
        self.transmits.push_back(Transmit { dest, payload });
    }

    /// Takes a stranger as a neighbour: `proven` if it sent a chunk, on probation after a hello.
    /// Returns whether it was taken.
    fn adopt(&mut self, ep: Endpoint, proven: bool) -> bool {
        if self.neighbours.len() >= self.rules.max_neighbours {
            // Full: a neighbour on probation (never sent a chunk) makes room, the most indebted
            // first; otherwise the stranger is ignored.
            let victim = self
                .neighbours
                .iter()
                .enumerate()
                .filter(|(_, n)| !n.proven)
                .max_by_key(|(_, n)| n.debt)
                .map(|(i, _)| i);
            match victim {
                Some(i) if proven || self.neighbours[i].debt > 0 => {
                    self.remove_neighbour(i, Removal::Displaced)
                }
                _ => {
                    self.stats.neighbours_refused += 1;
                    return false;
                }
            }
        }
        self.add_neighbour(ep, proven);
        true
    }

    fn add_neighbour(&mut self, ep: Endpoint, proven: bool) {
        // Newcomers go before the monitors, which stay last in the relay order.
        let at = self
            .neighbours
            .iter()
            .rposition(|n| !n.monitor)
            .map_or(0, |i| i + 1);
        if at < self.counter {
            self.counter += 1;
        }
        self.neighbours.insert(
            at,
            Neighbour {
                endpoint: ep,
                debt: 0,
                monitor: false,
                proven,
                since: self.now,
                relays: false,
                since_forgiven: 0,
            },
        );
        self.events.push_back(PeerEvent::NeighbourAdded(ep));
    }

    /// Handles one datagram received at `now` from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: Endpoint, data: Bytes) {
        self.now = Some(now);
        if self.membership == Membership::Left {
            return;
        }
        let trailer = if self.rules.verify.is_some() {
            SIGNATURE_LEN
        } else {
            0
        };
        if from == self.rules.splitter && !digest::is_digest(&data) {
            // NTS forwarding fallback: a chunk (of either signed kind) plus the forward mark.
            let c = CHUNK_HEADER + self.rules.chunk_size;
            let forwarded = super::nts_forward::parse_forwarded(&data, c + trailer)
                .or_else(|| {
                    (trailer > 0)
                        .then(|| super::nts_forward::parse_forwarded(&data, c))
                        .flatten()
                })
                .map(<[u8]>::len);
            if let Some(len) = forwarded {
                let chunk = data.slice(..len);
                self.on_forwarded(from, chunk);
                return;
            }
        }
        if self.rules.verify.is_some() {
            // CIS digest mode: compat-sized chunks are checked against digests, and digests
            // (never the length of a chunk of either kind) are verified and stored.
            let c = CHUNK_HEADER + self.rules.chunk_size;
            if from == self.rules.splitter
                && self.first_from_splitter.is_none()
                && (data.len() == c || data.len() == c + SIGNATURE_LEN)
            {
                self.first_from_splitter = Some(now);
            }
            if data.len() == c {
                self.on_digest_chunk(now, from, data);
                return;
            }
            if data.len() != c + SIGNATURE_LEN && digest::is_digest(&data) {
                self.on_digest(from, data);
                return;
            }
        }
        match ToPeer::parse(&data, self.rules.chunk_size + trailer) {
            ToPeer::Chunk { number, .. } => {
                // A chunk from a neighbour or stranger that far off is dropped by `on_chunk`
                // without any effect: not worth a signature check (a flood of them costs nothing).
                let unused = from != self.rules.splitter && !self.in_window(number);
                if self.rules.verify.is_none() || unused || self.verified(from, number, &data) {
                    self.on_chunk(from, number, data)
                }
            }
            ToPeer::Hello => {
                self.stats.hellos += 1;
                if from != self.rules.splitter
                    && self.position(from).is_none()
                    && !self.banned.contains(&from)
                {
                    self.adopt(from, false);
                }
            }
            ToPeer::Goodbye => self.on_goodbye(from),
            ToPeer::Malformed => {
                self.stats.malformed += 1;
                // A chunk from the splitter of the other kind (signed or not) than this peer's.
                let c = CHUNK_HEADER + self.rules.chunk_size;
                let other = if trailer == 0 { c + SIGNATURE_LEN } else { c };
                // A digest tells a peer without a key that its team is signed, from the
                // splitter or relayed by a neighbour (the splitter sends each digest to one or
                // two members of a team).
                let digest = trailer == 0
                    && digest::is_digest(&data)
                    && (from == self.rules.splitter || self.position(from).is_some());
                if (from == self.rules.splitter && data.len() == other) || digest {
                    self.other_kind += 1;
                    // Only before any good chunk from the splitter, and not on one datagram: a
                    // stranger forging the splitter's address must not end a peer that plays.
                    // Digests are the exception: a digest-signing splitter sends compat-sized
                    // chunks, which a peer without a key plays unchecked.
                    let good = if digest::is_digest(&data) {
                        false
                    } else if trailer == 0 {
                        self.stats.from_splitter > 0
                    } else {
                        self.splitter_verified > 0
                    };
                    if !good && self.other_kind >= MISMATCH_AFTER {
                        self.mismatch(if trailer == 0 {
                            IntegrityMismatch::Signed
                        } else {
                            IntegrityMismatch::Unsigned
                        });
                    }
                }
            }
        }
    }

    fn mismatch(&mut self, m: IntegrityMismatch) {
        if !self.mismatch {
            self.mismatch = true;
            self.events.push_back(PeerEvent::IntegrityMismatch(m));
        }
    }

    /// CIS: checks the signature of chunk `number` from `from`. A bad one is counted; its sender
    /// (unless it has the splitter's address: a forgery nobody can be blamed for) is dropped as a
    /// neighbour, banned and complained about. Chunks from banned senders are not checked again.
    fn verified(&mut self, from: Endpoint, number: u16, data: &[u8]) -> bool {
        if self.banned.contains(&from) {
            self.stats.from_polluters += 1;
            return false;
        }
        self.stats.signatures_checked += 1;
        if self.rules.verify.is_some_and(|v| v.verify(data)) {
            if from == self.rules.splitter {
                self.splitter_verified += 1;
            }
            return true;
        }
        self.reject(from, number);
        false
    }

    /// CIS: chunk `number` from `from` failed its check (a bad signature or hash): counted; its
    /// sender (unless it has the splitter's address) dropped, banned and complained about.
    fn reject(&mut self, from: Endpoint, number: u16) {
        self.stats.bad_chunks += 1;
        self.blame(from, number);
    }

    /// CIS: `from` sent something that failed its check (a chunk numbered `number`, or a digest).
    fn blame(&mut self, from: Endpoint, number: u16) {
        if from == self.rules.splitter {
            self.stats.forged += 1;
            // Not one chunk from the splitter verified: the key is wrong, not a forger.
            if self.splitter_verified == 0 && self.stats.forged >= u64::from(MISMATCH_AFTER) {
                self.mismatch(IntegrityMismatch::WrongKey);
            }
            return;
        }
        if self.splitter_verified == 0 {
            // Until a chunk from the splitter verified, a failure may be this peer's wrong key:
            // nobody is blamed yet (the chunk is dropped all the same).
            return;
        }
        if self.banned.contains(&from) {
            return;
        }
        if self.banned_order.len() >= MAX_BANNED
            && let Some(old) = self.banned_order.pop_front()
        {
            self.banned.remove(&old);
        }
        self.banned.insert(from);
        self.banned_order.push_back(from);
        if let Some(i) = self.position(from) {
            self.remove_neighbour(i, Removal::Polluter);
        }
        self.events
            .push_back(PeerEvent::Polluter { peer: from, number });
        self.stats.complaints += 1;
        self.send(
            self.rules.splitter,
            Bytes::copy_from_slice(&complaint(from, number)),
        );
    }

    /// CIS digest mode: a compat-sized chunk, checked against its digest, or held until that
    /// arrives (never played or relayed before).
    fn on_digest_chunk(&mut self, now: Instant, from: Endpoint, data: Bytes) {
        let number = u16::from_be_bytes([data[0], data[1]]);
        if self.banned.contains(&from) {
            self.stats.from_polluters += 1;
            return;
        }
        if from != self.rules.splitter && !self.in_window(number) {
            // Dropped by `on_chunk` without effect: not worth a check.
            self.on_chunk(from, number, data);
            return;
        }
        let Some(book) = &mut self.book else { return };
        match book.check_chunk(number, &data) {
            Some(ok) => self.judge(from, number, data, ok),
            None => {
                if book.hold(from, number, data, now).is_some() {
                    self.stats.unverified_dropped += 1;
                }
            }
        }
    }

    /// CIS digest mode: a chunk checked against its digest's hash: played and relayed as usual
    /// if it matches, rejected if not.
    fn judge(&mut self, from: Endpoint, number: u16, data: Bytes, ok: bool) {
        self.stats.hashes_checked += 1;
        if ok {
            if from == self.rules.splitter {
                self.splitter_verified += 1;
            }
            self.on_chunk(from, number, data);
        } else if !self.banned.contains(&from) {
            self.reject(from, number);
        } else {
            self.stats.from_polluters += 1;
        }
    }

    /// CIS digest mode: a digest datagram. A good one from the splitter is relayed to every
    /// neighbour; the chunks waiting for it are then judged.
    fn on_digest(&mut self, from: Endpoint, data: Bytes) {
        if self.banned.contains(&from) {
            self.stats.from_polluters += 1;
            return;
        }
        let (Some(book), Some(key)) = (&mut self.book, &self.rules.verify) else {
            return;
        };
        match book.check_digest(&data, key) {
            DigestCheck::Malformed => self.stats.malformed += 1,
            DigestCheck::Stale => self.stats.stale_digests += 1,
            DigestCheck::Duplicate => {}
            DigestCheck::Bad => {
                self.stats.signatures_checked += 1;
                self.stats.bad_digests += 1;
                let first = digest::Digest::parse(&data).map_or(0, |d| d.first as u16);
                self.blame(from, first);
            }
            DigestCheck::Good => {
                self.stats.signatures_checked += 1;
                self.stats.digests += 1;
                if from == self.rules.splitter {
                    self.splitter_verified += 1;
                    if self.rules.relay && self.membership == Membership::Member {
                        for i in 0..self.neighbours.len() {
                            let dest = self.neighbours[i].endpoint;
                            self.send(dest, data.clone());
                            self.stats.digests_relayed += 1;
                        }
                    }
                }
                let mut released = Vec::new();
                if let Some(book) = &mut self.book {
                    book.release(&mut released);
                }
                for h in released {
                    let ok = self
                        .book
                        .as_ref()
                        .and_then(|b| b.check_chunk(h.number, &h.data))
                        .unwrap_or(false);
                    self.judge(h.from, h.number, h.data, ok);
                }
            }
        }
    }

    fn on_goodbye(&mut self, from: Endpoint) {
        if let Some(i) = self.position(from) {
            self.stats.goodbyes += 1;
            self.remove_neighbour(i, Removal::Goodbye);
        } else if from == self.rules.splitter {
            if matches!(self.membership, Membership::Leaving { .. }) {
                self.farewell(true);
            } else {
                self.events.push_back(PeerEvent::SplitterGoodbye);
            }
        } else {
            self.stats.stray_goodbyes += 1;
        }
    }

    fn remove_neighbour(&mut self, i: usize, reason: Removal) {
        let n = self.neighbours.remove(i);
        if i < self.counter {
            self.counter -= 1;
            self.modified_list = true;
        }
        self.events.push_back(PeerEvent::NeighbourRemoved {
            peer: n.endpoint,
            reason,
        });
    }

    /// Sends `prev` to `neighbours[counter]` and charges its debt.
    fn relay_next(&mut self) {
        let Some(prev) = self.prev.clone() else {
            return;
        };
        let i = self.counter;
        let burst = self.debt_burst();
        let n = &mut self.neighbours[i];
        if !self.prev_resent {
            n.debt += 1;
            if n.relays {
                n.since_forgiven += 1;
                if n.since_forgiven >= DEBT_FORGIVEN_EVERY {
                    n.since_forgiven = 0;
                    n.debt = (n.debt - 1).max(0);
                }
            }
        }
        let probation_over = match (n.since, self.now) {
            (Some(since), Some(now)) => now.duration_since(since) >= self.rules.probation_grace,
            _ => false,
        };
        let limit = if n.relays {
            self.rules.max_debt.max(burst)
        } else if n.proven || !probation_over {
            self.rules.max_debt
        } else {
            self.rules.probation_debt.min(self.rules.max_debt)
        };
        let (dest, debt) = (n.endpoint, n.debt);
        self.send(dest, prev);
        self.stats.relayed += 1;
        if debt > limit {
            // Dropped; the next neighbour moves into slot `i`, so `counter` stays. The list
            // changed mid-chunk: mark it, so that the next burst finishes this chunk even when
            // `counter` is still 0 (the drop was its first relay).
            self.stats.debt_drops += 1;
            self.modified_list = true;
            self.neighbours.remove(i);
            self.events.push_back(PeerEvent::NeighbourRemoved {
                peer: dest,
                reason: Removal::Debt,
            });
        } else {
            self.counter += 1;
        }
    }

    /// A quarter of a second of the chunks this peer relays to each neighbour (its share of the
    /// stream, measured rate over team size): the debt a neighbour that relays may run up while
    /// it is stalled for a moment. At 16,000 chunks/s in a team of 2 that is 2,000 chunks, where
    /// a fixed 128 is 16 ms of a busy host; at 1 Mbit/s in a team of 16 it is 2, so `max_debt`
    /// decides, as in the reference.
    fn debt_burst(&self) -> i32 {
        let share = self.playout.rate / (self.neighbours.len() + 1) as f64;
        (share / 4.0).min(f64::from(i32::MAX)) as i32
    }

    /// Whether a chunk number from anybody but the splitter is near enough to the playout
    /// position to be of use: within a buffer either side. Before the first chunk from the
    /// splitter there is no position yet and every number is taken.
    fn in_window(&self, number: u16) -> bool {
        let b = self.playout.slots.len() as i32;
        self.playout.next.is_none_or(|next| {
            let d = seq::diff(number, next);
            (-b..b).contains(&d)
        })
    }

    /// A chunk the splitter forwarded for a teammate this peer cannot hear from: played like a
    /// neighbour's relay, but nobody's debt changes and nothing is relayed.
    fn on_forwarded(&mut self, from: Endpoint, data: Bytes) {
        let number = u16::from_be_bytes([data[0], data[1]]);
        self.stats.forwarded += 1;
        if !self.in_window(number) {
            self.stats.out_of_window += 1;
            return;
        }
        if self.rules.verify.is_some() {
            let ok = if data.len() == CHUNK_HEADER + self.rules.chunk_size {
                // CIS digest mode: checked against its group's digest. A copy whose digest is
                // not here yet is dropped, not held: a forwarded chunk is never relayed, and a
                // held chunk would be once checked.
                match self.book.as_mut().map(|b| b.check_chunk(number, &data)) {
                    Some(Some(true)) => {
                        self.stats.hashes_checked += 1;
                        true
                    }
                    Some(Some(false)) => {
                        self.stats.hashes_checked += 1;
                        self.reject(from, number);
                        false
                    }
                    _ => {
                        self.stats.unverified_dropped += 1;
                        false
                    }
                }
            } else {
                self.verified(from, number, &data)
            };
            if !ok {
                return;
            }
        }
        self.stats.chunks_received += 1;
        self.since_from_splitter += 1;
        self.store(number, data, false);
    }

    fn on_chunk(&mut self, from: Endpoint, number: u16, data: Bytes) {
        self.stats.chunks_received += 1;
        let from_splitter = from == self.rules.splitter;
        if from_splitter {
            self.stats.from_splitter += 1;
            let slot = usize::from(number) % self.playout.reported.len();
            if !self.rules.monitor && self.playout.reported[slot] == Some(number) {
                // A resend this peer asked for itself: play it, relay nothing (a monitor's
                // resends are for its team and are relayed like any chunk from the splitter).
                self.stats.resent_received += 1;
                self.store(number, data, true);
                return;
            }
            let resent = self
                .newest_from_splitter
                .is_some_and(|m| !seq::gt(number, m));
            self.stats.resent_received += u64::from(resent);
            if self.rules.relay {
                // Burst: finish relaying the previous chunk from the splitter.
                while self.counter < self.neighbours.len()
                    && (self.counter > 0 || self.modified_list)
                {
                    self.relay_next();
                }
            }
            self.modified_list = false;
            self.counter = 0;
            self.prev = Some(data.clone());
            self.prev_resent = resent;
            if !resent {
                self.newest_from_splitter = Some(number);
                self.since_from_splitter = 0;
            }
        } else {
            let near = self.in_window(number);
            let behind = self.playout.next.is_some_and(|next| seq::lt(number, next));
            match self.position(from) {
                Some(i) if near => {
                    let n = &mut self.neighbours[i];
                    n.debt -= 1;
                    n.proven = true;
                    n.relays = true;
                    self.since_from_splitter += 1;
                }
                // Far off: no use, no debt credited, nobody adopted, and it clocks no relay. Far
                // behind the playout position it still counts as late.
                _ if !near && behind => {
                    self.stats.late += 1;
                    return;
                }
                Some(_) => {
                    self.stats.out_of_window += 1;
                    return;
                }
                // Neighbours are also learnt from their chunks, as in the reference: a lost hello
                // must not cut a peer off. If the list is full the chunk is still of use.
                None if near => {
                    self.adopt(from, true);
                }
                None => {
                    self.stats.strangers_out_of_window += 1;
                    return;
                }
            }
        }
        if matches!(self.membership, Membership::Leaving { .. }) {
            self.send(self.rules.splitter, Bytes::from_static(GOODBYE));
        }
        // Congestion avoidance: one relayed datagram per received chunk.
        if self.rules.relay && self.prev.is_some() && self.counter < self.neighbours.len() {
            self.relay_next();
        }
        self.store(number, data, from_splitter);
    }

    fn store(&mut self, number: u16, data: Bytes, from_splitter: bool) {
        let b = self.playout.slots.len();
        let slot = usize::from(number) % b;
        let Some(next) = self.playout.next else {
            if from_splitter {
                // Playout starts at the first chunk from the splitter (as the reference does).
                self.playout.next = Some(number);
                for c in &mut self.playout.checks {
                    c.1 = number;
                }
                self.playout.highest = number.wrapping_sub(1);
                self.raise_highest(number);
                let ahead: Vec<u16> = self
                    .playout
                    .slots
                    .iter()
                    .flatten()
                    .map(|(n, _)| *n)
                    .filter(|&n| {
                        let d = seq::diff(n, number);
                        d > 0 && (d as usize) < b
                    })
                    .collect();
                for n in ahead {
                    self.raise_highest(n);
                }
                self.put(slot, number, data);
                self.advance();
            } else if self.playout.slots[slot]
                .as_ref()
                .is_some_and(|s| s.0 == number)
            {
                self.stats.duplicates += 1;
            } else {
                self.playout.slots[slot] = Some((number, data));
            }
            return;
        };
        let d = seq::diff(number, next);
        if d < 0 {
            self.stats.late += 1;
            return;
        }
        if d as usize >= b && !from_splitter {
            self.stats.out_of_window += 1;
            return;
        }
        self.put(slot, number, data);
        self.advance();
    }

    fn put(&mut self, slot: usize, number: u16, data: Bytes) {
        if self.playout.slots[slot]
            .as_ref()
            .is_some_and(|s| s.0 == number)
        {
            self.stats.duplicates += 1;
            return;
        }
        self.playout.slots[slot] = Some((number, data));
        self.raise_highest(number);
    }

    /// `number` arrived: if it is the newest, every number up to it is now known to exist.
    fn raise_highest(&mut self, number: u16) {
        if !seq::gt(number, self.playout.highest) {
            return;
        }
        if let Some(now) = self.now {
            let b = self.playout.seen_at.len();
            let from = seq::diff(number, self.playout.highest).min(b as i32);
            for k in (0..from).rev() {
                let n = number.wrapping_sub(k as u16);
                self.playout.seen_at[usize::from(n) % b] = Some((n, now));
            }
        }
        self.playout.highest = number;
    }

    /// How old a missing chunk must be before a monitor reports it: four rounds of the team, or
    /// a quarter of the buffer if that is sooner (LRS needs the report before playout), at the
    /// measured rate, between 20 and 300 ms; 20 ms until the rate is known. A count of chunks
    /// behind the newest is no clock: when the source bursts (Icecast sends its burst of several
    /// seconds on connect), dozens of chunks arrive within milliseconds, and a report then would
    /// blame peers that had no time to relay.
    fn report_floor(&self) -> Duration {
        let (least, most) = REPORT_FLOOR;
        if self.playout.rate <= 0.0 {
            return least;
        }
        let rounds = (4 * (self.neighbours.len() + 1)).min(self.playout.slots.len() / 4);
        let secs = rounds as f64 / self.playout.rate;
        Duration::from_secs_f64(secs.min(most.as_secs_f64())).max(least)
    }

    /// Plays every chunk that is at least B/2 behind the newest one. A monitor reports a chunk
    /// still missing a quarter of a buffer behind the newest: early enough for a resent chunk
    /// (LRS) to reach the whole team, itself included, before anyone plays it.
    fn advance(&mut self) {
        let b = self.playout.slots.len();
        let half = (b / 2) as i32;
        let Some(mut next) = self.playout.next else {
            return;
        };
        let ahead = seq::diff(self.playout.highest, next);
        if ahead >= b as i32 {
            // The splitter jumped ahead of what the buffer can hold: skip to half a buffer behind.
            let count = (ahead - half) as u32;
            self.stats.lost += u64::from(count);
            self.events.push_back(PeerEvent::Skipped { count });
            next = next.wrapping_add(count as u16);
        }
        self.measure_rate();
        // The early horizon needs the rate: until the first second of arrivals is measured, a
        // quarter second of stream is unknown, and a round plus 2 chunks is a fraction of a
        // millisecond at 16,000 chunks/s, far less than a teammate's relay takes on a busy host.
        let measured = self.playout.rate > 0.0;
        if let Some(cursor) = self.playout.early
            && measured
        {
            let fixed = self.playout.checks.first().map_or(half, |c| c.0);
            let team = self.neighbours.len() + 1;
            let h = early_horizon(team, self.playout.rate);
            if h < fixed {
                let newest = self.estimated_newest(team);
                self.playout.early = Some(self.report_missing(cursor, h, next, newest));
            }
        }
        for i in 0..self.playout.checks.len() {
            let (horizon, cursor) = self.playout.checks[i];
            let newest = self.playout.highest;
            self.playout.checks[i].1 = self.report_missing(cursor, horizon, next, newest);
        }
        if !measured && self.playout.early.is_some() {
            // Start the early checks where the fixed ones are, not to report a chunk twice.
            self.playout.early = Some(self.playout.checks.first().map_or(next, |c| c.1));
        }
        while seq::diff(self.playout.highest, next) >= half {
            if !self.playout.started {
                self.playout.started = true;
                self.events.push_back(PeerEvent::Started { first: next });
            }
            let slot = usize::from(next) % b;
            match self.playout.slots[slot].take() {
                Some((n, data)) if n == next => {
                    self.stats.played += 1;
                    self.events.push_back(PeerEvent::Play {
                        number: n,
                        payload: data.slice(CHUNK_HEADER..CHUNK_HEADER + self.rules.chunk_size),
                    });
                }
                other => {
                    self.playout.slots[slot] = other;
                    self.stats.lost += 1;
                    self.events.push_back(PeerEvent::Lost { number: next });
                    // A monitor reports every chunk missing at playout (the reference's moment),
                    // also one too young for its earlier checks.
                    if self.rules.monitor && self.playout.reported[slot] != Some(next) {
                        self.stats.loss_reports += 1;
                        self.playout.reported[slot] = Some(next);
                        self.send(
                            self.rules.splitter,
                            Bytes::copy_from_slice(&loss_report(next)),
                        );
                    }
                }
            }
            next = next.wrapping_add(1);
        }
        self.playout.next = Some(next);
    }

    /// Measures the chunk rate once a second from the newest chunk number.
    fn measure_rate(&mut self) {
        let Some(now) = self.now else { return };
        match self.playout.rate_mark {
            None => self.playout.rate_mark = Some((now, self.playout.highest)),
            Some((at, from)) if now.duration_since(at) >= Duration::from_secs(1) => {
                let chunks = seq::diff(self.playout.highest, from).max(0);
                self.playout.rate = f64::from(chunks) / now.duration_since(at).as_secs_f64();
                self.playout.rate_mark = Some((now, self.playout.highest));
            }
            Some(_) => {}
        }
    }

    /// Where the stream is, as far as this peer can tell without a clock: the newest chunk it
    /// holds, or the newest chunk the splitter sent it plus the chunks its neighbours relayed
    /// since (at most a round: its next chunk from the splitter comes within one), whichever is
    /// further. In a team every relay reaches the monitor last, a round after the chunk left the
    /// splitter, so the newest chunk it holds lags by up to a round between its own chunks; a
    /// stalled source stops both.
    fn estimated_newest(&self, team: usize) -> u16 {
        let Some(own) = self.newest_from_splitter else {
            return self.playout.highest;
        };
        let ahead = self.since_from_splitter.min(team as u32) as u16;
        let est = own.wrapping_add(ahead);
        if seq::gt(est, self.playout.highest) {
            est
        } else {
            self.playout.highest
        }
    }

    /// Sends a loss report for every chunk from `cursor` on that is missing `horizon` chunks
    /// behind `newest`; returns the new cursor.
    fn report_missing(&mut self, mut cursor: u16, horizon: i32, next: u16, newest: u16) -> u16 {
        let b = self.playout.slots.len();
        if seq::lt(cursor, next) {
            cursor = next;
        }
        let floor = self.rules.monitor.then(|| self.report_floor());
        while seq::diff(newest, cursor) >= horizon {
            let n = cursor;
            let slot = usize::from(n) % b;
            if let (Some(floor), Some(now), Some((seen, at))) =
                (floor, self.now, self.playout.seen_at[slot])
                && seen == n
                && now.saturating_duration_since(at) < floor
            {
                break;
            }
            if self.playout.slots[slot].as_ref().is_none_or(|s| s.0 != n) {
                self.stats.loss_reports += 1;
                self.playout.reported[slot] = Some(n);
                self.send(self.rules.splitter, Bytes::copy_from_slice(&loss_report(n)));
            }
            cursor = n.wrapping_add(1);
        }
        cursor
    }

    /// Starts leaving politely: goodbye to the splitter now and with every chunk received until
    /// the splitter answers (or `leave_timeout` passes); then the pending relays and a goodbye to
    /// every neighbour. Relaying goes on meanwhile, so the team loses nothing.
    pub fn leave(&mut self, now: Instant) {
        if self.membership == Membership::Member {
            self.membership = Membership::Leaving {
                deadline: now + self.rules.leave_timeout,
            };
            self.send(self.rules.splitter, Bytes::from_static(GOODBYE));
        }
    }

    fn farewell(&mut self, confirmed: bool) {
        if self.rules.relay
            && let Some(prev) = self.prev.clone()
        {
            for i in self.counter..self.neighbours.len() {
                self.send(self.neighbours[i].endpoint, prev.clone());
                self.stats.relayed += 1;
            }
        }
        for i in 0..self.neighbours.len() {
            self.send(self.neighbours[i].endpoint, Bytes::from_static(GOODBYE));
        }
        self.membership = Membership::Left;
        self.events.push_back(PeerEvent::Left { confirmed });
    }

    /// When [`Peer::handle_timeout`] next has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let leaving = match self.membership {
            Membership::Leaving { deadline } => Some(deadline),
            _ => None,
        };
        let digest = self.book.as_ref().and_then(|b| b.next_deadline());
        match (leaving, digest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Leaves without the splitter's confirmation once the goodbye timed out.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Membership::Leaving { deadline } = self.membership
            && now >= deadline
        {
            self.farewell(false);
        }
        self.digest_timeouts(now);
    }

    /// CIS digest mode: asks the splitter for the digests chunks have waited too long for, drops
    /// chunks that waited for good, and names a splitter that signs nothing.
    fn digest_timeouts(&mut self, now: Instant) {
        let Some(book) = &mut self.book else { return };
        self.stats.unverified_dropped += book.expire(now) as u64;
        if self.membership != Membership::Left {
            for n in book.due_requests(now, 8) {
                self.stats.digest_requests += 1;
                self.transmits.push_back(Transmit {
                    dest: self.rules.splitter,
                    payload: Bytes::copy_from_slice(&digest::request(n)),
                });
            }
        }
        if self.splitter_verified == 0
            && !book.anchored()
            && self
                .first_from_splitter
                .is_some_and(|t| now.saturating_duration_since(t) >= UNSIGNED_AFTER)
        {
            self.mismatch(IntegrityMismatch::Unsigned);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    /// What was counted so far.
    pub fn stats(&self) -> &PeerStats {
        &self.stats
    }

    /// The rules in force.
    pub fn rules(&self) -> &PeerRules {
        &self.rules
    }

    /// Current neighbours with their chunk debts.
    pub fn neighbours(&self) -> impl Iterator<Item = (Endpoint, i32)> + '_ {
        self.neighbours.iter().map(|n| (n.endpoint, n.debt))
    }

    /// Whether the peer has left the team.
    pub fn has_left(&self) -> bool {
        self.membership == Membership::Left
    }

    /// Chunks in the playout buffer: from the next to play up to the newest received (0 before
    /// the first chunk from the splitter).
    pub fn buffered(&self) -> u64 {
        match self.playout.next {
            Some(next) => (seq::diff(self.playout.highest, next) + 1).max(0) as u64,
            None => 0,
        }
    }

    /// Whether buffering is over and chunks are being played.
    pub fn is_playing(&self) -> bool {
        self.playout.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::encode_chunk;

    const C: usize = 64;
    const SPLITTER: u16 = 8001;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new([127, 0, 0, 1].into(), port)
    }

    fn chunk(n: u16) -> Bytes {
        let mut v = Vec::new();
        encode_chunk(n, &[n as u8; C], &mut v);
        Bytes::from(v)
    }

    fn rules(b: u16) -> PeerRules {
        PeerRules::new(ep(SPLITTER), C, b)
    }

    fn sends(p: &mut Peer) -> Vec<(u16, Bytes)> {
        std::iter::from_fn(|| p.poll_transmit())
            .map(|t| (t.dest.port(), t.payload))
            .collect()
    }

    fn events(p: &mut Peer) -> Vec<PeerEvent> {
        std::iter::from_fn(|| p.poll_event()).collect()
    }

    #[test]
    fn hello_to_every_listed_peer() {
        let mut p = Peer::new(rules(16), &[ep(1), ep(2)], 0);
        assert_eq!(
            sends(&mut p),
            [
                (1, Bytes::from_static(HELLO)),
                (2, Bytes::from_static(HELLO))
            ]
        );
    }

    #[test]
    fn relay_order_one_per_received_chunk_then_burst() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[ep(1), ep(2), ep(3), ep(4)], 0);
        sends(&mut p);
        // Chunk 10 from the splitter goes to neighbour 1 at once, byte-identical.
        p.handle_datagram(now, ep(SPLITTER), chunk(10));
        assert_eq!(sends(&mut p), [(1, chunk(10))]);
        // Each chunk from a neighbour lets one more relay of chunk 10 out.
        p.handle_datagram(now, ep(3), chunk(9));
        assert_eq!(sends(&mut p), [(2, chunk(10))]);
        // Neighbour chunks are never relayed themselves; the next splitter chunk bursts the rest
        // of chunk 10 first, then starts chunk 11 with neighbour 1.
        p.handle_datagram(now, ep(SPLITTER), chunk(11));
        assert_eq!(
            sends(&mut p),
            [(3, chunk(10)), (4, chunk(10)), (1, chunk(11))]
        );
        assert_eq!(p.stats().relayed, 5);
        // Debts: +2 for everyone but ep(3) which sent one chunk back.
        let debts: Vec<_> = p.neighbours().map(|n| n.1).collect();
        assert_eq!(debts, [2, 1, 0, 1]);
    }

    #[test]
    fn a_neighbour_that_never_relays_is_dropped_after_129_chunks() {
        let now = Instant::now();
        let mut p = Peer::new(rules(256), &[ep(1)], 0);
        sends(&mut p);
        let mut to_free_rider = 0;
        for n in 0..300u16 {
            p.handle_datagram(now, ep(SPLITTER), chunk(n));
            to_free_rider += sends(&mut p).iter().filter(|s| s.0 == 1).count();
        }
        assert_eq!(to_free_rider, 129);
        assert_eq!(p.stats().debt_drops, 1);
        assert!(events(&mut p).contains(&PeerEvent::NeighbourRemoved {
            peer: ep(1),
            reason: Removal::Debt
        }));
        // A hello (or a chunk) brings it back with a clean slate.
        p.handle_datagram(now, ep(1), Bytes::from_static(HELLO));
        assert_eq!(p.neighbours().collect::<Vec<_>>(), [(ep(1), 0)]);
    }

    #[test]
    fn a_neighbour_that_relays_is_forgiven_a_few_lost_chunks_but_not_silence() {
        let now = Instant::now();
        let mut p = Peer::new(rules(256), &[ep(1)], 0);
        sends(&mut p);
        // 20,000 chunks each way; one in 20 of the neighbour's is lost on the way (5 %): without
        // forgiveness its debt would reach 1,000.
        for n in 0..20_000u16 {
            p.handle_datagram(now, ep(SPLITTER), chunk(n));
            if n % 20 != 0 {
                p.handle_datagram(now, ep(1), chunk(n.wrapping_add(1)));
            }
            sends(&mut p);
        }
        assert_eq!(p.stats().debt_drops, 0);
        let debt = p.neighbours().next().unwrap().1;
        assert!(debt < 20, "debt {debt}");
        // Then it goes silent: dropped within 129·16/15 more chunks.
        let mut to_it = 0;
        for n in 20_000..21_000u16 {
            p.handle_datagram(now, ep(SPLITTER), chunk(n));
            to_it += sends(&mut p).iter().filter(|s| s.0 == 1).count();
        }
        assert_eq!(p.stats().debt_drops, 1);
        assert!(to_it <= 140, "{to_it} chunks");
    }

    #[test]
    fn playout_waits_for_half_a_buffer_and_plays_in_order() {
        let now = Instant::now();
        let mut p = Peer::new(rules(8), &[], 0);
        for n in [100u16, 102, 101, 103] {
            let from = if n == 100 { ep(SPLITTER) } else { ep(5) };
            p.handle_datagram(now, from, chunk(n));
        }
        assert!(!p.is_playing());
        assert!(
            !events(&mut p)
                .iter()
                .any(|e| matches!(e, PeerEvent::Play { .. }))
        );
        p.handle_datagram(now, ep(5), chunk(104));
        let ev = events(&mut p);
        assert!(ev.contains(&PeerEvent::Started { first: 100 }));
        let played: Vec<u16> = ev
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Play { number, payload } => {
                    assert_eq!(payload.len(), C);
                    assert!(payload.iter().all(|&b| b == *number as u8));
                    Some(*number)
                }
                _ => None,
            })
            .collect();
        assert_eq!(played, [100]);
        for n in 105..=110 {
            p.handle_datagram(now, ep(5), chunk(n));
        }
        assert_eq!(p.stats().played, 7);
        // 99 arrives late: counted, not played; 110 again is a duplicate.
        p.handle_datagram(now, ep(5), chunk(99));
        p.handle_datagram(now, ep(5), chunk(110));
        assert_eq!((p.stats().late, p.stats().duplicates), (1, 1));
    }

    #[test]
    fn a_lost_chunk_is_skipped_counted_and_reported_by_a_monitor() {
        let now = Instant::now();
        let mut r = rules(8);
        r.monitor = true;
        let mut p = Peer::new(r, &[], 0);
        // Chunks 300 ms apart: each is old enough to report by the time the next arrives.
        let at = |n: u16| now + Duration::from_millis(300 * u64::from(n));
        for n in (0..12u16).filter(|&n| n != 3) {
            p.handle_datagram(at(n), ep(SPLITTER), chunk(n));
        }
        let ev = events(&mut p);
        assert!(ev.contains(&PeerEvent::Lost { number: 3 }));
        assert_eq!(p.stats().lost, 1);
        assert_eq!(p.stats().played, 7); // 0..=7 but 3
        // Reported a quarter of a buffer behind the newest chunk, and again at three eighths.
        let reports: Vec<_> = sends(&mut p)
            .into_iter()
            .filter(|s| s.0 == SPLITTER)
            .collect();
        assert_eq!(reports, vec![(SPLITTER, Bytes::from_static(&[0, 3])); 2]);
        assert_eq!(p.stats().loss_reports, 2);
    }

    #[test]
    fn a_monitor_reports_early_enough_to_play_the_resent_chunk() {
        let now = Instant::now();
        let mut r = rules(16);
        r.monitor = true;
        // Two teammates: a round plus two chunks (5) is past B/4 (4), so only B/4 counts.
        let mut p = Peer::new(r, &[ep(1), ep(2)], 0);
        let at = |n: u16| now + Duration::from_millis(300 * u64::from(n));
        for n in (0..6u16).filter(|&n| n != 1) {
            p.handle_datagram(at(n), ep(SPLITTER), chunk(n));
        }
        // 4 chunks (B/4) behind the newest, chunk 1 is reported...
        let reports: Vec<_> = sends(&mut p)
            .into_iter()
            .filter(|s| s.0 == SPLITTER)
            .collect();
        assert_eq!(reports, [(SPLITTER, Bytes::from_static(&[0, 1]))]);
        // ...and its resend, relayed like any splitter chunk, is played in time.
        p.handle_datagram(at(5), ep(SPLITTER), chunk(1));
        for n in 6..12u16 {
            p.handle_datagram(at(n), ep(SPLITTER), chunk(n));
        }
        assert_eq!(p.stats().lost, 0);
        assert_eq!(p.stats().played, 4);
        assert_eq!(p.stats().loss_reports, 1);
    }

    #[test]
    fn a_monitor_waits_before_it_reports_a_burst() {
        // A stream of 8 chunks/s for 3 s, then the source bursts: 40 chunks within a millisecond,
        // the first of them missing. Counted in chunks it is far behind at once, but no teammate
        // had time to relay it: no report until it is 300 ms old, then one.
        let start = Instant::now();
        let mut r = rules(256);
        r.monitor = true;
        let mut p = Peer::new(r, &[ep(1), ep(2)], 0);
        let at = |ms: u64| start + Duration::from_millis(ms);
        for n in 0..24u16 {
            p.handle_datagram(at(125 * u64::from(n)), ep(SPLITTER), chunk(n));
        }
        sends(&mut p);
        for n in 25..64u16 {
            p.handle_datagram(at(3000), ep(SPLITTER), chunk(n));
        }
        let reports = |p: &mut Peer| sends(p).into_iter().filter(|s| s.0 == SPLITTER).count();
        assert_eq!(reports(&mut p), 0);
        p.handle_datagram(at(3299), ep(SPLITTER), chunk(64));
        assert_eq!(reports(&mut p), 0);
        p.handle_datagram(at(3300), ep(SPLITTER), chunk(65));
        assert_eq!(reports(&mut p), 1);
        // Missing at playout is reported then in any case, however young.
        let mut p = Peer::new(r, &[ep(1), ep(2)], 0);
        for n in (0..140u16).filter(|&n| n != 5) {
            p.handle_datagram(start, ep(SPLITTER), chunk(n));
        }
        assert_eq!(p.stats().lost, 1);
        assert_eq!(reports(&mut p), 1);
    }

    #[test]
    fn a_monitor_reports_after_a_round_on_a_slow_stream() {
        // A team of 16 on a 64 kbit/s stream (8 chunks/s), buffer 256: the fixed first horizon
        // (64 chunks) would be 8 s; a round plus 2 is 18 chunks, 2.25 s.
        let start = Instant::now();
        let mut r = rules(256);
        r.monitor = true;
        let team: Vec<Endpoint> = (1..16).map(ep).collect();
        let mut p = Peer::new(r, &team, 0);
        sends(&mut p);
        let mut reported_at = None;
        for n in (0..100u16).filter(|&n| n != 10) {
            let now = start + Duration::from_millis(125 * u64::from(n));
            p.handle_datagram(now, ep(SPLITTER), chunk(n));
            let to_splitter = sends(&mut p).into_iter().filter(|s| s.0 == SPLITTER);
            if to_splitter.count() > 0 && reported_at.is_none() {
                reported_at = Some(n);
            }
        }
        assert_eq!(reported_at, Some(28));
        // At 1 Mbit/s (122 chunks/s): a round and a quarter of a second (31 chunks).
        assert_eq!(early_horizon(16, 122.0), 47);
        assert_eq!(early_horizon(16, 8.0), 18);
    }

    #[test]
    fn a_monitor_waits_for_the_rate_before_reporting_early() {
        // A team of 2 at 16,000 chunks/s, the monitor's first second: a round plus 2 chunks is
        // 0.4 ms of stream, less than a teammate's relay may take while it starts. Until the rate
        // is measured only the fixed horizon (B/4) counts.
        let start = Instant::now();
        let mut r = rules(256);
        r.monitor = true;
        let mut p = Peer::new(r, &[ep(1)], 0);
        sends(&mut p);
        for n in (0..40u16).filter(|&n| n % 2 == 0) {
            let now = start + Duration::from_micros(62 * u64::from(n));
            p.handle_datagram(now, ep(SPLITTER), chunk(n));
        }
        assert!(
            sends(&mut p).iter().all(|s| s.0 != SPLITTER),
            "reported before the rate was known"
        );
        // The teammate's chunks arrive late but within B/4: nothing is reported.
        for n in (0..80u16).filter(|&n| n % 2 == 1 || n >= 40) {
            let now = start + Duration::from_micros(62 * u64::from(n));
            p.handle_datagram(now, ep(if n % 2 == 1 { 1 } else { SPLITTER }), chunk(n));
        }
        assert!(sends(&mut p).iter().all(|s| s.0 != SPLITTER));
        assert_eq!(p.stats().loss_reports, 0);
    }

    #[test]
    fn monitors_come_last_in_the_relay_order() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[ep(1), ep(2), ep(3)], 1);
        assert_eq!(
            p.neighbours().map(|n| n.0).collect::<Vec<_>>(),
            [ep(2), ep(3), ep(1)]
        );
        sends(&mut p);
        p.handle_datagram(now, ep(SPLITTER), chunk(5));
        assert_eq!(sends(&mut p), [(2, chunk(5))]);
    }

    #[test]
    fn relaying_a_resent_chunk_charges_no_debt() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[ep(1)], 0);
        p.handle_datagram(now, ep(SPLITTER), chunk(10));
        p.handle_datagram(now, ep(SPLITTER), chunk(11));
        assert_eq!(p.neighbours().next(), Some((ep(1), 2)));
        p.handle_datagram(now, ep(SPLITTER), chunk(3)); // an LRS resend
        assert_eq!(p.neighbours().next(), Some((ep(1), 2)));
        assert!(sends(&mut p).contains(&(1, chunk(3))));
    }

    #[test]
    fn playout_crosses_the_65535_to_0_wrap() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[], 0);
        let mut n = 65500u16;
        for _ in 0..100 {
            p.handle_datagram(now, ep(SPLITTER), chunk(n));
            n = n.wrapping_add(1);
        }
        let played: Vec<u16> = events(&mut p)
            .into_iter()
            .filter_map(|e| {
                if let PeerEvent::Play { number, .. } = e {
                    Some(number)
                } else {
                    None
                }
            })
            .collect();
        let expected: Vec<u16> = (0..92u16).map(|i| 65500u16.wrapping_add(i)).collect();
        assert_eq!(played, expected);
        assert_eq!(p.stats().lost, 0);
    }

    #[test]
    fn chunks_far_ahead_from_neighbours_are_dropped_but_the_splitter_may_jump() {
        let now = Instant::now();
        let mut p = Peer::new(rules(8), &[ep(1)], 0);
        p.handle_datagram(now, ep(SPLITTER), chunk(10));
        p.handle_datagram(now, ep(1), chunk(30000));
        assert_eq!(p.stats().out_of_window, 1);
        assert!(!p.is_playing());
        p.handle_datagram(now, ep(SPLITTER), chunk(1000));
        assert!(events(&mut p).contains(&PeerEvent::Skipped {
            count: 1000 - 10 - 4
        }));
    }

    #[test]
    fn polite_goodbye_waits_for_the_splitter_and_keeps_relaying() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[ep(1), ep(2), ep(3)], 0);
        sends(&mut p);
        p.handle_datagram(now, ep(SPLITTER), chunk(1));
        sends(&mut p);
        p.leave(now);
        assert_eq!(sends(&mut p), [(SPLITTER, Bytes::from_static(GOODBYE))]);
        // Still relaying, and saying goodbye to the splitter with every chunk.
        p.handle_datagram(now, ep(2), chunk(0));
        assert_eq!(
            sends(&mut p),
            [(SPLITTER, Bytes::from_static(GOODBYE)), (2, chunk(1))]
        );
        // The splitter confirms: the rest of chunk 1 goes out, then goodbyes to the team.
        p.handle_datagram(now, ep(SPLITTER), Bytes::from_static(GOODBYE));
        assert_eq!(
            sends(&mut p),
            [
                (3, chunk(1)),
                (1, Bytes::from_static(GOODBYE)),
                (2, Bytes::from_static(GOODBYE)),
                (3, Bytes::from_static(GOODBYE))
            ]
        );
        assert!(events(&mut p).contains(&PeerEvent::Left { confirmed: true }));
        assert!(p.has_left());
    }

    #[test]
    fn goodbye_times_out_without_the_splitter() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[ep(1)], 0);
        p.leave(now);
        assert_eq!(p.poll_timeout(), Some(now + Duration::from_secs(2)));
        p.handle_timeout(now + Duration::from_secs(1));
        assert!(!p.has_left());
        p.handle_timeout(now + Duration::from_secs(2));
        assert!(p.has_left());
        assert!(events(&mut p).contains(&PeerEvent::Left { confirmed: false }));
    }

    #[test]
    fn dropping_the_first_neighbour_for_debt_still_relays_the_chunk_to_the_rest() {
        // Neighbour 1 (first in the relay order) never relays; 2 and 3 return every chunk. The
        // relay that takes 1 over the debt limit is the first one of chunk 2, and the splitter's
        // next datagram (an LRS resend of chunk 0) comes before any neighbour's: chunk 2 must
        // still reach 2 and 3 in that burst. (The churn e2e test lost a chunk at every stayer
        // when a monitor dropped a killed peer that way just before a resend.)
        let now = Instant::now();
        let mut r = rules(256);
        r.max_debt = 2;
        let mut p = Peer::new(r, &[ep(1), ep(2), ep(3)], 0);
        sends(&mut p);
        for n in 0..2u16 {
            p.handle_datagram(now, ep(SPLITTER), chunk(n));
            p.handle_datagram(now, ep(2), chunk(n));
            p.handle_datagram(now, ep(3), chunk(n));
        }
        sends(&mut p);
        p.handle_datagram(now, ep(SPLITTER), chunk(2));
        assert_eq!(sends(&mut p), [(1, chunk(2))]);
        assert_eq!(p.stats().debt_drops, 1);
        p.handle_datagram(now, ep(SPLITTER), chunk(0));
        assert_eq!(sends(&mut p), [(2, chunk(2)), (3, chunk(2)), (2, chunk(0))]);
    }

    #[test]
    fn a_neighbour_goodbye_mid_round_does_not_skip_anyone() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[ep(1), ep(2), ep(3)], 0);
        sends(&mut p);
        p.handle_datagram(now, ep(SPLITTER), chunk(1)); // -> 1
        p.handle_datagram(now, ep(1), Bytes::from_static(GOODBYE));
        p.handle_datagram(now, ep(SPLITTER), chunk(2)); // burst 2, 3; then 2 gets chunk 2
        assert_eq!(
            sends(&mut p),
            [(1, chunk(1)), (2, chunk(1)), (3, chunk(1)), (2, chunk(2))]
        );
        p.handle_datagram(now, ep(7), Bytes::from_static(GOODBYE));
        assert_eq!(p.stats().stray_goodbyes, 1);
        p.handle_datagram(now, ep(7), Bytes::from_static(b"XYZ"));
        assert_eq!(p.stats().malformed, 1);
    }

    #[test]
    fn a_forged_hello_buys_at_most_the_probation_debt() {
        let now = Instant::now();
        let mut p = Peer::new(rules(256), &[ep(1)], 0);
        p.handle_datagram(now, ep(66), Bytes::from_static(HELLO));
        sends(&mut p);
        let mut to_victim = 0;
        for n in 0..300u16 {
            // 40 chunks a second from the splitter to this peer.
            let t = now + Duration::from_millis(25 * u64::from(n));
            p.handle_datagram(t, ep(SPLITTER), chunk(n));
            p.handle_datagram(t, ep(1), chunk(n.wrapping_sub(1)));
            to_victim += sends(&mut p).iter().filter(|s| s.0 == 66).count();
        }
        // A second of grace (40 chunks), then dropped at once: its debt is over 8.
        assert_eq!(to_victim, 41);
        assert!(events(&mut p).contains(&PeerEvent::NeighbourRemoved {
            peer: ep(66),
            reason: Removal::Debt
        }));
        // The honest neighbour, which relays, is still there.
        assert_eq!(p.neighbours().map(|n| n.0).collect::<Vec<_>>(), [ep(1)]);
    }

    #[test]
    fn a_newcomer_that_relays_leaves_probation() {
        let now = Instant::now();
        let mut p = Peer::new(rules(256), &[], 0);
        p.handle_datagram(now, ep(7), Bytes::from_static(HELLO));
        for n in 0..400u16 {
            p.handle_datagram(now, ep(SPLITTER), chunk(2 * n));
            if n >= 5 && n % 10 != 0 {
                // Its first chunk comes after 6 of ours; then it misses one in ten: a debt that
                // grows past 8 but stays under 128.
                p.handle_datagram(now, ep(7), chunk(2 * n + 1));
            }
        }
        assert_eq!(p.stats().debt_drops, 0);
        assert_eq!(p.neighbours().next().map(|n| n.0), Some(ep(7)));
    }

    #[test]
    fn chunks_from_strangers_far_off_are_dropped_and_nothing_changes() {
        let now = Instant::now();
        let mut p = Peer::new(rules(16), &[ep(1)], 0);
        p.handle_datagram(now, ep(SPLITTER), chunk(1000));
        sends(&mut p);
        let before: Vec<_> = p.neighbours().collect();
        // Behind the playout position by more than a buffer (late), then ahead by a buffer or
        // more (out of the window); 40000 is behind by serial arithmetic.
        for n in [0u16, 500, 983, 40000, 1016, 1100, 30000] {
            p.handle_datagram(now, ep(99), chunk(n));
            p.handle_datagram(now, ep(1), chunk(n));
        }
        assert_eq!(p.stats().late, 8);
        assert_eq!(p.stats().strangers_out_of_window, 3);
        assert_eq!(p.stats().out_of_window, 3);
        assert_eq!(
            p.neighbours().collect::<Vec<_>>(),
            before,
            "no debt credited"
        );
        assert!(sends(&mut p).is_empty(), "no relay clocked");
        // Near the playout position a stranger's chunk is an implicit hello.
        p.handle_datagram(now, ep(99), chunk(1001));
        assert!(p.neighbours().any(|n| n.0 == ep(99)));
    }

    #[test]
    fn the_neighbour_list_is_bounded() {
        let now = Instant::now();
        let later = now + Duration::from_secs(2);
        let mut r = rules(16);
        r.max_neighbours = 4;
        let mut p = Peer::new(r, &[ep(1), ep(2)], 0);
        for port in 100..200 {
            p.handle_datagram(now, ep(port), Bytes::from_static(HELLO));
        }
        assert_eq!(p.neighbours().count(), 4);
        assert_eq!(p.stats().neighbours_refused, 98);
        // Probationers that took chunks without returning any make room for a real chunk sender.
        p.handle_datagram(now, ep(SPLITTER), chunk(1));
        p.handle_datagram(later, ep(SPLITTER), chunk(2));
        p.handle_datagram(later, ep(300), chunk(1));
        assert!(p.neighbours().any(|n| n.0 == ep(300)));
        assert_eq!(p.neighbours().count(), 4);
        assert!(p.neighbours().any(|n| n.0 == ep(1)) && p.neighbours().any(|n| n.0 == ep(2)));
    }

    #[test]
    fn a_plain_peer_asks_for_its_losses_and_keeps_the_resend_to_itself() {
        let now = Instant::now();
        let mut r = rules(16);
        r.request_lost = true;
        let mut p = Peer::new(r, &[ep(1), ep(2)], 0);
        p.handle_datagram(now, ep(SPLITTER), chunk(0));
        for n in 2..8u16 {
            p.handle_datagram(now, ep(1), chunk(n));
        }
        // Asked for three eighths of a buffer behind the newest chunk (a monitor reports at B/4).
        let out = sends(&mut p);
        assert!(out.contains(&(SPLITTER, Bytes::from_static(&[0, 1]))));
        // The splitter resends chunk 1 to this peer alone: no relay, no burst.
        p.handle_datagram(now, ep(SPLITTER), chunk(1));
        assert!(sends(&mut p).is_empty());
        for n in 8..14u16 {
            p.handle_datagram(now, ep(2), chunk(n));
        }
        assert_eq!(p.stats().lost, 0);
        assert_eq!(p.stats().played, 6);
        assert_eq!(p.stats().resent_received, 1);
    }

    mod signed {
        use super::*;
        use crate::proto::integrity::{ChunkSigner, SIGNATURE_LEN, complaint};

        fn signer() -> ChunkSigner {
            ChunkSigner::from_secret(&[3; 32])
        }

        fn signed(n: u16) -> Bytes {
            let mut v = Vec::new();
            encode_chunk(n, &[n as u8; C], &mut v);
            signer().sign_datagram(&mut v);
            Bytes::from(v)
        }

        fn polluted(n: u16) -> Bytes {
            let mut v = signed(n).to_vec();
            v[CHUNK_HEADER + 5] ^= 0xff;
            Bytes::from(v)
        }

        fn signed_rules(b: u16) -> PeerRules {
            let mut r = rules(b);
            r.verify = Some(signer().verifier());
            r
        }

        /// The splitter's digest of chunks `first .. first + n` (as `chunk` makes them).
        fn digest(first: u16, n: u16) -> Bytes {
            digest_ext(u32::from(first), n)
        }

        fn digest_ext(first: u32, n: u16) -> Bytes {
            let hashes: Vec<digest::Hash> = (0..n)
                .map(|i| digest::chunk_hash(&chunk((first as u16).wrapping_add(i))))
                .collect();
            Bytes::from(digest::sign_digest(&signer(), first, &hashes))
        }

        fn played(ev: &[PeerEvent]) -> Vec<(u16, Bytes)> {
            ev.iter()
                .filter_map(|e| match e {
                    PeerEvent::Play { number, payload } => Some((*number, payload.clone())),
                    _ => None,
                })
                .collect()
        }

        #[test]
        fn signed_chunks_are_relayed_whole_and_played_without_the_signature() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1)], 0);
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), signed(0));
            assert_eq!(sends(&mut p), [(1, signed(0))]);
            for n in 1..8u16 {
                p.handle_datagram(now, ep(1), signed(n));
            }
            let ev = events(&mut p);
            let got = played(&ev);
            assert_eq!(got.len(), 4);
            for (n, payload) in got {
                assert_eq!(payload, Bytes::from(vec![n as u8; C]));
            }
            assert_eq!(p.stats().bad_chunks, 0);
            assert_eq!(signed(0).len(), CHUNK_HEADER + C + SIGNATURE_LEN);
        }

        #[test]
        fn a_polluter_is_dropped_banned_and_reported_and_its_chunk_never_played() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1), ep(2)], 0);
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), signed(0));
            assert_eq!(sends(&mut p), [(1, signed(0))]);
            // Neighbour 2 sends a polluted chunk 1: dropped, it clocks no relay, 2 is gone and
            // reported to the splitter.
            p.handle_datagram(now, ep(2), polluted(1));
            assert_eq!(
                sends(&mut p),
                [(SPLITTER, Bytes::copy_from_slice(&complaint(ep(2), 1)))]
            );
            let ev = events(&mut p);
            assert!(ev.contains(&PeerEvent::Polluter {
                peer: ep(2),
                number: 1
            }));
            assert!(ev.contains(&PeerEvent::NeighbourRemoved {
                peer: ep(2),
                reason: Removal::Polluter
            }));
            assert_eq!(p.neighbours().map(|n| n.0).collect::<Vec<_>>(), [ep(1)]);
            // From now on it is ignored, even with valid chunks or a hello.
            p.handle_datagram(now, ep(2), signed(1));
            p.handle_datagram(now, ep(2), Bytes::from_static(HELLO));
            assert_eq!(p.stats().from_polluters, 1);
            assert_eq!(p.neighbours().count(), 1);
            // A replay: an old valid chunk under a new number, from a stranger.
            let mut replay = signed(0).to_vec();
            replay[..2].copy_from_slice(&2u16.to_be_bytes());
            p.handle_datagram(now, ep(9), Bytes::from(replay));
            assert_eq!(p.stats().bad_chunks, 2);
            assert_eq!(p.stats().complaints, 2);
            // The real chunks 1.. come through neighbour 1; nothing polluted is played.
            for n in 1..8u16 {
                p.handle_datagram(now, ep(1), signed(n));
            }
            for (n, payload) in played(&events(&mut p)) {
                assert_eq!(payload, Bytes::from(vec![n as u8; C]));
            }
            assert_eq!(p.stats().played, 4);
            assert_eq!(p.stats().lost, 0);
        }

        #[test]
        fn a_forged_splitter_chunk_is_dropped_and_nobody_is_blamed() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1)], 0);
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), signed(0));
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), polluted(1));
            assert!(sends(&mut p).is_empty(), "not relayed, no complaint");
            assert_eq!((p.stats().forged, p.stats().bad_chunks), (1, 1));
            assert_eq!(p.neighbours().count(), 1);
            assert!(!events(&mut p).iter().any(|e| matches!(
                e,
                PeerEvent::Polluter { .. } | PeerEvent::IntegrityMismatch(_)
            )));
        }

        #[test]
        fn chunks_far_off_are_dropped_unchecked_and_never_played() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1)], 0);
            p.handle_datagram(now, ep(SPLITTER), signed(1000));
            for n in [0u16, 500, 1100, 30000] {
                p.handle_datagram(now, ep(99), polluted(n));
            }
            let s = *p.stats();
            assert_eq!((s.bad_chunks, s.complaints), (0, 0), "not even checked");
            assert_eq!(s.late + s.strangers_out_of_window, 4);
            assert!(!p.neighbours().any(|n| n.0 == ep(99)));
        }

        #[test]
        fn digest_mode_checks_one_signature_per_group_and_relays_the_digest_first() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1), ep(2)], 0);
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), digest(0, 8));
            assert_eq!(sends(&mut p), [(1, digest(0, 8)), (2, digest(0, 8))]);
            p.handle_datagram(now, ep(SPLITTER), chunk(0));
            assert_eq!(sends(&mut p), [(1, chunk(0))]);
            for n in 1..8u16 {
                p.handle_datagram(now, ep(1 + n % 2), chunk(n));
            }
            assert_eq!(sends(&mut p), [(2, chunk(0))]);
            let got = played(&events(&mut p));
            assert_eq!(got.len(), 4);
            for (n, payload) in got {
                assert_eq!(payload, chunk(n).slice(CHUNK_HEADER..));
            }
            let s = p.stats();
            assert_eq!(
                (s.signatures_checked, s.hashes_checked, s.digests),
                (1, 8, 1)
            );
            assert_eq!((s.bad_chunks, s.digests_relayed), (0, 2));
            // The same digest again (the second copy) costs nothing and is not relayed again.
            p.handle_datagram(now, ep(1), digest(0, 8));
            assert!(sends(&mut p).is_empty());
            assert_eq!(p.stats().signatures_checked, 1);
        }

        #[test]
        fn a_chunk_waits_for_its_digest_and_is_never_relayed_before() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1), ep(2)], 0);
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), chunk(0));
            p.handle_datagram(now, ep(1), chunk(1));
            assert!(sends(&mut p).is_empty(), "nothing relayed unverified");
            assert!(played(&events(&mut p)).is_empty());
            // The digest comes from a neighbour: checked, not relayed, the chunks go on.
            p.handle_datagram(now, ep(1), digest(0, 2));
            assert_eq!(sends(&mut p), [(1, chunk(0)), (2, chunk(0))]);
            assert_eq!(p.stats().hashes_checked, 2);
            assert_eq!(p.stats().digests_relayed, 0);
        }

        #[test]
        fn a_lost_digest_is_asked_for_and_its_chunks_dropped_if_it_never_comes() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1)], 0);
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), digest(0, 1));
            p.handle_datagram(now, ep(SPLITTER), chunk(0));
            sends(&mut p);
            p.handle_datagram(now, ep(1), chunk(1));
            assert_eq!(p.poll_timeout(), Some(now + digest::FETCH_AFTER));
            p.handle_timeout(now + digest::FETCH_AFTER);
            assert_eq!(
                sends(&mut p),
                [(SPLITTER, Bytes::copy_from_slice(&digest::request(1)))]
            );
            // Answered: the chunk goes on.
            p.handle_datagram(now, ep(SPLITTER), digest(1, 1));
            assert_eq!(p.stats().hashes_checked, 2);
            // Chunk 2's digest never comes: asked for again, then dropped unplayed.
            p.handle_datagram(now, ep(1), chunk(2));
            let t = now + digest::FETCH_AFTER;
            p.handle_timeout(t);
            p.handle_timeout(t + digest::FETCH_AFTER);
            assert_eq!(p.stats().digest_requests, 3);
            p.handle_timeout(now + digest::HOLD_LIMIT);
            assert_eq!(p.stats().unverified_dropped, 1);
            let ev = events(&mut p);
            assert!(played(&ev).iter().all(|(n, _)| *n < 2));
        }

        #[test]
        fn forged_digests_and_bad_chunks_blame_the_sender_replays_cost_nothing() {
            let now = Instant::now();
            let mut p = Peer::new(signed_rules(8), &[ep(1), ep(2), ep(3)], 0);
            sends(&mut p);
            p.handle_datagram(now, ep(SPLITTER), digest_ext(65536, 4));
            p.handle_datagram(now, ep(SPLITTER), chunk(0));
            sends(&mut p);
            events(&mut p);
            // Neighbour 2 forges a digest: its signature fails, 2 is banned and reported.
            let mut forged = digest_ext(65536 + 4, 4).to_vec();
            forged[8] ^= 1;
            p.handle_datagram(now, ep(2), Bytes::from(forged));
            assert_eq!(p.stats().bad_digests, 1);
            let ev = events(&mut p);
            assert!(ev.contains(&PeerEvent::Polluter {
                peer: ep(2),
                number: 4
            }));
            assert_eq!(
                sends(&mut p),
                [(SPLITTER, Bytes::copy_from_slice(&complaint(ep(2), 4)))]
            );
            // Neighbour 3 replays a valid digest of the same numbers from 65,536 chunks ago:
            // stale, dropped before its signature is checked, nobody blamed.
            let checked = p.stats().signatures_checked;
            p.handle_datagram(now, ep(3), digest(0, 4));
            assert_eq!(p.stats().stale_digests, 1);
            assert_eq!(p.stats().signatures_checked, checked);
            // Neighbour 1 pollutes chunk 1: its hash fails, 1 is banned, the chunk never played.
            let mut bad = chunk(1).to_vec();
            bad[CHUNK_HEADER + 3] ^= 0xff;
            p.handle_datagram(now, ep(1), Bytes::from(bad));
            assert_eq!(p.stats().bad_chunks, 1);
            let ev = events(&mut p);
            assert!(ev.contains(&PeerEvent::Polluter {
                peer: ep(1),
                number: 1
            }));
            // Neighbour 3 sends the real chunk 1: taken.
            let (hashes, bad) = (p.stats().hashes_checked, p.stats().bad_chunks);
            p.handle_datagram(now, ep(3), chunk(1));
            assert_eq!(p.stats().hashes_checked, hashes + 1);
            assert_eq!(p.stats().bad_chunks, bad);
            assert!(events(&mut p).is_empty() || p.stats().complaints == 2);
        }

        #[test]
        fn signing_mismatches_are_named_once() {
            let now = Instant::now();
            let mismatches = |p: &mut Peer| -> Vec<IntegrityMismatch> {
                events(p)
                    .into_iter()
                    .filter_map(|e| match e {
                        PeerEvent::IntegrityMismatch(m) => Some(m),
                        _ => None,
                    })
                    .collect()
            };
            // No key, a signing splitter.
            let mut p = Peer::new(rules(8), &[], 0);
            for n in 0..3 {
                p.handle_datagram(now, ep(SPLITTER), signed(n));
            }
            assert!(mismatches(&mut p).is_empty(), "not on 3 datagrams");
            for n in 3..6 {
                p.handle_datagram(now, ep(SPLITTER), signed(n));
            }
            assert_eq!(mismatches(&mut p), [IntegrityMismatch::Signed]);
            assert_eq!(p.stats().chunks_received, 0);
            // No key, a digest-signing splitter.
            let mut p = Peer::new(rules(8), &[], 0);
            for n in 0..4 {
                p.handle_datagram(now, ep(SPLITTER), digest(n * 2, 2));
                p.handle_datagram(now, ep(SPLITTER), chunk(n * 2));
            }
            assert_eq!(mismatches(&mut p), [IntegrityMismatch::Signed]);
            // A key, a compat splitter: compat-sized chunks wait for a digest that never comes.
            let mut p = Peer::new(signed_rules(8), &[], 0);
            for n in 0..4 {
                p.handle_datagram(now, ep(SPLITTER), chunk(n));
            }
            p.handle_timeout(now + Duration::from_millis(1900));
            assert!(
                mismatches(&mut p).is_empty(),
                "not before {UNSIGNED_AFTER:?}"
            );
            p.handle_timeout(now + UNSIGNED_AFTER);
            assert_eq!(mismatches(&mut p), [IntegrityMismatch::Unsigned]);
            assert_eq!(p.stats().played, 0);
            // A peer that plays is not ended by forgeries with the splitter's address.
            let mut p = Peer::new(signed_rules(8), &[], 0);
            p.handle_datagram(now, ep(SPLITTER), signed(0));
            for n in 1..20 {
                p.handle_datagram(now, ep(SPLITTER), chunk(n));
                p.handle_datagram(now, ep(SPLITTER), polluted(n));
            }
            assert!(mismatches(&mut p).is_empty());
            // The wrong key.
            let mut r = rules(8);
            r.verify = Some(ChunkSigner::from_secret(&[4; 32]).verifier());
            let mut p = Peer::new(r, &[], 0);
            for n in 0..4 {
                p.handle_datagram(now, ep(SPLITTER), signed(n));
            }
            assert_eq!(mismatches(&mut p), [IntegrityMismatch::WrongKey]);
            // Compat peers in a compat team see none of this.
            let mut p = Peer::new(rules(8), &[], 0);
            for n in 0..8 {
                p.handle_datagram(now, ep(SPLITTER), chunk(n));
            }
            assert!(mismatches(&mut p).is_empty());
        }
    }
}
