//! Loading the user's sketch: PNG, JPEG, WebP, BMP or GIF (first frame), any size and colour
//! type. Transparent pixels are composited on white paper (the original app turns transparent
//! paper black). Decoding is bounded so that a decompression bomb is an error, not an OOM: the
//! header is read first and an image of more than [`MAX_PIXELS`] is refused before any pixel
//! is decoded, and the decoded image is brought down to the size the model needs in one pass
//! ([`on_white_reduced`]), without full-size copies.

use std::io::Read;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits, Rgb, RgbImage};

use crate::{MediaError, Result};

/// Largest sketch file read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Largest decoded side.
pub const MAX_SIDE: u32 = 16384;
/// Largest image decoded, in pixels (an 8000 x 5000 photo): decoded it takes at most 160 MB
/// (8-bit RGBA; 320 MB for 16-bit).
pub const MAX_PIXELS: u64 = 40_000_000;
/// Largest allocation the decoder may make.
pub const MAX_DECODED_BYTES: u64 = 8 * MAX_PIXELS + (16 << 20);

/// How a non-square drawing becomes the square model input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Keep the proportions, centred on white paper.
    Pad,
    /// Stretch to the square (what the original app does).
    Stretch,
}

/// Decodes an image from bytes with the limits above; `path` only names it in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    let err = |msg: String| MediaError::Input {
        path: path.to_path_buf(),
        msg,
    };
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(err(
            "not an image (supported: PNG, JPEG, WebP, BMP, GIF)".into()
        ));
    }
    // The header alone first: a huge image is refused before anything is decoded.
    let (w, h) = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .and_then(|r| r.into_dimensions().map_err(std::io::Error::other))
        .map_err(|e| err(format!("cannot read the image header: {e}")))?;
    check_size(w, h).map_err(err)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| err(format!("cannot decode: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("the image is empty".into()));
    }
    Ok(img)
}

/// Refuses images beyond [`MAX_SIDE`] or [`MAX_PIXELS`].
fn check_size(w: u32, h: u32) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err("the image is empty".into());
    }
    if w > MAX_SIDE || h > MAX_SIDE || w as u64 * h as u64 > MAX_PIXELS {
        return Err(format!(
            "the image is {w} x {h} pixels; the limit is {} megapixels and {MAX_SIDE} pixels a side \
             (the model works at 256 x 256)",
            MAX_PIXELS / 1_000_000
        ));
    }
    Ok(())
}

/// Reads a sketch file (size-capped) and decodes it.
pub fn read(path: &Path) -> Result<DynamicImage> {
    let err = |msg: String| MediaError::Input {
        path: path.to_path_buf(),
        msg,
    };
    // Before opening: opening a FIFO without a writer would block for good.
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.is_dir() {
        return Err(err("is a folder, not an image".into()));
    }
    if !meta.is_file() {
        return Err(err(
            "is not a regular file (a pipe, socket or device); save the image to a file".into(),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(format!(
            "file is {} MB, the limit is {} MB",
            meta.len() >> 20,
            MAX_FILE_BYTES >> 20
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    decode(&bytes, path)
}

/// One RGBA pixel composited on white, each channel `(c * a + 255 * (255 - a)) / 255` rounded.
#[inline]
fn blend_on_white(p: [u8; 4]) -> [u32; 3] {
    let a = p[3] as u32;
    let blend = |c: u8| (c as u32 * a + 255 * (255 - a) + 127) / 255;
    [blend(p[0]), blend(p[1]), blend(p[2])]
}

/// Composites any alpha on white and returns RGB.
pub fn on_white(img: &DynamicImage) -> RgbImage {
    on_white_reduced(img, u32::MAX)
}

/// [`on_white`], reduced by the largest whole factor `k` that keeps the longer side at least
/// `keep` pixels (the mean of each k x k block, after compositing): one pass over the decoded
/// image, no full-size copy. With `k = 1` (an image smaller than twice `keep`) it is exactly
/// [`on_white`]. The model input is then fitted from this with Lanczos ([`fit_square`]).
pub fn on_white_reduced(img: &DynamicImage, keep: u32) -> RgbImage {
    use image::GenericImageView;
    let (w, h) = img.dimensions();
    let k = (w.max(h) / keep.max(1)).max(1);
    let (ow, oh) = (w.div_ceil(k), h.div_ceil(k));
    let mut out = RgbImage::new(ow, oh);
    let mut sums = vec![[0u32; 4]; ow as usize];
    let rgba = img.as_rgba8();
    for by in 0..oh {
        sums.iter_mut().for_each(|s| *s = [0; 4]);
        for y in by * k..((by + 1) * k).min(h) {
            for x in 0..w {
                let p = match rgba {
                    Some(buf) => buf.get_pixel(x, y).0,
                    None => img.get_pixel(x, y).0,
                };
                let c = blend_on_white(p);
                let s = &mut sums[(x / k) as usize];
                s[0] += c[0];
                s[1] += c[1];
                s[2] += c[2];
                s[3] += 1;
            }
        }
        for (bx, s) in sums.iter().enumerate() {
            let n = s[3].max(1);
            let mean = |v: u32| ((v + n / 2) / n) as u8;
            out.put_pixel(bx as u32, by, Rgb([mean(s[0]), mean(s[1]), mean(s[2])]));
        }
    }
    out
}

/// Brings an RGB drawing to `size` x `size` (Lanczos), padding with white or stretching.
pub fn fit_square(img: &RgbImage, size: u32, fit: Fit) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == size && h == size {
        return img.clone();
    }
    match fit {
        Fit::Stretch => image::imageops::resize(img, size, size, FilterType::Lanczos3),
        Fit::Pad => {
            let scale = size as f64 / w.max(h) as f64;
            let nw = ((w as f64 * scale).round() as u32).clamp(1, size);
            let nh = ((h as f64 * scale).round() as u32).clamp(1, size);
            let inner = image::imageops::resize(img, nw, nh, FilterType::Lanczos3);
            let mut canvas = RgbImage::from_pixel(size, size, Rgb([255, 255, 255]));
            image::imageops::overlay(
                &mut canvas,
                &inner,
                ((size - nw) / 2) as i64,
                ((size - nh) / 2) as i64,
            );
            canvas
        }
    }
}

/// Loads a sketch file as the square RGB model input.
pub fn load_sketch(path: &Path, size: u32, fit: Fit) -> Result<RgbImage> {
    let img = read(path)?;
    Ok(fit_square(&on_white_reduced(&img, 2 * size), size, fit))
}

/// Decodes uploaded bytes straight to the square RGB model input, the decoded image dropped as
/// soon as it is reduced.
pub fn sketch_input(bytes: &[u8], name: &Path, size: u32, fit: Fit) -> Result<RgbImage> {
    let reduced = on_white_reduced(&decode(bytes, name)?, 2 * size);
    Ok(fit_square(&reduced, size, fit))
}

/// RGB bytes to planar floats in [0, 1]: (3, h, w) row-major, as the pipeline takes them.
pub fn to_chw_f32(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = p[c] as f32 / 255.0;
        }
    }
    out
}
