//! `--thread-slice` and `--rt-priority`: one setting for the run, applied by each thread that puts
//! chunks on the wire (the source's writer, the baseline loop) as it starts, as the splitter
//! child applies them to its shards and feed.

use std::sync::OnceLock;

use p2psp::splitter::settings::WireSched;

static SCHED: OnceLock<WireSched> = OnceLock::new();

/// Sets the run's scheduling (once, before the threads start; later calls change nothing).
pub fn set(sched: WireSched) {
    let _ = SCHED.set(sched);
}

/// Whether `--rt-priority` may be used: checked once before anything starts, so that a run
/// asked for real-time threads does not quietly measure without them.
pub fn check(sched: WireSched) -> Result<(), String> {
    match sched.rt_priority {
        Some(p) => p2psp::driver::check_realtime(p).map_err(|e| {
            format!(
                "--rt-priority {p}: the kernel refuses SCHED_FIFO ({e}); run as root or with CAP_SYS_NICE, or use --rt-priority off"
            )
        }),
        None => Ok(()),
    }
}

/// Applies the run's scheduling to the calling thread, if one was set; a refusal is reported once
/// per thread on stderr and the thread goes on with the ordinary scheduler.
pub fn apply(thread: &str) {
    let Some(sched) = SCHED.get() else {
        return;
    };
    if let Some(p) = sched.rt_priority {
        match p2psp::driver::set_realtime(p) {
            Ok(()) => return,
            Err(e) => eprintln!("loadgen: cannot put the {thread} thread in SCHED_FIFO {p}: {e}"),
        }
    }
    if let Some(slice) = sched.slice
        && let Err(e) = p2psp::driver::set_thread_slice(slice)
    {
        eprintln!("loadgen: cannot set the {thread} thread's scheduler slice to {slice:?}: {e}");
    }
}
