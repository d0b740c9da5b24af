"""Decoding untrusted image bytes: format from the content, bounded pixels, one frame, no metadata.

The one image policy of the service and of the `d3 predict` / `d3 eval` commands: the same
formats, the same limits, the same pixels. Two things a user may not expect are said in `notes`:
- EXIF orientation is ignored, as in the authors' evaluation: the model sees the pixels as stored
  (a phone photo tagged "rotate 90°" is scored lying on its side). Scores match the authors'.
- More than 8 bits per sample (16-bit greyscale PNG/TIFF, 32-bit integer TIFF) is scaled down to
  8 bits first: Pillow's convert("RGB") would clip every value above 255 to white.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError, features

from api.exceptions import PayloadTooLarge, UnprocessableMedia, UnsupportedMediaType

# Pillow's format names, read from the bytes. Restricting `Image.open(formats=...)` to these means
# Pillow never even tries other plugins: no EPS (Ghostscript), no SVG, nothing exotic.
# AVIF needs Pillow's AVIF plugin (in its wheels since 11.2; requirements.txt asks for one).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF") + (("AVIF",) if features.check("avif") else ())
FORMAT_NAMES = ", ".join({"WEBP": "WebP"}.get(name, name) for name in ALLOWED_FORMATS)
EXIF_ORIENTATION = 0x0112
_ROTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "mirrored and rotated 90°", 6: "rotated 90°",
              7: "mirrored and rotated 270°", 8: "rotated 270°"}

# A truncated file is an error, never a silently grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # first frame, pixels loaded
    format: str
    width: int
    height: int
    notes: tuple[str, ...] = ()  # what the service did that the sender may not expect


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode one image or raise 415 (not an allowed image), 413 (too many pixels), 422 (corrupt)."""
    if not data:
        raise UnprocessableMedia("the file is empty")
    # Pillow's own bomb guard raises at 2x MAX_IMAGE_PIXELS; warnings become errors below, so the
    # guard fires at the configured limit itself. Our explicit check comes first for a clear message.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
            if width < 1 or height < 1:
                raise UnprocessableMedia("image has no pixels")
            fmt = image.format or "unknown"
            # Animated GIF/WebP/TIFF: Image.open stands on the first frame and load() reads only
            # that one. Never count frames: n_frames walks every frame, and a 20 MB GIF can
            # hold a million of them (seconds of CPU per request).
            image.load()
    except (PayloadTooLarge, UnprocessableMedia):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image exceeds the pixel limit of {max_pixels}: {exc}") from None
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"not a supported image: the content must be {FORMAT_NAMES}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.UnidentifiedImageError) as exc:
        raise UnprocessableMedia(f"image data is truncated or corrupt ({fmt_error(exc)})") from None
    notes = []
    orientation = _orientation(image)
    if orientation in _ROTATIONS:
        notes.append(f"EXIF orientation ignored: the file asks to be shown {_ROTATIONS[orientation]}; the model "
                     "saw the pixels as stored, as the authors' evaluation does")
    image.info.clear()  # metadata is never used
    deep = to_8_bit(image)
    if deep is not image:
        notes.append(f"{image.mode} image ({_bits(image.mode)} bits per sample) scaled to 8 bits before the "
                     "model; converting it directly would clip it to white")
    return DecodedImage(image=deep, format=fmt, width=width, height=height, notes=tuple(notes))


def _orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a damaged EXIF block is ignored like the rest of the metadata
        return None
    return value if isinstance(value, int) else None


def _bits(mode: str) -> int:
    return 32 if mode == "I" else 16


def to_8_bit(image: Image.Image) -> Image.Image:
    """An 8-bit greyscale copy of a 16- or 32-bit integer greyscale image (the high byte); others as they are.

    Pillow's convert("RGB") maps these modes by clipping at 255: a 16-bit PNG would turn white.
    """
    if image.mode.startswith("I;16"):
        samples = np.asarray(image).astype(np.uint16)
        return Image.fromarray((samples >> 8).astype(np.uint8), "L")
    if image.mode == "I":  # 32-bit signed; PNG/TIFF put 16-bit data here too: scale by what is used
        samples = np.asarray(image).astype(np.int64).clip(0, None)
        peak = samples.max(initial=0)
        shift = 0 if peak <= 0xFF else 8 if peak <= 0xFFFF else 24
        return Image.fromarray((samples >> shift).clip(0, 255).astype(np.uint8), "L")
    return image


def fmt_error(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text[:200]
