//! diffusers `unets/unet_3d_condition.py`: `UNet3DConditionModel`, ModelScope's text-to-video
//! UNet, configured from its `config.json`.

use std::path::Path;

use crate::compute::Vb;
use candle_core::{DType, Device, Module, Result, Tensor};
use serde::Deserialize;

use crate::attention::{reborrow, Hook};
use crate::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::error::Error;
use crate::nn::{conv2d, group_norm, Conv2d, GroupNorm};
use crate::transformers::transformer_temporal::TransformerTemporalModel;
use crate::unets::unet_3d_blocks::{BlockSettings, DownBlock, UNetMidBlock3DCrossAttn, UpBlock};

/// An int or a per-block list, as diffusers accepts for `attention_head_dim`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

/// Serde mirror of the UNet's `config.json` with the Python defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UNet3DConfigFile {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub time_cond_proj_dim: Option<usize>,
}

impl Default for UNet3DConfigFile {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            down_block_types: [
                "CrossAttnDownBlock3D",
                "CrossAttnDownBlock3D",
                "CrossAttnDownBlock3D",
                "DownBlock3D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock3D",
                "CrossAttnUpBlock3D",
                "CrossAttnUpBlock3D",
                "CrossAttnUpBlock3D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1024,
            attention_head_dim: PerBlock::One(64),
            num_attention_heads: None,
            time_cond_proj_dim: None,
        }
    }
}

/// The validated runtime configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct UNet3DConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Per level: does the down block have attention.
    pub down_attention: Vec<bool>,
    /// Per level (in up order): does the up block have attention.
    pub up_attention: Vec<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    /// Head size per level.
    pub head_dim: Vec<usize>,
}

impl UNet3DConfigFile {
    pub fn validate(&self) -> std::result::Result<UNet3DConfig, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({n}) must have the same length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if self.num_attention_heads.is_some() {
            // diffusers raises NotImplementedError for this too.
            return Err("num_attention_heads is not supported by UNet3DConditionModel; use attention_head_dim".into());
        }
        if self.time_cond_proj_dim.is_some() {
            return Err("time_cond_proj_dim is not supported".into());
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn {:?} is not supported (only \"silu\")",
                self.act_fn
            ));
        }
        let groups = self
            .norm_num_groups
            .ok_or("norm_num_groups null is not supported")?;
        if self.layers_per_block == 0 {
            return Err("layers_per_block must be at least 1".into());
        }
        let down_attention = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock3D" => Ok(true),
                "DownBlock3D" => Ok(false),
                other => Err(format!("unknown down block type {other:?}")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let up_attention = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock3D" => Ok(true),
                "UpBlock3D" => Ok(false),
                other => Err(format!("unknown up block type {other:?}")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let head_dim = match &self.attention_head_dim {
            PerBlock::One(d) => vec![*d; n],
            PerBlock::Each(v) if v.len() == n => v.clone(),
            PerBlock::Each(v) => {
                return Err(format!(
                    "attention_head_dim has {} entries for {n} blocks",
                    v.len()
                ))
            }
        };
        for (i, (&c, &d)) in self.block_out_channels.iter().zip(&head_dim).enumerate() {
            if groups == 0 || c % groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups {groups}"
                ));
            }
            if d == 0 || c % d != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of attention_head_dim {d}"
                ));
            }
        }
        Ok(UNet3DConfig {
            sample_size: self.sample_size,
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            down_attention,
            up_attention,
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups: groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: self.cross_attention_dim,
            head_dim,
        })
    }
}

impl UNet3DConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let file: UNet3DConfigFile = crate::loading::read_json(path)?;
        file.validate().map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// `transformer_in` has 8 heads of `head_dim[0]` (diffusers hard-codes 8).
    pub const TRANSFORMER_IN_HEADS: usize = 8;
}

#[derive(Clone, Debug)]
pub struct UNet3DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    transformer_in: TransformerTemporalModel,
    down_blocks: Vec<DownBlock>,
    mid_block: UNetMidBlock3DCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet3DConfig,
    device: Device,
    dtype: DType,
}

impl UNet3DConditionModel {
    pub fn new(config: &UNet3DConfig, vb: Vb) -> Result<Self> {
        let c = config;
        let bo = &c.block_out_channels;
        let n = bo.len();
        let time_embed_dim = bo[0] * 4;
        let settings = |level: usize, scale: f64| BlockSettings {
            temb_channels: time_embed_dim,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            cross_attention_dim: c.cross_attention_dim,
            head_dim: c.head_dim[level],
            output_scale_factor: scale,
        };

        // The convolutions' image width per level at the configured sample size (which picks
        // the direct convolution for the wide levels).
        let at_level = |vb: Vb, level: usize| match c.sample_size {
            Some(s) => vb.with_conv_width(s >> level),
            None => vb,
        };
        let conv_in = conv2d(c.in_channels, bo[0], 3, 1, 1, at_level(vb.pp("conv_in"), 0))?;
        let time_embedding =
            TimestepEmbedding::new(bo[0], time_embed_dim, vb.pp("time_embedding"))?;
        let transformer_in = TransformerTemporalModel::new(
            UNet3DConfig::TRANSFORMER_IN_HEADS,
            c.head_dim[0],
            bo[0],
            1,
            c.norm_num_groups,
            vb.pp("transformer_in"),
        )?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = bo[0];
        for (i, &attn) in c.down_attention.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = bo[i];
            let is_final = i == n - 1;
            down_blocks.push(DownBlock::new(
                attn,
                c.layers_per_block,
                input_channel,
                output_channel,
                !is_final,
                c.downsample_padding,
                &settings(i, 1.0),
                at_level(vb.pp(format!("down_blocks.{i}")), i),
            )?);
        }

        let mid_block = UNetMidBlock3DCrossAttn::new(
            bo[n - 1],
            &settings(n - 1, c.mid_block_scale_factor),
            at_level(vb.pp("mid_block"), n - 1),
        )?;

        let reversed: Vec<usize> = bo.iter().rev().copied().collect();
        let reversed_heads: Vec<usize> = c.head_dim.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = reversed[0];
        for (i, &attn) in c.up_attention.iter().enumerate() {
            let is_final = i == n - 1;
            let prev_output_channel = output_channel;
            output_channel = reversed[i];
            let input_channel = reversed[(i + 1).min(n - 1)];
            let mut s = settings(0, 1.0);
            s.head_dim = reversed_heads[i];
            up_blocks.push(UpBlock::new(
                attn,
                c.layers_per_block + 1,
                input_channel,
                output_channel,
                prev_output_channel,
                !is_final,
                &s,
                at_level(vb.pp(format!("up_blocks.{i}")), n - 1 - i),
            )?);
        }

        Ok(Self {
            conv_in,
            time_embedding,
            transformer_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                c.norm_num_groups,
                bo[0],
                c.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(
                bo[0],
                c.out_channels,
                3,
                1,
                1,
                at_level(vb.pp("conv_out"), 0),
            )?,
            config: c.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &UNet3DConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Predicts the noise of `sample` (batch, in_channels, frames, h, w) at `timestep` (the
    /// same for the whole batch) given `encoder_hidden_states` (batch, seq, cross_dim).
    /// Returns (batch, out_channels, frames, h, w) in the model dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        mut hook: Hook<'_>,
    ) -> Result<Tensor> {
        let (batch, channels, num_frames, height, width) = sample.dims5()?;
        if channels != self.config.in_channels {
            candle_core::bail!(
                "unet: sample has {channels} channels, the model takes {}",
                self.config.in_channels
            )
        }
        let (eb, _seq, edim) = encoder_hidden_states.dims3()?;
        if eb != batch || edim != self.config.cross_attention_dim {
            candle_core::bail!(
                "unet: encoder_hidden_states {:?} does not match batch {batch} and cross_attention_dim {}",
                encoder_hidden_states.dims(),
                self.config.cross_attention_dim
            )
        }
        if num_frames == 0 || height == 0 || width == 0 {
            candle_core::bail!("unet: empty sample {:?}", sample.dims())
        }
        // Sizes not divisible by 2^upsamplers make the up path upsample to the skip's size.
        let num_upsamplers = self.up_blocks.len() - 1;
        let factor = 1usize << num_upsamplers;
        let forward_upsample_size = height % factor != 0 || width % factor != 0;

        // 1. time, repeated per frame (repeat-interleave)
        let bo0 = self.config.block_out_channels[0];
        let t_emb = timestep_embedding(&vec![timestep; batch], bo0, true, 0.0, &self.device)?
            .to_dtype(self.dtype)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        let emb = repeat_interleave(&emb, num_frames)?;
        // diffusers repeat_interleaves the text over the frames here; the cross-attentions
        // take it once per sample instead (their keys and values serve all frames of a sample:
        // the same values, a tenth of the projections).
        let ehs = encoder_hidden_states.to_dtype(self.dtype)?;

        // 2. pre-process: (b, c, f, h, w) -> (b*f, c, h, w)
        let x = sample
            .to_dtype(self.dtype)?
            .permute((0, 2, 1, 3, 4))?
            .reshape((batch * num_frames, channels, height, width))?;
        let x = self.conv_in.forward(&x)?;
        let mut x = self
            .transformer_in
            .forward(&x, num_frames, reborrow(&mut hook))?;

        // 3. down
        let mut res_samples = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, res) = block.forward(&x, &emb, &ehs, num_frames, reborrow(&mut hook))?;
            x = out;
            res_samples.extend(res);
        }

        // 4. mid
        x = self
            .mid_block
            .forward(&x, &emb, &ehs, num_frames, reborrow(&mut hook))?;

        // 5. up
        for (i, block) in self.up_blocks.iter().enumerate() {
            let is_final = i == self.up_blocks.len() - 1;
            let take = block.num_layers();
            let res = res_samples.split_off(res_samples.len() - take);
            let upsample_size = if !is_final && forward_upsample_size {
                let last = res_samples.last().expect("residual for the next level");
                Some((last.dim(2)?, last.dim(3)?))
            } else {
                None
            };
            x = block.forward(
                &x,
                res,
                &emb,
                &ehs,
                upsample_size,
                num_frames,
                reborrow(&mut hook),
            )?;
        }

        // 6. post-process, back to (b, c, f, h, w)
        let x = self
            .conv_out
            .forward_fused(&x, Some(&self.conv_norm_out), None, None)?;
        let out_c = self.config.out_channels;
        x.reshape((batch, num_frames, out_c, height, width))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }
}

/// torch `repeat_interleave(n, dim=0)`.
pub fn repeat_interleave(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    let b = dims[0];
    let x = x.unsqueeze(1)?;
    let mut target = vec![b, n];
    target.extend_from_slice(&dims[1..]);
    dims[0] = b * n;
    x.broadcast_as(target)?.contiguous()?.reshape(dims)
}
