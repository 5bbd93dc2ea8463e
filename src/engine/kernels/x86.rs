//! The x86 dot kernels of the block formats: AVX-512 VNNI and AVX-VNNI (`vpdpbusd`), and
//! AVX2 (`vpmaddubsw`). With AVX-512, Q4_1 rows take two blocks per register (a block
//! pair's scales fill the two halves of one vector). Each must equal the format's portable
//! loop (`quant.rs`), which the tests check on every variant this CPU has.

use super::quant::{ActBlock, Q4_1_BYTES, Q8_0_BYTES};
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
