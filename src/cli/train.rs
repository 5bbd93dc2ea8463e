//! `tunegate train`: one fine-tuning job from the terminal, with a progress line. The
//! adapter is published under `adapters/<task>/<version>/`; a running gateway's folder
//! watcher serves it (and promotes it when it passed the quality gate).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;

use crate::config::Config;
use crate::training::auto::Requested;
use crate::training::dataset::DatasetOptions;
use crate::training::files::parse_jsonl;
use crate::training::pipeline::{self, JobSpec};

pub struct TrainArgs {
    pub config: PathBuf,
    pub task: String,
    pub file: PathBuf,
    pub validation: Option<PathBuf>,
    pub epochs: Option<usize>,
    pub learning_rate: Option<f64>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let read = |p: &PathBuf| -> anyhow::Result<_> {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        parse_jsonl(&bytes).with_context(|| p.display().to_string())
    };
    let examples = read(&args.file)?;
    let validation = args.validation.as_ref().map(read).transpose()?;
    let mut hyper = crate::training::trainer::TrainConfig::from_section(&config.training);
    // As an API job: what is not given is chosen by the auto rule from the data.
    let mut requested = Requested { n_epochs: args.epochs.or(config.training.epochs), ..Requested::default() };
    if let Some(lr) = args.learning_rate {
        hyper.learning_rate = lr;
        requested.learning_rate_multiplier = Some(1.0);
    }
    let id = format!("ftjob-{}", uuid::Uuid::new_v4().simple());
    let current = config.adapters.root.join(&args.task);
    let current = latest_version(&current);
    let spec = JobSpec {
        id: id.clone(),
        task: args.task.clone(),
        model_path: config.model.path.clone(),
        base_model: config.model.name.clone(),
        examples,
        validation,
        hyper,
        dataset: DatasetOptions {
            distill_system_prompt: config.training.distill_system_prompt,
            eval_fraction: config.training.eval_fraction,
            min_examples_for_holdout: config.training.min_examples_for_holdout,
            ..Default::default()
        },
        adapters_root: config.adapters.root.clone(),
        job_dir: config.server.data_dir.join("jobs").join(&id),
        current_adapter: current,
        min_margin: config.training.min_margin,
        adapter_precision: config.adapters.precision,
        owner: None,
        auto: Some((crate::training::auto::AutoRule::from_section(&config.training), requested)),
    };
    let cancel = AtomicBool::new(false);
    let mut stderr = std::io::stderr();
    // The terminal job has the machine to itself: every core unless `[training] threads` says.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(config.training.threads.max(config.model.threads)).build()?;
    let result = pool.install(|| pipeline::run(&spec, &cancel, &mut |e| {
        if let Some(d) = &e.data {
            if let (Some(step), Some(total)) = (d.get("step").and_then(|v| v.as_u64()), d.get("total_steps").and_then(|v| v.as_u64())) {
                let width = 30;
                let done = (step as usize * width) / total.max(1) as usize;
                let _ = write!(stderr, "\r[{}{}] {}", "#".repeat(done), " ".repeat(width - done), e.message);
                let _ = stderr.flush();
                return;
            }
        }
        let _ = writeln!(stderr, "\n{}", e.message);
    }))
    .map_err(|e| anyhow::anyhow!("training failed: {e}"))?;
    eprintln!();
    println!("{}", result.adapter_path.display());
    eprintln!(
        "{} steps in {:.1}s ({:.0} tokens/s); {}",
        result.steps, result.train_seconds, result.train_tokens_per_second, result.gate.reason
    );
    if !result.gate.passed {
        eprintln!("not promoted: the folder watcher serves it only as {}.{}", args.task, result.version);
    }
    Ok(())
}

/// The newest `vN` version folder of a task (the gate's baseline).
fn latest_version(dir: &std::path::Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("adapter_config.json").exists())
        .filter_map(|p| Some((p.file_name()?.to_str()?.strip_prefix('v')?.parse::<u64>().ok()?, p)))
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}
