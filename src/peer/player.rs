//! Serving the played stream: HTTP to players (VLC, mpv, ffplay) and `--output`.
//!
//! A player gets `HTTP/1.0 200`, the stream header, then chunks in order from the moment it
//! connected. A player that disconnects and comes back is served again. A slow player never holds
//! the peer back: chunks it cannot take are counted and it is dropped after a write timeout.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use super::Output;
use crate::http::ResponseHead;

/// Played chunks waiting for the player thread.
const QUEUE: usize = 4096;

/// Splits the fetched header into the HTTP head players get and the stream header bytes.
///
/// A splitter of this project (and a reference splitter in front of Icecast) answers the header
/// request with an HTTP response, whose head goes to players as it is; otherwise a plain
/// `HTTP/1.0 200` head is made up.
pub fn split_header(header: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if let Ok(Some((_, used))) = ResponseHead::parse(header) {
        return (header[..used].to_vec(), header[used..].to_vec());
    }
    let head =
        crate::http::response_head(200, "OK", &[("Content-Type", "application/octet-stream")]);
    (head, header.to_vec())
}

/// Starts the player thread; returns where to send played chunk payloads.
pub fn spawn(
    listener: Option<TcpListener>,
    output: Option<Output>,
    header: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Sender<Bytes>, JoinHandle<()>)> {
    let (head, stream_header) = split_header(&header);
    let mut out: Option<Box<dyn Write + Send>> = match output {
        Some(Output::File(p)) => Some(Box::new(std::io::BufWriter::new(
            File::create(&p)
                .map_err(|e| anyhow::anyhow!("cannot create --output {}: {e}", p.display()))?,
        ))),
        Some(Output::Stdout) => Some(Box::new(std::io::stdout())),
        Some(Output::Check(checker)) => Some(Box::new(CheckWriter {
            checker,
            header: true,
        })),
        None => None,
    };
    if let Some(o) = out.as_mut() {
        o.write_all(&stream_header)?;
    }
    if let Some(l) = &listener {
        l.set_nonblocking(true)?;
    }
    let (tx, rx) = crossbeam_channel::bounded::<Bytes>(QUEUE);
    let handle = std::thread::Builder::new()
        .name("player".into())
        .spawn(move || {
            serve(listener, out, head, stream_header, rx, stop);
        })?;
    Ok((tx, handle))
}

fn serve(
    listener: Option<TcpListener>,
    mut out: Option<Box<dyn Write + Send>>,
    head: Vec<u8>,
    stream_header: Vec<u8>,
    rx: Receiver<Bytes>,
    _stop: Arc<AtomicBool>,
) {
    let mut players: Vec<TcpStream> = Vec::new();
    loop {
        if let Some(l) = &listener {
            while let Ok((mut p, addr)) = l.accept() {
                let _ = p.set_nonblocking(false);
                let _ = p.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = p.set_read_timeout(Some(Duration::from_millis(200)));
                // Read (and ignore) the request so closing later does not reset the connection.
                let mut req = [0u8; 4096];
                let _ = p.read(&mut req);
                if p.write_all(&head)
                    .and_then(|_| p.write_all(&stream_header))
                    .is_ok()
                {
                    tracing::info!("player {addr} connected");
                    players.push(p);
                }
            }
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(chunk) => {
                if let Some(o) = out.as_mut()
                    && let Err(e) = o.write_all(&chunk)
                {
                    if e.kind() != ErrorKind::BrokenPipe {
                        tracing::warn!("--output write failed: {e}; output stops");
                    }
                    out = None;
                }
                players.retain_mut(|p| p.write_all(&chunk).is_ok());
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
    }
    if let Some(mut o) = out {
        let _ = o.flush();
    }
}

/// Feeds `--output` writes to a pattern checker: the first write is the stream header, every
/// later one a chunk payload.
struct CheckWriter {
    checker: Arc<crate::pattern::Checker>,
    header: bool,
}

impl Write for CheckWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::mem::take(&mut self.header) {
            self.checker.header(buf);
        } else {
            self.checker.chunk(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
