//! The packed-weight cache: a second load maps what the first packed and computes exactly
//! the same; a cache file that is short, stale or cannot be written never changes a result
//! or fails a load; the folder is kept under its size limit.
//!
//! One test function: it sets `FLIPSKETCH_WEIGHT_CACHE_MAX_GB`, which the writers read.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixtures, golden};
use flipsketch_models::compute::{ComputePlan, Vb};
use flipsketch_models::loading::{load_component_cached, LoadReport, DIFFUSERS_WEIGHTS};
use flipsketch_models::packcache::{wait_for_writes, CacheUse};
use flipsketch_models::unets::unet_3d_condition::{UNet3DConditionModel, UNet3DConfig};

fn load(dir: &Path, dtype: DType, root: Option<&Path>) -> (UNet3DConditionModel, LoadReport) {
    load_with(dir, dtype, root, |vb| vb)
}

/// [`load`] with the convolution choices `convs` makes of the builder.
fn load_with(
    dir: &Path,
    dtype: DType,
    root: Option<&Path>,
    convs: fn(Vb) -> Vb,
) -> (UNet3DConditionModel, LoadReport) {
    let cfg = UNet3DConfig::from_file(&dir.join("config.json")).unwrap();
    load_component_cached(
        "unet",
        dir,
        &DIFFUSERS_WEIGHTS.candidates(None),
        dtype,
        &Device::Cpu,
        root,
        |vb| UNet3DConditionModel::new(&cfg, convs(vb)),
    )
    .unwrap()
}

/// The model's outputs on the golden inputs of config a.
fn outputs(unet: &UNet3DConditionModel, dtype: DType) -> Vec<Vec<f32>> {
    (0..3)
        .map(|k| {
            let g = golden(&format!("unet_a_{k}.safetensors"));
            let t = g["timestep"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0] as f64;
            let input = |name: &str| g[name].to_dtype(dtype).unwrap();
            let out: Tensor = unet
                .forward(&input("sample"), t, &input("encoder_hidden_states"), None)
                .unwrap();
            out.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn cache_files(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|l| l.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn packed_weight_cache() {
    let tmp = tempfile::tempdir().unwrap();
    // A copy of the tiny UNet whose weights file the test may touch.
    let model = tmp.path().join("unet");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures().join("tiny/unet").join(f), model.join(f)).unwrap();
    }
    let root = tmp.path().join("cache");
    // The kernels' precision of each dtype: bf16 runs as f32 on CPUs without bf16 products
    // (AVX2), and then shares the f32 file.
    let precision = |dtype| ComputePlan::current(dtype, &Device::Cpu).unwrap().matmul;
    let mut written = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let plan = ComputePlan::current(dtype, &Device::Cpu).unwrap();
        let (plain, rep) = load(&model, dtype, None);
        assert_eq!(rep.cache, CacheUse::Off);
        let want = outputs(&plain, dtype);
        drop(plain);

        let (first, rep) = load(&model, dtype, Some(&root));
        if plan.matmul.kernels().is_none() {
            // candle's ops (FLIPSKETCH_OPS=candle) pack nothing, so nothing is cached.
            assert_eq!(rep.cache, CacheUse::Off, "{dtype:?}");
            assert!(cache_files(&root).is_empty());
            continue;
        }
        if written.contains(&plan.matmul) {
            assert!(
                matches!(rep.cache, CacheUse::Hit(_)),
                "{dtype:?}: {:?}",
                rep.cache
            );
            assert_eq!(outputs(&first, dtype), want, "{dtype:?}: the shared file");
            continue;
        }
        written.push(plan.matmul);
        let CacheUse::Writing(file) = rep.cache.clone() else {
            panic!("{dtype:?}: first load: {:?}", rep.cache)
        };
        assert_eq!(
            outputs(&first, dtype),
            want,
            "{dtype:?}: packed during the load"
        );
        wait_for_writes();
        assert!(file.is_file(), "{} written", file.display());

        // Second load: every packed weight mapped from the file, the same numbers, the same
        // report of what the checkpoint holds.
        let (second, rep2) = load(&model, dtype, Some(&root));
        assert_eq!(rep2.cache, CacheUse::Hit(file.clone()), "{dtype:?}");
        assert_eq!(rep2.parameters, rep.parameters);
        assert_eq!(rep2.unexpected, rep.unexpected);
        assert_eq!(
            outputs(&second, dtype),
            want,
            "{dtype:?}: mapped from the cache"
        );
        drop((first, second));

        // A short file (a crash mid-copy, a full disk elsewhere) is ignored and replaced.
        let len = std::fs::metadata(&file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        let (third, rep) = load(&model, dtype, Some(&root));
        assert_eq!(
            rep.cache,
            CacheUse::Writing(file.clone()),
            "{dtype:?}: short file"
        );
        assert_eq!(
            outputs(&third, dtype),
            want,
            "{dtype:?}: after a short file"
        );
        wait_for_writes();
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            len,
            "rewritten whole"
        );
        let (_, rep) = load(&model, dtype, Some(&root));
        assert_eq!(rep.cache, CacheUse::Hit(file.clone()));
        // Garbage in place of the header: ignored too.
        std::fs::write(&file, b"not a cache file at all").unwrap();
        let (_, rep) = load(&model, dtype, Some(&root));
        assert_eq!(
            rep.cache,
            CacheUse::Writing(file.clone()),
            "{dtype:?}: garbage"
        );
        wait_for_writes();
    }
    let kernels = ComputePlan::current(DType::F32, &Device::Cpu)
        .unwrap()
        .matmul
        .kernels()
        .is_some();
    if !kernels {
        return;
    }
    // Weights packed for the direct convolution (every stride-1 convolution here) and for
    // the Winograd convolution (every 3x3 one) go through the cache as well, in folders of
    // their own.
    let kinds: [(&str, fn(Vb) -> Vb); 2] = [
        ("direct", |vb| vb.with_direct_conv_min_width(0)),
        ("winograd", |vb| vb.with_winograd(0, 0)),
    ];
    for (kind, convs) in kinds {
        let kind_root = tmp.path().join(kind);
        for dtype in [DType::F32, DType::BF16] {
            let (plain, _) = load_with(&model, dtype, None, convs);
            let want = outputs(&plain, dtype);
            drop(plain);
            let (first, rep) = load_with(&model, dtype, Some(&kind_root), convs);
            let shared = dtype == DType::BF16 && precision(DType::BF16) == precision(DType::F32);
            if shared {
                assert!(matches!(rep.cache, CacheUse::Hit(_)), "{:?}", rep.cache);
            } else {
                assert!(matches!(rep.cache, CacheUse::Writing(_)), "{:?}", rep.cache);
            }
            assert_eq!(outputs(&first, dtype), want, "{dtype:?} {kind}, packed");
            drop(first);
            wait_for_writes();
            let (second, rep) = load_with(&model, dtype, Some(&kind_root), convs);
            assert!(matches!(rep.cache, CacheUse::Hit(_)), "{:?}", rep.cache);
            assert_eq!(
                outputs(&second, dtype),
                want,
                "{dtype:?} {kind}, from the file"
            );
        }
    }

    // One file per precision, no temporaries left.
    let files = cache_files(&root);
    assert_eq!(files.len(), written.len(), "{files:?}");
    assert!(
        files.iter().all(|f| f.extension().unwrap() == "fspack"),
        "{files:?}"
    );

    // A changed checkpoint (new modification time) is another key: it packs afresh, and with
    // a size limit of 0 only the file just written is kept.
    let weights = model.join("diffusion_pytorch_model.safetensors");
    let f = std::fs::File::options()
        .append(true)
        .open(&weights)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    // SAFETY: this test binary runs this one test, so no other thread reads the environment.
    unsafe { std::env::set_var("FLIPSKETCH_WEIGHT_CACHE_MAX_GB", "0") };
    let (_, rep) = load(&model, DType::F32, Some(&root));
    let CacheUse::Writing(new) = rep.cache else {
        panic!("changed checkpoint: {:?}", rep.cache)
    };
    assert!(!files.contains(&new), "a new key, a new file");
    wait_for_writes();
    assert_eq!(
        cache_files(&root),
        vec![new.clone()],
        "least recently used removed"
    );
    unsafe { std::env::remove_var("FLIPSKETCH_WEIGHT_CACHE_MAX_GB") };

    // A folder that cannot be made (its parent is a file): the load works, the write fails
    // with a warning, and the next load packs again.
    let blocked = tmp.path().join("a-file");
    std::fs::write(&blocked, b"x").unwrap();
    let root = blocked.join("cache");
    for _ in 0..2 {
        let (m, rep) = load(&model, DType::F32, Some(&root));
        assert!(matches!(rep.cache, CacheUse::Writing(_)), "{:?}", rep.cache);
        assert_eq!(outputs(&m, DType::F32), {
            let (p, _) = load(&model, DType::F32, None);
            outputs(&p, DType::F32)
        });
        wait_for_writes();
        assert!(!root.exists());
    }
}
