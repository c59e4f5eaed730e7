//! The forwarding fallback (issue 11): for a pair of teammates that no NAT traversal method
//! connects (today any pair with a random-port symmetric NAT), the splitter sends the receiver
//! a copy of every chunk whose origin it cannot hear from, so that nobody is left without the
//! stream. Sans-IO: the two byte layouts and the splitter's bounded table of pairs.
//!
//! ```text
//! forward request, peer → splitter (reliable: resent until echoed):
//!   ID of the requester (7) | 'F' | ID of the origin it never heard from (7)      15 bytes
//! forwarded chunk, splitter → that peer only:
//!   the chunk datagram exactly as the origin got it (u16 number | payload [| signature]) | 'F'
//! ```
//!
//! Only a peer that asked gets forwarded chunks, so a reference peer never sees the trailing
//! byte; and a forwarded chunk is one byte longer than a chunk, so a peer of this project tells
//! it apart from the chunks it must relay: it plays a forwarded chunk and relays nothing (no
//! teammate's debt changes). A peer asks only after it has been a member for
//! [`FORWARD_AFTER`] without hearing from a teammate it was told of (list 2 or U2).
//!
//! The splitter takes a request only from the member that holds the requester's ID, at the
//! endpoint it is a member at, naming a member of the same team; anything else is counted and
//! dropped. The table is bounded ([`MAX_PAIRS`]), and pairs go when either peer leaves.

use std::collections::HashMap;
use std::time::Duration;

use super::Endpoint;
use super::nts::{ID_LEN, PeerId};

/// Length of a forward request.
pub const FORWARD_REQUEST_LEN: usize = 2 * ID_LEN + 1;
/// The byte between the two IDs of a forward request.
pub const FORWARD_TAG: u8 = b'F';
/// The byte after a forwarded chunk.
pub const FORWARD_MARK: u8 = b'F';
/// A member asks for forwarding this long after it learnt of a teammate it has not heard from
/// (the same patience as the incorporation's).
pub const FORWARD_AFTER: Duration = Duration::from_secs(4);
/// Most (origin, receiver) pairs one splitter shard forwards for.
pub const MAX_PAIRS: usize = 65536;

/// A peer asks the splitter to forward it the chunks of a teammate it cannot hear from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardRequest {
    /// The requester.
    pub me: PeerId,
    /// The teammate whose chunks it wants.
    pub origin: PeerId,
}

impl ForwardRequest {
    /// Decodes a forward request; `None` unless `d` is one.
    pub fn parse(d: &[u8]) -> Option<ForwardRequest> {
        if d.len() != FORWARD_REQUEST_LEN || d[ID_LEN] != FORWARD_TAG {
            return None;
        }
        Some(ForwardRequest {
            me: PeerId::from_bytes(&d[..ID_LEN])?,
            origin: PeerId::from_bytes(&d[ID_LEN + 1..])?,
        })
    }

    /// Encodes it into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.me.as_bytes());
        out.push(FORWARD_TAG);
        out.extend_from_slice(self.origin.as_bytes());
    }
}

/// Encodes the forwarded copy of chunk datagram `chunk` into `out` (cleared first).
pub fn encode_forwarded(chunk: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(chunk.len() + 1);
    out.extend_from_slice(chunk);
    out.push(FORWARD_MARK);
}

/// The chunk datagram inside a forwarded chunk `d`, whose chunk datagrams are `chunk_len` bytes
/// long; `None` unless `d` is a forwarded chunk.
pub fn parse_forwarded(d: &[u8], chunk_len: usize) -> Option<&[u8]> {
    (d.len() == chunk_len + 1 && d.last() == Some(&FORWARD_MARK)).then(|| &d[..chunk_len])
}

/// The pairs a splitter shard forwards for: by origin, the receivers of its chunks' copies, and
/// how many copies each receiver got.
#[derive(Debug, Default)]
pub struct ForwardTable {
    by_origin: HashMap<Endpoint, Vec<Endpoint>>,
    pairs: usize,
    forwarded: HashMap<Endpoint, u64>,
    /// Pairs refused because the table was full.
    pub refused: u64,
}

impl ForwardTable {
    /// Forwards `origin`'s chunks to `to` from now on; false when the pair was there already or
    /// the table is full (counted in `refused`).
    pub fn add(&mut self, origin: Endpoint, to: Endpoint) -> bool {
        if origin == to {
            return false;
        }
        let full = self.pairs >= MAX_PAIRS;
        let list = self.by_origin.entry(origin).or_default();
        if list.contains(&to) {
            return false;
        }
        if full {
            self.refused += 1;
            if list.is_empty() {
                self.by_origin.remove(&origin);
            }
            return false;
        }
        list.push(to);
        self.pairs += 1;
        self.forwarded.entry(to).or_insert(0);
        true
    }

    /// Stops forwarding `origin`'s chunks to `to`.
    pub fn remove_pair(&mut self, origin: Endpoint, to: Endpoint) {
        if let Some(l) = self.by_origin.get_mut(&origin)
            && let Some(i) = l.iter().position(|t| *t == to)
        {
            l.swap_remove(i);
            self.pairs -= 1;
            if l.is_empty() {
                self.by_origin.remove(&origin);
            }
        }
    }

    /// Forgets every pair `peer` is part of (it left).
    pub fn remove_peer(&mut self, peer: Endpoint) {
        if let Some(l) = self.by_origin.remove(&peer) {
            self.pairs -= l.len();
        }
        let mut gone = 0;
        self.by_origin.retain(|_, l| {
            let before = l.len();
            l.retain(|t| *t != peer);
            gone += before - l.len();
            !l.is_empty()
        });
        self.pairs -= gone;
        self.forwarded.remove(&peer);
    }

    /// The receivers of copies of `origin`'s chunks.
    pub fn targets(&self, origin: Endpoint) -> &[Endpoint] {
        self.by_origin.get(&origin).map_or(&[], |l| l.as_slice())
    }

    /// Counts a copy sent to `to`.
    pub fn count(&mut self, to: Endpoint) {
        *self.forwarded.entry(to).or_insert(0) += 1;
    }

    /// Copies sent to `to` so far (`None`: it gets none).
    pub fn forwarded(&self, to: Endpoint) -> Option<u64> {
        self.forwarded.get(&to).copied()
    }

    /// Pairs now.
    pub fn len(&self) -> usize {
        self.pairs
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::nts::testing::id;

    fn ep(p: u16) -> Endpoint {
        Endpoint::new(std::net::Ipv4Addr::new(198, 18, 0, 1), p)
    }

    #[test]
    fn request_layout() {
        let r = ForwardRequest {
            me: id("AAAAAAA"),
            origin: id("BBBBBBB"),
        };
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out, b"AAAAAAAFBBBBBBB");
        assert_eq!(ForwardRequest::parse(&out), Some(r));
        assert_eq!(ForwardRequest::parse(b"AAAAAAAXBBBBBBB"), None);
        assert_eq!(ForwardRequest::parse(b"AAAAAAAFbbbbbbb"), None);
        assert_eq!(ForwardRequest::parse(b"AAAAAAAFBBBBBB"), None);
    }

    #[test]
    fn forwarded_chunk_is_the_chunk_and_a_mark() {
        let chunk = [0u8, 7, 1, 2, 3];
        let mut out = Vec::new();
        encode_forwarded(&chunk, &mut out);
        assert_eq!(out, [0, 7, 1, 2, 3, b'F']);
        assert_eq!(parse_forwarded(&out, 5), Some(&chunk[..]));
        assert_eq!(parse_forwarded(&out, 6), None);
        assert_eq!(parse_forwarded(&chunk, 4), None, "no mark");
    }

    #[test]
    fn table_counts_and_forgets() {
        let mut t = ForwardTable::default();
        assert!(t.add(ep(1), ep(2)));
        assert!(!t.add(ep(1), ep(2)));
        assert!(!t.add(ep(1), ep(1)));
        assert!(t.add(ep(1), ep(3)));
        assert!(t.add(ep(3), ep(1)));
        assert_eq!(t.len(), 3);
        assert_eq!(t.targets(ep(1)), &[ep(2), ep(3)]);
        t.count(ep(2));
        assert_eq!(t.forwarded(ep(2)), Some(1));
        assert_eq!(t.forwarded(ep(3)), Some(0));
        t.remove_peer(ep(3));
        assert_eq!(t.len(), 1);
        assert_eq!(t.targets(ep(1)), &[ep(2)]);
        assert!(t.targets(ep(3)).is_empty());
        assert_eq!(t.forwarded(ep(3)), None);
    }

    /// A splitter core with members `A` and `B` (no monitors) in team 0 and `X` in team 1.
    fn splitter_with_members() -> (crate::proto::nts_splitter::NtsSplitter, std::time::Instant) {
        use crate::proto::nts_splitter::NtsSplitter;
        let t = std::time::Instant::now();
        let mut s = NtsSplitter::new(8);
        for (name, team, port) in [("AAAAAAA", 0, 1), ("BBBBBBB", 0, 2), ("XXXXXXX", 1, 3)] {
            let i = id(name);
            assert!(s.arrive(t, team, i, ep(port + 100), false));
            assert!(s.handle_datagram(t, ep(port), i.as_bytes()));
            let mut y = i.as_bytes().to_vec();
            y.push(b'Y');
            assert!(s.handle_datagram(t, ep(port), &y));
        }
        while s.poll_action().is_some() {}
        (s, t)
    }

    fn request(me: &str, origin: &str) -> Vec<u8> {
        let mut out = Vec::new();
        ForwardRequest {
            me: id(me),
            origin: id(origin),
        }
        .encode(&mut out);
        out
    }

    fn actions(s: &mut crate::proto::nts_splitter::NtsSplitter) -> Vec<String> {
        std::iter::from_fn(|| s.poll_action())
            .map(|a| format!("{a:?}"))
            .collect()
    }

    #[test]
    fn splitter_takes_requests_only_from_members_about_teammates() {
        let (mut s, t) = splitter_with_members();
        // A stranger, a forged sender, another team's peer, an unknown origin: nothing.
        for (from, bytes) in [
            (ep(9), request("AAAAAAA", "BBBBBBB")),
            (ep(2), request("AAAAAAA", "BBBBBBB")),
            (ep(1), request("AAAAAAA", "XXXXXXX")),
            (ep(1), request("AAAAAAA", "ZZZZZZZ")),
        ] {
            assert!(s.handle_datagram(t, from, &bytes));
            assert!(actions(&mut s).is_empty(), "{bytes:?} from {from}");
        }
        assert_eq!(s.counters().forward_refused, 4);
        // A asks for B's chunks: echoed, and the data plane is told (once).
        let r = request("AAAAAAA", "BBBBBBB");
        s.handle_datagram(t, ep(1), &r);
        let a = actions(&mut s);
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(a[1].contains("Forward") && a[1].contains(":2") && a[1].contains(":1"));
        s.handle_datagram(t, ep(1), &r);
        assert_eq!(actions(&mut s).len(), 1, "a repeat is only echoed");
        assert_eq!(s.counters().forward_requests, 1);
        // A flood of forged and stranger requests, and of U4 reports naming made-up IDs:
        // nothing for the members changes.
        let before = s.member_views();
        for k in 0..10_000u64 {
            let fake = PeerId::from_random(k);
            let mut r = Vec::new();
            ForwardRequest {
                me: fake,
                origin: id("BBBBBBB"),
            }
            .encode(&mut r);
            s.handle_datagram(t, ep(1 + (k % 3) as u16), &r);
            s.handle_datagram(t, ep(9), &request("AAAAAAA", "BBBBBBB"));
            let mut u4 = fake.as_bytes().to_vec();
            u4.extend_from_slice(&1u16.to_be_bytes());
            s.handle_datagram(t, ep(1), &u4);
        }
        assert!(
            actions(&mut s).iter().all(|a| a.starts_with("Send")),
            "echoes of U4 only"
        );
        assert_eq!(s.member_views(), before);
        assert_eq!(s.counters().forward_refused, 4 + 20_000);
        let views = s.member_views();
        let a_view = views.iter().find(|v| v.0 == id("AAAAAAA")).unwrap();
        assert_eq!(a_view.4, 1, "A is served one teammate forwarded");
    }

    #[test]
    fn a_newcomer_is_forwarded_at_once_to_capable_teammates_that_missed_it() {
        let (mut s, t) = splitter_with_members();
        // A takes forwarded chunks; B does not say so.
        s.handle_datagram(t, ep(1), &request("AAAAAAA", "AAAAAAA"));
        assert_eq!(actions(&mut s).len(), 1, "echo only");
        // C arrives; B hears it (U4), A does not.
        let c = id("CCCCCCC");
        assert!(s.arrive(t, 0, c, ep(104), false));
        s.handle_datagram(t, ep(4), c.as_bytes());
        let mut u4 = c.as_bytes().to_vec();
        u4.extend_from_slice(&4u16.to_be_bytes());
        s.handle_datagram(t, ep(2), &u4);
        let mut y = c.as_bytes().to_vec();
        y.push(b'Y');
        s.handle_datagram(t, ep(4), &y);
        let a = actions(&mut s);
        let fwd: Vec<&String> = a.iter().filter(|x| x.starts_with("Forward")).collect();
        assert_eq!(fwd.len(), 1, "{a:?}");
        assert!(
            fwd[0].contains(":4") && fwd[0].contains(":1"),
            "C's chunks to A"
        );
        // A hears C after all: forwarding stops.
        s.handle_datagram(t, ep(1), &u4);
        let a = actions(&mut s);
        assert!(a.iter().any(|x| x.starts_with("Unforward")), "{a:?}");
        // C leaves: nothing is left of it.
        s.remove(ep(4));
        assert!(s.member_views().iter().all(|v| v.4 == 0));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decoders_never_panic(d in proptest::collection::vec(any::<u8>(), 0..40),
                                    len in 0usize..40) {
                let _ = ForwardRequest::parse(&d);
                if let Some(c) = parse_forwarded(&d, len) {
                    prop_assert_eq!(c.len(), len);
                }
            }

            #[test]
            fn request_round_trips(a: u64, b: u64) {
                let r = ForwardRequest { me: PeerId::from_random(a), origin: PeerId::from_random(b) };
                let mut out = Vec::new();
                r.encode(&mut out);
                prop_assert_eq!(out.len(), FORWARD_REQUEST_LEN);
                prop_assert_eq!(ForwardRequest::parse(&out), Some(r));
            }

            #[test]
            fn table_pairs_match_the_lists(ops in proptest::collection::vec((0u16..6, 0u16..6, any::<bool>()), 0..60)) {
                let ep = |p| Endpoint::new(std::net::Ipv4Addr::LOCALHOST, p);
                let mut t = ForwardTable::default();
                for (a, b, add) in ops {
                    match (add, a % 2) {
                        (true, _) => { t.add(ep(a), ep(b)); }
                        (false, 0) => t.remove_peer(ep(a)),
                        (false, _) => t.remove_pair(ep(a), ep(b)),
                    }
                    let total: usize = (0..6).map(|o| t.targets(ep(o)).len()).sum();
                    prop_assert_eq!(total, t.len());
                }
            }
        }
    }
}
