//! The review page at `/ui` in a real browser: Debian's headless Chromium driven by
//! playwright-core (`tests/ui/review.spec.mjs`, run with node). `scripts/test.sh` installs all
//! three; a missing one fails this test rather than skipping it.
//!
//! The gateway logs a few chat completions of one task; the browser enters the admin key
//! once, approves one record with the keyboard and approves another with a correction; the
//! states are then checked through the admin API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, ADMIN_KEY, CLIENT_KEY, MODEL};

const TASK: &str = "ui-review";
const CORRECTION: &str = "We see no outage in the EU region right now. The status page has live updates.";
const SYSTEM: &str = "You are the support assistant for Acme Cloud. Answer in at most three sentences, \
    be friendly and precise, never promise refunds, and point to the status page when an outage is suspected.";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn chromium() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("TUNEGATE_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `scripts/test.sh` once (it installs Debian's chromium), or set TUNEGATE_CHROMIUM",
        path.display()
    );
    Ok(path)
}

pub fn ensure_playwright() -> anyhow::Result<()> {
    let module = repo().join("tests/ui/node_modules/playwright-core/package.json");
    anyhow::ensure!(
        module.exists(),
        "{} is missing: run `scripts/test.sh` once (it runs `npm ci --prefix tests/ui`)",
        module.display()
    );
    Ok(())
}

/// The task's pending record ids, newest first, once the log writer has stored `n` of them.
async fn pending_ids(gw: &common::Gateway, n: usize) -> anyhow::Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = gw.get(&format!("/admin/logs?task={TASK}&state=pending")).await?;
        anyhow::ensure!(status == StatusCode::OK, "{status}: {body}");
        let ids: Vec<String> =
            body["data"].as_array().into_iter().flatten().filter_map(|r| r["id"].as_str().map(String::from)).collect();
        if ids.len() >= n || tokio::time::Instant::now() > deadline {
            anyhow::ensure!(ids.len() == n, "expected {n} logged records of {TASK}, found {}: {body}", ids.len());
            return Ok(ids);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_page_approves_and_corrects_in_chromium() -> anyhow::Result<()> {
    let chromium = chromium()?;
    ensure_playwright()?;
    let gw = common::start_with(|c, _| common::with_keys(c)).await?;

    // The page and its files need no key; the admin API behind them does.
    let page = gw.http.get(gw.url("/ui")).send().await?;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(csp.contains("default-src 'none'") && !csp.contains("http"), "{csp}");
    let anonymous = gw.http.get(gw.url("/admin/logs")).send().await?;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    for question in ["How do I reset my password?", "Is the EU region down?", "How do I add a teammate?"] {
        let mut body = json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "metadata": {"task": TASK},
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]});
        if question.contains("teammate") {
            // The newest record (shown first) carries tools: the page lists them.
            body["tools"] = json!([{"type": "function", "function": {"name": "invite_member", "description": "Invite a teammate",
                "parameters": {"type": "object", "properties": {"email": {"type": "string"}}}}}]);
        }
        let res = gw
            .http
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(res.status() == StatusCode::OK, "{}: {}", res.status(), res.text().await?);
    }
    let ids = pending_ids(&gw, 3).await?;

    let screenshot = std::env::var_os("TUNEGATE_UI_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| gw.dir.path().join("review-ui.png"));
    let run = tokio::process::Command::new("node")
        .arg(repo().join("tests/ui/review.spec.mjs"))
        .current_dir(repo().join("tests/ui"))
        .env("TUNEGATE_UI_URL", gw.url(""))
        .env("TUNEGATE_ADMIN_KEY", ADMIN_KEY)
        .env("TUNEGATE_UI_TASK", TASK)
        .env("TUNEGATE_UI_IDS", ids.join(","))
        .env("TUNEGATE_UI_CORRECTION", CORRECTION)
        .env("TUNEGATE_UI_SCREENSHOT", &screenshot)
        .env("TUNEGATE_CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .context("the browser run took over 180 s")?
        .context("running node (is Node.js installed? `scripts/test.sh` installs it)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    anyhow::ensure!(out.status.success(), "the browser run failed ({}):\n{text}", out.status);
    let result: Value = serde_json::from_str(stdout.lines().last().context("no output from the browser run")?)?;
    let (approved, corrected) = (&result["approved"], &result["corrected"]);
    assert_eq!(approved, ids[0].as_str(), "the newest record is approved first");
    assert_eq!(corrected, ids[1].as_str());
    println!("screenshot: {}", screenshot.display());

    let (_, record) = gw.get(&format!("/admin/logs/{}", ids[0])).await?;
    assert_eq!(record["review"]["state"], "approved", "{record}");
    assert!(record["review"]["corrected_response"].is_null(), "{record}");
    assert_eq!(record["review"]["reviewer"], "ui-test", "{record}");
    let (_, record) = gw.get(&format!("/admin/logs/{}", ids[1])).await?;
    assert_eq!(record["review"]["state"], "approved", "{record}");
    assert_eq!(record["review"]["corrected_response"], CORRECTION, "{record}");
    let (_, record) = gw.get(&format!("/admin/logs/{}", ids[2])).await?;
    assert_eq!(record["review"]["state"], "pending", "{record}");
    Ok(())
}
