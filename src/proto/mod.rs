//! The sans-IO protocol core: the `compat` wire codec and the DBS state machines.
//!
//! Nothing here opens a socket, reads a clock or blocks: callers pass bytes and `now` in and take
//! datagrams to send and events out. That keeps every protocol rule testable without sockets and
//! without sleeping, and lets the same core run under the io_uring splitter shards, the `p2psp peer`
//! program and the load generator's thousands of lightweight peers.
//!
//! - [`wire`]: byte layouts of the TCP join and the UDP messages (reference-notes §3.1, §4.1).
//! - [`seq`]: serial-number arithmetic on 16-bit chunk numbers (RFC 1982), so nothing stalls at the
//!   65535 → 0 wrap.
//! - [`team`]: one DBS team as the splitter sees it (round robin, goodbyes at round boundaries,
//!   loss counters) and [`team::Teams`], the set of teams one splitter shard owns.
//! - [`directory`]: the splitter's control-plane view: which team a joining peer goes to.
//! - [`peer`]: the DBS peer (relaying, debts, playout buffer, loss reports, polite goodbye).
//! - [`integrity`]: CIS, signed chunks and complaints about polluters (`docs/integrity.md`).
//! - [`digest`]: CIS digest mode, one signed digest per group of chunks.
//! - [`nts`]: NTS, the NAT Traversal Set (§6.4): its messages, acknowledgement by echo, port-step
//!   estimation and port prediction.
//! - [`nts_splitter`], [`nts_peer`]: the NTS state machines of the splitter and of a peer.
//! - [`choice`]: which of several splitters a peer joins, and where it fails over to.
//! - [`ims`]: IMS, the IP Multicast Set (§6.1): its join message and what a peer takes from the
//!   group.
//! - [`nts_forward`]: the forwarding fallback for teammates no NAT traversal connects.
//! - [`nts_ems`]: EMS (§6.5), the 7-byte join and the rewriting for peers behind one NAT.
//! - [`rejoin`]: peer liveness: when the stream has stalled, why, and the backoff to join again.
#![forbid(unsafe_code)]

pub mod choice;
pub mod digest;
pub mod directory;
pub mod ims;
pub mod integrity;
pub mod nts;
pub mod nts_ems;
pub mod nts_forward;
pub mod nts_peer;
pub mod nts_probe;
pub mod nts_splitter;
pub mod peer;
pub mod rejoin;
pub mod seq;
pub mod team;
pub mod wire;

pub use std::net::SocketAddrV4 as Endpoint;

/// Bytes from hex text (whitespace ignored), for the codecs' tests.
#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
