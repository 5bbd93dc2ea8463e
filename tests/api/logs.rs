//! Request logging and review through the running gateway: every chat completion is in the
//! store by the time its response arrives (`[logs] durable`), streamed ones whole; the
//! review routes, OpenAI stored completions and client feedback.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, assert_error, Gateway, MODEL};

const SYSTEM: &str = "You label support tickets.";

fn chat(task: &str, user: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": 6,
        "temperature": 0,
        "metadata": {"task": task},
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

async fn complete(gw: &Gateway, body: Value) -> anyhow::Result<Value> {
    let (status, out) = gw.post("/v1/chat/completions", body).await?;
    anyhow::ensure!(status == StatusCode::OK, "{status}: {out}");
    Ok(out)
}

async fn record(gw: &Gateway, id: &str) -> anyhow::Result<Value> {
    let (status, r) = gw.get(&format!("/admin/logs/{id}")).await?;
    anyhow::ensure!(status == StatusCode::OK, "{status}: {r}");
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_are_logged_before_the_response_arrives() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| common::with_keys(c)).await?;
    let out = complete(&gw, chat("tickets", "My printer is on fire", json!({"user": "u1"}))).await?;
    let id = out["id"].as_str().unwrap_or_default();
    // No waiting: durable logging commits before the response is sent.
    let r = record(&gw, id).await?;
    assert_eq!(r["task"], "tickets");
    assert_eq!(r["model"], MODEL);
    assert_eq!(r["base_model"], MODEL);
    assert_eq!(r["status"], "ok");
    assert_eq!(r["response"], out["choices"][0]["message"]["content"]);
    assert_eq!(r["finish_reason"], out["choices"][0]["finish_reason"]);
    assert_eq!(r["prompt_tokens"], out["usage"]["prompt_tokens"]);
    assert_eq!(r["completion_tokens"], out["usage"]["completion_tokens"]);
    assert_eq!(r["request"]["messages"][0], json!({"role": "system", "content": SYSTEM}));
    assert_eq!(r["request"]["messages"][1]["content"], "My printer is on fire");
    assert_eq!(r["request"]["params"]["max_tokens"], 6);
    assert_eq!(r["request"]["params"]["user"], "u1");
    assert_eq!(r["metadata"]["task"], "tickets");
    assert_eq!(r["review"]["state"], "pending");
    assert!(r["api_key_id"].as_str().is_some_and(|k| k.len() == 12 && !k.contains("sk-")), "{r}");
    assert!(r["latency_ms"].as_u64().is_some() && r["ttft_ms"].as_u64().is_some(), "{r}");
    assert_eq!(r["client_disconnected"], false);

    // Streamed: logged whole, with the text the client received.
    let events = gw.sse("/v1/chat/completions", chat("tickets", "Reset my password", json!({"stream": true}))).await?;
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    let sid = events[0]["id"].as_str().unwrap_or_default().to_string();
    let r = record(&gw, &sid).await?;
    assert_eq!(r["response"], streamed.as_str());
    assert_eq!(r["client_disconnected"], false);
    assert!(r["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{r}");

    // A failed request is logged with its error code.
    let long = "word ".repeat(2000);
    let (status, body) = gw.post("/v1/chat/completions", chat("tickets", &long, json!({}))).await?;
    assert_error(status, &body, 400, "context_length_exceeded");
    let (_, page) = gw.get("/admin/logs?task=tickets&status=context_length_exceeded").await?;
    assert_eq!(page["data"].as_array().map(Vec::len), Some(1), "{page}");
    // ... and cannot be approved: nothing to train on.
    let failed = page["data"][0]["id"].as_str().unwrap_or_default().to_string();
    let (status, body) = gw.post(&format!("/admin/logs/{failed}/review"), json!({"state": "approved"})).await?;
    assert_error(status, &body, 409, "illegal_review_transition");
    gw.handle.stop(true).await;
    Ok(())
}

/// Starts a long stream, reads two chunks and goes away; then polls `path` (with `{id}`
/// standing for the completion's id) until it answers 200, and returns that body.
async fn abandon_stream(gw: &common::Gateway, extra: Value, path: &str) -> anyhow::Result<Value> {
    let mut params = json!({"stream": true, "max_tokens": 200, "ignore_eos": true});
    for (k, v) in extra.as_object().into_iter().flatten() {
        params[k] = v.clone();
    }
    let res = gw.post_raw("/v1/chat/completions", chat("drop", "Tell me a long story", params)).await?;
    let mut reader = common::SseReader::new(res);
    let first = reader.next().await?.unwrap_or_default();
    let id = first["id"].as_str().unwrap_or_default().to_string();
    reader.next().await?;
    drop(reader);
    for _ in 0..200 {
        let (status, r) = gw.get(&path.replace("{id}", &id)).await?;
        if status == StatusCode::OK {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_abandons_is_logged_as_disconnected() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let found = abandon_stream(&gw, json!({}), "/admin/logs/{id}").await?;
    assert_eq!(found["client_disconnected"], true, "{found}");
    assert_eq!(found["finish_reason"], "cancelled", "{found}");
    assert!(found["completion_tokens"].as_u64().unwrap_or(999) < 200, "{found}");
    gw.handle.stop(true).await;
    Ok(())
}

/// A stored completion cut short by a disconnect does not claim to have finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_completion_cut_short_reports_length() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let found = abandon_stream(&gw, json!({"store": true}), "/v1/chat/completions/{id}").await?;
    assert_eq!(found["choices"][0]["finish_reason"], "length", "{found}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_routes_page_filter_and_refuse_illegal_transitions() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| {
        common::with_keys(c);
        c.logs.disabled_tasks = vec!["secret".into()];
    })
    .await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let out = complete(&gw, chat("labels", &format!("ticket number {i}"), json!({}))).await?;
        ids.push(out["id"].as_str().unwrap_or_default().to_string());
    }
    complete(&gw, chat("other", "unrelated", json!({}))).await?;
    complete(&gw, chat("secret", "my card is 4111", json!({}))).await?;

    // Newest first, cursor paging with no overlap.
    let (_, p1) = gw.get("/admin/logs?task=labels&limit=3").await?;
    assert_eq!(p1["data"].as_array().map(Vec::len), Some(3));
    assert_eq!(p1["data"][0]["id"], ids[4].as_str());
    assert_eq!(p1["has_more"], true);
    let cursor = p1["next_cursor"].as_str().unwrap_or_default();
    let (_, p2) = gw.get(&format!("/admin/logs?task=labels&limit=3&cursor={cursor}")).await?;
    let p2_ids: Vec<&str> = p2["data"].as_array().into_iter().flatten().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(p2_ids, vec![ids[1].as_str(), ids[0].as_str()]);
    assert_eq!(p2["has_more"], false);
    // Text search over the prompt.
    let (_, found) = gw.get("/admin/logs?q=NUMBER%203").await?;
    assert_eq!(found["data"].as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(found["data"][0]["id"], ids[3].as_str());
    // The privacy switch: nothing of task `secret` was stored.
    let (_, secret) = gw.get("/admin/logs?task=secret").await?;
    assert_eq!(secret["data"], json!([]));

    // Approve, then a stale second reviewer gets 409; a correction is kept.
    let (status, r) = gw.post(&format!("/admin/logs/{}/review", ids[0]), json!({"state": "approved"})).await?;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["review"]["state"], "approved");
    assert!(r["review"]["reviewer"].is_string());
    let (status, body) = gw
        .post(&format!("/admin/logs/{}/review", ids[0]), json!({"state": "rejected", "expected_state": "pending"}))
        .await?;
    assert_error(status, &body, 409, "illegal_review_transition");
    let (status, body) = gw.post(&format!("/admin/logs/{}/review", ids[1]), json!({"state": "pending"})).await?;
    assert_error(status, &body, 409, "illegal_review_transition");
    let (status, r) = gw
        .post(&format!("/admin/logs/{}/review", ids[1]), json!({"state": "approved", "corrected_response": "billing"}))
        .await?;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["review"]["corrected_response"], "billing");
    let (status, body) = gw.post("/admin/logs/chatcmpl-nope/review", json!({"state": "approved"})).await?;
    assert_error(status, &body, 404, "log_not_found");
    let (status, body) = gw.post(&format!("/admin/logs/{}/review", ids[1]), json!({"state": "maybe"})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Bulk: reject every pending record of the task.
    let (status, out) = gw
        .post("/admin/logs/review", json!({"filter": {"task": "labels", "state": "pending"}, "state": "rejected"}))
        .await?;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out, json!({"reviewed": 3, "skipped": 0}));
    let (status, out) = gw.post("/admin/logs/review", json!({"ids": [ids[2], "chatcmpl-x"], "state": "approved"})).await?;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out, json!({"reviewed": 1, "skipped": 1}));

    let (status, tasks) = gw.get("/admin/tasks").await?;
    assert_eq!(status, StatusCode::OK);
    let labels = tasks["data"].as_array().into_iter().flatten().find(|t| t["task"] == "labels").cloned();
    let labels = labels.unwrap_or_default();
    assert_eq!((labels["approved"].as_u64(), labels["rejected"].as_u64(), labels["pending"].as_u64()), (Some(3), Some(2), Some(0)), "{tasks}");

    // The export CLI's format: approved examples with the correction.
    let logs = gw.handle.state.logs.clone().ok_or_else(|| anyhow::anyhow!("logging is off"))?;
    let mut out = Vec::new();
    let n = tunegate::logs::export_jsonl(&logs.store, "labels", &mut out).await?;
    assert_eq!(n, 3);
    let text = String::from_utf8(out)?;
    assert!(text.lines().any(|l| l.contains("\"billing\"")), "{text}");

    // The review routes need the admin key.
    let res = gw.http.get(gw.url("/admin/logs")).bearer_auth(common::CLIENT_KEY).send().await?;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    gw.handle.stop(true).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_completions_and_feedback_in_openai_shapes() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| c.logs.auto_approve_on_feedback = vec!["happy".into()]).await?;
    let a = complete(&gw, chat("happy", "one", json!({"store": true, "metadata": {"task": "happy", "team": "x"}}))).await?;
    let b = complete(&gw, chat("happy", "two", json!({"store": true}))).await?;
    let hidden = complete(&gw, chat("happy", "three", json!({}))).await?;
    let (a, b, hidden) = (a["id"].as_str().unwrap_or_default(), b["id"].as_str().unwrap_or_default(), hidden["id"].as_str().unwrap_or_default());

    let (status, list) = gw.get("/v1/chat/completions").await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    let listed: Vec<&str> = list["data"].as_array().into_iter().flatten().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(listed, vec![a, b], "oldest first; store:false not listed");
    assert_eq!(list["first_id"], a);
    assert_eq!(list["last_id"], b);
    assert_eq!(list["data"][0]["object"], "chat.completion");
    let (_, filtered) = gw.get("/v1/chat/completions?metadata[team]=x&order=desc").await?;
    assert_eq!(filtered["data"].as_array().map(Vec::len), Some(1), "{filtered}");
    let (_, after) = gw.get(&format!("/v1/chat/completions?after={a}&limit=1")).await?;
    assert_eq!(after["data"][0]["id"], b);
    assert_eq!(after["has_more"], false);

    let (status, one) = gw.get(&format!("/v1/chat/completions/{a}")).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["metadata"]["team"], "x");
    let (status, body) = gw.get(&format!("/v1/chat/completions/{hidden}")).await?;
    assert_error(status, &body, 404, "log_not_found");

    let (status, msgs) = gw.get(&format!("/v1/chat/completions/{a}/messages")).await?;
    assert_eq!(status, StatusCode::OK, "{msgs}");
    assert_eq!(msgs["data"][0]["role"], "system");
    assert_eq!(msgs["data"][1]["content"], "one");
    assert_eq!(msgs["data"][1]["id"], format!("{a}-1"));

    let (status, updated) = gw.post(&format!("/v1/chat/completions/{a}"), json!({"metadata": {"k": "v"}})).await?;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["metadata"], json!({"k": "v"}));

    let res = gw.http.delete(gw.url(&format!("/v1/chat/completions/{b}"))).send().await?;
    assert_eq!(res.status(), StatusCode::OK);
    let deleted: Value = res.json().await?;
    assert_eq!(deleted, json!({"object": "chat.completion.deleted", "id": b, "deleted": true}));
    let (status, _) = gw.get(&format!("/v1/chat/completions/{b}")).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Feedback: kept on the record; positive feedback auto-approves for this task.
    let (status, fb) = gw.post("/v1/feedback", json!({"completion_id": a, "thumbs": "up", "comment": "great"})).await?;
    assert_eq!(status, StatusCode::OK, "{fb}");
    assert_eq!(fb["review_state"], "approved");
    let r = record(&gw, a).await?;
    assert_eq!(r["feedback"]["score"], 1.0);
    assert_eq!(r["feedback"]["comment"], "great");
    assert_eq!(r["review"]["reviewer"], "feedback");
    let (status, fb) = gw.post("/v1/feedback", json!({"completion_id": hidden, "score": -0.5})).await?;
    assert_eq!(status, StatusCode::OK, "{fb}");
    assert_eq!(fb["review_state"], "pending");
    let (status, body) = gw.post("/v1/feedback", json!({"completion_id": hidden, "score": 3})).await?;
    assert_error(status, &body, 400, "invalid_value");
    let (status, body) = gw.post("/v1/feedback", json!({"completion_id": "chatcmpl-none", "thumbs": "up"})).await?;
    assert_error(status, &body, 404, "log_not_found");
    gw.handle.stop(true).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_disabled_answers_503_on_review_routes() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| c.logs.enabled = false).await?;
    complete(&gw, chat("t", "hi", json!({}))).await?;
    let (status, body) = gw.get("/admin/logs").await?;
    assert_error(status, &body, 503, "logs_disabled");
    gw.handle.stop(true).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_trains_a_task_from_its_approved_logs() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| {
        c.scheduler.min_new_approved = 8;
        c.scheduler.check_interval_seconds = 0.2;
        c.training.rank = 4;
        c.training.alpha = 8.0;
        c.training.epochs = Some(2);
        c.training.eval_fraction = 0.0;
    })
    .await?;
    for i in 0..8 {
        complete(&gw, chat("auto", &format!("ticket {i}"), json!({}))).await?;
    }
    complete(&gw, chat("idle", "not enough examples here", json!({}))).await?;
    // Seven approvals: not due yet.
    let (_, page) = gw.get("/admin/logs?task=auto").await?;
    let ids: Vec<String> = page["data"].as_array().into_iter().flatten().filter_map(|r| r["id"].as_str().map(String::from)).collect();
    assert_eq!(ids.len(), 8);
    let (_, out) = gw.post("/admin/logs/review", json!({"ids": ids[..7], "state": "approved", "corrected_response": "billing"})).await?;
    assert_eq!(out["reviewed"], 7, "{out}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, jobs) = gw.get("/v1/fine_tuning/jobs").await?;
    assert_eq!(jobs["data"], json!([]), "queued too early: {jobs}");

    // The eighth approval makes the task due: one job, from the logs, that succeeds.
    gw.post(&format!("/admin/logs/{}/review", ids[7]), json!({"state": "approved", "corrected_response": "billing"})).await?;
    let mut job = Value::Null;
    for _ in 0..600 {
        let (_, jobs) = gw.get("/v1/fine_tuning/jobs").await?;
        if let Some(j) = jobs["data"].as_array().and_then(|d| d.first()) {
            if matches!(j["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                job = j.clone();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["task"], "auto");
    assert_eq!(job["training_file"], "task:auto");
    assert_eq!(job["metadata"]["scheduled_by"], "tunegate-scheduler");
    let (_, jobs) = gw.get("/v1/fine_tuning/jobs").await?;
    assert_eq!(jobs["data"].as_array().map(Vec::len), Some(1), "one job only: {jobs}");
    let model = job["fine_tuned_model"].as_str().unwrap_or_default().to_string();
    let served = complete(&gw, json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await?;
    assert_eq!(served["model"], model.as_str());
    gw.handle.stop(true).await;
    Ok(())
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (labels as
/// rendered, sorted by name).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_overview_reports_readiness_and_gauges() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| {
        c.scheduler.enabled = false;
        c.scheduler.tasks.insert(
            "ready".into(),
            tunegate::config::TaskPolicySection { min_new_approved: Some(3), ..Default::default() },
        );
    })
    .await?;
    let mut ids = Vec::new();
    for i in 0..4 {
        let out = complete(&gw, chat("ready", &format!("my invoice {i} is wrong"), json!({}))).await?;
        ids.push(out["id"].as_str().unwrap_or_default().to_string());
    }
    complete(&gw, chat("young", "hello", json!({}))).await?;
    for id in &ids[..3] {
        let (status, r) =
            gw.post(&format!("/admin/logs/{id}/review"), json!({"state": "approved", "corrected_response": "Billing"})).await?;
        assert_eq!(status, StatusCode::OK, "{r}");
    }

    let (status, tasks) = gw.get("/admin/tasks").await?;
    assert_eq!(status, StatusCode::OK, "{tasks}");
    let find = |name: &str| tasks["data"].as_array().into_iter().flatten().find(|t| t["task"] == name).cloned().unwrap_or_default();
    let ready = find("ready");
    // The counts are unchanged.
    assert_eq!((ready["approved"].as_u64(), ready["pending"].as_u64(), ready["total"].as_u64()), (Some(3), Some(1), Some(4)), "{ready}");
    let r = &ready["readiness"];
    assert_eq!((r["approved"].as_u64(), r["threshold"].as_u64(), r["ready"].as_bool()), (Some(3), Some(3), Some(true)), "{r}");
    assert_eq!(r["ratio"], 1.0);
    assert_eq!((r["format"]["kind"].as_str(), r["format"]["consistency"].as_f64()), (Some("label"), Some(1.0)), "{r}");
    assert_eq!(r["format"]["dominant"], "billing");
    // Four requests within the last hour: extrapolated over an hour, 96 a day.
    assert_eq!(r["requests_per_day"].as_f64(), Some(96.0), "{r}");
    let info = gw.handle.state.engine.info()?;
    let tokens = info.tokenizer.encode(SYSTEM, false)?.len() as u64;
    assert!(tokens > 0);
    assert_eq!((r["system_prompt_tokens"].as_u64(), r["system_prompt_share"].as_f64()), (Some(tokens), Some(1.0)), "{r}");
    let projected = tokens * 96 * 30;
    assert_eq!(r["projected_prompt_tokens_saved_per_month"].as_u64(), Some(projected), "{r}");
    assert_eq!(r["prompt_tokens_saved"], 0);
    assert!(r["recommendation"].as_str().unwrap_or_default().starts_with("fine-tune now"), "{r}");
    assert_eq!((ready["adapter"].clone(), ready["last_job"].clone()), (Value::Null, Value::Null));

    // The default threshold is the scheduler's 500.
    let young = find("young");
    assert_eq!((young["readiness"]["threshold"].as_u64(), young["readiness"]["ready"].as_bool()), (Some(500), Some(false)));
    assert_eq!(young["readiness"]["recommendation"], "keep prompting: 500 more approved examples needed");
    assert_eq!(young["readiness"]["format"], Value::Null);

    // The gauges, as computed by the call above.
    let text = gw.http.get(gw.url("/metrics")).send().await?.text().await?;
    assert_eq!(sample(&text, r#"tunegate_task_readiness_ratio{task="ready"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"tunegate_task_format_consistency{task="ready"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"tunegate_task_projected_prompt_tokens_saved_per_month{task="ready"}"#), Some(projected as f64));
    assert_eq!(sample(&text, r#"tunegate_examples{state="approved",task="ready"}"#), Some(3.0));
    assert_eq!(sample(&text, r#"tunegate_examples{state="pending",task="ready"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"tunegate_task_readiness_ratio{task="young"}"#), Some(0.0));
    gw.handle.stop(true).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions_are_logged_with_the_prompt_as_the_user_turn() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| common::with_keys(c)).await?;
    let (status, out) = gw
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Ticket: printer on fire. Label:", "max_tokens": 5, "temperature": 0,
                "echo": true, "metadata": {"task": "legacy"}, "user": "u9"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{out}");
    let r = record(&gw, out["id"].as_str().unwrap_or_default()).await?;
    assert_eq!(r["task"], "legacy");
    assert_eq!(r["status"], "ok");
    assert_eq!(r["request"]["messages"], json!([{"role": "user", "content": "Ticket: printer on fire. Label:"}]));
    // The response is the generated text, without the echoed prompt.
    let text = out["choices"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(r["response"], text.strip_prefix("Ticket: printer on fire. Label:").unwrap_or("<no echo>"));
    assert_eq!(r["finish_reason"], out["choices"][0]["finish_reason"]);
    assert_eq!(r["prompt_tokens"], out["usage"]["prompt_tokens"]);
    assert_eq!(r["completion_tokens"], out["usage"]["completion_tokens"]);
    assert_eq!(r["request"]["params"]["user"], "u9");
    assert_eq!(r["request"]["params"]["echo"], true);
    assert!(r["api_key_id"].as_str().is_some_and(|k| k.len() == 12), "{r}");
    assert_eq!(r["review"]["state"], "pending");

    // Streamed, from token ids: the prompt decoded, the streamed text logged whole.
    let ids = gw.handle.engine.info()?.tokenizer.encode("Reset my password", false)?;
    let events = gw
        .sse("/v1/completions", json!({"model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0, "stream": true,
            "metadata": {"task": "legacy"}}))
        .await?;
    let streamed: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    let r = record(&gw, events[0]["id"].as_str().unwrap_or_default()).await?;
    assert_eq!(r["request"]["messages"][0]["content"], "Reset my password");
    assert_eq!(r["response"], streamed.as_str());
    assert!(r["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{r}");

    // Several prompts: logged as the first, with the count.
    let (status, out) = gw
        .post("/v1/completions", json!({"model": MODEL, "prompt": ["one", "two"], "max_tokens": 2, "metadata": {"task": "legacy"}}))
        .await?;
    assert_eq!(status, StatusCode::OK, "{out}");
    let r = record(&gw, out["id"].as_str().unwrap_or_default()).await?;
    assert_eq!(r["request"]["messages"][0]["content"], "one");
    assert_eq!(r["request"]["params"]["prompt_count"], 2);

    // Reviewable with the task's other logs.
    let (_, page) = gw.get("/admin/logs?task=legacy").await?;
    assert_eq!(page["data"].as_array().map_or(0, Vec::len), 3, "{page}");
    Ok(())
}
