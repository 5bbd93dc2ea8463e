//! Alias → generation registry. Loads are two-phase: a fallible *prepare* reads and checks
//! the adapter outside any lock, then an infallible *commit* swaps in a new immutable map
//! with one atomic store. Requests lease a generation (an `Arc`) and keep it; a replaced
//! generation is dropped when its last lease ends.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::{peft, AdapterError, AdapterGeneration, AdapterLease, AdapterLimits};
use crate::engine::ModelShape;

/// A generation as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    pub alias: String,
    pub generation: u64,
    pub path: PathBuf,
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<String>,
    pub bytes: usize,
    /// Requests running on this generation now.
    pub active_leases: usize,
    /// Unix seconds.
    pub loaded_at: u64,
    pub load_seconds: f64,
    pub meta: Option<serde_json::Value>,
}

/// A replaced or unloaded generation that requests still hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetiredInfo {
    pub alias: String,
    pub generation: u64,
    pub active_leases: usize,
    pub bytes: usize,
}

/// How a load treats an alias that is already loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Replace an existing alias (vLLM's `load_inplace`).
    pub replace: bool,
    /// Compare-and-swap: the generation the caller believes is current (`Some(0)` = must
    /// not be loaded yet).
    pub expected_generation: Option<u64>,
}

type Map = HashMap<String, Arc<AdapterGeneration>>;

/// What a load or unload did, as observers (metrics) see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterOutcome {
    /// A new alias.
    Loaded,
    /// A new generation replaced the alias's current one.
    Swapped,
    Unloaded,
    /// Refused before or at commit: already loaded, generation mismatch, busy, over a limit,
    /// not loaded (unload).
    Rejected,
    /// The adapter could not be read or does not fit the model.
    Failed,
}

impl AdapterOutcome {
    /// The snake_case name used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterOutcome::Loaded => "loaded",
            AdapterOutcome::Swapped => "swapped",
            AdapterOutcome::Unloaded => "unloaded",
            AdapterOutcome::Rejected => "rejected",
            AdapterOutcome::Failed => "failed",
        }
    }

    fn of_error(e: &AdapterError) -> Self {
        match e {
            AdapterError::Invalid(_) | AdapterError::Io(_) | AdapterError::NotReady => AdapterOutcome::Failed,
            AdapterError::NotFound(_)
            | AdapterError::AlreadyLoaded { .. }
            | AdapterError::GenerationMismatch { .. }
            | AdapterError::Busy(_)
            | AdapterError::Limit(_) => AdapterOutcome::Rejected,
        }
    }
}

/// One load or unload, reported to the registry's observer after the fact.
#[derive(Debug, Clone, Copy)]
pub struct AdapterEvent<'a> {
    pub alias: &'a str,
    pub outcome: AdapterOutcome,
    /// Seconds spent reading and checking the adapter (successful loads only).
    pub load_seconds: Option<f64>,
}

/// Called after every load and unload, on the thread that did it; must be cheap.
pub type AdapterObserver = Box<dyn Fn(&AdapterEvent<'_>) + Send + Sync>;

pub struct AdapterRegistry {
    limits: AdapterLimits,
    shape: OnceLock<ModelShape>,
    current: ArcSwap<Map>,
    /// Serialises commits so compare-and-swap sees a stable map.
    commit_lock: Mutex<()>,
    loading: Mutex<HashSet<String>>,
    retired: Mutex<Vec<Weak<AdapterGeneration>>>,
    next_generation: AtomicU64,
    observer: OnceLock<AdapterObserver>,
}

impl std::fmt::Debug for AdapterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterRegistry").field("aliases", &self.aliases()).finish()
    }
}

impl AdapterRegistry {
    pub fn new(limits: AdapterLimits) -> Self {
        Self {
            limits,
            shape: OnceLock::new(),
            current: ArcSwap::from_pointee(Map::new()),
            commit_lock: Mutex::new(()),
            loading: Mutex::new(HashSet::new()),
            retired: Mutex::new(Vec::new()),
            next_generation: AtomicU64::new(1),
            observer: OnceLock::new(),
        }
    }

    /// A registry for `engine`'s model: it learns the model's shape when the engine has
    /// loaded it (before the engine says it is ready), and refuses loads until then.
    pub fn for_engine(engine: &crate::engine::Engine, limits: AdapterLimits) -> Arc<Self> {
        let registry = Arc::new(Self::new(limits));
        let weak = Arc::downgrade(&registry);
        engine.when_ready(move |info| {
            if let Some(r) = weak.upgrade() {
                r.set_model(info.shape.clone());
            }
        });
        registry
    }

    /// Sets the base model's shape, once; adapters are checked against it.
    pub fn set_model(&self, shape: ModelShape) {
        let _ = self.shape.set(shape);
    }

    pub fn model_shape(&self) -> Option<&ModelShape> {
        self.shape.get()
    }

    pub fn limits(&self) -> &AdapterLimits {
        &self.limits
    }

    /// Takes a lease on the alias's current generation.
    pub fn lease(&self, alias: &str) -> Option<AdapterLease> {
        self.current.load().get(alias).cloned()
    }

    pub fn aliases(&self) -> Vec<String> {
        let mut v: Vec<String> = self.current.load().keys().cloned().collect();
        v.sort();
        v
    }

    /// Sets the function told about every load and unload (once; later calls are ignored
    /// and return false).
    pub fn set_observer(&self, observer: AdapterObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    fn notify(&self, alias: &str, outcome: AdapterOutcome, load_seconds: Option<f64>) {
        if let Some(f) = self.observer.get() {
            f(&AdapterEvent { alias, outcome, load_seconds });
        }
    }

    /// Reads and validates an adapter folder and makes it the alias's current generation.
    /// Blocking (disk and tensor work): call it off async workers.
    pub fn load(&self, alias: &str, path: &Path, opts: LoadOptions) -> Result<AdapterInfo, AdapterError> {
        match self.load_and_commit(alias, path, opts) {
            Ok((info, replaced)) => {
                let outcome = if replaced { AdapterOutcome::Swapped } else { AdapterOutcome::Loaded };
                self.notify(alias, outcome, Some(info.load_seconds));
                Ok(info)
            }
            Err(e) => {
                self.notify(alias, AdapterOutcome::of_error(&e), None);
                Err(e)
            }
        }
    }

    /// `load` without the report; also says whether an existing generation was replaced.
    fn load_and_commit(&self, alias: &str, path: &Path, opts: LoadOptions) -> Result<(AdapterInfo, bool), AdapterError> {
        validate_alias(alias)?;
        let shape = self.shape.get().ok_or(AdapterError::NotReady)?;
        // Fail fast on conflicts before doing the expensive read.
        self.check_conflict(alias, opts)?;
        let _guard = LoadingGuard::take(&self.loading, alias)?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let prepared = peft::load_adapter(path, shape, &self.limits)?;
        let gen = Arc::new(AdapterGeneration {
            alias: alias.to_string(),
            generation,
            path: path.to_path_buf(),
            rank: prepared.rank,
            alpha: prepared.alpha,
            scale: prepared.scale,
            target_modules: prepared.target_modules,
            bytes: prepared.bytes,
            loaded_at: std::time::SystemTime::now(),
            load_seconds: prepared.load_seconds,
            meta: prepared.meta,
            weights: prepared.weights,
        });
        let old = {
            let _c = self.commit_lock.lock();
            self.check_conflict(alias, opts)?;
            let map = self.current.load();
            if !map.contains_key(alias) && map.len() >= self.limits.max_loaded {
                return Err(AdapterError::Limit(format!(
                    "{} adapters are loaded (max_loaded = {}); unload one first",
                    map.len(),
                    self.limits.max_loaded
                )));
            }
            let total: usize = map.iter().filter(|(k, _)| k.as_str() != alias).map(|(_, g)| g.bytes).sum();
            if total + gen.bytes > self.limits.max_bytes {
                return Err(AdapterError::Limit(format!(
                    "loading {} bytes would exceed max_bytes = {} ({} in use)",
                    gen.bytes, self.limits.max_bytes, total
                )));
            }
            let mut next = (**map).clone();
            let old = next.insert(alias.to_string(), gen.clone());
            self.current.store(Arc::new(next));
            old
        };
        let replaced = old.is_some();
        if let Some(old) = old {
            self.retire(old);
        }
        let mut out = info(&gen);
        // `gen` itself is one more reference than the map's.
        out.active_leases = out.active_leases.saturating_sub(1);
        Ok((out, replaced))
    }

    /// Removes the alias. Running requests keep their generation to the end.
    pub fn unload(&self, alias: &str, expected_generation: Option<u64>) -> Result<AdapterInfo, AdapterError> {
        let result = self.remove(alias, expected_generation);
        let outcome = match &result {
            Ok(_) => AdapterOutcome::Unloaded,
            Err(e) => AdapterOutcome::of_error(e),
        };
        self.notify(alias, outcome, None);
        result
    }

    fn remove(&self, alias: &str, expected_generation: Option<u64>) -> Result<AdapterInfo, AdapterError> {
        let old = {
            let _c = self.commit_lock.lock();
            let map = self.current.load();
            let cur = map.get(alias).ok_or_else(|| AdapterError::NotFound(alias.to_string()))?;
            if let Some(exp) = expected_generation {
                if exp != cur.generation {
                    return Err(AdapterError::GenerationMismatch {
                        alias: alias.to_string(),
                        expected: Some(exp),
                        actual: Some(cur.generation),
                    });
                }
            }
            let mut next = (**map).clone();
            let old = next.remove(alias);
            self.current.store(Arc::new(next));
            old
        };
        match old {
            Some(old) => {
                let i = info(&old);
                self.retire(old);
                Ok(i)
            }
            None => Err(AdapterError::NotFound(alias.to_string())),
        }
    }

    /// Current generations, sorted by alias.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let map = self.current.load();
        let mut v: Vec<AdapterInfo> = map.values().map(info).collect();
        v.sort_by(|a, b| a.alias.cmp(&b.alias));
        v
    }

    /// Replaced or unloaded generations still held by running requests.
    pub fn retired(&self) -> Vec<RetiredInfo> {
        let mut r = self.retired.lock();
        r.retain(|w| w.strong_count() > 0);
        r.iter()
            .filter_map(|w| w.upgrade())
            .map(|g| RetiredInfo {
                alias: g.alias.clone(),
                generation: g.generation,
                // minus the temporary upgrade above
                active_leases: Arc::strong_count(&g) - 1,
                bytes: g.bytes,
            })
            .collect()
    }

    /// Bytes of every generation still in memory (current and retired).
    pub fn total_bytes(&self) -> usize {
        let cur: usize = self.current.load().values().map(|g| g.bytes).sum();
        let ret: usize = self.retired().iter().map(|r| r.bytes).sum();
        cur + ret
    }

    fn check_conflict(&self, alias: &str, opts: LoadOptions) -> Result<(), AdapterError> {
        let map = self.current.load();
        let actual = map.get(alias).map(|g| g.generation);
        if let Some(exp) = opts.expected_generation {
            let ok = match actual {
                Some(a) => a == exp,
                None => exp == 0,
            };
            if !ok {
                return Err(AdapterError::GenerationMismatch {
                    alias: alias.to_string(),
                    expected: Some(exp),
                    actual,
                });
            }
            return Ok(());
        }
        match actual {
            Some(generation) if !opts.replace => {
                Err(AdapterError::AlreadyLoaded { alias: alias.to_string(), generation })
            }
            _ => Ok(()),
        }
    }

    fn retire(&self, old: Arc<AdapterGeneration>) {
        let mut r = self.retired.lock();
        r.retain(|w| w.strong_count() > 0);
        r.push(Arc::downgrade(&old));
        // Free the generation's memory (if no lease holds it) outside the lock.
        drop(r);
        drop(old);
    }
}

fn info(g: &Arc<AdapterGeneration>) -> AdapterInfo {
    AdapterInfo {
        alias: g.alias.clone(),
        generation: g.generation,
        path: g.path.clone(),
        rank: g.rank,
        alpha: g.alpha,
        target_modules: g.target_modules.clone(),
        bytes: g.bytes,
        // The registry's map holds one reference.
        active_leases: Arc::strong_count(g).saturating_sub(1),
        loaded_at: g
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        load_seconds: g.load_seconds,
        meta: g.meta.clone(),
    }
}

fn validate_alias(alias: &str) -> Result<(), AdapterError> {
    let ok = !alias.is_empty()
        && alias.len() <= 128
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AdapterError::Invalid(format!(
            "adapter name '{alias}' must be 1-128 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Marks an alias as loading for the guard's life; a second load of it is `Busy`.
struct LoadingGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    alias: String,
}

impl<'a> LoadingGuard<'a> {
    fn take(set: &'a Mutex<HashSet<String>>, alias: &str) -> Result<Self, AdapterError> {
        if !set.lock().insert(alias.to_string()) {
            return Err(AdapterError::Busy(alias.to_string()));
        }
        Ok(Self { set, alias: alias.to_string() })
    }
}

impl Drop for LoadingGuard<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.alias);
    }
}
