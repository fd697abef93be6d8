//! FlipSketch's dual attention composition as an [`AttentionHook`] (algorithm section 2, step 4).
//!
//! The reference branch runs with batch 1 (it is the same for every variant: same noise, same
//! empty prompt), and [`Recorder`] keeps what the composition uses of each `attn1` layer: the
//! queries of a spatial layer, the frame-0 keys of a temporal one. [`Composer`] then
//! changes the conditional pass of the B variants:
//! - spatial self-attention (batch = B*F frames, variant-major): the queries of the first `cc`
//!   frames of every variant become the recorded reference queries of those frames;
//! - temporal self-attention (batch = B*h*w pixels, sequence = F frames): for every query frame
//!   j the score on key frame 0 becomes `q_j . kref_0 * scale * (1 + lambda * j / 50)`, with
//!   kref_0 the recorded reference key of frame 0 at the same pixel and head.
//!
//! This is the app's PyTorch 1.x behaviour (scores on (batch*heads, L, S)), which is the paper's.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use flipsketch_models::attention::{
    attention_first_key, attention_with_scores, merge_heads, multi_head_attention, split_heads,
    AttentionHook, SelfAttnCall, SelfAttnKind,
};

/// What one reference pass's `attn1` layers leave for the composition, in the projections'
/// layout (heads not split): a spatial layer's queries (cc, h*w, heads*d), a temporal layer's
/// keys of frame 0 (pixels, 1, heads*d). The rest (spatial keys, temporal queries, later
/// frames' keys) is never used, so it is not kept.
#[derive(Default)]
pub struct Recorder {
    pub layers: HashMap<String, Recorded>,
}

/// One layer's recording.
pub enum Recorded {
    Queries(Tensor),
    FirstKeys(Tensor),
}

impl AttentionHook for Recorder {
    fn self_attention(&mut self, call: &SelfAttnCall) -> Result<Option<Tensor>> {
        let kept = match call.kind {
            SelfAttnKind::Spatial => Recorded::Queries(call.query.clone()),
            SelfAttnKind::Temporal => Recorded::FirstKeys(call.key.narrow(1, 0, 1)?.contiguous()?),
        };
        self.layers.insert(call.layer.to_string(), kept);
        Ok(None)
    }
}

/// Composes the conditional pass of `variants` samples with a batch-1 reference recording.
pub struct Composer<'a> {
    pub recorded: &'a Recorder,
    pub variants: usize,
    /// Frames of the reference branch at this step (`cc`).
    pub ref_frames: usize,
    pub lambda: f64,
}

impl AttentionHook for Composer<'_> {
    fn self_attention(&mut self, call: &SelfAttnCall) -> Result<Option<Tensor>> {
        match (call.kind, self.recorded.layers.get(call.layer)) {
            (SelfAttnKind::Spatial, Some(Recorded::Queries(q_ref))) => {
                self.spatial(call, q_ref).map(Some)
            }
            (SelfAttnKind::Temporal, Some(Recorded::FirstKeys(k_ref))) => {
                self.temporal(call, k_ref).map(Some)
            }
            _ => candle_core::bail!(
                "composition: no reference recording of this kind for layer {}",
                call.layer
            ),
        }
    }
}

impl Composer<'_> {
    fn spatial(&self, call: &SelfAttnCall, q_ref: &Tensor) -> Result<Tensor> {
        let (bf, l, inner) = call.query.dims3()?;
        let (b, f, cc) = (self.variants, call.num_frames, self.ref_frames);
        if bf != b * f || q_ref.dims() != [cc, l, inner] || cc > f {
            candle_core::bail!(
                "composition {}: query {:?} and reference {:?} do not fit {b} variants x {f} frames with {cc} reference frames",
                call.layer,
                call.query.dims(),
                q_ref.dims()
            )
        }
        // The first cc frames of every variant take the reference's queries (all pixels,
        // all heads): one copy of the queries, the heads left in place.
        let head = q_ref.unsqueeze(0)?.broadcast_as((b, cc, l, inner))?;
        let q = if cc == f {
            head.contiguous()?
        } else {
            let q = call.query.reshape((b, f, l, inner))?;
            Tensor::cat(&[&head, &q.narrow(1, cc, f - cc)?], 1)?
        };
        let q = q.reshape((bf, l, inner))?;
        multi_head_attention(call.path, &q, call.key, call.value, call.heads, call.scale)
    }

    fn temporal(&self, call: &SelfAttnCall, k_ref: &Tensor) -> Result<Tensor> {
        let (n, f, inner) = call.query.dims3()?;
        let b = self.variants;
        let pixels = n / b.max(1);
        if n != b * pixels || k_ref.dims() != [pixels, 1, inner] {
            candle_core::bail!(
                "composition {}: query {:?} and reference key {:?} do not fit {b} variants",
                call.layer,
                call.query.dims(),
                k_ref.dims()
            )
        }
        // kref_0 of each (pixel, head), the same for every variant: (b*pixels, 1, heads*d)
        let k0 = if b == 1 {
            k_ref.clone()
        } else {
            k_ref
                .unsqueeze(0)?
                .broadcast_as((b, pixels, 1, inner))?
                .reshape((n, 1, inner))?
        };
        // q_j . kref_0 * scale * (1 + lambda * j / 50), for every query frame j: in one CPU
        // kernel where it applies,
        let frame = |j: usize| 1.0 + self.lambda * j as f64 / 50.0;
        let frame_weight: Vec<f32> = (0..f).map(|j| frame(j) as f32).collect();
        if let Some(out) = attention_first_key(
            call.path,
            call.query,
            call.key,
            call.value,
            call.heads,
            &k0,
            &frame_weight,
            call.scale,
        )? {
            return Ok(out);
        }
        // else with tensor ops on split heads.
        let h = call.heads;
        let (q, k, v) = (
            split_heads(call.query, h)?,
            split_heads(call.key, h)?,
            split_heads(call.value, h)?,
        );
        let k0 = split_heads(&k0, h)?; // (n, heads, 1, d)
        let weights: Vec<f32> = (0..f).map(|j| (call.scale * frame(j)) as f32).collect();
        let weights = Tensor::from_vec(weights, (1, 1, f, 1), q.device())?.to_dtype(q.dtype())?;
        let col0 = flipsketch_models::nn::matmul(&q, &k0.t()?)?.broadcast_mul(&weights)?; // (n, heads, f, 1)
        let col0 = col0.reshape((n * h, f, 1))?;
        let out = attention_with_scores(&q, &k, &v, call.scale, |start, scores| {
            let len = scores.dim(0)?;
            let first = col0.narrow(0, start, len)?;
            if f == 1 {
                Ok(first)
            } else {
                Tensor::cat(&[&first, &scores.narrow(2, 1, f - 1)?], 2)
            }
        })?;
        merge_heads(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use flipsketch_models::compute::OpPath;
    use flipsketch_models::Precision;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all());
        d.and_then(|d| d.to_scalar::<f32>())
            .expect("f32 tensors of one shape")
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::flipsketch::seeded_noise(seed, 0, shape, &Device::Cpu).unwrap()
    }

    /// The CPU kernel path (f32) and the tensor-op fallback (taken for any other dtype, here
    /// f64) compose the same attention, spatial and temporal, with 2 variants.
    #[test]
    fn kernel_and_fallback_compositions_agree() {
        let (b, f, cc, heads, d, pixels) = (2, 4, 3, 2, 8, 6);
        let inner = heads * d;
        let mut rec = Recorder::default();
        rec.layers.insert(
            "s".into(),
            Recorded::Queries(randn(&[cc, pixels, inner], 1)),
        );
        rec.layers.insert(
            "t".into(),
            Recorded::FirstKeys(randn(&[pixels, 1, inner], 2)),
        );
        let cases = [
            ("s", SelfAttnKind::Spatial, [b * f, pixels, inner]),
            ("t", SelfAttnKind::Temporal, [b * pixels, f, inner]),
        ];
        for (layer, kind, dims) in cases {
            let (q, k, v) = (randn(&dims, 3), randn(&dims, 4), randn(&dims, 5));
            let run = |dtype: DType, rec: &Recorder| {
                let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let (q, k, v) = (cast(&q), cast(&k), cast(&v));
                let call = SelfAttnCall {
                    layer,
                    kind,
                    num_frames: f,
                    query: &q,
                    key: &k,
                    value: &v,
                    heads,
                    scale: 0.3,
                    // the kernels for f32, candle's ops for the f64 run
                    path: if dtype == DType::F32 {
                        OpPath::Kernels(Precision::F32)
                    } else {
                        OpPath::Candle
                    },
                };
                let mut c = Composer {
                    recorded: rec,
                    variants: b,
                    ref_frames: cc,
                    lambda: 2.0,
                };
                c.self_attention(&call)
                    .unwrap()
                    .expect("composed")
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let mut rec64 = Recorder::default();
            for (name, r) in &rec.layers {
                let r = match r {
                    Recorded::Queries(t) => Recorded::Queries(t.to_dtype(DType::F64).unwrap()),
                    Recorded::FirstKeys(t) => Recorded::FirstKeys(t.to_dtype(DType::F64).unwrap()),
                };
                rec64.layers.insert(name.clone(), r);
            }
            let kernel = run(DType::F32, &rec);
            let fallback = run(DType::F64, &rec64);
            assert_eq!(kernel.dims(), &dims);
            let diff = max_abs_diff(&kernel, &fallback);
            assert!(
                diff < 1e-5,
                "{kind:?}: kernel and fallback differ by {diff:e}"
            );
            // and the composition changed something
            let plain =
                multi_head_attention(OpPath::Kernels(Precision::F32), &q, &k, &v, heads, 0.3)
                    .unwrap();
            let moved = max_abs_diff(&kernel, &plain);
            assert!(moved > 1e-3, "{kind:?}: composition had no effect");
        }
    }
}
