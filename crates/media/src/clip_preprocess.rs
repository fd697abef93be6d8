//! transformers' (slow, PIL-based) `CLIPImageProcessor`: RGB, resize the shortest edge with
//! PIL's bicubic filter, centre crop, rescale to [0, 1], normalise by mean and std.
//!
//! The resize reproduces Pillow's `Resample.c` for 8-bit images: Keys cubic with a = -0.5,
//! support widened by the scale when downsampling, coefficients normalised then rounded to
//! 22-bit fixed point, two passes through an 8-bit intermediate (order as Pillow 13 picks it).

/// `CLIPImageProcessor` settings (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipPreprocess {
    pub shortest_edge: usize,
    pub crop: (usize, usize),
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for ClipPreprocess {
    /// openai/clip-vit-base-patch32's settings.
    fn default() -> Self {
        Self {
            shortest_edge: 224,
            crop: (224, 224),
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first input
/// index and the fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u64 << PRECISION_BITS) as f64;
                    (if f < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn horizontal(src: &[u8], w: usize, h: usize, out_w: usize) -> Vec<u8> {
    let cx = coeffs(w, out_w);
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        for (xx, (xmin, k)) in cx.iter().enumerate() {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    ss += src[(y * w + xmin + i) * 3 + c] as i64 * kv as i64;
                }
                out[(y * out_w + xx) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}

fn vertical(src: &[u8], w: usize, h: usize, out_h: usize) -> Vec<u8> {
    let cy = coeffs(h, out_h);
    let mut out = vec![0u8; w * out_h * 3];
    for (yy, (ymin, k)) in cy.iter().enumerate() {
        for x in 0..w {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    ss += src[((ymin + i) * w + x) * 3 + c] as i64 * kv as i64;
                }
                out[(yy * w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}

/// PIL `Image.resize((out_w, out_h), Image.BICUBIC)` on an RGB image (3 bytes a pixel), as
/// Pillow 13 (the pinned reference) computes it: the vertical pass goes first when it shrinks
/// the height by more than twice what the horizontal pass shrinks the width (the order matters
/// because the intermediate is clipped to 8 bits); a pass that keeps its size is skipped.
pub fn pil_resize_bicubic(rgb: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let vertical_first = out_h < h && (h - out_h) as i64 > 2 * (w as i64 - out_w as i64);
    let (need_h, need_v) = (out_w != w, out_h != h);
    match (need_h, need_v, vertical_first) {
        (false, false, _) => rgb.to_vec(),
        (true, false, _) => horizontal(rgb, w, h, out_w),
        (false, true, _) => vertical(rgb, w, h, out_h),
        (true, true, false) => vertical(&horizontal(rgb, w, h, out_w), out_w, h, out_h),
        (true, true, true) => horizontal(&vertical(rgb, w, h, out_h), w, out_h, out_w),
    }
}

impl ClipPreprocess {
    /// transformers `get_resize_output_image_size(default_to_square=False)`: the short side
    /// becomes `shortest_edge`, the long side `int(shortest_edge * long / short)`.
    pub fn resized_size(&self, w: usize, h: usize) -> (usize, usize) {
        let s = self.shortest_edge;
        if w <= h {
            (s, (s as f64 * h as f64 / w as f64) as usize)
        } else {
            ((s as f64 * w as f64 / h as f64) as usize, s)
        }
    }

    /// RGB bytes (w x h) -> normalised planar floats (3, crop_h, crop_w).
    pub fn pixels(&self, rgb: &[u8], w: usize, h: usize) -> Vec<f32> {
        let (rw, rh) = self.resized_size(w, h);
        let resized = pil_resize_bicubic(rgb, w, h, rw, rh);
        let (ch, cw) = self.crop;
        let top = (rh as i64 - ch as i64).div_euclid(2);
        let left = (rw as i64 - cw as i64).div_euclid(2);
        let mut out = vec![0f32; 3 * ch * cw];
        for y in 0..ch {
            for x in 0..cw {
                let (sy, sx) = (y as i64 + top, x as i64 + left);
                // outside the resized image (crop larger than it): transformers pads with 0
                let inside = sy >= 0 && sx >= 0 && (sy as usize) < rh && (sx as usize) < rw;
                for c in 0..3 {
                    let v = if inside {
                        resized[((sy as usize) * rw + sx as usize) * 3 + c]
                    } else {
                        0
                    };
                    let scaled = (v as f64 * (1.0 / 255.0)) as f32;
                    out[c * ch * cw + y * cw + x] = (scaled - self.mean[c]) / self.std[c];
                }
            }
        }
        out
    }

    /// Reads `preprocessor_config.json` (CLIPImageProcessor keys); missing keys keep defaults.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let mut p = Self::default();
        if let Some(s) = v.get("size") {
            p.shortest_edge = match s {
                serde_json::Value::Number(n) => {
                    n.as_u64().ok_or("size is not a positive integer")? as usize
                }
                serde_json::Value::Object(o) => {
                    o.get("shortest_edge")
                        .and_then(|x| x.as_u64())
                        .ok_or("size has no shortest_edge")? as usize
                }
                _ => return Err("size must be a number or {\"shortest_edge\": n}".into()),
            };
        }
        if let Some(c) = v.get("crop_size") {
            p.crop = match c {
                serde_json::Value::Number(n) => {
                    let n = n.as_u64().ok_or("crop_size is not a positive integer")? as usize;
                    (n, n)
                }
                serde_json::Value::Object(o) => (
                    o.get("height")
                        .and_then(|x| x.as_u64())
                        .ok_or("crop_size has no height")? as usize,
                    o.get("width")
                        .and_then(|x| x.as_u64())
                        .ok_or("crop_size has no width")? as usize,
                ),
                _ => return Err("crop_size must be a number or {height, width}".into()),
            };
        }
        let triple = |key: &str, dst: &mut [f32; 3]| -> Result<(), String> {
            if let Some(a) = v.get(key) {
                let vals: Vec<f32> = a
                    .as_array()
                    .ok_or(format!("{key} is not a list"))?
                    .iter()
                    .map(|x| {
                        x.as_f64()
                            .map(|f| f as f32)
                            .ok_or(format!("{key} holds a non-number"))
                    })
                    .collect::<Result<_, _>>()?;
                *dst = vals
                    .try_into()
                    .map_err(|_| format!("{key} must have 3 values"))?;
            }
            Ok(())
        };
        triple("image_mean", &mut p.mean)?;
        triple("image_std", &mut p.std)?;
        if p.shortest_edge == 0 || p.crop.0 == 0 || p.crop.1 == 0 || p.std.contains(&0.0) {
            return Err("sizes and std must be positive".into());
        }
        Ok(p)
    }
}
