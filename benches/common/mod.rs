//! Settings shared by the benches: short runs, so that `cargo bench` as a whole stays within a few
//! minutes on a noisy 2-core machine. `criterion_group!` applies Criterion's command-line flags on
//! top, so they still override these (for example `cargo bench --bench ring -- --measurement-time 10`).

use std::time::Duration;

use criterion::Criterion;

/// A short-run configuration: `warm_up` then `measure` per benchmark, `samples` samples, and a 5 %
/// noise threshold (smaller changes are noise on this machine, see perf/README.md).
pub fn config(warm_up: Duration, measure: Duration, samples: usize) -> Criterion {
    Criterion::default()
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .sample_size(samples)
        .noise_threshold(0.05)
        .without_plots()
}
