//! The splitter program: reads the live stream from its source, cuts it into chunks and sends them
//! to the teams.
//!
//! - [`source`]: where the bytes come from (test pattern, stdin, a live HTTP stream).

pub mod source;
