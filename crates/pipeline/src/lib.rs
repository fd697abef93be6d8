//! FlipSketch as a library: components, prompt encoding, the attention composition and the
//! pipeline. Used by the CLI and the server alike; knows no weight names.

pub mod components;
pub mod composition;
pub mod flipsketch;
pub mod ranking;
pub mod text;

pub use flipsketch::{
    device_name, dtype_name, video_to_frames, Encode, Output, Phase, Pipeline, PipelineError,
    Progress, Request, Silent, WorkPlan,
};
