//! `flipsketch bench make-model DIR`: a model folder of the real ModelScope text-to-video shape
//! with random weights, written by flipsketch itself, for benchmarks and GPU checks where the
//! checkpoint is not at hand (an offline GPU box, CI): the configs are the real ones
//! (tools/gpu/real-shape, written by diffusers 0.35.2 / transformers 4.57.6 for the ModelScope
//! 1.7B shape), the tokenizer is CLIP's, and every tensor the models ask for is drawn once:
//! matrices and kernels N(0, 1/fan_in), norm weights 1 + 0.2 N(0, 1), biases and embeddings
//! 0.1 N(0, 1) and 0.5 N(0, 1) (the rule of tools/reference/make_fixtures.py). On disk as the
//! real checkpoint is: UNet and text encoder f32, VAE f16. The outputs are noise-like; only
//! speed and memory mean anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use clap::Args;
use flipsketch_models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use flipsketch_models::clip_text::{ClipTextConfig, ClipTextModel};
use flipsketch_models::compute::{ComputePlan, Ops, Vb};
use flipsketch_models::unets::unet_3d_condition::{UNet3DConditionModel, UNet3DConfig};
use rand::SeedableRng;
use rand_distr::Distribution;

#[derive(Args, Debug)]
pub struct MakeModel {
    /// The folder to write (must not exist, or be empty).
    pub out: PathBuf,
    /// Seed of the weights.
    #[arg(long, default_value_t = 3)]
    pub seed: u64,
}

/// (path in the folder, contents): the real configs and CLIP's tokenizer.
const FILES: &[(&str, &str)] = &[
    (
        "unet/config.json",
        include_str!("../../../tools/gpu/real-shape/unet/config.json"),
    ),
    (
        "vae/config.json",
        include_str!("../../../tools/gpu/real-shape/vae/config.json"),
    ),
    (
        "text_encoder/config.json",
        include_str!("../../../tools/gpu/real-shape/text_encoder/config.json"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_str!("../../../tools/gpu/real-shape/scheduler/scheduler_config.json"),
    ),
    (
        "tokenizer/vocab.json",
        include_str!("../../../tests/fixtures/tiny/tokenizer/vocab.json"),
    ),
    (
        "tokenizer/merges.txt",
        include_str!("../../../tests/fixtures/tiny/tokenizer/merges.txt"),
    ),
    (
        "tokenizer/tokenizer_config.json",
        include_str!("../../../tests/fixtures/tiny/tokenizer/tokenizer_config.json"),
    ),
    (
        "tokenizer/special_tokens_map.json",
        include_str!("../../../tests/fixtures/tiny/tokenizer/special_tokens_map.json"),
    ),
];

/// A weight source that draws every tensor a model asks for, and keeps them for saving.
struct Random {
    rng: Mutex<rand_chacha::ChaCha8Rng>,
    made: Made,
}

type Made = std::sync::Arc<Mutex<HashMap<String, Tensor>>>;

impl Random {
    fn new(seed: u64, made: Made) -> Self {
        Self {
            rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
            made,
        }
    }

    /// (mean, std) of a tensor by its name and shape.
    fn law(name: &str, dims: &[usize]) -> (f32, f32) {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        if name.contains("embedding") && !name.contains("time_embedding") {
            return (0.0, 0.5);
        }
        match (leaf, dims.len()) {
            ("weight", 1) => (1.0, 0.2),
            ("bias", _) => (0.0, 0.1),
            (_, n) if n >= 2 => {
                let fan_in: usize = dims[1..].iter().product();
                (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
            }
            _ => (0.0, 0.1),
        }
    }
}

impl SimpleBackend for Random {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (mean, std) = Self::law(name, s.dims());
        let normal = rand_distr::Normal::new(mean, std)
            .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        let values: Vec<f32> = {
            let mut rng = self.rng.lock().expect("rng lock");
            (0..s.elem_count())
                .map(|_| normal.sample(&mut *rng))
                .collect()
        };
        let t = Tensor::from_vec(values, s, &Device::Cpu)?;
        self.made
            .lock()
            .expect("tensor map lock")
            .insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// Builds one component from random weights and writes them as `file` in `dtype`.
fn component<M>(
    dir: &Path,
    file: &str,
    dtype: DType,
    seed: u64,
    build: impl FnOnce(Vb) -> candle_core::Result<M>,
) -> Result<usize> {
    let made = Made::default();
    let backend: Box<dyn SimpleBackend> = Box::new(Random::new(seed, made.clone()));
    // candle's ops, f32 on the CPU: nothing is packed for the kernels, the tensors stay shared
    let plan = ComputePlan::new(DType::F32, &Device::Cpu, Ops::Candle);
    let vb = Vb::new(
        candle_nn::VarBuilder::from_backend(backend, DType::F32, Device::Cpu),
        plan,
    );
    let model = build(vb)?;
    drop(model);
    let made = std::mem::take(&mut *made.lock().expect("tensor map lock"));
    let params: usize = made.values().map(|t| t.elem_count()).sum();
    let tensors = made
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let path = dir.join(file);
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // the safetensors writer creates its file readable by its owner only (0600); the model's
    // other files, and a downloaded model's, are readable by everyone
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot make {} readable", path.display()))?;
    }
    Ok(params)
}

pub fn run(a: MakeModel) -> Result<()> {
    let t0 = Instant::now();
    if a.out.exists()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("{} exists and is not an empty folder", a.out.display());
    }
    for (path, text) in FILES {
        let p = a.out.join(path);
        std::fs::create_dir_all(p.parent().expect("has a folder"))
            .with_context(|| format!("cannot create {}", p.display()))?;
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let read = |p: &str| a.out.join(p);
    let ucfg = UNet3DConfig::from_file(&read("unet/config.json"))?;
    let vcfg = AutoencoderKLConfig::from_file(&read("vae/config.json"))?;
    let tcfg = ClipTextConfig::from_file(&read("text_encoder/config.json"))?;
    let n_text = component(
        &read("text_encoder"),
        "model.safetensors",
        DType::F32,
        a.seed,
        |vb| ClipTextModel::new(&tcfg, vb),
    )?;
    let n_vae = component(
        &read("vae"),
        "diffusion_pytorch_model.safetensors",
        DType::F16,
        a.seed + 1,
        |vb| AutoencoderKL::new(&vcfg, vb),
    )?;
    let n_unet = component(
        &read("unet"),
        "diffusion_pytorch_model.safetensors",
        DType::F32,
        a.seed + 2,
        |vb| UNet3DConditionModel::new(&ucfg, vb),
    )?;
    eprintln!(
        "random-weight model: UNet {n_unet}, text encoder {n_text}, VAE {n_vae} parameters, written in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    println!("{}", a.out.display());
    Ok(())
}
