//! Jobs behind `flipsketch serve`: the types the HTTP layer speaks, the one queue interface it
//! talks to ([`JobQueue`]), and what every implementation of it shares (validation, progress,
//! writing the outputs, the jobs folder). Two implementations: the in-process [`Engine`]
//! (one inference thread, a bounded in-memory queue; the default) and the PostgreSQL queue of
//! `flipsketch-pgqueue` (any number of workers on any machines).
//!
//! The API speaks plain Rust and serde types (no tensors), so the HTTP layer never touches
//! candle.

pub mod memory;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use candle_core::{Device, Tensor};
use flipsketch_media::sketch::to_chw_f32;
use flipsketch_media::writers::{write_variant, Format, Playback, STAGING_PREFIX};
use flipsketch_pipeline::{video_to_frames, Encode, Phase, Request};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use memory::Engine;

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
    /// Jobs waiting at most (the running ones not counted).
    pub queue_capacity: usize,
    /// Each job writes into `jobs_dir/<id>/` (in-process; a worker's scratch folder).
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

/// A job's settings once validated, defaults filled in: what a worker runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub prompt: String,
    pub variants: usize,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f64,
    pub lambda: f64,
    pub tau: i64,
    pub seed: u64,
}

impl JobSpec {
    /// The pipeline request for this job with its sketch as the model input `square`.
    pub fn request(&self, square: &image::RgbImage) -> Result<Request, String> {
        let (w, h) = square.dimensions();
        let image = Tensor::from_vec(
            to_chw_f32(square),
            (3, h as usize, w as usize),
            &Device::Cpu,
        )
        .map_err(|e| e.to_string())?;
        Ok(Request {
            image,
            prompt: self.prompt.clone(),
            variants: self.variants,
            frames: self.frames,
            steps: self.steps,
            guidance: self.guidance,
            lambda: self.lambda,
            tau: self.tau,
            seed: self.seed,
            init_noise: None,
            encode: Encode::SampleSeeded,
        })
    }

    /// The cost model of this job's run (what progress and time left are weighted by).
    pub fn work(&self) -> flipsketch_pipeline::WorkPlan {
        flipsketch_pipeline::WorkPlan::new(self.variants, self.frames, self.steps, self.tau)
    }
}

/// Checks a request's fields (not its sketch) and fills in the defaults.
pub fn validate_fields(c: &EngineConfig, r: &JobRequest) -> Result<JobSpec, SubmitError> {
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
    Ok(JobSpec {
        prompt: r.prompt.clone(),
        variants,
        frames,
        steps,
        guidance,
        lambda,
        tau: c.defaults.tau,
        seed: r.seed.unwrap_or_else(|| rand::random::<u32>() as u64),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

    pub fn parse(s: &str) -> Option<Self> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Done,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// What a job is doing: waiting, one of the pipeline's phases, or writing its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobPhase {
    Queued,
    Encoding,
    Inversion,
    Denoising,
    Decoding,
    Writing,
}

impl JobPhase {
    /// The phase as the API spells it (the page shows these).
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Queued => "queued",
            JobPhase::Encoding => "encoding",
            JobPhase::Inversion => "inversion",
            JobPhase::Denoising => "denoising",
            JobPhase::Decoding => "decoding",
            JobPhase::Writing => "writing",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            JobPhase::Queued,
            JobPhase::Encoding,
            JobPhase::Inversion,
            JobPhase::Denoising,
            JobPhase::Decoding,
            JobPhase::Writing,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

impl From<Phase> for JobPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Encoding => JobPhase::Encoding,
            Phase::Inversion => JobPhase::Inversion,
            Phase::Denoising => JobPhase::Denoising,
            Phase::Decoding => JobPhase::Decoding,
        }
    }
}

/// What a done job wrote: every served format of `variants` animations of `frames` frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outputs {
    pub variants: usize,
    pub frames: usize,
}

/// What a client sees of a job (the server turns it into the API's JSON).
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub progress: f64,
    pub phase: Option<JobPhase>,
    pub step: Option<usize>,
    pub steps: Option<usize>,
    pub eta_s: Option<f64>,
    pub queue_position: Option<usize>,
    pub seed: u64,
    /// Set once the job is done.
    pub outputs: Option<Outputs>,
    pub error: Option<String>,
    /// How many times a worker has taken the job (0 while it first waits).
    pub attempt: u32,
    /// Grows at every change: the event id of the server's event stream.
    pub version: u64,
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
    /// The queue's store cannot be reached (PostgreSQL down); the message says which.
    #[error("{0}")]
    Unavailable(String),
}

/// The queue's store cannot be reached (PostgreSQL down): whether a job exists is unknown, so
/// a lookup says so (503) instead of "no such job" (404).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// What a lookup of a job finds: `Ok(None)` when there is no such job.
pub type Lookup<T> = Result<Option<T>, Unavailable>;

/// Engine-wide state as the health check and the page see it.
#[derive(Clone, Debug, PartialEq)]
pub enum Readiness {
    Loading,
    /// `device`: where the model runs ("cpu", "cuda", "metal"); `dtype`: its precision
    /// ("f32", "bf16").
    Ready {
        image_size: usize,
        device: &'static str,
        dtype: &'static str,
    },
    Failed(String),
}

/// The workers of a shared queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Workers {
    /// Workers that reported within their heartbeat time.
    pub alive: usize,
    /// Alive workers per device ("cpu", "cuda", "metal").
    pub devices: BTreeMap<String, usize>,
    /// Alive workers per precision ("f32", "bf16").
    pub dtypes: BTreeMap<String, usize>,
    /// Alive workers busy with a job.
    pub busy: usize,
}

/// What `/healthz` and `/api/info` say.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub readiness: Readiness,
    /// `Some` for a shared queue (PostgreSQL), `None` in-process.
    pub workers: Option<Workers>,
    /// "memory" or "postgres".
    pub queue: &'static str,
}

/// Where a job's file is.
pub enum FileBody {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// The one interface between the HTTP layer and whatever runs the jobs.
#[async_trait::async_trait]
pub trait JobQueue: Send + Sync + 'static {
    fn config(&self) -> &EngineConfig;
    async fn health(&self) -> Health;
    /// Whether a job could be queued now (ready, room in the queue): cheap, asked before an
    /// upload is read.
    async fn precheck(&self) -> Result<(), SubmitError>;
    /// Validates (the sketch decoded, at most a few at once) and queues a job; its id.
    async fn submit(&self, r: JobRequest) -> Result<String, SubmitError>;
    /// The job now; asking counts as the client still being there.
    async fn status(&self, id: &str) -> Lookup<JobView>;
    /// Live updates of a job (starting with the current state).
    async fn watch(&self, id: &str) -> Lookup<watch::Receiver<JobView>>;
    /// The client of `id` is still there (an open event stream).
    async fn touch(&self, id: &str);
    async fn cancel(&self, id: &str) -> Lookup<(JobView, CancelOutcome)>;
    /// A file the job wrote, only if `name` is one of them.
    async fn file(&self, id: &str, name: &str) -> Lookup<FileBody>;
    /// Seconds a client refused with a full queue should wait.
    async fn retry_after_s(&self) -> u64;
    /// Stops taking and running jobs (the in-process worker after its current job).
    fn shutdown(&self);
}

/// Whether `text` has a character that is neither white space nor a control or format
/// (zero-width) character: what the tokenizer would not drop.
pub fn has_visible_text(text: &str) -> bool {
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

/// A fresh job id: 32 hex digits.
pub fn new_id() -> String {
    let a: u128 = rand::random();
    format!("{a:032x}")
}

/// Whether `name` is a job id (32 hex digits).
pub fn is_job_id(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The text of a panic's payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Makes a jobs folder ready: created, writable (a probe file is written and removed), taken
/// by this process alone (an flock'ed `.lock` file, held for the returned file's lifetime),
/// and cleared of the job folders and partial files that no live job owns (left by a process
/// that was killed or stopped).
pub fn prepare_jobs_dir(dir: &Path) -> Result<std::fs::File, String> {
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
                "jobs folder {} is in use by another flipsketch process",
                dir.display()
            ));
        }
    }
    let mut removed = 0;
    for e in std::fs::read_dir(dir).map_err(what)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_job_id(&name) || name.starts_with(STAGING_PREFIX) {
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

/// Deletes job folders (outside any lock: this is file-system work).
pub fn remove_dirs(dirs: Vec<PathBuf>) {
    for dir in dirs {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Why a job stopped before it was done.
#[derive(Debug)]
pub enum Stop {
    Cancelled,
    Failed(String),
}

/// What every job writes (the page offers each for download).
pub const SERVED_FORMATS: &[Format] = &[
    Format::Gif,
    Format::GifRaw,
    Format::Apng,
    Format::Mp4,
    Format::Sheet,
    Format::Svg,
    Format::Png,
];

/// Writes every served format of every variant of `video` into `dir`; the file names written.
/// `cancel` is honoured between the variants.
pub fn write_outputs(
    config: &EngineConfig,
    dir: &Path,
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

/// At most [`EngineConfig::decode_slots`] sketch decodes at once, with the decode hook around
/// each.
pub struct DecodeGate {
    running: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
    slots: usize,
    hook: Option<fn(bool)>,
}

impl DecodeGate {
    pub fn new(config: &EngineConfig) -> Self {
        Self {
            running: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
            slots: config.decode_slots.max(1),
            hook: config.decode_hook,
        }
    }

    /// Runs `decode` once a slot is free (blocking until then).
    pub fn run<T>(&self, decode: impl FnOnce() -> T) -> T {
        {
            let mut n = self.running.lock().unwrap_or_else(|p| p.into_inner());
            while *n >= self.slots {
                n = self.freed.wait(n).unwrap_or_else(|p| p.into_inner());
            }
            *n += 1;
        }
        struct Release<'a>(&'a DecodeGate);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                if let Some(h) = self.0.hook {
                    h(false);
                }
                *self.0.running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                self.0.freed.notify_one();
            }
        }
        if let Some(h) = self.hook {
            h(true);
        }
        let _release = Release(self);
        decode()
    }
}

/// Progress as a fraction of `work` and the time left, from the time spent so far.
pub fn progress_of(
    work: &flipsketch_pipeline::WorkPlan,
    phase: Phase,
    done: usize,
    elapsed_s: f64,
) -> (f64, Option<f64>) {
    let p = (work.units_before(phase, done) / work.total()).clamp(0.0, 0.99);
    let eta = (p > 0.02).then(|| elapsed_s * (1.0 - p) / p);
    (p, eta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_for_clients() {
        assert_eq!(short_number(1e308), "1.000e308");
        assert_eq!(short_number(9.5), "9.5");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(
            redact_paths("cannot create /tmp/flipsketch-serve-7/abc: denied"),
            "cannot create .../abc: denied"
        );
        assert_eq!(redact_paths("a/b is fine, 1/2 too"), "a/b is fine, 1/2 too");
        assert!(has_visible_text("a\u{200B}"));
        assert!(!has_visible_text("\u{200B}\u{200D}\u{FEFF} \0"));
        for s in ["queued", "writing", "denoising"] {
            assert_eq!(JobPhase::parse(s).unwrap().as_str(), s);
        }
        for s in ["queued", "running", "done", "failed", "cancelled"] {
            assert_eq!(JobStatus::parse(s).unwrap().as_str(), s);
        }
    }
}
