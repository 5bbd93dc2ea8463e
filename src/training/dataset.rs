//! Training examples → token sequences with a loss mask. Examples are rendered with the
//! base model's chat template; only the final assistant turn (and the template's end of
//! turn) carries loss. When every example shares one system prompt, it can be dropped
//! (context distillation): the adapter learns to behave as if it were there.

use std::collections::HashSet;


use crate::engine::{ChatMessage, ModelInfo};

/// One conversation; the last message is the assistant's answer to learn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub messages: Vec<ChatMessage>,
}

/// A tokenized example: `tokens[i]` is predicted from `tokens[..i]` when `loss_mask[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// Tokens of the prompt part (everything before the answer).
    pub prompt_len: usize,
}

/// The system prompt absorbed by an adapter, as recorded in `tunegate.json` and used by the
/// router to recognise requests it may strip.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DistilledPrompt {
    /// sha256 hex of the exact system prompt text.
    pub sha256: String,
    /// Tokens the prompt took in the rendered template (what each request saves).
    pub tokens: usize,
}

pub use crate::adapters::prompt_hash;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetReport {
    pub examples_in: usize,
    pub duplicates_removed: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub train: usize,
    pub eval: usize,
    /// Too few distinct examples to hold any out: the gate scored training examples.
    #[serde(default)]
    pub eval_in_sample: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub train: Vec<Sequence>,
    /// Held-out examples in message form (the gate generates from them).
    pub eval: Vec<Example>,
    pub distilled: Option<DistilledPrompt>,
    pub report: DatasetReport,
}

#[derive(Debug, Clone)]
pub struct DatasetOptions {
    pub distill_system_prompt: bool,
    /// Fraction of examples held out for evaluation (at least `min_eval` when possible).
    pub eval_fraction: f64,
    pub min_eval: usize,
    /// Below this many distinct examples nothing is held out: every example trains and the
    /// gate scores them in-sample (a hold-out of 4 of 8 examples starves training).
    pub min_examples_for_holdout: usize,
    pub max_seq_len: usize,
    pub seed: u64,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            distill_system_prompt: true,
            eval_fraction: 0.1,
            min_eval: 4,
            min_examples_for_holdout: 50,
            max_seq_len: 1024,
            seed: 0,
        }
    }
}

/// The shared system prompt of all examples, if every example starts with the same one.
pub fn shared_system_prompt(examples: &[Example]) -> Option<String> {
    let first = examples.first()?.messages.first()?;
    if first.role != "system" {
        return None;
    }
    let all = examples
        .iter()
        .all(|e| e.messages.first().is_some_and(|m| m.role == "system" && m.content == first.content));
    all.then(|| first.content.clone())
}

/// Drops a leading system message equal to `prompt`.
pub fn strip_system(messages: &[ChatMessage], prompt: &str) -> Vec<ChatMessage> {
    match messages.first() {
        Some(m) if m.role == "system" && m.content == prompt => messages[1..].to_vec(),
        _ => messages.to_vec(),
    }
}

/// Tokens the system prompt adds to a rendered request: rendered with it minus rendered
/// without it (templates may inject a default system prompt; this measures the real saving).
pub fn system_prompt_tokens(info: &ModelInfo, prompt: &str, sample: &[ChatMessage]) -> crate::engine::Result<usize> {
    let with = render_prompt(info, sample)?;
    let without = render_prompt(info, &strip_system(sample, prompt))?;
    let a = info.tokenizer.encode(&with, true)?.len();
    let b = info.tokenizer.encode(&without, true)?.len();
    Ok(a.saturating_sub(b))
}

fn render_prompt(info: &ModelInfo, messages: &[ChatMessage]) -> crate::engine::Result<String> {
    info.render_chat(messages)
}

/// Tokenizes one example: prompt = template over all messages but the last with the
/// generation prompt; answer = the rest of the full rendering (the assistant text and the
/// template's end-of-turn).
pub fn tokenize(info: &ModelInfo, ex: &Example) -> crate::engine::Result<Sequence> {
    use crate::engine::EngineError;
    let (last, head) = ex
        .messages
        .split_last()
        .ok_or_else(|| EngineError::InvalidRequest("an example has no messages".into()))?;
    if last.role != "assistant" {
        return Err(EngineError::InvalidRequest("an example must end with an assistant message".into()));
    }
    let prompt = info.render_chat(head)?;
    let template = info
        .chat_template
        .as_ref()
        .ok_or_else(|| EngineError::Template("the model has no chat template".into()))?;
    let full = template.render(&ex.messages, false)?;
    let answer = match full.strip_prefix(&prompt) {
        Some(rest) => rest.to_string(),
        // Templates that do not render the prompt as a prefix: fall back to the answer text
        // followed by the end-of-sequence token.
        None => format!("{}{}", last.content, info.tokenizer.eos_token().unwrap_or_default()),
    };
    let mut tokens = info.tokenizer.encode(&prompt, true)?;
    let prompt_len = tokens.len();
    tokens.extend(info.tokenizer.encode(&answer, false)?);
    let loss_mask = (0..tokens.len()).map(|i| i >= prompt_len).collect();
    Ok(Sequence { tokens, loss_mask, prompt_len })
}

/// Builds the training set: de-duplication, optional distillation, deterministic split,
/// truncation of over-long examples.
pub fn build(info: &ModelInfo, examples: &[Example], opts: &DatasetOptions) -> crate::engine::Result<Dataset> {
    let mut report = DatasetReport { examples_in: examples.len(), ..Default::default() };
    let mut seen = HashSet::new();
    let mut unique = Vec::new();
    for e in examples {
        let key = serde_json::to_string(&e.messages).unwrap_or_default();
        if seen.insert(key) {
            unique.push(e.clone());
        } else {
            report.duplicates_removed += 1;
        }
    }
    let shared = if opts.distill_system_prompt { shared_system_prompt(&unique) } else { None };
    let distilled = match &shared {
        Some(p) => Some(DistilledPrompt {
            sha256: prompt_hash(p),
            tokens: system_prompt_tokens(info, p, &unique[0].messages[..unique[0].messages.len() - 1])?,
        }),
        None => None,
    };
    // Deterministic split: order by a seeded hash of the content.
    let mut keyed: Vec<(String, Example)> = unique
        .into_iter()
        .map(|e| {
            let h = prompt_hash(&format!("{}:{}", opts.seed, serde_json::to_string(&e.messages).unwrap_or_default()));
            (h, e)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let n = keyed.len();
    let mut n_eval = ((n as f64) * opts.eval_fraction).round() as usize;
    if opts.eval_fraction > 0.0 {
        n_eval = n_eval.max(opts.min_eval.min(n / 2));
    }
    let in_sample = opts.eval_fraction > 0.0 && n < opts.min_examples_for_holdout;
    if in_sample {
        n_eval = 0;
    }
    let eval: Vec<Example> = if in_sample {
        keyed.iter().map(|(_, e)| e.clone()).collect()
    } else {
        keyed[..n_eval].iter().map(|(_, e)| e.clone()).collect()
    };
    let mut train = Vec::new();
    for (_, e) in &keyed[n_eval..] {
        let e = match &shared {
            Some(p) => Example { messages: strip_system(&e.messages, p) },
            None => e.clone(),
        };
        let mut s = tokenize(info, &e)?;
        if s.tokens.len() > opts.max_seq_len {
            if s.prompt_len >= opts.max_seq_len {
                report.dropped_too_long += 1;
                continue;
            }
            s.tokens.truncate(opts.max_seq_len);
            s.loss_mask.truncate(opts.max_seq_len);
            report.truncated += 1;
        }
        train.push(s);
    }
    report.train = train.len();
    report.eval = eval.len();
    report.eval_in_sample = in_sample;
    Ok(Dataset { train, eval, distilled, report })
}
