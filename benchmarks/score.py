"""Images/s of ``age score`` against the model's ceiling and a naive loop, in one run.

    python benchmarks/score.py --checkpoint runs/train/best --images ../shared/data/faces/final_files --limit 5000

1. the Ray Data scoring job (``ray_jobs.score``: read, decode, preprocess, predict, write Parquet);
2. the ceiling: the predictor's forward pass alone on tensors decoded beforehand, the best of two layouts
   of this machine's CPUs: one process running all of them as torch threads, and one single-thread
   process per CPU running at the same time (on CPUs the second is often the faster);
3. naive loops, per image: PIL open, preprocess, model on a batch of one; once with the plain eager
   PyTorch model (what a hand-written loop runs) and once with the predictor's frozen TorchScript graph.

All rows use the checkpoint's own settings (flip TTA included) and this process's torch threads.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from agecore.datasets import list_images
from agecore.images import decode, read_bytes, resize_square
from agecore.predictor import Predictor
from ray_jobs.common import init_ray, setup_logging
from ray_jobs.score import score


def _timed_forward(checkpoint: str, arrays_file: str, threads: int, barrier, results) -> None:
    """In a child process: the forward pass over ``arrays_file`` with ``threads``, started with the others."""
    import torch

    torch.set_num_threads(threads)
    predictor = Predictor(checkpoint, threads=threads)
    arrays = np.load(arrays_file)
    predictor.predict_arrays(arrays[:32])  # warm-up
    barrier.wait()
    start = time.perf_counter()
    predictor.predict_arrays(arrays)
    results.put(len(arrays) / (time.perf_counter() - start))


def forward_rate(checkpoint: str, arrays: np.ndarray, processes: int, threads: int, work: Path) -> float:
    """Images/s of ``processes`` single-model processes of ``threads`` threads each, running together."""
    arrays_file = work / "arrays.npy"
    np.save(arrays_file, arrays)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_timed_forward, args=(checkpoint, str(arrays_file), threads, barrier, results))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


def machine_ceilings(checkpoint: str, arrays: np.ndarray, work: Path) -> dict[str, float]:
    """The forward pass alone, images/s, in both layouts of this machine's CPUs (the larger is the ceiling)."""
    cpus = os.cpu_count() or 1
    ceilings = {f"1 process x {cpus} threads": forward_rate(checkpoint, arrays, 1, cpus, work)}
    if cpus > 1:
        ceilings[f"{cpus} processes x 1 thread"] = forward_rate(checkpoint, arrays, cpus, 1, work)
    return ceilings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=None, help="predictor actors of the job (default: the job's)")
    p.add_argument("--naive-limit", type=int, default=300, help="the naive loop is slow: time it on fewer images")
    p.add_argument("--ceiling-images", type=int, default=1024, help="decoded faces each ceiling process runs through")
    args = p.parse_args()
    setup_logging()
    paths = list_images(args.images)[: args.limit]
    work = Path(tempfile.mkdtemp())
    manifest = work / "paths.csv"
    pd.DataFrame({"path": paths}).to_csv(manifest, index=False)

    init_ray()
    start = time.perf_counter()
    summary = score(args.checkpoint, str(manifest), str(work / "scores"), concurrency=args.concurrency)
    job = len(paths) / (time.perf_counter() - start)

    predictor = Predictor(args.checkpoint)
    size, interp = predictor.prep.input_size, predictor.prep.interpolation
    arrays = np.stack([resize_square(decode(read_bytes(x)), size, interp) for x in paths[: args.ceiling_images]])
    ceilings = machine_ceilings(args.checkpoint, arrays, work)
    ceiling = max(ceilings.values())

    def naive_loop(p: Predictor) -> float:
        p.predict([decode(read_bytes(paths[0]))])  # warm-up
        start = time.perf_counter()
        for x in paths[: args.naive_limit]:
            p.predict([decode(read_bytes(x))])
        return args.naive_limit / (time.perf_counter() - start)

    naive_eager = naive_loop(Predictor(args.checkpoint, freeze=False))
    naive = naive_loop(predictor)
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{len(paths)} images, checkpoint {args.checkpoint} ({predictor.meta['model']['backbone']}, "
          f"{size} px, flip TTA {predictor.tta_flip}):")
    print("| method | images/s | share of ceiling |")
    print("|---|---:|---:|")
    print(f"| age score (Ray Data job, end to end; {summary['actors']} predictor actors x {summary['threads']} threads)"
          f" | {job:.1f} | {job / ceiling:.0%} |")
    for layout, rate in ceilings.items():
        print(f"| forward pass alone on decoded tensors, {layout} | {rate:.1f} | {rate / ceiling:.0%} |")
    print(f"| naive loop, batch of one, eager PyTorch model | {naive_eager:.1f} | {naive_eager / ceiling:.0%} |")
    print(f"| naive loop, batch of one, frozen TorchScript graph | {naive:.1f} | {naive / ceiling:.0%} |")
    print(f"\njob / naive eager loop: {job / naive_eager:.1f}x; job / naive frozen loop: {job / naive:.1f}x")


if __name__ == "__main__":
    main()
