//! Fused, differentiable CPU kernels for the training path (`Model::forward_train`). They compute
//! what serving's fused kernels compute, row by row, and carry their own backward pass, so
//! the trainer's graph holds one node per kernel instead of a chain of elementwise ops
//! (each a full pass over memory, forward and backward). The frozen projection also keeps
//! candle's autograd from computing a gradient for a base weight nobody trains.
//!
//! Each backward pass is itself a kernel here applied without autograd. Inputs must be
//! contiguous f32 (callers make them so); anything else is an error, never a panic.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

use crate::engine::kernels::panel::{self, Panels};
use crate::engine::kernels::{exp_in_place, exp_shifted, BlockType, OutPtr, QActs, QK};

type CResult<T> = candle_core::Result<T>;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => Err(candle_core::Error::Msg(format!("{op}: expects a contiguous tensor"))),
    }
}

/// A new buffer of `cells` values (rows of `len`) filled by `f(i, row)` for every row `i`,
/// shared over candle's worker pool: the trainer's kernels run on the threads that run
/// candle's own ops, so no second pool spins beside them for the same cores. Each task
/// zeroes its own rows just before `f` fills them (in parallel, and while they are in cache)
/// rather than the caller zeroing the whole buffer first.
fn rows_by(cells: usize, len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if len == 0 || cells == 0 {
        return vec![0f32; cells];
    }
    let rows = cells / len;
    let mut out = Vec::<f32>::with_capacity(rows * len);
    let ptr = OutPtr(out.as_mut_ptr());
    crate::engine::pool::training_chunks(rows, |range| {
        for i in range {
            // SAFETY: row `i` (< rows) is `len` cells inside the allocation, handed to
            // exactly one call; it is zeroed before a slice over it is formed.
            let row = unsafe {
                std::ptr::write_bytes(ptr.at(i * len), 0, len);
                std::slice::from_raw_parts_mut(ptr.at(i * len), len)
            };
            f(i, row);
        }
    });
    // SAFETY: every row was zeroed (and then filled) above.
    unsafe { out.set_len(rows * len) };
    out
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
/// split over candle's worker pool. `matrixmultiply` rather than candle's matmul (the
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
    let block = m.div_ceil(candle_core::utils::get_num_threads().max(1)).max(16);
    let ptr = OutPtr(out.as_mut_ptr());
    crate::engine::pool::training_chunks(m.div_ceil(block), |chunks| {
        for i in chunks {
            let r0 = i * block;
            let rows = block.min(m - r0);
            // SAFETY: `Mat::new` checked that every (row, col) of `a` and `b` addressed by
            // the strides lies inside its slice; this block reads rows r0..r0+rows of `a`
            // (within a.rows) and writes exactly its own `rows × n` cells of `out`.
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
                    ptr.at(r0 * n),
                    n as isize,
                    1,
                );
            }
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

/// A tensor's last two dims as a strided matrix, its leading dims as one batch with a
/// constant stride; `None` when the leading dims do not collapse to one stride.
struct Strided {
    batch: usize,
    batch_stride: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
    offset: usize,
}

impl Strided {
    fn of(l: &Layout) -> Option<Self> {
        let (dims, strides) = (l.dims(), l.stride());
        let n = dims.len();
        if n < 2 {
            return None;
        }
        // Leading dims of size 1 say nothing (their stride is arbitrary); the others collapse
        // when each one's stride is the next one's stride × size.
        let lead: Vec<(usize, usize)> = (0..n - 2).filter(|&i| dims[i] > 1).map(|i| (dims[i], strides[i])).collect();
        let batch: usize = lead.iter().map(|&(d, _)| d).product();
        if lead.windows(2).any(|w| w[0].1 != w[1].1 * w[1].0) {
            return None;
        }
        let batch_stride = lead.last().map_or(0, |&(_, s)| s);
        Some(Self { batch, batch_stride, rows: dims[n - 2], cols: dims[n - 1], row_stride: strides[n - 2], col_stride: strides[n - 1], offset: l.start_offset() })
    }

    /// Elements from the offset that the view reaches (0 if empty).
    fn span(&self) -> usize {
        if self.batch == 0 || self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.batch - 1) * self.batch_stride + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// `a · b` over the last two dims (leading dims a batch, equal on both sides), any strides:
/// candle's matmul with its backward (`∂a = ∂c · bᵀ`, `∂b = aᵀ · ∂c`), run as
/// `matrixmultiply` blocks shared over candle's worker pool. candle runs these products
/// (attention, LoRA pairs: small, many) on one thread, batch after batch.
struct Matmul;

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let err = |m: String| candle_core::Error::Msg(format!("matmul: {m}"));
        let (Some(a), Some(b)) = (Strided::of(l1), Strided::of(l2)) else {
            return Err(err("operands must be matrices with regular batch strides".into()));
        };
        if a.batch != b.batch || a.cols != b.rows || l1.dims()[..l1.dims().len() - 2] != l2.dims()[..l2.dims().len() - 2] {
            return Err(err(format!("{:?} by {:?}", l1.dims(), l2.dims())));
        }
        let (x, y) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
        if a.offset + a.span() > x.len() || b.offset + b.span() > y.len() {
            return Err(err("a view reaches past its storage".into()));
        }
        let (batch, m, k, n) = (a.batch, a.rows, a.cols, b.cols);
        if k == 0 {
            let mut dims = l1.dims().to_vec();
            let last = dims.len() - 1;
            dims[last] = n;
            return Ok((CpuStorage::F32(vec![0f32; batch * m * n]), Shape::from(dims)));
        }
        // Every cell is written by one task below (sgemm with β = 0 never reads C).
        let mut out = Vec::<f32>::with_capacity(batch * m * n);
        // Tasks: whole batch items when there are enough, else row or column blocks of each.
        let threads = candle_core::utils::get_num_threads().max(1);
        let pieces = (2 * threads).div_ceil(batch.max(1)).max(1);
        let by_rows = m >= n;
        let (len, step) = if by_rows { (m, m.div_ceil(pieces).max(8)) } else { (n, n.div_ceil(pieces).max(16)) };
        let per_batch = len.div_ceil(step.max(1)).max(1);
        let ptr = OutPtr(out.as_mut_ptr());
        crate::engine::pool::training_chunks(batch * per_batch, |tasks| {
            for t in tasks {
                let (bi, p) = (t / per_batch, t % per_batch);
                let (lo, hi) = (p * step, ((p + 1) * step).min(len));
                if lo >= hi {
                    continue;
                }
                let (rows, cols) = if by_rows { (hi - lo, n) } else { (m, hi - lo) };
                let a0 = a.offset + bi * a.batch_stride + if by_rows { lo * a.row_stride } else { 0 };
                let b0 = b.offset + bi * b.batch_stride + if by_rows { 0 } else { lo * b.col_stride };
                let c0 = bi * m * n + if by_rows { lo * n } else { lo };
                // SAFETY: the views were checked to lie inside their storages above; this task
                // reads rows/columns lo..hi of its batch item and writes only its own cells
                // (rows or columns lo..hi of item bi) of `out` (batch × m × n).
                unsafe {
                    matrixmultiply::sgemm(
                        rows,
                        k,
                        cols,
                        1.0,
                        x.as_ptr().add(a0),
                        a.row_stride as isize,
                        a.col_stride as isize,
                        y.as_ptr().add(b0),
                        b.row_stride as isize,
                        b.col_stride as isize,
                        0.0,
                        ptr.at(c0),
                        n as isize,
                        1,
                    );
                }
            }
        });
        // SAFETY: the tasks cover every (batch item, row or column block), k > 0, and sgemm
        // with β = 0 writes each cell of its block: all batch × m × n cells are set.
        unsafe { out.set_len(batch * m * n) };
        let mut dims = l1.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let da = regular(grad)?.apply_op2_no_bwd(&regular(&b.t()?)?, &Matmul)?;
        let db = regular(&a.t()?)?.apply_op2_no_bwd(&regular(grad)?, &Matmul)?;
        Ok((Some(da), Some(db)))
    }
}

/// `t` itself when [`Matmul`] can read its strides, else a contiguous copy.
fn regular(t: &Tensor) -> CResult<Tensor> {
    if Strided::of(t.layout()).is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// `a · b` (batched over leading dims), differentiable; see [`Matmul`].
pub fn matmul(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    regular(a)?.apply_op2(&regular(b)?, Matmul)
}

/// The MLP's gated activation, `act(gate) · up` (SiLU for Llama, tanh-GELU for Gemma),
/// with its backward pass in two plain passes: candle's `silu`/`gelu` and the product would
/// be about ten passes over the widest tensors of a step, forward and backward.
#[derive(Clone, Copy)]
struct GluMul {
    gelu: bool,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

impl GluMul {
    /// `act(g)` and `act'(g)`.
    #[inline]
    fn act(self, g: f32) -> (f32, f32) {
        if self.gelu {
            let inner = SQRT_2_OVER_PI * g * (1.0 + 0.044_715 * g * g);
            let t = inner.tanh();
            let dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * g * g);
            (0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * dinner)
        } else {
            let sig = 1.0 / (1.0 + (-g).exp());
            (g * sig, sig * (1.0 + g * (1.0 - sig)))
        }
    }
}

/// `out_j = σ(g_j) = 1 / (1 + exp(−g_j))`, the exponentials vectorized.
fn sigmoid_into(g: &[f32], out: &mut [f32]) {
    for (o, &g) in out.iter_mut().zip(g) {
        *o = -g;
    }
    exp_in_place(out);
    for o in out.iter_mut() {
        *o = 1.0 / (1.0 + *o);
    }
}

fn same_shape(a: &Layout, b: &Layout, op: &str) -> CResult<()> {
    if a.dims() != b.dims() {
        return Err(candle_core::Error::Msg(format!("{op}: shapes {:?} and {:?}", a.dims(), b.dims())));
    }
    Ok(())
}

impl CustomOp2 for GluMul {
    fn name(&self) -> &'static str {
        "glu-mul"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> CResult<(CpuStorage, Shape)> {
        same_shape(gl, ul, self.name())?;
        let (g, u) = (contiguous_f32(gs, gl, self.name())?, contiguous_f32(us, ul, self.name())?);
        let (_, w) = rows_of(gl.dims());
        let y = rows_by(g.len(), w, |i, y| {
            let (g, u) = (&g[i * w..(i + 1) * w], &u[i * w..(i + 1) * w]);
            if self.gelu {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = self.act(g).0 * u;
                }
            } else {
                // y holds σ(g) first (a vectorized exp), then the product.
                sigmoid_into(g, y);
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y *= g * u;
                }
            }
        });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (grad, g, u) = (grad.contiguous()?, g.contiguous()?, u.contiguous()?);
        let dg = grad.apply_op3_no_bwd(&g, &u, &GluMulGrad { glu: *self, wrt_gate: true })?;
        let du = grad.apply_op3_no_bwd(&g, &u, &GluMulGrad { glu: *self, wrt_gate: false })?;
        Ok((Some(dg), Some(du)))
    }
}

/// One operand's gradient of [`GluMul`], applied as (grad, gate, up): `∂gate = ∂y · up ·
/// act'(gate)`, `∂up = ∂y · act(gate)`.
struct GluMulGrad {
    glu: GluMul,
    wrt_gate: bool,
}

impl candle_core::CustomOp3 for GluMulGrad {
    fn name(&self) -> &'static str {
        "glu-mul-grad"
    }

    fn cpu_fwd(&self, ds: &CpuStorage, dl: &Layout, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> CResult<(CpuStorage, Shape)> {
        same_shape(dl, gl, self.name())?;
        same_shape(gl, ul, self.name())?;
        let (d, g, u) = (contiguous_f32(ds, dl, self.name())?, contiguous_f32(gs, gl, self.name())?, contiguous_f32(us, ul, self.name())?);
        let (_, w) = rows_of(gl.dims());
        let out = rows_by(g.len(), w, |i, o| {
            let r = i * w..(i + 1) * w;
            let (d, g, u) = (&d[r.clone()], &g[r.clone()], &u[r]);
            if self.glu.gelu {
                for (((o, &d), &g), &u) in o.iter_mut().zip(d).zip(g).zip(u) {
                    let (a, da) = self.glu.act(g);
                    *o = if self.wrt_gate { d * u * da } else { d * a };
                }
            } else {
                // o holds σ(g) first; silu = g·σ, silu' = σ·(1 + g·(1 − σ)).
                sigmoid_into(g, o);
                for (((o, &d), &g), &u) in o.iter_mut().zip(d).zip(g).zip(u) {
                    let sig = *o;
                    *o = if self.wrt_gate { d * u * sig * (1.0 + g * (1.0 - sig)) } else { d * g * sig };
                }
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `silu(gate) · up`, or `gelu_tanh(gate) · up` with `gelu`; differentiable in both.
pub fn glu_mul(gate: &Tensor, up: &Tensor, gelu: bool) -> CResult<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, GluMul { gelu })
}

/// A frozen projection for the training path, repacked for many rows at once
/// ([`kernels::panel`]): `W` for the forward product and `Wᵀ` for the input gradient.
#[derive(Debug)]
pub struct FrozenPanels {
    pub fwd: Panels,
    pub bwd: Panels,
}

impl FrozenPanels {
    /// Both products of a `[n, k]` weight: GGML blocks repacked exactly where the format
    /// allows, else from its dequantized values (`dense`, row-major). `None` when the shapes
    /// are not whole 32-value blocks both ways (such a weight stays on the f32 path).
    pub fn new(blocks: Option<(BlockType, &[u8])>, dense: &[f32], n: usize, k: usize) -> Option<Self> {
        if !n.is_multiple_of(QK) || !k.is_multiple_of(QK) || dense.len() != n * k {
            return None;
        }
        let fwd = blocks.and_then(|(t, b)| Panels::from_blocks(t, b, n, k)).unwrap_or_else(|| Panels::from_f32(dense, n, k));
        Some(Self { fwd, bwd: Panels::transposed_from_f32(dense, n, k) })
    }
}

/// `x` `[m, k]` times a panel matrix `[n, k]`: quantize the rows, multiply.
fn panel_product(x: &[f32], m: usize, w: &Panels) -> CResult<Vec<f32>> {
    let mut xq = QActs::default();
    xq.quantize_candle_pool(x, w.k());
    debug_assert_eq!(xq.rows, m);
    panel::matmul(&xq, w)
}

/// A product with a [`FrozenPanels`] weight: `x · Wᵀ` (forward), or `∂y · W` through `Wᵀ`'s
/// panels (`grad`, the forward's backward pass, which has none of its own).
struct FrozenQMatmul {
    w: std::sync::Arc<FrozenPanels>,
    grad: bool,
}

impl FrozenQMatmul {
    fn panels(&self) -> &Panels {
        if self.grad {
            &self.w.bwd
        } else {
            &self.w.fwd
        }
    }
}

impl CustomOp1 for FrozenQMatmul {
    fn name(&self) -> &'static str {
        if self.grad {
            "frozen-qmatmul-grad"
        } else {
            "frozen-qmatmul"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let w = self.panels();
        if k != w.k() {
            return Err(candle_core::Error::Msg(format!("{}: input width {k}, weight takes {}", self.name(), w.k())));
        }
        let x = contiguous_f32(s, l, self.name())?;
        Ok((CpuStorage::F32(panel_product(x, m, w)?), Shape::from((m, w.n()))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        if self.grad {
            return Err(candle_core::Error::Msg("frozen-qmatmul-grad: no backward pass".into()));
        }
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&FrozenQMatmul { w: self.w.clone(), grad: true })?))
    }
}

/// `x · Wᵀ` with `W` frozen and repacked ([`FrozenPanels`]): int8 products on the CPU's
/// VNNI units, forward and backward.
pub fn frozen_qmatmul(x: &Tensor, w: &std::sync::Arc<FrozenPanels>) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(FrozenQMatmul { w: w.clone(), grad: false })
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
        let y = rows_by(x.len(), h, |i, y| {
            let x = &x[i * h..(i + 1) * h];
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
        let dx = rows_by(x.len(), h, |i, dx| {
            let (x, g) = (&x[i * h..(i + 1) * h], &g[i * h..(i + 1) * h]);
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
        let dt = d * self.t;
        let y = rows_by(x.len(), dt, |i, y| {
            let x = &x[i * dt..(i + 1) * dt];
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
        let y = rows_by(x.len(), n, |r, y| {
            let x = &x[r * n..(r + 1) * n];
            let seen = (r % t + 1).min(n);
            let start = self.window.map_or(0, |w| seen.saturating_sub(w));
            let (y, x) = (&mut y[start..seen], &x[start..seen]);
            // exp((x − max)·scale) = exp(x·scale − max·scale), scale > 0.
            for (y, x) in y.iter_mut().zip(x) {
                *y = x * self.scale;
            }
            let (_, sum) = exp_shifted(y);
            let inv = 1.0 / sum;
            for y in y.iter_mut() {
                *y *= inv;
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
        let dx = rows_by(y.len(), n, |i, dx| {
            let (y, g) = (&y[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
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
        let loss = rows_by(rows, 1, |i, loss| {
            let (x, t) = (&x[i * v..(i + 1) * v], targets[i]);
            loss[0] = log_sum_exp(x) - x[t as usize];
        });
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.contiguous()?.apply_op3_no_bwd(&t.contiguous()?, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(dx), None))
    }
}

fn log_sum_exp(x: &[f32]) -> f32 {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        buf.extend_from_slice(x);
        let (max, sum) = exp_shifted(buf);
        max + sum.ln()
    })
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
        let dx = rows_by(x.len(), v,
            |i, dx| {
                let (x, t, g) = (&x[i * v..(i + 1) * v], targets[i], g[i]);
                // softmax(x)·g − g at the target: exp(x − max) / Σ exp(x − max) · g.
                dx.copy_from_slice(x);
                let (_, sum) = exp_shifted(dx);
                let k = g / sum;
                for dx in dx.iter_mut() {
                    *dx *= k;
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
            ("silu_mul", (Box::new(|x| super::glu_mul(x, &up, false)), Box::new(|x| candle_nn::ops::silu(x)? * &up))),
            ("gelu_mul", (Box::new(|x| super::glu_mul(x, &up, true)), Box::new(|x| x.gelu()? * &up))),
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

    /// The pooled matmul against candle's, forward and both gradients, on the shapes
    /// training gives it: batched attention products with a transposed operand, and 2-D
    /// LoRA products (tall, short and wide), each large enough to be split into pieces.
    #[test]
    fn pooled_matmul_matches_candles_with_gradients() -> R {
        let dev = Device::Cpu;
        // (a's shape, b's shape, transpose b's last two dims)
        let cases: [(&[usize], &[usize], bool); 6] = [
            (&[2, 3, 40, 8], &[2, 3, 24, 8], true),
            (&[2, 3, 40, 24], &[2, 3, 24, 8], false),
            (&[1, 3, 40, 8], &[1, 3, 24, 8], true),
            (&[3, 1, 40, 8], &[3, 1, 24, 8], true),
            (&[70, 33], &[33, 5], false),
            (&[9, 5], &[70, 5], true),
        ];
        for (sa, sb, tb) in cases {
            let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, sa, &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, sb, &dev)?)?;
            let bt = |b: &Tensor| -> candle_core::Result<Tensor> { if tb { b.t() } else { Ok(b.clone()) } };
            let ours = super::matmul(a.as_tensor(), &bt(b.as_tensor())?)?;
            let theirs = a.as_tensor().matmul(&bt(b.as_tensor())?)?;
            anyhow::ensure!(ours.dims() == theirs.dims(), "{sa:?}: shape {:?} vs {:?}", ours.dims(), theirs.dims());
            anyhow::ensure!(max_diff(&ours, &theirs)? < 1e-4, "{sa:?} x {sb:?}: forward differs");
            let u = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
            let go = (ours * &u)?.sum_all()?.backward()?;
            let gt = (theirs * &u)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let (Some(x), Some(y)) = (go.get(v.as_tensor()), gt.get(v.as_tensor())) else { anyhow::bail!("{sa:?}: a gradient is missing") };
                anyhow::ensure!(max_diff(x, y)? < 1e-4, "{sa:?} x {sb:?}: gradient differs by {}", max_diff(x, y)?);
            }
        }
        Ok(())
    }

    /// The int8 frozen product: forward within the activation rounding of the f32 product,
    /// and its input gradient likewise, for a Q4_1 weight (repacked exactly) and a dense one.
    #[test]
    fn frozen_int8_product_and_gradient_track_the_f32_ones() -> R {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (64, 96), &dev)?;
        let q = candle_core::quantized::QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q4_1)?;
        let wq = q.dequantize(&dev)?;
        let values = wq.flatten_all()?.to_vec1::<f32>()?;
        let data = q.data()?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 96), &dev)?)?;
        for blocks in [Some((super::BlockType::Q4_1, &*data)), None] {
            let Some(p) = super::FrozenPanels::new(blocks, &values, 64, 96) else { anyhow::bail!("no panels") };
            let p = std::sync::Arc::new(p);
            let ours = super::frozen_qmatmul(x.as_tensor(), &p)?;
            let exact = x.as_tensor().matmul(&wq.t()?)?;
            let scale = exact.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let d = max_diff(&ours, &exact)?;
            anyhow::ensure!(d < 0.02 * scale, "forward differs by {d} (largest value {scale})");
            let u = Tensor::randn(0f32, 1.0, ours.shape(), &dev)?;
            let go = (ours * &u)?.sum_all()?.backward()?;
            let gt = (exact * &u)?.sum_all()?.backward()?;
            let (Some(a), Some(b)) = (go.get(x.as_tensor()), gt.get(x.as_tensor())) else { anyhow::bail!("no gradient") };
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let d = max_diff(a, b)?;
            anyhow::ensure!(d < 0.02 * scale, "gradient differs by {d} (largest value {scale})");
        }
        Ok(())
    }
}
