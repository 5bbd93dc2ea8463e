//! The engine thread: loads the model, then runs the continuous-batching loop. Requests
//! join the running batch between steps; each step feeds prompt chunks of new sequences
//! and one token of every decoding sequence through one ragged forward pass. A sequence
//! whose caller went away is dropped (and its cache freed) before the next step.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::grammar::Constraint;
use super::lora::{BatchLora, LoraHandle};
use super::model::{KvCache, SeqBatch};
use super::prefix_cache::PrefixCache;
use super::sampling::Sampler;
use super::{
    loader, EngineConfig, EngineError, FinishReason, Model, ModelInfo, Result, SamplingParams, Shared, StreamEvent,
    Timings, Tokenizer, Usage,
};

/// Most prompt tokens fed in one step across all prefilling sequences, so a long prompt
/// arriving does not stall running streams for its whole prefill.
const PREFILL_TOKENS_PER_STEP: usize = 512;

pub(crate) enum Command {
    Generate(Box<Pending>),
    Embed(Box<EmbedJob>),
    Wake,
}

/// The embeddings of one request's inputs (token ids, each from position 0), answered once
/// all are computed.
pub(crate) struct EmbedJob {
    pub inputs: Vec<Vec<u32>>,
    pub adapter: Option<LoraHandle>,
    pub tx: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>>>,
    /// Embeddings computed so far, in input order.
    pub done: Vec<Vec<f32>>,
}

pub(crate) struct Pending {
    pub tokens: Vec<u32>,
    pub params: SamplingParams,
    pub adapter: Option<LoraHandle>,
    pub cache_scope: u64,
    pub constraint: Option<Constraint>,
    pub tx: UnboundedSender<StreamEvent>,
    pub submitted: Instant,
}

pub(crate) struct Context {
    pub config: Arc<EngineConfig>,
    pub shared: Arc<Shared>,
    pub rx: Receiver<Command>,
}

pub(crate) fn spawn(ctx: Context) {
    // The kernel pool is process-wide: a second engine with another size shares the first
    // one's (said, not silently). candle's and rayon's pools are sized at process start
    // (`engine::size_thread_pools`), never from here: the environment must not change while
    // other threads may read it.
    let pool = super::pool::init(ctx.config.threads);
    if pool.threads() != ctx.config.threads.max(1) {
        tracing::warn!(
            requested = ctx.config.threads,
            running = pool.threads(),
            "the process already runs a kernel pool of another size; this engine shares it"
        );
    }
    let spawned = std::thread::Builder::new().name("tunegate-engine".into()).spawn(move || run(ctx));
    if let Err(e) = spawned {
        tracing::error!("could not start the engine thread: {e}");
    }
}

fn fail_load(ctx: &Context, e: EngineError) {
    tracing::error!("{e}");
    let _ = ctx.shared.load_error.set(e.clone());
    // Answer anything already queued, then keep answering until every handle is gone.
    while let Ok(cmd) = ctx.rx.recv() {
        match cmd {
            Command::Generate(p) => {
                ctx.shared.counters.queued.fetch_sub(1, Ordering::AcqRel);
                let _ = p.tx.send(StreamEvent::Error(e.clone()));
            }
            Command::Embed(job) => {
                let _ = job.tx.send(Err(e.clone()));
            }
            Command::Wake => {}
        }
    }
}

fn run(ctx: Context) {
    let started = Instant::now();
    let loaded = match loader::load(&ctx.config.model_path, &ctx.config.model_name, Some(ctx.config.context_length)) {
        Ok(l) => l,
        Err(e) => return fail_load(&ctx, e),
    };
    let (mut model, info) = loaded.into_model_info(&ctx.config.model_name, Some(ctx.config.context_length));
    loader::release_freed_memory();
    model.kv_type = ctx.config.kv_type;
    let context_length = info.context_length;
    let info = Arc::new(info);
    tracing::info!(
        model = %ctx.config.model_path.display(),
        arch = %info.architecture,
        layers = model.shape.num_layers,
        context_length,
        weight_mib = model.weight_bytes() / (1 << 20),
        "model loaded in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    ctx.shared.set_loaded(info.clone());
    let prefix_cache = PrefixCache::new(ctx.config.prefix_cache_bytes);
    Loop {
        ctx: &ctx,
        model: &model,
        info: &info,
        waiting: VecDeque::new(),
        running: Vec::new(),
        embeds: VecDeque::new(),
        prefix_cache,
        next_id: 0,
    }
    .run();
}

struct Loop<'a> {
    ctx: &'a Context,
    model: &'a Model,
    info: &'a ModelInfo,
    waiting: VecDeque<Box<Pending>>,
    running: Vec<Sequence>,
    /// Embedding requests, run a chunk per step between the generation steps.
    embeds: VecDeque<Box<EmbedJob>>,
    prefix_cache: PrefixCache,
    /// The last sequence id given out.
    next_id: u64,
}

impl Loop<'_> {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() && self.embeds.is_empty() {
                match self.ctx.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(cmd) => self.take(cmd),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(cmd) = self.ctx.rx.try_recv() {
                self.take(cmd);
            }
            self.admit();
            self.running.retain(|s| !s.tx.is_closed());
            if !self.running.is_empty() {
                self.step();
                self.retire();
            }
            self.embed_step();
            let kv_cache_bytes =
                self.running.iter().map(|s| s.cache.bytes()).sum::<usize>() + self.prefix_cache.bytes();
            self.ctx.shared.counters.set_running(self.running.len(), kv_cache_bytes);
        }
    }

    fn take(&mut self, cmd: Command) {
        match cmd {
            Command::Generate(p) => self.waiting.push_back(p),
            Command::Embed(job) => self.embeds.push_back(job),
            Command::Wake => {}
        }
    }

    /// Runs the next inputs of the first embedding request, up to the step's prompt-token
    /// budget (at least one input), as one ragged batch; answers the request when its last
    /// input is done. A request whose caller went away is dropped.
    fn embed_step(&mut self) {
        while self.embeds.front().is_some_and(|j| j.tx.is_closed()) {
            self.embeds.pop_front();
        }
        let Some(job) = self.embeds.front_mut() else { return };
        let start = job.done.len();
        let mut end = start;
        let mut tokens = 0;
        while end < job.inputs.len() && (end == start || tokens + job.inputs[end].len() <= PREFILL_TOKENS_PER_STEP) {
            tokens += job.inputs[end].len();
            end += 1;
        }
        let layers = self.model.shape.num_layers;
        let model = self.model;
        let run = || -> Result<Vec<f32>> {
            let mut caches: Vec<KvCache> = (start..end).map(|_| KvCache::new(layers)).collect();
            let mut batch: Vec<SeqBatch<'_>> = job.inputs[start..end]
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, cache)| SeqBatch { tokens: t, cache })
                .collect();
            let weights = job.adapter.as_deref().map(|a| a.weights());
            let adapters: Vec<_> = job.inputs[start..end].iter().map(|t| (t.len(), weights)).collect();
            let lora = BatchLora::new(&adapters)?;
            model.embed(&mut batch, &lora)
        };
        let result = match std::panic::catch_unwind(AssertUnwindSafe(run)) {
            Ok(r) => r,
            Err(_) => Err(EngineError::Internal("the embedding pass panicked".into())),
        };
        match result {
            Ok(flat) => {
                let hidden = self.model.shape.hidden_size;
                job.done.extend(flat.chunks_exact(hidden).map(<[f32]>::to_vec));
                if job.done.len() == job.inputs.len() {
                    if let Some(job) = self.embeds.pop_front() {
                        let job = *job;
                        let _ = job.tx.send(Ok(job.done));
                    }
                }
            }
            Err(e) => {
                tracing::error!("embedding pass failed: {e}");
                if let Some(job) = self.embeds.pop_front() {
                    let _ = job.tx.send(Err(e));
                }
            }
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.ctx.config.max_batch.max(1) {
            let Some(p) = self.waiting.pop_front() else { break };
            self.ctx.shared.counters.queued.fetch_sub(1, Ordering::AcqRel);
            if p.tx.is_closed() {
                continue;
            }
            self.next_id += 1;
            let mut seq = Sequence::new(*p, self.model.shape.num_layers, self.next_id);
            // Room for the whole request up front: decode steps then never reallocate.
            let need = seq.prompt_len.saturating_add(seq.params.max_tokens).min(self.info.context_length);
            seq.cache.reserve(need);
            if seq.params.max_tokens == 0 {
                seq.finish(FinishReason::Length);
                continue;
            }
            if let Some(hit) = self.prefix_cache.lookup(seq.cache_key(), &seq.tokens) {
                if self.prefix_cache.fill(&hit, &mut seq.cache) {
                    seq.cached_tokens = hit.tokens;
                }
            }
            self.share_prefill(&mut seq);
            self.running.push(seq);
        }
    }

    /// A new sequence whose prompt a running one has (or is prefilling): copy its keys and
    /// values now, or wait for its prefill (`follows`). All but the last prompt position are
    /// shared; the last is run by each sequence itself for its own first logits.
    fn share_prefill(&mut self, seq: &mut Sequence) {
        let shared = seq.prompt_len.saturating_sub(1);
        if shared <= seq.cached_tokens {
            return;
        }
        let twin = self.running.iter().find(|r| {
            !r.finished
                && r.follows.is_none()
                && r.prompt_len == seq.prompt_len
                && r.cache_key() == seq.cache_key()
                && r.tokens[..shared] == seq.tokens[..shared]
        });
        let Some(twin) = twin else { return };
        if twin.cache.len() >= shared {
            if seq.cache.copy_prefix(&twin.cache, shared) {
                seq.cached_tokens = shared;
            }
        } else {
            seq.follows = Some(twin.id);
        }
    }

    /// Sequences waiting for a twin's prefill: copy once it is done; prefill on their own if
    /// the twin is gone.
    fn resolve_followers(&mut self) {
        for i in 0..self.running.len() {
            let Some(id) = self.running[i].follows else { continue };
            let shared = self.running[i].prompt_len.saturating_sub(1);
            match self.running.iter().position(|r| r.id == id && !r.finished) {
                Some(j) if self.running[j].cache.len() >= shared => {
                    let (seq, twin) = if i < j {
                        let (a, b) = self.running.split_at_mut(j);
                        (&mut a[i], &b[0])
                    } else {
                        let (a, b) = self.running.split_at_mut(i);
                        (&mut b[0], &a[j])
                    };
                    if seq.cache.copy_prefix(&twin.cache, shared) {
                        seq.cached_tokens = shared;
                    }
                    seq.follows = None;
                }
                Some(_) => {}
                None => self.running[i].follows = None,
            }
        }
    }

    /// Drops finished sequences; the keys and values of those that ended normally go to the
    /// prefix cache.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if !self.running[i].finished {
                i += 1;
                continue;
            }
            let s = self.running.remove(i);
            if s.reusable {
                let key = s.cache_key();
                self.prefix_cache.insert(key, &s.tokens, s.cache);
            }
        }
    }

    /// With sliding-window layers a sequence drops its prompt's early rows as it decodes, so
    /// the cache it retires with serves only prefixes near its end. Prompts whose prefill
    /// just ended go to the prefix cache whole, for later requests that share only them (a
    /// long system prompt).
    fn keep_prompts(&mut self, plan: &[(usize, usize)]) {
        if !self.prefix_cache.enabled() || self.model.cfg.sliding_window.is_none() {
            return;
        }
        for &(i, _) in plan {
            let s = &self.running[i];
            if !s.finished && s.cache.len() == s.prompt_len && s.cache.min_prefix() == 0 {
                self.prefix_cache.insert(s.cache_key(), &s.tokens[..s.prompt_len], s.cache.clone());
            }
        }
    }

    fn step(&mut self) {
        self.resolve_followers();
        let mut budget = PREFILL_TOKENS_PER_STEP;
        // (index into running, tokens to feed this step)
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            if s.follows.is_some() {
                continue;
            }
            let pending = s.tokens.len() - s.cache.len();
            if pending == 1 {
                plan.push((i, 1));
            } else if budget > 0 {
                let n = pending.min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        if plan.is_empty() {
            return;
        }
        self.ctx.shared.counters.record_step(plan.len());
        let (result, masks_failed) = self.forward_with_masks(&plan);
        for i in masks_failed {
            let s = &mut self.running[i];
            let _ = s.tx.send(StreamEvent::Error(EngineError::Internal("the grammar panicked".into())));
            s.finished = true;
        }
        let logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return self.fail(&plan, e),
            Err(_) => return self.fail(&plan, EngineError::Internal("the forward pass panicked".into())),
        };
        self.keep_prompts(&plan);
        for (row, &(i, _)) in plan.iter().enumerate() {
            let s = &mut self.running[i];
            if s.finished || s.cache.len() < s.tokens.len() {
                continue; // failed above, or prompt not fully fed yet
            }
            let (id, logprob) = match s.constraint.as_mut() {
                None => s.sampler.sample(&logits[row]),
                Some(c) => {
                    // Sampled from the grammar's tokens; the logprob stays the model's own.
                    let mut masked = logits[row].clone();
                    let chosen = c.mask(&mut masked).map(|()| s.sampler.sample(&masked).0).and_then(|id| c.commit(id).map(|()| id));
                    match chosen {
                        Ok(id) => (id, super::sampling::log_softmax_at(&logits[row], id as usize)),
                        Err(e) => {
                            let _ = s.tx.send(StreamEvent::Error(e));
                            s.finished = true;
                            continue;
                        }
                    }
                }
            };
            let top = super::sampling::top_logprobs(&logits[row], s.params.top_logprobs);
            s.push_token(id, logprob, top, &self.info.tokenizer, self.info.context_length);
            if !s.finished && s.constraint.as_ref().is_some_and(Constraint::is_complete) {
                // The grammar is satisfied and allows nothing more: end as if at EOS.
                s.flush_and_finish(&self.info.tokenizer, id, 0.0, Vec::new());
            }
        }
    }

    /// The step's forward pass, with the masks of the constrained sequences that sample this
    /// step computed beside it on another thread (a mask depends only on the tokens before
    /// it, so a grammar never stalls the batch). Returns the forward's outcome and the
    /// sequences whose grammar panicked (their constraint is gone).
    fn forward_with_masks(&mut self, plan: &[(usize, usize)]) -> (StepOutcome, Vec<usize>) {
        let sampling = |s: &Sequence, n: usize| s.cache.len() + n == s.tokens.len();
        let mut constrained: Vec<(usize, Constraint)> = Vec::new();
        for &(i, n) in plan {
            if sampling(&self.running[i], n) {
                if let Some(c) = self.running[i].constraint.take() {
                    constrained.push((i, c));
                }
            }
        }
        if constrained.is_empty() {
            return (std::panic::catch_unwind(AssertUnwindSafe(|| self.forward(plan))), Vec::new());
        }
        let indices: Vec<usize> = constrained.iter().map(|(i, _)| *i).collect();
        let (result, prepared) = std::thread::scope(|scope| {
            let masks = scope.spawn(move || {
                constrained.iter_mut().for_each(|(_, c)| c.prepare());
                constrained
            });
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.forward(plan)));
            (result, masks.join())
        });
        match prepared {
            Ok(prepared) => {
                for (i, c) in prepared {
                    self.running[i].constraint = Some(c);
                }
                (result, Vec::new())
            }
            Err(_) => (result, indices),
        }
    }

    fn forward(&mut self, plan: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        let mut chosen: Vec<Option<usize>> = vec![None; self.running.len()];
        for &(i, n) in plan {
            chosen[i] = Some(n);
        }
        let mut batch = Vec::with_capacity(plan.len());
        let mut adapters = Vec::with_capacity(plan.len());
        for (s, n) in self.running.iter_mut().zip(&chosen) {
            let Some(n) = *n else { continue };
            let start = s.cache.len();
            adapters.push((n, s.adapter.as_deref().map(|a| a.weights())));
            batch.push(SeqBatch { tokens: &s.tokens[start..start + n], cache: &mut s.cache });
        }
        let lora = BatchLora::new(&adapters)?;
        let logits = self.model.forward(&mut batch, &lora)?;
        super::model::logits_rows(&logits)
    }

    fn fail(&mut self, plan: &[(usize, usize)], e: EngineError) {
        tracing::error!("engine step failed: {e}");
        for &(i, _) in plan {
            let s = &mut self.running[i];
            let _ = s.tx.send(StreamEvent::Error(e.clone()));
            s.finished = true;
        }
    }
}

/// A forward pass's logits, its error, or its panic.
type StepOutcome = std::thread::Result<Result<Vec<Vec<f32>>>>;

/// One request in the running batch.
struct Sequence {
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    cache: KvCache,
    sampler: Sampler,
    params: SamplingParams,
    adapter: Option<LoraHandle>,
    /// Prefix-cache partition (see [`super::GenerateRequest::cache_scope`]).
    cache_scope: u64,
    /// The grammar its output must follow, if any.
    constraint: Option<Constraint>,
    tx: UnboundedSender<StreamEvent>,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    text: TextState,
    finished: bool,
    /// Ended normally (stop or length), so its cache holds exactly its tokens.
    reusable: bool,
    /// Prompt positions taken from the prefix cache (or from a twin) instead of being run.
    cached_tokens: usize,
    /// Unique in this engine.
    id: u64,
    /// The running sequence with the same prompt (and adapter and cache scope) whose prefill
    /// this one waits for, to copy its keys and values instead of computing them again
    /// (the `n` choices of one request).
    follows: Option<u64>,
}

impl Sequence {
    fn new(p: Pending, num_layers: usize, id: u64) -> Self {
        let prompt_len = p.tokens.len();
        let mut cache = KvCache::new(num_layers);
        cache.hold(prompt_len);
        Self {
            id,
            follows: None,
            sampler: Sampler::new(&p.params),
            text: TextState::new(&p.params.stop),
            tokens: p.tokens,
            prompt_len,
            cache,
            params: p.params,
            adapter: p.adapter,
            cache_scope: p.cache_scope,
            constraint: p.constraint,
            tx: p.tx,
            submitted: p.submitted,
            admitted: Instant::now(),
            first_token: None,
            finished: false,
            reusable: false,
            cached_tokens: 0,
        }
    }

    /// What the prefix cache keys this sequence's keys and values by: the adapter generation
    /// that made them (0 = base) and the request's scope.
    fn cache_key(&self) -> (u64, u64) {
        (self.adapter.as_ref().map_or(0, |a| a.generation()), self.cache_scope)
    }

    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Ends the sequence normally (end of sequence, or a grammar that allows nothing more):
    /// text held back for a stop sequence that never completed is final now, sent with
    /// `token_id`, `logprob` and `top_logprobs`.
    fn flush_and_finish(&mut self, tok: &Tokenizer, token_id: u32, logprob: f32, top_logprobs: Vec<(u32, f32)>) {
        match self.text.flush(tok, &self.tokens[self.prompt_len..]) {
            Ok(rest) if !rest.is_empty() => {
                let _ = self.tx.send(StreamEvent::Token { text: rest, token_id, logprob, top_logprobs });
            }
            _ => {}
        }
        self.finish(FinishReason::Stop);
    }

    fn push_token(&mut self, id: u32, logprob: f32, top_logprobs: Vec<(u32, f32)>, tok: &Tokenizer, context_length: usize) {
        self.first_token.get_or_insert_with(Instant::now);
        if self.params.stop_at_eos && tok.eos_token_ids().contains(&id) {
            return self.flush_and_finish(tok, id, logprob, top_logprobs);
        }
        self.tokens.push(id);
        let generated = &self.tokens[self.prompt_len..];
        let length = generated.len() >= self.params.max_tokens || self.tokens.len() >= context_length;
        let text = &mut self.text;
        let step = text.advance(tok, generated).and_then(|(mut delta, stopped)| {
            let length = length && !stopped;
            if length {
                delta.push_str(&text.flush(tok, generated)?);
            }
            Ok((delta, stopped, length))
        });
        let (delta, stopped, length) = match step {
            Ok(x) => x,
            Err(e) => {
                let _ = self.tx.send(StreamEvent::Error(e));
                self.finished = true;
                return;
            }
        };
        if self.tx.send(StreamEvent::Token { text: delta, token_id: id, logprob, top_logprobs }).is_err() {
            self.finished = true;
            return;
        }
        if stopped {
            self.finish(FinishReason::Stop);
        } else if length {
            self.finish(FinishReason::Length);
        }
    }

    fn finish(&mut self, reason: FinishReason) {
        self.finished = true;
        self.reusable = true;
        let now = Instant::now();
        let timings = Timings {
            queued: self.admitted - self.submitted,
            time_to_first_token: self.first_token.unwrap_or(now) - self.submitted,
            total: now - self.submitted,
        };
        let usage = Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated().len(),
            cached_tokens: self.cached_tokens,
        };
        let _ = self.tx.send(StreamEvent::Done { finish_reason: reason, usage, timings });
    }
}

/// Incremental detokenisation with stop sequences: text is emitted only once it can no
/// longer turn out to be the start of a stop sequence or an incomplete UTF-8 character.
///
/// Each step decodes a short window, not the whole output: the tokens from `prefix` on,
/// against the decoding of `prefix..read`. Both start at the same token, so a tokenizer's
/// start-of-text handling (SentencePiece drops the first token's leading space) cancels and
/// the difference is exactly the new text; then the window moves on. A window whose text
/// ends in an incomplete character (U+FFFD) waits for more tokens. Stop sequences are
/// searched in the text not yet emitted. Each token is decoded a bounded number of times, so
/// the work is linear in the output's length (it was quadratic: the whole output was
/// decoded again at every token).
struct TextState {
    stop: Vec<String>,
    /// The output's text so far (complete characters only, until `flush`).
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    /// Where the decode window starts, and the tokens whose text is in `text`.
    prefix: usize,
    read: usize,
    stopped: bool,
}

impl TextState {
    fn new(stop: &[String]) -> Self {
        Self {
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
            prefix: 0,
            read: 0,
            stopped: false,
        }
    }

    /// Appends the text of tokens past `read`, when it ends in a complete character (or,
    /// with `partial`, in any case).
    fn decode_new(&mut self, tok: &Tokenizer, generated: &[u32], partial: bool) -> Result<()> {
        if generated.len() <= self.read {
            return Ok(());
        }
        let before = tok.decode(&generated[self.prefix..self.read], true)?;
        let now = tok.decode(&generated[self.prefix..], true)?;
        if !partial && now.ends_with('\u{FFFD}') {
            return Ok(());
        }
        match now.strip_prefix(before.as_str()) {
            Some(new) => self.text.push_str(new),
            // A tokenizer whose window decodes differently: fall back to the whole output.
            None => {
                let all = tok.decode(generated, true)?;
                if !all.starts_with(&self.text[..self.emitted]) {
                    return Err(super::EngineError::Tokenizer("incremental decoding went out of step".into()));
                }
                self.text = all;
            }
        }
        self.prefix = self.read;
        self.read = generated.len();
        Ok(())
    }

    /// Returns the newly final text and whether a stop sequence was hit.
    fn advance(&mut self, tok: &Tokenizer, generated: &[u32]) -> Result<(String, bool)> {
        self.decode_new(tok, generated, false)?;
        // Emitted text never holds the start of a stop sequence, so a match starts later.
        let pending = &self.text[self.emitted..];
        if let Some(at) = self.stop.iter().filter_map(|s| pending.find(s.as_str())).min() {
            self.stopped = true;
            return Ok((self.take(self.emitted + at), true));
        }
        let hold = self.stop.iter().map(|s| longest_suffix_prefix(pending, s)).max().unwrap_or(0);
        Ok((self.take(self.text.len() - hold), false))
    }

    /// Everything not yet emitted (generation ended without a stop sequence).
    fn flush(&mut self, tok: &Tokenizer, generated: &[u32]) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.decode_new(tok, generated, true)?;
        Ok(self.take(self.text.len()))
    }

    fn take(&mut self, end: usize) -> String {
        let text = &self.text;
        if end <= self.emitted || !text.is_char_boundary(self.emitted) || !text.is_char_boundary(end) {
            return String::new();
        }
        let s = text[self.emitted..end].to_string();
        self.emitted = end;
        s
    }
}

/// The text a stream of `ids` sends, token by token, as the engine does (for the
/// detokenization bench and tests).
#[doc(hidden)]
pub fn stream_text(tok: &Tokenizer, ids: &[u32], stop: &[String]) -> Result<String> {
    let mut state = TextState::new(stop);
    let mut out = String::new();
    for n in 1..=ids.len() {
        let (delta, stopped) = state.advance(tok, &ids[..n])?;
        out.push_str(&delta);
        if stopped {
            return Ok(out);
        }
    }
    out.push_str(&state.flush(tok, ids)?);
    Ok(out)
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{longest_suffix_prefix, TextState};
    use crate::engine::tokenizer::tiny_gguf_vocab;
    use crate::engine::Tokenizer;

    /// What the text of a stream must be: the whole output decoded at once, cut at the first
    /// stop sequence.
    fn reference(tok: &Tokenizer, ids: &[u32], stop: &[String]) -> String {
        let full = tok.decode(ids, true).unwrap_or_default();
        match stop.iter().filter(|s| !s.is_empty()).filter_map(|s| full.find(s.as_str())).min() {
            Some(at) => full[..at].to_string(),
            None => full,
        }
    }

    fn streamed(tok: &Tokenizer, ids: &[u32], stop: &[String]) -> String {
        let mut state = TextState::new(stop);
        let mut out = String::new();
        for n in 1..=ids.len() {
            let Ok((delta, stopped)) = state.advance(tok, &ids[..n]) else { return "error".into() };
            out.push_str(&delta);
            if stopped {
                return out;
            }
        }
        out.push_str(&state.flush(tok, ids).unwrap_or_default());
        out
    }

    #[test]
    fn incremental_text_equals_decoding_everything() -> Result<(), Box<dyn std::error::Error>> {
        let tok = Tokenizer::from_gguf(&tiny_gguf_vocab().gguf_metadata())?;
        let vocab = tok.vocab_size() as u64;
        // Random outputs (byte tokens included, so characters split across tokens) and
        // the encodings of real text with multi-byte characters.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut cases: Vec<Vec<u32>> = (0..200).map(|_| (0..(next() % 40)).map(|_| (next() % vocab) as u32).collect()).collect();
        for text in ["héllo wörld — ünïcode ✓ 日本語", "Hello, world! How are you? I am fine.", "stop here END and more"] {
            cases.push(tok.encode(text, false)?);
        }
        let stops: [Vec<String>; 4] = [vec![], vec!["END".into()], vec!["o w".into(), "!".into()], vec!["é".into()]];
        for ids in &cases {
            for stop in &stops {
                assert_eq!(streamed(&tok, ids, stop), reference(&tok, ids, stop), "{ids:?} {stop:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn suffix_prefix() {
        assert_eq!(longest_suffix_prefix("hello wo", "world"), 2);
        assert_eq!(longest_suffix_prefix("hello", "world"), 0);
        assert_eq!(longest_suffix_prefix("ab", "abc"), 2);
        assert_eq!(longest_suffix_prefix("", "abc"), 0);
    }
}
