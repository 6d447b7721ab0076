"""Training pieces without Ray: the batched augmentation, the real-photo degradations, timm's optimiser
and schedule, and the views a training batch draws from a feature cache."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from agecore import augment as aug
from agecore.augment import augment, degrade, degrade_some
from agecore.checkpoint import TRAIN_STATE, load_train_state
from agecore.config import ModelConfig, Preprocessing, TrainConfig
from agecore.images import normalize
from agecore.model import create_model
from agecore.training import EarlyStopping, FeatureExtractor, Schedule, batch_inputs, make_optimizer

IMAGES = torch.randint(0, 256, (16, 48, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
STILL = {"random_crop_scale": (1.0, 1.0), "flip": False, "rotate_degrees": 0.0, "color_jitter": 0.0}
FAMILIES = ("COLOUR_P", "BLUR_P", "LOW_RES_P", "NOISE_P", "JPEG_P")


def test_augment_without_crop_flip_rotation_or_jitter_is_the_identity():
    out = augment(IMAGES, TrainConfig(**STILL), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == IMAGES.shape
    assert torch.allclose(out, IMAGES.float(), atol=1e-3)


def test_flip_mirrors_about_half_the_images_exactly():
    cfg = TrainConfig(**{**STILL, "flip": True})
    out = augment(IMAGES, cfg, torch.Generator().manual_seed(1))
    same = [(out[i] - IMAGES[i].float()).abs().max() < 0.05 for i in range(len(IMAGES))]
    mirrored = [(out[i] - IMAGES[i].flip(1).float()).abs().max() < 0.05 for i in range(len(IMAGES))]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 3 <= sum(mirrored) <= 13


def test_crop_zooms_in_and_jitter_stays_in_range():
    # a left-to-right ramp: a crop of 25% of the area spans about half the ramp's range
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 64, 1).expand(8, 64, 64, 3).contiguous()
    cfg = TrainConfig(**{**STILL, "random_crop_scale": (0.25, 0.25)})
    out = augment(ramp, cfg, torch.Generator().manual_seed(0))
    spans = out[..., 0].amax((1, 2)) - out[..., 0].amin((1, 2))
    assert ((spans > 110) & (spans < 145)).all(), spans
    jittered = augment(IMAGES, TrainConfig(color_jitter=0.4), torch.Generator().manual_seed(0))
    assert jittered.min() >= 0 and jittered.max() <= 255 and not torch.equal(jittered, IMAGES.float())
    # normalize takes the float batch as it takes uint8 ones
    x = normalize(jittered, Preprocessing(32, (0.5,) * 3, (0.5,) * 3))
    assert x.shape == (16, 3, 32, 32) and torch.isfinite(x).all()


def test_rotation_turns_a_bar_by_up_to_the_angle():
    bar = torch.zeros(1, 65, 65, 3, dtype=torch.uint8)
    bar[:, 30:35, :] = 255  # a horizontal bar through the centre
    cfg = TrainConfig(**{**STILL, "rotate_degrees": 20.0})
    out = augment(bar.expand(32, -1, -1, -1), cfg, torch.Generator().manual_seed(0))[..., 0]
    # the bar's row at the left and right edges: a turn of a degrees moves it by about tan(a) * 32 pixels
    rows = torch.arange(65.0).view(1, 65)
    left, right = [(out[:, :, c] * rows).sum(1) / out[:, :, c].sum(1) for c in (2, 62)]
    shift = (right - left) / 2  # per half width
    assert shift.abs().max() <= np.tan(np.radians(20)) * 30 + 1.5
    assert shift.abs().max() > 5 and (shift > 0).any() and (shift < 0).any()


def _only(monkeypatch, family: str) -> None:
    for name in FAMILIES:
        monkeypatch.setattr(aug, name, 1.0 if name == family else 0.0)


def _high_freq(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per image: falls as edges spread."""
    return (x[:, 1:] - x[:, :-1]).square().mean((1, 2, 3))


FACE = torch.from_numpy(np.kron(np.indices((8, 8)).sum(0) % 2 * 200 + 28, np.ones((8, 8)))).float()  # checkers
BATCH = FACE.view(1, 64, 64, 1).expand(12, -1, -1, 3).contiguous() * torch.tensor([1.0, 0.8, 0.5])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_degradation_does_what_it_says(monkeypatch, family):
    _only(monkeypatch, family)
    out = degrade(BATCH, torch.Generator().manual_seed(0))
    assert out.shape == BATCH.shape and out.min() >= 0 and out.max() <= 255
    assert not torch.equal(out, BATCH)
    if family == "COLOUR_P":  # grey for about half: three equal channels
        grey = (out[..., 0] - out[..., 2]).abs().amax((1, 2)) < 0.5
        assert 2 <= int(grey.sum()) <= 10
    elif family in ("BLUR_P", "LOW_RES_P"):  # detail lost in every image, by a different amount in each
        lost = _high_freq(out) / _high_freq(BATCH)
        assert (lost < 0.9).all() and lost.std() > 0.02, lost
    elif family == "NOISE_P":  # the flat squares get grain
        flat = out[:, 1:7, 1:7].std((1, 2, 3))
        assert (flat > 1).all()
    else:  # JPEG: whole values, and blocking around the edges
        assert torch.equal(out, out.round()) and ((out - BATCH).abs().mean((1, 2, 3)) > 0.5).all()


def test_degrade_some_spoils_about_the_share_asked_and_is_reproducible():
    spoilt = degrade_some(BATCH.repeat(10, 1, 1, 1), 0.3, torch.Generator().manual_seed(0))
    changed = ((spoilt - BATCH.repeat(10, 1, 1, 1)).abs().amax((1, 2, 3)) > 0).float().mean()
    assert 0.15 <= changed <= 0.45
    again = degrade_some(BATCH.repeat(10, 1, 1, 1), 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(spoilt, again)
    assert torch.equal(degrade_some(IMAGES, 0.0, torch.Generator()), IMAGES.float())


def test_timm_optimizer_leaves_norms_and_biases_undecayed():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    module(torch.zeros(1, 3, 8, 8))
    opt = make_optimizer(module, TrainConfig(weight_decay=0.05))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(module[0].weight)] == 0.05 and decay[id(module[3].weight)] == 0.05
    assert decay[id(module[0].bias)] == decay[id(module[1].weight)] == decay[id(module[3].bias)] == 0.0


def test_schedule_warms_up_decays_per_update_and_resumes():
    def fresh() -> Schedule:
        opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
        return Schedule(opt, TrainConfig(lr=0.1, epochs=4, warmup_epochs=1.0), steps_per_epoch=10)

    s = fresh()
    lrs = [s.lr] + [(s.step(), s.lr)[1] for _ in range(40)]
    warmup, decay = lrs[:10], lrs[10:]
    assert lrs[0] == pytest.approx(0.001) and lrs[-1] == pytest.approx(0.001)
    assert all(a < b for a, b in itertools.pairwise(warmup)) and all(a >= b for a, b in itertools.pairwise(decay))
    halfway = fresh()
    for _ in range(25):
        halfway.step()
    resumed = fresh()
    resumed.load_state_dict(halfway.state_dict())
    assert resumed.lr == pytest.approx(lrs[25]) and resumed.updates == 25


def _decisions(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    """Each epoch's improvement flag, up to and including the epoch that stops the run."""
    flags = []
    for v in values:
        flags.append(stopper.update(v))
        if stopper.should_stop:
            break
    return flags


def test_early_stopping_counts_a_slow_fall_against_the_last_improvement():
    # 0.019 an epoch misses min_delta 0.02 once, but two epochs' 0.038 counts (Keras, Lightning): never stops
    falling = [10.0 - 0.019 * i for i in range(20)]
    es = EarlyStopping(patience=2, min_delta=0.02)
    assert _decisions(es, falling) == [i % 2 == 0 for i in range(20)]
    assert not es.should_stop and es.best == falling[18] and es.best_epoch == 18


@pytest.mark.parametrize("patience", [1, 2, 4])
def test_early_stopping_on_a_flat_series_stops_after_patience_epochs(patience):
    es = EarlyStopping(patience=patience, min_delta=0.02)
    assert _decisions(es, [5.0] * 10) == [True] + [False] * patience
    assert es.bad_epochs == patience and es.best == 5.0 and es.best_epoch == 0


def test_early_stopping_resumed_from_a_checkpoint_decides_the_same(tmp_path):
    # a slow fall, a counted drop, then a plateau a little below the last improvement
    values = [10.0, 9.981, 9.962, 9.5, 9.49, 9.485, 9.49, 9.482, 9.481]
    reference = EarlyStopping(patience=3, min_delta=0.02)
    whole = _decisions(reference, values)
    assert whole == [True, False, True, True, False, False, False]
    for cut in range(1, len(whole)):
        first = EarlyStopping(patience=3, min_delta=0.02)
        head = _decisions(first, values[:cut])
        # as ray_jobs.train keeps it: inside train_state.pt, read back with a weights_only load
        torch.save({"early_stopping": first.state_dict()}, tmp_path / TRAIN_STATE)
        resumed = EarlyStopping(patience=3, min_delta=0.02)
        resumed.load_state_dict(load_train_state(tmp_path)["early_stopping"])
        assert head + _decisions(resumed, values[cut:]) == whole
        assert resumed.state_dict() == reference.state_dict()


def test_partial_training_draws_the_degraded_view_at_the_share_asked():
    feats = torch.arange(3.0).view(1, 3, 1).expand(4000, 3, 5).contiguous()  # view k holds the value k
    batch = {"features": feats, "age": torch.zeros(4000)}
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    drawn = batch_inputs(batch, "partial", prep, True, TrainConfig(degrade=0.3), torch.Generator().manual_seed(0),
                         torch.device("cpu"))[0][:, 0]
    shares = [float((drawn == k).float().mean()) for k in range(3)]
    assert shares[2] == pytest.approx(0.3, abs=0.03) and shares[0] == pytest.approx(0.35, abs=0.03)
    val = batch_inputs(batch, "partial", prep, False, TrainConfig(degrade=0.3), torch.Generator(), torch.device("cpu"))
    assert [float(v[0, 0]) for v in val] == [0.0]  # validation: the clean image
    val = batch_inputs(batch, "partial", prep, False, TrainConfig(degrade=0.3, tta_flip=True), torch.Generator(),
                       torch.device("cpu"))
    assert [float(v[0, 0]) for v in val] == [0.0, 1.0]  # with --tta: and its mirror, never the degraded view


def test_feature_cache_degraded_view_is_drawn_from_the_image_itself():
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    cfg = ModelConfig(backbone="test_resnet", pretrained="none")
    extractor = FeatureExtractor(cfg, prep, cut_stage=1, degraded=TrainConfig())
    images = IMAGES[:4, :32, :32].numpy()
    first = extractor({"image": images, "age": np.zeros(4)})["features"]
    again = extractor({"image": images.copy(), "age": np.zeros(4)})["features"]
    assert first.shape[:2] == (4, 3) and np.array_equal(first, again)
    assert not np.allclose(first[:, 2], first[:, 0], atol=1e-2)
    plain = FeatureExtractor(cfg, prep, cut_stage=1)({"image": images, "age": np.zeros(4)})["features"]
    assert plain.shape[1] == 2


def _brightness_faces(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey 32 px squares whose brightness is the age (0-80 years -> 40-240) plus pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    ages = torch.rand(n, generator=generator) * 80
    noise = torch.randint(-20, 21, (n, 32, 32, 3), generator=generator)
    images = (40 + ages.view(n, 1, 1, 1) * 2.5 + noise).clamp(0, 255).to(torch.uint8)
    return images, ages


def test_a_tiny_model_learns_age_from_brightness_on_cpu():
    """Training's own loop must learn what the pixels show: a flipped loss sign, a broken optimiser step or
    targets detached from their images leave the validation MAE near its first epoch's."""
    from agecore.training import evaluate_epoch, loss_fn, seed_everything, train_epoch

    seed_everything(0)
    torch.set_num_threads(1)  # the machine is shared; the model is small enough for one thread
    model_cfg = ModelConfig(backbone="test_resnet", pretrained="none", hidden=16, dropout=0.0,
                            target_mean=40.0, target_scale=20.0)
    module = create_model(model_cfg)
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    cfg = TrainConfig(lr=3e-3, epochs=8, warmup_epochs=0.0, batch_size=32, **STILL, degrade=0.0, tta_flip=False)
    train_images, train_ages = _brightness_faces(256, seed=1)
    val_images, val_ages = _brightness_faces(128, seed=2)
    batches = lambda images, ages: [{"image": images[i:i + 32], "age": ages[i:i + 32]}  # noqa: E731
                                    for i in range(0, len(ages), 32)]
    optimizer = make_optimizer(module, cfg)
    schedule = Schedule(optimizer, cfg, steps_per_epoch=len(train_ages) // 32)
    generator, device = torch.Generator().manual_seed(0), torch.device("cpu")
    train_inputs = lambda b: batch_inputs(b, "finetune", prep, True, cfg, generator, device)  # noqa: E731
    val_inputs = lambda b: batch_inputs(b, "finetune", prep, False, cfg, generator, device)  # noqa: E731
    maes = []
    for _ in range(cfg.epochs):
        train_epoch(module, batches(train_images, train_ages), optimizer, schedule, loss_fn(cfg.loss), train_inputs,
                    device)
        maes.append(evaluate_epoch(module, batches(val_images, val_ages), val_inputs, device).mae)
    # ages span 80 years: guessing the middle is wrong by ~20 on average; brightness gives the age to a few years
    assert min(maes[-3:]) < maes[0] / 2 and min(maes[-3:]) < 8, maes
