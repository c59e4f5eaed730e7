//! NTS, the NAT Traversal Set of rules (reference-notes §6.4), sans-IO: the byte layouts of its
//! TCP and UDP messages, the acknowledgement-by-echo rule, the splitter's port-step estimate and
//! the reference's port prediction.
//!
//! NTS messages carry no type: like the rest of the compat wire they are told apart by length and
//! by who sent them (the splitter, a monitor, a peer). Every one starts with a 7-character peer
//! ID the splitter hands out over TCP. Layouts (all integers big-endian):
//!
//! ```text
//! TCP, splitter → peer, after the core configuration (whose list holds the monitors only):
//!   ID (7)
//!   later, "list 2":  u16 M | M × (ID | IPv4 | u16 last source port | u16 port step)   15 bytes each
//! UDP (length: name, sender → receiver):
//!    7: U1  ID                                 new peer → splitter, → each monitor
//!    7: H   ID (of the sender)                 peer → peer
//!    9: U3  ID | u16 port seen by the monitor  monitor → splitter
//!    9: U4  ID of another peer | u16 its port  peer → splitter
//!    8: Y/N ID | 'Y' or 'N'                    new peer → splitter (N also → monitors)
//!   10: N-fwd ID | 'N' | u16 port              monitor → splitter
//!   13: U2m ID | IPv4 | u16 port               splitter → monitor
//!   17: U2  ID | IPv4 | u16 port | u16 step | u16 peer number      splitter → peer
//!   19: U2x U2 | u16 extra splitter port       splitter → peer whose own step is not 0
//!    2: loss report, 1: `G` goodbye, 2 + chunk size: chunk, as in DBS
//! ```
//!
//! Every NTS message but the splitter's U2/U2m and the monitor's echo is sent reliably: again
//! every second until the receiver echoes the identical bytes back ([`Pending`]).
//!
//! All of them are used: U2x and the extra port by [`super::nts_splitter`] (the echo comes from
//! the splitter's extra socket, so a peer's ID sent there is acknowledged from that port), `N`
//! and N-fwd by the retry from a new port ([`super::nts_peer::NtsPeer::set_retries`]).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::wire::{GOODBYE, LOSS_REPORT_LEN, WireError};

/// Length of a peer ID.
pub const ID_LEN: usize = 7;
/// A reliable NTS message is sent again this often until acknowledged.
pub const RESEND_EVERY: Duration = Duration::from_secs(1);
/// The first repeat of a reliable NTS message comes this soon (then every [`RESEND_EVERY`]).
pub const FIRST_RESEND: Duration = Duration::from_millis(250);
/// A reliable NTS message is given up after this long; also the time a new peer has to hear
/// from every peer of list 2 before it retries from a new port.
pub const MAX_PEER_ARRIVING_TIME: Duration = Duration::from_secs(15);
/// Longest a whole incorporation may take at the splitter.
pub const MAX_TOTAL_INCORPORATION_TIME: Duration = Duration::from_secs(60);
/// The reference's budget of predicted ports per new peer.
pub const MAX_PREDICTED_PORTS: u16 = 20;
/// The splitter's "port step not measured yet".
pub const STEP_UNKNOWN: u16 = 0xFFFF;
/// Length of one list-2 entry.
pub const LIST2_ENTRY_LEN: usize = ID_LEN + 4 + 2 + 2;

const ID_ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A peer's 7-character ID over `[0-9A-Z]`, as the reference splitter generates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; ID_LEN]);

impl PeerId {
    /// The ID in `bytes`, if they are 7 characters of `[0-9A-Z]` (stricter than the reference,
    /// which takes any 7 bytes; its splitter never makes others).
    pub fn from_bytes(bytes: &[u8]) -> Option<PeerId> {
        let id: [u8; ID_LEN] = bytes.try_into().ok()?;
        id.iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            .then_some(PeerId(id))
    }

    /// An ID from 64 random bits (36⁷ ≈ 2³⁶ IDs; the caller brings the randomness).
    pub fn from_random(mut r: u64) -> PeerId {
        let mut id = [0u8; ID_LEN];
        for b in &mut id {
            *b = ID_ALPHABET[(r % 36) as usize];
            r /= 36;
        }
        PeerId(id)
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Always ASCII by construction.
        f.write_str(std::str::from_utf8(&self.0).unwrap_or("???????"))
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// One entry of list 2: an incorporated or incorporating peer the new peer must say hello to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct List2Entry {
    /// Its ID.
    pub id: PeerId,
    /// Its public address and the last source port the splitter saw it use.
    pub endpoint: SocketAddrV4,
    /// Its NAT's port step (0: cone, or not measured).
    pub port_step: u16,
}

/// Encodes list 2 (`u16 M | M × 15 bytes`), appended to `out`.
pub fn encode_list2(entries: &[List2Entry], out: &mut Vec<u8>) -> Result<(), WireError> {
    let m = u16::try_from(entries.len()).map_err(|_| WireError::TooLong {
        what: "the number of peers in list 2",
        len: entries.len(),
    })?;
    out.reserve(2 + LIST2_ENTRY_LEN * entries.len());
    put_u16(out, m);
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.endpoint.ip().octets());
        put_u16(out, e.endpoint.port());
        put_u16(out, e.port_step);
    }
    Ok(())
}

/// Why NTS bytes on TCP could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NtsError {
    /// An ID is not 7 characters of `[0-9A-Z]`: the splitter is not an NTS splitter (or the
    /// stream is out of step).
    #[error("{what} is not a peer ID: {bytes:02x?}")]
    NotAnId {
        /// Where.
        what: &'static str,
        /// The bytes.
        bytes: Vec<u8>,
    },
}

/// Decodes list 2 from the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// entries and the bytes used.
pub fn decode_list2(buf: &[u8]) -> Result<Option<(Vec<List2Entry>, usize)>, NtsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let m = usize::from(u16_at(buf, 0));
    let end = 2 + m * LIST2_ENTRY_LEN;
    if buf.len() < end {
        return Ok(None);
    }
    let entries = buf[2..end]
        .chunks_exact(LIST2_ENTRY_LEN)
        .map(|e| {
            let id = PeerId::from_bytes(&e[..ID_LEN]).ok_or_else(|| NtsError::NotAnId {
                what: "a list-2 entry",
                bytes: e[..ID_LEN].to_vec(),
            })?;
            Ok(List2Entry {
                id,
                endpoint: SocketAddrV4::new(ip_at(e, 7), u16_at(e, 11)),
                port_step: u16_at(e, 13),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((entries, end)))
}

/// Decodes the 7-byte ID the splitter sends after the configuration: `Ok(None)` when more bytes
/// are needed.
pub fn decode_id(buf: &[u8]) -> Result<Option<PeerId>, NtsError> {
    let Some(bytes) = buf.get(..ID_LEN) else {
        return Ok(None);
    };
    PeerId::from_bytes(bytes)
        .map(Some)
        .ok_or_else(|| NtsError::NotAnId {
            what: "the splitter's answer after the configuration",
            bytes: bytes.to_vec(),
        })
}

/// A UDP datagram as an NTS splitter sees it (reference `Splitter_NTS::ModerateTheTeam`, in its
/// order: length 2 first, then `G`, then by length and whether the sender is a monitor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToSplitter {
    /// A monitor's loss report.
    LossReport(u16),
    /// Goodbye.
    Goodbye,
    /// U1: a new peer's ID, from the source port it uses towards the splitter.
    Hello(PeerId),
    /// U3: a monitor saw the new peer `id` arrive from `port`.
    MonitorSaw {
        /// The new peer.
        id: PeerId,
        /// Its source port towards the monitor.
        port: u16,
    },
    /// U4: a peer heard from the peer `id` from `port`.
    PortReport {
        /// The peer heard from.
        id: PeerId,
        /// The source port it came from.
        port: u16,
    },
    /// Y (`done`) or N (retry from a new port).
    Incorporated {
        /// The new peer.
        id: PeerId,
        /// `Y`: it heard from everyone; `N`: it retries.
        done: bool,
    },
    /// N-fwd: a monitor saw the retrying peer `id` come from `port`. (The reference splitter
    /// reads the port from bytes 7–8, `'N'` and the port's high byte; this reads bytes 8–9, as
    /// the reference monitor writes them.)
    MonitorSawRetry {
        /// The retrying peer.
        id: PeerId,
        /// Its new source port towards the monitor.
        port: u16,
    },
    /// Anything else, including IDs that are not `[0-9A-Z]{7}`.
    Malformed,
}

impl ToSplitter {
    /// Classifies datagram `d`; `from_monitor` tells whether its sender is one of the team's
    /// monitors (9- and 10-byte messages mean different things from monitors).
    pub fn parse(d: &[u8], from_monitor: bool) -> ToSplitter {
        if d.len() == LOSS_REPORT_LEN {
            return ToSplitter::LossReport(u16_at(d, 0));
        }
        if d == GOODBYE {
            return ToSplitter::Goodbye;
        }
        let Some(id) = d.get(..ID_LEN).and_then(PeerId::from_bytes) else {
            return ToSplitter::Malformed;
        };
        match (d.len(), from_monitor) {
            (ID_LEN, _) => ToSplitter::Hello(id),
            (9, true) => ToSplitter::MonitorSaw {
                id,
                port: u16_at(d, 7),
            },
            (9, false) => ToSplitter::PortReport {
                id,
                port: u16_at(d, 7),
            },
            (8, _) => match d[7] {
                b'Y' => ToSplitter::Incorporated { id, done: true },
                b'N' => ToSplitter::Incorporated { id, done: false },
                _ => ToSplitter::Malformed,
            },
            (10, true) if d[7] == b'N' => ToSplitter::MonitorSawRetry {
                id,
                port: u16_at(d, 8),
            },
            _ => ToSplitter::Malformed,
        }
    }

    /// Encodes it into `out` (cleared first); `Malformed` encodes as nothing.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match *self {
            ToSplitter::LossReport(n) => put_u16(out, n),
            ToSplitter::Goodbye => out.extend_from_slice(GOODBYE),
            ToSplitter::Hello(id) => out.extend_from_slice(id.as_bytes()),
            ToSplitter::MonitorSaw { id, port } | ToSplitter::PortReport { id, port } => {
                out.extend_from_slice(id.as_bytes());
                put_u16(out, port);
            }
            ToSplitter::Incorporated { id, done } => {
                out.extend_from_slice(id.as_bytes());
                out.push(if done { b'Y' } else { b'N' });
            }
            ToSplitter::MonitorSawRetry { id, port } => {
                out.extend_from_slice(id.as_bytes());
                out.push(b'N');
                put_u16(out, port);
            }
            ToSplitter::Malformed => {}
        }
    }
}

/// U2 / U2x / U2i: the splitter tells a peer about a new peer to say hello to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewPeer {
    /// The new peer's ID.
    pub id: PeerId,
    /// Its public address and smallest known source port.
    pub endpoint: SocketAddrV4,
    /// Its NAT's port step (0: cone).
    pub port_step: u16,
    /// The receiver's number in the splitter's list, plus 1 (U2i: the list's length + 1): how
    /// many new mappings the new peer's NAT made before the one towards the receiver.
    pub peer_number: u16,
    /// U2x: the splitter's extra port, to which the receiver sends its ID so that the splitter
    /// learns its current source port.
    pub extra_port: Option<u16>,
}

/// A UDP datagram as an NTS peer or monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToPeer<'a> {
    /// U2/U2x/U2i from the splitter.
    NewPeer(NewPeer),
    /// U2m from the splitter (to monitors): add this peer.
    NewPeerAtMonitor {
        /// Its ID.
        id: PeerId,
        /// The endpoint it used towards this monitor.
        endpoint: SocketAddrV4,
    },
    /// An echo of a message this peer sent (own ID, or 8-byte Y/N from anyone, or a 9/10-byte
    /// U4/N-fwd from the splitter): match it with [`Pending::acknowledge`].
    Ack(&'a [u8]),
    /// A teammate's hello (its ID), or at a monitor also an arriving peer's U1 or N (8 bytes,
    /// `retry` true): echo it and act.
    Hello {
        /// The sender's ID.
        id: PeerId,
        /// An 8-byte `ID ‖ 'N'` (monitors only).
        retry: bool,
    },
    /// Not NTS: chunk, DBS hello `H`, goodbye or malformed, for the DBS rules.
    Dbs(&'a [u8]),
}

impl<'a> ToPeer<'a> {
    /// Classifies datagram `d` received by a peer with ID `me` (a monitor if `monitor`);
    /// `from_splitter` tells whether it came from the splitter's endpoint. Order as the
    /// reference's `Monitor_NTS` / `Peer_NTS::ProcessMessage`.
    pub fn parse(d: &'a [u8], from_splitter: bool, me: &PeerId, monitor: bool) -> ToPeer<'a> {
        let id = d.get(..ID_LEN).and_then(PeerId::from_bytes);
        if monitor && !from_splitter && (d.len() == ID_LEN || d.len() == ID_LEN + 1) {
            if let Some(id) = id {
                if d.len() == ID_LEN || d[7] == b'N' {
                    return ToPeer::Hello {
                        id,
                        retry: d.len() == ID_LEN + 1,
                    };
                }
            }
        }
        if from_splitter {
            if let Some(id) = id {
                let endpoint = || SocketAddrV4::new(ip_at(d, 7), u16_at(d, 11));
                match d.len() {
                    13 if monitor => {
                        return ToPeer::NewPeerAtMonitor {
                            id,
                            endpoint: endpoint(),
                        };
                    }
                    17 | 19 => {
                        return ToPeer::NewPeer(NewPeer {
                            id,
                            endpoint: endpoint(),
                            port_step: u16_at(d, 13),
                            peer_number: u16_at(d, 15),
                            extra_port: (d.len() == 19).then(|| u16_at(d, 17)),
                        });
                    }
                    _ => {}
                }
            }
        }
        if d == me.as_bytes()
            || (from_splitter && (d.len() == ID_LEN + 2 || d.len() == ID_LEN + 3))
            || d.len() == ID_LEN + 1
        {
            return ToPeer::Ack(d);
        }
        if d.len() == ID_LEN {
            if let Some(id) = id {
                return ToPeer::Hello { id, retry: false };
            }
        }
        ToPeer::Dbs(d)
    }
}

impl NewPeer {
    /// Encodes U2 (17 bytes) or, with `extra_port`, U2x (19), into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.endpoint.ip().octets());
        put_u16(out, self.endpoint.port());
        put_u16(out, self.port_step);
        put_u16(out, self.peer_number);
        if let Some(p) = self.extra_port {
            put_u16(out, p);
        }
    }
}

/// Encodes U2m (13 bytes) into `out` (cleared first).
pub fn encode_new_peer_at_monitor(id: &PeerId, endpoint: SocketAddrV4, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&endpoint.ip().octets());
    put_u16(out, endpoint.port());
}

/// The splitter's estimate of a peer's NAT port step (reference `UpdatePortStep`): unknown at
/// first; each source port observed for the peer (towards the splitter's extra port, a
/// monitor, or reported by a teammate in U4) gives `step = gcd(step, |registered − observed|)`,
/// unknown counting as 0 so that the first sample sets it. Once 0 (a cone NAT: the same port
/// everywhere) it stays 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortStep {
    /// Current estimate ([`STEP_UNKNOWN`] before the first sample).
    pub step: u16,
    /// The last source port observed.
    pub last_port: Option<u16>,
}

impl Default for PortStep {
    fn default() -> PortStep {
        PortStep {
            step: STEP_UNKNOWN,
            last_port: None,
        }
    }
}

/// Greatest common divisor, `gcd(0, x) = x`.
pub fn gcd(mut a: u16, mut b: u16) -> u16 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl PortStep {
    /// Takes one observation: the peer, registered at `registered_port` (its source port
    /// towards the splitter), was seen using `observed`.
    pub fn observe(&mut self, registered_port: u16, observed: u16) {
        self.last_port = Some(observed);
        if self.step == 0 {
            return;
        }
        let previous = if self.step == STEP_UNKNOWN {
            0
        } else {
            self.step
        };
        self.step = gcd(previous, registered_port.abs_diff(observed));
    }
}

/// All divisors of `n`, ascending (none for 0).
pub fn divisors(n: u16) -> Vec<u16> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut i: u16 = 1;
    while u32::from(i) * u32::from(i) <= u32::from(n) {
        if n % i == 0 {
            small.push(i);
            if i != n / i {
                large.push(n / i);
            }
        }
        i += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// The reference's probable port differences (`Peer_NTS::GetProbablePortDiffs`) for a new peer
/// whose measured step is `port_diff`, seen from the receiver number `peer_number`: the real step
/// may be any divisor `s` of the measured one, and other traffic may have skipped ports, so for
/// each `s` it takes `s · (peer_number + k)` for `k` from 0 to `⌈(port_diff / s) · 20 / Σ
/// divisors⌉ + 1` (the division truncating, as in C++). Differences are 16-bit, wrapping as the
/// reference's `std::set<uint16_t>` does. Ascending, without repeats.
pub fn probable_port_diffs(port_diff: u16, peer_number: u16) -> Vec<u16> {
    let factors = divisors(port_diff);
    let sum: u32 = factors.iter().map(|&f| u32::from(f)).sum();
    let mut diffs = std::collections::BTreeSet::new();
    if sum == 0 {
        return Vec::new();
    }
    let count_factor = f32::from(MAX_PREDICTED_PORTS) / sum as f32;
    for &s in &factors {
        let skips = (f32::from(port_diff / s) * count_factor).ceil() as u32 + 1;
        for k in 0..=skips {
            diffs.insert((u32::from(s) * (u32::from(peer_number) + k)) as u16);
        }
    }
    diffs.into_iter().collect()
}

/// The ports a peer says hello to, besides the new peer's `base` port, when the splitter
/// announced it with step `port_diff` (reference `GetProbableSourcePorts`): none for a cone NAT
/// (step 0), else `base + d` for each [`probable_port_diffs`] `d` that stays below 65536.
pub fn probable_source_ports(base: u16, port_diff: u16, peer_number: u16) -> Vec<u16> {
    if port_diff == 0 {
        return Vec::new();
    }
    probable_port_diffs(port_diff, peer_number)
        .into_iter()
        .filter_map(|d| base.checked_add(d))
        .collect()
}

/// A reliable NTS message: sent to `dest` (and the same IP at each of `other_ports`) every
/// [`RESEND_EVERY`] until an identical echo comes back from that IP and one of those ports, or
/// [`MAX_PEER_ARRIVING_TIME`] passed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reliable {
    message: Vec<u8>,
    dest: SocketAddrV4,
    other_ports: Vec<u16>,
    first: Instant,
    next: Instant,
}

/// The reliable messages a peer has in flight (sans-IO: [`Pending::poll`] says what to send now).
#[derive(Debug, Default)]
pub struct Pending {
    messages: Vec<Reliable>,
    /// Most messages in flight; more are refused (bounded memory under a flood of U2s).
    pub limit: usize,
}

impl Pending {
    /// An empty set holding at most `limit` messages.
    pub fn new(limit: usize) -> Pending {
        Pending {
            messages: Vec::new(),
            limit,
        }
    }

    /// Queues `message` for `dest` and, at the same IP, `other_ports`; it goes out at the next
    /// [`Pending::poll`]. False when the set is full.
    pub fn send(
        &mut self,
        now: Instant,
        message: &[u8],
        dest: SocketAddrV4,
        other_ports: &[u16],
    ) -> bool {
        if self.messages.len() >= self.limit {
            return false;
        }
        self.messages.push(Reliable {
            message: message.to_vec(),
            dest,
            other_ports: other_ports.to_vec(),
            first: now,
            next: now,
        });
        true
    }

    /// An echo `message` from `from`: removes the message it acknowledges, if any; whether it
    /// did.
    pub fn acknowledge(&mut self, message: &[u8], from: SocketAddrV4) -> bool {
        let hit = self.messages.iter().position(|m| {
            m.message == message
                && m.dest.ip() == from.ip()
                && (m.dest.port() == from.port() || m.other_ports.contains(&from.port()))
        });
        if let Some(i) = hit {
            self.messages.swap_remove(i);
        }
        hit.is_some()
    }

    /// What to send at `now` (each due message to every one of its ports), dropping messages
    /// older than [`MAX_PEER_ARRIVING_TIME`]; `expired` gets those given up.
    pub fn poll(
        &mut self,
        now: Instant,
        mut send: impl FnMut(&[u8], SocketAddrV4),
        expired: &mut Vec<(Vec<u8>, SocketAddrV4)>,
    ) {
        self.messages.retain_mut(|m| {
            if now.saturating_duration_since(m.first) >= MAX_PEER_ARRIVING_TIME {
                expired.push((std::mem::take(&mut m.message), m.dest));
                return false;
            }
            if now >= m.next {
                send(&m.message, m.dest);
                for &p in &m.other_ports {
                    send(&m.message, SocketAddrV4::new(*m.dest.ip(), p));
                }
                // Beyond the reference: one early repeat, for a hello that met a filter the
                // other side's own hello had not opened yet (a second's wait otherwise).
                m.next = if m.next == m.first {
                    now + FIRST_RESEND
                } else {
                    now + RESEND_EVERY
                };
            }
            true
        });
    }

    /// When [`Pending::poll`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.messages
            .iter()
            .map(|m| m.next.min(m.first + MAX_PEER_ARRIVING_TIME))
            .min()
    }

    /// Messages in flight.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// Shorthands for the NTS modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::PeerId;
    use crate::proto::Endpoint;
    use std::net::Ipv4Addr;

    /// The ID spelled `s` (7 characters of `[0-9A-Z]`).
    pub fn id(s: &str) -> PeerId {
        PeerId::from_bytes(s.as_bytes()).unwrap()
    }

    /// An endpoint of host `h` (198.18.0.h).
    pub fn ep(h: u8, port: u16) -> Endpoint {
        Endpoint::new(Ipv4Addr::new(198, 18, 0, h), port)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::id;
    use super::*;
    use crate::proto::hex;

    /// Appendix A.5: the ID and list 2 a C++ NTS splitter sent.
    #[test]
    fn appendix_a5_id_and_list2() {
        let got = decode_id(&hex("58304636365554")).unwrap().unwrap();
        assert_eq!(got.to_string(), "X0F66UT");
        assert_eq!(decode_id(b"X0F66U"), Ok(None));
        let bytes = hex("0001 49325741444157 7f000001 ed45 0000");
        let (list, used) = decode_list2(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            list,
            vec![List2Entry {
                id: id("I2WADAW"),
                endpoint: "127.0.0.1:60741".parse().unwrap(),
                port_step: 0,
            }]
        );
        let mut out = Vec::new();
        encode_list2(&list, &mut out).unwrap();
        assert_eq!(out, bytes);
        for cut in 0..bytes.len() {
            assert_eq!(decode_list2(&bytes[..cut]), Ok(None), "cut {cut}");
        }
    }

    /// Appendix A.5: the 17-byte U2 a C++ NTS splitter sent when peer B joined.
    #[test]
    fn appendix_a5_u2() {
        let me = id("X0F66UT");
        let bytes = hex("304250594f3741 7f000001 939b 0000 0003");
        let expected = NewPeer {
            id: id("0BPYO7A"),
            endpoint: "127.0.0.1:37787".parse().unwrap(),
            port_step: 0,
            peer_number: 3,
            extra_port: None,
        };
        assert_eq!(
            ToPeer::parse(&bytes, true, &me, false),
            ToPeer::NewPeer(expected)
        );
        let mut out = Vec::new();
        expected.encode(&mut out);
        assert_eq!(out, bytes);
        // The same bytes from anyone but the splitter are not a U2.
        assert_eq!(
            ToPeer::parse(&bytes, false, &me, false),
            ToPeer::Dbs(&bytes)
        );
        // U2x.
        let x = NewPeer {
            extra_port: Some(9000),
            ..expected
        };
        x.encode(&mut out);
        assert_eq!(out.len(), 19);
        assert_eq!(ToPeer::parse(&out, true, &me, false), ToPeer::NewPeer(x));
    }

    #[test]
    fn splitter_demultiplexes_by_length_and_sender() {
        let a = id("ABCDEFG");
        let cases = [
            (vec![1, 2], false, ToSplitter::LossReport(0x0102)),
            (b"G".to_vec(), false, ToSplitter::Goodbye),
            (b"ABCDEFG".to_vec(), false, ToSplitter::Hello(a)),
            (
                b"ABCDEFG\x01\x02".to_vec(),
                true,
                ToSplitter::MonitorSaw { id: a, port: 258 },
            ),
            (
                b"ABCDEFG\x01\x02".to_vec(),
                false,
                ToSplitter::PortReport { id: a, port: 258 },
            ),
            (
                b"ABCDEFGY".to_vec(),
                false,
                ToSplitter::Incorporated { id: a, done: true },
            ),
            (
                b"ABCDEFGN".to_vec(),
                true,
                ToSplitter::Incorporated { id: a, done: false },
            ),
            (
                b"ABCDEFGN\x01\x02".to_vec(),
                true,
                ToSplitter::MonitorSawRetry { id: a, port: 258 },
            ),
        ];
        let mut out = Vec::new();
        for (bytes, monitor, expected) in cases {
            assert_eq!(ToSplitter::parse(&bytes, monitor), expected, "{bytes:?}");
            expected.encode(&mut out);
            assert_eq!(out, bytes);
        }
        for bad in [
            &b""[..],
            b"abcdefg",
            b"ABCDEFGX",
            b"ABCDEFGN\x01\x02",
            b"ABCDEFG\x00\x00\x00",
        ] {
            assert_eq!(
                ToSplitter::parse(bad, false),
                ToSplitter::Malformed,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn peer_tells_acks_hellos_and_dbs_apart() {
        let me = id("MEMEMEM");
        let other = id("OTHER00");
        assert_eq!(
            ToPeer::parse(b"MEMEMEM", true, &me, false),
            ToPeer::Ack(b"MEMEMEM")
        );
        assert_eq!(
            ToPeer::parse(b"MEMEMEM", false, &me, false),
            ToPeer::Ack(b"MEMEMEM")
        );
        assert_eq!(
            ToPeer::parse(b"MEMEMEMY", false, &me, false),
            ToPeer::Ack(b"MEMEMEMY")
        );
        assert_eq!(
            ToPeer::parse(b"OTHER00\x01\x02", true, &me, false),
            ToPeer::Ack(b"OTHER00\x01\x02")
        );
        assert_eq!(
            ToPeer::parse(b"OTHER00", false, &me, false),
            ToPeer::Hello {
                id: other,
                retry: false
            }
        );
        assert_eq!(ToPeer::parse(b"H", false, &me, false), ToPeer::Dbs(b"H"));
        // A monitor: U1 and N from arriving peers; U2m from the splitter.
        assert_eq!(
            ToPeer::parse(b"OTHER00N", false, &me, true),
            ToPeer::Hello {
                id: other,
                retry: true
            }
        );
        let mut u2m = Vec::new();
        encode_new_peer_at_monitor(&other, "198.18.0.7:4000".parse().unwrap(), &mut u2m);
        assert_eq!(u2m.len(), 13);
        assert_eq!(
            ToPeer::parse(&u2m, true, &me, true),
            ToPeer::NewPeerAtMonitor {
                id: other,
                endpoint: "198.18.0.7:4000".parse().unwrap()
            }
        );
    }

    #[test]
    fn ids_are_seven_base36_characters() {
        for r in [0, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            let i = PeerId::from_random(r);
            assert_eq!(PeerId::from_bytes(i.as_bytes()), Some(i));
        }
        assert_eq!(PeerId::from_random(0).to_string(), "0000000");
        assert_ne!(PeerId::from_random(1), PeerId::from_random(2));
        assert!(PeerId::from_bytes(b"abcdefg").is_none());
        assert!(PeerId::from_bytes(b"ABCDEF").is_none());
    }

    #[test]
    fn port_step_is_the_gcd_of_differences_and_cone_stays_zero() {
        let mut s = PortStep::default();
        assert_eq!(s.step, STEP_UNKNOWN);
        s.observe(20000, 20006);
        assert_eq!(s.step, 6);
        s.observe(20000, 20004);
        assert_eq!(s.step, 2);
        s.observe(20000, 20000); // gcd(2, 0) = 2
        assert_eq!(s.step, 2);
        assert_eq!(s.last_port, Some(20000));
        let mut cone = PortStep::default();
        cone.observe(5000, 5000);
        assert_eq!(cone.step, 0);
        cone.observe(5000, 5100);
        assert_eq!(cone.step, 0, "once 0 it stays 0");
        // Differences either way round.
        let mut down = PortStep::default();
        down.observe(30000, 29990);
        assert_eq!(down.step, 10);
    }

    #[test]
    fn prediction_matches_the_reference_formula() {
        assert_eq!(divisors(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(1), vec![1]);
        assert!(divisors(0).is_empty());
        // Step 1, receiver 1: factors {1}, count factor 20: k = 0..=21 → diffs 1..=22.
        assert_eq!(probable_port_diffs(1, 1), (1..=22).collect::<Vec<u16>>());
        // Step 2, receiver 3: factors {1, 2}, count factor 20/3; s = 1: ⌈2·6.67⌉ + 1 = 15 →
        // 3..=18; s = 2: ⌈1·6.67⌉ + 1 = 8 → 6, 8, ..., 22.
        let mut expected: Vec<u16> = (3..=18).collect();
        expected.extend([20, 22]);
        assert_eq!(probable_port_diffs(2, 3), expected);
        assert!(probable_source_ports(4000, 0, 1).is_empty());
        let ports = probable_source_ports(65530, 1, 1);
        assert_eq!(ports, (65531..=65535).collect::<Vec<u16>>());
    }

    #[test]
    fn pending_resends_until_echoed_from_a_tried_port() {
        let t0 = Instant::now();
        let mut p = Pending::new(2);
        let dest: SocketAddrV4 = "198.18.0.1:8001".parse().unwrap();
        assert!(p.send(t0, b"ABCDEFG", dest, &[8002]));
        assert!(p.send(t0, b"ABCDEFGY", dest, &[]));
        assert!(!p.send(t0, b"third", dest, &[]), "bounded");
        let mut sent = Vec::new();
        let mut expired = Vec::new();
        p.poll(t0, |m, d| sent.push((m.to_vec(), d)), &mut expired);
        assert_eq!(sent.len(), 3);
        sent.clear();
        p.poll(
            t0 + Duration::from_millis(100),
            |m, d| sent.push((m.to_vec(), d)),
            &mut expired,
        );
        assert!(sent.is_empty(), "not due yet");
        // One early repeat, then every second.
        assert_eq!(p.poll_timeout(), Some(t0 + FIRST_RESEND));
        p.poll(
            t0 + FIRST_RESEND,
            |m, d| sent.push((m.to_vec(), d)),
            &mut expired,
        );
        assert_eq!(sent.len(), 3);
        sent.clear();
        assert_eq!(p.poll_timeout(), Some(t0 + FIRST_RESEND + RESEND_EVERY));
        // An echo from another IP or another port does not count; from a tried port it does.
        assert!(!p.acknowledge(b"ABCDEFG", "198.18.0.9:8001".parse().unwrap()));
        assert!(!p.acknowledge(b"ABCDEFG", "198.18.0.1:9999".parse().unwrap()));
        assert!(p.acknowledge(b"ABCDEFG", "198.18.0.1:8002".parse().unwrap()));
        p.poll(
            t0 + FIRST_RESEND + RESEND_EVERY,
            |m, d| sent.push((m.to_vec(), d)),
            &mut expired,
        );
        assert_eq!(sent, vec![(b"ABCDEFGY".to_vec(), dest)]);
        p.poll(t0 + MAX_PEER_ARRIVING_TIME, |_, _| {}, &mut expired);
        assert_eq!(expired, vec![(b"ABCDEFGY".to_vec(), dest)]);
        assert!(p.is_empty());
    }

    #[test]
    fn the_fuzz_seeds_pass_the_fuzz_harness() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/nts");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            crate::fuzzing::nts(&std::fs::read(entry.unwrap().path()).unwrap());
            n += 1;
        }
        assert!(n >= 5);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn any_id() -> impl Strategy<Value = PeerId> {
            any::<u64>().prop_map(PeerId::from_random)
        }

        proptest! {
            #[test]
            fn decoders_never_panic(d in proptest::collection::vec(any::<u8>(), 0..64),
                                    monitor: bool, from_splitter: bool) {
                let me = PeerId::from_random(7);
                let _ = ToSplitter::parse(&d, monitor);
                let _ = ToPeer::parse(&d, from_splitter, &me, monitor);
                let _ = decode_id(&d);
                let _ = decode_list2(&d);
            }

            #[test]
            fn the_fuzz_harness_holds(d in proptest::collection::vec(any::<u8>(), 0..40)) {
                crate::fuzzing::nts(&d);
            }

            #[test]
            fn list2_round_trips(entries in proptest::collection::vec(
                (any_id(), any::<[u8; 4]>(), any::<u16>(), any::<u16>()), 0..20)) {
                let entries: Vec<List2Entry> = entries.into_iter().map(|(id, ip, port, step)| {
                    List2Entry { id, endpoint: SocketAddrV4::new(ip.into(), port), port_step: step }
                }).collect();
                let mut out = Vec::new();
                encode_list2(&entries, &mut out).unwrap();
                prop_assert_eq!(out.len(), 2 + LIST2_ENTRY_LEN * entries.len());
                out.extend_from_slice(b"rest");
                let (back, used) = decode_list2(&out).unwrap().unwrap();
                prop_assert_eq!(back, entries);
                prop_assert_eq!(used, out.len() - 4);
            }

            #[test]
            fn splitter_messages_round_trip(id in any_id(), port: u16, done: bool, kind in 0u8..7) {
                let m = match kind {
                    0 => (ToSplitter::LossReport(port), false),
                    1 => (ToSplitter::Goodbye, false),
                    2 => (ToSplitter::Hello(id), false),
                    3 => (ToSplitter::MonitorSaw { id, port }, true),
                    4 => (ToSplitter::PortReport { id, port }, false),
                    5 => (ToSplitter::Incorporated { id, done }, false),
                    _ => (ToSplitter::MonitorSawRetry { id, port }, true),
                };
                let mut out = Vec::new();
                m.0.encode(&mut out);
                prop_assert_eq!(ToSplitter::parse(&out, m.1), m.0);
            }

            #[test]
            fn new_peer_round_trips(id in any_id(), me in any_id(), ip: [u8; 4], port: u16,
                                    step: u16, number: u16, extra: Option<u16>) {
                prop_assume!(id != me);
                let n = NewPeer { id, endpoint: SocketAddrV4::new(ip.into(), port), port_step: step,
                                  peer_number: number, extra_port: extra };
                let mut out = Vec::new();
                n.encode(&mut out);
                prop_assert_eq!(ToPeer::parse(&out, true, &me, false), ToPeer::NewPeer(n));
            }

            #[test]
            fn predicted_ports_are_bounded_and_above_base(base: u16, step in 1u16..=400, number in 0u16..100) {
                let ports = probable_source_ports(base, step, number);
                // Σ over divisors s of (⌈(step / s)·20 / Σ divisors⌉ + 2) ≤ 20 + 3 · divisors.
                let bound = 20 + 3 * divisors(step).len();
                prop_assert!(ports.len() <= bound, "{} ports, bound {bound}", ports.len());
                prop_assert!(ports.iter().all(|&p| p >= base));
            }
        }
    }
}
