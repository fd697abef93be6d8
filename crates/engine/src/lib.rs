//! The job engine behind `flipsketch serve`: one inference thread owns the model and runs jobs
//! one at a time from a bounded queue; every job has a live status (watchable), a cancel flag
//! checked at every denoising step, and its own output folder. Queued jobs whose client has
//! gone quiet are dropped; finished jobs and their files are removed after a while.
//!
//! The API speaks plain Rust and serde types (no tensors), so the HTTP layer never touches
//! candle.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use flipsketch_media::sketch::{fit_square, on_white, to_chw_f32, Fit};
use flipsketch_media::writers::{write_variant, Format, Playback};
use flipsketch_pipeline::{
    video_to_frames, Encode, Phase, Pipeline, PipelineError, Progress, Request,
};
use serde::Serialize;
use tokio::sync::watch;

/// Ranges a job request must respect.
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    pub variants_max: usize,
    pub frames_max: usize,
    pub steps_max: usize,
    pub upload_max_bytes: usize,
}

/// Values used for fields a request leaves out.
#[derive(Clone, Debug, Serialize)]
pub struct Defaults {
    pub variants: usize,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f64,
    pub lambda: f64,
    pub tau: i64,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Jobs waiting at most (the running one not counted).
    pub queue_capacity: usize,
    /// Each job writes into `jobs_dir/<id>/`.
    pub jobs_dir: PathBuf,
    /// Finished jobs and their files are removed after this long.
    pub keep_for: Duration,
    /// A queued job not asked about for this long is dropped (its client is gone).
    pub client_timeout: Duration,
    /// Side of the written GIF frames.
    pub output_size: u32,
    pub fps: u32,
    pub limits: Limits,
    pub defaults: Defaults,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 8,
            jobs_dir: std::env::temp_dir().join(format!("flipsketch-serve-{}", std::process::id())),
            keep_for: Duration::from_secs(3600),
            client_timeout: Duration::from_secs(30),
            output_size: 512,
            fps: 10,
            limits: Limits {
                variants_max: 8,
                frames_max: 24,
                steps_max: 100,
                upload_max_bytes: 16 << 20,
            },
            defaults: Defaults {
                variants: 3,
                frames: 10,
                steps: 25,
                guidance: 9.0,
                lambda: 0.5,
                tau: 15,
            },
        }
    }
}

/// A job as submitted (fields left out take the defaults).
#[derive(Clone, Debug, Default)]
pub struct JobRequest {
    /// The sketch image file's bytes (PNG, JPEG, WebP, BMP, GIF).
    pub sketch: Vec<u8>,
    pub prompt: String,
    pub variants: Option<usize>,
    pub frames: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub lambda: Option<f64>,
    pub seed: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// The files of one variant, as URLs relative to the server root.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VariantFiles {
    pub gif: String,
    pub gif_raw: String,
    /// Animated PNG on transparent paper.
    pub apng: String,
    pub mp4: String,
    /// Sprite sheet and its frame rectangles.
    pub sheet: String,
    pub sheet_json: String,
    /// Animated SVG of the traced frames.
    pub svg: String,
    /// Numbered PNG frames.
    pub frames: Vec<String>,
}

/// What a client sees of a job.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub progress: f64,
    pub phase: Option<&'static str>,
    pub step: Option<usize>,
    pub steps: Option<usize>,
    pub eta_s: Option<f64>,
    pub queue_position: Option<usize>,
    pub seed: u64,
    pub results: Vec<VariantFiles>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the model is still loading")]
    NotReady,
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    #[error("the queue is full ({0} jobs waiting); try again later")]
    QueueFull(usize),
    #[error("{0}")]
    Invalid(String),
}

/// Engine-wide state as the health check and the page see it.
#[derive(Clone, Debug, PartialEq)]
pub enum Readiness {
    Loading,
    /// `device`: where the model runs ("cpu", "cuda", "metal").
    Ready {
        image_size: usize,
        device: &'static str,
    },
    Failed(String),
}

struct Job {
    view: JobView,
    tx: watch::Sender<JobView>,
    cancel: Arc<AtomicBool>,
    last_seen: Instant,
    finished_at: Option<Instant>,
    dir: PathBuf,
    /// File names this job wrote; the only names `file` will serve.
    files: Vec<String>,
    request: Option<Request>,
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
}

/// Cheap to clone; all clones drive the same engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

type Loader = Box<dyn FnOnce() -> Result<Pipeline, String> + Send>;

fn new_id() -> String {
    let a: u128 = rand::random();
    format!("{a:032x}")
}

impl Engine {
    /// Starts the inference thread, which first loads the model with `load`.
    pub fn start(config: EngineConfig, load: Loader) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                readiness: Readiness::Loading,
                jobs: HashMap::new(),
                queue: VecDeque::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
            config,
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("flipsketch-inference".into())
            .spawn(move || worker_main(worker, load))
            .expect("spawning the inference thread");
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

    /// Validates and queues a job; returns its id.
    pub fn submit(&self, r: JobRequest) -> Result<String, SubmitError> {
        let image_size = match self.readiness() {
            Readiness::Loading => return Err(SubmitError::NotReady),
            Readiness::Failed(e) => return Err(SubmitError::LoadFailed(e)),
            Readiness::Ready { image_size, .. } => image_size,
        };
        let request = self.validate(&r, image_size)?;
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
            phase: Some("queued"),
            step: None,
            steps: Some(request.steps),
            eta_s: None,
            queue_position: Some(st.queue.len()),
            seed: request.seed,
            results: vec![],
            error: None,
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
                request: Some(request),
            },
        );
        st.queue.push_back(id.clone());
        drop(st);
        self.shared.wake.notify_all();
        Ok(id)
    }

    fn validate(&self, r: &JobRequest, image_size: usize) -> Result<Request, SubmitError> {
        let c = &self.shared.config;
        let bad = |m: String| Err(SubmitError::Invalid(m));
        if r.prompt.trim().is_empty() {
            return bad("prompt is empty: say how the sketch should move".into());
        }
        if r.prompt.chars().count() > 1000 {
            return bad("prompt is longer than 1000 characters".into());
        }
        let variants = r.variants.unwrap_or(c.defaults.variants);
        let frames = r.frames.unwrap_or(c.defaults.frames);
        let steps = r.steps.unwrap_or(c.defaults.steps);
        let guidance = r.guidance.unwrap_or(c.defaults.guidance);
        let lambda = r.lambda.unwrap_or(c.defaults.lambda);
        if !(1..=c.limits.variants_max).contains(&variants) {
            return bad(format!(
                "variants must be between 1 and {}, got {variants}",
                c.limits.variants_max
            ));
        }
        if !(1..=c.limits.frames_max).contains(&frames) {
            return bad(format!(
                "frames must be between 1 and {}, got {frames}",
                c.limits.frames_max
            ));
        }
        if !(1..=c.limits.steps_max).contains(&steps) {
            return bad(format!(
                "steps must be between 1 and {}, got {steps}",
                c.limits.steps_max
            ));
        }
        if !guidance.is_finite() || !(0.0..=50.0).contains(&guidance) {
            return bad(format!("guidance must be between 0 and 50, got {guidance}"));
        }
        if !lambda.is_finite() || !(0.0..=10.0).contains(&lambda) {
            return bad(format!("lambda must be between 0 and 10, got {lambda}"));
        }
        if r.sketch.is_empty() {
            return bad("sketch is missing or empty".into());
        }
        let img = flipsketch_media::sketch::decode(&r.sketch, std::path::Path::new("sketch"))
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let square = fit_square(&on_white(&img), image_size as u32, Fit::Pad);
        let image = Tensor::from_vec(
            to_chw_f32(&square),
            (3, image_size, image_size),
            &Device::Cpu,
        )
        .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let seed = r.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
        Ok(Request {
            image,
            prompt: r.prompt.clone(),
            variants,
            frames,
            steps,
            guidance,
            lambda,
            tau: c.defaults.tau,
            seed,
            init_noise: None,
            encode: Encode::SampleSeeded,
        })
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

    /// Cancels a queued or running job (a running one stops at its next step). Returns the
    /// view after the request, or None for an unknown id.
    pub fn cancel(&self, id: &str) -> Option<JobView> {
        let mut st = self.lock();
        let status = st.jobs.get(id)?.view.status;
        match status {
            JobStatus::Queued => {
                st.queue.retain(|q| q != id);
                finish(&mut st, id, JobStatus::Cancelled, None);
                update_queue_positions(&mut st);
            }
            JobStatus::Running => {
                st.jobs.get(id)?.cancel.store(true, Ordering::SeqCst);
            }
            _ => {}
        }
        Some(st.jobs.get(id)?.view.clone())
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

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the job table half-updated in a way that
    // matters more than stopping the server; keep serving with what is there.
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn publish(job: &mut Job) {
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

/// Drops queued jobs whose client went away and removes old finished jobs with their files.
fn housekeeping(st: &mut State, config: &EngineConfig) {
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
    for id in expired {
        if let Some(job) = st.jobs.remove(&id) {
            if job.dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&job.dir) {
                    tracing::warn!("cannot remove {}: {e}", job.dir.display());
                }
            }
        }
    }
}

/// Progress of the running job, weighted by UNet frame-evaluations.
struct JobProgress {
    shared: Arc<Shared>,
    id: String,
    cancel: Arc<AtomicBool>,
    started: Instant,
    /// Work units before each phase, and per unit of each phase.
    variants: usize,
    frames: usize,
    steps: usize,
    tau: i64,
    phase: Phase,
    total: f64,
}

impl JobProgress {
    fn units_before(&self, phase: Phase, done: usize) -> f64 {
        let (b, f, s) = (self.variants as f64, self.frames as f64, self.steps as f64);
        let inversion = 5.0 * s;
        let denoise_step = |i: usize| {
            let cc = self.frames.saturating_sub(i).max(1) as f64;
            2.0 * b * f + if (i as i64) <= self.tau { cc } else { 0.0 }
        };
        let denoise_total: f64 = (0..self.steps).map(denoise_step).sum();
        match phase {
            Phase::Encoding => done as f64,
            Phase::Inversion => 1.0 + 5.0 * done as f64,
            Phase::Denoising => 1.0 + inversion + (0..done).map(denoise_step).sum::<f64>(),
            // decoding a frame costs about a tenth of a UNet frame here
            Phase::Decoding => 1.0 + inversion + denoise_total + 0.1 * done as f64,
        }
    }
}

impl Progress for JobProgress {
    fn phase(&mut self, phase: Phase, _total: usize) {
        self.phase = phase;
        self.advance(0);
    }

    fn advance(&mut self, done: usize) {
        let p = (self.units_before(self.phase, done) / self.total).clamp(0.0, 0.99);
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = (p > 0.02).then(|| elapsed * (1.0 - p) / p);
        let mut st = lock(&self.shared);
        // the queue is looked after while a job runs, too
        housekeeping(&mut st, &self.shared.config);
        if let Some(job) = st.jobs.get_mut(&self.id) {
            job.view.progress = p;
            job.view.eta_s = eta;
            job.view.phase = Some(match self.phase {
                Phase::Encoding => "encoding",
                Phase::Inversion => "inversion",
                Phase::Denoising => "denoising",
                Phase::Decoding => "decoding",
            });
            job.view.step =
                matches!(self.phase, Phase::Inversion | Phase::Denoising).then_some(done);
            publish(job);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

fn worker_main(shared: Arc<Shared>, load: Loader) {
    let pipeline = match load() {
        Ok(p) => {
            lock(&shared).readiness = Readiness::Ready {
                image_size: p.image_size(),
                device: p.device_name(),
            };
            p
        }
        Err(e) => {
            tracing::error!("the model failed to load: {e}");
            lock(&shared).readiness = Readiness::Failed(e);
            return;
        }
    };
    loop {
        // 1. next job (housekeeping while waiting)
        let (id, request, cancel, dir) = {
            let mut st = lock(&shared);
            loop {
                housekeeping(&mut st, &shared.config);
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
                    job.view.phase = Some("encoding");
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
        // 2. run it
        let mut progress = JobProgress {
            shared: shared.clone(),
            id: id.clone(),
            cancel,
            started: Instant::now(),
            variants: request.variants,
            frames: request.frames,
            steps: request.steps,
            tau: request.tau,
            phase: Phase::Encoding,
            total: 1.0,
        };
        progress.total = progress.units_before(Phase::Decoding, request.variants * request.frames);
        let result = pipeline.run(&request, &mut progress).map_err(|e| match e {
            PipelineError::Cancelled => None,
            other => Some(other.to_string()),
        });
        // 3. write the files
        let outcome = result.and_then(|out| {
            {
                let mut st = lock(&shared);
                if let Some(job) = st.jobs.get_mut(&id) {
                    job.view.phase = Some("writing");
                    publish(job);
                }
            }
            write_outputs(&shared.config, &dir, &out.video).map_err(Some)
        });
        let mut st = lock(&shared);
        match outcome {
            Ok(names) => {
                if let Some(job) = st.jobs.get_mut(&id) {
                    job.view.results = (0..request.variants)
                        .map(|k| {
                            let url = |name: String| format!("/api/jobs/{id}/files/{name}");
                            VariantFiles {
                                gif: url(format!("variant-{k}.gif")),
                                gif_raw: url(format!("variant-{k}-raw.gif")),
                                apng: url(format!("variant-{k}.png")),
                                mp4: url(format!("variant-{k}.mp4")),
                                sheet: url(format!("variant-{k}-sheet.png")),
                                sheet_json: url(format!("variant-{k}-sheet.json")),
                                svg: url(format!("variant-{k}.svg")),
                                frames: (0..request.frames)
                                    .map(|i| url(format!("variant-{k}-{i:03}.png")))
                                    .collect(),
                            }
                        })
                        .collect();
                    job.files = names;
                }
                finish(&mut st, &id, JobStatus::Done, None);
            }
            Err(None) => finish(&mut st, &id, JobStatus::Cancelled, None),
            Err(Some(e)) => {
                tracing::warn!("job {id} failed: {e}");
                finish(&mut st, &id, JobStatus::Failed, Some(e));
            }
        }
    }
}

/// What every job writes (the page offers each for download).
const SERVED_FORMATS: &[Format] = &[
    Format::Gif,
    Format::GifRaw,
    Format::Apng,
    Format::Mp4,
    Format::Sheet,
    Format::Svg,
    Format::Png,
];

fn write_outputs(
    config: &EngineConfig,
    dir: &std::path::Path,
    video: &Tensor,
) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for (k, frames) in video_to_frames(video)
        .map_err(|e| e.to_string())?
        .iter()
        .enumerate()
    {
        let paths = write_variant(
            dir,
            k,
            frames,
            SERVED_FORMATS,
            config.output_size,
            Playback::forever(config.fps),
            true,
        )
        .map_err(|e| e.to_string())?;
        names.extend(
            paths
                .iter()
                .filter_map(|p| p.file_name()?.to_str().map(String::from)),
        );
    }
    Ok(names)
}
