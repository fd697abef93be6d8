//! Where a model comes from: a local folder, or a HuggingFace hub repository (default
//! `Hmrishav/t2v_sketch-lora`, subfolder `checkpoint-2500`) fetched into the standard HF cache
//! by `flipsketch-hub`, which `huggingface_hub` shares. A complete, intact cached copy is used
//! without network access; `HF_HUB_OFFLINE=1` forbids downloading.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use flipsketch_hub::{DownloadProgress, Fetch, HubConfig, ModelRef};
use flipsketch_models::loading::FolderLayout;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub const DEFAULT_REPO: &str = "Hmrishav/t2v_sketch-lora";
pub const DEFAULT_SUBFOLDER: &str = "checkpoint-2500";

/// The options naming the FlipSketch model, shared by every command that loads it.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a local folder (diffusers layout, or a clone holding the subfolder) or a hub
    /// repository id, fetched into the HuggingFace cache.
    #[arg(long, default_value = DEFAULT_REPO)]
    pub model: String,
    /// Folder of the repository (or of a local clone) holding the model.
    #[arg(long, default_value = DEFAULT_SUBFOLDER)]
    pub subfolder: String,
    /// Hub revision: a branch, a tag or a commit hash (pins the exact files).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Weight variant to prefer, e.g. `fp16` (`*.fp16.safetensors`); components without it
    /// load their plain files.
    #[arg(long)]
    pub variant: Option<String>,
}

impl ModelArgs {
    /// The model folder, downloading what the cache lacks (`progress`: show a bar).
    pub fn resolve(&self, progress: bool) -> Result<PathBuf> {
        resolve(
            &self.model,
            &self.subfolder,
            &self.revision,
            self.variant.as_deref(),
            &flipsketch_pipeline::components::MODEL_FILES,
            Fetch::CacheFirst,
            progress,
        )
    }

    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }
}

/// A model folder directly, or one with `subfolder/` inside (the repository as cloned).
fn local_folder(path: &Path, subfolder: &str, layout: &FolderLayout) -> Option<PathBuf> {
    if path.join(layout.marker).is_file() {
        return Some(path.to_path_buf());
    }
    let inner = path.join(subfolder);
    inner.join(layout.marker).is_file().then_some(inner)
}

fn looks_like_repo(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `--model`: an existing local path, or `owner/name` on the hub.
pub fn resolve(
    spec: &str,
    subfolder: &str,
    revision: &str,
    variant: Option<&str>,
    layout: &FolderLayout,
    fetch: Fetch,
    progress: bool,
) -> Result<PathBuf> {
    let as_path = Path::new(spec);
    if as_path.exists() {
        return local_folder(as_path, subfolder, layout).with_context(|| {
            format!(
                "{spec} is not a model folder (no {} in it or in {subfolder}/)",
                layout.marker
            )
        });
    }
    if !looks_like_repo(spec) {
        bail!("model {spec:?}: no such folder, and not a hub repository id (owner/name)");
    }
    let cfg = HubConfig::from_env();
    let model = ModelRef {
        repo: spec.to_string(),
        revision: revision.to_string(),
        subfolder: subfolder.to_string(),
        variant: variant.map(String::from),
    };
    let mut bar = DownloadBar::new(progress);
    let resolved = flipsketch_hub::resolve(&cfg, &model, layout, fetch, &mut bar)?;
    bar.done(resolved.downloaded);
    Ok(resolved.dir)
}

/// Progress of a download in the terminal: bytes, speed and time left for the whole model,
/// the current file as the message. Off a terminal, a line at the start and at the end.
struct DownloadBar {
    bar: ProgressBar,
    show: bool,
    started: Option<Instant>,
}

impl DownloadBar {
    fn new(show: bool) -> Self {
        Self {
            bar: ProgressBar::hidden(),
            show,
            started: None,
        }
    }

    fn done(&self, bytes: u64) {
        self.bar.finish_and_clear();
        if let (true, Some(t), true) = (self.show, self.started, bytes > 0) {
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "downloaded {} in {s:.0} s ({}/s)",
                indicatif::HumanBytes(bytes),
                indicatif::HumanBytes((bytes as f64 / s.max(1e-3)) as u64)
            );
        }
    }
}

impl DownloadProgress for DownloadBar {
    fn start(&mut self, files: usize, bytes: u64) {
        self.started = Some(Instant::now());
        if !self.show || files == 0 {
            return;
        }
        eprintln!(
            "downloading {files} file(s), {} ...",
            indicatif::HumanBytes(bytes)
        );
        let style = ProgressStyle::with_template(
            "{bytes:>10}/{total_bytes} [{bar:30}] {binary_bytes_per_sec}, {eta} left  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        self.bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr())
            .with_style(style);
        self.bar.enable_steady_tick(Duration::from_millis(250));
    }

    fn file(&mut self, name: &str) {
        self.bar.set_message(name.to_string());
    }

    fn bytes(&mut self, n: u64) {
        self.bar.inc(n);
    }

    fn undo(&mut self, n: u64) {
        self.bar.set_position(self.bar.position().saturating_sub(n));
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_repo;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo("Hmrishav/t2v_sketch-lora"));
        assert!(looks_like_repo("openai/clip-vit-base-patch32"));
        assert!(!looks_like_repo("./x/y"));
        assert!(!looks_like_repo("a/b/c"));
        assert!(!looks_like_repo("a/"));
        assert!(!looks_like_repo("a b/c"));
    }
}
