//! The adapters folder: `adapters/<name>/<version>/` (or `adapters/<name>/` unversioned), each
//! a PEFT folder. At start-up the newest loadable version of every name is loaded as alias
//! `<name>`; then the folder is polled. A new (or rewritten) newest version replaces the
//! alias when `promote_new_versions` is set, else it is loaded beside it as
//! `<name>.<version>`. Folders starting with `.` are ignored (publishers write to a hidden
//! temp folder and rename it into place).
//!
//! A pin file `adapters/<name>/CURRENT` holding a version label overrides "newest": that
//! version is served as `<name>` (at start-up and whenever the file changes), and new
//! versions load beside it as `<name>.<version>`. `tunegate adapters promote|rollback` write
//! it, and so does a fine-tuning job when it promotes, so a restart serves what was chosen.
//!
//! A plain polling thread: no watcher crate, works on network mounts, and loads run off the
//! HTTP workers. The thread is stopped and joined on shutdown.

use std::cmp::Ordering as CmpOrdering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::{AdapterError, AdapterRegistry, LoadOptions};

/// The pin file in `adapters/<name>/`.
pub const PIN_FILE: &str = "CURRENT";

/// The pinned version label of `name`, if any.
pub fn read_pin(root: &Path, name: &str) -> Option<String> {
    let label = std::fs::read_to_string(root.join(name).join(PIN_FILE)).ok()?;
    let label = label.trim();
    (!label.is_empty()).then(|| label.to_string())
}

/// Pins `name` to `label`, atomically (temp file, fsync, rename, fsync of the folder).
pub fn write_pin(root: &Path, name: &str, label: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = root.join(name);
    let tmp = dir.join(format!(".{PIN_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{label}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(PIN_FILE))?;
    std::fs::File::open(&dir)?.sync_all()
}

/// The version labels of `name` under `root`, oldest first (natural order: v2 < v10).
pub fn version_labels(root: &Path, name: &str) -> Vec<String> {
    scan(root).into_iter().find(|(n, _)| n == name).map(|(_, vs)| vs.into_iter().map(|v| v.label).collect()).unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub root: PathBuf,
    pub interval: Duration,
    pub promote_new_versions: bool,
}

/// The running watch thread. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    scanned: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn spawn(registry: Arc<AdapterRegistry>, cfg: WatchConfig) -> std::io::Result<Watcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let scanned = Arc::new(AtomicBool::new(false));
        let (s, d) = (stop.clone(), scanned.clone());
        let thread =
            std::thread::Builder::new().name("adapter-watch".into()).spawn(move || run(&registry, &cfg, &s, &d))?;
        Ok(Watcher { stop, scanned, thread: Some(thread) })
    }

    /// A flag that turns true once the start-up scan has loaded what it could.
    pub fn scanned_flag(&self) -> Arc<AtomicBool> {
        self.scanned.clone()
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.halt();
    }
}

/// When an adapter's files last changed; a different stamp means a new version.
type Stamp = Vec<(u64, Option<SystemTime>)>;

#[derive(Debug, Clone)]
struct Version {
    /// Empty for an unversioned `adapters/<name>/`.
    label: String,
    path: PathBuf,
    stamp: Stamp,
}

#[derive(Default)]
struct Seen {
    /// Versions handled (loaded, or passed over as not newest), with their stamp then.
    handled: HashMap<PathBuf, Stamp>,
    /// Versions that failed to load, retried once their stamp changes.
    failed: HashMap<PathBuf, Stamp>,
    /// The pin last applied per name.
    pins: HashMap<String, String>,
}

impl Seen {
    fn is_new(&self, v: &Version) -> bool {
        self.handled.get(&v.path) != Some(&v.stamp) && self.failed.get(&v.path) != Some(&v.stamp)
    }
}

fn run(registry: &AdapterRegistry, cfg: &WatchConfig, stop: &AtomicBool, scanned: &AtomicBool) {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        // Adapters are checked against the base model, so wait until it is loaded.
        if registry.model_shape().is_some() {
            let first = !scanned.load(Ordering::Relaxed);
            for (name, versions) in scan(&cfg.root) {
                let pin = read_pin(&cfg.root, &name);
                if first && pin.is_none() {
                    load_newest_loadable(registry, &name, &versions, &mut seen);
                } else if first {
                    for v in &versions {
                        seen.handled.insert(v.path.clone(), v.stamp.clone());
                    }
                } else {
                    on_change(registry, cfg, &name, &versions, pin.is_some(), &mut seen);
                }
                apply_pin(registry, &name, &versions, pin, &mut seen);
            }
            scanned.store(true, Ordering::Relaxed);
        }
        let until = Instant::now() + cfg.interval;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(25).min(cfg.interval));
        }
    }
}

/// Start-up: the newest version that loads becomes `<name>`; every version counts as seen.
fn load_newest_loadable(registry: &AdapterRegistry, name: &str, versions: &[Version], seen: &mut Seen) {
    for v in versions {
        seen.handled.insert(v.path.clone(), v.stamp.clone());
    }
    for v in versions.iter().rev().filter(|v| !gate_failed(&v.path)) {
        match registry.load(name, &v.path, LoadOptions { replace: true, expected_generation: None }) {
            Ok(info) => {
                tracing::info!(alias = name, generation = info.generation, path = %v.path.display(), "adapter loaded from folder");
                return;
            }
            Err(e) => {
                tracing::warn!(alias = name, path = %v.path.display(), "skipping adapter version: {e}");
                seen.handled.remove(&v.path);
                seen.failed.insert(v.path.clone(), v.stamp.clone());
            }
        }
    }
}

/// Serves the pinned version as `name` when the pin is new or changed since last applied.
fn apply_pin(registry: &AdapterRegistry, name: &str, versions: &[Version], pin: Option<String>, seen: &mut Seen) {
    let Some(label) = pin else {
        seen.pins.remove(name);
        return;
    };
    if seen.pins.get(name) == Some(&label) {
        return;
    }
    let Some(v) = versions.iter().find(|v| v.label == label) else {
        tracing::warn!(alias = name, version = %label, "the pinned adapter version does not exist; keeping what serves");
        seen.pins.insert(name.to_string(), label);
        return;
    };
    match registry.load(name, &v.path, LoadOptions { replace: true, expected_generation: None }) {
        Ok(info) => {
            tracing::info!(alias = name, version = %label, generation = info.generation, "pinned adapter version serves");
            seen.pins.insert(name.to_string(), label);
        }
        Err(AdapterError::Busy(_)) => {}
        Err(e) => {
            tracing::warn!(alias = name, version = %label, "the pinned adapter version does not load: {e}");
            seen.pins.insert(name.to_string(), label);
        }
    }
}

/// Later polls: act on the newest version if it is new or rewritten. With a pin, a new
/// version loads beside the alias, never in its place.
fn on_change(registry: &AdapterRegistry, cfg: &WatchConfig, name: &str, versions: &[Version], pinned: bool, seen: &mut Seen) {
    let Some(newest) = versions.last() else { return };
    // An older version appearing late is never served automatically.
    for v in &versions[..versions.len() - 1] {
        if seen.is_new(v) {
            seen.handled.insert(v.path.clone(), v.stamp.clone());
        }
    }
    if !seen.is_new(newest) {
        return;
    }
    let served = registry.lease(name).is_some();
    let promote = !pinned && !gate_failed(&newest.path) && (!served || cfg.promote_new_versions);
    let alias = if promote || newest.label.is_empty() {
        name.to_string()
    } else {
        format!("{name}.{}", newest.label)
    };
    match registry.load(&alias, &newest.path, LoadOptions { replace: true, expected_generation: None }) {
        Ok(info) => {
            tracing::info!(alias, generation = info.generation, path = %newest.path.display(), "new adapter version loaded");
            seen.handled.insert(newest.path.clone(), newest.stamp.clone());
        }
        // Someone else is loading this alias right now: try again next poll.
        Err(AdapterError::Busy(_)) => {}
        Err(e) => {
            tracing::warn!(alias, path = %newest.path.display(), "new adapter version not loaded: {e}");
            seen.failed.insert(newest.path.clone(), newest.stamp.clone());
        }
    }
}

/// A version whose `tunegate.json` records a failed quality gate is never served under
/// the task's own alias automatically (training publishes it for inspection only).
fn gate_failed(dir: &Path) -> bool {
    std::fs::read(dir.join(crate::adapters::peft::META_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m.get("eval")?.get("passed")?.as_bool())
        == Some(false)
}

/// Every adapter name under `root` with its versions, oldest first.
fn scan(root: &Path) -> Vec<(String, Vec<Version>)> {
    let mut out = Vec::new();
    for (name, dir) in subdirs(root) {
        let versions: Vec<Version> = match stamp(&dir) {
            Some(stamp) => vec![Version { label: String::new(), path: dir, stamp }],
            None => {
                let mut v: Vec<Version> = subdirs(&dir)
                    .into_iter()
                    .filter_map(|(label, path)| stamp(&path).map(|stamp| Version { label, path, stamp }))
                    .collect();
                v.sort_by(|a, b| natural_cmp(&a.label, &b.label));
                v
            }
        };
        if !versions.is_empty() {
            out.push((name, versions));
        }
    }
    out
}

fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        // `file_type` does not follow links: a symlinked folder could lead out of the root.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(|n| (n.to_string(), e.path())))
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    out.sort();
    out
}

/// The stamp of a PEFT folder, or `None` if it is not one (yet).
fn stamp(dir: &Path) -> Option<Stamp> {
    let config = std::fs::metadata(dir.join("adapter_config.json")).ok()?;
    let weights = std::fs::metadata(dir.join("adapter_model.safetensors")).ok()?;
    Some(vec![(config.len(), config.modified().ok()), (weights.len(), weights.modified().ok())])
}

/// Version order: digit runs compare as numbers (`v9` < `v10`), the rest as text.
fn natural_cmp(a: &str, b: &str) -> CmpOrdering {
    fn chunks(s: &str) -> Vec<(bool, u128, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            let digit = c.is_ascii_digit();
            let end = rest.find(|ch: char| ch.is_ascii_digit() != digit).unwrap_or(rest.len());
            let (head, tail) = rest.split_at(end);
            out.push(if digit { (false, head.parse().unwrap_or(u128::MAX), "") } else { (true, 0, head) });
            rest = tail;
        }
        out
    }
    chunks(a).cmp(&chunks(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_naturally() {
        let mut v = vec!["v10", "v9", "v1", "2024-01-02", "v2"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, vec!["2024-01-02", "v1", "v2", "v9", "v10"]);
        assert_eq!(natural_cmp("3", "10"), CmpOrdering::Less);
    }

    #[test]
    fn scan_finds_versions_and_skips_hidden_and_incomplete() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path();
        for dir in ["support/v1", "support/v10", "support/v2", "support/.tmp-v3", "plain", "empty/v1"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        for dir in ["support/v1", "support/v10", "support/v2", "support/.tmp-v3", "plain"] {
            std::fs::write(root.join(dir).join("adapter_config.json"), "{}")?;
            std::fs::write(root.join(dir).join("adapter_model.safetensors"), "x")?;
        }
        std::fs::write(root.join("empty/v1/adapter_config.json"), "{}")?;
        let found: Vec<(String, Vec<String>)> =
            scan(root).into_iter().map(|(n, vs)| (n, vs.into_iter().map(|v| v.label).collect())).collect();
        assert_eq!(
            found,
            vec![
                ("plain".to_string(), vec![String::new()]),
                ("support".to_string(), vec!["v1".to_string(), "v2".to_string(), "v10".to_string()]),
            ]
        );
        assert!(scan(&root.join("missing")).is_empty());
        Ok(())
    }
}
