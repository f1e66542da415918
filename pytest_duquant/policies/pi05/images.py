"""Image resizing shared by the policy's processing and the LIBERO client side: one path, PIL's.

Pillow is a hard dependency: a torch fallback (antialiased bilinear) differs from PIL by a grey level here
and there, which moved the pi0.5 actions by about 1e-3, so results depended on whether Pillow happened to
be installed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi-client resize_with_pad (tf.image.resize_with_pad via PIL): keep aspect, PIL bilinear, centred zero
    padding; uint8 HWC in and out; no-op at the size. The only resize in the project (libero.protocol uses it)."""
    cur_h, cur_w = image.shape[:2]
    if (cur_h, cur_w) == (height, width):
        return image
    ratio = max(cur_w / width, cur_h / height)
    rh, rw = int(cur_h / ratio), int(cur_w / ratio)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR))
    out = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    ph, pw = max(0, int((height - rh) / 2)), max(0, int((width - rw) / 2))
    out[ph : ph + rh, pw : pw + rw] = resized
    return out
