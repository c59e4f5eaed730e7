//! The splitter's signing key for `--sign KEYFILE` (CIS, `docs/integrity.md`).
//!
//! The file holds the 32-byte Ed25519 secret as 64 hex digits and a newline. It is created with
//! mode 0600 on first use (from the operating system's random source) and never overwritten.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::feed::FeedStats;
use crate::driver::Waker;
use crate::proto::digest::{DigestGrouper, MAX_GROUP};
use crate::proto::integrity::{ChunkSigner, hex, unhex};
use crate::ring::ChunkRing;

/// How the splitter signs (`--sign-mode`, `docs/integrity.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SignMode {
    /// A 64-byte Ed25519 signature appended to every chunk.
    Chunk,
    /// One signed digest per group of chunks, sent ahead of them (chunks stay compat).
    #[default]
    Digest,
}

/// What `--sign` and its companions configure.
#[derive(Debug, Clone)]
pub struct Signing {
    /// The key.
    pub signer: ChunkSigner,
    /// Per chunk or per group.
    pub mode: SignMode,
    /// Digest mode: most time a chunk waits for its group to close.
    pub window: Duration,
    /// Digest mode: most chunks per group.
    pub max_group: usize,
}

/// The longest a group of one chunk waits for a second (see [`run_digest`]).
pub const LONE_WAIT_MAX: Duration = Duration::from_secs(1);

/// How long a group of one chunk, opened `window` ago at most, waits in all for a second chunk
/// when chunks have been coming every `interval`: two windows, or one and a half intervals on a
/// slower stream, at most [`LONE_WAIT_MAX`].
pub fn lone_wait(window: Duration, interval: Duration) -> Duration {
    (2 * window)
        .max(interval * 3 / 2)
        .min(LONE_WAIT_MAX.max(2 * window))
}

/// Digest mode: the signer thread. Takes the feed's compat chunk datagrams from `chunks`, groups
/// those that arrive within `window` of a group's first chunk (at most `max_group`), hashes each,
/// signs the group's digest once and publishes the chunks with it to the ring (this thread is then
/// the ring's only writer). A group that has only one chunk when its window ends waits for
/// another (a digest of one chunk costs 88 bytes on the wire and a whole signature check per
/// chunk; of two, 52 bytes and half a check): up to two windows, or, on a slow stream, one and a
/// half of the recent time between chunks, at most [`LONE_WAIT_MAX`]; so a digest covers at least
/// two chunks down to 1.5 chunks/s (12 kbit/s of 1 KiB chunks), where a chunk waits at most 1 s
/// for its signature against a playout buffer of minutes. Ends when the feed drops its end of the
/// channel.
pub fn run_digest(
    chunks: &crossbeam_channel::Receiver<Vec<u8>>,
    signing: &Signing,
    chunk_len: usize,
    ring: &ChunkRing,
    stats: &FeedStats,
    wakers: &[Waker],
) {
    let mut grouper = DigestGrouper::new(signing.max_group.min(MAX_GROUP), chunk_len);
    let mut group: Vec<Vec<u8>> = Vec::with_capacity(MAX_GROUP);
    let mut opened = Instant::now();
    let mut deadline = opened;
    let mut busy = Duration::ZERO;
    // The recent time between chunks from the feed (an average over the last ~8).
    let mut interval = signing.window;
    let mut last_arrival: Option<Instant> = None;
    let flush = |grouper: &mut DigestGrouper, group: &mut Vec<Vec<u8>>, busy: &mut Duration| {
        let t0 = Instant::now();
        let Some(digest) = grouper.close(&signing.signer) else {
            return;
        };
        let digest = Bytes::from(digest);
        *busy += t0.elapsed();
        let now = Instant::now();
        let n = group.len() as u64;
        for d in group.drain(..) {
            let number = u16::from_be_bytes([d[0], d[1]]);
            ring.publish_with(number, Bytes::from(d), Some(digest.clone()), now);
        }
        for w in wakers {
            w.wake();
        }
        stats.signed_groups.fetch_add(1, Ordering::Relaxed);
        stats.signed_chunks.fetch_add(n, Ordering::Relaxed);
        stats
            .signing_busy_ns
            .store(busy.as_nanos() as u64, Ordering::Relaxed);
    };
    loop {
        let item = if group.is_empty() {
            chunks.recv_timeout(Duration::from_millis(100))
        } else {
            chunks.recv_deadline(deadline)
        };
        match item {
            Ok(d) => {
                let now = Instant::now();
                if let Some(prev) = last_arrival.replace(now) {
                    interval = interval * 7 / 8 + now.saturating_duration_since(prev) / 8;
                }
                let number = u16::from_be_bytes([d[0], d[1]]);
                if !grouper.fits(number) {
                    flush(&mut grouper, &mut group, &mut busy);
                }
                if group.is_empty() {
                    opened = Instant::now();
                    deadline = opened + signing.window;
                }
                let t0 = Instant::now();
                let full = grouper.add(&d);
                busy += t0.elapsed();
                group.push(d);
                if full {
                    flush(&mut grouper, &mut group, &mut busy);
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                let lone = opened + lone_wait(signing.window, interval);
                if group.len() == 1 && deadline < lone {
                    deadline = lone;
                } else {
                    flush(&mut grouper, &mut group, &mut busy);
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                flush(&mut grouper, &mut group, &mut busy);
                return;
            }
        }
    }
}

/// Reads the key in `path`, or creates it. Returns the signer and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(ChunkSigner, bool), String> {
    let shown = path.display();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = unhex(text.trim())
                .ok_or_else(|| format!("--sign {shown}: not a key file (64 hex digits)"))?;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    "--sign {shown}: the key file can be read by other users (chmod 600 it)"
                );
            }
            Ok((ChunkSigner::from_secret(&secret), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| format!("--sign {shown}: no random source: {e}"))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("--sign {shown}: cannot create the key file: {e}"))?;
            f.write_all(format!("{}\n", hex(&secret)).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("--sign {shown}: cannot write the key file: {e}"))?;
            Ok((ChunkSigner::from_secret(&secret), true))
        }
        Err(e) => Err(format!("--sign {shown}: cannot read the key file: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_chunk_waits_two_windows_or_one_and_a_half_intervals_at_most_a_second() {
        let ms = Duration::from_millis;
        // Fast streams: two windows.
        assert_eq!(lone_wait(ms(20), ms(1)), ms(40));
        // 128 kbit/s of 1 KiB chunks (a chunk every 64 ms): long enough for the next one.
        assert_eq!(lone_wait(ms(20), ms(64)), ms(96));
        // 16 kbit/s (every 512 ms): 768 ms; slower: at most a second.
        assert_eq!(lone_wait(ms(20), ms(512)), ms(768));
        assert_eq!(lone_wait(ms(20), ms(5000)), LONE_WAIT_MAX);
        // A window set above half a second keeps its two windows.
        assert_eq!(lone_wait(ms(800), ms(5000)), ms(1600));
    }

    #[test]
    fn created_private_then_loaded_the_same() {
        let dir = std::env::temp_dir().join(format!("p2psp-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("splitter.key");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public_hex(), b.public_hex());
        std::fs::write(&path, "nonsense").unwrap();
        assert!(
            load_or_create(&path)
                .unwrap_err()
                .contains("not a key file")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
