//! Starting and stopping the gateway: the engine (loading on its own thread), the adapters
//! folder watcher, and the actix-web server. `serve` and the integration tests both go
//! through [`start_server`], so tests run the real thing on port 0.
//!
//! Shutdown order: stop accepting and drain in-flight requests (actix's graceful stop, on
//! SIGTERM/SIGINT when signals are handled), then stop the engine and join the watcher.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::Context;
use sha2::{Digest, Sha256};

use super::json::{BodyLimit, BodyTimeout};
use super::{auth, limits, routes, AppState};
use crate::adapters::watch::{WatchConfig, Watcher};
use crate::config::Config;
use crate::engine::Engine;
use crate::router::Router;

#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Let actix stop gracefully on SIGTERM/SIGINT (the `serve` command); tests leave it off.
    pub handle_signals: bool,
}

/// A running gateway.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub engine: Engine,
    pub state: web::Data<AppState>,
    server: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    watcher: Option<Watcher>,
    scheduler: Option<crate::scheduler::Scheduler>,
    /// Refreshes the per-task overview gauges (with request logging on).
    overview: Option<tokio::task::JoinHandle<()>>,
}

/// Starts the gateway in the current tokio runtime and returns once it listens (the model
/// may still be loading: see [`ServerHandle::wait_ready`]).
pub async fn start_server(config: Config) -> anyhow::Result<ServerHandle> {
    start(config, StartOptions::default()).await
}

pub async fn start(config: Config, opts: StartOptions) -> anyhow::Result<ServerHandle> {
    let config = Arc::new(config);
    let engine = Engine::spawn(config.engine_config());
    let router = Router::new(config.model.name.clone(), engine.registry().clone());
    let metrics = crate::metrics::Metrics::new(
        &config.model.name,
        Some(engine.registry().clone()),
        Some(engine.counters().clone()),
    )
    .context("creating the metrics registry")?;
    let observer = Arc::downgrade(&metrics);
    engine.registry().set_observer(Box::new(move |e| {
        if let Some(m) = observer.upgrade() {
            m.observe_adapter(e);
        }
    }));
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
        Some(Watcher::spawn(engine.registry().clone(), cfg).context("starting the adapters watcher")?)
    } else {
        None
    };
    let adapters_scanned =
        watcher.as_ref().map(Watcher::scanned_flag).unwrap_or_else(|| Arc::new(AtomicBool::new(true)));

    let logs = if config.logs.enabled {
        let logs = crate::logs::Logs::start(&config.logs, &config.server.data_dir)
            .with_context(|| format!("opening the {:?} log store", config.logs.store))?;
        metrics.watch_log_writer(logs.store.backend(), logs.writer.stats().clone());
        Some(logs)
    } else {
        None
    };
    let jobs = if config.training.enabled {
        let files = Arc::new(
            crate::training::files::FileStore::open(&config.server.data_dir).context("opening the files store")?,
        );
        let jobs_cfg = crate::training::jobs::JobsConfig {
            data_dir: config.server.data_dir.clone(),
            model_path: config.model.path.clone(),
            base_model: config.model.name.clone(),
            adapters_root: config.adapters.root.clone(),
            defaults: config.training.train_config(),
            eval_fraction: config.training.eval_fraction,
            min_margin: config.training.min_margin,
            distill_system_prompt: config.training.distill_system_prompt,
            metrics: Some(metrics.clone()),
            max_active_per_tenant: config.limits.max_active_jobs_per_tenant,
            auto: config.training.auto_rule(),
            fixed_epochs: config.training.epochs,
            min_examples_for_holdout: config.training.min_examples_for_holdout,
            scheduler_min_eval: config.training.scheduler_min_eval_examples,
            threads: config.training.threads,
        };
        Some(
            crate::training::jobs::JobManager::start(
                jobs_cfg,
                files,
                engine.registry().clone(),
                logs.as_ref().map(|l| task_examples(l, config.training.max_examples)),
            )
                .context("starting the fine-tuning worker")?,
        )
    } else {
        None
    };
    let state = web::Data::new(AppState {
        config: config.clone(),
        engine: engine.clone(),
        router,
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

    let max_body = config.server.max_body_bytes;
    let body_timeout = Duration::from_secs_f64(config.limits.body_timeout_seconds);
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .app_data(BodyLimit(max_body))
            .app_data(BodyTimeout(body_timeout))
            .wrap(actix_web::middleware::from_fn(super::guard::open_server))
            .wrap(actix_web::middleware::from_fn(super::metrics::track))
            .configure(routes)
            .default_service(web::to(super::not_found))
    })
    .shutdown_timeout(config.server.shutdown_timeout.as_secs().max(1));
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    if !opts.handle_signals {
        server = server.disable_signals();
    }
    let server = server.bind(config.server.bind).with_context(|| format!("binding {}", config.server.bind))?;
    let addr = server.addrs().first().copied().context("the server has no address")?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    tracing::info!(%addr, model = %config.model.name, "tunegate listening");
    // Auto-training needs both the log store (the examples) and the job manager.
    let scheduler = match (&state.logs, &state.jobs) {
        (Some(logs), Some(jobs)) if config.scheduler.enabled => Some(crate::scheduler::Scheduler::spawn(
            config.scheduler.clone(),
            logs.clone(),
            jobs.clone(),
            config.model.name.clone(),
            config.server.data_dir.clone(),
        )),
        _ => None,
    };
    let overview = state.logs.is_some().then(|| super::admin::overview::spawn_refresh(state.clone()));
    Ok(ServerHandle { addr, engine, state, server: handle, task, watcher, scheduler, overview })
}

impl ServerHandle {
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

    /// Stops the server (gracefully: in-flight requests finish first), then the engine.
    pub async fn stop(self, graceful: bool) {
        self.server.stop(graceful).await;
        let _ = self.finish().await;
    }

    /// Runs until the server stops (SIGTERM/SIGINT with signals handled), then shuts the
    /// engine and the watcher down.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.finish().await
    }

    async fn finish(self) -> anyhow::Result<()> {
        let served = self.task.await;
        tracing::info!("HTTP server stopped; shutting the engine down");
        self.engine.shutdown();
        if let Some(o) = &self.overview {
            o.abort();
        }
        // A running job stops within one step and resumes from its checkpoint next start.
        if let Some(s) = self.scheduler {
            s.stop().await;
        }
        if let Some(j) = &self.state.jobs {
            j.shutdown();
        }
        // After the HTTP drain: every finished request's record is in the writer by now.
        if let Some(logs) = &self.state.logs {
            logs.shutdown().await;
        }
        if let Some(w) = self.watcher {
            let _ = tokio::task::spawn_blocking(move || w.stop()).await;
        }
        served.context("the server task failed")?.context("the HTTP server failed")
    }
}

/// Training data for jobs that name a task instead of a file: the task's approved log
/// records (the reviewer's correction where there is one), the newest `max` of them.
fn task_examples(logs: &Arc<crate::logs::Logs>, max: usize) -> crate::training::jobs::TaskExamples {
    let store = logs.store.clone();
    let rt = tokio::runtime::Handle::current();
    Arc::new(move |task: &str| {
        // Called on the job worker's own thread, never on a runtime thread.
        let records = rt.block_on(store.approved_examples(task)).map_err(|e| e.to_string())?;
        if records.is_empty() {
            return Err(format!("task '{task}' has no approved examples"));
        }
        let skip = records.len().saturating_sub(max.max(1));
        Ok(records[skip..]
            .iter()
            .map(|r| crate::training::dataset::Example { messages: r.training_messages() })
            .collect())
    })
}

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
