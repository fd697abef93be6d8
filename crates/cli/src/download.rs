//! `flipsketch download`: fetch everything a run needs into the HuggingFace cache ahead of
//! time (for offline use, or a cluster whose nodes share the cache), checked against the hub's
//! hashes, and print where it went.

use anyhow::Result;
use clap::Args;
use flipsketch_hub::Fetch;

use crate::model_source::{self, ModelArgs};

#[derive(Args, Debug)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also fetch this CLIP model for `animate --rank clip` (e.g. openai/clip-vit-base-patch32).
    #[arg(long)]
    pub clip_model: Option<String>,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(a: DownloadArgs) -> Result<()> {
    let m = &a.model;
    let dir = model_source::resolve(
        &m.model,
        &m.subfolder,
        &m.revision,
        m.variant(),
        &flipsketch_pipeline::components::MODEL_FILES,
        Fetch::Refresh,
        !a.quiet,
    )?;
    println!("{}", dir.display());
    if let Some(clip) = &a.clip_model {
        let dir = model_source::resolve(
            clip,
            "",
            "main",
            m.variant(),
            &flipsketch_pipeline::ranking::CLIP_FILES,
            Fetch::Refresh,
            !a.quiet,
        )?;
        println!("{}", dir.display());
    }
    Ok(())
}
