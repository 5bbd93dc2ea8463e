//! Element-wise kernels of the forward pass: RMS norm, rotary embeddings, SiLU and GELU gating,
//! dot products, `axpy` and softmax.

use super::OutPtr;

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

/// The gating function of a model's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `silu(gate) * up` (Llama, Qwen2).
    Silu,
    /// `gelu_tanh(gate) * up` (Gemma).
    GeluTanh,
}

/// [`silu_mul`] or [`gelu_mul`] with the rows shared over `pool`'s threads when there are
/// several.
pub fn gate_mul_par(pool: &crate::engine::pool::Pool, gate: Gate, gu: &[f32], n: usize, out: &mut [f32]) {
    let run = |gu: &[f32], o: &mut [f32]| match gate {
        Gate::Silu => silu_mul(gu, n, o),
        Gate::GeluTanh => gelu_mul(gu, n, o),
    };
    let m = out.len() / n.max(1);
    let threads = pool.threads().min(m);
    if threads < 2 {
        return run(gu, out);
    }
    let dst = OutPtr(out.as_mut_ptr());
    pool.run(&|tid| {
        let (r0, r1) = crate::engine::pool::share(m, threads, tid);
        // SAFETY: shares are disjoint row ranges inside `out` (m rows of n).
        let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r0 * n), (r1 - r0) * n) };
        run(&gu[r0 * 2 * n..r1 * 2 * n], o);
    });
}

/// [`silu_mul`] with the rows shared over `pool`'s threads.
pub fn silu_mul_par(pool: &crate::engine::pool::Pool, gu: &[f32], n: usize, out: &mut [f32]) {
    gate_mul_par(pool, Gate::Silu, gu, n, out);
}

/// GELU's tanh approximation, as Gemma (`gelu_pytorch_tanh`) and candle's `gelu` compute it.
#[inline]
pub fn gelu_tanh(v: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (1.0 + 0.044_715 * v * v)).tanh())
}

/// `gelu_tanh(gate) * up`, laid out as [`silu_mul`].
pub fn gelu_mul(gu: &[f32], n: usize, out: &mut [f32]) {
    for (r, o) in gu.chunks_exact(2 * n).zip(out.chunks_exact_mut(n)) {
        let (g, u) = r.split_at(n);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = gelu_tanh(g) * u;
        }
    }
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


/// Softmax in place.
pub fn softmax(x: &mut [f32]) {
    let (_, sum) = super::exp_shifted(x);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}
