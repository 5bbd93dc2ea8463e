//! Gateway load run: `cargo bench --bench gateway`.
//!
//! Starts the gateway in-process on loopback and sends `POST /v1/chat/completions` with
//! `max_tokens: 1` from a small tokio/reqwest client, bounded by a request count. Reports
//! requests/s and p50/p99 latency at several concurrencies, and the gateway's own added
//! latency: the same requests submitted straight to the engine (no HTTP, no JSON), compared
//! percentile by percentile with the sequential HTTP run. Uses the tiny random test model, so
//! the engine's share is small and the gateway's is visible; with `--real` it uses the default
//! model in models/. Writes `benches/results/gateway.md`.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tunegate::gateway::start_server;
use tunegate::config::{Config, DEFAULT_MODEL_FILE};
use tunegate::engine::{ChatMessage, GenerateRequest, Prompt, SamplingParams};

const SEQUENTIAL: usize = 400;
const CONCURRENT: usize = 2000;

fn main() -> anyhow::Result<()> {
    let real = std::env::args().any(|a| a == "--real");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(real))
}

struct Stats {
    label: String,
    requests: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Stats {
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
    }

    fn row(&self) -> String {
        format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} |",
            self.label,
            self.requests,
            self.requests as f64 / self.seconds,
            ms(self.pct(0.5)),
            ms(self.pct(0.99))
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(real: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (model, name) = if real {
        (root.join("models").join(DEFAULT_MODEL_FILE), "smollm2-135m-instruct")
    } else {
        (tunegate::testing::write_tiny_llama_gguf(dir.path())?, "tiny")
    };
    anyhow::ensure!(model.exists(), "{} is missing: run `tunegate model fetch`", model.display());
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 2\n[model]\npath = \"{}\"\nname = \"{name}\"\nthreads = 2\n\
         fetch_if_missing = false\n[adapters]\nwatch = false\nroot = \"{}\"\n[limits]\nmax_concurrent_requests_per_key = 0\n\
         [engine]\nmax_queue = 4096\n",
        model.display(),
        dir.path().join("adapters").display()
    );
    let config = Config::parse(&text, "bench config", Vec::new())?;
    let gw = start_server(config).await?;
    gw.wait_ready(Duration::from_secs(120)).await?;
    let url = gw.url("/v1/chat/completions");
    let body = json!({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0});

    // The engine alone: same prompt, same sampling, no HTTP.
    let info = gw.engine.info()?;
    let prompt = info.render_chat(&[ChatMessage::new("user", "Hi")])?;
    let params = SamplingParams { max_tokens: 1, temperature: 0.0, ..SamplingParams::default() };
    let mut direct = Vec::with_capacity(SEQUENTIAL);
    let start = Instant::now();
    for _ in 0..SEQUENTIAL {
        let t = Instant::now();
        let req = GenerateRequest::new(Prompt::Text(prompt.clone()), params.clone());
        gw.engine.submit(req)?.collect().await?;
        direct.push(t.elapsed());
    }
    let direct =
        Stats { label: "engine only (no HTTP)".into(), requests: SEQUENTIAL, seconds: start.elapsed().as_secs_f64(), latencies: direct };

    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    // Warm the connection pool.
    for _ in 0..20 {
        client.post(&url).json(&body).send().await?.error_for_status()?;
    }
    let mut runs = Vec::new();
    for concurrency in [1usize, 4, 16] {
        let n = if concurrency == 1 { SEQUENTIAL } else { CONCURRENT };
        runs.push(load(&client, &url, &body, concurrency, n).await?);
    }
    gw.stop(true).await;

    let seq = &runs[0];
    let overhead = |p: f64| ms(seq.pct(p)) - ms(direct.pct(p));
    let mut md = String::new();
    md.push_str("# Gateway load run\n\n");
    md.push_str(&format!(
        "`cargo bench --bench gateway{}`: `POST /v1/chat/completions` with `max_tokens: 1` on loopback, \
         model `{name}` ({}), 2 HTTP workers, engine threads 2, {} CPU cores, release build.\n\n",
        if real { " -- --real" } else { "" },
        if real { "the default SmolLM2-135M-Instruct Q4_1" } else { "the tiny random test model, so the gateway's share shows" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    ));
    md.push_str("| run | requests | requests/s | p50 ms | p99 ms |\n|---|---|---|---|---|\n");
    md.push_str(&direct.row());
    md.push('\n');
    for r in &runs {
        md.push_str(&r.row());
        md.push('\n');
    }
    md.push_str(&format!(
        "\nGateway overhead (sequential HTTP minus engine only, same percentile): p50 {:.3} ms, p99 {:.3} ms. \
         This includes the client's own HTTP work on the same 2 cores; the `tunegate_gateway_overhead_seconds` \
         histogram (metrics, a later issue) will measure it inside the server.\n",
        overhead(0.5),
        overhead(0.99)
    ));
    print!("{md}");
    let out = root.join("benches/results");
    std::fs::create_dir_all(&out)?;
    let file = out.join(if real { "gateway-real.md" } else { "gateway.md" });
    std::fs::write(&file, md).with_context(|| format!("writing {}", file.display()))?;
    eprintln!("wrote {}", file.display());
    Ok(())
}

async fn load(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    concurrency: usize,
    requests: usize,
) -> anyhow::Result<Stats> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body, next) = (client.clone(), url.to_string(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                let t = Instant::now();
                let res = client.post(&url).json(&body).send().await?;
                anyhow::ensure!(res.status().is_success(), "status {}", res.status());
                res.bytes().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Stats {
        label: format!("HTTP, concurrency {concurrency}"),
        requests,
        seconds: start.elapsed().as_secs_f64(),
        latencies,
    })
}
