//! The kernels against a plain f64 reference computed on the same (rounded) operands.

use flipsketch_kernels::{
    bf16_bits, bf16_to_f32, conv2d, linear, matmul, ConvGeometry, PackedCols, PackedRows, Precision,
};
use rand::{Rng, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The operand as the kernel sees it.
fn rounded(prec: Precision, v: &[f32]) -> Vec<f32> {
    match prec {
        Precision::F32 => v.to_vec(),
        Precision::Bf16 => v.iter().map(|&x| bf16_to_f32(bf16_bits(x))).collect(),
    }
}

/// Largest |got - want| relative to the largest |want|.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / scale
}

// Both precisions accumulate in f32: the error is the f32 summation error of the products.
const TOL: f64 = 2e-6;

/// [`TOL`] for sums of `k` products: the f32 rounding error of a sum grows with the square
/// root of its length (measured at k = 2560, f32: 2.19e-6 with the portable kernels, 1.96e-6
/// with the AVX-512 ones, whose first tolerance of 2e-6 was that close), so beyond k = 1024
/// the bound grows with sqrt(k / 1024).
fn tol(k: usize) -> f64 {
    TOL * (k as f64 / 1024.0).sqrt().max(1.0)
}

#[test]
fn linear_matches_reference() {
    for prec in [Precision::F32, Precision::Bf16] {
        // (m, k, n): tile edges, odd k, several K blocks, few rows, one row.
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 7, 33),
            (77, 320, 64),
            (25, 301, 45),
            (200, 1030, 70),
            (12, 2560, 32),
            (3, 64, 700),
            // Few rows, weights over 8 MB: rows packed once, tasks over slices of columns.
            (37, 1024, 4130),
        ] {
            let x = random(m * k, 1 + m as u64);
            let w = random(n * k, 2 + n as u64);
            let bias = random(n, 3);
            let packed = PackedCols::from_transposed(prec, &w, n, k);
            let (xr, wr) = (rounded(prec, &x), rounded(prec, &w));
            for with_bias in [false, true] {
                let mut out = vec![f32::NAN; m * n];
                linear(&x, m, &packed, with_bias.then_some(&bias[..]), &mut out);
                let want: Vec<f64> = (0..m * n)
                    .map(|i| {
                        let (r, c) = (i / n, i % n);
                        let dot: f64 = (0..k)
                            .map(|j| xr[r * k + j] as f64 * wr[c * k + j] as f64)
                            .sum();
                        dot + if with_bias { bias[c] as f64 } else { 0.0 }
                    })
                    .collect();
                let e = rel_err(&out, &want);
                assert!(
                    e < tol(k),
                    "{prec:?} linear {m}x{k}x{n} bias {with_bias}: rel err {e:e}"
                );
            }
        }
    }
}

#[test]
fn bf16_differs_from_f32_by_rounding_only() {
    // Guards against a bf16 path that silently computes in f32 (or garbage).
    let (m, k, n) = (24, 512, 40);
    let x = random(m * k, 10);
    let w = random(n * k, 11);
    let mut f = vec![0.0; m * n];
    let mut b = vec![0.0; m * n];
    linear(
        &x,
        m,
        &PackedCols::from_transposed(Precision::F32, &w, n, k),
        None,
        &mut f,
    );
    linear(
        &x,
        m,
        &PackedCols::from_transposed(Precision::Bf16, &w, n, k),
        None,
        &mut b,
    );
    let want: Vec<f64> = f.iter().map(|&v| v as f64).collect();
    let e = rel_err(&b, &want);
    assert!(
        e > 1e-4 && e < 2e-2,
        "bf16 vs f32 relative difference {e:e}"
    );
}

/// The convolution of `imgs` images `(c_in, h, w)` with weights `(co, c_in, kh, kw)` and a
/// bias, in f64 from the given f32 values.
fn reference_conv(
    x: &[f32],
    imgs: usize,
    g: &ConvGeometry,
    wt: &[f32],
    co: usize,
    bias: &[f32],
) -> Vec<f64> {
    let (ci, h, w, kh, kw) = (g.c_in, g.h, g.w, g.kh, g.kw);
    let (st, pad) = (g.stride as i64, g.pad as i64);
    let k = ci * kh * kw;
    let mut want = vec![0f64; imgs * co * g.h_out * g.w_out];
    for i in 0..imgs {
        for o in 0..co {
            for oy in 0..g.h_out {
                for ox in 0..g.w_out {
                    let mut acc = bias[o] as f64;
                    for c in 0..ci {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = oy as i64 * st + ky as i64 - pad;
                                let ix = ox as i64 * st + kx as i64 - pad;
                                if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                    continue;
                                }
                                let xv = x[((i * ci + c) * h + iy as usize) * w + ix as usize];
                                acc += xv as f64 * wt[o * k + (c * kh + ky) * kw + kx] as f64;
                            }
                        }
                    }
                    want[((i * co + o) * g.h_out + oy) * g.w_out + ox] = acc;
                }
            }
        }
    }
    want
}

#[test]
fn conv2d_matches_reference() {
    for prec in [Precision::F32, Precision::Bf16] {
        // (images, c_in, h, w, c_out, kh, kw, stride, pad)
        for &(imgs, ci, h, w, co, kh, kw, st, pad) in &[
            (2, 4, 8, 8, 5, 3, 3, 1, 1),
            (1, 3, 9, 13, 14, 3, 3, 2, 1),
            (3, 16, 5, 7, 13, 1, 1, 1, 0),
            (2, 7, 33, 35, 3, 3, 3, 1, 1),
            (1, 40, 6, 6, 25, 3, 3, 2, 0),
            // K = 630: several uneven K blocks in f32 and in bf16 (packed weights stay compact).
            (1, 70, 6, 5, 14, 3, 3, 1, 1),
            (4, 6, 10, 1, 8, 3, 1, 1, 1),
            // Small images: columns run over all images (3x3 and 1x1, stride 2).
            (5, 9, 4, 4, 13, 3, 3, 1, 1),
            (7, 4, 3, 5, 6, 1, 1, 1, 0),
            (3, 5, 7, 7, 4, 3, 3, 2, 1),
            // Small images with large weights (f32: 8.8 MB packed): one GEMM over all images,
            // its columns in two chunks, panels straddling images (36 pixels each).
            (8, 245, 6, 6, 1000, 3, 3, 1, 1),
            // Rows wider than a panel (direct convolution: panels over padded rows).
            (1, 5, 40, 37, 7, 3, 3, 1, 1),
            (2, 3, 12, 70, 4, 3, 3, 1, 0),
        ] {
            let g = ConvGeometry::new(ci, h, w, kh, kw, st, pad).expect("valid geometry");
            let k = ci * kh * kw;
            let x = random(imgs * ci * h * w, 20 + ci as u64);
            let wt = random(co * k, 21 + co as u64);
            let bias = random(co, 22);
            // Stride 1 runs both ways: from the patches, and as the direct convolution with
            // the weights packed tap by tap.
            let mut packings = vec![("patches", PackedRows::new(prec, &wt, co, k))];
            if st == 1 {
                packings.push(("direct", PackedRows::new_taps(prec, &wt, co, ci, kh, kw)));
            }
            let (xr, wr) = (rounded(prec, &x), rounded(prec, &wt));
            let pix = g.h_out * g.w_out;
            let mut outs = Vec::new();
            for (how, packed) in &packings {
                let mut out = vec![f32::NAN; imgs * co * pix];
                conv2d(&x, imgs, &g, packed, Some(&bias), &mut out);
                outs.push((*how, out));
            }
            let want = reference_conv(&xr, imgs, &g, &wr, co, &bias);
            for (how, out) in &outs {
                let e = rel_err(out, &want);
                assert!(
                    e < tol(ci * kh * kw),
                    "{prec:?} {how} conv {imgs}x{ci}x{h}x{w} -> {co} k{kh}x{kw} s{st} p{pad}: rel err {e:e}"
                );
            }
        }
    }
}

/// The Winograd convolution F(2x2, 3x3) against the f64 convolution of the unrounded
/// operands: in f32 within 4x the f32 tolerance of the direct products (its transforms add a
/// few roundings per value; measured 0.4-7e-7), in bf16 within 4x the error of the direct
/// convolution's own bf16 rounding of the same operands (it rounds transformed values instead:
/// the input transform's sums of up to 4 values, the weights' of up to 9 halves; measured
/// 1.0-2.9x, 1.3e-3 to 5.2e-3 against the direct 1.3e-3 to 2.2e-3).
#[test]
fn winograd_conv_matches_reference() {
    // (images, c_in, h, w, c_out): even and odd sizes (tiles past the edge), one K block and
    // several (bf16: 2 channels a slot), c_out not a multiple of the row block, several tasks.
    // Images of fewer tiles than a panel's columns run as one product over all their tiles:
    // several panels, the last part empty, several K blocks, c_out over one row block.
    for &(imgs, ci, h, w, co) in &[
        (12, 70, 8, 8, 400),
        (10, 600, 4, 4, 30),
        (5, 9, 7, 3, 17),
        (2, 4, 8, 8, 5),
        (1, 3, 9, 13, 14),
        (3, 7, 5, 7, 13),
        (1, 70, 6, 5, 14),
        (1, 600, 4, 6, 20),
        (2, 5, 40, 37, 7),
        (1, 16, 65, 66, 30),
        (4, 2, 1, 1, 3),
    ] {
        let g = ConvGeometry::new(ci, h, w, 3, 3, 1, 1).expect("valid geometry");
        let k = ci * 9;
        let x = random(imgs * ci * h * w, 70 + ci as u64);
        let wt = random(co * k, 71 + co as u64);
        let bias = random(co, 72);
        let pix = h * w;
        let want = reference_conv(&x, imgs, &g, &wt, co, &bias);
        for prec in [Precision::F32, Precision::Bf16] {
            let wino = PackedRows::new_winograd(prec, &wt, co, ci);
            assert!(wino.is_winograd());
            let mut got = vec![f32::NAN; imgs * co * pix];
            conv2d(&x, imgs, &g, &wino, Some(&bias), &mut got);
            let e = rel_err(&got, &want);
            let bound = match prec {
                Precision::F32 => 4.0 * tol(k),
                Precision::Bf16 => {
                    let direct = PackedRows::new_taps(prec, &wt, co, ci, 3, 3);
                    let mut d = vec![f32::NAN; imgs * co * pix];
                    conv2d(&x, imgs, &g, &direct, Some(&bias), &mut d);
                    4.0 * rel_err(&d, &want)
                }
            };
            assert!(
                e <= bound,
                "{prec:?} winograd conv {imgs}x{ci}x{h}x{w} -> {co}: rel err {e:e}, bound {bound:e}"
            );
        }
    }
}

/// A convolution with its ResNet-block fusions (input GroupNorm + SiLU, per-image bias,
/// residual and divisor) gives exactly the values of the separate passes, on every path.
#[test]
fn conv2d_fusions_equal_separate_passes() {
    use flipsketch_kernels::{conv2d_fused, group_norm_affine, ConvFusion, GroupNormShape};
    for prec in [Precision::F32, Precision::Bf16] {
        // (images, c_in, h, w, c_out, stride, pad): odd and even channel counts (bf16 pairs),
        // direct and patches, small images over one GEMM, a stride-2 one.
        for &(imgs, ci, h, w, co, st, pad) in &[
            (2, 6, 9, 40, 5, 1, 1),
            (1, 5, 12, 33, 7, 1, 1),
            (3, 4, 5, 5, 6, 1, 1),
            (1, 8, 10, 10, 3, 2, 1),
        ] {
            let g = ConvGeometry::new(ci, h, w, 3, 3, st, pad).expect("valid geometry");
            let k = ci * 9;
            let x: Vec<f32> = random(imgs * ci * h * w, 60)
                .iter()
                .map(|v| v * 2.0 + 0.7)
                .collect();
            let wt = random(co * k, 61);
            let bias = random(co, 62);
            let gamma = random(ci, 63);
            let beta = random(ci, 64);
            let image_bias = random(imgs * co, 65);
            let out_len = g.out_len(imgs, co);
            let residual = random(out_len, 66);
            let groups = if ci % 2 == 0 { 2 } else { 1 };
            let shape = GroupNormShape {
                items: imgs,
                span: 1,
                channels: ci,
                plane: h * w,
                groups,
            };
            let mut packings = vec![("patches", PackedRows::new(prec, &wt, co, k))];
            if st == 1 {
                packings.push(("direct", PackedRows::new_taps(prec, &wt, co, ci, 3, 3)));
                packings.push(("winograd", PackedRows::new_winograd(prec, &wt, co, ci)));
            }
            for silu in [false, true] {
                let map = group_norm_affine(&x, shape, 1e-6, &gamma, &beta, silu);
                let normed = map.apply_all(&x, h * w);
                for (how, packed) in &packings {
                    let mut want = vec![f32::NAN; out_len];
                    conv2d(&normed, imgs, &g, packed, Some(&bias), &mut want);
                    let plane = g.h_out * g.w_out;
                    for (i, v) in want.iter_mut().enumerate() {
                        *v = (residual[i] + (*v + image_bias[i / plane])) / 1.5;
                    }
                    let got = conv2d_fused(
                        &x,
                        imgs,
                        &g,
                        packed,
                        Some(&bias),
                        ConvFusion {
                            input: Some(&map),
                            image_bias: Some(&image_bias),
                            residual: Some((&residual, 1.5)),
                        },
                    );
                    let diff = got
                        .iter()
                        .zip(&want)
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    assert_eq!(
                        diff, 0,
                        "{prec:?} {how} fused conv {imgs}x{ci}x{h}x{w} -> {co} s{st} silu {silu}: \
                         {diff} of {out_len} values differ from the separate passes"
                    );
                    // Each fusion alone, too (the input map only; the output parts only).
                    let only_input = conv2d_fused(
                        &x,
                        imgs,
                        &g,
                        packed,
                        Some(&bias),
                        ConvFusion {
                            input: Some(&map),
                            ..ConvFusion::default()
                        },
                    );
                    let mut plain = vec![f32::NAN; out_len];
                    conv2d(&normed, imgs, &g, packed, Some(&bias), &mut plain);
                    assert!(
                        only_input
                            .iter()
                            .zip(&plain)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{prec:?} {how}: the input map alone differs"
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_matches_reference() {
    for prec in [Precision::F32, Precision::Bf16] {
        for &(batch, m, k, n) in &[
            (1, 1, 1, 1),
            (3, 17, 40, 50),
            (2, 100, 64, 100),
            (5, 10, 257, 10),
            (1, 40, 300, 33),
        ] {
            let a = random(batch * m * k, 30);
            let b = random(batch * k * n, 31);
            let (ar, br) = (rounded(prec, &a), rounded(prec, &b));
            let mut out = vec![f32::NAN; batch * m * n];
            matmul(prec, &a, &b, batch, m, k, n, &mut out);
            let want: Vec<f64> = (0..batch * m * n)
                .map(|idx| {
                    let (i, r, c) = (idx / (m * n), (idx / n) % m, idx % n);
                    (0..k)
                        .map(|j| ar[(i * m + r) * k + j] as f64 * br[(i * k + j) * n + c] as f64)
                        .sum()
                })
                .collect();
            let e = rel_err(&out, &want);
            assert!(
                e < tol(k),
                "{prec:?} matmul {batch}x{m}x{k}x{n}: rel err {e:e}"
            );
        }
    }
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(bf16_bits(1.0), 0x3F80);
    // Halfway between 1.0 and the next bf16: ties to even (down); just above rounds up.
    assert_eq!(bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
    assert_eq!(bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
    assert_eq!(bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
    assert_eq!(bf16_bits(f32::INFINITY), 0x7F80);
}

#[test]
fn exp_erfc_gelu_silu_are_accurate() {
    use flipsketch_kernels::{erfc, exp, gelu_erf, silu};
    let mut worst = [0f64; 4];
    for i in -200_000..=200_000 {
        let x = i as f32 * 1e-4; // -20 .. 20
        let xd = x as f64;
        let e_ref = xd.exp();
        worst[0] = worst[0].max(((exp(x) as f64 - e_ref) / e_ref).abs());
        worst[1] = worst[1].max((erfc(x) as f64 - libm::erfc(xd)).abs());
        let g_ref = 0.5 * xd * libm::erfc(-xd / std::f64::consts::SQRT_2);
        worst[2] = worst[2].max((gelu_erf(x) as f64 - g_ref).abs() / xd.abs().max(1.0));
        let s_ref = xd / (1.0 + (-xd).exp());
        worst[3] = worst[3].max((silu(x) as f64 - s_ref).abs() / xd.abs().max(1.0));
    }
    assert!(worst[0] < 4e-7, "exp relative error {:e}", worst[0]);
    assert!(worst[1] < 1e-6, "erfc absolute error {:e}", worst[1]);
    assert!(worst[2] < 5e-7, "gelu error {:e}", worst[2]);
    assert!(worst[3] < 2e-7, "silu error {:e}", worst[3]);
    assert_eq!(exp(-200.0), 0.0);
    assert!(exp(100.0).is_infinite());
    assert!((exp(-87.0) as f64 - (-87f64).exp()).abs() / (-87f64).exp() < 1e-6);
}

#[test]
fn the_softmax_exponential_of_bf16_attention_is_good_to_1e_5() {
    use flipsketch_kernels::exp_nonpositive_coarse as e;
    let mut worst = 0f64;
    for i in 0..=870_000 {
        let x = -(i as f32) * 1e-4; // 0 .. -87
        let want = (x as f64).exp();
        worst = worst.max(((e(x) as f64 - want) / want).abs());
    }
    assert!(worst < 1e-5, "relative error {worst:e}");
    assert_eq!(e(0.0), 1.0);
    assert_eq!(e(-88.0), 0.0);
    assert_eq!(e(f32::NEG_INFINITY), 0.0);
    assert!(e(f32::NAN).is_nan());
}

#[test]
fn a_nan_score_makes_its_attention_row_nan_and_no_other() {
    use flipsketch_kernels::{attention, AttentionShape};
    // The long-sequence path (row blocks, packed probabilities) and the short one.
    for &(lq, lk) in &[(200, 300), (10, 10)] {
        let shape = AttentionShape {
            batch: 2,
            heads: 2,
            lq,
            lk,
            d: 8,
            dv: 8,
        };
        let mut q = random(2 * lq * 2 * 8, 70);
        let k = random(2 * lk * 2 * 8, 71);
        let v = random(2 * lk * 2 * 8, 72);
        // Query row 3 of batch 1, head 0.
        q[(lq + 3) * 16] = f32::NAN;
        for prec in [Precision::F32, Precision::Bf16] {
            let mut out = vec![0f32; 2 * lq * 2 * 8];
            attention(prec, &q, &k, &v, shape, 0.3, &mut out);
            for (i, x) in out.iter().enumerate() {
                let (row, col) = (i / 16, i % 16);
                let nan_row = row == lq + 3 && col < 8;
                assert_eq!(x.is_nan(), nan_row, "{prec:?} {lq}x{lk}: output {i} = {x}");
            }
        }
    }
}

#[test]
fn linear_geglu_equals_linear_then_geglu() {
    use flipsketch_kernels::{geglu, linear, linear_geglu, PackedCols};
    // Rows over several tasks with a short last one; K over two K blocks in f32; bias or not.
    for &(m, k, inner, bias) in &[(1000, 320, 512, true), (700, 600, 384, false)] {
        let n = 2 * inner;
        let x = random(m * k, 80);
        let w = random(n * k, 81);
        let b = random(n, 82);
        let b = bias.then_some(&b[..]);
        for prec in [Precision::F32, Precision::Bf16] {
            let packed = PackedCols::from_transposed(prec, &w, n, k);
            let mut h = vec![0f32; m * n];
            linear(&x, m, &packed, b, &mut h);
            let mut want = vec![0f32; m * inner];
            geglu(&h, inner, &mut want);
            let got = linear_geglu(&x, m, &packed, b).expect("enough rows to fuse");
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{prec:?} {m}x{k}x{n}: the fused GEGLU differs"
            );
        }
    }
    // Too few rows for every thread: the caller's two passes.
    let packed = PackedCols::from_transposed(Precision::F32, &random(128 * 8, 83), 128, 8);
    assert!(linear_geglu(&random(8 * 8, 84), 8, &packed, None).is_none());
}

#[test]
fn layer_norm_matches_reference() {
    // Rows of the UNet's widths, one with a remainder past 16 lanes; values offset from zero
    // (a one-pass variance would lose digits to the mean).
    for &(rows, dim) in &[(37, 320), (5, 1280), (9, 77)] {
        let x: Vec<f32> = random(rows * dim, 140).iter().map(|v| v + 3.0).collect();
        let w = random(dim, 141);
        let b = random(dim, 142);
        let got = flipsketch_kernels::layer_norm(&x, dim, 1e-5, &w, &b);
        let mut want = vec![0f64; rows * dim];
        for r in 0..rows {
            let row = &x[r * dim..][..dim];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
            for j in 0..dim {
                want[r * dim + j] =
                    (row[j] as f64 - mean) / (var + 1e-5).sqrt() * w[j] as f64 + b[j] as f64;
            }
        }
        let e = rel_err(&got, &want);
        assert!(e < 1e-6, "layer_norm {rows}x{dim}: rel err {e:e}");
    }
}

#[test]
fn geglu_matches_reference() {
    let (rows, inner) = (37, 70);
    let h = random(rows * 2 * inner, 40)
        .iter()
        .map(|v| v * 4.0)
        .collect::<Vec<_>>();
    let mut out = vec![f32::NAN; rows * inner];
    flipsketch_kernels::geglu(&h, inner, &mut out);
    let want: Vec<f64> = (0..rows * inner)
        .map(|i| {
            let (r, j) = (i / inner, i % inner);
            let (a, g) = (
                h[r * 2 * inner + j] as f64,
                h[r * 2 * inner + inner + j] as f64,
            );
            a * 0.5 * g * libm::erfc(-g / std::f64::consts::SQRT_2)
        })
        .collect();
    let e = rel_err(&out, &want);
    assert!(e < 1e-6, "geglu rel err {e:e}");
}

#[test]
fn group_norm_matches_reference() {
    use flipsketch_kernels::{group_norm, GroupNormShape};
    // (items, span, channels, plane, groups): per image, spanning 3 frames, one group.
    for &(items, span, c, plane, groups) in &[
        (4, 1, 12, 25, 4),
        (6, 3, 8, 9, 2),
        (2, 2, 5, 7, 1),
        (3, 1, 6, 1, 6),
        // Groups of 80000 values (statistics summed over three parts), spanning 2 frames.
        (4, 2, 4, 40000, 2),
    ] {
        // A mean of 1.5 or 40 against a spread of 3 (one-pass statistics: sum and sum of squares).
        let offset = if plane > 1000 { 40.0 } else { 1.5 };
        let x = random(items * c * plane, 50)
            .iter()
            .map(|v| v * 3.0 + offset)
            .collect::<Vec<_>>();
        let w = random(c, 51);
        let b = random(c, 52);
        for silu_after in [false, true] {
            let mut out = vec![f32::NAN; x.len()];
            let shape = GroupNormShape {
                items,
                span,
                channels: c,
                plane,
                groups,
            };
            group_norm(&x, shape, 1e-5, &w, &b, silu_after, &mut out);
            let cpg = c / groups;
            let mut want = vec![0f64; x.len()];
            for s in 0..items / span {
                for g in 0..groups {
                    let idx: Vec<usize> = (0..span)
                        .flat_map(|f| {
                            (0..cpg * plane)
                                .map(move |j| ((s * span + f) * c + g * cpg) * plane + j)
                        })
                        .collect();
                    let n = idx.len() as f64;
                    let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / n;
                    let var = idx
                        .iter()
                        .map(|&i| (x[i] as f64 - mean).powi(2))
                        .sum::<f64>()
                        / n;
                    for &i in &idx {
                        let ch = (i / plane) % c;
                        let y = (x[i] as f64 - mean) / (var + 1e-5).sqrt() * w[ch] as f64
                            + b[ch] as f64;
                        want[i] = if silu_after {
                            y / (1.0 + (-y).exp())
                        } else {
                            y
                        };
                    }
                }
            }
            let e = rel_err(&out, &want);
            assert!(
                e < 1e-6,
                "group_norm {items}/{span} c{c} p{plane} g{groups} silu {silu_after}: {e:e}"
            );
        }
    }
}

#[test]
fn attention_matches_reference() {
    use flipsketch_kernels::{attention, AttentionShape};
    // Spatial-like (long sequences, split into row blocks), temporal-like (many short items),
    // cross-attention (lk != lq, dv != d).
    for &(batch, heads, lq, lk, d, dv) in &[
        (2, 3, 300, 300, 16, 16),
        (40, 2, 5, 5, 8, 8),
        (3, 2, 17, 77, 24, 12),
        // Keys over several K blocks of P V in both precisions, a last row block of 10 rows.
        (1, 2, 250, 1100, 8, 8),
        // Short sequences: the UNet's temporal shape, lq != lk with dv over 128, and a head
        // too large for the direct path.
        (50, 5, 10, 10, 64, 64),
        (4, 2, 7, 12, 20, 130),
        (3, 1, 6, 6, 136, 8),
        // The VAE's one head of 512 values: keys longer than a K block when packed.
        (1, 1, 40, 40, 600, 8),
    ] {
        let shape = AttentionShape {
            batch,
            heads,
            lq,
            lk,
            d,
            dv,
        };
        let q = random(batch * lq * heads * d, 60);
        let k = random(batch * lk * heads * d, 61);
        let v = random(batch * lk * heads * dv, 62);
        let scale = 1.0 / (d as f32).sqrt() * 3.0;
        let mut want = vec![0f64; batch * lq * heads * dv];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..lq {
                    let s: Vec<f64> = (0..lk)
                        .map(|j| {
                            (0..d)
                                .map(|t| {
                                    q[(b * lq + i) * heads * d + h * d + t] as f64
                                        * k[(b * lk + j) * heads * d + h * d + t] as f64
                                })
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for t in 0..dv {
                        want[(b * lq + i) * heads * dv + h * dv + t] = (0..lk)
                            .map(|j| e[j] / z * v[(b * lk + j) * heads * dv + h * dv + t] as f64)
                            .sum();
                    }
                }
            }
        }
        for (prec, tol) in [(Precision::F32, 2e-6), (Precision::Bf16, 2e-2)] {
            let mut out = vec![f32::NAN; want.len()];
            attention(prec, &q, &k, &v, shape, scale, &mut out);
            let e = rel_err(&out, &want);
            assert!(e < tol, "{prec:?} attention {shape:?}: rel err {e:e}");
        }
    }
}

#[test]
fn attention_first_key_matches_reference() {
    use flipsketch_kernels::{attention_first_key, AttentionShape, FirstKey};
    // Short (direct path) and long (blocked path) sequences.
    for &(batch, heads, lq, lk, d) in &[(6, 2, 10, 10, 16), (9, 5, 10, 10, 64), (2, 2, 40, 40, 8)] {
        let shape = AttentionShape {
            batch,
            heads,
            lq,
            lk,
            d,
            dv: d,
        };
        let q = random(batch * lq * heads * d, 80);
        let k = random(batch * lk * heads * d, 81);
        let v = random(batch * lk * heads * d, 82);
        let key0 = random(batch * heads * d, 83);
        let weight: Vec<f32> = (0..lq).map(|j| 1.0 + 0.5 * j as f32 / 50.0).collect();
        let scale = 0.4;
        let mut want = vec![0f64; batch * lq * heads * d];
        for b in 0..batch {
            for h in 0..heads {
                let item = b * heads + h;
                for i in 0..lq {
                    let qi = |t: usize| q[(b * lq + i) * heads * d + h * d + t] as f64;
                    let s: Vec<f64> = (0..lk)
                        .map(|j| {
                            let dot: f64 = if j == 0 {
                                (0..d)
                                    .map(|t| qi(t) * key0[item * d + t] as f64)
                                    .sum::<f64>()
                                    * weight[i] as f64
                            } else {
                                (0..d)
                                    .map(|t| qi(t) * k[(b * lk + j) * heads * d + h * d + t] as f64)
                                    .sum()
                            };
                            dot * scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for t in 0..d {
                        want[(b * lq + i) * heads * d + h * d + t] = (0..lk)
                            .map(|j| e[j] / z * v[(b * lk + j) * heads * d + h * d + t] as f64)
                            .sum();
                    }
                }
            }
        }
        let mut out = vec![f32::NAN; want.len()];
        let first = FirstKey {
            key0: &key0,
            weight: &weight,
        };
        attention_first_key(Precision::F32, &q, &k, &v, shape, scale, first, &mut out);
        let e = rel_err(&out, &want);
        assert!(e < 2e-6, "first-key attention {shape:?}: rel err {e:e}");
    }
}

#[test]
fn transpose_swaps_the_last_two_dimensions() {
    // (batch, rows, cols): whole 16x16 tiles, ragged edges, rows 4 KiB apart, one row/column,
    // several column blocks per item.
    for &(b, r, c) in &[
        (1, 1, 1),
        (2, 16, 16),
        (3, 17, 33),
        (2, 1024, 20),
        (1, 5, 200),
        (4, 40, 1),
        (0, 3, 4),
    ] {
        let x = random(b * r * c, 90 + r as u64);
        let add = random(b * r * c, 91 + c as u64);
        for with_add in [false, true] {
            let out = flipsketch_kernels::transpose(&x, b, r, c, with_add.then_some(&add[..]));
            assert_eq!(out.len(), b * r * c);
            for i in 0..b {
                for row in 0..r {
                    for col in 0..c {
                        let at = (i * c + col) * r + row;
                        let want =
                            x[(i * r + row) * c + col] + if with_add { add[at] } else { 0.0 };
                        assert_eq!(
                            out[at].to_bits(),
                            want.to_bits(),
                            "transpose {b}x{r}x{c} add {with_add}: item {i} ({row}, {col})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fresh_outputs_equal_outputs_into_buffers() {
    // linear_new / conv2d_new write into memory that was not zeroed: the same bits as
    // linear / conv2d into a buffer of NaNs, so every element is written.
    for prec in [Precision::F32, Precision::Bf16] {
        for &(m, k, n) in &[(13, 7, 33), (200, 1030, 70), (5, 0, 9)] {
            let x = random(m * k, 100);
            let w = PackedCols::from_transposed(prec, &random(n * k, 101), n, k);
            let bias = random(n, 102);
            for b in [None, Some(&bias[..])] {
                let mut want = vec![f32::NAN; m * n];
                linear(&x, m, &w, b, &mut want);
                // Dirty the allocator's free memory first, so that fresh memory is not zeros.
                drop(vec![f32::NAN; m * n]);
                let got = flipsketch_kernels::linear_new(&x, m, &w, b);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{prec:?} linear_new {m}x{k}x{n}"
                );
            }
        }
        for &(imgs, ci, h, wd, co) in &[(2, 4, 8, 8, 5), (5, 9, 4, 4, 13), (1, 3, 9, 13, 14)] {
            let g = ConvGeometry::new(ci, h, wd, 3, 3, 1, 1).expect("valid geometry");
            let x = random(imgs * ci * h * wd, 103);
            let w = PackedRows::new(prec, &random(co * ci * 9, 104), co, ci * 9);
            let bias = random(co, 105);
            let mut want = vec![f32::NAN; imgs * co * h * wd];
            conv2d(&x, imgs, &g, &w, Some(&bias), &mut want);
            drop(vec![f32::NAN; want.len()]);
            let got = flipsketch_kernels::conv2d_new(&x, imgs, &g, &w, Some(&bias));
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{prec:?} conv2d_new {imgs}x{ci}x{h}x{wd} -> {co}"
            );
        }
    }
    assert!(flipsketch_kernels::zeroed(100_000)
        .iter()
        .all(|&v| v == 0.0));
}

/// The temporal convolution in f64: `x` (f, c, pix), `wt` (co, 3c) tap-major, zero frames
/// outside.
fn reference_frames(
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    f: usize,
    c: usize,
    pix: usize,
) -> Vec<f64> {
    let co = bias.len();
    let mut want = vec![0f64; f * co * pix];
    for fr in 0..f {
        for o in 0..co {
            for p in 0..pix {
                let mut acc = bias[o] as f64;
                for t in 0..3 {
                    let src = fr as i64 + t as i64 - 1;
                    if src < 0 || src >= f as i64 {
                        continue;
                    }
                    for ci in 0..c {
                        acc += wt[o * 3 * c + t * c + ci] as f64
                            * x[(src as usize * c + ci) * pix + p] as f64;
                    }
                }
                want[(fr * co + o) * pix + p] = acc;
            }
        }
    }
    want
}

#[test]
fn conv_frames_matches_reference() {
    // (frames, c, h, w, c_out): one frame, two, several; 4x4 images take the path whose
    // columns run over all images, 6x7 one image per task.
    for prec in [Precision::F32, Precision::Bf16] {
        for &(f, c, h, w, co) in &[
            (1, 3, 4, 4, 5),
            (2, 6, 6, 7, 4),
            (5, 7, 4, 4, 9),
            (4, 40, 6, 7, 13),
        ] {
            let x = random(f * c * h * w, 110 + f as u64);
            // (c_out, 3c), tap-major
            let wt = random(co * 3 * c, 111);
            let bias = random(co, 112);
            let packed = PackedRows::new(prec, &wt, co, 3 * c);
            let (xr, wr) = (rounded(prec, &x), rounded(prec, &wt));
            let pix = h * w;
            let got = flipsketch_kernels::conv_frames(&x, f, (c, h, w), &packed, Some(&bias));
            let want = reference_frames(&xr, &wr, &bias, f, c, pix);
            let e = rel_err(&got, &want);
            assert!(
                e < tol(3 * c),
                "{prec:?} conv_frames {f}x{c}x{h}x{w} -> {co}: rel err {e:e}"
            );
        }
    }
}

#[test]
fn conv_frames_winograd_matches_reference() {
    use flipsketch_kernels::conv_frames_winograd;
    // (frames, c, h, w, c_out): one frame, odd and even counts, a bf16 K with an odd channel,
    // more pixels than a block of 256, c_out over several row blocks.
    for &(f, c, h, w, co) in &[
        (1, 3, 4, 4, 5),
        (2, 6, 6, 7, 4),
        (5, 7, 4, 4, 9),
        (10, 40, 17, 19, 30),
    ] {
        let x = random(f * c * h * w, 130 + f as u64);
        let wt = random(co * 3 * c, 131);
        let bias = random(co, 132);
        let want = reference_frames(&x, &wt, &bias, f, c, h * w);
        for prec in [Precision::F32, Precision::Bf16] {
            let u = PackedRows::new_frames_winograd(prec, &wt, co, c);
            let got = conv_frames_winograd(&x, f, (c, h, w), &u, co, Some(&bias), None);
            let plain = flipsketch_kernels::conv_frames(
                &x,
                f,
                (c, h, w),
                &PackedRows::new(prec, &wt, co, 3 * c),
                Some(&bias),
            );
            let (e, e_plain) = (rel_err(&got, &want), rel_err(&plain, &want));
            // f32: within the product tolerance; bf16: within 4x the plain form's error (the
            // transformed frames and weights are rounded once more).
            let bound = match prec {
                Precision::F32 => tol(3 * c),
                Precision::Bf16 => 4.0 * e_plain,
            };
            assert!(
                e < bound,
                "{prec:?} {f}x{c}x{h}x{w} -> {co}: rel err {e:e} (plain {e_plain:e})"
            );
        }
    }
}

#[test]
fn conv_frames_winograd_mapped_equals_the_map_then_the_convolution() {
    use flipsketch_kernels::{conv_frames_winograd, group_norm_affine, GroupNormShape};
    // Two samples of 5 frames whose GroupNorm statistics span each sample's frames; the
    // second sample's planes start 5 * c into the map.
    let (samples, f, c, h, w, co) = (2, 5, 8, 6, 7, 6);
    let x = random(samples * f * c * h * w, 120);
    let gamma = random(c, 121);
    let beta = random(c, 122);
    let shape = GroupNormShape {
        items: samples * f,
        span: f,
        channels: c,
        plane: h * w,
        groups: 4,
    };
    let map = group_norm_affine(&x, shape, 1e-6, &gamma, &beta, true);
    let mapped = map.apply_all(&x, h * w);
    for prec in [Precision::F32, Precision::Bf16] {
        let u = PackedRows::new_frames_winograd(prec, &random(co * 3 * c, 123), co, c);
        let bias = random(co, 124);
        let sample = f * c * h * w;
        for s in 0..samples {
            let xs = &x[s * sample..][..sample];
            let ms = &mapped[s * sample..][..sample];
            let want = conv_frames_winograd(ms, f, (c, h, w), &u, co, Some(&bias), None);
            let input = Some((&map, s * f * c));
            let got = conv_frames_winograd(xs, f, (c, h, w), &u, co, Some(&bias), input);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{prec:?} sample {s}: the mapped convolution differs"
            );
        }
    }
}

/// Packed matrices rebuilt from their slots (as a cache file of packed weights gives them
/// back, in memory the matrix does not own) compute exactly what the originals compute, and
/// slots of the wrong length are refused.
#[test]
fn packed_matrices_rebuilt_from_their_slots_are_the_same() {
    use flipsketch_kernels::Slots;
    use std::sync::Arc;
    for prec in [Precision::F32, Precision::Bf16] {
        for &(m, k, n) in &[(5, 7, 3), (13, 301, 45), (30, 1030, 70)] {
            let x = random(m * k, 11);
            let w = random(n * k, 12);
            let cols = PackedCols::from_transposed(prec, &w, n, k);
            assert_eq!(cols.slots().len(), PackedCols::packed_len(prec, n, k));
            let owner: Arc<Vec<u32>> = Arc::new(cols.slots().to_vec());
            // SAFETY: `owner` holds the values and is kept alive by the Slots.
            let slots = unsafe { Slots::borrowed(owner.clone(), owner.as_ptr(), owner.len()) };
            assert!(slots.is_borrowed());
            let again = PackedCols::from_slots(prec, n, k, slots).unwrap();
            let (mut a, mut b) = (vec![0.0; m * n], vec![1.0; m * n]);
            linear(&x, m, &cols, None, &mut a);
            linear(&x, m, &again, None, &mut b);
            assert_eq!(a, b, "{prec:?} cols {m}x{k}x{n}");
            let short = Slots::owned(cols.slots()[1..].to_vec());
            let err = PackedCols::from_slots(prec, n, k, short).unwrap_err();
            assert!(err.contains("slots"), "{err}");

            // rows: a 1x1 convolution of one image is the product W x
            let g = ConvGeometry::new(k, 1, n, 1, 1, 1, 0).unwrap();
            let rows = PackedRows::new(prec, &w[..m.min(n) * k], m.min(n), k);
            assert_eq!(
                rows.slots().len(),
                PackedRows::packed_len(prec, m.min(n), k)
            );
            let again =
                PackedRows::from_slots(prec, m.min(n), k, Slots::owned(rows.slots().to_vec()))
                    .unwrap();
            let xs = random(k * n, 13);
            let mr = m.min(n);
            let (mut a, mut b) = (vec![0.0; mr * n], vec![1.0; mr * n]);
            conv2d(&xs, 1, &g, &rows, None, &mut a);
            conv2d(&xs, 1, &g, &again, None, &mut b);
            assert_eq!(a, b, "{prec:?} rows {m}x{k}");
            assert!(PackedRows::from_slots(prec, m.min(n), k + 40, Slots::owned(vec![])).is_err());
        }
    }
}
