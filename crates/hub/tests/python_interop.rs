//! flipsketch and the Python `huggingface_hub` client share one HF cache: both download the
//! same model from the hub stand-in, into two caches, and the caches must be laid out alike
//! (refs, relative symlinks, blobs, tree listings); then each side uses the other's cache
//! offline.
//!
//! Needs a Python with `huggingface_hub` (tools/hub/requirements.txt), named by
//! `FLIPSKETCH_HF_PYTHON`; `.ci/run` creates one and sets it. Without it the test says it was
//! skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flipsketch_hub::{resolve, Fetch, HubConfig, ModelRef};
use flipsketch_pipeline::components::MODEL_FILES;
use flipsketch_testhub::TestHub;

const REPO: &str = "Hmrishav/t2v_sketch-lora";
const SUB: &str = "checkpoint-2500";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            out.insert(
                rel,
                format!("-> {}", std::fs::read_link(&p).unwrap().display()),
            );
        } else if meta.is_dir() {
            walk(&p, base, out);
        } else if rel.starts_with("trees/") {
            // the same listing, whatever the JSON indentation
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            out.insert(rel, v.to_string());
        } else {
            out.insert(rel, format!("{} bytes", meta.len()));
        }
    }
}

/// The repository folder of a cache, path -> symlink target, file size or tree listing;
/// flipsketch's own record of verified blobs left out.
fn layout(cache: &Path) -> BTreeMap<String, String> {
    let repo = cache.join("models--Hmrishav--t2v_sketch-lora");
    let mut out = BTreeMap::new();
    walk(&repo, &repo, &mut out);
    out.remove("flipsketch-verified.json");
    out
}

fn python(py: &str, hub: &TestHub, cache: &Path, offline: bool, script: &str) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env_remove("HF_TOKEN")
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_cache_is_shared_with_huggingface_hub() {
    let Ok(py) = std::env::var("FLIPSKETCH_HF_PYTHON") else {
        eprintln!(
            "SKIPPED: set FLIPSKETCH_HF_PYTHON to a python with huggingface_hub to run this test"
        );
        return;
    };
    let hub = TestHub::start();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut stack = vec![fixtures().join("tiny")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(fixtures().join("tiny")).unwrap();
                files.push((
                    format!("{SUB}/{}", rel.display()),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    files.push((format!("{SUB}/lora/2500_unet.pt"), vec![1u8; 1000]));
    files.push(("README.md".into(), b"# readme\n".to_vec()));
    let commit = hub.push(REPO, &["main"], files);

    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let cfg = HubConfig {
        endpoint: hub.endpoint(),
        cache_dir: ours.path().to_path_buf(),
        token: None,
        offline: false,
        read_timeout: Duration::from_secs(10),
        retry_wait: Duration::from_millis(10),
    };
    let model = ModelRef {
        repo: REPO.into(),
        revision: "main".into(),
        subfolder: SUB.into(),
        variant: None,
    };
    let r = resolve(&cfg, &model, &MODEL_FILES, Fetch::Refresh, &mut ()).unwrap();
    // Python fetches the same files (what flipsketch selected) into its own cache
    let patterns: Vec<String> = r.files.iter().map(|f| format!("{f:?}")).collect();
    let snapshot = python(
        &py,
        &hub,
        theirs.path(),
        false,
        &format!(
            "from huggingface_hub import snapshot_download\n\
             print(snapshot_download({REPO:?}, allow_patterns=[{}]))",
            patterns.join(", ")
        ),
    );
    assert_eq!(
        PathBuf::from(&snapshot),
        theirs
            .path()
            .join("models--Hmrishav--t2v_sketch-lora/snapshots")
            .join(&commit)
    );
    let (a, b) = (layout(ours.path()), layout(theirs.path()));
    assert!(a.keys().any(|k| k.starts_with("trees/")), "{a:#?}");
    assert_eq!(
        a, b,
        "flipsketch's cache (left) and huggingface_hub's (right) differ"
    );

    // flipsketch offline on Python's cache
    let offline = HubConfig {
        cache_dir: theirs.path().to_path_buf(),
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        ..cfg.clone()
    };
    let theirs_r = resolve(&offline, &model, &MODEL_FILES, Fetch::CacheFirst, &mut ()).unwrap();
    assert_eq!(theirs_r.files, r.files);
    assert_eq!(theirs_r.commit, commit);
    // Python offline on flipsketch's cache
    let got = python(
        &py,
        &hub,
        ours.path(),
        true,
        &format!(
            "from huggingface_hub import hf_hub_download, snapshot_download\n\
             print(hf_hub_download({REPO:?}, {:?}))\n\
             print(snapshot_download({REPO:?}, local_files_only=True, allow_patterns=[{}]))",
            format!("{SUB}/unet/diffusion_pytorch_model.safetensors"),
            patterns.join(", ")
        ),
    );
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(
        std::fs::read(lines[0]).unwrap(),
        std::fs::read(fixtures().join("tiny/unet/diffusion_pytorch_model.safetensors")).unwrap()
    );
    assert_eq!(PathBuf::from(lines[1]), r.dir.parent().unwrap());
}
