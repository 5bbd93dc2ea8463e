//! Entry points for the coverage-guided fuzz targets under `fuzz/` (cargo-fuzz / libFuzzer)
//! and for the test that replays their committed corpora on every test run
//! (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and must return, whatever they are:
//! an error is an expected outcome, a panic, hang or crash is a finding. Where an input
//! decides a security property, the target asserts it (a forged chat turn is a panic here).
//! Nothing in the gateway calls this module.

use crate::adapters::AdapterLimits;
use crate::api::openai::convert;
use crate::api::openai::types::{ChatCompletionRequest, CompletionRequest};
use crate::config::LimitsConfig;
use crate::engine::{ChatMessage, ChatTemplate, ModelShape, Tokenizer};

/// What the targets share, built once per fuzzing process: the tiny vocabulary's tokenizer
/// and chat template (SmolLM2's), and a tiny model shape for adapters.
pub struct Harness {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    shape: ModelShape,
    limits: LimitsConfig,
    dir: tempfile_dir::Dir,
}

/// A scratch folder for targets that must go through files (adapters, the spool).
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new() -> std::io::Result<Self> {
            let p = std::env::temp_dir().join(format!("tunegate-fuzz-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&p)?;
            Ok(Self(p))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Harness {
    pub fn new() -> anyhow::Result<Self> {
        let md = crate::engine::tokenizer::tiny_gguf_vocab().gguf_metadata();
        let tokenizer = Tokenizer::from_gguf(&md)?;
        let template = ChatTemplate::from_gguf(&md, tokenizer.bos_token(), tokenizer.eos_token())?
            .ok_or_else(|| anyhow::anyhow!("the tiny vocabulary has no chat template"))?;
        let shape = crate::testing::TinySpec::llama(tokenizer.vocab_size()).shape();
        Ok(Self { tokenizer, template, shape, limits: LimitsConfig::default(), dir: tempfile_dir::Dir::new()? })
    }

    /// Request JSON → the engine request: the body parser, the OpenAI → engine conversion,
    /// chat-template rendering and tokenization, for both chat and legacy completions.
    pub fn request(&self, data: &[u8]) {
        if let Ok(req) = crate::api::json::parse::<ChatCompletionRequest>(data) {
            if let Ok(plan) = convert::chat(&req, &self.limits) {
                self.check_turns(&plan.messages);
            }
        }
        if let Ok(req) = crate::api::json::parse::<CompletionRequest>(data) {
            if let Ok(plan) = convert::completion(&req, &self.limits) {
                for p in plan.prompts {
                    if let crate::engine::Prompt::Text(t) = p {
                        let _ = self.tokenizer.encode(&t, true);
                    }
                }
            }
        }
    }

    /// Chat-template rendering with hostile content: bytes become messages (split on 0xFF,
    /// roles from the first byte of each), which must render into exactly the turns the
    /// template writes, whatever special tokens the contents spell.
    pub fn chat_template(&self, data: &[u8]) {
        const ROLES: [&str; 4] = ["system", "user", "assistant", "user"];
        let messages: Vec<ChatMessage> = data
            .split(|&b| b == 0xFF)
            .take(16)
            .map(|part| {
                let role = ROLES[usize::from(part.first().copied().unwrap_or(0)) % ROLES.len()];
                ChatMessage::new(role, String::from_utf8_lossy(part.get(1..).unwrap_or_default()))
            })
            .collect();
        self.check_turns(&messages);
    }

    /// Renders and tokenizes `messages`; the prompt must hold exactly as many turn markers
    /// as the template itself writes for that many messages.
    fn check_turns(&self, messages: &[ChatMessage]) {
        let Ok(ids) = crate::engine::chat_tokens(&self.tokenizer, &self.template, messages) else { return };
        let neutral: Vec<ChatMessage> = messages.iter().map(|m| ChatMessage::new(m.role.clone(), "x")).collect();
        let Ok(reference) = self.template.render(&neutral, true).and_then(|t| self.tokenizer.encode(&t, true)) else {
            return;
        };
        for special in ["<|im_start|>", "<|im_end|>"] {
            let Some(id) = self.tokenizer.token_to_id(special) else { continue };
            let count = |v: &[u32]| v.iter().filter(|&&t| t == id).count();
            assert_eq!(count(&ids), count(&reference), "message content forged a {special} token");
        }
    }

    /// GGUF metadata: candle's reader, then the tokenizer and chat template built from it.
    pub fn gguf(&self, data: &[u8]) {
        let mut cursor = std::io::Cursor::new(data);
        let Ok(content) = candle_core::quantized::gguf_file::Content::read(&mut cursor) else { return };
        if let Ok(tok) = Tokenizer::from_gguf(&content.metadata) {
            if let Ok(Some(t)) = ChatTemplate::from_gguf(&content.metadata, tok.bos_token(), tok.eos_token()) {
                let _ = t.render(&[ChatMessage::new("user", "hi")], true);
            }
            let _ = tok.encode("hello <|im_start|> world", true);
        }
    }

    /// A PEFT adapter folder: the first byte picks whether the rest is `adapter_config.json`
    /// (with valid weights) or `adapter_model.safetensors` (with a valid config).
    pub fn peft_adapter(&self, data: &[u8]) {
        let Some((&pick, rest)) = data.split_first() else { return };
        let dir = self.dir.0.join("adapter");
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        let lora = crate::testing::TinyLora::random(&self.shape, 2, &[crate::engine::lora::Proj::Q], 1);
        if lora.write_peft(&dir, &self.shape).is_err() {
            return;
        }
        let file = if pick % 2 == 0 { "adapter_config.json" } else { "adapter_model.safetensors" };
        if std::fs::write(dir.join(file), rest).is_err() {
            return;
        }
        let _ = crate::adapters::peft::load_adapter(&dir, &self.shape, &AdapterLimits::default());
    }

    /// Fine-tuning JSONL as uploaded to `/v1/files`.
    pub fn jsonl(&self, data: &[u8]) {
        if let Ok(examples) = crate::training::files::parse_jsonl(data) {
            assert!(!examples.is_empty());
        }
    }

    /// Log spool replay: the bytes as a spool file, read back as the writer's replay does.
    pub fn spool(&self, data: &[u8]) {
        let path = self.dir.0.join("spool.jsonl");
        if std::fs::write(&path, data).is_err() {
            return;
        }
        let stats = crate::logs::WriterStats::default();
        let mut records = 0usize;
        let _ = crate::logs::read_spool(&path, 16, &stats, &mut |chunk| {
            records += chunk.len();
            true
        });
        let lines = data.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).count();
        let corrupt = stats.spool_corrupt_lines.load(std::sync::atomic::Ordering::Relaxed) as usize;
        let _ = std::fs::remove_file(self.dir.0.join("spool.jsonl.corrupt"));
        assert_eq!(records + corrupt, lines, "every spool line is replayed or kept aside");
    }
}
