//! `flipsketch bench unet` / `bench vae`: times one UNet3D forward, or one VAE decode of a
//! frame, at a given shape (random inputs), best of N after a warm-up, and reports peak memory.
//! The PyTorch side of the comparison is `tools/reference/bench_unet.py` /
//! `tools/reference/bench_vae.py` with the same arguments.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use flipsketch_models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use flipsketch_models::loading::{load_component, DIFFUSERS_WEIGHTS};
use flipsketch_models::unets::unet_3d_condition::{UNet3DConditionModel, UNet3DConfig};

use crate::Precision;

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// One UNet3D forward pass.
    Unet(UnetBench),
    /// One VAE decode of a frame (latents to pixels), as in the last phase of `animate`.
    Vae(VaeBench),
    /// Writes a model folder of the real ModelScope shape (UNet 1.41 B parameters) with random
    /// weights, for benchmarks and GPU checks on machines without the checkpoint (no download,
    /// no Python): about 7 GB.
    MakeModel(crate::random_model::MakeModel),
}

/// What both benchmarks take.
#[derive(Args, Debug)]
pub struct Common {
    /// Model folder (diffusers layout, with unet/ or vae/).
    #[arg(long)]
    pub model: PathBuf,
    /// Latent side (32 = 256 px images).
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// Where the model runs: auto (a GPU when this binary has CUDA or Metal support and one is
    /// there, else the CPU), cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "auto")]
    pub device: crate::device::DeviceArg,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also print the time spent in each CPU kernel family during the last repetition.
    #[arg(long)]
    pub breakdown: bool,
}

#[derive(Args, Debug)]
pub struct VaeBench {
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct UnetBench {
    #[arg(long, default_value_t = 10)]
    pub frames: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Unet(a) => unet(a),
        Bench::Vae(a) => vae(a),
        Bench::MakeModel(a) => crate::random_model::run(a),
    }
}

fn unet(u: UnetBench) -> Result<()> {
    let a = &u.common;
    if u.frames == 0 || u.batch == 0 || a.size == 0 || a.reps == 0 {
        bail!("--frames, --batch, --size and --reps must be positive");
    }
    let dir = a.model.join("unet");
    let cfg = UNet3DConfig::from_file(&dir.join("config.json"))?;
    let dev = a.device.open()?;
    let dtype = a.dtype.dtype(&dev);
    let unet = load("unet", &dir, dtype, &dev, |vb| {
        UNet3DConditionModel::new(&cfg, vb)
    })?;
    // inputs in the activations' dtype (f32 on the CPU kernels, the dtype itself on a GPU)
    let act = activations(dtype, &dev)?;
    let sample = Tensor::randn(
        0f32,
        1.,
        (u.batch, cfg.in_channels, u.frames, a.size, a.size),
        &dev,
    )?
    .to_dtype(act)?;
    let ehs =
        Tensor::randn(0f32, 1., (u.batch, 77, cfg.cross_attention_dim), &dev)?.to_dtype(act)?;
    let best = repeat(a.reps, a.breakdown, || {
        unet.forward(&sample, 500.0, &ehs, None)
    })?;
    println!("unet_forward_s {best:.3}");
    report_memory();
    Ok(())
}

fn vae(v: VaeBench) -> Result<()> {
    let a = &v.common;
    if a.size == 0 || a.reps == 0 {
        bail!("--size and --reps must be positive");
    }
    let dir = a.model.join("vae");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
    let dev = a.device.open()?;
    let dtype = a.dtype.dtype(&dev);
    let vae = load("vae", &dir, dtype, &dev, |vb| AutoencoderKL::new(&cfg, vb))?;
    let act = activations(dtype, &dev)?;
    let latents =
        Tensor::randn(0f32, 1., (1, cfg.latent_channels, a.size, a.size), &dev)?.to_dtype(act)?;
    let best = repeat(a.reps, a.breakdown, || vae.decode(&latents))?;
    println!("vae_decode_s {best:.3}");
    report_memory();
    Ok(())
}

/// The dtype a model loaded for `dtype` on `device` computes in.
fn activations(dtype: DType, device: &Device) -> Result<DType> {
    Ok(
        flipsketch_models::compute::ComputePlan::current(dtype, device)
            .map_err(anyhow::Error::msg)?
            .dtype,
    )
}

/// Loads one component on `device` and prints its load time and the memory its weights take.
fn load<M>(
    component: &str,
    dir: &std::path::Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(flipsketch_models::compute::Vb) -> candle_core::Result<M>,
) -> Result<M> {
    let t0 = Instant::now();
    let (model, _) = load_component(
        component,
        dir,
        &DIFFUSERS_WEIGHTS.candidates(None),
        dtype,
        device,
        build,
    )
    .with_context(|| format!("cannot load {}", dir.display()))?;
    println!("load_s {:.2}", t0.elapsed().as_secs_f64());
    println!("weights_mib {:.0}", crate::live_mib());
    Ok(model)
}

/// Runs `f` once to warm up and `reps` times timed; returns the best time in seconds.
fn repeat(
    reps: usize,
    breakdown: bool,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        if breakdown {
            flipsketch_kernels::stats::enable();
        }
        let t = Instant::now();
        let out = f()?;
        out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        let s = t.elapsed().as_secs_f64();
        if rep == 0 {
            println!("warmup_s {s:.3}");
        } else {
            println!("rep {rep}: {s:.3} s");
            best = best.min(s);
        }
    }
    if breakdown {
        println!("last repetition by kernel (wall time; GFLOP/s where the kernel multiplies):");
        for (kernel, calls, secs, gflop) in flipsketch_kernels::stats::snapshot() {
            let rate = if gflop > 0.0 && secs > 0.0 {
                format!(", {:.0} GFLOP/s", gflop / secs)
            } else {
                String::new()
            };
            println!("  {kernel:?}: {calls} calls, {secs:.3} s{rate}");
        }
        println!("the longest shapes (linear: rows x k x columns; conv: images x k x pixels x c_out; attention: items x queries x keys x head size; norms: elements):");
        for s in flipsketch_kernels::stats::shapes().iter().take(80) {
            let [a, b, c, d] = s.shape;
            use flipsketch_kernels::stats::Kernel;
            let shape = match s.kernel {
                Kernel::Linear => format!("{a}x{b}x{c}"),
                Kernel::GroupNorm | Kernel::Geglu => format!("{a}"),
                _ => format!("{a}x{b}x{c}x{d}"),
            };
            println!(
                "  {:?} {shape}: {} calls, {:.3} s, {:.0} GFLOP/s",
                s.kernel,
                s.calls,
                s.seconds,
                s.gflop / s.seconds.max(1e-12)
            );
        }
    }
    Ok(best)
}

fn report_memory() {
    if let Some(p) = crate::peak_rss_mib() {
        println!("peak_memory_mib {p:.0}");
    }
    println!("peak_live_heap_mib {:.0}", crate::peak_live_mib());
}
