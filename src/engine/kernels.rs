//! CPU kernels of the serving forward pass, on plain slices.
//!
//! Quantized projections are Q8_0 weights (GGML's layout: per 32 values an f16 scale and
//! 32 `i8`, 34 bytes) or Q4_1 weights (an f16 scale and minimum and 32 4-bit values, 20
//! bytes), read in place from candle's storage, times activations quantized
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

use half::f16;

/// Values per quantization block.
pub const QK: usize = 32;
/// Bytes of one GGML Q8_0 block.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of one GGML Q4_1 block: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles
/// (low nibble of byte `j` is value `j`, high nibble value `j + 16`); value = q·d + m.
pub const Q4_1_BYTES: usize = 20;

/// One block of quantized activations.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(4))]
pub struct ActBlock {
    pub d: f32,
    /// `d · Σ qs`: what a Q4_1 block's minimum multiplies.
    pub s: f32,
    pub qs: [i8; QK],
}

impl ActBlock {
    const ZERO: Self = Self { d: 0.0, s: 0.0, qs: [0; QK] };
}

/// `m` activation rows of `k` values quantized to blocks (`k / 32` per row).
#[derive(Default, Debug)]
pub struct QActs {
    pub blocks: Vec<ActBlock>,
    pub rows: usize,
    pub per_row: usize,
}

/// Blocks from this many on are quantized by every pool thread (a share each).
const PARALLEL_BLOCKS: usize = 96;

impl QActs {
    /// Quantizes `x` (`m` rows of `k`, `k` a multiple of 32), reusing the buffer.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        self.quantize_on(None, x, k);
    }

    /// The same, with the blocks shared over `pool`'s threads when there are many (a
    /// batch's rows): the other threads would otherwise wait for this serial pass.
    pub fn quantize_par(&mut self, pool: &super::pool::Pool, x: &[f32], k: usize) {
        self.quantize_on(Some(pool), x, k);
    }

    fn quantize_on(&mut self, pool: Option<&super::pool::Pool>, x: &[f32], k: usize) {
        let nb = k / QK;
        let m = x.len() / k;
        self.rows = m;
        self.per_row = nb;
        let n = x.len() / QK;
        self.blocks.clear();
        self.blocks.resize(n, ActBlock::ZERO);
        match pool {
            Some(pool) if n >= PARALLEL_BLOCKS && pool.threads() > 1 => {
                let out = OutPtr(self.blocks.as_mut_ptr());
                let threads = pool.threads();
                pool.run(&|tid| {
                    let (b0, b1) = super::pool::share(n, threads, tid);
                    // SAFETY: shares are disjoint block ranges inside `blocks` (n long).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(b0), b1 - b0) };
                    quantize_blocks(&x[b0 * QK..b1 * QK], dst);
                });
            }
            _ => quantize_blocks(&x[..n * QK], &mut self.blocks),
        }
    }

    fn row(&self, r: usize) -> &[ActBlock] {
        &self.blocks[r * self.per_row..(r + 1) * self.per_row]
    }
}

/// `x.len() / 32` blocks into `out` (as long).
fn quantize_blocks(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512f() {
            // SAFETY: the CPU has AVX-512F; `x` holds `out.len()` whole blocks.
            unsafe { x86_quant::quantize_avx512(x, out) };
            return;
        }
    }
    quantize_blocks_portable(x, out);
}

/// The plain loop of [`quantize_blocks`] (what the vector version must equal).
fn quantize_blocks_portable(x: &[f32], out: &mut [ActBlock]) {
    for (chunk, block) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(chunk) {
            *q = (v * id).round().clamp(-127.0, 127.0) as i8;
            sum += i32::from(*q);
        }
        *block = ActBlock { d, s: d * sum as f32, qs };
    }
}

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

/// Dot products of `R` Q8_0 weight rows (raw bytes, `nb` blocks each) with `N` activation
/// rows: `R × N` independent accumulators, so neither decode (one activation row; several
/// weight rows) nor prefill (one weight row; several activation rows) waits on one chain.
fn tile_q8_0<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa()` checked the CPU features each variant is compiled for; the slices
    // hold `nb` blocks each (checked by the callers' shapes).
    unsafe {
        match isa {
            Isa::Avx512Vnni => return x86::q8_0_vnni512::<R, N>(ws, xs),
            Isa::AvxVnni => return x86::q8_0_vnni256::<R, N>(ws, xs),
            Isa::Avx2 => return x86::q8_0_avx2::<R, N>(ws, xs),
            Isa::Portable => {}
        }
    }
    let _ = isa;
    ws.map(|w| q8_0_portable::<N>(w, xs))
}

/// The same for Q4_1 weight rows.
fn tile_q4_1<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `tile_q8_0`.
    unsafe {
        match isa {
            Isa::Avx512Vnni => return x86::q4_1_vnni512_pairs::<R, N>(ws, xs),
            Isa::AvxVnni => return x86::q4_1_vnni256::<R, N>(ws, xs),
            Isa::Avx2 => return x86::q4_1_avx2::<R, N>(ws, xs),
            Isa::Portable => {}
        }
    }
    let _ = isa;
    ws.map(|w| q4_1_portable::<N>(w, xs))
}

fn f16_at(w: &[u8], o: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([w[o], w[o + 1]])).to_f32()
}

fn q4_1_portable<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
    let nb = w.len() / Q4_1_BYTES;
    let mut out = [0f32; N];
    for b in 0..nb {
        let o = b * Q4_1_BYTES;
        let (d, m) = (f16_at(w, o), f16_at(w, o + 2));
        let qs = &w[o + 4..o + Q4_1_BYTES];
        for (acc, x) in out.iter_mut().zip(&xs) {
            let xb = &x[b];
            let mut s = 0i32;
            for (j, &q) in qs.iter().enumerate() {
                s += i32::from(q & 0x0F) * i32::from(xb.qs[j]) + i32::from(q >> 4) * i32::from(xb.qs[j + 16]);
            }
            *acc += d * xb.d * s as f32 + m * xb.s;
        }
    }
    out
}

fn q8_0_portable<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
    let nb = w.len() / Q8_0_BYTES;
    let mut out = [0f32; N];
    for b in 0..nb {
        let dw = f16_at(w, b * Q8_0_BYTES);
        let wq = &w[b * Q8_0_BYTES + 2..(b + 1) * Q8_0_BYTES];
        for (o, x) in out.iter_mut().zip(&xs) {
            let xb = &x[b];
            let s: i32 = wq.iter().zip(&xb.qs).map(|(&a, &c)| i32::from(a as i8) * i32::from(c)).sum();
            *o += dw * xb.d * s as f32;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActBlock, Q4_1_BYTES, Q8_0_BYTES};
    use std::arch::x86_64::*;

    macro_rules! q8_0_impl {
        ($name:ident, $features:literal, $dot:ident) => {
            /// `R` Q8_0 weight rows against `N` activation rows: the dot products.
            ///
            /// # Safety
            /// The CPU has `$features`; every `ws[r]` holds at least `ws[0].len()` bytes, a
            /// whole number of Q8_0 blocks; every `xs[t]` holds at least that many blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize, const N: usize>(ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
                let nb = ws[0].len() / Q8_0_BYTES;
                let mut acc = [[_mm256_setzero_ps(); N]; R];
                for b in 0..nb {
                    let mut wq = [_mm256_setzero_si256(); R];
                    let mut dw = [0f32; R];
                    for r in 0..R {
                        let wb = ws[r].as_ptr().add(b * Q8_0_BYTES);
                        let bits = u16::from_le_bytes([*wb, *wb.add(1)]);
                        dw[r] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))));
                        wq[r] = _mm256_loadu_si256(wb.add(2) as *const __m256i);
                    }
                    for t in 0..N {
                        let xb = xs[t].get_unchecked(b);
                        let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        // |x| as u8 times sign(x)·w as i8: the unsigned × signed product the
                        // instructions offer, equal to x·w.
                        let ax = _mm256_sign_epi8(xq, xq);
                        for r in 0..R {
                            let s = $dot(ax, _mm256_sign_epi8(wq[r], xq));
                            acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * xb.d), _mm256_cvtepi32_ps(s), acc[r][t]);
                        }
                    }
                }
                let mut out = [[0f32; N]; R];
                for r in 0..R {
                    for t in 0..N {
                        out[r][t] = hsum(acc[r][t]);
                    }
                }
                out
            }
        };
    }

    macro_rules! q4_1_impl {
        ($name:ident, $features:literal, $dot:ident) => {
            /// `R` Q4_1 weight rows against `N` activation rows: the dot products.
            ///
            /// # Safety
            /// The CPU has `$features`; every `ws[r]` holds at least `ws[0].len()` bytes, a
            /// whole number of Q4_1 blocks; every `xs[t]` holds at least that many blocks.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize, const N: usize>(ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
                let nb = ws[0].len() / Q4_1_BYTES;
                let mut acc = [[_mm256_setzero_ps(); N]; R];
                let mut mins = [[0f32; N]; R];
                let low = _mm_set1_epi8(0x0F);
                for b in 0..nb {
                    let mut q = [_mm256_setzero_si256(); R];
                    let mut d = [0f32; R];
                    let mut m = [0f32; R];
                    for r in 0..R {
                        let wb = ws[r].as_ptr().add(b * Q4_1_BYTES);
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([*wb, *wb.add(1), *wb.add(2), *wb.add(3)])));
                        d[r] = _mm_cvtss_f32(dm);
                        m[r] = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
                        let raw = _mm_loadu_si128(wb.add(4) as *const __m128i);
                        // Values 0..16 then 16..32, the activations' order; unsigned, so the
                        // u8 × i8 instructions apply directly.
                        q[r] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
                    }
                    for t in 0..N {
                        let xb = xs[t].get_unchecked(b);
                        let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        for r in 0..R {
                            let s = $dot(q[r], xq);
                            acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(d[r] * xb.d), _mm256_cvtepi32_ps(s), acc[r][t]);
                            mins[r][t] += m[r] * xb.s;
                        }
                    }
                }
                let mut out = [[0f32; N]; R];
                for r in 0..R {
                    for t in 0..N {
                        out[r][t] = hsum(acc[r][t]) + mins[r][t];
                    }
                }
                out
            }
        };
    }

    /// Q4_1 rows two blocks per 512-bit register (AVX-512 VNNI): per block pair and row
    /// pair, one `vpdpbusd` of 64 values, a convert and two multiply-adds, against a
    /// convert, a scalar product, a broadcast and a multiply-add per block with 256 bits. A
    /// row with an odd block count ends with the 256-bit kernel on its last block.
    ///
    /// # Safety
    /// The CPU has the features enabled below; the slices are as for the Q4_1 kernels.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn q4_1_vnni512_pairs<const R: usize, const N: usize>(ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
        let nb = ws[0].len() / Q4_1_BYTES;
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut mins = [[0f32; N]; R];
        let low = _mm512_set1_epi8(0x0F);
        // Per 16-bit element: 128-bit lanes 0 and 2 keep the low nibbles (values 0..16 of
        // each block), lanes 1 and 3 shift the high ones (values 16..32) down.
        let four = 0x0004_0004_0004_0004;
        let shifts = _mm512_set_epi64(four, four, 0, 0, four, four, 0, 0);
        // Lanes 0..8 of an f32 register for block b, 8..16 for block b + 1.
        let halves = |a: f32, b: f32| {
            _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)), _mm256_castps_pd(_mm256_set1_ps(b)), 1))
        };
        let mut b = 0;
        while b + 2 <= nb {
            let mut q = [_mm512_setzero_si512(); R];
            let mut wd = [_mm512_setzero_ps(); R];
            let mut wm = [[0f32; 2]; R];
            for r in 0..R {
                let w0 = ws[r].as_ptr().add(b * Q4_1_BYTES);
                let w1 = w0.add(Q4_1_BYTES);
                let dm0 = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([*w0, *w0.add(1), *w0.add(2), *w0.add(3)])));
                let dm1 = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([*w1, *w1.add(1), *w1.add(2), *w1.add(3)])));
                wd[r] = halves(_mm_cvtss_f32(dm0), _mm_cvtss_f32(dm1));
                wm[r] = [_mm_cvtss_f32(_mm_shuffle_ps(dm0, dm0, 1)), _mm_cvtss_f32(_mm_shuffle_ps(dm1, dm1, 1))];
                let raw0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(w0.add(4) as *const __m128i));
                let raw1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(w1.add(4) as *const __m128i));
                let u = _mm512_inserti64x4(_mm512_castsi256_si512(raw0), raw1, 1);
                q[r] = _mm512_and_si512(_mm512_srlv_epi16(u, shifts), low);
            }
            for t in 0..N {
                let (x0, x1) = (xs[t].get_unchecked(b), xs[t].get_unchecked(b + 1));
                let xq = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256(x0.qs.as_ptr() as *const __m256i)),
                    _mm256_loadu_si256(x1.qs.as_ptr() as *const __m256i),
                    1,
                );
                let xd = halves(x0.d, x1.d);
                for r in 0..R {
                    let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[r], xq);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(wd[r], xd), _mm512_cvtepi32_ps(s), acc[r][t]);
                    mins[r][t] += wm[r][0] * x0.s + wm[r][1] * x1.s;
                }
            }
            b += 2;
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                out[r][t] = _mm512_reduce_add_ps(acc[r][t]) + mins[r][t];
            }
        }
        if b < nb {
            let tail = q4_1_vnni512::<R, N>(ws.map(|w| &w[b * Q4_1_BYTES..]), xs.map(|x| &x[b..]));
            for r in 0..R {
                for t in 0..N {
                    out[r][t] += tail[r][t];
                }
            }
        }
        out
    }

    // The four helpers below need only their instructions' CPU features (AVX2; AVX-512
    // VNNI + VL; AVX-VNNI; AVX): they are inlined into kernels that enable them.
    /// # Safety
    /// The CPU has AVX2.
    #[inline(always)]
    unsafe fn dot_maddubs(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
    /// # Safety
    /// The CPU has AVX-512 VNNI and VL.
    #[inline(always)]
    unsafe fn dot_vnni512(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    }
    /// # Safety
    /// The CPU has AVX-VNNI.
    #[inline(always)]
    unsafe fn dot_vnni256(a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    }
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    q8_0_impl!(q8_0_avx2, "avx2,fma,f16c", dot_maddubs);
    q8_0_impl!(q8_0_vnni512, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_vnni512);
    q8_0_impl!(q8_0_vnni256, "avx2,fma,f16c,avxvnni", dot_vnni256);
    q4_1_impl!(q4_1_avx2, "avx2,fma,f16c", dot_maddubs);
    q4_1_impl!(q4_1_vnni512, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_vnni512);
    q4_1_impl!(q4_1_vnni256, "avx2,fma,f16c,avxvnni", dot_vnni256);
}

/// A projection weight `[n, k]` as the kernels read it.
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    /// GGML Q8_0 blocks, row-major.
    Q8_0(&'a [u8]),
    /// GGML Q4_1 blocks, row-major.
    Q4_1(&'a [u8]),
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
    pool: &super::pool::Pool,
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
        let (lo, hi) = super::pool::share(total, threads, tid);
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
                WeightRef::Q8_0(w) => quant_rows::<Q8Tile>(isa, w, k / QK * Q8_0_BYTES, xq, r0, r1, out_ptr, stride, p.col, &mut warm),
                WeightRef::Q4_1(w) => quant_rows::<Q41Tile>(isa, w, k / QK * Q4_1_BYTES, xq, r0, r1, out_ptr, stride, p.col, &mut warm),
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

/// A block format's tile kernel, for the shapes `quant_rows` uses.
trait Tile {
    fn tile<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R];
}
struct Q8Tile;
struct Q41Tile;
impl Tile for Q8Tile {
    #[inline]
    fn tile<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
        tile_q8_0::<R, N>(isa, ws, xs)
    }
}
impl Tile for Q41Tile {
    #[inline]
    fn tile<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
        tile_q4_1::<R, N>(isa, ws, xs)
    }
}

/// Rows `r0..r1` of a block-quantized weight (`row_bytes` per row) times every activation
/// row: tiles of 2 weight rows × 4 activation rows, and of 4 weight rows × 1 activation
/// row for the rest (decode).
#[expect(clippy::too_many_arguments, reason = "one argument per operand of the kernel")]
fn quant_rows<T: Tile>(
    isa: Isa,
    w: &[u8],
    row_bytes: usize,
    xq: &QActs,
    r0: usize,
    r1: usize,
    out: OutPtr,
    stride: usize,
    col: usize,
    warm: &mut Warm<'_>,
) {
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
        for i in (0..full).step_by(4) {
            let v = T::tile::<2, 4>(isa, ws, [xq.row(i), xq.row(i + 1), xq.row(i + 2), xq.row(i + 3)]);
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
            let [v] = T::tile::<1, 4>(isa, [wrow(r)], [xq.row(i), xq.row(i + 1), xq.row(i + 2), xq.row(i + 3)]);
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
            let v = T::tile::<4, 1>(isa, [wrow(r), wrow(r + 1), wrow(r + 2), wrow(r + 3)], x);
            warm.tile();
            for (rr, [val]) in v.into_iter().enumerate() {
                put(i, r + rr, val);
            }
            r += 4;
        }
        while r < r1 {
            let [[val]] = T::tile::<1, 1>(isa, [wrow(r)], x);
            warm.tile();
            put(i, r, val);
            r += 1;
        }
    }
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

/// `y[i] = x[i] / rms(x[i]) * w` per row of `w.len()` values.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let k = w.len();
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(k)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / k as f32 + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotates each `head_dim` slice of `x` (`heads` of them) for position `pos`, with
/// `cos`/`sin` rows of `head_dim / 2`. `interleaved`: pairs (2i, 2i+1) (GGUF Llama);
/// else pairs (i, i + d/2) (Hugging Face).
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    for h in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
            let (x0, x1) = (h[a], h[b]);
            h[a] = x0 * cos[i] - x1 * sin[i];
            h[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// [`silu_mul`] with the rows shared over `pool`'s threads when there are several.
pub fn silu_mul_par(pool: &super::pool::Pool, gu: &[f32], n: usize, out: &mut [f32]) {
    let m = out.len() / n.max(1);
    let threads = pool.threads().min(m);
    if threads < 2 {
        return silu_mul(gu, n, out);
    }
    let dst = OutPtr(out.as_mut_ptr());
    pool.run(&|tid| {
        let (r0, r1) = super::pool::share(m, threads, tid);
        // SAFETY: shares are disjoint row ranges inside `out` (m rows of n).
        let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r0 * n), (r1 - r0) * n) };
        silu_mul(&gu[r0 * 2 * n..r1 * 2 * n], n, o);
    });
}

/// `silu(gate) * up`, `gu` holding rows of `[gate | up]` (`2 * n` wide); writes `n` per row.
pub fn silu_mul(gu: &[f32], n: usize, out: &mut [f32]) {
    for (r, o) in gu.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
        let (g, u) = r.split_at(n);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    // Pairwise: vector adds, not a chain of fifteen dependent scalar ones (a 64-value dot
    // product would wait on that chain longer than on its multiplications).
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    let mut s = acc[0];
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Decode attention of the `group` query heads that share one kv head: `q` holds their
/// `group * hd` values (contiguous), `k`/`v` the cached rows (`stride` apart, this head's
/// values at `off`), of which the first `visible` count. Writes `group * hd` values to `out`.
#[expect(clippy::too_many_arguments, reason = "one argument per operand of the kernel")]
pub fn attend_group(
    q: &[f32],
    group: usize,
    hd: usize,
    k: &[f32],
    v: &[f32],
    stride: usize,
    off: usize,
    visible: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    scores.clear();
    scores.resize(group * visible, 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if hd.is_multiple_of(16) && hd <= 256 && avx512f() && visible > 0 && (visible - 1) * stride + off + hd <= k.len().min(v.len()) {
            // SAFETY: the CPU has AVX-512F; every row read lies inside `k`/`v` (checked above).
            unsafe { x86_attend::attend_group_avx512(q, group, hd, k, v, stride, off, visible, scale, scores, out) };
            return;
        }
    }
    for j in 0..visible {
        let kr = &k[j * stride + off..j * stride + off + hd];
        for g in 0..group {
            scores[g * visible + j] = dot(&q[g * hd..(g + 1) * hd], kr) * scale;
        }
    }
    for g in 0..group {
        softmax(&mut scores[g * visible..(g + 1) * visible]);
    }
    out.fill(0.0);
    for j in 0..visible {
        let vr = &v[j * stride + off..j * stride + off + hd];
        for (g, og) in out.chunks_exact_mut(hd).enumerate() {
            axpy(scores[g * visible + j], vr, og);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512f() -> bool {
    static F: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F.get_or_init(|| isa() != Isa::Portable && is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
mod x86_quant {
    use super::{ActBlock, QK};
    use std::arch::x86_64::*;

    /// [`super::QActs::quantize`]'s blocks, 16 values per instruction, with the scalar
    /// loop's exact results: the same scale and `f32::round` (half away from zero, done as
    /// truncate, then add the sign where the dropped fraction is at least one half), and
    /// the scalar casts' treatment of NaN (ignored by the maximum, quantized to 0).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds exactly `out.len()` blocks of `QK` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_avx512(x: &[f32], out: &mut [ActBlock]) {
        let half = _mm512_set1_ps(0.5);
        let one = _mm512_set1_epi32(1.0f32.to_bits() as i32);
        let sign = _mm512_set1_epi32(i32::MIN);
        // NaN lanes as 0 (`f32::max` skips NaN; `NaN as i8` is 0).
        let no_nan = |v: __m512| _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), v);
        for (chunk, block) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (a, b) = (_mm512_loadu_ps(chunk.as_ptr()), _mm512_loadu_ps(chunk.as_ptr().add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(no_nan(a)), _mm512_abs_ps(no_nan(b))));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let mut qs = [0i8; QK];
            let mut sum = 0i32;
            for (h, v) in [a, b].into_iter().enumerate() {
                // 0·inf (a tiny block's 1/d, or an infinite input's 0) is NaN here as in the
                // scalar loop, and becomes 0 as there.
                let y = no_nan(_mm512_mul_ps(v, id));
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                let frac = _mm512_abs_ps(_mm512_sub_ps(y, t));
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
                // ±1 with y's sign where the fraction rounds away from zero (integer ops:
                // AVX-512F alone).
                let step = _mm512_castsi512_ps(_mm512_or_si512(one, _mm512_and_si512(_mm512_castps_si512(y), sign)));
                let r = _mm512_mask_add_ps(t, up, t, step);
                let r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.0)), _mm512_set1_ps(127.0));
                let i = _mm512_cvttps_epi32(r);
                sum += _mm512_reduce_add_epi32(i);
                _mm_storeu_si128(qs.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(i));
            }
            *block = ActBlock { d, s: d * sum as f32, qs };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_attend {
    use std::arch::x86_64::*;

    /// [`super::attend_group`] on AVX-512F.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as [`super::attend_group`] checks: `hd` is a multiple of 16 and
    /// at most 256, `visible ≥ 1` and `(visible - 1) · stride + off + hd` is within `k` and
    /// `v`; `q` and `out` hold `group × hd` values, `scores` `group × visible`.
    #[expect(clippy::too_many_arguments, reason = "the portable kernel's signature, one pointer per operand")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_group_avx512(
        q: &[f32],
        group: usize,
        hd: usize,
        k: &[f32],
        v: &[f32],
        stride: usize,
        off: usize,
        visible: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let chunks = hd / 16;
        for j in 0..visible {
            let kp = k.as_ptr().add(j * stride + off);
            for g in 0..group {
                let qp = q.as_ptr().add(g * hd);
                let mut a0 = _mm512_setzero_ps();
                let mut a1 = _mm512_setzero_ps();
                let mut c = 0;
                while c + 1 < chunks {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c * 16)), _mm512_loadu_ps(kp.add(c * 16)), a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c * 16 + 16)), _mm512_loadu_ps(kp.add(c * 16 + 16)), a1);
                    c += 2;
                }
                if c < chunks {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c * 16)), _mm512_loadu_ps(kp.add(c * 16)), a0);
                }
                *scores.get_unchecked_mut(g * visible + j) = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
            }
        }
        for g in 0..group {
            super::softmax(&mut scores[g * visible..(g + 1) * visible]);
        }
        for g in 0..group {
            let p = &scores[g * visible..(g + 1) * visible];
            let op = out.as_mut_ptr().add(g * hd);
            if chunks == 4 {
                // head_dim 64 (SmolLM2, Llama 2/3 small): the sums stay in registers.
                let (mut a0, mut a1, mut a2, mut a3) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
                for (j, &pj) in p.iter().enumerate() {
                    let vp = v.as_ptr().add(j * stride + off);
                    let b = _mm512_set1_ps(pj);
                    a0 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vp), a0);
                    a1 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vp.add(16)), a1);
                    a2 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vp.add(32)), a2);
                    a3 = _mm512_fmadd_ps(b, _mm512_loadu_ps(vp.add(48)), a3);
                }
                _mm512_storeu_ps(op, a0);
                _mm512_storeu_ps(op.add(16), a1);
                _mm512_storeu_ps(op.add(32), a2);
                _mm512_storeu_ps(op.add(48), a3);
                continue;
            }
            let mut acc = [_mm512_setzero_ps(); 16];
            for (j, &pj) in p.iter().enumerate() {
                let vp = v.as_ptr().add(j * stride + off);
                let b = _mm512_set1_ps(pj);
                for (c, a) in acc.iter_mut().enumerate().take(chunks) {
                    *a = _mm512_fmadd_ps(b, _mm512_loadu_ps(vp.add(c * 16)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate().take(chunks) {
                _mm512_storeu_ps(op.add(c * 16), *a);
            }
        }
    }
}

/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q8_0_bytes(w: &[f32]) -> Vec<u8> {
        let mut q = QActs::default();
        q.quantize(w, QK);
        let mut out = Vec::new();
        for b in &q.blocks {
            out.extend_from_slice(&f16::from_f32(b.d).to_bits().to_le_bytes());
            out.extend(b.qs.iter().map(|&v| v as u8));
        }
        out
    }

    #[test]
    fn vector_quantization_equals_the_scalar_loop() {
        // Values at and near the rounding halves, zeros, a zero block, sign changes.
        let mut x: Vec<f32> = (0..32 * 40).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 37.0).collect();
        // First block: scale exactly 1, so ±k.5 is a tie (f32::round: away from zero).
        x[0] = 127.0;
        for (i, v) in x.iter_mut().enumerate().take(32).skip(1) {
            *v = i as f32 - 16.5;
        }
        x[64..96].fill(0.0);
        x[96] = -3.0;
        // Blocks whose scale overflows 1/d (0 · inf), with an infinity, with NaNs.
        x[128] = 1e-38;
        x[129] = -2e-38;
        x[160] = f32::INFINITY;
        x[161] = -5.0;
        x[192] = f32::NAN;
        x[200] = -f32::NAN;
        x[201] = 7.5;
        let mut fast = QActs::default();
        fast.quantize(&x, 64);
        // The scalar loop, as QActs::quantize runs it without AVX-512.
        let mut want = vec![ActBlock::ZERO; x.len() / QK];
        quantize_blocks_portable(&x, &mut want);
        assert_eq!(fast.blocks.len(), want.len());
        assert_eq!((fast.rows, fast.per_row), (20, 2));
        for (i, (b, w)) in fast.blocks.iter().zip(&want).enumerate() {
            assert_eq!((b.d.to_bits(), b.s.to_bits(), b.qs), (w.d.to_bits(), w.s.to_bits(), w.qs), "block {i}");
        }
        // (Without AVX-512 both sides run the scalar loop and this checks nothing more.)
    }

    #[test]
    fn shared_quantization_and_silu_equal_the_serial_passes() {
        let pool = crate::engine::pool::Pool::new(3);
        let (m, k) = (7, 576);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 97.0).collect();
        let (mut one, mut par) = (QActs::default(), QActs::default());
        one.quantize(&x, k);
        par.quantize_par(&pool, &x, k);
        assert!(m * k / QK >= PARALLEL_BLOCKS);
        assert_eq!((par.rows, par.per_row, par.blocks.len()), (m, k / QK, m * k / QK));
        for (i, (a, b)) in one.blocks.iter().zip(&par.blocks).enumerate() {
            assert_eq!((a.d.to_bits(), a.s.to_bits(), a.qs), (b.d.to_bits(), b.s.to_bits(), b.qs), "block {i}");
        }
        let n = k / 2;
        let (mut s1, mut s2) = (vec![0f32; m * n], vec![0f32; m * n]);
        silu_mul(&x, n, &mut s1);
        silu_mul_par(&pool, &x, n, &mut s2);
        assert_eq!(s1, s2);
        assert!(s1.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn prefetch_walks_every_line_once_spread_over_the_tiles() {
        #[repr(align(64))]
        struct Lines([u8; 1024]);
        let buf = Lines([0; 1024]);
        let m = &buf.0;
        // 1 line, none, 3 lines (130 bytes from a boundary), 2 lines (30 bytes across one).
        let t0 = vec![&m[..1], &m[64..64], &m[64..194], &m[300..330]];
        let p = Prefetch { per_thread: vec![t0, vec![&m[512..768]]] };
        assert_eq!(Prefetch::lines(&p.per_thread[0]), 6);
        let mut w = Warm::new(&p, 0, 2);
        assert_eq!(w.per_tile, 3);
        w.tile();
        assert_eq!(w.issued, 3);
        w.tile();
        w.tile(); // more tiles than estimated: nothing left, nothing repeated
        w.rest();
        assert_eq!(w.issued, 6);
        let mut w = Warm::new(&p, 1, 100);
        w.tile();
        assert_eq!(w.issued, 1);
        w.rest();
        assert_eq!(w.issued, 4);
        let mut w = Warm::new(&p, 2, 1); // a thread with no list
        w.tile();
        w.rest();
        assert_eq!(w.issued, 0);
        // The estimate matches quant_rows' loops: 2 × 4 tiles, 1 × 4, then 4 × 1 and 1 × 1.
        assert_eq!(tile_calls(5, 8), 3 * 2);
        assert_eq!(tile_calls(5, 1), 1 + 1);
        assert_eq!(tile_calls(6, 9), 3 * 2 + (1 + 2));
    }

    #[test]
    fn every_isa_gives_the_exact_integer_dot_product() {
        let k = 96;
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..k).map(|_| rnd()).collect();
        let xs: Vec<f32> = (0..4 * k).map(|_| rnd() * 3.0).collect();
        let wb = q8_0_bytes(&w);
        let mut xq = QActs::default();
        xq.quantize(&xs, k);
        let want = q8_0_portable::<4>(&wb, [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512bw") {
                    isas.push(Isa::Avx512Vnni);
                }
                if is_x86_feature_detected!("avxvnni") {
                    isas.push(Isa::AvxVnni);
                }
            }
        }
        for isa in isas {
            let [got4] = tile_q8_0::<1, 4>(isa, [&wb], [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
            for t in 0..4 {
                let [[got1]] = tile_q8_0::<1, 1>(isa, [&wb], [xq.row(t)]);
                assert!((got4[t] - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} row {t}");
                assert!((got1 - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} row {t}");
            }
            // And the product tracks the f32 one within the quantization error.
            for t in 0..4 {
                let exact = dot(&w, &xs[t * k..(t + 1) * k]);
                assert!((got4[t] - exact).abs() < 0.05 * exact.abs().max(1.0), "{isa:?}: {} vs {exact}", got4[t]);
            }
        }
    }

    #[test]
    fn q4_1_rows_match_candles_dequantized_weights() -> candle_core::Result<()> {
        // An odd block count (the 512-bit kernel's tail) and an even one.
        for k in [96, 128] {
            q4_1_rows_match_at(k)?;
        }
        Ok(())
    }

    fn q4_1_rows_match_at(k: usize) -> candle_core::Result<()> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let n = 5;
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 29 % 97) as f32 / 40.0) - 1.1).collect();
        let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::Q4_1)?;
        let bytes = q.data()?.to_vec();
        let deq = q.dequantize(&candle_core::Device::Cpu)?.to_vec2::<f32>()?;
        let xs: Vec<f32> = (0..4 * k).map(|i| ((i * 13 % 31) as f32 / 9.0) - 1.5).collect();
        let mut xq = QActs::default();
        xq.quantize(&xs, k);
        let row = k / QK * Q4_1_BYTES;
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512bw") {
                    isas.push(Isa::Avx512Vnni);
                }
                if is_x86_feature_detected!("avxvnni") {
                    isas.push(Isa::AvxVnni);
                }
            }
        }
        for r in 0..n {
            let wr = &bytes[r * row..(r + 1) * row];
            let want = q4_1_portable::<4>(wr, [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
            for &isa in &isas {
                let [got] = tile_q4_1::<1, 4>(isa, [wr], [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
                // Two and four weight rows at once give each row's own products.
                let r2 = (r + 1) % n;
                let w2 = &bytes[r2 * row..(r2 + 1) * row];
                let want2 = q4_1_portable::<4>(w2, [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
                let [g1, g2] = tile_q4_1::<2, 4>(isa, [wr, w2], [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
                let [[h1], [h2], [h3], [h4]] = tile_q4_1::<4, 1>(isa, [wr, w2, wr, w2], [xq.row(1)]);
                for t in 0..4 {
                    assert!((g1[t] - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} 2x4 ({r},{t})");
                    assert!((g2[t] - want2[t]).abs() <= 1e-4 * want2[t].abs().max(1.0), "{isa:?} 2x4 ({r2},{t})");
                }
                for (h, w) in [(h1, want[1]), (h2, want2[1]), (h3, want[1]), (h4, want2[1])] {
                    assert!((h - w).abs() <= 1e-4 * w.abs().max(1.0), "{isa:?} 4x1 ({r}): {h} vs {w}");
                }
                for t in 0..4 {
                    let [[one]] = tile_q4_1::<1, 1>(isa, [wr], [xq.row(t)]);
                    assert!((got[t] - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} ({r},{t})");
                    assert!((one - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} ({r},{t})");
                }
            }
            for t in 0..4 {
                let exact = dot(&deq[r], &xs[t * k..(t + 1) * k]);
                assert!((want[t] - exact).abs() < 0.02 * exact.abs().max(1.0), "({r},{t}): {} vs {exact}", want[t]);
            }
        }
        Ok(())
    }

    #[test]
    fn grouped_attention_matches_the_plain_loops() {
        for (group, hd, visible) in [(3, 64, 1), (3, 64, 37), (2, 32, 200), (1, 16, 5)] {
            let kvh = 2;
            let stride = 3 * hd;
            let off = kvh * hd;
            let q: Vec<f32> = (0..group * hd).map(|i| ((i * 31 % 17) as f32 / 9.0) - 0.9).collect();
            let k: Vec<f32> = (0..visible * stride).map(|i| ((i * 7 % 29) as f32 / 14.0) - 1.0).collect();
            let v: Vec<f32> = (0..visible * stride).map(|i| ((i * 11 % 23) as f32 / 11.0) - 1.0).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let mut want = vec![0f32; group * hd];
            for g in 0..group {
                let mut s: Vec<f32> = (0..visible)
                    .map(|j| (0..hd).map(|d| q[g * hd + d] * k[j * stride + off + d]).sum::<f32>() * scale)
                    .collect();
                softmax(&mut s);
                for d in 0..hd {
                    want[g * hd + d] = (0..visible).map(|j| s[j] * v[j * stride + off + d]).sum();
                }
            }
            let mut got = vec![0f32; group * hd];
            let mut scratch = Vec::new();
            attend_group(&q, group, hd, &k, &v, stride, off, visible, scale, &mut scratch, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "group {group} hd {hd} visible {visible}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn fused_parts_land_in_their_columns() -> candle_core::Result<()> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let pool = super::super::pool::Pool::new(2);
        let k = 64;
        for m in [1, 3, 5, 8, 9] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
            let w1: Vec<f32> = (0..3 * k).map(|i| ((i * 13 % 17) as f32 / 8.0) - 1.0).collect();
            let w2: Vec<f32> = (0..41 * k).map(|i| ((i * 7 % 23) as f32 / 11.0) - 1.0).collect();
            let w3: Vec<f32> = (0..13 * k).map(|i| ((i * 5 % 19) as f32 / 7.0) - 1.2).collect();
            let w2q = q8_0_bytes(&w2);
            let q3 = QTensor::quantize(&candle_core::Tensor::from_vec(w3, (13, k), &candle_core::Device::Cpu)?, GgmlDType::Q4_1)?;
            let w3q = q3.data()?.to_vec();
            let w3d = q3.dequantize(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let mut xq = QActs::default();
            xq.quantize(&x, k);
            let stride = 3 + 41 + 13;
            let mut out = vec![0f32; m * stride];
            let parts = [
                MatmulPart { weight: WeightRef::F32(&w1), n: 3, col: 0 },
                MatmulPart { weight: WeightRef::Q8_0(&w2q), n: 41, col: 3 },
                MatmulPart { weight: WeightRef::Q4_1(&w3q), n: 13, col: 44 },
            ];
            matmul(&pool, &x, &xq, k, &parts, &mut out, stride, &Prefetch::default());
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                for j in 0..3 {
                    let want = dot(xr, &w1[j * k..(j + 1) * k]);
                    assert!((out[i * stride + j] - want).abs() < 1e-4, "m={m}: f32 part ({i},{j})");
                }
                for j in 0..41 {
                    let want = dot(xr, &w2[j * k..(j + 1) * k]);
                    assert!((out[i * stride + 3 + j] - want).abs() < 0.05 * want.abs().max(1.0), "m={m}: q8 part ({i},{j})");
                }
                for j in 0..13 {
                    let want = dot(xr, &w3d[j * k..(j + 1) * k]);
                    assert!((out[i * stride + 44 + j] - want).abs() < 0.05 * want.abs().max(1.0), "m={m}: q4_1 part ({i},{j})");
                }
            }
        }
        Ok(())
    }
}
