//! Images in and animations out: sketch loading (any common format, alpha on white, bounded
//! decode, fit to a square), Otsu binarisation as OpenCV computes it, and the GIF/PNG writers.

pub mod binarize;
pub mod clip_preprocess;
pub mod sketch;
pub mod writers;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{}: {msg}", path.display())]
    Input { path: PathBuf, msg: String },
    #[error("{}: cannot write: {msg}", path.display())]
    Output { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, MediaError>;

/// One animation: `frames` RGB images of `width` x `height`, row-major, 3 bytes a pixel.
#[derive(Clone, Debug)]
pub struct Frames {
    pub width: u32,
    pub height: u32,
    pub frames: Vec<Vec<u8>>,
}
