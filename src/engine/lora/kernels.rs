//! Low-rank products of one activation row with an f16 adapter pair, the f16 values widened
//! in registers as they are read.
//!
//! In a decode step each adapter group has a row or two, so every pair byte is used once or
//! twice: the step streams the batch's adapters from memory (8 rank-16 adapters on all 7
//! projections of SmolLM2-135M are 75 MiB per step). Widening a pair into an f32 buffer first
//! and then running `axpy` loops moved three times those bytes through the caches plus a
//! call per input value; these kernels read each f16 once and keep the rank-wide sums in
//! registers, so the products run at close to the speed of reading the bytes.
//!
//! Float order: the shrink sums the inputs in interleaved chains (input `j` in chain
//! `j mod L`, L = 4 up to rank 16, 2 up to rank 40, then 1), the expand adds rank by rank
//! onto `y`, both with fused multiply-adds; the prefill path (`sgemm`) orders its sums
//! differently, so the two agree to rounding (relative ~1e-7 per term), not bit for bit.

use half::f16;

/// The widest rank the register kernels take; wider adapters use the widened path.
pub const MAX_RANK: usize = 64;

/// Whether [`row_f16`] runs in registers for rank `r` on this CPU.
pub fn fused(r: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        r > 0 && r.is_multiple_of(8) && r <= MAX_RANK && crate::engine::kernels::isa() != crate::engine::kernels::Isa::Portable
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = r;
        false
    }
}

/// `y += (x·A)·B` for one row: `x` `[k]`, `a` f16 `[k, r]`, `b` f16 `[r, n]`, `y` `[n]`.
/// Returns `false` (and leaves `y`) when the shapes do not fit or [`fused`] is false for `r`.
pub fn row_f16(x: &[f32], a: &[f16], b: &[f16], r: usize, y: &mut [f32]) -> bool {
    let (k, n) = (x.len(), y.len());
    if !fused(r) || a.len() != k * r || b.len() != r * n {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut t = [0f32; MAX_RANK];
        // SAFETY: `fused` checked AVX2/FMA/F16C (every non-portable ISA has them) and the
        // rank; the lengths were checked above.
        unsafe {
            match r / 8 {
                1 => x86::shrink::<1, 4>(x, a, &mut t),
                2 => x86::shrink::<2, 4>(x, a, &mut t),
                3 => x86::shrink::<3, 2>(x, a, &mut t),
                4 => x86::shrink::<4, 2>(x, a, &mut t),
                5 => x86::shrink::<5, 2>(x, a, &mut t),
                6 => x86::shrink::<6, 1>(x, a, &mut t),
                7 => x86::shrink::<7, 1>(x, a, &mut t),
                _ => x86::shrink::<8, 1>(x, a, &mut t),
            }
            x86::expand(&t[..r], b, y);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Eight f16 at `p` as f32.
    ///
    /// # Safety
    /// The CPU has F16C; `p` points at eight readable f16 values.
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// `t[..8C] = x·A`, `A` `[k, 8C]`; `L` interleaved chains (input `j` in chain `j mod L`).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `a` holds `x.len() × 8C` values and `t` at least `8C`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn shrink<const C: usize, const L: usize>(x: &[f32], a: &[f16], t: &mut [f32]) {
        let r = 8 * C;
        let k = x.len();
        let ap = a.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); C]; L];
        let mut j = 0;
        while j + L <= k {
            for (l, chain) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*x.get_unchecked(j + l));
                let row = ap.add((j + l) * r);
                for (c, s) in chain.iter_mut().enumerate() {
                    *s = _mm256_fmadd_ps(xv, load8(row.add(8 * c)), *s);
                }
            }
            j += L;
        }
        // The last inputs (k not a multiple of L) in their own chains, as above.
        for (l, chain) in acc.iter_mut().enumerate().take(k - j) {
            let xv = _mm256_set1_ps(*x.get_unchecked(j + l));
            let row = ap.add((j + l) * r);
            for (c, s) in chain.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(xv, load8(row.add(8 * c)), *s);
            }
        }
        for c in 0..C {
            let mut s = acc[0][c];
            for chain in &acc[1..] {
                s = _mm256_add_ps(s, chain[c]);
            }
            _mm256_storeu_ps(t.as_mut_ptr().add(8 * c), s);
        }
    }

    /// `y += t·B`, `B` `[t.len(), y.len()]`: 32 outputs at a time in registers, rank by rank.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `b` holds `t.len() × y.len()` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn expand(t: &[f32], b: &[f16], y: &mut [f32]) {
        let n = y.len();
        let (bp, yp) = (b.as_ptr(), y.as_mut_ptr());
        let mut c = 0;
        while c + 32 <= n {
            let mut s = [
                _mm256_loadu_ps(yp.add(c)),
                _mm256_loadu_ps(yp.add(c + 8)),
                _mm256_loadu_ps(yp.add(c + 16)),
                _mm256_loadu_ps(yp.add(c + 24)),
            ];
            for (rr, &tv) in t.iter().enumerate() {
                let tv = _mm256_set1_ps(tv);
                let row = bp.add(rr * n + c);
                for (i, si) in s.iter_mut().enumerate() {
                    *si = _mm256_fmadd_ps(tv, load8(row.add(8 * i)), *si);
                }
            }
            for (i, si) in s.iter().enumerate() {
                _mm256_storeu_ps(yp.add(c + 8 * i), *si);
            }
            c += 32;
        }
        while c + 8 <= n {
            let mut s = _mm256_loadu_ps(yp.add(c));
            for (rr, &tv) in t.iter().enumerate() {
                s = _mm256_fmadd_ps(_mm256_set1_ps(tv), load8(bp.add(rr * n + c)), s);
            }
            _mm256_storeu_ps(yp.add(c), s);
            c += 8;
        }
        for col in c..n {
            let mut s = *yp.add(col);
            for (rr, &tv) in t.iter().enumerate() {
                s = tv.mul_add((*bp.add(rr * n + col)).to_f32(), s);
            }
            *yp.add(col) = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The products in f64 from the same f16 values.
    fn reference(x: &[f32], a: &[f16], b: &[f16], r: usize, y: &[f32]) -> Vec<f64> {
        let (k, n) = (x.len(), y.len());
        let t: Vec<f64> = (0..r).map(|c| (0..k).map(|j| x[j] as f64 * a[j * r + c].to_f64()).sum()).collect();
        (0..n).map(|o| y[o] as f64 + (0..r).map(|c| t[c] * b[c * n + o].to_f64()).sum::<f64>()).collect()
    }

    #[test]
    fn register_products_match_f64_for_every_rank_and_odd_widths() {
        if !fused(8) {
            return; // a portable CPU: the widened path is the only one
        }
        for &(k, r, n) in &[(576, 16, 576), (576, 8, 192), (1536, 16, 576), (35, 24, 45), (3, 64, 7), (130, 40, 1536), (64, 56, 33)] {
            let x: Vec<f32> = (0..k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let a: Vec<f16> = (0..k * r).map(|i| f16::from_f32(((i * 13 % 61) as f32 - 30.0) / 300.0)).collect();
            let b: Vec<f16> = (0..r * n).map(|i| f16::from_f32(((i * 7 % 53) as f32 - 26.0) / 100.0)).collect();
            let y0: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let want = reference(&x, &a, &b, r, &y0);
            let mut y = y0.clone();
            assert!(row_f16(&x, &a, &b, r, &mut y), "k {k} r {r} n {n}");
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (o, (&got, &w)) in y.iter().zip(&want).enumerate() {
                assert!((got as f64 - w).abs() <= 1e-5 * scale, "k {k} r {r} n {n} col {o}: {got} vs {w}");
            }
        }
    }

    #[test]
    fn shapes_it_cannot_take_are_refused_untouched() {
        let x = vec![1f32; 8];
        let a = vec![f16::ONE; 8 * 12];
        let b = vec![f16::ONE; 12 * 4];
        let mut y = vec![0.5f32; 4];
        assert!(!row_f16(&x, &a, &b, 12, &mut y)); // rank not a multiple of 8
        assert!(!row_f16(&x, &a[..8 * 8], &b, 8, &mut y)); // b does not fit
        assert!(!row_f16(&x, &vec![f16::ONE; 8 * 72], &vec![f16::ONE; 72 * 4], 72, &mut y)); // too wide
        assert_eq!(y, vec![0.5f32; 4]);
    }
}
