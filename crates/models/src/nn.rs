//! Small building blocks shared by the model modules: constructors that read checkpoint
//! tensors under their exact names, and the frame-aware GroupNorm.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Storage, Tensor, D};
use candle_nn::Conv2dConfig;
use flipsketch_kernels::{self as kernels, ConvGeometry, PackedCols, PackedRows, Precision};

use crate::compute::{ConvKind, OpPath, Vb};

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

/// Calls `f` with the values of a CPU f32 tensor, in row-major order.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor, got one on {:?}", t.device())
    };
    let values = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(f(&values[a..b])),
        None => candle_core::bail!("tensor is not contiguous after contiguous()"),
    }
}

/// `x` (batch, rows, cols) with its last two dimensions swapped, contiguous, plus `add`
/// (batch, cols, rows) if given: one pass in the kernels, candle's transpose and add otherwise.
pub fn transpose_add(path: OpPath, x: &Tensor, add: Option<&Tensor>) -> Result<Tensor> {
    let (b, r, c) = x.dims3()?;
    if let Some(a) = add {
        if a.dims() != [b, c, r] {
            candle_core::bail!(
                "transpose_add: addend is {:?}, not {:?}",
                a.dims(),
                [b, c, r]
            )
        }
    }
    if let OpPath::Kernels(_) = path {
        let out = with_cpu_f32(x, |xs| match add {
            Some(a) => with_cpu_f32(a, |av| kernels::transpose(xs, b, r, c, Some(av))),
            None => Ok(kernels::transpose(xs, b, r, c, None)),
        })??;
        return Tensor::from_vec(out, (b, c, r), x.device());
    }
    let t = x.transpose(1, 2)?.contiguous()?;
    match add {
        Some(a) => t + a,
        None => Ok(t),
    }
}

/// The precision to pack a weight in for the kernels, when they do the products (`path`).
fn packing(path: OpPath, weight: &Tensor) -> Result<Option<Precision>> {
    match path {
        OpPath::Kernels(p) if weight.device().is_cpu() && weight.dtype() == DType::F32 => {
            Ok(Some(p))
        }
        OpPath::Kernels(_) => candle_core::bail!(
            "the CPU kernels take f32 weights on the CPU, not {:?} on {:?}",
            weight.dtype(),
            weight.device()
        ),
        OpPath::Candle => Ok(None),
    }
}

fn cpu_values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

#[derive(Clone, Debug)]
enum LinearWeight {
    /// (out, in), used through candle.
    Tensor(Tensor),
    /// Packed for the CPU kernels, with the bias as f32 values.
    Packed(Arc<PackedCols>, Option<Arc<[f32]>>),
}

/// `nn.Linear`: y = x W^T + b over the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_dim: usize,
}

/// A bias as the f32 values the kernels add.
fn bias_values(bias: Option<&Tensor>) -> Result<Option<Arc<[f32]>>> {
    bias.map(cpu_values).transpose().map(|b| b.map(Arc::from))
}

impl Linear {
    /// A Linear whose weight was packed before (a cache), `W` being `out_dim x in_dim`.
    pub fn from_packed(weight: Arc<PackedCols>, bias: Option<Tensor>) -> Result<Self> {
        let b = bias_values(bias.as_ref())?;
        Ok(Self {
            out_dim: weight.cols(),
            weight: LinearWeight::Packed(weight, b),
            bias,
        })
    }

    /// `path`: the plan's matrix path (the weight is packed for the kernels at once).
    pub fn new(weight: Tensor, bias: Option<Tensor>, path: OpPath) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let weight = match packing(path, &weight)? {
            Some(prec) => {
                let w = with_cpu_f32(&weight, |v| {
                    PackedCols::from_transposed(prec, v, out_dim, in_dim)
                })?;
                LinearWeight::Packed(Arc::new(w), bias_values(bias.as_ref())?)
            }
            None => LinearWeight::Tensor(weight),
        };
        Ok(Self {
            weight,
            bias,
            out_dim,
        })
    }
}

impl Linear {
    /// diffusers GEGLU of this projection's output (`h * gelu(gate)` over its two halves) in
    /// one pass on the CPU kernels ([`kernels::linear_geglu`], the same values as the
    /// projection then the GEGLU); `None` where the kernels do not fuse it (weights used
    /// through candle, too few rows).
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let LinearWeight::Packed(w, bias) = &self.weight else {
            return Ok(None);
        };
        if self.out_dim % 2 != 0 {
            candle_core::bail!(
                "GEGLU: {} projected features do not split in two",
                self.out_dim
            )
        }
        packed_product(x, w, self.out_dim / 2, |xs, rows| {
            kernels::linear_geglu(xs, rows, w, bias.as_deref())
        })
    }
}

/// `f(values of x as f32, rows)` for a product of `x` (.., in) with packed weights `w` over
/// its last dimension, as a tensor of x's dtype with `features` in the last dimension; `None`
/// when `f` gives none.
fn packed_product(
    x: &Tensor,
    w: &PackedCols,
    features: usize,
    f: impl FnOnce(&[f32], usize) -> Option<Vec<f32>>,
) -> Result<Option<Tensor>> {
    let mut dims = x.dims().to_vec();
    let (in_dim, rows) = match dims.split_last() {
        Some((k, lead)) => (*k, lead.iter().product::<usize>()),
        None => candle_core::bail!("linear on a scalar"),
    };
    if w.depth() != in_dim {
        candle_core::bail!(
            "linear: input has {in_dim} features, weight expects {}",
            w.depth()
        )
    }
    let out = with_cpu_f32(&x.to_dtype(DType::F32)?, |xs| f(xs, rows))?;
    let Some(out) = out else { return Ok(None) };
    *dims.last_mut().expect("non-scalar") = features;
    Ok(Some(
        Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())?,
    ))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = match &self.weight {
            LinearWeight::Packed(w, bias) => {
                let y = packed_product(x, w, self.out_dim, |xs, rows| {
                    Some(kernels::linear_new(xs, rows, w, bias.as_deref()))
                })?;
                return Ok(y.expect("linear_new always gives the product"));
            }
            LinearWeight::Tensor(weight) => weight,
        };
        let mut dims = x.dims().to_vec();
        let (in_dim, lead) = match dims.split_last() {
            Some((k, lead)) => (*k, lead.iter().product::<usize>()),
            None => candle_core::bail!("linear on a scalar"),
        };
        *dims.last_mut().expect("non-scalar") = self.out_dim;
        // One 2-D GEMM over all leading dimensions (a broadcast batched matmul is much slower).
        let y = matmul(&x.reshape((lead, in_dim))?, &weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.reshape(dims)
    }
}

#[derive(Clone, Debug)]
enum ConvWeight {
    /// (out, in, kh, kw), used through candle.
    Tensor(Tensor),
    /// Packed for the CPU kernels (rows = output channels), with the bias as f32 values.
    Packed(Arc<PackedRows>, Option<Arc<[f32]>>),
}

/// `nn.Conv2d` (no groups or dilation).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: ConvWeight,
    bias: Option<Tensor>,
    config: Conv2dConfig,
    /// (out, in, kh, kw)
    dims: (usize, usize, usize, usize),
}

impl Conv2d {
    /// On the CPU kernels the weights are packed as `kind` says (see [`ConvKind`]; a kind
    /// the geometry does not allow falls back to patches).
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        config: Conv2dConfig,
        path: OpPath,
        kind: ConvKind,
    ) -> Result<Self> {
        let dims = weight.dims4()?;
        let (o, i, kh, kw) = dims;
        let packable = config.groups == 1 && config.dilation == 1;
        let path = if packable { path } else { OpPath::Candle };
        let kind = match kind {
            ConvKind::Winograd if (kh, kw, config.stride, config.padding) == (3, 3, 1, 1) => kind,
            ConvKind::Direct if config.stride == 1 => kind,
            _ => ConvKind::Patches,
        };
        let weight = match packing(path, &weight)? {
            Some(prec) => {
                let w = with_cpu_f32(&weight, |v| match kind {
                    ConvKind::Winograd => PackedRows::new_winograd(prec, v, o, i),
                    ConvKind::Direct => PackedRows::new_taps(prec, v, o, i, kh, kw),
                    ConvKind::Patches => PackedRows::new(prec, v, o, i * kh * kw),
                })?;
                ConvWeight::Packed(Arc::new(w), bias_values(bias.as_ref())?)
            }
            None => ConvWeight::Tensor(weight),
        };
        Ok(Self {
            weight,
            bias,
            config,
            dims,
        })
    }
}

impl Conv2d {
    /// A Conv2d (no groups or dilation) whose `(out, in, kh, kw)` weight was packed before.
    pub fn from_packed(
        weight: Arc<PackedRows>,
        bias: Option<Tensor>,
        config: Conv2dConfig,
        dims: (usize, usize, usize, usize),
    ) -> Result<Self> {
        let b = bias_values(bias.as_ref())?;
        Ok(Self {
            weight: ConvWeight::Packed(weight, b),
            bias,
            config,
            dims,
        })
    }

    fn packed(&self) -> Option<&Arc<PackedRows>> {
        match &self.weight {
            ConvWeight::Packed(w, _) => Some(w),
            ConvWeight::Tensor(_) => None,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let weight = match &self.weight {
            ConvWeight::Packed(w, bias) => {
                let (n, ci, h, wd) = x.dims4()?;
                let (o, i, kh, kw) = self.dims;
                if ci != i {
                    candle_core::bail!("conv2d: input has {ci} channels, weight expects {i}")
                }
                let g =
                    ConvGeometry::new(ci, h, wd, kh, kw, c.stride, c.padding).ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "conv2d: a {kh}x{kw} kernel does not fit {h}x{wd}"
                        ))
                    })?;
                let dtype = x.dtype();
                let out = with_cpu_f32(&x.to_dtype(DType::F32)?, |xs| {
                    kernels::conv2d_new(xs, n, &g, w, bias.as_deref())
                })?;
                return Tensor::from_vec(out, (n, o, g.h_out, g.w_out), x.device())?
                    .to_dtype(dtype);
            }
            ConvWeight::Tensor(w) => w,
        };
        let y = if needs_widening(x) {
            x.to_dtype(DType::F32)?
                .conv2d(
                    &weight.to_dtype(DType::F32)?,
                    c.padding,
                    c.stride,
                    c.dilation,
                    c.groups,
                )?
                .to_dtype(DType::BF16)?
        } else {
            x.conv2d(weight, c.padding, c.stride, c.dilation, c.groups)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Conv2d {
    /// `(residual + conv(silu(norm(x))) + image_bias) / divisor`, each part optional (the
    /// convolutions of a ResNet block): on the CPU kernels one pass over the activations,
    /// the norm applied as the convolution reads its input and the rest as it writes its
    /// output ([`kernels::ConvFusion`]); the separate ops elsewhere, in the same order.
    /// `image_bias`: (n, c_out); `residual`: the output's shape.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        norm_silu: Option<&GroupNorm>,
        image_bias: Option<&Tensor>,
        residual: Option<(&Tensor, f64)>,
    ) -> Result<Tensor> {
        let ConvWeight::Packed(w, bias) = &self.weight else {
            let x = match norm_silu {
                Some(n) => n.forward_silu(x)?,
                None => x.clone(),
            };
            let h = self.forward(&x)?;
            let h = match image_bias {
                Some(t) => h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?,
                None => h,
            };
            return match residual {
                Some((r, d)) if d == 1.0 => r + h,
                Some((r, d)) => (r + h)? / d,
                None => Ok(h),
            };
        };
        let (n, ci, h, wd) = x.dims4()?;
        let (o, i, kh, kw) = self.dims;
        if ci != i {
            candle_core::bail!("conv2d: input has {ci} channels, weight expects {i}")
        }
        let c = &self.config;
        let g = ConvGeometry::new(ci, h, wd, kh, kw, c.stride, c.padding).ok_or_else(|| {
            candle_core::Error::Msg(format!("conv2d: a {kh}x{kw} kernel does not fit {h}x{wd}"))
        })?;
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        // The norm as a map of the input planes when the kernels compute it, else applied.
        let (x, map) = match norm_silu {
            Some(norm) => match norm.plane_affine(&x, 1, true)? {
                Some(map) => (x, Some(map)),
                None => (norm.forward_silu(&x)?.to_dtype(DType::F32)?, None),
            },
            None => (x, None),
        };
        let ib = match image_bias {
            Some(t) => {
                if t.dims() != [n, o] {
                    candle_core::bail!("conv2d: image bias is {:?}, not [{n}, {o}]", t.dims())
                }
                Some(cpu_values(&t.to_dtype(DType::F32)?)?)
            }
            None => None,
        };
        let out_shape = (n, o, g.h_out, g.w_out);
        let res = match residual {
            Some((r, d)) => {
                if r.dims() != [n, o, g.h_out, g.w_out] {
                    candle_core::bail!(
                        "conv2d: residual is {:?}, the output {:?}",
                        r.dims(),
                        [n, o, g.h_out, g.w_out]
                    )
                }
                Some((r.to_dtype(DType::F32)?.contiguous()?, d as f32))
            }
            None => None,
        };
        let run = |xs: &[f32], r: Option<(&[f32], f32)>| {
            kernels::conv2d_fused(
                xs,
                n,
                &g,
                w,
                bias.as_deref(),
                kernels::ConvFusion {
                    input: map.as_ref(),
                    image_bias: ib.as_deref(),
                    residual: r,
                },
            )
        };
        let out = with_cpu_f32(&x, |xs| match &res {
            Some((r, d)) => with_cpu_f32(r, |rv| run(xs, Some((rv, *d)))),
            None => Ok(run(xs, None)),
        })??;
        Tensor::from_vec(out, out_shape, x.device())?.to_dtype(dtype)
    }
}

/// diffusers' `Conv3d(in, out, kernel (3, 1, 1), padding (1, 0, 0))` run over (batch*frames,
/// in, h, w) tensors, frames of a sample consecutive (docs/algorithm.md): `out[f] = W0 x[f-1] +
/// W1 x[f] + W2 x[f+1] + b`, zero beyond both ends of each sample.
#[derive(Clone, Debug)]
pub struct FrameConv {
    weight: FrameConvWeight,
    in_dim: usize,
    out_dim: usize,
}

#[derive(Clone, Debug)]
enum FrameConvWeight {
    /// CPU: the taps packed for Winograd's F(2, 3) over the frames
    /// ([`PackedRows::new_frames_winograd`]: four stacked (out, in) matrices).
    Packed(Arc<PackedRows>, Option<Arc<[f32]>>),
    /// Elsewhere: tap k as an (out, in, 1, 1) convolution, the bias on tap 1.
    Taps(Box<[Conv2d; 3]>),
}

impl FrameConv {
    /// A temporal convolution whose taps were packed before by
    /// [`PackedRows::new_frames_winograd`].
    pub fn from_packed(
        weight: Arc<PackedRows>,
        bias: &Tensor,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        let want = (4 * kernels::frames_winograd_rows(out_dim), in_dim);
        if (weight.rows(), weight.depth()) != want {
            candle_core::bail!(
                "temporal conv: packed weights are {}x{}, not {}x{}",
                weight.rows(),
                weight.depth(),
                want.0,
                want.1
            )
        }
        Ok(Self {
            out_dim,
            weight: FrameConvWeight::Packed(weight, Some(Arc::from(cpu_values(bias)?))),
            in_dim,
        })
    }

    fn packed(&self) -> Option<&Arc<PackedRows>> {
        match &self.weight {
            FrameConvWeight::Packed(w, _) => Some(w),
            FrameConvWeight::Taps(_) => None,
        }
    }

    /// `weight`: (out, in, 3, 1, 1), `bias`: (out).
    pub fn new(weight: Tensor, bias: Tensor, path: OpPath) -> Result<Self> {
        let (out_dim, in_dim, kt, kh, kw) = weight.dims5()?;
        if (kt, kh, kw) != (3, 1, 1) {
            candle_core::bail!("frame conv: kernel ({kt}, {kh}, {kw}) is not (3, 1, 1)")
        }
        let weight = match packing(path, &weight)? {
            Some(prec) => {
                // (out, in, 3) -> (out, 3, in): row o is [tap 0 | tap 1 | tap 2] over the inputs
                let w = weight
                    .squeeze(4)?
                    .squeeze(3)?
                    .transpose(1, 2)?
                    .contiguous()?;
                let w = with_cpu_f32(&w, |v| {
                    PackedRows::new_frames_winograd(prec, v, out_dim, in_dim)
                })?;
                FrameConvWeight::Packed(Arc::new(w), Some(Arc::from(cpu_values(&bias)?)))
            }
            None => {
                let tap = |k: usize, bias: Option<Tensor>| -> Result<Conv2d> {
                    let t = weight.narrow(2, k, 1)?.squeeze(4)?.contiguous()?;
                    Conv2d::new(
                        t,
                        bias,
                        Default::default(),
                        OpPath::Candle,
                        ConvKind::Patches,
                    )
                };
                FrameConvWeight::Taps(Box::new([
                    tap(0, None)?,
                    tap(1, Some(bias))?,
                    tap(2, None)?,
                ]))
            }
        };
        Ok(Self {
            weight,
            in_dim,
            out_dim,
        })
    }

    /// `x`: (batch*frames, in, h, w) -> (batch*frames, out, h, w).
    pub fn forward(&self, x: &Tensor, num_frames: usize) -> Result<Tensor> {
        self.forward_impl(x, num_frames, None)
    }

    /// `self(silu(norm(x)))`: on the CPU kernels the norm and SiLU are applied as the
    /// convolution copies its input (the same values as the separate passes).
    pub fn forward_after_norm_silu(
        &self,
        x: &Tensor,
        norm: &FrameGroupNorm,
        num_frames: usize,
    ) -> Result<Tensor> {
        if let FrameConvWeight::Packed(..) = self.weight {
            if x.dtype() == DType::F32 {
                if let Some(map) = norm.plane_affine_silu(x, num_frames)? {
                    return self.forward_impl(x, num_frames, Some(&map));
                }
            }
        }
        self.forward(&norm.forward_silu(x, num_frames)?, num_frames)
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        num_frames: usize,
        map: Option<&kernels::PlaneAffine>,
    ) -> Result<Tensor> {
        let (bf, c, h, w) = x.dims4()?;
        if num_frames == 0 || bf % num_frames != 0 {
            candle_core::bail!("temporal conv: {bf} images are not samples of {num_frames} frames")
        }
        if c != self.in_dim {
            candle_core::bail!(
                "temporal conv: input has {c} channels, weight expects {}",
                self.in_dim
            )
        }
        let samples = bf / num_frames;
        let (f, o) = (num_frames, self.out_dim);
        match &self.weight {
            FrameConvWeight::Packed(wp, bias) => {
                let dtype = x.dtype();
                let sample_len = f * c * h * w;
                let conv = |s: &[f32], i: usize| {
                    let input = map.map(|m| (m, i * f * c));
                    let b = bias.as_deref();
                    kernels::conv_frames_winograd(s, f, (c, h, w), wp, o, b, input)
                };
                let out = with_cpu_f32(&x.to_dtype(DType::F32)?, |xs| {
                    if samples == 1 {
                        return conv(xs, 0);
                    }
                    let mut out = Vec::with_capacity(bf * o * h * w);
                    for (i, s) in xs.chunks_exact(sample_len).enumerate() {
                        out.extend(conv(s, i));
                    }
                    out
                })?;
                Tensor::from_vec(out, (bf, o, h, w), x.device())?.to_dtype(dtype)
            }
            FrameConvWeight::Taps(taps) => {
                let z = |k: usize| -> Result<Tensor> {
                    taps[k].forward(x)?.reshape((samples, f, o, h, w))
                };
                let mut y = z(1)?;
                if f > 1 {
                    let prev = z(0)?.narrow(1, 0, f - 1)?.pad_with_zeros(1, 1, 0)?;
                    let next = z(2)?.narrow(1, 1, f - 1)?.pad_with_zeros(1, 0, 1)?;
                    y = ((y + prev)? + next)?;
                }
                y.reshape((bf, o, h, w))
            }
        }
    }
}

/// The packed-weight cache of `vb` with the full name of its tensor `name`, when the
/// weights are packed for the kernels.
fn pack_cache(vb: &Vb, name: &str) -> Option<(Arc<crate::packcache::PackCache>, String)> {
    vb.plan().matmul.kernels()?;
    Some((vb.pack_cache()?.clone(), vb.full_name(name)))
}

/// `nn.Linear(in_dim, out_dim, bias=bias)`.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: Vb) -> Result<Linear> {
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    let cache = pack_cache(&vb, "weight");
    if let Some((cache, name)) = &cache {
        if let Some(w) = cache.cols(name, &[out_dim, in_dim], "cols", out_dim, in_dim) {
            return Linear::from_packed(w, bias);
        }
    }
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let l = Linear::new(weight, bias, vb.plan().matmul)?;
    if let (Some((cache, name)), LinearWeight::Packed(w, _)) = (&cache, &l.weight) {
        cache.put_cols(name, "cols", w);
    }
    Ok(l)
}

/// `nn.Conv2d(in_c, out_c, kernel, stride, padding)` with bias.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: Vb,
) -> Result<Conv2d> {
    let bias = vb.get(out_c, "bias")?;
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let shape = [out_c, in_c, kernel, kernel];
    // Direct and Winograd convolutions only where they pay (see Vb::conv_kind).
    let kind = vb.conv_kind(kernel, stride, padding, in_c, out_c);
    let tag = match kind {
        ConvKind::Winograd => "winograd",
        ConvKind::Direct => "taps",
        ConvKind::Patches => "rows",
    };
    let cache = pack_cache(&vb, "weight");
    if let Some((cache, name)) = &cache {
        let k = in_c * kernel * kernel;
        let hit = match kind {
            ConvKind::Winograd => cache.rows_with(name, &shape, tag, out_c, k, |prec, slots| {
                PackedRows::from_slots_winograd(prec, out_c, in_c, slots)
            }),
            ConvKind::Direct => cache.rows_with(name, &shape, tag, out_c, k, |prec, slots| {
                PackedRows::from_slots_taps(prec, out_c, (in_c, kernel, kernel), slots)
            }),
            ConvKind::Patches => cache.rows(name, &shape, tag, out_c, k),
        };
        if let Some(w) = hit {
            return Conv2d::from_packed(w, Some(bias), cfg, (out_c, in_c, kernel, kernel));
        }
    }
    let weight = vb.get(&shape[..], "weight")?;
    let conv = Conv2d::new(weight, Some(bias), cfg, vb.plan().matmul, kind)?;
    if let (Some((cache, name)), Some(w)) = (&cache, conv.packed()) {
        cache.put_rows(name, tag, w);
    }
    Ok(conv)
}

/// diffusers' `Conv3d(in_dim, out_dim, (3, 1, 1), padding (1, 0, 0))` as a [`FrameConv`].
pub fn frame_conv(in_dim: usize, out_dim: usize, vb: Vb) -> Result<FrameConv> {
    let bias = vb.get(out_dim, "bias")?;
    let shape = [out_dim, in_dim, 3, 1, 1];
    let cache = pack_cache(&vb, "weight");
    // Packed for Winograd over the frames: four stacked (out, in) matrices.
    let (tag, rows) = (
        "frames-winograd",
        4 * flipsketch_kernels::frames_winograd_rows(out_dim),
    );
    if let Some((cache, name)) = &cache {
        if let Some(w) = cache.rows(name, &shape, tag, rows, in_dim) {
            return FrameConv::from_packed(w, &bias, in_dim, out_dim);
        }
    }
    let weight = vb.get(&shape[..], "weight")?;
    let conv = FrameConv::new(weight, bias, vb.plan().matmul)?;
    if let (Some((cache, name)), Some(w)) = (&cache, conv.packed()) {
        cache.put_rows(name, tag, w);
    }
    Ok(conv)
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: Vb) -> Result<GroupNorm> {
    GroupNorm::new(groups, channels, eps, vb)
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias.
pub fn layer_norm(dim: usize, eps: f64, vb: Vb) -> Result<LayerNorm> {
    let weight = vb.get(dim, "weight")?;
    let bias = vb.get(dim, "bias")?;
    let values = match vb.plan().other {
        OpPath::Kernels(_) if weight.dtype() == DType::F32 && weight.device().is_cpu() => Some((
            Arc::from(cpu_values(&weight)?),
            Arc::from(cpu_values(&bias)?),
        )),
        _ => None,
    };
    Ok(LayerNorm {
        ln: candle_nn::LayerNorm::new(weight, bias, eps),
        values,
    })
}

/// `nn.LayerNorm` over the last dimension: the kernels' two-pass norm on f32 CPU tensors when
/// the plan says so, else candle's fused op, which has no f64 version; f64 tensors (the tests of
/// the device-generic path) take the same formula in tensor ops.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    ln: candle_nn::LayerNorm,
    /// weight and bias as f32 values, when the kernel computes the norm.
    values: Option<(Arc<[f32]>, Arc<[f32]>)>,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ln = &self.ln;
        if let (Some((w, b)), DType::F32) = (&self.values, x.dtype()) {
            let dim = w.len();
            if x.dims().last() != Some(&dim) {
                candle_core::bail!("layer_norm: input {:?} does not end in {dim}", x.dims())
            }
            let out = with_cpu_f32(x, |xs| kernels::layer_norm(xs, dim, ln.eps() as f32, w, b))?;
            return Tensor::from_vec(out, x.dims(), x.device());
        }
        let (Some(bias), DType::F64) = (ln.bias(), x.dtype()) else {
            return ln.forward(x);
        };
        let last = x.rank() - 1;
        let centred = x.broadcast_sub(&x.mean_keepdim(last)?)?;
        let var = centred.sqr()?.mean_keepdim(last)?;
        centred
            .broadcast_div(&(var + ln.eps())?.sqrt()?)?
            .broadcast_mul(ln.weight())?
            .broadcast_add(bias)
    }
}

/// `nn.GroupNorm` over (items, channels, ...) tensors, whose statistics may also span several
/// consecutive items (the frames of a sample), optionally fused with the SiLU that follows it.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    /// weight and bias as f32 values, when the kernel computes it.
    values: Option<(Arc<[f32]>, Arc<[f32]>)>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: Vb) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!(
                "{}: GroupNorm groups ({groups}) must divide channels ({channels})",
                vb.prefix()
            )
        }
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let values = match vb.plan().other {
            OpPath::Kernels(_) => {
                let w = cpu_values(&weight.to_dtype(DType::F32)?)?;
                let b = cpu_values(&bias.to_dtype(DType::F32)?)?;
                Some((Arc::from(w), Arc::from(b)))
            }
            OpPath::Candle => None,
        };
        Ok(Self {
            weight,
            bias,
            values,
            groups,
            eps,
        })
    }

    fn shape(&self, items: usize, span: usize, c: usize, plane: usize) -> kernels::GroupNormShape {
        kernels::GroupNormShape {
            items,
            span,
            channels: c,
            plane,
            groups: self.groups,
        }
    }

    /// What this norm (then SiLU if `silu`) does to each (item, channel) plane of the f32
    /// tensor `x` (items, channels, ...), statistics spanning `span` items; `None` when the
    /// kernels do not compute this norm.
    pub fn plane_affine(
        &self,
        x: &Tensor,
        span: usize,
        silu: bool,
    ) -> Result<Option<kernels::PlaneAffine>> {
        let Some((w, b)) = &self.values else {
            return Ok(None);
        };
        let dims = x.dims();
        if dims.len() < 2 || dims[1] != w.len() {
            candle_core::bail!(
                "group_norm: input {dims:?} is not (items, {} channels, ...)",
                w.len()
            )
        }
        let (items, c) = (dims[0], dims[1]);
        if span == 0 || items % span != 0 {
            candle_core::bail!("group_norm: {items} items are not spans of {span} frames")
        }
        let plane: usize = dims[2..].iter().product();
        with_cpu_f32(x, |xs| {
            let shape = self.shape(items, span, c, plane);
            Some(kernels::group_norm_affine(
                xs,
                shape,
                self.eps as f32,
                w,
                b,
                silu,
            ))
        })
    }

    /// GroupNorm then SiLU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_spanning(x, 1, true)
    }

    /// `x`: (items, channels, ...), the statistics of each group spanning `span` consecutive
    /// items; then SiLU if `silu`.
    pub fn forward_spanning(&self, x: &Tensor, span: usize, silu: bool) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 {
            candle_core::bail!("group_norm: input must be (items, channels, ...), got {dims:?}")
        }
        let (items, c) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        if c != self.weight.dim(0)? {
            candle_core::bail!(
                "group_norm: input has {c} channels, weight {}",
                self.weight.dim(0)?
            )
        }
        if span == 0 || items % span != 0 {
            candle_core::bail!("group_norm: {items} items are not spans of {span} frames")
        }
        // The kernel when the plan says so (f32 activations on the CPU), candle's ops below
        // otherwise.
        if self.values.is_some() {
            let (w, b) = self.values.as_ref().expect("checked");
            let mut out = kernels::zeroed(x.elem_count());
            with_cpu_f32(x, |xs| {
                let shape = self.shape(items, span, c, plane);
                kernels::group_norm(xs, shape, self.eps as f32, w, b, silu, &mut out)
            })?;
            return Tensor::from_vec(out, dims, x.device());
        }
        let dtype = x.dtype();
        // Statistics in f32 at least (half-precision sums lose too much), f64 stays f64.
        let stats = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let n = (c / self.groups) * plane;
        let xs = x
            .to_dtype(stats)?
            .reshape((items / span, span, self.groups, n))?;
        let count = (span * n) as f64;
        let mean = (xs.sum_keepdim(D::Minus1)?.sum_keepdim(1)? / count)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = (xs.sqr()?.sum_keepdim(D::Minus1)?.sum_keepdim(1)? / count)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let xs = xs.reshape(dims)?.to_dtype(dtype)?;
        let mut affine = vec![1usize; dims.len()];
        affine[1] = c;
        let y = xs
            .broadcast_mul(&self.weight.reshape(affine.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine.as_slice())?)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_spanning(x, 1, false)
    }
}

/// A GroupNorm whose statistics span all frames of a sample.
///
/// diffusers applies these norms to a (batch, channels, frames, h, w) tensor, so each group's
/// mean and variance cover channels/groups x frames x h x w values (docs/algorithm.md). We keep
/// the frames folded into the batch, (batch*frames, channels, h, w), and reduce over the frames
/// instead of permuting.
#[derive(Clone, Debug)]
pub struct FrameGroupNorm(GroupNorm);

impl FrameGroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: Vb) -> Result<Self> {
        GroupNorm::new(groups, channels, eps, vb).map(Self)
    }

    /// `x`: (batch*frames, channels, h, w), frames of a sample consecutive.
    pub fn forward(&self, x: &Tensor, num_frames: usize) -> Result<Tensor> {
        self.0.forward_spanning(x, num_frames, false)
    }

    /// [`FrameGroupNorm::forward`] then SiLU.
    pub fn forward_silu(&self, x: &Tensor, num_frames: usize) -> Result<Tensor> {
        self.0.forward_spanning(x, num_frames, true)
    }

    /// What [`FrameGroupNorm::forward_silu`] does to each (frame, channel) plane of the f32
    /// tensor `x`; `None` when the kernels do not compute this norm.
    pub fn plane_affine_silu(
        &self,
        x: &Tensor,
        num_frames: usize,
    ) -> Result<Option<kernels::PlaneAffine>> {
        self.0.plane_affine(x, num_frames, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::Device;

    /// The kernels' single GEMM (f32 weights, packed; whatever code this CPU runs) and
    /// candle's three-tap form (here in f64) agree, with 2 samples of 3 frames and with 1
    /// frame.
    #[test]
    fn frame_conv_paths_agree() {
        let dev = Device::Cpu;
        let (o, c, h, w) = (5, 4, 3, 6);
        let weight = Tensor::randn(0f32, 1., (o, c, 3, 1, 1), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let kernels = OpPath::Kernels(Precision::F32);
        let packed = FrameConv::new(weight.clone(), bias.clone(), kernels).unwrap();
        assert!(matches!(packed.weight, FrameConvWeight::Packed(..)));
        let taps = FrameConv::new(
            weight.to_dtype(DType::F64).unwrap(),
            bias.to_dtype(DType::F64).unwrap(),
            OpPath::Candle,
        )
        .unwrap();
        assert!(matches!(taps.weight, FrameConvWeight::Taps(..)));
        for (bf, frames) in [(6, 3), (2, 1)] {
            let x = Tensor::randn(0f32, 1., (bf, c, h, w), &dev).unwrap();
            let a = packed.forward(&x, frames).unwrap();
            let b = taps
                .forward(&x.to_dtype(DType::F64).unwrap(), frames)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(
                d < 1e-5,
                "{bf} images of {frames} frames: paths differ by {d:e}"
            );
        }
    }
}
