//! Loading errors name the file and the tensor; extra tensors are counted, not fatal.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use flipsketch_models::loading::{load_component, LoadReport, DIFFUSERS_WEIGHTS};
use flipsketch_models::unets::unet_3d_condition::{UNet3DConditionModel, UNet3DConfig};

fn copy_unet(to: &Path) -> HashMap<String, Tensor> {
    let from = fixtures().join("tiny/unet");
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    candle_core::safetensors::load(
        from.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn save(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
}

fn try_load(dir: &Path) -> Result<LoadReport, String> {
    let cfg = UNet3DConfig::from_file(&dir.join("config.json")).map_err(|e| e.to_string())?;
    load_component(
        "unet",
        dir,
        &DIFFUSERS_WEIGHTS.candidates(None),
        DType::F32,
        &Device::Cpu,
        |vb| UNet3DConditionModel::new(&cfg, vb),
    )
    .map(|(_, r)| r)
    .map_err(|e| e.to_string())
}

#[test]
fn every_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = copy_unet(dir.path());
    let a = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let b = "up_blocks.1.temp_convs.0.conv4.3.bias";
    assert!(t.remove(a).is_some() && t.remove(b).is_some());
    save(dir.path(), &t);
    let err = try_load(dir.path()).unwrap_err();
    assert!(err.contains("2 missing tensor(s)"), "{err}");
    assert!(err.contains(a) && err.contains(b), "{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = copy_unet(dir.path());
    let name = "conv_in.weight";
    t.insert(
        name.into(),
        Tensor::zeros((16, 4, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    save(dir.path(), &t);
    let err = try_load(dir.path()).unwrap_err();
    assert!(
        err.contains(name) && err.contains("[16, 4, 3, 3]") && err.contains("[16, 4, 1, 1]"),
        "{err}"
    );
}

#[test]
fn extra_tensors_are_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = copy_unet(dir.path());
    let n = t.len();
    t.insert(
        "lora.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    save(dir.path(), &t);
    let report = try_load(dir.path()).unwrap();
    assert_eq!(report.unexpected, vec!["lora.extra.weight".to_string()]);
    let used: usize = t
        .iter()
        .filter(|(k, _)| *k != "lora.extra.weight")
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(report.parameters, used);
    assert_eq!(n + 1, t.len());
}

#[test]
fn truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_unet(dir.path());
    let src =
        std::fs::read(fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    for cut in [src.len() / 2, 5] {
        std::fs::write(&path, &src[..cut]).unwrap();
        let err = try_load(dir.path()).unwrap_err();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}

#[test]
fn truncated_pickle_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let from = fixtures().join("tiny-bin/unet");
    std::fs::copy(from.join("config.json"), dir.path().join("config.json")).unwrap();
    let src = std::fs::read(from.join("diffusion_pytorch_model.bin")).unwrap();
    let path = dir.path().join("diffusion_pytorch_model.bin");
    std::fs::write(&path, &src[..src.len() / 2]).unwrap();
    let err = try_load(dir.path()).unwrap_err();
    assert!(err.contains("diffusion_pytorch_model.bin"), "{err}");
}

#[test]
fn missing_folder_and_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = load_component(
        "unet",
        &missing,
        &DIFFUSERS_WEIGHTS.candidates(None),
        DType::F32,
        &Device::Cpu,
        |_| Ok(()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let err = load_component(
        "unet",
        dir.path(),
        &DIFFUSERS_WEIGHTS.candidates(None),
        DType::F32,
        &Device::Cpu,
        |_| Ok(()),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

#[test]
fn bad_configs_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let base = std::fs::read_to_string(fixtures().join("tiny/unet/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["norm_num_groups"] = 5.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = UNet3DConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("norm_num_groups 5"),
        "{err}"
    );
    std::fs::write(&path, "{not json").unwrap();
    assert!(UNet3DConfig::from_file(&path)
        .unwrap_err()
        .to_string()
        .contains("config.json"));
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["down_block_types"] = serde_json::json!(["CrossAttnDownBlock3D", "Mystery"]);
    std::fs::write(&path, v.to_string()).unwrap();
    assert!(UNet3DConfig::from_file(&path)
        .unwrap_err()
        .to_string()
        .contains("Mystery"));
}

#[test]
fn shard_index_pointing_to_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let from = fixtures().join("tiny-fp16/unet");
    for e in std::fs::read_dir(&from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let shard = dir
        .path()
        .join("diffusion_pytorch_model-00002-of-00004.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let err = try_load(dir.path()).unwrap_err();
    assert!(
        err.contains("00002-of-00004") && err.contains("missing"),
        "{err}"
    );
}
