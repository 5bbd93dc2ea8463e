//! Picks the reader for a model path (GGUF file or Hugging Face folder) and builds the
//! model, tokenizer and chat template together.

use std::path::Path;

use super::gguf::GgufFile;
use super::hf::SafetensorsDir;
use super::{ChatTemplate, EngineError, Model, Result, Tokenizer};

pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub file_bytes: u64,
}

/// Loads the model at `path`. `positions`: the most positions it will run (the engine's
/// context length), which sizes the RoPE tables; `None`: the model's own limit.
pub fn load(path: &Path, name: &str, positions: Option<usize>) -> Result<Loaded> {
    if !path.exists() {
        return Err(EngineError::Load(format!(
            "{} does not exist (run `tunegate model fetch` for the default model)",
            path.display()
        )));
    }
    if path.is_dir() {
        let mut src = SafetensorsDir::open(path)?;
        let (tokenizer, template_src) = Tokenizer::from_hf_dir(path)?;
        let chat_template = template_src
            .map(|t| ChatTemplate::new(&t, tokenizer.bos_token(), tokenizer.eos_token()))
            .transpose()?;
        let cfg = limited(src.config.clone(), positions);
        let arch = src.architecture.clone();
        let model = Model::new(cfg, &mut src, &arch, name, false)?;
        let file_bytes = dir_bytes(path);
        return Ok(Loaded { model, tokenizer, chat_template, file_bytes });
    }
    let mut f = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(f.metadata())?;
    let (bos, eos) = (tokenizer.bos_token(), tokenizer.eos_token());
    let chat_template = match ChatTemplate::from_gguf(f.metadata(), bos, eos)? {
        Some(t) => Some(t),
        None => ChatTemplate::builtin(&f.architecture, bos, eos)?,
    };
    let cfg = limited(f.config()?, positions);
    let arch = f.architecture.clone();
    let interleaved = f.rope_interleaved();
    let model = Model::new(cfg, &mut f, &arch, name, interleaved)?;
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(Loaded { model, tokenizer, chat_template, file_bytes })
}

/// Gives the memory freed while loading back to the operating system. Loading allocates
/// and frees a lot (each tensor's file bytes before its typed copy, the tokenizer's
/// construction: about 85 MiB for Gemma 3's 262k-token vocabulary); glibc keeps freed memory
/// inside its heaps, where it would stay resident for the life of the server.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only hands free pages of the allocator's own heaps back to the
    // kernel; no live allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The model's position limit cut to `positions` (a 32,768-position model served with an
/// 8,192 context holds RoPE tables for 8,192).
fn limited(mut cfg: super::model::Config, positions: Option<usize>) -> super::model::Config {
    if let Some(p) = positions {
        cfg.max_position_embeddings = cfg.max_position_embeddings.min(p.max(2));
    }
    cfg
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

impl Loaded {
    /// The model and its [`ModelInfo`] (prompts up to `context_length`, capped by the
    /// model's own limit; `None`: the model's limit).
    pub fn into_model_info(self, name: &str, context_length: Option<usize>) -> (Model, super::ModelInfo) {
        let limit = self.model.max_positions();
        let context_length = context_length.map_or(limit, |c| c.min(limit).max(2));
        let info = super::ModelInfo {
            name: name.to_string(),
            architecture: self.model.shape.architecture.clone(),
            context_length,
            shape: self.model.shape.clone(),
            tokenizer: self.tokenizer,
            chat_template: self.chat_template,
            file_bytes: self.file_bytes,
            grammars: Default::default(),
        };
        (self.model, info)
    }
}
