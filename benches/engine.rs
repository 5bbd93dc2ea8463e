//! Engine benchmark: tunegate's engine beside llama.cpp on the same GGUF file and thread
//! count, in the same run. Each half of a round runs tunegate then llama.cpp back to back
//! so that background load hits both alike; every figure is the median over rounds. Writes `benches/results/engine.md`
//! and `benches/results/engine.json`. See `benches/README.md`.
//!
//! Environment: `TUNEGATE_BENCH_MODEL` (default the SmolLM2-135M Q4_1 file),
//! `TUNEGATE_BENCH_RUNS` (rounds, default 3), `TUNEGATE_BENCH_THREADS` (default 2),
//! `TUNEGATE_BENCH_BUDGET_S` (no round starts that would end past this, default 480; at
//! twice this, measurements not yet started are skipped and peer processes are killed),
//! `TUNEGATE_BENCH_QUIET_WAIT_S` (before each half-round, wait up to this for the machine to
//! be quiet, default 60), `TUNEGATE_BENCH_PEER=off` (tunegate only), `TUNEGATE_BENCH_OUT` (results folder),
//! `TUNEGATE_BENCH_LONG=off` (skip the 8 × 2,048-token memory run), `TUNEGATE_BENCH_SOAK_S`
//! (seconds of back-to-back batches watching memory growth; default 0, off),
//! `TUNEGATE_BENCH_KV=f32` (the f32 KV cache instead of the default f16; the report says so).

#[path = "engine/peer.rs"]
mod peer;
#[path = "engine/report.rs"]
mod report;
#[path = "engine/under_load.rs"]
mod under_load;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tunegate::adapters::{lora_handle, AdapterLease, AdapterLimits, AdapterRegistry, LoadOptions};
use peer::PeerRound;
use tunegate::engine::model::KvType;
use tunegate::engine::{Engine, EngineConfig, GenerateRequest, Prompt, SamplingParams};

const PREFILL_TOKENS: usize = 128;
const LONG_PROMPT_TOKENS: usize = 1000;
const DECODE_TOKENS: usize = 128;
/// Context depths decode is measured behind (a prompt of this many tokens first), beside
/// `llama-bench -d`; depth 0 is `decode_128_tps`.
const DEPTHS: [usize; 2] = [512, 2048];
const STREAMS: usize = 8;
const ADAPTER_RANK: usize = 16;
const ADAPTER_LOADS: usize = 5;

/// What the bench was asked to do.
pub struct Settings {
    pub root: PathBuf,
    pub model: PathBuf,
    pub runs: usize,
    pub threads: usize,
    pub budget: Duration,
    pub quiet_wait: Duration,
    pub peer: bool,
    pub long: bool,
    pub soak_seconds: u64,
    pub out_dir: PathBuf,
    /// The KV cache type (`TUNEGATE_BENCH_KV`, default the product's: f16).
    pub kv_type: KvType,
}

/// One round of tunegate's figures; `None` where the time budget ran out first.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineRound {
    /// `/proc/loadavg` when the round started: other work on the machine skews both sides.
    pub load_average: String,
    /// Share of the cores other work kept busy over one second before the single-stream
    /// half of the round, and before the 8-stream half.
    pub other_cpu_busy: Option<f64>,
    pub other_cpu_busy_batched: Option<f64>,
    pub prefill_128_tps: Option<f64>,
    pub prefill_1000_seconds: Option<f64>,
    pub decode_128_tps: Option<f64>,
    /// Decode of 128 tokens behind a prompt of [`DEPTHS`] tokens.
    pub decode_depth_tps: [Option<f64>; 2],
    pub batch8_base_decode_tps: Option<f64>,
    pub batch8_lora_decode_tps: Option<f64>,
    /// Latest first token among the 8 streams, seconds from submission.
    pub batch8_base_last_first_token_seconds: Option<f64>,
    pub batch8_lora_last_first_token_seconds: Option<f64>,
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn settings() -> Result<Settings> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("TUNEGATE_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !model.exists() {
        bail!(
            "model {} not found; run `tunegate model fetch` or set TUNEGATE_BENCH_MODEL",
            model.display()
        );
    }
    let peer = !matches!(
        std::env::var("TUNEGATE_BENCH_PEER").as_deref(),
        Ok("off" | "0" | "false" | "no")
    );
    let long = !matches!(std::env::var("TUNEGATE_BENCH_LONG").as_deref(), Ok("off" | "0" | "false" | "no"));
    Ok(Settings {
        long,
        soak_seconds: env_usize("TUNEGATE_BENCH_SOAK_S", 0)? as u64,
        out_dir: std::env::var_os("TUNEGATE_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("benches/results")),
        runs: env_usize("TUNEGATE_BENCH_RUNS", 3)?.max(1),
        threads: env_usize("TUNEGATE_BENCH_THREADS", 2)?.max(1),
        budget: Duration::from_secs(env_usize("TUNEGATE_BENCH_BUDGET_S", 480)? as u64),
        quiet_wait: Duration::from_secs(env_usize("TUNEGATE_BENCH_QUIET_WAIT_S", 60)? as u64),
        peer,
        model,
        root,
        kv_type: match std::env::var("TUNEGATE_BENCH_KV").as_deref() {
            Ok("f32") => KvType::F32,
            Ok("f16") | Err(_) => KvType::F16,
            Ok(other) => bail!("TUNEGATE_BENCH_KV={other:?}: f16 or f32"),
        },
    })
}

/// Random in-vocabulary token ids (as llama-bench does); a fresh seed per prompt keeps any
/// prefix reuse from flattering the figures.
fn random_tokens(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    let low = 256.min(vocab / 2) as u32;
    (0..n).map(|_| rng.random_range(low..vocab as u32)).collect()
}

fn request(tokens: Vec<u32>, max_tokens: usize, adapter: Option<AdapterLease>) -> GenerateRequest {
    let params = SamplingParams { max_tokens, temperature: 0.0, stop_at_eos: false, ..Default::default() };
    GenerateRequest::new(Prompt::Tokens(tokens), params).with_adapter(adapter.as_ref().map(lora_handle))
}

/// Time to first token and decode speed of one request run alone.
fn single(engine: &Engine, tokens: Vec<u32>, max_tokens: usize) -> Result<(f64, f64)> {
    let done = engine.submit(request(tokens, max_tokens, None))?.collect_blocking()?;
    let n = done.usage.completion_tokens;
    if n != max_tokens {
        bail!("asked for {max_tokens} tokens, got {n} ({:?})", done.finish_reason);
    }
    let ttft = done.timings.time_to_first_token.as_secs_f64();
    let decode_secs = done.timings.total.as_secs_f64() - ttft;
    let decode_tps = if n > 1 && decode_secs > 0.0 { (n - 1) as f64 / decode_secs } else { 0.0 };
    Ok((ttft, decode_tps))
}

/// 8 concurrent streams of 128 prompt + 128 generated tokens. Returns the aggregate decode
/// speed over the window in which every stream has its first token (from the latest first
/// token to the last token of all), and that latest first-token time.
fn concurrent(engine: &Engine, rng: &mut StdRng, vocab: usize, adapters: &[Option<AdapterLease>]) -> Result<(f64, f64)> {
    let start = Instant::now();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles = under_load::run_streams(engine, rng, vocab, adapters, PREFILL_TOKENS, DECODE_TOKENS, start, &progress)?;
    let all = under_load::join(handles)?.per_stream;
    if all.len() != adapters.len() || all.iter().any(|a| a.len() != DECODE_TOKENS) {
        bail!("a stream did not produce {DECODE_TOKENS} tokens");
    }
    let t0 = all.iter().filter_map(|a| a.first()).max().copied().unwrap_or_default();
    let t1 = all.iter().filter_map(|a| a.last()).max().copied().unwrap_or_default();
    let in_window = all.iter().flatten().filter(|&&t| t > t0).count();
    let secs = (t1 - t0).as_secs_f64();
    let tps = if secs > 0.0 { in_window as f64 / secs } else { 0.0 };
    Ok((tps, t0.as_secs_f64()))
}

/// tunegate's single-stream measurements; those that would start past `deadline` are skipped.
fn engine_single(engine: &Engine, rng: &mut StdRng, vocab: usize, deadline: Instant, r: &mut EngineRound) -> Result<()> {
    let open = || Instant::now() < deadline;
    if open() {
        let (ttft, _) = single(engine, random_tokens(rng, PREFILL_TOKENS, vocab), 1)?;
        r.prefill_128_tps = Some(PREFILL_TOKENS as f64 / ttft);
    }
    if open() {
        r.prefill_1000_seconds = Some(single(engine, random_tokens(rng, LONG_PROMPT_TOKENS, vocab), 1)?.0);
    }
    if open() {
        // One prompt token, as llama-bench's tg128 decodes from an empty context.
        r.decode_128_tps = Some(single(engine, random_tokens(rng, 1, vocab), DECODE_TOKENS)?.1);
    }
    for (slot, depth) in r.decode_depth_tps.iter_mut().zip(DEPTHS) {
        if open() {
            *slot = Some(single(engine, random_tokens(rng, depth, vocab), DECODE_TOKENS)?.1);
        }
    }
    Ok(())
}

/// tunegate's 8-stream measurements, base then adapters.
fn engine_batched(
    engine: &Engine,
    rng: &mut StdRng,
    vocab: usize,
    leases: &[Option<AdapterLease>],
    deadline: Instant,
    r: &mut EngineRound,
) -> Result<()> {
    let open = || Instant::now() < deadline;
    if open() {
        let (tps, first) = concurrent(engine, rng, vocab, &vec![None; STREAMS])?;
        r.batch8_base_decode_tps = Some(tps);
        r.batch8_base_last_first_token_seconds = Some(first);
    }
    if open() {
        let (tps, first) = concurrent(engine, rng, vocab, leases)?;
        r.batch8_lora_decode_tps = Some(tps);
        r.batch8_lora_last_first_token_seconds = Some(first);
    }
    Ok(())
}

/// Waits (at most `max_wait`) for a second in which other work keeps under 30% of the
/// cores busy; returns the last reading.
fn wait_quiet(max_wait: Duration) -> Option<f64> {
    let start = Instant::now();
    loop {
        let busy = report::cpu_busy_fraction();
        if busy.is_none_or(|b| b < 0.3) || start.elapsed() >= max_wait {
            return busy;
        }
    }
}

/// Loads of one rank-16 adapter under fresh aliases, each unloaded again: wall seconds.
fn adapter_loads(registry: &AdapterRegistry, dir: &Path) -> Result<(Vec<f64>, usize)> {
    let mut secs = Vec::new();
    let mut bytes = 0;
    for i in 0..ADAPTER_LOADS {
        let alias = format!("bench-load-{i}");
        let t = Instant::now();
        let info = registry.load(&alias, dir, LoadOptions::default())?;
        secs.push(t.elapsed().as_secs_f64());
        bytes = info.bytes;
        registry.unload(&alias, None)?;
    }
    Ok((secs, bytes))
}

fn main() -> Result<()> {
    let s = settings()?;
    // As `tunegate serve` does, before any thread starts.
    tunegate::engine::size_thread_pools(s.threads);
    let began = Instant::now();
    let load_start = report::loadavg();
    eprintln!("bench: model {}, {} threads, {} rounds, budget {:?}", s.model.display(), s.threads, s.runs, s.budget);

    let peer = if s.peer {
        match peer::locate(&s.root) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("bench: no llama.cpp peer: {e:#}");
                None
            }
        }
    } else {
        None
    };

    let t = Instant::now();
    let engine = Engine::start(EngineConfig {
        model_path: s.model.clone(),
        model_name: "bench".into(),
        // Room for decode behind the deepest prompt.
        context_length: 4096,
        threads: s.threads,
        max_batch: 16,
        max_queue: 64,
        // Every figure here is about running tokens; repeated prompts must not skip work.
        prefix_cache_bytes: 0,
        kv_type: s.kv_type,
    })?;
    let registry = AdapterRegistry::for_engine(&engine, AdapterLimits::default());
    let engine_load_seconds = t.elapsed().as_secs_f64();
    let info = engine.info()?;
    let vocab = info.shape.vocab_size;

    // Memory first, before any adapter is loaded: model + 8 × 2,048 positions of KV cache.
    let mut rng = StdRng::seed_from_u64(7);
    let kv_element_bytes = s.kv_type.bytes();
    let kv_per_position = (info.shape.num_layers * 2 * info.shape.num_kv_heads * info.shape.head_dim * kv_element_bytes) as u64;
    let long = if s.long {
        wait_quiet(s.quiet_wait);
        let l = under_load::long_streams(&engine, &mut rng, vocab, kv_per_position)?;
        eprintln!("bench: long streams {l:?}");
        Some(l)
    } else {
        None
    };
    // llama.cpp with the same KV cache type and size, right after.
    let peer_long_peak_rss = match (&peer, &long) {
        (Some(p), Some(_)) => match p.long_memory(&s.model, s.threads, began + 2 * s.budget) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                eprintln!("bench: llama-batched-bench memory run: {e:#}");
                None
            }
        },
        _ => None,
    };

    let tmp = tempfile::tempdir()?;
    let mut leases = Vec::new();
    for i in 0..STREAMS {
        let dir = tmp.path().join(format!("adapter-{i}"));
        tunegate::testing::write_random_adapter(&dir, &info.shape, ADAPTER_RANK, 1000 + i as u64)?;
        let alias = format!("bench-{i}");
        registry.load(&alias, &dir, LoadOptions::default())?;
        leases.push(Some(registry.lease(&alias).context("adapter lease")?));
    }
    let (adapter_load_seconds, adapter_bytes) = adapter_loads(&registry, &tmp.path().join("adapter-0"))?;

    // Warm-up: first-touch page faults, thread pool start, lazy buffers.
    single(&engine, random_tokens(&mut rng, 32, vocab), 8)?;

    let hard_deadline = began + 2 * s.budget;
    let mut engine_rounds = Vec::new();
    let mut peer_rounds = Vec::new();
    let mut stopped_early = false;
    for r in 0..s.runs {
        let round_start = Instant::now();
        // Each half runs tunegate then llama.cpp back to back, so both meet the same load.
        let mut e = EngineRound { load_average: report::loadavg(), ..Default::default() };
        let mut p = PeerRound::default();
        e.other_cpu_busy = wait_quiet(s.quiet_wait);
        engine_single(&engine, &mut rng, vocab, hard_deadline, &mut e)?;
        if let Some(peer) = &peer {
            peer.single_stream(&s.model, s.threads, hard_deadline, &mut p);
            peer.decode_at_depths(&s.model, s.threads, &DEPTHS, hard_deadline, &mut p);
        }
        e.other_cpu_busy_batched = wait_quiet(s.quiet_wait);
        engine_batched(&engine, &mut rng, vocab, &leases, hard_deadline, &mut e)?;
        if let Some(peer) = &peer {
            peer.batched(&s.model, s.threads, hard_deadline, &mut p);
        }
        eprintln!("bench: round {} tunegate {:?}", r + 1, e);
        engine_rounds.push(e);
        if peer.is_some() {
            eprintln!("bench: round {} llama.cpp {:?}", r + 1, p);
            peer_rounds.push(p);
        }
        let round_time = round_start.elapsed();
        if r + 1 < s.runs && began.elapsed() + round_time > s.budget {
            eprintln!("bench: stopping after {} rounds (time budget {:?})", r + 1, s.budget);
            stopped_early = true;
            break;
        }
    }
    let swap_dir = tmp.path().join("adapter-swap");
    tunegate::testing::write_random_adapter(&swap_dir, &info.shape, ADAPTER_RANK, 999)?;
    wait_quiet(s.quiet_wait);
    let hot_swap = under_load::hot_swap(&engine, &registry, &mut rng, vocab, &leases, "bench-0", &swap_dir)?;
    eprintln!("bench: hot swap {hot_swap:?}");
    let soak = if s.soak_seconds > 0 {
        let r = under_load::soak(&engine, &mut rng, vocab, &leases, s.soak_seconds)?;
        eprintln!("bench: soak {} batches, rss after 1 min {} end {}", r.batches, r.rss_after_warmup, r.rss_end);
        Some(r)
    } else {
        None
    };
    drop(leases);

    let status = Path::new("/proc/self/status");
    let peak_rss_bytes = peer::read_status_kb(status, "VmHWM:").map(|kb| kb * 1024);
    let results = report::Results {
        settings: &s,
        peer: peer.as_ref(),
        engine_rounds,
        peer_rounds,
        adapter_load_seconds,
        adapter_bytes,
        engine_load_seconds,
        peak_rss_bytes,
        hot_swap,
        long,
        peer_long_peak_rss,
        soak,
        model_bytes: std::fs::metadata(&s.model)?.len(),
        stopped_early,
        load_start,
        load_end: report::loadavg(),
        wall_seconds: began.elapsed().as_secs_f64(),
    };
    let md = results.write(&s.out_dir)?;
    println!("{md}");
    engine.shutdown();
    Ok(())
}
