//! Adding a batch's LoRA deltas in the serving pass: per region (the projections that
//! share an input) the adapter groups' products are planned before the base matmul, so each
//! thread warms its pairs into its cache meanwhile ([`LoraRegion::prefetch`]), then added
//! ([`LoraRegion::apply`]): decode rows through the register kernels (`kernels.rs`),
//! prefill runs through two small GEMMs per pair.

use std::sync::Mutex;

use half::slice::HalfFloatSliceExt;

use super::{kernels as lora_kernels, BatchLora, Proj, ServingPair};
use crate::engine::forward::{room, sized};
use crate::engine::kernels::{self, OutPtr};
use crate::engine::pool::Pool;
use crate::engine::{EngineError, Result};

/// An adapter group with at most this many rows in a step reads its f16 pairs straight
/// into registers (`kernels.rs`); larger groups widen each pair once and reuse it.
const REGISTER_LORA_ROWS: usize = 4;

/// A serving pair's matrix as stored.
#[derive(Clone, Copy)]
enum Values<'a> {
    F16(&'a [half::f16]),
    F32(&'a [f32]),
}

impl<'a> Values<'a> {
    fn len(&self) -> usize {
        match self {
            Values::F16(v) => v.len(),
            Values::F32(v) => v.len(),
        }
    }

    /// The stored bytes (what the cache holds).
    fn bytes(&self) -> &'a [u8] {
        let (p, n): (*const u8, usize) = match *self {
            Values::F16(v) => (v.as_ptr().cast(), std::mem::size_of_val(v)),
            Values::F32(v) => (v.as_ptr().cast(), std::mem::size_of_val(v)),
        };
        // SAFETY: the same live allocation viewed as bytes (every bit pattern is a valid u8).
        unsafe { std::slice::from_raw_parts(p, n) }
    }

    /// The values as f32: borrowed, or widened into `buf`.
    fn as_f32<'b>(&self, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            Values::F32(v) => v,
            Values::F16(v) => {
                let out = room(buf, v.len());
                v.convert_to_f32_slice(out);
                out
            }
        }
    }
}

/// One LoRA product of a region: a group's pair for one projection.
#[derive(Clone, Copy)]
struct LoraJob<'a> {
    /// The group's rows, as runs `(start, len)`.
    runs: &'a [(usize, usize)],
    /// Where the projection's outputs start in the region's output rows.
    col: usize,
    rank: usize,
    a: Values<'a>,
    b: Values<'a>,
}

/// The adapter products of one region (projections sharing an input), planned before the
/// region's base matmul so that each thread can warm its pairs into its cache while that
/// matmul runs ([`LoraRegion::prefetch`]), then added by [`LoraRegion::apply`]. Jobs are
/// dealt to the pool's threads round-robin, the same way in both.
pub(crate) struct LoraRegion<'a> {
    lora: &'a BatchLora<'a>,
    jobs: Vec<LoraJob<'a>>,
    /// Input width.
    k: usize,
    threads: usize,
}

impl<'a> BatchLora<'a> {
    /// The products for `layer`'s projections `projs` (each with the column where its
    /// outputs start), whose input rows are `k` wide, over `threads` threads.
    pub(crate) fn region(&'a self, threads: usize, layer: usize, projs: &[(Proj, usize)], k: usize) -> Result<LoraRegion<'a>> {
        let mut jobs = Vec::new();
        for (weights, runs) in self.serving_groups() {
            let serving = weights.serving()?;
            let Some(slots) = serving.get(layer) else { continue };
            for &(p, col) in projs {
                let Some(pair) = &slots[p as usize] else { continue };
                let (a, b) = match pair {
                    ServingPair::F16(a, b) => (Values::F16(a), Values::F16(b)),
                    ServingPair::F32(a, b) => (Values::F32(a), Values::F32(b)),
                };
                let rank = a.len() / k;
                if rank == 0 || a.len() != rank * k || b.len() % rank != 0 {
                    return Err(EngineError::Internal("LoRA pair shape does not match its projection".into()));
                }
                jobs.push(LoraJob { runs, col, rank, a, b });
            }
        }
        let threads = threads.min(jobs.len()).max(1);
        Ok(LoraRegion { lora: self, jobs, k, threads })
    }
}

impl LoraRegion<'_> {
    fn jobs_of(&self, tid: usize) -> impl Iterator<Item = &LoraJob<'_>> {
        self.jobs.iter().skip(tid).step_by(self.threads).take(if tid < self.threads { usize::MAX } else { 0 })
    }

    /// Each thread's pair bytes, for the matmul before [`LoraRegion::apply`] to warm.
    pub(crate) fn prefetch(&self) -> kernels::Prefetch<'_> {
        if self.jobs.is_empty() {
            return kernels::Prefetch::default();
        }
        let per_thread = (0..self.threads)
            .map(|tid| self.jobs_of(tid).flat_map(|j| [j.a.bytes(), j.b.bytes()]).collect())
            .collect();
        kernels::Prefetch { per_thread }
    }

    /// Adds each group's `x·Aᵀ·s·Bᵀ` to its rows of `y` (`stride` wide), at each job's columns.
    pub(crate) fn apply(&self, pool: &Pool, x: &[f32], y: &mut [f32], stride: usize) -> Result<()> {
        if self.jobs.is_empty() {
            return Ok(());
        }
        let k = self.k;
        let m = x.len() / k;
        // Every group's runs lie inside the batch's rows (by construction): the kernels
        // below index rows without further checks.
        if x.len() != m * k || y.len() < m * stride || m != self.lora.total_rows() {
            return Err(EngineError::Internal("LoRA rows do not match the batch".into()));
        }
        let out = OutPtr(y.as_mut_ptr());
        let failed = Mutex::new(false);
        // Jobs (a group's product for one projection) write disjoint cells.
        let work = |tid: usize| {
            let (mut tmp, mut a32, mut b32) = (Vec::new(), Vec::new(), Vec::new());
            for &LoraJob { runs, col, rank: r, a: a_src, b: b_src } in self.jobs_of(tid) {
                let n_out = b_src.len() / r;
                if col + n_out > stride {
                    if let Ok(mut f) = failed.lock() {
                        *f = true;
                    }
                    continue;
                }
                let count: usize = runs.iter().map(|&(_, len)| len).sum();
                if let (Values::F16(a), Values::F16(bv)) = (a_src, b_src) {
                    if count <= REGISTER_LORA_ROWS && lora_kernels::fused(r) {
                        // Decode: each pair byte is read once, widened in registers.
                        for i in runs.iter().flat_map(|&(start, len)| start..start + len) {
                            let xr = &x[i * k..(i + 1) * k];
                            // SAFETY: row i (< m, checked above) belongs to this group alone;
                            // columns inside `stride`.
                            let yr = unsafe { std::slice::from_raw_parts_mut(out.at(i * stride + col), n_out) };
                            let done = lora_kernels::row_f16(xr, a, bv, r, yr);
                            debug_assert!(done, "fused() admitted rank {r}");
                        }
                        continue;
                    }
                }
                // Many rows (prefill): the pair is widened once per job and each run of
                // consecutive rows (a sequence's) goes through two small GEMMs.
                let a = a_src.as_f32(&mut a32);
                let bv = b_src.as_f32(&mut b32);
                for &(start, len) in runs {
                    let t = sized(&mut tmp, len * r);
                    // SAFETY: runs lie inside 0..m (checked above), so x holds rows
                    // start..start+len of k values; `a` is [k, r], `t` [len, r], `bv`
                    // [r, n_out]; the output block lies in this group's rows and the job's
                    // columns (checked against `stride` above).
                    unsafe {
                        matrixmultiply::sgemm(len, k, r, 1.0, x.as_ptr().add(start * k), k as isize, 1, a.as_ptr(), r as isize, 1, 0.0, t.as_mut_ptr(), r as isize, 1);
                        matrixmultiply::sgemm(len, r, n_out, 1.0, t.as_ptr(), r as isize, 1, bv.as_ptr(), n_out as isize, 1, 1.0, out.at(start * stride + col), stride as isize, 1);
                    }
                }
            }
        };
        if self.threads == 1 {
            work(0);
        } else {
            pool.run(&work);
        }
        if failed.into_inner().unwrap_or(true) {
            return Err(EngineError::Internal("LoRA output wider than its projection".into()));
        }
        Ok(())
    }
}
