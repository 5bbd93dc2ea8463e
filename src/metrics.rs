//! Prometheus metrics: one registry per server (tests run many servers in one process),
//! metric names and buckets as constants, and bounded label sets. Task and adapter labels
//! are only ever names the gateway serves (the base model, a loaded alias, a task added
//! with [`Metrics::know_task`]); anything else is `"unknown"`. Routes are templates,
//! statuses are classes, and no label ever carries user text or ids.
//!
//! Recording is lock-free on the request path (the prometheus crate's atomics). Numbers that
//! other parts keep themselves (the engine's counters, the adapter registry, the log
//! writers) are read when `/metrics` is scraped, never pushed from their hot loops. What
//! does not belong here: HTTP plumbing (see `api::metrics`) and the dashboard
//! (`config/grafana/tunegate.json`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Histogram as HistogramProto, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::adapters::{AdapterEvent, AdapterRegistry};
use crate::engine::EngineCounters;
use crate::logs::{WriterStats, WriterStatsSnapshot};

/// Metric names. Units are in the names (`_seconds`, `_bytes`, `_total`).
pub mod names {
    pub const REQUESTS: &str = "tunegate_requests_total";
    pub const REQUEST_DURATION: &str = "tunegate_request_duration_seconds";
    pub const TIME_TO_FIRST_TOKEN: &str = "tunegate_time_to_first_token_seconds";
    pub const INTER_TOKEN_LATENCY: &str = "tunegate_inter_token_latency_seconds";
    pub const GATEWAY_OVERHEAD: &str = "tunegate_gateway_overhead_seconds";
    pub const IN_FLIGHT: &str = "tunegate_in_flight_requests";
    pub const QUEUE_DEPTH: &str = "tunegate_queue_depth";
    pub const REJECTED: &str = "tunegate_rejected_total";
    pub const PROMPT_TOKENS: &str = "tunegate_prompt_tokens_total";
    pub const COMPLETION_TOKENS: &str = "tunegate_completion_tokens_total";
    pub const PROMPT_TOKENS_SAVED: &str = "tunegate_prompt_tokens_saved_total";
    pub const PROMPT_TOKENS_CACHED: &str = "tunegate_prompt_tokens_cached_total";
    pub const TOKENS_PER_SECOND: &str = "tunegate_generation_tokens_per_second";
    pub const BATCH_SIZE: &str = "tunegate_batch_size";
    pub const RUNNING_SEQUENCES: &str = "tunegate_running_sequences";
    pub const KV_CACHE: &str = "tunegate_kv_cache_bytes";
    pub const ADAPTERS_LOADED: &str = "tunegate_adapters_loaded";
    pub const ADAPTER_BYTES: &str = "tunegate_adapter_bytes";
    pub const ADAPTER_SWAPS: &str = "tunegate_adapter_swaps_total";
    pub const ADAPTER_LOAD: &str = "tunegate_adapter_load_seconds";
    pub const LOGS_WRITTEN: &str = "tunegate_logs_written_total";
    pub const LOG_WRITE_FAILURES: &str = "tunegate_log_write_failures_total";
    pub const LOG_BACKPRESSURE: &str = "tunegate_log_write_backpressure_total";
    pub const LOG_QUEUE_DEPTH: &str = "tunegate_log_queue_depth";
    pub const LOG_SPOOL_PENDING: &str = "tunegate_log_spool_pending";
    pub const REVIEWS: &str = "tunegate_reviews_total";
    pub const EXAMPLES: &str = "tunegate_examples";
    pub const TASK_READINESS: &str = "tunegate_task_readiness_ratio";
    pub const TASK_FORMAT_CONSISTENCY: &str = "tunegate_task_format_consistency";
    pub const TASK_PROJECTED_SAVED: &str = "tunegate_task_projected_prompt_tokens_saved_per_month";
    pub const TRAINING_JOBS: &str = "tunegate_training_jobs_total";
    pub const TRAINING_TOKENS_PER_SECOND: &str = "tunegate_training_tokens_per_second";
    pub const TRAINING_LOSS: &str = "tunegate_training_loss";
    pub const EVAL_SCORE: &str = "tunegate_eval_score";
    pub const PROMOTIONS: &str = "tunegate_adapter_promotions_total";
    pub const BUILD_INFO: &str = "tunegate_build_info";
    pub const UPTIME: &str = "tunegate_uptime_seconds";
    pub const UPSTREAM_REQUESTS: &str = "tunegate_upstream_requests_total";
    pub const UPSTREAM_RETRIES: &str = "tunegate_upstream_retries_total";
    pub const UPSTREAM_TIME_TO_FIRST_TOKEN: &str = "tunegate_upstream_time_to_first_token_seconds";
    pub const UPSTREAM_DURATION: &str = "tunegate_upstream_request_duration_seconds";
    pub const UPSTREAM_TOKENS: &str = "tunegate_upstream_tokens_total";
    pub const UPSTREAM_BREAKER_OPEN: &str = "tunegate_upstream_breaker_open";
}

/// Histogram buckets.
pub mod buckets {
    /// Whole requests, including long generations.
    pub const REQUEST_SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
    pub const TIME_TO_FIRST_TOKEN_SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    pub const INTER_TOKEN_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
    /// What the gateway adds around the engine: sub-millisecond when healthy.
    pub const OVERHEAD_SECONDS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5];
    pub const TOKENS_PER_SECOND: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];
    pub const BATCH_SIZE: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    pub const ADAPTER_LOAD_SECONDS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
}

/// The label value for anything the gateway does not serve under a known name.
pub const UNKNOWN: &str = "unknown";
/// The `adapter` label of requests served by the base model.
pub const BASE_ADAPTER: &str = "base";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("metrics: the exposition is not UTF-8: {0}")]
    Encoding(#[from] std::string::FromUtf8Error),
}

/// One request's account, as the request path hands it over when the request ends.
#[derive(Debug, Clone, Default)]
pub struct RequestObservation<'a> {
    pub task: &'a str,
    /// The alias that served it; `None` for the base model.
    pub adapter: Option<&'a str>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens a distilled adapter made unnecessary.
    pub prompt_tokens_saved: usize,
    /// Prompt tokens taken from the prefix cache (part of `prompt_tokens`).
    pub prompt_tokens_cached: usize,
    /// Request start to end (or to the client going away).
    pub duration: Duration,
    /// The longest engine time of its choices (submission to last event); `None` when the
    /// engine did not run (e.g. `max_tokens: 0`).
    pub engine_time: Option<Duration>,
    pub choices: &'a [ChoiceTiming],
}

/// One choice's timings, measured from the request's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChoiceTiming {
    /// Request start to this choice's first token.
    pub time_to_first_token: Duration,
    /// First token to last token.
    pub decode: Duration,
    pub completion_tokens: usize,
}

/// What one HTTP exchange looked like to the middleware.
#[derive(Debug, Clone, Copy)]
pub struct HttpObservation<'a> {
    /// The route template (`/v1/models/{id:.+}`), never the raw path.
    pub route: &'a str,
    pub task: Option<&'a str>,
    pub model: Option<&'a str>,
    pub status: u16,
    /// The error's stable code for 413/429/503 answers (`engine_overloaded`).
    pub rejected: Option<&'static str>,
    pub duration: Duration,
}

/// Which task and adapter names may become label values.
struct Known {
    base: String,
    registry: Option<Arc<AdapterRegistry>>,
    extra: RwLock<HashSet<String>>,
}

impl Known {
    fn contains(&self, name: &str) -> bool {
        name == self.base
            || self.registry.as_ref().is_some_and(|r| r.lease(name).is_some())
            || self.extra.read().contains(name)
    }
}

/// Every metric family, and the sources read at scrape time.
pub struct Metrics {
    registry: Registry,
    known: Known,
    started: Instant,
    engine: Option<Arc<EngineCounters>>,
    log_writers: RwLock<Vec<(&'static str, Arc<WriterStats>)>>,

    requests: IntCounterVec,
    request_duration: HistogramVec,
    time_to_first_token: HistogramVec,
    inter_token_latency: Histogram,
    gateway_overhead: Histogram,
    in_flight: IntGauge,
    queue_depth: IntGauge,
    rejected: IntCounterVec,

    prompt_tokens: IntCounterVec,
    completion_tokens: IntCounterVec,
    prompt_tokens_saved: IntCounterVec,
    prompt_tokens_cached: IntCounterVec,
    tokens_per_second: Histogram,

    running_sequences: IntGauge,
    kv_cache: IntGauge,
    adapters_loaded: IntGauge,
    adapter_bytes: IntGauge,
    adapter_swaps: IntCounterVec,
    adapter_load: Histogram,

    logs_written: IntCounterVec,
    log_write_failures: IntCounterVec,
    log_backpressure: IntCounterVec,
    log_queue_depth: IntGaugeVec,
    log_spool_pending: IntGaugeVec,
    reviews: IntCounterVec,
    examples: IntGaugeVec,
    task_readiness: GaugeVec,
    task_format_consistency: GaugeVec,
    task_projected_saved: GaugeVec,

    training_jobs: IntCounterVec,
    training_tokens_per_second: GaugeVec,
    training_loss: GaugeVec,
    eval_score: GaugeVec,
    promotions: IntCounterVec,

    upstream_requests: IntCounterVec,
    upstream_retries: IntCounterVec,
    upstream_ttft: HistogramVec,
    upstream_duration: HistogramVec,
    upstream_tokens: IntCounterVec,
    upstream_breaker: IntGaugeVec,

    uptime: Gauge,
}

/// One exchange with an upstream, as the metrics count it. `outcome` is one of a fixed set
/// (`ok`, `connect`, `timeout`, `busy`, `breaker_open`, `status_4xx`, `status_5xx`,
/// `stream_error`, `cancelled`); `upstream` a configured name.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamObservation<'a> {
    pub upstream: &'a str,
    pub outcome: &'static str,
    pub retries: u32,
    pub time_to_first_token: Option<Duration>,
    pub duration: Duration,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("base", &self.known.base).finish_non_exhaustive()
    }
}

fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    register(r, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

fn float_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec, prometheus::Error> {
    register(r, GaugeVec::new(Opts::new(name, help), labels)?)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    register(r, IntGauge::new(name, help)?)
}

fn histogram(r: &Registry, name: &str, help: &str, b: &[f64]) -> Result<Histogram, prometheus::Error> {
    register(r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(b.to_vec()))?)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    b: &[f64],
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    register(r, HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)?)
}

/// Raises a counter to `value` (a total another component keeps); never lowers it.
fn raise_to(c: &IntCounter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

fn gauge_value(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// `2xx`, `4xx`, `5xx` (and `1xx`, `3xx`).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// A registry with every family. `base` is the base model's name; `registry` (when
    /// given) decides which aliases are known and is read for adapter gauges at scrape
    /// time; `engine` is read for queue, batch and cache numbers at scrape time.
    pub fn new(
        base: &str,
        registry: Option<Arc<AdapterRegistry>>,
        engine: Option<Arc<EngineCounters>>,
    ) -> Result<Arc<Self>, MetricsError> {
        use names::*;
        let r = Registry::new();
        let build = IntGaugeVec::new(Opts::new(BUILD_INFO, "1, labelled with the gateway's version."), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build))?;
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        if let Some(e) = &engine {
            r.register(Box::new(BatchSizeCollector::new(e.clone())?))?;
        }
        let m = Metrics {
            requests: counter_vec(&r, REQUESTS, "HTTP requests answered, by route template, task, model and status class.", &["route", "task", "model", "status"])?,
            request_duration: histogram_vec(&r, REQUEST_DURATION, "HTTP request time, to the end of the body (streams included).", buckets::REQUEST_SECONDS, &["route"])?,
            time_to_first_token: histogram_vec(&r, TIME_TO_FIRST_TOKEN, "Request start to the first generated token, per choice.", buckets::TIME_TO_FIRST_TOKEN_SECONDS, &["task"])?,
            inter_token_latency: histogram(&r, INTER_TOKEN_LATENCY, "Mean time between generated tokens, per choice.", buckets::INTER_TOKEN_SECONDS)?,
            gateway_overhead: histogram(&r, GATEWAY_OVERHEAD, "Request time minus engine time (routing, templating, encoding, queueing on the HTTP side).", buckets::OVERHEAD_SECONDS)?,
            in_flight: gauge(&r, IN_FLIGHT, "HTTP requests being answered now (streams until their last byte).")?,
            queue_depth: gauge(&r, QUEUE_DEPTH, "Engine requests waiting for a batch slot.")?,
            rejected: counter_vec(&r, REJECTED, "Requests turned away (413, 429, 503), by error code.", &["reason"])?,
            prompt_tokens: counter_vec(&r, PROMPT_TOKENS, "Prompt tokens run by the engine.", &["task", "adapter"])?,
            completion_tokens: counter_vec(&r, COMPLETION_TOKENS, "Tokens generated.", &["task", "adapter"])?,
            prompt_tokens_saved: counter_vec(&r, PROMPT_TOKENS_SAVED, "Prompt tokens a distilled adapter made unnecessary.", &["task", "adapter"])?,
            prompt_tokens_cached: counter_vec(&r, PROMPT_TOKENS_CACHED, "Prompt tokens taken from the prefix cache instead of being run (counted in tunegate_prompt_tokens_total too).", &["task", "adapter"])?,
            tokens_per_second: histogram(&r, TOKENS_PER_SECOND, "Decode speed per choice: generated tokens per second after the first.", buckets::TOKENS_PER_SECOND)?,
            running_sequences: gauge(&r, RUNNING_SEQUENCES, "Sequences in the engine's running batch.")?,
            kv_cache: gauge(&r, KV_CACHE, "Bytes of keys and values held: the running sequences' KV caches plus the prefix cache.")?,
            adapters_loaded: gauge(&r, ADAPTERS_LOADED, "Aliases currently served.")?,
            adapter_bytes: gauge(&r, ADAPTER_BYTES, "Bytes of adapter weights in memory (current and retired generations).")?,
            adapter_swaps: counter_vec(&r, ADAPTER_SWAPS, "Adapter loads, swaps and unloads, by alias and result.", &["task", "result"])?,
            adapter_load: histogram(&r, ADAPTER_LOAD, "Time to read and check an adapter before it is committed.", buckets::ADAPTER_LOAD_SECONDS)?,
            logs_written: counter_vec(&r, LOGS_WRITTEN, "Log records the store accepted.", &["store"])?,
            log_write_failures: counter_vec(&r, LOG_WRITE_FAILURES, "Log store batch writes that failed (the batch went to the spool).", &["store"])?,
            log_backpressure: counter_vec(&r, LOG_BACKPRESSURE, "Log sends that found the writer's queue full and waited.", &["store"])?,
            log_queue_depth: gauge_vec(&r, LOG_QUEUE_DEPTH, "Log records waiting in the writer's queue.", &["store"])?,
            log_spool_pending: gauge_vec(&r, LOG_SPOOL_PENDING, "Log records in the spool, waiting for the store.", &["store"])?,
            reviews: counter_vec(&r, REVIEWS, "Reviews of logged examples, by resulting state.", &["task", "state"])?,
            examples: gauge_vec(&r, EXAMPLES, "Logged examples by review state.", &["task", "state"])?,
            task_readiness: float_gauge_vec(&r, TASK_READINESS, "Approved examples over the task's fine-tuning threshold, at most 1.", &["task"])?,
            task_format_consistency: float_gauge_vec(&r, TASK_FORMAT_CONSISTENCY, "Share of approved responses matching the task's dominant output shape.", &["task"])?,
            task_projected_saved: float_gauge_vec(&r, TASK_PROJECTED_SAVED, "Prompt tokens a distilled adapter would save per month at the current volume.", &["task"])?,
            training_jobs: counter_vec(&r, TRAINING_JOBS, "Fine-tuning jobs finished, by result.", &["task", "result"])?,
            training_tokens_per_second: float_gauge_vec(&r, TRAINING_TOKENS_PER_SECOND, "Training throughput of the task's last job.", &["task"])?,
            training_loss: float_gauge_vec(&r, TRAINING_LOSS, "Training loss of the task's running or last job.", &["task"])?,
            eval_score: float_gauge_vec(&r, EVAL_SCORE, "Quality-gate scores of the last evaluation.", &["task", "adapter", "metric"])?,
            promotions: counter_vec(&r, PROMOTIONS, "Trained adapters promoted to serve their task, or not.", &["task", "result"])?,
            upstream_requests: counter_vec(&r, UPSTREAM_REQUESTS, "Requests forwarded to an upstream, by outcome (ok, connect, timeout, busy, status_4xx, status_5xx, stream_error, cancelled).", &["upstream", "outcome"])?,
            upstream_retries: counter_vec(&r, UPSTREAM_RETRIES, "Retries before an upstream's first byte (connect errors, 429, 502-504).", &["upstream"])?,
            upstream_ttft: histogram_vec(&r, UPSTREAM_TIME_TO_FIRST_TOKEN, "Request start to an upstream's first generated text.", buckets::TIME_TO_FIRST_TOKEN_SECONDS, &["upstream"])?,
            upstream_duration: histogram_vec(&r, UPSTREAM_DURATION, "Whole exchanges with an upstream, streams included.", buckets::REQUEST_SECONDS, &["upstream"])?,
            upstream_tokens: counter_vec(&r, UPSTREAM_TOKENS, "Tokens upstreams reported, by kind (prompt, completion).", &["upstream", "kind"])?,
            upstream_breaker: gauge_vec(&r, UPSTREAM_BREAKER_OPEN, "1 while an upstream's circuit breaker is open (or trying one request), else 0.", &["upstream"])?,
            uptime: register(&r, Gauge::new(UPTIME, "Seconds since the gateway started.")?)?,
            registry: r,
            known: Known { base: base.to_string(), registry, extra: RwLock::new(HashSet::new()) },
            started: Instant::now(),
            engine,
            log_writers: RwLock::new(Vec::new()),
        };
        Ok(Arc::new(m))
    }

    /// A registry with nothing attached (tests, tools).
    pub fn detached(base: &str) -> Result<Arc<Self>, MetricsError> {
        Self::new(base, None, None)
    }

    /// Lets `task` appear as a label value (a configured task, a task with examples).
    pub fn know_task(&self, task: &str) {
        if !self.known.contains(task) {
            self.known.extra.write().insert(task.to_string());
        }
    }

    /// `name` if the gateway knows it, else `"unknown"`.
    pub fn label<'a>(&self, name: &'a str) -> &'a str {
        if self.known.contains(name) {
            name
        } else {
            UNKNOWN
        }
    }

    /// The `model` label: the base or a served alias, with `base:alias` kept as written.
    fn model_label<'a>(&self, model: &'a str) -> &'a str {
        let alias = model.strip_prefix(self.known.base.as_str()).and_then(|r| r.strip_prefix(':')).unwrap_or(model);
        if self.known.contains(alias) {
            model
        } else {
            UNKNOWN
        }
    }

    /// One HTTP exchange (the middleware calls this when the response body ends).
    pub fn observe_http(&self, o: &HttpObservation<'_>) {
        let task = o.task.map_or(UNKNOWN, |t| self.label(t));
        let model = o.model.map_or(UNKNOWN, |m| self.model_label(m));
        self.requests.with_label_values(&[o.route, task, model, status_class(o.status)]).inc();
        self.request_duration.with_label_values(&[o.route]).observe(o.duration.as_secs_f64());
        if let Some(reason) = o.rejected {
            self.rejected.with_label_values(&[reason]).inc();
        }
    }

    /// The in-flight gauge; the request is counted until the returned guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.clone())
    }

    /// One generation request's tokens and timings (the request record calls this when it
    /// is dropped: at the end of the response or when the client went away).
    /// An upstream's circuit breaker state, as of its last request.
    pub fn set_upstream_breaker(&self, upstream: &str, open: bool) {
        self.upstream_breaker.with_label_values(&[upstream]).set(i64::from(open));
    }

    /// Counts one exchange with an upstream.
    pub fn observe_upstream(&self, o: &UpstreamObservation<'_>) {
        self.upstream_requests.with_label_values(&[o.upstream, o.outcome]).inc();
        if o.retries > 0 {
            self.upstream_retries.with_label_values(&[o.upstream]).inc_by(u64::from(o.retries));
        }
        if let Some(t) = o.time_to_first_token {
            self.upstream_ttft.with_label_values(&[o.upstream]).observe(t.as_secs_f64());
        }
        self.upstream_duration.with_label_values(&[o.upstream]).observe(o.duration.as_secs_f64());
        for (kind, n) in [("prompt", o.prompt_tokens), ("completion", o.completion_tokens)] {
            if n > 0 {
                self.upstream_tokens.with_label_values(&[o.upstream, kind]).inc_by(n as u64);
            }
        }
    }

    pub fn observe_request(&self, o: &RequestObservation<'_>) {
        let task = self.label(o.task);
        let adapter = o.adapter.map_or(BASE_ADAPTER, |a| self.label(a));
        let by = [task, adapter];
        self.prompt_tokens.with_label_values(&by).inc_by(o.prompt_tokens as u64);
        self.completion_tokens.with_label_values(&by).inc_by(o.completion_tokens as u64);
        if o.prompt_tokens_saved > 0 {
            self.prompt_tokens_saved.with_label_values(&by).inc_by(o.prompt_tokens_saved as u64);
        }
        if o.prompt_tokens_cached > 0 {
            self.prompt_tokens_cached.with_label_values(&by).inc_by(o.prompt_tokens_cached as u64);
        }
        if let Some(engine) = o.engine_time {
            self.gateway_overhead.observe(o.duration.saturating_sub(engine).as_secs_f64());
        }
        for c in o.choices {
            self.time_to_first_token.with_label_values(&[task]).observe(c.time_to_first_token.as_secs_f64());
            if c.completion_tokens > 1 && !c.decode.is_zero() {
                let gaps = (c.completion_tokens - 1) as f64;
                self.inter_token_latency.observe(c.decode.as_secs_f64() / gaps);
                self.tokens_per_second.observe(gaps / c.decode.as_secs_f64());
            }
        }
    }

    /// An adapter load, swap or unload (the registry's observer).
    pub fn observe_adapter(&self, e: &AdapterEvent<'_>) {
        self.adapter_swaps.with_label_values(&[self.label(e.alias), e.outcome.as_str()]).inc();
        if let Some(s) = e.load_seconds {
            self.adapter_load.observe(s);
        }
    }

    /// Reads this log writer's counters at every scrape from now on.
    pub fn watch_log_writer(&self, store: &'static str, stats: Arc<WriterStats>) {
        self.log_writers.write().push((store, stats));
    }

    /// Sets the log families of `store` from a snapshot of its writer's counters.
    pub fn observe_log_writer(&self, store: &str, s: &WriterStatsSnapshot) {
        raise_to(&self.logs_written.with_label_values(&[store]), s.written);
        raise_to(&self.log_write_failures.with_label_values(&[store]), s.failed_batches);
        raise_to(&self.log_backpressure.with_label_values(&[store]), s.backpressure_events);
        self.log_queue_depth.with_label_values(&[store]).set(gauge_value(s.queue_depth));
        self.log_spool_pending.with_label_values(&[store]).set(gauge_value(s.spool_pending));
    }

    /// One review of a logged example; `state` is the state it ended in (`approved`,
    /// `rejected`, `corrected`): a fixed set, never free text.
    pub fn review(&self, task: &str, state: &str) {
        self.reviews.with_label_values(&[self.label(task), state]).inc();
    }

    /// How many examples of `task` are in `state` now.
    pub fn set_examples(&self, task: &str, state: &str, n: u64) {
        self.examples.with_label_values(&[self.label(task), state]).set(gauge_value(n));
    }

    /// The task's fine-tuning readiness (see `logs::readiness`), as the overview computed it.
    pub fn set_readiness(&self, task: &str, ratio: f64, consistency: f64, projected_per_month: f64) {
        let task = self.label(task);
        self.task_readiness.with_label_values(&[task]).set(ratio);
        self.task_format_consistency.with_label_values(&[task]).set(consistency);
        self.task_projected_saved.with_label_values(&[task]).set(projected_per_month);
    }

    /// A fine-tuning job ended: `result` is `succeeded`, `failed` or `cancelled`.
    pub fn training_job(&self, task: &str, result: &str) {
        self.training_jobs.with_label_values(&[self.label(task), result]).inc();
    }

    /// Progress of a running job.
    pub fn training_progress(&self, task: &str, loss: Option<f64>, tokens_per_second: Option<f64>) {
        let task = self.label(task);
        if let Some(l) = loss.filter(|l| l.is_finite()) {
            self.training_loss.with_label_values(&[task]).set(l);
        }
        if let Some(t) = tokens_per_second.filter(|t| t.is_finite()) {
            self.training_tokens_per_second.with_label_values(&[task]).set(t);
        }
    }

    /// A quality-gate score (`metric` is the gate's metric name, a fixed set).
    pub fn eval_score(&self, task: &str, adapter: &str, metric: &str, score: f64) {
        if score.is_finite() {
            self.eval_score.with_label_values(&[self.label(task), self.label(adapter), metric]).set(score);
        }
    }

    /// A trained adapter's promotion: `result` is `promoted`, `gate_failed` or `conflict`.
    pub fn promotion(&self, task: &str, result: &str) {
        self.promotions.with_label_values(&[self.label(task), result]).inc();
    }

    /// Reads the scrape-time sources into their gauges and counters.
    fn refresh(&self) {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        if let Some(e) = &self.engine {
            let s = e.stats();
            self.queue_depth.set(gauge_value(s.queued));
            self.running_sequences.set(gauge_value(s.running));
            self.kv_cache.set(gauge_value(s.kv_cache_bytes));
        }
        if let Some(r) = &self.known.registry {
            self.adapters_loaded.set(gauge_value(r.aliases().len()));
            self.adapter_bytes.set(gauge_value(r.total_bytes()));
        }
        for (store, stats) in self.log_writers.read().iter() {
            self.observe_log_writer(store, &stats.snapshot());
        }
    }

    /// The text exposition of every family, sources read first.
    pub fn render(&self) -> Result<String, MetricsError> {
        self.refresh();
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }
}

/// Counts a request as in flight until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// `tunegate_batch_size` built at scrape time from the engine's per-size step counts, so
/// the engine thread only bumps an atomic per step.
struct BatchSizeCollector {
    desc: Desc,
    counters: Arc<EngineCounters>,
}

impl BatchSizeCollector {
    fn new(counters: Arc<EngineCounters>) -> Result<Self, prometheus::Error> {
        let desc = Desc::new(
            names::BATCH_SIZE.into(),
            "Sequences per engine forward pass.".into(),
            Vec::new(),
            Default::default(),
        )?;
        Ok(Self { desc, counters })
    }
}

/// A histogram from exact counts: `counts[v]` observations of the value `v`.
fn histogram_from_counts(counts: &[u64], bounds: &[f64]) -> HistogramProto {
    let mut h = HistogramProto::default();
    let total: u64 = counts.iter().sum();
    let sum: f64 = counts.iter().enumerate().map(|(v, &n)| v as f64 * n as f64).sum();
    let buckets = bounds
        .iter()
        .map(|&le| {
            let mut b = Bucket::default();
            b.set_upper_bound(le);
            b.set_cumulative_count(counts.iter().enumerate().filter(|(v, _)| *v as f64 <= le).map(|(_, &n)| n).sum());
            b
        })
        .collect();
    h.set_bucket(buckets);
    h.set_sample_count(total);
    h.set_sample_sum(sum);
    h
}

impl Collector for BatchSizeCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut m = Metric::default();
        m.set_histogram(histogram_from_counts(&self.counters.steps_by_batch_size(), buckets::BATCH_SIZE));
        let mut f = MetricFamily::default();
        f.set_name(self.desc.fq_name.clone());
        f.set_help(self.desc.help.clone());
        f.set_field_type(MetricType::HISTOGRAM);
        f.set_metric(vec![m]);
        vec![f]
    }
}

#[cfg(test)]
mod tests;
