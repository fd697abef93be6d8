//! Layout changes between the UNet's image form (frames, channels, pixels) and its token forms.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::elementwise::multiversion;
use crate::{filled, Out};

/// Columns of the input (rows of the output) per task.
const BLOCK_COLS: usize = 64;
/// Side of the square tiles moved through registers: a tile's rows are whole cache lines.
const T: usize = 16;

multiversion! {
    /// Output rows `c0..c0 + out.len() / rows` (input columns) of one item: `src` is
    /// (rows x cols), `add` (cols x rows) the item's addend, `out` the block's output rows.
    fn transpose_block(
        src: &[f32],
        add: Option<&[f32]>,
        rows: usize,
        cols: usize,
        c0: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        let c1 = c0 + out.len() / rows;
        let mut tile = [[0f32; T]; T];
        for r0 in (0..rows).step_by(T) {
            let rn = T.min(rows - r0);
            for cs in (c0..c1).step_by(T) {
                let cn = T.min(c1 - cs);
                if rn == T && cn == T {
                    // 16 input lines in, 16 output lines out, transposed in between.
                    let mut t = [[0f32; T]; T];
                    for (i, row) in t.iter_mut().enumerate() {
                        row.copy_from_slice(&src[(r0 + i) * cols + cs..][..T]);
                    }
                    for (j, o) in tile.iter_mut().enumerate() {
                        for (i, v) in o.iter_mut().enumerate() {
                            *v = t[i][j];
                        }
                    }
                } else {
                    for (j, o) in tile.iter_mut().enumerate().take(cn) {
                        for (i, v) in o.iter_mut().enumerate().take(rn) {
                            *v = src[(r0 + i) * cols + cs + j];
                        }
                    }
                }
                for (j, t) in tile.iter_mut().enumerate().take(cn) {
                    let at = (cs + j) * rows + r0;
                    if let Some(a) = add {
                        for (v, &a) in t.iter_mut().zip(&a[at..at + rn]) {
                            *v += a;
                        }
                    }
                    let dst = &mut out[at - c0 * rows..][..rn];
                    for (d, &v) in dst.iter_mut().zip(&t[..rn]) {
                        d.write(v);
                    }
                }
            }
        }
    }
}

/// `out[b, c, r] = x[b, r, c] + add[b, c, r]` (without `add` when it is `None`): the last two
/// dimensions of a (batch, rows, cols) array swapped, into a new (batch, cols, rows) vector.
///
/// One pass over both arrays, in parallel, in 16 x 16 tiles (whole cache lines read and
/// written, even when the rows are 4 KiB apart): the spatial and temporal transformers'
/// permutations in and out of token order, with the residual added on the way out.
pub fn transpose(
    x: &[f32],
    batch: usize,
    rows: usize,
    cols: usize,
    add: Option<&[f32]>,
) -> Vec<f32> {
    let len = batch * rows * cols;
    assert_eq!(
        x.len(),
        len,
        "transpose: input is not {batch}x{rows}x{cols}"
    );
    if let Some(a) = add {
        assert_eq!(
            a.len(),
            len,
            "transpose: addend is not {batch}x{cols}x{rows}"
        );
    }
    if len == 0 {
        return Vec::new();
    }
    let col_blocks = cols.div_ceil(BLOCK_COLS);
    let write = |out: *mut f32| {
        let out = Out(out);
        (0..batch * col_blocks).into_par_iter().for_each(|task| {
            let out = out;
            let (b, cb) = (task / col_blocks, task % col_blocks);
            let item = b * rows * cols;
            let (c0, c1) = (cb * BLOCK_COLS, ((cb + 1) * BLOCK_COLS).min(cols));
            let add = add.map(|a| &a[item..][..rows * cols]);
            // SAFETY: output rows c0..c1 of item b, inside the output and written by this task
            // only; MaybeUninit needs no initialised memory.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out.0.add(item + c0 * rows).cast::<MaybeUninit<f32>>(),
                    (c1 - c0) * rows,
                )
            };
            transpose_block(&x[item..][..rows * cols], add, rows, cols, c0, dst);
        });
    };
    // SAFETY: the tasks cover every (b, c) for all rows r, each element written once.
    unsafe { filled(len, write) }
}
