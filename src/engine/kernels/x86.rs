//! The x86 dot kernels of the block formats: AVX-512 VNNI and AVX-VNNI (`vpdpbusd`), and
//! AVX2 (`vpmaddubsw`). With AVX-512, Q4_1 rows take two blocks per register (a block
//! pair's scales fill the two halves of one vector). Each must equal the format's portable
//! loop (`quant.rs`), which the tests check on every variant this CPU has. The formats read
//! as 32-value sub-blocks (Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) share one kernel per
//! instruction set, [`SubBlocksX86`] saying how each unpacks.

use super::quant::{ActBlock, SubBlocks, Uniform, Q4K, Q4_0, Q4_1_BYTES, Q5K, Q5_0, Q5_1, Q6K, Q8_0, QK};
use std::arch::x86_64::*;

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

/// How a [`SubBlocks`] format unpacks in 256-bit registers. AVX2 instructions only: these
/// are inlined into the kernels, which enable them.
pub(super) trait SubBlocksX86: SubBlocks {
    /// The scales of the block at `b` (`BYTES` readable bytes): the portable decoding,
    /// unless the format has a cheaper one.
    ///
    /// # Safety
    /// `b` points at a whole block; the CPU has F16C (for the overrides).
    #[inline(always)]
    unsafe fn head_x86(b: *const u8) -> Self::Head {
        // SAFETY: the caller's contract.
        Self::head(unsafe { std::slice::from_raw_parts(b, Self::BYTES) })
    }
    /// Sub-block `j`'s 32 integers, as [`SubBlocks::ints`] gives them.
    ///
    /// # Safety
    /// `b` points at a whole block, `j < VALUES / 32`; the CPU has AVX2.
    unsafe fn ints_x86(b: *const u8, j: usize) -> __m256i;
}

/// The f16 at `p` as f32.
#[inline(always)]
unsafe fn f16_x86(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([*p, *p.add(1)])))))
}

/// 16 bytes of nibbles in value order: low nibbles (values 0..16), then high ones.
#[inline(always)]
unsafe fn nibbles16_x86(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let low = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low))
}

/// `0x10` in byte `i` where bit `i` of the little-endian 32-bit word at `p` is set.
#[inline(always)]
unsafe fn high_bits_x86(p: *const u8) -> __m256i {
    let bits = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    // Byte i takes byte i / 8 of the word (each 128-bit lane holds the whole word), then
    // keeps bit i % 8 of it.
    let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// `(v >> shift) & mask` per byte (16-bit shifts; the mask drops what crossed bytes).
#[inline(always)]
unsafe fn bits_x86(v: __m256i, shift: usize, mask: i8) -> __m256i {
    _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift as i32)), _mm256_set1_epi8(mask))
}

impl SubBlocksX86 for Q8_0 {
    #[inline(always)]
    unsafe fn head_x86(b: *const u8) -> Uniform {
        Uniform { d: f16_x86(b), mn: 0.0 }
    }
    #[inline(always)]
    unsafe fn ints_x86(b: *const u8, _: usize) -> __m256i {
        _mm256_loadu_si256(b.add(2) as *const __m256i)
    }
}

impl SubBlocksX86 for Q4_0 {
    #[inline(always)]
    unsafe fn head_x86(b: *const u8) -> Uniform {
        let d = f16_x86(b);
        Uniform { d, mn: -8.0 * d }
    }
    #[inline(always)]
    unsafe fn ints_x86(b: *const u8, _: usize) -> __m256i {
        nibbles16_x86(b.add(2))
    }
}

impl SubBlocksX86 for Q5_0 {
    #[inline(always)]
    unsafe fn head_x86(b: *const u8) -> Uniform {
        let d = f16_x86(b);
        Uniform { d, mn: -16.0 * d }
    }
    #[inline(always)]
    unsafe fn ints_x86(b: *const u8, _: usize) -> __m256i {
        _mm256_or_si256(nibbles16_x86(b.add(6)), high_bits_x86(b.add(2)))
    }
}

impl SubBlocksX86 for Q5_1 {
    #[inline(always)]
    unsafe fn head_x86(b: *const u8) -> Uniform {
        Uniform { d: f16_x86(b), mn: f16_x86(b.add(2)) }
    }
    #[inline(always)]
    unsafe fn ints_x86(b: *const u8, _: usize) -> __m256i {
        _mm256_or_si256(nibbles16_x86(b.add(8)), high_bits_x86(b.add(4)))
    }
}

impl SubBlocksX86 for Q4K {
    #[inline(always)]
    unsafe fn ints_x86(b: *const u8, j: usize) -> __m256i {
        bits_x86(_mm256_loadu_si256(b.add(16 + 32 * (j / 2)) as *const __m256i), 4 * (j % 2), 0x0F)
    }
}

impl SubBlocksX86 for Q5K {
    #[inline(always)]
    unsafe fn ints_x86(b: *const u8, j: usize) -> __m256i {
        let low = bits_x86(_mm256_loadu_si256(b.add(48 + 32 * (j / 2)) as *const __m256i), 4 * (j % 2), 0x0F);
        let high = bits_x86(_mm256_loadu_si256(b.add(16) as *const __m256i), j, 1);
        _mm256_or_si256(low, _mm256_slli_epi16(high, 4))
    }
}

impl SubBlocksX86 for Q6K {
    #[inline(always)]
    unsafe fn ints_x86(b: *const u8, j: usize) -> __m256i {
        let (half, s) = (j / 4, j % 4);
        let low = bits_x86(_mm256_loadu_si256(b.add(64 * half + 32 * (s % 2)) as *const __m256i), 4 * (s / 2), 0x0F);
        let high = bits_x86(_mm256_loadu_si256(b.add(128 + 32 * half) as *const __m256i), 2 * s, 3);
        _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32))
    }
}

macro_rules! sub_blocks_impl {
    ($name:ident, $features:literal, $dot:ident) => {
        /// `R` weight rows of a [`SubBlocks`] format against `N` activation rows: per
        /// sub-block, one integer dot product per row pair, scaled per 16-value half.
        ///
        /// # Safety
        /// The CPU has `$features`; every `ws[r]` holds at least `ws[0].len()` bytes, a
        /// whole number of `F`'s blocks; every `xs[t]` holds at least `VALUES / 32` times
        /// as many activation blocks.
        #[target_feature(enable = $features)]
        pub unsafe fn $name<F: SubBlocksX86, const R: usize, const N: usize>(ws: [&[u8]; R], xs: [&[ActBlock]; N]) -> [[f32; N]; R] {
            let nb = ws[0].len() / F::BYTES;
            let subs = F::VALUES / QK;
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            let mut mins = [[0f32; N]; R];
            for b in 0..nb {
                let mut h = [F::Head::default(); R];
                for r in 0..R {
                    h[r] = F::head_x86(ws[r].as_ptr().add(b * F::BYTES));
                }
                for j in 0..subs {
                    let mut q = [_mm256_setzero_si256(); R];
                    let mut sc = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        q[r] = F::ints_x86(ws[r].as_ptr().add(b * F::BYTES), j);
                        // Lanes 0..4 sum values 0..16, lanes 4..8 values 16..32.
                        sc[r] = _mm256_set_m128(_mm_set1_ps(F::scale(&h[r], 2 * j + 1)), _mm_set1_ps(F::scale(&h[r], 2 * j)));
                    }
                    for t in 0..N {
                        let xb = xs[t].get_unchecked(b * subs + j);
                        let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                        let xd = _mm256_set1_ps(xb.d);
                        // Signed integers: |x| as u8 times sign(x)·q as i8 (equal to x·q).
                        let ax = if F::SIGNED { _mm256_sign_epi8(xq, xq) } else { xq };
                        for r in 0..R {
                            let s = if F::SIGNED { $dot(ax, _mm256_sign_epi8(q[r], xq)) } else { $dot(q[r], xq) };
                            acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(sc[r], xd), _mm256_cvtepi32_ps(s), acc[r][t]);
                            mins[r][t] += F::min(&h[r], j) * xb.s;
                        }
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

/// [`SubBlocks`] rows two sub-blocks per 512-bit register (AVX-512 VNNI), as
/// [`q4_1_vnni512_pairs`] does for Q4_1: per pair and row, one `vpdpbusd` of 64 values,
/// a convert and two multiply-adds. Pairs are sub-blocks `j, j + 1` of one K-quant
/// super-block, or blocks `b, b + 1` of a one-sub-block format (an odd last block goes
/// through the 256-bit kernel).
///
/// # Safety
/// As for the 256-bit kernels; the CPU has the features enabled below.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
pub unsafe fn sub_blocks_vnni512_pairs<F: SubBlocksX86, const R: usize, const N: usize>(
    ws: [&[u8]; R],
    xs: [&[ActBlock]; N],
) -> [[f32; N]; R] {
    let nb = ws[0].len() / F::BYTES;
    let subs = F::VALUES / QK;
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let mut mins = [[0f32; N]; R];
    // Each of four floats over four lanes (a 16-value half's dot product spans four).
    let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let wide = |a: __m256i, b: __m256i| _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
    // One pair: sub-block `g` of the row (activation block `g`) and `g + 1`, given their
    // integers, four half scales and two minimums per row.
    let mut pair = |g: usize, q: [__m512i; R], sc: [__m512; R], mn: [[f32; 2]; R]| {
        for t in 0..N {
            let (x0, x1) = (xs[t].get_unchecked(g), xs[t].get_unchecked(g + 1));
            let xq = wide(
                _mm256_loadu_si256(x0.qs.as_ptr() as *const __m256i),
                _mm256_loadu_si256(x1.qs.as_ptr() as *const __m256i),
            );
            let xd = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castps_pd(_mm512_set1_ps(x0.d)),
                _mm256_castps_pd(_mm256_set1_ps(x1.d)),
                1,
            ));
            // Signed integers: |x| as u8 times sign(x)·q as i8 (q negated where x < 0,
            // zeroed where x = 0); unsigned ones: q as u8 times x as i8.
            let (ax, neg, nonzero) = (_mm512_abs_epi8(xq), _mm512_movepi8_mask(xq), _mm512_test_epi8_mask(xq, xq));
            for r in 0..R {
                let s = if F::SIGNED {
                    let w = _mm512_maskz_mov_epi8(nonzero, _mm512_mask_sub_epi8(q[r], neg, _mm512_setzero_si512(), q[r]));
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, w)
                } else {
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[r], xq)
                };
                acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(sc[r], xd), _mm512_cvtepi32_ps(s), acc[r][t]);
                mins[r][t] += mn[r][0] * x0.s + mn[r][1] * x1.s;
            }
        }
    };
    let tail;
    if subs == 1 {
        let mut b = 0;
        while b + 2 <= nb {
            let mut q = [_mm512_setzero_si512(); R];
            let mut sc = [_mm512_setzero_ps(); R];
            let mut mn = [[0f32; 2]; R];
            for r in 0..R {
                let (p0, p1) = (ws[r].as_ptr().add(b * F::BYTES), ws[r].as_ptr().add((b + 1) * F::BYTES));
                let (h0, h1) = (F::head_x86(p0), F::head_x86(p1));
                q[r] = wide(F::ints_x86(p0, 0), F::ints_x86(p1, 0));
                let s4 = _mm_setr_ps(F::scale(&h0, 0), F::scale(&h0, 1), F::scale(&h1, 0), F::scale(&h1, 1));
                sc[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
                mn[r] = [F::min(&h0, 0), F::min(&h1, 0)];
            }
            pair(b, q, sc, mn);
            b += 2;
        }
        tail = b;
    } else {
        for b in 0..nb {
            let mut h = [F::Head::default(); R];
            for r in 0..R {
                h[r] = F::head_x86(ws[r].as_ptr().add(b * F::BYTES));
            }
            for j in (0..subs).step_by(2) {
                let mut q = [_mm512_setzero_si512(); R];
                let mut sc = [_mm512_setzero_ps(); R];
                let mut mn = [[0f32; 2]; R];
                for r in 0..R {
                    let p = ws[r].as_ptr().add(b * F::BYTES);
                    q[r] = wide(F::ints_x86(p, j), F::ints_x86(p, j + 1));
                    let s4 = _mm_setr_ps(F::scale(&h[r], 2 * j), F::scale(&h[r], 2 * j + 1), F::scale(&h[r], 2 * j + 2), F::scale(&h[r], 2 * j + 3));
                    sc[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
                    mn[r] = [F::min(&h[r], j), F::min(&h[r], j + 1)];
                }
                pair(b * subs + j, q, sc, mn);
            }
        }
        tail = nb;
    }
    let mut out = [[0f32; N]; R];
    for r in 0..R {
        for t in 0..N {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]) + mins[r][t];
        }
    }
    if tail < nb {
        let rest = sub_blocks_vnni512::<F, R, N>(ws.map(|w| &w[tail * F::BYTES..]), xs.map(|x| &x[tail * subs..]));
        for r in 0..R {
            for t in 0..N {
                out[r][t] += rest[r][t];
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

q4_1_impl!(q4_1_avx2, "avx2,fma,f16c", dot_maddubs);
q4_1_impl!(q4_1_vnni512, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_vnni512);
q4_1_impl!(q4_1_vnni256, "avx2,fma,f16c,avxvnni", dot_vnni256);
sub_blocks_impl!(sub_blocks_avx2, "avx2,fma,f16c", dot_maddubs);
sub_blocks_impl!(sub_blocks_vnni512, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_vnni512);
sub_blocks_impl!(sub_blocks_vnni256, "avx2,fma,f16c,avxvnni", dot_vnni256);
