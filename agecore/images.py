"""Decode and preprocess images: the one path that prepare, training, scoring and serving share.

* ``open_image``: a path or URI, encoded bytes, a PIL image or an HxWx3 ``uint8`` array -> RGB
  PIL image. Files and bytes go through ``decode``: the pixel limits ``MIN_SIDE`` and
  ``MAX_PIXELS``, EXIF orientation applied, alpha composited on white. Face detection reads this
  whole photo.
* ``load_image``: the same sources -> square ``uint8`` array of the model's input size (shorter
  side resized, centre crop). Prepare stores exactly this array; evaluation, scoring and serving
  call it on every image.
* ``normalize``: a ``uint8`` NHWC batch -> a float NCHW batch with the backbone's mean/std.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from agecore import storage
from agecore.config import MAX_PIXELS, MIN_SIDE

try:  # phones' HEIC/HEIF photos: the `heic` extra (pillow-heif) teaches PIL to open them
    from pillow_heif import register_heif_opener
except ImportError:
    HEIF = False
else:
    register_heif_opener()
    HEIF = True

if TYPE_CHECKING:
    import torch

    from agecore.config import Preprocessing

ImageLike = str | Path | bytes | Image.Image | np.ndarray

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".heic", ".heif")
# the ISO base media brands of HEIC/HEIF stills, as bytes 8-12 of the file ("ftyp" at 4-8)
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")

_RESAMPLE = {  # PIL's filter for each of config.INTERPOLATIONS
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short code that reports count by."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_bytes(path: str) -> bytes:
    """Read a local path or any URI pyarrow opens (``s3://``, ``gs://``, ``hdfs://``, ``file://``)."""
    try:
        if storage.is_remote(path):
            fs, inner = storage.filesystem(path)
            with fs.open_input_stream(inner) as f:
                return f.read()
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise ImageError("missing_file", f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise ImageError("missing_file", f"{path}: is a directory") from e
    except OSError as e:
        if "not found" in str(e).lower() or "no such file" in str(e).lower():
            raise ImageError("missing_file", f"{path}: {e}") from e
        raise ImageError("unreadable", f"{path}: {e}") from e


def decode(data: bytes, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> Image.Image:
    """Bytes -> RGB image, refusing what a model cannot use.

    >>> buf = io.BytesIO(); Image.new("RGBA", (40, 50)).save(buf, "PNG")
    >>> decode(buf.getvalue()).mode, decode(buf.getvalue()).size
    ('RGB', (40, 50))
    >>> decode(b"")
    Traceback (most recent call last):
    ...
    agecore.images.ImageError: empty_file: zero bytes
    """
    if not data:
        raise ImageError("empty_file", "zero bytes")
    try:
        # PIL's own bomb guard warns or raises at its own limit; ours is explicit and checked first.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
            raise ImageError("unsupported_format", "a HEIC/HEIF photo, which needs pillow-heif: "
                                                   'pip install "agecore[heic]" (or pillow-heif)') from e
        raise ImageError("not_an_image", "not a recognised image format") from e
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except OSError as e:
        raise ImageError("truncated" if "truncated" in str(e).lower() else "undecodable", str(e)) from e
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{width}x{height} is over the limit of {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "undecodable"
        raise ImageError(reason, str(e)) from e
    except Exception as e:  # PIL plugins raise assorted errors on corrupt streams
        raise ImageError("undecodable", f"{type(e).__name__}: {e}") from e
    img = to_rgb(ImageOps.exif_transpose(img))
    if min(img.size) < min_side:
        raise ImageError("too_small", f"{img.size[0]}x{img.size[1]} is under the minimum side of {min_side}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white rather than whatever colour they hid."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_square(img: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop to a square ``uint8`` HWC array.

    >>> resize_square(Image.new("RGB", (300, 200)), 64).shape
    (64, 64, 3)
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[interpolation])
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def open_image(source: ImageLike, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> Image.Image:
    """The one way in: a path or URI, encoded bytes, a PIL image or an HxWx3 ``uint8`` array -> RGB image.

    Paths and bytes are read and validated by ``decode``; an image already in memory is made RGB
    and taken as it is.

    >>> buf = io.BytesIO(); Image.new("L", (40, 50)).save(buf, "PNG")
    >>> open_image(buf.getvalue()).mode, open_image(np.zeros((8, 8, 3), np.uint8)).size
    ('RGB', (8, 8))
    """
    if isinstance(source, (str, Path)):
        return decode(read_bytes(str(source)), max_pixels=max_pixels, min_side=min_side)
    if isinstance(source, bytes):
        return decode(source, max_pixels=max_pixels, min_side=min_side)
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ImageError("bad_array", f"need an HxWx3 uint8 array, got {source.shape} {source.dtype}")
        return Image.fromarray(source)
    if isinstance(source, Image.Image):
        return to_rgb(source)
    raise TypeError(f"cannot read an image from {type(source).__name__}: give a path, bytes, a PIL image or an array")


def load_image(
    source: ImageLike,
    size: int,
    interpolation: str = "bicubic",
    *,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """Any ``open_image`` source -> the preprocessed square ``uint8`` array that every stage feeds the model.

    >>> load_image(Image.new("RGB", (300, 200)), 64, "bilinear").shape
    (64, 64, 3)
    """
    if isinstance(source, np.ndarray) and source.shape == (size, size, 3) and source.dtype == np.uint8:
        return source  # already a model input
    return resize_square(open_image(source, max_pixels=max_pixels, min_side=min_side), size, interpolation)


def content_digest(img: Image.Image) -> str:
    """A digest of the decoded pixels: equal for the same picture saved twice."""
    return hashlib.sha1(img.tobytes() + repr(img.size).encode()).hexdigest()


def normalize(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """``uint8`` NHWC (or float in [0, 255]) -> normalised float NCHW in channels_last memory.

    >>> import torch
    >>> from agecore.config import Preprocessing
    >>> prep = Preprocessing(input_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    >>> x = normalize(torch.full((1, 16, 16, 3), 255, dtype=torch.uint8), prep)
    >>> tuple(x.shape), x.min().item(), x.max().item()
    ((1, 3, 16, 16), 1.0, 1.0)
    """
    import torch  # here, not at the top: agecore.config reads the pixel limits above without loading torch

    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(prep.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[-1] != prep.input_size or x.shape[-2] != prep.input_size:
        x = torch.nn.functional.interpolate(
            x, size=(prep.input_size, prep.input_size), mode="bilinear", antialias=True, align_corners=False
        )
    return x.contiguous(memory_format=torch.channels_last)
