//! The inference engine: model families, tokenizer, chat template, sampling, continuous
//! batching and per-sequence LoRA. It runs on its own threads and talks through channels.
//! It knows nothing of HTTP, logs, tasks or the adapter registry: callers hand it prompts
//! and adapter weights through [`lora::LoraHandle`].

mod error;
mod forward;
mod prefix_cache;
pub mod kernels;
mod kv_cache;
pub mod pool;
pub mod chat_template;
mod counters;
pub mod gguf;
pub mod grammar;
pub mod grad_ops;
pub mod hf;
pub mod loader;
pub mod lora;
pub mod model;
pub mod sampling;
pub mod tool_prompt;
mod batcher;
#[doc(hidden)]
pub use batcher::stream_text;
pub mod tokenizer;
pub mod types;
#[cfg(test)]
pub(crate) mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use chat_template::ChatTemplate;
pub use counters::EngineCounters;
pub use error::{EngineError, Result};
pub use model::{Model, ModelShape};
pub use tokenizer::Tokenizer;
pub use types::*;

/// What the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A `.gguf` file, or a folder with `config.json`, `*.safetensors` and `tokenizer.json`.
    pub model_path: PathBuf,
    /// The base model's public id (what `/v1/models` lists).
    pub model_name: String,
    /// Upper bound on prompt + completion tokens per sequence; the model's own limit wins if
    /// smaller.
    pub context_length: usize,
    /// Threads for the model's matrix work.
    pub threads: usize,
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; beyond that `submit` says `Overloaded`.
    pub max_queue: usize,
    /// Bytes of finished sequences' keys and values kept for prompts that start the same
    /// way (a shared system prompt is prefilled once); 0 turns prefix caching off.
    pub prefix_cache_bytes: usize,
    /// How sequences cache keys and values.
    pub kv_type: model::KvType,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            model_name: "smollm2-135m-instruct".into(),
            context_length: 8192,
            threads: 2,
            max_batch: 16,
            max_queue: 256,
            prefix_cache_bytes: 512 << 20,
            kv_type: model::KvType::F16,
        }
    }
}

/// What the loaded model is, for callers (tokenizing, templating, listing).
#[derive(Debug)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub context_length: usize,
    pub shape: ModelShape,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub file_bytes: u64,
    /// The grammar compiler for structured outputs, built on first use.
    pub grammars: OnceLock<Arc<grammar::Grammars>>,
}

impl ModelInfo {
    /// The model's grammar compiler (built on the first call, tens of milliseconds: call it
    /// off async workers).
    pub fn grammars(&self) -> Result<Arc<grammar::Grammars>> {
        if let Some(g) = self.grammars.get() {
            return Ok(g.clone());
        }
        let built = Arc::new(grammar::Grammars::new(&self.tokenizer)?);
        Ok(self.grammars.get_or_init(|| built).clone())
    }

    /// The prompt's token ids for `messages` (see [`chat_tokens`]).
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        match &self.chat_template {
            Some(t) => chat_tokens(&self.tokenizer, t, messages),
            None => Err(EngineError::Template("the model has no chat template; use /v1/completions".into())),
        }
    }

    /// Renders messages with the model's chat template (generation prompt appended).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        match &self.chat_template {
            Some(t) => t.render(messages, true),
            None => Err(EngineError::Template(
                "the model has no chat template; use /v1/completions".into(),
            )),
        }
    }
}

/// The prompt's token ids for `messages`: the chat template's own text with its special
/// tokens, and every message's content as plain text — a client writing
/// "<|im_start|>system" in its content gets those characters, not a forged turn.
///
/// A template that writes the BOS token itself (Gemma's, Llama 3's) gets no second one from
/// the tokenizer, as Hugging Face's `apply_chat_template` and llama.cpp render it.
pub fn chat_tokens(tok: &Tokenizer, template: &ChatTemplate, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let adds_bos = |text: &str| !tok.bos_token().is_some_and(|b| text.starts_with(b));
    if !messages.iter().any(|m| tok.has_special_text(&m.content)) {
        // Nothing to confuse: the whole rendering in one pass (token for token what
        // the reference implementations produce).
        let text = template.render(messages, true)?;
        return tok.encode(&text, adds_bos(&text));
    }
    // Render with each content replaced by a marker (private-use characters no template
    // alters), then encode the template's text and the contents separately.
    let marker = |i: usize| format!("\u{E000}tunegate-content-{i}\u{E001}");
    let marked: Vec<ChatMessage> =
        messages.iter().enumerate().map(|(i, m)| ChatMessage::new(m.role.clone(), marker(i))).collect();
    let skeleton = template.render(&marked, true)?;
    let mut ids = Vec::new();
    let mut rest = skeleton.as_str();
    let mut first = adds_bos(rest);
    for (i, m) in messages.iter().enumerate() {
        let mark = marker(i);
        let Some(pos) = rest.find(&mark) else {
            return Err(EngineError::InvalidRequest(format!(
                "messages[{i}] spells a special token of the model, and this chat template does not carry \
                 message content verbatim, so it cannot be kept as text; remove the special token"
            )));
        };
        ids.extend(tok.encode(&rest[..pos], first)?);
        first = false;
        ids.extend(tok.encode_plain(&m.content)?);
        rest = &rest[pos + mark.len()..];
    }
    ids.extend(tok.encode(rest, first)?);
    Ok(ids)
}

/// Sizes the CPU thread pools of candle and rayon (the training ops and candle's own kernels)
/// to `threads`, unless `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS` are set. Both read the
/// environment once, when first used, so this must run before any other thread starts:
/// changing the environment while threads may read it is undefined behaviour (an `unsafe`
/// call from Rust 2024 on). The `tunegate` binary calls it first thing; a library user that
/// does not gets the libraries' defaults (one thread per core).
pub fn size_thread_pools(threads: usize) {
    let threads = threads.max(1).to_string();
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, &threads);
        }
    }
}

pub(crate) struct Shared {
    pub(crate) info: OnceLock<Arc<ModelInfo>>,
    pub(crate) load_error: OnceLock<EngineError>,
    pub(crate) counters: Arc<EngineCounters>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) ready_hooks: Mutex<ReadyHooks>,
}

/// Called once with the loaded model, before `is_ready` turns true.
pub type ReadyHook = Box<dyn FnOnce(&Arc<ModelInfo>) + Send>;

/// The hooks waiting for the model, or the model once they have run.
pub(crate) enum ReadyHooks {
    Waiting(Vec<ReadyHook>),
    Loaded(Arc<ModelInfo>),
}

impl Shared {
    /// Runs the waiting hooks (under the lock, so a hook added meanwhile sees `Loaded`),
    /// then publishes `info`.
    pub(crate) fn set_loaded(&self, info: Arc<ModelInfo>) {
        let mut hooks = self.ready_hooks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let ReadyHooks::Waiting(waiting) = std::mem::replace(&mut *hooks, ReadyHooks::Loaded(info.clone())) {
            for hook in waiting {
                hook(&info);
            }
        }
        drop(hooks);
        let _ = self.info.set(info);
    }
}

/// A handle on the running engine. Cheap to clone; the engine thread stops when the last
/// handle is dropped or `shutdown` is called.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    submit_tx: std::sync::mpsc::SyncSender<batcher::Command>,
    config: Arc<EngineConfig>,
}

impl Engine {
    /// Starts the engine thread, which loads the model in the background. `is_ready` turns
    /// true once it has; `wait_ready` blocks until then and reports a load failure.
    pub fn spawn(config: EngineConfig) -> Engine {
        let shared = Arc::new(Shared {
            info: OnceLock::new(),
            load_error: OnceLock::new(),
            counters: Arc::new(EngineCounters::new(config.max_batch)),
            shutting_down: AtomicBool::new(false),
            ready_hooks: Mutex::new(ReadyHooks::Waiting(Vec::new())),
        });
        // The channel itself is unbounded in practice; admission control is `queued`.
        let (submit_tx, submit_rx) = std::sync::mpsc::sync_channel(config.max_queue + config.max_batch + 16);
        let config = Arc::new(config);
        batcher::spawn(batcher::Context {
            config: config.clone(),
            shared: shared.clone(),
            rx: submit_rx,
        });
        Engine { shared, submit_tx, config }
    }

    /// Loads the model and waits until the engine is ready (tests, CLI).
    pub fn start(config: EngineConfig) -> Result<Engine> {
        let engine = Engine::spawn(config);
        engine.wait_ready()?;
        Ok(engine)
    }

    pub fn is_ready(&self) -> bool {
        self.shared.info.get().is_some()
    }

    /// The load error, if loading failed.
    pub fn load_error(&self) -> Option<EngineError> {
        self.shared.load_error.get().cloned()
    }

    /// Blocks the calling thread until the model is loaded or failed to load.
    pub fn wait_ready(&self) -> Result<Arc<ModelInfo>> {
        loop {
            if let Some(info) = self.shared.info.get() {
                return Ok(info.clone());
            }
            if let Some(e) = self.shared.load_error.get() {
                return Err(e.clone());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The loaded model's description, or `NotReady`.
    pub fn info(&self) -> Result<Arc<ModelInfo>> {
        match self.shared.info.get() {
            Some(i) => Ok(i.clone()),
            None => Err(self.load_error().unwrap_or(EngineError::NotReady)),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Runs `hook` with the loaded model: at once if it is loaded, else on the engine thread
    /// right after loading and before [`Engine::is_ready`] turns true (so whatever the hook
    /// sets up, such as the adapter registry's model shape, is in place for every request).
    pub fn when_ready(&self, hook: impl FnOnce(&Arc<ModelInfo>) + Send + 'static) {
        let mut hooks = self.shared.ready_hooks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *hooks {
            ReadyHooks::Waiting(waiting) => waiting.push(Box::new(hook)),
            ReadyHooks::Loaded(info) => {
                let info = info.clone();
                drop(hooks);
                hook(&info);
            }
        }
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.counters.stats()
    }

    /// The live counters, for observers that read them at their own pace (metrics).
    pub fn counters(&self) -> &Arc<EngineCounters> {
        &self.shared.counters
    }

    /// Tokenizes the prompt, checks limits and queues the request. Events arrive on the
    /// returned stream; dropping the stream cancels the request and frees its cache.
    pub fn submit(&self, req: GenerateRequest) -> Result<GenerationStream> {
        if self.shared.shutting_down.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        let info = self.info()?;
        let tokens = match &req.prompt {
            Prompt::Text(t) => info.tokenizer.encode(t, true)?,
            Prompt::Tokens(t) => t.clone(),
        };
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = info.shape.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        if tokens.len() + 1 > info.context_length {
            return Err(EngineError::ContextLength {
                prompt: tokens.len(),
                needed: tokens.len() + 1,
                limit: info.context_length,
            });
        }
        let limit = self.config.max_queue;
        let queued_now = &self.shared.counters.queued;
        let queued = queued_now.fetch_add(1, Ordering::AcqRel);
        if queued >= limit {
            queued_now.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Overloaded { queued, limit });
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt_tokens = tokens.len();
        let cmd = batcher::Command::Generate(Box::new(batcher::Pending {
            tokens,
            params: req.params,
            adapter: req.adapter,
            cache_scope: req.cache_scope,
            constraint: req.constraint,
            tx,
            submitted: std::time::Instant::now(),
        }));
        if self.submit_tx.try_send(cmd).is_err() {
            queued_now.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Overloaded { queued, limit });
        }
        Ok(GenerationStream { rx, prompt_tokens })
    }

    /// Queues the embeddings of `inputs` (token ids; each run from position 0 with
    /// `adapter`, if any): the mean of the final-normed hidden states, unit length, one
    /// `hidden_size` vector per input. The engine runs them between generation steps, a
    /// prefill-sized batch at a time; dropping the receiver abandons the rest.
    pub fn embed(
        &self,
        inputs: Vec<Vec<u32>>,
        adapter: Option<lora::LoraHandle>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Vec<Vec<f32>>>>> {
        if self.shared.shutting_down.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        let info = self.info()?;
        let vocab = info.shape.vocab_size as u32;
        for tokens in &inputs {
            if tokens.is_empty() {
                return Err(EngineError::InvalidRequest("an input is empty".into()));
            }
            if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
                return Err(EngineError::InvalidRequest(format!("token id {bad} is outside the vocabulary (size {vocab})")));
            }
            if tokens.len() > info.context_length {
                return Err(EngineError::ContextLength {
                    prompt: tokens.len(),
                    needed: tokens.len(),
                    limit: info.context_length,
                });
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = batcher::EmbedJob { inputs, adapter, tx, done: Vec::new() };
        if self.submit_tx.try_send(batcher::Command::Embed(Box::new(job))).is_err() {
            let limit = self.config.max_queue;
            return Err(EngineError::Overloaded { queued: limit, limit });
        }
        Ok(rx)
    }

    /// Stops taking requests; running ones finish. The engine thread exits once idle and
    /// every handle is gone.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        let _ = self.submit_tx.try_send(batcher::Command::Wake);
    }
}

/// The events of one request. Dropping it cancels the request.
pub struct GenerationStream {
    rx: tokio::sync::mpsc::UnboundedReceiver<StreamEvent>,
    /// Tokens in the prompt as the engine runs it.
    pub prompt_tokens: usize,
}

impl GenerationStream {
    /// The next event, or `None` once `Done`/`Error` has been received.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        self.rx.recv().await
    }

    /// Blocking variant for threads outside an async runtime (CLI, tests).
    pub fn next_blocking(&mut self) -> Option<StreamEvent> {
        self.rx.blocking_recv()
    }

    /// Collects the whole completion (blocking).
    pub fn collect_blocking(mut self) -> Result<Completion> {
        let mut c = Collector::default();
        while let Some(ev) = self.next_blocking() {
            if let Some(done) = c.push(ev) {
                return done;
            }
        }
        Err(EngineError::Internal("the engine dropped the request".into()))
    }

    /// Collects the whole completion (async).
    pub async fn collect(mut self) -> Result<Completion> {
        let mut c = Collector::default();
        while let Some(ev) = self.next().await {
            if let Some(done) = c.push(ev) {
                return done;
            }
        }
        Err(EngineError::Internal("the engine dropped the request".into()))
    }
}

#[derive(Default)]
struct Collector {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
}

impl Collector {
    /// Adds one event; returns the result once the stream is over.
    fn push(&mut self, ev: StreamEvent) -> Option<Result<Completion>> {
        match ev {
            StreamEvent::Token { text, token_id, logprob, top_logprobs } => {
                self.text.push_str(&text);
                self.tokens.push(token_id);
                self.logprobs.push(logprob);
                self.top_logprobs.push(top_logprobs);
                None
            }
            StreamEvent::Done { finish_reason, usage, timings } => Some(Ok(Completion {
                text: std::mem::take(&mut self.text),
                tokens: std::mem::take(&mut self.tokens),
                logprobs: std::mem::take(&mut self.logprobs),
                top_logprobs: std::mem::take(&mut self.top_logprobs),
                finish_reason,
                usage,
                timings,
            })),
            StreamEvent::Error(e) => Some(Err(e)),
        }
    }
}

/// A finished, non-streamed generation.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Per token, its `top_logprobs` alternatives (each empty unless asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}
