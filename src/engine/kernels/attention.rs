//! Decode attention over the KV cache: the query heads that share one KV head read its
//! cached rows once (grouped-query attention), with an AVX-512F variant.

use super::elementwise::{axpy, dot, softmax};
#[cfg(target_arch = "x86_64")]
use super::avx512f;

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

