//! Weights repacked for many activation rows at once: the training path's frozen products
//! (every row of a micro-batch through every projection, forward and backward).
//!
//! A [`Panels`] matrix `[n, k]` is cut into panels of 16 output columns. Each 32-value block
//! of a column is 32 unsigned bytes `q` with an f32 scale `d` and offset `m` (value =
//! `d·q + m`), and a panel stores its blocks interleaved for `vpdpbusd`: for each group of
//! four inputs, 64 bytes holding those four bytes of each of the 16 columns. One
//! instruction then multiplies four inputs of one activation row (broadcast) into 16
//! columns' accumulators at once, with no horizontal sums, and the weights are unpacked
//! once per job instead of once per tile as the serving tiles do.
//!
//! Activations are the serving path's [`QActs`] (per 32 values an `i8` block, its scale
//! and `d·Σq`), so a block's product is `d_w·d_a·Σ q_w·q_a + m_w·d_a·Σ q_a`, exact in
//! integers up to the activation rounding, as in the serving kernels.
//!
//! GGML Q4_0, Q4_1 and Q8_0 blocks repack exactly; every other weight (the other formats
//! after dequantizing, a transposed weight for the input gradient) is quantized to 8 bits
//! per value with the block's range (error at most 1/510 of the block's range).

use super::quant::{f16_at, ActBlock, QActs, Q4_1_BYTES, Q8_0_BYTES, QK};
use super::{BlockType, OutPtr};

/// Output columns per panel.
pub const PANEL: usize = 16;
/// Bytes of one block of one panel: 32 values of 16 columns.
const BLOCK_BYTES: usize = QK * PANEL;

/// A weight `[n, k]` repacked into panels of [`PANEL`] columns (see the module docs).
pub struct Panels {
    n: usize,
    k: usize,
    /// `[panel][block][group of 4 inputs][column][4]`.
    q: Vec<u8>,
    /// `[panel][block][column]`.
    d: Vec<f32>,
    m: Vec<f32>,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels({}x{})", self.n, self.k)
    }
}

impl Panels {
    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per column.
    pub fn k(&self) -> usize {
        self.k
    }

    fn blocks(&self) -> usize {
        self.k / QK
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    fn zeroed(n: usize, k: usize) -> Self {
        let cells = n.div_ceil(PANEL) * (k / QK) * PANEL;
        Self { n, k, q: vec![0; cells * QK], d: vec![0.0; cells], m: vec![0.0; cells] }
    }

    /// Stores column `c`'s block `b`.
    fn put(&mut self, c: usize, b: usize, q: &[u8; QK], d: f32, m: f32) {
        let (p, col) = (c / PANEL, c % PANEL);
        let cell = (p * self.blocks() + b) * PANEL + col;
        self.d[cell] = d;
        self.m[cell] = m;
        let base = (p * self.blocks() + b) * BLOCK_BYTES + col * 4;
        for (g, four) in q.chunks_exact(4).enumerate() {
            self.q[base + g * PANEL * 4..base + g * PANEL * 4 + 4].copy_from_slice(four);
        }
    }

    /// Column `c`'s block `b` back as (values, scale, offset) (tests).
    #[cfg(test)]
    pub(crate) fn get(&self, c: usize, b: usize) -> ([u8; QK], f32, f32) {
        let (p, col) = (c / PANEL, c % PANEL);
        let cell = (p * self.blocks() + b) * PANEL + col;
        let base = (p * self.blocks() + b) * BLOCK_BYTES + col * 4;
        let mut q = [0u8; QK];
        for (g, four) in q.chunks_exact_mut(4).enumerate() {
            four.copy_from_slice(&self.q[base + g * PANEL * 4..base + g * PANEL * 4 + 4]);
        }
        (q, self.d[cell], self.m[cell])
    }

    /// The rows of a dense `[n, k]` weight, 8 bits per value. `k` must be a multiple of 32.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        let mut p = Self::zeroed(n, k);
        for c in 0..n {
            for b in 0..k / QK {
                let (q, d, m) = quantize_u8(&w[c * k + b * QK..c * k + (b + 1) * QK]);
                p.put(c, b, &q, d, m);
            }
        }
        p
    }

    /// `Wᵀ` of a dense `[n, k]` weight: `k` columns of `n` inputs (the input gradient's
    /// product). `n` must be a multiple of 32.
    pub fn transposed_from_f32(w: &[f32], n: usize, k: usize) -> Self {
        let mut p = Self::zeroed(k, n);
        // Block `b` of column `c` is `W[32b..32b + 32, c]`: 32 rows read side by side.
        let mut vals = [0f32; QK];
        for b in 0..n / QK {
            let rows = &w[b * QK * k..(b + 1) * QK * k];
            for c in 0..k {
                for (t, v) in vals.iter_mut().enumerate() {
                    *v = rows[t * k + c];
                }
                let (q, d, m) = quantize_u8(&vals);
                p.put(c, b, &q, d, m);
            }
        }
        p
    }

    /// GGML blocks of a `[n, k]` weight, repacked exactly; `None` for a format that does not
    /// repack exactly (dequantize it and use [`Panels::from_f32`]).
    pub fn from_blocks(t: BlockType, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(QK) || bytes.len() != n * (k / t.values()) * t.bytes() {
            return None;
        }
        let block = match t {
            BlockType::Q4_0 => q4_0_block,
            BlockType::Q4_1 => q4_1_block,
            BlockType::Q8_0 => q8_0_block,
            _ => return None,
        };
        let nb = k / QK;
        let mut p = Self::zeroed(n, k);
        for (i, raw) in bytes.chunks_exact(t.bytes()).enumerate() {
            let (q, d, m) = block(raw);
            p.put(i / nb, i % nb, &q, d, m);
        }
        Some(p)
    }
}

/// Q4_1: `d`, `m`, then nibbles (low nibble of byte `j` is value `j`, high value `j + 16`).
fn q4_1_block(raw: &[u8]) -> ([u8; QK], f32, f32) {
    let mut q = [0u8; QK];
    for (j, &b) in raw[4..Q4_1_BYTES].iter().enumerate() {
        q[j] = b & 0x0F;
        q[j + 16] = b >> 4;
    }
    (q, f16_at(raw, 0), f16_at(raw, 2))
}

/// Q4_0: `d`, then nibbles as Q4_1's; value = `d·(q − 8)`.
fn q4_0_block(raw: &[u8]) -> ([u8; QK], f32, f32) {
    let mut q = [0u8; QK];
    for (j, &b) in raw[2..18].iter().enumerate() {
        q[j] = b & 0x0F;
        q[j + 16] = b >> 4;
    }
    let d = f16_at(raw, 0);
    (q, d, -8.0 * d)
}

/// Q8_0: `d`, then 32 `i8`; stored offset by 128 (value = `d·(q + 128) − 128·d`).
fn q8_0_block(raw: &[u8]) -> ([u8; QK], f32, f32) {
    let mut q = [0u8; QK];
    for (j, &b) in raw[2..Q8_0_BYTES].iter().enumerate() {
        q[j] = (b as i8 as i16 + 128) as u8;
    }
    let d = f16_at(raw, 0);
    (q, d, -128.0 * d)
}

/// 32 values to 8 bits over their range: value ≈ `d·q + m`.
fn quantize_u8(v: &[f32]) -> ([u8; QK], f32, f32) {
    let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let d = (hi - lo) / 255.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; QK];
    for (q, &x) in q.iter_mut().zip(v) {
        *q = ((x - lo) * id).round().clamp(0.0, 255.0) as u8;
    }
    (q, d, lo)
}

/// Activation rows per tile.
const ROWS: usize = 4;

/// `out[i, j] = Σ x[i, :] · W[j, :]` for the `m` quantized activation rows of `xq` (their
/// `k` equal to the panels'): a new row-major `[m, w.n()]` buffer. Pairs of panels are
/// shared over candle's worker pool; each runs every activation row in tiles of four.
pub fn matmul(xq: &QActs, w: &Panels) -> candle_core::Result<Vec<f32>> {
    matmul_on(vnni(), xq, w)
}

/// [`matmul`] on the portable loop (tests compare the two).
#[cfg(test)]
pub(crate) fn matmul_portable(xq: &QActs, w: &Panels) -> candle_core::Result<Vec<f32>> {
    matmul_on(false, xq, w)
}

fn matmul_on(vnni: bool, xq: &QActs, w: &Panels) -> candle_core::Result<Vec<f32>> {
    let (m, n) = (xq.rows, w.n);
    if xq.per_row != w.blocks() || xq.blocks.len() < m * w.blocks() {
        return Err(candle_core::Error::Msg(format!("panel matmul: {m} rows of {} blocks for {n} columns of {} blocks", xq.per_row, w.blocks())));
    }
    // Every cell is written below (each pair of panels, every row): no zeroing pass.
    let mut cells = Vec::<f32>::with_capacity(m * n);
    let out = OutPtr(cells.as_mut_ptr());
    let run_pair = |pair: usize| {
        let p0 = pair * 2;
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(ROWS);
            // SAFETY: rows i..i+rows < m and this pair's columns < n: cells no other task
            // writes, inside the caller's `m × n` buffer.
            unsafe {
                match rows {
                    4 => tile::<4>(vnni, xq, w, p0, i, out),
                    3 => tile::<3>(vnni, xq, w, p0, i, out),
                    2 => tile::<2>(vnni, xq, w, p0, i, out),
                    _ => tile::<1>(vnni, xq, w, p0, i, out),
                }
            }
            i += rows;
        }
    };
    // On candle's worker pool, where the rest of a training step's ops run: a second pool
    // would spin beside it for cores the step needs.
    crate::engine::pool::training_chunks(w.panels().div_ceil(2), |pairs| pairs.for_each(run_pair));
    // SAFETY: the pairs cover every panel and each tile writes its rows' cells of the
    // columns below n, so all m × n cells are initialized.
    unsafe { cells.set_len(m * n) };
    Ok(cells)
}

fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::isa() == super::Isa::Avx512Vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs [`matmul`] on its vector kernel (AVX-512 VNNI); elsewhere the
/// portable loop runs it, correct but slower than a dense f32 product.
pub fn fast() -> bool {
    vnni()
}

/// Rows `i..i + R` against panels `p0` and `p0 + 1` (if it exists).
///
/// # Safety
/// `out` covers `xq.rows × w.n` cells; no other thread writes these rows' columns of the
/// two panels.
unsafe fn tile<const R: usize>(vnni: bool, xq: &QActs, w: &Panels, p0: usize, i: usize, out: OutPtr) {
    let acts: [&[ActBlock]; R] = std::array::from_fn(|r| xq.row(i + r));
    let two = p0 + 1 < w.panels();
    let mut res = [[[0f32; PANEL]; 2]; R];
    #[cfg(target_arch = "x86_64")]
    if vnni {
        // SAFETY: `vnni` says the CPU has the features; the panels and rows hold
        // `w.blocks()` blocks each.
        unsafe {
            if two {
                x86::tile::<R, 2>(w, p0, acts, &mut res);
            } else {
                x86::tile::<R, 1>(w, p0, acts, &mut res);
            }
        }
    }
    if !vnni {
        portable::<R>(w, p0, acts, &mut res, if two { 2 } else { 1 });
    }
    let n = w.n;
    for (r, row) in res.iter().enumerate() {
        for (j, vals) in row.iter().enumerate().take(if two { 2 } else { 1 }) {
            let c0 = (p0 + j) * PANEL;
            for (c, &v) in vals.iter().enumerate().take(n.saturating_sub(c0).min(PANEL)) {
                // SAFETY: see the function's contract; c0 + c < n.
                unsafe { *out.at((i + r) * n + c0 + c) = v };
            }
        }
    }
}

/// The plain loop of a tile (what the vector kernel must equal, bit for bit: the same
/// integer sums and the same two multiply-adds per block).
fn portable<const R: usize>(w: &Panels, p0: usize, acts: [&[ActBlock]; R], res: &mut [[[f32; PANEL]; 2]; R], panels: usize) {
    let nb = w.blocks();
    for (j, p) in (p0..p0 + panels).enumerate() {
        for b in 0..nb {
            let cell = (p * nb + b) * PANEL;
            let q = &w.q[cell * QK..(cell + PANEL) * QK];
            for (r, a) in acts.iter().enumerate() {
                let a = &a[b];
                for c in 0..PANEL {
                    let mut s = 0i32;
                    for g in 0..QK / 4 {
                        for t in 0..4 {
                            s += i32::from(q[g * PANEL * 4 + c * 4 + t]) * i32::from(a.qs[g * 4 + t]);
                        }
                    }
                    let acc = &mut res[r][j][c];
                    *acc = (s as f32).mul_add(w.d[cell + c] * a.d, *acc);
                    *acc = w.m[cell + c].mul_add(a.s, *acc);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActBlock, Panels, BLOCK_BYTES, PANEL, QK};
    use std::arch::x86_64::*;

    /// `R` activation rows against `J` panels from `p0`: per block, eight `vpdpbusd` per
    /// (row, panel) accumulator, then its convert and two multiply-adds.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW and VNNI; panels `p0..p0 + J` exist; every `acts[r]` holds
    /// `w.blocks()` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile<const R: usize, const J: usize>(w: &Panels, p0: usize, acts: [&[ActBlock]; R], res: &mut [[[f32; PANEL]; 2]; R]) {
        let nb = w.k / QK;
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        let q = w.q.as_ptr();
        let (dp, mp) = (w.d.as_ptr(), w.m.as_ptr());
        for b in 0..nb {
            let mut sums = [[_mm512_setzero_si512(); J]; R];
            for g in 0..QK / 4 {
                let mut wv = [_mm512_setzero_si512(); J];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(q.add(((p0 + j) * nb + b) * BLOCK_BYTES + g * 64) as *const __m512i);
                }
                for r in 0..R {
                    let a = acts[r].get_unchecked(b);
                    let x = _mm512_set1_epi32((a.qs.as_ptr().add(g * 4) as *const i32).read_unaligned());
                    for j in 0..J {
                        sums[r][j] = _mm512_dpbusd_epi32(sums[r][j], wv[j], x);
                    }
                }
            }
            for j in 0..J {
                let cell = ((p0 + j) * nb + b) * PANEL;
                let d = _mm512_loadu_ps(dp.add(cell));
                let m = _mm512_loadu_ps(mp.add(cell));
                for r in 0..R {
                    let a = acts[r].get_unchecked(b);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
                    acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][j]), scale, acc[r][j]);
                    acc[r][j] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s), acc[r][j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..J {
                _mm512_storeu_ps(res[r][j].as_mut_ptr(), acc[r][j]);
            }
        }
    }
}
