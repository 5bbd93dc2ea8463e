//! The serving forward pass's worker pool: `threads - 1` workers plus the calling thread,
//! running one closure per "region" (a matmul, the attention of a batch) and meeting at
//! its end. A decode step has a few regions per layer, so the hand-off must cost about a
//! microsecond, not the tens that waking a parked thread or a work-stealing queue costs:
//! workers spin on an epoch counter for a short while after each region and only then
//! park (so an idle engine does not keep a core busy).
//!
//! One region runs at a time. A second caller (a training job's evaluation while the
//! engine serves) that finds the pool busy runs its closure for every worker index itself,
//! on its own thread: same result, no waiting on the engine.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(300);

type Job = *const (dyn Fn(usize) + Sync);

struct Inner {
    threads: usize,
    epoch: AtomicU64,
    /// Written by the caller before `epoch` is bumped (Release), read by workers after
    /// they see the new epoch (Acquire); valid until `pending` drops to zero.
    job: UnsafeCell<Option<Job>>,
    pending: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written while no region runs (the caller holds `busy`) and only
// read by workers between the epoch bump and their decrement of `pending`.
unsafe impl Sync for Inner {}
// SAFETY: as for `Sync`; the workers own nothing else of it.
unsafe impl Send for Inner {}

pub struct Pool {
    inner: Arc<Inner>,
    busy: Mutex<()>,
}

impl Pool {
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            threads,
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for tid in 1..threads {
            let inner = inner.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tunegate-kernel-{tid}"))
                .spawn(move || worker(&inner, tid));
            if let Err(e) = spawned {
                tracing::error!("could not start kernel worker {tid}: {e}");
            }
        }
        Self { inner, busy: Mutex::new(()) }
    }

    /// Participants of a region (the caller included).
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Runs `f(tid)` for every `tid` in `0..threads()` and returns when all have finished.
    /// A panic in any of them is re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let n = self.inner.threads;
        let guard = match (n > 1).then(|| self.busy.try_lock()) {
            Some(Ok(g)) => g,
            _ => {
                (0..n).for_each(f);
                return;
            }
        };
        let inner = &*self.inner;
        // SAFETY: the lifetime is erased for the hand-off; we wait below until every worker
        // is done with `f` before returning.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: no region runs (we hold `busy`), so no worker reads `job` now.
        unsafe { *inner.job.get() = Some(job) };
        inner.pending.store(n - 1, Ordering::SeqCst);
        inner.epoch.fetch_add(1, Ordering::SeqCst);
        if inner.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = inner.lock.lock().unwrap_or_else(|p| p.into_inner());
            inner.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        let mut spins = 0u32;
        while inner.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: `pending` is zero: every worker is done reading `job`.
        unsafe { *inner.job.get() = None };
        let theirs = inner.panicked.swap(false, Ordering::SeqCst);
        drop(guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if theirs {
            std::panic::resume_unwind(Box::new("a kernel worker panicked"));
        }
    }
}

fn worker(inner: &Inner, tid: usize) {
    // The epoch the pool was created with: a region may start before this thread does.
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let mut now = inner.epoch.load(Ordering::Acquire);
        while now == seen {
            spins = spins.wrapping_add(1);
            std::hint::spin_loop();
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                // Park until the next region.
                let mut g = inner.lock.lock().unwrap_or_else(|p| p.into_inner());
                inner.sleepers.fetch_add(1, Ordering::SeqCst);
                while inner.epoch.load(Ordering::SeqCst) == seen {
                    g = match inner.wake.wait_timeout(g, Duration::from_millis(500)) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                }
                inner.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
            }
            now = inner.epoch.load(Ordering::Acquire);
        }
        seen = now;
        // SAFETY: see `Inner`; the caller keeps `f` alive until `pending` is zero.
        if let Some(job) = unsafe { *inner.job.get() } {
            // SAFETY: the caller keeps `f` alive until `pending` is zero, after this call.
            let f: &(dyn Fn(usize) + Sync) = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tid))).is_err() {
                inner.panicked.store(true, Ordering::SeqCst);
            }
        }
        inner.pending.fetch_sub(1, Ordering::Release);
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sizes the process-wide serving pool; the first call wins (the engine calls it before
/// loading the model). Later calls with another size are ignored.
pub fn init(threads: usize) -> &'static Pool {
    POOL.get_or_init(|| Pool::new(threads))
}

/// The process-wide serving pool (the engine's size, else the machine's cores).
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
}

/// Runs `f` over `0..n` for the training path's kernels: on candle's worker pool, where the
/// rest of a training step's ops run (a second pool would spin beside it for the same
/// cores), or all on the calling thread when the current rayon pool has one thread (a job
/// run with `[training] threads = 1`, which leaves the other cores to serving).
pub fn training_chunks(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if rayon::current_num_threads() <= 1 {
        f(0..n);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(n, f);
    }
}

/// `[start, end)` of `tid`'s share when `n` items are split over `parts`.
pub fn share(n: usize, parts: usize, tid: usize) -> (usize, usize) {
    let parts = parts.max(1);
    let (q, r) = (n / parts, n % parts);
    let start = tid * q + tid.min(r);
    (start, start + q + usize::from(tid < r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_region() {
        let pool = Pool::new(3);
        for _ in 0..2000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|tid| {
                hits[tid].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
        // After parking, a region still runs on every worker.
        std::thread::sleep(Duration::from_millis(5));
        let total = AtomicUsize::new(0);
        pool.run(&|tid| {
            total.fetch_add(tid + 1, Ordering::SeqCst);
        });
        assert_eq!(total.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|tid| {
                if tid == 1 {
                    std::panic::resume_unwind(Box::new("boom"));
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn shares_cover_the_range() {
        for n in [0, 1, 5, 960, 1537] {
            for parts in 1..5 {
                let mut next = 0;
                for t in 0..parts {
                    let (s, e) = share(n, parts, t);
                    assert_eq!(s, next);
                    next = e;
                }
                assert_eq!(next, n);
            }
        }
    }
}
