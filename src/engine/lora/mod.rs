//! LoRA applied unmerged, per sequence. A batch may mix sequences on the base model and on
//! several adapters: the base projection runs once for all rows, then for each adapter
//! group the rows are gathered, multiplied by the low-rank pair and added back
//! (the Punica / S-LoRA scheme). `W + s·B·A` is never materialised.
//!
//! Serving reads each pair as f16 (made once per adapter, see [`LoraWeights::serving`]):
//! a batch of sequences on different adapters streams every adapter's pairs each step, and
//! halving those bytes is what keeps such batches close to base-model speed on a CPU. The
//! rounding (relative 2^-11 for values above f16's subnormal range, 6e-5) is what vLLM does
//! too (adapters in the model's 16-bit dtype); training and the Tensor path below keep f32.
//! A loaded adapter keeps only its serving copy ([`LoraWeights::into_serving_only`]).

pub(crate) mod apply;
pub(crate) mod kernels;

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{EngineError, Result};
use crate::engine::grad_ops::matmul;

/// The seven projections an adapter may target, in Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// `q_proj`, `gate_proj`, …
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Path inside a decoder layer: `self_attn.q_proj`, `mlp.gate_proj`, …
    pub fn module_path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    pub fn from_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One projection's low-rank pair, stored ready for `x·Aᵀ·(s·Bᵀ)`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `Aᵀ`, `[in, r]`.
    pub a_t: Tensor,
    /// `s·Bᵀ`, `[r, out]`.
    pub b_t_scaled: Tensor,
}

/// One projection's pair as the serving kernels read it: the layouts of [`LoraPair`]
/// (`Aᵀ` `[in, r]`, then `s·Bᵀ` `[r, out]`) in the serving precision.
#[derive(Debug)]
pub(crate) enum ServingPair {
    F16(Vec<f16>, Vec<f16>),
    F32(Vec<f32>, Vec<f32>),
}

impl ServingPair {
    fn values(&self) -> usize {
        match self {
            ServingPair::F16(a, b) => a.len() + b.len(),
            ServingPair::F32(a, b) => a.len() + b.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            ServingPair::F16(..) => 2 * self.values(),
            ServingPair::F32(..) => 4 * self.values(),
        }
    }
}

/// How the serving kernels hold adapter matrices (`adapters.precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraPrecision {
    /// Half the bytes per step; each weight rounded to the nearest f16 (relative 2^-11;
    /// values under 6e-5 keep an absolute error under 3e-8).
    #[default]
    F16,
    /// The adapter file's values exactly.
    F32,
}

/// What a sequence needs of an adapter: its weights, and a number naming this version of
/// them (the prefix cache keys cached positions by it; never 0, which is the base model).
/// Whoever owns the adapter (the registry) implements it; the engine holds the handle for
/// the sequence's whole life, which keeps that version alive.
pub trait LoraSource: Send + Sync + std::fmt::Debug {
    fn weights(&self) -> &LoraWeights;
    fn generation(&self) -> u64;
}

/// A request's hold on one adapter version.
pub type LoraHandle = std::sync::Arc<dyn LoraSource>;

type ServingLayers = Vec<[Option<ServingPair>; 7]>;

/// An adapter's weights in the model's own row order, per layer and projection.
#[derive(Debug, Default)]
pub struct LoraWeights {
    layers: Vec<[Option<LoraPair>; 7]>,
    /// The copy the serving kernels read (f16 unless prepared otherwise), made on first use.
    serving: OnceLock<std::result::Result<ServingLayers, String>>,
    /// The f32 pairs were dropped after the serving copy was made (loaded adapters): only
    /// the serving kernels can use these weights.
    serving_only: bool,
}

impl LoraWeights {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| Default::default()).collect(), serving: OnceLock::new(), serving_only: false }
    }

    /// Drops the f32 pairs, keeping only the serving copy (made now if it was not): what a
    /// served adapter needs, at half (f16) of the memory. The candle path refuses such weights.
    pub fn into_serving_only(mut self) -> Result<Self> {
        self.serving()?;
        for layer in &mut self.layers {
            *layer = Default::default();
        }
        self.serving_only = true;
        Ok(self)
    }

    /// Makes the serving copy in `precision` now. Loaders call this so that the first
    /// request does not pay for it and a weight outside f16's range is refused at load time;
    /// without it the copy is made in f16 on first use.
    pub fn prepare_serving(&mut self, precision: LoraPrecision) -> Result<()> {
        if self.serving_only {
            return Err(EngineError::Internal("these LoRA weights were kept for serving only".into()));
        }
        self.serving = OnceLock::from(self.make_serving(precision));
        self.serving().map(|_| ())
    }

    pub(crate) fn serving(&self) -> Result<&ServingLayers> {
        self.serving
            .get_or_init(|| self.make_serving(LoraPrecision::F16))
            .as_ref()
            .map_err(|e| EngineError::Internal(e.clone()))
    }

    fn make_serving(&self, precision: LoraPrecision) -> std::result::Result<ServingLayers, String> {
        let values = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string());
        let half = |v: &[f32], what: &str, layer: usize, p: Proj| -> std::result::Result<Vec<f16>, String> {
            let mut h = vec![f16::ZERO; v.len()];
            h.convert_from_f32_slice(v); // vectorised (F16C)
            if h.iter().all(|y| y.is_finite()) {
                return Ok(h);
            }
            match v.iter().zip(&h).find(|(x, y)| x.is_finite() && !y.is_finite()) {
                Some((x, _)) => Err(format!(
                    "layer {layer} {}: a {what} value ({x}) is outside f16's range (set adapters.precision = \"f32\")",
                    p.name()
                )),
                None => Ok(h),
            }
        };
        let mut out = Vec::with_capacity(self.layers.len());
        for (li, layer) in self.layers.iter().enumerate() {
            let mut slots: [Option<ServingPair>; 7] = Default::default();
            for p in Proj::ALL {
                if let Some(pair) = &layer[p.index()] {
                    let (a, b) = (values(&pair.a_t)?, values(&pair.b_t_scaled)?);
                    slots[p.index()] = Some(match precision {
                        LoraPrecision::F32 => ServingPair::F32(a, b),
                        LoraPrecision::F16 => {
                            ServingPair::F16(half(&a, "lora_A", li, p)?, half(&b, "scaled lora_B", li, p)?)
                        }
                    });
                }
            }
            out.push(slots);
        }
        Ok(out)
    }

    /// Sets the pair for one projection from `a` `[r, in]`, `b` `[out, r]` and the scale.
    pub fn set(&mut self, layer: usize, p: Proj, a: &Tensor, b: &Tensor, scale: f64) -> Result<()> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| EngineError::Internal(format!("LoRA layer {layer} out of range")))?;
        let a_t = a.to_device(&Device::Cpu)?.t()?.contiguous()?;
        let b_t_scaled = (b.to_device(&Device::Cpu)?.t()?.contiguous()? * scale)?;
        slot[p.index()] = Some(LoraPair { a_t, b_t_scaled });
        self.serving = OnceLock::new();
        self.serving_only = false;
        Ok(())
    }

    pub fn get(&self, layer: usize, p: Proj) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[p.index()].as_ref())
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of weights held: the f32 pairs and, once made, their serving copy.
    pub fn bytes(&self) -> usize {
        let values: usize = self.layers.iter().flatten().flatten().map(|p| p.a_t.elem_count() + p.b_t_scaled.elem_count()).sum();
        let serving: usize = match self.serving.get() {
            Some(Ok(layers)) => layers.iter().flatten().flatten().map(ServingPair::bytes).sum(),
            _ => 0,
        };
        4 * values + serving
    }
}

struct Group<'a> {
    weights: &'a LoraWeights,
    /// Row indices of the group, or `None` when it covers every row (no gather needed).
    rows: Option<Tensor>,
    /// The same rows as runs of consecutive rows, `(start, len)` (the serving kernels):
    /// one per sequence, or per neighbouring sequences on the same adapter.
    runs: Vec<(usize, usize)>,
}

/// The adapter groups of one ragged batch.
pub struct BatchLora<'a> {
    groups: Vec<Group<'a>>,
    /// Rows in the batch (every group's rows lie below).
    total: usize,
    /// LoRA dropout on the adapter's input (training only).
    dropout: f32,
}

impl<'a> BatchLora<'a> {
    /// No adapters anywhere in the batch.
    pub fn none() -> Self {
        Self { groups: Vec::new(), total: 0, dropout: 0.0 }
    }

    /// Applies dropout with probability `p` to the input of every low-rank product.
    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    /// `seqs[i]` is (rows of sequence i in the batch, its adapter). Sequences sharing an
    /// adapter (same allocation) form one group.
    pub fn new(seqs: &[(usize, Option<&'a LoraWeights>)]) -> Result<Self> {
        let total: usize = seqs.iter().map(|s| s.0).sum();
        let mut groups: Vec<(&'a LoraWeights, Vec<(usize, usize)>)> = Vec::new();
        let mut off = 0;
        for &(n, w) in seqs {
            if let (Some(w), true) = (w, n > 0) {
                match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, w)) {
                    Some((_, runs)) => match runs.last_mut() {
                        Some((start, len)) if *start + *len == off => *len += n,
                        _ => runs.push((off, n)),
                    },
                    None => groups.push((w, vec![(off, n)])),
                }
            }
            off += n;
        }
        let groups = groups
            .into_iter()
            .map(|(weights, runs)| {
                let rows = if runs == [(0, total)] {
                    None
                } else {
                    let ids: Vec<u32> = runs.iter().flat_map(|&(s, n)| s as u32..(s + n) as u32).collect();
                    let n = ids.len();
                    Some(Tensor::from_vec(ids, n, &Device::Cpu)?)
                };
                Ok(Group { weights, rows, runs })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { groups, total, dropout: 0.0 })
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Rows in the batch.
    pub(crate) fn total_rows(&self) -> usize {
        self.total
    }

    /// Each group's weights and runs of rows, `(start, len)`.
    pub(crate) fn serving_groups(&self) -> impl Iterator<Item = (&LoraWeights, &[(usize, usize)])> {
        self.groups.iter().map(|g| (g.weights, g.runs.as_slice()))
    }

    /// Adds each group's `x·Aᵀ·s·Bᵀ` to its rows of `y` (`x` `[rows, in]`, `y` `[rows, out]`).
    pub fn apply(&self, layer: usize, p: Proj, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        let dropped;
        let x = if self.dropout > 0.0 && !self.groups.is_empty() {
            dropped = candle_nn::ops::dropout(x, self.dropout)?;
            &dropped
        } else {
            x
        };
        for g in &self.groups {
            if g.weights.serving_only {
                return Err(EngineError::Internal("LoRA weights kept for serving only reached the candle path".into()));
            }
            let Some(pair) = g.weights.get(layer, p) else { continue };
            y = match &g.rows {
                None => (y + matmul(&matmul(x, &pair.a_t)?, &pair.b_t_scaled)?)?,
                Some(rows) => {
                    let d = matmul(&matmul(&x.index_select(rows, 0)?, &pair.a_t)?, &pair.b_t_scaled)?;
                    y.index_add(rows, &d, 0)?
                }
            };
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(w: &mut LoraWeights, big: f32) -> Result<()> {
        let a = Tensor::from_vec(vec![0.5f32, -0.25, 1.0 / 3.0, big], (1, 4), &Device::Cpu)?;
        let b = Tensor::from_vec(vec![0.1f32, 0.2], (2, 1), &Device::Cpu)?;
        w.set(0, Proj::Q, &a, &b, 2.0)
    }

    #[test]
    fn serving_copy_rounds_to_f16_or_keeps_f32() -> Result<()> {
        let mut w = LoraWeights::new(1);
        pair(&mut w, 0.125)?;
        let f32_bytes = w.bytes();
        w.prepare_serving(LoraPrecision::F16)?;
        assert_eq!(w.bytes(), f32_bytes * 3 / 2, "an f16 copy adds half the f32 bytes");
        let Some(Some(ServingPair::F16(a, b))) = w.serving()?.first().map(|l| &l[Proj::Q as usize]) else {
            return Err(EngineError::Internal("no f16 pair".into()));
        };
        // Aᵀ is [in, r]; 1/3 is rounded to the nearest f16, exact values stay exact.
        assert_eq!(a[0].to_f32(), 0.5);
        assert_eq!(a[2].to_f32(), f16::from_f32(1.0 / 3.0).to_f32());
        assert!((a[2].to_f32() - 1.0 / 3.0).abs() < 1.0 / 3.0 / 2048.0);
        assert_eq!((b[0].to_f32(), b[1].to_f32()), (f16::from_f32(0.2).to_f32(), f16::from_f32(0.4).to_f32()));
        w.prepare_serving(LoraPrecision::F32)?;
        assert!(matches!(w.serving()?[0][Proj::Q as usize], Some(ServingPair::F32(ref a, _)) if a[2] == 1.0 / 3.0));
        // A served adapter keeps only its serving copy; the candle path then refuses it.
        w.prepare_serving(LoraPrecision::F16)?;
        let w = w.into_serving_only()?;
        assert_eq!(w.bytes(), f32_bytes / 2);
        let x = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu)?;
        let y = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu)?;
        assert!(BatchLora::new(&[(1, Some(&w))])?.apply(0, Proj::Q, &x, y).is_err());
        Ok(())
    }

    #[test]
    fn weight_outside_f16_range_is_refused_with_the_way_out() -> Result<()> {
        let mut w = LoraWeights::new(1);
        pair(&mut w, 1e6)?;
        let e = w.prepare_serving(LoraPrecision::F16).map_err(|e| e.to_string());
        assert!(matches!(&e, Err(m) if m.contains("layer 0 q_proj") && m.contains("adapters.precision")), "{e:?}");
        w.prepare_serving(LoraPrecision::F32)?;
        Ok(())
    }
}
