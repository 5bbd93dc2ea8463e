//! Logging cost: `cargo bench --bench logging [-- --real]`.
//!
//! The same chat-completion load against the gateway with request logging off, on with the
//! embedded SQLite store, and on with Redis (a `redis-server` it starts on a free loopback
//! port), each with durable commits (the default: a response ends only once its record is
//! committed) and, for comparison, without. Configurations are measured in interleaved
//! rounds and reported as medians, with the ratio to logging-off throughput (target ≥ 0.95).
//! The tiny random model makes each request cost a few hundred microseconds, so logging's
//! share is at its largest; `--real` uses the default SmolLM2 model with 8 new tokens.
//! Writes `benches/results/logging.md`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tunegate::gateway::start_server;
use tunegate::config::{Config, DEFAULT_MODEL_FILE};

const ROUNDS: usize = 3;
const CONCURRENCY: usize = 16;

fn main() -> anyhow::Result<()> {
    let real = std::env::args().any(|a| a == "--real");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(real))
}

/// A `redis-server` for the run, killed on drop.
struct Redis(Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &std::path::Path) -> anyhow::Result<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let redis = Redis(child, port);
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(redis);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("redis-server did not start")
}

#[derive(Clone, Copy)]
struct Setup {
    label: &'static str,
    logs: Option<(&'static str, bool)>,
}

const SETUPS: [Setup; 5] = [
    Setup { label: "logging off", logs: None },
    Setup { label: "SQLite, durable (default)", logs: Some(("sqlite", true)) },
    Setup { label: "SQLite, batched only", logs: Some(("sqlite", false)) },
    Setup { label: "Redis, durable", logs: Some(("redis", true)) },
    Setup { label: "Redis, batched only", logs: Some(("redis", false)) },
];

async fn run(real: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (model, name, max_tokens, requests) = if real {
        (root.join("models").join(DEFAULT_MODEL_FILE), "smollm2-135m-instruct", 8, 400)
    } else {
        (tunegate::testing::write_tiny_llama_gguf(dir.path())?, "tiny", 4, 1500)
    };
    anyhow::ensure!(model.exists(), "{} is missing: run `tunegate model fetch`", model.display());
    let redis = start_redis(dir.path())?;
    let body = json!({
        "model": name,
        "messages": [{"role": "system", "content": "You label support tickets as billing, bug or other."},
                     {"role": "user", "content": "I was charged twice this month."}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "metadata": {"task": "bench"},
    });
    let load_before = loadavg();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    for round in 0..ROUNDS {
        for (i, s) in SETUPS.iter().enumerate() {
            let data = dir.path().join(format!("data-{round}-{i}"));
            let rps = measure(&model, name, &data, redis.1, *s, &body, requests).await?;
            eprintln!("round {round}: {:<28} {rps:.1} requests/s", s.label);
            results[i].push(rps);
        }
    }
    drop(redis);

    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let off = median(&results[0]);
    let mut md = String::from("# Logging cost\n\n");
    md.push_str(&format!(
        "`cargo bench --bench logging{}`: {requests} `POST /v1/chat/completions` per run at concurrency {CONCURRENCY} \
         on loopback, `max_tokens: {max_tokens}`, model `{name}`, {} CPU cores; {ROUNDS} interleaved rounds, medians. \
         Commit `{}`.\n\n",
        if real { " -- --real" } else { "" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        option_env!("TUNEGATE_COMMIT").unwrap_or("see git log"),
    ));
    md.push_str(&format!(
        "Build profile: {}. Load average (1 min) before / after: {load_before} / {} (the run itself keeps \
         both cores busy; a high figure before it means the machine was shared).\n\n",
        if cfg!(debug_assertions) { "dev (dependencies at opt-level 3, tunegate at 1)" } else { "release" },
        loadavg()
    ));
    md.push_str("| logging | requests/s (median) | rounds | ratio to off | target ≥ 0.95 |\n|---|---|---|---|---|\n");
    for (s, r) in SETUPS.iter().zip(&results) {
        let m = median(r);
        let rounds: Vec<String> = r.iter().map(|x| format!("{x:.1}")).collect();
        let ratio = m / off;
        let verdict = if s.logs.is_none() { "-" } else if ratio >= 0.95 { "met" } else { "missed" };
        md.push_str(&format!("| {} | {m:.1} | {} | {ratio:.3} | {verdict} |\n", s.label, rounds.join(", ")));
    }
    print!("{md}");
    let out = root.join("benches/results");
    std::fs::create_dir_all(&out)?;
    let file = out.join(if real { "logging-real.md" } else { "logging.md" });
    std::fs::write(&file, md).with_context(|| format!("writing {}", file.display()))?;
    eprintln!("wrote {}", file.display());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().next().unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into())
}

async fn measure(
    model: &std::path::Path,
    name: &str,
    data: &std::path::Path,
    redis_port: u16,
    setup: Setup,
    body: &serde_json::Value,
    requests: usize,
) -> anyhow::Result<f64> {
    let logs = match setup.logs {
        None => "enabled = false".to_string(),
        Some((store, durable)) => format!(
            "enabled = true\nstore = \"{store}\"\ndurable = {durable}\nredis_url = \"redis://127.0.0.1:{redis_port}/0\"\n\
             redis_prefix = \"bench:{}:\"",
            data.display()
        ),
    };
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 2\ndata_dir = \"{}\"\n[model]\npath = \"{}\"\nname = \"{name}\"\n\
         threads = 2\nfetch_if_missing = false\n[adapters]\nwatch = false\nroot = \"{}\"\n[limits]\n\
         max_concurrent_requests_per_key = 0\n[engine]\nmax_queue = 4096\n[training]\nenabled = false\n[logs]\n{logs}\n",
        data.display(),
        model.display(),
        data.join("adapters").display(),
    );
    let config = Config::parse(&text, "bench config", Vec::new())?;
    let gw = start_server(config).await?;
    gw.wait_ready(Duration::from_secs(120)).await?;
    let url = gw.url("/v1/chat/completions");
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    for _ in 0..10 {
        client.post(&url).json(body).send().await?.error_for_status()?;
    }
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, body, next) = (client.clone(), url.clone(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < requests {
                let res = client.post(&url).json(&body).send().await?;
                anyhow::ensure!(res.status().is_success(), "status {}", res.status());
                res.bytes().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rps = requests as f64 / start.elapsed().as_secs_f64();
    // Every request must have been logged (the point of the comparison).
    if let Some(logs) = &gw.state.logs {
        logs.writer.flush().await?;
        let stats = logs.store.task_stats().await?;
        let logged = stats.iter().find(|s| s.task == "bench").map_or(0, |s| s.total);
        anyhow::ensure!(logged as usize == requests + 10, "{logged} records for {} requests", requests + 10);
    }
    gw.stop(true).await;
    Ok(rps)
}
