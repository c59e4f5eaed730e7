#![no_main]
//! See `p2psp::fuzzing::nts_probe` for what is checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2psp::fuzzing::nts_probe(data));
