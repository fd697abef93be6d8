#!/usr/bin/env python3
"""Time one UNet3DConditionModel forward on CPU (PyTorch reference for the Rust port).

    python tools/reference/bench_unet.py --model tests/fixtures/tiny --reps 3
    python tools/reference/bench_unet.py --model /work/fullsize --dtype bfloat16 --reps 1

Batch 1, 4 latent channels, --frames frames, --size x --size latents (32 = 256 px), 77 text tokens,
torch.inference_mode(), diffusers' default attention processor (AttnProcessor2_0 / SDPA).
Prints `unet_forward_s <best seconds>` and the peak RSS.
"""

import argparse
import os
import resource
import time
from pathlib import Path

import torch
from diffusers import UNet3DConditionModel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder containing unet/ (a diffusers pipeline folder)")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--timestep", type=float, default=500.0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reps", type=int, default=3, help="timed forwards after one warm-up")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    unet = UNet3DConditionModel.from_pretrained(str(Path(args.model) / "unet"), torch_dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    nparams = sum(p.numel() for p in unet.parameters())
    procs = {type(p).__name__ for p in unet.attn_processors.values()}

    g = torch.Generator().manual_seed(0)
    sample = torch.randn((1, unet.config.in_channels, args.frames, args.size, args.size), generator=g).to(dtype)
    ehs = torch.randn((1, 77, unet.config.cross_attention_dim), generator=g).to(dtype)
    t = torch.tensor([args.timestep], dtype=torch.float32)

    times = []
    with torch.inference_mode():
        for i in range(args.reps + 1):
            s = time.perf_counter()
            out = unet(sample, t, encoder_hidden_states=ehs).sample
            dt = time.perf_counter() - s
            if i > 0:
                times.append(dt)
            print(f"  {'warm-up' if i == 0 else f'rep {i}'}: {dt:.3f} s", flush=True)
    assert torch.isfinite(out.float()).all()
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"model {args.model} ({nparams / 1e6:.1f}M params, load {load_s:.1f} s), dtype {args.dtype}, "
          f"threads {args.threads}, input {tuple(sample.shape)}, attn {sorted(procs)}, torch {torch.__version__}")
    print(f"unet_forward_s {min(times):.4f}")
    print(f"peak_rss_gb {rss_gb:.2f}")


if __name__ == "__main__":
    main()
