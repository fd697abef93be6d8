#!/usr/bin/env python3
"""Re-save the tiny test models in the layouts today's libraries write, with goldens.

Run in the *current* reference environment (transformers 5.x, diffusers 0.42; pinned in
tools/reference/requirements-current.txt), after make_fixtures.py / make_clip_fixtures.py:

    python tools/reference/make_layout_fixtures.py --fixtures tests/fixtures

It reads tests/fixtures/tiny (config A, written by transformers 4.57 / diffusers 0.35) and
tests/fixtures/clip, loads them with the current libraries, and writes with their own
save_pretrained:

  layouts/current/   the whole pipeline: plain float32 files, plus fp16 *variant* files
                     (save_pretrained(variant="fp16")); the UNet's fp16 variant is sharded
                     (diffusion_pytorch_model.safetensors.index.fp16.json). transformers 5
                     writes CLIPTextModel without the `text_model.` prefix and the tokenizer as
                     tokenizer.json + tokenizer_config.json only (no vocab.json / merges.txt).
  layouts/mixed/     bfloat16 on disk: unet as a single PyTorch pickle variant
                     (diffusion_pytorch_model.bf16.bin), vae as sharded safetensors without a
                     variant, text_encoder as a sharded bf16 variant
                     (model.safetensors.index.bf16.json); tokenizer as in current/.
  layouts/clip-current/  the CLIP ranking model as a whole CLIPModel (vision tower of
                     tests/fixtures/clip, a small random text tower), saved by transformers 5,
                     with its preprocessor_config.json.

and goldens computed in float32 from the weights *as saved* (fp16 / bf16 rounded), by the
libraries loading the saved folders again:

  layouts/golden_fp16.safetensors, layouts/golden_bf16.safetensors:
      text_input_ids (3,77) i64, text_last_hidden_state, unet_sample, unet_timestep,
      unet_encoder_hidden_states, unet_out, vae_latents, vae_decoded
  layouts/golden_clip_current.safetensors: pixel_values, image_embeds (CLIP vision tower)

Deterministic: fixed seeds, CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL, TextToVideoSDPipeline, UNet3DConditionModel
from diffusers.utils import logging as diffusers_logging
import transformers
import diffusers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as transformers_logging

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
torch.set_num_threads(1)

TEXT_PROMPTS = ["a photo of a cat", "", "A sketch of a dog running on the beach, minimal lines!"]
SEED = 4242


def save_st(path: Path, tensors: dict):
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


def keys_of(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def goldens(folder: Path, variant: str | None, golden_a: Path, out: Path):
    """Module outputs in float32 from the folder's weights as saved (loaded with `variant`)."""
    # The pipeline loader takes a component's variant file when it has one and its plain
    # file otherwise (a single model's from_pretrained would refuse the missing variant).
    pipe = TextToVideoSDPipeline.from_pretrained(str(folder), dtype=torch.float32, variant=variant)
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder.eval(), pipe.unet.eval(), pipe.vae.eval()
    for m in (te, unet, vae):
        for n, p in m.named_parameters():
            assert p.dtype == torch.float32, n
    ids = tok(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    from safetensors.torch import load_file

    a_unet = load_file(str(golden_a / "unet_a_0.safetensors"))
    a_vae = load_file(str(golden_a / "vae_a.safetensors"))
    with torch.no_grad():
        h = te(ids.to(torch.int64)).last_hidden_state
        o = unet(a_unet["sample"], a_unet["timestep"], encoder_hidden_states=a_unet["encoder_hidden_states"]).sample
        d = vae.decode(a_vae["latents"]).sample
    for name, t in (("text", h), ("unet", o), ("vae", d)):
        assert torch.isfinite(t).all(), name
        print(f"  {out.name}: {name} shape {tuple(t.shape)} std {t.std().item():.4f}")
    save_st(
        out,
        dict(
            text_input_ids=ids.to(torch.int64),
            text_last_hidden_state=h,
            unet_sample=a_unet["sample"],
            unet_timestep=a_unet["timestep"],
            unet_encoder_hidden_states=a_unet["encoder_hidden_states"],
            unet_out=o,
            vae_latents=a_vae["latents"],
            vae_decoded=d,
        ),
    )


def copy_config_files(src: Path, dst: Path):
    for name in ("model_index.json",):
        shutil.copy(src / name, dst / name)


def fresh_text_encoder(loaded: CLIPTextModel) -> CLIPTextModel:
    """The same weights in a CLIPTextModel built by transformers 5 itself.

    transformers 5 remembers the key layout of the checkpoint a model was loaded from and
    writes it back that way, so re-saving the v4 folder would keep `text_model.`; a model it
    constructs (converted, fine-tuned from a config, or loaded from a state dict) is written
    in its own layout, without the prefix.
    """
    model = CLIPTextModel(loaded.config).to(loaded.dtype).eval()
    state = {k.removeprefix("text_model."): v for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def make_current(tiny: Path, dst: Path):
    pipe = TextToVideoSDPipeline.from_pretrained(str(tiny), dtype=torch.float32)
    pipe.text_encoder = fresh_text_encoder(pipe.text_encoder)
    pipe.save_pretrained(str(dst))
    half = TextToVideoSDPipeline.from_pretrained(str(tiny), dtype=torch.float16)
    fresh_text_encoder(half.text_encoder).save_pretrained(str(dst / "text_encoder"), variant="fp16")
    half.vae.save_pretrained(str(dst / "vae"), variant="fp16")
    half.unet.save_pretrained(str(dst / "unet"), variant="fp16", max_shard_size="300KB")
    te_keys = keys_of(dst / "text_encoder" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in te_keys), te_keys[:3]
    assert "embeddings.token_embedding.weight" in te_keys
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert (dst / "tokenizer" / "tokenizer.json").is_file()
    assert not (dst / "tokenizer" / "vocab.json").exists()


def make_mixed(tiny: Path, dst: Path):
    dst.mkdir(parents=True)
    pipe = TextToVideoSDPipeline.from_pretrained(str(tiny), dtype=torch.bfloat16)
    pipe.scheduler.save_pretrained(str(dst / "scheduler"))
    pipe.tokenizer.save_pretrained(str(dst / "tokenizer"))
    pipe.unet.save_pretrained(str(dst / "unet"), variant="bf16", safe_serialization=False)
    pipe.vae.save_pretrained(str(dst / "vae"), max_shard_size="200KB")
    fresh_text_encoder(pipe.text_encoder).save_pretrained(
        str(dst / "text_encoder"), variant="bf16", max_shard_size="2MB"
    )
    copy_config_files(tiny, dst)
    assert (dst / "unet" / "diffusion_pytorch_model.bf16.bin").is_file()
    assert (dst / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (dst / "text_encoder" / "model.safetensors.index.bf16.json").is_file()


def make_clip_current(clip: Path, dst: Path, out_golden: Path):
    vision = CLIPVisionModelWithProjection.from_pretrained(str(clip), dtype=torch.float32).eval()
    vc = vision.config
    text_config = dict(
        vocab_size=1000,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=1,
    )
    cfg = CLIPConfig(text_config=text_config, vision_config=vc.to_dict(), projection_dim=vc.projection_dim)
    torch.manual_seed(SEED)
    model = CLIPModel(cfg).eval()
    missing, unexpected = model.load_state_dict(vision.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("text_model.", "text_projection", "logit_scale")) for k in missing), missing
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("text_model.", "text_projection")):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(SEED + len(n)))
    model.save_pretrained(str(dst))
    shutil.copy(clip / "preprocessor_config.json", dst / "preprocessor_config.json")
    keys = keys_of(dst / "model.safetensors")
    assert any(k.startswith("vision_model.") for k in keys) and any(k.startswith("text_model.") for k in keys)
    again = CLIPModel.from_pretrained(str(dst), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(SEED)
    pixel_values = torch.randn((2, 3, vc.image_size, vc.image_size), generator=g)
    with torch.no_grad():
        embeds = again.get_image_features(pixel_values=pixel_values)
        if not torch.is_tensor(embeds):  # transformers 5 returns a model output
            embeds = embeds.pooler_output
        ref = vision(pixel_values=pixel_values).image_embeds
    assert torch.allclose(embeds, ref, atol=1e-6), (embeds - ref).abs().max()
    save_st(out_golden, dict(pixel_values=pixel_values, image_embeds=embeds))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=Path("tests/fixtures"))
    args = ap.parse_args()
    fx = args.fixtures
    tiny, clip, golden = fx / "tiny", fx / "clip", fx / "golden"
    out = fx / "layouts"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    print(f"transformers {transformers.__version__}, diffusers {diffusers.__version__}, torch {torch.__version__}")
    make_current(tiny, out / "current")
    make_mixed(tiny, out / "mixed")
    goldens(out / "current", "fp16", golden, out / "golden_fp16.safetensors")
    goldens(out / "mixed", "bf16", golden, out / "golden_bf16.safetensors")
    (out / "clip-current").mkdir()
    make_clip_current(clip, out / "clip-current", out / "golden_clip_current.safetensors")
    versions = dict(transformers=transformers.__version__, diffusers=diffusers.__version__, torch=torch.__version__)
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(out)}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
