//! Test support, compiled only for tests, benches and the fuzz targets (the `testing`
//! feature, which the crate's own dev-dependency on itself turns on): writes tiny random
//! Llama/Qwen2 models as GGUF or safetensors, random PEFT adapters, and computes reference
//! logits with a plain f32 re-implementation of the forward pass (loops over `Vec<f32>`,
//! no candle), against which the engine is checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::adapters::peft;
use crate::engine::lora::Proj;
use crate::engine::model::ModelShape;
use crate::engine::tokenizer::{tiny_gguf_vocab, TinyVocab};

/// Dimensions of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub max_pos: usize,
    pub qwen2: bool,
    /// A Gemma 3 model with this sliding window: per-head q/k norms, norms after attention
    /// and MLP, GELU gating, embeddings scaled by √hidden, tied head; every sixth layer
    /// global (RoPE base `rope_theta`), the others local (window, RoPE base 10,000).
    pub gemma_window: Option<usize>,
    pub rope_theta: f32,
    pub eps: f32,
    pub tie_embeddings: bool,
}

impl TinySpec {
    pub fn llama(vocab: usize) -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab,
            max_pos: 1024,
            qwen2: false,
            gemma_window: None,
            rope_theta: 10_000.0,
            eps: 1e-5,
            tie_embeddings: false,
        }
    }

    /// A tiny Gemma 3: seven layers (the sixth global, the rest local with a window of 5
    /// positions), global RoPE base 1,000,000 as Gemma 3 has it.
    pub fn gemma(vocab: usize) -> Self {
        Self { layers: 7, gemma_window: Some(5), rope_theta: 1_000_000.0, eps: 1e-6, tie_embeddings: true, ..Self::llama(vocab) }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn architecture(&self) -> &'static str {
        match (self.qwen2, self.gemma_window) {
            (true, _) => "qwen2",
            (false, Some(_)) => "gemma3",
            _ => "llama",
        }
    }

    pub fn shape(&self) -> ModelShape {
        ModelShape {
            architecture: self.architecture().into(),
            base_name: "tiny".into(),
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim(),
            qk_interleaved: false,
        }
    }
}

/// Weights in Hugging Face layout: name → (shape, values).
#[derive(Debug, Clone)]
pub struct TinyWeights {
    pub spec: TinySpec,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn randn(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Irwin-Hall approximation of a normal: good enough for random weights.
            let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
            s * std * 1.73
        })
        .collect()
}

impl TinyWeights {
    pub fn random(spec: &TinySpec, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut t = HashMap::new();
        let (h, i, hd) = (spec.hidden, spec.intermediate, spec.head_dim());
        let std = 1.0 / (h as f32).sqrt();
        let mut put = |name: String, shape: Vec<usize>, v: Vec<f32>| {
            t.insert(name, (shape, v));
        };
        put("model.embed_tokens.weight".into(), vec![spec.vocab, h], randn(&mut rng, spec.vocab * h, 1.0));
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            let norm = |rng: &mut StdRng| (0..h).map(|_| 1.0 + 0.1 * (rng.random::<f32>() - 0.5)).collect();
            put(format!("{p}.input_layernorm.weight"), vec![h], norm(&mut rng));
            put(format!("{p}.post_attention_layernorm.weight"), vec![h], norm(&mut rng));
            for proj in Proj::ALL {
                let (o, inp) = spec.shape().proj_dims(proj);
                let s = if proj == Proj::Down { 1.0 / (i as f32).sqrt() } else { std };
                put(format!("{p}.{}.weight", proj.module_path()), vec![o, inp], randn(&mut rng, o * inp, s));
            }
            if spec.gemma_window.is_some() {
                put(format!("{p}.post_attention_norm.weight"), vec![h], norm(&mut rng));
                put(format!("{p}.post_feedforward_layernorm.weight"), vec![h], norm(&mut rng));
                let head_norm = |rng: &mut StdRng| (0..hd).map(|_| 1.0 + 0.5 * (rng.random::<f32>() - 0.5)).collect();
                put(format!("{p}.self_attn.q_norm.weight"), vec![hd], head_norm(&mut rng));
                put(format!("{p}.self_attn.k_norm.weight"), vec![hd], head_norm(&mut rng));
            }
            if spec.qwen2 {
                for (proj, n) in [(Proj::Q, spec.heads * hd), (Proj::K, spec.kv_heads * hd), (Proj::V, spec.kv_heads * hd)] {
                    put(format!("{p}.{}.bias", proj.module_path()), vec![n], randn(&mut rng, n, 0.1));
                }
            }
        }
        put("model.norm.weight".into(), vec![h], (0..h).map(|_| 1.0).collect());
        if !spec.tie_embeddings {
            put("lm_head.weight".into(), vec![spec.vocab, h], randn(&mut rng, spec.vocab * h, std));
        }
        Self { spec: spec.clone(), tensors: t }
    }

    fn get(&self, name: &str) -> anyhow::Result<&(Vec<usize>, Vec<f32>)> {
        self.tensors.get(name).with_context(|| format!("missing {name}"))
    }

    fn tensor(&self, name: &str) -> anyhow::Result<Tensor> {
        let (shape, v) = self.get(name)?;
        Ok(Tensor::from_vec(v.clone(), shape.as_slice(), &Device::Cpu)?)
    }

    /// Writes a GGUF file the way llama.cpp's converter lays it out (q/k rows permuted for
    /// Llama), 2-D weights in `dtype`, norms and biases in f32, and the tiny tokenizer.
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType, vocab: Option<&TinyVocab>) -> anyhow::Result<()> {
        let spec = &self.spec;
        let arch = spec.architecture();
        let mut qt: Vec<(String, QTensor)> = Vec::new();
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let mut t = self.tensor(name)?;
            if arch == "llama" {
                if name.ends_with("q_proj.weight") {
                    t = crate::engine::model::permute_qk_rows(&t, spec.heads, false)?;
                } else if name.ends_with("k_proj.weight") {
                    t = crate::engine::model::permute_qk_rows(&t, spec.kv_heads, false)?;
                }
            }
            let q = if t.rank() == 2 { QTensor::quantize(&t, dtype)? } else { QTensor::quantize(&t, GgmlDType::F32)? };
            qt.push((crate::engine::gguf::gguf_name(name), q));
        }
        use gguf_file::Value as V;
        let k = |s: &str| format!("{arch}.{s}");
        let mut md: Vec<(String, V)> = vec![
            ("general.architecture".into(), V::String(arch.into())),
            ("general.name".into(), V::String("tiny-random".into())),
            (k("block_count"), V::U32(spec.layers as u32)),
            (k("context_length"), V::U32(spec.max_pos as u32)),
            (k("embedding_length"), V::U32(spec.hidden as u32)),
            (k("feed_forward_length"), V::U32(spec.intermediate as u32)),
            (k("attention.head_count"), V::U32(spec.heads as u32)),
            (k("attention.head_count_kv"), V::U32(spec.kv_heads as u32)),
            (k("attention.layer_norm_rms_epsilon"), V::F32(spec.eps)),
            (k("rope.freq_base"), V::F32(spec.rope_theta)),
            (k("vocab_size"), V::U32(spec.vocab as u32)),
        ];
        if let Some(window) = spec.gemma_window {
            md.push((k("attention.sliding_window"), V::U32(window as u32)));
        }
        if let Some(v) = vocab {
            anyhow::ensure!(v.tokens.len() == spec.vocab, "vocab size mismatch");
            md.extend([
                ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
                ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
                ("tokenizer.ggml.tokens".into(), V::Array(v.tokens.iter().map(|t| V::String(t.clone())).collect())),
                ("tokenizer.ggml.merges".into(), V::Array(v.merges.iter().map(|t| V::String(t.clone())).collect())),
                ("tokenizer.ggml.token_type".into(), V::Array(v.token_types.iter().map(|&t| V::I32(t)).collect())),
                ("tokenizer.ggml.bos_token_id".into(), V::U32(v.bos_id)),
                ("tokenizer.ggml.eos_token_id".into(), V::U32(v.eos_id)),
                ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
                ("tokenizer.chat_template".into(), V::String(v.chat_template.clone())),
            ]);
        }
        let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(())
    }

    /// Writes `config.json` + `model.safetensors` (Hugging Face layout). The caller adds a
    /// tokenizer if the folder is to be served.
    pub fn write_safetensors_dir(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let s = &self.spec;
        // Keys sorted whatever serde_json's map keeps (a dependency turns on its
        // `preserve_order`): the PEFT fixture holds this file's hash.
        let cfg: std::collections::BTreeMap<&str, serde_json::Value> = [
            ("model_type", serde_json::json!(if s.qwen2 { "qwen2" } else { "llama" })),
            ("hidden_size", s.hidden.into()),
            ("intermediate_size", s.intermediate.into()),
            ("num_hidden_layers", s.layers.into()),
            ("num_attention_heads", s.heads.into()),
            ("num_key_value_heads", s.kv_heads.into()),
            ("vocab_size", s.vocab.into()),
            ("rms_norm_eps", serde_json::json!(s.eps)),
            ("rope_theta", serde_json::json!(s.rope_theta)),
            ("max_position_embeddings", s.max_pos.into()),
            ("tie_word_embeddings", s.tie_embeddings.into()),
        ]
        .into_iter()
        .collect();
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
        let mut map = HashMap::new();
        for name in self.tensors.keys() {
            map.insert(name.clone(), self.tensor(name)?);
        }
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        Ok(())
    }
}

/// A LoRA adapter in Hugging Face layout, for writing and for the reference.
#[derive(Debug, Clone)]
pub struct TinyLora {
    pub rank: usize,
    pub alpha: f32,
    /// (layer, proj) → (A `[r, in]`, B `[out, r]`), row-major.
    pub pairs: HashMap<(usize, Proj), (Vec<f32>, Vec<f32>)>,
}

impl TinyLora {
    pub fn random(shape: &ModelShape, rank: usize, targets: &[Proj], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = HashMap::new();
        for l in 0..shape.num_layers {
            for &p in targets {
                let (o, i) = shape.proj_dims(p);
                let a = randn(&mut rng, rank * i, 1.0 / (i as f32).sqrt());
                let b = randn(&mut rng, o * rank, 0.5);
                pairs.insert((l, p), (a, b));
            }
        }
        Self { rank, alpha: 2.0 * rank as f32, pairs }
    }

    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The same adapter with every value rounded to the nearest f16, the precision serving
    /// keeps adapters in: with a power-of-two scale the served products are then exactly the
    /// f32 reference's, so a comparison checks the batching alone.
    pub fn f16_exact(mut self) -> Self {
        for (a, b) in self.pairs.values_mut() {
            for x in a.iter_mut().chain(b.iter_mut()) {
                *x = half::f16::from_f32(*x).to_f32();
            }
        }
        self
    }

    /// Writes a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`).
    pub fn write_peft(&self, dir: &Path, shape: &ModelShape) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut targets: Vec<Proj> = self.pairs.keys().map(|(_, p)| *p).collect();
        targets.sort();
        targets.dedup();
        let modules = targets.iter().map(|p| p.name().to_string()).collect();
        let cfg = peft::PeftConfig::lora(&shape.base_name, self.rank, self.alpha as f64, 0.0, false, modules);
        std::fs::write(dir.join(peft::CONFIG_FILE), serde_json::to_vec_pretty(&cfg)?)?;
        let mut map = HashMap::new();
        for (&(l, p), (a, b)) in &self.pairs {
            let (o, i) = shape.proj_dims(p);
            map.insert(peft::tensor_name(l, p, true), Tensor::from_vec(a.clone(), (self.rank, i), &Device::Cpu)?);
            map.insert(peft::tensor_name(l, p, false), Tensor::from_vec(b.clone(), (o, self.rank), &Device::Cpu)?);
        }
        candle_core::safetensors::save(&map, dir.join(peft::WEIGHTS_FILE))?;
        Ok(())
    }

    /// Returns the weights with `W + scale·B·A` merged in.
    pub fn merge_into(&self, w: &TinyWeights) -> TinyWeights {
        let mut out = w.clone();
        let s = self.scale();
        for (&(l, p), (a, b)) in &self.pairs {
            let name = format!("model.layers.{l}.{}.weight", p.module_path());
            if let Some((shape, v)) = out.tensors.get_mut(&name) {
                let (o, i) = (shape[0], shape[1]);
                for r in 0..o {
                    for c in 0..i {
                        let d: f32 = (0..self.rank).map(|k| b[r * self.rank + k] * a[k * i + c]).sum();
                        v[r * i + c] += s * d;
                    }
                }
            }
        }
        out
    }
}

/// Plain f32 forward pass over a whole token sequence; returns the logits of every
/// position. Written independently of `engine/model/` (half-split RoPE on HF-layout weights,
/// explicit loops, no candle kernels).
pub fn reference_logits(w: &TinyWeights, tokens: &[u32]) -> anyhow::Result<Vec<Vec<f32>>> {
    let s = &w.spec;
    let (h, hd, nh, nkv) = (s.hidden, s.head_dim(), s.heads, s.kv_heads);
    let t = tokens.len();
    let gemma = s.gemma_window;
    let emb = &w.get("model.embed_tokens.weight")?.1;
    let emb_scale = if gemma.is_some() { (h as f32).sqrt() } else { 1.0 };
    let mut x: Vec<Vec<f32>> =
        tokens.iter().map(|&id| emb[id as usize * h..(id as usize + 1) * h].iter().map(|v| v * emb_scale).collect()).collect();
    // Gemma 3: layers 6, 12, … (1-based) global, the others local.
    let window = |l: usize| gemma.filter(|_| !(l + 1).is_multiple_of(6));
    let matvec = |m: &[f32], v: &[f32], out: usize| -> Vec<f32> {
        let inp = v.len();
        (0..out).map(|r| (0..inp).map(|c| m[r * inp + c] * v[c]).sum()).collect()
    };
    let rms = |v: &[f32], g: &[f32]| -> Vec<f32> {
        let ms = v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32;
        let inv = 1.0 / (ms + s.eps).sqrt();
        v.iter().zip(g).map(|(a, g)| a * inv * g).collect()
    };
    let rope = |v: &mut [f32], pos: usize, theta: f32| {
        for head in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let freq = 1.0 / theta.powf(2.0 * i as f32 / hd as f32);
                let (c, sn) = ((pos as f32 * freq).cos(), (pos as f32 * freq).sin());
                let (a, b) = (head[i], head[i + hd / 2]);
                head[i] = a * c - b * sn;
                head[i + hd / 2] = a * sn + b * c;
            }
        }
    };
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let wt = |n: &str| w.get(&format!("{p}.{n}")).map(|x| &x.1);
        let bias = |n: &str| w.tensors.get(&format!("{p}.{n}.bias")).map(|x| x.1.clone());
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, xi) in x.iter().enumerate() {
            let hn = rms(xi, wt("input_layernorm.weight")?);
            let mut q = matvec(wt("self_attn.q_proj.weight")?, &hn, nh * hd);
            let mut k = matvec(wt("self_attn.k_proj.weight")?, &hn, nkv * hd);
            let mut v = matvec(wt("self_attn.v_proj.weight")?, &hn, nkv * hd);
            for (vec, name) in [(&mut q, "self_attn.q_proj"), (&mut k, "self_attn.k_proj"), (&mut v, "self_attn.v_proj")] {
                if let Some(b) = bias(name) {
                    vec.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
            }
            if gemma.is_some() {
                for (vec, name) in [(&mut q, "self_attn.q_norm.weight"), (&mut k, "self_attn.k_norm.weight")] {
                    let g = wt(name)?;
                    *vec = vec.chunks(hd).flat_map(|head| rms(head, g)).collect();
                }
            }
            let theta = if window(l).is_some() { 10_000.0 } else { s.rope_theta };
            rope(&mut q, pos, theta);
            rope(&mut k, pos, theta);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for i in 0..t {
            let mut attn = vec![0f32; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[i][head * hd..(head + 1) * hd];
                // A local layer's query sees positions i - window + 1 ..= i.
                let first = window(l).map_or(0, |n| (i + 1).saturating_sub(n));
                let scores: Vec<f32> = (first..=i)
                    .map(|j| q.iter().zip(&ks[j][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt())
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += ej / z * vs[first + j][kvh * hd + d];
                    }
                }
            }
            let mut o = matvec(wt("self_attn.o_proj.weight")?, &attn, h);
            if gemma.is_some() {
                o = rms(&o, wt("post_attention_norm.weight")?);
            }
            x[i].iter_mut().zip(o).for_each(|(a, b)| *a += b);
            let hn = rms(&x[i], wt("post_attention_layernorm.weight")?);
            let g = matvec(wt("mlp.gate_proj.weight")?, &hn, s.intermediate);
            let u = matvec(wt("mlp.up_proj.weight")?, &hn, s.intermediate);
            let act: Vec<f32> = if gemma.is_some() {
                // GELU, tanh approximation: 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))).
                g.iter().zip(&u).map(|(g, u)| 0.5 * g * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh()) * u).collect()
            } else {
                g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
            };
            let mut d = matvec(wt("mlp.down_proj.weight")?, &act, h);
            if gemma.is_some() {
                d = rms(&d, wt("post_feedforward_layernorm.weight")?);
            }
            x[i].iter_mut().zip(d).for_each(|(a, b)| *a += b);
        }
    }
    let head = if s.tie_embeddings { emb } else { &w.get("lm_head.weight")?.1 };
    let norm = &w.get("model.norm.weight")?.1;
    Ok(x.iter().map(|xi| matvec(head, &rms(xi, norm), s.vocab)).collect())
}

/// Greedy continuation with the reference (recomputes the whole sequence each step).
pub fn reference_greedy(w: &TinyWeights, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
    let mut toks = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = reference_logits(w, &toks)?;
        let last = logits.last().context("no logits")?;
        let id = crate::engine::sampling::argmax(last) as u32;
        out.push(id);
        toks.push(id);
    }
    Ok(out)
}

/// A tiny random Llama GGUF (f32 weights) with the tiny tokenizer and the SmolLM2 chat
/// template, written to `dir/tiny-llama.gguf`. Loads in milliseconds.
pub fn write_tiny_llama_gguf(dir: &Path) -> anyhow::Result<PathBuf> {
    write_tiny_llama_gguf_with(dir, "tiny-llama.gguf", None)
}

/// The same tiny model as [`write_tiny_llama_gguf`] under another file name, with `template`
/// as its chat template when given.
pub fn write_tiny_llama_gguf_with(dir: &Path, name: &str, template: Option<&str>) -> anyhow::Result<PathBuf> {
    let mut vocab = tiny_gguf_vocab();
    if let Some(t) = template {
        vocab.chat_template = t.to_string();
    }
    let spec = TinySpec::llama(vocab.tokens.len());
    let w = TinyWeights::random(&spec, 42);
    let path = dir.join(name);
    w.write_gguf(&path, GgmlDType::F32, Some(&vocab))?;
    Ok(path)
}

/// A random PEFT adapter on all seven projections for a model of `shape`.
pub fn write_random_adapter(dir: &Path, shape: &ModelShape, rank: usize, seed: u64) -> anyhow::Result<()> {
    TinyLora::random(shape, rank, &Proj::ALL, seed).write_peft(dir, shape)
}
