//! End-to-end parity of the FlipSketch pipeline with the reference diffusers implementation
//! (tools/reference/flipsketch_reference.py) on the tiny random model, f32.
//! Tolerances: inv_latents and latents max abs error <= 1e-4 of their largest magnitude
//! (the reference itself moves by ~5e-6 of it between f32 and f64); video (in [0, 1]) max abs
//! error <= 1e-4.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{case, check, diff, max_abs, pipeline, request, run_case};
use flipsketch_pipeline::{Encode, Phase, Silent};

#[test]
fn matches_reference_pipeline_all_cases() {
    let p = pipeline();
    assert_eq!(p.image_size(), 16);
    let default = run_case(&p, "default");
    // B=3, F=4, S=6, tau=3: inversion 6x5 + main 2x6x12 + reference 4+3+2+1 = 184
    assert_eq!(default.unet_frame_evals, 184);
    // the cost model progress is weighted by follows the same schedule
    let plan = flipsketch_pipeline::WorkPlan::new(3, 4, 6, 3);
    assert_eq!(plan.unet_frame_evals(), 184.0);
    let plan = flipsketch_pipeline::WorkPlan::new(2, 4, 6, -1);
    assert_eq!(plan.unet_frame_evals(), (6 * 5 + 2 * 6 * 2 * 4) as f64);
    for name in [
        "mean",
        "no_composition",
        "lambda",
        "single_variant",
        "frames1",
    ] {
        run_case(&p, name);
    }
}

#[test]
fn composition_off_equals_plain_text_to_video() {
    // tau < 0: the reference branch never runs; the reference noise only seeds frame 0.
    let p = pipeline();
    let (c, t) = case("no_composition");
    let out = p.run(&request(&c, &t), &mut Silent).unwrap();
    let b = t["init_noise"].dim(0).unwrap();
    assert_eq!(out.unet_frame_evals, 6 * 5 + 2 * 6 * b * 4);
}

#[test]
fn variants_per_call_do_not_change_the_result() {
    // The CPU default runs the main passes one variant at a time; all at once and 2 + 1 must
    // give the same numbers (both are checked against the reference as well).
    let mut p = pipeline();
    assert_eq!(p.variants_per_call, Some(1));
    let (c, t) = case("default");
    let one = p.run(&request(&c, &t), &mut Silent).unwrap();
    for per_call in [None, Some(2)] {
        p.variants_per_call = per_call;
        let out = p.run(&request(&c, &t), &mut Silent).unwrap();
        check(&format!("default, {per_call:?} per call"), &out, &t);
        assert_eq!(out.unet_frame_evals, one.unet_frame_evals);
        let d = diff(&out.latents, &one.latents) / max_abs(&one.latents);
        // The kernels' products do not depend on how many rows they get; candle's CPU GEMM
        // (FLIPSKETCH_OPS=candle) blocks by the row count, which moves the rounding (1.4e-6
        // measured), not the values.
        let tol = match p.components.plan.matmul {
            flipsketch_models::compute::OpPath::Kernels(_) => 1e-6,
            flipsketch_models::compute::OpPath::Candle => 1e-5,
        };
        assert!(d <= tol, "{per_call:?} variants per call differ by {d:.3e}");
    }
}

#[test]
fn variants_are_independent() {
    // variant 1 of a B=3 run equals a B=1 run started from that variant's noise
    let p = pipeline();
    let (c, t) = case("default");
    let three = p.run(&request(&c, &t), &mut Silent).unwrap();
    let mut one = request(&c, &t);
    one.init_noise = Some(t["init_noise"].narrow(0, 1, 1).unwrap());
    let one = p.run(&one, &mut Silent).unwrap();
    let d = diff(&one.latents, &three.latents.narrow(0, 1, 1).unwrap()) / max_abs(&three.latents);
    assert!(d <= 1e-5, "variant 1 alone differs by {d:.3e}");
}

#[test]
fn lambda_changes_only_composed_steps() {
    let p = pipeline();
    let (c, t) = case("mean");
    let base = p.run(&request(&c, &t), &mut Silent).unwrap();
    let mut other = request(&c, &t);
    other.lambda = 2.0;
    let changed = p.run(&other, &mut Silent).unwrap();
    assert_eq!(
        diff(&base.inv_latents, &changed.inv_latents),
        0.0,
        "lambda must not touch the inversion"
    );
    assert!(
        diff(&base.latents, &changed.latents) > 1e-2,
        "lambda must change the composed result"
    );
    // with composition off lambda has no effect at all
    let mut off_a = request(&c, &t);
    off_a.tau = -1;
    let mut off_b = off_a.clone();
    off_b.lambda = 2.0;
    let (a, b) = (
        p.run(&off_a, &mut Silent).unwrap(),
        p.run(&off_b, &mut Silent).unwrap(),
    );
    assert_eq!(diff(&a.latents, &b.latents), 0.0);
}

#[test]
fn bad_requests_are_errors() {
    let p = pipeline();
    let (c, t) = case("mean");
    let mut r = request(&c, &t);
    r.image = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(p
        .run(&r, &mut Silent)
        .unwrap_err()
        .to_string()
        .contains("image"));
    let mut r = request(&c, &t);
    r.steps = 0;
    assert!(p
        .run(&r, &mut Silent)
        .unwrap_err()
        .to_string()
        .contains("steps"));
    let mut r = request(&c, &t);
    r.init_noise = Some(Tensor::zeros((1, 4, 2, 5, 5), DType::F32, &Device::Cpu).unwrap());
    assert!(p
        .run(&r, &mut Silent)
        .unwrap_err()
        .to_string()
        .contains("init noise"));
}

#[test]
fn cancellation_stops_the_run() {
    struct CancelAfter(usize, usize);
    impl flipsketch_pipeline::Progress for CancelAfter {
        fn advance(&mut self, _done: usize) {
            self.1 += 1;
        }
        fn cancelled(&self) -> bool {
            self.1 >= self.0
        }
    }
    let p = pipeline();
    let (c, t) = case("mean");
    let err = p.run(&request(&c, &t), &mut CancelAfter(3, 0)).unwrap_err();
    assert!(
        matches!(err, flipsketch_pipeline::PipelineError::Cancelled),
        "{err}"
    );
}

/// The values of a tensor as bits, for exact comparisons.
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn a_cached_inversion_is_bit_identical_and_skips_its_work() {
    #[derive(Default)]
    struct Seen {
        phases: Vec<Phase>,
        cached_before: Option<usize>,
    }
    impl flipsketch_pipeline::Progress for Seen {
        fn phase(&mut self, phase: Phase, _total: usize) {
            self.phases.push(phase);
        }
        fn inversion_cached(&mut self) {
            self.cached_before = Some(self.phases.len());
        }
    }
    let plain = pipeline();
    let p = pipeline().with_inversion_cache(2);
    let hits = || p.inversion_cache().unwrap().hits();
    // a sampled posterior, as the app runs: the noise comes from the seed
    let (c, t) = case("default");
    let mut first = request(&c, &t);
    first.encode = Encode::SampleSeeded;
    first.seed = 5;
    let mut second = first.clone();
    second.prompt = "another prompt altogether".into();
    p.run(&first, &mut Silent).unwrap();
    assert_eq!(hits(), 0);
    let mut seen = Seen::default();
    let out = p.run(&second, &mut seen).unwrap();
    assert_eq!(
        hits(),
        1,
        "the second prompt on the sketch takes the cached inversion"
    );
    // what the cached run reports: encoding (the prompts), then the cache, then no inversion
    assert_eq!(
        seen.phases,
        [Phase::Encoding, Phase::Denoising, Phase::Decoding]
    );
    assert_eq!(seen.cached_before, Some(1));
    let want = plain.run(&second, &mut Silent).unwrap();
    for (name, a, b) in [
        ("inv_latents", &out.inv_latents, &want.inv_latents),
        ("latents", &out.latents, &want.latents),
        ("video", &out.video, &want.video),
    ] {
        assert!(bits(a) == bits(b), "{name} differs from an uncached run");
    }
    assert_eq!(
        out.unet_frame_evals + 5 * first.steps,
        want.unet_frame_evals
    );
    let plan = flipsketch_pipeline::WorkPlan::new(3, 4, first.steps, first.tau);
    assert_eq!(
        plan.without_inversion().total(),
        plan.total() - 1.0 - 5.0 * first.steps as f64
    );

    // what the inversion depends on misses the cache: the steps, the sketch, the seed of
    // the posterior noise; the mean and a given noise are keys of their own
    let mut steps = first.clone();
    steps.steps -= 1;
    let mut sketch = first.clone();
    sketch.image = (&first.image * 0.5).unwrap();
    let mut seed = first.clone();
    seed.seed = 6;
    let mut mean = first.clone();
    mean.encode = Encode::Mean;
    for (what, r) in [
        ("steps", &steps),
        ("sketch", &sketch),
        ("seed", &seed),
        ("mean", &mean),
    ] {
        p.run(r, &mut Silent).unwrap();
        assert_eq!(
            hits(),
            1,
            "{what}: a different inversion must not come from the cache"
        );
    }
    // the seed changes only a sampled posterior; the mean is the same for every seed
    let mut mean_other_seed = mean.clone();
    mean_other_seed.seed = 99;
    mean_other_seed.prompt = "x".into();
    p.run(&mean_other_seed, &mut Silent).unwrap();
    assert_eq!(hits(), 2, "the posterior mean does not depend on the seed");
    // two are kept: the first request's entry is gone by now
    p.run(&first, &mut Silent).unwrap();
    assert_eq!(hits(), 2, "the oldest entry must have been dropped");
}

/// `run_once` (the CLI's run: the text encoder released after the prompts) gives exactly the
/// output of `run`, and reports the same phases.
#[test]
fn run_once_gives_the_output_of_run() {
    #[derive(Default)]
    struct Phases(Vec<Phase>);
    impl flipsketch_pipeline::Progress for Phases {
        fn phase(&mut self, phase: Phase, _total: usize) {
            self.0.push(phase);
        }
    }
    let (c, t) = case("default");
    let r = request(&c, &t);
    let p = pipeline();
    assert!(p.components.text_encoder.is_some());
    let mut seen = Phases::default();
    let want = p.run(&r, &mut seen).unwrap();
    let mut seen_once = Phases::default();
    let got = pipeline().run_once(&r, &mut seen_once).unwrap();
    assert_eq!(seen_once.0, seen.0);
    assert_eq!(got.unet_frame_evals, want.unet_frame_evals);
    for (name, a, b) in [
        ("inv_latents", &got.inv_latents, &want.inv_latents),
        ("latents", &got.latents, &want.latents),
        ("video", &got.video, &want.video),
    ] {
        assert!(bits(a) == bits(b), "{name} differs after run_once");
    }
}
