//! Binarisation against OpenCV (values from tools/reference/make_media_fixtures.py), sketch
//! loading edge cases, and writer round-trips.

use std::path::PathBuf;

use flipsketch_media::binarize::{binarize, gray};
use flipsketch_media::sketch::{decode, fit_square, load_sketch, on_white, to_chw_f32, Fit};
use flipsketch_media::writers::{
    binarize_frames, resize_frames, write_binary_gif, write_png_frames, write_rgb_gif, Playback,
};
use flipsketch_media::Frames;
use image::{DynamicImage, Rgb, RgbImage, Rgba, RgbaImage};

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

#[test]
fn otsu_and_gray_match_opencv() {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("otsu.json")).unwrap())
            .unwrap();
    let cases = j["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let img = image::open(golden().join(file)).unwrap().to_rgb8();
        let g = gray(img.as_raw());
        assert_eq!(
            g.iter().map(|&v| v as u64).sum::<u64>(),
            c["gray_sum"].as_u64().unwrap(),
            "{file}: grey"
        );
        let (bin, t) = binarize(&g);
        assert_eq!(
            t as u64,
            c["threshold"].as_u64().unwrap(),
            "{file}: threshold"
        );
        assert_eq!(
            bin.iter().filter(|&&v| v == 255).count() as u64,
            c["white_pixels"].as_u64().unwrap(),
            "{file}"
        );
    }
}

#[test]
fn transparent_paper_becomes_white() {
    let mut img = RgbaImage::from_pixel(4, 2, Rgba([0, 0, 0, 0]));
    img.put_pixel(1, 1, Rgba([0, 0, 0, 255]));
    img.put_pixel(2, 1, Rgba([0, 0, 0, 128]));
    let rgb = on_white(&DynamicImage::ImageRgba8(img));
    assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 255, 255]));
    assert_eq!(rgb.get_pixel(1, 1), &Rgb([0, 0, 0]));
    assert_eq!(rgb.get_pixel(2, 1), &Rgb([127, 127, 127]));
}

#[test]
fn pad_keeps_proportions_stretch_does_not() {
    let mut img = RgbImage::from_pixel(40, 20, Rgb([0, 0, 0]));
    img.put_pixel(0, 0, Rgb([0, 0, 0]));
    let padded = fit_square(&img, 16, Fit::Pad);
    assert_eq!(padded.dimensions(), (16, 16));
    assert_eq!(
        padded.get_pixel(8, 0),
        &Rgb([255, 255, 255]),
        "white band above"
    );
    assert_eq!(padded.get_pixel(8, 8), &Rgb([0, 0, 0]));
    let stretched = fit_square(&img, 16, Fit::Stretch);
    assert_eq!(stretched.get_pixel(8, 0), &Rgb([0, 0, 0]));
    let chw = to_chw_f32(&padded);
    assert_eq!(chw.len(), 3 * 256);
    assert_eq!(chw[0], 1.0);
}

#[test]
fn bad_images_are_errors_not_panics() {
    let p = PathBuf::from("x.png");
    assert!(decode(b"", &p).unwrap_err().to_string().contains("x.png"));
    assert!(decode(b"hello, this is text", &p)
        .unwrap_err()
        .to_string()
        .contains("not an image"));
    let png = std::fs::read(golden().join("otsu_1.png")).unwrap();
    assert!(decode(&png[..png.len() / 2], &p).is_err(), "truncated");
    // a PNG header claiming 100000 x 100000 pixels: refused before allocating
    let mut header = png[..33].to_vec();
    header[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    header[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    assert!(decode(&header, &p).is_err());
    let dir = tempfile::tempdir().unwrap();
    assert!(load_sketch(dir.path(), 16, Fit::Pad)
        .unwrap_err()
        .to_string()
        .contains("folder"));
    assert!(load_sketch(&dir.path().join("missing.png"), 16, Fit::Pad).is_err());
}

#[test]
fn gif_first_frame_and_greyscale_jpeg_load() {
    let dir = tempfile::tempdir().unwrap();
    // two-frame GIF: black then white; the first frame is used
    let path = dir.path().join("a.gif");
    write_binary_gif(
        &path,
        6,
        4,
        &[vec![0; 24], vec![255; 24]],
        Playback::forever(10),
    )
    .unwrap();
    let img = load_sketch(&path, 6, Fit::Stretch).unwrap();
    assert!(
        img.pixels().all(|p| p == &Rgb([0, 0, 0])),
        "first frame is black"
    );
    let jpg = dir.path().join("g.jpg");
    image::GrayImage::from_pixel(30, 10, image::Luma([200]))
        .save(&jpg)
        .unwrap();
    let img = load_sketch(&jpg, 12, Fit::Pad).unwrap();
    assert_eq!(img.dimensions(), (12, 12));
}

fn decode_gif(path: &std::path::Path) -> (u16, u16, Vec<(u16, Vec<u8>)>, gif::Repeat) {
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut d = opts.read_info(std::fs::File::open(path).unwrap()).unwrap();
    let mut frames = Vec::new();
    while let Some(f) = d.read_next_frame().unwrap() {
        frames.push((f.delay, f.buffer.to_vec()));
    }
    (d.width(), d.height(), frames, d.repeat())
}

#[test]
fn binary_gif_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let frames = Frames {
        width: 5,
        height: 3,
        frames: (0..4)
            .map(|k| {
                (0..15)
                    .flat_map(|i| {
                        if (i + k) % 3 == 0 {
                            [10, 20, 30]
                        } else {
                            [240, 250, 245]
                        }
                    })
                    .collect()
            })
            .collect(),
    };
    let masks = binarize_frames(&frames);
    let path = dir.path().join("b.gif");
    write_binary_gif(&path, 5, 3, &masks, Playback::forever(10)).unwrap();
    let (w, h, decoded, repeat) = decode_gif(&path);
    assert_eq!((w, h, decoded.len()), (5, 3, 4));
    assert_eq!(repeat, gif::Repeat::Infinite);
    for (k, (delay, rgba)) in decoded.iter().enumerate() {
        assert_eq!(*delay, 10, "10 fps");
        let got: Vec<u8> = rgba.chunks(4).map(|p| p[0]).collect();
        assert_eq!(got, masks[k], "frame {k}");
        assert!(got.iter().all(|&v| v == 0 || v == 255));
    }
}

#[test]
fn raw_gif_and_png_frames_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let frames = Frames {
        width: 8,
        height: 8,
        frames: vec![vec![0u8; 192], vec![255u8; 192], vec![128u8; 192]],
    };
    let path = dir.path().join("raw.gif");
    write_rgb_gif(&path, &frames, Playback { fps: 10, loops: 3 }).unwrap();
    let (w, h, decoded, repeat) = decode_gif(&path);
    assert_eq!((w, h, decoded.len()), (8, 8, 3));
    assert_eq!(repeat, gif::Repeat::Finite(2), "3 plays = 2 repeats");
    assert!(decoded[1].1.chunks(4).all(|p| p[0] == 255 && p[1] == 255));
    let paths = write_png_frames(dir.path(), "v0", &frames).unwrap();
    assert_eq!(paths.len(), 3);
    for (p, f) in paths.iter().zip(&frames.frames) {
        assert_eq!(
            &image::open(p).unwrap().to_rgb8().into_raw(),
            f,
            "lossless PNG"
        );
    }
    let big = resize_frames(&frames, 32).unwrap();
    assert_eq!((big.width, big.frames[1].len()), (32, 32 * 32 * 3));
}

fn test_frames() -> Frames {
    // a dark disc moving right over light paper, 24x16, 3 frames
    let (w, h) = (24u32, 16u32);
    let frames = (0..3)
        .map(|k| {
            (0..w * h)
                .flat_map(|i| {
                    let (x, y) = ((i % w) as i32, (i / w) as i32);
                    let d = (x - 6 - 5 * k) * (x - 6 - 5 * k) + (y - 8) * (y - 8);
                    if d < 16 {
                        [20u8, 20, 20]
                    } else {
                        [235, 235, 235]
                    }
                })
                .collect()
        })
        .collect();
    Frames {
        width: w,
        height: h,
        frames,
    }
}

#[test]
fn apng_round_trips_with_alpha_and_fps() {
    let dir = tempfile::tempdir().unwrap();
    let frames = test_frames();
    let path = dir.path().join("a.png");
    flipsketch_media::writers::write_apng(&path, &frames, Playback::forever(10)).unwrap();
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut r = dec.read_info().unwrap();
    let actl = r.info().animation_control().unwrap();
    assert_eq!(
        (actl.num_frames, actl.num_plays),
        (3, 0),
        "3 frames, looping"
    );
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    for k in 0..3 {
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(
            (info.width, info.height, info.color_type),
            (24, 16, png::ColorType::Rgba)
        );
        let fc = r.info().frame_control().unwrap();
        assert_eq!((fc.delay_num, fc.delay_den), (1, 10), "10 fps");
        let want = flipsketch_media::binarize::ink_alpha(&gray(&frames.frames[k]));
        let alpha: Vec<u8> = buf.chunks(4).map(|p| p[3]).collect();
        assert_eq!(alpha, want, "frame {k} alpha");
        assert!(buf.chunks(4).all(|p| p[..3] == [0, 0, 0]), "black ink");
        let g = gray(&frames.frames[k]);
        for (a, v) in alpha.iter().zip(&g) {
            match v {
                v if *v > 200 => assert_eq!(*a, 0, "paper is transparent"),
                v if *v < 40 => assert_eq!(*a, 255, "strokes are opaque"),
                _ => {}
            }
        }
    }
}

#[test]
fn sprite_sheet_matches_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let frames = test_frames();
    let (p, j) = (dir.path().join("s.png"), dir.path().join("s.json"));
    flipsketch_media::writers::write_sheet(&p, &j, &frames, 12).unwrap();
    let sheet = image::open(&p).unwrap().to_luma8();
    let desc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    assert_eq!(desc["fps"], 12);
    assert_eq!(desc["image"], "s.png");
    let rects = desc["frames"].as_array().unwrap();
    assert_eq!(rects.len(), 3);
    let masks = binarize_frames(&frames);
    for (k, r) in rects.iter().enumerate() {
        let (x, y, w, h) = (
            r["x"].as_u64().unwrap() as u32,
            r["y"].as_u64().unwrap() as u32,
            r["w"].as_u64().unwrap() as u32,
            r["h"].as_u64().unwrap() as u32,
        );
        assert_eq!((w, h), (24, 16));
        let tile: Vec<u8> = image::imageops::crop_imm(&sheet, x, y, w, h)
            .to_image()
            .into_raw();
        assert_eq!(tile, masks[k], "frame {k}");
    }
}

#[test]
fn svg_frames_parse_and_have_paths() {
    let dir = tempfile::tempdir().unwrap();
    let frames = test_frames();
    let files =
        flipsketch_media::writers::write_svg(dir.path(), "v", &frames, Playback::forever(10))
            .unwrap();
    assert_eq!(files.len(), 4, "animated + 3 frames");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let doc =
            roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let paths = doc.descendants().filter(|n| n.has_tag_name("path")).count();
        assert!(paths >= 1, "{}: no paths", f.display());
        assert_eq!(doc.root_element().attribute("width"), Some("24"));
    }
    let anim = std::fs::read_to_string(&files[0]).unwrap();
    let doc = roxmltree::Document::parse(&anim).unwrap();
    let anims: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("animate"))
        .collect();
    assert_eq!(anims.len(), 3);
    assert_eq!(anims[0].attribute("dur"), Some("0.300s"));
    assert_eq!(anims[1].attribute("values"), Some("hidden;visible;hidden"));
}

#[test]
fn mp4_round_trips_through_a_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let mut frames = test_frames();
    // odd size: the writer must cut to even dimensions
    frames = flipsketch_media::writers::resize_frames(&frames, 33).unwrap();
    let path = dir.path().join("v.mp4");
    flipsketch_media::writers::write_mp4(&path, &frames, 10).unwrap();

    let f = std::fs::File::open(&path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut reader = mp4::Mp4Reader::read_header(std::io::BufReader::new(f), size).unwrap();
    assert_eq!(reader.tracks().len(), 1);
    let track = reader.tracks().values().next().unwrap();
    assert_eq!((track.width(), track.height()), (32, 32), "even dimensions");
    assert_eq!(track.sample_count(), 3);
    assert!(
        (track.frame_rate() - 10.0).abs() < 1e-6,
        "fps {}",
        track.frame_rate()
    );
    let sps = track.sequence_parameter_set().unwrap().to_vec();
    let pps = track.picture_parameter_set().unwrap().to_vec();
    let track_id = track.track_id();

    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let annexb = |nal: &[u8]| [&[0u8, 0, 0, 1][..], nal].concat();
    dec.decode(&annexb(&sps)).unwrap();
    dec.decode(&annexb(&pps)).unwrap();
    for k in 0..3u32 {
        let s = reader.read_sample(track_id, k + 1).unwrap().unwrap();
        let mut packet = Vec::new();
        let mut b = &s.bytes[..];
        while b.len() >= 4 {
            let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            packet.extend(annexb(&b[4..4 + n]));
            b = &b[4 + n..];
        }
        let yuv = dec.decode(&packet).unwrap().expect("a decoded frame");
        let mut rgb = vec![0u8; 32 * 32 * 3];
        yuv.write_rgb8(&mut rgb);
        // compare with the source frame cut to 32x32 (lossy: mean error only)
        let src = &frames.frames[k as usize];
        let mut err = 0f64;
        for y in 0..32 {
            for x in 0..32 * 3 {
                err += (rgb[y * 96 + x] as f64 - src[y * 33 * 3 + x] as f64).abs();
            }
        }
        let mean = err / (32.0 * 32.0 * 3.0);
        assert!(mean < 12.0, "frame {k}: mean abs error {mean}");
    }
}
