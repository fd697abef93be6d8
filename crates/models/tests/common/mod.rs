#![allow(dead_code)]
//! Shared helpers of the model parity tests: fixture paths, golden loading, error metric.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

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
