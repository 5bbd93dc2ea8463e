//! `/v1/responses` over HTTP: the object and the typed event stream, stored responses read
//! back and chained, structured output and tools through it, and the 400s for what it does
//! not serve.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, assert_error, parse_sse, MODEL};

/// Every SSE event as `(event name, data)`.
fn named_events(text: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let name = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or_default().to_string();
        let data = parse_sse(block)?;
        anyhow::ensure!(data.len() == 1, "one data line per event: {block}");
        out.push((name, data.into_iter().next().unwrap_or(Value::Null)));
    }
    Ok(out)
}

fn text_of(response: &Value) -> String {
    response["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["text"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_create_stream_retrieve_chain_and_delete() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let req = json!({"model": MODEL, "instructions": "You are terse.", "input": "Name a colour",
        "max_output_tokens": 8, "temperature": 0, "metadata": {"run": "r1"}});
    let (status, r) = gw.post("/v1/responses", req.clone()).await?;
    assert_eq!(status, 200, "{r}");
    let id = r["id"].as_str().unwrap_or_default().to_string();
    assert!(id.starts_with("resp_"), "{r}");
    assert_eq!(r["object"], "response");
    assert_eq!(r["model"], MODEL);
    assert_eq!(r["instructions"], "You are terse.");
    assert_eq!(r["metadata"]["run"], "r1");
    assert_eq!(r["store"], true);
    // 8 tokens of a random model: cut short, so `incomplete` with the reason, or finished.
    match r["status"].as_str() {
        Some("incomplete") => assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens", "{r}"),
        Some("completed") => assert!(r["incomplete_details"].is_null()),
        other => anyhow::bail!("status {other:?}: {r}"),
    }
    let item = &r["output"][0];
    assert_eq!(item["type"], "message", "{r}");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["content"][0]["type"], "output_text");
    let usage = &r["usage"];
    let (input, output) = (usage["input_tokens"].as_u64().unwrap_or(0), usage["output_tokens"].as_u64().unwrap_or(0));
    assert!(input > 0 && (1..=8).contains(&output), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(input + output));
    let text = text_of(&r);

    // The same request streamed: the typed events in OpenAI's order, the same text.
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let res = gw.post_raw("/v1/responses", streamed).await?;
    assert_eq!(res.status(), 200);
    let events = named_events(&res.text().await?)?;
    let kinds: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    for (name, data) in &events {
        assert_eq!(data["type"].as_str(), Some(name.as_str()), "the event name repeats the type: {data}");
    }
    let seqs: Vec<u64> = events.iter().filter_map(|(_, d)| d["sequence_number"].as_u64()).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>(), "sequence numbers count from 0");
    let head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"];
    assert_eq!(&kinds[..4], &head, "{kinds:?}");
    let tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"];
    assert_eq!(&kinds[kinds.len() - 4..kinds.len() - 1], &tail, "{kinds:?}");
    let last = kinds.last().copied().unwrap_or_default();
    assert_eq!(last, if r["status"] == "completed" { "response.completed" } else { "response.incomplete" });
    assert!(kinds[4..kinds.len() - 4].iter().all(|k| *k == "response.output_text.delta"), "{kinds:?}");
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    assert_eq!(deltas, text);
    let final_response = &events[events.len() - 1].1["response"];
    assert_eq!(text_of(final_response), text);
    assert_eq!(final_response["usage"]["output_tokens"], r["usage"]["output_tokens"]);
    assert!(events[0].1["response"]["usage"].is_null() && events[0].1["response"]["status"] == "in_progress");

    // Stored: read back, its input items, and logged for review with the instructions as
    // the system prompt.
    let (status, got) = gw.get(&format!("/v1/responses/{id}")).await?;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], r["id"]);
    assert_eq!(text_of(&got), text);
    assert_eq!(got["usage"]["output_tokens"], r["usage"]["output_tokens"]);
    let (_, items) = gw.get(&format!("/v1/responses/{id}/input_items")).await?;
    assert_eq!(items["object"], "list");
    let data = items["data"].as_array().cloned().unwrap_or_default();
    assert_eq!(data.len(), 1, "{items}");
    assert_eq!(data[0]["role"], "user");
    assert_eq!(data[0]["content"][0], json!({"type": "input_text", "text": "Name a colour"}));
    let (status, log) = gw.get(&format!("/admin/logs/{id}")).await?;
    assert_eq!(status, 200, "{log}");
    assert_eq!(log["request"]["messages"][0], json!({"role": "system", "content": "You are terse."}), "{log}");
    assert_eq!(log["response"], Value::from(text.clone()));

    // Chained: the next request carries the first exchange, not its instructions.
    let (status, next) = gw
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "text": "Another"}]}],
                "previous_response_id": id, "max_output_tokens": 2, "temperature": 0}),
        )
        .await?;
    assert_eq!(status, 200, "{next}");
    assert_eq!(next["previous_response_id"], Value::from(id.clone()));
    assert!(next["instructions"].is_null());
    let next_id = next["id"].as_str().unwrap_or_default();
    let (_, log) = gw.get(&format!("/admin/logs/{next_id}")).await?;
    let roles: Vec<&str> =
        log["request"]["messages"].as_array().into_iter().flatten().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{log}");
    assert_eq!(log["request"]["messages"][1]["content"][0]["text"], Value::from(text.clone()), "{log}");
    let (_, items) = gw.get(&format!("/v1/responses/{next_id}/input_items")).await?;
    assert_eq!(items["data"].as_array().map(Vec::len), Some(1), "only its own input: {items}");

    // Deleted: gone, and no longer a conversation to continue.
    let (status, del) = gw.http.delete(gw.url(&format!("/v1/responses/{id}"))).send().await.map(|r| (r.status(), r))?;
    assert_eq!(status, 200);
    let del: Value = del.json().await?;
    assert_eq!(del, json!({"id": id, "object": "response", "deleted": true}));
    let (status, body) = gw.get(&format!("/v1/responses/{id}")).await?;
    assert_error(status, &body, 404, "response_not_found");
    let (status, body) =
        gw.post("/v1/responses", json!({"model": MODEL, "input": "x", "previous_response_id": id})).await?;
    assert_error(status, &body, 404, "response_not_found");
    assert_eq!(body["error"]["param"], "previous_response_id");

    // `store: false`: answered, not kept.
    let (status, unstored) =
        gw.post("/v1/responses", json!({"model": MODEL, "input": "x", "store": false, "max_output_tokens": 2})).await?;
    assert_eq!(status, 200, "{unstored}");
    assert_eq!(unstored["store"], false);
    let (status, body) = gw.get(&format!("/v1/responses/{}", unstored["id"].as_str().unwrap_or_default())).await?;
    assert_error(status, &body, 404, "response_not_found");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_structured_output_tools_and_logprobs() -> anyhow::Result<()> {
    let gw = common::start().await?;
    // text.format json_schema: the grammar makes a random model's answer valid.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": false});
    let (status, r) = gw
        .post(
            "/v1/responses",
            json!({"model": MODEL, "input": "Is it ok?", "max_output_tokens": 40, "temperature": 0,
                "text": {"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": true}}}),
        )
        .await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["text"]["format"]["type"], "json_schema");
    let parsed: Value = serde_json::from_str(&text_of(&r))?;
    assert!(parsed["ok"].is_boolean(), "{parsed}");

    // A forced function call: a function_call item, arguments valid for the schema, the
    // same streamed.
    let tools = json!([{"type": "function", "name": "lamp", "description": "Switch the lamp",
        "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
            "additionalProperties": false}}]);
    let req = json!({"model": MODEL, "input": "Light on", "tools": tools, "tool_choice": {"type": "function", "name": "lamp"},
        "max_output_tokens": 40, "temperature": 0});
    let (status, t) = gw.post("/v1/responses", req.clone()).await?;
    assert_eq!(status, 200, "{t}");
    let call = &t["output"][0];
    assert_eq!(call["type"], "function_call", "{t}");
    assert_eq!(call["name"], "lamp");
    assert!(call["call_id"].as_str().is_some_and(|c| c.starts_with("call_")), "{call}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap_or_default())?;
    assert!(args["on"].is_boolean(), "{args}");
    assert_eq!(t["tools"][0]["name"], "lamp", "tools echoed in the Responses form");
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let res = gw.post_raw("/v1/responses", streamed).await?;
    let events = named_events(&res.text().await?)?;
    let done = events
        .iter()
        .find(|(n, _)| n == "response.function_call_arguments.done")
        .map(|(_, d)| d.clone())
        .unwrap_or_default();
    assert_eq!(done["arguments"], call["arguments"], "{events:?}");
    assert_eq!(events.last().map(|(n, _)| n.as_str()), Some("response.completed"));
    // GET rebuilds the same call (same ids) from the log.
    let (_, got) = gw.get(&format!("/v1/responses/{}", t["id"].as_str().unwrap_or_default())).await?;
    assert_eq!(got["output"], t["output"]);
    // The tool's result goes back as a function_call_output on the chained response.
    let (status, after) = gw
        .post(
            "/v1/responses",
            json!({"model": MODEL, "previous_response_id": t["id"], "max_output_tokens": 2,
                "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "{\"lit\": true}"}]}),
        )
        .await?;
    assert_eq!(status, 200, "{after}");
    let (_, log) = gw.get(&format!("/admin/logs/{}", after["id"].as_str().unwrap_or_default())).await?;
    let msgs = log["request"]["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(msgs.len(), 3, "{log}");
    assert_eq!(msgs[1]["tool_calls"][0]["id"], call["call_id"]);
    assert_eq!(msgs[2]["role"], "tool");
    assert_eq!(msgs[2]["tool_call_id"], call["call_id"]);

    // Log probabilities on the output text: `top_logprobs` alone asks for them.
    let (status, lp) = gw
        .post("/v1/responses", json!({"model": MODEL, "input": "x", "max_output_tokens": 3, "temperature": 0, "top_logprobs": 2}))
        .await?;
    assert_eq!(status, 200, "{lp}");
    let logprobs = lp["output"][0]["content"][0]["logprobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(logprobs.len() as u64, lp["usage"]["output_tokens"].as_u64().unwrap_or(0), "{lp}");
    assert!(logprobs.iter().all(|t| t["top_logprobs"].as_array().map(Vec::len) == Some(2)), "{lp}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_refuse_what_they_do_not_serve() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let cases = [
        (json!({"model": MODEL}), 400, "missing_required_parameter", "input"),
        (json!({"model": MODEL, "input": []}), 400, "missing_required_parameter", "input"),
        (
            json!({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            400,
            "unsupported_parameter",
            "input[0].content[0].type",
        ),
        (json!({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}), 400, "unsupported_parameter", "input[0].type"),
        (json!({"model": MODEL, "input": [{"role": "robot", "content": "x"}]}), 400, "invalid_value", "input[0].role"),
        (json!({"model": MODEL, "input": [42]}), 400, "invalid_value", "input[0]"),
        (json!({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}), 400, "unsupported_parameter", "tools[0].type"),
        (json!({"model": MODEL, "input": "x", "background": true}), 400, "unsupported_parameter", "background"),
        (json!({"model": MODEL, "input": "x", "max_output_tokens": 0}), 400, "", "max_output_tokens"),
        (json!({"model": MODEL, "input": "x", "text": {"format": {"type": "yaml"}}}), 400, "invalid_value", "text.format.type"),
        (json!({"model": MODEL, "input": "x", "include": ["file_search_call.results"]}), 400, "unsupported_parameter", "include"),
        (json!({"model": MODEL, "input": "x", "previous_response_id": "resp_nope"}), 404, "response_not_found", "previous_response_id"),
        (json!({"model": "nope", "input": "x"}), 404, "model_not_found", ""),
    ];
    for (body, want_status, want_code, want_param) in cases {
        let (status, err) = gw.post("/v1/responses", body.clone()).await?;
        assert_eq!(status.as_u16(), want_status, "{body}: {err}");
        assert!(err["error"]["message"].is_string(), "{err}");
        if !want_code.is_empty() {
            assert_eq!(err["error"]["code"], want_code, "{body}: {err}");
        }
        if !want_param.is_empty() {
            assert_eq!(err["error"]["param"], want_param, "{body}: {err}");
        }
    }
    let (status, body) = gw.get("/v1/responses/resp_missing").await?;
    assert_error(status, &body, 404, "response_not_found");
    assert_eq!(StatusCode::NOT_FOUND, status);
    Ok(())
}
