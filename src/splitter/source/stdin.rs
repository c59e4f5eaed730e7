//! The stdin source: standard input (or any reader), read as it comes.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread;

use super::{STOP_POLL, Source, SourceError, SourceItem, drain, ready, stopped};

/// Standard input (or any byte stream), read as it comes. A helper thread does the blocking reads
/// so that [`Source::next`] can still see the stop flag; it ends at end of input, or at its next
/// read once the source is dropped.
#[derive(Debug)]
pub struct StdinSource {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    pending: Vec<u8>,
    pos: usize,
    started: bool,
    ended: bool,
    stop: Arc<AtomicBool>,
}

impl StdinSource {
    /// Reads standard input.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self::from_reader(io::stdin(), stop)
    }

    /// Reads `reader` the same way as standard input (for pipes and tests).
    pub fn from_reader<R: Read + Send + 'static>(mut reader: R, stop: Arc<AtomicBool>) -> Self {
        // A few reads of look-ahead: enough to ride out scheduling, small enough to bound memory.
        let (tx, rx) = mpsc::sync_channel(8);
        let spawned = thread::Builder::new()
            .name("source-stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let msg = match reader.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => Ok(buf[..n].to_vec()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(e),
                    };
                    let failed = msg.is_err();
                    if tx.send(msg).is_err() || failed {
                        return;
                    }
                }
            });
        let rx = match spawned {
            Ok(_) => rx,
            Err(e) => {
                // Report the failure on the first read.
                let (tx, rx) = mpsc::sync_channel(1);
                let _ = tx.send(Err(e));
                rx
            }
        };
        Self {
            rx,
            pending: Vec::new(),
            pos: 0,
            started: false,
            ended: false,
            stop,
        }
    }
}

impl Source for StdinSource {
    fn next(&mut self, buf: &mut [u8]) -> Result<SourceItem, SourceError> {
        if stopped(&self.stop) {
            return Ok(SourceItem::End);
        }
        if !self.started {
            self.started = true;
            return Ok(SourceItem::StreamStart { content_type: None });
        }
        if let Some(item) = ready(&mut self.pending, &mut self.pos, buf) {
            return Ok(item);
        }
        while !self.ended {
            match self.rx.recv_timeout(STOP_POLL) {
                Ok(Ok(data)) => {
                    self.pending = data;
                    self.pos = 0;
                    return Ok(SourceItem::Data(drain(
                        &mut self.pending,
                        &mut self.pos,
                        buf,
                    )));
                }
                Ok(Err(source)) => {
                    self.ended = true;
                    return Err(SourceError::Stdin { source });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if stopped(&self.stop) {
                        return Ok(SourceItem::End);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => self.ended = true,
            }
        }
        Ok(SourceItem::End)
    }

    fn describe(&self) -> String {
        "stdin".to_owned()
    }

    fn reconnects(&self) -> u64 {
        0
    }
}
