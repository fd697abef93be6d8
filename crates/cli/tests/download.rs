//! `flipsketch download` and the hub path of `animate`/`inspect` through the real binary,
//! against the hub stand-in on loopback (`HF_ENDPOINT`), into a temporary HF cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flipsketch_testhub::{Fault, TestHub};

const REPO: &str = "Hmrishav/t2v_sketch-lora";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny_files() -> Vec<(String, Vec<u8>)> {
    let base = root().join("tests/fixtures/tiny");
    let mut out = Vec::new();
    for c in std::fs::read_dir(&base).unwrap() {
        let c = c.unwrap().path();
        if c.is_dir() {
            for f in std::fs::read_dir(&c).unwrap() {
                let f = f.unwrap().path();
                let rel = f
                    .strip_prefix(&base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((format!("checkpoint-2500/{rel}"), std::fs::read(&f).unwrap()));
            }
        } else {
            let rel = c
                .strip_prefix(&base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((format!("checkpoint-2500/{rel}"), std::fs::read(&c).unwrap()));
        }
    }
    out
}

fn flipsketch(home: &Path, endpoint: &str, offline: bool, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_flipsketch"))
        .args(args)
        .current_dir(home)
        .env("HF_HOME", home.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    out
}

#[test]
fn download_then_animate_and_inspect_offline() {
    let hub = TestHub::start();
    let commit = hub.push(REPO, &["main"], tiny_files());
    // a dropped connection on the way, resumed
    hub.fault(
        "checkpoint-2500/text_encoder/model.safetensors",
        Fault::CutAfter(1 << 20),
    );
    let home = tempfile::tempdir().unwrap();
    let out = flipsketch(home.path(), &hub.endpoint(), false, &["download"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let want = home
        .path()
        .join("hf/hub/models--Hmrishav--t2v_sketch-lora/snapshots")
        .join(&commit)
        .join("checkpoint-2500");
    assert_eq!(PathBuf::from(&printed), want);
    // off a terminal: a line with what is fetched, one with how long it took
    assert!(
        stderr.contains("downloading ") && stderr.contains("downloaded "),
        "{stderr}"
    );
    assert!(
        hub.seen()
            .iter()
            .any(|s| s.range.as_deref() == Some("bytes=1048576-")),
        "the cut file was resumed"
    );

    // the default model (the hub id) offline: inspect and a short animation
    let dead = "http://127.0.0.1:9";
    let out = flipsketch(home.path(), dead, true, &["inspect"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&want.display().to_string()), "{text}");
    let sketch = root().join("examples/cat.png");
    let out = flipsketch(
        home.path(),
        dead,
        true,
        &[
            "animate",
            "--sketch",
            sketch.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--frames",
            "2",
            "--variants",
            "1",
            "--size",
            "32",
            "--out",
            "o",
            "--quiet",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(home.path().join("o/variant-0.gif").is_file());

    // download again: nothing to fetch, the same folder
    let before = hub.seen().len();
    let out = flipsketch(
        home.path(),
        &hub.endpoint(),
        false,
        &["download", "--quiet"],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), printed);
    let content = hub.seen()[before..]
        .iter()
        .filter(|s| s.method == "GET" && (s.cdn || s.target.contains("/resolve/")))
        .count();
    assert_eq!(content, 0, "no file is fetched twice");
}

#[test]
fn download_errors_name_what_is_missing() {
    let hub = TestHub::start();
    let home = tempfile::tempdir().unwrap();
    let out = flipsketch(
        home.path(),
        &hub.endpoint(),
        false,
        &["download", "--model", "someone/nothing"],
    );
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("someone/nothing") && e.contains("repository not found"),
        "{e}"
    );

    hub.push(REPO, &["main"], tiny_files());
    let out = flipsketch(
        home.path(),
        &hub.endpoint(),
        false,
        &["download", "--subfolder", "checkpoint-9"],
    );
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("no folder checkpoint-9/") && e.contains("checkpoint-2500/"),
        "{e}"
    );

    let out = flipsketch(
        home.path(),
        &hub.endpoint(),
        false,
        &["download", "--revision", "v7"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such revision"));

    // offline with nothing cached: says so, names the cache
    let out = flipsketch(home.path(), "http://127.0.0.1:9", true, &["inspect"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains("hf/hub"), "{e}");
}
