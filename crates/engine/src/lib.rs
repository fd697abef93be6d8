//! The job engine behind `flipsketch serve`: one inference thread owns the model and runs jobs
//! one at a time from a bounded queue; every job has a live status (watchable), a cancel flag
//! checked at every denoising step, and its own output folder. Queued jobs whose client has
//! gone quiet are dropped; finished jobs and their files are removed after a while.
//!
//! The API speaks plain Rust and serde types (no tensors), so the HTTP layer never touches
//! candle.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use flipsketch_media::sketch::{sketch_input, to_chw_f32, Fit};
use flipsketch_media::writers::{write_variant, Format, Playback, STAGING_PREFIX};
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
    /// Uploaded sketches decoded at once at most (each takes up to 160 MB while it decodes);
    /// further submissions wait for a slot.
    pub decode_slots: usize,
    /// Called with `true` before an upload is decoded and `false` after: the binary's
    /// allocator keeps freed memory for reuse, and hands it back to the system while a decode
    /// runs, so that an upload's transient memory does not stay.
    pub decode_hook: Option<fn(bool)>,
    /// Fault injection for tests: a job whose prompt contains this text panics in the middle
    /// of its run. `None` (the default, and always in release builds of the binary).
    #[doc(hidden)]
    pub panic_marker: Option<String>,
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
            decode_slots: 2,
            decode_hook: None,
            panic_marker: None,
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
    /// The status as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

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

/// What a cancel request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was waiting: it is cancelled now.
    Cancelled,
    /// The job is running: it stops at its next step (or between the files it writes) and
    /// ends `cancelled`; whatever it wrote is removed.
    Stopping,
    /// The job had already ended (done, failed or cancelled): nothing changed.
    TooLate,
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
    /// Decodes running now, and the wait for a free slot.
    decodes: Mutex<usize>,
    decode_freed: Condvar,
}

/// One of [`EngineConfig::decode_slots`], given back when dropped.
struct DecodeSlot<'a>(&'a Shared);

impl Drop for DecodeSlot<'_> {
    fn drop(&mut self) {
        *self.0.decodes.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.decode_freed.notify_one();
    }
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
            config,
            decodes: Mutex::new(0),
            decode_freed: Condvar::new(),
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

    /// Whether a job could be queued now (the model is ready and the queue has room): what
    /// `submit` checks first, cheap enough to ask before reading an upload. Returns the model's
    /// image size.
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

    fn decode_slot(&self) -> DecodeSlot<'_> {
        let sh = &*self.shared;
        let mut n = sh.decodes.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= sh.config.decode_slots.max(1) {
            n = sh.decode_freed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        DecodeSlot(sh)
    }

    /// Validates and queues a job; returns its id. The queue and the model are checked before
    /// the sketch is decoded, and at most [`EngineConfig::decode_slots`] sketches decode at once.
    pub fn submit(&self, r: JobRequest) -> Result<String, SubmitError> {
        let image_size = self.precheck()?;
        let request = {
            let _slot = self.decode_slot();
            let hook = self.shared.config.decode_hook;
            if let Some(h) = hook {
                h(true);
            }
            let request = self.validate(&r, image_size);
            if let Some(h) = hook {
                h(false);
            }
            request?
        };
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
        if !has_visible_text(&r.prompt) {
            return bad(if r.prompt.trim().is_empty() {
                "prompt is empty: say how the sketch should move".into()
            } else {
                "prompt has no visible characters (only spaces, control or zero-width \
                 characters): say how the sketch should move"
                    .into()
            });
        }
        if r.prompt.chars().count() > 1000 {
            return bad("prompt is longer than 1000 characters".into());
        }
        let variants = r.variants.unwrap_or(c.defaults.variants);
        let frames = r.frames.unwrap_or(c.defaults.frames);
        let steps = r.steps.unwrap_or(c.defaults.steps);
        let guidance = r.guidance.unwrap_or(c.defaults.guidance);
        let lambda = r.lambda.unwrap_or(c.defaults.lambda);
        for (name, v, max) in [
            ("variants", variants, c.limits.variants_max),
            ("frames", frames, c.limits.frames_max),
            ("steps", steps, c.limits.steps_max),
        ] {
            if !(1..=max).contains(&v) {
                return bad(format!("{name} must be between 1 and {max}, got {v}"));
            }
        }
        if !guidance.is_finite() || !(0.0..=50.0).contains(&guidance) {
            return bad(format!(
                "guidance must be between 0 and 50, got {}",
                short_number(guidance)
            ));
        }
        if !lambda.is_finite() || !(0.0..=10.0).contains(&lambda) {
            return bad(format!(
                "lambda must be between 0 and 10, got {}",
                short_number(lambda)
            ));
        }
        if r.sketch.is_empty() {
            return bad("sketch is missing or empty".into());
        }
        let square = sketch_input(&r.sketch, Path::new("sketch"), image_size as u32, Fit::Pad)
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
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

/// Whether `text` has a character that is neither white space nor a control or format
/// (zero-width) character: what the tokenizer would not drop.
fn has_visible_text(text: &str) -> bool {
    text.chars()
        .any(|c| !c.is_whitespace() && !c.is_control() && !is_format_char(c))
}

/// Unicode format characters (category Cf) that render as nothing: zero-width space, joiners,
/// marks, the BOM, invisible operators, tags.
fn is_format_char(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// A number as a person reads it in an error: at most 6 significant digits (`1e308`, not 309
/// digits).
pub fn short_number(x: f64) -> String {
    if x != 0.0 && (x.abs() >= 1e6 || x.abs() < 1e-4) {
        format!("{x:.3e}")
    } else {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Absolute paths in a message for clients, cut to their last component (`.../unet`): the
/// server's folders are not the client's business.
pub fn redact_paths(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find('/') {
        let starts_word = i == 0
            || rest[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_whitespace() || "(\"'=:[".contains(c));
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || "\"'(),;]".contains(c))
            .map_or(rest.len(), |e| i + e);
        let path = &rest[i..end];
        out.push_str(&rest[..i]);
        if starts_word && path.matches('/').count() >= 2 {
            let trimmed = path.trim_end_matches(['/', ':', '.']);
            let tail = &path[trimmed.len()..];
            let last = trimmed.rsplit('/').next().unwrap_or("");
            out.push_str(".../");
            out.push_str(last);
            out.push_str(tail);
        } else {
            out.push_str(path);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
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

/// Deletes job folders (outside the lock: this is file-system work).
fn remove_dirs(dirs: Vec<PathBuf>) {
    for dir in dirs {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", dir.display());
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
    /// [`EngineConfig::panic_marker`] matched this job's prompt.
    panics: bool,
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
        if self.phase == Phase::Denoising && self.panics {
            panic!("failpoint: a panic inside the run");
        }
        let p = (self.units_before(self.phase, done) / self.total).clamp(0.0, 0.99);
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = (p > 0.02).then(|| elapsed * (1.0 - p) / p);
        let mut st = lock(&self.shared);
        // the queue is looked after while a job runs, too
        let gone = housekeeping(&mut st, &self.shared.config);
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
        drop(st);
        remove_dirs(gone);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// The text of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Makes the jobs folder ready before anything else: created, writable (a probe file is
/// written and removed), taken by this process alone (an flock'ed `.lock` file, held for the
/// returned file's lifetime), and cleared of the job folders and partial files that no live job
/// owns (left by a process that was killed or stopped).
fn prepare_jobs_dir(dir: &Path) -> Result<std::fs::File, String> {
    let what = |e: std::io::Error| format!("jobs folder {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(what)?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"flipsketch")
        .map_err(|e| format!("jobs folder {} is not writable: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let lock_path = dir.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(what)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(format!(
                "jobs folder {} is in use by another flipsketch serve",
                dir.display()
            ));
        }
    }
    let mut removed = 0;
    for e in std::fs::read_dir(dir).map_err(what)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_job = name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if is_job || name.starts_with(STAGING_PREFIX) {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) => removed += 1,
                Err(err) => tracing::warn!("cannot remove {}: {err}", p.display()),
            }
        }
    }
    if removed > 0 {
        tracing::info!("removed {removed} job folder(s) left in {}", dir.display());
    }
    Ok(lock)
}

/// The inference thread; `_jobs_lock` keeps the jobs folder this process's while it runs.
fn worker_main(shared: Arc<Shared>, load: Loader, _jobs_lock: std::fs::File) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
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

/// Why a job stopped before it was done.
enum Stop {
    Cancelled,
    Failed(String),
}

fn run_jobs(shared: &Arc<Shared>, pipeline: &Pipeline) {
    loop {
        // 1. next job (housekeeping while waiting)
        let (id, request, cancel, dir) = {
            let mut st = lock(shared);
            let claimed = loop {
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
                    job.view.phase = Some("encoding");
                    publish(job);
                    break (id, request, job.cancel.clone(), job.dir.clone());
                }
                st = shared
                    .wake
                    .wait_timeout(st, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            };
            claimed
        };
        // 2. its folder first: a jobs folder that became unwritable fails the job now, not
        //    after the inference
        let outcome = std::fs::create_dir_all(&dir)
            .map_err(|e| Stop::Failed(format!("cannot create the job's folder: {e}")))
            .and_then(|()| {
                // 3. run it and write the files; a panic fails this job, not the server
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_one(shared, pipeline, &id, &request, &cancel, &dir)
                }))
                .unwrap_or_else(|p| {
                    Err(Stop::Failed(format!(
                        "internal error: {}",
                        panic_message(&*p)
                    )))
                })
            });
        // 4. the end, decided under the lock that `cancel` takes: an accepted cancel wins
        let keep = {
            let mut st = lock(shared);
            match outcome {
                Ok(names) if !cancel.load(Ordering::SeqCst) => {
                    if let Some(job) = st.jobs.get_mut(&id) {
                        job.view.results = result_urls(&id, request.variants, request.frames);
                        job.files = names;
                    }
                    finish(&mut st, &id, JobStatus::Done, None);
                    true
                }
                Ok(_) | Err(Stop::Cancelled) => {
                    finish(&mut st, &id, JobStatus::Cancelled, None);
                    false
                }
                Err(Stop::Failed(e)) => {
                    tracing::warn!("job {id} failed: {e}");
                    let shown = redact_paths(
                        &e.replace(&shared.config.jobs_dir.display().to_string(), "<jobs>"),
                    );
                    finish(&mut st, &id, JobStatus::Failed, Some(shown));
                    false
                }
            }
        };
        // 5. a failed or cancelled job's files go at once (a full disk is freed for the next)
        if !keep {
            remove_dirs(vec![dir]);
        }
    }
}

/// Runs the pipeline for one job and writes its files; the names written.
fn run_one(
    shared: &Arc<Shared>,
    pipeline: &Pipeline,
    id: &str,
    request: &Request,
    cancel: &Arc<AtomicBool>,
    dir: &Path,
) -> Result<Vec<String>, Stop> {
    let mut progress = JobProgress {
        shared: shared.clone(),
        id: id.to_string(),
        cancel: cancel.clone(),
        started: Instant::now(),
        variants: request.variants,
        frames: request.frames,
        steps: request.steps,
        tau: request.tau,
        phase: Phase::Encoding,
        total: 1.0,
        panics: shared
            .config
            .panic_marker
            .as_deref()
            .is_some_and(|m| request.prompt.contains(m)),
    };
    progress.total = progress.units_before(Phase::Decoding, request.variants * request.frames);
    let out = pipeline.run(request, &mut progress).map_err(|e| match e {
        PipelineError::Cancelled => Stop::Cancelled,
        other => Stop::Failed(other.to_string()),
    })?;
    {
        let mut st = lock(shared);
        if let Some(job) = st.jobs.get_mut(id) {
            job.view.phase = Some("writing");
            publish(job);
        }
    }
    write_outputs(&shared.config, dir, &out.video, cancel)
}

/// The URLs of the files a done job offers, per variant.
fn result_urls(id: &str, variants: usize, frames: usize) -> Vec<VariantFiles> {
    (0..variants)
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
                frames: (0..frames)
                    .map(|i| url(format!("variant-{k}-{i:03}.png")))
                    .collect(),
            }
        })
        .collect()
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
    cancel: &AtomicBool,
) -> Result<Vec<String>, Stop> {
    let failed = |e: String| Stop::Failed(e);
    let mut names = Vec::new();
    for (k, frames) in video_to_frames(video)
        .map_err(|e| failed(e.to_string()))?
        .iter()
        .enumerate()
    {
        // a cancel is honoured between the variants' files too
        if cancel.load(Ordering::SeqCst) {
            return Err(Stop::Cancelled);
        }
        let paths = write_variant(
            dir,
            k,
            frames,
            SERVED_FORMATS,
            config.output_size,
            Playback::forever(config.fps),
            true,
        )
        .map_err(|e| failed(e.to_string()))?;
        names.extend(
            paths
                .iter()
                .filter_map(|p| p.file_name()?.to_str().map(String::from)),
        );
    }
    Ok(names)
}
