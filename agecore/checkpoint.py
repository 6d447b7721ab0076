"""Self-describing checkpoints: safetensors weights + JSON that says how to rebuild and feed the model.

A checkpoint is a folder::

    model.safetensors   the whole network (backbone and head), no pickled code
    checkpoint.json     model and training config, preprocessing, metrics, versions, epoch
    train_state.pt      optimiser/scheduler/early-stopping state for resuming (weights_only load)
    calibration.json    optional: signed-error quantiles per age band (written by evaluate --attach)
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from agecore import __version__, storage
from agecore.config import ModelConfig, Preprocessing
from agecore.errors import InvalidInput, MissingInput
from agecore.model import AgeRegressor, create_model

WEIGHTS = "model.safetensors"
META = "checkpoint.json"
TRAIN_STATE = "train_state.pt"
CALIBRATION = "calibration.json"
FORMAT, FORMAT_VERSION = "agecore-checkpoint", 1


def versions() -> dict[str, str]:
    import timm

    return {"agecore": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def save_checkpoint(
    path: str | Path,
    model: AgeRegressor,
    model_cfg: ModelConfig,
    prep: Preprocessing,
    *,
    train_cfg: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    epoch: int = 0,
    train_state: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, path / WEIGHTS)
    meta = {
        "format": f"{FORMAT}/{FORMAT_VERSION}",
        "model": model_cfg.to_dict(),
        "preprocessing": prep.to_dict(),
        "train": train_cfg or {},
        "metrics": metrics or {},
        "epoch": epoch,
        "versions": versions(),
    }
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")
    if train_state is not None:
        torch.save(train_state, path / TRAIN_STATE)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``checkpoint.json``; ``path`` is a folder or a URI (``s3://...``)."""
    meta_path = storage.join(path, META)
    if not storage.exists(meta_path):
        raise MissingInput(f"{path} is not an agecore checkpoint: {META} is missing")
    meta = storage.read_json(meta_path)
    check_format(meta.get("format"), str(path))
    return meta


def check_format(tag: str | None, path: str) -> None:
    """Refuse what is not an agecore checkpoint, or one written by a newer agecore than this one.

    >>> check_format("agecore-checkpoint/1", "best")
    >>> check_format("agecore-checkpoint/9", "best")
    Traceback (most recent call last):
    ...
    agecore.errors.InvalidInput: best is an agecore checkpoint of format 9, newer than this agecore reads (1): upgrade agecore
    """
    name, _, version = (tag or "").partition("/")
    if name != FORMAT or not version.isdigit():
        raise InvalidInput(f"{path} is not an agecore checkpoint: format {tag!r} in {META}")
    if int(version) > FORMAT_VERSION:
        raise InvalidInput(f"{path} is an agecore checkpoint of format {version}, newer than this agecore reads "
                           f"({FORMAT_VERSION}): upgrade agecore")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[AgeRegressor, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone (a folder or a URI); no pretrained download, no pickled code."""
    with storage.local_dir(path) as local:
        meta = read_meta(local)
        cfg = ModelConfig.from_dict({**meta["model"], "pretrained": "none", "pretrained_file": None})
        model = create_model(cfg)
        model.load_state_dict(safetensors.torch.load_file(local / WEIGHTS, device=str(device)))
    return model.to(device).eval(), meta


def weights_digest(path: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of the checkpoint's weights: names a model without its path."""
    fs, inner = storage.filesystem(storage.join(path, WEIGHTS))
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def preprocessing(meta: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    state_path = Path(path) / TRAIN_STATE
    return torch.load(state_path, map_location="cpu", weights_only=True) if state_path.is_file() else None
