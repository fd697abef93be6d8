//! Small building blocks shared by the model modules: constructors that read checkpoint
//! tensors under their exact names, and the frame-aware GroupNorm.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, GroupNorm, LayerNorm, VarBuilder};

/// candle's CPU backend has no bf16 GEMM: widen to f32 there. Everywhere else (f32, f16, bf16
/// on CUDA/Metal) the operands go to candle as they are.
fn needs_widening(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu()
}

/// `a @ b` in the operands' dtype (bf16 on CPU: computed in f32, rounded back to bf16).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if needs_widening(a) {
        a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    } else {
        a.matmul(b)
    }
}

/// `nn.Linear`: y = x W^T + b over the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (in_dim, lead) = match dims.split_last() {
            Some((k, lead)) => (*k, lead.iter().product::<usize>()),
            None => candle_core::bail!("linear on a scalar"),
        };
        // One 2-D GEMM over all leading dimensions (a broadcast batched matmul is much slower).
        let y = matmul(&x.reshape((lead, in_dim))?, &self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-scalar") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// `nn.Conv2d` (square kernel, no groups or dilation).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let y = if needs_widening(x) {
            x.to_dtype(DType::F32)?
                .conv2d(
                    &self.weight.to_dtype(DType::F32)?,
                    c.padding,
                    c.stride,
                    c.dilation,
                    c.groups,
                )?
                .to_dtype(DType::BF16)?
        } else {
            x.conv2d(&self.weight, c.padding, c.stride, c.dilation, c.groups)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `nn.Linear(in_dim, out_dim, bias=bias)`.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// `nn.Conv2d(in_c, out_c, kernel, stride, padding)` with bias.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
    let bias = vb.get(out_c, "bias")?;
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    GroupNorm::new(weight, bias, channels, groups, eps)
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get(dim, "weight")?;
    let bias = vb.get(dim, "bias")?;
    Ok(LayerNorm::new(weight, bias, eps))
}

/// A GroupNorm whose statistics span all frames of a sample.
///
/// diffusers applies these norms to a (batch, channels, frames, h, w) tensor, so each group's
/// mean and variance cover channels/groups x frames x h x w values (DESIGN trap 3). We keep the
/// frames folded into the batch, (batch*frames, channels, h, w), and reduce over the frames
/// instead of permuting.
#[derive(Clone, Debug)]
pub struct FrameGroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl FrameGroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!(
                "{}: GroupNorm groups ({groups}) must divide channels ({channels})",
                vb.prefix()
            )
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    /// `x`: (batch*frames, channels, h, w), frames of a sample consecutive.
    pub fn forward(&self, x: &Tensor, num_frames: usize) -> Result<Tensor> {
        let (bf, c, h, w) = x.dims4()?;
        let b = bf / num_frames;
        let dtype = x.dtype();
        let n = (c / self.groups) * h * w;
        let xs = x
            .to_dtype(DType::F32)?
            .reshape((b, num_frames, self.groups, n))?;
        let count = (num_frames * n) as f64;
        let mean = (xs.sum_keepdim(D::Minus1)?.sum_keepdim(1)? / count)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = (xs.sqr()?.sum_keepdim(D::Minus1)?.sum_keepdim(1)? / count)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let xs = xs.reshape((bf, c, h, w))?.to_dtype(dtype)?;
        let weight = self.weight.reshape((1, c, 1, 1))?;
        let bias = self.bias.reshape((1, c, 1, 1))?;
        xs.broadcast_mul(&weight)?.broadcast_add(&bias)
    }
}
