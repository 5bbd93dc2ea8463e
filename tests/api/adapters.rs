//! Adapters over HTTP: load / replace / unload (vLLM-compatible), routing by `model`, path
//! confinement, compare-and-swap, swaps during a running stream, and the folder watcher.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tunegate::testing::write_random_adapter;
use tunegate::engine::ModelShape;

use crate::common::{self, assert_error, Gateway, MODEL};

const PROMPT: &str = "What is the capital of France?";

/// Writes an adapter the way a publisher should: into a hidden folder, then renamed.
fn publish(root: &Path, rel: &str, shape: &ModelShape, seed: u64) -> anyhow::Result<()> {
    let dest = root.join(rel);
    let tmp = root.join(format!(".tmp-{seed}"));
    std::fs::create_dir_all(&tmp)?;
    write_random_adapter(&tmp, shape, 8, seed)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(&tmp, &dest)?;
    Ok(())
}

async fn admin_gateway() -> anyhow::Result<Gateway> {
    common::start_with(|c, _| c.adapters.watch = false).await
}

fn alias_generation(list: &Value, alias: &str) -> Option<u64> {
    list["data"].as_array()?.iter().find(|a| a["alias"] == alias)?["generation"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_route_and_unload() -> anyhow::Result<()> {
    let gw = admin_gateway().await?;
    let shape = gw.shape()?;
    let root = gw.adapters_root();
    publish(&root, "support/v1", &shape, 1)?;

    let base = gw.greedy(MODEL, PROMPT, 16).await?;
    let (s, b) = gw.load_adapter("support", "support/v1", false).await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["object"], "lora_adapter");
    assert_eq!(b["alias"], "support");
    assert_eq!(b["rank"], 8);
    let g1 = b["generation"].as_u64().unwrap_or(0);
    assert!(g1 > 0);

    let tuned = gw.greedy("support", PROMPT, 16).await?;
    assert_ne!(tuned, base, "the adapter changes the output");
    assert_eq!(gw.greedy(&format!("{MODEL}:support"), PROMPT, 16).await?, tuned, "base:alias routes to the alias");
    assert_eq!(gw.greedy(MODEL, PROMPT, 16).await?, base, "the base is unchanged");

    let (_, models) = gw.get("/v1/models").await?;
    let listed = models["data"].as_array().cloned().unwrap_or_default();
    let entry = listed.iter().find(|m| m["id"] == "support").cloned().unwrap_or_default();
    assert_eq!(entry["parent"], MODEL);
    assert_eq!(entry["owned_by"], "tunegate");
    let (s, m) = gw.get("/v1/models/support").await?;
    assert_eq!((s.as_u16(), &m["parent"]), (200, &json!(MODEL)));

    let (s, list) = gw.get("/v1/lora_adapters").await?;
    assert_eq!(s, 200);
    assert_eq!(alias_generation(&list, "support"), Some(g1));
    assert!(list["retired"].is_array());

    // Conflicts.
    let (s, b) = gw.load_adapter("support", "support/v1", false).await?;
    assert_error(s, &b, 400, "adapter_already_loaded");
    let (s, b) = gw
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "support", "lora_path": "support/v1", "expected_generation": g1 + 100}),
        )
        .await?;
    assert_error(s, &b, 409, "generation_mismatch");
    let (s, b) =
        gw.post("/v1/unload_lora_adapter", json!({"lora_name": "support", "expected_generation": g1 + 100})).await?;
    assert_error(s, &b, 409, "generation_mismatch");

    // Paths stay inside the adapters root.
    for bad in ["../outside", "support/../../x", "/etc"] {
        let (s, b) = gw.load_adapter("evil", bad, false).await?;
        assert_error(s, &b, 400, "path_outside_adapters_root");
    }
    #[cfg(unix)]
    {
        // A real adapter outside the root, reached through a symlink inside it.
        publish(gw.dir.path(), "outside/v1", &shape, 3)?;
        std::os::unix::fs::symlink(gw.dir.path().join("outside"), root.join("escape"))?;
        let (s, b) = gw.load_adapter("evil", "escape/v1", false).await?;
        assert_error(s, &b, 400, "path_outside_adapters_root");
    }
    let (s, b) = gw.load_adapter("ghost", "missing/v9", false).await?;
    assert_error(s, &b, 404, "lora_path_not_found");
    std::fs::create_dir_all(root.join("broken"))?;
    std::fs::write(root.join("broken/adapter_config.json"), "{not json")?;
    let (s, b) = gw.load_adapter("broken", "broken", false).await?;
    assert_error(s, &b, 400, "invalid_adapter");
    let (s, b) = gw.load_adapter("bad name!", "support/v1", false).await?;
    assert_error(s, &b, 400, "invalid_adapter");

    // Unload: the alias is gone, and so is its model name.
    let (s, b) = gw.post("/v1/unload_lora_adapter", json!({"lora_name": "support", "expected_generation": g1})).await?;
    assert_eq!(s, 200, "{b}");
    let (s, b) = gw
        .post("/v1/chat/completions", json!({"model": "support", "messages": [{"role": "user", "content": "x"}]}))
        .await?;
    assert_error(s, &b, 404, "model_not_found");
    let (s, b) = gw.post("/v1/unload_lora_adapter", json!({"lora_name": "support"})).await?;
    assert_error(s, &b, 404, "adapter_not_found");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_and_unload_during_a_stream() -> anyhow::Result<()> {
    let gw = admin_gateway().await?;
    let shape = gw.shape()?;
    let root = gw.adapters_root();
    publish(&root, "support/v1", &shape, 1)?;
    publish(&root, "support/v2", &shape, 2)?;
    let (_, b) = gw.load_adapter("support", "support/v1", false).await?;
    let g1 = b["generation"].as_u64().unwrap_or(0);
    let expected = gw.greedy("support", PROMPT, 200).await?;

    let res = gw
        .post_raw(
            "/v1/chat/completions",
            json!({"model": "support", "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0, "max_tokens": 200, "stream": true}),
        )
        .await?;
    assert_eq!(res.status(), 200);
    let mut reader = common::SseReader::new(res);
    let mut events = vec![reader.next().await?.unwrap_or_default()];

    // Replace (compare-and-swap on the generation the stream holds), then unload.
    let (s, b) = gw
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "support", "lora_path": "support/v2", "load_inplace": true,
            "expected_generation": g1}),
        )
        .await?;
    assert_eq!(s, 200, "{b}");
    let g2 = b["generation"].as_u64().unwrap_or(0);
    assert!(g2 > g1);
    let replaced = gw.greedy("support", PROMPT, 200).await?;
    let (s, b) = gw.post("/v1/unload_lora_adapter", json!({"lora_name": "support"})).await?;
    assert_eq!(s, 200, "{b}");

    while let Some(ev) = reader.next().await? {
        events.push(ev);
    }
    assert_eq!(events.last(), Some(&Value::String("[DONE]".into())), "the stream ends normally");
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, expected, "the stream finished on the generation it started with");
    assert_ne!(replaced, expected, "new requests got the new generation");

    // Once the stream is over nothing holds the old generations.
    let freed = common::eventually(Duration::from_secs(5), || gw.handle.registry.retired().is_empty()).await;
    assert!(freed, "retired generations are freed: {:?}", gw.handle.registry.retired());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_is_scanned_at_start_and_watched() -> anyhow::Result<()> {
    // A first gateway only to learn the model's shape and own the folder.
    let first = admin_gateway().await?;
    let shape = first.shape()?;
    let root = first.adapters_root();
    publish(&root, "watched/v1", &shape, 11)?;
    publish(&root, "watched/v2", &shape, 12)?;

    // Start-up scan: the newest version is served before /ready.
    let root_for = root.clone();
    let gw = common::start_with(move |c, _| c.adapters.root = root_for).await?;
    let (_, list) = gw.get("/v1/lora_adapters").await?;
    let g_start = alias_generation(&list, "watched").unwrap_or(0);
    assert!(g_start > 0, "{list}");
    let path = list["data"][0]["path"].as_str().unwrap_or_default().to_string();
    assert!(path.ends_with("watched/v2"), "{path}");
    let v2 = gw.greedy("watched", PROMPT, 16).await?;

    // A new version folder is loaded and swapped in.
    publish(&root, "watched/v10", &shape, 13)?;
    let mut swapped = false;
    for _ in 0..200 {
        let (_, list) = gw.get("/v1/lora_adapters").await?;
        if alias_generation(&list, "watched").is_some_and(|g| g > g_start) {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(swapped, "v10 was not swapped in");
    assert_ne!(gw.greedy("watched", PROMPT, 16).await?, v2);

    // A brand-new name appears as a new alias.
    publish(&root, "fresh/v1", &shape, 14)?;
    let mut found = false;
    for _ in 0..200 {
        let (_, models) = gw.get("/v1/models").await?;
        if models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "fresh")) {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(found, "fresh was not loaded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_promotion_new_versions_load_beside() -> anyhow::Result<()> {
    let first = admin_gateway().await?;
    let shape = first.shape()?;
    let root = first.adapters_root();
    publish(&root, "task/v1", &shape, 21)?;
    let root_for = root.clone();
    let gw = common::start_with(move |c, _| {
        c.adapters.root = root_for;
        c.adapters.promote_new_versions = false;
    })
    .await?;
    let (_, list) = gw.get("/v1/lora_adapters").await?;
    let g = alias_generation(&list, "task");
    assert!(g.is_some(), "{list}");
    publish(&root, "task/v2", &shape, 22)?;
    let mut beside = false;
    for _ in 0..200 {
        let (_, list) = gw.get("/v1/lora_adapters").await?;
        if alias_generation(&list, "task.v2").is_some() {
            assert_eq!(alias_generation(&list, "task"), g, "the served alias stays");
            beside = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(beside, "task.v2 was not loaded");
    Ok(())
}
