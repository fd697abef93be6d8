//! FlipSketch as a library: components, prompt encoding, and (later) the pipeline itself.
//! Used by the CLI and the server alike; knows no weight names.

pub mod components;
pub mod text;
