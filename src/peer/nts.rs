//! `p2psp peer --nts`: the peer side of NTS (reference-notes §6.4) over real sockets, around the
//! sans-IO [`NtsPeer`]: reading the ID after the configuration, the incorporation (U1, list 2,
//! hellos, `Y`) before the DBS session starts, and telling a splitter of the other profile apart.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;

use crate::proto::Endpoint;
use crate::proto::nts::{ID_LEN, MAX_PEER_ARRIVING_TIME, PeerId, decode_id, decode_list2};
use crate::proto::nts_peer::{NtsPeer, NtsPeerAction, NtsPeerCounters, Reached};
use crate::proto::nts_probe::{RENDEZVOUS_LEN, Rendezvous};
use crate::proto::peer::Peer;
use crate::proto::wire::{HELLO, JoinConfig};

/// How long an NTS peer waits for the ID after the configuration. Our compat splitter closes
/// the connection 3 s after the configuration; a reference compat splitter at once.
const ID_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after list 2 a peer waits for hellos from every peer in it before saying `Y` anyway.
pub const PATIENCE: Duration = Duration::from_secs(4);
/// How long after list 2 a peer that heard some of it (or has no retry left) says `Y` without
/// waiting for the rest ([`NtsPeer::set_early_y`]): it keeps (and relays to) the teammates it
/// heard from then on, and greets the others on as a member. The teammates that answer at
/// once (cone NATs; others whose hello got through first) have answered by then.
pub const EARLY_Y: Duration = Duration::from_secs(1);

/// The NTS state of one team session.
#[derive(Debug)]
pub struct NtsSession {
    /// The protocol core.
    pub core: NtsPeer,
    /// Teammates reached during the incorporation, for the DBS peer.
    pub neighbours: Vec<(Endpoint, Reached)>,
    /// The splitter's chunk that made us a member before the echo of our `Y` (at most one:
    /// the incorporation ends with it), for the DBS peer to play and relay.
    early: Vec<(Endpoint, Vec<u8>)>,
    /// When the incorporation took (from the ID to the echo of `Y`, or to the first chunk).
    pub incorporation: Duration,
    /// Port probing (issue 11; not at monitors).
    pub probe: Option<super::nts_probe::ProbeIo>,
}

fn wrong_profile_nts(splitter: SocketAddrV4, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the splitter at {splitter} does not run NTS ({what}): run this peer without --nts, or the splitter with --nts"
    )
}

/// Reads the 7-byte ID that follows the configuration under NTS (`rest` holds the bytes read
/// after the configuration so far).
pub fn read_id(
    tcp: &mut TcpStream,
    mut rest: Vec<u8>,
    splitter: SocketAddrV4,
) -> anyhow::Result<PeerId> {
    let deadline = Instant::now() + ID_TIMEOUT;
    tcp.set_read_timeout(Some(Duration::from_millis(100)))?;
    loop {
        match decode_id(&rest) {
            Ok(Some(id)) => {
                rest.drain(..ID_LEN);
                if !rest.is_empty() {
                    bail!(wrong_profile_nts(splitter, "it sent more than a peer ID"));
                }
                return Ok(id);
            }
            Ok(None) => {}
            Err(_) => bail!(wrong_profile_nts(
                splitter,
                "what followed its configuration is no peer ID"
            )),
        }
        if Instant::now() >= deadline {
            bail!(wrong_profile_nts(
                splitter,
                "it sent no peer ID after its configuration"
            ));
        }
        let mut b = [0u8; 64];
        match tcp.read(&mut b) {
            Ok(0) => bail!(wrong_profile_nts(
                splitter,
                "it closed the join connection without sending a peer ID"
            )),
            Ok(n) => rest.extend_from_slice(&b[..n]),
            Err(e) if crate::io_util::is_transient(&e) => {}
            Err(e) => bail!(wrong_profile_nts(
                splitter,
                &format!("reading the peer ID: {e}")
            )),
        }
    }
}

/// A compat peer: fails with one line if the splitter sent a peer ID after the configuration
/// (it runs NTS and would never send this peer a chunk).
pub fn refuse_nts_splitter(
    tcp: &mut TcpStream,
    rest: &[u8],
    splitter: SocketAddrV4,
) -> anyhow::Result<()> {
    let mut bytes = rest.to_vec();
    if bytes.len() < ID_LEN {
        // The NTS splitter writes the configuration and the ID at once; look without waiting.
        tcp.set_nonblocking(true)?;
        let mut b = [0u8; 64];
        if let Ok(n) = tcp.read(&mut b) {
            bytes.extend_from_slice(&b[..n]);
        }
        tcp.set_nonblocking(false)?;
    }
    if bytes.len() >= ID_LEN && PeerId::from_bytes(&bytes[..ID_LEN]).is_some() {
        bail!(
            "the splitter at {splitter} runs NTS (it sent a peer ID after its configuration): run this peer with --nts, or the splitter without it"
        );
    }
    Ok(())
}

/// Carries out the core's actions; true when it asked for a new socket
/// ([`NtsPeerAction::Rebind`], during the incorporation only).
fn send_all(
    core: &mut NtsPeer,
    socket: &UdpSocket,
    mut probe: Option<&mut super::nts_probe::ProbeIo>,
    mut neighbour: impl FnMut(Endpoint, Reached),
) -> bool {
    let mut rebind = false;
    while let Some(a) = core.poll_action() {
        match a {
            NtsPeerAction::Send { to, data } => {
                let s = probe.as_deref().map_or(socket, |p| p.route(socket, to));
                let _ = s.send_to(&data, to);
            }
            NtsPeerAction::Neighbour { id, endpoint, how } => {
                // A hello during a probing session with it: one of the probes got through.
                let how = match probe.as_deref_mut() {
                    Some(p) => {
                        let probing = p.core.probing(&id);
                        p.core.note_heard(id);
                        if probing { Reached::Probed } else { how }
                    }
                    None => how,
                };
                neighbour(endpoint, how)
            }
            NtsPeerAction::Incorporated { missing } => {
                if missing > 0 {
                    tracing::info!(
                        "NTS: {missing} teammate(s) not heard yet; joining, greeting them on as a member (the splitter forwards their chunks meanwhile)"
                    );
                }
            }
            NtsPeerAction::Rebind => rebind = true,
        }
    }
    rebind
}

/// A new UDP socket for a retry, on the address of `old` and another port (bound while `old`
/// still is, so the kernel picks a different one), set up as the join's.
fn rebind(old: &UdpSocket, chunk: usize) -> anyhow::Result<(UdpSocket, SocketAddrV4)> {
    let SocketAddr::V4(at) = old.local_addr()? else {
        bail!("not an IPv4 socket")
    };
    let new = crate::driver::udp_socket(
        SocketAddrV4::new(*at.ip(), 0),
        false,
        Some(4 << 20),
        Some(4 << 20),
    )?;
    new.set_nonblocking(false)?;
    let _ = crate::driver::set_dont_fragment(&new, chunk);
    let SocketAddr::V4(local) = new.local_addr()? else {
        bail!("not an IPv4 socket")
    };
    Ok((new, local))
}

fn log_rendezvous(r: &Rendezvous) {
    tracing::debug!(
        "NTS: probing session {} for teammate {}: {:?} {} step {} count {} rate {}",
        r.session,
        r.other,
        r.method,
        r.endpoint,
        r.step,
        r.count,
        r.rate
    );
}

/// Port probing for a peer whose team socket is bound to `local`, only where its rendezvous
/// cannot be a chunk (not at monitors).
fn probe_io(
    now: Instant,
    id: PeerId,
    splitter: SocketAddrV4,
    local: SocketAddrV4,
    config: &JoinConfig,
    monitor: bool,
) -> Option<super::nts_probe::ProbeIo> {
    (!monitor
        && usize::from(config.chunk_size) + crate::proto::wire::CHUNK_HEADER != RENDEZVOUS_LEN)
        .then(|| super::nts_probe::ProbeIo::new(now, id, splitter, local))
}

/// Runs the NTS incorporation: U1 to the splitter and the monitors, list 2 from the join
/// connection, hellos, then `Y` until the splitter echoes it; closes the join connection.
///
/// `Y` goes once every peer of list 2 was heard, or [`EARLY_Y`] after list 2 if one was heard
/// (the rest are greeted on as a member). With `retries` > 0, a peer that has heard no peer of
/// list 2 when its patience is up retries from a new UDP socket (`N`): `socket` and `local` are
/// replaced by the new one's, the old one is closed, and list 2 is read again from `tcp`; with
/// no retries it says `Y` at [`EARLY_Y`] whatever it heard.
#[allow(clippy::too_many_arguments)]
pub fn incorporate(
    tcp: &mut TcpStream,
    socket: &mut UdpSocket,
    local: &mut SocketAddrV4,
    config: &JoinConfig,
    id: PeerId,
    splitter: SocketAddrV4,
    monitor: bool,
    retries: u8,
) -> anyhow::Result<NtsSession> {
    let start = Instant::now();
    let mut deadline = start + MAX_PEER_ARRIVING_TIME + PATIENCE;
    let mut core = NtsPeer::new(start, id, splitter, &config.peers, monitor, PATIENCE);
    core.set_retries(retries);
    core.set_early_y(Some(EARLY_Y));
    let mut neighbours = Vec::new();
    let mut probe = probe_io(start, id, splitter, *local, config, monitor);
    let mut udp = socket.try_clone()?;
    udp.set_read_timeout(Some(Duration::from_millis(10)))?;
    tcp.set_nonblocking(true)?;
    let mut input = Vec::new();
    let mut eof = false;
    let mut buf = vec![0u8; 65536];
    let mut early = Vec::new();
    loop {
        let now = Instant::now();
        if let Some(p) = &mut probe {
            p.pump(&udp, |id, ep| core.add_probed(now, id, ep));
        }
        let wants_rebind = send_all(&mut core, &udp, probe.as_mut(), |e, h| {
            neighbours.push((e, h))
        });
        if wants_rebind {
            let datagram = crate::proto::wire::CHUNK_HEADER + usize::from(config.chunk_size);
            let (new, at) = rebind(socket, datagram)?;
            tracing::info!(
                "NTS: no teammate said hello within {PATIENCE:?}: retry {} of {retries} from {at} (was {local})",
                core.counters().retries + 1
            );
            // The old socket closes here (both handles): nothing more is read from it.
            *socket = new;
            *local = at;
            udp = socket.try_clone()?;
            udp.set_read_timeout(Some(Duration::from_millis(10)))?;
            // Teammates found through the old socket are not reached through the new one.
            neighbours.clear();
            probe = probe_io(now, id, splitter, at, config, monitor);
            core.rebound(now);
            deadline = now + MAX_PEER_ARRIVING_TIME + PATIENCE;
            continue;
        }
        if core.is_member() {
            break;
        }
        if now >= deadline {
            bail!(
                "NTS: the splitter at {splitter} did not incorporate this peer within {:?} (is a NAT or firewall dropping its UDP?)",
                deadline - start
            );
        }
        if !eof && !core.has_list2() {
            let mut b = [0u8; 4096];
            match tcp.read(&mut b) {
                Ok(0) => eof = true,
                Ok(n) => input.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => eof = true,
            }
            match decode_list2(&input) {
                Ok(Some((list, used))) => {
                    // A retry gets list 2 again: the next one starts after this one.
                    input.drain(..used);
                    core.on_list2(now, &list)
                }
                Ok(None) if eof => bail!(
                    "NTS: the splitter at {splitter} closed the join connection before sending the list of peers"
                ),
                Ok(None) => {}
                Err(e) => {
                    bail!("NTS: the splitter at {splitter} sent a malformed list of peers: {e}")
                }
            }
        }
        match udp.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(from))) => {
                match (&mut probe, Rendezvous::parse(&buf[..n])) {
                    (Some(p), Some(r)) if from == splitter => {
                        log_rendezvous(&r);
                        p.core.on_rendezvous(now, r)
                    }
                    // Chunks relayed before we are a member are dropped: playout has not started.
                    // But a chunk from the splitter that made us a member (a reference splitter
                    // sends chunks before the echo of our `Y`) is ours to relay: the DBS peer
                    // takes it first thing.
                    _ => {
                        if !core.handle_datagram(now, from, &buf[..n])
                            && core.is_member()
                            && from == splitter
                        {
                            early.push((from, buf[..n].to_vec()));
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) if crate::io_util::is_transient(&e) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(p) = &mut probe {
            for (from, d) in p.recv(now, &mut buf) {
                core.handle_datagram(now, from, &d);
            }
            p.core.handle_timeout(Instant::now());
        }
        core.handle_timeout(Instant::now());
    }
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    Ok(NtsSession {
        core,
        neighbours,
        early,
        incorporation: start.elapsed(),
        probe,
    })
}

impl NtsSession {
    /// Hands the teammates found during the incorporation to the DBS peer, and drops the DBS
    /// hellos it queued for the monitors (under NTS, teammates learn of each other by ID).
    pub fn start(&mut self, now: Instant, dbs: &mut Peer) {
        while dbs.poll_transmit().is_some() {}
        for &(ep, _) in &self.neighbours {
            dbs.handle_datagram(now, ep, Bytes::from_static(HELLO));
        }
        for (from, chunk) in self.early.drain(..) {
            dbs.handle_datagram(now, from, Bytes::from(chunk));
        }
    }

    /// A datagram for NTS: handles it and returns true; false when it is for DBS.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: Endpoint,
        data: &[u8],
        socket: &UdpSocket,
        dbs: &mut Peer,
    ) -> bool {
        if let (Some(p), true) = (&mut self.probe, from == self.core.splitter()) {
            if let Some(r) = Rendezvous::parse(data) {
                log_rendezvous(&r);
                p.core.on_rendezvous(now, r);
                self.pump(now, socket, dbs);
                return true;
            }
        }
        if !self.core.handle_datagram(now, from, data) {
            return false;
        }
        self.pump(now, socket, dbs);
        true
    }

    /// Resends what is due.
    pub fn handle_timeout(&mut self, now: Instant, socket: &UdpSocket, dbs: &mut Peer) {
        self.core.handle_timeout(now);
        if let Some(p) = &mut self.probe {
            p.core.handle_timeout(now);
        }
        self.pump(now, socket, dbs);
    }

    /// What arrived at the probe sockets for the team (a kept socket's teammate), for the
    /// caller to take as if it came on the team socket.
    pub fn probe_datagrams(&mut self, now: Instant, buf: &mut [u8]) -> Vec<(Endpoint, Vec<u8>)> {
        self.probe
            .as_mut()
            .map(|p| p.recv(now, buf))
            .unwrap_or_default()
    }

    /// The socket to send to `to` from (a kept probe socket, or `main`).
    pub fn route<'a>(&'a self, main: &'a UdpSocket, to: Endpoint) -> &'a UdpSocket {
        self.probe.as_ref().map_or(main, |p| p.route(main, to))
    }

    fn pump(&mut self, now: Instant, socket: &UdpSocket, dbs: &mut Peer) {
        if let Some(p) = &mut self.probe {
            let core = &mut self.core;
            p.pump(socket, |id, ep| core.add_probed(now, id, ep));
        }
        let neighbours = &mut self.neighbours;
        // A member never retries: `Rebind` comes only before `Y`.
        let _ = send_all(&mut self.core, socket, self.probe.as_mut(), |ep, how| {
            neighbours.push((ep, how));
            dbs.handle_datagram(now, ep, Bytes::from_static(HELLO));
        });
    }

    /// How each teammate is reached, for status pages.
    pub fn detail(&self) -> super::status::NtsDetail {
        super::status::NtsDetail {
            id: self.core.id().to_string(),
            teammates: self
                .core
                .teammates()
                .into_iter()
                .map(|(id, ep, how, step)| (id.to_string(), ep, how.map(Reached::name), step))
                .collect(),
            forward_requests: self.core.counters().forward_requests,
            retries: self.core.counters().retries,
        }
    }

    /// Counters of the NTS core.
    pub fn counters(&self) -> &NtsPeerCounters {
        self.core.counters()
    }
}
