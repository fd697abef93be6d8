//! DDIM against diffusers' `DDIMScheduler` (golden values written by
//! tools/reference/make_fixtures.py): timesteps and alphas_cumprod exactly (bit for bit),
//! step and inversion outputs within 1e-6 relative to the output's scale.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use flipsketch_schedulers::{DdimConfig, DdimScheduler};
use serde_json::Value;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden")
}

fn load() -> (HashMap<String, Tensor>, Value) {
    let t = candle_core::safetensors::load(golden().join("scheduler.safetensors"), &Device::Cpu)
        .unwrap();
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(golden().join("scheduler_cases.json")).unwrap(),
    )
    .unwrap();
    (t, cases)
}

fn scheduler(case: &Value) -> DdimScheduler {
    let config: DdimConfig = serde_json::from_value(case["config"].clone()).unwrap();
    let mut s = DdimScheduler::new(config).unwrap();
    s.set_timesteps(case["num_inference_steps"].as_u64().unwrap() as usize)
        .unwrap();
    s
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12);
    diff / scale
}

#[test]
fn timesteps_and_alphas_match_diffusers() {
    let (t, cases) = load();
    let list = cases["timestep_cases"].as_array().unwrap();
    assert!(list.len() >= 7);
    for case in list {
        let k = case["k"].as_u64().unwrap();
        let name = case["name"].as_str().unwrap();
        let s = scheduler(case);
        let want: Vec<i64> = t[&format!("ts{k}_timesteps")].to_vec1().unwrap();
        assert_eq!(s.timesteps(), &want[..], "timesteps of case {name}");
        let want_ac: Vec<f32> = t[&format!("ts{k}_alphas_cumprod")].to_vec1().unwrap();
        assert_eq!(s.alphas_cumprod().len(), want_ac.len());
        for (i, (a, b)) in s.alphas_cumprod().iter().zip(&want_ac).enumerate() {
            assert_eq!(a, b, "{name}: alphas_cumprod[{i}]");
        }
        let fac: Vec<f32> = t[&format!("ts{k}_final_alpha_cumprod")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (s.final_alpha_cumprod() - fac[0]).abs() < 1e-7,
            "{name}: final_alpha_cumprod"
        );
    }
}

#[test]
fn step_matches_diffusers() {
    let (t, cases) = load();
    let list = cases["step_cases"].as_array().unwrap();
    assert!(list.len() >= 16);
    for case in list {
        let k = case["k"].as_u64().unwrap();
        let name = case["name"].as_str().unwrap();
        let s = scheduler(case);
        let g = |n: &str| t[&format!("step{k}_{n}")].clone();
        let noise = if case["has_noise"].as_bool().unwrap() {
            Some(g("noise"))
        } else {
            None
        };
        let out = s
            .step(
                &g("model_output"),
                case["timestep"].as_i64().unwrap(),
                &g("sample"),
                case["eta"].as_f64().unwrap(),
                noise.as_ref(),
            )
            .unwrap();
        let e = max_rel_err(&out.prev_sample, &g("prev"));
        assert!(e <= 1e-6, "step case {k} ({name}): prev_sample rel err {e}");
        let e = max_rel_err(&out.pred_original_sample, &g("pred_original"));
        assert!(
            e <= 1e-6,
            "step case {k} ({name}): pred_original_sample rel err {e}"
        );
    }
}

#[test]
fn inversion_step_matches_reference() {
    let (t, cases) = load();
    let list = cases["inversion_cases"].as_array().unwrap();
    assert!(list.len() >= 3);
    for case in list {
        let k = case["k"].as_u64().unwrap();
        let s = scheduler(case);
        let g = |n: &str| t[&format!("inv{k}_{n}")].clone();
        let ts = case["timestep"].as_i64().unwrap();
        let next = s
            .inversion_step(&g("model_output"), ts, &g("sample"))
            .unwrap();
        let e = max_rel_err(&next, &g("next"));
        assert!(e <= 1e-6, "inversion case {k} (t={ts}): rel err {e}");
    }
}

#[test]
fn bad_configs_are_errors() {
    let bad = |json: &str| {
        let c: DdimConfig = serde_json::from_str(json).unwrap();
        DdimScheduler::new(c).unwrap_err().to_string()
    };
    assert!(bad(r#"{"beta_schedule": "nope"}"#).contains("nope"));
    assert!(bad(r#"{"prediction_type": "x"}"#).contains("prediction_type"));
    assert!(bad(r#"{"timestep_spacing": "middle"}"#).contains("middle"));
    assert!(bad(r#"{"num_train_timesteps": 0}"#).contains("num_train_timesteps"));
    let mut s = DdimScheduler::new(DdimConfig::default()).unwrap();
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    let x = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(s
        .step(&x, 10, &x, 0.0, None)
        .unwrap_err()
        .to_string()
        .contains("set_timesteps"));
    s.set_timesteps(10).unwrap();
    assert!(s
        .step(&x, 5000, &x, 0.0, None)
        .unwrap_err()
        .to_string()
        .contains("5000"));
    assert!(s
        .step(&x, 901, &x, 0.5, None)
        .unwrap_err()
        .to_string()
        .contains("noise"));
}
