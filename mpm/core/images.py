"""Opening images the one way every reader in the project sees them: the sharder, the trainers' shard reader,
the processor, text-to-image, evaluation and the demo.

    upright (EXIF orientation applied)  ->  RGB (CMYK, palette, LA/RGBA composited on white, 16-bit scaled)

and never more pixels than `max_pixels` (a decompression-bomb guard checked from the header, before decoding).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from mpm.core.errors import DataError


class ImageError(DataError):
    """An image cannot be used: unreadable, truncated, too large, or a mode with no RGB meaning."""


class MissingImageError(ImageError, FileNotFoundError):
    """An image file does not exist."""


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any supported mode to RGB; transparency is composited on white. Raises ImageError."""
    if im.mode == "RGB":
        return im
    if im.mode in ("1", "L", "YCbCr", "CMYK", "RGBX"):
        return im.convert("RGB")
    if im.mode.startswith("I"):  # 16-bit (I;16, I;16B, ...) or 32-bit integer holding 16-bit samples (PNG)
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageError(f"unsupported image mode {im.mode} with values outside 0..65535")
        arr8 = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 16 -> 8 bits, rounded
        return Image.fromarray(arr8, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return im
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        background.alpha_composite(im)
        return background.convert("RGB")
    raise ImageError(f"unsupported image mode {im.mode}")


def upright_rgb(im: Image.Image) -> Image.Image:
    """An opened image with its EXIF orientation applied, then `to_rgb`. Raises ImageError."""
    return to_rgb(ImageOps.exif_transpose(im))


def open_image(image: Image.Image | str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """A path or PIL image as the models see it: upright, RGB, transparency on white (as in the shards).

    Args:
        image: a file path or an already opened PIL image.
        max_pixels: refuse images with more pixels (read from the header, before decoding); default Pillow's
            `Image.MAX_IMAGE_PIXELS` (about 89M).
    Raises:
        MissingImageError (a FileNotFoundError) or ImageError, naming the file.
    """
    if isinstance(image, Image.Image):
        return upright_rgb(image)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(image) as im:
            if limit and im.width * im.height > limit:
                raise ImageError(
                    f"image {str(image)!r} cannot be read: Image size ({im.width * im.height} pixels) exceeds the "
                    f"limit of {limit} pixels (a decompression-bomb guard)"
                )
            return upright_rgb(im)
    except FileNotFoundError:
        raise MissingImageError(f"image {str(image)!r} does not exist") from None
    except ImageError as exc:
        if str(image) in str(exc):
            raise
        raise ImageError(f"image {str(image)!r} cannot be read: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"image {str(image)!r} cannot be read: {exc}") from None
