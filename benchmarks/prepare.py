"""Images/s of ``age prepare`` against a plain single-process PIL loop doing the same work.

    python benchmarks/prepare.py --data ../shared/data/faces --out /tmp/bench-prepare

The loop reads, decodes, applies EXIF, converts to RGB, resizes and centre-crops with the same
``agecore.images`` functions, and writes the same uint8 pixels to Parquet with pyarrow; it does
not validate duplicates, split, or draw the report, which the Ray job does on top.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agecore.config import PrepareConfig
from agecore.datasets import read_records, validate_labels
from agecore.images import ImageError, load_image
from ray_jobs.common import setup_logging
from ray_jobs.prepare import prepare


def plain_loop(data: str, out: Path, size: int, chunk: int = 1000) -> tuple[int, float]:
    start = time.perf_counter()
    records, _ = read_records(data)
    records, _ = validate_labels(records)
    out.mkdir(parents=True, exist_ok=True)
    images, ages, paths, part = [], [], [], 0

    def flush() -> None:
        nonlocal images, ages, paths, part
        if not images:
            return
        flat = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(images).reshape(-1), pa.uint8()), size * size * 3)
        pq.write_table(pa.table({"image": flat, "age": ages, "path": paths}), out / f"part-{part:05d}.parquet")
        images, ages, paths, part = [], [], [], part + 1

    for path, age in zip(records["path"], records["age"], strict=True):
        try:
            images.append(load_image(path, size))
        except ImageError:
            continue
        ages.append(float(age))
        paths.append(path)
        if len(images) == chunk:
            flush()
    flush()
    return len(records), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()
    setup_logging()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = prepare(PrepareConfig(data=args.data, out=str(out / "ray"), image_size=args.image_size))
    ray_seconds = time.perf_counter() - start
    n, loop_seconds = plain_loop(args.data, out / "loop", args.image_size)
    print(f"\n{summary['listed']} images, {args.image_size} px:")
    print("| method | seconds | images/s |")
    print("|---|---:|---:|")
    print(f"| age prepare (Ray Data, local, incl. Ray start-up and report) | {ray_seconds:.0f} | {summary['listed'] / ray_seconds:.0f} |")
    print(f"| plain PIL loop, one process | {loop_seconds:.0f} | {n / loop_seconds:.0f} |")


if __name__ == "__main__":
    main()
