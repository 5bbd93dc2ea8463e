//! Block-quantized weights and activations: GGML's Q8_0 and Q4_1 weight blocks read in
//! place, activations quantized once per input to 32-value blocks ([`QActs`], f32 scales),
//! and the dot kernels of a tile of weight rows × activation rows, one dispatcher for every
//! format ([`tile`]) over each format's portable loop and its x86 variants (`super::x86`).
//! The integer dot product of a block pair is exact; only the activation rounding (< 0.4%
//! per value) differs from an f32 product, as in llama.cpp.

use half::f16;

use super::{Isa, OutPtr};
#[cfg(target_arch = "x86_64")]
use super::avx512f;

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
    pub(super) const ZERO: Self = Self { d: 0.0, s: 0.0, qs: [0; QK] };
}

/// `m` activation rows of `k` values quantized to blocks (`k / 32` per row).
#[derive(Default, Debug)]
pub struct QActs {
    pub blocks: Vec<ActBlock>,
    pub rows: usize,
    pub per_row: usize,
}

/// Blocks from this many on are quantized by every pool thread (a share each).
pub(super) const PARALLEL_BLOCKS: usize = 96;

impl QActs {
    /// Quantizes `x` (`m` rows of `k`, `k` a multiple of 32), reusing the buffer.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        self.quantize_on(None, x, k);
    }

    /// The same, with the blocks shared over `pool`'s threads when there are many (a
    /// batch's rows): the other threads would otherwise wait for this serial pass.
    pub fn quantize_par(&mut self, pool: &crate::engine::pool::Pool, x: &[f32], k: usize) {
        self.quantize_on(Some(pool), x, k);
    }

    /// The same, the blocks shared over candle's worker pool (the training path's
    /// products run there).
    pub fn quantize_candle_pool(&mut self, x: &[f32], k: usize) {
        let nb = k / QK;
        self.rows = x.len() / k;
        self.per_row = nb;
        let n = x.len() / QK;
        self.blocks.clear();
        self.blocks.resize(n, ActBlock::ZERO);
        const CHUNK: usize = 256;
        let out = OutPtr(self.blocks.as_mut_ptr());
        crate::engine::pool::training_chunks(n.div_ceil(CHUNK), |chunks| {
            for c in chunks {
                let (b0, b1) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                // SAFETY: chunks are disjoint block ranges inside `blocks` (n long).
                let dst = unsafe { std::slice::from_raw_parts_mut(out.at(b0), b1 - b0) };
                quantize_blocks(&x[b0 * QK..b1 * QK], dst);
            }
        });
    }

    fn quantize_on(&mut self, pool: Option<&crate::engine::pool::Pool>, x: &[f32], k: usize) {
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
                    let (b0, b1) = crate::engine::pool::share(n, threads, tid);
                    // SAFETY: shares are disjoint block ranges inside `blocks` (n long).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(b0), b1 - b0) };
                    quantize_blocks(&x[b0 * QK..b1 * QK], dst);
                });
            }
            _ => quantize_blocks(&x[..n * QK], &mut self.blocks),
        }
    }

    pub(super) fn row(&self, r: usize) -> &[ActBlock] {
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
pub(super) fn quantize_blocks_portable(x: &[f32], out: &mut [ActBlock]) {
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


/// A weight block format the tile kernels read: its bytes and values per block and its dot
/// kernels.
pub(crate) trait BlockFormat {
    const BYTES: usize;
    /// Values per block: 32, or 256 for the K-quants' super-blocks (a row's length is a
    /// multiple of it).
    const VALUES: usize = QK;
    /// One weight row against `N` activation rows, as plain loops (what every vector
    /// variant must equal).
    fn portable<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N];
    /// The vector kernel for `isa`, or `None` for the portable loop.
    ///
    /// # Safety
    /// `isa` is what [`super::isa`] detected (the CPU has its features); every `ws[r]` holds
    /// the same whole number of blocks and every `xs[t]` at least that many.
    #[cfg(target_arch = "x86_64")]
    unsafe fn x86<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> Option<[[f32; N]; R]>;
}

/// GGML Q8_0: an f16 scale and 32 `i8` per block.
pub(crate) struct Q8_0;
/// GGML Q4_1: an f16 scale, an f16 minimum and 32 4-bit values per block.
pub(crate) struct Q4_1;

impl BlockFormat for Q4_1 {
    const BYTES: usize = Q4_1_BYTES;
    fn portable<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
        q4_1_portable(w, xs)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn x86<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> Option<[[f32; N]; R]> {
        use super::x86::*;
        // SAFETY: the caller's contract (see the trait).
        unsafe {
            match isa {
                Isa::Avx512Vnni => Some(q4_1_vnni512_pairs::<R, N>(ws, xs)),
                Isa::AvxVnni => Some(q4_1_vnni256::<R, N>(ws, xs)),
                Isa::Avx2 => Some(q4_1_avx2::<R, N>(ws, xs)),
                Isa::Portable => None,
            }
        }
    }
}

/// The scales of a one-sub-block format's block: `d`, and `mn`, which multiplies the
/// activation block's sum `s` (a minimum, or the offset the unsigned values carry times `d`).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Uniform {
    pub d: f32,
    pub mn: f32,
}

/// The scales of a K-quant super-block: sub-block `j`'s first 16 values scale by
/// `sc[2j]`, its last 16 by `sc[2j + 1]` (they differ only in Q6_K), and `mn[j]` multiplies
/// the activation block's sum (0 for Q6_K's signed values).
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct KHead {
    pub sc: [f32; 16],
    pub mn: [f32; 8],
}

/// A GGML format read as sub-blocks of 32 small integers, one per activation block:
/// Q8_0 (signed), Q4_0, Q5_0 and Q5_1 (one per block) and the K-quants Q4_K, Q5_K and Q6_K (eight per
/// 256-value super-block, whose 6- or 8-bit sub-block scales [`KHead`] holds decoded). One
/// portable loop and one vector kernel per instruction set serve them all; a format only
/// says how its bytes unpack.
pub(crate) trait SubBlocks: BlockFormat {
    /// The integers are signed (`-32..32`, Q6_K); else unsigned (`0..32`).
    const SIGNED: bool;
    /// A block's decoded scales.
    type Head: Copy + Default;
    /// The scales of block `b` (`BYTES` bytes).
    fn head(b: &[u8]) -> Self::Head;
    /// The scale of 16-value half `i` of the block (sub-block `i / 2`).
    fn scale(h: &Self::Head, i: usize) -> f32;
    /// What sub-block `j`'s activation sum multiplies.
    fn min(h: &Self::Head, j: usize) -> f32;
    /// Sub-block `j`'s 32 integers, in the activations' order.
    fn ints(b: &[u8], j: usize) -> [i8; QK];
}

/// GGML Q4_0: an f16 scale and 32 4-bit values (value = (q − 8)·d), 18 bytes.
pub(crate) struct Q4_0;
/// GGML Q5_0: an f16 scale, 32 high bits and 32 4-bit values (value = (q − 16)·d), 22 bytes.
pub(crate) struct Q5_0;
/// GGML Q5_1: an f16 scale and minimum, 32 high bits, 32 4-bit values (q·d + m), 24 bytes.
pub(crate) struct Q5_1;
/// GGML Q4_K: per 256 values an f16 scale and minimum, eight 6-bit sub-block scales and
/// minimums, 4-bit values (value = d·sc·q − dmin·m), 144 bytes.
pub(crate) struct Q4K;
/// GGML Q5_K: Q4_K's scales with 5-bit values (a bit plane of high bits), 176 bytes.
pub(crate) struct Q5K;
/// GGML Q6_K: per 256 values 6-bit values (low nibbles, then 2-bit high parts), sixteen
/// `i8` scales of 16 values each, an f16 scale (value = d·sc·(q − 32)), 210 bytes.
pub(crate) struct Q6K;

/// A 32-value block's nibbles in value order: low nibble of byte `j` is value `j`, high
/// nibble value `j + 16`.
fn nibbles16(qs: &[u8]) -> [i8; QK] {
    let mut q = [0i8; QK];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) as i8;
        q[j + 16] = (qs[j] >> 4) as i8;
    }
    q
}

/// Q5_0 / Q5_1: bit `i` of the little-endian `qh` is value `i`'s fifth bit.
fn with_high_bits(mut q: [i8; QK], qh: &[u8]) -> [i8; QK] {
    let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (i, v) in q.iter_mut().enumerate() {
        *v |= (((bits >> i) & 1) << 4) as i8;
    }
    q
}

/// Q4_K / Q5_K: the sub-block scales and minimums, 6 bits each packed in 12 bytes
/// (sub-blocks 0–3 in the low 6 bits of bytes 0–7; 4–7 in bytes 8–11's nibbles with their
/// top two bits in the high bits of bytes 0–7).
fn k4_head(b: &[u8]) -> KHead {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let s = &b[4..16];
    let mut h = KHead::default();
    for j in 0..8 {
        let (sc, m) = if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
        };
        h.sc[2 * j] = d * f32::from(sc);
        h.sc[2 * j + 1] = h.sc[2 * j];
        h.mn[j] = -dmin * f32::from(m);
    }
    h
}

/// Q4_K / Q5_K's 4-bit parts of sub-block `j`: 32 bytes per pair of sub-blocks, the even
/// one in the low nibbles.
fn k4_nibbles(qs: &[u8], j: usize) -> [i8; QK] {
    let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
    let shift = 4 * (j % 2);
    std::array::from_fn(|l| ((bytes[l] >> shift) & 0x0F) as i8)
}

/// The scale and minimum accessors of the one-sub-block formats.
macro_rules! uniform_scales {
    () => {
        type Head = Uniform;
        #[inline(always)]
        fn scale(h: &Uniform, _: usize) -> f32 {
            h.d
        }
        #[inline(always)]
        fn min(h: &Uniform, _: usize) -> f32 {
            h.mn
        }
    };
}

/// The scale and minimum accessors of the K-quants.
macro_rules! k_scales {
    () => {
        type Head = KHead;
        #[inline(always)]
        fn scale(h: &KHead, i: usize) -> f32 {
            h.sc[i]
        }
        #[inline(always)]
        fn min(h: &KHead, j: usize) -> f32 {
            h.mn[j]
        }
    };
}

impl SubBlocks for Q8_0 {
    const SIGNED: bool = true;
    uniform_scales!();
    fn head(b: &[u8]) -> Uniform {
        Uniform { d: f16_at(b, 0), mn: 0.0 }
    }
    fn ints(b: &[u8], _: usize) -> [i8; QK] {
        std::array::from_fn(|i| b[2 + i] as i8)
    }
}

impl SubBlocks for Q4_0 {
    const SIGNED: bool = false;
    uniform_scales!();
    fn head(b: &[u8]) -> Uniform {
        let d = f16_at(b, 0);
        Uniform { d, mn: -8.0 * d }
    }
    fn ints(b: &[u8], _: usize) -> [i8; QK] {
        nibbles16(&b[2..18])
    }
}

impl SubBlocks for Q5_0 {
    const SIGNED: bool = false;
    uniform_scales!();
    fn head(b: &[u8]) -> Uniform {
        let d = f16_at(b, 0);
        Uniform { d, mn: -16.0 * d }
    }
    fn ints(b: &[u8], _: usize) -> [i8; QK] {
        with_high_bits(nibbles16(&b[6..22]), &b[2..6])
    }
}

impl SubBlocks for Q5_1 {
    const SIGNED: bool = false;
    uniform_scales!();
    fn head(b: &[u8]) -> Uniform {
        Uniform { d: f16_at(b, 0), mn: f16_at(b, 2) }
    }
    fn ints(b: &[u8], _: usize) -> [i8; QK] {
        with_high_bits(nibbles16(&b[8..24]), &b[4..8])
    }
}

impl SubBlocks for Q4K {
    const SIGNED: bool = false;
    k_scales!();
    fn head(b: &[u8]) -> KHead {
        k4_head(b)
    }
    fn ints(b: &[u8], j: usize) -> [i8; QK] {
        k4_nibbles(&b[16..144], j)
    }
}

impl SubBlocks for Q5K {
    const SIGNED: bool = false;
    k_scales!();
    fn head(b: &[u8]) -> KHead {
        k4_head(b)
    }
    fn ints(b: &[u8], j: usize) -> [i8; QK] {
        let (qh, qs) = (&b[16..48], &b[48..176]);
        let mut q = k4_nibbles(qs, j);
        for (v, h) in q.iter_mut().zip(qh) {
            *v |= (((h >> j) & 1) << 4) as i8;
        }
        q
    }
}

impl SubBlocks for Q6K {
    const SIGNED: bool = true;
    k_scales!();
    fn head(b: &[u8]) -> KHead {
        let d = f16_at(b, 208);
        let mut h = KHead::default();
        for (sc, &s) in h.sc.iter_mut().zip(&b[192..208]) {
            *sc = d * f32::from(s as i8);
        }
        h
    }
    fn ints(b: &[u8], j: usize) -> [i8; QK] {
        // Each half of 128 values: 64 bytes of nibbles (sub-blocks 0, 1 low; 2, 3 high) and
        // 32 bytes of 2-bit high parts (sub-block s at bits 2s).
        let (half, s) = (j / 4, j % 4);
        let ql = &b[64 * half + 32 * (s % 2)..][..32];
        let qh = &b[128 + 32 * half..][..32];
        std::array::from_fn(|l| {
            let low = (ql[l] >> (4 * (s / 2))) & 0x0F;
            let high = (qh[l] >> (2 * s)) & 3;
            (low | (high << 4)) as i8 - 32
        })
    }
}

/// The portable loop of every [`SubBlocks`] format: per sub-block and activation block,
/// the integer dot product of each 16-value half, scaled, plus the minimum's term.
pub(super) fn sub_blocks_portable<F: SubBlocks, const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
    let nb = w.len() / F::BYTES;
    let subs = F::VALUES / QK;
    let mut out = [0f32; N];
    for b in 0..nb {
        let blk = &w[b * F::BYTES..(b + 1) * F::BYTES];
        let h = F::head(blk);
        for j in 0..subs {
            let q = F::ints(blk, j);
            for (acc, x) in out.iter_mut().zip(&xs) {
                let xb = &x[b * subs + j];
                let half = |r: std::ops::Range<usize>| r.map(|i| i32::from(q[i]) * i32::from(xb.qs[i])).sum::<i32>() as f32;
                *acc += xb.d * (F::scale(&h, 2 * j) * half(0..16) + F::scale(&h, 2 * j + 1) * half(16..32)) + F::min(&h, j) * xb.s;
            }
        }
    }
    out
}

/// [`BlockFormat`] for a [`SubBlocks`] format: the shared portable loop and vector kernels.
macro_rules! sub_block_format {
    ($t:ty, $bytes:expr, $values:expr) => {
        impl BlockFormat for $t {
            const BYTES: usize = $bytes;
            const VALUES: usize = $values;
            fn portable<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
                sub_blocks_portable::<Self, N>(w, xs)
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn x86<const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> Option<[[f32; N]; R]> {
                use super::x86::*;
                // SAFETY: the caller's contract (see the trait).
                unsafe {
                    match isa {
                        Isa::Avx512Vnni => Some(sub_blocks_vnni512_pairs::<Self, R, N>(ws, xs)),
                        Isa::AvxVnni => Some(sub_blocks_vnni256::<Self, R, N>(ws, xs)),
                        Isa::Avx2 => Some(sub_blocks_avx2::<Self, R, N>(ws, xs)),
                        Isa::Portable => None,
                    }
                }
            }
        }
    };
}

sub_block_format!(Q8_0, Q8_0_BYTES, QK);
sub_block_format!(Q4_0, 18, QK);
sub_block_format!(Q5_0, 22, QK);
sub_block_format!(Q5_1, 24, QK);
sub_block_format!(Q4K, 144, 256);
sub_block_format!(Q5K, 176, 256);
sub_block_format!(Q6K, 210, 256);

/// Dot products of `R` weight rows of format `F` (raw bytes, the same number of blocks
/// each) with `N` activation rows: `R × N` independent accumulators, so neither decode (one
/// activation row; several weight rows) nor prefill (one weight row; several activation
/// rows) waits on one chain.
#[inline]
pub(crate) fn tile<F: BlockFormat, const R: usize, const N: usize>(isa: Isa, ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` comes from `isa()`, which checked the CPU features of each variant; the
    // callers' shapes give every row the same whole number of blocks.
    if let Some(out) = unsafe { F::x86::<R, N>(isa, ws, xs) } {
        return out;
    }
    let _ = isa;
    ws.map(|w| F::portable::<N>(w, xs))
}

pub(super) fn f16_at(w: &[u8], o: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([w[o], w[o + 1]])).to_f32()
}

pub(super) fn q4_1_portable<const N: usize>(w: &[u8], xs: [&[ActBlock]; N]) -> [f32; N] {
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

