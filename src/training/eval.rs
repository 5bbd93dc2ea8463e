//! Held-out evaluation and the promotion gate. The candidate (adapter, system prompt
//! dropped) is compared with what serves the task today (the base model with the full
//! prompt, or the current adapter): greedy outputs against the approved answers (exact
//! match, token F1) and the loss of the approved answers. Generation uses the serving path
//! of the model, so the scores are what users would get.

use super::dataset::{self, Example};
use crate::engine::lora::{BatchLora, LoraWeights};
use crate::engine::model::{KvCache, Model, SeqBatch};
use crate::engine::sampling::argmax;
use crate::engine::{ModelInfo, Result};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    pub examples: usize,
    pub exact_match: f64,
    pub token_f1: f64,
    /// Mean cross-entropy per answer token.
    pub loss: f64,
    /// Mean prompt tokens per request.
    pub prompt_tokens: f64,
    /// Each example's greedy answer (not stored with the report).
    #[serde(skip)]
    pub predictions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateReport {
    pub baseline: Scores,
    pub candidate: Scores,
    /// The constant answer: the most frequent training answer given to every eval example
    /// (what a model that learned only the label frequencies scores).
    #[serde(default)]
    pub constant: Scores,
    pub margin: f64,
    pub passed: bool,
    pub reason: String,
}

/// Scores of answering every example of `eval` with the most frequent of `answers` (ties:
/// the first in sorted order).
pub fn constant_scores(answers: &[String], eval: &[Example]) -> Scores {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for a in answers {
        *counts.entry(a.trim()).or_default() += 1;
    }
    let Some((answer, _)) = counts.iter().fold(None::<(&str, usize)>, |best, (a, &n)| match best {
        Some((_, m)) if m >= n => best,
        _ => Some((a, n)),
    }) else {
        return Scores::default();
    };
    let golds: Vec<String> =
        eval.iter().map(|e| e.messages.last().map(|m| m.content.trim().to_string()).unwrap_or_default()).collect();
    let n = golds.len().max(1) as f64;
    Scores {
        examples: golds.len(),
        exact_match: golds.iter().filter(|g| g.as_str() == answer).count() as f64 / n,
        token_f1: golds.iter().map(|g| token_f1(answer, g)).sum::<f64>() / n,
        ..Scores::default()
    }
}

/// What is evaluated: an adapter (or none) and whether the distilled prompt is dropped.
pub struct Variant<'a> {
    pub lora: Option<&'a LoraWeights>,
    /// The exact system prompt to drop from each example, if any.
    pub strip_prompt: Option<&'a str>,
}

/// Whitespace-token F1 between two strings.
pub fn token_f1(pred: &str, gold: &str) -> f64 {
    let p: Vec<&str> = pred.split_whitespace().collect();
    let g: Vec<&str> = gold.split_whitespace().collect();
    if p.is_empty() && g.is_empty() {
        return 1.0;
    }
    let mut pool = g.clone();
    let mut common = 0usize;
    for w in &p {
        if let Some(i) = pool.iter().position(|x| x == w) {
            pool.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let prec = common as f64 / p.len() as f64;
    let rec = common as f64 / g.len() as f64;
    2.0 * prec * rec / (prec + rec)
}

/// Greedy continuation on the serving path from an empty cache; stops at end-of-turn or
/// `max_tokens`. The tests' independent check of [`score`]'s answers.
#[cfg(test)]
pub fn greedy(model: &Model, info: &ModelInfo, prompt: &[u32], lora: Option<&LoraWeights>, max_tokens: usize) -> Result<String> {
    let mut cache = KvCache::new(model.shape.num_layers);
    let bl = BatchLora::new(&[(prompt.len(), lora)])?;
    let logits = model.forward(&mut [SeqBatch { tokens: prompt, cache: &mut cache }], &bl)?;
    let first = logits.squeeze(0)?.to_vec1::<f32>()?;
    let out = continue_greedy(model, info, &mut cache, &first, lora, max_tokens)?;
    info.tokenizer.decode(&out, true)
}

/// Greedy tokens after a prompt already in `cache`, whose last logits are `logits`.
fn continue_greedy(
    model: &Model,
    info: &ModelInfo,
    cache: &mut KvCache,
    logits: &[f32],
    lora: Option<&LoraWeights>,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut row = logits.to_vec();
    for _ in 0..max_tokens {
        let id = argmax(&row) as u32;
        if info.tokenizer.eos_token_ids().contains(&id) || cache.len() + 1 >= info.context_length {
            break;
        }
        out.push(id);
        if out.len() == max_tokens {
            break;
        }
        let bl = BatchLora::new(&[(1, lora)])?;
        let logits = model.forward(&mut [SeqBatch { tokens: &[id], cache: &mut *cache }], &bl)?;
        row = logits.squeeze(0)?.to_vec1::<f32>()?;
    }
    Ok(out)
}

/// Scores a variant on held-out examples, all on the serving path: the approved answer's
/// loss teacher-forced after the prompt, then the greedy answer from the same prompt state.
/// Examples that share a leading system prompt run it once (the cache is rewound to the
/// common prefix of consecutive prompts).
pub fn score(model: &Model, info: &ModelInfo, eval: &[Example], v: &Variant<'_>) -> Result<Scores> {
    let mut s = Scores { examples: eval.len(), ..Default::default() };
    if eval.is_empty() {
        return Ok(s);
    }
    let vocab = model.shape.vocab_size;
    let mut loss_sum = 0.0;
    let mut loss_tokens = 0usize;
    let mut cache = KvCache::new(model.shape.num_layers);
    let mut cached: Vec<u32> = Vec::new();
    for ex in eval {
        let ex = match v.strip_prompt {
            Some(p) => Example { messages: dataset::strip_system(&ex.messages, p) },
            None => ex.clone(),
        };
        let seq = dataset::tokenize(info, &ex)?;
        let gold = ex.messages.last().map(|m| m.content.trim().to_string()).unwrap_or_default();
        let max_new = info.tokenizer.encode(&gold, false)?.len() + 16;
        if seq.tokens.is_empty() {
            return Err(crate::engine::EngineError::InvalidRequest("an eval example has no tokens".into()));
        }
        let prompt_len = seq.prompt_len.clamp(1, seq.tokens.len());
        // Reuse the previous prompt's positions this prompt starts with (at least one
        // prompt token is run so its logits exist).
        let keep = cached.iter().zip(&seq.tokens[..prompt_len]).take_while(|(a, b)| a == b).count().min(prompt_len - 1);
        let keep = cache.rewind(keep);
        // Prompt rest + answer in one pass; logits from the prompt's last token on.
        let feed = &seq.tokens[keep..];
        let from = prompt_len - 1 - keep;
        let bl = BatchLora::new(&[(feed.len(), v.lora)])?;
        let logits = model.forward_tail(SeqBatch { tokens: feed, cache: &mut cache }, &bl, from)?;
        for (j, row) in logits.chunks_exact(vocab).enumerate() {
            let at = prompt_len + j; // the token this row predicts
            if at < seq.tokens.len() && seq.loss_mask[at] {
                loss_sum += f64::from(cross_entropy(row, seq.tokens[at] as usize));
                loss_tokens += 1;
            }
        }
        // The pass dropped no row the prompt's end needs (a window layer drops only rows out
        // of the window of the pass's first position).
        if cache.rewind(prompt_len) != prompt_len {
            return Err(crate::engine::EngineError::Internal("the eval cache lost the prompt".into()));
        }
        let first = logits.get(..vocab).unwrap_or_default();
        let out = continue_greedy(model, info, &mut cache, first, v.lora, max_new)?;
        // A long answer may have moved a window layer past the prompt: then nothing is reused.
        let kept = cache.rewind(prompt_len);
        cached.clear();
        cached.extend_from_slice(&seq.tokens[..kept]);
        let pred = info.tokenizer.decode(&out, true)?;
        let pred = pred.trim();
        s.exact_match += f64::from(u8::from(pred == gold));
        s.token_f1 += token_f1(pred, &gold);
        s.prompt_tokens += seq.prompt_len as f64;
        s.predictions.push(pred.to_string());
    }
    let n = eval.len() as f64;
    s.exact_match /= n;
    s.token_f1 /= n;
    s.prompt_tokens /= n;
    s.loss = loss_sum / loss_tokens.max(1) as f64;
    Ok(s)
}

/// `-log softmax(row)[target]`, computed stably.
fn cross_entropy(row: &[f32], target: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    max + sum.ln() - row.get(target).copied().unwrap_or(f32::NEG_INFINITY)
}

/// The candidate passes when
/// - it matches or beats what serves today by `margin` on exact match and on token F1;
/// - it is not useless: a candidate that scores zero on both never passes (a tie at zero is
///   no evidence);
/// - it learned more than the label frequencies: it beats the constant answer (the most
///   frequent training answer for every example) by more than sampling noise, `1/√n` on
///   exact match or on F1 — a model trained on shuffled labels does not;
/// - on an exact tie with what serves, its teacher-forced answer loss is no higher.
///
/// The reason names the criterion that decided.
pub fn gate(baseline: Scores, candidate: Scores, constant: Scores, margin: f64) -> GateReport {
    let em_ok = candidate.exact_match + 1e-9 >= baseline.exact_match + margin;
    let f1_ok = candidate.token_f1 + 1e-9 >= baseline.token_f1 + margin;
    let useless = candidate.exact_match <= 1e-9 && candidate.token_f1 <= 1e-9;
    let noise = 1.0 / (candidate.examples.max(1) as f64).sqrt();
    let beats_constant = constant.examples == 0
        || candidate.exact_match > constant.exact_match + noise
        || candidate.token_f1 > constant.token_f1 + noise;
    let tie = (candidate.exact_match - baseline.exact_match).abs() <= 1e-9
        && (candidate.token_f1 - baseline.token_f1).abs() <= 1e-9;
    let loss_ok = candidate.loss.is_finite() && candidate.loss <= baseline.loss + 1e-9;
    let passed = candidate.examples > 0 && em_ok && f1_ok && !useless && beats_constant && (!tie || loss_ok);
    let reason = if candidate.examples == 0 {
        "no held-out examples to evaluate on".to_string()
    } else if !(em_ok && f1_ok) {
        format!(
            "candidate is worse than what serves today: exact match {:.3} vs {:.3}, F1 {:.3} vs {:.3} (margin {margin})",
            candidate.exact_match, baseline.exact_match, candidate.token_f1, baseline.token_f1
        )
    } else if useless {
        format!(
            "candidate answered no held-out example (exact match {:.3}, F1 {:.3}): a tie at zero is not a pass",
            candidate.exact_match, candidate.token_f1
        )
    } else if !beats_constant {
        format!(
            "candidate does no better than always giving the most frequent training answer: exact match {:.3} vs \
             {:.3}, F1 {:.3} vs {:.3} (needs more than {noise:.3} above it on {} examples)",
            candidate.exact_match, constant.exact_match, candidate.token_f1, constant.token_f1, candidate.examples
        )
    } else if tie && !loss_ok {
        format!(
            "candidate ties what serves today (exact match {:.3}, F1 {:.3}) with a higher answer loss ({:.4} vs {:.4})",
            candidate.exact_match, candidate.token_f1, candidate.loss, baseline.loss
        )
    } else {
        format!(
            "candidate exact match {:.3} / F1 {:.3} vs serving {:.3} / {:.3} (margin {margin}) and vs the constant \
             answer {:.3} / {:.3}{}",
            candidate.exact_match,
            candidate.token_f1,
            baseline.exact_match,
            baseline.token_f1,
            constant.exact_match,
            constant.token_f1,
            if tie { "; the tie decided by the answer loss" } else { "" }
        )
    };
    GateReport { baseline, candidate, constant, margin, passed, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::engine::ChatMessage;

    #[test]
    fn f1_and_gate() {
        assert_eq!(token_f1("a b c", "a b c"), 1.0);
        assert_eq!(token_f1("x", "a"), 0.0);
        // The constant answer: a label-frequency learner (shuffled labels) is refused.
        let eval: Vec<Example> = ["a", "a", "b", "c"]
            .iter()
            .map(|g| Example { messages: vec![ChatMessage::new("user", "q"), ChatMessage::new("assistant", *g)] })
            .collect();
        let answers: Vec<String> = ["b", "a", "a", "c", "a"].iter().map(|s| s.to_string()).collect();
        let c = constant_scores(&answers, &eval);
        assert_eq!((c.examples, c.exact_match), (4, 0.5));
        let base = Scores { examples: 50, ..Default::default() };
        let constant = Scores { examples: 50, exact_match: 0.3, token_f1: 0.3, ..Default::default() };
        let shuffled = Scores { examples: 50, exact_match: 0.34, token_f1: 0.34, loss: 1.0, ..Default::default() };
        let r = gate(base.clone(), shuffled, constant.clone(), 0.0);
        assert!(!r.passed && r.reason.contains("most frequent"), "{}", r.reason);
        let learned = Scores { examples: 50, exact_match: 0.8, token_f1: 0.8, loss: 1.0, ..Default::default() };
        assert!(gate(base, learned, constant, 0.0).passed);
        assert!((token_f1("a b", "a c") - 0.5).abs() < 1e-9);
        let good = Scores { examples: 4, exact_match: 0.75, token_f1: 0.8, ..Default::default() };
        let bad = Scores { examples: 4, exact_match: 0.25, token_f1: 0.3, ..Default::default() };
        let none = Scores::default();
        assert!(gate(bad.clone(), good.clone(), none.clone(), 0.0).passed);
        let r = gate(good.clone(), bad, none.clone(), 0.0);
        assert!(!r.passed && r.reason.contains("worse"), "{}", r.reason);
        // A tie at zero never passes, whatever the losses say.
        let zero = Scores { examples: 4, loss: 1.0, ..Default::default() };
        let r = gate(Scores { loss: 9.0, ..zero.clone() }, zero.clone(), none.clone(), 0.0);
        assert!(!r.passed && r.reason.contains("tie at zero"), "{}", r.reason);
        // An exact tie above zero: the answer loss decides.
        let worse_loss = Scores { loss: 2.0, ..good.clone() };
        let better_loss = Scores { loss: 0.5, ..good.clone() };
        assert!(!gate(better_loss.clone(), worse_loss.clone(), none.clone(), 0.0).passed);
        assert!(gate(worse_loss, better_loss, none, 0.0).passed);
    }
}
