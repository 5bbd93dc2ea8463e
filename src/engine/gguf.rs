//! Reading models from GGUF files: hyper-parameters from the metadata, tensors by their
//! Hugging Face names (mapped to llama.cpp's `blk.N.attn_q.weight` scheme), kept quantized.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::Device;

use super::model::{Config, Embedding, WeightSource};
use super::{EngineError, Result};

/// Architectures this engine runs, as GGUF names them.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "gemma3"];

pub struct GgufFile {
    pub content: gguf_file::Content,
    reader: BufReader<File>,
    pub architecture: String,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| EngineError::Load(format!("{} is not a readable GGUF file: {e}", path.display())))?;
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| EngineError::Load("GGUF metadata has no general.architecture".into()))?;
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(EngineError::Load(format!(
                "architecture '{architecture}' is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        Ok(Self { content, reader, architecture })
    }

    pub fn metadata(&self) -> &HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    fn md_u(&self, key: &str) -> Option<usize> {
        let v = self.content.metadata.get(&format!("{}.{key}", self.architecture))?;
        v.to_u64().ok().map(|x| x as usize).or_else(|| v.to_u32().ok().map(|x| x as usize))
    }

    fn md_f(&self, key: &str) -> Option<f64> {
        let v = self.content.metadata.get(&format!("{}.{key}", self.architecture))?;
        v.to_f32().ok().map(|x| x as f64).or_else(|| v.to_f64().ok())
    }

    /// Hyper-parameters from `<arch>.*` metadata.
    pub fn config(&self) -> Result<Config> {
        let need = |k: &str| {
            self.md_u(k).ok_or_else(|| EngineError::Load(format!("GGUF metadata lacks {}.{k}", self.architecture)))
        };
        let hidden = need("embedding_length")?;
        let gemma = self.architecture == "gemma3";
        let heads = need("attention.head_count")?;
        let vocab = match self.md_u("vocab_size") {
            Some(v) => v,
            None => match self.content.tensor_infos.get("token_embd.weight") {
                Some(ti) => ti.shape.dims()[0],
                None => return Err(EngineError::Load("GGUF file has no token_embd.weight".into())),
            },
        };
        Ok(Config {
            model_type: Some(self.architecture.clone()),
            hidden_size: hidden,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(self.md_u("attention.head_count_kv").unwrap_or(heads)),
            head_dim: self.md_u("attention.key_length"),
            vocab_size: vocab,
            rms_norm_eps: self.md_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: self.md_f("rope.freq_base").unwrap_or(10_000.0),
            max_position_embeddings: self.md_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.architecture == "qwen2",
            sliding_window: self.md_u("attention.sliding_window"),
            // What llama.cpp fixes for Gemma 3 (its GGUF files do not record them): every
            // sixth layer global, local layers on RoPE base 10,000.
            sliding_window_pattern: gemma.then_some(6),
            rope_local_base_freq: gemma.then_some(10_000.0),
            query_pre_attn_scalar: None,
        })
    }

    /// llama.cpp permutes Llama q/k rows for interleaved RoPE; Qwen2 and Gemma keep HF order.
    pub fn rope_interleaved(&self) -> bool {
        !matches!(self.architecture.as_str(), "qwen2" | "gemma3")
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let g = gguf_name(name);
        self.content
            .tensor(&mut self.reader, &g, &Device::Cpu)
            .map_err(|e| EngineError::Load(format!("tensor {g} ({name}): {e}")))
    }
}

/// Hugging Face tensor name → llama.cpp GGUF name.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((n, tail)) = rest.split_once('.') {
            let mapped = match tail {
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                "self_attn.q_norm.weight" => "attn_q_norm.weight",
                "self_attn.k_norm.weight" => "attn_k_norm.weight",
                "post_attention_norm.weight" => "post_attention_norm.weight",
                "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
                other => other,
            };
            return format!("blk.{n}.{mapped}");
        }
    }
    hf.to_string()
}

/// The serving kernels read Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K blocks in
/// place, and dense f32. Other block types (Q2_K, Q3_K, the IQ formats) are re-quantized
/// to Q8_0 at load: near-lossless (8-bit blocks of the same 32 values, at the cost of more
/// bytes). Half-precision floats and row lengths that are no multiple of 32 become dense
/// f32 (exact).
fn serving_form(dtype: GgmlDType, k: usize) -> Option<GgmlDType> {
    match dtype {
        GgmlDType::F32 => None,
        GgmlDType::F16 | GgmlDType::BF16 => Some(GgmlDType::F32),
        _ => match crate::engine::forward::block_type(dtype) {
            Some(t) if k.is_multiple_of(t.values()) => None,
            _ if k.is_multiple_of(32) => Some(GgmlDType::Q8_0),
            _ => Some(GgmlDType::F32),
        },
    }
}

impl WeightSource for GgufFile {
    fn matmul(&mut self, name: &str) -> Result<QMatMul> {
        let q = self.qtensor(name)?;
        let k = q.shape().dims().last().copied().unwrap_or(0);
        Ok(match serving_form(q.dtype(), k) {
            None => QMatMul::from_qtensor(q)?,
            Some(GgmlDType::Q8_0) => QMatMul::from_qtensor(QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?)?,
            Some(_) => QMatMul::Tensor(q.dequantize(&Device::Cpu)?),
        })
    }

    fn tensor(&mut self, name: &str) -> Result<candle_core::Tensor> {
        let q = self.qtensor(name)?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(&gguf_name(name))
    }

    fn embedding(&mut self, name: &str) -> Result<(Embedding, QMatMul)> {
        let mut q = self.qtensor(name)?;
        let k = q.shape().dims().last().copied().unwrap_or(0);
        if let Some(form) = serving_form(q.dtype(), k) {
            q = QTensor::quantize(&q.dequantize(&Device::Cpu)?, form)?;
        }
        let q = Arc::new(q);
        let head = QMatMul::from_arc(q.clone())?;
        Ok((Embedding::Quantized(q), head))
    }
}
