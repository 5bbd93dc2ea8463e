//! The issue 7 targets that need streams running: hot-swapping an adapter during 8
//! streams, resident memory with 8 streams of 2,048 tokens, and memory growth over a long
//! run (`TUNEGATE_BENCH_SOAK_S`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use tunegate::adapters::{AdapterLease, AdapterRegistry, LoadOptions};
use tunegate::engine::{Engine, StreamEvent};

use super::{random_tokens, request};

/// Token arrival times of several streams submitted together.
pub struct Arrivals {
    pub per_stream: Vec<Vec<Duration>>,
}

/// Submits one stream per entry of `adapters` (`prompt` + `gen` tokens each) and collects
/// every token's arrival time from `start`. `progress` counts tokens as they arrive.
#[expect(clippy::too_many_arguments, reason = "one argument per setting of the measured run")]
pub fn run_streams(
    engine: &Engine,
    rng: &mut StdRng,
    vocab: usize,
    adapters: &[Option<AdapterLease>],
    prompt: usize,
    gen: usize,
    start: Instant,
    progress: &Arc<AtomicUsize>,
) -> Result<Vec<std::thread::JoinHandle<Result<Vec<Duration>>>>> {
    let mut handles = Vec::new();
    for adapter in adapters {
        let mut stream = engine.submit(request(random_tokens(rng, prompt, vocab), gen, adapter.clone()))?;
        let progress = progress.clone();
        handles.push(std::thread::spawn(move || {
            let mut arrivals = Vec::with_capacity(gen);
            loop {
                match stream.next_blocking() {
                    Some(StreamEvent::Token { .. }) => {
                        arrivals.push(start.elapsed());
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(StreamEvent::Done { .. }) => return Ok(arrivals),
                    Some(StreamEvent::Error(e)) => return Err(anyhow::Error::new(e)),
                    None => bail!("the stream ended without Done"),
                }
            }
        }));
    }
    Ok(handles)
}

pub fn join(handles: Vec<std::thread::JoinHandle<Result<Vec<Duration>>>>) -> Result<Arrivals> {
    let mut per_stream = Vec::new();
    for h in handles {
        per_stream.push(h.join().map_err(|_| anyhow::anyhow!("a stream thread panicked"))??);
    }
    Ok(Arrivals { per_stream })
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HotSwap {
    /// Wall time of the load that ran while the streams decoded.
    pub load_seconds: f64,
    /// Median gap between two tokens of a stream, outside the swap.
    pub median_step_seconds: f64,
    /// Over all streams: the longest gap that overlapped the swap, minus that stream's
    /// median gap.
    pub worst_extra_delay_seconds: f64,
}

/// 8 streams on 8 adapters decode; once each has 16 tokens, a new generation of the first
/// stream's alias is loaded from `new_dir` (the alias swaps; running leases keep theirs).
pub fn hot_swap(engine: &Engine, registry: &AdapterRegistry, rng: &mut StdRng, vocab: usize, leases: &[Option<AdapterLease>], alias: &str, new_dir: &Path) -> Result<HotSwap> {
    let start = Instant::now();
    let progress = Arc::new(AtomicUsize::new(0));
    let handles = run_streams(engine, rng, vocab, leases, 32, 160, start, &progress)?;
    let want = leases.len() * 16;
    while progress.load(Ordering::Relaxed) < want {
        std::thread::sleep(Duration::from_millis(2));
    }
    let t0 = start.elapsed();
    registry.load(alias, new_dir, LoadOptions { replace: true, ..Default::default() })?;
    let t1 = start.elapsed();
    let a = join(handles)?;
    let mut all_gaps = Vec::new();
    let mut worst: f64 = 0.0;
    for s in &a.per_stream {
        let gaps: Vec<(Duration, Duration, f64)> =
            s.windows(2).map(|w| (w[0], w[1], (w[1] - w[0]).as_secs_f64())).collect();
        let outside: Vec<f64> = gaps.iter().filter(|g| g.1 < t0 || g.0 > t1).map(|g| g.2).collect();
        let med = super::report::median(outside).unwrap_or(0.0);
        all_gaps.push(med);
        let during = gaps.iter().filter(|g| g.1 >= t0 && g.0 <= t1).map(|g| g.2).fold(0.0, f64::max);
        worst = worst.max(during - med);
    }
    Ok(HotSwap {
        load_seconds: (t1 - t0).as_secs_f64(),
        median_step_seconds: super::report::median(all_gaps).unwrap_or(0.0),
        worst_extra_delay_seconds: worst.max(0.0),
    })
}

fn rss_bytes() -> Option<u64> {
    super::peer::read_status_kb(Path::new("/proc/self/status"), "VmRSS:").map(|kb| kb * 1024)
}

/// Samples this process's resident memory every 50 ms until stopped; returns the peak.
fn rss_sampler() -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut peak = 0;
        while !s.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    });
    (stop, h)
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LongStreams {
    pub streams: usize,
    pub positions: usize,
    /// KV cache bytes those positions take (f32 keys and values, all layers).
    pub kv_bytes: u64,
    pub rss_before: u64,
    pub peak_rss: u64,
    pub seconds: f64,
}

/// 8 base-model streams of 1,024 prompt + 1,024 generated tokens at once; the peak
/// resident memory while they run.
pub fn long_streams(engine: &Engine, rng: &mut StdRng, vocab: usize, kv_bytes_per_position: u64) -> Result<LongStreams> {
    const STREAMS: usize = 8;
    const HALF: usize = 1024;
    let rss_before = rss_bytes().unwrap_or(0);
    let (stop, sampler) = rss_sampler();
    let start = Instant::now();
    let progress = Arc::new(AtomicUsize::new(0));
    let handles = run_streams(engine, rng, vocab, &vec![None; STREAMS], HALF, HALF, start, &progress)?;
    let a = join(handles);
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let a = a?;
    if a.per_stream.iter().any(|s| s.len() != HALF) {
        bail!("a long stream stopped early");
    }
    Ok(LongStreams {
        streams: STREAMS,
        positions: 2 * HALF,
        kv_bytes: STREAMS as u64 * 2 * HALF as u64 * kv_bytes_per_position,
        rss_before,
        peak_rss: peak,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Soak {
    pub seconds: f64,
    pub batches: usize,
    pub tokens: usize,
    /// (seconds since start, resident bytes) after each batch of streams.
    pub rss: Vec<(f64, u64)>,
    /// Resident memory after the first minute, and at the end.
    pub rss_after_warmup: u64,
    pub rss_end: u64,
}

/// Batches of 8 streams (128 + 128 tokens; half on adapters) back to back for `secs`.
pub fn soak(engine: &Engine, rng: &mut StdRng, vocab: usize, leases: &[Option<AdapterLease>], secs: u64) -> Result<Soak> {
    let start = Instant::now();
    let mut out = Soak::default();
    let progress = Arc::new(AtomicUsize::new(0));
    let mixed: Vec<Option<AdapterLease>> =
        leases.iter().enumerate().map(|(i, l)| if i % 2 == 0 { l.clone() } else { None }).collect();
    while start.elapsed() < Duration::from_secs(secs) {
        let handles = run_streams(engine, rng, vocab, &mixed, 128, 128, start, &progress)?;
        join(handles)?;
        out.batches += 1;
        let t = start.elapsed().as_secs_f64();
        let rss = rss_bytes().unwrap_or(0);
        out.rss.push((t, rss));
        if out.rss_after_warmup == 0 && t >= 60.0 {
            out.rss_after_warmup = rss;
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    out.tokens = progress.load(Ordering::Relaxed);
    out.rss_end = rss_bytes().unwrap_or(0);
    if out.rss_after_warmup == 0 {
        out.rss_after_warmup = out.rss.first().map(|r| r.1).unwrap_or(0);
    }
    Ok(out)
}
