//! The Node.js client libraries against a live gateway: the official `openai` SDK and the
//! Vercel AI SDK's default provider (`tests/node/sdk.mjs`). `scripts/test.sh` installs them
//! into `tests/node/node_modules` from `tests/node/package-lock.json`.

use anyhow::Context;

use crate::common::{self, CLIENT_KEY, MODEL};
use crate::python::{repo, report};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_node_sdk_and_vercel_ai_sdk() -> anyhow::Result<()> {
    let modules = repo().join("tests/node/node_modules");
    anyhow::ensure!(
        modules.join("ai/package.json").exists() && modules.join("openai/package.json").exists(),
        "{} is missing: run `scripts/test.sh` once (it runs `npm ci` there)",
        modules.display()
    );
    let gw = common::start_with(|c, _| common::with_keys(c)).await?;
    let out = tokio::process::Command::new("node")
        .arg(repo().join("tests/node/sdk.mjs"))
        .env("TUNEGATE_BASE_URL", gw.url("/v1"))
        .env("TUNEGATE_MODEL", MODEL)
        .env("TUNEGATE_API_KEY", CLIENT_KEY)
        .output()
        .await
        .context("running node (is Node.js installed? `scripts/test.sh` installs it)")?;
    report("the Node SDK checks", &out)
}
