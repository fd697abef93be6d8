//! The one place that decides how each op runs: on this project's CPU kernels
//! (`flipsketch-kernels`) or on candle's ops (any device, any dtype: what CUDA and Metal run).
//!
//! A [`ComputePlan`] is made once per model load from the requested dtype, the device and the
//! process-wide [`Ops`] choice, travels with the weights in a [`Vb`], and every layer stores the
//! [`OpPath`] it gets from it at construction; nothing looks at a tensor's device or dtype to
//! pick an implementation at run time.
//!
//! `FLIPSKETCH_OPS` forces a path on any machine, so that each can be tested anywhere:
//! - `auto` (default): on the CPU, the kernels with the best code this CPU has (AVX-512,
//!   AVX512-BF16); the matrix products on candle's GEMM when the CPU lacks AVX-512 (faster
//!   than the portable kernels there). On GPUs, candle.
//! - `portable`: the kernels everywhere on the CPU, matrix products included, with their
//!   portable (non-SIMD) code even on an AVX-512 CPU (`flipsketch_kernels::isa` reads the same
//!   variable): what a laptop or an ARM machine runs.
//! - `candle`: candle's ops everywhere, also on the CPU, in the requested dtype (bf16
//!   activations included, as on a GPU): the GPU code path, run on the CPU.

use std::str::FromStr;

use candle_core::{DType, Device, Result, Shape, Tensor};
use std::sync::Arc;

use candle_nn::VarBuilder;

use crate::packcache::PackCache;
use flipsketch_kernels::Precision;

/// Which implementations run (`FLIPSKETCH_OPS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ops {
    Auto,
    Portable,
    /// The kernels' AVX2 code on a CPU that has more (the kernels read the variable
    /// themselves: `flipsketch_kernels::isa`); otherwise as [`Ops::Auto`].
    Avx2,
    Candle,
}

impl FromStr for Ops {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Ops::Auto),
            "portable" => Ok(Ops::Portable),
            "avx2" => Ok(Ops::Avx2),
            "candle" => Ok(Ops::Candle),
            other => Err(format!(
                "FLIPSKETCH_OPS={other:?}: expected auto, portable, avx2 or candle"
            )),
        }
    }
}

impl Ops {
    /// The process's choice: `FLIPSKETCH_OPS`, read once (auto when unset).
    pub fn current() -> std::result::Result<Self, String> {
        static OPS: std::sync::OnceLock<std::result::Result<Ops, String>> =
            std::sync::OnceLock::new();
        OPS.get_or_init(|| {
            std::env::var("FLIPSKETCH_OPS")
                .map(|v| v.parse())
                .unwrap_or(Ok(Ops::Auto))
        })
        .clone()
    }
}

/// The implementation of one op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpPath {
    /// The CPU kernels, f32 activations, matrix products in this precision.
    Kernels(Precision),
    /// candle's ops.
    Candle,
}

impl OpPath {
    pub fn kernels(self) -> Option<Precision> {
        match self {
            OpPath::Kernels(p) => Some(p),
            OpPath::Candle => None,
        }
    }
}

/// How a model runs, decided once when it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ComputePlan {
    /// The dtype of activations and of every tensor candle computes with.
    pub dtype: DType,
    /// Linear, Conv2d and the temporal convolutions (weights packed at load for the kernels).
    pub matmul: OpPath,
    /// Attention, GroupNorm(+SiLU), GEGLU and the token transposes.
    pub other: OpPath,
}

impl ComputePlan {
    /// The plan for running a model in `dtype` on `device` with `ops`.
    ///
    /// On the CPU with the kernels, activations are f32 (candle's CPU element-wise ops are
    /// fast in f32 only) and bf16 means bf16 weights and products with f32 accumulation:
    /// natively on CPUs with AVX512-BF16, with the portable code under `portable`, and as f32
    /// under `auto` elsewhere. f64 always runs on candle (the kernels have no f64), which makes
    /// it the CPU's way of testing the GPU code path at full precision.
    pub fn new(dtype: DType, device: &Device, ops: Ops) -> Self {
        let candle = Self {
            dtype,
            matmul: OpPath::Candle,
            other: OpPath::Candle,
        };
        if !device.is_cpu() || dtype == DType::F64 || ops == Ops::Candle {
            return candle;
        }
        let precision = match (dtype, ops) {
            (DType::BF16, Ops::Portable) => Precision::Bf16,
            (DType::BF16, _) if Precision::Bf16.is_native() => Precision::Bf16,
            _ => Precision::F32,
        };
        let kernels = OpPath::Kernels(precision);
        let matmul = if ops == Ops::Portable || precision.is_native() {
            kernels
        } else {
            OpPath::Candle
        };
        Self {
            dtype: DType::F32,
            matmul,
            other: kernels,
        }
    }

    /// [`ComputePlan::new`] with the process's [`Ops::current`].
    pub fn current(dtype: DType, device: &Device) -> std::result::Result<Self, String> {
        Ok(Self::new(dtype, device, Ops::current()?))
    }

    /// The matrix precision of the kernels, when any kernel runs.
    pub fn precision(&self) -> Option<Precision> {
        self.matmul.kernels().or(self.other.kernels())
    }
}

/// A `VarBuilder` that also carries the model's [`ComputePlan`]: what every model constructor
/// takes. Tensors come in `plan.dtype`.
#[derive(Clone)]
pub struct Vb {
    inner: VarBuilder<'static>,
    plan: ComputePlan,
    cache: Option<Arc<PackCache>>,
    conv_width: Option<usize>,
    direct_min_width: usize,
    /// (min width, min channels); None: no Winograd convolutions.
    winograd: Option<(usize, usize)>,
}

/// The narrowest images (at the model's configured sample size) whose stride-1 convolutions
/// get weights packed for the direct convolution of the CPU kernels. Narrower rows would waste
/// too many of each panel's 32 columns on padding (an 8-pixel row computes 10 columns for 8),
/// and those levels' large weights are better served by one GEMM over all frames.
pub const DIRECT_CONV_MIN_WIDTH: usize = 32;

/// The narrowest images whose 3x3 convolutions (stride 1, padding 1) run as the Winograd
/// F(2x2, 3x3) convolution of the CPU kernels, when both channel counts are at least
/// [`WINOGRAD_MIN_CHANNELS`]: a third fewer flops, 2.25x fewer multiplications, but 16/9 the
/// packed weights. Images of fewer tiles than a panel has columns (8x8: 16 tiles) run as one
/// product over the tiles of all frames, so the UNet's 8x8 level (1280 channels) gains as much
/// as the wider ones (10 frames, bf16: 1.7-1.9x the patch GEMM's speed; f32 1.9-2.0x), for
/// 16/9 of those weights (about +340 MB packed in bf16). At 4x4 (4 tiles an image) the gain
/// is 5-10% and not worth the memory.
pub const WINOGRAD_MIN_WIDTH: usize = 8;
/// Fewer channels than this on either side leave the transforms more work than they save.
pub const WINOGRAD_MIN_CHANNELS: usize = 32;

/// How a convolution's weights are packed for the CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKind {
    /// A GEMM over patches (im2col on the fly).
    Patches,
    /// The direct convolution: weights tap by tap ([`flipsketch_kernels::PackedRows::new_taps`]).
    Direct,
    /// Winograd F(2x2, 3x3) ([`flipsketch_kernels::PackedRows::new_winograd`]).
    Winograd,
}

impl Vb {
    pub fn new(inner: VarBuilder<'static>, plan: ComputePlan) -> Self {
        Self {
            inner,
            plan,
            cache: None,
            conv_width: None,
            direct_min_width: DIRECT_CONV_MIN_WIDTH,
            winograd: Some((WINOGRAD_MIN_WIDTH, WINOGRAD_MIN_CHANNELS)),
        }
    }

    /// This builder for layers whose convolutions see images `width` wide at the model's
    /// configured sample size (a model sets it per resolution level).
    pub fn with_conv_width(&self, width: usize) -> Self {
        Self {
            conv_width: Some(width),
            ..self.clone()
        }
    }

    /// This builder with direct convolutions from images `width` wide on (default
    /// [`DIRECT_CONV_MIN_WIDTH`]; 0 makes every stride-1 convolution direct, as tests of the
    /// small fixtures do) and no Winograd convolutions.
    pub fn with_direct_conv_min_width(self, width: usize) -> Self {
        Self {
            direct_min_width: width,
            winograd: None,
            ..self
        }
    }

    /// This builder with Winograd convolutions for the 3x3 (padding 1, stride 1) ones over
    /// images `width` wide or wider with at least `channels` channels in and out (defaults
    /// [`WINOGRAD_MIN_WIDTH`], [`WINOGRAD_MIN_CHANNELS`]; tests of the small fixtures use 0).
    pub fn with_winograd(self, width: usize, channels: usize) -> Self {
        Self {
            winograd: Some((width, channels)),
            ..self
        }
    }

    /// How a convolution built here packs its weights for the kernels.
    pub fn conv_kind(
        &self,
        kernel: usize,
        stride: usize,
        padding: usize,
        c_in: usize,
        c_out: usize,
    ) -> ConvKind {
        let Some(width) = self.conv_width else {
            return ConvKind::Patches;
        };
        if stride != 1 || kernel == 1 {
            return ConvKind::Patches;
        }
        if let Some((w, c)) = self.winograd {
            if (kernel, padding) == (3, 1) && width >= w && c_in.min(c_out) >= c {
                return ConvKind::Winograd;
            }
        }
        if width >= self.direct_min_width {
            ConvKind::Direct
        } else {
            ConvKind::Patches
        }
    }

    /// The image width set by [`Self::with_conv_width`].
    pub fn conv_width(&self) -> Option<usize> {
        self.conv_width
    }

    /// This builder with its packed weights taken from and recorded in `cache`.
    pub fn with_pack_cache(self, cache: Arc<PackCache>) -> Self {
        Self {
            cache: Some(cache),
            ..self
        }
    }

    pub fn pack_cache(&self) -> Option<&Arc<PackCache>> {
        self.cache.as_ref()
    }

    pub fn pp<S: ToString>(&self, s: S) -> Self {
        Self {
            inner: self.inner.pp(s),
            plan: self.plan,
            cache: self.cache.clone(),
            conv_width: self.conv_width,
            direct_min_width: self.direct_min_width,
            winograd: self.winograd,
        }
    }

    /// The full checkpoint name of `name` under this builder's prefix.
    pub fn full_name(&self, name: &str) -> String {
        let prefix = self.inner.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    pub fn get<S: Into<Shape>>(&self, s: S, name: &str) -> Result<Tensor> {
        self.inner.get(s, name)
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }

    pub fn prefix(&self) -> String {
        self.inner.prefix()
    }

    pub fn dtype(&self) -> DType {
        self.inner.dtype()
    }

    pub fn device(&self) -> &Device {
        self.inner.device()
    }

    pub fn plan(&self) -> ComputePlan {
        self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let cpu = Device::Cpu;
        for ops in [Ops::Auto, Ops::Portable, Ops::Avx2, Ops::Candle] {
            // f64: always candle, in f64
            let p = ComputePlan::new(DType::F64, &cpu, ops);
            assert_eq!(
                (p.dtype, p.matmul, p.other),
                (DType::F64, OpPath::Candle, OpPath::Candle)
            );
        }
        let p = ComputePlan::new(DType::BF16, &cpu, Ops::Candle);
        assert_eq!(
            (p.dtype, p.matmul, p.other),
            (DType::BF16, OpPath::Candle, OpPath::Candle)
        );
        let p = ComputePlan::new(DType::BF16, &cpu, Ops::Portable);
        assert_eq!(p.dtype, DType::F32);
        assert_eq!(p.matmul, OpPath::Kernels(Precision::Bf16));
        assert_eq!(p.other, OpPath::Kernels(Precision::Bf16));
        let p = ComputePlan::new(DType::F32, &cpu, Ops::Auto);
        assert_eq!(p.other, OpPath::Kernels(Precision::F32));
        let native = Precision::F32.is_native();
        assert_eq!(p.matmul == OpPath::Kernels(Precision::F32), native);
        let p = ComputePlan::new(DType::BF16, &cpu, Ops::Auto);
        let want = if Precision::Bf16.is_native() {
            Precision::Bf16
        } else {
            Precision::F32
        };
        assert_eq!(p.other, OpPath::Kernels(want));
        assert_eq!("Portable".parse::<Ops>(), Ok(Ops::Portable));
        assert_eq!(" avx2".parse::<Ops>(), Ok(Ops::Avx2));
        assert!("fast"
            .parse::<Ops>()
            .unwrap_err()
            .contains("auto, portable, avx2 or candle"));
    }
}
