//! `tunegate generate`: one prompt through the engine, streamed to stdout, then one line on
//! stderr with the prefill and decode speeds:
//! `prompt 123 tokens, 456.7 tok/s | completion 128 tokens, 89.0 tok/s`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::adapters::{lora_handle, AdapterLimits, AdapterRegistry, LoadOptions};
use crate::engine::{
    ChatMessage, Engine, EngineConfig, GenerateRequest, Prompt, SamplingParams, StreamEvent, Timings, Usage,
};

#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub prompt: String,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: Option<u64>,
    /// Send the prompt as is instead of wrapping it in the chat template as a user turn.
    pub raw: bool,
    pub threads: usize,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let name = args.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let engine = Engine::start(EngineConfig {
        model_path: args.model.clone(),
        model_name: name,
        threads: args.threads,
        ..EngineConfig::default()
    })
    .with_context(|| format!("loading {}", args.model.display()))?;
    let info = engine.info()?;
    let adapter = match &args.adapter {
        Some(path) => {
            let registry = AdapterRegistry::for_engine(&engine, AdapterLimits::default());
            registry.load("cli", path, LoadOptions::default()).with_context(|| format!("loading {}", path.display()))?;
            registry.lease("cli").as_ref().map(lora_handle)
        }
        None => None,
    };
    let prompt = if args.raw || info.chat_template.is_none() {
        args.prompt.clone()
    } else {
        info.render_chat(&[ChatMessage::new("user", args.prompt.clone())])?
    };
    let mut stream = engine.submit(GenerateRequest {
        prompt: Prompt::Text(prompt),
        cache_scope: 0,
        constraint: None,
        params: SamplingParams {
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            seed: args.seed,
            ..SamplingParams::default()
        },
        adapter,
    })?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = stream.next_blocking() {
        match ev {
            StreamEvent::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            StreamEvent::Done { usage, timings, .. } => {
                writeln!(out)?;
                drop(out);
                eprintln!("{}", speed_line(usage, timings));
                engine.shutdown();
                return Ok(());
            }
            StreamEvent::Error(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("the engine stopped without finishing the request")
}

/// Prefill speed counts the prompt over the time from entering the batch to the first
/// token; decode speed counts the tokens after the first over the time after it.
pub fn speed_line(usage: Usage, t: Timings) -> String {
    let prefill = t.time_to_first_token.saturating_sub(t.queued).as_secs_f64();
    let decode = t.total.saturating_sub(t.time_to_first_token).as_secs_f64();
    let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    format!(
        "prompt {} tokens, {:.1} tok/s | completion {} tokens, {:.1} tok/s",
        usage.prompt_tokens,
        rate(usage.prompt_tokens, prefill),
        usage.completion_tokens,
        rate(usage.completion_tokens.saturating_sub(1), decode),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn speed_line_format() {
        let usage = Usage { prompt_tokens: 100, completion_tokens: 11, cached_tokens: 0 };
        let t = Timings {
            queued: Duration::from_millis(0),
            time_to_first_token: Duration::from_millis(500),
            total: Duration::from_millis(1500),
        };
        assert_eq!(speed_line(usage, t), "prompt 100 tokens, 200.0 tok/s | completion 11 tokens, 10.0 tok/s");
    }
}
