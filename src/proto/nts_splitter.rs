//! NTS at the splitter (reference-notes §6.4), sans-IO: IDs for arriving peers, acknowledgement
//! of every NTS message by echo, the source ports seen by the splitter and by the monitors, the
//! port-step estimate, list 2 and the U2/U2m messages once a peer is known everywhere, and its
//! incorporation on `Y`.
//!
//! The caller owns the TCP connections and the UDP socket: it calls [`NtsSplitter::arrive`] when
//! a join has been read, passes every NTS-sized datagram to [`NtsSplitter::handle_datagram`],
//! calls [`NtsSplitter::handle_timeout`] now and then, and carries out the [`NtsAction`]s:
//! datagrams to send from the splitter's port, list 2 to write on a peer's join connection, and
//! the incorporation (the peer becomes a team member at the UDP endpoint it said `Y` from).
//!
//! Unlike the reference this one answers only to IDs it handed out, from the address that joined
//! with them: messages from strangers and forged IDs change nothing and are not echoed.
//!
//! **Extra port (U2x).** The caller also owns an extra UDP socket (reference
//! `ListenExtraSocketThread`) and tells the core its port ([`NtsSplitter::set_extra_port`]). A U2
//! to a member whose NAT's port step is not 0 carries that port (U2x, 19 bytes); the member sends
//! its ID there, and [`NtsSplitter::handle_extra_datagram`] echoes it (from the extra socket,
//! [`NtsAction::SendFromExtra`]) and takes the source port as a new sample of the member's port
//! step and its last known port. As the reference rebinds its extra socket before every such
//! announcement (a NAT reuses its mapping towards an address and port it already sends to, so
//! a second ID to the same extra port would show an old mapping), the core asks for a new one
//! after each announcement that carried it ([`NtsAction::RenewExtraPort`]).
//!
//! **Retries (`N`).** An arriving peer that did not hear from every peer of list 2 may retry from
//! a new UDP socket: it sends `ID ‖ 'N'` to the splitter and the monitors, which report the new
//! port (N-fwd). The core then measures again, sends list 2 again on the join connection, U2m to
//! the monitors and U2 to the team, and the peer's `Y` from the new socket makes it a member at
//! that endpoint. A repeated `N` from the same port is only echoed; at most [`MAX_RETRIES`]
//! retries per arrival are taken; `N` for IDs that are not arriving, or from another address
//! than the join's, is counted and changes nothing.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::Endpoint;
use super::nts::{
    List2Entry, MAX_TOTAL_INCORPORATION_TIME, NewPeer, PeerId, PortStep, STEP_UNKNOWN, ToSplitter,
    encode_list2, encode_new_peer_at_monitor,
};
use super::nts_probe::{PeerView, ProbePlanner, ProbeToSplitter};
use super::team::TeamId;

/// The splitter sends each of its own NTS messages (U2, U2m) this many times (reference: 3).
pub const SPLITTER_REPEATS: u8 = 3;
/// Time between those repeats (the reference paces them at one per chunk read).
pub const SPLITTER_REPEAT_EVERY: Duration = Duration::from_millis(50);

/// Whether a datagram of `len` bytes may be an NTS message for the splitter (U1, Y/N, U3/U4,
/// N-fwd): the splitter's DBS rules never take these lengths.
pub fn is_nts_size(len: usize) -> bool {
    (super::nts::ID_LEN..=super::nts::ID_LEN + 3).contains(&len)
        || len == super::nts_forward::FORWARD_REQUEST_LEN
}

/// Most retries (`N` from a new port) the splitter takes from one arriving peer.
pub const MAX_RETRIES: u8 = 8;

/// What the caller does for the NTS splitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtsAction {
    /// Send `data` from the splitter's UDP port to `to`.
    Send {
        /// Destination.
        to: Endpoint,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Send `data` to `to` from the extra socket bound to `port` (the echo of an ID that came
    /// there).
    SendFromExtra {
        /// The extra socket's port.
        port: u16,
        /// Destination.
        to: Endpoint,
        /// Bytes.
        data: Vec<u8>,
    },
    /// An announcement carried the extra port: open a new extra socket (another port) and tell
    /// the core with [`NtsSplitter::set_extra_port`]. The old one may stay open a while, so that
    /// IDs already on their way to it are still echoed.
    RenewExtraPort,
    /// Write `bytes` (list 2) on the join connection of the arriving peer `id`.
    List2 {
        /// The arriving peer.
        id: PeerId,
        /// The encoded list.
        bytes: Vec<u8>,
    },
    /// The arriving peer `id` said `Y`: close its join connection and make it a team member at
    /// `endpoint` (its public address and the source port it used towards the splitter).
    Incorporate {
        /// The peer.
        id: PeerId,
        /// Its UDP endpoint as the splitter sees it.
        endpoint: Endpoint,
    },
    /// The arriving peer `id` took longer than [`MAX_TOTAL_INCORPORATION_TIME`]: close its join
    /// connection.
    GiveUp {
        /// The peer.
        id: PeerId,
    },
    /// Forwarding fallback: from now on send `to` a forwarded copy of every chunk sent to
    /// `origin` (`nts_forward`).
    Forward {
        /// The member whose chunks are copied.
        origin: Endpoint,
        /// The member that cannot hear from it.
        to: Endpoint,
    },
    /// Forwarding fallback: `to` heard from `origin` after all; stop forwarding.
    Unforward {
        /// The member whose chunks were copied.
        origin: Endpoint,
        /// The member that now hears from it.
        to: Endpoint,
    },
}

/// Counters of the NTS splitter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NtsSplitterCounters {
    /// Peers that arrived (TCP join read).
    pub arrived: u64,
    /// Peers incorporated (said `Y`), monitors included.
    pub incorporated: u64,
    /// Arrivals given up.
    pub given_up: u64,
    /// NTS messages echoed.
    pub echoed: u64,
    /// NTS-sized datagrams ignored (unknown IDs, wrong senders).
    pub ignored: u64,
    /// U4 reports taken.
    pub port_reports: u64,
    /// Retries (`N` from a new port) taken.
    pub retries: u64,
    /// Retries refused: over [`MAX_RETRIES`] for one arrival (echoed, not taken).
    pub retries_refused: u64,
    /// IDs of members or arriving peers taken at the extra port (port-step samples).
    pub extra_seen: u64,
    /// Datagrams at the extra port not taken (not an ID, unknown ID, another address).
    pub extra_ignored: u64,
    /// U2x sent (U2 with the extra port, to members whose NAT's port step is not 0).
    pub u2x_sent: u64,
    /// Forward requests taken (a new pair each).
    pub forward_requests: u64,
    /// Forward requests refused: from strangers, naming non-members or members of other teams,
    /// or over the bound.
    pub forward_refused: u64,
}

#[derive(Debug, Clone)]
struct Member {
    id: PeerId,
    team: TeamId,
    endpoint: Endpoint,
    monitor: bool,
    step: PortStep,
}

#[derive(Debug, Clone)]
struct Arriving {
    id: PeerId,
    team: TeamId,
    ip: Ipv4Addr,
    since: Instant,
    to_splitter: Option<u16>,
    /// The team's monitors when the peer arrived, with the port each saw the peer use.
    to_monitors: Vec<(Endpoint, Option<u16>)>,
    step: PortStep,
    list2_sent: bool,
    /// Retries taken.
    retries: u8,
    /// N-fwd ports that came before the peer's own `N` (at most one per monitor).
    retry_ports: Vec<(Endpoint, u16)>,
}

impl Arriving {
    fn endpoint(&self) -> Option<Endpoint> {
        self.to_splitter.map(|p| Endpoint::new(self.ip, p))
    }
}

/// A step as sent on the wire: unknown counts as 0.
fn wire_step(s: &PortStep) -> u16 {
    if s.step == STEP_UNKNOWN { 0 } else { s.step }
}

/// The NTS splitter state of every team.
#[derive(Debug, Default)]
pub struct NtsSplitter {
    members: Vec<Member>,
    arriving: Vec<Arriving>,
    actions: VecDeque<NtsAction>,
    repeats: Vec<(Instant, u8, Endpoint, Vec<u8>)>,
    counters: NtsSplitterCounters,
    /// Most peers arriving at once; more are refused by [`NtsSplitter::arrive`].
    pub max_arriving: usize,
    /// Forwarding fallback: by receiver, the origins whose chunks it gets forwarded.
    forwarding: std::collections::HashMap<PeerId, Vec<PeerId>>,
    /// Members (and arriving peers) that take forwarded chunks (they said so with a forward
    /// request naming themselves).
    capable: std::collections::HashSet<PeerId>,
    /// (reporter, heard): U4 reports, so that a new member's chunks are forwarded at once to
    /// the capable teammates that did not hear it during its incorporation.
    heard: std::collections::HashSet<(PeerId, PeerId)>,
    /// EMS: the private endpoint each peer joined with.
    privates: std::collections::HashMap<PeerId, Endpoint>,
    /// Port probing between our peers (issue 11, [`super::nts_probe`]).
    probe: ProbePlanner,
    /// The extra socket's port, for U2x (`None`: the caller has none; plain U2 to everyone).
    extra_port: Option<u16>,
}

/// Most (reporter, heard) pairs the splitter remembers.
const MAX_HEARD: usize = 1 << 20;

impl NtsSplitter {
    /// An NTS splitter with no peers, at most `max_arriving` peers being incorporated at once.
    pub fn new(max_arriving: usize) -> NtsSplitter {
        NtsSplitter {
            max_arriving,
            ..NtsSplitter::default()
        }
    }

    /// Whether `id` is in use (arriving or a member): the caller draws IDs until one is free.
    pub fn knows(&self, id: &PeerId) -> bool {
        self.members.iter().any(|m| m.id == *id) || self.arriving.iter().any(|a| a.id == *id)
    }

    /// The monitors of `team` in team order (what the join message's list holds under NTS).
    pub fn monitors(&self, team: TeamId) -> Vec<Endpoint> {
        self.members
            .iter()
            .filter(|m| m.team == team && m.monitor)
            .map(|m| m.endpoint)
            .collect()
    }

    /// A join of `team` from `tcp` was read and the peer was given `id`. A monitor is
    /// incorporated at once at its TCP endpoint ([`NtsAction::Incorporate`] follows); a peer
    /// waits for its hellos. False (nothing changed) when `id` is taken or too many peers are
    /// arriving.
    pub fn arrive(
        &mut self,
        now: Instant,
        team: TeamId,
        id: PeerId,
        tcp: Endpoint,
        monitor: bool,
    ) -> bool {
        if self.knows(&id) || (!monitor && self.arriving.len() >= self.max_arriving) {
            return false;
        }
        self.counters.arrived += 1;
        if monitor {
            let step = PortStep {
                step: 0,
                last_port: Some(tcp.port()),
            };
            // Teammates say hello to it as to any newcomer.
            self.announce(now, team, id, tcp, 0, None);
            self.members.push(Member {
                id,
                team,
                endpoint: tcp,
                monitor: true,
                step,
            });
            self.counters.incorporated += 1;
            self.actions
                .push_back(NtsAction::Incorporate { id, endpoint: tcp });
            return true;
        }
        let to_monitors = self.monitors(team).into_iter().map(|m| (m, None)).collect();
        self.arriving.push(Arriving {
            id,
            team,
            ip: *tcp.ip(),
            since: now,
            to_splitter: None,
            to_monitors,
            step: PortStep::default(),
            list2_sent: false,
            retries: 0,
            retry_ports: Vec::new(),
        });
        true
    }

    /// The caller's extra socket is bound to `port`: U2x from now on carry it.
    pub fn set_extra_port(&mut self, port: u16) {
        self.extra_port = Some(port);
    }

    /// The extra port U2x carry now.
    pub fn extra_port(&self) -> Option<u16> {
        self.extra_port
    }

    /// A datagram from `from` at the extra socket bound to `port` (reference
    /// `ListenExtraSocketThread`): a member's or arriving peer's ID, from the address it joined
    /// from, is echoed from that socket and its source port taken as a port-step sample (for a
    /// member, against its endpoint's port; for an arriving peer, against its port towards the
    /// splitter). Anything else is counted and not answered.
    pub fn handle_extra_datagram(&mut self, port: u16, from: Endpoint, data: &[u8]) {
        let id = (data.len() == super::nts::ID_LEN)
            .then(|| PeerId::from_bytes(data))
            .flatten();
        let Some(id) = id else {
            self.counters.extra_ignored += 1;
            return;
        };
        if let Some(m) = self
            .members
            .iter_mut()
            .find(|m| m.id == id && !m.monitor && m.endpoint.ip() == from.ip())
        {
            m.step.observe(m.endpoint.port(), from.port());
        } else if let Some(a) = self
            .arriving
            .iter_mut()
            .find(|a| a.id == id && a.ip == *from.ip())
        {
            if let Some(p) = a.to_splitter {
                a.step.observe(p, from.port());
            }
        } else {
            self.counters.extra_ignored += 1;
            return;
        }
        self.probe.observe(id, from.port());
        self.counters.extra_seen += 1;
        self.actions.push_back(NtsAction::SendFromExtra {
            port,
            to: from,
            data: data.to_vec(),
        });
    }

    /// EMS: the arriving peer `id` joined with the private endpoint `private` (its 7-byte join
    /// message). Teammates behind the same NAT (same public address) are told of it by this
    /// endpoint. Only the peer's NAT-mates ever see it, so a forged one costs at most hellos
    /// inside that LAN.
    pub fn set_private(&mut self, id: PeerId, private: Endpoint) {
        if self.arriving.iter().any(|a| a.id == id) {
            self.privates.insert(id, private);
        }
    }

    /// Forgets the arriving peer `id` (its join connection closed).
    pub fn abandon(&mut self, id: &PeerId) {
        self.privates.remove(id);
        self.capable.remove(id);
        self.arriving.retain(|a| a.id != *id);
        self.probe.forget(id);
    }

    /// Forgets the member at `endpoint` (it left or was expelled).
    pub fn remove(&mut self, endpoint: Endpoint) {
        if let Some(gone) = self.members.iter().find(|m| m.endpoint == endpoint) {
            let id = gone.id;
            self.probe.forget(&id);
            self.capable.remove(&id);
            self.privates.remove(&id);
            self.heard.retain(|(a, b)| *a != id && *b != id);
            self.forwarding.remove(&id);
            self.forwarding.retain(|_, o| {
                o.retain(|x| *x != id);
                !o.is_empty()
            });
        }
        self.members.retain(|m| m.endpoint != endpoint);
        for a in &mut self.arriving {
            a.to_monitors.retain(|(m, _)| *m != endpoint);
        }
    }

    fn echo(&mut self, to: Endpoint, data: &[u8]) {
        self.counters.echoed += 1;
        self.actions.push_back(NtsAction::Send {
            to,
            data: data.to_vec(),
        });
    }

    fn repeat(&mut self, now: Instant, to: Endpoint, data: Vec<u8>) {
        self.actions.push_back(NtsAction::Send {
            to,
            data: data.clone(),
        });
        if SPLITTER_REPEATS > 1 {
            self.repeats
                .push((now + SPLITTER_REPEAT_EVERY, SPLITTER_REPEATS - 1, to, data));
        }
    }

    /// Handles a datagram from `from`; false when it is not NTS (a loss report, a goodbye, or
    /// malformed: the DBS rules take it).
    pub fn handle_datagram(&mut self, now: Instant, from: Endpoint, data: &[u8]) -> bool {
        if let Some(f) = super::nts_forward::ForwardRequest::parse(data) {
            self.on_forward_request(from, data, f);
            return true;
        }
        if let Some(m) = ProbeToSplitter::parse(data) {
            self.on_probe(now, from, m, data);
            return true;
        }
        let from_monitor = self.members.iter().any(|m| m.monitor && m.endpoint == from);
        let msg = ToSplitter::parse(data, from_monitor);
        let arriving = |s: &NtsSplitter, id: &PeerId| {
            s.arriving
                .iter()
                .position(|a| a.id == *id && a.ip == *from.ip())
        };
        match msg {
            ToSplitter::LossReport(_) | ToSplitter::Goodbye | ToSplitter::Malformed => {
                return false;
            }
            ToSplitter::Hello(id) => {
                if let Some(i) = arriving(self, &id) {
                    self.echo(from, data);
                    if !self.arriving[i].list2_sent {
                        self.arriving[i].to_splitter = Some(from.port());
                        self.check_complete(now, i);
                    }
                } else if self
                    .members
                    .iter()
                    .any(|m| m.id == id && m.endpoint.ip() == from.ip())
                {
                    // A member's hello (a keep-alive, or a repeat whose echo was lost).
                    self.echo(from, data);
                } else {
                    self.counters.ignored += 1;
                }
            }
            ToSplitter::MonitorSaw { id, port } | ToSplitter::MonitorSawRetry { id, port } => {
                self.echo(from, data);
                let retry = matches!(msg, ToSplitter::MonitorSawRetry { .. });
                let Some(i) = self.arriving.iter().position(|a| a.id == id) else {
                    return true;
                };
                let a = &mut self.arriving[i];
                if !a.list2_sent {
                    for (m, p) in &mut a.to_monitors {
                        if *m == from {
                            *p = Some(port);
                        }
                    }
                    self.check_complete(now, i);
                } else if retry
                    && a.to_monitors
                        .iter()
                        .any(|(m, p)| *m == from && *p != Some(port))
                {
                    // The monitor's report of a retry came before the peer's own `N`: kept for
                    // it (one per monitor; a repeat of the last attempt's report is not).
                    a.retry_ports.retain(|(m, _)| *m != from);
                    a.retry_ports.push((from, port));
                }
            }
            ToSplitter::PortReport { id, port } => {
                // From a member, or from an arriving peer at its endpoint.
                let sender_ok = self.members.iter().any(|m| m.endpoint == from)
                    || self.arriving.iter().any(|a| a.endpoint() == Some(from));
                if !sender_ok {
                    self.counters.ignored += 1;
                    return true;
                }
                self.echo(from, data);
                self.counters.port_reports += 1;
                self.on_heard(from, id);
                if let Some(sender) = self.id_at(from) {
                    self.probe.heard(sender, id);
                }
                // A NAT-mate's report (EMS: it heard the peer over their LAN) says nothing of
                // the NAT's ports.
                let mate = self
                    .arriving
                    .iter()
                    .find(|a| a.id == id)
                    .map(|a| a.ip)
                    .or_else(|| {
                        self.members
                            .iter()
                            .find(|m| m.id == id)
                            .map(|m| *m.endpoint.ip())
                    })
                    == Some(*from.ip());
                if !mate {
                    self.probe.observe(id, port);
                }
                if mate {
                } else if let Some(a) = self.arriving.iter_mut().find(|a| a.id == id) {
                    if let Some(p) = a.to_splitter {
                        a.step.observe(p, port);
                    }
                } else if let Some(m) = self.members.iter_mut().find(|m| m.id == id && !m.monitor) {
                    m.step.observe(m.endpoint.port(), port);
                }
            }
            ToSplitter::Incorporated { id, done: true } => {
                if let Some(i) = arriving(self, &id)
                    && self.arriving[i].list2_sent
                    && self.arriving[i].endpoint() == Some(from)
                {
                    self.echo(from, data);
                    let a = self.arriving.swap_remove(i);
                    self.members.push(Member {
                        id,
                        team: a.team,
                        endpoint: from,
                        monitor: false,
                        step: a.step,
                    });
                    self.counters.incorporated += 1;
                    self.actions
                        .push_back(NtsAction::Incorporate { id, endpoint: from });
                    self.forward_new_member(id);
                } else if self
                    .members
                    .iter()
                    .any(|m| m.id == id && m.endpoint == from)
                {
                    // A repeat whose echo was lost.
                    self.echo(from, data);
                } else {
                    self.counters.ignored += 1;
                }
            }
            ToSplitter::Incorporated { id, done: false } => match arriving(self, &id) {
                Some(i) => {
                    // Echoed in every case, so that the peer stops resending it.
                    self.echo(from, data);
                    self.on_retry(now, i, from);
                }
                None => self.counters.ignored += 1,
            },
        }
        true
    }

    /// `N` from `from` for the arriving peer `i` (already echoed): from a port it has not used
    /// towards the splitter yet, and within [`MAX_RETRIES`], a retry: the peer's ports are
    /// measured again (the splitter's now; the monitors' from their N-fwd), and list 2, U2m and
    /// U2 go again once all are known. The port step measured so far is kept, as the
    /// reference's `RetryToIncorporatePeer` does: the new socket is behind the same NAT.
    fn on_retry(&mut self, now: Instant, i: usize, from: Endpoint) {
        let a = &mut self.arriving[i];
        if a.to_splitter == Some(from.port()) {
            // A repeat whose echo was lost (or an `N` before any hello: nothing to retry).
            return;
        }
        if a.retries >= MAX_RETRIES {
            self.counters.retries_refused += 1;
            return;
        }
        a.retries += 1;
        a.to_splitter = Some(from.port());
        a.list2_sent = false;
        let early = std::mem::take(&mut a.retry_ports);
        for (m, p) in &mut a.to_monitors {
            *p = early.iter().find(|(e, _)| e == m).map(|&(_, port)| port);
        }
        let id = a.id;
        self.counters.retries += 1;
        // What teammates reported of the old socket says nothing of the new one.
        self.probe.renew(&id);
        self.heard.retain(|(r, h)| *r != id && *h != id);
        self.check_complete(now, i);
    }

    /// Once the splitter and every monitor have seen the arriving peer `i`: list 2 to it, U2m to
    /// the monitors, U2 to the other peers of its team.
    fn check_complete(&mut self, now: Instant, i: usize) {
        let a = &self.arriving[i];
        let Some(to_splitter) = a.to_splitter else {
            return;
        };
        if a.list2_sent || a.to_monitors.iter().any(|(_, p)| p.is_none()) {
            return;
        }
        let (id, team, ip) = (a.id, a.team, a.ip);
        let mut step = a.step;
        let mut min_port = to_splitter;
        for &(_, p) in &a.to_monitors {
            let p = p.unwrap_or(to_splitter);
            step.observe(to_splitter, p);
            min_port = min_port.min(p);
        }
        step.last_port = Some(to_splitter);
        let monitor_ports = a.to_monitors.clone();
        self.probe.observe(id, to_splitter);
        for &(_, p) in &monitor_ports {
            if let Some(p) = p {
                self.probe.observe(id, p);
            }
        }
        self.arriving[i].step = step;
        self.arriving[i].list2_sent = true;

        // List 2: the team's peers (not monitors) and the others being incorporated.
        let mut entries: Vec<List2Entry> = self
            .members
            .iter()
            .filter(|m| m.team == team && !m.monitor)
            .map(|m| List2Entry {
                id: m.id,
                // The last source port anyone saw it use (as the reference): behind a
                // sequential symmetric NAT the next mappings come after it.
                endpoint: Endpoint::new(
                    *m.endpoint.ip(),
                    m.step.last_port.unwrap_or(m.endpoint.port()),
                ),
                port_step: wire_step(&m.step),
            })
            .collect();
        entries.extend(
            self.arriving
                .iter()
                .filter(|o| o.team == team && o.id != id && o.list2_sent)
                .filter_map(|o| {
                    Some(List2Entry {
                        id: o.id,
                        endpoint: o.endpoint()?,
                        port_step: wire_step(&o.step),
                    })
                }),
        );
        // U2m: each monitor learns the endpoint the peer used towards it.
        for (m, p) in monitor_ports {
            let mut out = Vec::new();
            encode_new_peer_at_monitor(&id, Endpoint::new(ip, p.unwrap_or(to_splitter)), &mut out);
            self.repeat(now, m, out);
        }
        self.announce(
            now,
            team,
            id,
            Endpoint::new(ip, min_port),
            wire_step(&step),
            Some(id),
        );
        // EMS: NAT-mates by their private endpoints.
        super::nts_ems::rewrite_list2(&mut entries, ip, |i| self.privates.get(i).copied());
        for e in &entries {
            self.probe.pair(now, id, e.id);
        }
        // List 2 last: the teammates hear of the peer before its hellos reach them.
        let mut bytes = Vec::new();
        if encode_list2(&entries, &mut bytes).is_ok() {
            self.actions.push_back(NtsAction::List2 { id, bytes });
        }
    }

    /// U2 (members) and U2i (peers being incorporated) about the new peer `id`.
    fn announce(
        &mut self,
        now: Instant,
        team: TeamId,
        id: PeerId,
        endpoint: Endpoint,
        port_step: u16,
        skip: Option<PeerId>,
    ) {
        // Team order: monitors first.
        let team_members: Vec<&Member> = self
            .members
            .iter()
            .filter(|m| m.team == team && m.monitor)
            .chain(self.members.iter().filter(|m| m.team == team && !m.monitor))
            .collect();
        let mut sends = Vec::new();
        let mut u2x = 0;
        for (k, m) in team_members.iter().enumerate() {
            if m.monitor {
                continue;
            }
            // U2x to a member behind a NAT whose port step is not 0 (unknown included, as the
            // reference): it sends its ID to the extra port, which shows its NAT's current port.
            let extra_port = self.extra_port.filter(|_| m.step.step != 0);
            u2x += usize::from(extra_port.is_some());
            let mut np = NewPeer {
                id,
                endpoint,
                port_step,
                peer_number: u16::try_from(k + 1).unwrap_or(u16::MAX),
                extra_port,
            };
            super::nts_ems::rewrite_new_peer(
                &mut np,
                *m.endpoint.ip(),
                self.privates.get(&id).copied(),
            );
            let mut out = Vec::new();
            np.encode(&mut out);
            sends.push((m.endpoint, out));
        }
        let count = u16::try_from(team_members.len() + 1).unwrap_or(u16::MAX);
        for o in &self.arriving {
            if o.team != team || Some(o.id) == skip || !o.list2_sent {
                continue;
            }
            let Some(to) = o.endpoint() else { continue };
            let mut np = NewPeer {
                id,
                endpoint,
                port_step,
                peer_number: count,
                extra_port: None,
            };
            super::nts_ems::rewrite_new_peer(&mut np, o.ip, self.privates.get(&id).copied());
            let mut out = Vec::new();
            np.encode(&mut out);
            sends.push((to, out));
        }
        for (to, out) in sends {
            self.repeat(now, to, out);
        }
        if u2x > 0 {
            self.counters.u2x_sent += u2x as u64;
            self.actions.push_back(NtsAction::RenewExtraPort);
        }
    }

    /// Repeats due messages and gives up on arrivals older than
    /// [`MAX_TOTAL_INCORPORATION_TIME`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.repeats.retain_mut(|(at, left, to, data)| {
            if now < *at {
                return true;
            }
            due.push((*to, data.clone()));
            *left -= 1;
            *at = now + SPLITTER_REPEAT_EVERY;
            *left > 0
        });
        for (to, data) in due {
            self.actions.push_back(NtsAction::Send { to, data });
        }
        let mut gone = Vec::new();
        self.arriving.retain(|a| {
            let keep = now.saturating_duration_since(a.since) < MAX_TOTAL_INCORPORATION_TIME;
            if !keep {
                gone.push(a.id);
            }
            keep
        });
        for id in gone {
            self.privates.remove(&id);
            self.capable.remove(&id);
            self.counters.given_up += 1;
            self.probe.forget(&id);
            self.actions.push_back(NtsAction::GiveUp { id });
        }
        self.probe_timeout(now);
    }

    /// A forward request (`nts_forward`): taken only from the member holding `f.me`, at its
    /// endpoint, about a member of its team; echoed (the requester resends until it is).
    fn on_forward_request(
        &mut self,
        from: Endpoint,
        data: &[u8],
        f: super::nts_forward::ForwardRequest,
    ) {
        let me = self
            .members
            .iter()
            .find(|m| m.id == f.me && m.endpoint == from);
        let arriving = || {
            self.arriving
                .iter()
                .any(|a| a.id == f.me && a.endpoint() == Some(from))
        };
        if f.origin == f.me && (me.is_some() || arriving()) {
            // "I take forwarded chunks": a member, or an arriving peer at the endpoint it is
            // being incorporated at (it says so before its `Y`, so that its teammates' chunks
            // are forwarded to it from its first chunk on).
            self.echo(from, data);
            self.capable.insert(f.me);
            return;
        }
        let origin = me.and_then(|me| {
            self.members
                .iter()
                .find(|m| m.id == f.origin && m.team == me.team && m.id != me.id)
        });
        let (Some(_), Some(origin)) = (me, origin) else {
            if me.is_some() && self.arriving.iter().any(|a| a.id == f.origin) {
                // Still being incorporated: not echoed, so the requester asks again.
                return;
            }
            self.counters.forward_refused += 1;
            return;
        };
        let origin_endpoint = origin.endpoint;
        self.echo(from, data);
        let list = self.forwarding.entry(f.me).or_default();
        if list.contains(&f.origin) {
            return;
        }
        if list.len() >= super::nts_forward::MAX_PAIRS / 64 {
            self.counters.forward_refused += 1;
            return;
        }
        list.push(f.origin);
        self.counters.forward_requests += 1;
        self.actions.push_back(NtsAction::Forward {
            origin: origin_endpoint,
            to: from,
        });
    }

    /// A U4 from `from`: it heard `id`. Remembered, and forwarding of `id`'s chunks to it, if
    /// any, stops.
    fn on_heard(&mut self, from: Endpoint, id: PeerId) {
        let team_of =
            |s: &NtsSplitter, f: &dyn Fn(&Member) -> bool, g: &dyn Fn(&Arriving) -> bool| {
                s.members
                    .iter()
                    .find(|m| f(m))
                    .map(|m| (m.id, m.team))
                    .or_else(|| s.arriving.iter().find(|a| g(a)).map(|a| (a.id, a.team)))
            };
        let reporter = team_of(self, &|m| m.endpoint == from, &|a| {
            a.endpoint() == Some(from)
        });
        let reported = team_of(self, &|m| m.id == id, &|a| a.id == id);
        // Only facts about a teammate are kept: a member naming made-up IDs fills nothing.
        let (Some((reporter, team)), Some((_, t))) = (reporter, reported) else {
            return;
        };
        if t != team {
            return;
        }
        if self.heard.len() < MAX_HEARD {
            self.heard.insert((reporter, id));
        }
        if let Some(list) = self.forwarding.get_mut(&reporter)
            && let Some(i) = list.iter().position(|o| *o == id)
        {
            list.swap_remove(i);
            if list.is_empty() {
                self.forwarding.remove(&reporter);
            }
            if let Some(origin) = self.members.iter().find(|m| m.id == id) {
                self.actions.push_back(NtsAction::Unforward {
                    origin: origin.endpoint,
                    to: from,
                });
            }
        }
    }

    /// A new member `id`: its chunks are forwarded at once to every capable teammate that did
    /// not hear its hellos during its incorporation (until that teammate reports it); and, if
    /// it takes forwarded chunks itself (it said so before its `Y`), every teammate's chunks
    /// that it did not report (U4) are forwarded to it, from its first chunk on, until it
    /// does. (Waiting for its own forward requests, a round trip after the echo of its `Y`,
    /// lost the chunks sent to those teammates meanwhile: played by nobody else for it.)
    fn forward_new_member(&mut self, id: PeerId) {
        let Some(new) = self.members.iter().find(|m| m.id == id) else {
            return;
        };
        let (team, origin) = (new.team, new.endpoint);
        if self.capable.contains(&id) {
            let unheard: Vec<(PeerId, Endpoint)> = self
                .members
                .iter()
                .filter(|m| {
                    m.team == team && !m.monitor && m.id != id && !self.heard.contains(&(id, m.id))
                })
                .map(|m| (m.id, m.endpoint))
                .collect();
            for (from_id, from) in unheard {
                let list = self.forwarding.entry(id).or_default();
                if list.len() >= super::nts_forward::MAX_PAIRS / 64 {
                    self.counters.forward_refused += 1;
                    break;
                }
                if !list.contains(&from_id) {
                    list.push(from_id);
                    self.counters.forward_requests += 1;
                    self.actions.push_back(NtsAction::Forward {
                        origin: from,
                        to: origin,
                    });
                }
            }
        }
        let targets: Vec<(PeerId, Endpoint)> = self
            .members
            .iter()
            .filter(|m| {
                m.team == team
                    && !m.monitor
                    && m.id != id
                    && self.capable.contains(&m.id)
                    && !self.heard.contains(&(m.id, id))
            })
            .map(|m| (m.id, m.endpoint))
            .collect();
        for (to_id, to) in targets {
            let list = self.forwarding.entry(to_id).or_default();
            if !list.contains(&id) {
                list.push(id);
                self.counters.forward_requests += 1;
                self.actions.push_back(NtsAction::Forward { origin, to });
            }
        }
    }

    /// The members, as status pages show them: ID, endpoint, whether a monitor, the port step
    /// measured (`None`: not yet), and how many teammates' chunks it gets forwarded.
    pub fn member_views(&self) -> Vec<(PeerId, Endpoint, bool, Option<u16>, usize)> {
        self.members
            .iter()
            .map(|m| {
                (
                    m.id,
                    m.endpoint,
                    m.monitor,
                    (m.step.step != STEP_UNKNOWN).then_some(m.step.step),
                    self.forwarding.get(&m.id).map_or(0, Vec::len),
                )
            })
            .collect()
    }

    /// When [`NtsSplitter::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let r = self.repeats.iter().map(|r| r.0).min();
        let a = self
            .arriving
            .iter()
            .map(|a| a.since + MAX_TOTAL_INCORPORATION_TIME)
            .min();
        r.into_iter()
            .chain(a)
            .chain(self.probe.poll_timeout())
            .min()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<NtsAction> {
        self.actions.pop_front()
    }

    /// Counters.
    pub fn counters(&self) -> &NtsSplitterCounters {
        &self.counters
    }

    /// Peers being incorporated now.
    pub fn arriving_count(&self) -> usize {
        self.arriving.len()
    }

    /// The port step measured for the member at `endpoint` (`None`: not a member or not
    /// measured).
    pub fn port_step(&self, endpoint: Endpoint) -> Option<u16> {
        self.members
            .iter()
            .find(|m| m.endpoint == endpoint)
            .and_then(|m| (m.step.step != STEP_UNKNOWN).then_some(m.step.step))
    }

    /// Counters of port probing.
    pub fn probe_counters(&self) -> &super::nts_probe::ProbePlannerCounters {
        self.probe.counters()
    }

    /// The ID of the member or arriving peer at `endpoint`.
    fn id_at(&self, endpoint: Endpoint) -> Option<PeerId> {
        self.members
            .iter()
            .find(|m| m.endpoint == endpoint)
            .map(|m| m.id)
            .or_else(|| {
                self.arriving
                    .iter()
                    .find(|a| a.endpoint() == Some(endpoint))
                    .map(|a| a.id)
            })
    }

    /// What the splitter knows of the (non-monitor) member or arriving peer `id`.
    fn view(&self, id: PeerId) -> Option<PeerView> {
        if let Some(m) = self.members.iter().find(|m| m.id == id && !m.monitor) {
            return Some(PeerView {
                id,
                endpoint: m.endpoint,
                step: wire_step(&m.step),
                last_port: m.step.last_port.unwrap_or(m.endpoint.port()),
            });
        }
        let a = self.arriving.iter().find(|a| a.id == id)?;
        let endpoint = a.endpoint()?;
        Some(PeerView {
            id,
            endpoint,
            step: wire_step(&a.step),
            last_port: a.step.last_port.unwrap_or(endpoint.port()),
        })
    }

    /// A probing message: capable peers are noted; a query's port goes to the planner and is
    /// echoed. Only from the address of a peer that has that ID.
    fn on_probe(&mut self, now: Instant, from: Endpoint, m: ProbeToSplitter, data: &[u8]) {
        let id = match m {
            ProbeToSplitter::Capable(id) | ProbeToSplitter::Query { id, .. } => id,
        };
        let known = self
            .members
            .iter()
            .any(|x| x.id == id && x.endpoint.ip() == from.ip())
            || self
                .arriving
                .iter()
                .any(|a| a.id == id && a.ip == *from.ip());
        if !known {
            self.probe.ignore();
            return;
        }
        match m {
            ProbeToSplitter::Capable(id) => self.probe.capable(id),
            ProbeToSplitter::Query { id, session } => {
                let mut out = Vec::new();
                if self.probe.query(id, session, from, &mut out) {
                    self.echo(from, data);
                }
                for (to, d) in out {
                    self.repeat(now, to, d);
                }
            }
        }
    }

    /// Starts probing for the pairs whose grace is over.
    fn probe_timeout(&mut self, now: Instant) {
        self.probe.handle_timeout(now);
        for (a, b) in self.probe.due(now) {
            let (Some(va), Some(vb)) = (self.view(a), self.view(b)) else {
                continue;
            };
            for (to, d) in self.probe.start(now, va, vb) {
                self.repeat(now, to, d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::nts::testing::{ep, id};

    fn with(id: PeerId, tail: &[u8]) -> Vec<u8> {
        let mut v = id.as_bytes().to_vec();
        v.extend_from_slice(tail);
        v
    }

    fn actions(s: &mut NtsSplitter) -> Vec<NtsAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn sends_to(a: &[NtsAction], to: Endpoint) -> Vec<Vec<u8>> {
        a.iter()
            .filter_map(|x| match x {
                NtsAction::Send { to: t, data } if *t == to => Some(data.clone()),
                _ => None,
            })
            .collect()
    }

    const MONITOR: u8 = 2;

    /// A splitter with a monitor (198.18.0.2:5000) and member `A` (host 10) in team 0, whose
    /// port step is `a_step` (the monitor saw it `a_step` ports above its splitter port).
    fn team(a_step: u16) -> (NtsSplitter, Instant) {
        let t = Instant::now();
        let mut s = NtsSplitter::new(8);
        let m = ep(MONITOR, 5000);
        assert!(s.arrive(t, 0, id("MMMMMMM"), m, true));
        let a = id("AAAAAAA");
        assert!(s.arrive(t, 0, a, ep(10, 9), false));
        s.handle_datagram(t, ep(10, 20000), a.as_bytes());
        let mut u3 = Vec::new();
        ToSplitter::MonitorSaw {
            id: a,
            port: 20000 + a_step,
        }
        .encode(&mut u3);
        s.handle_datagram(t, m, &u3);
        s.handle_datagram(t, ep(10, 20000), &with(a, b"Y"));
        actions(&mut s);
        (s, t)
    }

    /// `B` (host 11) arrives and is measured at `port` by the splitter and the monitor; list 2
    /// goes to it.
    fn arrive_b(s: &mut NtsSplitter, t: Instant, port: u16) -> PeerId {
        let b = id("BBBBBBB");
        assert!(s.arrive(t, 0, b, ep(11, 9), false));
        s.handle_datagram(t, ep(11, port), b.as_bytes());
        let mut u3 = Vec::new();
        ToSplitter::MonitorSaw { id: b, port }.encode(&mut u3);
        s.handle_datagram(t, ep(MONITOR, 5000), &u3);
        let a = actions(s);
        assert!(a.iter().any(|x| matches!(x, NtsAction::List2 { .. })));
        b
    }

    fn n_fwd(b: PeerId, port: u16) -> Vec<u8> {
        let mut out = Vec::new();
        ToSplitter::MonitorSawRetry { id: b, port }.encode(&mut out);
        out
    }

    #[test]
    fn a_retry_is_measured_again_and_incorporated_at_the_new_endpoint() {
        let (mut s, t) = team(0);
        let b = arrive_b(&mut s, t, 30000);
        // N from a new port: echoed, and nothing more until the monitor saw it too.
        s.handle_datagram(t, ep(11, 40000), &with(b, b"N"));
        let a = actions(&mut s);
        assert_eq!(sends_to(&a, ep(11, 40000)), vec![with(b, b"N")]);
        assert!(!a.iter().any(|x| matches!(x, NtsAction::List2 { .. })));
        // A repeat from the same port is only echoed.
        s.handle_datagram(t, ep(11, 40000), &with(b, b"N"));
        assert_eq!(actions(&mut s).len(), 1);
        // The monitor's N-fwd: list 2 again, U2m and U2 with the new port.
        s.handle_datagram(t, ep(MONITOR, 5000), &n_fwd(b, 40000));
        let a = actions(&mut s);
        assert!(
            a.iter()
                .any(|x| matches!(x, NtsAction::List2 { id, .. } if *id == b))
        );
        let mut u2m = Vec::new();
        crate::proto::nts::encode_new_peer_at_monitor(&b, ep(11, 40000), &mut u2m);
        assert!(sends_to(&a, ep(MONITOR, 5000)).contains(&u2m), "{a:?}");
        let u2 = sends_to(&a, ep(10, 20000));
        assert_eq!(u2.len(), 1, "{a:?}");
        assert_eq!(u2[0].len(), 17, "A is behind a cone: plain U2");
        assert_eq!(&u2[0][11..13], &40000u16.to_be_bytes());
        assert_eq!(s.counters().retries, 1);
        // `Y` from the old socket does nothing; from the new one it makes B a member there.
        s.handle_datagram(t, ep(11, 30000), &with(b, b"Y"));
        assert!(actions(&mut s).is_empty());
        s.handle_datagram(t, ep(11, 40000), &with(b, b"Y"));
        let a = actions(&mut s);
        assert!(a.contains(&NtsAction::Incorporate {
            id: b,
            endpoint: ep(11, 40000)
        }));
        assert!(
            s.member_views()
                .iter()
                .any(|v| v.0 == b && v.1 == ep(11, 40000))
        );
    }

    fn fwd_req(me: PeerId, origin: PeerId) -> Vec<u8> {
        let mut out = Vec::new();
        crate::proto::nts_forward::ForwardRequest { me, origin }.encode(&mut out);
        out
    }

    #[test]
    fn a_joiner_that_takes_forwarded_chunks_gets_its_unheard_teammates_chunks_from_its_y() {
        let (mut s, t) = team(0);
        let a = id("AAAAAAA");
        let c = id("CCCCCCC");
        // C (host 12) is a member too; B will hear A but not C.
        assert!(s.arrive(t, 0, c, ep(12, 9), false));
        s.handle_datagram(t, ep(12, 21000), c.as_bytes());
        let mut u3 = Vec::new();
        ToSplitter::MonitorSaw { id: c, port: 21000 }.encode(&mut u3);
        s.handle_datagram(t, ep(MONITOR, 5000), &u3);
        s.handle_datagram(t, ep(12, 21000), &with(c, b"Y"));
        actions(&mut s);
        let b = arrive_b(&mut s, t, 30000);
        // "I take forwarded chunks" before its Y: from a stranger's endpoint refused, from the
        // endpoint it is arriving at echoed.
        let cap = fwd_req(b, b);
        s.handle_datagram(t, ep(11, 30001), &cap);
        assert!(actions(&mut s).is_empty());
        s.handle_datagram(t, ep(11, 30000), &cap);
        assert_eq!(sends_to(&actions(&mut s), ep(11, 30000)), vec![cap]);
        // Its U4 about A, then its Y.
        let mut u4 = Vec::new();
        ToSplitter::PortReport { id: a, port: 20000 }.encode(&mut u4);
        s.handle_datagram(t, ep(11, 30000), &u4);
        actions(&mut s);
        s.handle_datagram(t, ep(11, 30000), &with(b, b"Y"));
        let x = actions(&mut s);
        let to_b: Vec<Endpoint> = x
            .iter()
            .filter_map(|y| match y {
                NtsAction::Forward { origin, to } if *to == ep(11, 30000) => Some(*origin),
                _ => None,
            })
            .collect();
        assert_eq!(to_b, vec![ep(12, 21000)], "C's chunks only: {x:?}");
        assert_eq!(s.member_views().iter().find(|v| v.0 == b).unwrap().4, 1);
        // B hears C later: its U4 stops the forwarding.
        let mut u4 = Vec::new();
        ToSplitter::PortReport { id: c, port: 21000 }.encode(&mut u4);
        s.handle_datagram(t, ep(11, 30000), &u4);
        assert!(actions(&mut s).contains(&NtsAction::Unforward {
            origin: ep(12, 21000),
            to: ep(11, 30000)
        }));
    }

    #[test]
    fn a_joiner_that_never_said_it_takes_forwarded_chunks_gets_none() {
        let (mut s, t) = team(0);
        let b = arrive_b(&mut s, t, 30000);
        s.handle_datagram(t, ep(11, 30000), &with(b, b"Y"));
        let x = actions(&mut s);
        assert!(
            !x.iter()
                .any(|y| matches!(y, NtsAction::Forward { to, .. } if *to == ep(11, 30000))),
            "{x:?}"
        );
    }

    #[test]
    fn a_monitors_report_of_a_retry_may_come_before_the_retry() {
        let (mut s, t) = team(0);
        let b = arrive_b(&mut s, t, 30000);
        // A repeat of the first attempt's port is not taken for a retry's.
        s.handle_datagram(t, ep(MONITOR, 5000), &n_fwd(b, 30000));
        s.handle_datagram(t, ep(MONITOR, 5000), &n_fwd(b, 40001));
        actions(&mut s);
        s.handle_datagram(t, ep(11, 40000), &with(b, b"N"));
        let a = actions(&mut s);
        let mut u2m = Vec::new();
        crate::proto::nts::encode_new_peer_at_monitor(&b, ep(11, 40001), &mut u2m);
        assert!(
            a.iter().any(|x| matches!(x, NtsAction::List2 { .. })),
            "{a:?}"
        );
        assert!(sends_to(&a, ep(MONITOR, 5000)).contains(&u2m));
    }

    #[test]
    fn retries_from_strangers_for_members_or_beyond_the_bound_change_nothing() {
        let (mut s, t) = team(0);
        let b = arrive_b(&mut s, t, 30000);
        let members = s.member_views();
        // N for a member's ID, from its own address or another: ignored, not echoed.
        for from in [ep(10, 20000), ep(10, 20001), ep(99, 1)] {
            s.handle_datagram(t, from, &with(id("AAAAAAA"), b"N"));
        }
        // N for the arriving peer from another address: ignored, not echoed.
        s.handle_datagram(t, ep(12, 40000), &with(b, b"N"));
        // N-fwd from a non-monitor: not NTS from there (the DBS rules count it malformed).
        assert!(!s.handle_datagram(t, ep(99, 1), &n_fwd(b, 1)));
        assert!(actions(&mut s).is_empty());
        assert_eq!(s.counters().ignored, 4);
        // A flood of N from new ports at the right address: at most MAX_RETRIES taken.
        for k in 0..1000u16 {
            s.handle_datagram(t, ep(11, 41000 + k), &with(b, b"N"));
        }
        actions(&mut s);
        assert_eq!(s.counters().retries, u64::from(MAX_RETRIES));
        assert_eq!(s.counters().retries_refused, 1000 - u64::from(MAX_RETRIES));
        assert_eq!(s.member_views(), members);
        assert_eq!(s.arriving_count(), 1);
    }

    #[test]
    fn u2x_goes_to_members_with_a_port_step_and_the_extra_port_samples_it() {
        let (mut s, t) = team(2);
        let a = id("AAAAAAA");
        s.set_extra_port(9000);
        assert_eq!(s.port_step(ep(10, 20000)), Some(2));
        arrive_b(&mut s, t, 30000);
        // arrive_b drained the actions: look at the counters and the renewal it asked for.
        assert_eq!(s.counters().u2x_sent, 1);
        let c = id("CCCCCCC");
        assert!(s.arrive(t, 0, c, ep(13, 9), false));
        s.handle_datagram(t, ep(13, 100), c.as_bytes());
        let mut u3 = Vec::new();
        ToSplitter::MonitorSaw { id: c, port: 100 }.encode(&mut u3);
        s.handle_datagram(t, ep(MONITOR, 5000), &u3);
        s.set_extra_port(9001);
        let acts = actions(&mut s);
        let u2 = sends_to(&acts, ep(10, 20000));
        assert_eq!(u2.len(), 1);
        assert_eq!(u2[0].len(), 19, "U2x to A (step 2)");
        assert_eq!(&u2[0][17..19], &9000u16.to_be_bytes());
        assert!(acts.contains(&NtsAction::RenewExtraPort));
        // B (not a member yet) gets a U2i without the extra port.
        assert!(sends_to(&acts, ep(11, 30000)).iter().all(|d| d.len() == 17));
        // A's ID at the extra port, from a new mapping: echoed from that socket, and a sample.
        s.handle_extra_datagram(9000, ep(10, 20010), a.as_bytes());
        assert_eq!(
            actions(&mut s),
            vec![NtsAction::SendFromExtra {
                port: 9000,
                to: ep(10, 20010),
                data: a.as_bytes().to_vec()
            }]
        );
        assert_eq!(s.port_step(ep(10, 20000)), Some(2), "gcd(2, 10)");
        s.handle_extra_datagram(9001, ep(10, 20013), a.as_bytes());
        assert_eq!(s.port_step(ep(10, 20000)), Some(1), "gcd(2, 13)");
        assert_eq!(s.counters().extra_seen, 2);
        assert_eq!(
            actions(&mut s).len(),
            1,
            "the echo, from the other extra socket"
        );
        // Strangers, other addresses, unknown IDs, other lengths: counted, not answered.
        s.handle_extra_datagram(9000, ep(99, 1), a.as_bytes());
        s.handle_extra_datagram(9000, ep(10, 1), id("ZZZZZZZ").as_bytes());
        s.handle_extra_datagram(9000, ep(10, 1), &with(a, b"Y"));
        s.handle_extra_datagram(9000, ep(10, 1), b"aaaaaaa");
        s.handle_extra_datagram(9000, ep(MONITOR, 5000), id("MMMMMMM").as_bytes());
        assert!(actions(&mut s).is_empty());
        assert_eq!(s.counters().extra_ignored, 5);
        assert_eq!(s.port_step(ep(10, 20000)), Some(1));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever retries, N-fwds and extra-port datagrams come, from whomever: the
            /// members stay who and where they are, retries stay within the bound, and the
            /// splitter answers no stranger.
            #[test]
            fn retries_and_extra_port_datagrams_never_touch_members(
                ops in proptest::collection::vec((0u8..4, 0u8..4, any::<bool>(), any::<u16>()), 0..200)
            ) {
                let (mut s, t) = team(3);
                s.set_extra_port(9000);
                let b = arrive_b(&mut s, t, 30000);
                let members: Vec<(PeerId, Endpoint)> =
                    s.member_views().iter().map(|v| (v.0, v.1)).collect();
                for (kind, who, right_ip, port) in ops {
                    let pid = match who {
                        0 => id("AAAAAAA"),
                        1 => b,
                        2 => id("MMMMMMM"),
                        _ => PeerId::from_random(u64::from(port)),
                    };
                    let host = match (who, right_ip) {
                        (_, false) => 99,
                        (0, true) => 10,
                        (2, true) => MONITOR,
                        _ => 11,
                    };
                    let from = ep(host, port);
                    match kind {
                        0 => { s.handle_datagram(t, from, &with(pid, b"N")); }
                        1 => { s.handle_datagram(t, ep(MONITOR, 5000), &n_fwd(pid, port)); }
                        2 => s.handle_extra_datagram(9000, from, pid.as_bytes()),
                        _ => s.handle_extra_datagram(9000, from, &with(pid, &port.to_be_bytes())),
                    }
                    for a in actions(&mut s) {
                        match a {
                            NtsAction::Send { to, .. } | NtsAction::SendFromExtra { to, .. } => {
                                prop_assert!(to.ip() != &Ipv4Addr::new(198, 18, 0, 99), "answered a stranger");
                            }
                            NtsAction::Incorporate { .. } | NtsAction::GiveUp { .. }
                            | NtsAction::Forward { .. } | NtsAction::Unforward { .. } => {
                                prop_assert!(false, "{a:?}");
                            }
                            NtsAction::List2 { id, .. } => prop_assert_eq!(id, b),
                            NtsAction::RenewExtraPort => {}
                        }
                    }
                }
                let now: Vec<(PeerId, Endpoint)> =
                    s.member_views().iter().map(|v| (v.0, v.1)).collect();
                prop_assert_eq!(now, members);
                prop_assert!(s.counters().retries <= u64::from(MAX_RETRIES));
                prop_assert_eq!(s.arriving_count(), 1);
            }
        }
    }
}
