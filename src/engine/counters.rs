//! Lock-free counters the engine thread updates and anyone may read at any time (the
//! readiness endpoint, the Prometheus scrape). Plain atomics: the engine never waits on a
//! reader and a reader never waits on a step. Nothing here knows about Prometheus.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::EngineStats;

/// The engine's live numbers. Shared as `Arc<EngineCounters>` between the engine handle,
/// the engine thread and observers.
#[derive(Debug)]
pub struct EngineCounters {
    /// Requests accepted by `submit` and not yet admitted into the running batch.
    pub(crate) queued: AtomicUsize,
    running: AtomicUsize,
    kv_cache_bytes: AtomicUsize,
    last_batch_size: AtomicUsize,
    /// `steps[n]`: forward passes that ran `n` sequences; the last slot also counts any
    /// larger batch (there is none while `max_batch` holds).
    steps: Box<[AtomicU64]>,
}

impl EngineCounters {
    /// Counters for an engine running at most `max_batch` sequences per step.
    pub fn new(max_batch: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_cache_bytes: AtomicUsize::new(0),
            last_batch_size: AtomicUsize::new(0),
            steps: (0..=max_batch.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A consistent-enough snapshot (each field is read once, without a lock).
    pub fn stats(&self) -> EngineStats {
        let g = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        EngineStats {
            queued: g(&self.queued),
            running: g(&self.running),
            kv_cache_bytes: g(&self.kv_cache_bytes),
            last_batch_size: g(&self.last_batch_size),
        }
    }

    /// Forward passes by batch size: element `n` counts the steps that ran `n` sequences.
    pub fn steps_by_batch_size(&self) -> Vec<u64> {
        self.steps.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }

    /// One forward pass over `size` sequences (engine thread).
    pub(crate) fn record_step(&self, size: usize) {
        self.last_batch_size.store(size, Ordering::Relaxed);
        if let Some(slot) = self.steps.get(size).or(self.steps.last()) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The running batch after a loop iteration (engine thread).
    pub(crate) fn set_running(&self, sequences: usize, kv_cache_bytes: usize) {
        self.running.store(sequences, Ordering::Relaxed);
        self.kv_cache_bytes.store(kv_cache_bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_counted_by_size_and_oversize_goes_last() {
        let c = EngineCounters::new(4);
        for size in [1, 1, 3, 4, 9] {
            c.record_step(size);
        }
        assert_eq!(c.steps_by_batch_size(), vec![0, 2, 0, 1, 2]);
        assert_eq!(c.stats().last_batch_size, 9);
        c.set_running(2, 1024);
        assert_eq!((c.stats().running, c.stats().kv_cache_bytes), (2, 1024));
    }
}
