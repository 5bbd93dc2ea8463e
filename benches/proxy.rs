//! Proxy overhead: `cargo bench --bench proxy`. What the gateway adds in front of an upstream
//! engine (issue 20's target: p99 added latency ≤ 1 ms at 1,000 requests/s on loopback).
//!
//! The upstream is a fixed-response OpenAI-shaped server in this process (an actix server on
//! its own thread answering every chat completion at once with the same body): the load
//! generator's target, so that only the gateway's work is measured. The gateway runs its
//! defaults (durable SQLite logging included) with one `[[upstreams]]` entry pointing at it.
//! The same load goes to the upstream directly and through the gateway, in alternating
//! rounds: sequential requests, and an open-loop run at a fixed rate (each request starts on
//! schedule whatever the answers' pace; latency counts from the scheduled start, so queueing
//! shows). Added latency = gateway percentile − direct percentile, same round kind. A second
//! gateway with `[logs] enabled = false` shows logging's share (a setting, said so in the
//! report). Environment: `TUNEGATE_BENCH_RATE` (1000), `TUNEGATE_BENCH_SECONDS` (5 per
//! open-loop round), `TUNEGATE_BENCH_ROUNDS` (2). Writes `benches/results/proxy.md`.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tunegate::config::Config;
use tunegate::gateway::start_server;

const SEQUENTIAL: usize = 1000;

const CANNED: &str = r#"{"id":"chatcmpl-fixed","object":"chat.completion","created":1700000000,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"A fixed answer from the benchmark's upstream."},"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}"#;

fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

/// The fixed-response upstream on its own thread and actix system; its port.
fn fixed_upstream() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        let run = actix_web::rt::System::new().block_on(async move {
            use actix_web::{web, App, HttpResponse, HttpServer};
            HttpServer::new(|| {
                App::new()
                    .route("/v1/chat/completions", web::post().to(|| async { HttpResponse::Ok().content_type("application/json").body(CANNED) }))
                    .route(
                        "/v1/models",
                        web::get().to(|| async { HttpResponse::Ok().json(json!({"object": "list", "data": [{"id": "m", "object": "model"}]})) }),
                    )
            })
            .workers(1)
            .listen(listener)?
            .run()
            .await
        });
        if let Err(e) = run {
            eprintln!("fixed upstream stopped: {e}");
        }
    });
    Ok(port)
}

struct Stats {
    label: String,
    latencies: Vec<Duration>,
    seconds: f64,
    errors: usize,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.latencies.clone();
        v.sort();
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default().as_secs_f64() * 1e3
    }

    fn row(&self) -> String {
        format!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} |",
            self.label,
            self.latencies.len(),
            self.latencies.len() as f64 / self.seconds,
            self.pct(0.5),
            self.pct(0.99),
            self.pct(0.999),
            self.errors
        )
    }
}

async fn sequential(client: &reqwest::Client, url: &str, body: &serde_json::Value, label: &str) -> anyhow::Result<Stats> {
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    let start = Instant::now();
    for _ in 0..SEQUENTIAL {
        let t = Instant::now();
        let res = client.post(url).json(body).send().await?;
        anyhow::ensure!(res.status().is_success(), "{label}: status {}", res.status());
        res.bytes().await?;
        latencies.push(t.elapsed());
    }
    Ok(Stats { label: format!("{label}, sequential"), latencies, seconds: start.elapsed().as_secs_f64(), errors: 0 })
}

async fn open_loop(client: &reqwest::Client, url: &str, body: &serde_json::Value, rate: usize, seconds: usize, label: &str) -> anyhow::Result<Stats> {
    let n = rate * seconds;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let ok = match client.post(&url).json(&body).send().await {
                Ok(res) => res.status().is_success() && res.bytes().await.is_ok(),
                Err(_) => false,
            };
            (ok, due.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(n);
    let mut errors = 0;
    for t in tasks {
        let (ok, lat) = t.await?;
        if ok {
            latencies.push(lat);
        } else {
            errors += 1;
        }
    }
    Ok(Stats { label: format!("{label}, {rate} requests/s open loop"), latencies, seconds: start.elapsed().as_secs_f64(), errors })
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run())
}

async fn gateway(port: u16, dir: &std::path::Path, logs: bool) -> anyhow::Result<tunegate::gateway::Gateway> {
    let model = tunegate::testing::write_tiny_llama_gguf(dir)?;
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\n[model]\npath = \"{model}\"\nname = \"tiny\"\nfetch_if_missing = false\n\
         [adapters]\nroot = \"{adapters}\"\n[logs]\nenabled = {logs}\n\
         [[upstreams]]\nname = \"fixed\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodels = [\"m\"]\n",
        data = dir.join("data").display(),
        model = model.display(),
        adapters = dir.join("adapters").display(),
    );
    let gw = start_server(Config::parse(&text, "bench config", Vec::new())?).await?;
    gw.wait_ready(Duration::from_secs(60)).await?;
    Ok(gw)
}

async fn run() -> anyhow::Result<()> {
    let rate = env_usize("TUNEGATE_BENCH_RATE", 1000)?;
    let seconds = env_usize("TUNEGATE_BENCH_SECONDS", 5)?;
    let rounds = env_usize("TUNEGATE_BENCH_ROUNDS", 2)?;
    let port = fixed_upstream()?;
    let (dir, dir_nolog) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let gw = gateway(port, dir.path(), true).await?;
    let gw_nolog = gateway(port, dir_nolog.path(), false).await?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let direct_url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16});
    let via_body = json!({"model": "fixed/m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "metadata": {"task": "bench"}});
    let targets = [
        ("direct", direct_url.clone(), body.clone()),
        ("gateway", gw.url("/v1/chat/completions"), via_body.clone()),
        ("gateway, logs off", gw_nolog.url("/v1/chat/completions"), via_body.clone()),
    ];
    for (_, url, b) in &targets {
        for _ in 0..200 {
            client.post(url).json(b).send().await?.error_for_status()?;
        }
    }
    let mut results: Vec<Vec<Stats>> = Vec::new();
    for round in 0..rounds {
        let mut r = Vec::new();
        for (label, url, b) in &targets {
            r.push(sequential(&client, url, b, label).await?);
        }
        for (label, url, b) in &targets {
            r.push(open_loop(&client, url, b, rate, seconds, label).await?);
        }
        eprintln!("round {} done", round + 1);
        results.push(r);
    }
    gw.stop(true).await;
    gw_nolog.stop(true).await;

    let mut md = String::new();
    md.push_str("# Proxy overhead\n\n");
    md.push_str(&format!(
        "`cargo bench --bench proxy`, release build, {} CPU cores, everything on loopback in one process: a fixed-response \
         upstream (actix, 1 worker), the gateway with its defaults (durable SQLite logging) and one `[[upstreams]]` entry, \
         and the load generator (tokio, 2 threads); a second gateway with `[logs] enabled = false` for logging's share. \
         Non-streamed chat completions. Latency in ms; open-loop latency counts from each request's scheduled start.\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    for (i, r) in results.iter().enumerate() {
        md.push_str(&format!("## Round {}\n\n| run | requests | requests/s | p50 | p99 | p99.9 | errors |\n|---|---:|---:|---:|---:|---:|---:|\n", i + 1));
        for s in r {
            md.push_str(&s.row());
            md.push('\n');
        }
        let added = |a: usize, b: usize, p: f64| r[a].pct(p) - r[b].pct(p);
        md.push_str(&format!(
            "\nAdded by the gateway: sequential p50 {:.3} / p99 {:.3} ms; at {rate} requests/s p50 {:.3} / p99 {:.3} ms \
             (logs off: p50 {:.3} / p99 {:.3} ms).\n\n",
            added(1, 0, 0.5),
            added(1, 0, 0.99),
            added(4, 3, 0.5),
            added(4, 3, 0.99),
            added(5, 3, 0.5),
            added(5, 3, 0.99),
        ));
    }
    print!("{md}");
    let out = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results/proxy.md");
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
