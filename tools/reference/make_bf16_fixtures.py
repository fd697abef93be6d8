#!/usr/bin/env python3
"""How far PyTorch's own bfloat16 lands from its float32 reference, per golden output.

bf16 cannot match float32 to 1e-4; the bf16 parity tests (crates/pipeline/tests/device.rs,
what a GPU runs) instead hold flipsketch's bf16 within a stated multiple of PyTorch's own
bf16 deviation on the same inputs. This writes those deviations:

    python tools/reference/make_bf16_fixtures.py --fixtures tests/fixtures

-> tests/fixtures/golden/bf16_reference.json: for each output, max |bf16 - f32| / max |f32|
(video: max |bf16 - f32|, its values are in [0, 1]), with the models of tests/fixtures/tiny
run by diffusers / transformers in torch.bfloat16 on the CPU (the reference environment of
requirements.txt), inputs from the goldens.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from diffusers import AutoencoderKL, UNet3DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel
from transformers.utils import logging as transformers_logging

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
import flipsketch_reference as ref  # noqa: E402


def rel(a, b):
    return ((a.float() - b).abs().max() / b.abs().max()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=Path("tests/fixtures"))
    args = ap.parse_args()
    tiny, golden = args.fixtures / "tiny", args.fixtures / "golden"
    bf = torch.bfloat16
    out = {}
    unet = UNet3DConditionModel.from_pretrained(str(tiny / "unet"), torch_dtype=bf).eval()
    for k in range(3):
        g = load_file(str(golden / f"unet_a_{k}.safetensors"))
        with torch.no_grad():
            o = unet(g["sample"].to(bf), g["timestep"], encoder_hidden_states=g["encoder_hidden_states"].to(bf)).sample
        out[f"unet_a_{k}"] = rel(o, g["out"])
    te = CLIPTextModel.from_pretrained(str(tiny / "text_encoder"), torch_dtype=bf).eval()
    g = load_file(str(golden / "text_encoder_a.safetensors"))
    with torch.no_grad():
        out["text_encoder_a"] = rel(te(g["input_ids"]).last_hidden_state, g["last_hidden_state"])
    vae = AutoencoderKL.from_pretrained(str(tiny / "vae"), torch_dtype=bf).eval()
    g = load_file(str(golden / "vae_a.safetensors"))
    with torch.no_grad():
        out["vae_a_mean"] = rel(vae.encode(g["image"].to(bf)).latent_dist.mean, g["mean"])
        out["vae_a_decoded"] = rel(vae.decode(g["latents"].to(bf)).sample, g["decoded"])
    cases = json.loads((golden / "pipeline_cases.json").read_text())["cases"]
    c = next(c for c in cases if c["name"] == "default")
    t = load_file(str(golden / c["file"]))
    o = ref.run(str(tiny), t["image"], c["prompt"], t["init_noise"], c["num_inference_steps"], c["guidance_scale"],
                c["tau"], c["lam"], t.get("posterior_noise"), bf, schedule="batched")
    out["pipeline_default_inv_latents"] = rel(o["inv_latents"], t["inv_latents"])
    out["pipeline_default_latents"] = rel(o["latents"], t["latents"])
    out["pipeline_default_video"] = (o["video"].float() - t["video"]).abs().max().item()
    doc = dict(
        description="max |PyTorch bf16 - PyTorch f32| / max |f32| per output (video: absolute), "
                    "tools/reference/make_bf16_fixtures.py",
        torch=torch.__version__,
        deviations=out,
    )
    path = golden / "bf16_reference.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    for k, v in out.items():
        print(f"  {k:32s} {v:.3e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
