//! `flipsketch animate`: sketch + prompt -> GIFs (and PNG frames). Validates everything it can
//! before loading the model, shows progress per phase, never overwrites files unless asked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use flipsketch_media::sketch::{fit_square, on_white_reduced, to_chw_f32, Fit};
use flipsketch_media::writers::{variant_file_names, write_variant, Format, Playback};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::ranking::{ClipRanker, Rgb};
use flipsketch_pipeline::{video_to_frames, Encode, Phase, Pipeline, Progress, Request};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::model_source::{self, ModelArgs};
use crate::Precision;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RankArg {
    /// Mean cosine similarity of CLIP image embeddings (all frames vs the sketch).
    Clip,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FitArg {
    /// Keep the drawing's proportions on a white square.
    Pad,
    /// Stretch to a square (what the original app does).
    Stretch,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EncodeArg {
    /// Sample the VAE posterior (the app's behaviour), with noise from the seed.
    Sample,
    /// Use the posterior mean (deterministic).
    Mean,
}

#[derive(Args, Debug)]
pub struct AnimateArgs {
    /// The sketch: PNG, JPEG, WebP, BMP or GIF (first frame), any size.
    #[arg(long)]
    pub sketch: PathBuf,
    /// How it should move, e.g. "the cat stretches and yawns".
    #[arg(long)]
    pub prompt: String,
    /// Output folder (default: a new folder named after the sketch).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of animations [default: 3].
    #[arg(long)]
    pub variants: Option<usize>,
    /// Frames per animation [default: 10].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 9.0)]
    pub guidance: f64,
    /// Fidelity to the sketch: higher keeps closer to it, lower moves more.
    #[arg(long = "lambda", default_value_t = 0.5)]
    pub lambda: f64,
    /// Seed; variant i uses seed + i [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Last step that composes attention with the sketch; negative turns composition off.
    #[arg(long, default_value_t = 15, allow_negative_numbers = true)]
    pub tau: i64,
    /// Compute precision: auto is bf16 on a GPU or a CPU with AVX512-BF16, else f32.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: Precision,
    /// Where the model runs: auto (a GPU when this binary has CUDA or Metal support and one is
    /// there, else the CPU), cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceArg,
    /// How a non-square sketch becomes square.
    #[arg(long, value_enum, default_value = "pad")]
    pub fit: FitArg,
    /// How the sketch is encoded by the VAE.
    #[arg(long, value_enum, default_value = "sample")]
    pub encode: EncodeArg,
    /// Side of the written frames in pixels.
    #[arg(long, default_value_t = 1024)]
    pub size: u32,
    /// Output formats (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "gif")]
    pub format: Vec<Format>,
    /// Frames per second of the animations.
    #[arg(long, default_value_t = 10)]
    pub fps: u32,
    /// Times the GIF/APNG/SVG animations play; 0 = forever.
    #[arg(long = "loop", default_value_t = 0)]
    pub loops: u32,
    /// Start noise: safetensors with `latents` (B, 4, F, h, w); fixes variants and frames.
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Also write a safetensors file with `inv_latents`, `latents` and `video` (f32).
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Replace files that already exist in the output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Rank the variants by CLIP image similarity of all their frames to the sketch.
    #[arg(long, value_enum)]
    pub rank: Option<RankArg>,
    /// CLIP model for `--rank clip`: a local folder or a hub repository.
    #[arg(long, default_value = "openai/clip-vit-base-patch32")]
    pub clip_model: String,
    /// With `--rank`: variants scoring below this are marked (never removed).
    #[arg(long)]
    pub min_score: Option<f64>,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Progress bars per phase, hidden when quiet or not on a terminal.
struct Bars {
    bar: ProgressBar,
    quiet: bool,
    /// Seconds per pipeline phase, in order, the current one still open.
    phases: Vec<(&'static str, f64)>,
    phase_start: Option<Instant>,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        let bar = ProgressBar::hidden();
        Self {
            bar,
            quiet,
            phases: Vec::new(),
            phase_start: None,
        }
    }

    /// Closes the current pipeline phase's timing, if one is open.
    fn end_phase(&mut self) {
        if let (Some(t), Some(last)) = (self.phase_start.take(), self.phases.last_mut()) {
            last.1 = t.elapsed().as_secs_f64();
        }
    }

    fn start(&mut self, msg: &str, total: u64, unit: &str) {
        self.bar.finish_and_clear();
        let target = if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let style = ProgressStyle::with_template(&format!(
            "{{msg:>10}} [{{bar:30}}] {unit} {{pos}}/{{len}}  {{elapsed_precise}} elapsed, {{eta}} left"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        self.bar = ProgressBar::with_draw_target(Some(total), target)
            .with_style(style)
            .with_message(msg.to_string());
        self.bar.enable_steady_tick(Duration::from_millis(250));
    }

    fn spinner(&mut self, msg: &str) {
        self.bar.finish_and_clear();
        let target = if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        self.bar = ProgressBar::with_draw_target(None, target)
            .with_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            )
            .with_message(msg.to_string());
        self.bar.enable_steady_tick(Duration::from_millis(120));
    }

    fn done(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bars {
    fn phase(&mut self, phase: Phase, total: usize) {
        let (msg, unit) = match phase {
            Phase::Encoding => ("encoding", "item"),
            Phase::Inversion => ("inversion", "step"),
            Phase::Denoising => ("denoising", "step"),
            Phase::Decoding => ("decoding", "frame"),
        };
        self.end_phase();
        self.phases.push((msg, 0.0));
        self.phase_start = Some(Instant::now());
        self.start(msg, total as u64, unit);
    }
    fn advance(&mut self, done: usize) {
        self.bar.set_position(done as u64);
    }
    fn cancelled(&self) -> bool {
        crate::interrupt::requested()
    }
}

fn validate(a: &AnimateArgs) -> Result<()> {
    if a.prompt.trim().is_empty() {
        bail!("--prompt is empty: say how the sketch should move");
    }
    if a.steps == 0 || a.steps > 1000 {
        bail!("--steps must be between 1 and 1000, got {}", a.steps);
    }
    for (name, v) in [("--variants", a.variants), ("--frames", a.frames)] {
        if v == Some(0) {
            bail!("{name} must be at least 1");
        }
    }
    if a.variants.is_some_and(|v| v > 16) {
        bail!("--variants must be at most 16");
    }
    if a.frames.is_some_and(|f| f > 64) {
        bail!("--frames must be at most 64");
    }
    if !a.guidance.is_finite() || !a.lambda.is_finite() {
        bail!("--guidance and --lambda must be finite numbers");
    }
    if a.size < 16 || a.size > 4096 {
        bail!("--size must be between 16 and 4096, got {}", a.size);
    }
    if a.fps == 0 || a.fps > 100 {
        bail!("--fps must be between 1 and 100, got {}", a.fps);
    }
    Ok(())
}

/// `<stem>-flipsketch`, `<stem>-flipsketch-2`, ... in the current folder: the first that does not exist.
fn default_out_dir(sketch: &Path) -> PathBuf {
    let stem = sketch
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("sketch");
    let base = format!("{stem}-flipsketch");
    let mut candidate = PathBuf::from(&base);
    let mut k = 2;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}-{k}"));
        k += 1;
    }
    candidate
}

fn load_init_noise(path: &Path) -> Result<Tensor> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))?;
    let latents = t
        .remove("latents")
        .with_context(|| format!("{}: no tensor named `latents`", path.display()))?;
    if latents.rank() != 5 {
        bail!(
            "{}: `latents` must be (B, 4, F, h, w), got {:?}",
            path.display(),
            latents.dims()
        );
    }
    Ok(latents.to_dtype(DType::F32)?)
}

fn check_new(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!(
            "{} already exists (use --overwrite to replace it)",
            path.display()
        );
    }
    Ok(())
}

pub fn run(mut a: AnimateArgs) -> Result<()> {
    let t_start = Instant::now();
    validate(&a)?;
    // The same format twice is written once.
    let mut seen = std::collections::HashSet::new();
    a.format.retain(|f| seen.insert(*f));
    // The device and the sketch first: a GPU that is not there or a bad file fails before any
    // download or model loading. The sketch is kept at up to 512 px (the model takes 256, CLIP
    // ranking 224), not at the size it was drawn.
    let device = a.device.open()?;
    let sketch = on_white_reduced(&flipsketch_media::sketch::read(&a.sketch)?, 512);
    let init_noise = a.init_noise.as_deref().map(load_init_noise).transpose()?;
    if let Some(n) = &init_noise {
        let (b, f) = (n.dim(0)?, n.dim(2)?);
        if a.variants.is_some_and(|v| v != b) || a.frames.is_some_and(|v| v != f) {
            bail!("--init-noise holds {b} variants x {f} frames, which contradicts --variants/--frames");
        }
    }
    let variants = init_noise
        .as_ref()
        .map(|n| n.dim(0))
        .transpose()?
        .or(a.variants)
        .unwrap_or(3);
    let frames = init_noise
        .as_ref()
        .map(|n| n.dim(2))
        .transpose()?
        .or(a.frames)
        .unwrap_or(10);
    // Every file this run will write, checked now, not after minutes of inference.
    let out_dir = a.out.clone().unwrap_or_else(|| default_out_dir(&a.sketch));
    let planned: Vec<PathBuf> = (0..variants)
        .flat_map(|k| variant_file_names(k, frames, &a.format))
        .chain(["result.json".to_string()])
        .map(|n| out_dir.join(n))
        .chain(a.dump.clone())
        .collect();
    for p in &planned {
        check_new(p, a.overwrite)?;
    }
    let created = !out_dir.exists();
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create the output folder {}", out_dir.display()))?;
    crate::interrupt::install(created.then(|| out_dir.clone()));
    let mut bars = Bars::new(a.quiet);
    let model_dir = a.model.resolve(!a.quiet)?;
    let t_load = Instant::now();
    let dtype = a.dtype.dtype(&device);
    let components = Components::load(&model_dir, dtype, &device, a.model.variant(), |name| {
        bars.spinner(&format!("loading {name}"))
    })
    .with_context(|| format!("cannot load the model in {}", model_dir.display()))?;
    bars.done();
    let load_s = t_load.elapsed().as_secs_f64();
    let loaded_mib = crate::live_mib();
    let pipeline = Pipeline::new(components, device.clone());

    let size = pipeline.image_size() as u32;
    let fit = match a.fit {
        FitArg::Pad => Fit::Pad,
        FitArg::Stretch => Fit::Stretch,
    };
    let square = fit_square(&sketch, size, fit);
    let image = Tensor::from_vec(
        to_chw_f32(&square),
        (3, size as usize, size as usize),
        &device,
    )?;
    let seed = a.seed.unwrap_or_else(rand_seed);
    let request = Request {
        image,
        prompt: a.prompt.clone(),
        variants,
        frames,
        steps: a.steps,
        guidance: a.guidance,
        lambda: a.lambda,
        tau: a.tau,
        seed,
        init_noise,
        encode: match a.encode {
            EncodeArg::Mean => Encode::Mean,
            EncodeArg::Sample => Encode::SampleSeeded,
        },
    };
    if !a.quiet {
        eprintln!(
            "seed {seed}: {variants} variant(s) x {frames} frames, {} steps, model {}",
            a.steps,
            model_dir.display()
        );
    }
    let t_run = Instant::now();
    crate::interrupt::running(true);
    // One request: the text encoder is released once the prompts are encoded (less memory
    // through denoising and decoding).
    let output = match pipeline.run_once(&request, &mut bars) {
        Err(flipsketch_pipeline::PipelineError::Cancelled) => {
            bars.done();
            return Err(crate::interrupt::stopped(&[]));
        }
        r => r?,
    };
    bars.end_phase();
    bars.done();
    let run_s = t_run.elapsed().as_secs_f64();

    let t_write = Instant::now();
    bars.start("writing", variants as u64, "variant");
    let mut files: Vec<PathBuf> = Vec::new();
    let variant_frames = video_to_frames(&output.video)?;
    for (k, v) in variant_frames.iter().enumerate() {
        if crate::interrupt::requested() {
            bars.done();
            return Err(crate::interrupt::stopped(&files));
        }
        files.extend(write_variant(
            &out_dir,
            k,
            v,
            &a.format,
            a.size,
            Playback {
                fps: a.fps,
                loops: a.loops,
            },
            a.overwrite,
        )?);
        bars.advance(k + 1);
    }
    if let Some(d) = &a.dump {
        let map: HashMap<String, Tensor> = [
            (
                "inv_latents".to_string(),
                output.inv_latents.to_dtype(DType::F32)?,
            ),
            ("latents".to_string(), output.latents.to_dtype(DType::F32)?),
            ("video".to_string(), output.video.to_dtype(DType::F32)?),
        ]
        .into();
        let tmp = d.with_file_name(format!(
            ".{}.partial",
            d.file_name().and_then(|n| n.to_str()).unwrap_or("dump")
        ));
        candle_core::safetensors::save(&map, &tmp)
            .and_then(|()| std::fs::rename(&tmp, d).map_err(candle_core::Error::from))
            .with_context(|| format!("cannot write {}", d.display()))?;
        files.push(d.clone());
    }
    bars.done();
    if crate::interrupt::requested() {
        return Err(crate::interrupt::stopped(&files));
    }
    let write_s = t_write.elapsed().as_secs_f64();

    let t_rank = Instant::now();
    let ranking = match a.rank {
        None => serde_json::Value::Null,
        Some(RankArg::Clip) => rank_clip(&a, &device, &sketch, &variant_frames),
    };
    let rank_s = t_rank.elapsed().as_secs_f64();

    let result = serde_json::json!({
        "sketch": a.sketch, "prompt": a.prompt, "model": model_dir,
        "variants": variants, "frames": frames, "steps": a.steps, "guidance": a.guidance,
        "lambda": a.lambda, "tau": a.tau, "dtype": flipsketch_pipeline::dtype_name(dtype), "device": flipsketch_pipeline::device_name(&device),
        "seed": seed, "seeds": (0..variants).map(|i| seed.wrapping_add(i as u64)).collect::<Vec<_>>(),
        "unet_frame_evaluations": output.unet_frame_evals,
        "timings_s": {"load": load_s, "generate": run_s, "write": write_s, "rank": rank_s, "total": t_start.elapsed().as_secs_f64(),
            "phases": bars.phases.iter().map(|&(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>()},
        "memory_mib": {"after_load": loaded_mib, "peak_heap": crate::peak_live_mib(), "peak_resident": crate::peak_rss_mib()},
        "ranking": ranking,
        "files": files,
    });
    let result_path = out_dir.join("result.json");
    let tmp = out_dir.join(".result.json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(&result)?)
        .and_then(|()| std::fs::rename(&tmp, &result_path))
        .with_context(|| format!("cannot write {}", result_path.display()))?;
    crate::interrupt::running(false);
    if !a.quiet {
        eprintln!(
            "done in {:.1} s (model {load_s:.1} s, generation {run_s:.1} s)",
            t_start.elapsed().as_secs_f64()
        );
    }
    for f in &files {
        println!("{}", f.display());
    }
    Ok(())
}

/// Scores every variant with CLIP and orders them; a missing CLIP model skips ranking with a
/// message instead of failing the run.
fn rank_clip(
    a: &AnimateArgs,
    device: &Device,
    sketch: &image::RgbImage,
    variants: &[flipsketch_media::Frames],
) -> serde_json::Value {
    let result = (|| -> Result<Vec<f64>> {
        let dir = model_source::resolve(
            &a.clip_model,
            "",
            "main",
            a.model.variant(),
            &flipsketch_pipeline::ranking::CLIP_FILES,
            flipsketch_hub::Fetch::CacheFirst,
            !a.quiet,
        )?;
        let (ranker, _) = ClipRanker::load(&dir, device, a.model.variant())?;
        let (w, h) = sketch.dimensions();
        Ok(ranker.scores(
            Rgb {
                data: sketch.as_raw(),
                width: w as usize,
                height: h as usize,
            },
            variants,
        )?)
    })();
    match result {
        Err(e) => {
            eprintln!("ranking skipped: {e:#}");
            serde_json::json!({"skipped": format!("{e:#}")})
        }
        Ok(scores) => {
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]));
            let list: Vec<serde_json::Value> = order
                .iter()
                .enumerate()
                .map(|(rank, &k)| {
                    let below = a.min_score.is_some_and(|m| scores[k] < m);
                    if !a.quiet {
                        eprintln!("rank {}: variant {k}, CLIP similarity {:.4}{}", rank + 1, scores[k], if below { " (below --min-score)" } else { "" });
                    }
                    serde_json::json!({"rank": rank + 1, "variant": k, "score": scores[k], "below_min_score": below})
                })
                .collect();
            serde_json::json!({"method": "clip", "model": a.clip_model, "variants": list})
        }
    }
}

fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64 ^ (std::process::id() as u64).rotate_left(32)) % 1_000_000_000
}
