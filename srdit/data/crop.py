"""ADM's centre crop ("center-crop-dhariwal", SPEC 1), the crop every ImageNet image gets once,
at preparation time.

For a target side r, on an RGB PIL image of size (W, H):
  1. while min(W, H) >= 2r: halve both sides with a BOX filter, new side = old side // 2
     (cheap anti-aliased downsampling of large photos before the final resize);
  2. BICUBIC resize by scale = r / min(W, H), each side round(side * scale) (Python's round,
     half to even), so the short side becomes exactly r;
  3. crop r x r at offset ((H' - r) // 2, (W' - r) // 2) (top, left), rounding down.
Images smaller than r are upsampled by step 2.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CROP_NAME = "center-crop-dhariwal"


def center_crop_dhariwal(image: Image.Image, resolution: int) -> np.ndarray:
    """RGB PIL image -> uint8 array [r, r, 3] (HWC), the ADM centre crop of side r."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)  # [H', W', 3]
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return np.ascontiguousarray(pixels[top:top + resolution, left:left + resolution])  # [r, r, 3]
