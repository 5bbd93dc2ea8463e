//! The serving forward pass over a ragged batch, on plain buffers.
//!
//! Training needs candle's tensors for autograd (`Model::forward_train`); serving does not,
//! and at a 135M model's sizes the per-op cost of a tensor graph (an allocation and a
//! dispatch per op, a few hundred ops per token) is a large part of a decode step. So the
//! serving pass runs the same arithmetic as a fixed sequence of kernels (`kernels/`) on
//! buffers sized once per step: fused q/k/v and gate/up products over quantized weights
//! read in place, RMSNorm/RoPE/SiLU loops, attention straight over the sequence's
//! [`KvCache`] rows, and LoRA deltas per adapter group (`lora::apply`'s `LoraRegion`: planned
//! before the base product so that its pairs are prefetched meanwhile). Work is split over the engine's
//! [`pool`](super::pool) region by region (a matmul's output rows, attention heads, LoRA
//! groups).
//!
//! Agreement with the training path and the f32 reference is tested in `engine/tests.rs`
//! and `training/tests.rs` (dense weights: 1e-3; quantized weights additionally round the
//! activations to 8-bit blocks, as llama.cpp does).

use std::borrow::Cow;
use std::cell::RefCell;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Device, Storage, StorageRef, Tensor};

use super::kernels::{self, BlockType, MatmulPart, OutPtr, QActs, WeightRef};
use super::lora::{BatchLora, Proj};
use super::kv_cache::KvRows;
use super::model::{Linear, Model, SeqBatch};
use super::pool::{self, Pool};
use super::{EngineError, Result};

/// Prefill attention switches from per-query loops to blocked products from this many
/// query rows on.
const GEMM_ATTENTION_ROWS: usize = 8;

/// A contiguous f32 CPU tensor's values, borrowed for the length of a step.
pub(crate) struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> F32View<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(EngineError::Internal("kernel input is not contiguous".into()));
        };
        if t.dtype() != candle_core::DType::F32 || !matches!(&*guard, Storage::Cpu(_)) {
            return Err(EngineError::Internal(format!("kernel input is {:?} on {:?}", t.dtype(), t.device())));
        }
        Ok(Self { guard, start, len: end - start })
    }

    pub(crate) fn slice(&self) -> Result<&[f32]> {
        match &*self.guard {
            Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[self.start..self.start + self.len]),
            _ => Err(EngineError::Internal("kernel input left the CPU".into())),
        }
    }
}

/// The kernels' name for a GGML block type they read in place (`None`: the loader must
/// convert it).
pub(crate) fn block_type(d: GgmlDType) -> Option<BlockType> {
    Some(match d {
        GgmlDType::Q8_0 => BlockType::Q8_0,
        GgmlDType::Q4_1 => BlockType::Q4_1,
        GgmlDType::Q4_0 => BlockType::Q4_0,
        GgmlDType::Q5_0 => BlockType::Q5_0,
        GgmlDType::Q5_1 => BlockType::Q5_1,
        GgmlDType::Q4K => BlockType::Q4K,
        GgmlDType::Q5K => BlockType::Q5K,
        GgmlDType::Q6K => BlockType::Q6K,
        _ => return None,
    })
}

/// A projection weight held for a step.
enum ProjWeight<'a> {
    Blocks(BlockType, Cow<'a, [u8]>),
    Dense(F32View<'a>),
}

impl<'a> ProjWeight<'a> {
    fn new(l: &'a Linear) -> Result<Self> {
        match &l.weight {
            QMatMul::Tensor(t) => Ok(ProjWeight::Dense(F32View::new(t)?)),
            QMatMul::QTensor(q) => match block_type(q.dtype()) {
                Some(t) => Ok(ProjWeight::Blocks(t, q.data()?)),
                None => Err(EngineError::Internal(format!("{:?} weights reach the serving kernels (the loader converts them)", q.dtype()))),
            },
            QMatMul::TensorF16(_) => Err(EngineError::Internal("f16 weights reach the serving kernels".into())),
        }
    }

    fn weight(&self) -> Result<WeightRef<'_>> {
        Ok(match self {
            ProjWeight::Blocks(t, b) => WeightRef::Blocks(*t, b),
            ProjWeight::Dense(v) => WeightRef::F32(v.slice()?),
        })
    }

    fn is_quantized(&self) -> bool {
        matches!(self, ProjWeight::Blocks(..))
    }
}

/// Step buffers, reused from step to step on the engine thread.
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    xq: QActs,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
    /// Attention scores of one head (per worker thread).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One head's f16 cached keys and values widened for the prefill products.
    static WIDE: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

pub(super) fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.clear();
    v.resize(n, 0.0);
    v
}

/// `n` values of room whose old contents the caller overwrites (no zeroing).
pub(super) fn room(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// `x += norm(y)` (Gemma 3's norms of a block's output) or `x += y`; `scratch` is reused.
fn add_normed(norm: &Option<crate::engine::model::RmsNorm>, y: &[f32], scratch: &mut Vec<f32>, x: &mut [f32]) -> Result<()> {
    match norm {
        Some(norm) => {
            let w = F32View::new(&norm.weight)?;
            let normed = sized(scratch, y.len());
            kernels::rms_norm(y, w.slice()?, norm.eps, normed);
            kernels::axpy(1.0, normed, x);
        }
        None => kernels::axpy(1.0, y, x),
    }
    Ok(())
}

/// What a forward pass returns.
#[derive(Clone, Copy)]
enum Output {
    /// The logits of each sequence's last new row (serving).
    LastLogits,
    /// The logits of every row of the one sequence from this row on (teacher-forced scoring).
    TailLogits(usize),
    /// Each sequence's pooled, normalised hidden state (embeddings).
    MeanHidden,
}

/// One sequence of the batch as the kernels see it.
#[derive(Clone, Copy)]
struct Span {
    /// First row in the batch.
    row: usize,
    /// New tokens.
    len: usize,
    /// Position of the first new token (tokens already cached).
    pos: usize,
}

impl Model {
    /// Runs one ragged batch and returns the logits `[sequences, vocab]` of each
    /// sequence's last new token. Each cache advances by its sequence's token count.
    pub fn forward(&self, seqs: &mut [SeqBatch<'_>], lora: &BatchLora) -> Result<Tensor> {
        let logits = BUFFERS.with(|b| {
            let mut b = b.try_borrow_mut().map_err(|_| EngineError::Internal("forward pass re-entered".into()))?;
            self.forward_rows(seqs, lora, Output::LastLogits, &mut b)
        })?;
        let n = seqs.len();
        Ok(Tensor::from_vec(logits, (n, self.shape.vocab_size), &Device::Cpu)?)
    }

    /// Runs one sequence's new tokens and returns the logits of each of them from the
    /// `from`-th on (`[tokens - from, vocab]` flattened): teacher-forced scoring of an answer
    /// after its prompt on the serving path.
    pub fn forward_tail(&self, seq: SeqBatch<'_>, lora: &BatchLora, from: usize) -> Result<Vec<f32>> {
        if from >= seq.tokens.len() {
            return Err(EngineError::Internal("no rows asked of forward_tail".into()));
        }
        BUFFERS.with(|b| {
            let mut b = b.try_borrow_mut().map_err(|_| EngineError::Internal("forward pass re-entered".into()))?;
            self.forward_rows(&mut [seq], lora, Output::TailLogits(from), &mut b)
        })
    }

    /// Runs each sequence's tokens and returns its embedding: the mean over its rows of the
    /// final-normed hidden states, scaled to unit length (`[sequences, hidden]` flattened).
    /// Each sequence must start at position 0 (a fresh cache).
    pub fn embed(&self, seqs: &mut [SeqBatch<'_>], lora: &BatchLora) -> Result<Vec<f32>> {
        if seqs.iter().any(|q| !q.cache.is_empty()) {
            return Err(EngineError::Internal("an embedding starts from an empty cache".into()));
        }
        BUFFERS.with(|b| {
            let mut b = b.try_borrow_mut().map_err(|_| EngineError::Internal("forward pass re-entered".into()))?;
            self.forward_rows(seqs, lora, Output::MeanHidden, &mut b)
        })
    }

    /// What the pass returns (see [`Output`]).
    fn forward_rows(&self, seqs: &mut [SeqBatch<'_>], lora: &BatchLora, out: Output, b: &mut Buffers) -> Result<Vec<f32>> {
        let s = &self.shape;
        let (hidden, hd) = (s.hidden_size, s.head_dim);
        let (q_dim, kv_dim, inter) = (s.num_heads * hd, s.num_kv_heads * hd, s.intermediate_size);
        if seqs.is_empty() || seqs.iter().any(|q| q.tokens.is_empty()) {
            return Err(EngineError::Internal("empty sequence in batch".into()));
        }
        let mut spans = Vec::with_capacity(seqs.len());
        let windows: Vec<Option<usize>> = (0..s.num_layers).map(|li| self.cfg.layer_window(li)).collect();
        let mut row = 0;
        for q in seqs.iter_mut() {
            let pos = q.cache.len();
            if pos + q.tokens.len() > self.max_positions() {
                return Err(EngineError::Internal(format!(
                    "position {} beyond the RoPE table ({})",
                    pos + q.tokens.len(),
                    self.max_positions()
                )));
            }
            q.cache.prepare(&windows, kv_dim, pos + q.tokens.len(), self.kv_type);
            spans.push(Span { row, len: q.tokens.len(), pos });
            row += q.tokens.len();
        }
        let m = row;
        let ids: Vec<u32> = seqs.iter().flat_map(|q| q.tokens.iter().copied()).collect();
        b.x = self.embed_tokens_rows(&ids)?;
        let embed_scale = self.cfg.embed_scale();
        if embed_scale != 1.0 {
            b.x.iter_mut().for_each(|v| *v *= embed_scale);
        }
        let gate = if self.cfg.is_gemma() { kernels::Gate::GeluTanh } else { kernels::Gate::Silu };
        let pool = pool::global();
        let qkv_w = q_dim + 2 * kv_dim;
        for (li, layer) in self.layers.iter().enumerate() {
            let att = &layer.self_attn;
            let ln1 = F32View::new(&layer.input_layernorm.weight)?;
            kernels::rms_norm(&b.x, ln1.slice()?, layer.input_layernorm.eps, sized(&mut b.h, m * hidden));
            let (wq, wk, wv) = (ProjWeight::new(&att.q_proj)?, ProjWeight::new(&att.k_proj)?, ProjWeight::new(&att.v_proj)?);
            if wq.is_quantized() || wk.is_quantized() || wv.is_quantized() {
                b.xq.quantize_par(pool, &b.h, hidden);
            }
            let parts = [
                MatmulPart { weight: wq.weight()?, n: q_dim, col: 0 },
                MatmulPart { weight: wk.weight()?, n: kv_dim, col: q_dim },
                MatmulPart { weight: wv.weight()?, n: kv_dim, col: q_dim + kv_dim },
            ];
            let qkv = sized(&mut b.qkv, m * qkv_w);
            let lr = lora.region(pool.threads(), li, &[(Proj::Q, 0), (Proj::K, q_dim), (Proj::V, q_dim + kv_dim)], hidden)?;
            kernels::matmul(pool, &b.h, &b.xq, hidden, &parts, qkv, qkv_w, &lr.prefetch());
            for (lin, col, n) in [(&att.q_proj, 0, q_dim), (&att.k_proj, q_dim, kv_dim), (&att.v_proj, q_dim + kv_dim, kv_dim)] {
                if let Some(bias) = &lin.bias {
                    let bias = F32View::new(bias)?;
                    let bias = bias.slice()?;
                    for r in qkv.chunks_exact_mut(qkv_w) {
                        kernels::axpy(1.0, bias, &mut r[col..col + n]);
                    }
                }
            }
            lr.apply(pool, &b.h, qkv, qkv_w)?;
            // Per-head q/k norms where the model has them (Gemma 3), before RoPE.
            let qk_norms = [(&layer.q_norm, 0, q_dim), (&layer.k_norm, q_dim, kv_dim)];
            for (norm, col, n) in qk_norms {
                if let Some(norm) = norm {
                    let w = F32View::new(&norm.weight)?;
                    let w = w.slice()?;
                    for r in qkv.chunks_exact_mut(qkv_w) {
                        b.act.clear();
                        b.act.extend_from_slice(&r[col..col + n]);
                        kernels::rms_norm(&b.act, w, norm.eps, &mut r[col..col + n]);
                    }
                }
            }
            // RoPE on q and k, then k and v into the caches.
            for (sp, q) in spans.iter().zip(seqs.iter_mut()) {
                for i in 0..sp.len {
                    let r = &mut qkv[(sp.row + i) * qkv_w..(sp.row + i + 1) * qkv_w];
                    let (cos, sin) = self.rope_rows(li, sp.pos + i);
                    let (qp, rest) = r.split_at_mut(q_dim);
                    kernels::rope(qp, hd, cos, sin, self.rope_interleaved());
                    kernels::rope(&mut rest[..kv_dim], hd, cos, sin, self.rope_interleaved());
                    q.cache.push(li, &rest[..kv_dim], &rest[kv_dim..2 * kv_dim]);
                }
            }
            let attn = sized(&mut b.attn, m * q_dim);
            self.attention_rows(pool, li, &spans, seqs, qkv, qkv_w, attn)?;
            let wo = ProjWeight::new(&att.o_proj)?;
            if wo.is_quantized() {
                b.xq.quantize_par(pool, attn, q_dim);
            }
            let proj = sized(&mut b.proj, m * hidden);
            let lr = lora.region(pool.threads(), li, &[(Proj::O, 0)], q_dim)?;
            kernels::matmul(pool, attn, &b.xq, q_dim, &[MatmulPart { weight: wo.weight()?, n: hidden, col: 0 }], proj, hidden, &lr.prefetch());
            lr.apply(pool, attn, proj, hidden)?;
            add_normed(&layer.attn_out_norm, proj, &mut b.h, &mut b.x)?;

            let mlp = &layer.mlp;
            let ln2 = F32View::new(&layer.post_attention_layernorm.weight)?;
            kernels::rms_norm(&b.x, ln2.slice()?, layer.post_attention_layernorm.eps, sized(&mut b.h, m * hidden));
            let (wg, wu) = (ProjWeight::new(&mlp.gate_proj)?, ProjWeight::new(&mlp.up_proj)?);
            if wg.is_quantized() || wu.is_quantized() {
                b.xq.quantize_par(pool, &b.h, hidden);
            }
            let gu = sized(&mut b.gu, m * 2 * inter);
            let parts = [
                MatmulPart { weight: wg.weight()?, n: inter, col: 0 },
                MatmulPart { weight: wu.weight()?, n: inter, col: inter },
            ];
            let lr = lora.region(pool.threads(), li, &[(Proj::Gate, 0), (Proj::Up, inter)], hidden)?;
            kernels::matmul(pool, &b.h, &b.xq, hidden, &parts, gu, 2 * inter, &lr.prefetch());
            lr.apply(pool, &b.h, gu, 2 * inter)?;
            let act = sized(&mut b.act, m * inter);
            kernels::gate_mul_par(pool, gate, gu, inter, act);
            let wd = ProjWeight::new(&mlp.down_proj)?;
            if wd.is_quantized() {
                b.xq.quantize_par(pool, act, inter);
            }
            let proj = sized(&mut b.proj, m * hidden);
            let lr = lora.region(pool.threads(), li, &[(Proj::Down, 0)], inter)?;
            kernels::matmul(pool, act, &b.xq, inter, &[MatmulPart { weight: wd.weight()?, n: hidden, col: 0 }], proj, hidden, &lr.prefetch());
            lr.apply(pool, act, proj, hidden)?;
            add_normed(&layer.mlp_out_norm, proj, &mut b.h, &mut b.x)?;
        }
        for (sp, q) in spans.iter().zip(seqs.iter_mut()) {
            q.cache.commit(sp.len);
        }
        // Final norm and the output head on each sequence's last row (or the asked tail).
        let rows: Vec<usize> = match out {
            Output::TailLogits(from) => (from..m).collect(),
            Output::LastLogits => spans.iter().map(|sp| sp.row + sp.len - 1).collect(),
            Output::MeanHidden => return self.mean_hidden(&spans, b),
        };
        let n = rows.len();
        let last = sized(&mut b.proj, n * hidden);
        for (i, &r) in rows.iter().enumerate() {
            last[i * hidden..(i + 1) * hidden].copy_from_slice(&b.x[r * hidden..(r + 1) * hidden]);
        }
        let lnf = F32View::new(&self.norm.weight)?;
        kernels::rms_norm(last, lnf.slice()?, self.norm.eps, sized(&mut b.h, n * hidden));
        let head = ProjWeight::new(&self.lm_head)?;
        if head.is_quantized() {
            b.xq.quantize_par(pool, &b.h, hidden);
        }
        let vocab = s.vocab_size;
        let mut logits = vec![0f32; n * vocab];
        let none = kernels::Prefetch::default();
        kernels::matmul(pool, &b.h, &b.xq, hidden, &[MatmulPart { weight: head.weight()?, n: vocab, col: 0 }], &mut logits, vocab, &none);
        if let Some(bias) = &self.lm_head.bias {
            let bias = F32View::new(bias)?;
            let bias = bias.slice()?;
            for r in logits.chunks_exact_mut(vocab) {
                kernels::axpy(1.0, bias, r);
            }
        }
        Ok(logits)
    }

    /// Each span's final-normed hidden rows, averaged and scaled to unit length.
    fn mean_hidden(&self, spans: &[Span], b: &mut Buffers) -> Result<Vec<f32>> {
        let hidden = self.shape.hidden_size;
        let m = b.x.len() / hidden;
        let lnf = F32View::new(&self.norm.weight)?;
        kernels::rms_norm(&b.x, lnf.slice()?, self.norm.eps, sized(&mut b.h, m * hidden));
        let mut out = vec![0f32; spans.len() * hidden];
        for (sp, o) in spans.iter().zip(out.chunks_exact_mut(hidden)) {
            for r in sp.row..sp.row + sp.len {
                kernels::axpy(1.0, &b.h[r * hidden..(r + 1) * hidden], o);
            }
            // The mean's direction is the sum's: scale the sum to unit length directly.
            let norm = o.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 && norm.is_finite() {
                o.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Ok(out)
    }

    /// Embedding rows of `ids`, `[ids, hidden]` flattened.
    fn embed_tokens_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
        let e = self.embed_tokens.forward(&t)?;
        Ok(e.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A decode step's attention (one new row per sequence), split so that every cached row is
    /// read once and the threads share the work even for one sequence: a task is one
    /// sequence's kv head (all the query heads that share it) over one range of its cached
    /// positions; long contexts are cut into ranges whose partial softmax sums are combined
    /// afterwards (flash-decoding). Writes `attn` rows `[sequences, heads * head_dim]`.
    #[expect(clippy::too_many_arguments, reason = "one argument per operand of the region")]
    fn decode_attention(
        &self,
        pool: &Pool,
        spans: &[Span],
        caches: &[(KvRows<'_>, KvRows<'_>, usize)],
        qkv: &[f32],
        qkv_w: usize,
        window: Option<usize>,
        attn: &mut [f32],
    ) {
        /// Fewest cached positions worth a task of their own.
        const MIN_RANGE: usize = 256;
        let s = &self.shape;
        let (nh, hd, kv_heads) = (s.num_heads, s.head_dim, s.num_kv_heads);
        let group = nh / kv_heads;
        let (kv_dim, q_dim) = (kv_heads * hd, nh * hd);
        let scale = self.cfg.attn_scale();
        let threads = pool.threads();
        let want = (2 * threads).div_ceil(spans.len() * kv_heads);
        // (sequence, kv head, positions); units of `parts` consecutive tasks per (sequence, kv head).
        let mut tasks: Vec<(usize, usize, std::ops::Range<usize>)> = Vec::new();
        let mut units: Vec<(usize, usize, usize, usize)> = Vec::new();
        for (si, sp) in spans.iter().enumerate() {
            // Rows, not positions: the cache's rows start at position `first`.
            let (visible, first) = (sp.pos + 1, caches[si].2);
            let start = window.map_or(0, |w| visible.saturating_sub(w)) - first;
            let n = visible - first - start;
            let parts = want.min(n.div_ceil(MIN_RANGE)).max(1);
            for kvh in 0..kv_heads {
                units.push((si, kvh, tasks.len(), parts));
                for p in 0..parts {
                    tasks.push((si, kvh, start + n * p / parts..start + n * (p + 1) / parts));
                }
            }
        }
        let per_task = group * hd;
        let mut acc = vec![0f32; tasks.len() * per_task];
        let mut stats = vec![0f32; tasks.len() * group * 2];
        let (accp, statp) = (OutPtr(acc.as_mut_ptr()), OutPtr(stats.as_mut_ptr()));
        let work = |tid: usize| {
            SCORES.with(|sc| {
                let mut sc = sc.borrow_mut();
                for t in (tid..tasks.len()).step_by(threads) {
                    let (si, kvh, ref range) = tasks[t];
                    let q0 = spans[si].row * qkv_w + kvh * group * hd;
                    let q = &qkv[q0..q0 + per_task];
                    // SAFETY: task `t`'s slots of `acc` and `stats`: written by this task alone.
                    let (a, st) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(accp.at(t * per_task), per_task),
                            std::slice::from_raw_parts_mut(statp.at(t * group * 2), group * 2),
                        )
                    };
                    match caches[si] {
                        (KvRows::F32(k), KvRows::F32(v), _) => {
                            kernels::attend_group_part(q, group, hd, k, v, kv_dim, kvh * hd, range.clone(), scale, &mut sc, a, st)
                        }
                        (KvRows::F16(k), KvRows::F16(v), _) => {
                            kernels::attend_group_part(q, group, hd, k, v, kv_dim, kvh * hd, range.clone(), scale, &mut sc, a, st)
                        }
                        _ => unreachable!("a cache's keys and values share one type"),
                    }
                }
            })
        };
        pool.run(&work);
        let mut head_acc = Vec::new();
        let mut head_stats = Vec::new();
        for &(si, kvh, first, parts) in &units {
            for g in 0..group {
                head_acc.clear();
                head_stats.clear();
                for t in first..first + parts {
                    head_acc.extend_from_slice(&acc[t * per_task + g * hd..t * per_task + (g + 1) * hd]);
                    head_stats.extend_from_slice(&stats[t * group * 2 + 2 * g..t * group * 2 + 2 * g + 2]);
                }
                kernels::combine_parts(&mut head_acc, &head_stats, hd, parts);
                let o = spans[si].row * q_dim + (kvh * group + g) * hd;
                attn[o..o + hd].copy_from_slice(&head_acc[..hd]);
            }
        }
    }

    /// Causal attention of every sequence's new rows over its cache, heads split over the
    /// pool. Writes `attn` rows `[m, heads * head_dim]`.
    #[expect(clippy::too_many_arguments, reason = "one argument per operand of the region")]
    fn attention_rows(
        &self,
        pool: &Pool,
        li: usize,
        spans: &[Span],
        seqs: &[SeqBatch<'_>],
        qkv: &[f32],
        qkv_w: usize,
        attn: &mut [f32],
    ) -> Result<()> {
        let s = &self.shape;
        let (nh, hd) = (s.num_heads, s.head_dim);
        let group = nh / s.num_kv_heads;
        let kv_dim = s.num_kv_heads * hd;
        let q_dim = nh * hd;
        let scale = self.cfg.attn_scale();
        // A local layer's query sees the last `window` positions, itself included.
        let window = self.cfg.layer_window(li);
        let first_visible = |visible: usize| window.map_or(0, |w| visible.saturating_sub(w));
        let caches: Vec<(KvRows<'_>, KvRows<'_>, usize)> = seqs
            .iter()
            .map(|q| {
                let (k, v) = q.cache.layer(li);
                (k, v, q.cache.first(li))
            })
            .collect();
        if spans.iter().all(|sp| sp.len == 1) {
            self.decode_attention(pool, spans, &caches, qkv, qkv_w, window, attn);
            return Ok(());
        }
        let out = OutPtr(attn.as_mut_ptr());
        let threads = pool.threads();
        // A task is one sequence and `per` query heads. Decode rows of many sequences take a
        // whole kv group per task (each cached key and value is read once for the query heads
        // that share it); otherwise one head per task, so that few sequences still fill the
        // threads.
        let grouped = spans.iter().all(|sp| sp.len < GEMM_ATTENTION_ROWS) && spans.len() * s.num_kv_heads >= 2 * threads;
        let per = if grouped { group } else { 1 };
        let per_seq = nh / per;
        let tasks = spans.len() * per_seq;
        let work = |tid: usize| {
            SCORES.with(|sc| {
                let mut sc = sc.borrow_mut();
                for task in (tid..tasks).step_by(threads) {
                    let (si, h) = (task / per_seq, (task % per_seq) * per);
                    let sp = spans[si];
                    // Cached rows start at position `first` (a window layer drops older ones).
                    let (kc, vc, first) = caches[si];
                    let kvh = h / group;
                    if sp.len >= GEMM_ATTENTION_ROWS {
                        // Prefill (`per` is 1 here): blocked products over the whole cache.
                        let total = sp.pos + sp.len - first;
                        let mut wide = WIDE.with(|w| w.take());
                        // This head's keys and values as f32 rows (`row` apart), f16 widened.
                        let (kh, vh, row): (*const f32, *const f32, usize) = match (kc, vc) {
                            (KvRows::F32(k), KvRows::F32(v)) => (k[kvh * hd..].as_ptr(), v[kvh * hd..].as_ptr(), kv_dim),
                            (KvRows::F16(k), KvRows::F16(v)) => {
                                let (kw, vw) = (sized(&mut wide.0, total * hd), sized(&mut wide.1, total * hd));
                                for j in 0..total {
                                    let at = j * kv_dim + kvh * hd;
                                    kernels::KvElem::widen(&k[at..at + hd], &mut kw[j * hd..(j + 1) * hd]);
                                    kernels::KvElem::widen(&v[at..at + hd], &mut vw[j * hd..(j + 1) * hd]);
                                }
                                (wide.0.as_ptr(), wide.1.as_ptr(), hd)
                            }
                            _ => unreachable!("a cache's keys and values share one type"),
                        };
                        let scores = sized(&mut sc, sp.len * total);
                        // SAFETY: strided views inside `qkv`, the caches and `scores`; the
                        // output block (this head's columns of this sequence's rows) is
                        // written by this task alone.
                        unsafe {
                            matrixmultiply::sgemm(
                                sp.len,
                                hd,
                                total,
                                scale,
                                qkv.as_ptr().add(sp.row * qkv_w + h * hd),
                                qkv_w as isize,
                                1,
                                kh,
                                1,
                                row as isize,
                                0.0,
                                scores.as_mut_ptr(),
                                total as isize,
                                1,
                            );
                        }
                        for (i, row) in scores.chunks_exact_mut(total).enumerate() {
                            let visible = sp.pos + i + 1;
                            let (start, visible) = (first_visible(visible) - first, visible - first);
                            kernels::softmax(&mut row[start..visible]);
                            row[..start].fill(0.0);
                            row[visible..].fill(0.0);
                        }
                        // SAFETY: `scores` holds `sp.len × total` values; `vc` holds `total`
                        // cached rows of `kv_dim` from this head's offset; the output block
                        // (this head's columns of this sequence's rows of `out`) is written
                        // by this task alone.
                        unsafe {
                            matrixmultiply::sgemm(
                                sp.len,
                                total,
                                hd,
                                1.0,
                                scores.as_ptr(),
                                total as isize,
                                1,
                                vh,
                                row as isize,
                                1,
                                0.0,
                                out.at(sp.row * q_dim + h * hd),
                                q_dim as isize,
                                1,
                            );
                        }
                        WIDE.with(|w| w.replace(wide));
                        continue;
                    }
                    for i in 0..sp.len {
                        let row = sp.row + i;
                        let q0 = row * qkv_w + h * hd;
                        // SAFETY: this task's heads of this row of `attn`: written by it alone.
                        let o = unsafe { std::slice::from_raw_parts_mut(out.at(row * q_dim + h * hd), per * hd) };
                        let (q, visible) = (&qkv[q0..q0 + per * hd], sp.pos + i + 1);
                        // The visible rows from the window's start (rows are positions).
                        let (from, n) = ((first_visible(visible) - first) * kv_dim, visible - first_visible(visible));
                        match (kc, vc) {
                            (KvRows::F32(k), KvRows::F32(v)) => kernels::attend_group(q, per, hd, &k[from..], &v[from..], kv_dim, kvh * hd, n, scale, &mut sc, o),
                            (KvRows::F16(k), KvRows::F16(v)) => kernels::attend_group(q, per, hd, &k[from..], &v[from..], kv_dim, kvh * hd, n, scale, &mut sc, o),
                            _ => unreachable!("a cache's keys and values share one type"),
                        }
                    }
                }
            })
        };
        pool.run(&work);
        Ok(())
    }
}
