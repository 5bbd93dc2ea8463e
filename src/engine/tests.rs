//! Engine tests on tiny random models written by the tests themselves. Every numeric check
//! is against `testing::reference_logits`, a plain f32 re-implementation.

use std::path::Path;

use candle_core::quantized::GgmlDType;

use super::gguf::GgufFile;
use super::hf::SafetensorsDir;
use super::lora::{BatchLora, Proj};
use super::model::{KvCache, Model, SeqBatch};
use super::testing::{reference_greedy, reference_logits, TinyLora, TinySpec, TinyWeights};
use super::*;
use crate::adapters::{peft, AdapterLimits, LoadOptions};

type R = anyhow::Result<()>;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn load_gguf(path: &Path) -> anyhow::Result<Model> {
    let mut f = GgufFile::open(path)?;
    let cfg = f.config()?;
    let arch = f.architecture.clone();
    let il = f.rope_interleaved();
    Ok(Model::new(cfg, &mut f, &arch, "tiny", il)?)
}

fn load_st(dir: &Path) -> anyhow::Result<Model> {
    let mut s = SafetensorsDir::open(dir)?;
    let cfg = s.config.clone();
    let arch = s.architecture.clone();
    Ok(Model::new(cfg, &mut s, &arch, "tiny", false)?)
}

/// Runs `prompt` as one prefill then `n` greedy single-token steps; returns every step's
/// logits.
fn run_steps(m: &Model, prompt: &[u32], n: usize, lora: Option<&super::lora::LoraWeights>) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut cache = KvCache::new(m.shape.num_layers);
    let mut toks = prompt.to_vec();
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    for _ in 0..=n {
        let bl = BatchLora::new(&[(feed.len(), lora)])?;
        let logits = m.forward(&mut [SeqBatch { tokens: &feed, cache: &mut cache }], &bl)?;
        let row = logits.to_vec2::<f32>()?.remove(0);
        let id = sampling::argmax(&row) as u32;
        out.push(row);
        toks.push(id);
        feed = vec![id];
    }
    Ok(out)
}

fn check_against_reference(m: &Model, w: &TinyWeights, prompt: &[u32], tol: f32) -> R {
    let steps = run_steps(m, prompt, 6, None)?;
    let mut toks = prompt.to_vec();
    for row in &steps {
        let r = reference_logits(w, &toks)?;
        let last = r.last().ok_or_else(|| anyhow::anyhow!("no logits"))?;
        let d = max_diff(row, last);
        anyhow::ensure!(d < tol, "logits differ by {d} at length {}", toks.len());
        toks.push(sampling::argmax(row) as u32);
    }
    let greedy: Vec<u32> = toks[prompt.len()..].to_vec();
    anyhow::ensure!(greedy == reference_greedy(w, prompt, greedy.len())?, "greedy tokens differ");
    Ok(())
}

#[test]
fn llama_gguf_f32_matches_reference() -> R {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec::llama(300);
    let w = TinyWeights::random(&spec, 1);
    let p = dir.path().join("m.gguf");
    w.write_gguf(&p, GgmlDType::F32, None)?;
    let m = load_gguf(&p)?;
    assert!(m.rope_interleaved());
    check_against_reference(&m, &w, &[5, 17, 250, 3, 99, 42, 7, 8, 9], 1e-3)
}

#[test]
fn llama_safetensors_matches_reference() -> R {
    let dir = tempfile::tempdir()?;
    let mut spec = TinySpec::llama(300);
    spec.tie_embeddings = true;
    let w = TinyWeights::random(&spec, 2);
    w.write_safetensors_dir(dir.path())?;
    let m = load_st(dir.path())?;
    check_against_reference(&m, &w, &[1, 2, 3, 200, 100], 1e-3)
}

#[test]
fn qwen2_gguf_and_safetensors_match_reference() -> R {
    let dir = tempfile::tempdir()?;
    let mut spec = TinySpec::llama(300);
    spec.qwen2 = true;
    let w = TinyWeights::random(&spec, 3);
    let p = dir.path().join("q.gguf");
    w.write_gguf(&p, GgmlDType::F32, None)?;
    let m = load_gguf(&p)?;
    assert!(!m.rope_interleaved());
    check_against_reference(&m, &w, &[9, 8, 7, 6, 5], 1e-3)?;
    let st = dir.path().join("st");
    w.write_safetensors_dir(&st)?;
    check_against_reference(&load_st(&st)?, &w, &[9, 8, 7, 6, 5], 1e-3)
}

#[test]
fn quantized_gguf_types_load_and_track_reference() -> R {
    let dir = tempfile::tempdir()?;
    let mut spec = TinySpec::llama(256);
    spec.hidden = 256;
    spec.intermediate = 256;
    let w = TinyWeights::random(&spec, 4);
    let prompt = [3u32, 30, 60, 90, 120];
    let r = reference_logits(&w, &prompt)?;
    let reference = r.last().ok_or_else(|| anyhow::anyhow!("no logits"))?;
    for (dt, min_cos) in [
        (GgmlDType::F16, 0.9999),
        (GgmlDType::Q8_0, 0.999),
        (GgmlDType::Q6K, 0.99),
        (GgmlDType::Q4K, 0.95),
        (GgmlDType::Q4_1, 0.95),
        (GgmlDType::Q4_0, 0.95),
    ] {
        let p = dir.path().join(format!("{dt:?}.gguf"));
        w.write_gguf(&p, dt, None)?;
        let m = load_gguf(&p)?;
        let got = run_steps(&m, &prompt, 0, None)?.remove(0);
        let dot: f32 = got.iter().zip(reference).map(|(a, b)| a * b).sum();
        let na: f32 = got.iter().map(|a| a * a).sum::<f32>().sqrt();
        let nb: f32 = reference.iter().map(|a| a * a).sum::<f32>().sqrt();
        let cos = dot / (na * nb);
        anyhow::ensure!(cos > min_cos, "{dt:?}: cosine {cos} to the f32 reference");
    }
    Ok(())
}

/// One batch mixing base, adapter 1 and adapter 2 sequences (prefill and decode rows in
/// the same steps) gives each sequence the logits of its own merged model.
#[test]
fn mixed_lora_batch_equals_merged_weights() -> R {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec::llama(300);
    let w = TinyWeights::random(&spec, 5);
    let p = dir.path().join("m.gguf");
    w.write_gguf(&p, GgmlDType::F32, None)?;
    let m = load_gguf(&p)?;
    // Rank 16 (decode rows: the register kernels; the 5-row prefill: the widened path) and
    // rank 8 (every step in registers).
    let l1 = TinyLora::random(&spec.shape(), 16, &Proj::ALL, 11).f16_exact();
    let l2 = TinyLora::random(&spec.shape(), 8, &[Proj::Q, Proj::V, Proj::Down], 12).f16_exact();
    l1.write_peft(&dir.path().join("a1"), &spec.shape())?;
    l2.write_peft(&dir.path().join("a2"), &spec.shape())?;
    let lim = AdapterLimits::default();
    let a1 = peft::load_adapter(&dir.path().join("a1"), &m.shape, &lim)?.weights;
    let a2 = peft::load_adapter(&dir.path().join("a2"), &m.shape, &lim)?.weights;
    let merged = [w.clone(), l1.merge_into(&w), l2.merge_into(&w), l1.merge_into(&w)];
    // Sequences 1 and 3 share adapter 1 with sequence 2 between them: its group's rows are
    // two runs.
    let adapters = [None, Some(&a1), Some(&a2), Some(&a1)];
    // Different prompt lengths; sequence 0 joins a step late to mix prefill with decode.
    let prompts: [Vec<u32>; 4] = [vec![4, 5, 6], vec![10, 20, 30, 40, 50], vec![7, 7, 8], vec![3, 1, 4, 1]];
    let mut caches: Vec<KvCache> = (0..4).map(|_| KvCache::new(spec.layers)).collect();
    let mut toks: Vec<Vec<u32>> = prompts.to_vec();
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    for step in 0..5 {
        let active: Vec<usize> = if step == 0 { vec![1, 2, 3] } else { vec![0, 1, 2, 3] };
        let mut batch = Vec::new();
        let mut groups = Vec::new();
        for (i, c) in caches.iter_mut().enumerate() {
            if active.contains(&i) {
                groups.push((feed[i].len(), adapters[i]));
                batch.push(SeqBatch { tokens: &feed[i], cache: c });
            }
        }
        let bl = BatchLora::new(&groups)?;
        let rows = m.forward(&mut batch, &bl)?.to_vec2::<f32>()?;
        for (row, &i) in rows.iter().zip(&active) {
            let r = reference_logits(&merged[i], &toks[i])?;
            let last = r.last().ok_or_else(|| anyhow::anyhow!("no logits"))?;
            let d = max_diff(row, last);
            anyhow::ensure!(d < 1e-3, "sequence {i} step {step}: max logit diff {d}");
            let id = sampling::argmax(row) as u32;
            toks[i].push(id);
            feed[i] = vec![id];
        }
    }
    // The adapters really change the outputs.
    let base_last = reference_logits(&merged[0], &toks[1])?;
    let a1_last = reference_logits(&merged[1], &toks[1])?;
    let d = max_diff(&base_last[toks[1].len() - 1], &a1_last[toks[1].len() - 1]);
    anyhow::ensure!(d > 1e-2, "adapter 1 barely changes logits ({d})");
    Ok(())
}

#[test]
fn adapter_with_wrong_shape_is_rejected_naming_the_tensor() -> R {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec::llama(300);
    let mut other = spec.clone();
    other.intermediate = 96;
    TinyLora::random(&other.shape(), 4, &[Proj::Up], 1).write_peft(dir.path(), &other.shape())?;
    let err = match peft::load_adapter(dir.path(), &spec.shape(), &AdapterLimits::default()) {
        Err(e) => e.to_string(),
        Ok(_) => anyhow::bail!("a mismatched adapter loaded"),
    };
    assert!(err.contains("mlp.up_proj.lora_"), "{err}");
    let lim = AdapterLimits { max_rank: 2, ..AdapterLimits::default() };
    TinyLora::random(&spec.shape(), 4, &[Proj::Q], 1).write_peft(dir.path(), &spec.shape())?;
    let err = peft::load_adapter(dir.path(), &spec.shape(), &lim).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("max_rank"), "{err}");
    Ok(())
}

// ---- Whole-engine tests (thread, batching, tokenizer, registry) ----

fn tiny_engine(dir: &Path, max_batch: usize, max_queue: usize) -> anyhow::Result<(Engine, TinyWeights)> {
    let path = testing::write_tiny_llama_gguf(dir)?;
    let vocab = tokenizer::tiny_gguf_vocab();
    let w = TinyWeights::random(&TinySpec::llama(vocab.tokens.len()), 42);
    let engine = Engine::start(EngineConfig {
        model_path: path,
        model_name: "tiny".into(),
        context_length: 1024,
        threads: 1,
        max_batch,
        max_queue,
        prefix_cache_bytes: 64 << 20,
        adapter_limits: AdapterLimits::default(),
    })?;
    Ok((engine, w))
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, stop_at_eos: false, ..Default::default() }
}

#[test]
fn concurrent_requests_each_match_reference() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, w) = tiny_engine(dir.path(), 8, 64)?;
    let prompts: Vec<Vec<u32>> = vec![vec![10, 11, 12], vec![40, 41, 42, 43, 44, 45, 46], vec![100], vec![7, 200, 7]];
    let streams = prompts
        .iter()
        .map(|p| engine.submit(GenerateRequest { prompt: Prompt::Tokens(p.clone()), params: greedy(12), adapter: None }))
        .collect::<Result<Vec<_>>>()?;
    for (s, p) in streams.into_iter().zip(&prompts) {
        let c = s.collect_blocking()?;
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!((c.usage.prompt_tokens, c.usage.completion_tokens), (p.len(), 12));
        assert_eq!(c.tokens, reference_greedy(&w, p, 12)?, "prompt {p:?}");
    }
    Ok(())
}

#[test]
fn prefix_cache_skips_shared_prompt_and_keeps_reference_tokens() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, w) = tiny_engine(dir.path(), 4, 16)?;
    let run = |p: &Vec<u32>| -> anyhow::Result<Completion> {
        Ok(engine.submit(GenerateRequest { prompt: Prompt::Tokens(p.clone()), params: greedy(6), adapter: None })?.collect_blocking()?)
    };
    let a: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 3) as u32).collect();
    let first = run(&a)?;
    assert_eq!(first.usage.cached_tokens, 0);
    assert_eq!(first.tokens, reference_greedy(&w, &a, 6)?);

    // Shares 30 tokens with `a`: those are not run again, and the output is still the
    // reference's.
    let mut b = a[..30].to_vec();
    b.extend([9, 8, 7, 6, 5, 4, 3, 2, 1, 10]);
    let second = run(&b)?;
    assert_eq!((second.usage.prompt_tokens, second.usage.cached_tokens), (40, 30));
    assert_eq!(second.tokens, reference_greedy(&w, &b, 6)?);

    // A follow-up turn: the earlier prompt and its answer (all but the last generated token
    // have keys and values) are reused.
    let mut c = a.clone();
    c.extend(&first.tokens);
    c.extend([11, 12, 13]);
    let third = run(&c)?;
    assert_eq!(third.usage.cached_tokens, a.len() + first.tokens.len() - 1);
    assert_eq!(third.tokens, reference_greedy(&w, &c, 6)?);

    // The same prompt again: everything but the last token comes from the cache.
    let again = run(&a)?;
    assert_eq!(again.usage.cached_tokens, a.len() - 1);
    assert_eq!(again.tokens, first.tokens);
    Ok(())
}

#[test]
fn text_prompt_stop_sequences_and_seeds() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, _) = tiny_engine(dir.path(), 4, 16)?;
    let info = engine.info()?;
    let prompt = info.render_chat(&[ChatMessage::new("user", "hello there")])?;
    let run = |params: SamplingParams| {
        engine.submit(GenerateRequest { prompt: Prompt::Text(prompt.clone()), params, adapter: None })?.collect_blocking()
    };
    let full = run(greedy(40))?;
    assert_eq!(full.text, info.tokenizer.decode(&full.tokens, true)?);
    // A stop sequence taken from the middle of the greedy text cuts it there.
    let chars: Vec<char> = full.text.chars().collect();
    anyhow::ensure!(chars.len() > 12, "greedy text too short: {:?}", full.text);
    let stop: String = chars[8..11].iter().collect();
    let cut = run(SamplingParams { stop: vec![stop.clone()], ..greedy(40) })?;
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    let at = full.text.find(&stop).ok_or_else(|| anyhow::anyhow!("stop not in text"))?;
    assert_eq!(cut.text, full.text[..at]);
    assert!(!cut.text.contains(&stop));
    // Same seed, same sample; another seed, another sample.
    let sampled = |seed| run(SamplingParams { temperature: 1.0, seed: Some(seed), ..greedy(30) }).map(|c| c.tokens);
    assert_eq!(sampled(5)?, sampled(5)?);
    assert_ne!(sampled(5)?, sampled(6)?);
    Ok(())
}

#[test]
fn limits_cancellation_and_overload() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, _) = tiny_engine(dir.path(), 1, 2)?;
    let too_long = vec![5u32; 1100];
    match engine.submit(GenerateRequest { prompt: Prompt::Tokens(too_long), params: greedy(1), adapter: None }) {
        Err(EngineError::ContextLength { prompt: 1100, limit: 1024, .. }) => {}
        other => anyhow::bail!("expected a context length error, got {:?}", other.err()),
    }
    let mut accepted = Vec::new();
    let mut overloaded = 0;
    for _ in 0..8 {
        match engine.submit(GenerateRequest { prompt: Prompt::Tokens(vec![1, 2, 3]), params: greedy(900), adapter: None }) {
            Ok(s) => accepted.push(s),
            Err(EngineError::Overloaded { .. }) => overloaded += 1,
            Err(e) => return Err(e.into()),
        }
    }
    assert!(overloaded >= 5 && accepted.len() <= 3, "accepted {} overloaded {overloaded}", accepted.len());
    // Dropping the streams cancels them: the engine becomes idle long before 900 tokens x 3.
    drop(accepted);
    let t = std::time::Instant::now();
    while engine.stats().running + engine.stats().queued > 0 {
        anyhow::ensure!(t.elapsed().as_secs() < 10, "cancelled requests still running");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(engine.stats().kv_cache_bytes, 0);
    Ok(())
}

/// Replacing an alias while a sequence runs on it: the sequence finishes on the old
/// weights, new requests get the new ones, and the old generation is freed afterwards.
#[test]
fn registry_swap_during_generation() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, _) = tiny_engine(dir.path(), 8, 64)?;
    let shape = engine.info()?.shape.clone();
    testing::write_random_adapter(&dir.path().join("v1"), &shape, 4, 1)?;
    testing::write_random_adapter(&dir.path().join("v2"), &shape, 4, 2)?;
    let reg = engine.registry().clone();
    let g1 = reg.load("x", &dir.path().join("v1"), LoadOptions::default())?;
    assert_eq!(g1.active_leases, 0, "a fresh generation has no requests yet");
    let run = |lease, n| {
        engine.submit(GenerateRequest { prompt: Prompt::Tokens(vec![3, 4, 5]), params: greedy(n), adapter: lease })
    };
    let solo_v1 = run(reg.lease("x"), 600)?.collect_blocking()?.tokens;
    let mut long = run(reg.lease("x"), 600)?;
    let first = long.next_blocking();
    assert!(matches!(first, Some(StreamEvent::Token { .. })));
    // Compare-and-swap with a stale generation is refused; with the right one it swaps.
    assert!(reg.load("x", &dir.path().join("v2"), LoadOptions { replace: true, expected_generation: Some(g1.generation + 100) }).is_err());
    let g2 = reg.load("x", &dir.path().join("v2"), LoadOptions { replace: true, expected_generation: Some(g1.generation) })?;
    assert!(g2.generation > g1.generation);
    let retired = reg.retired();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].generation, g1.generation);
    assert_eq!(retired[0].active_leases, 1, "the running request still holds generation 1");
    let solo_v2 = run(reg.lease("x"), 600)?.collect_blocking()?.tokens;
    assert_ne!(solo_v1, solo_v2);
    let mut tokens = match first {
        Some(StreamEvent::Token { token_id, .. }) => vec![token_id],
        _ => vec![],
    };
    while let Some(ev) = long.next_blocking() {
        if let StreamEvent::Token { token_id, .. } = ev {
            tokens.push(token_id);
        }
    }
    assert_eq!(tokens, solo_v1, "the running request switched weights mid-generation");
    assert!(reg.retired().is_empty(), "generation 1 was not freed after its last request");
    assert_eq!(reg.list()[0].generation, g2.generation);
    Ok(())
}
