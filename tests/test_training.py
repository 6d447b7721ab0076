"""Training pieces without Ray: the batched augmentation and the epoch sums."""

import torch

from agecore.config import Preprocessing, TrainConfig
from agecore.images import normalize
from agecore.training import augment

IMAGES = torch.randint(0, 256, (16, 48, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_augment_without_crop_flip_or_jitter_is_the_identity():
    cfg = TrainConfig(random_crop_scale=(1.0, 1.0), flip=False, color_jitter=0.0)
    out = augment(IMAGES, cfg, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == IMAGES.shape
    assert torch.equal(out, IMAGES.float())


def test_flip_mirrors_about_half_the_images_exactly():
    cfg = TrainConfig(random_crop_scale=(1.0, 1.0), flip=True, color_jitter=0.0)
    out = augment(IMAGES, cfg, torch.Generator().manual_seed(1))
    same = [(out[i] - IMAGES[i].float()).abs().max() < 0.05 for i in range(len(IMAGES))]
    mirrored = [(out[i] - IMAGES[i].flip(1).float()).abs().max() < 0.05 for i in range(len(IMAGES))]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 3 <= sum(mirrored) <= 13


def test_crop_zooms_in_and_jitter_stays_in_range():
    # a left-to-right ramp: a crop of 25% of the area spans about half the ramp's range
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 64, 1).expand(8, 64, 64, 3).contiguous()
    cfg = TrainConfig(random_crop_scale=(0.25, 0.25), flip=False, color_jitter=0.0)
    out = augment(ramp, cfg, torch.Generator().manual_seed(0))
    spans = out[..., 0].amax((1, 2)) - out[..., 0].amin((1, 2))
    assert ((spans > 110) & (spans < 145)).all(), spans
    jittered = augment(IMAGES, TrainConfig(color_jitter=0.4), torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 255 and not torch.equal(jittered, IMAGES.float())
    # normalize takes the float batch as it takes uint8 ones
    x = normalize(jittered, Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    assert x.shape == (16, 3, 32, 32) and torch.isfinite(x).all()
