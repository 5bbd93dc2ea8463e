//! Reading models from a Hugging Face folder: `config.json`, `*.safetensors`,
//! `tokenizer.json`. Weights are converted to f32 and kept dense.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use super::model::{Config, Embedding, WeightSource};
use super::{EngineError, Result};

pub struct SafetensorsDir {
    tensors: HashMap<String, Tensor>,
    pub config: Config,
    pub architecture: String,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let raw = std::fs::read_to_string(&cfg_path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", cfg_path.display())))?;
        let mut config: Config = serde_json::from_str(&raw)
            .map_err(|e| EngineError::Load(format!("{}: {e}", cfg_path.display())))?;
        let architecture = match config.model_type.as_deref() {
            Some("qwen2") => "qwen2",
            Some("llama") | Some("mistral") | None => "llama",
            Some(other) => {
                return Err(EngineError::Load(format!("model_type '{other}' is not supported (llama, mistral, qwen2)")))
            }
        }
        .to_string();
        if architecture == "qwen2" {
            config.attention_bias = true;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| EngineError::Load(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::Load(format!("no .safetensors file in {}", dir.display())));
        }
        let mut tensors = HashMap::new();
        for f in files {
            let t = candle_core::safetensors::load(&f, &Device::Cpu)
                .map_err(|e| EngineError::Load(format!("{}: {e}", f.display())))?;
            tensors.extend(t);
        }
        Ok(Self { tensors, config, architecture })
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::Load(format!("missing tensor {name}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

impl WeightSource for SafetensorsDir {
    fn matmul(&mut self, name: &str) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.get(name)?))
    }

    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        self.get(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn embedding(&mut self, name: &str) -> Result<(Embedding, QMatMul)> {
        let t = self.get(name)?;
        Ok((Embedding::Dense(t.clone()), QMatMul::Tensor(t)))
    }
}
