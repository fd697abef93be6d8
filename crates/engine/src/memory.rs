//! The in-process queue, the default of `flipsketch serve`: one inference thread owns the
//! model and runs jobs one at a time from a bounded queue; every job has a live status
//! (watchable), a cancel flag checked at every step, and its own output folder. Queued jobs
//! whose client has gone quiet are dropped; finished jobs and their files are removed after a
//! while. Nothing survives the process (use the PostgreSQL queue for that).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flipsketch_media::sketch::{sketch_input, Fit};
use flipsketch_pipeline::{Phase, Pipeline, PipelineError, Progress, Request, WorkPlan};
use tokio::sync::watch;

use crate::{
    new_id, panic_message, prepare_jobs_dir, progress_of, redact_paths, remove_dirs,
    validate_fields, write_outputs, CancelOutcome, DecodeGate, EngineConfig, FileBody, Health,
    JobPhase, JobQueue, JobRequest, JobStatus, JobView, Lookup, Outputs, Readiness, Stop,
    SubmitError,
};

struct Job {
    view: JobView,
    tx: watch::Sender<JobView>,
    cancel: Arc<AtomicBool>,
    last_seen: Instant,
    finished_at: Option<Instant>,
    dir: PathBuf,
    /// File names this job wrote; the only names `file` will serve.
    files: Vec<String>,
    /// Until a worker takes it: the pipeline request and its cost model.
    request: Option<(Request, WorkPlan)>,
}

struct State {
    readiness: Readiness,
    jobs: HashMap<String, Job>,
    queue: VecDeque<String>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    config: EngineConfig,
    decodes: DecodeGate,
}

/// Cheap to clone; all clones drive the same engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

type Loader = Box<dyn FnOnce() -> Result<Pipeline, String> + Send>;

impl Engine {
    /// Starts the inference thread, which first loads the model with `load`.
    /// The jobs folder is made ready first ([`prepare_jobs_dir`]): when it cannot be used the
    /// engine reports [`Readiness::Failed`] at once and loads nothing.
    pub fn start(config: EngineConfig, load: Loader) -> Self {
        let jobs = prepare_jobs_dir(&config.jobs_dir);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                readiness: Readiness::Loading,
                jobs: HashMap::new(),
                queue: VecDeque::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
            decodes: DecodeGate::new(&config),
            config,
        });
        match jobs {
            Ok(jobs_lock) => {
                let worker = shared.clone();
                std::thread::Builder::new()
                    .name("flipsketch-inference".into())
                    .spawn(move || worker_main(worker, load, jobs_lock))
                    .expect("spawning the inference thread");
            }
            Err(e) => {
                tracing::error!("{e}");
                lock(&shared).readiness = Readiness::Failed(redact_paths(&e));
            }
        }
        Self { shared }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    pub fn readiness(&self) -> Readiness {
        self.lock().readiness.clone()
    }

    /// Whether a job could be queued now: ready, and room in the queue; the model's image
    /// size.
    pub fn precheck(&self) -> Result<usize, SubmitError> {
        let image_size = match self.readiness() {
            Readiness::Loading => return Err(SubmitError::NotReady),
            Readiness::Failed(e) => return Err(SubmitError::LoadFailed(e)),
            Readiness::Ready { image_size, .. } => image_size,
        };
        let cap = self.shared.config.queue_capacity;
        if self.lock().queue.len() >= cap {
            return Err(SubmitError::QueueFull(cap));
        }
        Ok(image_size)
    }

    /// Seconds a client refused with a full queue should wait before trying again: until the
    /// running job is expected to end (at least 5 s, at most 10 minutes).
    pub fn retry_after_s(&self) -> u64 {
        let st = self.lock();
        let eta = st
            .jobs
            .values()
            .filter(|j| j.view.status == JobStatus::Running)
            .filter_map(|j| j.view.eta_s)
            .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.min(e))));
        eta.map_or(30, |e| e.ceil() as u64).clamp(5, 600)
    }

    /// Validates and queues a job (blocking: the sketch is decoded here, at most
    /// [`EngineConfig::decode_slots`] at once); returns its id. The queue and the model are
    /// checked before the sketch is decoded.
    pub fn submit(&self, r: JobRequest) -> Result<String, SubmitError> {
        let image_size = self.precheck()?;
        let spec = validate_fields(&self.shared.config, &r)?;
        let square = self
            .shared
            .decodes
            .run(|| sketch_input(&r.sketch, Path::new("sketch"), image_size as u32, Fit::Pad))
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let request = spec.request(&square).map_err(SubmitError::Invalid)?;
        let work = spec.work();
        let mut st = self.lock();
        let cap = self.shared.config.queue_capacity;
        if st.queue.len() >= cap {
            return Err(SubmitError::QueueFull(cap));
        }
        let id = new_id();
        let view = JobView {
            id: id.clone(),
            status: JobStatus::Queued,
            progress: 0.0,
            phase: Some(JobPhase::Queued),
            step: None,
            steps: Some(spec.steps),
            eta_s: None,
            queue_position: Some(st.queue.len()),
            seed: spec.seed,
            outputs: None,
            error: None,
            attempt: 0,
            version: 1,
        };
        let (tx, _) = watch::channel(view.clone());
        let dir = self.shared.config.jobs_dir.join(&id);
        st.jobs.insert(
            id.clone(),
            Job {
                view,
                tx,
                cancel: Arc::new(AtomicBool::new(false)),
                last_seen: Instant::now(),
                finished_at: None,
                dir,
                files: vec![],
                request: Some((request, work)),
            },
        );
        st.queue.push_back(id.clone());
        drop(st);
        self.shared.wake.notify_all();
        Ok(id)
    }

    /// The job's status, with its queue position; counts as the client still being there.
    pub fn status(&self, id: &str) -> Option<JobView> {
        let mut st = self.lock();
        let job = st.jobs.get_mut(id)?;
        job.last_seen = Instant::now();
        Some(job.view.clone())
    }

    /// Live updates of a job's status (the receiver starts with the current one).
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<JobView>> {
        let mut st = self.lock();
        let job = st.jobs.get_mut(id)?;
        job.last_seen = Instant::now();
        Some(job.tx.subscribe())
    }

    /// Tells the engine the client of `id` is still there (e.g. an open event stream).
    pub fn touch(&self, id: &str) {
        if let Some(job) = self.lock().jobs.get_mut(id) {
            job.last_seen = Instant::now();
        }
    }

    /// Cancels a queued or running job (a running one stops at its next step, or between the
    /// files it writes, and ends `cancelled`). Returns the view after the request and what the
    /// request did, or None for an unknown id.
    pub fn cancel(&self, id: &str) -> Option<(JobView, CancelOutcome)> {
        let mut st = self.lock();
        let status = st.jobs.get(id)?.view.status;
        let outcome = match status {
            JobStatus::Queued => {
                st.queue.retain(|q| q != id);
                finish(&mut st, id, JobStatus::Cancelled, None);
                update_queue_positions(&mut st);
                CancelOutcome::Cancelled
            }
            JobStatus::Running => {
                // Read by the worker when it ends the job, under this same lock: a job whose
                // cancel was accepted here never ends `done`.
                st.jobs.get(id)?.cancel.store(true, Ordering::SeqCst);
                CancelOutcome::Stopping
            }
            _ => CancelOutcome::TooLate,
        };
        Some((st.jobs.get(id)?.view.clone(), outcome))
    }

    /// The path of a file the job wrote, only if `name` is one of them.
    pub fn file(&self, id: &str, name: &str) -> Option<PathBuf> {
        let st = self.lock();
        let job = st.jobs.get(id)?;
        job.files
            .iter()
            .find(|f| f.as_str() == name)
            .map(|f| job.dir.join(f))
    }

    /// Stops the inference thread after the current job.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.shared.wake.notify_all();
    }
}

#[async_trait::async_trait]
impl JobQueue for Engine {
    fn config(&self) -> &EngineConfig {
        Engine::config(self)
    }

    async fn health(&self) -> Health {
        Health {
            readiness: self.readiness(),
            workers: None,
            queue: "memory",
        }
    }

    async fn precheck(&self) -> Result<(), SubmitError> {
        Engine::precheck(self).map(|_| ())
    }

    async fn submit(&self, r: JobRequest) -> Result<String, SubmitError> {
        // Decoding and resizing the sketch is CPU work: off the async threads.
        let engine = self.clone();
        tokio::task::spawn_blocking(move || Engine::submit(&engine, r))
            .await
            .map_err(|e| SubmitError::Invalid(format!("internal error: {e}")))?
    }

    async fn status(&self, id: &str) -> Lookup<JobView> {
        Ok(Engine::status(self, id))
    }

    async fn watch(&self, id: &str) -> Lookup<watch::Receiver<JobView>> {
        Ok(Engine::watch(self, id))
    }

    async fn touch(&self, id: &str) {
        Engine::touch(self, id)
    }

    async fn cancel(&self, id: &str) -> Lookup<(JobView, CancelOutcome)> {
        Ok(Engine::cancel(self, id))
    }

    async fn file(&self, id: &str, name: &str) -> Lookup<FileBody> {
        Ok(Engine::file(self, id, name).map(FileBody::Path))
    }

    async fn retry_after_s(&self) -> u64 {
        Engine::retry_after_s(self)
    }

    fn shutdown(&self) {
        Engine::shutdown(self)
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the job table half-updated in a way that
    // matters more than stopping the server; keep serving with what is there.
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends the job's view to its watchers, as a new version.
fn publish(job: &mut Job) {
    job.view.version += 1;
    job.tx.send_replace(job.view.clone());
}

fn finish(st: &mut State, id: &str, status: JobStatus, error: Option<String>) {
    if let Some(job) = st.jobs.get_mut(id) {
        job.view.status = status;
        job.view.error = error;
        job.view.phase = None;
        job.view.eta_s = None;
        job.view.queue_position = None;
        if status == JobStatus::Done {
            job.view.progress = 1.0;
        }
        job.finished_at = Some(Instant::now());
        job.request = None;
        publish(job);
    }
}

fn update_queue_positions(st: &mut State) {
    let order: Vec<String> = st.queue.iter().cloned().collect();
    for (pos, id) in order.iter().enumerate() {
        if let Some(job) = st.jobs.get_mut(id) {
            if job.view.queue_position != Some(pos) {
                job.view.queue_position = Some(pos);
                publish(job);
            }
        }
    }
}

/// Drops queued jobs whose client went away and forgets old finished jobs; returns the folders
/// of the forgotten jobs, for the caller to delete once the lock is released.
#[must_use]
fn housekeeping(st: &mut State, config: &EngineConfig) -> Vec<PathBuf> {
    let now = Instant::now();
    let stale: Vec<String> = st
        .queue
        .iter()
        .filter(|id| now.duration_since(st.jobs[*id].last_seen) > config.client_timeout)
        .cloned()
        .collect();
    for id in &stale {
        tracing::info!("job {id}: client gone, dropped from the queue");
        st.queue.retain(|q| q != id);
        finish(
            st,
            id,
            JobStatus::Cancelled,
            Some("the client went away before the job started".into()),
        );
    }
    if !stale.is_empty() {
        update_queue_positions(st);
    }
    let expired: Vec<String> = st
        .jobs
        .iter()
        .filter(|(_, j)| {
            j.finished_at
                .is_some_and(|t| now.duration_since(t) > config.keep_for)
        })
        .map(|(id, _)| id.clone())
        .collect();
    expired
        .into_iter()
        .filter_map(|id| st.jobs.remove(&id).map(|j| j.dir))
        .collect()
}

/// Progress of the running job, weighted by the pipeline's cost model.
struct JobProgress {
    shared: Arc<Shared>,
    id: String,
    cancel: Arc<AtomicBool>,
    started: Instant,
    work: WorkPlan,
    phase: Phase,
    /// [`EngineConfig::panic_marker`] matched this job's prompt.
    panics: bool,
}

impl Progress for JobProgress {
    fn phase(&mut self, phase: Phase, _total: usize) {
        self.phase = phase;
        self.advance(0);
    }

    fn inversion_cached(&mut self) {
        self.work = self.work.without_inversion();
    }

    fn advance(&mut self, done: usize) {
        if self.phase == Phase::Denoising && self.panics {
            panic!("failpoint: a panic inside the run");
        }
        let (p, eta) = progress_of(
            &self.work,
            self.phase,
            done,
            self.started.elapsed().as_secs_f64(),
        );
        let mut st = lock(&self.shared);
        // the queue is looked after while a job runs, too
        let gone = housekeeping(&mut st, &self.shared.config);
        if let Some(job) = st.jobs.get_mut(&self.id) {
            job.view.progress = p;
            job.view.eta_s = eta;
            job.view.phase = Some(self.phase.into());
            job.view.step =
                matches!(self.phase, Phase::Inversion | Phase::Denoising).then_some(done);
            publish(job);
        }
        drop(st);
        remove_dirs(gone);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// The inference thread; `_jobs_lock` keeps the jobs folder this process's while it runs.
fn worker_main(shared: Arc<Shared>, load: Loader, _jobs_lock: std::fs::File) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pipeline = match load() {
            Ok(p) => {
                lock(&shared).readiness = Readiness::Ready {
                    image_size: p.image_size(),
                    device: p.device_name(),
                    dtype: p.dtype_name(),
                };
                p
            }
            Err(e) => {
                tracing::error!("the model failed to load: {e}");
                lock(&shared).readiness = Readiness::Failed(redact_paths(&e));
                return;
            }
        };
        run_jobs(&shared, &pipeline);
    }));
    if let Err(p) = result {
        // Nothing runs jobs any more: say so, and end the jobs that would wait for good.
        let msg = format!("the inference thread stopped: {}", panic_message(&*p));
        tracing::error!("{msg}");
        let mut st = lock(&shared);
        st.readiness = Readiness::Failed(msg.clone());
        let open: Vec<String> = st
            .jobs
            .iter()
            .filter(|(_, j)| !j.view.status.is_final())
            .map(|(id, _)| id.clone())
            .collect();
        st.queue.clear();
        for id in open {
            finish(&mut st, &id, JobStatus::Failed, Some(msg.clone()));
        }
    }
}

fn run_jobs(shared: &Arc<Shared>, pipeline: &Pipeline) {
    loop {
        // 1. next job (housekeeping while waiting)
        let (id, (request, work), cancel, dir) = {
            let mut st = lock(shared);
            loop {
                let gone = housekeeping(&mut st, &shared.config);
                if !gone.is_empty() {
                    drop(st);
                    remove_dirs(gone);
                    st = lock(shared);
                    continue;
                }
                if st.shutdown {
                    return;
                }
                if let Some(id) = st.queue.pop_front() {
                    update_queue_positions(&mut st);
                    let job = st.jobs.get_mut(&id).expect("queued job exists");
                    let Some(request) = job.request.take() else {
                        continue;
                    };
                    job.view.status = JobStatus::Running;
                    job.view.queue_position = None;
                    job.view.phase = Some(JobPhase::Encoding);
                    job.view.attempt = 1;
                    publish(job);
                    break (id, request, job.cancel.clone(), job.dir.clone());
                }
                st = shared
                    .wake
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        // 2. its folder first: a jobs folder that became unwritable fails the job now, not
        //    after the inference
        let outcome = std::fs::create_dir_all(&dir)
            .map_err(|e| Stop::Failed(format!("cannot create the job's folder: {e}")))
            .and_then(|()| {
                // 3. run it and write the files; a panic fails this job, not the server
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_one(shared, pipeline, &id, &request, work, &cancel, &dir)
                }))
                .unwrap_or_else(|p| {
                    Err(Stop::Failed(format!(
                        "internal error: {}",
                        panic_message(&*p)
                    )))
                })
            });
        // 4. the end, decided under the lock that `cancel` takes: an accepted cancel wins
        let stopped = {
            let mut st = lock(shared);
            match outcome {
                Ok(names) if !cancel.load(Ordering::SeqCst) => {
                    if let Some(job) = st.jobs.get_mut(&id) {
                        job.view.outputs = Some(Outputs {
                            variants: request.variants,
                            frames: request.frames,
                        });
                        job.files = names;
                    }
                    finish(&mut st, &id, JobStatus::Done, None);
                    None
                }
                Ok(_) | Err(Stop::Cancelled) => Some((JobStatus::Cancelled, None)),
                Err(Stop::Failed(e)) => {
                    tracing::warn!("job {id} failed: {e}");
                    let shown = redact_paths(
                        &e.replace(&shared.config.jobs_dir.display().to_string(), "<jobs>"),
                    );
                    Some((JobStatus::Failed, Some(shown)))
                }
            }
        };
        // 5. a failed or cancelled job's files go at once (a full disk is freed for the next),
        // outside the lock, and before the job says it ended: whoever sees it cancelled or
        // failed finds no folder
        if let Some((status, error)) = stopped {
            remove_dirs(vec![dir]);
            finish(&mut lock(shared), &id, status, error);
        }
    }
}

/// Runs the pipeline for one job and writes its files; the names written.
fn run_one(
    shared: &Arc<Shared>,
    pipeline: &Pipeline,
    id: &str,
    request: &Request,
    work: WorkPlan,
    cancel: &Arc<AtomicBool>,
    dir: &Path,
) -> Result<Vec<String>, Stop> {
    let mut progress = JobProgress {
        shared: shared.clone(),
        id: id.to_string(),
        cancel: cancel.clone(),
        started: Instant::now(),
        work,
        phase: Phase::Encoding,
        panics: shared
            .config
            .panic_marker
            .as_deref()
            .is_some_and(|m| request.prompt.contains(m)),
    };
    let out = pipeline.run(request, &mut progress).map_err(|e| match e {
        PipelineError::Cancelled => Stop::Cancelled,
        other => Stop::Failed(other.to_string()),
    })?;
    {
        let mut st = lock(shared);
        if let Some(job) = st.jobs.get_mut(id) {
            job.view.phase = Some(JobPhase::Writing);
            publish(job);
        }
    }
    write_outputs(&shared.config, dir, &out.video, cancel)
}
