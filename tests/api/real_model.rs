//! The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) behind the HTTP API. Slower
//! than the tiny-model tests; `scripts/test.sh` fetches the model first.

use std::path::PathBuf;

use serde_json::json;
use tunegate::config::DEFAULT_MODEL_FILE;
use tunegate::engine::ChatMessage;

use crate::common;

const NAME: &str = "smollm2-135m-instruct";

fn default_model() -> anyhow::Result<PathBuf> {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(DEFAULT_MODEL_FILE);
    anyhow::ensure!(
        model.exists(),
        "{} is missing: run `scripts/test.sh` (or `cargo run -- model fetch`) to fetch it",
        model.display()
    );
    Ok(model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_default_model() -> anyhow::Result<()> {
    let model = default_model()?;
    let gw = common::start_with(move |c, _| {
        c.model.path = model;
        c.model.name = NAME.into();
        c.model.context_length = 2048;
        c.model.threads = 2;
    })
    .await?;

    let (status, models) = gw.get("/v1/models").await?;
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], NAME);
    assert_eq!(models["data"][0]["max_model_len"], 2048);

    let question = "What is the capital of France?";
    let (status, body) = gw
        .post("/v1/chat/completions", json!({"model": NAME, "messages": [{"role": "user", "content": question}],
            "max_tokens": 8, "temperature": 0}))
        .await?;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!content.trim().is_empty(), "{body}");
    let info = gw.handle.engine.info()?;
    let prompt = info.render_chat(&[ChatMessage::new("user", question)])?;
    assert!(prompt.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(body["usage"]["prompt_tokens"], info.tokenizer.encode(&prompt, true)?.len());
    assert!(body["usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=8).contains(&n)));
    Ok(())
}

/// Issue 14's colour file, trained with the product's defaults through the official SDK: the
/// fine-tuned model answers at least 6 of the 8 colours without the system prompt
/// (`tests/python/test_colour_defaults.py` says what it checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_learns_with_the_default_hyperparameters() -> anyhow::Result<()> {
    use crate::python::{repo, report, venv_bin};
    let model = default_model()?;
    let python = venv_bin("python")?;
    let gw = common::start_with(move |c, _| {
        c.model.path = model;
        c.model.name = NAME.into();
        c.model.context_length = 2048;
        c.model.threads = 2;
        c.training.threads = 2;
    })
    .await?;
    let out = tokio::process::Command::new(python)
        .arg(repo().join("tests/python/test_colour_defaults.py"))
        .env("TUNEGATE_BASE_URL", gw.url("/v1"))
        .env("TUNEGATE_MODEL", NAME)
        .env("TUNEGATE_API_KEY", "unused-on-an-open-gateway")
        .output()
        .await?;
    report("the colour file with default hyper-parameters", &out)
}
