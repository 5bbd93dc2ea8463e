//! Upstream engines: OpenAI-compatible servers (vLLM and what runs on it, llama.cpp's
//! server, OpenAI, another tunegate) that the gateway forwards requests to. A client names one
//! of their models as `<upstream>/<model>`, or by a route name (`[routes]`). This module owns
//! the client side of that exchange: which names reach which upstream, model discovery from
//! the upstream's `/v1/models`, its concurrency limit, timeouts, and retries before the first
//! byte. A route may be a fallback chain (`big = ["vllm/llama-70b", "smollm2-135m-instruct"]`):
//! the API tries its hops in order while they fail before answering (upstream unreachable,
//! timed out, 5xx, busy, breaker open; the local engine overloaded or not ready). The API turns the answers into responses, log records and metrics
//! (`api::openai::proxy`), so upstream traffic is logged and reviewable like local traffic.
//!
//! A circuit breaker per upstream: after `breaker_failures` failed requests in a row
//! (unreachable, timed out, 5xx after the retries) requests fail at once (503
//! `upstream_unavailable`) for `breaker_cooldown_seconds`; then one trial request goes
//! through, and its outcome closes the breaker or opens it again.
//!
//! An upstream's API key is read from the environment variable its config names and only
//! ever sent in the `Authorization` header: it is in no error, log line or metric.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamConfig;

/// Longest `Retry-After` honoured by waiting; a longer one ends the retries.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// First back-off; doubled per retry, with ±50 % jitter.
const BACKOFF: Duration = Duration::from_millis(100);
/// How often upstreams without a configured model list are asked for theirs; sooner while
/// one has not answered yet (it may still be starting).
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(60);
pub const DISCOVERY_RETRY: Duration = Duration::from_secs(2);

/// Every configured upstream and route.
#[derive(Debug, Default)]
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    /// Route name → its hops, in order.
    routes: BTreeMap<String, Vec<Hop>>,
}

/// One step of a route.
#[derive(Debug, Clone)]
pub enum Hop {
    Upstream(Target),
    /// A name the local router resolves (the base model, an alias, `base:alias`).
    Local(String),
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    base_url: String,
    api_key: Option<String>,
    /// Configured, or discovered (empty until discovery succeeds).
    models: RwLock<Vec<String>>,
    discover: bool,
    client: reqwest::Client,
    first_byte: Duration,
    max_retries: u32,
    slots: Arc<Semaphore>,
    max_concurrency: usize,
    breaker: parking_lot::Mutex<Breaker>,
    breaker_failures: u32,
    breaker_cooldown: Duration,
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    /// Requests go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// Requests fail at once until `until`.
    Open { until: Instant },
    /// One trial request is in flight; the others fail at once.
    Trial,
}

/// What a model name reaches: an upstream and the model name it knows.
#[derive(Debug, Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub model: String,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream '{upstream}' is at its limit of {limit} concurrent requests")]
    Busy { upstream: String, limit: usize },
    #[error("upstream '{upstream}' could not be reached: {message}")]
    Connect { upstream: String, message: String },
    #[error("upstream '{upstream}' did not answer within {seconds} s")]
    Timeout { upstream: String, seconds: f64 },
    #[error("upstream '{upstream}' failed {failures} times in a row; it gets requests again in {seconds:.0} s")]
    Open { upstream: String, failures: u32, seconds: f64 },
    /// The upstream answered with an error status; `body` is its JSON error, if any.
    #[error("upstream '{upstream}' answered {status}: {message}")]
    Status { upstream: String, status: u16, message: String, body: Option<Box<Value>>, retry_after: Option<Duration> },
}

impl UpstreamError {
    /// The metrics' outcome label.
    pub fn outcome(&self) -> &'static str {
        match self {
            UpstreamError::Busy { .. } => "busy",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Open { .. } => "breaker_open",
            UpstreamError::Status { status, .. } if *status < 500 => "status_4xx",
            UpstreamError::Status { .. } => "status_5xx",
        }
    }
}

/// A request the upstream accepted (status 2xx): its response, the retries it took, and the
/// upstream slot it holds until dropped.
pub struct Sent {
    pub response: reqwest::Response,
    pub retries: u32,
    pub slot: OwnedSemaphorePermit,
}

impl Upstreams {
    /// Builds the clients; reads each API key from its environment variable (`env`), which
    /// must be set.
    pub fn new(
        configs: &[UpstreamConfig],
        routes: &BTreeMap<String, Vec<String>>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let mut list = Vec::with_capacity(configs.len());
        for c in configs {
            let api_key = match &c.api_key_env {
                Some(var) => Some(env(var).filter(|k| !k.is_empty()).ok_or_else(|| {
                    anyhow::anyhow!("upstream '{}': the environment variable {var} (api_key_env) is not set", c.name)
                })?),
                None => None,
            };
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs_f64(c.connect_timeout_seconds))
                .timeout(Duration::from_secs_f64(c.total_timeout_seconds))
                .pool_max_idle_per_host(c.max_concurrency)
                .build()
                .map_err(|e| anyhow::anyhow!("upstream '{}': {e}", c.name))?;
            list.push(Arc::new(Upstream {
                name: c.name.clone(),
                base_url: c.base_url.trim_end_matches('/').to_string(),
                api_key,
                models: RwLock::new(c.models.clone()),
                discover: c.models.is_empty(),
                client,
                first_byte: Duration::from_secs_f64(c.first_byte_timeout_seconds),
                max_retries: c.max_retries,
                slots: Arc::new(Semaphore::new(c.max_concurrency)),
                max_concurrency: c.max_concurrency,
                breaker: parking_lot::Mutex::new(Breaker::Closed { failures: 0 }),
                breaker_failures: c.breaker_failures,
                breaker_cooldown: Duration::from_secs_f64(c.breaker_cooldown_seconds),
            }));
        }
        let mut by_name = BTreeMap::new();
        for (name, targets) in routes {
            let hops = targets
                .iter()
                .map(|t| {
                    let upstream = t.split_once('/').and_then(|(up, m)| Some((list.iter().find(|u| u.name == up)?, m)));
                    match upstream {
                        Some((u, m)) => Ok(Hop::Upstream(Target { upstream: u.clone(), model: m.to_string() })),
                        None if !t.contains('/') => Ok(Hop::Local(t.clone())),
                        None => Err(anyhow::anyhow!("route '{name}': '{t}' names no configured upstream")),
                    }
                })
                .collect::<anyhow::Result<Vec<Hop>>>()?;
            by_name.insert(name.clone(), hops);
        }
        Ok(Self { list, routes: by_name })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// What a model name reaches, when it is not (only) a local name: a route's hops, or the
    /// one upstream of `<upstream>/<model>` (see [`Upstreams::resolve`]).
    pub fn chain(&self, name: &str) -> Option<Vec<Hop>> {
        match self.routes.get(name) {
            Some(hops) => Some(hops.clone()),
            None => self.upstream_model(name).map(|t| vec![Hop::Upstream(t)]),
        }
    }

    /// The upstream a model name reaches first: a route's first upstream hop, or
    /// `<upstream>/<model>` where the model is one the upstream serves (any model while its
    /// list is unknown: the upstream then answers for it).
    pub fn resolve(&self, name: &str) -> Option<Target> {
        match self.routes.get(name) {
            Some(hops) => hops.iter().find_map(|h| match h {
                Hop::Upstream(t) => Some(t.clone()),
                Hop::Local(_) => None,
            }),
            None => self.upstream_model(name),
        }
    }

    fn upstream_model(&self, name: &str) -> Option<Target> {
        let (up, model) = name.split_once('/')?;
        let u = self.list.iter().find(|u| u.name == up)?;
        let models = u.models.read();
        (!model.is_empty() && (models.is_empty() || models.iter().any(|m| m == model)))
            .then(|| Target { upstream: u.clone(), model: model.to_string() })
    }

    /// Every name that reaches an upstream model: `<upstream>/<model>` for each known model,
    /// and each route; with the upstream's name.
    pub fn names(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for u in &self.list {
            out.extend(u.models.read().iter().map(|m| (format!("{}/{m}", u.name), u.name.clone())));
        }
        for (name, hops) in &self.routes {
            let owner = match hops.first() {
                Some(Hop::Upstream(t)) => t.upstream.name.clone(),
                _ => "tunegate".to_string(),
            };
            out.push((name.clone(), owner));
        }
        out
    }

    /// Whether an upstream's model list is still unknown (discovery has not succeeded yet).
    pub fn models_unknown(&self) -> bool {
        self.list.iter().any(|u| u.discover && u.models.read().is_empty())
    }

    /// Asks each upstream without a configured model list for its `/v1/models`; one that
    /// cannot be reached keeps what it had.
    pub async fn discover(&self) {
        for u in self.list.iter().filter(|u| u.discover) {
            match u.list_models().await {
                Ok(models) => *u.models.write() = models,
                Err(e) => tracing::warn!(upstream = %u.name, "model discovery failed: {e}"),
            }
        }
    }
}

impl Upstream {
    /// POSTs `body` to `<base_url><path>` (e.g. `/chat/completions`) and waits for the
    /// status: retried with jittered back-off (or the upstream's `Retry-After`) on connect
    /// errors, 429 and 502-504, never after the first byte. On failure, also the retries made.
    pub async fn send(&self, path: &str, body: &Value) -> Result<Sent, (UpstreamError, u32)> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            (UpstreamError::Busy { upstream: self.name.clone(), limit: self.max_concurrency }, 0)
        })?;
        self.admit().map_err(|e| (e, 0))?;
        let result = self.attempts(path, body, slot).await;
        self.settle(match &result {
            Ok(_) => true,
            // Only the upstream's own failures count; its 4xx answers are the client's.
            Err((e, _)) => !matches!(e, UpstreamError::Connect { .. } | UpstreamError::Timeout { .. } | UpstreamError::Status { status: 500.., .. }),
        });
        result
    }

    /// Whether the breaker is open (or trying one request) now.
    pub fn breaker_open(&self) -> bool {
        !matches!(*self.breaker.lock(), Breaker::Closed { .. })
    }

    /// Lets a request through the breaker, or refuses it.
    fn admit(&self) -> Result<(), UpstreamError> {
        let mut b = self.breaker.lock();
        match *b {
            Breaker::Closed { .. } => Ok(()),
            Breaker::Open { until } if Instant::now() >= until => {
                *b = Breaker::Trial;
                Ok(())
            }
            Breaker::Open { until } => Err(UpstreamError::Open {
                upstream: self.name.clone(),
                failures: self.breaker_failures,
                seconds: until.saturating_duration_since(Instant::now()).as_secs_f64(),
            }),
            Breaker::Trial => Err(UpstreamError::Open {
                upstream: self.name.clone(),
                failures: self.breaker_failures,
                seconds: 0.0,
            }),
        }
    }

    /// Counts a request's outcome in the breaker.
    fn settle(&self, ok: bool) {
        let mut b = self.breaker.lock();
        let open = Breaker::Open { until: Instant::now() + self.breaker_cooldown };
        *b = match (*b, ok) {
            (_, true) => Breaker::Closed { failures: 0 },
            (Breaker::Trial, false) => open,
            (Breaker::Closed { failures }, false) if failures + 1 >= self.breaker_failures => {
                tracing::warn!(upstream = %self.name, failures = failures + 1, "circuit breaker open");
                open
            }
            (Breaker::Closed { failures }, false) => Breaker::Closed { failures: failures + 1 },
            (state @ Breaker::Open { .. }, false) => state,
        };
    }

    async fn attempts(&self, path: &str, body: &Value, slot: OwnedSemaphorePermit) -> Result<Sent, (UpstreamError, u32)> {
        let url = format!("{}{path}", self.base_url);
        let mut retries = 0;
        loop {
            let mut req = self.client.post(&url).json(body);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            let (err, retryable) = match tokio::time::timeout(self.first_byte, req.send()).await {
                Ok(Ok(r)) if r.status().is_success() => return Ok(Sent { response: r, retries, slot }),
                Ok(Ok(r)) => {
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .and_then(|s| Duration::try_from_secs_f64(s).ok());
                    let body = r.json::<Value>().await.ok().map(Box::new);
                    let message = body
                        .as_ref()
                        .and_then(|b| b.pointer("/error/message").or_else(|| b.get("message")))
                        .and_then(Value::as_str)
                        .map_or_else(|| format!("status {status}"), |m| m.chars().take(500).collect());
                    let retryable = matches!(status, 429 | 502..=504);
                    (UpstreamError::Status { upstream: self.name.clone(), status, message, body, retry_after }, retryable)
                }
                Ok(Err(e)) if e.is_timeout() => (self.timeout(), false),
                Ok(Err(e)) => (self.connect_error(&e), e.is_connect()),
                Err(_) => (UpstreamError::Timeout { upstream: self.name.clone(), seconds: self.first_byte.as_secs_f64() }, false),
            };
            let wait = match &err {
                UpstreamError::Status { retry_after: Some(d), .. } => *d,
                _ => backoff(retries),
            };
            if !retryable || retries >= self.max_retries || wait > MAX_RETRY_WAIT {
                return Err((err, retries));
            }
            tracing::debug!(upstream = %self.name, retry = retries + 1, "retrying: {err}");
            tokio::time::sleep(wait).await;
            retries += 1;
        }
    }

    fn timeout(&self) -> UpstreamError {
        UpstreamError::Timeout { upstream: self.name.clone(), seconds: self.first_byte.as_secs_f64() }
    }

    /// A transport error, described without its URL's query or credentials (there are none
    /// in `base_url`; the key travels in a header).
    fn connect_error(&self, e: &reqwest::Error) -> UpstreamError {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        UpstreamError::Connect { upstream: self.name.clone(), message }
    }

    /// The ids in the upstream's `/models`.
    async fn list_models(&self) -> Result<Vec<String>, UpstreamError> {
        let mut req = self.client.get(format!("{}/models", self.base_url)).timeout(self.first_byte);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let r = req.send().await.map_err(|e| if e.is_timeout() { self.timeout() } else { self.connect_error(&e) })?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.map_err(|e| self.connect_error(&e))?;
        let ids: Option<Vec<String>> = body
            .get("data")
            .and_then(Value::as_array)
            .map(|d| d.iter().filter_map(|m| m.get("id")?.as_str().map(str::to_string)).collect());
        match ids {
            Some(ids) if (200..300).contains(&status) => Ok(ids),
            _ => Err(UpstreamError::Status {
                upstream: self.name.clone(),
                status,
                message: "no model list in its /models answer".into(),
                body: None,
                retry_after: None,
            }),
        }
    }
}

/// The wait before retry `n + 1`: 100 ms × 2ⁿ, ±50 % jitter.
fn backoff(n: u32) -> Duration {
    let base = BACKOFF.saturating_mul(1u32 << n.min(16));
    base.mul_f64(rand::random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, models: &[&str]) -> anyhow::Result<UpstreamConfig> {
        let text = format!(
            "name = \"{name}\"\nbase_url = \"http://127.0.0.1:9/v1/\"\nmodels = [{}]",
            models.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(",")
        );
        Ok(toml::from_str(&text)?)
    }

    #[test]
    fn names_resolve_to_listed_models_and_routes() -> anyhow::Result<()> {
        let routes = BTreeMap::from([
            ("big".to_string(), vec!["vllm/llama-70b".to_string()]),
            ("support".to_string(), vec!["base:support".to_string(), "vllm/llama-70b".to_string()]),
        ]);
        let ups = Upstreams::new(&[config("vllm", &["llama-70b"])?, config("any", &[])?], &routes, |_| None)?;
        let t = ups.resolve("vllm/llama-70b").ok_or_else(|| anyhow::anyhow!("not resolved"))?;
        assert_eq!((t.upstream.name.as_str(), t.model.as_str(), t.upstream.base_url.as_str()), ("vllm", "llama-70b", "http://127.0.0.1:9/v1"));
        let t = ups.resolve("big").ok_or_else(|| anyhow::anyhow!("route not resolved"))?;
        assert_eq!(t.model, "llama-70b");
        assert!(ups.resolve("vllm/other").is_none(), "a model the upstream does not list");
        assert!(ups.resolve("nope/llama-70b").is_none() && ups.resolve("vllm/").is_none() && ups.resolve("vllm").is_none());
        // Models not known yet: any name is forwarded.
        assert_eq!(ups.resolve("any/whatever").map(|t| t.model), Some("whatever".to_string()));
        let names: Vec<String> = ups.names().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["vllm/llama-70b", "big", "support"]);
        // A chain: local first, then the upstream; `resolve` gives its first upstream.
        let hops = ups.chain("support").ok_or_else(|| anyhow::anyhow!("no chain"))?;
        assert!(matches!(&hops[..], [Hop::Local(l), Hop::Upstream(t)] if l == "base:support" && t.model == "llama-70b"));
        assert_eq!(ups.resolve("support").map(|t| t.model), Some("llama-70b".to_string()));
        assert!(ups.chain("base:support").is_none() && ups.chain("tiny").is_none());
        Ok(())
    }

    /// Failures in a row open the breaker (requests then fail at once, not retried); after the
    /// cool-down one trial goes through, and failing, opens it again.
    #[tokio::test]
    async fn the_breaker_opens_after_failures_in_a_row_and_tries_again_after_the_cooldown() -> anyhow::Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut c = config("down", &["m"])?;
        c.base_url = format!("http://127.0.0.1:{port}/v1");
        (c.max_retries, c.breaker_failures, c.breaker_cooldown_seconds) = (0, 2, 0.3);
        let ups = Upstreams::new(&[c], &BTreeMap::new(), |_| None)?;
        let u = ups.resolve("down/m").ok_or_else(|| anyhow::anyhow!("not resolved"))?.upstream;
        let outcome = |r: Result<Sent, (UpstreamError, u32)>| r.err().map(|(e, _)| e.outcome());
        assert_eq!(outcome(u.send("/chat/completions", &Value::Null).await), Some("connect"));
        assert!(!u.breaker_open());
        assert_eq!(outcome(u.send("/chat/completions", &Value::Null).await), Some("connect"));
        assert!(u.breaker_open());
        assert_eq!(outcome(u.send("/chat/completions", &Value::Null).await), Some("breaker_open"));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(outcome(u.send("/chat/completions", &Value::Null).await), Some("connect"), "the trial");
        assert_eq!(outcome(u.send("/chat/completions", &Value::Null).await), Some("breaker_open"));
        Ok(())
    }

    #[test]
    fn a_missing_key_variable_is_an_error_and_backoff_grows_with_jitter() -> anyhow::Result<()> {
        let mut c = config("x", &["m"])?;
        c.api_key_env = Some("TUNEGATE_TEST_NO_SUCH_KEY".into());
        let e = Upstreams::new(&[c.clone()], &BTreeMap::new(), |_| None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("TUNEGATE_TEST_NO_SUCH_KEY"), "{e}");
        assert!(Upstreams::new(&[c], &BTreeMap::new(), |_| Some("sk-secret".into())).is_ok());
        for n in 0..4 {
            let d = backoff(n);
            let base = BACKOFF * (1 << n);
            assert!(d >= base / 2 && d < base * 3 / 2, "{d:?} for retry {n}");
        }
        Ok(())
    }
}
