//! Engine tests on tiny random models written by the tests themselves. Every numeric check
//! is against `testing::reference_logits`, a plain f32 re-implementation.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul};

use super::gguf::GgufFile;
use super::hf::SafetensorsDir;
use super::lora::BatchLora;
use super::model::{KvCache, Model, SeqBatch};
use crate::testing::{self, reference_greedy, reference_logits, TinySpec, TinyWeights};
use super::*;

type R = anyhow::Result<()>;

pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub(crate) fn load_gguf(path: &Path) -> anyhow::Result<Model> {
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

/// Gemma 3 (q/k norms, sandwich norms, GELU gating, scaled embeddings, local layers with a
/// sliding window and their own RoPE base beside a global one) against the reference: a
/// prompt shorter than the window, one longer (per-row attention over a window's tail), one
/// through the blocked prefill products, then decode steps past the window; f32 and f16
/// caches.
#[test]
fn gemma3_gguf_matches_reference() -> R {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec::gemma(300);
    let w = TinyWeights::random(&spec, 3);
    let p = dir.path().join("g.gguf");
    w.write_gguf(&p, GgmlDType::F32, None)?;
    let mut m = load_gguf(&p)?;
    assert!(!m.rope_interleaved());
    assert_eq!(m.shape.architecture, "gemma3");
    assert_eq!((m.cfg.layer_window(0), m.cfg.layer_window(5)), (Some(5), None));
    let long: Vec<u32> = (0..40).map(|i| (i * 37 % 290) as u32 + 5).collect();
    for prompt in [&[5u32, 17, 250][..], &[5, 17, 250, 3, 99, 42, 7, 8, 9], &long] {
        check_against_reference(&m, &w, prompt, 1e-3)?;
    }
    m.kv_type = super::model::KvType::F16;
    check_against_reference(&m, &w, &long, 1e-2)
}

/// Sliding-window layers keep a window and a chunk of rows, not the whole sequence: a long
/// decode drops rows several times (moving the rest to the front) and every step's logits
/// still match the reference; the global layer keeps everything; the cache cannot be cut back
/// to a prefix whose window rows are gone (rewind says so), and a copy at its end continues
/// exactly.
#[test]
fn window_layers_drop_old_rows_and_still_match_reference() -> R {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec::gemma(300);
    let w = TinyWeights::random(&spec, 5);
    let p = dir.path().join("g.gguf");
    w.write_gguf(&p, GgmlDType::F32, None)?;
    let m = load_gguf(&p)?;
    let window = m.cfg.layer_window(0).ok_or_else(|| anyhow::anyhow!("no window"))?;
    let global = (0..m.shape.num_layers).find(|&li| m.cfg.layer_window(li).is_none()).ok_or_else(|| anyhow::anyhow!("no global layer"))?;
    let prompt: Vec<u32> = (0..20).map(|i| (i * 37 % 290) as u32 + 5).collect();
    let mut cache = KvCache::new(m.shape.num_layers);
    let mut toks = prompt.clone();
    let mut feed = prompt.clone();
    let mut most_rows = 0;
    for step in 0..330 {
        let bl = BatchLora::new(&[(feed.len(), None)])?;
        let row = m.forward(&mut [SeqBatch { tokens: &feed, cache: &mut cache }], &bl)?.to_vec2::<f32>()?.remove(0);
        most_rows = most_rows.max(cache.len() - cache.first(0));
        if step % 47 == 0 || step == 329 {
            let r = reference_logits(&w, &toks)?;
            let d = max_diff(&row, r.last().ok_or_else(|| anyhow::anyhow!("no logits"))?);
            anyhow::ensure!(d < 1e-3, "logits differ by {d} at length {}", toks.len());
        }
        // Greedy, but never stuck on one token (varied keys make a dropped or misplaced row
        // show).
        let id = (sampling::argmax(&row) as u32 + step as u32 % 7) % 300;
        toks.push(id);
        feed = vec![id];
    }
    let len = cache.len();
    assert_eq!(len, 20 + 329);
    assert!(cache.first(0) + window <= len + 1, "rows the next step needs are gone");
    assert!(cache.first(0) > 200, "the local layer dropped old rows (first row at {})", cache.first(0));
    assert_eq!(cache.first(global), 0, "a global layer keeps every row");
    assert!(most_rows <= window + 128 + 1, "a local layer held {most_rows} rows");
    assert!(!cache.holds_prefix(20) && cache.holds_prefix(len) && cache.holds_prefix(len - 3));
    assert_eq!(cache.min_prefix(), cache.first(0) + window - 1);

    // A copy at the end continues like the original.
    let mut copy = KvCache::new(m.shape.num_layers);
    assert!(copy.copy_prefix(&cache, len));
    assert!(!KvCache::new(m.shape.num_layers).copy_prefix(&cache, 20), "a prefix whose rows are gone is not copied");
    let next = [7u32];
    let a = m.forward(&mut [SeqBatch { tokens: &next, cache: &mut cache }], &BatchLora::new(&[(1, None)])?)?.to_vec2::<f32>()?.remove(0);
    let b = m.forward(&mut [SeqBatch { tokens: &next, cache: &mut copy }], &BatchLora::new(&[(1, None)])?)?.to_vec2::<f32>()?.remove(0);
    assert_eq!(a, b);
    assert!(copy.bytes() < cache.bytes(), "the copy takes only the window's rows");

    // Cut back within the window: kept; to a prefix whose rows are gone: nothing kept, and
    // the prompt runs again from position 0 to the reference's logits.
    assert_eq!(cache.rewind(len - 2), len - 2);
    assert_eq!(cache.rewind(20), 0);
    let bl = BatchLora::new(&[(prompt.len(), None)])?;
    let row = m.forward(&mut [SeqBatch { tokens: &prompt, cache: &mut cache }], &bl)?.to_vec2::<f32>()?.remove(0);
    let r = reference_logits(&w, &prompt)?;
    anyhow::ensure!(max_diff(&row, r.last().ok_or_else(|| anyhow::anyhow!("no logits"))?) < 1e-3);
    Ok(())
}

/// The f16 KV cache (serving's default) against the f32 reference: logits within 1e-2 (f32
/// cache: 1e-3) and the same greedy tokens, after a short prompt (per-row attention) and after
/// a long one (the blocked prefill products, which widen the cached halves).
#[test]
fn f16_kv_cache_stays_close_to_f32() -> R {
    let dir = tempfile::tempdir()?;
    let w = TinyWeights::random(&TinySpec::llama(300), 1);
    let p = dir.path().join("m.gguf");
    w.write_gguf(&p, GgmlDType::F32, None)?;
    let mut m = load_gguf(&p)?;
    m.kv_type = super::model::KvType::F16;
    check_against_reference(&m, &w, &[5, 17, 250, 3, 99, 42, 7, 8, 9], 1e-2)?;
    let long: Vec<u32> = (0..80).map(|i| (i * 37 % 290) as u32 + 5).collect();
    check_against_reference(&m, &w, &long, 1e-2)?;
    let mut cache = KvCache::new(m.shape.num_layers);
    let bl = BatchLora::new(&[(long.len(), None)])?;
    m.forward(&mut [SeqBatch { tokens: &long, cache: &mut cache }], &bl)?;
    assert_eq!(cache.kv_type(), super::model::KvType::F16);
    assert_eq!(cache.bytes(), 2 * m.shape.num_layers * long.len() * m.shape.num_kv_heads * m.shape.head_dim * 2);
    Ok(())
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
        (GgmlDType::Q5K, 0.98),
        (GgmlDType::Q4K, 0.95),
        (GgmlDType::Q5_1, 0.98),
        (GgmlDType::Q5_0, 0.98),
        (GgmlDType::Q4_1, 0.95),
        (GgmlDType::Q4_0, 0.95),
    ] {
        let p = dir.path().join(format!("{dt:?}.gguf"));
        w.write_gguf(&p, dt, None)?;
        let m = load_gguf(&p)?;
        // Block types the kernels read stay as the file has them (no re-quantization).
        if let QMatMul::QTensor(q) = &m.layers[0].mlp.down_proj.weight {
            anyhow::ensure!(q.dtype() == dt, "{dt:?} loaded as {:?}", q.dtype());
        } else {
            anyhow::ensure!(dt == GgmlDType::F16, "{dt:?} loaded dense");
        }
        let got = run_steps(&m, &prompt, 0, None)?.remove(0);
        let dot: f32 = got.iter().zip(reference).map(|(a, b)| a * b).sum();
        let na: f32 = got.iter().map(|a| a * a).sum::<f32>().sqrt();
        let nb: f32 = reference.iter().map(|a| a * a).sum::<f32>().sqrt();
        let cos = dot / (na * nb);
        anyhow::ensure!(cos > min_cos, "{dt:?}: cosine {cos} to the f32 reference");
    }
    Ok(())
}

// ---- Whole-engine tests (thread, batching, tokenizer) ----

pub(crate) fn tiny_engine(dir: &Path, max_batch: usize, max_queue: usize) -> anyhow::Result<(Engine, TinyWeights)> {
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
        kv_type: EngineConfig::default().kv_type,
    })?;
    Ok((engine, w))
}

pub(crate) fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, stop_at_eos: false, ..Default::default() }
}

#[test]
fn concurrent_requests_each_match_reference() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, w) = tiny_engine(dir.path(), 8, 64)?;
    let prompts: Vec<Vec<u32>> = vec![vec![10, 11, 12], vec![40, 41, 42, 43, 44, 45, 46], vec![100], vec![7, 200, 7]];
    let streams = prompts
        .iter()
        .map(|p| engine.submit(GenerateRequest::new(Prompt::Tokens(p.clone()), greedy(12))))
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
        Ok(engine.submit(GenerateRequest::new(Prompt::Tokens(p.clone()), greedy(6)))?.collect_blocking()?)
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
fn identical_prompts_in_flight_prefill_once() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, w) = tiny_engine(dir.path(), 8, 64)?;
    let a: Vec<u32> = (0..60).map(|i| (i * 31 % 240 + 5) as u32).collect();
    let b: Vec<u32> = (0..20).map(|i| (i * 7 % 200 + 9) as u32).collect();
    // Three choices of one prompt and another prompt, submitted together (as `n` = 3 is).
    let prompts = [&a, &a, &a, &b];
    let streams = prompts
        .iter()
        .map(|p| engine.submit(GenerateRequest::new(Prompt::Tokens(p.to_vec()), greedy(5))))
        .collect::<Result<Vec<_>>>()?;
    let done = streams.into_iter().map(GenerationStream::collect_blocking).collect::<Result<Vec<_>>>()?;
    let want = reference_greedy(&w, &a, 5)?;
    for c in &done[..3] {
        assert_eq!(c.tokens, want, "a twin's copied keys and values give the reference's tokens");
        assert_eq!(c.usage.prompt_tokens, a.len());
    }
    let mut cached: Vec<usize> = done[..3].iter().map(|c| c.usage.cached_tokens).collect();
    cached.sort_unstable();
    assert_eq!(cached, [0, a.len() - 1, a.len() - 1], "one choice prefills, the others copy");
    assert_eq!(done[3].usage.cached_tokens, 0);
    assert_eq!(done[3].tokens, reference_greedy(&w, &b, 5)?);

    // The prefilling twin cancelled: the waiting one prefills on its own.
    let c: Vec<u32> = (0..50).map(|i| (i * 13 % 230 + 4) as u32).collect();
    let first = engine.submit(GenerateRequest::new(Prompt::Tokens(c.clone()), greedy(5)))?;
    let second = engine.submit(GenerateRequest::new(Prompt::Tokens(c.clone()), greedy(5)))?;
    drop(first);
    let got = second.collect_blocking()?;
    assert_eq!(got.tokens, reference_greedy(&w, &c, 5)?);
    Ok(())
}

#[test]
fn text_prompt_stop_sequences_and_seeds() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, _) = tiny_engine(dir.path(), 4, 16)?;
    let info = engine.info()?;
    let prompt = info.render_chat(&[ChatMessage::new("user", "hello there")])?;
    let run = |params: SamplingParams| {
        engine.submit(GenerateRequest::new(Prompt::Text(prompt.clone()), params))?.collect_blocking()
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
    match engine.submit(GenerateRequest::new(Prompt::Tokens(too_long), greedy(1))) {
        Err(EngineError::ContextLength { prompt: 1100, limit: 1024, .. }) => {}
        other => anyhow::bail!("expected a context length error, got {:?}", other.err()),
    }
    let mut accepted = Vec::new();
    let mut overloaded = 0;
    for _ in 0..8 {
        match engine.submit(GenerateRequest::new(Prompt::Tokens(vec![1, 2, 3]), greedy(900))) {
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

/// Sequences with a grammar in a batch with one without: theirs follow the schema (a random
/// model, so only the grammar makes the output valid) and end by themselves, the other is
/// unchanged; a schema the grammar engine refuses is an invalid request naming what.
#[test]
fn constrained_sequences_follow_their_schema_in_a_mixed_batch() -> R {
    use super::grammar::GrammarSpec;
    let dir = tempfile::tempdir()?;
    let (engine, w) = tiny_engine(dir.path(), 8, 64)?;
    let grammars = engine.info()?.grammars()?;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"label": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["label", "n"],
        "additionalProperties": false
    });
    let prompt = || Prompt::Tokens(vec![3, 4, 5]);
    let plain = engine.submit(GenerateRequest::new(prompt(), greedy(12)))?;
    let mut constrained = Vec::new();
    for (i, spec) in [GrammarSpec::JsonSchema(schema.clone()), GrammarSpec::JsonSchema(schema), GrammarSpec::JsonObject].iter().enumerate() {
        let params = SamplingParams { max_tokens: 64, temperature: if i == 1 { 1.0 } else { 0.0 }, seed: Some(7), ..Default::default() };
        let req = GenerateRequest { constraint: Some(grammars.compile(spec)?), ..GenerateRequest::new(prompt(), params) };
        constrained.push(engine.submit(req)?);
    }
    assert_eq!(plain.collect_blocking()?.tokens, reference_greedy(&w, &[3, 4, 5], 12)?);
    for (i, s) in constrained.into_iter().enumerate() {
        let c = s.collect_blocking()?;
        if i == 2 && c.finish_reason == FinishReason::Length {
            continue; // any JSON object may run past 64 tokens on a random model
        }
        assert_eq!(c.finish_reason, FinishReason::Stop, "choice {i}: {:?}", c.text);
        let v: serde_json::Value = serde_json::from_str(&c.text).map_err(|e| anyhow::anyhow!("choice {i}: {e}: {:?}", c.text))?;
        assert!(v.is_object(), "{v}");
        if i < 2 {
            assert!(matches!(v["label"].as_str(), Some("yes" | "no")), "{v}");
            assert!(v["n"].as_u64().is_some_and(|n| n <= 9), "{v}");
            assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
        }
    }
    let refused = grammars.compile(&GrammarSpec::JsonSchema(serde_json::json!({"type": "object", "$ref": "#/nowhere"})));
    match refused {
        Err(EngineError::InvalidRequest(m)) => assert!(m.contains("not supported"), "{m}"),
        other => anyhow::bail!("a broken schema compiled: {other:?}"),
    }
    Ok(())
}

#[test]
fn a_lazy_grammar_engages_at_its_trigger() -> R {
    use super::grammar::GrammarSpec;
    let dir = tempfile::tempdir()?;
    let (engine, _) = tiny_engine(dir.path(), 4, 16)?;
    let info = engine.info()?;
    let grammars = info.grammars()?;
    let schema = serde_json::json!({"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]});
    let spec = GrammarSpec::Lazy { trigger: "<tool_call>".into(), schema: schema.clone(), repeat: None };
    let vocab = info.shape.vocab_size;
    let allowed = |c: &mut super::grammar::Constraint| -> anyhow::Result<usize> {
        let mut logits = vec![0f32; vocab];
        c.mask(&mut logits)?;
        Ok(logits.iter().filter(|l| l.is_finite()).count())
    };
    let feed = |c: &mut super::grammar::Constraint, text: &str| -> anyhow::Result<()> {
        for id in info.tokenizer.encode_plain(text)? {
            c.commit(id)?;
        }
        Ok(())
    };
    // Free text, the trigger split over tokens, then a call: masks only after the trigger.
    let mut c = grammars.compile(&spec)?;
    feed(&mut c, "Let me check. <tool")?;
    assert_eq!(allowed(&mut c)?, vocab, "free before the trigger");
    assert!(!c.is_complete());
    feed(&mut c, "_call>")?;
    assert!(allowed(&mut c)? < vocab / 2, "the grammar engages after the trigger");
    // A newline may come before the call (the tool prompt writes one), not after its start.
    let newline = info.tokenizer.encode_plain("\n")?;
    let mut logits = vec![0f32; vocab];
    c.mask(&mut logits)?;
    assert!(newline.iter().all(|&t| logits[t as usize].is_finite()));
    feed(&mut c, "\n")?;
    feed(&mut c, "{\"on\":true}")?;
    assert!(c.is_complete(), "a whole call completes it");
    // An unfinished trigger does not engage it.
    let mut c = grammars.compile(&spec)?;
    feed(&mut c, "see <tool_cal")?;
    assert_eq!(allowed(&mut c)?, vocab);
    assert!(!c.is_complete());
    // Parallel calls: after a call only its closing tag, then the end or another call.
    let repeat = super::grammar::Repeat { close: "\n</tool_call>".into(), separator: "\n</tool_call>\n<tool_call>\n".into() };
    let spec = GrammarSpec::Lazy { trigger: "<tool_call>".into(), schema, repeat: Some(repeat) };
    let mut c = grammars.compile(&spec)?;
    feed(&mut c, "<tool_call>\n{\"on\":true}")?;
    assert!(!c.is_complete(), "more may follow a call");
    assert!(allowed(&mut c)? < 4, "only the closing tag may follow a call");
    feed(&mut c, "\n</tool_call>\n<tool_call>\n{\"on\":false}\n</tool_call>")?;
    let eos = info.tokenizer.eos_token_ids();
    let mut logits = vec![0f32; vocab];
    c.mask(&mut logits)?;
    assert!(eos.iter().any(|&t| logits[t as usize].is_finite()), "the end may follow a closed call");
    assert!(allowed(&mut c)? < 8, "only the end or another call");
    Ok(())
}
