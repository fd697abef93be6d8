//! Schedulers. Depends on candle-core only; never on the models.

pub mod ddim;

pub use ddim::{DdimConfig, DdimScheduler, DdimStepOutput};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {msg}", path.display())]
    Config {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("scheduler: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
