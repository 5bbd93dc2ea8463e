//! The kernels against their plain loops: every ISA variant this CPU runs equals the
//! portable code, fused and threaded paths equal the serial ones.

use half::f16;

use super::quant::*;
use super::*;

fn q8_0_bytes(w: &[f32]) -> Vec<u8> {
    let mut q = QActs::default();
    q.quantize(w, QK);
    let mut out = Vec::new();
    for b in &q.blocks {
        out.extend_from_slice(&f16::from_f32(b.d).to_bits().to_le_bytes());
        out.extend(b.qs.iter().map(|&v| v as u8));
    }
    out
}

/// The portable kernels and every vector variant this CPU runs.
fn isas() -> Vec<Isa> {
    let mut isas = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512bw") {
                isas.push(Isa::Avx512Vnni);
            }
            if is_x86_feature_detected!("avxvnni") {
                isas.push(Isa::AvxVnni);
            }
        }
    }
    isas
}

#[test]
fn vector_quantization_equals_the_scalar_loop() {
    // Values at and near the rounding halves, zeros, a zero block, sign changes.
    let mut x: Vec<f32> = (0..32 * 40).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 37.0).collect();
    // First block: scale exactly 1, so ±k.5 is a tie (f32::round: away from zero).
    x[0] = 127.0;
    for (i, v) in x.iter_mut().enumerate().take(32).skip(1) {
        *v = i as f32 - 16.5;
    }
    x[64..96].fill(0.0);
    x[96] = -3.0;
    // Blocks whose scale overflows 1/d (0 · inf), with an infinity, with NaNs.
    x[128] = 1e-38;
    x[129] = -2e-38;
    x[160] = f32::INFINITY;
    x[161] = -5.0;
    x[192] = f32::NAN;
    x[200] = -f32::NAN;
    x[201] = 7.5;
    let mut fast = QActs::default();
    fast.quantize(&x, 64);
    // The scalar loop, as QActs::quantize runs it without AVX-512.
    let mut want = vec![ActBlock::ZERO; x.len() / QK];
    quantize_blocks_portable(&x, &mut want);
    assert_eq!(fast.blocks.len(), want.len());
    assert_eq!((fast.rows, fast.per_row), (20, 2));
    for (i, (b, w)) in fast.blocks.iter().zip(&want).enumerate() {
        assert_eq!((b.d.to_bits(), b.s.to_bits(), b.qs), (w.d.to_bits(), w.s.to_bits(), w.qs), "block {i}");
    }
    // (Without AVX-512 both sides run the scalar loop and this checks nothing more.)
}

#[test]
fn shared_quantization_and_silu_equal_the_serial_passes() {
    let pool = crate::engine::pool::Pool::new(3);
    let (m, k) = (7, 576);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 97.0).collect();
    let (mut one, mut par) = (QActs::default(), QActs::default());
    one.quantize(&x, k);
    par.quantize_par(&pool, &x, k);
    assert!(m * k / QK >= PARALLEL_BLOCKS);
    assert_eq!((par.rows, par.per_row, par.blocks.len()), (m, k / QK, m * k / QK));
    for (i, (a, b)) in one.blocks.iter().zip(&par.blocks).enumerate() {
        assert_eq!((a.d.to_bits(), a.s.to_bits(), a.qs), (b.d.to_bits(), b.s.to_bits(), b.qs), "block {i}");
    }
    let n = k / 2;
    let (mut s1, mut s2) = (vec![0f32; m * n], vec![0f32; m * n]);
    silu_mul(&x, n, &mut s1);
    silu_mul_par(&pool, &x, n, &mut s2);
    assert_eq!(s1, s2);
    assert!(s1.iter().any(|&v| v != 0.0));
}

#[test]
fn prefetch_walks_every_line_once_spread_over_the_tiles() {
    #[repr(align(64))]
    struct Lines([u8; 1024]);
    let buf = Lines([0; 1024]);
    let m = &buf.0;
    // 1 line, none, 3 lines (130 bytes from a boundary), 2 lines (30 bytes across one).
    let t0 = vec![&m[..1], &m[64..64], &m[64..194], &m[300..330]];
    let p = Prefetch { per_thread: vec![t0, vec![&m[512..768]]] };
    assert_eq!(Prefetch::lines(&p.per_thread[0]), 6);
    let mut w = Warm::new(&p, 0, 2);
    assert_eq!(w.per_tile, 3);
    w.tile();
    assert_eq!(w.issued, 3);
    w.tile();
    w.tile(); // more tiles than estimated: nothing left, nothing repeated
    w.rest();
    assert_eq!(w.issued, 6);
    let mut w = Warm::new(&p, 1, 100);
    w.tile();
    assert_eq!(w.issued, 1);
    w.rest();
    assert_eq!(w.issued, 4);
    let mut w = Warm::new(&p, 2, 1); // a thread with no list
    w.tile();
    w.rest();
    assert_eq!(w.issued, 0);
    // The estimate matches quant_rows' loops: 2 × 4 tiles, 1 × 4, then 4 × 1 and 1 × 1.
    assert_eq!(tile_calls(5, 8), 3 * 2);
    assert_eq!(tile_calls(5, 1), 1 + 1);
    assert_eq!(tile_calls(6, 9), 3 * 2 + (1 + 2));
}

#[test]
fn every_isa_gives_the_exact_integer_dot_product() {
    let k = 96;
    let mut seed = 7u32;
    let mut rnd = || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..k).map(|_| rnd()).collect();
    let xs: Vec<f32> = (0..4 * k).map(|_| rnd() * 3.0).collect();
    let wb = q8_0_bytes(&w);
    let mut xq = QActs::default();
    xq.quantize(&xs, k);
    let want = Q8_0::portable::<4>(&wb, [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
    let isas = isas();
    for isa in isas {
        let [got4] = tile::<Q8_0, 1, 4>(isa, [&wb], [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
        for t in 0..4 {
            let [[got1]] = tile::<Q8_0, 1, 1>(isa, [&wb], [xq.row(t)]);
            assert!((got4[t] - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} row {t}");
            assert!((got1 - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} row {t}");
        }
        // And the product tracks the f32 one within the quantization error.
        for t in 0..4 {
            let exact = dot(&w, &xs[t * k..(t + 1) * k]);
            assert!((got4[t] - exact).abs() < 0.05 * exact.abs().max(1.0), "{isa:?}: {} vs {exact}", got4[t]);
        }
    }
}

#[test]
fn q4_1_rows_match_candles_dequantized_weights() -> candle_core::Result<()> {
    // An odd block count (the 512-bit kernel's tail) and an even one.
    for k in [96, 128] {
        q4_1_rows_match_at(k)?;
    }
    Ok(())
}

fn q4_1_rows_match_at(k: usize) -> candle_core::Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let n = 5;
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 29 % 97) as f32 / 40.0) - 1.1).collect();
    let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)?;
    let q = QTensor::quantize(&t, GgmlDType::Q4_1)?;
    let bytes = q.data()?.to_vec();
    let deq = q.dequantize(&candle_core::Device::Cpu)?.to_vec2::<f32>()?;
    let xs: Vec<f32> = (0..4 * k).map(|i| ((i * 13 % 31) as f32 / 9.0) - 1.5).collect();
    let mut xq = QActs::default();
    xq.quantize(&xs, k);
    let row = k / QK * Q4_1_BYTES;
    let isas = isas();
    for r in 0..n {
        let wr = &bytes[r * row..(r + 1) * row];
        let want = q4_1_portable::<4>(wr, [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
        for &isa in &isas {
            let [got] = tile::<Q4_1, 1, 4>(isa, [wr], [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
            // Two and four weight rows at once give each row's own products.
            let r2 = (r + 1) % n;
            let w2 = &bytes[r2 * row..(r2 + 1) * row];
            let want2 = q4_1_portable::<4>(w2, [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
            let [g1, g2] = tile::<Q4_1, 2, 4>(isa, [wr, w2], [xq.row(0), xq.row(1), xq.row(2), xq.row(3)]);
            let [[h1], [h2], [h3], [h4]] = tile::<Q4_1, 4, 1>(isa, [wr, w2, wr, w2], [xq.row(1)]);
            for t in 0..4 {
                assert!((g1[t] - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} 2x4 ({r},{t})");
                assert!((g2[t] - want2[t]).abs() <= 1e-4 * want2[t].abs().max(1.0), "{isa:?} 2x4 ({r2},{t})");
            }
            for (h, w) in [(h1, want[1]), (h2, want2[1]), (h3, want[1]), (h4, want2[1])] {
                assert!((h - w).abs() <= 1e-4 * w.abs().max(1.0), "{isa:?} 4x1 ({r}): {h} vs {w}");
            }
            for t in 0..4 {
                let [[one]] = tile::<Q4_1, 1, 1>(isa, [wr], [xq.row(t)]);
                assert!((got[t] - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} ({r},{t})");
                assert!((one - want[t]).abs() <= 1e-4 * want[t].abs().max(1.0), "{isa:?} ({r},{t})");
            }
        }
        for t in 0..4 {
            let exact = dot(&deq[r], &xs[t * k..(t + 1) * k]);
            assert!((want[t] - exact).abs() < 0.02 * exact.abs().max(1.0), "({r},{t}): {} vs {exact}", want[t]);
        }
    }
    Ok(())
}

#[test]
fn sub_block_formats_match_candles_dequantized_weights() -> candle_core::Result<()> {
    use candle_core::quantized::GgmlDType;
    // Two super-blocks for the K-quants; 16 blocks and 17 (the 512-bit kernel's tail) for
    // the 32-value formats.
    for k in [512, 544] {
        sub_blocks_match::<Q4_0>(GgmlDType::Q4_0, k)?;
        sub_blocks_match::<Q5_0>(GgmlDType::Q5_0, k)?;
        sub_blocks_match::<Q5_1>(GgmlDType::Q5_1, k)?;
    }
    sub_blocks_match::<Q4K>(GgmlDType::Q4K, 512)?;
    sub_blocks_match::<Q5K>(GgmlDType::Q5K, 512)?;
    sub_blocks_match::<Q6K>(GgmlDType::Q6K, 512)?;
    Ok(())
}

/// Format `F` against candle's own quantizer and dequantizer (an independent reading of
/// the GGML layout): the portable loop equals the f32 product of candle's dequantized
/// rows up to the activations' rounding, and every ISA's tiles equal the portable loop.
fn sub_blocks_match<F: BlockFormat>(dtype: candle_core::quantized::GgmlDType, k: usize) -> candle_core::Result<()> {
    use candle_core::quantized::QTensor;
    let n = 5;
    // Rows of different ranges and signs, so sub-block scales and minimums differ.
    let w: Vec<f32> = (0..n * k)
        .map(|i| {
            let (r, c) = (i / k, i % k);
            ((c * 29 + r * 7) % 97) as f32 / 40.0 * (1.0 + (c / 32 % 5) as f32) - 1.1 * r as f32 / 2.0
        })
        .collect();
    let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)?;
    let q = QTensor::quantize(&t, dtype)?;
    assert_eq!(q.dtype(), dtype);
    let bytes = q.data()?.to_vec();
    let row = k / F::VALUES * F::BYTES;
    assert_eq!(bytes.len(), n * row, "{dtype:?}");
    let deq = q.dequantize(&candle_core::Device::Cpu)?.to_vec2::<f32>()?;
    let xs: Vec<f32> = (0..4 * k).map(|i| ((i * 13 % 31) as f32 / 9.0) - 1.5).collect();
    let mut xq = QActs::default();
    xq.quantize(&xs, k);
    let x4 = [xq.row(0), xq.row(1), xq.row(2), xq.row(3)];
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    for r in 0..n {
        let wr = &bytes[r * row..(r + 1) * row];
        let want = F::portable::<4>(wr, x4);
        for t in 0..4 {
            let x = &xs[t * k..(t + 1) * k];
            let exact = dot(&deq[r], x);
            let scale: f32 = deq[r].iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
            assert!((want[t] - exact).abs() < 0.01 * scale, "{dtype:?} ({r},{t}): {} vs {exact}", want[t]);
        }
        let r2 = (r + 1) % n;
        let w2 = &bytes[r2 * row..(r2 + 1) * row];
        let want2 = F::portable::<4>(w2, x4);
        for isa in isas() {
            let [g1, g2] = tile::<F, 2, 4>(isa, [wr, w2], x4);
            let [[h1], [h2], [h3], [h4]] = tile::<F, 4, 1>(isa, [wr, w2, wr, w2], [xq.row(1)]);
            for t in 0..4 {
                let [[one]] = tile::<F, 1, 1>(isa, [wr], [xq.row(t)]);
                assert!(close(g1[t], want[t]) && close(one, want[t]), "{dtype:?} {isa:?} ({r},{t}): {} {one} vs {}", g1[t], want[t]);
                assert!(close(g2[t], want2[t]), "{dtype:?} {isa:?} ({r2},{t})");
            }
            for (h, w) in [(h1, want[1]), (h2, want2[1]), (h3, want[1]), (h4, want2[1])] {
                assert!(close(h, w), "{dtype:?} {isa:?} 4x1 ({r}): {h} vs {w}");
            }
        }
    }
    Ok(())
}

#[test]
fn grouped_attention_matches_the_plain_loops() {
    for (group, hd, visible) in [(3, 64, 1), (3, 64, 37), (2, 32, 200), (1, 16, 5)] {
        let kvh = 2;
        let stride = 3 * hd;
        let off = kvh * hd;
        let q: Vec<f32> = (0..group * hd).map(|i| ((i * 31 % 17) as f32 / 9.0) - 0.9).collect();
        let k: Vec<f32> = (0..visible * stride).map(|i| ((i * 7 % 29) as f32 / 14.0) - 1.0).collect();
        let v: Vec<f32> = (0..visible * stride).map(|i| ((i * 11 % 23) as f32 / 11.0) - 1.0).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut want = vec![0f32; group * hd];
        for g in 0..group {
            let mut s: Vec<f32> = (0..visible)
                .map(|j| (0..hd).map(|d| q[g * hd + d] * k[j * stride + off + d]).sum::<f32>() * scale)
                .collect();
            softmax(&mut s);
            for d in 0..hd {
                want[g * hd + d] = (0..visible).map(|j| s[j] * v[j * stride + off + d]).sum();
            }
        }
        let mut got = vec![0f32; group * hd];
        let mut scratch = Vec::new();
        attend_group(&q, group, hd, &k, &v, stride, off, visible, scale, &mut scratch, &mut got);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "group {group} hd {hd} visible {visible}: {a} vs {b}");
        }
        // f16 rows (the default cache): the same as the plain loops over the f16-rounded
        // values (the values above are exact in f16, so the same as f32 too).
        let k16: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
        let v16: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
        let k_r: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
        let v_r: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
        let mut want16 = vec![0f32; group * hd];
        attend_group(&q, group, hd, &k_r, &v_r, stride, off, visible, scale, &mut scratch, &mut want16);
        attend_group(&q, group, hd, &k16, &v16, stride, off, visible, scale, &mut scratch, &mut got);
        for (a, b) in got.iter().zip(&want16) {
            assert!((a - b).abs() < 1e-4, "f16, group {group} hd {hd} visible {visible}: {a} vs {b}");
        }
        let mut portable = vec![0f32; group * hd];
        let mut row = vec![0f32; hd];
        let mut s16 = vec![0f32; visible];
        for g in 0..group {
            for (j, sj) in s16.iter_mut().enumerate() {
                KvElem::widen(&k16[j * stride + off..j * stride + off + hd], &mut row);
                *sj = (0..hd).map(|d| q[g * hd + d] * row[d]).sum::<f32>() * scale;
            }
            softmax(&mut s16);
            for (j, sj) in s16.iter().enumerate() {
                KvElem::widen(&v16[j * stride + off..j * stride + off + hd], &mut row);
                for d in 0..hd {
                    portable[g * hd + d] += sj * row[d];
                }
            }
        }
        for (a, b) in got.iter().zip(&portable) {
            assert!((a - b).abs() < 1e-4, "f16 vs portable, group {group} hd {hd} visible {visible}: {a} vs {b}");
        }
    }
}

#[test]
fn fused_parts_land_in_their_columns() -> candle_core::Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let pool = crate::engine::pool::Pool::new(2);
    let k = 64;
    for m in [1, 3, 5, 8, 9] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let w1: Vec<f32> = (0..3 * k).map(|i| ((i * 13 % 17) as f32 / 8.0) - 1.0).collect();
        let w2: Vec<f32> = (0..41 * k).map(|i| ((i * 7 % 23) as f32 / 11.0) - 1.0).collect();
        let w3: Vec<f32> = (0..13 * k).map(|i| ((i * 5 % 19) as f32 / 7.0) - 1.2).collect();
        let w2q = q8_0_bytes(&w2);
        let q3 = QTensor::quantize(&candle_core::Tensor::from_vec(w3, (13, k), &candle_core::Device::Cpu)?, GgmlDType::Q4_1)?;
        let w3q = q3.data()?.to_vec();
        let w3d = q3.dequantize(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let mut xq = QActs::default();
        xq.quantize(&x, k);
        let stride = 3 + 41 + 13;
        let mut out = vec![0f32; m * stride];
        let parts = [
            MatmulPart { weight: WeightRef::F32(&w1), n: 3, col: 0 },
            MatmulPart { weight: WeightRef::Blocks(BlockType::Q8_0, &w2q), n: 41, col: 3 },
            MatmulPart { weight: WeightRef::Blocks(BlockType::Q4_1, &w3q), n: 13, col: 44 },
        ];
        matmul(&pool, &x, &xq, k, &parts, &mut out, stride, &Prefetch::default());
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            for j in 0..3 {
                let want = dot(xr, &w1[j * k..(j + 1) * k]);
                assert!((out[i * stride + j] - want).abs() < 1e-4, "m={m}: f32 part ({i},{j})");
            }
            for j in 0..41 {
                let want = dot(xr, &w2[j * k..(j + 1) * k]);
                assert!((out[i * stride + 3 + j] - want).abs() < 0.05 * want.abs().max(1.0), "m={m}: q8 part ({i},{j})");
            }
            for j in 0..13 {
                let want = dot(xr, &w3d[j * k..(j + 1) * k]);
                assert!((out[i * stride + 44 + j] - want).abs() < 0.05 * want.abs().max(1.0), "m={m}: q4_1 part ({i},{j})");
            }
        }
    }
    Ok(())
}

#[test]
fn exp_shifted_matches_libm() {
    for n in [0usize, 1, 5, 16, 33, 200] {
        let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 60.0) / 3.0).collect();
        let mut got = x.clone();
        let (m, sum) = super::exp_shifted(&mut got);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(m, max);
        let want: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.max(1e-30) + 1e-37, "{a} vs {b}");
        }
        let s: f32 = want.iter().sum();
        assert!((sum - s).abs() <= 1e-5 * s.max(1.0), "{sum} vs {s}");
    }
}

#[test]
fn attention_split_over_ranges_combines_to_the_whole() {
    let (group, hd, visible, stride, off) = (3, 64, 301, 3 * 64, 64);
    let q: Vec<f32> = (0..group * hd).map(|i| ((i * 31 % 17) as f32 / 9.0) - 0.9).collect();
    let k: Vec<f16> = (0..visible * stride).map(|i| f16::from_f32(((i * 7 % 29) as f32 / 14.0) - 1.0)).collect();
    let v: Vec<f16> = (0..visible * stride).map(|i| f16::from_f32(((i * 11 % 23) as f32 / 11.0) - 1.0)).collect();
    let scale = 0.125;
    let mut scratch = Vec::new();
    let mut whole = vec![0f32; group * hd];
    attend_group(&q, group, hd, &k, &v, stride, off, visible, scale, &mut scratch, &mut whole);
    let cuts = [0, 97, 200, 301];
    let parts = cuts.len() - 1;
    // Per head: the parts' sums side by side, then combined.
    let mut acc = vec![0f32; parts * group * hd];
    let mut stats = vec![0f32; parts * group * 2];
    for p in 0..parts {
        super::attend_group_part(&q, group, hd, &k, &v, stride, off, cuts[p]..cuts[p + 1], scale, &mut scratch,
            &mut acc[p * group * hd..(p + 1) * group * hd], &mut stats[p * group * 2..(p + 1) * group * 2]);
    }
    for g in 0..group {
        let mut head_acc: Vec<f32> = (0..parts).flat_map(|p| acc[p * group * hd + g * hd..p * group * hd + (g + 1) * hd].to_vec()).collect();
        let head_stats: Vec<f32> = (0..parts).flat_map(|p| [stats[p * group * 2 + 2 * g], stats[p * group * 2 + 2 * g + 1]]).collect();
        super::combine_parts(&mut head_acc, &head_stats, hd, parts);
        for (a, b) in head_acc[..hd].iter().zip(&whole[g * hd..(g + 1) * hd]) {
            assert!((a - b).abs() < 1e-5, "head {g}: {a} vs {b}");
        }
    }
}

/// Panels: Q4_0 / Q4_1 / Q8_0 blocks repack to exactly candle's dequantized values, the
/// 8-bit repack of any weight stays within 1/510 of each block's range, and the vector
/// tile equals the portable loop bit for bit (every row count, one and two panels, a
/// ragged last panel).
#[test]
fn panels_repack_exactly_and_the_vector_tile_equals_the_portable_loop() -> candle_core::Result<()> {
    use super::panel::Panels;
    use candle_core::quantized::{GgmlDType, QTensor};
    let dev = candle_core::Device::Cpu;
    let (n, k) = (40, 96);
    let w = candle_core::Tensor::randn(0f32, 0.5, (n, k), &dev)?;
    for (dtype, t) in [(GgmlDType::Q4_0, BlockType::Q4_0), (GgmlDType::Q4_1, BlockType::Q4_1), (GgmlDType::Q8_0, BlockType::Q8_0)] {
        let q = QTensor::quantize(&w, dtype)?;
        let deq = q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?;
        let data = q.data()?;
        let p = Panels::from_blocks(t, &data, n, k).ok_or_else(|| candle_core::Error::Msg("no repack".into()))?;
        for c in 0..n {
            for b in 0..k / QK {
                let (qs, d, m) = p.get(c, b);
                for (j, &v) in qs.iter().enumerate() {
                    let got = d * f32::from(v) + m;
                    let want = deq[c * k + b * QK + j];
                    assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{dtype:?} col {c} block {b} value {j}: {got} vs {want}");
                }
            }
        }
    }
    let vals = w.flatten_all()?.to_vec1::<f32>()?;
    let p = Panels::from_f32(&vals, n, k);
    let pt = Panels::transposed_from_f32(&vals, n, k);
    for c in 0..n {
        for b in 0..k / QK {
            let (qs, d, m) = p.get(c, b);
            let block = &vals[c * k + b * QK..c * k + (b + 1) * QK];
            let range = block.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) - block.iter().fold(f32::INFINITY, |a, &v| a.min(v));
            for (j, &v) in qs.iter().enumerate() {
                assert!((d * f32::from(v) + m - block[j]).abs() <= range / 510.0 + 1e-6);
            }
        }
    }
    // The transposed panels hold column c of W as their row c.
    for c in 0..k {
        for b in 0..n / QK {
            let (qs, d, m) = pt.get(c, b);
            for (j, &v) in qs.iter().enumerate() {
                assert!((d * f32::from(v) + m - vals[(b * QK + j) * k + c]).abs() < 0.01);
            }
        }
    }
    for m in [1, 2, 3, 4, 5, 9] {
        let x = candle_core::Tensor::randn(0f32, 1.0, m * k, &dev)?.to_vec1::<f32>()?;
        let mut xq = QActs::default();
        xq.quantize(&x, k);
        let fast = super::panel::matmul(&xq, &p)?;
        let slow = super::panel::matmul_portable(&xq, &p)?;
        assert_eq!(fast, slow, "{m} rows: the vector tile differs from the portable loop");
        // And both track the f32 product.
        for i in 0..m {
            for c in 0..n {
                let exact: f32 = (0..k).map(|j| x[i * k + j] * vals[c * k + j]).sum();
                let magnitude: f32 = (0..k).map(|j| (x[i * k + j] * vals[c * k + j]).abs()).sum();
                assert!((slow[i * n + c] - exact).abs() < 0.01 * magnitude, "row {i} col {c}: {} vs {exact}", slow[i * n + c]);
            }
        }
    }
    Ok(())
}

/// The vectorized `exp` (SiLU's sigmoid in training) against `f32::exp` over the range
/// activations take, the tail past the last whole vector included.
#[test]
fn exp_in_place_matches_the_scalar_exp() {
    let xs: Vec<f32> = (0..1037).map(|i| -90.0 + i as f32 * 0.17).collect();
    let mut ys = xs.clone();
    exp_in_place(&mut ys);
    for (&x, &y) in xs.iter().zip(&ys) {
        let want = x.exp();
        assert!((y - want).abs() <= 1e-6 * want + 1e-30, "exp({x}) = {y}, want {want}");
    }
}
