//! The models on candle's own tensor ops, the code GPUs run (CUDA and Metal cannot be built or
//! run on the CI machine): weights stored in f64 on the CPU are never packed for the CPU
//! kernels, so every product, convolution, attention and norm takes the device-generic path.
//! Same golden outputs and tolerance as `parity.rs` (max abs error <= 1e-4 of the reference's
//! max magnitude; the reference is f32, so f64 here only removes our own rounding).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, golden, model_dir, unet_cases};
use flipsketch_models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use flipsketch_models::clip_text::{ClipTextConfig, ClipTextModel};
use flipsketch_models::compute::{ComputePlan, Ops};
use flipsketch_models::loading::{
    WeightNames, WeightStore, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS,
};
use flipsketch_models::unets::unet_3d_condition::{UNet3DConditionModel, UNet3DConfig};

const TOL: f32 = 1e-4;

/// Builds a component with f64 weights on the CPU, checking that every weight was used.
fn build<M>(
    dir: &std::path::Path,
    names: WeightNames,
    f: impl FnOnce(flipsketch_models::compute::Vb) -> candle_core::Result<M>,
) -> M {
    let store = WeightStore::open_dir("generic", dir, &names.candidates(None)).unwrap();
    let plan = ComputePlan::new(DType::F64, &Device::Cpu, Ops::Auto);
    let m = f(store.var_builder(plan, &Device::Cpu)).unwrap();
    let report = store.finish().unwrap();
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    m
}

/// Runs `f` and checks that none of the CPU kernels ran (their counters stay at zero; the
/// tests of this file all run without kernels, so running side by side does not disturb it).
fn without_kernels(f: impl FnOnce()) {
    flipsketch_kernels::stats::enable();
    f();
    for (kernel, calls, ..) in flipsketch_kernels::stats::snapshot() {
        assert_eq!(calls, 0, "{kernel:?} ran on the device-generic path");
    }
}

fn f64(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

fn unet(config: &str) {
    let dir = model_dir(config).join("unet");
    let cfg = UNet3DConfig::from_file(&dir.join("config.json")).unwrap();
    let unet = build(&dir, DIFFUSERS_WEIGHTS, |vb| {
        UNet3DConditionModel::new(&cfg, vb)
    });
    unet_cases(config, &unet, DType::F64, TOL);
}

#[test]
fn unet_a_on_tensor_ops() {
    without_kernels(|| unet("a"));
}

#[test]
fn unet_b_on_tensor_ops() {
    without_kernels(|| unet("b"));
}

#[test]
fn vae_on_tensor_ops() {
    without_kernels(vae);
}

fn vae() {
    for config in ["a", "b"] {
        let dir = model_dir(config).join("vae");
        let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
        let m = build(&dir, DIFFUSERS_WEIGHTS, |vb| AutoencoderKL::new(&cfg, vb));
        let g = golden(&format!("vae_{config}.safetensors"));
        let post = m.encode(&f64(&g["image"])).unwrap();
        assert_close(
            &format!("generic vae {config} mean"),
            &post.mean,
            &g["mean"],
            TOL,
        );
        let sample = post.sample(&f64(&g["noise"])).unwrap();
        assert_close(
            &format!("generic vae {config} sample"),
            &sample,
            &g["sample"],
            TOL,
        );
        let decoded = m.decode(&f64(&g["latents"])).unwrap();
        assert_close(
            &format!("generic vae {config} decode"),
            &decoded,
            &g["decoded"],
            TOL,
        );
    }
}

#[test]
fn text_encoder_on_tensor_ops() {
    without_kernels(text_encoder);
}

fn text_encoder() {
    for config in ["a", "b"] {
        let dir = model_dir(config).join("text_encoder");
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
        let m = build(&dir, TRANSFORMERS_WEIGHTS, |vb| {
            ClipTextModel::new(&cfg, vb)
        });
        let g = golden(&format!("text_encoder_{config}.safetensors"));
        let out = m.forward(&g["input_ids"]).unwrap();
        assert_close(
            &format!("generic text encoder {config}"),
            &out,
            &g["last_hidden_state"],
            TOL,
        );
    }
}
