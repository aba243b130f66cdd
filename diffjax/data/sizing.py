"""Bringing uint8 images to the pipeline's square size `image_size`.

Modes (`resize=`):
  "none"   the data must already be image_size x image_size (error otherwise);
  "pad"    centre the image on a black (0, i.e. -1 after scaling) canvas; needs image_size >=
           the data's height and width (e.g. 28x28 Fashion-MNIST -> 32x32);
  "resize" resize the shorter side to image_size and centre-crop (ADM's recipe: halve with a
           box filter while the shorter side is >= 2 * image_size, then one bicubic resize).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffjax.data.errors import DataError

RESIZE_MODES = ("none", "pad", "resize")


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """image: [H, W, C] uint8 (C in {1, 3, 4}) -> [size, size, C] uint8."""
    channels = image.shape[2]
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    new_size = tuple(max(size, round(s * scale)) for s in pil.size)
    if new_size != pil.size:
        pil = pil.resize(new_size, resample=Image.Resampling.BICUBIC)
    out = np.asarray(pil)
    if channels == 1:
        out = out[:, :, None]
    top = (out.shape[0] - size) // 2
    left = (out.shape[1] - size) // 2
    return out[top:top + size, left:left + size]


def pad_center(images: np.ndarray, size: int) -> np.ndarray:
    """images: [B, H, W, C] uint8 with H, W <= size -> [B, size, size, C], zero border."""
    b, h, w, c = images.shape
    out = np.zeros((b, size, size, c), dtype=images.dtype)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top:top + h, left:left + w] = images
    return out


class Sizer:
    """Checks a source's native shape against image_size once, then sizes batches.

    native_shape: (H, W, C) of the stored images (all the same); image_size None keeps them.
    """

    def __init__(self, native_shape: tuple[int, int, int], image_size: int | None,
                 resize: str, source_name: str):
        if resize not in RESIZE_MODES:
            raise DataError(f"unknown resize mode '{resize}'; valid: {', '.join(RESIZE_MODES)}")
        self.mode = resize
        self.size = image_size
        if image_size is None:
            self.output_shape = tuple(native_shape)
            self.mode = "none"
            return
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        h, w, c = native_shape
        self.output_shape = (image_size, image_size, c)
        if (h, w) == (image_size, image_size):
            self.mode = "none"
        elif resize == "none":
            raise DataError(
                f"{source_name} images are {h}x{w} but image_size={image_size}; set "
                f"image_size={h} if square, or resize='pad' (centre on a black canvas) or "
                f"resize='resize' (resize + centre crop)")
        elif resize == "pad" and (h > image_size or w > image_size):
            raise DataError(
                f"{source_name} images are {h}x{w}, larger than image_size={image_size}: "
                f"cannot pad; use resize='resize' or image_size>={max(h, w)}")

    def apply_batch(self, images: np.ndarray) -> np.ndarray:
        """images: [B, H, W, C] uint8 (or a list of [H, W, C]) -> [B, S, S, C] uint8."""
        if self.mode == "none":
            return np.asarray(images)
        if self.mode == "pad":
            return pad_center(np.asarray(images), self.size)
        return np.stack([resize_center_crop(im, self.size) for im in images])
