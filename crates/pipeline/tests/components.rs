//! Key coverage: for both fixture configs every checkpoint tensor is used, none is missing,
//! and the parameter counts are those of the diffusers/transformers models.

use std::path::PathBuf;

use candle_core::{DType, Device};
use flipsketch_pipeline::components::Components;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn coverage(folder: &str, expected: &[(&str, usize)]) {
    let mut order = Vec::new();
    let c = Components::load(
        &fixtures().join(folder),
        DType::F32,
        &Device::Cpu,
        None,
        |n| order.push(n),
    )
    .unwrap();
    assert_eq!(
        order,
        ["tokenizer", "scheduler", "text_encoder", "vae", "unet"]
    );
    for (name, params) in expected {
        let r = c.reports.iter().find(|r| r.name == *name).unwrap();
        let w = r.weights.as_ref().unwrap();
        assert!(
            w.unexpected.is_empty(),
            "{folder}/{name}: unexpected {:?}",
            w.unexpected
        );
        // parameter counts printed by tools/reference/make_fixtures.py (torch numel sums)
        assert_eq!(w.parameters, *params, "{folder}/{name}");
    }
}

#[test]
fn config_a_every_tensor_used() {
    coverage(
        "tiny",
        &[
            ("unet", 402_628),
            ("text_encoder", 1_600_672),
            ("vae", 167_959),
        ],
    );
}

#[test]
fn config_b_fp16_every_tensor_used() {
    coverage(
        "tiny-fp16",
        &[
            ("unet", 986_676),
            ("text_encoder", 2_432_256),
            ("vae", 83_679),
        ],
    );
}

#[test]
fn missing_component_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Components::load(dir.path(), DType::F32, &Device::Cpu, None, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer/"), "{err}");
    let err = Components::load(
        &dir.path().join("x"),
        DType::F32,
        &Device::Cpu,
        None,
        |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("does not exist"), "{err}");
}
