"""Evaluate a checkpoint on labelled faces: metrics overall, per age band, per gender and race, plots.

    python -m ray_jobs.evaluate --checkpoint runs/train/best --data runs/prepared --out runs/eval
    python -m ray_jobs.evaluate --checkpoint runs/train/best --data other_faces/ --out runs/eval-other
    python -m ray_jobs.evaluate --checkpoint runs/train/best --data photos/ --out runs/eval-photos

``--data`` takes a prepared folder (its ``--split``: by default test where one is held out, else val)
or anything ``prepare`` reads; images that are not a prepared set go through the photo rule of
``--detect-faces`` (default ``auto``: crops as they are, faces found in any other photo).
``--attach`` stores the signed-error quantiles per age band beside the checkpoint: the age-verification
endpoint's margin, measured on the validation split of a prepared set (never its test split), or on the
images given where ``--data`` is not a prepared set (the report then says in-sample).
``--calibration NAME`` corrects every estimate with a calibration that ``age calibrate`` stored in the
checkpoint, and draws the verification figures with its margins.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd
import ray

from agecore import storage
from agecore.checkpoint import read_calibration, read_meta
from agecore.config import FORMATS, detect_mode
from agecore.datasets import REJECT_COLUMNS, read_records, validate_labels
from agecore.errors import InvalidInput
from agecore.evaluate import build_report, choose_calibration
from agecore.faces import require_mtcnn
from agecore.predictor import BatchPredictor
from agecore.prepare import is_prepared, resolve_split, split_dir
from ray_jobs.common import (
    PREDICT_BATCH_ROWS,
    add_address_argument,
    add_precision_argument,
    init_ray,
    model_actor_options,
    read_parquet,
    setup_logging,
)
from ray_jobs.options import add_calibration_argument, add_detect_faces_argument

log = logging.getLogger("ray_jobs.evaluate")


def most_confident_face(rows: pd.DataFrame) -> pd.DataFrame:
    """Face rows (several per photo) -> one row per photo: its most confident face, or its one
    no-face or unusable row; ``faces_found`` says how many faces the photo had."""
    rows = rows.assign(faces_found=rows.groupby("path", sort=False)["face"].transform("count"))
    best = rows.sort_values("face_score", ascending=False, na_position="last", kind="stable")
    return best.drop_duplicates("path").sort_index()


def predict_table(checkpoint: str, data: str, fmt: str = "auto", split: str = "val", gpu: bool = False,
                  batch_size: int = PREDICT_BATCH_ROWS, precision: str | None = None, detect_faces: bool | str = "auto",
                  calibration: str | None = None) -> pd.DataFrame:
    """One row per labelled image: path, age, predicted_age, error (+ gender/race where known).

    ``detect_faces`` ``auto`` or ``true`` on images (not a prepared set): each is scored by its most
    confident face (a face crop, with ``auto``, as it is), and a photo without one keeps its row
    with error ``no_face: ...``. A prepared set is face crops by construction. ``calibration``: the
    named calibration whose correction applies to every estimate.
    """
    detect_faces = detect_mode(detect_faces)
    prepared = is_prepared(data)
    if prepared and detect_faces == "true":
        raise InvalidInput(f"--detect-faces true needs photos; {data} is a prepared set of face crops")
    detect_faces = "false" if prepared else detect_faces
    options, threads = model_actor_options(gpu)
    predictor_args = {"checkpoint": storage.absolute(checkpoint), "threads": threads or None,
                      "device": "cuda" if gpu else "cpu", "precision": precision, "detect_faces": detect_faces,
                      "calibration": calibration}
    if prepared:
        ds = read_parquet(split_dir(data, split))
        keep = [c for c in ("path", "age", "gender", "race", "image") if c in ds.columns()]
        ds = ds.select_columns(keep)
        rejects = pd.DataFrame(columns=REJECT_COLUMNS)
    else:
        records, _ = read_records(data, fmt)
        records, rejects = validate_labels(records)
        ds = ray.data.from_pandas(records).repartition(max(1, len(records) // 500))
    table = ds.map_batches(BatchPredictor, fn_constructor_kwargs=predictor_args, batch_size=batch_size,
                           batch_format="numpy", **options).to_pandas()
    if detect_faces != "false":
        table = most_confident_face(table).drop(columns=["face", "box"])
    if len(rejects):  # bad labels are reported as unscored rows, not dropped
        table = pd.concat([table, pd.DataFrame({"path": rejects["path"], "age": float("nan"),
                                                "predicted_age": float("nan"),
                                                "error": rejects["reason"] + ": " + rejects["detail"]})])
    return table.drop(columns=["image"], errors="ignore").reset_index(drop=True)


def evaluate(checkpoint: str, data: str, out: str, fmt: str = "auto", split: str | None = None, attach: bool = False,
             gpu: bool = False, address: str | None = None, precision: str | None = None,
             detect_faces: bool | str = "auto", calibration: str | None = None) -> dict:
    """Report on ``split`` of a prepared set (default: test where held out, else val) or on labelled
    images, each by its most confident face (``predict_table``); with ``calibration``, on estimates
    corrected by that named calibration (and its margins)."""
    meta = read_meta(checkpoint)  # fail early on a wrong path, before starting Ray
    named = _named_calibration(checkpoint, calibration, attach)  # and on a calibration it does not hold
    if detect_mode(detect_faces) != "false" and not is_prepared(data):
        require_mtcnn()  # and so does a missing face detector
    split = resolve_split(data, split)
    init_ray(address)
    table = predict_table(checkpoint, data, fmt, split or "val", gpu, precision=precision, detect_faces=detect_faces,
                          calibration=calibration)

    def validation() -> pd.DataFrame:  # the calibration set: never the test split being reported
        return table if split == "val" else predict_table(checkpoint, data, fmt, "val", gpu, precision=precision)

    if named is not None:
        cal, note = named
    else:
        cal, note = choose_calibration(checkpoint, data, split, table, validation if split else None, attach)
    with storage.output_dir(out) as local:
        table.to_parquet(local / "predictions.parquet", index=False)
        report = build_report(table, local, meta, split=split, calibration=cal, calibration_note=note)
    m = report["metrics"]
    log.info("%s: MAE %.3f  RMSE %.3f  CS@5 %.1f%%  bias %+.2f on %d images (%d unscored); report in %s",
             f"split {split}" if split else data, m["mae"], m["rmse"], 100 * m["cs5"], m["bias"], report["scored"],
             report["unscored"], out)
    log.info("verification figures: calibration %s", note)
    return report


def _named_calibration(checkpoint: str, name: str | None, attach: bool) -> tuple[dict, str] | None:
    """The named calibration and the report's sentence about it, or None where none is named."""
    if name is None:
        return None
    if attach:
        raise InvalidInput("--attach measures the model's own margins; it does not go with --calibration")
    cal = read_calibration(checkpoint, name)
    note = (f"the checkpoint's calibration {name!r} (age calibrate, on {cal.get('data', 'an unrecorded set')}): "
            "its correction applies to every estimate, its margins draw the likely ranges; on its own photos "
            "these figures are in-sample")
    return cal, note


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or URI (a training run's best/)")
    p.add_argument("--data", required=True, help="prepared folder, labels.csv folder, UTKFace folder or manifest")
    p.add_argument("--out", required=True, help="report folder: report.md, report.json, predictions and plots")
    p.add_argument("--format", default="auto", choices=FORMATS, help="layout of --data where it is not prepared")
    p.add_argument("--split", default=None,
                   help="split of a prepared folder (default: test where one is held out, else val)")
    p.add_argument("--attach", action="store_true", help="store error quantiles beside the checkpoint")
    p.add_argument("--gpu", action="store_true", help="one GPU per scoring actor")
    add_precision_argument(p)
    add_detect_faces_argument(p, "Each image is scored by its most confident face; photos without one are counted "
                                 "and listed (no_face.csv). A prepared set is crops")
    add_calibration_argument(p)
    add_address_argument(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    return evaluate(args.checkpoint, args.data, args.out, args.format, args.split, args.attach, args.gpu, args.address,
                    args.precision, args.detect_faces, args.calibration)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("evaluate")
