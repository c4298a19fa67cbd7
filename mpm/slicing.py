"""MiniCPM-V adaptive high-resolution slicing (arXiv 2408.01800; finetune/dataset.py::slice_image).

An image of W x H pixels becomes an overview (the whole image at about S^2 pixels) plus, when it is larger than
S^2, a grid of m columns x n rows of slices, each resized to about S^2 pixels with sides divisible by the patch
size (S = `scale_resolution`, 448 by default: the ViT's pretraining size). The grid is chosen among the factor
pairs of multiple-1, multiple and multiple+1 slices, where multiple = min(ceil(W*H / S^2), max_slices), as the one
whose slice shape is closest to square: argmin |log(W/H) - log(m/n)|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


def ensure_divide(length: float, divisor: int) -> int:
    """Round to a multiple of `divisor`, at least `divisor`."""
    return max(round(length / divisor) * divisor, divisor)


def best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """(width, height) of about scale_resolution^2 pixels with the same aspect, sides divisible by the patch size.
    Smaller images keep their size (rounded to the patch size) unless `allow_upscale`."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def best_grid(width: int, height: int, scale_resolution: int = 448, max_slices: int = 9) -> tuple[int, int] | None:
    """(columns, rows) of slices for a W x H image, or None when it is small enough to need no slicing."""
    multiple = min(math.ceil(width * height / scale_resolution**2), max_slices)
    if multiple <= 1:
        return None
    candidates = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slices]
    grids = [(m, n // m) for n in candidates for m in range(1, n + 1) if n % m == 0]
    log_aspect = math.log(width / height)
    return min(grids, key=lambda g: abs(log_aspect - math.log(g[0] / g[1])))  # first of equals wins, as MiniCPM-V


def refine_size(
    width: int, height: int, grid: tuple[int, int], scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """Size to resize the whole image to before cutting it into the grid: every slice about S^2, patch-divisible."""
    columns, rows = grid
    slice_w = ensure_divide(width, columns) / columns
    slice_h = ensure_divide(height, rows) / rows
    best_w, best_h = best_resize((slice_w, slice_h), scale_resolution, patch_size, allow_upscale=True)
    return best_w * columns, best_h * rows


@dataclass
class SlicedImage:
    overview: Image.Image
    slices: list[list[Image.Image]]  # rows of slices, row-major; empty when not sliced
    grid: tuple[int, int] | None  # (columns, rows)


def slice_image(
    image: Image.Image, scale_resolution: int = 448, max_slices: int = 9, patch_size: int = 14
) -> SlicedImage:
    width, height = image.size
    grid = best_grid(width, height, scale_resolution, max_slices)
    if grid is None:
        size = best_resize((width, height), scale_resolution, patch_size, allow_upscale=True)
        return SlicedImage(image.resize(size, Image.Resampling.BICUBIC), [], None)
    overview = image.resize(best_resize((width, height), scale_resolution, patch_size), Image.Resampling.BICUBIC)
    refined = image.resize(refine_size(width, height, grid, scale_resolution, patch_size), Image.Resampling.BICUBIC)
    columns, rows = grid
    slice_w, slice_h = refined.width // columns, refined.height // rows
    slices = [
        [refined.crop((c * slice_w, r * slice_h, (c + 1) * slice_w, (r + 1) * slice_h)) for c in range(columns)]
        for r in range(rows)
    ]
    return SlicedImage(overview, slices, grid)
