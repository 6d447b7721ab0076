"""Shared fixtures: small real subsets of ../shared/data/faces and bad files made on the spot."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pytest
from PIL import Image

FACES = Path(os.environ.get("AGECORE_FACES", Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path, hidden: int = 16, seed: int = 0, val_mae: float = 6.0, epoch: int = 0) -> Path:
    """An untrained 64 px ``test_resnet`` checkpoint (flip TTA on); another seed or ``hidden`` gives other weights."""
    import torch

    from agecore.checkpoint import save_checkpoint
    from agecore.config import ModelConfig, Preprocessing
    from agecore.model import create_model

    cfg = ModelConfig(backbone="test_resnet", pretrained="none", hidden=hidden)
    torch.manual_seed(seed)
    return save_checkpoint(path, create_model(cfg).eval(), cfg, Preprocessing(64, (0.5,) * 3, (0.5,) * 3),
                           metrics={"val_mae": val_mae}, train_cfg={"tta_flip": True}, epoch=epoch)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def missing(what: str) -> NoReturn:
    """Skip where something a test needs is absent; in CI (``CI=true``) fail instead, so that a green
    run there always means every test ran."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI runs every test: install it)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def faces_root() -> Path:
    if not (FACES / "labels.csv").is_file():
        missing(f"face data not found at {FACES}: set AGECORE_FACES to a folder with labels.csv and final_files/")
    return FACES


@pytest.fixture(scope="session")
def facenet() -> None:
    """The face detector's package, which the tests of detection need."""
    if importlib.util.find_spec("facenet_pytorch") is None:
        missing('facenet-pytorch is not installed: pip install --no-deps "facenet-pytorch==2.6.0" (scripts/setup.sh does)')


def subset(faces_root: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` labelled rows spread over all ages (every 1/n-th row of the age-sorted list)."""
    labels = pd.read_csv(faces_root / "labels.csv").sort_values(["real_age", "file_name"]).reset_index(drop=True)
    idx = np.linspace(0, len(labels) - 1, n).round().astype(int)
    return labels.iloc[np.unique(idx)].reset_index(drop=True)


def make_labels_dir(faces_root: Path, dest: Path, n: int) -> Path:
    """A reference-layout folder (labels.csv + final_files/) of ``n`` real faces, linked not copied."""
    rows = subset(faces_root, n)
    (dest / "final_files").mkdir(parents=True)
    for name in rows["file_name"]:
        os.symlink(faces_root / "final_files" / name, dest / "final_files" / name)
    rows.to_csv(dest / "labels.csv", index=False)
    return dest


def jpeg_bytes(size=(64, 64), color=(120, 80, 60), mode="RGB", fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buf, fmt, **kw)
    return buf.getvalue()


def plant_bad_files(folder: Path, real_jpeg: Path) -> dict[str, str]:
    """Write one file per reject reason into ``folder``; returns file name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good = real_jpeg.read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "tiny.jpg").write_bytes(jpeg_bytes((8, 8)))
    # a decompression bomb: a small PNG file that decodes to more pixels than the limit
    Image.new("L", (9000, 9000)).save(folder / "bomb.png", optimize=True)
    shutil.copy(real_jpeg, folder / "copy_a.jpg")
    shutil.copy(real_jpeg, folder / "copy_b.jpg")
    return {
        "empty.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "text.jpg": "not_an_image",
        "tiny.jpg": "too_small",
        "bomb.png": "too_many_pixels",
        "missing.jpg": "missing_file",
        "copy_a.jpg": "conflicting_duplicate",
        "copy_b.jpg": "conflicting_duplicate",
    }


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs seconds on 2 cores).

    With the dashboard, as ``init_ray`` starts it: Ray Train's clean-up of stopped runs needs its State API.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_small(faces_root, tmp_path_factory, ray_local) -> Path:
    """300 real faces prepared at 64 px through the real job: the input of the training tests."""
    from agecore.config import PrepareConfig
    from ray_jobs.prepare import prepare

    root = tmp_path_factory.mktemp("faces300")
    data = make_labels_dir(faces_root, root / "data", 300)
    out = root / "prepared"
    prepare(PrepareConfig(data=str(data), out=str(out), image_size=64, val_fraction=0.2, seed=0), "bicubic")
    return out
