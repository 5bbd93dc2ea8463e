//! `/metrics` over HTTP: exact counter deltas after a known sequence of requests (base,
//! adapter, distilled adapter, errors), `promtool check metrics` on a scrape, a real
//! Prometheus server scraping the gateway and answering the dashboard's queries, and every
//! PromQL expression of `config/grafana/tunegate.json` parsing on that server.
//!
//! promtool and prometheus come from the Debian `prometheus` package, which
//! `scripts/test.sh` installs; there (and wherever `CI` or `TUNEGATE_REQUIRE_PROMETHEUS`
//! is set) a missing binary fails the test instead of skipping it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tunegate::testing::write_random_adapter;
use tunegate::training::dataset::prompt_hash;

use crate::common::{self, assert_error, Gateway, MODEL};

const CHAT: &str = "/v1/chat/completions";
const SYSTEM: &str = "You are the support bot of Example Corp. Answer in one short sentence.";
/// What the distilled adapter's `tunegate.json` says dropping [`SYSTEM`] saves.
const SAVED: u64 = 42;

/// The exposition as `name{labels}` → samples, for lookups by a subset of labels.
struct Scrape(Vec<(String, BTreeMap<String, String>, f64)>);

impl Scrape {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').context("a sample line without a value")?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Label values here never hold `",` (route templates, task names, versions).
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").context("a label without a value")?;
                map.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
            out.push((name.to_string(), map, value.parse().with_context(|| format!("value of {line}"))?));
        }
        Ok(Self(out))
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, _, v)| v)
            .sum()
    }
}

async fn scrape_text(gw: &Gateway) -> anyhow::Result<String> {
    let res = gw.http.get(gw.url("/metrics")).send().await?;
    anyhow::ensure!(res.status() == 200, "GET /metrics: {}", res.status());
    let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    anyhow::ensure!(ct.starts_with("text/plain"), "content-type {ct}");
    Ok(res.text().await?)
}

async fn scrape(gw: &Gateway) -> anyhow::Result<Scrape> {
    Scrape::parse(&scrape_text(gw).await?)
}

/// A binary of the `prometheus` package, or `None` (skip) where it may be missing.
fn prometheus_tool(name: &str) -> anyhow::Result<Option<PathBuf>> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or_default();
    if found.is_none() {
        let required = ["CI", "TUNEGATE_REQUIRE_PROMETHEUS"].iter().any(|v| std::env::var_os(v).is_some());
        anyhow::ensure!(!required, "{name} is not installed (apt-get install prometheus; scripts/test.sh does)");
        eprintln!("skipping: {name} is not installed (apt-get install prometheus)");
    }
    Ok(found)
}

/// Writes an adapter into the adapters root; with `distilled`, its `tunegate.json` says it
/// absorbed [`SYSTEM`] worth [`SAVED`] tokens.
fn publish(gw: &Gateway, rel: &str, seed: u64, distilled: bool) -> anyhow::Result<()> {
    let dir = gw.adapters_root().join(rel);
    std::fs::create_dir_all(&dir)?;
    write_random_adapter(&dir, &gw.shape()?, 8, seed)?;
    if distilled {
        let meta = json!({"task": "faq", "distilled_prompt": {"sha256": prompt_hash(SYSTEM), "tokens": SAVED}});
        std::fs::write(dir.join("tunegate.json"), serde_json::to_vec(&meta)?)?;
    }
    Ok(())
}

async fn gateway() -> anyhow::Result<Gateway> {
    common::start_with(|c, _| {
        c.adapters.watch = false;
        c.server.max_body_bytes = 2048;
    })
    .await
}

/// One chat completion; returns (prompt, completion, saved header) tokens.
async fn chat(gw: &Gateway, model: &str, system: bool) -> anyhow::Result<(u64, u64, u64)> {
    let mut messages = vec![json!({"role": "user", "content": "How do I reset my password?"})];
    if system {
        messages.insert(0, json!({"role": "system", "content": SYSTEM}));
    }
    let res = gw
        .post_raw(CHAT, json!({"model": model, "messages": messages, "max_tokens": 6, "temperature": 0}))
        .await?;
    anyhow::ensure!(res.status() == 200, "{model}: {}", res.status());
    let saved = res
        .headers()
        .get("x-tunegate-prompt-tokens-saved")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body: Value = res.json().await?;
    let usage = &body["usage"];
    Ok((usage["prompt_tokens"].as_u64().unwrap_or(0), usage["completion_tokens"].as_u64().unwrap_or(0), saved))
}

/// Waits until the middleware has recorded `n` chat answers since `before` (it records
/// when a response body is dropped, just after the client has read it).
async fn settled(gw: &Gateway, before: &Scrape, n: f64) -> anyhow::Result<Scrape> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(gw).await?;
        let done = now.sum("tunegate_requests_total", &[("route", CHAT)])
            - before.sum("tunegate_requests_total", &[("route", CHAT)]);
        if done >= n || tokio::time::Instant::now() > deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_what_was_served() -> anyhow::Result<()> {
    let gw = gateway().await?;
    publish(&gw, "support/v1", 1, false)?;
    publish(&gw, "faq/v1", 2, true)?;
    for (alias, path) in [("support", "support/v1"), ("faq", "faq/v1")] {
        let (s, b) = gw.load_adapter(alias, path, false).await?;
        anyhow::ensure!(s == 200, "{b}");
    }
    let before = scrape(&gw).await?;

    let base = chat(&gw, MODEL, true).await?;
    let adapter = chat(&gw, "support", false).await?;
    let distilled = chat(&gw, "faq", true).await?;
    assert_eq!((base.2, adapter.2, distilled.2), (0, 0, SAVED), "only the distilled adapter drops the prompt");
    let (s, b) = gw.post(CHAT, json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})).await?;
    assert_error(s, &b, 404, "model_not_found");
    let big = "x".repeat(4096);
    let (s, b) = gw.post(CHAT, json!({"model": MODEL, "messages": [{"role": "user", "content": big}]})).await?;
    assert_error(s, &b, 413, "request_too_large");

    let after = settled(&gw, &before, 5.0).await?;
    let delta = |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    let ok = |task: &'static str, model: &'static str| {
        delta("tunegate_requests_total", &[("route", CHAT), ("task", task), ("model", model), ("status", "2xx")])
    };
    assert_eq!((ok(MODEL, MODEL), ok("support", "support"), ok("faq", "faq")), (1.0, 1.0, 1.0));
    let errors = [("route", CHAT), ("task", "unknown"), ("model", "unknown"), ("status", "4xx")];
    assert_eq!(delta("tunegate_requests_total", &errors), 2.0, "the 404 and the 413");
    assert_eq!(delta("tunegate_requests_total", &[("route", CHAT)]), 5.0);
    assert_eq!(delta("tunegate_rejected_total", &[("reason", "request_too_large")]), 1.0);
    assert_eq!(delta("tunegate_rejected_total", &[]), 1.0, "a 404 is not a rejection");

    for (task, adapter, (prompt, completion, _)) in
        [(MODEL, "base", base), ("support", "support", adapter), ("faq", "faq", distilled)]
    {
        let by = [("task", task), ("adapter", adapter)];
        assert_eq!(delta("tunegate_prompt_tokens_total", &by), prompt as f64, "{task}");
        assert_eq!(delta("tunegate_completion_tokens_total", &by), completion as f64, "{task}");
    }
    assert_eq!(delta("tunegate_prompt_tokens_saved_total", &[("task", "faq"), ("adapter", "faq")]), SAVED as f64);
    assert_eq!(delta("tunegate_prompt_tokens_saved_total", &[]), SAVED as f64);

    assert_eq!(delta("tunegate_request_duration_seconds_count", &[("route", CHAT)]), 5.0);
    assert_eq!(delta("tunegate_time_to_first_token_seconds_count", &[]), 3.0);
    assert_eq!(delta("tunegate_gateway_overhead_seconds_count", &[]), 3.0);
    assert!(delta("tunegate_batch_size_count", &[]) >= 3.0);
    assert_eq!(after.sum("tunegate_in_flight_requests", &[]), 1.0, "only the scrape itself");
    assert_eq!(after.sum("tunegate_queue_depth", &[]), 0.0);
    assert_eq!(after.sum("tunegate_adapters_loaded", &[]), 2.0);
    assert_eq!(after.sum("tunegate_adapter_swaps_total", &[("task", "faq"), ("result", "loaded")]), 1.0);
    assert_eq!(after.sum("tunegate_adapter_load_seconds_count", &[]), 2.0);
    assert_eq!(after.sum("tunegate_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(after.sum("process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(delta("tunegate_logs_written_total", &[("store", "sqlite")]), 3.0, "durable logs: one per answer");

    // Route templates, never raw paths or ids.
    gw.get("/v1/models/some-unknown-model-id").await?;
    gw.get("/no/such/path/12345").await?;
    let text = scrape_text(&gw).await?;
    assert!(!text.contains("some-unknown-model-id") && !text.contains("12345"), "{text}");
    assert!(text.contains(r#"route="/v1/models/{id:.+}""#), "{text}");

    if let Some(promtool) = prometheus_tool("promtool")? {
        promtool_check(&promtool, &text)?;
    }
    gw.handle.stop(true).await;
    Ok(())
}

fn promtool_check(promtool: &Path, text: &str) -> anyhow::Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("promtool stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_the_admin_key_or_be_off() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| {
        common::with_keys(c);
        c.metrics.require_admin_key = true;
    })
    .await?;
    let status = |key: Option<&'static str>| {
        let rb = gw.http.get(gw.url("/metrics"));
        let rb = match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        };
        async move { anyhow::Ok(rb.send().await?.status().as_u16()) }
    };
    assert_eq!(status(None).await?, 401);
    assert_eq!(status(Some(common::CLIENT_KEY)).await?, 403);
    assert_eq!(status(Some(common::ADMIN_KEY)).await?, 200);
    gw.handle.stop(true).await;

    let gw = common::start_with(|c, _| c.metrics.enabled = false).await?;
    assert_eq!(gw.http.get(gw.url("/metrics")).send().await?.status(), 404);
    gw.handle.stop(true).await;
    Ok(())
}

/// A Prometheus server in a temp dir, killed when dropped (test failures included).
struct PrometheusServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    /// Starts one scraping `target` (host:port) every second and waits until it is ready.
    async fn start(binary: &Path, target: &str, http: &reqwest::Client) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tunegate\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let server = Self { child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/-/ready", server.url)).send().await {
                if r.status() == 200 {
                    return Ok(server);
                }
            }
            if tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(server._dir.path().join("prometheus.log")).unwrap_or_default();
                anyhow::bail!("prometheus was not ready after 30s:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `/api/v1/query`; returns the whole answer (status checked by callers).
    async fn query(&self, http: &reqwest::Client, expr: &str) -> anyhow::Result<Value> {
        Ok(http.get(format!("{}/api/v1/query", self.url)).query(&[("query", expr)]).send().await?.json().await?)
    }

    /// The values of an instant vector (`NaN` as such).
    async fn values(&self, http: &reqwest::Client, expr: &str) -> anyhow::Result<Vec<f64>> {
        let v = self.query(http, expr).await?;
        anyhow::ensure!(v["status"] == "success", "{expr}: {v}");
        Ok(v["data"]["result"]
            .as_array()
            .map(|r| r.iter().filter_map(|s| s["value"][1].as_str()?.parse().ok()).collect())
            .unwrap_or_default())
    }

    /// Waits until Prometheus holds at least `n` scrapes of the gateway.
    async fn scraped(&self, http: &reqwest::Client, n: f64) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let count = self.values(http, r#"count_over_time(up{job="tunegate"}[5m])"#).await?;
            if count.first().is_some_and(|&c| c >= n) {
                return Ok(());
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "fewer than {n} scrapes after 30s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every `expr` in the dashboard, with Grafana's variables replaced by what Prometheus
/// takes.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    let vars = [("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"), ("${task}", ".*"), ("$task", ".*")];
    out.into_iter().map(|e| vars.iter().fold(e, |e, (var, value)| e.replace(var, value))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_answers_the_dashboard() -> anyhow::Result<()> {
    let Some(binary) = prometheus_tool("prometheus")? else { return Ok(()) };
    let gw = gateway().await?;
    publish(&gw, "faq/v1", 2, true)?;
    let (s, b) = gw.load_adapter("faq", "faq/v1", false).await?;
    anyhow::ensure!(s == 200, "{b}");
    // Twice, so that the prefix-cache counter exists (with a hit) before the first scrape:
    // `rate` sees increases of a series, not its first value.
    chat(&gw, "faq", true).await?;
    chat(&gw, "faq", true).await?;

    let prom = PrometheusServer::start(&binary, &gw.handle.addr.to_string(), &gw.http).await?;
    prom.scraped(&gw.http, 1.0).await?;
    for _ in 0..2 {
        chat(&gw, "faq", true).await?;
    }
    prom.scraped(&gw.http, 3.0).await?;

    let saved = prom.values(&gw.http, "sum(rate(tunegate_prompt_tokens_saved_total[1m]))").await?;
    assert!(saved.first().is_some_and(|&v| v > 0.0), "saved tokens rate: {saved:?}");
    // The same request again and again: its prompt comes from the prefix cache.
    let cached = prom.values(&gw.http, "sum(rate(tunegate_prompt_tokens_cached_total[1m]))").await?;
    assert!(cached.first().is_some_and(|&v| v > 0.0), "cached tokens rate: {cached:?}");
    let p50 = prom
        .values(&gw.http, "histogram_quantile(0.5, sum(rate(tunegate_request_duration_seconds_bucket[1m])) by (le))")
        .await?;
    assert!(p50.first().is_some_and(|v| v.is_finite() && *v > 0.0), "request p50: {p50:?}");

    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana/tunegate.json"))?;
    let dashboard: Value = serde_json::from_str(&text)?;
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for q in &queries {
        let answer = prom.query(&gw.http, q).await?;
        assert_eq!(answer["status"], "success", "{q}: {answer}");
    }
    drop(prom);
    gw.handle.stop(true).await;
    Ok(())
}

/// The Responses API's `instructions` are the system prompt: a distilled adapter drops them,
/// and the saving is reported as for chat (header, usage, metric).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_instructions_are_distilled_like_a_system_prompt() -> anyhow::Result<()> {
    let gw = gateway().await?;
    publish(&gw, "faq/v1", 2, true)?;
    let (s, b) = gw.load_adapter("faq", "faq/v1", false).await?;
    anyhow::ensure!(s == 200, "{b}");
    let before = scrape(&gw).await?;
    let respond = |model: &'static str| {
        gw.post_raw(
            "/v1/responses",
            json!({"model": model, "instructions": SYSTEM, "input": "How do I reset my password?",
                "max_output_tokens": 4, "temperature": 0}),
        )
    };
    let mut seen = Vec::new();
    for model in [MODEL, "faq"] {
        let res = respond(model).await?;
        anyhow::ensure!(res.status() == 200, "{model}: {}", res.status());
        let header = res.headers().get("x-tunegate-prompt-tokens-saved").and_then(|v| v.to_str().ok()?.parse().ok());
        let body: Value = res.json().await?;
        let usage = body["usage"].clone();
        seen.push((header.unwrap_or(0u64), usage));
    }
    let (base, distilled) = (&seen[0], &seen[1]);
    assert_eq!((base.0, distilled.0), (0, SAVED), "only the distilled adapter drops the instructions");
    assert_eq!(base.1["input_tokens_details"]["distilled_tokens"], 0);
    assert_eq!(distilled.1["input_tokens_details"]["distilled_tokens"], SAVED);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(&gw).await?;
        let delta = now.sum("tunegate_prompt_tokens_saved_total", &[("task", "faq")])
            - before.sum("tunegate_prompt_tokens_saved_total", &[("task", "faq")]);
        if delta == SAVED as f64 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "saved-tokens metric moved by {delta}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
