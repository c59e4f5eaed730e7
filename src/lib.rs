//! P2PSP, the Peer-to-Peer Straightforward Protocol, for live streaming.
//!
//! A splitter cuts one live stream into numbered chunks and sends each chunk to one peer of every
//! team (round robin); that peer relays it to the rest of its team (DBS, the Data Broadcasting Set
//! of rules). This crate is byte-compatible with the C++ P2PSP reference (profile `compat`, see
//! `spec/` in the project's shared folder).
//!
//! Layout, from the wire up:
//! - [`proto`]: the sans-IO protocol core. Wire codec and the splitter and peer DBS state machines:
//!   bytes and `now` in, sends and events out. No sockets, no clock, no `unsafe`.
//! - [`ring`]: the zero-copy chunk ring shared by the splitter's source reader and its shards.
//! - [`driver`]: the io_uring (and `sendmmsg`) data path and the few system calls the standard
//!   library lacks. The only module with `unsafe`.
//! - [`http`]: sans-IO HTTP/1.x heads and chunked decoding, for the source and the small servers.
//! - [`media`]: just enough Ogg and MPEG-TS to start a player in the middle of a live stream.
//! - [`pattern`]: the test source's deterministic byte stream, to check what players receive.
//! - [`splitter`] and [`peer`]: the programs, wiring the core to sockets, sources and players.
//! - [`metrics`] and [`config`]: what an operator sees (`--metrics`) and sets (`--config`).
//! - [`io_util`]: small I/O helpers shared by the splitter and the peer.

#![deny(unsafe_code)]

pub mod config;
pub mod demo;
#[allow(unsafe_code)]
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod io_util;
pub mod media;
pub mod metrics;
pub mod pattern;
pub mod peer;
pub mod proto;
pub mod ring;
pub mod splitter;
