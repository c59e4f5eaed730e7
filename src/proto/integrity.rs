//! CIS (reference-notes §6.6): signed chunks and complaints about polluters (`docs/integrity.md`).
//!
//! In a signed team every chunk datagram carries an Ed25519 signature of the splitter after the
//! payload: `u16 chunk number ‖ chunk-size payload ‖ 64-byte signature`, the signature over the
//! first `2 + chunk size` bytes (the compat datagram). The splitter signs each chunk once for all
//! its teams; relays carry the signature byte-identical. Nothing here changes a compat team: the
//! datagram grows only when the splitter runs with `--sign`, and a peer verifies only when it was
//! given the splitter's key.
//!
//! A peer that receives a chunk whose signature fails drops it, stops taking anything from its
//! sender and complains to the splitter with a [`complaint`] datagram:
//!
//! ```text
//! "BAD" | IPv4 of the accused | u16 port | u16 chunk number      (11 bytes)
//! ```
//!
//! UDP messages are told apart by length (reference-notes §4.1): the reference splitter knows
//! 1-byte goodbyes and 2-byte loss reports, NTS uses 9-, 13- and 17-byte messages and STrPe's
//! trusted-peer hash 34 bytes; 11 bytes is none of them, and the `BAD` tag keeps a stray 11-byte
//! datagram from passing as a complaint. A compat splitter of this project counts it as
//! malformed; only a signing splitter acts on it.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use super::Endpoint;

/// Bytes a signed team adds to every chunk datagram.
pub const SIGNATURE_LEN: usize = 64;
/// Length of a complaint datagram.
pub const COMPLAINT_LEN: usize = 11;
/// The first bytes of a complaint.
pub const COMPLAINT_TAG: &[u8; 3] = b"BAD";

/// The splitter's signing key.
#[derive(Clone)]
pub struct ChunkSigner(SigningKey);

impl std::fmt::Debug for ChunkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "ChunkSigner({})", self.public_hex())
    }
}

impl ChunkSigner {
    /// The signer of a 32-byte Ed25519 secret key.
    pub fn from_secret(secret: &[u8; 32]) -> ChunkSigner {
        ChunkSigner(SigningKey::from_bytes(secret))
    }

    /// The public key, for peers' `--splitter-key`.
    pub fn verifier(&self) -> ChunkVerifier {
        ChunkVerifier(self.0.verifying_key())
    }

    /// The public key as 64 hex digits.
    pub fn public_hex(&self) -> String {
        hex(self.0.verifying_key().as_bytes())
    }

    /// The signature of `bytes` (a digest, `super::digest`).
    pub fn sign_bytes(&self, bytes: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(bytes).to_bytes()
    }

    /// Appends the signature of `datagram` (a compat chunk datagram) to it.
    pub fn sign_datagram(&self, datagram: &mut Vec<u8>) {
        let sig = self.0.sign(datagram);
        datagram.extend_from_slice(&sig.to_bytes());
    }
}

/// The splitter's public key, as a peer pins it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkVerifier(VerifyingKey);

impl ChunkVerifier {
    /// Parses 64 hex digits (as `p2psp splitter --sign` prints them).
    pub fn from_hex(s: &str) -> Result<ChunkVerifier, String> {
        let s = s.trim();
        let bytes = unhex(s).ok_or_else(|| format!("{s:?} is not 64 hex digits"))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| format!("{s} is not an Ed25519 public key"))?;
        Ok(ChunkVerifier(key))
    }

    /// Whether `datagram` (compat chunk ‖ signature) carries a valid signature of the splitter.
    pub fn verify(&self, datagram: &[u8]) -> bool {
        let Some(at) = datagram.len().checked_sub(SIGNATURE_LEN) else {
            return false;
        };
        let (signed, sig) = datagram.split_at(at);
        let sig = Signature::from_bytes(sig.try_into().expect("split at SIGNATURE_LEN"));
        self.0.verify(signed, &sig).is_ok()
    }

    /// Whether `sig` is a valid signature of the splitter over `signed`.
    pub fn verify_bytes(&self, signed: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = <&[u8; SIGNATURE_LEN]>::try_from(sig) else {
            return false;
        };
        self.0.verify(signed, &Signature::from_bytes(sig)).is_ok()
    }

    /// The public key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex(self.0.as_bytes())
    }
}

/// Encodes a complaint about `accused`, which sent a bad chunk `number`.
pub fn complaint(accused: Endpoint, number: u16) -> [u8; COMPLAINT_LEN] {
    let mut out = [0u8; COMPLAINT_LEN];
    out[..3].copy_from_slice(COMPLAINT_TAG);
    out[3..7].copy_from_slice(&accused.ip().octets());
    out[7..9].copy_from_slice(&accused.port().to_be_bytes());
    out[9..].copy_from_slice(&number.to_be_bytes());
    out
}

/// Decodes a complaint: the accused and the chunk number.
pub fn parse_complaint(d: &[u8]) -> Option<(Endpoint, u16)> {
    if d.len() != COMPLAINT_LEN || &d[..3] != COMPLAINT_TAG {
        return None;
    }
    let ip = std::net::Ipv4Addr::new(d[3], d[4], d[5], d[6]);
    let port = u16::from_be_bytes([d[7], d[8]]);
    Some((Endpoint::new(ip, port), u16::from_be_bytes([d[9], d[10]])))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex digits to 32 bytes.
pub fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::{ToSplitter, encode_chunk};

    #[test]
    fn a_signed_chunk_verifies_and_any_change_fails() {
        let s = ChunkSigner::from_secret(&[7; 32]);
        let v = ChunkVerifier::from_hex(&s.public_hex()).unwrap();
        assert_eq!(v, s.verifier());
        let mut d = Vec::new();
        encode_chunk(0x1234, &[9; 1024], &mut d);
        s.sign_datagram(&mut d);
        assert_eq!(d.len(), 2 + 1024 + SIGNATURE_LEN);
        assert!(v.verify(&d));
        for at in [0, 1, 2, 500, 1025, 1026, d.len() - 1] {
            let mut bad = d.clone();
            bad[at] ^= 1;
            assert!(!v.verify(&bad), "flipped byte {at}");
        }
        // An old chunk under a new number (replay) fails too.
        let mut replay = d.clone();
        replay[..2].copy_from_slice(&0x1235u16.to_be_bytes());
        assert!(!v.verify(&replay));
        assert!(!v.verify(&d[..10]));
        let other = ChunkSigner::from_secret(&[8; 32]).verifier();
        assert!(!other.verify(&d));
    }

    #[test]
    fn keys_in_hex() {
        assert!(ChunkVerifier::from_hex("12").is_err());
        assert!(ChunkVerifier::from_hex(&"zz".repeat(32)).is_err());
        let s = ChunkSigner::from_secret(&[1; 32]);
        assert_eq!(s.public_hex().len(), 64);
        assert!(!format!("{s:?}").contains(&hex(&[1; 32])));
    }

    #[test]
    fn complaints_round_trip_and_have_a_length_of_their_own() {
        let ep: Endpoint = "10.1.2.3:4567".parse().unwrap();
        let c = complaint(ep, 65535);
        assert_eq!(c.len(), COMPLAINT_LEN);
        assert_eq!(parse_complaint(&c), Some((ep, 65535)));
        assert_eq!(parse_complaint(&[0; COMPLAINT_LEN]), None);
        assert_eq!(parse_complaint(&c[..10]), None);
        assert_eq!(
            ToSplitter::parse(&c),
            ToSplitter::Complaint {
                accused: ep,
                number: 65535
            }
        );
        assert_eq!(
            ToSplitter::parse(&[0; COMPLAINT_LEN]),
            ToSplitter::Malformed
        );
    }
}
