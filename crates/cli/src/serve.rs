//! `flipsketch serve`: the web app and HTTP API. The model loads once, in the inference
//! thread; the server answers (healthz 503) while it loads.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use flipsketch_engine::{Engine, EngineConfig, Readiness};
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
    /// Open connections at most (one more is answered 503 and closed).
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a connection may stay silent (no request, no bytes) before it is closed.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Seconds a request's headers may take to arrive.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
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
    // One folder per port by default, so that a restarted server finds (and clears) what
    // its predecessor left.
    config.jobs_dir = a
        .jobs_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("flipsketch-serve-{}", a.port)));
    if a.max_connections == 0 || a.idle_timeout == 0 || a.header_timeout == 0 {
        bail!("--max-connections, --idle-timeout and --header-timeout must be at least 1");
    }
    let limits = flipsketch_server::ConnectionLimits {
        max_connections: a.max_connections,
        idle_timeout: Duration::from_secs(a.idle_timeout),
        header_timeout: Duration::from_secs(a.header_timeout),
    };
    config.decode_hook = Some(crate::release_memory_while);
    // Fault injection for the tests, never in release builds.
    if cfg!(debug_assertions) {
        config.panic_marker = std::env::var("FLIPSKETCH_TEST_PANIC_MARKER").ok();
    }

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
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("stopping");
        };
        if let Readiness::Failed(e) = engine.readiness() {
            eprintln!("error: {e}");
        }
        flipsketch_server::serve_with(listener, engine, limits, shutdown).await?;
        Ok(())
    })
}
