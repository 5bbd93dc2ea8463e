//! Test support: starts the real gateway on port 0 with the tiny random model written into a
//! temp dir, and drives it over HTTP with reqwest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tunegate::gateway::start_server;
use tunegate::config::Config;
use tunegate::engine::ModelShape;

/// The base model's name in test configs.
pub const MODEL: &str = "tiny";
pub const CLIENT_KEY: &str = "sk-client-test";
pub const ADMIN_KEY: &str = "sk-admin-test";

pub struct Gateway {
    pub handle: tunegate::gateway::Gateway,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    /// The bearer token sent by the helpers (`None`: no Authorization header).
    pub key: Option<String>,
}

/// A config for a gateway serving the tiny model from `dir`.
pub fn config(dir: &Path, model: &Path) -> anyhow::Result<Config> {
    Ok(Config::parse(&config_text(dir, model), "test config", Vec::new())?)
}

/// The TOML of [`config`], for a `tunegate` child process.
pub fn config_text(dir: &Path, model: &Path) -> String {
    format!(
        r#"
[server]
bind = "127.0.0.1:0"
data_dir = "{data}"
workers = 2
shutdown_timeout_seconds = 10

[model]
path = "{model}"
name = "{MODEL}"
context_length = 512
threads = 1
fetch_if_missing = false

[engine]
max_batch = 8
max_queue = 64

[adapters]
root = "{adapters}"
watch = true
watch_interval_seconds = 0.1

[limits]
max_tokens = 256
max_n = 4
max_concurrent_requests_per_key = 16
"#,
        data = dir.join("data").display(),
        model = model.display(),
        adapters = dir.join("adapters").display(),
    )
}

/// Writes the tiny model, lets `edit` change the config, starts the gateway and waits until
/// it is ready.
pub async fn start_with(edit: impl FnOnce(&mut Config, &Path)) -> anyhow::Result<Gateway> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("adapters"))?;
    let model = tunegate::testing::write_tiny_llama_gguf(dir.path())?;
    let mut cfg = config(dir.path(), &model)?;
    edit(&mut cfg, dir.path());
    let key = if cfg.auth.is_open() { None } else { Some(ADMIN_KEY.to_string()) };
    let handle = start_server(cfg).await?;
    handle.wait_ready(Duration::from_secs(60)).await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    Ok(Gateway { handle, dir, http, key })
}

pub async fn start() -> anyhow::Result<Gateway> {
    start_with(|_, _| {}).await
}

/// Client and admin keys configured; helpers send the admin key.
pub fn with_keys(cfg: &mut Config) {
    let decode = |k: &str| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
    cfg.auth.api_keys = vec![decode(CLIENT_KEY)];
    cfg.auth.admin_keys = vec![decode(ADMIN_KEY)];
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        self.handle.url(path)
    }

    pub fn adapters_root(&self) -> PathBuf {
        self.dir.path().join("adapters")
    }

    pub fn shape(&self) -> anyhow::Result<ModelShape> {
        Ok(self.handle.engine.info()?.shape.clone())
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    pub async fn post_raw(&self, path: &str, body: Value) -> anyhow::Result<reqwest::Response> {
        Ok(self.auth(self.http.post(self.url(path))).json(&body).send().await?)
    }

    /// POSTs JSON; returns the status and the JSON body.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let res = self.post_raw(path, body).await?;
        let status = res.status();
        let text = res.text().await?;
        let json = serde_json::from_str(&text).with_context(|| format!("{status}: body is not JSON: {text}"))?;
        Ok((status, json))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let res = self.auth(self.http.get(self.url(path))).send().await?;
        let status = res.status();
        let text = res.text().await?;
        let json = serde_json::from_str(&text).with_context(|| format!("{status}: body is not JSON: {text}"))?;
        Ok((status, json))
    }

    /// POSTs a streaming request and returns every `data:` payload (`[DONE]` as a string).
    pub async fn sse(&self, path: &str, body: Value) -> anyhow::Result<Vec<Value>> {
        let res = self.post_raw(path, body).await?;
        anyhow::ensure!(res.status() == StatusCode::OK, "status {}: {}", res.status(), res.text().await?);
        let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        anyhow::ensure!(ct.starts_with("text/event-stream"), "content-type {ct}");
        parse_sse(&res.text().await?)
    }

    /// Loads `path` (relative to the adapters root) as `name` over HTTP.
    pub async fn load_adapter(&self, name: &str, path: &str, inplace: bool) -> anyhow::Result<(StatusCode, Value)> {
        self.post(
            "/v1/load_lora_adapter",
            serde_json::json!({"lora_name": name, "lora_path": path, "load_inplace": inplace}),
        )
        .await
    }

    /// Greedy chat completion text.
    pub async fn greedy(&self, model: &str, prompt: &str, max_tokens: usize) -> anyhow::Result<String> {
        let (status, body) = self
            .post(
                "/v1/chat/completions",
                serde_json::json!({"model": model, "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0, "max_tokens": max_tokens}),
            )
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "{status}: {body}");
        Ok(body["choices"][0]["message"]["content"].as_str().context("no content")?.to_string())
    }
}

pub fn parse_sse(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data: Vec<&str> =
            event.lines().filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:"))).collect();
        if data.is_empty() {
            continue; // comments (keep-alive)
        }
        let data = data.join("\n");
        out.push(if data == "[DONE]" { Value::String(data) } else { serde_json::from_str(&data)? });
    }
    Ok(out)
}

/// Reads SSE events from a live response one at a time.
pub struct SseReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    pub fn new(res: reqwest::Response) -> Self {
        Self { stream: res.bytes_stream().boxed(), buf: String::new() }
    }

    /// The next `data:` payload, or `None` at the end of the body.
    pub async fn next(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..i + 2).collect();
                let mut parsed = parse_sse(&event)?;
                if let Some(v) = parsed.pop() {
                    return Ok(Some(v));
                }
                continue;
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.push_str(std::str::from_utf8(&chunk?)?),
                None => return Ok(None),
            }
        }
    }
}

/// Asserts an OpenAI-shaped error with the given status and code.
pub fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status.as_u16(), want_status, "body: {body}");
    let e = &body["error"];
    assert_eq!(e["code"], want_code, "body: {body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "body: {body}");
    assert!(e["type"].is_string(), "body: {body}");
    assert!(e.get("param").is_some(), "param must be present (maybe null): {body}");
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A multipart upload of a fine-tuning file with `key`, as the SDKs send it: the status and
/// the body text.
pub async fn upload_file(gw: &Gateway, key: &str, jsonl: &str) -> anyhow::Result<(StatusCode, String)> {
    let boundary = "tunegate-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
    );
    let res = gw
        .http
        .post(gw.url("/v1/files"))
        .bearer_auth(key)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await?;
    Ok((res.status(), res.text().await?))
}

/// Polls a fine-tuning job with `key` until it ends (4 minutes at most).
pub async fn wait_job(gw: &Gateway, key: &str, id: &str) -> anyhow::Result<Value> {
    let t = std::time::Instant::now();
    loop {
        let res = gw.http.get(gw.url(&format!("/v1/fine_tuning/jobs/{id}"))).bearer_auth(key).send().await?;
        let status = res.status();
        let job: Value = serde_json::from_str(&res.text().await?)?;
        anyhow::ensure!(status.is_success(), "job {id}: {status}: {job}");
        if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return Ok(job);
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(240), "job {id} did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
