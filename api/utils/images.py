"""Decoding untrusted image bytes: format from the content, bounded pixels, one frame, no metadata."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from api.exceptions import PayloadTooLarge, UnprocessableMedia, UnsupportedMediaType

# Pillow's format names, read from the bytes. Restricting `Image.open(formats=...)` to these means
# Pillow never even tries other plugins: no EPS (Ghostscript), no SVG, nothing exotic.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# A truncated file is an error, never a silently grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # first frame, pixels loaded
    format: str
    width: int
    height: int


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
        raise UnsupportedMediaType(
            "not a supported image: the content must be JPEG, PNG, WebP, BMP, GIF or TIFF") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.UnidentifiedImageError) as exc:
        raise UnprocessableMedia(f"image data is truncated or corrupt ({fmt_error(exc)})") from None
    image.info.clear()  # metadata is never used
    return DecodedImage(image=image, format=fmt, width=width, height=height)


def fmt_error(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text[:200]
