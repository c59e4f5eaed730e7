//! Serial-number arithmetic on 16-bit chunk numbers (RFC 1982, half range 32768).
//!
//! Chunk numbers wrap from 65535 to 0. The reference compares them as plain integers and stalls
//! for about 65536 chunks after the wrap (reference-notes §5.5); comparing them as serial numbers
//! does not change the wire and never stalls.

/// `a − b` as a signed distance in `-32768..=32767`: positive when `a` is newer than `b`.
#[inline]
pub fn diff(a: u16, b: u16) -> i32 {
    i32::from(a.wrapping_sub(b) as i16)
}

/// Whether chunk number `a` comes before `b`.
#[inline]
pub fn lt(a: u16, b: u16) -> bool {
    diff(a, b) < 0
}

/// Whether chunk number `a` comes after `b`.
#[inline]
pub fn gt(a: u16, b: u16) -> bool {
    diff(a, b) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_across_the_wrap() {
        assert_eq!(diff(0, 65535), 1);
        assert_eq!(diff(65535, 0), -1);
        assert!(lt(65535, 0));
        assert!(gt(3, 65530));
        assert_eq!(diff(100, 100), 0);
        assert_eq!(diff(32767, 0), 32767);
        assert_eq!(diff(32768, 0), -32768);
    }
}
