//! One fine-tuning job from examples to a published adapter: dataset, training with
//! checkpoints (a restarted job resumes from its last one), held-out evaluation against
//! what serves the task today, and an atomic publish. Swapping the serving alias is the
//! caller's decision, taken from the gate report.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::auto::{self, AutoRule, Chosen, Requested};
use super::dataset::{self, DatasetOptions, DatasetReport, DistilledPrompt, Example};
use super::eval::{self, GateReport, Variant};
use super::export::{self, AdapterMeta};
use super::trainer::{self, AdamW, LoraParams, Resume, TrainConfig};
use crate::adapters::{peft, AdapterLimits};
use crate::engine::lora::LoraPrecision;
use crate::engine::{EngineError, Model, ModelInfo};

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: String,
    pub task: String,
    pub model_path: PathBuf,
    pub base_model: String,
    pub examples: Vec<Example>,
    /// Explicit held-out set (else split from `examples`).
    pub validation: Option<Vec<Example>>,
    pub hyper: TrainConfig,
    pub dataset: DatasetOptions,
    pub adapters_root: PathBuf,
    /// Checkpoints live here.
    pub job_dir: PathBuf,
    /// The adapter serving the task today, if any (the gate's baseline).
    pub current_adapter: Option<PathBuf>,
    pub min_margin: f64,
    /// How the gateway serves adapters (`adapters.precision`): the gate scores both sides so.
    pub adapter_precision: LoraPrecision,
    /// The tenant whose adapter this is (written to `tunegate.json`; only it and admins may
    /// call it). `None`: the operator's.
    pub owner: Option<String>,
    /// The `auto` rule and what the client fixed: `hyper`'s epochs, batch size, learning
    /// rate (as `hyper.learning_rate` × multiplier) and warm-up are chosen from the data.
    /// `None`: `hyper` as given.
    pub auto: Option<(AutoRule, Requested)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct JobEvent {
    pub level: &'static str,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

impl JobEvent {
    fn info(message: impl Into<String>, data: Option<serde_json::Value>) -> Self {
        Self { level: "info", message: message.into(), data }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl From<EngineError> for JobError {
    fn from(e: EngineError) -> Self {
        JobError::Failed(e.to_string())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct JobResult {
    pub version: String,
    pub adapter_path: PathBuf,
    pub gate: GateReport,
    pub distilled: Option<DistilledPrompt>,
    pub dataset: DatasetReport,
    pub steps: usize,
    pub train_seconds: f64,
    pub train_tokens_per_second: f64,
    pub final_loss: Option<f32>,
    pub checkpoints: Vec<usize>,
    /// The hyper-parameters the run used (after the `auto` rule).
    pub hyper: TrainConfig,
    /// What the `auto` rule chose, when it ran.
    pub chosen: Option<Chosen>,
    /// Tokens trained on, exactly (every epoch counted).
    pub train_tokens: u64,
}

/// Loads model, tokenizer and template with the engine's own loader (one model code for
/// serving and training), for a job that runs outside the serving engine.
pub fn load_model(path: &Path, name: &str) -> Result<(Model, ModelInfo), JobError> {
    Ok(crate::engine::loader::load(path, name, None)?.into_model_info(name, None))
}

/// The next free `vN` under `root/task`.
pub fn next_version(root: &Path, task: &str) -> String {
    let n = std::fs::read_dir(root.join(task))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    format!("v{}", n + 1)
}

pub fn run(spec: &JobSpec, cancel: &AtomicBool, emit: &mut dyn FnMut(JobEvent)) -> Result<JobResult, JobError> {
    let (model, info) = load_model(&spec.model_path, &spec.base_model)?;
    let train_model = model.for_training()?;
    let mut data = dataset::build(&info, &spec.examples, &spec.dataset)?;
    if let Some(v) = &spec.validation {
        data.eval = v.clone();
        data.report.eval = v.len();
        data.report.eval_in_sample = false;
    }
    emit(JobEvent::info(
        format!(
            "dataset: {} train, {} eval, {} duplicates removed, {} truncated{}",
            data.report.train,
            data.report.eval,
            data.report.duplicates_removed,
            data.report.truncated,
            match &data.distilled {
                Some(d) => format!("; distilling a shared system prompt of {} tokens", d.tokens),
                None => String::new(),
            }
        ),
        serde_json::to_value(&data.distilled).ok(),
    ));
    if data.train.is_empty() {
        return Err(JobError::Failed("no training examples left after the split".into()));
    }
    if data.report.eval_in_sample {
        emit(JobEvent::info(
            format!(
                "only {} distinct examples (fewer than {}): trained on all of them, and the quality gate scores \
                 them in-sample, which shows the adapter learned them but not that it generalises; give a \
                 validation_file for a held-out score",
                data.report.train, spec.dataset.min_examples_for_holdout
            ),
            None,
        ));
    }
    let mut hyper = spec.hyper.clone();
    let chosen = spec.auto.as_ref().map(|(rule, req)| {
        let c = auto::choose(rule, data.train.len(), req);
        hyper.epochs = c.n_epochs;
        hyper.batch_size = c.batch_size;
        hyper.micro_batch = hyper.micro_batch.clamp(1, c.batch_size);
        hyper.learning_rate = spec.hyper.learning_rate * c.learning_rate_multiplier;
        hyper.warmup_steps = c.warmup_steps;
        c
    });
    if let Some(c) = &chosen {
        emit(JobEvent::info(
            format!(
                "hyperparameters: n_epochs {}, batch_size {}, learning_rate_multiplier {} (learning rate {:.1e}), \
                 {} warm-up steps, {} optimizer steps over {} training examples",
                c.n_epochs, c.batch_size, c.learning_rate_multiplier, hyper.learning_rate, c.warmup_steps, c.steps,
                data.train.len()
            ),
            Some(serde_json::json!({"hyperparameters": {
                "n_epochs": c.n_epochs,
                "batch_size": c.batch_size,
                "learning_rate_multiplier": c.learning_rate_multiplier,
            }})),
        ));
    }
    let params = LoraParams::init(&model.shape, &hyper)?;
    let mut opt = AdamW::new(&params, hyper.weight_decay)?;
    let ckpt_dir = spec.job_dir.join("checkpoint");
    let resume = trainer::load_checkpoint(&ckpt_dir, &params, &mut opt)?.map(|step| {
        emit(JobEvent::info(format!("resuming from the checkpoint at step {step}"), None));
        Resume { start_step: step }
    });
    let mut checkpoints = Vec::new();
    let every = hyper.checkpoint_every.max(1);
    let run = trainer::TrainRun { model: &train_model, params: &params, opt: &mut opt, data: &data.train, cfg: &hyper, resume, cancel };
    let outcome = trainer::train(run, &mut |p, params, opt| {
        if p.step % every == 0 || p.step == p.total_steps {
            trainer::save_checkpoint(&ckpt_dir, params, opt, p.step)?;
            checkpoints.push(p.step);
        }
        emit(JobEvent {
            level: "info",
            message: format!(
                "step {}/{}: loss {:.4}, lr {:.2e}, {:.0} tokens/s, eta {:.0}s",
                p.step, p.total_steps, p.loss, p.learning_rate, p.tokens_per_second, p.eta_seconds
            ),
            data: serde_json::to_value(p).ok(),
        });
        Ok(())
    })?;
    // Scoring runs on the serving model: the training copy (repacked or f32 weights) goes
    // before it.
    drop(train_model);
    if outcome.cancelled {
        return Err(JobError::Cancelled);
    }
    let mut candidate_weights = params.weights(model.shape.num_layers)?;
    candidate_weights.prepare_serving(spec.adapter_precision)?;
    let shared = data.distilled.as_ref().and(dataset::shared_system_prompt(&spec.examples));
    let candidate = eval::score(
        &model,
        &info,
        &data.eval,
        &Variant { lora: Some(&candidate_weights), strip_prompt: shared.as_deref() },
    )?;
    let current = match &spec.current_adapter {
        Some(p) => Some(
            peft::load_adapter(p, &model.shape, &AdapterLimits { precision: spec.adapter_precision, ..AdapterLimits::default() })
                .map_err(|e| JobError::Failed(format!("current adapter {}: {e}", p.display())))?,
        ),
        None => None,
    };
    // The current adapter strips the prompt it distilled; the base model needs it.
    let current_strips = current.as_ref().and_then(|c| {
        let hash = c.meta.as_ref()?.get("distilled_prompt")?.get("sha256")?.as_str()?.to_string();
        shared.as_ref().filter(|p| dataset::prompt_hash(p) == hash).cloned()
    });
    let baseline = eval::score(
        &model,
        &info,
        &data.eval,
        &Variant { lora: current.as_ref().map(|c| &c.weights), strip_prompt: current_strips.as_deref() },
    )?;
    // The eval examples' own answers are not the training answers (unless scored in-sample).
    let eval_set: std::collections::HashSet<String> =
        data.eval.iter().map(|e| serde_json::to_string(&e.messages).unwrap_or_default()).collect();
    let train_answers: Vec<String> = spec
        .examples
        .iter()
        .filter(|e| data.report.eval_in_sample || !eval_set.contains(&serde_json::to_string(&e.messages).unwrap_or_default()))
        .filter_map(|e| e.messages.last().map(|m| m.content.clone()))
        .collect();
    let constant = eval::constant_scores(&train_answers, &data.eval);
    let gate = eval::gate(baseline, candidate, constant, spec.min_margin);
    emit(JobEvent::info(format!("eval: {}", gate.reason), serde_json::to_value(&gate).ok()));
    let version = next_version(&spec.adapters_root, &spec.task);
    let meta = AdapterMeta {
        job_id: Some(spec.id.clone()),
        task: spec.task.clone(),
        base_model: spec.base_model.clone(),
        data_sha256: dataset::prompt_hash(&serde_json::to_string(&spec.examples).unwrap_or_default()),
        train_examples: data.report.train,
        eval_examples: data.report.eval,
        distilled_prompt: data.distilled.clone(),
        eval: serde_json::to_value(&gate).ok(),
        steps: outcome.steps,
        final_loss: outcome.losses.last().copied(),
        train_seconds: outcome.seconds,
        hyperparameters: hyper.clone(),
        owner: spec.owner.clone(),
        created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    let path = export::publish(&spec.adapters_root, &spec.task, &version, &params, &model.shape, &hyper, &meta)?;
    emit(JobEvent::info(format!("published {}", path.display()), None));
    Ok(JobResult {
        version,
        adapter_path: path,
        gate,
        distilled: data.distilled,
        dataset: data.report,
        steps: outcome.steps,
        train_seconds: outcome.seconds,
        train_tokens_per_second: outcome.train_tokens as f64 / outcome.seconds.max(1e-9),
        final_loss: outcome.losses.last().copied(),
        checkpoints,
        hyper,
        chosen,
        train_tokens: outcome.train_tokens as u64,
    })
}
