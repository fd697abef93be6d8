//! Fused element-wise kernels of the UNet: GroupNorm (+ SiLU), GEGLU, row softmax, SiLU.
//!
//! Branch-free f32 `exp` and `erfc` approximations that the compiler vectorises (AVX-512 where
//! the CPU has it, chosen at run time), run in parallel over rayon's threads.

use rayon::prelude::*;

/// Elements per parallel chunk: large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;

/// `e^x` for f32, relative error about 2 ulp (normal results), 0 below -104, inf above 88.7.
/// Written without float-to-int conversions or clamps so that it vectorises: k = round(x log2 e)
/// comes from the 1.5 * 2^23 shifter, 2^k from two exponent fields (k may be down to -150).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23
    let underflow = x < -104.0;
    let overflow = x > 88.8;
    let xc = x.max(-104.0).min(88.8);
    let t = xc * LOG2E + SHIFT;
    let kf = t - SHIFT;
    let k = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let r = (xc - kf * LN2_HI) - kf * LN2_LO;
    // e^r on [-ln2/2, ln2/2]: Taylor polynomial of degree 7 (truncation error < 1e-8).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668
                        + r * (0.008_333_334 + r * (0.001_388_888_9 + r * 0.000_198_412_7))))));
    let k1 = k >> 1;
    let k2 = k - k1;
    let s1 = f32::from_bits(((k1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((k2 + 127) as u32) << 23);
    let y = p * s1 * s2;
    let y = if underflow { 0.0 } else { y };
    let y = if overflow { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `erfc(x)` (Abramowitz & Stegun 7.1.26 extended by symmetry), absolute error below 1e-6
/// in f32 (about 5 ulp of 1).
#[inline(always)]
pub fn erfc(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = poly * exp(-a * a);
    if x >= 0.0 {
        y
    } else {
        2.0 - y
    }
}

/// GELU with the exact (erf) form: `x * Φ(x)`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * erfc(-x * std::f32::consts::FRAC_1_SQRT_2)
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Defines `fn $name(args)` whose body is compiled three times: for AVX-512 and for AVX2 + FMA
/// (chosen at run time by [`crate::isa`], so that its loops vectorise 16 or 8 wide with inlined
/// `exp`), and for the baseline (SSE2).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn __body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    __body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    __body($($arg),*)
                }
                match crate::isa() {
                    // SAFETY: the CPU has AVX-512F/BW/DQ/VL (checked by isa()).
                    crate::Isa::Avx512Bf16 | crate::Isa::Avx512 => {
                        return unsafe { wide($($arg),*) }
                    }
                    // SAFETY: the CPU has AVX2 and FMA (checked by isa()).
                    crate::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    crate::Isa::Portable => {}
                }
            }
            __body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `out[i]` = the bf16 pair (lo[i], hi[i]), rounded to nearest even.
    pub(crate) fn bf16_pairs(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        for ((o, &a), &b) in out.iter_mut().zip(lo).zip(hi) {
            *o = crate::micro::bf16_pair(a, b);
        }
    }
}

multiversion! {
    /// The slots of `a + sign * b` (f32 when `hi` is `None` and `pairs` false), or in bf16 the
    /// pairs (`lo`: a + sign * b of the even row, `hi`: of the odd row, zeros when absent).
    pub(crate) fn combo_slots(
        lo: (&[f32], &[f32]),
        hi: Option<(&[f32], &[f32])>,
        sign: f32,
        pairs: bool,
        out: &mut [u32],
    ) {
        let (a, b) = lo;
        if !pairs {
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = (x + sign * y).to_bits();
            }
            return;
        }
        match hi {
            Some((c, d)) => {
                for ((((o, &x), &y), &z), &w) in out.iter_mut().zip(a).zip(b).zip(c).zip(d) {
                    *o = crate::micro::bf16_pair(x + sign * y, z + sign * w);
                }
            }
            None => {
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    *o = crate::micro::bf16_pair(x + sign * y, 0.0);
                }
            }
        }
    }
}

multiversion! {
    /// The output transform of the temporal Winograd convolution: `y0 = M0 + M1 + M2 + bias`,
    /// `y1 = M1 - M2 + M3 + bias`.
    pub(crate) fn frames_winograd_output(m: [&[f32]; 4], bias: f32, y0: &mut [f32], y1: &mut [f32]) {
        let [m0, m1, m2, m3] = m;
        for (((((a, b), &w), &x), &y), &z) in
            y0.iter_mut().zip(y1.iter_mut()).zip(m0).zip(m1).zip(m2).zip(m3)
        {
            *a = w + x + y + bias;
            *b = x - y + z + bias;
        }
    }
}

multiversion! {
    /// [`bf16_pairs`] of `map(lo)`, `map(hi)`: each side's `(mean, scale, shift)` as in
    /// [`PlaneAffine`], then SiLU if `silu`; `hi` absent is zeros (not mapped).
    pub(crate) fn bf16_pairs_mapped(
        lo: &[f32],
        hi: Option<&[f32]>,
        ml: [f32; 3],
        mh: [f32; 3],
        silu_after: bool,
        out: &mut [u32],
    ) {
        let f = |v: f32, [m, a, b]: [f32; 3]| {
            let y = (v - m) * a + b;
            if silu_after {
                silu(y)
            } else {
                y
            }
        };
        match hi {
            Some(hi) => {
                for ((o, &x), &y) in out.iter_mut().zip(lo).zip(hi) {
                    *o = crate::micro::bf16_pair(f(x, ml), f(y, mh));
                }
            }
            None => {
                for (o, &x) in out.iter_mut().zip(lo) {
                    *o = crate::micro::bf16_pair(f(x, ml), 0.0);
                }
            }
        }
    }
}

multiversion! {
    /// The bits of `map(x)` (see [`bf16_pairs_mapped`]).
    pub(crate) fn f32_bits_mapped(x: &[f32], m: [f32; 3], silu_after: bool, out: &mut [u32]) {
        let [mean, a, b] = m;
        for (o, &v) in out.iter_mut().zip(x) {
            let y = (v - mean) * a + b;
            *o = if silu_after { silu(y) } else { y }.to_bits();
        }
    }
}

multiversion! {
    /// `out = map(x)` with one plane's `(mean, scale, shift)` ([`PlaneAffine`]), then SiLU.
    pub(crate) fn map_values(x: &[f32], mean: f32, a: f32, b: f32, silu_after: bool, out: &mut [f32]) {
        affine_chunk(x, mean, a, b, silu_after, out)
    }
}

multiversion! {
    /// The Winograd F(2x2, 3x3) input transform `B^T d B` of `n` tiles side by side: `r0..r3`
    /// are the tile row's 4 input rows (2n + 2 values each, tile j at columns 2j..2j+3), `v`
    /// gets element t of tile j at `t * n + j`.
    pub(crate) fn winograd_input(
        r0: &[f32],
        r1: &[f32],
        r2: &[f32],
        r3: &[f32],
        n: usize,
        v: &mut [f32],
    ) {
        let rows = [r0, r1, r2, r3];
        let v = &mut v[..16 * n];
        for j in 0..n {
            // Along each row d B, with d0..d3 = columns 2j..2j+3; then B^T down the rows.
            let mut r = [[0f32; 4]; 4];
            for (a, row) in rows.iter().enumerate() {
                let d = &row[2 * j..2 * j + 4];
                r[a] = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]];
            }
            for l in 0..4 {
                v[l * n + j] = r[0][l] - r[2][l];
                v[(4 + l) * n + j] = r[1][l] + r[2][l];
                v[(8 + l) * n + j] = r[2][l] - r[1][l];
                v[(12 + l) * n + j] = r[1][l] - r[3][l];
            }
        }
    }
}

multiversion! {
    /// The Winograd F(2x2, 3x3) output transform `A^T M A` (+ `bias`) of `n` tiles side by
    /// side: element t of tile j is `m[t * tstride + first + j]`; `y0` and `y1` get the two
    /// output rows (2n values each).
    pub(crate) fn winograd_output(
        m: &[f32],
        tstride: usize,
        first: usize,
        n: usize,
        bias: f32,
        y0: &mut [f32],
        y1: &mut [f32],
    ) {
        let e: [&[f32]; 16] = std::array::from_fn(|t| &m[t * tstride + first..][..n]);
        let (y0, y1) = (&mut y0[..2 * n], &mut y1[..2 * n]);
        for j in 0..n {
            let mut s0 = [0f32; 4];
            let mut s1 = [0f32; 4];
            for i in 0..4 {
                let (a, b, c, d) = (e[i * 4][j], e[i * 4 + 1][j], e[i * 4 + 2][j], e[i * 4 + 3][j]);
                s0[i] = a + b + c;
                s1[i] = b - c - d;
            }
            y0[2 * j] = s0[0] + s0[1] + s0[2] + bias;
            y0[2 * j + 1] = s1[0] + s1[1] + s1[2] + bias;
            y1[2 * j] = s0[1] - s0[2] - s0[3] + bias;
            y1[2 * j + 1] = s1[1] - s1[2] - s1[3] + bias;
        }
    }
}

multiversion! {
    fn silu_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = silu(v);
        }
    }
}

multiversion! {
    pub(crate) fn geglu_rows(h: &[f32], inner: usize, out: &mut [f32]) {
        for (o, h) in out.chunks_exact_mut(inner).zip(h.chunks_exact(2 * inner)) {
            let (hidden, gate) = h.split_at(inner);
            for ((o, &a), &g) in o.iter_mut().zip(hidden).zip(gate) {
                *o = a * gelu_erf(g);
            }
        }
    }
}

multiversion! {
    /// [`softmax_row`] over rows on this thread (inside a parallel task).
    pub(crate) fn softmax_rows_serial(x: &mut [f32], cols: usize, scale: f32) {
        for row in x.chunks_exact_mut(cols) {
            softmax_row(row, scale);
        }
    }
}

multiversion! {
    fn affine_chunk(x: &[f32], mean: f32, a: f32, b: f32, silu_after: bool, out: &mut [f32]) {
        if silu_after {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = silu((v - mean) * a + b);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = (v - mean) * a + b;
            }
        }
    }
}

multiversion! {
    /// Sum and sum of squares in f64.
    fn moments(x: &[f32], out: &mut (f64, f64)) {
        *out = sum_sq_f64(x);
    }
}

/// `out[i] = silu(x[i])`.
pub fn silu_slice(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "silu: lengths differ");
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| silu_chunk(x, o));
}

/// diffusers GEGLU on rows of `2 * inner` values: `out[r, j] = h[r, j] * gelu(h[r, inner + j])`.
pub fn geglu(h: &[f32], inner: usize, out: &mut [f32]) {
    assert!(inner > 0, "geglu: inner size 0");
    assert_eq!(
        h.len() % (2 * inner),
        0,
        "geglu: input is not rows of {}",
        2 * inner
    );
    assert_eq!(out.len() * 2, h.len(), "geglu: output size");
    let rows_per = (CHUNK / inner).max(1);
    let _t = crate::stats::Timer::start(crate::stats::Kernel::Geglu, [h.len(), 0, 0, 0], 0);
    out.par_chunks_mut(rows_per * inner)
        .zip(h.par_chunks(rows_per * 2 * inner))
        .for_each(|(o, h)| geglu_rows(h, inner, o));
}

/// torch `LayerNorm` over rows of `dim` values: `(x - mean) / sqrt(var + eps) * weight + bias`,
/// the mean and the (biased) variance of each row in two passes (torch's order), f32.
pub fn layer_norm(x: &[f32], dim: usize, eps: f32, weight: &[f32], bias: &[f32]) -> Vec<f32> {
    assert!(dim > 0, "layer_norm: rows of 0 values");
    assert_eq!(x.len() % dim, 0, "layer_norm: input is not rows of {dim}");
    assert_eq!(
        (weight.len(), bias.len()),
        (dim, dim),
        "layer_norm: weight and bias are not {dim}"
    );
    let rows_per = (CHUNK / dim).max(1);
    let mut out = Vec::<f32>::with_capacity(x.len());
    out.spare_capacity_mut()
        .par_chunks_mut(rows_per * dim)
        .zip(x.par_chunks(rows_per * dim))
        .for_each(|(o, x)| {
            // SAFETY: f32 has no invalid bit patterns; every element is written below.
            let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            layer_norm_rows(x, dim, eps, weight, bias, o)
        });
    // SAFETY: every chunk of the spare capacity up to x.len() was written.
    unsafe { out.set_len(x.len()) };
    out
}

multiversion! {
    fn layer_norm_rows(x: &[f32], dim: usize, eps: f32, weight: &[f32], bias: &[f32], out: &mut [f32]) {
        const L: usize = 16;
        for (o, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let mut lanes = [0f32; L];
            let mut chunks = x.chunks_exact(L);
            for c in &mut chunks {
                for i in 0..L {
                    lanes[i] += c[i];
                }
            }
            let mean = (chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>())
                / dim as f32;
            let mut lanes = [0f32; L];
            let mut chunks = x.chunks_exact(L);
            for c in &mut chunks {
                for i in 0..L {
                    let d = c[i] - mean;
                    lanes[i] += d * d;
                }
            }
            let tail: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
            let var = (tail + lanes.iter().sum::<f32>()) / dim as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
                *o = (v - mean) * rstd * w + b;
            }
        }
    }
}

/// In place, row by row: `x = softmax(x * scale)`.
pub fn softmax_rows(x: &mut [f32], cols: usize, scale: f32) {
    if cols == 0 {
        return;
    }
    let rows_per = (CHUNK / cols).max(1);
    x.par_chunks_mut(rows_per * cols)
        .for_each(|chunk| softmax_rows_serial(chunk, cols, scale));
}

/// One row of [`softmax_rows`] (`scale` > 0), for callers that already run in parallel.
/// Reductions run in 16 lanes so that they vectorise.
#[inline(always)]
pub fn softmax_row(row: &mut [f32], scale: f32) {
    let inv = 1.0 / exp_row(row, scale);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The unnormalised softmax of a row: `row[i] = e^((row[i] - max) * scale)`; returns their
/// sum.
#[inline(always)]
pub(crate) fn exp_row(row: &mut [f32], scale: f32) -> f32 {
    exp_row_by(row, scale, exp)
}

/// [`exp_row`] with the exponential `e`. In 64 lanes (four vectors: independent chains for
/// the out-of-order core); the maximum ignores NaN (plain compares), a NaN value still makes
/// the row NaN through its exponential and the sum.
#[inline(always)]
fn exp_row_by(row: &mut [f32], scale: f32, e: impl Fn(f32) -> f32) -> f32 {
    const L: usize = 64;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut sums = [0f32; L];
    let mut chunks = row.chunks_exact_mut(L);
    for c in &mut chunks {
        for i in 0..L {
            let v = e((c[i] - max) * scale);
            c[i] = v;
            sums[i] += v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = e((*v - max) * scale);
        tail += *v;
    }
    tail + sums.iter().sum::<f32>()
}

/// `e^x` for the arguments of a softmax (`x <= 0` after the maximum is subtracted; NaN stays
/// NaN, below -87 gives 0), to a relative error under 1e-5 (7e-6 measured; the polynomial's
/// part is 2.4e-6, the rest is the single reduction constant's rounding at large |x|): far
/// under the 2^-9 of the bf16 the probabilities are rounded to when the products run in bf16.
/// One reduction constant, a degree-5 polynomial and a single exponent field: about half the
/// work of [`exp`].
#[inline(always)]
pub fn exp_nonpositive_coarse(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2: f32 = std::f32::consts::LN_2;
    const SHIFT: f32 = 12_582_912.0; // 1.5 * 2^23
    let xc = x.max(-87.0).min(0.0);
    let t = xc * LOG2E + SHIFT;
    let kf = t - SHIFT;
    let k = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let r = xc - kf * LN2;
    // Taylor to degree 5 on [-ln2/2, ln2/2]: truncation under (ln2/2)^6/720 = 2.4e-6.
    let p =
        1.0 + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * 0.008_333_334))));
    let y = p * f32::from_bits(((k + 127) as u32) << 23);
    let y = if x < -87.0 { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

multiversion! {
    /// [`exp_row`] with [`exp_nonpositive_coarse`]; `sum` gets the row's sum.
    fn exp_row_coarse(row: &mut [f32], scale: f32, sum: &mut f32) {
        *sum = exp_row_by(row, scale, exp_nonpositive_coarse);
    }
}

multiversion! {
    fn exp_row_exact(row: &mut [f32], scale: f32, sum: &mut f32) {
        *sum = exp_row(row, scale);
    }
}

/// The unnormalised softmax of a row, `row[i] = e^((row[i] - max) * scale)` (`scale` > 0),
/// returning the sum: with [`exp`] when `coarse` is false, else with
/// [`exp_nonpositive_coarse`] (for probabilities that are then rounded to bf16).
pub(crate) fn softmax_numerators(row: &mut [f32], scale: f32, coarse: bool) -> f32 {
    let mut sum = 0.0;
    if coarse {
        exp_row_coarse(row, scale, &mut sum);
    } else {
        exp_row_exact(row, scale, &mut sum);
    }
    sum
}

/// Shape of a GroupNorm whose statistics can span several consecutive items (frames).
#[derive(Clone, Copy, Debug)]
pub struct GroupNormShape {
    /// Items in the batch (samples x frames).
    pub items: usize,
    /// Consecutive items sharing statistics (1 for a per-image GroupNorm).
    pub span: usize,
    pub channels: usize,
    /// Values per channel of an item (h * w).
    pub plane: usize,
    pub groups: usize,
}

/// What a GroupNorm (+ SiLU) does to each (item, channel) plane of its input: `y = (x -
/// mean) * scale + shift`, then SiLU when `silu`. [`group_norm_affine`] computes it from the
/// statistics; a convolution can apply it while it reads its input
/// ([`crate::ConvFusion::input`]) instead of reading a normalised copy.
#[derive(Clone, Debug, PartialEq)]
pub struct PlaneAffine {
    /// One value per (item, channel), item-major.
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub silu: bool,
}

impl PlaneAffine {
    /// Planes described (items x channels).
    pub fn planes(&self) -> usize {
        self.mean.len()
    }

    /// `(mean, scale, shift)` of plane `i`.
    #[inline]
    pub(crate) fn of(&self, i: usize) -> [f32; 3] {
        [self.mean[i], self.scale[i], self.shift[i]]
    }

    /// `out = map(x)` for the values of plane `i` (any part of it).
    pub fn apply(&self, i: usize, x: &[f32], out: &mut [f32]) {
        let [mean, a, b] = self.of(i);
        affine_chunk(x, mean, a, b, self.silu, out);
    }

    /// The whole mapped input, `x` being `planes()` planes of `plane` values.
    pub fn apply_all(&self, x: &[f32], plane: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            self.planes() * plane,
            "plane affine: input is not {} planes of {plane}",
            self.planes()
        );
        let mut out = crate::zeroed(x.len());
        out.par_chunks_mut(plane.max(1))
            .zip(x.par_chunks(plane.max(1)))
            .enumerate()
            .for_each(|(i, (o, x))| self.apply(i, x, o));
        out
    }
}

/// The map of a GroupNorm of `x` (items, channels, plane) with affine `weight`/`bias`, then
/// SiLU if `silu_after`. Mean and variance (biased) of each (span of items, group) are
/// accumulated in f64 in one pass (sum and sum of squares: in f64 the cancellation of
/// `E[x^2] - mean^2` costs nothing at the ratios of mean to spread activations have).
pub fn group_norm_affine(
    x: &[f32],
    shape: GroupNormShape,
    eps: f32,
    weight: &[f32],
    bias: &[f32],
    silu_after: bool,
) -> PlaneAffine {
    let _t = crate::stats::Timer::start(crate::stats::Kernel::GroupNorm, [x.len(), 0, 0, 0], 0);
    affine_of(x, shape, eps, weight, bias, silu_after)
}

fn affine_of(
    x: &[f32],
    shape: GroupNormShape,
    eps: f32,
    weight: &[f32],
    bias: &[f32],
    silu_after: bool,
) -> PlaneAffine {
    let GroupNormShape {
        items,
        span,
        channels,
        plane,
        groups,
    } = shape;
    assert!(
        groups > 0 && channels % groups == 0,
        "group_norm: {groups} groups for {channels} channels"
    );
    assert!(
        span > 0 && items % span == 0,
        "group_norm: {items} items in spans of {span}"
    );
    assert_eq!(x.len(), items * channels * plane, "group_norm: input size");
    assert_eq!(weight.len(), channels, "group_norm: weight size");
    assert_eq!(bias.len(), channels, "group_norm: bias size");
    let cpg = channels / groups;
    let item_len = channels * plane;
    let group_len = cpg * plane;
    let count = (span * group_len) as f64;
    // Statistics per (sample, group); each group's values in chunks, one task each.
    const PART: usize = 1 << 15;
    let parts = group_len.div_ceil(PART).max(1);
    let sums: Vec<(f64, f64)> = (0..items / span * groups * span * parts)
        .into_par_iter()
        .map(|t| {
            let (sgf, part) = (t / parts, t % parts);
            let (sg, f) = (sgf / span, sgf % span);
            let (s, g) = (sg / groups, sg % groups);
            let values = &x[(s * span + f) * item_len + g * group_len..][..group_len];
            let values = &values[(part * PART).min(group_len)..((part + 1) * PART).min(group_len)];
            let mut m = (0.0, 0.0);
            moments(values, &mut m);
            m
        })
        .collect();
    let stats: Vec<(f32, f32)> = sums
        .chunks(span * parts)
        .map(|c| {
            let (sum, sq) = c.iter().fold((0.0, 0.0), |a, m| (a.0 + m.0, a.1 + m.1));
            let mean = sum / count;
            let var = (sq / count - mean * mean).max(0.0);
            (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
        })
        .collect();
    let n = items * channels;
    let mut map = PlaneAffine {
        mean: Vec::with_capacity(n),
        scale: Vec::with_capacity(n),
        shift: Vec::with_capacity(n),
        silu: silu_after,
    };
    for ic in 0..n {
        let (item, c) = (ic / channels, ic % channels);
        let (mean, rstd) = stats[(item / span) * groups + c / cpg];
        map.mean.push(mean);
        map.scale.push(rstd * weight[c]);
        map.shift.push(bias[c]);
    }
    map
}

/// GroupNorm of `x` (items, channels, plane) with affine `weight`/`bias`, optionally followed by
/// SiLU: [`group_norm_affine`] applied.
pub fn group_norm(
    x: &[f32],
    shape: GroupNormShape,
    eps: f32,
    weight: &[f32],
    bias: &[f32],
    silu_after: bool,
    out: &mut [f32],
) {
    assert_eq!(out.len(), x.len(), "group_norm: output size");
    let _t = crate::stats::Timer::start(crate::stats::Kernel::GroupNorm, [x.len(), 0, 0, 0], 0);
    let map = affine_of(x, shape, eps, weight, bias, silu_after);
    let plane = shape.plane.max(1);
    out.par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .enumerate()
        .for_each(|(i, (o, x))| map.apply(i, x, o));
}

/// Sum and sum of squares in f64, 8 independent lanes each (vectorisable).
#[inline(always)]
fn sum_sq_f64(x: &[f32]) -> (f64, f64) {
    let mut acc = [0f64; 8];
    let mut sq = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            let v = c[i] as f64;
            acc[i] += v;
            sq[i] += v * v;
        }
    }
    let tail = rest.iter().map(|&v| v as f64);
    (
        acc.iter().sum::<f64>() + tail.clone().sum::<f64>(),
        sq.iter().sum::<f64>() + tail.map(|v| v * v).sum::<f64>(),
    )
}
