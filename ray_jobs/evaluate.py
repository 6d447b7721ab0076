"""Evaluate a checkpoint on labelled faces: metrics overall, per age band, per gender and race, plots.

    python -m ray_jobs.evaluate --checkpoint runs/train/best --data runs/prepared --out runs/eval
    python -m ray_jobs.evaluate --checkpoint runs/train/best --data other_faces/ --out runs/eval-other

``--data`` takes a prepared folder (its ``--split``, default val) or anything ``prepare`` reads.
``--attach`` stores the signed-error quantiles per age band beside the checkpoint, which the
age-verification endpoint uses as its margin.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd
import ray

from agecore import storage
from agecore.checkpoint import read_meta
from agecore.config import FORMATS
from agecore.datasets import read_records, validate_labels
from agecore.evaluate import attach_calibration, build_report, calibration
from agecore.predictor import BatchPredictor
from agecore.prepare import split_dir
from ray_jobs.common import add_precision_argument, init_ray, model_actor_options, read_parquet, setup_logging

log = logging.getLogger("ray_jobs.evaluate")


def predict_table(checkpoint: str, data: str, fmt: str = "auto", split: str = "val", gpu: bool = False,
                  batch_size: int = 64, precision: str | None = None) -> pd.DataFrame:
    """One row per labelled image: path, age, predicted_age, error (+ gender/race where known)."""
    options, threads = model_actor_options(gpu)
    predictor_args = {"checkpoint": storage.absolute(checkpoint), "threads": threads or None,
                      "device": "cuda" if gpu else "cpu", "precision": precision}
    if storage.exists(storage.join(data, "prepare.json")):
        ds = read_parquet(split_dir(data, split))
        keep = [c for c in ("path", "age", "gender", "race", "image") if c in ds.columns()]
        ds = ds.select_columns(keep)
        rejects = pd.DataFrame(columns=["path", "reason", "detail"])
    else:
        records, _ = read_records(data, fmt)
        records, rejects = validate_labels(records)
        ds = ray.data.from_pandas(records).repartition(max(1, len(records) // 500))
    table = ds.map_batches(BatchPredictor, fn_constructor_kwargs=predictor_args, batch_size=batch_size,
                           batch_format="numpy", **options).to_pandas()
    if len(rejects):  # bad labels are reported as unscored rows, not dropped
        table = pd.concat([table, pd.DataFrame({"path": rejects["path"], "age": float("nan"),
                                                "predicted_age": float("nan"),
                                                "error": rejects["reason"] + ": " + rejects["detail"]})])
    return table.drop(columns=["image"], errors="ignore").reset_index(drop=True)


def evaluate(checkpoint: str, data: str, out: str, fmt: str = "auto", split: str = "val", attach: bool = False,
             gpu: bool = False, address: str | None = None, precision: str | None = None) -> dict:
    meta = read_meta(checkpoint)  # fail early on a wrong path, before starting Ray
    init_ray(address)
    table = predict_table(checkpoint, data, fmt, split, gpu, precision=precision)
    with storage.output_dir(out) as local:
        table.to_parquet(local / "predictions.parquet", index=False)
        report = build_report(table, local, meta)
    m = report["metrics"]
    log.info("MAE %.3f  RMSE %.3f  CS@5 %.1f%%  bias %+.2f on %d images (%d unscored); report in %s",
             m["mae"], m["rmse"], 100 * m["cs@5"], m["bias"], report["scored"], report["unscored"], out)
    if attach:
        scored = table[table["error"] == ""]
        path = attach_calibration(checkpoint, calibration(scored["age"].to_numpy(), scored["predicted_age"].to_numpy()),
                                  source=f"{data} ({split})")
        log.info("error quantiles per age band attached: %s", path)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="prepared folder, labels.csv folder, UTKFace folder or manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--split", default="val", help="split of a prepared folder (default val)")
    p.add_argument("--attach", action="store_true", help="store error quantiles beside the checkpoint")
    p.add_argument("--gpu", action="store_true")
    add_precision_argument(p)
    p.add_argument("--address", default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    return evaluate(args.checkpoint, args.data, args.out, args.format, args.split, args.attach, args.gpu, args.address,
                    args.precision)


if __name__ == "__main__":
    main()
