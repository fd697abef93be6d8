//! CLIP image tower and preprocessing against transformers' `CLIPVisionModelWithProjection`
//! and the slow `CLIPImageProcessor` (Pillow 13) on a small random-weight model
//! (tools/reference/make_clip_fixtures.py). Tolerances: resized pixels exact, pixel_values
//! 1e-6, embeddings 1e-5 absolute (f32 vs f64 differ by 2.3e-6 in the reference).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use flipsketch_media::clip_preprocess::{pil_resize_bicubic, ClipPreprocess};
use flipsketch_media::Frames;
use flipsketch_models::clip_vision::{ClipVisionConfig, ClipVisionModelWithProjection};
use flipsketch_models::loading::{load_component, TRANSFORMERS_WEIGHTS};
use flipsketch_pipeline::ranking::{ClipRanker, Rgb};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden").join(name), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn vision_tower_matches_transformers() {
    let dir = fixtures().join("clip");
    let cfg = ClipVisionConfig::from_file(&dir.join("config.json")).unwrap();
    let (m, report) = load_component(
        "clip",
        &dir,
        &TRANSFORMERS_WEIGHTS.candidates(None),
        candle_core::DType::F32,
        &Device::Cpu,
        |vb| ClipVisionModelWithProjection::new(&cfg, vb),
    )
    .unwrap();
    assert!(
        report
            .unexpected
            .iter()
            .all(|n| n.ends_with("position_ids")),
        "{:?}",
        report.unexpected
    );
    let g = golden("clip_vision.safetensors");
    let (embeds, hidden) = m.forward(&g["pixel_values"]).unwrap();
    let (e, h) = (
        max_diff(&embeds, &g["image_embeds"]),
        max_diff(&hidden, &g["last_hidden_state"]),
    );
    eprintln!("image_embeds {e:.2e}, last_hidden_state {h:.2e}");
    assert!(
        e <= 1e-5 && h <= 1e-5,
        "image_embeds {e}, last_hidden_state {h}"
    );
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let pre_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip/preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    let pre = ClipPreprocess::from_json(&pre_json).unwrap();
    let g = golden("clip_preprocess.safetensors");
    for k in 0..7 {
        // convert("RGB") drops alpha without compositing; so does to_rgb8
        let img = image::open(fixtures().join(format!("golden/clip_img_{k}.png")))
            .unwrap()
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let (rw, rh) = pre.resized_size(w, h);
        let want = &g[&format!("resized_{k}")];
        assert_eq!(want.dims(), [rh, rw, 3], "image {k}: resized size");
        let got = pil_resize_bicubic(img.as_raw(), w, h, rw, rh);
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(off, 0, "image {k}: {off} resized values differ from Pillow");
        let px =
            Tensor::from_vec(pre.pixels(img.as_raw(), w, h), (1, 3, 32, 32), &Device::Cpu).unwrap();
        let d = max_diff(&px, &g[&format!("pixel_values_{k}")]);
        assert!(d <= 1e-6, "image {k}: pixel_values differ by {d}");
    }
}

#[test]
fn ranker_embeds_and_scores() {
    let (ranker, _) = ClipRanker::load(&fixtures().join("clip"), &Device::Cpu, None).unwrap();
    let g = golden("clip_preprocess.safetensors");
    let imgs: Vec<image::RgbImage> = (0..7)
        .map(|k| {
            image::open(fixtures().join(format!("golden/clip_img_{k}.png")))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    let rgbs: Vec<Rgb> = imgs
        .iter()
        .map(|i| Rgb {
            data: i.as_raw(),
            width: i.width() as usize,
            height: i.height() as usize,
        })
        .collect();
    let e = ranker.embed(&rgbs).unwrap();
    let d = max_diff(&e, &g["image_embeds"]);
    assert!(d <= 1e-5, "image_embeds differ by {d}");

    // a variant made of the sketch itself scores 1; a different image scores lower
    let sketch = &imgs[0];
    let as_frames = |i: &image::RgbImage, n: usize| Frames {
        width: i.width(),
        height: i.height(),
        frames: vec![i.as_raw().clone(); n],
    };
    let s = Rgb {
        data: sketch.as_raw(),
        width: sketch.width() as usize,
        height: sketch.height() as usize,
    };
    let scores = ranker
        .scores(s, &[as_frames(sketch, 3), as_frames(&imgs[3], 2)])
        .unwrap();
    assert!((scores[0] - 1.0).abs() < 1e-5, "{scores:?}");
    assert!(scores[1] < scores[0], "{scores:?}");
}

#[test]
fn full_clip_model_config_and_integer_preprocessor_sizes_are_read() {
    // openai/clip-vit-base-patch32 ships a full CLIPModel config (vision_config nested,
    // projection_dim at the top) and the older integer size/crop_size form.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        r#"{"architectures": ["CLIPModel"], "projection_dim": 512, "text_config": {"hidden_size": 512},
            "vision_config": {"hidden_size": 768, "patch_size": 32, "image_size": 224, "num_hidden_layers": 12}}"#,
    )
    .unwrap();
    let c = ClipVisionConfig::from_file(&path).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.patch_size,
            c.projection_dim,
            c.num_attention_heads
        ),
        (768, 32, 512, 12)
    );
    let pre =
        ClipPreprocess::from_json(&serde_json::json!({"size": 224, "crop_size": 224})).unwrap();
    assert_eq!((pre.shortest_edge, pre.crop), (224, (224, 224)));
    assert!(ClipPreprocess::from_json(&serde_json::json!({"image_std": [1, 0, 1]})).is_err());
    std::fs::write(
        &path,
        r#"{"vision_config": {"image_size": 100, "patch_size": 32}}"#,
    )
    .unwrap();
    assert!(ClipVisionConfig::from_file(&path)
        .unwrap_err()
        .to_string()
        .contains("patch_size"));
}
