//! Layout changes between the UNet's image form (frames, channels, pixels) and its token forms.

use rayon::prelude::*;

use crate::{filled, Out};

/// Columns of the input (rows of the output) per task.
const BLOCK_COLS: usize = 64;
/// Rows of the input per tile inside a task: a tile's input rows and output rows stay in L1.
const TILE_ROWS: usize = 32;

/// `out[b, c, r] = x[b, r, c] + add[b, c, r]` (without `add` when it is `None`): the last two
/// dimensions of a (batch, rows, cols) array swapped, into a new (batch, cols, rows) vector.
///
/// One pass over both arrays, in parallel and in cache-sized tiles: the spatial and temporal
/// transformers' permutations in and out of token order, the residual added on the way out.
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
        assert_eq!(a.len(), len, "transpose: addend is not {batch}x{cols}x{rows}");
    }
    let col_blocks = cols.div_ceil(BLOCK_COLS);
    let write = |out: *mut f32| {
        let out = Out(out);
        (0..batch * col_blocks).into_par_iter().for_each(|task| {
            let out = out;
            let (b, cb) = (task / col_blocks, task % col_blocks);
            let (c0, c1) = (cb * BLOCK_COLS, ((cb + 1) * BLOCK_COLS).min(cols));
            let src = &x[b * rows * cols..][..rows * cols];
            let add = add.map(|a| &a[b * rows * cols..][..rows * cols]);
            for r0 in (0..rows).step_by(TILE_ROWS) {
                let r1 = (r0 + TILE_ROWS).min(rows);
                for c in c0..c1 {
                    let o = b * rows * cols + c * rows;
                    for r in r0..r1 {
                        let v = src[r * cols + c] + add.map_or(0.0, |a| a[c * rows + r]);
                        // SAFETY: element (c, r) of item b, inside the output; this task is
                        // the only one writing columns c0..c1 of item b.
                        unsafe { out.0.add(o + r).write(v) };
                    }
                }
            }
        });
    };
    // SAFETY: the tasks cover every (b, c) for all rows r, each element written once.
    unsafe { filled(len, write) }
}
