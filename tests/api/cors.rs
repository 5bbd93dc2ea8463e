//! Browser clients (`server.cors_allowed_origins`): preflights for `/v1/*` from a listed
//! origin, nothing for others, and the open server's cross-site guard kept — over HTTP, and
//! from pages on two other origins in headless Chromium (`tests/ui/cors.spec.mjs`).

use std::time::Duration;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{self, CLIENT_KEY, MODEL};
use crate::python::{repo, report};
use crate::ui::{chromium, ensure_playwright};

const APP: &str = "http://app.example.test:3000";

async fn preflight(gw: &common::Gateway, origin: &str, path: &str) -> anyhow::Result<reqwest::Response> {
    Ok(gw
        .http
        .request(Method::OPTIONS, gw.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type,x-stainless-os,openai-organization")
        .send()
        .await?)
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_for_listed_origins_only() -> anyhow::Result<()> {
    // Keyed server: the listed origin gets its preflight answered, with the SDKs' headers.
    let gw = common::start_with(|c, _| {
        common::with_keys(c);
        c.server.cors_allowed_origins = vec![APP.into()];
    })
    .await?;
    for path in ["/v1/chat/completions", "/v1/responses", "/v1/models", "/v1/files/file-x"] {
        let res = preflight(&gw, APP, path).await?;
        assert!(res.status().is_success(), "{path}: {}", res.status());
        assert_eq!(header(&res, "access-control-allow-origin"), APP, "{path}");
        let allowed = header(&res, "access-control-allow-headers").to_ascii_lowercase();
        for h in ["authorization", "content-type", "x-stainless-os", "openai-organization"] {
            assert!(allowed.contains(h), "{path}: {allowed}");
        }
        assert!(header(&res, "access-control-allow-methods").contains("POST"));
    }
    // The real request: the answer readable with its x-request-id.
    let res = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("origin", APP)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "access-control-allow-origin"), APP);
    assert!(header(&res, "access-control-expose-headers").contains("x-request-id"));
    // Another origin: no CORS headers, so a browser withholds the answer.
    let res = preflight(&gw, "http://evil.example.test", "/v1/chat/completions").await?;
    assert!(res.headers().get("access-control-allow-origin").is_none(), "{:?}", res.headers());
    // Not /v1: the admin API is never opened to pages.
    let res = preflight(&gw, APP, "/admin/logs").await?;
    assert!(res.headers().get("access-control-allow-origin").is_none());

    // The default: no origin at all.
    let plain = common::start_with(|c, _| common::with_keys(c)).await?;
    let res = preflight(&plain, APP, "/v1/chat/completions").await?;
    assert!(res.headers().get("access-control-allow-origin").is_none());

    // An open server with a listed origin: that origin passes the cross-site guard, others
    // still get 403, a non-JSON body still 415, a foreign Host still 403.
    let open = common::start_with(|c, _| c.server.cors_allowed_origins = vec![APP.into()]).await?;
    let res = preflight(&open, APP, "/v1/chat/completions").await?;
    assert!(res.status().is_success() && header(&res, "access-control-allow-origin") == APP);
    let post = |origin: &'static str, ct: &'static str| {
        open.http
            .post(open.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("content-type", ct)
            .body(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string())
            .send()
    };
    assert_eq!(post(APP, "application/json").await?.status(), 200);
    assert_eq!(post("http://evil.example.test", "application/json").await?.status(), StatusCode::FORBIDDEN);
    assert_eq!(post(APP, "text/plain").await?.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let res = open.http.get(open.url("/v1/models")).header("host", "evil.example.test").header("origin", APP).send().await?;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    Ok(())
}

#[test]
fn a_wildcard_origin_needs_keys() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = format!("{}\n", common::config_text(dir.path(), &dir.path().join("m.gguf")));
    let with = |extra: &str| text.replace("[server]\n", &format!("[server]\n{extra}\n"));
    let parse = |t: &str| tunegate::config::Config::parse(t, "t.toml", Vec::new());
    let err = parse(&with("cors_allowed_origins = [\"*\"]"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("server.cors_allowed_origins"), "{err}");
    let err = parse(&with("cors_allowed_origins = [\"https://a.test/path\"]"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("server.cors_allowed_origins[0]"), "{err}");
    // With keys, `*` is allowed; a listed origin is fine on an open server.
    let keyed = format!("{}\n[auth]\napi_keys = [\"{}\"]\n", with("cors_allowed_origins = [\"*\"]"), "0".repeat(64));
    assert!(parse(&keyed).is_ok(), "{:?}", parse(&keyed).err());
    assert!(parse(&with("cors_allowed_origins = [\"http://localhost:5173\"]")).is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_a_listed_origin_calls_the_gateway_in_chromium() -> anyhow::Result<()> {
    let chromium = chromium()?;
    ensure_playwright()?;
    let free = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
    let (allowed, other) = (free()?, free()?);
    let gw = common::start_with(|c, _| {
        common::with_keys(c);
        c.server.cors_allowed_origins = vec![format!("http://127.0.0.1:{allowed}")];
    })
    .await?;
    let run = tokio::process::Command::new("node")
        .arg(repo().join("tests/ui/cors.spec.mjs"))
        .current_dir(repo().join("tests/ui"))
        .env("TUNEGATE_URL", gw.url(""))
        .env("TUNEGATE_KEY", CLIENT_KEY)
        .env("TUNEGATE_MODEL", MODEL)
        .env("TUNEGATE_ALLOWED_PORT", allowed.to_string())
        .env("TUNEGATE_OTHER_PORT", other.to_string())
        .env("TUNEGATE_CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .context("the browser run took over 180 s")?
        .context("running node (is Node.js installed? `scripts/test.sh` installs it)")?;
    report("the browser CORS run", &out)
}
