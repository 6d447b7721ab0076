"""Training pieces that need no cluster: optimiser and schedule (timm's), early stopping, the
feature cache of the CPU paths, and one epoch of training or validation (augmentation:
``agecore.augment``).

``ray_jobs.train`` runs these inside Ray Train workers; a test or notebook can run them on
plain iterables of batches.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from agecore.augment import augment, degrade, degrade_some
from agecore.config import ModelConfig, Preprocessing, TrainConfig
from agecore.images import normalize
from agecore.metrics import CS_HEADLINE
from agecore.model import create_model, freeze_graph, split_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- optimisation -------------------------------------------------------------------------------


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimiser over the trainable parameters; no weight decay on norm layers and biases."""
    return create_optimizer_v2(module, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Schedule:
    """timm's learning-rate schedule (``create_scheduler_v2``) stepped per update; its position goes in checkpoints.

    Linear warm-up from 1% of ``cfg.lr`` over ``cfg.warmup_epochs``, then cosine to 1% of it, a
    warm-up-stable-decay ("wsd") schedule, or constant.

    >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    >>> s = Schedule(opt, TrainConfig(lr=0.1, epochs=2, warmup_epochs=0.5), steps_per_epoch=10)
    >>> lrs = [s.lr] + [(s.step(), s.lr)[1] for _ in range(20)]
    >>> [round(lrs[i], 4) for i in (0, 5, 10, 20)]
    [0.001, 0.0855, 0.0505, 0.001]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.schedule, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.lr * 0.01, min_lr=cfg.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
        )
        self.updates = 0

    def step(self) -> None:
        """After each optimiser step."""
        self.updates += 1
        self.scheduler.step_update(self.updates)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.step_update(self.updates)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement of more than ``min_delta``.

    The rule of Keras and Lightning: ``best`` moves only on an epoch that counts as an improvement,
    so a run falling by just under ``min_delta`` an epoch still improves on the epoch before last.

    >>> es = EarlyStopping(patience=2, min_delta=0.1)
    >>> [es.update(v) for v in (5.0, 4.95, 4.88, 4.85, 4.83)], es.best, es.should_stop
    ([True, False, True, False, False], 4.88, True)
    """

    patience: int
    min_delta: float
    best: float = math.inf  # the value an epoch must beat by min_delta: the last counted improvement
    best_epoch: int = -1
    bad_epochs: int = 0
    epoch: int = -1

    def update(self, value: float) -> bool:
        """Count one epoch's value; True when it improves on ``best`` by more than ``min_delta``."""
        self.epoch += 1
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the progress; ``patience`` and ``min_delta`` stay as configured (a resumed run may change them)."""
        self.__dict__.update({k: v for k, v in state.items() if k not in ("patience", "min_delta")})


def loss_fn(name: str) -> nn.Module:
    return nn.L1Loss() if name == "l1" else nn.SmoothL1Loss(beta=2.0)


# ---- inputs per mode -----------------------------------------------------------------------------


class FeatureExtractor:
    """The lower part of the network, run once over a data set for the CPU paths.

    A Ray Data ``map_batches`` callable class (one model load per actor): image batches in,
    ``features`` out as (N, V, ...) float16. The views are the image and its mirror image, so
    training can flip without running the lower part again and validation can average both;
    with ``degraded`` (a training config) a third view is the image augmented by it and spoilt as
    a real photo would spoil it (``agecore.augment.degrade``), drawn from the image's own bytes, so
    a rebuilt cache holds the same views.
    """

    def __init__(
        self, model_cfg: ModelConfig, prep: Preprocessing, cut_stage: int | None, threads: int = 0,
        device: str = "cpu", weights: dict[str, torch.Tensor] | None = None, degraded: TrainConfig | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if weights is not None:  # the driver's network: identical to what training starts from, random or not
            model = create_model(dataclasses.replace(model_cfg, pretrained="none", pretrained_file=None))
            model.load_state_dict(weights)
        else:
            model = create_model(model_cfg)
        model.eval()
        lower = split_model(model, cut_stage)[0].eval().to(self.device, memory_format=torch.channels_last)
        if self.device.type == "cpu":
            lower = freeze_graph(lower, prep.input_size)
        self.lower = lower
        self.prep = prep
        self.degraded = degraded

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        x = normalize(images.to(self.device), self.prep)
        inputs = [x, torch.flip(x, dims=[3])]
        if self.degraded is not None:
            generator = torch.Generator().manual_seed(zlib.crc32(batch["image"].tobytes()))
            spoilt = degrade(augment(images.to(self.device), self.degraded, generator), generator)
            inputs.append(normalize(spoilt, self.prep))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            views = torch.stack([self.lower(v) for v in inputs], dim=1)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["features"] = views.to(torch.float16).cpu().numpy()
        return out


def batch_inputs(
    batch: dict[str, torch.Tensor],
    mode: str,
    prep: Preprocessing,
    train: bool,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
) -> list[torch.Tensor]:
    """The model inputs of a batch: one view for training, one or two (TTA) for validation.

    Training draws ``cfg.degrade`` of the faces spoilt as real photos are: on images, here on the
    device; from cached features, their degraded view where the cache holds one.
    """
    if mode == "finetune":
        # augment where the model runs: on a GPU, augmenting on the host would hold back the step
        images = batch["image"].to(device, non_blocking=True)
        if train:
            images = degrade_some(augment(images, cfg, generator), cfg.degrade, generator)
        x = normalize(images, prep)
        if train or not cfg.tta_flip:
            return [x]
        return [x, torch.flip(x, dims=[3])]
    feats = batch["features"].to(device, non_blocking=True)

    def view(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    if train:
        n = feats.shape[0]
        pick = torch.randint(0, 2, (n,), generator=generator) if cfg.flip else torch.zeros(n, dtype=torch.long)
        if feats.shape[1] > 2:  # the cache's degraded view
            pick = torch.where(torch.rand(n, generator=generator) < cfg.degrade, 2, pick)
        return [view(feats[torch.arange(n), pick.to(device)])]
    return [view(feats[:, 0]), view(feats[:, 1])] if cfg.tta_flip else [view(feats[:, 0])]


@dataclass
class EpochResult:
    mae: float
    abs_err_sum: float
    count: int
    cs5_count: int  # predictions within CS_HEADLINE (5) years of the true age
    seconds: float


def train_epoch(
    module: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    criterion: nn.Module,
    inputs: Any,
    device: torch.device,
    amp: bool = False,
    on_progress: Callable[[int, float], None] | None = None,
    progress_every: int = 10,
) -> EpochResult:
    """One pass of training; ``inputs(batch)`` gives the model input (see ``batch_inputs``).

    ``on_progress(steps, running_mae)`` is called every ``progress_every`` steps: the one host sync
    in the loop, and only when someone is watching.
    """
    module.train()
    start, count = time.perf_counter(), 0
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # |error| and hits within 5 years, kept on
    for step, batch in enumerate(batches, 1):                  # the device: no host sync in the loop
        x = inputs(batch)[0]
        y = batch["age"].to(device).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = module(x).float()
        loss = criterion(pred, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        err = (pred.detach() - y).abs()
        sums += torch.stack([err.sum(), (err <= CS_HEADLINE).sum()]).double()
        count += len(y)
        if on_progress is not None and step % progress_every == 0:
            on_progress(step, sums[0].item() / count)
    abs_sum, cs5_count = sums.tolist()
    return EpochResult(abs_sum / max(count, 1), abs_sum, count, int(cs5_count), time.perf_counter() - start)


@torch.inference_mode()
def evaluate_epoch(
    module: nn.Module, batches: Iterable[dict[str, torch.Tensor]], inputs: Any, device: torch.device, amp: bool = False
) -> EpochResult:
    """Predictions over a validation shard, averaged over the views ``inputs`` gives."""
    module.eval()
    start, count = time.perf_counter(), 0
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        y = batch["age"].to(device).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = torch.stack([module(x).float() for x in inputs(batch)]).mean(0)
        err = (pred - y).abs()
        sums += torch.stack([err.sum(), (err <= CS_HEADLINE).sum()]).double()
        count += len(y)
    abs_sum, cs5_count = sums.tolist()
    return EpochResult(abs_sum / max(count, 1), abs_sum, count, int(cs5_count), time.perf_counter() - start)
