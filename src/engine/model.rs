//! Decoder-only transformer of the Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral
//! without sliding window) and Qwen2 (bias on q/k/v), one code path for both.
//!
//! Weights are shared by every sequence; each sequence brings its own [`KvCache`] and,
//! optionally, its own LoRA adapter. One [`Model::forward`] call runs a *ragged batch*:
//! the new tokens of all sequences are stacked into one `[tokens, hidden]` matrix, so
//! every projection runs once for the whole batch (prefill and decode rows alike), while
//! attention runs per sequence over that sequence's cache. LoRA deltas are added per
//! adapter group (see `lora.rs`). That serving pass runs on plain buffers and our own
//! kernels (`forward.rs`, `kernels.rs`); this file holds the weights and the training
//! forward ([`Model::forward_train`]), which runs the same arithmetic through candle's
//! autograd.
//!
//! Base projections stay quantized (Q4_1 or Q8_0 blocks as the file has them; other block
//! types are re-quantized to Q8_0 at load) or dense f32; activations are f32.
//! Tensor names follow the Hugging Face state dict; GGUF names are mapped in `gguf.rs`.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

use super::grad_ops;
use super::lora::{BatchLora, Proj};
use super::{EngineError, Result};

/// Hyper-parameters, with Hugging Face `config.json` field names.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on q/k/v; some Llama variants set `attention_bias`.
    #[serde(default)]
    pub attention_bias: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl Config {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn validate(&self) -> Result<()> {
        let ok = self.num_attention_heads > 0
            && self.num_kv_heads() > 0
            && self.num_attention_heads.is_multiple_of(self.num_kv_heads())
            && self.head_dim().is_multiple_of(2)
            && self.num_hidden_layers > 0
            && self.vocab_size > 0;
        if ok {
            Ok(())
        } else {
            Err(EngineError::Load(format!("inconsistent model config: {self:?}")))
        }
    }
}

/// The base model's dimensions, which adapters are checked against.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelShape {
    pub architecture: String,
    pub base_name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// GGUF Llama files store q/k rows permuted for interleaved RoPE; PEFT adapters use the
    /// Hugging Face order, so their q/k `lora_B` rows are permuted on load.
    pub qk_interleaved: bool,
}

impl ModelShape {
    /// (out_features, in_features) of a projection.
    pub fn proj_dims(&self, p: Proj) -> (usize, usize) {
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        match p {
            Proj::Q => (q, self.hidden_size),
            Proj::K | Proj::V => (kv, self.hidden_size),
            Proj::O => (self.hidden_size, q),
            Proj::Gate | Proj::Up => (self.intermediate_size, self.hidden_size),
            Proj::Down => (self.hidden_size, self.intermediate_size),
        }
    }
}

/// Where a loader gets tensors from (GGUF file or safetensors), by Hugging Face name.
pub trait WeightSource {
    /// A 2-D projection weight `[out, in]`, quantized if the file is.
    fn matmul(&mut self, name: &str) -> Result<QMatMul>;
    /// A small f32 tensor (norms, biases).
    fn tensor(&mut self, name: &str) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    /// The token embedding table, and the same weight as an output projection.
    fn embedding(&mut self, name: &str) -> Result<(Embedding, QMatMul)>;
}

/// Token embedding table, quantized (GGUF) or dense.
#[derive(Debug, Clone)]
pub enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(ids)?,
            Embedding::Dense(t) => t.embedding(ids)?,
        })
    }

    /// The table as f32 `[vocab, hidden]` (training, reference checks).
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.dequantize(&Device::Cpu)?,
            Embedding::Dense(t) => t.clone(),
        })
    }
}

/// A projection `y = x Wᵀ (+ b)`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: QMatMul,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Training forward: a dense weight goes through [`grad_ops::frozen_matmul`], whose
    /// backward pass forms no gradient for the (frozen) weight.
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            QMatMul::Tensor(w) => grad_ops::frozen_matmul(x, w)?,
            _ => self.weight.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The weight as f32 `[out, in]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
            QMatMul::Tensor(t) => t.clone(),
            QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    /// Training forward, through our differentiable fused kernel (serving normalises in
    /// `forward.rs`; tests check the two paths agree and the gradients are right).
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        Ok(grad_ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &Config, src: &mut dyn WeightSource, i: usize) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let eps = cfg.rms_norm_eps as f32;
        let lin = |src: &mut dyn WeightSource, name: &str, bias: bool| -> Result<Linear> {
            let bias_name = format!("{p}.{name}.bias");
            let bias = if bias || src.contains(&bias_name) { Some(src.tensor(&bias_name)?) } else { None };
            Ok(Linear { weight: src.matmul(&format!("{p}.{name}.weight"))?, bias })
        };
        Ok(Self {
            input_layernorm: RmsNorm { weight: src.tensor(&format!("{p}.input_layernorm.weight"))?, eps },
            self_attn: Attention {
                q_proj: lin(src, "self_attn.q_proj", cfg.attention_bias)?,
                k_proj: lin(src, "self_attn.k_proj", cfg.attention_bias)?,
                v_proj: lin(src, "self_attn.v_proj", cfg.attention_bias)?,
                o_proj: lin(src, "self_attn.o_proj", false)?,
            },
            post_attention_layernorm: RmsNorm {
                weight: src.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
                eps,
            },
            mlp: Mlp {
                gate_proj: lin(src, "mlp.gate_proj", false)?,
                up_proj: lin(src, "mlp.up_proj", false)?,
                down_proj: lin(src, "mlp.down_proj", false)?,
            },
        })
    }

    pub fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.self_attn.q_proj,
            Proj::K => &self.self_attn.k_proj,
            Proj::V => &self.self_attn.v_proj,
            Proj::O => &self.self_attn.o_proj,
            Proj::Gate => &self.mlp.gate_proj,
            Proj::Up => &self.mlp.up_proj,
            Proj::Down => &self.mlp.down_proj,
        }
    }
}

/// Per-sequence key/value cache: for each layer, the keys and the values of every cached
/// position, row by row (`[positions, kv_heads * head_dim]`, f32). Room is reserved ahead
/// (see [`KvCache::reserve`]) so that decode steps append without reallocating.
#[derive(Debug, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    reserve: usize,
    /// Values per position per layer (known from the first step on).
    kv_dim: usize,
}

const KV_CHUNK: usize = 128;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { k: vec![Vec::new(); num_layers], v: vec![Vec::new(); num_layers], len: 0, reserve: 0, kv_dim: 0 }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Asks for room for `positions` in all (allocated at the next step). Untouched room
    /// costs address space, not memory.
    pub fn reserve(&mut self, positions: usize) {
        self.reserve = self.reserve.max(positions);
    }

    /// Bytes of keys and values held (filled positions, all layers).
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.len * self.kv_dim * 4
    }

    /// Before a step that fills up to `need` positions: drops what a failed step may have
    /// left past `len` and makes room.
    pub(crate) fn prepare(&mut self, num_layers: usize, kv_dim: usize, need: usize) {
        self.kv_dim = kv_dim;
        if self.k.len() != num_layers {
            self.k.resize_with(num_layers, Vec::new);
            self.v.resize_with(num_layers, Vec::new);
        }
        let want = need.max(self.reserve).div_ceil(KV_CHUNK) * KV_CHUNK * kv_dim;
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(self.len * kv_dim);
            if l.capacity() < need * kv_dim {
                l.reserve_exact(want - l.len());
            }
        }
    }

    /// Appends one position's key and value for layer `i`.
    pub(crate) fn push(&mut self, i: usize, k: &[f32], v: &[f32]) {
        self.k[i].extend_from_slice(k);
        self.v[i].extend_from_slice(v);
    }

    /// Layer `i`'s keys and values so far (the step's new positions included).
    pub(crate) fn layer(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.k[i], &self.v[i])
    }

    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets every position from `n` on (the room stays; the next step overwrites it).
    pub fn rewind(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Keeps the first `n` positions and gives back the room past them.
    pub(crate) fn truncate(&mut self, n: usize) {
        let n = n.min(self.len);
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(n * self.kv_dim);
            l.shrink_to_fit();
        }
        self.len = n;
        self.reserve = n;
    }

    /// Makes this (empty) cache hold `other`'s first `n` positions, with room for what was
    /// reserved.
    pub(crate) fn copy_prefix(&mut self, other: &KvCache, n: usize) {
        let n = n.min(other.len);
        if self.k.len() != other.k.len() {
            self.k.resize_with(other.k.len(), Vec::new);
            self.v.resize_with(other.v.len(), Vec::new);
        }
        let per = other.kv_dim;
        for (dst, src) in self.k.iter_mut().zip(&other.k).chain(self.v.iter_mut().zip(&other.v)) {
            dst.clear();
            let want = self.reserve.max(n).div_ceil(KV_CHUNK) * KV_CHUNK * per;
            dst.reserve_exact(want);
            dst.extend_from_slice(&src[..n * per]);
        }
        self.len = n;
        self.kv_dim = per;
    }
}

/// One sequence's slice of a ragged batch.
pub struct SeqBatch<'a> {
    /// New tokens to run (the whole prompt chunk for prefill, one token for decode).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

pub struct Model {
    pub cfg: Config,
    pub shape: ModelShape,
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// The same tables as plain rows (`[positions, head_dim / 2]`) for the serving kernels.
    cos_rows: Vec<f32>,
    sin_rows: Vec<f32>,
    /// Interleaved (GGUF Llama) or half-split (Hugging Face) RoPE.
    rope_interleaved: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("shape", &self.shape).finish()
    }
}

impl Model {
    pub fn new(
        cfg: Config,
        src: &mut dyn WeightSource,
        architecture: &str,
        base_name: &str,
        rope_interleaved: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let (embed_tokens, tied_head) = src.embedding("model.embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&cfg, src, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm { weight: src.tensor("model.norm.weight")?, eps: cfg.rms_norm_eps as f32 };
        let lm_head = if !cfg.tie_word_embeddings && src.contains("lm_head.weight") {
            Linear { weight: src.matmul("lm_head.weight")?, bias: None }
        } else {
            Linear { weight: tied_head, bias: None }
        };
        let (cos, sin) = rope_tables(&cfg)?;
        let (cos_rows, sin_rows) = (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?);
        let shape = ModelShape {
            architecture: architecture.to_string(),
            base_name: base_name.to_string(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            qk_interleaved: rope_interleaved,
        };
        Ok(Self { cfg, shape, embed_tokens, layers, norm, lm_head, cos, sin, cos_rows, sin_rows, rope_interleaved })
    }

    pub fn rope_interleaved(&self) -> bool {
        self.rope_interleaved
    }

    /// RoPE cos and sin rows for one position (`head_dim / 2` each).
    pub(crate) fn rope_rows(&self, pos: usize) -> (&[f32], &[f32]) {
        let h = self.shape.head_dim / 2;
        (&self.cos_rows[pos * h..(pos + 1) * h], &self.sin_rows[pos * h..(pos + 1) * h])
    }

    /// Bytes of the weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| match &l.weight {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
        };
        let mut n = self.layers.iter().map(|l| Proj::ALL.iter().map(|&p| lin(l.proj(p))).sum::<usize>()).sum();
        n += lin(&self.lm_head);
        n
    }

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
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward_train(&x)?;
            let attn = self.attention(li, layer, &h, lens, lora)?;
            x = (x + attn)?;
            let h = layer.post_attention_layernorm.forward_train(&x)?;
            let mlp = self.mlp(li, layer, &h, lora)?;
            x = (x + mlp)?;
        }
        Ok(x)
    }

    /// A copy whose projections and embedding are dense f32 (quantized blocks have no
    /// backward pass). The weights themselves are unchanged: serving and training see
    /// the same values.
    pub fn to_dense(&self) -> Result<Model> {
        let dense = |l: &Linear| -> Result<Linear> { Ok(Linear { weight: QMatMul::Tensor(l.dequantize()?), bias: l.bias.clone() }) };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(DecoderLayer {
                    input_layernorm: l.input_layernorm.clone(),
                    self_attn: Attention {
                        q_proj: dense(&l.self_attn.q_proj)?,
                        k_proj: dense(&l.self_attn.k_proj)?,
                        v_proj: dense(&l.self_attn.v_proj)?,
                        o_proj: dense(&l.self_attn.o_proj)?,
                    },
                    post_attention_layernorm: l.post_attention_layernorm.clone(),
                    mlp: Mlp {
                        gate_proj: dense(&l.mlp.gate_proj)?,
                        up_proj: dense(&l.mlp.up_proj)?,
                        down_proj: dense(&l.mlp.down_proj)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            cfg: self.cfg.clone(),
            shape: self.shape.clone(),
            embed_tokens: Embedding::Dense(self.embed_tokens.dequantize()?),
            layers,
            norm: self.norm.clone(),
            lm_head: dense(&self.lm_head)?,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            cos_rows: self.cos_rows.clone(),
            sin_rows: self.sin_rows.clone(),
            rope_interleaved: self.rope_interleaved,
        })
    }

    fn proj(&self, li: usize, layer: &DecoderLayer, p: Proj, x: &Tensor, lora: &BatchLora) -> Result<Tensor> {
        let y = layer.proj(p).forward_train(x)?;
        lora.apply(li, p, x, y)
    }

    fn attention(&self, li: usize, layer: &DecoderLayer, h: &Tensor, lens: &[usize], lora: &BatchLora) -> Result<Tensor> {
        let q = self.proj(li, layer, Proj::Q, h, lora)?;
        let k = self.proj(li, layer, Proj::K, h, lora)?;
        let v = self.proj(li, layer, Proj::V, h, lora)?;
        let attn = self.attention_train(&q, &k, &v, lens)?;
        self.proj(li, layer, Proj::O, &attn, lora)
    }

    /// Training attention over whole sequences (positions from 0, no cache). The ragged
    /// rows are laid out as a padded `[sequences, longest]` grid so that one batched
    /// product serves every sequence; padding follows each sequence's last token, where
    /// the causal mask already hides it from real queries, and its rows are dropped on
    /// the way out (so they get no gradient either).
    fn attention_train(&self, q: &Tensor, k: &Tensor, v: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim);
        let b = lens.len();
        let t = lens.iter().copied().max().unwrap_or(0);
        if t > self.cos.dim(0)? {
            return Err(EngineError::Internal(format!("position {t} beyond the RoPE table ({})", self.cos.dim(0)?)));
        }
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
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let q = grad_ops::rope(&grid(q, nh)?, &cos, &sin, self.rope_interleaved)?;
        let k = grad_ops::rope(&grid(k, nkv)?, &cos, &sin, self.rope_interleaved)?;
        let v = grid(v, nkv)?;
        // Query heads grouped onto their kv head, as in `attend`.
        let q = q.reshape((b, nkv, (nh / nkv) * t, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let probs = grad_ops::causal_softmax(&scores, t, 1.0 / (hd as f32).sqrt())?;
        let out = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
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
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        self.proj(li, layer, Proj::Down, &act, lora)
    }

    /// Positions the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

fn rope_tables(cfg: &Config) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let n = cfg.max_position_embeddings;
    let inv: Vec<f32> =
        (0..hd / 2).map(|i| 1.0 / (cfg.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
    let inv = Tensor::from_vec(inv, (1, hd / 2), &Device::Cpu)?;
    let t = Tensor::arange(0u32, n as u32, &Device::Cpu)?.to_dtype(DType::F32)?.reshape((n, 1))?;
    let freqs = t.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Permutes the rows of a q/k output-side matrix from Hugging Face order to the GGUF
/// (interleaved RoPE) order: within each head, row `2i` is HF row `i` and row `2i+1` is
/// HF row `i + d/2`. `inverse` maps back.
pub fn permute_qk_rows(w: &Tensor, n_heads: usize, inverse: bool) -> Result<Tensor> {
    let rows = w.dim(0)?;
    let d = rows / n_heads;
    let mut idx = vec![0u32; rows];
    for h in 0..n_heads {
        for i in 0..d / 2 {
            for s in 0..2 {
                let gguf = h * d + 2 * i + s;
                let hf = h * d + s * (d / 2) + i;
                if inverse {
                    idx[hf] = gguf as u32;
                } else {
                    idx[gguf] = hf as u32;
                }
            }
        }
    }
    let idx = Tensor::from_vec(idx, rows, w.device())?;
    Ok(w.index_select(&idx, 0)?)
}

/// Sequence logits helper: the last dimension as a `Vec<f32>` per row.
pub fn logits_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
