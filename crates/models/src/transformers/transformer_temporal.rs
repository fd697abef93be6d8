//! diffusers `TransformerTemporalModel` (`transformers/transformer_temporal.py`): attention
//! over the frames of each pixel. `double_self_attention=True`, so `attn2` is self-attention
//! too, and no text reaches it.

use candle_core::{Module, Result, Tensor};

use crate::compute::{OpPath, Vb};

use crate::attention::{reborrow, BasicTransformerBlock, Hook, SelfAttnKind};
use crate::nn::{linear, transpose_add, FrameGroupNorm, Linear};

#[derive(Clone, Debug)]
pub struct TransformerTemporalModel {
    norm: FrameGroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
    /// How the token transposes run (the plan's).
    path: OpPath,
}

impl TransformerTemporalModel {
    pub fn new(
        num_attention_heads: usize,
        attention_head_dim: usize,
        in_channels: usize,
        num_layers: usize,
        norm_num_groups: usize,
        vb: Vb,
    ) -> Result<Self> {
        let inner = num_attention_heads * attention_head_dim;
        let transformer_blocks = (0..num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    num_attention_heads,
                    attention_head_dim,
                    None,
                    SelfAttnKind::Temporal,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: FrameGroupNorm::new(norm_num_groups, in_channels, 1e-6, vb.pp("norm"))?,
            proj_in: linear(in_channels, inner, true, vb.pp("proj_in"))?,
            transformer_blocks,
            proj_out: linear(inner, in_channels, true, vb.pp("proj_out"))?,
            path: vb.plan().other,
        })
    }

    /// `x`: (batch*frames, c, h, w).
    pub fn forward(&self, x: &Tensor, num_frames: usize, mut hook: Hook<'_>) -> Result<Tensor> {
        let (bf, c, h, w) = x.dims4()?;
        let b = bf / num_frames;
        let residual = x;
        // 1. norm over all frames of a sample, then one sequence of frames per pixel
        // (b, frames * c, h * w) -> (b, h * w, frames * c): a sequence of frames per pixel
        let x = self.norm.forward(x, num_frames)?;
        let x = transpose_add(self.path, &x.reshape((b, num_frames * c, h * w))?, None)?
            .reshape((b * h * w, num_frames, c))?;
        let mut x = self.proj_in.forward(&x)?;
        // 2. blocks
        for block in &self.transformer_blocks {
            x = block.forward(&x, None, num_frames, reborrow(&mut hook))?;
        }
        // 3. output, back to (batch*frames, c, h, w)
        let x = self
            .proj_out
            .forward(&x)?
            .reshape((b, h * w, num_frames * c))?;
        let residual = residual.reshape((b, num_frames * c, h * w))?;
        transpose_add(self.path, &x, Some(&residual))?.reshape((bf, c, h, w))
    }
}
