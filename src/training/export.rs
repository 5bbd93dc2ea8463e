//! Publishing a trained adapter: `adapters/<task>/<version>/` with `adapter_config.json`,
//! `adapter_model.safetensors` (Hugging Face PEFT names and row order) and `tunegate.json`
//! (provenance). Written to a temporary folder, fsynced, then renamed into place, so a
//! reader (the directory watcher, vLLM) never sees half an adapter.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::dataset::DistilledPrompt;
use super::trainer::{LoraParams, TrainConfig};
use crate::adapters::peft::{self, PeftConfig};
use crate::engine::{EngineError, ModelShape, Result};

/// `tunegate.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterMeta {
    pub job_id: Option<String>,
    pub task: String,
    pub base_model: String,
    pub data_sha256: String,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub distilled_prompt: Option<DistilledPrompt>,
    pub eval: Option<serde_json::Value>,
    pub steps: usize,
    pub final_loss: Option<f32>,
    pub train_seconds: f64,
    pub hyperparameters: TrainConfig,
    /// The tenant that owns the adapter (a client key's job); absent: the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
}

fn io(e: std::io::Error, p: &Path) -> EngineError {
    EngineError::Internal(format!("{}: {e}", p.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| io(e, path))?;
    f.write_all(bytes).map_err(|e| io(e, path))?;
    f.sync_all().map_err(|e| io(e, path))
}

/// Writes the adapter into `dir` (which must exist).
pub fn write_peft(dir: &Path, params: &LoraParams, shape: &ModelShape, cfg: &TrainConfig, meta: &AdapterMeta) -> Result<()> {
    let mut tensors = HashMap::new();
    let mut modules = std::collections::BTreeSet::new();
    for (&(layer, proj), (a, b)) in &params.pairs {
        tensors.insert(peft::tensor_name(layer, proj, true), a.as_tensor().clone());
        tensors.insert(peft::tensor_name(layer, proj, false), peft::to_hf_order(b.as_tensor(), proj, shape)?);
        modules.insert(proj.name().to_string());
    }
    let weights = dir.join(peft::WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights)?;
    std::fs::File::open(&weights).and_then(|f| f.sync_all()).map_err(|e| io(e, &weights))?;
    let modules = modules.into_iter().collect();
    let config = PeftConfig::lora(&shape.base_name, params.rank, cfg.alpha, cfg.dropout as f64, cfg.use_rslora, modules);
    write_synced(&dir.join(peft::CONFIG_FILE), pretty(&config)?.as_bytes())?;
    write_synced(&dir.join(peft::META_FILE), pretty(meta)?.as_bytes())?;
    Ok(())
}

fn pretty<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| EngineError::Internal(e.to_string()))
}

/// Publishes atomically as `root/<task>/<version>/`; fails if that version exists.
pub fn publish(
    root: &Path,
    task: &str,
    version: &str,
    params: &LoraParams,
    shape: &ModelShape,
    cfg: &TrainConfig,
    meta: &AdapterMeta,
) -> Result<PathBuf> {
    let task_dir = root.join(task);
    std::fs::create_dir_all(&task_dir).map_err(|e| io(e, &task_dir))?;
    let dest = task_dir.join(version);
    if dest.exists() {
        return Err(EngineError::InvalidRequest(format!("{} already exists", dest.display())));
    }
    let tmp = task_dir.join(format!(".tmp-{version}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&tmp).map_err(|e| io(e, &tmp))?;
    let written = write_peft(&tmp, params, shape, cfg, meta).and_then(|_| {
        std::fs::File::open(&tmp).and_then(|d| d.sync_all()).map_err(|e| io(e, &tmp))?;
        std::fs::rename(&tmp, &dest).map_err(|e| io(e, &dest))?;
        std::fs::File::open(&task_dir).and_then(|d| d.sync_all()).map_err(|e| io(e, &task_dir))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(dest)
}
