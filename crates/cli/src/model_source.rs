//! Where the model comes from: a local folder, or a HuggingFace hub repository (default
//! `Hmrishav/t2v_sketch-lora`, subfolder `checkpoint-2500`) fetched into the standard cache
//! (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`). A cached copy is used without any
//! network access; `HF_HUB_OFFLINE=1` forbids downloading.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flipsketch_models::loading::{DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS};

pub const DEFAULT_REPO: &str = "Hmrishav/t2v_sketch-lora";
pub const DEFAULT_SUBFOLDER: &str = "checkpoint-2500";

const PLAIN_FILES: &[&str] = &[
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "text_encoder/config.json",
    "vae/config.json",
    "unet/config.json",
];

fn weight_sets() -> [(&'static str, &'static [&'static str]); 3] {
    [
        ("text_encoder", TRANSFORMERS_WEIGHTS),
        ("vae", DIFFUSERS_WEIGHTS),
        ("unet", DIFFUSERS_WEIGHTS),
    ]
}

/// A model folder in the diffusers layout directly, or one with `checkpoint-2500/` inside
/// (the repository as cloned).
fn local_folder(path: &Path, subfolder: &str) -> Option<PathBuf> {
    if path.join("unet").is_dir() {
        return Some(path.to_path_buf());
    }
    let inner = path.join(subfolder);
    inner.join("unet").is_dir().then_some(inner)
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index)?)
        .with_context(|| format!("{}: not a shard index", index.display()))?;
    let mut names: Vec<String> = v["weight_map"]
        .as_object()
        .with_context(|| format!("{}: no weight_map", index.display()))?
        .values()
        .filter_map(|s| s.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The model folder of a cached hub snapshot, if every needed file is cached.
fn from_cache(repo: &hf_hub::CacheRepo, subfolder: &str) -> Option<PathBuf> {
    let path = |f: &str| {
        if subfolder.is_empty() {
            f.to_string()
        } else {
            format!("{subfolder}/{f}")
        }
    };
    for f in PLAIN_FILES {
        repo.get(&path(f))?;
    }
    for (component, candidates) in weight_sets() {
        let found = candidates
            .iter()
            .find_map(|c| repo.get(&path(&format!("{component}/{c}"))).map(|p| (c, p)))?;
        if found.0.ends_with(".index.json") {
            for shard in shard_names(&found.1).ok()? {
                repo.get(&path(&format!("{component}/{shard}")))?;
            }
        }
    }
    let config = repo.get(&path("unet/config.json"))?;
    Some(config.parent()?.parent()?.to_path_buf())
}

fn download(repo_id: &str, subfolder: &str, progress: bool) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(progress)
        .build()?;
    let repo = api.model(repo_id.to_string());
    let info = repo
        .info()
        .with_context(|| format!("cannot reach the hub for {repo_id}"))?;
    let path = |f: &str| {
        if subfolder.is_empty() {
            f.to_string()
        } else {
            format!("{subfolder}/{f}")
        }
    };
    let have: std::collections::HashSet<&str> =
        info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let mut last = None;
    for f in PLAIN_FILES {
        let p = path(f);
        if !have.contains(p.as_str()) && f.ends_with("special_tokens_map.json") {
            continue; // optional
        }
        last = Some(
            repo.get(&p)
                .with_context(|| format!("downloading {repo_id}/{p}"))?,
        );
    }
    for (component, candidates) in weight_sets() {
        let Some(c) = candidates
            .iter()
            .find(|c| have.contains(path(&format!("{component}/{c}")).as_str()))
        else {
            bail!(
                "{repo_id}: no {component} weights under {subfolder}/{component}/ (looked for {})",
                candidates.join(", ")
            );
        };
        let p = path(&format!("{component}/{c}"));
        let local = repo
            .get(&p)
            .with_context(|| format!("downloading {repo_id}/{p}"))?;
        if c.ends_with(".index.json") {
            for shard in shard_names(&local)? {
                let p = path(&format!("{component}/{shard}"));
                repo.get(&p)
                    .with_context(|| format!("downloading {repo_id}/{p}"))?;
            }
        }
    }
    let config = last.context("nothing downloaded")?;
    // .../snapshots/<sha>/<subfolder>/unet/config.json -> .../<subfolder>
    Ok(config
        .parent()
        .and_then(Path::parent)
        .context("unexpected cache layout")?
        .to_path_buf())
}

/// Resolves `--model`: an existing local path, or `owner/name` on the hub (cache first).
pub fn resolve(spec: &str, subfolder: &str, progress: bool) -> Result<PathBuf> {
    let as_path = Path::new(spec);
    if as_path.exists() {
        return local_folder(as_path, subfolder).with_context(|| {
            format!("{spec} is not a model folder (no unet/ in it or in {subfolder}/); expected the diffusers layout")
        });
    }
    let looks_like_repo =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with('/');
    if !looks_like_repo {
        bail!("model {spec:?}: no such folder, and not a hub repository id (owner/name)");
    }
    let cache = hf_hub::Cache::from_env();
    if let Some(dir) = from_cache(&cache.model(spec.to_string()), subfolder) {
        tracing::info!("using the cached {spec} in {}", dir.display());
        return Ok(dir);
    }
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0")
        .unwrap_or(false);
    if offline {
        bail!(
            "model {spec} ({subfolder}) is not in the HuggingFace cache at {} and HF_HUB_OFFLINE is set",
            cache.path().display()
        );
    }
    download(spec, subfolder, progress).with_context(|| {
        format!(
            "model {spec} is not cached in {} and could not be downloaded",
            cache.path().display()
        )
    })
}
