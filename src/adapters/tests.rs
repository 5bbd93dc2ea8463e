//! Adapters served by the engine: PEFT folders loaded and checked against the model, mixed
//! batches against merged reference weights, and a registry swap while a sequence runs.

use candle_core::quantized::GgmlDType;

use super::{lora_handle, peft, AdapterLimits, AdapterRegistry, LoadOptions};
use crate::engine::lora::{BatchLora, Proj};
use crate::engine::model::{KvCache, SeqBatch};
use crate::engine::tests::{greedy, load_gguf, max_diff, tiny_engine};
use crate::engine::{sampling, GenerateRequest, Prompt, StreamEvent};
use crate::testing::{self, reference_logits, TinyLora, TinySpec, TinyWeights};

type R = anyhow::Result<()>;

/// One batch mixing base, adapter 1 and adapter 2 sequences (prefill and decode rows in
/// the same steps) gives each sequence the logits of its own merged model.
#[test]
fn mixed_lora_batch_equals_merged_weights() -> R {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec::llama(300);
    let w = TinyWeights::random(&spec, 5);
    let p = dir.path().join("m.gguf");
    w.write_gguf(&p, GgmlDType::F32, None)?;
    let m = load_gguf(&p)?;
    // Rank 16 (decode rows: the register kernels; the 5-row prefill: the widened path) and
    // rank 8 (every step in registers).
    let l1 = TinyLora::random(&spec.shape(), 16, &Proj::ALL, 11).f16_exact();
    let l2 = TinyLora::random(&spec.shape(), 8, &[Proj::Q, Proj::V, Proj::Down], 12).f16_exact();
    l1.write_peft(&dir.path().join("a1"), &spec.shape())?;
    l2.write_peft(&dir.path().join("a2"), &spec.shape())?;
    let lim = AdapterLimits::default();
    let a1 = peft::load_adapter(&dir.path().join("a1"), &m.shape, &lim)?.weights;
    let a2 = peft::load_adapter(&dir.path().join("a2"), &m.shape, &lim)?.weights;
    let merged = [w.clone(), l1.merge_into(&w), l2.merge_into(&w), l1.merge_into(&w)];
    // Sequences 1 and 3 share adapter 1 with sequence 2 between them: its group's rows are
    // two runs.
    let adapters = [None, Some(&a1), Some(&a2), Some(&a1)];
    // Different prompt lengths; sequence 0 joins a step late to mix prefill with decode.
    let prompts: [Vec<u32>; 4] = [vec![4, 5, 6], vec![10, 20, 30, 40, 50], vec![7, 7, 8], vec![3, 1, 4, 1]];
    let mut caches: Vec<KvCache> = (0..4).map(|_| KvCache::new(spec.layers)).collect();
    let mut toks: Vec<Vec<u32>> = prompts.to_vec();
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    for step in 0..5 {
        let active: Vec<usize> = if step == 0 { vec![1, 2, 3] } else { vec![0, 1, 2, 3] };
        let mut batch = Vec::new();
        let mut groups = Vec::new();
        for (i, c) in caches.iter_mut().enumerate() {
            if active.contains(&i) {
                groups.push((feed[i].len(), adapters[i]));
                batch.push(SeqBatch { tokens: &feed[i], cache: c });
            }
        }
        let bl = BatchLora::new(&groups)?;
        let rows = m.forward(&mut batch, &bl)?.to_vec2::<f32>()?;
        for (row, &i) in rows.iter().zip(&active) {
            let r = reference_logits(&merged[i], &toks[i])?;
            let last = r.last().ok_or_else(|| anyhow::anyhow!("no logits"))?;
            let d = max_diff(row, last);
            anyhow::ensure!(d < 1e-3, "sequence {i} step {step}: max logit diff {d}");
            let id = sampling::argmax(row) as u32;
            toks[i].push(id);
            feed[i] = vec![id];
        }
    }
    // The adapters really change the outputs.
    let base_last = reference_logits(&merged[0], &toks[1])?;
    let a1_last = reference_logits(&merged[1], &toks[1])?;
    let d = max_diff(&base_last[toks[1].len() - 1], &a1_last[toks[1].len() - 1]);
    anyhow::ensure!(d > 1e-2, "adapter 1 barely changes logits ({d})");
    Ok(())
}

#[test]
fn adapter_with_wrong_shape_is_rejected_naming_the_tensor() -> R {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec::llama(300);
    let mut other = spec.clone();
    other.intermediate = 96;
    TinyLora::random(&other.shape(), 4, &[Proj::Up], 1).write_peft(dir.path(), &other.shape())?;
    let err = match peft::load_adapter(dir.path(), &spec.shape(), &AdapterLimits::default()) {
        Err(e) => e.to_string(),
        Ok(_) => anyhow::bail!("a mismatched adapter loaded"),
    };
    assert!(err.contains("mlp.up_proj.lora_"), "{err}");
    let lim = AdapterLimits { max_rank: 2, ..AdapterLimits::default() };
    TinyLora::random(&spec.shape(), 4, &[Proj::Q], 1).write_peft(dir.path(), &spec.shape())?;
    let err = peft::load_adapter(dir.path(), &spec.shape(), &lim).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("max_rank"), "{err}");
    Ok(())
}

/// Replacing an alias while a sequence runs on it: the sequence finishes on the old
/// weights, new requests get the new ones, and the old generation is freed afterwards.
#[test]
fn registry_swap_during_generation() -> R {
    let dir = tempfile::tempdir()?;
    let (engine, _) = tiny_engine(dir.path(), 8, 64)?;
    let shape = engine.info()?.shape.clone();
    testing::write_random_adapter(&dir.path().join("v1"), &shape, 4, 1)?;
    testing::write_random_adapter(&dir.path().join("v2"), &shape, 4, 2)?;
    let reg = AdapterRegistry::for_engine(&engine, AdapterLimits::default());
    let g1 = reg.load("x", &dir.path().join("v1"), LoadOptions::default())?;
    assert_eq!(g1.active_leases, 0, "a fresh generation has no requests yet");
    let run = |lease: Option<super::AdapterLease>, n| {
        engine.submit(GenerateRequest::new(Prompt::Tokens(vec![3, 4, 5]), greedy(n)).with_adapter(lease.as_ref().map(lora_handle)))
    };
    let solo_v1 = run(reg.lease("x"), 600)?.collect_blocking()?.tokens;
    let mut long = run(reg.lease("x"), 600)?;
    let first = long.next_blocking();
    assert!(matches!(first, Some(StreamEvent::Token { .. })));
    // Compare-and-swap with a stale generation is refused; with the right one it swaps.
    assert!(reg.load("x", &dir.path().join("v2"), LoadOptions { replace: true, expected_generation: Some(g1.generation + 100) }).is_err());
    let g2 = reg.load("x", &dir.path().join("v2"), LoadOptions { replace: true, expected_generation: Some(g1.generation) })?;
    assert!(g2.generation > g1.generation);
    let retired = reg.retired();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].generation, g1.generation);
    assert_eq!(retired[0].active_leases, 1, "the running request still holds generation 1");
    let solo_v2 = run(reg.lease("x"), 600)?.collect_blocking()?.tokens;
    assert_ne!(solo_v1, solo_v2);
    let mut tokens = match first {
        Some(StreamEvent::Token { token_id, .. }) => vec![token_id],
        _ => vec![],
    };
    while let Some(ev) = long.next_blocking() {
        if let StreamEvent::Token { token_id, .. } = ev {
            tokens.push(token_id);
        }
    }
    assert_eq!(tokens, solo_v1, "the running request switched weights mid-generation");
    assert!(reg.retired().is_empty(), "generation 1 was not freed after its last request");
    assert_eq!(reg.list()[0].generation, g2.generation);
    Ok(())
}
