"""Decode, validate, convert, resize and encode one image with Pillow.

Order matters for speed and safety: the header is read first (size known without decoding), so the bomb guard
and the cheap size filters run before any pixel is decoded; JPEGs that will shrink are decoded at a reduced DCT
scale (`Image.draft`, 1/2, 1/4 or 1/8), which is most of this module's speed over a plain open-resize-save.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
from PIL import Image, ImageOps

from dataproc.sharder.config import OutputConfig, ResizeConfig
from dataproc.sharder.filters import Filter, Rejected, Sample, apply_filters
from mpm.core.images import ImageError, to_rgb

EXIF_ORIENTATION = 0x0112
SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
PIL_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
RESAMPLING = {
    "area": Image.Resampling.BOX,  # averages the covered source pixels: OpenCV's INTER_AREA when shrinking
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass
class ProcessedImage:
    data: bytes  # encoded output
    width: int
    height: int
    original_width: int  # as displayed, after EXIF orientation
    original_height: int
    phash: int  # 64-bit perceptual hash of the decoded source (see perceptual_hash)


def resized_size(width: int, height: int, cfg: ResizeConfig) -> tuple[int, int] | None:
    """Size after the scaling step of `cfg.resize_mode` (before padding or cropping); None = keep the size."""
    mode, size = cfg.resize_mode, cfg.image_size
    if mode == "no":
        return None
    if mode in ("keep_ratio", "center_crop"):
        scale = size / min(width, height)  # the short side becomes image_size
    else:  # keep_ratio_largest, border: the long side becomes image_size
        scale = size / max(width, height)
    if scale == 1 or (cfg.resize_only_if_bigger and scale > 1):
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def process_image(
    data: bytes,
    resize: ResizeConfig,
    output: OutputConfig,
    filters: Sequence[Filter] = (),
    sample: Sample | None = None,
) -> ProcessedImage:
    """Bytes in, encoded output out. Raises Rejected for every way a sample can fail or be filtered.

    Runs the "header" filters of `filters` on the original size before decoding and the "image" filters on the
    decoded RGB image before resizing, both on `sample` (the caption stage ran before the fetch).
    """
    sample = sample if sample is not None else Sample(caption=None)
    if not data:
        raise Rejected("failed_to_decode", "empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Rejected("failed_to_decode", f"decompression bomb guard: {exc}") from None
    except Image.UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "HTML" if head.startswith((b"<!doctype html", b"<html")) else f"{len(data)} bytes"
        raise Rejected("failed_to_decode", f"not an image ({kind})") from None

    stored_w, stored_h = im.size
    if stored_w * stored_h > resize.max_image_pixels:
        raise Rejected(
            "failed_to_decode",
            f"decompression bomb guard: {stored_w}x{stored_h} = {stored_w * stored_h} pixels > "
            f"resize.max_image_pixels {resize.max_image_pixels}",
        )
    orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    width, height = (stored_h, stored_w) if orientation in SWAPS_AXES else (stored_w, stored_h)
    sample.width, sample.height = width, height
    apply_filters(filters, "header", sample)

    target = resized_size(width, height, resize)
    if target is not None and im.format == "JPEG" and target[0] * target[1] < width * height:
        # Decode at the smallest DCT scale that still covers the target (in stored, pre-rotation axes).
        request = (target[1], target[0]) if orientation in SWAPS_AXES else target
        im.draft(im.mode, request)
    try:
        im.load()
    except OSError as exc:
        raise Rejected("failed_to_decode", f"corrupt or truncated image: {exc}") from None
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    try:
        im = to_rgb(im)
    except ImageError as exc:
        raise Rejected("failed_to_decode", str(exc)) from None
    sample.image = im  # filters only read it: the same object is resized below
    try:
        apply_filters(filters, "image", sample)
    finally:
        sample.image = None  # the worker keeps a shard's samples: never their decoded pixels
    phash = perceptual_hash(im)

    try:
        if target is not None:
            shrinking = target[0] * target[1] < im.width * im.height
            im = im.resize(
                target, RESAMPLING[resize.downscale_interpolation if shrinking else resize.upscale_interpolation]
            )
        im = _pad_or_crop(im, resize)
        buf = io.BytesIO()
        fmt = PIL_FORMATS[output.encode_format]
        options = {} if fmt == "PNG" else {"quality": output.encode_quality}
        im.save(buf, fmt, **options)
    except (OSError, ValueError) as exc:
        raise Rejected("failed_to_resize", f"{type(exc).__name__}: {exc}") from None
    return ProcessedImage(
        data=buf.getvalue(),
        width=im.width,
        height=im.height,
        original_width=width,
        original_height=height,
        phash=phash,
    )


def perceptual_hash(im: Image.Image) -> int:
    """64-bit pHash (imagehash) of the decoded source, so it does not depend on the output size or resize mode.

    The image is first shrunk by an integer factor to about 128 px on its short side (`Image.reduce`: a cheap box
    average); pHash itself looks at a 32x32 grey version.
    """
    factor = max(1, min(im.size) // 128)
    small = im.reduce(factor) if factor > 1 else im
    return int(str(imagehash.phash(small)), 16)


def _pad_or_crop(im: Image.Image, cfg: ResizeConfig) -> Image.Image:
    size = cfg.image_size
    if cfg.resize_mode == "border" and im.size != (size, size):
        # Pad to a square canvas (black, as img2dataset). The long side is already <= image_size: border mode
        # always scales it down to image_size, and only_if_bigger leaves small images small and centred.
        w, h = im.size
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(im, ((size - w) // 2, (size - h) // 2))
        return canvas
    if cfg.resize_mode == "center_crop":
        w, h = im.size
        cw, ch = min(w, size), min(h, size)
        left, top = (w - cw) // 2, (h - ch) // 2
        if (cw, ch) != (w, h):
            return im.crop((left, top, left + cw, top + ch))
    return im
