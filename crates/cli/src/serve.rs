//! `flipsketch serve`: the web app and HTTP API. The model loads once, in the inference
//! thread; the server answers (healthz 503) while it loads.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use flipsketch_engine::{Engine, EngineConfig};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::Pipeline;

use crate::model_source::ModelArgs;
use crate::Precision;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (localhost only by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// Where the model runs: auto (a GPU when this binary has CUDA or Metal support and one is
    /// there, else the CPU), cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceArg,
    /// Jobs that may wait in the queue.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Minutes finished jobs and their files are kept.
    #[arg(long, default_value_t = 60)]
    pub keep_minutes: u64,
    /// Where job files go (default: a folder in the system temp dir).
    #[arg(long)]
    pub jobs_dir: Option<PathBuf>,
    /// Side of the GIFs in pixels.
    #[arg(long, default_value_t = 512)]
    pub output_size: u32,
    /// Largest sketch upload in MB.
    #[arg(long, default_value_t = 16)]
    pub upload_mb: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.queue == 0 {
        bail!("--queue must be at least 1");
    }
    if !(16..=2048).contains(&a.output_size) {
        bail!("--output-size must be between 16 and 2048");
    }
    let mut config = EngineConfig {
        queue_capacity: a.queue,
        keep_for: Duration::from_secs(a.keep_minutes * 60),
        output_size: a.output_size,
        ..EngineConfig::default()
    };
    config.limits.upload_max_bytes = a.upload_mb << 20;
    if let Some(d) = &a.jobs_dir {
        config.jobs_dir = d.clone();
    }
    std::fs::create_dir_all(&config.jobs_dir).with_context(|| {
        format!(
            "cannot create the jobs folder {}",
            config.jobs_dir.display()
        )
    })?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let (model, dtype) = (a.model.clone(), a.dtype.dtype());
        let device = a.device.open()?;
        let engine = Engine::start(
            config,
            Box::new(move || {
                let dir = model.resolve(true).map_err(|e| format!("{e:#}"))?;
                let components = Components::load(&dir, dtype, &device, model.variant(), |name| {
                    tracing::info!("loading {name}")
                })
                .map_err(|e| format!("{}: {e}", dir.display()))?;
                eprintln!("model loaded from {}", dir.display());
                Ok(Pipeline::new(components, device))
            }),
        );
        eprintln!(
            "flipsketch serving on http://{} (loading the model...)",
            listener.local_addr()?
        );
        flipsketch_server::serve(listener, engine).await?;
        Ok(())
    })
}
