//! Candle ports of the models FlipSketch runs, one module per diffusers/transformers file.
//! This is the only crate that knows checkpoint key names.

pub mod attention;
pub mod autoencoder_kl;
pub mod clip_text;
pub mod clip_vision;
pub mod compute;
pub mod embeddings;
pub mod error;
pub mod loading;
pub mod nn;
pub mod packcache;
pub mod resnet;
pub mod transformers;
pub mod unets;

pub use error::{Error, Result};
/// The CPU matrix precision the layers take (from the kernels crate).
pub use flipsketch_kernels::Precision;
