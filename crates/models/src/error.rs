//! Typed errors of the model crate. Every error that comes from a file names the file; every
//! error that comes from a weight names the tensor.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    #[error("{}: invalid config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    #[error("{}: no weights found (looked for {})", dir.display(), candidates.join(", "))]
    NoWeights {
        dir: PathBuf,
        candidates: Vec<String>,
    },

    #[error("{component} weights in {}: {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "), describe_weight_problems(missing, mismatched))]
    Weights {
        component: String,
        files: Vec<PathBuf>,
        /// Tensors the model needs that no file holds: (name, expected shape).
        missing: Vec<(String, Vec<usize>)>,
        /// Tensors present with the wrong shape: (name, expected, found).
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    },

    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn describe_weight_problems(
    missing: &[(String, Vec<usize>)],
    mismatched: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    const SHOW: usize = 20;
    let mut parts = Vec::new();
    if !missing.is_empty() {
        let names: Vec<String> = missing
            .iter()
            .take(SHOW)
            .map(|(n, s)| format!("{n} {s:?}"))
            .collect();
        let more = missing.len().saturating_sub(SHOW);
        parts.push(format!(
            "{} missing tensor(s): {}{}",
            missing.len(),
            names.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    if !mismatched.is_empty() {
        let names: Vec<String> = mismatched
            .iter()
            .take(SHOW)
            .map(|(n, e, f)| format!("{n} (expected {e:?}, found {f:?})"))
            .collect();
        let more = mismatched.len().saturating_sub(SHOW);
        parts.push(format!(
            "{} tensor(s) with the wrong shape: {}{}",
            mismatched.len(),
            names.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    parts.join("; ")
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
