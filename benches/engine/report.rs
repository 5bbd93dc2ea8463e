//! Turns the rounds into medians and writes `engine.md` (a table beside the peer, with
//! ratios, and the issue 7 targets) and `engine.json` (every sample, for tools).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};

use super::peer::{Peer, PeerRound};
use super::{EngineRound, Settings, ADAPTER_RANK, STREAMS};

pub struct Results<'a> {
    pub settings: &'a Settings,
    pub peer: Option<&'a Peer>,
    pub engine_rounds: Vec<EngineRound>,
    pub peer_rounds: Vec<PeerRound>,
    pub adapter_load_seconds: Vec<f64>,
    pub adapter_bytes: usize,
    pub engine_load_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    pub hot_swap: super::under_load::HotSwap,
    pub long: Option<super::under_load::LongStreams>,
    /// llama.cpp's peak resident memory on the same 8 × 2,048 positions (f16 KV cache).
    pub peer_long_peak_rss: Option<u64>,
    pub soak: Option<super::under_load::Soak>,
    pub model_bytes: u64,
    pub stopped_early: bool,
    pub load_start: String,
    pub load_end: String,
    pub wall_seconds: f64,
}

/// Whether a bigger figure is better, for reading the ratio.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

struct Row {
    key: &'static str,
    metric: String,
    unit: &'static str,
    better: Better,
    tunegate: Option<f64>,
    peer: Option<f64>,
    /// Median over rounds of that round's tunegate / llama.cpp (the two ran back to back).
    paired: Option<f64>,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn med_e(rounds: &[EngineRound], f: impl Fn(&EngineRound) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter_map(f).collect())
}

fn med_p(rounds: &[PeerRound], f: impl Fn(&PeerRound) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter_map(f).collect())
}

/// Median over rounds of each round's own ratio.
fn paired(e: &[EngineRound], p: &[PeerRound], fe: impl Fn(&EngineRound) -> Option<f64>, fp: impl Fn(&PeerRound) -> Option<f64>) -> Option<f64> {
    median(e.iter().zip(p).filter_map(|(a, b)| ratio(fe(a), fp(b))).collect())
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "n/a".into(),
        Some(x) if unit == "ms" => format!("{:.1}", x * 1e3),
        Some(x) if unit == "MiB" => format!("{:.1}", x / (1024.0 * 1024.0)),
        Some(x) => format!("{x:.1}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn shell(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Share of all cores busy over one second, read from `/proc/stat`. Called while the bench
/// itself is idle, so it is the load other work puts on the machine.
pub fn cpu_busy_fraction() -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((v.iter().take(8).sum(), idle))
    }
    let (t0, i0) = sample()?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0)?;
    (total > 0).then(|| 1.0 - (i1.saturating_sub(i0)) as f64 / total as f64)
}

fn cpu_model() -> String {
    let lscpu = shell("lscpu", &[]);
    lscpu
        .lines()
        .find(|l| l.starts_with("Model name:"))
        .map(|l| l.trim_start_matches("Model name:").trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

fn date_utc() -> String {
    shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

impl Results<'_> {
    fn rows(&self) -> Vec<Row> {
        let e = &self.engine_rounds;
        let p = &self.peer_rounds;
        let peer_rss = p.iter().filter_map(|r| r.peak_rss_bytes).max().map(|b| b as f64);
        // A figure both engines measure: medians of each side and of each round's ratio.
        let both = |key, metric: String, unit, better, fe: fn(&EngineRound) -> Option<f64>, fp: fn(&PeerRound) -> Option<f64>| Row {
            key,
            metric,
            unit,
            better,
            tunegate: med_e(e, fe),
            peer: med_p(p, fp),
            paired: paired(e, p, fe, fp),
        };
        let depth = |i: usize| format!("decode, 1 stream, 128 tokens behind a {}-token prompt", crate::DEPTHS[i]);
        vec![
            both("prefill_128_tps", "prefill, 128-token prompt".into(), "tokens/s", Better::Higher, |r| r.prefill_128_tps, |r| r.prefill_128_tps),
            both("ttft_1000_seconds", "time to first token, 1,000-token prompt".into(), "ms", Better::Lower, |r| r.prefill_1000_seconds, |r| r.prefill_1000_seconds),
            both("decode_128_tps", "decode, 1 stream, 128 tokens".into(), "tokens/s", Better::Higher, |r| r.decode_128_tps, |r| r.decode_128_tps),
            both("decode_d512_tps", depth(0), "tokens/s", Better::Higher, |r| r.decode_depth_tps[0], |r| r.decode_depth_tps[0]),
            both("decode_d2048_tps", depth(1), "tokens/s", Better::Higher, |r| r.decode_depth_tps[1], |r| r.decode_depth_tps[1]),
            both(
                "batch8_base_decode_tps",
                format!("decode, {STREAMS} streams on the base model (aggregate)"),
                "tokens/s",
                Better::Higher,
                |r| r.batch8_base_decode_tps,
                |r| r.batch8_decode_tps,
            ),
            Row {
                key: "batch8_lora_decode_tps",
                metric: format!("decode, {STREAMS} streams on {STREAMS} rank-{ADAPTER_RANK} adapters (aggregate)"),
                unit: "tokens/s",
                better: Better::Higher,
                tunegate: med_e(e, |r| r.batch8_lora_decode_tps),
                peer: None,
                paired: None,
            },
            Row {
                key: "adapter_load_seconds",
                metric: format!("adapter load, rank {ADAPTER_RANK}, 7 projections"),
                unit: "ms",
                better: Better::Lower,
                tunegate: median(self.adapter_load_seconds.clone()),
                peer: None,
                paired: None,
            },
            Row {
                key: "peak_rss_bytes",
                metric: "peak resident memory (VmHWM)".into(),
                unit: "MiB",
                better: Better::Lower,
                tunegate: self.peak_rss_bytes.map(|b| b as f64),
                peer: peer_rss,
                paired: None,
            },
            Row {
                key: "model_file_bytes",
                metric: "model file".into(),
                unit: "MiB",
                better: Better::Lower,
                tunegate: Some(self.model_bytes as f64),
                peer: Some(self.model_bytes as f64),
                paired: None,
            },
        ]
    }

    /// Writes both files and returns the Markdown.
    pub fn write(&self, dir: &Path) -> Result<String> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let rows = self.rows();
        let commit = shell("git", &["-C", &self.settings.root.to_string_lossy(), "rev-parse", "--short", "HEAD"]);
        let dirty = !shell("git", &["-C", &self.settings.root.to_string_lossy(), "status", "--porcelain", "--untracked-files=no"]).is_empty();
        let commit = if dirty { format!("{commit} (with uncommitted changes)") } else { commit };
        let cpu = cpu_model();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let date = date_utc();
        let md = self.markdown(&rows, &commit, &cpu, cores, &date);
        std::fs::write(dir.join("engine.md"), &md)?;
        let json = self.json(&rows, &commit, &cpu, cores, &date);
        std::fs::write(dir.join("engine.json"), serde_json::to_string_pretty(&json)? + "\n")?;
        Ok(md)
    }

    fn markdown(&self, rows: &[Row], commit: &str, cpu: &str, cores: usize, date: &str) -> String {
        let s = self.settings;
        let mut md = String::new();
        let _ = writeln!(md, "# Engine benchmark\n");
        let _ = writeln!(md, "Written by `cargo bench --bench engine` (see `benches/README.md`); do not edit by hand.\n");
        let _ = writeln!(md, "- commit: `{commit}`");
        let _ = writeln!(md, "- date: {date}");
        let _ = writeln!(md, "- machine: {cpu}, {cores} cores; load average {} at start, {} at end", self.load_start, self.load_end);
        let model = s.model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let _ = writeln!(md, "- model: `{model}` ({:.1} MiB), {} threads for both engines", self.model_bytes as f64 / 1048576.0, s.threads);
        let _ = writeln!(
            md,
            "- KV cache: tunegate {} ({}), llama.cpp f16 (its default)",
            if s.kv_type == tunegate::engine::model::KvType::F16 { "f16" } else { "f32" },
            if s.kv_type == tunegate::engine::model::KvType::F16 { "the default" } else { "`TUNEGATE_BENCH_KV=f32`, not the default" }
        );
        let _ = writeln!(
            md,
            "- rounds: {} (each figure is the median over rounds; in each half of a round tunegate and llama.cpp run back to back; the last column is the median of each round's own ratio, the verdicts below use the ratio of the medians){}",
            self.engine_rounds.len(),
            if self.stopped_early { "; stopped early by the time budget" } else { "" }
        );
        match self.peer {
            Some(p) => {
                let _ = writeln!(md, "- peer: llama.cpp `llama-bench` / `llama-batched-bench` built from `{}` ({})", p.source, p.version);
            }
            None => {
                let _ = writeln!(md, "- peer: not run (see the bench's stderr)");
            }
        }
        let busy: Vec<String> = self
            .engine_rounds
            .iter()
            .map(|r| {
                let f = |b: Option<f64>| b.map(|b| format!("{:.0}%", b * 100.0)).unwrap_or_else(|| "n/a".into());
                format!("{} / {}", f(r.other_cpu_busy), f(r.other_cpu_busy_batched))
            })
            .collect();
        let _ = writeln!(md, "- CPU busy with other work just before each round's single-stream / 8-stream half: {}", if busy.is_empty() { "n/a".into() } else { busy.join(", ") });
        let _ = writeln!(md, "- whole run: {:.0} s; engine load {:.2} s\n", self.wall_seconds, self.engine_load_seconds);
        let worst = self
            .engine_rounds
            .iter()
            .flat_map(|r| [r.other_cpu_busy, r.other_cpu_busy_batched])
            .flatten()
            .fold(0.0, f64::max);
        let busy_run = worst > 0.25;
        if busy_run {
            let _ = writeln!(
                md,
                "**Other work kept the cores busy during this run, so absolute figures are well below a quiet \
                 machine's, decode most of all (both engines synchronise their 2 threads many times per token). \
                 Each tunegate measurement ran right before the matching llama.cpp one, but the load changes \
                 from second to second, so even the ratios are rough; the verdicts below are marked as such.**\n"
            );
        }

        let _ = writeln!(md, "| metric | tunegate | llama.cpp | ratio (tunegate / llama.cpp) | median of per-round ratios |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for r in rows {
            let better = match r.better {
                Better::Higher => "higher is better",
                Better::Lower => "lower is better",
            };
            let x = |v: Option<f64>| v.map(|x| format!("{x:.2}×")).unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                md,
                "| {} ({}, {}) | {} | {} | {} | {} |",
                r.metric,
                r.unit,
                better,
                fmt(r.tunegate, r.unit),
                fmt(r.peer, r.unit),
                x(ratio(r.tunegate, r.peer)),
                x(r.paired)
            );
        }

        let get = |key: &str| rows.iter().find(|r| r.key == key);
        let _ = writeln!(md, "\n## Targets (issue 7)\n");
        if busy_run {
            let _ = writeln!(md, "Measured on a busy machine: verdicts in parentheses are not evidence either way.\n");
        }
        let verdict = |ok: bool| match (ok, busy_run) {
            (true, false) => "yes",
            (false, false) => "no",
            (true, true) => "(yes)",
            (false, true) => "(no)",
        };
        let _ = writeln!(md, "| target | measured | met |");
        let _ = writeln!(md, "|---|---:|:---:|");
        let target = |md: &mut String, name: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool| {
            let (v, met) = match value {
                Some(x) => (format!("{x:.2}×"), verdict(ok(x))),
                None => ("n/a".into(), "n/a"),
            };
            let _ = writeln!(md, "| {name} | {v} | {met} |");
        };
        let pair = |key: &str| get(key).and_then(|r| ratio(r.tunegate, r.peer));
        target(&mut md, "single-stream decode ≥ 0.8× llama.cpp", pair("decode_128_tps"), &|x| x >= 0.8);
        target(&mut md, "prefill, 128-token prompt ≥ 0.8× llama.cpp", pair("prefill_128_tps"), &|x| x >= 0.8);
        target(&mut md, "first token, 1,000-token prompt ≤ 1.25× llama.cpp's prefill time", pair("ttft_1000_seconds"), &|x| x <= 1.25);
        let own = |a: &str, b: &str| ratio(get(a).and_then(|r| r.tunegate), get(b).and_then(|r| r.tunegate));
        target(&mut md, "8 streams, aggregate decode ≥ 2× single-stream decode", own("batch8_base_decode_tps", "decode_128_tps"), &|x| x >= 2.0);
        target(&mut md, "8 streams on 8 adapters ≥ 0.8× 8 base streams", own("batch8_lora_decode_tps", "batch8_base_decode_tps"), &|x| x >= 0.8);
        let load = get("adapter_load_seconds").and_then(|r| r.tunegate);
        let _ = writeln!(
            md,
            "| adapter load < 100 ms | {} ms | {} |",
            fmt(load, "ms"),
            match load {
                Some(x) => verdict(x < 0.1),
                None => "n/a",
            }
        );
        let hs = &self.hot_swap;
        let steps = if hs.median_step_seconds > 0.0 { hs.worst_extra_delay_seconds / hs.median_step_seconds } else { f64::NAN };
        let _ = writeln!(
            md,
            "| hot swap during {STREAMS} streams: extra delay of any stream ≤ 1 step | {:.1} ms extra ({steps:.2} steps of {:.1} ms) | {} |",
            hs.worst_extra_delay_seconds * 1e3,
            hs.median_step_seconds * 1e3,
            verdict(steps <= 1.0)
        );
        let _ = writeln!(md, "| adapter load during {STREAMS} streams < 100 ms | {:.1} ms | {} |", hs.load_seconds * 1e3, verdict(hs.load_seconds < 0.1));
        match &self.long {
            Some(l) => {
                let base = self.model_bytes + l.kv_bytes;
                let r = l.peak_rss as f64 / base as f64;
                let _ = writeln!(
                    md,
                    "| resident memory, {} streams of {} tokens ≤ 1.5× (model file + KV cache) | {:.0} MiB / ({:.0} + {:.0} MiB) = {r:.2}× | {} |",
                    l.streams,
                    l.positions,
                    l.peak_rss as f64 / 1048576.0,
                    self.model_bytes as f64 / 1048576.0,
                    l.kv_bytes as f64 / 1048576.0,
                    verdict(r <= 1.5)
                );
            }
            None => {
                let _ = writeln!(md, "| resident memory, 8 streams of 2,048 tokens ≤ 1.5× (model file + KV cache) | not run | n/a |");
            }
        }
        match &self.soak {
            Some(k) => {
                let growth = k.rss_end as f64 - k.rss_after_warmup as f64;
                let _ = writeln!(
                    md,
                    "| no allocation growth over a {:.0}-minute run (resident memory, after minute 1 → end) | {:.1} → {:.1} MiB ({:+.1} MiB over {} batches, {} tokens) | {} |",
                    k.seconds / 60.0,
                    k.rss_after_warmup as f64 / 1048576.0,
                    k.rss_end as f64 / 1048576.0,
                    growth / 1048576.0,
                    k.batches,
                    k.tokens,
                    verdict(growth < 4.0 * 1048576.0)
                );
            }
            None => {
                let _ = writeln!(md, "| no allocation growth over a 10-minute run | not run (`TUNEGATE_BENCH_SOAK_S=600`) | n/a |");
            }
        }
        // The decode target is 1.1× on the default model, 1.0× on another file (the
        // Gemma 3 Q4_K_M one); its prefill targets are the default model's.
        let default_model = s.model.file_name().is_some_and(|n| n == tunegate::config::DEFAULT_MODEL_FILE);
        let (d, of) = if default_model { (1.1, "") } else { (1.0, " (the default model's target)") };
        let _ = writeln!(md, "\n## Targets (issue 19: decode at depth, f16 KV cache)\n");
        let _ = writeln!(md, "| target | measured | met |");
        let _ = writeln!(md, "|---|---:|:---:|");
        target(&mut md, &format!("decode ≥ {d:.1}× llama.cpp from an empty context"), pair("decode_128_tps"), &|x| x >= d);
        target(&mut md, &format!("decode ≥ {d:.1}× llama.cpp behind {} tokens", crate::DEPTHS[0]), pair("decode_d512_tps"), &|x| x >= d);
        target(&mut md, &format!("decode ≥ {d:.1}× llama.cpp behind {} tokens", crate::DEPTHS[1]), pair("decode_d2048_tps"), &|x| x >= d);
        target(&mut md, &format!("prefill, 128-token prompt ≥ 1.5× llama.cpp{of}"), pair("prefill_128_tps"), &|x| x >= 1.5);
        // A shorter time is better: llama.cpp's time over ours is the speed ratio.
        target(&mut md, &format!("prefill, 1,000-token prompt ≥ 1.2× llama.cpp (speed){of}"), pair("ttft_1000_seconds").map(|x| 1.0 / x), &|x| x >= 1.2);
        let same_kv = self.settings.kv_type == tunegate::engine::model::KvType::F16;
        match (&self.long, self.peer_long_peak_rss) {
            (Some(l), Some(peer)) if same_kv => {
                let r = l.peak_rss as f64 / peer as f64;
                let _ = writeln!(
                    md,
                    "| peak memory, {} streams of {} positions, f16 KV cache on both sides, ≤ 1.2× llama.cpp | {:.0} MiB / {:.0} MiB = {r:.2}× | {} |",
                    l.streams,
                    l.positions,
                    l.peak_rss as f64 / 1048576.0,
                    peer as f64 / 1048576.0,
                    verdict(r <= 1.2)
                );
            }
            _ => {
                let _ = writeln!(md, "| peak memory at equal KV cache type and size ≤ 1.2× llama.cpp | not run (needs the peer, the memory run and the f16 cache) | n/a |");
            }
        }
        let errors: Vec<&String> = self.peer_rounds.iter().flat_map(|r| &r.errors).collect();
        let skipped = self.engine_rounds.iter().any(|r| {
            [r.prefill_128_tps, r.prefill_1000_seconds, r.decode_128_tps, r.batch8_base_decode_tps, r.batch8_lora_decode_tps]
                .iter()
                .any(Option::is_none)
        });
        if !errors.is_empty() || skipped {
            let _ = writeln!(md, "\n## Gaps in this run\n");
            if skipped {
                let _ = writeln!(md, "- some tunegate measurements were skipped: the time budget ran out (see `engine.json`)");
            }
            for e in errors {
                let _ = writeln!(md, "- llama.cpp: {e}");
            }
        }

        let _ = writeln!(md, "\n## How each figure is taken\n");
        let _ = writeln!(md, "- Prompts are random in-vocabulary token ids (as llama-bench uses); greedy; EOS ignored.");
        let _ = writeln!(md, "- Prefill: 128-token prompt, `max_tokens` 1; 128 / time to first token (measured by the engine from submission, so it includes queueing and sampling one token). Peer: llama-bench `pp128`.");
        let _ = writeln!(md, "- First token of a 1,000-token prompt: the same with 1,000 tokens. Peer: llama-bench `pp1000` time.");
        let _ = writeln!(md, "- Single-stream decode: 1-token prompt, 128 generated; (128 − 1) / (total − time to first token). Peer: llama-bench `tg128`.");
        let _ = writeln!(md, "- {STREAMS} streams: {STREAMS} requests of 128 prompt + 128 generated tokens submitted at once; tokens arriving after the latest stream's first token, divided by the time from then to the last token. Peer: `llama-batched-bench -npp 128 -ntg 128 -npl 8` `speed_tg` (prompts all prefilled first). llama-bench has no per-sequence adapters, so the adapter row has no peer.");
        let _ = writeln!(md, "- Adapter load: {} loads of a random rank-{ADAPTER_RANK} PEFT adapter on all 7 projections ({:.1} MiB), wall time of `registry.load`, median.", self.adapter_load_seconds.len(), self.adapter_bytes as f64 / 1048576.0);
        let _ = writeln!(md, "- Hot swap: {STREAMS} streams (32-token prompts, 160 generated) on the {STREAMS} adapters; once each has 16 tokens, a new generation of the first stream's alias is loaded from disk on the bench thread while the engine keeps stepping (running leases keep their generation). Extra delay: for each stream, its longest token gap overlapping the load minus its median gap.");
        let _ = writeln!(md, "- Long streams: before any adapter is loaded, {STREAMS} base-model requests of 1,024 prompt + 1,024 generated tokens at once; peak VmRSS sampled every 50 ms against the model file plus the f32 KV cache of 8 × 2,048 positions.");
        let _ = writeln!(md, "- Soak (when run): batches of {STREAMS} streams (128 + 128 tokens, every other stream on an adapter) back to back; VmRSS after each batch. Growth of under 4 MiB from the end of minute 1 to the end counts as none.");
        let _ = writeln!(md, "- Memory: VmHWM of the bench process after all rounds (model, {STREAMS} loaded adapters of {:.1} MiB each, KV caches); peer: highest VmHWM sampled every 20 ms on its processes.", self.adapter_bytes as f64 / 1048576.0);
        md
    }

    fn json(&self, rows: &[Row], commit: &str, cpu: &str, cores: usize, date: &str) -> serde_json::Value {
        let s = self.settings;
        let metrics: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| {
                (
                    r.key.to_string(),
                    serde_json::json!({
                        "metric": r.metric,
                        "unit": match r.unit { "ms" => "seconds", "MiB" => "bytes", u => u },
                        "higher_is_better": matches!(r.better, Better::Higher),
                        "tunegate": r.tunegate,
                        "llama_cpp": r.peer,
                        "ratio": ratio(r.tunegate, r.peer),
                        "median_per_round_ratio": r.paired,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "commit": commit,
            "date": date,
            "machine": { "cpu": cpu, "cores": cores, "load_start": self.load_start, "load_end": self.load_end },
            "model": { "path": s.model, "bytes": self.model_bytes },
            "threads": s.threads,
            "rounds": self.engine_rounds.len(),
            "stopped_early": self.stopped_early,
            "wall_seconds": self.wall_seconds,
            "engine_load_seconds": self.engine_load_seconds,
            "peer": self.peer.map(|p| serde_json::json!({ "source": p.source, "version": p.version })),
            "kv_cache": if s.kv_type == tunegate::engine::model::KvType::F16 { "f16" } else { "f32" },
            "long_peak_rss_bytes": { "tunegate": self.long.as_ref().map(|l| l.peak_rss), "llama_cpp": self.peer_long_peak_rss },
            "metrics": metrics,
            "samples": {
                "tunegate": self.engine_rounds,
                "llama_cpp": self.peer_rounds,
                "adapter_load_seconds": self.adapter_load_seconds,
                "adapter_bytes": self.adapter_bytes,
                "hot_swap": self.hot_swap,
                "long_streams": self.long,
                "soak": self.soak,
            },
        })
    }
}
