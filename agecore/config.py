"""Frozen, self-validating configuration for every stage.

Each dataclass raises ``ValueError`` naming the field at construction, so a bad
command line fails before any Ray worker starts. ``to_dict``/``from_dict`` give
the JSON that is written to the run directory and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

FORMATS = ("auto", "labels-csv", "utkface", "manifest")
MODES = ("finetune", "partial", "frozen")
LOSSES = ("l1", "smooth_l1")
SCHEDULES = ("cosine", "plateau", "constant")

MAX_AGE = 120.0

T = TypeVar("T")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        _check(not unknown, f"{cls.__name__}: unknown fields {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class PrepareConfig(_Serializable):
    """How labelled images become a validated, split, preprocessed Parquet set."""

    data: str
    out: str
    format: str = "auto"
    image_size: int = 224
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    seed: int = 0
    strict: bool = False
    min_side: int = 32
    max_pixels: int = 40_000_000
    max_age: float = MAX_AGE

    def __post_init__(self) -> None:
        _check(self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}")
        _check(16 <= self.image_size <= 1024, f"image_size must be in [16, 1024], got {self.image_size}")
        _check(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(0.0 <= self.test_fraction < 1.0, f"test_fraction must be in [0, 1), got {self.test_fraction}")
        _check(
            self.val_fraction + self.test_fraction < 0.9,
            "val_fraction + test_fraction must leave at least 10% for training",
        )
        _check(self.min_side >= 1, f"min_side must be >= 1, got {self.min_side}")
        _check(self.max_pixels >= self.min_side**2, "max_pixels must be >= min_side**2")


@dataclass(frozen=True)
class ModelConfig(_Serializable):
    """Backbone + the reference head: pool -> Linear -> ReLU -> Dropout -> Linear(1)."""

    backbone: str = "resnet50"
    pretrained: Literal["hub", "file", "none"] = "hub"
    pretrained_file: str | None = None
    hidden: int = 256
    dropout: float = 0.3
    # Ages are regressed as (age - target_mean) / target_scale; stored so predictions come back in years.
    target_mean: float = 33.0
    target_scale: float = 20.0

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "backbone must name a timm model")
        _check(self.pretrained in ("hub", "file", "none"), f"pretrained must be hub|file|none, got {self.pretrained!r}")
        _check(
            (self.pretrained == "file") == (self.pretrained_file is not None),
            "pretrained='file' goes with pretrained_file, and only then",
        )
        _check(self.hidden >= 1, f"hidden must be >= 1, got {self.hidden}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.target_scale > 0, f"target_scale must be > 0, got {self.target_scale}")


@dataclass(frozen=True)
class TrainConfig(_Serializable):
    """Optimisation, early stopping and the CPU short-cuts (frozen / partial)."""

    mode: str = "finetune"
    epochs: int = 20
    patience: int = 4
    min_delta: float = 0.02
    lr: float = 3e-4
    weight_decay: float = 1e-4
    optimizer: Literal["adam", "adamw"] = "adamw"
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    batch_size: int = 64
    loss: str = "l1"
    workers: int = 1
    gpu: bool = False
    seed: int = 0
    # partial mode: how many backbone stages run once and are cached (the rest is fine-tuned)
    cut_stage: int | None = None
    # training-time augmentation (train split only)
    flip: bool = True
    random_crop_scale: tuple[float, float] = (0.8, 1.0)
    color_jitter: float = 0.2
    # test-time augmentation used for validation metrics and stored as the predictor default
    tta_flip: bool = True
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        _check(self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}")
        _check(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.optimizer in ("adam", "adamw"), f"optimizer must be adam|adamw, got {self.optimizer!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        _check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _check(self.cut_stage is None or self.cut_stage >= 1, f"cut_stage must be >= 1, got {self.cut_stage}")
        lo, hi = self.random_crop_scale
        _check(0 < lo <= hi <= 1, f"random_crop_scale must satisfy 0 < lo <= hi <= 1, got {self.random_crop_scale}")
        _check(0 <= self.color_jitter < 1, f"color_jitter must be in [0, 1), got {self.color_jitter}")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


@dataclass(frozen=True)
class Preprocessing(_Serializable):
    """Everything needed to turn a decoded image into model input; stored in checkpoints.

    >>> Preprocessing(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).input_size
    224
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        _check(self.input_size >= 16, f"input_size must be >= 16, got {self.input_size}")
        _check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values")
        _check(all(s > 0 for s in self.std), "std values must be > 0")
        _check(
            self.interpolation in ("bilinear", "bicubic", "nearest", "lanczos"),
            f"unsupported interpolation {self.interpolation!r}",
        )


@dataclass(frozen=True)
class FaceDetection(_Serializable):
    """How faces are found in uncropped photos and framed like the training crops.

    ``margin`` widens the square around each detection: MTCNN's box covers brow to chin, about
    85% x 100% of a UTKFace chip, so a square of the box's longer side reproduces the chips.

    >>> FaceDetection(min_score=1.5)
    Traceback (most recent call last):
    ...
    ValueError: min_score must be in (0, 1], got 1.5
    """

    min_score: float = 0.9
    min_size: int = 20
    margin: float = 0.05

    def __post_init__(self) -> None:
        _check(0.0 < self.min_score <= 1.0, f"min_score must be in (0, 1], got {self.min_score}")
        _check(self.min_size >= 12, f"min_size must be >= 12 pixels (MTCNN's smallest window), got {self.min_size}")
        _check(0.0 <= self.margin <= 1.0, f"margin must be in [0, 1], got {self.margin}")
