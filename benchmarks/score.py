"""Images/s of ``age score`` against the model's ceiling and a naive loop, in one run.

    python benchmarks/score.py --checkpoint runs/train/best --images ../shared/data/faces/final_files --limit 5000

1. the Ray Data scoring job (``ray_jobs.score``: read, decode, preprocess, predict, write Parquet);
2. the ceiling: the predictor's forward pass alone on tensors decoded beforehand, the best of two layouts
   of the host's CPUs: one process running all of them as torch threads, and one single-thread
   process per CPU running at the same time (on CPUs the second is often the faster);
3. the job's fixed cost: its Ray Data plan over the same paths with actors that import torch and timm
   and predict nothing; no model, however fast, makes the job take less than this;
4. naive loops, per image: PIL open, preprocess, model on a batch of one; once with the plain eager
   fp32 PyTorch model (what a hand-written loop runs) and once with the predictor's frozen TorchScript
   graph in its own precision.

All rows use the checkpoint's own settings (flip TTA included) and this process's torch threads; all
but the eager loop run in the predictor's precision (``--precision``; by default bf16 where the CPU
has it natively).
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
from agecore.images import load_image, open_image
from agecore.predictor import Predictor
from ray_jobs.common import add_precision_argument, init_ray, model_actor_options, setup_logging
from ray_jobs.score import DEFAULT_BATCH_SIZE, SCHEMA, path_blocks, score, write_parts


def _timed_forward(checkpoint: str, arrays_file: str, threads: int, precision: str | None, barrier, results) -> None:
    """In a child process: the forward pass over ``arrays_file`` with ``threads``, started with the others."""
    import torch

    torch.set_num_threads(threads)
    predictor = Predictor(checkpoint, threads=threads, precision=precision)
    arrays = np.load(arrays_file)
    predictor.predict_arrays(arrays[:32])  # warm-up
    barrier.wait()
    start = time.perf_counter()
    predictor.predict_arrays(arrays)
    results.put(len(arrays) / (time.perf_counter() - start))


def forward_rate(checkpoint: str, arrays: np.ndarray, processes: int, threads: int, work: Path,
                 precision: str | None = None) -> float:
    """Images/s of ``processes`` single-model processes of ``threads`` threads each, running together."""
    arrays_file = work / "arrays.npy"
    np.save(arrays_file, arrays)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_timed_forward, args=(checkpoint, str(arrays_file), threads, precision, barrier, results))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


def machine_ceilings(checkpoint: str, arrays: np.ndarray, work: Path, precision: str | None = None) -> dict[str, float]:
    """The forward pass alone, images/s, in both layouts of the host's CPUs (the larger is the ceiling)."""
    cpus = os.cpu_count() or 1
    ceilings = {f"1 process x {cpus} threads": forward_rate(checkpoint, arrays, 1, cpus, work, precision)}
    if cpus > 1:
        ceilings[f"{cpus} processes x 1 thread"] = forward_rate(checkpoint, arrays, cpus, 1, work, precision)
    return ceilings


class _IdleActor:
    """A predictor actor that starts like the real one (torch and timm imported) and predicts nothing."""

    def __init__(self) -> None:
        import timm  # noqa: F401
        import torch  # noqa: F401

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        return {"path": batch["path"], "predicted_age": np.zeros(n, np.float32), "error": np.full(n, "", object)}


def fixed_cost(paths: list[str], concurrency: int | None, out: Path) -> float:
    """Seconds of the scoring job's Ray Data plan over ``paths`` with idle actors, parts written to ``out``."""
    options, _ = model_actor_options(False, concurrency, cpus_per_actor=1)
    start = time.perf_counter()
    actors = options["compute"].min_size
    ds, rows = path_blocks(paths, DEFAULT_BATCH_SIZE, actors)
    idle = ds.map_batches(_IdleActor, batch_size=rows, batch_format="numpy", **options)
    write_parts(idle, str(out), SCHEMA, rows_per_part=5000, writers=actors)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=None, help="predictor actors of the job (default: the job's)")
    p.add_argument("--naive-limit", type=int, default=300, help="the naive loop is slow: time it on fewer images")
    p.add_argument("--ceiling-images", type=int, default=1024, help="decoded faces each ceiling process runs through")
    add_precision_argument(p)  # of the job, the ceiling and the frozen loop
    args = p.parse_args()
    setup_logging()
    paths = list_images(args.images)[: args.limit]
    work = Path(tempfile.mkdtemp())
    manifest = work / "paths.csv"
    pd.DataFrame({"path": paths}).to_csv(manifest, index=False)

    init_ray()
    start = time.perf_counter()
    summary = score(args.checkpoint, str(manifest), str(work / "scores"), concurrency=args.concurrency, detect_faces=False,
                    precision=args.precision)
    job = len(paths) / (time.perf_counter() - start)
    idle = fixed_cost(paths, args.concurrency, work / "idle")

    predictor = Predictor(args.checkpoint, precision=args.precision)
    size, interp = predictor.prep.input_size, predictor.prep.interpolation
    arrays = np.stack([load_image(x, size, interp) for x in paths[: args.ceiling_images]])
    ceilings = machine_ceilings(args.checkpoint, arrays, work, args.precision)
    ceiling = max(ceilings.values())

    def naive_loop(p: Predictor) -> float:
        p.predict([open_image(paths[0])])  # warm-up
        start = time.perf_counter()
        for x in paths[: args.naive_limit]:
            p.predict([open_image(x)])
        return args.naive_limit / (time.perf_counter() - start)

    naive_eager = naive_loop(Predictor(args.checkpoint, freeze=False, precision="fp32"))
    naive = naive_loop(predictor)
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{len(paths)} images, checkpoint {args.checkpoint} ({predictor.meta['model']['backbone']}, "
          f"{size} px, flip TTA {predictor.tta_flip}, {predictor.precision}):")
    print("| method | images/s | share of ceiling |")
    print("|---|---:|---:|")
    print(f"| age score (Ray Data job, end to end; {summary['actors']} predictor actors x {summary['threads']} threads)"
          f" | {job:.1f} | {job / ceiling:.0%} |")
    for layout, rate in ceilings.items():
        print(f"| forward pass alone on decoded tensors, {layout} | {rate:.1f} | {rate / ceiling:.0%} |")
    print(f"| naive loop, batch of one, eager fp32 PyTorch model | {naive_eager:.1f} | {naive_eager / ceiling:.0%} |")
    print(f"| naive loop, batch of one, frozen TorchScript graph | {naive:.1f} | {naive / ceiling:.0%} |")
    print(f"\njob / naive eager loop: {job / naive_eager:.1f}x; job / naive frozen loop: {job / naive:.1f}x")
    bound = len(paths) / (len(paths) / ceiling + idle)
    print(f"fixed cost: the job's Ray Data plan with idle actors took {idle:.1f} s, so the job can reach at most "
          f"{bound:.1f} images/s here ({bound / ceiling:.0%} of the ceiling) on {len(paths)} images")


if __name__ == "__main__":
    main()
