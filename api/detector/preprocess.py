"""Spec §1: image -> normalised 3x224x224 tensor, exactly as the authors' evaluation transform.

Pillow RGB conversion, bilinear squash to 224x224 (no crop), [0, 1], CLIP mean/std. This is
what torchvision's Resize((224, 224)) + ToTensor + Normalize do to a PIL image, written without
torchvision with the same float32 operations in the same order, so the result is bit for bit the same.

The arithmetic is NumPy's, not torch's, on purpose: this runs in request threads, and a torch op
there starts an OpenMP thread team per request thread whose spinning workers then compete with the
engine's forward pass for the CPU (docs/PERFORMANCE.md, "API load", has the cost).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from api.detector.config import IMAGE_SIZE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.array(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)


def preprocess_image(img: Image.Image) -> torch.Tensor:
    """A PIL image (any mode) -> float32 tensor 3x224x224, CLIP-normalised."""
    # convert("RGB") drops alpha rather than compositing it, as the authors' loader does; an RGB
    # image skips it (it would only copy) since resize makes a new image anyway.
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return torch.from_numpy(normalize_pixels(np.asarray(rgb).transpose(2, 0, 1)))


def normalize_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels, 3x224x224 or Nx3x224x224 -> a C-ordered float32 copy with ToTensor's /255 and
    Normalize's -mean, /std applied in place. The one normalisation: the inference tier applies it
    to the pixels the API sends, so both give the same floats bit for bit."""
    array = pixels.astype(np.float32, order="C")
    np.divide(array, np.float32(255), out=array)
    np.subtract(array, _MEAN, out=array)
    np.divide(array, _STD, out=array)
    return array


def pixels_of(images: np.ndarray) -> np.ndarray | None:
    """The uint8 pixels that normalize_pixels turns into exactly these float32 images, or None when
    there are none (images that did not come from 8-bit pixels).

    The inverse is rounded to the nearest integer and then checked by normalising it again, so a
    caller that sends the pixels instead of the floats changes no score, not even in the last bit."""
    restored = np.rint((images * _STD + _MEAN) * np.float32(255))
    if restored.min(initial=0) < 0 or restored.max(initial=0) > 255:
        return None
    pixels = restored.astype(np.uint8)
    return pixels if np.array_equal(normalize_pixels(pixels), images) else None


# Spec §6 robustness perturbations, applied by `d3 eval` to the RGB image before preprocess_image,
# in the authors' order (blur, then JPEG) and with their arithmetic.
def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """scipy's gaussian_filter per channel, in place on the uint8 array, as the authors do it."""
    from scipy.ndimage import gaussian_filter

    array = np.array(img.convert("RGB"))
    for channel in range(3):
        gaussian_filter(array[:, :, channel], output=array[:, :, channel], sigma=sigma)
    return Image.fromarray(array)


def jpeg_reencode(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG with Pillow at `quality` and decode again."""
    import io

    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return Image.fromarray(np.array(decoded))
