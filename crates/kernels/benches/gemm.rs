//! `cargo bench -p flipsketch-kernels`: GFLOP/s of the kernels at the UNet's shapes.

use std::time::Instant;

use flipsketch_kernels::{
    attention, conv2d, conv_frames, conv_frames_winograd, linear, matmul, AttentionShape,
    ConvGeometry, PackedCols, PackedRows, Precision,
};

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `cargo bench -p flipsketch-kernels -- NAME`: only the sections whose name contains NAME
/// (transpose, and per precision F32 or Bf16: linear, conv, winograd, temporal, matmul, attention; all names
/// given must match).
fn wanted(section: &str) -> bool {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .all(|a| section.contains(a.as_str()))
}

fn main() {
    println!(
        "isa {:?}, threads {}",
        flipsketch_kernels::isa(),
        rayon::current_num_threads()
    );
    let fill = |n: usize| {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect::<Vec<f32>>()
    };
    // The transformers' permutations at 32x32, 10 frames: (10, 320, 1024) spatial in,
    // (1, 3200, 1024) temporal in, (1, 1024, 3200) temporal out with the residual.
    for &(b, r, c, add) in [
        (10, 320, 1024, false),
        (1, 3200, 1024, false),
        (1, 1024, 3200, true),
    ]
    .iter()
    .filter(|_| wanted("transpose"))
    {
        let x = fill(b * r * c);
        let a = fill(b * r * c);
        let s = best_of(10, || {
            std::hint::black_box(flipsketch_kernels::transpose(
                &x,
                b,
                r,
                c,
                add.then_some(&a[..]),
            ));
        });
        println!(
            "transpose {b}x{r}x{c} add {add}: {:.2} ms, {:.1} GB/s",
            s * 1e3,
            ((2 + add as usize) * 4 * b * r * c) as f64 / s / 1e9
        );
    }
    for prec in [Precision::F32, Precision::Bf16] {
        if wanted(&format!("{prec:?} linear")) {
            // Linear at the top level of the UNet: 10 frames of 32x32 tokens.
            for &(m, k, n) in &[
                (10240, 320, 320),
                (10240, 320, 2560),
                (10240, 1280, 320),
                (2560, 640, 640),
                // The 8x8 level (640 tokens): GEGLU projection, 26 MB of bf16 weights, and q/k/v.
                (640, 1280, 10240),
                (640, 1280, 1280),
            ] {
                let x = fill(m * k);
                let w = PackedCols::from_transposed(prec, &fill(n * k), n, k);
                let mut out = vec![0.0; m * n];
                let s = best_of(10, || linear(&x, m, &w, None, &mut out));
                // As in a model, where every layer has weights of its own: each call with other
                // weights (64 MB of them in all, past the L3 cache) into other outputs.
                let sets = (64usize << 20)
                    .div_ceil(PackedCols::packed_len(prec, n, k) * 4)
                    .max(2);
                let ws: Vec<_> = (0..sets)
                    .map(|i| PackedCols::from_transposed(prec, &fill(n * k + i)[i..], n, k))
                    .collect();
                let mut outs: Vec<Vec<f32>> = (0..4).map(|_| vec![0.0; m * n]).collect();
                let mut i = 0;
                let cold = best_of(2 * sets, || {
                    linear(&x, m, &ws[i % sets], None, &mut outs[i % 4]);
                    i += 1;
                });
                println!(
                    "{prec:?} linear {m}x{k}x{n}: {:.1} ms, {:.0} GFLOP/s; weights from memory {:.0} GFLOP/s",
                    s * 1e3,
                    2.0 * (m * k * n) as f64 / s / 1e9,
                    2.0 * (m * k * n) as f64 / cold / 1e9
                );
            }
        }
        if wanted(&format!("{prec:?} conv")) {
            // 3x3 convolutions of the ResNets at 32x32, 16x16, 8x8 and 4x4, 10 frames.
            for &(c, hw, co) in &[
                (320, 32, 320),
                (640, 16, 640),
                (1280, 8, 1280),
                (1280, 4, 1280),
            ] {
                let g = ConvGeometry::new(c, hw, hw, 3, 3, 1, 1).unwrap();
                let x = fill(10 * c * hw * hw);
                let w = PackedRows::new(prec, &fill(co * c * 9), co, c * 9);
                let mut out = vec![0.0; 10 * co * hw * hw];
                let s = best_of(10, || conv2d(&x, 10, &g, &w, None, &mut out));
                let flops = 2.0 * (10 * hw * hw * co * c * 9) as f64;
                println!(
                    "{prec:?} conv3x3 10x{c}x{hw}x{hw} -> {co}: {:.1} ms, {:.0} GFLOP/s",
                    s * 1e3,
                    flops / s / 1e9
                );
            }
            // 3x3 convolutions of the VAE decoder, one 256 px frame: 512 channels at 32x32 and
            // 64x64, 256 at 128x128, 128 at 256x256.
            for &(c, hw) in &[(512, 32), (512, 64), (256, 128), (128, 256)] {
                let g = ConvGeometry::new(c, hw, hw, 3, 3, 1, 1).unwrap();
                let x = fill(c * hw * hw);
                let w = PackedRows::new(prec, &fill(c * c * 9), c, c * 9);
                let mut out = vec![0.0; c * hw * hw];
                let s = best_of(5, || conv2d(&x, 1, &g, &w, None, &mut out));
                let flops = 2.0 * (hw * hw * c * c * 9) as f64;
                println!(
                    "{prec:?} VAE conv3x3 1x{c}x{hw}x{hw} -> {c}: {:.1} ms, {:.0} GFLOP/s",
                    s * 1e3,
                    flops / s / 1e9
                );
            }
        }
        if wanted(&format!("{prec:?} winograd")) {
            // 3x3 convolutions of 10 frames by Winograd F(2x2, 3x3) at the UNet's levels (the
            // 8x8 and 4x4 ones as the model's sample size does not choose them: for comparison);
            // GFLOP/s of the direct form's multiplications, beside the patch GEMM's.
            for &(c, hw, co) in &[
                (320, 32, 320),
                (640, 32, 320),
                (640, 16, 640),
                (1280, 16, 640),
                (1280, 8, 1280),
                (2560, 8, 1280),
                (1280, 4, 1280),
            ] {
                let g = ConvGeometry::new(c, hw, hw, 3, 3, 1, 1).unwrap();
                let x = fill(10 * c * hw * hw);
                let wt = fill(co * c * 9);
                let plain = PackedRows::new(prec, &wt, co, c * 9);
                let wino = PackedRows::new_winograd(prec, &wt, co, c);
                let mut out = vec![0.0; 10 * co * hw * hw];
                let s = best_of(5, || conv2d(&x, 10, &g, &plain, None, &mut out));
                let sw = best_of(5, || conv2d(&x, 10, &g, &wino, None, &mut out));
                let flops = 2.0 * (10 * hw * hw * co * c * 9) as f64;
                println!(
                    "{prec:?} winograd conv3x3 10x{c}x{hw}x{hw} -> {co}: patches {:.1} ms, {:.0} GFLOP/s; \
                     Winograd {:.1} ms, {:.0} GFLOP/s",
                    s * 1e3,
                    flops / s / 1e9,
                    sw * 1e3,
                    flops / sw / 1e9
                );
            }
        }
        if wanted(&format!("{prec:?} temporal")) {
            // The temporal convolutions of 10 frames at every level, plain (one GEMM with K = 3c
            // over 1x1 patches) and by Winograd over the frames; GFLOP/s of the plain form's
            // multiplications. FLIPSKETCH_BENCH_ONLY=winograd skips the plain form.
            let only_wino = std::env::var("FLIPSKETCH_BENCH_ONLY").as_deref() == Ok("winograd");
            for &(c, hw) in &[(320, 32), (640, 16), (1280, 8), (1280, 4)] {
                let (f, pix) = (10, hw * hw);
                let x = fill(f * c * pix);
                let wt = fill(c * 3 * c);
                let plain = PackedRows::new(prec, &wt, c, 3 * c);
                let wino = PackedRows::new_frames_winograd(prec, &wt, c, c);
                let s = if only_wino {
                    f64::NAN
                } else {
                    best_of(10, || {
                        std::hint::black_box(conv_frames(&x, f, (c, hw, hw), &plain, None));
                    })
                };
                let sw = best_of(10, || {
                    std::hint::black_box(conv_frames_winograd(
                        &x,
                        f,
                        (c, hw, hw),
                        &wino,
                        c,
                        None,
                        None,
                    ));
                });
                let flops = 2.0 * (f * pix * c * 3 * c) as f64;
                println!(
                    "{prec:?} temporal conv 10x{c}x{hw}x{hw}: plain {:.1} ms, {:.0} GFLOP/s; \
                     Winograd {:.1} ms, {:.0} GFLOP/s",
                    s * 1e3,
                    flops / s / 1e9,
                    sw * 1e3,
                    flops / sw / 1e9
                );
            }
        }
        if wanted(&format!("{prec:?} matmul")) {
            // Attention scores and values at 32x32: 10 frames x 5 heads, 1024 tokens, 64 dims.
            let (b, l, d) = (50, 1024, 64);
            let q = fill(b * l * d);
            let kt = fill(b * d * l);
            let mut s_out = vec![0.0; b * l * l];
            let s = best_of(10, || matmul(prec, &q, &kt, b, l, d, l, &mut s_out));
            for dd in [32usize, 64, 128, 256] {
                let (bb, ll) = (50, 1024);
                let qq = fill(bb * ll * dd);
                let kk = fill(bb * dd * ll);
                let mut so = vec![0.0; bb * ll * ll];
                let t = best_of(5, || matmul(prec, &qq, &kk, bb, ll, dd, ll, &mut so));
                println!(
                    "{prec:?} matmul 50x1024x{dd}x1024 (short K): {:.0} GFLOP/s",
                    2.0 * (bb * ll * ll * dd) as f64 / t / 1e9
                );
            }
            println!(
                "{prec:?} matmul q@kT {b}x{l}x{d}x{l}: {:.1} ms, {:.0} GFLOP/s",
                s * 1e3,
                2.0 * (b * l * l * d) as f64 / s / 1e9
            );
        }
        if wanted(&format!("{prec:?} attention")) {
            // Attention at 32x32: spatial self (10 frames x 5 heads x 1024 tokens), cross (77
            // text tokens), temporal (1024 pixels x 5 heads x 10 frames).
            for &(batch, heads, lq, lk) in
                &[(10, 5, 1024, 1024), (10, 5, 1024, 77), (1024, 5, 10, 10)]
            {
                let shape = AttentionShape {
                    batch,
                    heads,
                    lq,
                    lk,
                    d: 64,
                    dv: 64,
                };
                let q = fill(batch * lq * heads * 64);
                let kv = fill(batch * lk * heads * 64);
                let mut o = vec![0.0; batch * lq * heads * 64];
                let s = best_of(10, || attention(prec, &q, &kv, &kv, shape, 0.125, &mut o));
                let flops = 4.0 * (batch * heads * lq * lk * 64) as f64;
                println!(
                    "{prec:?} attention {batch}x{heads} {lq}x{lk}: {:.1} ms, {:.0} GFLOP/s",
                    s * 1e3,
                    flops / s / 1e9
                );
            }
        }
    }
}
