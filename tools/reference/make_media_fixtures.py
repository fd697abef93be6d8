"""Golden values for the media crate: OpenCV's RGB->grey and Otsu threshold on a few images.

    python tools/reference/make_media_fixtures.py --out tests/fixtures

Writes golden/otsu_{k}.png (RGB test images) and golden/otsu.json with, per image, OpenCV's
Otsu threshold (cv2.THRESH_BINARY + cv2.THRESH_OTSU on cv2.COLOR_RGB2GRAY), the grey image's
sum, and the number of white pixels after thresholding.
"""
import argparse
import json
import os

import cv2
import numpy as np


def images():
    rng = np.random.default_rng(7)
    h, w = 48, 64
    # 1. uniform noise
    yield rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # 2. bimodal: dark strokes on light paper with noise
    img = np.full((h, w, 3), 230, np.uint8)
    cv2.circle(img, (32, 24), 15, (20, 20, 20), 3)
    cv2.line(img, (0, 0), (63, 47), (40, 30, 50), 2)
    noise = rng.normal(0, 12, img.shape)
    yield np.clip(img + noise, 0, 255).astype(np.uint8)
    # 3. horizontal gradient with colour
    x = np.linspace(0, 255, w)[None, :, None]
    yield np.broadcast_to(np.concatenate([x, 255 - x, x / 2], axis=2), (h, w, 3)).astype(np.uint8).copy()
    # 4. grey sketch-like frame, soft edges
    img = np.full((h, w, 3), 250, np.uint8)
    cv2.rectangle(img, (10, 10), (50, 40), (90, 90, 90), 4)
    yield cv2.GaussianBlur(img, (5, 5), 1.5)
    # 5. almost constant (one dark pixel)
    img = np.full((h, w, 3), 200, np.uint8)
    img[3, 5] = (0, 0, 0)
    yield img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    out = os.path.join(ap.parse_args().out, "golden")
    os.makedirs(out, exist_ok=True)
    cases = []
    for k, rgb in enumerate(images()):
        name = f"otsu_{k}.png"
        cv2.imwrite(os.path.join(out, name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        t, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        cases.append({"file": name, "threshold": int(t), "gray_sum": int(gray.astype(np.int64).sum()),
                      "white_pixels": int((binary == 255).sum())})
    with open(os.path.join(out, "otsu.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "cases": cases}, f, indent=1)
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
