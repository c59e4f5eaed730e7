//! Peer liveness: noticing that the stream stopped, saying why, and when to try joining again.
//!
//! Sans-IO like the rest of the core: [`Watchdog`] is told what arrived and when, and says when
//! the stream has stalled and what the peer saw before; [`Backoff`] says how long to wait before
//! each attempt to join again, from a random number the caller draws. The `p2psp peer` program
//! wires them to its socket and clock.

use std::time::{Duration, Instant};

/// Why a peer stopped receiving the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// The splitter said goodbye although the peer did not leave (it stopped, or restarts).
    SplitterGoodbye,
    /// Nothing at all arrived for the stall timeout: the splitter and the team are gone or
    /// unreachable.
    NoData,
    /// Teammates still relay, but the splitter sent nothing for the stall timeout: it removed
    /// this peer (expelled for losses, or it forgot it) or it stopped and the team drains.
    NoChunkFromSplitter,
}

impl Stall {
    /// One line for the operator.
    pub fn describe(self) -> &'static str {
        match self {
            Stall::SplitterGoodbye => "the splitter said goodbye (it stopped or removed us)",
            Stall::NoData => "no data from the splitter or the team (splitter unreachable?)",
            Stall::NoChunkFromSplitter => {
                "no chunk from the splitter although teammates still relay (expelled?)"
            }
        }
    }
}

/// Watches the arrivals of one team session.
#[derive(Debug, Clone)]
pub struct Watchdog {
    timeout: Duration,
    started: Instant,
    last_any: Option<Instant>,
    last_from_splitter: Option<Instant>,
    goodbye: bool,
}

impl Watchdog {
    /// A session that began at `now`; a stall is declared after `timeout` without chunks.
    pub fn new(now: Instant, timeout: Duration) -> Watchdog {
        Watchdog {
            timeout,
            started: now,
            last_any: None,
            last_from_splitter: None,
            goodbye: false,
        }
    }

    /// The stall timeout in force.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the stall timeout (it may be derived from the stream's rate once that is known).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// A chunk arrived at `now`, from the splitter or from a teammate.
    pub fn on_chunk(&mut self, now: Instant, from_splitter: bool) {
        self.last_any = Some(now);
        if from_splitter {
            self.last_from_splitter = Some(now);
        }
    }

    /// The splitter said goodbye although we did not leave.
    pub fn on_splitter_goodbye(&mut self) {
        self.goodbye = true;
    }

    /// Whether (and why) the session has stalled at `now`.
    pub fn check(&self, now: Instant) -> Option<Stall> {
        if self.goodbye {
            return Some(Stall::SplitterGoodbye);
        }
        let since = |t: Option<Instant>| now.saturating_duration_since(t.unwrap_or(self.started));
        if since(self.last_from_splitter) < self.timeout {
            None
        } else if since(self.last_any) < self.timeout / 2 {
            // Teammates relay on while the splitter is silent: it no longer sends to us. (When
            // the splitter is gone, the team's last relays end within a round.)
            Some(Stall::NoChunkFromSplitter)
        } else {
            Some(Stall::NoData)
        }
    }
}

/// The stall timeout for a stream of `chunk_rate` chunks/s and a buffer of `buffer` chunks: a
/// quarter of the buffer's duration (a peer plays half a buffer behind the newest chunk, so the
/// player still has data when the peer gives up on its team), at least 3 s (a splitter sends a
/// team member a chunk every round, and a busy machine may hold a process back for a second or
/// two) and at most 10 s.
pub fn stall_timeout(chunk_rate: f64, buffer: u16) -> Duration {
    let quarter = if chunk_rate > 0.0 {
        f64::from(buffer) / 4.0 / chunk_rate
    } else {
        f64::INFINITY
    };
    Duration::from_secs_f64(quarter.clamp(3.0, 10.0))
}

/// Exponential backoff with jitter between attempts to join again.
///
/// Attempt k (from 1) waits a random time in [d/2, d] with d = `first` · 2^(k−1), at most
/// `most`: spread over half the interval, so that the peers of a restarted splitter, which all
/// noticed at about the same moment, do not join in one storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's longest wait.
    pub first: Duration,
    /// The longest wait.
    pub most: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(200),
            most: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// How long to wait before attempt `attempt` (from 1), given `random` uniform in [0, 1).
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let doubled = self
            .first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = doubled.min(self.most);
        d.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_says_what_the_peer_saw() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut w = Watchdog::new(t0, Duration::from_secs(3));
        assert_eq!(w.check(s(2999)), None, "nothing yet, but not for long");
        assert_eq!(w.check(s(3000)), Some(Stall::NoData));
        w.on_chunk(s(3000), true);
        assert_eq!(w.check(s(5000)), None);
        // Teammates go on relaying; the splitter went quiet at 3 s.
        for ms in (3100..=6000).step_by(100) {
            w.on_chunk(s(ms), false);
        }
        assert_eq!(w.check(s(5999)), None);
        assert_eq!(w.check(s(6000)), Some(Stall::NoChunkFromSplitter));
        // And then nothing at all.
        assert_eq!(w.check(s(10_000)), Some(Stall::NoData));
        // The splitter vanished and the team's last relays came soon after its last chunk.
        let mut w = Watchdog::new(t0, Duration::from_secs(2));
        w.on_chunk(s(0), true);
        w.on_chunk(s(400), false);
        assert_eq!(w.check(s(1999)), None);
        assert_eq!(w.check(s(2000)), Some(Stall::NoData));
        w.on_splitter_goodbye();
        assert_eq!(w.check(s(10_000)), Some(Stall::SplitterGoodbye));
    }

    #[test]
    fn the_stall_timeout_scales_with_the_buffer_duration() {
        // 1 Mbit/s in 1 KiB chunks, 256-chunk buffer: 2.1 s of buffer.
        assert_eq!(stall_timeout(122.0, 256), Duration::from_secs(3));
        // 64 kbit/s: 33 s of buffer, a quarter is 8 s.
        let t = stall_timeout(7.8125, 256);
        assert!((t.as_secs_f64() - 8.192).abs() < 0.01, "{t:?}");
        // An audio stream at 16 kbit/s, or a rate not known yet.
        assert_eq!(stall_timeout(2.0, 256), Duration::from_secs(10));
        assert_eq!(stall_timeout(0.0, 256), Duration::from_secs(10));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(b.delay(1, 0.999_999).as_millis(), 199);
        assert_eq!(b.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay(5, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(50, 0.0), Duration::from_secs(1));
        assert!(b.delay(u32::MAX, 0.999) <= Duration::from_secs(2));
    }
}
