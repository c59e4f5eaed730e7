//! Pollution attacks for tests (`p2psp peer --pollute MODE`, `docs/integrity.md`): the attack
//! models of the CIS papers (reference-notes §6.6) applied to what this peer sends. The protocol
//! core stays honest (the peer plays the real stream); only the datagrams on their way out are
//! changed, as a polluter's modified client would.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::proto::Endpoint;
use crate::proto::integrity::{SIGNATURE_LEN, complaint};
use crate::proto::wire::CHUNK_HEADER;

/// An attack model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pollute {
    /// Every chunk relayed is changed.
    Persistent,
    /// Changed for one second, honest for one second, and so on; honest first.
    OnOff,
    /// Changed only towards these teammates.
    Selective(Vec<SocketAddrV4>),
    /// An old valid chunk sent under the number of the new one.
    Replay,
    /// Honest relaying, but false complaints about every neighbour once a second.
    BadMouth,
    /// Digest mode: honest chunks, but every digest it would relay is dropped.
    DropDigest,
    /// Digest mode: honest chunks, but every digest it relays has a hash changed (so its
    /// signature fails).
    ForgeDigest,
    /// Digest mode: honest chunks, but instead of each digest it relays the first one it ever
    /// relayed (a valid signature, old chunk numbers).
    ReplayDigest,
}

impl std::str::FromStr for Pollute {
    type Err = String;

    fn from_str(s: &str) -> Result<Pollute, String> {
        Ok(match s {
            "persistent" => Pollute::Persistent,
            "on-off" => Pollute::OnOff,
            "replay" => Pollute::Replay,
            "bad-mouth" => Pollute::BadMouth,
            "drop-digest" => Pollute::DropDigest,
            "forge-digest" => Pollute::ForgeDigest,
            "replay-digest" => Pollute::ReplayDigest,
            _ => match s.strip_prefix("selective:") {
                Some(list) => Pollute::Selective(
                    list.split(',')
                        .map(|a| {
                            a.trim()
                                .parse()
                                .map_err(|_| format!("`{a}` is not an IPv4 ADDR:PORT"))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                None => {
                    return Err(format!(
                        "`{s}`: one of persistent, on-off, selective:ADDR:PORT,..., replay, bad-mouth, drop-digest, forge-digest, replay-digest"
                    ));
                }
            },
        })
    }
}

/// A polluter's state.
#[derive(Debug)]
pub struct Polluter {
    mode: Pollute,
    started: Instant,
    /// Length of a compat chunk datagram of the team (a signed one is 64 bytes longer).
    chunk_len: usize,
    /// The first chunk (or digest) this peer relayed, for `replay` (`replay-digest`).
    old: Option<Bytes>,
    next_bad_mouth: Instant,
    /// When the first bad datagram went out.
    pub first_bad: Option<Instant>,
}

impl Polluter {
    /// A polluter of a team whose compat chunk datagrams are `chunk_len` bytes long (signed ones,
    /// `chunk_len + 64`, are polluted alike).
    pub fn new(mode: Pollute, now: Instant, chunk_len: usize) -> Polluter {
        Polluter {
            mode,
            started: now,
            chunk_len,
            old: None,
            next_bad_mouth: now + Duration::from_secs(1),
            first_bad: None,
        }
    }

    /// The datagram to send instead of `payload` to `dest` (`None`: nothing).
    pub fn outgoing(&mut self, now: Instant, dest: Endpoint, payload: Bytes) -> Option<Bytes> {
        let is_digest = crate::proto::digest::Digest::parse(&payload).is_some()
            && payload.len() != self.chunk_len
            && payload.len() != self.chunk_len + SIGNATURE_LEN;
        if is_digest {
            return self.digest(now, payload);
        }
        if payload.len() != self.chunk_len && payload.len() != self.chunk_len + SIGNATURE_LEN {
            return Some(payload);
        }
        Some(self.chunk(now, dest, payload))
    }

    /// The digest attacks.
    fn digest(&mut self, now: Instant, payload: Bytes) -> Option<Bytes> {
        let out = match self.mode {
            Pollute::DropDigest => None,
            Pollute::ForgeDigest => {
                let mut v = payload.to_vec();
                v[8] ^= 0x5a;
                Some(Bytes::from(v))
            }
            Pollute::ReplayDigest => match &self.old {
                None => {
                    self.old = Some(payload.clone());
                    return Some(payload);
                }
                Some(old) if *old == payload => return Some(payload),
                Some(old) => Some(old.clone()),
            },
            _ => return Some(payload),
        };
        self.first_bad.get_or_insert(now);
        out
    }

    fn chunk(&mut self, now: Instant, dest: Endpoint, payload: Bytes) -> Bytes {
        let pollute = match &self.mode {
            Pollute::Persistent | Pollute::Replay => true,
            Pollute::OnOff => now.duration_since(self.started).as_secs() % 2 == 1,
            Pollute::Selective(targets) => targets.contains(&dest),
            Pollute::BadMouth
            | Pollute::DropDigest
            | Pollute::ForgeDigest
            | Pollute::ReplayDigest => false,
        };
        if !pollute {
            return payload;
        }
        let mut bad = match (&self.mode, &self.old) {
            (Pollute::Replay, None) => {
                // Keep the first chunk to replay it later; this one goes out as it is.
                self.old = Some(payload.clone());
                return payload;
            }
            (Pollute::Replay, Some(old)) if old[..2] == payload[..2] => return payload,
            (Pollute::Replay, Some(old)) => {
                let mut v = old.to_vec();
                v[..CHUNK_HEADER].copy_from_slice(&payload[..CHUNK_HEADER]);
                v
            }
            _ => {
                let mut v = payload.to_vec();
                for b in &mut v[CHUNK_HEADER..CHUNK_HEADER + 16] {
                    *b ^= 0x5a;
                }
                v
            }
        };
        bad.truncate(payload.len());
        self.first_bad.get_or_insert(now);
        Bytes::from(bad)
    }

    /// Bad-mouthing: false complaints about `neighbours`, once a second.
    pub fn bad_mouth(
        &mut self,
        now: Instant,
        neighbours: impl Iterator<Item = Endpoint>,
    ) -> Vec<Bytes> {
        if self.mode != Pollute::BadMouth || now < self.next_bad_mouth {
            return Vec::new();
        }
        self.next_bad_mouth = now + Duration::from_secs(1);
        let out: Vec<Bytes> = neighbours
            .map(|n| Bytes::copy_from_slice(&complaint(n, 0)))
            .collect();
        if !out.is_empty() {
            self.first_bad.get_or_insert(now);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new([127, 0, 0, 1].into(), port)
    }

    fn chunk(n: u16) -> Bytes {
        let mut v = n.to_be_bytes().to_vec();
        v.extend_from_slice(&[n as u8; 64]);
        Bytes::from(v)
    }

    #[test]
    fn modes_parse() {
        assert_eq!("persistent".parse(), Ok(Pollute::Persistent));
        assert_eq!(
            "selective:127.0.0.1:5,127.0.0.1:6".parse(),
            Ok(Pollute::Selective(vec![ep(5), ep(6)]))
        );
        assert!("selective:nope".parse::<Pollute>().is_err());
        assert!("sometimes".parse::<Pollute>().is_err());
    }

    #[test]
    fn each_mode_changes_what_it_should() {
        let now = Instant::now();
        let mut p = Polluter::new(Pollute::Persistent, now, 66);
        assert_ne!(p.outgoing(now, ep(1), chunk(1)), Some(chunk(1)));
        assert_eq!(
            p.outgoing(now, ep(1), Bytes::from_static(b"H")).unwrap(),
            &b"H"[..]
        );
        assert_eq!(p.first_bad, Some(now));
        // A signed chunk (64 bytes longer) is polluted alike and keeps its length.
        let mut signed = chunk(3).to_vec();
        signed.extend_from_slice(&[0; SIGNATURE_LEN]);
        let r = p.outgoing(now, ep(1), Bytes::from(signed.clone())).unwrap();
        assert!(r.len() == signed.len() && r != signed);

        let mut p = Polluter::new(Pollute::OnOff, now, 66);
        assert_eq!(p.outgoing(now, ep(1), chunk(1)), Some(chunk(1)));
        let later = now + Duration::from_millis(1500);
        assert_ne!(p.outgoing(later, ep(1), chunk(2)), Some(chunk(2)));

        let mut p = Polluter::new(Pollute::Selective(vec![ep(2)]), now, 66);
        assert_eq!(p.outgoing(now, ep(1), chunk(1)), Some(chunk(1)));
        assert_ne!(p.outgoing(now, ep(2), chunk(1)), Some(chunk(1)));

        let mut p = Polluter::new(Pollute::Replay, now, 66);
        assert_eq!(p.outgoing(now, ep(1), chunk(1)), Some(chunk(1)));
        let r = p.outgoing(now, ep(1), chunk(7)).unwrap();
        assert_eq!(&r[..2], &7u16.to_be_bytes());
        assert_eq!(&r[2..], &chunk(1)[2..]);

        let mut p = Polluter::new(Pollute::BadMouth, now, 66);
        assert_eq!(p.outgoing(now, ep(1), chunk(1)), Some(chunk(1)));
        assert!(p.bad_mouth(now, [ep(1)].into_iter()).is_empty());
        let t = now + Duration::from_secs(1);
        assert_eq!(p.bad_mouth(t, [ep(1), ep(2)].into_iter()).len(), 2);
    }

    #[test]
    fn digest_attacks_touch_digests_only() {
        use crate::proto::digest::{chunk_hash, sign_digest};
        let s = crate::proto::integrity::ChunkSigner::from_secret(&[1; 32]);
        let d = |n: u16| Bytes::from(sign_digest(&s, u32::from(n), &[chunk_hash(&chunk(n))]));
        let now = Instant::now();
        for mode in ["drop-digest", "forge-digest", "replay-digest"] {
            let mut p = Polluter::new(mode.parse().unwrap(), now, 66);
            assert_eq!(p.outgoing(now, ep(1), chunk(1)), Some(chunk(1)), "{mode}");
            let first = p.outgoing(now, ep(1), d(1));
            let second = p.outgoing(now, ep(1), d(2));
            match mode {
                "drop-digest" => assert_eq!((first, second), (None, None)),
                "forge-digest" => {
                    let f = second.unwrap();
                    assert!(f.len() == d(2).len() && f != d(2));
                    assert!(
                        !s.verifier()
                            .verify_bytes(&f[..f.len() - 64], &f[f.len() - 64..])
                    );
                }
                _ => assert_eq!((first, second), (Some(d(1)), Some(d(1)))),
            }
            assert!(p.first_bad.is_some(), "{mode}");
        }
    }
}
