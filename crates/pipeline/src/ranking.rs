//! Ranking variants by how well they keep the sketch: the mean cosine similarity of every
//! frame's CLIP image embedding to the sketch's (the original app meant this but compared one
//! frame only, and could return nothing; here every variant gets a score and all are kept).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flipsketch_media::clip_preprocess::ClipPreprocess;
use flipsketch_media::Frames;
use flipsketch_models::clip_vision::{
    cosine_similarity, ClipVisionConfig, ClipVisionModelWithProjection,
};
use flipsketch_models::loading::{load_component, FolderLayout, LoadReport, TRANSFORMERS_WEIGHTS};

use crate::components::ComponentsError;

/// The files of a CLIP folder [`ClipRanker::load`] reads.
pub const CLIP_FILES: FolderLayout = FolderLayout {
    required: &["config.json", "preprocessor_config.json"],
    optional: &[],
    one_of: &[],
    weights: &[("", TRANSFORMERS_WEIGHTS)],
    marker: "config.json",
};

pub struct ClipRanker {
    model: ClipVisionModelWithProjection,
    preprocess: ClipPreprocess,
    device: Device,
}

/// RGB bytes of one image.
pub struct Rgb<'a> {
    pub data: &'a [u8],
    pub width: usize,
    pub height: usize,
}

impl ClipRanker {
    /// Loads a CLIP folder: `config.json`, `preprocessor_config.json` and the weights
    /// (`variant` as for [`crate::components::Components::load`]).
    pub fn load(
        dir: &Path,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<(Self, LoadReport), ComponentsError> {
        let config = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        let pre_path = dir.join("preprocessor_config.json");
        let pre_json: serde_json::Value = flipsketch_models::loading::read_json(&pre_path)?;
        let preprocess = ClipPreprocess::from_json(&pre_json).map_err(|msg| {
            flipsketch_models::Error::Config {
                path: pre_path.clone(),
                msg,
            }
        })?;
        if preprocess.crop != (config.image_size, config.image_size) {
            return Err(flipsketch_models::Error::Config {
                path: pre_path,
                msg: format!(
                    "crop {:?} does not match the model's image_size {}",
                    preprocess.crop, config.image_size
                ),
            }
            .into());
        }
        let (model, report) = load_component(
            "clip",
            dir,
            &TRANSFORMERS_WEIGHTS.candidates(variant),
            DType::F32,
            device,
            |vb| ClipVisionModelWithProjection::new(&config, vb),
        )?;
        Ok((
            Self {
                model,
                preprocess,
                device: device.clone(),
            },
            report,
        ))
    }

    /// Image embeddings (n, projection_dim) of RGB images, preprocessed as CLIPImageProcessor.
    pub fn embed(&self, images: &[Rgb]) -> candle_core::Result<Tensor> {
        let (ch, cw) = self.preprocess.crop;
        let mut all = Vec::with_capacity(images.len() * 3 * ch * cw);
        for im in images {
            all.extend(self.preprocess.pixels(im.data, im.width, im.height));
        }
        let pixels = Tensor::from_vec(all, (images.len(), 3, ch, cw), &self.device)?;
        self.embed_pixel_values(&pixels)
    }

    /// Image embeddings of preprocessed `pixel_values` (n, 3, crop, crop).
    pub fn embed_pixel_values(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        // batches of 16 keep memory bounded
        let n = pixels.dim(0)?;
        let mut out = Vec::new();
        for start in (0..n).step_by(16) {
            let len = 16.min(n - start);
            out.push(self.model.forward(&pixels.narrow(0, start, len)?)?.0);
        }
        Tensor::cat(&out, 0)
    }

    /// Per variant, the mean cosine similarity of its frames to the sketch.
    pub fn scores(&self, sketch: Rgb, variants: &[Frames]) -> candle_core::Result<Vec<f64>> {
        let s = self.embed(&[sketch])?;
        variants
            .iter()
            .map(|v| {
                let frames: Vec<Rgb> = v
                    .frames
                    .iter()
                    .map(|f| Rgb {
                        data: f,
                        width: v.width as usize,
                        height: v.height as usize,
                    })
                    .collect();
                let e = self.embed(&frames)?;
                let sim = cosine_similarity(&e, &s)?.mean_all()?.to_scalar::<f32>()?;
                Ok(sim as f64)
            })
            .collect()
    }
}
