#![allow(dead_code)]
//! Shared helpers of the pipeline parity tests: the reference cases and their comparison.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::{Encode, Output, Pipeline, Request, Silent};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn pipeline() -> Pipeline {
    let c = Components::load(
        &fixtures().join("tiny"),
        DType::F32,
        &Device::Cpu,
        None,
        |_| {},
    )
    .unwrap();
    Pipeline::new(c, Device::Cpu)
}

pub fn case(name: &str) -> (Value, HashMap<String, Tensor>) {
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/pipeline_cases.json")).unwrap(),
    )
    .unwrap();
    let c = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone();
    let t = candle_core::safetensors::load(
        fixtures().join("golden").join(c["file"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    (c, t)
}

pub fn request(c: &Value, t: &HashMap<String, Tensor>) -> Request {
    Request {
        image: t["image"].squeeze(0).unwrap(),
        prompt: c["prompt"].as_str().unwrap().into(),
        variants: 0,
        frames: 0,
        steps: c["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: c["guidance_scale"].as_f64().unwrap(),
        lambda: c["lam"].as_f64().unwrap(),
        tau: c["tau"].as_i64().unwrap(),
        seed: 0,
        init_noise: Some(t["init_noise"].clone()),
        encode: match t.get("posterior_noise") {
            Some(n) => Encode::Sample(n.clone()),
            None => Encode::Mean,
        },
    }
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

pub fn check(name: &str, out: &Output, t: &HashMap<String, Tensor>) {
    let inv = diff(&out.inv_latents, &t["inv_latents"]) / max_abs(&t["inv_latents"]);
    let lat = diff(&out.latents, &t["latents"]) / max_abs(&t["latents"]);
    let vid = diff(&out.video, &t["video"]);
    eprintln!("{name}: inv_latents rel {inv:.2e}, latents rel {lat:.2e}, video abs {vid:.2e}");
    assert!(inv <= 1e-4, "{name}: inv_latents relative error {inv:.3e}");
    assert!(lat <= 1e-4, "{name}: latents relative error {lat:.3e}");
    assert!(vid <= 1e-4, "{name}: video error {vid:.3e}");
}

pub fn run_case(p: &Pipeline, name: &str) -> Output {
    let (c, t) = case(name);
    let out = p.run(&request(&c, &t), &mut Silent).unwrap();
    check(name, &out, &t);
    out
}
