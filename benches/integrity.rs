//! CIS costs per 1024-byte chunk (`docs/integrity.md`): what the splitter pays to sign a chunk
//! once for all its teams, and what a peer pays to check one before it plays or relays it.
//!
//! - `sign`: one Ed25519 signature over a compat chunk datagram (1026 bytes).
//! - `verify`: one signature check, as a peer does per chunk with per-chunk signatures.
//! - `verify_batch/N`: N signatures checked together (ed25519-dalek's batch verification), per
//!   chunk: what a peer would pay if it held chunks back to check them in groups.
//! - `sha256` / `sha512`: hashing one chunk, the per-chunk part of a signed digest per group of
//!   chunks (one signature per group, a hash per chunk).
//! - `peer_round_of_16/{compat,signed,digest}`: the whole peer core per datagram received (as
//!   `benches/relay.rs` `round_of_16`: one chunk from the splitter, 15 from neighbours, relays and
//!   plays), without and with `PeerRules::verify`, per-chunk signatures (`signed`) or one digest
//!   per round of 16 chunks (`digest`): what verification adds to a peer's work.
//! - `integrity/digest_verify/G`: a peer's CIS cost per chunk in digest mode with groups of G
//!   chunks: one digest signature check per group plus one SHA-256 per chunk.
//! - `integrity/digest_sign/G`: the splitter's cost per chunk: one SHA-256 per chunk plus one
//!   signature per group of G.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;

use bytes::Bytes;
use criterion::BatchSize;
use p2psp::proto::Endpoint;
use p2psp::proto::peer::{Peer, PeerRules};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use p2psp::proto::digest::{self as dg, DigestBook, DigestCheck, DigestGrouper};
use p2psp::proto::integrity::ChunkSigner;
use p2psp::proto::wire::encode_chunk;
use sha2::Digest;

const CHUNK_SIZE: usize = 1024;

fn datagram(n: u16) -> Vec<u8> {
    let mut d = Vec::new();
    let payload: Vec<u8> = (0..CHUNK_SIZE).map(|i| (i as u16 ^ n) as u8).collect();
    encode_chunk(n, &payload, &mut d);
    d
}

fn bench(c: &mut Criterion) {
    let secret = [42u8; 32];
    let signer = ChunkSigner::from_secret(&secret);
    let verifier = signer.verifier();
    let key = SigningKey::from_bytes(&secret);
    let public: VerifyingKey = key.verifying_key();
    let mut g = c.benchmark_group("integrity");
    g.throughput(Throughput::Elements(1));
    let plain = datagram(7);
    g.bench_function("sign", |b| {
        b.iter(|| {
            let mut d = plain.clone();
            signer.sign_datagram(&mut d);
            black_box(d)
        })
    });
    let mut signed = plain.clone();
    signer.sign_datagram(&mut signed);
    g.bench_function("verify", |b| {
        b.iter(|| assert!(verifier.verify(black_box(&signed))))
    });
    for n in [16usize, 64] {
        let msgs: Vec<Vec<u8>> = (0..n as u16).map(datagram).collect();
        let sigs: Vec<Signature> = msgs.iter().map(|m| key.sign(m)).collect();
        let keys = vec![public; n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("verify_batch/{n}"), |b| {
            b.iter(|| {
                let m: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
                ed25519_dalek::verify_batch(&m, &sigs, &keys).unwrap()
            })
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("sha256", |b| {
        b.iter(|| sha2::Sha256::digest(black_box(&plain)))
    });
    g.bench_function("sha512", |b| {
        b.iter(|| sha2::Sha512::digest(black_box(&plain)))
    });
    for group in [1u16, 4, 8, 16, 32] {
        g.throughput(Throughput::Elements(u64::from(group)));
        let mut book = DigestBook::new(256);
        let mut next = 0u32;
        g.bench_function(format!("digest_verify/{group}"), |b| {
            b.iter_batched(
                || {
                    let chunks: Vec<Vec<u8>> =
                        (0..group).map(|i| datagram(next as u16 + i)).collect();
                    let hashes: Vec<dg::Hash> = chunks.iter().map(|c| dg::chunk_hash(c)).collect();
                    let d = dg::sign_digest(&signer, next, &hashes);
                    next += u32::from(group);
                    (d, chunks)
                },
                |(d, chunks)| {
                    assert_eq!(book.check_digest(&d, &verifier), DigestCheck::Good);
                    for c in &chunks {
                        let n = u16::from_be_bytes([c[0], c[1]]);
                        assert_eq!(book.check_chunk(n, c), Some(true));
                    }
                },
                BatchSize::SmallInput,
            )
        });
        let chunks: Vec<Vec<u8>> = (0..group).map(datagram).collect();
        g.bench_function(format!("digest_sign/{group}"), |b| {
            b.iter(|| {
                let mut grouper = DigestGrouper::new(usize::from(group), 2 + CHUNK_SIZE);
                for c in &chunks {
                    grouper.add(c);
                }
                black_box(grouper.close(&signer))
            })
        });
    }
    g.finish();
}

fn ep(port: u16) -> Endpoint {
    Endpoint::new(Ipv4Addr::LOCALHOST, port)
}

fn peer_round(c: &mut Criterion) {
    const TEAM: u16 = 16;
    let signer = ChunkSigner::from_secret(&[42u8; 32]);
    let neighbours: Vec<Endpoint> = (1..TEAM).map(|i| ep(40_000 + i)).collect();
    let mut g = c.benchmark_group("integrity/peer_round_of_16");
    g.throughput(Throughput::Elements(u64::from(TEAM)));
    for mode in ["compat", "signed", "digest"] {
        let signed = mode == "signed";
        let now = Instant::now();
        let mut rules = PeerRules::new(ep(8001), CHUNK_SIZE, 256);
        if mode != "compat" {
            rules.verify = Some(signer.verifier());
        }
        let mut peer = Peer::new(rules, &neighbours, 1);
        while peer.poll_transmit().is_some() {}
        let mut next = 0u16;
        let mut ext = 0u32;
        g.bench_function(mode, |b| {
            b.iter_batched(
                || {
                    let mut round: Vec<(Endpoint, Bytes)> = (0..TEAM)
                        .map(|k| {
                            let from = if k == 0 {
                                ep(8001)
                            } else {
                                neighbours[usize::from(k) - 1]
                            };
                            let mut d = datagram(next.wrapping_add(k));
                            if signed {
                                signer.sign_datagram(&mut d);
                            }
                            (from, Bytes::from(d))
                        })
                        .collect();
                    if mode == "digest" {
                        // The round's digest, relayed by a neighbour ahead of its chunks.
                        let hashes: Vec<dg::Hash> =
                            round.iter().map(|(_, d)| dg::chunk_hash(d)).collect();
                        let d = dg::sign_digest(&signer, ext, &hashes);
                        ext += u32::from(TEAM);
                        round.insert(0, (neighbours[0], Bytes::from(d)));
                    }
                    next = next.wrapping_add(TEAM);
                    round
                },
                |round| {
                    for (from, d) in round {
                        peer.handle_datagram(now, from, d);
                        while let Some(t) = peer.poll_transmit() {
                            black_box(&t);
                        }
                        while let Some(e) = peer.poll_event() {
                            black_box(&e);
                        }
                    }
                },
                BatchSize::SmallInput,
            )
        });
        let s = *peer.stats();
        assert_eq!(s.bad_chunks + s.lost + s.late, 0, "{s:?}");
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench, peer_round
}
criterion_main!(benches);
