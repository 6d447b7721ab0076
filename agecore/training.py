"""Training pieces that need no cluster: augmentation, optimiser and schedule, early stopping,
the feature cache of the CPU paths, and one epoch of training or validation.

``ray_jobs.train`` runs these inside Ray Train workers; a test or notebook can run them on
plain iterables of batches.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecore.config import ModelConfig, Preprocessing, TrainConfig
from agecore.images import normalize
from agecore.model import create_model, freeze_graph, split_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- augmentation -------------------------------------------------------------------------------


def augment(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop, horizontal flip and brightness/contrast jitter, drawn per image.

    A uint8 NHWC batch in, float NHWC in [0, 255] out (``normalize`` takes either), on the batch's
    device. Crop and flip are one affine resampling of the whole batch (``grid_sample``), so a GPU
    runs it in a few kernels rather than a loop over images; the crop keeps the image's aspect
    ratio and covers ``random_crop_scale`` of its area.
    """
    n, h, w, _ = images.shape
    r = torch.rand(n, 6, generator=generator).to(images.device)
    x = images.permute(0, 3, 1, 2).float()
    lo, hi = cfg.random_crop_scale
    if (lo, hi) != (1.0, 1.0) or cfg.flip:
        side = torch.sqrt(lo + (hi - lo) * r[:, 0])  # crop side / image side
        mirror = torch.where(r[:, 3] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones_like(side)
        theta = torch.zeros(n, 2, 3, device=images.device)  # output -> input coordinates in [-1, 1]
        theta[:, 0, 0] = side * mirror
        theta[:, 1, 1] = side
        theta[:, 0, 2] = (2 * r[:, 2] - 1) * (1 - side)  # crop centre: anywhere the crop stays inside
        theta[:, 1, 2] = (2 * r[:, 1] - 1) * (1 - side)
        grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        brightness = (1 + j * (2 * r[:, 4] - 1)).view(n, 1, 1, 1)
        contrast = (1 + j * (2 * r[:, 5] - 1)).view(n, 1, 1, 1)
        x = (x * brightness).clamp_(0, 255)
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean((1, 2)).view(n, 1, 1, 1)
        x = ((x - grey) * contrast + grey).clamp_(0, 255)
    return x.permute(0, 2, 3, 1)


# ---- optimisation -------------------------------------------------------------------------------


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then cosine decay to 1% (or constant).

    >>> [round(lr_factor(s, 10, 2, "cosine"), 3) for s in (0, 1, 2, 10)]
    [0.5, 1.0, 1.0, 0.01]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule != "cosine":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """Per-step warm-up + cosine, or per-epoch reduce-on-plateau; its state goes in checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.step_count = 0
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.3, patience=1)
            if cfg.schedule == "plateau" else None
        )
        self._apply()

    def _apply(self) -> None:
        if self.plateau is not None and self.step_count >= self.warmup:
            return
        f = lr_factor(self.step_count, self.total, self.warmup, self.cfg.schedule)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def epoch_end(self, val_mae: float) -> None:
        if self.plateau is not None and self.step_count >= self.warmup:
            self.plateau.step(val_mae)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
        self._apply()


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement of at least ``min_delta``.

    >>> es = EarlyStopping(patience=2, min_delta=0.1)
    >>> [es.update(v) for v in (5.0, 4.95, 4.8, 4.9, 4.85)], es.should_stop
    ([True, False, True, False, False], True)
    """

    patience: int
    min_delta: float
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    epoch: int = -1

    def update(self, value: float) -> bool:
        self.epoch += 1
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            return True
        self.best = min(self.best, value)
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
    ``features`` out as (N, 2, ...) float16, the image and its mirror image, so training can
    flip without running the lower part again and validation can average both views.
    """

    def __init__(
        self, model_cfg: ModelConfig, prep: Preprocessing, cut_stage: int | None, threads: int = 0,
        device: str = "cpu", weights: dict[str, torch.Tensor] | None = None,
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

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = normalize(torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device), self.prep)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            views = torch.stack([self.lower(x), self.lower(torch.flip(x, dims=[3]))], dim=1)
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
    """The model inputs of a batch: one view for training, one or two (TTA) for validation."""
    if mode == "finetune":
        # augment where the model runs: on a GPU, augmenting on the host would hold back the step
        images = batch["image"].to(device, non_blocking=True)
        if train:
            images = augment(images, cfg, generator)
        x = normalize(images, prep)
        if train or not cfg.tta_flip:
            return [x]
        return [x, torch.flip(x, dims=[3])]
    feats = batch["features"].to(device, non_blocking=True)

    def view(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    if train:
        pick = torch.randint(0, 2, (feats.shape[0],), generator=generator) if cfg.flip else torch.zeros(
            feats.shape[0], dtype=torch.long)
        return [view(feats[torch.arange(feats.shape[0]), pick.to(device)])]
    return [view(feats[:, 0]), view(feats[:, 1])] if cfg.tta_flip else [view(feats[:, 0])]


@dataclass
class EpochResult:
    mae: float
    abs_err_sum: float
    count: int
    within5: int
    seconds: float
    predictions: np.ndarray | None = None


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
        sums += torch.stack([err.sum(), (err <= 5).sum()]).double()
        count += len(y)
        if on_progress is not None and step % progress_every == 0:
            on_progress(step, sums[0].item() / count)
    abs_sum, within5 = sums.tolist()
    return EpochResult(abs_sum / max(count, 1), abs_sum, count, int(within5), time.perf_counter() - start)


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
        sums += torch.stack([err.sum(), (err <= 5).sum()]).double()
        count += len(y)
    abs_sum, within5 = sums.tolist()
    return EpochResult(abs_sum / max(count, 1), abs_sum, count, int(within5), time.perf_counter() - start)
