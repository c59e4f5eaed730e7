//! `--thread-slice`: one setting for the run, applied by each thread that puts chunks on the wire
//! (the source's writer, the baseline loop) as it starts.

use std::sync::OnceLock;
use std::time::Duration;

static SLICE: OnceLock<Option<Duration>> = OnceLock::new();

/// Sets the run's slice (once, before the threads start; later calls change nothing).
pub fn set(slice: Option<Duration>) {
    let _ = SLICE.set(slice);
}

/// Applies the run's slice to the calling thread, if one was set; a refusal is reported once
/// per thread on stderr and the thread goes on with the kernel's default.
pub fn apply(thread: &str) {
    if let Some(Some(slice)) = SLICE.get()
        && let Err(e) = p2psp::driver::set_thread_slice(*slice)
    {
        eprintln!("loadgen: cannot set the {thread} thread's scheduler slice to {slice:?}: {e}");
    }
}
