//! The front end's side: the [`JobQueue`] the HTTP layer talks to, over PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flipsketch_engine::{
    new_id, validate_fields, CancelOutcome, DecodeGate, EngineConfig, FileBody, Health, JobPhase,
    JobQueue, JobRequest, JobStatus, JobView, Lookup, Outputs, Readiness, SubmitError, Unavailable,
    Workers,
};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::{QueueOptions, Store};

/// The sketch kept with a job: on white, at most this many pixels a side (the model works at
/// 256), as PNG.
pub const SKETCH_SIDE: u32 = 512;

/// The advisory lock under which the waiting jobs are counted before one more is queued.
const QUEUE_LOCK: i64 = 0x666c6970; // "flip"

/// The columns a [`JobView`] is made of, with the queue position of waiting jobs.
pub(crate) const VIEW_COLUMNS: &str = "j.id, j.state, j.progress, j.phase, j.step, j.steps, \
     j.eta_s, j.seed, j.error, j.attempt, j.version, j.variants, j.frames, \
     CASE WHEN j.state = 'queued' THEN (SELECT count(*) FROM flipsketch_jobs q \
     WHERE q.state = 'queued' AND (q.queued_at, q.id) < (j.queued_at, j.id)) END AS position";

pub(crate) fn view_of(row: &PgRow) -> Result<JobView, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let status = JobStatus::parse(&state).unwrap_or(JobStatus::Failed);
    let phase: Option<String> = row.try_get("phase")?;
    let outputs = (status == JobStatus::Done).then(|| -> Result<Outputs, sqlx::Error> {
        Ok(Outputs {
            variants: row.try_get::<i32, _>("variants")? as usize,
            frames: row.try_get::<i32, _>("frames")? as usize,
        })
    });
    Ok(JobView {
        id: row.try_get("id")?,
        status,
        progress: row.try_get("progress")?,
        phase: phase.as_deref().and_then(JobPhase::parse),
        step: row.try_get::<Option<i32>, _>("step")?.map(|s| s as usize),
        steps: Some(row.try_get::<i32, _>("steps")? as usize),
        eta_s: row.try_get("eta_s")?,
        queue_position: row
            .try_get::<Option<i64>, _>("position")?
            .map(|p| p as usize),
        seed: row.try_get::<i64, _>("seed")? as u64,
        outputs: outputs.transpose()?,
        error: row.try_get("error")?,
        attempt: row.try_get::<i32, _>("attempt")? as u32,
        version: row.try_get::<i64, _>("version")? as u64,
    })
}

/// The views of these jobs.
pub(crate) async fn fetch_views(
    pool: &PgPool,
    ids: &[String],
) -> Result<Vec<JobView>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM flipsketch_jobs j WHERE j.id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await?;
    rows.iter().map(view_of).collect()
}

pub struct PgQueue {
    pool: PgPool,
    config: EngineConfig,
    opts: QueueOptions,
    store: Store,
    decodes: DecodeGate,
    /// The event streams of this front end, per job.
    watchers: Mutex<HashMap<String, watch::Sender<JobView>>>,
    /// Whether the last query reached the database, and the error if not.
    db: Mutex<Option<String>>,
    started: Instant,
    /// The last time a query failed (else the start): clients could not ask about their jobs
    /// before it.
    unreachable_at: Mutex<Instant>,
    stopped: AtomicBool,
}

/// How an unreachable database reads in an answer to a client.
fn unreachable(e: &sqlx::Error) -> String {
    format!("the job queue (PostgreSQL) cannot be reached: {e}")
}

fn db_error(e: &sqlx::Error) -> SubmitError {
    SubmitError::Unavailable(unreachable(e))
}

fn down(e: sqlx::Error) -> Unavailable {
    Unavailable(unreachable(&e))
}

impl PgQueue {
    /// The queue over `pool` (connected and migrated by [`crate::connect`]); starts this front
    /// end's listener (LISTEN/NOTIFY to the event streams) and janitor.
    pub fn start(
        pool: PgPool,
        config: EngineConfig,
        opts: QueueOptions,
        store: Store,
    ) -> Arc<Self> {
        let q = Arc::new(Self {
            decodes: DecodeGate::new(&config),
            pool,
            config,
            opts,
            store,
            watchers: Mutex::new(HashMap::new()),
            db: Mutex::new(None),
            started: Instant::now(),
            unreachable_at: Mutex::new(Instant::now()),
            stopped: AtomicBool::new(false),
        });
        tokio::spawn(listen(Arc::downgrade(&q)));
        let (pool, opts, store, keep, client) = (
            q.pool.clone(),
            q.opts.clone(),
            q.store.clone(),
            q.config.keep_for,
            q.config.client_timeout,
        );
        let weak = Arc::downgrade(&q);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(opts.janitor_every);
            loop {
                tick.tick().await;
                let Some(q) = weak.upgrade() else { return };
                if q.stopped.load(Ordering::SeqCst) {
                    return;
                }
                // Queued jobs of departed clients are dropped only once this front end has
                // reached the database long enough for its clients to come back after a
                // restart of either (they could not say they were there in between).
                let probe = sqlx::query("SELECT 1").execute(&pool).await;
                let _ = q.noted(probe);
                let reachable_for = q
                    .unreachable_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed();
                let departed = (reachable_for > client * 2).then_some(client);
                drop(q);
                janitor(&pool, &store, keep, departed).await;
            }
        });
        q
    }

    fn noted<T>(&self, r: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        *db = r.as_ref().err().map(|e| e.to_string());
        if r.is_err() {
            *self
                .unreachable_at
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        r
    }

    async fn view(&self, id: &str) -> Lookup<JobView> {
        let r = fetch_views(&self.pool, &[id.to_string()]).await;
        Ok(self.noted(r).map_err(down)?.into_iter().next())
    }

    /// Notes that a client asked about `id` (a write at most every quarter of the client
    /// timeout per job, 5 s at most).
    async fn seen(&self, id: &str) {
        let every = (self.config.client_timeout / 4).min(Duration::from_secs(5));
        let r = sqlx::query(
            "UPDATE flipsketch_jobs SET client_seen = now() \
             WHERE id = $1 AND client_seen < now() - make_interval(secs => $2)",
        )
        .bind(id)
        .bind(every.as_secs_f64())
        .execute(&self.pool)
        .await;
        let _ = self.noted(r);
    }

    /// Sends the current views of these jobs to their event streams; forgets streams no one
    /// reads any more.
    async fn refresh(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let Ok(views) = self.noted(fetch_views(&self.pool, &ids).await) else {
            return;
        };
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        for v in views {
            if let Some(tx) = w.get(&v.id) {
                tx.send_if_modified(|old| {
                    let changed = *old != v;
                    *old = v.clone();
                    changed
                });
            }
        }
        w.retain(|_, tx| tx.receiver_count() > 0);
    }

    /// What changed after a notification about `id`: that job, and every watched waiting job
    /// (their queue positions move when another job leaves the queue).
    async fn on_change(&self, id: &str) {
        let ids: Vec<String> = {
            let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            w.iter()
                .filter(|(k, tx)| k.as_str() == id || tx.borrow().status == JobStatus::Queued)
                .map(|(k, _)| k.clone())
                .collect()
        };
        self.refresh(ids).await;
    }

    async fn refresh_all(&self) {
        let ids: Vec<String> = {
            let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            w.keys().cloned().collect()
        };
        self.refresh(ids).await;
    }
}

/// LISTEN on `flipsketch_jobs` for as long as the queue lives, reconnecting after a lost
/// connection (a database restart): then every stream is refreshed, a notification may have
/// been missed.
async fn listen(q: std::sync::Weak<PgQueue>) {
    loop {
        let Some(pool) = q.upgrade().map(|q| q.pool.clone()) else {
            return;
        };
        match PgListener::connect_with(&pool).await {
            Ok(mut l) => {
                if l.listen("flipsketch_jobs").await.is_ok() {
                    if let Some(q) = q.upgrade() {
                        q.refresh_all().await;
                    }
                    loop {
                        match l.try_recv().await {
                            Ok(Some(n)) => match q.upgrade() {
                                Some(q) => q.on_change(n.payload()).await,
                                None => return,
                            },
                            // the connection was lost (and will be made again): refresh
                            Ok(None) => {
                                tracing::warn!("the PostgreSQL listener lost its connection");
                                break;
                            }
                            Err(e) => {
                                tracing::warn!("PostgreSQL listener: {e}");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("cannot LISTEN on PostgreSQL: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The queue's upkeep, run by every front end and worker: expired leases back to the queue
/// (or failed after `max_attempts`), queued jobs of departed clients cancelled, finished jobs
/// and their files removed after `keep`, workers gone for an hour forgotten.
pub(crate) async fn janitor(
    pool: &PgPool,
    store: &Store,
    keep: Duration,
    departed_after: Option<Duration>,
) {
    let requeued = sqlx::query(
        "UPDATE flipsketch_jobs SET state = 'queued', worker = NULL, lease_until = NULL, \
         lost = lost + 1, phase = 'queued', progress = 0, step = NULL, eta_s = NULL \
         WHERE state = 'running' AND lease_until < now() AND lost + 1 < max_attempts \
         RETURNING id, attempt",
    )
    .fetch_all(pool)
    .await;
    if let Ok(rows) = requeued {
        for r in rows {
            let (id, attempt): (String, i32) = (r.get(0), r.get(1));
            tracing::warn!(
                "job {id}: its worker stopped answering (attempt {attempt}); back in the queue"
            );
        }
    }
    let failed = sqlx::query(
        "UPDATE flipsketch_jobs SET state = 'failed', lease_until = NULL, phase = NULL, \
         eta_s = NULL, finished_at = now(), lost = lost + 1, \
         error = format('the workers running it stopped answering %s times (last: %s)', \
                        lost + 1, coalesce(worker, 'unknown')) \
         WHERE state = 'running' AND lease_until < now() AND lost + 1 >= max_attempts \
         RETURNING id",
    )
    .fetch_all(pool)
    .await;
    if let Ok(rows) = failed {
        for r in rows {
            let id: String = r.get(0);
            tracing::warn!("job {id}: failed, its workers were lost too often");
        }
    }
    if let Some(d) = departed_after {
        let _ = sqlx::query(
            "UPDATE flipsketch_jobs SET state = 'cancelled', phase = NULL, finished_at = now(), \
             error = 'the client went away before the job started' \
             WHERE state = 'queued' AND client_seen < now() - make_interval(secs => $1)",
        )
        .bind(d.as_secs_f64())
        .execute(pool)
        .await;
    }
    let expired = sqlx::query_scalar::<_, String>(
        "DELETE FROM flipsketch_jobs WHERE finished_at < now() - make_interval(secs => $1) \
         RETURNING id",
    )
    .bind(keep.as_secs_f64())
    .fetch_all(pool)
    .await;
    if let Ok(ids) = expired {
        store.delete_jobs(&ids).await;
    }
    let _ =
        sqlx::query("DELETE FROM flipsketch_workers WHERE last_seen < now() - interval '1 hour'")
            .execute(pool)
            .await;
}

/// The sketch as stored with a job: decoded (bounded as every upload), on white, reduced to
/// at most [`SKETCH_SIDE`] a side, as PNG.
fn sketch_png(bytes: &[u8]) -> Result<Vec<u8>, SubmitError> {
    let img = flipsketch_media::sketch::decode(bytes, Path::new("sketch"))
        .map_err(|e| SubmitError::Invalid(e.to_string()))?;
    let reduced = flipsketch_media::sketch::on_white_reduced(&img, SKETCH_SIDE);
    drop(img);
    let mut out = std::io::Cursor::new(Vec::new());
    reduced
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| SubmitError::Invalid(format!("sketch: {e}")))?;
    Ok(out.into_inner())
}

fn device_name(s: &str) -> &'static str {
    match s {
        "cuda" => "cuda",
        "metal" => "metal",
        _ => "cpu",
    }
}

fn dtype_name(s: &str) -> &'static str {
    match s {
        "bf16" => "bf16",
        "f16" => "f16",
        _ => "f32",
    }
}

/// The key counted most often (the first of equals).
fn most<'a>(counts: &BTreeMap<&'a str, usize>, default: &'a str) -> &'a str {
    counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(d, _)| *d)
        .unwrap_or(default)
}

#[async_trait::async_trait]
impl JobQueue for PgQueue {
    fn config(&self) -> &EngineConfig {
        &self.config
    }

    async fn health(&self) -> Health {
        let alive = self.opts.heartbeat * 3;
        let rows = sqlx::query(
            "SELECT device, dtype, state, image_size, job_id, error FROM flipsketch_workers \
             WHERE last_seen > now() - make_interval(secs => $1) ORDER BY started_at",
        )
        .bind(alive.as_secs_f64())
        .fetch_all(&self.pool)
        .await;
        let rows = match self.noted(rows) {
            Ok(r) => r,
            Err(e) => {
                return Health {
                    readiness: Readiness::Failed(unreachable(&e)),
                    workers: None,
                    queue: "postgres",
                }
            }
        };
        let mut workers = Workers::default();
        let mut ready: Option<usize> = None;
        let mut failure = None;
        let mut by_device: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut by_dtype: BTreeMap<&'static str, usize> = BTreeMap::new();
        for r in &rows {
            let state: String = r.get("state");
            match state.as_str() {
                "ready" => {
                    let device =
                        device_name(&r.get::<Option<String>, _>("device").unwrap_or_default());
                    workers.alive += 1;
                    *workers.devices.entry(device.to_string()).or_default() += 1;
                    *by_device.entry(device).or_default() += 1;
                    let dtype =
                        dtype_name(&r.get::<Option<String>, _>("dtype").unwrap_or_default());
                    *workers.dtypes.entry(dtype.to_string()).or_default() += 1;
                    *by_dtype.entry(dtype).or_default() += 1;
                    if r.get::<Option<String>, _>("job_id").is_some() {
                        workers.busy += 1;
                    }
                    if ready.is_none() {
                        let size: Option<i32> = r.get("image_size");
                        ready = Some(size.unwrap_or(0) as usize);
                    }
                }
                "failed" => failure = r.get::<Option<String>, _>("error"),
                _ => {}
            }
        }
        let readiness = match ready {
            // the device and precision most workers run with
            Some(image_size) => Readiness::Ready {
                image_size,
                device: most(&by_device, "cpu"),
                dtype: most(&by_dtype, "f32"),
            },
            None => match failure {
                Some(e) => Readiness::Failed(format!("no worker is ready; one failed: {e}")),
                // workers starting with the front end get a few heartbeats to register
                None if rows.is_empty() && self.started.elapsed() > self.opts.heartbeat * 3 => Readiness::Failed(
                    "no worker is connected to the queue (start `flipsketch worker --queue ...`)"
                        .into(),
                ),
                None => Readiness::Loading,
            },
        };
        Health {
            readiness,
            workers: Some(workers),
            queue: "postgres",
        }
    }

    async fn precheck(&self) -> Result<(), SubmitError> {
        // as in-process: no job is taken while no worker is ready to run it
        match self.health().await.readiness {
            Readiness::Ready { .. } => {}
            Readiness::Loading => return Err(SubmitError::NotReady),
            Readiness::Failed(e) => return Err(SubmitError::Unavailable(e)),
        }
        let waiting = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM flipsketch_jobs WHERE state = 'queued'",
        )
        .fetch_one(&self.pool)
        .await;
        let waiting = self.noted(waiting).map_err(|e| db_error(&e))?;
        if waiting as usize >= self.config.queue_capacity {
            return Err(SubmitError::QueueFull(self.config.queue_capacity));
        }
        Ok(())
    }

    async fn submit(&self, r: JobRequest) -> Result<String, SubmitError> {
        self.precheck().await?;
        let spec = validate_fields(&self.config, &r)?;
        // decoding is CPU work (off the async threads), at most a few at once
        let sketch = tokio::task::block_in_place(|| self.decodes.run(|| sketch_png(&r.sketch)))?;
        let id = new_id();
        let mut tx = self
            .noted(self.pool.begin().await)
            .map_err(|e| db_error(&e))?;
        let db = |e: sqlx::Error| db_error(&e);
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(QUEUE_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let waiting = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM flipsketch_jobs WHERE state = 'queued'",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if waiting as usize >= self.config.queue_capacity {
            return Err(SubmitError::QueueFull(self.config.queue_capacity));
        }
        sqlx::query(
            "INSERT INTO flipsketch_jobs (id, state, spec, sketch, steps, seed, max_attempts, \
             phase, variants, frames) VALUES ($1, 'queued', $2, $3, $4, $5, $6, 'queued', $7, $8)",
        )
        .bind(&id)
        .bind(serde_json::to_value(&spec).map_err(|e| SubmitError::Invalid(e.to_string()))?)
        .bind(&sketch)
        .bind(spec.steps as i32)
        .bind(spec.seed as i64)
        .bind(self.opts.max_attempts as i32)
        .bind(spec.variants as i32)
        .bind(spec.frames as i32)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(id)
    }

    async fn status(&self, id: &str) -> Lookup<JobView> {
        let Some(v) = self.view(id).await? else {
            return Ok(None);
        };
        self.seen(id).await;
        Ok(Some(v))
    }

    async fn watch(&self, id: &str) -> Lookup<watch::Receiver<JobView>> {
        let Some(view) = self.view(id).await? else {
            return Ok(None);
        };
        self.seen(id).await;
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let tx = w
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(view.clone()).0);
        tx.send_if_modified(|old| {
            let changed = old.version < view.version;
            if changed {
                *old = view.clone();
            }
            changed
        });
        Ok(Some(tx.subscribe()))
    }

    async fn touch(&self, id: &str) {
        self.seen(id).await;
    }

    async fn cancel(&self, id: &str) -> Lookup<(JobView, CancelOutcome)> {
        let queued = sqlx::query(
            "UPDATE flipsketch_jobs SET state = 'cancelled', phase = NULL, finished_at = now() \
             WHERE id = $1 AND state = 'queued' RETURNING id",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await;
        let outcome = if self.noted(queued).map_err(down)?.is_some() {
            CancelOutcome::Cancelled
        } else {
            // Read by the worker at its next renewal, and in the statement that ends the
            // job: an accepted cancel never ends `done`.
            let running = sqlx::query(
                "UPDATE flipsketch_jobs SET cancel_requested = true \
                 WHERE id = $1 AND state = 'running' RETURNING id",
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await;
            if self.noted(running).map_err(down)?.is_some() {
                CancelOutcome::Stopping
            } else {
                CancelOutcome::TooLate
            }
        };
        Ok(self.view(id).await?.map(|view| (view, outcome)))
    }

    async fn file(&self, id: &str, name: &str) -> Lookup<FileBody> {
        let row = sqlx::query(
            "SELECT result_attempt FROM flipsketch_jobs \
             WHERE id = $1 AND state = 'done' AND $2 = ANY(files)",
        )
        .bind(id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await;
        let Some(row) = self.noted(row).map_err(down)? else {
            return Ok(None);
        };
        let attempt: Option<i32> = row.get(0);
        let bytes = self
            .store
            .get(&self.pool, id, attempt.unwrap_or(0), name)
            .await
            .map_err(|e| Unavailable(format!("the job's files cannot be read: {e}")))?;
        Ok(bytes.map(FileBody::Bytes))
    }

    async fn retry_after_s(&self) -> u64 {
        let eta = sqlx::query_scalar::<_, Option<f64>>(
            "SELECT min(eta_s) FROM flipsketch_jobs WHERE state = 'running'",
        )
        .fetch_one(&self.pool)
        .await
        .ok()
        .flatten();
        eta.map_or(30, |e| e.ceil() as u64).clamp(5, 600)
    }

    fn shutdown(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}
