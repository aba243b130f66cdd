"""Sample grids as PNG: the picture people look at after a run."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] floats in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles [N, H, W, C] uint8 images into one [rows*(H+pad)+pad, ..., C] image, row-major."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def label_rows(img: Image.Image, labels: Sequence[str], row_height: int) -> Image.Image:
    """``img`` with a white margin on the left holding ``labels[r]`` beside row r (rows of
    ``row_height`` pixels from the top), in PIL's built-in font."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    width = max((int(draw.textlength(t, font=font)) for t in labels), default=0) + 8
    out = Image.new(img.mode, (img.width + width, img.height), 255 if img.mode == "L" else
                    (255, 255, 255))
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        draw.text((4, r * row_height + row_height // 2), text, fill=0 if img.mode == "L" else
                  (0, 0, 0), font=font, anchor="lm")
    return out


def save_grid(images: np.ndarray, path: str, ncol: int | None = None, scale: int = 1,
              row_labels: Sequence[str] | None = None) -> str:
    """Writes images in [-1, 1] as one PNG grid, local or ``gs://`` (``scale`` enlarges);
    ``row_labels``: a text written left of each row (e.g. its prompt).

    Images of 1 channel are grey, of 3 RGB; others (e.g. 4-channel latents) show their
    first three channels as RGB (one channel: grey)."""
    images = np.asarray(images)
    if images.shape[-1] not in (1, 3):
        images = images[..., :3] if images.shape[-1] > 3 else images[..., :1]
    grid = make_grid(to_uint8(images), ncol)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    img = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if row_labels:
        img = label_rows(img, row_labels, (images.shape[1] + 2) * scale)
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        img.save(f, format="PNG")
    return path
