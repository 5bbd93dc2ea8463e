//! The training forward: whole sequences from position 0, no cache, differentiable candle
//! ops only (our fused kernels with hand-written backward passes in `grad_ops.rs`). Only
//! training calls into this file; serving runs `forward.rs`. Tests check the two agree.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};

use super::{Attention, DecoderLayer, Embedding, Linear, Mlp, Model, RmsNorm};
use crate::engine::grad_ops::{self, FrozenPanels};
use crate::engine::lora::{BatchLora, Proj};
use crate::engine::{EngineError, Result};

impl Linear {
    /// Training forward: repacked weights ([`FrozenPanels`]) go through
    /// [`grad_ops::frozen_qmatmul`], a dense weight through [`grad_ops::frozen_matmul`];
    /// neither backward pass forms a gradient for the (frozen) weight.
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.frozen, &self.weight) {
            (Some(p), _) => grad_ops::frozen_qmatmul(x, p)?,
            (None, QMatMul::Tensor(w)) => grad_ops::frozen_matmul(x, w)?,
            _ => self.weight.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

impl RmsNorm {
    /// Training forward, through our differentiable fused kernel (serving normalises in
    /// `forward.rs`; tests check the two paths agree and the gradients are right).
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        Ok(grad_ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// `norm(y)` where the model normalises a block's output (Gemma 3), else `y`.
fn normed(norm: &Option<RmsNorm>, y: Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward_train(&y),
        None => Ok(y),
    }
}

/// `l` with its weight as dense f32.
fn dense(l: &Linear) -> Result<Linear> {
    Ok(Linear { weight: QMatMul::Tensor(l.dequantize()?), bias: l.bias.clone(), frozen: None })
}

/// `l` with [`FrozenPanels`] for a quantized weight whose shape allows them; a dense weight
/// stays as it is (the f32 path).
fn frozen(l: &Linear) -> Result<Linear> {
    let QMatMul::QTensor(q) = &l.weight else {
        return Ok(Linear { weight: l.weight.clone(), bias: l.bias.clone(), frozen: None });
    };
    let (n, k) = q.shape().dims2()?;
    let values = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let data = q.data()?;
    let blocks = crate::engine::forward::block_type(q.dtype()).map(|t| (t, &*data));
    match FrozenPanels::new(blocks, &values, n, k) {
        Some(p) => Ok(Linear { weight: l.weight.clone(), bias: l.bias.clone(), frozen: Some(std::sync::Arc::new(p)) }),
        None => dense(l),
    }
}

impl Model {
    /// Training forward: whole sequences from position 0, no cache, differentiable ops
    /// only. Returns the logits of the positions in `rows` (indices into the concatenated
    /// sequences; all positions when `None`), `[rows, vocab]`. The base weights must be
    /// dense (see [`Model::to_dense`]).
    pub fn forward_train(&self, seqs: &[&[u32]], lora: &BatchLora, rows: Option<&Tensor>) -> Result<Tensor> {
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let mut x = self.hidden_states(&ids, &lens, lora)?;
        if let Some(r) = rows {
            x = x.index_select(r, 0)?;
        }
        let x = self.norm.forward_train(&x)?;
        self.lm_head.forward_train(&x)
    }

    /// Embedding and decoder layers over whole sequences (training); `[tokens, hidden]`.
    fn hidden_states(&self, ids: &[u32], lens: &[usize], lora: &BatchLora) -> Result<Tensor> {
        if lens.is_empty() || lens.contains(&0) {
            return Err(EngineError::Internal("empty sequence in batch".into()));
        }
        let ids = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        let embed_scale = self.cfg.embed_scale();
        if embed_scale != 1.0 {
            x = x.affine(f64::from(embed_scale), 0.0)?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward_train(&x)?;
            let attn = self.attention(li, layer, &h, lens, lora)?;
            x = (x + normed(&layer.attn_out_norm, attn)?)?;
            let h = layer.post_attention_layernorm.forward_train(&x)?;
            let mlp = self.mlp(li, layer, &h, lora)?;
            x = (x + normed(&layer.mlp_out_norm, mlp)?)?;
        }
        Ok(x)
    }

    /// A copy whose projections and embedding are dense f32 (quantized blocks have no
    /// backward pass). The weights themselves are unchanged: serving and training see
    /// the same values. The reference training path; jobs run [`Model::for_training`].
    pub fn to_dense(&self) -> Result<Model> {
        let embed = self.embed_tokens.dequantize()?;
        // A tied head shares the embedding's f32 copy (candle tensors are shared storage)
        // rather than holding a second one of vocabulary × hidden floats.
        let lm_head = if self.tied_head() { Linear { weight: QMatMul::Tensor(embed.clone()), bias: None, frozen: None } } else { dense(&self.lm_head)? };
        self.with_projections(&dense, Embedding::Dense(embed), lm_head)
    }

    /// The model as a training job runs it. On a CPU with AVX-512 VNNI each quantized
    /// projection, the LM head included, keeps its blocks and gains [`FrozenPanels`]: its
    /// forward product and input gradient run as int8 products (`kernels::panel`), several
    /// times faster than f32 ones, and no f32 copy of the model is made. Dense weights, and
    /// every weight on other CPUs, take [`Model::to_dense`]'s f32 path.
    pub fn for_training(&self) -> Result<Model> {
        if !crate::engine::kernels::panel::fast() {
            return self.to_dense();
        }
        let lm_head = frozen(&self.lm_head)?;
        self.with_projections(&frozen, self.embed_tokens.clone(), lm_head)
    }

    fn tied_head(&self) -> bool {
        match (&self.embed_tokens, &self.lm_head.weight) {
            (Embedding::Quantized(e), QMatMul::QTensor(h)) => std::sync::Arc::ptr_eq(e, h),
            (Embedding::Dense(e), QMatMul::Tensor(h)) => e.id() == h.id(),
            _ => false,
        }
    }

    /// This model with every decoder projection mapped by `f` (layers in parallel), and the
    /// given embedding and head.
    fn with_projections(&self, f: &(dyn Fn(&Linear) -> Result<Linear> + Sync), embed_tokens: Embedding, lm_head: Linear) -> Result<Model> {
        use rayon::prelude::*;
        let layers = self
            .layers
            .par_iter()
            .map(|l| {
                Ok(DecoderLayer {
                    input_layernorm: l.input_layernorm.clone(),
                    self_attn: Attention {
                        q_proj: f(&l.self_attn.q_proj)?,
                        k_proj: f(&l.self_attn.k_proj)?,
                        v_proj: f(&l.self_attn.v_proj)?,
                        o_proj: f(&l.self_attn.o_proj)?,
                    },
                    post_attention_layernorm: l.post_attention_layernorm.clone(),
                    mlp: Mlp {
                        gate_proj: f(&l.mlp.gate_proj)?,
                        up_proj: f(&l.mlp.up_proj)?,
                        down_proj: f(&l.mlp.down_proj)?,
                    },
                    q_norm: l.q_norm.clone(),
                    k_norm: l.k_norm.clone(),
                    attn_out_norm: l.attn_out_norm.clone(),
                    mlp_out_norm: l.mlp_out_norm.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            cfg: self.cfg.clone(),
            shape: self.shape.clone(),
            embed_tokens,
            layers,
            norm: self.norm.clone(),
            lm_head,
            rope: self.rope.clone(),
            rope_local: self.rope_local.clone(),
            rope_interleaved: self.rope_interleaved,
            kv_type: self.kv_type,
        })
    }

    fn proj(&self, li: usize, layer: &DecoderLayer, p: Proj, x: &Tensor, lora: &BatchLora) -> Result<Tensor> {
        let y = layer.proj(p).forward_train(x)?;
        lora.apply(li, p, x, y)
    }

    fn attention(&self, li: usize, layer: &DecoderLayer, h: &Tensor, lens: &[usize], lora: &BatchLora) -> Result<Tensor> {
        let (hd, rows) = (self.shape.head_dim, h.dim(0)?);
        // Per-head q/k norms (Gemma 3): rows of one head each.
        let head_norm = |norm: &Option<RmsNorm>, x: Tensor| -> Result<Tensor> {
            Ok(match norm {
                Some(n) => {
                    let width = x.dim(1)?;
                    n.forward_train(&x.reshape((rows * width / hd, hd))?)?.reshape((rows, width))?
                }
                None => x,
            })
        };
        let q = head_norm(&layer.q_norm, self.proj(li, layer, Proj::Q, h, lora)?)?;
        let k = head_norm(&layer.k_norm, self.proj(li, layer, Proj::K, h, lora)?)?;
        let v = self.proj(li, layer, Proj::V, h, lora)?;
        let attn = self.attention_train(li, &q, &k, &v, lens)?;
        self.proj(li, layer, Proj::O, &attn, lora)
    }

    /// Training attention over whole sequences (positions from 0, no cache). The ragged
    /// rows are laid out as a padded `[sequences, longest]` grid so that one batched
    /// product serves every sequence; padding follows each sequence's last token, where
    /// the causal mask already hides it from real queries, and its rows are dropped on
    /// the way out (so they get no gradient either).
    fn attention_train(&self, li: usize, q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim);
        let b = lens.len();
        let t = lens.iter().copied().max().unwrap_or(0);
        let (cos, sin) = self.rope_of(li).tensors(t)?;
        let ragged = lens.iter().any(|&n| n != t);
        let (mut to_grid, mut from_grid) = (Vec::with_capacity(b * t), Vec::new());
        let mut off = 0u32;
        for (i, &n) in lens.iter().enumerate() {
            to_grid.extend((0..t as u32).map(|j| if (j as usize) < n { off + j } else { off }));
            from_grid.extend((0..n as u32).map(|j| (i * t) as u32 + j));
            off += n as u32;
        }
        let to_grid = Tensor::from_vec(to_grid, b * t, &Device::Cpu)?;
        let grid = |x: &Tensor, heads: usize| -> Result<Tensor> {
            let x = if ragged { x.index_select(&to_grid, 0)? } else { x.clone() };
            Ok(x.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = grad_ops::rope(&grid(q, nh)?, &cos, &sin, self.rope_interleaved)?;
        let k = grad_ops::rope(&grid(k, nkv)?, &cos, &sin, self.rope_interleaved)?;
        let v = grid(v, nkv)?;
        // Query heads grouped onto their kv head, as in `attend`.
        let q = q.reshape((b, nkv, (nh / nkv) * t, hd))?;
        let scores = grad_ops::matmul(&q, &k.t()?)?;
        let probs = grad_ops::causal_softmax(&scores, t, self.cfg.attn_scale(), self.cfg.layer_window(li))?;
        let out = grad_ops::matmul(&probs, &v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        Ok(if ragged {
            let n = from_grid.len();
            out.index_select(&Tensor::from_vec(from_grid, n, &Device::Cpu)?, 0)?
        } else {
            out
        })
    }

    fn mlp(&self, li: usize, layer: &DecoderLayer, h: &Tensor, lora: &BatchLora) -> Result<Tensor> {
        let gate = self.proj(li, layer, Proj::Gate, h, lora)?;
        let up = self.proj(li, layer, Proj::Up, h, lora)?;
        let act = grad_ops::glu_mul(&gate, &up, self.cfg.is_gemma())?;
        self.proj(li, layer, Proj::Down, &act, lora)
    }
}
