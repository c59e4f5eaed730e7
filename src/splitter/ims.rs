//! `p2psp splitter --ims`: the splitter side of IMS (reference-notes §3.2, §6.1).
//!
//! The data path is the shards' as for DBS: each chunk is taken once from the ring and sent in
//! the same batched submission, only to one destination, the group ([`super::shard`]); the teams
//! still hold the members (counted, goodbyes confirmed) but are sent nothing. The join message is
//! [`ImsConfig`](crate::proto::ims::ImsConfig), written by the control plane; a reference IMS
//! peer sends no role byte, so a join connection that stays silent for [`SILENT_JOIN`] is taken
//! for one.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::Context;

use super::settings::Ims;

/// How long a connection to an IMS splitter may stay silent before it is taken for a reference
/// IMS peer's join (ours sends `P` at once, an HTTP client its `GET` at once).
pub const SILENT_JOIN: Duration = Duration::from_millis(300);

/// Sets the multicast options of a shard's socket: the TTL, the interface of `bind` when it is
/// not 0.0.0.0 (otherwise the route to the group decides), and loopback delivery on (peers on
/// the splitter's own host get the chunks too).
pub fn configure_socket(socket: &UdpSocket, bind: Ipv4Addr, ims: Ims) -> anyhow::Result<()> {
    let s = socket2::SockRef::from(socket);
    s.set_multicast_ttl_v4(ims.ttl)
        .context("cannot set the multicast TTL (--ims-ttl)")?;
    s.set_multicast_loop_v4(true)
        .context("cannot turn multicast loopback on")?;
    if !bind.is_unspecified() {
        s.set_multicast_if_v4(&bind)
            .with_context(|| format!("cannot send multicast from the interface of {bind}"))?;
    }
    Ok(())
}

/// Checks at start that the group can be reached from `bind` (a UDP `connect` looks the route
/// up), so that a host without a route for multicast fails with one line instead of counting
/// every chunk as a send drop.
pub fn check_route(bind: Ipv4Addr, ims: Ims) -> anyhow::Result<()> {
    let probe = UdpSocket::bind(SocketAddrV4::new(bind, 0))
        .with_context(|| format!("cannot bind a UDP socket to {bind}"))?;
    configure_socket(&probe, bind, ims)?;
    probe.connect(ims.group).map_err(|e| {
        anyhow::anyhow!(
            "--ims {}: no route to the group from {bind} ({e}): pass --bind with the LAN interface's address, or add a route (ip route add 224.0.0.0/4 dev IFACE)",
            ims.group
        )
    })?;
    Ok(())
}
