import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dataproc.sharder.config import ShardConfig
from dataproc.sharder.filters import Rejected, build_filters
from dataproc.sharder.images import process_image, resized_size
from dataproc.synthetic import render_pair
from mpm.core.config import load_config
from tests.conftest import image_bytes


def config(**flags):
    base = {"resize.image_size": 32, "resize.resize_mode": "keep_ratio"}
    base.update({k.replace("__", "."): v for k, v in flags.items()})
    return load_config(ShardConfig, None, base)


def run(data, **flags):
    cfg = config(**flags)
    return process_image(data, cfg.resize, cfg.output, build_filters(cfg.filters))


def decoded(result) -> Image.Image:
    return Image.open(io.BytesIO(result.data))


def rejected(data, **flags) -> Rejected:
    with pytest.raises(Rejected) as info:
        run(data, **flags)
    return info.value


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("keep_ratio", (200, 100), (64, 32)),
        ("keep_ratio_largest", (200, 100), (32, 16)),
        ("center_crop", (200, 100), (32, 32)),
        ("border", (200, 100), (32, 32)),
        ("no", (200, 100), (200, 100)),
    ],
)
def test_resize_modes(mode, size, expected):
    result = run(image_bytes(size), resize__resize_mode=mode)
    assert (result.width, result.height) == expected == decoded(result).size
    assert (result.original_width, result.original_height) == size


def test_border_pads_with_black_and_center_crop_keeps_centre():
    im = Image.new("RGB", (200, 100), (255, 255, 255))
    im.paste((255, 0, 0), (80, 0, 120, 100))  # a red band in the middle
    buf = io.BytesIO()
    im.save(buf, "PNG")
    bordered = decoded(run(buf.getvalue(), resize__resize_mode="border", output__encode_format="png"))
    assert bordered.getpixel((16, 2)) == (0, 0, 0) and bordered.getpixel((2, 16))[0] > 200
    cropped = decoded(run(buf.getvalue(), resize__resize_mode="center_crop", output__encode_format="png"))
    assert cropped.getpixel((16, 16))[1] < 60  # red centre


def test_only_if_bigger_never_upscales():
    small = image_bytes((20, 10))
    assert run(small, resize__resize_mode="keep_ratio").height == 32
    kept = run(small, resize__resize_mode="keep_ratio", resize__resize_only_if_bigger=True)
    assert (kept.width, kept.height) == (20, 10)
    padded = run(small, resize__resize_mode="border", resize__resize_only_if_bigger=True)
    assert (padded.width, padded.height) == (32, 32)
    assert resized_size(20, 10, config(resize__resize_only_if_bigger=True).resize) is None


def test_reduced_scale_decoding_matches_full_decoding():
    """Image.draft must not change the output size and must keep it close to a full decode."""
    data = image_bytes((1600, 1200), noise=20, quality=95)
    cfg = config(resize__image_size=256)
    fast = process_image(data, cfg.resize, cfg.output)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((341, 256), Image.Resampling.BOX)
    ours = np.asarray(decoded(fast), np.float32)
    assert ours.shape == (256, 341, 3)
    assert np.abs(ours - np.asarray(full, np.float32)).mean() < 6  # noise of JPEG q95 + DCT scaling


def test_exif_orientation_applied():
    im = Image.new("RGB", (60, 30), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    result = run(buf.getvalue(), resize__resize_mode="no", output__encode_format="png")
    out = decoded(result)
    assert out.size == (30, 60) and (result.original_width, result.original_height) == (30, 60)
    assert out.getpixel((15, 5))[2] > 200  # the blue half is now on top


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P", "I;16", "LA", "RGBA", "YCbCr"])
def test_modes_become_rgb(mode):
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG", "I;16": "PNG", "LA": "PNG", "RGBA": "PNG"}.get(mode, "PNG")
    im = (
        Image.new("RGB", (40, 40), (10, 200, 30)).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (40, 40), 40000)
    )
    buf = io.BytesIO()
    im.save(buf, fmt)
    out = decoded(run(buf.getvalue(), output__encode_format="png"))
    assert out.mode == "RGB" and out.size == (32, 32)
    if mode == "I;16":
        assert out.getpixel((5, 5)) == (156, 156, 156)  # 40000 / 65535 * 255, not clipped to 255


def test_transparency_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))  # opaque blue left half
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = decoded(run(buf.getvalue(), resize__resize_mode="no", output__encode_format="png"))
    assert out.getpixel((30, 20)) == (255, 255, 255)
    assert out.getpixel((5, 20)) == (0, 0, 255)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=0)
    assert decoded(run(buf.getvalue(), resize__resize_mode="no", output__encode_format="png")).getpixel((3, 3)) == (
        255,
        255,
        255,
    )


def test_unsupported_mode_is_a_decode_failure():
    buf = io.BytesIO()
    Image.new("F", (40, 40), 0.5).save(buf, "TIFF")
    failure = rejected(buf.getvalue())
    assert failure.status == "failed_to_decode" and "unsupported image mode F" in failure.message


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = decoded(run(buf.getvalue(), resize__resize_mode="no", output__encode_format="png"))
    assert out.getpixel((20, 20)) == (255, 0, 0)


def test_truncated_zero_byte_and_html_payloads():
    data = image_bytes((300, 200), noise=30)
    assert rejected(data[: len(data) // 2]).message.startswith("corrupt or truncated image")
    assert rejected(b"").message == "empty file (0 bytes)"
    html = rejected(b"<!DOCTYPE html><html><body>404</body></html>")
    assert html.status == "failed_to_decode" and html.message == "not an image (HTML)"
    assert rejected(b"\x00\x01garbage" * 10).message == "not an image (90 bytes)"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be huge: the classic decompression-bomb header, no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_guard():
    failure = rejected(png_header_only(50_000, 50_000))
    assert failure.status == "failed_to_decode" and "decompression bomb guard" in failure.message
    small_limit = rejected(image_bytes((200, 200)), resize__max_image_pixels=10_000)
    assert "200x200 = 40000 pixels > resize.max_image_pixels 10000" in small_limit.message


def test_image_filters_use_the_original_size():
    assert rejected(image_bytes((40, 20)), filters__min_image_size=30).status == "filtered_image_size"
    assert rejected(image_bytes((300, 50)), filters__max_aspect_ratio=3.0).status == "filtered_aspect_ratio"
    assert rejected(image_bytes((300, 300)), filters__max_image_area=50_000).status == "filtered_image_area"
    assert run(image_bytes((300, 100)), filters__max_aspect_ratio=3.0).width == 96


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
def test_encode_formats(fmt):
    result = run(image_bytes((100, 80)), output__encode_format=fmt, output__encode_quality=80)
    assert decoded(result).format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]


def test_phash_is_stable_across_sizes_and_differs_for_different_images():
    def scene(seed, size):
        pair = render_pair(random.Random(seed), (800, 600), noise=0)
        buf = io.BytesIO()
        pair.image.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    a = run(scene(1, (800, 600))).phash
    b = run(scene(1, (400, 300))).phash
    c = run(scene(2, (800, 600))).phash
    assert isinstance(a, int) and 0 <= a < 2**64
    assert (a ^ b).bit_count() <= 4 < (a ^ c).bit_count()
