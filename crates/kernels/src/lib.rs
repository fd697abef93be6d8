//! CPU matrix kernels for flipsketch's models.
//!
//! One blocked GEMM (Goto-style: K blocks of [`KC`] slots, A blocks of [`MC`] rows in L2, B
//! panels of [`NR`] columns in L1, an [`MR`] x [`NR`] register tile) with two micro-kernels:
//! AVX-512 f32 FMA and AVX512-BF16 `vdpbf16ps` (bf16 products, f32 accumulation), chosen at
//! run time, and portable fallbacks for other CPUs. Three front ends:
//! - [`linear`]: `y = x W^T + b` with W packed once ([`PackedCols`]);
//! - [`conv2d`]: direct convolution, the image patches packed straight from NCHW into B panels
//!   (no im2col buffer), the weights packed once ([`PackedRows`]), bias fused;
//! - [`matmul`]: batched `a @ b` with both operands packed on the fly (attention).
//!
//! In [`Precision::Bf16`] the operands are rounded to bf16 (nearest even) and the products are
//! summed in f32; inputs and outputs stay f32.

mod elementwise;
mod layout;
mod micro;
pub mod stats;

use std::cell::RefCell;

use rayon::prelude::*;

pub use elementwise::{
    erfc, exp, exp_nonpositive_coarse, geglu, gelu_erf, group_norm, group_norm_affine, layer_norm,
    silu, silu_slice, softmax_row, softmax_rows, GroupNormShape, PlaneAffine,
};
pub use layout::transpose;
pub use micro::{bf16_bits, bf16_pair, bf16_to_f32, hardware_isa, isa, Isa};
use micro::{ALayout, TileInit};

/// Rows of the register tile.
pub const MR: usize = 12;
/// Columns of the register tile (two 16-lane vectors).
pub const NR: usize = 32;
/// K slots per block (a slot holds one f32 or two bf16).
pub const KC: usize = 256;
/// Longest K block when K needs several (B panel + A micro-panel about one L1).
const KC_SPLIT: usize = 192;
/// The K block length for `kslots` slots: blocks of at most [`KC`] slots, as even as possible
/// (a short last block would cost a full pass of tile loads and stores for little work).
pub fn k_block(kslots: usize) -> usize {
    if kslots <= KC {
        // One pass: C is written once instead of read and written per block.
        return kslots.max(1);
    }
    kslots.div_ceil(kslots.div_ceil(KC_SPLIT))
}

/// Packed weight bytes above which [`linear`] with few rows fetches each weight only once
/// (smaller weights stay in L3 between blocks of rows, and the old order is as fast).
const BIG_WEIGHTS: usize = 8 << 20;
/// Convolutions with large weights ([`BIG_WEIGHTS`]) over images of at most this many pixels
/// run over all images in one GEMM.
const BATCHED_PIXELS: usize = 256;
/// At most this many rows count as few for [`linear`].
const FEW_ROWS: usize = 1024;

/// Rows of A per L2 block.
pub const MC: usize = MR * 32;

/// Arithmetic of the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    /// Operands rounded to bf16, products accumulated in f32.
    Bf16,
}

impl Precision {
    /// Number of slots holding `k` values.
    pub fn slots(self, k: usize) -> usize {
        match self {
            Precision::F32 => k,
            Precision::Bf16 => k.div_ceil(2),
        }
    }

    /// Whether this CPU has native (SIMD) kernels for this precision.
    pub fn is_native(self) -> bool {
        match (self, isa()) {
            (_, Isa::Avx512Bf16) => true,
            (Precision::F32, Isa::Avx512 | Isa::Avx2) => true,
            _ => false,
        }
    }

    fn slot(self, row: &[f32], s: usize) -> u32 {
        match self {
            Precision::F32 => row.get(s).map_or(0, |v| v.to_bits()),
            Precision::Bf16 => {
                let get = |i: usize| row.get(i).copied().unwrap_or(0.0);
                bf16_pair(get(2 * s), get(2 * s + 1))
            }
        }
    }
}

/// Fills `dst[..kc]` with the slots `k0..k0 + kc` of a row of `k` values.
fn pack_row(prec: Precision, row: &[f32], k0: usize, kc: usize, dst: &mut [u32]) {
    let per = match prec {
        Precision::F32 => 1,
        Precision::Bf16 => 2,
    };
    let start = (k0 * per).min(row.len());
    let end = ((k0 + kc) * per).min(row.len());
    let src = &row[start..end];
    let dst = &mut dst[..kc];
    match prec {
        Precision::F32 => {
            for (d, v) in dst.iter_mut().zip(src) {
                *d = v.to_bits();
            }
            dst[src.len()..].fill(0);
        }
        Precision::Bf16 => {
            let full = src.len() / 2;
            #[cfg(target_arch = "x86_64")]
            let done = if isa() == Isa::Avx512Bf16 {
                // SAFETY: the CPU has AVX512-BF16; src holds 2 * full values, dst full slots.
                unsafe { micro::x86::f32_to_pairs(src.as_ptr(), dst.as_mut_ptr(), 2 * full) };
                full
            } else {
                0
            };
            #[cfg(not(target_arch = "x86_64"))]
            let done = 0;
            for (s, d) in dst.iter_mut().enumerate().take(full).skip(done) {
                *d = bf16_pair(src[2 * s], src[2 * s + 1]);
            }
            if src.len() % 2 == 1 {
                dst[full] = bf16_pair(src[src.len() - 1], 0.0);
            }
            let used = src.len().div_ceil(2);
            dst[used..].fill(0);
        }
    }
}

/// What decides the packed layouts: a packed matrix saved by one build is valid for another
/// exactly when this string and the precision are the same (caches of packed weights key on it).
pub fn pack_layout() -> String {
    format!(
        "rows: MR {MR}, slot-major K blocks of k_block (KC {KC}, split {KC_SPLIT}); \
         taps: blocks of channel slots (about KC_SPLIT / taps each), tap-major within a \
         block, bf16 pairs of neighbouring channels; \
         winograd: F(2x2, 3x3), the 16 matrices G g G^T stacked as rows, each padded to MR; \
         cols: NR {NR}, slot-major; slots: f32 bits or bf16 pairs (nearest even, low half \
         first), zero padded; v3"
    )
}

/// The slots of a packed matrix: owned, or in memory that something else keeps alive and
/// unchanged (a memory-mapped file of packed weights).
pub struct Slots(SlotsInner);

enum SlotsInner {
    Owned(Vec<u32>),
    Borrowed {
        _owner: std::sync::Arc<dyn std::any::Any + Send + Sync>,
        ptr: *const u32,
        len: usize,
    },
}

// SAFETY: the borrowed slots are never written and live as long as their owner, which is
// Send + Sync; the owned ones are a Vec.
unsafe impl Send for Slots {}
unsafe impl Sync for Slots {}

impl Slots {
    pub fn owned(v: Vec<u32>) -> Self {
        Slots(SlotsInner::Owned(v))
    }

    /// Slots in memory that `owner` keeps alive.
    ///
    /// # Safety
    /// `ptr` must point to `len` initialised `u32`s, aligned to 4 bytes, that stay valid and
    /// unmodified for as long as `owner` lives.
    pub unsafe fn borrowed(
        owner: std::sync::Arc<dyn std::any::Any + Send + Sync>,
        ptr: *const u32,
        len: usize,
    ) -> Self {
        Slots(SlotsInner::Borrowed {
            _owner: owner,
            ptr,
            len,
        })
    }

    /// Whether the slots live in memory owned by something else (a mapped file).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.0, SlotsInner::Borrowed { .. })
    }
}

impl std::ops::Deref for Slots {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        match &self.0 {
            SlotsInner::Owned(v) => v,
            // SAFETY: guaranteed by the caller of `Slots::borrowed`.
            SlotsInner::Borrowed { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(*ptr, *len)
            },
        }
    }
}

/// A matrix packed as the A operand (its rows are C's rows): row blocks of [`MR`], each K
/// block of [`k_block`] slots stored slot-major ([`ALayout::Interleaved`]).
///
/// Convolution weights may instead be packed for the direct convolution
/// ([`PackedRows::new_taps`]): K runs over blocks of input channels, within a block tap by
/// tap (`kh x kw` of them), within a tap over the block's channel slots (a bf16 slot is two
/// neighbouring channels of one tap), so that a block's B operand is the input itself, shifted
/// per tap, instead of the patches (`kh * kw` copies of every input value).
pub struct PackedRows {
    prec: Precision,
    m: usize,
    /// The depth of the matrix: for convolution weights `c_in * kh * kw`.
    k: usize,
    kb_len: usize,
    kblocks: usize,
    taps: Option<TapLayout>,
    /// Set by [`PackedRows::new_winograd`]: the rows are 16 transformed matrices of
    /// `wino_rows` rows each (c_out rounded up to MR), depth c_in.
    wino_rows: Option<usize>,
    data: Slots,
}

/// How [`PackedRows::new_taps`] laid out a convolution's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapLayout {
    pub c_in: usize,
    pub kh: usize,
    pub kw: usize,
    /// Channel slots per K block (the last block may hold fewer).
    block_slots: usize,
}

impl TapLayout {
    fn new(prec: Precision, c_in: usize, kh: usize, kw: usize) -> Self {
        let taps = (kh * kw).max(1);
        let cs = prec.slots(c_in).max(1);
        // About KC_SPLIT slots per K block, as for the other packed matrices.
        let blocks = cs.div_ceil((KC_SPLIT / taps).max(1));
        Self {
            c_in,
            kh,
            kw,
            block_slots: cs.div_ceil(blocks),
        }
    }

    fn taps(&self) -> usize {
        self.kh * self.kw
    }

    /// (K blocks, slots per full block).
    fn blocks(&self, prec: Precision) -> (usize, usize) {
        let cs = prec.slots(self.c_in).max(1);
        (
            cs.div_ceil(self.block_slots),
            self.taps() * self.block_slots,
        )
    }
}

/// Values in one slot: 1 f32, or 2 bf16.
fn values_per_slot(prec: Precision) -> usize {
    match prec {
        Precision::F32 => 1,
        Precision::Bf16 => 2,
    }
}

/// `dst[i]` = the slot of `vals[0][at + i]` (f32), or of the pair (`vals[0][at + i]`,
/// `vals[1][at + i]`) (bf16; `vals[1]` is not read in f32).
fn to_slots(prec: Precision, vals: &[Vec<f32>; 2], at: usize, dst: &mut [u32]) {
    let lo = &vals[0][at..][..dst.len()];
    match prec {
        Precision::F32 => {
            for (d, &v) in dst.iter_mut().zip(lo) {
                *d = v.to_bits();
            }
        }
        Precision::Bf16 => elementwise::bf16_pairs(lo, &vals[1][at..][..dst.len()], dst),
    }
}

/// Packs `m` rows of `kslots` slots in K blocks of `kb_len`; `row(r, buf)` puts row r's
/// values (`kslots` slots' worth, f32) in `buf`.
fn pack_rows_blocked<F>(prec: Precision, m: usize, kslots: usize, kb_len: usize, row: F) -> Vec<u32>
where
    F: Fn(usize, &mut Vec<f32>) + Sync,
{
    let kblocks = kslots.div_ceil(kb_len).max(1);
    let rblocks = m.div_ceil(MR);
    // Slot-major blocks of MR x kb_len slots: no padding of K blocks to KC (a 3x3
    // convolution's K blocks are often 180 slots long, which would waste 30%).
    let mut data = vec![0u32; rblocks * kblocks * MR * kb_len];
    data.par_chunks_mut(kblocks * MR * kb_len)
        .enumerate()
        .for_each(|(rb, blk)| {
            let mut tmp = vec![0u32; kb_len];
            let mut values = Vec::new();
            for r in 0..MR.min(m - rb * MR) {
                values.clear();
                row(rb * MR + r, &mut values);
                let row = &values[..];
                for kb in 0..kblocks {
                    let kc = kb_len.min(kslots - kb * kb_len);
                    let block = &mut blk[kb * MR * kb_len..][..MR * kb_len];
                    pack_row(prec, row, kb * kb_len, kc, &mut tmp);
                    for (s, &v) in tmp[..kc].iter().enumerate() {
                        block[ALayout::Interleaved.index(r, s)] = v;
                    }
                }
            }
        });
    data
}

/// The rows of each of the 16 matrices of [`PackedRows::new_winograd`]: `m` rounded up to
/// whole row blocks.
fn winograd_rows(m: usize) -> usize {
    m.div_ceil(MR).max(1) * MR
}

/// An error naming `what` (e.g. "packed 4x9 rows (F32)") unless `data` holds `want` slots.
fn check_slots(data: &Slots, want: usize, what: impl FnOnce() -> String) -> Result<(), String> {
    if data.len() == want {
        Ok(())
    } else {
        Err(format!("{} take {want} slots, not {}", what(), data.len()))
    }
}

impl PackedRows {
    /// Packs a row-major `m x k` matrix.
    pub fn new(prec: Precision, src: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(
            src.len(),
            m * k,
            "PackedRows: {m}x{k} needs {} values",
            m * k
        );
        let kslots = prec.slots(k);
        let data = pack_rows_blocked(prec, m, kslots, k_block(kslots), |r, buf| {
            buf.extend_from_slice(&src[r * k..][..k])
        });
        Self::in_blocks(prec, m, k, k, None, Slots::owned(data))
    }

    /// Rows of `k_packed` values each in plain K blocks of [`k_block`] slots (the layout of
    /// [`Self::new`], and of [`Self::new_winograd`]'s stacked matrices of `wino_rows` rows);
    /// `k` is the product's K as the caller sees it.
    fn in_blocks(
        prec: Precision,
        m: usize,
        k: usize,
        k_packed: usize,
        wino_rows: Option<usize>,
        data: Slots,
    ) -> Self {
        let kslots = prec.slots(k_packed);
        let kb_len = k_block(kslots);
        Self {
            prec,
            m,
            k,
            kb_len,
            kblocks: kslots.div_ceil(kb_len).max(1),
            taps: None,
            wino_rows,
            data,
        }
    }

    /// Packs convolution weights `(m, c_in, kh, kw)` (row-major) for the direct convolution
    /// of [`conv2d`] (stride 1); see the type's description.
    pub fn new_taps(
        prec: Precision,
        w: &[f32],
        m: usize,
        c_in: usize,
        kh: usize,
        kw: usize,
    ) -> Self {
        let taps = kh * kw;
        assert_eq!(
            w.len(),
            m * c_in * taps,
            "PackedRows: {m}x{c_in}x{kh}x{kw} needs {} values",
            m * c_in * taps
        );
        let layout = TapLayout::new(prec, c_in, kh, kw);
        let (blocks, kb_len) = layout.blocks(prec);
        let cs = prec.slots(c_in).max(1);
        let per = values_per_slot(prec);
        let kslots = taps * cs;
        let data = pack_rows_blocked(prec, m, kslots, kb_len, |r, buf| {
            for cb in 0..blocks {
                let s0 = cb * layout.block_slots;
                let s1 = (s0 + layout.block_slots).min(cs);
                for t in 0..taps {
                    for s in s0..s1 {
                        for e in 0..per {
                            let ch = s * per + e;
                            buf.push(if ch < c_in {
                                w[(r * c_in + ch) * taps + t]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
        });
        Self {
            prec,
            m,
            k: c_in * taps,
            kb_len,
            kblocks: blocks,
            taps: Some(layout),
            wino_rows: None,
            data: Slots::owned(data),
        }
    }

    /// The number of slots an `m x k` matrix packs into.
    pub fn packed_len(prec: Precision, m: usize, k: usize) -> usize {
        let kslots = prec.slots(k);
        let kb_len = k_block(kslots);
        m.div_ceil(MR) * kslots.div_ceil(kb_len).max(1) * MR * kb_len
    }

    /// The number of slots [`Self::new_taps`] packs `(m, c_in, kh, kw)` weights into.
    pub fn packed_len_taps(prec: Precision, m: usize, c_in: usize, kh: usize, kw: usize) -> usize {
        let (blocks, kb_len) = TapLayout::new(prec, c_in, kh, kw).blocks(prec);
        m.div_ceil(MR) * blocks * MR * kb_len
    }

    /// A matrix packed earlier (its [`Self::slots`]), e.g. read back from a file.
    pub fn from_slots(prec: Precision, m: usize, k: usize, data: Slots) -> Result<Self, String> {
        check_slots(&data, Self::packed_len(prec, m, k), || {
            format!("packed {m}x{k} rows ({prec:?})")
        })?;
        Ok(Self::in_blocks(prec, m, k, k, None, data))
    }

    /// Weights packed earlier by [`Self::new_taps`] (its [`Self::slots`]).
    pub fn from_slots_taps(
        prec: Precision,
        m: usize,
        (c_in, kh, kw): (usize, usize, usize),
        data: Slots,
    ) -> Result<Self, String> {
        check_slots(&data, Self::packed_len_taps(prec, m, c_in, kh, kw), || {
            format!("packed {m}x{c_in}x{kh}x{kw} convolution weights ({prec:?})")
        })?;
        let layout = TapLayout::new(prec, c_in, kh, kw);
        let (kblocks, kb_len) = layout.blocks(prec);
        Ok(Self {
            prec,
            m,
            k: c_in * kh * kw,
            kb_len,
            kblocks,
            taps: Some(layout),
            wino_rows: None,
            data,
        })
    }

    /// Packs 3x3 convolution weights `(m, c_in, 3, 3)` (row-major) for the Winograd
    /// convolution F(2x2, 3x3) of [`conv2d`] (stride 1, padding 1): each weight `g` (3x3) of
    /// an (output, input) channel pair becomes `U = G g G^T` (4x4, computed in f64), and the
    /// rows are the 16 matrices `U_t` (m x c_in) one after the other, each padded to a whole
    /// number of row blocks.
    pub fn new_winograd(prec: Precision, w: &[f32], m: usize, c_in: usize) -> Self {
        assert_eq!(
            w.len(),
            m * c_in * 9,
            "PackedRows: {m}x{c_in}x3x3 needs {} values",
            m * c_in * 9
        );
        let rows = winograd_rows(m);
        let kslots = prec.slots(c_in);
        let data = pack_rows_blocked(prec, 16 * rows, kslots, k_block(kslots), |r, buf| {
            let (t, co) = (r / rows, r % rows);
            if co >= m {
                buf.resize(c_in, 0.0);
                return;
            }
            buf.extend((0..c_in).map(|ci| winograd_weight(&w[(co * c_in + ci) * 9..][..9], t)));
        });
        Self::in_blocks(prec, m, c_in * 9, c_in, Some(rows), Slots::owned(data))
    }

    /// The number of slots [`Self::new_winograd`] packs `(m, c_in, 3, 3)` weights into.
    pub fn packed_len_winograd(prec: Precision, m: usize, c_in: usize) -> usize {
        Self::packed_len(prec, 16 * winograd_rows(m), c_in)
    }

    /// Weights packed earlier by [`Self::new_winograd`] (its [`Self::slots`]).
    pub fn from_slots_winograd(
        prec: Precision,
        m: usize,
        c_in: usize,
        data: Slots,
    ) -> Result<Self, String> {
        check_slots(&data, Self::packed_len_winograd(prec, m, c_in), || {
            format!("packed {m}x{c_in}x3x3 Winograd weights ({prec:?})")
        })?;
        Ok(Self::in_blocks(
            prec,
            m,
            c_in * 9,
            c_in,
            Some(winograd_rows(m)),
            data,
        ))
    }

    /// Whether the weights were packed by [`Self::new_winograd`].
    pub fn is_winograd(&self) -> bool {
        self.wino_rows.is_some()
    }

    /// Whether the convolution reads its input itself (direct or Winograd), so that
    /// [`ConvFusion`] is applied inside it.
    fn fuses(&self) -> bool {
        self.taps.is_some() || self.wino_rows.is_some()
    }

    /// How the weights were laid out by [`Self::new_taps`], if they were.
    pub fn tap_layout(&self) -> Option<TapLayout> {
        self.taps
    }

    /// The packed slots (what [`Self::from_slots`] takes back).
    pub fn slots(&self) -> &Slots {
        &self.data
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn depth(&self) -> usize {
        self.k
    }

    pub fn precision(&self) -> Precision {
        self.prec
    }
}

/// A matrix packed as the B operand (its columns are C's columns): panels of [`NR`] columns,
/// slot-major. Built from the rows of `W` (`n x k`), so that `B = W^T` (nn.Linear weights).
pub struct PackedCols {
    prec: Precision,
    n: usize,
    k: usize,
    data: Slots,
}

impl PackedCols {
    /// Packs `B = W^T` from a row-major `n x k` matrix `W`.
    pub fn from_transposed(prec: Precision, w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedCols: {n}x{k} needs {} values", n * k);
        let kslots = prec.slots(k);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kslots * NR];
        data.par_chunks_mut((kslots * NR).max(1))
            .enumerate()
            .for_each(|(pb, panel)| {
                for j in 0..NR.min(n - pb * NR) {
                    let row = &w[(pb * NR + j) * k..][..k];
                    for s in 0..kslots {
                        panel[s * NR + j] = prec.slot(row, s);
                    }
                }
            });
        Self {
            prec,
            n,
            k,
            data: Slots::owned(data),
        }
    }

    /// The number of slots `B = W^T` of an `n x k` `W` packs into.
    pub fn packed_len(prec: Precision, n: usize, k: usize) -> usize {
        n.div_ceil(NR) * prec.slots(k) * NR
    }

    /// A matrix packed earlier (its [`Self::slots`]), e.g. read back from a file.
    pub fn from_slots(prec: Precision, n: usize, k: usize, data: Slots) -> Result<Self, String> {
        check_slots(&data, Self::packed_len(prec, n, k), || {
            format!("packed {n}x{k} columns ({prec:?})")
        })?;
        Ok(Self { prec, n, k, data })
    }

    /// The packed slots (what [`Self::from_slots`] takes back).
    pub fn slots(&self) -> &Slots {
        &self.data
    }

    /// Packs all of a B operand (`n` columns, depth `k`) from an on-the-fly source.
    fn from_source(
        prec: Precision,
        src: &dyn Source,
        n: usize,
        k: usize,
        buf: &mut Vec<u32>,
    ) -> Self {
        let kslots = prec.slots(k);
        src.block(0, n, 0, kslots, buf);
        Self {
            prec,
            n,
            k,
            data: Slots::owned(std::mem::take(buf)),
        }
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    pub fn depth(&self) -> usize {
        self.k
    }

    pub fn precision(&self) -> Precision {
        self.prec
    }
}

impl std::fmt::Debug for PackedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedRows({}x{}, {:?})", self.m, self.k, self.prec)
    }
}

impl std::fmt::Debug for PackedCols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedCols({}x{} as W^T, {:?})",
            self.k, self.n, self.prec
        )
    }
}

/// Makes `buf` hold at least `len` slots without clearing what it holds: sources overwrite
/// every slot the products read, and what is left from an earlier block only reaches rows
/// past the end of A or columns past the end of B, whose results are never stored.
fn grow<T: Copy + Default>(buf: &mut Vec<T>, len: usize) {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
}

/// Where a block of packed operand comes from.
trait Source: Sync {
    /// Makes the blocks covering `[i0, i0 + len)` (rows of A or columns of B; `i0` a multiple
    /// of the block size) for slots `[k0, k0 + kc)` available. Returns the first block's
    /// pointer at `k0` and the distance in slots between consecutive blocks.
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize);

    /// How the blocks are laid out when this is the A operand.
    fn a_layout(&self) -> ALayout {
        ALayout::Rows
    }
}

impl Source for PackedRows {
    fn block(
        &self,
        i0: usize,
        _: usize,
        k0: usize,
        _: usize,
        _: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let kb_len = self.kb_len;
        let stride = self.kblocks * MR * kb_len;
        let off = (i0 / MR) * stride + (k0 / kb_len) * MR * kb_len;
        (self.data[off..].as_ptr(), stride)
    }

    fn a_layout(&self) -> ALayout {
        ALayout::Interleaved
    }
}

impl Source for PackedCols {
    fn block(
        &self,
        i0: usize,
        _: usize,
        k0: usize,
        _: usize,
        _: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let kslots = self.prec.slots(self.k);
        let off = (i0 / NR) * kslots * NR + k0 * NR;
        (self.data[off..].as_ptr(), kslots * NR)
    }
}

/// Rows of a row-major f32 matrix (row stride `ld`, `k` values used), packed as A on the fly.
struct RowsOnTheFly<'a> {
    prec: Precision,
    src: &'a [f32],
    ld: usize,
    k: usize,
}

impl Source for RowsOnTheFly<'_> {
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let blocks = len.div_ceil(MR);
        grow(buf, blocks * MR * KC);
        for r in 0..len {
            let row = &self.src[(i0 + r) * self.ld..][..self.k];
            pack_row(self.prec, row, k0, kc, &mut buf[r * KC..]);
        }
        (buf.as_ptr(), MR * KC)
    }
}

/// Columns of a row-major `k x n` f32 matrix (row stride `ld`), packed as B on the fly.
struct ColsOnTheFly<'a> {
    prec: Precision,
    src: &'a [f32],
    ld: usize,
    k: usize,
    n: usize,
}

impl Source for ColsOnTheFly<'_> {
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let panels = len.div_ceil(NR);
        grow(buf, panels * kc * NR);
        // Row r's columns of panel p, or None past the last row (zeros).
        let row = |r: usize, p: usize, cols: usize| {
            (r < self.k).then(|| &self.src[r * self.ld + i0 + p * NR..][..cols])
        };
        for p in 0..panels {
            let cols = NR.min(self.n - i0 - p * NR);
            for s in 0..kc {
                let dst = &mut buf[(p * kc + s) * NR..][..cols];
                let ks = k0 + s;
                match self.prec {
                    Precision::F32 => match row(ks, p, cols) {
                        Some(src) => {
                            for (d, &x) in dst.iter_mut().zip(src) {
                                *d = x.to_bits();
                            }
                        }
                        None => dst.fill(0),
                    },
                    Precision::Bf16 => match (row(2 * ks, p, cols), row(2 * ks + 1, p, cols)) {
                        (Some(lo), Some(hi)) => elementwise::bf16_pairs(lo, hi, dst),
                        (Some(lo), None) => {
                            for (d, &a) in dst.iter_mut().zip(lo) {
                                *d = bf16_pair(a, 0.0);
                            }
                        }
                        _ => dst.fill(0),
                    },
                }
            }
        }
        (buf.as_ptr(), kc * NR)
    }
}

/// `B = src^T` for a row-major `n x k` matrix `src` (row stride `ld`), packed on the fly.
struct ColsOfRows<'a> {
    prec: Precision,
    src: &'a [f32],
    ld: usize,
    k: usize,
    n: usize,
}

impl Source for ColsOfRows<'_> {
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let panels = len.div_ceil(NR);
        grow(buf, panels * kc * NR);
        // kc may exceed KC here: PackedCols::from_source packs all of K at once.
        let mut slots = vec![0u32; kc];
        for p in 0..panels {
            let panel = &mut buf[p * kc * NR..][..kc * NR];
            let cols = NR.min(self.n - i0 - p * NR);
            for j in 0..cols {
                let row = &self.src[(i0 + p * NR + j) * self.ld..][..self.k];
                // The row's slots in one (vectorised) pass, then into column j of the panel.
                pack_row(self.prec, row, k0, kc, &mut slots);
                for (d, &v) in panel.iter_mut().skip(j).step_by(NR).zip(&slots[..kc]) {
                    *d = v;
                }
            }
            for j in cols..NR {
                for d in panel.iter_mut().skip(j).step_by(NR) {
                    *d = 0;
                }
            }
        }
        (buf.as_ptr(), kc * NR)
    }
}

/// B panels of image patches for a convolution, straight from one NCHW image.
struct Patches<'a> {
    prec: Precision,
    /// One image, or all of them when `batched`.
    image: &'a [f32],
    geom: &'a ConvGeometry,
    /// Columns run over the pixels of all images in turn: (pixels, values) per image.
    batched: Option<(usize, usize)>,
}

impl Source for Patches<'_> {
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let panels = len.div_ceil(NR);
        grow(buf, panels * kc * NR);
        let taps = self.geom.kh * self.geom.kw;
        let mut offs = vec![-1i32; taps * NR];
        let mut runs = Vec::new();
        let mut panel_runs = Vec::new();
        let mut tap_runs = Vec::with_capacity(panels * taps);
        for p in 0..panels {
            let first = i0 + p * NR;
            patch_offsets(
                self.geom,
                first,
                NR.min(len - p * NR),
                self.batched,
                &mut offs,
            );
            contiguous_runs(&offs, taps, &mut panel_runs);
            let base = runs.len();
            tap_runs.extend((0..taps).map(|t| {
                let from = panel_runs.partition_point(|r| (r.tap as usize) < t);
                let to = panel_runs.partition_point(|r| (r.tap as usize) <= t);
                ((base + from) as u32, (base + to) as u32)
            }));
            runs.extend_from_slice(&panel_runs);
        }
        pack_patches(
            self.prec == Precision::Bf16,
            self.image,
            self.geom,
            &runs,
            &tap_runs,
            k0,
            kc,
            &mut buf[..panels * kc * NR],
        );
        (buf.as_ptr(), kc * NR)
    }
}

/// For each tap and each of the NR columns (output pixels `first..first + cols`), the offset
/// of the input value within a channel plane (plus the image's start when `batched`), or -1 in
/// the padding (and past `cols`).
fn patch_offsets(
    g: &ConvGeometry,
    first: usize,
    cols: usize,
    batched: Option<(usize, usize)>,
    offs: &mut [i32],
) {
    offs.fill(-1);
    for j in 0..cols {
        let (base, pix) = match batched {
            Some((pixels, values)) => (((first + j) / pixels) * values, (first + j) % pixels),
            None => (0, first + j),
        };
        let (oy, ox) = ((pix / g.w_out) * g.stride, (pix % g.w_out) * g.stride);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let iy = (oy + ky).wrapping_sub(g.pad);
                let ix = (ox + kx).wrapping_sub(g.pad);
                if iy < g.h && ix < g.w {
                    offs[(ky * g.kw + kx) * NR + j] = (base + iy * g.w + ix) as i32;
                }
            }
        }
    }
}

/// A run of panel columns `j0..j1` of one tap reading consecutive input values from `start`.
#[derive(Clone, Copy, Debug)]
struct Run {
    tap: u16,
    j0: u8,
    j1: u8,
    start: u32,
}

/// Splits each tap's offsets into maximal runs of consecutive values (padding excluded), so
/// that packing copies slices instead of gathering single values.
fn contiguous_runs(offs: &[i32], taps: usize, runs: &mut Vec<Run>) {
    runs.clear();
    for t in 0..taps {
        let o = &offs[t * NR..][..NR];
        let mut j = 0;
        while j < NR {
            if o[j] < 0 {
                j += 1;
                continue;
            }
            let j0 = j;
            while j + 1 < NR && o[j + 1] == o[j] + 1 {
                j += 1;
            }
            j += 1;
            runs.push(Run {
                tap: t as u16,
                j0: j0 as u8,
                j1: j as u8,
                start: o[j0] as u32,
            });
        }
    }
}

/// The NR values of patch row `k` (channel `k / taps`, tap `k % taps`) of a panel: a slice of
/// the image itself when one run covers the whole panel, else gathered into `buf` (zeros in
/// the padding and past the end of K). `tap_runs[t]` is the range of tap t's runs in `runs`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn patch_row<'a>(
    image: &'a [f32],
    plane: usize,
    taps: usize,
    k_total: usize,
    runs: &[Run],
    tap_runs: &[(u32, u32)],
    k: usize,
    buf: &'a mut [f32; NR],
) -> &'a [f32; NR] {
    if k >= k_total {
        *buf = [0.0; NR];
        return buf;
    }
    let src = &image[(k / taps) * plane..];
    let (r0, r1) = tap_runs[k % taps];
    let rs = &runs[r0 as usize..r1 as usize];
    if let [r] = rs {
        if r.j0 == 0 && r.j1 as usize == NR {
            return src[r.start as usize..][..NR].try_into().expect("NR values");
        }
    }
    *buf = [0.0; NR];
    for r in rs {
        let (j0, j1) = (r.j0 as usize, r.j1 as usize);
        let from = &src[r.start as usize..][..j1 - j0];
        // An element loop, not copy_from_slice: runs are short and a memmove call per run
        // cost more than the copy.
        for (d, &v) in buf[j0..j1].iter_mut().zip(from) {
            *d = v;
        }
    }
    buf
}

elementwise::multiversion! {
    /// `kc` slots from slot `k0` of `tap_runs.len() / taps` B panels of patches, panel p at
    /// `dst[p * kc * NR..]`. `runs` say where each tap's values are (`tap_runs[p * taps + t]`:
    /// the range of panel p's runs of tap t). Slot by slot across the panels, so that the
    /// image is read along its rows (one plane after another defeats the prefetchers).
    #[allow(clippy::too_many_arguments)]
    fn pack_patches(
        bf16: bool,
        image: &[f32],
        g: &ConvGeometry,
        runs: &[Run],
        tap_runs: &[(u32, u32)],
        k0: usize,
        kc: usize,
        dst: &mut [u32],
    ) {
        let taps = g.kh * g.kw;
        let plane = g.h * g.w;
        let k_total = g.c_in * taps;
        let panels = tap_runs.len() / taps;
        let (mut a, mut b) = ([0f32; NR], [0f32; NR]);
        for s in 0..kc {
            for p in 0..panels {
                let tr = &tap_runs[p * taps..][..taps];
                let slot = &mut dst[(p * kc + s) * NR..][..NR];
                if bf16 {
                    let k = 2 * (k0 + s);
                    let ra = patch_row(image, plane, taps, k_total, runs, tr, k, &mut a);
                    let rb = patch_row(image, plane, taps, k_total, runs, tr, k + 1, &mut b);
                    for j in 0..NR {
                        slot[j] = bf16_pair(ra[j], rb[j]);
                    }
                } else {
                    let ra = patch_row(image, plane, taps, k_total, runs, tr, k0 + s, &mut a);
                    for j in 0..NR {
                        slot[j] = ra[j].to_bits();
                    }
                }
            }
        }
    }
}

/// Bias added to every product.
#[derive(Clone, Copy)]
enum Bias<'a> {
    None,
    /// Indexed by C's row.
    Rows(&'a [f32]),
    /// Indexed by C's column.
    Cols(&'a [f32]),
}

thread_local! {
    static BUFFERS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A raw output pointer shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct Out<T = f32>(*mut T);
// SAFETY: tasks write disjoint parts of the output.
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

/// `C[m0..m1, n0..n1] = bias + A B` with C row-major, stride `ldc`.
///
/// Loop order: with `rows_first = Some(mc)` (B pre-packed, so re-reading it is free) each block
/// of `mc` rows goes through all of K before the next, keeping its part of C in L2; otherwise
/// each K block of B is packed once and all rows go through it.
///
/// # Safety
/// `c` must be valid for rows `m0..m1` and columns `n0..n1` with stride `ldc`; `m0` must be a
/// multiple of MR and `n0` of NR when the sources are pre-packed.
#[allow(clippy::too_many_arguments)]
unsafe fn run_task(
    prec: Precision,
    kslots: usize,
    a: &dyn Source,
    b: &dyn Source,
    (m0, m1): (usize, usize),
    (n0, n1): (usize, usize),
    c: *mut f32,
    ldc: usize,
    bias: Bias,
    rows_first: Option<usize>,
) {
    let micro = micro::select(prec, isa(), a.a_layout());
    let n = n1 - n0;
    let kb = k_block(kslots);
    // C[i0.., n0..n1] += A[i0..i0+ilen, k0..k0+kc] B[k0..k0+kc, n0..n1]
    let block = |k0: usize,
                 kc: usize,
                 i0: usize,
                 ilen: usize,
                 bp: *const u32,
                 bstride: usize,
                 abuf: &mut Vec<u32>| {
        let (ap, astride) = a.block(i0, ilen, k0, kc, abuf);
        for pb in 0..n.div_ceil(NR) {
            let cols = NR.min(n - pb * NR);
            let col = n0 + pb * NR;
            for rb in 0..ilen.div_ceil(MR) {
                let rows = MR.min(ilen - rb * MR);
                let row = i0 + rb * MR;
                let init = if k0 > 0 {
                    TileInit::Accumulate
                } else {
                    match bias {
                        Bias::None => TileInit::Zero,
                        Bias::Rows(v) => TileInit::RowBias(v[row..].as_ptr()),
                        Bias::Cols(v) => TileInit::ColBias(v[col..].as_ptr()),
                    }
                };
                // SAFETY: the caller's contract; tiles stay inside rows m0..m1, cols n0..n1.
                unsafe {
                    micro(
                        kc,
                        ap.add(rb * astride),
                        bp.add(pb * bstride),
                        c.add(row * ldc + col),
                        ldc,
                        rows,
                        cols,
                        init,
                    )
                };
            }
        }
    };
    BUFFERS.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (abuf, bbuf) = &mut *bufs;
        let k_starts = (0..kslots.max(1)).step_by(kb);
        match rows_first {
            Some(mc) => {
                for i0 in (m0..m1).step_by(mc) {
                    let ilen = mc.min(m1 - i0);
                    for k0 in k_starts.clone() {
                        let kc = kb.min(kslots - k0);
                        let (bp, bstride) = b.block(n0, n, k0, kc, bbuf);
                        block(k0, kc, i0, ilen, bp, bstride, abuf);
                    }
                }
            }
            None => {
                for k0 in k_starts {
                    let kc = kb.min(kslots - k0);
                    let (bp, bstride) = b.block(n0, n, k0, kc, bbuf);
                    for i0 in (m0..m1).step_by(MC) {
                        block(k0, kc, i0, MC.min(m1 - i0), bp, bstride, abuf);
                    }
                }
            }
        }
    });
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Splits `0..len` into about `parts` ranges whose starts are multiples of `align`.
fn split(len: usize, parts: usize, align: usize) -> Vec<(usize, usize)> {
    let step = len.div_ceil(parts.max(1)).div_ceil(align).max(1) * align;
    (0..len)
        .step_by(step)
        .map(|s| (s, (s + step).min(len)))
        .collect()
}

/// Tasks `(image, (start, end))` over `images` images of `len` columns (or tiles) each, in
/// multiples of [`NR`]: at least two per thread in all and at least `min_parts` per image; for
/// a single image a whole number per thread (5 tasks on 2 threads took as long as 6).
fn image_tasks(
    images: usize,
    len: usize,
    min_parts: usize,
    threads: usize,
) -> Vec<(usize, (usize, usize))> {
    let parts = (threads * 2).div_ceil(images).max(min_parts);
    let parts = if images == 1 {
        parts.div_ceil(threads) * threads
    } else {
        parts
    };
    let per_image = split(len, parts, NR);
    (0..images)
        .flat_map(|i| per_image.iter().map(move |&r| (i, r)))
        .collect()
}

/// Allocates `len` floats and lets `write` store them through the pointer, without zeroing
/// the memory first.
///
/// # Safety
/// `write` must initialise all `len` elements and must not read any before writing it.
unsafe fn filled(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    write(v.as_mut_ptr());
    // SAFETY: the caller's contract: all `len` elements are initialised.
    unsafe { v.set_len(len) };
    v
}

/// A new vector of `len` zeros, written by all threads (a large `vec![0.0; len]` is one
/// thread's memset while the others wait).
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 16)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: every element of the spare capacity up to `len` was just written.
    unsafe { v.set_len(len) };
    v
}

/// `out (m x n) = x (m x k) W^T + bias`, with `w` packed from W (`n x k`).
pub fn linear(x: &[f32], m: usize, w: &PackedCols, bias: Option<&[f32]>, out: &mut [f32]) {
    assert_eq!(out.len(), m * w.n, "linear: output is not {m}x{}", w.n);
    // SAFETY: `out` holds m x n floats.
    unsafe { linear_raw(x, m, w, bias, out.as_mut_ptr()) }
}

/// [`linear`] into a new `m x n` vector (its memory is written once, not zeroed first).
pub fn linear_new(x: &[f32], m: usize, w: &PackedCols, bias: Option<&[f32]>) -> Vec<f32> {
    // SAFETY: linear_raw stores every one of the m x n outputs and reads none.
    unsafe { filled(m * w.n, |p| linear_raw(x, m, w, bias, p)) }
}

/// [`linear`] into `out`, valid for `m x n` floats; every one is stored, none is read.
unsafe fn linear_raw(x: &[f32], m: usize, w: &PackedCols, bias: Option<&[f32]>, out: *mut f32) {
    let (k, n) = (w.k, w.n);
    assert_eq!(x.len(), m * k, "linear: input is not {m}x{k}");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias is not {n}");
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            // SAFETY: row r of the m x n output.
            unsafe {
                let row = out.add(r * n);
                match bias {
                    Some(b) => std::ptr::copy_nonoverlapping(b.as_ptr(), row, n),
                    None => std::ptr::write_bytes(row, 0, n),
                }
            }
        }
        return;
    }
    let t = threads();
    let c = Out(out);
    let bias = bias.map_or(Bias::None, Bias::Cols);
    let kslots = w.prec.slots(k);
    let (packed, on_the_fly);
    let (a, tasks, rows_first): (&dyn Source, Vec<_>, usize) =
        if w.data.len() * 4 > BIG_WEIGHTS && m <= FEW_ROWS {
            // Few rows and large weights (the GEGLU layers of the 8x8 and 4x4 levels: 640 or 160
            // rows, 13-26 MB of weights): the rows are packed once, and each task takes all of
            // them through a slice of the columns, so every weight is fetched from memory once
            // instead of once per block of rows.
            packed = PackedRows::new(w.prec, x, m, k);
            let fit = ((512 << 10) / (4 * m) / NR).max(1) * NR;
            let even = (n.div_ceil(4 * t)).div_ceil(NR) * NR;
            let cols = fit.min(even).max(NR);
            let tasks = (0..n)
                .step_by(cols)
                .map(|c0| ((0, m), (c0, (c0 + cols).min(n))))
                .collect();
            (&packed, tasks, m.div_ceil(MR) * MR)
        } else {
            on_the_fly = RowsOnTheFly {
                prec: w.prec,
                src: x,
                ld: k,
                k,
            };
            let m_parts = split(m, t * 2, MR);
            // Few rows (e.g. a text encoder's 77 tokens): split the columns as well.
            let n_parts = if m_parts.len() >= t {
                vec![(0, n)]
            } else {
                split(n, t * 2, NR)
            };
            let tasks = m_parts
                .iter()
                .flat_map(|&mr| n_parts.iter().map(move |&nr| (mr, nr)))
                .collect();
            let rows_first = rows_per_pass(n);
            (&on_the_fly, tasks, rows_first)
        };
    stats::timed(
        stats::Kernel::Linear,
        [m, k, n, 0],
        2 * (m * n * k) as u64,
        || {
            tasks.par_iter().for_each(|&(mr, nr)| {
                let c = c;
                // SAFETY: tasks cover disjoint tiles of `out`, which is m x n.
                unsafe { run_task(w.prec, kslots, a, w, mr, nr, c.0, n, bias, Some(rows_first)) }
            })
        },
    );
}

/// Rows of A per pass through K in [`linear`]: their part of C (rows x n floats) stays within
/// about 512 KiB.
fn rows_per_pass(n: usize) -> usize {
    ((512 << 10) / (4 * n.max(1)) / MR).clamp(4, 32) * MR
}

thread_local! {
    /// A task's block of [`linear_geglu`] products.
    static GEGLU_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// diffusers GEGLU after its projection, in one pass: with `h = x W^T + bias` (`m x 2i`,
/// `w` packed from W, `2i x k`), `out[r, j] = h[r, j] * gelu(h[r, i + j])` (`m x i`). Each
/// task's block of h stays in L2 on its way from the product to the GELU: the same values as
/// [`linear`] then [`geglu`], without the m x 2i intermediate. `None` where the rows are too
/// few to give every thread several blocks, or few against large weights (the caller runs
/// the two passes).
pub fn linear_geglu(x: &[f32], m: usize, w: &PackedCols, bias: Option<&[f32]>) -> Option<Vec<f32>> {
    let (k, n) = (w.k, w.n);
    assert_eq!(x.len(), m * k, "linear_geglu: input is not {m}x{k}");
    assert!(
        n % 2 == 0 && n > 0,
        "linear_geglu: {n} columns do not split in two"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear_geglu: bias is not {n}");
    }
    let inner = n / 2;
    // Rows per task: as linear's passes through K.
    let rows = rows_per_pass(n);
    // Large weights over few rows take linear's order (each weight fetched once), and too few
    // rows would leave threads idle.
    let big = w.data.len() * 4 > BIG_WEIGHTS && m <= FEW_ROWS;
    if k == 0 || big || m < rows * 2 * threads() {
        return None;
    }
    let kslots = w.prec.slots(k);
    let bias = bias.map_or(Bias::None, Bias::Cols);
    let starts: Vec<usize> = (0..m).step_by(rows).collect();
    let flops = 2 * (m * n * k) as u64;
    let write = |p: *mut f32| {
        let c = Out(p);
        stats::timed(stats::Kernel::Linear, [m, k, n, 0], flops, || {
            starts.par_iter().for_each(|&r0| {
                let c = c;
                let len = rows.min(m - r0);
                let a = RowsOnTheFly {
                    prec: w.prec,
                    src: &x[r0 * k..],
                    ld: k,
                    k,
                };
                GEGLU_ROWS.with(|h| {
                    let mut h = h.borrow_mut();
                    grow(&mut h, len * n);
                    // SAFETY: `h` holds len x n floats; the product stores all of them.
                    unsafe {
                        run_task(
                            w.prec,
                            kslots,
                            &a,
                            w,
                            (0, len),
                            (0, n),
                            h.as_mut_ptr(),
                            n,
                            bias,
                            Some(len),
                        )
                    };
                    // SAFETY: rows r0..r0+len of the m x inner output, this task's alone.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(c.0.add(r0 * inner), len * inner) };
                    elementwise::geglu_rows(&h[..len * n], inner, dst);
                })
            })
        })
    };
    // SAFETY: every task stores all `inner` outputs of its rows, and the tasks' rows cover 0..m.
    Some(unsafe { filled(m * inner, write) })
}

/// Shape of a 2-D convolution (no groups, no dilation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub h_out: usize,
    pub w_out: usize,
}

impl ConvGeometry {
    /// Values of the output of `images` images with `c_out` channels.
    pub fn out_len(&self, images: usize, c_out: usize) -> usize {
        images * c_out * self.h_out * self.w_out
    }

    pub fn new(
        c_in: usize,
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Option<Self> {
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            return None;
        }
        Some(Self {
            c_in,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            h_out: (h + 2 * pad - kh) / stride + 1,
            w_out: (w + 2 * pad - kw) / stride + 1,
        })
    }
}

/// NCHW convolution: `out (images, c_out, h_out, w_out)`, weights packed from
/// `(c_out, c_in * kh * kw)`, bias per output channel.
pub fn conv2d(
    x: &[f32],
    images: usize,
    geom: &ConvGeometry,
    w: &PackedRows,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(out.len(), geom.out_len(images, w.m), "conv2d: output size");
    // SAFETY: `out` holds the whole output.
    unsafe {
        conv2d_impl(
            x,
            images,
            geom,
            w,
            bias,
            out.as_mut_ptr(),
            None,
            ConvFusion::default(),
        )
    }
}

/// [`conv2d`] into a new vector (its memory is written once, not zeroed first).
pub fn conv2d_new(
    x: &[f32],
    images: usize,
    geom: &ConvGeometry,
    w: &PackedRows,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    conv2d_fused(x, images, geom, w, bias, ConvFusion::default())
}

/// What a convolution does around its product besides the bias: the passes of a ResNet block
/// (`conv(silu(norm(x))) + temb`, `(shortcut + conv(..)) / s`) folded into the convolution's
/// own reading and writing, in the reference's order of operations.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvFusion<'a> {
    /// Map every input plane (image i, channel c: plane `i * c_in + c`) as it is read.
    pub input: Option<&'a PlaneAffine>,
    /// Added after the bias, per image and output channel (`images x c_out` values).
    pub image_bias: Option<&'a [f32]>,
    /// `out = (residual + out) / divisor` last, `residual` shaped as the output.
    pub residual: Option<(&'a [f32], f32)>,
}

impl ConvFusion<'_> {
    fn has_output_part(&self) -> bool {
        self.image_bias.is_some() || self.residual.is_some()
    }

    /// Output value `v` of output plane `plane` (image-major), element `i` of the output.
    #[inline(always)]
    fn finish(&self, plane: usize, i: usize, v: f32) -> f32 {
        let v = match self.image_bias {
            Some(b) => v + b[plane],
            None => v,
        };
        match self.residual {
            Some((r, d)) => (r[i] + v) / d,
            None => v,
        }
    }
}

/// [`conv2d_new`] with a [`ConvFusion`]: the same values as the separate passes.
pub fn conv2d_fused(
    x: &[f32],
    images: usize,
    geom: &ConvGeometry,
    w: &PackedRows,
    bias: Option<&[f32]>,
    fusion: ConvFusion,
) -> Vec<f32> {
    let len = geom.out_len(images, w.m);
    let planes_in = images * geom.c_in;
    if let Some(map) = fusion.input {
        assert_eq!(
            map.planes(),
            planes_in,
            "conv2d: the input map has {} planes, the input {images}x{}",
            map.planes(),
            geom.c_in
        );
    }
    if let Some(b) = fusion.image_bias {
        assert_eq!(
            b.len(),
            images * w.m,
            "conv2d: image bias is not {images}x{}",
            w.m
        );
    }
    if let Some((r, _)) = fusion.residual {
        assert_eq!(
            r.len(),
            len,
            "conv2d: the residual is not the output's size"
        );
    }
    // Only the direct and Winograd convolutions read each input value once; the other paths
    // take the mapped input as a copy.
    let mapped;
    let (x, fusion) = match fusion.input {
        Some(map) if !w.fuses() => {
            assert_eq!(x.len(), planes_in * geom.h * geom.w, "conv2d: input size");
            mapped = map.apply_all(x, geom.h * geom.w);
            let f = ConvFusion {
                input: None,
                ..fusion
            };
            (mapped.as_slice(), f)
        }
        _ => (x, fusion),
    };
    // SAFETY: conv2d_impl stores every output and reads none.
    let mut out = unsafe {
        filled(len, |p| {
            conv2d_impl(x, images, geom, w, bias, p, None, fusion)
        })
    };
    if !w.fuses() && fusion.has_output_part() {
        let plane = geom.h_out * geom.w_out;
        out.par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(p, o)| {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = fusion.finish(p, p * plane + j, *v);
                }
            });
    }
    out
}

/// diffusers' `Conv3d(kernel (3, 1, 1), padding (1, 0, 0))` over the `frames` frames of one
/// sample, `x`: (frames, c, h, w), as one GEMM with K = 3c: `w` packs the kernel as
/// (c_out, 3c), tap-major (`[tap 0 | tap 1 | tap 2]` over the channels). Frame f reads frames
/// f-1, f, f+1 of a copy of `x` with a zero frame at both ends, as one image of 3c channels.
/// Returns (frames, c_out, h, w).
pub fn conv_frames(
    x: &[f32],
    frames: usize,
    (c, h, wd): (usize, usize, usize),
    w: &PackedRows,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (plane, frame) = frame_sizes(x, frames, (c, h, wd));
    assert_eq!(w.k, 3 * c, "conv_frames: weights are not {}x{}", w.m, 3 * c);
    let padded = padded_frames(x, frames, (c, plane), 1, None);
    let g = ConvGeometry::new(3 * c, h, wd, 1, 1, 1, 0).expect("a 1x1 kernel fits");
    // SAFETY: conv2d_impl stores every output and reads none; the
    // `frames` images of 3c channels, one frame apart, lie inside `padded`.
    unsafe {
        filled(g.out_len(frames, w.m), |p| {
            conv2d_impl(
                &padded,
                frames,
                &g,
                w,
                bias,
                p,
                Some(frame),
                ConvFusion::default(),
            )
        })
    }
}

/// The plane and frame sizes of a temporal convolution's input `x` of `frames` frames of
/// (c, h, w), which it checks.
fn frame_sizes(x: &[f32], frames: usize, (c, h, wd): (usize, usize, usize)) -> (usize, usize) {
    let plane = h * wd;
    assert_eq!(
        x.len(),
        frames * c * plane,
        "conv_frames: input is not {frames}x{c}x{h}x{wd}"
    );
    (plane, c * plane)
}

/// `frames` frames of `c` planes of `pix` values, mapped by `input` as in
/// [`conv_frames_winograd`], copied between one zero frame before and `after` zero frames after.
fn padded_frames(
    x: &[f32],
    frames: usize,
    (c, pix): (usize, usize),
    after: usize,
    input: Option<(&PlaneAffine, usize)>,
) -> Vec<f32> {
    let frame = c * pix;
    if let Some((map, first)) = input {
        assert!(
            first + frames * c <= map.planes(),
            "conv_frames: the input map has {} planes, not {} from {first}",
            map.planes(),
            frames * c
        );
    }
    let planes = frames * c;
    let fill = |p: *mut f32| {
        let p = Out(p);
        // SAFETY: the zero frames before and after, and the body by planes below, cover all.
        unsafe {
            std::ptr::write_bytes(p.0, 0, frame);
            std::ptr::write_bytes(p.0.add((frames + 1) * frame), 0, after * frame);
        }
        let per = ((1 << 16) / pix.max(1)).max(1);
        (0..planes).into_par_iter().step_by(per).for_each(|p0| {
            let p = p;
            for pl in p0..(p0 + per).min(planes) {
                let src = &x[pl * pix..][..pix];
                // SAFETY: plane pl of the body, which no other task writes.
                let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(frame + pl * pix), pix) };
                match input {
                    Some((map, first)) => map.apply(first + pl, src, dst),
                    None => dst.copy_from_slice(src),
                }
            }
        });
    };
    // SAFETY: `fill` stores every value.
    unsafe { filled((frames + 1 + after) * frame, fill) }
}

/// The rows of a packed matrix from `first` on, as an A operand of their own.
struct RowsFrom<'a> {
    rows: &'a PackedRows,
    first: usize,
}

impl Source for RowsFrom<'_> {
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        self.rows.block(self.first + i0, len, k0, kc, buf)
    }

    fn a_layout(&self) -> ALayout {
        ALayout::Interleaved
    }
}

/// B of one transformed frame of [`conv_frames_winograd`], packed on the fly: column q of
/// the virtual `c x (pairs * pix)` matrix is pixel `q % pix` of pair `j = q / pix`, row r is
/// `padded[2j + a][r] + sign * padded[2j + b][r]` (padded frames of `c` planes of `pix`).
struct FrameCombo<'a> {
    prec: Precision,
    padded: &'a [f32],
    pix: usize,
    c: usize,
    /// The virtual column of this operand's column 0, and its columns.
    q0: usize,
    n: usize,
    a: usize,
    b: usize,
    sign: f32,
}

impl Source for FrameCombo<'_> {
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let panels = len.div_ceil(NR);
        grow(buf, panels * kc * NR);
        let vps = values_per_slot(self.prec);
        let (pix, frame) = (self.pix, self.c * self.pix);
        // Row r's values of virtual columns q..q + cols, all of one pair (None past the rows).
        let row = |r: usize, q: usize, cols: usize| {
            (r < self.c).then(|| {
                let (j, p) = (q / pix, q % pix);
                let at = |f: usize| &self.padded[(2 * j + f) * frame + r * pix + p..][..cols];
                (at(self.a), at(self.b))
            })
        };
        for pn in 0..panels {
            let col = i0 + pn * NR;
            let cols = NR.min(self.n - col);
            for s in 0..kc {
                let panel = &mut buf[(pn * kc + s) * NR..][..cols];
                let r = (k0 + s) * vps;
                // The panel's columns in runs of one pair each.
                let mut done = 0;
                while done < cols {
                    let q = self.q0 + col + done;
                    let run = (pix - q % pix).min(cols - done);
                    let dst = &mut panel[done..done + run];
                    match row(r, q, run) {
                        Some(lo) => {
                            let hi = if vps == 2 { row(r + 1, q, run) } else { None };
                            elementwise::combo_slots(lo, hi, self.sign, vps == 2, dst);
                        }
                        None => dst.fill(0),
                    }
                    done += run;
                }
            }
        }
        (buf.as_ptr(), kc * NR)
    }
}

/// The rows of each of the four matrices of [`PackedRows::new_frames_winograd`].
pub fn frames_winograd_rows(c_out: usize) -> usize {
    c_out.div_ceil(MR).max(1) * MR
}

impl PackedRows {
    /// Packs the weights of a temporal convolution, `(c_out, 3c)` tap-major as for
    /// [`conv_frames`], for [`conv_frames_winograd`]: four stacked `c_out x c` matrices (each
    /// [`frames_winograd_rows`] rows, the rest zero) `U0 = g0`, `U1 = (g0 + g1 + g2) / 2`,
    /// `U2 = (g0 - g1 + g2) / 2`, `U3 = -g2`, computed in f64.
    pub fn new_frames_winograd(prec: Precision, w: &[f32], c_out: usize, c: usize) -> Self {
        assert_eq!(
            w.len(),
            c_out * 3 * c,
            "PackedRows: {c_out}x3x{c} temporal weights need {} values",
            c_out * 3 * c
        );
        let rows = frames_winograd_rows(c_out);
        let mut u = vec![0f32; 4 * rows * c];
        for o in 0..c_out {
            let g = |t: usize, ci: usize| w[o * 3 * c + t * c + ci] as f64;
            for ci in 0..c {
                let (g0, g1, g2) = (g(0, ci), g(1, ci), g(2, ci));
                let vals = [g0, (g0 + g1 + g2) / 2.0, (g0 - g1 + g2) / 2.0, -g2];
                for (i, v) in vals.into_iter().enumerate() {
                    u[(i * rows + o) * c + ci] = v as f32;
                }
            }
        }
        Self::new(prec, &u, 4 * rows, c)
    }
}

/// [`conv_frames`] of `map(x)` by Winograd's F(2, 3) over the frames: `input = (map, first)`
/// maps plane (frame f, channel ch) of `x` with `map`'s plane `first + f * c + ch` as the
/// zero-padded copy is made (the temporal convolutions' GroupNorm + SiLU without a pass of
/// their own; the same values). Each pair of output frames
/// (2j, 2j+1) from the input frames d0..d3 = 2j-1 ..= 2j+2 (zeros outside) as `y0 = M0 + M1 +
/// M2`, `y1 = M1 - M2 + M3` with `M_i = U_i V_i` (`u` from [`PackedRows::new_frames_winograd`]:
/// U3 carries the minus) and `V0 = d0 - d2`, `V1 = d1 + d2`, `V2 = d2 - d1`, `V3 = d1 - d3`:
/// four products of K = c per pair where the plain form does two of K = 3c (1.5x fewer
/// multiplications). The transformed frames are formed as they are packed (rounded to the
/// precision after the sum, f32 before); the columns of the products run over (pair, pixel),
/// so that small frames fill whole panels; a block's four products stay in a buffer for the
/// output transform.
pub fn conv_frames_winograd(
    x: &[f32],
    frames: usize,
    (c, h, wd): (usize, usize, usize),
    u: &PackedRows,
    c_out: usize,
    bias: Option<&[f32]>,
    input: Option<(&PlaneAffine, usize)>,
) -> Vec<f32> {
    let (pix, _) = frame_sizes(x, frames, (c, h, wd));
    let rows = frames_winograd_rows(c_out);
    assert_eq!(
        (u.m, u.k),
        (4 * rows, c),
        "conv_frames: Winograd weights are not 4x{rows}x{c}"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out, "conv_frames: bias is not {c_out}");
    }
    if frames == 0 || c_out == 0 || pix == 0 {
        return Vec::new();
    }
    let pairs = frames.div_ceil(2);
    // Input frames -1 ..= 2 * pairs, zeros outside 0..frames: padded frame t + 1 is frame t.
    let padded = padded_frames(x, frames, (c, pix), 2 * pairs + 1 - frames, input);
    let prec = u.prec;
    let kslots = prec.slots(c);
    let t = threads();
    // Tasks over the virtual columns (pair, pixel), in multiples of NR (small frames share
    // panels across pairs): the four products of a block (4 x c_out x n f32) within about 1 MB.
    let cols = pairs * pix;
    let per = ((1 << 20) / (16 * c_out) / NR).max(1) * NR;
    let col_parts = split(cols, cols.div_ceil(per).max(2 * t), NR);
    // Few column blocks (4x4 frames: 80 columns) also split the output channels, so that
    // every thread has work and each reads only its rows of the weights.
    let row_parts = split(c_out, (2 * t).div_ceil(col_parts.len()), MR);
    let tasks: Vec<_> = row_parts
        .iter()
        .flat_map(|&r| col_parts.iter().map(move |&q| (r, q)))
        .collect();
    let out_frame = c_out * pix;
    let flops = 2 * (frames * c_out * pix * 3 * c) as u64;
    let write = |o: *mut f32| {
        let o = Out(o);
        stats::timed(
            stats::Kernel::Conv2d,
            [frames, 3 * c, pix, c_out],
            flops,
            || {
                tasks.par_iter().for_each(|&((r0, r1), (q0, q1))| {
                    let o = o;
                    let n = q1 - q0;
                    // V_i over padded frames 2j + a, 2j + b: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
                    let v = |a: usize, b: usize, sign: f32| FrameCombo {
                        prec,
                        padded: &padded,
                        pix,
                        c,
                        q0,
                        n,
                        a,
                        b,
                        sign,
                    };
                    let v = [v(0, 2, -1.0), v(1, 2, 1.0), v(2, 1, -1.0), v(1, 3, -1.0)];
                    FRAME_WINO.with(|m| {
                        let m = &mut *m.borrow_mut();
                        let nr = r1 - r0;
                        grow(m, 4 * nr * n);
                        let mp = m.as_mut_ptr();
                        for (i, vi) in v.iter().enumerate() {
                            let ui = RowsFrom {
                                rows: u,
                                first: i * rows + r0,
                            };
                            // SAFETY: M_i is c_out x n floats of `m`, which the product stores.
                            unsafe {
                                run_task(
                                    prec,
                                    kslots,
                                    &ui,
                                    vi,
                                    (0, nr),
                                    (0, n),
                                    mp.add(i * nr * n),
                                    n,
                                    Bias::None,
                                    None,
                                )
                            };
                        }
                        let mi = |i: usize, co: usize, at: usize, len: usize| {
                            &m[(i * nr + co - r0) * n + at..][..len]
                        };
                        // y0 = M0 + M1 + M2, y1 = M1 - M2 + M3 (U3 carries the minus), by runs
                        // of one pair.
                        let mut at = 0;
                        while at < n {
                            let q = q0 + at;
                            let (j, p) = (q / pix, q % pix);
                            let run = (pix - p).min(n - at);
                            for co in r0..r1 {
                                let b = bias.map_or(0.0, |b| b[co]);
                                let [m0, m1, m2, m3] = [0, 1, 2, 3].map(|i| mi(i, co, at, run));
                                // SAFETY: pixels p..p + run of channel co of output frames 2j
                                // and 2j + 1 (of 2 * pairs): this task's rows and columns alone.
                                let (y0, y1) = unsafe {
                                    let y = |f: usize| o.0.add(f * out_frame + co * pix + p);
                                    (
                                        std::slice::from_raw_parts_mut(y(2 * j), run),
                                        std::slice::from_raw_parts_mut(y(2 * j + 1), run),
                                    )
                                };
                                elementwise::frames_winograd_output([m0, m1, m2, m3], b, y0, y1);
                            }
                            at += run;
                        }
                    })
                })
            },
        )
    };
    // SAFETY: the tasks cover every pixel of every output frame of the 2 * pairs frames.
    let mut out = unsafe { filled(2 * pairs * out_frame, write) };
    out.truncate(frames * out_frame);
    out
}

thread_local! {
    /// The four products of a task of [`conv_frames_winograd`].
    static FRAME_WINO: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The convolution into `out`, valid for the whole output: stores every element, reads none.
/// `fusion` is applied by the direct convolution only (the caller does it for the others).
#[allow(clippy::too_many_arguments)]
unsafe fn conv2d_impl(
    x: &[f32],
    images: usize,
    geom: &ConvGeometry,
    w: &PackedRows,
    bias: Option<&[f32]>,
    out: *mut f32,
    stride: Option<usize>,
    fusion: ConvFusion,
) {
    let g = geom;
    let c_out = w.m;
    let k = g.c_in * g.kh * g.kw;
    assert_eq!(w.k, k, "conv2d: weights are not {c_out}x{k}");
    let in_size = g.c_in * g.h * g.w;
    let pix = g.h_out * g.w_out;
    // Image i starts at i * stride (images may overlap when stride < in_size).
    let stride = stride.unwrap_or(in_size);
    assert!(
        images == 0 || (images - 1) * stride + in_size <= x.len(),
        "conv2d: input is not {images} images of {in_size} values {stride} apart"
    );
    if stride == in_size {
        assert_eq!(
            x.len(),
            images * in_size,
            "conv2d: input is not {images}x{in_size}"
        );
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out, "conv2d: bias is not {c_out}");
    }
    if images == 0 || c_out == 0 || pix == 0 {
        return;
    }
    if w.is_winograd() {
        assert!(
            (g.kh, g.kw, g.stride, g.pad) == (3, 3, 1, 1),
            "conv2d: weights packed for a 3x3 Winograd convolution (stride 1, padding 1), not \
             {}x{} at stride {} with padding {}",
            g.kh,
            g.kw,
            g.stride,
            g.pad
        );
        // SAFETY: the caller's contract on `out`; the images lie in `x` (checked above).
        unsafe { winograd_conv(x, images, g, w, bias, out, stride, fusion) };
        return;
    }
    if let Some(layout) = w.taps {
        assert!(
            g.stride == 1 && (layout.c_in, layout.kh, layout.kw) == (g.c_in, g.kh, g.kw),
            "conv2d: weights packed for a {}x{} direct convolution of {} channels at stride 1, \
             not {}x{} at stride {} over {} channels",
            layout.kh,
            layout.kw,
            layout.c_in,
            g.kh,
            g.kw,
            g.stride,
            g.c_in
        );
        // SAFETY: the caller's contract on `out`; the images lie in `x` (checked above).
        unsafe { direct_conv(x, images, g, w, layout, bias, out, stride, fusion) };
        return;
    }
    let t = threads();
    let kslots = w.prec.slots(k);
    // Small images with large weights (the 4x4 and 8x8 levels, 1280 channels: 3-30 MB of
    // packed weights), or images smaller than a panel: one GEMM whose columns run over the
    // pixels of all images, into a (c_out, images * pix) buffer. Image by image, every image
    // would fetch all the weights from memory again and use each weight for a few panels only.
    let small = pix < NR || (pix <= BATCHED_PIXELS && w.data.len() * 4 > BIG_WEIGHTS);
    let batched_tmp = small && images > 1 && x.len() < i32::MAX as usize;
    if batched_tmp {
        let total = images * pix;
        let mut tmp = Vec::<f32>::with_capacity(c_out * total);
        let c = Out(tmp.as_mut_ptr());
        let bias = bias.map_or(Bias::None, Bias::Rows);
        let patches = Patches {
            prec: w.prec,
            image: x,
            geom: g,
            batched: Some((pix, stride)),
        };
        // The output channels are split between the threads (each fetches its share of the
        // weights), and the columns into chunks whose part of C stays in L2 through all K
        // blocks.
        let rows = split(c_out, t, MR);
        let per_task = rows.iter().map(|r| r.1 - r.0).max().unwrap_or(MR);
        let cols = ((512 << 10) / (4 * per_task) / NR).max(1) * NR;
        let tasks: Vec<_> = rows
            .iter()
            .flat_map(|&r| {
                (0..total)
                    .step_by(cols)
                    .map(move |c0| (r, (c0, (c0 + cols).min(total))))
            })
            .collect();
        stats::timed(
            stats::Kernel::Conv2d,
            [images, k, pix, c_out],
            2 * (images * c_out * pix * k) as u64,
            || {
                tasks.par_iter().for_each(|&(mr, nr)| {
                    let c = c;
                    // SAFETY: each task writes rows mr and columns nr of the c_out x total
                    // buffer; the tasks cover it all.
                    unsafe { run_task(w.prec, kslots, w, &patches, mr, nr, c.0, total, bias, None) }
                });
                // SAFETY: every element of the buffer was written just above.
                unsafe { tmp.set_len(c_out * total) };
                // Back to (images, c_out, pix), one image per task.
                let o = Out(out);
                (0..images).into_par_iter().for_each(|img| {
                    let o = o;
                    for m in 0..c_out {
                        let t = &tmp[m * total + img * pix..][..pix];
                        // SAFETY: channel m of image img, inside the output.
                        unsafe {
                            let dst = o.0.add((img * c_out + m) * pix);
                            std::ptr::copy_nonoverlapping(t.as_ptr(), dst, pix);
                        }
                    }
                });
            },
        );
        return;
    }
    // Columns (pixels) per task: whole panels, enough tasks for every thread, and few enough
    // that the task's part of C (c_out x columns) stays in L2 through all K blocks.
    let l2_cols = ((512 << 10) / (4 * c_out)).max(NR) / NR * NR;
    let parts = (t * 2).div_ceil(images).max(pix.div_ceil(l2_cols));
    let per_image = split(pix, parts, NR);
    let tasks: Vec<_> = (0..images)
        .flat_map(|i| per_image.iter().map(move |&r| (i, r)))
        .collect();
    let c = Out(out);
    let bias = bias.map_or(Bias::None, Bias::Rows);
    stats::timed(
        stats::Kernel::Conv2d,
        [images, k, pix, c_out],
        2 * (images * c_out * pix * k) as u64,
        || {
            tasks.par_iter().for_each(|&(img, (p0, p1))| {
                let c = c;
                let patches = Patches {
                    prec: w.prec,
                    image: &x[img * stride..][..in_size],
                    geom: g,
                    batched: None,
                };
                // The task's columns start at p0: shift C so that column p0 is column 0 of the task.
                let base = unsafe { c.0.add(img * c_out * pix + p0) };
                let shifted = Shifted {
                    inner: &patches,
                    by: p0,
                };
                // SAFETY: each task writes its image's pixels p0..p1 of every channel.
                unsafe {
                    run_task(
                        w.prec,
                        kslots,
                        w,
                        &shifted,
                        (0, c_out),
                        (0, p1 - p0),
                        base,
                        pix,
                        bias,
                        None,
                    )
                }
            })
        },
    );
}

/// The direct convolution (stride 1) with weights from [`PackedRows::new_taps`].
///
/// Each image is seen in padded coordinates: a plane of `(h + 2 pad) x wp` values, `wp = w +
/// 2 pad`, flattened row after row. Output pixel (y, x) is then column `q = y * wp + x` of
/// the product, and tap (dy, dx) reads the plane at `q + dy * wp + dx`: one shift of the same
/// flat input for every column. So the B operand of a K block (a block of input channels) is
/// the input itself, packed once (converted, channels paired in bf16, with the padding's
/// zeros), and each tap is a segment of K starting at its shift ([`micro::Segments`]),
/// instead of `kh * kw` packed copies of every input value. The `wp - w_out` columns per row
/// that fall in the padding are computed and dropped (6% at 32 px wide, under 1% at 256).
#[allow(clippy::too_many_arguments)]
unsafe fn direct_conv(
    x: &[f32],
    images: usize,
    g: &ConvGeometry,
    w: &PackedRows,
    layout: TapLayout,
    bias: Option<&[f32]>,
    out: *mut f32,
    stride: usize,
    fusion: ConvFusion,
) {
    let prec = w.prec;
    let c_out = w.m;
    let (kh, kw, pad) = (g.kh, g.kw, g.pad);
    let wp = g.w + 2 * pad;
    let (ho, wo) = (g.h_out, g.w_out);
    let flat = ho * wp;
    let taps = kh * kw;
    let offsets: Vec<usize> = (0..taps).map(|t| (t / kw) * wp + t % kw).collect();
    let (blocks, kb_len) = layout.blocks(prec);
    let cs = prec.slots(g.c_in).max(1);
    let t = threads();
    // Columns per task as for the patches: C's part (c_out x columns) stays in L2.
    let l2_cols = ((512 << 10) / (4 * c_out)).max(NR) / NR * NR;
    let tasks = image_tasks(images, flat, flat.div_ceil(l2_cols), t);
    let micro = micro::select_taps(prec, isa());
    let plane = g.h * g.w;
    let o = Out(out);
    stats::timed(
        stats::Kernel::Conv2d,
        [images, g.c_in * taps, ho * wo, c_out],
        2 * (images * c_out * ho * wo * g.c_in * taps) as u64,
        || {
            tasks.par_iter().for_each(|&(img, (q0, q1))| {
                let o = o;
                let image = &x[img * stride..][..g.c_in * plane];
                let nq = q1 - q0;
                let panels = nq.div_ceil(NR);
                let span = panels * NR + offsets[taps - 1];
                let mut b = vec![0u32; layout.block_slots * span];
                // C for this task's columns, c_out x nq: every element is stored at the first
                // K block (from zero or the bias) before any is read.
                let mut cbuf = Vec::<f32>::with_capacity(c_out * nq);
                let c = cbuf.as_mut_ptr();
                for cb in 0..blocks {
                    let s0 = cb * layout.block_slots;
                    let scb = layout.block_slots.min(cs - s0);
                    for sl in 0..scb {
                        pack_shifted(
                            prec,
                            image,
                            g,
                            (s0 + sl) * values_per_slot(prec),
                            q0,
                            fusion.input.map(|m| (m, img * g.c_in)),
                            &mut b[sl * span..][..span],
                        );
                    }
                    let seg = micro::Segments {
                        count: taps,
                        len: scb,
                        offsets: offsets.as_ptr(),
                        ldb: span,
                    };
                    for i0 in (0..c_out).step_by(MC) {
                        let ilen = MC.min(c_out - i0);
                        let (ap, astride) =
                            w.block(i0, ilen, cb * kb_len, taps * scb, &mut Vec::new());
                        for pb in 0..panels {
                            let cols = NR.min(nq - pb * NR);
                            for rb in 0..ilen.div_ceil(MR) {
                                let rows = MR.min(ilen - rb * MR);
                                let row = i0 + rb * MR;
                                let init = match (cb, bias) {
                                    (0, None) => TileInit::Zero,
                                    (0, Some(v)) => TileInit::RowBias(v[row..].as_ptr()),
                                    _ => TileInit::Accumulate,
                                };
                                // SAFETY: A's block for rows row.., K block cb; B's slots hold
                                // span values, the panel's last read at pb * NR + NR - 1 plus
                                // the largest offset, inside span; C's tile inside c_out x nq.
                                unsafe {
                                    micro(
                                        seg,
                                        ap.add(rb * astride),
                                        b.as_ptr().add(pb * NR),
                                        c.add(row * nq + pb * NR),
                                        nq,
                                        rows,
                                        cols,
                                        init,
                                    )
                                };
                            }
                        }
                    }
                }
                // The columns inside the image, into (c_out, ho, wo).
                for co in 0..c_out {
                    let mut q = q0;
                    while q < q1 {
                        let (y, xq) = (q / wp, q % wp);
                        let end = (q - xq + wp).min(q1);
                        if xq < wo {
                            let n = (q - xq + wo).min(end) - q;
                            let at = ((img * c_out + co) * ho + y) * wo + xq;
                            // SAFETY: C's row co, columns q - q0 .. + n, all stored above;
                            // output pixels (y, xq..xq + n) of channel co of image img.
                            unsafe {
                                let src = c.add(co * nq + (q - q0));
                                if fusion.has_output_part() {
                                    for j in 0..n {
                                        let v =
                                            fusion.finish(img * c_out + co, at + j, *src.add(j));
                                        *o.0.add(at + j) = v;
                                    }
                                } else {
                                    std::ptr::copy_nonoverlapping(src, o.0.add(at), n)
                                }
                            };
                        }
                        q = end;
                    }
                }
            })
        },
    );
}

/// Element `t` (row-major in 4x4) of `G g G^T` for a 3x3 weight `g` (row-major), the weight
/// transform of F(2x2, 3x3) with `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`,
/// in f64.
fn winograd_weight(g: &[f32], t: usize) -> f32 {
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let (i, l) = (t / 4, t % 4);
    let mut u = 0.0;
    for a in 0..3 {
        for b in 0..3 {
            u += G[i][a] * g[a * 3 + b] as f64 * G[l][b];
        }
    }
    u as f32
}

/// The Winograd convolution F(2x2, 3x3) (stride 1, padding 1) with weights from
/// [`PackedRows::new_winograd`].
///
/// The output is cut into 2x2 tiles; tile (ty, tx) reads the 4x4 input patch at (2ty - 1,
/// 2tx - 1) (zeros outside the image), `d`. With `V = B^T d B` per input channel and `U = G g
/// G^T` per channel pair, the tile's output is `A^T M A` where `M = sum over input channels of
/// U ⊙ V`: element by element that is 16 matrix products `M_t = U_t V_t` (c_out x c_in times
/// c_in x tiles), 16 multiplications per tile and channel pair where the direct convolution
/// does 36, `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`, `A^T = [[1,
/// 1, 1, 0], [0, 1, -1, -1]]`. The input is transformed (in f32, then rounded to the
/// precision) as it is packed, a block of tiles and of input channels at a time; the 16
/// products of a block of tiles accumulate over the channel blocks in a buffer that the output
/// transform (f32) then reads.
#[allow(clippy::too_many_arguments)]
unsafe fn winograd_conv(
    x: &[f32],
    images: usize,
    g: &ConvGeometry,
    w: &PackedRows,
    bias: Option<&[f32]>,
    out: *mut f32,
    stride: usize,
    fusion: ConvFusion,
) {
    let prec = w.prec;
    let c_out = w.m;
    let rows = w.wino_rows.expect("Winograd weights");
    let (h, wd) = (g.h, g.w);
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let tiles = th * tw;
    if images > 1 && tiles < NR {
        // SAFETY: the caller's contract.
        unsafe { winograd_conv_batched(x, images, g, w, bias, out, stride, fusion) };
        return;
    }
    let kslots = prec.slots(g.c_in);
    let t = threads();
    // Tiles per task: the 16 products' buffer (16 x c_out x tiles f32) within about 2 MB
    // (1, 2, 4 and 8 MB measured within 6% of each other on the VAE, 2 MB the best).
    let per = ((2 << 20) / (64 * c_out.max(1)) / NR).max(1) * NR;
    let tasks = image_tasks(images, tiles, tiles.div_ceil(per), t);
    let micro = micro::select(prec, isa(), ALayout::Interleaved);
    let plane = h * wd;
    let o = Out(out);
    stats::timed(
        stats::Kernel::Conv2d,
        [images, g.c_in * 9, plane, c_out],
        2 * (images * c_out * plane * g.c_in * 9) as u64,
        || {
            tasks.par_iter().for_each(|&(img, (q0, q1))| {
                let o = o;
                WINO.with(|bufs| {
                    let bufs = &mut *bufs.borrow_mut();
                    let image = &x[img * stride..][..g.c_in * plane];
                    let job = WinoTask {
                        prec,
                        g,
                        w,
                        rows,
                        kslots,
                        image,
                        img,
                        tiles: (q0, q1),
                        input: fusion.input,
                    };
                    let nt = q1 - q0;
                    let ld = nt.div_ceil(NR) * NR;
                    // SAFETY: `micro` is the Interleaved-A kernel of this precision and CPU.
                    unsafe { winograd_products(&job, micro, bufs) };
                    let WinoBuffers { m, y0, y1, .. } = bufs;
                    let out = WinoOut {
                        m,
                        c_out,
                        ld,
                        g,
                        bias,
                        fusion: &fusion,
                        o,
                    };
                    for co in 0..c_out {
                        // SAFETY: only this task's tiles cover these pixels.
                        unsafe { out.store(img, co, (q0, q1), 0, y0, y1) };
                    }
                })
            })
        },
    );
}

/// Where the output transform of [`winograd_conv`] reads and writes: the 16 products `m`
/// ([t][c_out][ld]), the output with its bias and the fusion's output part.
struct WinoOut<'a> {
    m: &'a [f32],
    c_out: usize,
    ld: usize,
    g: &'a ConvGeometry,
    bias: Option<&'a [f32]>,
    fusion: &'a ConvFusion<'a>,
    o: Out,
}

impl WinoOut<'_> {
    /// The output transform of image `img`'s tiles `q0..q1` (raster order over its tile grid)
    /// for output channel `co`, tile `q` being column `col0 + q - q0` of the products, a tile
    /// row's run of tiles at a time.
    ///
    /// # Safety
    /// The output holds image `img`'s plane `co`, and no other thread writes these tiles'
    /// pixels.
    unsafe fn store(
        &self,
        img: usize,
        co: usize,
        (q0, q1): (usize, usize),
        col0: usize,
        y0: &mut Vec<f32>,
        y1: &mut Vec<f32>,
    ) {
        let (h, wd) = (self.g.h, self.g.w);
        let tw = wd.div_ceil(2);
        let b = self.bias.map_or(0.0, |b| b[co]);
        let oplane = img * self.c_out + co;
        let mut q = q0;
        while q < q1 {
            let (ty, tx0) = (q / tw, q % tw);
            let n = (tw - tx0).min(q1 - q);
            y0.resize(2 * n, 0.0);
            y1.resize(2 * n, 0.0);
            elementwise::winograd_output(
                self.m,
                self.c_out * self.ld,
                co * self.ld + col0 + (q - q0),
                n,
                b,
                y0,
                y1,
            );
            let ox0 = 2 * tx0;
            let nx = (2 * n).min(wd - ox0);
            for (dy, yr) in [&*y0, &*y1].into_iter().enumerate() {
                let oy = 2 * ty + dy;
                if oy >= h {
                    continue;
                }
                let at = (oplane * h + oy) * wd + ox0;
                // SAFETY: pixels (oy, ox0..ox0 + nx) of output plane oplane (the contract).
                let dst = unsafe { std::slice::from_raw_parts_mut(self.o.0.add(at), nx) };
                if self.fusion.has_output_part() {
                    for (j, (d, &v)) in dst.iter_mut().zip(yr.iter()).enumerate() {
                        *d = self.fusion.finish(oplane, at + j, v);
                    }
                } else {
                    dst.copy_from_slice(&yr[..nx]);
                }
            }
            q += n;
        }
    }
}

/// [`winograd_conv`] over images of fewer tiles than a panel has columns (the UNet's 8x8
/// level: 16 tiles): the tiles of all images are the columns of one product per element t,
/// so that no panel runs part empty (image by image, an 8x8 image's 16 tiles filled half of
/// each 32-column panel) and every transformed weight is fetched from memory once per call
/// instead of once per image. Three parallel passes: the input transform of every channel slot
/// of every image into V (`[t][panel][slot][NR]`, all of K), the 16 products `M_t = U_t V_t` by
/// blocks of [`MC`] output channels (`[t][c_out][ld]`, each block's part of M in L2 through
/// all K blocks), then the output transform image by image.
#[allow(clippy::too_many_arguments)]
unsafe fn winograd_conv_batched(
    x: &[f32],
    images: usize,
    g: &ConvGeometry,
    w: &PackedRows,
    bias: Option<&[f32]>,
    out: *mut f32,
    stride: usize,
    fusion: ConvFusion,
) {
    let prec = w.prec;
    let c_out = w.m;
    let rows = w.wino_rows.expect("Winograd weights");
    let (h, wd) = (g.h, g.w);
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let tiles = th * tw;
    let total = images * tiles;
    let panels = total.div_ceil(NR);
    let ld = panels * NR;
    let kslots = prec.slots(g.c_in);
    let kb = w.kb_len;
    let vps = values_per_slot(prec);
    let plane = h * wd;
    let (prow, pw) = (2 * th + 2, 2 * tw + 2);
    let t = threads();
    let micro = micro::select(prec, isa(), ALayout::Interleaved);
    let mut v = Vec::<u32>::with_capacity(16 * panels * kslots * NR);
    let mut m = Vec::<f32>::with_capacity(16 * c_out * ld);
    let (vo, mo) = (Out(v.as_mut_ptr()), Out(m.as_mut_ptr()));
    stats::timed(
        stats::Kernel::Conv2d,
        [images, g.c_in * 9, plane, c_out],
        2 * (images * c_out * plane * g.c_in * 9) as u64,
        || {
            // 1. V: slot sl of element t for all tiles, staged as f32 rows of `total` values
            //    (one per value of the slot), then packed a whole panel at a time.
            split(kslots, 4 * t, 1)
                .into_par_iter()
                .for_each(|(s0, s1)| {
                    let vo = vo;
                    WINO.with(|bufs| {
                        let bufs = &mut *bufs.borrow_mut();
                        for sl in s0..s1 {
                            for e in 0..vps {
                                let stage = &mut bufs.vt[e];
                                stage.clear();
                                stage.resize(16 * ld, 0.0);
                                let c = sl * vps + e;
                                if c >= g.c_in {
                                    continue;
                                }
                                let pl = &mut bufs.plane[e];
                                for img in 0..images {
                                    pl.clear();
                                    pl.resize(prow * pw, 0.0);
                                    let src = &x[img * stride + c * plane..][..plane];
                                    for iy in 0..h {
                                        let line = &src[iy * wd..][..wd];
                                        let d = &mut pl[(iy + 1) * pw + 1..][..wd];
                                        match fusion.input {
                                            Some(f) => f.apply(img * g.c_in + c, line, d),
                                            None => d.copy_from_slice(line),
                                        }
                                    }
                                    let y = &mut bufs.y0;
                                    y.resize(16 * tw, 0.0);
                                    for ty in 0..th {
                                        let at = |r: usize| &pl[(2 * ty + r) * pw..][..pw];
                                        elementwise::winograd_input(
                                            at(0),
                                            at(1),
                                            at(2),
                                            at(3),
                                            tw,
                                            y,
                                        );
                                        let col = img * tiles + ty * tw;
                                        for tt in 0..16 {
                                            stage[tt * ld + col..][..tw]
                                                .copy_from_slice(&y[tt * tw..][..tw]);
                                        }
                                    }
                                }
                            }
                            for tt in 0..16 {
                                for p in 0..panels {
                                    // SAFETY: slot sl of panel p of V_tt, NR values; only this
                                    // task writes slot sl.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            vo.0.add(((tt * panels + p) * kslots + sl) * NR),
                                            NR,
                                        )
                                    };
                                    to_slots(prec, &bufs.vt, tt * ld + p * NR, dst);
                                }
                            }
                        }
                    })
                });
            // 2. The products, a block of output channels of one M_t per task.
            let blocks: Vec<(usize, usize)> = (0..16)
                .flat_map(|tt| (0..c_out).step_by(MC).map(move |i0| (tt, i0)))
                .collect();
            blocks.par_iter().for_each(|&(tt, i0)| {
                let (vo, mo) = (vo, mo);
                let ilen = MC.min(c_out - i0);
                for k0 in (0..kslots).step_by(kb) {
                    let kc = kb.min(kslots - k0);
                    let (ap, astride) = w.block(tt * rows + i0, ilen, k0, kc, &mut Vec::new());
                    for pb in 0..panels {
                        let cols = NR.min(total - pb * NR);
                        // SAFETY: slots k0.. of panel pb of V_tt, written in pass 1.
                        let bp = unsafe { vo.0.add(((tt * panels + pb) * kslots + k0) * NR) };
                        for rb in 0..ilen.div_ceil(MR) {
                            let row = i0 + rb * MR;
                            let init = if k0 == 0 {
                                TileInit::Zero
                            } else {
                                TileInit::Accumulate
                            };
                            // SAFETY: A's block for rows row.. of U_tt, K block k0; C's tile
                            // inside M_tt (c_out x ld, reserved above), which only this task
                            // writes, stored from zero at the first K block before any read.
                            unsafe {
                                micro(
                                    kc,
                                    ap.add(rb * astride),
                                    bp,
                                    mo.0.add((tt * c_out + row) * ld + pb * NR),
                                    ld,
                                    MR.min(ilen - rb * MR),
                                    cols,
                                    init,
                                )
                            };
                        }
                    }
                }
            });
            // SAFETY: every slot of V was stored in pass 1 (the padding columns as zeros), and
            // rows < c_out, columns < total of every M_t in pass 2; columns total..ld of M are
            // not (never read: the output transform reads tiles < total).
            unsafe {
                v.set_len(16 * panels * kslots * NR);
                m.set_len(16 * c_out * ld);
            }
            // 3. The output transform, an image per task.
            let o = Out(out);
            (0..images).into_par_iter().for_each(|img| {
                WINO.with(|bufs| {
                    let WinoBuffers { y0, y1, .. } = &mut *bufs.borrow_mut();
                    let store = WinoOut {
                        m: &m,
                        c_out,
                        ld,
                        g,
                        bias,
                        fusion: &fusion,
                        o,
                    };
                    for co in 0..c_out {
                        // SAFETY: image img's planes, which only this task writes.
                        unsafe { store.store(img, co, (0, tiles), img * tiles, y0, y1) };
                    }
                })
            });
        },
    );
}

thread_local! {
    static WINO: RefCell<WinoBuffers> = RefCell::new(WinoBuffers::default());
}

/// Per-thread buffers of the Winograd convolution, reused from task to task (fresh
/// allocations of this size cost page faults every time).
#[derive(Default)]
struct WinoBuffers {
    /// V of one K block: [t][panel][slot][NR].
    v: Vec<u32>,
    /// The 16 products: [t][c_out][ld].
    m: Vec<f32>,
    /// The task's input rows of one channel (two in bf16), padded with zeros and mapped.
    plane: [Vec<f32>; 2],
    /// V of one channel for one tile row's run of tiles, [t][tile].
    vt: [Vec<f32>; 2],
    y0: Vec<f32>,
    y1: Vec<f32>,
}

/// What one task of [`winograd_conv`] works on.
struct WinoTask<'a> {
    prec: Precision,
    g: &'a ConvGeometry,
    w: &'a PackedRows,
    /// Rows of each transformed weight matrix (c_out rounded up to MR).
    rows: usize,
    kslots: usize,
    /// The image's input planes.
    image: &'a [f32],
    img: usize,
    /// Tiles q0..q1, raster order over the tile grid.
    tiles: (usize, usize),
    input: Option<&'a PlaneAffine>,
}

/// The 16 products `M_t = U_t V_t` of a task's tiles into `bufs.m` ([t][c_out][ld], ld the
/// tiles rounded up to NR), the input transformed and packed a K block at a time.
///
/// # Safety
/// `micro` must be the Interleaved-A micro-kernel of the task's precision on this CPU.
unsafe fn winograd_products(job: &WinoTask, micro: micro::Micro, bufs: &mut WinoBuffers) {
    let WinoTask {
        prec,
        g,
        w,
        rows,
        kslots,
        image,
        img,
        tiles: (q0, q1),
        input,
    } = *job;
    let c_out = w.m;
    let kb = w.kb_len;
    let nt = q1 - q0;
    let panels = nt.div_ceil(NR);
    let ld = panels * NR;
    let (h, wd) = (g.h, g.w);
    let tw = wd.div_ceil(2);
    let plane = h * wd;
    let vps = values_per_slot(prec);
    // The input rows the tiles read, 2 ty0 - 1 ..= 2 ty1 + 2, each padded: columns -1 ..= 2 tw.
    let (ty0, ty1) = (q0 / tw, (q1 - 1) / tw);
    let prow = 2 * (ty1 - ty0) + 4;
    let pw = 2 * tw + 2;
    grow(&mut bufs.v, 16 * panels * kb * NR);
    bufs.m.clear();
    bufs.m.reserve(16 * c_out * ld);
    let mp = bufs.m.as_mut_ptr();
    for k0 in (0..kslots).step_by(kb) {
        let kc = kb.min(kslots - k0);
        for sl in 0..kc {
            let ch = (k0 + sl) * vps;
            for e in 0..vps {
                let c = ch + e;
                let pl = &mut bufs.plane[e];
                pl.clear();
                pl.resize(prow * pw, 0.0);
                if c >= g.c_in {
                    continue;
                }
                let src = &image[c * plane..][..plane];
                for r in 0..prow {
                    let iy = (2 * ty0 + r) as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let line = &src[iy as usize * wd..][..wd];
                    let d = &mut pl[r * pw + 1..][..wd];
                    match input {
                        Some(f) => {
                            let [mean, a, b] = f.of(img * g.c_in + c);
                            elementwise::map_values(line, mean, a, b, f.silu, d)
                        }
                        None => d.copy_from_slice(line),
                    }
                }
            }
            let mut q = q0;
            while q < q1 {
                let (ty, tx0) = (q / tw, q % tw);
                let n = (tw - tx0).min(q1 - q);
                let r0 = 2 * (ty - ty0);
                for e in 0..vps {
                    let pl = &bufs.plane[e];
                    let at = |r: usize| &pl[(r0 + r) * pw + 2 * tx0..][..2 * n + 2];
                    let vt = &mut bufs.vt[e];
                    vt.resize(16 * n, 0.0);
                    elementwise::winograd_input(at(0), at(1), at(2), at(3), n, vt);
                }
                // Into V's panels: tile q + j is column q + j - q0.
                for t in 0..16 {
                    let mut j = 0;
                    while j < n {
                        let col = q + j - q0;
                        let (p, jj) = (col / NR, col % NR);
                        let len = (NR - jj).min(n - j);
                        let dst = &mut bufs.v[((t * panels + p) * kc + sl) * NR + jj..][..len];
                        to_slots(prec, &bufs.vt, t * n + j, dst);
                        j += len;
                    }
                }
                q += n;
            }
        }
        for tt in 0..16 {
            for i0 in (0..c_out).step_by(MC) {
                let ilen = MC.min(c_out - i0);
                let (ap, astride) = w.block(tt * rows + i0, ilen, k0, kc, &mut Vec::new());
                for pb in 0..panels {
                    let cols = NR.min(nt - pb * NR);
                    // SAFETY: panel pb of V_tt holds kc slots x NR.
                    let bp = unsafe { bufs.v.as_ptr().add((tt * panels + pb) * kc * NR) };
                    for rb in 0..ilen.div_ceil(MR) {
                        let nrows = MR.min(ilen - rb * MR);
                        let row = i0 + rb * MR;
                        let init = if k0 == 0 {
                            TileInit::Zero
                        } else {
                            TileInit::Accumulate
                        };
                        // SAFETY: A's block for rows row.. of U_tt, K block k0; C's tile
                        // inside M_tt (c_out x ld, reserved above), stored from zero at the
                        // first K block before any read.
                        unsafe {
                            micro(
                                kc,
                                ap.add(rb * astride),
                                bp,
                                mp.add((tt * c_out + row) * ld + pb * NR),
                                ld,
                                nrows,
                                cols,
                                init,
                            )
                        };
                    }
                }
            }
        }
    }
    // SAFETY: rows < c_out, columns < nt of every M_t were stored. The last panel's columns
    // nt..ld were not (uninitialised f32s, never read: the output transform reads tiles < nt).
    unsafe { bufs.m.set_len(16 * c_out * ld) };
}

/// One slot row of a direct convolution's B operand: the padded flat plane of channel `ch`
/// (and `ch + 1` in bf16, as pairs; 0 past the last channel) from position `q0` on, with
/// zeros in the padding. With `map = (m, first)`, channel c's values are mapped by plane
/// `first + c` of `m` (the padding stays zero: it pads the mapped input).
fn pack_shifted(
    prec: Precision,
    image: &[f32],
    g: &ConvGeometry,
    ch: usize,
    q0: usize,
    map: Option<(&PlaneAffine, usize)>,
    dst: &mut [u32],
) {
    let (pad, wp) = (g.pad, g.w + 2 * g.pad);
    let plane = g.h * g.w;
    let channel = |c: usize| (c < g.c_in).then(|| &image[c * plane..][..plane]);
    let (lo, hi) = (
        channel(ch),
        if prec == Precision::Bf16 {
            channel(ch + 1)
        } else {
            None
        },
    );
    let mut f = 0;
    while f < dst.len() {
        let p = q0 + f;
        let (py, px0) = (p / wp, p % wp);
        let n = (wp - px0).min(dst.len() - f);
        let seg = &mut dst[f..f + n];
        f += n;
        let Some(lo) = lo else {
            seg.fill(0);
            continue;
        };
        if py < pad || py >= pad + g.h {
            seg.fill(0);
            continue;
        }
        let iy = py - pad;
        // Positions px0..px0 + n of the padded row; the image's columns are pad..pad + w.
        let start = pad.saturating_sub(px0).min(n);
        let stop = (pad + g.w).saturating_sub(px0).min(n).max(start);
        seg[..start].fill(0);
        seg[stop..].fill(0);
        let ix0 = px0 + start - pad;
        let len = stop - start;
        let a = &lo[iy * g.w + ix0..][..len];
        let d = &mut seg[start..stop];
        if let Some((m, first)) = map {
            match prec {
                Precision::F32 => elementwise::f32_bits_mapped(a, m.of(first + ch), m.silu, d),
                Precision::Bf16 => {
                    let h = hi.map(|hi| &hi[iy * g.w + ix0..][..len]);
                    let mh = if h.is_some() {
                        m.of(first + ch + 1)
                    } else {
                        [0.0; 3]
                    };
                    elementwise::bf16_pairs_mapped(a, h, m.of(first + ch), mh, m.silu, d)
                }
            }
            continue;
        }
        match prec {
            Precision::F32 => {
                for (d, &v) in d.iter_mut().zip(a) {
                    *d = v.to_bits();
                }
            }
            Precision::Bf16 => match hi {
                Some(hi) => elementwise::bf16_pairs(a, &hi[iy * g.w + ix0..][..len], d),
                None => {
                    for (d, &v) in d.iter_mut().zip(a) {
                        *d = bf16_pair(v, 0.0);
                    }
                }
            },
        }
    }
}

/// A B source whose columns start at `by`.
struct Shifted<'a> {
    inner: &'a dyn Source,
    by: usize,
}

impl Source for Shifted<'_> {
    fn block(
        &self,
        i0: usize,
        len: usize,
        k0: usize,
        kc: usize,
        buf: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        self.inner.block(self.by + i0, len, k0, kc, buf)
    }
}

/// Batched `out[i] = a[i] (m x k) @ b[i] (k x n)`, all row-major and contiguous, both operands
/// packed on the fly in `prec`.
pub fn matmul(
    prec: Precision,
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(a.len(), batch * m * k, "matmul: a is not {batch}x{m}x{k}");
    assert_eq!(b.len(), batch * k * n, "matmul: b is not {batch}x{k}x{n}");
    assert_eq!(
        out.len(),
        batch * m * n,
        "matmul: out is not {batch}x{m}x{n}"
    );
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let t = threads();
    let m_parts = split(m, (t * 2).div_ceil(batch), MR);
    let tasks: Vec<_> = (0..batch)
        .flat_map(|i| m_parts.iter().map(move |&r| (i, r)))
        .collect();
    let c = Out(out.as_mut_ptr());
    let kslots = prec.slots(k);
    tasks.par_iter().for_each(|&(i, mr)| {
        let c = c;
        let a = RowsOnTheFly {
            prec,
            src: &a[i * m * k..][..m * k],
            ld: k,
            k,
        };
        let b = ColsOnTheFly {
            prec,
            src: &b[i * k * n..][..k * n],
            ld: n,
            k,
            n,
        };
        // SAFETY: each task writes rows mr of its batch item.
        unsafe {
            run_task(
                prec,
                kslots,
                &a,
                &b,
                mr,
                (0, n),
                c.0.add(i * m * n),
                n,
                Bias::None,
                None,
            )
        }
    });
}

/// Sizes of a multi-head attention over row-major (batch, seq, heads * dim) tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    /// Query and key/value sequence lengths.
    pub lq: usize,
    pub lk: usize,
    /// Query/key and value dimensions per head.
    pub d: usize,
    pub dv: usize,
}

thread_local! {
    /// An attention task's scores, its packed softmax numerators and their rows' 1 / sum.
    static SCORES: RefCell<(Vec<f32>, Vec<u32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `out = softmax(q k^T * scale) v` per (batch, head), with q (batch, lq, heads*d), k
/// (batch, lk, heads*d), v (batch, lk, heads*dv) and out (batch, lq, heads*dv), all row-major:
/// no head split/merge copies, scores for a block of query rows at a time.
pub fn attention(
    prec: Precision,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    out: &mut [f32],
) {
    attention_impl(prec, q, k, v, shape, 1, scale, None, out)
}

/// [`attention`] where each key/value batch element serves `kv_repeat` consecutive query
/// batch elements (torch's `repeat_interleave(kv_repeat, dim=0)` of k and v, without the
/// copies): k is (batch / kv_repeat, lk, heads*d), v likewise. The UNet's cross-attention:
/// the frames of a sample attend to the same text.
#[allow(clippy::too_many_arguments)]
pub fn attention_shared_kv(
    prec: Precision,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    kv_repeat: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(
        kv_repeat > 0 && shape.batch % kv_repeat == 0,
        "attention: {} query batch elements do not share keys in groups of {kv_repeat}",
        shape.batch
    );
    attention_impl(prec, q, k, v, shape, kv_repeat, scale, None, out)
}

/// A replacement for the scores on key 0: for query row j of item i (= batch * heads + head)
/// the unscaled score is `q_j . key0[i] * weight[j]` instead of `q_j . k_0` (FlipSketch's
/// temporal composition: the reference's frame-0 key, weighted by frame).
#[derive(Clone, Copy, Debug)]
pub struct FirstKey<'a> {
    /// items x d
    pub key0: &'a [f32],
    /// lq
    pub weight: &'a [f32],
}

/// [`attention`] with the scores on key 0 replaced as [`FirstKey`] says.
#[allow(clippy::too_many_arguments)]
pub fn attention_first_key(
    prec: Precision,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
    first: FirstKey,
    out: &mut [f32],
) {
    let items = shape.batch * shape.heads;
    assert_eq!(
        first.key0.len(),
        items * shape.d,
        "attention: key0 is not {items}x{}",
        shape.d
    );
    assert_eq!(
        first.weight.len(),
        shape.lq,
        "attention: {} frame weights",
        shape.lq
    );
    attention_impl(prec, q, k, v, shape, 1, scale, Some(first), out)
}

#[allow(clippy::too_many_arguments)]
fn attention_impl(
    prec: Precision,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    kv_repeat: usize,
    scale: f32,
    first: Option<FirstKey>,
    out: &mut [f32],
) {
    let AttentionShape {
        batch,
        heads,
        lq,
        lk,
        d,
        dv,
    } = shape;
    assert_eq!(q.len(), batch * lq * heads * d, "attention: q size");
    let kv_batch = batch / kv_repeat;
    assert_eq!(k.len(), kv_batch * lk * heads * d, "attention: k size");
    assert_eq!(v.len(), kv_batch * lk * heads * dv, "attention: v size");
    assert_eq!(out.len(), batch * lq * heads * dv, "attention: out size");
    if out.is_empty() {
        return;
    }
    if lk == 0 {
        // No keys: softmax over nothing is 0/0, as in torch.
        out.fill(f32::NAN);
        return;
    }
    let items = batch * heads;
    let flops = 2 * (items * lq * lk * (d + dv)) as u64;
    let _t = stats::Timer::start(stats::Kernel::Attention, [items, lq, lk, d], flops);
    let c = Out(out.as_mut_ptr());
    let (qld, vld) = (heads * d, heads * dv);
    if lq <= SMALL_SEQ && lk <= SMALL_SEQ && d <= SMALL_D {
        // Short sequences (the temporal attention over frames): direct f32 per item.
        let per_task = (4096 / (lq * lk).max(1)).max(1);
        let tasks: Vec<usize> = (0..items).step_by(per_task).collect();
        tasks.par_iter().for_each(|&i0| {
            let c = c;
            for item in i0..(i0 + per_task).min(items) {
                let (b, h) = (item / heads, item % heads);
                let q = &q[(b * lq) * qld + h * d..];
                let kb = b / kv_repeat;
                let k = &k[(kb * lk) * qld + h * d..];
                let v = &v[(kb * lk) * vld + h * dv..];
                // SAFETY: this item's head h of rows b*lq.. of `out`, which no other task writes.
                let dst = Out(unsafe { c.0.add(b * lq * vld + h * dv) });
                let first = first.map(|f| (&f.key0[item * d..][..d], f.weight));
                small_attention(q, k, v, shape, scale, first, dst);
            }
        });
        return;
    }
    // Query rows per pass: their scores (ROWS x lk f32) and probabilities stay in L2 with the
    // item's packed keys and values (240 rows of 1024 keys, 983 KB, did not).
    const ROWS: usize = ATTENTION_ROWS;
    // One task per item (head of a batch element): K and V are packed once per item.
    let row_split = if items >= 2 * threads() { lq } else { ROWS };
    let tasks: Vec<(usize, usize)> = (0..items)
        .flat_map(|i| (0..lq).step_by(row_split).map(move |r| (i, r)))
        .collect();
    let pv_slots = prec.slots(lk);
    let pv_block = k_block(pv_slots);
    let pv_blocks = pv_slots.div_ceil(pv_block);
    // bf16 probabilities are rounded to bf16: the shorter exponential is exact enough.
    let coarse = prec == Precision::Bf16;
    tasks.par_iter().for_each(|&(item, r_start)| {
        let c = c;
        let (b, h) = (item / heads, item % heads);
        let kb = b / kv_repeat;
        let mut buf = Vec::new();
        let keys = ColsOfRows {
            prec,
            src: &k[kb * lk * qld + h * d..],
            ld: qld,
            k: d,
            n: lk,
        };
        let keys = PackedCols::from_source(prec, &keys, lk, d, &mut buf);
        let values = ColsOnTheFly {
            prec,
            src: &v[kb * lk * vld + h * dv..],
            ld: vld,
            k: lk,
            n: dv,
        };
        let values = PackedCols::from_source(prec, &values, dv, lk, &mut buf);
        SCORES.with(|bufs| {
            let (scores, probs, inv) = &mut *bufs.borrow_mut();
            let r_end = (r_start + row_split).min(lq);
            for r0 in (r_start..r_end).step_by(ROWS) {
                let rows = ROWS.min(r_end - r0);
                // Every score is stored by the product before it is read: no clearing.
                grow(scores, rows * lk);
                let scores = &mut scores[..rows * lk];
                let qs = RowsOnTheFly {
                    prec,
                    src: &q[(b * lq + r0) * qld + h * d..],
                    ld: qld,
                    k: d,
                };
                // SAFETY: `scores` is rows x lk.
                unsafe {
                    run_task(
                        prec,
                        prec.slots(d),
                        &qs,
                        &keys,
                        (0, rows),
                        (0, lk),
                        scores.as_mut_ptr(),
                        lk,
                        Bias::None,
                        None,
                    )
                };
                if let Some(f) = first {
                    let key0 = &f.key0[item * d..][..d];
                    for (r, row) in scores.chunks_exact_mut(lk).enumerate() {
                        let qr = &q[(b * lq + r0 + r) * qld + h * d..][..d];
                        row[0] = dot(qr, key0) * f.weight[r0 + r];
                    }
                }
                // The softmax's numerators of each row, packed at once (while the row is in
                // L1) as the A operand of the product with the values; the product's rows are
                // divided by the sums afterwards (dv values a row instead of lk).
                let mut probs = BlockedRows::new(probs, rows, pv_slots, pv_block);
                inv.clear();
                for (r, row) in scores.chunks_exact_mut(lk).enumerate() {
                    inv.push(1.0 / elementwise::softmax_numerators(row, scale, coarse));
                    for kb in 0..pv_blocks {
                        let k0 = kb * pv_block;
                        let kc = pv_block.min(pv_slots - k0);
                        pack_row(prec, row, k0, kc, probs.row_mut(r, kb));
                    }
                }
                // SAFETY: rows r0.. of this item's head h in `out`, which tasks do not share.
                unsafe {
                    let dst = c.0.add((b * lq + r0) * vld + h * dv);
                    run_task(
                        prec,
                        pv_slots,
                        &probs,
                        &values,
                        (0, rows),
                        (0, dv),
                        dst,
                        vld,
                        Bias::None,
                        None,
                    );
                    // The softmax's normalisation, on the rows of the product.
                    for (r, &inv) in inv.iter().enumerate() {
                        let row = std::slice::from_raw_parts_mut(dst.add(r * vld), dv);
                        for x in row {
                            *x *= inv;
                        }
                    }
                };
            }
        })
    });
}

/// Query rows per pass of [`attention`]'s long-sequence path.
const ATTENTION_ROWS: usize = 96;

/// An A operand packed ahead, in the layout [`RowsOnTheFly`] makes per block: for each K
/// block, rows of [`KC`] slots (of which the block's are used), the rows padded to whole row
/// blocks.
struct BlockedRows<'a> {
    data: &'a mut [u32],
    /// Rows rounded up to a multiple of MR.
    padded: usize,
    /// Slots per K block (the product's [`k_block`]).
    kb_len: usize,
}

impl<'a> BlockedRows<'a> {
    /// Room for `rows` rows of `kslots` slots in K blocks of `kb_len`, in `buf`.
    fn new(buf: &'a mut Vec<u32>, rows: usize, kslots: usize, kb_len: usize) -> Self {
        let padded = rows.div_ceil(MR) * MR;
        let blocks = kslots.div_ceil(kb_len).max(1);
        grow(buf, blocks * padded * KC);
        Self {
            data: &mut buf[..blocks * padded * KC],
            padded,
            kb_len,
        }
    }

    /// The [`KC`] slots of row `r` in K block `kb`.
    fn row_mut(&mut self, r: usize, kb: usize) -> &mut [u32] {
        &mut self.data[(kb * self.padded + r) * KC..][..KC]
    }
}

impl Source for BlockedRows<'_> {
    fn block(
        &self,
        i0: usize,
        _: usize,
        k0: usize,
        _: usize,
        _: &mut Vec<u32>,
    ) -> (*const u32, usize) {
        let off = ((k0 / self.kb_len) * self.padded + i0) * KC;
        (self.data[off..].as_ptr(), MR * KC)
    }
}

/// Sequences up to this length, with head sizes up to [`SMALL_D`], take the direct path of
/// [`attention`].
const SMALL_SEQ: usize = 16;
const SMALL_D: usize = 128;

elementwise::multiversion! {
    /// One (batch, head) item of a short attention, in f32: `q`, `k`, `v` start at the item's
    /// first row and head; `out` likewise (row stride heads * dv). The caller guarantees that
    /// `out` is valid for this item's rows and that no other thread writes them.
    ///
    /// The keys are transposed into `SMALL_SEQ` lanes once, so that the scores of a query on
    /// all keys are one vector of multiply-adds over `d` (four queries at a time, for
    /// independent chains) instead of one horizontal dot product per (query, key).
    fn small_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttentionShape,
        scale: f32,
        first: Option<(&[f32], &[f32])>,
        out: Out,
    ) {
        let AttentionShape { heads, lq, lk, d, dv, .. } = shape;
        let (qld, vld) = (heads * d, heads * dv);
        const L: usize = SMALL_SEQ;
        const Q: usize = 4;
        const V: usize = 64;
        let mut kt = [[0f32; L]; SMALL_D];
        // Row by row of kt (sequential stores; storing along k's rows compiles to scatters).
        for (t, kt) in kt.iter_mut().enumerate().take(d) {
            for (j, x) in kt.iter_mut().enumerate().take(lk) {
                *x = k[j * qld + t];
            }
        }
        let mut acc = [0f32; V];
        for i0 in (0..lq).step_by(Q) {
            let n = Q.min(lq - i0);
            // Always Q rows (past lq the last row again, unused), so that the loops have fixed
            // trip counts and `s` lives in registers.
            let rows: [usize; Q] = std::array::from_fn(|r| (i0 + r).min(lq - 1) * qld);
            let mut s = [[0f32; L]; Q];
            for (t, kt) in kt.iter().enumerate().take(d) {
                for r in 0..Q {
                    let x = q[rows[r] + t];
                    for j in 0..L {
                        s[r][j] += x * kt[j];
                    }
                }
            }
            for (r, sr) in s.iter_mut().enumerate().take(n) {
                let i = i0 + r;
                if let Some((key0, weight)) = first {
                    sr[0] = dot(&q[i * qld..][..d], key0) * weight[i];
                }
                // softmax over the lk scores, the exponentials over all L lanes at once (the
                // short row would take softmax_row's scalar remainder path); lanes past lk
                // are masked to 0 and the sum is taken afterwards, so the exp loop has no
                // reduction and vectorises.
                let mut max = f32::NEG_INFINITY;
                for &x in &sr[..lk] {
                    max = max.max(x);
                }
                let mut e = [0f32; L];
                for j in 0..L {
                    let v = elementwise::exp((sr[j] - max) * scale);
                    e[j] = if j < lk { v } else { 0.0 };
                }
                let inv = 1.0 / e.iter().sum::<f32>();
                let sr = &mut sr[..lk];
                for (x, &v) in sr.iter_mut().zip(&e) {
                    *x = v * inv;
                }
                // SAFETY: see above; row i of the item.
                let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(i * vld), dv) };
                for c0 in (0..dv).step_by(V) {
                    let w = V.min(dv - c0);
                    if w == V {
                        // A fixed-size accumulator stays in registers across the keys.
                        let mut acc = [0f32; V];
                        for (j, &p) in sr.iter().enumerate() {
                            let vj = &v[j * vld + c0..][..V];
                            for c in 0..V {
                                acc[c] += p * vj[c];
                            }
                        }
                        o[c0..c0 + V].copy_from_slice(&acc);
                    } else {
                        let acc = &mut acc[..w];
                        acc.fill(0.0);
                        for (j, &p) in sr.iter().enumerate() {
                            for (a, &x) in acc.iter_mut().zip(&v[j * vld + c0..][..w]) {
                                *a += p * x;
                            }
                        }
                        o[c0..c0 + w].copy_from_slice(acc);
                    }
                }
            }
        }
    }
}

/// Dot product in 16 lanes (vectorisable).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    tail + lanes.iter().sum::<f32>()
}
