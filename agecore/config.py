"""Frozen, self-validating configuration for every stage.

Each dataclass raises ``ValueError`` naming the field at construction, so a bad
command line fails before any Ray worker starts. ``to_dict``/``from_dict`` give
the JSON that is written to the run directory and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from agecore.errors import InvalidInput

# Each choice list is written once, as a type: the command lines take their choices from these too.
Format = Literal["auto", "labels-csv", "utkface", "manifest"]
Mode = Literal["finetune", "partial", "frozen"]
Loss = Literal["l1", "smooth_l1"]
Schedule = Literal["cosine", "wsd", "constant"]
Optimizer = Literal["adam", "adamw"]
Pretrained = Literal["hub", "file", "none"]
Precision = Literal["fp32", "bf16"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
# how an image is taken: auto, a face crop framed like the training crops as it is and anything else
# through face detection; true, always detected; false, always as a crop
DetectFaces = Literal["auto", "true", "false"]
FORMATS: tuple[str, ...] = get_args(Format)
MODES: tuple[str, ...] = get_args(Mode)
LOSSES: tuple[str, ...] = get_args(Loss)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
PRETRAINED: tuple[str, ...] = get_args(Pretrained)
PRECISIONS: tuple[str, ...] = get_args(Precision)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)

# The pixel limits of every stage (prepare's defaults, the predictor, the service): the shorter side
# of the smallest usable image, and the most pixels an image may have (a decompression-bomb guard).
MIN_SIDE = 32
MAX_PIXELS = 40_000_000
DETECT_FACES: tuple[str, ...] = get_args(DetectFaces)
CALIBRATION_HELP = ("correct every age with the checkpoint's calibration NAME, and take the likely ranges and "
                    "challenge ages from it (age calibrate stores it as calibrations/NAME.json) (default: the "
                    "model's own estimates and the checkpoint's calibration.json)")
DETECT_FACES_HELP = ("auto: a face crop framed like the training crops is used as it is, and any other photo has its "
                     "faces found (MTCNN) and aligned like the training crops; true: faces are always found; false: "
                     "each image is a face crop (the fast path for pre-cropped data)")
PRECISION_HELP = ("inference precision (default: bf16 where the device runs it natively: GPUs, CPUs with "
                  "AVX512-BF16 or AMX; fp32 elsewhere)")

MAX_AGE = 120.0
# a calibration name becomes a file name (calibrations/NAME.json) and a URL parameter: plain characters only
CALIBRATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

T = TypeVar("T")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidInput(message)


def detect_mode(value: bool | str) -> str:
    """A ``DETECT_FACES`` value, from itself or from a flag (True: "true", False: "false").

    >>> detect_mode(True), detect_mode("auto")
    ('true', 'auto')
    """
    mode = ("true" if value else "false") if isinstance(value, bool) else value
    _check(mode in DETECT_FACES, f"detect_faces must be one of {DETECT_FACES}, got {value!r}")
    return mode


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
    """How labelled images become a validated, split, preprocessed Parquet set.

    The test split is held out by default: training, early stopping, tuning and calibration read
    train and val only, so the figures ``age evaluate`` reports on it are of unseen faces.
    """

    data: str = field(metadata={"help": "labels.csv folder, UTKFace folder, or manifest .csv/.parquet (path or URI)"})
    out: str = field(metadata={"help": "output folder or URI for Parquet shards, rejects.csv and report/"})
    format: Format = field(default="auto", metadata={"help": "layout of --data; auto tells the three apart"})
    image_size: int = field(default=224, metadata={"help": "side in pixels of the stored square images"})
    val_fraction: float = field(default=0.15, metadata={"help": "share for early stopping and calibration"})
    test_fraction: float = field(
        default=0.1, metadata={"help": "share held out for `age evaluate`, never read by training (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the shuffle and the split"})
    strict: bool = field(default=False, metadata={"help": "fail on any rejected row"})
    min_side: int = field(default=MIN_SIDE, metadata={"help": "images with a shorter side (pixels) are rejected"})
    max_pixels: int = field(
        default=MAX_PIXELS, metadata={"help": "images with more pixels are rejected (a guard against decompression bombs)"})
    max_age: float = field(default=MAX_AGE, metadata={"help": "labels above this age (years) are rejected"})
    detect_faces: DetectFaces = field(default="false", metadata={"help": (
        "labelled photos rather than face crops: auto keeps a crop framed like UTKFace's chips as it is and "
        "crops and aligns the largest face of any other photo onto that layout; true aligns every image; "
        "false takes each image as the crop to learn from. A photo without a face is rejected (no_face)")})

    def __post_init__(self) -> None:
        _check(self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}")
        _check(self.detect_faces in DETECT_FACES, f"detect_faces must be one of {DETECT_FACES}, got {self.detect_faces!r}")
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

    backbone: str = field(default="resnet50", metadata={"help": "any timm model name"})
    pretrained: Pretrained = field(
        default="hub", metadata={"help": "ImageNet weights from the hub, a local file, or none (random)"})
    pretrained_file: str | None = field(
        default=None, metadata={"help": "local ImageNet weights (.safetensors/.pth)"})
    hidden: int = field(default=256, metadata={"help": "width of the head's hidden layer"})
    dropout: float = field(default=0.3, metadata={"help": "dropout before the head's last layer"})
    # Ages are regressed as (age - target_mean) / target_scale; stored so predictions come back in years.
    target_mean: float = field(
        default=33.0, metadata={"help": "age subtracted from the targets (set from the training split)"})
    target_scale: float = field(
        default=20.0, metadata={"help": "divisor of the centred targets (set from the training split)"})

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "backbone must name a timm model")
        _check(self.pretrained in PRETRAINED, f"pretrained must be one of {PRETRAINED}, got {self.pretrained!r}")
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

    mode: Mode = field(default="finetune", metadata={"help": (
        "finetune: the whole network on images; partial: the top stages on cached activations; "
        "frozen: the head alone on cached embeddings")})
    epochs: int = field(default=20, metadata={"help": "most epochs to run"})
    patience: int = field(default=4, metadata={"help": "epochs without improvement before early stopping"})
    min_delta: float = field(
        default=0.02, metadata={"help": "smallest fall in validation MAE (years) that counts as improvement"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay of the optimiser"})
    optimizer: Optimizer = field(default="adamw", metadata={"help": "optimiser"})
    schedule: Schedule = field(
        default="cosine", metadata={"help": "learning-rate schedule after the warm-up (timm's; wsd: stable, then decay over the last fifth)"})
    warmup_epochs: float = field(
        default=1.0, metadata={"help": "epochs of linear learning-rate warm-up (fractions allowed)"})
    batch_size: int = field(default=64, metadata={"help": "training images per worker and step"})
    loss: Loss = field(default="l1", metadata={"help": "training loss on the standardised age"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel)"})
    gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    seed: int = field(
        default=0, metadata={"help": "seed of the initial head, the shuffles and the augmentation"})
    cut_stage: int | None = field(
        default=None, metadata={"help": "partial mode: backbone stages run once and cached (default: all but the top)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips of training images"})
    random_crop_scale: tuple[float, float] = field(
        default=(0.8, 1.0), metadata={"help": "area range (lo hi) of random training crops"})
    color_jitter: float = field(
        default=0.2, metadata={"help": "strength of random brightness/contrast changes in training"})
    rotate_degrees: float = field(
        default=10.0, metadata={"help": "random rotation of training faces, up to this many degrees either way"})
    degrade: float = field(default=0.3, metadata={"help": (
        "share of training faces shown as real photos spoil them: grey, sepia or a colour cast, blur, "
        "low resolution, noise, JPEG (agecore.augment); partial and frozen modes cache one such view a face")})
    tta_flip: bool = field(
        default=False, metadata={"help": (
            "validate, and predict by default, on the average of each face and its mirror image: twice the "
            "inference time, for 0.03-0.04 years on chips and no steady gain on photos (docs/benchmarks.md)")})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept, by lowest validation MAE"})

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        _check(self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}")
        _check(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        _check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _check(self.cut_stage is None or self.cut_stage >= 1, f"cut_stage must be >= 1, got {self.cut_stage}")
        lo, hi = self.random_crop_scale
        _check(0 < lo <= hi <= 1, f"random_crop_scale must satisfy 0 < lo <= hi <= 1, got {self.random_crop_scale}")
        _check(0 <= self.color_jitter < 1, f"color_jitter must be in [0, 1), got {self.color_jitter}")
        _check(0 <= self.rotate_degrees <= 45, f"rotate_degrees must be in [0, 45], got {self.rotate_degrees}")
        _check(0 <= self.degrade <= 1, f"degrade must be in [0, 1], got {self.degrade}")
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
    # where the training crops have their five face landmarks, (x, y) in the unit square of a crop
    # (``agecore.faces.measure_template``): detected faces are aligned onto it; None: the UTKFace layout
    face_template: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.face_template is not None:  # JSON gives lists: frozen and hashable as tuples
            object.__setattr__(self, "face_template", tuple(tuple(float(v) for v in p) for p in self.face_template))
            _check(
                len(self.face_template) == 5 and all(len(p) == 2 and -1 < v < 2 for p in self.face_template for v in p),
                f"face_template must be five (x, y) points near the unit square, got {self.face_template}",
            )
        _check(self.input_size >= 16, f"input_size must be >= 16, got {self.input_size}")
        _check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values")
        _check(all(s > 0 for s in self.std), "std values must be > 0")
        _check(
            self.interpolation in INTERPOLATIONS,
            f"unsupported interpolation {self.interpolation!r}",
        )


@dataclass(frozen=True)
class FaceDetection(_Serializable):
    """How faces are found in uncropped photos (each is then aligned like the training crops).

    MTCNN runs on a copy of the photo (with its border, where padded) scaled to ``working_size`` on
    its longer side, and looks for faces down to ``min_fraction`` of the photo's shorter side (or
    ``min_size`` pixels, where that is larger): what it costs is set by the smallest face it looks
    for. Faces under ``min_size`` pixels of the photo are dropped: too little detail for an age
    estimate.

    >>> FaceDetection(min_score=1.5)
    Traceback (most recent call last):
    ...
    agecore.errors.InvalidInput: min_score must be in (0, 1], got 1.5
    """

    min_score: float = 0.9
    min_size: int = 20
    min_fraction: float = 0.1
    working_size: int = 400  # MTCNN's time grows with the square of it

    def __post_init__(self) -> None:
        _check(0.0 < self.min_score <= 1.0, f"min_score must be in (0, 1], got {self.min_score}")
        _check(self.min_size >= 12, f"min_size must be >= 12 pixels (MTCNN's smallest window), got {self.min_size}")
        _check(0.0 <= self.min_fraction < 1.0, f"min_fraction must be in [0, 1), got {self.min_fraction}")
        _check(self.working_size >= 64, f"working_size must be >= 64 pixels, got {self.working_size}")


@dataclass(frozen=True)
class ServeConfig(_Serializable):
    """The HTTP service: its model and its deployment. ``age serve`` takes each field as an option, and
    ``serve_config.yaml`` as a key of the application's ``args:``.

    >>> ServeConfig(checkpoint="best", min_replicas=3, max_replicas=2)
    Traceback (most recent call last):
    ...
    agecore.errors.InvalidInput: min_replicas (3) must be <= max_replicas (2)
    """

    checkpoint: str = field(metadata={"help": "checkpoint folder or URI (a training or tuning output's best/)"})
    precision: Precision | None = field(default=None, metadata={"help": PRECISION_HELP})
    threads: int | None = field(default=None, metadata={"help": "torch threads per replica (default: torch's choice)"})
    replicas: int | None = field(default=None, metadata={"help": (
        "a fixed number of replicas (default: autoscale between --min-replicas and --max-replicas by load)")})
    min_replicas: int = field(default=1, metadata={"help": "autoscaling: replicas when idle"})
    max_replicas: int = field(default=4, metadata={"help": "autoscaling: most replicas under load"})
    target_ongoing_requests: float = field(
        default=8.0, metadata={"help": "autoscaling: requests in flight per replica that it scales to keep"})
    max_ongoing_requests: int = field(
        default=32, metadata={"help": "requests a replica takes at once; more wait in the proxy"})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved for each replica"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs reserved for each replica (1: one GPU each)"})
    max_body_mb: float = field(default=10.0, metadata={"help": "largest request body in MiB, counted while reading"})
    calibration: str | None = field(default=None, metadata={"help": CALIBRATION_HELP})

    def __post_init__(self) -> None:
        _check(self.precision in (None, *PRECISIONS), f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _check(self.replicas is None or self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}")
        _check(self.min_replicas >= 0, f"min_replicas must be >= 0, got {self.min_replicas}")
        _check(self.max_replicas >= 1, f"max_replicas must be >= 1, got {self.max_replicas}")
        _check(self.min_replicas <= self.max_replicas,
               f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        _check(self.target_ongoing_requests > 0,
               f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        _check(self.max_ongoing_requests >= 1, f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")
        _check(self.max_body_mb > 0, f"max_body_mb must be > 0, got {self.max_body_mb}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def deployment_options(self) -> dict[str, Any]:
        """``serve.Deployment.options`` for this config: a fixed count of replicas, or the autoscaling range."""
        scaling: dict[str, Any] = (
            {"num_replicas": self.replicas, "autoscaling_config": None} if self.replicas else
            {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                    "target_ongoing_requests": self.target_ongoing_requests}})
        return {**scaling, "max_ongoing_requests": self.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}


def check_calibration_name(name: str) -> str:
    """``name`` if it can name a calibration (letters, digits, ``_.-``, at most 64), else ``InvalidInput``.

    >>> check_calibration_name("family-photos")
    'family-photos'
    """
    _check(bool(CALIBRATION_NAME.match(name)) and not name.endswith(".json"),
           f"calibration name {name!r}: use letters, digits, '_', '.' and '-' (at most 64, not ending in .json)")
    return name


@dataclass(frozen=True)
class CalibrateConfig(_Serializable):
    """``age calibrate``: fit a named correction and verification margins on labelled photos of your people."""

    checkpoint: str = field(metadata={"help": "checkpoint folder (a training run's best/); the calibration is stored in it"})
    data: str = field(metadata={"help": (
        "labelled uncropped photos: a manifest .csv/.parquet with path,age[,person] (paths relative to it) "
        "or a labelled folder (labels.csv + final_files/, UTKFace names)")})
    name: str = field(metadata={"help": "name of the calibration: calibrations/NAME.json in the checkpoint"})
    person_from: str | None = field(default=None, metadata={"help": (
        "who is in each photo, from its file name: prefix:N (its first N characters) or regex:PATTERN (the "
        "first group) (default: the manifest's person column; without either, every photo counts as a "
        "person of its own and the figures may be optimistic)")})
    folds: int = field(default=5, metadata={"help": "person-grouped cross-validation folds"})
    out: str | None = field(default=None, metadata={"help": (
        "local report folder: report.md, report.json, correction.png, estimates.csv, faces.parquet "
        "(default: runs/calibrate-NAME)")})
    format: Format = field(default="auto", metadata={"help": "layout of --data; auto tells them apart"})
    seed: int = field(default=0, metadata={"help": "seed of the assignment of people to folds"})

    def __post_init__(self) -> None:
        check_calibration_name(self.name)
        _check(self.folds >= 2, f"folds must be >= 2, got {self.folds}")
        _check(self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}")
        _check(self.person_from is None or self.person_from.startswith(("prefix:", "regex:")),
               f"person_from must be prefix:N or regex:PATTERN, got {self.person_from!r}")
        _check(self.out is None or "://" not in self.out,
               f"out must be a local folder (calibration runs in one process), got {self.out!r}")
