//! The security suite: tenancy (one key's objects are that key's alone) and the probes of
//! issue 15, each against the real HTTP server. Keys: two named tenants A and B, a plain
//! client key (a tenant of its own), a key limited to one model, and an admin key. A secret
//! marker in A's data must never appear in anything B receives.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tunegate::config::{Config, KeyEntry};

use crate::common::{self, Gateway, ADMIN_KEY, CLIENT_KEY, MODEL};

const KEY_A: &str = "sk-tenant-a";
const KEY_B: &str = "sk-tenant-b";
const KEY_SCOPED: &str = "sk-only-support";
/// In every object A creates; must never reach B.
const SECRET: &str = "SECRET-OF-TENANT-A-7f3c";

/// This process's resident memory in KiB (each nextest test runs in its own process).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn hash(k: &str) -> [u8; 32] {
    Sha256::digest(k.as_bytes()).into()
}

fn tenants(cfg: &mut Config) {
    cfg.auth.admin_keys = vec![hash(ADMIN_KEY)];
    cfg.auth.api_keys = vec![hash(CLIENT_KEY)];
    let key = |k: &str, tenant: &str, models: Option<Vec<String>>, train: &[&str]| KeyEntry {
        hash: hash(k),
        tenant: tenant.into(),
        admin: false,
        models,
        train_tasks: train.iter().map(|t| t.to_string()).collect(),
    };
    cfg.auth.keys = vec![
        key(KEY_A, "team-a", None, &["granted"]),
        key(KEY_B, "team-b", None, &[]),
        key(KEY_SCOPED, "team-c", Some(vec!["support".into()]), &[]),
    ];
}

async fn start(edit: impl FnOnce(&mut Config, &Path)) -> anyhow::Result<Gateway> {
    common::start_with(|c, d| {
        tenants(c);
        edit(c, d);
    })
    .await
}

/// One request with `key` (None: no Authorization header); the status and the body text.
async fn call(gw: &Gateway, key: Option<&str>, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<(StatusCode, String)> {
    let mut rb = gw.http.request(method, gw.url(path));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let res = rb.send().await?;
    Ok((res.status(), res.text().await?))
}

async fn call_json(gw: &Gateway, key: &str, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let (status, text) = call(gw, Some(key), method, path, body).await?;
    anyhow::ensure!(status.is_success(), "{path}: {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

async fn upload(gw: &Gateway, key: &str, jsonl: &str) -> anyhow::Result<(StatusCode, String)> {
    common::upload_file(gw, key, jsonl).await
}

/// A small training file whose every line carries the secret.
fn train_jsonl() -> String {
    (0..6)
        .map(|i| {
            json!({"messages": [
                {"role": "system", "content": format!("{SECRET} classify")},
                {"role": "user", "content": format!("item {i}")},
                {"role": "assistant", "content": if i % 2 == 0 { "even" } else { "odd" }},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

fn chat_body(model: &str, store: bool) -> Value {
    json!({"model": model, "store": store, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "system", "content": SECRET}, {"role": "user", "content": "hello"}],
        "metadata": {"task": "secret-task"}})
}

async fn wait_job(gw: &Gateway, key: &str, id: &str) -> anyhow::Result<Value> {
    common::wait_job(gw, key, id).await
}

/// A's objects: a stored completion, a stored response, a file, a finished job (with its
/// own adapter).
struct AObjects {
    completion: String,
    response: String,
    file: String,
    job: String,
    model: String,
}

async fn make_a_objects(gw: &Gateway) -> anyhow::Result<AObjects> {
    let c = call_json(gw, KEY_A, Method::POST, "/v1/chat/completions", Some(&chat_body(MODEL, true))).await?;
    let completion = c["id"].as_str().unwrap_or_default().to_string();
    let body = json!({"model": MODEL, "instructions": SECRET, "input": SECRET, "max_output_tokens": 2});
    let r = call_json(gw, KEY_A, Method::POST, "/v1/responses", Some(&body)).await?;
    let response = r["id"].as_str().unwrap_or_default().to_string();
    let (status, text) = upload(gw, KEY_A, &train_jsonl()).await?;
    anyhow::ensure!(status == StatusCode::OK, "upload: {status}: {text}");
    let file = serde_json::from_str::<Value>(&text)?["id"].as_str().unwrap_or_default().to_string();
    let job = call_json(
        gw,
        KEY_A,
        Method::POST,
        "/v1/fine_tuning/jobs",
        Some(&json!({"model": MODEL, "training_file": file, "suffix": "mine", "hyperparameters": {"n_epochs": 1}})),
    )
    .await?;
    let job_id = job["id"].as_str().unwrap_or_default().to_string();
    let done = wait_job(gw, KEY_A, &job_id).await?;
    anyhow::ensure!(done["status"] == "succeeded", "{done}");
    let model = done["fine_tuned_model"].as_str().unwrap_or_default().to_string();
    Ok(AObjects { completion, response, file, job: job_id, model })
}

/// Every route, with the status each kind of caller gets for A's objects. `{c}`, `{r}`,
/// `{f}`, `{j}` and `{m}` stand for A's completion, response, file, job and fine-tuned model.
fn matrix() -> Vec<(Method, &'static str, Option<Value>, [u16; 5])> {
    // Columns: no key, wrong key, A, B, admin.
    let get = Method::GET;
    let post = Method::POST;
    let del = Method::DELETE;
    vec![
        (get.clone(), "/health", None, [200, 200, 200, 200, 200]),
        (get.clone(), "/ready", None, [200, 200, 200, 200, 200]),
        (get.clone(), "/ui", None, [200, 200, 200, 200, 200]),
        (get.clone(), "/ui/app.js", None, [200, 200, 200, 200, 200]),
        (get.clone(), "/metrics", None, [200, 200, 200, 200, 200]),
        (get.clone(), "/v1/models", None, [401, 401, 200, 200, 200]),
        (get.clone(), "/v1/models/{m}", None, [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/chat/completions", None, [401, 401, 200, 200, 200]),
        (get.clone(), "/v1/chat/completions/{c}", None, [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/chat/completions/{c}/messages", None, [401, 401, 200, 404, 200]),
        (post.clone(), "/v1/chat/completions/{c}", Some(json!({"metadata": {"k": "v"}})), [401, 401, 200, 404, 200]),
        (post.clone(), "/v1/feedback", Some(json!({"completion_id": "{c}", "thumbs": "up"})), [401, 401, 200, 404, 200]),
        (
            post.clone(),
            "/v1/chat/completions",
            Some(json!({"model": "{m}", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})),
            [401, 401, 200, 404, 200],
        ),
        (
            post.clone(),
            "/v1/completions",
            Some(json!({"model": "{m}", "prompt": "x", "max_tokens": 2})),
            [401, 401, 200, 404, 200],
        ),
        (get.clone(), "/v1/responses/{r}", None, [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/responses/{r}/input_items", None, [401, 401, 200, 404, 200]),
        (
            post.clone(),
            "/v1/responses",
            Some(json!({"model": MODEL, "input": "x", "previous_response_id": "{r}", "max_output_tokens": 2})),
            [401, 401, 200, 404, 200],
        ),
        (post.clone(), "/v1/responses", Some(json!({"model": "{m}", "input": "x", "max_output_tokens": 2})), [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/files", None, [401, 401, 200, 200, 200]),
        (post.clone(), "/v1/files", Some(json!({"purpose": "fine-tune"})), [401, 401, 400, 400, 400]),
        (get.clone(), "/v1/files/{f}", None, [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/files/{f}/content", None, [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/fine_tuning/jobs", None, [401, 401, 200, 200, 200]),
        (get.clone(), "/v1/fine_tuning/jobs/{j}", None, [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/fine_tuning/jobs/{j}/events", None, [401, 401, 200, 404, 200]),
        (get.clone(), "/v1/fine_tuning/jobs/{j}/checkpoints", None, [401, 401, 200, 404, 200]),
        // A finished job cannot be cancelled (409) — but B must not even learn it exists.
        (post.clone(), "/v1/fine_tuning/jobs/{j}/cancel", None, [401, 401, 409, 404, 409]),
        (
            post.clone(),
            "/v1/fine_tuning/jobs",
            Some(json!({"model": MODEL, "training_file": "{f}", "hyperparameters": {"n_epochs": 100000}})),
            [401, 401, 400, 404, 400],
        ),
        (
            post.clone(),
            "/v1/fine_tuning/jobs",
            Some(json!({"model": MODEL, "task": "secret-task"})),
            [401, 401, 403, 403, 200],
        ),
        (get.clone(), "/v1/lora_adapters", None, [401, 401, 403, 403, 200]),
        (post.clone(), "/v1/load_lora_adapter", Some(json!({"lora_name": "x", "lora_path": "nope"})), [401, 401, 403, 403, 404]),
        (post.clone(), "/v1/unload_lora_adapter", Some(json!({"lora_name": "nope"})), [401, 401, 403, 403, 404]),
        (get.clone(), "/admin/logs", None, [401, 401, 403, 403, 200]),
        (get.clone(), "/admin/logs/{c}", None, [401, 401, 403, 403, 200]),
        (post.clone(), "/admin/logs/{c}/review", Some(json!({"state": "approved"})), [401, 401, 403, 403, 200]),
        (post.clone(), "/admin/logs/review", Some(json!({"ids": ["{c}"], "state": "rejected"})), [401, 401, 403, 403, 200]),
        (get.clone(), "/admin/tasks", None, [401, 401, 403, 403, 200]),
        (del.clone(), "/v1/files/{f}", None, [401, 401, 200, 404, 404]),
        (del.clone(), "/v1/chat/completions/{c}", None, [401, 401, 200, 404, 404]),
        (del.clone(), "/v1/responses/{r}", None, [401, 401, 200, 404, 404]),
    ]
}

fn fill(s: &str, a: &AObjects) -> String {
    s.replace("{c}", &a.completion).replace("{r}", &a.response).replace("{f}", &a.file).replace("{j}", &a.job).replace("{m}", &a.model)
}

fn fill_value(v: &Value, a: &AObjects) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&fill(&v.to_string(), a))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_by_key_matrix_keeps_tenants_apart() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let a = make_a_objects(&gw).await?;
    let keys: [Option<&str>; 5] = [None, Some("sk-wrong"), Some(KEY_A), Some(KEY_B), Some(ADMIN_KEY)];
    let names = ["no key", "wrong key", "A", "B", "admin"];
    let mut failures = Vec::new();
    // B first (it must not change A's objects), then the rest in the table's order; the
    // deletes come last in the table, A's before the admin's (which then find nothing).
    for (method, path, body, want) in matrix() {
        let path = fill(path, &a);
        let body = body.as_ref().map(|b| fill_value(b, &a)).transpose()?;
        for (i, key) in [3usize, 0, 1, 2, 4].into_iter().map(|i| (i, keys[i])) {
            let (status, text) = call(&gw, key, method.clone(), &path, body.as_ref()).await?;
            if status.as_u16() != want[i] {
                failures.push(format!("{method} {path} as {}: {status} (want {}): {}", names[i], want[i], &text[..text.len().min(300)]));
            }
            if i == 3 && text.contains(SECRET) {
                failures.push(format!("{method} {path}: B received A's secret: {text}"));
            }
            if i == 3 && [&a.completion, &a.file, &a.job].iter().any(|id| text.contains(id.as_str())) && !text.contains("\"error\"") {
                failures.push(format!("{method} {path}: B received one of A's ids: {text}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_show_each_tenant_its_own_and_the_admin_everything() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let mut ids = Vec::new();
    for key in [KEY_A, KEY_B, CLIENT_KEY] {
        let c = call_json(&gw, key, Method::POST, "/v1/chat/completions", Some(&chat_body(MODEL, true))).await?;
        ids.push(c["id"].as_str().unwrap_or_default().to_string());
    }
    for (i, key) in [KEY_A, KEY_B, CLIENT_KEY].into_iter().enumerate() {
        let list = call_json(&gw, key, Method::GET, "/v1/chat/completions", None).await?;
        let seen: Vec<&str> = list["data"].as_array().into_iter().flatten().filter_map(|c| c["id"].as_str()).collect();
        assert_eq!(seen, vec![ids[i].as_str()], "key {i}");
    }
    let all = call_json(&gw, ADMIN_KEY, Method::GET, "/v1/chat/completions", None).await?;
    assert_eq!(all["data"].as_array().map(Vec::len), Some(3));
    // The log records carry the tenant; the admin's review API shows it.
    let rec = call_json(&gw, ADMIN_KEY, Method::GET, &format!("/admin/logs/{}", ids[0]), None).await?;
    assert_eq!(rec["tenant"], "team-a", "{rec}");
    // Feedback on another tenant's completion is refused and changes nothing.
    let (status, _) =
        call(&gw, Some(KEY_B), Method::POST, "/v1/feedback", Some(&json!({"completion_id": ids[0], "thumbs": "up"}))).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let rec = call_json(&gw, ADMIN_KEY, Method::GET, &format!("/admin/logs/{}", ids[0]), None).await?;
    assert!(rec["feedback"].is_null(), "{rec}");
    Ok(())
}

/// Probe 1: a client job named like a served alias gets a model of its own; the alias, its
/// pin and what it serves stay; training on another task's logs needs a grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_job_never_replaces_an_alias_it_does_not_own() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let shape = gw.shape()?;
    let lora = tunegate::testing::TinyLora::random(&shape, 4, &tunegate::engine::lora::Proj::ALL, 7);
    lora.write_peft(&gw.adapters_root().join("support/v1"), &shape)?;
    anyhow::ensure!(
        common::eventually(Duration::from_secs(10), || gw.handle.registry.lease("support").is_some()).await,
        "the operator's adapter did not load"
    );
    let before = gw.handle.registry.lease("support").map(|l| l.generation);
    let (status, text) = upload(&gw, KEY_A, &train_jsonl()).await?;
    anyhow::ensure!(status == StatusCode::OK, "{text}");
    let file = serde_json::from_str::<Value>(&text)?["id"].as_str().unwrap_or_default().to_string();
    for body in [
        json!({"model": MODEL, "training_file": file, "task": "support"}),
        json!({"model": MODEL, "task": "support"}),
    ] {
        let (status, text) = call(&gw, Some(KEY_A), Method::POST, "/v1/fine_tuning/jobs", Some(&body)).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    }
    let job = call_json(
        &gw,
        KEY_A,
        Method::POST,
        "/v1/fine_tuning/jobs",
        Some(&json!({"model": MODEL, "training_file": file, "validation_file": file, "suffix": "support",
            "hyperparameters": {"n_epochs": 1}})),
    )
    .await?;
    let done = wait_job(&gw, KEY_A, job["id"].as_str().unwrap_or_default()).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let name = done["fine_tuned_model"].as_str().unwrap_or_default().to_string();
    assert!(name.starts_with("support-") && name != "support", "{name}");
    assert_eq!(gw.handle.registry.lease("support").map(|l| l.generation), before, "the alias was replaced");
    assert_eq!(tunegate::adapters::watch::read_pin(&gw.adapters_root(), "support"), None);
    // A's model is A's: B and the model-scoped key cannot call it or see it.
    let body = json!({"model": name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2});
    for (key, want) in [(KEY_A, 200), (ADMIN_KEY, 200), (KEY_B, 404), (KEY_SCOPED, 404)] {
        let (status, text) = call(&gw, Some(key), Method::POST, "/v1/chat/completions", Some(&body)).await?;
        assert_eq!(status.as_u16(), want, "{key}: {text}");
        let (_, models) = call(&gw, Some(key), Method::GET, "/v1/models", None).await?;
        assert_eq!(models.contains(&name), want == 200, "{key}: {models}");
    }
    // The model-scoped key reaches only what its list names.
    let (status, _) = call(&gw, Some(KEY_SCOPED), Method::POST, "/v1/chat/completions", Some(&chat_body(MODEL, false))).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&gw, Some(KEY_SCOPED), Method::POST, "/v1/chat/completions", Some(&chat_body("support", false))).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

/// Probe 5 and 16: names that would leave the adapters folder, and hyper-parameters out of
/// range, are refused (never clamped); a tenant's active jobs are bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_parameters_are_checked_not_clamped() -> anyhow::Result<()> {
    let gw = start(|c, _| c.limits.max_active_jobs_per_tenant = 1).await?;
    let (status, text) = upload(&gw, KEY_A, &train_jsonl()).await?;
    anyhow::ensure!(status == StatusCode::OK, "{text}");
    let file = serde_json::from_str::<Value>(&text)?["id"].as_str().unwrap_or_default().to_string();
    for (extra, param) in [
        (json!({"suffix": ".."}), "suffix"),
        (json!({"suffix": "../x"}), "suffix"),
        (json!({"suffix": ".hidden"}), "suffix"),
        (json!({"hyperparameters": {"n_epochs": 1_000_000_000u64}}), "n_epochs"),
        (json!({"hyperparameters": {"n_epochs": 0}}), "n_epochs"),
        (json!({"hyperparameters": {"batch_size": 0}}), "batch_size"),
    ] {
        let mut body = json!({"model": MODEL, "training_file": file});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        for key in [KEY_A, ADMIN_KEY] {
            let (status, text) = call(&gw, Some(key), Method::POST, "/v1/fine_tuning/jobs", Some(&body)).await?;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
            assert!(text.contains(param), "{text}");
        }
    }
    assert!(!gw.dir.path().join("v1").exists() && !gw.dir.path().join("CURRENT").exists());
    let first = call_json(&gw, KEY_A, Method::POST, "/v1/fine_tuning/jobs", Some(&json!({"model": MODEL, "training_file": file}))).await?;
    let (status, text) =
        call(&gw, Some(KEY_A), Method::POST, "/v1/fine_tuning/jobs", Some(&json!({"model": MODEL, "training_file": file}))).await?;
    if first["status"] == "queued" || first["status"] == "running" {
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    }
    Ok(())
}

/// Probe 3: a compressed body is not inflated (no decompression): it is refused, and memory
/// does not grow with what it would inflate to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_not_inflated() -> anyhow::Result<()> {
    use std::io::Write;
    let gw = start(|_, _| {}).await?;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![b' '; 1 << 20];
    enc.write_all(b"{\"model\": \"tiny\", \"messages\": [], \"x\": \"")?;
    for _ in 0..256 {
        enc.write_all(&zeros)?;
    }
    let bomb = enc.finish()?;
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let before = rss_kib();
    let sends = (0..4).map(|_| {
        gw.http
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(bomb.clone())
            .send()
    });
    for res in futures_util::future::join_all(sends).await {
        let res = res?;
        assert!(res.status().is_client_error(), "{}", res.status());
        let body: Value = res.json().await?;
        assert!(body["error"]["code"].is_string(), "{body}");
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "resident memory grew {grown_mib} MiB for 4 compressed bodies");
    Ok(())
}

/// Probe 7: sequences, not HTTP requests, count against the per-key limit, and one request
/// cannot ask for more than `limits.max_sequences_per_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_prompts_cannot_fill_the_queue() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let prompts: Vec<String> = (0..300).map(|i| format!("p{i}")).collect();
    let (status, text) =
        call(&gw, Some(KEY_A), Method::POST, "/v1/completions", Some(&json!({"model": MODEL, "prompt": prompts, "max_tokens": 2}))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("max_sequences_per_request"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_counts_every_token_as_one_caller() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| c.limits.max_concurrent_requests_per_key = 2).await?;
    // Three long streams, each with a fresh bearer token: the third is over the limit.
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": true, "ignore_eos": true});
    let mut held = Vec::new();
    for i in 0..2 {
        let res = gw.http.post(gw.url("/v1/completions")).bearer_auth(format!("fresh-{i}")).json(&body).send().await?;
        assert_eq!(res.status(), StatusCode::OK);
        held.push(res);
    }
    let res = gw.http.post(gw.url("/v1/completions")).bearer_auth("fresh-3").json(&body).send().await?;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    Ok(())
}

/// Probe 8: an open server refuses what a web page could send it: a non-JSON body, a
/// foreign `Host` (DNS rebinding), a foreign `Origin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_refuses_cross_site_requests() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let body = json!({"filter": {"state": "pending"}, "state": "rejected"}).to_string();
    let res = gw.http.post(gw.url("/admin/logs/review")).header("content-type", "text/plain").body(body.clone()).send().await?;
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", res.text().await?);
    let res = gw.http.post(gw.url("/admin/logs/review")).body(body.clone()).send().await?;
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let res = gw.http.get(gw.url("/admin/logs")).header("host", "attacker.example:8080").send().await?;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = gw
        .http
        .post(gw.url("/v1/files"))
        .header("origin", "https://attacker.example")
        .header("content-type", "multipart/form-data; boundary=x")
        .body("--x--\r\n")
        .send()
        .await?;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // The same-origin review page and local tools still work.
    let res = gw.http.get(gw.url("/admin/logs")).header("origin", gw.url("")).send().await?;
    assert_eq!(res.status(), StatusCode::OK);
    let res = gw.http.get(gw.url("/admin/logs")).header("host", "localhost:8080").send().await?;
    assert_eq!(res.status(), StatusCode::OK);
    Ok(())
}

/// Probe 9: uploads are bounded (streamed to disk, size and concurrency limits); chat
/// metadata is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_metadata_are_bounded() -> anyhow::Result<()> {
    let gw = start(|c, _| c.limits.max_upload_bytes = 64 * 1024).await?;
    let big: String = train_jsonl().repeat(200);
    let (status, text) = upload(&gw, KEY_A, &big).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    let files = std::fs::read_dir(gw.dir.path().join("data/files"))?.count();
    assert_eq!(files, 0, "a refused upload left files behind");
    let metadata: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let mut body = chat_body(MODEL, false);
    body["metadata"] = Value::Object(metadata);
    let (status, text) = call(&gw, Some(KEY_A), Method::POST, "/v1/chat/completions", Some(&body)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    body["metadata"] = json!({"k": "v".repeat(600)});
    let (status, _) = call(&gw, Some(KEY_A), Method::POST, "/v1/chat/completions", Some(&body)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    Ok(())
}

/// Probe 10: tokenizing a multi-megabyte prompt does not stall the HTTP workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prompt_does_not_stall_other_requests() -> anyhow::Result<()> {
    let gw = start(|c, _| {
        c.server.max_body_bytes = 8_000_000;
        c.server.workers = 1;
    })
    .await?;
    let prompt = "lorem ipsum dolor sit amet ".repeat(140_000);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "n": 2});
    let big = {
        let (http, url) = (gw.http.clone(), gw.url("/v1/chat/completions"));
        tokio::spawn(async move { http.post(url).bearer_auth(KEY_A).json(&body).send().await.map(|r| r.status()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let res = gw.http.get(gw.url("/health")).send().await?;
        assert_eq!(res.status(), StatusCode::OK);
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = big.await??;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the prompt is beyond the context length");
    // Tokenizing the prompt takes seconds; an HTTP worker that did it would stall /health
    // for all of that.
    assert!(worst < Duration::from_millis(800), "/health took {worst:?} while a huge prompt was tokenized");
    Ok(())
}

/// Probe 12: a body that trickles in is cut off with 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start(|c, _| c.limits.body_timeout_seconds = 1.0).await?;
    let mut s = tokio::net::TcpStream::connect(gw.handle.addr).await?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).await?;
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    Ok(())
}

/// Probes 6 and 13: adapter files that are links, folders linked from outside the root,
/// NaN weights and absurd alphas are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_with_links_or_non_finite_values_are_refused() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let shape = gw.shape()?;
    let root = gw.adapters_root();
    let outside = gw.dir.path().join("outside");
    let lora = tunegate::testing::TinyLora::random(&shape, 4, &tunegate::engine::lora::Proj::ALL, 3);
    lora.write_peft(&outside.join("v1"), &shape)?;
    std::fs::write(outside.join("secret.json"), format!("{{\"leak\": \"{SECRET}\"}}"))?;
    // A version folder that is a link out of the root: never loaded by the watcher.
    std::fs::create_dir_all(root.join("linked"))?;
    std::os::unix::fs::symlink(outside.join("v1"), root.join("linked/v1"))?;
    // A real folder whose tunegate.json is a link to a file outside.
    lora.write_peft(&root.join("meta/v1"), &shape)?;
    std::os::unix::fs::symlink(outside.join("secret.json"), root.join("meta/v1/tunegate.json"))?;
    // NaN weights and an absurd alpha.
    lora.write_peft(&root.join("nan/v1"), &shape)?;
    let weights = root.join("nan/v1/adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)?;
    for t in tensors.values_mut() {
        *t = (t.clone() * f64::NAN)?;
    }
    candle_core::safetensors::save(&tensors, &weights)?;
    lora.write_peft(&root.join("alpha/v1"), &shape)?;
    let cfg_path = root.join("alpha/v1/adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    cfg["lora_alpha"] = json!(1e300);
    std::fs::write(&cfg_path, cfg.to_string())?;

    tokio::time::sleep(Duration::from_millis(800)).await;
    let loaded = gw.handle.registry.aliases();
    for name in ["linked", "meta", "nan", "alpha"] {
        assert!(!loaded.iter().any(|a| a == name), "{name} was loaded: {loaded:?}");
    }
    for (name, path, why) in [
        ("m1", "meta/v1", "symbolic link"),
        ("m2", "nan/v1", "NaN"),
        ("m3", "alpha/v1", "lora_alpha"),
    ] {
        let (status, text) = call(
            &gw,
            Some(ADMIN_KEY),
            Method::POST,
            "/v1/load_lora_adapter",
            Some(&json!({"lora_name": name, "lora_path": path})),
        )
        .await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {text}");
        assert!(text.contains(why), "{text}");
        assert!(!text.contains(SECRET));
    }
    let (_, listed) = call(&gw, Some(ADMIN_KEY), Method::GET, "/v1/lora_adapters", None).await?;
    assert!(!listed.contains(SECRET), "{listed}");
    Ok(())
}

/// Probe 14: on a keyed server `/ready` names adapters only to an admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_names_adapters_only_to_admins() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let shape = gw.shape()?;
    tunegate::testing::TinyLora::random(&shape, 4, &tunegate::engine::lora::Proj::ALL, 1)
        .write_peft(&gw.adapters_root().join("acme-private/v1"), &shape)?;
    anyhow::ensure!(
        common::eventually(Duration::from_secs(10), || gw.handle.registry.lease("acme-private").is_some()).await,
        "not loaded"
    );
    let (_, anon) = call(&gw, None, Method::GET, "/ready", None).await?;
    assert!(!anon.contains("acme-private") && anon.contains("\"adapters_loaded\":1"), "{anon}");
    let (_, admin) = call(&gw, Some(ADMIN_KEY), Method::GET, "/ready", None).await?;
    assert!(admin.contains("acme-private"), "{admin}");
    Ok(())
}

/// Probe 15: a temperature too small to divide by samples greedily.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_temperature_is_greedy() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let text = |t: f64| {
        let gw = &gw;
        async move {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 12,
                "temperature": t, "seed": 1});
            let v = call_json(gw, KEY_A, Method::POST, "/v1/chat/completions", Some(&body)).await?;
            anyhow::Ok(v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
        }
    };
    let greedy = text(0.0).await?;
    for t in [1e-38, 1e-30, 1e-9] {
        assert_eq!(text(t).await?, greedy, "temperature {t}");
    }
    Ok(())
}

/// Probe 11: with the log store down and the spool unwritable (a full disk), responses do
/// not wait out the durable commit; the records wait in memory and are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_spool_does_not_hold_responses() -> anyhow::Result<()> {
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let gw = start(|c, d| {
        c.logs.store = tunegate::config::LogBackend::Redis;
        c.logs.redis_url = format!("redis://127.0.0.1:{dead_port}/");
        // A folder where the spool file should be: every append fails, as on a full disk.
        let _ = std::fs::create_dir_all(d.join("data/logs.spool.jsonl"));
    })
    .await?;
    for i in 0..3 {
        let t = Instant::now();
        let mut body = chat_body(MODEL, false);
        body["messages"][1]["content"] = json!(format!("request {i}"));
        let (status, text) = call(&gw, Some(KEY_A), Method::POST, "/v1/chat/completions", Some(&body)).await?;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(t.elapsed() < Duration::from_secs(5), "request {i} took {:?}", t.elapsed());
    }
    let stats = gw.handle.state.logs.as_ref().map(|l| l.writer.stats().snapshot());
    assert!(stats.is_some_and(|s| s.spool_errors > 0), "{stats:?}");
    Ok(())
}

/// Probe 9 (memory): a large upload is streamed to disk and validated a line at a time, so
/// resident memory does not grow with it (before: the whole file was held, twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_does_not_grow_memory() -> anyhow::Result<()> {
    let gw = start(|_, _| {}).await?;
    let line = json!({"messages": [{"role": "user", "content": "x".repeat(400)}, {"role": "assistant", "content": "y"}]})
        .to_string()
        + "\n";
    let lines = (64usize << 20) / line.len();
    let boundary = "tunegate-big-upload";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    // The body is generated as it is sent: the client holds one chunk at a time.
    let chunk = line.repeat(256);
    let chunks = lines / 256;
    let body = futures_util::stream::iter(
        std::iter::once(head.into_bytes())
            .chain(std::iter::repeat_n(chunk.into_bytes(), chunks))
            .chain(std::iter::once(tail.into_bytes()))
            .map(|b| Ok::<_, std::io::Error>(bytes::Bytes::from(b))),
    );
    let before = rss_kib();
    let res = gw
        .http
        .post(gw.url("/v1/files"))
        .bearer_auth(KEY_A)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    let status = res.status();
    let text = res.text().await?;
    assert_eq!(status, StatusCode::OK, "{text}");
    let file: Value = serde_json::from_str(&text)?;
    assert!(file["bytes"].as_u64().is_some_and(|b| b > 60 << 20), "{file}");
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 24, "resident memory grew {grown_mib} MiB for a 64 MiB upload");
    Ok(())
}
