//! EMS, the End-point Masquerading Set (reference-notes §6.5), sans-IO: the 7-byte join message
//! that replaces the single NTS role byte, and the splitter's rewriting of list 2 and U2 for
//! peers behind the same NAT (same public address) so that they reach each other over their
//! LAN, without the NAT hair-pinning.
//!
//! ```text
//! TCP, peer → splitter, right after connecting (instead of 'P' / 'M'):
//!   IPv4 private address | u16 private port | 'P' or 'M'          7 bytes
//! ```
//!
//! Rewriting: to a receiver whose public address equals a teammate's, the splitter names that
//! teammate by its private endpoint, in list 2 (as the reference, `splitter_ems.cc:38`) and in
//! U2. The reference keeps the public port in U2 (`splitter_ems.cc:253`, `:288`), right only
//! when the NAT preserves ports; here U2 carries the private port too, and a port step of 0
//! (there is no NAT between the two). Byte layouts are unchanged.
//!
//! Not wired into the programs yet (`--ems`): see `docs/nat.md`.

use super::Endpoint;
use super::nts::{List2Entry, NewPeer, PeerId};
use super::wire::{ROLE_MONITOR, ROLE_PEER};

/// Length of the EMS join message.
pub const EMS_JOIN_LEN: usize = 7;

/// The EMS join message: the peer's private endpoint and role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmsJoin {
    /// The address and port the peer's UDP socket is bound to on its LAN.
    pub private: Endpoint,
    /// Whether it asks to be a monitor.
    pub monitor: bool,
}

impl EmsJoin {
    /// Decodes the start of a join connection: `Ok(None)` when more bytes are needed, `Err(())`
    /// when the seventh byte is neither `P` nor `M`.
    #[allow(clippy::result_unit_err)]
    pub fn decode(buf: &[u8]) -> Result<Option<EmsJoin>, ()> {
        let Some(b) = buf.get(..EMS_JOIN_LEN) else {
            return Ok(None);
        };
        let monitor = match b[6] {
            ROLE_PEER => false,
            ROLE_MONITOR => true,
            _ => return Err(()),
        };
        Ok(Some(EmsJoin {
            private: Endpoint::new(
                std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]),
                u16::from_be_bytes([b[4], b[5]]),
            ),
            monitor,
        }))
    }

    /// Encodes it.
    pub fn encode(&self) -> [u8; EMS_JOIN_LEN] {
        let ip = self.private.ip().octets();
        let port = self.private.port().to_be_bytes();
        let role = if self.monitor {
            ROLE_MONITOR
        } else {
            ROLE_PEER
        };
        [ip[0], ip[1], ip[2], ip[3], port[0], port[1], role]
    }
}

/// List 2 for a receiver at public address `receiver`: every entry with the same public address
/// is named by its private endpoint (`private_of` its ID), with port step 0.
pub fn rewrite_list2(
    entries: &mut [List2Entry],
    receiver: std::net::Ipv4Addr,
    private_of: impl Fn(&PeerId) -> Option<Endpoint>,
) {
    for e in entries {
        if *e.endpoint.ip() == receiver
            && let Some(p) = private_of(&e.id)
        {
            e.endpoint = p;
            e.port_step = 0;
        }
    }
}

/// U2 about a new peer whose public endpoint is `np.endpoint` and private one `private`, for a
/// receiver at public address `receiver`: behind the same NAT it names the private endpoint,
/// port included (the reference's U2 keeps the public port), with port step 0.
pub fn rewrite_new_peer(np: &mut NewPeer, receiver: std::net::Ipv4Addr, private: Option<Endpoint>) {
    if *np.endpoint.ip() == receiver
        && let Some(p) = private
    {
        np.endpoint = p;
        np.port_step = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_layout() {
        let j = EmsJoin {
            private: "192.168.1.10:4000".parse().unwrap(),
            monitor: false,
        };
        assert_eq!(j.encode(), [192, 168, 1, 10, 0x0f, 0xa0, b'P']);
        assert_eq!(EmsJoin::decode(&j.encode()), Ok(Some(j)));
        assert_eq!(EmsJoin::decode(&j.encode()[..6]), Ok(None));
        assert_eq!(EmsJoin::decode(&[1, 2, 3, 4, 5, 6, b'X']), Err(()));
        let m = EmsJoin { monitor: true, ..j };
        assert_eq!(m.encode()[6], b'M');
    }

    #[test]
    fn only_nat_mates_are_rewritten_port_included() {
        let nat: std::net::Ipv4Addr = "198.18.0.101".parse().unwrap();
        let mate = Endpoint::new(nat, 20001);
        let other: Endpoint = "198.18.0.102:5000".parse().unwrap();
        let private: Endpoint = "198.19.1.3:40000".parse().unwrap();
        let id = PeerId::from_random(1);
        let lookup = |_: &PeerId| Some(private);
        let mut list = vec![
            List2Entry {
                id,
                endpoint: mate,
                port_step: 1,
            },
            List2Entry {
                id,
                endpoint: other,
                port_step: 1,
            },
        ];
        rewrite_list2(&mut list, nat, lookup);
        assert_eq!(list[0].endpoint, private);
        assert_eq!(list[0].port_step, 0);
        assert_eq!(list[1].endpoint, other);
        let mut np = NewPeer {
            id,
            endpoint: mate,
            port_step: 3,
            peer_number: 2,
            extra_port: None,
        };
        rewrite_new_peer(&mut np, "198.18.0.102".parse().unwrap(), Some(private));
        assert_eq!(np.endpoint, mate, "another NAT's receiver: unchanged");
        rewrite_new_peer(&mut np, nat, Some(private));
        assert_eq!((np.endpoint, np.port_step), (private, 0));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decoder_never_panics_and_round_trips(d in proptest::collection::vec(any::<u8>(), 0..16)) {
                if let Ok(Some(j)) = EmsJoin::decode(&d) {
                    prop_assert_eq!(&j.encode()[..], &d[..EMS_JOIN_LEN]);
                }
            }

            #[test]
            fn join_round_trips(ip: [u8; 4], port: u16, monitor: bool) {
                let j = EmsJoin { private: Endpoint::new(ip.into(), port), monitor };
                prop_assert_eq!(EmsJoin::decode(&j.encode()), Ok(Some(j)));
            }
        }
    }
}
