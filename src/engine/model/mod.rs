//! Decoder-only transformers of the Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral
//! without sliding window), Qwen2 (bias on q/k/v) and Gemma 3 (per-head q/k norms, norms
//! after attention and MLP as well as before, GELU-gated MLP, embeddings scaled by
//! √hidden, local sliding-window layers with their own RoPE base between global ones),
//! one code path for all: what differs is optional weights and [`Config`] fields.
//!
//! Weights are shared by every sequence; each sequence brings its own [`KvCache`] and,
//! optionally, its own LoRA adapter. One [`Model::forward`] call runs a *ragged batch*:
//! the new tokens of all sequences are stacked into one `[tokens, hidden]` matrix, so
//! every projection runs once for the whole batch (prefill and decode rows alike), while
//! attention runs per sequence over that sequence's cache. LoRA deltas are added per
//! adapter group (see `lora.rs`). That serving pass runs on plain buffers and our own
//! kernels (`forward.rs`, `kernels/`); this file holds the weights, and `model/train.rs`,
//! fenced off from serving, the training forward ([`Model::forward_train`]), which runs the
//! same arithmetic through candle's autograd.
//!
//! Base projections stay quantized (the GGML blocks the kernels read, as the file has them;
//! other block types are re-quantized to Q8_0 at load) or dense f32; activations are f32.
//! Tensor names follow the Hugging Face state dict; GGUF names are mapped in `gguf.rs`.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

mod train;

pub use super::kv_cache::{KvCache, KvType};
use super::lora::Proj;
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
    /// Local layers' attention span in positions, the query's own included (Gemma 3).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer is global, the others local (Gemma 3: 6).
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// RoPE base of the local layers (Gemma 3: 10,000; global layers use `rope_theta`).
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Attention scores are scaled by `1/√query_pre_attn_scalar` (default the head size).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
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
    /// Gemma 3's family traits: embeddings scaled by √hidden, GELU (tanh) gating.
    pub fn is_gemma(&self) -> bool {
        self.model_type.as_deref() == Some("gemma3")
    }

    /// The attention span of layer `li` when it is a local (sliding-window) layer.
    pub fn layer_window(&self, li: usize) -> Option<usize> {
        let window = self.sliding_window?;
        match self.sliding_window_pattern {
            Some(n) if n > 0 && (li + 1).is_multiple_of(n) => None,
            _ => Some(window),
        }
    }

    /// What the token embeddings are multiplied by (√hidden for Gemma, else 1).
    pub fn embed_scale(&self) -> f32 {
        if self.is_gemma() {
            (self.hidden_size as f32).sqrt()
        } else {
            1.0
        }
    }

    /// What attention scores are multiplied by.
    pub fn attn_scale(&self) -> f32 {
        (1.0 / self.query_pre_attn_scalar.unwrap_or(self.head_dim() as f64).sqrt()) as f32
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
    /// The weight repacked for the training path's int8 products ([`Model::for_training`]);
    /// `None` when serving.
    pub frozen: Option<Arc<crate::engine::grad_ops::FrozenPanels>>,
}

impl Linear {
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
    /// The norm before the MLP (Hugging Face's Llama name; Gemma's `pre_feedforward_layernorm`).
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    /// Gemma 3: RMS norms over each head's query and key (before RoPE).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// Gemma 3: RMS norms of the attention's and the MLP's outputs (before the residual).
    pub attn_out_norm: Option<RmsNorm>,
    pub mlp_out_norm: Option<RmsNorm>,
}

impl DecoderLayer {
    fn new(cfg: &Config, src: &mut dyn WeightSource, i: usize) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let eps = cfg.rms_norm_eps as f32;
        let lin = |src: &mut dyn WeightSource, name: &str, bias: bool| -> Result<Linear> {
            let bias_name = format!("{p}.{name}.bias");
            let bias = if bias || src.contains(&bias_name) { Some(src.tensor(&bias_name)?) } else { None };
            Ok(Linear { weight: src.matmul(&format!("{p}.{name}.weight"))?, bias, frozen: None })
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
            q_norm: optional_norm(src, &format!("{p}.self_attn.q_norm.weight"), eps)?,
            k_norm: optional_norm(src, &format!("{p}.self_attn.k_norm.weight"), eps)?,
            attn_out_norm: optional_norm(src, &format!("{p}.post_attention_norm.weight"), eps)?,
            mlp_out_norm: optional_norm(src, &format!("{p}.post_feedforward_layernorm.weight"), eps)?,
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

/// A norm the file may not have.
fn optional_norm(src: &mut dyn WeightSource, name: &str, eps: f32) -> Result<Option<RmsNorm>> {
    Ok(if src.contains(name) { Some(RmsNorm { weight: src.tensor(name)?, eps }) } else { None })
}

/// RoPE tables for one base: `[positions, head_dim / 2]` rows of cos and sin. Serving reads
/// them as rows; training takes tensors of the positions it needs ([`RopeTables::tensors`]),
/// so the tables are held once, for the positions the model will run (the loader cuts the
/// model's limit to the engine's context length: Gemma 3's 32,768 positions × 128 × 2 bases
/// are 64 MiB, 8,192 are 16).
#[derive(Debug, Clone)]
pub(crate) struct RopeTables {
    cos_rows: Vec<f32>,
    sin_rows: Vec<f32>,
    half: usize,
}

impl RopeTables {
    fn new(cfg: &Config, theta: f64) -> Result<Self> {
        let (cos, sin) = rope_tables(cfg, theta)?;
        let (cos_rows, sin_rows) = (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?);
        Ok(Self { cos_rows, sin_rows, half: cfg.head_dim() / 2 })
    }

    /// Positions the tables cover.
    pub fn positions(&self) -> usize {
        self.cos_rows.len() / self.half.max(1)
    }

    /// The cos and sin tables of positions `0..t` as `[t, head_dim / 2]` tensors.
    pub fn tensors(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let n = t * self.half;
        if n > self.cos_rows.len() {
            return Err(EngineError::Internal(format!("position {t} beyond the RoPE table ({})", self.positions())));
        }
        let dev = &Device::Cpu;
        Ok((Tensor::from_slice(&self.cos_rows[..n], (t, self.half), dev)?, Tensor::from_slice(&self.sin_rows[..n], (t, self.half), dev)?))
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
    /// RoPE tables of the global layers (every layer but Gemma's local ones).
    rope: RopeTables,
    /// RoPE tables of the local (sliding-window) layers, where their base differs.
    rope_local: Option<RopeTables>,
    /// Interleaved (GGUF Llama) or half-split (Hugging Face) RoPE.
    rope_interleaved: bool,
    /// How sequences' caches store keys and values (f32 unless the engine asks for f16).
    pub kv_type: KvType,
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
            Linear { weight: src.matmul("lm_head.weight")?, bias: None, frozen: None }
        } else {
            Linear { weight: tied_head, bias: None, frozen: None }
        };
        let rope = RopeTables::new(&cfg, cfg.rope_theta)?;
        let rope_local = match cfg.rope_local_base_freq {
            Some(theta) if cfg.sliding_window.is_some() => Some(RopeTables::new(&cfg, theta)?),
            _ => None,
        };
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
        Ok(Self { cfg, shape, embed_tokens, layers, norm, lm_head, rope, rope_local, rope_interleaved, kv_type: KvType::F32 })
    }

    /// Layer `li`'s RoPE tables.
    pub(crate) fn rope_of(&self, li: usize) -> &RopeTables {
        match (&self.rope_local, self.cfg.layer_window(li)) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        }
    }

    pub fn rope_interleaved(&self) -> bool {
        self.rope_interleaved
    }

    /// Layer `li`'s RoPE cos and sin rows for one position (`head_dim / 2` each).
    pub(crate) fn rope_rows(&self, li: usize, pos: usize) -> (&[f32], &[f32]) {
        let h = self.shape.head_dim / 2;
        let r = self.rope_of(li);
        (&r.cos_rows[pos * h..(pos + 1) * h], &r.sin_rows[pos * h..(pos + 1) * h])
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

    /// Positions the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

fn rope_tables(cfg: &Config, theta: f64) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let n = cfg.max_position_embeddings;
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / (theta.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
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
