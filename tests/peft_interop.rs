//! PEFT interoperability: tunegate's LoRA adapters, loaded into Hugging Face PEFT on a
//! Hugging Face Llama, give the logits our engine gives, on a GGUF base (q/k rows permuted
//! for interleaved RoPE) and on a safetensors base.
//!
//! The subjects: a tiny random Llama rebuilt from a seed, a random adapter on all seven
//! projections (rebuilt from a seed), and an adapter trained on the GGUF base by our
//! trainer and published by `training::export` (which un-permutes q/k `lora_B` rows to
//! Hugging Face order). The trained adapter is committed as a folder under
//! `tests/fixtures/peft/trained/`, so the check does not depend on training being
//! bit-reproducible on every machine.
//!
//! The expected logits come from `scripts/peft_check.py` (torch CPU, float32), committed as
//! `tests/fixtures/peft/expected.json` with the sha256 of every input file it read, so
//! the suite needs no torch. With `TUNEGATE_PEFT_VENV` naming a venv that has torch,
//! transformers and peft, the script runs live instead. The script's header says how to
//! build that venv and regenerate the fixture (`regenerate_peft_fixture`, ignored).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use sha2::{Digest, Sha256};
use tunegate::adapters::{peft, AdapterLimits};
use tunegate::engine::lora::LoraPrecision;
use tunegate::engine::gguf::GgufFile;
use tunegate::engine::hf::SafetensorsDir;
use tunegate::engine::lora::{BatchLora, LoraWeights, Proj};
use tunegate::engine::model::{permute_qk_rows, KvCache, Model, SeqBatch};
use tunegate::testing::{TinyLora, TinySpec, TinyWeights};
use tunegate::training::dataset::Sequence;
use tunegate::training::export::{self, AdapterMeta};
use tunegate::training::trainer::{self, AdamW, LoraParams, TrainConfig};

type R = anyhow::Result<()>;

const VOCAB: usize = 256;
const BASE_SEED: u64 = 2024;
const RANDOM_ADAPTER_SEED: u64 = 77;
const RANDOM_ADAPTER_RANK: usize = 4;
/// The sequence whose last-position logits are compared.
const TOKENS: [u32; 12] = [1, 17, 42, 99, 5, 200, 3, 64, 128, 7, 250, 33];
/// Max abs logit difference accepted between our engine and PEFT.
const TOLERANCE: f32 = 1e-3;
/// Share of an adapter's own effect on the logits that f16 serving may add to the error
/// (under 1%: each weight is rounded by up to 2^-11 of itself, and the errors of thousands of
/// weights add up through the layers).
const F16_SHARE: f32 = 16.0 / 2048.0;
/// Adapter names, as `peft_check.py --adapter NAME=DIR` and `expected.json` use them.
const ADAPTERS: [&str; 2] = ["random", "trained"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peft_check.py")
}

fn spec() -> TinySpec {
    TinySpec::llama(VOCAB)
}

/// The rebuilt inputs of one check: both forms of the base and the random adapter.
struct Inputs {
    hf_dir: PathBuf,
    gguf: PathBuf,
    random: PathBuf,
}

fn write_inputs(dir: &Path) -> anyhow::Result<Inputs> {
    let w = TinyWeights::random(&spec(), BASE_SEED);
    let hf_dir = dir.join("hf");
    w.write_safetensors_dir(&hf_dir)?;
    let gguf = dir.join("tiny.gguf");
    w.write_gguf(&gguf, GgmlDType::F32, None)?;
    let random = dir.join("random");
    TinyLora::random(&spec().shape(), RANDOM_ADAPTER_RANK, &Proj::ALL, RANDOM_ADAPTER_SEED)
        .write_peft(&random, &spec().shape())?;
    Ok(Inputs { hf_dir, gguf, random })
}

fn adapter_dir(inputs: &Inputs, name: &str) -> PathBuf {
    match name {
        "random" => inputs.random.clone(),
        _ => fixture_dir().join(name),
    }
}

fn load_gguf(path: &Path) -> anyhow::Result<Model> {
    let mut f = GgufFile::open(path)?;
    let cfg = f.config()?;
    let arch = f.architecture.clone();
    let interleaved = f.rope_interleaved();
    Ok(Model::new(cfg, &mut f, &arch, "tiny", interleaved)?)
}

fn load_st(dir: &Path) -> anyhow::Result<Model> {
    let mut s = SafetensorsDir::open(dir)?;
    let cfg = s.config.clone();
    let arch = s.architecture.clone();
    Ok(Model::new(cfg, &mut s, &arch, "tiny", false)?)
}

/// Last-position logits of `TOKENS` through the serving path, prefilled in one step.
fn engine_logits(m: &Model, lora: Option<&LoraWeights>) -> anyhow::Result<Vec<f32>> {
    let mut cache = KvCache::new(m.shape.num_layers);
    let bl = BatchLora::new(&[(TOKENS.len(), lora)])?;
    let out = m.forward(&mut [SeqBatch { tokens: &TOKENS, cache: &mut cache }], &bl)?;
    Ok(out.to_vec2::<f32>()?.remove(0))
}

fn max_diff(a: &[f32], b: &[f32]) -> anyhow::Result<f32> {
    anyhow::ensure!(a.len() == b.len(), "{} logits against {}", a.len(), b.len());
    Ok(a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max))
}

fn sha256_file(p: &Path) -> anyhow::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(p)?)))
}

/// `expected.json`, as `peft_check.py` writes it.
#[derive(Debug, serde::Deserialize)]
struct Expected {
    tokens: Vec<u32>,
    inputs: BTreeMap<String, String>,
    logits: BTreeMap<String, Vec<f32>>,
    #[serde(default)]
    versions: BTreeMap<String, String>,
}

impl Expected {
    fn logits(&self, name: &str) -> anyhow::Result<&[f32]> {
        self.logits.get(name).map(Vec::as_slice).ok_or_else(|| anyhow::anyhow!("expected.json has no logits for {name}"))
    }
}

/// Runs `peft_check.py` with the venv's python; returns its parsed output.
fn run_script(venv: &Path, inputs: &Inputs, out: &Path) -> anyhow::Result<Expected> {
    let python = venv.join("bin/python");
    let tokens: Vec<String> = TOKENS.iter().map(|t| t.to_string()).collect();
    let mut cmd = Command::new(&python);
    cmd.arg(script()).arg("--base").arg(&inputs.hf_dir);
    for name in ADAPTERS {
        cmd.arg("--adapter").arg(format!("{name}={}", adapter_dir(inputs, name).display()));
    }
    cmd.arg("--tokens").arg(tokens.join(",")).arg("--gguf").arg(&inputs.gguf).arg("--out").arg(out);
    cmd.env("HF_HUB_OFFLINE", "1");
    eprintln!("running {cmd:?}");
    let status = cmd.status().map_err(|e| anyhow::anyhow!("{}: {e}", python.display()))?;
    anyhow::ensure!(status.success(), "peft_check.py failed ({status})");
    Ok(serde_json::from_slice(&std::fs::read(out)?)?)
}

fn committed_expected() -> anyhow::Result<Expected> {
    let p = fixture_dir().join("expected.json");
    let raw = std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    Ok(serde_json::from_slice(&raw)?)
}

/// The fixture's logits were computed from exactly these files.
fn check_inputs_match(expected: &Expected, inputs: &Inputs) -> R {
    let mut files: Vec<(String, PathBuf)> = vec![
        ("base/config.json".into(), inputs.hf_dir.join("config.json")),
        ("base/model.safetensors".into(), inputs.hf_dir.join("model.safetensors")),
    ];
    for name in ADAPTERS {
        for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
            files.push((format!("{name}/{f}"), adapter_dir(inputs, name).join(f)));
        }
    }
    if expected.inputs.contains_key("base_gguf") {
        files.push(("base_gguf".into(), inputs.gguf.clone()));
    }
    for (key, path) in files {
        let want = expected.inputs.get(&key).ok_or_else(|| anyhow::anyhow!("expected.json lacks the hash of {key}"))?;
        anyhow::ensure!(
            &sha256_file(&path)? == want,
            "{} is not the file expected.json was computed from ({key}); the tiny model or adapter writer changed: \
             regenerate the fixture (see scripts/peft_check.py)",
            path.display()
        );
    }
    anyhow::ensure!(expected.tokens == TOKENS, "expected.json is for tokens {:?}", expected.tokens);
    Ok(())
}

#[test]
fn engine_logits_match_peft() -> R {
    let dir = tempfile::tempdir()?;
    let inputs = write_inputs(dir.path())?;
    let expected = match std::env::var_os("TUNEGATE_PEFT_VENV") {
        Some(venv) => {
            let live = run_script(Path::new(&venv), &inputs, &dir.path().join("live.json"))?;
            eprintln!("live PEFT: {:?}", live.versions);
            if let Ok(fixture) = committed_expected() {
                for (name, l) in &live.logits {
                    if let Some(f) = fixture.logits.get(name) {
                        eprintln!("live vs committed fixture, {name}: max diff {}", max_diff(l, f)?);
                    }
                }
            }
            live
        }
        None => committed_expected()?,
    };
    check_inputs_match(&expected, &inputs)?;
    let bases = [("gguf", load_gguf(&inputs.gguf)?), ("safetensors", load_st(&inputs.hf_dir)?)];
    assert!(bases[0].1.rope_interleaved() && !bases[1].1.rope_interleaved());
    let peft_base = expected.logits("base")?;
    let mut report = Vec::new();
    for (kind, m) in &bases {
        let d = max_diff(&engine_logits(m, None)?, peft_base)?;
        report.push(format!("{kind} base: {d:.2e}"));
        anyhow::ensure!(d < TOLERANCE, "{kind} base: logits differ from transformers by {d}");
        for name in ADAPTERS {
            // Exactly the file's values (`adapters.precision = "f32"`).
            let exact = AdapterLimits { precision: LoraPrecision::F32, ..AdapterLimits::default() };
            let a = peft::load_adapter(&adapter_dir(&inputs, name), &m.shape, &exact)?;
            let want = expected.logits(name)?;
            let d = max_diff(&engine_logits(m, Some(&a.weights))?, want)?;
            report.push(format!("{kind} + {name}: {d:.2e}"));
            anyhow::ensure!(d < TOLERANCE, "{kind} base + {name} adapter: logits differ from PEFT by {d}");
            // The adapter must matter, or the match above proves nothing.
            let moved = max_diff(want, peft_base)?;
            report.push(format!("({name} moves PEFT's logits by {moved:.2})"));
            anyhow::ensure!(moved > 0.1, "{name} adapter moves PEFT's logits by only {moved}");
            // The default f16 serving copy rounds each weight (relative 2^-11). A trained
            // adapter still meets the tolerance; the random one, whose deltas are as large as
            // the base weights, may move the logits by a small share of its own effect.
            let a = peft::load_adapter(&adapter_dir(&inputs, name), &m.shape, &AdapterLimits::default())?;
            let d16 = max_diff(&engine_logits(m, Some(&a.weights))?, want)?;
            let bound = if name == "trained" { TOLERANCE } else { TOLERANCE + F16_SHARE * moved };
            report.push(format!("{kind} + {name} in f16: {d16:.2e} (bound {bound:.2e})"));
            anyhow::ensure!(d16 < bound, "{kind} base + {name} adapter in f16: logits differ from PEFT by {d16} (bound {bound})");
        }
    }
    if let Some(g) = expected.logits.get("base_gguf") {
        // transformers' own GGUF reader on our GGUF file: our q/k layout is llama.cpp's.
        let d = max_diff(g, peft_base)?;
        report.push(format!("transformers(gguf) vs transformers(safetensors): {d:.2e}"));
        anyhow::ensure!(d < TOLERANCE, "transformers reads our GGUF differently from the safetensors ({d})");
    }
    eprintln!("max abs logit diff against PEFT: {}", report.join(", "));
    Ok(())
}

/// A negative control: the trained adapter with its q/k `lora_B` rows left in GGUF order
/// (the bug `export::write_peft` guards against) is far from PEFT's logits, so the
/// tolerance above can tell the two orders apart.
#[test]
fn qk_rows_in_gguf_order_do_not_match_peft() -> R {
    let dir = tempfile::tempdir()?;
    let inputs = write_inputs(dir.path())?;
    let expected = committed_expected()?;
    let m = load_st(&inputs.hf_dir)?;
    let src = fixture_dir().join("trained");
    let wrong = dir.path().join("wrong-order");
    std::fs::create_dir_all(&wrong)?;
    std::fs::copy(src.join(peft::CONFIG_FILE), wrong.join(peft::CONFIG_FILE))?;
    let mut tensors = candle_core::safetensors::load(src.join(peft::WEIGHTS_FILE), &candle_core::Device::Cpu)?;
    let mut permuted = 0;
    for (name, t) in tensors.iter_mut() {
        let heads = match peft::parse_name(name) {
            Some((_, Proj::Q, false)) => m.shape.num_heads,
            Some((_, Proj::K, false)) => m.shape.num_kv_heads,
            _ => continue,
        };
        *t = permute_qk_rows(t, heads, false)?;
        permuted += 1;
    }
    assert_eq!(permuted, 2 * m.shape.num_layers);
    candle_core::safetensors::save(&tensors, wrong.join(peft::WEIGHTS_FILE))?;
    let a = peft::load_adapter(&wrong, &m.shape, &AdapterLimits::default())?;
    let d = max_diff(&engine_logits(&m, Some(&a.weights))?, expected.logits("trained")?)?;
    eprintln!("q/k lora_B rows in GGUF order: max abs logit diff against PEFT {d}");
    anyhow::ensure!(d > 100.0 * TOLERANCE, "q/k rows in the wrong order still match PEFT to {d}");
    Ok(())
}

/// Rebuilding the tiny base and the random adapter from their seeds gives the same bytes,
/// which is what lets `expected.json` stand in for a live PEFT run.
#[test]
fn fixture_inputs_are_reproducible() -> R {
    let (d1, d2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (a, b) = (write_inputs(d1.path())?, write_inputs(d2.path())?);
    for (x, y) in [
        (a.hf_dir.join("config.json"), b.hf_dir.join("config.json")),
        (a.hf_dir.join("model.safetensors"), b.hf_dir.join("model.safetensors")),
        (a.gguf.clone(), b.gguf.clone()),
        (a.random.join(peft::CONFIG_FILE), b.random.join(peft::CONFIG_FILE)),
        (a.random.join(peft::WEIGHTS_FILE), b.random.join(peft::WEIGHTS_FILE)),
    ] {
        anyhow::ensure!(std::fs::read(&x)? == std::fs::read(&y)?, "{} differs between two rebuilds", x.display());
    }
    Ok(())
}

// ---- Fixture generation ----

/// A synthetic task: a fixed prompt pattern per example, three answer tokens to learn.
fn training_data() -> Vec<Sequence> {
    (0..8u32)
        .map(|i| {
            let prompt = [1, 10 + i, 20 + 3 * i, 40 + 5 * i, 90 + i, 2];
            let answer = [100 + 11 * i, 120 + 7 * i % 50, 3];
            let tokens: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
            let loss_mask = (0..tokens.len()).map(|k| k >= prompt.len()).collect();
            Sequence { tokens, loss_mask, prompt_len: prompt.len() }
        })
        .collect()
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        rank: 4,
        alpha: 8.0,
        learning_rate: 1e-2,
        epochs: 20,
        max_steps: Some(30),
        batch_size: 4,
        micro_batch: 4,
        warmup_steps: 2,
        seed: 5,
        ..Default::default()
    }
}

/// Trains the adapter on the GGUF base and publishes it as `root/fixture/trained/`.
fn train_adapter(gguf: &Path, root: &Path) -> anyhow::Result<(PathBuf, LoraParams)> {
    let m = load_gguf(gguf)?;
    anyhow::ensure!(m.shape.qk_interleaved, "the trained adapter must come from a q/k-permuted base");
    let dense = m.to_dense()?;
    let cfg = train_cfg();
    let params = LoraParams::init(&m.shape, &cfg)?;
    let mut opt = AdamW::new(&params, cfg.weight_decay)?;
    let data = training_data();
    let cancel = AtomicBool::new(false);
    let run = trainer::TrainRun { model: &dense, params: &params, opt: &mut opt, data: &data, cfg: &cfg, resume: None, cancel: &cancel };
    let out = trainer::train(run, &mut |_, _, _| Ok(()))?;
    let (first, last) = (out.losses.first().copied().unwrap_or(0.0), out.losses.last().copied().unwrap_or(0.0));
    eprintln!("trained {} steps, loss {first} -> {last}", out.steps);
    anyhow::ensure!(last < first * 0.5, "training did not learn (loss {first} -> {last})");
    for (_, b) in params.pairs.values() {
        anyhow::ensure!(b.as_tensor().abs()?.max_all()?.to_scalar::<f32>()? > 1e-3, "a lora_B stayed at zero");
    }
    let meta = AdapterMeta {
        job_id: None,
        task: "peft-fixture".into(),
        base_model: format!("TinySpec::llama({VOCAB}), TinyWeights::random seed {BASE_SEED}"),
        data_sha256: "synthetic (tests/peft_interop.rs training_data)".into(),
        train_examples: data.len(),
        eval_examples: 0,
        distilled_prompt: None,
        eval: None,
        owner: None,
        steps: out.steps,
        final_loss: Some(last),
        // Fixed, so that a retrain on the same machine rewrites identical bytes.
        train_seconds: 0.0,
        hyperparameters: cfg.clone(),
        created_at: 0,
    };
    let dest = export::publish(root, "fixture", "trained", &params, &m.shape, &cfg, &meta)?;
    Ok((dest, params))
}

fn adapter_weights(dir: &Path) -> anyhow::Result<BTreeMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(dir.join(peft::WEIGHTS_FILE), &candle_core::Device::Cpu)?.into_iter().collect())
}

/// The exporter is checked on every run, not only when the fixture was made: an adapter
/// trained now on the GGUF base and published gives, on the safetensors base (Hugging
/// Face q/k order, the order PEFT uses, matched above), the logits the trained weights give
/// on the GGUF base in the engine's own order. Training need not be reproducible for this;
/// whether it reproduced the committed adapter is reported.
#[test]
fn freshly_exported_adapter_is_in_hugging_face_order() -> R {
    let dir = tempfile::tempdir()?;
    let inputs = write_inputs(dir.path())?;
    let (gguf, st) = (load_gguf(&inputs.gguf)?, load_st(&inputs.hf_dir)?);
    let (published, params) = train_adapter(&inputs.gguf, &dir.path().join("adapters"))?;
    let in_memory = engine_logits(&gguf, Some(&params.weights(gguf.shape.num_layers)?))?;
    let exported = peft::load_adapter(&published, &st.shape, &AdapterLimits::default())?;
    let d = max_diff(&engine_logits(&st, Some(&exported.weights))?, &in_memory)?;
    anyhow::ensure!(d < TOLERANCE, "exported adapter on the safetensors base differs by {d} from training's weights");
    let committed = max_diff(&in_memory, committed_expected()?.logits("trained")?)?;
    eprintln!("exported vs in-memory: {d:.2e}; fresh training vs the committed adapter's PEFT logits: {committed:.2e}");
    Ok(())
}

/// Retrains the committed adapter and rewrites `expected.json` with live PEFT. Needs
/// `TUNEGATE_PEFT_VENV`. Run with `--ignored regenerate_peft_fixture`.
#[test]
#[ignore = "rewrites tests/fixtures/peft; needs TUNEGATE_PEFT_VENV"]
fn regenerate_peft_fixture() -> R {
    let venv = std::env::var_os("TUNEGATE_PEFT_VENV")
        .ok_or_else(|| anyhow::anyhow!("set TUNEGATE_PEFT_VENV to a venv with torch, transformers, peft, gguf"))?;
    let dir = tempfile::tempdir()?;
    let inputs = write_inputs(dir.path())?;
    let (trained, _) = train_adapter(&inputs.gguf, &dir.path().join("adapters"))?;
    // Training twice in this process gives the same weights (reported, not required:
    // the committed folder is what the check uses).
    let (again, _) = train_adapter(&inputs.gguf, &dir.path().join("adapters-again"))?;
    let (w1, w2) = (adapter_weights(&trained)?, adapter_weights(&again)?);
    let mut worst = 0f32;
    for (k, t) in &w1 {
        let u = w2.get(k).ok_or_else(|| anyhow::anyhow!("{k} missing from the retrain"))?;
        worst = worst.max((t - u)?.abs()?.max_all()?.to_scalar::<f32>()?);
    }
    eprintln!(
        "retrain: max weight diff {worst}, files identical: {}",
        std::fs::read(trained.join(peft::WEIGHTS_FILE))? == std::fs::read(again.join(peft::WEIGHTS_FILE))?
    );
    let fixture = fixture_dir();
    let dest = fixture.join("trained");
    std::fs::create_dir_all(&dest)?;
    for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE, peft::META_FILE] {
        std::fs::copy(trained.join(f), dest.join(f))?;
    }
    let expected = run_script(Path::new(&venv), &inputs, &fixture.join("expected.json"))?;
    check_inputs_match(&expected, &inputs)?;
    eprintln!("wrote {} with {:?}", fixture.display(), expected.versions);
    Ok(())
}
