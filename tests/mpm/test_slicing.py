import math

import pytest
from PIL import Image

from mpm.slicing import best_grid, best_resize, slice_image


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((448, 448), None),  # no slicing
        ((300, 200), None),
        ((1344, 1344), (3, 3)),
        ((2000, 500), (4, 1)),  # a wide grid
        ((500, 2000), (1, 4)),
        ((896, 448), (2, 1)),
        ((1000, 800), (2, 2)),
        ((4000, 3000), (3, 3)),  # capped at 9 slices
        ((1920, 1080), (4, 2)),  # 9 slices at most: 8 as 4x2 is the closest to 16:9
    ],
)
def test_grid_choice(size, grid):
    assert best_grid(*size) == grid


def test_grid_is_the_formula():
    """multiple = min(ceil(WH/S^2), max); candidates multiple-1..multiple+1 except 1; argmin |log(W/H) - log(m/n)|."""
    for width in range(200, 3000, 173):
        for height in range(200, 3000, 211):
            multiple = min(math.ceil(width * height / 448**2), 9)
            grid = best_grid(width, height)
            if multiple <= 1:
                assert grid is None
                continue
            counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= 9]
            options = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
            best = min(abs(math.log(width / height) - math.log(m / n)) for m, n in options)
            assert grid[0] * grid[1] in counts
            assert abs(math.log(width / height) - math.log(grid[0] / grid[1])) == pytest.approx(best)


def test_slices_are_patch_divisible_about_s_squared_and_row_major():
    image = Image.new("RGB", (1000, 800))
    for x in range(1000):
        image.putpixel((x, 0), (x % 256, 0, 0))
    sliced = slice_image(image, scale_resolution=448, max_slices=9, patch_size=14)
    assert sliced.grid == (2, 2) and len(sliced.slices) == 2 and all(len(row) == 2 for row in sliced.slices)
    for piece in [sliced.overview] + [p for row in sliced.slices for p in row]:
        assert piece.width % 14 == 0 and piece.height % 14 == 0
        assert 0.8 < piece.width * piece.height / 448**2 < 1.2
    small = slice_image(Image.new("RGB", (100, 50)), 448, 9, 14)
    assert small.slices == [] and small.grid is None and small.overview.width % 14 == 0  # upscaled to ~448^2
    assert best_resize((100, 50), 448, 14) == (98, 56)  # without upscaling: only rounded to the patch size
