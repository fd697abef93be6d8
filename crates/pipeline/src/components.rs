//! The model folder (diffusers layout) loaded as the five components FlipSketch runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use flipsketch_models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use flipsketch_models::clip_text::{ClipTextConfig, ClipTextModel};
use flipsketch_models::compute::ComputePlan;
use flipsketch_models::loading::{
    load_component, FolderLayout, LoadReport, Vb, DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS,
};
use flipsketch_models::unets::unet_3d_condition::{UNet3DConditionModel, UNet3DConfig};
use flipsketch_schedulers::DdimScheduler;

use crate::text::{ClipTokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum ComponentsError {
    #[error("model folder {} does not exist or is not a folder", .0.display())]
    NoFolder(PathBuf),
    #[error("{}: missing component folder {name}/", dir.display())]
    MissingComponent { dir: PathBuf, name: &'static str },
    #[error(transparent)]
    Model(#[from] flipsketch_models::Error),
    #[error(transparent)]
    Scheduler(#[from] flipsketch_schedulers::Error),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// What loading one component found, for `flipsketch inspect` and the logs.
#[derive(Clone, Debug)]
pub struct ComponentReport {
    pub name: &'static str,
    /// One line describing the configuration.
    pub summary: String,
    /// Weight files, dtypes on disk, parameter count, unexpected tensors (none for the
    /// tokenizer and scheduler).
    pub weights: Option<LoadReport>,
    pub seconds: f64,
}

/// The files of a model folder [`Components::load`] reads (what a download fetches).
pub const MODEL_FILES: FolderLayout = FolderLayout {
    required: &[
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "vae/config.json",
        "unet/config.json",
    ],
    optional: &[
        "model_index.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
    ],
    // the tokenizer as transformers 4 writes it, or as transformers 5 does
    one_of: &[&[
        &["tokenizer/vocab.json", "tokenizer/merges.txt"],
        &["tokenizer/tokenizer.json"],
    ]],
    weights: &[
        ("text_encoder", TRANSFORMERS_WEIGHTS),
        ("vae", DIFFUSERS_WEIGHTS),
        ("unet", DIFFUSERS_WEIGHTS),
    ],
    marker: "unet/config.json",
};

pub struct Components {
    pub tokenizer: ClipTokenizer,
    /// `None` once [`crate::Pipeline::run_once`] has encoded its prompts and released it.
    pub text_encoder: Option<ClipTextModel>,
    pub vae: AutoencoderKL,
    pub unet: UNet3DConditionModel,
    pub scheduler: DdimScheduler,
    pub reports: Vec<ComponentReport>,
    /// How the models run (which ops take the CPU kernels, the activations' dtype).
    pub plan: ComputePlan,
}

fn component_dir(dir: &Path, name: &'static str) -> Result<PathBuf, ComponentsError> {
    let d = dir.join(name);
    if d.is_dir() {
        Ok(d)
    } else {
        Err(ComponentsError::MissingComponent {
            dir: dir.to_path_buf(),
            name,
        })
    }
}

impl Components {
    /// Loads tokenizer, text encoder, VAE, UNet and scheduler from a diffusers-layout folder,
    /// weights converted to `dtype` on `device`. `variant` (e.g. "fp16") prefers each
    /// component's `*.<variant>.*` weight files, taking its plain files where it has none, as
    /// diffusers' pipeline loader does. `on_component` is told each component's name before it
    /// loads (for progress display).
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        variant: Option<&str>,
        mut on_component: impl FnMut(&'static str),
    ) -> Result<Self, ComponentsError> {
        if !dir.is_dir() {
            return Err(ComponentsError::NoFolder(dir.to_path_buf()));
        }
        // the plan every load_component below makes too
        let plan = ComputePlan::current(dtype, device)
            .map_err(|e| ComponentsError::Model(flipsketch_models::Error::Invalid(e)))?;
        let mut reports = Vec::new();

        on_component("tokenizer");
        let t0 = Instant::now();
        let tokenizer = ClipTokenizer::from_dir(&component_dir(dir, "tokenizer")?)?;
        reports.push(ComponentReport {
            name: "tokenizer",
            summary: format!(
                "CLIP BPE, max length {}, pad id {}",
                tokenizer.max_length(),
                tokenizer.pad_id()
            ),
            weights: None,
            seconds: t0.elapsed().as_secs_f64(),
        });

        on_component("scheduler");
        let t0 = Instant::now();
        let sdir = component_dir(dir, "scheduler")?;
        let scheduler = DdimScheduler::from_file(&sdir.join("scheduler_config.json"))?;
        let c = scheduler.config();
        reports.push(ComponentReport {
            name: "scheduler",
            summary: format!(
                "DDIM, {} train steps, {} betas {}..{}, {} spacing, steps_offset {}, set_alpha_to_one {}, {} prediction",
                c.num_train_timesteps,
                c.beta_schedule,
                c.beta_start,
                c.beta_end,
                c.timestep_spacing,
                c.steps_offset,
                c.set_alpha_to_one,
                c.prediction_type
            ),
            weights: None,
            seconds: t0.elapsed().as_secs_f64(),
        });

        // The text encoder and the VAE load on a second thread while the UNet loads here:
        // loading is mostly the kernel faulting in and zeroing fresh pages, and copying, which
        // one thread does a page at a time.
        // A missing folder is reported before anything big loads.
        for name in ["text_encoder", "vae", "unet"] {
            component_dir(dir, name)?;
        }
        on_component("text_encoder");
        on_component("vae");
        on_component("unet");
        let (side, unet) = std::thread::scope(|scope| {
            let side = scope.spawn(|| {
                let te = load_text_encoder(dir, dtype, device, variant)?;
                let vae = load_vae(dir, dtype, device, variant)?;
                Ok::<_, ComponentsError>((te, vae))
            });
            let unet = load_unet(dir, dtype, device, variant);
            (side.join(), unet)
        });
        let ((text_encoder, te_report), (vae, vae_report)) = match side {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let (unet, unet_report) = unet?;
        reports.extend([te_report, vae_report, unet_report]);

        Ok(Self {
            tokenizer,
            text_encoder: Some(text_encoder),
            vae,
            unet,
            scheduler,
            reports,
            plan,
        })
    }
}

type Loaded<M> = Result<(M, ComponentReport), ComponentsError>;

/// One model component of `dir`: its `config.json` read by `config`, its weights (one of
/// `candidates`) built by `build`, and a report whose one-line summary `summary` writes.
#[allow(clippy::too_many_arguments)]
fn load_model<C, M>(
    dir: &Path,
    name: &'static str,
    candidates: &[String],
    dtype: DType,
    device: &Device,
    config: impl FnOnce(&Path) -> flipsketch_models::error::Result<C>,
    build: impl FnOnce(&C, Vb) -> candle_core::Result<M>,
    summary: impl FnOnce(&C) -> String,
) -> Loaded<M> {
    let t0 = Instant::now();
    let cdir = component_dir(dir, name)?;
    let cfg = config(&cdir.join("config.json"))?;
    let (model, rep) =
        load_component(name, &cdir, candidates, dtype, device, |vb| build(&cfg, vb))?;
    let report = ComponentReport {
        name,
        summary: summary(&cfg),
        weights: Some(rep),
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((model, report))
}

fn load_text_encoder(
    dir: &Path,
    dtype: DType,
    device: &Device,
    variant: Option<&str>,
) -> Loaded<ClipTextModel> {
    load_model(
        dir,
        "text_encoder",
        &TRANSFORMERS_WEIGHTS.candidates(variant),
        dtype,
        device,
        ClipTextConfig::from_file,
        ClipTextModel::new,
        |c| {
            format!(
                "CLIPTextModel, {} wide, {} layers, {} heads, {:?}, vocab {}",
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.activation,
                c.vocab_size
            )
        },
    )
}

fn load_vae(
    dir: &Path,
    dtype: DType,
    device: &Device,
    variant: Option<&str>,
) -> Loaded<AutoencoderKL> {
    load_model(
        dir,
        "vae",
        &DIFFUSERS_WEIGHTS.candidates(variant),
        dtype,
        device,
        AutoencoderKLConfig::from_file,
        AutoencoderKL::new,
        |c| {
            format!(
                "AutoencoderKL, channels {:?}, {} layers per block, {} latent channels, scaling factor {}",
                c.block_out_channels, c.layers_per_block, c.latent_channels, c.scaling_factor
            )
        },
    )
}

fn load_unet(
    dir: &Path,
    dtype: DType,
    device: &Device,
    variant: Option<&str>,
) -> Loaded<UNet3DConditionModel> {
    load_model(
        dir,
        "unet",
        &DIFFUSERS_WEIGHTS.candidates(variant),
        dtype,
        device,
        UNet3DConfig::from_file,
        UNet3DConditionModel::new,
        |c| {
            format!(
                "UNet3DConditionModel, channels {:?}, {} layers per block, head size {:?}, cross-attention {}, sample size {:?}",
                c.block_out_channels, c.layers_per_block, c.head_dim, c.cross_attention_dim, c.sample_size
            )
        },
    )
}
