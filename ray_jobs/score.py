"""Bulk age scoring of an image collection with Ray Data: exactly one output row per input, always.

    python -m ray_jobs.score --checkpoint runs/train/best --input photos/ --out runs/scores
    python -m ray_jobs.score --checkpoint runs/train/best --input s3://bucket/faces/ --out s3://bucket/scores

``--input`` is a folder (searched recursively by image extension), a manifest CSV/Parquet with
a ``path`` column, or a URI that pyarrow opens. ``--out`` is a Parquet data set (a folder of
part files) with ``path``, ``predicted_age`` (null where the image is unusable) and ``error``.

Resumable: parts are written atomically as results stream in; a rerun over the same input and
output scores only the paths no part holds yet, so no row is lost or written twice.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray

from agecore.checkpoint import read_meta
from agecore.datasets import list_images
from agecore.predictor import BatchPredictor
from ray_jobs.common import init_ray, model_actor_options, setup_logging

log = logging.getLogger("ray_jobs.score")

SCHEMA = pa.schema([("path", pa.string()), ("predicted_age", pa.float32()), ("error", pa.string())])


def _output_fs(out: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in out:
        return pyarrow.fs.FileSystem.from_uri(out)
    return pyarrow.fs.LocalFileSystem(), str(Path(out).resolve())


def done_paths(out: str) -> set[str]:
    """Paths already scored by earlier runs into ``out`` (read from the part files' path column)."""
    fs, root = _output_fs(out)
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        return set()
    parts = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(root))
             if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")]
    done: set[str] = set()
    for part in parts:
        done.update(pq.read_table(part, columns=["path"], filesystem=fs).column("path").to_pylist())
    return done


def _write_part(fs: pyarrow.fs.FileSystem, root: str, rows: pd.DataFrame, index: int) -> None:
    """Write-then-rename, so an interrupted run never leaves half a part behind."""
    name = f"part-{int(time.time())}-{index:05d}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = f"{root}/.tmp-{name}"
    table = pa.Table.from_pandas(rows[["path", "predicted_age", "error"]], schema=SCHEMA, preserve_index=False)
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{root}/{name}")


def score(checkpoint: str, input: str, out: str, batch_size: int = 64, concurrency: int | None = None,
          gpu: bool = False, rows_per_part: int = 5000, address: str | None = None) -> dict:
    read_meta(checkpoint)  # a wrong checkpoint path fails here, before any work
    paths = list_images(input)
    fs, root = _output_fs(out)
    fs.create_dir(root, recursive=True)
    for stale in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        if stale.base_name.startswith(".tmp-"):  # a part an interrupted run did not finish writing
            fs.delete_file(stale.path)
    done = done_paths(out)
    todo = [p for p in dict.fromkeys(paths) if p not in done]
    log.info("%d images in %s; %d already scored in %s; %d to score", len(paths), input, len(done), out, len(todo))
    start, written, failed = time.perf_counter(), 0, 0
    if todo:
        init_ray(address)
        options, threads = model_actor_options(gpu, concurrency)
        ds = ray.data.from_pandas(pd.DataFrame({"path": todo})).repartition(max(1, len(todo) // (batch_size * 4)))
        scored = ds.map_batches(
            BatchPredictor,
            fn_constructor_kwargs={"checkpoint": str(Path(checkpoint).resolve()), "threads": threads or None,
                                   "device": "cuda" if gpu else "cpu"},
            batch_size=batch_size, batch_format="numpy", **options,
        )
        for i, batch in enumerate(scored.iter_batches(batch_size=rows_per_part, batch_format="pandas")):
            _write_part(fs, root, batch, i)
            written += len(batch)
            failed += int((batch["error"] != "").sum())
            log.info("scored %d / %d (%.1f images/s)", written, len(todo), written / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    summary = {"input": input, "images": len(paths), "skipped_already_scored": len(paths) - len(todo),
               "scored_now": written, "unusable_now": failed, "seconds": round(seconds, 1),
               "images_per_second": round(written / seconds, 1) if written else None}
    log.info("done: %s", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="age score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="folder, manifest .csv/.parquet with path, or URI")
    p.add_argument("--out", required=True, help="output Parquet folder (local or URI)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=None, help="predictor actors (default: one per 2 CPUs or per GPU)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--address", default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    return score(args.checkpoint, args.input, args.out, args.batch_size, args.concurrency, args.gpu,
                 address=args.address)


if __name__ == "__main__":
    main()
