//! Training throughput: LoRA fine-tuning tokens per second on the default model, through
//! the same `trainer::train` a job runs. Synthetic sequences (random token ids, lengths
//! around 128, loss on the answer half) so that the figure depends on shapes only. Also
//! splits one step into forward, backward and optimizer time. See `benches/README.md`.
//!
//! Environment: `TUNEGATE_BENCH_MODEL` (default the SmolLM2-135M Q4_1 file),
//! `TUNEGATE_BENCH_THREADS` (default 2), `TUNEGATE_BENCH_STEPS` (measured optimizer steps
//! per setting after one warm-up step, default 4), `TUNEGATE_BENCH_SETTINGS` (comma list
//! of `all16` and `qv8`, default both).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context as _, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tunegate::engine::lora::{BatchLora, LoraWeights};
use tunegate::training::dataset::Sequence;
use tunegate::training::pipeline::load_model;
use tunegate::training::trainer::{self, AdamW, LoraParams, TrainConfig};

/// Sequences per optimizer step (and per micro-batch), as in the PEFT peer.
const BATCH: usize = 8;
/// Sequence lengths are drawn from `MEAN_LEN ± SPREAD`.
const MEAN_LEN: usize = 128;
const SPREAD: usize = 16;

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

/// `n` sequences of random tokens; the second half of each carries loss, like a prompt
/// followed by its answer.
fn synthetic(n: usize, vocab: usize, seed: u64) -> Vec<Sequence> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(MEAN_LEN - SPREAD..=MEAN_LEN + SPREAD);
            let tokens: Vec<u32> = (0..len).map(|_| rng.random_range(2..vocab as u32)).collect();
            let prompt_len = len / 2;
            let loss_mask = (0..len).map(|i| i >= prompt_len).collect();
            Sequence { tokens, loss_mask, prompt_len }
        })
        .collect()
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat`: on a shared
/// machine, wall time measures the neighbours as much as the trainer.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    // SC_CLK_TCK is 100 on Linux.
    f.get(11).zip(f.get(12)).map_or(0.0, |(u, s)| (u + s) / 100.0)
}

/// Peak resident memory of this process so far (VmHWM), MiB.
fn peak_rss_mib() -> f64 {
    rss_mib("VmHWM:")
}

/// A memory line of `/proc/self/status` (`VmRSS:`, `VmHWM:`), MiB.
fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_path = std::env::var("TUNEGATE_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let threads = env_usize("TUNEGATE_BENCH_THREADS", 2)?;
    let steps = env_usize("TUNEGATE_BENCH_STEPS", 4)?.max(1);
    let settings = std::env::var("TUNEGATE_BENCH_SETTINGS").unwrap_or_else(|_| "all16,qv8".into());
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, threads.to_string());
        }
    }

    let rss_start = rss_mib("VmRSS:");
    let (model, _info) = load_model(&model_path, "bench").map_err(|e| anyhow::anyhow!("{e}"))?;
    let rss_model = rss_mib("VmRSS:");
    let dense = model.for_training()?;
    let rss_dense = rss_mib("VmRSS:");
    let data = synthetic(BATCH * (steps + 1), model.shape.vocab_size, 7);
    println!(
        "model {} ({} layers, vocab {}), {threads} threads, batch {BATCH}, lengths {}..={}, loss on the second half",
        model_path.display(),
        model.shape.num_layers,
        model.shape.vocab_size,
        MEAN_LEN - SPREAD,
        MEAN_LEN + SPREAD
    );
    println!(
        "resident memory: {rss_start:.0} MiB at start, {rss_model:.0} MiB with the serving model loaded, {rss_dense:.0} MiB with its training copy (repacked int8 panels, or f32 without AVX-512 VNNI)"
    );
    println!("load average: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    for setting in settings.split(',') {
        if setting == "matmul" {
            matmul_probe()?;
            continue;
        }
        let mut cfg = TrainConfig { batch_size: BATCH, epochs: 1, warmup_steps: 0, ..Default::default() };
        cfg.micro_batch = env_usize("TUNEGATE_BENCH_MICRO", cfg.micro_batch)?;
        match setting {
            "all16" => {}
            "qv8" => {
                cfg.rank = 8;
                cfg.alpha = 16.0;
                cfg.target_modules = vec!["q_proj".into(), "v_proj".into()];
            }
            other => anyhow::bail!("unknown setting {other} (all16, qv8)"),
        }
        let params = LoraParams::init(&model.shape, &cfg)?;
        let mut opt = AdamW::new(&params, cfg.weight_decay)?;

        // One step split into phases (also the warm-up), micro-batch by micro-batch.
        let weights: LoraWeights = params.weights(model.shape.num_layers)?;
        let (mut fwd, mut bwd) = (0.0, 0.0);
        let mut grads = Vec::new();
        for mb in data[..BATCH].chunks(cfg.micro_batch.max(1)) {
            let seqs: Vec<&Sequence> = mb.iter().collect();
            let lens: Vec<_> = seqs.iter().map(|s| (s.tokens.len(), Some(&weights))).collect();
            let lora = BatchLora::new(&lens)?;
            let t0 = Instant::now();
            let (loss, _) = trainer::batch_loss(&dense, &lora, &seqs)?;
            fwd += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            grads.push(loss.backward()?);
            bwd += t1.elapsed().as_secs_f64();
        }
        let t2 = Instant::now();
        opt.step(&params, &grads[0], 1e-4)?;
        let optim = t2.elapsed().as_secs_f64();
        drop(grads);
        let warm_rss = peak_rss_mib();

        let mut times = Vec::new();
        let mut last = Instant::now();
        let cancel = AtomicBool::new(false);
        let cpu0 = cpu_seconds();
        let rest = &data[BATCH..];
        let run = trainer::TrainRun { model: &dense, params: &params, opt: &mut opt, data: rest, cfg: &cfg, resume: None, cancel: &cancel };
        let outcome = trainer::train(run, &mut |_, _, _| {
            times.push(last.elapsed().as_secs_f64());
            last = Instant::now();
            Ok(())
        })?;
        let cpu = cpu_seconds() - cpu0;
        let tokens: usize = rest.iter().map(|s| s.tokens.len()).sum();
        println!(
            "{setting} (micro-batch {}): {:.1} tokens/s, {:.1} tokens per CPU-second, over {} steps ({} tokens, {:.1}s; per step {}); phase split of one step: forward {:.2}s, backward {:.2}s, optimizer {:.3}s; final loss {:.3}; peak resident memory {:.0} MiB after the warm-up step, {:.0} MiB at the end",
            cfg.micro_batch,
            tokens as f64 / outcome.seconds,
            tokens as f64 / cpu.max(1e-9),
            outcome.steps,
            tokens,
            outcome.seconds,
            times.iter().map(|t| format!("{t:.2}s")).collect::<Vec<_>>().join(" "),
            fwd,
            bwd,
            optim,
            outcome.losses.last().copied().unwrap_or(f32::NAN),
            warm_rss,
            peak_rss_mib(),
        );
    }
    Ok(())
}

fn matmul_probe() -> Result<()> {
    use candle_core::{Device, Tensor};
    // (m, k, n, lhs stored transposed, rhs stored transposed)
    for (m, k, n, lt, rt) in [(1024, 576, 1536, false, false), (1024, 576, 1536, false, true), (1024, 576, 1536, true, false), (1024, 1536, 576, false, false), (1024, 1536, 576, false, true), (512, 576, 49152, false, false), (512, 576, 49152, false, true)] {
        let x = if lt { Tensor::randn(0f32, 1.0, (k, m), &Device::Cpu)?.t()? } else { Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)? };
        let w = if rt { Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?.t()? } else { Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu)? };
        let run = || -> Result<Tensor> { Ok(x.matmul(&w)?) };
        run()?;
        let t = Instant::now();
        let c = cpu_seconds();
        let reps = 5;
        for _ in 0..reps {
            run()?;
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let cs = (cpu_seconds() - c) / reps as f64;
        let flop = 2.0 * (m * k * n) as f64;
        println!(
            "matmul {m}x{k}{} @ {k}x{n}{}: {:.1} ms, {:.1} GFLOP/s, {:.1} GFLOP per CPU-second",
            if lt { "(T)" } else { "" },
            if rt { "(T)" } else { "" },
            s * 1e3,
            flop / s / 1e9,
            flop / cs.max(1e-9) / 1e9
        );
    }
    for (m, k, n) in [(1024usize, 576usize, 1536usize), (512, 576, 49152)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; n * k];
        let mut c = vec![0f32; m * n];
        let t = Instant::now();
        let cpu = cpu_seconds();
        for _ in 0..5 {
            // c = a · bᵀ with b stored [n, k].
            // SAFETY: a is m×k, b is n×k, c is m×n, with the strides given.
            unsafe {
                matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), 1, k as isize, 0.0, c.as_mut_ptr(), n as isize, 1);
            }
        }
        let s = t.elapsed().as_secs_f64() / 5.0;
        let cs = (cpu_seconds() - cpu) / 5.0;
        let flop = 2.0 * (m * k * n) as f64;
        println!("matrixmultiply {m}x{k} @ {k}x{n}(T): {:.1} ms, {:.1} GFLOP/s, {:.1} per CPU-second", s * 1e3, flop / s / 1e9, flop / cs.max(1e-9) / 1e9);
    }
    let x = Tensor::randn(0f32, 1.0, (1024, 1536), &Device::Cpu)?;
    let t = Instant::now();
    for _ in 0..20 {
        let _ = (x.sqr()? + 1.0)?;
    }
    println!("elementwise 2 ops on 1.5M floats: {:.2} ms", t.elapsed().as_secs_f64() / 20.0 * 1e3);
    Ok(())
}
