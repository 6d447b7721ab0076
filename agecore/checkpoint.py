"""Self-describing checkpoints: safetensors weights + JSON that says how to rebuild and feed the model.

A checkpoint is a folder::

    model.safetensors   the whole network (backbone and head), no pickled code
    checkpoint.json     model and training config, preprocessing, this epoch's metrics, versions, epoch
    history.json        from training: the metrics of every epoch up to this one, how it was reached
    train_state.pt      optimiser/scheduler/early-stopping state for resuming (weights_only load)
    calibration.json    optional: signed-error quantiles per age band (written by evaluate --attach)
    calibrations/       optional: NAME.json, corrections fitted on a user's own photos (``age calibrate``)

Training saves with ``save_checkpoint`` and resumes with ``restore``; inference loads with
``load_checkpoint``; ``copy_checkpoint`` exports a checkpoint without its train state (the
exported ``best/`` of a run keeps ``history.json``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import safetensors.torch
import torch

from agecore import __version__, storage
from agecore.config import ModelConfig, Preprocessing, check_calibration_name
from agecore.errors import InvalidInput, MissingInput
from agecore.model import AgeRegressor, create_model

WEIGHTS = "model.safetensors"
META = "checkpoint.json"
HISTORY = "history.json"
TRAIN_STATE = "train_state.pt"
CALIBRATION = "calibration.json"
CALIBRATIONS = "calibrations"
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
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint folder ``path``; ``history`` (one metrics row per epoch) goes to ``history.json``."""
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
    if history is not None:
        (path / HISTORY).write_text(json.dumps({"epochs": history}, indent=1) + "\n")
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
        model = load_weights(local, create_model(cfg), device)
    return model.to(device).eval(), meta


def load_weights(path: str | Path, model: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load the weights of the checkpoint folder ``path`` into ``model`` (built to its config); returns ``model``."""
    model.load_state_dict(safetensors.torch.load_file(Path(path) / WEIGHTS, device=str(device)))
    return model


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics rows up to the checkpoint's epoch (a folder or a URI); none where it has no history."""
    history_path = storage.join(path, HISTORY)
    if not storage.exists(history_path):
        return []
    epochs = storage.read_json(history_path).get("epochs")
    if not isinstance(epochs, list):
        raise InvalidInput(f"{history_path}: no list of epochs")
    return epochs


@dataclass(frozen=True)
class Restored:
    """What training continues from, besides the weights: the checkpoint's metadata, train state and history."""

    meta: dict[str, Any]
    train_state: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def epoch(self) -> int:
        """The last epoch the checkpoint finished."""
        return self.meta["epoch"]


def restore(path: str | Path, model: torch.nn.Module, device: str | torch.device = "cpu") -> Restored:
    """Load a training checkpoint's weights into ``model`` and return the rest that resuming needs."""
    meta = read_meta(path)
    train_state = load_train_state(path)
    if train_state is None:
        raise MissingInput(f"{path}: {TRAIN_STATE} is missing, so training cannot resume from this checkpoint")
    load_weights(path, model, device)
    return Restored(meta, train_state, read_history(path))


def copy_checkpoint(src: str | Path, dest: str | Path, *, train_state: bool = False) -> Path:
    """Copy the checkpoint folder ``src`` to ``dest`` (replaced), less its train state unless ``train_state``."""
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=None if train_state else shutil.ignore_patterns(TRAIN_STATE))
    return dest


def weights_digest(path: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of the checkpoint's weights: names a model without its path."""
    fs, inner = storage.filesystem(storage.join(path, WEIGHTS))
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def attach_calibration(checkpoint: str | Path, cal: dict[str, Any], source: str, *, data: str | None = None,
                       split: str | None = None) -> str:
    """Store ``cal`` as the checkpoint's calibration.json; ``data``/``split`` record what it was measured on."""
    path = storage.join(checkpoint, CALIBRATION)
    provenance = {"source": source, **({"data": storage.absolute(data), "split": split} if data else {})}
    storage.write_text(path, json.dumps({**provenance, **cal}, indent=2) + "\n")
    return path


def save_calibration(checkpoint: str | Path, name: str, cal: dict[str, Any]) -> str:
    """Store ``cal`` (``agecore.calibration.fit_calibration`` and its provenance) as ``calibrations/NAME.json``."""
    folder = storage.join(checkpoint, CALIBRATIONS)
    fs, inner = storage.filesystem(folder)
    fs.create_dir(inner, recursive=True)
    path = storage.join(folder, f"{check_calibration_name(name)}.json")
    storage.write_text(path, json.dumps({"name": name, **cal}, indent=2) + "\n")
    return path


def calibration_names(checkpoint: str | Path) -> list[str]:
    """The names of the checkpoint's stored calibrations (``calibrations/NAME.json``), sorted."""
    fs, folder = storage.filesystem(storage.join(checkpoint, CALIBRATIONS))
    if fs.get_file_info(folder).type != pyarrow.fs.FileType.Directory:
        return []
    files = fs.get_file_info(pyarrow.fs.FileSelector(folder))
    return sorted(f.base_name.removesuffix(".json") for f in files if f.base_name.endswith(".json"))


def read_calibration(checkpoint: str | Path, name: str | None = None) -> dict[str, Any] | None:
    """The checkpoint's calibration.json (what ``/v1/verify`` answers with), or None; with ``name``, the
    named calibration ``calibrations/NAME.json``, or ``MissingInput`` naming the ones it holds."""
    if name is None:
        path = storage.join(checkpoint, CALIBRATION)
        return json.loads(storage.read_text(path)) if storage.exists(path) else None
    path = storage.join(checkpoint, CALIBRATIONS, f"{check_calibration_name(name)}.json")
    if not storage.exists(path):
        names = calibration_names(checkpoint)
        held = f"it holds {', '.join(names)}" if names else "it holds none (age calibrate stores one)"
        raise MissingInput(f"checkpoint {checkpoint} has no calibration named {name!r}: {held}")
    return json.loads(storage.read_text(path))


def preprocessing(meta: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    state_path = Path(path) / TRAIN_STATE
    return torch.load(state_path, map_location="cpu", weights_only=True) if state_path.is_file() else None
