//! Structured outputs over HTTP: `response_format` json_schema and json_object constrain
//! every choice (the tiny model is random, so only the grammar makes its output valid),
//! streamed and not, with `n`, on an adapter; a cut-off reports `length`; schemas the
//! grammar engine refuses, and malformed formats, are 400s on `response_format`.

use serde_json::{json, Value};

use crate::common::{self, assert_error, MODEL};

fn schema() -> Value {
    json!({
        "type": "json_schema",
        "json_schema": {
            "name": "verdict",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "enum": ["spam", "ham"]},
                    "score": {"type": "integer", "minimum": 0, "maximum": 9},
                    "urgent": {"type": "boolean"}
                },
                "required": ["label", "score", "urgent"],
                "additionalProperties": false
            }
        }
    })
}

fn check_verdict(text: &str) -> anyhow::Result<()> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{e}: {text:?}"))?;
    assert!(matches!(v["label"].as_str(), Some("spam" | "ham")), "{v}");
    assert!(v["score"].as_u64().is_some_and(|s| s <= 9), "{v}");
    assert!(v["urgent"].is_boolean(), "{v}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(3), "{v}");
    Ok(())
}

fn messages() -> Value {
    json!([{"role": "user", "content": "Classify: WIN A FREE CRUISE NOW"}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_constrains_every_choice_streamed_or_not() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let body = json!({"model": MODEL, "messages": messages(), "max_tokens": 60, "n": 3,
        "temperature": 1.0, "seed": 5, "response_format": schema()});
    let (status, whole) = gw.post("/v1/chat/completions", body.clone()).await?;
    assert_eq!(status, 200, "{whole}");
    let choices = whole["choices"].as_array().cloned().unwrap_or_default();
    assert_eq!(choices.len(), 3);
    for c in &choices {
        assert_eq!(c["finish_reason"], "stop", "{c}");
        check_verdict(c["message"]["content"].as_str().unwrap_or_default())?;
    }

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = gw.sse("/v1/chat/completions", streamed).await?;
    let mut texts = vec![String::new(); 3];
    let mut finished = vec![Value::Null; 3];
    for e in &events {
        for c in e["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap_or(0) as usize;
            texts[i].push_str(c["delta"]["content"].as_str().unwrap_or_default());
            if !c["finish_reason"].is_null() {
                finished[i] = c["finish_reason"].clone();
            }
        }
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(finished[i], "stop", "choice {i}");
        check_verdict(t)?;
        // The same seed gives the same choices streamed as not.
        assert_eq!(Some(t.as_str()), choices[i]["message"]["content"].as_str());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_on_an_adapter_and_cut_offs_report_length() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| c.adapters.watch = false).await?;
    let shape = gw.shape()?;
    tunegate::testing::write_random_adapter(&gw.adapters_root().join("acme/v1"), &shape, 8, 3)?;
    let (s, b) = gw.load_adapter("acme", "acme/v1", false).await?;
    assert_eq!(s, 200, "{b}");
    for model in [MODEL, "acme"] {
        let body = json!({"model": model, "messages": messages(), "max_tokens": 80,
            "response_format": {"type": "json_object"}});
        let (status, out) = gw.post("/v1/chat/completions", body).await?;
        assert_eq!(status, 200, "{out}");
        let c = &out["choices"][0];
        let text = c["message"]["content"].as_str().unwrap_or_default();
        if c["finish_reason"] == "stop" {
            let v: Value = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{model}: {e}: {text:?}"))?;
            assert!(v.is_object(), "{model}: {v}");
        } else {
            assert_eq!(c["finish_reason"], "length", "{c}");
            assert!(text.starts_with('{'), "{model}: {text:?}");
        }
    }
    // Too few tokens for the schema's object: cut off, and said so.
    let body = json!({"model": MODEL, "messages": messages(), "max_tokens": 3, "response_format": schema()});
    let (status, out) = gw.post("/v1/chat/completions", body).await?;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["finish_reason"], "length", "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_response_formats_are_400_on_response_format() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let cases = [
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nowhere"}}}),
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"name": "no spaces allowed", "schema": {}}}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}),
        json!({"type": "xml"}),
    ];
    for f in cases {
        let (status, body) = gw
            .post("/v1/chat/completions", json!({"model": MODEL, "messages": messages(), "response_format": f}))
            .await?;
        assert_error(status, &body, 400, "invalid_value");
        assert!(body["error"]["param"].as_str().is_some_and(|p| p.starts_with("response_format")), "{f}: {body}");
    }
    // Text is the default and stays accepted.
    let (status, body) = gw
        .post("/v1/chat/completions", json!({"model": MODEL, "messages": messages(), "max_tokens": 2, "response_format": {"type": "text"}}))
        .await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": false}}}
    ])
}

fn check_call(call: &Value, name: &str) -> anyhow::Result<Value> {
    assert!(call["id"].as_str().is_some_and(|i| i.starts_with("call_")), "{call}");
    assert_eq!(call["type"], "function", "{call}");
    assert_eq!(call["function"]["name"], name, "{call}");
    let args = call["function"]["arguments"].as_str().unwrap_or_default();
    serde_json::from_str(args).map_err(|e| anyhow::anyhow!("{e}: {args:?}"))
}

/// A chat template that takes tools itself (Hugging Face's `tools` variable, assistant
/// `tool_calls`, `tool` turns), in the style of the Hermes/Qwen families; written for this test.
const TOOL_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}\
Functions:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n\
{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}\
{%- for m in messages %}{% if m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}\
{%- for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}\
<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_takes_tools_renders_them_itself() -> anyhow::Result<()> {
    let generic = common::start_with(|c, _| c.model.context_length = 1024).await?;
    let native = common::start_with(|c, dir| {
        c.model.context_length = 1024;
        c.model.path = tunegate::testing::write_tiny_llama_gguf_with(dir, "tools.gguf", Some(TOOL_TEMPLATE)).unwrap_or_default();
    })
    .await?;
    let history = json!([
        {"role": "system", "content": "Answer with a call."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\",\"unit\":\"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"},
        {"role": "user", "content": "And in Rome?"}
    ]);
    let body = json!({"model": MODEL, "messages": history, "max_tokens": 150, "temperature": 0,
        "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let mut prompt_tokens = Vec::new();
    for gw in [&generic, &native] {
        let (status, out) = gw.post("/v1/chat/completions", body.clone()).await?;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls", "{out}");
        check_call(&out["choices"][0]["message"]["tool_calls"][0], "get_weather")?;
        prompt_tokens.push(out["usage"]["prompt_tokens"].as_u64().unwrap_or_default());
    }
    // The template's own tool syntax is shorter than the generic tool prompt's instructions:
    // the native gateway's prompt is the template's rendering, not the generic one.
    assert!(prompt_tokens[1] + 40 < prompt_tokens[0], "{prompt_tokens:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_follow_the_functions_schema_streamed_or_not() -> anyhow::Result<()> {
    // The tiny model's byte-level vocabulary spends a token per character or two: room for
    // the tool prompt.
    let gw = common::start_with(|c, _| c.model.context_length = 1024).await?;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 150, "temperature": 0,
        "tools": tools(), "tool_choice": named});
    let (status, out) = gw.post("/v1/chat/completions", body.clone()).await?;
    assert_eq!(status, 200, "{out}");
    let c = &out["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{c}");
    assert!(c["message"]["content"].is_null(), "{c}");
    let args = check_call(&c["message"]["tool_calls"][0], "get_weather")?;
    assert!(args["city"].as_str().is_some_and(|s| s.chars().count() <= 12), "{args}");
    assert!(matches!(args["unit"].as_str(), Some("c" | "f")), "{args}");

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = gw.sse("/v1/chat/completions", streamed).await?;
    let last = events.iter().rev().find(|e| !e["choices"][0]["finish_reason"].is_null()).cloned().unwrap_or_default();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls", "{events:?}");
    // As OpenAI streams a call: announced once (id, type, name), then its arguments in pieces.
    let deltas: Vec<&Value> = events.iter().filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert!(deltas.len() > 3, "{deltas:?}");
    assert!(deltas.iter().all(|d| d["index"] == 0), "{deltas:?}");
    assert_eq!((&deltas[0]["function"]["name"], &deltas[0]["function"]["arguments"]), (&json!("get_weather"), &json!("")));
    assert!(deltas[1..].iter().all(|d| d.get("id").is_none() && d["function"].get("name").is_none()), "{deltas:?}");
    let arguments: String = deltas.iter().filter_map(|d| d["function"]["arguments"].as_str()).collect();
    let mut whole = deltas[0].clone();
    whole["function"]["arguments"] = json!(arguments);
    assert_eq!(check_call(&whole, "get_weather")?, args, "streamed and whole differ");
    // The log keeps what the call was made with (durable logging: committed before the answer).
    let (status, logged) = gw.get(&format!("/admin/logs/{}", out["id"].as_str().unwrap_or_default())).await?;
    assert_eq!(status, 200, "{logged}");
    assert_eq!(logged["request"]["params"]["tools"], tools(), "{logged}");
    assert_eq!(logged["request"]["params"]["tool_choice"]["function"]["name"], "get_weather", "{logged}");

    // `required` with two tools: one of them, with its own arguments.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Time?"}], "max_tokens": 150,
        "tools": tools(), "tool_choice": "required", "temperature": 1.0, "seed": 3, "n": 2});
    let (status, out) = gw.post("/v1/chat/completions", body).await?;
    assert_eq!(status, 200, "{out}");
    for c in out["choices"].as_array().into_iter().flatten() {
        let call = &c["message"]["tool_calls"][0];
        let name = call["function"]["name"].as_str().unwrap_or_default().to_string();
        let args = check_call(call, &name)?;
        match name.as_str() {
            "get_time" => assert!(matches!(args["zone"].as_str(), Some("utc" | "cet")), "{args}"),
            "get_weather" => assert!(args["city"].is_string(), "{args}"),
            other => anyhow::bail!("unknown tool {other}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_history_auto_choice_and_bad_tools() -> anyhow::Result<()> {
    let gw = common::start_with(|c, _| c.model.context_length = 1024).await?;
    // A conversation that already called a tool and got its result.
    let messages = json!([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\",\"unit\":\"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3C"}
    ]);
    let (status, out) = gw
        .post("/v1/chat/completions", json!({"model": MODEL, "messages": messages, "tools": tools(), "max_tokens": 8}))
        .await?;
    assert_eq!(status, 200, "{out}");
    let c = &out["choices"][0];
    // The random model rarely writes a call; whichever it wrote comes back well formed.
    if c["finish_reason"] == "tool_calls" {
        let name = c["message"]["tool_calls"][0]["function"]["name"].as_str().unwrap_or_default().to_string();
        check_call(&c["message"]["tool_calls"][0], &name)?;
    } else {
        assert!(c["message"]["content"].is_string(), "{c}");
        assert!(c["message"].get("tool_calls").is_none(), "{c}");
    }
    // The prompt carried the tools: it is longer than without them.
    let (_, plain) = gw.post("/v1/chat/completions", json!({"model": MODEL, "messages": messages, "max_tokens": 1})).await?;
    assert!(out["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64().map(|n| n + 50));

    let cases = [
        (json!({"tools": [{"type": "code_interpreter"}]}), "tools[0].type"),
        (json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}), "tools[0].function.parameters"),
    ];
    for (extra, param) in cases {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let (status, b) = gw.post("/v1/chat/completions", body).await?;
        assert_error(status, &b, 400, "invalid_value");
        assert_eq!(b["error"]["param"], param, "{b}");
    }
    Ok(())
}

/// A task whose examples share a system prompt and a tool list: the adapter trained from an
/// OpenAI-format file (`tools` beside the messages, assistant `tool_calls`) absorbs both, and
/// the router drops both from a request that carries that prompt and that list, only then;
/// the grammar still enforces the tool's schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_tool_list_is_distilled_with_the_system_prompt() -> anyhow::Result<()> {
    use tunegate::engine::tool_prompt::{system_block, Function};
    use tunegate::training::dataset::prompt_hash;

    const SYSTEM: &str = "You control the lights of the house. Call lamp for every request.";
    let lamp = json!({"type": "function", "function": {"name": "lamp", "description": "Switch the lamp",
        "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}});
    let gw = common::start_with(|c, _| {
        common::with_keys(c);
        c.training.rank = 8;
        c.training.alpha = 16.0;
        c.training.eval_fraction = 0.0;
    })
    .await?;
    let asks = ["Light on", "Lights off", "Switch it on", "Turn the lamp off", "On please", "Off now", "Make it bright", "Darkness"];
    let jsonl: String = asks
        .iter()
        .enumerate()
        .map(|(i, ask)| {
            let call = json!([{"id": format!("c{i}"), "type": "function",
                "function": {"name": "lamp", "arguments": json!({"on": i % 2 == 0}).to_string()}}]);
            json!({"tools": [lamp.clone()], "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": ask},
                {"role": "assistant", "content": null, "tool_calls": call},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    let (status, file) = common::upload_file(&gw, common::CLIENT_KEY, &jsonl).await?;
    anyhow::ensure!(status == 200, "upload: {status}: {file}");
    let file: Value = serde_json::from_str(&file)?;
    let res = gw
        .http
        .post(gw.url("/v1/fine_tuning/jobs"))
        .bearer_auth(common::CLIENT_KEY)
        .json(&json!({"model": MODEL, "training_file": file["id"], "suffix": "lights", "hyperparameters": {"n_epochs": 1}}))
        .send()
        .await?;
    let job: Value = res.json().await?;
    let done = common::wait_job(&gw, common::CLIENT_KEY, job["id"].as_str().unwrap_or_default()).await?;
    anyhow::ensure!(done["status"] == "succeeded", "{done}");
    let model = done["fine_tuned_model"].as_str().unwrap_or_default().to_string();

    // The adapter records the system prompt *with* the tool block as what it absorbed.
    let functions: Vec<Function> = Function::from_openai(&lamp).into_iter().collect();
    let absorbed = format!("{SYSTEM}\n\n{}", system_block(&functions));
    let meta_path = walk(&gw.adapters_root())
        .into_iter()
        .find(|p| p.ends_with("tunegate.json") && std::fs::read_to_string(p).is_ok_and(|t| t.contains("distilled_prompt")))
        .ok_or_else(|| anyhow::anyhow!("no tunegate.json with a distilled prompt"))?;
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(meta_path)?)?;
    assert_eq!(meta["distilled_prompt"]["sha256"], prompt_hash(&absorbed), "{meta}");

    let ask = |tools: Value, system: Option<&str>| {
        let mut messages = vec![json!({"role": "user", "content": "Light on"})];
        if let Some(s) = system {
            messages.insert(0, json!({"role": "system", "content": s}));
        }
        gw.http
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(common::CLIENT_KEY)
            .json(&json!({"model": model, "messages": messages, "tools": tools, "tool_choice": "required",
                "max_tokens": 60, "temperature": 0}))
            .send()
    };
    let saved = |res: &reqwest::Response| -> u64 {
        res.headers().get("x-tunegate-prompt-tokens-saved").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
    };
    // The same prompt and tools: both dropped, and the call still follows the schema.
    let res = ask(json!([lamp.clone()]), Some(SYSTEM)).await?;
    assert_eq!(res.status(), 200);
    let dropped = saved(&res);
    assert!(dropped > 0, "the prompt and tools were not dropped");
    let body: Value = res.json().await?;
    assert_eq!(meta["distilled_prompt"]["tokens"].as_u64(), Some(dropped));
    assert_eq!(body["usage"]["prompt_tokens_details"]["distilled_tokens"].as_u64(), Some(dropped));
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "lamp", "{body}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or_default())?;
    assert!(args["on"].is_boolean(), "{args}");
    // Another tool list, or the tools without the prompt: nothing is dropped.
    let other = json!({"type": "function", "function": {"name": "blinds", "parameters": {"type": "object"}}});
    for (tools, system) in [(json!([lamp.clone(), other]), Some(SYSTEM)), (json!([lamp.clone()]), None)] {
        let res = ask(tools, system).await?;
        assert_eq!(res.status(), 200);
        assert_eq!(saved(&res), 0);
    }
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
