"""Images as every reader sees them: upright, RGB, transparency on white; huge files refused."""

import numpy as np
import pytest
from PIL import Image

from mpm.core.images import open_image


def test_images_are_seen_upright_in_rgb_as_in_the_shards(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent: white, as the sharder makes it
    assert open_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    phone = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = phone.getexif()
    exif[0x0112] = 6  # stored sideways, shown rotated by 90 degrees
    phone.save(tmp_path / "phone.jpg", exif=exif)
    assert open_image(tmp_path / "phone.jpg").size == (20, 40)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype="uint16"))  # 16-bit white
    assert open_image(deep).getpixel((0, 0)) == (255, 255, 255)


def test_a_huge_image_is_a_clear_error_not_a_crash(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is over twice the limit: Pillow refuses
    with pytest.raises(ValueError, match="big.png' cannot be read: Image size"):
        open_image(tmp_path / "big.png")
