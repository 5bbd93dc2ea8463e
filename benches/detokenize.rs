//! Streaming detokenization cost against output length: the engine's incremental decoder
//! (`engine::stream_text`, a short window per token) beside decoding the whole output again
//! at every token (what the engine did before). Uses the default model's tokenizer when
//! `models/` has it, else the tiny test vocabulary. Writes `benches/results/detokenize.md`.
//!
//!     cargo bench --bench detokenize

use std::path::Path;
use std::time::Instant;

use tunegate::engine::Tokenizer;

fn tokenizer() -> anyhow::Result<(Tokenizer, &'static str)> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(tunegate::config::DEFAULT_MODEL_FILE);
    if model.exists() {
        let f = tunegate::engine::gguf::GgufFile::open(&model)?;
        return Ok((Tokenizer::from_gguf(f.metadata())?, "SmolLM2-135M-Instruct"));
    }
    Ok((Tokenizer::from_gguf(&tunegate::engine::tokenizer::tiny_gguf_vocab().gguf_metadata())?, "tiny test vocabulary"))
}

/// The old way: the whole output decoded at every token.
fn full_redecode(tok: &Tokenizer, ids: &[u32]) -> anyhow::Result<usize> {
    let mut bytes = 0;
    for n in 1..=ids.len() {
        bytes = tok.decode(&ids[..n], true)?.len();
    }
    Ok(bytes)
}

fn main() -> anyhow::Result<()> {
    let (tok, which) = tokenizer()?;
    let text = "The quick brown fox jumps over the lazy dog; café, naïve, 東京 — and so on. ".repeat(400);
    let ids = tok.encode(&text, false)?;
    anyhow::ensure!(ids.len() >= 4000, "only {} tokens", ids.len());
    let stop = vec!["<never-appears>".to_string()];
    let mut rows = Vec::new();
    for n in [1000usize, 2000, 4000] {
        let ids = &ids[..n];
        let t = Instant::now();
        let out = tunegate::engine::stream_text(&tok, ids, &stop)?;
        let inc = t.elapsed().as_secs_f64();
        anyhow::ensure!(out == tok.decode(ids, true)?, "incremental text differs from the full decoding");
        let t = Instant::now();
        full_redecode(&tok, ids)?;
        let full = t.elapsed().as_secs_f64();
        println!("{n:>5} tokens: incremental {:.1} ms ({:.2} µs/token), whole-output re-decode {:.1} ms ({:.2} µs/token)",
            inc * 1e3, inc * 1e6 / n as f64, full * 1e3, full * 1e6 / n as f64);
        rows.push((n, inc, full));
    }
    let per = |i: usize, f: fn(&(usize, f64, f64)) -> f64| f(&rows[i]) / rows[i].0 as f64;
    let inc_growth = per(2, |r| r.1) / per(0, |r| r.1);
    let full_growth = per(2, |r| r.2) / per(0, |r| r.2);
    let mut md = format!(
        "# Streaming detokenization\n\n`cargo bench --bench detokenize` ({which}, one stop sequence, release build).\n\
         Per-token cost at 4,000 tokens relative to 1,000: incremental {inc_growth:.2}x (linear: 1x), \
         whole-output re-decode {full_growth:.2}x (quadratic: 4x).\n\n\
         | output tokens | incremental ms | µs/token | whole re-decode ms | µs/token |\n|---|---|---|---|---|\n"
    );
    for (n, inc, full) in &rows {
        md.push_str(&format!(
            "| {n} | {:.1} | {:.2} | {:.1} | {:.2} |\n",
            inc * 1e3,
            inc * 1e6 / *n as f64,
            full * 1e3,
            full * 1e6 / *n as f64
        ));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/detokenize.md");
    std::fs::write(&out, md)?;
    println!("wrote {}", out.display());
    Ok(())
}
