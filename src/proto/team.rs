//! DBS at the splitter: teams, round robin, goodbyes at round boundaries, loss counters
//! (reference-notes §5.1, §5.4, §5.6).
//!
//! [`Teams`] is the set of teams one splitter shard owns. For every chunk it names one destination
//! per team ([`Teams::on_chunk`]); datagrams from peers go through [`Teams::handle_datagram`];
//! goodbye confirmations come out of [`Teams::poll_transmit`] and membership changes out of
//! [`Teams::poll_event`]. Time only enters through [`Teams::handle_timeout`].
//!
//! Recovery rules (`docs/recovery.md`): LRS resends reported chunks ([`Teams::poll_resend`]); ACS
//! sends fewer chunks to peers whose chunks get lost. A chunk's origin is blamed once however
//! often the chunk is reported, and every member has a budget of resends, halved with the loss
//! counters, so neither a lossy monitor nor a forged report can make the splitter send more than
//! a bounded number of datagrams.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::Endpoint;
use super::wire::{GOODBYE, ToSplitter};

/// Identifies a team within one splitter.
pub type TeamId = u32;

/// The splitter-side DBS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TeamRules {
    /// Buffer size B in chunks (a power of two): how many chunk destinations are remembered for
    /// blaming losses.
    pub buffer_size: u16,
    /// When a peer is expelled for the losses of its chunks ([`Expulsion`]).
    pub expulsion: Expulsion,
    /// How often every loss counter is halved (reference: 1 s).
    pub loss_halving: Duration,
    /// LRS (reference-notes §6.2): resend a reported chunk to the monitor that reported it, which
    /// relays it like any chunk from the splitter. A plain peer's loss report is then a request for
    /// itself: the chunk is resent to it alone, and nobody is blamed.
    pub lrs: bool,
    /// Most resends per member per `loss_halving` period (its counter is halved with the loss
    /// counters); reports beyond are counted in [`TeamCounters::resends_refused`].
    pub max_resends: u32,
    /// ACS (reference-notes §6.3): a peer blamed for a loss gets its next chunks less often (its
    /// period grows by one per blamed loss, at most [`ACS_MAX_PERIOD`], and shrinks by one every
    /// `loss_halving`).
    pub acs: bool,
    /// CIS (`docs/integrity.md`): act on complaints about polluters (a signed team). Off, a
    /// complaint counts as a malformed datagram.
    pub complaints: bool,
}

/// Largest ACS period: a peer blamed for many losses still gets one chunk every this many rounds.
pub const ACS_MAX_PERIOD: u32 = 16;

/// The expulsion rule: a peer is removed when too large a fraction of its own chunks is reported
/// lost (`docs/recovery.md`, "Expulsion").
///
/// The reference's rule (reference-notes §5.4: a counter halved every second, expel over 32)
/// depends on the peer's share of the stream: a peer that gets s chunks a second settles at 2·s
/// blamed losses if it relays nothing, so a dead peer with a share of 16 chunks/s or less is never
/// expelled, while an honest peer with 0.2 % loss at 8,000 chunks/s is. This rule judges the
/// fraction instead, in two windows that must both agree:
///
/// - **By count**: of the peer's last [`EXPULSION_WINDOW`] chunks whose fate is known, at least
///   `min_lost` were lost and at least `fraction` of them. This is what catches a peer with a
///   small share (one chunk every two seconds) within a few of its chunks.
/// - **By time**: of the peer's chunks whose fate became known over the last seconds (counts
///   halved every `loss_halving`), at least `fraction` were lost. This keeps a burst of a few
///   dozen consecutive losses at a high share (a socket buffer overflowing for a few
///   milliseconds at 8,000 chunks/s) from looking like a dead peer.
///
/// A chunk's fate is known when a monitor reports it or a later chunk of the same peer lost:
/// monitors report missing chunks in order, so every chunk given to the peer before a reported
/// one has arrived. Reports from reference monitors, which report at playout, feed it as they
/// are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expulsion {
    /// Fewest lost chunks in the count window before a peer can be expelled.
    pub min_lost: u32,
    /// Fraction of its chunks lost (in both windows) at which a peer is expelled.
    pub fraction: f32,
}

impl Eq for Expulsion {}

/// How many of a peer's most recent judged chunks the count window holds.
pub const EXPULSION_WINDOW: u32 = 16;

impl Default for Expulsion {
    fn default() -> Self {
        Expulsion {
            min_lost: 2,
            fraction: 0.5,
        }
    }
}

/// What the splitter knows of the fate of one member's chunks.
#[derive(Debug, Clone, Copy, Default)]
struct Fate {
    /// Chunks given to the member so far (wrapping ordinal; a chunk's destination records it).
    given: u32,
    /// Ordinal of the latest chunk whose fate is known.
    judged: u32,
    /// Outcomes of the last judged chunks, newest in bit 0 (1: lost).
    window: u32,
    /// How many bits of `window` are outcomes (at most [`EXPULSION_WINDOW`]).
    window_len: u32,
    /// Chunks given, halved every `loss_halving`: about two periods' worth of its share.
    recent_given: f32,
    /// Judged chunks, halved every `loss_halving`.
    recent_judged: f32,
    /// Lost chunks among them, halved with them.
    recent_lost: f32,
}

impl Fate {
    /// Chunk with ordinal `ordinal` was reported lost (for the first time).
    fn lost(&mut self, ordinal: u32) {
        let newly = ordinal.wrapping_sub(self.judged);
        if newly > 0 && newly < u32::MAX / 2 {
            // Every chunk given between the last judged one and this one arrived.
            self.window = if newly >= 32 { 0 } else { self.window << newly } | 1;
            self.window_len = (self.window_len + newly).min(EXPULSION_WINDOW);
            // The chunks judged now arrived over the time since the last report, which may be
            // minutes: the time window credits at most its recent share, or a peer that dies
            // after a long clean run would need as long again to be judged dead.
            self.recent_judged += (newly as f32).min(self.recent_given.max(1.0));
            self.recent_lost += 1.0;
            self.judged = ordinal;
        } else {
            // An older chunk reported late (a second monitor, a retry out of order): it was
            // counted as arrived; count it as lost instead.
            let back = self.judged.wrapping_sub(ordinal);
            if back < self.window_len && self.window & (1 << back) == 0 {
                self.window |= 1 << back;
                self.recent_lost += 1.0;
            }
        }
        self.window &= window_mask();
    }

    fn lost_in_window(&self) -> u32 {
        // `lost` keeps the window masked to its length.
        self.window.count_ones()
    }

    fn should_expel(&self, rule: &Expulsion) -> bool {
        let lost = self.lost_in_window();
        lost >= rule.min_lost.max(1)
            && lost as f32 >= rule.fraction * self.window_len as f32
            && self.recent_lost >= rule.fraction * self.recent_judged
    }

    fn halve(&mut self) {
        self.recent_given /= 2.0;
        self.recent_judged /= 2.0;
        self.recent_lost /= 2.0;
    }
}

fn window_mask() -> u32 {
    (1u32 << EXPULSION_WINDOW) - 1
}

impl Default for TeamRules {
    fn default() -> Self {
        TeamRules {
            buffer_size: 256,
            expulsion: Expulsion::default(),
            loss_halving: Duration::from_secs(1),
            lrs: false,
            max_resends: 512,
            acs: false,
            complaints: false,
        }
    }
}

/// A change in team membership the shard reports to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeamEvent {
    /// The peer said goodbye and was removed at the round boundary (and told so).
    Left {
        /// Who.
        peer: Endpoint,
        /// From which team.
        team: TeamId,
    },
    /// Too many of the peer's chunks were reported lost ([`Expulsion`]); it was removed without
    /// a message.
    Expelled {
        /// Who.
        peer: Endpoint,
        /// From which team.
        team: TeamId,
        /// Its lost chunks among the last judged ones at removal.
        losses: u32,
        /// How many of its chunks were judged (the count window).
        judged: u32,
    },
    /// CIS: teammates complained that it sent chunks with bad signatures; it was removed
    /// without a message.
    Polluter {
        /// Who.
        peer: Endpoint,
        /// From which team.
        team: TeamId,
        /// Distinct teammates that complained.
        accusers: u32,
        /// Whether a monitor or `--trusted` peer complained (then one complaint is enough).
        trusted: bool,
    },
}

/// What the splitter counted of CIS complaints ([`Teams::cis_counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CisCounters {
    /// Complaints from members about teammates.
    pub complaints: u64,
    /// Complaints ignored: from non-members, about non-members, monitors or other teams' peers,
    /// or about themselves.
    pub stray_complaints: u64,
    /// Peers expelled as polluters.
    pub polluters_expelled: u64,
    /// Digest mode: digest requests granted.
    pub digest_requests: u64,
    /// Digest mode: digest requests refused (the member's budget was used up).
    pub digest_requests_refused: u64,
}

/// What the splitter-side protocol counted. Nothing a peer sends is dropped without a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamCounters {
    /// Goodbyes from members.
    pub goodbyes: u64,
    /// Goodbyes from endpoints that are not members (ignored).
    pub stray_goodbyes: u64,
    /// Goodbyes from peers that left recently, confirmed again (the first confirmation may have
    /// been lost).
    pub repeated_goodbyes: u64,
    /// Loss reports from monitors.
    pub loss_reports: u64,
    /// Loss reports from endpoints that are not monitors of any team here (ignored).
    pub stray_loss_reports: u64,
    /// Loss reports for a chunk whose destination is no longer remembered.
    pub unattributed_loss_reports: u64,
    /// Loss reports from monitors for a chunk already blamed (a retry, or another monitor).
    pub repeated_loss_reports: u64,
    /// Under LRS: loss reports from plain peers, asking for a chunk for themselves.
    pub loss_requests: u64,
    /// Resends queued (LRS).
    pub resends: u64,
    /// Resends refused because the member had used up its budget.
    pub resends_refused: u64,
    /// Datagrams that are neither a goodbye nor a loss report.
    pub malformed: u64,
    /// Peers removed after their goodbye.
    pub left: u64,
    /// Peers removed for losses.
    pub expelled: u64,
}

/// A team member as status pages and tests see it ([`Teams::members`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TeamMember {
    /// Its UDP endpoint.
    pub endpoint: Endpoint,
    /// Whether it is a monitor.
    pub monitor: bool,
    /// Its loss counter: chunks sent to it that monitors reported lost, halved every
    /// [`TeamRules::loss_halving`]. A plain peer over [`TeamRules::max_losses`] is expelled.
    pub losses: u32,
}

#[derive(Debug, Clone)]
struct Member {
    endpoint: Endpoint,
    monitor: bool,
    leaving: bool,
    losses: u32,
    /// The fate of its chunks, for the expulsion rule.
    fate: Fate,
    /// Resends to it in the current halving period.
    resends: u32,
    /// ACS: it gets one chunk every `period` passes of the round robin.
    period: u32,
    /// ACS: passes left to skip before its next chunk.
    skip: u32,
    /// CIS: teammates that complained about it (distinct).
    accusers: Vec<Endpoint>,
}

/// Who got chunk `number`, and whether a loss of it was blamed already.
#[derive(Debug, Clone, Copy)]
struct Destination {
    number: u16,
    endpoint: Endpoint,
    /// The destination's ordinal for this chunk ([`Fate::given`]).
    ordinal: u32,
    blamed: bool,
}

/// One DBS team: its members in round-robin order (monitors first) and who got which chunk.
#[derive(Debug, Clone)]
struct Team {
    id: TeamId,
    members: Vec<Member>,
    /// Index of the member that gets the next chunk (the reference's `peer_number`).
    next: usize,
    /// Destination of chunk `n` at `n % B`, with `n` to tell stale entries apart.
    destinations: Vec<Option<Destination>>,
    leaving: usize,
    /// Peers inserted since the last chunk was scheduled (they are served next, in order).
    fresh: usize,
}

impl Team {
    fn new(id: TeamId, buffer_size: u16) -> Team {
        Team {
            id,
            members: Vec::new(),
            next: 0,
            destinations: vec![None; usize::from(buffer_size).max(1)],
            leaving: 0,
            fresh: 0,
        }
    }

    fn position(&self, ep: Endpoint) -> Option<usize> {
        self.members.iter().position(|m| m.endpoint == ep)
    }

    fn monitors(&self) -> usize {
        self.members.iter().take_while(|m| m.monitor).count()
    }

    fn insert(&mut self, endpoint: Endpoint, monitor: bool) {
        // Monitors stay in front, as in the reference where they are the first to join. Everyone
        // else goes where the round robin is now and so gets the very next chunk: its playout
        // starts with its first chunk from the splitter, and the splitter learns a round sooner
        // whether it relays (a dead newcomer on a slow stream is judged a round earlier).
        // Newcomers since the last chunk queue up in the order they came.
        let at = if monitor {
            self.monitors()
        } else {
            (self.next.max(self.monitors()) + self.fresh).min(self.members.len())
        };
        if monitor && at < self.members.len() && at <= self.next {
            self.next += 1;
        }
        if !monitor {
            self.fresh += 1;
        }
        self.members.insert(
            at,
            Member {
                endpoint,
                monitor,
                leaving: false,
                losses: 0,
                fate: Fate::default(),
                resends: 0,
                period: 1,
                skip: 0,
                accusers: Vec::new(),
            },
        );
    }

    fn remove_at(&mut self, i: usize) -> Member {
        let m = self.members.remove(i);
        if m.leaving {
            self.leaving -= 1;
        }
        if i < self.next {
            self.next -= 1;
        }
        if self.next >= self.members.len() {
            self.next = 0;
        }
        m
    }

    /// Picks the destination of chunk `n` and advances the round robin. At the round boundary the
    /// members that said goodbye are removed and told so. Under ACS a member with a period over 1
    /// is passed over until its skip count runs out.
    fn schedule(
        &mut self,
        n: u16,
        acs: bool,
        goodbyes: &mut VecDeque<(Endpoint, &'static [u8])>,
        events: &mut VecDeque<TeamEvent>,
        counters: &mut TeamCounters,
    ) -> Option<Endpoint> {
        if acs {
            // Every pass lowers each skip count by one, so this ends within ACS_MAX_PERIOD passes;
            // the bound is only a guard.
            let mut guard = self.members.len() * ACS_MAX_PERIOD as usize + 1;
            while !self.members.is_empty() && self.members[self.next].skip > 0 && guard > 0 {
                self.members[self.next].skip -= 1;
                self.advance(goodbyes, events, counters);
                guard -= 1;
            }
        }
        self.fresh = 0;
        if self.members.is_empty() {
            return None;
        }
        let m = &mut self.members[self.next];
        let dest = m.endpoint;
        if acs {
            m.skip = m.period - 1;
        }
        m.fate.given = m.fate.given.wrapping_add(1);
        m.fate.recent_given += 1.0;
        let ordinal = m.fate.given;
        let slot = usize::from(n) % self.destinations.len();
        self.destinations[slot] = Some(Destination {
            number: n,
            endpoint: dest,
            ordinal,
            blamed: false,
        });
        self.advance(goodbyes, events, counters);
        Some(dest)
    }

    fn advance(
        &mut self,
        goodbyes: &mut VecDeque<(Endpoint, &'static [u8])>,
        events: &mut VecDeque<TeamEvent>,
        counters: &mut TeamCounters,
    ) {
        self.next += 1;
        if self.next >= self.members.len() {
            self.next = 0;
            if self.leaving > 0 {
                let id = self.id;
                let mut i = 0;
                while i < self.members.len() {
                    if self.members[i].leaving {
                        let m = self.remove_at(i);
                        goodbyes.push_back((m.endpoint, GOODBYE));
                        events.push_back(TeamEvent::Left {
                            peer: m.endpoint,
                            team: id,
                        });
                        counters.left += 1;
                    } else {
                        i += 1;
                    }
                }
            }
        }
    }
}

/// The teams one splitter shard owns.
#[derive(Debug)]
pub struct Teams {
    rules: TeamRules,
    /// By id: a join, a report or a goodbye finds its team without a scan (100,000 teams of
    /// one at team size 1).
    teams: BTreeMap<TeamId, Team>,
    members: HashMap<Endpoint, TeamId>,
    counters: TeamCounters,
    goodbyes: VecDeque<(Endpoint, &'static [u8])>,
    resends: VecDeque<(u16, Endpoint)>,
    digest_requests: VecDeque<(u16, Endpoint)>,
    events: VecDeque<TeamEvent>,
    next_halving: Option<Instant>,
    /// The last peers that left after a goodbye, oldest first, to confirm a repeated goodbye.
    recently_left: VecDeque<Endpoint>,
    recently_left_set: HashSet<Endpoint>,
    /// CIS: peers whose complaints expel at once (besides monitors).
    trusted: HashSet<Endpoint>,
    cis: CisCounters,
}

/// How many peers that left are remembered to confirm their goodbye again.
const RECENTLY_LEFT: usize = 1024;

impl Teams {
    /// No teams yet.
    pub fn new(rules: TeamRules) -> Teams {
        Teams {
            rules,
            teams: BTreeMap::new(),
            members: HashMap::new(),
            counters: TeamCounters::default(),
            goodbyes: VecDeque::new(),
            resends: VecDeque::new(),
            digest_requests: VecDeque::new(),
            events: VecDeque::new(),
            next_halving: None,
            recently_left: VecDeque::new(),
            recently_left_set: HashSet::new(),
            trusted: HashSet::new(),
            cis: CisCounters::default(),
        }
    }

    /// CIS: peers (`--trusted`) whose complaints expel at once, as monitors' do.
    pub fn set_trusted(&mut self, trusted: impl IntoIterator<Item = Endpoint>) {
        self.trusted = trusted.into_iter().collect();
    }

    /// What was counted of CIS complaints.
    pub fn cis_counters(&self) -> &CisCounters {
        &self.cis
    }

    /// The rules in force.
    pub fn rules(&self) -> &TeamRules {
        &self.rules
    }

    fn team_mut(&mut self, id: TeamId) -> Option<&mut Team> {
        self.teams.get_mut(&id)
    }

    /// Adds `peer` to `team` (created if needed). A peer that is already a member somewhere is
    /// moved, as the reference does when an endpoint joins twice.
    pub fn insert(&mut self, team: TeamId, peer: Endpoint, monitor: bool) {
        self.remove(peer);
        if self.recently_left_set.remove(&peer) {
            self.recently_left.retain(|&p| p != peer);
        }
        let buffer_size = self.rules.buffer_size;
        let t = self
            .teams
            .entry(team)
            .or_insert_with(|| Team::new(team, buffer_size));
        t.insert(peer, monitor);
        self.members.insert(peer, team);
    }

    /// Removes `peer` at once (no message); returns its team if it was a member.
    pub fn remove(&mut self, peer: Endpoint) -> Option<TeamId> {
        let id = self.members.remove(&peer)?;
        let t = self.team_mut(id).expect("member index points at a team");
        if let Some(i) = t.position(peer) {
            t.remove_at(i);
        }
        self.drop_if_empty(id);
        Some(id)
    }

    fn drop_if_empty(&mut self, id: TeamId) {
        if self.teams.get(&id).is_some_and(|t| t.members.is_empty()) {
            self.teams.remove(&id);
        }
    }

    /// Names one destination per team for chunk `n`, appending them to `dests`.
    pub fn on_chunk(&mut self, n: u16, dests: &mut Vec<Endpoint>) {
        let queued = self.goodbyes.len();
        let mut shrunk = Vec::new();
        for t in self.teams.values_mut() {
            let before = t.members.len();
            if let Some(d) = t.schedule(
                n,
                self.rules.acs,
                &mut self.goodbyes,
                &mut self.events,
                &mut self.counters,
            ) {
                dests.push(d);
            }
            if t.members.len() != before {
                shrunk.push(t.id);
            }
        }
        if !shrunk.is_empty() {
            let left: Vec<Endpoint> = self.goodbyes.range(queued..).map(|g| g.0).collect();
            for ep in left {
                self.members.remove(&ep);
                if self.recently_left_set.insert(ep) {
                    self.recently_left.push_back(ep);
                    if self.recently_left.len() > RECENTLY_LEFT
                        && let Some(old) = self.recently_left.pop_front()
                    {
                        self.recently_left_set.remove(&old);
                    }
                }
            }
            for id in shrunk {
                self.drop_if_empty(id);
            }
        }
    }

    /// Handles a datagram a peer sent to the splitter.
    pub fn handle_datagram(&mut self, from: Endpoint, data: &[u8]) {
        match ToSplitter::parse(data) {
            ToSplitter::Goodbye => self.on_goodbye(from),
            ToSplitter::LossReport(n) => self.on_loss_report(from, n),
            ToSplitter::Complaint { accused, .. } => self.on_complaint(from, accused),
            ToSplitter::DigestRequest(n) => self.on_digest_request(from, n),
            ToSplitter::Malformed => self.counters.malformed += 1,
        }
    }

    /// CIS digest mode: a member asks for the digest of chunk `n`. Granted within the member's
    /// resend budget (shared with LRS), in signed teams only.
    fn on_digest_request(&mut self, from: Endpoint, n: u16) {
        let max = self.rules.max_resends;
        if !self.rules.complaints {
            self.counters.malformed += 1;
            return;
        }
        let Some(&id) = self.members.get(&from) else {
            self.cis.stray_complaints += 1;
            return;
        };
        let t = self
            .teams
            .get_mut(&id)
            .expect("member index points at a team");
        let Some(i) = t.position(from) else {
            return;
        };
        let m = &mut t.members[i];
        if m.resends < max {
            m.resends += 1;
            self.cis.digest_requests += 1;
            self.digest_requests.push_back((n, from));
        } else {
            self.cis.digest_requests_refused += 1;
        }
    }

    /// CIS digest mode: the next digest to send: the chunk number it covers and who asked.
    pub fn poll_digest_request(&mut self) -> Option<(u16, Endpoint)> {
        self.digest_requests.pop_front()
    }

    /// CIS: `from` says `accused` sent it a chunk with a bad signature. A monitor's or trusted
    /// peer's word expels at once (STrPe); otherwise the accused goes when more than half of its
    /// teammates complained (STrPe-DS), so a bad-mouthing minority cannot expel anyone.
    fn on_complaint(&mut self, from: Endpoint, accused: Endpoint) {
        if !self.rules.complaints {
            self.counters.malformed += 1;
            return;
        }
        let (Some(&id), Some(&accused_team)) =
            (self.members.get(&from), self.members.get(&accused))
        else {
            self.cis.stray_complaints += 1;
            return;
        };
        let trusted_peer = self.trusted.contains(&from);
        let t = self
            .teams
            .get_mut(&id)
            .expect("member index points at a team");
        let (Some(by), Some(i)) = (t.position(from), t.position(accused)) else {
            return;
        };
        if accused_team != id || from == accused || t.members[i].monitor {
            self.cis.stray_complaints += 1;
            return;
        }
        self.cis.complaints += 1;
        let trusted = trusted_peer || t.members[by].monitor;
        let accused_member = &mut t.members[i];
        if !accused_member.accusers.contains(&from) {
            accused_member.accusers.push(from);
        }
        // Only complainers that are still members count, against the teammates there are now.
        let accusers = accused_member.accusers.clone();
        let standing = accusers
            .iter()
            .filter(|a| t.members.iter().any(|m| m.endpoint == **a))
            .count();
        let teammates = t.members.len() - 1;
        if trusted || 2 * standing > teammates {
            t.remove_at(i);
            self.members.remove(&accused);
            self.cis.polluters_expelled += 1;
            self.events.push_back(TeamEvent::Polluter {
                peer: accused,
                team: id,
                accusers: standing as u32,
                trusted,
            });
            self.drop_if_empty(id);
        }
    }

    fn on_goodbye(&mut self, from: Endpoint) {
        let Some(&id) = self.members.get(&from) else {
            if self.recently_left_set.contains(&from) {
                // It left, but our confirmation was lost: one goodbye for one goodbye, only to a
                // former member, so nothing is amplified.
                self.counters.repeated_goodbyes += 1;
                self.goodbyes.push_back((from, GOODBYE));
            } else {
                self.counters.stray_goodbyes += 1;
            }
            return;
        };
        self.counters.goodbyes += 1;
        let t = self.team_mut(id).expect("member index points at a team");
        if let Some(i) = t.position(from)
            && !t.members[i].leaving
        {
            t.members[i].leaving = true;
            t.leaving += 1;
        }
    }

    fn on_loss_report(&mut self, from: Endpoint, n: u16) {
        let rules = self.rules;
        let Some(&id) = self.members.get(&from) else {
            self.counters.stray_loss_reports += 1;
            return;
        };
        let t = self
            .teams
            .get_mut(&id)
            .expect("member index points at a team");
        let Some(reporter) = t.position(from) else {
            self.counters.stray_loss_reports += 1;
            return;
        };
        let is_monitor = t.members[reporter].monitor;
        if !is_monitor && !rules.lrs {
            self.counters.stray_loss_reports += 1;
            return;
        }
        let slot = usize::from(n) % t.destinations.len();
        let dest = match &mut t.destinations[slot] {
            Some(d) if d.number == n => d,
            _ => {
                self.counters.unattributed_loss_reports += 1;
                return;
            }
        };
        if is_monitor {
            self.counters.loss_reports += 1;
        } else {
            self.counters.loss_requests += 1;
        }
        // Only a monitor's report blames, and only the first one for a chunk: a retry, a second
        // monitor or a forged copy cannot push a peer out faster.
        let blamed = if is_monitor && !dest.blamed {
            dest.blamed = true;
            Some((dest.endpoint, dest.ordinal))
        } else {
            if is_monitor {
                self.counters.repeated_loss_reports += 1;
            }
            None
        };
        if rules.lrs {
            let r = &mut t.members[reporter];
            if r.resends < rules.max_resends {
                r.resends += 1;
                self.counters.resends += 1;
                self.resends.push_back((n, from));
            } else {
                self.counters.resends_refused += 1;
            }
        }
        let Some((blamed, ordinal)) = blamed else {
            return;
        };
        let Some(i) = t.position(blamed) else {
            return;
        };
        let member = &mut t.members[i];
        member.losses += 1;
        member.fate.lost(ordinal);
        if rules.acs && !member.monitor {
            member.period = (member.period + 1).min(ACS_MAX_PERIOD);
            member.skip = member.period - 1;
        }
        // Monitors are the operator's own peers and are never expelled (as in the classic
        // reference); their losses are still counted.
        if !member.monitor && member.fate.should_expel(&rules.expulsion) {
            let losses = member.fate.lost_in_window();
            let judged = member.fate.window_len;
            t.remove_at(i);
            self.members.remove(&blamed);
            self.counters.expelled += 1;
            self.events.push_back(TeamEvent::Expelled {
                peer: blamed,
                team: id,
                losses,
                judged,
            });
            self.drop_if_empty(id);
        }
    }

    /// When [`Teams::handle_timeout`] next has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_halving
    }

    /// Halves every loss counter once per `loss_halving` period.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_halving {
            None => self.next_halving = Some(now + self.rules.loss_halving),
            Some(at) if now >= at => {
                for m in self.teams.values_mut().flat_map(|t| t.members.iter_mut()) {
                    m.losses /= 2;
                    m.fate.halve();
                    m.resends /= 2;
                    m.period = (m.period - 1).max(1);
                    m.skip = m.skip.min(m.period - 1);
                }
                // Keep the period even if the caller was late, but never schedule in the past.
                let next = at + self.rules.loss_halving;
                self.next_halving = Some(if next > now {
                    next
                } else {
                    now + self.rules.loss_halving
                });
            }
            Some(_) => {}
        }
    }

    /// The next control datagram to send (goodbye confirmations).
    pub fn poll_transmit(&mut self) -> Option<(Endpoint, &'static [u8])> {
        self.goodbyes.pop_front()
    }

    /// The next chunk to resend under LRS: its number and the member (the monitor or peer that
    /// reported it) to send it to.
    pub fn poll_resend(&mut self) -> Option<(u16, Endpoint)> {
        self.resends.pop_front()
    }

    /// The next membership change.
    pub fn poll_event(&mut self) -> Option<TeamEvent> {
        self.events.pop_front()
    }

    /// What was counted so far.
    pub fn counters(&self) -> &TeamCounters {
        &self.counters
    }

    /// Number of teams.
    pub fn team_count(&self) -> usize {
        self.teams.len()
    }

    /// Number of peers over all teams.
    pub fn peer_count(&self) -> usize {
        self.members.len()
    }

    /// Whether `peer` is a member of some team here.
    pub fn contains(&self, peer: Endpoint) -> bool {
        self.members.contains_key(&peer)
    }

    /// A team's members in round-robin order with their loss counters, for status pages.
    pub fn members(&self, team: TeamId) -> Vec<TeamMember> {
        self.teams
            .get(&team)
            .map(|t| {
                t.members
                    .iter()
                    .map(|m| TeamMember {
                        endpoint: m.endpoint,
                        monitor: m.monitor,
                        losses: m.losses,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The ids of the teams here.
    pub fn team_ids(&self) -> Vec<TeamId> {
        self.teams.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new([127, 0, 0, 1].into(), port)
    }

    fn member(port: u16, monitor: bool, losses: u32) -> TeamMember {
        TeamMember {
            endpoint: ep(port),
            monitor,
            losses,
        }
    }

    fn chunk(teams: &mut Teams, n: u16) -> Vec<Endpoint> {
        let mut d = Vec::new();
        teams.on_chunk(n, &mut d);
        d
    }

    #[test]
    fn round_robin_inside_a_team_and_every_team_gets_every_chunk() {
        let mut t = Teams::new(TeamRules::default());
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        t.insert(0, ep(3), false);
        t.insert(1, ep(4), false);
        t.insert(1, ep(5), false);
        let got: Vec<_> = (0..6).map(|n| chunk(&mut t, n)).collect();
        assert_eq!(
            got,
            vec![
                vec![ep(1), ep(4)],
                vec![ep(2), ep(5)],
                vec![ep(3), ep(4)],
                vec![ep(1), ep(5)],
                vec![ep(2), ep(4)],
                vec![ep(3), ep(5)],
            ]
        );
    }

    #[test]
    fn a_new_peer_is_appended_and_a_monitor_goes_in_front() {
        let mut t = Teams::new(TeamRules::default());
        t.insert(0, ep(2), false);
        t.insert(0, ep(3), false);
        assert_eq!(chunk(&mut t, 0), vec![ep(2)]);
        t.insert(0, ep(1), true);
        assert_eq!(
            t.members(0).iter().map(|m| m.endpoint).collect::<Vec<_>>(),
            [ep(1), ep(2), ep(3)]
        );
        // The round robin still continues with ep(3), then starts over at the monitor.
        assert_eq!(chunk(&mut t, 1), vec![ep(3)]);
        assert_eq!(chunk(&mut t, 2), vec![ep(1)]);
    }

    #[test]
    fn newcomers_mid_round_get_the_next_chunks_in_the_order_they_came() {
        let mut t = Teams::new(TeamRules::default());
        for p in 1..=4 {
            t.insert(0, ep(p), p == 1);
        }
        assert_eq!(chunk(&mut t, 0), vec![ep(1)]);
        assert_eq!(chunk(&mut t, 1), vec![ep(2)]);
        t.insert(0, ep(5), false);
        t.insert(0, ep(6), false);
        let next: Vec<u16> = (2..8).map(|n| chunk(&mut t, n)[0].port()).collect();
        assert_eq!(next, [5, 6, 3, 4, 1, 2]);
    }

    #[test]
    fn goodbye_takes_effect_at_the_round_boundary() {
        let mut t = Teams::new(TeamRules::default());
        for p in 1..=3 {
            t.insert(0, ep(p), p == 1);
        }
        assert_eq!(chunk(&mut t, 0), [ep(1)]);
        t.handle_datagram(ep(2), b"G");
        t.handle_datagram(ep(2), b"G"); // repeated while it waits: no change
        assert_eq!(t.poll_transmit(), None);
        // The leaving peer still gets its chunk in this round.
        assert_eq!(chunk(&mut t, 1), [ep(2)]);
        assert_eq!(t.poll_transmit(), None);
        assert_eq!(chunk(&mut t, 2), [ep(3)]); // round boundary
        assert_eq!(t.poll_transmit(), Some((ep(2), &b"G"[..])));
        assert_eq!(
            t.poll_event(),
            Some(TeamEvent::Left {
                peer: ep(2),
                team: 0
            })
        );
        assert!(!t.contains(ep(2)));
        assert_eq!(chunk(&mut t, 3), [ep(1)]);
        assert_eq!(chunk(&mut t, 4), [ep(3)]);
        assert_eq!(t.counters().goodbyes, 2);
        assert_eq!(t.counters().left, 1);
        // Our confirmation was lost and it says goodbye again: confirmed again, one for one.
        t.handle_datagram(ep(2), b"G");
        assert_eq!(t.poll_transmit(), Some((ep(2), &b"G"[..])));
        assert_eq!(t.counters().repeated_goodbyes, 1);
        assert_eq!(t.counters().stray_goodbyes, 0);
        // A stranger's goodbye is still only counted.
        t.handle_datagram(ep(9), b"G");
        assert_eq!(t.poll_transmit(), None);
        assert_eq!(t.counters().stray_goodbyes, 1);
    }

    #[test]
    fn goodbyes_and_loss_reports_from_strangers_change_nothing() {
        let mut t = Teams::new(TeamRules::default());
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        chunk(&mut t, 0);
        chunk(&mut t, 1);
        t.handle_datagram(ep(9), b"G");
        for _ in 0..100 {
            t.handle_datagram(ep(9), &1u16.to_be_bytes());
            t.handle_datagram(ep(2), &1u16.to_be_bytes()); // not a monitor
        }
        t.handle_datagram(ep(1), &[0; 1026]);
        assert_eq!(t.counters().stray_goodbyes, 1);
        assert_eq!(t.counters().stray_loss_reports, 200);
        assert_eq!(t.counters().malformed, 1);
        assert_eq!(t.members(0), vec![member(1, true, 0), member(2, false, 0)]);
        assert_eq!(t.poll_event(), None);
    }

    /// Rules that never expel, to look at the counters alone.
    fn never_expel() -> TeamRules {
        TeamRules {
            expulsion: Expulsion {
                min_lost: u32::MAX,
                fraction: 2.0,
            },
            ..TeamRules::default()
        }
    }

    #[test]
    fn losses_are_halved_every_second_and_blamed_once() {
        let start = Instant::now();
        let mut t = Teams::new(never_expel());
        t.handle_timeout(start);
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        // Chunks 0..64 alternate monitor, peer: odd chunks went to ep(2).
        for n in 0..64 {
            chunk(&mut t, n);
        }
        for n in (1u16..40).step_by(2) {
            t.handle_datagram(ep(1), &n.to_be_bytes()); // 20 reports
        }
        assert_eq!(t.members(0)[1].losses, 20);
        t.handle_timeout(start + Duration::from_millis(999));
        assert_eq!(t.members(0)[1].losses, 20);
        t.handle_timeout(start + Duration::from_secs(1));
        assert_eq!(t.members(0)[1].losses, 10);
        // A report on a chunk whose destination was the monitor itself: counted, never expelled.
        t.handle_datagram(ep(1), &0u16.to_be_bytes());
        assert_eq!(t.members(0)[0].losses, 1);
        for n in (41u16..64).step_by(2) {
            t.handle_datagram(ep(1), &n.to_be_bytes()); // 12 more: 22
        }
        assert_eq!(t.members(0)[1].losses, 22);
        // Reporting the same chunks again blames nobody twice.
        for n in (41u16..64).step_by(2) {
            t.handle_datagram(ep(1), &n.to_be_bytes());
        }
        assert_eq!(t.members(0)[1].losses, 22);
        assert_eq!(t.counters().repeated_loss_reports, 12);
        // A report for a chunk whose destination is forgotten is counted, not blamed.
        t.handle_datagram(ep(1), &5000u16.to_be_bytes());
        assert_eq!(t.counters().unattributed_loss_reports, 1);
        assert_eq!(t.poll_event(), None);
    }

    /// A team of a monitor and `peers` peers at `rate` chunks/s for `seconds`, where `lost(n, to)`
    /// says whether chunk `n`, sent to port `to`, is reported lost by the monitor (a quarter of a
    /// buffer later, as our monitors do). Returns the expulsions with the time they happened.
    fn run_team(
        peers: u16,
        rate: u32,
        seconds: u32,
        mut lost: impl FnMut(u32, u16) -> bool,
    ) -> Vec<(TeamEvent, Duration)> {
        let start = Instant::now();
        let mut t = Teams::new(TeamRules::default());
        t.handle_timeout(start);
        t.insert(0, ep(1), true);
        for p in 0..peers {
            t.insert(0, ep(2 + p), false);
        }
        let mut pending = VecDeque::new();
        let mut out = Vec::new();
        for i in 0..rate * seconds {
            let now = start + Duration::from_secs(u64::from(i)) / rate;
            t.handle_timeout(now);
            let n = i as u16;
            for d in chunk(&mut t, n) {
                if d != ep(1) && lost(i, d.port()) {
                    pending.push_back((i + 64, n));
                }
            }
            while pending.front().is_some_and(|&(at, _)| at <= i) {
                let (_, n) = pending.pop_front().unwrap();
                t.handle_datagram(ep(1), &n.to_be_bytes());
            }
            while let Some(e) = t.poll_event() {
                out.push((e, now - start));
            }
        }
        out
    }

    #[test]
    fn a_dead_peer_is_expelled_within_a_few_of_its_chunks_whatever_its_share() {
        // A team of 16 on an audio stream (8 chunks/s): the dead peer gets one chunk every 2 s.
        let low = run_team(15, 8, 30, |_, to| to == 9);
        assert!(
            matches!(low[..], [(TeamEvent::Expelled { peer, losses: 2, judged: 2, .. }, at)]
                if peer == ep(9) && at < Duration::from_secs(14)),
            "{low:?}"
        );
        // A team of 2 at 16,000 chunks/s: 8,000 chunks/s each.
        let high = run_team(1, 16_000, 2, |_, _| true);
        assert!(
            matches!(high[..], [(TeamEvent::Expelled { losses: 2, judged: 2, .. }, at)]
                if at < Duration::from_millis(10)),
            "{high:?}"
        );
        // A free rider that relays one chunk in three is just as useless.
        let rider = run_team(3, 100, 10, |i, to| to == 3 && i % 3 != 0);
        assert!(
            matches!(rider[..], [(TeamEvent::Expelled { peer, .. }, at)]
                if peer == ep(3) && at < Duration::from_secs(2)),
            "{rider:?}"
        );
    }

    #[test]
    fn honest_peers_with_transient_loss_stay() {
        // 0.2 % random loss and a burst of 40 in a row at 8,000 chunks/s (a socket buffer that
        // overflowed for 5 ms), for 10 s.
        let mut x: u32 = 12345;
        let mut random = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let events = run_team(1, 16_000, 10, |i, _| {
            (40_000..40_080).contains(&i) || random() % 1000 < 2
        });
        assert_eq!(events, []);
        // A team of 16 at 8 chunks/s where every peer loses 2 % of its chunks, for 10 minutes;
        // and one that loses two chunks in a row after a minute.
        let mut random = {
            let mut x: u32 = 777;
            move || {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x
            }
        };
        let events = run_team(15, 8, 600, |i, to| {
            (to == 5 && (480..=510).contains(&i)) || random() % 100 < 2
        });
        assert_eq!(events, []);
    }

    #[test]
    fn a_late_report_of_an_older_chunk_counts_it_lost() {
        let mut f = Fate::default();
        let rule = Expulsion::default();
        f.given = 10;
        f.lost(8);
        assert_eq!((f.lost_in_window(), f.window_len), (1, 8));
        assert!(!f.should_expel(&rule));
        f.lost(3);
        assert_eq!((f.lost_in_window(), f.window_len), (2, 8));
        f.lost(3);
        assert_eq!(f.lost_in_window(), 2, "counted once");
        assert!(!f.should_expel(&rule), "2 of 8");
        f.lost(10);
        f.lost(9);
        assert_eq!((f.lost_in_window(), f.window_len), (4, 10));
        assert!(!f.should_expel(&rule), "4 of 10");
    }

    #[test]
    fn lrs_resends_a_reported_chunk_to_the_reporting_monitor() {
        let mut t = Teams::new(TeamRules {
            lrs: true,
            ..TeamRules::default()
        });
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        chunk(&mut t, 0);
        chunk(&mut t, 1);
        t.handle_datagram(ep(1), &1u16.to_be_bytes());
        assert_eq!(t.poll_resend(), Some((1, ep(1))));
        // A plain peer asks for itself: resent to it, nobody blamed.
        t.handle_datagram(ep(2), &0u16.to_be_bytes());
        assert_eq!(t.poll_resend(), Some((0, ep(2))));
        assert_eq!(t.members(0), vec![member(1, true, 0), member(2, false, 1)]);
        assert_eq!(t.counters().loss_requests, 1);
        // Strangers get nothing.
        t.handle_datagram(ep(9), &1u16.to_be_bytes());
        assert_eq!(t.poll_resend(), None);
        assert_eq!(t.counters().stray_loss_reports, 1);
    }

    #[test]
    fn without_lrs_a_plain_peers_report_changes_nothing() {
        let mut t = Teams::new(TeamRules::default());
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        chunk(&mut t, 0);
        t.handle_datagram(ep(2), &0u16.to_be_bytes());
        assert_eq!(t.poll_resend(), None);
        assert_eq!(t.counters().stray_loss_reports, 1);
        assert_eq!(t.members(0), vec![member(1, true, 0), member(2, false, 0)]);
    }

    #[test]
    fn resends_are_bounded_per_member_and_period() {
        let start = Instant::now();
        let mut t = Teams::new(TeamRules {
            lrs: true,
            max_resends: 10,
            ..never_expel()
        });
        t.handle_timeout(start);
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        chunk(&mut t, 0);
        chunk(&mut t, 1);
        for _ in 0..100 {
            t.handle_datagram(ep(1), &1u16.to_be_bytes());
        }
        assert_eq!(std::iter::from_fn(|| t.poll_resend()).count(), 10);
        assert_eq!(t.counters().resends_refused, 90);
        assert_eq!(t.members(0)[1].losses, 1, "blamed once");
        // Halved every period: room for 5 more.
        t.handle_timeout(start + Duration::from_secs(1));
        for _ in 0..100 {
            t.handle_datagram(ep(1), &1u16.to_be_bytes());
        }
        assert_eq!(std::iter::from_fn(|| t.poll_resend()).count(), 5);
    }

    #[test]
    fn acs_sends_fewer_chunks_to_a_lossy_peer_and_forgives_it_over_time() {
        let start = Instant::now();
        let mut t = Teams::new(TeamRules {
            acs: true,
            ..never_expel()
        });
        t.handle_timeout(start);
        for p in 1..=4 {
            t.insert(0, ep(p), p == 1);
        }
        for n in 0..8 {
            chunk(&mut t, n);
        }
        // Chunks 1 and 5 went to ep(2); two blamed losses: period 3.
        t.handle_datagram(ep(1), &1u16.to_be_bytes());
        t.handle_datagram(ep(1), &5u16.to_be_bytes());
        let got: Vec<u16> = (8..68).map(|n| chunk(&mut t, n)[0].port()).collect();
        let to = |p: u16| got.iter().filter(|&&q| q == p).count();
        assert!(to(2) * 3 <= to(3) + 1, "ep(2) got {} of {got:?}", to(2));
        assert_eq!(to(3), to(4));
        assert_eq!(to(1), to(3), "monitors and clean peers share evenly");
        // Monitors are never penalised.
        t.handle_datagram(ep(1), &8u16.to_be_bytes());
        // Every period the penalty shrinks by one; after two it is gone.
        t.handle_timeout(start + Duration::from_secs(1));
        t.handle_timeout(start + Duration::from_secs(2));
        let got: Vec<u16> = (68..140).map(|n| chunk(&mut t, n)[0].port()).collect();
        let to = |p: u16| got.iter().filter(|&&q| q == p).count();
        assert_eq!((to(1), to(2), to(3), to(4)), (18, 18, 18, 18));
    }

    #[test]
    fn destinations_are_remembered_across_the_wrap() {
        let mut t = Teams::new(TeamRules {
            expulsion: Expulsion {
                min_lost: 1,
                fraction: 0.5,
            },
            ..TeamRules::default()
        });
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        for n in [65534, 65535, 0, 1] {
            chunk(&mut t, n);
        }
        t.handle_datagram(ep(1), &1u16.to_be_bytes());
        assert_eq!(
            t.poll_event(),
            Some(TeamEvent::Expelled {
                peer: ep(2),
                team: 0,
                losses: 1,
                judged: 2
            })
        );
    }

    #[test]
    fn teams_disappear_when_empty() {
        let mut t = Teams::new(TeamRules::default());
        t.insert(7, ep(1), false);
        assert_eq!(t.team_count(), 1);
        t.handle_datagram(ep(1), b"G");
        assert_eq!(chunk(&mut t, 0), [ep(1)]);
        assert_eq!(t.team_count(), 0);
        assert_eq!(t.peer_count(), 0);
        assert!(chunk(&mut t, 1).is_empty());
    }

    fn complain(t: &mut Teams, from: u16, about: u16) {
        t.handle_datagram(ep(from), &crate::proto::integrity::complaint(ep(about), 7));
    }

    fn polluters(t: &mut Teams) -> Vec<(Endpoint, u32, bool)> {
        std::iter::from_fn(|| t.poll_event())
            .filter_map(|e| match e {
                TeamEvent::Polluter {
                    peer,
                    accusers,
                    trusted,
                    ..
                } => Some((peer, accusers, trusted)),
                _ => None,
            })
            .collect()
    }

    /// A team of 16: monitor 1, peers 2..=16.
    fn signed_team() -> Teams {
        let mut t = Teams::new(TeamRules {
            complaints: true,
            ..TeamRules::default()
        });
        t.insert(0, ep(1), true);
        for p in 2..=16 {
            t.insert(0, ep(p), false);
        }
        t
    }

    #[test]
    fn complaints_need_a_signed_team() {
        let mut t = Teams::new(TeamRules::default());
        t.insert(0, ep(1), true);
        t.insert(0, ep(2), false);
        complain(&mut t, 1, 2);
        assert!(polluters(&mut t).is_empty());
        assert_eq!(t.counters().malformed, 1);
        assert!(t.contains(ep(2)));
    }

    #[test]
    fn a_monitor_or_trusted_complaint_expels_at_once() {
        let mut t = signed_team();
        t.set_trusted([ep(5)]);
        complain(&mut t, 1, 9);
        assert_eq!(polluters(&mut t), [(ep(9), 1, true)]);
        assert!(!t.contains(ep(9)));
        complain(&mut t, 5, 10);
        assert_eq!(polluters(&mut t), [(ep(10), 1, true)]);
        assert_eq!(t.cis_counters().polluters_expelled, 2);
    }

    #[test]
    fn a_bad_mouthing_minority_never_expels_and_a_majority_does() {
        let mut t = signed_team();
        // Five bad-mouthers (12..=16) complain about every honest peer, again and again.
        for _ in 0..3 {
            for liar in 12..=16 {
                for victim in 2..=11 {
                    complain(&mut t, liar, victim);
                }
            }
        }
        assert!(polluters(&mut t).is_empty());
        assert_eq!(t.peer_count(), 16);
        // Complaints about monitors, from strangers, about strangers, about oneself: ignored.
        complain(&mut t, 2, 1);
        complain(&mut t, 99, 2);
        complain(&mut t, 2, 99);
        complain(&mut t, 2, 2);
        assert_eq!(t.cis_counters().stray_complaints, 4);
        assert!(polluters(&mut t).is_empty());
        // A polluter (16) seen by honest peers 2..=9: 8 of its 15 teammates is a majority.
        for honest in 2..=8 {
            complain(&mut t, honest, 16);
        }
        assert!(polluters(&mut t).is_empty(), "7 of 15 is no majority");
        complain(&mut t, 9, 16);
        assert_eq!(polluters(&mut t), [(ep(16), 8, false)]);
    }
}
