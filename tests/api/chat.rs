//! Chat completions, completions and models over HTTP: shapes, usage, streaming, stop, n.

use serde_json::{json, Value};
use tunegate::engine::ChatMessage;

use crate::common::{self, MODEL};

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_non_stream_has_openai_shape_and_exact_usage() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let (status, body) = gw
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": user("Hello there"), "max_tokens": 12,
            "temperature": 0, "logprobs": true, "user": "u-1", "store": false, "metadata": {"task": "greet"},
            "some_future_field": {"ignored": true}}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].is_u64());
    assert!(body["system_fingerprint"].as_str().is_some_and(|s| s.starts_with("fp_")));
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(choice["message"].get("refusal").is_some_and(Value::is_null));
    assert!(matches!(choice["finish_reason"].as_str(), Some("stop" | "length")));

    // Usage equals the tokenizer's count of the rendered prompt.
    let info = gw.handle.engine.info()?;
    let rendered = info.render_chat(&[ChatMessage::new("user", "Hello there")])?;
    let prompt_tokens = info.tokenizer.encode(&rendered, true)?.len();
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    let lp = choice["logprobs"]["content"].as_array().cloned().unwrap_or_default();
    assert_eq!(usage["completion_tokens"], lp.len());
    assert_eq!(usage["total_tokens"], prompt_tokens + lp.len());
    assert!(lp.iter().all(|t| t["logprob"].as_f64().is_some_and(|l| l <= 0.0) && t["top_logprobs"].is_array()));
    if choice["finish_reason"] == "length" {
        assert_eq!(usage["completion_tokens"], 12);
    }
    // Without logprobs the field is present and null.
    let (_, body) =
        gw.post("/v1/chat/completions", json!({"model": MODEL, "messages": user("Hi"), "max_tokens": 2})).await?;
    assert!(body["choices"][0].get("logprobs").is_some_and(Value::is_null));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_matches_non_stream_and_reports_usage() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let body = json!({"model": MODEL, "messages": user("Tell me a story"), "max_tokens": 24, "temperature": 0});
    let (_, whole) = gw.post("/v1/chat/completions", body.clone()).await?;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = gw.sse("/v1/chat/completions", streamed).await?;

    assert_eq!(events.last(), Some(&Value::String("[DONE]".into())));
    let chunks = &events[..events.len() - 1];
    let id = chunks[0]["id"].clone();
    assert!(chunks.iter().all(|c| c["id"] == id && c["object"] == "chat.completion.chunk" && c["model"] == MODEL));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // Every chunk but the last carries `usage: null`; the last has no choices and the usage.
    let (usage_chunk, rest) = chunks.split_last().ok_or_else(|| anyhow::anyhow!("no chunks"))?;
    assert!(rest.iter().all(|c| c.get("usage").is_some_and(Value::is_null)));
    assert_eq!(usage_chunk["choices"], json!([]));
    // Same counts; the repeated prompt's positions came from the prefix cache this time
    // (all but its last token), which OpenAI's `prompt_tokens_details.cached_tokens` reports.
    let mut usage = usage_chunk["usage"].clone();
    let details = usage.as_object_mut().and_then(|o| o.remove("prompt_tokens_details")).unwrap_or_default();
    assert_eq!(usage, whole["usage"]);
    assert!(whole["usage"].get("prompt_tokens_details").is_none(), "{}", whole["usage"]);
    let prompt_tokens = whole["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert_eq!(details["cached_tokens"].as_u64(), Some(prompt_tokens - 1), "{details}");
    let text: String = rest.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap_or_default());
    let last = &rest[rest.len() - 1]["choices"][0];
    assert_eq!(last["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert_eq!(last["delta"], json!({}));
    assert!(rest[..rest.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));

    // Without include_usage there is no usage field at all.
    let mut plain = body;
    plain["stream"] = json!(true);
    let events = gw.sse("/v1/chat/completions", plain).await?;
    assert!(events.iter().filter(|e| e.is_object()).all(|c| c.get("usage").is_none()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_cut_the_text() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let full = gw.greedy(MODEL, "Count with me", 40).await?;
    let chars: Vec<char> = full.chars().collect();
    anyhow::ensure!(chars.len() >= 6, "greedy output too short to test stop: {full:?}");
    // A stop string taken from the middle of the greedy output.
    let start = chars.len() / 2;
    let stop: String = chars[start..start + 2].iter().collect();
    let (status, body) = gw
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": user("Count with me"), "max_tokens": 40,
            "temperature": 0, "stop": [stop.clone()]}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    let expected = &full[..full.find(&stop).unwrap_or(full.len())];
    assert_eq!(text, expected, "full {full:?}, stop {stop:?}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_reproducible_with_a_seed() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let req = json!({"model": MODEL, "messages": user("Pick a word"), "max_tokens": 8, "temperature": 1.0,
        "seed": 1234, "n": 3});
    let (status, a) = gw.post("/v1/chat/completions", req.clone()).await?;
    assert_eq!(status, 200, "{a}");
    let (_, b) = gw.post("/v1/chat/completions", req.clone()).await?;
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["message"]["content"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same choices");
    let idx: Vec<u64> = a["choices"].as_array().into_iter().flatten().filter_map(|c| c["index"].as_u64()).collect();
    assert_eq!(idx, vec![0, 1, 2]);
    // Prompt counted once, completions summed.
    let single = gw
        .post("/v1/chat/completions", json!({"model": MODEL, "messages": user("Pick a word"), "max_tokens": 1}))
        .await?
        .1;
    assert_eq!(a["usage"]["prompt_tokens"], single["usage"]["prompt_tokens"]);
    let completion = a["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert!((3..=24).contains(&completion), "{completion}");

    // Streaming n: every index gets a role chunk and a finish chunk.
    let mut s = req;
    s["stream"] = json!(true);
    let events = gw.sse("/v1/chat/completions", s).await?;
    for i in 0..3 {
        let of_i: Vec<&Value> = events.iter().filter(|e| e["choices"][0]["index"] == i).collect();
        assert_eq!(of_i.first().map(|c| c["choices"][0]["delta"]["role"].clone()), Some(json!("assistant")));
        assert!(of_i.last().is_some_and(|c| c["choices"][0]["finish_reason"].is_string()));
        let text: String = of_i.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, texts(&a)[i]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_endpoint() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let (status, body) = gw
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["Once upon", "A long"], "n": 2, "max_tokens": 5,
            "temperature": 0, "logprobs": 1}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let choices = body["choices"].as_array().cloned().unwrap_or_default();
    assert_eq!(choices.len(), 4);
    // Greedy: both samples of one prompt agree.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert!(choices.iter().all(|c| c["logprobs"]["tokens"].is_array() && c["finish_reason"].is_string()));
    let info = gw.handle.engine.info()?;
    let p: usize =
        ["Once upon", "A long"].iter().map(|t| info.tokenizer.encode(t, true).map(|v| v.len()).unwrap_or(0)).sum();
    assert_eq!(body["usage"]["prompt_tokens"], p);

    // echo + max_tokens 0: the prompt back, nothing generated.
    let (_, body) =
        gw.post("/v1/completions", json!({"model": MODEL, "prompt": "Echo me", "max_tokens": 0, "echo": true})).await?;
    assert_eq!(body["choices"][0]["text"], "Echo me");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 0);

    // Token-id prompts and streaming.
    let ids = info.tokenizer.encode("Once upon", true)?;
    let events = gw
        .sse(
            "/v1/completions",
            json!({"model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .await?;
    let text: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, choices[0]["text"].as_str().unwrap_or_default());
    assert_eq!(events[events.len() - 2]["usage"]["completion_tokens"], body_tokens(&choices[0]));
    Ok(())
}

fn body_tokens(choice: &Value) -> usize {
    choice["logprobs"]["tokens"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_and_retrieve() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let (status, body) = gw.get("/v1/models").await?;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], MODEL);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["owned_by"], "tunegate");
    let (status, body) = gw.get(&format!("/v1/models/{MODEL}")).await?;
    assert_eq!(status, 200);
    assert_eq!(body["id"], MODEL);
    let (status, body) = gw.get("/v1/models/gpt-4o").await?;
    common::assert_error(status, &body, 404, "model_not_found");
    let (status, body) = gw.post("/v1/chat/completions", json!({"model": "gpt-4o", "messages": user("x")})).await?;
    common::assert_error(status, &body, 404, "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    let (status, _) = gw.get("/health").await?;
    assert_eq!(status, 200);
    let (status, body) = gw.get("/ready").await?;
    assert_eq!((status.as_u16(), body["status"].as_str()), (200, Some("ready")));
    Ok(())
}

/// The prefix cache is per API key: the same prompt from another key runs in full (so no
/// client learns from `cached_tokens` or timing what another's prompts began with), and
/// from the same key it is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_is_not_shared_across_api_keys() -> anyhow::Result<()> {
    let gw = common::start_with(|cfg, _| common::with_keys(cfg)).await?;
    let body = json!({"model": MODEL, "messages": user("Summarise the plot of a long novel for me"), "max_tokens": 4, "temperature": 0});
    let cached = |v: &Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
    let as_client = || async {
        let res = gw.http.post(gw.url("/v1/chat/completions")).bearer_auth(common::CLIENT_KEY).json(&body).send().await?;
        anyhow::ensure!(res.status() == 200, "{}", res.status());
        Ok::<Value, anyhow::Error>(res.json().await?)
    };
    let (s, first) = gw.post("/v1/chat/completions", body.clone()).await?; // the admin key
    assert_eq!(s, 200, "{first}");
    assert_eq!(cached(&first), 0);
    let other = as_client().await?;
    assert_eq!(cached(&other), 0, "another key's prompt was reused: {}", other["usage"]);
    let again = as_client().await?;
    let prompt_tokens = again["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert_eq!(cached(&again), prompt_tokens - 1, "{}", again["usage"]);
    Ok(())
}

/// `x-request-id` on every response: the client's own echoed, else the completion id (or a
/// `req_` id on other routes); error bodies and the log record carry the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_names_its_request_id() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let id_of = |r: &reqwest::Response| r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(String::from);
    let body = json!({"model": MODEL, "messages": user("Hi"), "max_tokens": 2});
    let res = gw.post_raw("/v1/chat/completions", body.clone()).await?;
    let header = id_of(&res);
    let out: Value = res.json().await?;
    assert_eq!(header.as_deref(), out["id"].as_str(), "the completion id, when the client sends none");
    let (_, logged) = gw.get(&format!("/admin/logs/{}", out["id"].as_str().unwrap_or_default())).await?;
    assert_eq!(logged["request_id"], out["id"], "{logged}");

    let res = gw.http.post(gw.url("/v1/chat/completions")).header("x-request-id", "client-req.42").json(&body).send().await?;
    assert_eq!(id_of(&res).as_deref(), Some("client-req.42"));
    let out: Value = res.json().await?;
    let (_, logged) = gw.get(&format!("/admin/logs/{}", out["id"].as_str().unwrap_or_default())).await?;
    assert_eq!(logged["request_id"], "client-req.42", "{logged}");
    // An id with characters a header or log should not carry is replaced.
    let res = gw.http.post(gw.url("/v1/chat/completions")).header("x-request-id", "a b<c>".repeat(30)).json(&body).send().await?;
    assert!(id_of(&res).is_some_and(|i| i.starts_with("chatcmpl-")), "{:?}", id_of(&res));

    // Errors: the header and the body agree.
    let res = gw.post_raw("/v1/chat/completions", json!({"model": "nope", "messages": user("Hi")})).await?;
    let header = id_of(&res);
    let err: Value = res.json().await?;
    assert!(header.as_deref().is_some_and(|h| h.starts_with("req_")), "{header:?}");
    assert_eq!(err["error"]["request_id"].as_str(), header.as_deref(), "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");
    let res = gw.http.get(gw.url("/v1/models")).header("x-request-id", "mine").send().await?;
    assert_eq!(id_of(&res).as_deref(), Some("mine"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_logprobs_on_chat_and_completions_streamed_and_not() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let req = json!({"model": MODEL, "messages": user("Name a colour"), "max_tokens": 6, "temperature": 0,
        "logprobs": true, "top_logprobs": 3});
    let (status, body) = gw.post("/v1/chat/completions", req.clone()).await?;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default();
    assert!(!content.is_empty());
    for t in &content {
        let top = t["top_logprobs"].as_array().cloned().unwrap_or_default();
        assert_eq!(top.len(), 3, "{t}");
        let lps: Vec<f64> = top.iter().filter_map(|e| e["logprob"].as_f64()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "most likely first: {lps:?}");
        assert!(lps.iter().all(|&l| l <= 0.0) && lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-4);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], t["token"], "{t}");
        assert!((top[0]["logprob"].as_f64().unwrap_or(1.0) - t["logprob"].as_f64().unwrap_or(0.0)).abs() < 1e-5);
        assert!(top.iter().all(|e| e["bytes"].is_array()));
    }

    // Streamed: the same alternatives, token by token.
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let events = gw.sse("/v1/chat/completions", streamed).await?;
    let tops: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .map(|t| t["top_logprobs"].clone())
        .collect();
    let whole: Vec<Value> = content.iter().map(|t| t["top_logprobs"].clone()).collect();
    assert_eq!(tops.len(), whole.len());
    for (a, b) in tops.iter().zip(&whole) {
        let names = |v: &Value| v.as_array().map(|a| a.iter().map(|e| e["token"].clone()).collect::<Vec<_>>());
        assert_eq!(names(a), names(b));
    }

    // Out of range, or without logprobs: 400 naming the parameter.
    for bad in [json!({"logprobs": true, "top_logprobs": 21}), json!({"top_logprobs": 2})] {
        let mut r = json!({"model": MODEL, "messages": user("x"), "max_tokens": 1});
        for (k, v) in bad.as_object().into_iter().flatten() {
            r[k] = v.clone();
        }
        let (status, body) = gw.post("/v1/chat/completions", r).await?;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "top_logprobs");
    }

    // Legacy completions: `logprobs: N` gives N alternatives per token as {token: logprob}.
    let (status, body) = gw
        .post("/v1/completions", json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "temperature": 0, "logprobs": 2}))
        .await?;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().cloned().unwrap_or_default();
    let tops = lp["top_logprobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(tops.len(), tokens.len());
    for ((tok, chosen), top) in tokens.iter().zip(lp["token_logprobs"].as_array().into_iter().flatten()).zip(&tops) {
        let map = top.as_object().cloned().unwrap_or_default();
        assert!((1..=2).contains(&map.len()), "{top}");
        let best = map.values().filter_map(Value::as_f64).fold(f64::NEG_INFINITY, f64::max);
        assert!((best - chosen.as_f64().unwrap_or(0.0)).abs() < 1e-5, "greedy picks the likeliest: {tok} {top}");
    }
    Ok(())
}
