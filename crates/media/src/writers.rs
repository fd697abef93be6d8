//! Animation writers: binarised GIF (two colours, strokes black on white), raw GIF (256-colour
//! quantised), numbered PNG frames.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::RgbImage;

use crate::binarize::{binarize, gray, ink_alpha};
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
    /// Animated PNG, transparent paper.
    Apng,
    /// Sprite sheet PNG + JSON frame rectangles.
    Sheet,
    /// Vector frames and an animated SVG.
    Svg,
}

/// Writes variant `k` in every format into `dir` at `size` x `size`, `fps` frames a second:
/// `variant-K.gif`, `variant-K-raw.gif`, `variant-K-NNN.png`, `variant-K.png` (APNG),
/// `variant-K-sheet.{png,json}`, `variant-K.svg` + `variant-K-NNN.svg`. Existing files are an error
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
            Format::Apng => {
                let p = dir.join(format!("variant-{k}.png"));
                fresh(&p)?;
                write_apng(&p, &sized, fps)?;
                files.push(p);
            }
            Format::Sheet => {
                let (p, j) = (
                    dir.join(format!("variant-{k}-sheet.png")),
                    dir.join(format!("variant-{k}-sheet.json")),
                );
                fresh(&p)?;
                fresh(&j)?;
                write_sheet(&p, &j, &sized, fps)?;
                files.extend([p, j]);
            }
            Format::Svg => {
                let stem = format!("variant-{k}");
                fresh(&dir.join(format!("{stem}.svg")))?;
                for i in 0..sized.frames.len() {
                    fresh(&dir.join(format!("{stem}-{i:03}.svg")))?;
                }
                files.extend(write_svg(dir, &stem, &sized, fps)?);
            }
        }
    }
    Ok(files)
}

/// PNG delay fraction for `fps`.
fn apng_delay(fps: u32) -> (u16, u16) {
    (1, fps.clamp(1, 1000) as u16)
}

/// An animated PNG with transparent paper: black ink whose 8-bit alpha is its coverage
/// ([`ink_alpha`]), so strokes are opaque and their anti-aliased edges stay soft. Loops forever.
pub fn write_apng(path: &Path, frames: &Frames, fps: u32) -> Result<()> {
    let file = File::create(path).map_err(|e| out_err(path, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), frames.width, frames.height);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let n = u32::try_from(frames.frames.len()).map_err(|e| out_err(path, e))?;
    enc.set_animated(n.max(1), 0)
        .map_err(|e| out_err(path, e))?;
    let (num, den) = apng_delay(fps);
    enc.set_frame_delay(num, den)
        .map_err(|e| out_err(path, e))?;
    let mut w = enc.write_header().map_err(|e| out_err(path, e))?;
    for f in &frames.frames {
        let rgba: Vec<u8> = ink_alpha(&gray(f))
            .iter()
            .flat_map(|&a| [0, 0, 0, a])
            .collect();
        w.write_image_data(&rgba).map_err(|e| out_err(path, e))?;
    }
    w.finish().map_err(|e| out_err(path, e))
}

/// Where each frame sits in a sprite sheet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SheetFrame {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// A sprite sheet of binarised frames (rows of up to 5) and its JSON description
/// (`image`, `frame_width`, `frame_height`, `fps`, `frames: [{x, y, w, h}]`).
pub fn write_sheet(
    png_path: &Path,
    json_path: &Path,
    frames: &Frames,
    fps: u32,
) -> Result<Vec<SheetFrame>> {
    let n = frames.frames.len() as u32;
    let cols = n.clamp(1, 5);
    let rows = n.div_ceil(cols).max(1);
    let (fw, fh) = (frames.width, frames.height);
    let mut sheet = image::GrayImage::from_pixel(cols * fw, rows * fh, image::Luma([255]));
    let mut rects = Vec::with_capacity(n as usize);
    for (i, mask) in binarize_frames(frames).into_iter().enumerate() {
        let (x, y) = ((i as u32 % cols) * fw, (i as u32 / cols) * fh);
        let tile = image::GrayImage::from_raw(fw, fh, mask)
            .ok_or_else(|| MediaError::Invalid("frame buffer has the wrong size".into()))?;
        image::imageops::replace(&mut sheet, &tile, x as i64, y as i64);
        rects.push(SheetFrame { x, y, w: fw, h: fh });
    }
    sheet.save(png_path).map_err(|e| out_err(png_path, e))?;
    let desc = serde_json::json!({
        "image": png_path.file_name().and_then(|n| n.to_str()),
        "frame_width": fw,
        "frame_height": fh,
        "fps": fps,
        "frames": rects.iter().map(|r| serde_json::json!({"x": r.x, "y": r.y, "w": r.w, "h": r.h})).collect::<Vec<_>>(),
    });
    std::fs::write(
        json_path,
        serde_json::to_string_pretty(&desc).map_err(|e| out_err(json_path, e))?,
    )
    .map_err(|e| out_err(json_path, e))?;
    Ok(rects)
}

/// The `<path .../>` elements of one binarised frame traced to vectors (vtracer, binary mode).
pub fn trace_frame(mask: &[u8], width: u32, height: u32) -> Result<Vec<String>> {
    let rgba: Vec<u8> = mask.iter().flat_map(|&v| [v, v, v, 255]).collect();
    let img = visioncortex::ColorImage {
        pixels: rgba,
        width: width as usize,
        height: height as usize,
    };
    let config = vtracer::Config {
        color_mode: vtracer::ColorMode::Binary,
        ..Default::default()
    };
    let svg = vtracer::convert(img, config).map_err(MediaError::Invalid)?;
    Ok(svg
        .paths
        .iter()
        .map(|p| p.to_string().trim().to_string())
        .collect())
}

/// Each binarised frame traced to vector paths: `{stem}-NNN.svg` per frame, and `{stem}.svg`
/// playing them in a loop (SMIL, discrete visibility) on white paper. Returns the paths.
pub fn write_svg(dir: &Path, stem: &str, frames: &Frames, fps: u32) -> Result<Vec<PathBuf>> {
    let (w, h) = (frames.width, frames.height);
    let header = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#
    );
    let n = frames.frames.len().max(1);
    let dur = n as f64 / fps.max(1) as f64;
    let mut written = Vec::new();
    let mut groups = String::new();
    for (i, mask) in binarize_frames(frames).iter().enumerate() {
        let paths = trace_frame(mask, w, h)?.join("\n");
        let path = dir.join(format!("{stem}-{i:03}.svg"));
        let doc = format!(
            "{header}\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{paths}\n</svg>\n"
        );
        std::fs::write(&path, doc).map_err(|e| out_err(&path, e))?;
        written.push(path);
        let values: Vec<&str> = (0..n)
            .map(|k| if k == i { "visible" } else { "hidden" })
            .collect();
        let times: Vec<String> = (0..n)
            .map(|k| format!("{:.4}", k as f64 / n as f64))
            .collect();
        groups.push_str(&format!(
            "<g visibility=\"{}\">\n<animate attributeName=\"visibility\" calcMode=\"discrete\" dur=\"{dur:.3}s\" repeatCount=\"indefinite\" values=\"{}\" keyTimes=\"{}\"/>\n{paths}\n</g>\n",
            if i == 0 { "visible" } else { "hidden" },
            values.join(";"),
            times.join(";"),
        ));
    }
    let anim = dir.join(format!("{stem}.svg"));
    let doc = format!(
        "{header}\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{groups}</svg>\n"
    );
    std::fs::write(&anim, doc).map_err(|e| out_err(&anim, e))?;
    written.insert(0, anim);
    Ok(written)
}
