//! diffusers `resnet.py`: `ResnetBlock2D`, `TemporalConvLayer`; and `Downsample2D`,
//! `Upsample2D` (`downsampling.py`, `upsampling.py`).

use crate::compute::Vb;
use candle_core::{Module, Result, Tensor};

use crate::nn::{conv2d, group_norm, linear, Conv2d, FrameConv, FrameGroupNorm, GroupNorm, Linear};

/// `ResnetBlock2D` with `time_embedding_norm="default"`, pre-norm, SiLU. Its GroupNorms see
/// one frame at a time (frames are in the batch).
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
        vb: Vb,
    ) -> Result<Self> {
        let time_emb_proj = match temb_channels {
            Some(t) => Some(linear(t, out_channels, true, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(
                in_channels,
                out_channels,
                1,
                1,
                0,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_channels, eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out_channels, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(groups, out_channels, eps, vb.pp("norm2"))?,
            conv2: conv2d(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `x`: (n, c, h, w); `temb`: (n, temb_channels) when the block has a time projection.
    /// `conv1(silu(norm1(x))) + temb`, then `(shortcut + conv2(silu(norm2(h)))) / scale`, each
    /// convolution with its norm and additions fused ([`Conv2d::forward_fused`]).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&temb.silu()?)?),
            _ => None,
        };
        let h = self
            .conv1
            .forward_fused(x, Some(&self.norm1), t.as_ref(), None)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_fused(
            &h,
            Some(&self.norm2),
            None,
            Some((&shortcut, self.output_scale_factor)),
        )
    }
}

/// One `nn.Sequential(GroupNorm, SiLU, [Dropout,] Conv3d(k=(3,1,1), padding=(1,0,0)))` of
/// `TemporalConvLayer`. The Conv3d is run as a 1-D convolution over frames (docs/algorithm.md,
/// [`FrameConv`]: on the CPU one GEMM over the previous, current and next frame, zero-padded
/// at both ends). The GroupNorm's statistics span all frames of a sample.
#[derive(Clone, Debug)]
struct TemporalConv {
    norm: FrameGroupNorm,
    conv: FrameConv,
}

impl TemporalConv {
    fn new(
        in_dim: usize,
        out_dim: usize,
        groups: usize,
        conv_index: usize,
        vb: Vb,
    ) -> Result<Self> {
        Ok(Self {
            norm: FrameGroupNorm::new(groups, in_dim, 1e-5, vb.pp(0))?,
            conv: crate::nn::frame_conv(in_dim, out_dim, vb.pp(conv_index))?,
        })
    }

    /// `x`: (batch*frames, in, h, w) -> (batch*frames, out, h, w)
    fn forward(&self, x: &Tensor, num_frames: usize) -> Result<Tensor> {
        self.conv.forward_after_norm_silu(x, &self.norm, num_frames)
    }
}

/// diffusers `TemporalConvLayer`: four temporal convolutions with a residual around them.
/// Checkpoint keys: `conv1.0` (norm), `conv1.2` (conv), `conv{2,3,4}.0`, `conv{2,3,4}.3`.
#[derive(Clone, Debug)]
pub struct TemporalConvLayer {
    convs: [TemporalConv; 4],
}

impl TemporalConvLayer {
    pub fn new(in_dim: usize, out_dim: usize, groups: usize, vb: Vb) -> Result<Self> {
        if in_dim != out_dim {
            // conv4 maps back to in_dim and the residual adds the input; the UNet3D only ever
            // builds square layers.
            candle_core::bail!("{}: TemporalConvLayer needs in_dim == out_dim", vb.prefix());
        }
        Ok(Self {
            convs: [
                TemporalConv::new(in_dim, out_dim, groups, 2, vb.pp("conv1"))?,
                TemporalConv::new(out_dim, in_dim, groups, 3, vb.pp("conv2"))?,
                TemporalConv::new(out_dim, in_dim, groups, 3, vb.pp("conv3"))?,
                TemporalConv::new(out_dim, in_dim, groups, 3, vb.pp("conv4"))?,
            ],
        })
    }

    pub fn forward(&self, x: &Tensor, num_frames: usize) -> Result<Tensor> {
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h, num_frames)?;
        }
        x + h
    }
}

/// `Downsample2D(use_conv=True)`: a stride-2 3x3 conv; with `padding=0` (the VAE) diffusers
/// first pads one zero row/column at the bottom/right.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, out_channels: usize, padding: usize, vb: Vb) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, out_channels, 3, 2, padding, vb.pp("conv"))?,
            pad_bottom_right: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour x2 (or to an explicit size), then a 3x3 conv.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, out_channels: usize, vb: Vb) -> Result<Self> {
        // The convolution runs on the upsampled image, twice as wide as the block's.
        let vb = match vb.conv_width() {
            Some(w) => vb.with_conv_width(2 * w),
            None => vb,
        };
        Ok(Self {
            conv: conv2d(channels, out_channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let x = x.upsample_nearest2d(th, tw)?;
        self.conv.forward(&x)
    }
}
