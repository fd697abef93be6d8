//! Micro-kernels: one MR x NR tile of C from a packed A row block and a packed B panel.
//!
//! A block, in one of two layouts ([`ALayout`]): MR rows of `KC` slots (row stride KC, only
//! the first `kc` used), or slot-major (slot s of row r at `s * MR + r`), which takes exactly
//! `MR * kc` slots.
//! B panel: `kc` slots of NR columns. A slot is one f32, or two bf16 (even k in the low half).

use crate::{Precision, KC, MR, NR};

/// How a tile's accumulators start.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TileInit {
    Zero,
    /// C += A B: start from what C holds.
    Accumulate,
    /// One value per row of the tile (`rows` values).
    RowBias(*const f32),
    /// One value per column of the tile (`cols` values).
    ColBias(*const f32),
}

/// Computes one tile. `c` points at the tile's first element, `ldc` is C's row stride; only
/// `rows` x `cols` elements are read or written.
pub(crate) type Micro = unsafe fn(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: TileInit,
);

/// How a direct convolution's K runs through B: `count` segments (kernel taps) of `len`
/// slots each; segment `t` starts `offsets[t]` slots into the B operand and has `ldb` slots
/// between consecutive slots. A's slots run on across the segments (slot-major).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segments {
    pub count: usize,
    pub len: usize,
    pub offsets: *const usize,
    pub ldb: usize,
}

/// A direct-convolution tile: like [`Micro`] with K in [`Segments`], A slot-major.
pub(crate) type MicroTaps = unsafe fn(
    seg: Segments,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: TileInit,
);

/// The direct-convolution kernel for `prec` on `isa`.
pub(crate) fn select_taps(prec: Precision, isa: Isa) -> MicroTaps {
    match (prec, isa) {
        #[cfg(target_arch = "x86_64")]
        (Precision::Bf16, Isa::Avx512Bf16) => x86::taps_bf16,
        #[cfg(target_arch = "x86_64")]
        (Precision::F32, Isa::Avx512Bf16 | Isa::Avx512) => x86::taps_f32,
        #[cfg(target_arch = "x86_64")]
        (Precision::F32, Isa::Avx2) => avx2::taps_f32,
        (Precision::Bf16, _) => portable_taps_bf16,
        (Precision::F32, _) => portable_taps_f32,
    }
}

/// What this CPU can run, decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F with AVX512-BF16 (`vdpbf16ps`): native f32 and bf16 kernels.
    Avx512Bf16,
    /// AVX-512F without BF16 dot products: native f32, portable bf16.
    Avx512,
    /// AVX2 with FMA, no AVX-512 (most laptop and desktop CPUs, AMD Zen 1-3): native f32 in
    /// 8-lane vectors, portable bf16.
    Avx2,
    /// Portable Rust (auto-vectorised for the baseline x86-64: SSE2).
    Portable,
}

/// What this CPU runs, once per process. `FLIPSKETCH_OPS=portable` makes it [`Isa::Portable`]
/// on any CPU, so that the portable code (what CPUs without AVX2 and ARM machines run) can be
/// tested anywhere; `FLIPSKETCH_OPS=avx2` makes it [`Isa::Avx2`] on CPUs that have AVX2 and
/// FMA (every AVX-512 one), so that the AVX2 kernels can be tested on AVX-512 machines.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let forced = std::env::var("FLIPSKETCH_OPS").unwrap_or_default();
        match forced.trim().to_ascii_lowercase().as_str() {
            "portable" => Isa::Portable,
            "avx2" if has_avx2() => Isa::Avx2,
            _ => hardware_isa(),
        }
    })
}

/// Whether the CPU has AVX2 and FMA.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What this CPU's instructions allow, whatever `FLIPSKETCH_OPS` says (what `--dtype auto`
/// asks: a CPU with bf16 products runs bf16).
pub fn hardware_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let f = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw");
        if f && std::arch::is_x86_feature_detected!("avx512bf16") {
            return Isa::Avx512Bf16;
        }
        if f {
            return Isa::Avx512;
        }
    }
    if has_avx2() {
        return Isa::Avx2;
    }
    Isa::Portable
}

/// Where slot `s` of row `r` of an A block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ALayout {
    /// `r * KC + s`: rows packed on the fly, each with one contiguous conversion.
    Rows,
    /// `s * MR + r`: packed weights, compact (no padding of short K blocks to KC).
    Interleaved,
}

impl ALayout {
    #[inline(always)]
    pub(crate) const fn index(self, r: usize, s: usize) -> usize {
        match self {
            ALayout::Rows => r * KC + s,
            ALayout::Interleaved => s * MR + r,
        }
    }
}

pub(crate) fn select(prec: Precision, isa: Isa, layout: ALayout) -> Micro {
    use ALayout::*;
    match (prec, isa, layout) {
        #[cfg(target_arch = "x86_64")]
        (Precision::Bf16, Isa::Avx512Bf16, Rows) => x86::micro_bf16::<false>,
        #[cfg(target_arch = "x86_64")]
        (Precision::Bf16, Isa::Avx512Bf16, Interleaved) => x86::micro_bf16::<true>,
        #[cfg(target_arch = "x86_64")]
        (Precision::F32, Isa::Avx512Bf16 | Isa::Avx512, Rows) => x86::micro_f32::<false>,
        #[cfg(target_arch = "x86_64")]
        (Precision::F32, Isa::Avx512Bf16 | Isa::Avx512, Interleaved) => x86::micro_f32::<true>,
        #[cfg(target_arch = "x86_64")]
        (Precision::F32, Isa::Avx2, Rows) => avx2::micro_f32::<false>,
        #[cfg(target_arch = "x86_64")]
        (Precision::F32, Isa::Avx2, Interleaved) => avx2::micro_f32::<true>,
        (Precision::Bf16, _, Rows) => portable_bf16::<false>,
        (Precision::Bf16, _, Interleaved) => portable_bf16::<true>,
        (Precision::F32, _, Rows) => portable_f32::<false>,
        (Precision::F32, _, Interleaved) => portable_f32::<true>,
    }
}

/// The layout of a micro-kernel's const parameter.
#[inline(always)]
const fn layout_of(interleaved: bool) -> ALayout {
    if interleaved {
        ALayout::Interleaved
    } else {
        ALayout::Rows
    }
}

/// Round-to-nearest-even f32 -> bf16 bits (NaN stays NaN).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b.wrapping_add(0x7FFF + ((b >> 16) & 1))) >> 16) as u16
}

#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The slot of two k values.
#[inline]
pub fn bf16_pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

#[inline]
fn unpair(s: u32) -> (f32, f32) {
    (bf16_to_f32(s as u16), bf16_to_f32((s >> 16) as u16))
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable(
    layout: ALayout,
    seg: Segments,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: TileInit,
    fma: impl Fn(&mut [f32; NR], u32, &[u32]),
) {
    let mut acc = [[0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate().take(rows) {
        for (j, v) in row.iter_mut().enumerate().take(cols) {
            *v = match init {
                TileInit::Zero => 0.0,
                TileInit::Accumulate => *c.add(r * ldc + j),
                TileInit::RowBias(p) => *p.add(r),
                TileInit::ColBias(p) => *p.add(j),
            };
        }
    }
    for t in 0..seg.count {
        let bt = b.add(*seg.offsets.add(t));
        for s in 0..seg.len {
            let bs = std::slice::from_raw_parts(bt.add(s * seg.ldb), NR);
            for (r, row) in acc.iter_mut().enumerate() {
                fma(row, *a.add(layout.index(r, t * seg.len + s)), bs);
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(rows) {
        for (j, v) in row.iter().enumerate().take(cols) {
            *c.add(r * ldc + j) = *v;
        }
    }
}

/// A plain GEMM tile's K: one segment of `kc` slots, NR apart.
fn one_segment(kc: usize) -> Segments {
    const ZERO: &usize = &0;
    Segments {
        count: 1,
        len: kc,
        offsets: ZERO,
        ldb: NR,
    }
}

/// The f32 product of one slot pair: `row += a * b`.
fn fma_f32(row: &mut [f32; NR], av: u32, bs: &[u32]) {
    let x = f32::from_bits(av);
    for (v, &bv) in row.iter_mut().zip(bs) {
        *v += x * f32::from_bits(bv);
    }
}

/// The bf16 product of one slot: two products per lane.
fn fma_bf16(row: &mut [f32; NR], av: u32, bs: &[u32]) {
    let (x0, x1) = unpair(av);
    for (v, &bv) in row.iter_mut().zip(bs) {
        let (y0, y1) = unpair(bv);
        *v += x0 * y0 + x1 * y1;
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable_taps_f32(
    seg: Segments,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: TileInit,
) {
    portable(
        ALayout::Interleaved,
        seg,
        a,
        b,
        c,
        ldc,
        rows,
        cols,
        init,
        fma_f32,
    )
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable_taps_bf16(
    seg: Segments,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: TileInit,
) {
    portable(
        ALayout::Interleaved,
        seg,
        a,
        b,
        c,
        ldc,
        rows,
        cols,
        init,
        fma_bf16,
    )
}

unsafe fn portable_f32<const IL: bool>(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: TileInit,
) {
    portable(
        layout_of(IL),
        one_segment(kc),
        a,
        b,
        c,
        ldc,
        rows,
        cols,
        init,
        fma_f32,
    )
}

unsafe fn portable_bf16<const IL: bool>(
    kc: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: TileInit,
) {
    portable(
        layout_of(IL),
        one_segment(kc),
        a,
        b,
        c,
        ldc,
        rows,
        cols,
        init,
        fma_bf16,
    )
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{layout_of, ALayout, Segments, TileInit};
    use crate::{MR, NR};
    use std::arch::x86_64::*;

    #[inline(always)]
    fn masks(cols: usize) -> (u16, u16) {
        let m = |n: usize| {
            if n >= 16 {
                0xFFFF
            } else {
                ((1u32 << n) - 1) as u16
            }
        };
        (m(cols), m(cols.saturating_sub(16)))
    }

    /// Shared body of the AVX-512 kernels; `$step` adds one slot's products into `acc`.
    /// K runs in `$nseg` segments of `$kc` slots: A's slots follow each other across segments,
    /// B's segment `t` starts at `$b + $boff(t)` with `$ldb` slots between its slots (one
    /// segment at offset 0 with stride NR is a plain GEMM tile; a direct convolution has one
    /// segment per kernel tap).
    macro_rules! tile {
        ($layout:expr, $kc:expr, $a:expr, $b:expr, $c:expr, $ldc:expr, $rows:expr, $cols:expr, $init:expr, |$x0:ident, $x1:ident, $av:ident, $b0:ident, $b1:ident| $step:block) => {
            tile!(
                $layout,
                1,
                $kc,
                |_t: usize| 0usize,
                NR,
                $a,
                $b,
                $c,
                $ldc,
                $rows,
                $cols,
                $init,
                |$x0, $x1, $av, $b0, $b1| $step
            )
        };
        ($layout:expr, $nseg:expr, $kc:expr, $boff:expr, $ldb:expr, $a:expr, $b:expr, $c:expr, $ldc:expr, $rows:expr, $cols:expr, $init:expr, |$x0:ident, $x1:ident, $av:ident, $b0:ident, $b1:ident| $step:block) => {{
            let (m0, m1) = masks($cols);
            // Fetch the tile of C while the products run: its lines are usually not cached,
            // and missing on the stores at the end costs as much as a short K loop.
            for r in 0..$rows {
                let p = $c.add(r * $ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_ET0>(p);
                _mm_prefetch::<_MM_HINT_ET0>(p.add(64));
                _mm_prefetch::<_MM_HINT_ET0>(p.add(127));
            }
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            match $init {
                TileInit::Zero => {}
                TileInit::Accumulate if $cols == NR => {
                    for r in 0..MR {
                        if r < $rows {
                            acc[r][0] = _mm512_loadu_ps($c.add(r * $ldc));
                            acc[r][1] = _mm512_loadu_ps($c.add(r * $ldc + 16));
                        }
                    }
                }
                TileInit::Accumulate => {
                    for r in 0..MR {
                        if r < $rows {
                            acc[r][0] = _mm512_maskz_loadu_ps(m0, $c.add(r * $ldc));
                            acc[r][1] = _mm512_maskz_loadu_ps(m1, $c.add(r * $ldc + 16));
                        }
                    }
                }
                TileInit::RowBias(p) => {
                    for r in 0..MR {
                        if r < $rows {
                            let v = _mm512_set1_ps(*p.add(r));
                            acc[r] = [v, v];
                        }
                    }
                }
                TileInit::ColBias(p) => {
                    let v0 = _mm512_maskz_loadu_ps(m0, p);
                    let v1 = _mm512_maskz_loadu_ps(m1, p.add(16));
                    for r in 0..MR {
                        acc[r] = [v0, v1];
                    }
                }
            }
            for t in 0..$nseg {
                let bt = $b.add(($boff)(t));
                let at = t * $kc;
                for s in 0..$kc {
                    let $b0 = _mm512_loadu_ps(bt.add(s * $ldb) as *const f32);
                    let $b1 = _mm512_loadu_ps(bt.add(s * $ldb + 16) as *const f32);
                    for r in 0..MR {
                        let $av = *$a.add($layout.index(r, at + s));
                        let $x0 = acc[r][0];
                        let $x1 = acc[r][1];
                        let (n0, n1) = $step;
                        acc[r][0] = n0;
                        acc[r][1] = n1;
                    }
                }
            }
            if $cols == NR {
                for r in 0..MR {
                    if r < $rows {
                        _mm512_storeu_ps($c.add(r * $ldc), acc[r][0]);
                        _mm512_storeu_ps($c.add(r * $ldc + 16), acc[r][1]);
                    }
                }
            } else {
                // Masked stores are slow on some CPUs (Zen 4): go through a tile on the stack.
                let mut tile = [[0f32; NR]; MR];
                for r in 0..MR {
                    _mm512_storeu_ps(tile[r].as_mut_ptr(), acc[r][0]);
                    _mm512_storeu_ps(tile[r].as_mut_ptr().add(16), acc[r][1]);
                }
                for r in 0..$rows {
                    std::ptr::copy_nonoverlapping(tile[r].as_ptr(), $c.add(r * $ldc), $cols);
                }
            }
        }};
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn micro_bf16<const IL: bool>(
        kc: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        init: TileInit,
    ) {
        tile!(
            layout_of(IL),
            kc,
            a,
            b,
            c,
            ldc,
            rows,
            cols,
            init,
            |c0, c1, av, b0, b1| {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(av as i32));
                let y0: __m512bh = std::mem::transmute(b0);
                let y1: __m512bh = std::mem::transmute(b1);
                (_mm512_dpbf16_ps(c0, x, y0), _mm512_dpbf16_ps(c1, x, y1))
            }
        )
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn micro_f32<const IL: bool>(
        kc: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        init: TileInit,
    ) {
        tile!(
            layout_of(IL),
            kc,
            a,
            b,
            c,
            ldc,
            rows,
            cols,
            init,
            |c0, c1, av, b0, b1| {
                let x = _mm512_set1_ps(f32::from_bits(av));
                (_mm512_fmadd_ps(x, b0, c0), _mm512_fmadd_ps(x, b1, c1))
            }
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn taps_bf16(
        seg: Segments,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        init: TileInit,
    ) {
        let boff = |t: usize| *seg.offsets.add(t);
        tile!(
            ALayout::Interleaved,
            seg.count,
            seg.len,
            boff,
            seg.ldb,
            a,
            b,
            c,
            ldc,
            rows,
            cols,
            init,
            |c0, c1, av, b0, b1| {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(av as i32));
                let y0: __m512bh = std::mem::transmute(b0);
                let y1: __m512bh = std::mem::transmute(b1);
                (_mm512_dpbf16_ps(c0, x, y0), _mm512_dpbf16_ps(c1, x, y1))
            }
        )
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn taps_f32(
        seg: Segments,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        init: TileInit,
    ) {
        let boff = |t: usize| *seg.offsets.add(t);
        tile!(
            ALayout::Interleaved,
            seg.count,
            seg.len,
            boff,
            seg.ldb,
            a,
            b,
            c,
            ldc,
            rows,
            cols,
            init,
            |c0, c1, av, b0, b1| {
                let x = _mm512_set1_ps(f32::from_bits(av));
                (_mm512_fmadd_ps(x, b0, c0), _mm512_fmadd_ps(x, b1, c1))
            }
        )
    }

    /// Converts `n` f32 (n even) to `n / 2` bf16 pair slots, round to nearest even.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(crate) unsafe fn f32_to_pairs(src: *const f32, dst: *mut u32, n: usize) {
        let mut i = 0;
        while i + 32 <= n {
            let lo = _mm512_loadu_ps(src.add(i));
            let hi = _mm512_loadu_ps(src.add(i + 16));
            let v = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_ps(
                dst.add(i / 2) as *mut f32,
                std::mem::transmute::<__m512bh, __m512>(v),
            );
            i += 32;
        }
        while i + 1 < n {
            *dst.add(i / 2) = super::bf16_pair(*src.add(i), *src.add(i + 1));
            i += 2;
        }
    }
}

/// The AVX2 + FMA kernels (CPUs without AVX-512). The MR x NR tile is computed as four
/// sub-tiles of MR/2 rows by NR/2 columns (12 accumulators of 8 lanes, two B vectors and a
/// broadcast: 15 of the 16 registers), each with its own pass over K; the packed A block and
/// B panel are the ones the AVX-512 kernels read.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{layout_of, ALayout, Segments, TileInit};
    use crate::{MR, NR};
    use std::arch::x86_64::*;

    /// Rows and columns of a sub-tile.
    const SR: usize = MR / 2;
    const SC: usize = NR / 2;

    /// One sub-tile: rows `r0..r0 + SR`, columns `c0..c0 + SC` of the tile (those within
    /// `rows` x `cols` are read and written); K as in the AVX-512 `tile!`.
    macro_rules! sub_tile {
        ($layout:expr, $nseg:expr, $kc:expr, $boff:expr, $ldb:expr, $a:expr, $b:expr, $c:expr, $ldc:expr, $rows:expr, $cols:expr, $init:expr, $r0:expr, $c0:expr) => {{
            let (r0, c0): (usize, usize) = ($r0, $c0);
            let rows = $rows.saturating_sub(r0).min(SR);
            let cols = $cols.saturating_sub(c0).min(SC);
            if rows > 0 && cols > 0 {
                let full = cols == SC;
                let c = $c.add(r0 * $ldc + c0);
                let mut acc = [[_mm256_setzero_ps(); 2]; SR];
                // A partial tile goes through this buffer, so that nothing outside it is read
                // or written.
                let mut tmp = [[0f32; SC]; SR];
                match $init {
                    TileInit::Zero => {}
                    TileInit::Accumulate => {
                        for r in 0..SR {
                            if r < rows {
                                if full {
                                    acc[r][0] = _mm256_loadu_ps(c.add(r * $ldc));
                                    acc[r][1] = _mm256_loadu_ps(c.add(r * $ldc + 8));
                                } else {
                                    std::ptr::copy_nonoverlapping(
                                        c.add(r * $ldc),
                                        tmp[r].as_mut_ptr(),
                                        cols,
                                    );
                                    acc[r][0] = _mm256_loadu_ps(tmp[r].as_ptr());
                                    acc[r][1] = _mm256_loadu_ps(tmp[r].as_ptr().add(8));
                                }
                            }
                        }
                    }
                    TileInit::RowBias(p) => {
                        for r in 0..SR {
                            if r < rows {
                                let v = _mm256_set1_ps(*p.add(r0 + r));
                                acc[r] = [v, v];
                            }
                        }
                    }
                    TileInit::ColBias(p) => {
                        let mut bias = [0f32; SC];
                        std::ptr::copy_nonoverlapping(p.add(c0), bias.as_mut_ptr(), cols);
                        let v0 = _mm256_loadu_ps(bias.as_ptr());
                        let v1 = _mm256_loadu_ps(bias.as_ptr().add(8));
                        for r in 0..SR {
                            acc[r] = [v0, v1];
                        }
                    }
                }
                for t in 0..$nseg {
                    let bt = $b.add(($boff)(t) + c0);
                    let at = t * $kc;
                    for s in 0..$kc {
                        let b0 = _mm256_loadu_ps(bt.add(s * $ldb) as *const f32);
                        let b1 = _mm256_loadu_ps(bt.add(s * $ldb + 8) as *const f32);
                        for r in 0..SR {
                            let x = _mm256_broadcast_ss(
                                &*($a.add($layout.index(r0 + r, at + s)) as *const f32),
                            );
                            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
                        }
                    }
                }
                for r in 0..SR {
                    if r < rows {
                        if full {
                            _mm256_storeu_ps(c.add(r * $ldc), acc[r][0]);
                            _mm256_storeu_ps(c.add(r * $ldc + 8), acc[r][1]);
                        } else {
                            _mm256_storeu_ps(tmp[r].as_mut_ptr(), acc[r][0]);
                            _mm256_storeu_ps(tmp[r].as_mut_ptr().add(8), acc[r][1]);
                            std::ptr::copy_nonoverlapping(tmp[r].as_ptr(), c.add(r * $ldc), cols);
                        }
                    }
                }
            }
        }};
    }

    /// The whole tile: the sub-tiles column half by column half, so that each half of the B
    /// panel is read from L1 by both row halves.
    macro_rules! tile {
        ($layout:expr, $nseg:expr, $kc:expr, $boff:expr, $ldb:expr, $a:expr, $b:expr, $c:expr, $ldc:expr, $rows:expr, $cols:expr, $init:expr) => {{
            for c0 in [0, SC] {
                for r0 in [0, SR] {
                    sub_tile!(
                        $layout, $nseg, $kc, $boff, $ldb, $a, $b, $c, $ldc, $rows, $cols, $init,
                        r0, c0
                    );
                }
            }
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn micro_f32<const IL: bool>(
        kc: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        init: TileInit,
    ) {
        let layout: ALayout = layout_of(IL);
        tile!(
            layout,
            1,
            kc,
            |_t: usize| 0usize,
            NR,
            a,
            b,
            c,
            ldc,
            rows,
            cols,
            init
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn taps_f32(
        seg: Segments,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        init: TileInit,
    ) {
        let boff = |t: usize| *seg.offsets.add(t);
        tile!(
            ALayout::Interleaved,
            seg.count,
            seg.len,
            boff,
            seg.ldb,
            a,
            b,
            c,
            ldc,
            rows,
            cols,
            init
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable kernels (used on CPUs without AVX-512) against a direct f64 computation,
    /// and against the AVX-512 kernels where this CPU has them, for every way a tile starts.
    #[test]
    fn portable_and_simd_kernels_agree() {
        let kc = 37;
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let a_vals: Vec<f32> = (0..MR * KC * 2).map(|_| next()).collect();
        let b_vals: Vec<f32> = (0..kc * NR * 2).map(|_| next()).collect();
        let bias: Vec<f32> = (0..NR).map(|_| next()).collect();
        let start: Vec<f32> = (0..MR * NR).map(|_| next()).collect();
        for (prec, layout) in [Precision::F32, Precision::Bf16]
            .into_iter()
            .flat_map(|p| [(p, ALayout::Rows), (p, ALayout::Interleaved)])
        {
            let slot = |v: &[f32], i: usize| match prec {
                Precision::F32 => v[i].to_bits(),
                Precision::Bf16 => bf16_pair(v[2 * i], v[2 * i + 1]),
            };
            // Row r, slot s of A holds value slot r * KC + s of a_vals, in either layout.
            let mut a = vec![0u32; MR * KC];
            for r in 0..MR {
                for s in 0..KC {
                    a[layout.index(r, s)] = slot(&a_vals, r * KC + s);
                }
            }
            let b: Vec<u32> = (0..kc * NR).map(|i| slot(&b_vals, i)).collect();
            let value = |s: u32| -> [f64; 2] {
                match prec {
                    Precision::F32 => [f32::from_bits(s) as f64, 0.0],
                    Precision::Bf16 => {
                        let (x, y) = unpair(s);
                        [x as f64, y as f64]
                    }
                }
            };
            let portable_kernel = select(prec, Isa::Portable, layout);
            let simd = select(prec, isa(), layout);
            for (rows, cols) in [(MR, NR), (5, 17), (1, 1), (MR, 3), (7, 16), (MR, 24)] {
                for mode in 0..4 {
                    let init = |c: &[f32]| match mode {
                        0 => TileInit::Zero,
                        1 => TileInit::Accumulate,
                        2 => TileInit::RowBias(bias.as_ptr()),
                        _ => TileInit::ColBias(c.as_ptr()),
                    };
                    let mut want = vec![0f64; MR * NR];
                    for r in 0..rows {
                        for j in 0..cols {
                            let mut acc = match mode {
                                0 => 0.0,
                                1 => start[r * NR + j] as f64,
                                2 => bias[r] as f64,
                                _ => bias[j] as f64,
                            };
                            for s in 0..kc {
                                let (x, y) = (value(a[layout.index(r, s)]), value(b[s * NR + j]));
                                acc += x[0] * y[0] + x[1] * y[1];
                            }
                            want[r * NR + j] = acc;
                        }
                    }
                    for kernel in [portable_kernel, simd] {
                        let mut c = start.clone();
                        // SAFETY: a is MR x KC, b is kc x NR, c is MR x NR with ldc NR.
                        unsafe {
                            kernel(
                                kc,
                                a.as_ptr(),
                                b.as_ptr(),
                                c.as_mut_ptr(),
                                NR,
                                rows,
                                cols,
                                init(&bias),
                            )
                        };
                        for r in 0..MR {
                            for j in 0..NR {
                                let (got, i) = (c[r * NR + j], r * NR + j);
                                if r < rows && j < cols {
                                    assert!(
                                        (got as f64 - want[i]).abs() < 1e-5,
                                        "{prec:?} {layout:?} mode {mode} {rows}x{cols} ({r},{j}): {got} vs {}",
                                        want[i]
                                    );
                                } else {
                                    assert_eq!(
                                        got, start[i],
                                        "{prec:?} wrote outside the tile at ({r},{j})"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
