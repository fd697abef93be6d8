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
    attention_first_key, attention_with_scores, scaled_dot_product_attention_in, AttentionHook,
    SelfAttnCall, SelfAttnKind,
};

/// What one reference pass's `attn1` layers leave for the composition: a spatial layer's
/// queries (cc, heads, h*w, d), a temporal layer's keys of frame 0 (pixels, heads, 1, d). The
/// rest (spatial keys, temporal queries, later frames' keys) is never used, so it is not kept.
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
            SelfAttnKind::Temporal => Recorded::FirstKeys(call.key.narrow(2, 0, 1)?.contiguous()?),
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
        let (bf, heads, l, d) = call.query.dims4()?;
        let (b, f, cc) = (self.variants, call.num_frames, self.ref_frames);
        if bf != b * f || q_ref.dims() != [cc, heads, l, d] || cc > f {
            candle_core::bail!(
                "composition {}: query {:?} and reference {:?} do not fit {b} variants x {f} frames with {cc} reference frames",
                call.layer,
                call.query.dims(),
                q_ref.dims()
            )
        }
        let q = call.query.reshape((b, f, heads, l, d))?;
        let head = q_ref.unsqueeze(0)?.broadcast_as((b, cc, heads, l, d))?;
        let q = if cc == f {
            head.contiguous()?
        } else {
            Tensor::cat(&[&head, &q.narrow(1, cc, f - cc)?], 1)?
        };
        let q = q.reshape((bf, heads, l, d))?;
        scaled_dot_product_attention_in(call.precision, &q, call.key, call.value, call.scale)
    }

    fn temporal(&self, call: &SelfAttnCall, k_ref: &Tensor) -> Result<Tensor> {
        let (n, heads, f, d) = call.query.dims4()?;
        let b = self.variants;
        let pixels = n / b.max(1);
        if n != b * pixels || k_ref.dims() != [pixels, heads, 1, d] {
            candle_core::bail!(
                "composition {}: query {:?} and reference key {:?} do not fit {b} variants",
                call.layer,
                call.query.dims(),
                k_ref.dims()
            )
        }
        // kref_0 of each (pixel, head), the same for every variant: (b*pixels, heads, 1, d)
        let k0 = k_ref
            .unsqueeze(0)?
            .broadcast_as((b, pixels, heads, 1, d))?
            .reshape((n, heads, 1, d))?;
        // q_j . kref_0 * scale * (1 + lambda * j / 50), for every query frame j: in one CPU
        // kernel where it applies,
        let frame_weight: Vec<f32> = (0..f)
            .map(|j| (1.0 + self.lambda * j as f64 / 50.0) as f32)
            .collect();
        let k0 = k0.contiguous()?;
        if let Some(out) = attention_first_key(
            call.precision,
            call.query,
            call.key,
            call.value,
            &k0,
            &frame_weight,
            call.scale,
        )? {
            return Ok(out);
        }
        // else with tensor ops.
        let weights: Vec<f32> = (0..f)
            .map(|j| (call.scale * (1.0 + self.lambda * j as f64 / 50.0)) as f32)
            .collect();
        let weights = Tensor::from_vec(weights, (1, 1, f, 1), call.query.device())?
            .to_dtype(call.query.dtype())?;
        let col0 = flipsketch_models::nn::matmul(call.query, &k0.t()?)?.broadcast_mul(&weights)?; // (n, heads, f, 1)
        let col0 = col0.reshape((n * heads, f, 1))?;
        attention_with_scores(
            call.query,
            call.key,
            call.value,
            call.scale,
            |start, scores| {
                let len = scores.dim(0)?;
                let first = col0.narrow(0, start, len)?;
                if f == 1 {
                    Ok(first)
                } else {
                    Tensor::cat(&[&first, &scores.narrow(2, 1, f - 1)?], 2)
                }
            },
        )
    }
}
