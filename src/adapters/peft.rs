//! Hugging Face PEFT adapter folders (stub; being written).

use std::path::Path;

use super::{AdapterError, AdapterLimits};
use crate::engine::lora::LoraWeights;
use crate::engine::ModelShape;

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

pub fn load_adapter(_path: &Path, _shape: &ModelShape, _limits: &AdapterLimits) -> Result<Prepared, AdapterError> {
    Err(AdapterError::Invalid("not yet".into()))
}
