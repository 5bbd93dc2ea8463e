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
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateReport {
    pub baseline: Scores,
    pub candidate: Scores,
    pub margin: f64,
    pub passed: bool,
    pub reason: String,
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

/// Greedy continuation on the serving path; stops at end-of-turn or `max_tokens`.
pub fn greedy(model: &Model, info: &ModelInfo, prompt: &[u32], lora: Option<&LoraWeights>, max_tokens: usize) -> Result<String> {
    let mut cache = KvCache::new(model.shape.num_layers);
    let mut feed = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let bl = BatchLora::new(&[(feed.len(), lora)])?;
        let logits = model.forward(&mut [SeqBatch { tokens: &feed, cache: &mut cache }], &bl)?;
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let id = argmax(&row) as u32;
        if info.tokenizer.eos_token_ids().contains(&id) || cache.len() + 1 >= info.context_length {
            break;
        }
        out.push(id);
        feed = vec![id];
    }
    info.tokenizer.decode(&out, true)
}

/// Scores a variant on held-out examples. `dense` (for the loss) may be the same model
/// when it is already dense.
pub fn score(model: &Model, dense: &Model, info: &ModelInfo, eval: &[Example], v: &Variant<'_>) -> Result<Scores> {
    let mut s = Scores { examples: eval.len(), ..Default::default() };
    if eval.is_empty() {
        return Ok(s);
    }
    let mut loss_sum = 0.0;
    let mut loss_tokens = 0usize;
    for ex in eval {
        let ex = match v.strip_prompt {
            Some(p) => Example { messages: dataset::strip_system(&ex.messages, p) },
            None => ex.clone(),
        };
        let seq = dataset::tokenize(info, &ex)?;
        let gold = ex.messages.last().map(|m| m.content.trim().to_string()).unwrap_or_default();
        let max_new = info.tokenizer.encode(&gold, false)?.len() + 16;
        let pred = greedy(model, info, &seq.tokens[..seq.prompt_len], v.lora, max_new)?;
        let pred = pred.trim();
        s.exact_match += f64::from(u8::from(pred == gold));
        s.token_f1 += token_f1(pred, &gold);
        s.prompt_tokens += seq.prompt_len as f64;
        let bl = BatchLora::new(&[(seq.tokens.len(), v.lora)])?;
        let (loss, n) = super::trainer::batch_loss(dense, &bl, &[&seq])?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        loss_tokens += n;
    }
    let n = eval.len() as f64;
    s.exact_match /= n;
    s.token_f1 /= n;
    s.prompt_tokens /= n;
    s.loss = loss_sum / loss_tokens.max(1) as f64;
    Ok(s)
}

/// The candidate passes when it matches or beats the baseline by `margin` on exact match
/// and on token F1.
pub fn gate(baseline: Scores, candidate: Scores, margin: f64) -> GateReport {
    let em_ok = candidate.exact_match + 1e-9 >= baseline.exact_match + margin;
    let f1_ok = candidate.token_f1 + 1e-9 >= baseline.token_f1 + margin;
    let passed = candidate.examples > 0 && em_ok && f1_ok;
    let reason = if candidate.examples == 0 {
        "no held-out examples to evaluate on".to_string()
    } else if passed {
        format!(
            "candidate exact match {:.3} / F1 {:.3} vs serving {:.3} / {:.3} (margin {margin})",
            candidate.exact_match, candidate.token_f1, baseline.exact_match, baseline.token_f1
        )
    } else {
        format!(
            "candidate is worse than what serves today: exact match {:.3} vs {:.3}, F1 {:.3} vs {:.3} (margin {margin})",
            candidate.exact_match, baseline.exact_match, candidate.token_f1, baseline.token_f1
        )
    };
    GateReport { baseline, candidate, margin, passed, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f1_and_gate() {
        assert_eq!(token_f1("a b c", "a b c"), 1.0);
        assert_eq!(token_f1("x", "a"), 0.0);
        assert!((token_f1("a b", "a c") - 0.5).abs() < 1e-9);
        let good = Scores { examples: 4, exact_match: 0.75, token_f1: 0.8, ..Default::default() };
        let bad = Scores { examples: 4, exact_match: 0.25, token_f1: 0.3, ..Default::default() };
        assert!(gate(bad.clone(), good.clone(), 0.0).passed);
        let r = gate(good, bad, 0.0);
        assert!(!r.passed && r.reason.contains("worse"), "{}", r.reason);
    }
}
