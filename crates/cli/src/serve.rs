//! `flipsketch serve` (the web app and HTTP API over a job queue) and `flipsketch worker` (a
//! machine running the jobs of a shared PostgreSQL queue).
//!
//! By default `serve` is one process with an in-memory queue: the model loads once, in the
//! inference thread, and the server answers (healthz 503) while it loads. With
//! `--queue postgres://...` the jobs live in PostgreSQL and any number of `flipsketch worker`
//! processes, on any machines, run them; `--workers 1` makes the front end one of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use flipsketch_engine::{Engine, EngineConfig, Readiness};
use flipsketch_pgqueue::{PgQueue, QueueOptions, Store, WorkerOptions};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::Pipeline;
use tokio::sync::watch;

use crate::model_source::ModelArgs;
use crate::Precision;

/// What the model runs on, for `serve` (in-process or as a worker) and `worker`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Compute precision: auto is bf16 on a GPU or a CPU with AVX512-BF16, else f32.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: Precision,
    /// Where the model runs: auto (a GPU when this binary has CUDA or Metal support and one is
    /// there, else the CPU), cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceArg,
}

/// The shared queue: where jobs and their files live, and how long a worker's claim lasts.
#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    /// Where the jobs wait: `memory` (this process only) or a PostgreSQL URL
    /// (`postgres://user@host/db`; a password from the URL or PGPASSWORD).
    #[arg(long, default_value = "memory")]
    pub queue: String,
    /// Where done jobs' files live with a PostgreSQL queue: `postgres` (in the database) or
    /// an S3-compatible bucket `s3://bucket/prefix` (credentials and endpoint from `AWS_*`).
    #[arg(long, default_value = "postgres")]
    pub store: String,
    /// Seconds a worker's claim on a job lasts without a renewal (renewed at every step and
    /// every third of this); a job whose worker is lost waits that long before another takes it.
    #[arg(long, default_value_t = 60)]
    pub lease_s: u64,
    /// Times a job may be taken before lost workers fail it.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Seconds between a worker's heartbeats (gone after three missed).
    #[arg(long, default_value_t = 5)]
    pub heartbeat_s: u64,
}

impl QueueArgs {
    fn postgres(&self) -> Result<Option<&str>> {
        match self.queue.as_str() {
            "memory" => Ok(None),
            u if u.starts_with("postgres://") || u.starts_with("postgresql://") => Ok(Some(u)),
            other if other.parse::<usize>().is_ok() => bail!(
                "--queue {other}: --queue names where jobs wait (memory or postgres://...); \
                 the number of jobs that may wait is --queue-size"
            ),
            other => bail!("--queue {other:?}: expected memory or a postgres:// URL"),
        }
    }

    fn options(&self) -> Result<QueueOptions> {
        if self.lease_s == 0 || self.heartbeat_s == 0 || self.max_attempts == 0 {
            bail!("--lease-s, --heartbeat-s and --max-attempts must be at least 1");
        }
        Ok(QueueOptions {
            lease: Duration::from_secs(self.lease_s),
            max_attempts: self.max_attempts,
            heartbeat: Duration::from_secs(self.heartbeat_s),
            janitor_every: Duration::from_secs(1)
                .min(Duration::from_secs(self.lease_s) / 4)
                .max(Duration::from_millis(250)),
        })
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// With a PostgreSQL queue: 1 makes this process a worker too, 0 (the default) only
    /// serves. The in-memory queue always runs its one worker.
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// Address to listen on (localhost only by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Jobs that may wait in the queue.
    #[arg(long, default_value_t = 8)]
    pub queue_size: usize,
    /// Minutes finished jobs and their files are kept (fractions allowed).
    #[arg(long, default_value_t = 60.0)]
    pub keep_minutes: f64,
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

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Where a job's files are written before they are stored (default: a folder in the
    /// system temp dir).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// The worker's name (default: host:pid:random).
    #[arg(long, default_value = "")]
    pub name: String,
    /// Side of the GIFs in pixels.
    #[arg(long, default_value_t = 512)]
    pub output_size: u32,
    /// Minutes finished jobs and their files are kept (the worker helps expire them).
    #[arg(long, default_value_t = 60.0)]
    pub keep_minutes: f64,
}

/// The settings every job of this process is run with.
fn engine_config(output_size: u32, keep_minutes: f64) -> Result<EngineConfig> {
    if !(16..=2048).contains(&output_size) {
        bail!("--output-size must be between 16 and 2048");
    }
    // a year at most: longer is not a keep time but a typo, and overflows nothing
    if !(keep_minutes > 0.0 && keep_minutes <= 525_600.0) {
        bail!("--keep-minutes must be more than 0 and at most 525600 (a year), not {keep_minutes}");
    }
    let mut config = EngineConfig {
        keep_for: Duration::from_secs_f64(keep_minutes * 60.0),
        output_size,
        decode_hook: Some(crate::release_memory_while),
        ..EngineConfig::default()
    };
    // Fault injection for the tests, never in release builds.
    if cfg!(debug_assertions) {
        config.panic_marker = std::env::var("FLIPSKETCH_TEST_PANIC_MARKER").ok();
    }
    Ok(config)
}

/// Reference noises of this many recent sketches are kept (16 KB each at 256 px).
const INVERSION_CACHE: usize = 8;

/// Loads the model (downloading it first if needed) for `run`; also the precision it runs in.
#[allow(clippy::type_complexity)]
fn loader(
    run: &RunArgs,
) -> Result<(
    impl FnOnce() -> Result<Pipeline, String> + Send + 'static,
    &'static str,
)> {
    let device = run.device.open()?;
    let (model, dtype) = (run.model.clone(), run.dtype.dtype(&device));
    let load = move || {
        let dir = model.resolve(true).map_err(|e| format!("{e:#}"))?;
        let components = Components::load(&dir, dtype, &device, model.variant(), |name| {
            tracing::info!("loading {name}")
        })
        .map_err(|e| format!("{}: {e}", dir.display()))?;
        eprintln!("model loaded from {}", dir.display());
        // a second prompt on one of the last sketches skips its encoding and inversion
        Ok(Pipeline::new(components, device).with_inversion_cache(INVERSION_CACHE))
    };
    Ok((load, flipsketch_pipeline::dtype_name(dtype)))
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.queue_size == 0 {
        bail!("--queue-size must be at least 1");
    }
    if a.workers > 1 {
        bail!("--workers is 0 or 1 (start more `flipsketch worker` processes for more)");
    }
    let mut config = engine_config(a.output_size, a.keep_minutes)?;
    config.queue_capacity = a.queue_size;
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
    let postgres = a.queue.postgres()?.map(String::from);
    let qopts = a.queue.options()?;
    let (load, dtype) = loader(&a.run)?;
    runtime()?.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (queue, worker): (flipsketch_server::Queue, _) = match &postgres {
            None => {
                let engine = Engine::start(config, Box::new(load));
                if let Readiness::Failed(e) = engine.readiness() {
                    eprintln!("error: {e}");
                }
                (Arc::new(engine), None)
            }
            Some(url) => {
                let pool = flipsketch_pgqueue::connect(url).await?;
                let store = Store::from_spec(Some(&a.queue.store))?;
                store.check().await?;
                eprintln!(
                    "job queue: PostgreSQL at {}, files in {store:?}",
                    flipsketch_pgqueue::redact_url(url)
                );
                let queue =
                    PgQueue::start(pool.clone(), config.clone(), qopts.clone(), store.clone());
                let worker = (a.workers == 1).then(|| {
                    let opts = WorkerOptions {
                        queue: qopts,
                        scratch: config.jobs_dir.clone(),
                        name: String::new(),
                        dtype: dtype.to_string(),
                    };
                    tokio::spawn(flipsketch_pgqueue::run_worker(
                        pool, config, opts, store, load, stop_rx,
                    ))
                });
                (queue, worker)
            }
        };
        eprintln!(
            "flipsketch serving on http://{} (loading the model...)",
            listener.local_addr()?
        );
        let shutdown = async move {
            stop_signal().await;
            eprintln!("stopping");
            let _ = stop_tx.send(true);
        };
        flipsketch_server::serve_with(listener, queue, limits, shutdown).await?;
        if let Some(w) = worker {
            // the worker hands its job back before the process ends
            if let Ok(Err(e)) = w.await {
                eprintln!("error: worker: {e}");
            }
        }
        Ok(())
    })
}

/// A worker's own scratch folder in the system temp dir.
fn scratch_default() -> PathBuf {
    std::env::temp_dir().join(format!("flipsketch-worker-{}", std::process::id()))
}

/// `flipsketch worker`: loads the model once and takes jobs from the PostgreSQL queue one at
/// a time until SIGTERM or Ctrl-C, which hands the running job back to the queue at once.
pub fn worker(a: WorkerArgs) -> Result<()> {
    let Some(url) = a.queue.postgres()?.map(String::from) else {
        bail!("flipsketch worker needs --queue postgres://... (the in-memory queue has its worker in serve)");
    };
    let config = engine_config(a.output_size, a.keep_minutes)?;
    let qopts = a.queue.options()?;
    let scratch = a.scratch.clone().unwrap_or_else(scratch_default);
    let _scratch_lock =
        flipsketch_engine::prepare_jobs_dir(&scratch).map_err(anyhow::Error::msg)?;
    let (load, dtype) = loader(&a.run)?;
    let result = runtime()?.block_on(async move {
        let pool = flipsketch_pgqueue::connect(&url).await?;
        let store = Store::from_spec(Some(&a.queue.store))?;
        store.check().await?;
        eprintln!(
            "worker on the queue at {}, files in {store:?}",
            flipsketch_pgqueue::redact_url(&url)
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            stop_signal().await;
            eprintln!("stopping: handing the running job back");
            let _ = stop_tx.send(true);
        });
        let opts = WorkerOptions {
            queue: qopts,
            scratch: scratch.clone(),
            name: a.name.clone(),
            dtype: dtype.to_string(),
        };
        flipsketch_pgqueue::run_worker(pool, config, opts, store, load, stop_rx)
            .await
            .map_err(anyhow::Error::msg)
    });
    if a.scratch.is_none() {
        let _ = std::fs::remove_dir_all(&scratch_default());
    }
    result
}
