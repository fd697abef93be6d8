#!/usr/bin/env python3
"""Golden end-to-end FlipSketch outputs on the tiny config-A model (tests/fixtures/tiny).

    /work/refenv/bin/python tools/reference/make_pipeline_fixtures.py --out tests/fixtures

Writes tests/fixtures/golden/pipeline_<case>.safetensors (float32), pipeline_cases.json (every
setting, timesteps, layer kinds, frame-evaluation counts, measured checks) and pipeline_sketch.png
(the 16x16 input sketch; the `image` tensor is exactly its pixels / 255).  Uses
tools/reference/flipsketch_reference.py (schedule "batched") as the golden source.  Deterministic:
fixed seeds, CPU, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flipsketch_reference as ref  # noqa: E402

PROMPT = "a cat jumps"
STEPS = 6
FRAMES = 4
GUIDANCE = 9.0
IMG = 16  # tiny VAE downsamples by 2 -> 8x8 latents
LAT = IMG // 2


def draw_sketch() -> np.ndarray:
    """(16,16,3) uint8: white paper, black anti-aliased strokes (a circle, a diagonal, a short bar)."""
    yy, xx = np.mgrid[0:IMG, 0:IMG].astype(np.float64) + 0.5
    ink = np.zeros((IMG, IMG))
    ink = np.maximum(ink, np.clip(1.2 - np.abs(np.hypot(xx - 8.0, yy - 7.0) - 4.5), 0, 1))  # circle
    # line from (1.5, 14.5) to (14.5, 10.5): distance of pixel centres to the segment
    p0, p1 = np.array([1.5, 14.5]), np.array([14.5, 10.5])
    d = p1 - p0
    tt = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / (d @ d), 0, 1)
    dist = np.hypot(xx - (p0[0] + tt * d[0]), yy - (p0[1] + tt * d[1]))
    ink = np.maximum(ink, np.clip(1.1 - dist, 0, 1))
    ink[2, 2:6] = 1.0  # short horizontal bar
    gray = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def load_png01(path: Path) -> torch.Tensor:
    """PNG -> (1,3,H,W) float32 = uint8 / 255 (what the Rust side does)."""
    px = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return (torch.from_numpy(px.copy()).to(torch.float32) / 255.0).permute(2, 0, 1).unsqueeze(0).contiguous()


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_outputs(name, out):
    for k in ("inv_latents", "latents", "video"):
        t = out[k]
        assert torch.isfinite(t).all(), f"{name}.{k} not finite"
        std = t.float().std().item()
        print(f"  {name + '.' + k:30s} {str(tuple(t.shape)):20s} std {std:8.4f}  min {t.min().item():9.4f}  "
              f"max {t.max().item():9.4f}")
        assert std > 1e-3, f"{name}.{k} degenerate"
    v = out["video"]
    assert v.min() >= 0 and v.max() <= 1
    for b in range(v.shape[0]):
        for f in range(v.shape[1]):
            assert v[b, f].std() > 1e-2, f"{name}: video variant {b} frame {f} is (nearly) constant"
    sat = ((v == 0) | (v == 1)).float().mean().item()
    print(f"  {name + '.video':30s} clamped fraction {sat:.3f}")


def plain_t2v_latents(model_dir, start, cond, uncond, steps, guidance, dtype):
    """diffusers' own TextToVideoSDPipeline (default attention processors, [uncond, cond] batched)
    from the given start latents: what `tau = -1` must reproduce."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    m = ref.load_models(str(model_dir), dtype)
    unet = UNet3DConditionModel.from_pretrained(str(Path(model_dir) / "unet"), torch_dtype=dtype).eval()
    pipe = TextToVideoSDPipeline(vae=m.vae, text_encoder=None, tokenizer=None, unet=unet,  # embeddings given
                                 scheduler=ref.make_scheduler(model_dir))
    pipe.set_progress_bar_config(disable=True)
    B, _, F, h, w = start.shape
    with torch.no_grad():
        return pipe(prompt_embeds=cond.repeat(B, 1, 1), negative_prompt_embeds=uncond.repeat(B, 1, 1),
                    num_frames=F, height=h * 2, width=w * 2, num_inference_steps=steps, guidance_scale=guidance,
                    latents=start.clone(), output_type="latent", return_dict=False)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures", help="fixture directory (model in <out>/tiny)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    fixtures = Path(args.out)
    model_dir = fixtures / "tiny"
    golden = fixtures / "golden"
    golden.mkdir(parents=True, exist_ok=True)

    png = golden / "pipeline_sketch.png"
    Image.fromarray(draw_sketch(), mode="RGB").save(png, optimize=False)
    image = load_png01(png)
    assert torch.equal(image, torch.from_numpy(draw_sketch()).float().div(255).permute(2, 0, 1)[None])
    print(f"[sketch] {png} {tuple(image.shape)}, {int((image[0, 0] < 1).sum())} inked pixels")

    # ---- cases ----------------------------------------------------------------------------------
    default_init = randn((3, 4, FRAMES, LAT, LAT), 101)
    default_pn = randn((ref.INVERSION_FRAMES, 4, LAT, LAT), 102)
    mean_init = randn((2, 4, FRAMES, LAT, LAT), 201)
    cases = [
        dict(name="default", desc="app defaults scaled down: B=3, tau=3, lambda=0.5, posterior sample",
             init_noise=default_init, posterior_noise=default_pn, tau=3, lam=0.5,
             seeds=dict(init_noise=101, posterior_noise=102)),
        dict(name="mean", desc="posterior mean (no noise), B=2",
             init_noise=mean_init, posterior_noise=None, tau=3, lam=0.5, seeds=dict(init_noise=201)),
        dict(name="no_composition", desc="tau=-1: reference branch never runs; equals plain text-to-video "
             "from the start latents (init_noise with frame 0 := inv_latents)",
             init_noise=randn((2, 4, FRAMES, LAT, LAT), 301), posterior_noise=randn((5, 4, LAT, LAT), 302),
             tau=-1, lam=0.5, seeds=dict(init_noise=301, posterior_noise=302)),
        dict(name="lambda", desc="inputs of `mean` with lambda=2.0 (only the temporal score on key frame 0 changes)",
             init_noise=mean_init, posterior_noise=None, tau=3, lam=2.0, seeds=dict(init_noise=201)),
        dict(name="single_variant", desc="B=1, init_noise = variant 1 of `default`, same posterior noise: "
             "latents equal variant 1 of `default` (variant independence)",
             init_noise=default_init[1:2].clone(), posterior_noise=default_pn, tau=3, lam=0.5,
             seeds=dict(init_noise="101, variant 1", posterior_noise=102)),
        dict(name="frames1", desc="edge case B=1, F=1 (temporal composition is a no-op: softmax over one key)",
             init_noise=randn((1, 4, 1, LAT, LAT), 601), posterior_noise=randn((5, 4, LAT, LAT), 602),
             tau=3, lam=0.5, seeds=dict(init_noise=601, posterior_noise=602)),
    ]

    sched = ref.make_scheduler(model_dir)
    sched.set_timesteps(STEPS)
    m = ref.load_models(str(model_dir), torch.float32)
    results, meta_cases, total_bytes = {}, [], 0
    for c in cases:
        name = c["name"]
        B, _, F, _, _ = c["init_noise"].shape
        print(f"[{name}] B={B} F={F} S={STEPS} w={GUIDANCE} tau={c['tau']} lambda={c['lam']} "
              f"posterior={'sample' if c['posterior_noise'] is not None else 'mean'}")
        out = ref.run(model_dir, image, PROMPT, c["init_noise"], STEPS, GUIDANCE, c["tau"], c["lam"],
                      c["posterior_noise"], torch.float32, schedule="batched")
        check_outputs(name, out)
        # float32 rounding noise of this case: the same run in float64
        pn64 = None if c["posterior_noise"] is None else c["posterior_noise"].double()
        o64 = ref.run(model_dir, image.double(), PROMPT, c["init_noise"].double(), STEPS, GUIDANCE, c["tau"],
                      c["lam"], pn64, torch.float64, schedule="batched")
        vs64 = {k: maxdiff(out[k], o64[k]) for k in ("inv_latents", "latents", "video")}
        print(f"  float32 vs float64 max|diff|: " + ", ".join(f"{k} {v:.3g}" for k, v in vs64.items()))
        results[name] = (out, o64)

        tensors = dict(image=image, init_noise=c["init_noise"])
        if c["posterior_noise"] is not None:
            tensors["posterior_noise"] = c["posterior_noise"]
        tensors.update(inv_latents=out["inv_latents"], latents=out["latents"], video=out["video"])
        path = golden / f"pipeline_{name}.safetensors"
        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path))
        total_bytes += path.stat().st_size
        meta_cases.append(dict(
            name=name, file=path.name, description=c["desc"], prompt=PROMPT, negative_prompt="",
            num_variants=B, num_frames=F, num_inference_steps=STEPS, guidance_scale=GUIDANCE, tau=c["tau"],
            lam=c["lam"], posterior="sample" if c["posterior_noise"] is not None else "mean",
            seeds=c["seeds"], image_size=[IMG, IMG], latent_size=[LAT, LAT],
            tensors={k: list(v.shape) for k, v in tensors.items()},
            reference_frames_per_step=[max(1, F - i) for i in range(STEPS)],
            composition_steps=[i for i in range(STEPS) if i <= c["tau"]],
            unet_frame_evals=dict(batched=out["unet_frame_evals"], economical=out["unet_frame_evals_economical"],
                                  app=out["unet_frame_evals_app"]),
            max_abs_diff_float32_vs_float64=vs64,
            max_abs=dict(latents=out["latents"].abs().max().item(), inv_latents=out["inv_latents"].abs().max().item()),
            checks={},
        ))
    by_name = {mc["name"]: mc for mc in meta_cases}

    # ---- cross-case checks ----------------------------------------------------------------------
    print("[checks]")
    d_out, d64 = results["default"]
    s_out, s64 = results["single_variant"]
    dv = maxdiff(s_out["latents"], d_out["latents"][1:2])
    dv64 = maxdiff(s64["latents"], d64["latents"][1:2])
    dvid = maxdiff(s_out["video"], d_out["video"][1:2])
    dinv = maxdiff(s_out["inv_latents"], d_out["inv_latents"])
    print(f"  single_variant vs default variant 1: latents max|diff| {dv:.3g} (float64 {dv64:.3g}), "
          f"video {dvid:.3g}, inv_latents {dinv:.3g}")
    assert dinv == 0 and dv <= 1e-5 * d_out["latents"].abs().max().item() and dv64 <= 1e-10
    by_name["single_variant"]["checks"] = dict(
        latents_vs_default_variant1=dv, latents_vs_default_variant1_float64=dv64, video_vs_default_variant1=dvid,
        inv_latents_vs_default=dinv)

    # economical schedule (batch-1 reference branch, recordings broadcast) on the default case
    eco = ref.run(model_dir, image, PROMPT, default_init, STEPS, GUIDANCE, 3, 0.5, default_pn, schedule="economical")
    de, dev = maxdiff(eco["latents"], d_out["latents"]), maxdiff(eco["video"], d_out["video"])
    print(f"  default, economical vs batched schedule: latents max|diff| {de:.3g}, video {dev:.3g} "
          f"(frame-evals {eco['unet_frame_evals']} vs {d_out['unet_frame_evals']})")
    assert de <= 1e-5 * d_out["latents"].abs().max().item()
    by_name["default"]["checks"] = dict(economical_schedule_latents=de, economical_schedule_video=dev)

    # no_composition == diffusers TextToVideoSDPipeline from the start latents
    n_out, n64 = results["no_composition"]
    nc = next(c for c in cases if c["name"] == "no_composition")
    for dt, o in ((torch.float32, n_out), (torch.float64, n64)):
        start = nc["init_noise"].to(dt).clone()
        start[:, :, 0:1] = o["inv_latents"]
        mm = ref.load_models(str(model_dir), dt)
        t2v = plain_t2v_latents(model_dir, start, ref.encode_text(mm, PROMPT), ref.encode_text(mm, ""), STEPS,
                                GUIDANCE, dt)
        dn = maxdiff(t2v, o["latents"])
        print(f"  no_composition vs diffusers TextToVideoSDPipeline ({str(dt)[6:]}): latents max|diff| {dn:.3g}")
        assert dn <= (1e-5 * o["latents"].abs().max().item() if dt == torch.float32 else 1e-10)
        by_name["no_composition"]["checks"][f"vs_TextToVideoSDPipeline_{str(dt)[6:]}"] = dn

    # lambda only changes the composed steps; inversion identical
    l_out, m_out = results["lambda"][0], results["mean"][0]
    assert torch.equal(l_out["inv_latents"], m_out["inv_latents"])
    dl = maxdiff(l_out["latents"], m_out["latents"])
    print(f"  lambda (2.0) vs mean (0.5): latents max|diff| {dl:.3g}")
    assert dl > 1e-3
    by_name["lambda"]["checks"] = dict(latents_vs_mean_case=dl)
    # composition is active: the `mean` inputs without the reference branch
    off = ref.run(model_dir, image, PROMPT, mean_init, STEPS, GUIDANCE, -1, 0.5, None, decode=False)
    dm = maxdiff(results["mean"][0]["latents"], off["latents"])
    print(f"  mean (tau=3) vs the same inputs with tau=-1: latents max|diff| {dm:.3g}")
    assert dm > 1e-1
    by_name["mean"]["checks"] = dict(latents_vs_same_inputs_tau_minus_1=dm)

    m = ref.load_models(str(model_dir), torch.float32)
    doc = dict(
        description="FlipSketch end-to-end goldens (tools/reference/flipsketch_reference.py, schedule 'batched') "
                    "on the tiny config-A model. Algorithm: docs/algorithm.md.",
        regenerate="/work/refenv/bin/python tools/reference/make_pipeline_fixtures.py --out tests/fixtures",
        model_dir="tests/fixtures/tiny",
        dtype="float32 (CPU, one thread)",
        sketch_png="pipeline_sketch.png (16x16 RGB; image = pixels / 255 as float32)",
        vae_scaling_factor=m.vae.config.scaling_factor,
        scheduler={k: v for k, v in dict(sched.config).items() if not k.startswith("_")},
        timesteps=[int(t) for t in sched.timesteps],
        inversion_timesteps_ascending=[int(t) for t in reversed(sched.timesteps)],
        conventions=[
            "image (1,3,16,16) in [0,1] goes to the VAE encoder as is (no [-1,1] mapping)",
            "inversion: 5 copies of the image encoded as a batch of 5; posterior sample = mean + std * "
            "posterior_noise (std = exp(0.5*logvar), logvar clamped to [-30,20]), or mean when no "
            "posterior_noise; times scaling_factor; arranged (1,4,5,h,w)",
            "inversion: one UNet call per step on the empty prompt, ascending timesteps, "
            "cur = min(t - 1000//S, 999), a = alphas_cumprod[cur] (final_alpha_cumprod if cur < 0), "
            "a_next = alphas_cumprod[t]; inv_latents = mean over the 5 frames",
            "start: lat = init_noise with frame 0 of every variant := inv_latents; ref = inv_latents repeated "
            "to (B,4,F,h,w)",
            "step i: ref = ref[:, :, :max(1, F-i)]; u = unet(lat, t, '') plain; if i <= tau: r = unet(ref, t, '') "
            "recording attn1 q/k, ref = DDIM(r, t, ref); c = unet(lat, t, prompt) composing if i <= tau; "
            "lat = DDIM(u + w (c - u), t, lat); DDIMScheduler.step eta 0",
            "text: CLIP tokenizer, pad '!' to 77, truncate, last_hidden_state, no attention mask; "
            "negative prompt = null prompt = ''",
            "video = clamp(vae.decode(latents[b,:,f] / scaling_factor) / 2 + 0.5, 0, 1), frame by frame, "
            "laid out (B,F,H,W,3)",
            "reference branch run with batch B here (rows identical); the batch-1 broadcast schedule agrees "
            "within float32 rounding (see default.checks)",
            "tolerances: guidance 9 amplifies rounding over the steps; compare relative to max|latents| "
            "(see max_abs_diff_float32_vs_float64 per case)",
        ],
        attn1_layers=[dict(name=n, kind=k, heads=mod.heads, head_dim=mod.inner_dim // mod.heads,
                           scale=mod.scale) for n, (k, mod) in ref.attn1_layers(m.unet).items()],
        frame_eval_counts_doc_config=dict(
            B=3, F=10, S=25, tau=15, app=ref.frame_evals_formula(3, 10, 25, 15, "app"),
            economical=ref.frame_evals_formula(3, 10, 25, 15, "economical"),
            batched=ref.frame_evals_formula(3, 10, 25, 15, "batched")),
        cases=meta_cases,
    )
    (golden / "pipeline_cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    for p in list(golden.glob("pipeline*")):
        p.chmod(0o644)
    total = sum(p.stat().st_size for p in golden.glob("pipeline*"))
    print(f"[done] {time.time() - t0:.1f}s, {total / 1e3:.1f} kB in {golden}/pipeline*")
    assert total < 2e6


if __name__ == "__main__":
    main()
