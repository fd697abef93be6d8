//! transformers `models/clip/modeling_clip.py`: `CLIPTextModel`, returning `last_hidden_state`
//! (after the final layer norm). Causal self-attention, no padding mask (as the app calls it),
//! the activation exactly as configured (the ModelScope encoder says exact "gelu";
//! docs/algorithm.md), any batch size.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;

use crate::compute::Vb;
use serde::Deserialize;

use crate::error::Error;
use crate::nn::{layer_norm, linear, matmul, LayerNorm, Linear};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (`"gelu"`).
    Gelu,
    /// x * sigmoid(1.702 x) (`"quick_gelu"`).
    QuickGelu,
    /// tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
}

/// Serde mirror of `CLIPTextConfig` with transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipTextConfigFile {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl Default for ClipTextConfigFile {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

impl ClipTextConfigFile {
    pub fn validate(&self) -> std::result::Result<ClipTextConfig, String> {
        let activation = match self.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "quick_gelu" => Activation::QuickGelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => return Err(format!("hidden_act {other:?} is not supported")),
        };
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return Err("vocab_size and max_position_embeddings must be positive".into());
        }
        Ok(ClipTextConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            max_position_embeddings: self.max_position_embeddings,
            activation,
            layer_norm_eps: self.layer_norm_eps,
        })
    }
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let file: ClipTextConfigFile = crate::loading::read_json(path)?;
        file.validate().map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }
}

/// The sizes an encoder layer needs; shared by the text and the vision towers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub activation: Activation,
    pub eps: f64,
}

impl From<&ClipTextConfig> for LayerDims {
    fn from(c: &ClipTextConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            activation: c.activation,
            eps: c.layer_norm_eps,
        }
    }
}

#[derive(Clone, Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(c: LayerDims, vb: Vb) -> Result<Self> {
        let h = c.hidden;
        Ok(Self {
            q_proj: linear(h, h, true, vb.pp("q_proj"))?,
            k_proj: linear(h, h, true, vb.pp("k_proj"))?,
            v_proj: linear(h, h, true, vb.pp("v_proj"))?,
            out_proj: linear(h, h, true, vb.pp("out_proj"))?,
            heads: c.heads,
            scale: ((h / c.heads) as f64).powf(-0.5),
        })
    }

    /// `mask`: additive (seq, seq) mask (the text tower's causal one), or none.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, l, self.heads, c / self.heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = (matmul(&q, &k.t()?)? * self.scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, l, c))?;
        self.out_proj.forward(&out)
    }
}

/// transformers `CLIPEncoderLayer`.
#[derive(Clone, Debug)]
pub(crate) struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipEncoderLayer {
    pub(crate) fn new(c: LayerDims, vb: Vb) -> Result<Self> {
        Ok(Self {
            layer_norm1: layer_norm(c.hidden, c.eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(c, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(c.hidden, c.eps, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden, c.intermediate, true, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate, c.hidden, true, vb.pp("mlp.fc2"))?,
            activation: c.activation,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.activation {
            Activation::Gelu => h.gelu_erf()?,
            Activation::GeluTanh => h.gelu()?,
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
        };
        x + self.fc2.forward(&h)?
    }
}

#[derive(Clone, Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
    dtype: DType,
    device: Device,
}

impl ClipTextModel {
    pub fn new(c: &ClipTextConfig, vb: Vb) -> Result<Self> {
        let vb = crate::loading::optional_prefix(
            &vb,
            "text_model",
            &[
                "embeddings.token_embedding.weight",
                "embeddings.position_embedding.weight",
                "final_layer_norm.weight",
                "encoder.layers.0.layer_norm1.weight",
            ],
        );
        let emb = vb.pp("embeddings");
        let token_embedding = Embedding::new(
            emb.get((c.vocab_size, c.hidden_size), "token_embedding.weight")?,
            c.hidden_size,
        );
        let position_embedding = emb.get(
            (c.max_position_embeddings, c.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(c.into(), vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm: layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            config: c.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids`: (batch, seq) integer ids. Returns `last_hidden_state` (batch, seq, hidden).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_b, l) = input_ids.dims2()?;
        if l > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: {l} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            )
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            candle_core::bail!(
                "text encoder: token id {max_id} is outside the vocabulary ({})",
                self.config.vocab_size
            )
        }
        let x = self.token_embedding.forward(&ids)?;
        let x = x.broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?;
        let mask = causal_mask(l, self.dtype, &self.device)?;
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        self.final_layer_norm.forward(&x)
    }
}

/// (seq, seq) additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (l, l), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .unsqueeze(0)
}
