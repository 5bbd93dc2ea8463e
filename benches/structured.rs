//! Structured outputs, run as users run them: `cargo bench --bench structured`.
//!
//! Starts the gateway in-process on the default model with the shipped defaults and sends
//! chat completions with `response_format: json_schema` over HTTP:
//! - validity: 12 varied schemas × 42 requests (504), half streamed, sampled at temperature
//!   1 with distinct seeds, each output checked with an independent validator (the
//!   `jsonschema` crate, not the grammar engine that produced it);
//! - decode speed: the same long answer constrained (a schema of an array of enum labels)
//!   and unconstrained (`ignore_eos`, the same number of tokens), interleaved rounds, decode
//!   tokens/s from the stream's timestamps;
//! - the grammar engine alone: the first compile of each schema (what a request with a new
//!   schema waits for), a cached compile, and the time of each step's token mask along
//!   sampled valid outputs.
//!
//! Writes `benches/results/structured.md` (and prints it).

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tunegate::config::{Config, DEFAULT_MODEL_FILE};
use tunegate::engine::grammar::GrammarSpec;
use tunegate::gateway::start_server;

const MODEL: &str = "smollm2-135m-instruct";
const PER_SCHEMA: usize = 42;
const CONCURRENCY: usize = 4;
const SPEED_ROUNDS: usize = 5;
const SPEED_TOKENS: usize = 96;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run())
}

/// Varied schemas as applications send them (the SDKs' strict form: every object closed,
/// every property required), bounded so a small model finishes within `max_tokens`.
fn schemas() -> Vec<(&'static str, &'static str, Value)> {
    let obj = |props: Value| {
        let required: Vec<String> = props.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
    };
    vec![
        ("label", "Classify: 'my card was charged twice'", obj(json!({"label": {"enum": ["billing", "technical", "account", "other"]}}))),
        ("bool+enum", "Is 'win money now' spam?", obj(json!({"spam": {"type": "boolean"}, "confidence": {"enum": ["low", "medium", "high"]}}))),
        ("bounded int", "Rate the movie Up from 1 to 10.", obj(json!({"score": {"type": "integer", "minimum": 1, "maximum": 10}}))),
        ("short strings", "Extract the person: 'Ada Lovelace wrote the first program.'", obj(json!({"first": {"type": "string", "maxLength": 20}, "last": {"type": "string", "maxLength": 20}}))),
        ("nested", "Describe Paris briefly.", obj(json!({"city": {"type": "string", "maxLength": 24}, "location": obj(json!({"country": {"type": "string", "maxLength": 24}, "coastal": {"type": "boolean"}}))}))),
        ("array of enums", "Tag: 'cheap flights to Rome in May'", obj(json!({"tags": {"type": "array", "items": {"enum": ["travel", "price", "date", "place", "food"]}, "maxItems": 4}}))),
        ("array of objects", "List two fruits and their colours.", obj(json!({"items": {"type": "array", "maxItems": 3, "items": obj(json!({"name": {"type": "string", "maxLength": 16}, "colour": {"enum": ["red", "green", "yellow", "orange", "purple"]}}))}}))),
        ("nullable", "Does this text mention a date: 'see you soon'?", obj(json!({"date": {"anyOf": [{"type": "string", "maxLength": 16}, {"type": "null"}]}}))),
        ("anyOf objects", "Turn the lamp on.", obj(json!({"action": {"anyOf": [obj(json!({"lamp": {"type": "boolean"}})), obj(json!({"volume": {"type": "integer", "minimum": 0, "maximum": 10}}))]}}))),
        ("$defs ref", "Give a point on a map.", json!({"$defs": {"coord": {"type": "number", "minimum": -180, "maximum": 180}}, "type": "object", "properties": {"lat": {"$ref": "#/$defs/coord"}, "lon": {"$ref": "#/$defs/coord"}}, "required": ["lat", "lon"], "additionalProperties": false})),
        ("pattern", "Give a product code like AB-123.", obj(json!({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}))),
        ("many fields", "Fill in a support ticket.", obj(json!({
            "priority": {"enum": ["p1", "p2", "p3"]}, "team": {"enum": ["web", "mobile", "backend"]},
            "customer_visible": {"type": "boolean"}, "estimate_hours": {"type": "integer", "minimum": 0, "maximum": 40},
            "summary": {"type": "string", "maxLength": 40}}))),
    ]
}

async fn run() -> anyhow::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models").join(DEFAULT_MODEL_FILE);
    anyhow::ensure!(model.exists(), "{} is missing: run `tunegate model fetch`", model.display());
    let dir = tempfile::tempdir()?;
    // The shipped config, pointed at a scratch data dir and a free port.
    let shipped = std::fs::read_to_string(root.join("config/tunegate.toml"))?;
    let env = vec![
        ("TUNEGATE_BIND".to_string(), "127.0.0.1:0".to_string()),
        ("TUNEGATE_DATA_DIR".to_string(), dir.path().join("data").display().to_string()),
        ("TUNEGATE_MODEL".to_string(), model.display().to_string()),
        ("TUNEGATE_ADAPTERS_ROOT".to_string(), dir.path().join("adapters").display().to_string()),
    ];
    let config = Config::parse(&shipped, "config/tunegate.toml", env)?;
    let gw = start_server(config).await?;
    gw.wait_ready(Duration::from_secs(120)).await?;
    let url = gw.url("/v1/chat/completions");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let schemas = schemas();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // The grammar engine alone: first and cached compiles, per-step masks.
    let info = gw.engine.info()?;
    let started = Instant::now();
    let grammars = info.grammars()?;
    let trie_ms = started.elapsed().as_secs_f64() * 1e3;
    let (mut first, mut cached, mut masks) = (Vec::new(), Vec::new(), Vec::new());
    let vocab = info.shape.vocab_size;
    let mut rng = 12345u64;
    for (_, _, schema) in &schemas {
        let spec = GrammarSpec::JsonSchema(schema.clone());
        let t = Instant::now();
        let mut c = grammars.compile(&spec)?;
        first.push(t.elapsed());
        let t = Instant::now();
        let _again = grammars.compile(&spec)?;
        cached.push(t.elapsed());
        for _ in 0..200 {
            if c.is_complete() {
                break;
            }
            let mut logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    (rng % 1000) as f32 / 100.0
                })
                .collect();
            let t = Instant::now();
            c.mask(&mut logits)?;
            masks.push(t.elapsed());
            let pick = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0);
            if logits[pick as usize] == f32::NEG_INFINITY {
                break; // only end-of-sequence left
            }
            c.commit(pick)?;
        }
    }

    // Validity over HTTP.
    let mut jobs = Vec::new();
    for (si, (_, prompt, schema)) in schemas.iter().enumerate() {
        for i in 0..PER_SCHEMA {
            jobs.push((si, i % 2 == 1, json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 256, "temperature": 1.0, "seed": (si * 1000 + i) as u64,
                "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": true}}})));
        }
    }
    let validators: Vec<jsonschema::Validator> =
        schemas.iter().map(|(_, _, s)| jsonschema::validator_for(s)).collect::<Result<_, _>>().map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let outcomes: Vec<anyhow::Result<(usize, bool, String, String)>> = futures_util::stream::iter(jobs)
        .map(|(si, streamed, mut body)| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                if streamed {
                    body["stream"] = json!(true);
                    let text = client.post(&url).json(&body).send().await?.error_for_status()?.text().await?;
                    let (mut content, mut finish) = (String::new(), String::new());
                    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
                        let chunk: Value = serde_json::from_str(line)?;
                        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
                            content.push_str(c);
                        }
                        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
                            finish = f.to_string();
                        }
                    }
                    Ok((si, streamed, content, finish))
                } else {
                    let v: Value = client.post(&url).json(&body).send().await?.error_for_status()?.json().await?;
                    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
                    let finish = v["choices"][0]["finish_reason"].as_str().unwrap_or_default().to_string();
                    Ok((si, streamed, content, finish))
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let validity_s = started.elapsed().as_secs_f64();
    let mut per_schema = vec![(0usize, 0usize, 0usize); schemas.len()]; // (valid, cut off, invalid)
    let mut failures = Vec::new();
    for o in outcomes {
        let (si, streamed, content, finish) = o?;
        let valid = serde_json::from_str::<Value>(&content).is_ok_and(|v| validators[si].is_valid(&v));
        let slot = &mut per_schema[si];
        if finish == "length" {
            slot.1 += 1;
        } else if valid {
            slot.0 += 1;
        } else {
            slot.2 += 1;
            failures.push(format!("{} (streamed: {streamed}): {content}", schemas[si].0));
        }
    }

    // Decode speed: constrained vs unconstrained, same prompt, interleaved.
    let long = json!({"type": "object", "properties": {"labels": {"type": "array", "minItems": 40, "maxItems": 40,
        "items": {"enum": ["alpha", "beta", "gamma", "delta"]}}}, "required": ["labels"], "additionalProperties": false});
    let prompt = "Write forty labels.";
    let (mut constrained, mut free) = (Vec::new(), Vec::new());
    for round in 0..SPEED_ROUNDS + 1 {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 400,
            "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
            "response_format": {"type": "json_schema", "json_schema": {"name": "labels", "schema": long, "strict": true}}});
        let (tps, tokens) = decode_rate(&client, &url, body).await?;
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens.max(SPEED_TOKENS),
            "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
        let (free_tps, _) = decode_rate(&client, &url, body).await?;
        if round > 0 {
            // Round 0 warms the grammar cache and the prefix cache.
            constrained.push(tps);
            free.push(free_tps);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c_tps, f_tps) = (med(&mut constrained), med(&mut free));

    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
    };
    let total: usize = per_schema.iter().map(|s| s.0 + s.1 + s.2).sum();
    let valid: usize = per_schema.iter().map(|s| s.0).sum();
    let cut: usize = per_schema.iter().map(|s| s.1).sum();
    let finished = total - cut;
    let mut md = String::new();
    md.push_str("# Structured outputs: validity, speed, grammar costs\n\n");
    md.push_str(&format!(
        "`cargo bench --bench structured` (release), default model `{DEFAULT_MODEL_FILE}`, shipped config \
         (`config/tunegate.toml`: `model.threads` 2); load average at start: {}\n\n",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    md.push_str("## Validity (independent validator: the `jsonschema` crate)\n\n");
    md.push_str(&format!(
        "{total} requests ({} schemas × {PER_SCHEMA}, half streamed, temperature 1, distinct seeds, {CONCURRENCY} at a time, \
         {validity_s:.0} s): **{valid} of {finished} finished outputs valid ({:.1}%)**, {cut} cut off by `max_tokens` \
         (`finish_reason: \"length\"`, reported as such, not counted as finished).\n\n",
        schemas.len(),
        100.0 * valid as f64 / finished.max(1) as f64
    ));
    md.push_str("| schema | valid | cut off | invalid |\n|---|---|---|---|\n");
    for ((name, _, _), (v, c, i)) in schemas.iter().zip(&per_schema) {
        md.push_str(&format!("| {name} | {v} | {c} | {i} |\n"));
    }
    for f in failures.iter().take(5) {
        md.push_str(&format!("\ninvalid: `{f}`\n"));
    }
    md.push_str("\n## Decode speed, constrained vs free\n\n");
    md.push_str(&format!(
        "One stream, greedy, the same prompt: a 40-label array under its schema vs free text of the same length \
         (`ignore_eos`); decode tokens/s from the stream (first token to last), median of {SPEED_ROUNDS} interleaved rounds.\n\n\
         | | tokens/s |\n|---|---|\n| constrained | {c_tps:.1} |\n| free | {f_tps:.1} |\n| **ratio** | **{:.2}×** (target ≥ 0.9×) |\n",
        c_tps / f_tps
    ));
    md.push_str("\n## The grammar engine alone\n\n");
    md.push_str(&format!(
        "| | p50 | p99 / max |\n|---|---|---|\n\
         | token trie, once per model | {trie_ms:.1} ms | |\n\
         | first compile of a schema (what a request with a new schema waits for) | {:.2} ms | {:.2} ms (max) |\n\
         | cached compile | {:.0} µs | {:.0} µs (max) |\n\
         | token mask per step ({} steps along sampled valid outputs) | {:.0} µs | {:.0} µs |\n",
        pct(&mut first, 0.5) / 1e3,
        pct(&mut first, 1.0) / 1e3,
        pct(&mut cached, 0.5),
        pct(&mut cached, 1.0),
        masks.len(),
        pct(&mut masks, 0.5),
        pct(&mut masks, 0.99),
    ));
    md.push_str(
        "\nTargets (issue 17): 100% valid; constrained decode ≥ 0.9× free; mask p50 ≤ 100 µs; a new typical schema \
         adds ≤ 50 ms. Each step's masks are computed on a second thread while the forward pass runs (a mask depends only on the tokens before it); the engine thread only applies them.\n",
    );
    println!("{md}");
    let out = root.join("benches/results/structured.md");
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    gw.stop(true).await;
    Ok(())
}

/// Streams `body` and returns decode tokens/s (first content chunk to the last) and the
/// completion tokens.
async fn decode_rate(client: &reqwest::Client, url: &str, body: Value) -> anyhow::Result<(f64, usize)> {
    let res = client.post(url).json(&body).send().await?.error_for_status()?;
    let mut stream = res.bytes_stream();
    let (mut first, mut last) = (None, None);
    let mut buf = String::new();
    let mut tokens = 0;
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    let span = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    anyhow::ensure!(tokens > 1 && span > 0.0, "no decode to time ({tokens} tokens)");
    Ok(((tokens - 1) as f64 / span, tokens))
}
