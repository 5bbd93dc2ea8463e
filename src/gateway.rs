//! The composition root: builds every part from the validated config, in dependency order,
//! hands the HTTP layer ready state, owns the background tasks (adapters watcher, log
//! writer, job worker, auto-train scheduler, overview refresh) and stops them in order.
//! Wiring only: what each part does lives in its own module. `serve`, the integration tests
//! and the benches all start the gateway through [`start`], so tests run the real thing on
//! port 0.
//!
//! Start order: metrics → engine (loading on its own thread) → adapter registry (learns the
//! model's shape when it has loaded) → router → upstream clients (model discovery in the
//! background) → watcher → log store and writer → files and job worker (reading approved
//! examples from the log store) → HTTP server → scheduler → overview refresh.
//!
//! Stop order: stop accepting and drain in-flight requests (actix's graceful stop, on
//! SIGTERM/SIGINT when signals are handled), then the engine, the overview refresh, the
//! scheduler, the job worker (a running job stops within one step and resumes from its
//! checkpoint next start), the log writer (after the drain, so every finished request's
//! record is in it), and last the watcher.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::adapters::watch::{WatchConfig, Watcher};
use crate::adapters::{AdapterLimits, AdapterRegistry};
use crate::api::server::{Listening, ListenOptions};
use crate::api::{auth, limits, AppState};
use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::scheduler::Scheduler;
use crate::upstream::Upstreams;
use crate::training::auto::AutoRule;
use crate::training::files::FileStore;
use crate::training::jobs::{JobManager, JobsConfig, TaskLogs};
use crate::training::trainer::TrainConfig;

#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Let actix stop gracefully on SIGTERM/SIGINT (the `serve` command); tests leave it off.
    pub handle_signals: bool,
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    pub engine: Engine,
    pub registry: Arc<AdapterRegistry>,
    pub state: web::Data<AppState>,
    http: Listening,
    watcher: Option<Watcher>,
    scheduler: Option<Scheduler>,
    /// Refreshes the per-task overview gauges (with request logging on).
    overview: Option<tokio::task::JoinHandle<()>>,
    /// Asks upstreams without a configured model list for theirs, now and then.
    discovery: Option<tokio::task::JoinHandle<()>>,
}

/// The engine's settings from the config.
pub fn engine_config(config: &Config) -> EngineConfig {
    EngineConfig {
        model_path: config.model.path.clone(),
        model_name: config.model.name.clone(),
        context_length: config.model.context_length,
        threads: config.model.threads,
        max_batch: config.engine.max_batch,
        max_queue: config.engine.max_queue,
        prefix_cache_bytes: config.engine.prefix_cache_mib.saturating_mul(1 << 20),
        kv_type: match config.engine.kv_cache {
            crate::config::KvCacheType::F16 => crate::engine::model::KvType::F16,
            crate::config::KvCacheType::F32 => crate::engine::model::KvType::F32,
        },
    }
}

/// What the adapter registry may hold, from the config.
pub fn adapter_limits(config: &Config) -> AdapterLimits {
    AdapterLimits {
        max_loaded: config.adapters.max_loaded,
        max_rank: config.adapters.max_rank,
        max_bytes: config.adapters.max_bytes,
        precision: config.adapters.precision,
    }
}

fn jobs_config(config: &Config, metrics: &Arc<Metrics>) -> JobsConfig {
    let t = &config.training;
    JobsConfig {
        data_dir: config.server.data_dir.clone(),
        model_path: config.model.path.clone(),
        base_model: config.model.name.clone(),
        adapters_root: config.adapters.root.clone(),
        defaults: TrainConfig::from_section(t),
        eval_fraction: t.eval_fraction,
        min_margin: t.min_margin,
        distill_system_prompt: t.distill_system_prompt,
        metrics: Some(metrics.clone()),
        max_active_per_tenant: config.limits.max_active_jobs_per_tenant,
        auto: AutoRule::from_section(t),
        fixed_epochs: t.epochs,
        min_examples_for_holdout: t.min_examples_for_holdout,
        scheduler_min_eval: t.scheduler_min_eval_examples,
        threads: t.threads,
    }
}

/// Starts the gateway in the current tokio runtime without signal handling (tests, benches).
pub async fn start_server(config: Config) -> anyhow::Result<Gateway> {
    start(config, StartOptions::default()).await
}

/// Builds every part and starts listening; returns once the socket is bound (the model may
/// still be loading: see [`Gateway::wait_ready`]).
pub async fn start(config: Config, opts: StartOptions) -> anyhow::Result<Gateway> {
    let config = Arc::new(config);
    let engine = Engine::spawn(engine_config(&config));
    let registry = AdapterRegistry::for_engine(&engine, adapter_limits(&config));
    let metrics = Metrics::new(&config.model.name, Some(registry.clone()), Some(engine.counters().clone()))
        .context("creating the metrics registry")?;
    let observer = Arc::downgrade(&metrics);
    registry.set_observer(Box::new(move |e| {
        if let Some(m) = observer.upgrade() {
            m.observe_adapter(e);
        }
    }));
    let router = Router::new(config.model.name.clone(), registry.clone());
    let upstreams = Arc::new(
        Upstreams::new(&config.upstreams, &config.routes, |var| std::env::var(var).ok()).context("configuring the upstreams")?,
    );
    let discovery = (!upstreams.is_empty()).then(|| {
        let u = upstreams.clone();
        tokio::spawn(async move {
            loop {
                u.discover().await;
                let unknown = u.models_unknown();
                let wait = if unknown { crate::upstream::DISCOVERY_RETRY } else { crate::upstream::DISCOVERY_INTERVAL };
                tokio::time::sleep(wait).await;
            }
        })
    });
    let auth = auth::Auth::new(&config.auth);
    if auth.is_open() {
        tracing::warn!(
            "no API keys configured (auth.api_keys, auth.admin_keys): every request is accepted without \
             authentication, admin routes included; listening on loopback only"
        );
    }

    let watcher = if config.adapters.watch {
        if let Err(e) = std::fs::create_dir_all(&config.adapters.root) {
            tracing::warn!(root = %config.adapters.root.display(), "cannot create the adapters folder: {e}");
        }
        let cfg = WatchConfig {
            root: config.adapters.root.clone(),
            interval: config.adapters.watch_interval,
            promote_new_versions: config.adapters.promote_new_versions,
        };
        Some(Watcher::spawn(registry.clone(), cfg).context("starting the adapters watcher")?)
    } else {
        None
    };
    let adapters_scanned =
        watcher.as_ref().map(Watcher::scanned_flag).unwrap_or_else(|| Arc::new(AtomicBool::new(true)));

    let logs = if config.logs.enabled {
        let logs = Logs::start(&config.logs, &config.server.data_dir)
            .with_context(|| format!("opening the {:?} log store", config.logs.store))?;
        metrics.watch_log_writer(logs.store.backend(), logs.writer.stats().clone());
        Some(logs)
    } else {
        None
    };
    let jobs = if config.training.enabled {
        let files = Arc::new(FileStore::open(&config.server.data_dir).context("opening the files store")?);
        let task_logs = logs.as_ref().map(|l| {
            TaskLogs::new(l.clone(), tokio::runtime::Handle::current(), config.training.max_examples)
        });
        Some(
            JobManager::start(jobs_config(&config, &metrics), files, registry.clone(), task_logs)
                .context("starting the fine-tuning worker")?,
        )
    } else {
        None
    };
    let state = web::Data::new(AppState {
        config: config.clone(),
        engine: engine.clone(),
        router,
        upstreams,
        auth,
        limiter: limits::ConcurrencyLimiter::new(config.limits.max_concurrent_requests_per_key),
        overview_lock: tokio::sync::Mutex::new(()),
        uploads: Arc::new(tokio::sync::Semaphore::new(config.limits.max_concurrent_uploads)),
        started_at: crate::api::openai::generation::unix_now(),
        fingerprint: fingerprint(&config).into(),
        adapters_scanned,
        jobs,
        metrics,
        logs,
    });

    let http = crate::api::server::listen(state.clone(), ListenOptions { handle_signals: opts.handle_signals })?;
    tracing::info!(addr = %http.addr, model = %config.model.name, "tunegate listening");
    // Auto-training needs both the log store (the examples) and the job manager.
    let scheduler = match (&state.logs, &state.jobs) {
        (Some(logs), Some(jobs)) if config.scheduler.enabled => Some(Scheduler::spawn(
            config.scheduler.clone(),
            logs.clone(),
            jobs.clone(),
            config.model.name.clone(),
            config.server.data_dir.clone(),
        )),
        _ => None,
    };
    let overview = state.logs.is_some().then(|| crate::api::admin::overview::spawn_refresh(state.clone()));
    Ok(Gateway { addr: http.addr, engine, registry, state, http, watcher, scheduler, overview, discovery })
}

impl Gateway {
    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `/ready` would answer 200: the model loaded and the adapters scanned.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.engine.load_error() {
                anyhow::bail!("the model failed to load: {e}");
            }
            if self.engine.is_ready() && self.state.adapters_scanned.load(Ordering::Relaxed) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the gateway was not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server (gracefully: in-flight requests finish first), then everything else.
    pub async fn stop(self, graceful: bool) {
        self.http.handle.stop(graceful).await;
        let _ = self.finish().await;
    }

    /// Runs until the server stops (SIGTERM/SIGINT with signals handled), then shuts every
    /// other part down.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.finish().await
    }

    async fn finish(self) -> anyhow::Result<()> {
        let served = self.http.task.await;
        tracing::info!("HTTP server stopped; shutting the engine down");
        self.engine.shutdown();
        for task in [&self.overview, &self.discovery].into_iter().flatten() {
            task.abort();
        }
        if let Some(s) = self.scheduler {
            s.stop().await;
        }
        if let Some(j) = &self.state.jobs {
            j.shutdown();
        }
        if let Some(logs) = &self.state.logs {
            logs.shutdown().await;
        }
        if let Some(w) = self.watcher {
            let _ = tokio::task::spawn_blocking(move || w.stop()).await;
        }
        served.context("the server task failed")?.context("the HTTP server failed")
    }
}

/// `system_fingerprint`: changes when the model file or the gateway's version does.
fn fingerprint(config: &Config) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(config.model.name.as_bytes());
    h.update(config.model.path.to_string_lossy().as_bytes());
    if let Ok(m) = std::fs::metadata(&config.model.path) {
        h.update(m.len().to_le_bytes());
    }
    format!("fp_{}", &hex::encode(h.finalize())[..10])
}
