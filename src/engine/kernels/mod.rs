//! CPU kernels of the serving forward pass, on plain slices: this file picks the
//! instruction set and runs matmuls (tiling, threads, prefetch); `quant.rs` holds the block
//! formats and their dot kernels (`x86.rs` the intrinsics), `elementwise.rs` and
//! `attention.rs` the rest.
//!
//! Quantized projections are GGML blocks read in place from candle's storage: Q8_0 (per
//! 32 values an f16 scale and 32 `i8`, 34 bytes), Q4_1 (an f16 scale and minimum and 32
//! 4-bit values, 20 bytes), Q4_0, Q5_0, Q5_1, and the K-quants Q4_K, Q5_K, Q6_K (256-value
//! super-blocks of 32-value sub-blocks: the blocks inside Q4_K_M / Q5_K_M files), times
//! activations quantized
//! once per input to the same 32-value blocks ([`QActs`], f32 scales). The integer dot
//! product of a block pair is exact; only the activation rounding (< 0.4% per value)
//! differs from an f32 product, as in llama.cpp. Each weight row is multiplied with up to
//! four activation rows at once so that prefill reads the weights once per four tokens.
//! The instruction set is picked at run time: AVX-512 VNNI or AVX-VNNI (`vpdpbusd`),
//! AVX2 (`vpmaddubsw`), or a portable loop. With AVX-512, Q4_1 rows take two blocks per
//! register (a block pair's scales fill the two halves of one vector).
//!
//! A matmul can warm memory that the work after it reads ([`Prefetch`]): the LoRA pairs of
//! the same layer, pulled into each thread's L2 while the base product computes.
//!
//! Dense f32 weights (safetensors models, tests) go through `matrixmultiply`'s sgemm.

mod attention;
mod elementwise;
pub mod panel;
mod quant;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use attention::{attend_group, attend_group_part, combine_parts, exp_in_place, exp_shifted, KvElem};
pub use elementwise::{axpy, dot, gate_mul_par, gelu_mul, gelu_tanh, rms_norm, rope, silu_mul, silu_mul_par, softmax, Gate};
pub use quant::{ActBlock, QActs, Q4_1_BYTES, Q8_0_BYTES, QK};
use quant::{tile, BlockFormat, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0};

/// Which dot-product kernel this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    AvxVnni,
    Avx2,
    Portable,
}

pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("TUNEGATE_KERNELS").is_ok_and(|v| v == "portable") {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let base = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if base
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
            {
                return Isa::Avx512Vnni;
            }
            if base && is_x86_feature_detected!("avxvnni") {
                return Isa::AvxVnni;
            }
            if base {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// AVX-512F (the attention and activation-quantization kernels), unless the portable
/// kernels were asked for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512f() -> bool {
    static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F.get_or_init(|| isa() != Isa::Portable && is_x86_feature_detected!("avx512f"))
}

/// A GGML block format the kernels read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    Q8_0,
    Q4_1,
    Q4_0,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl BlockType {
    /// Values per block (a row's length must be a multiple).
    pub fn values(self) -> usize {
        match self {
            BlockType::Q4K | BlockType::Q5K | BlockType::Q6K => Q4K::VALUES,
            _ => QK,
        }
    }

    /// Bytes per block.
    pub fn bytes(self) -> usize {
        match self {
            BlockType::Q8_0 => Q8_0::BYTES,
            BlockType::Q4_1 => Q4_1::BYTES,
            BlockType::Q4_0 => Q4_0::BYTES,
            BlockType::Q5_0 => Q5_0::BYTES,
            BlockType::Q5_1 => Q5_1::BYTES,
            BlockType::Q4K => Q4K::BYTES,
            BlockType::Q5K => Q5K::BYTES,
            BlockType::Q6K => Q6K::BYTES,
        }
    }
}

/// A projection weight `[n, k]` as the kernels read it.
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    /// GGML blocks of one type, row-major.
    Blocks(BlockType, &'a [u8]),
    /// Dense f32, row-major.
    F32(&'a [f32]),
}

/// One weight of a (possibly fused) matmul and where its outputs go: columns
/// `col..col + n` of an output whose rows are `stride` wide.
pub struct MatmulPart<'a> {
    pub weight: WeightRef<'a>,
    pub n: usize,
    pub col: usize,
}

/// Raw output pointer shared by the workers; each writes disjoint cells (f32 outputs, or
/// quantized activation blocks).
pub struct OutPtr<T = f32>(pub *mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: an `OutPtr` is only dereferenced through `at`, whose callers write disjoint cells
// from each thread (each owns its rows or columns) while the buffer outlives the region.
unsafe impl<T> Send for OutPtr<T> {}
// SAFETY: as for `Send`: shared between the pool's threads, written at disjoint cells.
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The cell `i` past the start (a method, so closures capture the `Sync` wrapper).
    #[inline]
    pub fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// Memory that the work right after a matmul reads, listed per pool thread: while the
/// matmul runs (compute-bound once a step has several rows, so the memory bus is idle),
/// each thread pulls its own list into its L2 cache a few lines per tile. The LoRA pairs of
/// a decode step are the case: read once per step, they would otherwise stream from DRAM
/// with nothing to overlap.
#[derive(Default)]
pub struct Prefetch<'a> {
    pub per_thread: Vec<Vec<&'a [u8]>>,
}

impl Prefetch<'_> {
    /// Cache lines the ranges touch.
    fn lines(ranges: &[&[u8]]) -> usize {
        ranges
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| {
                let start = r.as_ptr() as usize;
                (start + r.len()).div_ceil(64) - start / 64
            })
            .sum()
    }
}

/// One thread's walk through its prefetch list.
struct Warm<'a> {
    ranges: &'a [&'a [u8]],
    idx: usize,
    off: usize,
    per_tile: usize,
    /// Lines prefetched so far.
    issued: usize,
}

impl<'a> Warm<'a> {
    /// Spreads the thread's lines over about `tiles` calls of [`Warm::tile`].
    fn new(p: &'a Prefetch<'_>, tid: usize, tiles: usize) -> Self {
        let ranges: &'a [&'a [u8]] = p.per_thread.get(tid).map_or(&[], Vec::as_slice);
        let per_tile = Prefetch::lines(ranges).div_ceil(tiles.max(1));
        Self { ranges, idx: 0, off: 0, per_tile, issued: 0 }
    }

    #[inline]
    fn tile(&mut self) {
        for _ in 0..self.per_tile {
            if !self.line() {
                self.per_tile = 0;
                return;
            }
        }
    }

    /// Whatever the tiles did not cover (the estimate was low).
    fn rest(&mut self) {
        while self.line() {}
    }

    fn line(&mut self) -> bool {
        while let Some(r) = self.ranges.get(self.idx) {
            if self.off < r.len() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a prefetch of an address inside a live slice; it has no effect
                // on program state.
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                    _mm_prefetch::<_MM_HINT_T1>(r.as_ptr().add(self.off).cast());
                }
                // On to the next line boundary (a range need not start on one).
                self.off += 64 - (r.as_ptr() as usize + self.off) % 64;
                self.issued += 1;
                return true;
            }
            self.idx += 1;
            self.off = 0;
        }
        false
    }
}

/// Tile calls `quant_rows` makes for `rows` weight rows and `m` activation rows.
fn tile_calls(rows: usize, m: usize) -> usize {
    let full = m / 4;
    (rows / 2 + rows % 2) * full + (m - full * 4) * (rows / 4 + rows % 4)
}

/// `out[i, col_p + j] = Σ x[i, :] · W_p[j, :]` for every part `p`, `x` being `m` rows of
/// `k` (`xq` its quantized copy when any part is Q8_0). Output rows are split over the
/// pool's threads: every thread handles all `m` activation rows for its weight rows, and
/// warms its part of `prefetch` meanwhile.
#[expect(clippy::too_many_arguments, reason = "one argument per operand of the kernel")]
pub fn matmul(
    pool: &crate::engine::pool::Pool,
    x: &[f32],
    xq: &QActs,
    k: usize,
    parts: &[MatmulPart<'_>],
    out: &mut [f32],
    stride: usize,
    prefetch: &Prefetch<'_>,
) {
    let m = x.len() / k;
    debug_assert!(out.len() >= m * stride);
    let total: usize = parts.iter().map(|p| p.n).sum();
    let isa = isa();
    let threads = pool.threads().min(total.div_ceil(16)).max(1);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let work = |tid: usize| {
        if tid >= threads {
            return;
        }
        let (lo, hi) = crate::engine::pool::share(total, threads, tid);
        let ranges = || {
            let mut base = 0;
            parts.iter().filter_map(move |p| {
                let (s, e) = (lo.max(base), hi.min(base + p.n));
                let b = base;
                base += p.n;
                (s < e).then(|| (p, s - b, e - b))
            })
        };
        let mut warm = Warm::new(prefetch, tid, ranges().map(|(_, r0, r1)| tile_calls(r1 - r0, m)).sum());
        for (p, r0, r1) in ranges() {
            match p.weight {
                WeightRef::Blocks(t, w) => {
                    let rows = (isa, w, k / t.values() * t.bytes(), xq, r0, r1, out_ptr, stride, p.col);
                    match t {
                        BlockType::Q8_0 => quant_rows::<Q8_0>(rows, &mut warm),
                        BlockType::Q4_1 => quant_rows::<Q4_1>(rows, &mut warm),
                        BlockType::Q4_0 => quant_rows::<Q4_0>(rows, &mut warm),
                        BlockType::Q5_0 => quant_rows::<Q5_0>(rows, &mut warm),
                        BlockType::Q5_1 => quant_rows::<Q5_1>(rows, &mut warm),
                        BlockType::Q4K => quant_rows::<Q4K>(rows, &mut warm),
                        BlockType::Q5K => quant_rows::<Q5K>(rows, &mut warm),
                        BlockType::Q6K => quant_rows::<Q6K>(rows, &mut warm),
                    }
                }
                WeightRef::F32(w) => f32_rows(w, k, x, m, r0, r1, out_ptr, stride, p.col),
            }
        }
        warm.rest();
    };
    if threads == 1 {
        work(0);
    } else {
        pool.run(&work);
    }
}

/// What [`quant_rows`] multiplies: the ISA, the weight's bytes and bytes per row, the
/// quantized activations, the weight rows `r0..r1`, and where the outputs go (base
/// pointer, row stride, first column).
type QuantRows<'a, 'b> = (Isa, &'a [u8], usize, &'b QActs, usize, usize, OutPtr, usize, usize);

/// Rows `r0..r1` of a block-quantized weight (`row_bytes` per row) times every activation
/// row: tiles of 2 weight rows × 4 activation rows, and of 4 weight rows × 1 activation
/// row for the rest (decode).
fn quant_rows<F: BlockFormat>((isa, w, row_bytes, xq, r0, r1, out, stride, col): QuantRows<'_, '_>, warm: &mut Warm<'_>) {
    let m = xq.rows;
    let wrow = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    // Writes below: row i < m, column col + r < stride; cells are disjoint across threads
    // (each owns its weight rows).
    // SAFETY: see above; `out` covers `m × stride` cells.
    let put = |i: usize, r: usize, v: f32| unsafe { *out.at(i * stride + col + r) = v };
    let full = m / 4 * 4;
    let mut r = r0;
    while r + 2 <= r1 {
        let ws = [wrow(r), wrow(r + 1)];
        // Prefill: the next row pair arrives while this one multiplies every activation
        // row. (Not for a few rows, as a batch of decode steps has: there the LoRA pairs
        // are being warmed into L2 meanwhile, and the two compete.)
        if full >= 16 && r + 4 <= r1 {
            prefetch_l1(&w[(r + 2) * row_bytes..(r + 4) * row_bytes]);
        }
        for i in (0..full).step_by(4) {
            let v = tile::<F, 2, 4>(isa, ws, [xq.row(i), xq.row(i + 1), xq.row(i + 2), xq.row(i + 3)]);
            warm.tile();
            for (rr, row) in v.iter().enumerate() {
                for (t, &val) in row.iter().enumerate() {
                    put(i + t, r + rr, val);
                }
            }
        }
        r += 2;
    }
    if r < r1 {
        for i in (0..full).step_by(4) {
            let [v] = tile::<F, 1, 4>(isa, [wrow(r)], [xq.row(i), xq.row(i + 1), xq.row(i + 2), xq.row(i + 3)]);
            warm.tile();
            for (t, &val) in v.iter().enumerate() {
                put(i + t, r, val);
            }
        }
    }
    for i in full..m {
        let x = [xq.row(i)];
        let mut r = r0;
        while r + 4 <= r1 {
            // One activation row (decode) streams the weight once: ask for the next tile's
            // rows while this one computes (the stalls sat on each block's first load).
            if m - full == 1 && r + 8 <= r1 {
                prefetch_l1(&w[(r + 4) * row_bytes..(r + 8) * row_bytes]);
            }
            let v = tile::<F, 4, 1>(isa, [wrow(r), wrow(r + 1), wrow(r + 2), wrow(r + 3)], x);
            warm.tile();
            for (rr, [val]) in v.into_iter().enumerate() {
                put(i, r + rr, val);
            }
            r += 4;
        }
        while r < r1 {
            let [[val]] = tile::<F, 1, 1>(isa, [wrow(r)], x);
            warm.tile();
            put(i, r, val);
            r += 1;
        }
    }
}

/// Prefetches every cache line of `bytes` (a hint: no effect on program state).
#[inline]
fn prefetch_l1(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut off = 0;
        while off < bytes.len() {
            // SAFETY: a prefetch of an address inside a live slice has no effect on program
            // state.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(bytes.as_ptr().add(off).cast()) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

#[expect(clippy::too_many_arguments, reason = "one argument per operand of the kernel")]
fn f32_rows(w: &[f32], k: usize, x: &[f32], m: usize, r0: usize, r1: usize, out: OutPtr, stride: usize, col: usize) {
    let n = r1 - r0;
    // SAFETY: A is `x` [m, k]; B = W[r0..r1]ᵀ read with strides (1, k); C is the output block.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr().add(r0 * k),
            1,
            k as isize,
            0.0,
            out.at(col + r0),
            stride as isize,
            1,
        );
    }
}

