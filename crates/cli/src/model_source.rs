//! Where the model comes from: a local folder, or a HuggingFace hub repository (default
//! `Hmrishav/t2v_sketch-lora`, subfolder `checkpoint-2500`) fetched into the standard cache
//! (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`). A cached copy is used without any
//! network access; `HF_HUB_OFFLINE=1` forbids downloading.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flipsketch_models::loading::{DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS};

pub const DEFAULT_REPO: &str = "Hmrishav/t2v_sketch-lora";
pub const DEFAULT_SUBFOLDER: &str = "checkpoint-2500";

/// The files a model folder of some kind consists of.
pub struct Layout {
    /// Files every such folder has (a missing `special_tokens_map.json` is tolerated).
    pub plain_files: &'static [&'static str],
    /// Per component subfolder ("" for the top), the weight file names tried in order.
    pub weights: &'static [(&'static str, &'static [&'static str])],
    /// A file whose presence marks a local folder of this kind.
    pub marker: &'static str,
}

/// The diffusers text-to-video folder FlipSketch runs.
pub const FLIPSKETCH: Layout = Layout {
    plain_files: PLAIN_FILES,
    weights: &[
        ("text_encoder", TRANSFORMERS_WEIGHTS),
        ("vae", DIFFUSERS_WEIGHTS),
        ("unet", DIFFUSERS_WEIGHTS),
    ],
    marker: "unet/config.json",
};

/// A transformers CLIP model (vision tower used for ranking).
pub const CLIP: Layout = Layout {
    plain_files: &["config.json", "preprocessor_config.json"],
    weights: &[("", TRANSFORMERS_WEIGHTS)],
    marker: "config.json",
};

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

/// A model folder directly, or one with `subfolder/` inside (the repository as cloned).
fn local_folder(path: &Path, subfolder: &str, layout: &Layout) -> Option<PathBuf> {
    if path.join(layout.marker).is_file() {
        return Some(path.to_path_buf());
    }
    let inner = path.join(subfolder);
    inner.join(layout.marker).is_file().then_some(inner)
}

fn join(dir: &str, file: &str) -> String {
    if dir.is_empty() {
        file.to_string()
    } else {
        format!("{dir}/{file}")
    }
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

/// The folder holding `layout.marker` in a snapshot, from the marker file's path.
fn model_root(marker: &Path, layout: &Layout) -> Option<PathBuf> {
    marker
        .ancestors()
        .nth(layout.marker.split('/').count())
        .map(Path::to_path_buf)
}

/// The model folder of a cached hub snapshot, if every needed file is cached.
fn from_cache(repo: &hf_hub::CacheRepo, subfolder: &str, layout: &Layout) -> Option<PathBuf> {
    let path = |f: &str| join(subfolder, f);
    for f in layout.plain_files {
        if repo.get(&path(f)).is_none() && !f.ends_with("special_tokens_map.json") {
            return None;
        }
    }
    for (component, candidates) in layout.weights {
        let found = candidates
            .iter()
            .find_map(|c| repo.get(&path(&join(component, c))).map(|p| (c, p)))?;
        if found.0.ends_with(".index.json") {
            for shard in shard_names(&found.1).ok()? {
                repo.get(&path(&join(component, &shard)))?;
            }
        }
    }
    model_root(&repo.get(&path(layout.marker))?, layout)
}

fn download(repo_id: &str, subfolder: &str, layout: &Layout, progress: bool) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(progress)
        .build()?;
    let repo = api.model(repo_id.to_string());
    let info = repo
        .info()
        .with_context(|| format!("cannot reach the hub for {repo_id}"))?;
    let path = |f: &str| join(subfolder, f);
    let have: std::collections::HashSet<&str> =
        info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let get = |p: &str| {
        repo.get(p)
            .with_context(|| format!("downloading {repo_id}/{p}"))
    };
    for f in layout.plain_files {
        let p = path(f);
        if !have.contains(p.as_str()) && f.ends_with("special_tokens_map.json") {
            continue; // optional
        }
        get(&p)?;
    }
    for (component, candidates) in layout.weights {
        let Some(c) = candidates
            .iter()
            .find(|c| have.contains(path(&join(component, c)).as_str()))
        else {
            bail!(
                "{repo_id}: no weights in {:?} (looked for {})",
                path(component),
                candidates.join(", ")
            );
        };
        let local = get(&path(&join(component, c)))?;
        if c.ends_with(".index.json") {
            for shard in shard_names(&local)? {
                get(&path(&join(component, &shard)))?;
            }
        }
    }
    model_root(&get(&path(layout.marker))?, layout).context("unexpected cache layout")
}

/// Resolves `--model`: an existing local path, or `owner/name` on the hub (cache first).
pub fn resolve(spec: &str, subfolder: &str, layout: &Layout, progress: bool) -> Result<PathBuf> {
    let as_path = Path::new(spec);
    if as_path.exists() {
        return local_folder(as_path, subfolder, layout).with_context(|| {
            format!(
                "{spec} is not a model folder (no {} in it or in {subfolder}/)",
                layout.marker
            )
        });
    }
    let looks_like_repo =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with('/');
    if !looks_like_repo {
        bail!("model {spec:?}: no such folder, and not a hub repository id (owner/name)");
    }
    let cache = hf_hub::Cache::from_env();
    if let Some(dir) = from_cache(&cache.model(spec.to_string()), subfolder, layout) {
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
    download(spec, subfolder, layout, progress).with_context(|| {
        format!(
            "model {spec} is not cached in {} and could not be downloaded",
            cache.path().display()
        )
    })
}
