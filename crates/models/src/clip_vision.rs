//! transformers `CLIPVisionModelWithProjection`: ViT patch embedding with a class token,
//! pre-layernorm, the CLIP encoder (no mask), post-layernorm on the class token and the visual
//! projection -> `image_embeds`. Used to rank variants by similarity to the sketch.
//!
//! Reads a vision-only checkpoint (`CLIPVisionModelWithProjection`) or a full `CLIPModel`
//! folder (e.g. openai/clip-vit-base-patch32: `vision_config` nested in its config, the text
//! tower's tensors then unused and reported as unexpected).

use std::path::Path;

use crate::compute::Vb;
use candle_core::{DType, Module, Result, Tensor, D};
use serde::Deserialize;

use crate::clip_text::{Activation, ClipEncoderLayer, LayerDims};
use crate::error::Error;
use crate::nn::{layer_norm, LayerNorm, Linear};

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfigFile {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfigFile {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Reads `config.json` of a vision-only model or of a full CLIPModel (`vision_config`).
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let err = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let v: serde_json::Value = crate::loading::read_json(path)?;
        let (vision, projection) = match v.get("vision_config") {
            Some(vc) => (vc.clone(), v.get("projection_dim").and_then(|p| p.as_u64())),
            None => (v.clone(), None),
        };
        let mut f: ClipVisionConfigFile =
            serde_json::from_value(vision).map_err(|e| err(e.to_string()))?;
        if let Some(p) = projection {
            f.projection_dim = p as usize;
        }
        let activation = match f.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "quick_gelu" => Activation::QuickGelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => return Err(err(format!("hidden_act {other:?} is not supported"))),
        };
        if f.patch_size == 0 || f.image_size % f.patch_size != 0 {
            return Err(err(format!(
                "image_size {} is not a multiple of patch_size {}",
                f.image_size, f.patch_size
            )));
        }
        if f.num_attention_heads == 0 || f.hidden_size % f.num_attention_heads != 0 {
            return Err(err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                f.hidden_size, f.num_attention_heads
            )));
        }
        Ok(Self {
            hidden_size: f.hidden_size,
            intermediate_size: f.intermediate_size,
            projection_dim: f.projection_dim,
            num_hidden_layers: f.num_hidden_layers,
            num_attention_heads: f.num_attention_heads,
            num_channels: f.num_channels,
            image_size: f.image_size,
            patch_size: f.patch_size,
            activation,
            layer_norm_eps: f.layer_norm_eps,
        })
    }
}

#[derive(Clone, Debug)]
pub struct ClipVisionModelWithProjection {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    config: ClipVisionConfig,
}

impl ClipVisionModelWithProjection {
    pub fn new(c: &ClipVisionConfig, vb: Vb) -> Result<Self> {
        let vm = crate::loading::optional_prefix(
            &vb,
            "vision_model",
            &[
                "embeddings.patch_embedding.weight",
                "embeddings.class_embedding",
                "pre_layrnorm.weight",
                "post_layernorm.weight",
            ],
        );
        let emb = vm.pp("embeddings");
        let (h, p) = (c.hidden_size, c.patch_size);
        let positions = (c.image_size / p).pow(2) + 1;
        let dims = LayerDims {
            hidden: h,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            activation: c.activation,
            eps: c.layer_norm_eps,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(dims, vm.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embedding: emb.get((h, c.num_channels, p, p), "patch_embedding.weight")?,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: emb.get((positions, h), "position_embedding.weight")?,
            // sic: transformers' attribute is `pre_layrnorm`
            pre_layrnorm: layer_norm(h, c.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: layer_norm(h, c.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: Linear::new(
                vb.get((c.projection_dim, h), "visual_projection.weight")?,
                None,
                vb.plan().matmul,
            )?,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixel_values` (batch, channels, image_size, image_size), already normalised.
    /// Returns (`image_embeds` (batch, projection_dim), `last_hidden_state`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (b, ch, hh, ww) = pixel_values.dims4()?;
        if ch != c.num_channels || hh != c.image_size || ww != c.image_size {
            candle_core::bail!(
                "clip vision: pixel_values {:?} must be (B, {}, {}, {})",
                pixel_values.dims(),
                c.num_channels,
                c.image_size,
                c.image_size
            )
        }
        let dtype = self.patch_embedding.dtype();
        let x = pixel_values.to_dtype(DType::F32)?;
        let patches = x
            .conv2d(
                &self.patch_embedding.to_dtype(DType::F32)?,
                0,
                c.patch_size,
                1,
                1,
            )?
            .to_dtype(dtype)?; // (b, hidden, g, g)
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // (b, g*g, hidden)
        let cls = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?;
        let x = Tensor::cat(&[&cls.contiguous()?, &patches.contiguous()?], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok((self.visual_projection.forward(&pooled)?, x))
    }
}

/// Cosine similarity of two sets of embeddings, (n, d) x (m, d) -> (n, m).
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let norm = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
    };
    norm(a)?.matmul(&norm(b)?.t()?)
}
