//! The FlipSketch pipeline (`docs/algorithm.md`): DDIM inversion of the sketch
//! to a reference noise, then generation with a reference branch whose self-attention is
//! composed into the conditional pass, classifier-free guidance, and decoding.
//!
//! Only what changes the result is computed: one UNet call per inversion step (the app's CFG
//! there is the identity), one batch-1 reference call per step while `i <= tau` (the branch is
//! the same for every variant), none after; the unconditional and conditional main passes.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use flipsketch_models::autoencoder_kl::DiagonalGaussian;

use crate::components::Components;
use crate::composition::{Composer, Recorder};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Tokenizer(#[from] crate::text::TokenizerError),
    #[error(transparent)]
    Scheduler(#[from] flipsketch_schedulers::Error),
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

/// How the sketch's VAE posterior becomes latents.
#[derive(Clone, Debug)]
pub enum Encode {
    /// The posterior mean (deterministic).
    Mean,
    /// mean + std * noise, the noise (5, latent_channels, h, w) given.
    Sample(Tensor),
    /// A sample with noise drawn from the request's seed (what the app does).
    SampleSeeded,
}

#[derive(Clone, Debug)]
pub struct Request {
    /// The sketch, RGB in [0, 1], (3, H, W) at the model's resolution ([`Pipeline::image_size`]).
    pub image: Tensor,
    pub prompt: String,
    /// Number of animations generated (ignored when `init_noise` is given).
    pub variants: usize,
    /// Frames per animation (ignored when `init_noise` is given).
    pub frames: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Higher keeps the motion closer to the sketch.
    pub lambda: f64,
    /// Last step (0-based) that runs the reference branch; negative turns composition off.
    pub tau: i64,
    /// Variant i starts from noise drawn with seed + i.
    pub seed: u64,
    /// Start noise (B, latent_channels, F, h, w); fixes B and F.
    pub init_noise: Option<Tensor>,
    pub encode: Encode,
}

/// What a run produced, all f32.
#[derive(Clone, Debug)]
pub struct Output {
    /// The sketch's reference noise (1, C, 1, h, w).
    pub inv_latents: Tensor,
    /// Latents after the last step (B, C, F, h, w).
    pub latents: Tensor,
    /// Decoded frames (B, F, H, W, 3) in [0, 1].
    pub video: Tensor,
    /// UNet frame-evaluations performed (batch x frames, summed over calls).
    pub unet_frame_evals: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Encoding,
    Inversion,
    Denoising,
    Decoding,
}

/// Progress of a run; also the place to cancel it (checked before every UNet step).
pub trait Progress {
    /// A phase starts with `total` units of work.
    fn phase(&mut self, _phase: Phase, _total: usize) {}
    /// `done` units of the current phase are finished.
    fn advance(&mut self, _done: usize) {}
    /// The sketch's reference noise came from the [`InversionCache`]: the sketch is not
    /// encoded and the inversion phase does not run ([`WorkPlan::without_inversion`]).
    fn inversion_cached(&mut self) {}
    fn cancelled(&self) -> bool {
        false
    }
}

/// The work of a run, in UNet frame-evaluations, phase by phase: what progress and time left
/// are weighted by. It follows [`Pipeline::run`]'s schedule: the inversion runs 5 frames a
/// step; denoising step i runs both guidance passes over every variant's frames plus, while
/// i <= tau, the reference branch over its shrinking frames; decoding a frame costs about a
/// tenth of a UNet frame, encoding the sketch one.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkPlan {
    pub steps: usize,
    /// Per inversion step; 0 when the inversion comes from the cache.
    pub inversion_step: f64,
    /// The sketch's encoding (one UNet frame's worth; 0 from the cache).
    pub sketch_encoding: f64,
    pub denoising_steps: Vec<f64>,
    pub decoded_frames: usize,
}

/// [`WorkPlan`]'s estimate of a frame decode, in UNet frame-evaluations.
const DECODE_FRAME_UNITS: f64 = 0.1;

impl WorkPlan {
    pub fn new(variants: usize, frames: usize, steps: usize, tau: i64) -> Self {
        let (b, f) = (variants as f64, frames as f64);
        let denoising_steps = (0..steps)
            .map(|i| {
                let reference = frames.saturating_sub(i).max(1) as f64;
                2.0 * b * f + if (i as i64) <= tau { reference } else { 0.0 }
            })
            .collect();
        Self {
            steps,
            inversion_step: INVERSION_FRAMES as f64,
            sketch_encoding: 1.0,
            denoising_steps,
            decoded_frames: variants * frames,
        }
    }

    /// The plan of a run whose reference noise comes from the [`InversionCache`]: no sketch
    /// encoding, no inversion steps.
    pub fn without_inversion(&self) -> Self {
        Self {
            inversion_step: 0.0,
            sketch_encoding: 0.0,
            ..self.clone()
        }
    }

    /// The UNet frame-evaluations of the whole run (what [`Output::unet_frame_evals`] counts).
    pub fn unet_frame_evals(&self) -> f64 {
        self.inversion_step * self.steps as f64 + self.denoising_steps.iter().sum::<f64>()
    }

    /// Work done when `done` units of `phase` are finished.
    pub fn units_before(&self, phase: Phase, done: usize) -> f64 {
        let inversion = self.inversion_step * self.steps as f64;
        let denoising: f64 = self.denoising_steps.iter().sum();
        let enc = self.sketch_encoding;
        match phase {
            Phase::Encoding => enc * done as f64,
            Phase::Inversion => enc + self.inversion_step * done as f64,
            Phase::Denoising => {
                enc + inversion + self.denoising_steps.iter().take(done).sum::<f64>()
            }
            Phase::Decoding => enc + inversion + denoising + DECODE_FRAME_UNITS * done as f64,
        }
    }

    /// All of it.
    pub fn total(&self) -> f64 {
        self.units_before(Phase::Decoding, self.decoded_frames)
    }
}

/// No progress display.
pub struct Silent;
impl Progress for Silent {}

/// Standard-normal noise of `shape` from a ChaCha8 stream (seed, stream), f32.
pub fn seeded_noise(
    seed: u64,
    stream: u64,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, device)
}

/// How a device is named in result.json, the HTTP API and messages: "cpu", "cuda" or "metal".
pub fn device_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// How a compute dtype is named in result.json, the HTTP API and messages: "f32", "bf16"...
pub fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// The sketch is inverted as this many identical frames (the app's choice).
const INVERSION_FRAMES: usize = 5;

/// ChaCha streams: variant start noise uses stream 0 with seed + i; the posterior stream 1.
const POSTERIOR_STREAM: u64 = 1;

/// The reference noises of the last few sketches (the app's second prompt on the same sketch
/// skips the sketch's encoding and its inversion). The inversion depends on the sketch, the
/// steps and the posterior's noise (none for the mean, the seed for a seeded sample, the
/// given noise), never on the prompt (it runs on the empty one); the key is a SHA-256 of
/// those, the model and the precision being the pipeline's own. A hit gives the very tensor
/// the inversion gave, so the run is bit-identical to an uncached one.
pub struct InversionCache {
    capacity: usize,
    /// Oldest first.
    entries: std::sync::Mutex<std::collections::VecDeque<([u8; 32], Tensor)>>,
    hits: std::sync::atomic::AtomicUsize,
}

impl InversionCache {
    /// Keeps the last `capacity` reference noises (16 KB each at the real model's size).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Default::default(),
            hits: Default::default(),
        }
    }

    /// Runs that took their reference noise from here.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn key(r: &Request) -> candle_core::Result<[u8; 32]> {
        use sha2::{Digest, Sha256};
        // a tensor as its shape and its f32 values
        fn tensor(h: &mut Sha256, t: &Tensor) -> candle_core::Result<()> {
            h.update(format!("{:?}", t.dims()).as_bytes());
            for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                h.update(v.to_le_bytes());
            }
            Ok(())
        }
        let mut h = Sha256::new();
        tensor(&mut h, &r.image)?;
        match &r.encode {
            Encode::Mean => h.update(b"mean"),
            Encode::Sample(noise) => {
                h.update(b"sample");
                tensor(&mut h, noise)?;
            }
            Encode::SampleSeeded => {
                h.update(b"seeded");
                h.update(r.seed.to_le_bytes());
            }
        }
        h.update((r.steps as u64).to_le_bytes());
        Ok(h.finalize().into())
    }

    fn get(&self, key: &[u8; 32]) -> Option<Tensor> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let i = e.iter().position(|(k, _)| k == key)?;
        // most recently used last
        let entry = e.remove(i)?;
        let t = entry.1.clone();
        e.push_back(entry);
        self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(t)
    }

    fn put(&self, key: [u8; 32], t: Tensor) {
        if self.capacity == 0 {
            return;
        }
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|(k, _)| *k != key);
        while e.len() >= self.capacity {
            e.pop_front();
        }
        e.push_back((key, t));
    }
}

pub struct Pipeline {
    pub components: Components,
    device: Device,
    dtype: DType,
    /// Reference noises of recent sketches ([`Pipeline::with_inversion_cache`]).
    cache: Option<InversionCache>,
    /// Variants per UNet call in the main passes (`None`: all at once). The result does not
    /// depend on it; memory and speed do. [`Pipeline::new`] picks one at a time on the CPU.
    pub variants_per_call: Option<usize>,
}

impl Pipeline {
    /// The components' compute plan (made when they were loaded) gives the activations' dtype.
    pub fn new(components: Components, device: Device) -> Self {
        let dtype = components.plan.dtype;
        let variants_per_call = device.is_cpu().then_some(1);
        Self {
            components,
            device,
            dtype,
            variants_per_call,
            cache: None,
        }
    }

    /// Keeps the reference noises of the last `capacity` sketches ([`InversionCache`]).
    pub fn with_inversion_cache(mut self, capacity: usize) -> Self {
        self.cache = Some(InversionCache::new(capacity));
        self
    }

    /// The cache of reference noises, if this pipeline keeps one.
    pub fn inversion_cache(&self) -> Option<&InversionCache> {
        self.cache.as_ref()
    }

    /// Where the model runs: "cpu", "cuda" or "metal".
    pub fn device_name(&self) -> &'static str {
        device_name(&self.device)
    }

    /// The compute precision: "f32" or "bf16".
    pub fn dtype_name(&self) -> &'static str {
        dtype_name(self.dtype)
    }

    /// Sketch resolution the model works at: `unet.sample_size * vae downscale` (256 for the
    /// real checkpoint).
    pub fn image_size(&self) -> usize {
        let latent = self.components.unet.config().sample_size.unwrap_or(32);
        latent * self.components.vae.config().downscale()
    }

    fn encode_prompt(&self, prompt: &str) -> Result<Tensor, PipelineError> {
        let Some(text_encoder) = &self.components.text_encoder else {
            return Err(PipelineError::Invalid(
                "the text encoder was released (Pipeline::run_once): it cannot encode a prompt"
                    .into(),
            ));
        };
        let ids = self.components.tokenizer.encode(prompt)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        Ok(text_encoder.forward(&ids)?)
    }

    /// The request checked, then its prompt and the empty prompt encoded: `(b, f)`, cond and
    /// uncond (the first phase of a run).
    fn encode_prompts(
        &self,
        r: &Request,
        progress: &mut dyn Progress,
    ) -> Result<((usize, usize), Tensor, Tensor), PipelineError> {
        let bf = self.validate(r)?;
        // 0. prompts: cond = prompt, uncond = null = "" (the same tensor)
        progress.phase(Phase::Encoding, 1);
        let cond = self.encode_prompt(&r.prompt)?;
        let uncond = self.encode_prompt("")?;
        Ok((bf, cond, uncond))
    }

    fn validate(&self, r: &Request) -> Result<(usize, usize), PipelineError> {
        let invalid = |m: String| Err(PipelineError::Invalid(m));
        let size = self.image_size();
        let c = self.components.unet.config().in_channels;
        if r.image.dims() != [3, size, size] {
            return invalid(format!(
                "image must be (3, {size}, {size}), got {:?}",
                r.image.dims()
            ));
        }
        if r.steps == 0 || r.steps > 1000 {
            return invalid(format!("steps must be between 1 and 1000, got {}", r.steps));
        }
        if !r.guidance.is_finite() || !r.lambda.is_finite() {
            return invalid("guidance and lambda must be finite numbers".into());
        }
        let (b, f) = match &r.init_noise {
            Some(n) => {
                let dims = n.dims();
                let lat = size / self.components.vae.config().downscale();
                if dims.len() != 5
                    || dims[1] != c
                    || dims[3] != lat
                    || dims[4] != lat
                    || dims[0] == 0
                    || dims[2] == 0
                {
                    return invalid(format!(
                        "init noise must be (B, {c}, F, {lat}, {lat}), got {dims:?}"
                    ));
                }
                (dims[0], dims[2])
            }
            None => (r.variants, r.frames),
        };
        if b == 0 || b > 16 {
            return invalid(format!("variants must be between 1 and 16, got {b}"));
        }
        if f == 0 || f > 64 {
            return invalid(format!("frames must be between 1 and 64, got {f}"));
        }
        Ok((b, f))
    }

    /// The sketch's reference noise (1, C, 1, h, w): steps 1 and 2 of [`Pipeline::run`].
    fn invert(
        &self,
        r: &Request,
        uncond: &Tensor,
        sched: &flipsketch_schedulers::DdimScheduler,
        timesteps: &[i64],
        progress: &mut dyn Progress,
        evals: &mut usize,
    ) -> Result<Tensor, PipelineError> {
        let (vae, unet) = (&self.components.vae, &self.components.unet);
        let scaling = vae.config().scaling_factor;
        // 1. sketch -> 5 identical frames -> VAE posterior -> (1, C, 5, h, w). The encoder
        // sees each frame on its own and the frames are copies, so one encode gives the
        // posterior of all five; only the posterior noise differs between them.
        // Requests are built on the CPU; the model may live elsewhere.
        let image = r.image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let one = vae.encode(&image.unsqueeze(0)?)?;
        let post = DiagonalGaussian {
            mean: one.mean.repeat((INVERSION_FRAMES, 1, 1, 1))?,
            logvar: one.logvar.repeat((INVERSION_FRAMES, 1, 1, 1))?,
        };
        let z = match &r.encode {
            Encode::Mean => post.mean.clone(),
            Encode::Sample(noise) => {
                if noise.dims() != post.mean.dims() {
                    return Err(PipelineError::Invalid(format!(
                        "posterior noise must be {:?}, got {:?}",
                        post.mean.dims(),
                        noise.dims()
                    )));
                }
                post.sample(&noise.to_device(&self.device)?)?
            }
            Encode::SampleSeeded => post.sample(&seeded_noise(
                r.seed,
                POSTERIOR_STREAM,
                post.mean.dims(),
                &self.device,
            )?)?,
        };
        let mut x = (z.to_dtype(DType::F32)? * scaling)?
            .permute((1, 0, 2, 3))?
            .unsqueeze(0)?
            .contiguous()?;
        progress.advance(1);

        // 2. DDIM inversion, timesteps ascending, one UNet call per step on the empty prompt
        progress.phase(Phase::Inversion, timesteps.len());
        for (k, &t) in timesteps.iter().rev().enumerate() {
            if progress.cancelled() {
                return Err(PipelineError::Cancelled);
            }
            let e = unet.forward(&x, t as f64, uncond, None)?;
            *evals += INVERSION_FRAMES;
            x = sched.inversion_step(&e, t, &x)?;
            progress.advance(k + 1);
        }
        Ok(x.mean_keepdim(2)?) // (1, C, 1, h, w)
    }

    pub fn run(&self, r: &Request, progress: &mut dyn Progress) -> Result<Output, PipelineError> {
        let (bf, cond, uncond) = self.encode_prompts(r, progress)?;
        self.run_encoded(r, bf, &cond, &uncond, progress)
    }

    /// [`Self::run`] for a pipeline that runs one request and is done (`flipsketch animate`):
    /// the text encoder is dropped as soon as the prompts are encoded, so that its weights
    /// (0.58 GB for the real model in bf16) are not held through denoising and decoding, when
    /// the activations peak. The output is the same as [`Self::run`]'s.
    pub fn run_once(
        mut self,
        r: &Request,
        progress: &mut dyn Progress,
    ) -> Result<Output, PipelineError> {
        let (bf, cond, uncond) = self.encode_prompts(r, progress)?;
        self.components.text_encoder = None;
        self.run_encoded(r, bf, &cond, &uncond, progress)
    }

    fn run_encoded(
        &self,
        r: &Request,
        (b, f): (usize, usize),
        cond: &Tensor,
        uncond: &Tensor,
        progress: &mut dyn Progress,
    ) -> Result<Output, PipelineError> {
        let comps = &self.components;
        let unet = &comps.unet;
        let vae = &comps.vae;
        let scaling = vae.config().scaling_factor;
        let size = self.image_size();
        let lat = size / vae.config().downscale();
        let c = unet.config().in_channels;
        let mut evals = 0usize;
        let check = |p: &dyn Progress| {
            if p.cancelled() {
                Err(PipelineError::Cancelled)
            } else {
                Ok(())
            }
        };

        let mut sched = comps.scheduler.clone();
        sched.set_timesteps(r.steps)?;
        let timesteps = sched.timesteps().to_vec();

        // 1-2. the sketch's reference noise: from the cache, or encoded and inverted
        let key = match &self.cache {
            Some(_) => Some(InversionCache::key(r)?),
            None => None,
        };
        let cached = match (&self.cache, &key) {
            (Some(cache), Some(k)) => cache.get(k),
            _ => None,
        };
        let inv_latents = match cached {
            Some(t) => {
                progress.inversion_cached();
                progress.advance(1);
                t
            }
            None => {
                let inv = self.invert(r, uncond, &sched, &timesteps, progress, &mut evals)?;
                if let (Some(cache), Some(k)) = (&self.cache, key) {
                    cache.put(k, inv.clone());
                }
                inv
            }
        };

        // 3. start latents: noise with frame 0 of every variant = the reference noise
        let noise = match &r.init_noise {
            Some(n) => n.to_dtype(DType::F32)?.to_device(&self.device)?,
            None => {
                let per: Vec<Tensor> = (0..b)
                    .map(|i| {
                        seeded_noise(
                            r.seed.wrapping_add(i as u64),
                            0,
                            &[1, c, f, lat, lat],
                            &self.device,
                        )
                    })
                    .collect::<candle_core::Result<_>>()?;
                Tensor::cat(&per, 0)?
            }
        };
        let first = inv_latents.broadcast_as((b, c, 1, lat, lat))?;
        let mut latents = if f == 1 {
            first.contiguous()?
        } else {
            Tensor::cat(&[&first, &noise.narrow(2, 1, f - 1)?], 2)?
        };
        // the reference branch, batch 1 (identical for every variant)
        let mut reference = inv_latents
            .broadcast_as((1, c, f, lat, lat))?
            .contiguous()?;
        // The main passes take the variants `per_call` at a time: samples never interact in
        // the UNet, so the result is the same, and on the CPU one at a time runs as fast per
        // frame as a batch while its activations take a third of the memory for 3 variants.
        let per_call = self.variants_per_call.unwrap_or(b).clamp(1, b);
        let ehs = |e: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            e.broadcast_as((n, e.dim(1)?, e.dim(2)?))?.contiguous()
        };
        let (uncond_n, cond_n) = (ehs(uncond, per_call)?, ehs(cond, per_call)?);
        let chunks: Vec<(usize, usize)> = (0..b)
            .step_by(per_call)
            .map(|v0| (v0, per_call.min(b - v0)))
            .collect();
        // One main pass over all variants: `compose` = (recording, reference frames).
        let main_pass = |latents: &Tensor,
                         tt: f64,
                         cond: bool,
                         compose: Option<(&Recorder, usize)>|
         -> Result<Tensor, PipelineError> {
            let mut outs = Vec::with_capacity(chunks.len());
            for &(v0, n) in &chunks {
                let e = (if cond { &cond_n } else { &uncond_n }).narrow(0, 0, n)?;
                let x = latents.narrow(0, v0, n)?.contiguous()?;
                let mut composer = compose.map(|(recorded, ref_frames)| Composer {
                    recorded,
                    variants: n,
                    ref_frames,
                    lambda: r.lambda,
                });
                let hook = composer
                    .as_mut()
                    .map(|c| c as &mut dyn flipsketch_models::attention::AttentionHook);
                outs.push(unet.forward(&x, tt, &e, hook)?.to_dtype(DType::F32)?);
            }
            Ok(Tensor::cat(&outs, 0)?)
        };

        // 4. generation
        progress.phase(Phase::Denoising, timesteps.len());
        for (i, &t) in timesteps.iter().enumerate() {
            check(progress)?;
            let tt = t as f64;
            let cc = f.saturating_sub(i).max(1);
            let u = main_pass(&latents, tt, false, None)?;
            evals += b * f;
            let cpass = if (i as i64) <= r.tau {
                reference = reference.narrow(2, 0, cc)?;
                let mut rec = Recorder::default();
                let rr = unet.forward(&reference, tt, uncond, Some(&mut rec))?;
                evals += cc;
                reference = sched.step(&rr, t, &reference, 0.0, None)?.prev_sample;
                main_pass(&latents, tt, true, Some((&rec, cc)))?
            } else {
                main_pass(&latents, tt, true, None)?
            };
            evals += b * f;
            let e = (&u + ((cpass - &u)? * r.guidance)?)?;
            latents = sched.step(&e, t, &latents, 0.0, None)?.prev_sample;
            progress.advance(i + 1);
        }

        // 5. decode every frame: clamp(decode(lat / scaling) / 2 + 0.5, 0, 1)
        progress.phase(Phase::Decoding, b * f);
        let flat = (latents
            .permute((0, 2, 1, 3, 4))?
            .reshape((b * f, c, lat, lat))?
            / scaling)?;
        let mut frames = Vec::with_capacity(b * f);
        for k in 0..b * f {
            check(progress)?;
            let img = vae.decode(&flat.narrow(0, k, 1)?.to_dtype(self.dtype)?)?;
            frames.push(((img.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?);
            progress.advance(k + 1);
        }
        let video = Tensor::cat(&frames, 0)?; // (b*f, 3, H, W)
        let (_, ch, hh, ww) = video.dims4()?;
        let video = video
            .reshape((b, f, ch, hh, ww))?
            .permute((0, 1, 3, 4, 2))?
            .contiguous()?;
        Ok(Output {
            inv_latents,
            latents,
            video,
            unet_frame_evals: evals,
        })
    }
}

/// (B, F, H, W, 3) in [0, 1] -> per variant RGB byte frames (rounded).
pub fn video_to_frames(video: &Tensor) -> candle_core::Result<Vec<flipsketch_media::Frames>> {
    let (b, f, h, w, _) = video.dims5()?;
    let bytes = (video.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?;
    (0..b)
        .map(|v| {
            let frames = (0..f)
                .map(|k| bytes.get(v)?.get(k)?.flatten_all()?.to_vec1::<u8>())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(flipsketch_media::Frames {
                width: w as u32,
                height: h as u32,
                frames,
            })
        })
        .collect()
}
