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

/// Frame rate and repetition of an animation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Playback {
    pub fps: u32,
    /// Times the animation plays; 0 = forever.
    pub loops: u32,
}

impl Playback {
    /// `fps` frames a second, looping forever.
    pub fn forever(fps: u32) -> Self {
        Self { fps, loops: 0 }
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
    loops: u32,
) -> Result<gif::Encoder<BufWriter<File>>> {
    let (w16, h16) = (
        u16::try_from(w).map_err(|e| out_err(path, e))?,
        u16::try_from(h).map_err(|e| out_err(path, e))?,
    );
    let file = File::create(path).map_err(|e| out_err(path, e))?;
    let mut enc =
        gif::Encoder::new(BufWriter::new(file), w16, h16, palette).map_err(|e| out_err(path, e))?;
    // The NETSCAPE loop count is the number of repeats after the first play (0 = forever); a
    // GIF played once has no loop extension at all.
    let repeat = match loops {
        0 => Some(gif::Repeat::Infinite),
        1 => None,
        n => Some(gif::Repeat::Finite((n - 1).min(u16::MAX as u32) as u16)),
    };
    if let Some(r) = repeat {
        enc.set_repeat(r).map_err(|e| out_err(path, e))?;
    }
    Ok(enc)
}

/// A looping two-colour GIF of binarised frames (0 = black stroke, 255 = white paper).
pub fn write_binary_gif(
    path: &Path,
    width: u32,
    height: u32,
    masks: &[Vec<u8>],
    play: Playback,
) -> Result<()> {
    let mut enc = gif_encoder(path, width, height, &[0, 0, 0, 255, 255, 255], play.loops)?;
    for m in masks {
        let idx: Vec<u8> = m.iter().map(|&v| (v > 127) as u8).collect();
        let mut frame = gif::Frame::from_indexed_pixels(width as u16, height as u16, idx, None);
        frame.delay = delay(play.fps);
        enc.write_frame(&frame).map_err(|e| out_err(path, e))?;
    }
    Ok(())
}

/// A looping colour GIF (each frame quantised to 256 colours).
pub fn write_rgb_gif(path: &Path, frames: &Frames, play: Playback) -> Result<()> {
    let mut enc = gif_encoder(path, frames.width, frames.height, &[], play.loops)?;
    for f in &frames.frames {
        let mut frame =
            gif::Frame::from_rgb_speed(frames.width as u16, frames.height as u16, f, 10);
        frame.delay = delay(play.fps);
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
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Format {
    /// Binarised GIF: black strokes on white, Otsu threshold per frame.
    Gif,
    /// The decoded colours, not binarised.
    GifRaw,
    /// Numbered PNG frames.
    Png,
    /// Animated PNG with transparent paper (strokes opaque, soft edges).
    Apng,
    /// Sprite sheet PNG plus a JSON of frame rectangles and fps.
    Sheet,
    /// Each frame traced to vector paths, plus an animated SVG.
    Svg,
    /// H.264 MP4 (even dimensions).
    Mp4,
}

/// The names of the files [`write_variant`] writes for variant `k` of `frames` frames.
pub fn variant_file_names(k: usize, frames: usize, formats: &[Format]) -> Vec<String> {
    let mut names = Vec::new();
    for fmt in formats {
        match fmt {
            Format::Gif => names.push(format!("variant-{k}.gif")),
            Format::GifRaw => names.push(format!("variant-{k}-raw.gif")),
            Format::Png => names.extend((0..frames).map(|i| format!("variant-{k}-{i:03}.png"))),
            Format::Apng => names.push(format!("variant-{k}.png")),
            Format::Sheet => names.extend([
                format!("variant-{k}-sheet.png"),
                format!("variant-{k}-sheet.json"),
            ]),
            Format::Mp4 => names.push(format!("variant-{k}.mp4")),
            Format::Svg => {
                names.push(format!("variant-{k}.svg"));
                names.extend((0..frames).map(|i| format!("variant-{k}-{i:03}.svg")));
            }
        }
    }
    names
}

/// The prefix of the folders [`write_variant`] stages its files in.
pub const STAGING_PREFIX: &str = ".flipsketch-partial-";

/// Writes variant `k` in every format into `dir` at `size` x `size`, `fps` frames a second:
/// `variant-K.gif`, `variant-K-raw.gif`, `variant-K-NNN.png`, `variant-K.png` (APNG),
/// `variant-K-sheet.{png,json}`, `variant-K.svg` + `variant-K-NNN.svg`. Existing files are an error
/// unless `overwrite`. Returns the paths written.
///
/// The files are written into a staging folder beside them (`.flipsketch-partial-K-PID`) and
/// renamed into place once all of the variant are complete, so a file under its final name is
/// always whole; the staging folder is removed on any error.
pub fn write_variant(
    dir: &Path,
    k: usize,
    frames: &Frames,
    formats: &[Format],
    size: u32,
    play: Playback,
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    for name in variant_file_names(k, frames.frames.len(), formats) {
        let p = dir.join(name);
        if p.exists() && !overwrite {
            return Err(MediaError::Output {
                path: p,
                msg: "already exists (use --overwrite to replace it)".into(),
            });
        }
    }
    let staging = dir.join(format!("{STAGING_PREFIX}{k}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| out_err(&staging, e))?;
    let written = write_variant_files(&staging, k, frames, formats, size, play);
    let moved = written.and_then(|files| {
        files
            .iter()
            .map(|f| {
                let name = f.file_name().expect("a file name");
                let to = dir.join(name);
                std::fs::rename(f, &to).map_err(|e| out_err(&to, e))?;
                Ok(to)
            })
            .collect::<Result<Vec<_>>>()
    });
    let _ = std::fs::remove_dir_all(&staging);
    moved
}

/// [`write_variant`]'s files, written straight into `dir` (a fresh staging folder).
fn write_variant_files(
    dir: &Path,
    k: usize,
    frames: &Frames,
    formats: &[Format],
    size: u32,
    play: Playback,
) -> Result<Vec<PathBuf>> {
    let fps = play.fps;
    let sized = resize_frames(frames, size)?;
    let mut files = Vec::new();
    for fmt in formats {
        match fmt {
            Format::Gif => {
                let p = dir.join(format!("variant-{k}.gif"));
                write_binary_gif(
                    &p,
                    sized.width,
                    sized.height,
                    &binarize_frames(&sized),
                    play,
                )?;
                files.push(p);
            }
            Format::GifRaw => {
                let p = dir.join(format!("variant-{k}-raw.gif"));
                write_rgb_gif(&p, &sized, play)?;
                files.push(p);
            }
            Format::Png => {
                let stem = format!("variant-{k}");
                files.extend(write_png_frames(dir, &stem, &sized)?);
            }
            Format::Apng => {
                let p = dir.join(format!("variant-{k}.png"));
                write_apng(&p, &sized, play)?;
                files.push(p);
            }
            Format::Sheet => {
                let (p, j) = (
                    dir.join(format!("variant-{k}-sheet.png")),
                    dir.join(format!("variant-{k}-sheet.json")),
                );
                write_sheet(&p, &j, &sized, fps)?;
                files.extend([p, j]);
            }
            Format::Mp4 => {
                let p = dir.join(format!("variant-{k}.mp4"));
                write_mp4(&p, &sized, fps)?;
                files.push(p);
            }
            Format::Svg => {
                let stem = format!("variant-{k}");
                files.extend(write_svg(dir, &stem, &sized, play)?);
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
pub fn write_apng(path: &Path, frames: &Frames, play: Playback) -> Result<()> {
    let file = File::create(path).map_err(|e| out_err(path, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), frames.width, frames.height);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let n = u32::try_from(frames.frames.len()).map_err(|e| out_err(path, e))?;
    enc.set_animated(n.max(1), play.loops)
        .map_err(|e| out_err(path, e))?;
    let (num, den) = apng_delay(play.fps);
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
pub fn write_svg(dir: &Path, stem: &str, frames: &Frames, play: Playback) -> Result<Vec<PathBuf>> {
    let fps = play.fps;
    let repeat = if play.loops == 0 {
        "indefinite".to_string()
    } else {
        play.loops.to_string()
    };
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
            "<g visibility=\"{}\">\n<animate attributeName=\"visibility\" calcMode=\"discrete\" dur=\"{dur:.3}s\" repeatCount=\"{repeat}\" values=\"{}\" keyTimes=\"{}\"/>\n{paths}\n</g>\n",
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

/// Splits an Annex B H.264 stream into NAL unit payloads (start codes removed).
fn annexb_nals(stream: &[u8]) -> Vec<&[u8]> {
    openh264::nal_units(stream)
        .map(|n| {
            let skip = n.iter().take_while(|&&b| b == 0).count();
            if n.get(skip) == Some(&1) {
                &n[skip + 1..]
            } else {
                n
            }
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// An H.264 MP4 that browsers play: OpenH264 (constrained baseline, built from source by the
/// `openh264` crate), muxed with the `mp4` crate; dimensions cut to even numbers; `fps`
/// frames a second.
pub fn write_mp4(path: &Path, frames: &Frames, fps: u32) -> Result<()> {
    use openh264::encoder::{Encoder, EncoderConfig, FrameRate};
    use openh264::formats::{RgbSliceU8, YUVBuffer};
    let (w, h) = (frames.width & !1, frames.height & !1);
    if w < 2 || h < 2 || frames.frames.is_empty() {
        return Err(MediaError::Invalid(
            "an MP4 needs at least one frame of 2x2 pixels".into(),
        ));
    }
    let fps = fps.clamp(1, 120);
    let config = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .skip_frames(false);
    let mut enc = Encoder::with_api_config(openh264::OpenH264API::from_source(), config)
        .map_err(|e| out_err(path, e))?;
    let (mut sps, mut pps) = (None, None);
    let mut samples = Vec::with_capacity(frames.frames.len());
    for f in &frames.frames {
        // crop to even dimensions
        let rgb: Vec<u8> = if (w, h) == (frames.width, frames.height) {
            f.clone()
        } else {
            (0..h as usize)
                .flat_map(|y| f[y * frames.width as usize * 3..][..w as usize * 3].to_vec())
                .collect()
        };
        let yuv = YUVBuffer::from_rgb8_source(RgbSliceU8::new(&rgb, (w as usize, h as usize)));
        let stream = enc.encode(&yuv).map_err(|e| out_err(path, e))?.to_vec();
        let (mut sample, mut is_sync) = (Vec::new(), false);
        for nal in annexb_nals(&stream) {
            match nal[0] & 0x1f {
                7 => sps = sps.or_else(|| Some(nal.to_vec())),
                8 => pps = pps.or_else(|| Some(nal.to_vec())),
                t => {
                    is_sync |= t == 5;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        samples.push((sample, is_sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(out_err(path, "the encoder produced no SPS/PPS"));
    };
    let timescale = 90_000u32;
    let file = File::create(path).map_err(|e| out_err(path, e))?;
    let config = mp4::Mp4Config {
        major_brand: "isom".parse().map_err(|e| out_err(path, e))?,
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .filter_map(|b| b.parse().ok())
            .collect(),
        timescale: 1000,
    };
    let mut mux =
        mp4::Mp4Writer::write_start(BufWriter::new(file), &config).map_err(|e| out_err(path, e))?;
    let avc = mp4::AvcConfig {
        width: w as u16,
        height: h as u16,
        seq_param_set: sps,
        pic_param_set: pps,
    };
    let track = mp4::TrackConfig {
        track_type: mp4::TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: mp4::MediaConfig::AvcConfig(avc),
    };
    mux.add_track(&track).map_err(|e| out_err(path, e))?;
    let duration = timescale / fps;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * duration as u64,
            duration,
            rendering_offset: 0,
            is_sync,
            bytes: bytes::Bytes::from(bytes),
        };
        mux.write_sample(1, &sample).map_err(|e| out_err(path, e))?;
    }
    mux.write_end().map_err(|e| out_err(path, e))
}
