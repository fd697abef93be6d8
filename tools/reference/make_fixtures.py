#!/usr/bin/env python3
"""Build small random-weight ModelScope-style text-to-video models and golden outputs.

The Rust port (flipsketch) compares its loaders, tokenizer, text encoder, VAE, UNet3D and DDIM
scheduler against the tensors written here.  Everything is deterministic (fixed seeds, CPU,
float32 compute, one torch thread).

    python tools/reference/make_fixtures.py --out tests/fixtures
    python tools/reference/make_fixtures.py --full-size /path/outside/repo   # ~7 GB, random weights

The CLIP BPE table is taken from open_clip's wheel (bpe_simple_vocab_16e6.txt.gz); pass
--open-clip-wheel PATH, set FLIPSKETCH_OPEN_CLIP_WHEEL, or let the script `pip download` it.
See tests/fixtures/README.md for the file inventory.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast
from transformers.models.clip.tokenization_clip import bytes_to_unicode
from transformers.utils import logging as transformers_logging

diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()

OPEN_CLIP_VERSION = "3.3.0"
DEFAULT_WHEEL = f"/work/dl/open_clip_torch-{OPEN_CLIP_VERSION}-py3-none-any.whl"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"

# ModelScope damo-vilab/text-to-video-ms-1.7b scheduler/scheduler_config.json (DDIM part).
MODELSCOPE_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# ---------------------------------------------------------------------------------------------
# Model configurations
# ---------------------------------------------------------------------------------------------

CONFIG_A = dict(
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    text=dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    ),
)

CONFIG_B = dict(
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=48,
        attention_head_dim=8,
    ),
    text=dict(
        vocab_size=49408,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=48,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.18215,
    ),
)

CONFIG_FULL = dict(
    # UNet3DConditionModel defaults == damo-vilab/text-to-video-ms-1.7b unet/config.json
    unet=dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=1024,
        attention_head_dim=64,
    ),
    text=dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=512,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    ),
)

# ---------------------------------------------------------------------------------------------
# Tokenizer files (vocab.json / merges.txt) from open_clip's BPE table
# ---------------------------------------------------------------------------------------------


def find_open_clip_wheel(arg: str | None, tmpdir: Path) -> Path:
    for cand in (arg, os.environ.get("FLIPSKETCH_OPEN_CLIP_WHEEL"), DEFAULT_WHEEL):
        if cand and Path(cand).is_file():
            return Path(cand)
    if arg:
        raise SystemExit(f"--open-clip-wheel {arg} does not exist")
    print(f"[tokenizer] downloading open-clip-torch=={OPEN_CLIP_VERSION} wheel with pip ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(tmpdir),
         f"open-clip-torch=={OPEN_CLIP_VERSION}"],
        check=True,
    )
    wheels = sorted(tmpdir.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise SystemExit("pip download did not produce an open_clip_torch wheel")
    return wheels[0]


def write_clip_vocab(wheel: Path, dst: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt exactly as HF's openai/clip-vit-* tokenizers were built."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8")
    lines = raw.split("\n")
    merge_lines = lines[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merge_lines]
    assert len(merges) == 48894 and all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == len(vocab) == 49408, len(encoder)
    assert encoder["!"] == 0 and encoder["<|startoftext|>"] == 49406 and encoder["<|endoftext|>"] == 49407
    dst.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = dst / "vocab.json", dst / "merges.txt"
    vocab_file.write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def make_tokenizer(vocab_dir: Path) -> CLIPTokenizer:
    tok = CLIPTokenizer(
        vocab_file=str(vocab_dir / "vocab.json"),
        merges_file=str(vocab_dir / "merges.txt"),
        errors="replace",
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="!",
        model_max_length=77,
    )
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[7:] == [0] * 70, ids[:10]
    return tok


# ---------------------------------------------------------------------------------------------
# Randomisation
# ---------------------------------------------------------------------------------------------

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


def randomize_(model: nn.Module, seed: int, gain: float = 1.0, check: bool = True) -> int:
    """Overwrite every parameter: kernels N(0, gain^2/fan_in), norm weights 1+0.2N, biases 0.1N,
    embeddings N(0, 0.5^2).  Returns the parameter count."""
    g = torch.Generator().manual_seed(seed)
    norm_weights, embeddings = set(), set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None:
            norm_weights.add(prefix + "weight")
        if isinstance(m, nn.Embedding):
            embeddings.add(prefix + "weight")
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            n += p.numel()
            if name in embeddings:
                p.normal_(0.0, 0.5, generator=g)
            elif name in norm_weights:
                p.normal_(1.0, 0.2, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=g)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, gain / math.sqrt(fan_in), generator=g)
            else:
                raise RuntimeError(f"don't know how to randomise {name} {tuple(p.shape)}")
            if check:
                assert bool((p != 0).any()), f"{name} is all zeros"
                assert bool(torch.isfinite(p).all()), name
    return n


def materialize_meta_(model: nn.Module) -> None:
    """Replace meta parameters (from accelerate.init_empty_weights) by real, uninitialised CPU ones."""
    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)


def build_models(cfg: dict, seed: int, empty_init: bool = False, check: bool = True):
    def ctor(fn):
        if not empty_init:
            return fn()
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            m = fn()
        materialize_meta_(m)
        return m

    torch.manual_seed(seed)
    unet = ctor(lambda: UNet3DConditionModel(**cfg["unet"]))
    text = ctor(lambda: CLIPTextModel(CLIPTextConfig(**cfg["text"])))
    vae = ctor(lambda: AutoencoderKL(**cfg["vae"]))
    counts = {}
    for i, (name, m) in enumerate((("unet", unet), ("text_encoder", text), ("vae", vae))):
        counts[name] = randomize_(m, seed * 100 + i, check=check)
        m.eval()
    return unet, text, vae, counts


def make_scheduler(**overrides) -> DDIMScheduler:
    return DDIMScheduler(**{**MODELSCOPE_SCHEDULER, **overrides})


def save_pipeline(folder: Path, unet, text, vae, tokenizer, dtype=None, unet_shard_bytes=None):
    if folder.exists():
        shutil.rmtree(folder)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler())
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if unet_shard_bytes is not None:
        shutil.rmtree(folder / "unet")
        unet.save_pretrained(str(folder / "unet"), safe_serialization=True, max_shard_size=unet_shard_bytes)
    return pipe


# ---------------------------------------------------------------------------------------------
# Goldens
# ---------------------------------------------------------------------------------------------

LONG_PROMPT = (
    "A highly detailed pencil sketch of an old lighthouse standing on a rocky cliff above a stormy sea, "
    "with seagulls circling overhead, waves crashing against the rocks, dramatic clouds rolling in from "
    "the horizon, a small fishing boat struggling through the swell, rain streaking across the sky, and a "
    "lone keeper holding a lantern in the doorway while the beam sweeps over the dark water at midnight, "
    "drawn in the style of a nineteenth century engraving with cross hatching and fine ink lines"
)

PROMPTS = [
    "a photo of a cat",
    "A Sketch Of A DOG RUNNING On The BEACH",
    "a   cat  with   many    spaces",
    "a\tcat\twith\ttabs",
    "a cat\nwith\nnewlines\r\nand crlf",
    "   leading and trailing spaces   ",
    "Hello, world! How are you? (fine); [ok] {yes} a/b\\c",
    "1234",
    "pi is 3.14159 and e is 2.718",
    "10,000 horses and 1,000,000 ants",
    "don't stop",
    "it's a bird",
    "we'll see, they've gone, I'm here, you're there, she'd go",
    "I'M LOUD, DON'T SHOUT, IT'S OK",
    "!",
    "!!!",
    "hello!",
    "wow! amazing!",
    "",
    "   ",
    LONG_PROMPT,
    " ".join(["cat"] * 75),
    " ".join(["cat"] * 76),
    "café crème brûlée",
    "naïve résumé façade",
    "Ångström ÉCOLE ÄÖÜ",
    "Straße und Fuß",
    "Γειά σου κόσμε",
    "Привет, мир",
    "一只猫在跳舞",
    "猫が走っている、カタカナ",
    "고양이가 달린다",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "ภาษาไทย",
    "a cat 🐱 dancing 💃",
    "family 👨\u200d👩\u200d👧\u200d👦 rainbow 🏳️\u200d🌈",
    "flags 🇺🇸🇯🇵🇩🇪",
    "thumbs 👍🏽 up",
    "cafe\u0301 vs caf\u00e9",
    "null\x00byte and bell\x07 here",
    "non\u00a0breaking\u00a0space",
    "zero\u200bwidth space",
    "\ufeffbom at start",
    "a <|startoftext|> b",
    "x <|endoftext|> y",
    "<|endoftext|>",
    "<b>bold</b> &amp; <i>html</i> &lt;tag&gt;",
    "https://example.com/path/to/page?q=1&x=y#frag",
    "user@example.com",
    "def f(x): return x**2 + 1  # comment; a[i] = b->c && d || e",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "hyphen-ated words and under_scores",
    "quotes \"double\" 'single' `back`",
    "ellipsis\u2026 em\u2014dash \u201csmart quotes\u201d",
    "fullwidth ＡＢＣ １２３",
    "ligature \ufb01sh",
    "math ∑ x² ≤ ∞",
    "a sketch of a horse galloping",
]


def tokenizer_goldens(tok_dir: Path, out: Path):
    slow = CLIPTokenizer.from_pretrained(str(tok_dir))
    fast = CLIPTokenizerFast.from_pretrained(str(tok_dir))
    kw = dict(padding="max_length", max_length=77, truncation=True)
    ids_slow = [slow(p, **kw).input_ids for p in PROMPTS]
    ids_fast = [fast(p, **kw).input_ids for p in PROMPTS]
    assert all(len(x) == 77 for x in ids_slow + ids_fast)
    disagree = [i for i, (a, b) in enumerate(zip(ids_slow, ids_fast)) if a != b]
    data = {
        "tokenizer": "CLIPTokenizer (slow) and CLIPTokenizerFast loaded from tiny/tokenizer; "
        "padding='max_length', max_length=77, truncation=True",
        "prompts": PROMPTS,
        "input_ids": ids_slow,
        "input_ids_fast": ids_fast,
        "slow_fast_disagree": disagree,
    }
    out.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"[tokenizer] {len(PROMPTS)} prompts; slow/fast disagree on {disagree}")
    for i in disagree:
        print(f"    {i}: {PROMPTS[i]!r}\n       slow {slow.convert_ids_to_tokens([t for t in ids_slow[i] if t])}"
              f"\n       fast {fast.convert_ids_to_tokens([t for t in ids_fast[i] if t])}")
    return slow


STATS: list[tuple[str, float]] = []


def check_out(name: str, t: torch.Tensor):
    assert torch.isfinite(t).all(), f"{name} has non-finite values"
    std = t.float().std().item()
    STATS.append((name, std))
    flag = "" if 0.3 <= std <= 3.0 else "   <-- outside 0.3..3"
    print(f"  {name:40s} shape {tuple(t.shape)!s:22s} std {std:.4f} absmax {t.abs().max().item():.3f}{flag}")
    assert 0.05 < std < 20.0, f"{name}: std {std} out of range"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def save_st(path: Path, tensors: dict):
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


TEXT_PROMPTS = ["a photo of a cat", "", "A sketch of a dog running on the beach, minimal lines!"]


def text_goldens(tag, folder: Path, tok: CLIPTokenizer, out: Path):
    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32).eval()
    ids = tok(TEXT_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        h = te(ids.to(torch.int64)).last_hidden_state
    check_out(f"text_encoder_{tag}.last_hidden_state", h)
    save_st(out / f"text_encoder_{tag}.safetensors", {"input_ids": ids.to(torch.int64), "last_hidden_state": h})


def vae_goldens(tag, folder: Path, out: Path, img_hw, lat_hw, seed):
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    g = gen(seed)
    image = torch.rand((2, 3) + img_hw, generator=g)
    with torch.no_grad():
        post = vae.encode(image).latent_dist
        noise = torch.randn(post.mean.shape, generator=g)
        sample = post.mean + post.std * noise  # == DiagonalGaussianDistribution.sample
        latents = torch.randn((3, 4) + lat_hw, generator=g)
        decoded = vae.decode(latents).sample
    for k, v in (("mean", post.mean), ("logvar", post.logvar), ("sample", sample), ("decoded", decoded)):
        check_out(f"vae_{tag}.{k}", v)
    save_st(
        out / f"vae_{tag}.safetensors",
        dict(image=image, mean=post.mean, logvar=post.logvar, noise=noise, sample=sample, latents=latents, decoded=decoded),
    )


def unet_goldens(tag, folder: Path, out: Path, cases, seed):
    unet = UNet3DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).eval()
    cross = unet.config.cross_attention_dim
    for k, (b, f, t, h, w) in enumerate(cases):
        g = gen(seed + k)
        sample = torch.randn((b, 4, f, h, w), generator=g)
        ehs = torch.randn((b, 77, cross), generator=g)
        timestep = torch.tensor([float(t)], dtype=torch.float32)
        with torch.no_grad():
            o = unet(sample, timestep, encoder_hidden_states=ehs).sample
        assert o.shape == sample.shape
        check_out(f"unet_{tag}_{k}.out (B{b} F{f} t{t} {h}x{w})", o)
        save_st(out / f"unet_{tag}_{k}.safetensors",
                dict(sample=sample, timestep=timestep, encoder_hidden_states=ehs, out=o))


def sched_config_dict(s: DDIMScheduler) -> dict:
    return {k: v for k, v in dict(s.config).items() if not k.startswith("_")}


def scheduler_goldens(out: Path, seed: int):
    tensors, cases = {}, {"timestep_cases": [], "step_cases": [], "inversion_cases": []}
    ts_cases = [
        ("leading25_offset1 (ModelScope)", {}, 25),
        ("leading50_offset0", dict(steps_offset=0), 50),
        ("trailing25", dict(timestep_spacing="trailing"), 25),
        ("linspace10", dict(timestep_spacing="linspace"), 10),
        ("set_alpha_to_one_leading25", dict(set_alpha_to_one=True), 25),
        ("squaredcos_cap_v2_20", dict(beta_schedule="squaredcos_cap_v2"), 20),
        ("linear_0.0001_0.02_leading30", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 30),
    ]
    for k, (name, ov, n) in enumerate(ts_cases):
        s = make_scheduler(**ov)
        s.set_timesteps(n)
        tensors[f"ts{k}_timesteps"] = s.timesteps.to(torch.int64)
        tensors[f"ts{k}_alphas_cumprod"] = s.alphas_cumprod.to(torch.float32)
        tensors[f"ts{k}_final_alpha_cumprod"] = s.final_alpha_cumprod.reshape(1).to(torch.float32)
        cases["timestep_cases"].append(
            dict(k=k, name=name, config=sched_config_dict(s), num_inference_steps=n, timesteps=s.timesteps.tolist()))

    g = gen(seed)
    shape = (1, 4, 3, 4, 5)
    step_variants = [
        ("epsilon eta0", {}, 0.0, 25),
        ("epsilon eta0.5 variance_noise", {}, 0.5, 25),
        ("clip_sample 1.0", dict(clip_sample=True, clip_sample_range=1.0), 0.0, 25),
        ("v_prediction", dict(prediction_type="v_prediction"), 0.0, 25),
        ("sample prediction", dict(prediction_type="sample"), 0.0, 25),
    ]
    k = 0
    for vname, ov, eta, n in step_variants:
        for t in (961, 481, 1):
            s = make_scheduler(**ov)
            s.set_timesteps(n)
            _add_step_case(tensors, cases, k, vname, s, n, t, eta, shape, g)
            k += 1
    # linspace spacing: DDIM still uses prev = t - 1000 // n, which is NOT the next listed timestep.
    s = make_scheduler(timestep_spacing="linspace")
    s.set_timesteps(10)
    _add_step_case(tensors, cases, k, "linspace10 epsilon eta0 (prev_t = t - 100, not next in list)", s, 10,
                   int(s.timesteps[1]), 0.0, shape, g)

    # FlipSketch DDIM inversion (ascending timesteps), ModelScope config, S = 25.
    s = make_scheduler()
    n = 25
    s.set_timesteps(n)
    asc = list(reversed(s.timesteps.tolist()))
    for k, t in enumerate((asc[0], asc[1], asc[12], asc[-1])):
        x = torch.randn(shape, generator=g)
        e = torch.randn(shape, generator=g)
        cur = min(t - s.config.num_train_timesteps // n, 999)
        a = s.alphas_cumprod[cur] if cur >= 0 else s.final_alpha_cumprod
        a_next = s.alphas_cumprod[t]
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        nxt = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e
        tensors.update({
            f"inv{k}_sample": x, f"inv{k}_model_output": e, f"inv{k}_next": nxt,
            f"inv{k}_timestep": torch.tensor([t], dtype=torch.int64),
            f"inv{k}_alpha": a.reshape(1).float(), f"inv{k}_alpha_next": a_next.reshape(1).float(),
        })
        cases["inversion_cases"].append(dict(k=k, config=sched_config_dict(s), num_inference_steps=n, timestep=t,
                                             cur_timestep=cur, uses_final_alpha_cumprod=cur < 0))
        check_out(f"inv{k}_next (t={t})", nxt)
    save_st(out / "scheduler.safetensors", tensors)
    (out / "scheduler_cases.json").write_text(json.dumps(cases, indent=1))


def _add_step_case(tensors, cases, k, vname, s, n, t, eta, shape, g):
    x = torch.randn(shape, generator=g)
    mo = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g) if eta > 0 else None
    res = s.step(mo, t, x, eta=eta, variance_noise=noise)
    tensors[f"step{k}_sample"] = x
    tensors[f"step{k}_model_output"] = mo
    if noise is not None:
        tensors[f"step{k}_noise"] = noise
    tensors[f"step{k}_prev"] = res.prev_sample
    tensors[f"step{k}_pred_original"] = res.pred_original_sample
    prev_t = t - s.config.num_train_timesteps // n
    cases["step_cases"].append(dict(k=k, name=vname, config=sched_config_dict(s), num_inference_steps=n, timestep=t,
                                    prev_timestep=prev_t, eta=eta, has_noise=noise is not None))
    check_out(f"step{k}_prev ({vname}, t={t})", res.prev_sample)


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def build_tokenizer_dir(args, tmp: Path) -> tuple[CLIPTokenizer, Path]:
    wheel = find_open_clip_wheel(args.open_clip_wheel, tmp)
    vocab_dir = tmp / "vocab"
    vf, mf = write_clip_vocab(wheel, vocab_dir)
    tok = make_tokenizer(vocab_dir)
    print(f"[tokenizer] BPE from {wheel}; vocab.json sha256 {sha256(vf)[:16]}…, merges.txt sha256 {sha256(mf)[:16]}…")
    return tok, vocab_dir


def check_saved_tokenizer(tok_dir: Path, vocab_dir: Path):
    assert json.loads((tok_dir / "vocab.json").read_text("utf-8")) == json.loads((vocab_dir / "vocab.json").read_text("utf-8"))
    a = (tok_dir / "merges.txt").read_text("utf-8").strip().split("\n")
    b = (vocab_dir / "merges.txt").read_text("utf-8").strip().split("\n")
    assert a == b, "merges.txt changed on save"


def run_fixtures(args):
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    golden = out / "golden"
    golden.mkdir(exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as td:
        tok, vocab_dir = build_tokenizer_dir(args, Path(td))

        # ---- config A (float32) --------------------------------------------------------------
        unet_a, text_a, vae_a, counts_a = build_models(CONFIG_A, seed=1)
        print(f"[A] parameters: {counts_a}")
        save_pipeline(out / "tiny", unet_a, text_a, vae_a, tok)
        check_saved_tokenizer(out / "tiny" / "tokenizer", vocab_dir)
        # Same weights as PyTorch zip pickles.
        tb = out / "tiny-bin"
        if tb.exists():
            shutil.rmtree(tb)
        unet_a.save_pretrained(str(tb / "unet"), safe_serialization=False)
        text_a.save_pretrained(str(tb / "text_encoder"), safe_serialization=False)
        assert (tb / "unet" / "diffusion_pytorch_model.bin").is_file()
        assert (tb / "text_encoder" / "pytorch_model.bin").is_file()
        _assert_same_weights(UNet3DConditionModel.from_pretrained(str(tb / "unet")), unet_a)
        _assert_same_weights(CLIPTextModel.from_pretrained(str(tb / "text_encoder")), text_a)

        # ---- config B (float16 on disk, UNet sharded) ----------------------------------------
        unet_b, text_b, vae_b, counts_b = build_models(CONFIG_B, seed=2)
        print(f"[B] parameters: {counts_b}")
        unet_bytes = counts_b["unet"] * 2
        save_pipeline(out / "tiny-fp16", unet_b, text_b, vae_b, tok, dtype=torch.float16,
                      unet_shard_bytes=unet_bytes // 3 + 1)
        shards = sorted((out / "tiny-fp16" / "unet").glob("diffusion_pytorch_model-*.safetensors"))
        assert len(shards) >= 2 and (out / "tiny-fp16/unet/diffusion_pytorch_model.safetensors.index.json").is_file()
        for m in (unet_b, text_b, vae_b):
            for name, p in m.named_parameters():
                assert p.dtype == torch.float16 and bool((p != 0).any()), name
        del unet_a, text_a, vae_a, unet_b, text_b, vae_b

    # ---- goldens -------------------------------------------------------------------------
    print("[golden] tokenizer")
    tok = tokenizer_goldens(out / "tiny" / "tokenizer", golden / "tokenizer.json")
    print("[golden] outputs (std should be ~0.3..3)")
    text_goldens("a", out / "tiny", tok, golden)
    text_goldens("b", out / "tiny-fp16", tok, golden)  # fp16 weights, loaded as float32
    vae_goldens("a", out / "tiny", golden, (16, 16), (4, 4), seed=11)
    vae_goldens("b", out / "tiny-fp16", golden, (24, 20), (5, 3), seed=12)
    unet_goldens("a", out / "tiny", golden, [(1, 3, 999, 8, 8), (2, 1, 1, 5, 7), (2, 4, 500, 6, 10)], seed=21)
    unet_goldens("b", out / "tiny-fp16", golden, [(1, 2, 261, 8, 8), (1, 1, 981, 7, 5), (3, 5, 41, 4, 12)], seed=31)
    scheduler_goldens(golden, seed=41)
    for p in out.rglob("*"):
        if p.is_file():
            p.chmod(0o644)  # huggingface_hub writes shards via mkstemp (0600)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[done] {time.time() - t0:.1f}s, {total / 1e6:.2f} MB under {out}")


def _assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def run_full_size(args):
    import resource

    out = Path(args.full_size)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as td:
        tok, _ = build_tokenizer_dir(args, Path(td))
        unet, text, vae, counts = build_models(CONFIG_FULL, seed=3, empty_init=True, check=False)
        print(f"[full] parameters: {counts}  (built in {time.time() - t0:.0f}s)", flush=True)
        vae.to(dtype=torch.float16)
        if out.exists():
            shutil.rmtree(out)
        pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=make_scheduler())
        pipe.save_pretrained(str(out), safe_serialization=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(f"[full] wrote {out}: {total / 1e9:.2f} GB in {time.time() - t0:.0f}s, peak RSS {rss:.1f} GB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="fixture directory (normally tests/fixtures)")
    ap.add_argument("--full-size", metavar="DIR", help="write the full ModelScope-1.7B shape with random weights")
    ap.add_argument("--open-clip-wheel", help=f"path to open_clip_torch wheel (default {DEFAULT_WHEEL} or pip download)")
    args = ap.parse_args()
    if not args.out and not args.full_size:
        ap.error("give --out and/or --full-size")
    if args.out:
        run_fixtures(args)
    if args.full_size:
        run_full_size(args)


if __name__ == "__main__":
    main()
