"""Batched training augmentation on the device the model runs on.

* ``augment``: random resized crop, horizontal flip, small rotation and brightness/contrast jitter;
  one affine resampling of the whole batch (``grid_sample``), so a GPU runs it in a few kernels.
* ``degrade``: what real photos do to a face: greyscale, sepia or a colour cast, blur, a
  low-resolution copy scaled back up, sensor noise and JPEG re-compression, drawn per image.

Both take a uint8 or float NHWC batch in [0, 255] and return float NHWC in [0, 255] (``normalize``
takes either), on the batch's device, with the randomness drawn from ``generator`` on the CPU, so a
seeded run draws the same augmentation on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from agecore.config import TrainConfig

LUMA = torch.tensor([0.299, 0.587, 0.114])
SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])

# How a degraded face is drawn: each family with this probability, independently (a face that draws
# none gets one of them at random). The ranges span what scanned prints, old phones and messaging
# apps do; ``benchmarks/robustness.py`` measures the model against the middle of each range.
COLOUR_P = 0.5  # then grey, sepia or a cast in proportions 2 : 1 : 1
BLUR_P, BLUR_SIGMA = 0.35, (0.5, 3.0)
LOW_RES_P, LOW_RES_SCALE = 0.35, (0.1, 0.5)  # side of the low-resolution copy / image side
NOISE_P, NOISE_SIGMA = 0.35, (2.0, 16.0)
JPEG_P, JPEG_QUALITY = 0.35, (8, 60)
CAST = 0.15  # a colour cast scales each channel by up to this much either way


def view_recipe(cfg: TrainConfig) -> dict[str, object]:
    """What a degraded view drawn with ``cfg`` depends on: a feature cache's key includes it."""
    return {"random_crop_scale": cfg.random_crop_scale, "flip": cfg.flip, "rotate_degrees": cfg.rotate_degrees,
            "color_jitter": cfg.color_jitter, "colour": COLOUR_P, "cast": CAST, "blur": (BLUR_P, BLUR_SIGMA),
            "low_res": (LOW_RES_P, LOW_RES_SCALE), "noise": (NOISE_P, NOISE_SIGMA), "jpeg": (JPEG_P, JPEG_QUALITY)}


def augment(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop, flip, rotation and brightness/contrast jitter, drawn per image.

    The crop keeps the image's aspect ratio and covers ``random_crop_scale`` of its area; the
    rotation is up to ``rotate_degrees`` either way (the error of a face detector's landmarks).

    >>> cfg = TrainConfig(random_crop_scale=(1.0, 1.0), flip=False, rotate_degrees=0.0, color_jitter=0.0)
    >>> x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    >>> torch.allclose(augment(x, cfg, torch.Generator()), x.float(), atol=1e-3)
    True
    """
    n, h, w, _ = images.shape
    r = torch.rand(n, 7, generator=generator).to(images.device)
    x = images.permute(0, 3, 1, 2).float()
    lo, hi = cfg.random_crop_scale
    if (lo, hi) != (1.0, 1.0) or cfg.flip or cfg.rotate_degrees > 0:
        side = torch.sqrt(lo + (hi - lo) * r[:, 0])  # crop side / image side
        mirror = torch.where(r[:, 3] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones_like(side)
        angle = math.radians(cfg.rotate_degrees) * (2 * r[:, 6] - 1)
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        theta = torch.zeros(n, 2, 3, device=images.device)  # output -> input coordinates in [-1, 1]
        theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
        theta[:, 0, 2] = (2 * r[:, 2] - 1) * (1 - side)  # crop centre: anywhere the crop stays inside
        theta[:, 1, 2] = (2 * r[:, 1] - 1) * (1 - side)
        grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        brightness = (1 + j * (2 * r[:, 4] - 1)).view(n, 1, 1, 1)
        contrast = (1 + j * (2 * r[:, 5] - 1)).view(n, 1, 1, 1)
        x = (x * brightness).clamp_(0, 255)
        grey = torch.einsum("nchw,c->nhw", x, LUMA.to(x.device)).mean((1, 2)).view(n, 1, 1, 1)
        x = ((x - grey) * contrast + grey).clamp_(0, 255)
    return x.permute(0, 2, 3, 1)


def degrade_some(images: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """``degrade`` a random ``share`` of the batch; the rest passes through (as float).

    >>> x = torch.full((4, 16, 16, 3), 128, dtype=torch.uint8)
    >>> torch.equal(degrade_some(x, 0.0, torch.Generator()), x.float())
    True
    """
    x = images.float()
    pick = (torch.rand(len(x), generator=generator) < share).nonzero().flatten().to(x.device)
    if len(pick):
        x = x.index_put((pick,), degrade(x[pick], generator))
    return x


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image through one or more real-photo degradations, chosen and sized per image.

    In the order a photo meets them: colour (grey, sepia or a cast), blur, low resolution, noise,
    JPEG re-compression.

    >>> x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    >>> y = degrade(x, torch.Generator().manual_seed(0))
    >>> y.shape, y.dtype, bool((y - x.float()).abs().mean() > 1)
    (torch.Size([3, 32, 32, 3]), torch.float32, True)
    """
    n = len(images)
    if n == 0:
        return images.float()
    draw = torch.rand(n, 5, generator=generator) < torch.tensor([COLOUR_P, BLUR_P, LOW_RES_P, NOISE_P, JPEG_P])
    none = ~draw.any(1)
    draw[none, torch.randint(0, 5, (int(none.sum()),), generator=generator)] = True
    x = images.permute(0, 3, 1, 2).to(torch.float32, copy=True)
    steps = (_colour, _blur, _low_res, _noise, _jpeg)
    for family, step in enumerate(steps):
        idx = draw[:, family].nonzero().flatten()
        if len(idx):
            on = idx.to(x.device)
            x[on] = step(x[on], generator).clamp_(0, 255)
    return x.permute(0, 2, 3, 1)


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _colour(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Grey (half of the faces), sepia or a colour cast (a quarter each): one 3x3 matrix per image."""
    n = len(x)
    kind = torch.rand(n, generator=generator)
    grey = LUMA.expand(3, 3)
    cast = torch.diag_embed(1 + CAST * (2 * torch.rand(n, 3, generator=generator) - 1))
    m = torch.where((kind < 0.5).view(n, 1, 1), grey, torch.where((kind < 0.75).view(n, 1, 1), SEPIA, cast))
    return torch.einsum("ndc,nchw->ndhw", m.to(x.device), x)


def _blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian blur of a sigma per image: one separable grouped convolution for the batch."""
    n, c, h, w = x.shape
    sigma = _uniform(n, BLUR_SIGMA, generator)
    radius = math.ceil(3 * BLUR_SIGMA[1])
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.device)  # (n*c, taps)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _low_res(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy at ``LOW_RES_SCALE`` of the size, scaled back up (bicubic both ways, as photo apps do)."""
    h, w = x.shape[-2:]
    scales = _uniform(len(x), LOW_RES_SCALE, generator).tolist()
    out = [F.interpolate(F.interpolate(img[None], size=(max(4, round(h * s)), max(4, round(w * s))), mode="bicubic",
                                       antialias=True, align_corners=False),
                         size=(h, w), mode="bicubic", align_corners=False)[0] for img, s in zip(x, scales, strict=True)]
    return torch.stack(out)


def _noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma = _uniform(len(x), NOISE_SIGMA, generator).view(-1, 1, 1, 1)
    return x + sigma.to(x.device) * torch.randn(x.shape, generator=generator).to(x.device)


def _jpeg(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """JPEG re-compression at a quality per image (torchvision's codec, on the GPU where the batch is)."""
    quality = _uniform(len(x), JPEG_QUALITY, generator).round().int().tolist()
    u8 = x.clamp(0, 255).round().to(torch.uint8)
    encoded = [encode_jpeg(img, quality=q) for img, q in zip(u8, quality, strict=True)]
    return torch.stack(decode_jpeg(encoded, device=x.device)).float()
