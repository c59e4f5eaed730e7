//! The feed: reads the source, keeps the stream header and publishes numbered chunks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::settings::MAX_HEADER_SIZE;
use super::source::{Source, SourceItem};
use crate::driver::Waker;
use crate::media::{HeaderEnd, HeaderSize, stream_header_len};
use crate::proto::integrity::SIGNATURE_LEN;
use crate::proto::wire::CHUNK_HEADER;
use crate::ring::ChunkRing;

/// The first bytes of the current stream, handed to every joining peer.
#[derive(Debug, Clone, Default)]
pub struct StreamHeader {
    /// Counts stream starts (a reconnected source starts a new stream with a new header).
    pub generation: u64,
    /// Number of the first chunk of this stream: chunks from this one on carry the stream from
    /// its first byte (a stream always starts at a chunk boundary).
    pub first_chunk: u16,
    /// The source's content type, if it said.
    pub content_type: Option<String>,
    /// The header bytes captured so far.
    pub bytes: Vec<u8>,
    /// Whether the header is all there: `--header-size N` bytes, or with `--header-size auto`
    /// the header the container needs (derived from the stream's first bytes).
    pub complete: bool,
}

/// The header, shared between the feed (writer) and the control plane (readers).
#[derive(Debug)]
pub struct HeaderCell {
    size: HeaderSize,
    state: Mutex<StreamHeader>,
    ready: Condvar,
    /// Chunks of the current stream published so far.
    chunks: AtomicU64,
}

impl HeaderCell {
    /// An empty cell for a header of `size`.
    pub fn new(size: HeaderSize) -> HeaderCell {
        HeaderCell {
            size,
            state: Mutex::new(StreamHeader::default()),
            ready: Condvar::new(),
            chunks: AtomicU64::new(0),
        }
    }

    /// The header if it is complete.
    pub fn get(&self) -> Option<StreamHeader> {
        let h = self.state.lock().unwrap_or_else(|e| e.into_inner());
        h.complete.then(|| h.clone())
    }

    /// Waits up to `timeout` for a complete header.
    pub fn wait(&self, timeout: Duration) -> Option<StreamHeader> {
        let h = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (h, _) = self
            .ready
            .wait_timeout_while(h, timeout, |h| !h.complete)
            .unwrap_or_else(|e| e.into_inner());
        h.complete.then(|| h.clone())
    }

    fn start(&self, content_type: Option<String>, first_chunk: u16) {
        let mut h = self.state.lock().unwrap_or_else(|e| e.into_inner());
        h.generation += 1;
        h.first_chunk = first_chunk;
        self.chunks.store(0, Ordering::Relaxed);
        h.content_type = content_type;
        h.bytes.clear();
        h.complete = self.size == HeaderSize::Bytes(0);
        if h.complete {
            self.ready.notify_all();
        }
    }

    /// Takes header bytes from the start of a new stream's data.
    fn offer(&self, data: &[u8]) {
        let mut h = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if h.complete {
            return;
        }
        match self.size {
            HeaderSize::Bytes(size) => {
                let take = (size - h.bytes.len()).min(data.len());
                h.bytes.extend_from_slice(&data[..take]);
                if h.bytes.len() < size {
                    return;
                }
                trim_ogg(&mut h);
            }
            HeaderSize::Auto => {
                // The derivation never needs more than the limit and a little.
                let room = (MAX_HEADER_SIZE + 8192).saturating_sub(h.bytes.len());
                h.bytes.extend_from_slice(&data[..room.min(data.len())]);
                match stream_header_len(&h.bytes, MAX_HEADER_SIZE) {
                    HeaderEnd::More => return,
                    HeaderEnd::Found { container, len } => {
                        tracing::info!(
                            "stream {}: {} ({}), header of {len} bytes",
                            h.generation,
                            container.name(),
                            h.content_type.as_deref().unwrap_or("no content type")
                        );
                        h.bytes.truncate(len);
                    }
                    HeaderEnd::TooLong { container, len } => {
                        tracing::warn!(
                            "stream {}: {} header longer than {MAX_HEADER_SIZE} bytes; peers get its first {len} bytes and players may not start",
                            h.generation,
                            container.name()
                        );
                        h.bytes.truncate(len);
                    }
                }
            }
        }
        h.complete = true;
        self.ready.notify_all();
    }

    /// How many chunks of the current stream have been published.
    pub fn chunks_in_stream(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }

    /// The current header, complete or not (for status pages).
    pub fn peek(&self) -> StreamHeader {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An Ogg header cut inside a page is trimmed to its whole pages: a player reading a page whose
/// end is missing reports a CRC mismatch, while it silently finds the next page in the chunks
/// that follow the header.
fn trim_ogg(h: &mut StreamHeader) {
    let Some(whole) = crate::media::ogg_complete_len(&h.bytes) else {
        return;
    };
    if whole == 0 {
        tracing::warn!(
            "the stream is Ogg but its first page is longer than --header-size {}: players cannot start; raise --header-size",
            h.bytes.len()
        );
        return;
    }
    if whole < h.bytes.len() {
        tracing::info!(
            "Ogg stream header of stream {}: {whole} bytes of whole pages (of {} captured)",
            h.generation,
            h.bytes.len()
        );
        h.bytes.truncate(whole);
    }
}

/// What the feed counted (read by the status line).
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Chunks published.
    pub chunks: AtomicU64,
    /// Stream bytes read.
    pub bytes: AtomicU64,
    /// Stream starts (1 + reconnects).
    pub streams: AtomicU64,
    /// Bytes of an unfinished chunk dropped because the stream restarted.
    pub partial_dropped: AtomicU64,
    /// Source reconnects.
    pub reconnects: AtomicU64,
    /// Set when the feed has ended.
    pub ended: AtomicBool,
    /// CIS digest mode: groups signed.
    pub signed_groups: AtomicU64,
    /// CIS digest mode: chunks published with a digest.
    pub signed_chunks: AtomicU64,
    /// CIS digest mode: time the signer thread spent hashing and signing, in nanoseconds.
    pub signing_busy_ns: AtomicU64,
}

/// Where the feed's chunks go: straight to the ring, signed there or not (compat and
/// `--sign-mode chunk`), or to the signer thread (`--sign-mode digest`).
pub enum Output<'a> {
    /// Published to the ring by the feed, signed first if there is a signer.
    Ring(Option<&'a crate::proto::integrity::ChunkSigner>),
    /// Handed to the digest signer thread, which publishes them.
    Digest(crossbeam_channel::Sender<Vec<u8>>),
}

/// Reads `source` until it ends or `stop` is raised.
#[allow(clippy::too_many_arguments)]
pub fn run(
    mut source: Box<dyn Source>,
    chunk_size: usize,
    first_number: u16,
    output: Output<'_>,
    ring: &ChunkRing,
    header: &HeaderCell,
    stats: &FeedStats,
    wakers: &[Waker],
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK_HEADER + chunk_size + SIGNATURE_LEN);
    let mut number = first_number;
    let mut in_header = false;
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let item = match source.next(&mut buf) {
            Ok(item) => item,
            Err(e) => break Err(anyhow::anyhow!("source failed: {e}")),
        };
        match item {
            SourceItem::StreamStart { content_type } => {
                stats.streams.fetch_add(1, Ordering::Relaxed);
                stats
                    .reconnects
                    .store(source.reconnects(), Ordering::Relaxed);
                if chunk.len() > CHUNK_HEADER {
                    // Half a chunk of the old stream cannot be completed with the new one.
                    let partial = (chunk.len() - CHUNK_HEADER) as u64;
                    stats.partial_dropped.fetch_add(partial, Ordering::Relaxed);
                }
                chunk.clear();
                header.start(content_type, number);
                in_header = true;
            }
            SourceItem::Data(n) => {
                let mut data = &buf[..n];
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                if in_header {
                    header.offer(data);
                    in_header = header.get().is_none();
                }
                while !data.is_empty() {
                    if chunk.is_empty() {
                        chunk.extend_from_slice(&number.to_be_bytes());
                    }
                    let take = (CHUNK_HEADER + chunk_size - chunk.len()).min(data.len());
                    chunk.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if chunk.len() == CHUNK_HEADER + chunk_size {
                        let mut full = std::mem::replace(
                            &mut chunk,
                            Vec::with_capacity(CHUNK_HEADER + chunk_size + SIGNATURE_LEN),
                        );
                        match &output {
                            Output::Ring(signer) => {
                                // CIS: signed once here for every team of every shard.
                                if let Some(signer) = signer {
                                    signer.sign_datagram(&mut full);
                                }
                                ring.publish(number, Bytes::from(full), Instant::now());
                            }
                            Output::Digest(tx) => {
                                // The signer thread publishes it with its group's digest.
                                if tx.send(full).is_err() {
                                    break;
                                }
                            }
                        }
                        header.chunks.fetch_add(1, Ordering::Relaxed);
                        number = number.wrapping_add(1);
                        stats.chunks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // One wake per read, not per chunk: a read of many chunks is one batch.
                if matches!(output, Output::Ring(_)) {
                    for w in wakers {
                        w.wake();
                    }
                }
            }
            SourceItem::End => break Ok(()),
        }
    };
    stats.ended.store(true, Ordering::SeqCst);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ogg_page(flags: u8, granule: u64, packet: &[u8]) -> Vec<u8> {
        let mut p = b"OggS\0".to_vec();
        p.push(flags);
        p.extend_from_slice(&granule.to_le_bytes());
        p.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        p.push(1);
        p.push(packet.len() as u8);
        p.extend_from_slice(packet);
        p
    }

    #[test]
    fn auto_header_is_derived_per_stream() {
        let cell = HeaderCell::new(HeaderSize::Auto);
        cell.start(Some("audio/ogg".into()), 0);
        let mut ogg = ogg_page(2, 0, b"OpusHead\x01\x02");
        ogg.extend(ogg_page(0, 0, b"OpusTags"));
        let header = ogg.clone();
        ogg.extend(ogg_page(0, 960, &[0xf8; 200]));
        cell.offer(&ogg[..30]);
        assert!(cell.get().is_none());
        assert!(cell.wait(Duration::from_millis(1)).is_none());
        cell.offer(&ogg[30..]);
        let h = cell.get().expect("complete");
        assert_eq!((h.generation, h.bytes), (1, header));
        // The source restarts with MPEG-TS: a new header, empty, once the packets are seen.
        cell.start(Some("video/mp2t".into()), 40);
        assert!(cell.get().is_none());
        let mut ts = vec![0u8; 3 * 188];
        for p in ts.chunks_mut(188) {
            p[0] = 0x47;
        }
        cell.offer(&ts[..300]);
        assert!(cell.get().is_none());
        cell.offer(&ts[300..]);
        let h = cell.wait(Duration::from_secs(1)).expect("complete");
        assert_eq!((h.generation, h.first_chunk, h.bytes.len()), (2, 40, 0));
    }

    #[test]
    fn explicit_header_size_is_exactly_that() {
        let cell = HeaderCell::new(HeaderSize::Bytes(1000));
        cell.start(None, 0);
        cell.offer(&[7; 600]);
        assert!(cell.get().is_none());
        cell.offer(&[7; 600]);
        assert_eq!(cell.get().unwrap().bytes, vec![7; 1000]);
        let none = HeaderCell::new(HeaderSize::Bytes(0));
        none.start(None, 0);
        assert_eq!(none.get().unwrap().bytes.len(), 0);
    }
}
