//! Hugging Face PEFT LoRA folders: `adapter_config.json` + `adapter_model.safetensors`
//! (+ optional `tunegate.json`). Reading checks every tensor against the base model's
//! shapes and names the offending tensor; writing produces files PEFT, vLLM and
//! mistral.rs load.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::{AdapterError, AdapterLimits};
use crate::engine::lora::{LoraWeights, Proj};
use crate::engine::model::permute_qk_rows;
use crate::engine::ModelShape;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const META_FILE: &str = "tunegate.json";

/// The fields of `adapter_config.json` tunegate reads or writes.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct PeftConfig {
    #[serde(default = "lora")]
    pub peft_type: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default = "causal")]
    pub task_type: String,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub use_dora: bool,
}

fn lora() -> String {
    "LORA".into()
}
fn none() -> String {
    "none".into()
}
fn causal() -> String {
    "CAUSAL_LM".into()
}

/// PEFT allows a list of module names or one regex string.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl PeftConfig {
    /// A plain LoRA config as tunegate writes it (no DoRA, no biases, no per-module patterns).
    pub fn lora(base: &str, r: usize, alpha: f64, dropout: f64, use_rslora: bool, modules: Vec<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            base_model_name_or_path: Some(base.to_string()),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::List(modules),
            use_rslora,
            fan_in_fan_out: false,
            bias: "none".into(),
            task_type: "CAUSAL_LM".into(),
            inference_mode: true,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
            use_dora: false,
        }
    }

    /// LoRA scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// A checked adapter, ready to be committed into the registry.
pub struct Prepared {
    pub rank: usize,
    pub alpha: f32,
    pub scale: f32,
    pub target_modules: Vec<String>,
    pub bytes: usize,
    pub load_seconds: f64,
    pub meta: Option<serde_json::Value>,
    pub weights: LoraWeights,
}

/// Largest `lora_alpha` accepted (PEFT's usual values are 8-128; 1e300 would turn every
/// product into infinities).
const MAX_ALPHA: f64 = 1e4;

fn invalid(msg: impl Into<String>) -> AdapterError {
    AdapterError::Invalid(msg.into())
}

pub fn read_config(dir: &Path) -> Result<PeftConfig, AdapterError> {
    let p = dir.join(CONFIG_FILE);
    let raw = std::fs::read_to_string(&p).map_err(|e| AdapterError::Io(format!("{}: {e}", p.display())))?;
    serde_json::from_str(&raw).map_err(|e| invalid(format!("{}: {e}", p.display())))
}

/// Reads and checks an adapter folder against the base model.
pub fn load_adapter(dir: &Path, shape: &ModelShape, limits: &AdapterLimits) -> Result<Prepared, AdapterError> {
    let started = Instant::now();
    if !dir.is_dir() {
        return Err(AdapterError::Io(format!("{} is not a folder", dir.display())));
    }
    // The folder was checked to lie inside the adapters root; its files must be regular
    // files of that folder, not links that could read (and echo, for tunegate.json) any
    // file the process can open.
    for f in [CONFIG_FILE, WEIGHTS_FILE, META_FILE] {
        if std::fs::symlink_metadata(dir.join(f)).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(invalid(format!("{f} is a symbolic link; adapter files must be regular files")));
        }
    }
    let cfg = read_config(dir)?;
    if !cfg.peft_type.eq_ignore_ascii_case("LORA") {
        return Err(invalid(format!("peft_type is {}; only LORA adapters are supported", cfg.peft_type)));
    }
    if cfg.use_dora || cfg.fan_in_fan_out || cfg.bias != "none" {
        return Err(invalid("DoRA, fan_in_fan_out and trained biases are not supported"));
    }
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        return Err(invalid("per-module rank_pattern/alpha_pattern are not supported"));
    }
    if cfg.r == 0 || cfg.r > limits.max_rank {
        return Err(AdapterError::Limit(format!("rank {} is outside 1..={} (max_rank)", cfg.r, limits.max_rank)));
    }
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            " (adapter_model.bin is a pickle; convert it to safetensors)"
        } else {
            ""
        };
        return Err(AdapterError::Io(format!("{} is missing{hint}", wpath.display())));
    }
    let tensors = candle_core::safetensors::load(&wpath, &Device::Cpu)
        .map_err(|e| invalid(format!("{}: {e}", wpath.display())))?;
    let scale = cfg.scale();
    if !(cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0 && cfg.lora_alpha <= MAX_ALPHA && scale.is_finite()) {
        return Err(invalid(format!("lora_alpha {} is outside (0, {MAX_ALPHA}]", cfg.lora_alpha)));
    }
    let mut weights = LoraWeights::new(shape.num_layers);
    let mut pairs: HashMap<(usize, Proj), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (name, t) in &tensors {
        let (layer, proj, is_a) = parse_name(name).ok_or_else(|| {
            invalid(format!("tensor {name}: not a LoRA weight of a q/k/v/o/gate/up/down projection"))
        })?;
        if layer >= shape.num_layers {
            return Err(invalid(format!(
                "tensor {name}: layer {layer} but the base model has {} layers",
                shape.num_layers
            )));
        }
        let entry = pairs.entry((layer, proj)).or_default();
        let t = t.to_dtype(DType::F32).map_err(|e| invalid(format!("tensor {name}: {e}")))?;
        let finite = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map(|v| v.iter().all(|x| x.is_finite()))
            .map_err(|e| invalid(format!("tensor {name}: {e}")))?;
        if !finite {
            return Err(invalid(format!("tensor {name} holds NaN or infinite values")));
        }
        if is_a {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    if pairs.is_empty() {
        return Err(invalid(format!("{} holds no LoRA tensors", wpath.display())));
    }
    let mut modules = std::collections::BTreeSet::new();
    for ((layer, proj), (a, b)) in pairs {
        let base = format!("base_model.model.model.layers.{layer}.{}", proj.module_path());
        let a = a.ok_or_else(|| invalid(format!("{base}.lora_A.weight is missing")))?;
        let b = b.ok_or_else(|| invalid(format!("{base}.lora_B.weight is missing")))?;
        let (out, inp) = shape.proj_dims(proj);
        if a.dims() != [cfg.r, inp] {
            return Err(invalid(format!(
                "{base}.lora_A.weight has shape {:?}, expected [{}, {inp}] for this base model (r = {})",
                a.dims(),
                cfg.r,
                cfg.r
            )));
        }
        if b.dims() != [out, cfg.r] {
            return Err(invalid(format!(
                "{base}.lora_B.weight has shape {:?}, expected [{out}, {}] for this base model",
                b.dims(),
                cfg.r
            )));
        }
        let b = to_model_order(&b, proj, shape).map_err(|e| invalid(format!("{base}: {e}")))?;
        weights
            .set(layer, proj, &a, &b, scale)
            .map_err(|e| invalid(format!("{base}: {e}")))?;
        modules.insert(proj);
    }
    weights.prepare_serving(limits.precision).map_err(|e| invalid(e.to_string()))?;
    let weights = weights.into_serving_only().map_err(|e| invalid(e.to_string()))?;
    let bytes = weights.bytes();
    if bytes > limits.max_bytes {
        return Err(AdapterError::Limit(format!("adapter holds {bytes} bytes, more than max_bytes = {}", limits.max_bytes)));
    }
    let meta = match std::fs::read_to_string(dir.join(META_FILE)) {
        Ok(raw) => Some(serde_json::from_str(&raw).map_err(|e| invalid(format!("{META_FILE}: {e}")))?),
        Err(_) => None,
    };
    Ok(Prepared {
        rank: cfg.r,
        alpha: cfg.lora_alpha as f32,
        scale: scale as f32,
        target_modules: modules.into_iter().map(|p| p.name().to_string()).collect(),
        bytes,
        load_seconds: started.elapsed().as_secs_f64(),
        meta,
        weights,
    })
}

/// `…layers.N.self_attn.q_proj.lora_A[.default].weight` → (N, Q, is_a).
pub fn parse_name(name: &str) -> Option<(usize, Proj, bool)> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    let (n, rest) = rest.split_once('.')?;
    let layer = n.parse().ok()?;
    let mut parts = rest.split('.');
    let _block = parts.next()?; // self_attn | mlp
    let proj = Proj::from_name(parts.next()?)?;
    let is_a = match parts.next()? {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    match (parts.next(), parts.next(), parts.next()) {
        (Some("weight"), None, None) | (Some(_), Some("weight"), None) => Some((layer, proj, is_a)),
        _ => None,
    }
}

/// PEFT stores `lora_B` rows in Hugging Face order; a GGUF Llama base has q/k rows permuted
/// for interleaved RoPE, so the adapter's output rows must follow.
fn to_model_order(b: &Tensor, proj: Proj, shape: &ModelShape) -> crate::engine::Result<Tensor> {
    match proj {
        Proj::Q if shape.qk_interleaved => permute_qk_rows(b, shape.num_heads, false),
        Proj::K if shape.qk_interleaved => permute_qk_rows(b, shape.num_kv_heads, false),
        _ => Ok(b.clone()),
    }
}

/// The inverse of [`to_model_order`], for exporting trained weights.
pub fn to_hf_order(b: &Tensor, proj: Proj, shape: &ModelShape) -> crate::engine::Result<Tensor> {
    match proj {
        Proj::Q if shape.qk_interleaved => permute_qk_rows(b, shape.num_heads, true),
        Proj::K if shape.qk_interleaved => permute_qk_rows(b, shape.num_kv_heads, true),
        _ => Ok(b.clone()),
    }
}

/// The PEFT tensor name of one LoRA matrix.
pub fn tensor_name(layer: usize, proj: Proj, a: bool) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{}.weight",
        proj.module_path(),
        if a { "A" } else { "B" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peft_names() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Proj::Q, true))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight"),
            Some((12, Proj::Down, false))
        );
        assert_eq!(parse_name("base_model.model.lm_head.weight"), None);
        assert_eq!(parse_name("base_model.model.model.layers.1.self_attn.rotary.lora_A.weight"), None);
        assert_eq!(tensor_name(2, Proj::Gate, false), "base_model.model.model.layers.2.mlp.gate_proj.lora_B.weight");
    }
}
