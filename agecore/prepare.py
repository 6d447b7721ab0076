"""The pieces of data preparation that need no cluster: batch decoding, the split plan, the report.

``ray_jobs.prepare`` strings them together with Ray Data; a notebook can call them directly.

Prepared layout::

    OUT/prepare.json             resolved config, counts, image size and interpolation
    OUT/data/split=NAME/*.parquet  image (uint8 HxWx3), age, path, digest, gender, race
    OUT/rejects.csv              path, reason, detail: every row that was not used
    OUT/report/summary.json, age_hist.png, samples.png
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from agecore import plots, storage
from agecore.config import PrepareConfig
from agecore.datasets import REJECT_COLUMNS, assign_splits, resolve_duplicates
from agecore.errors import InvalidInput, MissingInput
from agecore.faces import CROP_PAD, NO_FACE, UTKFACE_TEMPLATE, FaceDetector, crops_of, largest
from agecore.images import ImageError, content_digest, load_image, open_image
from agecore.metrics import AGE_BAND_LABELS, age_band

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INFO = "prepare.json"  # what a prepared set holds and how it was made: its presence marks one
# a band of the validation split needs this many faces for its 5% and 95% error quantiles (the likely
# range of /v1/verify) to be more than its most extreme errors
MIN_CALIBRATION_BAND = 20


@functools.cache
def _detector() -> FaceDetector:
    """One MTCNN per worker process: decode tasks of a prepare run reuse it."""
    return FaceDetector()


def face_crop(img: Image.Image, size: int, interpolation: str, detect_faces: str) -> np.ndarray:
    """The training crop of a labelled photo: its largest face aligned onto the UTKFace chips' landmark
    layout (with ``auto``, an image framed like a chip already is taken as it is), or ``ImageError``
    ``no_face`` where none is found."""
    faces = _detector().detect(img, pad=CROP_PAD)
    if not faces:
        raise ImageError(NO_FACE, f"no face with score >= {_detector().config.min_score} found")
    return crops_of(img, [largest(faces)], UTKFACE_TEMPLATE, size, interpolation, detect_faces)[1][0]


def decode_batch(
    batch: dict[str, np.ndarray], size: int, interpolation: str, max_pixels: int, min_side: int,
    detect_faces: str = "false",
) -> dict[str, np.ndarray]:
    """Decode and preprocess one batch of records; a bad image becomes an error row, never an exception.

    Adds ``image`` (N, size, size, 3 uint8; zeros where decoding failed), ``digest``,
    ``error_reason`` and ``error_detail`` (empty strings where the image is good). With
    ``detect_faces`` ``auto`` or ``true`` the records are photos, and ``face_crop`` makes each image.
    """
    n = len(batch["path"])
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    digests, reasons, details = [""] * n, [""] * n, [""] * n
    for i, path in enumerate(batch["path"]):
        try:
            img = open_image(str(path), max_pixels=max_pixels, min_side=min_side)
            digests[i] = content_digest(img)
            images[i] = (load_image(img, size, interpolation) if detect_faces == "false"
                         else face_crop(img, size, interpolation, detect_faces))
        except ImageError as e:
            reasons[i], details[i] = e.reason, e.detail
    out = dict(batch)
    out.update(
        image=images,
        digest=np.array(digests, dtype=object),
        error_reason=np.array(reasons, dtype=object),
        error_detail=np.array(details, dtype=object),
    )
    return out


@dataclass(frozen=True)
class SplitPlan:
    """Which decoded rows are kept, in which split, and which are rejected and why."""

    split_of_path: dict[str, str]
    rejects: pd.DataFrame


def plan_splits(meta: pd.DataFrame, cfg: PrepareConfig) -> SplitPlan:
    """From the decoded rows' metadata (path, age, digest, error_reason, error_detail) to a plan."""
    failed = meta["error_reason"] != ""
    decode_rejects = pd.DataFrame(
        {"path": meta.loc[failed, "path"], "reason": meta.loc[failed, "error_reason"],
         "detail": meta.loc[failed, "error_detail"]}
    )
    good = meta.loc[~failed, ["path", "age", "digest"]]
    conflicts = resolve_duplicates(good)
    good = good[~good["path"].isin(conflicts["path"])]
    splits = assign_splits(good, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    rejects = pd.concat([decode_rejects, conflicts], ignore_index=True)[REJECT_COLUMNS]
    return SplitPlan(dict(zip(good["path"], splits, strict=True)), rejects)


def attach_split(batch: dict[str, np.ndarray], split_of_path: dict[str, str]) -> dict[str, np.ndarray]:
    """Keep the planned rows of a decoded batch and add their ``split``; drop the error columns."""
    splits = np.array([split_of_path.get(str(p), "") for p in batch["path"]], dtype=object)
    keep = splits != ""
    out = {k: v[keep] for k, v in batch.items() if k not in ("error_reason", "error_detail")}
    out["split"] = splits[keep]
    return out


def age_stats(ages: np.ndarray) -> dict[str, Any]:
    ages = np.asarray(ages, dtype=float)
    if len(ages) == 0:
        return {"count": 0}
    bands = age_band(ages)
    return {
        "count": len(ages),
        "mean": round(float(ages.mean()), 2),
        "std": round(float(ages.std()), 2),
        "median": float(np.median(ages)),
        "min": float(ages.min()),
        "max": float(ages.max()),
        "per_band": {lab: int(np.sum(bands == i)) for i, lab in enumerate(AGE_BAND_LABELS)},
    }


def pick_samples(meta: pd.DataFrame, per_band: int = 2, seed: int = 0) -> pd.DataFrame:
    """A few rows from each age band, youngest first, for the sample grid."""
    rng = np.random.default_rng(seed)
    bands = age_band(meta["age"].to_numpy())
    picks = []
    for b in range(len(AGE_BAND_LABELS)):
        idx = np.flatnonzero(bands == b)
        picks.extend(rng.choice(idx, size=min(per_band, len(idx)), replace=False).tolist())
    return meta.iloc[sorted(picks, key=lambda i: meta["age"].iloc[i])]


def split_warnings(val_ages: np.ndarray) -> list[str]:
    """The age bands in which the validation split is too small to calibrate age verification, in one line.

    >>> split_warnings(np.array([30.0] * 25 + [70.0] * 3 + [1.0] * 5))
    ['validation split: under 20 faces in band 0-2 (5), 65+ (3): the likely range of /v1/verify there rests on its few largest errors; raise --val-fraction']
    """
    counts = np.bincount(age_band(np.asarray(val_ages, dtype=float)), minlength=len(AGE_BAND_LABELS))
    small = [f"{label} ({n})" for label, n in zip(AGE_BAND_LABELS, counts.tolist(), strict=True)
             if 0 < n < MIN_CALIBRATION_BAND]
    if not small:
        return []
    return [f"validation split: under {MIN_CALIBRATION_BAND} faces in band {', '.join(small)}: the likely range of "
            "/v1/verify there rests on its few largest errors; raise --val-fraction"]


def write_report(
    out: Path,
    cfg: PrepareConfig,
    fmt: str,
    listed: int,
    kept: pd.DataFrame,
    rejects: pd.DataFrame,
    seconds: float,
    interpolation: str,
) -> dict[str, Any]:
    """rejects.csv, prepare.json and report/ (summary.json, age_hist.png, samples.png)."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    rejects.to_csv(out / "rejects.csv", index=False)
    by_split = {s: kept.loc[kept["split"] == s, "age"].to_numpy() for s in SPLITS if (kept["split"] == s).any()}
    summary = {
        "data": cfg.data,
        "format": fmt,
        "image_size": cfg.image_size,
        "interpolation": interpolation,
        "listed": listed,
        "accepted": len(kept),
        "rejected": len(rejects),
        "rejected_by_reason": {str(k): int(v) for k, v in rejects["reason"].value_counts().items()},
        "splits": {s: age_stats(a) for s, a in by_split.items()},
        "warnings": split_warnings(by_split.get("val", np.array([]))),
        "seconds": round(seconds, 1),
        "images_per_second": round(listed / seconds, 1) if seconds > 0 else None,
    }
    (report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / INFO).write_text(
        json.dumps({"config": cfg.to_dict(), "format": fmt, "image_size": cfg.image_size,
                    "interpolation": interpolation, "counts": {s: len(a) for s, a in by_split.items()}},
                   indent=2) + "\n"
    )
    plots.age_histogram(by_split, report / "age_hist.png")
    samples = pick_samples(kept[kept["split"] == "train"], seed=cfg.seed)
    images = [load_image(p, 128) for p in samples["path"]]
    plots.sample_grid(images, samples["age"].tolist(), report / "samples.png")
    return summary


def read_prepare_info(prepared: str | Path) -> dict[str, Any]:
    """prepare.json, with the report's per-split age statistics under ``splits`` (a folder or a URI)."""
    path = storage.join(prepared, INFO)
    if not storage.exists(path):
        raise MissingInput(f"{prepared} is not a prepared data set (no prepare.json): run `age prepare` first")
    info = json.loads(storage.read_text(path))
    info["splits"] = json.loads(storage.read_text(storage.join(prepared, "report", "summary.json")))["splits"]
    return info


def split_dir(prepared: str | Path, split: str) -> str:
    return storage.join(prepared, "data", f"split={split}")


def is_prepared(data: str | Path) -> bool:
    """Whether ``data`` (a folder or a URI) is the output of ``age prepare``."""
    return storage.exists(storage.join(data, INFO))


def resolve_split(data: str | Path, split: str | None) -> str | None:
    """The split of a prepared set to evaluate: ``split`` where given, else test where one is held out, else val.

    None where ``data`` is not a prepared set (every labelled image is evaluated); a split the set
    does not hold, or a split asked of data that have none, is the user's error.
    """
    if not is_prepared(data):
        if split is not None:
            raise InvalidInput(f"--split {split}: {data} is not a prepared folder (no prepare.json), so it has no splits")
        return None
    held = sorted(s for s, n in read_prepare_info(data)["counts"].items() if n)
    if split is None:
        return "test" if "test" in held else "val"
    if split not in held:
        raise InvalidInput(f"--split {split}: {data} holds the splits {held}")
    return split
