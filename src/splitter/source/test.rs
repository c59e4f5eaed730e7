//! The test source: the [`pattern`] stream, paced at the configured bitrate.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

use super::{STOP_POLL, Source, SourceError, SourceItem, stopped};
use crate::pattern;

/// The media type the test source announces.
pub const TEST_CONTENT_TYPE: &str = "application/octet-stream";

/// The [`pattern`] stream from offset 0, paced at a steady bitrate.
#[derive(Debug)]
pub struct TestSource {
    pacer: Pacer,
    epoch: Instant,
    offset: u64,
    started: bool,
    stop: Arc<AtomicBool>,
}

impl TestSource {
    /// A test source sending `bitrate_bps` bits per second; fails when that is 0.
    pub fn new(bitrate_bps: u64, stop: Arc<AtomicBool>) -> Result<Self, SourceError> {
        if bitrate_bps == 0 {
            return Err(SourceError::ZeroBitrate);
        }
        Ok(Self {
            pacer: Pacer::new(bitrate_bps),
            epoch: Instant::now(),
            offset: 0,
            started: false,
            stop,
        })
    }
}

impl Source for TestSource {
    fn next(&mut self, buf: &mut [u8]) -> Result<SourceItem, SourceError> {
        if stopped(&self.stop) {
            return Ok(SourceItem::End);
        }
        if !self.started {
            self.started = true;
            // Pacing starts with the stream, not when the source was made.
            self.epoch = Instant::now();
            return Ok(SourceItem::StreamStart {
                content_type: Some(TEST_CONTENT_TYPE.to_owned()),
            });
        }
        if buf.is_empty() {
            return Ok(SourceItem::Data(0));
        }
        loop {
            match self.pacer.poll(self.epoch.elapsed(), buf.len()) {
                Pace::Send(n) => {
                    pattern::fill(self.offset, &mut buf[..n]);
                    self.offset = self.offset.wrapping_add(n as u64);
                    return Ok(SourceItem::Data(n));
                }
                Pace::Wait(d) => thread::sleep(d.min(STOP_POLL)),
            }
            if stopped(&self.stop) {
                return Ok(SourceItem::End);
            }
        }
    }

    fn describe(&self) -> String {
        format!("test pattern at {} bit/s", self.pacer.bits_per_sec)
    }

    fn reconnects(&self) -> u64 {
        0
    }
}

/// What a [`Pacer`] allows now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pace {
    /// Send this many bytes now (already counted as sent).
    Send(usize),
    /// Nothing worth sending before this much more time passes.
    Wait(Duration),
}

/// Paces a byte stream at a bitrate against a clock given as an argument (time since an epoch), so
/// that it is tested without sleeping. Sends in pieces of about [`Pacer::PIECE`]; after a stall
/// (the caller did not ask for a while) it catches up at most [`Pacer::MAX_BURST`] of backlog.
#[derive(Clone, Debug)]
pub(super) struct Pacer {
    bits_per_sec: u64,
    /// The time from which `sent` counts.
    origin: Duration,
    /// Bytes sent since `origin`.
    sent: u64,
}

impl Pacer {
    /// Smallest piece worth waking up for, in time at the bitrate.
    const PIECE: Duration = Duration::from_millis(2);
    /// Most backlog sent at once after a stall, in time at the bitrate.
    const MAX_BURST: Duration = Duration::from_millis(50);

    pub(super) fn new(bits_per_sec: u64) -> Self {
        Self {
            bits_per_sec: bits_per_sec.max(1),
            origin: Duration::ZERO,
            sent: 0,
        }
    }

    /// Bytes due in `d` at the bitrate.
    fn bytes_in(&self, d: Duration) -> u64 {
        let bytes = d.as_nanos() * u128::from(self.bits_per_sec) / 8_000_000_000;
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }

    /// Time until `bytes` are due, at the bitrate (rounded up).
    fn time_for(&self, bytes: u64) -> Duration {
        let nanos = (u128::from(bytes) * 8_000_000_000).div_ceil(u128::from(self.bits_per_sec));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// What to do at time `now` with room for `room` bytes (`room` > 0).
    pub(super) fn poll(&mut self, now: Duration, room: usize) -> Pace {
        let due = self.bytes_in(now.saturating_sub(self.origin));
        let burst = self.bytes_in(Self::MAX_BURST).max(1);
        if due.saturating_sub(self.sent) > burst {
            // Stalled: drop the backlog beyond one burst rather than flood the team.
            self.origin = now.saturating_sub(Self::MAX_BURST);
            self.sent = 0;
        }
        let due = self.bytes_in(now.saturating_sub(self.origin));
        let available = due.saturating_sub(self.sent);
        let piece = self.bytes_in(Self::PIECE).max(1).min(room as u64);
        if available >= piece {
            let n = available.min(room as u64);
            self.sent += n;
            // n <= room, so it fits in usize.
            Pace::Send(usize::try_from(n).unwrap_or(room))
        } else {
            let at = self.origin + self.time_for(self.sent + piece);
            Pace::Wait(at.saturating_sub(now).max(Duration::from_micros(100)))
        }
    }
}
