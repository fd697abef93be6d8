//! The parity tests on a GPU: module and whole-pipeline references on `cuda:0` (or the
//! device `FLIPSKETCH_TEST_DEVICE` names: `cuda:N`, `metal:N`, or `cpu` to run this file's
//! code on the CPU), in f32 at the usual tolerance (1e-4 of the reference's scale) and in bf16
//! at its stated one: at most twice PyTorch's own bf16 deviation from its f32 on the same
//! input (tests/fixtures/golden/bf16_reference.json, tools/reference/make_bf16_fixtures.py;
//! e.g. UNet 1.8-2.6e-2, whole-pipeline latents 9.2e-2). A GPU runs candle's ops in the
//! requested dtype, activations included; `FLIPSKETCH_OPS=candle FLIPSKETCH_TEST_DEVICE=cpu`
//! runs the same on the CPU (measured there: UNet 2.2-3.0e-2, latents 8.1e-2). Without a GPU
//! (or in a build without `--features cuda`) every test says SKIPPED and passes.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{case, diff, fixtures, max_abs, request};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::{Pipeline, Silent};

const F32_TOL: f32 = 1e-4;
/// bf16 may deviate from the f32 reference this many times as much as PyTorch's bf16 does.
const BF16_FACTOR: f32 = 2.0;

/// The tolerance of output `key` in `dtype`.
fn tol(dtype: DType, key: &str) -> f32 {
    if dtype == DType::F32 {
        return F32_TOL;
    }
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/bf16_reference.json")).unwrap(),
    )
    .unwrap();
    let torch = doc["deviations"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("bf16_reference.json has no {key}")) as f32;
    BF16_FACTOR * torch
}

/// The device under test, or why there is none.
fn device() -> Result<Device, String> {
    let spec = std::env::var("FLIPSKETCH_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let (kind, n) = spec.split_once(':').unwrap_or((spec.as_str(), "0"));
    let n: usize = n
        .parse()
        .map_err(|_| format!("FLIPSKETCH_TEST_DEVICE={spec}: bad ordinal"))?;
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(n).map_err(|e| format!("cuda:{n}: {e}")),
        "metal" => Device::new_metal(n).map_err(|e| format!("metal:{n}: {e}")),
        other => Err(format!(
            "FLIPSKETCH_TEST_DEVICE={other}: expected cpu, cuda:N or metal:N"
        )),
    }
}

macro_rules! device_or_skip {
    () => {
        match device() {
            Ok(d) => d,
            Err(why) => {
                eprintln!("SKIPPED (no GPU to test on: {why})");
                return;
            }
        }
    };
}

fn rel(got: &Tensor, want: &Tensor) -> f32 {
    let got = got
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    diff(&got, want) / max_abs(want)
}

fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden").join(name), &Device::Cpu).unwrap()
}

fn check(dev: &Device, dtype: DType, key: &str, e: f32) {
    let tol = tol(dtype, key);
    eprintln!("{dev:?} {dtype:?} {key}: {e:.3e} (tolerance {tol:.2e})");
    assert!(e <= tol, "{dtype:?} {key}: {e:.3e} > {tol:.2e}");
}

#[test]
fn modules_match_the_references_on_the_device() {
    let dev = device_or_skip!();
    for dtype in [DType::F32, DType::BF16] {
        let c = Components::load(&fixtures().join("tiny"), dtype, &dev, None, |_| {}).unwrap();
        let act = c.plan.dtype;
        let on = |t: &Tensor| t.to_device(&dev).unwrap().to_dtype(act).unwrap();
        for k in 0..3 {
            let g = golden(&format!("unet_a_{k}.safetensors"));
            let t = g["timestep"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0] as f64;
            let out = c
                .unet
                .forward(&on(&g["sample"]), t, &on(&g["encoder_hidden_states"]), None)
                .unwrap();
            check(&dev, dtype, &format!("unet_a_{k}"), rel(&out, &g["out"]));
        }
        let g = golden("text_encoder_a.safetensors");
        let ids = g["input_ids"].to_device(&dev).unwrap();
        let h = c
            .text_encoder
            .as_ref()
            .expect("loaded")
            .forward(&ids)
            .unwrap();
        check(
            &dev,
            dtype,
            "text_encoder_a",
            rel(&h, &g["last_hidden_state"]),
        );
        let g = golden("vae_a.safetensors");
        let post = c.vae.encode(&on(&g["image"])).unwrap();
        check(&dev, dtype, "vae_a_mean", rel(&post.mean, &g["mean"]));
        let d = c.vae.decode(&on(&g["latents"])).unwrap();
        check(&dev, dtype, "vae_a_decoded", rel(&d, &g["decoded"]));
    }
}

#[test]
fn the_pipeline_matches_the_reference_on_the_device() {
    let dev = device_or_skip!();
    for dtype in [DType::F32, DType::BF16] {
        let c = Components::load(&fixtures().join("tiny"), dtype, &dev, None, |_| {}).unwrap();
        let p = Pipeline::new(c, dev.clone());
        let (case, t) = case("default");
        let out = p.run(&request(&case, &t), &mut Silent).unwrap();
        let video = out
            .video
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        check(
            &dev,
            dtype,
            "pipeline_default_inv_latents",
            rel(&out.inv_latents, &t["inv_latents"]),
        );
        check(
            &dev,
            dtype,
            "pipeline_default_latents",
            rel(&out.latents, &t["latents"]),
        );
        check(
            &dev,
            dtype,
            "pipeline_default_video",
            diff(&video, &t["video"]),
        );
    }
}
