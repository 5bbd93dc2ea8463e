//! Wire types of the adapter admin routes, compatible with vLLM's `/v1/load_lora_adapter`
//! and `/v1/unload_lora_adapter` (plus `expected_generation` for compare-and-swap).

use serde::{Deserialize, Serialize};

use crate::adapters::{AdapterInfo, RetiredInfo};

#[derive(Debug, Clone, Deserialize)]
pub struct LoadLoraRequest {
    pub lora_name: String,
    /// Relative to the adapters root, or absolute inside it.
    pub lora_path: String,
    /// Replace the alias if it is loaded (vLLM's flag).
    pub load_inplace: Option<bool>,
    /// Compare-and-swap: the generation the caller believes is current; 0 = not loaded.
    pub expected_generation: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UnloadLoraRequest {
    pub lora_name: String,
    pub expected_generation: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterObject {
    pub object: &'static str,
    #[serde(flatten)]
    pub info: AdapterInfo,
}

impl From<AdapterInfo> for AdapterObject {
    fn from(info: AdapterInfo) -> Self {
        Self { object: "lora_adapter", info }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterList {
    pub object: &'static str,
    pub data: Vec<AdapterObject>,
    /// Replaced or unloaded generations that running requests still hold.
    pub retired: Vec<RetiredInfo>,
}
