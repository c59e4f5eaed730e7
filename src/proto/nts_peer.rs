//! NTS at a peer or monitor (reference-notes §6.4), sans-IO: its ID to the splitter and the
//! monitors (U1), hellos to every peer of list 2 and to every peer the splitter announces (U2),
//! at the announced port and, for a NAT with a port step, at the predicted ports, each resent
//! every second until echoed; echoes of what others send; U4 reports of the ports teammates came
//! from; `Y` once every peer of list 2 has been heard from. A monitor echoes arriving peers' IDs
//! and tells the splitter the port each came from (U3), and adds peers the splitter announces to
//! it (U2m).
//!
//! The caller runs it next to the DBS [`Peer`](super::peer::Peer): datagrams go here first
//! ([`NtsPeer::handle_datagram`] returns false for those that are DBS), and each
//! [`NtsPeerAction::Neighbour`] is a teammate to add to the DBS peer (as if it had said `H`).
//!
//! A peer that has not heard from every peer of list 2 after `patience` may retry, as the
//! reference does, up to the number of retries it was given ([`NtsPeer::set_retries`]): it asks
//! the caller for a new UDP socket on another port ([`NtsPeerAction::Rebind`]), forgets what it
//! learnt through the old one, sends `ID ‖ 'N'` reliably to the splitter and the monitors from
//! the new socket ([`NtsPeer::rebound`]) and starts over with the list 2 the splitter sends
//! again. New mappings in its NAT (and a new measurement of their ports) can connect a pair that
//! the first ones did not. Beyond the reference: with no retries left it says `Y` anyway;
//! teammates it cannot reach directly get its chunks through the splitter's forwarding fallback
//! (`nts_forward`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::Endpoint;
use super::nts::{
    ID_LEN, List2Entry, MAX_PREDICTED_PORTS, NewPeer, PeerId, Pending, ToPeer, ToSplitter,
    probable_source_ports,
};

/// Most reliable messages a peer keeps in flight.
pub const MAX_IN_FLIGHT: usize = 512;
/// Most teammates a peer remembers by ID.
pub const MAX_KNOWN: usize = 4096;
/// A member sends its ID to the splitter and to every teammate it knows this often, so that
/// the NATs on the way keep their mappings while no chunk flows (a source outage): home NATs
/// forget an idle UDP mapping after 30 s or more (RFC 4787 asks for at least 2 min).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);

/// What the caller does for the NTS peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtsPeerAction {
    /// Send `data` to `to`.
    Send {
        /// Destination.
        to: Endpoint,
        /// Bytes.
        data: Vec<u8>,
    },
    /// A teammate to relay to and take chunks from.
    Neighbour {
        /// Its ID.
        id: PeerId,
        /// The endpoint its hello came from (or the splitter's U2m named).
        endpoint: Endpoint,
        /// How it was reached.
        how: Reached,
    },
    /// Retry from a new port: close the UDP socket, bind a new one on another port (an
    /// ephemeral one, chosen while the old one is still bound so that it differs), and call
    /// [`NtsPeer::rebound`]; then read list 2 again from the join connection.
    Rebind,
    /// `Y` was queued: the join connection can be closed. `missing` peers of list 2 were not
    /// heard from.
    Incorporated {
        /// Peers of list 2 never heard from.
        missing: usize,
    },
}

/// How a teammate was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reached {
    /// Its hello came from the port the splitter announced.
    Direct,
    /// From another port: one of the predicted ones, or its NAT's mapping towards us.
    Predicted,
    /// Announced by the splitter to a monitor (U2m).
    Announced,
    /// Never heard from: the splitter forwards its chunks (`nts_forward`).
    Forwarded,
    /// Through port probing (`super::nts_probe`): a probe of ours or its got through.
    Probed,
}

impl Reached {
    /// Its name on status pages.
    pub fn name(self) -> &'static str {
        match self {
            Reached::Direct => "direct",
            Reached::Predicted => "predicted",
            Reached::Announced => "announced",
            Reached::Forwarded => "forwarded",
            Reached::Probed => "probed",
        }
    }
}

/// Counters of an NTS peer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NtsPeerCounters {
    /// Teammates reached at the announced port.
    pub direct: u64,
    /// Teammates reached at another port.
    pub predicted: u64,
    /// Teammates added from U2m (monitors).
    pub announced: u64,
    /// Peers of list 2 not heard from by the time `Y` went.
    pub unreached: u64,
    /// Reliable messages given up (never echoed).
    pub expired: u64,
    /// NTS datagrams echoed.
    pub echoed: u64,
    /// Teammates' NTS messages not taken (bounded state full).
    pub refused: u64,
    /// Keep-alive rounds sent.
    pub keepalives: u64,
    /// Teammates never heard from whose chunks this peer asked the splitter to forward.
    pub forward_requests: u64,
    /// Teammates reached at a probe socket ([`NtsPeer::add_probed`]).
    pub probed: u64,
    /// Retries from a new port (`N`).
    pub retries: u64,
}

/// The NTS state of one peer session.
#[derive(Debug)]
pub struct NtsPeer {
    me: PeerId,
    splitter: Endpoint,
    monitor: bool,
    pending: Pending,
    /// Teammates heard from (or announced to a monitor), by ID.
    known: HashMap<PeerId, Endpoint>,
    /// Ports at which teammates were announced.
    announced: HashMap<PeerId, u16>,
    /// Peers of list 2 not heard from yet; `None` until list 2 arrived.
    initial: Option<HashSet<PeerId>>,
    /// When `Y` goes even if `initial` is not empty.
    deadline: Option<Instant>,
    patience: Duration,
    incorporated: bool,
    /// Whether the splitter echoed our `Y`.
    y_acked: bool,
    /// At a monitor: (ID, port) pairs already reported with U3.
    reported: HashSet<(PeerId, u16)>,
    actions: VecDeque<NtsPeerAction>,
    counters: NtsPeerCounters,
    /// When the next keep-alive round goes (peers only: monitors are on public addresses).
    next_keepalive: Option<Instant>,
    /// The monitors of the join message.
    monitors: Vec<Endpoint>,
    /// Forwarding fallback: when each teammate was announced (list 2 or U2), its port step, and
    /// how it is reached (for status pages).
    fallback: Fallback,
    /// Retries (`N` from a new port) left.
    retries_left: u8,
    /// A [`NtsPeerAction::Rebind`] is out: waiting for [`NtsPeer::rebound`].
    rebinding: bool,
    /// Early `Y` ([`NtsPeer::set_early_y`]): this long after list 2 it says `Y` without waiting
    /// for the rest of list 2.
    early_y: Option<Duration>,
    /// When list 2 arrived, and how many teammates it named.
    list2: Option<(Instant, usize)>,
}

/// What the forwarding fallback and the status pages need to know of each teammate.
#[derive(Debug, Default)]
struct Fallback {
    told_at: HashMap<PeerId, Instant>,
    steps: HashMap<PeerId, u16>,
    how: HashMap<PeerId, Reached>,
    asked: HashSet<PeerId>,
    /// Whether the splitter was told that we take forwarded chunks.
    said_capable: bool,
}

impl NtsPeer {
    /// A peer (or monitor) that was given `me` by the `splitter`, whose join message named
    /// `monitors`. A peer sends its ID to the splitter and each monitor at once; a monitor,
    /// incorporated on the spot, sends nothing. `patience`: how long after list 2 it waits for
    /// hellos before saying `Y` anyway.
    pub fn new(
        now: Instant,
        me: PeerId,
        splitter: Endpoint,
        monitors: &[Endpoint],
        monitor: bool,
        patience: Duration,
    ) -> NtsPeer {
        let mut p = NtsPeer {
            me,
            splitter,
            monitor,
            pending: Pending::new(MAX_IN_FLIGHT),
            known: HashMap::new(),
            announced: HashMap::new(),
            initial: None,
            deadline: None,
            patience,
            incorporated: monitor,
            y_acked: monitor,
            reported: HashSet::new(),
            actions: VecDeque::new(),
            counters: NtsPeerCounters::default(),
            next_keepalive: (!monitor).then_some(now + KEEPALIVE_EVERY),
            monitors: monitors.to_vec(),
            fallback: Fallback::default(),
            retries_left: 0,
            rebinding: false,
            early_y: None,
            list2: None,
        };
        if !monitor {
            p.pending.send(now, me.as_bytes(), splitter, &[]);
            for &m in monitors {
                p.pending.send(now, me.as_bytes(), m, &[]);
            }
            p.flush(now);
        }
        p
    }

    /// Its ID.
    pub fn id(&self) -> PeerId {
        self.me
    }

    /// Lets it retry from a new port up to `n` times when `patience` is up and some peer of
    /// list 2 was not heard from (0, the default: say `Y` anyway at once). Monitors never retry.
    pub fn set_retries(&mut self, n: u8) {
        self.retries_left = if self.monitor { 0 } else { n };
    }

    /// Says `Y` `after` list 2 arrived without waiting for every peer in it (`None`, the
    /// default: only once all were heard, or when `patience` is up), if it heard one of them
    /// or has no retry left (a peer that heard nobody may be blocked: it keeps its retry for
    /// when `patience` is up). The peers of list 2 not heard yet are greeted on as a member:
    /// hellos keep being resent, probing goes on, and each one heard later is a
    /// [`NtsPeerAction::Neighbour`] like any other; until then the splitter forwards their
    /// chunks (it does so from our first chunk on, since we said we take forwarded chunks
    /// before `Y`). Monitors are members from the start.
    pub fn set_early_y(&mut self, after: Option<Duration>) {
        self.early_y = after;
    }

    /// The caller's new socket is bound (after [`NtsPeerAction::Rebind`]): forgets what the old
    /// one learnt (teammates heard, announcements, hellos in flight: its mappings are not the
    /// new socket's) and sends `ID ‖ 'N'` to the splitter and to each monitor, resent until
    /// echoed. List 2 comes again on the join connection ([`NtsPeer::on_list2`]).
    pub fn rebound(&mut self, now: Instant) {
        if !self.rebinding {
            return;
        }
        self.rebinding = false;
        self.counters.retries += 1;
        self.pending = Pending::new(MAX_IN_FLIGHT);
        self.known.clear();
        self.announced.clear();
        self.fallback = Fallback::default();
        self.initial = None;
        self.deadline = None;
        self.list2 = None;
        let mut n = Vec::with_capacity(ID_LEN + 1);
        ToSplitter::Incorporated {
            id: self.me,
            done: false,
        }
        .encode(&mut n);
        self.pending.send(now, &n, self.splitter, &[]);
        for &m in &self.monitors {
            self.pending.send(now, &n, m, &[]);
        }
        self.flush(now);
    }

    /// Whether a [`NtsPeerAction::Rebind`] waits for [`NtsPeer::rebound`].
    pub fn is_rebinding(&self) -> bool {
        self.rebinding
    }

    /// List 2 arrived on the join connection: hello to each peer in it (at its port and, for a
    /// NAT with a port step, the next [`MAX_PREDICTED_PORTS`] steps).
    pub fn on_list2(&mut self, now: Instant, entries: &[List2Entry]) {
        let mut initial = HashSet::new();
        for e in entries {
            if e.id == self.me {
                continue;
            }
            let base = e.endpoint.port();
            let ports: Vec<u16> = if e.port_step == 0 {
                Vec::new()
            } else {
                (1..=u32::from(MAX_PREDICTED_PORTS))
                    .filter_map(|k| {
                        u16::try_from(u32::from(base) + k * u32::from(e.port_step)).ok()
                    })
                    .collect()
            };
            self.announced.insert(e.id, base);
            self.fallback.told_at.insert(e.id, now);
            self.fallback.steps.insert(e.id, e.port_step);
            if !self.known.contains_key(&e.id) {
                initial.insert(e.id);
            }
            if !self
                .pending
                .send(now, self.me.as_bytes(), e.endpoint, &ports)
            {
                self.counters.refused += 1;
            }
        }
        self.list2 = Some((now, initial.len()));
        self.initial = Some(initial);
        self.deadline = Some(now + self.patience);
        self.say_capable(now);
        self.flush(now);
        self.check_incorporated(now);
    }

    /// Handles a datagram from `from`; false when it is not NTS (the DBS peer takes it).
    pub fn handle_datagram(&mut self, now: Instant, from: Endpoint, data: &[u8]) -> bool {
        let from_splitter = from == self.splitter;
        if from_splitter && data.len() == super::nts_forward::FORWARD_REQUEST_LEN {
            // The echo of a forward request.
            self.pending.acknowledge(data, from);
            return true;
        }
        match ToPeer::parse(data, from_splitter, &self.me, self.monitor) {
            ToPeer::Ack(d) => {
                if self.pending.acknowledge(d, from)
                    && from_splitter
                    && d.len() == ID_LEN + 1
                    && d[ID_LEN] == b'Y'
                {
                    self.y_acked = true;
                    self.ask_forwarding(now);
                }
            }
            ToPeer::Hello { id, .. } if self.monitor && id == self.me => {
                // The echo of our own keep-alive (a monitor's parse takes 7 bytes as a hello).
                self.pending.acknowledge(data, from);
            }
            ToPeer::Hello { id, retry } if self.monitor => {
                // An arriving peer's U1 (or N): echo, and tell the splitter its port.
                self.echo(from, data);
                if self.reported.len() < MAX_KNOWN && self.reported.insert((id, from.port())) {
                    let m = if retry {
                        ToSplitter::MonitorSawRetry {
                            id,
                            port: from.port(),
                        }
                    } else {
                        ToSplitter::MonitorSaw {
                            id,
                            port: from.port(),
                        }
                    };
                    let mut out = Vec::new();
                    m.encode(&mut out);
                    self.pending.send(now, &out, self.splitter, &[]);
                }
            }
            ToPeer::Hello { id, .. } => {
                if id == self.me || from_splitter {
                    return true;
                }
                self.echo(from, data);
                self.heard(now, id, from);
            }
            ToPeer::NewPeer(np) => self.on_new_peer(now, np),
            ToPeer::NewPeerAtMonitor { id, endpoint } => {
                // A peer announced again at another endpoint retried from a new socket.
                let room = self.known.contains_key(&id) || self.known.len() < MAX_KNOWN;
                if self.monitor && self.known.get(&id) != Some(&endpoint) && room {
                    self.known.insert(id, endpoint);
                    self.counters.announced += 1;
                    self.actions.push_back(NtsPeerAction::Neighbour {
                        id,
                        endpoint,
                        how: Reached::Announced,
                    });
                }
            }
            ToPeer::Dbs(d) => {
                // The splitter sends chunks to members only, and a reference splitter starts
                // as soon as it has read our `Y`, before its echo (queued behind its other NTS
                // messages) arrives: the chunk is the acknowledgement. The caller must take
                // the chunk (it is ours to relay; dropping it loses it for the whole team).
                if from_splitter
                    && self.incorporated
                    && !self.y_acked
                    && d.len() > super::wire::CHUNK_HEADER
                {
                    self.y_acked = true;
                    self.ask_forwarding(now);
                    self.flush(now);
                }
                return false;
            }
        }
        self.flush(now);
        self.check_incorporated(now);
        true
    }

    /// A teammate's hello from `from`.
    fn heard(&mut self, now: Instant, id: PeerId, from: Endpoint) {
        if let Some(initial) = &mut self.initial {
            initial.remove(&id);
        }
        match self.known.get(&id) {
            Some(&e) if e == from => return,
            Some(_) => {}
            None if self.known.len() >= MAX_KNOWN => {
                self.counters.refused += 1;
                return;
            }
            None => {}
        }
        self.known.insert(id, from);
        if self.fallback.how.len() < MAX_KNOWN || self.fallback.how.contains_key(&id) {
            self.fallback.how.insert(
                id,
                match self.announced.get(&id) {
                    Some(&p) if p != from.port() => Reached::Predicted,
                    _ => Reached::Direct,
                },
            );
        }
        // Hello back to where it came from: when our hellos to the announced and predicted ports
        // all miss its NAT's mapping (other traffic used the predicted ports up), this one
        // still gets through, since its NAT has just sent to us from there.
        self.pending.send(now, self.me.as_bytes(), from, &[]);
        // Our hellos to it need no more resending: it reached us, so the way is open.
        // (A hello may come before the splitter's U2 about its sender: that counts as direct.)
        let how = match self.announced.get(&id) {
            Some(&p) if p != from.port() => {
                self.counters.predicted += 1;
                Reached::Predicted
            }
            _ => {
                self.counters.direct += 1;
                Reached::Direct
            }
        };
        self.actions.push_back(NtsPeerAction::Neighbour {
            id,
            endpoint: from,
            how,
        });
        // U4: the splitter learns the port the teammate's NAT gave towards us.
        let mut out = Vec::new();
        ToSplitter::PortReport {
            id,
            port: from.port(),
        }
        .encode(&mut out);
        self.pending.send(now, &out, self.splitter, &[]);
    }

    fn on_new_peer(&mut self, now: Instant, np: NewPeer) {
        match self.announced.get(&np.id) {
            // Ourselves, or a repeat of a U2 already acted on.
            _ if np.id == self.me => return,
            Some(&p) if p == np.endpoint.port() => return,
            // Announced again at another port: it retried from a new socket (`N`). The old
            // endpoint is gone: say hello to the new one as to a newcomer.
            Some(_) => {
                self.known.remove(&np.id);
                self.fallback.how.remove(&np.id);
                self.fallback.asked.remove(&np.id);
            }
            None if self.announced.len() >= MAX_KNOWN => {
                self.counters.refused += 1;
                return;
            }
            None => {}
        }
        self.announced.insert(np.id, np.endpoint.port());
        self.fallback.told_at.insert(np.id, now);
        self.fallback.steps.insert(np.id, np.port_step);
        if let Some(x) = np.extra_port {
            let to = Endpoint::new(*self.splitter.ip(), x);
            self.pending.send(now, self.me.as_bytes(), to, &[]);
        }
        if self.known.contains_key(&np.id) {
            return;
        }
        let ports = probable_source_ports(np.endpoint.port(), np.port_step, np.peer_number);
        if !self
            .pending
            .send(now, self.me.as_bytes(), np.endpoint, &ports)
        {
            self.counters.refused += 1;
        }
    }

    fn echo(&mut self, to: Endpoint, data: &[u8]) {
        self.counters.echoed += 1;
        self.actions.push_back(NtsPeerAction::Send {
            to,
            data: data.to_vec(),
        });
    }

    fn check_incorporated(&mut self, now: Instant) {
        if self.incorporated {
            return;
        }
        let Some(initial) = &self.initial else { return };
        let missing = initial.len();
        let early = self.early_y_due(now, missing);
        if missing > 0 && !early && self.deadline.is_some_and(|d| now < d) {
            return;
        }
        if missing > 0 && !early && self.retries_left > 0 {
            // Retry from a new port (the caller rebinds, then calls `rebound`).
            self.retries_left -= 1;
            self.rebinding = true;
            self.initial = None;
            self.deadline = None;
            self.list2 = None;
            self.actions.push_back(NtsPeerAction::Rebind);
            return;
        }
        self.counters.unreached += missing as u64;
        self.incorporated = true;
        let mut y = Vec::with_capacity(ID_LEN + 1);
        ToSplitter::Incorporated {
            id: self.me,
            done: true,
        }
        .encode(&mut y);
        self.pending.send(now, &y, self.splitter, &[]);
        self.flush(now);
        self.actions
            .push_back(NtsPeerAction::Incorporated { missing });
    }

    /// Whether an early `Y` is due, with `missing` peers of list 2 not heard yet.
    fn early_y_due(&self, now: Instant, missing: usize) -> bool {
        match (self.early_y, self.list2) {
            (Some(after), Some((at, named))) => {
                now >= at + after && (missing < named || self.retries_left == 0)
            }
            _ => false,
        }
    }

    /// When an early `Y` may be due.
    fn early_y_at(&self) -> Option<Instant> {
        match (self.early_y, self.list2) {
            (Some(after), Some((at, _))) if !self.incorporated && !self.rebinding => {
                Some(at + after)
            }
            _ => None,
        }
    }

    /// A forward request naming ourselves: "we take forwarded chunks", sent once list 2 has
    /// arrived (before `Y`), so that the splitter forwards us the chunks of the teammates we
    /// have not reported (U4) from our very first chunk, and a later newcomer's chunks at once
    /// if we did not hear its hellos. Resent until echoed; a reference splitter ignores it.
    fn say_capable(&mut self, now: Instant) {
        if self.monitor || self.fallback.said_capable {
            return;
        }
        self.fallback.said_capable = true;
        let mut out = Vec::new();
        super::nts_forward::ForwardRequest {
            me: self.me,
            origin: self.me,
        }
        .encode(&mut out);
        self.pending.send(now, &out, self.splitter, &[]);
    }

    fn flush(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let actions = &mut self.actions;
        self.pending.poll(
            now,
            |m, to| {
                actions.push_back(NtsPeerAction::Send {
                    to,
                    data: m.to_vec(),
                })
            },
            &mut expired,
        );
        self.counters.expired += expired.len() as u64;
    }

    /// Resends what is due; says `Y` when the patience is up; keeps the NAT mappings alive.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.flush(now);
        self.check_incorporated(now);
        self.ask_forwarding(now);
        if self.incorporated && self.next_keepalive.is_some_and(|t| now >= t) {
            self.next_keepalive = Some(now + KEEPALIVE_EVERY);
            self.keepalive();
        }
    }

    /// Forwarding fallback: once a member, asks the splitter to forward the chunks of every
    /// teammate it was told of [`FORWARD_AFTER`](super::nts_forward::FORWARD_AFTER) ago and
    /// has not heard from.
    fn ask_forwarding(&mut self, now: Instant) {
        if self.monitor || !self.y_acked {
            return;
        }
        self.say_capable(now);
        let due: Vec<PeerId> = self
            .fallback
            .told_at
            .iter()
            .filter(|(id, t)| {
                now.saturating_duration_since(**t) >= super::nts_forward::FORWARD_AFTER
                    && !self.known.contains_key(id)
                    && !self.fallback.asked.contains(id)
            })
            .map(|(id, _)| *id)
            .collect();
        for origin in due {
            let mut out = Vec::new();
            super::nts_forward::ForwardRequest {
                me: self.me,
                origin,
            }
            .encode(&mut out);
            if !self.pending.send(now, &out, self.splitter, &[]) {
                self.counters.refused += 1;
                continue;
            }
            self.fallback.asked.insert(origin);
            self.fallback.how.insert(origin, Reached::Forwarded);
            self.counters.forward_requests += 1;
        }
        self.flush(now);
    }

    /// When the next forward request may be due.
    fn next_forward_check(&self) -> Option<Instant> {
        if self.monitor || !self.y_acked {
            return None;
        }
        self.fallback
            .told_at
            .iter()
            .filter(|(id, _)| !self.known.contains_key(id) && !self.fallback.asked.contains(id))
            .map(|(_, t)| *t + super::nts_forward::FORWARD_AFTER)
            .min()
    }

    /// Every teammate this peer was told of or heard from: its ID, the endpoint it is reached at
    /// (`None`: never heard from), how, and the port step the splitter announced for its NAT.
    pub fn teammates(&self) -> Vec<(PeerId, Option<Endpoint>, Option<Reached>, u16)> {
        let mut ids: Vec<PeerId> = self
            .known
            .keys()
            .chain(
                self.fallback
                    .told_at
                    .keys()
                    .filter(|i| !self.known.contains_key(i)),
            )
            .copied()
            .collect();
        ids.sort();
        ids.into_iter()
            .map(|id| {
                let how = self.fallback.how.get(&id).copied().or_else(|| {
                    (self.monitor && self.known.contains_key(&id)).then_some(Reached::Announced)
                });
                (
                    id,
                    self.known.get(&id).copied(),
                    how,
                    self.fallback.steps.get(&id).copied().unwrap_or(0),
                )
            })
            .collect()
    }

    /// One keep-alive round: our ID, once (not resent), to the splitter, the monitors and every
    /// teammate known by ID. Receivers echo it (a hello from a known teammate, or a U1 a
    /// monitor already reported, changes nothing else), so the mappings are refreshed both
    /// ways.
    fn keepalive(&mut self) {
        self.counters.keepalives += 1;
        let me = self.me.as_bytes().to_vec();
        for &to in std::iter::once(&self.splitter)
            .chain(&self.monitors)
            .chain(self.known.values())
        {
            self.actions.push_back(NtsPeerAction::Send {
                to,
                data: me.clone(),
            });
        }
    }

    /// When [`NtsPeer::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let d = if self.incorporated || self.rebinding {
            None
        } else {
            self.deadline
        };
        self.pending
            .poll_timeout()
            .into_iter()
            .chain(d)
            .chain(self.early_y_at())
            .chain(self.next_keepalive.filter(|_| self.incorporated))
            .chain(self.next_forward_check())
            .min()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<NtsPeerAction> {
        self.actions.pop_front()
    }

    /// Whether `Y` went (a monitor: from the start).
    pub fn is_incorporated(&self) -> bool {
        self.incorporated
    }

    /// Whether the splitter echoed our `Y` or sent us a chunk after it (a monitor: from the
    /// start): the splitter has made us a member.
    pub fn is_member(&self) -> bool {
        self.y_acked
    }

    /// Whether list 2 arrived.
    pub fn has_list2(&self) -> bool {
        self.initial.is_some()
    }

    /// Counters.
    pub fn counters(&self) -> &NtsPeerCounters {
        &self.counters
    }

    /// The teammates known by ID, with the endpoint each is reached at.
    pub fn known(&self) -> impl Iterator<Item = (PeerId, Endpoint)> + '_ {
        self.known.iter().map(|(i, e)| (*i, *e))
    }

    /// Port probing reached the teammate `id` at `endpoint` (a probe socket of ours got its
    /// hello): a neighbour like one that said hello, which the caller reaches through that
    /// socket. No U4: the port is one of a probe socket's mappings, not the teammate's.
    pub fn add_probed(&mut self, now: Instant, id: PeerId, endpoint: Endpoint) {
        if id == self.me {
            return;
        }
        if let Some(initial) = &mut self.initial {
            initial.remove(&id);
        }
        if !self.known.contains_key(&id) && self.known.len() >= MAX_KNOWN {
            self.counters.refused += 1;
            return;
        }
        if self.known.insert(id, endpoint) == Some(endpoint) {
            return;
        }
        // For status pages (it said `unreached` before: reached, but not by a hello).
        if self.fallback.how.len() < MAX_KNOWN || self.fallback.how.contains_key(&id) {
            self.fallback.how.insert(id, Reached::Probed);
        }
        self.counters.probed += 1;
        self.actions.push_back(NtsPeerAction::Neighbour {
            id,
            endpoint,
            how: Reached::Probed,
        });
        self.check_incorporated(now);
    }

    /// The splitter's endpoint.
    pub fn splitter(&self) -> Endpoint {
        self.splitter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::nts::testing::{ep, id};

    const SPLITTER: u8 = 1;
    const MONITOR: u8 = 2;
    const PATIENCE: Duration = Duration::from_secs(4);

    fn drain(p: &mut NtsPeer) -> Vec<NtsPeerAction> {
        std::iter::from_fn(|| p.poll_action()).collect()
    }

    fn entry(name: &str, h: u8, port: u16) -> List2Entry {
        List2Entry {
            id: id(name),
            endpoint: ep(h, port),
            port_step: 0,
        }
    }

    /// A peer `BBBBBBB` with `retries`, list 2 naming `TTTTTTT` (host 10).
    fn peer(retries: u8) -> (NtsPeer, Instant) {
        let t = Instant::now();
        let mut p = NtsPeer::new(
            t,
            id("BBBBBBB"),
            ep(SPLITTER, 8001),
            &[ep(MONITOR, 5000)],
            false,
            PATIENCE,
        );
        p.set_retries(retries);
        p.on_list2(t, &[entry("TTTTTTT", 10, 20000)]);
        drain(&mut p);
        (p, t)
    }

    #[test]
    fn a_peer_retries_from_a_new_port_then_joins_when_heard() {
        let (mut p, t) = peer(1);
        let t1 = t + PATIENCE;
        p.handle_timeout(t1);
        let a = drain(&mut p);
        assert!(a.contains(&NtsPeerAction::Rebind), "{a:?}");
        assert!(
            !a.iter()
                .any(|x| matches!(x, NtsPeerAction::Incorporated { .. }))
        );
        assert!(p.is_rebinding());
        assert_eq!(p.poll_timeout().map(|x| x > t1), Some(true));
        // The new socket: N to the splitter and the monitor, resent until echoed.
        p.rebound(t1);
        let n = b"BBBBBBBN".to_vec();
        let sent: Vec<(Endpoint, Vec<u8>)> = drain(&mut p)
            .into_iter()
            .filter_map(|x| match x {
                NtsPeerAction::Send { to, data } => Some((to, data)),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            vec![
                (ep(SPLITTER, 8001), n.clone()),
                (ep(MONITOR, 5000), n.clone())
            ]
        );
        assert_eq!(p.counters().retries, 1);
        assert!(!p.has_list2(), "list 2 is read again");
        p.handle_datagram(t1, ep(SPLITTER, 8001), &n);
        p.handle_timeout(t1 + Duration::from_secs(2));
        let again: Vec<Endpoint> = drain(&mut p)
            .into_iter()
            .filter_map(|x| match x {
                NtsPeerAction::Send { to, .. } => Some(to),
                _ => None,
            })
            .collect();
        assert_eq!(
            again,
            vec![ep(MONITOR, 5000)],
            "only the monitor's N is resent"
        );
        // List 2 again; the teammate's hello (to the new socket) makes it a member.
        p.on_list2(t1, &[entry("TTTTTTT", 10, 20000)]);
        p.handle_datagram(t1, ep(10, 20000), b"TTTTTTT");
        let a = drain(&mut p);
        assert!(
            a.contains(&NtsPeerAction::Incorporated { missing: 0 }),
            "{a:?}"
        );
    }

    #[test]
    fn with_its_retries_used_up_a_peer_says_y_anyway() {
        let (mut p, mut t) = peer(2);
        for k in 1..=2 {
            t += PATIENCE;
            p.handle_timeout(t);
            assert!(drain(&mut p).contains(&NtsPeerAction::Rebind), "retry {k}");
            p.rebound(t);
            p.on_list2(t, &[entry("TTTTTTT", 10, 20000)]);
            drain(&mut p);
        }
        t += PATIENCE;
        p.handle_timeout(t);
        let a = drain(&mut p);
        assert!(!a.contains(&NtsPeerAction::Rebind));
        assert!(a.contains(&NtsPeerAction::Incorporated { missing: 1 }));
        assert_eq!(p.counters().retries, 2);
        // `rebound` without a `Rebind` changes nothing.
        p.rebound(t);
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.counters().retries, 2);
    }

    fn y_sent(a: &[NtsPeerAction]) -> bool {
        a.iter()
            .any(|x| matches!(x, NtsPeerAction::Send { data, .. } if data == b"BBBBBBBY"))
    }

    #[test]
    fn with_early_y_a_peer_that_heard_one_teammate_joins_and_greets_the_rest_as_a_member() {
        let t = Instant::now();
        let mut p = NtsPeer::new(t, id("BBBBBBB"), ep(SPLITTER, 8001), &[], false, PATIENCE);
        p.set_retries(1);
        p.set_early_y(Some(Duration::from_secs(1)));
        p.on_list2(
            t,
            &[entry("TTTTTTT", 10, 20000), entry("UUUUUUU", 11, 20000)],
        );
        // It says it takes forwarded chunks before its Y.
        let a = drain(&mut p);
        assert!(a.contains(&NtsPeerAction::Send {
            to: ep(SPLITTER, 8001),
            data: b"BBBBBBBFBBBBBBB".to_vec()
        }));
        p.handle_datagram(t, ep(10, 20000), b"TTTTTTT");
        drain(&mut p);
        assert!(!p.is_incorporated());
        let early = t + Duration::from_secs(1);
        assert!(p.poll_timeout().is_some_and(|x| x <= early));
        p.handle_timeout(early);
        let a = drain(&mut p);
        assert!(y_sent(&a), "{a:?}");
        assert!(a.contains(&NtsPeerAction::Incorporated { missing: 1 }));
        assert!(!a.contains(&NtsPeerAction::Rebind));
        // The other one answers later: a neighbour like any other.
        p.handle_datagram(early, ep(11, 20000), b"UUUUUUU");
        assert!(drain(&mut p).contains(&NtsPeerAction::Neighbour {
            id: id("UUUUUUU"),
            endpoint: ep(11, 20000),
            how: Reached::Direct
        }));
    }

    #[test]
    fn with_early_y_a_peer_that_heard_nobody_keeps_its_retry_for_the_patience() {
        let (mut p, t) = peer(1);
        p.set_early_y(Some(Duration::from_secs(1)));
        p.handle_timeout(t + Duration::from_secs(1));
        assert!(!y_sent(&drain(&mut p)));
        p.handle_timeout(t + PATIENCE);
        assert!(drain(&mut p).contains(&NtsPeerAction::Rebind));
        // Without retries it would not wait.
        let (mut q, t) = peer(0);
        q.set_early_y(Some(Duration::from_secs(1)));
        q.handle_timeout(t + Duration::from_secs(1));
        assert!(y_sent(&drain(&mut q)));
    }

    #[test]
    fn monitors_never_retry() {
        let t = Instant::now();
        let mut m = NtsPeer::new(t, id("MMMMMMM"), ep(SPLITTER, 8001), &[], true, PATIENCE);
        m.set_retries(3);
        m.handle_timeout(t + PATIENCE * 4);
        assert!(!drain(&mut m).contains(&NtsPeerAction::Rebind));
        // It takes a peer announced again at its retry's endpoint.
        let mut u2m = Vec::new();
        crate::proto::nts::encode_new_peer_at_monitor(&id("BBBBBBB"), ep(11, 30000), &mut u2m);
        m.handle_datagram(t, ep(SPLITTER, 8001), &u2m);
        crate::proto::nts::encode_new_peer_at_monitor(&id("BBBBBBB"), ep(11, 40000), &mut u2m);
        m.handle_datagram(t, ep(SPLITTER, 8001), &u2m);
        m.handle_datagram(t, ep(SPLITTER, 8001), &u2m);
        let n: Vec<Endpoint> = drain(&mut m)
            .into_iter()
            .filter_map(|x| match x {
                NtsPeerAction::Neighbour { endpoint, .. } => Some(endpoint),
                _ => None,
            })
            .collect();
        assert_eq!(n, vec![ep(11, 30000), ep(11, 40000)]);
    }

    #[test]
    fn a_member_says_hello_to_a_retrying_peers_new_endpoint() {
        let (mut p, t) = peer(0);
        p.handle_datagram(t, ep(10, 20000), b"TTTTTTT");
        drain(&mut p);
        let u2 = |port: u16, extra: Option<u16>| {
            let mut out = Vec::new();
            NewPeer {
                id: id("CCCCCCC"),
                endpoint: ep(12, port),
                port_step: 0,
                peer_number: 2,
                extra_port: extra,
            }
            .encode(&mut out);
            out
        };
        let hellos = |a: Vec<NtsPeerAction>| -> Vec<Endpoint> {
            a.into_iter()
                .filter_map(|x| match x {
                    NtsPeerAction::Send { to, data } if data == b"BBBBBBB" => Some(to),
                    _ => None,
                })
                .collect()
        };
        p.handle_datagram(t, ep(SPLITTER, 8001), &u2(30000, None));
        assert_eq!(hellos(drain(&mut p)), vec![ep(12, 30000)]);
        // A repeat: nothing; the retry's new endpoint: hellos there (and to the extra port).
        p.handle_datagram(t, ep(SPLITTER, 8001), &u2(30000, None));
        assert!(hellos(drain(&mut p)).is_empty());
        p.handle_datagram(t, ep(SPLITTER, 8001), &u2(40000, Some(9000)));
        assert_eq!(
            hellos(drain(&mut p)),
            vec![ep(SPLITTER, 9000), ep(12, 40000)]
        );
        // The ID sent to the extra port is resent until the extra socket echoes it.
        p.handle_timeout(t + Duration::from_secs(2));
        assert!(hellos(drain(&mut p)).contains(&ep(SPLITTER, 9000)));
        p.handle_datagram(t, ep(SPLITTER, 9000), b"BBBBBBB");
        p.handle_timeout(t + Duration::from_secs(4));
        assert!(!hellos(drain(&mut p)).contains(&ep(SPLITTER, 9000)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// However many retries it has and whatever the teammates do, a peer retries at
            /// most that many times, and ends with `Y` within (retries + 1) patiences of its
            /// last list 2.
            #[test]
            fn retries_are_bounded_and_end_in_y(retries in 0u8..6, heard_at in proptest::option::of(0u8..8)) {
                let (mut p, mut t) = peer(retries);
                let mut rebinds = 0;
                let mut done = false;
                for round in 0..8u8 {
                    if heard_at == Some(round) {
                        p.handle_datagram(t, ep(10, 20000), b"TTTTTTT");
                    }
                    t += PATIENCE;
                    p.handle_timeout(t);
                    for a in drain(&mut p) {
                        match a {
                            NtsPeerAction::Rebind => {
                                prop_assert!(!done);
                                rebinds += 1;
                                p.rebound(t);
                                p.on_list2(t, &[entry("TTTTTTT", 10, 20000)]);
                            }
                            NtsPeerAction::Incorporated { .. } => done = true,
                            _ => {}
                        }
                    }
                    for a in drain(&mut p) {
                        if matches!(a, NtsPeerAction::Incorporated { .. }) {
                            done = true;
                        }
                    }
                }
                prop_assert!(done);
                prop_assert!(rebinds <= retries);
                prop_assert_eq!(u64::from(rebinds), p.counters().retries);
            }
        }
    }
}
