//! `flipsketch animate` through the real binary: parity with the reference pipeline via
//! --init-noise/--dump, the outputs, the hub cache, and every kind of bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sketch() -> String {
    fixtures()
        .join("golden/pipeline_sketch.png")
        .to_string_lossy()
        .into_owned()
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flipsketch"));
    cmd.current_dir(dir).arg("animate").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let r = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    };
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    r
}

fn tiny() -> String {
    fixtures().join("tiny").to_string_lossy().into_owned()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn dump_matches_reference_pipeline() {
    let (sk, tiny) = (sketch(), tiny());
    let dir = tempfile::tempdir().unwrap();
    let golden = candle_core::safetensors::load(
        fixtures().join("golden/pipeline_mean.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let noise: HashMap<String, Tensor> =
        [("latents".to_string(), golden["init_noise"].clone())].into();
    let noise_path = dir.path().join("noise.safetensors");
    candle_core::safetensors::save(&noise, &noise_path).unwrap();
    let dump = dir.path().join("dump.safetensors");
    let r = run_in(
        dir.path(),
        &[
            "--sketch",
            &sk,
            "--prompt",
            "a cat jumps",
            "--model",
            &tiny,
            "--steps",
            "6",
            "--tau",
            "3",
            "--lambda",
            "0.5",
            "--guidance",
            "9",
            "--encode",
            "mean",
            // the goldens are f32 (auto would pick bf16 on a CPU with AVX512-BF16)
            "--dtype",
            "f32",
            "--init-noise",
            noise_path.to_str().unwrap(),
            "--dump",
            dump.to_str().unwrap(),
            "--size",
            "32",
            "--format",
            "gif,gif-raw,png,apng,sheet,svg,mp4",
            "--loop",
            "2",
            "--out",
            "out",
            "--quiet",
        ],
        &[],
    );
    assert!(r.ok, "{}", r.stderr);
    let d = candle_core::safetensors::load(&dump, &Device::Cpu).unwrap();
    for (name, tol) in [("inv_latents", 1e-4f32), ("latents", 1e-4), ("video", 1e-4)] {
        let err = max_abs(&(&d[name] - &golden[name]).unwrap()) / max_abs(&golden[name]).max(1.0);
        assert!(err <= tol, "{name}: error {err:.3e}");
    }
    // 2 variants x (binarised gif, raw gif, 4 png frames, apng, sheet png + json,
    // animated svg + 4 frame svgs, mp4) + dump, printed one per line
    assert_eq!(
        r.stdout.lines().count(),
        2 * (1 + 1 + 4 + 1 + 2 + 5 + 1) + 1,
        "{}",
        r.stdout
    );
    for f in [
        "variant-0.mp4",
        "variant-0.png",
        "variant-0-sheet.png",
        "variant-0-sheet.json",
        "variant-1.svg",
        "variant-1-003.svg",
    ] {
        assert!(dir.path().join("out").join(f).is_file(), "{f}");
    }
    let gif = dir.path().join("out/variant-1.gif");
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut dec = opts.read_info(std::fs::File::open(&gif).unwrap()).unwrap();
    assert_eq!((dec.width(), dec.height()), (32, 32));
    assert_eq!(
        dec.repeat(),
        gif::Repeat::Finite(1),
        "--loop 2: played twice"
    );
    let mut n = 0;
    while let Some(f) = dec.read_next_frame().unwrap() {
        assert_eq!(f.delay, 10);
        assert!(
            f.buffer.chunks(4).all(|p| p[0] == 0 || p[0] == 255),
            "binarised"
        );
        n += 1;
    }
    assert_eq!(n, 4);
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/result.json")).unwrap())
            .unwrap();
    assert_eq!(result["variants"], 2);
    assert_eq!(result["device"], "cpu");
    assert_eq!(result["dtype"], "f32");
    assert_eq!(
        result["unet_frame_evaluations"],
        6 * 5 + 2 * 6 * 8 + 4 + 3 + 2 + 1
    );

    // the same command again refuses to overwrite, and --overwrite replaces
    let again = [
        "--sketch",
        &sk,
        "--prompt",
        "x",
        "--model",
        &tiny,
        "--steps",
        "1",
        "--frames",
        "1",
        "--variants",
        "1",
        "--size",
        "16",
        "--out",
        "out",
        "--quiet",
    ];
    let r = run_in(dir.path(), &again, &[]);
    assert!(!r.ok && r.stderr.contains("already exists"), "{}", r.stderr);
    let mut with = again.to_vec();
    with.push("--overwrite");
    assert!(run_in(dir.path(), &with, &[]).ok);
}

#[test]
fn default_output_folder_is_new_and_named_after_the_sketch() {
    let (sk, tiny) = (sketch(), tiny());
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--sketch",
        &sk,
        "--prompt",
        "a cat",
        "--model",
        &tiny,
        "--steps",
        "1",
        "--frames",
        "2",
        "--variants",
        "1",
        "--size",
        "16",
        "--seed",
        "5",
        "--dtype",
        "bf16",
        "--quiet",
    ];
    assert!(run_in(dir.path(), &args, &[]).ok);
    assert!(run_in(dir.path(), &args, &[]).ok);
    assert!(dir
        .path()
        .join("pipeline_sketch-flipsketch/variant-0.gif")
        .is_file());
    assert!(dir
        .path()
        .join("pipeline_sketch-flipsketch-2/variant-0.gif")
        .is_file());
}

/// A HuggingFace cache laid out as hf-hub writes it, holding the tiny model under
/// checkpoint-2500/: the default `--model` works offline.
#[test]
fn cached_hub_model_is_used_offline() {
    let sk = sketch();
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--Hmrishav--t2v_sketch-lora");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let snap = repo.join("snapshots").join(sha).join("checkpoint-2500");
    for c in ["tokenizer", "scheduler", "text_encoder", "vae", "unet"] {
        std::fs::create_dir_all(snap.join(c)).unwrap();
        for e in std::fs::read_dir(fixtures().join("tiny").join(c)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, snap.join(c).join(p.file_name().unwrap())).unwrap();
        }
    }
    let work = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().unwrap();
    let args = [
        "--sketch",
        &sk,
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--frames",
        "1",
        "--variants",
        "1",
        "--size",
        "16",
        "--out",
        "o",
        "--quiet",
    ];
    let r = run_in(
        work.path(),
        &args,
        &[("HF_HOME", home_s), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(r.ok, "{}", r.stderr);
    // without the cache, offline: a clear error naming the model and the cache
    std::fs::remove_dir_all(repo.join("snapshots")).unwrap();
    let mut args2 = args.to_vec();
    let n = args2.len();
    args2[n - 2] = "o2";
    let r = run_in(
        work.path(),
        &args2,
        &[("HF_HOME", home_s), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(
        !r.ok
            && r.stderr.contains("Hmrishav/t2v_sketch-lora")
            && r.stderr.contains("HF_HUB_OFFLINE"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_inputs_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("notes.txt"), "not an image").unwrap();
    std::fs::write(d.join("empty.png"), "").unwrap();
    let png = std::fs::read(sketch()).unwrap();
    std::fs::write(d.join("cut.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(d.join("noise.safetensors"), "garbage").unwrap();
    let wrong: HashMap<String, Tensor> = [(
        "latents".to_string(),
        Tensor::zeros((1, 4, 2, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&wrong, d.join("wrong.safetensors")).unwrap();
    let other: HashMap<String, Tensor> = [(
        "x".to_string(),
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&other, d.join("other.safetensors")).unwrap();
    let sk = sketch();
    let sk = sk.as_str();
    let t = tiny();
    #[rustfmt::skip]
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--sketch", "missing.png", "--prompt", "a", "--model", &t], "missing.png"),
        (vec!["--sketch", "notes.txt", "--prompt", "a", "--model", &t], "not an image"),
        (vec!["--sketch", "empty.png", "--prompt", "a", "--model", &t], "empty.png"),
        (vec!["--sketch", "cut.png", "--prompt", "a", "--model", &t], "cut.png"),
        (vec!["--sketch", ".", "--prompt", "a", "--model", &t], "folder"),
        (vec!["--sketch", sk, "--prompt", "  ", "--model", &t], "--prompt"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--frames", "0"], "--frames"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--variants", "99"], "--variants"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--steps", "0"], "--steps"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--size", "5"], "--size"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--guidance", "nan"], "finite"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--dtype", "f64"], "f64"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--format", "avi"], "avi"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", "./no/such/model"], "no/such/model"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", d.to_str().unwrap()], "not a model folder"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--init-noise", "noise.safetensors"], "noise.safetensors"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--init-noise", "other.safetensors"], "latents"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--init-noise", "wrong.safetensors", "--steps", "1"], "init noise"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--out", "notes.txt"], "notes.txt"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--device", "tpu"], "tpu"),
        // not built in (the default build), or built in with no GPU here: named either way
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--device", "cuda"], "--device cuda:0"),
        (vec!["--sketch", sk, "--prompt", "a", "--model", &t, "--device", "metal:1"], "--device metal:1"),
    ];
    for (args, needle) in cases {
        let mut a = args.clone();
        a.push("--quiet");
        let r = run_in(d, &a, &[]);
        assert!(!r.ok, "{args:?} should fail");
        assert!(
            r.stderr.contains(needle),
            "{args:?}: expected {needle:?} in:\n{}",
            r.stderr
        );
    }
}

#[test]
fn rank_clip_scores_and_orders_every_variant() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, tiny) = (sketch(), tiny());
    let clip = fixtures().join("clip").to_string_lossy().into_owned();
    let args = [
        "--sketch",
        &sk,
        "--prompt",
        "a cat",
        "--model",
        &tiny,
        "--steps",
        "2",
        "--frames",
        "2",
        "--variants",
        "3",
        "--size",
        "16",
        "--seed",
        "1",
        "--rank",
        "clip",
        "--clip-model",
        &clip,
        "--min-score",
        "2",
        "--out",
        "o",
        "--quiet",
    ];
    let r = run_in(dir.path(), &args, &[]);
    assert!(r.ok, "{}", r.stderr);
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("o/result.json")).unwrap())
            .unwrap();
    // --dtype auto (the default): bf16 where the CPU has bf16 products, else f32
    #[cfg(target_arch = "x86_64")]
    let bf16 = std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    let bf16 = false;
    assert_eq!(
        result["dtype"],
        if bf16 { "bf16" } else { "f32" },
        "{result}"
    );
    let list = result["ranking"]["variants"].as_array().unwrap();
    assert_eq!(list.len(), 3, "never returns nothing: {result}");
    let scores: Vec<f64> = list.iter().map(|v| v["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "ordered: {scores:?}"
    );
    assert!(scores.iter().all(|s| (-1.0..=1.0).contains(s)));
    assert!(
        list.iter().all(|v| v["below_min_score"] == true),
        "min-score 2 marks every variant"
    );
    let mut variants: Vec<u64> = list
        .iter()
        .map(|v| v["variant"].as_u64().unwrap())
        .collect();
    variants.sort();
    assert_eq!(variants, [0, 1, 2]);

    // without CLIP weights ranking is skipped with a message, the run still succeeds
    let mut args2 = args.to_vec();
    let i = args2.iter().position(|a| *a == clip.as_str()).unwrap();
    args2[i] = "./no-clip-here";
    let n = args2.len();
    args2[n - 2] = "o2";
    let r = run_in(dir.path(), &args2, &[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("ranking skipped"), "{}", r.stderr);
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("o2/result.json")).unwrap())
            .unwrap();
    assert!(result["ranking"]["skipped"]
        .as_str()
        .unwrap()
        .contains("no-clip-here"));
}

#[test]
fn output_problems_are_found_before_the_model_loads() {
    let sk = sketch();
    let work = tempfile::tempdir().unwrap();
    // a model that cannot load: any error about the output must come first
    let no_model = ["--model", "nobody/nothing"];
    let offline = [
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HOME", work.path().to_str().unwrap()),
    ];
    std::fs::create_dir(work.path().join("o")).unwrap();
    std::fs::write(work.path().join("o/result.json"), "{}").unwrap();
    let mut args = vec![
        "--sketch", &sk, "--prompt", "a cat", "--out", "o", "--quiet",
    ];
    args.extend(no_model);
    let r = run_in(work.path(), &args, &offline);
    assert!(
        !r.ok && r.stderr.contains("result.json") && r.stderr.contains("already exists"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(work.path().join("o/result.json")).unwrap(),
        "{}"
    );
    std::fs::remove_file(work.path().join("o/result.json")).unwrap();
    std::fs::write(work.path().join("o/variant-2.gif"), "x").unwrap();
    let r = run_in(work.path(), &args, &offline);
    assert!(!r.ok && r.stderr.contains("variant-2.gif"), "{}", r.stderr);
    // a FIFO is refused at once (opening it would wait for a writer for good)
    let fifo = work.path().join("sketch.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let t = std::time::Instant::now();
    let r = run_in(
        work.path(),
        &[
            "--sketch",
            fifo.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--quiet",
        ],
        &offline,
    );
    assert!(
        !r.ok && r.stderr.contains("not a regular file"),
        "{}",
        r.stderr
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn a_format_given_twice_is_written_once() {
    let (sk, tiny) = (sketch(), tiny());
    let work = tempfile::tempdir().unwrap();
    let r = run_in(
        work.path(),
        &[
            "--sketch",
            &sk,
            "--prompt",
            "a cat",
            "--model",
            &tiny,
            "--steps",
            "1",
            "--frames",
            "2",
            "--variants",
            "1",
            "--size",
            "32",
            "--format",
            "gif,gif,png,gif",
            "--out",
            "o",
            "--quiet",
        ],
        &[],
    );
    assert!(r.ok, "{}", r.stderr);
    let mut names: Vec<String> = std::fs::read_dir(work.path().join("o"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "result.json",
            "variant-0-000.png",
            "variant-0-001.png",
            "variant-0.gif"
        ]
    );
}

#[test]
fn ctrl_c_stops_at_the_next_step_and_removes_what_is_partial() {
    let (sk, tiny) = (sketch(), tiny());
    let work = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flipsketch"))
        .current_dir(work.path())
        .args([
            "animate",
            "--sketch",
            &sk,
            "--prompt",
            "a cat",
            "--model",
            &tiny,
            "--steps",
            "400",
            "--frames",
            "8",
            "--variants",
            "2",
            "--out",
            "o",
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait until the run is under way (the output folder exists and the model has loaded)
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the interrupt"
    );
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // this run created the folder and wrote nothing whole: nothing is left
    assert!(
        !work.path().join("o").exists(),
        "{:?}",
        std::fs::read_dir(work.path().join("o")).map(|d| d.count())
    );
}
