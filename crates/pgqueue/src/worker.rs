//! A worker: loads the model once, then claims jobs one at a time until stopped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flipsketch_engine::{
    panic_message, progress_of, redact_paths, write_outputs, EngineConfig, JobPhase, JobSpec, Stop,
};
use flipsketch_media::sketch::{fit_square, Fit};
use flipsketch_pipeline::{Phase, Pipeline, PipelineError, Progress};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::frontend::janitor;
use crate::{QueueOptions, Store};

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub queue: QueueOptions,
    /// Where a job's files are written before they are stored.
    pub scratch: PathBuf,
    /// The worker's name in the workers table (host:pid when empty).
    pub name: String,
    /// The dtype the model runs in, as shown by `/api/info`.
    pub dtype: String,
}

/// What the run reports to the lease renewal: the pipeline's phase and steps done, or that
/// the files are being written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Report {
    /// The phase, its units done, and whether the inversion came from the cache.
    Phase(Phase, usize, bool),
    Writing,
}

struct WorkerProgress {
    tx: watch::Sender<Report>,
    /// Set by the renewal: a cancel request, or the lease lost.
    stop: Arc<AtomicBool>,
    phase: Phase,
    panics: bool,
    inversion_cached: bool,
}

impl Progress for WorkerProgress {
    fn inversion_cached(&mut self) {
        self.inversion_cached = true;
    }
    fn phase(&mut self, phase: Phase, _total: usize) {
        self.phase = phase;
        self.advance(0);
    }
    fn advance(&mut self, done: usize) {
        if self.phase == Phase::Denoising && self.panics {
            panic!("failpoint: a panic inside the run");
        }
        self.tx
            .send_replace(Report::Phase(self.phase, done, self.inversion_cached));
    }
    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A claimed job.
struct Claim {
    id: String,
    attempt: i32,
    spec: JobSpec,
    sketch: Vec<u8>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Runs a worker until `stop` turns true (SIGTERM): registers it, loads the model with `load`
/// (a worker whose model fails to load takes no job and returns the error), then claims,
/// runs and stores jobs one at a time. A job running when `stop` turns true is handed back to
/// the queue at once.
pub async fn run_worker(
    pool: PgPool,
    config: EngineConfig,
    opts: WorkerOptions,
    store: Store,
    load: impl FnOnce() -> Result<Pipeline, String> + Send + 'static,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let name = if opts.name.is_empty() {
        format!(
            "{}:{}:{:04x}",
            host_name(),
            std::process::id(),
            rand::random::<u16>()
        )
    } else {
        opts.name.clone()
    };
    let db = |e: sqlx::Error| format!("PostgreSQL: {e}");
    sqlx::query(
        "INSERT INTO flipsketch_workers (id, host, pid, state, dtype) VALUES ($1, $2, $3, 'loading', $4) \
         ON CONFLICT (id) DO UPDATE SET state = 'loading', started_at = now(), last_seen = now()",
    )
    .bind(&name)
    .bind(host_name())
    .bind(std::process::id() as i32)
    .bind(&opts.dtype)
    .execute(&pool)
    .await
    .map_err(db)?;
    // heartbeat, and the queue's upkeep, for as long as the worker runs
    let beat = {
        let (pool, name, q, store, keep) = (
            pool.clone(),
            name.clone(),
            opts.queue.clone(),
            store.clone(),
            config.keep_for,
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(q.heartbeat.min(q.janitor_every));
            let mut last_beat = Instant::now() - q.heartbeat;
            loop {
                tick.tick().await;
                if last_beat.elapsed() >= q.heartbeat {
                    let _ = sqlx::query(
                        "UPDATE flipsketch_workers SET last_seen = now() WHERE id = $1",
                    )
                    .bind(&name)
                    .execute(&pool)
                    .await;
                    last_beat = Instant::now();
                }
                janitor(&pool, &store, keep, None).await;
            }
        })
    };
    let result = work(&pool, &config, &opts, &store, &name, load, &mut stop).await;
    beat.abort();
    let (state, error) = match &result {
        Ok(()) => ("stopped", None),
        Err(e) => ("failed", Some(redact_paths(e))),
    };
    let _ = sqlx::query(
        "UPDATE flipsketch_workers SET state = $2, error = $3, job_id = NULL WHERE id = $1",
    )
    .bind(&name)
    .bind(state)
    .bind(error)
    .execute(&pool)
    .await;
    result
}

async fn work(
    pool: &PgPool,
    config: &EngineConfig,
    opts: &WorkerOptions,
    store: &Store,
    name: &str,
    load: impl FnOnce() -> Result<Pipeline, String> + Send + 'static,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let db = |e: sqlx::Error| format!("PostgreSQL: {e}");
    let pipeline = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(load))
            .unwrap_or_else(|p| Err(format!("loading panicked: {}", panic_message(&*p))))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("the model failed to load: {e}"))?;
    let pipeline = Arc::new(pipeline);
    let image_size = pipeline.image_size();
    sqlx::query(
        "UPDATE flipsketch_workers SET state = 'ready', device = $2, image_size = $3, dtype = $4, \
         last_seen = now() WHERE id = $1",
    )
    .bind(name)
    .bind(pipeline.device_name())
    .bind(image_size as i32)
    .bind(pipeline.dtype_name())
    .execute(pool)
    .await
    .map_err(db)?;
    tracing::info!("worker {name} ready ({})", pipeline.device_name());
    // New or requeued jobs are announced: wait for those instead of asking all the time (and
    // ask at least every few seconds, should a notification be missed).
    let mut listener = PgListener::connect_with(pool).await.ok();
    if let Some(l) = listener.as_mut() {
        let _ = l.listen("flipsketch_jobs").await;
    }
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        match claim(pool, name, &opts.queue).await {
            Ok(Some(c)) => {
                let handed_back =
                    run_claim(pool, config, opts, store, name, &pipeline, c, stop).await;
                if handed_back {
                    return Ok(());
                }
            }
            Ok(None) => {
                let wait = tokio::time::sleep(Duration::from_secs(3));
                tokio::select! {
                    _ = wait => {}
                    _ = stop.changed() => {}
                    n = async {
                        match listener.as_mut() {
                            Some(l) => l.try_recv().await.map(|_| ()),
                            None => std::future::pending().await,
                        }
                    } => {
                        if n.is_err() {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!("cannot claim a job: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// Takes the oldest waiting job, if any: `running`, the next attempt, a lease.
async fn claim(
    pool: &PgPool,
    worker: &str,
    q: &QueueOptions,
) -> Result<Option<Claim>, sqlx::Error> {
    let row = sqlx::query(
        "WITH next AS ( \
             SELECT id FROM flipsketch_jobs WHERE state = 'queued' \
             ORDER BY queued_at, id FOR UPDATE SKIP LOCKED LIMIT 1) \
         UPDATE flipsketch_jobs j SET state = 'running', attempt = j.attempt + 1, worker = $1, \
             lease_until = now() + make_interval(secs => $2), started_at = now(), \
             cancel_requested = false, progress = 0, phase = 'encoding', step = NULL, eta_s = NULL \
         FROM next WHERE j.id = next.id \
         RETURNING j.id, j.attempt, j.spec, j.sketch",
    )
    .bind(worker)
    .bind(q.lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let id: String = row.get("id");
    let spec: serde_json::Value = row.get("spec");
    let spec: JobSpec = match serde_json::from_value(spec) {
        Ok(s) => s,
        Err(e) => {
            // not a job this version of flipsketch can run: fail it, say why
            let _ = sqlx::query(
                "UPDATE flipsketch_jobs SET state = 'failed', finished_at = now(), phase = NULL, \
                 error = $2 WHERE id = $1",
            )
            .bind(&id)
            .bind(format!("the job's settings cannot be read: {e}"))
            .execute(pool)
            .await;
            return Ok(None);
        }
    };
    sqlx::query("UPDATE flipsketch_workers SET job_id = $2 WHERE id = $1")
        .bind(worker)
        .bind(&id)
        .execute(pool)
        .await?;
    Ok(Some(Claim {
        id,
        attempt: row.get("attempt"),
        spec,
        sketch: row.get("sketch"),
    }))
}

/// The renewal of a lease with the progress: `Some(cancel requested)` while the job is this
/// worker's, `None` once it is not (the lease expired and the job went to another attempt).
async fn renew(
    pool: &PgPool,
    c: &Claim,
    worker: &str,
    lease: Duration,
    phase: JobPhase,
    progress: f64,
    step: Option<usize>,
    eta: Option<f64>,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(
        "UPDATE flipsketch_jobs SET lease_until = now() + make_interval(secs => $4), \
         phase = $5, progress = $6, step = $7, eta_s = $8 \
         WHERE id = $1 AND attempt = $2 AND worker = $3 AND state = 'running' \
         RETURNING cancel_requested",
    )
    .bind(&c.id)
    .bind(c.attempt)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .bind(phase.as_str())
    .bind(progress)
    .bind(step.map(|s| s as i32))
    .bind(eta)
    .fetch_optional(pool)
    .await
}

/// A lease extended without news (while its end is being recorded): `None` once the job
/// is not this attempt's.
async fn extend_lease(
    pool: &PgPool,
    c: &Claim,
    worker: &str,
    lease: Duration,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar::<_, i32>(
        "UPDATE flipsketch_jobs SET lease_until = now() + make_interval(secs => $4) \
         WHERE id = $1 AND attempt = $2 AND worker = $3 AND state = 'running' RETURNING 1",
    )
    .bind(&c.id)
    .bind(c.attempt)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// How the run of a claim ended, for the statement that records it.
enum End {
    Done(Vec<(String, Vec<u8>)>),
    Cancelled,
    Failed(String),
    /// Not this worker's any more: record nothing.
    Lost,
    /// SIGTERM: back to the queue.
    HandBack,
}

/// Why the end of a claim is not recorded (yet).
#[derive(Debug)]
enum RecordError {
    /// PostgreSQL did not answer.
    Db(String),
    /// The bucket did not take the files.
    Store(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Db(e) => write!(f, "PostgreSQL: {e}"),
            RecordError::Store(e) => write!(f, "{e}"),
        }
    }
}

/// Runs one claimed job to its end; true when the worker is stopping (the job handed back).
#[allow(clippy::too_many_arguments)]
async fn run_claim(
    pool: &PgPool,
    config: &EngineConfig,
    opts: &WorkerOptions,
    store: &Store,
    worker: &str,
    pipeline: &Arc<Pipeline>,
    c: Claim,
    stop_signal: &mut watch::Receiver<bool>,
) -> bool {
    tracing::info!("job {}: attempt {} on worker {worker}", c.id, c.attempt);
    let lease = opts.queue.lease;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = watch::channel(Report::Phase(Phase::Encoding, 0, false));
    let dir = opts.scratch.join(&c.id);
    // the cost model, and the same without the phases a cached inversion skips
    let work = c.spec.work();
    let work_cached = work.without_inversion();
    let started = Instant::now();
    // the run, on a blocking thread
    let run = {
        let (pipeline, stop, config, dir, spec, sketch) = (
            pipeline.clone(),
            stop.clone(),
            config.clone(),
            dir.clone(),
            c.spec.clone(),
            c.sketch.clone(),
        );
        let image_size = pipeline.image_size() as u32;
        tokio::task::spawn_blocking(move || -> Result<Vec<(String, Vec<u8>)>, Stop> {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let img = image::load_from_memory(&sketch)
                    .map_err(|e| Stop::Failed(format!("the stored sketch cannot be read: {e}")))?
                    .to_rgb8();
                let request = spec
                    .request(&fit_square(&img, image_size, Fit::Pad))
                    .map_err(Stop::Failed)?;
                let mut progress = WorkerProgress {
                    tx: tx.clone(),
                    stop: stop.clone(),
                    phase: Phase::Encoding,
                    panics: config
                        .panic_marker
                        .as_deref()
                        .is_some_and(|m| spec.prompt.contains(m)),
                    inversion_cached: false,
                };
                let out = pipeline.run(&request, &mut progress).map_err(|e| match e {
                    PipelineError::Cancelled => Stop::Cancelled,
                    other => Stop::Failed(other.to_string()),
                })?;
                tx.send_replace(Report::Writing);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Stop::Failed(format!("cannot create a scratch folder: {e}")))?;
                let names = write_outputs(&config, &dir, &out.video, &stop)?;
                names
                    .into_iter()
                    .map(|n| {
                        std::fs::read(dir.join(&n))
                            .map(|b| (n, b))
                            .map_err(|e| Stop::Failed(format!("cannot read back a file: {e}")))
                    })
                    .collect()
            }))
            .unwrap_or_else(|p| {
                Err(Stop::Failed(format!(
                    "internal error: {}",
                    panic_message(&*p)
                )))
            })
        })
    };
    tokio::pin!(run);
    // the lease, renewed with the progress at every step and at least every third of it
    let mut last_ok = Instant::now();
    let mut lost = false;
    let mut handing_back = false;
    let mut tick = tokio::time::interval(lease / 3);
    tick.tick().await;
    let outcome = loop {
        tokio::select! {
            r = &mut run => break r.unwrap_or_else(|e| Err(Stop::Failed(format!("internal error: {e}")))),
            _ = rx.changed() => {}
            _ = tick.tick() => {}
            _ = stop_signal.changed() => {
                if *stop_signal.borrow() {
                    handing_back = true;
                    stop.store(true, Ordering::SeqCst);
                }
                continue;
            }
        }
        if lost {
            continue;
        }
        let report = *rx.borrow_and_update();
        let (phase, progress, step, eta) = match report {
            Report::Phase(p, done, cached) => {
                let plan = if cached { &work_cached } else { &work };
                let (pr, eta) = progress_of(plan, p, done, started.elapsed().as_secs_f64());
                let step = matches!(p, Phase::Inversion | Phase::Denoising).then_some(done);
                (JobPhase::from(p), pr, step, eta)
            }
            Report::Writing => (JobPhase::Writing, 0.99, None, None),
        };
        match renew(pool, &c, worker, lease, phase, progress, step, eta).await {
            Ok(Some(cancel)) => {
                last_ok = Instant::now();
                if cancel {
                    stop.store(true, Ordering::SeqCst);
                }
            }
            Ok(None) => {
                tracing::warn!(
                    "job {}: attempt {} lost its lease; stopping",
                    c.id,
                    c.attempt
                );
                lost = true;
                stop.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                // the database is away (restarting?): keep running while the lease may hold
                tracing::warn!("job {}: cannot renew the lease: {e}", c.id);
                if last_ok.elapsed() > lease {
                    tracing::warn!("job {}: the lease ran out unrenewed; stopping", c.id);
                    lost = true;
                    stop.store(true, Ordering::SeqCst);
                }
            }
        }
    };
    flipsketch_engine::remove_dirs(vec![dir]);
    let mut end = if lost {
        End::Lost
    } else if handing_back {
        End::HandBack
    } else {
        match outcome {
            Ok(files) => End::Done(files),
            Err(Stop::Cancelled) => End::Cancelled,
            Err(Stop::Failed(e)) => End::Failed(e),
        }
    };
    // the end, written for this attempt only; retried while the database or the bucket is
    // away, for as long as a lease lasts. Files that cannot be stored by then fail the job
    // with the reason (running it again elsewhere would meet the same bucket).
    let mut deadline = Instant::now() + lease;
    loop {
        match record(pool, store, worker, &c, &end).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!("job {}: cannot record its end yet: {e}", c.id);
                tokio::time::sleep(Duration::from_millis(500)).await;
                // the lease held meanwhile, else the job would run again elsewhere
                if let Ok(None) = extend_lease(pool, &c, worker, lease).await {
                    tracing::warn!(
                        "job {}: attempt {} lost its lease while recording its end",
                        c.id,
                        c.attempt
                    );
                    break;
                }
            }
            Err(RecordError::Store(e)) => {
                tracing::error!("job {}: its files could not be stored: {e}", c.id);
                end = End::Failed(format!("the result's files could not be stored: {e}"));
                deadline = Instant::now() + lease;
            }
            Err(e) => {
                tracing::error!("job {}: its end could not be recorded: {e}", c.id);
                break;
            }
        }
    }
    let _ = sqlx::query("UPDATE flipsketch_workers SET job_id = NULL WHERE id = $1")
        .bind(worker)
        .execute(pool)
        .await;
    handing_back
}

/// Records how a claim ended, fenced by its attempt: a statement that finds the job no longer
/// this attempt's changes nothing (and a refused result's stored objects are deleted).
async fn record(
    pool: &PgPool,
    store: &Store,
    worker: &str,
    c: &Claim,
    end: &End,
) -> Result<(), RecordError> {
    let db = |e: sqlx::Error| RecordError::Db(e.to_string());
    const MINE: &str = "WHERE id = $1 AND attempt = $2 AND worker = $3 AND state = 'running'";
    match end {
        End::Lost => {
            tracing::warn!(
                "job {}: the result of attempt {} is not recorded (the lease was lost)",
                c.id,
                c.attempt
            );
            Ok(())
        }
        End::HandBack => {
            // one more attempt allowed: handing back is not a failure
            let r = sqlx::query(&format!(
                "UPDATE flipsketch_jobs SET state = 'queued', worker = NULL, lease_until = NULL, \
                 max_attempts = max_attempts + 1, phase = 'queued', progress = 0, step = NULL, \
                 eta_s = NULL {MINE}"
            ))
            .bind(&c.id)
            .bind(c.attempt)
            .bind(worker)
            .execute(pool)
            .await
            .map_err(db)?;
            tracing::info!(
                "job {}: handed back to the queue ({} row)",
                c.id,
                r.rows_affected()
            );
            Ok(())
        }
        End::Cancelled | End::Failed(_) => {
            let (state, error) = match end {
                End::Failed(e) => ("failed", Some(redact_paths(e))),
                _ => ("cancelled", None),
            };
            sqlx::query(&format!(
                "UPDATE flipsketch_jobs SET state = CASE WHEN cancel_requested THEN 'cancelled' ELSE $4 END, \
                 error = CASE WHEN cancel_requested THEN NULL ELSE $5 END, \
                 phase = NULL, eta_s = NULL, lease_until = NULL, finished_at = now() {MINE}"
            ))
            .bind(&c.id)
            .bind(c.attempt)
            .bind(worker)
            .bind(state)
            .bind(error)
            .execute(pool)
            .await
            .map_err(db)?;
            Ok(())
        }
        End::Done(files) => {
            store
                .put(&c.id, c.attempt, files)
                .await
                .map_err(RecordError::Store)?;
            let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
            let mut tx = pool.begin().await.map_err(db)?;
            // a cancel accepted before this statement wins: the job ends cancelled, no files
            let state: Option<String> = sqlx::query_scalar(&format!(
                "UPDATE flipsketch_jobs SET \
                 state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'done' END, \
                 files = CASE WHEN cancel_requested THEN '{{}}'::text[] ELSE $4 END, \
                 result_attempt = $2, progress = CASE WHEN cancel_requested THEN progress ELSE 1 END, \
                 phase = NULL, eta_s = NULL, lease_until = NULL, finished_at = now() {MINE} \
                 RETURNING state"
            ))
            .bind(&c.id)
            .bind(c.attempt)
            .bind(worker)
            .bind(&names)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            match state.as_deref() {
                Some("done") => {
                    store.insert_rows(&mut tx, &c.id, files).await.map_err(db)?;
                    tx.commit().await.map_err(db)?;
                }
                Some(_) => {
                    tx.commit().await.map_err(db)?;
                    store.discard(&c.id, c.attempt, &names).await;
                }
                None => {
                    drop(tx);
                    store.discard(&c.id, c.attempt, &names).await;
                    tracing::warn!(
                        "job {}: the late result of attempt {} was refused (the job went to another attempt)",
                        c.id,
                        c.attempt
                    );
                }
            }
            Ok(())
        }
    }
}
