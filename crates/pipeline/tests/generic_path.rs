//! The whole FlipSketch pipeline on candle's ops, the code GPUs run (CUDA and Metal cannot be
//! built or run on the CI machine). Its own test binary: it checks that no CPU kernel ran, which
//! tests running kernels beside it in the same process would disturb.
//! Reference and tolerances as in `pipeline.rs`.

mod common;

use candle_core::{DType, Device};
use common::{fixtures, run_case};
use flipsketch_pipeline::components::Components;
use flipsketch_pipeline::Pipeline;

/// The whole pipeline on candle's ops, the code GPUs run: f64 on the CPU never takes the CPU
/// kernels (the UNet, VAE and text encoder compute in f64, the composition on its tensor-op
/// path), and all variants go through the UNet together, as on a GPU. Same reference and
/// tolerances as the f32 runs.
#[test]
fn generic_path_matches_reference_pipeline() {
    let c = Components::load(
        &fixtures().join("tiny"),
        DType::F64,
        &Device::Cpu,
        None,
        |_| {},
    )
    .unwrap();
    let mut p = Pipeline::new(c, Device::Cpu);
    p.variants_per_call = None;
    flipsketch_kernels::stats::enable();
    for name in ["default", "mean", "no_composition", "single_variant"] {
        run_case(&p, name);
    }
    for (kernel, calls, ..) in flipsketch_kernels::stats::snapshot() {
        assert_eq!(calls, 0, "{kernel:?} ran on the device-generic path");
    }
}
