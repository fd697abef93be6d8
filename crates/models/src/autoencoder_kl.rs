//! diffusers `autoencoders/autoencoder_kl.py` and `autoencoders/vae.py`: `AutoencoderKL` with
//! its `Encoder`, `Decoder`, `UNetMidBlock2D` (with the single-head attention) and
//! `DiagonalGaussianDistribution`. Unlike candle-transformers' VAE this exposes the posterior
//! mean (docs/algorithm.md). Frames go through in chunks so memory stays bounded.

use std::path::Path;

use crate::compute::{OpPath, Vb};
use candle_core::{Module, Result, Tensor};
use serde::Deserialize;

use crate::attention::scaled_dot_product_attention;
use crate::error::Error;
use crate::nn::{conv2d, group_norm, linear, Conv2d, GroupNorm, Linear};
use crate::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

/// Serde mirror of the VAE's `config.json` with diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfigFile {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfigFile {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl AutoencoderKLConfigFile {
    pub fn validate(&self) -> std::result::Result<AutoencoderKLConfig, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(
                "down_block_types, up_block_types and block_out_channels must have the same length"
                    .into(),
            );
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(format!("unsupported down block type {t:?}"));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(format!("unsupported up block type {t:?}"));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn {:?} is not supported (only \"silu\")",
                self.act_fn
            ));
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            return Err("shift_factor is not supported".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            return Err("layers_per_block and latent_channels must be positive".into());
        }
        Ok(AutoencoderKLConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            sample_size: self.sample_size,
            scaling_factor: self.scaling_factor,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
            mid_block_add_attention: self.mid_block_add_attention,
        })
    }
}

impl AutoencoderKLConfig {
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let file: AutoencoderKLConfigFile = crate::loading::read_json(path)?;
        file.validate().map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Spatial downsampling factor between pixels and latents.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

const VAE_EPS: f64 = 1e-6;

/// The mid-block attention: `Attention(..., heads=1, norm_num_groups, residual_connection=True,
/// bias=True)` on (n, c, h, w), i.e. GroupNorm, single-head self-attention over pixels, residual.
#[derive(Clone, Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// The attention itself: the kernels' in f32 products (as ever for the VAE) or candle's.
    path: OpPath,
}

impl VaeAttention {
    fn new(c: usize, groups: usize, vb: Vb) -> Result<Self> {
        let path = match vb.plan().other {
            OpPath::Kernels(_) => OpPath::Kernels(flipsketch_kernels::Precision::F32),
            OpPath::Candle => OpPath::Candle,
        };
        Ok(Self {
            path,
            group_norm: group_norm(groups, c, VAE_EPS, vb.pp("group_norm"))?,
            to_q: linear(c, c, true, vb.pp("to_q"))?,
            to_k: linear(c, c, true, vb.pp("to_k"))?,
            to_v: linear(c, c, true, vb.pp("to_v"))?,
            to_out: linear(c, c, true, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((n, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let heads = |t: Tensor| t.unsqueeze(1);
        let q = heads(self.to_q.forward(&hs)?)?;
        let k = heads(self.to_k.forward(&hs)?)?;
        let v = heads(self.to_v.forward(&hs)?)?;
        let out = scaled_dot_product_attention(self.path, &q, &k, &v, (c as f64).powf(-0.5))?
            .squeeze(1)?;
        let out = self.to_out.forward(&out)?;
        let out = out.transpose(1, 2)?.reshape((n, c, h, w))?;
        out + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, [attention], resnet.
#[derive(Clone, Debug)]
struct UNetMidBlock2D {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl UNetMidBlock2D {
    fn new(c: usize, groups: usize, add_attention: bool, vb: Vb) -> Result<Self> {
        let resnet = |i: usize| {
            ResnetBlock2D::new(
                c,
                c,
                None,
                groups,
                VAE_EPS,
                1.0,
                vb.pp(format!("resnets.{i}")),
            )
        };
        Ok(Self {
            resnet0: resnet(0)?,
            attention: if add_attention {
                Some(VaeAttention::new(c, groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet1: resnet(1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet1.forward(&x, None)
    }
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets then an optional resampler.
#[derive(Clone, Debug)]
struct CoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Upsample2D>,
}

impl CoderBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(&x)?;
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(&x, None)?;
        }
        Ok(x)
    }
}

fn resnets(
    n: usize,
    in_c: usize,
    out_c: usize,
    groups: usize,
    vb: &Vb,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|i| {
            let c_in = if i == 0 { in_c } else { out_c };
            ResnetBlock2D::new(
                c_in,
                out_c,
                None,
                groups,
                VAE_EPS,
                1.0,
                vb.pp(format!("resnets.{i}")),
            )
        })
        .collect()
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<CoderBlock>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(c: &AutoencoderKLConfig, vb: Vb) -> Result<Self> {
        let bo = &c.block_out_channels;
        let g = c.norm_num_groups;
        let n = bo.len();
        // The convolutions' image width per level at the configured sample size.
        let at_level = |vb: Vb, level: usize| vb.with_conv_width(c.sample_size >> level);
        let mut down_blocks = Vec::new();
        let mut out_c = bo[0];
        for i in 0..bo.len() {
            let in_c = out_c;
            out_c = bo[i];
            let bvb = at_level(vb.pp(format!("down_blocks.{i}")), i);
            let is_final = i == bo.len() - 1;
            down_blocks.push(CoderBlock {
                resnets: resnets(c.layers_per_block, in_c, out_c, g, &bvb)?,
                // diffusers builds the encoder's downsamplers with padding=0 (pad right/bottom).
                downsampler: if is_final {
                    None
                } else {
                    Some(Downsample2D::new(
                        out_c,
                        out_c,
                        0,
                        bvb.pp("downsamplers.0"),
                    )?)
                },
                upsampler: None,
            });
        }
        let last = bo[bo.len() - 1];
        Ok(Self {
            conv_in: conv2d(c.in_channels, bo[0], 3, 1, 1, at_level(vb.pp("conv_in"), 0))?,
            down_blocks,
            mid_block: UNetMidBlock2D::new(
                last,
                g,
                c.mid_block_add_attention,
                at_level(vb.pp("mid_block"), n - 1),
            )?,
            conv_norm_out: group_norm(g, last, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                last,
                2 * c.latent_channels,
                3,
                1,
                1,
                at_level(vb.pp("conv_out"), n - 1),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out
            .forward_fused(&x, Some(&self.conv_norm_out), None, None)
    }
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<CoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(c: &AutoencoderKLConfig, vb: Vb) -> Result<Self> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let n = rev.len();
        // The convolutions' image width per level (the latents' at level n - 1).
        let at_level = |vb: Vb, level: usize| vb.with_conv_width(c.sample_size >> level);
        let mut up_blocks = Vec::new();
        let mut out_c = rev[0];
        for i in 0..rev.len() {
            let prev = out_c;
            out_c = rev[i];
            let bvb = at_level(vb.pp(format!("up_blocks.{i}")), n - 1 - i);
            let is_final = i == rev.len() - 1;
            up_blocks.push(CoderBlock {
                resnets: resnets(c.layers_per_block + 1, prev, out_c, g, &bvb)?,
                downsampler: None,
                upsampler: if is_final {
                    None
                } else {
                    Some(Upsample2D::new(out_c, out_c, bvb.pp("upsamplers.0"))?)
                },
            });
        }
        let first = c.block_out_channels[0];
        Ok(Self {
            conv_in: conv2d(
                c.latent_channels,
                rev[0],
                3,
                1,
                1,
                at_level(vb.pp("conv_in"), n - 1),
            )?,
            mid_block: UNetMidBlock2D::new(
                rev[0],
                g,
                c.mid_block_add_attention,
                at_level(vb.pp("mid_block"), n - 1),
            )?,
            up_blocks,
            conv_norm_out: group_norm(g, first, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                first,
                c.out_channels,
                3,
                1,
                1,
                at_level(vb.pp("conv_out"), 0),
            )?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x)?;
        for b in &self.up_blocks {
            x = b.forward(&x)?;
        }
        self.conv_out
            .forward_fused(&x, Some(&self.conv_norm_out), None, None)
    }
}

/// The VAE posterior (`DiagonalGaussianDistribution`).
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// mean + exp(logvar / 2) * noise, with the noise supplied by the caller.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        &self.mean + (std * noise.to_dtype(self.mean.dtype())?)?
    }
}

#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

/// Frames encoded or decoded at once: bounds activation memory at large batch*frames.
pub const VAE_CHUNK: usize = 4;

impl AutoencoderKL {
    pub fn new(c: &AutoencoderKLConfig, vb: Vb) -> Result<Self> {
        let l = c.latent_channels;
        Ok(Self {
            encoder: Encoder::new(c, vb.pp("encoder"))?,
            decoder: Decoder::new(c, vb.pp("decoder"))?,
            quant_conv: if c.use_quant_conv {
                Some(conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if c.use_post_quant_conv {
                Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Encodes images (n, in_channels, h, w) to the posterior, `VAE_CHUNK` images at a time.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let moments = chunked(images, |x| {
            let m = self.encoder.forward(x)?;
            match &self.quant_conv {
                Some(q) => q.forward(&m),
                None => Ok(m),
            }
        })?;
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes latents (n, latent_channels, h, w) (already divided by the scaling factor) to
    /// images (n, out_channels, 8h, 8w) in the decoder's range (about [-1, 1]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        chunked(latents, |z| {
            let z = match &self.post_quant_conv {
                Some(p) => p.forward(z)?,
                None => z.clone(),
            };
            self.decoder.forward(&z)
        })
    }
}

fn chunked(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n <= VAE_CHUNK {
        return f(x);
    }
    let mut outs = Vec::with_capacity(n.div_ceil(VAE_CHUNK));
    let mut start = 0;
    while start < n {
        let len = VAE_CHUNK.min(n - start);
        outs.push(f(&x.narrow(0, start, len)?)?);
        start += len;
    }
    Tensor::cat(&outs, 0)
}
