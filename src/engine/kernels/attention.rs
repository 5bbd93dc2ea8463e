//! Decode attention over the KV cache: the query heads that share one KV head read its
//! cached rows once (grouped-query attention), with an AVX-512F variant, over f32 or f16
//! cached rows.

use half::f16;

use super::elementwise::{axpy, dot};
#[cfg(target_arch = "x86_64")]
use super::avx512f;

/// A cached key/value element: f32, or f16 widened as it is read.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Whether the AVX-512 kernel widens 16 halves per load.
    const HALF: bool;
    /// `src` as f32 into `dst` (the same length).
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl KvElem for f32 {
    const HALF: bool = false;
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    const HALF: bool = true;
    fn widen(src: &[f16], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
}

/// Decode attention of the `group` query heads that share one kv head: `q` holds their
/// `group * hd` values (contiguous), `k`/`v` the cached rows (`stride` apart, this head's
/// values at `off`), of which the first `visible` count. Writes `group * hd` values to `out`.
#[expect(clippy::too_many_arguments, reason = "one argument per operand of the kernel")]
pub fn attend_group<T: KvElem>(
    q: &[f32],
    group: usize,
    hd: usize,
    k: &[T],
    v: &[T],
    stride: usize,
    off: usize,
    visible: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let mut on_stack = [0f32; 2 * MAX_GROUP];
    let mut on_heap = Vec::new();
    let stats = if group <= MAX_GROUP {
        &mut on_stack[..2 * group]
    } else {
        on_heap.resize(2 * group, 0.0);
        &mut on_heap[..]
    };
    attend_group_part(q, group, hd, k, v, stride, off, 0..visible, scale, scores, out, stats);
    normalize(out, hd, stats);
}

/// Query heads per kv head handled with stack scratch (more take the heap).
const MAX_GROUP: usize = 16;

/// Divides each head's sum by its softmax denominator.
fn normalize(out: &mut [f32], hd: usize, stats: &[f32]) {
    for (o, st) in out.chunks_exact_mut(hd).zip(stats.chunks_exact(2)) {
        let inv = if st[1] > 0.0 { 1.0 / st[1] } else { 0.0 };
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Attention of the `group` query heads over the cached positions `positions` only, not
/// normalized: `acc` gets `Σ exp(s_j − m) · v_j` per head and `stats` `(m, Σ exp(s_j − m))`
/// per head, so that parts over disjoint ranges combine exactly ([`combine_parts`]). Splitting
/// a long context over threads this way (flash-decoding) keeps one sequence's decode step
/// reading each cached row once.
#[expect(clippy::too_many_arguments, reason = "one argument per operand of the kernel")]
pub fn attend_group_part<T: KvElem>(
    q: &[f32],
    group: usize,
    hd: usize,
    k: &[T],
    v: &[T],
    stride: usize,
    off: usize,
    positions: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    acc: &mut [f32],
    stats: &mut [f32],
) {
    let n = positions.len();
    let (k, v) = (&k[positions.start * stride..], &v[positions.start * stride..]);
    scores.clear();
    scores.resize(group * n, 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if hd.is_multiple_of(16) && hd <= 256 && avx512f() && n > 0 && (n - 1) * stride + off + hd <= k.len().min(v.len()) {
            // SAFETY: the CPU has AVX-512F; every row read lies inside `k`/`v` (checked above).
            unsafe { x86_attend::attend_group_avx512(q, group, hd, k, v, stride, off, n, scale, scores, acc, stats) };
            return;
        }
    }
    let mut row = vec![0f32; hd];
    for j in 0..n {
        T::widen(&k[j * stride + off..j * stride + off + hd], &mut row);
        for g in 0..group {
            scores[g * n + j] = dot(&q[g * hd..(g + 1) * hd], &row) * scale;
        }
    }
    for g in 0..group {
        let (m, sum) = exp_shifted(&mut scores[g * n..(g + 1) * n]);
        stats[2 * g] = m;
        stats[2 * g + 1] = sum;
    }
    acc.fill(0.0);
    for j in 0..n {
        T::widen(&v[j * stride + off..j * stride + off + hd], &mut row);
        for (g, og) in acc.chunks_exact_mut(hd).enumerate() {
            axpy(scores[g * n + j], &row, og);
        }
    }
}

/// `x_j ← exp(x_j − max x)`; returns `(max x, Σ x_j)` (an empty slice: `(-inf, 0)`).
pub fn exp_shifted(x: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512f() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { x86_attend::exp_shifted_avx512(x) };
        }
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    (max, sum)
}

/// `x_j ← exp(x_j)` (below −87 it underflows to 0, above 88 it is infinite).
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512f() {
            // SAFETY: the CPU has AVX-512F.
            unsafe { x86_attend::exp_avx512(x) };
            return;
        }
    }
    for v in x.iter_mut() {
        *v = v.exp();
    }
}

/// Folds parts of one head's attention into the first: `acc`/`stats` as
/// [`attend_group_part`] writes them, for `parts` consecutive parts of `hd` values (and 2
/// stats) each; leaves the normalized result in the first `hd` values of `acc`.
pub fn combine_parts(acc: &mut [f32], stats: &[f32], hd: usize, parts: usize) {
    let m = (0..parts).map(|p| stats[2 * p]).fold(f32::NEG_INFINITY, f32::max);
    let mut denom = 0.0;
    let (first, rest) = acc.split_at_mut(hd);
    let w0 = (stats[0] - m).exp();
    denom += w0 * stats[1];
    first.iter_mut().for_each(|x| *x *= w0);
    for p in 1..parts {
        let w = (stats[2 * p] - m).exp();
        denom += w * stats[2 * p + 1];
        axpy(w, &rest[(p - 1) * hd..p * hd], first);
    }
    let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
    first.iter_mut().for_each(|x| *x *= inv);
}


#[cfg(target_arch = "x86_64")]
mod x86_attend {
    use std::arch::x86_64::*;

    /// 16 cached values at `p` as f32 lanes (f16 widened by `vcvtph2ps`).
    macro_rules! load16 {
        ($t:ty, $p:expr) => {
            if <$t as super::KvElem>::HALF {
                _mm512_cvtph_ps(_mm256_loadu_si256($p.cast::<__m256i>()))
            } else {
                _mm512_loadu_ps($p.cast::<f32>())
            }
        };
    }

    /// [`super::attend_group_part`] on AVX-512F (over `visible` rows from the start of `k`/`v`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; as [`super::attend_group_part`] checks: `hd` is a multiple of 16 and
    /// at most 256, `visible ≥ 1` and `(visible - 1) · stride + off + hd` is within `k` and
    /// `v`; `q` and `out` hold `group × hd` values, `scores` `group × visible`, `stats`
    /// `2 × group`.
    #[expect(clippy::too_many_arguments, reason = "the portable kernel's signature, one pointer per operand")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_group_avx512<T: super::KvElem>(
        q: &[f32],
        group: usize,
        hd: usize,
        k: &[T],
        v: &[T],
        stride: usize,
        off: usize,
        visible: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
        stats: &mut [f32],
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
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c * 16)), load16!(T, kp.add(c * 16)), a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c * 16 + 16)), load16!(T, kp.add(c * 16 + 16)), a1);
                    c += 2;
                }
                if c < chunks {
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c * 16)), load16!(T, kp.add(c * 16)), a0);
                }
                *scores.get_unchecked_mut(g * visible + j) = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
            }
        }
        for g in 0..group {
            let (m, sum) = exp_shifted_avx512(&mut scores[g * visible..(g + 1) * visible]);
            stats[2 * g] = m;
            stats[2 * g + 1] = sum;
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
                    a0 = _mm512_fmadd_ps(b, load16!(T, vp), a0);
                    a1 = _mm512_fmadd_ps(b, load16!(T, vp.add(16)), a1);
                    a2 = _mm512_fmadd_ps(b, load16!(T, vp.add(32)), a2);
                    a3 = _mm512_fmadd_ps(b, load16!(T, vp.add(48)), a3);
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
                    *a = _mm512_fmadd_ps(b, load16!(T, vp.add(c * 16)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate().take(chunks) {
                _mm512_storeu_ps(op.add(c * 16), *a);
            }
        }
    }

    /// [`super::exp_shifted`] on AVX-512F: `exp` as `2^n · p(r)` with `n = round(x · log2 e)`,
    /// `r = x − n ln 2` (two-part ln 2) and a degree-6 Taylor polynomial (relative error about
    /// 2e-7 on |r| ≤ ln 2 / 2), `2^n` applied by `vscalefps`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_avx512(x: &mut [f32]) -> (f32, f32) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let full = n / 16 * 16;
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < full {
            vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        let mut max = _mm512_reduce_max_ps(vmax);
        for &v in &x[full..] {
            max = max.max(v);
        }
        if n == 0 || max == f32::NEG_INFINITY {
            return (max, 0.0);
        }
        let m = _mm512_set1_ps(max);
        let mut vsum = _mm512_setzero_ps();
        let mut i = 0;
        while i < full {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
            _mm512_storeu_ps(p.add(i), e);
            vsum = _mm512_add_ps(vsum, e);
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(vsum);
        for v in &mut x[full..] {
            *v = (*v - max).exp();
            sum += *v;
        }
        (max, sum)
    }

    /// [`super::exp_in_place`] on AVX-512F, [`exp512`] per 16 values.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_avx512(x: &mut [f32]) {
        let full = x.len() / 16 * 16;
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i < full {
            _mm512_storeu_ps(p.add(i), exp512(_mm512_loadu_ps(p.add(i))));
            i += 16;
        }
        for v in &mut x[full..] {
            *v = v.exp();
        }
    }

    /// `exp(x)` lane-wise: below −87 it underflows to 0; accurate to about 2e-7 relative
    /// where the result is finite (`2^n` by `vscalefps`, so large x gives infinity).
    #[target_feature(enable = "avx512f")]
    unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut y = _mm512_set1_ps(1.0 / 720.0);
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0 / 120.0));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0 / 24.0));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0 / 6.0));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0));
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }
}
