//! `Attention` (diffusers `attention_processor.py`, the plain/SDPA processor path), the
//! `BasicTransformerBlock` and `FeedForward` (diffusers `attention.py`), and the self-attention
//! hook FlipSketch's composition uses.

use candle_core::{DType, Module, Result, Tensor, D};
use flipsketch_kernels::{self as kernels, AttentionShape, Precision};

use crate::compute::{OpPath, Vb};
use crate::nn::{layer_norm, linear, with_cpu_f32, LayerNorm, Linear};
use crate::unets::unet_3d_condition::repeat_interleave;

/// Which kind of self-attention (`attn1`) layer a hook call comes from. Decided by the layer's
/// place in the model (a `Transformer2DModel` vs a `TransformerTemporalModel`), never by shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelfAttnKind {
    /// Over the pixels of one frame: batch = batch*frames (sample-major), sequence = h*w.
    Spatial,
    /// Over the frames of one pixel: batch = batch*h*w, sequence = frames.
    /// `transformer_in` and the temporal transformers of every block.
    Temporal,
}

/// One `attn1` call, handed to an [`AttentionHook`].
pub struct SelfAttnCall<'a> {
    /// The layer's checkpoint prefix, e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn1`.
    pub layer: &'a str,
    pub kind: SelfAttnKind,
    pub num_frames: usize,
    /// (batch, seq, heads * head_dim): the projections as they come, heads not split (see
    /// [`split_heads`] for hooks that want them apart).
    pub query: &'a Tensor,
    pub key: &'a Tensor,
    pub value: &'a Tensor,
    pub heads: usize,
    pub scale: f64,
    /// How the layer computes attention (for hooks that compute it too).
    pub path: OpPath,
}

/// Observes or replaces self-attention. With no hook the attention is plain.
pub trait AttentionHook {
    /// Returns `Some(out)` with out (batch, seq, heads * head_dim), the layout of the value
    /// projection, to replace the plain attention result of this layer, or `None` to keep it.
    fn self_attention(&mut self, call: &SelfAttnCall) -> Result<Option<Tensor>>;
}

/// The optional hook threaded through forward passes.
pub type Hook<'a> = Option<&'a mut dyn AttentionHook>;

/// Upper bound on the bytes of attention scores materialised at once.
pub const ATTN_SCORES_BUDGET_BYTES: usize = 256 << 20;

/// softmax(q k^T * scale) v over (batch, heads, seq, head_dim) tensors, processed in chunks of
/// (batch*heads) so that at most [`ATTN_SCORES_BUDGET_BYTES`] of scores exist at a time.
pub fn scaled_dot_product_attention(
    path: OpPath,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if let OpPath::Kernels(prec) = path {
        let (b, h, lq, _) = q.dims4()?;
        let shape = split_heads_shape(q, k, v)?;
        return fused_attention(prec, q, k, v, shape, 1, scale)?.reshape((b, h, lq, ()));
    }
    attention_with_scores(q, k, v, scale, |_, s| Ok(s))
}

/// (batch, seq, heads * d) -> (batch, heads, seq, d), contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("split_heads: {c} features do not split into {heads} heads")
    }
    x.reshape((b, l, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// (batch, heads, seq, d) -> (batch, seq, heads * d), contiguous.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, _, l, _) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, ()))
}

/// Multi-head softmax(q k^T * scale) v over projections in their own layout: q (batch, lq,
/// heads * d), k (batch, lk, heads * d), v (batch, lk, heads * dv); returns (batch, lq,
/// heads * dv). k and v may have a batch that divides q's: each of their elements then serves
/// that many consecutive elements of q (as if repeat_interleave'd). The kernel reads the heads
/// in place (no split or merge copies); for candle's ops the heads are split.
pub fn multi_head_attention(
    path: OpPath,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (shape, kv_repeat) = merged_shape(q, k, v, heads)?;
    if let OpPath::Kernels(prec) = path {
        return fused_attention(prec, q, k, v, shape, kv_repeat, scale);
    }
    let (k, v) = (
        repeat_interleave(k, kv_repeat)?,
        repeat_interleave(v, kv_repeat)?,
    );
    let (qs, ks, vs) = (
        split_heads(q, heads)?,
        split_heads(&k, heads)?,
        split_heads(&v, heads)?,
    );
    merge_heads(&scaled_dot_product_attention(path, &qs, &ks, &vs, scale)?)
}

/// The kernel's shape for (batch, seq, heads * d) projections, and how many query batch
/// elements share each key/value element.
fn merged_shape(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<(AttentionShape, usize)> {
    let (batch, lq, inner) = q.dims3()?;
    let (kb, lk, k_inner) = k.dims3()?;
    let (vb, lv, inner_v) = v.dims3()?;
    if heads == 0
        || inner % heads != 0
        || inner_v % heads != 0
        || k_inner != inner
        || (vb, lv) != (kb, lk)
        || kb == 0
        || batch % kb != 0
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not split into {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let shape = AttentionShape {
        batch,
        heads,
        lq,
        lk,
        d: inner / heads,
        dv: inner_v / heads,
    };
    Ok((shape, batch / kb))
}

/// (batch, heads, seq, d) tensors seen by the kernel as batch*heads items of one head each.
fn split_heads_shape(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttentionShape> {
    let (b, h, lq, d) = q.dims4()?;
    Ok(AttentionShape {
        batch: b * h,
        heads: 1,
        lq,
        lk: k.dim(2)?,
        d,
        dv: v.dim(3)?,
    })
}

/// [`multi_head_attention`] (same layouts) where the unscaled score of query j on key 0 is
/// `q_j . key0 * weight[j]`, `key0`: (batch, 1, heads * d), one key per (item, head).
/// Computed by the kernel; `None` on candle's path, for the caller's own form of it.
#[allow(clippy::too_many_arguments)]
pub fn attention_first_key(
    path: OpPath,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key0: &Tensor,
    weight: &[f32],
    scale: f64,
) -> Result<Option<Tensor>> {
    let OpPath::Kernels(prec) = path else {
        return Ok(None);
    };
    let (shape, kv_repeat) = merged_shape(q, k, v, heads)?;
    if kv_repeat != 1 {
        candle_core::bail!(
            "attention: first-key attention needs keys for every query batch element, got {:?} for {:?}",
            k.dims(),
            q.dims()
        )
    }
    if key0.dims() != [shape.batch, 1, heads * shape.d] || weight.len() != shape.lq {
        candle_core::bail!(
            "attention: key0 {:?} / {} weights do not fit queries {:?}",
            key0.dims(),
            weight.len(),
            q.dims()
        )
    }
    let mut out = kernels::zeroed(shape.batch * shape.lq * heads * shape.dv);
    with_cpu_f32(q, |qs| {
        with_cpu_f32(k, |ks| {
            with_cpu_f32(v, |vs| {
                with_cpu_f32(&key0.to_dtype(DType::F32)?, |k0| {
                    let first = kernels::FirstKey { key0: k0, weight };
                    kernels::attention_first_key(
                        prec,
                        qs,
                        ks,
                        vs,
                        shape,
                        scale as f32,
                        first,
                        &mut out,
                    )
                })
            })
        })
    })????;
    Ok(Some(Tensor::from_vec(
        out,
        (shape.batch, shape.lq, heads * shape.dv),
        q.device(),
    )?))
}

/// Like [`scaled_dot_product_attention`], with a chance to edit each chunk's scaled scores
/// before the softmax. `edit(start, scores)` gets the chunk's first index into the flattened
/// (batch*heads) dimension and scores of shape (chunk, seq_q, seq_k).
pub fn attention_with_scores(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    edit: impl FnMut(usize, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    attention_in_chunks(q, k, v, scale, ATTN_SCORES_BUDGET_BYTES, edit)
}

/// [`attention_with_scores`] with an explicit budget for the scores of one chunk.
pub fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    budget_bytes: usize,
    mut edit: impl FnMut(usize, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let n = b * h;
    let q = q.reshape((n, lq, d))?;
    let k = k.reshape((n, lk, d))?;
    let v = v.reshape((n, lk, v.dim(3)?))?;
    let per_item = lq * lk * q.dtype().size_in_bytes();
    let chunk = (budget_bytes / per_item.max(1)).clamp(1, n);
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let qc = q.narrow(0, start, len)?;
        let kc = k.narrow(0, start, len)?;
        let vc = v.narrow(0, start, len)?;
        let scores = (crate::nn::matmul(&qc, &kc.t()?)? * scale)?;
        let scores = edit(start, scores)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(crate::nn::matmul(&probs, &vc)?);
        start += len;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 0)?
    };
    out.reshape((b, h, lq, ()))
}

/// diffusers `Attention` as used by the UNet's transformer blocks: to_q/to_k/to_v (bias
/// configurable), to_out.0 with bias, no norms, no residual.
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    name: String,
    /// How the attention itself is computed (the plan's).
    path: OpPath,
}

impl Attention {
    pub fn new(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        bias: bool,
        vb: Vb,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let kv_dim = cross_attention_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear(query_dim, inner, bias, vb.pp("to_q"))?,
            to_k: linear(kv_dim, inner, bias, vb.pp("to_k"))?,
            to_v: linear(kv_dim, inner, bias, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, true, vb.pp("to_out.0"))?,
            heads,
            scale: (dim_head as f64).powf(-0.5),
            name: vb.prefix(),
            path: vb.plan().other,
        })
    }

    /// `x`: (batch, seq, query_dim); `context`: (batch, seq_kv, cross_dim) for cross-attention,
    /// or with a batch dividing x's, each element shared by that many consecutive ones of x.
    /// `self_attn` carries the hook for `attn1` layers (kind and frame count).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        self_attn: Option<(SelfAttnKind, usize, Hook<'_>)>,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        // (batch, seq, heads*d)
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        if let Some((kind, num_frames, Some(hook))) = self_attn {
            let call = SelfAttnCall {
                layer: &self.name,
                kind,
                num_frames,
                query: &q,
                key: &k,
                value: &v,
                heads: self.heads,
                scale: self.scale,
                path: self.path,
            };
            if let Some(out) = hook.self_attention(&call)? {
                let (b, l, _) = q.dims3()?;
                if out.dims() != [b, l, v.dim(2)?] {
                    candle_core::bail!(
                        "{}: the hook returned {:?}, not {:?}",
                        self.name,
                        out.dims(),
                        [b, l, v.dim(2)?]
                    )
                }
                return self.to_out.forward(&out);
            }
        }
        let out = multi_head_attention(self.path, &q, &k, &v, self.heads, self.scale)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.name)))?;
        self.to_out.forward(&out)
    }
}

fn fused_attention(
    prec: Precision,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: AttentionShape,
    kv_repeat: usize,
    scale: f64,
) -> Result<Tensor> {
    let mut out = kernels::zeroed(shape.batch * shape.lq * shape.heads * shape.dv);
    with_cpu_f32(q, |qs| {
        with_cpu_f32(k, |ks| {
            with_cpu_f32(v, |vs| {
                kernels::attention_shared_kv(
                    prec,
                    qs,
                    ks,
                    vs,
                    shape,
                    kv_repeat,
                    scale as f32,
                    &mut out,
                )
            })
        })
    })???;
    Tensor::from_vec(
        out,
        (shape.batch, shape.lq, shape.heads * shape.dv),
        q.device(),
    )
}

/// diffusers `GEGLU`: proj to 2*inner, `hidden * gelu(gate)` with exact (erf) GELU.
#[derive(Clone, Debug)]
struct GeGlu {
    proj: Linear,
    path: OpPath,
}

impl GeGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let OpPath::Kernels(_) = self.path {
            if let Some(out) = self.proj.forward_geglu(x)? {
                return Ok(out);
            }
        }
        let h = self.proj.forward(x)?;
        let half = h.dim(D::Minus1)? / 2;
        if let OpPath::Kernels(_) = self.path {
            let mut dims = h.dims().to_vec();
            *dims.last_mut().expect("non-scalar") = half;
            let mut out = kernels::zeroed(h.elem_count() / 2);
            with_cpu_f32(&h, |hs| kernels::geglu(hs, half, &mut out))?;
            return Tensor::from_vec(out, dims, h.device());
        }
        let hidden = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        hidden * gate.gelu_erf()?
    }
}

/// Rows of a [`FeedForward`] pass at a time.
pub const FF_ROWS: usize = 4096;

/// diffusers `FeedForward` with `activation_fn="geglu"`: net.0 (GEGLU), net.1 (dropout), net.2.
#[derive(Clone, Debug)]
pub struct FeedForward {
    geglu: GeGlu,
    out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, vb: Vb) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            geglu: GeGlu {
                proj: linear(dim, inner * 2, true, vb.pp("net.0.proj"))?,
                path: vb.plan().other,
            },
            out: linear(inner, dim, true, vb.pp("net.2"))?,
        })
    }

    /// Rows are processed [`FF_ROWS`] at a time: the GEGLU's input is 8x the width of `x`, and
    /// rows are independent, so chunking bounds memory without changing any value.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let width = *dims.last().unwrap_or(&1);
        let rows = x.elem_count() / width.max(1);
        if rows <= FF_ROWS {
            return self.out.forward(&self.geglu.forward(x)?);
        }
        let flat = x.reshape((rows, width))?;
        let parts = (0..rows)
            .step_by(FF_ROWS)
            .map(|start| {
                let chunk = flat.narrow(0, start, FF_ROWS.min(rows - start))?;
                self.out.forward(&self.geglu.forward(&chunk)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.reshape(dims)
    }
}

/// diffusers `BasicTransformerBlock` with `norm_type="layer_norm"`, geglu feed-forward.
/// `attn2` is cross-attention when `cross_attention_dim` is given, a second self-attention
/// otherwise (`double_self_attention=True` in the temporal transformers, docs/algorithm.md).
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    kind: SelfAttnKind,
}

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: Option<usize>,
        kind: SelfAttnKind,
        vb: Vb,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, None, heads, dim_head, false, vb.pp("attn1"))?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                cross_attention_dim,
                heads,
                dim_head,
                false,
                vb.pp("attn2"),
            )?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            kind,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        num_frames: usize,
        hook: Hook<'_>,
    ) -> Result<Tensor> {
        // 1. self-attention (the hook point)
        let h = self.norm1.forward(x)?;
        let x = (self
            .attn1
            .forward(&h, None, Some((self.kind, num_frames, hook)))?
            + x)?;
        // 2. cross-attention, or the temporal blocks' second self-attention
        let h = self.norm2.forward(&x)?;
        let x = (self.attn2.forward(&h, encoder_hidden_states, None)? + x)?;
        // 3. feed-forward
        let h = self.norm3.forward(&x)?;
        self.ff.forward(&h)? + x
    }
}

/// Reborrows a hook for one nested call (`Option::as_deref_mut` cannot shorten the trait
/// object's lifetime).
pub fn reborrow<'b>(hook: &'b mut Hook<'_>) -> Hook<'b> {
    match hook {
        Some(h) => Some(&mut **h),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_equals_one_chunk() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (3, 4, 17, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (3, 4, 13, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (3, 4, 13, 8), &dev)?;
        let whole = attention_in_chunks(&q, &k, &v, 0.3, usize::MAX, |_, s| Ok(s))?;
        let mut starts = Vec::new();
        // 17*13*4 bytes per (batch*head) item: a budget of 5 items gives chunks of 5,5,.. of 12
        let chunked = attention_in_chunks(&q, &k, &v, 0.3, 5 * 17 * 13 * 4, |start, s| {
            starts.push((start, s.dim(0)?));
            Ok(s)
        })?;
        assert_eq!(starts, vec![(0, 5), (5, 5), (10, 2)]);
        let d = (whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        // and both equal a direct softmax(q k^T s) v
        let direct = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * 0.3)?)?.matmul(&v)?;
        let d = (attention_in_chunks(&q, &k, &v, 0.3, 1, |_, s| Ok(s))? - direct)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
}
