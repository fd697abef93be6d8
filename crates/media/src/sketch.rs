//! Loading the user's sketch: PNG, JPEG, WebP, BMP or GIF (first frame), any size and colour
//! type. Transparent pixels are composited on white paper (the original app turns transparent
//! paper black). Decoding is bounded so that a decompression bomb is an error, not an OOM.

use std::io::Read;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits, Rgb, RgbImage};

use crate::{MediaError, Result};

/// Largest sketch file read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Largest decoded side and decoded size.
pub const MAX_SIDE: u32 = 16384;
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

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

/// Reads a sketch file (size-capped) and decodes it.
pub fn read(path: &Path) -> Result<DynamicImage> {
    let err = |msg: String| MediaError::Input {
        path: path.to_path_buf(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if meta.is_dir() {
        return Err(err("is a folder, not an image".into()));
    }
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

/// Composites any alpha on white and returns RGB.
pub fn on_white(img: &DynamicImage) -> RgbImage {
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        let blend = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        *o = Rgb([blend(p[0]), blend(p[1]), blend(p[2])]);
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
    Ok(fit_square(&on_white(&img), size, fit))
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
