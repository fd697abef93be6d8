//! diffusers `unets/unet_3d_blocks.py`: the blocks of ModelScope's UNet3D.
//!
//! Every block runs on (batch*frames, c, h, w) with frames folded into the batch, exactly where
//! diffusers folds them. Each layer is: ResnetBlock2D -> TemporalConvLayer [-> Transformer2DModel
//! -> TransformerTemporalModel]; the spatial transformer's heads are `channels / head_dim`
//! (docs/algorithm.md: the config's `attention_head_dim` is the head size).

use crate::compute::Vb;
use candle_core::{Result, Tensor};

use crate::attention::{reborrow, Hook};
use crate::resnet::{Downsample2D, ResnetBlock2D, TemporalConvLayer, Upsample2D};
use crate::transformers::transformer_2d::Transformer2DModel;
use crate::transformers::transformer_temporal::TransformerTemporalModel;

/// Shared settings of the blocks of one UNet.
#[derive(Clone, Copy, Debug)]
pub struct BlockSettings {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub cross_attention_dim: usize,
    /// Head size of the spatial and temporal transformers.
    pub head_dim: usize,
    pub output_scale_factor: f64,
}

/// The spatial + temporal transformer pair of a cross-attention layer.
#[derive(Clone, Debug)]
struct AttnPair {
    attn: Transformer2DModel,
    temp_attn: TransformerTemporalModel,
}

impl AttnPair {
    fn new(channels: usize, s: &BlockSettings, i: usize, vb: &Vb) -> Result<Self> {
        if channels % s.head_dim != 0 {
            candle_core::bail!(
                "{}: {channels} channels are not a multiple of attention_head_dim {}",
                vb.prefix(),
                s.head_dim
            )
        }
        let heads = channels / s.head_dim;
        Ok(Self {
            attn: Transformer2DModel::new(
                heads,
                s.head_dim,
                channels,
                1,
                s.cross_attention_dim,
                s.groups,
                vb.pp(format!("attentions.{i}")),
            )?,
            temp_attn: TransformerTemporalModel::new(
                heads,
                s.head_dim,
                channels,
                1,
                s.groups,
                vb.pp(format!("temp_attentions.{i}")),
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ehs: &Tensor,
        num_frames: usize,
        mut hook: Hook<'_>,
    ) -> Result<Tensor> {
        let x = self.attn.forward(x, ehs, num_frames, reborrow(&mut hook))?;
        self.temp_attn.forward(&x, num_frames, hook)
    }
}

fn resnet_and_temp_conv(
    in_c: usize,
    out_c: usize,
    s: &BlockSettings,
    i: usize,
    vb: &Vb,
) -> Result<(ResnetBlock2D, TemporalConvLayer)> {
    Ok((
        ResnetBlock2D::new(
            in_c,
            out_c,
            Some(s.temb_channels),
            s.groups,
            s.eps,
            s.output_scale_factor,
            vb.pp(format!("resnets.{i}")),
        )?,
        TemporalConvLayer::new(out_c, out_c, s.groups, vb.pp(format!("temp_convs.{i}")))?,
    ))
}

/// One layer of a down or up block.
#[derive(Clone, Debug)]
struct Layer {
    resnet: ResnetBlock2D,
    temp_conv: TemporalConvLayer,
    attn: Option<AttnPair>,
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ehs: Option<&Tensor>,
        num_frames: usize,
        hook: Hook<'_>,
    ) -> Result<Tensor> {
        let x = self.resnet.forward(x, Some(temb))?;
        let x = self.temp_conv.forward(&x, num_frames)?;
        match (&self.attn, ehs) {
            (Some(a), Some(ehs)) => a.forward(&x, ehs, num_frames, hook),
            (Some(_), None) => {
                candle_core::bail!("cross-attention block called without encoder_hidden_states")
            }
            (None, _) => Ok(x),
        }
    }
}

/// `CrossAttnDownBlock3D` (with_attention) or `DownBlock3D` (without).
#[derive(Clone, Debug)]
pub struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        with_attention: bool,
        num_layers: usize,
        in_channels: usize,
        out_channels: usize,
        add_downsample: bool,
        downsample_padding: usize,
        s: &BlockSettings,
        vb: Vb,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let in_c = if i == 0 { in_channels } else { out_channels };
            let (resnet, temp_conv) = resnet_and_temp_conv(in_c, out_channels, s, i, &vb)?;
            let attn = if with_attention {
                Some(AttnPair::new(out_channels, s, i, &vb)?)
            } else {
                None
            };
            layers.push(Layer {
                resnet,
                temp_conv,
                attn,
            });
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                out_channels,
                out_channels,
                downsample_padding,
                vb.pp("downsamplers.0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            layers,
            downsampler,
        })
    }

    /// Returns the block output and the residuals it adds for the up path.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ehs: &Tensor,
        num_frames: usize,
        mut hook: Hook<'_>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut res = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            x = layer.forward(&x, temb, Some(ehs), num_frames, reborrow(&mut hook))?;
            res.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            res.push(x.clone());
        }
        Ok((x, res))
    }
}

/// `UNetMidBlock3DCrossAttn` with one attention layer: resnet, temp_conv, then
/// (attn, temp_attn, resnet, temp_conv).
#[derive(Clone, Debug)]
pub struct UNetMidBlock3DCrossAttn {
    first: Layer,
    rest: Vec<Layer>,
}

impl UNetMidBlock3DCrossAttn {
    pub fn new(channels: usize, s: &BlockSettings, vb: Vb) -> Result<Self> {
        let (resnet, temp_conv) = resnet_and_temp_conv(channels, channels, s, 0, &vb)?;
        let first = Layer {
            resnet,
            temp_conv,
            attn: None,
        };
        let attn = AttnPair::new(channels, s, 0, &vb)?;
        let (resnet, temp_conv) = resnet_and_temp_conv(channels, channels, s, 1, &vb)?;
        // Stored as an attention pair followed by a resnet; `forward` keeps diffusers' order.
        Ok(Self {
            first,
            rest: vec![Layer {
                resnet,
                temp_conv,
                attn: Some(attn),
            }],
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ehs: &Tensor,
        num_frames: usize,
        mut hook: Hook<'_>,
    ) -> Result<Tensor> {
        let mut x = self.first.forward(x, temb, None, num_frames, None)?;
        for layer in &self.rest {
            let attn = layer.attn.as_ref().expect("mid layers have attention");
            x = attn.forward(&x, ehs, num_frames, reborrow(&mut hook))?;
            x = layer.resnet.forward(&x, Some(temb))?;
            x = layer.temp_conv.forward(&x, num_frames)?;
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock3D` (with_attention) or `UpBlock3D` (without).
#[derive(Clone, Debug)]
pub struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        with_attention: bool,
        num_layers: usize,
        in_channels: usize,
        out_channels: usize,
        prev_output_channel: usize,
        add_upsample: bool,
        s: &BlockSettings,
        vb: Vb,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let res_skip = if i == num_layers - 1 {
                in_channels
            } else {
                out_channels
            };
            let resnet_in = if i == 0 {
                prev_output_channel
            } else {
                out_channels
            };
            let (resnet, temp_conv) =
                resnet_and_temp_conv(resnet_in + res_skip, out_channels, s, i, &vb)?;
            let attn = if with_attention {
                Some(AttnPair::new(out_channels, s, i, &vb)?)
            } else {
                None
            };
            layers.push(Layer {
                resnet,
                temp_conv,
                attn,
            });
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(
                out_channels,
                out_channels,
                vb.pp("upsamplers.0"),
            )?)
        } else {
            None
        };
        Ok(Self { layers, upsampler })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `res`: this block's residuals, consumed from the end.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        mut res: Vec<Tensor>,
        temb: &Tensor,
        ehs: &Tensor,
        upsample_size: Option<(usize, usize)>,
        num_frames: usize,
        mut hook: Hook<'_>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            let Some(skip) = res.pop() else {
                candle_core::bail!("up block ran out of residuals")
            };
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = layer.forward(&x, temb, Some(ehs), num_frames, reborrow(&mut hook))?;
        }
        if let Some(up) = &self.upsampler {
            x = up.forward(&x, upsample_size)?;
        }
        Ok(x)
    }
}
