"""What tuning buys: the default configuration against the best of an ``age tune`` search.

    python benchmarks/tune.py --prepared runs/prepared --out runs/tune-bench \\
        --backbone tf_efficientnet_lite0 --pretrained-file "$LITE0" --samples 16

Both sides train the reference head on the same cached embeddings (``--mode frozen``, the CPU path
that makes dozens of trials affordable), for the same number of epochs, and are judged on the same
validation split; the wall time of each side is printed beside its validation MAE. The feature
cache is built first (or reused) and timed on its own, as both sides share it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from agecore.config import ModelConfig, TrainConfig
from ray_jobs.common import setup_logging
from ray_jobs.run_setup import setup_run
from ray_jobs.train import train
from ray_jobs.tune import main as tune_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained-file", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--epochs", type=int, default=12)
    args = p.parse_args()
    setup_logging()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model_cfg = ModelConfig(backbone=args.backbone, pretrained="file", pretrained_file=args.pretrained_file)
    defaults = TrainConfig(mode="frozen", epochs=args.epochs)

    start = time.perf_counter()
    setup_run(args.prepared, model_cfg, defaults)  # builds (or finds) the embedding cache both sides use
    cache_seconds = time.perf_counter() - start

    start = time.perf_counter()
    base = train(args.prepared, str(out / "default"), model_cfg, defaults, attach=False)
    base_seconds = time.perf_counter() - start

    start = time.perf_counter()
    table = tune_main([
        "--prepared", args.prepared, "--out", str(out / "search"), "--samples", str(args.samples),
        "--mode", "frozen", "--backbone", args.backbone, "--pretrained-file", args.pretrained_file,
        "--epochs", str(args.epochs),
    ])
    tune_seconds = time.perf_counter() - start
    best = table.iloc[0]
    finished = table[table["status"] == "OK"]

    rows = [
        {"run": f"default (dropout {ModelConfig.dropout}, lr {defaults.lr:g})", "val_mae": base["val_mae"],
         "val_cs5": base["val_cs5"], "seconds": base_seconds},
        {"run": f"tuned best of {len(table)} trials (dropout {best['config/dropout']:.2f}, "
                f"lr {best['config/lr']:.2g})", "val_mae": best["best_val_mae"],
         "val_cs5": json.loads((out / "search" / "best" / "checkpoint.json").read_text())["metrics"]["val_cs5"],
         "seconds": tune_seconds},
    ]
    print(f"\nfeature cache: {cache_seconds / 60:.1f} min (shared by both rows)")
    print(f"trials finished: {len(finished)} of {len(table)}; median trial best MAE "
          f"{finished['best_val_mae'].median():.2f}\n")
    print("| run | val MAE | val CS@5 | wall time |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['val_mae']:.2f} | {r['val_cs5']:.1%} | {r['seconds'] / 60:.1f} min |")
    pd.DataFrame(rows).to_csv(out / "tune_benchmark.csv", index=False)


if __name__ == "__main__":
    main()
