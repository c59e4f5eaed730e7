#![forbid(unsafe_code)]
//! Small I/O helpers shared by the splitter and the peer.

use std::io;

/// Whether `e` only means "nothing yet, try again": `WouldBlock` (a non-blocking socket, or a
/// read timeout on Unix), `TimedOut` (a read timeout elsewhere) or `Interrupted` (a signal).
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_kinds() {
        for kind in [
            io::ErrorKind::WouldBlock,
            io::ErrorKind::TimedOut,
            io::ErrorKind::Interrupted,
        ] {
            assert!(is_transient(&io::Error::from(kind)), "{kind:?}");
        }
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::UnexpectedEof,
        ] {
            assert!(!is_transient(&io::Error::from(kind)), "{kind:?}");
        }
    }
}
