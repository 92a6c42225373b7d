#!/usr/bin/env python3
"""Writes the Pillow reference outputs that `crates/m3ae-data/tests/randaugment.rs` checks the
RandAugment ops against: every op of timm's `rand-...-inc1` set applied with fixed arguments to
a fixed 23 x 19 RGB test image, with Pillow's own functions (ImageOps, ImageEnhance,
Image.transform / rotate with bicubic resampling and a fill colour), as timm's `auto_augment.py`
calls them. Images are stored as hex strings of their row-major RGB bytes.

    python3 -m venv .venv-pil && .venv-pil/bin/pip install pillow
    .venv-pil/bin/python scripts/randaugment_reference.py > crates/m3ae-data/tests/fixtures/randaugment.json
"""
import json
import math

import PIL
from PIL import Image, ImageEnhance, ImageOps

W, H = 23, 19
FILL = (124, 116, 104)


def test_image():
    # smooth gradients, a bright square, a dark stripe and pseudo-random noise: every op changes it
    px = []
    state = 12345
    for y in range(H):
        for x in range(W):
            state = (state * 1103515245 + 12345) % (1 << 31)
            n = (state >> 16) % 41 - 20
            r = 30 + 9 * x + n
            g = 200 - 8 * y + n // 2
            b = 60 + 4 * x + 5 * y
            if 5 <= x < 11 and 4 <= y < 10:
                r, g, b = 250, 240, 30
            if y == 14:
                r, g, b = 10, 5, 2
            px.append(tuple(max(0, min(255, int(v))) for v in (r, g, b)))
    img = Image.new("RGB", (W, H))
    img.putdata(px)
    return img


def affine(img, m):
    return img.transform(img.size, Image.AFFINE, m, resample=Image.BICUBIC, fillcolor=FILL)


def solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


OPS = [
    ("auto_contrast", [], lambda im: ImageOps.autocontrast(im)),
    ("equalize", [], lambda im: ImageOps.equalize(im)),
    ("invert", [], lambda im: ImageOps.invert(im)),
    ("rotate", [17.3], lambda im: im.rotate(17.3, resample=Image.BICUBIC, fillcolor=FILL)),
    ("rotate", [-24.0], lambda im: im.rotate(-24.0, resample=Image.BICUBIC, fillcolor=FILL)),
    ("posterize", [1], lambda im: ImageOps.posterize(im, 1)),
    ("posterize", [3], lambda im: ImageOps.posterize(im, 3)),
    ("solarize", [40], lambda im: ImageOps.solarize(im, 40)),
    ("solarize", [200], lambda im: ImageOps.solarize(im, 200)),
    ("solarize_add", [99], lambda im: solarize_add(im, 99)),
    ("color", [1.81], lambda im: ImageEnhance.Color(im).enhance(1.81)),
    ("color", [0.23], lambda im: ImageEnhance.Color(im).enhance(0.23)),
    ("contrast", [1.77], lambda im: ImageEnhance.Contrast(im).enhance(1.77)),
    ("contrast", [0.35], lambda im: ImageEnhance.Contrast(im).enhance(0.35)),
    ("brightness", [1.64], lambda im: ImageEnhance.Brightness(im).enhance(1.64)),
    ("brightness", [0.3], lambda im: ImageEnhance.Brightness(im).enhance(0.3)),
    ("sharpness", [1.9], lambda im: ImageEnhance.Sharpness(im).enhance(1.9)),
    ("sharpness", [0.1], lambda im: ImageEnhance.Sharpness(im).enhance(0.1)),
    ("shear_x", [0.27], lambda im: affine(im, (1, 0.27, 0, 0, 1, 0))),
    ("shear_y", [-0.21], lambda im: affine(im, (1, 0, 0, -0.21, 1, 0))),
    ("translate_x", [0.4], lambda im: affine(im, (1, 0, 0.4 * im.size[0], 0, 1, 0))),
    ("translate_y", [-0.33], lambda im: affine(im, (1, 0, 0, 0, 1, -0.33 * im.size[1]))),
]


def main():
    img = test_image()
    out = {
        "pillow": PIL.__version__,
        "width": W,
        "height": H,
        "fill": list(FILL),
        "image": img.tobytes().hex(),
        "ops": [{"op": n, "args": a, "out": f(img).tobytes().hex()} for n, a, f in OPS],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
