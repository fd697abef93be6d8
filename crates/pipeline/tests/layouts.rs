//! Model folders in the layouts today's libraries write (tests/fixtures/layouts, written by
//! tools/reference/make_layout_fixtures.py with transformers 5.24 / diffusers 0.42.1 from the
//! same weights as tests/fixtures/tiny), loaded as users load them (`Components::load`, with
//! and without `--variant`), and checked against the references:
//! - `current/`: transformers 5's unprefixed CLIPTextModel keys and tokenizer.json-only
//!   tokenizer, plain f32 files beside fp16 variant files (the UNet's sharded);
//! - `mixed/`: bf16 on disk, a `.bf16.bin` pickle variant, sharded safetensors with and without
//!   a variant;
//! - `clip-current/`: a CLIPModel saved by transformers 5, for ranking.
//!
//! Tolerance as everywhere: f32 compute, max abs error <= 1e-4 of the reference's max |value|;
//! references for fp16/bf16 files were computed by the libraries in f32 from the same rounded
//! weights.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{check, diff, fixtures, max_abs};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::ranking::ClipRanker;
use flipsketch_pipeline::text::ClipTokenizer;
use flipsketch_pipeline::{Pipeline, Silent};

const TOL: f32 = 1e-4;

fn layouts() -> PathBuf {
    fixtures().join("layouts")
}

fn load(folder: &str, variant: Option<&str>) -> Components {
    Components::load(
        &layouts().join(folder),
        DType::F32,
        &Device::Cpu,
        variant,
        |_| {},
    )
    .unwrap_or_else(|e| panic!("{folder} (variant {variant:?}): {e}"))
}

fn golden(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let e = diff(got, want) / max_abs(want);
    eprintln!("{what}: max abs error / max |ref| = {e:.3e} (tolerance {TOL:.0e})");
    assert!(e <= TOL, "{what}: relative error {e:.3e}");
}

/// Files each weighted component was read from, and the dtypes on disk.
fn files_and_dtypes(c: &Components) -> Vec<(String, Vec<String>, Vec<String>)> {
    c.reports
        .iter()
        .filter_map(|r| {
            let w = r.weights.as_ref()?;
            assert!(
                w.unexpected.is_empty(),
                "{}: unexpected tensors {:?}",
                r.name,
                w.unexpected
            );
            let files = w
                .files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            Some((
                r.name.to_string(),
                files,
                w.dtypes_on_disk.keys().cloned().collect(),
            ))
        })
        .collect()
}

/// The text encoder, UNet and VAE against a layout golden (golden_fp16 / golden_bf16).
fn modules_match(c: &Components, g: &HashMap<String, Tensor>, what: &str) {
    let h = c
        .text_encoder
        .as_ref()
        .expect("loaded")
        .forward(&g["text_input_ids"])
        .unwrap();
    assert_close(
        &format!("{what} text encoder"),
        &h,
        &g["text_last_hidden_state"],
    );
    let t = g["unet_timestep"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let o = c
        .unet
        .forward(&g["unet_sample"], t, &g["unet_encoder_hidden_states"], None)
        .unwrap();
    assert_close(&format!("{what} unet"), &o, &g["unet_out"]);
    let d = c.vae.decode(&g["vae_latents"]).unwrap();
    assert_close(&format!("{what} vae decode"), &d, &g["vae_decoded"]);
}

#[test]
fn current_layout_plain_files_match_the_reference_pipeline() {
    let c = load("current", None);
    let picked = files_and_dtypes(&c);
    for (name, files, dtypes) in &picked {
        assert_eq!(
            dtypes,
            &["f32"],
            "{name}: the plain file is preferred over the fp16 variant"
        );
        assert!(
            files.len() == 1 && !files[0].contains("fp16"),
            "{name}: {files:?}"
        );
    }
    // the same weights as tests/fixtures/tiny: the end-to-end reference applies unchanged
    let pipeline = Pipeline::new(c, Device::Cpu);
    let (case, t) = common::case("default");
    let out = pipeline
        .run(&common::request(&case, &t), &mut Silent)
        .unwrap();
    check("current layout, default case", &out, &t);
}

#[test]
fn current_layout_fp16_variant() {
    let c = load("current", Some("fp16"));
    let picked = files_and_dtypes(&c);
    let get = |n: &str| picked.iter().find(|p| p.0 == n).unwrap().clone();
    assert_eq!(get("text_encoder").1, ["model.fp16.safetensors"]);
    assert_eq!(get("vae").1, ["diffusion_pytorch_model.fp16.safetensors"]);
    assert_eq!(
        get("unet").1,
        (1..=3)
            .map(|k| format!("diffusion_pytorch_model.fp16-0000{k}-of-00003.safetensors"))
            .collect::<Vec<_>>()
    );
    for (name, _, dtypes) in &picked {
        assert_eq!(dtypes, &["f16"], "{name}");
    }
    modules_match(
        &c,
        &golden(&layouts().join("golden_fp16.safetensors")),
        "fp16 variant",
    );
}

#[test]
fn mixed_layout_bf16_pickle_and_shards() {
    let g = golden(&layouts().join("golden_bf16.safetensors"));
    for variant in [Some("bf16"), None] {
        // without --variant the bf16 files are still found (no plain file for unet and
        // text_encoder); the vae has only plain, sharded files
        let c = load("mixed", variant);
        let picked = files_and_dtypes(&c);
        let get = |n: &str| picked.iter().find(|p| p.0 == n).unwrap().clone();
        assert_eq!(get("unet").1, ["diffusion_pytorch_model.bf16.bin"]);
        assert_eq!(
            get("vae").1,
            [
                "diffusion_pytorch_model-00001-of-00002.safetensors",
                "diffusion_pytorch_model-00002-of-00002.safetensors"
            ]
        );
        assert_eq!(
            get("text_encoder").1,
            [
                "model.bf16-00001-of-00002.safetensors",
                "model.bf16-00002-of-00002.safetensors"
            ]
        );
        for (name, _, dtypes) in &picked {
            assert_eq!(dtypes, &["bf16"], "{name}");
        }
        modules_match(&c, &g, &format!("mixed layout, variant {variant:?}"));
    }
}

#[test]
fn tokenizer_json_alone_gives_the_slow_tokenizer_ids() {
    let dir = layouts().join("current/tokenizer");
    assert!(!dir.join("vocab.json").exists() && dir.join("tokenizer.json").is_file());
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let prompts = g["prompts"].as_array().unwrap();
    for (p, want) in prompts.iter().zip(g["input_ids"].as_array().unwrap()) {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(p.as_str().unwrap()).unwrap(), want, "prompt {p}");
    }
}

/// Copies a component folder, with `edit` applied to the tensors of its weight file.
fn edited_copy(
    src: &Path,
    file: &str,
    edit: impl Fn(HashMap<String, Tensor>) -> HashMap<String, Tensor>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            std::fs::copy(e.path(), dir.path().join(&name)).unwrap();
        }
    }
    let tensors = edit(golden(&src.join(file)));
    candle_core::safetensors::save(&tensors, dir.path().join(file)).unwrap();
    dir
}

#[test]
fn unprefixed_text_encoder_names_exactly_the_missing_tensors() {
    use flipsketch_models::clip_text::{ClipTextConfig, ClipTextModel};
    use flipsketch_models::loading::{load_component, TRANSFORMERS_WEIGHTS};
    let src = layouts().join("current/text_encoder");
    let gone = ["encoder.layers.1.mlp.fc2.weight", "final_layer_norm.bias"];
    let dir = edited_copy(&src, "model.safetensors", |mut t| {
        for g in gone {
            assert!(t.remove(g).is_some(), "{g} is in the transformers 5 file");
        }
        t
    });
    let cfg = ClipTextConfig::from_file(&dir.path().join("config.json")).unwrap();
    let err = load_component(
        "text_encoder",
        dir.path(),
        &TRANSFORMERS_WEIGHTS.candidates(None),
        DType::F32,
        &Device::Cpu,
        |vb| ClipTextModel::new(&cfg, vb),
    )
    .err()
    .expect("two tensors are missing")
    .to_string();
    assert!(err.contains("2 missing tensor(s)"), "{err}");
    for g in gone {
        assert!(err.contains(g), "{err}");
    }
    assert!(
        !err.contains("text_model."),
        "named in the file's own layout: {err}"
    );
}

#[test]
fn clip_model_saved_by_transformers_5_ranks() {
    let dir = layouts().join("clip-current");
    let (ranker, report) = ClipRanker::load(&dir, &Device::Cpu, None).unwrap();
    // the text tower of the CLIPModel is not used for ranking
    assert!(report
        .unexpected
        .iter()
        .any(|n| n.starts_with("text_model.")));
    assert!(report
        .unexpected
        .iter()
        .all(|n| !n.starts_with("vision_model.")));
    let g = golden(&layouts().join("golden_clip_current.safetensors"));
    let e = ranker.embed_pixel_values(&g["pixel_values"]).unwrap();
    assert_close("clip-current image embeds", &e, &g["image_embeds"]);
}

#[test]
fn clip_vision_tower_without_prefix_loads() {
    // The CLIP vision tower as transformers 5 writes a CLIPVisionModel: keys without
    // `vision_model.`, the projection at the root.
    let src = fixtures().join("clip");
    let dir = edited_copy(&src, "model.safetensors", |t| {
        t.into_iter()
            .map(|(k, v)| (k.strip_prefix("vision_model.").unwrap_or(&k).to_string(), v))
            .collect()
    });
    std::fs::copy(
        src.join("preprocessor_config.json"),
        dir.path().join("preprocessor_config.json"),
    )
    .unwrap();
    let (a, _) = ClipRanker::load(&src, &Device::Cpu, None).unwrap();
    let (b, report) = ClipRanker::load(dir.path(), &Device::Cpu, None).unwrap();
    assert!(report
        .unexpected
        .iter()
        .all(|n| n.ends_with("position_ids")));
    let g = golden(&fixtures().join("golden/clip_vision.safetensors"));
    let (ea, eb) = (
        a.embed_pixel_values(&g["pixel_values"]).unwrap(),
        b.embed_pixel_values(&g["pixel_values"]).unwrap(),
    );
    assert_eq!(diff(&ea, &eb), 0.0);
    assert_close("unprefixed clip tower", &eb, &g["image_embeds"]);
}
