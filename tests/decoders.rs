//! Property tests over every decoder, with the same harnesses as the cargo-fuzz targets in
//! `fuzz/` (`p2psp::fuzzing`), so that `cargo test` checks what the fuzzers check: random bytes,
//! and the fuzzers' seed corpora (real captures) with random bytes changed.

use std::path::PathBuf;

use p2psp::fuzzing;
use p2psp::proto::Endpoint;
use p2psp::proto::ims::ImsConfig;
use p2psp::proto::wire::JoinConfig;
use proptest::prelude::*;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// A seed of `target` with up to 8 bytes replaced, inserted or cut.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds(target);
    let n = seeds.len();
    (
        0..n,
        proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 0..8),
    )
        .prop_map(move |(i, edits)| {
            let mut s = seeds[i].clone();
            for (at, b, kind) in edits {
                let at = usize::from(at) % (s.len() + 1);
                match kind {
                    0 if at < s.len() => s[at] = b,
                    1 => s.insert(at, b),
                    _ => s.truncate(at),
                }
            }
            s
        })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| Endpoint::new(ip.into(), port))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn nts_forward_random(data in bytes(80)) {
        fuzzing::nts_forward(&data);
    }

    #[test]
    fn nts_forward_mutated(data in mutated("nts_forward")) {
        fuzzing::nts_forward(&data);
    }

    #[test]
    fn join_config_random(data in bytes(256)) {
        fuzzing::join_config(&data);
    }

    #[test]
    fn join_config_mutated(data in mutated("join_config")) {
        fuzzing::join_config(&data);
    }

    #[test]
    fn join_config_round_trip(
        source in endpoint(),
        channel in "[a-z0-9./_-]{0,40}",
        sizes in any::<[u16; 3]>(),
        peers in proptest::collection::vec(endpoint(), 0..40),
        monitors in any::<u16>(),
        trailing in bytes(8),
    ) {
        let config = JoinConfig {
            source,
            channel,
            header_size: sizes[0],
            chunk_size: sizes[1],
            buffer_size: sizes[2],
            monitors: monitors % (peers.len() as u16 + 1),
            peers,
        };
        let mut out = Vec::new();
        config.encode(&mut out).unwrap();
        prop_assert_eq!(out.len(), config.encoded_len());
        out.extend_from_slice(&trailing);
        let (decoded, used) = JoinConfig::decode(&out).unwrap().unwrap();
        prop_assert_eq!(used, config.encoded_len());
        prop_assert_eq!(decoded, config);
        fuzzing::join_config(&out);
    }

    #[test]
    fn ims_config_random(data in bytes(256)) {
        fuzzing::ims_config(&data);
    }

    #[test]
    fn ims_config_mutated(data in mutated("ims_config")) {
        fuzzing::ims_config(&data);
    }

    #[test]
    fn ims_config_round_trip(
        source in endpoint(),
        channel in "[a-z0-9./_-]{0,40}",
        sizes in any::<[u16; 3]>(),
        group in endpoint(),
        trailing in bytes(8),
    ) {
        let config = ImsConfig {
            source,
            channel,
            header_size: sizes[0],
            chunk_size: sizes[1],
            buffer_size: sizes[2],
            group,
        };
        let mut out = Vec::new();
        config.encode(&mut out).unwrap();
        prop_assert_eq!(out.len(), config.encoded_len());
        // A DBS peer reading exactly these bytes before the splitter closes tells it is IMS.
        prop_assert_eq!(
            p2psp::proto::ims::looks_like_ims(&out),
            p2psp::proto::ims::check_group(group).is_ok().then_some(group)
        );
        out.extend_from_slice(&trailing);
        let (decoded, used) = ImsConfig::decode(&out).unwrap().unwrap();
        prop_assert_eq!(used, config.encoded_len());
        prop_assert_eq!(decoded, config);
        fuzzing::ims_config(&out);
    }

    #[test]
    fn join_request_random(data in bytes(256)) {
        fuzzing::join_request(&data);
    }

    #[test]
    fn join_request_mutated(data in mutated("join_request")) {
        fuzzing::join_request(&data);
    }

    #[test]
    fn load_probe_random(data in bytes(512)) {
        fuzzing::load_probe(&data);
    }

    #[test]
    fn load_probe_mutated(data in mutated("load_probe")) {
        fuzzing::load_probe(&data);
    }

    #[test]
    fn http_response_random(data in bytes(512)) {
        fuzzing::http_response(&data);
    }

    #[test]
    fn http_response_mutated(data in mutated("http_response")) {
        fuzzing::http_response(&data);
    }

    #[test]
    fn udp_splitter_random(data in bytes(1024)) {
        fuzzing::udp_splitter(&data);
    }

    #[test]
    fn udp_splitter_mutated(data in mutated("udp_splitter")) {
        fuzzing::udp_splitter(&data);
    }

    #[test]
    fn config_file_random(data in bytes(256)) {
        fuzzing::config_file(&data);
    }

    #[test]
    fn config_file_mutated(data in mutated("config_file")) {
        fuzzing::config_file(&data);
    }

    #[test]
    fn config_file_of_keys_and_values(
        which in 0u8..2,
        lines in proptest::collection::vec(
            (
                "(lrs|acs|max-peers|drop-rate|join-timeout|chunk-size|buffer-size|seed|monitor|splitter|source|bogus)",
                "(true|false|-?[0-9]{1,6}(\\.[0-9]{1,3})?|\"[a-z0-9:./]{0,20}\"|\\[1, 2\\])",
            ),
            0..8,
        ),
    ) {
        let mut data = vec![which];
        for (k, v) in lines {
            data.extend_from_slice(format!("{k} = {v}\n").as_bytes());
        }
        fuzzing::config_file(&data);
    }

    #[test]
    fn udp_peer_random(data in bytes(1024)) {
        fuzzing::udp_peer(&data);
    }

    #[test]
    fn udp_peer_mutated(data in mutated("udp_peer")) {
        fuzzing::udp_peer(&data);
    }

    #[test]
    fn digest_random(data in bytes(1024)) {
        fuzzing::digest(&data);
    }

    #[test]
    fn digest_mutated(data in mutated("digest")) {
        fuzzing::digest(&data);
    }

    #[test]
    fn digest_round_trip(
        first in any::<u32>(),
        hashes in proptest::collection::vec(any::<[u8; 16]>(), 1..=32),
        flip in any::<usize>(),
    ) {
        use p2psp::proto::digest::{Digest, digest_len, sign_digest};
        let signer = p2psp::proto::integrity::ChunkSigner::from_secret(&[6; 32]);
        let d = sign_digest(&signer, first, &hashes);
        prop_assert_eq!(d.len(), digest_len(hashes.len()));
        let g = Digest::parse(&d).unwrap();
        prop_assert_eq!((g.first, g.count()), (first, hashes.len()));
        for (i, h) in hashes.iter().enumerate() {
            prop_assert_eq!(g.entry(i), (first.wrapping_add(i as u32), *h));
            prop_assert!(g.covers(first.wrapping_add(i as u32) as u16));
        }
        prop_assert!(g.verify(&signer.verifier()));
        // Any one changed byte: not a digest, or not the splitter's.
        let mut bad = d.clone();
        let at = flip % bad.len();
        bad[at] ^= 0x20;
        prop_assert!(Digest::parse(&bad).is_none_or(|g| !g.verify(&signer.verifier())));
    }

    #[test]
    fn nts_probe_random(data in bytes(1024)) {
        fuzzing::nts_probe(&data);
    }

    #[test]
    fn nts_probe_mutated(data in mutated("nts_probe")) {
        fuzzing::nts_probe(&data);
    }

    /// Whatever a rendezvous says, it decodes to what was encoded, and no other probing
    /// message or NTS length takes its bytes.
    #[test]
    fn nts_probe_rendezvous_round_trip(
        method in 0usize..4, rate in any::<u8>(), session in any::<u32>(),
        id in proptest::collection::vec(0usize..36, 7), to in endpoint(),
        step in any::<u16>(), count in any::<u16>(), extra in any::<u16>(),
    ) {
        use p2psp::proto::nts::PeerId;
        use p2psp::proto::nts_probe::{Method, ProbeToSplitter, Rendezvous, RENDEZVOUS_LEN};
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let other = PeerId::from_bytes(&id.iter().map(|&i| ALPHABET[i]).collect::<Vec<u8>>()).unwrap();
        let method = [Method::Listen, Method::Spray, Method::Query, Method::Sweep][method];
        let r = Rendezvous { method, rate, session, other, endpoint: to, step, count, extra };
        let mut out = Vec::new();
        r.encode(&mut out);
        prop_assert_eq!(out.len(), RENDEZVOUS_LEN);
        prop_assert_eq!(Rendezvous::parse(&out), Some(r));
        prop_assert_eq!(ProbeToSplitter::parse(&out), None);
        let mut q = Vec::new();
        ProbeToSplitter::Query { id: other, session }.encode(&mut q);
        prop_assert_eq!(ProbeToSplitter::parse(&q), Some(ProbeToSplitter::Query { id: other, session }));
        prop_assert_eq!(Rendezvous::parse(&q), None);
    }
}

/// Every seed as it is (the real captures must of course pass).
#[test]
fn seeds_pass() {
    for s in seeds("join_config") {
        fuzzing::join_config(&s);
        assert!(JoinConfig::decode(&s).unwrap().is_some());
    }
    for s in seeds("ims_config") {
        fuzzing::ims_config(&s);
        let (c, _) = ImsConfig::decode(&s).unwrap().unwrap();
        c.check_usable().unwrap();
    }
    for s in seeds("join_request") {
        fuzzing::join_request(&s);
    }
    for s in seeds("http_response") {
        fuzzing::http_response(&s);
        assert!(p2psp::http::ResponseHead::parse(&s).unwrap().is_some());
    }
    for s in seeds("udp_splitter") {
        fuzzing::udp_splitter(&s);
    }
    for s in seeds("udp_peer") {
        fuzzing::udp_peer(&s);
    }
    for s in seeds("config_file") {
        fuzzing::config_file(&s);
    }
    let digests = seeds("digest");
    assert!(!digests.is_empty());
    for s in digests {
        fuzzing::digest(&s);
    }
    for s in seeds("nts_probe") {
        fuzzing::nts_probe(&s);
    }
}
