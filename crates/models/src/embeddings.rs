//! diffusers `embeddings.py`: `Timesteps` (sinusoidal) and `TimestepEmbedding`.

use crate::compute::Vb;
use candle_core::{Device, Module, Result, Tensor};

use crate::nn::{linear, Linear};

/// `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift)` with
/// scale 1 and max_period 10000, computed in f32 as diffusers does.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    // torch: (-math.log(10000)) is a double cast to f32, then arange(f32) * it / (half - shift)
    let neg_log = -(10000f64.ln()) as f32;
    let denom = half as f32 - downscale_freq_shift as f32;
    let mut rows = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let mut sin = Vec::with_capacity(half);
        let mut cos = Vec::with_capacity(half);
        for i in 0..half {
            let exponent = neg_log * (i as f32) / denom;
            let arg = t * exponent.exp();
            sin.push(arg.sin());
            cos.push(arg.cos());
        }
        if flip_sin_to_cos {
            rows.extend(cos);
            rows.extend(sin);
        } else {
            rows.extend(sin);
            rows.extend(cos);
        }
        if dim % 2 == 1 {
            rows.push(0.0);
        }
    }
    Tensor::from_vec(rows, (timesteps.len(), dim), device)
}

/// `TimestepEmbedding(in, time_embed_dim, act_fn="silu")`: linear_1, SiLU, linear_2.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_channels: usize, time_embed_dim: usize, vb: Vb) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_channels, time_embed_dim, true, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, true, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}
