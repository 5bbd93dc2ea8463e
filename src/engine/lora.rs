//! LoRA applied unmerged, per sequence. A batch may mix sequences on the base model and on
//! several adapters: the base projection runs once for all rows, then for each adapter
//! group the rows are gathered, multiplied by the low-rank pair and added back
//! (the Punica / S-LoRA scheme). `W + s·B·A` is never materialised.

use candle_core::{Device, Tensor};

use super::{EngineError, Result};

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

/// An adapter's weights in the model's own row order, per layer and projection.
#[derive(Debug, Default)]
pub struct LoraWeights {
    layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraWeights {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| Default::default()).collect() }
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
        Ok(())
    }

    pub fn get(&self, layer: usize, p: Proj) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[p.index()].as_ref())
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of f32 weights held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| 4 * (p.a_t.elem_count() + p.b_t_scaled.elem_count()))
            .sum()
    }
}

struct Group<'a> {
    weights: &'a LoraWeights,
    /// Row indices of the group, or `None` when it covers every row (no gather needed).
    rows: Option<Tensor>,
    /// The same indices as numbers (the serving kernels).
    row_ids: Option<Vec<u32>>,
}

/// The adapter groups of one ragged batch.
pub struct BatchLora<'a> {
    groups: Vec<Group<'a>>,
    /// LoRA dropout on the adapter's input (training only).
    dropout: f32,
}

impl<'a> BatchLora<'a> {
    /// No adapters anywhere in the batch.
    pub fn none() -> Self {
        Self { groups: Vec::new(), dropout: 0.0 }
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
        let mut groups: Vec<(&'a LoraWeights, Vec<u32>)> = Vec::new();
        let mut off = 0u32;
        for &(n, w) in seqs {
            if let Some(w) = w {
                let rows = off..off + n as u32;
                match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, w)) {
                    Some((_, v)) => v.extend(rows),
                    None => groups.push((w, rows.collect())),
                }
            }
            off += n as u32;
        }
        let groups = groups
            .into_iter()
            .map(|(weights, rows)| {
                let (rows, row_ids) = if rows.len() == total {
                    (None, None)
                } else {
                    let n = rows.len();
                    (Some(Tensor::from_vec(rows.clone(), n, &Device::Cpu)?), Some(rows))
                };
                Ok(Group { weights, rows, row_ids })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { groups, dropout: 0.0 })
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Each group's weights and row indices (`None`: every row).
    pub(crate) fn raw_groups(&self) -> Vec<(&LoraWeights, &Option<Vec<u32>>)> {
        self.groups.iter().map(|g| (g.weights, &g.row_ids)).collect()
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
            let Some(pair) = g.weights.get(layer, p) else { continue };
            y = match &g.rows {
                None => (y + x.matmul(&pair.a_t)?.matmul(&pair.b_t_scaled)?)?,
                Some(rows) => {
                    let d = x.index_select(rows, 0)?.matmul(&pair.a_t)?.matmul(&pair.b_t_scaled)?;
                    y.index_add(rows, &d, 0)?
                }
            };
        }
        Ok(y)
    }
}
