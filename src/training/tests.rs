//! Trainer tests on the tiny random model: train/serve agreement, a finite-difference
//! gradient check, a distillation task learned without its instruction, PEFT round trip,
//! exact resume from a checkpoint.

use std::sync::atomic::AtomicBool;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;

use super::dataset::{self, DatasetOptions, Example};
use super::export::{self, AdapterMeta};
use super::trainer::{self, AdamW, LoraParams, Resume, TrainConfig, TrainRun};
use crate::adapters::{lora_handle, peft, AdapterLimits, AdapterRegistry};
use crate::engine::gguf::GgufFile;
use crate::engine::lora::BatchLora;
use crate::engine::model::{KvCache, Model, SeqBatch};
use crate::testing::{TinySpec, TinyWeights};
use crate::engine::tokenizer::tiny_gguf_vocab;
use crate::engine::{ChatMessage, Engine, EngineConfig, GenerateRequest, Prompt, SamplingParams};

type R = anyhow::Result<()>;

fn tiny_model(dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, Model)> {
    tiny_model_of(dir, TinySpec::llama(tiny_gguf_vocab().tokens.len()))
}

/// The tiny model of `spec` (the tiny vocabulary's size), written and loaded.
fn tiny_model_of(dir: &std::path::Path, spec: TinySpec) -> anyhow::Result<(std::path::PathBuf, Model)> {
    let vocab = tiny_gguf_vocab();
    let w = TinyWeights::random(&spec, 7);
    let p = dir.join("tiny.gguf");
    w.write_gguf(&p, GgmlDType::F32, Some(&vocab))?;
    let mut f = GgufFile::open(&p)?;
    let cfg = f.config()?;
    let interleaved = f.rope_interleaved();
    let arch = f.architecture.clone();
    let m = Model::new(cfg, &mut f, &arch, "tiny", interleaved)?;
    Ok((p, m))
}

/// The tiny Llama and the tiny Gemma 3 (whose local layers' window is shorter than the
/// test sequences).
fn both_families() -> [TinySpec; 2] {
    let n = tiny_gguf_vocab().tokens.len();
    [TinySpec::llama(n), TinySpec::gemma(n)]
}

/// Gives every B a random value (a fresh adapter's B is zero) and rounds A and B to f16
/// values: serving reads adapters in f16, so train/serve comparisons then see the same
/// weights and test the arithmetic alone.
fn randomize_b_f16_exact(params: &LoraParams) -> anyhow::Result<()> {
    let f16_exact = |t: &Tensor| t.to_dtype(candle_core::DType::F16)?.to_dtype(candle_core::DType::F32);
    for (a, b) in params.pairs.values() {
        a.set(&f16_exact(a.as_tensor())?)?;
        b.set(&f16_exact(&Tensor::randn(0f32, 0.3, b.shape(), b.device())?)?)?;
    }
    Ok(())
}

/// The tiny model, an engine serving it (for adapters in tests) and its tokenizer/template.
fn tiny_engine(dir: &std::path::Path) -> anyhow::Result<(Model, Engine, std::sync::Arc<crate::engine::ModelInfo>)> {
    let (path, m) = tiny_model(dir)?;
    let engine = Engine::start(EngineConfig { model_path: path, model_name: "tiny".into(), context_length: 1024, threads: 1, ..Default::default() })?;
    let info = engine.info()?;
    Ok((m, engine, info))
}

fn small_cfg() -> TrainConfig {
    TrainConfig { rank: 4, alpha: 8.0, ..Default::default() }
}

#[test]
fn train_and_serve_paths_give_the_same_logits() -> R {
    for spec in both_families() {
        let dir = tempfile::tempdir()?;
        let (_, m) = tiny_model_of(dir.path(), spec)?;
        let dense = m.to_dense()?;
        let params = LoraParams::init(&m.shape, &small_cfg())?;
        randomize_b_f16_exact(&params)?;
        let weights = params.weights(m.shape.num_layers)?;
        let toks: Vec<u32> = vec![1, 50, 60, 70, 80, 90, 2, 100];
        let lora = BatchLora::new(&[(toks.len(), Some(&weights))])?;
        let train = dense.forward_train(&[&toks], &lora, None)?.to_vec2::<f32>()?;
        let mut cache = KvCache::new(m.shape.num_layers);
        let serve = m.forward(&mut [SeqBatch { tokens: &toks, cache: &mut cache }], &lora)?.to_vec2::<f32>()?;
        let last = &train[toks.len() - 1];
        let d = last.iter().zip(&serve[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        anyhow::ensure!(d < 1e-4, "{}: train and serve logits differ by {d}", m.shape.architecture);
    }
    Ok(())
}

/// Sequences of different lengths share one padded attention grid in training; each must
/// get exactly the logits it gets alone.
#[test]
fn ragged_training_batch_matches_sequences_alone() -> R {
    let dir = tempfile::tempdir()?;
    let (_, m) = tiny_model(dir.path())?;
    let dense = m.to_dense()?;
    let params = LoraParams::init(&m.shape, &small_cfg())?;
    randomize_b_f16_exact(&params)?;
    let weights = params.weights(m.shape.num_layers)?;
    let seqs: [&[u32]; 3] = [&[1, 50, 60, 70, 80], &[1, 90, 2, 100, 40, 41, 42, 43], &[1, 7]];
    let lens: Vec<_> = seqs.iter().map(|s| (s.len(), Some(&weights))).collect();
    let together = dense.forward_train(&seqs, &BatchLora::new(&lens)?, None)?.to_vec2::<f32>()?;
    let mut alone = Vec::new();
    for s in seqs {
        alone.extend(dense.forward_train(&[s], &BatchLora::new(&[(s.len(), Some(&weights))])?, None)?.to_vec2::<f32>()?);
    }
    anyhow::ensure!(together.len() == alone.len());
    let d = together.iter().flatten().zip(alone.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    anyhow::ensure!(d < 1e-4, "batched and single-sequence logits differ by {d}");
    Ok(())
}

#[test]
fn lora_gradients_match_finite_differences() -> R {
    for spec in both_families() {
        let dir = tempfile::tempdir()?;
        let (_, m) = tiny_model_of(dir.path(), spec)?;
        gradients_match_finite_differences(&m)?;
    }
    Ok(())
}

fn gradients_match_finite_differences(m: &Model) -> R {
    let dense = m.to_dense()?;
    let cfg = TrainConfig { target_modules: vec!["q_proj".into(), "down_proj".into()], ..small_cfg() };
    let params = LoraParams::init(&m.shape, &cfg)?;
    for (_, b) in params.pairs.values() {
        b.set(&Tensor::randn(0f32, 0.2, b.shape(), b.device())?)?;
    }
    let seq = dataset::Sequence {
        tokens: vec![1, 20, 30, 40, 50, 60, 70, 80],
        loss_mask: vec![false, false, false, true, true, true, true, true],
        prompt_len: 3,
    };
    let loss_of = |p: &LoraParams| -> anyhow::Result<(Tensor, f64)> {
        let w = p.weights(m.shape.num_layers)?;
        let lora = BatchLora::new(&[(seq.tokens.len(), Some(&w))])?;
        let (loss, _) = trainer::batch_loss(&dense, &lora, &[&seq])?;
        let v = loss.to_scalar::<f32>()? as f64;
        Ok((loss, v))
    };
    let (loss, _) = loss_of(&params)?;
    let grads = loss.backward()?;
    let mut checked = 0;
    for (&(layer, proj), (a, b)) in &params.pairs {
        for (var, name) in [(a, "A"), (b, "B")] {
            let g = grads.get(var.as_tensor()).ok_or_else(|| anyhow::anyhow!("no grad"))?.flatten_all()?.to_vec1::<f32>()?;
            let base = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            // The largest-gradient element: a check that cannot pass by being all zeros.
            let i = (0..g.len()).max_by(|&x, &y| g[x].abs().total_cmp(&g[y].abs())).unwrap_or(0);
            let eps = 1e-2f32;
            let mut num = [0f64; 2];
            for (k, sign) in [1f32, -1f32].iter().enumerate() {
                let mut v = base.clone();
                v[i] += sign * eps;
                var.set(&Tensor::from_vec(v, var.shape(), var.device())?)?;
                num[k] = loss_of(&params)?.1;
            }
            var.set(&Tensor::from_vec(base, var.shape(), var.device())?)?;
            let fd = (num[0] - num[1]) / (2.0 * eps as f64);
            let ad = g[i] as f64;
            anyhow::ensure!(ad.abs() > 1e-5, "layer {layer} {proj:?} {name}: zero gradient");
            let rel = (fd - ad).abs() / ad.abs().max(1e-6);
            anyhow::ensure!(rel < 0.05, "{} layer {layer} {proj:?} {name}: autograd {ad} vs finite difference {fd}", m.shape.architecture);
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 2 * m.shape.num_layers);
    Ok(())
}

/// The training path as jobs run it (`Model::for_training`: int8 products of the
/// repacked quantized weights, forward and input gradient) against the f32 reference path
/// on the same Q8_0 weights: same loss to within the activation rounding, and every LoRA
/// gradient pointing the same way (cosine ≥ 0.99).
#[test]
fn int8_training_path_follows_the_f32_gradients() -> R {
    for spec in both_families() {
        let dir = tempfile::tempdir()?;
        let vocab = tiny_gguf_vocab();
        let p = dir.path().join("tiny-q8.gguf");
        TinyWeights::random(&spec, 7).write_gguf(&p, GgmlDType::Q8_0, Some(&vocab))?;
        let mut f = GgufFile::open(&p)?;
        let (cfg, interleaved, arch) = (f.config()?, f.rope_interleaved(), f.architecture.clone());
        let m = Model::new(cfg, &mut f, &arch, "tiny", interleaved)?;
        let (fast, reference) = (m.for_training()?, m.to_dense()?);
        if crate::engine::kernels::panel::fast() {
            anyhow::ensure!(fast.layers[0].self_attn.q_proj.frozen.is_some(), "the quantized projections were not repacked");
        }
        let params = LoraParams::init(&m.shape, &small_cfg())?;
        randomize_b_f16_exact(&params)?;
        let w = params.weights(m.shape.num_layers)?;
        let seqs: Vec<dataset::Sequence> = [&[1u32, 20, 30, 40, 50, 60, 70, 80, 90, 11][..], &[1, 7, 9, 33, 35, 2]]
            .iter()
            .map(|t| dataset::Sequence { tokens: t.to_vec(), loss_mask: (0..t.len()).map(|i| i >= 2).collect(), prompt_len: 2 })
            .collect();
        let refs: Vec<&dataset::Sequence> = seqs.iter().collect();
        let lens: Vec<_> = seqs.iter().map(|s| (s.tokens.len(), Some(&w))).collect();
        let lora = BatchLora::new(&lens)?;
        let (la, _) = trainer::batch_loss(&fast, &lora, &refs)?;
        let (lb, _) = trainer::batch_loss(&reference, &lora, &refs)?;
        let (va, vb) = (la.to_scalar::<f32>()?, lb.to_scalar::<f32>()?);
        anyhow::ensure!((va - vb).abs() < 0.01 * vb.abs(), "{arch}: loss {va} vs {vb}");
        let (ga, gb) = (la.backward()?, lb.backward()?);
        for (&(layer, proj), (a, b)) in &params.pairs {
            for (var, name) in [(a, "A"), (b, "B")] {
                let (Some(x), Some(y)) = (ga.get(var.as_tensor()), gb.get(var.as_tensor())) else {
                    anyhow::bail!("{arch} layer {layer} {proj:?} {name}: no gradient");
                };
                let (x, y) = (x.flatten_all()?.to_vec1::<f32>()?, y.flatten_all()?.to_vec1::<f32>()?);
                let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
                let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
                let cos = dot / (norm(&x) * norm(&y)).max(1e-20);
                anyhow::ensure!(cos >= 0.99, "{arch} layer {layer} {proj:?} {name}: gradient cosine {cos}");
            }
        }
    }
    Ok(())
}

const INSTRUCTION: &str = "You are a labelling service. For every word the user sends, answer with its \
category only: animals get 'zoo', colours get 'paint', numbers get 'math'. Never explain, never add words.";

fn task_examples() -> Vec<Example> {
    let items = [
        ("cat", "zoo"), ("dog", "zoo"), ("horse", "zoo"), ("mouse", "zoo"),
        ("red", "paint"), ("blue", "paint"), ("green", "paint"), ("black", "paint"),
        ("one", "math"), ("two", "math"), ("seven", "math"), ("ten", "math"),
    ];
    items
        .iter()
        .map(|(q, a)| Example {
            messages: vec![
                ChatMessage::new("system", INSTRUCTION),
                ChatMessage::new("user", *q),
                ChatMessage::new("assistant", *a),
            ],
        })
        .collect()
}

/// The gate's scoring runs a shared system prompt once (rewinding the cache between
/// examples) and scores answers on the serving path: it must give the training path's loss
/// and each example's own greedy answer.
#[test]
fn eval_score_reuses_the_shared_prompt_and_matches_separate_runs() -> R {
    let dir = tempfile::tempdir()?;
    let (m, _engine, info) = tiny_engine(dir.path())?;
    let dense = m.to_dense()?;
    let params = LoraParams::init(&m.shape, &small_cfg())?;
    randomize_b_f16_exact(&params)?;
    let weights = params.weights(m.shape.num_layers)?;
    let examples = task_examples();
    for lora in [None, Some(&weights)] {
        let got = super::eval::score(&m, &info, &examples, &super::eval::Variant { lora, strip_prompt: None })?;
        let (mut loss, mut tokens, mut em) = (0f64, 0usize, 0f64);
        for (i, ex) in examples.iter().enumerate() {
            let seq = dataset::tokenize(&info, ex)?;
            let bl = BatchLora::new(&[(seq.tokens.len(), lora)])?;
            let (l, n) = trainer::batch_loss(&dense, &bl, &[&seq])?;
            loss += f64::from(l.to_scalar::<f32>()?) * n as f64;
            tokens += n;
            let gold = ex.messages[2].content.trim();
            let max_new = info.tokenizer.encode(gold, false)?.len() + 16;
            let pred = super::eval::greedy(&m, &info, &seq.tokens[..seq.prompt_len], lora, max_new)?;
            // The continuation after the rewound cache is the separate run's, token for token.
            assert_eq!(got.predictions[i], pred.trim(), "example {i}");
            assert!(!pred.trim().is_empty(), "example {i}: an empty answer proves little");
            em += f64::from(u8::from(pred.trim() == gold));
        }
        let want = loss / tokens as f64;
        anyhow::ensure!((got.loss - want).abs() < 1e-3 * want.max(1.0), "eval loss {} vs training path {want}", got.loss);
        assert_eq!(got.exact_match, em / examples.len() as f64);
        assert_eq!(got.examples, examples.len());
    }
    Ok(())
}

/// Trains a distilled adapter on the synthetic task, publishes it in PEFT layout, serves
/// it through the engine without the instruction and gets the targets back.
#[test]
fn distilled_adapter_learns_the_task_and_serves_identically() -> R {
    let dir = tempfile::tempdir()?;
    let (m, engine, info) = tiny_engine(dir.path())?;
    let examples = task_examples();
    let data = dataset::build(&info, &examples, &DatasetOptions { eval_fraction: 0.0, ..Default::default() })?;
    let distilled = data.distilled.clone().ok_or_else(|| anyhow::anyhow!("shared system prompt not detected"))?;
    assert_eq!(distilled.sha256, dataset::prompt_hash(INSTRUCTION));
    assert!(distilled.tokens > 50, "the instruction is {} tokens", distilled.tokens);
    assert_eq!(data.train.len(), 12);
    let with_prompt = dataset::tokenize(&info, &examples[0])?;
    let without = dataset::tokenize(&info, &Example { messages: dataset::strip_system(&examples[0].messages, INSTRUCTION) })?;
    assert_eq!(with_prompt.tokens.len() - without.tokens.len(), distilled.tokens);
    assert!(data.train.contains(&without), "the training set keeps the system prompt");
    let cfg = TrainConfig { rank: 8, alpha: 16.0, learning_rate: 1e-2, epochs: 60, batch_size: 6, micro_batch: 3, warmup_steps: 5, ..Default::default() };
    let dense = m.to_dense()?;
    let params = LoraParams::init(&m.shape, &cfg)?;
    let mut opt = AdamW::new(&params, cfg.weight_decay)?;
    let mut seen = 0;
    let run = TrainRun { model: &dense, params: &params, opt: &mut opt, data: &data.train, cfg: &cfg, resume: None, cancel: &AtomicBool::new(false) };
    let out = trainer::train(run, &mut |p, _, _| {
        seen = p.step;
        Ok(())
    })?;
    assert_eq!(seen, out.steps);
    let first = out.losses[..3].iter().sum::<f32>() / 3.0;
    let last = out.losses[out.losses.len() - 3..].iter().sum::<f32>() / 3.0;
    anyhow::ensure!(last < first * 0.1, "loss went from {first} to {last}");

    let meta = AdapterMeta {
        job_id: None, task: "labels".into(), base_model: "tiny".into(), data_sha256: "x".into(),
        train_examples: 12, eval_examples: 0, distilled_prompt: Some(distilled), eval: None,
        steps: out.steps, final_loss: out.losses.last().copied(), train_seconds: out.seconds,
        hyperparameters: cfg.clone(), owner: None, created_at: 0,
    };
    let published = export::publish(&dir.path().join("adapters"), "labels", "v1", &params, &m.shape, &cfg, &meta)?;
    assert!(published.join("adapter_config.json").exists() && published.join("tunegate.json").exists());
    // Reloaded through the PEFT reader, the adapter gives the trained logits.
    let loaded = peft::load_adapter(&published, &m.shape, &AdapterLimits::default())?;
    let trained = params.weights(m.shape.num_layers)?;
    let toks = data.train[0].tokens.clone();
    let serve = |w| -> anyhow::Result<Vec<f32>> {
        let mut cache = KvCache::new(m.shape.num_layers);
        let lora = BatchLora::new(&[(toks.len(), Some(w))])?;
        Ok(m.forward(&mut [SeqBatch { tokens: &toks, cache: &mut cache }], &lora)?.to_vec2::<f32>()?.remove(0))
    };
    let (a, b) = (serve(&loaded.weights)?, serve(&trained)?);
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    anyhow::ensure!(d < 1e-4, "reloaded adapter differs by {d}");
    // Served by the engine without the instruction, it answers like the instruction said.
    let registry = AdapterRegistry::for_engine(&engine, AdapterLimits::default());
    registry.load("labels", &published, Default::default())?;
    for ex in &examples {
        let prompt = info.render_chat(&ex.messages[1..2])?;
        let params = SamplingParams { max_tokens: 8, ..Default::default() };
        let c = engine
            .submit(GenerateRequest::new(Prompt::Text(prompt), params).with_adapter(registry.lease("labels").as_ref().map(lora_handle)))?
            .collect_blocking()?;
        assert_eq!(c.text, ex.messages[2].content, "input {}", ex.messages[1].content);
    }
    Ok(())
}

/// A job interrupted after a checkpoint and resumed ends with exactly the weights of an
/// uninterrupted run.
#[test]
fn resume_from_checkpoint_is_exact() -> R {
    let dir = tempfile::tempdir()?;
    let (_, m) = tiny_model(dir.path())?;
    let dense = m.to_dense()?;
    let vocab_info = Engine::start(EngineConfig { model_path: dir.path().join("tiny.gguf"), threads: 1, ..Default::default() })?.info()?;
    let data = dataset::build(&vocab_info, &task_examples(), &DatasetOptions { eval_fraction: 0.0, ..Default::default() })?;
    let cfg = TrainConfig { rank: 4, alpha: 8.0, learning_rate: 5e-3, epochs: 4, batch_size: 4, micro_batch: 4, ..Default::default() };
    let run = |stop_at: Option<usize>, resume_dir: Option<&std::path::Path>| -> anyhow::Result<Vec<f32>> {
        let params = LoraParams::init(&m.shape, &cfg)?;
        let mut opt = AdamW::new(&params, cfg.weight_decay)?;
        let mut resume = None;
        if let Some(d) = resume_dir {
            let step = trainer::load_checkpoint(d, &params, &mut opt)?.ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
            resume = Some(Resume { start_step: step });
        }
        let cancel = AtomicBool::new(false);
        let ckpt = dir.path().join("ckpt");
        let run = TrainRun { model: &dense, params: &params, opt: &mut opt, data: &data.train, cfg: &cfg, resume, cancel: &cancel };
        trainer::train(run, &mut |p, params, opt| {
            if Some(p.step) == stop_at {
                trainer::save_checkpoint(&ckpt, params, opt, p.step)?;
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })?;
        let mut all = Vec::new();
        for (a, b) in params.pairs.values() {
            all.extend(a.as_tensor().flatten_all()?.to_vec1::<f32>()?);
            all.extend(b.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(all)
    };
    let straight = run(None, None)?;
    let _interrupted = run(Some(5), None)?;
    let resumed = run(None, Some(&dir.path().join("ckpt")))?;
    let d = straight.iter().zip(&resumed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    anyhow::ensure!(d < 1e-6, "resumed run differs by {d}");
    Ok(())
}

/// A job on the synthetic task passes the gate against the prompted base; a deliberately
/// undertrained candidate fails it against that adapter and says why.
#[test]
fn job_gate_promotes_good_and_refuses_bad_candidates() -> R {
    use super::pipeline::{self, JobError, JobSpec};
    let dir = tempfile::tempdir()?;
    let (path, _) = tiny_model(dir.path())?;
    let examples = task_examples();
    let spec = JobSpec {
        id: "ftjob-1".into(),
        task: "labels".into(),
        model_path: path,
        base_model: "tiny".into(),
        examples: examples.clone(),
        validation: Some(examples.clone()),
        hyper: TrainConfig { rank: 8, alpha: 16.0, learning_rate: 1e-2, epochs: 60, batch_size: 6, micro_batch: 6, checkpoint_every: 20, ..Default::default() },
        dataset: DatasetOptions { eval_fraction: 0.0, ..Default::default() },
        adapters_root: dir.path().join("adapters"),
        job_dir: dir.path().join("jobs/1"),
        current_adapter: None,
        min_margin: 0.0,
        adapter_precision: Default::default(),
        owner: None,
        auto: None,
    };
    let mut events = Vec::new();
    let good = pipeline::run(&spec, &AtomicBool::new(false), &mut |e| events.push(e.message))?;
    assert!(good.gate.passed, "{}", good.gate.reason);
    assert_eq!(good.gate.candidate.exact_match, 1.0);
    assert!(good.gate.candidate.prompt_tokens < good.gate.baseline.prompt_tokens / 2.0);
    assert_eq!(good.version, "v1");
    assert!(good.checkpoints.contains(&20));
    assert!(events.iter().any(|m| m.starts_with("step 1/")), "{events:?}");

    let bad_spec = JobSpec {
        id: "ftjob-2".into(),
        hyper: TrainConfig { max_steps: Some(1), ..spec.hyper.clone() },
        job_dir: dir.path().join("jobs/2"),
        current_adapter: Some(good.adapter_path.clone()),
        ..spec.clone()
    };
    let bad = pipeline::run(&bad_spec, &AtomicBool::new(false), &mut |_| {})?;
    assert!(!bad.gate.passed);
    assert!(bad.gate.reason.contains("worse"), "{}", bad.gate.reason);
    assert_eq!(bad.gate.baseline.exact_match, 1.0, "baseline should be the current adapter");
    assert_eq!(bad.version, "v2");

    // Shuffled labels (each item takes the answer two places on: half stay right by chance):
    // the candidate learns them and beats the prompted base, but not the constant answer.
    let shuffled: Vec<Example> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            let other = &examples[(i + 2) % examples.len()];
            if let (Some(m), Some(o)) = (e.messages.last_mut(), other.messages.last()) {
                m.content = o.content.clone();
            }
            e
        })
        .collect();
    let shuffled_spec = JobSpec {
        id: "ftjob-4".into(),
        task: "shuffled".into(),
        examples: shuffled,
        job_dir: dir.path().join("jobs/4"),
        ..spec.clone()
    };
    let useless = pipeline::run(&shuffled_spec, &AtomicBool::new(false), &mut |_| {})?;
    assert!(!useless.gate.passed && useless.gate.reason.contains("most frequent"), "{}", useless.gate.reason);
    assert!(useless.gate.candidate.exact_match >= useless.gate.baseline.exact_match, "{:?}", useless.gate);

    let cancelled = pipeline::run(&JobSpec { job_dir: dir.path().join("jobs/3"), ..spec }, &AtomicBool::new(true), &mut |_| {});
    assert!(matches!(cancelled, Err(JobError::Cancelled)));
    Ok(())
}

/// Files + jobs as the API drives them: upload, create, run to success, the fine-tuned
/// name serves at once and the task alias is promoted; a job interrupted by a shutdown is
/// picked up by the next manager.
#[test]
fn job_manager_runs_jobs_and_resumes_after_restart() -> R {
    use super::auto::AutoRule;
    use super::files::FileStore;
    use super::jobs::{CreateJob, JobManager, JobStatus, JobsConfig};
    use std::sync::Arc;
    let dir = tempfile::tempdir()?;
    let (path, _) = tiny_model(dir.path())?;
    let engine = Engine::start(EngineConfig { model_path: path.clone(), model_name: "tiny".into(), threads: 1, ..Default::default() })?;
    let registry = AdapterRegistry::for_engine(&engine, AdapterLimits::default());
    let mut jsonl = String::new();
    for e in task_examples() {
        jsonl.push_str(&serde_json::to_string(&serde_json::json!({ "messages": e.messages }))?);
        jsonl.push('\n');
    }
    let cfg = || JobsConfig {
        data_dir: dir.path().join("data"),
        model_path: path.clone(),
        base_model: "tiny".into(),
        adapters_root: dir.path().join("adapters"),
        defaults: TrainConfig { rank: 8, alpha: 16.0, learning_rate: 1e-2, epochs: 40, batch_size: 6, micro_batch: 6, checkpoint_every: 10, ..Default::default() },
        eval_fraction: 0.0,
        min_margin: 0.0,
        distill_system_prompt: true,
        metrics: None,
        max_active_per_tenant: 4,
        // The defaults above as the rule's knobs: 40 epochs, batches of 6, learning rate x1.
        auto: AutoRule { max_batch: 6, learning_rate_multiplier: 1.0, ..AutoRule::default() },
        fixed_epochs: Some(40),
        min_examples_for_holdout: 0,
        scheduler_min_eval: 0,
        threads: 2,
    };
    let files = Arc::new(FileStore::open(&dir.path().join("data"))?);
    let file = files.create("labels.jsonl", "fine-tune", jsonl.as_bytes())?;
    let a = JobManager::start(cfg(), files.clone(), registry.clone(), None)?;
    let bad = a.create(CreateJob { model: "other".into(), training_file: Some(file.id.clone()), ..Default::default() });
    assert!(bad.is_err());
    let job = a.create(CreateJob {
        model: "tiny".into(),
        training_file: Some(file.id.clone()),
        validation_file: Some(file.id.clone()),
        suffix: Some("labels".into()),
        ..Default::default()
    })?;
    // Stop the first manager after its first checkpoint; the job stays unfinished.
    let t = std::time::Instant::now();
    while a.checkpoints(&job.id)?.is_empty() {
        anyhow::ensure!(t.elapsed().as_secs() < 60, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    a.shutdown();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(matches!(a.get(&job.id)?.status, JobStatus::Running | JobStatus::Queued));
    let b = JobManager::start(cfg(), files, registry.clone(), None)?;
    let t = std::time::Instant::now();
    let done = loop {
        let j = b.get(&job.id)?;
        if j.status.is_finished() {
            break j;
        }
        anyhow::ensure!(t.elapsed().as_secs() < 120, "job did not finish");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(done.status, JobStatus::Succeeded, "{:?}", done.error);
    assert_eq!(done.fine_tuned_model.as_deref(), Some("labels-v1"));
    assert_eq!(done.promoted, Some(true));
    assert!(registry.lease("labels-v1").is_some());
    assert!(registry.lease("labels").is_some());
    let (events, _) = b.events(&job.id, None, 1000)?;
    assert!(events.iter().any(|e| e.message.starts_with("resuming from the checkpoint")), "no resume event");
    assert!(!b.checkpoints(&job.id)?.is_empty());
    assert!(b.cancel(&job.id).is_err(), "a finished job cannot be cancelled");
    // The folder watcher may have loaded the very version a job promotes: with a stale
    // expected generation that still counts as promoted; another folder is a conflict.
    let served = registry.list().into_iter().find(|a| a.alias == "labels").ok_or_else(|| anyhow::anyhow!("labels not served"))?;
    assert_eq!(b.promote("labels", &served.path, Some(0))?, served.generation);
    let other = dir.path().join("other");
    crate::testing::write_random_adapter(&other, &engine.info()?.shape, 4, 9)?;
    assert!(b.promote("labels", &other, Some(0)).is_err());
    b.shutdown();
    Ok(())
}
