"""Validate, decode, split and store a labelled face collection as Parquet shards, with Ray Data.

    python -m ray_jobs.prepare --data ../shared/data/faces --out runs/prepared
"""

from __future__ import annotations

import argparse
import logging
import time

import pandas as pd
import ray

from agecore import storage
from agecore.config import ModelConfig, PrepareConfig
from agecore.datasets import REJECT_COLUMNS, read_records, validate_labels
from agecore.faces import require_mtcnn
from agecore.model import default_preprocessing
from agecore.prepare import SplitPlan, attach_split, decode_batch, plan_splits, write_report
from ray_jobs.common import add_address_argument, init_ray, setup_logging
from ray_jobs.options import add_config_arguments, config_from_args, override_defaults

log = logging.getLogger("ray_jobs.prepare")

META_COLUMNS = ["path", "age", "digest", "error_reason", "error_detail"]


def _read_labels(cfg: PrepareConfig) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The labelled rows, shuffled; the rows whose labels are unusable; the layout they were read as."""
    records, fmt = read_records(cfg.data, cfg.format)
    log.info("%s: %d rows read as %s", cfg.data, len(records), fmt)
    records, label_rejects = validate_labels(records, cfg.max_age)
    # Shards keep row order, and collections are often sorted (UTKFace names start with the age): shuffle
    # once here, or every training batch drawn through a local shuffle buffer would hold one age.
    records = records.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)
    if cfg.strict and len(label_rejects):
        raise ValueError(f"--strict: {len(label_rejects)} label rows rejected, first: {label_rejects.iloc[0].to_dict()}")
    return records, label_rejects, fmt


def _decode(records: pd.DataFrame, cfg: PrepareConfig, interpolation: str) -> ray.data.Dataset:
    """Every image decoded and resized once, in Ray Data tasks, and kept for the two passes that read it."""
    n_blocks = max(2, min(200, len(records) // 256))
    return (
        ray.data.from_pandas(records)
        .repartition(n_blocks)
        .map_batches(
            decode_batch,
            fn_kwargs={"size": cfg.image_size, "interpolation": interpolation,
                       "max_pixels": cfg.max_pixels, "min_side": cfg.min_side, "detect_faces": cfg.detect_faces},
            batch_size=64,
            batch_format="numpy",
        )
        .materialize()  # decoded once; the metadata pass and the shard write both read it
    )


def _all_rejects(cfg: PrepareConfig, label_rejects: pd.DataFrame, plan: SplitPlan) -> pd.DataFrame:
    """The label and image rejects together; raises on ``strict`` rejects, or when no image is usable."""
    rejects = pd.concat([label_rejects, plan.rejects], ignore_index=True)[REJECT_COLUMNS]
    if cfg.strict and len(rejects):
        raise ValueError(f"--strict: {len(rejects)} rows rejected, first: {rejects.iloc[0].to_dict()}")
    if not plan.split_of_path:
        raise ValueError(f"{cfg.data}: no usable image; see the reasons in the rejects ({len(rejects)} rows)")
    return rejects


def _write_shards(decoded: ray.data.Dataset, split_of_path: dict[str, str], out: str) -> None:
    """The accepted images as Parquet shards under ``out/data/split=...``, replacing whatever the folder held."""
    data_dir = storage.join(out, "data")
    storage.delete_dir(data_dir)  # a rerun replaces the shards rather than mixing two runs
    # the shards go straight to OUT (a folder or a URI), written by Ray Data's tasks wherever they run
    decoded.map_batches(
        attach_split, fn_kwargs={"split_of_path": split_of_path}, batch_format="numpy"
    ).write_parquet(data_dir, partition_cols=["split"])


def _log_summary(summary: dict, out: str) -> None:
    """One line of counts and speed, then the report's warnings."""
    log.info(
        "accepted %d, rejected %d %s; splits %s; %.1f images/s; report in %s",
        summary["accepted"], summary["rejected"], summary["rejected_by_reason"] or "",
        {s: v["count"] for s, v in summary["splits"].items()}, summary["images_per_second"] or 0,
        storage.join(out, "report"),
    )
    for warning in summary["warnings"]:
        log.warning(warning)


def prepare(cfg: PrepareConfig, interpolation: str = "bicubic", address: str | None = None) -> dict:
    """Run the whole preparation; returns the report summary. Raises on ``strict`` rejects."""
    start = time.perf_counter()
    out = storage.absolute(cfg.out)
    if cfg.detect_faces != "false":
        require_mtcnn()  # a missing detector is said before any work
    records, label_rejects, fmt = _read_labels(cfg)
    init_ray(address)
    decoded = _decode(records, cfg, interpolation)
    meta = decoded.select_columns(META_COLUMNS).to_pandas()
    plan = plan_splits(meta, cfg)
    rejects = _all_rejects(cfg, label_rejects, plan)
    _write_shards(decoded, plan.split_of_path, out)
    kept = meta[meta["path"].isin(plan.split_of_path)].copy()
    kept["split"] = kept["path"].map(plan.split_of_path)
    with storage.output_dir(out) as local:
        summary = write_report(local, cfg, fmt, len(records) + len(label_rejects), kept, rejects,
                               time.perf_counter() - start, interpolation)
    _log_summary(summary, out)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """``age prepare``'s options: one per ``PrepareConfig`` field, the backbone and the Ray address."""
    p = argparse.ArgumentParser(prog="age prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, PrepareConfig)
    p.add_argument("--backbone", default=ModelConfig.backbone,
                   help="timm model whose data config sets the image size and interpolation (default: %(default)s)")
    add_address_argument(p)
    override_defaults(p, {"image_size": (None, "the backbone's input size")})
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    prep = default_preprocessing(args.backbone)
    cfg = config_from_args(PrepareConfig, args, data=storage.absolute(args.data),
                           image_size=args.image_size or prep.input_size)
    return prepare(cfg, prep.interpolation, args.address)


if __name__ == "__main__":
    from ray_jobs.cli import run_stage

    run_stage("prepare")
