//! The thread pool the training stages run in.
//!
//! The fused training ops and the matmul split their work over the current rayon pool. Called from a thread
//! outside any pool, every parallel region hands its work over to sleeping pool threads and blocks until they
//! finish: a futex wake and wait per region, and a SmolLM2 step has thousands of regions (perf: a quarter of
//! the step's samples in the scheduler). Run from inside the pool, the calling thread is a worker that does its
//! share and steals the rest, and the other workers are still spinning from the previous region.

use std::sync::OnceLock;

/// Runs `f` on a worker of the training pool (one thread per core; `RAYON_NUM_THREADS` overrides).
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| rayon::ThreadPoolBuilder::new().thread_name(|i| format!("train-{i}")).build().ok());
    match pool {
        Some(pool) => pool.install(f),
        // No threads could be started: run here (the ops still work, on the global pool).
        None => f(),
    }
}
