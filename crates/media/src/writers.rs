//! Animation writers: binarised GIF (two colours, strokes black on white), raw GIF (256-colour
//! quantised), numbered PNG frames.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::RgbImage;

use crate::binarize::{binarize, gray};
use crate::{Frames, MediaError, Result};

fn out_err(path: &Path, e: impl std::fmt::Display) -> MediaError {
    MediaError::Output {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// GIF delay in hundredths of a second for `fps`.
fn delay(fps: u32) -> u16 {
    ((100.0 / fps.max(1) as f64).round() as u16).max(1)
}

/// Resizes each frame to `size` x `size` (bilinear, as OpenCV's default) when needed.
pub fn resize_frames(frames: &Frames, size: u32) -> Result<Frames> {
    if frames.width == size && frames.height == size {
        return Ok(frames.clone());
    }
    let mut out = Vec::with_capacity(frames.frames.len());
    for f in &frames.frames {
        let img = RgbImage::from_raw(frames.width, frames.height, f.clone())
            .ok_or_else(|| MediaError::Invalid("frame buffer has the wrong size".into()))?;
        out.push(image::imageops::resize(&img, size, size, FilterType::Triangle).into_raw());
    }
    Ok(Frames {
        width: size,
        height: size,
        frames: out,
    })
}

/// Each frame binarised with its own Otsu threshold: 0 = stroke, 255 = paper.
pub fn binarize_frames(frames: &Frames) -> Vec<Vec<u8>> {
    frames.frames.iter().map(|f| binarize(&gray(f)).0).collect()
}

fn gif_encoder(
    path: &Path,
    w: u32,
    h: u32,
    palette: &[u8],
) -> Result<gif::Encoder<BufWriter<File>>> {
    let (w16, h16) = (
        u16::try_from(w).map_err(|e| out_err(path, e))?,
        u16::try_from(h).map_err(|e| out_err(path, e))?,
    );
    let file = File::create(path).map_err(|e| out_err(path, e))?;
    let mut enc =
        gif::Encoder::new(BufWriter::new(file), w16, h16, palette).map_err(|e| out_err(path, e))?;
    enc.set_repeat(gif::Repeat::Infinite)
        .map_err(|e| out_err(path, e))?;
    Ok(enc)
}

/// A looping two-colour GIF of binarised frames (0 = black stroke, 255 = white paper).
pub fn write_binary_gif(
    path: &Path,
    width: u32,
    height: u32,
    masks: &[Vec<u8>],
    fps: u32,
) -> Result<()> {
    let mut enc = gif_encoder(path, width, height, &[0, 0, 0, 255, 255, 255])?;
    for m in masks {
        let idx: Vec<u8> = m.iter().map(|&v| (v > 127) as u8).collect();
        let mut frame = gif::Frame::from_indexed_pixels(width as u16, height as u16, idx, None);
        frame.delay = delay(fps);
        enc.write_frame(&frame).map_err(|e| out_err(path, e))?;
    }
    Ok(())
}

/// A looping colour GIF (each frame quantised to 256 colours).
pub fn write_rgb_gif(path: &Path, frames: &Frames, fps: u32) -> Result<()> {
    let mut enc = gif_encoder(path, frames.width, frames.height, &[])?;
    for f in &frames.frames {
        let mut frame =
            gif::Frame::from_rgb_speed(frames.width as u16, frames.height as u16, f, 10);
        frame.delay = delay(fps);
        enc.write_frame(&frame).map_err(|e| out_err(path, e))?;
    }
    Ok(())
}

/// Numbered PNG frames `{stem}-000.png`, ... in `dir`; returns the paths.
pub fn write_png_frames(dir: &Path, stem: &str, frames: &Frames) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::with_capacity(frames.frames.len());
    for (i, f) in frames.frames.iter().enumerate() {
        let path = dir.join(format!("{stem}-{i:03}.png"));
        image::save_buffer(
            &path,
            f,
            frames.width,
            frames.height,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| out_err(&path, e))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Output formats of one animation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// Binarised GIF: black strokes on white, Otsu threshold per frame.
    Gif,
    /// The decoded colours, not binarised.
    GifRaw,
    /// Numbered PNG frames.
    Png,
}

/// Writes variant `k` in every format into `dir` at `size` x `size`, `fps` frames a second:
/// `variant-K.gif`, `variant-K-raw.gif`, `variant-K-NNN.png`. Existing files are an error
/// unless `overwrite`. Returns the paths written.
pub fn write_variant(
    dir: &Path,
    k: usize,
    frames: &Frames,
    formats: &[Format],
    size: u32,
    fps: u32,
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    let sized = resize_frames(frames, size)?;
    let fresh = |p: &Path| {
        if p.exists() && !overwrite {
            Err(MediaError::Output {
                path: p.to_path_buf(),
                msg: "already exists (use --overwrite to replace it)".into(),
            })
        } else {
            Ok(())
        }
    };
    let mut files = Vec::new();
    for fmt in formats {
        match fmt {
            Format::Gif => {
                let p = dir.join(format!("variant-{k}.gif"));
                fresh(&p)?;
                write_binary_gif(&p, sized.width, sized.height, &binarize_frames(&sized), fps)?;
                files.push(p);
            }
            Format::GifRaw => {
                let p = dir.join(format!("variant-{k}-raw.gif"));
                fresh(&p)?;
                write_rgb_gif(&p, &sized, fps)?;
                files.push(p);
            }
            Format::Png => {
                let stem = format!("variant-{k}");
                for i in 0..sized.frames.len() {
                    fresh(&dir.join(format!("{stem}-{i:03}.png")))?;
                }
                files.extend(write_png_frames(dir, &stem, &sized)?);
            }
        }
    }
    Ok(files)
}
