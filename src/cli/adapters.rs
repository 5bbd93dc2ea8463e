//! `tunegate adapters list|promote|rollback`: choose by hand which version of a task's
//! adapter serves. Promotion writes the pin file `adapters/<task>/CURRENT`; a running
//! gateway's folder watcher swaps the alias to it within one poll (no restart), and a restart
//! serves it too. The version must load against the configured base model first.

use std::path::Path;

use anyhow::Context;

use crate::adapters::watch::{read_pin, version_labels, write_pin};
use crate::config::Config;

pub enum AdaptersArgs {
    List { task: Option<String> },
    Promote { task: String, version: String },
    Rollback { task: String },
}

pub fn run(config: &Path, args: AdaptersArgs) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let root = &config.adapters.root;
    match args {
        AdaptersArgs::List { task } => {
            let tasks: Vec<String> = match task {
                Some(t) => vec![t],
                None => tasks(root)?,
            };
            for t in tasks {
                let pin = read_pin(root, &t);
                for v in version_labels(root, &t) {
                    let meta = meta(&root.join(&t).join(&v));
                    let passed = meta.as_ref().and_then(|m| m.pointer("/eval/passed")?.as_bool());
                    let marker = if pin.as_deref() == Some(v.as_str()) { "*" } else { " " };
                    let gate = match passed {
                        Some(true) => "gate passed",
                        Some(false) => "gate failed",
                        None => "no eval",
                    };
                    println!("{marker} {t}\t{v}\t{gate}");
                }
            }
            Ok(())
        }
        AdaptersArgs::Promote { task, version } => promote(&config, &task, &version),
        AdaptersArgs::Rollback { task } => {
            let labels = version_labels(root, &task);
            anyhow::ensure!(!labels.is_empty(), "no versions of '{task}' under {}", root.display());
            let current = read_pin(root, &task).or_else(|| labels.last().cloned()).unwrap_or_default();
            let pos = labels.iter().position(|l| *l == current).unwrap_or(labels.len() - 1);
            anyhow::ensure!(pos > 0, "'{task}' serves its oldest version ({current}); nothing to roll back to");
            promote(&config, &task, &labels[pos - 1])
        }
    }
}

fn promote(config: &Config, task: &str, version: &str) -> anyhow::Result<()> {
    let root = &config.adapters.root;
    let labels = version_labels(root, task);
    anyhow::ensure!(
        labels.iter().any(|l| l == version),
        "'{task}' has no version '{version}' (versions: {})",
        if labels.is_empty() { "none".to_string() } else { labels.join(", ") }
    );
    // Refuse what would not load: the base model's shape decides.
    let dir = root.join(task).join(version);
    let shape = crate::engine::loader::load(&config.model.path, &config.model.name, None)
        .map_err(|e| anyhow::anyhow!("loading the base model {}: {e}", config.model.path.display()))?
        .model
        .shape;
    let limits = crate::adapters::AdapterLimits {
        max_loaded: config.adapters.max_loaded,
        max_rank: config.adapters.max_rank,
        max_bytes: config.adapters.max_bytes,
        precision: config.adapters.precision,
    };
    crate::adapters::peft::load_adapter(&dir, &shape, &limits)
        .map_err(|e| anyhow::anyhow!("{} does not load: {e}", dir.display()))?;
    write_pin(root, task, version).with_context(|| format!("writing {}", dir.display()))?;
    eprintln!("'{task}' now serves {version} (a running gateway swaps within one watch interval)");
    Ok(())
}

fn tasks(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    out.sort();
    Ok(out)
}

fn meta(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(dir.join(crate::adapters::peft::META_FILE)).ok()?).ok()
}
