//! LoRA adapters: loading and validating Hugging Face PEFT folders, and the registry of
//! alias → immutable generation that requests lease. Training lives in `training`; the
//! per-sequence math lives in `engine::lora`.

pub mod paths;
pub mod peft;
mod registry;
pub mod watch;
#[cfg(test)]
mod tests;

pub use registry::{
    AdapterEvent, AdapterInfo, AdapterObserver, AdapterOutcome, AdapterRegistry, LoadOptions, RetiredInfo,
};

use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::lora::{LoraHandle, LoraPrecision, LoraSource, LoraWeights};

/// The hash `tunegate.json` records for a distilled system prompt (and for training data):
/// hex SHA-256 of the text. Training writes it, the router compares requests against it.
pub fn prompt_hash(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Limits on what the registry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterLimits {
    pub max_loaded: usize,
    pub max_rank: usize,
    pub max_bytes: usize,
    /// How loaded adapters are held for serving.
    pub precision: LoraPrecision,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self { max_loaded: 64, max_rank: 64, max_bytes: 1 << 30, precision: LoraPrecision::F16 }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum AdapterError {
    #[error("adapter '{0}' is not loaded")]
    NotFound(String),
    #[error("adapter '{alias}' is already loaded (generation {generation}); pass load_inplace to replace it")]
    AlreadyLoaded { alias: String, generation: u64 },
    #[error("adapter '{alias}': expected generation {expected:?} but the current one is {actual:?}")]
    GenerationMismatch { alias: String, expected: Option<u64>, actual: Option<u64> },
    #[error("adapter '{0}' is being loaded by another request; retry shortly")]
    Busy(String),
    #[error("invalid adapter: {0}")]
    Invalid(String),
    #[error("adapter limit reached: {0}")]
    Limit(String),
    #[error("could not read the adapter: {0}")]
    Io(String),
    #[error("the model is still loading")]
    NotReady,
}

/// One loaded, immutable version of an alias. Requests hold it through an
/// [`AdapterLease`]; it is freed when the registry has moved on and the last lease ends.
#[derive(Debug)]
pub struct AdapterGeneration {
    pub alias: String,
    pub generation: u64,
    pub path: PathBuf,
    pub rank: usize,
    pub alpha: f32,
    pub scale: f32,
    pub target_modules: Vec<String>,
    pub bytes: usize,
    pub loaded_at: std::time::SystemTime,
    pub load_seconds: f64,
    /// `tunegate.json` beside the adapter, when present (training provenance, distilled
    /// prompt hash).
    pub meta: Option<serde_json::Value>,
    pub weights: LoraWeights,
}

/// A request's hold on one generation.
pub type AdapterLease = Arc<AdapterGeneration>;

impl LoraSource for AdapterGeneration {
    fn weights(&self) -> &LoraWeights {
        &self.weights
    }

    fn generation(&self) -> u64 {
        self.generation
    }
}

/// The engine's view of a lease: the same allocation, so the generation stays alive (and
/// counted by the registry's retired list) for as long as the engine holds it.
pub fn lora_handle(lease: &AdapterLease) -> LoraHandle {
    lease.clone()
}
