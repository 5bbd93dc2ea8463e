//! Crash safety and the `tunegate logs` CLI, against the real binary.
//!
//! The durability rule tested: with `[logs] durable = true` (the default), a chat
//! completion whose response the client received in full (non-streamed: the body;
//! streamed: through `data: [DONE]`) is in the log store, and survives the gateway being
//! killed with SIGKILL at any moment after that.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, MODEL};

/// A `tunegate serve` child process on a fixed loopback port.
struct Child {
    proc: tokio::process::Child,
    base: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn spawn(config: &Path, port: u16, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let proc = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunegate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .context("starting tunegate")?;
    let child = Child { proc, base: format!("http://127.0.0.1:{port}") };
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("{}/ready", child.base)).send().await {
            if r.status() == StatusCode::OK {
                return Ok(child);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("tunegate did not become ready; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
}

/// Writes the tiny model and a config listening on `port`; returns the config's path.
fn setup(dir: &Path, port: u16) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir.join("adapters"))?;
    let model = tunegate::testing::write_tiny_llama_gguf(dir)?;
    let text = common::config_text(dir, &model).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = dir.join("tunegate.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn body(i: usize, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("request {i}")}],
        "max_tokens": 8 + i % 5,
        "temperature": 0,
        "stream": stream,
        "metadata": {"task": "crash"},
    })
}

/// One request; `Some(id)` when the whole response arrived.
async fn one(http: &reqwest::Client, base: &str, i: usize) -> Option<String> {
    let stream = i % 2 == 1;
    let res = http.post(format!("{base}/v1/chat/completions")).json(&body(i, stream)).send().await.ok()?;
    if res.status() != StatusCode::OK {
        return None;
    }
    let text = res.text().await.ok()?;
    if stream {
        let events = common::parse_sse(&text).ok()?;
        (events.last()? == "[DONE]").then(|| events.first()?["id"].as_str().map(str::to_string))?
    } else {
        serde_json::from_str::<Value>(&text).ok()?["id"].as_str().map(str::to_string)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_record_whose_response_was_received() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = setup(dir.path(), port)?;
    let log = dir.path().join("tunegate.log");
    let mut child = spawn(&config, port, &log).await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;

    // Waves of concurrent requests; the kill lands right after the last wave's responses,
    // while a further wave is in flight.
    let mut received = Vec::new();
    let t0 = std::time::Instant::now();
    for wave in 0..4 {
        let base = child.base.clone();
        let got = join_all((0..8).map(|k| one(&http, &base, wave * 8 + k))).await;
        received.extend(got.into_iter().flatten());
    }
    let in_flight = {
        let (http, base) = (http.clone(), child.base.clone());
        tokio::spawn(async move { join_all((100..108).map(|i| one(&http, &base, i))).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    eprintln!("killing after {:?}, {} received", t0.elapsed(), received.len());
    child.proc.start_kill()?; // SIGKILL
    child.proc.wait().await?;
    let late: Vec<String> = in_flight.await?.into_iter().flatten().collect();
    received.extend(late);
    assert!(received.len() >= 32, "only {} of the first 32 responses arrived", received.len());

    let child = spawn(&config, port, &log).await?;
    let mut missing = Vec::new();
    for id in &received {
        let res = http.get(format!("{}/admin/logs/{id}", child.base)).send().await?;
        if res.status() != StatusCode::OK {
            missing.push(id.clone());
        }
    }
    assert!(missing.is_empty(), "{} of {} received responses have no log record after SIGKILL: {missing:?}", missing.len(), received.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_cli_lists_reviews_exports_and_imports() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, out) = gw.post("/v1/chat/completions", body(i * 2, false)).await?;
        anyhow::ensure!(status == StatusCode::OK, "{out}");
        ids.push(out["id"].as_str().unwrap_or_default().to_string());
    }
    // The CLI reads the same config (the SQLite file beside the running gateway's).
    let model = gw.dir.path().join("tiny-llama.gguf");
    let text = common::config_text(gw.dir.path(), &model);
    let config = gw.dir.path().join("cli.toml");
    std::fs::write(&config, text)?;
    let cli = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunegate"))
            .arg("logs")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()?;
        Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8_lossy(&out.stderr).into_owned()))
    };

    let (ok, listing, err) = cli(&["list", "--task", "crash"])?;
    assert!(ok, "{err}");
    for id in &ids {
        assert!(listing.contains(id.as_str()), "{listing}");
    }
    assert!(listing.contains("pending"), "{listing}");
    let (ok, shown, err) = cli(&["show", &ids[0]])?;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&shown)?["id"], ids[0].as_str());

    let (ok, _, err) = cli(&["approve", &ids[0], "--correct", "fixed answer"])?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["approve", &ids[1]])?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["reject", &ids[2]])?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["approve", "chatcmpl-missing"])?;
    assert!(!ok && err.contains("not found"), "{err}");
    // The gateway sees the CLI's reviews.
    let (_, r) = gw.get(&format!("/admin/logs/{}", ids[0])).await?;
    assert_eq!(r["review"]["corrected_response"], "fixed answer");
    let (_, r) = gw.get(&format!("/admin/logs/{}", ids[2])).await?;
    assert_eq!(r["review"]["state"], "rejected");

    // Export → import into another task → export: identical lines.
    let (ok, exported, err) = cli(&["export", "--task", "crash", "--state", "approved"])?;
    assert!(ok, "{err}");
    assert_eq!(exported.lines().count(), 2, "{exported}");
    assert!(exported.lines().next().is_some_and(|l| l.contains("fixed answer")), "{exported}");
    let file = gw.dir.path().join("export.jsonl");
    std::fs::write(&file, &exported)?;
    let file = file.to_string_lossy().into_owned();
    let (ok, _, err) = cli(&["import", &file, "--task", "copy"])?;
    assert!(ok, "{err}");
    let (ok, again, err) = cli(&["export", "--task", "copy"])?;
    assert!(ok, "{err}");
    assert_eq!(again, exported);
    let bad = gw.dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": []}\nnot json\n")?;
    let (ok, _, err) = cli(&["import", &bad.to_string_lossy(), "--task", "copy"])?;
    assert!(!ok && err.contains("line"), "{err}");
    gw.handle.stop(true).await;
    Ok(())
}

/// The alias's served path, from the adapter admin list.
async fn served_path(gw: &common::Gateway, alias: &str) -> anyhow::Result<String> {
    let (_, list) = gw.get("/v1/lora_adapters").await?;
    let a = list["data"].as_array().into_iter().flatten().find(|a| a["alias"] == alias);
    Ok(a.and_then(|a| a["path"].as_str()).unwrap_or_default().to_string())
}

async fn wait_served(gw: &common::Gateway, alias: &str, suffix: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if served_path(gw, alias).await?.ends_with(suffix) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("'{alias}' does not serve {suffix}: {}", served_path(gw, alias).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_cli_promotes_and_rolls_back_without_restart() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let shape = gw.shape()?;
    let root = gw.adapters_root();
    for (v, seed) in [("v1", 1), ("v2", 2)] {
        let tmp = root.join(format!(".tmp-{v}"));
        std::fs::create_dir_all(&tmp)?;
        tunegate::testing::write_random_adapter(&tmp, &shape, 4, seed)?;
        std::fs::create_dir_all(root.join("pinned"))?;
        std::fs::rename(&tmp, root.join("pinned").join(v))?;
    }
    wait_served(&gw, "pinned", "pinned/v2").await?;
    let config = gw.dir.path().join("cli.toml");
    std::fs::write(&config, common::config_text(gw.dir.path(), &gw.dir.path().join("tiny-llama.gguf")))?;
    let cli = |args: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunegate"))
            .arg("adapters")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    };
    let (ok, out) = cli(&["rollback", "pinned"])?;
    assert!(ok, "{out}");
    wait_served(&gw, "pinned", "pinned/v1").await?;
    let (ok, out) = cli(&["rollback", "pinned"])?;
    assert!(!ok && out.contains("oldest"), "{out}");
    let (ok, out) = cli(&["promote", "pinned", "v9"])?;
    assert!(!ok && out.contains("no version"), "{out}");
    let (ok, out) = cli(&["list"])?;
    assert!(ok && out.contains("* pinned\tv1"), "{out}");
    // A new version does not replace the pinned one; it loads beside it.
    let tmp = root.join(".tmp-v3");
    std::fs::create_dir_all(&tmp)?;
    tunegate::testing::write_random_adapter(&tmp, &shape, 4, 3)?;
    std::fs::rename(&tmp, root.join("pinned/v3"))?;
    wait_served(&gw, "pinned.v3", "pinned/v3").await?;
    assert!(served_path(&gw, "pinned").await?.ends_with("pinned/v1"));
    let (ok, out) = cli(&["promote", "pinned", "v3"])?;
    assert!(ok, "{out}");
    wait_served(&gw, "pinned", "pinned/v3").await?;
    gw.handle.stop(true).await;
    Ok(())
}
