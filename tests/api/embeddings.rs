//! `/v1/embeddings` over HTTP: unit vectors of the model's width, the same for an input
//! alone or in a batch, text and token-id inputs, base64 as the SDKs ask, and 400s for bad
//! input.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::common::{self, MODEL};

fn vectors(body: &Value) -> Vec<Vec<f64>> {
    body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["embedding"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect())
        .collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_unit_vectors_batched_or_not() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let hidden = gw.shape()?.hidden_size;
    let texts = ["The cat sat on the mat.", "Quarterly revenue rose by four percent.", "hi"];
    let (status, body) = gw.post("/v1/embeddings", json!({"model": MODEL, "input": texts})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], MODEL);
    let batch = vectors(&body);
    assert_eq!(batch.len(), 3);
    for (i, (v, d)) in batch.iter().zip(body["data"].as_array().into_iter().flatten()).enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
        assert_eq!(v.len(), hidden);
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let tokens = body["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    assert!(tokens >= 3 && body["usage"]["total_tokens"].as_u64() == Some(tokens), "{}", body["usage"]);
    // Different texts, different vectors.
    assert!(max_diff(&batch[0], &batch[1]) > 1e-3);
    // Each input alone gives its vector from the batch.
    for (t, v) in texts.iter().zip(&batch) {
        let (_, one) = gw.post("/v1/embeddings", json!({"model": MODEL, "input": t})).await?;
        assert!(max_diff(&vectors(&one)[0], v) < 1e-4, "{t}");
    }
    // Token ids: one list and a list of lists agree.
    let (status, ids) = gw.post("/v1/embeddings", json!({"model": MODEL, "input": [[5, 6, 7, 8], [9, 10]]})).await?;
    assert_eq!(status, 200, "{ids}");
    let (_, one) = gw.post("/v1/embeddings", json!({"model": MODEL, "input": [5, 6, 7, 8]})).await?;
    assert!(max_diff(&vectors(&ids)[0], &vectors(&one)[0]) < 1e-4);
    assert_eq!(ids["usage"]["prompt_tokens"], 6);
    // base64: the same floats, little-endian f32.
    let (_, b64) = gw.post("/v1/embeddings", json!({"model": MODEL, "input": texts[0], "encoding_format": "base64"})).await?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap_or_default())?;
    let floats: Vec<f64> =
        bytes.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect();
    assert_eq!(floats.len(), hidden);
    assert!(max_diff(&floats, &batch[0]) < 1e-4);
    // `dimensions` equal to the width is accepted.
    let (status, _) = gw.post("/v1/embeddings", json!({"model": MODEL, "input": "x", "dimensions": hidden})).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_refuse_bad_input() -> anyhow::Result<()> {
    let gw = common::start().await?;
    let long: Vec<u32> = vec![5; 600]; // the test config's context is 512
    let cases = [
        (json!({"model": MODEL}), 400, "missing_required_parameter", "input"),
        (json!({"model": MODEL, "input": []}), 400, "empty_array", "input"),
        (json!({"model": MODEL, "input": ""}), 400, "invalid_value", "input"),
        (json!({"model": MODEL, "input": ["a", ""]}), 400, "invalid_value", "input[1]"),
        (json!({"model": MODEL, "input": [[1, 2], []]}), 400, "invalid_value", "input[1]"),
        (json!({"model": MODEL, "input": [1, -2]}), 400, "invalid_value", "input"),
        (json!({"model": MODEL, "input": [1_000_000_000]}), 400, "invalid_value", "input"),
        (json!({"model": MODEL, "input": long}), 400, "context_length_exceeded", "input"),
        (json!({"model": MODEL, "input": "x", "encoding_format": "int8"}), 400, "invalid_value", "encoding_format"),
        (json!({"model": MODEL, "input": "x", "dimensions": 7}), 400, "unsupported_parameter", "dimensions"),
        (json!({"model": MODEL, "input": {"text": "x"}}), 400, "", ""),
        (json!({"model": "nope", "input": "x"}), 404, "model_not_found", ""),
    ];
    for (body, want_status, want_code, want_param) in cases {
        let (status, err) = gw.post("/v1/embeddings", body.clone()).await?;
        assert_eq!(status.as_u16(), want_status, "{body}: {err}");
        assert!(err["error"]["message"].is_string(), "{err}");
        if !want_code.is_empty() {
            assert_eq!(err["error"]["code"], want_code, "{body}: {err}");
        }
        if !want_param.is_empty() {
            assert_eq!(err["error"]["param"], want_param, "{body}: {err}");
        }
    }
    // Still serving.
    let (status, _) = gw.post("/v1/embeddings", json!({"model": MODEL, "input": "ok"})).await?;
    assert_eq!(status, 200);
    Ok(())
}
