"""Calibrate a checkpoint to your own labelled photos: a named correction and verification margins.

    age calibrate --checkpoint runs/faces/train/best --data my_photos/manifest.csv --name family \\
        --person-from prefix:3

``--data`` is a manifest ``path,age[,person]`` (paths relative to it) or a labelled folder. Each photo
is scored by its largest face (found by MTCNN and aligned like the training crops); photos without a
face are counted and listed, never dropped silently. The correction (none, shift, linear, log-linear
or isotonic) is chosen by person-grouped cross-validation, and the report gives before/after figures
on people left out of each fit (docs/calibration.md). The calibration is stored in the checkpoint as
``calibrations/NAME.json``; use it with ``Predictor(..., calibration=NAME)`` or ``--calibration NAME``.

Small sets (hundreds of photos) need no cluster: this job runs in one process, without Ray. Face
detections are kept in ``OUT/faces.parquet`` and reused by a rerun into the same ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from agecore import __version__, storage
from agecore.calibration import (
    calibrate,
    check_counts,
    detect_photos,
    estimate_faces,
    people_of,
    write_report,
)
from agecore.checkpoint import read_calibration, read_meta, save_calibration, weights_digest
from agecore.config import CalibrateConfig
from agecore.datasets import read_records, validate_labels
from agecore.errors import InvalidInput
from agecore.faces import CROP_PAD, require_mtcnn
from agecore.metrics import fallback_margin
from agecore.predictor import Predictor
from ray_jobs.common import add_precision_argument, setup_logging
from ray_jobs.options import add_config_arguments, config_from_args

log = logging.getLogger("ray_jobs.calibrate")

NO_PERSON_WARNING = ("no person given (--person-from or a person column): every photo counts as a person of its "
                     "own, so photos of one person fall on both sides of a fold and the figures may be optimistic")


def labelled_photos(cfg: CalibrateConfig) -> tuple[pd.DataFrame, int, dict[str, Any]]:
    """The usable labelled rows with a ``person``, the count of rejected labels, and how people were told apart."""
    records, _ = read_records(cfg.data, cfg.format)
    if cfg.person_from and "person" in records:
        raise InvalidInput(f"{cfg.data} has a person column and --person-from was given: use one of them")
    ok, rejects = validate_labels(records)
    if cfg.person_from:
        ok["person"], rule = people_of(ok["path"].tolist(), cfg.person_from), f"--person-from {cfg.person_from}"
    elif "person" in ok:
        ok["person"], rule = ok["person"].astype(str), "the person column"
    else:
        ok["person"], rule = ok["path"].astype(str), "none: one person a photo"
    grouping = {"rule": rule, "people": int(ok["person"].nunique()),
                **({} if rule.startswith(("--", "the")) else {"warning": NO_PERSON_WARNING})}
    return ok, len(rejects), grouping


def detections(predictor: Predictor, paths: list[str], cache: Path) -> pd.DataFrame:
    """``detect_photos`` of ``paths``, reusing the rows a previous run kept in ``cache``."""
    kept = pd.read_parquet(cache) if cache.is_file() else pd.DataFrame(columns=["path"])
    kept = kept[kept["path"].isin(paths)]
    todo = [p for p in paths if p not in set(kept["path"])]
    log.info("finding faces in %d photos (%d found in %s already)", len(todo), len(kept), cache)
    fresh = detect_photos(todo, lambda photo: predictor.face_detector.detect(photo, pad=CROP_PAD),
                          predictor.no_face_message)
    table = pd.concat([kept, fresh], ignore_index=True) if len(kept) else fresh
    table.to_parquet(cache, index=False)
    return table.set_index("path").loc[paths].reset_index()


def photo_table(cfg: CalibrateConfig, out: Path, precision: str | None) -> tuple[pd.DataFrame, dict[str, Any], dict]:
    """One row per labelled photo with its raw estimate (NaN and ``error`` where unusable), the photo counts,
    and how people were told apart."""
    rows, bad_labels, grouping = labelled_photos(cfg)
    check_counts(len(rows), grouping["people"], cfg.folds)  # before minutes of face detection
    predictor = Predictor(cfg.checkpoint, precision=precision)  # no calibration: the model's own estimates
    faces = detections(predictor, rows["path"].tolist(), out / "faces.parquet")
    rows = rows.assign(error=faces["error"].to_numpy(), faces_found=faces["faces_found"].to_numpy(),
                       raw_age=estimate_faces(predictor, faces))
    no_face = rows["error"].str.startswith("no_face:")
    counts = {"listed": len(rows) + bad_labels, "bad_label": bad_labels, "without_face": int(no_face.sum()),
              "unusable": int(((rows["error"] != "") & ~no_face).sum()), "used": int((rows["error"] == "").sum()),
              "with_several_faces": int((rows["faces_found"] > 1).sum())}
    return rows, counts, grouping


def run(cfg: CalibrateConfig, precision: str | None = None) -> dict[str, Any]:
    """Fit, report and store the calibration ``cfg.name``; returns the report."""
    meta = read_meta(cfg.checkpoint)  # a wrong checkpoint fails here, before any work
    require_mtcnn()
    out = Path(cfg.out or f"runs/calibrate-{cfg.name}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, counts, grouping = photo_table(cfg, out, precision)
    used = rows[rows["error"] == ""].reset_index(drop=True)
    before = read_calibration(cfg.checkpoint)
    cal, figures = calibrate(used, before, fallback_margin(meta.get("metrics", {}).get("val_mae")), cfg.folds, cfg.seed)
    rows.loc[rows["error"] == "", "calibrated_age"] = figures.pop("left_out_estimates")
    rows.drop(columns=["faces_found"]).to_csv(out / "estimates.csv", index=False)
    provenance = {"source": "age calibrate", "data": storage.absolute(cfg.data), "grouping": grouping["rule"],
                  "photos_without_face": counts["without_face"], "weights": weights_digest(cfg.checkpoint),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "agecore": __version__,
                  "left_out": {k: figures["after"]["metrics"][k] for k in ("mae", "bias", "count")}
                  | {"coverage": figures["after"]["coverage"]["overall"]}}
    stored = save_calibration(cfg.checkpoint, cfg.name, {**cal, **provenance})
    report = {"name": cfg.name, "checkpoint": storage.absolute(cfg.checkpoint), "data": cfg.data, "stored": stored,
              "photos": counts, "grouping": grouping, "folds": cal["folds"], "correction": cal["correction"],
              "selection": cal["selection"], "pooled_bands": cal["pooled_bands"],
              "before_margins": _before_note(before), **figures,
              "seconds": round(time.perf_counter() - start, 1)}
    write_report(out, report, used, cal)
    _log_summary(report, out)
    return report


def _before_note(before: dict[str, Any] | None) -> str:
    if before is None:
        return "none stored with the checkpoint: estimate +/- twice its validation MAE"
    return f"the checkpoint's calibration.json, measured on {before.get('source', 'an unrecorded set')}"


def _log_summary(report: dict[str, Any], out: Path) -> None:
    b, a = report["before"], report["after"]
    log.info("%d photos of %d people used (%d without a face); correction %s, shrink %.2f",
             report["photos"]["used"], report["grouping"]["people"], report["photos"]["without_face"],
             report["correction"]["kind"], report["correction"]["shrink"])
    log.info("people left out: MAE %.2f -> %.2f, bias %+.2f -> %+.2f, likely range holds %s -> %s",
             b["metrics"]["mae"], a["metrics"]["mae"], b["metrics"]["bias"], a["metrics"]["bias"],
             b["coverage"]["overall"], a["coverage"]["overall"])
    if report["grouping"].get("warning"):
        log.warning(report["grouping"]["warning"])
    log.info("stored as %s; report in %s", report["stored"], out / "report.md")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, CalibrateConfig)
    add_precision_argument(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run(config_from_args(CalibrateConfig, args), args.precision)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("calibrate")
