//! Beyond the reference (issue 11): port probing for the NAT pairs that NTS's port prediction
//! does not connect, sans-IO. Only between our peers, driven by our splitter; a reference node
//! never sees any of it.
//!
//! **Who takes part.** Our peer sends [`ProbeToSplitter::Capable`] (11 bytes) to the splitter
//! next to its U1. A reference NTS splitter ignores that length ("Ignoring packet of length");
//! ours then counts the peer as capable. Our splitter sends [`Rendezvous`] (27 bytes) only to
//! capable peers: a reference peer would take an unknown datagram for a goodbye (reference-notes
//! §4.1). The probes themselves are plain NTS hellos (the sender's 7-byte ID), acknowledged by
//! echo as any hello.
//!
//! **When.** The splitter notes every pair (new peer, peer of its list 2) when it sends list 2,
//! and the U4 reports that say who heard whom. [`PAIR_GRACE`] later, a pair of capable peers
//! that has not heard each other both ways gets a rendezvous, chosen by the two NATs' port steps
//! as the splitter measured them (0: the same port towards everyone, a cone):
//!
//! * **cone ↔ symmetric: birthday probing.** The symmetric ("hard") side opens
//!   [`LISTEN_SOCKETS`] new sockets, each saying hello to the cone side's public endpoint: its
//!   NAT maps each to a new public port (random or sequential), and the cone side's NAT drops
//!   them, but the mappings stay. The cone side sends hellos from its own socket to
//!   [`SPRAY_WINDOW`] ports after the hard side's last known port (a sequential NAT's next
//!   mappings are there) and to [`SPRAY_RANDOM`] random ports of the hard side's address, three
//!   bursts a second apart. A probe that hits one of the open mappings is let in (it is the
//!   answer to that socket's hello) and opened the cone side's filter for that port, so the
//!   hard side's echo gets back: with 256 mappings among the 64 512 ports of a random NAT,
//!   2048 probes miss all of them with probability (1 − 256/64512)^2048 ≈ 3·10⁻⁴. The hard side
//!   keeps that one socket for the teammate (the driver sends the team's traffic to it from
//!   there) and closes the others.
//! * **sequential symmetric ↔ sequential symmetric: a two-rate sweep.** Each side opens one new
//!   socket and sends a [`ProbeToSplitter::Query`] from it to the splitter, which sees the public
//!   port `q` of that socket's first mapping and tells each side the other's. Side X then says
//!   hello to ports `q_Y + s_Y·(1 + 2k)` and side Y to `q_X + s_X·(1 + j)`, k, j < [`SWEEP_COUNT`],
//!   from those sockets. If other traffic moved X's NAT on by `d_X` mappings and Y's by `d_Y`
//!   before the sweeps, X's hello number `k = d_X + d_Y` and Y's hello number `j = 2·d_X + d_Y`
//!   are each other's mappings: one rate alone (the reference's prediction, both sides walking
//!   the other's ports one by one) meets only when `d_X + d_Y` is exactly 0.
//! * anything else (a random symmetric NAT with another symmetric one): nothing; the
//!   forwarding fallback's job.
//!
//! Bounds: a peer runs at most [`MAX_SESSIONS`] sessions (and keeps [`MAX_KEPT`] more that
//! reached their teammate until their time is over), [`MAX_SOCKETS`] probe sockets and keeps
//! at most [`MAX_KEPT`] of them; a session ends after [`SESSION_TIME`]. The splitter keeps at
//! most [`MAX_PAIRS`] pairs and [`MAX_PEERS`] capable peers. Rendezvous from anyone but the
//! splitter, queries for sessions that do not exist or from other addresses, hellos at a probe
//! socket from anyone but the expected teammate: counted, and change nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::Endpoint;
use super::nts::{ID_LEN, PeerId};

/// `ID | "PX" | u8 version | u8 0`: peer → splitter, "I take part in probing".
pub const CAPABLE_LEN: usize = ID_LEN + 4;
/// `ID | "PQ" | u32 session`: peer → splitter from a sweep socket (the splitter echoes it).
pub const QUERY_LEN: usize = ID_LEN + 6;
/// `"PX" | u8 method | u8 rate | u32 session | ID | IPv4 | u16 port | u16 step | u16 count |
/// u16 extra`: splitter → peer.
pub const RENDEZVOUS_LEN: usize = 27;
/// Version of the probing extension.
pub const VERSION: u8 = 1;
const CAPABLE_TAG: &[u8; 2] = b"PX";
const QUERY_TAG: &[u8; 2] = b"PQ";
const RENDEZVOUS_TAG: &[u8; 2] = b"PX";

/// Sockets the hard side opens for birthday probing.
pub const LISTEN_SOCKETS: u16 = 256;
/// Sockets the hard side opens when its NAT looks sequential (ports seen close together): the
/// cone side's window finds them, and fewer new mappings leave its other sessions' predictions
/// intact.
pub const LISTEN_SOCKETS_SEQUENTIAL: u16 = 64;
/// Ports after the hard side's last known port that the cone side probes.
pub const SPRAY_WINDOW: u16 = 512;
/// Random ports of the hard side's address that the cone side probes per burst.
pub const SPRAY_RANDOM: u16 = 1536;
/// Hellos of a sweep, per side.
pub const SWEEP_COUNT: u16 = 64;
/// How long after list 2 the splitter waits for a pair's U4 reports before it starts probing.
pub const PAIR_GRACE: Duration = Duration::from_millis(1500);
/// A probing session's lifetime at the peer.
pub const SESSION_TIME: Duration = Duration::from_secs(10);
/// How long the splitter waits for both queries of a sweep.
pub const QUERY_TIME: Duration = Duration::from_secs(5);
/// Most sessions a peer runs at once (not counting those that reached their teammate; at most
/// [`MAX_KEPT`] of those are kept until their time is over).
pub const MAX_SESSIONS: usize = 16;
/// Most probe sockets a peer has open at once.
pub const MAX_SOCKETS: usize = 1024;
/// Most probe sockets a peer keeps for teammates.
pub const MAX_KEPT: usize = 64;
/// Most pairs the splitter watches.
pub const MAX_PAIRS: usize = 4096;
/// Most capable peers the splitter remembers.
pub const MAX_PEERS: usize = 4096;
/// A NAT whose observed ports spread over more than this is taken for a random one.
pub const RANDOM_SPREAD: u16 = 2000;
/// Rounds of a spray (bursts) and of a sweep or listen (the same hellos again).
const ROUNDS: u8 = 3;
/// The cone side waits this long before its first burst, so that the hard side's sockets have
/// made their mappings.
const SPRAY_DELAY: Duration = Duration::from_millis(300);
const ROUND_EVERY: Duration = Duration::from_secs(1);
/// Listen sessions wait at most this long for a sweep's query to be answered.
const QUERY_HOLD: Duration = Duration::from_millis(1000);
const LOWEST_PORT: u16 = 1024;

/// Whether a datagram of `len` bytes to the splitter may be a probing message.
pub fn is_probe_size(len: usize) -> bool {
    len == CAPABLE_LEN || len == QUERY_LEN
}

/// A probing message to the splitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeToSplitter {
    /// The peer takes part in probing.
    Capable(PeerId),
    /// From a sweep socket: the splitter notes the public port it came from.
    Query {
        /// The peer.
        id: PeerId,
        /// The session.
        session: u32,
    },
}

impl ProbeToSplitter {
    /// Parses `d`; `None` when it is none of these.
    pub fn parse(d: &[u8]) -> Option<ProbeToSplitter> {
        let id = PeerId::from_bytes(d.get(..ID_LEN)?)?;
        match d.len() {
            CAPABLE_LEN if &d[ID_LEN..ID_LEN + 2] == CAPABLE_TAG && d[ID_LEN + 2] >= 1 => {
                Some(ProbeToSplitter::Capable(id))
            }
            QUERY_LEN if &d[ID_LEN..ID_LEN + 2] == QUERY_TAG => Some(ProbeToSplitter::Query {
                id,
                session: u32::from_be_bytes([d[9], d[10], d[11], d[12]]),
            }),
            _ => None,
        }
    }

    /// Encodes it into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match *self {
            ProbeToSplitter::Capable(id) => {
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(CAPABLE_TAG);
                out.extend_from_slice(&[VERSION, 0]);
            }
            ProbeToSplitter::Query { id, session } => {
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(QUERY_TAG);
                out.extend_from_slice(&session.to_be_bytes());
            }
        }
    }
}

/// What a rendezvous asks a peer to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Open `count` sockets, each saying hello to `endpoint` (the cone side's).
    Listen,
    /// Say hello from the team socket to `count` ports `port + step·k` and `extra` random
    /// ports of `endpoint`'s address.
    Spray,
    /// Open one socket and send a query from it to the splitter.
    Query,
    /// From the query's socket, say hello to `count` ports `port + step·rate·k`.
    Sweep,
}

impl Method {
    fn code(self) -> u8 {
        match self {
            Method::Listen => 1,
            Method::Spray => 2,
            Method::Query => 3,
            Method::Sweep => 4,
        }
    }

    fn from_code(c: u8) -> Option<Method> {
        Some(match c {
            1 => Method::Listen,
            2 => Method::Spray,
            3 => Method::Query,
            4 => Method::Sweep,
            _ => return None,
        })
    }
}

/// Splitter → peer: probe for the teammate `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rendezvous {
    /// What to do.
    pub method: Method,
    /// Sweep: every how many of the other's steps.
    pub rate: u8,
    /// The session (the same at both sides of a pair).
    pub session: u32,
    /// The teammate.
    pub other: PeerId,
    /// Its address and a port (see [`Method`]).
    pub endpoint: Endpoint,
    /// Its NAT's port step.
    pub step: u16,
    /// Sockets, window ports or sweep hellos.
    pub count: u16,
    /// Spray: random ports per burst.
    pub extra: u16,
}

impl Rendezvous {
    /// Parses `d`; `None` when it is not a rendezvous.
    pub fn parse(d: &[u8]) -> Option<Rendezvous> {
        if d.len() != RENDEZVOUS_LEN || &d[..2] != RENDEZVOUS_TAG {
            return None;
        }
        let u16_at = |i: usize| u16::from_be_bytes([d[i], d[i + 1]]);
        Some(Rendezvous {
            method: Method::from_code(d[2])?,
            rate: d[3],
            session: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
            other: PeerId::from_bytes(&d[8..15])?,
            endpoint: Endpoint::new(Ipv4Addr::new(d[15], d[16], d[17], d[18]), u16_at(19)),
            step: u16_at(21),
            count: u16_at(23),
            extra: u16_at(25),
        })
    }

    /// Encodes it into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(RENDEZVOUS_TAG);
        out.push(self.method.code());
        out.push(self.rate);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(self.other.as_bytes());
        out.extend_from_slice(&self.endpoint.ip().octets());
        for v in [self.endpoint.port(), self.step, self.count, self.extra] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// `count` ports `base + step·rate·k` (k from 0), those that fit in 16 bits.
fn ladder(base: u32, step: u16, rate: u8, count: u16) -> Vec<u16> {
    let d = u32::from(step.max(1)) * u32::from(rate.max(1));
    (0..u32::from(count))
        .filter_map(|k| u16::try_from(base + d * k).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Peer side

/// A socket of a probing peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SockRef {
    /// The team socket.
    Main,
    /// Probe socket `index` of `session`.
    Probe {
        /// The session.
        session: u32,
        /// Its number in the session.
        index: u16,
    },
}

/// What the driver does for the probing peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// Open `count` UDP sockets for `session`, numbered from 0.
    Open {
        /// The session.
        session: u32,
        /// How many.
        count: u16,
    },
    /// Send `data` from `from` to `to`.
    Send {
        /// Which socket.
        from: SockRef,
        /// Destination.
        to: Endpoint,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Send `data` from every socket of `session` to `to`.
    SendEach {
        /// The session.
        session: u32,
        /// Destination.
        to: Endpoint,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Send `data` from `from` to each of `ports` at `ip`.
    SendMany {
        /// Which socket.
        from: SockRef,
        /// Destination address.
        ip: Ipv4Addr,
        /// Destination ports.
        ports: Vec<u16>,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Close the sockets of `session` but `keep`.
    Close {
        /// The session.
        session: u32,
        /// The one kept for a teammate.
        keep: Option<u16>,
    },
    /// The teammate `id` answered at `endpoint` on socket `via`: a neighbour, whose traffic
    /// goes from and to `via` from now on.
    Reached {
        /// Its ID.
        id: PeerId,
        /// Its endpoint.
        endpoint: Endpoint,
        /// The socket it answered on.
        via: SockRef,
    },
}

/// Counters of a probing peer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProbeCounters {
    /// Rendezvous taken.
    pub sessions: u64,
    /// Sessions that reached their teammate.
    pub reached: u64,
    /// Sessions that ended without.
    pub failed: u64,
    /// Rendezvous refused (limits) or for unknown sessions.
    pub refused: u64,
    /// Datagrams at probe sockets from others than the expected teammate.
    pub strays: u64,
    /// Probes (hellos) sent.
    pub probes_sent: u64,
}

#[derive(Debug, Clone)]
struct Session {
    r: Rendezvous,
    started: Instant,
    next: Instant,
    rounds: u8,
    sockets: u16,
    query: Option<Vec<u8>>,
    done: bool,
}

/// The probing state of one peer session.
#[derive(Debug)]
pub struct ProbePeer {
    me: PeerId,
    splitter: Endpoint,
    sessions: Vec<Session>,
    /// Rendezvous already taken, by (session, method).
    seen: VecDeque<(u32, Method)>,
    routes: Vec<(Endpoint, SockRef)>,
    open_sockets: usize,
    capable_left: u8,
    next_capable: Instant,
    actions: VecDeque<ProbeAction>,
    counters: ProbeCounters,
    rng: u64,
}

impl ProbePeer {
    /// A peer `me` of `splitter`; it tells the splitter it takes part (three times, half a second
    /// apart: the message is not acknowledged). `seed` seeds the random ports.
    pub fn new(now: Instant, me: PeerId, splitter: Endpoint, seed: u64) -> ProbePeer {
        let mut p = ProbePeer {
            me,
            splitter,
            sessions: Vec::new(),
            seen: VecDeque::new(),
            routes: Vec::new(),
            open_sockets: 0,
            capable_left: 3,
            next_capable: now,
            actions: VecDeque::new(),
            counters: ProbeCounters::default(),
            rng: seed | 1,
        };
        p.handle_timeout(now);
        p
    }

    fn random_port(&mut self) -> u16 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        LOWEST_PORT + (self.rng % u64::from(u16::MAX - LOWEST_PORT + 1)) as u16
    }

    /// A rendezvous from the splitter (the caller checks the sender).
    pub fn on_rendezvous(&mut self, now: Instant, r: Rendezvous) {
        if self.seen.contains(&(r.session, r.method)) {
            return; // one of the splitter's repeats
        }
        if self.seen.len() >= 256 {
            self.seen.pop_front();
        }
        self.seen.push_back((r.session, r.method));
        if r.other == self.me {
            self.counters.refused += 1;
            return;
        }
        if r.method == Method::Sweep {
            match self
                .sessions
                .iter_mut()
                .find(|s| s.r.session == r.session && s.r.method == Method::Query)
            {
                Some(s) if s.r.other == r.other && !s.done => {
                    s.r = r;
                    s.query = None;
                    s.next = now;
                    s.rounds = ROUNDS;
                }
                _ => self.counters.refused += 1,
            }
            self.handle_timeout(now);
            return;
        }
        let sockets = match r.method {
            Method::Listen => r.count.min(LISTEN_SOCKETS),
            Method::Query => 1,
            _ => 0,
        };
        // Sessions that reached their teammate stay until their time is over but no longer
        // count as running: a peer joining a team of more than 16 sequential symmetric peers
        // gets its sweeps one after another.
        let running = self.sessions.iter().filter(|s| !s.done).count();
        if running >= MAX_SESSIONS
            || self.sessions.len() >= MAX_SESSIONS + MAX_KEPT
            || self.open_sockets + usize::from(sockets) > MAX_SOCKETS
            || (sockets > 0 && self.routes.len() >= MAX_KEPT)
        {
            self.counters.refused += 1;
            return;
        }
        self.counters.sessions += 1;
        if sockets > 0 {
            self.open_sockets += usize::from(sockets);
            self.actions.push_back(ProbeAction::Open {
                session: r.session,
                count: sockets,
            });
        }
        let query = (r.method == Method::Query).then(|| {
            let mut q = Vec::new();
            ProbeToSplitter::Query {
                id: self.me,
                session: r.session,
            }
            .encode(&mut q);
            q
        });
        self.sessions.push(Session {
            r,
            started: now,
            next: if r.method == Method::Spray {
                now + SPRAY_DELAY
            } else {
                now
            },
            rounds: if r.method == Method::Query { 5 } else { ROUNDS },
            sockets,
            query,
            done: false,
        });
        self.handle_timeout(now);
    }

    /// A datagram that arrived at probe socket `via` (never [`SockRef::Main`]): true when it was
    /// for probing; false when the caller hands it to NTS and DBS as one from the team socket
    /// (traffic of a teammate reached through that socket).
    pub fn handle_datagram(
        &mut self,
        _now: Instant,
        via: SockRef,
        from: Endpoint,
        data: &[u8],
    ) -> bool {
        let SockRef::Probe { session, index } = via else {
            return false;
        };
        if self.routes.iter().any(|&(e, s)| s == via && e == from) {
            return false;
        }
        let me = self.me;
        let Some(s) = self.sessions.iter_mut().find(|s| s.r.session == session) else {
            self.counters.strays += 1;
            return true;
        };
        if from == self.splitter && s.query.as_deref() == Some(data) {
            // The splitter has our sweep socket's port; stop asking.
            s.rounds = 0;
            return true;
        }
        let hello = data.len() == ID_LEN && PeerId::from_bytes(data) == Some(s.r.other);
        if s.done || !hello || s.r.method == Method::Query || from.ip() != s.r.endpoint.ip() {
            self.counters.strays += 1;
            return true;
        }
        s.done = true;
        let keep = s.sockets > 0;
        self.counters.reached += 1;
        let other = s.r.other;
        self.routes.push((from, via));
        // The echo acknowledges its hello; ours makes it add us (it echoes it in turn).
        self.actions.push_back(ProbeAction::Send {
            from: via,
            to: from,
            data: data.to_vec(),
        });
        self.actions.push_back(ProbeAction::Send {
            from: via,
            to: from,
            data: me.as_bytes().to_vec(),
        });
        if keep {
            let closed = usize::from(s.sockets.saturating_sub(1));
            self.open_sockets = self.open_sockets.saturating_sub(closed);
            s.sockets = 1;
            self.actions.push_back(ProbeAction::Close {
                session,
                keep: Some(index),
            });
        }
        self.actions.push_back(ProbeAction::Reached {
            id: other,
            endpoint: from,
            via,
        });
        true
    }

    /// The teammate `id` said hello on the team socket (a spray hit): its sessions stop.
    pub fn note_heard(&mut self, id: PeerId) {
        for s in &mut self.sessions {
            if s.r.other == id && s.r.method == Method::Spray && !s.done {
                s.done = true;
                s.rounds = 0;
                self.counters.reached += 1;
            }
        }
    }

    /// Whether a session with teammate `id` is running (its hello counts as probed).
    pub fn probing(&self, id: &PeerId) -> bool {
        self.sessions.iter().any(|s| s.r.other == *id)
    }

    /// Sends what is due; ends sessions that are over.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.capable_left > 0 && now >= self.next_capable {
            self.capable_left -= 1;
            self.next_capable = now + Duration::from_millis(500);
            let mut c = Vec::new();
            ProbeToSplitter::Capable(self.me).encode(&mut c);
            self.actions.push_back(ProbeAction::Send {
                from: SockRef::Main,
                to: self.splitter,
                data: c,
            });
        }
        let me = self.me.as_bytes().to_vec();
        // Sweeps first: their ports are predicted from the NAT's state right now.
        self.sessions
            .sort_by_key(|s| !matches!(s.r.method, Method::Query | Method::Sweep));
        let mut i = 0;
        while i < self.sessions.len() {
            let s = &self.sessions[i];
            if now.saturating_duration_since(s.started) >= SESSION_TIME {
                let s = self.sessions.swap_remove(i);
                if !s.done {
                    self.counters.failed += 1;
                    self.open_sockets = self.open_sockets.saturating_sub(usize::from(s.sockets));
                    if s.sockets > 0 {
                        self.actions.push_back(ProbeAction::Close {
                            session: s.r.session,
                            keep: None,
                        });
                    }
                }
                continue;
            }
            if s.done || s.rounds == 0 || now < s.next {
                i += 1;
                continue;
            }
            // A listen session's sockets make new mappings: while a sweep's query waits for
            // its answer, they would move a sequential NAT past the ports the sweep aims at.
            if s.r.method == Method::Listen && s.rounds == ROUNDS && self.query_waiting(now) {
                i += 1;
                continue;
            }
            let r = s.r;
            let query = s.query.clone();
            let sockets = s.sockets;
            let ip = *r.endpoint.ip();
            match r.method {
                Method::Listen => {
                    self.counters.probes_sent += u64::from(sockets);
                    self.actions.push_back(ProbeAction::SendEach {
                        session: r.session,
                        to: r.endpoint,
                        data: me.clone(),
                    });
                }
                Method::Spray => {
                    let mut ports = ladder(u32::from(r.endpoint.port()), r.step, 1, r.count);
                    for _ in 0..r.extra {
                        let p = self.random_port();
                        ports.push(p);
                    }
                    self.counters.probes_sent += ports.len() as u64;
                    self.actions.push_back(ProbeAction::SendMany {
                        from: SockRef::Main,
                        ip,
                        ports,
                        data: me.clone(),
                    });
                }
                Method::Query => {
                    if let Some(q) = query {
                        self.actions.push_back(ProbeAction::Send {
                            from: SockRef::Probe {
                                session: r.session,
                                index: 0,
                            },
                            to: self.splitter,
                            data: q,
                        });
                    }
                }
                Method::Sweep => {
                    let ports = ladder(u32::from(r.endpoint.port()), r.step, r.rate, r.count);
                    self.counters.probes_sent += ports.len() as u64;
                    self.actions.push_back(ProbeAction::SendMany {
                        from: SockRef::Probe {
                            session: r.session,
                            index: 0,
                        },
                        ip,
                        ports,
                        data: me.clone(),
                    });
                }
            }
            let s = &mut self.sessions[i];
            s.rounds -= 1;
            s.next = now + ROUND_EVERY;
            i += 1;
        }
    }

    /// Whether a sweep's query waits for its answer (at most [`QUERY_HOLD`]).
    fn query_waiting(&self, now: Instant) -> bool {
        self.sessions.iter().any(|s| {
            s.r.method == Method::Query
                && !s.done
                && now.saturating_duration_since(s.started) < QUERY_HOLD
        })
    }

    /// When [`ProbePeer::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = (self.capable_left > 0).then_some(self.next_capable);
        self.sessions
            .iter()
            .flat_map(|s| {
                let next = (!s.done && s.rounds > 0).then_some(s.next);
                next.into_iter().chain(Some(s.started + SESSION_TIME))
            })
            .chain(c)
            .min()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<ProbeAction> {
        self.actions.pop_front()
    }

    /// The socket traffic to `to` goes from (`None`: the team socket).
    pub fn route(&self, to: Endpoint) -> Option<SockRef> {
        self.routes.iter().find(|r| r.0 == to).map(|r| r.1)
    }

    /// Counters.
    pub fn counters(&self) -> &ProbeCounters {
        &self.counters
    }

    /// Probe sockets open now (kept ones included).
    pub fn open_sockets(&self) -> usize {
        self.open_sockets
    }
}

// ---------------------------------------------------------------------------------------------
// Splitter side

/// What the splitter knows about a peer when it plans probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// Its ID.
    pub id: PeerId,
    /// Its public endpoint towards the splitter.
    pub endpoint: Endpoint,
    /// Its NAT's port step (0: cone).
    pub step: u16,
    /// The last source port anyone saw it use.
    pub last_port: u16,
}

/// Counters of the splitter's probing planner.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProbePlannerCounters {
    /// Peers that said they take part.
    pub capable: u64,
    /// Pairs that had heard each other by the time they were looked at.
    pub direct: u64,
    /// Birthday sessions started.
    pub birthday: u64,
    /// Sweeps started (after both queries).
    pub sweeps: u64,
    /// Sweep pairs that waited for another sweep of one of their peers to get its queries.
    pub waited: u64,
    /// Pairs left alone (a random symmetric NAT with another symmetric one, two cones, or a
    /// side that does not take part).
    pub left: u64,
    /// Queries and capability messages ignored (unknown session or peer, wrong address).
    pub ignored: u64,
}

#[derive(Debug, Clone)]
struct Pair {
    a: PeerId,
    b: PeerId,
    a_heard_b: bool,
    b_heard_a: bool,
    due: Instant,
}

#[derive(Debug, Clone)]
struct Sweep {
    session: u32,
    a: PeerView,
    b: PeerView,
    qa: Option<u16>,
    qb: Option<u16>,
    since: Instant,
}

/// The splitter's side of probing: which pairs need it and the rendezvous that start it.
#[derive(Debug, Default)]
pub struct ProbePlanner {
    capable: HashSet<PeerId>,
    /// Lowest and highest source port seen per peer.
    ports: HashMap<PeerId, (u16, u16)>,
    pairs: Vec<Pair>,
    sweeps: Vec<Sweep>,
    /// Sweep pairs waiting until neither peer has a sweep in its query phase.
    waiting: VecDeque<(PeerId, PeerId)>,
    /// Set when a sweep's end freed peers while pairs wait: [`ProbePlanner::due`] hands those
    /// out at once (any instant already past).
    wake: Option<Instant>,
    next_session: u32,
    counters: ProbePlannerCounters,
}

/// A rendezvous to send: destination and bytes.
pub type Outgoing = (Endpoint, Vec<u8>);

impl ProbePlanner {
    /// `id` takes part in probing.
    pub fn capable(&mut self, id: PeerId) {
        if self.capable.len() < MAX_PEERS && self.capable.insert(id) {
            self.counters.capable += 1;
        }
    }

    /// `id` was seen using source `port`.
    pub fn observe(&mut self, id: PeerId, port: u16) {
        if !self.ports.contains_key(&id) && self.ports.len() >= MAX_PEERS {
            return;
        }
        let e = self.ports.entry(id).or_insert((port, port));
        e.0 = e.0.min(port);
        e.1 = e.1.max(port);
    }

    /// The new peer `a` and the teammate `b` should reach each other.
    pub fn pair(&mut self, now: Instant, a: PeerId, b: PeerId) {
        if a == b || self.pairs.len() >= MAX_PAIRS {
            return;
        }
        self.pairs
            .retain(|p| !((p.a == a && p.b == b) || (p.a == b && p.b == a)));
        self.pairs.push(Pair {
            a,
            b,
            a_heard_b: false,
            b_heard_a: false,
            due: now + PAIR_GRACE,
        });
    }

    /// `sender` reported (U4) that it heard from `about`.
    pub fn heard(&mut self, sender: PeerId, about: PeerId) {
        for p in &mut self.pairs {
            if p.a == sender && p.b == about {
                p.a_heard_b = true;
            } else if p.b == sender && p.a == about {
                p.b_heard_a = true;
            }
        }
    }

    /// `id` retries its incorporation from a new socket (`N`): the ports seen and the pairs of
    /// the old socket are forgotten; whether it takes part is kept (it said so from the address
    /// it still has).
    pub fn renew(&mut self, id: &PeerId) {
        self.ports.remove(id);
        self.drop_pairs_of(id);
    }

    fn drop_pairs_of(&mut self, id: &PeerId) {
        self.pairs.retain(|p| p.a != *id && p.b != *id);
        self.waiting.retain(|&(a, b)| a != *id && b != *id);
        let mut freed = None;
        self.sweeps.retain(|s| {
            let gone = s.a.id == *id || s.b.id == *id;
            if gone {
                freed = Some(s.since);
            }
            !gone
        });
        // Its teammate in that sweep is free now: pairs waiting for it start at once.
        if freed.is_some() && !self.waiting.is_empty() {
            self.wake = freed;
        }
    }

    /// Forgets `id` (it left, or its incorporation was given up).
    pub fn forget(&mut self, id: &PeerId) {
        self.capable.remove(id);
        self.ports.remove(id);
        self.drop_pairs_of(id);
    }

    /// The pairs whose grace is over and that did not hear each other both ways (removed from
    /// the watch; those that did are counted as direct), after the waiting sweep pairs whose
    /// peers are both free now (the caller passes each to [`ProbePlanner::start`] again).
    pub fn due(&mut self, now: Instant) -> Vec<(PeerId, PeerId)> {
        self.wake = None;
        let mut out = Vec::new();
        let mut still = VecDeque::new();
        while let Some((a, b)) = self.waiting.pop_front() {
            if self.sweeping(&a) || self.sweeping(&b) {
                still.push_back((a, b));
            } else {
                out.push((a, b));
            }
        }
        self.waiting = still;
        let mut direct = 0;
        self.pairs.retain(|p| {
            if now < p.due {
                return true;
            }
            if p.a_heard_b && p.b_heard_a {
                direct += 1;
            } else {
                out.push((p.a, p.b));
            }
            false
        });
        self.counters.direct += direct;
        out
    }

    /// Whether `id` has a sweep waiting for its queries: between its query and its sweep,
    /// every new mapping its NAT makes moves the ports the other side aims at.
    fn sweeping(&self, id: &PeerId) -> bool {
        self.sweeps.iter().any(|s| s.a.id == *id || s.b.id == *id)
    }

    fn random_nat(&self, v: &PeerView) -> bool {
        self.ports
            .get(&v.id)
            .is_some_and(|&(lo, hi)| hi - lo > RANDOM_SPREAD)
    }

    fn session(&mut self) -> u32 {
        self.next_session = self.next_session.wrapping_add(1);
        self.next_session
    }

    /// The rendezvous for the pair `a`, `b` (views as the splitter has them now).
    pub fn start(&mut self, now: Instant, a: PeerView, b: PeerView) -> Vec<Outgoing> {
        let mut out = Vec::new();
        if !self.capable.contains(&a.id) || !self.capable.contains(&b.id) {
            self.counters.left += 1;
            return out;
        }
        let send = |out: &mut Vec<Outgoing>, to: Endpoint, r: Rendezvous| {
            let mut d = Vec::new();
            r.encode(&mut d);
            out.push((to, d));
        };
        match (a.step == 0, b.step == 0) {
            (true, false) | (false, true) => {
                let (cone, hard) = if a.step == 0 { (a, b) } else { (b, a) };
                let session = self.session();
                self.counters.birthday += 1;
                // A sequential NAT's next mappings come after the highest port seen.
                let seen = self.ports.get(&hard.id).map_or(0, |p| p.1);
                let base = seen.max(hard.last_port).saturating_add(hard.step);
                send(
                    &mut out,
                    hard.endpoint,
                    Rendezvous {
                        method: Method::Listen,
                        rate: 1,
                        session,
                        other: cone.id,
                        endpoint: cone.endpoint,
                        step: 0,
                        count: if self.random_nat(&hard) {
                            LISTEN_SOCKETS
                        } else {
                            LISTEN_SOCKETS_SEQUENTIAL
                        },
                        extra: 0,
                    },
                );
                send(
                    &mut out,
                    cone.endpoint,
                    Rendezvous {
                        method: Method::Spray,
                        rate: 1,
                        session,
                        other: hard.id,
                        endpoint: Endpoint::new(*hard.endpoint.ip(), base),
                        step: hard.step,
                        count: SPRAY_WINDOW,
                        extra: SPRAY_RANDOM,
                    },
                );
            }
            (false, false) if !self.random_nat(&a) && !self.random_nat(&b) => {
                // One sweep at a time per peer: another sweep's 64 hellos, sent between this
                // one's query and its sweep, would move the NAT past what the sweep covers
                // (a peer that joins a team of k sequential symmetric peers has k sweeps).
                if self.sweeping(&a.id) || self.sweeping(&b.id) {
                    if self.waiting.len() < MAX_PAIRS
                        && !self.waiting.contains(&(a.id, b.id))
                        && !self.waiting.contains(&(b.id, a.id))
                    {
                        self.counters.waited += 1;
                        self.waiting.push_back((a.id, b.id));
                    } else {
                        self.counters.left += 1;
                    }
                    return out;
                }
                let session = self.session();
                for v in [a, b] {
                    send(
                        &mut out,
                        v.endpoint,
                        Rendezvous {
                            method: Method::Query,
                            rate: 0,
                            session,
                            other: if v.id == a.id { b.id } else { a.id },
                            endpoint: v.endpoint,
                            step: 0,
                            count: 0,
                            extra: 0,
                        },
                    );
                }
                if self.sweeps.len() < MAX_PAIRS {
                    self.sweeps.push(Sweep {
                        session,
                        a,
                        b,
                        qa: None,
                        qb: None,
                        since: now,
                    });
                }
            }
            _ => self.counters.left += 1,
        }
        out
    }

    /// A query from `from`: true when it belongs to a session (the caller echoes it); the
    /// sweeps to start, once both sides asked, go into `out`.
    pub fn query(
        &mut self,
        id: PeerId,
        session: u32,
        from: Endpoint,
        out: &mut Vec<Outgoing>,
    ) -> bool {
        let Some(i) = self.sweeps.iter().position(|s| s.session == session) else {
            self.counters.ignored += 1;
            return false;
        };
        let s = &mut self.sweeps[i];
        if s.a.id == id && s.a.endpoint.ip() == from.ip() {
            s.qa = Some(from.port());
        } else if s.b.id == id && s.b.endpoint.ip() == from.ip() {
            s.qb = Some(from.port());
        } else {
            self.counters.ignored += 1;
            return false;
        }
        let (Some(qa), Some(qb)) = (s.qa, s.qb) else {
            return true;
        };
        let s = self.sweeps.swap_remove(i);
        self.counters.sweeps += 1;
        if !self.waiting.is_empty() {
            self.wake = Some(s.since);
        }
        // `a` walks `b`'s ports two steps at a time, `b` walks `a`'s one at a time (module doc).
        for (me, other, q, rate) in [(s.a, s.b, qb, 2u8), (s.b, s.a, qa, 1u8)] {
            let r = Rendezvous {
                method: Method::Sweep,
                rate,
                session,
                other: other.id,
                endpoint: Endpoint::new(*other.endpoint.ip(), q.saturating_add(other.step.max(1))),
                step: other.step.max(1),
                count: SWEEP_COUNT,
                extra: 0,
            };
            let mut d = Vec::new();
            r.encode(&mut d);
            out.push((me.endpoint, d));
        }
        true
    }

    /// Drops sweeps whose queries did not both come within [`QUERY_TIME`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let before = self.sweeps.len();
        self.sweeps
            .retain(|s| now.saturating_duration_since(s.since) < QUERY_TIME);
        if self.sweeps.len() < before && !self.waiting.is_empty() {
            self.wake = Some(now);
        }
    }

    /// When [`ProbePlanner::due`] or [`ProbePlanner::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pairs
            .iter()
            .map(|p| p.due)
            .chain(self.sweeps.iter().map(|s| s.since + QUERY_TIME))
            .chain(self.wake)
            .min()
    }

    /// Whether `id` said it takes part.
    pub fn is_capable(&self, id: &PeerId) -> bool {
        self.capable.contains(id)
    }

    /// Counts an ignored message.
    pub fn ignore(&mut self) {
        self.counters.ignored += 1;
    }

    /// Counters.
    pub fn counters(&self) -> &ProbePlannerCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::nts::testing::id;

    #[test]
    fn messages_round_trip_and_have_their_lengths() {
        let mut out = Vec::new();
        for m in [
            ProbeToSplitter::Capable(id("ABCDEFG")),
            ProbeToSplitter::Query {
                id: id("0123456"),
                session: 0xDEAD_BEEF,
            },
        ] {
            m.encode(&mut out);
            assert!(is_probe_size(out.len()));
            assert_eq!(ProbeToSplitter::parse(&out), Some(m));
        }
        let r = Rendezvous {
            method: Method::Spray,
            rate: 2,
            session: 7,
            other: id("ZZZZZZZ"),
            endpoint: "198.18.0.101:20005".parse().unwrap(),
            step: 3,
            count: 512,
            extra: 1536,
        };
        r.encode(&mut out);
        assert_eq!(out.len(), RENDEZVOUS_LEN);
        assert_eq!(Rendezvous::parse(&out), Some(r));
        // The NTS lengths stay what they were.
        for n in [1, 2, 7, 8, 9, 10] {
            assert!(!is_probe_size(n));
        }
    }

    /// Two model sequential NATs whose counters other traffic moved on by `dx` and `dy` before
    /// the sweeps: the two-rate sweep connects them for every such pair of offsets in range.
    #[test]
    fn two_rate_sweep_meets_for_any_small_offsets() {
        for dx in 0..20u32 {
            for dy in 0..20u32 {
                let (qx, qy, step) = (20_000u32, 30_000u32, 1u16);
                // X's k-th new mapping is q + step·(1 + dx + k); it goes to ladder port k.
                let to_y = ladder(qy + 1, step, 2, SWEEP_COUNT);
                let to_x = ladder(qx + 1, step, 1, SWEEP_COUNT);
                let x_sends: HashSet<(u32, u32)> = to_y
                    .iter()
                    .enumerate()
                    .map(|(k, &p)| (qx + 1 + dx + k as u32, u32::from(p)))
                    .collect();
                let met = to_x.iter().enumerate().any(|(j, &p)| {
                    let from_y = qy + 1 + dy + j as u32;
                    x_sends.contains(&(u32::from(p), from_y))
                });
                assert!(met, "dx {dx} dy {dy}");
            }
        }
    }

    #[test]
    fn a_birthday_pair_gets_listen_and_spray_and_a_cone_pair_nothing() {
        let now = Instant::now();
        let mut p = ProbePlanner::default();
        let (a, b, c) = (id("AAAAAAA"), id("BBBBBBB"), id("CCCCCCC"));
        for x in [a, b, c] {
            p.capable(x);
        }
        p.pair(now, a, b);
        p.pair(now, a, c);
        p.heard(a, c);
        p.heard(c, a);
        assert!(p.due(now).is_empty());
        let due = p.due(now + PAIR_GRACE);
        assert_eq!(due, vec![(a, b)]);
        assert_eq!(p.counters().direct, 1);
        let va = PeerView {
            id: a,
            endpoint: "198.18.0.101:4000".parse().unwrap(),
            step: 0,
            last_port: 4000,
        };
        let vb = PeerView {
            id: b,
            endpoint: "198.18.0.102:20000".parse().unwrap(),
            step: 1,
            last_port: 20003,
        };
        let out = p.start(now, va, vb);
        let rs: Vec<(Endpoint, Rendezvous)> = out
            .iter()
            .map(|(e, d)| (*e, Rendezvous::parse(d).unwrap()))
            .collect();
        assert_eq!(rs[0].0, vb.endpoint);
        assert_eq!(rs[0].1.method, Method::Listen);
        assert_eq!(rs[0].1.endpoint, va.endpoint);
        assert_eq!(rs[1].0, va.endpoint);
        assert_eq!(rs[1].1.method, Method::Spray);
        assert_eq!(rs[1].1.endpoint.port(), 20004);
        let vc = PeerView { id: c, ..va };
        assert!(p.start(now, va, vc).is_empty());
    }

    /// A joiner `X` with three sequential teammates: one sweep at a time for `X` (each query,
    /// then its sweep, before the next query), the others wait and start, in turn, as soon as
    /// the previous one's queries are in or timed out; a pair of other peers is not held up.
    #[test]
    fn a_peer_gets_one_sweep_at_a_time() {
        let now = Instant::now();
        let mut p = ProbePlanner::default();
        let view = |name: &str, host: u8| PeerView {
            id: id(name),
            endpoint: Endpoint::new(Ipv4Addr::new(198, 18, 0, host), 20000),
            step: 1,
            last_port: 20001,
        };
        let x = view("XXXXXXX", 100);
        let ys = [
            view("YYYYYY1", 101),
            view("YYYYYY2", 102),
            view("YYYYYY3", 103),
        ];
        let (u, w) = (view("UUUUUUU", 110), view("WWWWWWW", 111));
        for v in ys.iter().chain([&x, &u, &w]) {
            p.capable(v.id);
        }
        for y in &ys {
            p.pair(now, x.id, y.id);
        }
        p.pair(now, u.id, w.id);
        let t = now + PAIR_GRACE;
        let views: HashMap<PeerId, PeerView> =
            ys.iter().chain([&x, &u, &w]).map(|v| (v.id, *v)).collect();
        let start = |p: &mut ProbePlanner, t: Instant| -> Vec<(Endpoint, Rendezvous)> {
            let mut out = Vec::new();
            for (a, b) in p.due(t) {
                out.extend(p.start(t, views[&a], views[&b]));
            }
            out.iter()
                .map(|(e, d)| (*e, Rendezvous::parse(d).unwrap()))
                .collect()
        };
        let first = start(&mut p, t);
        // X with one teammate, and U with W: two query pairs; two of X's pairs wait.
        assert_eq!(first.len(), 4, "{first:?}");
        assert!(first.iter().all(|(_, r)| r.method == Method::Query));
        assert_eq!(p.counters().waited, 2);
        assert_eq!(p.poll_timeout(), Some(t + QUERY_TIME));
        let mut reached = HashSet::new();
        let mut round = first;
        for turn in 0..3 {
            let to_x: Vec<&Rendezvous> = round
                .iter()
                .filter(|(e, _)| *e == x.endpoint)
                .map(|(_, r)| r)
                .collect();
            assert_eq!(to_x.len(), 1, "turn {turn}: one query for X at a time");
            let session = to_x[0].session;
            let y = to_x[0].other;
            assert!(reached.insert(y));
            let mut out = Vec::new();
            let yv = views[&y];
            assert!(p.query(
                y,
                session,
                Endpoint::new(*yv.endpoint.ip(), 21000),
                &mut out
            ));
            assert!(out.is_empty());
            // Nothing new for X before its pending query is in.
            assert!(start(&mut p, t).is_empty());
            let qx = Endpoint::new(*x.endpoint.ip(), 22000 + turn);
            assert!(p.query(x.id, session, qx, &mut out));
            assert_eq!(out.len(), 2, "the two sweeps");
            let wake = p.poll_timeout().unwrap();
            if turn < 2 {
                assert!(wake <= t, "the next pair starts at once");
            }
            round = start(&mut p, t);
        }
        assert!(round.is_empty());
        assert_eq!(reached.len(), 3);
        assert_eq!(p.counters().sweeps, 3);
        // A waiting pair also starts when the sweep before it times out.
        let mut p = ProbePlanner::default();
        for v in [&x, &ys[0], &ys[1]] {
            p.capable(v.id);
        }
        assert_eq!(p.start(t, x, ys[0]).len(), 2);
        assert!(p.start(t, x, ys[1]).is_empty());
        p.handle_timeout(t + QUERY_TIME);
        assert_eq!(p.due(t + QUERY_TIME), vec![(x.id, ys[1].id)]);
        // Forgetting a peer drops its waiting pairs.
        assert!(p.start(t + QUERY_TIME, x, ys[1]).len() == 2);
        assert!(p.start(t + QUERY_TIME, ys[0], x).is_empty());
        p.forget(&ys[0].id);
        p.handle_timeout(t + 2 * QUERY_TIME);
        assert!(p.due(t + 2 * QUERY_TIME).is_empty());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Random pairs of sequential peers, queries (right and wrong), timeouts and
            /// departures: no peer ever has two sweeps waiting for their queries, the queue
            /// stays bounded, and every query rendezvous goes to a pair of free peers.
            #[test]
            fn a_peer_never_has_two_sweeps_in_their_query_phase(
                ops in proptest::collection::vec((0u8..5, 0u8..6, 0u8..6, 0u16..8), 0..120)
            ) {
                let t0 = Instant::now();
                let mut p = ProbePlanner::default();
                let views: Vec<PeerView> = (0..6u8)
                    .map(|i| PeerView {
                        id: PeerId::from_random(u64::from(i) + 1),
                        endpoint: Endpoint::new(Ipv4Addr::new(198, 18, 0, 100 + i), 20000),
                        step: 1,
                        last_port: 20001,
                    })
                    .collect();
                for v in &views {
                    p.capable(v.id);
                }
                let mut t = t0;
                let mut sessions: Vec<u32> = Vec::new();
                for (op, i, j, x) in ops {
                    let (a, b) = (views[usize::from(i)], views[usize::from(j)]);
                    let mut out = Vec::new();
                    match op {
                        0 => p.pair(t, a.id, b.id),
                        1 => {
                            for (x, y) in p.due(t) {
                                let (Some(vx), Some(vy)) = (
                                    views.iter().find(|v| v.id == x),
                                    views.iter().find(|v| v.id == y),
                                ) else {
                                    continue;
                                };
                                out.extend(p.start(t, *vx, *vy));
                            }
                        }
                        2 => {
                            if let Some(&s) = sessions.get(usize::from(x)) {
                                let ip = if x % 3 == 0 { b.endpoint.ip() } else { a.endpoint.ip() };
                                p.query(a.id, s, Endpoint::new(*ip, 21000 + x), &mut out);
                            }
                        }
                        3 => {
                            t += Duration::from_millis(u64::from(x) * 700);
                            p.handle_timeout(t);
                        }
                        _ => p.forget(&a.id),
                    }
                    for (_, d) in &out {
                        let r = Rendezvous::parse(d).unwrap();
                        if r.method == Method::Query && !sessions.contains(&r.session) {
                            sessions.push(r.session);
                        }
                    }
                    for v in &views {
                        let n = p.sweeps.iter().filter(|s| s.a.id == v.id || s.b.id == v.id).count();
                        prop_assert!(n <= 1, "{n} sweeps in their query phase for one peer");
                    }
                    prop_assert!(p.waiting.len() <= MAX_PAIRS);
                    if !p.waiting.is_empty() && p.sweeps.is_empty() {
                        // Nothing holds the waiting pairs: the planner asks to be woken.
                        prop_assert!(p.poll_timeout().is_some());
                    }
                }
            }
        }
    }

    #[test]
    fn a_sweep_starts_after_both_queries_from_the_right_addresses() {
        let now = Instant::now();
        let mut p = ProbePlanner::default();
        let (a, b) = (id("AAAAAAA"), id("BBBBBBB"));
        p.capable(a);
        p.capable(b);
        let va = PeerView {
            id: a,
            endpoint: "198.18.0.101:20000".parse().unwrap(),
            step: 1,
            last_port: 20001,
        };
        let vb = PeerView {
            id: b,
            endpoint: "198.18.0.102:20000".parse().unwrap(),
            step: 1,
            last_port: 20001,
        };
        let out = p.start(now, va, vb);
        assert_eq!(out.len(), 2);
        let session = Rendezvous::parse(&out[0].1).unwrap().session;
        let mut sweeps = Vec::new();
        // A stranger's query, and one for an unknown session: nothing.
        assert!(!p.query(a, session, "198.18.0.200:1".parse().unwrap(), &mut sweeps));
        assert!(!p.query(
            a,
            session + 1,
            "198.18.0.101:1".parse().unwrap(),
            &mut sweeps
        ));
        assert!(p.query(
            a,
            session,
            "198.18.0.101:20010".parse().unwrap(),
            &mut sweeps
        ));
        assert!(sweeps.is_empty());
        assert!(p.query(
            b,
            session,
            "198.18.0.102:20020".parse().unwrap(),
            &mut sweeps
        ));
        let r: Vec<Rendezvous> = sweeps
            .iter()
            .map(|(_, d)| Rendezvous::parse(d).unwrap())
            .collect();
        assert_eq!(r[0].endpoint, "198.18.0.102:20021".parse().unwrap());
        assert_eq!(r[0].rate, 2);
        assert_eq!(r[1].endpoint, "198.18.0.101:20011".parse().unwrap());
        assert_eq!(r[1].rate, 1);
    }

    #[test]
    fn a_listen_session_keeps_the_socket_that_got_the_teammate_and_ignores_strangers() {
        let now = Instant::now();
        let splitter: Endpoint = "198.18.0.1:8001".parse().unwrap();
        let mut peer = ProbePeer::new(now, id("HHHHHHH"), splitter, 42);
        let cone: Endpoint = "198.18.0.101:4000".parse().unwrap();
        let r = Rendezvous {
            method: Method::Listen,
            rate: 1,
            session: 9,
            other: id("CCCCCCC"),
            endpoint: cone,
            step: 0,
            count: 1000,
            extra: 0,
        };
        peer.on_rendezvous(now, r);
        peer.on_rendezvous(now, r); // a repeat
        let acts: Vec<ProbeAction> = std::iter::from_fn(|| peer.poll_action()).collect();
        assert!(acts.contains(&ProbeAction::Open {
            session: 9,
            count: LISTEN_SOCKETS
        }));
        assert_eq!(
            acts.iter()
                .filter(|a| matches!(a, ProbeAction::Open { .. }))
                .count(),
            1
        );
        let via = SockRef::Probe {
            session: 9,
            index: 17,
        };
        // A stranger, and the right ID from the wrong address.
        assert!(peer.handle_datagram(now, via, "198.18.0.150:4000".parse().unwrap(), b"CCCCCCC"));
        assert!(peer.handle_datagram(now, via, cone, b"XXXXXXX"));
        assert_eq!(peer.counters().strays, 2);
        assert_eq!(peer.route(cone), None);
        assert!(peer.handle_datagram(now, via, cone, b"CCCCCCC"));
        assert_eq!(peer.route(cone), Some(via));
        let acts: Vec<ProbeAction> = std::iter::from_fn(|| peer.poll_action()).collect();
        assert!(acts.contains(&ProbeAction::Close {
            session: 9,
            keep: Some(17)
        }));
        assert!(acts.contains(&ProbeAction::Reached {
            id: id("CCCCCCC"),
            endpoint: cone,
            via
        }));
        // From now on its traffic on that socket is the team's.
        assert!(!peer.handle_datagram(now, via, cone, b"anything"));
        assert_eq!(peer.open_sockets(), 1);
    }

    #[test]
    fn sessions_and_sockets_are_bounded() {
        let now = Instant::now();
        let splitter: Endpoint = "198.18.0.1:8001".parse().unwrap();
        let mut peer = ProbePeer::new(now, id("HHHHHHH"), splitter, 1);
        for s in 0..100 {
            peer.on_rendezvous(
                now,
                Rendezvous {
                    method: Method::Listen,
                    rate: 1,
                    session: s,
                    other: id("CCCCCCC"),
                    endpoint: "198.18.0.101:4000".parse().unwrap(),
                    step: 0,
                    count: LISTEN_SOCKETS,
                    extra: 0,
                },
            );
        }
        assert!(peer.open_sockets() <= MAX_SOCKETS);
        assert!(peer.counters().refused > 0);
        // All of it ends after SESSION_TIME.
        peer.handle_timeout(now + SESSION_TIME);
        assert_eq!(peer.open_sockets(), 0);
    }
}
