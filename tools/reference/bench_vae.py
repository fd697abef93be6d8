#!/usr/bin/env python3
"""Time one AutoencoderKL decode of a frame on CPU (PyTorch side of `flipsketch bench vae`).

    python tools/reference/bench_vae.py --model /work/fullsize --dtype bfloat16 --reps 3

Batch 1, latent_channels x --size x --size latents (32 = one 256 px frame, as `animate`
decodes them one by one), torch.inference_mode(). Prints `vae_decode_s <best seconds>` and the
peak RSS.
"""

import argparse
import os
import resource
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder containing vae/ (a diffusers pipeline folder)")
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reps", type=int, default=3, help="timed decodes after one warm-up")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    vae = AutoencoderKL.from_pretrained(str(Path(args.model) / "vae"), torch_dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn((1, vae.config.latent_channels, args.size, args.size), generator=g).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(args.reps + 1):
            s = time.perf_counter()
            out = vae.decode(z).sample
            dt = time.perf_counter() - s
            if i > 0:
                times.append(dt)
            print(f"  {'warm-up' if i == 0 else f'rep {i}'}: {dt:.3f} s", flush=True)
    assert torch.isfinite(out.float()).all()
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"dtype {args.dtype}, threads {args.threads}, latents {tuple(z.shape)}, torch {torch.__version__}")
    print(f"vae_decode_s {min(times):.4f}")
    print(f"peak_rss_gb {rss_gb:.2f}")


if __name__ == "__main__":
    main()
