//! Fused, differentiable CPU kernels for the training path (`Model::forward_train`). They compute
//! what serving's fused kernels compute, row by row, and carry their own backward pass, so
//! the trainer's graph holds one node per kernel instead of a chain of elementwise ops
//! (each a full pass over memory, forward and backward). The frozen projection also keeps
//! candle's autograd from computing a gradient for a base weight nobody trains.
//!
//! Each backward pass is itself a kernel here applied without autograd. Inputs must be
//! contiguous f32 (callers make them so); anything else is an error, never a panic.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => Err(candle_core::Error::Msg(format!("{op}: expects a contiguous tensor"))),
    }
}

/// Rows of `len` elements in a tensor of `dims` (the last dimension is the row).
fn rows_of(dims: &[usize]) -> (usize, usize) {
    let len = dims.last().copied().unwrap_or(1);
    (dims.iter().product::<usize>() / len.max(1), len)
}

/// A row-major matrix view: `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> CResult<Self> {
        let last = match (rows, cols) {
            (0, _) | (_, 0) => 0,
            _ => (rows - 1) * row_stride + (cols - 1) * col_stride + 1,
        };
        if last > data.len() {
            return Err(candle_core::Error::Msg(format!("matmul: a {rows}x{cols} view needs {last} elements, has {}", data.len())));
        }
        Ok(Self { data, rows, cols, row_stride, col_stride })
    }
}

/// `a · b` into a new row-major `[a.rows, b.cols]` buffer. The rows of the product are
/// split over the current rayon pool. `matrixmultiply` rather than candle's matmul (the
/// `gemm` crate): on the machines measured (`benches/results/training.md`) it ran these
/// shapes about twice as fast per core, and these products are most of a training step.
fn matmul_rows(a: Mat<'_>, b: Mat<'_>) -> CResult<Vec<f32>> {
    if a.cols != b.rows {
        return Err(candle_core::Error::Msg(format!("matmul: {}x{} by {}x{}", a.rows, a.cols, b.rows, b.cols)));
    }
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let block = m.div_ceil(rayon::current_num_threads().max(1)).max(16);
    out.par_chunks_mut(block * n).enumerate().for_each(|(i, c)| {
        let r0 = i * block;
        let rows = c.len() / n;
        // SAFETY: `Mat::new` checked that every (row, col) of `a` and `b` addressed by the
        // strides lies inside its slice; this block reads rows r0..r0+rows of `a` (within
        // a.rows) and writes exactly its own `rows × n` chunk of `out`.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                1.0,
                a.data.as_ptr().add(r0 * a.row_stride),
                a.row_stride as isize,
                a.col_stride as isize,
                b.data.as_ptr(),
                b.row_stride as isize,
                b.col_stride as isize,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
    Ok(out)
}

/// The weight's contiguous f32 data and its `[out, in]` dims.
fn weight_data<'a>(s: &'a Storage, l: &Layout, op: &str) -> CResult<(&'a [f32], usize, usize)> {
    let Storage::Cpu(s) = s else {
        return Err(candle_core::Error::Msg(format!("{op}: the weight is not on the CPU")));
    };
    let (n, k) = l.shape().dims2()?;
    Ok((contiguous_f32(s, l, op)?, n, k))
}

/// `x · Wᵀ` for a frozen `W` `[out, in]` and `x` `[rows, in]`. Backward: `∂x = ∂y · W`
/// only, where candle's matmul would also form `∂W = ∂yᵀ · x`, as costly as the forward
/// product and thrown away.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let x = contiguous_f32(s, l, self.name())?;
        let (ws, wl) = self.w.storage_and_layout();
        let (w, n, kw) = weight_data(&ws, wl, self.name())?;
        let out = matmul_rows(Mat::new(x, m, k, k, 1)?, Mat::new(w, kw, n, 1, kw)?)?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&FrozenMatmulGrad { w: self.w.clone() })?))
    }
}

/// `∂y · W`, `∂y` `[rows, out]`.
struct FrozenMatmulGrad {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulGrad {
    fn name(&self) -> &'static str {
        "frozen-matmul-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, n) = l.shape().dims2()?;
        let g = contiguous_f32(s, l, self.name())?;
        let (ws, wl) = self.w.storage_and_layout();
        let (w, nw, k) = weight_data(&ws, wl, self.name())?;
        let out = matmul_rows(Mat::new(g, m, n, n, 1)?, Mat::new(w, nw, k, k, 1)?)?;
        Ok((CpuStorage::F32(out), Shape::from((m, k))))
    }
}

/// `x · Wᵀ` with `W` `[out, in]` frozen (no gradient is formed for it).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.contiguous()? })
}

/// RMS norm over the last dimension with a frozen weight: `y = x · r · w`,
/// `r = 1/√(mean(x²) + eps)`.
struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn weight(&self) -> CResult<Vec<f32>> {
        self.w.flatten_all()?.to_vec1::<f32>()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (_, h) = rows_of(l.dims());
        let w = self.weight()?;
        if w.len() != h {
            return Err(candle_core::Error::Msg(format!("rms-norm: width {h}, weight {}", w.len())));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(&w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(&x.contiguous()?, &RmsNormGrad { w: self.weight()?, eps: self.eps })?))
    }
}

/// `∂x = r·(g∘w) − x · r³/h · Σ(g∘w∘x)` per row; applied as (grad, x).
struct RmsNormGrad {
    w: Vec<f32>,
    eps: f32,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = contiguous_f32(gs, gl, self.name())?;
        let x = contiguous_f32(xs, xl, self.name())?;
        let (_, h) = rows_of(xl.dims());
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(h).zip(x.par_chunks(h).zip(g.par_chunks(h))).for_each(|(dx, (x, g))| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            let dot: f32 = x.iter().zip(g).zip(&self.w).map(|((x, g), w)| x * g * w).sum();
            let c = r * r * r * dot / h as f32;
            for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(&self.w) {
                *dx = r * g * w - x * c;
            }
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// RMS norm of `x` over its last dimension with the frozen weight `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps })
}

/// Rotary embedding of `[.., t, d]` at positions `0..t`. `interleaved`: pairs `(2j, 2j+1)`
/// (GGUF Llama); else `(j, j + d/2)` (Hugging Face). The rotation is orthogonal, so the
/// backward pass is the same kernel turning the other way.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
    interleaved: bool,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (_, d) = rows_of(l.dims());
        let half = d / 2;
        if self.cos.len() != self.t * half {
            return Err(candle_core::Error::Msg("rope: table does not match the input".into()));
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * self.t).zip(x.par_chunks(d * self.t)).for_each(|(y, x)| {
            for (i, (y, x)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                let (cos, sin) = (&self.cos[i * half..(i + 1) * half], &self.sin[i * half..(i + 1) * half]);
                for j in 0..half {
                    let (a, b) = if self.interleaved { (2 * j, 2 * j + 1) } else { (j, j + half) };
                    let (c, s) = (cos[j], sign * sin[j]);
                    y[a] = x[a] * c - x[b] * s;
                    y[b] = x[a] * s + x[b] * c;
                }
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            t: self.t,
            interleaved: self.interleaved,
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// RoPE on `x` `[.., t, d]` at positions `0..t`; `cos`, `sin` are the tables' first `t`
/// rows, `[t, d/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> CResult<Tensor> {
    let t = x.dim(candle_core::D::Minus2)?;
    let op = Rope {
        cos: cos.flatten_all()?.to_vec1::<f32>()?,
        sin: sin.flatten_all()?.to_vec1::<f32>()?,
        t,
        interleaved,
        inverse: false,
    };
    x.contiguous()?.apply_op1(op)
}

/// Softmax of `scale · x` over the last dimension with a causal mask: in each block of
/// `t` rows, row `i` sees columns `0..=i`, or only the last `window` of them (masked
/// entries are exactly zero, as `exp(-inf)` gives in serving). Backward:
/// `∂x = scale · y ∘ (g − Σ g∘y)`.
struct CausalSoftmax {
    t: usize,
    scale: f32,
    window: Option<usize>,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (_, n) = rows_of(l.dims());
        let t = self.t.max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).enumerate().for_each(|(r, (y, x))| {
            let seen = (r % t + 1).min(n);
            let start = self.window.map_or(0, |w| seen.saturating_sub(w));
            let (y, x) = (&mut y[start..seen], &x[start..seen]);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, x) in y.iter_mut().zip(x) {
                *y = ((x - max) * self.scale).exp();
                sum += *y;
            }
            for y in y.iter_mut() {
                *y /= sum;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &SoftmaxGrad { scale: self.scale })?))
    }
}

/// Softmax backward over the last dimension, applied as (grad, softmax output).
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ys: &CpuStorage, yl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = contiguous_f32(gs, gl, self.name())?;
        let y = contiguous_f32(ys, yl, self.name())?;
        let (_, n) = rows_of(yl.dims());
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).for_each(|(dx, (y, g))| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                *dx = self.scale * y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

/// Causal softmax of `scale · scores`, scores `[.., rows, keys]` whose rows come in blocks
/// of `t` queries at positions `0..t` (keys at `0..keys`); with a `window`, a query sees
/// only that many positions, its own included (sliding-window layers).
pub fn causal_softmax(scores: &Tensor, t: usize, scale: f32, window: Option<usize>) -> CResult<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { t, scale, window })
}

/// Per-row cross-entropy `logsumexp(x) − x[target]` of logits `[rows, vocab]` against
/// `u32` targets `[rows]`, without materialising log-probabilities. Backward (logits only):
/// `∂x = (softmax(x) − onehot(target)) · g_row`.
struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ts: &CpuStorage, tl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, self.name())?;
        let targets = targets(ts, tl, xl)?;
        let (rows, v) = xl.shape().dims2()?;
        let mut loss = vec![0f32; rows];
        loss.par_iter_mut().zip(x.par_chunks(v).zip(targets.par_iter())).for_each(|(loss, (x, &t))| {
            *loss = log_sum_exp(x) - x[t as usize];
        });
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.contiguous()?.apply_op3_no_bwd(&t.contiguous()?, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(dx), None))
    }
}

fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

/// The target ids, checked against the logits' rows and vocabulary.
fn targets<'a>(ts: &'a CpuStorage, tl: &Layout, xl: &Layout) -> CResult<&'a [u32]> {
    let (rows, v) = xl.shape().dims2()?;
    let t = match tl.contiguous_offsets() {
        Some((a, b)) => &ts.as_slice::<u32>()?[a..b],
        None => return Err(candle_core::Error::Msg("cross-entropy: targets must be contiguous".into())),
    };
    if t.len() != rows || t.iter().any(|&t| t as usize >= v) {
        return Err(candle_core::Error::Msg(format!("cross-entropy: {} targets for {rows} rows of {v} classes", t.len())));
    }
    Ok(t)
}

/// Cross-entropy backward, applied as (logits, targets, grad per row).
struct CrossEntropyGrad;

impl candle_core::CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, self.name())?;
        let targets = targets(ts, tl, xl)?;
        let g = contiguous_f32(gs, gl, self.name())?;
        let (_, v) = xl.shape().dims2()?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v).zip(x.par_chunks(v).zip(targets.par_iter().zip(g.par_iter()))).for_each(
            |(dx, (x, (&t, &g)))| {
                let lse = log_sum_exp(x);
                for (dx, x) in dx.iter_mut().zip(x) {
                    *dx = (x - lse).exp() * g;
                }
                dx[t as usize] -= g;
            },
        );
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// Mean cross-entropy of logits `[rows, vocab]` against `u32` targets `[rows]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)?.mean_all()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    type R = anyhow::Result<()>;

    fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// Each kernel against the same arithmetic in plain candle ops, forward and gradient.
    #[test]
    fn fused_kernels_match_plain_ops_and_their_gradients() -> R {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let up = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let mask: Vec<f32> =
            (0..5).flat_map(|i| (0..5).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (5, 5), &dev)?;
        // A sliding window of 2: row i sees columns i - 1 and i.
        let window: Vec<f32> = (0..5)
            .flat_map(|i| (0..5).map(move |j| if j > i || j + 2 <= i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let window = Tensor::from_vec(window, (5, 5), &dev)?;
        let lin_w = Tensor::randn(0f32, 1.0, (6, 8), &dev)?;
        type Op<'a> = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + 'a>;
        let cases: Vec<(&str, (Op, Op))> = vec![
            ("rms", (Box::new(|x| super::rms_norm(x, &w, 1e-5)), Box::new(|x| candle_nn::ops::rms_norm_slow(x, &w, 1e-5)))),
            ("rope_i", (Box::new(|x| super::rope(x, &cos, &sin, true)), Box::new(|x| candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin)))),
            ("rope", (Box::new(|x| super::rope(x, &cos, &sin, false)), Box::new(|x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin)))),
            (
                "softmax",
                (
                    Box::new(|x| super::causal_softmax(&x.narrow(3, 0, 5)?, 5, 0.5, None)),
                    Box::new(|x| {
                        candle_nn::ops::softmax(&(x.narrow(3, 0, 5)? * 0.5)?.broadcast_add(&mask)?, candle_core::D::Minus1)
                    }),
                ),
            ),
            (
                "softmax_window",
                (
                    Box::new(|x| super::causal_softmax(&x.narrow(3, 0, 5)?, 5, 0.5, Some(2))),
                    Box::new(|x| {
                        candle_nn::ops::softmax(&(x.narrow(3, 0, 5)? * 0.5)?.broadcast_add(&window)?, candle_core::D::Minus1)
                    }),
                ),
            ),
            (
                "linear",
                (
                    Box::new(|x| super::frozen_matmul(&x.reshape((30, 8))?, &lin_w)),
                    Box::new(|x| x.reshape((30, 8))?.matmul(&lin_w.t()?)),
                ),
            ),
        ];
        let logits = Var::from_tensor(&Tensor::randn(0f32, 2.0, (4, 7), &dev)?)?;
        let targets = Tensor::from_vec(vec![0u32, 6, 3, 3], 4, &dev)?;
        let a = super::cross_entropy(logits.as_tensor(), &targets)?;
        let b = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets)?;
        anyhow::ensure!(max_diff(&a, &b)? < 1e-5, "cross-entropy differs");
        let (ga, gb) = (a.backward()?, b.backward()?);
        let (ga, gb) = (ga.get(logits.as_tensor()), gb.get(logits.as_tensor()));
        let (Some(ga), Some(gb)) = (ga, gb) else { anyhow::bail!("cross-entropy: no gradient") };
        anyhow::ensure!(max_diff(ga, gb)? < 1e-5, "cross-entropy gradient differs");
        for (name, (fused, plain)) in cases {
            let (a, b) = (fused(x.as_tensor())?, plain(x.as_tensor())?);
            let d = max_diff(&a, &b)?;
            anyhow::ensure!(d < 1e-5, "{name}: forward differs by {d}");
            let u = up.flatten_all()?.narrow(0, 0, a.elem_count())?.reshape(a.shape())?;
            let ga = (a * &u)?.sum_all()?.backward()?;
            let gb = (b * &u)?.sum_all()?.backward()?;
            let (ga, gb) = (
                ga.get(x.as_tensor()).ok_or_else(|| anyhow::anyhow!("{name}: no gradient"))?,
                gb.get(x.as_tensor()).ok_or_else(|| anyhow::anyhow!("{name}: no reference gradient"))?,
            );
            let d = max_diff(ga, gb)?;
            anyhow::ensure!(d < 1e-4, "{name}: gradient differs by {d}");
        }
        Ok(())
    }
}
