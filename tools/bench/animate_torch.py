#!/usr/bin/env python3
"""Whole FlipSketch run with diffusers (PyTorch side of the `animate` comparison).

A straightforward diffusers implementation of the same algorithm: the reference pipeline of
tools/reference/flipsketch_reference.py with the published app's schedule of UNet calls
("app": two calls per inversion step, the reference branch's unconditional call on every
step), attention processors on every attn1, frames decoded one by one. Same inputs as
`flipsketch animate`: a 256x256 sketch, the prompt, --variants/--frames/--steps/--tau.

    python tools/bench/animate_torch.py --model DIR --sketch cat.png --steps 25 --dtype bfloat16

Prints `animate_s <seconds>` (load + inversion + generation + decode, as `animate` reports
its total minus writing files) and the UNet frame-evaluations.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
import flipsketch_reference as ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sketch", required=True)
    ap.add_argument("--prompt", default="the cat stretches and yawns")
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--tau", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=8.0)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    img = Image.open(args.sketch).convert("RGB").resize((256, 256), Image.LANCZOS)
    image01 = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    g = torch.Generator().manual_seed(0)
    init_noise = torch.randn((args.variants, 4, args.frames, 32, 32), generator=g)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = ref.run(args.model, image01.to(dtype), args.prompt, init_noise, args.steps, args.guidance,
                      args.tau, args.lam, dtype=dtype, schedule="app", decode=True)
    total = time.perf_counter() - t0
    assert torch.isfinite(out["video"].float()).all()
    print(f"torch {torch.__version__}, dtype {args.dtype}, threads {args.threads}, B={args.variants} "
          f"F={args.frames} S={args.steps} tau={args.tau}")
    print(f"unet_frame_evals {out['unet_frame_evals']}")
    print(f"animate_s {total:.2f}")


if __name__ == "__main__":
    main()
