#![allow(dead_code)]
//! Shared helpers of the model parity tests: fixture paths, golden loading, error metric.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flipsketch_models::unets::unet_3d_condition::UNet3DConditionModel;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("golden").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |a - b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference output's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let diff = max_abs_diff(a, b);
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12);
    assert!(diff.is_finite(), "non-finite output");
    diff / scale
}

/// Asserts the stated f32 parity tolerance.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = rel_err(got, want);
    eprintln!("{what}: max abs error / max |ref| = {e:.3e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} exceeds {tol:.0e}");
}

/// The tiny model of a parity config: "a" (2 levels, f32 on disk) or "b" (3 levels, fp16, sharded).
pub fn model_dir(config: &str) -> PathBuf {
    fixtures().join(match config {
        "a" => "tiny",
        "b" => "tiny-fp16",
        other => panic!("unknown config {other}"),
    })
}

/// The three golden UNet cases of `config`, inputs given to the model in `dtype` (the output
/// must come back in it), each within `tol` of the reference.
pub fn unet_cases(config: &str, unet: &UNet3DConditionModel, dtype: DType, tol: f32) {
    for k in 0..3 {
        let g = golden(&format!("unet_{config}_{k}.safetensors"));
        let t = g["timestep"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let input = |name: &str| g[name].to_dtype(dtype).unwrap();
        let out = unet
            .forward(&input("sample"), t, &input("encoder_hidden_states"), None)
            .unwrap();
        assert_eq!(out.dtype(), dtype, "the output keeps the compute dtype");
        let dims = g["sample"].dims().to_vec();
        assert_close(
            &format!("unet {config} {dtype:?} case {k} {dims:?} t={t}"),
            &out,
            &g["out"],
            tol,
        );
    }
}
