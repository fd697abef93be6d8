//! diffusers `Transformer2DModel` (`transformers/transformer_2d.py`), continuous input with
//! linear projections: `get_down_block`/`get_up_block` of `unet_3d_blocks.py` default to
//! `use_linear_projection=True`, so every spatial transformer of the UNet3D has 2-D
//! `proj_in`/`proj_out` weights applied after the pixels are flattened.

use candle_core::{Module, Result, Tensor};

use crate::compute::{OpPath, Vb};

use crate::attention::{reborrow, BasicTransformerBlock, Hook, SelfAttnKind};
use crate::nn::{group_norm, linear, transpose_add, GroupNorm, Linear};

#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
    /// How the token transposes run (the plan's).
    path: OpPath,
}

impl Transformer2DModel {
    pub fn new(
        num_attention_heads: usize,
        attention_head_dim: usize,
        in_channels: usize,
        num_layers: usize,
        cross_attention_dim: usize,
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
                    Some(cross_attention_dim),
                    SelfAttnKind::Spatial,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: group_norm(norm_num_groups, in_channels, 1e-6, vb.pp("norm"))?,
            proj_in: linear(in_channels, inner, true, vb.pp("proj_in"))?,
            transformer_blocks,
            proj_out: linear(inner, in_channels, true, vb.pp("proj_out"))?,
            path: vb.plan().other,
        })
    }

    /// `x`: (batch*frames, c, h, w); `encoder_hidden_states`: (batch*frames, seq, dim), or
    /// (batch, seq, dim) shared by the frames of each sample.
    pub fn forward(
        &self,
        x: &Tensor,
        encoder_hidden_states: &Tensor,
        num_frames: usize,
        mut hook: Hook<'_>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        // 1. input: norm, flatten pixels, project
        let x = self.norm.forward(x)?;
        let x = transpose_add(self.path, &x.reshape((b, c, h * w))?, None)?;
        let mut x = self.proj_in.forward(&x)?;
        // 2. blocks
        for block in &self.transformer_blocks {
            x = block.forward(
                &x,
                Some(encoder_hidden_states),
                num_frames,
                reborrow(&mut hook),
            )?;
        }
        // 3. output
        let x = self.proj_out.forward(&x)?;
        let residual = residual.reshape((b, c, h * w))?;
        transpose_add(self.path, &x, Some(&residual))?.reshape((b, c, h, w))
    }
}
