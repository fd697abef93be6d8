#!/usr/bin/env python3
"""Tiny random-weight CLIP image tower + preprocessing goldens for the Rust port.

    /work/refenv/bin/python tools/reference/make_clip_fixtures.py --out tests/fixtures

Writes (see tests/fixtures/README.md, section "CLIP image tower"):
  clip/config.json, clip/model.safetensors      CLIPVisionModelWithProjection.save_pretrained
  clip/preprocessor_config.json                 CLIPImageProcessor.save_pretrained (openai/clip
                                                settings, shortest_edge/crop 32 instead of 224)
  golden/clip_vision.safetensors                pixel_values -> last_hidden_state, pooler_output,
                                                image_embeds
  golden/clip_img_{0..6}.png                    test images (k=4 is RGBA, the rest RGB)
  golden/clip_preprocess.safetensors            resized_{k} (u8 HxWx3, after resize, before
                                                crop), pixel_values_{k} (1,3,32,32), image_embeds
  golden/clip_preprocess.json                   per-image sizes / crop offsets, numeric checks,
                                                PIL-bicubic vs. plain-Keys-bicubic comparison

Deterministic (fixed seeds, CPU, float32, one torch thread); a few seconds.  Besides writing the
files the script re-derives every preprocessing golden with an independent numpy implementation
(exact Pillow Resample.c fixed-point bicubic + the formulas documented in the README) and asserts
bit-equality, so the README's formulas are checked, not just transcribed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import to_numpy_array
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()

SEED_MODEL = 20240611
SEED_PIXELS = 11
SEED_IMAGES = 5
SEED_RESAMPLE_CMP = 99

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SHORTEST_EDGE = 32
CROP = 32

VISION_CONFIG = dict(
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=16,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def randomize_(model: nn.Module, seed: int) -> int:
    """Every parameter re-drawn: matrices/kernels N(0, 1/fan_in), LayerNorm weights 1+0.2N,
    biases 0.1N, embeddings (class_embedding, position_embedding) N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    norm_weights, embeddings = set(), set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, nn.LayerNorm):
            norm_weights.add(prefix + "weight")
        if isinstance(m, nn.Embedding):
            embeddings.add(prefix + "weight")
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            n += p.numel()
            if name in embeddings or name.endswith("class_embedding"):
                p.normal_(0.0, 0.5, generator=g)
            elif name in norm_weights:
                p.normal_(1.0, 0.2, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=g)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                raise RuntimeError(f"don't know how to randomise {name} {tuple(p.shape)}")
            assert bool((p != 0).any()), f"{name} is all zeros"
            assert bool(torch.isfinite(p).all()), name
    return n


def build_model(folder: Path) -> int:
    torch.manual_seed(SEED_MODEL)
    cfg = CLIPVisionConfig(**VISION_CONFIG)
    model = CLIPVisionModelWithProjection(cfg).eval()
    n = randomize_(model, SEED_MODEL)
    model.save_pretrained(str(folder), safe_serialization=True)
    return n


def make_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": SHORTEST_EDGE},
        resample=3,  # PILImageResampling.BICUBIC
        do_center_crop=True,
        crop_size={"height": CROP, "width": CROP},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def load_model(folder: Path, attn: str = "eager", dtype=torch.float32):
    return CLIPVisionModelWithProjection.from_pretrained(
        str(folder), torch_dtype=dtype, attn_implementation=attn
    ).eval()


def run_model(model, pixel_values: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model(pixel_values=pixel_values.to(model.dtype))
        pooled = model.vision_model(pixel_values=pixel_values.to(model.dtype)).pooler_output
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": pooled,
            "image_embeds": out.image_embeds}


# --------------------------------------------------------------------------------------------
# test images
# --------------------------------------------------------------------------------------------


def _grid(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return y, x


def make_images() -> list[tuple[str, np.ndarray]]:
    """(description, uint8 HxWx{3,4}) per test image."""
    rng = np.random.default_rng(SEED_IMAGES)
    imgs = []

    # 0: 64x48 landscape - colour gradient, filled disc, dark diagonal bar (sharp edges ring).
    h, w = 48, 64
    y, x = _grid(h, w)
    img = np.stack([x / (w - 1) * 255, y / (h - 1) * 255, np.full_like(x, 90)], -1)
    disc = (x - 40.3) ** 2 + (y - 20.7) ** 2 < 11.5**2
    img[disc] = (230, 30, 40)
    bar = np.abs((x - 5) * 0.6 - (y - 2)) < 1.6
    img[bar] = (10, 15, 20)
    imgs.append(("64x48 landscape: RGB gradient, red disc, dark diagonal bar", img))

    # 1: 30x50 portrait - vertical stripes (period 3), blue rectangle, white border row.
    h, w = 50, 30
    y, x = _grid(h, w)
    stripes = np.where((x.astype(int) % 3) == 0, 200.0, 60.0)
    img = np.stack([stripes, 0.5 * stripes + y * 2, 255 - stripes], -1)
    img[12:31, 7:22] = (20, 60, 240)
    img[0] = 255
    img[-1, :, 0] = 0
    imgs.append(("30x50 portrait: period-3 stripes, blue rectangle, white top row (upsampled)", img))

    # 2: 32x32 square - noise + white cross (resize is a no-op: PIL returns a copy).
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    img[14:18, :] = 255
    img[:, 14:18] = 255
    imgs.append(("32x32 square: uniform noise, white cross (no resize)", img))

    # 3: 41x29 odd - radial gradient, 1-px black and white lines, a saturated corner.
    h, w = 29, 41
    y, x = _grid(h, w)
    r = np.hypot(x - 20, y - 14) / np.hypot(20, 14)
    img = np.stack([255 * r, 255 * (1 - r), 128 + 100 * np.sin(x / 3.0)], -1)
    img[:, 10] = 0
    img[:, 11] = 255
    img[7, :] = (255, 255, 0)
    img[20:, 30:] = (0, 0, 255)
    imgs.append(("41x29 odd: radial gradient, 1-px black/white columns, yellow row, blue corner", img))

    # 4: 90x70 RGBA - opaque shapes on a semi-transparent gradient; fully transparent block hides
    #    bright green pixels (visible only if alpha is dropped, as CLIPImageProcessor does).
    h, w = 70, 90
    y, x = _grid(h, w)
    rgb = np.stack([128 + 120 * np.sin(x / 7.0), y / (h - 1) * 255, 255 - x / (w - 1) * 255], -1)
    alpha = np.clip(x / (w - 1) * 255, 0, 255)
    ring = np.abs(np.hypot(x - 30, y - 35) - 18) < 3
    rgb[ring] = (250, 250, 250)
    alpha[ring] = 255
    rgb[5:30, 55:85] = (0, 255, 0)
    alpha[5:30, 55:85] = 0
    img = np.concatenate([rgb, alpha[..., None]], -1)
    imgs.append(("90x70 RGBA: gradient with alpha ramp 0..255 left->right, opaque white ring, "
                 "alpha-0 block over pure green (downsampled 2.19x)", img))

    # 5: 40x100 tall portrait - 100 -> 80 rows is > 2x the 40 -> 32 columns reduction, so
    #    Pillow 13 runs the VERTICAL pass first (the other images all go horizontal first).
    h, w = 100, 40
    y, x = _grid(h, w)
    img = np.stack([255 * ((x // 4 + y // 6) % 2), 127.5 + 127.5 * np.cos(y / 5.0), x / (w - 1) * 255], -1)
    img[40:44, :] = (250, 20, 20)
    img[:, 19] = 0
    imgs.append(("40x100 tall portrait: checkerboard, cosine rows, red band, black column "
                 "(downsampled, vertical pass first in Pillow 13)", img))

    # 6: 40x80 - the tie: 80 -> 64 rows is exactly 2x the 40 -> 32 columns reduction, and Pillow
    #    13 then runs the horizontal pass first.
    h, w = 80, 40
    y, x = _grid(h, w)
    img = np.stack([255 * ((x // 3) % 2), 255 * (np.hypot(x - 20, y - 40) < 14), 255 * ((y // 3) % 2)], -1)
    img[10:14, 5:35] = (255, 255, 255)
    imgs.append(("40x80 portrait: stripes, green disc (tie case of the pass-order rule: horizontal "
                 "first)", img))

    return [(d, np.clip(np.rint(a), 0, 255).astype(np.uint8)) for d, a in imgs]


# --------------------------------------------------------------------------------------------
# independent re-implementation (numpy) of what CLIPImageProcessor does
# --------------------------------------------------------------------------------------------

PRECISION_BITS = 32 - 8 - 2  # Pillow Resample.c, 8 bits per channel


def keys_bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Pillow's bicubic_filter (Keys, a = -0.5, support 2)."""
    x = np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
        np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )


def pil_coeffs(in_size: int, out_size: int) -> np.ndarray:
    """Pillow precompute_coeffs (box = whole image) as a dense float64 (out, in) matrix,
    each row normalised to sum 1 over the taps Pillow uses (edge taps truncated, not clamped)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    m = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, like C (int)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax)
        k = keys_bicubic((j - center + 0.5) * ss)
        ww = k.sum()
        m[xx, xmin:xmax] = k / ww if ww != 0.0 else k
    return m


def pil_fixed(m: np.ndarray) -> np.ndarray:
    """normalize_coeffs_8bpc: round half away from zero to 22-bit fixed point."""
    s = m * (1 << PRECISION_BITS)
    return np.where(s < 0, np.trunc(-0.5 + s), np.trunc(0.5 + s)).astype(np.int64)


def _clip8(acc: np.ndarray) -> np.ndarray:
    out = acc >> PRECISION_BITS
    out = np.where(acc >= (1 << PRECISION_BITS << 8), 255, out)
    out = np.where(acc <= 0, 0, out)
    return out.astype(np.uint8)


def pil_vertical_first(h: int, w: int, out_h: int, out_w: int) -> bool:
    """Pillow 13 pass order (Resample.c ImagingResampleInner, python-pillow/Pillow#9549): the
    vertical pass runs first iff the height shrinks by more than twice as many pixels as the
    width does.  Determined empirically on Pillow 13.0.0 (no counter-example in ~1500 random
    size pairs, ties -> horizontal first); Pillow <= 12 always runs the horizontal pass first."""
    return out_h < h and (h - out_h) > 2 * (w - out_w)


def _h_pass(x: np.ndarray, out_w: int) -> np.ndarray:
    kh = pil_fixed(pil_coeffs(x.shape[1], out_w))  # (out_w, w)
    return _clip8((1 << (PRECISION_BITS - 1)) + np.einsum("ow,hwc->hoc", kh, x)).astype(np.int64)


def _v_pass(x: np.ndarray, out_h: int) -> np.ndarray:
    kv = pil_fixed(pil_coeffs(x.shape[0], out_h))  # (out_h, h)
    return _clip8((1 << (PRECISION_BITS - 1)) + np.einsum("oh,hwc->owc", kv, x)).astype(np.int64)


PILLOW13 = int(PIL.__version__.split(".")[0]) >= 13


def pil_bicubic_resize(img: np.ndarray, out_h: int, out_w: int, pillow13_order: bool = PILLOW13) -> np.ndarray:
    """Bit-exact Pillow Image.resize(BICUBIC, reducing_gap=None) of a uint8 HxWxC image: two
    separable passes (a pass is skipped if its size is unchanged) with a uint8 intermediate;
    per output sample acc = 2^21 + sum(pixel * k_fixed), out = clip(acc >> 22, 0, 255)."""
    h, w, _ = img.shape
    if (h, w) == (out_h, out_w):
        return img.copy()
    x = img.astype(np.int64)
    if pillow13_order and pil_vertical_first(h, w, out_h, out_w):
        if out_h != h:
            x = _v_pass(x, out_h)
        if out_w != w:
            x = _h_pass(x, out_w)
    else:
        if out_w != w:
            x = _h_pass(x, out_w)
        if out_h != h:
            x = _v_pass(x, out_h)
    return x.astype(np.uint8)


def resize_output_size(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
    """transformers.image_transforms.get_resize_output_image_size(default_to_square=False)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def crop_offsets(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    """transformers.image_transforms.center_crop, no-padding case: (top, left)."""
    top, left = (h - ch) // 2, (w - cw) // 2
    assert top >= 0 and left >= 0, "image smaller than crop: padding path not covered"
    return top, left


def normalise(crop_u8: np.ndarray) -> np.ndarray:
    """rescale: float64(u8) * (1/255) -> float32; normalize: (x - mean_f32) / std_f32 in float32;
    HWC -> CHW."""
    x = (crop_u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------
# PIL bicubic vs. simpler bicubics (to pick a Rust tolerance)
# --------------------------------------------------------------------------------------------


def clamp_coeffs(in_size: int, out_size: int) -> np.ndarray:
    """A textbook antialiased Keys bicubic: same support scaling, but the taps beyond the border
    are clamped to the edge pixel (replicate) instead of dropped."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        j = np.arange(math.floor(center - 0.5 - support), math.ceil(center - 0.5 + support) + 1)
        k = keys_bicubic((j + 0.5 - center) / filterscale)
        k = k / k.sum()
        np.add.at(m[xx], np.clip(j, 0, in_size - 1), k)
    return m


def float_resize(img, out_h, out_w, coeffs, dtype, round_between):
    """Separable float resize in Pillow 13's pass order; round half up + clamp at the end (and
    between the passes if round_between)."""
    h, w, _ = img.shape
    x = img.astype(dtype)
    passes = ["h", "v"]
    if pil_vertical_first(h, w, out_h, out_w):
        passes.reverse()
    for i, p in enumerate(passes):
        if p == "h" and out_w != w:
            x = np.einsum("ow,hwc->hoc", coeffs(w, out_w).astype(dtype), x)
        elif p == "v" and out_h != h:
            x = np.einsum("oh,hwc->owc", coeffs(h, out_h).astype(dtype), x)
        else:
            continue
        if round_between and i == 0:
            x = np.clip(np.floor(x + 0.5), 0, 255)
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


VARIANTS = {
    # name: (coefficients, dtype, round to u8 between passes)
    "keys_f64_truncated_edges": (pil_coeffs, np.float64, False),
    "keys_f32_truncated_edges": (pil_coeffs, np.float32, False),
    "keys_f64_truncated_edges_u8_intermediate": (pil_coeffs, np.float64, True),
    "keys_f64_clamped_edges": (clamp_coeffs, np.float64, False),
    "keys_f64_clamped_edges_u8_intermediate": (clamp_coeffs, np.float64, True),
}


def compare_resamplers(test_images: list[np.ndarray]) -> dict:
    """Resize (shortest edge 32) the test images plus 60 random-size images with Pillow and with
    simpler implementations; stats in uint8 levels per content kind."""
    rng = np.random.default_rng(SEED_RESAMPLE_CMP)
    cases = [("test_images", img[..., :3]) for img in test_images]
    for i in range(60):
        h, w = (int(v) for v in rng.integers(9, 258, 2))
        if (i // 3) % 3 == 2:  # tall portraits: mostly the vertical-first path
            w = int(rng.integers(9, 100))
            h = int(w * rng.uniform(2.05, 4.0))
        y, x = _grid(h, w)
        kind = ("noise", "hard_edges", "smooth")[i % 3]
        if kind == "noise":
            img = rng.integers(0, 256, (h, w, 3))
        elif kind == "hard_edges":
            img = np.stack([255 * ((x // rng.integers(2, 9) + y // rng.integers(2, 9)) % 2),
                            255 * (np.hypot(x - w / 2, y - h / 2) < min(h, w) / 3),
                            255 * x / w], -1)
        else:
            img = np.stack([127.5 + 100 * np.sin(x / rng.uniform(8, 30) + y / rng.uniform(8, 30)),
                            255 * x / w, 255 * y / h], -1)
        cases.append((kind, np.clip(np.rint(img), 0, 255).astype(np.uint8)))
    kinds = ["test_images", "noise", "hard_edges", "smooth"]
    res = {"n_images": {k: sum(c == k for c, _ in cases) for k in kinds},
           "n_vertical_first": 0, "exact_emulation_mismatching_pixels": 0, "variants": {}}
    names = ["pillow_fixed_point_always_horizontal_first (Pillow <= 12)", *VARIANTS]
    stats = {(n, k): [0, 0, 0] for n in names for k in kinds}  # max, differing, total
    for kind, img in cases:
        h, w, _ = img.shape
        oh, ow = resize_output_size(h, w, SHORTEST_EDGE)
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), resample=Image.Resampling.BICUBIC))
        res["exact_emulation_mismatching_pixels"] += int((pil_bicubic_resize(img, oh, ow) != ref).sum())
        res["n_vertical_first"] += int(pil_vertical_first(h, w, oh, ow))
        for name in names:
            if name in VARIANTS:
                got = float_resize(img, oh, ow, *VARIANTS[name])
            else:
                got = pil_bicubic_resize(img, oh, ow, pillow13_order=False)
            d = np.abs(got.astype(int) - ref.astype(int))
            st = stats[(name, kind)]
            st[0] = max(st[0], int(d.max()))
            st[1] += int((d > 0).sum())
            st[2] += d.size
    for name in names:
        res["variants"][name] = {
            k: {"max_abs_u8": stats[(name, k)][0],
                "fraction_differing": round(stats[(name, k)][1] / stats[(name, k)][2], 5)}
            for k in kinds}
    res["one_u8_level_in_pixel_values"] = [round(1 / 255 / sd, 6) for sd in OPENAI_CLIP_STD]
    return res


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def save_st(path: Path, tensors: dict):
    save_file({k: torch.as_tensor(v).detach().clone().contiguous() for k, v in tensors.items()},
              str(path))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    out = Path(ap.parse_args().out)
    torch.set_num_threads(1)
    clip_dir, gold = out / "clip", out / "golden"
    if clip_dir.exists():
        shutil.rmtree(clip_dir)
    clip_dir.mkdir(parents=True)
    gold.mkdir(parents=True, exist_ok=True)

    # ---- model + processor folder
    n_params = build_model(clip_dir)
    make_processor().save_pretrained(str(clip_dir))
    model = load_model(clip_dir)
    for name, p in model.named_parameters():
        assert bool((p != 0).any()), name
    print(f"model: {n_params} parameters, "
          f"{sum(f.stat().st_size for f in clip_dir.iterdir())} bytes in {clip_dir}")

    # ---- model goldens
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(SEED_PIXELS))
    outs = run_model(model, pixel_values)
    save_st(gold / "clip_vision.safetensors", {"pixel_values": pixel_values, **outs})
    checks = {}
    for k, v in outs.items():
        print(f"  {k:18s} {tuple(v.shape)!s:12s} std {v.std().item():.4f} absmax {v.abs().max().item():.3f}")
        assert 0.05 < v.std().item() < 20.0
    # true float64 reference: hand-written forward (also documents the architecture).  HF's
    # "float64" model is not one: its eager attention always runs the softmax in float32.
    o64 = manual_forward(model, pixel_values)
    hf64 = run_model(load_model(clip_dir, dtype=torch.float64), pixel_values.double())
    osdpa = run_model(load_model(clip_dir, attn="sdpa"), pixel_values)
    checks["float32_vs_float64_max_abs"] = {k: float((outs[k].double() - o64[k]).abs().max()) for k in outs}
    checks["hf_float64_with_f32_softmax_vs_float64_max_abs"] = {
        k: float((hf64[k] - o64[k]).abs().max()) for k in outs}
    checks["eager_vs_sdpa_max_abs"] = {k: float((outs[k] - osdpa[k]).abs().max()) for k in outs}
    assert max(checks["hf_float64_with_f32_softmax_vs_float64_max_abs"].values()) < 1e-5
    assert max(checks["float32_vs_float64_max_abs"].values()) < 1e-4

    # ---- preprocessing goldens
    proc = AutoImageProcessor.from_pretrained(str(clip_dir), use_fast=False)
    assert type(proc) is CLIPImageProcessor, type(proc)
    pre_tensors, cases, all_pv, raw = {}, [], [], []
    for k, (desc, arr) in enumerate(make_images()):
        fname = f"clip_img_{k}.png"
        Image.fromarray(arr, "RGBA" if arr.shape[2] == 4 else "RGB").save(gold / fname)
        with Image.open(gold / fname) as im:
            im.load()
            decoded = np.asarray(im)
            mode = im.mode
            assert np.array_equal(decoded, arr)
            pv = proc(images=im, return_tensors="np")["pixel_values"]  # (1,3,32,32) f32
            # the processor's own steps, to capture the resized intermediate
            rgb = to_numpy_array(convert_to_rgb(im))
        assert pv.dtype == np.float32 and pv.shape == (1, 3, CROP, CROP)
        resized = proc.resize(rgb, size=proc.size, resample=proc.resample)
        assert resized.dtype == np.uint8
        cropped = proc.center_crop(resized, size=proc.crop_size)
        again = proc.normalize(proc.rescale(cropped, proc.rescale_factor), proc.image_mean, proc.image_std)
        assert np.array_equal(again.transpose(2, 0, 1)[None], pv)

        # independent numpy re-derivation, must be bit-exact
        rgb_mine = decoded[..., :3]  # convert("RGB") of RGBA just drops alpha
        assert np.array_equal(rgb_mine, rgb)
        h, w = rgb.shape[:2]
        oh, ow = resize_output_size(h, w, SHORTEST_EDGE)
        assert resized.shape == (oh, ow, 3)
        assert np.array_equal(pil_bicubic_resize(rgb_mine, oh, ow), resized), f"resize {k}"
        if k in (5, 6):  # the pass order must be visible in the golden
            other = (pil_bicubic_resize(rgb_mine, oh, ow, pillow13_order=False) if k == 5 else
                     _h_pass(_v_pass(rgb_mine.astype(np.int64), oh), ow).astype(np.uint8))
            assert not np.array_equal(other, resized), k
        top, left = crop_offsets(oh, ow, CROP, CROP)
        assert np.array_equal(normalise(resized[top:top + CROP, left:left + CROP])[None], pv), k

        pre_tensors[f"resized_{k}"] = torch.from_numpy(resized.copy())
        pre_tensors[f"pixel_values_{k}"] = torch.from_numpy(pv.copy())
        all_pv.append(pv)
        raw.append(decoded)
        cases.append({
            "k": k, "file": fname, "description": desc, "png_mode": mode,
            "input_hw": [h, w], "resized_hw": [oh, ow], "crop_top_left": [top, left],
            "pillow13_pass_order": "vertical first" if pil_vertical_first(h, w, oh, ow) else
            ("horizontal first" if (oh, ow) != (h, w) else "no resize (copy)"),
            "pixel_values_min": float(pv.min()), "pixel_values_max": float(pv.max()),
        })
        print(f"  img {k}: {mode:4s} {h}x{w} -> resized {oh}x{ow}, crop at ({top},{left}), "
              f"pixel_values [{pv.min():.4f}, {pv.max():.4f}]")
    batch = torch.from_numpy(np.concatenate(all_pv))
    # the processor on a list of all five images gives the same stack
    imgs = [Image.open(gold / c["file"]) for c in cases]
    assert np.array_equal(proc(images=imgs, return_tensors="np")["pixel_values"], batch.numpy())
    for im in imgs:
        im.close()
    pre_tensors["image_embeds"] = run_model(model, batch)["image_embeds"]
    save_st(gold / "clip_preprocess.safetensors", pre_tensors)

    # RGBA: convert("RGB") drops alpha; compositing on white would have changed these pixels
    rgba = raw[4].astype(np.float64)
    on_white = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    checks["rgba_convert_rgb_equals_first_three_channels"] = bool(np.array_equal(
        raw[4][..., :3], to_numpy_array(convert_to_rgb(Image.fromarray(raw[4], "RGBA")))))
    checks["rgba_composited_on_white_would_differ_by_up_to_u8"] = float(np.abs(on_white - rgba[..., :3]).max())
    assert checks["rgba_convert_rgb_equals_first_three_channels"]

    cmp = compare_resamplers(raw)
    print("resampler comparison:", json.dumps(cmp, indent=1))
    assert cmp["exact_emulation_mismatching_pixels"] == 0

    meta = {
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
                     "pillow": PIL.__version__, "numpy": np.__version__},
        "processor": "CLIPImageProcessor (slow, PIL) via AutoImageProcessor.from_pretrained(clip/, use_fast=False)",
        "model_parameters": n_params,
        "images": cases,
        "pixel_values_absmax_all_images": float(batch.abs().max()),
        "checks": checks,
        "pil_bicubic_vs_simple_keys": cmp,
    }
    with open(gold / "clip_preprocess.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(json.dumps(checks, indent=1))


def manual_forward(model, pixel_values) -> dict:
    """Plain-torch float64 forward from the state dict (the whole architecture in 30 lines)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    c = model.config
    p = "vision_model."
    x = pixel_values.double()
    B = x.shape[0]
    patches = torch.nn.functional.conv2d(x, sd[p + "embeddings.patch_embedding.weight"], stride=c.patch_size)
    patches = patches.flatten(2).transpose(1, 2)  # (B, grid*grid, D), row-major over the grid
    cls = sd[p + "embeddings.class_embedding"].expand(B, 1, -1)
    h = torch.cat([cls, patches], 1) + sd[p + "embeddings.position_embedding.weight"][None]

    def ln(t, name):
        return torch.nn.functional.layer_norm(t, (c.hidden_size,), sd[name + ".weight"], sd[name + ".bias"],
                                              c.layer_norm_eps)

    def lin(t, name, bias=True):
        return torch.nn.functional.linear(t, sd[name + ".weight"], sd.get(name + ".bias") if bias else None)

    h = ln(h, p + "pre_layrnorm")
    nh, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    for i in range(c.num_hidden_layers):
        q = p + f"encoder.layers.{i}."
        a = ln(h, q + "layer_norm1")
        split = lambda t: t.view(B, -1, nh, hd).transpose(1, 2)  # noqa: E731
        Q, K, V = (split(lin(a, q + f"self_attn.{n}_proj")) for n in "qkv")
        att = torch.softmax(Q @ K.transpose(-1, -2) * hd**-0.5, -1) @ V
        h = h + lin(att.transpose(1, 2).reshape(B, -1, c.hidden_size), q + "self_attn.out_proj")
        m = lin(ln(h, q + "layer_norm2"), q + "mlp.fc1")
        m = m * torch.sigmoid(1.702 * m)  # quick_gelu
        h = h + lin(m, q + "mlp.fc2")
    pooled = ln(h[:, 0], p + "post_layernorm")
    emb = torch.nn.functional.linear(pooled, sd["visual_projection.weight"])
    return {"last_hidden_state": h, "pooler_output": pooled, "image_embeds": emb}


if __name__ == "__main__":
    main()
