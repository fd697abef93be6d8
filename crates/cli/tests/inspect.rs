//! `flipsketch inspect` through the real binary.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flipsketch"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn inspect_reports_every_component() {
    let dir = fixtures().join("tiny-fp16");
    let (ok, out, err) = run(&[
        "inspect",
        "--model",
        dir.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(ok, "{err}");
    for needle in [
        "[tokenizer]",
        "[scheduler]",
        "[text_encoder]",
        "[vae]",
        "[unet]",
        "on disk: f16",
        "986676",
        "peak memory",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert_eq!(out.matches("unexpected tensors: none").count(), 3, "{out}");
}

#[test]
fn inspect_bad_folders_fail_cleanly() {
    let (ok, _, err) = run(&["inspect", "--model", "/definitely/not/here"]);
    assert!(!ok);
    assert!(
        err.contains("/definitely/not/here") && !err.contains("panicked"),
        "{err}"
    );

    // a folder with a truncated unet
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny");
    for c in ["tokenizer", "scheduler", "text_encoder", "vae", "unet"] {
        std::fs::create_dir_all(tmp.path().join(c)).unwrap();
        for e in std::fs::read_dir(src.join(c)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, tmp.path().join(c).join(p.file_name().unwrap())).unwrap();
        }
    }
    let w = tmp.path().join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 1000]).unwrap();
    let (ok, _, err) = run(&["inspect", "--model", tmp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && !err.contains("panicked"),
        "{err}"
    );

    // a config that does not parse
    std::fs::write(tmp.path().join("vae/config.json"), "{").unwrap();
    let (ok, _, err) = run(&["inspect", "--model", tmp.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("vae/config.json"), "{err}");
}
