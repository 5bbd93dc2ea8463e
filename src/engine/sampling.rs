//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SamplingParams;

/// Temperatures below this sample as greedy (the distribution is a point mass long before).
pub const MIN_TEMPERATURE: f32 = 1e-4;

pub struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_p: f32,
    top_k: usize,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let rng = match p.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { rng, temperature: p.temperature, top_p: p.top_p, top_k: p.top_k }
    }

    /// Picks a token and returns it with its log-probability under the unmodified
    /// distribution (what OpenAI's `logprobs` reports).
    pub fn sample(&mut self, logits: &[f32]) -> (u32, f32) {
        // Below MIN_TEMPERATURE, 1/t overflows the logits to infinities: that is greedy.
        let id = if self.temperature < MIN_TEMPERATURE || !self.temperature.is_finite() {
            argmax(logits)
        } else {
            self.sample_tempered(logits)
        };
        (id as u32, log_softmax_at(logits, id))
    }

    fn sample_tempered(&mut self, logits: &[f32]) -> usize {
        let inv_t = 1.0 / self.temperature;
        let mut cand: Vec<(usize, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i, l * inv_t)).collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.top_k > 0 && self.top_k < cand.len() {
            cand.truncate(self.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

pub(crate) fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    logits[i] - log_sum_exp(logits)
}

/// `ln Σ exp(l)`, through the vectorized `exp` of the attention kernels a chunk at a time (a
/// vocabulary of 262,144 logits takes a scalar `exp` loop about half a millisecond, every
/// token): per chunk its maximum `m` and `Σ exp(l − m)`, combined at the end.
fn log_sum_exp(logits: &[f32]) -> f32 {
    const CHUNK: usize = 4096;
    let mut buf = [0f32; CHUNK];
    let mut parts: Vec<(f32, f32)> = Vec::with_capacity(logits.len().div_ceil(CHUNK));
    for c in logits.chunks(CHUNK) {
        let b = &mut buf[..c.len()];
        b.copy_from_slice(c);
        if c.iter().any(|l| l.is_finite()) {
            parts.push(crate::engine::kernels::exp_shifted(b));
        }
    }
    let max = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    parts.iter().map(|&(m, s)| s * (m - max).exp()).sum::<f32>().ln() + max
}

/// The `k` most likely tokens under the unmodified distribution with their
/// log-probabilities, most likely first (ties: lower id first).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    // A small sorted list: k is at most 20, the vocabulary tens of thousands.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_finite() || (best.len() == k && l <= best[k - 1].1) {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (i as u32, l));
        best.truncate(k);
    }
    let lse = log_sum_exp(logits);
    best.into_iter().map(|(i, l)| (i, l - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, p: f32, k: usize, seed: u64) -> SamplingParams {
        SamplingParams { temperature: t, top_p: p, top_k: k, seed: Some(seed), ..Default::default() }
    }

    #[test]
    fn log_sum_exp_over_chunks_matches_f64() {
        // Several chunks, a masked (all -inf) chunk, a spread of magnitudes.
        let mut logits: Vec<f32> = (0..20_000).map(|i| ((i * 7919 % 10_007) as f32 / 500.0) - 10.0).collect();
        logits[4096..8192].fill(f32::NEG_INFINITY);
        logits[12_345] = 31.5;
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
        let want = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
        let got = log_sum_exp(&logits) as f64;
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{got} vs {want}");
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_in_order() {
        let logits = [0.5f32, 3.0, f32::NEG_INFINITY, 3.0, -1.0, 2.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 5]);
        for &(id, lp) in &top {
            assert!((lp - log_softmax_at(&logits, id as usize)).abs() < 1e-6);
        }
        let total: f32 = top_logprobs(&logits, 20).iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "all finite tokens listed: {total}");
        assert_eq!(top_logprobs(&logits, 20).len(), 5);
        assert!(top_logprobs(&logits, 0).is_empty());
    }

    #[test]
    fn greedy_picks_max_and_reports_logprob() {
        let mut s = Sampler::new(&params(0.0, 1.0, 0, 1));
        let (id, lp) = s.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(id, 1);
        let expect = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp - expect).abs() < 1e-5);
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 10.0).collect();
        let best = argmax(&logits) as u32;
        for t in [1e-38f32, 1e-30, 1e-6, f32::MIN_POSITIVE] {
            let mut s = Sampler::new(&params(t, 0.9, 0, 5));
            assert!((0..20).all(|_| s.sample(&logits).0 == best), "temperature {t}");
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 1.0, 0, seed));
            (0..20).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_restricts() {
        let logits = [0.0, 3.0, 2.9, -5.0];
        let mut s = Sampler::new(&params(1.0, 1.0, 1, 3));
        assert!((0..20).all(|_| s.sample(&logits).0 == 1));
        // top_p small enough keeps only the most likely token.
        let mut s = Sampler::new(&params(1.0, 0.1, 0, 3));
        assert!((0..20).all(|_| s.sample(&logits).0 == 1));
        // top_k 2 never draws outside the best two.
        let mut s = Sampler::new(&params(5.0, 1.0, 2, 3));
        assert!((0..200).all(|_| matches!(s.sample(&logits).0, 1 | 2)));
    }
}
