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
                    e < TOL,
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
            (4, 6, 10, 1, 8, 3, 1, 1, 1),
        ] {
            let g = ConvGeometry::new(ci, h, w, kh, kw, st, pad).expect("valid geometry");
            let k = ci * kh * kw;
            let x = random(imgs * ci * h * w, 20 + ci as u64);
            let wt = random(co * k, 21 + co as u64);
            let bias = random(co, 22);
            let packed = PackedRows::new(prec, &wt, co, k);
            let (xr, wr) = (rounded(prec, &x), rounded(prec, &wt));
            let pix = g.h_out * g.w_out;
            let mut out = vec![f32::NAN; imgs * co * pix];
            conv2d(&x, imgs, &g, &packed, Some(&bias), &mut out);
            let mut want = vec![0f64; out.len()];
            for i in 0..imgs {
                for o in 0..co {
                    for oy in 0..g.h_out {
                        for ox in 0..g.w_out {
                            let mut acc = bias[o] as f64;
                            for c in 0..ci {
                                for ky in 0..kh {
                                    for kx in 0..kw {
                                        let iy = (oy * st + ky) as i64 - pad as i64;
                                        let ix = (ox * st + kx) as i64 - pad as i64;
                                        if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64 {
                                            continue;
                                        }
                                        let xv =
                                            xr[((i * ci + c) * h + iy as usize) * w + ix as usize];
                                        acc +=
                                            xv as f64 * wr[o * k + (c * kh + ky) * kw + kx] as f64;
                                    }
                                }
                            }
                            want[((i * co + o) * g.h_out + oy) * g.w_out + ox] = acc;
                        }
                    }
                }
            }
            let e = rel_err(&out, &want);
            assert!(
                e < TOL,
                "{prec:?} conv {imgs}x{ci}x{h}x{w} -> {co} k{kh}x{kw} s{st} p{pad}: rel err {e:e}"
            );
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
                e < TOL,
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
