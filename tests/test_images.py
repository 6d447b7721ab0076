import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from agecore.config import MAX_PIXELS, MIN_SIDE, PrepareConfig, Preprocessing
from agecore.images import (
    ImageError,
    decode,
    load_image,
    normalize,
    open_image,
    read_bytes,
    resize_square,
)
from tests.conftest import jpeg_bytes, missing


def test_decode_reasons(tmp_path):
    good = jpeg_bytes((80, 80))
    cases = {
        b"": "empty_file",
        b"hello, not an image": "not_an_image",
        good[: len(good) // 2]: "truncated",
        jpeg_bytes((10, 10)): "too_small",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageError) as e:
            decode(data, min_side=32)
        assert e.value.reason == reason
    with pytest.raises(ImageError) as e:
        decode(jpeg_bytes((300, 300)), max_pixels=200 * 200)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(ImageError) as e:
        read_bytes(str(tmp_path / "nope.jpg"))
    assert e.value.reason == "missing_file"


def test_modes_become_rgb():
    for mode in ("L", "RGBA", "CMYK", "P"):
        fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
        img = decode(jpeg_bytes((40, 40), mode=mode, fmt=fmt, color=(10, 20, 30, 0)[: len(mode)] if mode != "P" else 3))
        assert img.mode == "RGB" and img.size == (40, 40)


def test_transparent_png_is_composited_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(buf, "PNG")
    assert np.asarray(decode(buf.getvalue())).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert decode(buf.getvalue()).size == (40, 60)


def test_resize_square_centre_crops_without_distortion():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))  # white centre square
    out = resize_square(img, 50)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8
    assert out[5:-5, 5:-5].min() > 240  # the crop is the white centre


def test_load_image_is_deterministic():
    data = jpeg_bytes((90, 120))
    assert np.array_equal(load_image(data, 64), load_image(data, 64))


def test_every_source_gives_the_same_pixels(tmp_path):
    data = jpeg_bytes((90, 120))
    path = tmp_path / "face.jpg"
    path.write_bytes(data)
    photo = decode(data)
    expected = resize_square(photo, 64, "bilinear")
    for source in (path, str(path), data, photo, np.asarray(photo)):
        assert open_image(source).size == (90, 120)
        assert np.array_equal(load_image(source, 64, "bilinear"), expected)
    square = np.zeros((64, 64, 3), np.uint8)
    assert load_image(square, 64) is square  # a model input already: returned as it is


def test_open_image_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "nope.jpg")
    assert e.value.reason == "missing_file"
    with pytest.raises(ImageError) as e:
        open_image(jpeg_bytes((MIN_SIDE - 1, 80)))
    assert e.value.reason == "too_small"
    with pytest.raises(ImageError) as e:
        load_image(jpeg_bytes((300, 300)), 64, max_pixels=200 * 200)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(ImageError) as e:
        open_image(np.zeros((8, 8), np.uint8))
    assert e.value.reason == "bad_array"
    with pytest.raises(TypeError, match="cannot read an image from int"):
        open_image(3)


def test_the_pixel_limits_are_stated_once():
    cfg = PrepareConfig(data="d", out="o")
    assert (cfg.min_side, cfg.max_pixels) == (MIN_SIDE, MAX_PIXELS) == (32, 40_000_000)


def test_normalize_matches_mean_std_and_resizes():
    prep = Preprocessing(input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    batch = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    x = normalize(batch, prep)
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.5, 3.0, 3.5]))
    assert normalize(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), prep).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG", "HEIF"])
def test_phone_and_web_formats_open_with_the_same_pixels(fmt):
    """PNG, WebP, JPEG and a phone's HEIC (pillow-heif, the heic extra) decode to the photo's own size."""
    if fmt == "HEIF" and importlib.util.find_spec("pillow_heif") is None:
        missing('pillow-heif is not installed: pip install "agecore[heic]" (scripts/setup.sh does)')
    gradient = np.broadcast_to(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (64, 96, 3)).copy()
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 95}))
    decoded = np.asarray(decode(buf.getvalue()))
    assert decoded.shape == (64, 96, 3)
    assert np.abs(decoded.astype(int) - gradient).mean() < (0.5 if fmt in ("PNG", "WEBP") else 4.0)


def test_a_heic_photo_without_pillow_heif_is_refused_by_name(monkeypatch):
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(ImageError) as e:
        decode(heic)
    # with pillow-heif the broken stream is undecodable; without it, PIL does not know the format at all
    assert e.value.reason in ("undecodable", "unsupported_format")
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(UnidentifiedImageError("unknown")))
    with pytest.raises(ImageError, match="HEIC/HEIF photo, which needs pillow-heif") as e:
        decode(heic)
    assert e.value.reason == "unsupported_format"
