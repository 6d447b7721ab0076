"""The scoring job's images/s and its driver's peak memory, over a given number of rows.

    python benchmarks/score_driver.py --checkpoint CHECKPOINT --images ../shared/data/faces/final_files --rows 20000

``--rows`` beyond the images of ``--images`` are made up by symbolic links, in a temporary folder, to
the first images again: each is a path of its own (``age score`` refuses a manifest that names a path
twice), and no image is copied. The driver's peak memory is its ``ru_maxrss`` (this process, which
runs ``score``): once after starting Ray and before scoring, once after. Ray's own processes
(raylet, GCS, workers) are not counted: only what the job makes the driver hold.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from agecore.datasets import list_images
from ray_jobs.common import init_ray, setup_logging
from ray_jobs.score import score


def manifest_of(images: list[str], rows: int, work: Path) -> Path:
    """A manifest of ``rows`` distinct paths: ``images``, then links to them for the rows beyond."""
    links = work / "links"
    links.mkdir()
    extra = [str(links / f"{i:06d}-{Path(images[i % len(images)]).name}") for i in range(max(0, rows - len(images)))]
    for i, link in enumerate(extra):
        os.symlink(images[i % len(images)], link)
    manifest = work / "paths.csv"
    pd.DataFrame({"path": (images + extra)[:rows]}).to_csv(manifest, index=False)
    return manifest


def peak_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=None, help="predictor actors (default: the job's)")
    args = p.parse_args()
    setup_logging()
    work = Path(tempfile.mkdtemp())
    manifest = manifest_of(list_images(args.images), args.rows, work)
    init_ray()
    before = peak_mib()
    start = time.perf_counter()
    summary = score(args.checkpoint, str(manifest), str(work / "scores"), concurrency=args.concurrency,
                    detect_faces=False)
    seconds = time.perf_counter() - start
    after = peak_mib()
    rows = len(pd.read_parquet(work / "scores", columns=["path"]))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.rows} paths, checkpoint {args.checkpoint}, {summary['actors']} actors x {summary['threads']} threads:")
    print("| rows written | images/s (end to end) | images/s (job's summary) | driver peak RSS before scoring | after |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {rows} | {summary['scored_now'] / seconds:.1f} | {summary['images_per_second']} | {before:.0f} MiB "
          f"| {after:.0f} MiB |")


if __name__ == "__main__":
    main()
