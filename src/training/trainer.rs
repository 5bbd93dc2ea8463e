//! LoRA training on candle autograd, through the engine's own model code (its
//! differentiable path, see `Model::forward_train`), so an adapter trained here serves
//! identically. Base weights are dense f32 and frozen; only the low-rank pairs are `Var`s.

use std::collections::BTreeMap;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::dataset::Sequence;
use crate::engine::lora::{BatchLora, LoraWeights, Proj};
use crate::engine::{EngineError, Model, ModelShape, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Hyper-parameters. Defaults: rank 16 on all seven projections, which learned a
/// held-out distillation task here where rank 8 on q/v alone did not.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    /// Sequences per optimizer step (split into micro-batches of `micro_batch`).
    pub batch_size: usize,
    pub micro_batch: usize,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub seed: u64,
    /// Stop after this many optimizer steps even if epochs remain.
    pub max_steps: Option<usize>,
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: Proj::ALL.iter().map(|p| p.name().to_string()).collect(),
            learning_rate: 2e-4,
            weight_decay: 0.0,
            epochs: 3,
            batch_size: 8,
            micro_batch: 2,
            warmup_steps: 5,
            schedule: Schedule::Cosine,
            seed: 0,
            max_steps: None,
            checkpoint_every: 50,
        }
    }
}

impl TrainConfig {
    /// The trainer's settings from `[training]`; an unset `epochs` keeps the default (the
    /// `auto` rule decides a job's epochs before training starts).
    pub fn from_section(t: &crate::config::TrainingSection) -> Self {
        Self {
            rank: t.rank,
            alpha: t.alpha,
            learning_rate: t.learning_rate,
            epochs: t.epochs.unwrap_or(Self::default().epochs),
            warmup_steps: t.warmup_steps,
            batch_size: t.batch_size,
            micro_batch: t.micro_batch.min(t.batch_size),
            target_modules: t.target_modules.clone(),
            checkpoint_every: t.checkpoint_every,
            ..Default::default()
        }
    }

    pub fn targets(&self) -> Result<Vec<Proj>> {
        self.target_modules
            .iter()
            .map(|m| {
                Proj::from_name(m).ok_or_else(|| {
                    EngineError::InvalidRequest(format!(
                        "unknown target module '{m}' (use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    ))
                })
            })
            .collect()
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.learning_rate,
            Schedule::Linear => self.learning_rate * (1.0 - t),
            Schedule::Cosine => self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

/// The trainable pairs, in the model's own row order (see `adapters::peft` for export).
pub struct LoraParams {
    pub rank: usize,
    pub scale: f64,
    pub pairs: BTreeMap<(usize, Proj), (Var, Var)>,
}

impl LoraParams {
    /// PEFT's initialisation: A uniform in ±1/√in (Kaiming with a = √5), B zero, so the
    /// adapter starts as the identity.
    pub fn init(shape: &ModelShape, cfg: &TrainConfig) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut pairs = BTreeMap::new();
        for layer in 0..shape.num_layers {
            for p in cfg.targets()? {
                let (out, inp) = shape.proj_dims(p);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..cfg.rank * inp).map(|_| rng.random_range(-bound..bound)).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, inp), &Device::Cpu)?)?;
                let b = Var::zeros((out, cfg.rank), DType::F32, &Device::Cpu)?;
                pairs.insert((layer, p), (a, b));
            }
        }
        Ok(Self { rank: cfg.rank, scale: cfg.scale(), pairs })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.pairs.values().flat_map(|(a, b)| [a.clone(), b.clone()]).collect()
    }

    /// Engine-side weights built from the vars (differentiable: gradients flow back).
    pub fn weights(&self, num_layers: usize) -> Result<LoraWeights> {
        let mut w = LoraWeights::new(num_layers);
        for (&(l, p), (a, b)) in &self.pairs {
            w.set(l, p, a.as_tensor(), b.as_tensor(), self.scale)?;
        }
        Ok(w)
    }

    /// Loads values saved by [`save_checkpoint`] into these vars (same layout).
    pub fn load_values(&self, path: &FsPath) -> Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)?;
        for (&(l, p), (a, b)) in &self.pairs {
            for (v, k) in [(a, "A"), (b, "B")] {
                let name = format!("layers.{l}.{}.{k}", p.name());
                let t = map
                    .get(&name)
                    .ok_or_else(|| EngineError::Internal(format!("checkpoint lacks {name}")))?;
                v.set(t)?;
            }
        }
        Ok(())
    }
}

/// AdamW with decoupled weight decay. Ours rather than candle-nn's so that its moments
/// can be checkpointed and a resumed job continues exactly where it stopped.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (bias correction).
    pub t: usize,
    /// (first, second) moment per var, in `LoraParams::pairs` order (A then B).
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &LoraParams, weight_decay: f64) -> Result<Self> {
        let moments = params
            .vars()
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, t: 0, moments })
    }

    pub fn step(&mut self, params: &LoraParams, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (v, (m, s)) in params.vars().iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(v.as_tensor()) else { continue };
            *m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
            *s = ((&*s * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&*m / c1)? / ((&*s / c2)?.sqrt()? + self.eps)?)?;
            let decayed = (v.as_tensor() * (1.0 - lr * self.weight_decay))?;
            v.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.moments
            .iter()
            .enumerate()
            .flat_map(|(i, (m, s))| [(format!("adam.{i}.m"), m.clone()), (format!("adam.{i}.v"), s.clone())])
            .collect()
    }

    pub fn restore(&mut self, map: &std::collections::HashMap<String, Tensor>, t: usize) -> Result<()> {
        for (i, (m, s)) in self.moments.iter_mut().enumerate() {
            let get = |k: String| {
                map.get(&k).cloned().ok_or_else(|| EngineError::Internal(format!("checkpoint lacks {k}")))
            };
            *m = get(format!("adam.{i}.m"))?;
            *s = get(format!("adam.{i}.v"))?;
        }
        self.t = t;
        Ok(())
    }
}

/// A training checkpoint: LoRA values, optimizer moments and the step reached.
pub fn save_checkpoint(dir: &FsPath, params: &LoraParams, opt: &AdamW, step: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::Internal(e.to_string()))?;
    let mut map: std::collections::HashMap<String, Tensor> = opt.state().into_iter().collect();
    for (&(l, p), (a, b)) in &params.pairs {
        map.insert(format!("layers.{l}.{}.A", p.name()), a.as_tensor().clone());
        map.insert(format!("layers.{l}.{}.B", p.name()), b.as_tensor().clone());
    }
    let tmp = dir.join("checkpoint.safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::write(dir.join("checkpoint.json.tmp"), format!("{{\"step\": {step}, \"adam_t\": {}}}", opt.t))
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    std::fs::rename(&tmp, dir.join("checkpoint.safetensors")).map_err(|e| EngineError::Internal(e.to_string()))?;
    std::fs::rename(dir.join("checkpoint.json.tmp"), dir.join("checkpoint.json"))
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    Ok(())
}

/// Loads a checkpoint into `params` and `opt`; returns the step to resume from.
pub fn load_checkpoint(dir: &FsPath, params: &LoraParams, opt: &mut AdamW) -> Result<Option<usize>> {
    let meta = match std::fs::read_to_string(dir.join("checkpoint.json")) {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    let meta: serde_json::Value = serde_json::from_str(&meta).map_err(|e| EngineError::Internal(e.to_string()))?;
    let step = meta["step"].as_u64().unwrap_or(0) as usize;
    let t = meta["adam_t"].as_u64().unwrap_or(0) as usize;
    params.load_values(&dir.join("checkpoint.safetensors"))?;
    let map = candle_core::safetensors::load(dir.join("checkpoint.safetensors"), &Device::Cpu)?;
    opt.restore(&map, t)?;
    Ok(Some(step))
}

/// Reported after every optimizer step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f32,
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
}

pub struct TrainOutcome {
    pub steps: usize,
    pub losses: Vec<f32>,
    pub train_tokens: usize,
    pub seconds: f64,
    pub cancelled: bool,
}

/// Loss over a micro-batch: mean cross-entropy of the masked (answer) positions.
pub fn batch_loss(model: &Model, lora: &BatchLora, seqs: &[&Sequence]) -> Result<(Tensor, usize)> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut off = 0u32;
    for s in seqs {
        for i in 0..s.tokens.len().saturating_sub(1) {
            if s.loss_mask[i + 1] {
                rows.push(off + i as u32);
                targets.push(s.tokens[i + 1]);
            }
        }
        off += s.tokens.len() as u32;
    }
    if rows.is_empty() {
        return Err(EngineError::InvalidRequest("no answer tokens to learn in this batch".into()));
    }
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, &Device::Cpu)?;
    let targets = Tensor::from_vec(targets, n, &Device::Cpu)?;
    let toks: Vec<&[u32]> = seqs.iter().map(|s| s.tokens.as_slice()).collect();
    let logits = model.forward_train(&toks, lora, Some(&rows))?;
    Ok((crate::engine::grad_ops::cross_entropy(&logits, &targets)?, n))
}

/// Where a run starts: fresh, or resumed after `start_step` steps (checkpoint loaded).
pub struct Resume {
    pub start_step: usize,
}

/// One training run: the training model (`Model::for_training`), the adapter it trains and its
/// optimizer, the data, the settings, where it starts, and the flag that stops it.
pub struct TrainRun<'a> {
    pub model: &'a Model,
    pub params: &'a LoraParams,
    pub opt: &'a mut AdamW,
    pub data: &'a [Sequence],
    pub cfg: &'a TrainConfig,
    pub resume: Option<Resume>,
    /// Set: the run stops within one step.
    pub cancel: &'a AtomicBool,
}

/// Trains `run.params` on `run.data`. Calls `on_step` after each optimizer step (for
/// progress, checkpoints); stops within one step when `run.cancel` is set.
pub fn train(
    run: TrainRun<'_>,
    on_step: &mut dyn FnMut(&Progress, &LoraParams, &AdamW) -> Result<()>,
) -> Result<TrainOutcome> {
    let TrainRun { model, params, opt, data, cfg, resume, cancel } = run;
    if data.is_empty() {
        return Err(EngineError::InvalidRequest("the training set is empty".into()));
    }
    let batch = cfg.batch_size.max(1);
    let micro = cfg.micro_batch.clamp(1, batch);
    let steps_per_epoch = data.len().div_ceil(batch);
    let mut total = steps_per_epoch * cfg.epochs.max(1);
    if let Some(m) = cfg.max_steps {
        total = total.min(m);
    }
    let start_step = resume.map_or(0, |r| r.start_step);
    let started = Instant::now();
    let mut losses = Vec::new();
    let mut tokens_done = 0usize;
    let mut step = 0usize;
    let mut order: Vec<usize> = (0..data.len()).collect();
    'epochs: for epoch in 0..cfg.epochs.max(1) {
        // Seeded per epoch so a resumed run sees the same order.
        order.shuffle(&mut StdRng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64)));
        for chunk in order.chunks(batch) {
            if step >= total {
                break 'epochs;
            }
            if step < start_step {
                step += 1;
                continue;
            }
            if cancel.load(Ordering::Relaxed) {
                return Ok(TrainOutcome { steps: step, losses, train_tokens: tokens_done, seconds: started.elapsed().as_secs_f64(), cancelled: true });
            }
            let lr = cfg.lr_at(step, total);
            let weights = params.weights(model.shape.num_layers)?;
            let seqs: Vec<&Sequence> = chunk.iter().map(|&i| &data[i]).collect();
            let target_count: usize = seqs.iter().map(|s| s.loss_mask.iter().skip(1).filter(|&&m| m).count()).sum();
            let mut grads: Option<candle_core::backprop::GradStore> = None;
            let mut loss_sum = 0f32;
            for mb in seqs.chunks(micro) {
                let lens: Vec<(usize, Option<&LoraWeights>)> = mb.iter().map(|s| (s.tokens.len(), Some(&weights))).collect();
                let lora = BatchLora::new(&lens)?.with_dropout(cfg.dropout);
                let (loss, n) = batch_loss(model, &lora, mb)?;
                let w = n as f64 / target_count.max(1) as f64;
                loss_sum += loss.to_scalar::<f32>()? * w as f32;
                let g = (loss * w)?.backward()?;
                grads = Some(match grads {
                    None => g,
                    Some(mut acc) => {
                        for v in params.vars() {
                            if let Some(new) = g.get(v.as_tensor()) {
                                let sum = match acc.get(v.as_tensor()) {
                                    Some(old) => (old + new)?,
                                    None => new.clone(),
                                };
                                acc.insert(v.as_tensor(), sum);
                            }
                        }
                        acc
                    }
                });
                tokens_done += mb.iter().map(|s| s.tokens.len()).sum::<usize>();
            }
            if let Some(g) = grads {
                opt.step(params, &g, lr)?;
            }
            losses.push(loss_sum);
            step += 1;
            let elapsed = started.elapsed().as_secs_f64();
            let done = step - start_step;
            let progress = Progress {
                step,
                total_steps: total,
                loss: loss_sum,
                learning_rate: lr,
                tokens_per_second: tokens_done as f64 / elapsed.max(1e-9),
                elapsed_seconds: elapsed,
                eta_seconds: elapsed / done as f64 * (total - step) as f64,
            };
            on_step(&progress, params, opt)?;
        }
    }
    Ok(TrainOutcome { steps: step, losses, train_tokens: tokens_done, seconds: started.elapsed().as_secs_f64(), cancelled: false })
}
